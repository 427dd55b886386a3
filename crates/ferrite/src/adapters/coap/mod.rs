//! The CoAP adapter: devices send telemetry and attributes, read and
//! observe shared attributes, and receive RPC requests over CoAP (RFC 7252)
//! with block-wise transfers (RFC 7959) and Observe (RFC 7641).
//!
//! ## Layout
//! - `message.rs`: the wire format on top of `coap-lite` (no I/O).
//! - `transport.rs`: the seam between the message layer and a transport,
//!   plain UDP here ([`serve`]) or DTLS (`dtls/`, [`dtls::serve`]).
//! - `endpoint.rs`: the message layer of one transport (Reset, duplicate
//!   detection, piggybacked and separate responses, retransmission).
//! - `resources.rs`: paths, authentication, payloads and the ingest log.
//! - `blockwise.rs`, `observe.rs`, `exchange.rs`: the state the endpoint
//!   keeps, each bounded.
//! - `error.rs`: failures and their response codes, in one place.
//!
//! ## What it leaves out
//! - NOTE: Block2 responses are cut from a fresh response per request
//!   without an ETag, so a resource that changes during a block-wise read
//!   can yield mixed blocks.
//! - NOTE: notifications are never cut into blocks; a notification larger
//!   than one datagram is sent whole.
//! - ETags of requests are ignored. Responses are JSON, so a GET with
//!   another Accept gets 4.06.
//!
//! ## Shutdown
//! [`serve`] stops reading when its token is cancelled, stops
//! retransmissions, waits for requests in flight (their responses are sent
//! once) and returns.

mod blockwise;
pub mod dtls;
mod endpoint;
mod error;
mod events;
mod exchange;
mod message;
mod observe;
mod resources;
pub mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use endpoint::Endpoint;
use observe::Observers;
use transport::{DatagramSink, PeerAuth};

use crate::adapters::mqtt::Router;
use crate::auth::Auth;
use crate::config::{CoapConfig, Config};
use crate::ingest::IngestHandle;
use crate::warn_limit::WarnLimiter;

/// Receive buffer: larger than the largest UDP payload (65,507 bytes), so
/// no datagram is cut.
const RECEIVE_BUFFER_BYTES: usize = 65_536;

/// Dependencies of the CoAP endpoints on the rest of Ferrite, shared by
/// every endpoint (plain UDP and DTLS).
pub struct CoapContext {
    pub config: CoapConfig,
    pub auth: Arc<Auth>,
    pub ingest: IngestHandle,
    /// Device profiles, which choose the payload codec, and the metadata
    /// with the devices' attributes.
    pub directory: Arc<crate::profiles::Directory>,
    /// Reaches the device's MQTT sessions (client attributes) and the RPC
    /// requests waiting for responses.
    pub router: Router,
    /// Observers of all endpoints; the router delivers to them.
    observers: Arc<Observers>,
    /// The bounds of accepted timestamps, from `[ingest]` and `[storage]`.
    ingest_config: crate::config::IngestConfig,
    storage: crate::config::StorageConfig,
    /// Message rates of devices, tenants and source addresses.
    pub limits: crate::limits::Limits,
}

impl CoapContext {
    /// Creates the context and adds its observers to `router`'s deliveries.
    /// Create one per server and share it between the UDP and DTLS
    /// endpoints, because the router keeps only the first observers it is
    /// given.
    pub fn new(
        config: &Config,
        auth: Arc<Auth>,
        ingest: IngestHandle,
        directory: Arc<crate::profiles::Directory>,
        router: Router,
        limits: crate::limits::Limits,
    ) -> Arc<CoapContext> {
        let observers = Arc::new(Observers::new(config.coap.max_observers_per_device));
        router.set_external_receivers(observers.clone());
        tokio::spawn(observe::watch_revocations(
            Arc::downgrade(&observers),
            Arc::downgrade(&auth),
        ));
        Arc::new(CoapContext {
            config: config.coap.clone(),
            auth,
            ingest,
            directory,
            router,
            observers,
            ingest_config: config.ingest.clone(),
            storage: config.storage.clone(),
            limits,
        })
    }

    /// Returns the timestamps that a device of `tenant` may send.
    pub fn time_window(&self, tenant: &str) -> crate::decode::TimeWindow {
        crate::decode::TimeWindow {
            max_future: self.ingest_config.max_future,
            retention: self.storage.retention_for(tenant),
            max_past: self.ingest_config.max_past,
        }
    }
}

/// Sends over the plain UDP socket. A full socket buffer drops the message.
struct UdpSink {
    socket: Arc<UdpSocket>,
}

impl DatagramSink for UdpSink {
    fn send(&self, peer: SocketAddr, datagram: Bytes) {
        if let Err(error) = self.socket.try_send_to(&datagram, peer) {
            events::datagram_dropped("transport_full");
            tracing::debug!(%peer, %error, "dropped an outgoing CoAP message");
        }
    }
}

/// Serves CoAP on `socket` until `shutdown` is cancelled.
pub async fn serve(socket: UdpSocket, context: Arc<CoapContext>, shutdown: CancellationToken) {
    events::register();
    let socket = Arc::new(socket);
    let endpoint = Endpoint::new(
        context,
        Arc::new(UdpSink {
            socket: socket.clone(),
        }),
    );
    let requests = TaskTracker::new();
    let mut buffer = vec![0u8; RECEIVE_BUFFER_BYTES];
    let mut receive_warnings = WarnLimiter::default();

    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => break,
            received = socket.recv_from(&mut buffer) => received,
        };
        let (length, peer) = match received {
            Ok(received) => received,
            Err(error) => {
                // Linux reports an ICMP port unreachable for an earlier
                // send as an error of the next receive; it ends nothing.
                if let Some(suppressed) = receive_warnings.allow(Instant::now()) {
                    tracing::warn!(%error, suppressed, "cannot receive a CoAP datagram; continuing");
                }
                continue;
            }
        };
        let datagram = Bytes::copy_from_slice(&buffer[..length]);
        let endpoint = endpoint.clone();
        requests.spawn(async move {
            endpoint
                .handle_datagram(peer, datagram, PeerAuth::Anonymous)
                .await;
        });
    }

    tracing::info!("CoAP listener closed; finishing requests in flight");
    endpoint.close().await;
    requests.close();
    requests.wait().await;
    tracing::info!("CoAP server stopped");
}
