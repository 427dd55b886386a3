//! Rate limits and resource limits shared by every protocol adapter.
//!
//! The adapters ask [`Limits`] before they accept work, and each responds in
//! its own protocol (HTTP 429, MQTT reason codes, CoAP 4.29, a WebSocket
//! error message). This module decides only whether the work may go on.
//!
//! ## Rate limits
//! Message rates are token buckets (GCRA from the `governor` crate) keyed
//! by device, tenant and source address; REST API requests are keyed by
//! credential and source address. A message must pass the device, the
//! address and the tenant bucket, checked in that order. `governor` takes
//! a token from each bucket that passes, so a message rejected by a later
//! bucket has still cost a token in the earlier ones. The order makes that
//! cost fall on the rejected sender: a device over its own limit never
//! reaches the tenant bucket, so it cannot use up its tenant's share.
//!
//! ## Memory
//! A bucket exists only for a key that sent something. [`Limits::sweep`],
//! which the server runs every [`SWEEP_INTERVAL`], drops the buckets that
//! are full again, because a full bucket behaves like a missing one. Keys
//! come from completed TCP connections or authenticated requests, never
//! from a bare UDP datagram, and IPv6 addresses count per /64 prefix, so
//! cycling addresses or client ids costs an attacker real connections or
//! valid credentials. The number of buckets is bounded by the keys seen
//! within one refill time plus one sweep interval. Connection counters
//! (`connections.rs`) keep an entry only while a connection is open.
//!
//! ## Unlimited
//! A setting of 0 turns its limit off; there is then no bucket or counter
//! for it at all.

mod connections;

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

pub use connections::{AddressSlot, ConnectionCounter};

use crate::config::LimitsConfig;
use crate::ids::{DeviceId, TenantId};

/// Interval at which idle buckets are dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// A rate limit, named as in the `[limits]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimit {
    DeviceMessages,
    TenantMessages,
    AddressMessages,
    ApiCredentialRequests,
    ApiAddressRequests,
}

impl RateLimit {
    /// Label value of `ferrite_rate_limited_total{limit}`.
    pub fn label(self) -> &'static str {
        match self {
            Self::DeviceMessages => "device_messages",
            Self::TenantMessages => "tenant_messages",
            Self::AddressMessages => "address_messages",
            Self::ApiCredentialRequests => "api_credential_requests",
            Self::ApiAddressRequests => "api_address_requests",
        }
    }

    /// Returns the configuration key of the rate.
    pub fn setting(self) -> &'static str {
        match self {
            Self::DeviceMessages => "limits.device_messages_per_second",
            Self::TenantMessages => "limits.tenant_messages_per_second",
            Self::AddressMessages => "limits.address_messages_per_second",
            Self::ApiCredentialRequests => "limits.api_requests_per_second",
            Self::ApiAddressRequests => "limits.api_address_requests_per_second",
        }
    }

    fn subject(self) -> &'static str {
        match self {
            Self::DeviceMessages => "messages of this device",
            Self::TenantMessages => "messages of this tenant",
            Self::AddressMessages => "messages from this source address",
            Self::ApiCredentialRequests => "API requests with this credential",
            Self::ApiAddressRequests => "API requests from this source address",
        }
    }
}

/// A request or message over a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub limit: RateLimit,
    /// The configured rate, per second.
    pub per_second: u32,
    /// Time until the bucket has a token again.
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds to wait, rounded up and at least 1, for `Retry-After`
    /// and CoAP Max-Age.
    pub fn retry_after_secs(&self) -> u64 {
        let millis = self.retry_after.as_millis();
        u64::try_from(millis.div_ceil(1000))
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate limit exceeded: {} are limited to {} per second ({}); retry after {} s",
            self.limit.subject(),
            self.per_second,
            self.limit.setting(),
            self.retry_after_secs()
        )
    }
}

/// A keyed token bucket and the rate it was made with.
struct Buckets<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    limit: RateLimit,
    per_second: u32,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Creates the buckets, or `None` when `per_second` is 0 (unlimited).
    fn new(limit: RateLimit, per_second: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            limit,
            per_second,
        })
    }

    fn check(&self, key: &K) -> Result<(), RateLimited> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| RateLimited {
                limit: self.limit,
                per_second: self.per_second,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    fn sweep(&self) -> usize {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        self.limiter.len()
    }
}

fn check<K: Hash + Eq + Clone>(
    buckets: &Option<Buckets<K>>,
    key: Option<&K>,
) -> Result<(), RateLimited> {
    match (buckets, key) {
        (Some(buckets), Some(key)) => buckets.check(key),
        _ => Ok(()),
    }
}

/// The sender of a message, for the message rate limits.
#[derive(Debug, Clone, Copy)]
pub struct Sender {
    pub tenant: TenantId,
    /// `None` for an application (MQTT) or a fleet write that names no
    /// single device.
    pub device: Option<DeviceId>,
    /// `None` when the transport has no address, as in tests over pipes.
    pub address: Option<IpAddr>,
}

/// The limits of one server, shared by all listeners. Cheap to clone.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    config: LimitsConfig,
    devices: Option<Buckets<DeviceId>>,
    tenants: Option<Buckets<TenantId>>,
    addresses: Option<Buckets<IpAddr>>,
    api_credentials: Option<Buckets<u64>>,
    api_addresses: Option<Buckets<IpAddr>>,
    mqtt_connections: ConnectionCounter,
    http_connections: ConnectionCounter,
    dtls_handshakes: ConnectionCounter,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        register_metrics();
        Self {
            inner: Arc::new(Inner {
                devices: Buckets::new(
                    RateLimit::DeviceMessages,
                    config.device_messages_per_second,
                    config.device_message_burst,
                ),
                tenants: Buckets::new(
                    RateLimit::TenantMessages,
                    config.tenant_messages_per_second,
                    config.tenant_message_burst,
                ),
                addresses: Buckets::new(
                    RateLimit::AddressMessages,
                    config.address_messages_per_second,
                    config.address_message_burst,
                ),
                api_credentials: Buckets::new(
                    RateLimit::ApiCredentialRequests,
                    config.api_requests_per_second,
                    config.api_request_burst,
                ),
                api_addresses: Buckets::new(
                    RateLimit::ApiAddressRequests,
                    config.api_address_requests_per_second,
                    config.api_address_request_burst,
                ),
                mqtt_connections: ConnectionCounter::new(config.connections_per_address),
                http_connections: ConnectionCounter::new(config.connections_per_address),
                dtls_handshakes: ConnectionCounter::new(config.dtls_handshakes_per_address),
                config: config.clone(),
            }),
        }
    }

    pub fn config(&self) -> &LimitsConfig {
        &self.inner.config
    }

    /// Takes a token for one message of `sender` from the device, address
    /// and tenant buckets, in that order (see the module documentation).
    /// The caller counts a rejection with [`count_rate_limited`].
    pub fn check_message(&self, sender: &Sender) -> Result<(), RateLimited> {
        let inner = &self.inner;
        check(&inner.devices, sender.device.as_ref())?;
        let address = sender.address.map(address_key);
        check(&inner.addresses, address.as_ref())?;
        check(&inner.tenants, Some(&sender.tenant))
    }

    /// Takes a token for one REST API request from the bucket of its
    /// source address and, when it carries one, of its credential.
    /// `credential` is the bearer token or API key as sent; only a hash of
    /// it is kept.
    pub fn check_api_request(
        &self,
        credential: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<(), RateLimited> {
        let inner = &self.inner;
        let address = address.map(address_key);
        check(&inner.api_addresses, address.as_ref())?;
        let credential = credential.map(credential_key);
        check(&inner.api_credentials, credential.as_ref())
    }

    /// Counts an MQTT connection (TCP or WebSocket) of `address`.
    pub fn mqtt_connection(&self, address: IpAddr) -> Option<AddressSlot> {
        self.inner
            .mqtt_connections
            .try_acquire(address_key(address))
    }

    /// Counts an HTTP connection of `address`, device and MQTT WebSockets
    /// included.
    pub fn http_connection(&self, address: IpAddr) -> Option<AddressSlot> {
        self.inner
            .http_connections
            .try_acquire(address_key(address))
    }

    /// Counts a DTLS handshake in progress from `address`.
    pub fn dtls_handshake(&self, address: IpAddr) -> Option<AddressSlot> {
        self.inner.dtls_handshakes.try_acquire(address_key(address))
    }

    /// Drops the buckets that are full again; returns how many remain.
    pub fn sweep(&self) -> usize {
        let inner = &self.inner;
        let mut remaining = 0;
        remaining += inner.devices.as_ref().map_or(0, Buckets::sweep);
        remaining += inner.tenants.as_ref().map_or(0, Buckets::sweep);
        remaining += inner.addresses.as_ref().map_or(0, Buckets::sweep);
        remaining += inner.api_credentials.as_ref().map_or(0, Buckets::sweep);
        remaining += inner.api_addresses.as_ref().map_or(0, Buckets::sweep);
        metrics::gauge!("ferrite_rate_limit_buckets").set(remaining as f64);
        remaining
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `shutdown` is cancelled.
    pub async fn run_sweeper(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.sweep();
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Returns the key of an address: IPv4 as is, IPv6 by its /64 prefix,
/// because one host usually owns a whole /64 and can pick any address in
/// it. An IPv4-mapped IPv6 address counts as its IPv4 address.
pub fn address_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !u128::from(u64::MAX);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Hashes a credential, so that no secret is kept in the buckets.
fn credential_key(credential: &str) -> u64 {
    use sha2::{Digest, Sha256};

    let digest = Sha256::digest(credential.as_bytes());
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(prefix)
}

fn register_metrics() {
    metrics::describe_counter!(
        "ferrite_rate_limited_total",
        "Messages and requests rejected or delayed by a rate limit, by protocol and limit."
    );
    metrics::describe_counter!(
        "ferrite_connections_refused_total",
        "Connections and handshakes refused by a resource limit, by protocol and reason."
    );
    metrics::describe_gauge!(
        "ferrite_rate_limit_buckets",
        "Token buckets kept for rate limits after the last sweep."
    );
}

/// Counts a message or request over a rate limit. `protocol` is one of
/// `mqtt`, `http`, `api`, `coap`, `websocket`.
pub fn count_rate_limited(protocol: &'static str, limited: &RateLimited) {
    metrics::counter!(
        "ferrite_rate_limited_total",
        "protocol" => protocol,
        "limit" => limited.limit.label()
    )
    .increment(1);
}

/// Counts a rejected connection. `reason` is one of
/// `connections_per_address`, `dtls_handshakes_per_address`.
pub fn count_connection_refused(protocol: &'static str, reason: &'static str) {
    metrics::counter!(
        "ferrite_connections_refused_total",
        "protocol" => protocol,
        "reason" => reason
    )
    .increment(1);
}

/// Counts a message rejected by a size or count limit. `limit` is one of
/// `topic_length`, `topic_levels`, `subscriptions`.
pub fn count_resource_limited(protocol: &'static str, limit: &'static str) {
    metrics::counter!(
        "ferrite_resource_limited_total",
        "protocol" => protocol,
        "limit" => limit
    )
    .increment(1);
}

/// Returns why `topic` breaks the topic limits, or `None` when it fits.
/// `kind` is "topic name" or "topic filter", for the message.
pub fn check_topic(
    config: &LimitsConfig,
    topic: &str,
    kind: &str,
) -> Option<(&'static str, String)> {
    let max_length = config.max_topic_length;
    if max_length > 0 && topic.len() > max_length {
        return Some((
            "topic_length",
            format!(
                "the {kind} has {} bytes, more than limits.max_topic_length ({max_length})",
                topic.len()
            ),
        ));
    }
    let max_levels = config.max_topic_levels;
    let levels = topic.split('/').count();
    if max_levels > 0 && levels > max_levels {
        return Some((
            "topic_levels",
            format!(
                "the {kind} has {levels} levels, more than limits.max_topic_levels ({max_levels})"
            ),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LimitsConfig {
        LimitsConfig {
            device_messages_per_second: 2,
            device_message_burst: 2,
            tenant_messages_per_second: 3,
            tenant_message_burst: 3,
            address_messages_per_second: 0,
            address_message_burst: 0,
            ..LimitsConfig::default()
        }
    }

    fn sender(tenant: TenantId, device: DeviceId) -> Sender {
        Sender {
            tenant,
            device: Some(device),
            address: None,
        }
    }

    #[test]
    fn device_limit_spares_the_tenant() {
        let limits = Limits::new(&config());
        let tenant = TenantId::new_random();
        let noisy = sender(tenant, DeviceId::new_random());
        let quiet = sender(tenant, DeviceId::new_random());

        assert!(limits.check_message(&noisy).is_ok());
        assert!(limits.check_message(&noisy).is_ok());
        for _ in 0..100 {
            let limited = limits.check_message(&noisy).expect_err("over the burst");
            assert_eq!(limited.limit, RateLimit::DeviceMessages);
        }
        // The rejected messages took no tenant tokens: one is left.
        assert!(limits.check_message(&quiet).is_ok());
        let limited = limits.check_message(&quiet).expect_err("tenant empty");
        assert_eq!(limited.limit, RateLimit::TenantMessages);
        assert_eq!(limited.per_second, 3);
        assert!(limited.retry_after <= Duration::from_secs(1));
        assert_eq!(limited.retry_after_secs(), 1);
    }

    #[test]
    fn zero_means_unlimited() {
        let limits = Limits::new(&LimitsConfig {
            device_messages_per_second: 0,
            tenant_messages_per_second: 0,
            address_messages_per_second: 0,
            connections_per_address: 0,
            ..LimitsConfig::default()
        });
        let sender = Sender {
            address: Some("192.0.2.1".parse().unwrap()),
            ..sender(TenantId::new_random(), DeviceId::new_random())
        };
        for _ in 0..10_000 {
            assert!(limits.check_message(&sender).is_ok());
        }
        let address: IpAddr = "192.0.2.1".parse().unwrap();
        let slots: Vec<_> = (0..1000).map(|_| limits.mqtt_connection(address)).collect();
        assert!(slots.iter().all(Option::is_some));
    }

    #[test]
    fn ipv6_addresses_share_their_prefix() {
        let first: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let second: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(first), address_key(second));
        assert_ne!(address_key(first), address_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn sweep_drops_refilled_buckets() {
        let limits = Limits::new(&LimitsConfig {
            device_messages_per_second: 1000,
            device_message_burst: 1,
            ..config()
        });
        let tenant = TenantId::new_random();
        for _ in 0..50 {
            let _ = limits.check_message(&sender(tenant, DeviceId::new_random()));
        }
        std::thread::sleep(Duration::from_millis(20));
        // Only the tenant bucket, still not refilled, stays.
        assert!(limits.sweep() <= 1);
    }

    #[test]
    fn topic_limits_name_the_setting() {
        let config = LimitsConfig {
            max_topic_length: 10,
            max_topic_levels: 3,
            ..LimitsConfig::default()
        };
        assert!(check_topic(&config, "a/b/c", "topic name").is_none());
        let (limit, message) = check_topic(&config, "a/b/c/d", "topic name").unwrap();
        assert_eq!(limit, "topic_levels");
        assert!(message.contains("limits.max_topic_levels (3)"), "{message}");
        let (limit, message) = check_topic(&config, "abcdefghijk", "topic filter").unwrap();
        assert_eq!(limit, "topic_length");
        assert!(message.contains("11 bytes"), "{message}");
    }
}
