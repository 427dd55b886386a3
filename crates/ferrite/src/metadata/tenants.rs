//! Tenants in SQLite: creating, listing and finding them by name.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata, Tenant};
use crate::ids::TenantId;

/// Maximum length of a tenant name in bytes.
pub const MAX_TENANT_NAME_LEN: usize = 64;

/// A tenant with its creation time, as `ferrite tenant list` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct TenantInfo {
    pub id: TenantId,
    pub name: String,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
}

/// Checks a new tenant name: 1 to 64 bytes of ASCII letters, digits, `-`,
/// `_` and `.`, so that names are safe in file names, URLs and logs.
pub fn check_tenant_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TENANT_NAME_LEN {
        return Err(format!(
            "invalid tenant name {name:?}: give 1 to {MAX_TENANT_NAME_LEN} characters"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "invalid tenant name {name:?}: {bad:?} is not allowed; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

impl SqliteMetadata {
    /// Creates a tenant; a taken name is a conflict. The caller checks the
    /// name with [`check_tenant_name`] first.
    pub async fn create_tenant(&self, name: &str) -> Result<TenantInfo, MetadataError> {
        let tenant = TenantInfo {
            id: TenantId::new_random(),
            name: name.to_owned(),
            created_at: now_ms(),
        };
        let result = sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, ?)")
            .bind(tenant.id.to_string())
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(tenant),
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Err(
                MetadataError::Conflict(format!("tenant {name:?} already exists")),
            ),
            Err(error) => Err(error.into()),
        }
    }

    /// Lists every tenant, oldest first.
    pub async fn list_tenants(&self) -> Result<Vec<TenantInfo>, MetadataError> {
        let rows =
            sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY created_at, name")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|row| {
                Ok(TenantInfo {
                    id: parse_id(row.try_get("id")?)?,
                    name: row.try_get("name")?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Finds a tenant by its name.
    pub async fn tenant_by_name(&self, name: &str) -> Result<Tenant, MetadataError> {
        let row = sqlx::query("SELECT id, name FROM tenants WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(MetadataError::NotFound("tenant"))?;
        Ok(Tenant {
            id: parse_id(row.try_get("id")?)?,
            name: row.try_get("name")?,
        })
    }
}
