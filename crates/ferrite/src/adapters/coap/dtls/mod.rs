//! CoAP over DTLS 1.2 (`coaps://`, RFC 7252 §9.1) on one UDP socket, with
//! OpenSSL through the `openssl` crate.
//!
//! ## How a datagram is handled
//! - From a peer with a session: queued to that session's task
//!   (`session.rs`), which owns an `SslStream` over an in-memory datagram
//!   pipe, decrypts, and passes each message to the [`DatagramHandler`]
//!   (the CoAP endpoint) with the device that the handshake authenticated.
//! - From a peer without a session: only a ClientHello in epoch 0 is
//!   considered (`record.rs`); anything else is dropped and counted. The
//!   ClientHello goes through OpenSSL's stateless cookie exchange
//!   (RFC 6347 §4.2.1, `context.rs`): without a valid cookie the peer gets a
//!   HelloVerifyRequest, which is not larger than the ClientHello, and
//!   nothing is kept. With a valid cookie a session task starts.
//! - Replies go through [`DtlsSink`], which queues them to the peer's
//!   session without waiting. A reply is dropped and counted when the
//!   queue is full or the peer has no established session.
//!
//! ## Authentication
//! - PSK suites: the PSK identity is looked up in
//!   [`crate::auth::dtls::DtlsCredentials`]; an unknown identity ends the
//!   handshake with `unknown_psk_identity`.
//! - ECDHE-ECDSA suites (when `cert_file` is set): the client must send a
//!   certificate. A certificate that chains to `ca_file` and whose subject
//!   CN is the id (UUID) of a device authenticates that device, in any
//!   tenant. The CN is the device id rather than the name because names
//!   are unique only within a tenant. Any other certificate must have its
//!   SHA-256 fingerprint registered on a device, and authenticates that
//!   device whoever issued it. The CN path comes first so that registering
//!   someone else's (public) certificate cannot move their device.
//!
//! ## Limits
//! `max_sessions` and `max_handshakes` bound the state kept; ClientHellos
//! of new peers beyond them are dropped. Datagrams longer than the largest
//! DTLS record are dropped unread. Each session queues at most
//! [`SESSION_QUEUE`] inputs and [`SESSION_QUEUE_BYTES`] bytes, and all
//! sessions together [`TOTAL_QUEUE_BYTES`]; datagrams and replies beyond
//! are dropped and counted. A handshake has `handshake_timeout`
//! to finish, during which OpenSSL retransmits its flights with a doubling
//! timer. A session that receives nothing for `idle_timeout` is closed with
//! close_notify.
//!
//! Handshakes in progress per source address are bounded by
//! `limits.dtls_handshakes_per_address`, counted from the valid cookie on,
//! so that the address is known to be the sender's. ClientHellos beyond it
//! are dropped and counted in `ferrite_connections_refused_total`.
//!
//! ## What it leaves out
//! - NOTE: no session resumption and no connection IDs (RFC 9146): a peer
//!   whose address changes (NAT rebinding) needs a new handshake.
//! - Deleting or replacing a device's credentials, or deleting the device,
//!   stops new handshakes at once. An established session notices it at
//!   its first message after [`RECHECK_INTERVAL`] since the last check and
//!   ends with close_notify.
//!
//! ## Shutdown
//! [`DtlsListener::serve`] stops reading when its token is cancelled. Each
//! session then sends close_notify and ends; `serve` returns when every
//! session task has ended.

mod context;
mod events;
mod record;
mod session;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use anyhow::Context;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use context::{DtlsContext, ListenOutcome};
pub use context::{common_name, fingerprint};
use record::FirstRecord;

use super::transport::{DatagramSink, PeerAuth};
use super::{CoapContext, Endpoint};
use crate::auth::dtls::DtlsCredentials;
use crate::auth::revocation::{Revocations, Revoked};
use crate::config::CoapDtlsConfig;
use crate::encryption::Keyring;
use crate::limits::Limits;
use crate::metadata::SqliteMetadata;
use crate::warn_limit::WarnLimiter;

/// Datagrams and replies queued for one session. A peer that sends faster
/// than its session decrypts loses datagrams, which CoAP retransmits.
const SESSION_QUEUE: usize = 64;
/// Bytes of datagrams and replies queued for one session: room for one
/// record of [`MAX_DATAGRAM`] or about 25 CoAP datagrams of 1 280 bytes.
const SESSION_QUEUE_BYTES: usize = 32 * 1024;
/// Bytes queued over all sessions. Without it, `max_sessions` full
/// session queues could hold about 312 MiB at the default of 10 000.
const TOTAL_QUEUE_BYTES: usize = 32 * 1024 * 1024;
/// Time after which a session checks again that its credential and device
/// still exist, the same bound as for cached access tokens.
pub const RECHECK_INTERVAL: std::time::Duration = crate::auth::DEVICE_CACHE_TTL;
/// Largest datagram accepted from the socket: one DTLS record header (13
/// bytes) with the largest ciphertext, 2^14 + 2 048 bytes (RFC 6347 §4.1,
/// after RFC 5246 §6.2.3). OpenSSL cuts anything longer anyway, so larger
/// datagrams are dropped before they are copied.
const MAX_DATAGRAM: usize = (1 << 14) + 2048 + 13;

/// Receives the decrypted CoAP messages of DTLS sessions.
pub trait DatagramHandler: Send + Sync + 'static {
    /// Handles one message from `peer`, authenticated as `auth`.
    fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        datagram: Bytes,
        auth: PeerAuth,
    ) -> impl Future<Output = ()> + Send;
}

/// Input of a session task.
enum Input {
    /// A datagram received from the peer.
    Datagram(Bytes),
    /// A CoAP message to encrypt and send to the peer.
    Send(Bytes),
}

impl Input {
    /// Bytes of the queued input.
    fn len(&self) -> usize {
        match self {
            Input::Datagram(bytes) | Input::Send(bytes) => bytes.len(),
        }
    }
}

#[derive(Clone)]
struct SessionHandle {
    id: u64,
    inbox: mpsc::Sender<Input>,
    /// Bytes of the inputs in `inbox`, bounded by [`SESSION_QUEUE_BYTES`].
    queued_bytes: Arc<AtomicUsize>,
    /// Set when the handshake finished and the device is known.
    established: Arc<AtomicBool>,
}

/// The sessions by peer address, shared by the listener, the session tasks
/// and the sink.
#[derive(Default)]
struct Sessions {
    by_peer: Mutex<HashMap<SocketAddr, SessionHandle>>,
    next_id: AtomicU64,
    handshakes: AtomicUsize,
    /// Bytes queued over all sessions, bounded by [`TOTAL_QUEUE_BYTES`].
    queued_bytes: AtomicUsize,
}

/// Adds `length` to `counter` unless the sum would exceed `limit`.
fn reserve(counter: &AtomicUsize, length: usize, limit: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            queued.checked_add(length).filter(|sum| *sum <= limit)
        })
        .is_ok()
}

impl Sessions {
    /// Queues `input` to the session of `handle` within the count and byte
    /// bounds. Returns the drop reason when it does not fit.
    fn enqueue(&self, handle: &SessionHandle, input: Input) -> Result<(), &'static str> {
        let length = input.len();
        if !reserve(&handle.queued_bytes, length, SESSION_QUEUE_BYTES) {
            return Err("queue_full");
        }
        if !reserve(&self.queued_bytes, length, TOTAL_QUEUE_BYTES) {
            handle.queued_bytes.fetch_sub(length, Ordering::AcqRel);
            return Err("memory_limit");
        }
        if handle.inbox.try_send(input).is_err() {
            self.release(&handle.queued_bytes, length);
            return Err("queue_full");
        }
        Ok(())
    }

    /// Gives back the bytes of an input that left a session's queue.
    fn release(&self, session_bytes: &AtomicUsize, length: usize) {
        session_bytes.fetch_sub(length, Ordering::AcqRel);
        self.queued_bytes.fetch_sub(length, Ordering::AcqRel);
    }

    fn get(&self, peer: SocketAddr) -> Option<SessionHandle> {
        self.by_peer.lock().get(&peer).cloned()
    }

    fn len(&self) -> usize {
        self.by_peer.lock().len()
    }

    /// Removes the session of `peer` if it is still the one with `id`; a
    /// newer session of the same peer stays.
    fn remove(&self, peer: SocketAddr, id: u64) {
        let mut sessions = self.by_peer.lock();
        if sessions.get(&peer).is_some_and(|handle| handle.id == id) {
            sessions.remove(&peer);
        }
    }

    fn handshake_finished(&self) {
        self.handshakes.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends CoAP replies over the peers' DTLS sessions.
pub struct DtlsSink {
    sessions: Arc<Sessions>,
}

impl DatagramSink for DtlsSink {
    fn send(&self, peer: SocketAddr, datagram: Bytes) {
        let Some(handle) = self.sessions.get(peer) else {
            events::datagram_dropped("no_session");
            return;
        };
        if !handle.established.load(Ordering::Acquire) {
            events::datagram_dropped("no_session");
            return;
        }
        if let Err(reason) = self.sessions.enqueue(&handle, Input::Send(datagram)) {
            events::datagram_dropped(reason);
        }
    }
}

/// State shared by the listener and its session tasks.
struct Shared<H> {
    socket: Arc<UdpSocket>,
    context: DtlsContext,
    config: CoapDtlsConfig,
    sessions: Arc<Sessions>,
    credentials: Arc<DtlsCredentials>,
    metadata: Arc<SqliteMetadata>,
    handler: Arc<H>,
    shutdown: CancellationToken,
    /// Rate limit of warnings about failed handshakes.
    failure_warnings: Mutex<WarnLimiter>,
    /// [`RECHECK_INTERVAL`], shorter in tests.
    recheck_interval: std::time::Duration,
    /// A receiver of revocation events that is never read; each session
    /// takes its own with `resubscribe`. `None` ends sessions only at the
    /// periodic re-check.
    revocations: Option<broadcast::Receiver<Revoked>>,
    /// Handshakes per source address; `None` in tests without limits.
    limits: Option<Limits>,
}

/// A bound DTLS listener, not yet serving.
pub struct DtlsListener {
    socket: Arc<UdpSocket>,
    context: DtlsContext,
    config: CoapDtlsConfig,
    sessions: Arc<Sessions>,
    credentials: Arc<DtlsCredentials>,
    recheck_interval: std::time::Duration,
    revocations: Option<broadcast::Receiver<Revoked>>,
    limits: Option<Limits>,
}

impl DtlsListener {
    /// Binds the UDP socket and loads the certificates (for tests; the
    /// server binds first with [`bind_socket`] and builds later).
    #[cfg(test)]
    pub async fn bind(
        config: &CoapDtlsConfig,
        credentials: Arc<DtlsCredentials>,
        keyring: Arc<Keyring>,
    ) -> anyhow::Result<Self> {
        let socket = bind_socket(config.listen).await?;
        Self::new(socket, config, credentials, keyring)
    }

    /// Builds the listener on a bound socket. Fails with the file name when
    /// the server certificate, its key or the CA file cannot be loaded.
    pub fn new(
        socket: UdpSocket,
        config: &CoapDtlsConfig,
        credentials: Arc<DtlsCredentials>,
        keyring: Arc<Keyring>,
    ) -> anyhow::Result<Self> {
        let context = DtlsContext::build(config, credentials.clone(), keyring)?;
        Ok(Self {
            socket: Arc::new(socket),
            context,
            config: config.clone(),
            sessions: Arc::default(),
            credentials,
            recheck_interval: RECHECK_INTERVAL,
            revocations: None,
            limits: None,
        })
    }

    /// Ends sessions at once on the revocation events of `revocations`.
    pub fn end_sessions_on(&mut self, revocations: &Revocations) {
        self.revocations = Some(revocations.subscribe());
    }

    /// Bounds the handshakes per source address by `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    #[cfg(test)]
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Returns whether the ECDHE-ECDSA suites are on (a server certificate
    /// is set).
    pub fn certificates_enabled(&self) -> bool {
        self.context.certificates
    }

    /// Returns whether the PSK suites are on.
    pub fn psk_enabled(&self) -> bool {
        self.config.psk
    }

    /// Returns the sink through which the handler sends replies.
    pub fn sink(&self) -> Arc<DtlsSink> {
        Arc::new(DtlsSink {
            sessions: self.sessions.clone(),
        })
    }

    /// Serves until `shutdown` is cancelled, then waits for every session
    /// to send close_notify and end.
    pub async fn serve<H: DatagramHandler>(
        self,
        handler: Arc<H>,
        metadata: Arc<SqliteMetadata>,
        shutdown: CancellationToken,
    ) {
        events::register();
        let shared = Arc::new(Shared {
            socket: self.socket,
            context: self.context,
            config: self.config,
            sessions: self.sessions,
            credentials: self.credentials,
            metadata,
            handler,
            shutdown: shutdown.clone(),
            failure_warnings: Mutex::new(WarnLimiter::default()),
            recheck_interval: self.recheck_interval,
            revocations: self.revocations,
            limits: self.limits,
        });
        let tasks = TaskTracker::new();
        let mut receive_warnings = WarnLimiter::default();
        // One byte more than accepted, so that a longer datagram shows.
        let mut buffer = vec![0u8; MAX_DATAGRAM + 1];

        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => break,
                received = shared.socket.recv_from(&mut buffer) => received,
            };
            let (length, peer) = match received {
                Ok(received) => received,
                Err(error) => {
                    // ICMP errors of earlier sends surface here on some
                    // systems; the socket stays usable.
                    if let Some(suppressed) = receive_warnings.allow(std::time::Instant::now()) {
                        tracing::warn!(%error, suppressed, "cannot receive a DTLS datagram; continuing");
                    }
                    continue;
                }
            };
            if length > MAX_DATAGRAM {
                events::datagram_dropped("too_large");
                continue;
            }
            let datagram = Bytes::copy_from_slice(&buffer[..length]);
            dispatch(&shared, &tasks, peer, datagram);
        }

        tracing::info!("DTLS listener closed; closing sessions");
        tasks.close();
        tasks.wait().await;
        tracing::info!("DTLS listener stopped");
    }
}

/// Binds the DTLS listener's UDP socket, with a hint on the settings when
/// the address is taken.
pub async fn bind_socket(listen: SocketAddr) -> anyhow::Result<UdpSocket> {
    UdpSocket::bind(listen).await.with_context(|| {
        format!(
            "cannot listen for CoAP over DTLS on UDP {listen}; choose another address with --coaps-listen, FERRITE_COAPS_LISTEN or coap.dtls.listen"
        )
    })
}

impl DatagramHandler for Endpoint {
    async fn handle(self: Arc<Self>, peer: SocketAddr, datagram: Bytes, auth: PeerAuth) {
        self.handle_datagram(peer, datagram, auth).await;
    }
}

/// Serves CoAP over DTLS until `shutdown` is cancelled: one CoAP endpoint
/// whose replies go through the listener's sessions.
pub async fn serve(
    mut listener: DtlsListener,
    context: Arc<CoapContext>,
    metadata: Arc<SqliteMetadata>,
    shutdown: CancellationToken,
) {
    listener.end_sessions_on(context.auth.revocations());
    let endpoint = Endpoint::new(context, listener.sink());
    listener.serve(endpoint.clone(), metadata, shutdown).await;
    endpoint.close().await;
}

/// Routes one received datagram: to the peer's session, or through the
/// cookie exchange when it may start one.
fn dispatch<H: DatagramHandler>(
    shared: &Arc<Shared<H>>,
    tasks: &TaskTracker,
    peer: SocketAddr,
    datagram: Bytes,
) {
    let existing = shared.sessions.get(peer);
    let first_record = record::classify(&datagram);
    if let Some(handle) = &existing {
        // A ClientHello in epoch 0 on an established session means that the
        // peer lost its session, as after a reboot. It goes through the
        // cookie exchange and replaces the old session only once the cookie
        // is valid (RFC 6347 §4.2.8).
        let restart =
            first_record == FirstRecord::ClientHello && handle.established.load(Ordering::Acquire);
        if !restart {
            if let Err(reason) = shared.sessions.enqueue(handle, Input::Datagram(datagram)) {
                events::datagram_dropped(reason);
            }
            return;
        }
    }

    match first_record {
        FirstRecord::ClientHello => {}
        FirstRecord::OtherRecord => {
            events::datagram_dropped("unknown_peer");
            return;
        }
        FirstRecord::Invalid => {
            events::datagram_dropped("invalid");
            return;
        }
    }
    if existing.is_none() && shared.sessions.len() >= shared.config.max_sessions {
        events::datagram_dropped("max_sessions");
        return;
    }
    if shared.sessions.handshakes.load(Ordering::Acquire) >= shared.config.max_handshakes {
        events::datagram_dropped("max_handshakes");
        return;
    }

    let stream = match shared.context.listen(peer, datagram) {
        Ok(ListenOutcome::Accepted(stream)) => stream,
        Ok(ListenOutcome::VerifyRequested(replies)) => {
            events::hello_verify_request_sent();
            for reply in replies {
                if shared.socket.try_send_to(&reply, peer).is_err() {
                    events::datagram_dropped("send_failed");
                }
            }
            return;
        }
        Ok(ListenOutcome::Dropped) => {
            events::datagram_dropped("invalid");
            return;
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "cannot start a DTLS cookie exchange");
            return;
        }
    };
    // After the cookie exchange, so that the address is the sender's.
    let handshake_slot = match &shared.limits {
        Some(limits) => match limits.dtls_handshake(peer.ip()) {
            Some(slot) => Some(slot),
            None => {
                events::datagram_dropped("handshakes_per_address");
                crate::limits::count_connection_refused("coap_dtls", "dtls_handshakes_per_address");
                return;
            }
        },
        None => None,
    };
    start_session(shared, tasks, peer, *stream, handshake_slot);
}

fn start_session<H: DatagramHandler>(
    shared: &Arc<Shared<H>>,
    tasks: &TaskTracker,
    peer: SocketAddr,
    stream: openssl::ssl::SslStream<context::DatagramPipe>,
    handshake_slot: Option<crate::limits::AddressSlot>,
) {
    let (sender, inbox) = mpsc::channel(SESSION_QUEUE);
    let id = shared.sessions.next_id.fetch_add(1, Ordering::Relaxed);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let handle = SessionHandle {
        id,
        inbox: sender,
        queued_bytes: queued_bytes.clone(),
        established: Arc::new(AtomicBool::new(false)),
    };
    // Replacing the handle drops the old session's only sender, which ends
    // its task with the reason "replaced".
    shared.sessions.by_peer.lock().insert(peer, handle);
    shared.sessions.handshakes.fetch_add(1, Ordering::AcqRel);
    events::session_started();

    let session = session::Session {
        peer,
        id,
        stream,
        inbox,
        queued_bytes,
        shared: shared.clone(),
        handshake_slot,
    };
    // At error level, so that the peer stays on the session's warnings
    // whatever log level is configured.
    let span = tracing::error_span!("dtls_session", %peer);
    tasks.spawn(session.run().instrument(span));
}

#[cfg(test)]
mod tests;
