//! The `Store`: write path, flush, compaction, queries and recovery at open.
//! Invariants and file formats are described in the crate documentation.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferrite_core::{TimestampNs, Value, is_storable_timestamp};
use parking_lot::{Mutex, RwLock};

use crate::catalog::{Catalog, IdMap, SeriesId};
use crate::encoding::Point;
use crate::error::{IoContext, StoreError, io_error};
use crate::head::Head;
use crate::merge::{MergedPoints, Source};
use crate::segment::{Segment, SegmentWriter, TEMP_SUFFIX, parse_segment_file_name};
use crate::series_log::{LoadedSeries, SeriesLog, SeriesRecord};
use crate::{Bucket, MAX_NAME_LEN, RangePage, SeriesKey, StoreOptions};

const LOCK_FILE_NAME: &str = "LOCK";
const CORRUPT_DIR_NAME: &str = "corrupt";

/// Query bounds that cover every storable timestamp: `i64::MAX` is not
/// storable, so the half-open range `[i64::MIN, i64::MAX)` misses nothing.
const ALL_LO: TimestampNs = TimestampNs::MIN;
const ALL_END: TimestampNs = TimestampNs::MAX;

/// Embedded time-series store. See the crate documentation.
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    state: RwLock<State>,
    /// Serialises flush, compaction and delete, which change files.
    maintenance: Mutex<Maintenance>,
    /// Holds the directory lock until the store is dropped.
    _lock_file: File,
}

/// In-memory state that readers and writers share.
struct State {
    catalog: Catalog,
    next_series_id: u64,
    /// Series created since open that the series file does not define yet,
    /// with their names. Flush writes their definitions.
    unpersisted: IdMap<SeriesKey>,
    head: Head,
    /// The head being flushed, visible to queries until its segment is
    /// installed. Only set while a flush runs.
    frozen: Option<Arc<Head>>,
    /// Installed segments, oldest first.
    segments: Vec<Arc<Segment>>,
    /// Latest point per series over the installed segments.
    flushed_latest: IdMap<Point>,
    durable_marker: u64,
}

/// Series that a flush defines in the series file, ascending by id.
type Definitions = Vec<(SeriesId, SeriesKey)>;

/// State that only the holder of the maintenance lock uses.
struct Maintenance {
    series_log: SeriesLog,
    next_segment_seq: u64,
    /// Series deleted since open whose points may still be in segments.
    /// Compaction leaves them out. Series deleted before open were already
    /// dropped from the segment indexes at open.
    deleted_ids: HashSet<SeriesId>,
}

impl Store {
    /// Opens or creates the store in `dir` and recovers it as described in
    /// the crate documentation.
    ///
    /// Fails with [`StoreError::Locked`] when another `Store` has `dir` open,
    /// and with [`StoreError::Corrupt`] when the series file is damaged in a
    /// way that a crash cannot explain.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store, StoreError> {
        let started = Instant::now();
        fs::create_dir_all(dir).context("create store directory", dir)?;
        let lock_file = lock_directory(dir)?;
        remove_temp_files(dir)?;

        let (series_log, loaded) = SeriesLog::open(dir)?;
        let mut catalog = Catalog::default();
        for (id, key) in &loaded.live {
            if let Some(existing) = catalog.insert(key, *id) {
                return Err(StoreError::corrupt(
                    &dir.join(crate::series_log::SERIES_FILE_NAME),
                    format!(
                        "series {key:?} is defined with ids {} and {}",
                        existing.0, id.0
                    ),
                ));
            }
        }

        let recovered = recover_segments(dir, &loaded)?;
        let mut flushed_latest: IdMap<Point> = IdMap::default();
        for segment in &recovered.segments {
            for (id, entry) in &segment.index {
                update_latest(&mut flushed_latest, *id, entry.max_ts, &entry.last_value);
            }
        }

        tracing::info!(
            dir = %dir.display(),
            segments = recovered.segments.len(),
            series = loaded.live.len(),
            durable_marker = recovered.durable_marker,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened time-series store"
        );

        let state = State {
            catalog,
            next_series_id: loaded.max_id + 1,
            unpersisted: IdMap::default(),
            head: Head::default(),
            frozen: None,
            segments: recovered.segments.into_iter().map(Arc::new).collect(),
            flushed_latest,
            durable_marker: recovered.durable_marker,
        };
        let maintenance = Maintenance {
            series_log,
            next_segment_seq: recovered.max_seq + 1,
            deleted_ids: HashSet::new(),
        };
        Ok(Store {
            dir: dir.to_path_buf(),
            options,
            state: RwLock::new(state),
            maintenance: Mutex::new(maintenance),
            _lock_file: lock_file,
        })
    }

    /// Returns the marker passed to the last completed flush (0 for a new
    /// store). The server stores its ingest-log position here so that
    /// recovery replays the log from it.
    ///
    /// When open set damaged segments aside, this is the marker from before
    /// them until the next flush, so that a replay covers the lost points.
    pub fn durable_marker(&self) -> u64 {
        self.state.read().durable_marker
    }

    /// Adds points to the in-memory head. Not durable until [`Store::flush`].
    ///
    /// Last write wins per (series, timestamp): a later write of the same
    /// timestamp replaces the value, in the head and against flushed data.
    /// The batch is checked first and rejected whole with
    /// [`StoreError::InvalidArgument`] when a timestamp is outside the
    /// storable range, a float is NaN or infinite, or a name is longer than
    /// [`MAX_NAME_LEN`].
    pub fn write(
        &self,
        tenant: &str,
        device: &str,
        points: &[(&str, TimestampNs, Value)],
    ) -> Result<(), StoreError> {
        validate_name("tenant", tenant)?;
        validate_name("device", device)?;
        for (key, ts, value) in points {
            validate_point(key, *ts, value)?;
        }
        if points.is_empty() {
            return Ok(());
        }

        let mut guard = self.state.write();
        let State {
            catalog,
            next_series_id,
            unpersisted,
            head,
            ..
        } = &mut *guard;
        let keys = catalog.device_entry(tenant, device);

        for (key, ts, value) in points {
            let id = match keys.get(*key) {
                Some(id) => *id,
                None => {
                    let id = SeriesId(*next_series_id);
                    *next_series_id += 1;
                    keys.insert((*key).to_owned(), id);
                    unpersisted.insert(id, SeriesKey::new(tenant, device, *key));
                    id
                }
            };
            head.push(id, *ts, value.clone());
        }
        Ok(())
    }

    /// Returns the estimated heap bytes of the head, which the caller
    /// compares with [`StoreOptions::head_budget_bytes`]. A frozen head that
    /// is being flushed is not included.
    pub fn head_bytes(&self) -> usize {
        self.state.read().head.bytes()
    }

    /// Returns true when [`Store::head_bytes`] has reached the head budget.
    pub fn needs_flush(&self) -> bool {
        self.head_bytes() >= self.options.head_budget_bytes
    }

    /// Persists the head as one immutable segment file (write to a temporary
    /// file, fsync, rename, fsync the directory), records `marker` with it,
    /// then drops that head from memory.
    ///
    /// Writes that arrive meanwhile go to a fresh head and are not blocked
    /// by the disk write. Queries see the frozen head until the segment is
    /// installed. With an empty head the call only records `marker` (as an
    /// empty segment), and does nothing when `marker` is already the durable
    /// one. On error the frozen points go back into the head, so a later
    /// flush retries them.
    ///
    /// When the segment count then exceeds [`StoreOptions::max_segments`],
    /// all segments are compacted into one before returning. A compaction
    /// failure is logged and does not fail the flush, whose segment is
    /// already durable.
    pub fn flush(&self, marker: u64) -> Result<(), StoreError> {
        let mut maintenance = self.maintenance.lock();
        let Some((frozen, definitions)) = self.freeze_head(marker) else {
            return Ok(());
        };

        let seq = maintenance.next_segment_seq;
        maintenance.next_segment_seq += 1;
        let started = Instant::now();
        let written = self.write_head_segment(
            &mut maintenance.series_log,
            seq,
            &frozen,
            &definitions,
            marker,
        );
        let segment = match written {
            Ok(segment) => segment,
            Err(err) => {
                drop(frozen);
                self.unfreeze_head();
                return Err(err);
            }
        };
        tracing::debug!(
            seq,
            marker,
            series = segment.index.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flushed head to segment"
        );
        self.install_flushed_segment(segment, &frozen, &definitions, marker);
        drop(frozen);

        // NOTE: compaction rewrites every segment each time the count exceeds
        // `max_segments`, so its cost grows with the size of the store.
        let segment_count = self.state.read().segments.len();
        if segment_count > self.options.max_segments.max(1)
            && let Err(err) = self.compact_locked(&mut maintenance)
        {
            tracing::error!(
                error = %err,
                segments = segment_count,
                "compaction failed; the flushed data is durable and compaction is retried after the next flush"
            );
        }
        Ok(())
    }

    /// Merges all segments into one now, with last-write-wins, and deletes
    /// the old files once the new one is durable. Flush does this on its own
    /// when there are more than `max_segments` segments.
    pub fn compact(&self) -> Result<(), StoreError> {
        let mut maintenance = self.maintenance.lock();
        self.compact_locked(&mut maintenance)
    }

    /// Returns the latest point of every key of a device, sorted by key.
    /// "Latest" is the greatest timestamp. Served from memory in O(keys).
    pub fn latest(&self, tenant: &str, device: &str) -> Vec<(String, TimestampNs, Value)> {
        let state = self.state.read();
        let Some(keys) = state.catalog.device(tenant, device) else {
            return Vec::new();
        };

        let mut latest: Vec<(String, TimestampNs, Value)> = keys
            .iter()
            .filter_map(|(key, id)| {
                let (ts, value) = state.latest_point(*id)?;
                Some((key.clone(), ts, value.clone()))
            })
            .collect();
        latest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        latest
    }

    /// Returns the keys of a device that have at least one point, sorted.
    pub fn keys(&self, tenant: &str, device: &str) -> Vec<String> {
        let state = self.state.read();
        let Some(keys) = state.catalog.device(tenant, device) else {
            return Vec::new();
        };

        let mut names: Vec<String> = keys
            .iter()
            .filter(|(_, id)| state.latest_point(**id).is_some())
            .map(|(key, _)| key.clone())
            .collect();
        names.sort_unstable();
        names
    }

    /// Returns raw points with `start <= ts < end`, ascending, at most
    /// `limit`.
    ///
    /// With `after` set, the page starts strictly after that timestamp (the
    /// cursor is the timestamp of the last point of the previous page).
    /// `has_more` is true when the range contains more points after the
    /// page.
    pub fn range(
        &self,
        series: &SeriesKey,
        start: TimestampNs,
        end: TimestampNs,
        after: Option<TimestampNs>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        let lo = match after {
            Some(after) => start.max(after.saturating_add(1)),
            None => start,
        };
        let mut merged = self.merged_points(series, lo, end);

        let mut points = Vec::with_capacity(limit.min(1024));
        while points.len() < limit {
            match merged.next_point()? {
                Some(point) => points.push(point),
                None => {
                    return Ok(RangePage {
                        points,
                        has_more: false,
                    });
                }
            }
        }
        let has_more = merged.next_point()?.is_some();
        Ok(RangePage { points, has_more })
    }

    /// Aggregates the points of a series into the buckets
    /// `[start + i*interval, min(start + (i+1)*interval, end))` for `i` in
    /// `0..ceil((end - start) / interval)`. Returns every bucket, including
    /// empty ones, labelled with its start.
    ///
    /// The caller bounds the bucket count: the store allocates all buckets.
    /// `start >= end` gives no buckets; `interval <= 0` is rejected with
    /// [`StoreError::InvalidArgument`].
    pub fn aggregate(
        &self,
        series: &SeriesKey,
        start: TimestampNs,
        end: TimestampNs,
        interval: i64,
    ) -> Result<Vec<Bucket>, StoreError> {
        if interval <= 0 {
            return Err(StoreError::InvalidArgument(format!(
                "aggregate interval must be positive, got {interval}"
            )));
        }
        if start >= end {
            return Ok(Vec::new());
        }

        // i128 because `end - start` can exceed i64::MAX.
        let span = i128::from(end) - i128::from(start);
        let interval_wide = i128::from(interval);
        let bucket_count =
            usize::try_from((span + interval_wide - 1) / interval_wide).map_err(|_| {
                StoreError::InvalidArgument(format!(
                    "aggregate over {span} ns in steps of {interval} ns has too many buckets"
                ))
            })?;
        let mut buckets: Vec<Bucket> = (0..bucket_count)
            .map(|i| {
                let bucket_start = i128::from(start) + i as i128 * interval_wide;
                Bucket::empty(bucket_start as TimestampNs)
            })
            .collect();

        let mut merged = self.merged_points(series, start, end);
        while let Some((ts, value)) = merged.next_point()? {
            let index = ((i128::from(ts) - i128::from(start)) / interval_wide) as usize;
            buckets[index].add(ts, value);
        }
        Ok(buckets)
    }

    /// Deletes all points and keys of a device. Durable when it returns
    /// `Ok`. A later write to the device starts new series.
    ///
    /// Blocks writes for one append and sync of the series file, and waits
    /// for a running flush or compaction. Disk space is reclaimed by the
    /// next compaction.
    pub fn delete_device(&self, tenant: &str, device: &str) -> Result<(), StoreError> {
        let mut maintenance = self.maintenance.lock();
        let mut state = self.state.write();
        let Some(keys) = state.catalog.device(tenant, device) else {
            return Ok(());
        };
        let ids: Vec<SeriesId> = keys.values().copied().collect();

        // Series that never reached the series file have nothing on disk.
        let records: Vec<SeriesRecord<'_>> = ids
            .iter()
            .filter(|id| !state.unpersisted.contains_key(id))
            .map(|id| SeriesRecord::Delete(*id))
            .collect();
        maintenance.series_log.append(&records)?;

        state.catalog.remove_device(tenant, device);
        for id in &ids {
            state.head.remove(*id);
            state.flushed_latest.remove(id);
            state.unpersisted.remove(id);
        }
        drop(state);

        tracing::info!(tenant, device, series = ids.len(), "deleted device data");
        maintenance.deleted_ids.extend(ids);
        Ok(())
    }

    /// Moves the head aside as the frozen head. Returns it with the
    /// definitions of its series that the series file still lacks, or `None`
    /// when there is nothing to flush.
    fn freeze_head(&self, marker: u64) -> Option<(Arc<Head>, Definitions)> {
        let mut state = self.state.write();
        if state.head.is_empty() && marker == state.durable_marker {
            return None;
        }

        let frozen = Arc::new(std::mem::take(&mut state.head));
        let mut definitions: Definitions = state
            .unpersisted
            .iter()
            .filter(|(id, _)| frozen.get(**id).is_some())
            .map(|(id, key)| (*id, key.clone()))
            .collect();
        definitions.sort_unstable_by_key(|(id, _)| *id);
        state.frozen = Some(Arc::clone(&frozen));
        Some((frozen, definitions))
    }

    /// Puts the frozen head back in front of the head after a failed flush.
    /// The caller must have dropped its reference to the frozen head.
    fn unfreeze_head(&self) {
        let mut state = self.state.write();
        let Some(frozen) = state.frozen.take() else {
            return;
        };
        let mut restored = Arc::unwrap_or_clone(frozen);
        restored.append(std::mem::take(&mut state.head));
        state.head = restored;
    }

    fn write_head_segment(
        &self,
        series_log: &mut SeriesLog,
        seq: u64,
        frozen: &Head,
        definitions: &[(SeriesId, SeriesKey)],
        marker: u64,
    ) -> Result<Segment, StoreError> {
        // Definitions must be durable before a segment refers to their ids.
        let records: Vec<SeriesRecord<'_>> = definitions
            .iter()
            .map(|(id, key)| SeriesRecord::Define(*id, key))
            .collect();
        series_log.append(&records)?;

        let mut ids: Vec<SeriesId> = frozen.series().map(|(id, _)| id).collect();
        ids.sort_unstable();

        let mut writer = SegmentWriter::create(&self.dir, seq)?;
        for id in ids {
            let series = frozen.get(id).expect("id listed from the same head");
            let points = series.sorted_view(ALL_LO, ALL_END);
            writer.write_series(id, points.into_iter().map(Ok))?;
        }
        writer.finish(marker, None)
    }

    fn install_flushed_segment(
        &self,
        segment: Segment,
        frozen: &Head,
        definitions: &[(SeriesId, SeriesKey)],
        marker: u64,
    ) {
        let mut state = self.state.write();
        for (id, series) in frozen.series() {
            if let Some((ts, value)) = series.latest() {
                update_latest(&mut state.flushed_latest, id, *ts, value);
            }
        }
        for (id, _) in definitions {
            state.unpersisted.remove(id);
        }
        state.segments.push(Arc::new(segment));
        state.frozen = None;
        state.durable_marker = marker;
    }

    fn compact_locked(&self, maintenance: &mut Maintenance) -> Result<(), StoreError> {
        let inputs: Vec<Arc<Segment>> = self.state.read().segments.clone();
        if inputs.len() < 2 {
            return Ok(());
        }
        let started = Instant::now();

        let mut ids: Vec<SeriesId> = inputs
            .iter()
            .flat_map(|segment| segment.index.keys().copied())
            .filter(|id| !maintenance.deleted_ids.contains(id))
            .collect();
        ids.sort_unstable();
        ids.dedup();

        let seq = maintenance.next_segment_seq;
        maintenance.next_segment_seq += 1;
        let mut writer = SegmentWriter::create(&self.dir, seq)?;
        let mut damaged: HashSet<u64> = HashSet::new();
        for id in ids {
            let sources = inputs
                .iter()
                .filter_map(|segment| Source::segment(segment, id, ALL_LO, ALL_END, true))
                .collect();
            let mut merged = MergedPoints::new(sources);
            writer.write_series(id, std::iter::from_fn(|| merged.next_point().transpose()))?;
            damaged.extend(merged.damaged_segments());
        }

        let first = inputs.first().expect("at least two inputs");
        let last = inputs.last().expect("at least two inputs");
        let compacted = Arc::new(writer.finish(last.marker, Some((first.seq, last.seq)))?);

        {
            let mut state = self.state.write();
            // Only maintenance-lock holders change the segment list, so the
            // inputs are still its prefix.
            debug_assert!(
                state
                    .segments
                    .iter()
                    .zip(&inputs)
                    .all(|(a, b)| Arc::ptr_eq(a, b)),
                "segment list changed during compaction"
            );
            state
                .segments
                .splice(0..inputs.len(), [Arc::clone(&compacted)]);
            if !damaged.is_empty() {
                // Skipped blocks may have held a cached latest point.
                state.flushed_latest.clear();
                for (id, entry) in &compacted.index {
                    state
                        .flushed_latest
                        .insert(*id, (entry.max_ts, entry.last_value.clone()));
                }
            }
        }
        maintenance.deleted_ids.clear();

        for input in &inputs {
            let result = if damaged.contains(&input.seq) {
                set_aside(&self.dir, &input.path)
            } else {
                fs::remove_file(&input.path).context("delete compacted segment", &input.path)
            };
            if let Err(err) = result {
                // The next open deletes superseded segments.
                tracing::warn!(error = %err, "could not remove a compacted segment");
            }
        }
        fsio_sync_dir(&self.dir);

        tracing::info!(
            inputs = inputs.len(),
            seq,
            series = compacted.index.len(),
            damaged_inputs = damaged.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted segments"
        );
        Ok(())
    }

    /// Collects the sources of one series for `lo <= ts < end`. Head points
    /// are copied under the read lock; segment blocks are read later,
    /// without the lock.
    fn merged_points(&self, series: &SeriesKey, lo: TimestampNs, end: TimestampNs) -> MergedPoints {
        if lo >= end {
            return MergedPoints::empty();
        }
        let state = self.state.read();
        let Some(id) = state.catalog.get(series) else {
            return MergedPoints::empty();
        };

        let mut sources: Vec<Source> = state
            .segments
            .iter()
            .filter_map(|segment| Source::segment(segment, id, lo, end, false))
            .collect();
        let heads = [state.frozen.as_deref(), Some(&state.head)];
        for head in heads.into_iter().flatten() {
            if let Some(head_series) = head.get(id) {
                let points = head_series.sorted_points(lo, end);
                if !points.is_empty() {
                    sources.push(Source::memory(points));
                }
            }
        }
        MergedPoints::new(sources)
    }
}

impl State {
    /// Latest point of a series over segments, frozen head and head; the
    /// newer source wins for equal timestamps.
    fn latest_point(&self, id: SeriesId) -> Option<(TimestampNs, &Value)> {
        let mut best = self.flushed_latest.get(&id).map(|(ts, value)| (*ts, value));
        let heads = [self.frozen.as_deref(), Some(&self.head)];
        for head in heads.into_iter().flatten() {
            if let Some((ts, value)) = head.get(id).and_then(|series| series.latest())
                && best.is_none_or(|(best_ts, _)| *ts >= best_ts)
            {
                best = Some((*ts, value));
            }
        }
        best
    }
}

fn update_latest(latest: &mut IdMap<Point>, id: SeriesId, ts: TimestampNs, value: &Value) {
    match latest.get_mut(&id) {
        Some(current) if current.0 > ts => {}
        Some(current) => *current = (ts, value.clone()),
        None => {
            latest.insert(id, (ts, value.clone()));
        }
    }
}

fn validate_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name.len() > MAX_NAME_LEN {
        return Err(StoreError::InvalidArgument(format!(
            "{what} name is {} bytes, longer than the maximum of {MAX_NAME_LEN}",
            name.len()
        )));
    }
    Ok(())
}

fn validate_point(key: &str, ts: TimestampNs, value: &Value) -> Result<(), StoreError> {
    validate_name("key", key)?;
    if !is_storable_timestamp(ts) {
        return Err(StoreError::InvalidArgument(format!(
            "timestamp {ts} of key {key:?} is outside the storable range"
        )));
    }
    if let Value::Float(v) = value
        && !v.is_finite()
    {
        return Err(StoreError::InvalidArgument(format!(
            "value of key {key:?} at {ts} is {v}, only finite floats are stored"
        )));
    }
    Ok(())
}

fn lock_directory(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .context("open", &path)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StoreError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(err)) => Err(io_error("lock", &path, err)),
    }
}

/// Deletes segments that a crash left half-written.
fn remove_temp_files(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).context("list", dir)? {
        let entry = entry.context("list", dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(segment_name) = name.strip_suffix(TEMP_SUFFIX) else {
            continue;
        };
        if parse_segment_file_name(segment_name).is_some() {
            let path = entry.path();
            tracing::info!(path = %path.display(), "deleting unfinished segment left by a crash");
            fs::remove_file(&path).context("delete", &path)?;
        }
    }
    Ok(())
}

/// Moves a file into `corrupt/`, adding a numeric suffix when a file of the
/// same name is already there.
fn set_aside(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let corrupt_dir = dir.join(CORRUPT_DIR_NAME);
    fs::create_dir_all(&corrupt_dir).context("create", &corrupt_dir)?;
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();

    let mut target = corrupt_dir.join(&name);
    let mut suffix = 1;
    while target.exists() {
        target = corrupt_dir.join(format!("{name}.{suffix}"));
        suffix += 1;
    }
    fs::rename(path, &target).context("move damaged file to", &target)?;
    fsio_sync_dir(&corrupt_dir);
    Ok(())
}

/// Syncs a directory after deletions and moves that are not needed for
/// correctness (a repeat at the next open is harmless), logging failures.
fn fsio_sync_dir(dir: &Path) {
    if let Err(err) = crate::fsio::sync_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %err, "directory sync failed");
    }
}

struct RecoveredSegments {
    /// Intact segments, oldest first.
    segments: Vec<Segment>,
    /// Largest sequence number seen in the directory, so new segments sort
    /// after every file ever created there.
    max_seq: u64,
    durable_marker: u64,
}

/// Opens all segments, sets aside damaged ones, deletes superseded ones and
/// computes the durable marker (steps 3 to 5 of recovery).
fn recover_segments(dir: &Path, loaded: &LoadedSeries) -> Result<RecoveredSegments, StoreError> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).context("list", dir)? {
        let entry = entry.context("list", dir)?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            files.push((seq, entry.path()));
        }
    }
    files.sort_unstable_by_key(|(seq, _)| *seq);
    let mut max_seq = files.last().map_or(0, |(seq, _)| *seq);

    let mut intact: Vec<Segment> = Vec::new();
    let mut damaged: Vec<(u64, PathBuf, String)> = Vec::new();
    for (seq, path) in files {
        match Segment::open(path.clone(), seq) {
            Ok(segment) => match undefined_series(&segment, loaded) {
                None => intact.push(segment),
                Some(id) => damaged.push((
                    seq,
                    path,
                    format!(
                        "refers to series id {} that the series file does not define",
                        id.0
                    ),
                )),
            },
            Err(StoreError::Corrupt { detail, .. }) => damaged.push((seq, path, detail)),
            Err(err) => return Err(err),
        }
    }

    // Compaction outputs whose inputs are still present (crash before the
    // inputs were deleted).
    let compactions: Vec<(u64, u64, u64)> = intact
        .iter()
        .filter_map(|segment| {
            segment
                .compacted_from
                .map(|(first, last)| (first, last, segment.seq))
        })
        .collect();
    let superseded = |seq: u64| {
        compactions
            .iter()
            .any(|(first, last, output)| *first <= seq && seq <= *last && seq < *output)
    };

    let mut kept = Vec::with_capacity(intact.len());
    for mut segment in intact {
        if superseded(segment.seq) {
            tracing::info!(path = %segment.path.display(), "deleting segment superseded by a compaction");
            fs::remove_file(&segment.path).context("delete", &segment.path)?;
            continue;
        }
        segment.index.retain(|id, _| !loaded.deleted.contains(id));
        kept.push(segment);
    }

    let mut oldest_lost: Option<u64> = None;
    for (seq, path, detail) in damaged {
        if superseded(seq) {
            tracing::info!(path = %path.display(), detail, "setting aside damaged segment superseded by a compaction");
        } else {
            tracing::warn!(
                path = %path.display(),
                detail,
                "setting aside damaged segment; its points are lost unless the ingest log still contains them"
            );
            oldest_lost = Some(oldest_lost.map_or(seq, |oldest| oldest.min(seq)));
        }
        set_aside(dir, &path)?;
    }
    fsio_sync_dir(dir);

    let durable_marker = match oldest_lost {
        None => kept.last().map_or(0, |segment| segment.marker),
        Some(lost_seq) => {
            let marker = kept
                .iter()
                .rev()
                .find(|segment| segment.seq < lost_seq)
                .map_or(0, |segment| segment.marker);
            // Record the reverted marker, so that a restart before the next
            // flush still replays the lost range.
            max_seq += 1;
            let empty = SegmentWriter::create(dir, max_seq)?.finish(marker, None)?;
            kept.push(empty);
            tracing::warn!(
                durable_marker = marker,
                "durable marker moved back to before the damaged segments"
            );
            marker
        }
    };

    Ok(RecoveredSegments {
        segments: kept,
        max_seq,
        durable_marker,
    })
}

/// Returns a series id of the segment that is neither live nor deleted.
fn undefined_series(segment: &Segment, loaded: &LoadedSeries) -> Option<SeriesId> {
    segment
        .index
        .keys()
        .find(|id| !loaded.live.contains_key(id) && !loaded.deleted.contains(id))
        .copied()
}
