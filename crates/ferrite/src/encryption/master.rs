//! Where the master keys come from, and the file steps of a master key
//! rotation.
//!
//! A server has one current master key and, during a rotation, the previous
//! one. They come from one of two sources:
//! - the environment: `FERRITE_MASTER_KEY` (current) and
//!   `FERRITE_MASTER_KEY_PREVIOUS`, 64 hex digits each. A running process
//!   cannot see a changed environment, so a rotation needs a restart.
//! - files in the data directory: `master.key` (current, created with mode
//!   0600 on first start) and `master.key.previous`, 32 raw bytes each. The
//!   server reads them again when it meets a key id it does not hold, so
//!   `ferrite master-key rotate` works while it runs.
//!
//! The environment wins when `FERRITE_MASTER_KEY` is set.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rand::RngCore;

use super::{
    MASTER_KEY_ENV, MASTER_KEY_FILE, MasterKey, OpenError, PREVIOUS_MASTER_KEY_ENV,
    PREVIOUS_MASTER_KEY_FILE,
};

/// Temporary name of a new master key before it replaces `master.key`.
const NEW_MASTER_KEY_FILE: &str = "master.key.new";

/// The current master key and, during a rotation, the previous one.
#[derive(Debug)]
pub struct MasterKeys {
    current: MasterKey,
    previous: Option<MasterKey>,
}

impl MasterKeys {
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Self {
        Self { current, previous }
    }

    /// Returns the key that wraps new data keys.
    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    pub fn previous(&self) -> Option<&MasterKey> {
        self.previous.as_ref()
    }

    /// Returns the key whose id is `id`, if this set contains it.
    pub fn by_id(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|key| key.id() == id)
    }

    /// Opens a format 1 value with the current key, then with the previous
    /// one, because a value sealed before a rotation names no key id.
    pub fn open(&self, context: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        match self.current.open(context, sealed) {
            Err(OpenError::Decrypt) => match &self.previous {
                Some(previous) => previous.open(context, sealed),
                None => Err(OpenError::Decrypt),
            },
            other => other,
        }
    }
}

/// Source of the master keys.
#[derive(Debug, Clone)]
pub enum MasterKeySource {
    /// `FERRITE_MASTER_KEY` and `FERRITE_MASTER_KEY_PREVIOUS`.
    Environment,
    /// `master.key` and `master.key.previous` in the data directory.
    Files { data_dir: PathBuf },
}

impl MasterKeySource {
    /// Chooses the environment when `FERRITE_MASTER_KEY` is set, otherwise
    /// the files in `data_dir`.
    pub fn detect(data_dir: &Path) -> Self {
        if std::env::var_os(MASTER_KEY_ENV).is_some() {
            MasterKeySource::Environment
        } else {
            MasterKeySource::Files {
                data_dir: data_dir.to_owned(),
            }
        }
    }

    /// Loads the keys. With `create`, a missing `master.key` is created
    /// (first start of a server); without, it is an error.
    pub fn load(&self, create: bool) -> anyhow::Result<MasterKeys> {
        match self {
            MasterKeySource::Environment => {
                let current = parse_env_key(MASTER_KEY_ENV)?
                    .with_context(|| format!("{MASTER_KEY_ENV} is not set"))?;
                let previous = parse_env_key(PREVIOUS_MASTER_KEY_ENV)?;
                Ok(MasterKeys::new(
                    MasterKey::from_bytes(&current),
                    previous.map(|key| MasterKey::from_bytes(&key)),
                ))
            }
            MasterKeySource::Files { data_dir } => {
                let path = data_dir.join(MASTER_KEY_FILE);
                let current = match read_key_file(&path)? {
                    Some(key) => key,
                    None if create => load_or_create_file(&path)?,
                    None => anyhow::bail!(
                        "the master key {} is missing; restore it from a backup, or set {MASTER_KEY_ENV}",
                        path.display()
                    ),
                };
                let previous = read_key_file(&data_dir.join(PREVIOUS_MASTER_KEY_FILE))?;
                Ok(MasterKeys::new(
                    MasterKey::from_bytes(&current),
                    previous.map(|key| MasterKey::from_bytes(&key)),
                ))
            }
        }
    }
}

/// Returns a new random master key as 64 hex digits.
pub fn generate_key_hex() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    hex::encode(key)
}

fn parse_env_key(name: &str) -> anyhow::Result<Option<[u8; 32]>> {
    let Ok(text) = std::env::var(name) else {
        return Ok(None);
    };
    let bytes = hex::decode(text.trim())
        .map_err(|error| anyhow::anyhow!("{name} must be 64 hex digits (32 bytes): {error}"))?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!(
            "{name} has {} bytes; it must be 64 hex digits (32 bytes)",
            bytes.len()
        )
    })?;
    Ok(Some(key))
}

/// Reads a 32-byte key file; `None` when it does not exist.
fn read_key_file(path: &Path) -> anyhow::Result<Option<[u8; 32]>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let key = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "the master key {} has {} bytes instead of 32; restore it from a backup, because data keys wrapped by it cannot be read without it",
                    path.display(),
                    bytes.len()
                )
            })?;
            Ok(Some(key))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Writes `key` to a new file with mode 0600 and syncs it.
fn create_key_file(path: &Path, key: &[u8; 32]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(key)?;
    file.sync_all()?;
    Ok(())
}

fn load_or_create_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    if let Some(key) = read_key_file(path)? {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    create_key_file(path, &key)?;
    Ok(key)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .with_context(|| format!("cannot sync the directory {}", dir.display()))
}

/// Installs a new random key as `master.key` and keeps the old one as
/// `master.key.previous`: the first step of a rotation with key files.
///
/// At every moment `master.key` contains a complete key and the old key is
/// in one of the two files, so a server that reads them meanwhile finds
/// both. Returns `false` without generating a key when
/// `master.key.previous` exists already, because an earlier rotation did
/// not finish: the caller then finishes that one.
pub fn install_new_key_file(data_dir: &Path) -> anyhow::Result<bool> {
    let current_path = data_dir.join(MASTER_KEY_FILE);
    let previous_path = data_dir.join(PREVIOUS_MASTER_KEY_FILE);
    let new_path = data_dir.join(NEW_MASTER_KEY_FILE);

    let current = read_key_file(&current_path)?.with_context(|| {
        format!(
            "there is no master key {} to rotate; start the server once to create it",
            current_path.display()
        )
    })?;
    if let Some(previous) = read_key_file(&previous_path)? {
        if previous != current {
            return Ok(false);
        }
        // An earlier run stopped between linking the old key and moving the
        // new one in place: nothing was rewrapped yet, so start again.
        std::fs::remove_file(&previous_path)
            .with_context(|| format!("cannot remove {}", previous_path.display()))?;
    }
    match std::fs::remove_file(&new_path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("cannot remove {}", new_path.display()));
        }
    }

    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    create_key_file(&new_path, &key)?;
    std::fs::hard_link(&current_path, &previous_path).with_context(|| {
        format!(
            "cannot keep the old master key as {}",
            previous_path.display()
        )
    })?;
    sync_dir(data_dir)?;
    std::fs::rename(&new_path, &current_path).with_context(|| {
        format!(
            "cannot move the new master key to {}",
            current_path.display()
        )
    })?;
    sync_dir(data_dir)?;
    Ok(true)
}

/// Removes `master.key.previous` once no data key is wrapped by it: the
/// last step of a rotation with key files.
pub fn remove_previous_key_file(data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(PREVIOUS_MASTER_KEY_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(data_dir),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> MasterKeySource {
        MasterKeySource::Files {
            data_dir: dir.to_owned(),
        }
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

    #[test]
    fn missing_key_file_is_an_error_without_create() {
        let dir = tempfile::tempdir().unwrap();
        let error = files(dir.path()).load(false).unwrap_err().to_string();
        assert!(error.contains("is missing"), "{error}");
    }

    #[test]
    fn installed_key_keeps_old_as_previous() {
        let dir = tempfile::tempdir().unwrap();
        let old = files(dir.path()).load(true).unwrap();
        let old_id = old.current().id().to_owned();

        assert!(install_new_key_file(dir.path()).unwrap());
        let keys = files(dir.path()).load(false).unwrap();
        assert_ne!(keys.current().id(), old_id);
        assert_eq!(keys.previous().unwrap().id(), old_id);
        assert!(keys.by_id(&old_id).is_some());
        assert!(!dir.path().join(NEW_MASTER_KEY_FILE).exists());

        // An unfinished rotation is finished, not started again.
        assert!(!install_new_key_file(dir.path()).unwrap());

        remove_previous_key_file(dir.path()).unwrap();
        let keys = files(dir.path()).load(false).unwrap();
        assert!(keys.previous().is_none());
        assert!(keys.by_id(&old_id).is_none());
    }

    #[test]
    fn interrupted_install_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        files(dir.path()).load(true).unwrap();
        std::fs::copy(
            dir.path().join(MASTER_KEY_FILE),
            dir.path().join(PREVIOUS_MASTER_KEY_FILE),
        )
        .unwrap();
        std::fs::write(dir.path().join(NEW_MASTER_KEY_FILE), [1u8; 32]).unwrap();

        assert!(install_new_key_file(dir.path()).unwrap());
        let keys = files(dir.path()).load(false).unwrap();
        assert_ne!(keys.current().id(), keys.previous().unwrap().id());
    }

    #[test]
    fn legacy_values_open_with_previous_key() {
        let old = MasterKey::from_bytes(&[1u8; 32]);
        let sealed = old.seal("c", b"secret");
        let keys = MasterKeys::new(MasterKey::from_bytes(&[2u8; 32]), Some(old));
        assert_eq!(keys.open("c", &sealed).unwrap(), b"secret");
        assert_eq!(keys.open("other", &sealed), Err(OpenError::Decrypt));
    }
}
