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

use std::fmt::Write as _;
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

/// The result line of one `lp` run.
#[derive(Debug, Serialize)]
pub struct LpResult {
    figure: &'static str,
    system: String,
    connections: usize,
    batch_lines: usize,
    fields_per_line: usize,
    devices: usize,
    warmup_batches: usize,
    batches_ok: usize,
    batches_failed: usize,
    lines: u64,
    points: u64,
    elapsed_s: f64,
    points_per_s: f64,
    /// Points/s over the first and the second half of the acknowledged
    /// batches, which shows whether the rate changes during a run.
    points_per_s_by_half: [f64; 2],
    request_bytes_per_batch: usize,
    latency_ms: LatencySummary,
    first_error: Option<String>,
}

/// Counts and latencies of one worker in the timed phase.
#[derive(Default)]
struct WorkerTally {
    ok: usize,
    failed: usize,
    latencies: Vec<Duration>,
    /// Time from the start of the timed phase to each acknowledgement.
    acknowledged_at: Vec<Duration>,
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

    let start_s = args.start_s.unwrap_or_else(|| unix_now_s() - 24 * 3600);
    let spec = DatasetSpec {
        devices: args.devices,
        batch_lines: args.batch_lines,
        batches: args.warmup_batches + args.batches,
        start_ns: start_s * 1_000_000_000,
        interval_ns: args.interval_s * 1_000_000_000,
        seed: args.seed,
    };
    let batches = Arc::new(generate(&spec));
    let target = Arc::new(Target {
        url,
        token: args.token.clone(),
    });
    let clients = (0..args.connections)
        .map(|_| new_client(args.request_timeout_s))
        .collect::<anyhow::Result<Vec<_>>>()?;

    warm_up(&clients, &target, &batches[..args.warmup_batches]).await?;

    // Timed phase: workers take the next batch index until none is left or
    // the deadline passes.
    let next = Arc::new(AtomicUsize::new(args.warmup_batches));
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
                let sent = Instant::now();
                match send(&client, &target, batches[index].clone()).await {
                    Ok(()) => {
                        tally.ok += 1;
                        tally.latencies.push(sent.elapsed());
                        tally.acknowledged_at.push(started.elapsed());
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
        total.latencies.extend(tally.latencies);
        total.acknowledged_at.extend(tally.acknowledged_at);
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();

    let lines = (total.ok * args.batch_lines) as u64;
    let points = lines * FIELDS_PER_LINE as u64;
    Ok(LpResult {
        figure: "lp",
        system: args.label,
        connections: args.connections,
        batch_lines: args.batch_lines,
        fields_per_line: FIELDS_PER_LINE,
        devices: args.devices,
        warmup_batches: args.warmup_batches,
        batches_ok: total.ok,
        batches_failed: total.failed,
        lines,
        points,
        elapsed_s: round3(elapsed),
        points_per_s: (points as f64 / elapsed).round(),
        points_per_s_by_half: rate_by_half(
            &mut total.acknowledged_at,
            args.batch_lines * FIELDS_PER_LINE,
        ),
        request_bytes_per_batch: batches.last().map_or(0, Bytes::len),
        latency_ms: LatencySummary::from_durations(&total.latencies),
        first_error: total.first_error,
    })
}

/// Returns the points/s of the first and the second half of the batches, in
/// order of acknowledgement, or zeros with fewer than two batches.
fn rate_by_half(acknowledged_at: &mut [Duration], points_per_batch: usize) -> [f64; 2] {
    if acknowledged_at.len() < 2 {
        return [0.0, 0.0];
    }
    acknowledged_at.sort();
    let half = acknowledged_at.len() / 2;
    let middle = acknowledged_at[half - 1].as_secs_f64();
    let end = acknowledged_at[acknowledged_at.len() - 1].as_secs_f64();
    let first = (half * points_per_batch) as f64 / middle;
    let second = ((acknowledged_at.len() - half) * points_per_batch) as f64 / (end - middle);
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
    batches: &[Bytes],
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let mine: Vec<Bytes> = batches
            .iter()
            .skip(index)
            .step_by(clients.len())
            .cloned()
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
        let mut times: Vec<Duration> = [4, 1, 2, 8].into_iter().map(Duration::from_secs).collect();
        // Two batches by 2 s, two more in the 6 s after.
        assert_eq!(rate_by_half(&mut times, 10), [10.0, 3.0]);
        assert_eq!(rate_by_half(&mut [Duration::from_secs(1)], 10), [0.0, 0.0]);
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
