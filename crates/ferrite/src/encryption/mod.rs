//! Encryption of secrets at rest with AES-256-GCM and envelope keys.
//!
//! ## Keys
//! Each tenant has random 256-bit data keys ([`Keyring`]) that seal its
//! secrets (LoRaWAN root and session keys, DTLS pre-shared keys, webhook
//! secrets and headers) and, with `ingest.encrypt`, its ingest log records. The data
//! keys are stored in the `tenant_keys` table only wrapped (sealed) by the
//! master key, which lives outside the database (see [`master`]). Rotating
//! the master key rewraps the data keys and leaves the sealed data as it
//! is. Deleting a tenant destroys its data keys, which makes everything
//! sealed under them unreadable.
//!
//! ## Sealed formats
//! - Version 1, `[1][nonce: 12 bytes][ciphertext][tag: 16 bytes]`: sealed
//!   directly by a master key. Wrapped data keys use it. Device secrets
//!   written before tenant keys existed used it too, and the server reseals
//!   them under the tenant key at start ([`Keyring::reseal_legacy_values`]).
//! - Version 2, `[2][data key version: u32, big-endian][nonce][ciphertext][tag]`:
//!   sealed by version N of the tenant's data key.
//!
//! The nonce is random per seal (96 bits, so about 2^32 seals per key keep
//! the collision chance below 2^-32). The caller passes a context string,
//! such as `lorawan/app_key/{device id}`, that is bound as associated data:
//! a sealed value copied onto another row or field fails to open.
//!
//! With `storage.encrypt`, the time-series store seals its block payloads
//! under the same data keys (`crate::store::cipher`). Without it, a deleted
//! tenant's telemetry stays readable in the store files until retention
//! removes it.

pub mod cli;
pub mod keyring;
pub mod master;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use keyring::{Keyring, KeyringError};
pub use master::MasterKeySource;

/// Environment variable that contains the master key as 64 hex digits.
pub const MASTER_KEY_ENV: &str = "FERRITE_MASTER_KEY";
/// Environment variable that contains the previous master key during a
/// rotation, as 64 hex digits.
pub const PREVIOUS_MASTER_KEY_ENV: &str = "FERRITE_MASTER_KEY_PREVIOUS";
/// File in the data directory that contains the master key when the
/// environment variable is not set.
pub const MASTER_KEY_FILE: &str = "master.key";
/// File in the data directory that contains the previous master key while
/// a rotation rewraps the data keys.
pub const PREVIOUS_MASTER_KEY_FILE: &str = "master.key.previous";

/// Format of values sealed directly by a master key.
const MASTER_FORMAT: u8 = 1;
/// Format of values sealed by a tenant data key.
const TENANT_FORMAT: u8 = 2;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_VERSION_LEN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the sealed value is {0} bytes, shorter than any sealed value")]
    TooShort(usize),
    #[error("the sealed value has format version {0}; this build reads versions 1 and 2")]
    UnknownVersion(u8),
    #[error(
        "the sealed value cannot be decrypted: it was sealed under another key or context, or was altered"
    )]
    Decrypt,
    #[error(
        "data key version {version} of the tenant is not available: the tenant was deleted, or its key was created by another server process that this one has not loaded yet"
    )]
    MissingDataKey { version: u32 },
}

/// Encrypts `plaintext` with a random nonce, binding `context`, and appends
/// nonce and ciphertext to `header`.
fn seal_with(cipher: &Aes256Gcm, header: &[u8], context: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad: context.as_bytes(),
            },
        )
        .expect("AES-GCM encryption fails only for inputs over 64 GiB");

    let mut sealed = Vec::with_capacity(header.len() + NONCE_LEN + ciphertext.len());
    sealed.extend_from_slice(header);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&ciphertext);
    sealed
}

/// Decrypts `body` (`[nonce][ciphertext][tag]`), the part of a sealed value
/// after its header.
fn open_with(cipher: &Aes256Gcm, context: &str, body: &[u8]) -> Result<Vec<u8>, OpenError> {
    let (nonce, ciphertext) = body.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad: context.as_bytes(),
            },
        )
        .map_err(|_| OpenError::Decrypt)
}

/// Returns the format version of a sealed value after checking that it is
/// long enough for that format.
pub fn sealed_format(sealed: &[u8]) -> Result<u8, OpenError> {
    let Some(&version) = sealed.first() else {
        return Err(OpenError::TooShort(0));
    };
    let header = match version {
        MASTER_FORMAT => 1,
        TENANT_FORMAT => 1 + KEY_VERSION_LEN,
        other => return Err(OpenError::UnknownVersion(other)),
    };
    if sealed.len() < header + NONCE_LEN + TAG_LEN {
        return Err(OpenError::TooShort(sealed.len()));
    }
    Ok(version)
}

/// A master key: wraps tenant data keys, and opens secrets that older
/// versions sealed with it directly.
pub struct MasterKey {
    cipher: Aes256Gcm,
    id: String,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        // The id is a hash of the key under a fixed label, so it names the
        // key in the database and in logs without revealing it.
        let mut hasher = Sha256::new();
        hasher.update(b"ferrite master key id\0");
        hasher.update(key);
        let id = hex::encode(&hasher.finalize()[..8]);
        Self {
            cipher: Aes256Gcm::new(key.into()),
            id,
        }
    }

    /// Returns the key's id: 16 hex digits derived from the key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypts `plaintext` in format version 1, binding it to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        seal_with(&self.cipher, &[MASTER_FORMAT], context, plaintext)
    }

    /// Decrypts a value from [`MasterKey::seal`] with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        match sealed_format(sealed)? {
            MASTER_FORMAT => open_with(&self.cipher, context, &sealed[1..]),
            other => Err(OpenError::UnknownVersion(other)),
        }
    }
}

/// A tenant data key of one version.
#[derive(Clone)]
pub struct DataKey {
    cipher: Aes256Gcm,
    version: u32,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey(version {})", self.version)
    }
}

impl DataKey {
    pub fn from_bytes(key: &[u8; 32], version: u32) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
            version,
        }
    }

    /// Encrypts `plaintext` in format version 2, binding it to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut header = [0u8; 1 + KEY_VERSION_LEN];
        header[0] = TENANT_FORMAT;
        header[1..].copy_from_slice(&self.version.to_be_bytes());
        seal_with(&self.cipher, &header, context, plaintext)
    }

    /// Decrypts a value from [`DataKey::seal`] with the same `context`.
    #[cfg(test)]
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        match sealed_format(sealed)? {
            TENANT_FORMAT if data_key_version(sealed) == self.version => {
                self.open_body(context, sealed)
            }
            TENANT_FORMAT => Err(OpenError::MissingDataKey {
                version: data_key_version(sealed),
            }),
            other => Err(OpenError::UnknownVersion(other)),
        }
    }

    /// Decrypts the body of a format 2 value sealed by this key.
    fn open_body(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        open_with(&self.cipher, context, &sealed[1 + KEY_VERSION_LEN..])
    }
}

/// Returns the data key version named in a format 2 value.
fn data_key_version(sealed: &[u8]) -> u32 {
    let bytes: [u8; KEY_VERSION_LEN] = sealed[1..1 + KEY_VERSION_LEN]
        .try_into()
        .expect("the caller checked the length");
    u32::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn sealed_value_opens_with_same_context() {
        let sealed = key().seal("lorawan/app_key/d1", b"secret");
        assert_eq!(sealed[0], MASTER_FORMAT);
        assert_eq!(sealed.len(), 1 + NONCE_LEN + 6 + TAG_LEN);
        assert_eq!(
            key().open("lorawan/app_key/d1", &sealed).unwrap(),
            b"secret"
        );
    }

    #[test]
    fn other_context_or_key_fails() {
        let sealed = key().seal("lorawan/app_key/d1", b"secret");
        assert_eq!(
            key().open("lorawan/app_key/d2", &sealed),
            Err(OpenError::Decrypt)
        );
        let other = MasterKey::from_bytes(&[8u8; 32]);
        assert_eq!(
            other.open("lorawan/app_key/d1", &sealed),
            Err(OpenError::Decrypt)
        );
    }

    #[test]
    fn altered_or_short_value_fails() {
        let mut sealed = key().seal("c", b"secret");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(key().open("c", &sealed), Err(OpenError::Decrypt));
        assert_eq!(key().open("c", &[1, 2, 3]), Err(OpenError::TooShort(3)));
        let mut versioned = key().seal("c", b"secret");
        versioned[0] = 9;
        assert_eq!(
            key().open("c", &versioned),
            Err(OpenError::UnknownVersion(9))
        );
    }

    #[test]
    fn seals_differ_for_same_plaintext() {
        assert_ne!(key().seal("c", b"secret"), key().seal("c", b"secret"));
    }

    #[test]
    fn data_key_names_its_version() {
        let data_key = DataKey::from_bytes(&[9u8; 32], 7);
        let sealed = data_key.seal("device_psk/d1", b"secret");
        assert_eq!(sealed[0], TENANT_FORMAT);
        assert_eq!(sealed_format(&sealed), Ok(TENANT_FORMAT));
        assert_eq!(data_key_version(&sealed), 7);
        assert_eq!(
            data_key.open_body("device_psk/d1", &sealed).unwrap(),
            b"secret"
        );
        assert_eq!(
            data_key.open_body("device_psk/d2", &sealed),
            Err(OpenError::Decrypt)
        );
    }

    #[test]
    fn master_key_rejects_tenant_format() {
        let sealed = DataKey::from_bytes(&[9u8; 32], 1).seal("c", b"secret");
        assert_eq!(key().open("c", &sealed), Err(OpenError::UnknownVersion(2)));
    }

    #[test]
    fn master_key_id_is_stable_and_distinct() {
        assert_eq!(key().id(), key().id());
        assert_eq!(key().id().len(), 16);
        assert_ne!(key().id(), MasterKey::from_bytes(&[8u8; 32]).id());
    }
}
