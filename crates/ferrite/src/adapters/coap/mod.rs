//! CoAP adapter (RFC 7252 with block-wise transfers, RFC 7959, and Observe,
//! RFC 7641) over plain UDP or, through `transport`, DTLS.

pub mod dtls;
// TODO: drop the allow once the endpoint uses the transport types.
#[allow(dead_code)]
pub mod transport;
