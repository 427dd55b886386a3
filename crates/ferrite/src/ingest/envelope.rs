//! [`Envelope`]: one accepted message before decoding, and its binary form
//! in the ingest log.
//!
//! Record body layout (little endian):
//! ```text
//! version u8 (=1) | tenant [16] | device [16] | protocol u8 | received_at_ns i64
//! | content_type u8 | precision u8 | payload_len u32 | payload
//! ```

use bytes::Bytes;
use ferrite_codec::line_protocol::Precision;
use ferrite_core::TimestampNs;

use crate::ids::{DeviceId, TenantId};

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 16 + 16 + 1 + 8 + 1 + 1 + 4;

/// Protocol that brought a message in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Mqtt,
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Http => "http",
        }
    }
}

/// Encoding of the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// Telemetry JSON: see `ferrite_codec::json`.
    Json,
    /// InfluxDB line protocol with the precision its request named.
    LineProtocol(Precision),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub protocol: Protocol,
    /// Server time when the message arrived; the timestamp of JSON values
    /// that carry none, so a replay stores them at the same instant.
    pub received_at_ns: TimestampNs,
    pub content_type: ContentType,
    pub payload: Bytes,
}

fn precision_code(precision: Precision) -> u8 {
    match precision {
        Precision::Ns => 0,
        Precision::Us => 1,
        Precision::Ms => 2,
        Precision::S => 3,
    }
}

fn precision_from_code(code: u8) -> Option<Precision> {
    Some(match code {
        0 => Precision::Ns,
        1 => Precision::Us,
        2 => Precision::Ms,
        3 => Precision::S,
        _ => return None,
    })
}

impl Envelope {
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        out.push(VERSION);
        out.extend_from_slice(self.tenant_id.as_bytes());
        out.extend_from_slice(self.device_id.as_bytes());
        out.push(match self.protocol {
            Protocol::Mqtt => 0,
            Protocol::Http => 1,
        });
        out.extend_from_slice(&self.received_at_ns.to_le_bytes());
        let (content_type, precision) = match self.content_type {
            ContentType::Json => (0, 0),
            ContentType::LineProtocol(precision) => (1, precision_code(precision)),
        };
        out.push(content_type);
        out.push(precision);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// Decodes a record body; `None` when it is not a valid envelope.
    pub fn decode(body: &[u8]) -> Option<Envelope> {
        if body.len() < HEADER_LEN || body[0] != VERSION {
            return None;
        }
        let tenant: [u8; 16] = body[1..17].try_into().ok()?;
        let device: [u8; 16] = body[17..33].try_into().ok()?;
        let protocol = match body[33] {
            0 => Protocol::Mqtt,
            1 => Protocol::Http,
            _ => return None,
        };
        let received_at_ns = i64::from_le_bytes(body[34..42].try_into().ok()?);
        let content_type = match body[42] {
            0 => ContentType::Json,
            1 => ContentType::LineProtocol(precision_from_code(body[43])?),
            _ => return None,
        };
        let len = u32::from_le_bytes(body[44..48].try_into().ok()?) as usize;
        if body.len() != HEADER_LEN + len {
            return None;
        }
        Some(Envelope {
            tenant_id: TenantId::from_bytes(tenant),
            device_id: DeviceId::from_bytes(device),
            protocol,
            received_at_ns,
            content_type,
            payload: Bytes::copy_from_slice(&body[HEADER_LEN..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip() {
        let envelope = Envelope {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            protocol: Protocol::Http,
            received_at_ns: -42,
            content_type: ContentType::LineProtocol(Precision::Ms),
            payload: Bytes::from_static(b"m,dev=a f=1 1"),
        };
        let mut buffer = Vec::new();
        envelope.encode_into(&mut buffer);
        assert_eq!(buffer.len(), envelope.encoded_len());
        assert_eq!(Envelope::decode(&buffer), Some(envelope));
    }

    #[test]
    fn truncated_envelope_is_rejected() {
        let envelope = Envelope {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            protocol: Protocol::Mqtt,
            received_at_ns: 1,
            content_type: ContentType::Json,
            payload: Bytes::from_static(b"{\"a\":1}"),
        };
        let mut buffer = Vec::new();
        envelope.encode_into(&mut buffer);
        assert_eq!(Envelope::decode(&buffer[..buffer.len() - 1]), None);
    }
}
