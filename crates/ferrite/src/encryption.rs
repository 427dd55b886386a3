//! Encryption of secrets at rest (LoRaWAN root and session keys, DTLS
//! pre-shared keys) with AES-256-GCM under one master key.
//!
//! ## Master key
//! The 32-byte master key comes from `FERRITE_MASTER_KEY` (64 hex digits)
//! when that variable is set, otherwise from `master.key` in the data
//! directory, which is created with mode 0600 on first start. Losing the
//! key makes every sealed secret unreadable, so back it up with the data
//! directory or keep it in the environment.
//!
//! ## Sealed format
//! `[version = 1][nonce: 12 bytes][ciphertext][tag: 16 bytes]`. The nonce is
//! random per seal (96 bits, so about 2^32 seals per key keep the collision
//! chance below 2^-32). The caller passes a context string, such as
//! `lorawan/app_key/{device id}`, that is bound as associated data: a sealed
//! value copied onto another row or field fails to open.
//!
//! NOTE: one key for all tenants; per-tenant data keys wrapped by this key
//! and master key rotation are not implemented yet.

use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::Context;
use rand::RngCore;

/// Environment variable that contains the master key as 64 hex digits.
pub const MASTER_KEY_ENV: &str = "FERRITE_MASTER_KEY";
/// File in the data directory that contains the master key when the
/// environment variable is not set.
pub const MASTER_KEY_FILE: &str = "master.key";

const FORMAT_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("the sealed value is {0} bytes, shorter than any sealed value")]
    TooShort(usize),
    #[error("the sealed value has format version {0}; this build reads version 1")]
    UnknownVersion(u8),
    #[error(
        "the sealed value cannot be decrypted: it was sealed under another master key or context, or was altered"
    )]
    Decrypt,
}

/// The key that seals secrets stored in the metadata database.
pub struct MasterKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn from_bytes(key: &[u8; 32]) -> Self {
        Self {
            cipher: Aes256Gcm::new(key.into()),
        }
    }

    /// Loads the master key from [`MASTER_KEY_ENV`] or from
    /// `data_dir/master.key`, creating the file on first start.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
            let bytes = hex::decode(text.trim()).map_err(|error| {
                anyhow::anyhow!("{MASTER_KEY_ENV} must be 64 hex digits (32 bytes): {error}")
            })?;
            let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{MASTER_KEY_ENV} has {} bytes; it must be 64 hex digits (32 bytes)",
                    bytes.len()
                )
            })?;
            return Ok(Self::from_bytes(&key));
        }
        let key = load_or_create_file(&data_dir.join(MASTER_KEY_FILE))?;
        Ok(Self::from_bytes(&key))
    }

    /// Encrypts `plaintext`, binding it to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .expect("AES-GCM encryption fails only for inputs over 64 GiB");

        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(FORMAT_VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Decrypts a value from [`MasterKey::seal`] with the same `context`.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < 1 + NONCE_LEN + TAG_LEN {
            return Err(OpenError::TooShort(sealed.len()));
        }
        if sealed[0] != FORMAT_VERSION {
            return Err(OpenError::UnknownVersion(sealed[0]));
        }
        let (nonce, ciphertext) = sealed[1..].split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at the nonce length");
        self.cipher
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Decrypt)
    }
}

fn load_or_create_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    match std::fs::read(path) {
        Ok(bytes) => {
            return bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "the master key {} has {} bytes instead of 32; restore it from a backup, because secrets sealed under it cannot be read without it",
                    path.display(),
                    bytes.len()
                )
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", path.display()));
        }
    }

    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(&key)?;
    file.sync_all()?;
    Ok(key)
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
        assert_eq!(sealed[0], FORMAT_VERSION);
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
    fn key_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MASTER_KEY_FILE);
        let first = load_or_create_file(&path).unwrap();
        let second = load_or_create_file(&path).unwrap();
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
