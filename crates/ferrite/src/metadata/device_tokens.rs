//! Rotation and revocation of device access tokens, and revocation of all
//! credentials of a device at once.
//!
//! A token row is valid while `revoked_at` is NULL or in the future. A
//! rotation with a grace period sets `revoked_at` of the old tokens to the
//! end of that period, so both tokens work until then; the old one then
//! stops without another write. All times are epoch milliseconds.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::now_ms;
use super::{MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, TenantId};

/// A valid access token of a device, without the token.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceTokenInfo {
    /// The first 8 hex digits of the token's SHA-256 hash, to tell tokens
    /// apart in listings and logs. The token cannot be derived from it.
    pub hash_prefix: String,
    pub created_at: i64,
    /// End of the grace period of a token replaced by a rotation; `None`
    /// for a token without an end.
    pub expires_at: Option<i64>,
}

/// The credentials that [`SqliteMetadata::revoke_device_credentials`] removed.
#[derive(Debug, Default)]
pub struct RevokedCredentials {
    /// Hashes of the tokens that were valid.
    pub tokens: Vec<[u8; 32]>,
    /// Fingerprints of the deleted certificates.
    pub certificates: Vec<[u8; 32]>,
    pub pre_shared_key: bool,
}

fn hash_of(bytes: Vec<u8>) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

impl SqliteMetadata {
    /// Adds `token_hash` as the device's token and ends the old tokens at
    /// `old_valid_until` (epoch milliseconds; the present or earlier ends
    /// them at once). A token already in a shorter grace period keeps its
    /// end. Returns the hashes of the tokens that were valid before.
    pub async fn rotate_device_token_with_grace(
        &self,
        tenant: TenantId,
        device: DeviceId,
        token_hash: &[u8],
        old_valid_until: i64,
    ) -> Result<Vec<[u8; 32]>, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(MetadataError::NotFound("device"));
        }
        let old: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT token_hash FROM device_tokens WHERE device_id = ? AND (revoked_at IS NULL OR revoked_at > ?)",
        )
        .bind(device.to_string())
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let until = old_valid_until.max(now);
        sqlx::query(
            "UPDATE device_tokens SET revoked_at = MIN(COALESCE(revoked_at, ?1), ?1) WHERE device_id = ?2 AND (revoked_at IS NULL OR revoked_at > ?3)",
        )
        .bind(until)
        .bind(device.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_tokens (token_hash, device_id, created_at) VALUES (?, ?, ?)",
        )
        .bind(token_hash)
        .bind(device.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old.into_iter().filter_map(hash_of).collect())
    }

    /// Lists the device's valid tokens, the newest first.
    pub async fn device_tokens(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Vec<DeviceTokenInfo>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT t.token_hash, t.created_at, t.revoked_at FROM device_tokens t ",
            "JOIN devices d ON d.id = t.device_id ",
            "WHERE d.tenant_id = ? AND d.id = ? AND (t.revoked_at IS NULL OR t.revoked_at > ?) ",
            "ORDER BY t.created_at DESC"
        ))
        .bind(tenant.to_string())
        .bind(device.to_string())
        .bind(now_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let hash: Vec<u8> = row.try_get("token_hash")?;
                Ok(DeviceTokenInfo {
                    hash_prefix: hex::encode(&hash[..hash.len().min(4)]),
                    created_at: row.try_get("created_at")?,
                    expires_at: row.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revokes every token of the device and deletes its pre-shared key and
    /// certificates, in one transaction. The device stays, without any way
    /// to authenticate until it gets a new token or credential.
    pub async fn revoke_device_credentials(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<RevokedCredentials, MetadataError> {
        let now = now_ms();
        let tenant = tenant.to_string();
        let device = device.to_string();
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(&tenant)
            .bind(&device)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(MetadataError::NotFound("device"));
        }

        let tokens: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT token_hash FROM device_tokens WHERE device_id = ? AND (revoked_at IS NULL OR revoked_at > ?)",
        )
        .bind(&device)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE device_tokens SET revoked_at = ? WHERE device_id = ? AND (revoked_at IS NULL OR revoked_at > ?)",
        )
        .bind(now)
        .bind(&device)
        .bind(now)
        .execute(&mut *tx)
        .await?;

        let certificates: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT fingerprint FROM device_certificates WHERE tenant_id = ? AND device_id = ?",
        )
        .bind(&tenant)
        .bind(&device)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM device_certificates WHERE tenant_id = ? AND device_id = ?")
            .bind(&tenant)
            .bind(&device)
            .execute(&mut *tx)
            .await?;
        let psk = sqlx::query("DELETE FROM device_psks WHERE tenant_id = ? AND device_id = ?")
            .bind(&tenant)
            .bind(&device)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;

        Ok(RevokedCredentials {
            tokens: tokens.into_iter().filter_map(hash_of).collect(),
            certificates: certificates.into_iter().filter_map(hash_of).collect(),
            pre_shared_key: psk.rows_affected() > 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MetadataStore;

    async fn open() -> (tempfile::TempDir, SqliteMetadata) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let metadata = SqliteMetadata::open(dir.path()).await.expect("open");
        (dir, metadata)
    }

    #[tokio::test]
    async fn rotation_grace_keeps_old_token_until_its_end() {
        let (_dir, metadata) = open().await;
        let tenant = metadata.default_tenant().await.unwrap().id;
        let device = metadata.create_device(tenant, "d", &[1; 32]).await.unwrap();

        let old = metadata
            .rotate_device_token_with_grace(tenant, device.id, &[2; 32], now_ms() + 60_000)
            .await
            .unwrap();
        assert_eq!(old, vec![[1; 32]]);
        assert!(
            metadata
                .device_by_token_hash(&[1; 32])
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            metadata
                .device_by_token_hash(&[2; 32])
                .await
                .unwrap()
                .is_some()
        );
        let tokens = metadata.device_tokens(tenant, device.id).await.unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.iter().any(|token| token.expires_at.is_some()));

        // A rotation without grace ends the token still in its grace period.
        let old = metadata
            .rotate_device_token_with_grace(tenant, device.id, &[3; 32], 0)
            .await
            .unwrap();
        assert_eq!(old.len(), 2);
        assert!(
            metadata
                .device_by_token_hash(&[1; 32])
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            metadata
                .device_by_token_hash(&[2; 32])
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            metadata
                .device_by_token_hash(&[3; 32])
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn revoking_all_credentials_leaves_none() {
        let (_dir, metadata) = open().await;
        let tenant = metadata.default_tenant().await.unwrap().id;
        let device = metadata.create_device(tenant, "d", &[1; 32]).await.unwrap();
        metadata
            .set_device_psk(tenant, device.id, b"identity", b"sealed")
            .await
            .unwrap();

        let revoked = metadata
            .revoke_device_credentials(tenant, device.id)
            .await
            .unwrap();
        assert_eq!(revoked.tokens, vec![[1; 32]]);
        assert!(revoked.pre_shared_key);
        assert!(
            metadata
                .device_by_token_hash(&[1; 32])
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            metadata
                .device_psk(tenant, device.id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            metadata
                .device_tokens(tenant, device.id)
                .await
                .unwrap()
                .is_empty()
        );

        let other_tenant = crate::ids::TenantId::new_random();
        let error = metadata
            .revoke_device_credentials(other_tenant, device.id)
            .await
            .expect_err("another tenant's device");
        assert!(matches!(error, MetadataError::NotFound("device")));
    }
}
