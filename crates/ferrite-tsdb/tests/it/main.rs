//! Integration tests of `ferrite_tsdb::Store` through its public API, on
//! real files in temporary directories. One test binary keeps link time low.

mod api;
mod compat;
mod golden;
mod model;
mod recovery;
mod retention;
mod sealed;

use std::path::{Path, PathBuf};

use ferrite_core::Value;
use ferrite_tsdb::{Store, StoreOptions};

pub const NANOS_PER_MS: i64 = 1_000_000;

pub fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).expect("open store")
}

/// Segment files of raw points in the store directory, oldest first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "fseg"))
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seg-")
        })
        .collect();
    files.sort();
    files
}

pub fn corrupt_files(dir: &Path) -> Vec<PathBuf> {
    let corrupt = dir.join("corrupt");
    if !corrupt.exists() {
        return Vec::new();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(corrupt)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

/// A value with floats compared by bit pattern, so that -0.0 and 0.0 differ.
#[derive(Debug, Clone, PartialEq)]
pub enum Exact {
    Float(u64),
    Int(i64),
    Bool(bool),
    Str(String),
}

pub fn exact(value: &Value) -> Exact {
    match value {
        Value::Float(v) => Exact::Float(v.to_bits()),
        Value::Int(v) => Exact::Int(*v),
        Value::Bool(v) => Exact::Bool(*v),
        Value::Str(v) => Exact::Str(v.clone()),
    }
}

pub fn exact_points(points: &[(i64, Value)]) -> Vec<(i64, Exact)> {
    points
        .iter()
        .map(|(ts, value)| (*ts, exact(value)))
        .collect()
}
