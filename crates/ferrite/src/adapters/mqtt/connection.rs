//! One MQTT connection, from accept to close, in a single task.
//!
//! Steps: read CONNECT within `mqtt.connect_timeout` ([`run`]), check and
//! authenticate it (`handshake.rs`), attach to the session
//! (`session.rs`), send CONNACK, then serve packets until the connection
//! ends ([`Connection::serve`]), and finish ([`Connection::finish`]).
//!
//! ## Serving
//! One `select!` loop reads, writes, completes appends, takes deliveries
//! from the router and watches keep-alive, takeover and shutdown. Nothing
//! in it waits for one thing while another is ready:
//! - PUBLISHes are decoded from the read buffer and grouped (`inbound.rs`).
//!   Each group is one append to the ingest log, which stays in flight
//!   while reading goes on. Reading pauses while `mqtt.max_inflight`
//!   messages wait for their append (the Receive Maximum announced to
//!   MQTT 5 clients).
//! - Acknowledgements and packets to the client are encoded into `out` and
//!   written as the socket accepts them. Reading and taking deliveries
//!   pause while `out` contains more than [`OUT_HIGH_WATER`] bytes, so a
//!   client that does not read cannot grow it without bound.
//!
//! ## Memory
//! An idle connection costs its task, a read buffer that starts at
//! [`INITIAL_READ_CAPACITY`] bytes, an empty write buffer and its delivery
//! channel. Buffers grow for large packets and are released again once
//! they are empty.
//!
//! ## Ending
//! Whatever ends the connection, [`Connection::finish`] runs these steps:
//! 1. let the appends in flight complete and send their acknowledgements;
//! 2. send an MQTT 5 DISCONNECT when there is a reason code for the close;
//! 3. close the socket;
//! 4. publish the will message unless the client sent a normal DISCONNECT;
//! 5. return the session state to the store.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::{Packet, PacketType, ProtocolVersion, ReasonCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::application::Client;
use super::codec::{self, Frame, FrameError};
use super::events::{self, WarnLimiter};
use super::handshake::{self, Connected, Will};
use super::inbound::{self, GroupFuture, PendingGroup, Qos2State};
use super::session::{
    Attach, AttachRequest, Attached, ClientId, DeliveryState, Outgoing, TAKEOVER_WAIT,
};
use super::{Shared, events::connection_refused};
use crate::auth::revocation::{RevocationWatch, Signal};
use crate::auth::{AuthError, HeldCredential, Identity};
use crate::ingest::IngestError;
use crate::limits::RateLimited;
use crate::metadata::Role;
use crate::tls::ClientCertificate;

/// Bytes a PUBLISH may have beyond `mqtt.max_payload_bytes` for its fixed
/// header, topic name, packet id and MQTT 5 properties.
pub const PACKET_HEADROOM: usize = 8 * 1024;
/// Read buffer of a new connection: enough for a CONNECT with a token.
const INITIAL_READ_CAPACITY: usize = 256;
/// Empty buffers above this capacity are released, so that one large
/// packet does not keep its buffer for the life of the connection.
const RELEASE_CAPACITY: usize = 16 * 1024;
/// Bytes waiting in `out` above which the connection stops reading and
/// taking deliveries until the client reads.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Time to write the last packets (acknowledgements, DISCONNECT, refused
/// CONNACK) before the socket is closed.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reason a connection ends.
#[derive(Debug)]
pub enum CloseCause {
    /// DISCONNECT from the client; MQTT 5 reason 0x04 requests the will.
    Disconnect {
        with_will: bool,
    },
    /// The client closed the socket without DISCONNECT.
    PeerClosed,
    Io(io::Error),
    /// Nothing received for 1.5 times the keep alive ([MQTT-3.1.2-24]).
    KeepAliveTimeout,
    /// The client broke the protocol; MQTT 5 clients get DISCONNECT with
    /// `code`.
    ProtocolViolation {
        code: ReasonCode,
        detail: String,
    },
    /// An MQTT 3.1.1 client published outside its namespace; 3.1.1 has no
    /// negative PUBACK, so the connection is closed ([MQTT-3.3.5-2]).
    PublishNotAuthorized,
    /// An append failed and MQTT 3.1.1 has no negative PUBACK for it, or the
    /// log is stopping. The connection closes, and the client sends again
    /// what was not acknowledged.
    IngestFailed(IngestError),
    /// Another connection with the same client id took the session over.
    TakenOver,
    /// The credential of the connection was revoked or its user deleted
    /// since CONNECT.
    CredentialRevoked,
    /// An MQTT 5 client went on publishing over its rate limit after
    /// `limits.mqtt_rate_limited_before_disconnect` rejections in a row.
    RateLimited(RateLimited),
    ShuttingDown,
}

impl CloseCause {
    pub fn protocol(code: ReasonCode, detail: impl Into<String>) -> Self {
        Self::ProtocolViolation {
            code,
            detail: detail.into(),
        }
    }

    fn from_frame_error(error: FrameError) -> Self {
        let code = match error {
            FrameError::TooLarge { .. } => ReasonCode::PacketTooLarge,
            FrameError::Malformed(_) => ReasonCode::MalformedPacket,
            FrameError::Protocol(_) => ReasonCode::ProtocolError,
        };
        Self::protocol(code, error.to_string())
    }

    /// Reason code of the DISCONNECT sent to MQTT 5 clients, if any.
    fn disconnect_code(&self) -> Option<ReasonCode> {
        match self {
            Self::ProtocolViolation { code, .. } => Some(*code),
            Self::KeepAliveTimeout => Some(ReasonCode::KeepAliveTimeout),
            Self::TakenOver => Some(ReasonCode::SessionTakenOver),
            Self::CredentialRevoked => Some(ReasonCode::NotAuthorized),
            Self::RateLimited(_) => Some(ReasonCode::MessageRateTooHigh),
            Self::ShuttingDown | Self::IngestFailed(IngestError::ShuttingDown) => {
                Some(ReasonCode::ServerShuttingDown)
            }
            Self::IngestFailed(_) => Some(ReasonCode::UnspecifiedError),
            Self::Disconnect { .. }
            | Self::PeerClosed
            | Self::Io(_)
            | Self::PublishNotAuthorized => None,
        }
    }

    /// Reason String of the DISCONNECT sent to MQTT 5 clients: what the
    /// client did wrong or what happened, without internal details.
    fn disconnect_reason(&self) -> Option<String> {
        match self {
            Self::ProtocolViolation { detail, .. } => Some(detail.clone()),
            Self::KeepAliveTimeout => Some(
                "no packet received within 1.5 times the Keep Alive; send PINGREQ when idle"
                    .to_owned(),
            ),
            Self::TakenOver => {
                Some("another connection with the same client id took over the session".to_owned())
            }
            Self::CredentialRevoked => Some(
                "the credential of this connection was revoked, or its device or user deleted"
                    .to_owned(),
            ),
            Self::RateLimited(limited) => Some(format!(
                "{limited}; the client went on publishing after repeated PUBACK 0x97"
            )),
            Self::ShuttingDown | Self::IngestFailed(IngestError::ShuttingDown) => {
                Some("the server is shutting down; reconnect later".to_owned())
            }
            Self::IngestFailed(_) => Some(
                "the server failed to store a message; reconnect and send the unacknowledged messages again"
                    .to_owned(),
            ),
            Self::Disconnect { .. }
            | Self::PeerClosed
            | Self::Io(_)
            | Self::PublishNotAuthorized => None,
        }
    }

    /// The will is published unless the client disconnected normally, the
    /// server is stopping (the device did nothing wrong), or the client
    /// lost the right to publish.
    fn publishes_will(&self) -> bool {
        !matches!(
            self,
            Self::Disconnect { with_will: false }
                | Self::CredentialRevoked
                | Self::ShuttingDown
                | Self::IngestFailed(IngestError::ShuttingDown)
        )
    }

    fn socket_usable(&self) -> bool {
        !matches!(self, Self::PeerClosed | Self::Io(_))
    }
}

/// Warning limiters of one connection, one per kind of rejection.
#[derive(Debug, Default)]
pub struct Warnings {
    pub publish_rejected: WarnLimiter,
    pub payload_invalid: WarnLimiter,
    pub append_failed: WarnLimiter,
    pub subscription_rejected: WarnLimiter,
    pub rate_limited: WarnLimiter,
}

/// Counts the connection in `ferrite_mqtt_connections` for as long as it
/// lives, whichever way the task ends.
struct OpenConnection;

impl OpenConnection {
    fn new() -> Self {
        events::connection_opened();
        Self
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        events::connection_closed();
    }
}

/// State of a connection after CONNACK.
pub struct Connection {
    pub shared: Arc<Shared>,
    pub version: ProtocolVersion,
    pub client: Client,
    /// The credential of `client`, checked again every
    /// `mqtt.credential_recheck_interval` and when revocation events were
    /// missed.
    credential: HeldCredential,
    /// Revocation events that end this connection at once.
    revocation: RevocationWatch,
    pub client_id: ClientId,
    /// Generation of the session attach; see `session.rs`.
    pub generation: u64,
    pub request_problem_information: bool,
    pub client_maximum_packet_size: usize,
    /// Outgoing QoS 1 messages sent and unacknowledged, at most.
    pub send_quota: usize,
    /// Largest packet accepted from the client.
    pub max_packet_size: usize,
    pub keep_alive: Option<Duration>,
    pub will: Option<Will>,
    pub session_expiry: Duration,
    /// MQTT 5: the CONNECT requested session expiry 0, so DISCONNECT may
    /// not set another ([MQTT-3.14.2-2]).
    pub connect_expiry_zero: bool,

    pub read_buffer: BytesMut,
    pub out: BytesMut,
    pub last_received: Instant,

    /// Groups of PUBLISHes waiting for their append, oldest first.
    pub pending: FuturesOrdered<GroupFuture>,
    /// Messages in `pending`.
    pub pending_messages: usize,
    /// The group being built from the packets of the current read.
    pub group: PendingGroup,
    /// Inbound QoS 2 packet ids from PUBLISH until PUBREL.
    pub qos2: HashMap<u16, Qos2State>,
    /// MQTT 5 topic aliases the client set on this connection; they end
    /// with it ([MQTT-3.3.2-7]).
    pub topic_aliases: HashMap<u16, String>,
    /// Set when an append failed on MQTT 3.1.1: no acknowledgement is sent
    /// after that, because acknowledging later PUBLISHes while skipping the
    /// failed one would break the acknowledgement order.
    pub acks_stopped: bool,
    pub warnings: Warnings,

    /// The client's address, for the message rate per address.
    pub peer: Option<IpAddr>,
    /// MQTT 3.1.1 over its rate limit: reading pauses until this time,
    /// with the next PUBLISH left in the read buffer.
    pub rate_pause: Option<Instant>,
    /// MQTT 3.1.1: the next PUBLISH in the read buffer has taken its token.
    pub publish_permitted: bool,
    /// MQTT 5 PUBLISHes rejected for their rate since the last accepted one.
    pub rate_limited_in_row: u32,

    pub deliveries: mpsc::Receiver<Box<Outgoing>>,
    /// Outgoing QoS 1 state: in flight, queued and the next packet id.
    pub delivery: DeliveryState,
    takeover: CancellationToken,
    finished: CancellationToken,
}

/// A byte stream that carries MQTT packets: a TCP connection, or the
/// binary messages of a WebSocket.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Serves one accepted connection until it closes.
/// `peer` is the client's address, for the login throttle. `certificate` is
/// the TLS client certificate accepted at the handshake, which then
/// authenticates the device in place of the CONNECT's credentials.
pub async fn run<S: Transport>(
    mut stream: S,
    shared: Arc<Shared>,
    peer: Option<IpAddr>,
    _slot: OwnedSemaphorePermit,
    certificate: Option<ClientCertificate>,
) {
    let _open = OpenConnection::new();
    let context = &shared.context;
    // Subscribed before the credential is checked, so that a revocation
    // between the check and the end of the handshake is not missed.
    let revocations = context.auth.revocations().subscribe();
    // `None` inside when the address has `limits.connections_per_address`
    // connections open. The CONNECT is still read, so that the CONNACK
    // uses the client's protocol version.
    let address_slot = peer.map(|address| context.limits.mqtt_connection(address));
    let max_packet_size = context
        .config
        .max_payload_bytes
        .saturating_add(PACKET_HEADROOM);
    let mut read_buffer = BytesMut::with_capacity(INITIAL_READ_CAPACITY);

    let frame = tokio::select! {
        read = tokio::time::timeout(
            context.config.connect_timeout,
            read_connect_frame(&mut stream, &mut read_buffer, max_packet_size),
        ) => match read {
            Ok(Ok(frame)) => frame,
            Ok(Err(error)) => {
                if matches!(error, ConnectReadError::Frame(_) | ConnectReadError::NotConnect) {
                    events::protocol_error();
                }
                tracing::debug!(%error, "MQTT connection closed before CONNECT");
                return;
            }
            Err(_) => {
                tracing::debug!(timeout = ?context.config.connect_timeout, "MQTT connection closed: no CONNECT in time");
                return;
            }
        },
        () = shared.shutdown.cancelled() => return,
    };

    if let Some(None) = address_slot {
        let max_per_address = context.limits.config().connections_per_address;
        let rejection = handshake::connections_per_address_exceeded(&frame, max_per_address);
        connection_refused(rejection.reason);
        crate::limits::count_connection_refused("mqtt", "connections_per_address");
        tracing::debug!(reason = rejection.reason, detail = %rejection.detail, "refused an MQTT connection");
        if let Some(connack) = rejection.connack {
            let mut out = BytesMut::new();
            codec::encode(&connack, &mut out);
            write_last(&mut stream, &out).await;
        }
        return;
    }

    // The handshake and the finish are boxed: their futures (a metadata
    // query, a will append) are large, and an unboxed future would make
    // every idle connection's task as large as the largest step.
    let connected = match Box::pin(handshake::accept_connect(
        frame,
        context,
        peer,
        certificate.as_ref(),
    ))
    .await
    {
        Ok(connected) => connected,
        Err(rejection) => {
            if rejection.reason == "malformed" {
                events::protocol_error();
            }
            connection_refused(rejection.reason);
            tracing::debug!(reason = rejection.reason, detail = %rejection.detail, "refused an MQTT connection");
            if let Some(connack) = rejection.connack {
                let mut out = BytesMut::new();
                codec::encode(&connack, &mut out);
                write_last(&mut stream, &out).await;
            }
            return;
        }
    };

    let span = tracing::Span::current();
    span.record("client_id", connected.client_id.as_str());
    if let Some(identity) = connected.client.device() {
        span.record("device_id", tracing::field::display(identity.device_id));
    }

    let Some(attached) = attach_session(&shared, &connected).await else {
        let rejection = handshake::client_id_in_use(connected.version);
        connection_refused(rejection.reason);
        tracing::debug!(reason = rejection.reason, detail = %rejection.detail, "refused an MQTT connection");
        if let Some(connack) = rejection.connack {
            let mut out = BytesMut::new();
            codec::encode(&connack, &mut out);
            write_last(&mut stream, &out).await;
        }
        return;
    };
    tracing::debug!(
        version = connected.version.as_u8(),
        session_present = attached.session_present,
        "MQTT client connected"
    );
    let held = held_access(&shared, &connected).await;
    let mut connection = Connection::new(
        shared.clone(),
        connected,
        attached,
        read_buffer,
        max_packet_size,
        RevocationWatch::new(revocations, held),
    );
    connection.peer = peer;
    let cause = connection.serve(&mut stream).await;
    Box::pin(connection.finish(stream, cause)).await;
}

/// Describes what the accepted connection holds, for matching revocation
/// events.
async fn held_access(
    shared: &Shared,
    connected: &Connected,
) -> crate::auth::revocation::HeldAccess {
    let identity = match &connected.client {
        Client::Device(device) => Identity::Device(device.clone()),
        Client::Application(principal) => Identity::Principal(principal.clone()),
    };
    shared
        .context
        .auth
        .held_access(&connected.credential, &identity)
        .await
}

#[derive(Debug, thiserror::Error)]
enum ConnectReadError {
    #[error("the client closed the connection")]
    Closed,
    #[error("the first packet is not CONNECT")]
    NotConnect,
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads until a whole first packet is buffered; it must be CONNECT
/// ([MQTT-3.1.0-1]), which is checked on its first byte.
async fn read_connect_frame<S: Transport>(
    stream: &mut S,
    buffer: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Frame, ConnectReadError> {
    loop {
        if codec::peek_packet_type(buffer).is_some_and(|packet_type| packet_type != 1) {
            return Err(ConnectReadError::NotConnect);
        }
        if let Some(frame) = codec::take_frame(buffer, max_packet_size)? {
            return Ok(frame);
        }
        if stream.read_buf(buffer).await? == 0 {
            return Err(ConnectReadError::Closed);
        }
    }
}

/// Writes the last bytes of a connection, bounded in time, and closes the
/// sending side so that the client reads them before the close.
async fn write_last<S: Transport>(stream: &mut S, bytes: &[u8]) {
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    })
    .await;
}

/// Attaches to the session of the client id, waiting for an older
/// connection of the same client to hand it over. Returns `None` when the
/// session belongs to another owner.
async fn attach_session(shared: &Shared, connected: &Connected) -> Option<Attached> {
    let mut request = AttachRequest {
        client_id: connected.client_id.clone(),
        owner: connected.client.owner(),
        clean_start: connected.clean_start,
        expiry: connected.session_expiry,
        force: false,
    };
    loop {
        let attach = shared.router.sessions().attach(&request, Instant::now());
        match attach {
            Attach::Attached(attached) => return Some(attached),
            Attach::Conflict => return None,
            Attach::Wait { finished } => {
                if tokio::time::timeout(TAKEOVER_WAIT, finished.cancelled())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "the previous connection of this MQTT client id did not close in time; its unacknowledged messages are lost"
                    );
                    request.force = true;
                }
            }
        }
    }
}

impl Connection {
    fn new(
        shared: Arc<Shared>,
        connected: Connected,
        attached: Attached,
        read_buffer: BytesMut,
        max_packet_size: usize,
        revocation: RevocationWatch,
    ) -> Self {
        let config = &shared.context.config;
        let send_quota = usize::from(connected.client_receive_maximum.min(config.max_inflight));
        let mut state = attached.state;
        let qos2 = state
            .qos2_stored
            .drain(..)
            .map(|packet_id| (packet_id, Qos2State::Stored))
            .collect();

        let connack = handshake::success_connack(
            &connected,
            attached.session_present,
            &shared.context,
            max_packet_size,
        );
        let mut out = BytesMut::new();
        codec::encode(&connack, &mut out);

        let mut connection = Self {
            version: connected.version,
            client: connected.client,
            credential: connected.credential,
            revocation,
            client_id: connected.client_id,
            generation: attached.generation,
            request_problem_information: connected.request_problem_information,
            client_maximum_packet_size: connected.client_maximum_packet_size,
            send_quota,
            max_packet_size,
            keep_alive: connected.keep_alive,
            will: connected.will,
            session_expiry: connected.session_expiry,
            connect_expiry_zero: connected.session_expiry.is_zero(),
            read_buffer,
            out,
            last_received: Instant::now(),
            pending: FuturesOrdered::new(),
            pending_messages: 0,
            group: PendingGroup::default(),
            qos2,
            topic_aliases: HashMap::new(),
            acks_stopped: false,
            warnings: Warnings::default(),
            peer: None,
            rate_pause: None,
            publish_permitted: false,
            rate_limited_in_row: 0,
            deliveries: attached.deliveries,
            delivery: state,
            takeover: attached.takeover,
            finished: attached.finished,
            shared,
        };
        // [MQTT-4.4.0-1]: unacknowledged PUBLISHes are sent again, with
        // their original packet ids, before any new message.
        connection.resend_inflight();
        connection
    }

    /// Serves packets until the connection has to end; returns why.
    async fn serve<S: Transport>(&mut self, stream: &mut S) -> CloseCause {
        let shutdown = self.shared.shutdown.clone();
        let takeover = self.takeover.clone();
        let max_inflight = usize::from(self.shared.context.config.max_inflight);
        let keep_alive_limit = self.keep_alive.map(|keep_alive| keep_alive.mul_f64(1.5));
        // Without keep alive the timer branch is disabled and never polled.
        let keep_alive_timer =
            tokio::time::sleep(keep_alive_limit.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(keep_alive_timer);
        let recheck_interval = self.shared.context.config.credential_recheck_interval;
        let recheck_timer = tokio::time::sleep(recheck_interval);
        tokio::pin!(recheck_timer);
        let (mut reader, mut writer) = tokio::io::split(stream);

        loop {
            if self.rate_pause.is_none()
                && let Err(cause) = self.process_buffered(max_inflight)
            {
                return cause;
            }
            self.send_queued();
            self.release_idle_buffers();

            let can_read = self.pending_messages < max_inflight
                && self.out.len() < OUT_HIGH_WATER
                && self.rate_pause.is_none();
            let rate_pause = self.rate_pause;
            let can_deliver = self.delivery.queued.is_empty()
                && self.delivery.unacknowledged() < self.send_quota
                && self.out.len() < OUT_HIGH_WATER;

            tokio::select! {
                () = shutdown.cancelled() => return CloseCause::ShuttingDown,
                () = takeover.cancelled() => return CloseCause::TakenOver,
                Some(done) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(cause) = self.complete_group(done) {
                        return cause;
                    }
                }
                read = reader.read_buf(&mut self.read_buffer), if can_read => match read {
                    Ok(0) => return CloseCause::PeerClosed,
                    Ok(_) => self.last_received = Instant::now(),
                    Err(error) => return CloseCause::Io(error),
                },
                Some(message) = self.deliveries.recv(), if can_deliver => self.send_delivery(*message),
                () = sleep_until_some(rate_pause), if rate_pause.is_some() => self.rate_pause = None,
                written = writer.write(&self.out), if !self.out.is_empty() => match written {
                    Ok(0) => return CloseCause::PeerClosed,
                    Ok(count) => self.out.advance(count),
                    Err(error) => return CloseCause::Io(error),
                },
                () = &mut keep_alive_timer, if keep_alive_limit.is_some() => {
                    let limit = keep_alive_limit.unwrap_or_default();
                    let now = Instant::now();
                    let deadline = self.last_received + limit;
                    // Reading pauses while `max_inflight` appends are in
                    // flight; bytes waiting in the socket are not silence.
                    if now >= deadline && self.pending.is_empty() && self.rate_pause.is_none() {
                        return CloseCause::KeepAliveTimeout;
                    }
                    let next_check = if now >= deadline { now + limit / 2 } else { deadline };
                    keep_alive_timer.as_mut().reset(next_check.into());
                }
                signal = self.revocation.next() => {
                    if let Err(cause) = self.on_revocation_signal(signal).await {
                        return cause;
                    }
                }
                () = &mut recheck_timer => {
                    if let Err(cause) = self.recheck_credential().await {
                        return cause;
                    }
                    recheck_timer.as_mut().reset((Instant::now() + recheck_interval).into());
                }
            }
        }
    }

    /// Ends the connection on a revocation event that matches it, and
    /// checks the credential again when events were missed.
    async fn on_revocation_signal(&mut self, signal: Signal) -> Result<(), CloseCause> {
        match signal {
            Signal::Revoked(event) => {
                events::credential_revoked();
                tracing::info!(
                    %event,
                    "closing an MQTT connection whose credential was revoked"
                );
                Err(CloseCause::CredentialRevoked)
            }
            Signal::Lagged => self.recheck_credential().await,
        }
    }

    /// Checks the connection's credential again and takes over a changed
    /// role. Ends the connection when the device token or API key was
    /// revoked or the user deleted. While the metadata store fails, the
    /// connection stays as it is until the next check.
    async fn recheck_credential(&mut self) -> Result<(), CloseCause> {
        let auth = &self.shared.context.auth;
        match auth.recheck(&self.credential).await {
            Ok(Identity::Device(identity)) => {
                self.client = Client::Device(identity);
                Ok(())
            }
            Ok(Identity::Principal(principal)) => {
                if principal.role < Role::Operator {
                    // Viewers may not set a will, so a lowered role drops it.
                    self.will = None;
                }
                self.client = Client::Application(principal);
                Ok(())
            }
            Err(AuthError::Metadata(error)) => {
                tracing::warn!(%error, "cannot check the credential of an MQTT connection again: the metadata store failed");
                Ok(())
            }
            Err(error) => {
                events::credential_revoked();
                tracing::info!(%error, "closing an MQTT connection whose credential was revoked");
                Err(CloseCause::CredentialRevoked)
            }
        }
    }

    /// Decodes and handles the packets in the read buffer while fewer than
    /// `max_inflight` messages wait for an append.
    fn process_buffered(&mut self, max_inflight: usize) -> Result<(), CloseCause> {
        while self.pending_messages + self.group.messages < max_inflight {
            if !self.permit_v311_publish() {
                break;
            }
            let frame = match codec::take_frame(&mut self.read_buffer, self.max_packet_size) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(error) => return Err(CloseCause::from_frame_error(error)),
            };
            // No Authentication Method was accepted at CONNECT, so an AUTH
            // with valid flags is a Protocol Error ([MQTT-4.12.0-7]).
            if frame.header.packet_type == PacketType::Auth && frame.header.validate_flags() {
                return Err(CloseCause::protocol(
                    ReasonCode::ProtocolError,
                    "AUTH without an Authentication Method in CONNECT",
                ));
            }
            let packet =
                codec::decode(frame, self.version).map_err(CloseCause::from_frame_error)?;
            self.dispatch(packet)?;
        }
        self.flush_group();
        Ok(())
    }

    fn dispatch(&mut self, packet: Packet) -> Result<(), CloseCause> {
        match packet {
            Packet::Publish(publish) => self.on_publish(publish),
            Packet::PubRel(release) => {
                self.on_pubrel(release.packet_id);
                Ok(())
            }
            Packet::PubAck(ack) => {
                self.on_puback(ack.packet_id);
                Ok(())
            }
            Packet::PubRec(received) => {
                self.on_pubrec(received.packet_id, received.reason_code);
                Ok(())
            }
            Packet::PubComp(complete) => {
                self.on_pubcomp(complete.packet_id);
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.on_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => {
                self.on_unsubscribe(unsubscribe);
                Ok(())
            }
            Packet::PingReq => {
                self.out.extend_from_slice(&[0xD0, 0x00]);
                Ok(())
            }
            Packet::Disconnect(disconnect) => Err(self.on_disconnect(&disconnect)),
            other => Err(CloseCause::protocol(
                ReasonCode::ProtocolError,
                format!("unexpected {} from a client", other.packet_type_name()),
            )),
        }
    }

    /// Handles DISCONNECT: MQTT 5 may ask for the will (0x04) and change
    /// the session expiry.
    fn on_disconnect(&mut self, disconnect: &DisconnectPacket) -> CloseCause {
        if self.version == ProtocolVersion::V311 {
            return CloseCause::Disconnect { with_will: false };
        }

        if let Some(seconds) = disconnect.properties.get_session_expiry_interval() {
            if self.connect_expiry_zero && seconds != 0 {
                return CloseCause::protocol(
                    ReasonCode::ProtocolError,
                    "DISCONNECT sets a session expiry after CONNECT requested 0",
                );
            }
            let max = self.shared.context.config.max_session_expiry;
            self.session_expiry = Duration::from_secs(u64::from(seconds)).min(max);
            self.shared.router.sessions().set_expiry(
                &self.client_id,
                self.generation,
                self.session_expiry,
            );
        }
        CloseCause::Disconnect {
            with_will: disconnect.reason_code == ReasonCode::DisconnectWithWillMessage,
        }
    }

    /// Releases buffers that grew for a large packet once they are empty.
    fn release_idle_buffers(&mut self) {
        if self.read_buffer.is_empty() && self.read_buffer.capacity() > RELEASE_CAPACITY {
            self.read_buffer = BytesMut::with_capacity(INITIAL_READ_CAPACITY);
        }
        if self.out.is_empty() && self.out.capacity() > RELEASE_CAPACITY {
            self.out = BytesMut::new();
        }
    }

    /// Ends the connection: acknowledges what was accepted, sends MQTT 5
    /// clients the reason, closes the socket, publishes the will if due and
    /// returns the session to the store.
    async fn finish<S: Transport>(mut self, mut stream: S, cause: CloseCause) {
        log_close(&cause);

        // Every PUBLISH taken from the read buffer is appended and acknowledged
        // before the connection closes, so nothing accepted is lost and the
        // QoS 2 state handed back is complete.
        self.flush_group();
        while let Some(done) = self.pending.next().await {
            // A failed append ends the connection anyway; the remaining
            // groups are still completed for their QoS 2 state.
            let _ = self.complete_group(done);
        }

        if cause.socket_usable() {
            if self.version == ProtocolVersion::V5
                && let Some(code) = cause.disconnect_code()
            {
                // A client that sets Request Problem Information to 0 gets
                // the reason code alone.
                let reason = cause
                    .disconnect_reason()
                    .filter(|_| self.request_problem_information);
                codec::encode_disconnect(
                    code,
                    reason.as_deref(),
                    self.client_maximum_packet_size,
                    &mut self.out,
                );
            }
            write_last(&mut stream, &self.out).await;
        }
        drop(stream);

        let will = if cause.publishes_will() {
            self.will.take()
        } else {
            None
        };
        self.hand_back_session(will).await;
        tracing::debug!("MQTT client disconnected");
    }

    /// Publishes a will without delay now and returns the session to the
    /// store. A delayed will waits for its delay unless the session ends
    /// first ([MQTT-3.1.3-9]), so its timer starts after the detach.
    async fn hand_back_session(mut self, will: Option<Will>) {
        let delayed_will = match will {
            Some(will) if will.delay.is_zero() || self.session_expiry.is_zero() => {
                inbound::publish_will(&self.shared, &self.client, &self.client_id, will).await;
                None
            }
            other => other,
        };

        let state = DeliveryState {
            inflight: std::mem::take(&mut self.delivery.inflight),
            released: std::mem::take(&mut self.delivery.released),
            queued: std::mem::take(&mut self.delivery.queued),
            qos2_stored: self
                .qos2
                .iter()
                .filter(|(_, state)| **state == Qos2State::Stored)
                .map(|(packet_id, _)| *packet_id)
                .collect(),
            next_packet_id: self.delivery.next_packet_id,
        };
        let will_cancel = delayed_will.as_ref().map(|_| CancellationToken::new());
        let session_kept = self.shared.router.sessions().detach(
            &self.client_id,
            self.generation,
            state,
            &mut self.deliveries,
            will_cancel.clone(),
            Instant::now(),
        );
        self.finished.cancel();

        if let Some(will) = delayed_will {
            if session_kept {
                let delay = will.delay.min(self.session_expiry);
                let cancel = will_cancel.unwrap_or_default();
                spawn_delayed_will(
                    self.shared.clone(),
                    self.client.clone(),
                    self.client_id.clone(),
                    will,
                    delay,
                    cancel,
                );
            } else {
                inbound::publish_will(&self.shared, &self.client, &self.client_id, will).await;
            }
        }
    }
}

/// Sleeps until `deadline`; never completes without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// Publishes `will` after `delay` unless the session is resumed first or
/// the server stops.
fn spawn_delayed_will(
    shared: Arc<Shared>,
    client: Client,
    client_id: ClientId,
    will: Will,
    delay: Duration,
    cancel: CancellationToken,
) {
    use tracing::Instrument;

    let task_shared = shared.clone();
    let task = async move {
        tokio::select! {
            () = tokio::time::sleep(delay) => {
                inbound::publish_will(&task_shared, &client, &client_id, will).await;
            }
            () = cancel.cancelled() => tracing::debug!("will message cancelled: the session was resumed"),
            () = task_shared.shutdown.cancelled() => {}
        }
    };
    shared
        .tasks
        .spawn(task.instrument(tracing::Span::current()));
}

fn log_close(cause: &CloseCause) {
    match cause {
        CloseCause::ProtocolViolation { code, detail } => {
            events::protocol_error();
            tracing::debug!(reason_code = u8::from(*code), %detail, "closing MQTT connection: protocol violation");
        }
        CloseCause::Io(error) => tracing::debug!(%error, "MQTT connection failed"),
        other => tracing::debug!(cause = ?other, "closing MQTT connection"),
    }
}
