//! Rollup tiers: rows of count, sum, min, max, first and last per series and
//! interval (1 h and 1 d by default), maintained at every flush and
//! used by aggregate queries whose buckets line up with a tier.
//!
//! # How rows stay exact
//!
//! Every series keeps one *open row* per tier in memory: the row of the
//! bucket that contains the newest point folded so far (its high-water mark,
//! the row's last timestamp). A flush folds the flushed points of each
//! series in timestamp order:
//!
//! - A point newer than a tier's high-water mark is added to the open row;
//!   when it falls into a later bucket, the open row is *closed* (written)
//!   and a new one starts.
//! - Any other point (late, or rewriting a timestamp) marks its bucket
//!   *dirty*. After folding, each dirty bucket is computed again from the
//!   raw points (segments, the flushed head and the current head), which
//!   last-write-wins has already resolved. For the open bucket only points
//!   up to the high-water mark count, so later points are not counted twice.
//!
//! The flush writes the closed and recomputed rows and, as provisional
//! rows, the open rows of every series it touched, so that a restart finds
//! the open rows in the segment indexes. A row written later replaces an
//! earlier one of the same bucket (the same last-write-wins as raw points).
//! Replayed points after a crash are not newer than the high-water mark and
//! so are recomputed, never counted twice.
//!
//! # Queries
//!
//! An aggregate whose bucket edges are all multiples of a tier's interval
//! is computed from the coarsest such tier. Rows cover what has been flushed;
//! from the bucket that contains the oldest point still in memory (in the
//! head) onwards, the next finer tier is used, and below the finest tier
//! the raw points. The result is therefore the same as from raw points,
//! except that sums may differ in the last bits (they add in a different
//! order).

use std::collections::BTreeSet;

use ferrite_core::{TimestampNs, Value};

use super::{ALL_END, ALL_LO, Inner};
use crate::Bucket;
use crate::catalog::{IdMap, SeriesId};
use crate::encoding::Point;
use crate::error::StoreError;
use crate::merge::{MergedPoints, Source};
use crate::segment::{Partition, Segment, SegmentMeta, SegmentWriter};

/// Open rows of one series, one per tier, as the store keeps them.
pub(super) type OpenRows = Box<[Option<CompactRow>]>;

/// Open rows of one series while a flush folds points into them.
type FoldRows = Vec<Option<Bucket>>;

/// A rollup row in the form kept for every series and tier. A row of
/// numbers, the common case, takes 80 bytes instead of a [`Bucket`]'s 136;
/// other rows are boxed.
#[derive(Debug, Clone)]
pub(super) enum CompactRow {
    Numeric(NumericRow),
    Other(Box<Bucket>),
}

/// A row whose points are all numbers.
#[derive(Debug, Clone, Copy)]
pub(super) struct NumericRow {
    start: TimestampNs,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
    first_ts: TimestampNs,
    last_ts: TimestampNs,
    /// Bits of an `f64`, or an `i64` when the matching flag is set.
    first: u64,
    last: u64,
    first_is_int: bool,
    last_is_int: bool,
}

impl CompactRow {
    pub(super) fn new(row: Bucket) -> CompactRow {
        let number = |value: &Value| match value {
            Value::Float(v) => Some((v.to_bits(), false)),
            Value::Int(v) => Some((*v as u64, true)),
            _ => None,
        };
        if let (Some(sum), Some(min), Some(max), Some((first_ts, first)), Some((last_ts, last))) =
            (row.sum, row.min, row.max, &row.first, &row.last)
            && row.numeric_count == row.count
            && let (Some((first, first_is_int)), Some((last, last_is_int))) =
                (number(first), number(last))
        {
            return CompactRow::Numeric(NumericRow {
                start: row.start,
                count: row.count,
                sum,
                min,
                max,
                first_ts: *first_ts,
                last_ts: *last_ts,
                first,
                last,
                first_is_int,
                last_is_int,
            });
        }
        CompactRow::Other(Box::new(row))
    }

    pub(super) fn start(&self) -> TimestampNs {
        match self {
            CompactRow::Numeric(row) => row.start,
            CompactRow::Other(row) => row.start,
        }
    }

    pub(super) fn to_bucket(&self) -> Bucket {
        match self {
            CompactRow::Numeric(row) => {
                let value = |bits: u64, is_int: bool| {
                    if is_int {
                        Value::Int(bits as i64)
                    } else {
                        Value::Float(f64::from_bits(bits))
                    }
                };
                Bucket {
                    start: row.start,
                    count: row.count,
                    numeric_count: row.count,
                    sum: Some(row.sum),
                    min: Some(row.min),
                    max: Some(row.max),
                    first: Some((row.first_ts, value(row.first, row.first_is_int))),
                    last: Some((row.last_ts, value(row.last, row.last_is_int))),
                }
            }
            CompactRow::Other(row) => (**row).clone(),
        }
    }
}

/// Appends `row` to rows sorted by bucket start, replacing the last row
/// when it has the same start.
fn push_replacing(rows: &mut Vec<(TimestampNs, Bucket)>, row: Bucket) {
    match rows.last_mut() {
        Some(last) if last.0 == row.start => last.1 = row,
        _ => rows.push((row.start, row)),
    }
}

fn compact(rows: FoldRows) -> OpenRows {
    rows.into_iter()
        .map(|row| row.map(CompactRow::new))
        .collect()
}

fn expand(rows: &OpenRows) -> FoldRows {
    rows.iter()
        .map(|row| row.as_ref().map(CompactRow::to_bucket))
        .collect()
}

/// Rows and open rows that one flush adds to the rollup tiers.
pub(super) struct RollupOutput {
    /// Rows to write per tier, in the order they were produced (a later row
    /// of the same series and bucket replaces an earlier one).
    pub(super) rows: Vec<Vec<(SeriesId, Bucket)>>,
    /// New open rows of the series the flush touched.
    pub(super) open: IdMap<OpenRows>,
}

/// Start of the bucket of `interval` that contains `ts`.
/// Saturates at the lower end of the timestamp range.
pub(super) fn bucket_start(ts: TimestampNs, interval: i64) -> TimestampNs {
    ts.saturating_sub(ts.rem_euclid(interval))
}

fn last_ts(row: &Bucket) -> TimestampNs {
    row.last.as_ref().map_or(TimestampNs::MIN, |(ts, _)| *ts)
}

impl Inner {
    pub(super) fn tier_count(&self) -> usize {
        self.options.rollup_intervals.len()
    }

    /// Partition length of rollup tier `tier` (0-based): 1440 buckets, at
    /// least the raw partition.
    pub(super) fn tier_partition_ns(&self, tier: usize) -> i64 {
        self.options.rollup_intervals[tier]
            .saturating_mul(1440)
            .max(self.options.partition_ns)
    }

    /// Folds the flushed points of one series into its open rows (`current`,
    /// or none yet), adds closed rows to `output` and late points' buckets
    /// to `dirty`, and returns the new open rows.
    fn fold_series(
        &self,
        id: SeriesId,
        points: &[&Point],
        current: Option<&OpenRows>,
        dirty: &mut BTreeSet<(usize, SeriesId, TimestampNs)>,
        output: &mut RollupOutput,
    ) -> OpenRows {
        let intervals = &self.options.rollup_intervals;
        let mut open = current.map_or_else(|| vec![None; intervals.len()], expand);
        for (ts, value) in points.iter().map(|p| (p.0, &p.1)) {
            for (tier, row) in open.iter_mut().enumerate() {
                let start = bucket_start(ts, intervals[tier]);
                if row.as_ref().is_some_and(|open_row| ts <= last_ts(open_row)) {
                    dirty.insert((tier, id, start));
                } else if let Some(closed) = fold_newer(row, start, ts, value) {
                    output.rows[tier].push((id, closed));
                }
            }
        }
        compact(open)
    }

    /// Folds the sorted, deduplicated points of a flush into the rollup
    /// tiers, recomputing dirty buckets from raw points.
    pub(super) fn fold_rollups(
        &self,
        views: &[(SeriesId, Vec<&Point>)],
    ) -> Result<RollupOutput, StoreError> {
        let tiers = self.tier_count();
        let mut output = RollupOutput {
            rows: vec![Vec::new(); tiers],
            open: IdMap::default(),
        };
        if tiers == 0 {
            return Ok(output);
        }
        output.open.reserve(views.len());
        let intervals = &self.options.rollup_intervals;
        // Ordered by tier first: a tier's dirty buckets are computed from
        // the rows of the tier below, which must be up to date by then.
        let mut dirty: BTreeSet<(usize, SeriesId, TimestampNs)> = BTreeSet::new();
        // The open rows are copied a chunk at a time: queries keep using
        // the current ones until the flush installs the new ones, and a
        // copy of all of them at once would double their memory.
        for chunk in views.chunks(4096) {
            let current: Vec<Option<OpenRows>> = {
                let state = self.state.read();
                chunk
                    .iter()
                    .map(|(id, _)| state.open_rows.get(id).cloned())
                    .collect()
            };
            for ((id, points), current) in chunk.iter().zip(current) {
                let open = self.fold_series(*id, points, current.as_ref(), &mut dirty, &mut output);
                output.open.insert(*id, open);
            }
        }

        let fold_done = std::time::Instant::now();
        let dirty_count = dirty.len();
        // Rows of this flush per tier, for the recomputation of coarser
        // tiers; a later row of the same bucket replaces an earlier one.
        let mut pending: Vec<std::collections::BTreeMap<(SeriesId, TimestampNs), Bucket>> =
            if dirty.is_empty() {
                Vec::new()
            } else {
                output
                    .rows
                    .iter()
                    .map(|rows| {
                        rows.iter()
                            .map(|(id, row)| ((*id, row.start), row.clone()))
                            .collect()
                    })
                    .collect()
            };
        for (tier, id, start) in dirty {
            let interval = intervals[tier];
            let open = expand(output.open.get(&id).expect("dirty series were folded"));
            let is_open = open[tier].as_ref().is_some_and(|row| row.start == start);
            let row = if tier == 0 {
                // The finest tier from the raw points; for the open bucket
                // only up to the high-water mark, so that later points are
                // not counted twice.
                let end = if is_open {
                    last_ts(open[tier].as_ref().expect("checked above")).saturating_add(1)
                } else {
                    start.saturating_add(interval)
                };
                let mut merged = self.merged_points_by_id(id, start, end);
                let mut row = Bucket::empty(start);
                while let Some((ts, value)) = merged.next_point()? {
                    row.add(ts, value);
                }
                row
            } else {
                // Coarser tiers from the rows of the tier below, which contain
                // nothing past the high-water mark.
                let end = start.saturating_add(interval);
                let open_below = open[tier - 1].as_ref();
                self.sum_rows_below(id, tier - 1, start, end, &pending[tier - 1], open_below)?
            };
            if row.count == 0 {
                continue;
            }
            pending[tier].insert((id, start), row.clone());
            if is_open {
                output.open.get_mut(&id).expect("checked above")[tier] = Some(CompactRow::new(row));
            } else {
                output.rows[tier].push((id, row));
            }
        }

        tracing::debug!(
            series = views.len(),
            dirty = dirty_count,
            recompute_ms = fold_done.elapsed().as_millis() as u64,
            "rollup fold"
        );
        Ok(output)
    }

    /// Sums the rows of tier `tier` with bucket starts in `[start, end)`:
    /// stored rows, then the rows of this flush (`pending`), then the open
    /// row, each newer source replacing older rows of the same bucket.
    fn sum_rows_below(
        &self,
        id: SeriesId,
        tier: usize,
        start: TimestampNs,
        end: TimestampNs,
        pending: &std::collections::BTreeMap<(SeriesId, TimestampNs), Bucket>,
        open: Option<&Bucket>,
    ) -> Result<Bucket, StoreError> {
        let mut sources: Vec<Source<Bucket>> = {
            let state = self.state.read();
            state.rollups[tier]
                .iter()
                .filter(|segment| {
                    segment.meta.partition.end > start && segment.meta.partition.start < end
                })
                .filter_map(|segment| Source::segment(segment, id, start, end, false).transpose())
                .collect::<Result<_, _>>()?
        };
        let flushed: Vec<(TimestampNs, Bucket)> = pending
            .range((id, start)..(id, end))
            .map(|((_, bucket), row)| (*bucket, row.clone()))
            .collect();
        if !flushed.is_empty() {
            sources.push(Source::memory(flushed));
        }
        if let Some(row) = open
            && start <= row.start
            && row.start < end
        {
            sources.push(Source::memory(vec![(row.start, row.clone())]));
        }
        let mut merged = MergedPoints::new(sources);
        let mut sum = Bucket::empty(start);
        while let Some((_, row)) = merged.next_point()? {
            sum.merge(&row);
        }
        Ok(sum)
    }

    /// Writes the rows of one flush as segments, one per tier partition.
    /// Writes the rows of one flush, followed by the open rows of the
    /// series in `open` as provisional rows, into one segment per tier and
    /// partition. Series are written in id order one at a time, so the
    /// open rows are expanded one series at a time.
    pub(super) fn write_rollup_segments(
        &self,
        rows: Vec<Vec<(SeriesId, Bucket)>>,
        open: &IdMap<OpenRows>,
        marker: u64,
        marker_from: u64,
    ) -> Result<Vec<Segment<Bucket>>, StoreError> {
        let mut open_ids: Vec<SeriesId> = open.keys().copied().collect();
        open_ids.sort_unstable();
        let seal = self.seal_with();
        let mut segments = Vec::new();
        for (tier, mut closed) in rows.into_iter().enumerate() {
            // A later row of the same series and bucket replaces an earlier
            // one: stable sort, then keep the last of each run.
            closed.sort_by_key(|(id, row)| (*id, row.start));
            let partition_ns = self.tier_partition_ns(tier);
            let tier_byte = u8::try_from(tier + 1).expect("at most 254 tiers");
            let mut writers: std::collections::BTreeMap<Partition, (u64, SegmentWriter<Bucket>)> =
                std::collections::BTreeMap::new();
            let mut closed = closed.into_iter().peekable();
            let mut open_ids = open_ids.iter().copied().peekable();
            let mut series_rows: Vec<(TimestampNs, Bucket)> = Vec::new();
            loop {
                let id = match (closed.peek(), open_ids.peek()) {
                    (Some((a, _)), Some(b)) => (*a).min(*b),
                    (Some((a, _)), None) => *a,
                    (None, Some(b)) => *b,
                    (None, None) => break,
                };
                series_rows.clear();
                while let Some((_, row)) = closed.next_if(|(row_id, _)| *row_id == id) {
                    push_replacing(&mut series_rows, row);
                }
                if open_ids.next_if_eq(&id).is_some()
                    && let Some(Some(row)) = open.get(&id).and_then(|rows| rows.get(tier))
                {
                    push_replacing(&mut series_rows, row.to_bucket());
                }
                let mut start = 0;
                while start < series_rows.len() {
                    let partition = Partition::of(series_rows[start].0, partition_ns);
                    let len = series_rows[start..].partition_point(|row| row.0 < partition.end);
                    let (_, writer) = match writers.entry(partition) {
                        std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                        std::collections::btree_map::Entry::Vacant(entry) => {
                            let seq = self.take_seq();
                            let writer = SegmentWriter::<Bucket>::create(
                                &self.dir,
                                seq,
                                marker_from,
                                &seal,
                            )?;
                            entry.insert((seq, writer))
                        }
                    };
                    writer.write_series(id, series_rows[start..start + len].iter().map(Ok))?;
                    start += len;
                }
            }
            for (partition, (seq, writer)) in writers {
                segments.push(writer.finish(
                    marker,
                    SegmentMeta::flushed(tier_byte, partition, seq, marker_from),
                )?);
            }
        }
        Ok(segments)
    }

    /// Returns the coarsest tier whose interval divides every bucket edge, if
    /// any.
    pub(super) fn choose_tier(&self, bounds: &[(TimestampNs, TimestampNs)]) -> Option<usize> {
        (0..self.tier_count()).rev().find(|tier| {
            let interval = self.options.rollup_intervals[*tier];
            bounds.iter().all(|(start, end)| {
                start.rem_euclid(interval) == 0 && end.rem_euclid(interval) == 0
            })
        })
    }

    /// Aggregates series `id` into `bounds` from tier `tier` (`None`: raw
    /// points), handing the part that rows do not cover yet to the next
    /// finer tier. `cutoffs` are the retention cutoffs of raw data and of
    /// each tier for the series' tenant.
    pub(super) fn summarize(
        &self,
        id: SeriesId,
        tier: Option<usize>,
        bounds: &[(TimestampNs, TimestampNs)],
        head_min: TimestampNs,
        cutoffs: &[TimestampNs],
    ) -> Result<Vec<Bucket>, StoreError> {
        let mut buckets: Vec<Bucket> = bounds
            .iter()
            .map(|(start, _)| Bucket::empty(*start))
            .collect();
        let (Some(first), Some(last)) = (bounds.first(), bounds.last()) else {
            return Ok(buckets);
        };
        let Some(tier) = tier else {
            let lo = first.0.max(cutoffs[0]);
            let mut merged = self.merged_points_by_id(id, lo, last.1);
            add_points(&mut merged, bounds, &mut buckets)?;
            return Ok(buckets);
        };

        let interval = self.options.rollup_intervals[tier];
        let cut = if head_min < last.1 {
            bucket_start(head_min, interval).max(first.0)
        } else {
            last.1
        };
        if first.0 < cut {
            let lo = first.0.max(cutoffs[tier + 1]);
            let mut rows = self.merged_rows(id, tier, lo, cut);
            let mut index = 0;
            while let Some((start, row)) = rows.next_point()? {
                while index < bounds.len() && start >= bounds[index].1 {
                    index += 1;
                }
                match buckets.get_mut(index) {
                    Some(bucket) if start >= bounds[index].0 => bucket.merge(&row),
                    Some(_) => {}
                    None => break,
                }
            }
        }
        if cut < last.1 {
            let finer = tier.checked_sub(1);
            let rest: Vec<(usize, (TimestampNs, TimestampNs))> = bounds
                .iter()
                .enumerate()
                .filter(|(_, (_, end))| *end > cut)
                .map(|(index, (start, end))| (index, ((*start).max(cut), *end)))
                .collect();
            let rest_bounds: Vec<(TimestampNs, TimestampNs)> =
                rest.iter().map(|(_, bound)| *bound).collect();
            let parts = self.summarize(id, finer, &rest_bounds, head_min, cutoffs)?;
            for ((index, _), part) in rest.iter().zip(parts) {
                buckets[*index].merge(&part);
            }
        }
        Ok(buckets)
    }

    /// Rows of one tier for buckets starting in `[lo, end)`: stored rows
    /// with last-write-wins, and the in-memory open row on top.
    fn merged_rows(
        &self,
        id: SeriesId,
        tier: usize,
        lo: TimestampNs,
        end: TimestampNs,
    ) -> MergedPoints<Bucket> {
        if lo >= end {
            return MergedPoints::empty();
        }
        let state = self.state.read();
        let sources: Result<Vec<Source<Bucket>>, StoreError> = state.rollups[tier]
            .iter()
            .filter(|segment| segment.meta.partition.end > lo && segment.meta.partition.start < end)
            .filter_map(|segment| Source::segment(segment, id, lo, end, false).transpose())
            .collect();
        let mut sources = match sources {
            Ok(sources) => sources,
            Err(err) => return MergedPoints::from_sources(Err(err)),
        };
        if let Some(Some(row)) = state.open_rows.get(&id).and_then(|rows| rows.get(tier))
            && lo <= row.start()
            && row.start() < end
        {
            sources.push(Source::memory(vec![(row.start(), row.to_bucket())]));
        }
        MergedPoints::new(sources)
    }

    /// Builds every rollup tier from the raw points, replacing what the
    /// tiers held: for directories of format 1, and after the configured
    /// intervals changed.
    pub(super) fn rebuild_rollups(&self) -> Result<(), StoreError> {
        let tiers = self.tier_count();
        let ids: Vec<SeriesId> = {
            let state = self.state.read();
            state
                .catalog
                .series_by_tenant()
                .flat_map(|(_, ids)| ids.collect::<Vec<_>>())
                .collect()
        };
        let marker = self.state.read().durable_marker;
        let intervals = self.options.rollup_intervals.clone();
        let mut rows: Vec<Vec<(SeriesId, Bucket)>> = vec![Vec::new(); tiers];
        let mut open_rows: IdMap<OpenRows> = IdMap::default();
        let mut sorted_ids = ids;
        sorted_ids.sort_unstable();
        for id in sorted_ids {
            let mut merged = self.merged_points_by_id(id, ALL_LO, ALL_END);
            let mut open: FoldRows = vec![None; tiers];
            while let Some((ts, value)) = merged.next_point()? {
                for (tier, row) in open.iter_mut().enumerate() {
                    let start = bucket_start(ts, intervals[tier]);
                    if let Some(closed) = fold_newer(row, start, ts, &value) {
                        rows[tier].push((id, closed));
                    }
                }
            }
            open_rows.insert(id, compact(open));
        }
        let segments = self.write_rollup_segments(rows, &open_rows, marker, marker)?;
        let mut state = self.state.write();
        for segment in segments {
            let tier = usize::from(segment.meta.tier) - 1;
            state.rollups[tier].push(std::sync::Arc::new(segment));
        }
        for list in &mut state.rollups {
            super::sort_by_priority(list);
        }
        state.open_rows = open_rows;
        Ok(())
    }
}

/// Adds a point newer than the open row's last one to the open row when it
/// falls into the row's bucket (`start`), else starts a new open row with
/// it. Returns the row that was closed, if any.
fn fold_newer(
    row: &mut Option<Bucket>,
    start: TimestampNs,
    ts: TimestampNs,
    value: &Value,
) -> Option<Bucket> {
    if let Some(open_row) = row
        && open_row.start == start
    {
        open_row.add(ts, value.clone());
        return None;
    }
    let mut fresh = Bucket::empty(start);
    fresh.add(ts, value.clone());
    row.replace(fresh)
}

/// Adds ascending points to the buckets of ascending, contiguous bounds.
pub(super) fn add_points(
    merged: &mut MergedPoints<Value>,
    bounds: &[(TimestampNs, TimestampNs)],
    buckets: &mut [Bucket],
) -> Result<(), StoreError> {
    let mut index = 0;
    while let Some((ts, value)) = merged.next_point()? {
        while index < bounds.len() && ts >= bounds[index].1 {
            index += 1;
        }
        match buckets.get_mut(index) {
            Some(bucket) if ts >= bounds[index].0 => bucket.add(ts, value),
            Some(_) => {}
            None => break,
        }
    }
    Ok(())
}

// Keeps the per-series cost that the memory budget counts on.
const _: () = assert!(size_of::<Option<CompactRow>>() <= 80);

#[cfg(test)]
mod tests {
    use super::*;

    fn row_of(points: &[(TimestampNs, Value)]) -> Bucket {
        let mut row = Bucket::empty(0);
        for (ts, value) in points {
            row.add(*ts, value.clone());
        }
        row
    }

    #[test]
    fn compact_rows_give_back_the_same_bucket() {
        let rows = [
            row_of(&[(1, Value::Float(1.5)), (2, Value::Float(-0.0))]),
            row_of(&[(1, Value::Int(i64::MIN)), (5, Value::Int(7))]),
            row_of(&[(1, Value::Int(3)), (2, Value::Float(f64::NAN))]),
            row_of(&[(1, Value::Float(2.0)), (2, Value::Bool(true))]),
            row_of(&[(1, Value::Str("on".into()))]),
        ];
        for (n, row) in rows.into_iter().enumerate() {
            let compact = CompactRow::new(row.clone());
            assert_eq!(matches!(compact, CompactRow::Numeric(_)), n < 3, "row {n}");
            let back = compact.to_bucket();
            // Compares through Debug so that NaN equals NaN.
            assert_eq!(format!("{back:?}"), format!("{row:?}"), "row {n}");
            assert_eq!(compact.start(), row.start);
        }
    }
}
