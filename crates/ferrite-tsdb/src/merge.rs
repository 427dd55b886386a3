//! Merging the sorted points of one series from several sources (segments in
//! creation order, then the frozen head, then the head) with last-write-wins:
//! for equal timestamps the latest source wins.

use std::sync::Arc;

use ferrite_core::{TimestampNs, Value};

use crate::catalog::SeriesId;
use crate::error::StoreError;
use crate::item::StoredValue;
use crate::segment::{BlockRef, IndexEntry, Segment};

/// Points of one series from one source, ascending and unique by timestamp,
/// restricted to `lo <= ts < end`.
pub(crate) struct Source<V: StoredValue = Value> {
    points: Vec<(TimestampNs, V)>,
    pos: usize,
    blocks: Option<BlockSource<V>>,
}

/// Blocks of one series in one segment that overlap the query, read one at a
/// time as the merge reaches them.
struct BlockSource<V: StoredValue> {
    segment: Arc<Segment<V>>,
    blocks: Vec<BlockRef>,
    next: usize,
    lo: TimestampNs,
    end: TimestampNs,
    /// Compaction sets this to salvage the readable blocks of a damaged
    /// segment. Queries leave it unset and get the `Corrupt` error.
    skip_damaged: bool,
    damaged: bool,
}

impl<V: StoredValue> Source<V> {
    /// Creates a source over points that are already sorted, unique and in
    /// range.
    pub(crate) fn memory(points: Vec<(TimestampNs, V)>) -> Source<V> {
        Source {
            points,
            pos: 0,
            blocks: None,
        }
    }

    /// Creates a source over the blocks of `id` in `segment` that overlap
    /// `lo <= ts < end`. Returns `None` when there are none.
    pub(crate) fn segment(
        segment: &Arc<Segment<V>>,
        id: SeriesId,
        lo: TimestampNs,
        end: TimestampNs,
        skip_damaged: bool,
    ) -> Result<Option<Source<V>>, StoreError> {
        Ok(segment
            .entry(id)?
            .and_then(|entry| Source::entry(segment, &entry, lo, end, skip_damaged)))
    }

    /// Creates a source over the blocks of `entry`, an index entry of
    /// `segment`, that overlap `lo <= ts < end`.
    pub(crate) fn entry(
        segment: &Arc<Segment<V>>,
        entry: &IndexEntry<V>,
        lo: TimestampNs,
        end: TimestampNs,
        skip_damaged: bool,
    ) -> Option<Source<V>> {
        if entry.max_ts < lo || entry.min_ts >= end {
            return None;
        }
        // Blocks are sorted and disjoint, so the overlapping ones are a run.
        let first = entry.blocks.partition_point(|b| b.max_ts < lo);
        let last = entry.blocks.partition_point(|b| b.min_ts < end);
        if first >= last {
            return None;
        }

        Some(Source {
            points: Vec::new(),
            pos: 0,
            blocks: Some(BlockSource {
                segment: Arc::clone(segment),
                blocks: entry.blocks[first..last].to_vec(),
                next: 0,
                lo,
                end,
                skip_damaged,
                damaged: false,
            }),
        })
    }

    fn peek_ts(&mut self) -> Result<Option<TimestampNs>, StoreError> {
        loop {
            if let Some(point) = self.points.get(self.pos) {
                return Ok(Some(point.0));
            }
            let Some(blocks) = &mut self.blocks else {
                return Ok(None);
            };
            match blocks.next_points()? {
                Some(points) => {
                    self.points = points;
                    self.pos = 0;
                }
                None => return Ok(None),
            }
        }
    }

    /// Moves the current point out. Call only after `peek_ts` returned a
    /// timestamp.
    fn take(&mut self) -> (TimestampNs, V) {
        let point = &mut self.points[self.pos];
        self.pos += 1;
        (point.0, std::mem::replace(&mut point.1, V::placeholder()))
    }

    fn skip(&mut self) {
        self.pos += 1;
    }

    /// Sequence number of the segment when a damaged block was skipped.
    fn damaged_segment(&self) -> Option<u64> {
        self.blocks
            .as_ref()
            .filter(|blocks| blocks.damaged)
            .map(|blocks| blocks.segment.seq)
    }
}

impl<V: StoredValue> BlockSource<V> {
    fn next_points(&mut self) -> Result<Option<Vec<(TimestampNs, V)>>, StoreError> {
        while let Some(block) = self.blocks.get(self.next).copied() {
            self.next += 1;
            let mut points = match self.segment.read_block(&block) {
                Ok(points) => points,
                Err(err @ StoreError::Corrupt { .. }) if self.skip_damaged => {
                    tracing::error!(
                        error = %err,
                        segment = %self.segment.path.display(),
                        min_ts = block.min_ts,
                        max_ts = block.max_ts,
                        lost_points = block.count,
                        "skipping damaged block; its points are lost"
                    );
                    self.damaged = true;
                    continue;
                }
                Err(err) => return Err(err),
            };

            if block.min_ts < self.lo || block.max_ts >= self.end {
                points.retain(|p| self.lo <= p.0 && p.0 < self.end);
            }
            if !points.is_empty() {
                return Ok(Some(points));
            }
        }
        Ok(None)
    }
}

/// Ascending, deduplicated points of one series over all its sources.
pub(crate) struct MergedPoints<V: StoredValue = Value> {
    /// Oldest source first.
    sources: Vec<Source<V>>,
    /// Error met while finding the sources, returned by the first read.
    failed: Option<StoreError>,
}

impl<V: StoredValue> MergedPoints<V> {
    pub(crate) fn new(sources: Vec<Source<V>>) -> MergedPoints<V> {
        MergedPoints {
            sources,
            failed: None,
        }
    }

    /// Returns the sources found, or a merge whose first read returns the
    /// error met while finding them.
    pub(crate) fn from_sources(sources: Result<Vec<Source<V>>, StoreError>) -> MergedPoints<V> {
        match sources {
            Ok(sources) => MergedPoints::new(sources),
            Err(err) => MergedPoints {
                sources: Vec::new(),
                failed: Some(err),
            },
        }
    }

    pub(crate) fn empty() -> MergedPoints<V> {
        MergedPoints::new(Vec::new())
    }

    /// Returns the next point: the smallest timestamp among the sources,
    /// with the value of the newest source that has it.
    pub(crate) fn next_point(&mut self) -> Result<Option<(TimestampNs, V)>, StoreError> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        let mut min_ts: Option<TimestampNs> = None;
        for source in &mut self.sources {
            if let Some(ts) = source.peek_ts()? {
                min_ts = Some(min_ts.map_or(ts, |min| min.min(ts)));
            }
        }
        let Some(ts) = min_ts else {
            return Ok(None);
        };

        let mut winner = None;
        for source in self.sources.iter_mut().rev() {
            if source.peek_ts()? == Some(ts) {
                if winner.is_none() {
                    winner = Some(source.take());
                } else {
                    source.skip();
                }
            }
        }
        Ok(winner)
    }

    /// Sequence numbers of segments in which a damaged block was skipped.
    pub(crate) fn damaged_segments(&self) -> impl Iterator<Item = u64> + '_ {
        self.sources.iter().filter_map(Source::damaged_segment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Point;

    fn drain(merged: &mut MergedPoints) -> Vec<Point> {
        let mut points = Vec::new();
        while let Some(point) = merged.next_point().unwrap() {
            points.push(point);
        }
        points
    }

    #[test]
    fn merge_later_source_wins() {
        let older = Source::memory(vec![
            (1, Value::Int(1)),
            (3, Value::Int(3)),
            (5, Value::Int(5)),
        ]);
        let newer = Source::memory(vec![(2, Value::Int(20)), (3, Value::Int(30))]);
        let newest = Source::memory(vec![(3, Value::Int(300)), (6, Value::Int(600))]);
        let mut merged = MergedPoints::new(vec![older, newer, newest]);

        let points = drain(&mut merged);

        assert_eq!(
            points,
            vec![
                (1, Value::Int(1)),
                (2, Value::Int(20)),
                (3, Value::Int(300)),
                (5, Value::Int(5)),
                (6, Value::Int(600)),
            ]
        );
    }

    #[test]
    fn merge_of_no_sources_is_empty() {
        assert_eq!(MergedPoints::<Value>::empty().next_point().unwrap(), None);
    }
}
