//! The device WebSocket, `GET /api/v1/devices/ws`: telemetry from the
//! device, each message acknowledged after the ingest log has stored it,
//! and commands to the device on the same socket.
//!
//! ## Steps of a socket
//! 1. Authenticate the device access token before the upgrade, so that a
//!    bad token gets an HTTP 401 ([`endpoint`]).
//! 2. Attach a router session ([`DeviceReceiver`]), so that commands reach
//!    the device while the socket is open.
//! 3. Serve ([`DeviceSocket::serve`]): check each telemetry message like
//!    the HTTP endpoint does and append it, with up to
//!    [`MAX_PENDING_REPLIES`] appends in flight. Replies go out in the
//!    order of the messages. Commands go out as they arrive.
//! 4. Finish: wait for the appends in flight, send their replies and a
//!    close frame, and end the session.
//!
//! ## Revocation
//! A revocation event that matches the socket's token or device (rotation,
//! device deletion, revocation of all its credentials) ends it at once with
//! close code 1008. The token is also checked again every
//! `mqtt.credential_recheck_interval` and after missed events, for changes
//! made by another process.
//!
//! ## Bounds
//! A writer task sends the queued messages. The queue takes
//! `websocket.max_outgoing_messages`; when it is full the client does not
//! read, and the socket is closed and counted in
//! `ferrite_websocket_device_disconnects_total{reason="slow_client"}`.
//! Other sockets are not affected. A socket that receives nothing, not even
//! a pong to the server's pings, for `websocket.idle_timeout` is closed.
//! At most `websocket.max_connections` sockets are open; the next upgrade
//! request gets 503.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, SplitSink};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::Instrument;

use super::messages::{self, ClientMessage, MessageError};
use crate::adapters::mqtt::{DeviceCommand, DeviceReceiver};
use crate::api::ApiError;
use crate::auth::revocation::{RevocationWatch, Signal};
use crate::auth::{AuthError, DeviceIdentity, HeldCredential, Identity};
use crate::decode::check_payload;
use crate::ingest::{ContentType, Envelope, IngestError, Protocol};
use crate::server::AppState;

/// Telemetry messages of one socket waiting for their append; reading
/// pauses while this many wait.
pub const MAX_PENDING_REPLIES: usize = 32;
/// Bytes a message may have beyond `http.max_body_bytes` of telemetry for
/// its `type` and `id`. A larger message ends the socket, but not with
/// 1009: tungstenite fails the read, and the client sees a close frame
/// without a status code (1005) or none.
const MESSAGE_OVERHEAD: usize = 4096;
/// Time to send the last replies and the close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
pub struct SocketParams {
    access_token: Option<String>,
}

/// `GET /api/v1/devices/ws`: upgrades to the device WebSocket. The device
/// access token comes as `Authorization: Bearer` or as `access_token=`.
pub async fn endpoint(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Query<SocketParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|rejection| {
        ApiError::bad_request(format!(
            "invalid query string ({}); give the device access token once, as access_token=<token>",
            rejection.body_text()
        ))
    })?;
    // Subscribed before the token is checked, so that no revocation in
    // between is missed.
    let revocations = state.auth.revocations().subscribe();
    let (device, credential) =
        authenticate(&state, &headers, params.access_token.as_deref()).await?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "WebSocket upgrade required",
            format!(
                "{}; connect with a WebSocket client, or send telemetry with POST /api/v1/devices/{}/telemetry",
                rejection.body_text(),
                device.device_id
            ),
        )
    })?;

    let Ok(slot) = state.device_socket_slots.clone().try_acquire_owned() else {
        metrics::counter!("ferrite_websocket_device_rejected_total", "reason" => "max_connections")
            .increment(1);
        tracing::debug!(%peer, device_id = %device.device_id, "rejected a device WebSocket: websocket.max_connections reached");
        return Err(ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many connections",
                format!(
                    "websocket.max_connections ({}) device sockets are open; retry later",
                    state.config.websocket.max_connections
                ),
            )
        });
    };

    let span = tracing::error_span!(
        "device_websocket",
        %peer,
        device_id = %device.device_id,
    );
    let max_message = state
        .config
        .http
        .max_body_bytes
        .saturating_add(MESSAGE_OVERHEAD);
    Ok(upgrade
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| {
            let mqtt = state.mqtt.clone();
            let held = match &credential {
                HeldCredential::DeviceToken(hash) => device.held_access(Some(*hash)),
                _ => device.held_access(None),
            };
            let revocation = RevocationWatch::new(revocations, held);
            let task =
                run(socket, state, device, credential, revocation, peer, slot).instrument(span);
            async move { mqtt.track_connection(task).await }
        })
        .into_response())
}

/// Authenticates by the `Authorization` header or the `access_token`
/// parameter, never both. Only device access tokens open a device socket.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(DeviceIdentity, HeldCredential), ApiError> {
    let header_token = match headers.get(header::AUTHORIZATION) {
        Some(value) => Some(bearer_value(value)?),
        None => None,
    };
    let token = match (header_token, query_token) {
        (Some(_), Some(_)) => {
            count_rejected("not_authorized");
            return Err(ApiError::bad_request(
                "credentials are given twice: send either the Authorization header or access_token, not both",
            ));
        }
        (Some(token), None) | (None, Some(token)) => token.trim(),
        (None, None) => {
            count_rejected("not_authorized");
            return Err(ApiError::unauthorized(
                "missing credentials: send Authorization: Bearer <device access token>, or access_token=<device access token> where the client cannot set headers",
            ));
        }
    };
    if !token.starts_with(crate::auth::DEVICE_TOKEN_PREFIX) {
        count_rejected("not_authorized");
        return Err(ApiError::unauthorized(
            "the device WebSocket takes a device access token; API keys and user tokens cannot open it",
        ));
    }
    let device = state
        .auth
        .authenticate_device(token)
        .await
        .map_err(|error| {
            count_rejected("not_authorized");
            ApiError::from(error)
        })?;
    Ok((device, HeldCredential::device_token(token)))
}

fn bearer_value(value: &axum::http::HeaderValue) -> Result<&str, ApiError> {
    value
        .to_str()
        .ok()
        .and_then(|text| text.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
        .ok_or_else(|| {
            count_rejected("not_authorized");
            ApiError::unauthorized("the Authorization header must be Bearer <device access token>")
        })
}

fn count_rejected(reason: &'static str) {
    metrics::counter!("ferrite_ingest_rejected_total", "protocol" => "websocket", "reason" => reason)
        .increment(1);
}

/// Reason a device socket ends; the label of
/// `ferrite_websocket_device_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SocketEnd {
    /// The client sent a close frame or closed the connection.
    ClientClosed,
    /// Reading or writing failed, or a message exceeded the size limit.
    Failed,
    IdleTimeout,
    /// The outgoing queue was full: the client does not read.
    SlowClient,
    ShuttingDown,
    /// The router ended the device's session.
    SessionEnded,
    /// The token was revoked or the device deleted.
    Revoked,
}

impl SocketEnd {
    fn label(self) -> &'static str {
        match self {
            SocketEnd::ClientClosed => "client_closed",
            SocketEnd::Failed => "failed",
            SocketEnd::IdleTimeout => "idle_timeout",
            SocketEnd::SlowClient => "slow_client",
            SocketEnd::ShuttingDown => "shutting_down",
            SocketEnd::SessionEnded => "session_ended",
            SocketEnd::Revoked => "revoked",
        }
    }

    /// Returns the close frame to send, or `None` when the socket cannot
    /// take one.
    fn close_frame(self, idle_timeout: Duration) -> Option<CloseFrame> {
        let (code, reason) = match self {
            SocketEnd::ClientClosed | SocketEnd::Failed | SocketEnd::SlowClient => return None,
            SocketEnd::IdleTimeout => (
                1001,
                format!(
                    "idle timeout: nothing received for {}",
                    humantime::format_duration(idle_timeout)
                ),
            ),
            SocketEnd::ShuttingDown => (1001, "the server is shutting down".to_owned()),
            SocketEnd::SessionEnded => (1000, "the device session ended".to_owned()),
            SocketEnd::Revoked => (
                1008,
                "the access token was revoked or the device deleted".to_owned(),
            ),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        })
    }
}

/// Counts the socket in `ferrite_websocket_devices_connected` for as long
/// as it lives.
struct OpenSocket;

impl OpenSocket {
    fn new() -> Self {
        metrics::gauge!("ferrite_websocket_devices_connected").increment(1.0);
        Self
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics::gauge!("ferrite_websocket_devices_connected").decrement(1.0);
    }
}

/// Serves one device socket. `_slot` is its place within
/// `websocket.max_connections`, returned when the socket ends.
async fn run(
    socket: WebSocket,
    state: Arc<AppState>,
    device: DeviceIdentity,
    credential: HeldCredential,
    revocation: RevocationWatch,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    let _open = OpenSocket::new();
    let receiver = DeviceReceiver::attach(&state.mqtt_router, device.device_id, device.tenant_id);
    let (sink, incoming) = socket.split();
    let (outgoing, queue) = mpsc::channel(state.config.websocket.max_outgoing_messages);
    let writer = tokio::spawn(write_messages(sink, queue));
    tracing::debug!("device WebSocket opened");

    let mut socket = DeviceSocket {
        state,
        device,
        credential,
        revocation,
        peer,
        receiver,
        outgoing,
        replies: FuturesOrdered::new(),
        last_received: Instant::now(),
    };
    let end = socket.serve(incoming).await;
    socket.finish(end, writer).await;
}

/// Sends queued messages until the queue closes, then closes the socket
/// (which also flushes tungstenite's reply to a client's close frame).
/// A failed send still closes the socket, so a queued close frame is not
/// lost with the message that failed.
async fn write_messages(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
) -> Result<(), axum::Error> {
    while let Some(message) = queue.recv().await {
        let is_close = matches!(message, Message::Close(_));
        if let Err(error) = sink.send(message).await {
            let _ = sink.close().await;
            return Err(error);
        }
        if is_close {
            return Ok(());
        }
    }
    sink.close().await
}

struct DeviceSocket {
    state: Arc<AppState>,
    device: DeviceIdentity,
    /// The token hash, checked again every
    /// `mqtt.credential_recheck_interval` and after missed events.
    credential: HeldCredential,
    /// Revocation events that end the socket at once.
    revocation: RevocationWatch,
    /// The client's address, for the message rate per address.
    peer: SocketAddr,
    /// The router session through which commands arrive.
    receiver: DeviceReceiver,
    /// Messages for the writer task; bounded by
    /// `websocket.max_outgoing_messages`.
    outgoing: mpsc::Sender<Message>,
    /// Replies to the device's messages, in message order: acknowledgements
    /// wait for their append, errors are ready at once.
    replies: FuturesOrdered<BoxFuture<'static, String>>,
    last_received: Instant,
}

impl DeviceSocket {
    /// Serves the socket until it has to end; returns why.
    async fn serve(&mut self, mut incoming: futures::stream::SplitStream<WebSocket>) -> SocketEnd {
        let shutdown = self.state.mqtt.shutdown().clone();
        let ping_interval = self.state.config.websocket.ping_interval;
        let idle_timeout = self.state.config.websocket.idle_timeout;
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let idle_check = tokio::time::sleep(idle_timeout);
        tokio::pin!(idle_check);
        // tokio's interval panics on a zero period, which the setting allows.
        let recheck_interval = self
            .state
            .config
            .mqtt
            .credential_recheck_interval
            .max(Duration::from_millis(100));
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + recheck_interval,
            recheck_interval,
        );
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let can_read = self.replies.len() < MAX_PENDING_REPLIES;
            let queued = tokio::select! {
                () = shutdown.cancelled() => return SocketEnd::ShuttingDown,
                message = incoming.next(), if can_read => {
                    self.last_received = Instant::now();
                    match message {
                        Some(Ok(message)) => match self.on_message(message).await {
                            Ok(()) => true,
                            Err(end) => return end,
                        },
                        None | Some(Err(_)) => return SocketEnd::Failed,
                    }
                }
                Some(reply) = self.replies.next(), if !self.replies.is_empty() => {
                    self.queue(Message::text(reply))
                }
                command = self.receiver.next_command() => match command {
                    Some(command) => self.queue(command_message(&command)),
                    None => return SocketEnd::SessionEnded,
                },
                _ = ping.tick() => self.queue(Message::Ping(Bytes::new())),
                signal = self.revocation.next() => match signal {
                    Signal::Revoked(event) => {
                        tracing::info!(%event, "closing a device WebSocket whose credential was revoked");
                        return SocketEnd::Revoked;
                    }
                    Signal::Lagged => match self.recheck_credential().await {
                        Ok(()) => true,
                        Err(end) => return end,
                    },
                },
                _ = recheck.tick() => match self.recheck_credential().await {
                    Ok(()) => true,
                    Err(end) => return end,
                },
                () = &mut idle_check => {
                    let deadline = self.last_received + idle_timeout;
                    // Reading pauses while appends are in flight; unread
                    // messages are not silence.
                    if Instant::now() >= deadline && self.replies.is_empty() {
                        return SocketEnd::IdleTimeout;
                    }
                    let next = deadline.max(Instant::now() + ping_interval);
                    idle_check.as_mut().reset(next.into());
                    true
                }
            };
            if !queued {
                return SocketEnd::SlowClient;
            }
        }
    }

    /// Checks the token again; ends the socket when it no longer names this
    /// device. While the metadata store fails, the socket stays open.
    async fn recheck_credential(&mut self) -> Result<(), SocketEnd> {
        match self.state.auth.recheck(&self.credential).await {
            Ok(Identity::Device(device)) if device.device_id == self.device.device_id => {
                self.device = device;
                Ok(())
            }
            Err(AuthError::Metadata(error)) => {
                tracing::warn!(%error, "cannot check the token of a device WebSocket again: the metadata store failed");
                Ok(())
            }
            Ok(_) | Err(_) => {
                tracing::info!("closing a device WebSocket whose access token was revoked");
                Err(SocketEnd::Revoked)
            }
        }
    }

    /// Handles one message from the client. Returns the end of the socket
    /// when the client closed it.
    async fn on_message(&mut self, message: Message) -> Result<(), SocketEnd> {
        match message {
            Message::Text(text) => {
                if let Some(reply) = self.on_text(text.as_str()).await {
                    self.replies.push_back(reply);
                }
            }
            Message::Binary(_) => {
                count_rejected("binary_message");
                let error = MessageError::new(
                    Value::Null,
                    "binary_message",
                    "binary messages are not supported; send JSON text messages",
                );
                self.replies.push_back(ready_reply(&error));
            }
            Message::Close(_) => return Err(SocketEnd::ClientClosed),
            // tungstenite replies to pings itself. A pong only shows that the
            // client is alive.
            Message::Ping(_) | Message::Pong(_) => {}
        }
        Ok(())
    }

    /// Returns the reply to a text message: an acknowledgement that waits
    /// for the append, or an error. A command response that reached its
    /// command gets no reply.
    async fn on_text(&mut self, text: &str) -> Option<BoxFuture<'static, String>> {
        let parsed = messages::parse_client_message(text);
        let result = match parsed {
            Ok(ClientMessage::Telemetry { id, data }) => {
                self.accept_telemetry(id, data).await.map(Some)
            }
            Ok(ClientMessage::CommandResponse { request_id, result }) => self
                .accept_command_response(request_id, result)
                .map(|()| None),
            Err(error) => Err(error),
        };
        match result {
            Ok(reply) => reply,
            Err(error) => {
                count_rejected(error.code);
                tracing::debug!(error = error.code, message = %error.message, "rejected a device WebSocket message");
                Some(ready_reply(&error))
            }
        }
    }

    /// Checks telemetry as the HTTP endpoint does and starts its append.
    async fn accept_telemetry(
        &mut self,
        id: Value,
        data: &RawValue,
    ) -> Result<BoxFuture<'static, String>, MessageError> {
        // Over a rate limit the message gets an error reply and the socket
        // stays open; the device sends it again after `retry_after`.
        let sender = crate::limits::Sender {
            tenant: self.device.tenant_id,
            device: Some(self.device.device_id),
            address: Some(self.peer.ip()),
        };
        if let Err(limited) = self.state.limits.check_message(&sender) {
            crate::limits::count_rate_limited("websocket", &limited);
            return Err(MessageError::rate_limited(id, &limited));
        }

        let max_bytes = self.state.config.http.max_body_bytes;
        let payload = Bytes::copy_from_slice(data.get().as_bytes());
        if payload.len() > max_bytes {
            return Err(MessageError::new(
                id,
                "too_large",
                format!(
                    "\"data\" has {} bytes, more than http.max_body_bytes ({max_bytes}); send smaller batches",
                    payload.len()
                ),
            ));
        }

        let received_at_ns = crate::adapters::http::now_ns();
        let directory = &self.state.directory;
        directory.warm(self.device.profile_id).await;
        let content_type = directory
            .content_type_for(self.device.profile_id, None, &payload)
            .map_err(|message| MessageError::new(id.clone(), "wrong_codec", message))?;
        // Bytes for a profile's script codec are decoded by the pipeline;
        // failures go to the device's dead-letter log.
        if content_type != ContentType::Raw {
            let window = crate::decode::TimeWindow::new(
                &self.state.config,
                &self.device.tenant_id.to_string(),
            );
            check_payload(content_type, &payload, received_at_ns, window).map_err(|error| {
                MessageError::new(id.clone(), error.reason(), error.to_string())
            })?;
        }

        let envelope = Envelope {
            tenant_id: self.device.tenant_id,
            device_id: self.device.device_id,
            // NOTE: the ingest log has no protocol code for WebSocket yet;
            // the socket is served by the HTTP listener.
            protocol: Protocol::Http,
            received_at_ns,
            content_type,
            payload,
            meta: Bytes::new(),
        };
        let ingest = self.state.ingest.clone();
        Ok(async move {
            match ingest.append(vec![envelope]).await {
                Ok(()) => {
                    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "websocket")
                        .increment(1);
                    messages::ack(&id)
                }
                Err(error) => {
                    let code = append_error_code(&error);
                    count_rejected(code);
                    let message = format!("{error}; nothing was stored, send the message again");
                    messages::error(&MessageError::new(id, code, message))
                }
            }
        }
        .boxed())
    }

    /// Hands the device's response to the command that waits for it.
    fn accept_command_response(&self, request_id: u32, result: String) -> Result<(), MessageError> {
        if self.receiver.respond(request_id, Bytes::from(result)) {
            return Ok(());
        }
        Err(MessageError::new(
            Value::from(request_id),
            "unknown_command",
            format!(
                "no command with id {request_id} waits for a response: it timed out, was answered already, or was never sent"
            ),
        ))
    }

    /// Queues a message for the writer; false when the queue is full.
    fn queue(&self, message: Message) -> bool {
        match self.outgoing.try_send(message) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            // The writer has ended; the next read reports how.
            Err(TrySendError::Closed(_)) => true,
        }
    }

    /// Waits for the appends in flight, sends their replies and the close
    /// frame when the socket can take them, and ends the session.
    async fn finish(
        mut self,
        end: SocketEnd,
        mut writer: tokio::task::JoinHandle<Result<(), axum::Error>>,
    ) {
        metrics::counter!("ferrite_websocket_device_disconnects_total", "reason" => end.label())
            .increment(1);
        if end == SocketEnd::SlowClient {
            tracing::warn!(
                max_outgoing_messages = self.state.config.websocket.max_outgoing_messages,
                "closed a device WebSocket whose client does not read"
            );
        } else {
            tracing::debug!(reason = end.label(), "device WebSocket closed");
        }

        // Every telemetry message taken from the socket is appended, so that
        // the device's view and the log agree. The replies are queued unless
        // the client does not read or has sent its close frame. After that
        // frame tungstenite has queued its reply close frame, and RFC 6455
        // section 5.5.1 allows no data frames after it.
        let idle_timeout = self.state.config.websocket.idle_timeout;
        let send_replies = !matches!(end, SocketEnd::SlowClient | SocketEnd::ClientClosed);
        while let Some(reply) = self.replies.next().await {
            if send_replies {
                self.queue(Message::text(reply));
            }
        }
        if let Some(frame) = end.close_frame(idle_timeout) {
            self.queue(Message::Close(Some(frame)));
        }
        drop(self.outgoing);

        if end == SocketEnd::SlowClient
            || tokio::time::timeout(CLOSE_TIMEOUT, &mut writer)
                .await
                .is_err()
        {
            writer.abort();
        }
    }
}

/// Wraps an error reply in a future that is ready at once.
fn ready_reply(error: &MessageError) -> BoxFuture<'static, String> {
    futures::future::ready(messages::error(error)).boxed()
}

fn command_message(command: &DeviceCommand) -> Message {
    Message::text(messages::command(
        command.request_id,
        &command.method,
        &command.params,
    ))
}

fn append_error_code(error: &IngestError) -> &'static str {
    match error {
        IngestError::Overloaded => "overloaded",
        IngestError::ShuttingDown => "shutting_down",
        IngestError::Io => "storage_unavailable",
        IngestError::TooLarge(_) => "too_large",
    }
}
