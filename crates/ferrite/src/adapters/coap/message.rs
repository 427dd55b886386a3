//! The CoAP wire format as Ferrite uses it: checks of the fixed header that
//! `coap-lite` leaves out, the options Ferrite understands, Block1/Block2
//! option values (RFC 7959 section 2.2) and building responses. Pure
//! functions with no I/O, so the endpoint, tests and the benchmark share
//! them.

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType, ResponseType};

/// Size of the fixed header: version, type, token length, code, message ID.
pub const HEADER_LEN: usize = 4;
/// Largest token length (RFC 7252 section 3: lengths 9 to 15 are reserved
/// and a message with one is a message format error).
pub const MAX_TOKEN_LEN: usize = 8;

/// Content-Format numbers from the IANA CoAP registry (RFC 7252 section
/// 12.3, RFC 8428 section 12.3 for SenML).
pub mod content_format {
    pub const TEXT_PLAIN: u16 = 0;
    pub const OCTET_STREAM: u16 = 42;
    pub const JSON: u16 = 50;
    pub const CBOR: u16 = 60;
    pub const SENML_JSON: u16 = 110;
    pub const SENML_CBOR: u16 = 112;
}

/// Options that Ferrite processes or may safely ignore; any other critical
/// (odd-numbered) option makes a request fail with 4.02 Bad Option.
const KNOWN_OPTIONS: [u16; 13] = [
    3,  // Uri-Host
    4,  // ETag
    6,  // Observe
    7,  // Uri-Port
    11, // Uri-Path
    12, // Content-Format
    14, // Max-Age
    15, // Uri-Query
    17, // Accept
    23, // Block2
    27, // Block1
    28, // Size2
    60, // Size1
];
/// Proxy-Uri and Proxy-Scheme: Ferrite is no proxy (5.05).
const PROXY_OPTIONS: [u16; 2] = [35, 39];

/// The fixed header, read before the rest so that a message whose options
/// cannot be parsed can still be rejected with a Reset of its message ID.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedHeader {
    pub version: u8,
    pub message_type: MessageType,
    pub token_len: usize,
    pub code: u8,
    pub message_id: u16,
}

/// The reason a datagram is not a CoAP message that Ferrite can process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the datagram is shorter than the 4-byte CoAP header")]
    Truncated,
    #[error("CoAP version {0} is not supported; only version 1 exists")]
    Version(u8),
    #[error("token length {0} is reserved; tokens are 0 to 8 bytes long")]
    TokenLength(usize),
    #[error("the datagram ends inside the token")]
    TruncatedToken,
    #[error("an empty message (code 0.00) must have no token, options or payload")]
    NonEmptyEmpty,
    #[error(
        "the options are malformed (reserved option delta or length, or an option past the end)"
    )]
    Options,
    #[error("a payload marker is followed by no payload")]
    EmptyPayload,
}

impl FormatError {
    /// Label value of `ferrite_coap_datagrams_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            FormatError::Truncated | FormatError::TruncatedToken => "truncated",
            FormatError::Version(_) => "unsupported_version",
            FormatError::TokenLength(_) => "invalid_token_length",
            FormatError::NonEmptyEmpty | FormatError::Options | FormatError::EmptyPayload => {
                "format_error"
            }
        }
    }
}

/// Reads the fixed header of `datagram`.
pub fn read_header(datagram: &[u8]) -> Result<FixedHeader, FormatError> {
    if datagram.len() < HEADER_LEN {
        return Err(FormatError::Truncated);
    }
    let first = datagram[0];
    let message_type = match (first >> 4) & 0b11 {
        0 => MessageType::Confirmable,
        1 => MessageType::NonConfirmable,
        2 => MessageType::Acknowledgement,
        _ => MessageType::Reset,
    };
    Ok(FixedHeader {
        version: first >> 6,
        message_type,
        token_len: usize::from(first & 0x0f),
        code: datagram[1],
        message_id: u16::from_be_bytes([datagram[2], datagram[3]]),
    })
}

/// Parses a whole message. The caller reads the header first with
/// [`read_header`], so that it can reject a malformed Confirmable message
/// with a Reset.
pub fn parse(datagram: &[u8], header: &FixedHeader) -> Result<Packet, FormatError> {
    if header.version != 1 {
        return Err(FormatError::Version(header.version));
    }
    if header.token_len > MAX_TOKEN_LEN {
        return Err(FormatError::TokenLength(header.token_len));
    }
    if datagram.len() < HEADER_LEN + header.token_len {
        return Err(FormatError::TruncatedToken);
    }
    if header.code == 0 && datagram.len() > HEADER_LEN {
        return Err(FormatError::NonEmptyEmpty);
    }
    let packet = Packet::from_bytes(datagram).map_err(|_| FormatError::Options)?;
    // coap-lite accepts a payload marker at the very end, which RFC 7252
    // section 3 makes a message format error.
    if packet.payload.is_empty() && ends_with_payload_marker(datagram, &packet) {
        return Err(FormatError::EmptyPayload);
    }
    Ok(packet)
}

/// True when the last byte of `datagram` is a payload marker that starts
/// no payload. Options never end in 0xFF except as an option value, so the
/// encoded length without payload separates the two.
fn ends_with_payload_marker(datagram: &[u8], packet: &Packet) -> bool {
    datagram.last() == Some(&0xff)
        && packet
            .to_bytes_unlimited()
            .is_ok_and(|encoded| encoded.len() + 1 == datagram.len())
}

/// Returns the numbers of every option in `packet` that Ferrite does not
/// process, in option order.
pub fn unknown_options(packet: &Packet) -> impl Iterator<Item = u16> + '_ {
    packet
        .options()
        .map(|(number, _)| *number)
        .filter(|number| !KNOWN_OPTIONS.contains(number) && *number != 258)
}

/// True for an option number whose absence of support must fail the
/// request (RFC 7252 section 5.4.1: odd numbers are critical).
pub fn is_critical(number: u16) -> bool {
    number % 2 == 1
}

/// True for Proxy-Uri and Proxy-Scheme.
pub fn is_proxy_option(number: u16) -> bool {
    PROXY_OPTIONS.contains(&number)
}

/// Decodes an unsigned integer option value (RFC 7252 section 3.2: 0 to 4
/// bytes, big-endian, leading zeros allowed).
pub fn decode_uint(value: &[u8]) -> Option<u32> {
    if value.len() > 4 {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u32, |number, byte| (number << 8) | u32::from(*byte)),
    )
}

/// Encodes an unsigned integer option value in the fewest bytes.
pub fn encode_uint(number: u32) -> Vec<u8> {
    let bytes = number.to_be_bytes();
    let skip = bytes.iter().take_while(|byte| **byte == 0).count();
    bytes[skip..].to_vec()
}

/// Returns the first value of an unsigned integer option. `Err` when the
/// value is longer than 4 bytes.
pub fn uint_option(packet: &Packet, option: CoapOption) -> Result<Option<u32>, ()> {
    match packet.get_first_option(option) {
        None => Ok(None),
        Some(value) => decode_uint(value).map(Some).ok_or(()),
    }
}

/// The value of a Block1 or Block2 option (RFC 7959 section 2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockValue {
    /// Block number, up to 2^20 - 1.
    pub num: u32,
    /// More blocks follow.
    pub more: bool,
    /// Size exponent: the block size is 2^(szx + 4), 16 to 1024 bytes.
    pub szx: u8,
}

impl BlockValue {
    /// Largest size exponent; 7 is reserved for BERT (RFC 8323) and invalid
    /// over UDP.
    pub const MAX_SZX: u8 = 6;

    pub fn decode(value: &[u8]) -> Option<BlockValue> {
        let number = decode_uint(value)?;
        if value.len() > 3 {
            return None;
        }
        let szx = (number & 0x7) as u8;
        if szx > Self::MAX_SZX {
            return None;
        }
        Some(BlockValue {
            num: number >> 4,
            more: number & 0x8 != 0,
            szx,
        })
    }

    pub fn encode(self) -> Vec<u8> {
        encode_uint((self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx))
    }

    pub fn size(self) -> usize {
        1 << (self.szx + 4)
    }

    /// Byte offset of this block in the whole body.
    pub fn offset(self) -> usize {
        self.num as usize * self.size()
    }
}

/// Returns the value of a Block option in `packet`: `Ok(None)` when
/// absent, `Err` when malformed.
pub fn block_option(packet: &Packet, option: CoapOption) -> Result<Option<BlockValue>, ()> {
    match packet.get_first_option(option) {
        None => Ok(None),
        Some(value) => BlockValue::decode(value).map(Some).ok_or(()),
    }
}

/// Returns the request method, or `None` for a code that is no request
/// method Ferrite supports (the request gets 4.05).
pub fn method(packet: &Packet) -> Option<RequestType> {
    match packet.header.code {
        MessageClass::Request(RequestType::UnKnown) => None,
        MessageClass::Request(method) => Some(method),
        _ => None,
    }
}

/// True for codes 0.01 to 0.31, the request class.
pub fn is_request_code(code: u8) -> bool {
    code >> 5 == 0 && code != 0
}

/// Returns the Uri-Path segments, decoded as UTF-8 (invalid bytes
/// replaced).
pub fn path_segments(packet: &Packet) -> Vec<String> {
    packet
        .get_option(CoapOption::UriPath)
        .map(|values| {
            values
                .iter()
                .map(|segment| String::from_utf8_lossy(segment).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Returns the value of the Uri-Query `name=value`, if present.
pub fn query_value(packet: &Packet, name: &str) -> Option<String> {
    packet
        .get_option(CoapOption::UriQuery)?
        .iter()
        .find_map(|query| {
            let query = std::str::from_utf8(query).ok()?;
            let (key, value) = query.split_once('=')?;
            (key == name).then(|| value.to_owned())
        })
}

/// Builds an empty message (ACK or RST) for `message_id`.
pub fn empty_message(message_type: MessageType, message_id: u16) -> Vec<u8> {
    let first = 0x40 | (message_type_bits(message_type) << 4);
    let id = message_id.to_be_bytes();
    vec![first, 0, id[0], id[1]]
}

fn message_type_bits(message_type: MessageType) -> u8 {
    match message_type {
        MessageType::Confirmable => 0,
        MessageType::NonConfirmable => 1,
        MessageType::Acknowledgement => 2,
        MessageType::Reset => 3,
    }
}

/// A response before it is framed into a message: the code, options and
/// payload, without type, message ID or token.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub code: ResponseType,
    pub content_format: Option<u16>,
    pub max_age: Option<u32>,
    pub size1: Option<u32>,
    pub size2: Option<u32>,
    pub block1: Option<BlockValue>,
    pub block2: Option<BlockValue>,
    pub observe: Option<u32>,
    pub payload: Vec<u8>,
}

impl Reply {
    pub fn new(code: ResponseType) -> Reply {
        Reply {
            code,
            content_format: None,
            max_age: None,
            size1: None,
            size2: None,
            block1: None,
            block2: None,
            observe: None,
            payload: Vec::new(),
        }
    }

    /// Creates a response with a diagnostic payload (RFC 7252 section
    /// 5.5.2: UTF-8 text without a Content-Format).
    pub fn diagnostic(code: ResponseType, message: impl Into<String>) -> Reply {
        Reply {
            payload: message.into().into_bytes(),
            ..Reply::new(code)
        }
    }

    pub fn json(code: ResponseType, body: &serde_json::Value) -> Reply {
        Reply {
            content_format: Some(content_format::JSON),
            payload: body.to_string().into_bytes(),
            ..Reply::new(code)
        }
    }

    /// Sets `payload`, cut to its first block of 1024 bytes with Block2 and
    /// Size2 when it is larger (RFC 7959 section 2.6: the client fetches
    /// the other blocks with GET requests).
    pub fn with_first_block(mut self, payload: &[u8]) -> Reply {
        let size = BlockValue {
            num: 0,
            more: false,
            szx: BlockValue::MAX_SZX,
        }
        .size();
        if payload.len() <= size {
            self.payload = payload.to_vec();
            return self;
        }
        self.payload = payload[..size].to_vec();
        self.block2 = Some(BlockValue {
            num: 0,
            more: true,
            szx: BlockValue::MAX_SZX,
        });
        self.size2 = Some(u32::try_from(payload.len()).unwrap_or(u32::MAX));
        self
    }

    /// Formats the code as `class.detail`, for logs and metric labels.
    pub fn code_name(&self) -> String {
        MessageClass::Response(self.code).to_string()
    }

    /// Frames the response as a message of `message_type`.
    pub fn encode(&self, message_type: MessageType, message_id: u16, token: &[u8]) -> Vec<u8> {
        let mut packet = Packet::new();
        packet.header.set_type(message_type);
        packet.header.set_version(1);
        packet.header.code = MessageClass::Response(self.code);
        packet.header.message_id = message_id;
        packet.set_token(token.to_vec());
        let options: [(CoapOption, Option<Vec<u8>>); 7] = [
            (CoapOption::Observe, self.observe.map(encode_uint)),
            (
                CoapOption::ContentFormat,
                self.content_format.map(|format| encode_uint(format.into())),
            ),
            (CoapOption::MaxAge, self.max_age.map(encode_uint)),
            (CoapOption::Block2, self.block2.map(BlockValue::encode)),
            (CoapOption::Block1, self.block1.map(BlockValue::encode)),
            (CoapOption::Size2, self.size2.map(encode_uint)),
            (CoapOption::Size1, self.size1.map(encode_uint)),
        ];
        for (option, value) in options {
            if let Some(value) = value {
                packet.add_option(option, value);
            }
        }
        packet.payload = self.payload.clone();
        // coap-lite rejects a message over 64000 bytes. Responses to
        // requests and notifications are cut into blocks of at most 1024
        // bytes before this point, so this is a server bug. An empty
        // message would read as a ping or an empty ACK, so the client gets
        // a 5.00 that says what failed.
        packet.to_bytes().unwrap_or_else(|_| {
            let size = self.payload.len();
            Reply::diagnostic(
                ResponseType::InternalServerError,
                format!("the server could not frame a response of {size} bytes"),
            )
            .encode(message_type, message_id, token)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(message_type: MessageType, token: &[u8]) -> Packet {
        let mut packet = Packet::new();
        packet.header.set_type(message_type);
        packet.header.code = MessageClass::Request(RequestType::Post);
        packet.header.message_id = 0x1234;
        packet.set_token(token.to_vec());
        packet.add_option(CoapOption::UriPath, b"telemetry".to_vec());
        packet.payload = b"{}".to_vec();
        packet
    }

    #[test]
    fn header_fields_are_read() {
        let bytes = request(MessageType::Confirmable, b"ab").to_bytes().unwrap();
        let header = read_header(&bytes).unwrap();
        assert_eq!(header.version, 1);
        assert_eq!(header.message_type, MessageType::Confirmable);
        assert_eq!(header.token_len, 2);
        assert_eq!(header.code, 0x02);
        assert_eq!(header.message_id, 0x1234);
        assert!(parse(&bytes, &header).is_ok());
    }

    #[test]
    fn reserved_token_lengths_are_format_errors() {
        for token_len in 9u8..=15 {
            let mut bytes = vec![0x40 | token_len, 0x02, 0, 1];
            bytes.extend(std::iter::repeat_n(0xaa, usize::from(token_len)));
            let header = read_header(&bytes).unwrap();
            assert_eq!(
                parse(&bytes, &header),
                Err(FormatError::TokenLength(usize::from(token_len)))
            );
        }
    }

    #[test]
    fn truncated_datagrams_are_format_errors() {
        assert_eq!(read_header(&[0x40, 0x01]), Err(FormatError::Truncated));
        let bytes = [0x44, 0x01, 0, 1, 0xaa];
        let header = read_header(&bytes).unwrap();
        assert_eq!(parse(&bytes, &header), Err(FormatError::TruncatedToken));
        let bytes = [0x40, 0x01, 0, 1, 0xb5, b'a'];
        let header = read_header(&bytes).unwrap();
        assert_eq!(parse(&bytes, &header), Err(FormatError::Options));
    }

    #[test]
    fn payload_marker_without_payload_is_a_format_error() {
        let mut bytes = request(MessageType::Confirmable, b"").to_bytes().unwrap();
        bytes.truncate(bytes.len() - 2);
        let header = read_header(&bytes).unwrap();
        assert_eq!(parse(&bytes, &header), Err(FormatError::EmptyPayload));
    }

    #[test]
    fn empty_message_with_token_is_a_format_error() {
        let bytes = [0x41, 0x00, 0, 1, 0xaa];
        let header = read_header(&bytes).unwrap();
        assert_eq!(parse(&bytes, &header), Err(FormatError::NonEmptyEmpty));
    }

    #[test]
    fn block_values_round_trip() {
        for (num, more, szx) in [
            (0, true, 6),
            (1, false, 2),
            (4095, true, 0),
            (1 << 19, false, 6),
        ] {
            let block = BlockValue { num, more, szx };
            assert_eq!(BlockValue::decode(&block.encode()), Some(block));
        }
        assert_eq!(BlockValue::decode(&[0x07]), None, "szx 7 is reserved");
        assert_eq!(
            BlockValue {
                num: 3,
                more: false,
                szx: 2
            }
            .offset(),
            192
        );
    }

    #[test]
    fn unknown_critical_option_is_found() {
        let mut packet = request(MessageType::Confirmable, b"");
        assert_eq!(unknown_options(&packet).next(), None);
        packet.add_option(CoapOption::Unknown(2048), vec![1]);
        packet.add_option(CoapOption::Unknown(2049), vec![1]);
        assert_eq!(unknown_options(&packet).collect::<Vec<_>>(), [2048, 2049]);
        assert!(is_critical(2049));
        assert!(!is_critical(2048));
    }

    #[test]
    fn large_payload_keeps_its_first_block() {
        let reply = Reply::new(ResponseType::Content).with_first_block(&[1; 70_000]);
        assert_eq!(reply.payload.len(), 1024);
        assert_eq!(
            reply.block2,
            Some(BlockValue {
                num: 0,
                more: true,
                szx: 6
            })
        );
        assert_eq!(reply.size2, Some(70_000));

        let small = Reply::new(ResponseType::Content).with_first_block(&[1; 1024]);
        assert_eq!(small.payload.len(), 1024);
        assert_eq!(small.block2, None);
    }

    #[test]
    fn unframeable_reply_becomes_internal_server_error() {
        let mut reply = Reply::new(ResponseType::Content);
        reply.payload = vec![b'x'; 70_000];
        let bytes = reply.encode(MessageType::NonConfirmable, 7, b"tk");
        let packet = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(
            packet.header.code,
            MessageClass::Response(ResponseType::InternalServerError)
        );
        assert_eq!(packet.get_token(), b"tk");
        assert!(!packet.payload.is_empty());
    }

    #[test]
    fn reply_frames_code_token_and_options() {
        let mut reply = Reply::diagnostic(ResponseType::RequestEntityTooLarge, "too large");
        reply.size1 = Some(1024);
        let bytes = reply.encode(MessageType::Acknowledgement, 7, b"tok");
        let packet = Packet::from_bytes(&bytes).unwrap();
        assert_eq!(packet.header.get_type(), MessageType::Acknowledgement);
        assert_eq!(packet.header.message_id, 7);
        assert_eq!(packet.get_token(), b"tok");
        assert_eq!(packet.header.code.to_string(), "4.13");
        assert_eq!(uint_option(&packet, CoapOption::Size1), Ok(Some(1024)));
        assert_eq!(packet.payload, b"too large");
    }

    #[test]
    fn uint_values_use_the_fewest_bytes() {
        assert_eq!(encode_uint(0), Vec::<u8>::new());
        assert_eq!(encode_uint(0x0100), vec![1, 0]);
        assert_eq!(decode_uint(&[0, 0, 1]), Some(1));
        assert_eq!(decode_uint(&[1, 2, 3, 4, 5]), None);
    }
}
