//! Retained messages: the last message published with RETAIN on each
//! topic, sent to new subscribers.
//!
//! ## Scopes
//! Retained messages live in the same scopes as routing: the namespace of
//! one device (keyed by the topic suffix, so `v1/devices/me/x` and
//! `devices/{id}/x` share one retained message) and the application tree
//! of one tenant (keyed by the whole topic).
//!
//! ## Storage and ownership
//! [`RetainedStore`] is the working copy in memory, behind the router's
//! mutex, so that a SUBSCRIBE reads it without I/O. Each change is also
//! written to SQLite (`metadata/mqtt_retained.rs`) as part of the
//! PUBLISH's acknowledgement step, and [`RetainedStore::load`] reads them
//! back at start.
//!
//! NOTE: two connections that retain on the same topic at the same moment
//! update memory in one order, but their SQLite writes may commit in the
//! other, so after a restart the older message can be the retained one.
//! NOTE: retained messages of a deleted device are deleted from SQLite
//! with the device, but stay in memory (and count towards the tenant's
//! limits) until the server restarts.
//!
//! ## Limits
//! Per tenant, at most `mqtt.max_retained_messages` messages and
//! `mqtt.max_retained_bytes` bytes of topic, payload and properties. A
//! change that would pass a limit is rejected; replacing a message counts
//! only the difference in size. Before rejecting, the tenant's expired
//! messages are removed from memory, so they stop counting; their SQLite
//! rows are deleted at the next start. [`RetainedStore::try_set`] checks
//! and stores under one lock, so that concurrent PUBLISHes cannot pass a
//! limit together.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqtt5_protocol::QoS;

use super::session::{MessageProperties, Outgoing};
use super::topics::suffix_matches;
use crate::ids::{DeviceId, TenantId};
use crate::metadata::mqtt_retained::{RetainedChange, RetainedRow};

/// The topic space a retained message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RetainScope {
    pub tenant_id: TenantId,
    /// `None` for the application tree of the tenant.
    pub device_id: Option<DeviceId>,
}

/// One retained message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedMessage {
    pub payload: Bytes,
    pub qos: QoS,
    pub properties: Option<Arc<MessageProperties>>,
    /// Epoch milliseconds after which the message is dropped (MQTT 5
    /// Message Expiry Interval).
    pub expires_at_ms: Option<i64>,
}

/// Reason a retained message is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RetainLimit {
    #[error("the tenant has {max} retained messages, the limit (mqtt.max_retained_messages)")]
    Count { max: usize },
    #[error("the tenant's retained messages would exceed {max} bytes (mqtt.max_retained_bytes)")]
    Bytes { max: usize },
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    count: usize,
    bytes: usize,
}

/// All retained messages of the server, in memory.
#[derive(Debug)]
pub struct RetainedStore {
    scopes: HashMap<RetainScope, BTreeMap<String, RetainedMessage>>,
    usage: HashMap<TenantId, Usage>,
    max_messages: usize,
    max_bytes: usize,
}

/// Bytes of a retained message that count towards the limit: the topic,
/// the payload and the forwarded properties.
fn message_size(topic: &str, message: &RetainedMessage) -> usize {
    let properties = message.properties.as_deref().map_or(0, |properties| {
        let strings = [&properties.response_topic, &properties.content_type]
            .into_iter()
            .flatten()
            .map(String::len)
            .sum::<usize>();
        let correlation = properties.correlation_data.as_ref().map_or(0, Bytes::len);
        let user = properties
            .user_properties
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum::<usize>();
        strings + correlation + user
    });
    topic.len() + message.payload.len() + properties
}

/// Current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

impl RetainedStore {
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            scopes: HashMap::new(),
            usage: HashMap::new(),
            max_messages,
            max_bytes,
        }
    }

    /// Checks whether storing `message` on `topic` stays within the
    /// tenant's limits. When it does not, the tenant's expired messages are
    /// removed first and the check is made again.
    pub fn check(
        &mut self,
        scope: RetainScope,
        topic: &str,
        message: &RetainedMessage,
        now_ms: i64,
    ) -> Result<(), RetainLimit> {
        if self.check_usage(scope, topic, message).is_ok() {
            return Ok(());
        }
        self.remove_expired(scope.tenant_id, now_ms);
        self.check_usage(scope, topic, message)
    }

    /// Checks the limits and stores `message` on `topic` under the same
    /// lock, replacing the message there.
    pub fn try_set(
        &mut self,
        scope: RetainScope,
        topic: &str,
        message: RetainedMessage,
        now_ms: i64,
    ) -> Result<(), RetainLimit> {
        self.check(scope, topic, &message, now_ms)?;
        self.set(scope, topic, message);
        Ok(())
    }

    fn check_usage(
        &self,
        scope: RetainScope,
        topic: &str,
        message: &RetainedMessage,
    ) -> Result<(), RetainLimit> {
        let usage = self
            .usage
            .get(&scope.tenant_id)
            .copied()
            .unwrap_or_default();
        let existing = self
            .scopes
            .get(&scope)
            .and_then(|messages| messages.get(topic))
            .map(|existing| message_size(topic, existing));
        let count = usage.count + usize::from(existing.is_none());
        let bytes = usage.bytes - existing.unwrap_or(0) + message_size(topic, message);
        if count > self.max_messages {
            return Err(RetainLimit::Count {
                max: self.max_messages,
            });
        }
        if bytes > self.max_bytes {
            return Err(RetainLimit::Bytes {
                max: self.max_bytes,
            });
        }
        Ok(())
    }

    /// Removes the tenant's messages whose expiry has passed, from memory
    /// only. Returns how many.
    fn remove_expired(&mut self, tenant_id: TenantId, now_ms: i64) -> usize {
        let expired: Vec<(RetainScope, String)> = self
            .scopes
            .iter()
            .filter(|(scope, _)| scope.tenant_id == tenant_id)
            .flat_map(|(scope, messages)| {
                messages
                    .iter()
                    .filter(|(_, message)| message.expires_at_ms.is_some_and(|at| at <= now_ms))
                    .map(|(topic, _)| (*scope, topic.clone()))
            })
            .collect();
        for (scope, topic) in &expired {
            self.remove(*scope, topic);
        }
        expired.len()
    }

    /// Stores `message` on `topic` without checking the limits, replacing
    /// the message there. Used at load and by [`RetainedStore::try_set`].
    fn set(&mut self, scope: RetainScope, topic: &str, message: RetainedMessage) {
        self.remove(scope, topic);
        let usage = self.usage.entry(scope.tenant_id).or_default();
        usage.count += 1;
        usage.bytes += message_size(topic, &message);
        self.scopes
            .entry(scope)
            .or_default()
            .insert(topic.to_owned(), message);
    }

    /// Deletes the message on `topic`; returns whether there was one.
    pub fn remove(&mut self, scope: RetainScope, topic: &str) -> bool {
        let Some(messages) = self.scopes.get_mut(&scope) else {
            return false;
        };
        let Some(old) = messages.remove(topic) else {
            return false;
        };
        if messages.is_empty() {
            self.scopes.remove(&scope);
        }
        if let Some(usage) = self.usage.get_mut(&scope.tenant_id) {
            usage.count -= 1;
            usage.bytes -= message_size(topic, &old);
        }
        true
    }

    /// Returns the unexpired messages of `scope` whose topic matches
    /// `filter`, as outgoing messages with RETAIN set. `topic_prefix` is
    /// put before each topic (the namespace prefix the subscriber used),
    /// and `granted` caps their QoS.
    pub fn matching(
        &self,
        scope: RetainScope,
        filter: &str,
        topic_prefix: &str,
        granted: QoS,
        now_ms: i64,
    ) -> Vec<Outgoing> {
        let Some(messages) = self.scopes.get(&scope) else {
            return Vec::new();
        };
        let now = Instant::now();
        messages
            .iter()
            .filter(|(topic, _)| suffix_matches(filter, topic))
            .filter_map(|(topic, message)| {
                let expires_at = match message.expires_at_ms {
                    Some(at) if at <= now_ms => return None,
                    Some(at) => Some(now + Duration::from_millis((at - now_ms).unsigned_abs())),
                    None => None,
                };
                Some(Outgoing {
                    topic: format!("{topic_prefix}{topic}"),
                    payload: message.payload.clone(),
                    qos: QoS::from((message.qos as u8).min(granted as u8)),
                    properties: message.properties.clone(),
                    retain: true,
                    expires_at,
                    subscription_identifiers: Vec::new(),
                })
            })
            .collect()
    }

    /// Loads stored messages at start. Messages beyond the limits (after
    /// the limits were lowered) are kept, and block new topics until the
    /// tenant is back under them.
    pub fn load(&mut self, rows: Vec<RetainedRow>) {
        for row in rows {
            let scope = RetainScope {
                tenant_id: row.tenant_id,
                device_id: row.device_id,
            };
            let properties = MessageProperties {
                payload_is_utf8: row.payload_is_utf8,
                response_topic: row.response_topic,
                correlation_data: row.correlation_data.map(Bytes::from),
                content_type: row.content_type,
                user_properties: row.user_properties,
            };
            let message = RetainedMessage {
                payload: Bytes::from(row.payload),
                qos: QoS::from(row.qos.min(2)),
                properties: (properties != MessageProperties::default())
                    .then(|| Arc::new(properties)),
                expires_at_ms: row.expires_at,
            };
            self.set(scope, &row.topic, message);
        }
    }
}

/// Returns the change to persist for a retained PUBLISH on `topic`: a
/// delete for an empty payload, otherwise the message.
pub fn change_for(
    scope: RetainScope,
    topic: &str,
    message: Option<&RetainedMessage>,
) -> RetainedChange {
    match message {
        None => RetainedChange::Delete {
            tenant_id: scope.tenant_id,
            device_id: scope.device_id,
            topic: topic.to_owned(),
        },
        Some(message) => {
            let properties = message.properties.as_deref().cloned().unwrap_or_default();
            RetainedChange::Set(RetainedRow {
                tenant_id: scope.tenant_id,
                device_id: scope.device_id,
                topic: topic.to_owned(),
                payload: message.payload.to_vec(),
                qos: message.qos as u8,
                payload_is_utf8: properties.payload_is_utf8,
                content_type: properties.content_type,
                response_topic: properties.response_topic,
                correlation_data: properties.correlation_data.map(|data| data.to_vec()),
                user_properties: properties.user_properties,
                expires_at: message.expires_at_ms,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> RetainScope {
        RetainScope {
            tenant_id: TenantId::from_bytes([1; 16]),
            device_id: None,
        }
    }

    fn message(payload: &'static [u8]) -> RetainedMessage {
        RetainedMessage {
            payload: Bytes::from_static(payload),
            qos: QoS::AtLeastOnce,
            properties: None,
            expires_at_ms: None,
        }
    }

    #[test]
    fn set_replaces_and_remove_deletes() {
        let mut store = RetainedStore::new(10, 1000);
        store.set(scope(), "apps/a", message(b"1"));
        store.set(scope(), "apps/a", message(b"2"));
        let found = store.matching(scope(), "apps/#", "", QoS::ExactlyOnce, now_ms());
        assert_eq!(found.len(), 1);
        assert_eq!(&found[0].payload[..], b"2");
        assert!(found[0].retain);

        assert!(store.remove(scope(), "apps/a"));
        assert!(!store.remove(scope(), "apps/a"));
        assert!(
            store
                .matching(scope(), "#", "", QoS::AtMostOnce, now_ms())
                .is_empty()
        );
    }

    #[test]
    fn limits_count_messages_and_bytes_per_tenant() {
        let mut store = RetainedStore::new(2, 20);
        store.set(scope(), "apps/a", message(b"1"));
        store.set(scope(), "apps/b", message(b"1"));
        let now = now_ms();
        assert_eq!(
            store.check(scope(), "apps/c", &message(b"1"), now),
            Err(RetainLimit::Count { max: 2 })
        );
        // Replacing an existing topic does not add a message.
        assert_eq!(store.check(scope(), "apps/a", &message(b"22"), now), Ok(()));
        assert_eq!(
            store.check(scope(), "apps/a", &message(b"0123456789abcd"), now),
            Err(RetainLimit::Bytes { max: 20 })
        );

        let other = RetainScope {
            tenant_id: TenantId::from_bytes([2; 16]),
            device_id: None,
        };
        assert_eq!(store.check(other, "apps/c", &message(b"1"), now), Ok(()));
    }

    #[test]
    fn properties_count_towards_byte_limit() {
        let mut store = RetainedStore::new(10, 100);
        let mut heavy = message(b"1");
        heavy.properties = Some(Arc::new(MessageProperties {
            user_properties: vec![("k".repeat(50), "v".repeat(50))],
            ..MessageProperties::default()
        }));
        assert_eq!(
            store.try_set(scope(), "apps/a", heavy, now_ms()),
            Err(RetainLimit::Bytes { max: 100 })
        );
        assert!(
            store
                .matching(scope(), "#", "", QoS::AtMostOnce, now_ms())
                .is_empty()
        );
    }

    #[test]
    fn expired_messages_stop_counting() {
        let mut store = RetainedStore::new(2, 1000);
        let now = now_ms();
        let mut expired = message(b"old");
        expired.expires_at_ms = Some(now - 1);
        store.set(scope(), "apps/old", expired);
        store.set(scope(), "apps/kept", message(b"1"));

        assert_eq!(
            store.try_set(scope(), "apps/new", message(b"2"), now),
            Ok(())
        );
        assert_eq!(
            store.try_set(scope(), "apps/more", message(b"3"), now),
            Err(RetainLimit::Count { max: 2 })
        );
    }

    #[test]
    fn try_set_checks_each_message() {
        let mut store = RetainedStore::new(1, 1000);
        let now = now_ms();
        assert_eq!(store.try_set(scope(), "apps/a", message(b"1"), now), Ok(()));
        assert_eq!(
            store.try_set(scope(), "apps/b", message(b"1"), now),
            Err(RetainLimit::Count { max: 1 })
        );
        assert_eq!(store.try_set(scope(), "apps/a", message(b"2"), now), Ok(()));
    }

    #[test]
    fn expired_messages_are_not_sent() {
        let mut store = RetainedStore::new(10, 1000);
        let now = now_ms();
        let mut expired = message(b"old");
        expired.expires_at_ms = Some(now - 1);
        store.set(scope(), "apps/old", expired);
        let mut fresh = message(b"new");
        fresh.expires_at_ms = Some(now + 60_000);
        store.set(scope(), "apps/new", fresh);

        let found = store.matching(scope(), "#", "", QoS::AtLeastOnce, now);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].topic, "apps/new");
        assert!(found[0].expires_at.is_some());
    }

    #[test]
    fn granted_qos_caps_retained_qos() {
        let mut store = RetainedStore::new(10, 1000);
        store.set(scope(), "apps/a", message(b"1"));
        let found = store.matching(scope(), "apps/a", "", QoS::AtMostOnce, now_ms());
        assert_eq!(found[0].qos, QoS::AtMostOnce);
    }
}
