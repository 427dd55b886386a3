//! In-memory index of the devices' DTLS credentials, for the OpenSSL
//! callbacks of the DTLS listener. Those callbacks run inside a handshake
//! step and cannot wait for the metadata database, so the index mirrors
//! the `device_psks` and `device_certificates` tables.
//!
//! The index is loaded at start and updated by the credentials API in this
//! process. Pre-shared keys stay sealed in memory and are opened with the
//! tenant's data key only during a handshake that names them.
//!
//! NOTE: credentials changed by another process that shares the data
//! directory are loaded only at the next start. The CLI has no credential
//! commands, so today only the API of this process changes them.

use std::collections::HashMap;

use parking_lot::RwLock;

use crate::ids::{DeviceId, TenantId};
use crate::metadata::credentials::{StoredCertificate, StoredPsk};
use crate::metadata::{MetadataError, SqliteMetadata};

/// The device that a PSK identity or certificate fingerprint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialOwner {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
}

#[derive(Debug, Clone)]
struct PskEntry {
    owner: CredentialOwner,
    sealed_key: Vec<u8>,
}

#[derive(Debug, Default)]
struct Index {
    psk_by_identity: HashMap<Vec<u8>, PskEntry>,
    identity_by_device: HashMap<DeviceId, Vec<u8>>,
    certificate_by_fingerprint: HashMap<[u8; 32], CredentialOwner>,
}

/// DTLS credentials of every device, by PSK identity and by certificate
/// fingerprint.
#[derive(Debug, Default)]
pub struct DtlsCredentials {
    index: RwLock<Index>,
}

impl DtlsCredentials {
    /// Replaces the index with every stored PSK and certificate
    /// fingerprint.
    pub async fn reload(&self, metadata: &SqliteMetadata) -> Result<(), MetadataError> {
        let loaded = Self::default();
        for psk in metadata.all_device_psks().await? {
            loaded.set_psk(&psk);
        }
        for certificate in metadata.all_device_certificates().await? {
            loaded.add_certificate(&certificate);
        }
        *self.index.write() = loaded.index.into_inner();
        Ok(())
    }

    /// Sets or replaces the PSK of `psk.device_id`.
    pub fn set_psk(&self, psk: &StoredPsk) {
        let mut index = self.index.write();
        if let Some(old) = index.identity_by_device.remove(&psk.device_id) {
            index.psk_by_identity.remove(&old);
        }
        index
            .identity_by_device
            .insert(psk.device_id, psk.identity.clone());
        index.psk_by_identity.insert(
            psk.identity.clone(),
            PskEntry {
                owner: CredentialOwner {
                    tenant_id: psk.tenant_id,
                    device_id: psk.device_id,
                },
                sealed_key: psk.sealed_key.clone(),
            },
        );
    }

    pub fn remove_psk(&self, device: DeviceId) {
        let mut index = self.index.write();
        if let Some(identity) = index.identity_by_device.remove(&device) {
            index.psk_by_identity.remove(&identity);
        }
    }

    /// Returns the owner and the sealed key of a PSK identity.
    pub fn psk(&self, identity: &[u8]) -> Option<(CredentialOwner, Vec<u8>)> {
        let index = self.index.read();
        let entry = index.psk_by_identity.get(identity)?;
        Some((entry.owner, entry.sealed_key.clone()))
    }

    pub fn add_certificate(&self, certificate: &StoredCertificate) {
        let Ok(fingerprint) = <[u8; 32]>::try_from(certificate.fingerprint.as_slice()) else {
            tracing::warn!(
                device_id = %certificate.device_id,
                "ignoring a stored certificate whose fingerprint is not 32 bytes"
            );
            return;
        };
        self.index.write().certificate_by_fingerprint.insert(
            fingerprint,
            CredentialOwner {
                tenant_id: certificate.tenant_id,
                device_id: certificate.device_id,
            },
        );
    }

    pub fn remove_certificate(&self, fingerprint: &[u8]) {
        if let Ok(fingerprint) = <[u8; 32]>::try_from(fingerprint) {
            self.index
                .write()
                .certificate_by_fingerprint
                .remove(&fingerprint);
        }
    }

    /// Returns the device that registered the certificate with this
    /// SHA-256 fingerprint.
    pub fn certificate(&self, fingerprint: &[u8; 32]) -> Option<CredentialOwner> {
        self.index
            .read()
            .certificate_by_fingerprint
            .get(fingerprint)
            .copied()
    }

    /// Drops every credential of a deleted device.
    pub fn forget_device(&self, device: DeviceId) {
        let mut index = self.index.write();
        if let Some(identity) = index.identity_by_device.remove(&device) {
            index.psk_by_identity.remove(&identity);
        }
        index
            .certificate_by_fingerprint
            .retain(|_, owner| owner.device_id != device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn psk(device: DeviceId, identity: &str) -> StoredPsk {
        StoredPsk {
            device_id: device,
            tenant_id: TenantId::new_random(),
            identity: identity.as_bytes().to_vec(),
            sealed_key: vec![1, 2, 3],
            created_at: 0,
        }
    }

    #[test]
    fn replaced_psk_drops_old_identity() {
        let credentials = DtlsCredentials::default();
        let device = DeviceId::new_random();
        credentials.set_psk(&psk(device, "old"));
        credentials.set_psk(&psk(device, "new"));
        assert!(credentials.psk(b"old").is_none());
        assert_eq!(credentials.psk(b"new").unwrap().0.device_id, device);
    }

    #[test]
    fn forgotten_device_loses_every_credential() {
        let credentials = DtlsCredentials::default();
        let device = DeviceId::new_random();
        let other = DeviceId::new_random();
        credentials.set_psk(&psk(device, "a"));
        credentials.set_psk(&psk(other, "b"));
        credentials.add_certificate(&StoredCertificate {
            fingerprint: vec![7; 32],
            device_id: device,
            tenant_id: TenantId::new_random(),
            subject: "CN=a".to_owned(),
            not_after: 0,
            pem: String::new(),
            created_at: 0,
        });
        credentials.forget_device(device);
        assert!(credentials.psk(b"a").is_none());
        assert!(credentials.certificate(&[7; 32]).is_none());
        assert!(credentials.psk(b"b").is_some());
    }
}
