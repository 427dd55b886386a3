//! Generation and hashing of secrets.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of device access tokens, so a leaked token is recognizable in logs and scanners.
pub const DEVICE_TOKEN_PREFIX: &str = "fdt_";
/// Prefix of API keys; the bearer check uses it to tell keys from JWTs.
pub const API_KEY_PREFIX: &str = "fak_";

/// An argon2id hash of a random, discarded password. Logins that name an
/// unknown email are verified against it.
pub const DUMMY_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$8o8fHZb1U8XcYqWZzTfyEwzxcYz7ZtWzqk3f0Jm6yLo";

fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Generates a device access token of 192 random bits.
pub fn generate_device_token() -> String {
    random_secret(DEVICE_TOKEN_PREFIX)
}

/// Generates an API key of 192 random bits.
pub fn generate_api_key() -> String {
    random_secret(API_KEY_PREFIX)
}

/// SHA-256 of a high-entropy secret, the form in which tokens are stored.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let hash = Argon2::default()
        .hash_password(password.as_bytes())
        .map_err(|error| anyhow::anyhow!("password hashing failed: {error}"))?;
    Ok(hash.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Reads a 32-byte key from `path`, or creates one readable only by the owner.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(key) if key.len() == 32 => return Ok(key),
        Ok(key) => anyhow::bail!(
            "the signing key {} has {} bytes instead of 32; delete it to generate a new one (this logs everyone out)",
            path.display(),
            key.len()
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", path.display()));
        }
    }

    let mut key = vec![0u8; 32];
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

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = generate_device_token();
        let b = generate_device_token();
        assert_ne!(a, b);
        assert!(a.starts_with(DEVICE_TOKEN_PREFIX));
        assert_eq!(a.len(), DEVICE_TOKEN_PREFIX.len() + 32);
    }

    #[test]
    fn password_round_trip() {
        let hash = hash_password("correct horse").unwrap();
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
    }

    #[test]
    fn dummy_hash_parses() {
        assert!(PasswordHash::new(DUMMY_PASSWORD_HASH).is_ok());
        assert!(!verify_password("", DUMMY_PASSWORD_HASH));
    }
}
