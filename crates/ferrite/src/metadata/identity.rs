//! People and services in SQLite: user management, refresh tokens, the
//! scopes and expiry of API keys, and service accounts.
//!
//! Refresh tokens form families. A login inserts the first token of a new
//! family; a refresh marks the presented token used and inserts its
//! successor in the same transaction. A token that is presented again
//! after it was used is a copy, so [`SqliteMetadata::rotate_refresh_token`]
//! revokes its whole family instead of rotating it. Tokens are stored as
//! SHA-256 hashes, so the store never receives a secret.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, Role, SqliteMetadata, User};
use crate::ids::{ApiKeyId, ServiceAccountId, TenantId, UserId};

/// A user as the users API shows it: never with the password hash.
#[derive(Debug, Clone, Serialize)]
pub struct UserRecord {
    pub id: UserId,
    pub email: String,
    pub role: Role,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
}

/// An API key with its scopes and lifetime, without the secret.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyRecord {
    pub id: ApiKeyId,
    #[serde(skip)]
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
    /// Space-separated scopes; `None` allows everything the role allows.
    pub scopes: Option<String>,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
    /// End of validity in epoch milliseconds; `None` never expires.
    pub expires_at: Option<i64>,
    /// Time of the last request with the key in epoch milliseconds,
    /// recorded at most once a minute.
    pub last_used_at: Option<i64>,
}

/// A service account, without its secret.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceAccount {
    pub id: ServiceAccountId,
    #[serde(skip)]
    pub tenant_id: TenantId,
    pub name: String,
    pub client_id: String,
    pub role: Role,
    /// Space-separated scopes; `None` allows everything the role allows.
    pub scopes: Option<String>,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
}

/// The result of presenting a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token was valid; its successor is stored.
    Rotated {
        user_id: UserId,
        family_id: String,
    },
    /// The token had been used before: its family is now revoked.
    Reused {
        user_id: UserId,
        family_id: String,
    },
    /// The token was revoked (logout, password change, role change).
    Revoked,
    Expired,
    Unknown,
}

fn parse_role(text: String) -> Result<Role, MetadataError> {
    text.parse()
        .map_err(|message: String| MetadataError::Database(sqlx::Error::Decode(message.into())))
}

fn user_record_from_row(row: sqlx::sqlite::SqliteRow) -> Result<UserRecord, MetadataError> {
    Ok(UserRecord {
        id: parse_id(row.try_get("id")?)?,
        email: row.try_get("email")?,
        role: parse_role(row.try_get("role")?)?,
        created_at: row.try_get("created_at")?,
    })
}

fn api_key_from_row(row: sqlx::sqlite::SqliteRow) -> Result<ApiKeyRecord, MetadataError> {
    Ok(ApiKeyRecord {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        name: row.try_get("name")?,
        role: parse_role(row.try_get("role")?)?,
        scopes: row.try_get("scopes")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
    })
}

fn service_account_from_row(
    row: sqlx::sqlite::SqliteRow,
) -> Result<(ServiceAccount, Vec<u8>), MetadataError> {
    let account = ServiceAccount {
        id: parse_id(row.try_get("id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        name: row.try_get("name")?,
        client_id: row.try_get("client_id")?,
        role: parse_role(row.try_get("role")?)?,
        scopes: row.try_get("scopes")?,
        created_at: row.try_get("created_at")?,
    };
    Ok((account, row.try_get("secret_hash")?))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

impl SqliteMetadata {
    // ------------------------------------------------------------ users ---

    pub async fn list_users(&self, tenant: TenantId) -> Result<Vec<UserRecord>, MetadataError> {
        let rows = sqlx::query(
            "SELECT id, email, role, created_at FROM users WHERE tenant_id = ? ORDER BY email",
        )
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(user_record_from_row).collect()
    }

    pub async fn user_record(
        &self,
        tenant: TenantId,
        id: UserId,
    ) -> Result<UserRecord, MetadataError> {
        let row = sqlx::query(
            "SELECT id, email, role, created_at FROM users WHERE tenant_id = ? AND id = ?",
        )
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(MetadataError::NotFound("user"))?;
        user_record_from_row(row)
    }

    /// Returns a user of any tenant with the password hash, for the
    /// authentication code.
    pub async fn user_by_id(&self, id: UserId) -> Result<Option<User>, MetadataError> {
        let row =
            sqlx::query("SELECT id, tenant_id, email, password_hash, role FROM users WHERE id = ?")
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(User {
                id: parse_id(row.try_get("id")?)?,
                tenant_id: parse_id(row.try_get("tenant_id")?)?,
                email: row.try_get("email")?,
                role: parse_role(row.try_get("role")?)?,
                password_hash: row.try_get("password_hash")?,
            })
        })
        .transpose()
    }

    /// Changes a user's role, refusing to demote the tenant's last admin.
    pub async fn set_user_role(
        &self,
        tenant: TenantId,
        id: UserId,
        role: Role,
    ) -> Result<(), MetadataError> {
        let mut tx = self.begin_write().await?;
        let current: Option<String> =
            sqlx::query_scalar("SELECT role FROM users WHERE tenant_id = ? AND id = ?")
                .bind(tenant.to_string())
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        let current = parse_role(current.ok_or(MetadataError::NotFound("user"))?)?;
        if current == Role::Admin && role != Role::Admin {
            ensure_other_admin(&mut tx, tenant, id).await?;
        }
        sqlx::query("UPDATE users SET role = ? WHERE tenant_id = ? AND id = ?")
            .bind(role.as_str())
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_password_hash(
        &self,
        tenant: TenantId,
        id: UserId,
        password_hash: &str,
    ) -> Result<(), MetadataError> {
        let result =
            sqlx::query("UPDATE users SET password_hash = ? WHERE tenant_id = ? AND id = ?")
                .bind(password_hash)
                .bind(tenant.to_string())
                .bind(id.to_string())
                .execute(&self.pool)
                .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("user"));
        }
        Ok(())
    }

    /// Deletes a user and, through the foreign key, their refresh tokens.
    /// The tenant's last admin cannot be deleted.
    pub async fn delete_user(&self, tenant: TenantId, id: UserId) -> Result<(), MetadataError> {
        let mut tx = self.begin_write().await?;
        let role: Option<String> =
            sqlx::query_scalar("SELECT role FROM users WHERE tenant_id = ? AND id = ?")
                .bind(tenant.to_string())
                .bind(id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
        if parse_role(role.ok_or(MetadataError::NotFound("user"))?)? == Role::Admin {
            ensure_other_admin(&mut tx, tenant, id).await?;
        }
        sqlx::query("DELETE FROM users WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // --------------------------------------------------- refresh tokens ---

    pub async fn insert_refresh_token(
        &self,
        token_hash: &[u8],
        family_id: &str,
        user: &User,
        expires_at: i64,
    ) -> Result<(), MetadataError> {
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, tenant_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(token_hash)
        .bind(family_id)
        .bind(user.id.to_string())
        .bind(user.tenant_id.to_string())
        .bind(now_ms())
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks the token with `old_hash` used and stores `new_hash` as its
    /// successor, or revokes the family when the token was used before.
    pub async fn rotate_refresh_token(
        &self,
        old_hash: &[u8],
        new_hash: &[u8],
        new_expires_at: i64,
    ) -> Result<RefreshOutcome, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query(
            "SELECT family_id, user_id, tenant_id, expires_at, used_at, revoked_at FROM refresh_tokens WHERE token_hash = ?",
        )
        .bind(old_hash)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(RefreshOutcome::Unknown);
        };
        let family_id: String = row.try_get("family_id")?;
        let user_id: UserId = parse_id(row.try_get("user_id")?)?;
        let tenant_id: String = row.try_get("tenant_id")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        let used_at: Option<i64> = row.try_get("used_at")?;
        let revoked_at: Option<i64> = row.try_get("revoked_at")?;

        if used_at.is_some() {
            sqlx::query(
                "UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(&family_id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            return Ok(RefreshOutcome::Reused { user_id, family_id });
        }
        if revoked_at.is_some() {
            return Ok(RefreshOutcome::Revoked);
        }
        if expires_at <= now {
            return Ok(RefreshOutcome::Expired);
        }

        sqlx::query("UPDATE refresh_tokens SET used_at = ? WHERE token_hash = ?")
            .bind(now)
            .bind(old_hash)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, tenant_id, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(new_hash)
        .bind(&family_id)
        .bind(user_id.to_string())
        .bind(tenant_id)
        .bind(now)
        .bind(new_expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RefreshOutcome::Rotated { user_id, family_id })
    }

    /// Revokes the family of the token with this hash; returns the family
    /// and its user, or `None` for an unknown token.
    pub async fn revoke_refresh_family(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<(String, UserId)>, MetadataError> {
        let mut tx = self.begin_write().await?;
        let Some(row) =
            sqlx::query("SELECT family_id, user_id FROM refresh_tokens WHERE token_hash = ?")
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await?
        else {
            return Ok(None);
        };
        let family_id: String = row.try_get("family_id")?;
        let user_id: UserId = parse_id(row.try_get("user_id")?)?;
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE family_id = ? AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(&family_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some((family_id, user_id)))
    }

    /// Revokes every refresh token of a user; returns the families that
    /// had a token still valid, whose access tokens must stop working too.
    pub async fn revoke_user_refresh_tokens(
        &self,
        user: UserId,
    ) -> Result<Vec<String>, MetadataError> {
        let now = now_ms();
        let families: Vec<String> = sqlx::query_scalar(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL RETURNING family_id",
        )
        .bind(now)
        .bind(user.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut families = families;
        families.sort();
        families.dedup();
        Ok(families)
    }

    /// Deletes refresh tokens that expired or were revoked more than
    /// `keep_ms` ago; returns how many.
    pub async fn delete_stale_refresh_tokens(&self, keep_ms: i64) -> Result<u64, MetadataError> {
        let cutoff = now_ms() - keep_ms;
        let result =
            sqlx::query("DELETE FROM refresh_tokens WHERE expires_at < ? OR revoked_at < ?")
                .bind(cutoff)
                .bind(cutoff)
                .execute(&self.pool)
                .await?;
        Ok(result.rows_affected())
    }

    // --------------------------------------------------------- API keys ---

    pub async fn create_scoped_api_key(
        &self,
        tenant: TenantId,
        name: &str,
        role: Role,
        key_hash: &[u8],
        scopes: Option<&str>,
        expires_at: Option<i64>,
    ) -> Result<ApiKeyRecord, MetadataError> {
        let id = ApiKeyId::new_random();
        let created_at = now_ms();
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at, scopes, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(name)
        .bind(key_hash)
        .bind(role.as_str())
        .bind(created_at)
        .bind(scopes)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(ApiKeyRecord {
            id,
            tenant_id: tenant,
            name: name.to_owned(),
            role,
            scopes: scopes.map(str::to_owned),
            created_at,
            expires_at,
            last_used_at: None,
        })
    }

    /// Returns the unrevoked API key with this hash, expired or not.
    pub async fn api_key_record_by_hash(
        &self,
        key_hash: &[u8],
    ) -> Result<Option<ApiKeyRecord>, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, role, scopes, created_at, expires_at, last_used_at FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(api_key_from_row).transpose()
    }

    /// Lists the tenant's unrevoked API keys by name, expired ones included.
    pub async fn list_api_key_records(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<ApiKeyRecord>, MetadataError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, name, role, scopes, created_at, expires_at, last_used_at FROM api_keys WHERE tenant_id = ? AND revoked_at IS NULL ORDER BY name, created_at",
        )
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(api_key_from_row).collect()
    }

    pub async fn record_api_key_use(&self, id: ApiKeyId, at: i64) -> Result<(), MetadataError> {
        sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
            .bind(at)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ------------------------------------------------- service accounts ---

    pub async fn create_service_account(
        &self,
        tenant: TenantId,
        name: &str,
        client_id: &str,
        secret_hash: &[u8],
        role: Role,
        scopes: Option<&str>,
    ) -> Result<ServiceAccount, MetadataError> {
        let id = ServiceAccountId::new_random();
        let created_at = now_ms();
        let result = sqlx::query(
            "INSERT INTO service_accounts (id, tenant_id, name, client_id, secret_hash, role, scopes, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(tenant.to_string())
        .bind(name)
        .bind(client_id)
        .bind(secret_hash)
        .bind(role.as_str())
        .bind(scopes)
        .bind(created_at)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(ServiceAccount {
                id,
                tenant_id: tenant,
                name: name.to_owned(),
                client_id: client_id.to_owned(),
                role,
                scopes: scopes.map(str::to_owned),
                created_at,
            }),
            Err(error) if is_unique_violation(&error) => Err(MetadataError::Conflict(
                "the generated client id already exists; retry".to_owned(),
            )),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn list_service_accounts(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<ServiceAccount>, MetadataError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, name, client_id, secret_hash, role, scopes, created_at FROM service_accounts WHERE tenant_id = ? AND revoked_at IS NULL ORDER BY name, created_at",
        )
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| service_account_from_row(row).map(|(account, _)| account))
            .collect()
    }

    /// Returns an unrevoked service account and its secret hash.
    pub async fn service_account_by_client_id(
        &self,
        client_id: &str,
    ) -> Result<Option<(ServiceAccount, Vec<u8>)>, MetadataError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, name, client_id, secret_hash, role, scopes, created_at FROM service_accounts WHERE client_id = ? AND revoked_at IS NULL",
        )
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(service_account_from_row).transpose()
    }

    pub async fn revoke_service_account(
        &self,
        tenant: TenantId,
        id: ServiceAccountId,
    ) -> Result<(), MetadataError> {
        let result = sqlx::query(
            "UPDATE service_accounts SET revoked_at = ? WHERE tenant_id = ? AND id = ? AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(tenant.to_string())
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("service account"));
        }
        Ok(())
    }
}

/// Fails with a conflict unless the tenant has an admin other than `id`.
async fn ensure_other_admin(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    tenant: TenantId,
    id: UserId,
) -> Result<(), MetadataError> {
    let others: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM users WHERE tenant_id = ? AND role = 'admin' AND id != ?",
    )
    .bind(tenant.to_string())
    .bind(id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    if others == 0 {
        return Err(MetadataError::Conflict(
            "this user is the tenant's last admin; make another user admin first".to_owned(),
        ));
    }
    Ok(())
}
