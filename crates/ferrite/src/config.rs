//! The one typed configuration of a Ferrite node.
//!
//! Values come from, in increasing priority: the defaults in this file, the
//! TOML file given with `--config`, environment variables (`FERRITE_*`), and
//! command-line flags. Unknown keys in the file are rejected so that a typo
//! does not silently fall back to a default. `ferrite config example` prints
//! [`EXAMPLE`], which a test keeps in sync with the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the ingest log, the time-series store, the metadata
    /// database and the JWT signing key.
    pub data_dir: PathBuf,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub ingest: IngestConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub processing: ProcessingConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// Dead letters kept per device; older ones are deleted.
    pub dead_letters_per_device: i64,
    /// Memory one scripted decoder may use, in bytes.
    pub script_max_memory_bytes: usize,
    /// Run time of one scripted decoder call unless its profile sets
    /// `codec.max_run_time`.
    #[serde(with = "humantime_serde")]
    pub script_max_run_time: Duration,
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        Self {
            dead_letters_per_device: 1000,
            script_max_memory_bytes: 16 * 1024 * 1024,
            script_max_run_time: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body in bytes, after gzip decompression.
    pub max_body_bytes: usize,
    /// Time a handler has to respond to a request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Time a client has to send the headers of a request, also on an idle
    /// kept-alive connection; a silent connection is closed after it.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub listen: SocketAddr,
    /// Largest accepted PUBLISH payload in bytes.
    pub max_payload_bytes: usize,
    /// Time a new connection has to send CONNECT before it is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Open connections beyond this number are refused at accept.
    pub max_connections: usize,
    /// QoS 1 messages sent to a client and not yet acknowledged, per session.
    pub max_inflight: u16,
    /// Messages kept for an offline persistent session before the oldest are dropped.
    pub max_queued_messages: usize,
    /// Upper bound for the session expiry a client asks for (MQTT 5) and the
    /// expiry of MQTT 3.1.1 sessions with clean session = 0.
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
}

/// When an acknowledgement is sent relative to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after the ingest log is synced to disk (fdatasync), with
    /// concurrent appends sharing one sync.
    Fsync,
    /// Acknowledge after the write reaches the operating system; a power
    /// loss may lose the last moments of data, a process crash does not.
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub durability: Durability,
    /// Points with a timestamp further than this ahead of the server clock
    /// are rejected.
    #[serde(with = "humantime_serde")]
    pub max_future: Duration,
    /// Points with a timestamp further than this behind the server clock
    /// are rejected (`None`: no limit besides the retention). Within the
    /// window, late and repeated points are stored with last write wins.
    #[serde(with = "retention_serde")]
    pub max_past: Option<Duration>,
    /// Size at which the ingest log starts a new segment file.
    pub segment_bytes: u64,
    /// Pipeline workers that decode envelopes and write the store; each
    /// device is always handled by the same worker, so per-device order holds.
    pub workers: usize,
    /// Appends waiting for the log writer; when full, new appends wait up to
    /// `append_timeout` and then get an "overloaded" error.
    pub queue_capacity: usize,
    #[serde(with = "humantime_serde")]
    pub append_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Memory for points not yet written to a segment; reaching it triggers
    /// a flush.
    pub head_budget_bytes: usize,
    /// Memory the time-series store may use in all: points not yet flushed
    /// (twice, while a flush runs) and what it keeps per series (names,
    /// latest values, open rollup rows). As series are added the head gets
    /// less of it, down to 8 MiB, and a warning is logged when the series alone
    /// need more. Connections, HTTP buffers and the metadata database come
    /// on top.
    pub memory_budget_bytes: usize,
    /// Longest time points stay only in memory (and in the ingest log)
    /// before a flush writes them to a segment.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long raw points are kept; `None` keeps them forever. Points
    /// older than this are rejected at ingest.
    #[serde(with = "retention_serde")]
    pub retention: Option<Duration>,
    /// Retention per tenant id, overriding `retention`.
    #[serde(default)]
    pub tenant_retention: std::collections::BTreeMap<String, RetentionSetting>,
    /// Length of the time partitions of the store: each segment file contains
    /// one partition, and retention deletes whole files.
    #[serde(with = "humantime_serde")]
    pub partition: Duration,
    /// A partition that received nothing new for this long is merged into
    /// one segment.
    #[serde(with = "humantime_serde")]
    pub cold_after: Duration,
    /// Intervals of the rollup tiers, ascending, each a multiple of the one
    /// before.
    #[serde(with = "duration_list_serde")]
    pub rollups: Vec<Duration>,
    /// Retention per rollup tier, by the tier's interval as written in
    /// `rollups`; tiers not listed keep their rows forever.
    #[serde(default)]
    pub rollup_retention: std::collections::BTreeMap<String, RetentionSetting>,
}

/// A list of durations such as `["1m", "1h", "1d"]`.
mod duration_list_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        texts
            .iter()
            .map(|text| {
                humantime::parse_duration(text.trim()).map_err(|err| {
                    serde::de::Error::custom(format!(
                        "rollup interval {text:?} is not a duration such as \"1h\": {err}"
                    ))
                })
            })
            .collect()
    }
}

/// A retention value of `tenant_retention`: a duration or `"forever"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RetentionSetting(#[serde(with = "retention_serde")] pub Option<Duration>);

impl StorageConfig {
    /// Raw retention of a tenant.
    pub fn retention_for(&self, tenant: &str) -> Option<Duration> {
        match self.tenant_retention.get(tenant) {
            Some(setting) => setting.0,
            None => self.retention,
        }
    }
}

/// `"forever"` or a duration such as `"90d"`.
mod retention_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.trim() == "forever" {
            return Ok(None);
        }
        let duration = humantime::parse_duration(text.trim()).map_err(|err| {
            serde::de::Error::custom(format!(
                "retention {text:?} is neither \"forever\" nor a duration such as \"90d\": {err}"
            ))
        })?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom(
                "retention must be longer than zero; use \"forever\" to keep data without limit",
            ));
        }
        Ok(Some(duration))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of the JWT access tokens that `POST /api/v1/auth/login` issues.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Lets an API key with the admin or operator role create devices on
    /// first write through line protocol with `device_tag`.
    pub auto_create_devices: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `ferrite=debug,info`; the
    /// `RUST_LOG` environment variable overrides it.
    pub level: String,
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferrite-data"),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            ingest: IngestConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            processing: ProcessingConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("valid literal address"),
            max_body_bytes: 256 * 1024,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".parse().expect("valid literal address"),
            max_payload_bytes: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_session_expiry: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            max_future: Duration::from_secs(24 * 3600),
            max_past: None,
            segment_bytes: 64 * 1024 * 1024,
            workers: 2,
            queue_capacity: 4096,
            append_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            head_budget_bytes: 64 * 1024 * 1024,
            memory_budget_bytes: 1024 * 1024 * 1024,
            flush_interval: Duration::from_secs(60),
            retention: None,
            tenant_retention: std::collections::BTreeMap::new(),
            partition: Duration::from_secs(24 * 3600),
            cold_after: Duration::from_secs(600),
            rollups: vec![Duration::from_secs(3600), Duration::from_secs(24 * 3600)],
            rollup_retention: std::collections::BTreeMap::new(),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_token_ttl: Duration::from_secs(3600),
            auto_create_devices: true,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Sections of the file, for mapping `FERRITE_<SECTION>_<KEY>` variables.
const SECTIONS: [&str; 7] = [
    "http",
    "mqtt",
    "ingest",
    "storage",
    "auth",
    "processing",
    "log",
];

/// Loads the configuration: defaults, then the file at `path` if given, then
/// `FERRITE_<SECTION>_<KEY>` environment variables (for example
/// `FERRITE_MQTT_CONNECT_TIMEOUT=5s` sets `mqtt.connect_timeout`, and
/// `FERRITE_DATA_DIR` sets `data_dir`). The result is validated.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let mut table = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the configuration file {}", path.display())
            })?;
            text.parse::<toml::Table>()
                .with_context(|| format!("invalid configuration file {}", path.display()))?
        }
        None => toml::Table::new(),
    };
    apply_env(&mut table, std::env::vars());
    let config: Config = toml::Value::Table(table)
        .try_into()
        .context("invalid configuration (file or FERRITE_* environment variables)")?;
    config.validate()?;
    Ok(config)
}

/// Overlays `FERRITE_*` variables on the file's table. Variables that name no
/// section (such as `FERRITE_CONFIG`) are left to the command line parser.
fn apply_env(table: &mut toml::Table, vars: impl Iterator<Item = (String, String)>) {
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix("FERRITE_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let value = parse_env_value(&raw);
        if rest == "data_dir" {
            table.insert(rest, value);
            continue;
        }
        let Some(section) = SECTIONS
            .iter()
            .find(|section| rest.starts_with(&format!("{section}_")))
        else {
            continue;
        };
        let key = rest[section.len() + 1..].to_owned();
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section_table) = entry {
            section_table.insert(key, value);
        }
    }
}

/// Numbers and booleans keep their type so they deserialize into numeric
/// and boolean settings; everything else is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(number) = raw.parse::<i64>() {
        return toml::Value::Integer(number);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(raw.to_owned()),
    }
}

impl Config {
    /// Rejects values that parse but cannot work.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.ingest.workers > 0, "ingest.workers must be at least 1");
        anyhow::ensure!(
            self.processing.dead_letters_per_device >= 1,
            "processing.dead_letters_per_device must be at least 1"
        );
        anyhow::ensure!(
            self.processing.script_max_memory_bytes >= 1024 * 1024,
            "processing.script_max_memory_bytes must be at least 1 MiB (1048576)"
        );
        anyhow::ensure!(
            !self.processing.script_max_run_time.is_zero()
                && self.processing.script_max_run_time <= Duration::from_secs(5),
            "processing.script_max_run_time must be between 1ms and 5s"
        );
        anyhow::ensure!(
            self.ingest.queue_capacity > 0,
            "ingest.queue_capacity must be at least 1"
        );
        anyhow::ensure!(
            self.http.max_body_bytes >= 1024,
            "http.max_body_bytes must be at least 1024"
        );
        // A message must fit one ingest log record, with room for its header.
        let max_message = crate::ingest::log::MAX_RECORD_BODY - 1024;
        anyhow::ensure!(
            self.http.max_body_bytes <= max_message,
            "http.max_body_bytes must be at most {max_message}"
        );
        anyhow::ensure!(
            self.mqtt.max_payload_bytes <= max_message,
            "mqtt.max_payload_bytes must be at most {max_message}"
        );
        anyhow::ensure!(
            self.mqtt.max_inflight > 0,
            "mqtt.max_inflight must be at least 1"
        );
        anyhow::ensure!(
            self.storage.head_budget_bytes >= 1024 * 1024,
            "storage.head_budget_bytes must be at least 1 MiB (1048576)"
        );
        anyhow::ensure!(
            self.storage.memory_budget_bytes >= 64 * 1024 * 1024,
            "storage.memory_budget_bytes must be at least 64 MiB (67108864)"
        );
        Ok(())
    }
}

/// The commented sample that `ferrite config example` prints. Every value is
/// the default.
pub const EXAMPLE: &str = r#"# Ferrite configuration. Every value shown is the default.
# Priority, lowest first: defaults, this file, FERRITE_* environment
# variables, command-line flags.

# Directory for the ingest log, time series, metadata and signing key.
# Environment: FERRITE_DATA_DIR; flag: --data-dir.
data_dir = "ferrite-data"

[http]
# REST API, HTTP telemetry and InfluxDB line protocol.
# Environment: FERRITE_HTTP_LISTEN; flag: --http-listen.
listen = "0.0.0.0:8080"
# Largest request body in bytes, after gzip decompression.
max_body_bytes = 262144
# Time a handler has to respond to a request.
request_timeout = "30s"
# Time a client has to send request headers; silent connections are closed.
header_read_timeout = "10s"

[mqtt]
# MQTT 3.1.1 and 5 over TCP.
# Environment: FERRITE_MQTT_LISTEN; flag: --mqtt-listen.
listen = "0.0.0.0:1883"
# Largest PUBLISH payload in bytes.
max_payload_bytes = 262144
# Time a new connection has to send CONNECT.
connect_timeout = "10s"
max_connections = 100000
# Unacknowledged QoS 1 messages sent to one client.
max_inflight = 32
# Messages kept for an offline persistent session.
max_queued_messages = 1000
# Longest session expiry granted to a client.
max_session_expiry = "24h"

[ingest]
# "fsync": acknowledge after the ingest log is synced to disk.
# "none": acknowledge after the write reaches the operating system.
durability = "fsync"
# Points stamped further ahead of the server clock are rejected.
max_future = "24h"
# Points stamped further behind the server clock are rejected: "forever"
# (no limit besides storage.retention) or a duration such as "7d". Late
# and repeated points within the window are stored; the last write wins.
max_past = "forever"
# Size at which the ingest log starts a new segment file, in bytes.
segment_bytes = 67108864
# Pipeline workers; each device always goes to the same one.
workers = 2
# Appends waiting for the log writer before new ones wait, then fail.
queue_capacity = 4096
append_timeout = "5s"

[storage]
# Memory for points not yet in a segment file, in bytes.
head_budget_bytes = 67108864
# Memory of the time-series store in all, in bytes: unflushed points and
# what it keeps per series (about 460 bytes each). With many series the
# head gets less of it; the process needs more for connections and HTTP.
memory_budget_bytes = 1073741824
# Longest time points stay only in memory and in the ingest log.
flush_interval = "60s"
# How long raw points are kept: "forever" or a duration such as "90d".
# Older points are rejected at ingest and deleted in whole segment files.
retention = "forever"
# Length of the time partition that one segment file contains.
partition = "1d"
# A partition without new data for this long is merged into one file.
cold_after = "10m"
# Rollup tiers: count, sum, min, max, first and last per interval, kept up
# to date at every flush. Aggregate queries whose buckets line up with a
# tier read it. Ascending, each a multiple of the one before; a change
# rebuilds the tiers from the raw points at the next start. Add "1m" for
# series sampled every second or faster; for slower series a 1-minute tier
# costs more disk and flush time than it saves.
rollups = ["1h", "1d"]

# Retention per rollup tier, by interval as written in rollups, for example
# "1m" = "30d". Tiers not listed keep their rows forever.
[storage.rollup_retention]

# Retention per tenant id, overriding storage.retention.
[storage.tenant_retention]

[auth]
# Lifetime of access tokens from POST /api/v1/auth/login.
access_token_ttl = "1h"
# Lets admin and operator API keys create devices on first line-protocol write.
auto_create_devices = true

[processing]
# Dead letters (messages the pipeline could not store) kept per device; the
# oldest are deleted beyond this.
dead_letters_per_device = 1000
# Memory one scripted decoder may use, in bytes.
script_max_memory_bytes = 16777216
# Run time of one scripted decoder call, unless the profile sets
# codec.max_run_time.
script_max_run_time = "100ms"

[log]
# Tracing filter; RUST_LOG overrides it.
level = "info"
# "text" or "json".
format = "text"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_parses_to_defaults() {
        let parsed: Config = toml::from_str(EXAMPLE).expect("example parses");
        let defaults = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn environment_overrides_file_values() {
        let mut table: toml::Table = "[mqtt]\nconnect_timeout = \"10s\"\n".parse().unwrap();
        let vars = [
            ("FERRITE_MQTT_CONNECT_TIMEOUT", "1s"),
            ("FERRITE_INGEST_WORKERS", "3"),
            ("FERRITE_DATA_DIR", "/tmp/x"),
            ("FERRITE_CONFIG", "ignored.toml"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        apply_env(&mut table, vars.into_iter());
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.mqtt.connect_timeout, Duration::from_secs(1));
        assert_eq!(config.ingest.workers, 3);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn configuration_docs_show_the_example() {
        let docs = include_str!("../../../docs/configuration.md");
        assert!(
            docs.contains(EXAMPLE),
            "docs/configuration.md is out of date: paste the output of `ferrite config example` into it"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let error = toml::from_str::<Config>("[http]\nlisten_addr = \"127.0.0.1:1\"\n")
            .expect_err("unknown key");
        assert!(error.to_string().contains("listen_addr"), "{error}");
    }
}
