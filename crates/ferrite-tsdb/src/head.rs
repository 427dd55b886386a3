//! The head: points written since the last flush, kept per series in
//! arrival order.
//!
//! Appending is a `Vec` push. Sorting and last-write-wins deduplication are
//! deferred to readers (queries and flush), which work on a sorted view and
//! leave the stored order unchanged.

use std::mem::size_of;

use ferrite_core::{TimestampNs, Value};

use crate::catalog::{IdMap, SeriesId};
use crate::encoding::Point;

/// Estimated bytes of one series entry besides its points: the struct, the
/// map key and the hash table's control byte and spare slot.
const SERIES_OVERHEAD_BYTES: usize = size_of::<HeadSeries>() + 2 * size_of::<SeriesId>() + 8;

/// The points of one series in the head.
#[derive(Clone)]
pub(crate) struct HeadSeries {
    points: Vec<Point>,
    /// True while every point is newer than the previous one, so that the
    /// stored order is already the sorted, deduplicated order.
    strictly_ascending: bool,
    /// Index of the point with the greatest timestamp; among points with the
    /// same timestamp, the one written last.
    latest: usize,
}

impl HeadSeries {
    fn new() -> HeadSeries {
        HeadSeries {
            points: Vec::new(),
            strictly_ascending: true,
            latest: 0,
        }
    }

    /// Appends a point and returns how many bytes the estimate grows by.
    fn push(&mut self, ts: TimestampNs, value: Value) -> usize {
        let capacity_before = self.points.capacity();
        let string_bytes = match &value {
            Value::Str(s) => s.len(),
            _ => 0,
        };

        if let Some(last) = self.points.last() {
            if ts <= last.0 {
                self.strictly_ascending = false;
            }
            if ts >= self.points[self.latest].0 {
                self.latest = self.points.len();
            }
        }
        self.points.push((ts, value));

        (self.points.capacity() - capacity_before) * size_of::<Point>() + string_bytes
    }

    fn estimated_bytes(&self) -> usize {
        let strings: usize = self
            .points
            .iter()
            .map(|(_, value)| match value {
                Value::Str(s) => s.len(),
                _ => 0,
            })
            .sum();
        SERIES_OVERHEAD_BYTES + self.points.capacity() * size_of::<Point>() + strings
    }

    /// Returns the smallest timestamp in the head.
    pub(crate) fn min_ts(&self) -> Option<TimestampNs> {
        if self.strictly_ascending {
            return self.points.first().map(|p| p.0);
        }
        self.points.iter().map(|p| p.0).min()
    }

    /// Returns the point with the greatest timestamp (the last written among
    /// equal timestamps).
    pub(crate) fn latest(&self) -> Option<&Point> {
        self.points.get(self.latest)
    }

    /// Points with `lo <= ts < end`, ascending, one per timestamp (the last
    /// written wins).
    pub(crate) fn sorted_view(&self, lo: TimestampNs, end: TimestampNs) -> Vec<&Point> {
        if self.strictly_ascending {
            let first = self.points.partition_point(|p| p.0 < lo);
            let last = self.points.partition_point(|p| p.0 < end);
            return self.points[first..last.max(first)].iter().collect();
        }

        let mut view: Vec<&Point> = self
            .points
            .iter()
            .filter(|p| lo <= p.0 && p.0 < end)
            .collect();
        // The sort is stable, so equal timestamps keep their arrival order
        // and the loop below keeps the last of each run.
        view.sort_by_key(|p| p.0);
        let mut deduplicated: Vec<&Point> = Vec::with_capacity(view.len());
        for point in view {
            match deduplicated.last_mut() {
                Some(last) if last.0 == point.0 => *last = point,
                _ => deduplicated.push(point),
            }
        }
        deduplicated
    }

    /// Cloned copy of [`HeadSeries::sorted_view`], for readers that release
    /// the store lock before they use the points.
    pub(crate) fn sorted_points(&self, lo: TimestampNs, end: TimestampNs) -> Vec<Point> {
        self.sorted_view(lo, end).into_iter().cloned().collect()
    }
}

/// Head data of all series, with a running memory estimate.
#[derive(Default, Clone)]
pub(crate) struct Head {
    series: IdMap<HeadSeries>,
    bytes: usize,
}

impl Head {
    pub(crate) fn push(&mut self, id: SeriesId, ts: TimestampNs, value: Value) {
        let series = self.series.entry(id).or_insert_with(|| {
            self.bytes += SERIES_OVERHEAD_BYTES;
            HeadSeries::new()
        });
        self.bytes += series.push(ts, value);
    }

    pub(crate) fn get(&self, id: SeriesId) -> Option<&HeadSeries> {
        self.series.get(&id)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Estimated heap bytes of the head's points and series entries.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn series(&self) -> impl Iterator<Item = (SeriesId, &HeadSeries)> {
        self.series.iter().map(|(id, series)| (*id, series))
    }

    pub(crate) fn remove(&mut self, id: SeriesId) {
        if let Some(series) = self.series.remove(&id) {
            self.bytes = self.bytes.saturating_sub(series.estimated_bytes());
        }
    }

    /// Appends every point of `newer` after the points already here, so that
    /// `newer` wins for equal timestamps.
    pub(crate) fn append(&mut self, newer: Head) {
        for (id, series) in newer.series {
            for (ts, value) in series.points {
                self.push(id, ts, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timestamps(view: &[&Point]) -> Vec<TimestampNs> {
        view.iter().map(|p| p.0).collect()
    }

    #[test]
    fn head_sorted_view_last_write_wins() {
        let mut head = Head::default();
        let id = SeriesId(1);
        head.push(id, 30, Value::Int(1));
        head.push(id, 10, Value::Int(2));
        head.push(id, 30, Value::Int(3));
        head.push(id, 20, Value::Int(4));
        head.push(id, 10, Value::Int(5));

        let series = head.get(id).unwrap();
        let view = series.sorted_view(i64::MIN, i64::MAX);

        assert_eq!(timestamps(&view), vec![10, 20, 30]);
        assert_eq!(view[0].1, Value::Int(5));
        assert_eq!(view[2].1, Value::Int(3));
        assert_eq!(series.latest(), Some(&(30, Value::Int(3))));
    }

    #[test]
    fn head_sorted_view_bounds() {
        let mut head = Head::default();
        let id = SeriesId(1);
        for ts in 0..10 {
            head.push(id, ts, Value::Bool(true));
        }
        let series = head.get(id).unwrap();

        assert_eq!(timestamps(&series.sorted_view(3, 6)), vec![3, 4, 5]);
        assert!(series.sorted_view(6, 3).is_empty());
        assert!(series.sorted_view(10, 20).is_empty());
    }

    #[test]
    fn head_bytes_track_push_and_remove() {
        let mut head = Head::default();
        head.push(SeriesId(1), 1, Value::Str("x".repeat(1000)));
        head.push(SeriesId(2), 1, Value::Float(1.0));
        assert!(head.bytes() >= 1000 + 2 * size_of::<Point>());

        head.remove(SeriesId(1));
        head.remove(SeriesId(2));
        assert_eq!(head.bytes(), 0);
    }
}
