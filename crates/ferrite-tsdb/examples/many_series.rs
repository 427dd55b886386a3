//! Writes one point per series per round into a store with many series and
//! prints the resident memory of the process, to check the memory that the
//! store needs per series.
//!
//! ```text
//! cargo run --release -p ferrite-tsdb --example many_series -- SERIES ROUNDS [BUDGET_MIB [DIR]]
//! ```
//!
//! `BUDGET_MIB` sets [`StoreOptions::memory_budget_bytes`] (default 1024).
//!
//! Series are spread over devices with 7 keys each, like the trucks of the
//! fleet benchmark, and rounds are 10 s apart. Without `DIR` the store goes
//! into a temporary directory that is deleted at the end.

use std::time::Instant;

use ferrite_core::Value;
use ferrite_tsdb::{Store, StoreOptions};

// The allocator of the `ferrite` server, so that resident sizes compare.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: [&str; 7] = [
    "latitude",
    "longitude",
    "elevation",
    "velocity",
    "heading",
    "grade",
    "fuel_consumption",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let series: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let rounds: i64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let budget_mib: usize = args.next().map_or(Ok(1024), |a| a.parse())?;
    let temp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map_or_else(|| temp.path().to_path_buf(), Into::into);

    let devices = series.div_ceil(KEYS.len());
    let options = StoreOptions {
        memory_budget_bytes: Some(budget_mib * 1024 * 1024),
        ..StoreOptions::default()
    };
    let store = Store::open(&dir, options)?;
    let start_ns: i64 = 1_700_000_000_000_000_000;
    let started = Instant::now();
    let mut marker = 0;
    for round in 0..rounds {
        let ts = start_ns + round * 10_000_000_000;
        for device in 0..devices {
            let name = format!("truck-{device}");
            let points: Vec<(&str, i64, Value)> = KEYS
                .iter()
                .enumerate()
                .map(|(k, key)| {
                    (
                        *key,
                        ts,
                        Value::Float((device * 7 + k) as f64 + round as f64 * 0.5),
                    )
                })
                .collect();
            store.write("fleet", &name, &points)?;
            if store.needs_flush() {
                marker += 1;
                store.flush(marker)?;
            }
        }
        marker += 1;
        store.flush(marker)?;
        let usage = store.memory_usage();
        println!(
            "round {round}: {:.1} s, rss {} MiB, estimate {} MiB ({} fixed: names {}, latest {}, open rows {}, segments {}), head budget {} MiB",
            started.elapsed().as_secs_f64(),
            status_kib("VmRSS") / 1024,
            usage.total() >> 20,
            usage.fixed() >> 20,
            usage.names >> 20,
            usage.latest >> 20,
            usage.open_rows >> 20,
            usage.segments >> 20,
            store.head_budget() >> 20
        );
    }
    let points = devices as i64 * KEYS.len() as i64 * rounds;
    println!(
        "{} series, {points} points in {:.1} s ({:.0} points/s)",
        devices * KEYS.len(),
        started.elapsed().as_secs_f64(),
        points as f64 / started.elapsed().as_secs_f64()
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    println!(
        "rss {} MiB, peak {} MiB, disk {} MiB",
        status_kib("VmRSS") / 1024,
        status_kib("VmHWM") / 1024,
        store.disk_usage().1 / (1024 * 1024)
    );
    Ok(())
}

/// Reads a field of /proc/self/status in KiB (0 where there is none).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .trim_end_matches(" kB")
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}
