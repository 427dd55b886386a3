//! Segment files: writing them atomically, opening their index, and reading
//! their blocks. The byte layout is documented in the crate documentation.

use std::borrow::Borrow;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrite_core::{TimestampNs, Value};
use parking_lot::Mutex;

use crate::block::BlockBuilder;
use crate::catalog::{NO_TENANT, SeriesId};
use crate::cipher::{BlockPlace, SEALED_TAG, Sealing};
use crate::encoding::{BLOCK_FRAME_LEN, DecodeError, Reader, put_ivarint, put_uvarint};
use crate::error::{IoContext, StoreError};
use crate::fsio;
use crate::item::StoredValue;

const MAGIC: [u8; 8] = *b"FERRTSEG";
/// Format version that this build writes.
pub(crate) const VERSION: u32 = 2;
/// Oldest format version that this build reads.
const OLDEST_VERSION: u32 = 1;
/// Header length of format 1; format 2 appends `marker_from` and a checksum.
const HEADER_LEN_V1: u64 = 16;
const HEADER_LEN: u64 = 32;
const TRAILER_LEN: u64 = 48;
/// Header flag (in the `flags` field, reserved in segments written before
/// sealing existed): block payloads may be sealed, and the index carries
/// no last values, which are read from the last block instead.
const FLAG_SEALED: u32 = 1;

/// A block is closed after this many points: one day of a series that
/// reports every 10 s fits into one block, which compresses well, and a
/// block still decodes in microseconds.
///
/// NOTE: a query for one hour decodes the whole block of its day; on the
/// fleet benchmark one-hour raw reads took 1.4 times as long as in
/// VictoriaMetrics. Smaller blocks in hot partitions, or an index inside
/// the block, would cut that.
const MAX_BLOCK_POINTS: u32 = 8640;
/// A block is closed once its uncompressed points reach this many bytes, so
/// long strings do not make blocks (and the reads of one query) arbitrarily
/// large.
const TARGET_BLOCK_BYTES: usize = 256 * 1024;

const SEGMENT_PREFIX: &str = "seg-";
/// Prefix of rollup tier segments, so that a directory listing shows raw
/// data and rollups apart.
const ROLLUP_PREFIX: &str = "rollup-";
const SEGMENT_SUFFIX: &str = ".fseg";
pub(crate) const TEMP_SUFFIX: &str = ".tmp";

/// File name of the segment with sequence number `seq`. The zero-padded hex
/// number makes lexical order equal creation order.
pub(crate) fn segment_file_name(seq: u64, tier: u8) -> String {
    let prefix = if tier == 0 {
        SEGMENT_PREFIX
    } else {
        ROLLUP_PREFIX
    };
    format!("{prefix}{seq:016x}{SEGMENT_SUFFIX}")
}

/// Sequence number of a segment file name, or `None` for other files.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name
        .strip_prefix(SEGMENT_PREFIX)
        .or_else(|| name.strip_prefix(ROLLUP_PREFIX))?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Location and summary of one block of one series.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockRef {
    /// Offset of the block frame from the start of the file.
    pub(crate) offset: u64,
    /// Frame length plus payload length.
    pub(crate) len: u32,
    pub(crate) count: u32,
    pub(crate) min_ts: TimestampNs,
    pub(crate) max_ts: TimestampNs,
}

/// Index entry of one series in one segment.
#[derive(Debug)]
pub(crate) struct IndexEntry<V = Value> {
    pub(crate) count: u64,
    pub(crate) min_ts: TimestampNs,
    pub(crate) max_ts: TimestampNs,
    /// Value of the point at `max_ts`, which feeds the latest-point cache.
    pub(crate) last_value: V,
    /// Blocks in ascending time order, with disjoint time ranges.
    pub(crate) blocks: Box<[BlockRef]>,
}

/// Time range `[start, end)` that contains every point of a segment. Format 1
/// segments have no partition and cover all time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Partition {
    pub(crate) start: TimestampNs,
    pub(crate) end: TimestampNs,
}

impl Partition {
    pub(crate) const ALL: Partition = Partition {
        start: TimestampNs::MIN,
        end: TimestampNs::MAX,
    };

    /// Returns the partition of `duration` nanoseconds that contains `ts`, aligned
    /// to the Unix epoch.
    pub(crate) fn of(ts: TimestampNs, duration: i64) -> Partition {
        let start = ts.div_euclid(duration).saturating_mul(duration);
        Partition {
            start,
            end: start.saturating_add(duration),
        }
    }
}

/// Fields of a segment's index that describe the whole segment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SegmentMeta {
    /// 0 for raw points, 1 and up for the rollup tiers in order.
    pub(crate) tier: u8,
    pub(crate) partition: Partition,
    /// Order of last-write-wins between segments whose partitions overlap:
    /// for equal timestamps the segment with the greater priority wins. A
    /// flushed segment has its own sequence number, a compaction output the
    /// greatest priority of its inputs.
    pub(crate) priority: u64,
    /// Durable marker before the flush that wrote the oldest points of this
    /// segment: replaying the ingest log from here rebuilds them.
    pub(crate) marker_from: u64,
    /// 0 for a flushed segment, one more than its greatest input for a
    /// compaction output.
    pub(crate) level: u8,
    /// Sequence numbers of the segments that this compaction output
    /// replaces.
    pub(crate) inputs: Vec<u64>,
}

impl SegmentMeta {
    pub(crate) fn flushed(
        tier: u8,
        partition: Partition,
        seq: u64,
        marker_from: u64,
    ) -> SegmentMeta {
        SegmentMeta {
            tier,
            partition,
            priority: seq,
            marker_from,
            level: 0,
            inputs: Vec::new(),
        }
    }
}

/// Every this many index entries, an open segment keeps the id and position
/// of one entry in memory (a fence). A lookup reads the entries between two
/// fences from the file, so the index itself stays on disk: with a million
/// series an open segment keeps about 0.5 MB instead of the 130 MB that the
/// decoded entries took.
const FENCE_EVERY: u64 = 32;

/// Fences read at a time when a whole index is listed.
const FENCES_PER_READ: usize = 256;

/// Position of one index entry, see [`FENCE_EVERY`].
#[derive(Debug, Clone, Copy)]
struct Fence {
    first_id: u64,
    /// Offset from the first entry of the index.
    offset: u64,
}

/// Greatest timestamp per retention group of a segment.
pub(crate) struct GroupMaxTs {
    /// Generation of the retention rules that numbered the groups.
    pub(crate) generation: u64,
    /// Group and greatest timestamp, ascending by group.
    pub(crate) max_ts: Vec<(u32, TimestampNs)>,
}

/// An open, immutable segment: its trailer fields and a sparse view of its
/// index in memory, and a read handle for its index entries and blocks.
pub(crate) struct Segment<V = Value> {
    pub(crate) seq: u64,
    pub(crate) path: PathBuf,
    file: File,
    pub(crate) version: u32,
    /// File size in bytes.
    pub(crate) size: u64,
    /// Marker passed to the flush that wrote this segment. A compacted
    /// segment carries the marker of its newest input.
    pub(crate) marker: u64,
    pub(crate) meta: SegmentMeta,
    pub(crate) series_count: u64,
    /// Greatest timestamp per retention group, computed from the index when
    /// retention first needs it and again after the groups change (see the
    /// store's `retention` module).
    pub(crate) group_max_ts: Mutex<Option<GroupMaxTs>>,
    /// Block references must lie in `data_start..data_end`.
    data_start: u64,
    data_end: u64,
    /// File offsets of the first index entry and of the end of the last.
    entries_start: u64,
    entries_end: u64,
    fences: Box<[Fence]>,
    last_id: u64,
    /// Set when the writer had a cipher: blocks may be sealed and index
    /// entries carry a placeholder instead of the last value.
    sealed: bool,
    sealing: Arc<Sealing>,
    _values: PhantomData<V>,
}

/// Tenant name of every series id, copied from the catalog for a flush or
/// compaction that seals its blocks.
#[derive(Default)]
pub(crate) struct TenantNames {
    pub(crate) by_id: Vec<u32>,
    pub(crate) names: Vec<String>,
}

impl TenantNames {
    fn of(&self, id: SeriesId) -> Option<&str> {
        let number = *self.by_id.get(usize::try_from(id.0).ok()?)?;
        if number == NO_TENANT {
            return None;
        }
        self.names.get(number as usize).map(String::as_str)
    }
}

/// Sealing settings of a [`SegmentWriter`]: the store's [`Sealing`], and
/// with a cipher, the tenant of every series it may write.
#[derive(Clone)]
pub(crate) struct SealWith {
    pub(crate) sealing: Arc<Sealing>,
    pub(crate) tenants: Arc<TenantNames>,
}

impl SealWith {
    /// Writes plain blocks.
    #[cfg(test)]
    pub(crate) fn plain() -> SealWith {
        SealWith {
            sealing: Sealing::new(None, true),
            tenants: Arc::default(),
        }
    }
}

/// Reads the tier byte of a segment (0 for format 1), so that recovery can
/// open it with the right value type. Checks nothing else.
pub(crate) fn probe_tier(path: &Path) -> Result<u8, StoreError> {
    let file = File::open(path).context("open", path)?;
    let file_len = file.metadata().context("read metadata of", path)?.len();
    if file_len < HEADER_LEN_V1 + TRAILER_LEN {
        return Err(StoreError::corrupt(
            path,
            "file shorter than header and trailer",
        ));
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    fsio::read_exact_at(&file, &mut trailer, file_len - TRAILER_LEN).context("read", path)?;
    let fields = parse_trailer(&trailer).map_err(|err| StoreError::corrupt(path, err.0))?;
    if fields.version == 1 {
        return Ok(0);
    }
    if fields.index_offset >= file_len {
        return Err(StoreError::corrupt(path, "index position outside the file"));
    }
    let mut tier = [0u8; 1];
    fsio::read_exact_at(&file, &mut tier, fields.index_offset).context("read", path)?;
    Ok(tier[0])
}

impl<V: StoredValue> Segment<V> {
    /// Opens a segment and reads its trailer and index, checking both
    /// checksums, that series come in ascending id order and that every
    /// block reference lies inside the data area. `visit` is called with
    /// every index entry. Blocks themselves are checked when they are read.
    pub(crate) fn open(
        path: PathBuf,
        seq: u64,
        sealing: Arc<Sealing>,
        mut visit: impl FnMut(SeriesId, &IndexEntry<V>),
    ) -> Result<Segment<V>, StoreError> {
        let file = File::open(&path).context("open", &path)?;
        let file_len = file.metadata().context("read metadata of", &path)?.len();
        if file_len < HEADER_LEN_V1 + TRAILER_LEN {
            return Err(StoreError::corrupt(
                &path,
                format!("file is {file_len} bytes, shorter than header and trailer"),
            ));
        }

        let (header_marker_from, flags) = read_header(&file, &path)?;
        let header_len = if header_marker_from.is_some() {
            HEADER_LEN
        } else {
            HEADER_LEN_V1
        };

        let mut trailer = [0u8; TRAILER_LEN as usize];
        fsio::read_exact_at(&file, &mut trailer, file_len - TRAILER_LEN).context("read", &path)?;
        let fields = parse_trailer(&trailer).map_err(|err| StoreError::corrupt(&path, err.0))?;

        let data_end = file_len - TRAILER_LEN;
        if (fields.version == 1) != header_marker_from.is_none() {
            return Err(StoreError::corrupt(
                &path,
                "header and trailer disagree on the format version",
            ));
        }
        if fields.index_offset < header_len
            || fields.index_offset.checked_add(fields.index_len) != Some(data_end)
        {
            return Err(StoreError::corrupt(
                &path,
                "index position in trailer does not match the file size",
            ));
        }

        // The whole index is read once here to check its checksum; later
        // lookups read the entries between two fences.
        let mut index_bytes = vec![0u8; fields.index_len as usize];
        fsio::read_exact_at(&file, &mut index_bytes, fields.index_offset).context("read", &path)?;
        if crc32fast::hash(&index_bytes) != fields.index_crc {
            return Err(StoreError::corrupt(&path, "index checksum mismatch"));
        }
        let scanned = scan_index(
            &index_bytes,
            header_len,
            fields.index_offset,
            fields.version,
            seq,
            &mut visit,
        )
        .map_err(|err| StoreError::corrupt(&path, format!("invalid index: {}", err.0)))?;
        let mut meta = scanned.meta;
        meta.marker_from = header_marker_from.unwrap_or(0);

        Ok(Segment {
            seq,
            path,
            file,
            version: fields.version,
            size: file_len,
            marker: fields.marker,
            meta,
            series_count: scanned.series_count,
            group_max_ts: Mutex::new(None),
            data_start: header_len,
            data_end: fields.index_offset,
            entries_start: fields.index_offset + scanned.entries_start as u64,
            entries_end: data_end,
            fences: scanned.fences.into_boxed_slice(),
            last_id: scanned.last_id,
            sealed: flags & FLAG_SEALED != 0,
            sealing,
            _values: PhantomData,
        })
    }

    /// Estimated heap bytes that the open segment keeps.
    pub(crate) fn resident_bytes(&self) -> usize {
        size_of::<Self>()
            + self.fences.len() * size_of::<Fence>()
            + self.meta.inputs.capacity() * size_of::<u64>()
            + self.path.as_os_str().len()
            + self.group_max_ts.lock().as_ref().map_or(0, |cached| {
                cached.max_ts.capacity() * size_of::<(u32, TimestampNs)>()
            })
    }

    /// Reads the index entry of `id`, or `None` when the segment has no
    /// points of that series.
    pub(crate) fn entry(&self, id: SeriesId) -> Result<Option<IndexEntry<V>>, StoreError> {
        if id.0 > self.last_id {
            return Ok(None);
        }
        let Some(fence) = self
            .fences
            .partition_point(|f| f.first_id <= id.0)
            .checked_sub(1)
        else {
            return Ok(None);
        };
        let bytes = self.read_entries(fence, fence + 1)?;
        let mut reader = Reader::new(&bytes);
        while !reader.is_empty() {
            let (entry_id, entry) = self.decode_entry(&mut reader)?;
            if entry_id == id {
                return Ok(Some(entry));
            }
            if entry_id > id {
                break;
            }
        }
        Ok(None)
    }

    /// Lists every index entry in ascending id order, reading the index
    /// from the file in parts.
    pub(crate) fn entries(&self) -> Entries<'_, V> {
        Entries {
            segment: self,
            next_fence: 0,
            bytes: Vec::new(),
            pos: 0,
        }
    }

    /// Reads the index entries from fence `first` up to fence `end` (or to
    /// the end of the index).
    fn read_entries(&self, first: usize, end: usize) -> Result<Vec<u8>, StoreError> {
        let start = self.entries_start + self.fences[first].offset;
        let stop = self
            .fences
            .get(end)
            .map_or(self.entries_end, |fence| self.entries_start + fence.offset);
        let mut bytes = vec![0u8; (stop - start) as usize];
        fsio::read_exact_at(&self.file, &mut bytes, start).context("read", &self.path)?;
        Ok(bytes)
    }

    fn decode_entry(
        &self,
        reader: &mut Reader<'_>,
    ) -> Result<(SeriesId, IndexEntry<V>), StoreError> {
        let decoded = reader.uvarint().and_then(|id| {
            decode_index_entry(reader, self.data_start, self.data_end).map(|e| (SeriesId(id), e))
        });
        decoded.map_err(|err| {
            StoreError::corrupt(&self.path, format!("invalid index entry: {}", err.0))
        })
    }

    /// Reads one block and checks its checksum. A sealed block that does
    /// not open (its tenant key is gone, or it was tampered with) is
    /// counted in [`Sealing::unreadable_blocks`] and returns no points.
    pub(crate) fn read_block(&self, block: &BlockRef) -> Result<Vec<(TimestampNs, V)>, StoreError> {
        let mut frame = vec![0u8; block.len as usize];
        fsio::read_exact_at(&self.file, &mut frame, block.offset).context("read", &self.path)?;
        let decoded = if self.version == 1 {
            V::decode_version_1_block(&frame)
        } else {
            match crate::encoding::unframe(&frame) {
                Ok(payload) if payload.first() == Some(&SEALED_TAG) => {
                    let place = self.place_of(block);
                    let cipher = self.sealing.cipher.as_deref();
                    match crate::cipher::open_payload(cipher, payload, &place) {
                        Ok(plain) => crate::block::decode_payload::<V>(&plain),
                        Err(err) => {
                            self.sealing.note_unreadable();
                            tracing::debug!(
                                segment = %self.path.display(),
                                offset = block.offset,
                                error = %err,
                                "skipping a sealed block that does not open"
                            );
                            return Ok(Vec::new());
                        }
                    }
                }
                Ok(payload) => crate::block::decode_payload::<V>(payload),
                Err(err) => Err(err),
            }
        };
        let points = decoded.map_err(|err| {
            StoreError::corrupt(
                &self.path,
                format!("block at offset {}: {}", block.offset, err.0),
            )
        })?;

        let matches_index = points.len() == block.count as usize
            && points.first().map(|p| p.0) == Some(block.min_ts)
            && points.last().map(|p| p.0) == Some(block.max_ts);
        if !matches_index {
            return Err(StoreError::corrupt(
                &self.path,
                format!(
                    "block at offset {} differs from its index entry",
                    block.offset
                ),
            ));
        }
        Ok(points)
    }
}

impl<V: StoredValue> Segment<V> {
    fn place_of(&self, block: &BlockRef) -> BlockPlace {
        BlockPlace {
            seq: self.seq,
            offset: block.offset,
            count: block.count,
            min_ts: block.min_ts,
            max_ts: block.max_ts,
        }
    }

    /// Value of the series' point at `entry.max_ts`. A sealed segment has
    /// it only in the last block, which is read; `None` when that block
    /// does not open.
    pub(crate) fn last_value(&self, entry: &IndexEntry<V>) -> Result<Option<V>, StoreError> {
        if !self.sealed {
            return Ok(Some(entry.last_value.clone()));
        }
        let Some(block) = entry.blocks.last() else {
            return Ok(None);
        };
        Ok(self.read_block(block)?.pop().map(|(_, value)| value))
    }
}

/// Reads and checks the header. Returns `Some(marker_from)` for format 2
/// and `None` for format 1, and the header flags.
fn read_header(file: &File, path: &Path) -> Result<(Option<u64>, u32), StoreError> {
    let mut header = [0u8; HEADER_LEN as usize];
    fsio::read_exact_at(file, &mut header[..HEADER_LEN_V1 as usize], 0).context("read", path)?;
    if header[0..8] != MAGIC {
        return Err(StoreError::corrupt(
            path,
            "not a segment file (bad header magic)",
        ));
    }
    let u32_at = |bytes: &[u8], at: usize| {
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
    };
    match u32_at(&header, 8) {
        1 => Ok((None, 0)),
        VERSION => {
            fsio::read_exact_at(file, &mut header, 0).context("read", path)?;
            if crc32fast::hash(&header[0..24]) != u32_at(&header, 24) {
                return Err(StoreError::corrupt(path, "header checksum mismatch"));
            }
            let marker_from = u64::from_le_bytes(header[16..24].try_into().expect("8 bytes"));
            Ok((Some(marker_from), u32_at(&header, 12)))
        }
        _ => Err(StoreError::corrupt(
            path,
            "unsupported segment format version in header (written by a newer Ferrite?)",
        )),
    }
}

/// Returns the `marker_from` of a format 2 segment whose header is intact,
/// for recovery when the rest of the file is damaged.
pub(crate) fn damaged_segment_marker_from(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    read_header(&file, path)
        .ok()
        .and_then(|(marker_from, _)| marker_from)
}

struct TrailerFields {
    version: u32,
    marker: u64,
    index_offset: u64,
    index_len: u64,
    index_crc: u32,
}

fn parse_trailer(trailer: &[u8; TRAILER_LEN as usize]) -> Result<TrailerFields, DecodeError> {
    let u64_at = |at: usize| u64::from_le_bytes(trailer[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(trailer[at..at + 4].try_into().expect("4 bytes"));

    if trailer[40..48] != MAGIC {
        return Err(DecodeError(
            "bad trailer magic (file truncated or not a segment)",
        ));
    }
    if crc32fast::hash(&trailer[0..32]) != u32_at(32) {
        return Err(DecodeError("trailer checksum mismatch"));
    }
    let version = u32_at(28);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(DecodeError(
            "unsupported segment format version (written by a newer Ferrite?)",
        ));
    }
    Ok(TrailerFields {
        version,
        marker: u64_at(0),
        index_offset: u64_at(8),
        index_len: u64_at(16),
        index_crc: u32_at(24),
    })
}

fn encode_trailer(fields: &TrailerFields) -> Vec<u8> {
    let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
    trailer.extend_from_slice(&fields.marker.to_le_bytes());
    trailer.extend_from_slice(&fields.index_offset.to_le_bytes());
    trailer.extend_from_slice(&fields.index_len.to_le_bytes());
    trailer.extend_from_slice(&fields.index_crc.to_le_bytes());
    trailer.extend_from_slice(&fields.version.to_le_bytes());
    let crc = crc32fast::hash(&trailer);
    trailer.extend_from_slice(&crc.to_le_bytes());
    trailer.extend_from_slice(&0u32.to_le_bytes());
    trailer.extend_from_slice(&MAGIC);
    debug_assert_eq!(trailer.len() as u64, TRAILER_LEN);
    trailer
}

/// Encodes the fields of the index that describe the whole segment.
fn encode_meta(meta: &SegmentMeta, series_count: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    buf.push(meta.tier);
    put_ivarint(&mut buf, meta.partition.start);
    put_ivarint(&mut buf, meta.partition.end);
    put_uvarint(&mut buf, meta.priority);
    buf.push(meta.level);
    put_uvarint(&mut buf, meta.inputs.len() as u64);
    for input in &meta.inputs {
        put_uvarint(&mut buf, *input);
    }
    put_uvarint(&mut buf, series_count);
    buf
}

fn encode_entry<V: StoredValue>(buf: &mut Vec<u8>, id: SeriesId, entry: &IndexEntry<V>) {
    put_uvarint(buf, id.0);
    put_uvarint(buf, entry.count);
    put_ivarint(buf, entry.min_ts);
    put_ivarint(buf, entry.max_ts);
    entry.last_value.put_last(buf);
    put_uvarint(buf, entry.blocks.len() as u64);
    for block in &entry.blocks {
        put_uvarint(buf, block.offset);
        put_uvarint(buf, u64::from(block.len));
        put_uvarint(buf, u64::from(block.count));
        put_ivarint(buf, block.min_ts);
        put_ivarint(buf, block.max_ts);
    }
}

/// Iterator over the index entries of a segment, see [`Segment::entries`].
pub(crate) struct Entries<'a, V> {
    segment: &'a Segment<V>,
    next_fence: usize,
    bytes: Vec<u8>,
    pos: usize,
}

impl<V: StoredValue> Iterator for Entries<'_, V> {
    type Item = Result<(SeriesId, IndexEntry<V>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.pos >= self.bytes.len() {
            let fences = self.segment.fences.len();
            if self.next_fence >= fences {
                return None;
            }
            let end = (self.next_fence + FENCES_PER_READ).min(fences);
            match self.segment.read_entries(self.next_fence, end) {
                Ok(bytes) => self.bytes = bytes,
                Err(err) => {
                    self.next_fence = fences;
                    return Some(Err(err));
                }
            }
            self.pos = 0;
            self.next_fence = end;
        }
        let mut reader = Reader::new(&self.bytes[self.pos..]);
        let decoded = self.segment.decode_entry(&mut reader);
        self.pos += reader.position();
        if decoded.is_err() {
            self.pos = self.bytes.len();
            self.next_fence = self.segment.fences.len();
        }
        Some(decoded)
    }
}

/// Parts of a segment's index that the open segment keeps in memory.
struct ScannedIndex {
    meta: SegmentMeta,
    series_count: u64,
    /// Offset of the first entry from the start of the index.
    entries_start: usize,
    fences: Vec<Fence>,
    last_id: u64,
}

/// Format 1 compaction outputs name their inputs as a range of sequence
/// numbers; ranges longer than this are not expanded (format 1 compacted
/// at most a few segments at a time).
const MAX_VERSION_1_INPUTS: u64 = 1 << 20;

fn scan_index<V: StoredValue>(
    bytes: &[u8],
    data_start: u64,
    data_end: u64,
    version: u32,
    seq: u64,
    visit: &mut impl FnMut(SeriesId, &IndexEntry<V>),
) -> Result<ScannedIndex, DecodeError> {
    let mut reader = Reader::new(bytes);
    let meta = decode_meta::<V>(&mut reader, version, seq)?;
    let series_count = reader.uvarint()?;
    let entries_start = reader.position();

    let mut fences =
        Vec::with_capacity((series_count / FENCE_EVERY + 1).min(bytes.len() as u64) as usize);
    let mut last_id = 0u64;
    for n in 0..series_count {
        let offset = (reader.position() - entries_start) as u64;
        let id = reader.uvarint()?;
        // Lookups between fences rely on the ascending order.
        if id <= last_id {
            return Err(DecodeError("series id 0, listed twice or out of order"));
        }
        let entry = decode_index_entry::<V>(&mut reader, data_start, data_end)?;
        if entry.min_ts < meta.partition.start || entry.max_ts >= meta.partition.end {
            return Err(DecodeError("points outside the segment's partition"));
        }
        if n.is_multiple_of(FENCE_EVERY) {
            fences.push(Fence {
                first_id: id,
                offset,
            });
        }
        last_id = id;
        visit(SeriesId(id), &entry);
    }

    if !reader.is_empty() {
        return Err(DecodeError("trailing bytes after the last index entry"));
    }
    Ok(ScannedIndex {
        meta,
        series_count,
        entries_start,
        fences,
        last_id,
    })
}

fn decode_meta<V: StoredValue>(
    reader: &mut Reader<'_>,
    version: u32,
    seq: u64,
) -> Result<SegmentMeta, DecodeError> {
    if version == 1 {
        let first = reader.uvarint()?;
        let last = reader.uvarint()?;
        let inputs = match (first, last) {
            (0, 0) => Vec::new(),
            (first, last) if 0 < first && first <= last && last - first < MAX_VERSION_1_INPUTS => {
                (first..=last).collect()
            }
            _ => return Err(DecodeError("invalid compaction input range")),
        };
        return Ok(SegmentMeta {
            tier: 0,
            partition: Partition::ALL,
            priority: seq,
            // Set by the store at open from the segments before this one.
            marker_from: 0,
            level: u8::from(!inputs.is_empty()),
            inputs,
        });
    }
    let tier = reader.u8()?;
    if (tier == 0) != V::RAW {
        return Err(DecodeError("segment of another tier than expected"));
    }
    let partition = Partition {
        start: reader.ivarint()?,
        end: reader.ivarint()?,
    };
    if partition.start >= partition.end {
        return Err(DecodeError("empty partition"));
    }
    let priority = reader.uvarint()?;
    let level = reader.u8()?;
    let input_count = reader.len()?;
    let mut inputs = Vec::with_capacity(input_count.min(1024));
    for _ in 0..input_count {
        inputs.push(reader.uvarint()?);
    }
    Ok(SegmentMeta {
        tier,
        partition,
        priority,
        // Set by the caller from the header.
        marker_from: 0,
        level,
        inputs,
    })
}

fn decode_index_entry<V: StoredValue>(
    reader: &mut Reader<'_>,
    data_start: u64,
    data_end: u64,
) -> Result<IndexEntry<V>, DecodeError> {
    let count = reader.uvarint()?;
    let min_ts = reader.ivarint()?;
    let max_ts = reader.ivarint()?;
    let last_value = V::read_last(reader)?;
    let block_count = reader.len()?;
    if block_count == 0 {
        return Err(DecodeError("series without blocks"));
    }

    let mut blocks: Vec<BlockRef> = Vec::with_capacity(block_count.min(1024));
    let mut points = 0u64;
    for _ in 0..block_count {
        let block = BlockRef {
            offset: reader.uvarint()?,
            len: u32::try_from(reader.uvarint()?)
                .map_err(|_| DecodeError("block length too large"))?,
            count: u32::try_from(reader.uvarint()?)
                .map_err(|_| DecodeError("block count too large"))?,
            min_ts: reader.ivarint()?,
            max_ts: reader.ivarint()?,
        };

        let inside_data = block.offset >= data_start
            && block.len as usize > BLOCK_FRAME_LEN
            && block
                .offset
                .checked_add(u64::from(block.len))
                .is_some_and(|end| end <= data_end);
        if !inside_data {
            return Err(DecodeError("block lies outside the data area"));
        }
        if block.count == 0 || block.min_ts > block.max_ts {
            return Err(DecodeError("block with no points or reversed time range"));
        }
        if blocks
            .last()
            .is_some_and(|previous| previous.max_ts >= block.min_ts)
        {
            return Err(DecodeError(
                "blocks of a series overlap or are out of order",
            ));
        }

        points += u64::from(block.count);
        blocks.push(block);
    }

    let consistent = points == count
        && blocks.first().map(|b| b.min_ts) == Some(min_ts)
        && blocks.last().map(|b| b.max_ts) == Some(max_ts);
    if !consistent {
        return Err(DecodeError("series summary does not match its blocks"));
    }

    Ok(IndexEntry {
        count,
        min_ts,
        max_ts,
        last_value,
        blocks: blocks.into_boxed_slice(),
    })
}

/// Writes a segment to a temporary file and installs it atomically in
/// [`SegmentWriter::finish`]. Dropping an unfinished writer deletes the
/// temporary file.
pub(crate) struct SegmentWriter<V: StoredValue = Value> {
    dir: PathBuf,
    seq: u64,
    temp_path: PathBuf,
    out: Option<BufWriter<File>>,
    /// Bytes written so far, which is the offset of the next block.
    pos: u64,
    /// Encoded index entries, in ascending id order.
    entries: Vec<u8>,
    series_count: u64,
    fences: Vec<Fence>,
    last_id: u64,
    encoder: BlockBuilder<V>,
    frame: Vec<u8>,
    seal: SealWith,
    /// Set once the temporary file has been renamed to its final name.
    renamed: bool,
}

impl<V: StoredValue> SegmentWriter<V> {
    /// Starts segment `seq`. `marker_from` goes into the header, where
    /// recovery finds it even when the rest of the file is damaged.
    pub(crate) fn create(
        dir: &Path,
        seq: u64,
        marker_from: u64,
        seal: &SealWith,
    ) -> Result<SegmentWriter<V>, StoreError> {
        let temp_path = dir.join(format!("{}{TEMP_SUFFIX}", segment_file_name(seq, 0)));
        let file = File::create(&temp_path).context("create", &temp_path)?;
        let mut writer = SegmentWriter {
            dir: dir.to_path_buf(),
            seq,
            temp_path,
            out: Some(BufWriter::with_capacity(256 * 1024, file)),
            pos: 0,
            entries: Vec::new(),
            series_count: 0,
            fences: Vec::new(),
            last_id: 0,
            encoder: BlockBuilder::default(),
            frame: Vec::new(),
            seal: seal.clone(),
            renamed: false,
        };
        let flags = if writer.sealing() { FLAG_SEALED } else { 0 };

        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&flags.to_le_bytes());
        header.extend_from_slice(&marker_from.to_le_bytes());
        let crc = crc32fast::hash(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        writer.write_bytes(&header)?;
        Ok(writer)
    }

    /// True when no series has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.series_count == 0
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(bytes).context("write", &self.temp_path)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn sealing(&self) -> bool {
        self.seal.sealing.write_cipher().is_some()
    }

    /// Writes all points of one series. Series must come in ascending id
    /// order and points in strictly ascending timestamp order. A series
    /// without points gets no index entry. With a cipher, a series whose
    /// tenant has no key (a deleted tenant) is dropped with a warning and
    /// counted in [`Sealing::unsealable_series`]; blocks of it already
    /// written stay in the file unreferenced.
    pub(crate) fn write_series<P: Borrow<(TimestampNs, V)>>(
        &mut self,
        id: SeriesId,
        mut points: impl Iterator<Item = Result<P, StoreError>>,
    ) -> Result<(), StoreError> {
        debug_assert!(self.last_id < id.0);
        let tenant = if self.sealing() {
            match self.seal.tenants.of(id) {
                Some(tenant) => Some(tenant.to_owned()),
                None => {
                    self.seal.sealing.note_unsealable();
                    tracing::warn!(
                        series_id = id.0,
                        "dropping the points of a series without a tenant; they cannot be sealed"
                    );
                    return points.try_for_each(|point| point.map(drop));
                }
            }
        } else {
            None
        };
        let mut blocks = Vec::new();
        let mut count = 0u64;
        let mut last: Option<P> = None;

        for point in points {
            let point = point?;
            let (ts, value) = point.borrow();
            debug_assert!(last.as_ref().is_none_or(|p| p.borrow().0 < *ts));
            self.encoder.push(*ts, value);
            count += 1;
            last = Some(point);

            if self.encoder.count() >= MAX_BLOCK_POINTS
                || self.encoder.raw_bytes() >= TARGET_BLOCK_BYTES
            {
                blocks.push(self.finish_block(tenant.as_deref())?);
            }
        }
        if self.encoder.count() > 0 {
            blocks.push(self.finish_block(tenant.as_deref())?);
        }

        let Some(last) = last else {
            return Ok(());
        };
        let Some(blocks) = blocks.into_iter().collect::<Option<Vec<BlockRef>>>() else {
            self.seal.sealing.note_unsealable();
            return Ok(());
        };
        // A sealed segment keeps the last value inside its last block only.
        let last_value = if self.sealing() {
            V::index_placeholder()
        } else {
            last.borrow().1.clone()
        };
        let entry = IndexEntry {
            count,
            min_ts: blocks[0].min_ts,
            max_ts: last.borrow().0,
            last_value,
            blocks: blocks.into_boxed_slice(),
        };
        if self.series_count.is_multiple_of(FENCE_EVERY) {
            self.fences.push(Fence {
                first_id: id.0,
                offset: self.entries.len() as u64,
            });
        }
        encode_entry(&mut self.entries, id, &entry);
        self.series_count += 1;
        self.last_id = id.0;
        Ok(())
    }

    /// Writes the block the encoder collected, sealed when `tenant` is
    /// given. Returns `None` when the cipher has no key for the tenant.
    fn finish_block(&mut self, tenant: Option<&str>) -> Result<Option<BlockRef>, StoreError> {
        let count = self.encoder.count();
        let min_ts = self.encoder.min_ts();
        let max_ts = self.encoder.max_ts();
        let offset = self.pos;

        let mut payload = self.encoder.finish_payload();
        if let (Some(tenant), Some(cipher)) = (tenant, self.seal.sealing.write_cipher()) {
            let place = BlockPlace {
                seq: self.seq,
                offset,
                count,
                min_ts,
                max_ts,
            };
            match crate::cipher::seal_payload(cipher, tenant, &payload, &place) {
                Ok(sealed) => payload = sealed,
                Err(err) => {
                    tracing::warn!(
                        tenant,
                        error = %err,
                        lost_points = count,
                        "dropping points that cannot be sealed"
                    );
                    return Ok(None);
                }
            }
        }

        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        let len = crate::block::frame_into(&payload, &mut frame);
        let written = self.write_bytes(&frame);
        self.frame = frame;
        written?;

        Ok(Some(BlockRef {
            offset,
            len: u32::try_from(len).expect("blocks stay far below 4 GiB"),
            count,
            min_ts,
            max_ts,
        }))
    }

    /// Writes index and trailer, syncs the file, renames it to its final
    /// name and syncs the directory. Returns the segment opened for reading.
    pub(crate) fn finish(
        mut self,
        marker: u64,
        meta: SegmentMeta,
    ) -> Result<Segment<V>, StoreError> {
        let meta_bytes = encode_meta(&meta, self.series_count);
        let entries = std::mem::take(&mut self.entries);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&meta_bytes);
        crc.update(&entries);
        let index_offset = self.pos;
        let entries_start = index_offset + meta_bytes.len() as u64;
        let trailer = encode_trailer(&TrailerFields {
            version: VERSION,
            marker,
            index_offset,
            index_len: (meta_bytes.len() + entries.len()) as u64,
            index_crc: crc.finalize(),
        });
        self.write_bytes(&meta_bytes)?;
        self.write_bytes(&entries)?;
        let entries_end = self.pos;
        drop(entries);
        self.write_bytes(&trailer)?;

        let out = self.out.take().expect("finish is called once");
        let file = out
            .into_inner()
            .map_err(|err| err.into_error())
            .context("write", &self.temp_path)?;
        file.sync_all().context("sync", &self.temp_path)?;
        drop(file);

        let path = self.dir.join(segment_file_name(self.seq, meta.tier));
        fs::rename(&self.temp_path, &path).context("rename segment into place at", &path)?;
        self.renamed = true;
        fsio::sync_dir(&self.dir).context("sync directory", &self.dir)?;

        let file = File::open(&path).context("open", &path)?;
        Ok(Segment {
            seq: self.seq,
            path,
            file,
            version: VERSION,
            size: self.pos,
            marker,
            meta,
            series_count: self.series_count,
            group_max_ts: Mutex::new(None),
            data_start: HEADER_LEN,
            data_end: index_offset,
            entries_start,
            entries_end,
            fences: std::mem::take(&mut self.fences).into_boxed_slice(),
            last_id: self.last_id,
            sealed: self.sealing(),
            sealing: self.seal.sealing.clone(),
            _values: PhantomData,
        })
    }
}

impl<V: StoredValue> Drop for SegmentWriter<V> {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Point;

    fn ok_points(points: &[Point]) -> impl Iterator<Item = Result<&Point, StoreError>> {
        points.iter().map(Ok)
    }

    #[test]
    fn segment_file_name_round_trip() {
        assert_eq!(segment_file_name(26, 0), "seg-000000000000001a.fseg");
        assert_eq!(segment_file_name(26, 2), "rollup-000000000000001a.fseg");
        assert_eq!(
            parse_segment_file_name("rollup-000000000000001a.fseg"),
            Some(26)
        );
        assert_eq!(
            parse_segment_file_name("seg-000000000000001a.fseg"),
            Some(26)
        );
        assert_eq!(parse_segment_file_name("seg-1a.fseg"), None);
        assert_eq!(
            parse_segment_file_name("seg-000000000000001a.fseg.tmp"),
            None
        );
    }

    #[test]
    fn segment_round_trip_many_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let long: Vec<Point> = (0..5000).map(|i| (i * 10, Value::Int(i))).collect();
        let strings: Vec<Point> = (0..40)
            .map(|i| (i, Value::Str(format!("{i}").repeat(4000))))
            .collect();

        let mut writer =
            SegmentWriter::<Value>::create(dir.path(), 7, 42, &SealWith::plain()).unwrap();
        writer.write_series(SeriesId(1), ok_points(&long)).unwrap();
        writer
            .write_series(SeriesId(2), ok_points(&strings))
            .unwrap();
        writer.write_series(SeriesId(3), ok_points(&[])).unwrap();
        let meta = SegmentMeta {
            tier: 0,
            partition: Partition {
                start: -100,
                end: 1 << 40,
            },
            priority: 6,
            marker_from: 42,
            level: 2,
            inputs: vec![2, 4, 6],
        };
        let written = writer.finish(99, meta.clone()).unwrap();

        let segment =
            Segment::<Value>::open(written.path.clone(), 7, Sealing::new(None, true), |_, _| {})
                .unwrap();

        assert_eq!(segment.marker, 99);
        assert_eq!(segment.meta, meta);
        assert_eq!(damaged_segment_marker_from(&segment.path), Some(42));
        assert!(segment.entry(SeriesId(3)).unwrap().is_none());

        let entry = segment.entry(SeriesId(1)).unwrap().unwrap();
        assert_eq!(entry.count, 5000);
        assert_eq!(entry.blocks.len(), 1);
        assert_eq!((entry.min_ts, entry.max_ts), (0, 49_990));
        assert_eq!(entry.last_value, Value::Int(4999));
        let mut read = Vec::new();
        for block in &entry.blocks {
            read.extend(segment.read_block(block).unwrap());
        }
        assert_eq!(read, long);

        let entry = segment.entry(SeriesId(2)).unwrap().unwrap();
        assert!(
            entry.blocks.len() > 1,
            "the 64 KiB target must split 280 KB of strings"
        );
        let mut read = Vec::new();
        for block in &entry.blocks {
            read.extend(segment.read_block(block).unwrap());
        }
        assert_eq!(read, strings);
    }

    #[test]
    fn segment_open_rejects_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let points: Vec<Point> = (0..10).map(|i| (i, Value::Float(i as f64))).collect();
        let mut writer =
            SegmentWriter::<Value>::create(dir.path(), 1, 0, &SealWith::plain()).unwrap();
        writer
            .write_series(SeriesId(1), ok_points(&points))
            .unwrap();
        let path = writer
            .finish(1, SegmentMeta::flushed(0, Partition::ALL, 1, 0))
            .unwrap()
            .path;
        let bytes = fs::read(&path).unwrap();

        for cut in [1, 10, 48, bytes.len() / 2] {
            fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
            assert!(
                matches!(
                    Segment::<Value>::open(path.clone(), 1, Sealing::new(None, true), |_, _| {}),
                    Err(StoreError::Corrupt { .. })
                ),
                "truncating {cut} bytes not detected"
            );
        }
    }

    #[test]
    fn unfinished_writer_removes_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let writer = SegmentWriter::<Value>::create(dir.path(), 3, 0, &SealWith::plain()).unwrap();
        let temp_path = writer.temp_path.clone();
        assert!(temp_path.exists());

        drop(writer);

        assert!(!temp_path.exists());
    }
}
