//! `generate`: a deterministic IoT fleet dataset in the shape of the IoT use
//! case of the Time Series Benchmark Suite (TSBS), written as InfluxDB line
//! protocol with nanosecond timestamps.
//!
//! Trucks `truck_0` to `truck_{N-1}` carry the tags `name`, `fleet`,
//! `driver`, `model` and `device_version`, chosen once per truck. Every
//! 10 seconds each truck sends one `readings` line (latitude, longitude,
//! elevation, velocity, heading, grade, fuel_consumption) and one
//! `diagnostics` line (load, fuel_state, status). About 1 % of the lines are
//! left out at random, as from devices that miss a report. Lines are ordered
//! by time, then by truck, as a fleet reporting live sends them.
//!
//! Values are kept as scaled integers and printed with the decimals a device
//! sends (latitude with 5, velocity with 1, heading as a whole number). Every
//! field is written as a line-protocol float (no `i` suffix), so every system
//! stores the same type. A value printed as `12.3` parses to the same `f64`
//! as `123 / 10.0`, which is what [`FieldValues::value`] returns, so query
//! results can be checked against the generator exactly.
//!
//! The output depends only on the arguments. Each truck draws from its own
//! pseudo-random stream, seeded from `--seed` and the truck's index, so a
//! truck's data does not depend on how many trucks there are. The generator
//! is SplitMix64, written out here so that no library update can change the
//! data.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

/// Time between two reports of a truck.
pub const INTERVAL_NS: i64 = 10_000_000_000;

pub const FLEETS: [&str; 4] = ["East", "West", "North", "South"];
const DRIVERS: [&str; 6] = ["Albert", "Andy", "Derek", "Rodney", "Seth", "Trish"];
const DEVICE_VERSIONS: [&str; 3] = ["v1.0", "v1.5", "v2.0"];

/// Truck models with their load capacity in kg (the capacities TSBS uses).
const MODELS: [(&str, i64); 3] = [("F-150", 2000), ("G-2000", 5000), ("H-2", 1500)];

/// Field names and printed decimals of the `readings` measurement.
pub const READINGS_FIELDS: [(&str, u32); 7] = [
    ("latitude", 5),
    ("longitude", 5),
    ("elevation", 1),
    ("velocity", 1),
    ("heading", 0),
    ("grade", 1),
    ("fuel_consumption", 1),
];

/// Field names and printed decimals of the `diagnostics` measurement.
pub const DIAGNOSTICS_FIELDS: [(&str, u32); 3] = [("load", 0), ("fuel_state", 2), ("status", 0)];

/// One line in this many is left out, for each measurement independently.
const MISSING_ONE_IN: u64 = 100;

/// Internal fuel units in a full tank; `fuel_state` is printed in hundredths.
const FULL_TANK: i64 = 1_000_000;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Number of trucks.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Time span covered, such as 1d, 2h or 90min; one report per truck every 10 s.
    #[arg(long, default_value = "1d")]
    duration: String,
    /// Time of the first report, RFC 3339.
    #[arg(long, default_value = DEFAULT_START)]
    start: String,
    /// Seed of the value generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// File to write; standard output when absent or `-`.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub const DEFAULT_START: &str = "2026-01-01T00:00:00Z";

/// The shape and seed of a fleet dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSpec {
    pub devices: usize,
    pub start_ns: i64,
    pub duration_ns: i64,
    pub seed: u64,
}

impl FleetSpec {
    /// Builds a spec from command-line text, checking every value.
    pub fn parse(devices: usize, start: &str, duration: &str, seed: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(devices > 0, "--devices must be at least 1");
        let start_ns = parse_start_ns(start)?;
        let duration = humantime::parse_duration(duration).with_context(|| {
            format!("invalid --duration {duration:?}: expected a duration such as 1d, 2h or 90min")
        })?;
        let duration_ns = i64::try_from(duration.as_nanos())
            .ok()
            .filter(|ns| *ns >= INTERVAL_NS)
            .with_context(|| {
                format!("invalid --duration {duration:?}: give at least 10s and at most 100 years")
            })?;
        Ok(Self {
            devices,
            start_ns,
            duration_ns,
            seed,
        })
    }

    /// Number of report times: one every 10 s in `[start, start + duration)`.
    pub fn steps(&self) -> i64 {
        (self.duration_ns + INTERVAL_NS - 1) / INTERVAL_NS
    }

    pub fn end_ns(&self) -> i64 {
        self.start_ns + self.duration_ns
    }
}

/// Parses an RFC 3339 time into nanoseconds since the Unix epoch.
pub fn parse_start_ns(text: &str) -> anyhow::Result<i64> {
    let time = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!("invalid time {text:?}: expected RFC 3339, such as 2026-01-01T00:00:00Z")
    })?;
    let since_epoch = time
        .duration_since(UNIX_EPOCH)
        .with_context(|| format!("the time {text:?} is before 1970"))?;
    i64::try_from(since_epoch.as_nanos()).with_context(|| format!("the time {text:?} is too late"))
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 in UTC.
pub fn format_rfc3339(ns: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339(time).to_string()
}

/// SplitMix64 (Steele, Lea and Flood, 2014): a small, fast generator whose
/// output is fixed by its definition.
#[derive(Debug, Clone)]
struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a number in `[0, n)`, by multiplying instead of dividing
    /// (the bias is below 2^-40 for the small `n` used here).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Returns a number in `[low, high]`.
    fn between(&mut self, low: i64, high: i64) -> i64 {
        low + self.below((high - low + 1) as u64) as i64
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The fields of one line as scaled integers: `value / 10^decimals`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldValues<const N: usize> {
    pub scaled: [i64; N],
}

impl<const N: usize> FieldValues<N> {
    /// Returns field `index` as the `f64` a server parses from the printed text.
    pub fn value(&self, index: usize, fields: &[(&str, u32); N]) -> f64 {
        self.scaled[index] as f64 / 10f64.powi(fields[index].1 as i32)
    }
}

/// The lines of one truck at one report time; `None` marks a missing line.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub readings: Option<FieldValues<7>>,
    pub diagnostics: Option<FieldValues<3>>,
}

/// A simulated truck: fixed tags and the state of its random walks.
#[derive(Debug, Clone)]
pub struct Truck {
    pub fleet: &'static str,
    readings_prefix: Vec<u8>,
    diagnostics_prefix: Vec<u8>,
    rng: SplitMix64,
    /// Degrees times 10^5.
    latitude: i64,
    longitude: i64,
    /// Metres times 10.
    elevation: i64,
    /// km/h times 10.
    velocity: i64,
    /// Whole degrees, 0 to 359.
    heading: i64,
    /// Percent times 10.
    grade: i64,
    /// Litres per 100 km times 10.
    fuel_consumption: i64,
    /// kg, up to `load_capacity`.
    load: i64,
    load_capacity: i64,
    /// Units of [`FULL_TANK`].
    fuel: i64,
    /// Mean fuel used per report, in units of [`FULL_TANK`].
    fuel_per_report: i64,
    /// Fuel level at which the driver refills the tank.
    refill_below: i64,
    status: i64,
}

impl Truck {
    fn new(index: usize, seed: u64) -> Self {
        // Two rounds spread neighbouring indexes over unrelated streams.
        let mut seeder = SplitMix64::new(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut rng = SplitMix64::new(seeder.next_u64());

        let name = format!("truck_{index}");
        let fleet = FLEETS[rng.below(FLEETS.len() as u64) as usize];
        let driver = DRIVERS[rng.below(DRIVERS.len() as u64) as usize];
        let (model, load_capacity) = MODELS[rng.below(MODELS.len() as u64) as usize];
        let version = DEVICE_VERSIONS[rng.below(DEVICE_VERSIONS.len() as u64) as usize];
        let tags = format!(
            ",name={name},fleet={fleet},driver={driver},model={model},device_version={version} "
        );

        let refill_below = rng.between(0, FULL_TANK * 6 / 100);
        // A full tank lasts 8 to 16 hours of driving.
        let reports_per_tank = rng.between(8 * 360, 16 * 360);
        Self {
            readings_prefix: format!("readings{tags}").into_bytes(),
            diagnostics_prefix: format!("diagnostics{tags}").into_bytes(),
            fleet,
            latitude: rng.between(-9_000_000, 9_000_000),
            longitude: rng.between(-18_000_000, 18_000_000),
            elevation: rng.between(0, 50_000),
            velocity: rng.between(0, 1000),
            heading: rng.between(0, 359),
            grade: rng.between(0, 1000),
            fuel_consumption: rng.between(0, 500),
            load: rng.between(0, load_capacity),
            load_capacity,
            fuel: rng.between(refill_below, FULL_TANK),
            fuel_per_report: FULL_TANK / reports_per_tank,
            refill_below,
            status: rng.between(0, 5),
            rng,
        }
    }

    /// Moves every value one step and returns what the truck reports.
    fn advance(&mut self) -> Report {
        let rng = &mut self.rng;
        // About 0.0025 degrees, the distance of 10 s at 100 km/h.
        self.latitude = (self.latitude + rng.between(-250, 250)).clamp(-9_000_000, 9_000_000);
        self.longitude += rng.between(-250, 250);
        if self.longitude > 18_000_000 {
            self.longitude -= 36_000_000;
        } else if self.longitude < -18_000_000 {
            self.longitude += 36_000_000;
        }
        self.elevation = (self.elevation + rng.between(-10, 10)).clamp(0, 50_000);
        self.velocity = (self.velocity + rng.between(-20, 20)).clamp(0, 1000);
        self.heading = (self.heading + rng.between(-10, 10)).rem_euclid(360);
        self.grade = (self.grade + rng.between(-10, 10)).clamp(0, 1000);
        self.fuel_consumption = (self.fuel_consumption + rng.between(-5, 5)).clamp(0, 500);

        // Loads change at stops, not on every report.
        if rng.one_in(50) {
            self.load = rng.between(0, self.load_capacity);
        }
        self.fuel -= rng.between(0, 2 * self.fuel_per_report);
        if self.fuel < self.refill_below {
            self.fuel = FULL_TANK;
        }
        if rng.one_in(20) {
            self.status = rng.between(0, 5);
        }

        let readings = (!rng.one_in(MISSING_ONE_IN)).then_some(FieldValues {
            scaled: [
                self.latitude,
                self.longitude,
                self.elevation,
                self.velocity,
                self.heading,
                self.grade,
                self.fuel_consumption,
            ],
        });
        let diagnostics = (!rng.one_in(MISSING_ONE_IN)).then_some(FieldValues {
            scaled: [self.load, self.fuel / (FULL_TANK / 100), self.status],
        });
        Report {
            readings,
            diagnostics,
        }
    }
}

/// Line and value counts of a generated dataset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub lines: u64,
    pub readings_lines: u64,
    pub diagnostics_lines: u64,
    pub field_values: u64,
    pub bytes: u64,
}

/// Produces the dataset one report time at a time.
pub struct FleetGenerator {
    spec: FleetSpec,
    trucks: Vec<Truck>,
    next_step: i64,
}

impl FleetGenerator {
    pub fn new(spec: FleetSpec) -> Self {
        Self {
            spec,
            trucks: (0..spec.devices)
                .map(|index| Truck::new(index, spec.seed))
                .collect(),
            next_step: 0,
        }
    }

    pub fn trucks(&self) -> &[Truck] {
        &self.trucks
    }

    /// Advances every truck to the next report time and calls `visit` with
    /// the report time in ns, each truck's index and its report, in truck
    /// order. Returns `false` after the last report time.
    pub fn step(&mut self, mut visit: impl FnMut(i64, usize, &Truck, &Report)) -> bool {
        if self.next_step >= self.spec.steps() {
            return false;
        }
        let timestamp = self.spec.start_ns + self.next_step * INTERVAL_NS;
        self.next_step += 1;
        for (index, truck) in self.trucks.iter_mut().enumerate() {
            let report = truck.advance();
            visit(timestamp, index, truck, &report);
        }
        true
    }

    /// Appends the lines of the next report time to `out`. Returns `false`
    /// after the last report time.
    pub fn write_step(&mut self, out: &mut Vec<u8>, counts: &mut Counts) -> bool {
        if self.next_step >= self.spec.steps() {
            return false;
        }
        let timestamp = self.spec.start_ns + self.next_step * INTERVAL_NS;
        let mut suffix = Vec::with_capacity(24);
        suffix.push(b' ');
        push_u64(&mut suffix, timestamp as u64);
        suffix.push(b'\n');

        let before = out.len();
        self.step(|_, _, truck, report| {
            if let Some(values) = &report.readings {
                write_line(
                    out,
                    &truck.readings_prefix,
                    &READINGS_FIELDS,
                    values,
                    &suffix,
                );
                counts.readings_lines += 1;
            }
            if let Some(values) = &report.diagnostics {
                write_line(
                    out,
                    &truck.diagnostics_prefix,
                    &DIAGNOSTICS_FIELDS,
                    values,
                    &suffix,
                );
                counts.diagnostics_lines += 1;
            }
        });
        counts.lines = counts.readings_lines + counts.diagnostics_lines;
        counts.field_values = counts.readings_lines * READINGS_FIELDS.len() as u64
            + counts.diagnostics_lines * DIAGNOSTICS_FIELDS.len() as u64;
        counts.bytes += (out.len() - before) as u64;
        true
    }
}

fn write_line<const N: usize>(
    out: &mut Vec<u8>,
    prefix: &[u8],
    fields: &[(&str, u32); N],
    values: &FieldValues<N>,
    suffix: &[u8],
) {
    out.extend_from_slice(prefix);
    for (position, ((name, decimals), value)) in fields.iter().zip(values.scaled).enumerate() {
        if position > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        push_fixed(out, value, *decimals);
    }
    out.extend_from_slice(suffix);
}

/// Appends `scaled / 10^decimals` with exactly `decimals` digits after the point.
fn push_fixed(out: &mut Vec<u8>, scaled: i64, decimals: u32) {
    if scaled < 0 {
        out.push(b'-');
    }
    let magnitude = scaled.unsigned_abs();
    let scale = 10u64.pow(decimals);
    push_u64(out, magnitude / scale);
    if decimals == 0 {
        return;
    }
    out.push(b'.');
    let mut fraction = magnitude % scale;
    let mut digits = [b'0'; 19];
    for digit in digits[..decimals as usize].iter_mut().rev() {
        *digit = b'0' + (fraction % 10) as u8;
        fraction /= 10;
    }
    out.extend_from_slice(&digits[..decimals as usize]);
}

fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// The counts and speed `generate` prints on standard error.
#[derive(Debug, Serialize)]
pub struct GenerateReport {
    figure: &'static str,
    devices: usize,
    start: String,
    duration_s: f64,
    seed: u64,
    #[serde(flatten)]
    counts: Counts,
    elapsed_s: f64,
    lines_per_s: f64,
}

/// Bytes collected before each write to the output.
const WRITE_CHUNK: usize = 4 << 20;

pub fn run(args: &GenerateArgs) -> anyhow::Result<GenerateReport> {
    let spec = FleetSpec::parse(args.devices, &args.start, &args.duration, args.seed)?;
    let started = Instant::now();

    let mut output: Box<dyn Write> = match &args.output {
        Some(path) if path.as_os_str() != "-" => Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create the output file {}", path.display()))?,
        ),
        _ => Box::new(std::io::stdout().lock()),
    };
    let mut generator = FleetGenerator::new(spec);
    let mut counts = Counts::default();
    let mut buffer = Vec::with_capacity(WRITE_CHUNK + 1024 * spec.devices);
    while generator.write_step(&mut buffer, &mut counts) {
        if buffer.len() >= WRITE_CHUNK {
            output
                .write_all(&buffer)
                .context("writing the dataset failed")?;
            buffer.clear();
        }
    }
    output
        .write_all(&buffer)
        .context("writing the dataset failed")?;
    output.flush().context("writing the dataset failed")?;

    let elapsed = started.elapsed().as_secs_f64();
    Ok(GenerateReport {
        figure: "generate",
        devices: spec.devices,
        start: format_rfc3339(spec.start_ns),
        duration_s: spec.duration_ns as f64 / 1e9,
        seed: spec.seed,
        counts,
        elapsed_s: crate::stats::round3(elapsed),
        lines_per_s: (counts.lines as f64 / elapsed).round(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(devices: usize, duration: &str, seed: u64) -> FleetSpec {
        FleetSpec::parse(devices, DEFAULT_START, duration, seed).unwrap()
    }

    fn generate_text(spec: FleetSpec) -> (String, Counts) {
        let mut generator = FleetGenerator::new(spec);
        let mut out = Vec::new();
        let mut counts = Counts::default();
        while generator.write_step(&mut out, &mut counts) {}
        (String::from_utf8(out).unwrap(), counts)
    }

    #[test]
    fn same_arguments_same_bytes() {
        let (first, _) = generate_text(spec(20, "30min", 3));
        let (second, _) = generate_text(spec(20, "30min", 3));
        assert_eq!(first, second);
        let (other_seed, _) = generate_text(spec(20, "30min", 4));
        assert_ne!(first, other_seed);
    }

    #[test]
    fn truck_data_independent_of_fleet_size() {
        let (small, _) = generate_text(spec(3, "10min", 9));
        let (large, _) = generate_text(spec(10, "10min", 9));
        let truck_1 = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| line.contains(",name=truck_1,"))
                .map(str::to_owned)
                .collect()
        };
        assert!(!truck_1(&small).is_empty());
        assert_eq!(truck_1(&small), truck_1(&large));
    }

    #[test]
    fn start_and_duration_parse() {
        let parsed = spec(2, "2h", 1);
        assert_eq!(parsed.start_ns, 1_767_225_600_000_000_000);
        assert_eq!(parsed.steps(), 720);
        assert_eq!(parsed.end_ns(), parsed.start_ns + 7_200_000_000_000);
        assert_eq!(spec(1, "15s", 1).steps(), 2);
        assert!(FleetSpec::parse(1, DEFAULT_START, "5s", 1).is_err());
        assert!(FleetSpec::parse(0, DEFAULT_START, "1h", 1).is_err());
        assert!(FleetSpec::parse(1, "yesterday", "1h", 1).is_err());
        assert!(FleetSpec::parse(1, DEFAULT_START, "a while", 1).is_err());
        assert_eq!(format_rfc3339(parsed.start_ns), "2026-01-01T00:00:00Z");
    }

    #[test]
    fn lines_ordered_by_time_then_truck() {
        let (text, counts) = generate_text(spec(4, "1min", 1));
        let mut previous = (0i64, 0usize);
        for line in text.lines() {
            let timestamp: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
            let name = line.split(',').nth(1).unwrap();
            let truck: usize = name.strip_prefix("name=truck_").unwrap().parse().unwrap();
            assert!((timestamp, truck) >= previous, "{line}");
            assert_eq!((timestamp - 1_767_225_600_000_000_000) % INTERVAL_NS, 0);
            previous = (timestamp, truck);
        }
        assert_eq!(counts.lines, text.lines().count() as u64);
        assert_eq!(counts.bytes, text.len() as u64);
    }

    #[test]
    fn lines_have_tags_and_float_fields() {
        let (text, _) = generate_text(spec(8, "10min", 2));
        for line in text.lines() {
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts.len(), 3, "{line}");
            let tags: Vec<&str> = parts[0].split(',').collect();
            assert_eq!(tags.len(), 6, "{line}");
            assert!(["readings", "diagnostics"].contains(&tags[0]), "{line}");
            assert!(
                FLEETS.contains(&tags[2].strip_prefix("fleet=").unwrap()),
                "{line}"
            );
            assert!(tags[3].starts_with("driver="), "{line}");
            let model = tags[4].strip_prefix("model=").unwrap();
            assert!(MODELS.iter().any(|(name, _)| *name == model), "{line}");
            let version = tags[5].strip_prefix("device_version=").unwrap();
            assert!(DEVICE_VERSIONS.contains(&version), "{line}");

            let expected: Vec<(&str, u32)> = if tags[0] == "readings" {
                READINGS_FIELDS.to_vec()
            } else {
                DIAGNOSTICS_FIELDS.to_vec()
            };
            let fields: Vec<&str> = parts[1].split(',').collect();
            assert_eq!(fields.len(), expected.len(), "{line}");
            for (field, (name, decimals)) in fields.iter().zip(expected) {
                let (key, value) = field.split_once('=').unwrap();
                assert_eq!(key, name, "{line}");
                assert!(!value.ends_with('i'), "{line}");
                let printed = value.split_once('.').map_or(0, |(_, digits)| digits.len());
                assert_eq!(printed as u32, decimals, "{line}");
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn values_stay_in_range() {
        let spec = spec(30, "12h", 5);
        let mut generator = FleetGenerator::new(spec);
        let mut refills = 0;
        let mut last_fuel = vec![None; spec.devices];
        while generator.step(|_, index, truck, report| {
            if let Some(values) = &report.readings {
                let value = |field| values.value(field, &READINGS_FIELDS);
                assert!((-90.0..=90.0).contains(&value(0)));
                assert!((-180.0..=180.0).contains(&value(1)));
                assert!((0.0..=5000.0).contains(&value(2)));
                assert!((0.0..=100.0).contains(&value(3)));
                assert!((0.0..=359.0).contains(&value(4)));
                assert!((0.0..=100.0).contains(&value(5)));
                assert!((0.0..=50.0).contains(&value(6)));
            }
            if let Some(values) = &report.diagnostics {
                let [load, fuel, status] = values.scaled;
                assert!((0..=truck.load_capacity).contains(&load));
                assert!((0..=100).contains(&fuel));
                assert!((0..=5).contains(&status));
                // A missing line can hide the report that showed 1.00.
                if last_fuel[index].is_some_and(|last| fuel > last) {
                    assert!(fuel >= 99, "a tank is only ever refilled to full");
                    refills += 1;
                }
                last_fuel[index] = Some(fuel);
            }
        }) {}
        assert!(refills > 0, "12 hours of 30 trucks include refills");
    }

    #[test]
    fn about_one_percent_missing() {
        let spec = spec(50, "2h", 1);
        let (_, counts) = generate_text(spec);
        let possible = spec.steps() as u64 * spec.devices as u64;
        for present in [counts.readings_lines, counts.diagnostics_lines] {
            let missing = (possible - present) as f64 / possible as f64;
            assert!((0.005..0.015).contains(&missing), "{missing}");
        }
        assert_eq!(
            counts.field_values,
            counts.readings_lines * 7 + counts.diagnostics_lines * 3
        );
    }

    #[test]
    fn fixed_point_formatting() {
        let cases = [
            (0, 5, "0.00000"),
            (-1, 5, "-0.00001"),
            (-12_345_678, 5, "-123.45678"),
            (9_000_000, 5, "90.00000"),
            (123, 1, "12.3"),
            (5, 1, "0.5"),
            (359, 0, "359"),
            (100, 2, "1.00"),
            (7, 2, "0.07"),
        ];
        for (scaled, decimals, expected) in cases {
            let mut out = Vec::new();
            push_fixed(&mut out, scaled, decimals);
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
    }

    #[test]
    fn value_matches_printed_text() {
        let values = FieldValues {
            scaled: [-12_345_678, 1, 123, 5, 359, 999, 7],
        };
        for (index, (_, decimals)) in READINGS_FIELDS.iter().enumerate() {
            let mut out = Vec::new();
            push_fixed(&mut out, values.scaled[index], *decimals);
            let parsed: f64 = std::str::from_utf8(&out).unwrap().parse().unwrap();
            assert_eq!(parsed, values.value(index, &READINGS_FIELDS));
        }
    }
}
