//! Messages from the client: PUBLISH, the QoS 2 release (PUBREL) and the
//! will message, and their acknowledgements.
//!
//! A PUBLISH goes through these steps ([`Connection::on_publish`]):
//! 1. resolve an MQTT 5 topic alias and check the packet (size, topic
//!    name);
//! 2. acknowledge a resent QoS 2 PUBLISH whose packet id is still kept
//!    like the first one, without storing it again, and check that a
//!    retained PUBLISH fits the tenant's limits;
//! 3. authorize the topic (`topics.rs`) and
//!    - telemetry: check the payload, add it to the current group;
//!    - another topic of the device: route it to the device's subscribers
//!      now; it is not stored;
//!    - outside the namespace: refuse.
//!
//! The packets taken from one read form a [`PendingGroup`]: its telemetry is
//! one append to the ingest log, and its acknowledgements wait for that
//! append. Groups complete in the order they were made, so acknowledgements
//! go out in the order the PUBLISHes arrived. Telemetry reaches subscribers
//! only after it is stored, and a retained telemetry PUBLISH replaces the
//! retained message only after it is stored: a failed append leaves the
//! previous one in place.
//!
//! | case | MQTT 5 | MQTT 3.1.1 |
//! |---|---|---|
//! | telemetry stored | PUBACK/PUBREC 0x00 | PUBACK/PUBREC |
//! | payload invalid | 0x99 with the error as reason string | PUBACK/PUBREC, dropped |
//! | own non-telemetry topic | routed: 0x00, or 0x10 with no subscriber | PUBACK/PUBREC, routed |
//! | outside the namespace | 0x87 (QoS 0: dropped) | connection closed |
//! | log overloaded | 0x97 | closed without acknowledgement |
//! | log failed or stopping | 0x80 (stopping: then DISCONNECT 0x8B) | closed without acknowledgement |
//! | retained, over the tenant's limits | 0x97, dropped | handled without RETAIN |
//! | topic over `limits.max_topic_length` or `max_topic_levels` | 0x90, dropped | connection closed |
//! | over a message rate limit | 0x97 with the limit as reason string, dropped; DISCONNECT 0x96 after `limits.mqtt_rate_limited_before_disconnect` in a row | reading pauses until the rate allows it |
//!
//! Applications (`application.rs`) take their own path after step 2.

use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use bytes::Bytes;
use mqtt5_protocol::packet::puback::PubAckPacket;
use mqtt5_protocol::packet::pubcomp::PubCompPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrec::PubRecPacket;
use mqtt5_protocol::{PropertyId, PropertyValue, ProtocolVersion, QoS, ReasonCode};

use super::Shared;
use super::application::{self, AppPublishTarget, Client, classify_app_publish, routed_message};
use super::codec;
use super::connection::{CloseCause, Connection};
use super::events;
use super::handshake::Will;
use super::retained::{self, RetainScope, RetainedMessage};
use super::session::{ClientId, RoutedMessage};
use super::topics::{self, PublishTarget, classify_publish, is_valid_topic_name};
use crate::auth::DeviceIdentity;
use crate::decode::check_payload;
use crate::ingest::{ContentType, Envelope, IngestError, Protocol};
use crate::limits;
use crate::metadata::mqtt_retained::RetainedChange;

/// The packet type of PUBLISH in the first byte of its fixed header.
const PUBLISH_PACKET_TYPE: u8 = 3;
/// Reason string of PUBACK 0x10 for a message that no subscriber took.
const NOT_STORED_REASON: &str = "no subscriber for this topic; only telemetry topics are stored";
/// Reason string of PUBACK 0x87.
const NOT_AUTHORIZED_REASON: &str =
    "a device may publish only under v1/devices/me/ or devices/{its id}/";

/// Progress of an inbound QoS 2 message between PUBLISH and PUBREL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos2State {
    /// The append is in flight.
    Pending,
    /// Stored, or accepted without storing (MQTT 3.1.1 has no negative
    /// PUBREC), and acknowledged with PUBREC.
    Stored,
}

/// One entry in the ordered stream of acknowledgements.
#[derive(Debug)]
pub enum AckItem {
    /// Acknowledged when the group's append completes: success if stored.
    AfterAppend { packet_id: u16, qos: QoS },
    /// Acknowledged with a reason decided on receipt.
    Decided {
        packet_id: u16,
        qos: QoS,
        reason: ReasonCode,
        reason_string: Option<String>,
    },
    /// A QoS 2 PUBLISH sent again before PUBREL: acknowledged like the
    /// first.
    Qos2Duplicate { packet_id: u16 },
    /// PUBREL, acknowledged with PUBCOMP.
    Release { packet_id: u16 },
}

/// Telemetry to send to subscribers once it is stored.
#[derive(Debug)]
pub struct StoredRoute {
    message: RoutedMessage,
}

/// A retained telemetry change that takes effect only if its append
/// succeeds, so that a retained message is always durable telemetry.
#[derive(Debug)]
pub struct RetainAfterAppend {
    scope: RetainScope,
    topic: String,
    /// `None` deletes the retained message.
    message: Option<RetainedMessage>,
}

/// The packets of one read whose acknowledgements wait for the same
/// append.
#[derive(Debug, Default)]
pub struct PendingGroup {
    pub items: Vec<AckItem>,
    pub envelopes: Vec<Envelope>,
    pub routes: Vec<StoredRoute>,
    /// Changes to retained messages already applied in memory, written to
    /// SQLite with the append.
    pub retained: Vec<RetainedChange>,
    /// Retained telemetry, applied to memory and SQLite only after the
    /// append succeeded.
    pub retained_telemetry: Vec<RetainAfterAppend>,
    /// PUBLISHes in the group, for the in-flight limit.
    pub messages: usize,
}

/// A group after its append.
pub struct GroupDone {
    items: Vec<AckItem>,
    routes: Vec<StoredRoute>,
    stored: usize,
    messages: usize,
    result: Result<(), IngestError>,
}

pub type GroupFuture = Pin<Box<dyn Future<Output = GroupDone> + Send>>;

/// Server time in nanoseconds since the Unix epoch.
fn now_ns() -> i64 {
    chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX - 1)
}

impl Connection {
    /// Handles a PUBLISH from the client.
    pub fn on_publish(&mut self, mut publish: PublishPacket) -> Result<(), CloseCause> {
        events::message_received();
        // MQTT 3.1.1 took the token before the packet was read.
        self.publish_permitted = false;
        self.resolve_topic_alias(&mut publish)?;
        self.check_publish(&publish)?;
        let packet_id = publish.packet_id.unwrap_or(0);

        if publish.qos == QoS::ExactlyOnce && self.qos2.contains_key(&packet_id) {
            self.group.items.push(AckItem::Qos2Duplicate { packet_id });
            self.group.messages += 1;
            return Ok(());
        }

        if self.rejected_by_topic_limits(&publish, packet_id)? {
            return Ok(());
        }
        if self.rejected_by_rate_limit(&publish, packet_id)? {
            return Ok(());
        }

        if self.rejected_by_retain_limit(&mut publish, packet_id) {
            return Ok(());
        }

        let device_id = match &self.client {
            Client::Device(identity) => identity.device_id,
            Client::Application(_) => return self.on_application_publish(&publish, packet_id),
        };
        match classify_publish(&publish.topic_name, device_id) {
            PublishTarget::Telemetry => {
                self.stage_telemetry(publish, packet_id);
                Ok(())
            }
            PublishTarget::OwnTopic { suffix } => {
                let suffix = suffix.to_owned();
                self.route_own_topic(&publish, &suffix, packet_id);
                Ok(())
            }
            PublishTarget::Forbidden => self.reject_publish(&publish, packet_id),
        }
    }

    /// Step 2, limits: a topic name over `limits.max_topic_length` or
    /// `limits.max_topic_levels` gets PUBACK/PUBREC 0x90 on MQTT 5 (QoS 0:
    /// dropped) and closes an MQTT 3.1.1 connection, which has no negative
    /// acknowledgement. Returns true when the PUBLISH was rejected.
    fn rejected_by_topic_limits(
        &mut self,
        publish: &PublishPacket,
        packet_id: u16,
    ) -> Result<bool, CloseCause> {
        let config = self.shared.context.limits.config();
        let Some((limit, message)) = limits::check_topic(config, &publish.topic_name, "topic name")
        else {
            return Ok(false);
        };
        limits::count_resource_limited("mqtt", limit);
        events::messages_rejected(limit, 1);
        match self.version {
            ProtocolVersion::V311 => {
                Err(CloseCause::protocol(ReasonCode::TopicNameInvalid, message))
            }
            ProtocolVersion::V5 => {
                self.decide(
                    packet_id,
                    publish.qos,
                    ReasonCode::TopicNameInvalid,
                    Some(message),
                );
                Ok(true)
            }
        }
    }

    /// Step 2, message rate (MQTT 5): a PUBLISH over a rate limit is not
    /// stored and gets PUBACK/PUBREC 0x97, Quota exceeded, with the limit
    /// as reason string; QoS 0 is dropped. 0x96, Message rate too high, is
    /// defined for DISCONNECT only (MQTT 5.0 sections 3.4.2.1 and 3.5.2.1
    /// list the PUBACK and PUBREC codes), and paho-mqtt 2.2 fails on it in
    /// a PUBACK. After `limits.mqtt_rate_limited_before_disconnect`
    /// rejections in a row the connection closes with DISCONNECT 0x96.
    /// MQTT 3.1.1 is limited before the packet is read
    /// ([`Connection::permit_v311_publish`]). Returns true when the
    /// PUBLISH was rejected.
    fn rejected_by_rate_limit(
        &mut self,
        publish: &PublishPacket,
        packet_id: u16,
    ) -> Result<bool, CloseCause> {
        if self.version != ProtocolVersion::V5 {
            return Ok(false);
        }
        let limiter = &self.shared.context.limits;
        let Err(limited) = limiter.check_message(&self.sender()) else {
            self.rate_limited_in_row = 0;
            return Ok(false);
        };
        limits::count_rate_limited("mqtt", &limited);
        events::messages_rejected("rate_limited", 1);
        self.rate_limited_in_row = self.rate_limited_in_row.saturating_add(1);
        if let Some(suppressed) = self.warnings.rate_limited.allow(Instant::now()) {
            tracing::warn!(
                limit = limited.limit.label(),
                suppressed,
                "rejected MQTT messages over a rate limit"
            );
        }
        let disconnect_after = limiter.config().mqtt_rate_limited_before_disconnect;
        if disconnect_after > 0 && self.rate_limited_in_row >= disconnect_after {
            return Err(CloseCause::RateLimited(limited));
        }
        self.decide(
            packet_id,
            publish.qos,
            ReasonCode::QuotaExceeded,
            Some(limited.to_string()),
        );
        Ok(true)
    }

    /// Takes the token of the next PUBLISH of an MQTT 3.1.1 client before
    /// it is read. Over a limit, reading pauses until the bucket has a
    /// token again, and the packet waits in the buffer: MQTT 3.1.1 has no
    /// negative acknowledgement, and a dropped message must not be
    /// acknowledged. Returns false while reading has to pause.
    pub(super) fn permit_v311_publish(&mut self) -> bool {
        if self.version != ProtocolVersion::V311
            || self.publish_permitted
            || codec::peek_packet_type(&self.read_buffer) != Some(PUBLISH_PACKET_TYPE)
        {
            return true;
        }
        match self.shared.context.limits.check_message(&self.sender()) {
            Ok(()) => {
                self.publish_permitted = true;
                true
            }
            Err(limited) => {
                limits::count_rate_limited("mqtt", &limited);
                if let Some(suppressed) = self.warnings.rate_limited.allow(Instant::now()) {
                    tracing::warn!(
                        limit = limited.limit.label(),
                        suppressed,
                        "delaying an MQTT 3.1.1 client over a rate limit"
                    );
                }
                self.rate_pause = Some(Instant::now() + limited.retry_after);
                false
            }
        }
    }

    /// Returns who publishes on this connection, for the rate limits.
    fn sender(&self) -> limits::Sender {
        let (tenant, device) = match &self.client {
            Client::Device(identity) => (identity.tenant_id, Some(identity.device_id)),
            Client::Application(principal) => (principal.tenant_id, None),
        };
        limits::Sender {
            tenant,
            device,
            address: self.peer,
        }
    }

    /// Step 1: checks what the codec leaves to the server.
    fn check_publish(&self, publish: &PublishPacket) -> Result<(), CloseCause> {
        let max_payload = self.shared.context.config.max_payload_bytes;
        if publish.payload.len() > max_payload {
            return Err(CloseCause::protocol(
                ReasonCode::PacketTooLarge,
                format!(
                    "payload of {} bytes exceeds mqtt.max_payload_bytes ({max_payload})",
                    publish.payload.len()
                ),
            ));
        }
        if !is_valid_topic_name(&publish.topic_name) {
            return Err(CloseCause::protocol(
                ReasonCode::ProtocolError,
                format!("invalid PUBLISH topic name {:?}", publish.topic_name),
            ));
        }
        if self.version == ProtocolVersion::V5 {
            check_publish_properties(publish)?;
        }
        Ok(())
    }

    /// Applies an MQTT 5 Topic Alias: a PUBLISH with a topic name and an
    /// alias sets the alias, one with an empty topic name uses it. An alias
    /// of 0 or above the Topic Alias Maximum closes the connection with
    /// 0x94 ([MQTT-3.3.2-8], [MQTT-3.3.2-9]). An unknown alias with an
    /// empty topic name is a protocol error.
    fn resolve_topic_alias(&mut self, publish: &mut PublishPacket) -> Result<(), CloseCause> {
        if self.version != ProtocolVersion::V5 {
            return Ok(());
        }
        let Some(alias) = publish.properties.get_topic_alias() else {
            return Ok(());
        };
        if alias == 0 || alias > super::handshake::TOPIC_ALIAS_MAXIMUM {
            return Err(CloseCause::protocol(
                ReasonCode::TopicAliasInvalid,
                format!(
                    "topic alias {alias} is outside 1 to {}, the Topic Alias Maximum",
                    super::handshake::TOPIC_ALIAS_MAXIMUM
                ),
            ));
        }
        publish.properties.remove_topic_alias();
        if publish.topic_name.is_empty() {
            let Some(topic) = self.topic_aliases.get(&alias) else {
                return Err(CloseCause::protocol(
                    ReasonCode::ProtocolError,
                    format!("topic alias {alias} is not set on this connection"),
                ));
            };
            publish.topic_name.clone_from(topic);
        } else if is_valid_topic_name(&publish.topic_name) {
            self.topic_aliases.insert(alias, publish.topic_name.clone());
        }
        Ok(())
    }

    /// Step 2, retained: checks a retained PUBLISH against the tenant's
    /// limits.
    /// MQTT 5 gets PUBACK 0x97 and the message is dropped (returns true);
    /// MQTT 3.1.1 has no negative acknowledgement, so the message is
    /// handled as if it were not retained.
    fn rejected_by_retain_limit(&mut self, publish: &mut PublishPacket, packet_id: u16) -> bool {
        if !publish.retain {
            return false;
        }
        let Err(limit) = self.check_retain_limit(publish) else {
            return false;
        };
        events::messages_rejected("retained_limit", 1);
        if let Some(suppressed) = self.warnings.publish_rejected.allow(Instant::now()) {
            tracing::warn!(topic = %publish.topic_name, %limit, suppressed, "did not retain an MQTT message: the tenant's retained message limit is reached");
        }
        match self.version {
            ProtocolVersion::V5 => {
                self.decide(
                    packet_id,
                    publish.qos,
                    ReasonCode::QuotaExceeded,
                    Some(limit.to_string()),
                );
                true
            }
            ProtocolVersion::V311 => {
                publish.retain = false;
                false
            }
        }
    }

    /// Returns the scope and key of the retained message that a PUBLISH
    /// with RETAIN changes, or `None` when its topic cannot be retained
    /// (commands, topics outside the client's tree).
    fn retain_target(&self, topic: &str) -> Option<(RetainScope, String)> {
        match &self.client {
            Client::Device(identity) => {
                let suffix = match classify_publish(topic, identity.device_id) {
                    PublishTarget::Telemetry => topics::TELEMETRY_SUFFIX,
                    PublishTarget::OwnTopic { suffix } => suffix,
                    PublishTarget::Forbidden => return None,
                };
                let scope = RetainScope {
                    tenant_id: identity.tenant_id,
                    device_id: Some(identity.device_id),
                };
                Some((scope, suffix.to_owned()))
            }
            Client::Application(principal) => {
                if classify_app_publish(topic) != AppPublishTarget::Shared {
                    return None;
                }
                let scope = RetainScope {
                    tenant_id: principal.tenant_id,
                    device_id: None,
                };
                Some((scope, topic.to_owned()))
            }
        }
    }

    /// Checks that a retained PUBLISH stays within the tenant's limits. An
    /// empty payload deletes, which always fits.
    fn check_retain_limit(&self, publish: &PublishPacket) -> Result<(), retained::RetainLimit> {
        let Some(message) = retained_message(publish) else {
            return Ok(());
        };
        match self.retain_target(&publish.topic_name) {
            Some((scope, topic)) => {
                self.shared
                    .router
                    .retained()
                    .check(scope, &topic, &message, retained::now_ms())
            }
            None => Ok(()),
        }
    }

    /// Stores or deletes the retained message of an accepted PUBLISH with
    /// RETAIN: memory now, SQLite with the group's append, before the
    /// acknowledgement. An empty payload deletes ([MQTT-3.3.1-6],
    /// [MQTT-3.3.1-7]); a PUBLISH without RETAIN changes nothing
    /// ([MQTT-3.3.1-8]).
    pub(super) fn apply_retain(&mut self, publish: &PublishPacket) {
        if !publish.retain {
            return;
        }
        let Some((scope, topic)) = self.retain_target(&publish.topic_name) else {
            return;
        };
        let message = retained_message(publish);
        let applied = {
            let mut store = self.shared.router.retained();
            match &message {
                Some(message) => store.try_set(scope, &topic, message.clone(), retained::now_ms()),
                None => {
                    store.remove(scope, &topic);
                    Ok(())
                }
            }
        };
        // The early check passed, but another PUBLISH of the tenant took
        // the room since; the message is routed but not retained.
        if let Err(limit) = applied {
            events::messages_rejected("retained_limit", 1);
            if let Some(suppressed) = self.warnings.publish_rejected.allow(Instant::now()) {
                tracing::warn!(topic = %publish.topic_name, %limit, suppressed, "did not retain an MQTT message: the tenant's retained message limit is reached");
            }
            return;
        }
        self.group
            .retained
            .push(retained::change_for(scope, &topic, message.as_ref()));
    }

    /// Records the retained change of a telemetry PUBLISH for the group,
    /// to take effect after its append ([`Connection::complete_group`]).
    fn stage_retained_telemetry(&mut self, publish: &PublishPacket) {
        if !publish.retain {
            return;
        }
        let Some((scope, topic)) = self.retain_target(&publish.topic_name) else {
            return;
        };
        self.group.retained_telemetry.push(RetainAfterAppend {
            scope,
            topic,
            message: retained_message(publish),
        });
    }

    /// Step 3, telemetry: the payload must decode as the pipeline will
    /// decode it; then it joins the group's append.
    fn stage_telemetry(&mut self, publish: PublishPacket, packet_id: u16) {
        let Client::Device(identity) = &self.client else {
            return;
        };
        let (tenant_id, device_id, connect_profile) =
            (identity.tenant_id, identity.device_id, identity.profile_id);
        let context = &self.shared.context;
        let received_at_ns = now_ns();
        let declared = publish.properties.get_content_type();
        // The directory holds the device's current profile (the API updates
        // it); the identity holds the one at CONNECT.
        let profile = context
            .directory
            .cached_profile_of(device_id)
            .unwrap_or(connect_profile);
        let content_type =
            match context
                .directory
                .content_type_for(profile, declared.as_deref(), &publish.payload)
            {
                Ok(content_type) => content_type,
                Err(message) => {
                    events::messages_rejected("wrong_codec", 1);
                    let (reason, reason_string) = match self.version {
                        ProtocolVersion::V5 => (ReasonCode::PayloadFormatInvalid, Some(message)),
                        ProtocolVersion::V311 => (ReasonCode::Success, None),
                    };
                    self.decide(packet_id, publish.qos, reason, reason_string);
                    return;
                }
            };
        // Bytes for a profile's Cayenne LPP or script codec are decoded by
        // the pipeline; failures go to the device's dead-letter log.
        let checked = if content_type == ContentType::Raw {
            Ok(0)
        } else {
            check_payload(
                content_type,
                &publish.payload,
                received_at_ns,
                context.time_window(&tenant_id.to_string()),
            )
        };
        if let Err(error) = checked {
            events::messages_rejected(error.reason(), 1);
            if let Some(suppressed) = self.warnings.payload_invalid.allow(Instant::now()) {
                tracing::warn!(
                    topic = %publish.topic_name,
                    reason = error.reason(),
                    %error,
                    suppressed,
                    "rejected MQTT telemetry with an invalid payload"
                );
            }
            // MQTT 3.1.1 has no reason codes, and sending the same payload
            // again would not help, so it is acknowledged and dropped.
            let (reason, reason_string) = match self.version {
                ProtocolVersion::V5 => (ReasonCode::PayloadFormatInvalid, Some(error.to_string())),
                ProtocolVersion::V311 => (ReasonCode::Success, None),
            };
            self.decide(packet_id, publish.qos, reason, reason_string);
            return;
        }

        self.stage_retained_telemetry(&publish);
        let route = StoredRoute {
            message: routed_message(&publish),
        };
        self.group.envelopes.push(Envelope {
            tenant_id,
            device_id,
            protocol: Protocol::Mqtt,
            received_at_ns,
            content_type,
            payload: publish.payload.clone(),
            meta: Bytes::new(),
        });
        self.group.routes.push(route);
        if publish.qos != QoS::AtMostOnce {
            self.group.items.push(AckItem::AfterAppend {
                packet_id,
                qos: publish.qos,
            });
        }
        if publish.qos == QoS::ExactlyOnce {
            self.qos2.insert(packet_id, Qos2State::Pending);
        }
        self.group.messages += 1;
    }

    /// Step 3, another topic of the device's own namespace: delivered to
    /// the device's subscribers, not stored. The message is accepted, so
    /// MQTT 5 gets a success code: 0x00, or 0x10 (no matching subscribers)
    /// when no session took it.
    fn route_own_topic(&mut self, publish: &PublishPacket, suffix: &str, packet_id: u16) {
        let Some(identity) = self.client.device() else {
            return;
        };
        let message = routed_message(publish);
        let mut delivered =
            self.shared
                .router
                .route(identity.device_id, suffix, &message, Some(&self.client_id));
        if suffix == topics::ATTRIBUTES_SUFFIX {
            delivered += self.shared.router.route_to_applications(
                identity.tenant_id,
                &application::attributes_topic(identity.device_id),
                &message,
                None,
            );
        }
        events::messages_routed(1);
        self.apply_retain(publish);

        let (reason, reason_string) = match self.version {
            // A retained message is kept for later subscribers.
            ProtocolVersion::V5 if delivered == 0 && !publish.retain => (
                ReasonCode::NoMatchingSubscribers,
                Some(NOT_STORED_REASON.to_owned()),
            ),
            ProtocolVersion::V5 | ProtocolVersion::V311 => (ReasonCode::Success, None),
        };
        self.decide(packet_id, publish.qos, reason, reason_string);
    }

    /// Step 3, outside the namespace: rejected.
    fn reject_publish(
        &mut self,
        publish: &PublishPacket,
        packet_id: u16,
    ) -> Result<(), CloseCause> {
        events::messages_rejected("not_authorized", 1);
        if let Some(suppressed) = self.warnings.publish_rejected.allow(Instant::now()) {
            tracing::warn!(
                topic = %publish.topic_name,
                suppressed,
                "rejected an MQTT publish outside the device's namespace"
            );
        }

        match self.version {
            ProtocolVersion::V311 => Err(CloseCause::PublishNotAuthorized),
            ProtocolVersion::V5 => {
                self.decide(
                    packet_id,
                    publish.qos,
                    ReasonCode::NotAuthorized,
                    Some(NOT_AUTHORIZED_REASON.to_owned()),
                );
                Ok(())
            }
        }
    }

    /// Queues an acknowledgement decided on receipt. A QoS 2 PUBLISH
    /// acknowledged as accepted keeps its packet id until PUBREL, like a
    /// stored one.
    pub(super) fn decide(
        &mut self,
        packet_id: u16,
        qos: QoS,
        reason: ReasonCode,
        reason_string: Option<String>,
    ) {
        if qos == QoS::AtMostOnce {
            return;
        }
        if qos == QoS::ExactlyOnce && reason == ReasonCode::Success {
            self.qos2.insert(packet_id, Qos2State::Stored);
        }
        self.group.items.push(AckItem::Decided {
            packet_id,
            qos,
            reason,
            reason_string,
        });
        self.group.messages += 1;
    }

    /// Handles PUBREL: PUBCOMP follows, in order with the other
    /// acknowledgements.
    pub fn on_pubrel(&mut self, packet_id: u16) {
        self.group.items.push(AckItem::Release { packet_id });
    }

    /// Starts the append of the current group.
    pub fn flush_group(&mut self) {
        if self.group.items.is_empty()
            && self.group.envelopes.is_empty()
            && self.group.retained.is_empty()
            && self.group.retained_telemetry.is_empty()
        {
            return;
        }
        let group = std::mem::take(&mut self.group);
        self.pending_messages += group.messages;

        let ingest = self.shared.context.ingest.clone();
        let metadata = self.shared.context.metadata.clone();
        let shared = self.shared.clone();
        self.pending.push_back(Box::pin(async move {
            let stored = group.envelopes.len();
            let result = if group.envelopes.is_empty() {
                Ok(())
            } else {
                ingest.append(group.envelopes).await
            };
            let mut changes = group.retained;
            if result.is_ok() {
                changes.extend(apply_retained_telemetry(&shared, group.retained_telemetry));
            }
            if !changes.is_empty() {
                persist_retained(&metadata, &changes).await;
            }
            GroupDone {
                items: group.items,
                routes: group.routes,
                stored,
                messages: group.messages,
                result,
            }
        }));
    }

    /// Sends the acknowledgements of a group whose append completed. Fails when the
    /// connection has to close: an MQTT 3.1.1 append failure (no negative
    /// acknowledgement exists) or a log that is shutting down.
    pub fn complete_group(&mut self, done: GroupDone) -> Result<(), CloseCause> {
        self.pending_messages -= done.messages;
        let failure = done.result.err();

        match &failure {
            None => {
                events::messages_stored(done.stored);
                if let Some(identity) = self.client.device() {
                    for route in &done.routes {
                        self.shared.router.route(
                            identity.device_id,
                            topics::TELEMETRY_SUFFIX,
                            &route.message,
                            Some(&self.client_id),
                        );
                    }
                }
            }
            Some(error) => self.report_append_failure(error, done.stored),
        }

        if failure.is_some() && self.version == ProtocolVersion::V311 {
            self.acks_stopped = true;
        }
        for item in done.items {
            self.acknowledge(item, failure.as_ref());
        }

        match failure {
            Some(error) if self.version == ProtocolVersion::V311 => {
                Err(CloseCause::IngestFailed(error))
            }
            Some(IngestError::ShuttingDown) => {
                Err(CloseCause::IngestFailed(IngestError::ShuttingDown))
            }
            _ => Ok(()),
        }
    }

    fn report_append_failure(&mut self, error: &IngestError, messages: usize) {
        let reason = match error {
            IngestError::Overloaded => "overloaded",
            IngestError::TooLarge(_) => "too_large",
            IngestError::ShuttingDown | IngestError::Io => "unavailable",
        };
        events::messages_rejected(reason, messages);
        if let Some(suppressed) = self.warnings.append_failed.allow(Instant::now()) {
            tracing::warn!(%error, messages, suppressed, "MQTT telemetry not stored: appending to the ingest log failed");
        }
    }

    /// Sends one acknowledgement; `failure` is the error of the group's
    /// append.
    fn acknowledge(&mut self, item: AckItem, failure: Option<&IngestError>) {
        match item {
            AckItem::AfterAppend { packet_id, qos } => match failure {
                None => {
                    if qos == QoS::ExactlyOnce {
                        self.qos2.insert(packet_id, Qos2State::Stored);
                    }
                    self.write_publish_ack(packet_id, qos, ReasonCode::Success, None);
                }
                Some(error) => {
                    self.qos2.remove(&packet_id);
                    let reason = match error {
                        IngestError::Overloaded => ReasonCode::QuotaExceeded,
                        IngestError::TooLarge(_) => ReasonCode::PacketTooLarge,
                        IngestError::ShuttingDown | IngestError::Io => ReasonCode::UnspecifiedError,
                    };
                    self.write_publish_ack(packet_id, qos, reason, Some(error.to_string()));
                }
            },
            AckItem::Decided {
                packet_id,
                qos,
                reason,
                reason_string,
            } => self.write_publish_ack(packet_id, qos, reason, reason_string),
            AckItem::Qos2Duplicate { packet_id } => {
                // The first copy was acknowledged just before, and its outcome
                // applies to this copy too.
                let reason = match self.qos2.get(&packet_id) {
                    Some(Qos2State::Stored) => ReasonCode::Success,
                    _ => ReasonCode::UnspecifiedError,
                };
                self.write_publish_ack(packet_id, QoS::ExactlyOnce, reason, None);
            }
            AckItem::Release { packet_id } => {
                let found = self.qos2.get(&packet_id) == Some(&Qos2State::Stored);
                if found {
                    self.qos2.remove(&packet_id);
                }
                self.write_pubcomp(packet_id, found);
            }
        }
    }

    /// Writes PUBACK (QoS 1) or PUBREC (QoS 2). MQTT 3.1.1 has no reason
    /// codes, so an unsuccessful acknowledgement is not sent there.
    fn write_publish_ack(
        &mut self,
        packet_id: u16,
        qos: QoS,
        reason: ReasonCode,
        reason_string: Option<String>,
    ) {
        if qos == QoS::AtMostOnce || self.acks_stopped {
            return;
        }
        if self.version == ProtocolVersion::V311 {
            if reason == ReasonCode::Success {
                match qos {
                    QoS::AtLeastOnce => codec::encode(&PubAckPacket::new(packet_id), &mut self.out),
                    _ => codec::encode(&PubRecPacket::new(packet_id), &mut self.out),
                }
            }
            return;
        }

        // [MQTT-3.1.2-29]: no reason string unless the client allows it, and
        // none that would make the packet larger than the client accepts.
        let reason_string = reason_string.filter(|_| self.request_problem_information);
        let start = self.out.len();
        self.encode_ack(packet_id, qos, reason, reason_string.clone());
        if self.out.len() - start > self.client_maximum_packet_size && reason_string.is_some() {
            self.out.truncate(start);
            self.encode_ack(packet_id, qos, reason, None);
        }
    }

    fn encode_ack(
        &mut self,
        packet_id: u16,
        qos: QoS,
        reason: ReasonCode,
        reason_string: Option<String>,
    ) {
        if qos == QoS::AtLeastOnce {
            let mut ack = PubAckPacket::new_with_reason(packet_id, reason);
            if let Some(text) = reason_string {
                ack = ack.with_reason_string(text);
            }
            codec::encode(&ack, &mut self.out);
        } else {
            let mut ack = PubRecPacket::new_with_reason(packet_id, reason);
            if let Some(text) = reason_string {
                ack = ack.with_reason_string(text);
            }
            codec::encode(&ack, &mut self.out);
        }
    }

    fn write_pubcomp(&mut self, packet_id: u16, found: bool) {
        if self.acks_stopped {
            return;
        }
        let reason = match (self.version, found) {
            (ProtocolVersion::V5, false) => ReasonCode::PacketIdentifierNotFound,
            _ => ReasonCode::Success,
        };
        codec::encode(
            &PubCompPacket::new_with_reason(packet_id, reason),
            &mut self.out,
        );
    }
}

/// Checks the MQTT 5 properties that a client may not send in a PUBLISH:
/// a Subscription Identifier ([MQTT-3.3.4-6]) or a Response Topic that is
/// not a valid topic name ([MQTT-3.3.2-14]).
fn check_publish_properties(publish: &PublishPacket) -> Result<(), CloseCause> {
    let properties = &publish.properties;
    if properties.get_subscription_identifier().is_some() {
        return Err(CloseCause::protocol(
            ReasonCode::ProtocolError,
            "a PUBLISH from a client may not carry a Subscription Identifier",
        ));
    }
    if let Some(PropertyValue::Utf8String(topic)) = properties.get(PropertyId::ResponseTopic)
        && !is_valid_topic_name(topic)
    {
        return Err(CloseCause::protocol(
            ReasonCode::ProtocolError,
            format!(
                "invalid Response Topic {topic:?}: it must be a non-empty topic name without wildcards"
            ),
        ));
    }
    Ok(())
}

/// Publishes a will message like a PUBLISH of its client: a device's
/// telemetry is checked and appended, other topics of the device are
/// routed, and an application's will goes to the tenant's applications.
/// The topic was authorized at CONNECT.
pub async fn publish_will(shared: &Shared, client: &Client, client_id: &ClientId, will: Will) {
    events::message_received();
    let identity = match client {
        Client::Device(identity) => identity,
        Client::Application(principal) => {
            if classify_app_publish(&will.topic) == AppPublishTarget::Shared {
                shared.router.route_to_applications(
                    principal.tenant_id,
                    &will.topic,
                    &will_message(&will),
                    Some(client_id),
                );
                events::messages_routed(1);
                let scope = RetainScope {
                    tenant_id: principal.tenant_id,
                    device_id: None,
                };
                retain_will(shared, scope, &will.topic, &will).await;
            }
            return;
        }
    };
    match classify_publish(&will.topic, identity.device_id) {
        PublishTarget::Forbidden => {}
        PublishTarget::OwnTopic { suffix } => {
            shared.router.route(
                identity.device_id,
                suffix,
                &will_message(&will),
                Some(client_id),
            );
            events::messages_routed(1);
            retain_will(shared, device_scope(identity), suffix, &will).await;
            tracing::debug!(topic = %will.topic, "published the will message to subscribers");
        }
        PublishTarget::Telemetry => append_will(shared, identity, client_id, will).await,
    }
}

async fn append_will(shared: &Shared, identity: &DeviceIdentity, client_id: &ClientId, will: Will) {
    let received_at_ns = now_ns();
    if let Err(error) = check_payload(
        ContentType::Json,
        &will.payload,
        received_at_ns,
        shared.context.time_window(&identity.tenant_id.to_string()),
    ) {
        events::messages_rejected(error.reason(), 1);
        tracing::warn!(topic = %will.topic, reason = error.reason(), %error, "will message not stored: invalid payload");
        return;
    }

    let envelope = Envelope {
        tenant_id: identity.tenant_id,
        device_id: identity.device_id,
        protocol: Protocol::Mqtt,
        received_at_ns,
        content_type: ContentType::Json,
        payload: will.payload.clone(),
        meta: Bytes::new(),
    };
    match shared.context.ingest.append(vec![envelope]).await {
        Ok(()) => {
            events::messages_stored(1);
            shared.router.route(
                identity.device_id,
                topics::TELEMETRY_SUFFIX,
                &will_message(&will),
                Some(client_id),
            );
            retain_will(
                shared,
                device_scope(identity),
                topics::TELEMETRY_SUFFIX,
                &will,
            )
            .await;
            tracing::debug!(topic = %will.topic, "stored the will message");
        }
        Err(error) => {
            events::messages_rejected(
                match error {
                    IngestError::Overloaded => "overloaded",
                    IngestError::TooLarge(_) => "too_large",
                    IngestError::ShuttingDown | IngestError::Io => "unavailable",
                },
                1,
            );
            tracing::warn!(%error, "will message not stored: appending to the ingest log failed");
        }
    }
}

/// Returns the retained message that `publish` stores, or `None` for an
/// empty payload, which deletes.
fn retained_message(publish: &PublishPacket) -> Option<RetainedMessage> {
    if publish.payload.is_empty() {
        return None;
    }
    let expires_at_ms = publish
        .properties
        .get_message_expiry_interval()
        .map(|seconds| retained::now_ms().saturating_add(i64::from(seconds) * 1000));
    Some(RetainedMessage {
        payload: publish.payload.clone(),
        qos: publish.qos,
        properties: application::forwarded_properties(publish),
        expires_at_ms,
    })
}

/// Makes the retained telemetry of a stored group visible, in the order
/// the PUBLISHes arrived, and returns the changes to write to SQLite. A
/// message that no longer fits the tenant's limits is stored as telemetry
/// but not retained.
fn apply_retained_telemetry(
    shared: &Shared,
    retains: Vec<RetainAfterAppend>,
) -> Vec<RetainedChange> {
    if retains.is_empty() {
        return Vec::new();
    }
    let now_ms = retained::now_ms();
    let mut store = shared.router.retained();
    let mut changes = Vec::with_capacity(retains.len());
    for retain in retains {
        let change = retained::change_for(retain.scope, &retain.topic, retain.message.as_ref());
        match retain.message {
            Some(message) => {
                if let Err(limit) = store.try_set(retain.scope, &retain.topic, message, now_ms) {
                    events::messages_rejected("retained_limit", 1);
                    tracing::debug!(topic = %retain.topic, %limit, "did not retain MQTT telemetry");
                    continue;
                }
            }
            None => {
                store.remove(retain.scope, &retain.topic);
            }
        }
        changes.push(change);
    }
    changes
}

/// Writes retained message changes to SQLite. A failure is logged: the
/// change stays in memory and is lost at restart.
async fn persist_retained(metadata: &crate::metadata::SqliteMetadata, changes: &[RetainedChange]) {
    if let Err(error) = metadata.apply_mqtt_retained(changes).await {
        tracing::error!(%error, changes = changes.len(), "cannot store retained MQTT messages; they are lost when the server restarts");
    }
}

fn device_scope(identity: &DeviceIdentity) -> RetainScope {
    RetainScope {
        tenant_id: identity.tenant_id,
        device_id: Some(identity.device_id),
    }
}

fn will_message(will: &Will) -> RoutedMessage {
    RoutedMessage {
        retain: will.retain,
        properties: will.properties.clone(),
        expires_at: will.message_expiry.map(|expiry| Instant::now() + expiry),
        ..RoutedMessage::plain(will.payload.clone(), will.qos)
    }
}

/// Stores or deletes the retained message of a will with RETAIN.
async fn retain_will(shared: &Shared, scope: RetainScope, topic: &str, will: &Will) {
    if !will.retain {
        return;
    }
    let message = (!will.payload.is_empty()).then(|| RetainedMessage {
        payload: will.payload.clone(),
        qos: will.qos,
        properties: will.properties.clone(),
        expires_at_ms: will.message_expiry.map(|expiry| {
            let millis = i64::try_from(expiry.as_millis()).unwrap_or(i64::MAX);
            retained::now_ms().saturating_add(millis)
        }),
    });
    {
        let mut store = shared.router.retained();
        match &message {
            Some(message) => {
                if let Err(limit) = store.try_set(scope, topic, message.clone(), retained::now_ms())
                {
                    tracing::warn!(topic, %limit, "did not retain a will message");
                    return;
                }
            }
            None => {
                store.remove(scope, topic);
            }
        }
    }
    let change = retained::change_for(scope, topic, message.as_ref());
    persist_retained(&shared.context.metadata, &[change]).await;
}
