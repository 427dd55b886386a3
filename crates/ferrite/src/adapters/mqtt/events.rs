//! Metrics of the MQTT adapter and the limiter for repeated warnings, so
//! that metric names and label values are written in one place.
//!
//! Every label value comes from a fixed set: a device id or topic never
//! becomes a label.

#[cfg(test)]
use std::time::{Duration, Instant};

#[cfg(test)]
use crate::warn_limit::WARN_INTERVAL;

/// Registers the metrics with their descriptions, so that they appear on
/// `/metrics` before the first connection.
pub fn register() {
    metrics::describe_gauge!("ferrite_mqtt_connections", "Open MQTT connections.");
    metrics::describe_counter!(
        "ferrite_mqtt_connections_total",
        "Accepted MQTT connections."
    );
    metrics::describe_counter!(
        "ferrite_mqtt_connections_refused_total",
        "MQTT connections closed at accept or refused in CONNACK, by reason."
    );
    metrics::describe_counter!(
        "ferrite_mqtt_messages_received_total",
        "PUBLISH packets and will messages received."
    );
    metrics::describe_counter!(
        "ferrite_mqtt_protocol_errors_total",
        "MQTT connections closed for malformed packets or protocol violations."
    );
    metrics::describe_counter!(
        "ferrite_mqtt_deliveries_dropped_total",
        "Messages for MQTT subscribers that were dropped, by reason."
    );
    metrics::describe_counter!(
        "ferrite_mqtt_connections_revoked_total",
        "Open MQTT connections closed because their token or key was revoked or their user deleted."
    );
    metrics::gauge!("ferrite_mqtt_connections").set(0.0);
    metrics::counter!("ferrite_mqtt_connections_total").increment(0);
    metrics::counter!("ferrite_mqtt_messages_received_total").increment(0);
    metrics::counter!("ferrite_mqtt_protocol_errors_total").increment(0);
}

pub fn connection_opened() {
    metrics::gauge!("ferrite_mqtt_connections").increment(1.0);
    metrics::counter!("ferrite_mqtt_connections_total").increment(1);
}

pub fn connection_closed() {
    metrics::gauge!("ferrite_mqtt_connections").decrement(1.0);
}

/// Counts a connection closed at accept or refused in CONNACK. `reason` is
/// one of `max_connections`, `malformed`, `unsupported_protocol`,
/// `unsupported_feature`, `bad_credentials`, `not_authorized`,
/// `client_id_rejected`, `server_unavailable`, `throttled` (too many
/// failed passwords or API keys, see `auth::LoginThrottle`),
/// `connections_per_address`.
pub fn connection_refused(reason: &'static str) {
    metrics::counter!("ferrite_mqtt_connections_refused_total", "reason" => reason).increment(1);
}

pub fn credential_revoked() {
    metrics::counter!("ferrite_mqtt_connections_revoked_total").increment(1);
}

pub fn message_received() {
    metrics::counter!("ferrite_mqtt_messages_received_total").increment(1);
}

pub fn protocol_error() {
    metrics::counter!("ferrite_mqtt_protocol_errors_total").increment(1);
}

/// Counts messages appended to the ingest log.
pub fn messages_stored(count: usize) {
    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "mqtt")
        .increment(count as u64);
}

/// Counts PUBLISHes that were not stored. `reason` is a
/// `DecodeError::reason()` label or one of `not_authorized`,
/// `overloaded`, `unavailable`, `retained_limit`, `invalid_command`,
/// `rate_limited`, `topic_length`, `topic_levels`.
pub fn messages_rejected(reason: &'static str, count: usize) {
    metrics::counter!("ferrite_ingest_rejected_total", "protocol" => "mqtt", "reason" => reason)
        .increment(count as u64);
}

/// Counts PUBLISHes to non-telemetry topics, which go to subscribers only.
pub fn messages_routed(count: usize) {
    metrics::counter!("ferrite_mqtt_messages_routed_total").increment(count as u64);
}

/// Counts messages for subscribers that were dropped. `reason` is one of
/// `queue_full` (the connection's outgoing queue), `offline_queue_full`
/// (oldest message of an offline session), `retained_queue_full`
/// (retained messages for a new subscription beyond
/// `mqtt.max_queued_messages`), `too_large_for_client`,
/// `expired` (MQTT 5 Message Expiry Interval), `live_bus_lagged` (events
/// for applications lost behind the live bus).
pub fn deliveries_dropped(reason: &'static str, count: usize) {
    metrics::counter!("ferrite_mqtt_deliveries_dropped_total", "reason" => reason)
        .increment(count as u64);
}

pub use crate::warn_limit::WarnLimiter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limiter_counts_suppressed_repeats() {
        let mut limiter = WarnLimiter::default();
        let start = Instant::now();
        assert_eq!(limiter.allow(start), Some(0));
        assert_eq!(limiter.allow(start + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(start + Duration::from_secs(2)), None);
        assert_eq!(limiter.allow(start + WARN_INTERVAL), Some(2));
        assert_eq!(limiter.allow(start + WARN_INTERVAL), None);
    }
}
