//! SQLite implementation of [`MetadataStore`].

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{
    ApiKey, AttemptResult, Delivery, DeliveryFilter, DeliveryId, DeliveryStatus, Device, Labels,
    MetadataError, MetadataStore, NewDelivery, Role, Tenant, User,
};
use crate::ids::{ApiKeyId, DeviceId, TenantId, UserId};

pub(super) const DEFAULT_TENANT: &str = "default";

#[derive(Clone)]
pub struct SqliteMetadata {
    pub(super) pool: SqlitePool,
}

pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn parse_id<T: FromStr>(text: String) -> Result<T, MetadataError> {
    text.parse().map_err(|_| {
        MetadataError::Database(sqlx::Error::Decode(
            format!("invalid id {text:?} in metadata database").into(),
        ))
    })
}

fn parse_role(text: String) -> Result<Role, MetadataError> {
    text.parse()
        .map_err(|message: String| MetadataError::Database(sqlx::Error::Decode(message.into())))
}

fn parse_labels(text: String) -> Result<Labels, MetadataError> {
    serde_json::from_str(&text).map_err(|error| {
        MetadataError::Database(sqlx::Error::Decode(
            format!("invalid device labels {text:?} in metadata database: {error}").into(),
        ))
    })
}

pub(super) fn parse_json_column<T: serde::de::DeserializeOwned>(
    text: String,
    what: &str,
) -> Result<T, MetadataError> {
    serde_json::from_str(&text).map_err(|error| {
        MetadataError::Database(sqlx::Error::Decode(
            format!("invalid {what} {text:?} in metadata database: {error}").into(),
        ))
    })
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl SqliteMetadata {
    /// Opens (creating if needed) `metadata.db` in `data_dir` and applies
    /// pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Self, MetadataError> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("metadata.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            // Overwrites deleted rows with zeros, so that destroyed tenant
            // data keys do not linger in free pages.
            .pragma("secure_delete", "on")
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Self { pool };
        store.ensure_default_tenant().await?;
        Ok(store)
    }

    async fn ensure_default_tenant(&self) -> Result<(), MetadataError> {
        sqlx::query("INSERT OR IGNORE INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(TenantId::new_random().to_string())
            .bind(DEFAULT_TENANT)
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Wraps a pool without running migrations, for tests that never reach
    /// the database.
    #[cfg(test)]
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Starts a transaction that takes the write lock at once. A deferred
    /// transaction that reads first and writes later fails at once with
    /// "database is locked" when another connection writes meanwhile,
    /// because SQLite cannot wait for the lock without risking a deadlock.
    pub(super) async fn begin_write(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Inserts a device token hash inside the transaction that creates the
/// device or replaces its tokens.
async fn insert_device_token(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    token_hash: &[u8],
    id: DeviceId,
    created_at: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO device_tokens (token_hash, device_id, created_at) VALUES (?, ?, ?)")
        .bind(token_hash)
        .bind(id.to_string())
        .bind(created_at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub(super) fn device_from_row(row: sqlx::sqlite::SqliteRow) -> Result<Device, MetadataError> {
    Ok(Device {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
        labels: parse_labels(row.try_get("labels")?)?,
        profile_id: row
            .try_get::<Option<String>, _>("profile_id")?
            .map(parse_id)
            .transpose()?,
        attributes: parse_json_column(row.try_get("attributes")?, "device attributes")?,
    })
}

fn user_from_row(row: sqlx::sqlite::SqliteRow) -> Result<User, MetadataError> {
    Ok(User {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        email: row.try_get("email")?,
        role: parse_role(row.try_get("role")?)?,
        password_hash: row.try_get("password_hash")?,
    })
}

impl MetadataStore for SqliteMetadata {
    async fn default_tenant(&self) -> Result<Tenant, MetadataError> {
        let row = sqlx::query("SELECT id, name FROM tenants WHERE name = ?")
            .bind(DEFAULT_TENANT)
            .fetch_one(&self.pool)
            .await?;
        Ok(Tenant {
            id: parse_id(row.try_get("id")?)?,
            name: row.try_get("name")?,
        })
    }

    async fn count_users(&self) -> Result<i64, MetadataError> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?;
        Ok(count)
    }

    async fn create_user(
        &self,
        tenant: TenantId,
        email: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User, MetadataError> {
        let id = UserId::new_random();
        let result = sqlx::query(
            "INSERT INTO users (id, tenant_id, email, password_hash, role, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(email)
        .bind(password_hash)
        .bind(role.as_str())
        .bind(now_ms())
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(User {
                id,
                tenant_id: tenant,
                email: email.to_owned(),
                role,
                password_hash: password_hash.to_owned(),
            }),
            Err(error) if is_unique_violation(&error) => Err(MetadataError::Conflict(format!(
                "a user with the email {email:?} already exists"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    async fn user_by_email(&self, email: &str) -> Result<Option<User>, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, email, password_hash, role FROM users WHERE email = ?",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        row.map(user_from_row).transpose()
    }

    async fn create_device(
        &self,
        tenant: TenantId,
        name: &str,
        token_hash: &[u8],
    ) -> Result<Device, MetadataError> {
        let id = DeviceId::new_random();
        let created_at = now_ms();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO devices (id, tenant_id, name, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(name)
        .bind(created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                return Err(MetadataError::Conflict(format!(
                    "a device named {name:?} already exists"
                )));
            }
            Err(error) => return Err(error.into()),
        }
        insert_device_token(&mut tx, token_hash, id, created_at).await?;
        tx.commit().await?;
        Ok(Device {
            id,
            tenant_id: tenant,
            name: name.to_owned(),
            created_at,
            last_seen_at: None,
            labels: Labels::new(),
            profile_id: None,
            attributes: Default::default(),
        })
    }

    async fn device(&self, tenant: TenantId, id: DeviceId) -> Result<Device, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices WHERE tenant_id = ? AND id = ?",
        )
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("device"))
    }

    async fn create_devices(
        &self,
        tenant: TenantId,
        new: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, DeviceId)>, MetadataError> {
        let created_at = now_ms();
        let tenant = tenant.to_string();
        let mut created = Vec::with_capacity(new.len());
        let mut tx = self.pool.begin().await?;
        for (name, token_hash) in new {
            let id = DeviceId::new_random();
            let inserted = sqlx::query(
                "INSERT INTO devices (id, tenant_id, name, created_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(id.to_string())
            .bind(&tenant)
            .bind(name)
            .bind(created_at)
            .execute(&mut *tx)
            .await?;
            if inserted.rows_affected() == 0 {
                continue;
            }
            insert_device_token(&mut tx, token_hash, id, created_at).await?;
            created.push((name.clone(), id));
        }
        tx.commit().await?;
        Ok(created)
    }

    async fn device_ids_by_names(
        &self,
        tenant: TenantId,
        names: &[String],
    ) -> Result<Vec<(String, DeviceId)>, MetadataError> {
        // SQLite allows 32,766 parameters per statement; 500 names keep each
        // statement small.
        let tenant = tenant.to_string();
        let mut found = Vec::with_capacity(names.len());
        for chunk in names.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT name, id FROM devices WHERE tenant_id = ? AND name IN ({placeholders})"
            );
            // Only the number of placeholders varies; names are bound.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&tenant);
            for name in chunk {
                query = query.bind(name);
            }
            for row in query.fetch_all(&self.pool).await? {
                found.push((row.try_get("name")?, parse_id(row.try_get("id")?)?));
            }
        }
        Ok(found)
    }

    async fn device_by_name(
        &self,
        tenant: TenantId,
        name: &str,
    ) -> Result<Option<Device>, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices WHERE tenant_id = ? AND name = ?",
        )
        .bind(tenant.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row).transpose()
    }

    async fn list_devices(
        &self,
        tenant: TenantId,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Device>, MetadataError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices WHERE tenant_id = ? ORDER BY name LIMIT ? OFFSET ?",
        )
        .bind(tenant.to_string())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_from_row).collect()
    }

    async fn delete_device(&self, tenant: TenantId, id: DeviceId) -> Result<(), MetadataError> {
        let result = sqlx::query("DELETE FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("device"));
        }
        // `device_id` of retained messages is not a foreign key, so they
        // are deleted here; rows left by a failure go at the next start.
        sqlx::query("DELETE FROM mqtt_retained WHERE tenant_id = ? AND device_id = ?")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn rotate_device_token(
        &self,
        tenant: TenantId,
        id: DeviceId,
        token_hash: &[u8],
    ) -> Result<(), MetadataError> {
        self.device(tenant, id).await?;
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE device_tokens SET revoked_at = ?1 WHERE device_id = ?2 AND (revoked_at IS NULL OR revoked_at > ?1)",
        )
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        insert_device_token(&mut tx, token_hash, id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn device_by_token_hash(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<Device>, MetadataError> {
        let row = sqlx::query(
            "SELECT d.id, d.tenant_id, d.name, d.created_at, d.last_seen_at, d.labels, d.profile_id, d.attributes
             FROM device_tokens t JOIN devices d ON d.id = t.device_id
             WHERE t.token_hash = ? AND (t.revoked_at IS NULL OR t.revoked_at > ?)",
        )
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row).transpose()
    }

    async fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), MetadataError> {
        let mut tx = self.pool.begin().await?;
        for (id, at) in seen {
            sqlx::query(
                "UPDATE devices SET last_seen_at = MAX(COALESCE(last_seen_at, 0), ?) WHERE id = ?",
            )
            .bind(at)
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn merge_labels(&self, labels: &[(DeviceId, Labels)]) -> Result<(), MetadataError> {
        let mut tx = self.pool.begin().await?;
        for (id, new_labels) in labels {
            let encoded = serde_json::to_string(new_labels)
                .map_err(|error| MetadataError::Database(sqlx::Error::Encode(error.into())))?;
            sqlx::query("UPDATE devices SET labels = json_patch(labels, ?) WHERE id = ?")
                .bind(encoded)
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_api_key(
        &self,
        tenant: TenantId,
        name: &str,
        role: Role,
        key_hash: &[u8],
    ) -> Result<ApiKey, MetadataError> {
        let id = ApiKeyId::new_random();
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(name)
        .bind(key_hash)
        .bind(role.as_str())
        .bind(created_at)
        .execute(&self.pool)
        .await?;
        Ok(ApiKey {
            id,
            tenant_id: tenant,
            name: name.to_owned(),
            role,
            created_at,
        })
    }

    async fn revoke_api_key(&self, tenant: TenantId, id: ApiKeyId) -> Result<(), MetadataError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(tenant.to_string())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("API key"));
        }
        Ok(())
    }

    async fn revoke_api_keys_named(
        &self,
        tenant: TenantId,
        name: &str,
    ) -> Result<u64, MetadataError> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = ? WHERE tenant_id = ? AND name = ? AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(tenant.to_string())
        .bind(name)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    async fn insert_action_deliveries(
        &self,
        deliveries: &[NewDelivery],
    ) -> Result<(), MetadataError> {
        let mut tx = self.pool.begin().await?;
        for delivery in deliveries {
            sqlx::query(
                "INSERT INTO action_deliveries (id, tenant_id, device_id, alarm_id, kind, target, event, spec, payload, status, attempts, next_attempt_at, started_at, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)",
            )
            .bind(delivery.id.to_string())
            .bind(delivery.tenant_id.to_string())
            .bind(delivery.device_id.to_string())
            .bind(delivery.alarm_id.map(|id| id.to_string()))
            .bind(delivery.kind.as_str())
            .bind(&delivery.target)
            .bind(&delivery.event)
            .bind(&delivery.spec)
            .bind(&delivery.payload)
            .bind(delivery.created_at)
            .bind(delivery.created_at)
            .bind(delivery.created_at)
            .bind(delivery.created_at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_action_deliveries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, MetadataError> {
        let rows = sqlx::query(
            "SELECT * FROM action_deliveries WHERE status = 'pending' AND next_attempt_at <= ? ORDER BY next_attempt_at LIMIT ?",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(delivery_from_row).collect()
    }

    async fn record_action_attempt(
        &self,
        id: DeliveryId,
        result: &AttemptResult,
    ) -> Result<(), MetadataError> {
        sqlx::query(
            "UPDATE action_deliveries SET status = ?, attempts = ?, last_error = ?, last_status_code = ?, next_attempt_at = ?, updated_at = ? WHERE id = ?",
        )
        .bind(result.status.as_str())
        .bind(i64::from(result.attempts))
        .bind(&result.last_error)
        .bind(result.last_status_code.map(i64::from))
        .bind(result.next_attempt_at)
        .bind(result.updated_at)
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn action_delivery(
        &self,
        tenant: TenantId,
        id: DeliveryId,
    ) -> Result<Delivery, MetadataError> {
        let row = sqlx::query("SELECT * FROM action_deliveries WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(delivery_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("delivery"))
    }

    async fn list_action_deliveries(
        &self,
        tenant: TenantId,
        filter: &DeliveryFilter,
    ) -> Result<Vec<Delivery>, MetadataError> {
        // Unset filters compare with NULL and match every row.
        let rows = sqlx::query(
            "SELECT * FROM action_deliveries
             WHERE tenant_id = ?
               AND (?2 IS NULL OR status = ?2)
               AND (?3 IS NULL OR alarm_id = ?3)
               AND (?4 IS NULL OR id < ?4)
             ORDER BY id DESC LIMIT ?5",
        )
        .bind(tenant.to_string())
        .bind(filter.status.map(DeliveryStatus::as_str))
        .bind(filter.alarm_id.map(|id| id.to_string()))
        .bind(filter.before.map(|id| id.to_string()))
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(delivery_from_row).collect()
    }

    async fn restart_action_delivery(
        &self,
        tenant: TenantId,
        id: DeliveryId,
        now_ms: i64,
    ) -> Result<Delivery, MetadataError> {
        let result = sqlx::query(
            "UPDATE action_deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?1, started_at = ?1, updated_at = ?1 WHERE tenant_id = ?2 AND id = ?3",
        )
        .bind(now_ms)
        .bind(tenant.to_string())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("delivery"));
        }
        self.action_delivery(tenant, id).await
    }

    async fn delete_finished_action_deliveries(
        &self,
        succeeded_before: i64,
        failed_before: i64,
    ) -> Result<u64, MetadataError> {
        let result = sqlx::query(
            "DELETE FROM action_deliveries WHERE (status = 'succeeded' AND updated_at < ?) OR (status = 'failed' AND updated_at < ?)",
        )
        .bind(succeeded_before)
        .bind(failed_before)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }
}

fn parse_column<T: FromStr<Err = String>>(text: String) -> Result<T, MetadataError> {
    text.parse()
        .map_err(|message: String| MetadataError::Database(sqlx::Error::Decode(message.into())))
}

fn delivery_from_row(row: sqlx::sqlite::SqliteRow) -> Result<Delivery, MetadataError> {
    let alarm_id: Option<String> = row.try_get("alarm_id")?;
    let attempts: i64 = row.try_get("attempts")?;
    let last_status_code: Option<i64> = row.try_get("last_status_code")?;
    Ok(Delivery {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        device_id: parse_id(row.try_get("device_id")?)?,
        alarm_id: alarm_id.map(parse_id).transpose()?,
        kind: parse_column(row.try_get("kind")?)?,
        target: row.try_get("target")?,
        event: row.try_get("event")?,
        spec: row.try_get("spec")?,
        payload: row.try_get("payload")?,
        status: parse_column(row.try_get("status")?)?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error: row.try_get("last_error")?,
        last_status_code: last_status_code.and_then(|code| u16::try_from(code).ok()),
        next_attempt_at: row.try_get("next_attempt_at")?,
        started_at: row.try_get("started_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}
