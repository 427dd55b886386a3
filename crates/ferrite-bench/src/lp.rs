//! `lp`: InfluxDB line-protocol batches written over HTTP.
//!
//! The dataset imitates the IoT use case of the Time Series Benchmark Suite
//! (TSBS): every line is one `readings` sample of one truck, with the tags
//! `name`, `fleet`, `driver`, `model` and `device_version` and seven float
//! fields. Lines go round-robin over the trucks, so consecutive lines belong
//! to different trucks and each truck's timestamps grow by `--interval-s`.
//! The data is fully determined by the seed and `--start-s`, so runs against
//! different systems send byte-identical bodies.
//!
//! All batches are generated before the clock starts. The first
//! `--warmup-batches` are sent untimed, so each system creates its series
//! (and Ferrite its devices) before the measurement. Then `--connections`
//! workers, each with its own HTTP/1.1 connection, send the remaining batches
//! one request at a time until the batches run out or `--max-duration-s`
//! passes. A point is one field value, so a batch carries `lines x 7` points,
//! and only points of batches acknowledged with 2xx count.
//!
//! With `--dataset FILE` the batches come from a line-protocol file instead,
//! such as one written by `generate`. The whole file is read into memory and
//! split into batches of `--batch-lines` lines before the clock starts. Every
//! batch is sent once and timed. There is no warm-up, because creating the
//! series is part of loading a dataset. The points of a batch are the field
//! values of its lines.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::time::Instant;

use crate::stats::{LatencySummary, round3};
use crate::target::ensure_loopback_url;

/// Fields per line, each of them one point.
pub const FIELDS_PER_LINE: usize = 7;

const FLEETS: [&str; 4] = ["East", "West", "North", "South"];
const DRIVERS: [&str; 6] = ["Albert", "Andy", "Derek", "Rodney", "Seth", "Trish"];
const MODELS: [&str; 3] = ["F-150", "G-2000", "H-2"];
const DEVICE_VERSIONS: [&str; 3] = ["v1.0", "v1.5", "v2.0"];

/// A field's name, its value range, the largest change per step of the
/// random walk, and the decimals written.
struct FieldSpec {
    name: &'static str,
    min: f64,
    max: f64,
    step: f64,
    decimals: usize,
}

const FIELDS: [FieldSpec; FIELDS_PER_LINE] = [
    FieldSpec {
        name: "latitude",
        min: -90.0,
        max: 90.0,
        step: 0.05,
        decimals: 5,
    },
    FieldSpec {
        name: "longitude",
        min: -180.0,
        max: 180.0,
        step: 0.05,
        decimals: 5,
    },
    FieldSpec {
        name: "elevation",
        min: 0.0,
        max: 5000.0,
        step: 10.0,
        decimals: 1,
    },
    FieldSpec {
        name: "velocity",
        min: 0.0,
        max: 100.0,
        step: 5.0,
        decimals: 1,
    },
    FieldSpec {
        name: "heading",
        min: 0.0,
        max: 360.0,
        step: 10.0,
        decimals: 1,
    },
    FieldSpec {
        name: "grade",
        min: 0.0,
        max: 100.0,
        step: 2.0,
        decimals: 1,
    },
    FieldSpec {
        name: "fuel_consumption",
        min: 0.0,
        max: 50.0,
        step: 1.0,
        decimals: 2,
    },
];

#[derive(Args, Debug)]
pub struct LpArgs {
    /// Write URL with its query, such as
    /// http://127.0.0.1:8080/write?precision=ns&device_tag=name.
    #[arg(long)]
    url: String,
    /// Line-protocol file to send once, split into batches of --batch-lines
    /// lines, instead of generated batches.
    #[arg(long, conflicts_with_all = ["batches", "warmup_batches", "devices", "start_s", "interval_s", "seed"])]
    dataset: Option<PathBuf>,
    /// Credential sent as `Authorization: Token <TOKEN>`; none when absent.
    #[arg(long, env = "FERRITE_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Concurrent HTTP connections, each sending one request at a time.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Lines per request body.
    #[arg(long, default_value_t = 5000)]
    batch_lines: usize,
    /// Timed batches; the run ends when they are sent or at --max-duration-s.
    #[arg(long, default_value_t = 200)]
    batches: usize,
    /// Untimed batches sent first, spread over the connections.
    #[arg(long, default_value_t = 4)]
    warmup_batches: usize,
    /// Upper bound of the timed phase in seconds.
    #[arg(long, default_value_t = 60)]
    max_duration_s: u64,
    /// Number of trucks (distinct `name` tags, so devices in Ferrite).
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Unix time in seconds of each truck's first sample [default: one day before now].
    #[arg(long)]
    start_s: Option<i64>,
    /// Seconds between two samples of the same truck.
    #[arg(long, default_value_t = 10)]
    interval_s: i64,
    /// Seed of the value generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout in seconds; a request that times out counts as failed.
    #[arg(long, default_value_t = 60)]
    request_timeout_s: u64,
    /// Name of the system under test, copied into the result line.
    #[arg(long, default_value = "unnamed")]
    label: String,
}

/// The shape and seed of a generated dataset.
#[derive(Debug, Clone, Copy)]
pub struct DatasetSpec {
    pub devices: usize,
    pub batch_lines: usize,
    pub batches: usize,
    pub start_ns: i64,
    pub interval_ns: i64,
    pub seed: u64,
}

struct Truck {
    /// `readings,name=...,device_version=... ` including the space before the fields.
    prefix: String,
    values: [f64; FIELDS_PER_LINE],
}

/// Generates `spec.batches` request bodies of `spec.batch_lines` lines each.
pub fn generate(spec: &DatasetSpec) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut trucks: Vec<Truck> = (0..spec.devices)
        .map(|index| new_truck(index, &mut rng))
        .collect();

    let mut batches = Vec::with_capacity(spec.batches);
    let mut line_index: usize = 0;
    for _ in 0..spec.batches {
        let mut body = String::with_capacity(spec.batch_lines * 200);
        for _ in 0..spec.batch_lines {
            let truck = &mut trucks[line_index % spec.devices];
            let step = (line_index / spec.devices) as i64;
            let timestamp = spec.start_ns + step * spec.interval_ns;
            advance(truck, &mut rng);
            write_line(&mut body, truck, timestamp);
            line_index += 1;
        }
        batches.push(Bytes::from(body));
    }
    batches
}

fn new_truck(index: usize, rng: &mut StdRng) -> Truck {
    let prefix = format!(
        "readings,name=truck_{index},fleet={},driver={},model={},device_version={} ",
        FLEETS[rng.random_range(0..FLEETS.len())],
        DRIVERS[rng.random_range(0..DRIVERS.len())],
        MODELS[rng.random_range(0..MODELS.len())],
        DEVICE_VERSIONS[rng.random_range(0..DEVICE_VERSIONS.len())],
    );
    let values =
        std::array::from_fn(|field| rng.random_range(FIELDS[field].min..=FIELDS[field].max));
    Truck { prefix, values }
}

/// Moves every field one random-walk step, kept inside its range.
fn advance(truck: &mut Truck, rng: &mut StdRng) {
    for (value, spec) in truck.values.iter_mut().zip(FIELDS.iter()) {
        let delta = rng.random_range(-spec.step..=spec.step);
        *value = (*value + delta).clamp(spec.min, spec.max);
    }
}

fn write_line(body: &mut String, truck: &Truck, timestamp_ns: i64) {
    body.push_str(&truck.prefix);
    for (position, (value, spec)) in truck.values.iter().zip(FIELDS.iter()).enumerate() {
        if position > 0 {
            body.push(',');
        }
        let _ = write!(body, "{}={:.*}", spec.name, spec.decimals, value);
    }
    let _ = writeln!(body, " {timestamp_ns}");
}

/// One request body with the lines and points (field values) it carries.
struct Batch {
    body: Bytes,
    lines: u64,
    points: u64,
}

/// The result line of one `lp` run: figure `lp` for generated batches,
/// `lp_dataset` for a dataset file.
#[derive(Debug, Serialize)]
pub struct LpResult {
    figure: &'static str,
    system: String,
    /// The dataset file, for `lp_dataset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
    connections: usize,
    batch_lines: usize,
    /// Fields of every line; null for a dataset, whose lines differ.
    fields_per_line: Option<usize>,
    /// Trucks of the generated batches; null for a dataset.
    devices: Option<usize>,
    warmup_batches: usize,
    /// Timed batches: all of them were sent when this equals batches_ok.
    batches_total: usize,
    batches_ok: usize,
    batches_failed: usize,
    lines: u64,
    points: u64,
    elapsed_s: f64,
    points_per_s: f64,
    lines_per_s: f64,
    /// Points/s over the first and the second half of the acknowledged
    /// batches, which shows whether the rate changes during a run.
    points_per_s_by_half: [f64; 2],
    request_bytes_per_batch: usize,
    latency_ms: LatencySummary,
    /// CPU seconds this process used during the timed phase; null where
    /// /proc is missing.
    generator_cpu_s: Option<f64>,
    first_error: Option<String>,
}

/// Counts and latencies of one worker in the timed phase.
#[derive(Default)]
struct WorkerTally {
    ok: usize,
    failed: usize,
    lines: u64,
    points: u64,
    latencies: Vec<Duration>,
    /// Time from the start of the timed phase to each acknowledgement, with
    /// the points of the batch.
    acknowledged_at: Vec<(Duration, u64)>,
    first_error: Option<String>,
}

struct Target {
    url: reqwest::Url,
    token: Option<String>,
}

pub async fn run(args: LpArgs) -> anyhow::Result<LpResult> {
    let url =
        reqwest::Url::parse(&args.url).with_context(|| format!("invalid --url {:?}", args.url))?;
    ensure_loopback_url(&url)?;
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.batch_lines > 0, "--batch-lines must be at least 1");
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(args.interval_s > 0, "--interval-s must be at least 1");

    let (figure, batches, warmup_batches) = match &args.dataset {
        Some(path) => ("lp_dataset", read_dataset(path, args.batch_lines)?, 0),
        None => {
            let start_s = args.start_s.unwrap_or_else(|| unix_now_s() - 24 * 3600);
            let spec = DatasetSpec {
                devices: args.devices,
                batch_lines: args.batch_lines,
                batches: args.warmup_batches + args.batches,
                start_ns: start_s * 1_000_000_000,
                interval_ns: args.interval_s * 1_000_000_000,
                seed: args.seed,
            };
            let lines = args.batch_lines as u64;
            let batches = generate(&spec)
                .into_iter()
                .map(|body| Batch {
                    body,
                    lines,
                    points: lines * FIELDS_PER_LINE as u64,
                })
                .collect();
            ("lp", batches, args.warmup_batches)
        }
    };
    let batches = Arc::new(batches);
    let target = Arc::new(Target {
        url,
        token: args.token.clone(),
    });
    let clients = (0..args.connections)
        .map(|_| new_client(args.request_timeout_s))
        .collect::<anyhow::Result<Vec<_>>>()?;

    warm_up(&clients, &target, &batches[..warmup_batches]).await?;

    // Timed phase: workers take the next batch index until none is left or
    // the deadline passes.
    let next = Arc::new(AtomicUsize::new(warmup_batches));
    let cpu_before = process_cpu_s();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_duration_s);
    let mut workers = Vec::with_capacity(clients.len());
    for client in clients {
        let batches = Arc::clone(&batches);
        let target = Arc::clone(&target);
        let next = Arc::clone(&next);
        workers.push(tokio::spawn(async move {
            let mut tally = WorkerTally::default();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= batches.len() || Instant::now() >= deadline {
                    break;
                }
                let batch = &batches[index];
                let sent = Instant::now();
                match send(&client, &target, batch.body.clone()).await {
                    Ok(()) => {
                        tally.ok += 1;
                        tally.lines += batch.lines;
                        tally.points += batch.points;
                        tally.latencies.push(sent.elapsed());
                        tally
                            .acknowledged_at
                            .push((started.elapsed(), batch.points));
                    }
                    Err(error) => {
                        tally.failed += 1;
                        tally.first_error.get_or_insert(error);
                    }
                }
            }
            tally
        }));
    }

    let mut total = WorkerTally::default();
    for worker in workers {
        let tally = worker.await.context("an HTTP worker panicked")?;
        total.ok += tally.ok;
        total.failed += tally.failed;
        total.lines += tally.lines;
        total.points += tally.points;
        total.latencies.extend(tally.latencies);
        total.acknowledged_at.extend(tally.acknowledged_at);
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let generator_cpu_s = process_cpu_s()
        .zip(cpu_before)
        .map(|(after, before)| round3(after - before));

    let generated = args.dataset.is_none();
    Ok(LpResult {
        figure,
        system: args.label,
        dataset: args.dataset.as_ref().map(|path| path.display().to_string()),
        connections: args.connections,
        batch_lines: args.batch_lines,
        fields_per_line: generated.then_some(FIELDS_PER_LINE),
        devices: generated.then_some(args.devices),
        warmup_batches,
        batches_total: batches.len() - warmup_batches,
        batches_ok: total.ok,
        batches_failed: total.failed,
        lines: total.lines,
        points: total.points,
        elapsed_s: round3(elapsed),
        points_per_s: (total.points as f64 / elapsed).round(),
        lines_per_s: (total.lines as f64 / elapsed).round(),
        points_per_s_by_half: rate_by_half(&mut total.acknowledged_at),
        request_bytes_per_batch: batches.last().map_or(0, |batch| batch.body.len()),
        latency_ms: LatencySummary::from_durations(&total.latencies),
        generator_cpu_s,
        first_error: total.first_error,
    })
}

/// Returns the user and system CPU seconds of this process (all threads)
/// from /proc/self/stat, or `None` where that file is missing.
fn process_cpu_s() -> Option<f64> {
    // Linux reports these fields in USER_HZ ticks, 100 per second on the
    // architectures this tool runs on.
    const TICKS_PER_S: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name in field 2 may contain spaces, so count from its ")".
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / TICKS_PER_S)
}

/// Reads a line-protocol file and splits it into batches of `batch_lines`
/// lines, each a slice of one buffer. Blank lines and `#` comments are
/// skipped when counting lines and points but stay in the bodies.
fn read_dataset(path: &Path, batch_lines: usize) -> anyhow::Result<Vec<Batch>> {
    let text = Bytes::from(
        std::fs::read(path)
            .with_context(|| format!("cannot read the dataset {}", path.display()))?,
    );
    let batches = split_batches(&text, batch_lines);
    anyhow::ensure!(
        !batches.is_empty(),
        "the dataset {} contains no line-protocol line",
        path.display()
    );
    Ok(batches)
}

fn split_batches(text: &Bytes, batch_lines: usize) -> Vec<Batch> {
    let mut batches = Vec::new();
    let mut batch_start = 0;
    let mut lines = 0u64;
    let mut points = 0u64;
    let mut line_start = 0;
    while line_start < text.len() {
        let line_end = text[line_start..]
            .iter()
            .position(|&byte| byte == b'\n')
            .map_or(text.len(), |offset| line_start + offset + 1);
        let line = &text[line_start..line_end];
        let fields = count_fields(line);
        if fields > 0 {
            lines += 1;
            points += fields as u64;
        }
        line_start = line_end;
        if lines == batch_lines as u64 || (line_start == text.len() && lines > 0) {
            batches.push(Batch {
                body: text.slice(batch_start..line_start),
                lines,
                points,
            });
            batch_start = line_start;
            lines = 0;
            points = 0;
        }
    }
    batches
}

/// Counts the field values of one line-protocol line: the commas of its
/// field set plus one, skipping escaped characters and quoted strings.
/// Returns 0 for a blank line or a `#` comment.
fn count_fields(line: &[u8]) -> usize {
    let line = line.trim_ascii();
    if line.is_empty() || line[0] == b'#' {
        return 0;
    }
    let mut section = 0; // 0: measurement and tags, 1: fields, 2: timestamp
    let mut fields = 0;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in line {
        if escaped {
            escaped = false;
            continue;
        }
        match byte {
            b'\\' => escaped = true,
            b'"' if section == 1 => in_string = !in_string,
            b' ' if !in_string => {
                section += 1;
                if section == 1 {
                    fields = 1;
                }
                if section == 2 {
                    break;
                }
            }
            b',' if section == 1 && !in_string => fields += 1,
            _ => {}
        }
    }
    fields
}

/// Returns the points/s of the first and the second half of the batches, in
/// order of acknowledgement, or zeros with fewer than two batches. Each
/// entry is the acknowledgement time and the points of its batch.
fn rate_by_half(acknowledged_at: &mut [(Duration, u64)]) -> [f64; 2] {
    if acknowledged_at.len() < 2 {
        return [0.0, 0.0];
    }
    acknowledged_at.sort();
    let half = acknowledged_at.len() / 2;
    let middle = acknowledged_at[half - 1].0.as_secs_f64();
    let end = acknowledged_at[acknowledged_at.len() - 1].0.as_secs_f64();
    let first_points: u64 = acknowledged_at[..half]
        .iter()
        .map(|(_, points)| points)
        .sum();
    let second_points: u64 = acknowledged_at[half..]
        .iter()
        .map(|(_, points)| points)
        .sum();
    let first = first_points as f64 / middle;
    let second = second_points as f64 / (end - middle);
    [first.round(), second.round()]
}

fn new_client(timeout_s: u64) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(timeout_s))
        .build()
        .context("cannot build the HTTP client")
}

/// Sends the warm-up batches, one connection per batch in turn, and fails the
/// run on the first error: a rejected warm-up means a setup problem
/// (credentials, body size limit, database missing) that would void the figures.
async fn warm_up(
    clients: &[reqwest::Client],
    target: &Arc<Target>,
    batches: &[Batch],
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let mine: Vec<Bytes> = batches
            .iter()
            .skip(index)
            .step_by(clients.len())
            .map(|batch| batch.body.clone())
            .collect();
        let client = client.clone();
        let target = Arc::clone(target);
        tasks.push(tokio::spawn(async move {
            for body in mine {
                send(&client, &target, body).await?;
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await
            .context("a warm-up worker panicked")?
            .map_err(|error| {
                anyhow::anyhow!("a warm-up batch failed, so the run is void: {error}")
            })?;
    }
    Ok(())
}

/// Posts one body. Any response other than 2xx is an error with its status
/// and the start of its body.
async fn send(client: &reqwest::Client, target: &Target, body: Bytes) -> Result<(), String> {
    let mut request = client
        .post(target.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(body);
    if let Some(token) = &target.token {
        request = request.header(reqwest::header::AUTHORIZATION, format!("Token {token}"));
    }
    let response = request
        .send()
        .await
        .map_err(|error| format!("request failed: {error}"))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let excerpt: String = text.chars().take(300).collect();
    Err(format!("HTTP {status}: {excerpt}"))
}

fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DatasetSpec {
        DatasetSpec {
            devices: 3,
            batch_lines: 4,
            batches: 2,
            start_ns: 1_700_000_000_000_000_000,
            interval_ns: 10_000_000_000,
            seed: 7,
        }
    }

    #[test]
    fn dataset_is_deterministic() {
        assert_eq!(generate(&spec()), generate(&spec()));
        let other_seed = DatasetSpec { seed: 8, ..spec() };
        assert_ne!(generate(&spec()), generate(&other_seed));
    }

    #[test]
    fn dataset_shape() {
        let batches = generate(&spec());
        assert_eq!(batches.len(), 2);
        for body in &batches {
            let text = std::str::from_utf8(body).unwrap();
            assert_eq!(text.lines().count(), 4);
            for line in text.lines() {
                let parts: Vec<&str> = line.split(' ').collect();
                assert_eq!(parts.len(), 3, "{line}");
                assert!(parts[0].starts_with("readings,name=truck_"), "{line}");
                assert_eq!(parts[0].split(',').count(), 6, "{line}");
                assert_eq!(parts[1].split(',').count(), FIELDS_PER_LINE, "{line}");
                assert!(parts[2].parse::<i64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn lines_round_robin_over_trucks() {
        let batches = generate(&spec());
        let text: String = batches
            .iter()
            .map(|b| std::str::from_utf8(b).unwrap())
            .collect();
        let lines: Vec<&str> = text.lines().collect();
        let name = |line: &str| line.split(',').nth(1).unwrap().to_owned();
        let timestamp = |line: &str| line.rsplit(' ').next().unwrap().parse::<i64>().unwrap();

        assert_eq!(name(lines[0]), "name=truck_0");
        assert_eq!(name(lines[2]), "name=truck_2");
        assert_eq!(name(lines[3]), "name=truck_0");
        assert_eq!(timestamp(lines[0]), 1_700_000_000_000_000_000);
        assert_eq!(timestamp(lines[3]) - timestamp(lines[0]), 10_000_000_000);
        // A truck keeps its tags from line to line.
        assert_eq!(lines[0].split(' ').next(), lines[3].split(' ').next());
    }

    #[test]
    fn rate_by_half_splits_batches() {
        let mut times: Vec<(Duration, u64)> = [4, 1, 2, 8]
            .into_iter()
            .map(|seconds| (Duration::from_secs(seconds), 10))
            .collect();
        // Two batches by 2 s, two more in the 6 s after.
        assert_eq!(rate_by_half(&mut times), [10.0, 3.0]);
        assert_eq!(
            rate_by_half(&mut [(Duration::from_secs(1), 10)]),
            [0.0, 0.0]
        );
    }

    #[test]
    fn field_count_of_lines() {
        let cases: [(&[u8], usize); 8] = [
            (b"readings,name=truck_1 a=1,b=2.5,c=3 1000\n", 3),
            (b"m a=1", 1),
            (b"m,tag=x\\ y a=1,b=2 5", 2),
            (b"m s=\"x, y z\",n=1 5", 2),
            (b"m s=\"q\\\"x,y\",n=1", 2),
            (b"", 0),
            (b"   \n", 0),
            (b"# comment a=1,b=2", 0),
        ];
        for (line, expected) in cases {
            assert_eq!(
                count_fields(line),
                expected,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn dataset_splits_into_batches() {
        let text = Bytes::from_static(b"m a=1,b=2 1\nm a=1 2\n\n# note\nm a=1,b=2,c=3 3\nm x=1 4");
        let batches = split_batches(&text, 2);
        assert_eq!(batches.len(), 2);
        assert_eq!(
            batches[0].body,
            Bytes::from_static(b"m a=1,b=2 1\nm a=1 2\n")
        );
        assert_eq!((batches[0].lines, batches[0].points), (2, 3));
        assert_eq!(
            batches[1].body,
            Bytes::from_static(b"\n# note\nm a=1,b=2,c=3 3\nm x=1 4")
        );
        assert_eq!((batches[1].lines, batches[1].points), (2, 4));

        let one_batch = split_batches(&text, 100);
        assert_eq!(one_batch.len(), 1);
        assert_eq!(one_batch[0].body, text);
        assert!(split_batches(&Bytes::from_static(b"\n# only\n"), 2).is_empty());
    }

    #[test]
    fn values_stay_in_range() {
        let big = DatasetSpec {
            devices: 5,
            batch_lines: 500,
            batches: 4,
            ..spec()
        };
        for body in generate(&big) {
            for line in std::str::from_utf8(&body).unwrap().lines() {
                let fields = line.split(' ').nth(1).unwrap();
                for (field, spec) in fields.split(',').zip(FIELDS.iter()) {
                    let (name, value) = field.split_once('=').unwrap();
                    assert_eq!(name, spec.name);
                    let value: f64 = value.parse().unwrap();
                    assert!((spec.min..=spec.max).contains(&value), "{field}");
                }
            }
        }
    }
}
