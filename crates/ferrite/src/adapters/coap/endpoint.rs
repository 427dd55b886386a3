//! The CoAP message layer of one transport (RFC 7252 section 4): Reset of
//! malformed Confirmable messages, duplicate detection, piggybacked or
//! separate responses, and Confirmable messages sent with retransmission.
//! Requests go on to `resources.rs`.
//!
//! ## Responses and durability
//! A Confirmable request whose processing (usually the ingest log append)
//! finishes within `coap.piggyback_wait` gets its response in the ACK.
//! Otherwise the endpoint sends an empty ACK, so the client stops
//! retransmitting, and sends the response later as a Confirmable message
//! with the request's token. Either way a 2.04 response is sent only after
//! the append returned, so the response, not the empty ACK, confirms to
//! the client that its data is durable.
//!
//! ## Ownership and shutdown
//! The transport owns the socket and calls [`Endpoint::handle_datagram`]
//! for each datagram. The endpoint owns its tasks (separate responses,
//! Confirmable notifications and the sweeper of idle uploads) in a
//! `TaskTracker`. [`Endpoint::close`] stops retransmissions and waits for
//! those tasks.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::{MessageClass, MessageType, RequestType, ResponseType};
use parking_lot::Mutex;
use tokio::sync::{Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::CoapContext;
use super::blockwise::{BlockLimits, BlockStore};
use super::error::CoapError;
use super::events;
use super::exchange::{ExchangeCache, ExchangeKey, ExchangeState, Seen};
use super::message::{self, FixedHeader, FormatError, Reply};
use super::observe::Notification;
use super::transport::{DatagramSink, PeerAuth};

/// ACK_TIMEOUT of RFC 7252 section 4.8.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// ACK_RANDOM_FACTOR of RFC 7252 section 4.8.
const ACK_RANDOM_FACTOR: f64 = 1.5;
/// MAX_RETRANSMIT of RFC 7252 section 4.8.
const MAX_RETRANSMIT: u32 = 4;
/// How often idle Block1 uploads are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// Non-confirmable notifications remembered, so that a Reset in reply to
/// one ends its observation.
const MAX_RECENT_NOTIFICATIONS: usize = 4096;

/// The outcome of a Confirmable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Confirmation {
    Acknowledged,
    Reset,
    TimedOut,
}

/// Non-confirmable notifications by message ID, oldest first.
#[derive(Default)]
struct RecentNotifications {
    tokens: HashMap<ExchangeKey, Vec<u8>>,
    order: VecDeque<ExchangeKey>,
}

/// One CoAP endpoint: the message layer over one [`DatagramSink`].
pub struct Endpoint {
    pub(super) context: Arc<CoapContext>,
    sink: Arc<dyn DatagramSink>,
    exchanges: Mutex<ExchangeCache>,
    pub(super) blocks: Mutex<BlockStore>,
    /// Confirmable messages waiting for an ACK or Reset.
    confirmables: Mutex<HashMap<ExchangeKey, oneshot::Sender<Confirmation>>>,
    recent_notifications: Mutex<RecentNotifications>,
    /// Limits the requests processed at once; a request that finds none
    /// free gets 5.03.
    request_slots: Arc<Semaphore>,
    next_message_id: AtomicU16,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Endpoint {
    pub fn new(context: Arc<CoapContext>, sink: Arc<dyn DatagramSink>) -> Arc<Self> {
        let config = &context.config;
        let blocks = BlockStore::new(BlockLimits {
            max_payload_bytes: config.max_payload_bytes,
            max_transfers_per_peer: config.max_block_transfers_per_peer,
            max_total_bytes: config.max_block_bytes,
            idle_timeout: config.block_timeout,
        });
        let endpoint = Arc::new(Endpoint {
            exchanges: Mutex::new(ExchangeCache::new(config.max_exchanges)),
            blocks: Mutex::new(blocks),
            confirmables: Mutex::new(HashMap::new()),
            recent_notifications: Mutex::new(RecentNotifications::default()),
            request_slots: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            next_message_id: AtomicU16::new(rand::random()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            context,
            sink,
        });
        endpoint.tasks.spawn(sweep_idle_uploads(
            Arc::downgrade(&endpoint),
            endpoint.shutdown.clone(),
        ));
        endpoint
    }

    /// Handles one received datagram (message layer: dedup, ACK/RST, then
    /// requests). Returns when the request's response is sent; a caller
    /// that reads a socket spawns it per datagram.
    pub async fn handle_datagram(
        self: &Arc<Self>,
        peer: SocketAddr,
        datagram: Bytes,
        auth: PeerAuth,
    ) {
        events::datagram_received();
        let header = match message::read_header(&datagram) {
            Ok(header) => header,
            Err(error) => {
                events::datagram_rejected(error.reason());
                return;
            }
        };
        let packet = match message::parse(&datagram, &header) {
            Ok(packet) => packet,
            Err(error) => {
                self.reject_malformed(peer, &header, error);
                return;
            }
        };

        match header.message_type {
            MessageType::Acknowledgement => {
                self.complete_confirmable(peer, &header, Confirmation::Acknowledged)
            }
            MessageType::Reset => self.complete_confirmable(peer, &header, Confirmation::Reset),
            MessageType::Confirmable | MessageType::NonConfirmable => {
                if header.code == 0 {
                    // An empty Confirmable message is a ping (RFC 7252
                    // section 4.3), and the reply is a Reset.
                    if header.message_type == MessageType::Confirmable {
                        self.send(
                            peer,
                            Bytes::from(message::empty_message(
                                MessageType::Reset,
                                header.message_id,
                            )),
                        );
                    }
                    return;
                }
                if !message::is_request_code(header.code) {
                    events::datagram_rejected("unexpected_message");
                    if header.message_type == MessageType::Confirmable {
                        self.send(
                            peer,
                            Bytes::from(message::empty_message(
                                MessageType::Reset,
                                header.message_id,
                            )),
                        );
                    }
                    return;
                }
                self.handle_request(peer, header, packet, auth).await;
            }
        }
    }

    /// Rejects a message format error: a Confirmable message gets a Reset
    /// and others are dropped (RFC 7252 sections 4.2 and 4.3). A message of
    /// an unknown version is always dropped silently (section 3).
    fn reject_malformed(&self, peer: SocketAddr, header: &FixedHeader, error: FormatError) {
        events::datagram_rejected(error.reason());
        tracing::debug!(%peer, message_id = header.message_id, %error, "rejected a malformed CoAP message");
        if matches!(error, FormatError::Version(_)) {
            return;
        }
        if header.message_type == MessageType::Confirmable {
            self.send(
                peer,
                Bytes::from(message::empty_message(
                    MessageType::Reset,
                    header.message_id,
                )),
            );
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        peer: SocketAddr,
        header: FixedHeader,
        packet: coap_lite::Packet,
        auth: PeerAuth,
    ) {
        let key = (peer, header.message_id);
        let confirmable = header.message_type == MessageType::Confirmable;
        let seen = self.exchanges.lock().begin(key, Instant::now());
        if let Seen::Duplicate(state) = seen {
            events::duplicate(if confirmable { "con" } else { "non" });
            if let ExchangeState::Replied(reply) = state {
                self.send(peer, reply);
            }
            return;
        }
        let token = packet.get_token().to_vec();
        // A GET changes nothing, or registers an observer again, which
        // replaces the same registration (RFC 7252 section 4.5 lets a
        // server process duplicates of such requests again). Its reply,
        // up to a 1024-byte block, is therefore not kept, which bounds the
        // cache's memory by the small replies of POST requests.
        let is_get = packet.header.code == MessageClass::Request(RequestType::Get);

        let Ok(slot) = self.request_slots.clone().try_acquire_owned() else {
            let reply = CoapError::ServiceUnavailable(
                "the server is processing too many CoAP requests (coap.max_concurrent_requests); retry later".into(),
            )
            .reply();
            self.reply_now(key, confirmable, &token, reply);
            // Nothing was processed, so a retransmission may try again.
            self.exchanges.lock().forget(key);
            return;
        };

        let work = super::resources::serve(self, peer, packet, auth);
        if !confirmable {
            let served = work.await;
            self.reply_now(key, false, &token, served.reply);
            self.forget_unless_kept(key, served.authenticated && !is_get);
            return;
        }

        tokio::pin!(work);
        // A wait of zero always sends a separate response. A zero sleep is
        // not ready at once (the timer rounds up to the next millisecond),
        // so racing it against a fast request would pick either at random.
        let wait = self.context.config.piggyback_wait;
        if !wait.is_zero() {
            tokio::select! {
                served = &mut work => {
                    self.reply_now(key, true, &token, served.reply);
                    self.forget_unless_kept(key, served.authenticated && !is_get);
                    return;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }

        // Separate response (RFC 7252 section 5.2.2): an empty ACK now, the
        // response as a Confirmable message when it is ready.
        let ack = Bytes::from(message::empty_message(
            MessageType::Acknowledgement,
            header.message_id,
        ));
        self.exchanges.lock().finish(key, ack.clone());
        self.send(peer, ack);
        let served = work.await;
        // The slot limits processing, and processing is done. Holding it
        // while the response is retransmitted would let peers that never
        // ACK take every slot for up to 93 s each.
        drop(slot);
        self.forget_unless_kept(key, served.authenticated && !is_get);
        let reply = served.reply;
        events::response_sent(reply.code_name());
        let message_id = self.next_message_id();
        let response = Bytes::from(reply.encode(MessageType::Confirmable, message_id, &token));
        let outcome = self.send_confirmable(peer, message_id, response).await;
        if outcome != Confirmation::Acknowledged {
            tracing::debug!(%peer, ?outcome, "a separate CoAP response was not acknowledged");
        }
    }

    /// Drops the duplicate-detection entry of a request unless `keep`.
    /// Requests that failed before authentication keep none, so floods of
    /// them cannot evict the entries of devices, and GET requests keep none
    /// (see `handle_request`).
    fn forget_unless_kept(&self, key: ExchangeKey, keep: bool) {
        if !keep {
            self.exchanges.lock().forget(key);
        }
    }

    /// Sends `reply` at once: in the ACK of a Confirmable request, or as a
    /// Non-confirmable response.
    fn reply_now(&self, key: ExchangeKey, confirmable: bool, token: &[u8], reply: Reply) {
        events::response_sent(reply.code_name());
        let (message_type, message_id) = if confirmable {
            (MessageType::Acknowledgement, key.1)
        } else {
            (MessageType::NonConfirmable, self.next_message_id())
        };
        let bytes = Bytes::from(reply.encode(message_type, message_id, token));
        self.exchanges.lock().finish(key, bytes.clone());
        self.send(key.0, bytes);
    }

    /// Sends a notification of an observer; a Confirmable one is sent with
    /// retransmission in a task, and its failure ends the observation.
    pub fn send_notification(self: Arc<Self>, notification: Notification) {
        // NOTE: attribute notifications carry the changed keys, while GET
        // returns `{"shared": ...}`, so the blocks after the first cannot be
        // fetched to complete a large one; the client reads the resource
        // again instead.
        let mut reply = Reply::new(ResponseType::Content).with_first_block(&notification.payload);
        reply.observe = Some(notification.sequence);
        reply.content_format = Some(message::content_format::JSON);
        let message_id = self.next_message_id();
        let peer = notification.peer;
        let token = notification.token;
        if !notification.confirmable {
            let bytes = reply.encode(MessageType::NonConfirmable, message_id, &token);
            self.remember_notification((peer, message_id), token);
            self.send(peer, Bytes::from(bytes));
            return;
        }

        let bytes = Bytes::from(reply.encode(MessageType::Confirmable, message_id, &token));
        let endpoint = self.clone();
        self.tasks.spawn(async move {
            let outcome = endpoint.send_confirmable(peer, message_id, bytes).await;
            let event = match outcome {
                Confirmation::Acknowledged => {
                    let observers = &endpoint.context.observers;
                    if let Some(next) = observers.acknowledged(&endpoint, peer, &token) {
                        endpoint.clone().send_notification(next);
                    }
                    return;
                }
                Confirmation::Reset => "reset",
                Confirmation::TimedOut => "timed_out",
            };
            endpoint
                .context
                .observers
                .remove_token(&endpoint, peer, &token, event);
        });
    }

    /// Ends an observation with a Non-confirmable 4.01 notification,
    /// after the device's token was revoked or the device deleted.
    pub fn end_observation(&self, peer: SocketAddr, token: &[u8]) {
        let reply = Reply::diagnostic(
            ResponseType::Unauthorized,
            "the access token was revoked or the device deleted; register again with a valid token",
        );
        events::response_sent(reply.code_name());
        let bytes = reply.encode(MessageType::NonConfirmable, self.next_message_id(), token);
        self.send(peer, Bytes::from(bytes));
    }

    fn remember_notification(&self, key: ExchangeKey, token: Vec<u8>) {
        let mut recent = self.recent_notifications.lock();
        if recent.order.len() >= MAX_RECENT_NOTIFICATIONS
            && let Some(oldest) = recent.order.pop_front()
        {
            recent.tokens.remove(&oldest);
        }
        recent.tokens.insert(key, token);
        recent.order.push_back(key);
    }

    /// Sends a Confirmable message and retransmits it with exponential
    /// back-off until an ACK or Reset arrives or MAX_RETRANSMIT is reached
    /// (RFC 7252 section 4.2).
    async fn send_confirmable(
        &self,
        peer: SocketAddr,
        message_id: u16,
        bytes: Bytes,
    ) -> Confirmation {
        let (sender, mut receiver) = oneshot::channel();
        self.confirmables.lock().insert((peer, message_id), sender);
        let factor = rand::random_range(1.0..ACK_RANDOM_FACTOR);
        let mut timeout = ACK_TIMEOUT.mul_f64(factor);
        let mut outcome = Confirmation::TimedOut;

        for attempt in 0..=MAX_RETRANSMIT {
            if attempt > 0 {
                events::retransmission();
            }
            self.send(peer, bytes.clone());
            tokio::select! {
                result = &mut receiver => {
                    outcome = result.unwrap_or(Confirmation::TimedOut);
                    break;
                }
                () = tokio::time::sleep(timeout) => timeout *= 2,
                () = self.shutdown.cancelled() => break,
            }
        }

        self.confirmables.lock().remove(&(peer, message_id));
        match outcome {
            Confirmation::Acknowledged => {}
            Confirmation::Reset => events::confirmable_failed("reset"),
            Confirmation::TimedOut => events::confirmable_failed("timed_out"),
        }
        outcome
    }

    /// Matches an ACK or Reset to the Confirmable message it acknowledges
    /// or rejects. A Reset of a Non-confirmable notification ends its
    /// observation.
    fn complete_confirmable(
        self: &Arc<Self>,
        peer: SocketAddr,
        header: &FixedHeader,
        outcome: Confirmation,
    ) {
        let key = (peer, header.message_id);
        if let Some(sender) = self.confirmables.lock().remove(&key) {
            let _ = sender.send(outcome);
            return;
        }
        if outcome == Confirmation::Reset {
            let token = self.recent_notifications.lock().tokens.remove(&key);
            if let Some(token) = token {
                self.context
                    .observers
                    .remove_token(self, peer, &token, "reset");
            }
        }
    }

    fn next_message_id(&self) -> u16 {
        self.next_message_id.fetch_add(1, Ordering::Relaxed)
    }

    fn send(&self, peer: SocketAddr, bytes: Bytes) {
        self.sink.send(peer, bytes);
    }

    /// Stops retransmissions and waits for the endpoint's tasks.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn sweep_idle_uploads(endpoint: std::sync::Weak<Endpoint>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        let removed = endpoint.blocks.lock().remove_idle(Instant::now());
        if removed > 0 {
            tracing::debug!(removed, "dropped idle CoAP block-wise uploads");
        }
    }
}
