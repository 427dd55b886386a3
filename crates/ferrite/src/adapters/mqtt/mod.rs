//! The MQTT server: devices connect over TCP with MQTT 3.1.1 or 5, publish
//! telemetry that is stored in the ingest log, and subscribe to topics of
//! their own namespace.
//!
//! ## What it implements
//! - Authentication with the device access token as user name; the
//!   password is ignored, as in ThingsBoard, so existing firmware works.
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
//! - Sessions with clean start, session expiry and takeover (`session.rs`);
//!   subscriptions and delivery of QoS 0 and 1 to the sessions of the same
//!   device (`router.rs`), which other parts of Ferrite publish through with
//!   [`Router::publish_to_device`].
//! - RPC requests to devices and their responses on
//!   `v1/devices/me/rpc/{request,response}/{id}`, as in ThingsBoard
//!   (`rpc.rs`, [`Router::call_device`]).
//! - Keep-alive ([MQTT-3.1.2-24]), will messages with MQTT 5 delay, limits
//!   on connections, connect time and packet size (`connection.rs`).
//!
//! ## What it leaves out
//! - NOTE: outgoing QoS 2 is not supported: subscriptions are granted at
//!   most QoS 1 and messages are delivered with at most QoS 1.
//! - NOTE: retained messages are not supported. MQTT 5 clients learn it
//!   from CONNACK (Retain Available = 0), and a retained PUBLISH closes
//!   their connection with 0x9A. MQTT 3.1.1 publishes with RETAIN are
//!   handled as normal publishes.
//! - NOTE: shared subscriptions are not supported (`$share/` filters get
//!   SUBACK 0x9E in MQTT 5 and 0x80 in 3.1.1).
//! - NOTE: topic aliases are not supported (Topic Alias Maximum 0); a
//!   PUBLISH with a topic alias closes the connection with 0x94.
//! - Sessions live in memory and end when the server stops; there is no
//!   TLS or WebSocket listener and no enhanced (AUTH) authentication yet.
//!
//! ## Shutdown
//! [`serve`] stops accepting when its token is cancelled. Each connection
//! then stops reading, waits for its appends in flight and sends their
//! acknowledgements, sends MQTT 5 clients DISCONNECT 0x8B and closes.
//! `serve` returns when every connection task and every will message
//! waiting for its delay has ended; delayed wills are not sent at shutdown.

mod codec;
mod connection;
mod events;
mod handshake;
mod inbound;
mod outbound;
mod router;
mod rpc;
mod session;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use router::{ExternalReceivers, Router};
pub use rpc::RpcSendError;

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

/// State shared by the accept loop, the connection tasks and the tasks of
/// delayed will messages.
struct Shared {
    context: Arc<MqttContext>,
    router: Router,
    /// Every connection and delayed-will task, so that shutdown can wait
    /// for them.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Serves MQTT on `listener` until `shutdown` is cancelled; then stops
/// accepting, sends MQTT 5 clients DISCONNECT 0x8B, waits for in-flight
/// appends to finish and returns. `router` is the handle through which
/// other parts of Ferrite reach the connected devices: the caller creates
/// it with [`Router::new`] and keeps a clone.
pub async fn serve(
    listener: TcpListener,
    context: Arc<MqttContext>,
    router: Router,
    shutdown: CancellationToken,
) {
    events::register();
    let max_connections = context.config.max_connections.min(Semaphore::MAX_PERMITS);
    let connection_slots = Arc::new(Semaphore::new(max_connections));
    let shared = Arc::new(Shared {
        context,
        router,
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    let mut rejection_warnings = WarnLimiter::default();
    let mut accept_warnings = WarnLimiter::default();
    let mut session_sweep = tokio::time::interval(SESSION_SWEEP_INTERVAL);

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
            accepted = listener.accept() => accepted,
        };

        let (stream, peer) = match accepted {
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
        let Ok(slot) = connection_slots.clone().try_acquire_owned() else {
            events::connection_refused("max_connections");
            if let Some(suppressed) = rejection_warnings.allow(std::time::Instant::now()) {
                tracing::warn!(
                    %peer,
                    max_connections = shared.context.config.max_connections,
                    suppressed,
                    "refused an MQTT connection: mqtt.max_connections reached"
                );
            }
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
        shared
            .tasks
            .spawn(connection::run(stream, shared.clone(), slot).instrument(span));
    }

    drop(listener);
    tracing::info!("MQTT listener closed; finishing open connections");
    shared.tasks.close();
    shared.tasks.wait().await;
    tracing::info!("MQTT server stopped");
}
