//! The LoRaWAN network server: a UDP listener for the Semtech packet
//! forwarder protocol, class A, EU868 and US915, ABP and OTAA devices of
//! LoRaWAN 1.0.x.
//!
//! Flow: a registered gateway's PUSH_DATA is acknowledged at once with
//! PUSH_ACK, as the protocol requires. Each received packet with a valid
//! CRC waits in [`uplink::Deduplicator`] for the deduplication window, so
//! that copies from other gateways join it. The merged uplink is then
//! handled once ([`uplink`]): a join request gets a join accept, a data
//! uplink is checked (MIC, frame counter), decrypted and appended to the
//! ingest log as one `Raw` envelope with the gateways' metadata. Confirmed
//! uplinks and queued downlinks get a downlink in RX1 or RX2 through the
//! gateway with the best signal ([`downlink`]).
//!
//! Unlike the other adapters this one reads the LoRaWAN registry in the
//! metadata database, because gateways and devices authenticate with EUIs
//! and keys stored there rather than with tokens.
//!
//! Left out: class B and C, ADR, MAC commands (FOpts and FPort 0 content
//! is ignored), retransmission of confirmed downlinks, LoRaWAN 1.1.

mod downlink;
mod events;
mod gateways;
mod uplink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_lorawan::semtech::{self, Packet};
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::config::LorawanConfig;
use crate::encryption::Keyring;
use crate::ingest::IngestHandle;
use crate::metadata::SqliteMetadata;
use crate::pipeline::SeenDevices;
use crate::warn_limit::WarnLimiter;

/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65_535;
/// Uplinks handled at once, counting those in their deduplication window;
/// more are dropped and counted, so that a flood cannot exhaust memory.
/// With the default 200 ms window this caps the rate at about 20,000
/// uplinks/s.
const MAX_UPLINKS_IN_FLIGHT: usize = 4096;
/// Interval of writing gateways' last-seen times.
const SEEN_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Shared services the LoRaWAN listener uses.
pub struct LorawanContext {
    pub config: LorawanConfig,
    pub metadata: Arc<SqliteMetadata>,
    pub keyring: Arc<Keyring>,
    pub ingest: IngestHandle,
    /// Last-seen times of devices whose uplinks carry no data to store.
    pub seen: SeenDevices,
}

/// State shared by the receive loop and the uplink tasks.
pub(crate) struct Listener {
    context: Arc<LorawanContext>,
    socket: Arc<UdpSocket>,
    gateways: gateways::Gateways,
    deduplicator: uplink::Deduplicator,
    downlinks: downlink::SentDownlinks,
    in_flight: Arc<tokio::sync::Semaphore>,
    net_id: u32,
    warnings: Warnings,
}

/// One limiter per kind of repeated warning.
#[derive(Default)]
struct Warnings {
    malformed: Mutex<WarnLimiter>,
    unknown_gateway: Mutex<WarnLimiter>,
    rejected_uplink: Mutex<WarnLimiter>,
    tx_ack: Mutex<WarnLimiter>,
}

impl Warnings {
    /// Returns `Some(suppressed count)` when a warning of this kind may be
    /// logged now.
    fn allow(limiter: &Mutex<WarnLimiter>) -> Option<u64> {
        limiter.lock().allow(Instant::now())
    }
}

/// Binds the UDP socket, so a taken port fails at start-up.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    use anyhow::Context;
    UdpSocket::bind(addr).await.with_context(|| {
        format!("cannot listen for LoRaWAN on UDP {addr}; choose another address with --lorawan-listen, FERRITE_LORAWAN_LISTEN or lorawan.listen")
    })
}

/// Serves gateways on `socket` until `shutdown` is cancelled, then waits
/// for the uplinks being handled.
pub async fn serve(socket: UdpSocket, context: Arc<LorawanContext>, shutdown: CancellationToken) {
    events::register();
    let net_id = context
        .config
        .net_id_value()
        .expect("the configuration was validated at start");
    let listener = Arc::new(Listener {
        deduplicator: uplink::Deduplicator::new(context.config.deduplication_window),
        context,
        socket: Arc::new(socket),
        gateways: gateways::Gateways::default(),
        downlinks: downlink::SentDownlinks::default(),
        in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_UPLINKS_IN_FLIGHT)),
        net_id,
        warnings: Warnings::default(),
    });

    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut flush = tokio::time::interval(SEEN_FLUSH_INTERVAL);
    loop {
        tokio::select! {
            received = listener.socket.recv_from(&mut buffer) => match received {
                Ok((len, from)) => listener.clone().handle_datagram(&buffer[..len], from).await,
                Err(error) => {
                    // ICMP port-unreachable from an earlier send shows up
                    // here on some systems; the socket stays usable.
                    tracing::debug!(%error, "LoRaWAN receive failed");
                }
            },
            _ = flush.tick() => {
                listener.gateways.flush_seen(&listener.context.metadata).await;
            }
            _ = shutdown.cancelled() => break,
        }
    }

    // Let the uplinks in their deduplication window and in flight finish,
    // so that accepted data reaches the ingest log before it closes.
    let window = listener.context.config.deduplication_window;
    tokio::time::sleep(window).await;
    let _ = listener
        .in_flight
        .acquire_many(MAX_UPLINKS_IN_FLIGHT as u32)
        .await;
    listener
        .gateways
        .flush_seen(&listener.context.metadata)
        .await;
}

impl Listener {
    async fn handle_datagram(self: Arc<Self>, bytes: &[u8], from: SocketAddr) {
        let packet = match semtech::decode(bytes) {
            Ok(packet) => packet,
            Err(error) => {
                events::datagram_malformed();
                if let Some(suppressed) = Warnings::allow(&self.warnings.malformed) {
                    tracing::warn!(%from, %error, bytes = bytes.len(), suppressed, "malformed Semtech UDP datagram dropped");
                }
                return;
            }
        };

        match packet {
            Packet::PushData {
                version,
                token,
                gateway_eui,
                payload,
            } => {
                events::datagram("PUSH_DATA");
                let gateway_eui = hex::encode(gateway_eui);
                if !self.is_registered(&gateway_eui, from).await {
                    return;
                }
                self.send(&semtech::encode(&Packet::PushAck { version, token }), from)
                    .await;
                self.gateways
                    .record_seen(&gateway_eui, chrono::Utc::now().timestamp_millis());
                for rxpk in payload.rxpk {
                    self.clone().receive(&gateway_eui, rxpk);
                }
            }
            Packet::PullData {
                version,
                token,
                gateway_eui,
            } => {
                events::datagram("PULL_DATA");
                let gateway_eui = hex::encode(gateway_eui);
                if !self.is_registered(&gateway_eui, from).await {
                    return;
                }
                self.gateways.record_pull(
                    &gateway_eui,
                    gateways::PullAddress {
                        addr: from,
                        version,
                    },
                );
                self.gateways
                    .record_seen(&gateway_eui, chrono::Utc::now().timestamp_millis());
                self.send(&semtech::encode(&Packet::PullAck { version, token }), from)
                    .await;
            }
            Packet::TxAck {
                token,
                gateway_eui,
                payload,
                ..
            } => {
                events::datagram("TX_ACK");
                let gateway_eui = hex::encode(gateway_eui);
                if !self.is_registered(&gateway_eui, from).await {
                    return;
                }
                self.handle_tx_ack(&gateway_eui, token, &payload);
            }
            Packet::PushAck { .. } | Packet::PullAck { .. } | Packet::PullResp { .. } => {
                // Packets of the server's side of the protocol.
                events::datagram("other");
                events::datagram_malformed();
                if let Some(suppressed) = Warnings::allow(&self.warnings.malformed) {
                    tracing::warn!(%from, suppressed, "Semtech UDP datagram of the server's side (PUSH_ACK, PULL_ACK or PULL_RESP) received from a gateway; dropped");
                }
            }
        }
    }

    /// Returns whether the gateway is registered; logs (rate-limited) and
    /// counts a datagram of an unknown one, which gets no acknowledgement.
    async fn is_registered(&self, gateway_eui: &str, from: SocketAddr) -> bool {
        match self
            .gateways
            .registered(&self.context.metadata, gateway_eui)
            .await
        {
            Ok(Some(_)) => true,
            Ok(None) => {
                events::datagram_from_unknown_gateway();
                if let Some(suppressed) = Warnings::allow(&self.warnings.unknown_gateway) {
                    tracing::warn!(gateway_eui, %from, suppressed, "datagram from an unregistered LoRaWAN gateway dropped; register it with POST /api/v1/lorawan/gateways");
                }
                false
            }
            Err(error) => {
                tracing::error!(gateway_eui, %error, "cannot look up a LoRaWAN gateway; datagram dropped");
                false
            }
        }
    }

    async fn send(&self, bytes: &[u8], to: SocketAddr) -> bool {
        match self.socket.send_to(bytes, to).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(%to, %error, "cannot send a Semtech UDP datagram");
                false
            }
        }
    }
}
