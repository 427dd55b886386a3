//! Behaviour of the public API: latest and keys, write validation, paging
//! edge cases, mixed value types, delete, flush and concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use ferrite_core::{MAX_TIMESTAMP_NS, MIN_TIMESTAMP_NS, Value};
use ferrite_tsdb::{MAX_NAME_LEN, SeriesKey, Store, StoreError, StoreOptions};

use crate::{open, segment_files};

fn series(key: &str) -> SeriesKey {
    SeriesKey::new("t1", "d1", key)
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
}

#[test]
fn latest_takes_greatest_timestamp_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(
            "t1",
            "d1",
            &[
                ("temp", 20, Value::Float(2.0)),
                ("temp", 10, Value::Float(1.0)),
                ("b_status", 5, Value::Str("ok".into())),
                ("a_on", 7, Value::Bool(true)),
            ],
        )
        .unwrap();
    store.flush(1).unwrap();
    // Older than the flushed latest: must not replace it.
    store
        .write("t1", "d1", &[("temp", 15, Value::Float(1.5))])
        .unwrap();
    // Same timestamp as the flushed latest: the later write wins.
    store
        .write("t1", "d1", &[("b_status", 5, Value::Str("late".into()))])
        .unwrap();

    let expected = vec![
        ("a_on".to_string(), 7, Value::Bool(true)),
        ("b_status".to_string(), 5, Value::Str("late".into())),
        ("temp".to_string(), 20, Value::Float(2.0)),
    ];
    assert_eq!(store.latest("t1", "d1"), expected);
    assert_eq!(store.keys("t1", "d1"), vec!["a_on", "b_status", "temp"]);

    store.flush(2).unwrap();
    assert_eq!(store.latest("t1", "d1"), expected);
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.latest("t1", "d1"),
        expected,
        "rebuilt from segment indexes"
    );
    assert!(store.latest("t1", "unknown").is_empty());
    assert!(store.keys("t2", "d1").is_empty());
}

#[test]
fn write_rejects_invalid_batch_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let long_name = "k".repeat(MAX_NAME_LEN + 1);
    let invalid: Vec<(&str, i64, Value)> = vec![
        ("temp", MAX_TIMESTAMP_NS + 1, Value::Int(1)),
        ("temp", MIN_TIMESTAMP_NS - 1, Value::Int(1)),
        ("temp", 1, Value::Float(f64::NAN)),
        ("temp", 1, Value::Float(f64::INFINITY)),
        ("temp", 1, Value::Float(f64::NEG_INFINITY)),
        (long_name.as_str(), 1, Value::Int(1)),
    ];

    for point in invalid {
        let batch = [("ok", 1, Value::Int(1)), point.clone()];
        let result = store.write("t1", "d1", &batch);
        assert!(
            matches!(result, Err(StoreError::InvalidArgument(_))),
            "{point:?} gave {result:?}"
        );
    }
    assert!(matches!(
        store.write(&long_name, "d1", &[("ok", 1, Value::Int(1))]),
        Err(StoreError::InvalidArgument(_))
    ));

    assert!(
        store.keys("t1", "d1").is_empty(),
        "nothing of a rejected batch is stored"
    );
    assert_eq!(store.head_bytes(), 0);

    let edges = [
        ("temp", MIN_TIMESTAMP_NS, Value::Int(1)),
        ("temp", MAX_TIMESTAMP_NS, Value::Int(2)),
    ];
    store.write("t1", "d1", &edges).unwrap();
    store.flush(1).unwrap();
    let page = store
        .range(&series("temp"), i64::MIN, i64::MAX, None, 10)
        .unwrap();
    assert_eq!(
        page.points,
        vec![
            (MIN_TIMESTAMP_NS, Value::Int(1)),
            (MAX_TIMESTAMP_NS, Value::Int(2))
        ]
    );
}

#[test]
fn range_cursor_and_limit_edges() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batch: Vec<(&str, i64, Value)> = (0..10).map(|i| ("v", i * 10, Value::Int(i))).collect();
    store.write("t1", "d1", &batch).unwrap();
    let key = series("v");

    let page = store.range(&key, 0, 100, Some(45), 3).unwrap();
    assert_eq!(
        page.points,
        vec![
            (50, Value::Int(5)),
            (60, Value::Int(6)),
            (70, Value::Int(7))
        ]
    );
    assert!(page.has_more);

    let page = store.range(&key, 0, 100, Some(90), 3).unwrap();
    assert!(page.points.is_empty());
    assert!(!page.has_more);

    let page = store.range(&key, 0, 100, Some(i64::MAX), 3).unwrap();
    assert!(page.points.is_empty());
    assert!(!page.has_more);

    let page = store.range(&key, 0, 100, None, 0).unwrap();
    assert!(page.points.is_empty());
    assert!(page.has_more, "limit 0 still reports that points exist");

    let page = store.range(&key, 0, 90, None, 9).unwrap();
    assert_eq!(page.points.len(), 9);
    assert!(!page.has_more, "the point at `end` is outside the range");

    let unknown = store.range(&series("nope"), 0, 100, None, 10).unwrap();
    assert!(unknown.points.is_empty());
    assert!(!unknown.has_more);
}

#[test]
fn aggregate_mixed_value_types() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(
            "t1",
            "d1",
            &[
                ("v", 1, Value::Str("start".into())),
                ("v", 2, Value::Int(4)),
                ("v", 3, Value::Bool(true)),
                ("v", 4, Value::Float(-0.5)),
                ("v", 5, Value::Bool(false)),
                ("v", 12, Value::Str("only text".into())),
            ],
        )
        .unwrap();

    let buckets = store.aggregate(&series("v"), 0, 20, 10).unwrap();

    assert_eq!(buckets.len(), 2);
    let first = &buckets[0];
    assert_eq!(first.count, 5);
    assert_eq!(first.numeric_count, 2);
    assert_eq!(first.sum, Some(3.5));
    assert_eq!(first.min, Some(-0.5));
    assert_eq!(first.max, Some(4.0));
    assert_eq!(first.first, Some((1, Value::Str("start".into()))));
    assert_eq!(first.last, Some((5, Value::Bool(false))));

    let second = &buckets[1];
    assert_eq!(second.count, 1);
    assert_eq!(second.numeric_count, 0);
    assert_eq!((second.sum, second.min, second.max), (None, None, None));
    assert_eq!(second.last, Some((12, Value::Str("only text".into()))));
}

#[test]
fn delete_device_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write("t1", "d1", &[("temp", 1, Value::Int(1))])
        .unwrap();
    store
        .write("t1", "d2", &[("temp", 1, Value::Int(2))])
        .unwrap();
    store.flush(1).unwrap();
    store
        .write("t1", "d1", &[("humidity", 2, Value::Int(3))])
        .unwrap();

    store.delete_device("t1", "d1").unwrap();

    assert!(store.keys("t1", "d1").is_empty());
    assert!(store.latest("t1", "d1").is_empty());
    assert!(
        store
            .range(&series("temp"), 0, 10, None, 10)
            .unwrap()
            .points
            .is_empty()
    );
    assert_eq!(store.keys("t1", "d2"), vec!["temp"]);

    store
        .write("t1", "d1", &[("temp", 5, Value::Int(5))])
        .unwrap();
    store.flush(2).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store.latest("t1", "d1"),
        vec![("temp".to_string(), 5, Value::Int(5))]
    );
    let points = store
        .range(&series("temp"), 0, 10, None, 10)
        .unwrap()
        .points;
    assert_eq!(
        points,
        vec![(5, Value::Int(5))],
        "points from before the delete stay gone"
    );

    store.compact().unwrap();
    let points = store
        .range(&series("temp"), 0, 10, None, 10)
        .unwrap()
        .points;
    assert_eq!(points, vec![(5, Value::Int(5))]);
    assert_eq!(store.keys("t1", "d2"), vec!["temp"]);
    store.delete_device("t9", "none").unwrap();
}

#[test]
fn flush_records_marker_and_empties_head() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        head_budget_bytes: 4096,
        merge_fan_in: 2,
        background_maintenance: false,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), options.clone()).unwrap();
    assert_eq!(store.durable_marker(), 0);
    assert!(!store.needs_flush());

    let batch: Vec<(&str, i64, Value)> =
        (0..200).map(|i| ("v", i, Value::Float(i as f64))).collect();
    store.write("t1", "d1", &batch).unwrap();
    assert!(store.head_bytes() >= 200 * 16);
    assert!(store.needs_flush());

    store.flush(7).unwrap();
    assert_eq!(store.head_bytes(), 0);
    assert_eq!(store.durable_marker(), 7);
    assert_eq!(segment_files(dir.path()).len(), 1);

    // Nothing to write and the same marker: no new file.
    store.flush(7).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);

    // Nothing to write but a new marker: it is recorded.
    store.flush(8).unwrap();
    assert_eq!(store.durable_marker(), 8);

    // A second segment of the same partition and level is merged with the
    // first by the next maintenance pass (fan-in 2).
    store
        .write("t1", "d1", &[("v", 1000, Value::Int(1))])
        .unwrap();
    store.flush(9).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);
    store.run_maintenance().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    drop(store);

    let store = Store::open(dir.path(), options).unwrap();
    assert_eq!(store.durable_marker(), 9);
    assert_eq!(
        store
            .range(&series("v"), 0, 2000, None, 1000)
            .unwrap()
            .points
            .len(),
        201
    );
}

#[test]
fn unflushed_writes_are_lost_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.write("t1", "d1", &[("v", 1, Value::Int(1))]).unwrap();
    store.flush(1).unwrap();
    store
        .write(
            "t1",
            "d1",
            &[("v", 1, Value::Int(2)), ("w", 2, Value::Int(3))],
        )
        .unwrap();
    drop(store);

    let store = open(dir.path());

    assert_eq!(
        store.latest("t1", "d1"),
        vec![("v".to_string(), 1, Value::Int(1))]
    );
    assert_eq!(store.durable_marker(), 1);
}

#[test]
fn concurrent_writes_flushes_and_queries() {
    const WRITERS: i64 = 2;
    const BATCHES: i64 = 2000;
    const BATCH: i64 = 50;

    let dir = tempfile::tempdir().unwrap();
    // The background thread compacts while writers, flushes and readers
    // run.
    let options = StoreOptions {
        head_budget_bytes: 16 * 1024,
        merge_fan_in: 3,
        maintenance_interval: std::time::Duration::from_millis(5),
        ..StoreOptions::default()
    };
    let store = Arc::new(Store::open(dir.path(), options).unwrap());
    let done = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let store = Arc::clone(&store);
            thread::spawn(move || {
                let device = format!("d{writer}");
                for batch in 0..BATCHES {
                    let points: Vec<(&str, i64, Value)> = (0..BATCH)
                        .map(|i| ("v", batch * BATCH + i, Value::Int(batch * BATCH + i)))
                        .collect();
                    store.write("t1", &device, &points).unwrap();
                }
            })
        })
        .collect();

    let flusher = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut marker = 0;
            while !done.load(Ordering::Relaxed) {
                marker += 1;
                store.flush(marker).unwrap();
            }
            marker
        })
    };

    // Points arrive in order per device, so a reader must always see a
    // gap-free prefix 0..n, whichever sources hold it at that moment.
    let reader = {
        let store = Arc::clone(&store);
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let key = SeriesKey::new("t1", "d0", "v");
            let mut checks = 0;
            while !done.load(Ordering::Relaxed) {
                let page = store.range(&key, 0, i64::MAX, None, usize::MAX).unwrap();
                for (i, (ts, value)) in page.points.iter().enumerate() {
                    assert_eq!(*ts, i as i64);
                    assert_eq!(*value, Value::Int(i as i64));
                }
                checks += 1;
            }
            checks
        })
    };

    for writer in writers {
        writer.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let last_marker = flusher.join().unwrap();
    assert!(reader.join().unwrap() > 0);

    store.flush(last_marker + 1).unwrap();
    for writer in 0..WRITERS {
        let key = SeriesKey::new("t1", format!("d{writer}"), "v");
        let page = store.range(&key, 0, i64::MAX, None, usize::MAX).unwrap();
        assert_eq!(page.points.len() as i64, BATCHES * BATCH);
    }
    // Tiered merges leave at most `fan_in - 1` segments per level once
    // the background thread has caught up. On a slow machine it may still
    // be merging when the writers stop, so the test waits for it (bounded).
    let levels = (last_marker as f64).log(3.0).ceil() as usize + 1;
    let bound = 2 * levels;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while segment_files(dir.path()).len() > bound && std::time::Instant::now() < deadline {
        thread::sleep(std::time::Duration::from_millis(20));
    }
    let left = segment_files(dir.path()).len();
    assert!(left <= bound, "{left} segments after {last_marker} flushes");
    store.compact().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
}
