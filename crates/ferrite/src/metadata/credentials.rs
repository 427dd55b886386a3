//! DTLS credentials of devices in SQLite: one pre-shared key per device,
//! found by its PSK identity, and registered client certificates, found by
//! the SHA-256 fingerprint of their DER encoding.
//!
//! The store receives the PSK already sealed with the tenant's data key,
//! never the plain key.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, TenantId};

/// A device's pre-shared key as stored: the key is sealed.
#[derive(Debug, Clone)]
pub struct StoredPsk {
    pub device_id: DeviceId,
    pub tenant_id: TenantId,
    pub identity: Vec<u8>,
    /// The key sealed under the context from [`psk_seal_context`].
    pub sealed_key: Vec<u8>,
    pub created_at: i64,
}

/// A registered client certificate.
#[derive(Debug, Clone, Serialize)]
pub struct StoredCertificate {
    /// SHA-256 of the DER encoding, as 64 lowercase hex digits in JSON.
    #[serde(serialize_with = "hex_bytes")]
    pub fingerprint: Vec<u8>,
    pub device_id: DeviceId,
    #[serde(skip)]
    pub tenant_id: TenantId,
    /// Subject distinguished name, such as `CN=sensor-1`.
    pub subject: String,
    /// End of validity in epoch milliseconds.
    pub not_after: i64,
    pub pem: String,
    /// Registration time in epoch milliseconds.
    pub created_at: i64,
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(bytes))
}

/// Context that binds a sealed PSK to its device.
pub fn psk_seal_context(device: DeviceId) -> String {
    format!("device_psk/{device}")
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn psk_from_row(row: sqlx::sqlite::SqliteRow) -> Result<StoredPsk, MetadataError> {
    Ok(StoredPsk {
        device_id: parse_id(row.try_get("device_id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        identity: row.try_get("identity")?,
        sealed_key: row.try_get("sealed_key")?,
        created_at: row.try_get("created_at")?,
    })
}

fn certificate_from_row(row: sqlx::sqlite::SqliteRow) -> Result<StoredCertificate, MetadataError> {
    Ok(StoredCertificate {
        fingerprint: row.try_get("fingerprint")?,
        device_id: parse_id(row.try_get("device_id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        subject: row.try_get("subject")?,
        not_after: row.try_get("not_after")?,
        pem: row.try_get("pem")?,
        created_at: row.try_get("created_at")?,
    })
}

/// A certificate to register.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    pub fingerprint: [u8; 32],
    pub subject: String,
    pub not_after: i64,
    pub pem: String,
}

impl SqliteMetadata {
    /// Sets or replaces the device's pre-shared key. Fails with a conflict
    /// when another device of any tenant already uses `identity`.
    pub async fn set_device_psk(
        &self,
        tenant: TenantId,
        device: DeviceId,
        identity: &[u8],
        sealed_key: &[u8],
    ) -> Result<StoredPsk, MetadataError> {
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(MetadataError::NotFound("device"));
        }
        let created_at = now_ms();
        let result = sqlx::query(concat!(
            "INSERT INTO device_psks (device_id, tenant_id, identity, sealed_key, created_at) ",
            "VALUES (?, ?, ?, ?, ?) ",
            "ON CONFLICT (device_id) DO UPDATE SET identity = excluded.identity, ",
            "sealed_key = excluded.sealed_key, created_at = excluded.created_at"
        ))
        .bind(device.to_string())
        .bind(tenant.to_string())
        .bind(identity)
        .bind(sealed_key)
        .bind(created_at)
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                // The message is the same whichever device and tenant use
                // the identity, so it reveals nothing about them.
                return Err(MetadataError::Conflict(
                    "this PSK identity is already in use; PSK identities are unique across the server, so choose another one, for example one that starts with your tenant id".to_owned(),
                ));
            }
            Err(error) => return Err(error.into()),
        }
        tx.commit().await?;
        Ok(StoredPsk {
            device_id: device,
            tenant_id: tenant,
            identity: identity.to_vec(),
            sealed_key: sealed_key.to_vec(),
            created_at,
        })
    }

    /// Deletes the device's pre-shared key; returns whether it had one.
    pub async fn delete_device_psk(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<bool, MetadataError> {
        let result = sqlx::query("DELETE FROM device_psks WHERE tenant_id = ? AND device_id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Returns the device's pre-shared key, if it has one.
    pub async fn device_psk(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Option<StoredPsk>, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT device_id, tenant_id, identity, sealed_key, created_at FROM device_psks ",
            "WHERE tenant_id = ? AND device_id = ?"
        ))
        .bind(tenant.to_string())
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(psk_from_row).transpose()
    }

    /// Returns every pre-shared key of every tenant, for the DTLS listener's
    /// in-memory index.
    pub async fn all_device_psks(&self) -> Result<Vec<StoredPsk>, MetadataError> {
        let rows = sqlx::query(
            "SELECT device_id, tenant_id, identity, sealed_key, created_at FROM device_psks",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(psk_from_row).collect()
    }

    /// Registers a client certificate for the device. Fails with a conflict
    /// when the certificate is already registered, on this or another device.
    pub async fn add_device_certificate(
        &self,
        tenant: TenantId,
        device: DeviceId,
        certificate: &NewCertificate,
    ) -> Result<StoredCertificate, MetadataError> {
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(MetadataError::NotFound("device"));
        }
        let created_at = now_ms();
        let result = sqlx::query(concat!(
            "INSERT INTO device_certificates ",
            "(fingerprint, device_id, tenant_id, subject, not_after, pem, created_at) ",
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&certificate.fingerprint[..])
        .bind(device.to_string())
        .bind(tenant.to_string())
        .bind(&certificate.subject)
        .bind(certificate.not_after)
        .bind(&certificate.pem)
        .bind(created_at)
        .execute(&mut *tx)
        .await;
        match result {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                // The message is the same whichever device and tenant use
                // the certificate, so it reveals nothing about them.
                return Err(MetadataError::Conflict(format!(
                    "the certificate with SHA-256 fingerprint {} is already registered on a device; a certificate can be registered on only one device of the server, so delete it from your device that has it or issue a new certificate",
                    hex::encode(certificate.fingerprint)
                )));
            }
            Err(error) => return Err(error.into()),
        }
        tx.commit().await?;
        Ok(StoredCertificate {
            fingerprint: certificate.fingerprint.to_vec(),
            device_id: device,
            tenant_id: tenant,
            subject: certificate.subject.clone(),
            not_after: certificate.not_after,
            pem: certificate.pem.clone(),
            created_at,
        })
    }

    /// Lists the device's registered certificates, the oldest first.
    pub async fn device_certificates(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Vec<StoredCertificate>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT fingerprint, device_id, tenant_id, subject, not_after, pem, created_at ",
            "FROM device_certificates WHERE tenant_id = ? AND device_id = ? ",
            "ORDER BY created_at, fingerprint"
        ))
        .bind(tenant.to_string())
        .bind(device.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(certificate_from_row).collect()
    }

    /// Deletes one registered certificate of the device; returns whether it
    /// existed.
    pub async fn delete_device_certificate(
        &self,
        tenant: TenantId,
        device: DeviceId,
        fingerprint: &[u8],
    ) -> Result<bool, MetadataError> {
        let result = sqlx::query(concat!(
            "DELETE FROM device_certificates ",
            "WHERE tenant_id = ? AND device_id = ? AND fingerprint = ?"
        ))
        .bind(tenant.to_string())
        .bind(device.to_string())
        .bind(fingerprint)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Returns every registered certificate of every tenant, for the DTLS
    /// listener's in-memory index.
    pub async fn all_device_certificates(&self) -> Result<Vec<StoredCertificate>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT fingerprint, device_id, tenant_id, subject, not_after, pem, created_at ",
            "FROM device_certificates"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(certificate_from_row).collect()
    }

    /// Returns the device with this id in any tenant; DTLS certificates name
    /// a device by id alone.
    pub async fn device_by_id_any_tenant(
        &self,
        device: DeviceId,
    ) -> Result<Option<super::Device>, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT id, tenant_id, name, created_at, last_seen_at, labels, profile_id, attributes ",
            "FROM devices WHERE id = ?"
        ))
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(super::sqlite::device_from_row).transpose()
    }
}
