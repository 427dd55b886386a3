//! `queries`: the IoT fleet query set against one system.
//!
//! The queries follow the IoT queries of the Time Series Benchmark Suite and
//! run over a dataset written by `generate`, described by the same
//! `--devices`, `--start` and `--duration`. Each query is one HTTP request in
//! every system:
//!
//! | name              | question                                                        |
//! |-------------------|-----------------------------------------------------------------|
//! | `last-loc`        | last latitude and longitude of every truck in fleet South       |
//! | `avg-velocity-1h` | mean velocity per truck in 1-hour buckets over the first day    |
//! | `low-fuel`        | trucks whose latest fuel_state is below 0.1                     |
//! | `daily-activity`  | mean status per fleet and day (all points, not mean of means)   |
//! | `single-raw`      | one truck's 7 readings fields, raw, for one hour                |
//! | `single-latest`   | latest velocity of one truck                                    |
//! | `single-range`    | one truck's velocity, raw, for one hour                         |
//!
//! A first, untimed round runs every query once and records its result
//! size; then `--rounds` rounds run the queries in turn and time them. The
//! result size is `rows`: trucks for `last-loc` and `low-fuel`, non-empty
//! (group, bucket) pairs for the aggregates, report times for `single-raw`,
//! values for the other single-truck queries. `value_sum` adds every numeric
//! value of the result, so two systems that return the same rows with
//! different values still differ. `--system expected` computes both from the
//! generator (it needs the same `--seed`) instead of asking a server.
//!
//! Semantic differences that remain between the systems are noted at the
//! code that builds each system's requests.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::stats::LatencySummary;
use crate::target::ensure_loopback_url;
use crate::tsbs::{
    DEFAULT_START, DIAGNOSTICS_FIELDS, FLEETS, FleetGenerator, FleetSpec, INTERVAL_NS,
    READINGS_FIELDS, format_rfc3339,
};

const HOUR_NS: i64 = 3_600_000_000_000;
const DAY_NS: i64 = 24 * HOUR_NS;

/// The fleet of `last-loc`.
const FLEET: &str = "South";
/// The `low-fuel` threshold.
const LOW_FUEL: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum System {
    Ferrite,
    Influxdb,
    Victoriametrics,
    /// No server: results computed from the generator.
    Expected,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Ferrite => "ferrite",
            Self::Influxdb => "influxdb",
            Self::Victoriametrics => "victoriametrics",
            Self::Expected => "expected",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Query {
    LastLoc,
    AvgVelocity1h,
    LowFuel,
    DailyActivity,
    SingleRaw,
    SingleLatest,
    SingleRange,
}

impl Query {
    pub const ALL: [Query; 7] = [
        Query::LastLoc,
        Query::AvgVelocity1h,
        Query::LowFuel,
        Query::DailyActivity,
        Query::SingleRaw,
        Query::SingleLatest,
        Query::SingleRange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::LastLoc => "last-loc",
            Self::AvgVelocity1h => "avg-velocity-1h",
            Self::LowFuel => "low-fuel",
            Self::DailyActivity => "daily-activity",
            Self::SingleRaw => "single-raw",
            Self::SingleLatest => "single-latest",
            Self::SingleRange => "single-range",
        }
    }
}

#[derive(Args, Debug)]
pub struct QueriesArgs {
    /// System to query.
    #[arg(long, value_enum)]
    system: System,
    /// Base URL of the system, such as http://127.0.0.1:8086; not used by `expected`.
    #[arg(long, required_if_eq_any = [("system", "ferrite"), ("system", "influxdb"), ("system", "victoriametrics")])]
    url: Option<String>,
    /// Timed rounds; each runs every query once.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Ferrite API key, sent as `Authorization: Bearer <TOKEN>`.
    #[arg(long, env = "FERRITE_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// InfluxDB database holding the dataset.
    #[arg(long, default_value = "bench")]
    db: String,
    /// Trucks in the dataset.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Time of the dataset's first report, RFC 3339.
    #[arg(long, default_value = DEFAULT_START)]
    start: String,
    /// Time span of the dataset, such as 1d or 2h.
    #[arg(long, default_value = "1d")]
    duration: String,
    /// Seed the dataset was generated with; used by `expected` only.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Index of the truck of the single-truck queries.
    #[arg(long, default_value_t = 5)]
    truck: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 60)]
    request_timeout_s: u64,
    /// Name of the system in the result line [default: the --system value].
    #[arg(long)]
    label: Option<String>,
}

/// The time ranges the queries ask for, derived from the dataset.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Dataset end: the time of instant queries.
    end_ns: i64,
    /// Start of the dataset's first UTC day: the range of `avg-velocity-1h`
    /// is this day.
    first_day_ns: i64,
    /// End of the last UTC day with data: `daily-activity` covers
    /// `[first_day_ns, days_end_ns)`.
    days_end_ns: i64,
    /// Start of the hour of the single-truck range queries, in the middle
    /// of the dataset.
    hour_ns: i64,
    /// Look-behind of VictoriaMetrics' instant queries: the whole dataset.
    lookbehind_s: i64,
}

impl Window {
    fn new(spec: &FleetSpec) -> Self {
        let middle = spec.start_ns + spec.duration_ns / 2;
        let duration_s = (spec.duration_ns + INTERVAL_NS) / 1_000_000_000 + 1;
        Self {
            end_ns: spec.end_ns(),
            first_day_ns: spec.start_ns.div_euclid(DAY_NS) * DAY_NS,
            days_end_ns: (spec.end_ns() + DAY_NS - 1).div_euclid(DAY_NS) * DAY_NS,
            hour_ns: middle.div_euclid(HOUR_NS) * HOUR_NS,
            lookbehind_s: duration_s,
        }
    }
}

/// Size and checksum of one query's result.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Outcome {
    pub rows: u64,
    pub value_sum: f64,
}

/// Result size, checksum, latency and errors of one query.
#[derive(Debug, Serialize)]
struct QueryResult {
    /// Latency of the timed rounds; null for `expected` or a failed query.
    latency_ms: Option<LatencySummary>,
    rows: Option<u64>,
    value_sum: Option<f64>,
    /// Timed requests that failed.
    failures: usize,
    error: Option<String>,
}

/// The result line of one `queries` run.
#[derive(Debug, Serialize)]
pub struct QueriesResult {
    figure: &'static str,
    system: String,
    rounds: usize,
    devices: usize,
    start: String,
    duration_s: f64,
    truck: String,
    queries: BTreeMap<&'static str, QueryResult>,
}

pub async fn run(args: QueriesArgs) -> anyhow::Result<QueriesResult> {
    let spec = FleetSpec::parse(args.devices, &args.start, &args.duration, args.seed)?;
    anyhow::ensure!(
        args.truck < args.devices,
        "--truck {} is not in the dataset: give an index below --devices {}",
        args.truck,
        args.devices
    );
    let window = Window::new(&spec);
    let truck = format!("truck_{}", args.truck);

    let queries = if args.system == System::Expected {
        expected_results(&spec, &window, args.truck)
    } else {
        let client = Client::connect(&args, window, truck.clone()).await?;
        measure(&client, args.rounds).await
    };

    Ok(QueriesResult {
        figure: "queries",
        system: args
            .label
            .clone()
            .unwrap_or_else(|| args.system.name().to_owned()),
        rounds: args.rounds,
        devices: args.devices,
        start: format_rfc3339(spec.start_ns),
        duration_s: spec.duration_ns as f64 / 1e9,
        truck,
        queries,
    })
}

/// Runs the untimed round, then the timed ones.
async fn measure(client: &Client, rounds: usize) -> BTreeMap<&'static str, QueryResult> {
    let mut results = BTreeMap::new();
    let mut timings: BTreeMap<Query, Vec<Duration>> = BTreeMap::new();
    for query in Query::ALL {
        let result = match client.run(query).await {
            Ok((outcome, _)) => {
                timings.insert(query, Vec::with_capacity(rounds));
                QueryResult {
                    latency_ms: None,
                    rows: Some(outcome.rows),
                    value_sum: Some(round_sum(outcome.value_sum)),
                    failures: 0,
                    error: None,
                }
            }
            Err(error) => QueryResult {
                latency_ms: None,
                rows: None,
                value_sum: None,
                failures: 0,
                error: Some(format!("{error:#}")),
            },
        };
        results.insert(query.name(), result);
    }

    for _ in 0..rounds {
        for (query, samples) in timings.iter_mut() {
            let result = results
                .get_mut(query.name())
                .expect("every query has a result");
            match client.run(*query).await {
                Ok((_, elapsed)) => samples.push(elapsed),
                Err(error) => {
                    result.failures += 1;
                    result.error.get_or_insert_with(|| format!("{error:#}"));
                }
            }
        }
    }
    for (query, samples) in timings {
        if let Some(result) = results.get_mut(query.name())
            && !samples.is_empty()
        {
            result.latency_ms = Some(LatencySummary::from_durations(&samples));
        }
    }
    results
}

/// Rounds a checksum to 4 decimals, which keeps the float noise of
/// different summation orders out of the result line.
fn round_sum(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
}

/// One system's connection and the requests of every query.
struct Client {
    system: System,
    http: reqwest::Client,
    base: reqwest::Url,
    token: Option<String>,
    db: String,
    window: Window,
    truck: String,
    /// Ferrite's id of the single-query truck, looked up once before the
    /// rounds, as a dashboard would keep it.
    device_id: Option<String>,
}

impl Client {
    async fn connect(args: &QueriesArgs, window: Window, truck: String) -> anyhow::Result<Self> {
        let text = args.url.as_deref().unwrap_or_default();
        let base = reqwest::Url::parse(text).with_context(|| format!("invalid --url {text:?}"))?;
        ensure_loopback_url(&base)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(args.request_timeout_s))
            .build()
            .context("cannot build the HTTP client")?;
        let mut client = Self {
            system: args.system,
            http,
            base,
            token: args.token.clone(),
            db: args.db.clone(),
            window,
            truck,
            device_id: None,
        };
        if client.system == System::Ferrite {
            anyhow::ensure!(
                client.token.is_some(),
                "--token is missing: Ferrite's query API needs an API key"
            );
            client.device_id = Some(client.ferrite_device_id().await?);
        }
        Ok(client)
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        url.set_path(path);
        url
    }

    /// Sends one query and returns its outcome and the time from sending the
    /// request to the end of the response body.
    async fn run(&self, query: Query) -> anyhow::Result<(Outcome, Duration)> {
        let request = match self.system {
            System::Ferrite => self.ferrite_request(query),
            System::Influxdb => self.influxdb_request(query),
            System::Victoriametrics => self.victoriametrics_request(query),
            System::Expected => bail!("the expected results need no request"),
        };
        let started = Instant::now();
        let response = request.send().await.context("request failed")?;
        let status = response.status();
        let more_pages = response.headers().contains_key("ferrite-next-cursor");
        let body = response
            .bytes()
            .await
            .context("reading the response failed")?;
        let elapsed = started.elapsed();

        if !status.is_success() {
            let excerpt: String = String::from_utf8_lossy(&body).chars().take(300).collect();
            bail!("HTTP {status}: {excerpt}");
        }
        anyhow::ensure!(
            !more_pages,
            "the response holds only the first page; the raw range has more than 10000 points per key"
        );
        let outcome = match self.system {
            System::Ferrite => ferrite_outcome(query, &parse_json(&body)?)?,
            System::Influxdb => influxdb_outcome(&parse_json(&body)?)?,
            System::Victoriametrics if query == Query::SingleRaw => {
                victoriametrics_export_outcome(&body)?
            }
            System::Victoriametrics => victoriametrics_outcome(query, &parse_json(&body)?)?,
            System::Expected => unreachable!("handled above"),
        };
        Ok((outcome, elapsed))
    }

    // ------------------------------------------------------------ Ferrite ---

    async fn ferrite_device_id(&self) -> anyhow::Result<String> {
        let response = self
            .http
            .get(self.url("/api/v1/devices"))
            .bearer_auth(self.token.as_deref().unwrap_or_default())
            .query(&[("name", self.truck.as_str())])
            .send()
            .await
            .context("the device lookup failed")?;
        let status = response.status();
        let body = response.bytes().await?;
        anyhow::ensure!(
            status.is_success(),
            "the device lookup of {} returned HTTP {status}: {}",
            self.truck,
            String::from_utf8_lossy(&body)
        );
        let devices = parse_json(&body)?;
        devices["devices"]
            .as_array()
            .and_then(|devices| {
                devices
                    .iter()
                    .find(|device| device["name"].as_str() == Some(self.truck.as_str()))
            })
            .and_then(|device| device["id"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("Ferrite has no device named {}", self.truck))
    }

    fn ferrite_request(&self, query: Query) -> reqwest::RequestBuilder {
        let window = &self.window;
        let ms = |ns: i64| (ns / 1_000_000).to_string();
        let device = self.device_id.as_deref().unwrap_or_default();
        let readings_keys = READINGS_FIELDS
            .iter()
            .map(|(name, _)| format!("readings.{name}"))
            .collect::<Vec<_>>()
            .join(",");
        let fleet_label = format!("fleet:{FLEET}");
        let low_fuel = format!("diagnostics.fuel_state<{LOW_FUEL}");

        let (path, params): (String, Vec<(&str, String)>) = match query {
            Query::LastLoc => (
                "/api/v1/telemetry/latest".into(),
                vec![
                    ("keys", "readings.latitude,readings.longitude".into()),
                    ("label", fleet_label),
                ],
            ),
            Query::AvgVelocity1h => (
                "/api/v1/telemetry/aggregate".into(),
                vec![
                    ("key", "readings.velocity".into()),
                    ("agg", "avg".into()),
                    ("interval", "1h".into()),
                    ("start", ms(window.first_day_ns)),
                    ("end", ms(window.first_day_ns + DAY_NS)),
                    ("group_by", "device".into()),
                ],
            ),
            Query::LowFuel => (
                "/api/v1/telemetry/latest".into(),
                vec![
                    ("keys", "diagnostics.fuel_state".into()),
                    ("filter", low_fuel),
                ],
            ),
            Query::DailyActivity => (
                "/api/v1/telemetry/aggregate".into(),
                vec![
                    ("key", "diagnostics.status".into()),
                    ("agg", "avg".into()),
                    ("interval", "1d".into()),
                    ("start", ms(window.first_day_ns)),
                    ("end", ms(window.days_end_ns)),
                    ("group_by", "fleet".into()),
                ],
            ),
            Query::SingleRaw | Query::SingleRange => (
                format!("/api/v1/devices/{device}/telemetry"),
                vec![
                    (
                        "keys",
                        if query == Query::SingleRaw {
                            readings_keys
                        } else {
                            "readings.velocity".into()
                        },
                    ),
                    ("start", ms(window.hour_ns)),
                    ("end", ms(window.hour_ns + HOUR_NS)),
                    ("limit", "10000".into()),
                ],
            ),
            Query::SingleLatest => (
                format!("/api/v1/devices/{device}/telemetry/latest"),
                vec![("keys", "readings.velocity".into())],
            ),
        };
        self.http
            .get(self.url(&path))
            .bearer_auth(self.token.as_deref().unwrap_or_default())
            .query(&params)
    }

    // ----------------------------------------------------------- InfluxDB ---

    /// InfluxQL with every identifier quoted, because `name` and
    /// `diagnostics` are InfluxQL keywords. Times are ns integers.
    fn influxdb_request(&self, query: Query) -> reqwest::RequestBuilder {
        let window = &self.window;
        let truck = &self.truck;
        let hour = format!(
            "time >= {} AND time < {}",
            window.hour_ns,
            window.hour_ns + HOUR_NS
        );
        let fields = READINGS_FIELDS
            .iter()
            .map(|(name, _)| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = match query {
            Query::LastLoc => format!(
                "SELECT last(\"latitude\"), last(\"longitude\") FROM \"readings\" \
                 WHERE \"fleet\" = '{FLEET}' GROUP BY \"name\""
            ),
            Query::AvgVelocity1h => format!(
                "SELECT mean(\"velocity\") FROM \"readings\" WHERE time >= {} AND time < {} \
                 GROUP BY time(1h), \"name\"",
                window.first_day_ns,
                window.first_day_ns + DAY_NS
            ),
            // InfluxQL cannot filter on the result of last() directly, so a
            // subquery takes each truck's last value first.
            Query::LowFuel => format!(
                "SELECT \"fuel_state\" FROM (SELECT last(\"fuel_state\") AS \"fuel_state\" \
                 FROM \"diagnostics\" GROUP BY \"name\") WHERE \"fuel_state\" < {LOW_FUEL} \
                 GROUP BY \"name\""
            ),
            Query::DailyActivity => format!(
                "SELECT mean(\"status\") FROM \"diagnostics\" WHERE time >= {} AND time < {} \
                 GROUP BY time(1d), \"fleet\"",
                window.first_day_ns, window.days_end_ns
            ),
            // The 7 fields by name instead of `*`, which would add the 5
            // tags to every row and make the response larger than the
            // other systems'.
            Query::SingleRaw => {
                format!("SELECT {fields} FROM \"readings\" WHERE \"name\" = '{truck}' AND {hour}")
            }
            Query::SingleLatest => {
                format!("SELECT last(\"velocity\") FROM \"readings\" WHERE \"name\" = '{truck}'")
            }
            Query::SingleRange => format!(
                "SELECT \"velocity\" FROM \"readings\" WHERE \"name\" = '{truck}' AND {hour}"
            ),
        };
        self.http.get(self.url("/query")).query(&[
            ("db", self.db.as_str()),
            ("epoch", "ms"),
            ("q", text.as_str()),
        ])
    }

    // ---------------------------------------------------- VictoriaMetrics ---

    /// MetricsQL over the metric names VictoriaMetrics gives line-protocol
    /// fields: `{measurement}_{field}` (its -influxMeasurementFieldSeparator
    /// defaults to `_`), with the tags as labels.
    ///
    /// A rollup such as `avg_over_time(m[1h])` evaluated at time t covers
    /// `(t - 1h, t]`. The bucket queries add `offset -(window - 1ms)`, so the
    /// value at a bucket start t covers `[t, t + window)` at the millisecond
    /// resolution VictoriaMetrics stores, the same rows as InfluxDB's and
    /// Ferrite's buckets.
    ///
    /// `nocache=1` turns off the rollup result cache, so repeated rounds
    /// measure the query and not the cache. It also keeps VictoriaMetrics
    /// from moving start and end to multiples of the step, which it does for
    /// caching once a series has 50 points or more. The start times here are
    /// multiples of the step anyway.
    fn victoriametrics_request(&self, query: Query) -> reqwest::RequestBuilder {
        let window = &self.window;
        let truck = &self.truck;
        let lookbehind = format!("{}s", window.lookbehind_s);
        let at_end = seconds(window.end_ns);
        let hour_start = seconds(window.hour_ns);
        let hour_last_ms = seconds(window.hour_ns + HOUR_NS - 1_000_000);

        let instant = |text: String, time: String| {
            self.http.get(self.url("/api/v1/query")).query(&[
                ("query", text),
                ("time", time),
                ("nocache", "1".to_owned()),
            ])
        };
        let range = |text: String, start: i64, end: i64, step: &str| {
            self.http.get(self.url("/api/v1/query_range")).query(&[
                ("query", text),
                ("start", seconds(start)),
                ("end", seconds(end)),
                ("step", step.to_owned()),
                ("nocache", "1".to_owned()),
            ])
        };

        match query {
            // Rollup functions drop the metric name, which would leave the
            // latitude and longitude series of a truck with the same labels;
            // keep_metric_names keeps them apart.
            Query::LastLoc => instant(
                format!(
                    "last_over_time({{__name__=~\"readings_(latitude|longitude)\",fleet=\"{FLEET}\"}}[{lookbehind}]) keep_metric_names"
                ),
                at_end,
            ),
            Query::AvgVelocity1h => range(
                "avg_over_time(readings_velocity[1h] offset -3599999ms)".to_owned(),
                window.first_day_ns,
                window.first_day_ns + DAY_NS - HOUR_NS,
                "1h",
            ),
            Query::LowFuel => instant(
                format!("last_over_time(diagnostics_fuel_state[{lookbehind}]) < {LOW_FUEL}"),
                at_end,
            ),
            Query::DailyActivity => range(
                "sum by (fleet) (sum_over_time(diagnostics_status[1d] offset -86399999ms)) \
                 / sum by (fleet) (count_over_time(diagnostics_status[1d] offset -86399999ms))"
                    .to_owned(),
                window.first_day_ns,
                window.days_end_ns - DAY_NS,
                "1d",
            ),
            // The export API returns raw samples of every matching series;
            // start and end are both inclusive there.
            Query::SingleRaw => self.http.get(self.url("/api/v1/export")).query(&[
                (
                    "match[]",
                    format!("{{__name__=~\"readings_.*\",name=\"{truck}\"}}"),
                ),
                ("start", hour_start),
                ("end", hour_last_ms.clone()),
            ]),
            Query::SingleLatest => instant(
                format!("last_over_time(readings_velocity{{name=\"{truck}\"}}[{lookbehind}])"),
                at_end,
            ),
            // A range selector in an instant query returns raw samples of
            // (time - 1h, time], so time is the hour's last millisecond.
            Query::SingleRange => instant(
                format!("readings_velocity{{name=\"{truck}\"}}[1h]"),
                hour_last_ms,
            ),
        }
    }
}

/// Formats ns since the epoch as seconds with millisecond decimals.
fn seconds(ns: i64) -> String {
    let ms = ns.div_euclid(1_000_000);
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

fn parse_json(body: &[u8]) -> anyhow::Result<Value> {
    serde_json::from_slice(body).with_context(|| {
        let excerpt: String = String::from_utf8_lossy(body).chars().take(200).collect();
        format!("the response is not valid JSON: {excerpt}")
    })
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.parse::<f64>().ok(),
        _ => None,
    }
    .filter(|value| value.is_finite())
}

// ---------------------------------------------------------------- results ---

/// Reads a Ferrite response. Fleet latest counts the devices that have
/// every requested key, aggregates count the buckets with a value, raw
/// ranges count the distinct timestamps, and a device's latest counts keys.
fn ferrite_outcome(query: Query, body: &Value) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    match query {
        Query::LastLoc | Query::LowFuel => {
            let required_keys = if query == Query::LastLoc { 2 } else { 1 };
            let devices = body["devices"]
                .as_array()
                .context("the response has no devices list")?;
            for device in devices {
                let values = device["values"]
                    .as_object()
                    .context("a device has no values object")?;
                let numbers: Vec<f64> = values
                    .values()
                    .filter_map(|point| number(&point["value"]))
                    .collect();
                if numbers.len() >= required_keys {
                    outcome.rows += 1;
                    outcome.value_sum += numbers.iter().sum::<f64>();
                }
            }
        }
        Query::AvgVelocity1h | Query::DailyActivity => {
            let groups = body["groups"]
                .as_array()
                .context("the response has no groups list")?;
            for group in groups {
                let buckets = group["buckets"]
                    .as_array()
                    .context("a group has no buckets list")?;
                for value in buckets.iter().filter_map(|bucket| number(&bucket["value"])) {
                    outcome.rows += 1;
                    outcome.value_sum += value;
                }
            }
        }
        Query::SingleRaw | Query::SingleRange => {
            // The per-device endpoint returns the key map at the top level;
            // a `series` wrapper is accepted as well.
            let series = body
                .get("series")
                .unwrap_or(body)
                .as_object()
                .context("the response is not a map of keys to points")?;
            let mut times = HashSet::new();
            for points in series.values() {
                for point in points.as_array().context("a key has no points list")? {
                    if let Some(value) = number(&point["value"]) {
                        times.insert(point["ts"].as_i64().unwrap_or_default());
                        outcome.value_sum += value;
                    }
                }
            }
            outcome.rows = times.len() as u64;
        }
        Query::SingleLatest => {
            let keys = body.as_object().context("the response is not a key map")?;
            for point in keys.values() {
                if let Some(value) = number(&point["value"]) {
                    outcome.rows += 1;
                    outcome.value_sum += value;
                }
            }
        }
    }
    Ok(outcome)
}

/// Reads an InfluxDB 1.x `/query` response: a row counts when any column
/// other than `time` has a value.
fn influxdb_outcome(body: &Value) -> anyhow::Result<Outcome> {
    if let Some(error) = body["error"].as_str() {
        bail!("InfluxDB returned an error: {error}");
    }
    let mut outcome = Outcome::default();
    let results = body["results"]
        .as_array()
        .context("the response has no results list")?;
    for result in results {
        if let Some(error) = result["error"].as_str() {
            bail!("InfluxDB returned an error: {error}");
        }
        for series in result["series"].as_array().into_iter().flatten() {
            let columns = series["columns"]
                .as_array()
                .context("a series has no columns")?;
            let time_column = columns.iter().position(|column| column == "time");
            for row in series["values"].as_array().into_iter().flatten() {
                let cells = row.as_array().context("a row is not a list")?;
                let numbers: Vec<f64> = cells
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| Some(*index) != time_column)
                    .filter_map(|(_, cell)| number(cell))
                    .collect();
                if !numbers.is_empty() {
                    outcome.rows += 1;
                    outcome.value_sum += numbers.iter().sum::<f64>();
                }
            }
        }
    }
    Ok(outcome)
}

/// Reads a VictoriaMetrics `/api/v1/query` or `/query_range` response.
/// `last-loc` counts distinct trucks; the other queries count values.
fn victoriametrics_outcome(query: Query, body: &Value) -> anyhow::Result<Outcome> {
    if body["status"].as_str() != Some("success") {
        bail!(
            "VictoriaMetrics returned an error: {}",
            body["error"].as_str().unwrap_or("no error text")
        );
    }
    let mut outcome = Outcome::default();
    let mut trucks = BTreeSet::new();
    let results = body["data"]["result"]
        .as_array()
        .context("the response has no data.result list")?;
    for series in results {
        let samples: Vec<&Value> = match series.get("values") {
            Some(values) => values.as_array().into_iter().flatten().collect(),
            None => series.get("value").into_iter().collect(),
        };
        for sample in samples {
            if let Some(value) = number(&sample[1]) {
                outcome.rows += 1;
                outcome.value_sum += value;
                if let Some(name) = series["metric"]["name"].as_str() {
                    trucks.insert(name.to_owned());
                }
            }
        }
    }
    if query == Query::LastLoc {
        outcome.rows = trucks.len() as u64;
    }
    Ok(outcome)
}

/// Reads the JSON lines of `/api/v1/export`: rows are distinct timestamps.
fn victoriametrics_export_outcome(body: &[u8]) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome::default();
    let mut times = HashSet::new();
    for line in body.split(|&byte| byte == b'\n') {
        if line.trim_ascii().is_empty() {
            continue;
        }
        let series = parse_json(line)?;
        let values = series["values"]
            .as_array()
            .context("an exported series has no values")?;
        let timestamps = series["timestamps"]
            .as_array()
            .context("an exported series has no timestamps")?;
        for (value, timestamp) in values.iter().zip(timestamps) {
            if let Some(value) = number(value) {
                outcome.value_sum += value;
                times.insert(timestamp.as_i64().unwrap_or_default());
            }
        }
    }
    outcome.rows = times.len() as u64;
    Ok(outcome)
}

// --------------------------------------------------------------- expected ---

/// Sum and count of the values in one bucket.
#[derive(Debug, Default, Clone, Copy)]
struct Mean {
    sum: f64,
    count: u64,
}

impl Mean {
    fn add(&mut self, value: f64) {
        self.sum += value;
        self.count += 1;
    }
}

/// Computes every query's outcome from the generator, as a server holding
/// the whole dataset should return it.
fn expected_results(
    spec: &FleetSpec,
    window: &Window,
    truck: usize,
) -> BTreeMap<&'static str, QueryResult> {
    let outcomes = expected_outcomes(spec, window, truck);
    outcomes
        .into_iter()
        .map(|(query, outcome)| {
            (
                query.name(),
                QueryResult {
                    latency_ms: None,
                    rows: Some(outcome.rows),
                    value_sum: Some(round_sum(outcome.value_sum)),
                    failures: 0,
                    error: None,
                },
            )
        })
        .collect()
}

fn expected_outcomes(spec: &FleetSpec, window: &Window, truck: usize) -> BTreeMap<Query, Outcome> {
    const LATITUDE: usize = 0;
    const LONGITUDE: usize = 1;
    const VELOCITY: usize = 3;
    const FUEL_STATE: usize = 1;
    const STATUS: usize = 2;

    let mut generator = FleetGenerator::new(*spec);
    let south: Vec<bool> = generator
        .trucks()
        .iter()
        .map(|truck| truck.fleet == FLEET)
        .collect();
    let fleet_index: Vec<usize> = generator
        .trucks()
        .iter()
        .map(|truck| {
            FLEETS
                .iter()
                .position(|fleet| *fleet == truck.fleet)
                .unwrap_or(0)
        })
        .collect();

    let mut last_location = vec![None; spec.devices];
    let mut last_fuel = vec![None; spec.devices];
    let mut hourly = vec![Mean::default(); spec.devices * 24];
    let mut daily: BTreeMap<(usize, i64), Mean> = BTreeMap::new();
    let mut single_raw = Outcome::default();
    let mut single_range = Outcome::default();
    let mut single_latest = None;

    while generator.step(|timestamp, index, _, report| {
        if let Some(readings) = &report.readings {
            let value = |field| readings.value(field, &READINGS_FIELDS);
            last_location[index] = Some(value(LATITUDE) + value(LONGITUDE));
            let day_offset = timestamp - window.first_day_ns;
            if (0..DAY_NS).contains(&day_offset) {
                hourly[index * 24 + (day_offset / HOUR_NS) as usize].add(value(VELOCITY));
            }
            if index == truck {
                single_latest = Some(value(VELOCITY));
                if (window.hour_ns..window.hour_ns + HOUR_NS).contains(&timestamp) {
                    single_raw.rows += 1;
                    single_raw.value_sum += (0..READINGS_FIELDS.len()).map(value).sum::<f64>();
                    single_range.rows += 1;
                    single_range.value_sum += value(VELOCITY);
                }
            }
        }
        if let Some(diagnostics) = &report.diagnostics {
            let value = |field| diagnostics.value(field, &DIAGNOSTICS_FIELDS);
            last_fuel[index] = Some(value(FUEL_STATE));
            if (window.first_day_ns..window.days_end_ns).contains(&timestamp) {
                let day = (timestamp - window.first_day_ns) / DAY_NS;
                daily
                    .entry((fleet_index[index], day))
                    .or_default()
                    .add(value(STATUS));
            }
        }
    }) {}

    let mut outcomes = BTreeMap::new();
    let mut last_loc = Outcome::default();
    for location in last_location
        .iter()
        .zip(&south)
        .filter_map(|(location, south)| location.filter(|_| *south))
    {
        last_loc.rows += 1;
        last_loc.value_sum += location;
    }
    outcomes.insert(Query::LastLoc, last_loc);
    outcomes.insert(Query::AvgVelocity1h, mean_outcome(hourly.iter()));
    let mut low_fuel = Outcome::default();
    for fuel in last_fuel.iter().flatten().filter(|fuel| **fuel < LOW_FUEL) {
        low_fuel.rows += 1;
        low_fuel.value_sum += fuel;
    }
    outcomes.insert(Query::LowFuel, low_fuel);
    outcomes.insert(Query::DailyActivity, mean_outcome(daily.values()));
    outcomes.insert(Query::SingleRaw, single_raw);
    outcomes.insert(
        Query::SingleLatest,
        Outcome {
            rows: u64::from(single_latest.is_some()),
            value_sum: single_latest.unwrap_or_default(),
        },
    );
    outcomes.insert(Query::SingleRange, single_range);
    outcomes
}

/// Counts the non-empty buckets and adds up their means.
fn mean_outcome<'a>(buckets: impl Iterator<Item = &'a Mean>) -> Outcome {
    let mut outcome = Outcome::default();
    for bucket in buckets.filter(|bucket| bucket.count > 0) {
        outcome.rows += 1;
        outcome.value_sum += bucket.sum / bucket.count as f64;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(duration: &str) -> FleetSpec {
        FleetSpec::parse(20, DEFAULT_START, duration, 1).unwrap()
    }

    #[test]
    fn window_of_one_day() {
        let window = Window::new(&spec("1d"));
        let start = 1_767_225_600_000_000_000;
        assert_eq!(window.first_day_ns, start);
        assert_eq!(window.days_end_ns, start + DAY_NS);
        assert_eq!(window.hour_ns, start + 12 * HOUR_NS);
        assert_eq!(window.end_ns, start + DAY_NS);
        assert_eq!(window.lookbehind_s, 86_411);
    }

    #[test]
    fn window_of_one_hour() {
        let window = Window::new(&spec("1h"));
        let start = 1_767_225_600_000_000_000;
        assert_eq!(window.hour_ns, start);
        assert_eq!(window.days_end_ns, start + DAY_NS);
    }

    #[test]
    fn seconds_with_milliseconds() {
        assert_eq!(seconds(1_767_225_600_000_000_000), "1767225600.000");
        assert_eq!(seconds(1_767_229_199_999_000_000), "1767229199.999");
    }

    #[test]
    fn expected_rows_of_one_hour() {
        let spec = spec("1h");
        let outcomes = expected_outcomes(&spec, &Window::new(&spec), 5);
        let rows = |query| outcomes[&query].rows;
        let south = FleetGenerator::new(spec)
            .trucks()
            .iter()
            .filter(|truck| truck.fleet == FLEET)
            .count() as u64;
        assert_eq!(rows(Query::LastLoc), south);
        // Every truck reports in the one hour, so each has one hourly bucket.
        assert_eq!(rows(Query::AvgVelocity1h), 20);
        assert_eq!(rows(Query::SingleLatest), 1);
        // 360 report times, about 1 % missing.
        assert!((340..=360).contains(&rows(Query::SingleRaw)));
        assert_eq!(rows(Query::SingleRange), rows(Query::SingleRaw));
        assert!(rows(Query::DailyActivity) <= 4);
        assert!(rows(Query::LowFuel) < 20);
    }

    #[test]
    fn influxdb_rows_skip_nulls_and_time() {
        let body = json!({"results": [{"statement_id": 0, "series": [
            {"name": "readings", "tags": {"name": "truck_1"}, "columns": ["time", "mean"],
             "values": [[0, 1.5], [3600000, null], [7200000, 2.5]]},
            {"name": "readings", "tags": {"name": "truck_2"}, "columns": ["time", "mean"],
             "values": [[0, 4.0]]}
        ]}]});
        let outcome = influxdb_outcome(&body).unwrap();
        assert_eq!(outcome.rows, 3);
        assert_eq!(outcome.value_sum, 8.0);

        let empty = json!({"results": [{"statement_id": 0}]});
        assert_eq!(influxdb_outcome(&empty).unwrap().rows, 0);
        let failed = json!({"results": [{"statement_id": 0, "error": "database not found: x"}]});
        let error = influxdb_outcome(&failed).unwrap_err().to_string();
        assert!(error.contains("database not found"), "{error}");
    }

    #[test]
    fn victoriametrics_rows_of_vector_and_matrix() {
        let vector = json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"__name__": "readings_latitude", "name": "truck_1"}, "value": [1, "10.5"]},
            {"metric": {"__name__": "readings_longitude", "name": "truck_1"}, "value": [1, "-2"]},
            {"metric": {"__name__": "readings_latitude", "name": "truck_3"}, "value": [1, "1"]}
        ]}});
        let last_loc = victoriametrics_outcome(Query::LastLoc, &vector).unwrap();
        assert_eq!(last_loc.rows, 2);
        assert_eq!(last_loc.value_sum, 9.5);
        let low_fuel = victoriametrics_outcome(Query::LowFuel, &vector).unwrap();
        assert_eq!(low_fuel.rows, 3);

        let matrix = json!({"status": "success", "data": {"resultType": "matrix", "result": [
            {"metric": {"name": "truck_1"}, "values": [[0, "1"], [3600, "2"], [7200, "NaN"]]}
        ]}});
        let buckets = victoriametrics_outcome(Query::AvgVelocity1h, &matrix).unwrap();
        assert_eq!(buckets.rows, 2);
        assert_eq!(buckets.value_sum, 3.0);

        let failed = json!({"status": "error", "error": "unknown function"});
        assert!(victoriametrics_outcome(Query::LowFuel, &failed).is_err());
    }

    #[test]
    fn victoriametrics_export_counts_timestamps() {
        let body = b"{\"metric\":{\"__name__\":\"readings_velocity\"},\"values\":[1.5,2],\"timestamps\":[1000,2000]}\n\
{\"metric\":{\"__name__\":\"readings_grade\"},\"values\":[3],\"timestamps\":[1000]}\n";
        let outcome = victoriametrics_export_outcome(body).unwrap();
        assert_eq!(outcome.rows, 2);
        assert_eq!(outcome.value_sum, 6.5);
        assert_eq!(victoriametrics_export_outcome(b"").unwrap().rows, 0);
    }

    #[test]
    fn ferrite_rows_per_response_shape() {
        let latest = json!({"devices": [
            {"id": "a", "name": "truck_1", "values": {
                "readings.latitude": {"ts": 1, "value": 1.0},
                "readings.longitude": {"ts": 1, "value": 2.0}}},
            {"id": "b", "name": "truck_2", "values": {
                "readings.latitude": {"ts": 1, "value": 5.0}}}
        ]});
        let last_loc = ferrite_outcome(Query::LastLoc, &latest).unwrap();
        assert_eq!((last_loc.rows, last_loc.value_sum), (1, 3.0));
        assert_eq!(ferrite_outcome(Query::LowFuel, &latest).unwrap().rows, 2);

        let aggregate = json!({"tier": "raw", "interval": "1h", "groups": [
            {"group": "truck_1", "buckets": [
                {"ts": 0, "value": 2.0, "count": 3}, {"ts": 1, "value": null, "count": 0}]},
            {"group": "truck_2", "buckets": [{"ts": 0, "value": 4.0, "count": 1}]}
        ]});
        let buckets = ferrite_outcome(Query::AvgVelocity1h, &aggregate).unwrap();
        assert_eq!((buckets.rows, buckets.value_sum), (2, 6.0));

        let raw = json!({
            "readings.velocity": [{"ts": 1, "value": 1.0}, {"ts": 2, "value": 2.0}],
            "readings.grade": [{"ts": 1, "value": 3.0}]
        });
        let outcome = ferrite_outcome(Query::SingleRaw, &raw).unwrap();
        assert_eq!((outcome.rows, outcome.value_sum), (2, 6.0));
        let wrapped = json!({ "series": raw });
        assert_eq!(ferrite_outcome(Query::SingleRaw, &wrapped).unwrap().rows, 2);

        let device_latest = json!({"readings.velocity": {"ts": 5, "value": 42.5}});
        let latest_one = ferrite_outcome(Query::SingleLatest, &device_latest).unwrap();
        assert_eq!((latest_one.rows, latest_one.value_sum), (1, 42.5));
    }
}
