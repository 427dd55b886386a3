//! The in-process router: subscriptions of sessions and delivery of
//! messages to the sessions of one device.
//!
//! A device's publishes reach only the sessions of the same device, because
//! a device may subscribe only inside its own namespace (see `topics.rs`).
//! Routing therefore works on topic suffixes per device: `suffix` is the
//! topic after `v1/devices/me/` or `devices/{id}/`, and each subscriber gets
//! the topic in the spelling its filter used.
//!
//! Application sessions (`application.rs`) are indexed by tenant and
//! matched on the whole topic of the tenant's application tree
//! ([`Router::route_to_applications`]).
//!
//! Delivery never waits: a connected session gets the message through its
//! bounded channel, and a full channel drops the message (counted in
//! `ferrite_mqtt_deliveries_dropped_total{reason="queue_full"}`), so a slow
//! or dead client cannot stall a publisher. An offline persistent session
//! queues QoS 1 messages; offline sessions do not keep QoS 0 messages.
//!
//! Other parts of Ferrite (commands, shared attributes) send to devices
//! through [`Router::publish_to_device`], and send RPC requests with
//! [`Router::send_rpc_request`] and [`Router::call_device`] (`rpc.rs`). A
//! device's publish on `rpc/response/{id}` goes to the request waiting for
//! it, if any, instead of the device's subscribers.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use mqtt5_protocol::QoS;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::mpsc::error::TrySendError;

use super::events::{self, WarnLimiter};
use super::retained::RetainedStore;
use super::rpc::{self, PendingRequests, PendingResponse, RpcSendError};
use super::session::{
    ClientId, Outgoing, Presence, RoutedMessage, Session, SessionStore, ShareScope, Subscription,
};
use super::topics::{is_valid_topic_name, suffix_matches};
use crate::config::MqttConfig;
use crate::ids::{DeviceId, TenantId};

/// Receivers of a device's messages outside the MQTT sessions, such as
/// CoAP observers. Delivery must not wait, like delivery to sessions.
pub trait ExternalReceivers: Send + Sync {
    /// Returns the tenant of `device_id` when these receivers can reach it
    /// now, as the device authenticated when it registered.
    fn reachable_tenant(&self, device_id: DeviceId) -> Option<TenantId>;
    /// Delivers a message for the topic suffix `suffix` of `device_id`;
    /// returns the number of receivers that got it.
    fn deliver(&self, device_id: DeviceId, suffix: &str, payload: &Bytes) -> usize;
    /// Ends every receiver of `device_id`, because its credentials were
    /// revoked or the device was deleted.
    fn remove_device(&self, device_id: DeviceId);
}

/// Handle to the sessions and subscriptions of the MQTT server. Cheap to
/// clone; all clones share the same state.
#[derive(Clone)]
pub struct Router {
    sessions: Arc<Mutex<SessionStore>>,
    /// Limits warnings about full delivery channels for the whole server.
    queue_full_warnings: Arc<Mutex<WarnLimiter>>,
    /// RPC requests waiting for a device's response.
    rpc_requests: Arc<PendingRequests>,
    /// Receivers of other protocols, set once at start.
    external: Arc<OnceLock<Arc<dyn ExternalReceivers>>>,
    /// Retained messages; see `retained.rs`.
    retained: Arc<Mutex<RetainedStore>>,
}

impl Router {
    pub fn new(config: &MqttConfig) -> Self {
        // A connection's delivery channel takes as many messages as an
        // offline session may queue.
        let capacity = config.max_queued_messages.max(1);
        Self {
            sessions: Arc::new(Mutex::new(SessionStore::new(
                config.max_queued_messages,
                capacity,
            ))),
            queue_full_warnings: Arc::new(Mutex::new(WarnLimiter::default())),
            rpc_requests: Arc::new(PendingRequests::default()),
            external: Arc::new(OnceLock::new()),
            retained: Arc::new(Mutex::new(RetainedStore::new(
                config.max_retained_messages,
                config.max_retained_bytes,
            ))),
        }
    }

    /// Adds receivers outside the MQTT sessions to every delivery, RPC
    /// requests included. Only the first call has an effect.
    pub fn set_external_receivers(&self, receivers: Arc<dyn ExternalReceivers>) {
        if self.external.set(receivers).is_err() {
            // A second CoAP context would have observers that never get
            // a message, so the mistake is logged rather than hidden.
            tracing::warn!(
                "external receivers were already set; these receive nothing. Create one CoAP context per server"
            );
        }
    }

    /// Ends the external receivers of `device_id`, such as CoAP observers,
    /// which authenticated once and have no connection to close. MQTT and
    /// WebSocket connections of the device stay open.
    pub fn remove_external_device(&self, device_id: DeviceId) {
        if let Some(external) = self.external.get() {
            external.remove_device(device_id);
        }
    }

    /// Hands a device's response to RPC request `request_id` to the request
    /// waiting for it, as a publish on `rpc/response/{request_id}` would.
    /// Returns false when no request waits for it.
    pub fn complete_rpc_response(
        &self,
        device_id: DeviceId,
        request_id: u32,
        payload: &Bytes,
    ) -> bool {
        self.rpc_requests.complete(
            device_id,
            &format!("{}{request_id}", rpc::RESPONSE_SUFFIX),
            payload,
        )
    }

    /// Sends `payload` to the sessions of `device_id` whose subscriptions
    /// match the topic `v1/devices/me/{suffix}` (or its equal
    /// `devices/{device_id}/{suffix}`), with the lower of `qos` and the
    /// granted QoS. Returns the number of sessions
    /// that got the message or queued it: 0 when `suffix` is empty or
    /// contains a wildcard, which no topic name may.
    pub fn publish_to_device(
        &self,
        device_id: DeviceId,
        suffix: &str,
        payload: Bytes,
        qos: QoS,
    ) -> usize {
        if !is_valid_topic_name(suffix) {
            return 0;
        }
        self.route(device_id, suffix, &RoutedMessage::plain(payload, qos), None)
    }

    /// True when a connection of `device_id` in `tenant_id` is open, or an
    /// external receiver (a CoAP observer) of that device in `tenant_id`
    /// can reach it. A device of another tenant counts as not connected.
    pub fn is_device_connected_in(&self, device_id: DeviceId, tenant_id: TenantId) -> bool {
        let external_tenant = self
            .external
            .get()
            .and_then(|external| external.reachable_tenant(device_id));
        if external_tenant == Some(tenant_id) {
            return true;
        }
        let store = self.sessions.lock();
        let Some(clients) = store.by_device.get(&device_id) else {
            return false;
        };
        clients.iter().any(|client_id| {
            store.sessions.get(client_id).is_some_and(|session| {
                session.owner.tenant_id() == tenant_id
                    && matches!(session.presence, Presence::Online(_))
            })
        })
    }

    /// True when `tenant_id` has an application session, online or not,
    /// so that the live bridge can skip rendering messages without a recipient.
    pub fn has_application_sessions(&self, tenant_id: TenantId) -> bool {
        self.sessions.lock().by_tenant.contains_key(&tenant_id)
    }

    /// Routes a message on `topic` of the application topic tree of
    /// `tenant_id` to the application sessions of that tenant whose
    /// filters match. `publisher` is the publishing session, for MQTT 5
    /// No Local. Returns the number of sessions that got or queued it.
    pub(super) fn route_to_applications(
        &self,
        tenant_id: TenantId,
        topic: &str,
        message: &RoutedMessage,
        publisher: Option<&ClientId>,
    ) -> usize {
        let mut store = self.sessions.lock();
        let Some(clients) = store.by_tenant.get(&tenant_id).cloned() else {
            return 0;
        };
        let routed = route_in_scope(
            &mut store,
            &clients,
            ShareScope::Tenant(tenant_id),
            topic,
            message,
            publisher,
        );
        drop(store);

        if routed.queue_full > 0 {
            events::deliveries_dropped("queue_full", routed.queue_full);
        }
        routed.delivered
    }

    /// True when a connection of `device_id` is open, or an external
    /// receiver (a CoAP observer) can reach it.
    pub fn is_device_connected(&self, device_id: DeviceId) -> bool {
        if self
            .external
            .get()
            .is_some_and(|external| external.reachable_tenant(device_id).is_some())
        {
            return true;
        }
        let store = self.sessions.lock();
        let Some(clients) = store.by_device.get(&device_id) else {
            return false;
        };
        clients.iter().any(|client_id| {
            store
                .sessions
                .get(client_id)
                .is_some_and(|session| matches!(session.presence, Presence::Online(_)))
        })
    }

    /// Sends the RPC request `{"method", "params"}` to `device_id` with QoS 1
    /// and returns its request id, without waiting for a response. An
    /// offline persistent session queues the request.
    pub fn send_rpc_request(
        &self,
        device_id: DeviceId,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<u32, RpcSendError> {
        let request_id = self.rpc_requests.next_request_id();
        if self.publish_rpc_request(device_id, request_id, method, params) == 0 {
            return Err(RpcSendError::NotSubscribed);
        }
        Ok(request_id)
    }

    /// Sends an RPC request to a connected device and returns the wait for
    /// its response on `rpc/response/{request_id}`.
    pub fn call_device(
        &self,
        device_id: DeviceId,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<PendingResponse, RpcSendError> {
        if !self.is_device_connected(device_id) {
            return Err(RpcSendError::NotConnected);
        }
        let request_id = self.rpc_requests.next_request_id();
        // Registered first, so that a fast response cannot arrive before.
        let pending = self.rpc_requests.register(device_id, request_id);
        if self.publish_rpc_request(device_id, request_id, method, params) == 0 {
            return Err(RpcSendError::NotSubscribed);
        }
        Ok(pending)
    }

    fn publish_rpc_request(
        &self,
        device_id: DeviceId,
        request_id: u32,
        method: &str,
        params: &serde_json::Value,
    ) -> usize {
        let payload = serde_json::json!({"method": method, "params": params});
        self.publish_to_device(
            device_id,
            &format!("{}{request_id}", rpc::REQUEST_SUFFIX),
            Bytes::from(payload.to_string()),
            QoS::AtLeastOnce,
        )
    }

    /// Routes a publish of the session `publisher` (for MQTT 5 No Local).
    /// A device's RPC response that a request waits for goes to that
    /// request only and counts as one delivery.
    pub(super) fn route(
        &self,
        device_id: DeviceId,
        suffix: &str,
        message: &RoutedMessage,
        publisher: Option<&ClientId>,
    ) -> usize {
        if publisher.is_some()
            && self
                .rpc_requests
                .complete(device_id, suffix, &message.payload)
        {
            return 1;
        }
        let external = self.external.get().map_or(0, |external| {
            external.deliver(device_id, suffix, &message.payload)
        });

        let mut store = self.sessions.lock();
        let Some(clients) = store.by_device.get(&device_id).cloned() else {
            return external;
        };
        let routed = route_in_scope(
            &mut store,
            &clients,
            ShareScope::Device(device_id),
            suffix,
            message,
            publisher,
        );
        drop(store);

        if routed.queue_full > 0 {
            self.warn_queue_full(device_id, routed.queue_full);
        }
        routed.delivered + external
    }

    /// Locks the session store for the steps of a connection.
    pub(super) fn sessions(&self) -> MutexGuard<'_, SessionStore> {
        self.sessions.lock()
    }

    /// Locks the retained messages.
    pub(super) fn retained(&self) -> MutexGuard<'_, RetainedStore> {
        self.retained.lock()
    }

    /// Returns the filters of the subscriptions of the session held by the
    /// connection of `generation`.
    pub(super) fn subscription_filters(
        &self,
        client_id: &ClientId,
        generation: u64,
    ) -> std::collections::HashSet<String> {
        let mut store = self.sessions.lock();
        match store.current_session(client_id, generation) {
            Some(session) => session
                .subscriptions
                .iter()
                .map(|subscription| subscription.filter.clone())
                .collect(),
            None => std::collections::HashSet::new(),
        }
    }

    /// Adds `subscriptions` to the session held by the connection of
    /// `generation`, replacing those with the same filter ([MQTT-3.8.4-3]).
    /// Returns, per subscription, whether one with its filter existed.
    pub(super) fn subscribe(
        &self,
        client_id: &ClientId,
        generation: u64,
        subscriptions: Vec<Subscription>,
    ) -> Vec<bool> {
        let mut store = self.sessions.lock();
        let Some(session) = store.current_session(client_id, generation) else {
            return vec![false; subscriptions.len()];
        };
        let mut existed = Vec::with_capacity(subscriptions.len());
        for subscription in subscriptions {
            match session
                .subscriptions
                .iter_mut()
                .find(|existing| existing.filter == subscription.filter)
            {
                Some(existing) => {
                    *existing = subscription;
                    existed.push(true);
                }
                None => {
                    session.subscriptions.push(subscription);
                    existed.push(false);
                }
            }
        }
        existed
    }

    /// Removes the subscriptions with these filters. Returns, per filter,
    /// whether a subscription existed.
    pub(super) fn unsubscribe(
        &self,
        client_id: &ClientId,
        generation: u64,
        filters: &[String],
    ) -> Vec<bool> {
        let mut store = self.sessions.lock();
        let Some(session) = store.current_session(client_id, generation) else {
            return vec![false; filters.len()];
        };
        let scope = session.owner.share_scope();
        let mut released_shares = Vec::new();
        let existed = filters
            .iter()
            .map(|filter| {
                let before = session.subscriptions.len();
                session.subscriptions.retain(|existing| {
                    let removed = &existing.filter == filter;
                    if removed && existing.shared {
                        released_shares.push(filter.clone());
                    }
                    !removed
                });
                session.subscriptions.len() != before
            })
            .collect();
        for filter in &released_shares {
            store.release_share_cursor(scope, filter);
        }
        existed
    }

    /// Ends offline sessions whose expiry has passed.
    pub(super) fn remove_expired_sessions(&self) -> usize {
        self.sessions.lock().remove_expired(Instant::now())
    }

    fn warn_queue_full(&self, device_id: DeviceId, sessions: usize) {
        events::deliveries_dropped("queue_full", sessions);
        let allowed = self.queue_full_warnings.lock().allow(Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(
                %device_id,
                sessions,
                suppressed,
                "dropped a message for MQTT sessions whose clients do not read fast enough; later drops are counted in ferrite_mqtt_deliveries_dropped_total"
            );
        }
    }
}

/// Sessions that got a message, and sessions whose channel was full.
#[derive(Debug, Default)]
struct Routed {
    delivered: usize,
    queue_full: usize,
}

impl Routed {
    fn count(&mut self, result: DeliveryResult) {
        match result {
            DeliveryResult::Delivered => self.delivered += 1,
            DeliveryResult::QueueFull => self.queue_full += 1,
            DeliveryResult::Skipped => {}
        }
    }
}

/// A session whose shared subscription matches a message.
struct ShareCandidate {
    client_id: ClientId,
    subscription: Subscription,
    online: bool,
}

/// Routes a message on `topic` (a device's topic suffix, or a topic of the
/// application tree) to the sessions `clients` of one scope.
///
/// Each session gets one copy for its best matching non-shared
/// subscription. Each shared subscription filter (group) gets one copy for
/// one member, chosen round robin among the members online. When no member
/// is online, the first offline member queues it.
fn route_in_scope(
    store: &mut SessionStore,
    clients: &[ClientId],
    scope: ShareScope,
    topic: &str,
    message: &RoutedMessage,
    publisher: Option<&ClientId>,
) -> Routed {
    let mut routed = Routed::default();
    let mut groups: BTreeMap<String, Vec<ShareCandidate>> = BTreeMap::new();
    let max_queued = store.max_queued;

    for client_id in clients {
        let Some(session) = store.sessions.get_mut(client_id) else {
            continue;
        };
        let online = matches!(session.presence, Presence::Online(_));
        for shared in session
            .subscriptions
            .iter()
            .filter(|subscription| subscription.shared)
            .filter(|subscription| suffix_matches(&subscription.suffix_filter, topic))
        {
            groups
                .entry(shared.filter.clone())
                .or_default()
                .push(ShareCandidate {
                    client_id: client_id.clone(),
                    subscription: shared.clone(),
                    online,
                });
        }

        let is_publisher = publisher == Some(client_id);
        let Some(subscription) = best_match(&session.subscriptions, topic, is_publisher) else {
            continue;
        };
        let full_topic = format!("{}{topic}", subscription.topic_prefix());
        let mut outgoing = outgoing(full_topic, message, subscription);
        // The copy carries the identifiers of every matching subscription,
        // not only of the one whose QoS and topic it uses.
        outgoing.subscription_identifiers =
            matching_identifiers(&session.subscriptions, topic, is_publisher);
        routed.count(deliver(session, outgoing, max_queued));
    }

    for (filter, candidates) in groups {
        let online: Vec<&ShareCandidate> = candidates.iter().filter(|c| c.online).collect();
        let chosen = if online.is_empty() {
            candidates.first()
        } else {
            let cursor = store.share_cursors.entry((scope, filter)).or_default();
            let index = *cursor % online.len();
            *cursor = cursor.wrapping_add(1);
            Some(online[index])
        };
        let Some(chosen) = chosen else {
            continue;
        };
        let Some(session) = store.sessions.get_mut(&chosen.client_id) else {
            continue;
        };
        let full_topic = format!("{}{topic}", chosen.subscription.topic_prefix());
        let outgoing = outgoing(full_topic, message, &chosen.subscription);
        routed.count(deliver(session, outgoing, max_queued));
    }
    routed
}

enum DeliveryResult {
    Delivered,
    QueueFull,
    Skipped,
}

fn deliver(session: &mut Session, message: Outgoing, max_queued: usize) -> DeliveryResult {
    match &mut session.presence {
        Presence::Online(link) => match link.deliveries.try_send(Box::new(message)) {
            Ok(()) => DeliveryResult::Delivered,
            Err(TrySendError::Full(_)) => DeliveryResult::QueueFull,
            // The connection is ending; it hands its queue back under the
            // store's lock, after which it is no longer online.
            Err(TrySendError::Closed(_)) => DeliveryResult::Skipped,
        },
        Presence::Offline { state, .. } => {
            if message.qos == QoS::AtMostOnce {
                return DeliveryResult::Skipped;
            }
            state.queued.push_back(message);
            if state.queued.len() > max_queued {
                state.queued.pop_front();
                events::deliveries_dropped("offline_queue_full", 1);
            }
            DeliveryResult::Delivered
        }
    }
}

/// Builds the copy of `message` for one subscription: the lower QoS, and
/// the RETAIN flag only with Retain As Published ([MQTT-3.3.1-12],
/// [MQTT-3.3.1-13]).
fn outgoing(topic: String, message: &RoutedMessage, subscription: &Subscription) -> Outgoing {
    Outgoing {
        topic,
        payload: message.payload.clone(),
        qos: lower_qos(message.qos, subscription.qos),
        properties: message.properties.clone(),
        retain: message.retain && subscription.retain_as_published,
        expires_at: message.expires_at,
        subscription_identifiers: subscription.identifier.into_iter().collect(),
    }
}

/// Returns the non-shared subscriptions that `suffix` matches, without
/// those with No Local when the session itself published the message.
fn matching<'a>(
    subscriptions: &'a [Subscription],
    suffix: &'a str,
    is_publisher: bool,
) -> impl Iterator<Item = &'a Subscription> {
    subscriptions
        .iter()
        .filter(|subscription| !subscription.shared)
        .filter(move |subscription| !(is_publisher && subscription.no_local))
        .filter(move |subscription| suffix_matches(&subscription.suffix_filter, suffix))
}

/// Returns the Subscription Identifiers of all matching non-shared
/// subscriptions, which the one copy of a message carries ([MQTT-3.3.4-4]).
fn matching_identifiers(
    subscriptions: &[Subscription],
    suffix: &str,
    is_publisher: bool,
) -> Vec<u32> {
    matching(subscriptions, suffix, is_publisher)
        .filter_map(|subscription| subscription.identifier)
        .collect()
}

/// Picks the matching subscription with the highest QoS; a session gets
/// one copy of a message however many of its filters match.
fn best_match<'a>(
    subscriptions: &'a [Subscription],
    suffix: &'a str,
    is_publisher: bool,
) -> Option<&'a Subscription> {
    matching(subscriptions, suffix, is_publisher).fold(
        None,
        |best: Option<&Subscription>, candidate| match best {
            Some(best) if best.qos as u8 >= candidate.qos as u8 => Some(best),
            _ => Some(candidate),
        },
    )
}

/// Outgoing QoS: the lower of the published and the granted QoS.
fn lower_qos(published: QoS, granted: QoS) -> QoS {
    QoS::from((published as u8).min(granted as u8))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::adapters::mqtt::session::{Attach, AttachRequest, Attached, Owner};
    use crate::adapters::mqtt::topics::authorize_filter;

    fn config() -> MqttConfig {
        MqttConfig {
            max_queued_messages: 4,
            ..MqttConfig::default()
        }
    }

    fn attach(router: &Router, client_id: &str, device_id: DeviceId) -> Attached {
        let request = AttachRequest {
            client_id: ClientId::new(client_id),
            owner: Owner::Device {
                device_id,
                tenant_id: TenantId::from_bytes([1; 16]),
            },
            clean_start: false,
            expiry: Duration::from_secs(60),
            force: false,
        };
        match router.sessions().attach(&request, Instant::now()) {
            Attach::Attached(attached) => attached,
            Attach::Wait { .. } | Attach::Conflict => panic!("session unexpectedly held"),
        }
    }

    fn subscription(filter: &str, device_id: DeviceId, qos: QoS) -> Subscription {
        let authorized = authorize_filter(filter, device_id).expect("authorized filter");
        Subscription {
            filter: filter.to_owned(),
            filter_start: 0,
            prefix_len: authorized.prefix_len,
            shared: false,
            suffix_filter: authorized.suffix_filter,
            qos,
            no_local: false,
            retain_as_published: false,
            identifier: None,
        }
    }

    #[test]
    fn delivery_uses_the_subscribers_topic_spelling() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let mut by_me = attach(&router, "a", device);
        let mut by_id = attach(&router, "b", device);
        router.subscribe(
            &ClientId::new("a"),
            by_me.generation,
            vec![subscription(
                "v1/devices/me/attributes",
                device,
                QoS::AtLeastOnce,
            )],
        );
        router.subscribe(
            &ClientId::new("b"),
            by_id.generation,
            vec![subscription(
                &format!("devices/{device}/#"),
                device,
                QoS::AtMostOnce,
            )],
        );

        let delivered = router.publish_to_device(
            device,
            "attributes",
            Bytes::from_static(b"{}"),
            QoS::AtLeastOnce,
        );
        assert_eq!(delivered, 2);
        let to_me = by_me.deliveries.try_recv().expect("message for a");
        assert_eq!(to_me.topic, "v1/devices/me/attributes");
        assert_eq!(to_me.qos, QoS::AtLeastOnce);
        let to_id = by_id.deliveries.try_recv().expect("message for b");
        assert_eq!(to_id.topic, format!("devices/{device}/attributes"));
        assert_eq!(to_id.qos, QoS::AtMostOnce);
    }

    #[test]
    fn other_devices_do_not_receive() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let other = DeviceId::new_random();
        let mut session = attach(&router, "a", device);
        router.subscribe(
            &ClientId::new("a"),
            session.generation,
            vec![subscription("v1/devices/me/#", device, QoS::AtLeastOnce)],
        );

        assert_eq!(
            router.publish_to_device(other, "attributes", Bytes::new(), QoS::AtLeastOnce),
            0
        );
        assert!(session.deliveries.try_recv().is_err());
    }

    #[test]
    fn overlapping_filters_deliver_one_copy_with_highest_qos() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let mut session = attach(&router, "a", device);
        router.subscribe(
            &ClientId::new("a"),
            session.generation,
            vec![
                subscription("v1/devices/me/#", device, QoS::AtMostOnce),
                subscription("v1/devices/me/rpc/+", device, QoS::AtLeastOnce),
            ],
        );

        assert_eq!(
            router.publish_to_device(device, "rpc/request", Bytes::new(), QoS::ExactlyOnce),
            1
        );
        let message = session.deliveries.try_recv().expect("one message");
        assert_eq!(message.qos, QoS::AtLeastOnce);
        assert_eq!(message.topic, "v1/devices/me/rpc/request");
        assert!(session.deliveries.try_recv().is_err());
    }

    #[test]
    fn one_copy_carries_every_matching_subscription_identifier() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let mut session = attach(&router, "a", device);
        let identified = |filter: &str, identifier: Option<u32>| Subscription {
            identifier,
            ..subscription(filter, device, QoS::AtMostOnce)
        };
        router.subscribe(
            &ClientId::new("a"),
            session.generation,
            vec![
                identified("v1/devices/me/#", Some(7)),
                identified("v1/devices/me/rpc/+", Some(3)),
                identified("v1/devices/me/rpc/request", None),
                identified("v1/devices/me/other", Some(9)),
            ],
        );

        router.publish_to_device(device, "rpc/request", Bytes::new(), QoS::AtMostOnce);
        let message = session.deliveries.try_recv().expect("one message");
        let mut identifiers = message.subscription_identifiers.clone();
        identifiers.sort_unstable();
        assert_eq!(identifiers, [3, 7]);
        assert!(session.deliveries.try_recv().is_err());
    }

    #[test]
    fn full_delivery_channel_drops_instead_of_waiting() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let session = attach(&router, "a", device);
        router.subscribe(
            &ClientId::new("a"),
            session.generation,
            vec![subscription("v1/devices/me/#", device, QoS::AtLeastOnce)],
        );

        let delivered: usize = (0..10)
            .map(|_| router.publish_to_device(device, "x", Bytes::new(), QoS::AtLeastOnce))
            .sum();
        assert_eq!(delivered, config().max_queued_messages);
    }

    #[test]
    fn unsubscribe_reports_which_filters_existed() {
        let router = Router::new(&config());
        let device = DeviceId::new_random();
        let session = attach(&router, "a", device);
        router.subscribe(
            &ClientId::new("a"),
            session.generation,
            vec![subscription("v1/devices/me/x", device, QoS::AtMostOnce)],
        );

        let existed = router.unsubscribe(
            &ClientId::new("a"),
            session.generation,
            &["v1/devices/me/x".to_owned(), "v1/devices/me/y".to_owned()],
        );
        assert_eq!(existed, [true, false]);
        assert_eq!(
            router.publish_to_device(device, "x", Bytes::new(), QoS::AtMostOnce),
            0
        );
    }
}
