//! Sessions: the state that outlives one network connection of a client,
//! kept in memory by tenant and client id.
//!
//! ## State
//! A session contains its device and its subscriptions. While no
//! connection is attached, it also keeps its [`DeliveryState`]:
//! - `inflight`: QoS 1 and 2 messages sent and not acknowledged (PUBACK,
//!   or PUBREC for QoS 2);
//! - `released`: packet ids of outgoing QoS 2 messages whose PUBREC came
//!   and whose PUBREL waits for PUBCOMP;
//! - `queued`: QoS 1 messages that arrived since, at most
//!   `mqtt.max_queued_messages`, the oldest dropped first;
//! - `qos2_stored`: packet ids of QoS 2 PUBLISHes stored and waiting for
//!   PUBREL.
//!
//! While a connection is attached, that connection owns the delivery state
//! (see `connection.rs`) and the store keeps only a [`ConnectionLink`].
//!
//! ## Invariants
//! - Client ids are scoped by tenant: the same client id in two tenants
//!   names two sessions, so no client can reach another tenant's session.
//! - A session belongs to one owner: one device, or the applications of
//!   one tenant. A connection of another owner with the same client id is
//!   rejected and the session is left as it is ([`Attach::Conflict`]).
//! - At most one connection is attached to a session. A second connection
//!   with the same client id requests the first to close, waits until it
//!   has handed its state back (or [`TAKEOVER_WAIT`] passed), then resumes
//!   the session.
//! - Each attach gets a new generation number; a connection changes the
//!   store only while its generation is the session's current one, so a
//!   connection that was taken over cannot overwrite its successor.
//! - A session with expiry 0 ends when its connection ends; others end
//!   `expiry` after the connection ended, unless resumed before
//!   ([`SessionStore::remove_expired`]).
//!
//! All state is in memory: sessions do not survive a restart of the server.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqtt5_protocol::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::events;
use crate::ids::{DeviceId, TenantId};

/// Maximum wait of a new connection for the old connection of the same
/// client id to finish. The old connection first lets its appends finish,
/// which the ingest log bounds by `ingest.append_timeout` (5 s by default).
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// An MQTT client identifier, scoped by the tenant of the client that
/// sent it. Two clients of different tenants never share a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientId {
    /// `None` for ids the server makes up itself, which are unique anyway.
    tenant_id: Option<TenantId>,
    id: Arc<str>,
}

impl ClientId {
    /// Builds an id outside any tenant, for ids that the server generates.
    pub fn new(id: &str) -> Self {
        Self {
            tenant_id: None,
            id: Arc::from(id),
        }
    }

    /// Builds the id `id` as sent by a client of `tenant_id`.
    pub fn scoped(tenant_id: TenantId, id: &str) -> Self {
        Self {
            tenant_id: Some(tenant_id),
            id: Arc::from(id),
        }
    }

    /// Returns the id as the client sent it, without the tenant.
    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// A message for a subscriber, with the topic in the subscriber's spelling.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// MQTT 5 properties forwarded to the subscriber; `None` when there
    /// are none, so that most messages carry no allocation for them.
    pub properties: Option<Arc<MessageProperties>>,
    /// RETAIN flag of the PUBLISH to the subscriber: set for retained
    /// messages sent after SUBSCRIBE, and for Retain As Published.
    pub retain: bool,
    /// When the message expires (MQTT 5 Message Expiry Interval); an
    /// expired message is dropped instead of sent.
    pub expires_at: Option<Instant>,
    /// MQTT 5 Subscription Identifiers of the subscriptions this copy is
    /// sent for, in no particular order ([MQTT-3.3.4-3], [MQTT-3.3.4-4]).
    pub subscription_identifiers: Vec<u32>,
}

/// A message as published, before it is routed to subscribers.
#[derive(Debug, Clone)]
pub struct RoutedMessage {
    pub payload: Bytes,
    pub qos: QoS,
    /// RETAIN flag of the PUBLISH that carried it.
    pub retain: bool,
    pub properties: Option<Arc<MessageProperties>>,
    pub expires_at: Option<Instant>,
}

impl RoutedMessage {
    /// Builds a message without retain flag, properties or expiry.
    pub fn plain(payload: Bytes, qos: QoS) -> Self {
        Self {
            payload,
            qos,
            retain: false,
            properties: None,
            expires_at: None,
        }
    }
}

/// The MQTT 5 PUBLISH properties that a broker forwards unchanged from the
/// publisher to each subscriber (MQTT 5.0, 3.3.2.3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub payload_is_utf8: bool,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

/// The scope that a shared subscription group lives in: a device's
/// namespace or a tenant's application tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShareScope {
    Device(DeviceId),
    Tenant(TenantId),
}

/// The client a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A device, authenticated with its access token.
    Device {
        device_id: DeviceId,
        tenant_id: TenantId,
    },
    /// An application (API key or user) of a tenant.
    Application { tenant_id: TenantId },
}

impl Owner {
    /// Returns the scope of the shared subscription groups that this owner
    /// joins.
    pub fn share_scope(self) -> ShareScope {
        match self {
            Owner::Device { device_id, .. } => ShareScope::Device(device_id),
            Owner::Application { tenant_id } => ShareScope::Tenant(tenant_id),
        }
    }

    pub fn tenant_id(self) -> TenantId {
        match self {
            Owner::Device { tenant_id, .. } | Owner::Application { tenant_id } => tenant_id,
        }
    }
}

/// One accepted subscription of a session.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The filter as the client sent it, with `$share/{ShareName}/` for a
    /// shared subscription.
    pub filter: String,
    /// Start of the topic filter in `filter`: after `$share/{ShareName}/`
    /// for a shared subscription, otherwise 0.
    pub filter_start: usize,
    /// Length of the namespace prefix in `filter` after `filter_start`
    /// (see `topics.rs`).
    pub prefix_len: usize,
    /// Shared subscription: one member of the group receives each message.
    pub shared: bool,
    /// `filter` after the prefix, matched against topic suffixes.
    pub suffix_filter: String,
    /// Granted QoS.
    pub qos: QoS,
    /// MQTT 5 No Local: messages this session publishes are not sent back.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: forwarded messages keep their RETAIN
    /// flag instead of having it cleared.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier from the SUBSCRIBE, sent with every
    /// message delivered for this subscription.
    pub identifier: Option<u32>,
}

impl Subscription {
    /// The namespace prefix that topics sent for this subscription begin
    /// with, in the spelling of the filter.
    pub fn topic_prefix(&self) -> &str {
        &self.filter[self.filter_start..self.filter_start + self.prefix_len]
    }
}

/// Delivery state that a connection owns while it is attached to the
/// session and returns to the store when it ends.
#[derive(Debug)]
pub struct DeliveryState {
    /// QoS 1 and 2 messages sent and not yet acknowledged with PUBACK or
    /// PUBREC, oldest first.
    pub inflight: VecDeque<(u16, Outgoing)>,
    /// Packet ids of outgoing QoS 2 messages released with PUBREL and
    /// waiting for PUBCOMP, oldest first.
    pub released: VecDeque<u16>,
    /// Messages not sent yet, oldest first.
    pub queued: VecDeque<Outgoing>,
    /// Packet ids of QoS 2 PUBLISHes that were stored and acknowledged with
    /// PUBREC, waiting for PUBREL.
    pub qos2_stored: Vec<u16>,
    /// Packet id to try first for the next outgoing QoS 1 or 2 message.
    pub next_packet_id: u16,
}

impl Default for DeliveryState {
    fn default() -> Self {
        Self {
            inflight: VecDeque::new(),
            released: VecDeque::new(),
            queued: VecDeque::new(),
            qos2_stored: Vec::new(),
            next_packet_id: 1,
        }
    }
}

impl DeliveryState {
    /// Outgoing QoS 1 and 2 messages not yet fully acknowledged, which the
    /// client's Receive Maximum bounds ([MQTT-3.3.4-9]).
    pub fn unacknowledged(&self) -> usize {
        self.inflight.len() + self.released.len()
    }
}

/// The store's link to the connection attached to a session.
#[derive(Debug)]
pub struct ConnectionLink {
    pub generation: u64,
    /// Messages routed to the connection; bounded, see `Router`. Boxed so
    /// that the channel's buffer of an idle connection stays small.
    pub deliveries: mpsc::Sender<Box<Outgoing>>,
    /// Cancelled to ask the connection to close because another
    /// connection takes the session over.
    takeover: CancellationToken,
    /// Cancelled by the connection once it has ended and handed its state
    /// back.
    finished: CancellationToken,
}

#[derive(Debug)]
pub enum Presence {
    Online(ConnectionLink),
    Offline {
        expires_at: Instant,
        state: DeliveryState,
        /// Cancels a will message waiting for its delay interval; the will
        /// is not sent when the session is resumed first.
        pending_will: Option<CancellationToken>,
    },
}

#[derive(Debug)]
pub struct Session {
    pub owner: Owner,
    /// Time the session outlives its connection; zero for clean sessions.
    pub expiry: Duration,
    pub subscriptions: Vec<Subscription>,
    pub presence: Presence,
}

/// Parameters of a connection's request to attach to its session.
#[derive(Debug, Clone)]
pub struct AttachRequest {
    pub client_id: ClientId,
    pub owner: Owner,
    /// Clean Start (MQTT 5) or Clean Session (3.1.1): discard any state.
    pub clean_start: bool,
    pub expiry: Duration,
    /// Take the session even though the old connection has not finished.
    pub force: bool,
}

/// A session now held by the attaching connection.
#[derive(Debug)]
pub struct Attached {
    pub generation: u64,
    /// Whether an existing session was resumed (CONNACK session present).
    pub session_present: bool,
    pub state: DeliveryState,
    pub deliveries: mpsc::Receiver<Box<Outgoing>>,
    /// Cancelled when another connection takes the session over.
    pub takeover: CancellationToken,
    /// To cancel once the connection has ended and detached.
    pub finished: CancellationToken,
}

#[derive(Debug)]
pub enum Attach {
    Attached(Attached),
    /// Another connection is attached to the session and was requested to
    /// close: wait
    /// until `finished` is cancelled, then attach again.
    Wait {
        finished: CancellationToken,
    },
    /// The session of the client id belongs to another owner of the same
    /// tenant. It is left alone, and the new connection is rejected with
    /// Client Identifier not valid.
    Conflict,
}

/// All sessions of the server, guarded by the router's mutex. Every method
/// is synchronous and does no I/O, so the lock is held only briefly.
#[derive(Debug)]
pub struct SessionStore {
    pub sessions: HashMap<ClientId, Session>,
    /// Client ids of the sessions of each device, for routing.
    pub by_device: HashMap<DeviceId, Vec<ClientId>>,
    /// Client ids of the application sessions of each tenant, for routing.
    pub by_tenant: HashMap<TenantId, Vec<ClientId>>,
    next_generation: u64,
    /// Offline queue limit per session.
    pub max_queued: usize,
    /// Round-robin position of each shared subscription group, removed
    /// when the group's last member unsubscribes or its session ends.
    pub share_cursors: HashMap<(ShareScope, String), usize>,
    /// Capacity of the delivery channel of each connection.
    delivery_capacity: usize,
}

impl SessionStore {
    pub fn new(max_queued: usize, delivery_capacity: usize) -> Self {
        Self {
            sessions: HashMap::new(),
            by_device: HashMap::new(),
            by_tenant: HashMap::new(),
            next_generation: 1,
            max_queued,
            share_cursors: HashMap::new(),
            delivery_capacity: delivery_capacity.max(1),
        }
    }

    /// Gives the session of `request.client_id` to a new connection:
    /// resumes it, replaces it, or requests the attached connection to close
    /// first. A session of another owner is neither taken over nor ended,
    /// unless it already expired.
    pub fn attach(&mut self, request: &AttachRequest, now: Instant) -> Attach {
        let mut resumed = None;
        if let Some(existing) = self.sessions.get(&request.client_id) {
            if existing.owner != request.owner && !is_expired(existing, now) {
                return Attach::Conflict;
            }
            let same_owner = existing.owner == request.owner;
            if let Presence::Online(link) = &existing.presence {
                link.takeover.cancel();
                if same_owner && !request.force {
                    return Attach::Wait {
                        finished: link.finished.clone(),
                    };
                }
            }

            let old = self
                .remove(&request.client_id)
                .expect("session was found above");
            if same_owner && !request.clean_start {
                resumed = resume(old, now);
            }
        }

        let (sender, receiver) = mpsc::channel(self.delivery_capacity);
        let takeover = CancellationToken::new();
        let finished = CancellationToken::new();
        let generation = self.next_generation;
        self.next_generation += 1;

        let session_present = resumed.is_some();
        let (subscriptions, state) = resumed.unwrap_or_default();
        self.insert(
            request.client_id.clone(),
            Session {
                owner: request.owner,
                expiry: request.expiry,
                subscriptions,
                presence: Presence::Online(ConnectionLink {
                    generation,
                    deliveries: sender,
                    takeover: takeover.clone(),
                    finished: finished.clone(),
                }),
            },
        );
        Attach::Attached(Attached {
            generation,
            session_present,
            state,
            deliveries: receiver,
            takeover,
            finished,
        })
    }

    /// Takes the session back from the connection of `generation` when it
    /// ends. A session with expiry 0 ends here; others keep `state`, the
    /// QoS 1 messages still in the delivery channel, and `pending_will`.
    /// Returns whether the session lives on.
    pub fn detach(
        &mut self,
        client_id: &ClientId,
        generation: u64,
        mut state: DeliveryState,
        deliveries: &mut mpsc::Receiver<Box<Outgoing>>,
        pending_will: Option<CancellationToken>,
        now: Instant,
    ) -> bool {
        let max_queued = self.max_queued;
        let Some(session) = self.current_session(client_id, generation) else {
            return false;
        };
        if session.expiry.is_zero() {
            self.remove(client_id);
            return false;
        }

        // The router sends only while holding the lock that guards this
        // store, so nothing arrives after this drain.
        deliveries.close();
        while let Ok(message) = deliveries.try_recv() {
            if message.qos != QoS::AtMostOnce {
                state.queued.push_back(*message);
            }
        }
        while state.queued.len() > max_queued {
            state.queued.pop_front();
            events::deliveries_dropped("offline_queue_full", 1);
        }

        session.presence = Presence::Offline {
            expires_at: now + session.expiry,
            state,
            pending_will,
        };
        true
    }

    /// Returns the session of `client_id` if the connection of `generation`
    /// is still attached to it.
    pub fn current_session(
        &mut self,
        client_id: &ClientId,
        generation: u64,
    ) -> Option<&mut Session> {
        let session = self.sessions.get_mut(client_id)?;
        match &session.presence {
            Presence::Online(link) if link.generation == generation => Some(session),
            _ => None,
        }
    }

    /// Changes the expiry of the session held by the connection of
    /// `generation` (MQTT 5 DISCONNECT with Session Expiry Interval).
    pub fn set_expiry(&mut self, client_id: &ClientId, generation: u64, expiry: Duration) {
        if let Some(session) = self.current_session(client_id, generation) {
            session.expiry = expiry;
        }
    }

    /// Ends the offline sessions whose expiry has passed. Returns how many.
    pub fn remove_expired(&mut self, now: Instant) -> usize {
        let expired: Vec<ClientId> = self
            .sessions
            .iter()
            .filter(|(_, session)| matches!(session.presence, Presence::Offline { expires_at, .. } if expires_at <= now))
            .map(|(client_id, _)| client_id.clone())
            .collect();
        for client_id in &expired {
            self.remove(client_id);
        }
        expired.len()
    }

    fn insert(&mut self, client_id: ClientId, session: Session) {
        let index = match session.owner {
            Owner::Device { device_id, .. } => self.by_device.entry(device_id).or_default(),
            Owner::Application { tenant_id } => self.by_tenant.entry(tenant_id).or_default(),
        };
        index.push(client_id.clone());
        self.sessions.insert(client_id, session);
    }

    fn remove(&mut self, client_id: &ClientId) -> Option<Session> {
        let session = self.sessions.remove(client_id)?;
        match session.owner {
            Owner::Device { device_id, .. } => {
                remove_from_index(&mut self.by_device, device_id, client_id);
            }
            Owner::Application { tenant_id } => {
                remove_from_index(&mut self.by_tenant, tenant_id, client_id);
            }
        }
        for subscription in session.subscriptions.iter().filter(|s| s.shared) {
            self.release_share_cursor(session.owner.share_scope(), &subscription.filter);
        }
        Some(session)
    }

    /// Removes the round-robin position of the shared subscription group
    /// `filter` once no session of `scope` subscribes to it any more, so
    /// that groups that come and go do not add up.
    pub fn release_share_cursor(&mut self, scope: ShareScope, filter: &str) {
        let members = match scope {
            ShareScope::Device(device_id) => self.by_device.get(&device_id),
            ShareScope::Tenant(tenant_id) => self.by_tenant.get(&tenant_id),
        };
        let in_use = members
            .into_iter()
            .flatten()
            .filter_map(|client_id| self.sessions.get(client_id))
            .any(|session| {
                session
                    .subscriptions
                    .iter()
                    .any(|subscription| subscription.shared && subscription.filter == filter)
            });
        if !in_use {
            self.share_cursors.remove(&(scope, filter.to_owned()));
        }
    }
}

fn remove_from_index<K: std::hash::Hash + Eq>(
    index: &mut HashMap<K, Vec<ClientId>>,
    key: K,
    client_id: &ClientId,
) {
    if let Some(clients) = index.get_mut(&key) {
        clients.retain(|id| id != client_id);
        if clients.is_empty() {
            index.remove(&key);
        }
    }
}

/// Returns whether an offline session has outlived its expiry; the
/// periodic sweep has not removed it yet.
fn is_expired(session: &Session, now: Instant) -> bool {
    matches!(session.presence, Presence::Offline { expires_at, .. } if expires_at <= now)
}

/// Returns the subscriptions and delivery state of a session that a new
/// connection continues; `None` when the session already expired.
fn resume(old: Session, now: Instant) -> Option<(Vec<Subscription>, DeliveryState)> {
    match old.presence {
        Presence::Offline {
            expires_at,
            state,
            pending_will,
        } => {
            if let Some(will) = pending_will {
                will.cancel();
            }
            (expires_at > now).then_some((old.subscriptions, state))
        }
        // Forced takeover: the old connection did not hand its state back
        // in time, so only the subscriptions carry over.
        Presence::Online(_) => Some((old.subscriptions, DeliveryState::default())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(client_id: &str, device_id: DeviceId, clean_start: bool) -> AttachRequest {
        AttachRequest {
            client_id: ClientId::new(client_id),
            owner: Owner::Device {
                device_id,
                tenant_id: "00000000-0000-7000-8000-000000000001"
                    .parse()
                    .expect("valid tenant id"),
            },
            clean_start,
            expiry: Duration::from_secs(60),
            force: false,
        }
    }

    fn attached(attach: Attach) -> Attached {
        match attach {
            Attach::Attached(attached) => attached,
            Attach::Wait { .. } | Attach::Conflict => {
                panic!("expected the session to be attached")
            }
        }
    }

    fn message(topic: &str) -> Outgoing {
        Outgoing {
            topic: topic.to_owned(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            properties: None,
            retain: false,
            expires_at: None,
            subscription_identifiers: Vec::new(),
        }
    }

    #[test]
    fn persistent_session_is_resumed_with_its_queue() {
        let mut store = SessionStore::new(10, 10);
        let device = DeviceId::new_random();
        let now = Instant::now();
        let first = attached(store.attach(&request("c", device, false), now));
        assert!(!first.session_present);

        let mut receiver = first.deliveries;
        let sender = match &store.sessions[&ClientId::new("c")].presence {
            Presence::Online(link) => link.deliveries.clone(),
            Presence::Offline { .. } => panic!("online expected"),
        };
        sender
            .try_send(Box::new(message("a")))
            .expect("room in channel");
        assert!(store.detach(
            &ClientId::new("c"),
            first.generation,
            DeliveryState::default(),
            &mut receiver,
            None,
            now
        ));

        let second = attached(store.attach(&request("c", device, false), now));
        assert!(second.session_present);
        assert_eq!(second.state.queued.len(), 1);
    }

    #[test]
    fn clean_start_discards_the_session() {
        let mut store = SessionStore::new(10, 10);
        let device = DeviceId::new_random();
        let now = Instant::now();
        let mut first = attached(store.attach(&request("c", device, false), now));
        store.detach(
            &ClientId::new("c"),
            first.generation,
            DeliveryState::default(),
            &mut first.deliveries,
            None,
            now,
        );

        let second = attached(store.attach(&request("c", device, true), now));
        assert!(!second.session_present);
    }

    #[test]
    fn online_session_of_same_device_waits_for_takeover() {
        let mut store = SessionStore::new(10, 10);
        let device = DeviceId::new_random();
        let now = Instant::now();
        let first = attached(store.attach(&request("c", device, false), now));

        let Attach::Wait { .. } = store.attach(&request("c", device, false), now) else {
            panic!("expected to wait for the first connection");
        };
        assert!(first.takeover.is_cancelled());
    }

    #[test]
    fn other_device_with_same_client_id_is_rejected() {
        let mut store = SessionStore::new(10, 10);
        let now = Instant::now();
        let device = DeviceId::new_random();
        let mut first = attached(store.attach(&request("c", device, false), now));

        let attach = store.attach(&request("c", DeviceId::new_random(), false), now);
        assert!(matches!(attach, Attach::Conflict));
        assert!(!first.takeover.is_cancelled());

        // The owner's session is still there and resumes.
        assert!(store.detach(
            &ClientId::new("c"),
            first.generation,
            DeliveryState::default(),
            &mut first.deliveries,
            None,
            now
        ));
        let again = attached(store.attach(&request("c", device, false), now));
        assert!(again.session_present);
    }

    #[test]
    fn other_device_may_reuse_an_expired_client_id() {
        let mut store = SessionStore::new(10, 10);
        let now = Instant::now();
        let mut first = attached(store.attach(&request("c", DeviceId::new_random(), false), now));
        store.detach(
            &ClientId::new("c"),
            first.generation,
            DeliveryState::default(),
            &mut first.deliveries,
            None,
            now,
        );

        let later = now + Duration::from_secs(61);
        let other_device = DeviceId::new_random();
        let second = attached(store.attach(&request("c", other_device, false), later));
        assert!(!second.session_present);
        assert!(matches!(
            store.sessions[&ClientId::new("c")].owner,
            Owner::Device { device_id, .. } if device_id == other_device
        ));
    }

    #[test]
    fn same_client_id_in_two_tenants_is_two_sessions() {
        let mut store = SessionStore::new(10, 10);
        let now = Instant::now();
        let tenant_a = TenantId::new_random();
        let tenant_b = TenantId::new_random();
        let request_in = |tenant_id| AttachRequest {
            client_id: ClientId::scoped(tenant_id, "c"),
            owner: Owner::Application { tenant_id },
            clean_start: false,
            expiry: Duration::from_secs(60),
            force: false,
        };

        let first = attached(store.attach(&request_in(tenant_a), now));
        let second = attached(store.attach(&request_in(tenant_b), now));
        assert!(!first.takeover.is_cancelled());
        assert!(!second.session_present);
        assert_eq!(store.sessions.len(), 2);
    }

    #[test]
    fn share_cursor_is_released_with_last_member() {
        let mut store = SessionStore::new(10, 10);
        let now = Instant::now();
        let device = DeviceId::new_random();
        let filter = "$share/g/v1/devices/me/x";
        let subscription = Subscription {
            filter: filter.to_owned(),
            filter_start: "$share/g/".len(),
            prefix_len: "v1/devices/me/".len(),
            shared: true,
            suffix_filter: "x".to_owned(),
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            identifier: None,
        };
        let scope = ShareScope::Device(device);
        for client_id in ["a", "b"] {
            let _ = attached(store.attach(&request(client_id, device, true), now));
            let session = store
                .sessions
                .get_mut(&ClientId::new(client_id))
                .expect("attached session");
            session.subscriptions.push(subscription.clone());
        }
        store.share_cursors.insert((scope, filter.to_owned()), 3);

        store.remove(&ClientId::new("a"));
        assert!(
            store
                .share_cursors
                .contains_key(&(scope, filter.to_owned()))
        );
        store.remove(&ClientId::new("b"));
        assert!(store.share_cursors.is_empty());
    }

    #[test]
    fn expired_session_is_not_resumed() {
        let mut store = SessionStore::new(10, 10);
        let device = DeviceId::new_random();
        let now = Instant::now();
        let mut first = attached(store.attach(&request("c", device, false), now));
        store.detach(
            &ClientId::new("c"),
            first.generation,
            DeliveryState::default(),
            &mut first.deliveries,
            None,
            now,
        );

        let later = now + Duration::from_secs(61);
        assert_eq!(store.remove_expired(later), 1);
        let second = attached(store.attach(&request("c", device, false), later));
        assert!(!second.session_present);
    }

    #[test]
    fn offline_queue_keeps_the_newest_messages() {
        let mut store = SessionStore::new(2, 10);
        let device = DeviceId::new_random();
        let now = Instant::now();
        let mut first = attached(store.attach(&request("c", device, false), now));
        let mut state = DeliveryState::default();
        for topic in ["1", "2", "3"] {
            state.queued.push_back(message(topic));
        }
        store.detach(
            &ClientId::new("c"),
            first.generation,
            state,
            &mut first.deliveries,
            None,
            now,
        );

        let second = attached(store.attach(&request("c", device, false), now));
        let topics: Vec<&str> = second
            .state
            .queued
            .iter()
            .map(|m| m.topic.as_str())
            .collect();
        assert_eq!(topics, ["2", "3"]);
    }
}
