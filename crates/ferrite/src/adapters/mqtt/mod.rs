//! The MQTT server: devices connect over TCP with MQTT 3.1.1 or 5, publish
//! telemetry that is stored in the ingest log, and subscribe to topics of
//! their own namespace. Applications of a tenant connect to follow its
//! devices' telemetry and alarms and to send commands.
//!
//! ## What it implements
//! - Authentication with the device access token as user name; the
//!   password is ignored, as in ThingsBoard, so existing firmware works.
//! - Application clients (`application.rs`): an API key, or a user's email
//!   and password, scoped to one tenant, with their own topic tree
//!   (telemetry and alarms from the live bus, commands to devices with
//!   MQTT 5 request/response, free `apps/` topics). Viewers may only
//!   subscribe.
//! - Per-device authorization of topics (`topics.rs`): a device publishes
//!   and subscribes only under `v1/devices/me/` or `devices/{its id}/`.
//! - The durability contract: PUBACK and PUBREC are sent only after the
//!   message is appended to the ingest log ([MQTT-4.3.2-2] and
//!   [MQTT-4.3.3-2] make the acknowledgement the transfer of ownership).
//!   Appends of one connection run concurrently, up to the Receive Maximum
//!   that CONNACK announces, and their acknowledgements go out in the order
//!   the PUBLISHes came in ([MQTT-4.6.0-2], [MQTT-4.6.0-3]).
//! - QoS 0, 1 and 2 inbound, with the QoS 2 packet ids kept until PUBREL so
//!   that a resent PUBLISH is not stored twice ([MQTT-4.3.3-9]).
//! - Outgoing QoS 2, with the flow (PUBREC, PUBREL, PUBCOMP) kept in the
//!   session and resumed on reconnect ([MQTT-4.4.0-1], `outbound.rs`).
//! - Sessions with clean start, session expiry and takeover (`session.rs`);
//!   subscriptions and delivery of QoS 0, 1 and 2 to the sessions of the
//!   same device (`router.rs`), which other parts of Ferrite publish
//!   through with [`Router::publish_to_device`].
//! - RPC requests to devices and their responses on
//!   `v1/devices/me/rpc/{request,response}/{id}`, as in ThingsBoard
//!   (`rpc.rs`, [`Router::call_device`]).
//! - Keep-alive ([MQTT-3.1.2-24]), will messages with MQTT 5 delay, limits
//!   on connections, connect time and packet size (`connection.rs`).
//! - MQTT 5 Payload Format Indicator, Response Topic, Correlation Data, User
//!   Properties and Content Type forwarded unchanged to subscribers, for
//!   PUBLISHes and will messages, and Response Information for applications
//!   that request it.
//! - Retained messages per device namespace and per tenant application
//!   tree (`retained.rs`), kept in SQLite, with Retain Handling, Retain As
//!   Published and limits per tenant.
//! - Message Expiry Interval on retained and queued messages. A resend of
//!   a PUBLISH already sent does not expire ([MQTT-4.3.3-7]).
//! - Shared subscriptions `$share/{ShareName}/{filter}` (`router.rs`):
//!   each message goes to one member, round robin among those online.
//! - MQTT 5 topic aliases from clients, up to 64 per connection; the
//!   server sends no aliases itself.
//! - MQTT 5 Subscription Identifiers, sent with each delivery; one copy
//!   for overlapping subscriptions carries all their identifiers
//!   ([MQTT-3.3.4-4]).
//! - Reason strings on negative acknowledgements and on the server's
//!   DISCONNECT, unless the client set Request Problem Information to 0.
//! - Application commands reach devices connected over MQTT and devices of
//!   the same tenant that observe `rpc` over CoAP ([`ExternalReceivers`]).
//!
//! ## What it leaves out
//! - Sessions live in memory and end when the server stops; there is no
//!   enhanced (AUTH) authentication and no topic aliases from the server
//!   yet.
//!
//! ## TLS
//! MQTT over TLS (`tls.mqtts_listen`) runs the same connection code over a
//! rustls stream. A client certificate accepted at the handshake
//! (`crate::tls::client_auth`) authenticates its device, and the CONNECT's
//! user name and password are then not used; without one, clients
//! authenticate at CONNECT as over TCP.
//!
//! ## WebSocket
//! MQTT over WebSocket (`/mqtt` on the HTTP listener) runs the same
//! connection code over [`WebSocketTransport`], with the same limits and
//! the same sessions (`websocket.rs`). Devices on the device WebSocket get
//! a session too ([`DeviceReceiver`]), so that commands reach them.
//!
//! ## Shutdown
//! [`serve`] stops accepting when its token is cancelled. Each connection
//! then stops reading, waits for its appends in flight and sends their
//! acknowledgements, sends MQTT 5 clients DISCONNECT 0x8B and closes.
//! `serve` returns when every connection task and every will message
//! waiting for its delay has ended; delayed wills are not sent at shutdown.

mod application;
mod codec;
mod connection;
mod events;
mod handshake;
mod inbound;
mod outbound;
mod retained;
mod router;
mod rpc;
mod session;
mod topics;
mod websocket;
mod websocket_device;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TrackedFuture;
use tracing::Instrument;

pub use connection::PACKET_HEADROOM;
pub use router::{ExternalReceivers, Router};
pub use rpc::RpcSendError;
pub use websocket::serve_websocket;
pub use websocket_device::{DeviceCommand, DeviceReceiver};

use crate::auth::Auth;
use crate::config::MqttConfig;
use crate::ingest::IngestHandle;
use events::WarnLimiter;

/// How often offline sessions are checked for expiry.
const SESSION_SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Pause after a failed accept (such as too many open files), so that the
/// loop does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Dependencies of the MQTT server on the rest of Ferrite.
pub struct MqttContext {
    pub config: MqttConfig,
    pub auth: Arc<Auth>,
    pub ingest: IngestHandle,
    /// Telemetry stamped further ahead of the server clock is rejected
    /// (`ingest.max_future`).
    pub max_future: Duration,
    /// Telemetry stamped further behind the server clock is rejected
    /// (`ingest.max_past`).
    pub max_past: Option<Duration>,
    /// Retention settings, which bound how old a timestamp may be.
    pub storage: crate::config::StorageConfig,
    /// Device profiles, which choose the payload codec.
    pub directory: Arc<crate::profiles::Directory>,
    /// Processed telemetry and alarm changes, forwarded to applications.
    pub live: crate::live::LiveBus,
    /// Stores retained messages.
    pub metadata: Arc<crate::metadata::SqliteMetadata>,
    /// Message rates, connections per address, topic and subscription
    /// limits.
    pub limits: crate::limits::Limits,
}

impl MqttContext {
    /// Returns the timestamps that a device of `tenant` may publish.
    pub fn time_window(&self, tenant: &str) -> crate::decode::TimeWindow {
        crate::decode::TimeWindow {
            max_future: self.max_future,
            retention: self.storage.retention_for(tenant),
            max_past: self.max_past,
        }
    }
}

/// State shared by the accept loop, the WebSocket endpoint, the connection
/// tasks and the tasks of delayed will messages.
struct Shared {
    context: Arc<MqttContext>,
    router: Router,
    /// Every connection and delayed-will task, so that shutdown can wait
    /// for them.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Handle to the state of the MQTT server. The TCP listener ([`serve`])
/// and MQTT over WebSocket on the HTTP listener (`websocket.rs`) share it,
/// and with it the sessions, the `mqtt.max_connections` limit and the
/// shutdown. Cheap to clone.
#[derive(Clone)]
pub struct MqttServer {
    shared: Arc<Shared>,
    /// One permit per open connection, over TCP or WebSocket.
    connection_slots: Arc<Semaphore>,
    /// Limits the warnings about connections refused at the limit.
    rejection_warnings: Arc<parking_lot::Mutex<WarnLimiter>>,
}

impl MqttServer {
    /// Creates the server state. `router` is the handle through which other
    /// parts of Ferrite reach the connected devices: the caller creates it
    /// with [`Router::new`] and keeps a clone. Connections end when
    /// `shutdown` is cancelled.
    pub fn new(context: Arc<MqttContext>, router: Router, shutdown: CancellationToken) -> Self {
        events::register();
        let max_connections = context.config.max_connections.min(Semaphore::MAX_PERMITS);
        Self {
            shared: Arc::new(Shared {
                context,
                router,
                tasks: TaskTracker::new(),
                shutdown,
            }),
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            rejection_warnings: Arc::default(),
        }
    }

    pub fn config(&self) -> &MqttConfig {
        &self.shared.context.config
    }

    /// Takes a connection slot; `None` when `mqtt.max_connections`
    /// connections are open, which is counted and logged here.
    pub fn reserve_connection(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = self.connection_slots.clone().try_acquire_owned() {
            return Some(slot);
        }
        events::connection_refused("max_connections");
        let allowed = self
            .rejection_warnings
            .lock()
            .allow(std::time::Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(
                %peer,
                max_connections = self.config().max_connections,
                suppressed,
                "refused an MQTT connection: mqtt.max_connections reached"
            );
        }
        None
    }

    /// Tracks `task` as one of the server's connections, so that [`serve`]
    /// waits for it at shutdown.
    pub fn track_connection<F: std::future::Future>(&self, task: F) -> TrackedFuture<F> {
        self.shared.tasks.track_future(task)
    }

    /// Cancelled when the server shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }
}

/// The MQTT over TLS listener and what its handshakes need.
pub struct TlsListener {
    pub listener: TcpListener,
    pub tls: crate::tls::TlsListener,
    pub trust: Arc<crate::tls::DeviceTrust>,
}

/// Accepts from `listener`, or waits forever when there is none.
async fn accept_from(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves MQTT over TCP on `listener` and over TLS on `tls`, each when
/// given, until the shutdown token of `server` is cancelled. Then it stops
/// accepting, sends MQTT 5 clients DISCONNECT 0x8B, waits for in-flight
/// appends to finish and returns. Connections over WebSocket end the same
/// way and are waited for too.
pub async fn serve(listener: Option<TcpListener>, tls: Option<TlsListener>, server: MqttServer) {
    let shared = server.shared.clone();
    let shutdown = shared.shutdown.clone();
    load_retained(&shared.context, &shared.router).await;
    let mut accept_warnings = WarnLimiter::default();
    let mut session_sweep = tokio::time::interval(SESSION_SWEEP_INTERVAL);
    shared
        .tasks
        .spawn(application::run_live_bridge(shared.clone()));

    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = session_sweep.tick() => {
                let expired = shared.router.remove_expired_sessions();
                if expired > 0 {
                    tracing::debug!(expired, "removed expired MQTT sessions");
                }
                continue;
            }
            accepted = accept_from(listener.as_ref()) => accepted.map(|accepted| (accepted, false)),
            accepted = accept_from(tls.as_ref().map(|tls| &tls.listener)) => accepted.map(|accepted| (accepted, true)),
        };

        let ((stream, peer), over_tls) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                if let Some(suppressed) = accept_warnings.allow(std::time::Instant::now()) {
                    tracing::warn!(%error, suppressed, "cannot accept an MQTT connection; retrying");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };

        // Refuse at accept, before any buffer is allocated for the client.
        let Some(slot) = server.reserve_connection(peer) else {
            drop(stream);
            continue;
        };

        // At error level, so that the ids stay on the warnings of the
        // connection whatever log level is configured.
        let span = tracing::error_span!(
            "mqtt_connection",
            %peer,
            client_id = tracing::field::Empty,
            device_id = tracing::field::Empty,
        );
        // Acknowledgements are small and latency matters more than packet
        // count.
        let _ = stream.set_nodelay(true);
        match (over_tls, &tls) {
            (true, Some(tls)) => {
                let task = serve_tls_connection(
                    stream,
                    peer,
                    tls.tls.clone(),
                    tls.trust.clone(),
                    shared.clone(),
                    slot,
                );
                shared.tasks.spawn(task.instrument(span));
            }
            _ => {
                let task = connection::run(stream, shared.clone(), Some(peer.ip()), slot, None);
                shared.tasks.spawn(task.instrument(span));
            }
        }
    }

    drop(listener);
    drop(tls);
    tracing::info!("MQTT listener closed; finishing open connections");
    shared.tasks.close();
    shared.tasks.wait().await;
    tracing::info!("MQTT server stopped");
}

/// Runs the TLS handshake, then serves the connection. A handshake that
/// fails or times out closes the connection before any MQTT packet.
async fn serve_tls_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: crate::tls::TlsListener,
    trust: Arc<crate::tls::DeviceTrust>,
    shared: Arc<Shared>,
    slot: OwnedSemaphorePermit,
) {
    let stream = tokio::select! {
        accepted = tls.accept(stream) => match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "MQTT over TLS connection closed");
                return;
            }
        },
        () = shared.shutdown.cancelled() => return,
    };
    let certificate = crate::tls::client_certificate(&stream, &trust);
    if let Some(certificate) = &certificate {
        tracing::debug!(
            fingerprint = hex::encode(certificate.fingerprint),
            common_name = certificate.common_name.as_deref().unwrap_or(""),
            "MQTT client presented a trusted certificate"
        );
    }
    connection::run(stream, shared, Some(peer.ip()), slot, certificate).await;
}

/// Loads the retained messages stored before the last stop. On failure the
/// server starts without them and logs the error.
async fn load_retained(context: &MqttContext, router: &Router) {
    match context.metadata.load_mqtt_retained().await {
        Ok(rows) => {
            let count = rows.len();
            router.retained().load(rows);
            tracing::info!(count, "loaded retained MQTT messages");
        }
        Err(error) => {
            tracing::error!(%error, "cannot load retained MQTT messages; starting without them");
        }
    }
}
