//! The `Store`: write path, flush, background compaction and retention,
//! queries and recovery at open. Invariants and file formats are described
//! in the crate documentation.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use ferrite_core::{TimestampNs, Value, is_storable_timestamp};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::catalog::{Catalog, IdMap, NO_TENANT, SeriesId, heap_bytes, table_bytes};
use crate::cipher::Sealing;
use crate::encoding::Point;
use crate::error::{IoContext, StoreError, io_error};
use crate::head::Head;
use crate::item::StoredValue;
use crate::merge::{MergedPoints, Source};
use crate::segment::{
    Partition, SealWith, Segment, SegmentMeta, SegmentWriter, TEMP_SUFFIX, TenantNames,
    damaged_segment_marker_from, parse_segment_file_name, probe_tier,
};
use crate::series_log::{LoadedSeries, SeriesLog, SeriesRecord};
mod retention;
mod rollup;

use retention::{Cutoffs, RetentionRules};

use crate::{
    Bucket, MAX_NAME_LEN, MIN_HEAD_BUDGET_BYTES, MemoryUsage, RangePage, Retention, SeriesKey,
    StoreOptions, marker,
};

const LOCK_FILE_NAME: &str = "LOCK";
const CORRUPT_DIR_NAME: &str = "corrupt";

/// Query bounds that cover every storable timestamp: `i64::MAX` is not
/// storable, so the half-open range `[i64::MIN, i64::MAX)` misses nothing.
const ALL_LO: TimestampNs = TimestampNs::MIN;
const ALL_END: TimestampNs = TimestampNs::MAX;

/// Embedded time-series store. See the crate documentation.
pub struct Store {
    inner: Arc<Inner>,
    /// Background compaction and retention, stopped on drop.
    maintenance_thread: Option<JoinHandle<()>>,
}

struct Inner {
    dir: PathBuf,
    /// Settings given to open, with `retention` and `rollup_retention` moved
    /// into the fields below.
    options: StoreOptions,
    /// Retention of raw points; [`Store::set_retention`] replaces it.
    retention: RwLock<Arc<RetentionRules>>,
    /// Retention of each rollup tier, in tier order; missing tiers keep
    /// their rows forever.
    rollup_retention: Vec<RetentionRules>,
    state: RwLock<State>,
    /// Serialises flush and delete, which append to the series file.
    flush_lock: Mutex<SeriesLog>,
    /// Serialises compaction and retention passes.
    compaction_lock: Mutex<()>,
    /// Cipher from the options and counters of blocks it could not handle,
    /// shared with every segment.
    sealing: Arc<Sealing>,
    /// Next segment sequence number; flush and compaction both take numbers.
    next_seq: AtomicU64,
    /// [`MemoryUsage::fixed`] plus the open rows that a flush copies, as of
    /// the last flush, open or maintenance pass.
    fixed_bytes: AtomicUsize,
    /// Set while the fixed memory alone exceeds the memory budget, so that
    /// the warning is logged once per crossing.
    over_budget: AtomicBool,
    /// Wakes the maintenance thread and requests its stop.
    wake: (Mutex<WakeState>, Condvar),
    /// The locked `LOCK` file, released when the store is dropped.
    _lock_file: File,
}

#[derive(Default)]
struct WakeState {
    pending: bool,
    stop: bool,
}

/// In-memory state that readers and writers share.
struct State {
    catalog: Catalog,
    next_series_id: u64,
    /// Series created since open that the series file does not define yet,
    /// with their names. Flush writes their definitions.
    unpersisted: IdMap<SeriesKey>,
    /// Series deleted since open. Compaction leaves their points out; series
    /// deleted before open were dropped from the segment indexes at open.
    deleted: HashSet<SeriesId>,
    head: Head,
    /// The head being flushed, visible to queries until its segments are
    /// installed. Only set while a flush runs.
    frozen: Option<Arc<Head>>,
    /// Installed segments in ascending priority (ties by sequence number):
    /// for equal timestamps a later segment wins.
    segments: Vec<Arc<Segment>>,
    /// Segments of each rollup tier, ordered like `segments`.
    rollups: Vec<Vec<Arc<Segment<Bucket>>>>,
    /// Open rollup rows of every series (see the `rollup` module).
    open_rows: IdMap<rollup::OpenRows>,
    /// When each (tier, partition) last received a flushed segment, for
    /// the cold rule of compaction. Tier 0 is raw data.
    partition_touched: BTreeMap<(u8, Partition), Instant>,
    /// Latest point per series over the installed segments.
    flushed_latest: IdMap<Point>,
    durable_marker: u64,
}

/// Series that a flush defines in the series file, ascending by id.
type Definitions = Vec<(SeriesId, SeriesKey)>;

impl Store {
    /// Opens or creates the store in `dir` and recovers it as described in
    /// the crate documentation.
    ///
    /// Fails with [`StoreError::Locked`] when another `Store` has `dir` open,
    /// and with [`StoreError::Corrupt`] when the series file is damaged in a
    /// way that a crash cannot explain.
    pub fn open(dir: &Path, mut options: StoreOptions) -> Result<Store, StoreError> {
        if options.partition_ns <= 0 {
            return Err(StoreError::InvalidArgument(format!(
                "partition length must be positive, got {} ns",
                options.partition_ns
            )));
        }
        let intervals = &options.rollup_intervals;
        let valid_tiers = intervals.len() < 255
            && intervals.first().is_none_or(|first| *first > 0)
            && intervals
                .windows(2)
                .all(|pair| pair[1] > pair[0] && pair[1] % pair[0] == 0);
        if !valid_tiers {
            return Err(StoreError::InvalidArgument(format!(
                "rollup intervals {intervals:?} must be positive, ascending, and each a multiple of the one before"
            )));
        }
        let retention = RetentionRules::new(std::mem::take(&mut options.retention), "retention")?;
        let rollup_retention = std::mem::take(&mut options.rollup_retention)
            .into_iter()
            .enumerate()
            .map(|(tier, retention)| {
                RetentionRules::new(retention, &format!("retention of rollup tier {}", tier + 1))
            })
            .collect::<Result<Vec<_>, _>>()?;

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

        let sealing = Sealing::new(options.cipher.clone(), options.seal_writes);
        let mut recovered = recover_segments(dir, &loaded, &sealing)?;

        tracing::info!(
            dir = %dir.display(),
            segments = recovered.segments.len(),
            series = loaded.live.len(),
            durable_marker = recovered.durable_marker,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "opened time-series store"
        );

        // Rollups are usable when they were built for the configured
        // intervals; otherwise they are built again from the raw points.
        let tiers_file = dir.join(ROLLUP_FILE_NAME);
        let configured = rollup_description(&options.rollup_intervals);
        let recorded = fs::read_to_string(&tiers_file).ok();
        let has_data = !recovered.segments.is_empty() || !recovered.rollups.is_empty();
        // Damaged segments are rebuilt too: rows must agree with the raw
        // points that are left.
        let outdated = recorded.as_deref() != Some(configured.as_str());
        let rebuild = has_data && (outdated || recovered.damaged);
        if rebuild || outdated {
            for segment in recovered.rollups.drain(..) {
                fs::remove_file(&segment.path)
                    .context("delete outdated rollup segment", &segment.path)?;
            }
        }

        let now = Instant::now();
        let partition_touched = recovered
            .segments
            .iter()
            .map(|segment| ((0, segment.meta.partition), now))
            .chain(
                recovered
                    .rollups
                    .iter()
                    .map(|segment| ((segment.meta.tier, segment.meta.partition), now)),
            )
            .collect();
        let mut segments: Vec<Arc<Segment>> =
            recovered.segments.into_iter().map(Arc::new).collect();
        sort_by_priority(&mut segments);
        let flushed_latest = latest_of_segments(&segments, &|id| loaded.deleted.contains(&id))?;
        let mut rollups: Vec<Vec<Arc<Segment<Bucket>>>> =
            vec![Vec::new(); options.rollup_intervals.len()];
        for segment in recovered.rollups {
            let tier = usize::from(segment.meta.tier) - 1;
            match rollups.get_mut(tier) {
                Some(list) => list.push(Arc::new(segment)),
                None => {
                    tracing::warn!(path = %segment.path.display(), "ignoring a segment of an unknown rollup tier")
                }
            }
        }
        let mut open_rows: IdMap<rollup::OpenRows> = IdMap::default();
        for (tier, list) in rollups.iter_mut().enumerate() {
            sort_by_priority(list);
            for segment in list.iter() {
                for entry in segment.entries() {
                    let (id, entry) = entry?;
                    if loaded.deleted.contains(&id) {
                        continue;
                    }
                    let rows = open_rows
                        .entry(id)
                        .or_insert_with(|| vec![None; options.rollup_intervals.len()].into());
                    if rows[tier]
                        .as_ref()
                        .is_none_or(|row| row.start() <= entry.max_ts)
                    {
                        let Some(mut row) = segment.last_value(&entry)? else {
                            continue;
                        };
                        row.start = entry.max_ts;
                        rows[tier] = Some(rollup::CompactRow::new(row));
                    }
                }
            }
        }
        let state = State {
            catalog,
            next_series_id: loaded.max_id + 1,
            unpersisted: IdMap::default(),
            // Segments keep the points of deleted series until compaction
            // drops them.
            deleted: loaded.deleted.iter().copied().collect(),
            head: Head::default(),
            frozen: None,
            segments,
            rollups,
            open_rows,
            partition_touched,
            flushed_latest,
            durable_marker: recovered.durable_marker,
        };
        let background = options.background_maintenance;
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            options,
            retention: RwLock::new(Arc::new(retention)),
            rollup_retention,
            state: RwLock::new(state),
            flush_lock: Mutex::new(series_log),
            compaction_lock: Mutex::new(()),
            sealing,
            next_seq: AtomicU64::new(recovered.max_seq + 1),
            fixed_bytes: AtomicUsize::new(0),
            over_budget: AtomicBool::new(false),
            wake: (Mutex::new(WakeState::default()), Condvar::new()),
            _lock_file: lock_file,
        });

        if rebuild {
            let started = Instant::now();
            inner.rebuild_rollups()?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "built rollup tiers from raw points"
            );
        }
        if recorded.as_deref() != Some(configured.as_str()) {
            write_file_durably(dir, ROLLUP_FILE_NAME, configured.as_bytes())?;
        }
        inner.refresh_fixed_bytes();

        let maintenance_thread = if background {
            let inner = Arc::clone(&inner);
            let handle = std::thread::Builder::new()
                .name("tsdb-maintenance".into())
                .spawn(move || inner.maintenance_loop())
                .map_err(|err| io_error("start maintenance thread for", dir, err))?;
            Some(handle)
        } else {
            None
        };
        Ok(Store {
            inner,
            maintenance_thread,
        })
    }

    /// Number of sealed blocks that queries and compaction skipped since
    /// open because they did not open: their tenant key is gone (a deleted
    /// tenant), the store has no cipher, or the block was altered.
    pub fn unreadable_blocks(&self) -> u64 {
        self.inner.sealing.unreadable_blocks.load(Ordering::Relaxed)
    }

    /// Number of series whose points a flush or compaction dropped since
    /// open because the cipher had no key for their tenant.
    pub fn unsealable_series(&self) -> u64 {
        self.inner.sealing.unsealable_series.load(Ordering::Relaxed)
    }

    /// Returns the marker passed to the last completed flush (0 for a new
    /// store). The server stores its ingest-log position here so that
    /// recovery replays the log from it.
    ///
    /// When open set damaged segments aside, this is a marker from before
    /// them until the next flush, so that a replay covers the lost points.
    pub fn durable_marker(&self) -> u64 {
        self.inner.state.read().durable_marker
    }

    /// Adds points to the in-memory head. Not durable until [`Store::flush`].
    ///
    /// Last write wins per (series, timestamp): a later write of the same
    /// timestamp replaces the value, in the head and against flushed data.
    /// The batch is checked first and rejected whole with
    /// [`StoreError::InvalidArgument`] when a timestamp is outside the
    /// storable range, a float is NaN or infinite, or a name is longer than
    /// [`MAX_NAME_LEN`]. Points older than the device's retention are
    /// accepted and expire at once: the caller rejects them before they
    /// reach the store when the sender must get an error.
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

        let mut guard = self.inner.state.write();
        let State {
            catalog,
            next_series_id,
            unpersisted,
            head,
            ..
        } = &mut *guard;
        let keys = catalog.device_entry(tenant, device);

        let mut added = Vec::new();
        let mut added_key_bytes = 0;
        for (key, ts, value) in points {
            let id = match keys.get(*key) {
                Some(id) => *id,
                None => {
                    let id = SeriesId(*next_series_id);
                    *next_series_id += 1;
                    keys.insert((*key).to_owned(), id);
                    unpersisted.insert(id, SeriesKey::new(tenant, device, *key));
                    added.push(id);
                    added_key_bytes += heap_bytes(key.len());
                    id
                }
            };
            head.push(id, *ts, value.clone());
        }
        if !added.is_empty() {
            let number = catalog.tenant_number(tenant);
            for id in added {
                catalog.set_tenant(id, number);
            }
            catalog.note_added_keys(added_key_bytes);
        }
        Ok(())
    }

    /// Returns the estimated heap bytes of the head, which the caller
    /// compares with [`StoreOptions::head_budget_bytes`]. A frozen head that
    /// is being flushed is not included.
    pub fn head_bytes(&self) -> usize {
        self.inner.state.read().head.bytes()
    }

    /// Returns true when [`Store::head_bytes`] has reached [`Store::head_budget`].
    pub fn needs_flush(&self) -> bool {
        self.head_bytes() >= self.head_budget()
    }

    /// Head size at which to flush: [`StoreOptions::head_budget_bytes`], or
    /// less when the memory budget minus what the series need leaves less
    /// room for the head and the frozen head of a flush.
    pub fn head_budget(&self) -> usize {
        self.inner.head_budget()
    }

    /// Estimates the memory of the store by part. Walks the name index, so
    /// call it for metrics, not per write.
    pub fn memory_usage(&self) -> MemoryUsage {
        self.inner.memory_usage()
    }

    /// Persists the head as immutable segment files, one per time partition
    /// it touches (each written to a temporary file, fsynced and renamed),
    /// then records `marker` in the durable-marker file and drops that head
    /// from memory. The flush is durable once the marker file names
    /// `marker`.
    ///
    /// Writes that arrive meanwhile go to a fresh head and are not blocked
    /// by the disk writes. Queries see the frozen head until its segments
    /// are installed. With an empty head the call only records `marker`, and
    /// does nothing when `marker` is already the durable one. On error the
    /// frozen points go back into the head, so a later flush retries them;
    /// segments that were already renamed into place contain copies of points
    /// that stay in the head, which last-write-wins makes harmless.
    ///
    /// Compaction and retention run afterwards in the background thread.
    pub fn flush(&self, marker: u64) -> Result<(), StoreError> {
        self.inner.flush(marker)
    }

    /// Merges every partition that has more than one segment into a single
    /// segment now, drops points older than the retention, and waits until
    /// done. The background thread does the same step by step; this is for
    /// tools, tests and benchmarks that want the compacted state at once.
    pub fn compact(&self) -> Result<(), StoreError> {
        self.inner.maintain(true)
    }

    /// Runs one background maintenance pass now: retention, then the
    /// compactions that the policy selects.
    pub fn run_maintenance(&self) -> Result<(), StoreError> {
        self.inner.maintain(false)
    }

    /// Returns the latest point of every key of a device, sorted by key.
    /// "Latest" is the greatest timestamp. Served from memory in O(keys).
    /// Keys whose latest point is older than the retention are left out.
    pub fn latest(&self, tenant: &str, device: &str) -> Vec<(String, TimestampNs, Value)> {
        let cutoff = self.inner.cutoff(tenant, device);
        let state = self.inner.state.read();
        let Some(keys) = state.catalog.device(tenant, device) else {
            return Vec::new();
        };

        let mut latest: Vec<(String, TimestampNs, Value)> = keys
            .iter()
            .filter_map(|(key, id)| {
                let (ts, value) = state.latest_point(*id)?;
                (ts >= cutoff).then(|| (key.clone(), ts, value.clone()))
            })
            .collect();
        latest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        latest
    }

    /// Returns the keys of a device that have at least one point within the
    /// retention, sorted.
    pub fn keys(&self, tenant: &str, device: &str) -> Vec<String> {
        let cutoff = self.inner.cutoff(tenant, device);
        let state = self.inner.state.read();
        let Some(keys) = state.catalog.device(tenant, device) else {
            return Vec::new();
        };

        let mut names: Vec<String> = keys
            .iter()
            .filter(|(_, id)| state.latest_point(**id).is_some_and(|(ts, _)| ts >= cutoff))
            .map(|(key, _)| key.clone())
            .collect();
        names.sort_unstable();
        names
    }

    /// Returns raw points with `start <= ts < end`, ascending, at most
    /// `limit`. Points older than the retention are left out.
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
        let mut merged = self.inner.merged_points(series, lo, end);

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

        let mut merged = self.inner.merged_points(series, start, end);
        while let Some((ts, value)) = merged.next_point()? {
            let index = ((i128::from(ts) - i128::from(start)) / interval_wide) as usize;
            buckets[index].add(ts, value);
        }
        Ok(buckets)
    }

    /// Aggregates the points of a series into caller-defined buckets:
    /// `bounds` lists ascending, contiguous `[start, end)` ranges (calendar
    /// days in a time zone, for example). Returns one bucket per range.
    ///
    /// When every edge is a multiple of a rollup tier's interval, the
    /// coarsest such tier serves the query ([`Store::rollup_tier_for`] returns which);
    /// the result equals the raw result except for the rounding of sums.
    pub fn aggregate_buckets(
        &self,
        series: &SeriesKey,
        bounds: &[(TimestampNs, TimestampNs)],
    ) -> Result<Vec<Bucket>, StoreError> {
        let empty = || {
            bounds
                .iter()
                .map(|(start, _)| Bucket::empty(*start))
                .collect()
        };
        if bounds.is_empty() {
            return Ok(empty());
        }
        let tier = self.inner.choose_tier(bounds);
        let (id, head_min) = {
            let state = self.inner.state.read();
            let Some(id) = state.catalog.get(series) else {
                return Ok(empty());
            };
            let heads = [state.frozen.as_deref(), Some(&state.head)];
            let head_min = heads
                .into_iter()
                .flatten()
                .filter_map(|head| head.get(id).and_then(|series| series.min_ts()))
                .min()
                .unwrap_or(TimestampNs::MAX);
            (id, head_min)
        };
        let now = self.inner.now();
        let mut cutoffs = vec![self.inner.cutoff(&series.tenant, &series.device)];
        for tier in 0..self.inner.tier_count() {
            cutoffs.push(
                self.inner
                    .rollup_retention
                    .get(tier)
                    .map_or(TimestampNs::MIN, |rules| {
                        rules.device_cutoff(&series.tenant, &series.device, now)
                    }),
            );
        }
        self.inner.summarize(id, tier, bounds, head_min, &cutoffs)
    }

    /// Interval in nanoseconds of the rollup tier that serves
    /// [`Store::aggregate_buckets`] for these bounds; `None` for raw points.
    pub fn rollup_tier_for(&self, bounds: &[(TimestampNs, TimestampNs)]) -> Option<i64> {
        self.inner
            .choose_tier(bounds)
            .map(|tier| self.inner.options.rollup_intervals[tier])
    }

    /// Intervals of the rollup tiers, in nanoseconds.
    pub fn rollup_intervals(&self) -> &[i64] {
        &self.inner.options.rollup_intervals
    }

    /// Replaces the retention of raw points (rollup tiers keep theirs).
    /// Queries apply it at once. The maintenance pass that this call starts
    /// deletes the points it expires, as far as whole files and compaction
    /// allow (see the crate documentation).
    ///
    /// A cutoff never moves back in time. When the retention of a tenant or
    /// device gets longer, points already past its old cutoff stay expired,
    /// and only newer points are kept longer. A shorter retention applies
    /// to all points. This holds until the store is closed, because a store
    /// opened again starts from the retention in [`StoreOptions`].
    ///
    /// Fails with [`StoreError::InvalidArgument`], and changes nothing,
    /// when a duration is zero or negative.
    pub fn set_retention(&self, retention: Retention) -> Result<(), StoreError> {
        self.inner.set_retention(retention)
    }

    /// Returns the retention of raw points: the one given to
    /// [`Store::set_retention`] last, else the one given at open.
    pub fn retention(&self) -> Retention {
        self.inner.raw_retention().retention().clone()
    }

    /// Deletes all points and keys of a device. Durable when it returns
    /// `Ok`. A later write to the device starts new series.
    ///
    /// Blocks writes for one append and sync of the series file, and waits
    /// for a running flush. Disk space is reclaimed by later compactions.
    pub fn delete_device(&self, tenant: &str, device: &str) -> Result<(), StoreError> {
        self.inner.delete_device(tenant, device)
    }

    /// Number of segment files and their total size in bytes, for metrics.
    pub fn disk_usage(&self) -> (usize, u64) {
        let state = self.inner.state.read();
        let raw = state.segments.iter().map(|segment| segment.size);
        let rollups = state.rollups.iter().flatten().map(|segment| segment.size);
        let files = state.segments.len() + state.rollups.iter().map(Vec::len).sum::<usize>();
        (files, raw.chain(rollups).sum())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(handle) = self.maintenance_thread.take() {
            {
                let mut wake = self.inner.wake.0.lock();
                wake.stop = true;
            }
            self.inner.wake.1.notify_all();
            if handle.join().is_err() {
                tracing::error!("time-series maintenance thread panicked");
            }
        }
    }
}

impl Inner {
    fn now(&self) -> TimestampNs {
        (self.options.clock)()
    }

    fn take_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    fn flush(&self, marker: u64) -> Result<(), StoreError> {
        let mut series_log = self.flush_lock.lock();
        let Some((frozen, definitions, marker_from)) = self.freeze_head(marker) else {
            return Ok(());
        };

        let started = Instant::now();
        let written = crate::compress::fast_codings(|| {
            self.write_flush(&mut series_log, &frozen, &definitions, marker, marker_from)
        });
        let flushed = match written {
            Ok(flushed) => flushed,
            Err(err) => {
                drop(frozen);
                self.unfreeze_head();
                return Err(err);
            }
        };
        tracing::debug!(
            marker,
            segments = flushed.raw.len(),
            rollup_segments = flushed.rollups.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "flushed head"
        );
        self.install_flushed(flushed, &frozen, &definitions, marker);
        drop(frozen);
        drop(series_log);
        self.refresh_fixed_bytes();
        self.wake_maintenance();
        Ok(())
    }

    /// Moves the head aside as the frozen head. Returns it with the
    /// definitions of its series that the series file still lacks and the
    /// current durable marker, or `None` when there is nothing to flush.
    fn freeze_head(&self, marker: u64) -> Option<(Arc<Head>, Definitions, u64)> {
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
        Some((frozen, definitions, state.durable_marker))
    }

    /// Returns the sealing settings of new segments. With a cipher, it
    /// copies the tenant of every series id from the catalog. A flush or
    /// compaction writes only series that existed when it started, so
    /// series added later need not be in the copy.
    fn seal_with(&self) -> SealWith {
        let mut tenants = TenantNames::default();
        if self.sealing.write_cipher().is_some() {
            let state = self.state.read();
            tenants.by_id = state.catalog.tenants_by_id().to_vec();
            tenants.names = state.catalog.tenant_names().to_vec();
        }
        SealWith {
            sealing: self.sealing.clone(),
            tenants: Arc::new(tenants),
        }
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

    /// Writes one segment per partition of the frozen head, then the marker
    /// file.
    fn write_flush(
        &self,
        series_log: &mut SeriesLog,
        frozen: &Head,
        definitions: &[(SeriesId, SeriesKey)],
        marker: u64,
        marker_from: u64,
    ) -> Result<Flushed, StoreError> {
        let started = Instant::now();
        // Definitions must be durable before a segment refers to their ids.
        let records: Vec<SeriesRecord<'_>> = definitions
            .iter()
            .map(|(id, key)| SeriesRecord::Define(*id, key))
            .collect();
        series_log.append(&records)?;

        let mut ids: Vec<SeriesId> = frozen.series().map(|(id, _)| id).collect();
        ids.sort_unstable();

        // Sorted points of every series, split into runs by partition. Runs
        // are collected per partition first so that one segment file is
        // open at a time, however many partitions a backfill touches.
        let views: Vec<(SeriesId, Vec<&Point>)> = ids
            .into_iter()
            .map(|id| {
                let series = frozen.get(id).expect("id listed from the same head");
                (id, series.sorted_view(ALL_LO, ALL_END))
            })
            .collect();
        let mut runs: BTreeMap<Partition, Vec<(usize, usize, usize)>> = BTreeMap::new();
        for (view_index, (_, points)) in views.iter().enumerate() {
            let mut start = 0;
            while start < points.len() {
                let partition = Partition::of(points[start].0, self.options.partition_ns);
                let len = points[start..].partition_point(|p| p.0 < partition.end);
                runs.entry(partition)
                    .or_default()
                    .push((view_index, start, start + len));
                start += len;
            }
        }

        let seal = self.seal_with();
        let mut segments = Vec::with_capacity(runs.len());
        for (partition, series_runs) in runs {
            let seq = self.take_seq();
            let mut writer = SegmentWriter::create(&self.dir, seq, marker_from, &seal)?;
            for (view_index, start, end) in series_runs {
                let (id, points) = &views[view_index];
                writer.write_series(*id, points[start..end].iter().copied().map(Ok))?;
            }
            segments
                .push(writer.finish(marker, SegmentMeta::flushed(0, partition, seq, marker_from))?);
        }
        let raw_done = Instant::now();
        let rollup = self.fold_rollups(&views)?;
        let folded = Instant::now();
        let rollups = self.write_rollup_segments(rollup.rows, &rollup.open, marker, marker_from)?;
        tracing::debug!(
            raw_ms = (raw_done - started).as_millis() as u64,
            fold_ms = (folded - raw_done).as_millis() as u64,
            rollup_write_ms = folded.elapsed().as_millis() as u64,
            "flush phases"
        );
        marker::write(&self.dir, marker)?;
        Ok(Flushed {
            raw: segments,
            rollups,
            open_rows: rollup.open,
        })
    }

    fn install_flushed(
        &self,
        flushed: Flushed,
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
        let now = Instant::now();
        for segment in flushed.raw {
            state
                .partition_touched
                .insert((0, segment.meta.partition), now);
            // Flushed segments have the greatest priorities so far.
            state.segments.push(Arc::new(segment));
        }
        for segment in flushed.rollups {
            let tier = segment.meta.tier;
            state
                .partition_touched
                .insert((tier, segment.meta.partition), now);
            state.rollups[usize::from(tier) - 1].push(Arc::new(segment));
        }
        // Open rows change in the same step that removes the frozen head,
        // so no query counts a point in both.
        state.open_rows.extend(flushed.open_rows);
        state.frozen = None;
        state.durable_marker = marker;
    }

    fn delete_device(&self, tenant: &str, device: &str) -> Result<(), StoreError> {
        let mut series_log = self.flush_lock.lock();
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
        series_log.append(&records)?;

        state.catalog.remove_device(tenant, device);
        for id in &ids {
            state.head.remove(*id);
            state.open_rows.remove(id);
            state.flushed_latest.remove(id);
            state.unpersisted.remove(id);
            state.deleted.insert(*id);
        }
        drop(state);

        tracing::info!(tenant, device, series = ids.len(), "deleted device data");
        Ok(())
    }

    fn head_budget(&self) -> usize {
        let configured = self.options.head_budget_bytes;
        match self.options.memory_budget_bytes {
            None => configured,
            Some(budget) => {
                let left = budget.saturating_sub(self.fixed_bytes.load(Ordering::Relaxed));
                (left / 2).clamp(MIN_HEAD_BUDGET_BYTES.min(configured), configured)
            }
        }
    }

    fn memory_usage(&self) -> MemoryUsage {
        let state = self.state.read();
        let tiers = self.options.rollup_intervals.len();
        let segments = state
            .segments
            .iter()
            .map(|segment| segment.resident_bytes())
            .chain(
                state
                    .rollups
                    .iter()
                    .flatten()
                    .map(|segment| segment.resident_bytes()),
            )
            .sum();
        MemoryUsage {
            series: state
                .catalog
                .tenants_by_id()
                .iter()
                .filter(|t| **t != NO_TENANT)
                .count(),
            names: state.catalog.estimated_bytes()
                + table_bytes::<SeriesId, SeriesKey>(state.unpersisted.capacity()),
            latest: table_bytes::<SeriesId, Point>(state.flushed_latest.capacity()),
            open_rows: table_bytes::<SeriesId, rollup::OpenRows>(state.open_rows.capacity())
                + state.open_rows.len()
                    * heap_bytes(tiers * size_of::<Option<rollup::CompactRow>>()),
            segments,
            head: state.head.bytes(),
            frozen_head: state.frozen.as_ref().map_or(0, |frozen| frozen.bytes()),
        }
    }

    /// Recomputes the fixed memory that [`Inner::head_budget`] subtracts,
    /// and warns when it alone exceeds the memory budget.
    fn refresh_fixed_bytes(&self) {
        let Some(budget) = self.options.memory_budget_bytes else {
            return;
        };
        let usage = self.memory_usage();
        // A flush keeps a second copy of the open rows of the series it
        // writes, which with many active series is nearly all of them.
        let reserved = usage.fixed() + usage.open_rows;
        self.fixed_bytes.store(reserved, Ordering::Relaxed);
        let over = reserved + 2 * MIN_HEAD_BUDGET_BYTES > budget;
        if over && !self.over_budget.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                series = usage.series,
                needed_mib = (reserved + 2 * MIN_HEAD_BUDGET_BYTES) / (1024 * 1024),
                budget_mib = budget / (1024 * 1024),
                "the time-series store needs more memory for its series than its memory budget allows; raise the memory budget"
            );
        } else if !over {
            self.over_budget.store(false, Ordering::Relaxed);
        }
    }

    fn wake_maintenance(&self) {
        self.wake.0.lock().pending = true;
        self.wake.1.notify_all();
    }

    fn maintenance_loop(&self) {
        loop {
            {
                let mut wake = self.wake.0.lock();
                if !wake.pending && !wake.stop {
                    self.wake
                        .1
                        .wait_for(&mut wake, self.options.maintenance_interval);
                }
                if wake.stop {
                    return;
                }
                wake.pending = false;
            }
            let maintained = self.maintain(false);
            self.refresh_fixed_bytes();
            if let Err(err) = maintained {
                tracing::error!(
                    error = %err,
                    "time-series compaction or retention failed; stored data is intact and the pass is retried"
                );
            }
        }
    }

    /// Retention, then compactions until the policy selects none (`full`:
    /// merge every partition with more than one segment), for raw data and
    /// every rollup tier.
    fn maintain(&self, full: bool) -> Result<(), StoreError> {
        let _running = self.compaction_lock.lock();
        let cutoffs = self.cutoffs_for(&self.raw_retention());
        self.maintain_tier::<Value>(0, full, &cutoffs)?;
        for tier in 0..self.tier_count() {
            let cutoffs = match self.rollup_retention.get(tier) {
                Some(rules) => self.cutoffs_for(rules),
                None => None,
            };
            let tier_byte = u8::try_from(tier + 1).expect("at most 254 tiers");
            self.maintain_tier::<Bucket>(tier_byte, full, &cutoffs)?;
        }
        Ok(())
    }

    fn maintain_tier<V: SegmentList>(
        &self,
        tier: u8,
        full: bool,
        cutoffs: &Option<Cutoffs>,
    ) -> Result<(), StoreError> {
        self.drop_expired_segments::<V>(tier, cutoffs)?;
        let mut done: HashSet<Partition> = HashSet::new();
        while let Some((inputs, whole)) = self.pick_compaction::<V>(tier, full, cutoffs, &done) {
            if self.wake.0.lock().stop {
                return Ok(());
            }
            let partition = inputs[0].meta.partition;
            // Merging a whole partition produces its lasting form, worth
            // every coding; intermediate merges keep to the fast ones.
            if whole {
                self.compact_inputs(tier, &inputs, cutoffs)?;
            } else {
                crate::compress::fast_codings(|| self.compact_inputs(tier, &inputs, cutoffs))?;
            }
            if full {
                done.insert(partition);
            }
        }
        Ok(())
    }

    /// Partition length of tier `tier` (0: raw data).
    fn partition_ns_of(&self, tier: u8) -> i64 {
        match tier {
            0 => self.options.partition_ns,
            tier => self.tier_partition_ns(usize::from(tier) - 1),
        }
    }

    /// Deletes segments whose every series ends before its retention
    /// cutoff (whole files, no rewrite).
    fn drop_expired_segments<V: SegmentList>(
        &self,
        tier: u8,
        cutoffs: &Option<Cutoffs>,
    ) -> Result<(), StoreError> {
        let Some(cutoffs) = cutoffs else {
            return Ok(());
        };
        let listed: Vec<Arc<Segment<V>>> = V::list(&self.state.read(), tier).clone();
        let mut expired = Vec::new();
        for segment in listed {
            if cutoffs.all_expired(&segment)? {
                expired.push(segment);
            }
        }
        if expired.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.state.write();
            V::list_mut(&mut state, tier)
                .retain(|segment| !expired.iter().any(|e| Arc::ptr_eq(e, segment)));
            if V::RAW {
                forget_expired_latest(&mut state, cutoffs);
            }
        }
        for segment in &expired {
            fs::remove_file(&segment.path).context("delete expired segment", &segment.path)?;
        }
        fsio_sync_dir(&self.dir);
        tracing::info!(
            tier,
            segments = expired.len(),
            bytes = expired.iter().map(|s| s.size).sum::<u64>(),
            "deleted segments past their retention"
        );
        Ok(())
    }

    /// Chooses the next compaction: the segments of one partition that are
    /// contiguous in priority order (so last-write-wins is kept), and
    /// whether they are the whole partition.
    fn pick_compaction<V: SegmentList>(
        &self,
        tier: u8,
        full: bool,
        cutoffs: &Option<Cutoffs>,
        done: &HashSet<Partition>,
    ) -> Option<(Vec<Arc<Segment<V>>>, bool)> {
        let state = self.state.read();
        let mut groups: BTreeMap<Partition, Vec<Arc<Segment<V>>>> = BTreeMap::new();
        for segment in V::list(&state, tier) {
            groups
                .entry(segment.meta.partition)
                .or_default()
                .push(Arc::clone(segment));
        }

        let fan_in = self.options.merge_fan_in.max(2);
        for (partition, group) in groups {
            if done.contains(&partition) {
                continue;
            }
            // Format 1 segments cover all time; they are rewritten into
            // partitions together.
            if partition == Partition::ALL {
                return Some((group, true));
            }
            // Reads the whole index, which only an explicit full compaction
            // does. An unreadable index counts as needing a rewrite, whose
            // error then reports what is wrong.
            let needs_rewrite = |segment: &Segment<V>| {
                segment.version != crate::segment::VERSION
                    || segment.entries().any(|entry| match entry {
                        Ok((id, entry)) => {
                            state.deleted.contains(&id)
                                || cutoffs
                                    .as_ref()
                                    .is_some_and(|cutoffs| entry.min_ts < cutoffs.of(id))
                        }
                        Err(_) => true,
                    })
            };
            let cold = state
                .partition_touched
                .get(&(tier, partition))
                .is_none_or(|touched| touched.elapsed() >= self.options.cold_after);
            if group.len() >= 2 && (full || cold) {
                return Some((group, true));
            }
            if full && group.len() == 1 && needs_rewrite(&group[0]) {
                return Some((group, true));
            }
            if group.len() >= fan_in {
                let tail = &group[group.len() - fan_in..];
                // Same-level tails keep merges tiered. Flushes and merges
                // can interleave so that no tail has one level, and then a
                // hot partition would keep every segment until it cools;
                // beyond twice the fan-in the tail merges anyway. Any tail
                // is contiguous in priority order, so last-write-wins holds.
                if tail.iter().all(|s| s.meta.level == tail[0].meta.level)
                    || group.len() >= 2 * fan_in
                {
                    return Some((tail.to_vec(), false));
                }
            }
        }
        None
    }

    /// Merges `inputs` (contiguous in priority order, one partition or the
    /// format 1 group) into one segment per partition, installs the outputs
    /// and deletes the inputs.
    fn compact_inputs<V: SegmentList>(
        &self,
        tier: u8,
        inputs: &[Arc<Segment<V>>],
        cutoffs: &Option<Cutoffs>,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let deleted = self.state.read().deleted.clone();

        let priority = inputs.iter().map(|s| s.meta.priority).max().unwrap_or(0);
        let marker = inputs.iter().map(|s| s.marker).max().unwrap_or(0);
        let marker_from = inputs.iter().map(|s| s.meta.marker_from).min().unwrap_or(0);
        let level = inputs
            .iter()
            .map(|s| s.meta.level)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        let input_seqs: Vec<u64> = inputs.iter().map(|s| s.seq).collect();
        let partition = inputs[0].meta.partition;
        let partition_ns = self.partition_ns_of(tier);

        // One writer per output partition. Normal groups have one
        // partition; the format 1 group is split as its points come.
        let seal = self.seal_with();
        let mut writers: BTreeMap<Partition, SegmentWriter<V>> = BTreeMap::new();
        let mut damaged: HashSet<u64> = HashSet::new();
        // The indexes are read side by side in ascending id order, so the
        // merge keeps one entry per input in memory.
        let mut indexes: Vec<_> = inputs
            .iter()
            .map(|segment| segment.entries().peekable())
            .collect();
        loop {
            let mut next_id: Option<SeriesId> = None;
            for index in &mut indexes {
                match index.peek() {
                    Some(Ok((id, _))) => next_id = Some(next_id.map_or(*id, |next| next.min(*id))),
                    Some(Err(_)) => {
                        return Err(index.next().and_then(Result::err).expect("peeked an error"));
                    }
                    None => {}
                }
            }
            let Some(id) = next_id else {
                break;
            };
            let lo = cutoffs.as_ref().map_or(ALL_LO, |c| c.of(id));
            let mut sources = Vec::new();
            for (segment, index) in inputs.iter().zip(&mut indexes) {
                if let Some(Ok((entry_id, _))) = index.peek()
                    && *entry_id == id
                    && let Some(Ok((_, entry))) = index.next()
                    && let Some(source) = Source::entry(segment, &entry, lo, ALL_END, true)
                {
                    sources.push(source);
                }
            }
            if deleted.contains(&id) {
                continue;
            }
            let mut merged = MergedPoints::new(sources);
            let mut points: Vec<(TimestampNs, V)> = Vec::new();
            while let Some(point) = merged.next_point()? {
                points.push(point);
            }
            damaged.extend(merged.damaged_segments());
            let mut start = 0;
            while start < points.len() {
                let output = if partition == Partition::ALL {
                    Partition::of(points[start].0, partition_ns)
                } else {
                    partition
                };
                let len = points[start..].partition_point(|p| p.0 < output.end);
                let writer = match writers.entry(output) {
                    std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                    std::collections::btree_map::Entry::Vacant(entry) => {
                        let seq = self.take_seq();
                        entry.insert(SegmentWriter::create(&self.dir, seq, marker_from, &seal)?)
                    }
                };
                writer.write_series(id, points[start..start + len].iter().map(Ok))?;
                start += len;
            }
        }

        // Only the last output names the inputs: a crash before it leaves
        // the inputs in place, and the earlier outputs contain the same
        // points with the same priority, which is harmless.
        let output_count = writers.len();
        let mut outputs = Vec::with_capacity(output_count);
        for (n, (output_partition, writer)) in writers.into_iter().enumerate() {
            if writer.is_empty() {
                continue;
            }
            let meta = SegmentMeta {
                tier,
                partition: output_partition,
                priority,
                marker_from,
                level,
                inputs: if n + 1 == output_count {
                    input_seqs.clone()
                } else {
                    Vec::new()
                },
            };
            outputs.push(Arc::new(writer.finish(marker, meta)?));
        }

        {
            let mut state = self.state.write();
            let list = V::list_mut(&mut state, tier);
            list.retain(|segment| !inputs.iter().any(|input| Arc::ptr_eq(input, segment)));
            list.extend(outputs.iter().cloned());
            sort_by_priority(list);
            if V::RAW && !damaged.is_empty() {
                rebuild_latest(&mut state)?;
            } else if V::RAW
                && let Some(cutoffs) = cutoffs
            {
                forget_expired_latest(&mut state, cutoffs);
            }
        }

        for input in inputs {
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

        tracing::debug!(
            tier,
            inputs = inputs.len(),
            outputs = outputs.len(),
            level,
            series = outputs.iter().map(|s| s.series_count).sum::<u64>(),
            input_bytes = inputs.iter().map(|s| s.size).sum::<u64>(),
            output_bytes = outputs.iter().map(|s| s.size).sum::<u64>(),
            damaged_inputs = damaged.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compacted segments"
        );
        Ok(())
    }

    /// Collects the sources of one series for `lo <= ts < end`, in
    /// last-write-wins order, with `lo` raised to the retention cutoff.
    /// Head points are copied under the read lock; segment blocks are read
    /// later, without the lock.
    fn merged_points(&self, series: &SeriesKey, lo: TimestampNs, end: TimestampNs) -> MergedPoints {
        let lo = lo.max(self.cutoff(&series.tenant, &series.device));
        let Some(id) = self.state.read().catalog.get(series) else {
            return MergedPoints::empty();
        };
        self.merged_points_by_id(id, lo, end)
    }

    /// Like [`Inner::merged_points`] for a series id, without retention.
    fn merged_points_by_id(&self, id: SeriesId, lo: TimestampNs, end: TimestampNs) -> MergedPoints {
        if lo >= end {
            return MergedPoints::empty();
        }
        let state = self.state.read();

        let sources: Result<Vec<Source>, StoreError> = state
            .segments
            .iter()
            .filter(|segment| segment.meta.partition.end > lo && segment.meta.partition.start < end)
            .filter_map(|segment| Source::segment(segment, id, lo, end, false).transpose())
            .collect();
        let mut sources = match sources {
            Ok(sources) => sources,
            Err(err) => return MergedPoints::from_sources(Err(err)),
        };
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

/// Segments of one kind in the state: raw points, or the rows of one
/// rollup tier.
trait SegmentList: StoredValue {
    fn list(state: &State, tier: u8) -> &Vec<Arc<Segment<Self>>>;
    fn list_mut(state: &mut State, tier: u8) -> &mut Vec<Arc<Segment<Self>>>;
}

impl SegmentList for Value {
    fn list(state: &State, _tier: u8) -> &Vec<Arc<Segment<Value>>> {
        &state.segments
    }

    fn list_mut(state: &mut State, _tier: u8) -> &mut Vec<Arc<Segment<Value>>> {
        &mut state.segments
    }
}

impl SegmentList for Bucket {
    fn list(state: &State, tier: u8) -> &Vec<Arc<Segment<Bucket>>> {
        &state.rollups[usize::from(tier) - 1]
    }

    fn list_mut(state: &mut State, tier: u8) -> &mut Vec<Arc<Segment<Bucket>>> {
        &mut state.rollups[usize::from(tier) - 1]
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

/// File naming the rollup intervals that the tiers were built for.
const ROLLUP_FILE_NAME: &str = "rollup-tiers";

fn rollup_description(intervals: &[i64]) -> String {
    let listed: Vec<String> = intervals.iter().map(i64::to_string).collect();
    format!("rollup intervals ns: {}\n", listed.join(" "))
}

/// Writes a small file atomically and durably.
fn write_file_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let path = dir.join(name);
    let temp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temp).context("create", &temp)?;
    file.write_all(bytes).context("write", &temp)?;
    file.sync_all().context("sync", &temp)?;
    drop(file);
    fs::rename(&temp, &path).context("rename into place at", &path)?;
    crate::fsio::sync_dir(dir).context("sync directory", dir)
}

/// Segments and open rows written by one flush.
struct Flushed {
    raw: Vec<Segment>,
    rollups: Vec<Segment<Bucket>>,
    open_rows: IdMap<rollup::OpenRows>,
}

fn sort_by_priority<V: StoredValue>(segments: &mut [Arc<Segment<V>>]) {
    segments.sort_by_key(|segment| (segment.meta.priority, segment.seq));
}

/// Recomputes the latest point of every series from the segment indexes,
/// after a damaged segment was set aside. Later segments win ties. Reads
/// every index, so it is kept for that rare case.
fn rebuild_latest(state: &mut State) -> Result<(), StoreError> {
    state.flushed_latest = latest_of_segments(&state.segments, &|id| state.deleted.contains(&id))?;
    Ok(())
}

/// Latest point of every series in `segments` except the `deleted` ones.
///
/// NOTE: a sealed segment has no last values in its index, so this reads
/// and opens the last block of every series in every sealed segment; open
/// time then grows with series times segments, which has not been measured.
fn latest_of_segments(
    segments: &[Arc<Segment>],
    deleted: &dyn Fn(SeriesId) -> bool,
) -> Result<IdMap<Point>, StoreError> {
    let mut latest: IdMap<Point> = IdMap::default();
    for segment in segments {
        for entry in segment.entries() {
            let (id, entry) = entry?;
            if deleted(id) {
                continue;
            }
            if let Some(value) = segment.last_value(&entry)? {
                update_latest(&mut latest, id, entry.max_ts, &value);
            }
        }
    }
    Ok(latest)
}

/// Forgets the latest points that retention removed. A series whose latest
/// point is older than its cutoff has no point left at all, so nothing
/// else needs to be read.
fn forget_expired_latest(state: &mut State, cutoffs: &Cutoffs) {
    state
        .flushed_latest
        .retain(|id, (ts, _)| *ts >= cutoffs.of(*id));
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

/// Deletes segments and marker files that a crash left half-written.
fn remove_temp_files(dir: &Path) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).context("list", dir)? {
        let entry = entry.context("list", dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(final_name) = name.strip_suffix(TEMP_SUFFIX) else {
            continue;
        };
        if parse_segment_file_name(final_name).is_some() || final_name == marker::MARKER_FILE_NAME {
            let path = entry.path();
            tracing::info!(path = %path.display(), "deleting unfinished file left by a crash");
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
    /// Intact segments of raw points.
    segments: Vec<Segment>,
    /// Intact segments of the rollup tiers.
    rollups: Vec<Segment<Bucket>>,
    /// True when a segment was set aside.
    damaged: bool,
    /// Largest sequence number seen in the directory, so new segments sort
    /// after every file ever created there.
    max_seq: u64,
    durable_marker: u64,
}

/// Opens all segments, sets aside damaged ones, deletes superseded ones and
/// computes the durable marker (steps 3 to 6 of recovery).
fn recover_segments(
    dir: &Path,
    loaded: &LoadedSeries,
    sealing: &Arc<Sealing>,
) -> Result<RecoveredSegments, StoreError> {
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for entry in fs::read_dir(dir).context("list", dir)? {
        let entry = entry.context("list", dir)?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            files.push((seq, entry.path()));
        }
    }
    files.sort_unstable_by_key(|(seq, _)| *seq);
    let max_seq = files.last().map_or(0, |(seq, _)| *seq);

    let mut intact: Vec<Segment> = Vec::new();
    let mut intact_rollups: Vec<Segment<Bucket>> = Vec::new();
    let mut damaged: Vec<(u64, PathBuf, String)> = Vec::new();
    let undefined = |id: SeriesId| {
        format!(
            "refers to series id {} that the series file does not define",
            id.0
        )
    };
    for (seq, path) in files {
        let opened =
            probe_tier(&path).and_then(|tier| {
                let mut unknown = None;
                let mut check = |id: SeriesId| {
                    if unknown.is_none()
                        && !loaded.live.contains_key(&id)
                        && !loaded.deleted.contains(&id)
                    {
                        unknown = Some(id);
                    }
                };
                if tier == 0 {
                    Segment::<Value>::open(path.clone(), seq, sealing.clone(), |id, _| check(id))
                        .map(|segment| match unknown {
                            None => intact.push(segment),
                            Some(id) => damaged.push((seq, path.clone(), undefined(id))),
                        })
                } else {
                    Segment::<Bucket>::open(path.clone(), seq, sealing.clone(), |id, _| check(id))
                        .map(|segment| match unknown {
                            None => intact_rollups.push(segment),
                            Some(id) => damaged.push((seq, path.clone(), undefined(id))),
                        })
                }
            });
        match opened {
            Ok(()) => {}
            Err(StoreError::Corrupt { detail, .. }) => damaged.push((seq, path, detail)),
            Err(err) => return Err(err),
        }
    }

    // Format 1 segments carry no `marker_from`: their points came after the
    // marker of the segment written before them.
    let mut previous_marker = 0;
    for segment in &mut intact {
        if segment.version == 1 {
            segment.meta.marker_from = previous_marker;
            previous_marker = segment.marker;
        }
    }

    let superseding: HashSet<u64> = intact
        .iter()
        .flat_map(|segment| segment.meta.inputs.iter().copied())
        .chain(
            intact_rollups
                .iter()
                .flat_map(|segment| segment.meta.inputs.iter().copied()),
        )
        .collect();
    let mut kept_rollups = Vec::with_capacity(intact_rollups.len());
    for segment in intact_rollups {
        if superseding.contains(&segment.seq) {
            fs::remove_file(&segment.path).context("delete", &segment.path)?;
            continue;
        }
        kept_rollups.push(segment);
    }

    let mut kept = Vec::with_capacity(intact.len());
    for segment in intact {
        if superseding.contains(&segment.seq) {
            tracing::info!(path = %segment.path.display(), "deleting segment superseded by a compaction");
            fs::remove_file(&segment.path).context("delete", &segment.path)?;
            continue;
        }
        kept.push(segment);
    }

    let recorded = match marker::read(dir) {
        Ok(recorded) => recorded,
        Err(StoreError::Corrupt { detail, path }) => {
            tracing::warn!(
                path = %path.display(),
                detail,
                "durable-marker file is damaged; replaying the whole ingest log that is left"
            );
            Some(0)
        }
        Err(err) => return Err(err),
    };
    // Format 1 kept the marker in its segments only.
    let mut durable_marker =
        recorded.unwrap_or_else(|| kept.iter().map(|segment| segment.marker).max().unwrap_or(0));

    let mut moved_back = false;
    let any_damaged = !damaged.is_empty();
    for (seq, path, detail) in damaged {
        if superseding.contains(&seq) {
            tracing::info!(path = %path.display(), detail, "setting aside damaged segment superseded by a compaction");
        } else {
            tracing::warn!(
                path = %path.display(),
                detail,
                "setting aside damaged segment; its points are lost unless the ingest log still contains them"
            );
            // The header names the marker before the segment's points;
            // format 1 headers do not, so the marker of the segment before it is used.
            let from = damaged_segment_marker_from(&path).unwrap_or_else(|| {
                kept.iter()
                    .filter(|segment| segment.seq < seq)
                    .map(|segment| segment.marker)
                    .max()
                    .unwrap_or(0)
            });
            if from < durable_marker {
                durable_marker = from;
                moved_back = true;
            }
        }
        set_aside(dir, &path)?;
    }
    fsio_sync_dir(dir);

    if moved_back {
        // Record the reverted marker, so that a restart before the next
        // flush still replays the lost range.
        marker::write(dir, durable_marker)?;
        tracing::warn!(
            durable_marker,
            "durable marker moved back to before the damaged segments"
        );
    }

    Ok(RecoveredSegments {
        segments: kept,
        rollups: kept_rollups,
        damaged: any_damaged,
        max_seq,
        durable_marker,
    })
}
