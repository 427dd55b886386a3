//! Crash and damage handling at open: damaged segments are set aside, the
//! durable marker moves back before them, leftovers of a crash are cleaned.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use ferrite_core::Value;
use ferrite_tsdb::{SeriesKey, Store, StoreError};

use crate::{corrupt_files, open, segment_files};

fn temp() -> SeriesKey {
    SeriesKey::new("t1", "d1", "temp")
}

fn all_points(store: &Store, series: &SeriesKey) -> Vec<(i64, Value)> {
    store
        .range(series, i64::MIN, i64::MAX, None, usize::MAX)
        .unwrap()
        .points
}

/// Writes three segments with markers 10, 20 and 30. Segment `n` (1-based)
/// contains `temp` at timestamps `n*100 .. n*100+5` and `humidity` at `n`.
fn three_segments(dir: &Path) {
    let store = open(dir);
    for n in 1..=3i64 {
        let mut batch: Vec<(&str, i64, Value)> = (0..5)
            .map(|i| ("temp", n * 100 + i, Value::Int(n * 100 + i)))
            .collect();
        batch.push(("humidity", n, Value::Float(n as f64)));
        store.write("t1", "d1", &batch).unwrap();
        store.flush(n as u64 * 10).unwrap();
    }
    assert_eq!(segment_files(dir).len(), 3);
}

fn timestamps(points: &[(i64, Value)]) -> Vec<i64> {
    points.iter().map(|p| p.0).collect()
}

#[test]
fn damaged_index_sets_segment_aside() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let second = segment_files(dir.path())[1].clone();
    let mut bytes = fs::read(&second).unwrap();
    let in_index = bytes.len() - 60;
    bytes[in_index] ^= 0xff;
    fs::write(&second, &bytes).unwrap();

    let store = open(dir.path());

    assert_eq!(
        timestamps(&all_points(&store, &temp())),
        vec![100, 101, 102, 103, 104, 300, 301, 302, 303, 304]
    );
    let humidity = all_points(&store, &SeriesKey::new("t1", "d1", "humidity"));
    assert_eq!(
        humidity,
        vec![(1, Value::Float(1.0)), (3, Value::Float(3.0))]
    );
    assert_eq!(
        store.durable_marker(),
        10,
        "replay must restart before the lost segment"
    );
    let set_aside = corrupt_files(dir.path());
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].file_name(), second.file_name());
    assert!(!second.exists());
}

#[test]
fn reverted_marker_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let second = segment_files(dir.path())[1].clone();
    let file = OpenOptions::new().write(true).open(&second).unwrap();
    file.set_len(file.metadata().unwrap().len() / 2).unwrap();
    drop(file);

    drop(open(dir.path()));
    let store = open(dir.path());
    assert_eq!(store.durable_marker(), 10);

    // The caller replays its log from marker 10 and flushes.
    let replayed: Vec<(&str, i64, Value)> = (0..5)
        .map(|i| ("temp", 200 + i, Value::Int(200 + i)))
        .collect();
    store.write("t1", "d1", &replayed).unwrap();
    store.flush(30).unwrap();
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.durable_marker(), 30);
    assert_eq!(all_points(&store, &temp()).len(), 15);
    assert_eq!(corrupt_files(dir.path()).len(), 1);
}

#[test]
fn truncated_newest_segment_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let newest = segment_files(dir.path())[2].clone();
    for cut in [1u64, 48, 200] {
        let file = OpenOptions::new().write(true).open(&newest).unwrap();
        let len = file.metadata().unwrap().len();
        if len > cut {
            file.set_len(len - cut).unwrap();
        }
    }

    let store = open(dir.path());

    assert_eq!(
        timestamps(&all_points(&store, &temp())),
        vec![100, 101, 102, 103, 104, 200, 201, 202, 203, 204]
    );
    assert_eq!(store.durable_marker(), 20);
    assert_eq!(
        store.latest("t1", "d1"),
        vec![
            ("humidity".to_string(), 2, Value::Float(2.0)),
            ("temp".to_string(), 204, Value::Int(204))
        ]
    );
}

#[test]
fn damaged_block_fails_query_and_compaction_salvages() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    // The first series of a segment starts right after the 32-byte header;
    // series ids follow first use, so `temp` (id 1) comes first.
    let first = segment_files(dir.path())[0].clone();
    let mut bytes = fs::read(&first).unwrap();
    bytes[32 + 10] ^= 0x55;
    fs::write(&first, &bytes).unwrap();

    let store = open(dir.path());
    assert_eq!(store.durable_marker(), 30, "open reads indexes only");

    let result = store.range(&temp(), i64::MIN, i64::MAX, None, 100);
    assert!(
        matches!(result, Err(StoreError::Corrupt { .. })),
        "got {result:?}"
    );
    let later = store.range(&temp(), 200, 400, None, 100).unwrap();
    assert_eq!(
        later.points.len(),
        10,
        "blocks outside the query are not read"
    );

    store.compact().unwrap();

    assert_eq!(
        timestamps(&all_points(&store, &temp())),
        vec![200, 201, 202, 203, 204, 300, 301, 302, 303, 304]
    );
    let humidity = all_points(&store, &SeriesKey::new("t1", "d1", "humidity"));
    assert_eq!(
        humidity.len(),
        3,
        "other series of the damaged segment are kept"
    );
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(corrupt_files(dir.path()).len(), 1);
    drop(store);

    let store = open(dir.path());
    assert_eq!(all_points(&store, &temp()).len(), 10);
    assert_eq!(store.durable_marker(), 30);
}

#[test]
fn leftover_temp_segment_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let leftover = dir.path().join("seg-00000000000000ff.fseg.tmp");
    fs::write(&leftover, b"half a segment").unwrap();
    let unrelated = dir.path().join("notes.tmp");
    fs::write(&unrelated, b"not ours").unwrap();

    let store = open(dir.path());

    assert!(!leftover.exists());
    assert!(unrelated.exists(), "only segment temp files are deleted");
    assert_eq!(all_points(&store, &temp()).len(), 15);
}

#[test]
fn torn_series_file_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let mut series_file = OpenOptions::new()
        .append(true)
        .open(dir.path().join("series.log"))
        .unwrap();
    series_file.write_all(&[40, 0, 0, 0, 1, 2, 3]).unwrap();
    drop(series_file);

    let store = open(dir.path());
    assert_eq!(all_points(&store, &temp()).len(), 15);

    store
        .write("t1", "d2", &[("temp", 1, Value::Int(1))])
        .unwrap();
    store.flush(40).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.keys("t1", "d2"), vec!["temp".to_string()]);
    assert!(corrupt_files(dir.path()).is_empty());
}

#[test]
fn segment_with_undefined_series_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        store
            .write("t1", "d1", &[("temp", 1, Value::Int(1))])
            .unwrap();
        store.flush(1).unwrap();
        store
            .write("t1", "d1", &[("humidity", 2, Value::Int(2))])
            .unwrap();
        store.flush(2).unwrap();
    }
    // Cut the series file before the definition of `humidity`, as if the
    // file had lost its last record.
    let path = dir.path().join("series.log");
    let bytes = fs::read(&path).unwrap();
    let humidity_record = bytes.windows(8).position(|w| w == b"humidity").unwrap();
    // Before the key: record frame (8), kind (1), id (1), then the
    // length-prefixed tenant "t1" (3) and device "d1" (3), and the key's
    // length byte (1).
    let record_start = humidity_record - (8 + 1 + 1 + 3 + 3 + 1);
    fs::write(&path, &bytes[..record_start]).unwrap();

    let store = open(dir.path());

    assert_eq!(store.keys("t1", "d1"), vec!["temp".to_string()]);
    assert_eq!(store.durable_marker(), 1);
    // The raw segment of the second flush and its two rollup segments.
    let set_aside = corrupt_files(dir.path());
    let raw = set_aside
        .iter()
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seg-")
        })
        .count();
    assert_eq!((raw, set_aside.len()), (1, 3));
}

#[test]
fn superseded_inputs_are_deleted_at_open() {
    let dir = tempfile::tempdir().unwrap();
    three_segments(dir.path());
    let inputs: Vec<(std::path::PathBuf, Vec<u8>)> = segment_files(dir.path())
        .into_iter()
        .map(|path| {
            let bytes = fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    {
        let store = open(dir.path());
        store.compact().unwrap();
    }
    // Put the inputs back, as if the process had stopped after installing
    // the compacted segment but before deleting its inputs.
    for (path, bytes) in &inputs {
        fs::write(path, bytes).unwrap();
    }
    assert_eq!(segment_files(dir.path()).len(), 4);

    let store = open(dir.path());

    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(all_points(&store, &temp()).len(), 15);
    assert_eq!(store.durable_marker(), 30);
}

#[test]
fn second_open_of_directory_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());

    let second = Store::open(dir.path(), Default::default());

    assert!(matches!(second, Err(StoreError::Locked { .. })));
    drop(store);
    assert!(Store::open(dir.path(), Default::default()).is_ok());
}
