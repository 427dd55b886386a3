//! The durable-marker file: the ingest-log position up to which the
//! segments contain every point.
//!
//! ```text
//! magic "FERRMARK" (8) | version u32 = 1 | reserved u32 = 0 | marker u64 | crc32(bytes 0..24) u32
//! ```
//!
//! It is replaced atomically (temporary file, fsync, rename, directory
//! fsync) after the segments of a flush are in place, so a flush is durable
//! exactly when this file names its marker.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{IoContext, StoreError};
use crate::fsio;

pub(crate) const MARKER_FILE_NAME: &str = "durable-marker";
const MAGIC: [u8; 8] = *b"FERRMARK";
const VERSION: u32 = 1;
const LEN: usize = 28;

/// Reads the marker file. `Ok(None)` when there is none (a new store, or
/// one written by format 1, which kept the marker in its segments).
pub(crate) fn read(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(MARKER_FILE_NAME);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(crate::error::io_error("read", &path, err)),
    };
    let valid = bytes.len() == LEN
        && bytes[0..8] == MAGIC
        && u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) == VERSION
        && crc32fast::hash(&bytes[0..24])
            == u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
    if !valid {
        return Err(StoreError::corrupt(
            &path,
            "durable-marker file fails its checks",
        ));
    }
    Ok(Some(u64::from_le_bytes(
        bytes[16..24].try_into().expect("8 bytes"),
    )))
}

/// Replaces the marker file atomically and durably.
pub(crate) fn write(dir: &Path, marker: u64) -> Result<(), StoreError> {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&marker.to_le_bytes());
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());

    let path = dir.join(MARKER_FILE_NAME);
    let temp = dir.join(format!("{MARKER_FILE_NAME}.tmp"));
    let mut file = File::create(&temp).context("create", &temp)?;
    file.write_all(&bytes).context("write", &temp)?;
    file.sync_all().context("sync", &temp)?;
    drop(file);
    fs::rename(&temp, &path).context("rename marker file into place at", &path)?;
    fsio::sync_dir(dir).context("sync directory", dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), 7).unwrap();
        write(dir.path(), u64::MAX - 1).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(u64::MAX - 1));

        let path = dir.path().join(MARKER_FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        bytes[20] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(dir.path()), Err(StoreError::Corrupt { .. })));
    }
}
