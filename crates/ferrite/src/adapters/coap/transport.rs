// crates/ferrite/src/adapters/coap/transport.rs
use crate::auth::DeviceIdentity;
use bytes::Bytes;
use std::net::SocketAddr;

/// Sends CoAP messages to peers over one transport (plain UDP or DTLS).
pub trait DatagramSink: Send + Sync + 'static {
    /// Queues one CoAP message for `peer`. Never waits: when the transport
    /// cannot take it, the message is dropped and counted.
    fn send(&self, peer: SocketAddr, datagram: Bytes);
}

/// What the transport proved about the sender of a datagram.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// Plain UDP: the request must carry an access token (path or query).
    Anonymous,
    /// DTLS: the handshake authenticated this device (PSK identity or client certificate).
    Device(DeviceIdentity),
}
