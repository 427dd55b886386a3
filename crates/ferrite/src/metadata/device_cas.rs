//! CAs of device client certificates, registered per tenant, in SQLite.
//! A CA is named by the SHA-256 fingerprint of its DER encoding, which is
//! unique across tenants.

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata};
use crate::ids::TenantId;

/// A registered device CA.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDeviceCa {
    /// SHA-256 of the DER encoding, as 64 lowercase hex digits in JSON.
    #[serde(serialize_with = "hex_bytes")]
    pub fingerprint: Vec<u8>,
    #[serde(skip)]
    pub tenant_id: TenantId,
    /// Subject distinguished name, such as `CN=Factory CA`.
    pub subject: String,
    /// End of validity in epoch milliseconds.
    pub not_after: i64,
    pub pem: String,
    /// A certificate whose subject CN names no device of the tenant creates
    /// a device with that name.
    pub auto_create_devices: bool,
    /// Registration time in epoch milliseconds.
    pub created_at: i64,
}

/// A CA to register.
#[derive(Debug, Clone)]
pub struct NewDeviceCa {
    pub fingerprint: [u8; 32],
    /// SHA-256 of the subject and public key, checked for uniqueness by
    /// the caller (`crate::tls::client_auth::ca_identity`).
    pub identity: [u8; 32],
    pub subject: String,
    pub not_after: i64,
    pub pem: String,
    pub auto_create_devices: bool,
}

fn hex_bytes<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(bytes))
}

fn device_ca_from_row(row: sqlx::sqlite::SqliteRow) -> Result<StoredDeviceCa, MetadataError> {
    Ok(StoredDeviceCa {
        fingerprint: row.try_get("fingerprint")?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        subject: row.try_get("subject")?,
        not_after: row.try_get("not_after")?,
        pem: row.try_get("pem")?,
        auto_create_devices: row.try_get("auto_create_devices")?,
        created_at: row.try_get("created_at")?,
    })
}

impl SqliteMetadata {
    /// Registers a device CA for the tenant. Fails with a conflict when the
    /// CA is already registered, by this or another tenant.
    pub async fn add_device_ca(
        &self,
        tenant: TenantId,
        ca: &NewDeviceCa,
    ) -> Result<StoredDeviceCa, MetadataError> {
        let created_at = now_ms();
        let result = sqlx::query(concat!(
            "INSERT INTO device_cas ",
            "(fingerprint, tenant_id, subject, not_after, pem, auto_create_devices, created_at) ",
            "VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(&ca.fingerprint[..])
        .bind(tenant.to_string())
        .bind(&ca.subject)
        .bind(ca.not_after)
        .bind(&ca.pem)
        .bind(ca.auto_create_devices)
        .bind(created_at)
        .execute(&self.pool)
        .await;

        match result {
            Ok(_) => {}
            Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                // The same message whichever tenant has the CA, so it
                // reveals nothing about other tenants.
                return Err(MetadataError::Conflict(format!(
                    "the CA with SHA-256 fingerprint {} is already registered; a CA can be registered by only one tenant of the server, so issue device certificates from a CA of your own",
                    hex::encode(ca.fingerprint)
                )));
            }
            Err(error) => return Err(error.into()),
        }
        Ok(StoredDeviceCa {
            fingerprint: ca.fingerprint.to_vec(),
            tenant_id: tenant,
            subject: ca.subject.clone(),
            not_after: ca.not_after,
            pem: ca.pem.clone(),
            auto_create_devices: ca.auto_create_devices,
            created_at,
        })
    }

    /// Lists the tenant's device CAs, the oldest first.
    pub async fn device_cas(&self, tenant: TenantId) -> Result<Vec<StoredDeviceCa>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT fingerprint, tenant_id, subject, not_after, pem, auto_create_devices, ",
            "created_at FROM device_cas WHERE tenant_id = ? ORDER BY created_at, fingerprint"
        ))
        .bind(tenant.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_ca_from_row).collect()
    }

    /// Returns the tenant's device CA with this fingerprint.
    pub async fn device_ca(
        &self,
        tenant: TenantId,
        fingerprint: &[u8],
    ) -> Result<Option<StoredDeviceCa>, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT fingerprint, tenant_id, subject, not_after, pem, auto_create_devices, ",
            "created_at FROM device_cas WHERE tenant_id = ? AND fingerprint = ?"
        ))
        .bind(tenant.to_string())
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_ca_from_row).transpose()
    }

    /// Deletes the tenant's device CA; returns whether it existed.
    pub async fn delete_device_ca(
        &self,
        tenant: TenantId,
        fingerprint: &[u8],
    ) -> Result<bool, MetadataError> {
        let result = sqlx::query("DELETE FROM device_cas WHERE tenant_id = ? AND fingerprint = ?")
            .bind(tenant.to_string())
            .bind(fingerprint)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Returns every device CA of every tenant, for the TLS listener's
    /// in-memory trust.
    pub async fn all_device_cas(&self) -> Result<Vec<StoredDeviceCa>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT fingerprint, tenant_id, subject, not_after, pem, auto_create_devices, ",
            "created_at FROM device_cas"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_ca_from_row).collect()
    }

    /// Returns whether the certificate with this fingerprint is still
    /// registered on the device.
    pub async fn device_certificate_registered(
        &self,
        device: crate::ids::DeviceId,
        fingerprint: &[u8],
    ) -> Result<bool, MetadataError> {
        let row = sqlx::query(
            "SELECT 1 FROM device_certificates WHERE device_id = ? AND fingerprint = ?",
        )
        .bind(device.to_string())
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}
