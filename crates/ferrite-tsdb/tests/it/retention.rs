//! Retention per device: overrides of the tenant's retention, whole-file
//! deletion with overrides, and changes at run time. A test clock replaces
//! the system clock, and maintenance runs only when a test calls it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ferrite_core::Value;
use ferrite_tsdb::{Retention, SeriesKey, Store, StoreError, StoreOptions};

use crate::segment_files;

/// Length of a partition: ten points 0..10 fill one partition, and points
/// 60..70 the next but one.
const PARTITION: i64 = 50;
const TENANT: &str = "t";

fn options(clock: &Arc<AtomicI64>, retention: Retention) -> StoreOptions {
    let clock = Arc::clone(clock);
    StoreOptions {
        partition_ns: PARTITION,
        background_maintenance: false,
        retention,
        clock: Arc::new(move || clock.load(Ordering::Relaxed)),
        ..StoreOptions::default()
    }
}

fn open(dir: &Path, clock: &Arc<AtomicI64>, retention: Retention) -> Store {
    Store::open(dir, options(clock, retention)).expect("open store")
}

/// Retention of tenant `t`, with entries for devices.
fn retention(tenant: Option<i64>, devices: &[(&str, Option<i64>)]) -> Retention {
    let mut retention = Retention {
        tenants: [(TENANT.to_string(), tenant)].into(),
        ..Retention::default()
    };
    for (device, keep) in devices {
        retention.set_device(TENANT, *device, *keep);
    }
    retention
}

/// Writes key `v` of `device` at every timestamp in `range`.
fn write(store: &Store, device: &str, range: std::ops::Range<i64>) {
    let points: Vec<(&str, i64, Value)> = range.map(|ts| ("v", ts, Value::Int(ts))).collect();
    store.write(TENANT, device, &points).unwrap();
}

/// Timestamps of every point of key `v` of `device` that a query returns.
fn stored(store: &Store, device: &str) -> Vec<i64> {
    let series = SeriesKey::new(TENANT, device, "v");
    let page = store
        .range(&series, i64::MIN, i64::MAX, None, 1000)
        .unwrap();
    page.points.iter().map(|(ts, _)| *ts).collect()
}

fn latest_keys(store: &Store, device: &str) -> Vec<String> {
    store
        .latest(TENANT, device)
        .into_iter()
        .map(|(key, _, _)| key)
        .collect()
}

#[test]
fn shorter_device_retention_expires_only_that_device() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let store = open(
        dir.path(),
        &clock,
        retention(Some(1000), &[("a", Some(100))]),
    );
    write(&store, "a", 0..10);
    write(&store, "b", 0..10);
    store.flush(1).unwrap();

    clock.store(200, Ordering::Relaxed);
    store.run_maintenance().unwrap();

    assert_eq!(stored(&store, "a"), Vec::<i64>::new());
    assert_eq!(stored(&store, "b"), (0..10).collect::<Vec<_>>());
    assert_eq!(latest_keys(&store, "a"), Vec::<String>::new());
    assert_eq!(store.keys(TENANT, "a"), Vec::<String>::new());
    assert_eq!(latest_keys(&store, "b"), vec!["v".to_string()]);

    let buckets = store
        .aggregate(&SeriesKey::new(TENANT, "a", "v"), 0, 10, 5)
        .unwrap();
    assert!(
        buckets.iter().all(|bucket| bucket.count == 0),
        "{buckets:?}"
    );

    // A full compaction rewrites the partition without the expired points,
    // so a store opened without the device entry does not find them.
    store.compact().unwrap();
    drop(store);
    let reopened = open(dir.path(), &clock, retention(Some(1000), &[]));
    assert_eq!(stored(&reopened, "a"), Vec::<i64>::new());
    assert_eq!(stored(&reopened, "b"), (0..10).collect::<Vec<_>>());
}

#[test]
fn longer_device_retention_keeps_points() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let limits = retention(Some(100), &[("a", Some(1000))]);
    let store = open(dir.path(), &clock, limits.clone());
    write(&store, "a", 0..10);
    write(&store, "b", 0..10);
    store.flush(1).unwrap();

    clock.store(200, Ordering::Relaxed);
    store.run_maintenance().unwrap();
    store.compact().unwrap();

    assert_eq!(stored(&store, "a"), (0..10).collect::<Vec<_>>());
    assert_eq!(stored(&store, "b"), Vec::<i64>::new());
    assert_eq!(latest_keys(&store, "a"), vec!["v".to_string()]);
    assert_eq!(latest_keys(&store, "b"), Vec::<String>::new());

    drop(store);
    let reopened = open(dir.path(), &clock, limits);
    assert_eq!(stored(&reopened, "a"), (0..10).collect::<Vec<_>>());
}

#[test]
fn whole_segments_expire_with_device_retention() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let store = open(dir.path(), &clock, retention(None, &[("a", Some(100))]));
    // Partition [0, 50) has only device a, partition [50, 100) both.
    write(&store, "a", 0..10);
    store.flush(1).unwrap();
    write(&store, "a", 60..70);
    write(&store, "b", 60..70);
    store.flush(2).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 2);

    clock.store(200, Ordering::Relaxed);
    store.run_maintenance().unwrap();
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "the segment of device a alone is deleted"
    );

    // Limiting the tenant expires device b too, so the mixed segment goes.
    store
        .set_retention(retention(Some(100), &[("a", Some(100))]))
        .unwrap();
    store.run_maintenance().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 0);
    assert_eq!(stored(&store, "b"), Vec::<i64>::new());
}

#[test]
fn device_retention_set_at_run_time_deletes_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let store = open(dir.path(), &clock, retention(Some(1000), &[]));
    write(&store, "a", 0..10);
    store.flush(1).unwrap();

    // This pass caches the greatest timestamp of the segment per tenant.
    clock.store(200, Ordering::Relaxed);
    store.run_maintenance().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(stored(&store, "a"), (0..10).collect::<Vec<_>>());

    let limits = retention(Some(1000), &[("a", Some(100))]);
    store.set_retention(limits.clone()).unwrap();
    assert_eq!(store.retention(), limits);
    assert_eq!(
        stored(&store, "a"),
        Vec::<i64>::new(),
        "queries apply the new retention before maintenance"
    );

    store.run_maintenance().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 0);
    assert_eq!(latest_keys(&store, "a"), Vec::<String>::new());
}

#[test]
fn longer_retention_does_not_restore_expired_points() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let store = open(dir.path(), &clock, retention(None, &[("a", Some(100))]));
    write(&store, "a", 0..10);
    write(&store, "b", 0..10);
    store.flush(1).unwrap();

    clock.store(200, Ordering::Relaxed);
    store.run_maintenance().unwrap();
    assert_eq!(latest_keys(&store, "a"), Vec::<String>::new());

    // The segment is still on disk (device b keeps it), but the points of
    // device a stay expired: its cutoff remains at 100.
    store.set_retention(retention(None, &[])).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(stored(&store, "a"), Vec::<i64>::new());
    assert_eq!(latest_keys(&store, "a"), Vec::<String>::new());
    assert_eq!(stored(&store, "b"), (0..10).collect::<Vec<_>>());

    // Newer points of device a are kept without limit from now on.
    store
        .write(
            TENANT,
            "a",
            &[("v", 50, Value::Int(50)), ("v", 150, Value::Int(150))],
        )
        .unwrap();
    clock.store(10_000, Ordering::Relaxed);
    store.run_maintenance().unwrap();
    assert_eq!(stored(&store, "a"), vec![150]);
    assert_eq!(latest_keys(&store, "a"), vec!["v".to_string()]);
}

#[test]
fn invalid_retention_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(0));
    let limits = retention(Some(1000), &[]);
    let store = open(dir.path(), &clock, limits.clone());

    let error = store
        .set_retention(retention(Some(1000), &[("a", Some(0))]))
        .unwrap_err();
    assert!(matches!(error, StoreError::InvalidArgument(_)), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("device \"a\" of tenant \"t\""),
        "{message}"
    );
    assert!(message.contains("expected a positive number"), "{message}");
    assert_eq!(
        store.retention(),
        limits,
        "a rejected retention changes nothing"
    );
    drop(store);

    let error = Store::open(dir.path(), options(&clock, retention(Some(-5), &[])))
        .err()
        .expect("negative retention is rejected at open");
    assert!(error.to_string().contains("tenant \"t\""), "{error}");
}
