//! Framing of MQTT packets on a byte stream, on top of the `mqtt5-protocol`
//! codec, which decodes and encodes the packets of MQTT 3.1.1 and 5 from
//! and to buffers without doing I/O.
//!
//! The codec decodes one packet from a buffer that contains the whole
//! packet. This module finds where a packet ends in the bytes read so far
//! and enforces the maximum packet size before the body is buffered. It
//! also reads the protocol level of a CONNECT before the packet is decoded,
//! so that an unsupported level gets the CONNACK the specification
//! requires. No sockets, no async.
//!
//! Some checks that the codec (version 0.16) leaves out are made here. The
//! codec reads the options of a MQTT 3.1.1 SUBSCRIBE that ask for QoS 3 or
//! set reserved bits as QoS 0 ([MQTT-3.8.3-4]), and it accepts empty filter
//! lists and packet identifiers of 0.

use bytes::{Buf, Bytes, BytesMut};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::{FixedHeader, Packet, PacketType, ProtocolVersion, ReasonCode};

/// Largest number of bytes of a Variable Byte Integer (remaining length).
const MAX_LENGTH_BYTES: usize = 4;

/// Error of bytes from a client that cannot be read as a packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// A packet that decodes but breaks a rule of the protocol, such as a
    /// packet identifier of 0. MQTT 5 calls this a Protocol Error (0x82).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One complete packet as received, not yet decoded.
#[derive(Debug)]
pub struct Frame {
    pub header: FixedHeader,
    /// The variable header and payload.
    pub body: Bytes,
}

/// The protocol a CONNECT packet requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectProtocol {
    Supported(ProtocolVersion),
    /// A protocol level other than 4 (3.1.1) and 5, including MQTT 3.1
    /// (`MQIsdp`, level 3).
    Unsupported(u8),
}

/// Returns the packet type from the first byte of a packet, if the
/// buffer contains one.
pub fn peek_packet_type(buffer: &[u8]) -> Option<u8> {
    buffer.first().map(|byte| byte >> 4)
}

/// Takes one complete packet off the front of `buffer`, or returns `None`
/// when more bytes are needed. In that case `buffer` has reserved room for
/// the rest of the packet, so a large packet is read without repeated
/// growth.
pub fn take_frame(
    buffer: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Frame>, FrameError> {
    let Some((remaining_length, length_bytes)) = read_remaining_length(buffer)? else {
        return Ok(None);
    };

    let size = 1 + length_bytes + remaining_length;
    if size > max_packet_size {
        return Err(FrameError::TooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buffer.len() < size {
        buffer.reserve(size - buffer.len());
        return Ok(None);
    }

    let first_byte = buffer[0];
    let packet_type = PacketType::from_u8(first_byte >> 4).ok_or_else(|| {
        FrameError::Malformed(format!("reserved packet type {}", first_byte >> 4))
    })?;
    let mut frame = buffer.split_to(size).freeze();
    frame.advance(1 + length_bytes);
    Ok(Some(Frame {
        header: FixedHeader::new(packet_type, first_byte & 0x0F, remaining_length as u32),
        body: frame,
    }))
}

/// Reads the remaining length after the first byte: the value and the
/// number of bytes it took, or `None` when the buffer ends inside it.
fn read_remaining_length(buffer: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value = 0usize;
    for index in 0..MAX_LENGTH_BYTES {
        let Some(&byte) = buffer.get(1 + index) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            // A last byte of 0 after a continuation byte adds nothing: the
            // value fits in fewer bytes ([MQTT-1.5.5-1]).
            if index > 0 && byte == 0 {
                return Err(FrameError::Malformed(
                    "the remaining length is not in its shortest encoding".to_owned(),
                ));
            }
            return Ok(Some((value, index + 1)));
        }
    }
    Err(FrameError::Malformed(
        "the remaining length takes more than 4 bytes".to_owned(),
    ))
}

/// Reads the protocol name and level at the start of a CONNECT body.
pub fn connect_protocol(body: &[u8]) -> Result<ConnectProtocol, FrameError> {
    let malformed =
        || FrameError::Malformed("CONNECT without a protocol name and level".to_owned());
    let name_len = usize::from(u16::from_be_bytes([
        *body.first().ok_or_else(malformed)?,
        *body.get(1).ok_or_else(malformed)?,
    ]));
    let name = body.get(2..2 + name_len).ok_or_else(malformed)?;
    let level = *body.get(2 + name_len).ok_or_else(malformed)?;

    match (name, level) {
        (b"MQTT", 4) => Ok(ConnectProtocol::Supported(ProtocolVersion::V311)),
        (b"MQTT", 5) => Ok(ConnectProtocol::Supported(ProtocolVersion::V5)),
        (b"MQTT" | b"MQIsdp", level) => Ok(ConnectProtocol::Unsupported(level)),
        _ => Err(FrameError::Malformed(format!(
            "unknown protocol name {:?}",
            String::from_utf8_lossy(name)
        ))),
    }
}

/// Decodes a frame as a packet of `version`. Bytes left over after the
/// packet make it malformed.
pub fn decode(frame: Frame, version: ProtocolVersion) -> Result<Packet, FrameError> {
    // Wrong fixed header flags are left to the codec, which reports them as
    // malformed.
    if matches!(
        frame.header.packet_type,
        PacketType::Subscribe | PacketType::Unsubscribe
    ) && frame.header.validate_flags()
    {
        check_filter_list(&frame, version)?;
    }
    let mut body = frame.body;
    let packet = Packet::decode_from_body_with_version(
        frame.header.packet_type,
        &frame.header,
        &mut body,
        version.as_u8(),
    )
    .map_err(|error| FrameError::Malformed(error.to_string()))?;
    if body.has_remaining() {
        return Err(FrameError::Malformed(format!(
            "{} has {} bytes after its end",
            packet.packet_type_name(),
            body.remaining()
        )));
    }
    check_packet_id(&packet)?;
    Ok(packet)
}

/// Checks the topic filter list of a SUBSCRIBE or UNSUBSCRIBE before the
/// codec reads it. The list may not be empty ([MQTT-3.8.3-3],
/// [MQTT-3.10.3-2]). Subscription options may not set reserved bits or ask
/// for QoS 3 ([MQTT-3.8.3-4], [MQTT-3.8.3-5]), nor Retain Handling 3 in
/// MQTT 5. A list cut short is left to the codec to report.
fn check_filter_list(frame: &Frame, version: ProtocolVersion) -> Result<(), FrameError> {
    let body = &frame.body[..];
    let subscribe = frame.header.packet_type == PacketType::Subscribe;
    let name = if subscribe {
        "SUBSCRIBE"
    } else {
        "UNSUBSCRIBE"
    };

    // A body too short for the packet identifier or the properties is left
    // to the codec, which reports it as malformed.
    let mut at = 2;
    if body.len() < at {
        return Ok(());
    }
    if version == ProtocolVersion::V5 {
        let Some((length, length_bytes)) = read_variable_int(&body[at..]) else {
            return Ok(());
        };
        at += length_bytes + length;
        if at > body.len() {
            return Ok(());
        }
    }
    if at == body.len() {
        return Err(FrameError::Protocol(format!(
            "{name} without a topic filter"
        )));
    }

    while subscribe && at + 2 <= body.len() {
        let filter_len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        at += 2 + filter_len;
        let Some(&options) = body.get(at) else {
            return Ok(());
        };
        at += 1;
        let reserved = match version {
            ProtocolVersion::V311 => 0xFC,
            ProtocolVersion::V5 => 0xC0,
        };
        if options & reserved != 0 || options & 0x03 == 0x03 {
            return Err(FrameError::Malformed(format!(
                "SUBSCRIBE options 0x{options:02x} set reserved bits or QoS 3"
            )));
        }
        if version == ProtocolVersion::V5 && (options >> 4) & 0x03 == 0x03 {
            return Err(FrameError::Protocol(
                "SUBSCRIBE with Retain Handling 3".to_owned(),
            ));
        }
    }
    Ok(())
}

/// Reads a Variable Byte Integer: the value and the number of bytes it took.
fn read_variable_int(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (index, byte) in bytes.iter().take(MAX_LENGTH_BYTES).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Some((value, index + 1));
        }
    }
    None
}

/// PUBLISH with QoS 1 or 2, SUBSCRIBE and UNSUBSCRIBE need a packet
/// identifier other than 0 ([MQTT-2.3.1-1], [MQTT-2.2.1-3]).
fn check_packet_id(packet: &Packet) -> Result<(), FrameError> {
    let packet_id = match packet {
        Packet::Publish(publish) => publish.packet_id,
        Packet::Subscribe(subscribe) => Some(subscribe.packet_id),
        Packet::Unsubscribe(unsubscribe) => Some(unsubscribe.packet_id),
        _ => None,
    };
    if packet_id == Some(0) {
        return Err(FrameError::Protocol(format!(
            "{} with packet identifier 0",
            packet.packet_type_name()
        )));
    }
    Ok(())
}

/// Appends the encoded `packet` to `out`.
///
/// Encoding fails for strings over 65,535 bytes and packets over 256 MiB.
/// Such a packet is logged as an error and not sent.
pub fn encode(packet: &impl MqttPacket, out: &mut BytesMut) {
    let start = out.len();
    if let Err(error) = packet.encode(out) {
        out.truncate(start);
        tracing::error!(%error, "cannot encode an MQTT packet; it was not sent");
    }
}

/// Appends an MQTT 5 DISCONNECT with `code` and, when given, a Reason
/// String. The Reason String is left out when the packet would exceed
/// `max_packet_size`, the client's Maximum Packet Size ([MQTT-3.1.2-25]),
/// or when it is longer than a UTF-8 string may be (65,535 bytes).
///
/// Without a Reason String the property length is still written as 0.
/// The specification allows leaving it out (MQTT 5.0, 3.14.2.2.1), but
/// rumqttc 0.25 reads such a DISCONNECT as incomplete and reports only that
/// the connection was aborted.
pub fn encode_disconnect(
    code: ReasonCode,
    reason: Option<&str>,
    max_packet_size: usize,
    out: &mut BytesMut,
) {
    let reason = reason
        .and_then(|text| u16::try_from(text.len()).ok().map(|len| (text, len)))
        .filter(|(text, _)| disconnect_size(text.len()) <= max_packet_size);
    let Some((text, text_len)) = reason else {
        out.extend_from_slice(&[0xE0, 0x02, u8::from(code), 0x00]);
        return;
    };

    // Reason String property: identifier 0x1F, then a two-byte length.
    let properties_len = 3 + text.len();
    let remaining = 1 + variable_int_len(properties_len) + properties_len;
    out.reserve(1 + variable_int_len(remaining) + remaining);
    out.extend_from_slice(&[0xE0]);
    put_variable_int(remaining, out);
    out.extend_from_slice(&[u8::from(code)]);
    put_variable_int(properties_len, out);
    out.extend_from_slice(&[0x1F]);
    out.extend_from_slice(&text_len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Size of an encoded DISCONNECT with a reason code and a Reason String of
/// `text_len` bytes.
fn disconnect_size(text_len: usize) -> usize {
    let properties_len = 3 + text_len;
    let remaining = 1 + variable_int_len(properties_len) + properties_len;
    1 + variable_int_len(remaining) + remaining
}

/// Appends `value` as an MQTT Variable Byte Integer; `value` must be below
/// 268,435,456.
fn put_variable_int(mut value: usize, out: &mut BytesMut) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if value == 0 {
            return;
        }
    }
}

/// Appends an encoded PUBLISH to `out` without copying the payload twice.
pub fn encode_publish(packet: &PublishPacket, out: &mut BytesMut) {
    let start = out.len();
    let body_len = packet.body_encoded_size();
    out.reserve(body_len + 1 + MAX_LENGTH_BYTES);
    let header = FixedHeader::new(PacketType::Publish, packet.flags(), body_len as u32);
    let encoded = header
        .encode(out)
        .and_then(|()| packet.encode_body_direct(out));
    if let Err(error) = encoded {
        out.truncate(start);
        tracing::error!(%error, "cannot encode an MQTT PUBLISH; it was not sent");
    }
}

/// Size of a PUBLISH once encoded, to compare with the client's maximum
/// packet size.
pub fn publish_size(packet: &PublishPacket) -> usize {
    let body_len = packet.body_encoded_size();
    1 + variable_int_len(body_len) + body_len
}

fn variable_int_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;
    use mqtt5_protocol::QoS;
    use mqtt5_protocol::packet::puback::PubAckPacket;

    use super::*;

    /// Appends an MQTT string: a big-endian u16 length and the bytes.
    fn put_string(out: &mut BytesMut, value: &[u8]) {
        out.put_u16(value.len() as u16);
        out.put_slice(value);
    }

    fn connect_body(name: &[u8], level: u8) -> BytesMut {
        let mut body = BytesMut::new();
        put_string(&mut body, name);
        body.put_u8(level);
        body.put_u8(0x02);
        body.put_u16(60);
        if level == 5 {
            body.put_u8(0);
        }
        put_string(&mut body, b"client");
        body
    }

    fn framed(first_byte: u8, body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.put_u8(first_byte);
        let mut length = body.len();
        loop {
            let mut byte = (length % 128) as u8;
            length /= 128;
            if length > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if length == 0 {
                break;
            }
        }
        out.put_slice(body);
        out
    }

    #[test]
    fn frame_is_taken_only_when_complete() {
        let packet = framed(0xC0, &[]);
        let mut buffer = BytesMut::from(&packet[..1]);
        assert!(
            take_frame(&mut buffer, 1024)
                .expect("valid prefix")
                .is_none()
        );

        buffer.extend_from_slice(&packet[1..]);
        let frame = take_frame(&mut buffer, 1024)
            .expect("valid")
            .expect("complete");
        assert_eq!(frame.header.packet_type, PacketType::PingReq);
        assert!(buffer.is_empty());
    }

    #[test]
    fn truncated_body_waits_for_more_bytes() {
        let body = connect_body(b"MQTT", 4);
        let packet = framed(0x10, &body);
        let mut buffer = BytesMut::from(&packet[..packet.len() - 3]);
        assert!(
            take_frame(&mut buffer, 1024)
                .expect("valid prefix")
                .is_none()
        );
        assert!(buffer.capacity() >= packet.len());
    }

    #[test]
    fn oversized_packet_is_rejected_from_its_header() {
        let mut buffer = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0x03][..]);
        let error = take_frame(&mut buffer, 1024).expect_err("too large");
        // Remaining length 65,535 plus the first byte and three length bytes.
        assert_eq!(
            error,
            FrameError::TooLarge {
                size: 65_539,
                max: 1024
            }
        );
    }

    #[test]
    fn five_byte_remaining_length_is_malformed() {
        let mut buffer = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(
            take_frame(&mut buffer, usize::MAX),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn padded_remaining_length_is_malformed() {
        let mut buffer = BytesMut::from(&[0xC0u8, 0x80, 0x00][..]);
        assert!(matches!(
            take_frame(&mut buffer, 1024),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn reserved_packet_type_is_malformed() {
        let mut buffer = framed(0x00, &[]);
        assert!(matches!(
            take_frame(&mut buffer, 1024),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn connect_protocol_levels() {
        let cases = [
            (
                &b"MQTT"[..],
                4,
                Some(ConnectProtocol::Supported(ProtocolVersion::V311)),
            ),
            (
                b"MQTT",
                5,
                Some(ConnectProtocol::Supported(ProtocolVersion::V5)),
            ),
            (b"MQTT", 6, Some(ConnectProtocol::Unsupported(6))),
            (b"MQIsdp", 3, Some(ConnectProtocol::Unsupported(3))),
            (b"HTTP", 4, None),
        ];
        for (name, level, expected) in cases {
            let body = connect_body(name, level);
            assert_eq!(
                connect_protocol(&body).ok(),
                expected,
                "name {name:?} level {level}"
            );
        }
        assert!(connect_protocol(&[0x00]).is_err());
        assert!(connect_protocol(&[0x00, 0x04, b'M']).is_err());
    }

    #[test]
    fn connect_decodes_for_both_versions() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut buffer = framed(0x10, &connect_body(b"MQTT", version.as_u8()));
            let frame = take_frame(&mut buffer, 1024)
                .expect("valid")
                .expect("complete");
            let Packet::Connect(connect) = decode(frame, version).expect("decodes") else {
                panic!("not a CONNECT");
            };
            assert_eq!(connect.client_id, "client");
            assert_eq!(connect.protocol_version, version.as_u8());
        }
    }

    #[test]
    fn trailing_bytes_make_a_packet_malformed() {
        let mut buffer = framed(0xC0, &[0x01]);
        let frame = take_frame(&mut buffer, 1024)
            .expect("valid")
            .expect("complete");
        assert!(decode(frame, ProtocolVersion::V5).is_err());
    }

    #[test]
    fn zero_packet_id_is_a_protocol_error() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut publish = PublishPacket::new("v1/devices/me/a", Bytes::new(), QoS::AtLeastOnce)
                .with_packet_id(0);
            publish.protocol_version = version.as_u8();
            let mut buffer = BytesMut::new();
            encode_publish(&publish, &mut buffer);
            let frame = take_frame(&mut buffer, 1024)
                .expect("valid")
                .expect("complete");
            assert!(matches!(
                decode(frame, version),
                Err(FrameError::Protocol(_))
            ));
        }
    }

    #[test]
    fn subscribe_option_bits_are_checked() {
        // Packet id 1, filter "a", then the options byte.
        let cases = [
            (ProtocolVersion::V311, 0x03, true),
            (ProtocolVersion::V311, 0x04, true),
            (ProtocolVersion::V311, 0x02, false),
            (ProtocolVersion::V5, 0xC0, true),
            (ProtocolVersion::V5, 0x03, true),
            (ProtocolVersion::V5, 0x30, true),
            (ProtocolVersion::V5, 0x2E, false),
        ];
        for (version, options, rejected) in cases {
            let mut body = vec![0x00, 0x01];
            if version == ProtocolVersion::V5 {
                body.push(0x00);
            }
            body.extend_from_slice(&[0x00, 0x01, b'a', options]);
            let mut buffer = framed(0x82, &body);
            let frame = take_frame(&mut buffer, 1024)
                .expect("valid")
                .expect("complete");
            assert_eq!(
                decode(frame, version).is_err(),
                rejected,
                "{version:?} options 0x{options:02x}"
            );
        }
    }

    #[test]
    fn empty_filter_lists_are_protocol_errors() {
        let cases = [
            (ProtocolVersion::V311, 0x82, &[0x00, 0x01][..]),
            (ProtocolVersion::V311, 0xA2, &[0x00, 0x01]),
            (ProtocolVersion::V5, 0x82, &[0x00, 0x01, 0x00]),
            (ProtocolVersion::V5, 0xA2, &[0x00, 0x01, 0x00]),
        ];
        for (version, first_byte, body) in cases {
            let mut buffer = framed(first_byte, body);
            let frame = take_frame(&mut buffer, 1024)
                .expect("valid")
                .expect("complete");
            assert!(
                matches!(decode(frame, version), Err(FrameError::Protocol(_))),
                "{version:?} 0x{first_byte:02x}"
            );
        }
    }

    #[test]
    fn truncated_filter_lists_are_malformed() {
        let cases = [
            (ProtocolVersion::V311, &[0x00][..]),
            (ProtocolVersion::V5, &[0x00, 0x01, 0x05]),
        ];
        for (version, body) in cases {
            let mut buffer = framed(0x82, body);
            let frame = take_frame(&mut buffer, 1024)
                .expect("valid")
                .expect("complete");
            assert!(
                matches!(decode(frame, version), Err(FrameError::Malformed(_))),
                "{version:?} {body:02x?}"
            );
        }
    }

    #[test]
    fn publish_encoding_matches_codec() {
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut packet = PublishPacket::new(
                "v1/devices/me/attributes",
                Bytes::from_static(b"{\"a\":1}"),
                QoS::AtLeastOnce,
            )
            .with_packet_id(7);
            packet.protocol_version = version.as_u8();

            let mut direct = BytesMut::new();
            encode_publish(&packet, &mut direct);
            let mut reference = BytesMut::new();
            encode(&packet, &mut reference);
            assert_eq!(direct, reference);
            assert_eq!(publish_size(&packet), direct.len());
        }
    }

    #[test]
    fn disconnect_carries_an_empty_property_length() {
        let mut out = BytesMut::new();
        encode_disconnect(ReasonCode::SessionTakenOver, None, 1024, &mut out);
        assert_eq!(&out[..], &[0xE0, 0x02, 0x8E, 0x00]);

        let frame = take_frame(&mut out, 16).expect("valid").expect("complete");
        let Packet::Disconnect(disconnect) = decode(frame, ProtocolVersion::V5).expect("decodes")
        else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(disconnect.reason_code, ReasonCode::SessionTakenOver);
    }

    #[test]
    fn disconnect_reason_string_decodes() {
        use mqtt5_protocol::{PropertyId, PropertyValue};

        let reason = "x".repeat(200);
        let mut out = BytesMut::new();
        encode_disconnect(ReasonCode::ProtocolError, Some(&reason), 1024, &mut out);
        assert_eq!(out.len(), disconnect_size(reason.len()));

        let frame = take_frame(&mut out, 1024)
            .expect("valid")
            .expect("complete");
        let Packet::Disconnect(disconnect) = decode(frame, ProtocolVersion::V5).expect("decodes")
        else {
            panic!("not a DISCONNECT");
        };
        assert_eq!(disconnect.reason_code, ReasonCode::ProtocolError);
        assert_eq!(
            disconnect.properties.get(PropertyId::ReasonString),
            Some(&PropertyValue::Utf8String(reason.clone()))
        );
    }

    #[test]
    fn disconnect_reason_string_is_dropped_above_maximum_packet_size() {
        let mut out = BytesMut::new();
        encode_disconnect(ReasonCode::ProtocolError, Some("too long"), 10, &mut out);
        assert_eq!(&out[..], &[0xE0, 0x02, 0x82, 0x00]);
    }

    /// Feeds mutated copies of valid packets, and random bytes, through
    /// framing and decoding: every outcome is allowed except a panic.
    #[test]
    fn damaged_packets_never_panic() {
        use mqtt5_protocol::packet::subscribe::SubscribePacket;
        use rand::{Rng, SeedableRng};

        let mut seeds = Vec::new();
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            seeds.push(framed(0x10, &connect_body(b"MQTT", version.as_u8())));
            let mut publish = PublishPacket::new(
                "v1/devices/me/telemetry",
                Bytes::from_static(b"{\"a\":1}"),
                QoS::ExactlyOnce,
            )
            .with_packet_id(9);
            publish.protocol_version = version.as_u8();
            let mut out = BytesMut::new();
            encode_publish(&publish, &mut out);
            seeds.push(out);
            let mut subscribe =
                SubscribePacket::new(3).add_filter("v1/devices/me/#", QoS::AtLeastOnce);
            subscribe.protocol_version = version.as_u8();
            let mut out = BytesMut::new();
            encode(&subscribe, &mut out);
            seeds.push(out);
        }

        let mut rng = rand::rngs::StdRng::seed_from_u64(0x4d51_5454);
        for round in 0..20_000 {
            let bytes = if round % 4 == 0 {
                let mut random = vec![0u8; rng.random_range(0..64)];
                rng.fill(&mut random[..]);
                BytesMut::from(&random[..])
            } else {
                let mut copy = seeds[round % seeds.len()].clone();
                for _ in 0..rng.random_range(1..4) {
                    let index = rng.random_range(0..copy.len());
                    copy[index] = rng.random();
                }
                copy
            };
            for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
                let mut buffer = bytes.clone();
                while let Ok(Some(frame)) = take_frame(&mut buffer, 4096) {
                    if frame.header.packet_type == PacketType::Connect {
                        let _ = connect_protocol(&frame.body);
                    }
                    let _ = decode(frame, version);
                }
            }
        }
    }

    #[test]
    fn puback_without_reason_is_two_bytes_of_body() {
        let mut out = BytesMut::new();
        encode(&PubAckPacket::new(0x1234), &mut out);
        assert_eq!(&out[..], &[0x40, 0x02, 0x12, 0x34]);
    }
}
