//! Toward the client: SUBSCRIBE and UNSUBSCRIBE, delivery of routed
//! messages, and their acknowledgement (PUBACK from the client).
//!
//! Outgoing QoS 1 messages are sent while fewer than the send quota (the
//! lower of the client's Receive Maximum and `mqtt.max_inflight`) wait for
//! PUBACK; the rest wait in the session's queue or the delivery channel.
//! Unacknowledged messages are kept in the session and sent again, with
//! DUP set and their original packet ids, when the session is resumed.

use std::time::Instant;

use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::suback::{SubAckPacket, SubAckReasonCode};
use mqtt5_protocol::packet::subscribe::SubscribePacket;
use mqtt5_protocol::packet::unsuback::{UnsubAckPacket, UnsubAckReasonCode};
use mqtt5_protocol::packet::unsubscribe::UnsubscribePacket;
use mqtt5_protocol::{ProtocolVersion, QoS, ReasonCode};

use super::application::{Client, authorize_app_filter};
use super::codec;
use super::connection::{CloseCause, Connection};
use super::events;
use super::session::{MessageProperties, Outgoing, Subscription};
use super::topics::{FilterRejection, authorize_filter};

impl Connection {
    /// Handles SUBSCRIBE: each filter must lie in the device's namespace;
    /// accepted ones are granted at most QoS 1.
    pub fn on_subscribe(&mut self, subscribe: SubscribePacket) -> Result<(), CloseCause> {
        if self.version == ProtocolVersion::V5
            && subscribe.properties.get_subscription_identifier().is_some()
        {
            return Err(CloseCause::protocol(
                ReasonCode::SubscriptionIdentifiersNotSupported,
                "subscription identifiers are not supported",
            ));
        }

        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut accepted = Vec::new();
        for requested in subscribe.filters {
            let authorized = match &self.client {
                Client::Device(identity) => authorize_filter(&requested.filter, identity.device_id),
                Client::Application(_) => authorize_app_filter(&requested.filter),
            };
            match authorized {
                Ok(authorized) => {
                    let qos = if requested.options.qos == QoS::AtMostOnce {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    codes.push(SubAckReasonCode::from_qos(qos));
                    accepted.push(Subscription {
                        filter: requested.filter,
                        prefix_len: authorized.prefix_len,
                        suffix_filter: authorized.suffix_filter,
                        qos,
                        no_local: requested.options.no_local,
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

        // NOTE: no retained messages are sent after SUBACK, since retained
        // messages are not supported.
        self.shared
            .router
            .subscribe(&self.client_id, self.generation, accepted);
        let mut suback = match self.version {
            ProtocolVersion::V311 => SubAckPacket::new_v311(subscribe.packet_id),
            ProtocolVersion::V5 => SubAckPacket::new(subscribe.packet_id),
        };
        suback.reason_codes = codes;
        codec::encode(&suback, &mut self.out);
        Ok(())
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
        if let Some(index) = self
            .delivery
            .inflight
            .iter()
            .position(|(id, _)| *id == packet_id)
        {
            self.delivery.inflight.remove(index);
        }
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
        while self.delivery.inflight.len() < self.send_quota {
            let Some(message) = self.delivery.queued.pop_front() else {
                return;
            };
            self.send_delivery(message);
        }
    }

    /// Sends the unacknowledged messages of a resumed session again.
    pub fn resend_inflight(&mut self) {
        let inflight = std::mem::take(&mut self.delivery.inflight);
        for (packet_id, message) in inflight {
            if self.encode_delivery(&message, Some(packet_id), true) {
                self.delivery.inflight.push_back((packet_id, message));
            }
        }
    }

    /// Encodes a PUBLISH to the client; returns false when the message is
    /// larger than the client accepts and was dropped ([MQTT-3.1.2-25]).
    fn encode_delivery(&mut self, message: &Outgoing, packet_id: Option<u16>, dup: bool) -> bool {
        let mut publish = match self.version {
            ProtocolVersion::V311 => {
                PublishPacket::new_v311(message.topic.clone(), message.payload.clone(), message.qos)
            }
            ProtocolVersion::V5 => {
                let publish =
                    PublishPacket::new(message.topic.clone(), message.payload.clone(), message.qos);
                match &message.properties {
                    Some(properties) => with_properties(publish, properties),
                    None => publish,
                }
            }
        };
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
            if !self
                .delivery
                .inflight
                .iter()
                .any(|(id, _)| *id == candidate)
            {
                return candidate;
            }
        }
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
