//! [`Envelope`]: one accepted message before decoding, and its binary form
//! in the ingest log.
//!
//! Record body layout (little endian), version 2:
//! ```text
//! version u8 (=2) | tenant [16] | device [16] | protocol u8 | received_at_ns i64
//! | content_type u8 | precision u8 | meta_len u32 | payload_len u32 | meta | payload
//! ```
//! Version 1 records (no `meta_len` and `meta`) are still read, so a log
//! written by an older version replays.
//!
//! Version 3 (with `ingest.encrypt`) has the same header with `meta_len` 0
//! and, in place of `meta | payload`, the sealed bytes of
//! `meta_len u32 | meta | payload` (see `crate::encryption`).

use bytes::Bytes;
use ferrite_codec::line_protocol::Precision;
use ferrite_core::TimestampNs;

use crate::encryption::OpenError;
use crate::ids::{DeviceId, TenantId};

const VERSION: u8 = 2;
/// Version of records whose meta and payload are sealed under the tenant's
/// data key (`ingest.encrypt`).
const SEALED_VERSION: u8 = 3;
const VERSION_1_HEADER_LEN: usize = 1 + 16 + 16 + 1 + 8 + 1 + 1 + 4;
const HEADER_LEN: usize = VERSION_1_HEADER_LEN + 4;

/// Protocol that brought a message in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Mqtt,
    Http,
    Coap,
    Lorawan,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Mqtt => "mqtt",
            Protocol::Http => "http",
            Protocol::Coap => "coap",
            Protocol::Lorawan => "lorawan",
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
    /// SenML in JSON (RFC 8428 section 5).
    SenmlJson,
    /// SenML in CBOR (RFC 8428 section 6).
    SenmlCbor,
    /// Bytes for the codec of the device's profile (Cayenne LPP or a
    /// script), which runs in the pipeline.
    Raw,
}

impl ContentType {
    /// The name used in the dead-letter log and the API.
    pub fn name(self) -> String {
        match self {
            ContentType::Json => "json".into(),
            ContentType::LineProtocol(precision) => {
                format!("line_protocol;precision={}", precision_name(precision))
            }
            ContentType::SenmlJson => "senml+json".into(),
            ContentType::SenmlCbor => "senml+cbor".into(),
            ContentType::Raw => "raw".into(),
        }
    }

    /// Reads a name written by [`ContentType::name`].
    pub fn from_name(name: &str) -> Option<ContentType> {
        Some(match name {
            "json" => ContentType::Json,
            "senml+json" => ContentType::SenmlJson,
            "senml+cbor" => ContentType::SenmlCbor,
            "raw" => ContentType::Raw,
            other => {
                let precision = other.strip_prefix("line_protocol;precision=")?;
                ContentType::LineProtocol(match precision {
                    "ns" => Precision::Ns,
                    "us" => Precision::Us,
                    "ms" => Precision::Ms,
                    "s" => Precision::S,
                    _ => return None,
                })
            }
        })
    }
}

fn precision_name(precision: Precision) -> &'static str {
    match precision {
        Precision::Ns => "ns",
        Precision::Us => "us",
        Precision::Ms => "ms",
        Precision::S => "s",
    }
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
    /// Transport metadata as a JSON object (for example a LoRaWAN uplink's
    /// `f_port`, RSSI and SNR); empty when there is none.
    pub meta: Bytes,
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

/// Reason a record body did not decode.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeFailure {
    /// Not an envelope this version can read.
    Invalid,
    /// A sealed record whose seal cannot be opened: its tenant's data key
    /// is gone (the tenant was deleted) or the record was altered.
    Unreadable(OpenError),
}

impl Envelope {
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.meta.len() + self.payload.len()
    }

    fn encode_header(&self, out: &mut Vec<u8>, version: u8, meta_len: usize, payload_len: usize) {
        out.push(version);
        out.extend_from_slice(self.tenant_id.as_bytes());
        out.extend_from_slice(self.device_id.as_bytes());
        out.push(match self.protocol {
            Protocol::Mqtt => 0,
            Protocol::Http => 1,
            Protocol::Coap => 2,
            Protocol::Lorawan => 3,
        });
        out.extend_from_slice(&self.received_at_ns.to_le_bytes());
        let (content_type, precision) = match self.content_type {
            ContentType::Json => (0, 0),
            ContentType::LineProtocol(precision) => (1, precision_code(precision)),
            ContentType::SenmlJson => (2, 0),
            ContentType::SenmlCbor => (3, 0),
            ContentType::Raw => (4, 0),
        };
        out.push(content_type);
        out.push(precision);
        out.extend_from_slice(&(meta_len as u32).to_le_bytes());
        out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        self.encode_header(out, VERSION, self.meta.len(), self.payload.len());
        out.extend_from_slice(&self.meta);
        out.extend_from_slice(&self.payload);
    }

    /// Encodes the envelope as a version 3 record: the header stays readable,
    /// so that a replay can find the tenant's key, and `seal` encrypts
    /// `meta_len u32 | meta | payload`.
    pub fn encode_sealed_into(&self, out: &mut Vec<u8>, seal: impl FnOnce(&[u8]) -> Vec<u8>) {
        let mut inner = Vec::with_capacity(4 + self.meta.len() + self.payload.len());
        inner.extend_from_slice(&(self.meta.len() as u32).to_le_bytes());
        inner.extend_from_slice(&self.meta);
        inner.extend_from_slice(&self.payload);
        let sealed = seal(&inner);
        self.encode_header(out, SEALED_VERSION, 0, sealed.len());
        out.extend_from_slice(&sealed);
    }

    /// Decodes a record body; `None` when it is not a valid envelope or is
    /// sealed.
    pub fn decode(body: &[u8]) -> Option<Envelope> {
        Self::decode_with(body, |_, _, _| {
            Err(OpenError::MissingDataKey { version: 0 })
        })
        .ok()
    }

    /// Decodes a record body, opening a sealed one (version 3) with `open`,
    /// which gets the tenant, the device and the sealed bytes.
    pub fn decode_with(
        body: &[u8],
        open: impl FnOnce(TenantId, DeviceId, &[u8]) -> Result<Vec<u8>, OpenError>,
    ) -> Result<Envelope, DecodeFailure> {
        let invalid = DecodeFailure::Invalid;
        let version = *body.first().ok_or(DecodeFailure::Invalid)?;
        let header_len = match version {
            1 => VERSION_1_HEADER_LEN,
            VERSION | SEALED_VERSION => HEADER_LEN,
            _ => return Err(invalid),
        };
        if body.len() < header_len {
            return Err(invalid);
        }
        let tenant: [u8; 16] = body[1..17].try_into().map_err(|_| DecodeFailure::Invalid)?;
        let device: [u8; 16] = body[17..33]
            .try_into()
            .map_err(|_| DecodeFailure::Invalid)?;
        let protocol = match body[33] {
            0 => Protocol::Mqtt,
            1 => Protocol::Http,
            2 => Protocol::Coap,
            3 => Protocol::Lorawan,
            _ => return Err(invalid),
        };
        let received_at_ns = i64::from_le_bytes(
            body[34..42]
                .try_into()
                .map_err(|_| DecodeFailure::Invalid)?,
        );
        let content_type = match body[42] {
            0 => ContentType::Json,
            1 => ContentType::LineProtocol(
                precision_from_code(body[43]).ok_or(DecodeFailure::Invalid)?,
            ),
            2 => ContentType::SenmlJson,
            3 => ContentType::SenmlCbor,
            4 => ContentType::Raw,
            _ => return Err(invalid),
        };
        let read_len = |bytes: &[u8], at: usize| {
            bytes
                .get(at..at + 4)
                .map(|len| u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize)
                .ok_or(DecodeFailure::Invalid)
        };
        let (meta_len, payload_len) = if version == 1 {
            (0, read_len(body, 44)?)
        } else {
            (read_len(body, 44)?, read_len(body, 48)?)
        };
        let total = header_len
            .checked_add(meta_len)
            .and_then(|len| len.checked_add(payload_len));
        if total != Some(body.len()) {
            return Err(DecodeFailure::Invalid);
        }

        let tenant_id = TenantId::from_bytes(tenant);
        let device_id = DeviceId::from_bytes(device);
        let (meta, payload) = if version == SEALED_VERSION {
            if meta_len != 0 {
                return Err(DecodeFailure::Invalid);
            }
            let inner = open(tenant_id, device_id, &body[header_len..])
                .map_err(DecodeFailure::Unreadable)?;
            let inner_meta_len = read_len(&inner, 0)?;
            let meta_end = 4usize
                .checked_add(inner_meta_len)
                .filter(|end| *end <= inner.len())
                .ok_or(DecodeFailure::Invalid)?;
            (
                Bytes::copy_from_slice(&inner[4..meta_end]),
                Bytes::copy_from_slice(&inner[meta_end..]),
            )
        } else {
            let meta_end = header_len + meta_len;
            (
                Bytes::copy_from_slice(&body[header_len..meta_end]),
                Bytes::copy_from_slice(&body[meta_end..]),
            )
        };
        Ok(Envelope {
            tenant_id,
            device_id,
            protocol,
            received_at_ns,
            content_type,
            meta,
            payload,
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
            meta: Bytes::from_static(b"{\"f_port\":2}"),
        };
        let mut buffer = Vec::new();
        envelope.encode_into(&mut buffer);
        assert_eq!(buffer.len(), envelope.encoded_len());
        assert_eq!(Envelope::decode(&buffer), Some(envelope));
    }

    #[test]
    fn version_1_records_still_decode() {
        let tenant = TenantId::new_random();
        let device = DeviceId::new_random();
        let mut body = vec![1];
        body.extend_from_slice(tenant.as_bytes());
        body.extend_from_slice(device.as_bytes());
        body.push(0);
        body.extend_from_slice(&7i64.to_le_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"{ }");
        let envelope = Envelope::decode(&body).expect("version 1 decodes");
        assert_eq!(envelope.payload, Bytes::from_static(b"{ }"));
        assert!(envelope.meta.is_empty());
        assert_eq!(envelope.received_at_ns, 7);
    }

    #[test]
    fn content_type_names_round_trip() {
        for content_type in [
            ContentType::Json,
            ContentType::LineProtocol(Precision::Us),
            ContentType::SenmlJson,
            ContentType::SenmlCbor,
            ContentType::Raw,
        ] {
            assert_eq!(
                ContentType::from_name(&content_type.name()),
                Some(content_type)
            );
        }
    }

    #[test]
    fn sealed_envelope_round_trip() {
        let envelope = Envelope {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            protocol: Protocol::Lorawan,
            received_at_ns: 5,
            content_type: ContentType::Raw,
            payload: Bytes::from_static(b"secret telemetry"),
            meta: Bytes::from_static(b"{\"f_port\":2}"),
        };
        let key = crate::encryption::DataKey::from_bytes(&[4; 32], 1);
        let mut buffer = Vec::new();
        envelope.encode_sealed_into(&mut buffer, |inner| key.seal("c", inner));
        assert!(!buffer.windows(6).any(|window| window == b"secret"));

        let decoded = Envelope::decode_with(&buffer, |tenant, device, sealed| {
            assert_eq!(tenant, envelope.tenant_id);
            assert_eq!(device, envelope.device_id);
            key.open("c", sealed)
        });
        assert_eq!(decoded, Ok(envelope));
        assert_eq!(Envelope::decode(&buffer), None);
        let unreadable = Envelope::decode_with(&buffer, |_, _, _| Err(OpenError::Decrypt));
        assert_eq!(
            unreadable,
            Err(DecodeFailure::Unreadable(OpenError::Decrypt))
        );
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
            meta: Bytes::new(),
        };
        let mut buffer = Vec::new();
        envelope.encode_into(&mut buffer);
        assert_eq!(Envelope::decode(&buffer[..buffer.len() - 1]), None);
    }
}
