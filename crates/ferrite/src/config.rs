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
    pub coap: CoapConfig,
    pub lorawan: LorawanConfig,
    pub ingest: IngestConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub processing: ProcessingConfig,
    pub log: LogConfig,
    pub actions: ActionsConfig,
    pub websocket: WebSocketConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    /// Dead letters kept per device; older ones are deleted.
    pub dead_letters_per_device: i64,
    /// Dead letters kept in all; the oldest of any device are deleted.
    pub dead_letters_total: i64,
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
            dead_letters_total: 100_000,
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
    /// Retained messages per tenant; a retained PUBLISH for a new topic
    /// beyond it is rejected.
    pub max_retained_messages: usize,
    /// Bytes of retained messages (topic, payload and properties) per tenant.
    pub max_retained_bytes: usize,
    /// Time after which an open connection's credential (device token, API
    /// key or user) is checked again; a removed one ends the connection.
    /// Revocation events end connections at once; this check is the
    /// fallback for changes made by another process.
    #[serde(with = "humantime_serde")]
    pub credential_recheck_interval: Duration,
}

/// Rate limits and resource limits of every protocol (`limits/`). A value
/// of 0 turns its limit off. A burst of 0 equals the rate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages per second of one device, over all protocols.
    pub device_messages_per_second: u32,
    /// Messages one device may send at once above its rate.
    pub device_message_burst: u32,
    /// Messages per second of all devices and applications of one tenant.
    pub tenant_messages_per_second: u32,
    pub tenant_message_burst: u32,
    /// Messages per second from one source address (IPv6: one /64).
    pub address_messages_per_second: u32,
    pub address_message_burst: u32,
    /// REST API requests per second with one credential (API key, access
    /// token or JWT).
    pub api_requests_per_second: u32,
    pub api_request_burst: u32,
    /// REST API requests per second from one source address.
    pub api_address_requests_per_second: u32,
    pub api_address_request_burst: u32,
    /// Open connections per source address, counted separately for MQTT
    /// (TCP and WebSocket) and for HTTP (device WebSockets included).
    pub connections_per_address: u32,
    /// DTLS handshakes in progress per source address.
    pub dtls_handshakes_per_address: u32,
    /// Longest MQTT topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most levels (parts between `/`) of an MQTT topic name or filter.
    pub max_topic_levels: usize,
    /// Subscriptions one MQTT session may hold.
    pub max_subscriptions_per_client: usize,
    /// MQTT 5 PUBLISHes rejected in a row for their rate after which the
    /// connection is closed with DISCONNECT 0x96.
    pub mqtt_rate_limited_before_disconnect: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            device_messages_per_second: 1000,
            device_message_burst: 2000,
            tenant_messages_per_second: 20_000,
            tenant_message_burst: 40_000,
            address_messages_per_second: 20_000,
            address_message_burst: 40_000,
            api_requests_per_second: 100,
            api_request_burst: 200,
            api_address_requests_per_second: 1000,
            api_address_request_burst: 2000,
            connections_per_address: 10_000,
            dtls_handshakes_per_address: 100,
            max_topic_length: 1024,
            max_topic_levels: 32,
            max_subscriptions_per_client: 1000,
            mqtt_rate_limited_before_disconnect: 100,
        }
    }
}

impl LimitsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, rate, burst) in [
            (
                "device_message",
                self.device_messages_per_second,
                self.device_message_burst,
            ),
            (
                "tenant_message",
                self.tenant_messages_per_second,
                self.tenant_message_burst,
            ),
            (
                "address_message",
                self.address_messages_per_second,
                self.address_message_burst,
            ),
            (
                "api_request",
                self.api_requests_per_second,
                self.api_request_burst,
            ),
            (
                "api_address_request",
                self.api_address_requests_per_second,
                self.api_address_request_burst,
            ),
        ] {
            anyhow::ensure!(
                burst == 0 || burst >= rate,
                "limits.{name}_burst ({burst}) is smaller than its rate ({rate} per second); set it to at least the rate, or to 0 for the rate itself"
            );
        }
        anyhow::ensure!(
            self.max_topic_levels == 0 || self.max_topic_levels >= 8,
            "limits.max_topic_levels must be 0 (unlimited) or at least 8, because Ferrite's own topics such as v1/devices/me/rpc/request/+ have up to 6 levels"
        );
        anyhow::ensure!(
            self.max_topic_length == 0 || self.max_topic_length >= 128,
            "limits.max_topic_length must be 0 (unlimited) or at least 128 bytes, because Ferrite's own topics contain a 36-character device id"
        );
        Ok(())
    }
}

/// The device WebSocket (`GET /api/v1/devices/ws`) on the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Interval at which the server sends a ping to each device socket.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A device socket that receives nothing, not even a pong, for this
    /// long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open device sockets beyond this number are rejected with 503 before
    /// the upgrade.
    pub max_connections: usize,
    /// Maximum number of messages (acknowledgements, errors, commands)
    /// waiting to be sent to one device. A socket with more is closed,
    /// because its client does not read.
    pub max_outgoing_messages: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapConfig {
    pub listen: SocketAddr,
    /// Largest request payload in bytes, after block-wise reassembly.
    pub max_payload_bytes: usize,
    /// Wait for the ingest log before a Confirmable request gets an empty
    /// ACK and its response follows as a separate Confirmable message.
    #[serde(with = "humantime_serde")]
    pub piggyback_wait: Duration,
    /// Requests processed at once on one listener; more get 5.03.
    pub max_concurrent_requests: usize,
    /// Recent message IDs kept for duplicate detection, over all peers.
    pub max_exchanges: usize,
    /// A Block1 upload idle for longer is dropped.
    #[serde(with = "humantime_serde")]
    pub block_timeout: Duration,
    /// Block1 uploads in progress per peer.
    pub max_block_transfers_per_peer: usize,
    /// Bytes of unfinished Block1 uploads held over all peers.
    pub max_block_bytes: usize,
    /// Observers per device and resource; more registrations are served
    /// without Observe.
    pub max_observers_per_device: usize,
    pub dtls: CoapDtlsConfig,
}

/// CoAP over DTLS 1.2 (`coaps://`). The listener starts when `psk` is on or
/// a server certificate is configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoapDtlsConfig {
    pub listen: SocketAddr,
    /// Accepts the PSK cipher suites with the pre-shared keys set through
    /// `PUT /api/v1/devices/{id}/credentials/psk`.
    pub psk: bool,
    /// PEM file with the server certificate (ECDSA) and its chain, for the
    /// ECDHE-ECDSA cipher suites; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// PEM file with the CAs whose client certificates are accepted when
    /// their subject CN is a device id. Without it, only certificates
    /// registered on a device are accepted.
    pub ca_file: Option<PathBuf>,
    /// Sessions (handshaking or established) beyond this number are not
    /// started; ClientHellos of new peers are dropped.
    pub max_sessions: usize,
    /// Handshakes in progress beyond this number are not started.
    pub max_handshakes: usize,
    /// Time a handshake has to finish after the cookie exchange.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A session that receives nothing for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl CoapDtlsConfig {
    /// Returns whether the DTLS listener starts.
    pub fn enabled(&self) -> bool {
        self.psk || self.cert_file.is_some()
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.cert_file.is_some() == self.key_file.is_some(),
            "coap.dtls.cert_file and coap.dtls.key_file must be set together"
        );
        anyhow::ensure!(
            self.ca_file.is_none() || self.cert_file.is_some(),
            "coap.dtls.ca_file needs coap.dtls.cert_file and key_file, because client certificates are requested only in the certificate cipher suites"
        );
        anyhow::ensure!(
            self.max_sessions > 0,
            "coap.dtls.max_sessions must be at least 1"
        );
        anyhow::ensure!(
            self.max_handshakes > 0,
            "coap.dtls.max_handshakes must be at least 1"
        );
        anyhow::ensure!(
            !self.handshake_timeout.is_zero() && !self.idle_timeout.is_zero(),
            "coap.dtls.handshake_timeout and coap.dtls.idle_timeout must be longer than zero"
        );
        Ok(())
    }
}

/// TLS for HTTPS (REST API, HTTP telemetry and the WebSockets) and for MQTT
/// over TLS. Both TLS listeners start when `cert_file` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the server certificate, then its intermediates.
    pub cert_file: Option<PathBuf>,
    /// PEM file with the private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM file with CAs whose client certificates authenticate, over MQTT
    /// over TLS, the device whose id is the certificate's subject CN, in
    /// any tenant. Tenants register their own CAs through the API instead.
    pub client_ca_file: Option<PathBuf>,
    pub https_listen: SocketAddr,
    pub mqtts_listen: SocketAddr,
    /// Whether the plain listeners run: HTTP, MQTT over TCP and CoAP over
    /// UDP. The LoRaWAN (Semtech UDP) listener runs either way.
    pub plain_listeners: bool,
    /// MQTT over TLS ends handshakes without a client certificate. When
    /// false, clients without one authenticate at CONNECT with an access
    /// token, API key or password.
    pub require_client_certificate: bool,
    /// Time a new connection has to finish the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Interval at which `cert_file` and `key_file` are checked for
    /// changes; SIGHUP also reloads them.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// `max-age` of the Strict-Transport-Security header on HTTPS
    /// responses; zero leaves the header out.
    #[serde(with = "humantime_serde")]
    pub hsts_max_age: Duration,
}

impl TlsConfig {
    /// Returns whether the HTTPS and MQTT over TLS listeners start.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.cert_file.is_some() == self.key_file.is_some(),
            "tls.cert_file and tls.key_file must be set together"
        );
        anyhow::ensure!(
            self.client_ca_file.is_none() || self.enabled(),
            "tls.client_ca_file needs tls.cert_file and tls.key_file, because client certificates are requested only by the TLS listeners"
        );
        anyhow::ensure!(
            self.plain_listeners || self.enabled(),
            "tls.plain_listeners = false needs tls.cert_file and tls.key_file, otherwise neither HTTP nor MQTT would listen; run `ferrite certs init` to create a development certificate"
        );
        anyhow::ensure!(
            !self.require_client_certificate || self.enabled(),
            "tls.require_client_certificate needs tls.cert_file and tls.key_file"
        );
        anyhow::ensure!(
            !self.handshake_timeout.is_zero() && !self.reload_interval.is_zero(),
            "tls.handshake_timeout and tls.reload_interval must be longer than zero"
        );
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LorawanConfig {
    /// UDP address for the Semtech packet forwarder protocol.
    pub listen: SocketAddr,
    /// Time to collect copies of one uplink from several gateways before
    /// it is handled once.
    #[serde(with = "humantime_serde")]
    pub deduplication_window: Duration,
    /// Frames a device may lose in a row before its frame counter is no
    /// longer recognized (MAX_FCNT_GAP).
    pub max_f_cnt_gap: u32,
    /// NetID given to devices in join accepts, 6 hex digits; its 7 low
    /// bits become the top bits of every assigned DevAddr.
    pub net_id: String,
    pub chirpstack_mqtt: ChirpstackMqttConfig,
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

/// The queue in which accepted messages wait for the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngestBackend {
    /// Segment files under `data_dir/log`, for a single node.
    Embedded,
    /// A NATS JetStream stream, configured in `[ingest.nats]`.
    Nats,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub backend: IngestBackend,
    /// Embedded log only.
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
    /// Size at which the embedded log starts a new segment file.
    pub segment_bytes: u64,
    /// Pipeline workers that decode envelopes and write the store; each
    /// device is always handled by the same worker, so per-device order holds.
    pub workers: usize,
    /// Appends waiting for the embedded log's writer; when full, new appends
    /// wait up to `append_timeout` and then get an "overloaded" error.
    pub queue_capacity: usize,
    /// Maximum time an append waits: for room in the embedded log's queue,
    /// or for JetStream to acknowledge every message of it.
    #[serde(with = "humantime_serde")]
    pub append_timeout: Duration,
    /// Embedded log only: seal the payload and metadata of every record
    /// under the tenant's data key.
    pub encrypt: bool,
    pub nats: NatsConfig,
}

/// The JetStream stream and consumer of `ingest.backend = "nats"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (members of one cluster).
    pub url: String,
    /// A `.creds` file (user JWT and NKey seed); `None` connects without
    /// credentials.
    pub credentials_file: Option<PathBuf>,
    /// Stream name; created at start when missing, updated when its limits
    /// differ from these.
    pub stream: String,
    /// Messages are published to `{subject_prefix}.{tenant_id}.{device_id}`,
    /// and the stream takes `{subject_prefix}.>`.
    pub subject_prefix: String,
    /// Durable name of the pull consumer that feeds the pipeline.
    pub consumer: String,
    /// Size limit of the stream. When it is full, new messages are refused
    /// (discard policy "new") and appends fail as overloaded.
    pub max_bytes: u64,
    /// Copies of every message in a JetStream cluster (1 to 5).
    pub replicas: usize,
    /// Time within which a message with a repeated `Nats-Msg-Id` is stored
    /// only once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Time JetStream waits for the acknowledgement of a delivered message
    /// before it delivers it again. Messages are acknowledged after the
    /// store flush that contains them, so this must exceed
    /// `storage.flush_interval`.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
}

impl NatsConfig {
    /// Rejects names that JetStream would reject, and an `ack_wait` that
    /// would let JetStream deliver every message again before its flush.
    fn validate(&self, flush_interval: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.url.trim().is_empty(),
            "ingest.nats.url is empty; set it to the NATS server, such as \"nats://127.0.0.1:4222\""
        );
        for (key, name) in [
            ("ingest.nats.stream", &self.stream),
            ("ingest.nats.consumer", &self.consumer),
        ] {
            let bad = name
                .chars()
                .find(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(*c));
            anyhow::ensure!(
                !name.is_empty() && bad.is_none(),
                "{key} {name:?} is not a valid JetStream name: use letters, digits, '-' and '_' without spaces, '.', '*', '>', '/' or '\\'"
            );
        }
        let prefix = &self.subject_prefix;
        let valid_prefix = prefix.split('.').all(|token| {
            !token.is_empty()
                && token != "*"
                && token != ">"
                && !token.chars().any(|c| c.is_whitespace() || c.is_control())
        });
        anyhow::ensure!(
            valid_prefix,
            "ingest.nats.subject_prefix {prefix:?} is not a subject prefix: use non-empty tokens separated by '.', without spaces or the wildcards '*' and '>'"
        );
        anyhow::ensure!(
            self.max_bytes >= 1024 * 1024,
            "ingest.nats.max_bytes must be at least 1 MiB (1048576)"
        );
        anyhow::ensure!(
            (1..=5).contains(&self.replicas),
            "ingest.nats.replicas must be between 1 and 5, got {}",
            self.replicas
        );
        anyhow::ensure!(
            !self.duplicate_window.is_zero(),
            "ingest.nats.duplicate_window must be longer than zero"
        );
        anyhow::ensure!(
            self.ack_wait > flush_interval,
            "ingest.nats.ack_wait ({}) must be longer than storage.flush_interval ({}), because a message is acknowledged only after the flush that stores it; twice the flush interval leaves room for a slow flush",
            humantime::format_duration(self.ack_wait),
            humantime::format_duration(flush_interval)
        );
        Ok(())
    }
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
    /// Seals every block the time-series store writes under the tenant's
    /// data key. Sealed blocks stay readable when it is turned off again.
    pub encrypt: bool,
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
    /// Lifetime of the JWT access tokens that login, refresh and the OAuth
    /// 2.0 token endpoint issue.
    #[serde(with = "humantime_serde")]
    pub access_token_ttl: Duration,
    /// Lifetime of a refresh token. Each refresh issues a new one with the
    /// full lifetime, so a client that refreshes within it stays logged in.
    #[serde(with = "humantime_serde")]
    pub refresh_token_ttl: Duration,
    /// Lets an API key with the admin or operator role create devices on
    /// first write through line protocol with `device_tag`.
    pub auto_create_devices: bool,
    /// Login through an external OpenID Connect provider.
    pub oidc: OidcConfig,
}

/// Login through an external OpenID Connect provider with the
/// authorization code flow and PKCE. Off while `issuer` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OidcConfig {
    /// Issuer URL; its `/.well-known/openid-configuration` is read at the
    /// first login.
    pub issuer: String,
    pub client_id: String,
    /// File that contains the client secret (surrounding whitespace is
    /// ignored). The secret is never stored in the database.
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable that contains the client secret, used when
    /// `client_secret_file` is not set.
    pub client_secret_env: String,
    /// This server's callback URL as registered at the provider; it ends
    /// in `/api/v1/auth/oidc/callback`.
    pub redirect_url: String,
    /// Scopes requested from the provider, space-separated.
    pub scopes: String,
    /// ID token claim whose value (`admin`, `operator` or `viewer`) is the
    /// role of a user created at first login. Empty: `default_role`.
    pub role_claim: String,
    /// Role of a user created at first login when `role_claim` is empty or
    /// missing. Empty: only users that already exist may log in.
    pub default_role: String,
    /// Email domains allowed to log in, such as `example.com`. Empty: all.
    pub allowed_email_domains: Vec<String>,
    /// Name of the tenant of users created at first login.
    pub tenant: String,
}

impl OidcConfig {
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }
}

impl AuthConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.access_token_ttl >= Duration::from_secs(10),
            "auth.access_token_ttl must be at least 10s"
        );
        anyhow::ensure!(
            self.refresh_token_ttl >= self.access_token_ttl,
            "auth.refresh_token_ttl must be at least auth.access_token_ttl"
        );
        let oidc = &self.oidc;
        if !oidc.enabled() {
            return Ok(());
        }
        anyhow::ensure!(
            oidc.issuer.starts_with("https://")
                || oidc.issuer.starts_with("http://127.0.0.1")
                || oidc.issuer.starts_with("http://localhost"),
            "auth.oidc.issuer must be an https URL (http only on 127.0.0.1 or localhost, for tests): got {:?}",
            oidc.issuer
        );
        anyhow::ensure!(
            !oidc.client_id.is_empty(),
            "auth.oidc.client_id is missing: set the client id registered at the provider"
        );
        anyhow::ensure!(
            oidc.redirect_url.ends_with("/api/v1/auth/oidc/callback"),
            "auth.oidc.redirect_url must be this server's URL ending in /api/v1/auth/oidc/callback: got {:?}",
            oidc.redirect_url
        );
        anyhow::ensure!(
            oidc.client_secret_file.is_some() || !oidc.client_secret_env.is_empty(),
            "auth.oidc needs the client secret: set client_secret_file or client_secret_env"
        );
        if !oidc.default_role.is_empty() {
            oidc.default_role
                .parse::<crate::metadata::Role>()
                .map_err(|message| anyhow::anyhow!("auth.oidc.default_role: {message}"))?;
        }
        Ok(())
    }
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

/// Delivery of alarm actions: webhooks, MQTT publishes and device commands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsConfig {
    /// Alarm changes waiting to be recorded as deliveries; when full, new
    /// ones are dropped and counted in `ferrite_action_queue_dropped_total`.
    pub queue_capacity: usize,
    /// Deliveries attempted at the same time.
    pub max_concurrent: usize,
    /// Time one attempt may take: a webhook request until its response
    /// has arrived, or an MQTT publish until the broker's PUBACK.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Attempts of one delivery, the first included, before it is marked
    /// failed.
    pub max_attempts: u32,
    /// A delivery that has not succeeded this long after its first attempt
    /// is marked failed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Delay before the first retry; each further retry waits twice as long.
    #[serde(with = "humantime_serde")]
    pub retry_initial_delay: Duration,
    /// Upper bound of the delay between two attempts, except where a
    /// `Retry-After` header requests a longer one.
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Time succeeded deliveries are kept before they are deleted.
    #[serde(with = "humantime_serde")]
    pub succeeded_retention: Duration,
    /// Time failed deliveries are kept before they are deleted.
    #[serde(with = "humantime_serde")]
    pub failed_retention: Duration,
    pub mqtt: ActionsMqttConfig,
}

/// The external MQTT broker that `mqtt_publish` actions publish to.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsMqttConfig {
    /// `mqtt://host:port`; empty when no broker is configured, which makes
    /// every `mqtt_publish` delivery fail.
    pub url: String,
    /// MQTT client id; empty for `ferrite-actions-` and a random suffix.
    pub client_id: String,
    /// User name; empty to connect without credentials.
    pub username: String,
    pub password: String,
    /// Keep-alive interval of the connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
}

impl std::fmt::Debug for ActionsMqttConfig {
    // Written out so that the password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionsMqttConfig")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field(
                "password",
                &(!self.password.is_empty()).then_some("<redacted>"),
            )
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

/// Host and port of `actions.mqtt.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
}

impl ActionsMqttConfig {
    /// Parses `url`; `Ok(None)` when no broker is configured.
    pub fn broker_address(&self) -> anyhow::Result<Option<BrokerAddress>> {
        parse_broker_url("actions.mqtt", &self.url)
    }
}

/// Parses the `url` of the broker section `section` (`mqtt://host:port`);
/// `Ok(None)` when it is empty.
fn parse_broker_url(section: &str, url_text: &str) -> anyhow::Result<Option<BrokerAddress>> {
    if url_text.trim().is_empty() {
        return Ok(None);
    }
    let url = reqwest::Url::parse(url_text.trim()).with_context(|| {
        format!("{section}.url {url_text:?} is not a URL; write one such as mqtt://127.0.0.1:1883")
    })?;
    anyhow::ensure!(
        matches!(url.scheme(), "mqtt" | "tcp"),
        "{section}.url {url_text:?} uses the scheme {:?}; only mqtt:// (plain TCP) is supported",
        url.scheme()
    );
    anyhow::ensure!(
        url.username().is_empty() && url.password().is_none(),
        "{section}.url must not contain credentials; set {section}.username and {section}.password"
    );
    anyhow::ensure!(
        matches!(url.path(), "" | "/") && url.query().is_none(),
        "{section}.url {url_text:?} has a path or query; write only mqtt://host:port"
    );
    let host = url
        .host_str()
        .filter(|host| !host.is_empty())
        .with_context(|| format!("{section}.url {url_text:?} has no host"))?;
    // Brackets of an IPv6 literal are URL syntax, not part of the host.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(Some(BrokerAddress {
        host: host.to_owned(),
        port: url.port().unwrap_or(1883),
    }))
}

/// ChirpStack's MQTT integration: the broker that ChirpStack publishes
/// device events to, which Ferrite subscribes to for uplinks.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChirpstackMqttConfig {
    /// `mqtt://host:port`; empty when the integration is off.
    pub url: String,
    /// Subscription with QoS 1; matching topics that do not end in
    /// `/event/up` are acknowledged and ignored.
    pub topic_filter: String,
    /// MQTT client id. The session is persistent, so the id must stay the
    /// same across restarts and be unique on the broker.
    pub client_id: String,
    /// User name; empty to connect without credentials.
    pub username: String,
    pub password: String,
    /// Tenant id whose devices the uplinks may reach; empty for any
    /// tenant, found by DevEUI, which is unique on a node.
    pub tenant: String,
    /// Keep-alive interval of the connection.
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
}

impl std::fmt::Debug for ChirpstackMqttConfig {
    // Written out so that the password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChirpstackMqttConfig")
            .field("url", &self.url)
            .field("topic_filter", &self.topic_filter)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field(
                "password",
                &(!self.password.is_empty()).then_some("<redacted>"),
            )
            .field("tenant", &self.tenant)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

impl Default for ChirpstackMqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            topic_filter: "application/+/device/+/event/up".to_owned(),
            client_id: "ferrite-chirpstack".to_owned(),
            username: String::new(),
            password: String::new(),
            tenant: String::new(),
            keep_alive: Duration::from_secs(30),
        }
    }
}

impl ChirpstackMqttConfig {
    /// Parses `url`; `Ok(None)` when the integration is off.
    pub fn broker_address(&self) -> anyhow::Result<Option<BrokerAddress>> {
        parse_broker_url("lorawan.chirpstack_mqtt", &self.url)
    }

    /// Parses `tenant`; `Ok(None)` for any tenant.
    pub fn tenant_id(&self) -> anyhow::Result<Option<crate::ids::TenantId>> {
        if self.tenant.trim().is_empty() {
            return Ok(None);
        }
        let tenant = self.tenant.trim().parse().map_err(|_| {
            anyhow::anyhow!(
                "lorawan.chirpstack_mqtt.tenant {:?} is not a tenant id; write the UUID of a tenant, or leave it empty for any tenant",
                self.tenant
            )
        })?;
        Ok(Some(tenant))
    }

    fn validate(&self) -> anyhow::Result<()> {
        let section = "lorawan.chirpstack_mqtt";
        if self.broker_address()?.is_none() {
            return Ok(());
        }
        anyhow::ensure!(
            !self.topic_filter.trim().is_empty(),
            "{section}.topic_filter must not be empty"
        );
        anyhow::ensure!(
            !self.client_id.trim().is_empty(),
            "{section}.client_id must not be empty: the persistent session needs a fixed id"
        );
        anyhow::ensure!(
            self.keep_alive >= Duration::from_secs(1)
                && self.keep_alive <= Duration::from_secs(u16::MAX.into()),
            "{section}.keep_alive must be from 1s to 65535s"
        );
        self.tenant_id()?;
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("ferrite-data"),
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            coap: CoapConfig::default(),
            lorawan: LorawanConfig::default(),
            ingest: IngestConfig::default(),
            storage: StorageConfig::default(),
            auth: AuthConfig::default(),
            processing: ProcessingConfig::default(),
            log: LogConfig::default(),
            actions: ActionsConfig::default(),
            websocket: WebSocketConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            https_listen: "0.0.0.0:8443".parse().expect("valid literal address"),
            mqtts_listen: "0.0.0.0:8883".parse().expect("valid literal address"),
            plain_listeners: true,
            require_client_certificate: false,
            handshake_timeout: Duration::from_secs(10),
            reload_interval: Duration::from_secs(5),
            hsts_max_age: Duration::from_secs(365 * 24 * 3600),
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

impl Default for LorawanConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1700".parse().expect("valid literal address"),
            deduplication_window: Duration::from_millis(200),
            max_f_cnt_gap: ferrite_lorawan::fcnt::MAX_FCNT_GAP,
            net_id: "000000".to_owned(),
            chirpstack_mqtt: ChirpstackMqttConfig::default(),
        }
    }
}

impl LorawanConfig {
    /// Returns `net_id` as a 24-bit number.
    pub fn net_id_value(&self) -> anyhow::Result<u32> {
        let valid = self.net_id.len() == 6 && self.net_id.chars().all(|c| c.is_ascii_hexdigit());
        anyhow::ensure!(
            valid,
            "lorawan.net_id {:?} is invalid: write 6 hex digits, such as \"000000\"",
            self.net_id
        );
        Ok(u32::from_str_radix(&self.net_id, 16)?)
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
            max_retained_messages: 10_000,
            max_retained_bytes: 16 * 1024 * 1024,
            credential_recheck_interval: crate::auth::DEVICE_CACHE_TTL,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
            max_connections: 10_000,
            max_outgoing_messages: 64,
        }
    }
}

impl Default for CoapConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5683".parse().expect("valid literal address"),
            max_payload_bytes: 256 * 1024,
            piggyback_wait: Duration::from_millis(500),
            max_concurrent_requests: 1024,
            max_exchanges: 100_000,
            block_timeout: Duration::from_secs(60),
            max_block_transfers_per_peer: 4,
            max_block_bytes: 64 * 1024 * 1024,
            max_observers_per_device: 4,
            dtls: CoapDtlsConfig::default(),
        }
    }
}

impl Default for CoapDtlsConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5684".parse().expect("valid literal address"),
            psk: true,
            cert_file: None,
            key_file: None,
            ca_file: None,
            max_sessions: 10_000,
            max_handshakes: 1000,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            backend: IngestBackend::Embedded,
            durability: Durability::Fsync,
            max_future: Duration::from_secs(24 * 3600),
            max_past: None,
            segment_bytes: 64 * 1024 * 1024,
            workers: 2,
            queue_capacity: 4096,
            append_timeout: Duration::from_secs(5),
            encrypt: false,
            nats: NatsConfig::default(),
        }
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            credentials_file: None,
            stream: "FERRITE_INGEST".to_owned(),
            subject_prefix: "ferrite.ingest".to_owned(),
            consumer: "ferrite-pipeline".to_owned(),
            max_bytes: 1024 * 1024 * 1024,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(300),
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
            encrypt: false,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(14 * 24 * 3600),
            auto_create_devices: true,
            oidc: OidcConfig::default(),
        }
    }
}

impl Default for OidcConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            client_id: String::new(),
            client_secret_file: None,
            client_secret_env: String::new(),
            redirect_url: String::new(),
            scopes: "openid email profile".to_owned(),
            role_claim: String::new(),
            default_role: String::new(),
            allowed_email_domains: Vec::new(),
            tenant: "default".to_owned(),
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

impl Default for ActionsConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_concurrent: 16,
            attempt_timeout: Duration::from_secs(10),
            max_attempts: 20,
            max_age: Duration::from_secs(24 * 3600),
            retry_initial_delay: Duration::from_secs(1),
            retry_max_delay: Duration::from_secs(300),
            succeeded_retention: Duration::from_secs(7 * 24 * 3600),
            failed_retention: Duration::from_secs(30 * 24 * 3600),
            mqtt: ActionsMqttConfig::default(),
        }
    }
}

impl Default for ActionsMqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            client_id: String::new(),
            username: String::new(),
            password: String::new(),
            keep_alive: Duration::from_secs(30),
        }
    }
}

/// Sections of the file, for mapping `FERRITE_<SECTION>_<KEY>` variables,
/// as the variable prefix and the path of tables. A nested section comes
/// before its parent, so that `FERRITE_ACTIONS_MQTT_URL` sets
/// `actions.mqtt.url` rather than `actions.mqtt_url`.
const SECTIONS: [(&str, &[&str]); 18] = [
    ("http", &["http"]),
    ("mqtt", &["mqtt"]),
    ("coap_dtls", &["coap", "dtls"]),
    ("coap", &["coap"]),
    ("lorawan_chirpstack_mqtt", &["lorawan", "chirpstack_mqtt"]),
    ("lorawan", &["lorawan"]),
    ("ingest_nats", &["ingest", "nats"]),
    ("ingest", &["ingest"]),
    ("storage", &["storage"]),
    ("auth_oidc", &["auth", "oidc"]),
    ("auth", &["auth"]),
    ("processing", &["processing"]),
    ("log", &["log"]),
    ("actions_mqtt", &["actions", "mqtt"]),
    ("actions", &["actions"]),
    ("websocket", &["websocket"]),
    ("tls", &["tls"]),
    ("limits", &["limits"]),
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
        let Some((prefix, path)) = SECTIONS
            .iter()
            .find(|(prefix, _)| rest.starts_with(&format!("{prefix}_")))
        else {
            continue;
        };
        let key = rest[prefix.len() + 1..].to_owned();
        // `None` when the file sets the section to a value that is not a
        // table, which deserializing then reports.
        if let Some(section) = section_table(table, path) {
            section.insert(key, value);
        }
    }
}

/// Returns the table at `path`, creating missing tables on the way.
fn section_table<'a>(table: &'a mut toml::Table, path: &[&str]) -> Option<&'a mut toml::Table> {
    let Some((first, rest)) = path.split_first() else {
        return Some(table);
    };
    let entry = table
        .entry(first.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(inner) => section_table(inner, rest),
        _ => None,
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
        self.lorawan.net_id_value()?;
        anyhow::ensure!(
            (1..=65_535).contains(&self.lorawan.max_f_cnt_gap),
            "lorawan.max_f_cnt_gap must be from 1 to 65535"
        );
        anyhow::ensure!(
            self.lorawan.deduplication_window <= Duration::from_millis(600),
            "lorawan.deduplication_window must be at most 600ms, so that downlinks still reach RX1 one second after the uplink"
        );
        anyhow::ensure!(
            self.processing.dead_letters_per_device >= 1,
            "processing.dead_letters_per_device must be at least 1"
        );
        anyhow::ensure!(
            self.processing.dead_letters_total >= self.processing.dead_letters_per_device,
            "processing.dead_letters_total must be at least processing.dead_letters_per_device"
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
            self.coap.max_payload_bytes >= 1024 && self.coap.max_payload_bytes <= max_message,
            "coap.max_payload_bytes must be from 1024 to {max_message}"
        );
        anyhow::ensure!(
            self.coap.max_concurrent_requests > 0
                && self.coap.max_exchanges > 0
                && self.coap.max_block_transfers_per_peer > 0
                && self.coap.max_observers_per_device > 0,
            "coap.max_concurrent_requests, coap.max_exchanges, coap.max_block_transfers_per_peer and coap.max_observers_per_device must be at least 1"
        );
        anyhow::ensure!(
            self.coap.piggyback_wait <= Duration::from_secs(1),
            "coap.piggyback_wait must be at most 1s, because clients retransmit after 2 to 3 s without an ACK"
        );
        anyhow::ensure!(
            self.coap.max_block_bytes >= self.coap.max_payload_bytes,
            "coap.max_block_bytes must be at least coap.max_payload_bytes"
        );
        if self.ingest.backend == IngestBackend::Nats {
            self.ingest.nats.validate(self.storage.flush_interval)?;
            anyhow::ensure!(
                !self.ingest.encrypt,
                "ingest.encrypt works with the embedded log only; set ingest.backend = \"embedded\" or ingest.encrypt = false"
            );
        }
        anyhow::ensure!(
            self.storage.head_budget_bytes >= 1024 * 1024,
            "storage.head_budget_bytes must be at least 1 MiB (1048576)"
        );
        anyhow::ensure!(
            self.storage.memory_budget_bytes >= 64 * 1024 * 1024,
            "storage.memory_budget_bytes must be at least 64 MiB (67108864)"
        );
        self.actions.validate()?;
        self.auth.validate()?;
        anyhow::ensure!(
            !self.websocket.ping_interval.is_zero(),
            "websocket.ping_interval must be longer than zero"
        );
        anyhow::ensure!(
            self.websocket.idle_timeout > self.websocket.ping_interval,
            "websocket.idle_timeout must be longer than websocket.ping_interval, so that a pong can arrive in time"
        );
        anyhow::ensure!(
            self.websocket.max_outgoing_messages > 0,
            "websocket.max_outgoing_messages must be at least 1"
        );
        self.coap.dtls.validate()?;
        self.tls.validate()?;
        self.lorawan.chirpstack_mqtt.validate()?;
        self.limits.validate()?;
        Ok(())
    }
}

impl ActionsConfig {
    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.queue_capacity > 0,
            "actions.queue_capacity must be at least 1"
        );
        anyhow::ensure!(
            self.max_concurrent > 0,
            "actions.max_concurrent must be at least 1"
        );
        anyhow::ensure!(
            self.max_attempts > 0,
            "actions.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            !self.attempt_timeout.is_zero(),
            "actions.attempt_timeout must be longer than zero"
        );
        anyhow::ensure!(
            !self.retry_initial_delay.is_zero(),
            "actions.retry_initial_delay must be longer than zero"
        );
        anyhow::ensure!(
            self.retry_max_delay >= self.retry_initial_delay,
            "actions.retry_max_delay must not be shorter than actions.retry_initial_delay"
        );
        anyhow::ensure!(
            self.mqtt.keep_alive >= Duration::from_secs(1)
                && self.mqtt.keep_alive <= Duration::from_secs(u16::MAX.into()),
            "actions.mqtt.keep_alive must be from 1s to 65535s"
        );
        self.mqtt.broker_address()?;
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
# Retained messages per tenant, and their bytes (topic, payload and
# properties).
max_retained_messages = 10000
max_retained_bytes = 16777216
# Time after which an open connection's credential is checked again; a
# revoked token or key, or a deleted user, ends the connection. Changes
# through this server's API end connections at once; this check finds
# changes made by the command line or another process.
credential_recheck_interval = "30s"

[coap]
# CoAP over UDP (RFC 7252, block-wise transfers and Observe).
# Environment: FERRITE_COAP_LISTEN; flag: --coap-listen.
listen = "0.0.0.0:5683"
# Largest request payload in bytes, after block-wise reassembly.
max_payload_bytes = 262144
# Wait for the ingest log before a confirmable request gets an empty ACK
# and its response follows separately. At most 1s.
piggyback_wait = "500ms"
# Requests processed at once; more get 5.03 Service Unavailable.
max_concurrent_requests = 1024
# Recent message IDs kept to detect duplicates, over all peers.
max_exchanges = 100000
# A block-wise upload idle for longer is dropped.
block_timeout = "1m"
# Block-wise uploads in progress per peer.
max_block_transfers_per_peer = 4
# Bytes of unfinished block-wise uploads held over all peers.
max_block_bytes = 67108864
# Observers per device and resource; more are served without Observe.
max_observers_per_device = 4

[coap.dtls]
# CoAP over DTLS 1.2 (coaps://). Runs when psk is on or cert_file is set.
# Environment: FERRITE_COAPS_LISTEN; flag: --coaps-listen.
listen = "0.0.0.0:5684"
# PSK cipher suites with the keys set per device through the API.
psk = true
# Server certificate chain and key (PEM, ECDSA) for ECDHE-ECDSA suites.
# cert_file = "/etc/ferrite/coaps-cert.pem"
# key_file = "/etc/ferrite/coaps-key.pem"
# CAs of client certificates whose subject CN is a device id. Without it,
# only certificates registered on a device are accepted.
# ca_file = "/etc/ferrite/device-ca.pem"
# Sessions and handshakes in progress; new peers beyond them are dropped.
max_sessions = 10000
max_handshakes = 1000
# Time a handshake has to finish after the cookie exchange.
handshake_timeout = "30s"
# A session that receives nothing for this long is closed.
idle_timeout = "10m"

[lorawan]
# Semtech UDP packet forwarder protocol from LoRaWAN gateways.
# Environment: FERRITE_LORAWAN_LISTEN; flag: --lorawan-listen.
listen = "0.0.0.0:1700"
# Time to collect one uplink heard by several gateways (at most 600ms).
deduplication_window = "200ms"
# Frames a device may lose in a row before its counter is rejected.
max_f_cnt_gap = 16384
# NetID in join accepts (6 hex digits); its 7 low bits start each DevAddr.
net_id = "000000"

[lorawan.chirpstack_mqtt]
# ChirpStack's MQTT integration, see docs/protocols/lorawan-integrations.md.
# Broker that ChirpStack publishes device events to, such as
# "mqtt://127.0.0.1:1883" (no TLS). Empty: off.
url = ""
# Subscription (QoS 1); other matching topics than .../event/up are skipped.
topic_filter = "application/+/device/+/event/up"
# The session is persistent, so the broker keeps uplinks while Ferrite is
# down: keep this id unique on the broker and the same across restarts.
client_id = "ferrite-chirpstack"
# Empty: connect without credentials. Environment:
# FERRITE_LORAWAN_CHIRPSTACK_MQTT_USERNAME, ..._PASSWORD.
username = ""
password = ""
# Tenant id whose devices uplinks may reach. Empty: any tenant, found by
# DevEUI, which is unique on a node.
tenant = ""
keep_alive = "30s"

[ingest]
# Where accepted messages wait for the pipeline: "embedded" (segment files
# under data_dir/log, one node) or "nats" (a JetStream stream, see
# [ingest.nats]).
backend = "embedded"
# Embedded log only. "fsync": acknowledge after the log is synced to disk.
# "none": acknowledge after the write reaches the operating system.
durability = "fsync"
# Points stamped further ahead of the server clock are rejected.
max_future = "24h"
# Points stamped further behind the server clock are rejected: "forever"
# (no limit besides storage.retention) or a duration such as "7d". Late
# and repeated points within the window are stored; the last write wins.
max_past = "forever"
# Embedded log only: size at which it starts a new segment file, in bytes.
segment_bytes = 67108864
# Pipeline workers; each device always goes to the same one.
workers = 2
# Embedded log only: appends waiting for the log writer before new ones
# wait, then fail.
queue_capacity = 4096
# Longest wait of an append: for room in the embedded log's queue, or for
# JetStream to acknowledge every message of it.
append_timeout = "5s"
# Embedded log only: seal the payload and metadata of every record under
# the tenant's data key (AES-256-GCM), see docs/security.md.
encrypt = false

# Used with backend = "nats"; FERRITE_INGEST_NATS_URL sets url, and so on.
[ingest.nats]
# Server URL, or several separated by commas (members of one cluster).
url = "nats://127.0.0.1:4222"
# A .creds file (user JWT and NKey seed); without it no credentials are sent.
# credentials_file = "/etc/ferrite/nats.creds"
# Stream, created at start when missing. It takes subject_prefix.> and
# stores messages in files until the store has flushed them.
stream = "FERRITE_INGEST"
# Messages go to {subject_prefix}.{tenant_id}.{device_id}.
subject_prefix = "ferrite.ingest"
# Durable pull consumer that feeds the pipeline. One Ferrite node consumes
# a stream; see docs/architecture.md.
consumer = "ferrite-pipeline"
# Stream size limit in bytes; when full, appends fail as overloaded.
max_bytes = 1073741824
# Copies of each message in a JetStream cluster (1 to 5).
replicas = 1
# A retried publish with the same message id is stored once within this.
duplicate_window = "2m"
# Redelivery delay of unacknowledged messages. Messages are acknowledged
# after the store flush that contains them: keep this above
# storage.flush_interval, twice it or more.
ack_wait = "5m"

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
# Seal the point values of every block written to the store files under
# the tenant's data key (AES-256-GCM); series names and time ranges stay
# plain. Sealed blocks stay readable when this is turned off again. See
# docs/security.md.
encrypt = false

# Retention per rollup tier, by interval as written in rollups, for example
# "1m" = "30d". Tiers not listed keep their rows forever.
[storage.rollup_retention]

# Retention per tenant id, overriding storage.retention.
[storage.tenant_retention]

[auth]
# Lifetime of access tokens from login, refresh and POST /api/v1/oauth/token.
access_token_ttl = "15m"
# Lifetime of refresh tokens; each refresh issues a new one.
refresh_token_ttl = "14days"
# Lets admin and operator API keys create devices on first line-protocol write.
auto_create_devices = true

[auth.oidc]
# Login through an OpenID Connect provider (authorization code flow with
# PKCE). Off while issuer is empty.
issuer = ""
client_id = ""
# The client secret, from a file or else from the environment variable
# named here; it is never stored in the database.
# client_secret_file = "/etc/ferrite/oidc-client-secret"
client_secret_env = ""
# This server's callback, as registered at the provider.
redirect_url = ""
scopes = "openid email profile"
# ID token claim that holds the role (admin, operator or viewer) of a user
# created at first login; without it, default_role. An empty default_role
# lets only existing users log in.
role_claim = ""
default_role = ""
# Email domains allowed to log in, such as ["example.com"]; empty: all.
allowed_email_domains = []
# Tenant of users created at first login.
tenant = "default"

[processing]
# Dead letters (messages the pipeline could not store) kept per device; the
# oldest are deleted beyond this.
dead_letters_per_device = 1000
# Dead letters kept in all devices together; the oldest are deleted beyond
# this. A letter keeps its payload, so the worst case on disk is this times
# the largest accepted message.
dead_letters_total = 100000
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

[actions]
# Alarm actions (webhooks, MQTT publishes, device commands), see
# docs/actions.md. Each run of an action is a delivery, recorded in the
# metadata database and retried with exponential backoff.
# Alarm changes waiting to be recorded; more are dropped and counted in
# ferrite_action_queue_dropped_total.
queue_capacity = 10000
# Deliveries attempted at the same time.
max_concurrent = 16
# Time one attempt may take: a webhook request until its response has
# arrived, an MQTT publish until the broker acknowledges it.
attempt_timeout = "10s"
# Attempts of one delivery, the first included, before it is failed.
max_attempts = 20
# A delivery that has not succeeded this long after its first attempt fails.
max_age = "24h"
# Delay before the first retry; each further retry waits twice as long,
# up to retry_max_delay, with +-20 % jitter. A Retry-After header of a
# 429 or 5xx response sets the delay instead.
retry_initial_delay = "1s"
retry_max_delay = "5m"
# Time finished deliveries are kept.
succeeded_retention = "7d"
failed_retention = "30d"

[actions.mqtt]
# External broker of mqtt_publish actions, such as "mqtt://127.0.0.1:1883"
# (no TLS). Empty: mqtt_publish deliveries fail. The connection opens at the
# first publish.
url = ""
# Empty: "ferrite-actions-" and a random suffix.
client_id = ""
# Empty: connect without credentials. Environment:
# FERRITE_ACTIONS_MQTT_USERNAME, FERRITE_ACTIONS_MQTT_PASSWORD.
username = ""
password = ""
keep_alive = "30s"

[websocket]
# The device WebSocket, GET /api/v1/devices/ws on the HTTP listener. MQTT
# over WebSocket (/mqtt) follows the [mqtt] settings instead.
# Interval of the server's pings to each device socket.
ping_interval = "30s"
# A device socket that receives nothing, not even a pong, for this long is
# closed.
idle_timeout = "90s"
# Open device sockets beyond this number are rejected with 503.
max_connections = 10000
# Messages waiting to be sent to one device (acknowledgements, errors,
# commands); one more closes the socket, because its client does not read.
max_outgoing_messages = 64

[tls]
# HTTPS (REST API, HTTP telemetry, WebSockets) and MQTT over TLS, TLS 1.2
# and 1.3 only. Both listeners start when cert_file is set; `ferrite certs
# init` creates a development CA and server certificate.
# Server certificate chain (leaf first) and private key, PEM. Changed
# files are loaded without restart; a bad new file keeps the old ones.
# cert_file = "/etc/ferrite/server-cert.pem"
# key_file = "/etc/ferrite/server-key.pem"
# CAs whose client certificates authenticate, over MQTT over TLS, the
# device whose id is the subject CN, in any tenant. Tenants register
# their own CAs with POST /api/v1/device-cas.
# client_ca_file = "/etc/ferrite/device-ca.pem"
# Environment: FERRITE_TLS_HTTPS_LISTEN; flag: --https-listen.
https_listen = "0.0.0.0:8443"
# Environment: FERRITE_TLS_MQTTS_LISTEN; flag: --mqtts-listen.
mqtts_listen = "0.0.0.0:8883"
# false: no plain HTTP, MQTT over TCP and CoAP over UDP listeners (needs
# cert_file). The LoRaWAN UDP listener runs either way.
plain_listeners = true
# MQTT over TLS: end handshakes without a client certificate. When false,
# clients without one authenticate at CONNECT as over plain MQTT.
require_client_certificate = false
# Time a connection has to finish the TLS handshake.
handshake_timeout = "10s"
# Interval of the check for changed cert_file and key_file; SIGHUP also
# reloads them.
reload_interval = "5s"
# max-age of Strict-Transport-Security on HTTPS responses; "0s": none.
hsts_max_age = "365days"

[limits]
# Rate and resource limits of every protocol; docs/security.md lists the
# answer each protocol gives. 0 turns a limit off; a burst of 0 equals the
# rate. Rates are token buckets: a sender may send a burst at once, then
# its rate per second.
# Messages per device over all protocols. MQTT 5 gets PUBACK 0x97 with a
# reason string, MQTT 3.1.1 is read more slowly, HTTP gets 429, CoAP 4.29.
device_messages_per_second = 1000
device_message_burst = 2000
# Messages of a whole tenant: room for 10,000 devices at 1 message per
# second each, twice over.
tenant_messages_per_second = 20000
tenant_message_burst = 40000
# Messages from one source address (IPv6: one /64), as many as a tenant,
# so that a fleet behind one NAT fits.
address_messages_per_second = 20000
address_message_burst = 40000
# REST API requests per credential (API key, access token, JWT) and per
# source address; more get 429 with Retry-After.
api_requests_per_second = 100
api_request_burst = 200
api_address_requests_per_second = 1000
api_address_request_burst = 2000
# Open connections per source address, for MQTT (TCP and WebSocket) and
# for HTTP (WebSockets included) each. MQTT gets CONNACK 0x9F.
connections_per_address = 10000
# DTLS handshakes in progress per source address; more ClientHellos are
# dropped.
dtls_handshakes_per_address = 100
# MQTT topic names and filters: bytes and levels. Longer PUBLISH topics get
# PUBACK 0x90, longer filters SUBACK 0x8F.
max_topic_length = 1024
max_topic_levels = 32
# Subscriptions of one MQTT session; more get SUBACK 0x97.
max_subscriptions_per_client = 1000
# MQTT 5 PUBLISHes rejected in a row for their rate before DISCONNECT 0x96.
mqtt_rate_limited_before_disconnect = 100
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
    fn environment_sets_nested_action_keys() {
        let mut table = toml::Table::new();
        let vars = [
            ("FERRITE_ACTIONS_MQTT_URL", "mqtt://127.0.0.1:1883"),
            ("FERRITE_ACTIONS_MQTT_PASSWORD", "secret"),
            ("FERRITE_ACTIONS_MAX_ATTEMPTS", "3"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        apply_env(&mut table, vars.into_iter());
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.actions.mqtt.url, "mqtt://127.0.0.1:1883");
        assert_eq!(config.actions.mqtt.password, "secret");
        assert_eq!(config.actions.max_attempts, 3);
        let mut table = toml::Table::new();
        let vars = [
            ("FERRITE_INGEST_NATS_URL", "nats://10.0.0.1:4222"),
            ("FERRITE_INGEST_BACKEND", "nats"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        apply_env(&mut table, vars.into_iter());
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.ingest.nats.url, "nats://10.0.0.1:4222");
        assert!(!format!("{config:?}").contains("\"secret\""));
    }

    #[test]
    fn broker_url_is_checked() {
        let broker = |url: &str| {
            ActionsMqttConfig {
                url: url.to_owned(),
                ..ActionsMqttConfig::default()
            }
            .broker_address()
        };
        assert_eq!(broker("").unwrap(), None);
        assert_eq!(
            broker("mqtt://127.0.0.1").unwrap(),
            Some(BrokerAddress {
                host: "127.0.0.1".to_owned(),
                port: 1883
            })
        );
        assert_eq!(broker("tcp://[::1]:1884").unwrap().unwrap().host, "::1");
        for (url, fragment) in [
            ("mqtts://broker:8883", "only mqtt://"),
            ("127.0.0.1:1883", "not a URL"),
            ("localhost:1883", "scheme"),
            ("mqtt://u:p@broker", "credentials"),
            ("mqtt://broker/x", "path"),
        ] {
            let error = format!("{:#}", broker(url).unwrap_err());
            assert!(error.contains(fragment), "{url}: {error}");
        }
    }

    #[test]
    fn chirpstack_mqtt_settings_are_checked() {
        let mut table = toml::Table::new();
        let vars = [
            (
                "FERRITE_LORAWAN_CHIRPSTACK_MQTT_URL",
                "mqtt://127.0.0.1:1883",
            ),
            ("FERRITE_LORAWAN_CHIRPSTACK_MQTT_PASSWORD", "secret"),
            ("FERRITE_LORAWAN_CHIRPSTACK_MQTT_TENANT", "not-a-tenant"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        apply_env(&mut table, vars.into_iter());
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        let settings = &config.lorawan.chirpstack_mqtt;
        assert_eq!(settings.url, "mqtt://127.0.0.1:1883");
        assert!(!format!("{config:?}").contains("\"secret\""));
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("lorawan.chirpstack_mqtt.tenant"), "{error}");

        let mut config = config.clone();
        config.lorawan.chirpstack_mqtt.tenant = String::new();
        config.validate().expect("any tenant is valid");
        config.lorawan.chirpstack_mqtt.client_id = " ".into();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("client_id"), "{error}");
        config.lorawan.chirpstack_mqtt.url = "mqtts://broker".into();
        let error = format!("{:#}", config.validate().unwrap_err());
        assert!(error.contains("lorawan.chirpstack_mqtt.url"), "{error}");
    }

    #[test]
    fn nats_settings_are_validated() {
        let mut config = Config::default();
        config.ingest.backend = IngestBackend::Nats;
        config.validate().expect("the defaults are valid");

        type Change = fn(&mut NatsConfig);
        let cases: [(&str, Change, &str); 7] = [
            (
                "dot in stream",
                |nats| nats.stream = "A.B".into(),
                "ingest.nats.stream",
            ),
            (
                "space in consumer",
                |nats| nats.consumer = "a b".into(),
                "ingest.nats.consumer",
            ),
            (
                "wildcard prefix",
                |nats| nats.subject_prefix = "a.*".into(),
                "ingest.nats.subject_prefix",
            ),
            (
                "empty token",
                |nats| nats.subject_prefix = "a..b".into(),
                "ingest.nats.subject_prefix",
            ),
            (
                "tiny stream",
                |nats| nats.max_bytes = 1000,
                "ingest.nats.max_bytes",
            ),
            (
                "six replicas",
                |nats| nats.replicas = 6,
                "ingest.nats.replicas",
            ),
            (
                "short ack wait",
                |nats| nats.ack_wait = Duration::from_secs(60),
                "storage.flush_interval",
            ),
        ];
        for (case, change, named) in cases {
            let mut invalid = config.clone();
            change(&mut invalid.ingest.nats);
            let error = invalid.validate().expect_err(case).to_string();
            assert!(error.contains(named), "{case}: {error}");
        }
    }

    #[test]
    fn nats_table_is_ignored_for_embedded() {
        let mut config = Config::default();
        config.ingest.nats.stream = "A.B".into();
        config
            .validate()
            .expect("only the chosen backend is checked");
    }

    #[test]
    fn limit_settings_are_checked() {
        let mut table = toml::Table::new();
        let vars = [
            ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "50"),
            ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "10"),
        ]
        .map(|(name, value)| (name.to_owned(), value.to_owned()));
        apply_env(&mut table, vars.into_iter());
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.limits.device_messages_per_second, 50);
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("limits.device_message_burst (10)"),
            "{error}"
        );

        let mut config = Config::default();
        config.limits.device_message_burst = 0;
        config.validate().expect("a burst of 0 equals the rate");
        config.limits.max_topic_levels = 4;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("limits.max_topic_levels"), "{error}");
        config.limits.max_topic_levels = 0;
        config.validate().expect("0 turns the level limit off");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let error = toml::from_str::<Config>("[http]\nlisten_addr = \"127.0.0.1:1\"\n")
            .expect_err("unknown key");
        assert!(error.to_string().contains("listen_addr"), "{error}");
    }
}
