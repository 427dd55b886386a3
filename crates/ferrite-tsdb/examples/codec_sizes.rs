//! Measures the column codecs on data shaped like the IoT use case of the
//! Time Series Benchmark Suite (TSBS, `pkg/data/usecases/iot` in
//! github.com/timescale/tsbs): trucks that report ten fields every 10 s.
//!
//! For each column it prints the mode the encoder chose, bytes per value and
//! encode and decode throughput. It does so for blocks of 8 points (a flush
//! of a few seconds of data) and of 8,640 points (one day at 10 s). Then it
//! prints the size of each candidate coding. Run it with
//!
//! ```text
//! cargo run --release -p ferrite-tsdb --example codec_sizes
//! ```
//!
//! The data comes from a fixed-seed generator, so sizes repeat exactly from
//! run to run; throughput depends on the machine.

// The codecs are crate-private, so the example compiles its own copy of the
// module instead of going through the crate's public API.
#[allow(dead_code)]
#[path = "../src/compress/mod.rs"]
mod compress;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use compress::floats::FloatCoding;
use compress::ints::IntCoding;

/// Trucks simulated; each gets one day of data.
const TRUCKS: u64 = 10;
/// Samples per truck and day at one sample every 10 s.
const SAMPLES_PER_DAY: usize = 8640;
/// Chance that a truck skips one sample.
const MISSING_SAMPLE_CHANCE: f64 = 0.01;
/// 2024-01-01T00:00:00Z in nanoseconds.
const START_NS: i64 = 1_704_067_200_000_000_000;
const SAMPLE_INTERVAL_NS: i64 = 10_000_000_000;
/// Minimum time spent on each throughput measurement.
const MIN_MEASURE_TIME: Duration = Duration::from_millis(200);

/// SplitMix64, a small generator with a fixed seed, so that every run
/// produces the same data without an extra dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Standard normal, by the Box-Muller transform.
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A random walk clamped to `[min, max]`, printed with `decimals` digits
/// after the point and parsed back, as a device that sends text would.
struct Walk {
    state: f64,
    min: f64,
    max: f64,
    decimals: usize,
}

impl Walk {
    fn new(start: f64, min: f64, max: f64, decimals: usize) -> Walk {
        Walk {
            state: start,
            min,
            max,
            decimals,
        }
    }

    fn step(&mut self, delta: f64) -> f64 {
        self.state = (self.state + delta).clamp(self.min, self.max);
        format!("{:.*}", self.decimals, self.state).parse().unwrap()
    }
}

const FIELDS: [&str; 10] = [
    "latitude",
    "longitude",
    "elevation",
    "velocity",
    "heading",
    "grade",
    "fuel_consumption",
    "load",
    "fuel_state",
    "status",
];

/// One truck's day: timestamps and one column per field.
struct TruckDay {
    timestamps: Vec<i64>,
    fields: Vec<Vec<f64>>,
}

/// Generates one truck's day. Step sizes and ranges follow TSBS's IoT
/// generator. Unlike TSBS, elevation, velocity and grade are printed with
/// one decimal and fuel_state with two.
fn generate_truck(seed: u64) -> TruckDay {
    let mut rng = Rng(seed);
    let mut latitude = Walk::new(rng.uniform(0.0, 90.0), -90.0, 90.0, 5);
    let mut longitude = Walk::new(rng.uniform(0.0, 180.0), -180.0, 180.0, 5);
    let mut elevation = Walk::new(rng.uniform(0.0, 500.0), 0.0, 5000.0, 1);
    let mut velocity = Walk::new(0.0, 0.0, 100.0, 1);
    let mut heading = Walk::new(rng.uniform(0.0, 359.0), 0.0, 359.0, 0);
    let mut grade = Walk::new(0.0, 0.0, 100.0, 1);
    let mut fuel_consumption = Walk::new(25.0, 0.0, 50.0, 1);
    let mut fuel_state = Walk::new(1.0, 0.0, 1.0, 2);
    let mut status = Walk::new(0.0, 0.0, 5.0, 0);
    let mut load = (rng.unit() * 5000.0).round();

    let mut timestamps = Vec::with_capacity(SAMPLES_PER_DAY);
    let mut fields = vec![Vec::with_capacity(SAMPLES_PER_DAY); FIELDS.len()];
    for sample in 0..SAMPLES_PER_DAY {
        // Every field advances each tick, sent or not.
        let row = [
            latitude.step(rng.uniform(-0.005, 0.005)),
            longitude.step(rng.uniform(-0.005, 0.005)),
            elevation.step(rng.uniform(-10.0, 10.0)),
            velocity.step(rng.uniform(-10.0, 10.0)),
            heading.step(rng.uniform(-5.0, 5.0)),
            grade.step(rng.uniform(-5.0, 5.0)),
            fuel_consumption.step(rng.uniform(-5.0, 5.0)),
            {
                if rng.unit() < 0.05 {
                    load = (rng.unit() * 5000.0).round();
                }
                load
            },
            {
                let value = fuel_state.step(rng.uniform(-0.001, 0.0));
                // Refuel on empty, as TSBS does.
                if fuel_state.state <= 0.0 {
                    fuel_state.state = 1.0;
                }
                value
            },
            status.step(rng.normal()),
        ];
        if rng.unit() < MISSING_SAMPLE_CHANCE {
            continue;
        }
        timestamps.push(START_NS + sample as i64 * SAMPLE_INTERVAL_NS);
        for (column, value) in fields.iter_mut().zip(row) {
            column.push(value);
        }
    }
    TruckDay { timestamps, fields }
}

/// Runs `work` until [`MIN_MEASURE_TIME`] has passed and returns the
/// number of runs per second.
fn runs_per_second(mut work: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < MIN_MEASURE_TIME || runs == 0 {
        work();
        runs += 1;
    }
    runs as f64 / start.elapsed().as_secs_f64()
}

/// Names the coding of an encoded column: the mode, plus the inner integer
/// mode for timestamps and decimal floats.
fn coding_name(column: &[u8]) -> String {
    let mode = column[0];
    let inner = match mode {
        0x40 => None,
        0x10 if column.len() > 9 => {
            // Skip the first timestamp and the gcd varint.
            let gcd_len = column[9..].iter().position(|byte| byte & 0x80 == 0);
            gcd_len.map(|len| column[10 + len])
        }
        0x22 => column.get(2).copied(),
        _ => None,
    };
    match inner {
        Some(inner) => format!(
            "{}/{}",
            compress::mode_name(mode),
            compress::mode_name(inner)
        ),
        None => compress::mode_name(mode).to_owned(),
    }
}

/// Sizes and throughput of one column type at one block size.
struct Measurement {
    modes: BTreeMap<String, usize>,
    bytes: usize,
    values: usize,
    encode_per_second: f64,
    decode_per_second: f64,
}

impl Measurement {
    fn bytes_per_value(&self) -> f64 {
        self.bytes as f64 / self.values as f64
    }

    /// Returns the most frequent coding, with its share when it is not the
    /// only one.
    fn mode_summary(&self) -> String {
        let blocks: usize = self.modes.values().sum();
        let (name, count) = self
            .modes
            .iter()
            .max_by_key(|(_, count)| **count)
            .expect("at least one block");
        if *count == blocks {
            name.clone()
        } else {
            format!("{name} ({}%)", count * 100 / blocks)
        }
    }
}

/// Encodes and decodes `blocks` with the given codec functions.
fn measure<T>(
    blocks: &[&[T]],
    encode: impl Fn(&[T], &mut Vec<u8>),
    decode: impl Fn(&[u8], usize) -> usize,
) -> Measurement {
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(blocks.len());
    let mut modes = BTreeMap::new();
    for block in blocks {
        let mut out = Vec::new();
        encode(block, &mut out);
        assert_eq!(decode(&out, block.len()), block.len());
        *modes.entry(coding_name(&out)).or_insert(0) += 1;
        encoded.push(out);
    }
    let values: usize = blocks.iter().map(|block| block.len()).sum();

    let mut out = Vec::new();
    let encode_runs = runs_per_second(|| {
        for block in blocks {
            out.clear();
            encode(black_box(block), &mut out);
            black_box(&out);
        }
    });
    let decode_runs = runs_per_second(|| {
        for (column, block) in encoded.iter().zip(blocks) {
            black_box(decode(black_box(column), block.len()));
        }
    });

    Measurement {
        modes,
        bytes: encoded.iter().map(Vec::len).sum(),
        values,
        encode_per_second: encode_runs * values as f64,
        decode_per_second: decode_runs * values as f64,
    }
}

fn measure_timestamps(blocks: &[&[i64]]) -> Measurement {
    measure(blocks, compress::encode_timestamps, |input, count| {
        compress::decode_timestamps(input, count).unwrap().len()
    })
}

fn measure_floats(blocks: &[&[f64]]) -> Measurement {
    measure(blocks, compress::encode_floats, |input, count| {
        compress::decode_floats(input, count).unwrap().len()
    })
}

/// Splits each truck's column into blocks of at most `block_len` values.
fn blocks_of<'a, T>(columns: &[&'a [T]], block_len: usize) -> Vec<&'a [T]> {
    columns
        .iter()
        .flat_map(|column| column.chunks(block_len))
        .collect()
}

fn print_row(name: &str, measurement: &Measurement) {
    println!(
        "| {name:<16} | {:<28} | {:>11.3} | {:>10.1} | {:>10.1} |",
        measurement.mode_summary(),
        measurement.bytes_per_value(),
        measurement.encode_per_second / 1e6,
        measurement.decode_per_second / 1e6,
    );
}

/// Prints the table for one block size and returns the bytes per value of
/// the timestamps and the mean over the fields.
fn print_block_table(trucks: &[TruckDay], block_len: usize) -> (f64, f64) {
    println!("\nBlocks of {block_len} points\n");
    println!(
        "| column           | mode chosen                  | bytes/value | encode M/s | decode M/s |"
    );
    println!(
        "|------------------|------------------------------|------------:|-----------:|-----------:|"
    );

    let timestamp_columns: Vec<&[i64]> = trucks.iter().map(|t| t.timestamps.as_slice()).collect();
    let timestamps = measure_timestamps(&blocks_of(&timestamp_columns, block_len));
    print_row("timestamp", &timestamps);

    let mut field_bytes = 0usize;
    let mut field_values = 0usize;
    for (index, name) in FIELDS.iter().enumerate() {
        let columns: Vec<&[f64]> = trucks.iter().map(|t| t.fields[index].as_slice()).collect();
        let measurement = measure_floats(&blocks_of(&columns, block_len));
        print_row(name, &measurement);
        field_bytes += measurement.bytes;
        field_values += measurement.values;
    }
    print_other_types(trucks, block_len);
    (
        timestamps.bytes_per_value(),
        field_bytes as f64 / field_values as f64,
    )
}

/// Prints rows for the integer, boolean and string codecs, fed with columns
/// derived from the truck fields: the integer fields as `i64`, whether the
/// truck moves, and the status as a name.
fn print_other_types(trucks: &[TruckDay], block_len: usize) {
    const STATUS_NAMES: [&str; 6] = [
        "parked",
        "idle",
        "driving",
        "loading",
        "unloading",
        "service",
    ];
    let field_index = |name: &str| FIELDS.iter().position(|field| *field == name).unwrap();

    for name in ["heading", "load", "status"] {
        let index = field_index(name);
        let columns: Vec<Vec<i64>> = trucks
            .iter()
            .map(|truck| {
                truck.fields[index]
                    .iter()
                    .map(|&value| value as i64)
                    .collect()
            })
            .collect();
        let columns: Vec<&[i64]> = columns.iter().map(Vec::as_slice).collect();
        let measurement = measure(
            &blocks_of(&columns, block_len),
            compress::encode_ints,
            |input, count| compress::decode_ints(input, count).unwrap().len(),
        );
        print_row(&format!("{name} (int)"), &measurement);
    }

    let velocity = field_index("velocity");
    let columns: Vec<Vec<bool>> = trucks
        .iter()
        .map(|truck| {
            truck.fields[velocity]
                .iter()
                .map(|&value| value > 0.0)
                .collect()
        })
        .collect();
    let columns: Vec<&[bool]> = columns.iter().map(Vec::as_slice).collect();
    let measurement = measure(
        &blocks_of(&columns, block_len),
        compress::encode_bools,
        |input, count| compress::decode_bools(input, count).unwrap().len(),
    );
    print_row("moving (bool)", &measurement);

    let status = field_index("status");
    let columns: Vec<Vec<&str>> = trucks
        .iter()
        .map(|truck| {
            truck.fields[status]
                .iter()
                .map(|&value| STATUS_NAMES[value as usize])
                .collect()
        })
        .collect();
    let columns: Vec<&[&str]> = columns.iter().map(Vec::as_slice).collect();
    let measurement = measure(
        &blocks_of(&columns, block_len),
        compress::encode_strings,
        |input, count| compress::decode_strings(input, count).unwrap().len(),
    );
    print_row("status (string)", &measurement);
}

/// Prints the bytes per value of each forced coding for blocks of
/// `block_len` points. Blocks of fewer than 3 points, left over at the end of
/// a day, are skipped because the higher difference orders need 3.
fn print_candidates(trucks: &[TruckDay], block_len: usize) {
    println!("\nCandidate codings, blocks of {block_len} points, bytes/value\n");
    let float_names: Vec<String> = FloatCoding::ALL
        .iter()
        .map(|coding| format!("{coding:?}"))
        .collect();
    println!("| column           | {} |", float_names.join(" | "));
    println!(
        "|------------------|{}",
        "------:|".repeat(float_names.len())
    );
    for (index, name) in FIELDS.iter().enumerate() {
        let cells: Vec<String> = FloatCoding::ALL
            .iter()
            .map(|&coding| {
                let mut bytes = 0;
                let mut values = 0;
                for block in trucks
                    .iter()
                    .flat_map(|truck| truck.fields[index].chunks(block_len))
                    .filter(|block| block.len() >= 3)
                {
                    let mut out = Vec::new();
                    if !compress::floats::encode_as(block, coding, &mut out) {
                        return "n/a".to_owned();
                    }
                    bytes += out.len();
                    values += block.len();
                }
                format!("{:.3}", bytes as f64 / values as f64)
            })
            .collect();
        println!("| {name:<16} | {} |", cells.join(" | "));
    }

    // Timestamp candidates: the integer codings applied to the raw
    // timestamps (bit-packed order 2 is delta of delta with a gcd), and a
    // varint delta of delta without gcd.
    let int_names: Vec<String> = IntCoding::ALL
        .iter()
        .map(|coding| format!("{coding:?}"))
        .collect();
    println!(
        "\n| timestamps as | {} | zigzag varint delta of delta |",
        int_names.join(" | ")
    );
    println!(
        "|---------------|{}------:|",
        "------:|".repeat(int_names.len())
    );
    let values: usize = trucks.iter().map(|t| t.timestamps.len()).sum();
    let mut cells: Vec<String> = IntCoding::ALL
        .iter()
        .map(|&coding| {
            let mut bytes = 0;
            for block in trucks
                .iter()
                .flat_map(|truck| truck.timestamps.chunks(block_len))
                .filter(|block| block.len() >= 3)
            {
                let mut out = Vec::new();
                if !compress::ints::encode_as(block, coding, &mut out) {
                    return "n/a".to_owned();
                }
                bytes += out.len();
            }
            format!("{:.3}", bytes as f64 / values as f64)
        })
        .collect();
    let varint_bytes: usize = trucks
        .iter()
        .flat_map(|truck| truck.timestamps.chunks(block_len))
        .filter(|block| block.len() >= 3)
        .map(varint_delta_of_delta_len)
        .sum();
    cells.push(format!("{:.3}", varint_bytes as f64 / values as f64));
    println!("| integers      | {} |", cells.join(" | "));
}

/// Size of the timestamps as first value, first delta and zigzag varint
/// deltas of deltas.
fn varint_delta_of_delta_len(timestamps: &[i64]) -> usize {
    let zigzag_len = |value: i64| {
        let raw = ((value << 1) ^ (value >> 63)) as u64;
        (64 - (raw | 1).leading_zeros() as usize).div_ceil(7)
    };
    let mut len = 8;
    let mut previous_delta = 0i64;
    for pair in timestamps.windows(2) {
        let delta = pair[1].wrapping_sub(pair[0]);
        len += zigzag_len(delta.wrapping_sub(previous_delta));
        previous_delta = delta;
    }
    len
}

fn main() {
    let trucks: Vec<TruckDay> = (0..TRUCKS)
        .map(|truck| generate_truck(0x5eed + truck))
        .collect();
    let points: usize = trucks.iter().map(|t| t.timestamps.len()).sum();
    println!(
        "{TRUCKS} trucks, one day each at 10 s, {:.1}% of samples missing: {points} rows of {} fields",
        MISSING_SAMPLE_CHANCE * 100.0,
        FIELDS.len()
    );

    for block_len in [8, SAMPLES_PER_DAY] {
        let (timestamp, fields) = print_block_table(&trucks, block_len);
        println!(
            "\nFields: {fields:.3} bytes/value. With each series storing its own timestamps: \
             {:.3} bytes per field value; with timestamps shared by the {} fields of a row: {:.3}.",
            fields + timestamp,
            FIELDS.len(),
            fields + timestamp / FIELDS.len() as f64,
        );
    }
    for block_len in [8, SAMPLES_PER_DAY] {
        print_candidates(&trucks, block_len);
    }
}
