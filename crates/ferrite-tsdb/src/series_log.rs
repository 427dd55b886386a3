//! The series file: an append-only, checksummed log that maps series ids to
//! their (tenant, device, key) names and records deleted ids.
//!
//! Only the maintenance path (flush, delete, open) touches this file, always
//! under the store's maintenance lock, so there is one writer at a time.
//!
//! NOTE: the file is never rewritten, so definitions of deleted series stay
//! in it and it grows with every series ever created.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::SeriesKey;
use crate::catalog::SeriesId;
use crate::encoding::{DecodeError, Reader, put_bytes, put_uvarint};
use crate::error::{IoContext, StoreError};
use crate::fsio;

pub(crate) const SERIES_FILE_NAME: &str = "series.log";

const MAGIC: [u8; 8] = *b"FERRSERS";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
const RECORD_FRAME_LEN: usize = 8;

/// Upper bound of one record's payload. Names are limited to
/// [`crate::MAX_NAME_LEN`] bytes each, so valid records stay far below it.
/// A larger length field is treated as damage, not as an allocation request.
const MAX_RECORD_LEN: usize = 1 << 20;

const KIND_DEFINE: u8 = 1;
const KIND_DELETE: u8 = 2;

pub(crate) enum SeriesRecord<'a> {
    Define(SeriesId, &'a SeriesKey),
    Delete(SeriesId),
}

/// Contents of the series file at open.
pub(crate) struct LoadedSeries {
    /// Series that are defined and not deleted.
    pub(crate) live: HashMap<SeriesId, SeriesKey>,
    /// Ids whose series was deleted. Segment data of these ids is ignored.
    pub(crate) deleted: HashSet<SeriesId>,
    /// Largest id ever defined; ids are never reused.
    pub(crate) max_id: u64,
}

pub(crate) struct SeriesLog {
    path: PathBuf,
    file: File,
    /// End of the last complete record. Appends write here, so bytes of a
    /// failed append that were left behind are overwritten by the next one.
    len: u64,
}

impl SeriesLog {
    /// Opens or creates the series file in `dir` and loads its records.
    ///
    /// A record whose frame or checksum is invalid ends the log: it and
    /// everything after it are cut off with a warning, because a crash in
    /// the middle of an append leaves exactly such a tail. A record with a
    /// valid checksum but inconsistent content is reported as `Corrupt`.
    pub(crate) fn open(dir: &Path) -> Result<(SeriesLog, LoadedSeries), StoreError> {
        let path = dir.join(SERIES_FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .context("open", &path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).context("read", &path)?;

        let mut loaded = LoadedSeries {
            live: HashMap::new(),
            deleted: HashSet::new(),
            max_id: 0,
        };

        // A file shorter than its header was being created when the
        // process stopped, so it contains no records yet.
        if bytes.len() < HEADER_LEN {
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(&MAGIC);
            header.extend_from_slice(&VERSION.to_le_bytes());
            header.extend_from_slice(&0u32.to_le_bytes());
            file.set_len(0).context("truncate", &path)?;
            fsio::write_all_at(&file, &header, 0).context("write", &path)?;
            file.sync_all().context("sync", &path)?;
            fsio::sync_dir(dir).context("sync directory", dir)?;
            let log = SeriesLog {
                path,
                file,
                len: HEADER_LEN as u64,
            };
            return Ok((log, loaded));
        }

        if bytes[0..8] != MAGIC {
            return Err(StoreError::corrupt(&path, "not a series file (bad magic)"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(StoreError::corrupt(
                &path,
                format!("unsupported series file version {version}, expected {VERSION}"),
            ));
        }

        let mut pos = HEADER_LEN;
        while pos < bytes.len() {
            let Some(payload) = framed_payload(&bytes[pos..]) else {
                break;
            };
            apply_record(payload, &mut loaded).map_err(|err| {
                StoreError::corrupt(&path, format!("record at offset {pos}: {}", err.0))
            })?;
            pos += RECORD_FRAME_LEN + payload.len();
        }

        if pos < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                valid_len = pos,
                dropped_bytes = bytes.len() - pos,
                "series file ends in an incomplete or damaged record; cutting it off"
            );
            file.set_len(pos as u64).context("truncate", &path)?;
            file.sync_all().context("sync", &path)?;
        }

        let log = SeriesLog {
            path,
            file,
            len: pos as u64,
        };
        Ok((log, loaded))
    }

    /// Appends `records` and syncs them to disk. On error the log's logical
    /// end stays where it was.
    pub(crate) fn append(&mut self, records: &[SeriesRecord<'_>]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }

        let mut buf = Vec::new();
        for record in records {
            let payload = encode_record(record);
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }

        let result = fsio::write_all_at(&self.file, &buf, self.len)
            .and_then(|()| self.file.sync_data())
            .context("append to", &self.path);
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(err) => {
                // Best effort: the next append overwrites these bytes anyway,
                // and open cuts off a damaged tail.
                let _ = self.file.set_len(self.len);
                Err(err)
            }
        }
    }
}

/// Returns the payload of the record at the start of `bytes`, or `None`
/// when the frame is incomplete, too long or fails its checksum.
fn framed_payload(bytes: &[u8]) -> Option<&[u8]> {
    if bytes.len() < RECORD_FRAME_LEN {
        return None;
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len > MAX_RECORD_LEN || bytes.len() - RECORD_FRAME_LEN < len {
        return None;
    }
    let payload = &bytes[RECORD_FRAME_LEN..RECORD_FRAME_LEN + len];
    (crc32fast::hash(payload) == crc).then_some(payload)
}

fn encode_record(record: &SeriesRecord<'_>) -> Vec<u8> {
    let mut payload = Vec::new();
    match record {
        SeriesRecord::Define(id, key) => {
            payload.push(KIND_DEFINE);
            put_uvarint(&mut payload, id.0);
            put_bytes(&mut payload, key.tenant.as_bytes());
            put_bytes(&mut payload, key.device.as_bytes());
            put_bytes(&mut payload, key.key.as_bytes());
        }
        SeriesRecord::Delete(id) => {
            payload.push(KIND_DELETE);
            put_uvarint(&mut payload, id.0);
        }
    }
    payload
}

fn apply_record(payload: &[u8], loaded: &mut LoadedSeries) -> Result<(), DecodeError> {
    let mut reader = Reader::new(payload);
    let kind = reader.u8()?;
    let id = SeriesId(reader.uvarint()?);
    if id.0 == 0 {
        return Err(DecodeError("series id 0 is reserved"));
    }

    match kind {
        KIND_DEFINE => {
            let key = SeriesKey {
                tenant: reader.string()?,
                device: reader.string()?,
                key: reader.string()?,
            };
            if loaded.deleted.contains(&id) {
                return Err(DecodeError("series id defined again after its deletion"));
            }
            // A flush that failed after appending its definitions repeats
            // them on the next attempt, so identical repeats are expected.
            if let Some(existing) = loaded.live.get(&id) {
                if *existing != key {
                    return Err(DecodeError("series id defined twice with different names"));
                }
            } else {
                loaded.live.insert(id, key);
            }
            loaded.max_id = loaded.max_id.max(id.0);
        }
        KIND_DELETE => {
            loaded.live.remove(&id);
            loaded.deleted.insert(id);
        }
        _ => return Err(DecodeError("unknown series record kind")),
    }

    if !reader.is_empty() {
        return Err(DecodeError("trailing bytes in series record"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(device: &str, key: &str) -> SeriesKey {
        SeriesKey {
            tenant: "t1".into(),
            device: device.into(),
            key: key.into(),
        }
    }

    #[test]
    fn series_log_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let temp = key("d1", "temp");
        let humidity = key("d1", "humidity");
        {
            let (mut log, loaded) = SeriesLog::open(dir.path()).unwrap();
            assert!(loaded.live.is_empty());
            log.append(&[
                SeriesRecord::Define(SeriesId(1), &temp),
                SeriesRecord::Define(SeriesId(2), &humidity),
            ])
            .unwrap();
            log.append(&[SeriesRecord::Delete(SeriesId(1))]).unwrap();
        }

        let (_log, loaded) = SeriesLog::open(dir.path()).unwrap();

        assert_eq!(loaded.live.len(), 1);
        assert_eq!(loaded.live.get(&SeriesId(2)), Some(&humidity));
        assert!(loaded.deleted.contains(&SeriesId(1)));
        assert_eq!(loaded.max_id, 2);
    }

    #[test]
    fn series_log_cuts_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let temp = key("d1", "temp");
        let humidity = key("d1", "humidity");
        {
            let (mut log, _) = SeriesLog::open(dir.path()).unwrap();
            log.append(&[SeriesRecord::Define(SeriesId(1), &temp)])
                .unwrap();
            log.append(&[SeriesRecord::Define(SeriesId(2), &humidity)])
                .unwrap();
        }
        let path = dir.path().join(SERIES_FILE_NAME);
        let full_len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(full_len - 3).unwrap();
        drop(file);

        let (mut log, loaded) = SeriesLog::open(dir.path()).unwrap();
        assert_eq!(loaded.live.len(), 1);
        assert_eq!(loaded.live.get(&SeriesId(1)), Some(&temp));

        // The next append lands right after the last valid record.
        log.append(&[SeriesRecord::Define(SeriesId(3), &humidity)])
            .unwrap();
        drop(log);
        let (_log, loaded) = SeriesLog::open(dir.path()).unwrap();
        assert_eq!(loaded.live.len(), 2);
        assert_eq!(loaded.live.get(&SeriesId(3)), Some(&humidity));
    }

    #[test]
    fn series_log_rejects_conflicting_definition() {
        let dir = tempfile::tempdir().unwrap();
        let temp = key("d1", "temp");
        let other = key("d2", "temp");
        {
            let (mut log, _) = SeriesLog::open(dir.path()).unwrap();
            log.append(&[SeriesRecord::Define(SeriesId(1), &temp)])
                .unwrap();
            log.append(&[SeriesRecord::Define(SeriesId(1), &temp)])
                .unwrap();
            log.append(&[SeriesRecord::Define(SeriesId(1), &other)])
                .unwrap();
        }

        let result = SeriesLog::open(dir.path());

        assert!(matches!(result, Err(StoreError::Corrupt { .. })));
    }
}
