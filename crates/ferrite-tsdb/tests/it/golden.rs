//! Golden results for bucket alignment, empty buckets, oversized intervals
//! and paging. Each case runs with the data in the head, in segments, after
//! a reopen and after compaction, because each path merges differently.

use std::path::Path;

use ferrite_core::Value;
use ferrite_tsdb::{Bucket, SeriesKey, Store, StoreOptions};

use crate::NANOS_PER_MS;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Where the points are when the queries run.
#[derive(Debug, Clone, Copy)]
enum Placement {
    Head,
    /// Three segments, one per third of the points.
    Segments,
    /// Half the points flushed, the other half still in the head.
    SegmentsAndHead,
    Reopened,
    Compacted,
}

const PLACEMENTS: [Placement; 5] = [
    Placement::Head,
    Placement::Segments,
    Placement::SegmentsAndHead,
    Placement::Reopened,
    Placement::Compacted,
];

fn series(device: &str, key: &str) -> SeriesKey {
    SeriesKey::new("t1", device, key)
}

/// Opens a store in `dir` holding `points` of `series`, placed as asked.
fn store_with(
    dir: &Path,
    series: &SeriesKey,
    points: &[(i64, Value)],
    placement: Placement,
) -> Store {
    let options = StoreOptions {
        background_maintenance: false,
        ..StoreOptions::default()
    };
    let store = Store::open(dir, options.clone()).unwrap();
    let write = |chunk: &[(i64, Value)]| {
        let batch: Vec<(&str, i64, Value)> = chunk
            .iter()
            .map(|(ts, value)| (series.key.as_str(), *ts, value.clone()))
            .collect();
        store.write(&series.tenant, &series.device, &batch).unwrap();
    };

    match placement {
        Placement::Head => write(points),
        Placement::SegmentsAndHead => {
            let (flushed, head) = points.split_at(points.len() / 2);
            write(flushed);
            store.flush(1).unwrap();
            write(head);
        }
        Placement::Segments | Placement::Reopened | Placement::Compacted => {
            let third = points.len().div_ceil(3).max(1);
            for (i, chunk) in points.chunks(third).enumerate() {
                write(chunk);
                store.flush(i as u64 + 1).unwrap();
            }
        }
    }

    match placement {
        Placement::Reopened => {
            drop(store);
            Store::open(dir, options).unwrap()
        }
        Placement::Compacted => {
            store.compact().unwrap();
            let mut days: Vec<i64> = points
                .iter()
                .map(|(ts, _)| ts.div_euclid(ferrite_tsdb::DAY_NS))
                .collect();
            days.dedup();
            assert_eq!(
                crate::segment_files(dir).len(),
                days.len(),
                "one segment per day partition"
            );
            store
        }
        _ => store,
    }
}

fn ms(value: i64) -> i64 {
    value * NANOS_PER_MS
}

fn avg(bucket: &Bucket) -> Option<f64> {
    Some(bucket.sum? / bucket.numeric_count as f64)
}

/// Builds a series with one point every 10 minutes from 2024-03-05T23:00Z
/// to 2024-03-07T01:00Z inclusive, each valued with its index 0..=156, and
/// leaves out the indexes in `skip`.
fn ten_minute_points(skip: Option<std::ops::RangeInclusive<i64>>) -> Vec<(i64, Value)> {
    let first_ms = 1_709_679_600_000;
    let last_ms = 1_709_773_200_000;
    assert_eq!((last_ms - first_ms) / (10 * MINUTE_MS), 156);
    (0..=156)
        .filter(|i| !skip.as_ref().is_some_and(|skip| skip.contains(i)))
        .map(|i| (ms(first_ms + i * 10 * MINUTE_MS), Value::Float(i as f64)))
        .collect()
}

#[test]
fn hourly_buckets_over_one_day() {
    let start = ms(1_709_683_200_000);
    let end = ms(1_709_769_600_000);
    let key = series("d1", "temp");

    for placement in PLACEMENTS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &key, &ten_minute_points(None), placement);

        let buckets = store.aggregate(&key, start, end, ms(HOUR_MS)).unwrap();

        assert_eq!(buckets.len(), 24, "{placement:?}");
        for (i, bucket) in buckets.iter().enumerate() {
            let i64_i = i as i64;
            let low = (6 + 6 * i) as f64;
            let high = (11 + 6 * i) as f64;
            assert_eq!(
                bucket.start,
                start + i64_i * ms(HOUR_MS),
                "{placement:?} bucket {i}"
            );
            assert_eq!(bucket.count, 6, "{placement:?} bucket {i}");
            assert_eq!(bucket.numeric_count, 6, "{placement:?} bucket {i}");
            assert_eq!(
                avg(bucket),
                Some(8.5 + 6.0 * i as f64),
                "{placement:?} bucket {i}"
            );
            assert_eq!(bucket.min, Some(low), "{placement:?} bucket {i}");
            assert_eq!(bucket.max, Some(high), "{placement:?} bucket {i}");
            assert_eq!(
                bucket.first,
                Some((start + i64_i * ms(HOUR_MS), Value::Float(low))),
                "{placement:?} bucket {i}"
            );
            assert_eq!(
                bucket.last,
                Some((
                    start + i64_i * ms(HOUR_MS) + ms(50 * MINUTE_MS),
                    Value::Float(high)
                )),
                "{placement:?} bucket {i}"
            );
        }

        // The point at `end` (index 150) is outside the half-open range.
        let total: u64 = buckets.iter().map(|b| b.count).sum();
        assert_eq!(total, 144, "{placement:?}");
        assert_eq!(buckets[23].max, Some(149.0), "{placement:?}");
    }
}

#[test]
fn hourly_buckets_with_gap_are_empty() {
    let start = ms(1_709_683_200_000);
    let end = ms(1_709_769_600_000);
    let key = series("d1", "temp");

    for placement in PLACEMENTS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(
            dir.path(),
            &key,
            &ten_minute_points(Some(18..=29)),
            placement,
        );

        let buckets = store.aggregate(&key, start, end, ms(HOUR_MS)).unwrap();

        assert_eq!(buckets.len(), 24, "{placement:?}");
        for (i, bucket) in buckets.iter().enumerate() {
            if i == 2 || i == 3 {
                let empty = Bucket {
                    start: start + i as i64 * ms(HOUR_MS),
                    count: 0,
                    numeric_count: 0,
                    sum: None,
                    min: None,
                    max: None,
                    first: None,
                    last: None,
                };
                assert_eq!(*bucket, empty, "{placement:?} bucket {i}");
                continue;
            }
            assert_eq!(bucket.count, 6, "{placement:?} bucket {i}");
            assert_eq!(
                bucket.min,
                Some((6 + 6 * i) as f64),
                "{placement:?} bucket {i}"
            );
            assert_eq!(
                bucket.max,
                Some((11 + 6 * i) as f64),
                "{placement:?} bucket {i}"
            );
            assert_eq!(
                bucket.last.as_ref().map(|(_, value)| value.clone()),
                Some(Value::Float((11 + 6 * i) as f64)),
                "{placement:?} bucket {i}"
            );
        }
    }
}

/// Builds a series with one point per hour, on the hour, from
/// 2018-12-30T00:00Z to 2019-01-17T00:00Z inclusive.
fn hourly_points() -> Vec<(i64, Value)> {
    let first_ms = 1_546_128_000_000;
    let last_ms = 1_547_683_200_000;
    (0..=(last_ms - first_ms) / HOUR_MS)
        .map(|i| (ms(first_ms + i * HOUR_MS), Value::Int(i)))
        .collect()
}

#[test]
fn two_day_buckets_start_at_range_start() {
    let start = ms(1_546_300_800_000);
    let end = ms(1_547_596_800_000);
    let key = series("d2", "temp");

    for placement in PLACEMENTS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &key, &hourly_points(), placement);

        let buckets = store.aggregate(&key, start, end, ms(2 * DAY_MS)).unwrap();

        let counts: Vec<u64> = buckets.iter().map(|b| b.count).collect();
        assert_eq!(
            counts,
            vec![48, 48, 48, 48, 48, 48, 48, 24],
            "{placement:?}"
        );
        let starts: Vec<i64> = buckets.iter().map(|b| b.start).collect();
        let expected_starts: Vec<i64> = (0..8).map(|i| start + i * ms(2 * DAY_MS)).collect();
        assert_eq!(starts, expected_starts, "{placement:?}");
        assert_eq!(
            buckets[0].first.as_ref().map(|p| p.0),
            Some(start),
            "{placement:?}"
        );
        assert_eq!(
            buckets[7].last.as_ref().map(|p| p.0),
            Some(end - ms(HOUR_MS)),
            "{placement:?}"
        );
    }
}

#[test]
fn interval_longer_than_range_gives_one_bucket() {
    let start = ms(1_546_300_800_000);
    let end = ms(1_547_596_800_000);
    let key = series("d2", "temp");

    for placement in PLACEMENTS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &key, &hourly_points(), placement);

        let buckets = store.aggregate(&key, start, end, ms(730 * DAY_MS)).unwrap();

        assert_eq!(buckets.len(), 1, "{placement:?}");
        assert_eq!(buckets[0].start, start, "{placement:?}");
        assert_eq!(buckets[0].count, 360, "{placement:?}");
        assert_eq!(buckets[0].numeric_count, 360, "{placement:?}");
    }
}

#[test]
fn paging_250_points_by_100() {
    let t0 = ms(1_714_953_600_000);
    let key = series("d5", "v");
    let points: Vec<(i64, Value)> = (0..250)
        .map(|i| (t0 + ms(i * 1000), Value::Int(i)))
        .collect();

    for placement in PLACEMENTS {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with(dir.path(), &key, &points, placement);

        let mut pages = Vec::new();
        let mut after = None;
        loop {
            let page = store.range(&key, t0, t0 + ms(250_000), after, 100).unwrap();
            after = page.points.last().map(|p| p.0);
            let has_more = page.has_more;
            pages.push(page);
            if !has_more {
                break;
            }
            assert!(pages.len() < 10, "{placement:?}: paging does not end");
        }

        let sizes: Vec<usize> = pages.iter().map(|p| p.points.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50], "{placement:?}");
        let all: Vec<(i64, Value)> = pages.into_iter().flat_map(|p| p.points).collect();
        assert_eq!(all, points, "{placement:?}");

        let empty = store.range(&key, t0, t0, None, 100).unwrap();
        assert!(empty.points.is_empty(), "{placement:?}");
        assert!(!empty.has_more, "{placement:?}");
    }
}

#[test]
fn aggregate_bucket_labels_within_range() {
    let dir = tempfile::tempdir().unwrap();
    let key = series("d3", "v");
    let store = store_with(dir.path(), &key, &[(5, Value::Int(1))], Placement::Head);

    let buckets = store.aggregate(&key, 1, 11, 3).unwrap();

    let starts: Vec<i64> = buckets.iter().map(|b| b.start).collect();
    assert_eq!(starts, vec![1, 4, 7, 10]);
    assert_eq!(buckets[1].count, 1);
    assert!(store.aggregate(&key, 1, 11, 0).is_err());
    assert!(store.aggregate(&key, 1, 11, -5).is_err());
    assert!(store.aggregate(&key, 11, 1, 3).unwrap().is_empty());
}

#[test]
fn aggregate_across_whole_timestamp_range() {
    let dir = tempfile::tempdir().unwrap();
    let key = series("d3", "v");
    let low = ferrite_core::MIN_TIMESTAMP_NS;
    let high = ferrite_core::MAX_TIMESTAMP_NS;
    let points = vec![
        (low, Value::Int(-1)),
        (0, Value::Int(0)),
        (high, Value::Int(1)),
    ];
    let store = store_with(dir.path(), &key, &points, Placement::Segments);

    let buckets = store.aggregate(&key, low, i64::MAX, i64::MAX).unwrap();

    assert_eq!(buckets.len(), 2);
    assert_eq!(buckets[0].count + buckets[1].count, 3);
    let page = store.range(&key, i64::MIN, i64::MAX, None, 10).unwrap();
    assert_eq!(page.points, points);
}
