//! The dead-letter log in SQLite: messages the pipeline did not store, with
//! the reason, kept per device up to a limit so that a device sending only
//! bad data cannot fill the disk.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, ProfileId, TenantId};

/// A message to record in the dead-letter log.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub received_at_ns: i64,
    pub protocol: String,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub meta: Vec<u8>,
    pub stage: &'static str,
    pub reason: String,
    pub profile_id: Option<ProfileId>,
    pub profile_version: Option<i64>,
    /// Ingest log position of the message.
    pub log_seq: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub device_id: DeviceId,
    /// Receive time in nanoseconds since the epoch.
    pub received_at_ns: i64,
    pub protocol: String,
    pub content_type: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
    #[serde(skip)]
    pub meta: Vec<u8>,
    pub stage: String,
    pub reason: String,
    pub profile_id: Option<ProfileId>,
    pub profile_version: Option<i64>,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub replayed_at: Option<i64>,
}

/// Selection of dead letters for a listing or a replay.
#[derive(Debug, Default, Clone)]
pub struct DeadLetterFilter {
    pub device_id: Option<DeviceId>,
    /// Only these ids; empty means all.
    pub ids: Vec<i64>,
    /// Leave out letters that were replayed.
    pub pending_only: bool,
    /// Ids below this one (for paging backwards).
    pub before_id: Option<i64>,
    pub limit: i64,
    /// Oldest first, as a replay needs them.
    pub oldest_first: bool,
}

fn dead_letter_from_row(row: sqlx::sqlite::SqliteRow) -> Result<DeadLetter, MetadataError> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        device_id: parse_id(row.try_get("device_id")?)?,
        received_at_ns: row.try_get("received_at_ns")?,
        protocol: row.try_get("protocol")?,
        content_type: row.try_get("content_type")?,
        payload: row.try_get("payload")?,
        meta: row.try_get("meta")?,
        stage: row.try_get("stage")?,
        reason: row.try_get("reason")?,
        profile_id: row
            .try_get::<Option<String>, _>("profile_id")?
            .map(parse_id)
            .transpose()?,
        profile_version: row.try_get("profile_version")?,
        created_at: row.try_get("created_at")?,
        replayed_at: row.try_get("replayed_at")?,
    })
}

impl SqliteMetadata {
    /// Records `letters` in one transaction, then deletes the oldest letters
    /// of each device beyond `keep_per_device`.
    pub async fn insert_dead_letters(
        &self,
        letters: &[NewDeadLetter],
        keep_per_device: i64,
        keep_total: i64,
    ) -> Result<(), MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for letter in letters {
            // A device deleted meanwhile has no row to refer to; its letter
            // goes with it.
            // A replay of the log after a crash meets letters it recorded
            // before; the position keeps them from being recorded twice.
            sqlx::query(
                "INSERT OR IGNORE INTO dead_letters (tenant_id, device_id, received_at_ns, protocol, content_type, payload, meta, stage, reason, profile_id, profile_version, created_at, log_seq)
                 SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?)",
            )
            .bind(letter.tenant_id.to_string())
            .bind(letter.device_id.to_string())
            .bind(letter.received_at_ns)
            .bind(&letter.protocol)
            .bind(&letter.content_type)
            .bind(&letter.payload)
            .bind(&letter.meta)
            .bind(letter.stage)
            .bind(&letter.reason)
            .bind(letter.profile_id.map(|id| id.to_string()))
            .bind(letter.profile_version)
            .bind(now)
            .bind(letter.log_seq as i64)
            .bind(letter.device_id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        let mut devices: Vec<DeviceId> = letters.iter().map(|letter| letter.device_id).collect();
        devices.sort();
        devices.dedup();
        for device in devices {
            sqlx::query(
                "DELETE FROM dead_letters WHERE device_id = ?1 AND id <= (
                     SELECT id FROM dead_letters WHERE device_id = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            )
            .bind(device.to_string())
            .bind(keep_per_device)
            .execute(&mut *tx)
            .await?;
        }
        // The oldest letters of all devices go beyond the total limit. Ids
        // grow by one per letter, so the newest `keep_total` ids are kept.
        sqlx::query("DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?")
            .bind(keep_total)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Lists the tenant's dead letters, newest first, or oldest first with
    /// `filter.oldest_first`.
    pub async fn list_dead_letters(
        &self,
        tenant: TenantId,
        filter: &DeadLetterFilter,
    ) -> Result<Vec<DeadLetter>, MetadataError> {
        let mut sql = String::from(
            "SELECT id, device_id, received_at_ns, protocol, content_type, payload, meta, stage, reason, profile_id, profile_version, created_at, replayed_at
             FROM dead_letters WHERE tenant_id = ?",
        );
        if filter.device_id.is_some() {
            sql.push_str(" AND device_id = ?");
        }
        if filter.pending_only {
            sql.push_str(" AND replayed_at IS NULL");
        }
        if filter.before_id.is_some() {
            sql.push_str(" AND id < ?");
        }
        if !filter.ids.is_empty() {
            sql.push_str(" AND id IN (");
            sql.push_str(&vec!["?"; filter.ids.len()].join(", "));
            sql.push(')');
        }
        sql.push_str(if filter.oldest_first {
            " ORDER BY id LIMIT ?"
        } else {
            " ORDER BY id DESC LIMIT ?"
        });
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(tenant.to_string());
        if let Some(device) = filter.device_id {
            query = query.bind(device.to_string());
        }
        if let Some(before) = filter.before_id {
            query = query.bind(before);
        }
        for id in &filter.ids {
            query = query.bind(id);
        }
        let rows = query.bind(filter.limit).fetch_all(&self.pool).await?;
        rows.into_iter().map(dead_letter_from_row).collect()
    }

    /// Marks letters as replayed and returns those this call marked, so
    /// that two concurrent replays never replay the same letter.
    pub async fn claim_dead_letters(&self, ids: &[i64]) -> Result<Vec<i64>, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            let updated = sqlx::query(
                "UPDATE dead_letters SET replayed_at = ? WHERE id = ? AND replayed_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if updated.rows_affected() == 1 {
                claimed.push(*id);
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Marks letters as pending again after a replay that failed.
    pub async fn unclaim_dead_letters(&self, ids: &[i64]) -> Result<(), MetadataError> {
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query("UPDATE dead_letters SET replayed_at = NULL WHERE id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes the device's dead letters; returns how many.
    pub async fn delete_dead_letters(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<u64, MetadataError> {
        let deleted = sqlx::query("DELETE FROM dead_letters WHERE tenant_id = ? AND device_id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected())
    }
}
