//! Compatibility with data directories of earlier format versions.
//!
//! `tests/fixtures/format-v1/` was written by the version 1 store (the
//! release before compressed blocks) with [`fixture_points`]: two flushes, a
//! compaction, a third flush and a deleted device. Opening it with the
//! current store must return exactly these points.

use std::path::Path;

use ferrite_core::Value;

/// Points of the fixture: (device, key, timestamp ns, value).
pub fn fixture_points() -> Vec<(&'static str, &'static str, i64, Value)> {
    let mut points = Vec::new();
    let base = 1_700_000_000_000_000_000i64;
    for i in 0..300i64 {
        let ts = base + i * 10_000_000_000;
        points.push((
            "truck-1",
            "speed",
            ts,
            Value::Float(40.0 + (i % 17) as f64 * 0.5),
        ));
        points.push(("truck-1", "odometer", ts, Value::Int(120_000 + i * 3)));
        points.push(("truck-1", "engine", ts, Value::Bool(i % 50 < 40)));
        if i % 60 == 0 {
            points.push((
                "truck-1",
                "driver",
                ts,
                Value::Str(format!("driver-{}", i / 60)),
            ));
        }
        points.push((
            "sensor-7",
            "temperature",
            ts - 1_000,
            Value::Float(-3.25 + i as f64 * 0.01),
        ));
    }
    // A key whose type changes over time, and a point before 1970.
    points.push((
        "sensor-7",
        "mode",
        -1_000_000_000,
        Value::Str("boot".into()),
    ));
    points.push(("sensor-7", "mode", base, Value::Int(2)));
    points
}

/// Writes the fixture with the store of this build. Run it by hand only with
/// the version 1 store:
/// `FERRITE_WRITE_FIXTURE=DIR cargo test -p ferrite-tsdb --test it compat::write_fixture -- --ignored`
#[test]
#[ignore = "writes the format fixture by hand"]
fn write_fixture() {
    let dir = std::env::var("FERRITE_WRITE_FIXTURE").expect("FERRITE_WRITE_FIXTURE");
    let store = crate::open(Path::new(&dir));
    let points = fixture_points();
    let third = points.len() / 3;
    for (n, chunk) in points.chunks(third).enumerate() {
        for (device, key, ts, value) in chunk {
            store
                .write("default", device, &[(key, *ts, value.clone())])
                .unwrap();
        }
        // Overwrite one point per chunk (last write wins across segments).
        store
            .write(
                "default",
                "truck-1",
                &[("speed", 1_700_000_000_000_000_000, Value::Float(n as f64))],
            )
            .unwrap();
        store.flush(n as u64 + 1).unwrap();
        if n == 1 {
            store.compact().unwrap();
        }
    }
    store
        .write("default", "gone", &[("x", 1, Value::Int(1))])
        .unwrap();
    store.flush(10).unwrap();
    store.delete_device("default", "gone").unwrap();
}

/// Builds the fixture's final contents: the writes of [`write_fixture`] applied
/// with last-write-wins, without the deleted device.
fn expected() -> std::collections::BTreeMap<(String, String), std::collections::BTreeMap<i64, Value>>
{
    let mut model: std::collections::BTreeMap<
        (String, String),
        std::collections::BTreeMap<i64, Value>,
    > = Default::default();
    let points = fixture_points();
    let third = points.len() / 3;
    for (n, chunk) in points.chunks(third).enumerate() {
        for (device, key, ts, value) in chunk {
            model
                .entry((device.to_string(), key.to_string()))
                .or_default()
                .insert(*ts, value.clone());
        }
        model
            .entry(("truck-1".into(), "speed".into()))
            .or_default()
            .insert(1_700_000_000_000_000_000, Value::Float(n as f64));
    }
    model
}

#[test]
fn opens_a_version_1_directory() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }

    let check = |store: &ferrite_tsdb::Store| {
        for ((device, key), points) in expected() {
            let series = ferrite_tsdb::SeriesKey::new("default", &device, &key);
            let page = store
                .range(&series, i64::MIN, i64::MAX, None, 100_000)
                .unwrap();
            let want: Vec<(i64, Value)> = points.into_iter().collect();
            assert_eq!(page.points, want, "{device}/{key}");
        }
        assert!(store.keys("default", "gone").is_empty());
        assert_eq!(store.durable_marker(), 10);
    };

    let store = crate::open(dir.path());
    check(&store);
    // Writing, flushing and compacting moves the data to the current format.
    store
        .write("default", "truck-1", &[("speed", 1, Value::Float(1.0))])
        .unwrap();
    store.flush(11).unwrap();
    store.compact().unwrap();
    drop(store);

    let store = crate::open(dir.path());
    let series = ferrite_tsdb::SeriesKey::new("default", "truck-1", "speed");
    let first = store.range(&series, i64::MIN, i64::MAX, None, 1).unwrap();
    assert_eq!(first.points, vec![(1, Value::Float(1.0))]);
    assert_eq!(store.durable_marker(), 11);
}
