//! Application clients: dashboards, backends and integrations that connect
//! with an API key or a user's email and password, and see the devices of
//! their tenant.
//!
//! ## Topic tree
//! Every topic of an application is relative to its tenant: two tenants
//! may use the same topic names and never see each other's messages.
//!
//! | topic | direction | payload |
//! |---|---|---|
//! | `devices/{device id}/telemetry` | to the application | processed telemetry, the live stream's `telemetry` message |
//! | `devices/{device id}/attributes` | to the application | what the device publishes on `v1/devices/me/attributes`, unchanged |
//! | `alarms/{device id}/{rule}` | to the application | an alarm change, the live stream's `alarm` message |
//! | `devices/{device id}/commands` | from the application | `{"method", "params", "timeout_ms"}`, as `POST /api/v1/devices/{id}/commands` |
//! | `apps/...` | both | free topics of the tenant's applications, and command responses |
//!
//! Subscriptions may use `+` and `#` anywhere the MQTT rules allow; a
//! filter that begins with `$` matches nothing here and is rejected.
//! Shared subscriptions `$share/{ShareName}/{filter}` work: SUBSCRIBE
//! (`outbound.rs`) strips the prefix, checks the inner filter here, and the
//! group lives in the tenant's scope, so it only ever contains
//! applications of that tenant.
//!
//! ## Authorization
//! A viewer may only subscribe. Publishing (commands and `apps/` topics)
//! and will messages need the operator or admin role.
//!
//! ## Commands
//! A command goes to the device like one of the REST API, on
//! `v1/devices/me/rpc/request/{request id}`. With an MQTT 5 Response Topic
//! (which must lie under `apps/`) the server waits for the device's
//! response and publishes `{"request_id", "response"}`, or
//! `{"request_id", "error"}` when the device does not respond in time, to
//! that topic with the request's Correlation Data. Without one the command
//! is sent and not followed up, and an offline persistent session of the
//! device queues it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::{PropertyId, PropertyValue, ProtocolVersion, QoS, ReasonCode};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::Shared;
use super::connection::{CloseCause, Connection};
use super::events;
use super::rpc::{PendingResponse, RpcSendError};
use super::session::{MessageProperties, Owner, RoutedMessage};
use super::topics::{AuthorizedFilter, FilterRejection, is_valid_filter, is_valid_topic_name};
use crate::auth::{DeviceIdentity, Principal};
use crate::ids::{DeviceId, TenantId};
use crate::live::LiveEvent;
use crate::metadata::Role;

/// First level of the topics that applications of a tenant share.
pub const APPS_PREFIX: &str = "apps/";
/// Last level of the topic on which an application sends a command.
const COMMANDS_LEVEL: &str = "commands";
/// Wait for a device's response when a command gives no `timeout_ms`.
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Limits of `timeout_ms`, in milliseconds, as in the REST API.
const MIN_COMMAND_TIMEOUT_MS: u64 = 100;
const MAX_COMMAND_TIMEOUT_MS: u64 = 60_000;

/// Reason string of PUBACK 0x87 for a viewer's publish.
const VIEWER_PUBLISH_REASON: &str =
    "a viewer may only subscribe; publishing needs the operator or admin role";
/// Reason string of PUBACK 0x87 for a topic outside the application tree.
const APP_TOPIC_REASON: &str =
    "applications publish only to devices/{device id}/commands and apps/...";

/// The connected client: a device or an application.
#[derive(Debug, Clone)]
pub enum Client {
    Device(DeviceIdentity),
    Application(Principal),
}

impl Client {
    pub fn device(&self) -> Option<&DeviceIdentity> {
        match self {
            Client::Device(identity) => Some(identity),
            Client::Application(_) => None,
        }
    }

    /// Returns the owner of this client's session.
    pub fn owner(&self) -> Owner {
        match self {
            Client::Device(identity) => Owner::Device {
                device_id: identity.device_id,
                tenant_id: identity.tenant_id,
            },
            Client::Application(principal) => Owner::Application {
                tenant_id: principal.tenant_id,
            },
        }
    }
}

/// Target of a PUBLISH topic from an application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppPublishTarget {
    /// `devices/{device id}/commands`.
    Command { device_id: DeviceId },
    /// A topic under `apps/`.
    Shared,
    /// Any other topic.
    Forbidden,
}

/// Classifies a valid PUBLISH topic name sent by an application.
pub fn classify_app_publish(topic: &str) -> AppPublishTarget {
    if topic.starts_with(APPS_PREFIX) && topic.len() > APPS_PREFIX.len() {
        return AppPublishTarget::Shared;
    }
    let mut levels = topic.split('/');
    let command = (
        levels.next(),
        levels.next().and_then(|id| id.parse::<DeviceId>().ok()),
        levels.next(),
        levels.next(),
    );
    match command {
        (Some("devices"), Some(device_id), Some(COMMANDS_LEVEL), None) => {
            AppPublishTarget::Command { device_id }
        }
        _ => AppPublishTarget::Forbidden,
    }
}

/// Checks a SUBSCRIBE filter of an application, or the filter inside a
/// shared subscription. The whole filter is matched against topics of the
/// tenant's tree, so `prefix_len` is 0.
pub fn authorize_app_filter(filter: &str) -> Result<AuthorizedFilter, FilterRejection> {
    // Reached only by a shared subscription nested in another, such as
    // `$share/a/$share/b/x`, because SUBSCRIBE strips the outer prefix.
    if filter.starts_with("$share/") {
        return Err(FilterRejection::Shared);
    }
    if !is_valid_filter(filter) {
        return Err(FilterRejection::Invalid);
    }
    if filter.starts_with('$') {
        return Err(FilterRejection::NotAuthorized);
    }
    Ok(AuthorizedFilter {
        prefix_len: 0,
        suffix_filter: filter.to_owned(),
    })
}

/// Topic of a device's processed telemetry in the application tree.
pub fn telemetry_topic(device_id: DeviceId) -> String {
    format!("devices/{device_id}/telemetry")
}

/// Topic of a device's attribute updates in the application tree.
pub fn attributes_topic(device_id: DeviceId) -> String {
    format!("devices/{device_id}/attributes")
}

/// Topic of an alarm change in the application tree. Characters that a
/// topic level may not contain (`/`, `+`, `#`, U+0000) are replaced by `_`
/// in the rule name.
pub fn alarm_topic(device_id: DeviceId, rule: &str) -> String {
    let rule: String = rule
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("alarms/{device_id}/{rule}")
}

/// Returns the MQTT 5 Response Information for an application that
/// requests it: a topic prefix under `apps/` that only this client id uses by
/// convention. Characters that a topic level may not contain are
/// replaced by `_` in the client id.
pub fn response_information(client_id: &str) -> String {
    let level: String = client_id
        .chars()
        .map(|c| {
            if matches!(c, '/' | '+' | '#' | '\0') {
                '_'
            } else {
                c
            }
        })
        .collect();
    format!("{APPS_PREFIX}responses/{level}/")
}

/// Returns the MQTT 5 properties of `publish` that are forwarded to
/// subscribers, or `None` when it has none of them.
pub fn forwarded_properties(publish: &PublishPacket) -> Option<Arc<MessageProperties>> {
    let properties = &publish.properties;
    let mut forwarded = MessageProperties {
        payload_is_utf8: matches!(
            properties.get(PropertyId::PayloadFormatIndicator),
            Some(PropertyValue::Byte(1))
        ),
        response_topic: match properties.get(PropertyId::ResponseTopic) {
            Some(PropertyValue::Utf8String(topic)) => Some(topic.clone()),
            _ => None,
        },
        correlation_data: match properties.get(PropertyId::CorrelationData) {
            Some(PropertyValue::BinaryData(data)) => Some(data.clone()),
            _ => None,
        },
        content_type: properties.get_content_type(),
        user_properties: Vec::new(),
    };
    if let Some(pairs) = properties.get_all(PropertyId::UserProperty) {
        for pair in pairs {
            if let PropertyValue::Utf8StringPair(key, value) = pair {
                forwarded.user_properties.push((key.clone(), value.clone()));
            }
        }
    }
    (forwarded != MessageProperties::default()).then(|| Arc::new(forwarded))
}

/// Returns the message of `publish` as it is routed: payload, QoS, RETAIN,
/// forwarded properties and the expiry from the Message Expiry Interval.
pub fn routed_message(publish: &PublishPacket) -> RoutedMessage {
    RoutedMessage {
        payload: publish.payload.clone(),
        qos: publish.qos,
        retain: publish.retain,
        properties: forwarded_properties(publish),
        expires_at: publish
            .properties
            .get_message_expiry_interval()
            .map(|seconds| Instant::now() + Duration::from_secs(u64::from(seconds))),
    }
}

/// Body of a command from an application.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    method: String,
    #[serde(default = "empty_object")]
    params: serde_json::Value,
    timeout_ms: Option<u64>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// Parses and checks a command body; the error is the reason string.
fn parse_command(payload: &[u8]) -> Result<(CommandRequest, Duration), String> {
    let request: CommandRequest = serde_json::from_slice(payload).map_err(|error| {
        format!(
            "a command must be a JSON object with \"method\", and optionally \"params\" and \"timeout_ms\": {error}"
        )
    })?;
    crate::actions::validate_method(&request.method)?;
    crate::actions::validate_params(&request.params)?;
    let timeout = match request.timeout_ms {
        None => DEFAULT_COMMAND_TIMEOUT,
        Some(ms) if (MIN_COMMAND_TIMEOUT_MS..=MAX_COMMAND_TIMEOUT_MS).contains(&ms) => {
            Duration::from_millis(ms)
        }
        Some(ms) => {
            return Err(format!(
                "timeout_ms {ms} is out of range: give {MIN_COMMAND_TIMEOUT_MS} to {MAX_COMMAND_TIMEOUT_MS}"
            ));
        }
    };
    Ok((request, timeout))
}

/// Outcome of an application's PUBLISH decided on receipt.
struct Decision {
    reason: ReasonCode,
    reason_string: Option<String>,
}

impl Decision {
    fn success() -> Self {
        Self {
            reason: ReasonCode::Success,
            reason_string: None,
        }
    }

    fn failure(reason: ReasonCode, reason_string: impl Into<String>) -> Self {
        Self {
            reason,
            reason_string: Some(reason_string.into()),
        }
    }
}

impl Connection {
    /// Handles a PUBLISH from an application: a command to a device or a
    /// message on a shared `apps/` topic. Nothing is stored in the ingest
    /// log, so the acknowledgement is decided at once.
    pub fn on_application_publish(
        &mut self,
        publish: &PublishPacket,
        packet_id: u16,
    ) -> Result<(), CloseCause> {
        let Some(principal) = self.client_principal() else {
            return Ok(());
        };
        let target = classify_app_publish(&publish.topic_name);
        let decision = if principal.role < Role::Operator {
            Decision::failure(ReasonCode::NotAuthorized, VIEWER_PUBLISH_REASON)
        } else {
            match target {
                AppPublishTarget::Forbidden => {
                    Decision::failure(ReasonCode::NotAuthorized, APP_TOPIC_REASON)
                }
                AppPublishTarget::Shared => self.route_app_topic(publish, principal.tenant_id),
                AppPublishTarget::Command { device_id } => {
                    self.send_command(publish, principal.tenant_id, device_id)?
                }
            }
        };

        if decision.reason == ReasonCode::NotAuthorized {
            events::messages_rejected("not_authorized", 1);
            if let Some(suppressed) = self
                .warnings
                .publish_rejected
                .allow(std::time::Instant::now())
            {
                tracing::warn!(
                    topic = %publish.topic_name,
                    role = %principal.role,
                    suppressed,
                    "rejected an MQTT publish of an application"
                );
            }
            if self.version == ProtocolVersion::V311 {
                return Err(CloseCause::PublishNotAuthorized);
            }
        }
        let (reason, reason_string) = match self.version {
            ProtocolVersion::V5 => (decision.reason, decision.reason_string),
            // MQTT 3.1.1 has no negative PUBACK: the message is dropped.
            ProtocolVersion::V311 => (ReasonCode::Success, None),
        };
        self.decide(packet_id, publish.qos, reason, reason_string);
        Ok(())
    }

    fn client_principal(&self) -> Option<Principal> {
        match &self.client {
            Client::Application(principal) => Some(principal.clone()),
            Client::Device(_) => None,
        }
    }

    /// Routes a message on an `apps/` topic to the tenant's applications.
    fn route_app_topic(&mut self, publish: &PublishPacket, tenant_id: TenantId) -> Decision {
        let delivered = self.shared.router.route_to_applications(
            tenant_id,
            &publish.topic_name,
            &routed_message(publish),
            Some(&self.client_id),
        );
        events::messages_routed(1);
        self.apply_retain(publish);
        // A retained message is kept for later subscribers, so it is not
        // "no matching subscribers".
        if delivered == 0 && !publish.retain {
            Decision::failure(
                ReasonCode::NoMatchingSubscribers,
                "no application of this tenant subscribes to this topic",
            )
        } else {
            Decision::success()
        }
    }

    /// Sends a command to a device of the tenant. With a Response Topic,
    /// a task waits for the response and publishes it there.
    fn send_command(
        &mut self,
        publish: &PublishPacket,
        tenant_id: TenantId,
        device_id: DeviceId,
    ) -> Result<Decision, CloseCause> {
        let (request, timeout) = match parse_command(&publish.payload) {
            Ok(parsed) => parsed,
            Err(message) => {
                events::messages_rejected("invalid_command", 1);
                return Ok(Decision::failure(ReasonCode::PayloadFormatInvalid, message));
            }
        };
        let properties = forwarded_properties(publish);
        let response_topic = properties
            .as_ref()
            .and_then(|properties| properties.response_topic.clone());
        if let Some(topic) = &response_topic {
            // [MQTT-3.3.2-14]: the Response Topic is a topic name.
            if !is_valid_topic_name(topic) {
                return Err(CloseCause::protocol(
                    ReasonCode::ProtocolError,
                    format!("invalid Response Topic {topic:?}"),
                ));
            }
            if classify_app_publish(topic) != AppPublishTarget::Shared {
                return Ok(Decision::failure(
                    ReasonCode::NotAuthorized,
                    format!("the Response Topic {topic:?} must begin with {APPS_PREFIX}"),
                ));
            }
        }

        // A device of another tenant reads as not connected, so that an
        // application learns nothing about other tenants.
        let router = &self.shared.router;
        if !router.is_device_connected_in(device_id, tenant_id) {
            return Ok(Decision::failure(
                ReasonCode::ImplementationSpecificError,
                format!(
                    "device {device_id} is not connected over MQTT and does not observe rpc over CoAP; commands reach only connected devices, so retry when it is online"
                ),
            ));
        }
        let Some(response_topic) = response_topic else {
            return Ok(
                match router.send_rpc_request(device_id, &request.method, &request.params) {
                    Ok(request_id) => {
                        tracing::debug!(%device_id, request_id, method = %request.method, "sent a command from an application");
                        Decision::success()
                    }
                    Err(error) => command_not_sent(device_id, error),
                },
            );
        };
        let pending = match router.call_device(device_id, &request.method, &request.params) {
            Ok(pending) => pending,
            Err(error) => return Ok(command_not_sent(device_id, error)),
        };
        tracing::debug!(%device_id, request_id = pending.request_id(), method = %request.method, "sent a command from an application; waiting for the response");

        let response = CommandResponse {
            tenant_id,
            topic: response_topic,
            correlation_data: properties.and_then(|properties| properties.correlation_data.clone()),
            qos: publish.qos,
            timeout,
        };
        spawn_response_wait(self.shared.clone(), pending, response);
        Ok(Decision::success())
    }
}

fn command_not_sent(device_id: DeviceId, error: RpcSendError) -> Decision {
    let message = match error {
        RpcSendError::NotConnected => format!(
            "device {device_id} is not connected over MQTT and does not observe rpc over CoAP; commands reach only connected devices, so retry when it is online"
        ),
        RpcSendError::NotSubscribed => format!(
            "device {device_id} is connected but not subscribed to v1/devices/me/rpc/request/+; its firmware must subscribe to receive commands"
        ),
    };
    Decision::failure(ReasonCode::ImplementationSpecificError, message)
}

/// Destination, QoS and timeout of the response to a command.
struct CommandResponse {
    tenant_id: TenantId,
    topic: String,
    correlation_data: Option<Bytes>,
    qos: QoS,
    timeout: Duration,
}

/// Waits for the device's response to a command and publishes it, or a
/// timeout error, on the Response Topic. Stops at server shutdown.
fn spawn_response_wait(shared: Arc<Shared>, pending: PendingResponse, response: CommandResponse) {
    let task_shared = shared.clone();
    let task = async move {
        let request_id = pending.request_id();
        let received = tokio::select! {
            received = pending.wait(response.timeout) => received,
            () = task_shared.shutdown.cancelled() => return,
        };
        let body = match received {
            // A response that is not JSON is forwarded as a string.
            Some(bytes) => {
                let value = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned().into());
                serde_json::json!({"request_id": request_id, "response": value})
            }
            None => serde_json::json!({
                "request_id": request_id,
                "error": format!(
                    "the device did not respond within {} ms",
                    response.timeout.as_millis()
                ),
            }),
        };
        let properties = MessageProperties {
            payload_is_utf8: true,
            content_type: Some("application/json".to_owned()),
            correlation_data: response.correlation_data,
            ..MessageProperties::default()
        };
        let message = RoutedMessage {
            properties: Some(Arc::new(properties)),
            ..RoutedMessage::plain(Bytes::from(body.to_string()), response.qos)
        };
        task_shared.router.route_to_applications(
            response.tenant_id,
            &response.topic,
            &message,
            None,
        );
    };
    use tracing::Instrument;
    shared
        .tasks
        .spawn(task.instrument(tracing::Span::current()));
}

/// Forwards processed telemetry and alarm changes from the live bus to the
/// application sessions of their tenant, until the server stops.
///
/// NOTE: this subscription keeps `LiveBus::has_subscribers` true, so the
/// pipeline builds live events even when no stream or application reads
/// them.
pub async fn run_live_bridge(shared: Arc<Shared>) {
    let mut receiver = shared.context.live.subscribe();
    loop {
        let event = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            event = receiver.recv() => event,
        };
        match event {
            Ok(event) => forward_live_event(&shared, &event),
            Err(RecvError::Lagged(missed)) => {
                events::deliveries_dropped(
                    "live_bus_lagged",
                    usize::try_from(missed).unwrap_or(usize::MAX),
                );
                tracing::warn!(
                    missed,
                    "the MQTT bridge fell behind the live bus and lost events for applications"
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn forward_live_event(shared: &Shared, event: &LiveEvent) {
    let tenant_id = event.tenant_id();
    if !shared.router.has_application_sessions(tenant_id) {
        return;
    }
    let (topic, payload) = match event {
        LiveEvent::Telemetry(telemetry) => {
            let points: Vec<_> = telemetry.points.iter().collect();
            (
                telemetry_topic(telemetry.device_id),
                crate::api::live::telemetry_message(telemetry, &points),
            )
        }
        LiveEvent::Alarm(alarm) => {
            let rule = alarm.alarm["rule"].as_str().unwrap_or("unknown");
            (
                alarm_topic(alarm.device_id, rule),
                crate::api::live::alarm_message(alarm),
            )
        }
    };
    let properties = Arc::new(MessageProperties {
        payload_is_utf8: true,
        content_type: Some("application/json".to_owned()),
        ..MessageProperties::default()
    });
    let message = RoutedMessage {
        properties: Some(properties),
        ..RoutedMessage::plain(Bytes::from(payload), QoS::AtLeastOnce)
    };
    shared
        .router
        .route_to_applications(tenant_id, &topic, &message, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICE: &str = "0191e0a4-5c3b-7f1e-9a2b-3c4d5e6f7a8b";

    #[test]
    fn application_publish_topics_are_classified() {
        let device: DeviceId = DEVICE.parse().expect("valid id");
        let cases = [
            (
                format!("devices/{DEVICE}/commands"),
                AppPublishTarget::Command { device_id: device },
            ),
            ("apps/a".to_owned(), AppPublishTarget::Shared),
            ("apps/responses/x/1".to_owned(), AppPublishTarget::Shared),
            ("apps/".to_owned(), AppPublishTarget::Forbidden),
            (
                format!("devices/{DEVICE}/telemetry"),
                AppPublishTarget::Forbidden,
            ),
            (
                format!("devices/{DEVICE}/commands/x"),
                AppPublishTarget::Forbidden,
            ),
            (
                "devices/not-an-id/commands".to_owned(),
                AppPublishTarget::Forbidden,
            ),
            (
                "v1/devices/me/telemetry".to_owned(),
                AppPublishTarget::Forbidden,
            ),
            ("alarms/x/y".to_owned(), AppPublishTarget::Forbidden),
        ];
        for (topic, expected) in cases {
            assert_eq!(classify_app_publish(&topic), expected, "topic {topic:?}");
        }
    }

    #[test]
    fn application_filters_are_authorized() {
        for filter in ["#", "devices/+/telemetry", "alarms/#", "apps/x/+"] {
            let authorized = authorize_app_filter(filter)
                .unwrap_or_else(|rejection| panic!("filter {filter:?} rejected: {rejection:?}"));
            assert_eq!(authorized.prefix_len, 0);
            assert_eq!(authorized.suffix_filter, filter);
        }
        let rejected = [
            ("$SYS/#", FilterRejection::NotAuthorized),
            // The inner filter of `$share/a/$share/g/devices/#`.
            ("$share/g/devices/#", FilterRejection::Shared),
            ("devices/#/x", FilterRejection::Invalid),
            ("", FilterRejection::Invalid),
        ];
        for (filter, expected) in rejected {
            assert_eq!(
                authorize_app_filter(filter),
                Err(expected),
                "filter {filter:?}"
            );
        }
    }

    #[test]
    fn alarm_topic_replaces_wildcards_in_rule_names() {
        let device: DeviceId = DEVICE.parse().expect("valid id");
        assert_eq!(
            alarm_topic(device, "hot/cold+#"),
            format!("alarms/{DEVICE}/hot_cold__")
        );
    }

    #[test]
    fn command_bodies_are_checked() {
        let (request, timeout) =
            parse_command(br#"{"method":"reboot","params":{"delay":1},"timeout_ms":500}"#)
                .expect("valid command");
        assert_eq!(request.method, "reboot");
        assert_eq!(timeout, Duration::from_millis(500));

        let (_, timeout) = parse_command(br#"{"method":"reboot"}"#).expect("valid command");
        assert_eq!(timeout, DEFAULT_COMMAND_TIMEOUT);

        for bad in [
            &br#"{"params":{}}"#[..],
            br#"{"method":"x","extra":1}"#,
            br#"{"method":"x","timeout_ms":5}"#,
            b"not json",
        ] {
            assert!(
                parse_command(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
