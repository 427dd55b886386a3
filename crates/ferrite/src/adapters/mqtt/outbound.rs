//! Toward the client: SUBSCRIBE and UNSUBSCRIBE, delivery of routed
//! messages, and their acknowledgement (PUBACK, or PUBREC and PUBCOMP for
//! QoS 2).
//!
//! Outgoing QoS 1 and 2 messages are sent while fewer than the send quota
//! are unacknowledged. The quota is the lower of the client's Receive
//! Maximum and `mqtt.max_inflight`. The rest wait in the session's queue or
//! the delivery channel. A QoS 2 message is unacknowledged until PUBCOMP.
//!
//! Exactly-once delivery of QoS 2 across reconnects: unacknowledged
//! PUBLISHes and PUBRELs are kept in the session and sent again, PUBLISH
//! with DUP set, with their original packet ids, when the session is
//! resumed ([MQTT-4.4.0-1]). A message whose PUBREC arrived is never sent
//! again, only its PUBREL.

use std::time::Instant;

use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::subscribe::{RetainHandling, SubscribePacket};
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::packet::unsubscribe::UnsubscribePacket;
use mqtt5_protocol::{ProtocolVersion, QoS, ReasonCode};

use super::application::{Client, authorize_app_filter};
use super::codec;
use super::connection::{CloseCause, Connection};
use super::events;
use super::retained::{self, RetainScope};
use super::session::{MessageProperties, Outgoing, Subscription};
use super::topics::{FilterRejection, authorize_filter, split_shared};
use crate::limits;

impl Connection {
    /// Handles SUBSCRIBE: each filter must lie in the client's topic tree;
    /// accepted ones are granted the requested QoS.
    pub fn on_subscribe(&mut self, subscribe: SubscribePacket) -> Result<(), CloseCause> {
        let identifier = subscription_identifier(&subscribe)?;

        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut accepted = Vec::new();
        let mut retain_handling = Vec::new();
        let limit_config = self.shared.context.limits.config().clone();
        let max_subscriptions = limit_config.max_subscriptions_per_client;
        let mut filters = self
            .shared
            .router
            .subscription_filters(&self.client_id, self.generation);
        for requested in subscribe.filters {
            let shared = split_shared(&requested.filter);
            if let Ok(Some(_)) = shared
                && requested.options.no_local
            {
                return Err(CloseCause::protocol(
                    ReasonCode::ProtocolError,
                    format!(
                        "No Local is set on the shared subscription {:?}",
                        requested.filter
                    ),
                ));
            }
            if let Some((limit, message)) =
                limits::check_topic(&limit_config, &requested.filter, "topic filter")
            {
                limits::count_resource_limited("mqtt", limit);
                self.warn_subscription_limited(&requested.filter, &message);
                codes.push(SubAckReasonCode::TopicFilterInvalid);
                continue;
            }
            // A filter the session has already replaces its subscription
            // and adds none.
            if max_subscriptions > 0
                && filters.len() >= max_subscriptions
                && !filters.contains(&requested.filter)
            {
                limits::count_resource_limited("mqtt", "subscriptions");
                let message = format!(
                    "the session holds {} subscriptions, the limit of limits.max_subscriptions_per_client",
                    filters.len()
                );
                self.warn_subscription_limited(&requested.filter, &message);
                codes.push(SubAckReasonCode::QuotaExceeded);
                continue;
            }
            let (filter_start, inner_filter) = match shared {
                Ok(Some(shared)) => (shared.prefix_len, Ok(shared.filter)),
                Ok(None) => (0, Ok(requested.filter.as_str())),
                Err(rejection) => (0, Err(rejection)),
            };
            let authorized = inner_filter.and_then(|filter| match &self.client {
                Client::Device(identity) => authorize_filter(filter, identity.device_id),
                Client::Application(_) => authorize_app_filter(filter),
            });
            match authorized {
                Ok(authorized) => {
                    let qos = requested.options.qos;
                    codes.push(SubAckReasonCode::from_qos(qos));
                    // MQTT 3.1.1 has no subscription options: retained
                    // messages are always sent, with RETAIN cleared on
                    // forwarding.
                    let v5 = self.version == ProtocolVersion::V5;
                    retain_handling.push(if v5 {
                        requested.options.retain_handling
                    } else {
                        RetainHandling::SendAtSubscribe
                    });
                    filters.insert(requested.filter.clone());
                    accepted.push(Subscription {
                        filter: requested.filter,
                        filter_start,
                        shared: filter_start > 0,
                        prefix_len: authorized.prefix_len,
                        suffix_filter: authorized.suffix_filter,
                        qos,
                        no_local: requested.options.no_local,
                        retain_as_published: v5 && requested.options.retain_as_published,
                        identifier,
                    });
                }
                Err(rejection) => {
                    self.warn_subscription_rejected(&requested.filter, rejection);
                    // MQTT 3.1.1 encodes every rejection as 0x80.
                    codes.push(match rejection {
                        FilterRejection::NotAuthorized => SubAckReasonCode::NotAuthorized,
                        FilterRejection::Invalid => SubAckReasonCode::TopicFilterInvalid,
                        FilterRejection::Shared => {
                            SubAckReasonCode::SharedSubscriptionsNotSupported
                        }
                    });
                }
            }
        }

        let existed =
            self.shared
                .router
                .subscribe(&self.client_id, self.generation, accepted.clone());
        let mut suback = match self.version {
            ProtocolVersion::V311 => SubAckPacket::new_v311(subscribe.packet_id),
            ProtocolVersion::V5 => SubAckPacket::new(subscribe.packet_id),
        };
        suback.reason_codes = codes;
        codec::encode(&suback, &mut self.out);

        for ((subscription, handling), existed) in accepted.iter().zip(retain_handling).zip(existed)
        {
            let send = match handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendAtSubscribeIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
            // Retained messages are not sent for a shared subscription
            // (MQTT 5.0 section 4.8.2).
            if send && !subscription.shared {
                self.queue_retained(subscription);
            }
        }
        Ok(())
    }

    /// Queues the retained messages that match a new subscription, after
    /// SUBACK, with RETAIN set ([MQTT-3.3.1-9], [MQTT-3.3.1-10],
    /// [MQTT-3.3.1-11]). The session queue stays within
    /// `mqtt.max_queued_messages`: retained messages beyond it are dropped
    /// and counted, so that repeated SUBSCRIBEs of a client that does not
    /// acknowledge cannot grow it without bound.
    fn queue_retained(&mut self, subscription: &Subscription) {
        let scope = match &self.client {
            Client::Device(identity) => RetainScope {
                tenant_id: identity.tenant_id,
                device_id: Some(identity.device_id),
            },
            Client::Application(principal) => RetainScope {
                tenant_id: principal.tenant_id,
                device_id: None,
            },
        };
        let mut messages = self.shared.router.retained().matching(
            scope,
            &subscription.suffix_filter,
            subscription.topic_prefix(),
            subscription.qos,
            retained::now_ms(),
        );
        if let Some(identifier) = subscription.identifier {
            for message in &mut messages {
                message.subscription_identifiers.push(identifier);
            }
        }
        let max_queued = self.shared.context.config.max_queued_messages;
        let room = max_queued.saturating_sub(self.delivery.queued.len());
        let dropped = messages.len().saturating_sub(room);
        if dropped > 0 {
            events::deliveries_dropped("retained_queue_full", dropped);
        }
        self.delivery.queued.extend(messages.into_iter().take(room));
    }

    fn warn_subscription_rejected(&mut self, filter: &str, rejection: FilterRejection) {
        if let Some(suppressed) = self.warnings.subscription_rejected.allow(Instant::now()) {
            tracing::warn!(
                filter,
                rejection = ?rejection,
                suppressed,
                "rejected an MQTT subscription with an unauthorized or invalid filter"
            );
        }
    }

    fn warn_subscription_limited(&mut self, filter: &str, message: &str) {
        if let Some(suppressed) = self.warnings.subscription_rejected.allow(Instant::now()) {
            tracing::warn!(filter, detail = %message, suppressed, "rejected an MQTT subscription over a limit");
        }
    }

    /// Handles UNSUBSCRIBE.
    pub fn on_unsubscribe(&mut self, unsubscribe: UnsubscribePacket) {
        let existed =
            self.shared
                .router
                .unsubscribe(&self.client_id, self.generation, &unsubscribe.filters);
        let unsuback = match self.version {
            ProtocolVersion::V311 => UnsubAckPacket::new_v311(unsubscribe.packet_id),
            ProtocolVersion::V5 => {
                let mut unsuback = UnsubAckPacket::new(unsubscribe.packet_id);
                unsuback.reason_codes = existed
                    .into_iter()
                    .map(|existed| {
                        if existed {
                            UnsubAckReasonCode::Success
                        } else {
                            UnsubAckReasonCode::NoSubscriptionExisted
                        }
                    })
                    .collect();
                unsuback
            }
        };
        codec::encode(&unsuback, &mut self.out);
    }

    /// Handles PUBACK for an outgoing QoS 1 message.
    pub fn on_puback(&mut self, packet_id: u16) {
        self.take_inflight(packet_id, QoS::AtLeastOnce);
    }

    /// Handles PUBREC for an outgoing QoS 2 message: the client has it, so
    /// it is released with PUBREL and never sent again. A PUBREC with a
    /// reason code of 0x80 or above ends the flow without PUBREL. A
    /// repeated PUBREC gets the PUBREL again.
    pub fn on_pubrec(&mut self, packet_id: u16, reason: ReasonCode) {
        let known = self.take_inflight(packet_id, QoS::ExactlyOnce).is_some();
        if u8::from(reason) >= 0x80 {
            return;
        }
        let released = self.delivery.released.contains(&packet_id);
        if known && !released {
            self.delivery.released.push_back(packet_id);
        }
        let reason = if known || released {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        self.write_pubrel(packet_id, reason);
    }

    /// Handles PUBCOMP: the QoS 2 flow of `packet_id` is complete and the
    /// packet id free.
    pub fn on_pubcomp(&mut self, packet_id: u16) {
        self.delivery.released.retain(|id| *id != packet_id);
    }

    fn write_pubrel(&mut self, packet_id: u16, reason: ReasonCode) {
        let reason = match self.version {
            ProtocolVersion::V5 => reason,
            ProtocolVersion::V311 => ReasonCode::Success,
        };
        codec::encode(
            &PubRelPacket::new_with_reason(packet_id, reason),
            &mut self.out,
        );
    }

    /// Removes the in-flight message `packet_id` when it was sent with
    /// `qos`, and returns it.
    fn take_inflight(&mut self, packet_id: u16, qos: QoS) -> Option<Outgoing> {
        let index = self
            .delivery
            .inflight
            .iter()
            .position(|(id, message)| *id == packet_id && message.qos == qos)?;
        self.delivery
            .inflight
            .remove(index)
            .map(|(_, message)| message)
    }

    /// Sends a message from the router.
    pub fn send_delivery(&mut self, message: Outgoing) {
        if message.qos == QoS::AtMostOnce {
            self.encode_delivery(&message, None, false);
            return;
        }
        let packet_id = self.next_packet_id();
        if self.encode_delivery(&message, Some(packet_id), false) {
            self.delivery.inflight.push_back((packet_id, message));
        }
    }

    /// Sends queued session messages while the send quota allows.
    pub fn send_queued(&mut self) {
        while self.delivery.unacknowledged() < self.send_quota {
            let Some(message) = self.delivery.queued.pop_front() else {
                return;
            };
            self.send_delivery(message);
        }
    }

    /// Sends the unacknowledged PUBLISHes and PUBRELs of a resumed session
    /// again, in the order they were first sent.
    pub fn resend_inflight(&mut self) {
        let released: Vec<u16> = self.delivery.released.iter().copied().collect();
        for packet_id in released {
            self.write_pubrel(packet_id, ReasonCode::Success);
        }
        let inflight = std::mem::take(&mut self.delivery.inflight);
        for (packet_id, message) in inflight {
            if self.encode_delivery(&message, Some(packet_id), true) {
                self.delivery.inflight.push_back((packet_id, message));
            }
        }
    }

    /// Encodes a PUBLISH to the client; returns false when the message was
    /// dropped: larger than the client accepts ([MQTT-3.1.2-25]) or
    /// expired before its first sending (MQTT 5 Message Expiry Interval).
    /// A resend (`dup`) is never dropped for expiry, because onward
    /// delivery has started ([MQTT-3.3.2-5], [MQTT-4.3.3-7]).
    fn encode_delivery(&mut self, message: &Outgoing, packet_id: Option<u16>, dup: bool) -> bool {
        let remaining_expiry = match message.expires_at {
            Some(expires_at) => {
                let now = Instant::now();
                if expires_at <= now && !dup {
                    events::deliveries_dropped("expired", 1);
                    return false;
                }
                // The interval sent is the time left, rounded up, so that
                // a message still valid never carries 0. A resend after the
                // expiry carries 1, the smallest interval.
                let left = expires_at.saturating_duration_since(now);
                let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
                Some(u32::try_from(seconds.max(1)).unwrap_or(u32::MAX))
            }
            None => None,
        };
        let mut publish = match self.version {
            ProtocolVersion::V311 => {
                PublishPacket::new_v311(message.topic.clone(), message.payload.clone(), message.qos)
            }
            ProtocolVersion::V5 => {
                let publish =
                    PublishPacket::new(message.topic.clone(), message.payload.clone(), message.qos);
                let publish = match &message.properties {
                    Some(properties) => with_properties(publish, properties),
                    None => publish,
                };
                let mut publish = match remaining_expiry {
                    Some(seconds) => publish.with_message_expiry_interval(seconds),
                    None => publish,
                };
                for identifier in &message.subscription_identifiers {
                    publish.properties.set_subscription_identifier(*identifier);
                }
                publish
            }
        };
        publish = publish.with_retain(message.retain);
        if let Some(packet_id) = packet_id {
            publish = publish.with_packet_id(packet_id).with_dup(dup);
        }
        if codec::publish_size(&publish) > self.client_maximum_packet_size {
            events::deliveries_dropped("too_large_for_client", 1);
            return false;
        }
        codec::encode_publish(&publish, &mut self.out);
        true
    }

    /// Returns a packet id not used by a message in flight.
    fn next_packet_id(&mut self) -> u16 {
        loop {
            let candidate = self.delivery.next_packet_id.max(1);
            self.delivery.next_packet_id = candidate.checked_add(1).unwrap_or(1);
            let in_use = self
                .delivery
                .inflight
                .iter()
                .any(|(id, _)| *id == candidate)
                || self.delivery.released.contains(&candidate);
            if !in_use {
                return candidate;
            }
        }
    }
}

/// Returns the Subscription Identifier of an MQTT 5 SUBSCRIBE. The
/// identifier must be 1 to 268,435,455 and may appear only once (MQTT 5.0,
/// 3.8.2.1.2), so 0 or a second one closes the connection with 0x82.
fn subscription_identifier(subscribe: &SubscribePacket) -> Result<Option<u32>, CloseCause> {
    let identifiers = subscribe.properties.subscription_identifiers();
    match identifiers.as_slice() {
        [] => Ok(None),
        [0] => Err(CloseCause::protocol(
            ReasonCode::ProtocolError,
            "the Subscription Identifier 0 is invalid: use a value from 1 to 268435455",
        )),
        [identifier] => Ok(Some(*identifier)),
        _ => Err(CloseCause::protocol(
            ReasonCode::ProtocolError,
            format!(
                "a SUBSCRIBE may carry one Subscription Identifier, got {}",
                identifiers.len()
            ),
        )),
    }
}

/// Adds the forwarded MQTT 5 properties to an outgoing PUBLISH, unchanged
/// ([MQTT-3.3.2-15], [MQTT-3.3.2-16], [MQTT-3.3.2-17], [MQTT-3.3.2-20]).
fn with_properties(mut publish: PublishPacket, properties: &MessageProperties) -> PublishPacket {
    if properties.payload_is_utf8 {
        publish = publish.with_payload_format_indicator(true);
    }
    if let Some(topic) = &properties.response_topic {
        publish = publish.with_response_topic(topic.clone());
    }
    if let Some(data) = &properties.correlation_data {
        publish = publish.with_correlation_data(data.to_vec());
    }
    if let Some(content_type) = &properties.content_type {
        publish = publish.with_content_type(content_type.clone());
    }
    for (key, value) in &properties.user_properties {
        publish = publish.with_user_property(key.clone(), value.clone());
    }
    publish
}
