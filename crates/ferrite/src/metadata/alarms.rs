//! Alarms and their history in SQLite.
//!
//! An alarm row is created when a rule raises on a device and closed
//! (`status = 'cleared'`) when it clears; a unique index keeps at most one
//! open alarm per rule and device. Every change is also appended to
//! `alarm_events`, which is the alarm's history.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id, parse_json_column};
use super::{MetadataError, SqliteMetadata};
use crate::ids::{AlarmId, DeviceId, ProfileId, TenantId};
use crate::live::AlarmChange;
use crate::rules::Severity;

#[derive(Debug, Clone, Serialize)]
pub struct Alarm {
    pub id: AlarmId,
    #[serde(skip)]
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub device_name: String,
    pub profile_id: Option<ProfileId>,
    pub rule: String,
    pub severity: Severity,
    /// `active`, `acknowledged` (active and acknowledged) or `cleared`.
    pub status: &'static str,
    pub acknowledged: bool,
    pub message: String,
    /// The values that raised or last updated the alarm.
    pub details: serde_json::Value,
    /// Epoch milliseconds.
    pub raised_at: i64,
    pub updated_at: i64,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub cleared_at: Option<i64>,
    /// Paging position for `GET /api/v1/alarms?before=`.
    #[serde(skip)]
    pub cursor: i64,
}

impl Alarm {
    pub fn is_open(&self) -> bool {
        self.cleared_at.is_none()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AlarmHistoryEntry {
    /// Epoch milliseconds.
    pub at: i64,
    pub change: String,
    pub severity: String,
    pub details: serde_json::Value,
    /// Who acknowledged or cleared the alarm by hand.
    pub actor: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct AlarmFilter {
    /// `active`, `acknowledged`, `cleared` or `open` (active or
    /// acknowledged).
    pub status: Option<String>,
    pub device_id: Option<DeviceId>,
    pub rule: Option<String>,
    pub min_severity: Option<Severity>,
    /// Paging cursor: alarms listed after the one with this `cursor`.
    pub before: Option<i64>,
    pub limit: i64,
}

/// A new alarm to insert.
pub struct NewAlarm<'a> {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub profile_id: Option<ProfileId>,
    pub rule: &'a str,
    pub severity: Severity,
    pub message: &'a str,
    pub details: &'a serde_json::Value,
    pub at: i64,
    /// Ingest log position of the message that raised it.
    pub seq: Option<u64>,
}

macro_rules! alarm_columns {
    () => {
        "a.id, a.tenant_id, a.device_id, d.name AS device_name, a.profile_id, a.rule, a.severity, a.status, a.acknowledged, a.message, a.details, a.raised_at, a.updated_at, a.acknowledged_at, a.acknowledged_by, a.cleared_at, a.rowid AS cursor"
    };
}

fn alarm_from_row(row: sqlx::sqlite::SqliteRow) -> Result<Alarm, MetadataError> {
    let severity: String = row.try_get("severity")?;
    let status: String = row.try_get("status")?;
    let acknowledged: bool = row.try_get("acknowledged")?;
    Ok(Alarm {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        device_id: parse_id(row.try_get("device_id")?)?,
        device_name: row.try_get("device_name")?,
        profile_id: row
            .try_get::<Option<String>, _>("profile_id")?
            .map(parse_id)
            .transpose()?,
        rule: row.try_get("rule")?,
        severity: Severity::parse(&severity).unwrap_or_default(),
        status: match (status.as_str(), acknowledged) {
            ("cleared", _) => "cleared",
            (_, true) => "acknowledged",
            _ => "active",
        },
        acknowledged,
        message: row.try_get("message")?,
        details: parse_json_column(row.try_get("details")?, "alarm details")?,
        raised_at: row.try_get("raised_at")?,
        updated_at: row.try_get("updated_at")?,
        acknowledged_at: row.try_get("acknowledged_at")?,
        acknowledged_by: row.try_get("acknowledged_by")?,
        cleared_at: row.try_get("cleared_at")?,
        cursor: row.try_get("cursor")?,
    })
}

async fn append_event(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    alarm: AlarmId,
    at: i64,
    change: AlarmChange,
    severity: Severity,
    details: &serde_json::Value,
    actor: Option<&str>,
) -> Result<(), MetadataError> {
    sqlx::query(
        "INSERT INTO alarm_events (alarm_id, at, change, severity, details, actor) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(alarm.to_string())
    .bind(at)
    .bind(change.as_str())
    .bind(severity.as_str())
    .bind(details.to_string())
    .bind(actor)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl SqliteMetadata {
    async fn alarm_in(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        id: AlarmId,
    ) -> Result<Alarm, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            alarm_columns!(),
            " FROM alarms a JOIN devices d ON d.id = a.device_id WHERE a.id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
        row.map(alarm_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("alarm"))
    }

    /// Returns the ingest log position of the last transition applied per
    /// device and rule, for the alarm manager's start.
    pub async fn alarm_positions(
        &self,
    ) -> Result<std::collections::HashMap<(DeviceId, String), u64>, MetadataError> {
        let rows = sqlx::query(
            "SELECT device_id, rule, MAX(last_seq) AS last_seq FROM alarms WHERE last_seq IS NOT NULL GROUP BY device_id, rule",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let seq: i64 = row.try_get("last_seq")?;
                Ok((
                    (parse_id(row.try_get("device_id")?)?, row.try_get("rule")?),
                    seq as u64,
                ))
            })
            .collect()
    }

    /// Returns every open alarm of every tenant, for the alarm manager's
    /// start.
    pub async fn open_alarms(&self) -> Result<Vec<Alarm>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            alarm_columns!(),
            " FROM alarms a JOIN devices d ON d.id = a.device_id WHERE a.status = 'active'"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(alarm_from_row).collect()
    }

    pub async fn raise_alarm(&self, new: NewAlarm<'_>) -> Result<Alarm, MetadataError> {
        let id = AlarmId::new_random();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO alarms (id, tenant_id, device_id, profile_id, rule, severity, status, message, details, raised_at, updated_at, last_seq)
             VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(new.tenant_id.to_string())
        .bind(new.device_id.to_string())
        .bind(new.profile_id.map(|id| id.to_string()))
        .bind(new.rule)
        .bind(new.severity.as_str())
        .bind(new.message)
        .bind(new.details.to_string())
        .bind(new.at)
        .bind(new.at)
        .bind(new.seq.map(|seq| seq as i64))
        .execute(&mut *tx)
        .await?;
        append_event(
            &mut tx,
            id,
            new.at,
            AlarmChange::Raised,
            new.severity,
            new.details,
            None,
        )
        .await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(alarm)
    }

    /// Records a new severity, message and values of an open alarm.
    pub async fn update_alarm(
        &self,
        id: AlarmId,
        severity: Severity,
        message: &str,
        details: &serde_json::Value,
        at: i64,
        seq: Option<u64>,
    ) -> Result<Alarm, MetadataError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE alarms SET severity = ?, message = ?, details = ?, updated_at = ?, last_seq = COALESCE(?, last_seq) WHERE id = ?",
        )
        .bind(severity.as_str())
        .bind(message)
        .bind(details.to_string())
        .bind(at)
        .bind(seq.map(|seq| seq as i64))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        append_event(
            &mut tx,
            id,
            at,
            AlarmChange::Updated,
            severity,
            details,
            None,
        )
        .await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(alarm)
    }

    /// Clears an open alarm; `actor` is set when a person cleared it.
    pub async fn clear_alarm(
        &self,
        id: AlarmId,
        details: &serde_json::Value,
        at: i64,
        actor: Option<&str>,
        seq: Option<u64>,
    ) -> Result<Alarm, MetadataError> {
        let mut tx = self.begin_write().await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        if !alarm.is_open() {
            return Err(MetadataError::Conflict(
                "the alarm is already cleared".into(),
            ));
        }
        sqlx::query(
            "UPDATE alarms SET status = 'cleared', cleared_at = ?, updated_at = ?, last_seq = COALESCE(?, last_seq) WHERE id = ?",
        )
        .bind(at)
        .bind(at)
        .bind(seq.map(|seq| seq as i64))
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        append_event(
            &mut tx,
            id,
            at,
            AlarmChange::Cleared,
            alarm.severity,
            details,
            actor,
        )
        .await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(alarm)
    }

    /// Acknowledges an alarm of the tenant. Acknowledging twice is a
    /// conflict, so two operators learn that someone else acted.
    pub async fn acknowledge_alarm(
        &self,
        tenant: TenantId,
        id: AlarmId,
        actor: &str,
    ) -> Result<Alarm, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        if alarm.tenant_id != tenant {
            return Err(MetadataError::NotFound("alarm"));
        }
        if alarm.acknowledged {
            return Err(MetadataError::Conflict(format!(
                "the alarm was already acknowledged by {}",
                alarm.acknowledged_by.as_deref().unwrap_or("someone")
            )));
        }
        sqlx::query(
            "UPDATE alarms SET acknowledged = 1, acknowledged_at = ?, acknowledged_by = ?, updated_at = ? WHERE id = ?",
        )
        .bind(now)
        .bind(actor)
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        append_event(
            &mut tx,
            id,
            now,
            AlarmChange::Acknowledged,
            alarm.severity,
            &serde_json::json!({}),
            Some(actor),
        )
        .await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        tx.commit().await?;
        Ok(alarm)
    }

    pub async fn alarm(&self, tenant: TenantId, id: AlarmId) -> Result<Alarm, MetadataError> {
        let mut tx = self.pool.begin().await?;
        let alarm = self.alarm_in(&mut tx, id).await?;
        tx.commit().await?;
        if alarm.tenant_id != tenant {
            return Err(MetadataError::NotFound("alarm"));
        }
        Ok(alarm)
    }

    pub async fn alarm_history(
        &self,
        id: AlarmId,
    ) -> Result<Vec<AlarmHistoryEntry>, MetadataError> {
        let rows = sqlx::query(
            "SELECT at, change, severity, details, actor FROM alarm_events WHERE alarm_id = ? ORDER BY id",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(AlarmHistoryEntry {
                    at: row.try_get("at")?,
                    change: row.try_get("change")?,
                    severity: row.try_get("severity")?,
                    details: parse_json_column(row.try_get("details")?, "alarm event details")?,
                    actor: row.try_get("actor")?,
                })
            })
            .collect()
    }

    /// Lists the tenant's alarms, newest first.
    pub async fn list_alarms(
        &self,
        tenant: TenantId,
        filter: &AlarmFilter,
    ) -> Result<Vec<Alarm>, MetadataError> {
        let mut sql = String::from(concat!(
            "SELECT ",
            alarm_columns!(),
            " FROM alarms a JOIN devices d ON d.id = a.device_id WHERE a.tenant_id = ?"
        ));
        match filter.status.as_deref() {
            Some("active") => sql.push_str(" AND a.status = 'active' AND a.acknowledged = 0"),
            Some("acknowledged") => sql.push_str(" AND a.status = 'active' AND a.acknowledged = 1"),
            Some("open") => sql.push_str(" AND a.status = 'active'"),
            Some("cleared") => sql.push_str(" AND a.status = 'cleared'"),
            _ => {}
        }
        if filter.device_id.is_some() {
            sql.push_str(" AND a.device_id = ?");
        }
        if filter.rule.is_some() {
            sql.push_str(" AND a.rule = ?");
        }
        if filter.before.is_some() {
            sql.push_str(" AND a.rowid < ?");
        }
        if let Some(min) = filter.min_severity {
            let names: Vec<String> = Severity::ALL
                .iter()
                .filter(|severity| **severity >= min)
                .map(|severity| format!("'{}'", severity.as_str()))
                .collect();
            sql.push_str(&format!(" AND a.severity IN ({})", names.join(", ")));
        }
        // Row ids grow with every raise, so they order alarms as their
        // raise times do and, unlike times, never tie.
        sql.push_str(" ORDER BY a.rowid DESC LIMIT ?");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant.to_string());
        if let Some(device) = filter.device_id {
            query = query.bind(device.to_string());
        }
        if let Some(rule) = &filter.rule {
            query = query.bind(rule);
        }
        if let Some(before) = filter.before {
            query = query.bind(before);
        }
        let rows = query.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.into_iter().map(alarm_from_row).collect()
    }
}
