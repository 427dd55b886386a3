//! Ferrite's embedded time-series store.
//!
//! A [`Store`] keeps points written since the last flush in an in-memory
//! *head*. [`Store::flush`] persists the head as immutable, compressed
//! *segment* files, one per time *partition* (a day by default) that the
//! head touches, and then records a caller-supplied *marker* (the server
//! stores its ingest-log position there). Queries merge segments and head
//! with last-write-wins per (series, timestamp). Each flush also maintains
//! the *rollup tiers* (1 h and 1 d by default; see the `rollup` module
//! of the store): rows of count, sum, min, max, first and last that serve
//! aggregates over long ranges. A background thread merges segments
//! (*compaction*) and deletes data past its *retention*.
//!
//! This is format version 2. Directories of version 1 (uncompressed, no
//! partitions, no rollups) open as they are; their segments are rewritten
//! into partitions by the first compaction, and their rollups are built at
//! open.
//!
//! # Durability contract
//!
//! - [`Store::write`] only changes memory. Points are durable once a later
//!   [`Store::flush`] returns `Ok`. A crash or drop before that loses them,
//!   and the caller recovers them by replaying its own log from
//!   [`Store::durable_marker`].
//! - A flush is durable when the marker file names its marker. Segments a
//!   crash left from an unfinished flush contain copies of points that the
//!   replay writes again; last-write-wins makes the copies harmless.
//! - [`Store::delete_device`] is durable when it returns `Ok`.
//!
//! # Directory layout
//!
//! | name | content |
//! |---|---|
//! | `LOCK` | empty file, locked (advisory `flock`) while a `Store` has the directory open |
//! | `series.log` | series file: series ids and names, append-only |
//! | `durable-marker` | the marker of the last completed flush |
//! | `rollup-tiers` | the rollup intervals the tiers were built for |
//! | `seg-<seq>.fseg` | segment of raw points; `<seq>` is 16 lower-case hex digits, increasing in creation order |
//! | `rollup-<seq>.fseg` | segment of rollup rows of one tier |
//! | `*.tmp` | file being written; deleted at open |
//! | `corrupt/` | files set aside at open or by compaction, kept for inspection |
//!
//! All integers below are little-endian. *varint* is unsigned LEB128 (at
//! most 10 bytes), *zigzag* is a signed integer zigzag-mapped onto a varint,
//! *bytes* is a varint length followed by that many bytes, and *string* is
//! bytes holding UTF-8.
//!
//! # Series file (`series.log`)
//!
//! ```text
//! header:  magic "FERRSERS" (8) | version u32 = 1 | reserved u32 = 0
//! record:  payload_len u32 | crc32(payload) u32 | payload
//! payload: kind u8 = 1 (define) | id varint | tenant string | device string | key string
//!          kind u8 = 2 (delete) | id varint
//! ```
//!
//! Ids start at 1 and are never reused; a device that writes again after
//! [`Store::delete_device`] gets new ids. Definitions of the series in a
//! head are appended and synced before a segment holding their points is
//! renamed into place, so every id in a segment is defined in this file.
//! Repeating an identical definition is allowed (a failed flush is retried).
//!
//! # Marker file (`durable-marker`)
//!
//! ```text
//! magic "FERRMARK" (8) | version u32 = 1 | reserved u32 = 0 | marker u64 | crc32(bytes 0..24) u32
//! ```
//!
//! Replaced atomically (temporary file, fsync, rename, directory fsync)
//! after all segments of a flush are in place.
//!
//! # Segment files
//!
//! ```text
//! header (32):  magic "FERRTSEG" (8) | version u32 = 2 | flags u32
//!               | marker_from u64 | crc32(header bytes 0..24) u32 | reserved u32
//! blocks:       for each series (ascending id), its blocks in time order
//! index:        see below
//! trailer (48): marker u64 | index_offset u64 | index_len u64 | crc32(index) u32
//!               | version u32 | crc32(trailer bytes 0..32) u32 | reserved u32 | magic "FERRTSEG"
//! ```
//!
//! `marker_from` is the durable marker before the oldest flush whose points
//! the segment contains: replaying the ingest log from there rebuilds them. It
//! sits in the header so that recovery can read it from a segment whose
//! tail is damaged. `flags` bit 0 is set when the segment was written with
//! a [`BlockCipher`] ([`StoreOptions::cipher`]); segments written before
//! sealing existed have 0 there.
//!
//! A block contains up to 8640 points of one series (a day at 10 s) and is
//! closed early once its uncompressed points reach 256 KiB. Its columns use
//! the codings of the `compress` module (each column starts with a mode
//! byte), chosen per column by size:
//!
//! ```text
//! block:   payload_len u32 | crc32(payload) u32 | payload
//! payload: count varint | ts_len varint | timestamps column | values
//! values (raw):    kind u8 (0 float, 1 int, 2 bool, 3 string, 4 mixed) | column(s)
//! values (rollup): count, numeric_count, sum, min, max, first_ts, first value,
//!                  last_ts, last value columns, each len varint | column
//! sealed payload:  0 u8 | tenant string | cipher output of the plain payload
//! ```
//!
//! A plain payload starts with its count, at least 1, so a first byte of 0
//! marks a sealed block, and plain and sealed blocks can share a store. In a
//! segment with flag bit 0 set, the `last value` of every index entry is a
//! placeholder and the store reads the last block instead, so that no
//! value is left in plain text. The `cipher` module describes the
//! associated data. Series names (tenant, device, key), point counts and
//! time ranges in the index stay in plain text.
//!
//! Within a segment the points of a series are strictly ascending and unique
//! by timestamp (the head is deduplicated with last-write-wins before it is
//! written), and all lie inside the segment's partition. The index lists the
//! series in strictly ascending id order, which lookups rely on:
//!
//! ```text
//! tier u8 (0 raw, 1.. rollup tiers) | partition_start zigzag | partition_end zigzag
//! | priority varint | level u8 | input_count varint | input seq varint...
//! | series_count varint
//! per series:  id varint | count varint | min_ts zigzag | max_ts zigzag | last value
//!              | block_count varint
//!              | per block: offset varint | len varint | count varint | min_ts zigzag | max_ts zigzag
//! ```
//!
//! `last value` is the value (for rollups the row) at `max_ts`. Block
//! `offset` counts from the start of the file and `len` includes the 8-byte
//! block frame. `priority` orders last-write-wins between segments of the
//! same tier and partition: a flushed segment has its own seq, a compaction
//! output the greatest priority of its inputs, which it lists; once it is in
//! place, its inputs are superseded.
//!
//! Version 1 segments have a 16-byte header without `marker_from`, an index
//! that starts with the first and last seq of the compaction inputs instead
//! of the fields before `series_count`, and uncompressed row-wise blocks.
//!
//! Open reads only header, trailer and index of each segment, checks the
//! index checksum and every entry, and keeps in memory one *fence* (series
//! id and position) per 32 entries. A lookup reads the entries between two
//! fences from the file, and the operating system's page cache keeps hot
//! indexes. Compaction reads the indexes of its inputs side by side in id
//! order. Block checksums are checked when a query or compaction reads the
//! block, so start-up time does not grow with the amount of data.
//!
//! # Recovery at open
//!
//! 1. Take the directory lock and delete leftover `*.tmp` files.
//! 2. Load the series file. A damaged tail (an append cut short by a crash)
//!    is cut off with a warning; no segment refers to those records yet.
//! 3. Open every segment's trailer and index. A segment that fails a check,
//!    or refers to a series id the series file does not define, is moved to
//!    `corrupt/` with a warning.
//! 4. Delete segments superseded by an intact compaction output (a crash
//!    between installing the output and deleting its inputs leaves them).
//! 5. [`Store::durable_marker`] becomes the marker file's value (version 1:
//!    the marker of the newest segment). When segments were set aside, it
//!    moves back to the oldest `marker_from` among them (0 when a header is
//!    unreadable), and open records that value so that it survives another
//!    restart. Replaying the ingest log from there rebuilds the lost points,
//!    but only as far as the log still contains them.
//! 6. When segments were set aside, or the rollup intervals differ from
//!    those in `rollup-tiers`, the rollup tiers are built again from the raw
//!    points.
//!
//! A damaged block found later makes the query that reads it fail with
//! [`StoreError::Corrupt`]. Compaction skips such a block with an error log
//! (its points are lost), writes the rest, and moves the damaged input to
//! `corrupt/`.
//!
//! # Compaction and retention
//!
//! The maintenance thread wakes after each flush and every
//! [`StoreOptions::maintenance_interval`]. Per tier and partition it merges
//! the newest [`StoreOptions::merge_fan_in`] segments once they have the
//! same level (so each point is rewritten about log(n) times), and merges
//! a partition into one segment once it received nothing new for
//! [`StoreOptions::cold_after`]. Merges take only segments that are
//! contiguous in priority order, so last-write-wins is kept. Segments whose
//! every series is past its retention are deleted whole; compaction drops
//! older points from the segments it rewrites, and queries never return
//! them. Compaction runs beside writes, flushes and queries.
//!
//! Retention is set per tenant and per device ([`Retention`]). A segment
//! contains the series of many tenants and devices. When a device's
//! retention is shorter than that of the others in its segments, queries
//! leave its expired points out at once. They are removed from disk when
//! compaction rewrites those segments or the whole file expires.
//!
//! # Concurrency and memory
//!
//! All methods take `&self`; `Store` is `Send + Sync`. One `RwLock` guards
//! the in-memory state. [`Store::write`] holds it for the hash lookups and
//! pushes only. Queries copy what they need under the read lock and read
//! segment blocks after releasing it. Flushes and deletes are serialised by
//! a second lock, compaction passes by a third. A flush moves the head aside
//! as the *frozen head* (queries keep seeing it), writes its segments
//! without holding the state lock, and swaps them in for the frozen head.
//! New writes go to a fresh head meanwhile.
//!
//! Memory is the head (the caller flushes when [`Store::needs_flush`]), the
//! frozen head during a flush, and per series its name, latest point and
//! open rollup rows, about 460 bytes with two tiers. Rows of numbers are
//! kept in an 80-byte form. Each open segment adds 16 bytes per 32 series.
//! A flush also keeps the new open rows of the series it writes until it
//! installs them (copy on write, so that queries never count a point
//! twice). [`StoreOptions::memory_budget_bytes`] bounds the sum: the head
//! budget ([`Store::head_budget`]) is what the series and that copy leave,
//! halved for the frozen head. [`Store::memory_usage`] estimates each
//! part; allocator overhead and the buffers of a running compaction are
//! not counted.

mod block;
mod catalog;
mod cipher;
mod compress;
mod encoding;
mod error;
mod fsio;
mod head;
mod item;
mod marker;
mod merge;
mod segment;
mod series_log;
mod store;

use std::collections::HashMap;

use ferrite_core::{TimestampNs, Value};

pub use cipher::{BlockCipher, SealError, Unreadable};
pub use error::StoreError;
pub use store::Store;

/// Maximum length in bytes of a tenant, device or key name that
/// [`Store::write`] accepts.
pub const MAX_NAME_LEN: usize = 64 * 1024;

/// Identity of a series: the points of one key of one device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub tenant: String,
    pub device: String,
    pub key: String,
}

impl SeriesKey {
    pub fn new(
        tenant: impl Into<String>,
        device: impl Into<String>,
        key: impl Into<String>,
    ) -> SeriesKey {
        SeriesKey {
            tenant: tenant.into(),
            device: device.into(),
            key: key.into(),
        }
    }
}

/// Nanoseconds in one day.
pub const DAY_NS: i64 = 86_400 * 1_000_000_000;

/// Default rollup tiers: 1 hour and 1 day.
///
/// A 1-minute tier is supported but not on by default: on the fleet
/// benchmark (every series sampled every 10 s) its rows took 0.80 bytes per
/// raw field value on disk, more than the 0.55 of the raw points they
/// summarise, and folding and writing them made a flush about three times
/// slower, while raw points serve 1-minute buckets as fast. It pays off for
/// series sampled every second or faster.
pub const DEFAULT_ROLLUP_INTERVALS: [i64; 2] = [3_600_000_000_000, DAY_NS];

/// Returns the current time in nanoseconds since the Unix epoch. Tests
/// replace it to move time forward.
pub type Clock = std::sync::Arc<dyn Fn() -> TimestampNs + Send + Sync>;

/// How long points are kept, per tenant and per device. `None` keeps them
/// forever. All durations are in nanoseconds and must be positive.
///
/// A device's entry in `devices` replaces its tenant's retention for every
/// series of that device, whether it is shorter or longer. Devices without
/// an entry follow their tenant. The store applies a [`Retention`] given to
/// [`Store::set_retention`] so that no cutoff moves back in time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// Retention of tenants without their own entry, in nanoseconds.
    pub default: Option<i64>,
    /// Retention per tenant name, overriding `default`.
    pub tenants: HashMap<String, Option<i64>>,
    /// Retention per device, by tenant name and then device name,
    /// overriding the tenant's retention for that device.
    pub devices: HashMap<String, HashMap<String, Option<i64>>>,
}

impl Retention {
    /// Retention of `tenant` in nanoseconds, `None` for unlimited. Device
    /// entries are not consulted; see [`Retention::of_device`].
    pub fn of(&self, tenant: &str) -> Option<i64> {
        match self.tenants.get(tenant) {
            Some(retention) => *retention,
            None => self.default,
        }
    }

    /// Retention of the series of `device` of `tenant` in nanoseconds,
    /// `None` for unlimited: the device's entry, else the tenant's.
    pub fn of_device(&self, tenant: &str, device: &str) -> Option<i64> {
        match self.device_entry(tenant, device) {
            Some(retention) => retention,
            None => self.of(tenant),
        }
    }

    /// Returns the device's own entry, `None` when it follows its tenant.
    pub(crate) fn device_entry(&self, tenant: &str, device: &str) -> Option<Option<i64>> {
        self.devices.get(tenant)?.get(device).copied()
    }

    /// Oldest timestamp of `tenant` that is still kept at time `now`
    /// (`TimestampNs::MIN` for unlimited retention).
    pub fn cutoff(&self, tenant: &str, now: TimestampNs) -> TimestampNs {
        cutoff_at(self.of(tenant), now)
    }

    /// Oldest timestamp of the series of `device` of `tenant` that is still
    /// kept at time `now` (`TimestampNs::MIN` for unlimited retention).
    pub fn device_cutoff(&self, tenant: &str, device: &str, now: TimestampNs) -> TimestampNs {
        cutoff_at(self.of_device(tenant, device), now)
    }

    /// Sets the retention of one device, replacing its tenant's.
    pub fn set_device(
        &mut self,
        tenant: impl Into<String>,
        device: impl Into<String>,
        retention: Option<i64>,
    ) {
        self.devices
            .entry(tenant.into())
            .or_default()
            .insert(device.into(), retention);
    }

    /// True when no entry limits retention.
    pub(crate) fn keeps_everything(&self) -> bool {
        self.default.is_none()
            && self.tenants.values().all(Option::is_none)
            && self
                .devices
                .values()
                .flat_map(HashMap::values)
                .all(Option::is_none)
    }

    /// Rejects durations that are zero or negative, naming the entry and
    /// `setting`, the name of this retention.
    pub(crate) fn validate(&self, setting: &str) -> Result<(), StoreError> {
        let check = |entry: String, retention: &Option<i64>| match retention {
            Some(keep) if *keep <= 0 => Err(StoreError::InvalidArgument(format!(
                "invalid {setting} of {entry}: {keep} ns, expected a positive number of nanoseconds, or None to keep points forever"
            ))),
            _ => Ok(()),
        };
        check("tenants without their own entry".to_owned(), &self.default)?;
        for (tenant, retention) in &self.tenants {
            check(format!("tenant {tenant:?}"), retention)?;
        }
        for (tenant, devices) in &self.devices {
            for (device, retention) in devices {
                check(format!("device {device:?} of tenant {tenant:?}"), retention)?;
            }
        }
        Ok(())
    }
}

/// Oldest timestamp kept at `now` under retention `keep`.
pub(crate) fn cutoff_at(keep: Option<i64>, now: TimestampNs) -> TimestampNs {
    keep.map_or(TimestampNs::MIN, |keep| now.saturating_sub(keep))
}

/// Smallest head budget that a memory budget leaves: below it flushes would
/// write a few points per series each and cost more than they free.
pub const MIN_HEAD_BUDGET_BYTES: usize = 8 * 1024 * 1024;

/// Estimated memory of a [`Store`] by part, in bytes. The estimates count
/// the allocated tables and their entries; string values held as latest
/// points or open rows are not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Live series.
    pub series: usize,
    /// Series names (tenant, device and key) and the tenant table.
    pub names: usize,
    /// Latest flushed point of every series.
    pub latest: usize,
    /// Open rollup row of every series and tier.
    pub open_rows: usize,
    /// Open segments: their fences and fields.
    pub segments: usize,
    /// Points not yet flushed.
    pub head: usize,
    /// Points of the flush that is running.
    pub frozen_head: usize,
}

impl MemoryUsage {
    /// Memory that grows with the number of series and segments rather
    /// than with the points waiting for a flush.
    pub fn fixed(&self) -> usize {
        self.names + self.latest + self.open_rows + self.segments
    }

    pub fn total(&self) -> usize {
        self.fixed() + self.head + self.frozen_head
    }
}

/// Settings of a [`Store`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Head size, as estimated by [`Store::head_bytes`], at which the caller
    /// should flush ([`Store::needs_flush`]). The store itself does not
    /// enforce it.
    pub head_budget_bytes: usize,
    /// Memory the store may use in all, in bytes. It covers the head, the
    /// frozen head of a running flush, and what the store keeps per series
    /// (see [`Store::memory_usage`]).
    /// When set, the head budget that [`Store::needs_flush`] uses shrinks
    /// as series are added, down to [`MIN_HEAD_BUDGET_BYTES`], so that the
    /// whole stays within it; `head_budget_bytes` remains the largest head.
    pub memory_budget_bytes: Option<usize>,
    /// Length of a time partition in nanoseconds. Every segment contains
    /// points of one partition, so retention deletes whole files and
    /// compaction of old data leaves recent data alone. Default: one day.
    pub partition_ns: i64,
    /// Background compaction merges the newest `merge_fan_in` segments of a
    /// partition once they are all of the same level. Values below 2 act
    /// as 2.
    pub merge_fan_in: usize,
    /// A partition that received no new segment for this long is merged
    /// into a single segment, which stores its points most compactly.
    pub cold_after: std::time::Duration,
    /// Retention of raw points at open; [`Store::set_retention`] replaces
    /// it while the store is open.
    pub retention: Retention,
    /// Intervals of the rollup tiers in nanoseconds, ascending, each a
    /// multiple of the one before. Default: 1 h and 1 d (see
    /// [`DEFAULT_ROLLUP_INTERVALS`]). Changing them rebuilds the tiers from
    /// the raw points at the next open.
    pub rollup_intervals: Vec<i64>,
    /// Retention of each rollup tier, in the order of `rollup_intervals`;
    /// missing entries keep rows forever.
    pub rollup_retention: Vec<Retention>,
    /// Runs compaction and retention in a background thread every
    /// `maintenance_interval` and after each flush. Tests turn it off and
    /// call [`Store::run_maintenance`] themselves.
    pub background_maintenance: bool,
    pub maintenance_interval: std::time::Duration,
    pub clock: Clock,
    /// Seals every block that the store writes under the key of the
    /// series' tenant; `None` writes plain blocks. Sealed blocks need it
    /// to be read. See the `cipher` module for the format.
    pub cipher: Option<std::sync::Arc<dyn BlockCipher>>,
    /// With a cipher, seals new blocks. `false` keeps the cipher for
    /// reading sealed blocks and writes plain ones, so sealing can be
    /// turned off without losing what was sealed. Default: `true`.
    pub seal_writes: bool,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("head_budget_bytes", &self.head_budget_bytes)
            .field("memory_budget_bytes", &self.memory_budget_bytes)
            .field("partition_ns", &self.partition_ns)
            .field("merge_fan_in", &self.merge_fan_in)
            .field("cold_after", &self.cold_after)
            .field("retention", &self.retention)
            .field("rollup_intervals", &self.rollup_intervals)
            .field("rollup_retention", &self.rollup_retention)
            .field("background_maintenance", &self.background_maintenance)
            .field("maintenance_interval", &self.maintenance_interval)
            .field("cipher", &self.cipher.is_some())
            .field("seal_writes", &self.seal_writes)
            .finish_non_exhaustive()
    }
}

/// Returns the system clock as a [`Clock`].
pub fn system_clock() -> Clock {
    std::sync::Arc::new(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.as_nanos()).unwrap_or(TimestampNs::MAX)
    })
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            head_budget_bytes: 64 * 1024 * 1024,
            memory_budget_bytes: None,
            partition_ns: DAY_NS,
            merge_fan_in: 4,
            cold_after: std::time::Duration::from_secs(600),
            retention: Retention::default(),
            rollup_intervals: DEFAULT_ROLLUP_INTERVALS.to_vec(),
            rollup_retention: Vec::new(),
            background_maintenance: true,
            maintenance_interval: std::time::Duration::from_secs(10),
            clock: system_clock(),
            cipher: None,
            seal_writes: true,
        }
    }
}

/// One page of [`Store::range`].
#[derive(Debug, Clone, PartialEq)]
pub struct RangePage {
    /// Points in ascending timestamp order.
    pub points: Vec<(TimestampNs, Value)>,
    /// True when the range contains more points after the last one returned.
    pub has_more: bool,
}

/// One bucket of [`Store::aggregate`].
///
/// `count`, `first` and `last` use every point. `numeric_count`, `sum`,
/// `min` and `max` use `Float` and `Int` points only (`Int` as `f64`). An
/// empty bucket has count 0 and every `Option` set to `None`; a bucket
/// without numeric points has `sum`, `min` and `max` set to `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Inclusive start of the bucket.
    pub start: TimestampNs,
    pub count: u64,
    pub numeric_count: u64,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub first: Option<(TimestampNs, Value)>,
    pub last: Option<(TimestampNs, Value)>,
}

impl Bucket {
    /// Returns a bucket without points.
    pub fn empty(start: TimestampNs) -> Bucket {
        Bucket {
            start,
            count: 0,
            numeric_count: 0,
            sum: None,
            min: None,
            max: None,
            first: None,
            last: None,
        }
    }

    /// Adds the points that `other` summarises (same bucket, another
    /// series or another part of the bucket's range).
    pub fn merge(&mut self, other: &Bucket) {
        self.count += other.count;
        self.numeric_count += other.numeric_count;
        let combine = |a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64| match (a, b) {
            (Some(a), Some(b)) => Some(f(a, b)),
            (a, b) => a.or(b),
        };
        self.sum = combine(self.sum, other.sum, |a, b| a + b);
        self.min = combine(self.min, other.min, f64::min);
        self.max = combine(self.max, other.max, f64::max);
        if let Some(first) = &other.first
            && self
                .first
                .as_ref()
                .is_none_or(|current| first.0 < current.0)
        {
            self.first = Some(first.clone());
        }
        if let Some(last) = &other.last
            && self.last.as_ref().is_none_or(|current| last.0 >= current.0)
        {
            self.last = Some(last.clone());
        }
    }

    /// Adds a point. Points must arrive in ascending timestamp order.
    pub(crate) fn add(&mut self, ts: TimestampNs, value: Value) {
        self.count += 1;
        if let Some(number) = value.as_f64() {
            self.numeric_count += 1;
            self.sum = Some(self.sum.unwrap_or(0.0) + number);
            self.min = Some(self.min.map_or(number, |min| min.min(number)));
            self.max = Some(self.max.map_or(number, |max| max.max(number)));
        }
        if self.first.is_none() {
            self.first = Some((ts, value.clone()));
        }
        self.last = Some((ts, value));
    }
}
