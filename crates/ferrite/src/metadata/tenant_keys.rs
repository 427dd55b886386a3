//! Wrapped tenant data keys, the sealed secrets that use them, and tenant
//! deletion, which destroys a tenant's keys together with its rows.
//!
//! The metadata layer never sees a master key or an unwrapped data key:
//! wrapping happens in callbacks of `crate::encryption`, run inside the
//! write transaction so that a master key rotation in another process
//! cannot miss a key inserted at the same time.

use sqlx::Row;

use super::MetadataError;
use super::sqlite::{now_ms, parse_id};
use crate::ids::{DeviceId, TenantId};

use super::SqliteMetadata;

/// A tenant data key as stored: wrapped by the master key `master_key_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTenantKey {
    pub tenant_id: TenantId,
    pub version: u32,
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
}

/// A wrapped data key and the id of the master key that wrapped it.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
}

/// A column that stores a sealed secret of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedColumn {
    LorawanAppKey,
    LorawanNwkSKey,
    LorawanAppSKey,
    DevicePsk,
}

impl SealedColumn {
    pub const ALL: [SealedColumn; 4] = [
        SealedColumn::LorawanAppKey,
        SealedColumn::LorawanNwkSKey,
        SealedColumn::LorawanAppSKey,
        SealedColumn::DevicePsk,
    ];

    /// Returns the associated data the value was sealed with.
    pub fn context(self, device: DeviceId) -> String {
        match self {
            SealedColumn::LorawanAppKey => super::lorawan::key_context("app_key", device),
            SealedColumn::LorawanNwkSKey => super::lorawan::key_context("nwk_s_key", device),
            SealedColumn::LorawanAppSKey => super::lorawan::key_context("app_s_key", device),
            SealedColumn::DevicePsk => super::credentials::psk_seal_context(device),
        }
    }

    fn select_sql(self) -> &'static str {
        match self {
            SealedColumn::LorawanAppKey => {
                "SELECT tenant_id, device_id, app_key AS sealed FROM lorawan_devices WHERE app_key IS NOT NULL"
            }
            SealedColumn::LorawanNwkSKey => {
                "SELECT tenant_id, device_id, nwk_s_key AS sealed FROM lorawan_devices WHERE nwk_s_key IS NOT NULL"
            }
            SealedColumn::LorawanAppSKey => {
                "SELECT tenant_id, device_id, app_s_key AS sealed FROM lorawan_devices WHERE app_s_key IS NOT NULL"
            }
            SealedColumn::DevicePsk => {
                "SELECT tenant_id, device_id, sealed_key AS sealed FROM device_psks"
            }
        }
    }

    /// Replaces the value only if it is still the one read, so a value the
    /// API changed meanwhile is not overwritten.
    fn replace_sql(self) -> &'static str {
        match self {
            SealedColumn::LorawanAppKey => {
                "UPDATE lorawan_devices SET app_key = ? WHERE device_id = ? AND app_key = ?"
            }
            SealedColumn::LorawanNwkSKey => {
                "UPDATE lorawan_devices SET nwk_s_key = ? WHERE device_id = ? AND nwk_s_key = ?"
            }
            SealedColumn::LorawanAppSKey => {
                "UPDATE lorawan_devices SET app_s_key = ? WHERE device_id = ? AND app_s_key = ?"
            }
            SealedColumn::DevicePsk => {
                "UPDATE device_psks SET sealed_key = ? WHERE device_id = ? AND sealed_key = ?"
            }
        }
    }
}

/// One sealed secret of a device, as read from its column.
#[derive(Debug, Clone)]
pub struct SealedValue {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub column: SealedColumn,
    pub sealed: Vec<u8>,
}

fn tenant_key_from_row(row: sqlx::sqlite::SqliteRow) -> Result<StoredTenantKey, MetadataError> {
    let version: i64 = row.try_get("version")?;
    Ok(StoredTenantKey {
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        version: u32::try_from(version).map_err(|_| {
            MetadataError::Database(sqlx::Error::Decode(
                format!("invalid tenant key version {version} in metadata database").into(),
            ))
        })?,
        master_key_id: row.try_get("master_key_id")?,
        wrapped_key: row.try_get("wrapped_key")?,
    })
}

impl SqliteMetadata {
    /// Returns every tenant data key, wrapped.
    pub async fn tenant_keys(&self) -> Result<Vec<StoredTenantKey>, MetadataError> {
        let rows = sqlx::query(
            "SELECT tenant_id, version, master_key_id, wrapped_key FROM tenant_keys ORDER BY tenant_id, version",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(tenant_key_from_row).collect()
    }

    /// Returns the data keys of one tenant, oldest version first.
    pub async fn tenant_keys_of(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<StoredTenantKey>, MetadataError> {
        let rows = sqlx::query(
            "SELECT tenant_id, version, master_key_id, wrapped_key FROM tenant_keys WHERE tenant_id = ? ORDER BY version",
        )
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(tenant_key_from_row).collect()
    }

    /// Inserts data key `version` of `tenant`, wrapped by `wrap`, which runs
    /// while this call holds the database write lock. Returns `false`
    /// without calling `wrap` when the version exists already (another task
    /// or process created it first).
    pub async fn insert_tenant_key<E: From<MetadataError>>(
        &self,
        tenant: TenantId,
        version: u32,
        wrap: impl FnOnce() -> Result<WrappedKey, E>,
    ) -> Result<bool, E> {
        let mut tx = self.begin_write().await.map_err(MetadataError::from)?;
        let exists = sqlx::query("SELECT 1 FROM tenant_keys WHERE tenant_id = ? AND version = ?")
            .bind(tenant.to_string())
            .bind(i64::from(version))
            .fetch_optional(&mut *tx)
            .await
            .map_err(MetadataError::from)?;
        if exists.is_some() {
            return Ok(false);
        }

        let wrapped = wrap()?;
        let inserted = sqlx::query(
            "INSERT INTO tenant_keys (tenant_id, version, master_key_id, wrapped_key, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(tenant.to_string())
        .bind(i64::from(version))
        .bind(&wrapped.master_key_id)
        .bind(&wrapped.wrapped_key)
        .bind(now_ms())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => {
                return Err(MetadataError::NotFound("tenant").into());
            }
            Err(error) => return Err(MetadataError::from(error).into()),
        }
        tx.commit().await.map_err(MetadataError::from)?;
        Ok(true)
    }

    /// Replaces the wrapping of every data key for which `rewrap` returns a
    /// new one, in one transaction. Returns how many keys were rewrapped.
    pub async fn rewrap_tenant_keys<E: From<MetadataError>>(
        &self,
        mut rewrap: impl FnMut(&StoredTenantKey) -> Result<Option<WrappedKey>, E>,
    ) -> Result<usize, E> {
        let mut tx = self.begin_write().await.map_err(MetadataError::from)?;
        let rows = sqlx::query(
            "SELECT tenant_id, version, master_key_id, wrapped_key FROM tenant_keys ORDER BY tenant_id, version",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(MetadataError::from)?;

        let mut count = 0;
        for row in rows {
            let key = tenant_key_from_row(row)?;
            let Some(wrapped) = rewrap(&key)? else {
                continue;
            };
            sqlx::query(
                "UPDATE tenant_keys SET master_key_id = ?, wrapped_key = ? WHERE tenant_id = ? AND version = ?",
            )
            .bind(&wrapped.master_key_id)
            .bind(&wrapped.wrapped_key)
            .bind(key.tenant_id.to_string())
            .bind(i64::from(key.version))
            .execute(&mut *tx)
            .await
            .map_err(MetadataError::from)?;
            count += 1;
        }
        tx.commit().await.map_err(MetadataError::from)?;
        Ok(count)
    }

    /// Returns every sealed device secret (LoRaWAN keys, DTLS PSKs).
    pub async fn sealed_values(&self) -> Result<Vec<SealedValue>, MetadataError> {
        let mut values = Vec::new();
        for column in SealedColumn::ALL {
            let rows = sqlx::query(column.select_sql())
                .fetch_all(&self.pool)
                .await?;
            for row in rows {
                values.push(SealedValue {
                    tenant_id: parse_id(row.try_get("tenant_id")?)?,
                    device_id: parse_id(row.try_get("device_id")?)?,
                    column,
                    sealed: row.try_get("sealed")?,
                });
            }
        }
        Ok(values)
    }

    /// Stores `sealed` in place of `value` unless the column changed since
    /// `value` was read. Returns whether it was stored.
    pub async fn replace_sealed_value(
        &self,
        value: &SealedValue,
        sealed: &[u8],
    ) -> Result<bool, MetadataError> {
        let result = sqlx::query(value.column.replace_sql())
            .bind(sealed)
            .bind(value.device_id.to_string())
            .bind(&value.sealed)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Returns the ids of all tenants.
    pub async fn tenant_ids(&self) -> Result<Vec<TenantId>, MetadataError> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM tenants")
            .fetch_all(&self.pool)
            .await?;
        ids.into_iter().map(parse_id).collect()
    }

    /// Inserts a tenant, for tests of other modules.
    #[cfg(test)]
    pub async fn insert_test_tenant(&self, name: &str) -> TenantId {
        let id = TenantId::new_random();
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, 0)")
            .bind(id.to_string())
            .bind(name)
            .execute(&self.pool)
            .await
            .expect("insert a tenant");
        id
    }

    /// Deletes a tenant with everything in it (devices, users, API keys,
    /// profiles, alarms, credentials) and destroys its data keys.
    ///
    /// The wrapped keys are overwritten with zeros before the rows go, and
    /// the write-ahead log is checkpointed and truncated afterwards, so
    /// that neither `metadata.db` nor `metadata.db-wal` keeps a copy.
    /// Copies in backups or in free blocks of the file system are out of
    /// reach of this call.
    pub async fn delete_tenant(&self, tenant: TenantId) -> Result<(), MetadataError> {
        let id = tenant.to_string();
        let mut tx = self.begin_write().await?;
        let name: Option<String> = sqlx::query_scalar("SELECT name FROM tenants WHERE id = ?")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        match name.as_deref() {
            None => return Err(MetadataError::NotFound("tenant")),
            Some(super::sqlite::DEFAULT_TENANT) => {
                return Err(MetadataError::Conflict(
                    "the default tenant cannot be deleted, because the server and the CLI commands use it".to_owned(),
                ));
            }
            Some(_) => {}
        }

        sqlx::query("UPDATE tenant_keys SET wrapped_key = zeroblob(length(wrapped_key)) WHERE tenant_id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tenant_keys WHERE tenant_id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        // Devices first: a device refers to its profile with ON DELETE
        // RESTRICT, and the cascade from the tenant row would otherwise
        // delete profiles that devices still refer to.
        sqlx::query("DELETE FROM devices WHERE tenant_id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM tenants WHERE id = ?")
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;

        // Copies the zeroed pages into the database file and empties the
        // write-ahead log, which still contains the pages as they were
        // when the keys were written. Readers in other processes can make
        // the checkpoint incomplete; it is then logged and retried by the
        // next automatic checkpoint.
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.pool)
            .await?;
        if busy != 0 {
            tracing::warn!(tenant_id = %tenant, "the write-ahead log could not be truncated after the tenant was deleted, because another connection was reading; the next checkpoint overwrites the old pages");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MetadataStore;

    #[tokio::test]
    async fn tenant_deletion_cascades_to_profiled_devices() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = SqliteMetadata::open(dir.path()).await.unwrap();
        let tenant = metadata.insert_test_tenant("acme").await;
        let spec: crate::profiles::ProfileSpec =
            serde_json::from_value(serde_json::json!({"name": "boiler"})).unwrap();
        let profile = metadata.create_profile(tenant, &spec).await.unwrap();
        let device = metadata
            .create_device(tenant, "d1", &[7; 32])
            .await
            .unwrap();
        sqlx::query("UPDATE devices SET profile_id = ? WHERE id = ?")
            .bind(profile.id.to_string())
            .bind(device.id.to_string())
            .execute(&metadata.pool)
            .await
            .unwrap();
        metadata
            .set_device_psk(tenant, device.id, b"acme-d1", &[2; 40])
            .await
            .unwrap();
        metadata
            .insert_tenant_key(tenant, 1, || -> Result<_, MetadataError> {
                Ok(WrappedKey {
                    master_key_id: "0011223344556677".to_owned(),
                    wrapped_key: vec![1; 61],
                })
            })
            .await
            .unwrap();

        metadata.delete_tenant(tenant).await.unwrap();

        let error = metadata.tenant_by_name("acme").await.unwrap_err();
        assert!(
            matches!(error, MetadataError::NotFound("tenant")),
            "{error}"
        );
        assert!(metadata.tenant_keys_of(tenant).await.unwrap().is_empty());
        assert!(metadata.sealed_values().await.unwrap().is_empty());
        let devices: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
            .fetch_one(&metadata.pool)
            .await
            .unwrap();
        assert_eq!(devices, 0);
        let profiles: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM device_profiles")
            .fetch_one(&metadata.pool)
            .await
            .unwrap();
        assert_eq!(profiles, 0);
        assert!(matches!(
            metadata.delete_tenant(tenant).await,
            Err(MetadataError::NotFound("tenant"))
        ));
    }
}
