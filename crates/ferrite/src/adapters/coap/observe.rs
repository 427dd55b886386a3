//! Observers of a device's shared attributes and RPC requests (RFC 7641),
//! shared by every CoAP endpoint (plain UDP and DTLS).
//!
//! The MQTT router delivers a device's messages here through
//! [`ExternalReceivers`], so the command API, alarm actions and attribute
//! changes reach CoAP devices the same way they reach MQTT sessions. The
//! topic suffix `attributes` notifies observers of `.../attributes`, and
//! `rpc/request/{id}` notifies observers of `.../rpc`.
//!
//! An observer is identified by its endpoint, peer address and resource; a
//! new registration from the same peer replaces the old one and its token.
//! It ends on a GET with Observe = 1, on a Reset in reply to a
//! notification, or when a Confirmable notification gets no ACK after
//! every retransmission. RPC notifications are always Confirmable;
//! attribute notifications are Confirmable every [`CONFIRMABLE_EVERY`]
//! notifications and when the last Confirmable one is older than
//! [`CONFIRMABLE_INTERVAL`], so that a dead observer is found (RFC 7641
//! section 4.5 requires one at least every 24 hours).
//!
//! Observers end with a 4.01 notification when a revocation event matches
//! the token or device they registered with ([`watch_revocations`]).
//!
//! Each observer has at most one Confirmable notification in flight.
//! Notifications that arrive meanwhile wait until its ACK: the newest
//! attribute state replaces older state, and RPC requests queue in order
//! (at most [`MAX_PENDING_RPC`]). NOTE: the router counts a queued RPC
//! request as delivered before the device acknowledges it; the caller
//! learns of a loss only when its response times out.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::endpoint::Endpoint;
use super::events;
use crate::adapters::mqtt::ExternalReceivers;
use crate::auth::revocation::{HeldAccess, Revoked};
use crate::auth::{Auth, AuthError, DeviceIdentity, HeldCredential};
use crate::ids::{DeviceId, TenantId};

/// Attribute notifications sent as Non-confirmable between two
/// Confirmable ones.
pub const CONFIRMABLE_EVERY: u32 = 10;
/// Maximum time between two Confirmable notifications of one observer.
pub const CONFIRMABLE_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Observe sequence numbers are 24-bit (RFC 7641 section 3.4).
const SEQUENCE_MASK: u32 = 0x00ff_ffff;
/// Topic suffix of shared attribute updates.
const ATTRIBUTES_SUFFIX: &str = "attributes";
/// Topic suffix of RPC requests, before the request id.
const RPC_REQUEST_PREFIX: &str = "rpc/request/";

/// RPC requests queued per observer behind an unacknowledged one; the
/// oldest is dropped and counted when more arrive.
const MAX_PENDING_RPC: usize = 16;
/// Largest RPC notification body: one block of 1024 bytes, because the
/// rest of a larger one could not be fetched.
const MAX_RPC_NOTIFICATION_BYTES: usize = 1024;

/// A resource that can be observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Attributes,
    Rpc,
}

/// One notification to send, collected under the lock and sent after.
pub struct Notification {
    pub endpoint: Arc<Endpoint>,
    pub peer: SocketAddr,
    pub token: Vec<u8>,
    pub sequence: u32,
    pub confirmable: bool,
    pub payload: Bytes,
}

struct Observer {
    /// Tenant of the device that registered, from its authentication.
    tenant_id: TenantId,
    /// The device, tenant and token hash of the registration, matched
    /// against revocation events.
    held: HeldAccess,
    endpoint: Weak<Endpoint>,
    peer: SocketAddr,
    token: Vec<u8>,
    sequence: u32,
    /// A Confirmable notification waits for its ACK. Then later
    /// notifications wait in `pending` (RFC 7641 section 4.5.2 and NSTART
    /// = 1 of RFC 7252 section 4.7).
    in_flight: bool,
    /// Notifications to send after the ACK: the newest attribute state
    /// only, or up to [`MAX_PENDING_RPC`] RPC requests in order.
    pending: VecDeque<Bytes>,
    /// Non-confirmable notifications since the last Confirmable one.
    since_confirmable: u32,
    /// Time of the last Confirmable notification, or of the registration.
    last_confirmable: Instant,
}

/// Observers by device and resource.
pub struct Observers {
    max_per_device: usize,
    lists: Mutex<HashMap<(DeviceId, Resource), Vec<Observer>>>,
}

impl Observers {
    pub fn new(max_per_device: usize) -> Observers {
        Observers {
            max_per_device,
            lists: Mutex::new(HashMap::new()),
        }
    }

    /// Adds or replaces the observer of `peer` on `endpoint`. Returns the
    /// sequence number for the registration's response, or `None` when the
    /// device has `max_per_device` observers of this resource already.
    /// `token_hash` is the access token the registration came with.
    pub fn register(
        &self,
        device: &DeviceIdentity,
        token_hash: Option<[u8; 32]>,
        resource: Resource,
        endpoint: &Arc<Endpoint>,
        peer: SocketAddr,
        token: Vec<u8>,
    ) -> Option<u32> {
        let device_id = device.device_id;
        let held = device.held_access(token_hash);
        let mut lists = self.lists.lock();
        let list = lists.entry((device_id, resource)).or_default();
        let weak = Arc::downgrade(endpoint);
        list.retain(|observer| observer.endpoint.strong_count() > 0);

        // A new registration from the same client replaces the old one.
        if let Some(existing) = list
            .iter_mut()
            .find(|observer| observer.peer == peer && Weak::ptr_eq(&observer.endpoint, &weak))
        {
            existing.token = token;
            existing.held = held;
            existing.sequence = (existing.sequence + 1) & SEQUENCE_MASK;
            events::observer("registered");
            return Some(existing.sequence);
        }

        if list.len() >= self.max_per_device {
            events::observer("limit");
            return None;
        }

        // Sequence numbers start above the Observe values 0 and 1 of
        // requests, which makes responses easy to tell apart in traces.
        let sequence = 2;
        list.push(Observer {
            tenant_id: device.tenant_id,
            held,
            endpoint: weak,
            peer,
            token,
            sequence,
            in_flight: false,
            pending: VecDeque::new(),
            since_confirmable: 0,
            last_confirmable: Instant::now(),
        });
        events::observer("registered");
        Some(sequence)
    }

    /// Removes the observer of `peer` on `endpoint`; returns whether one
    /// existed.
    pub fn deregister(
        &self,
        device_id: DeviceId,
        resource: Resource,
        endpoint: &Arc<Endpoint>,
        peer: SocketAddr,
    ) -> bool {
        let weak = Arc::downgrade(endpoint);
        let removed = self.remove_where(|key, observer| {
            key == &(device_id, resource)
                && observer.peer == peer
                && Weak::ptr_eq(&observer.endpoint, &weak)
        });
        if removed > 0 {
            events::observer("deregistered");
        }
        removed > 0
    }

    /// Removes the observers of `peer` with `token` (a Reset or an
    /// unacknowledged notification); `event` labels the metric.
    pub fn remove_token(
        &self,
        endpoint: &Arc<Endpoint>,
        peer: SocketAddr,
        token: &[u8],
        event: &'static str,
    ) -> usize {
        let weak = Arc::downgrade(endpoint);
        let removed = self.remove_where(|_, observer| {
            observer.peer == peer
                && observer.token == token
                && Weak::ptr_eq(&observer.endpoint, &weak)
        });
        for _ in 0..removed {
            events::observer(event);
        }
        removed
    }

    /// Removes every observer of `device_id` and notifies each with a 4.01
    /// notification (RFC 7641 section 3.2: a non-2.xx notification ends
    /// the observation), so the client registers again with a valid token.
    pub fn remove_device(&self, device_id: DeviceId) {
        let removed: Vec<Observer> = {
            let mut lists = self.lists.lock();
            [Resource::Attributes, Resource::Rpc]
                .into_iter()
                .filter_map(|resource| lists.remove(&(device_id, resource)))
                .flatten()
                .collect()
        };
        Self::end_revoked(removed);
    }

    /// Removes every observer whose registration `revoked` takes away, and
    /// notifies each with a 4.01 notification.
    pub fn remove_revoked(&self, revoked: impl Fn(&HeldAccess) -> bool) {
        let mut removed = Vec::new();
        {
            let mut lists = self.lists.lock();
            lists.retain(|_, list| {
                let (gone, kept): (Vec<Observer>, Vec<Observer>) =
                    list.drain(..).partition(|observer| revoked(&observer.held));
                removed.extend(gone);
                *list = kept;
                !list.is_empty()
            });
        }
        Self::end_revoked(removed);
    }

    /// Returns the token hashes that observers registered with, to check
    /// them again after missed revocation events.
    fn token_hashes(&self) -> Vec<[u8; 32]> {
        let mut hashes: Vec<[u8; 32]> = self
            .lists
            .lock()
            .values()
            .flatten()
            .filter_map(|observer| observer.held.device_token)
            .collect();
        hashes.sort_unstable();
        hashes.dedup();
        hashes
    }

    fn end_revoked(removed: Vec<Observer>) {
        for observer in removed {
            events::observer("revoked");
            if let Some(endpoint) = observer.endpoint.upgrade() {
                endpoint.end_observation(observer.peer, &observer.token);
            }
        }
    }

    fn remove_where(&self, matches: impl Fn(&(DeviceId, Resource), &Observer) -> bool) -> usize {
        let mut lists = self.lists.lock();
        let mut removed = 0;
        lists.retain(|key, list| {
            let before = list.len();
            list.retain(|observer| !matches(key, observer));
            removed += before - list.len();
            !list.is_empty()
        });
        removed
    }

    /// Prepares one notification per observer of the resource, advancing
    /// each observer's sequence number.
    fn prepare(
        &self,
        device_id: DeviceId,
        resource: Resource,
        payload: &Bytes,
    ) -> Vec<Notification> {
        let now = Instant::now();
        let mut lists = self.lists.lock();
        let Some(list) = lists.get_mut(&(device_id, resource)) else {
            return Vec::new();
        };
        list.iter_mut()
            .filter_map(|observer| {
                let endpoint = observer.endpoint.upgrade()?;
                if observer.in_flight {
                    queue_pending(observer, resource, payload);
                    return None;
                }
                observer.sequence = (observer.sequence + 1) & SEQUENCE_MASK;
                let confirmable = resource == Resource::Rpc
                    || observer.since_confirmable + 1 >= CONFIRMABLE_EVERY
                    || now.duration_since(observer.last_confirmable) >= CONFIRMABLE_INTERVAL;
                if confirmable {
                    observer.in_flight = true;
                    observer.since_confirmable = 0;
                    observer.last_confirmable = now;
                } else {
                    observer.since_confirmable += 1;
                }
                Some(Notification {
                    endpoint,
                    peer: observer.peer,
                    token: observer.token.clone(),
                    sequence: observer.sequence,
                    confirmable,
                    payload: payload.clone(),
                })
            })
            .collect()
    }

    /// Records the ACK of the Confirmable notification of `peer` with
    /// `token`, and returns the next queued notification, if any. It is
    /// Confirmable, because a queued RPC request must be acknowledged and
    /// queued attribute state replaced an acknowledged one.
    pub fn acknowledged(
        &self,
        endpoint: &Arc<Endpoint>,
        peer: SocketAddr,
        token: &[u8],
    ) -> Option<Notification> {
        let weak = Arc::downgrade(endpoint);
        let mut lists = self.lists.lock();
        let observer = lists.values_mut().flatten().find(|observer| {
            observer.peer == peer
                && observer.token == token
                && Weak::ptr_eq(&observer.endpoint, &weak)
        })?;
        let Some(payload) = observer.pending.pop_front() else {
            observer.in_flight = false;
            return None;
        };
        observer.sequence = (observer.sequence + 1) & SEQUENCE_MASK;
        observer.since_confirmable = 0;
        observer.last_confirmable = Instant::now();
        Some(Notification {
            endpoint: endpoint.clone(),
            peer,
            token: observer.token.clone(),
            sequence: observer.sequence,
            confirmable: true,
            payload,
        })
    }

    /// Returns the tenant of a live observer of `resource` of `device_id`.
    fn observer_tenant(&self, device_id: DeviceId, resource: Resource) -> Option<TenantId> {
        self.lists
            .lock()
            .get(&(device_id, resource))?
            .iter()
            .find(|observer| observer.endpoint.strong_count() > 0)
            .map(|observer| observer.tenant_id)
    }
}

/// Ends observations as revocation events arrive, until `observers` is
/// dropped. After missed events, every token that observers hold is
/// checked again.
pub async fn watch_revocations(observers: Weak<Observers>, auth: Weak<Auth>) {
    let Some(mut receiver) = auth.upgrade().map(|auth| auth.revocations().subscribe()) else {
        return;
    };
    loop {
        let received = receiver.recv().await;
        let Some(current) = observers.upgrade() else {
            return;
        };
        match received {
            Ok(event) => current.remove_revoked(|held| event.matches(held)),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                let Some(auth) = auth.upgrade() else {
                    return;
                };
                for hash in current.token_hashes() {
                    let result = auth.recheck(&HeldCredential::DeviceToken(hash)).await;
                    if matches!(result, Err(AuthError::InvalidDeviceToken)) {
                        let event = Revoked::DeviceToken(hash);
                        current.remove_revoked(|held| event.matches(held));
                    }
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl ExternalReceivers for Observers {
    fn remove_device(&self, device_id: DeviceId) {
        Observers::remove_device(self, device_id);
    }

    fn reachable_tenant(&self, device_id: DeviceId) -> Option<TenantId> {
        self.observer_tenant(device_id, Resource::Rpc)
    }

    fn deliver(&self, device_id: DeviceId, suffix: &str, payload: &Bytes) -> usize {
        let notifications = if suffix == ATTRIBUTES_SUFFIX {
            self.prepare(device_id, Resource::Attributes, payload)
        } else if let Some(request_id) = suffix.strip_prefix(RPC_REQUEST_PREFIX) {
            let Some(payload) = rpc_notification(request_id, payload) else {
                return 0;
            };
            // The rpc resource has no state that a GET could return block
            // by block, so an RPC request must fit in one notification.
            // Counting it as undelivered lets the caller learn that.
            if payload.len() > MAX_RPC_NOTIFICATION_BYTES {
                events::observer("rpc_too_large");
                tracing::warn!(%device_id, request_id, size = payload.len(), limit = MAX_RPC_NOTIFICATION_BYTES, "an RPC request is too large for a CoAP notification; not delivered");
                return 0;
            }
            self.prepare(device_id, Resource::Rpc, &payload)
        } else {
            return 0;
        };
        let count = notifications.len();
        for notification in notifications {
            notification
                .endpoint
                .clone()
                .send_notification(notification);
        }
        count
    }
}

/// Queues `payload` behind the observer's unacknowledged notification:
/// newer attribute state replaces older, RPC requests keep their order.
fn queue_pending(observer: &mut Observer, resource: Resource, payload: &Bytes) {
    match resource {
        Resource::Attributes => {
            observer.pending.clear();
            observer.pending.push_back(payload.clone());
        }
        Resource::Rpc => {
            if observer.pending.len() >= MAX_PENDING_RPC {
                observer.pending.pop_front();
                events::observer("rpc_dropped");
            }
            observer.pending.push_back(payload.clone());
        }
    }
}

/// Builds the body of an RPC notification: the request
/// `{"method", "params"}` with its request id added as `"id"`, the form
/// of ThingsBoard's CoAP device API.
fn rpc_notification(request_id: &str, request: &Bytes) -> Option<Bytes> {
    let id: u64 = request_id.parse().ok()?;
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(request).ok()?;
    body.insert("id".into(), id.into());
    Some(Bytes::from(serde_json::Value::Object(body).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_notification_adds_the_request_id() {
        let body = rpc_notification(
            "42",
            &Bytes::from_static(br#"{"method":"reboot","params":{}}"#),
        )
        .expect("valid request");
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["id"], 42);
        assert_eq!(value["method"], "reboot");
        assert!(rpc_notification("x", &Bytes::from_static(b"{}")).is_none());
    }

    #[test]
    fn sequence_numbers_wrap_at_24_bits() {
        assert_eq!((SEQUENCE_MASK + 1) & SEQUENCE_MASK, 0);
    }
}
