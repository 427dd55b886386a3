//! Device profiles and the profile, labels and attributes of devices, in
//! SQLite.

use sqlx::Row;

use super::sqlite::{device_from_row, now_ms, parse_id, parse_json_column};
use super::{Device, MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, ProfileId, TenantId};
use crate::profiles::ProfileSpec;

/// A profile as stored: the document and its bookkeeping.
#[derive(Debug, Clone)]
pub struct StoredProfile {
    pub id: ProfileId,
    pub tenant_id: TenantId,
    pub spec: ProfileSpec,
    /// Grows by one on every change.
    pub version: i64,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

/// A change to a device's properties. `None` leaves a property as it is.
#[derive(Debug, Default)]
pub struct DeviceChanges {
    /// `Some(None)` removes the profile.
    pub profile_id: Option<Option<ProfileId>>,
    /// A JSON merge patch (RFC 7396) of the labels: `null` removes a label.
    pub labels: Option<serde_json::Map<String, serde_json::Value>>,
    /// A JSON merge patch of the attributes.
    pub attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

fn profile_from_row(row: sqlx::sqlite::SqliteRow) -> Result<StoredProfile, MetadataError> {
    Ok(StoredProfile {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        spec: parse_json_column(row.try_get("spec")?, "device profile")?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, MetadataError> {
    serde_json::to_string(value)
        .map_err(|error| MetadataError::Database(sqlx::Error::Encode(error.into())))
}

/// Inserts a new profile at version 1; a taken name is a conflict.
async fn insert_profile(
    connection: &mut sqlx::SqliteConnection,
    tenant: TenantId,
    spec: &ProfileSpec,
    now: i64,
) -> Result<StoredProfile, MetadataError> {
    let id = ProfileId::new_random();
    sqlx::query(
        "INSERT INTO device_profiles (id, tenant_id, name, spec, version, created_at, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?)",
    )
    .bind(id.to_string())
    .bind(tenant.to_string())
    .bind(&spec.name)
    .bind(encode(spec)?)
    .bind(now)
    .bind(now)
    .execute(&mut *connection)
    .await
    .map_err(|error| name_conflict(error, &spec.name))?;
    Ok(StoredProfile {
        id,
        tenant_id: tenant,
        spec: spec.clone(),
        version: 1,
        created_at: now,
        updated_at: now,
    })
}

fn name_conflict(error: sqlx::Error, name: &str) -> MetadataError {
    if matches!(&error, sqlx::Error::Database(db) if db.is_unique_violation()) {
        MetadataError::Conflict(format!("a profile named {name:?} already exists"))
    } else {
        error.into()
    }
}

macro_rules! profile_columns {
    () => {
        "id, tenant_id, spec, version, created_at, updated_at"
    };
}

impl SqliteMetadata {
    pub async fn create_profile(
        &self,
        tenant: TenantId,
        spec: &ProfileSpec,
    ) -> Result<StoredProfile, MetadataError> {
        let mut connection = self.pool.acquire().await?;
        insert_profile(&mut connection, tenant, spec, now_ms()).await
    }

    /// Replaces a profile's document and raises its version.
    pub async fn update_profile(
        &self,
        tenant: TenantId,
        id: ProfileId,
        spec: &ProfileSpec,
    ) -> Result<StoredProfile, MetadataError> {
        let row = sqlx::query(concat!(
            "UPDATE device_profiles SET name = ?, spec = ?, version = version + 1, updated_at = ?
             WHERE tenant_id = ? AND id = ? RETURNING ",
            profile_columns!(),
            ""
        ))
        .bind(&spec.name)
        .bind(encode(spec)?)
        .bind(now_ms())
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(|error| name_conflict(error, &spec.name))?;
        row.map(profile_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("profile"))
    }

    pub async fn profile(
        &self,
        tenant: TenantId,
        id: ProfileId,
    ) -> Result<StoredProfile, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM device_profiles WHERE tenant_id = ? AND id = ?"
        ))
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(profile_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("profile"))
    }

    /// Returns a profile of any tenant, for the pipeline, which gets profile
    /// ids from devices it already resolved.
    pub async fn profile_by_id(&self, id: ProfileId) -> Result<StoredProfile, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM device_profiles WHERE id = ?"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(profile_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("profile"))
    }

    pub async fn profile_by_name(
        &self,
        tenant: TenantId,
        name: &str,
    ) -> Result<Option<StoredProfile>, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM device_profiles WHERE tenant_id = ? AND name = ?"
        ))
        .bind(tenant.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(profile_from_row).transpose()
    }

    /// Lists the tenant's profiles by name.
    pub async fn list_profiles(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<StoredProfile>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM device_profiles WHERE tenant_id = ? ORDER BY name"
        ))
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(profile_from_row).collect()
    }

    /// Deletes a profile that no device uses.
    pub async fn delete_profile(
        &self,
        tenant: TenantId,
        id: ProfileId,
    ) -> Result<(), MetadataError> {
        let mut tx = self.begin_write().await?;
        let users: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE profile_id = ?")
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        if users > 0 {
            return Err(MetadataError::Conflict(format!(
                "{users} device(s) use this profile; assign them another profile (or none) first"
            )));
        }
        let deleted = sqlx::query("DELETE FROM device_profiles WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            return Err(MetadataError::NotFound("profile"));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Applies `changes` to one device in one transaction and returns the
    /// device as it is afterwards.
    pub async fn update_device(
        &self,
        tenant: TenantId,
        id: DeviceId,
        changes: &DeviceChanges,
    ) -> Result<Device, MetadataError> {
        let mut tx = self.begin_write().await?;
        if let Some(profile) = &changes.profile_id {
            let updated =
                sqlx::query("UPDATE devices SET profile_id = ? WHERE tenant_id = ? AND id = ?")
                    .bind(profile.map(|profile| profile.to_string()))
                    .bind(tenant.to_string())
                    .bind(id.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(|error| match &error {
                        // The profile was deleted since the caller looked
                        // it up.
                        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                            MetadataError::NotFound("profile")
                        }
                        _ => error.into(),
                    })?;
            if updated.rows_affected() == 0 {
                return Err(MetadataError::NotFound("device"));
            }
        }
        for (column, patch) in [
            ("labels", &changes.labels),
            ("attributes", &changes.attributes),
        ] {
            if let Some(patch) = patch {
                // `column` is one of two literals above.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE devices SET {column} = json_patch({column}, ?) WHERE tenant_id = ? AND id = ?"
                )))
                .bind(encode(patch)?)
                .bind(tenant.to_string())
                .bind(id.to_string())
                .execute(&mut *tx)
                .await?;
            }
        }
        let row = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices WHERE tenant_id = ? AND id = ?",
        )
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let device = row
            .map(device_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound("device"))?;
        tx.commit().await?;
        Ok(device)
    }

    /// Returns a device of any tenant, for the pipeline.
    pub async fn device_by_id(&self, id: DeviceId) -> Result<Option<Device>, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row).transpose()
    }

    /// Lists the devices of a profile whose last message (or creation,
    /// for a device that never sent one) is older than `before_ms`, for
    /// `no_data` rules.
    pub async fn silent_devices(
        &self,
        id: ProfileId,
        before_ms: i64,
    ) -> Result<Vec<Device>, MetadataError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes FROM devices
             WHERE profile_id = ? AND COALESCE(last_seen_at, created_at) < ?",
        )
        .bind(id.to_string())
        .bind(before_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_from_row).collect()
    }

    /// Lists every device whose profile sets a retention, with that
    /// retention.
    pub async fn device_retentions(
        &self,
    ) -> Result<Vec<((TenantId, DeviceId), std::time::Duration)>, MetadataError> {
        let rows = sqlx::query(
            "SELECT d.tenant_id, d.id, p.spec FROM devices d JOIN device_profiles p ON p.id = d.profile_id
             WHERE p.spec LIKE '%\"retention\"%'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut retentions = Vec::new();
        for row in rows {
            let spec: ProfileSpec = parse_json_column(row.try_get("spec")?, "device profile")?;
            if let Some(retention) = spec.retention {
                retentions.push((
                    (
                        parse_id(row.try_get("tenant_id")?)?,
                        parse_id(row.try_get("id")?)?,
                    ),
                    retention,
                ));
            }
        }
        Ok(retentions)
    }

    /// Lists the profiles, of every tenant, that may have a `no_data` rule.
    /// The text match is a cheap first filter; callers check the rules.
    pub async fn profiles_with_silence_rules(&self) -> Result<Vec<StoredProfile>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            profile_columns!(),
            " FROM device_profiles WHERE spec LIKE '%\"no_data\"%'"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(profile_from_row).collect()
    }

    /// Creates or replaces the tenant's profiles by name in one
    /// transaction. Returns each stored profile with `created`, `updated`
    /// or `unchanged`.
    pub async fn import_profiles(
        &self,
        tenant: TenantId,
        specs: &[ProfileSpec],
    ) -> Result<Vec<(StoredProfile, &'static str)>, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let mut results = Vec::with_capacity(specs.len());
        for spec in specs {
            let existing = sqlx::query(concat!(
                "SELECT ",
                profile_columns!(),
                " FROM device_profiles WHERE tenant_id = ? AND name = ?"
            ))
            .bind(tenant.to_string())
            .bind(&spec.name)
            .fetch_optional(&mut *tx)
            .await?
            .map(profile_from_row)
            .transpose()?;
            let result = match existing {
                Some(existing) if existing.spec == *spec => (existing, "unchanged"),
                Some(existing) => {
                    let row = sqlx::query(concat!(
                        "UPDATE device_profiles SET spec = ?, version = version + 1, updated_at = ? WHERE id = ? RETURNING ",
                        profile_columns!()
                    ))
                    .bind(encode(spec)?)
                    .bind(now)
                    .bind(existing.id.to_string())
                    .fetch_one(&mut *tx)
                    .await?;
                    (profile_from_row(row)?, "updated")
                }
                None => (insert_profile(&mut tx, tenant, spec, now).await?, "created"),
            };
            results.push(result);
        }
        tx.commit().await?;
        Ok(results)
    }
}

/// Keeps `Labels` values strings: a merge patch may only set strings or
/// remove with `null`.
pub fn check_label_patch(patch: &serde_json::Map<String, serde_json::Value>) -> Result<(), String> {
    for (name, value) in patch {
        if name.is_empty() || name.len() > ferrite_codec::MAX_KEY_BYTES {
            return Err(format!(
                "label names must be 1 to {} bytes",
                ferrite_codec::MAX_KEY_BYTES
            ));
        }
        if !(value.is_string() || value.is_null()) {
            return Err(format!(
                "label {name:?} must be a string, or null to remove it"
            ));
        }
    }
    Ok(())
}
