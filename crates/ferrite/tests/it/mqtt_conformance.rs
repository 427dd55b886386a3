//! Conformance of the MQTT server to the normative statements of MQTT 3.1.1
//! (OASIS Standard, 29 October 2014) and MQTT 5.0 (OASIS Standard, 7 March
//! 2019) that apply to a server. `docs/protocols/mqtt-conformance.md` lists
//! every statement and the row or test that checks it.
//!
//! Each row of the tables in `v311.rs` and `v5.rs` names a statement and
//! lists steps: bytes to send on one of several connections and the
//! reaction expected (a packet, a close, or silence). Packets are written
//! byte by byte, so malformed input is as easy to express as valid input.
//! One server serves a whole table. Rows run in lanes, one device per lane,
//! so that messages routed between connections of one row never reach
//! another row. `features.rs` contains the tests of the broker features
//! (retained messages, outgoing QoS 2, topic aliases, shared subscriptions,
//! message expiry, request/response), each on its own server.
//!
//! Run with `cargo test -p ferrite --test it -- mqtt_conformance::`.

mod features;
mod v311;
mod v5;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::Server;

/// Maximum wait for an expected packet or close.
const WAIT: Duration = Duration::from_secs(5);
/// How long "no reaction" is watched for.
const SILENCE: Duration = Duration::from_millis(300);
/// Rows of a table that run at the same time, each lane with its own device.
const LANES: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

// ---------------------------------------------------------------------------
// Rows and steps
// ---------------------------------------------------------------------------

/// One scenario that checks one normative statement.
pub struct Row {
    /// Statement identifier, such as `MQTT-3.1.0-1`.
    pub id: &'static str,
    /// What the scenario sends, in a few words.
    pub case: &'static str,
    pub steps: Vec<Step>,
}

pub enum Step {
    /// Opens a TCP connection in a numbered slot.
    Open(usize),
    Send(usize, Vec<u8>),
    Expect(usize, Expect),
    /// The client closes its socket without DISCONNECT.
    Close(usize),
    Pause(Duration),
}

/// The reaction expected from the server on one connection.
pub enum Expect {
    /// The next packet is exactly these bytes.
    Bytes(Vec<u8>),
    /// CONNACK with this Session Present flag and return or reason code.
    Connack { session_present: bool, code: u8 },
    /// The next packet passes the check, or the error describes the difference.
    Packet(&'static str, Check),
    /// The server closes the connection and sends nothing more.
    Closed,
    /// MQTT 5: DISCONNECT with this reason code, then the close.
    Disconnect(u8),
    /// No packet and no close for this long.
    Silence(Duration),
}

pub type Check = Box<dyn Fn(&RawPacket) -> Result<(), String> + Send + Sync>;

/// Per-lane values that rows are built from.
pub struct Lane {
    pub token: String,
    pub device_id: String,
    lane: usize,
}

impl Lane {
    /// Returns a client id no other row uses.
    pub fn client_id(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        format!("conf{}x{}", self.lane, NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// Builds a CONNECT of `version` with a fresh client id and the lane's token.
    pub fn connect(&self, version: Version) -> Connect {
        Connect::new(version, &self.client_id(), &self.token)
    }
}

/// Steps that open `slot`, send `connect` and expect a successful CONNACK
/// without a session.
pub fn connected(slot: usize, connect: &Connect) -> Vec<Step> {
    vec![
        Step::Open(slot),
        Step::Send(slot, connect.bytes()),
        Step::Expect(
            slot,
            Expect::Connack {
                session_present: false,
                code: 0,
            },
        ),
    ]
}

/// Copies steps for a second row that shares a scenario. Checks cannot be
/// cloned, so each becomes a wait for any packet. The copy keeps its place
/// in the exchange and leaves the checking to the first row.
pub fn copy_steps(steps: &[Step]) -> Vec<Step> {
    steps
        .iter()
        .map(|step| match step {
            Step::Open(slot) => Step::Open(*slot),
            Step::Send(slot, bytes) => Step::Send(*slot, bytes.clone()),
            Step::Close(slot) => Step::Close(*slot),
            Step::Pause(duration) => Step::Pause(*duration),
            Step::Expect(slot, expect) => Step::Expect(*slot, copy_expect(expect)),
        })
        .collect()
}

fn copy_expect(expect: &Expect) -> Expect {
    match expect {
        Expect::Bytes(bytes) => Expect::Bytes(bytes.clone()),
        Expect::Connack {
            session_present,
            code,
        } => Expect::Connack {
            session_present: *session_present,
            code: *code,
        },
        Expect::Packet(what, _) => Expect::Packet(what, Box::new(|_| Ok(()))),
        Expect::Closed => Expect::Closed,
        Expect::Disconnect(code) => Expect::Disconnect(*code),
        Expect::Silence(duration) => Expect::Silence(*duration),
    }
}

/// Runs every row of a table against a fresh server and fails with the list
/// of rows that did not pass.
pub async fn run_table(version: Version, build: fn(&Lane, Version) -> Vec<Row>) {
    let server = Server::start().await;
    let mut lanes = Vec::new();
    for lane in 0..LANES {
        let device = server.create_device(&format!("conformance-{lane}")).await;
        lanes.push(Lane {
            token: device.token,
            device_id: device.id,
            lane,
        });
    }

    let runs = lanes.iter().map(|lane| {
        let rows: Vec<Row> = build(lane, version)
            .into_iter()
            .enumerate()
            .filter(|(index, _)| index % LANES == lane.lane)
            .map(|(_, row)| row)
            .collect();
        let server = &server;
        async move {
            let mut failures = Vec::new();
            let count = rows.len();
            for row in rows {
                if let Err(error) = run_row(server, &row).await {
                    failures.push(format!("[{}] {}: {error}", row.id, row.case));
                }
            }
            (count, failures)
        }
    });
    let results = futures::future::join_all(runs).await;

    let total: usize = results.iter().map(|(count, _)| count).sum();
    let mut failures: Vec<String> = results.into_iter().flat_map(|(_, f)| f).collect();
    failures.sort();
    assert!(
        failures.is_empty(),
        "{} of {total} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

async fn run_row(server: &Server, row: &Row) -> Result<(), String> {
    let mut clients: HashMap<usize, RawClient> = HashMap::new();
    for (index, step) in row.steps.iter().enumerate() {
        let in_step = |error: String| format!("step {}: {error}", index + 1);
        match step {
            Step::Open(slot) => {
                let client = RawClient::connect(server).await.map_err(in_step)?;
                clients.insert(*slot, client);
            }
            Step::Send(slot, bytes) => {
                // A write may fail when the server has closed already; the
                // next expectation then reports what happened.
                let _ = client(&mut clients, *slot)
                    .map_err(in_step)?
                    .send(bytes)
                    .await;
            }
            Step::Expect(slot, expect) => {
                client(&mut clients, *slot)
                    .map_err(in_step)?
                    .expect(expect)
                    .await
                    .map_err(in_step)?;
            }
            Step::Close(slot) => {
                clients.remove(slot);
            }
            Step::Pause(duration) => tokio::time::sleep(*duration).await,
        }
    }
    Ok(())
}

fn client(clients: &mut HashMap<usize, RawClient>, slot: usize) -> Result<&mut RawClient, String> {
    clients
        .get_mut(&slot)
        .ok_or_else(|| format!("connection {slot} is not open"))
}

// ---------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------

/// One packet from the server: the first byte and the body after the
/// remaining length.
#[derive(Debug, Clone)]
pub struct RawPacket {
    pub first_byte: u8,
    pub body: Vec<u8>,
}

/// What the socket produced next.
#[derive(Debug)]
enum Received {
    Packet(RawPacket),
    Closed,
    Nothing,
}

struct RawClient {
    stream: TcpStream,
    buffer: BytesMut,
}

impl RawClient {
    async fn connect(server: &Server) -> Result<Self, String> {
        let stream = TcpStream::connect(server.mqtt_addr)
            .await
            .map_err(|error| format!("cannot connect to the MQTT port: {error}"))?;
        Ok(Self {
            stream,
            buffer: BytesMut::new(),
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads the next packet, waiting at most `timeout`.
    async fn receive(&mut self, timeout: Duration) -> Result<Received, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(packet) = self.take_packet()? {
                return Ok(Received::Packet(packet));
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer)).await {
                Err(_) => return Ok(Received::Nothing),
                Ok(Ok(0)) | Ok(Err(_)) if self.buffer.is_empty() => return Ok(Received::Closed),
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return Err(format!(
                        "the server closed the connection inside a packet: {:02x?}",
                        &self.buffer[..]
                    ));
                }
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Takes one packet off the buffer. The remaining length must use the
    /// fewest bytes possible ([MQTT-1.5.5-1] in MQTT 5), which every row
    /// checks this way on every packet the server sends.
    fn take_packet(&mut self) -> Result<Option<RawPacket>, String> {
        let mut length = 0usize;
        for index in 0..4 {
            let Some(&byte) = self.buffer.get(1 + index) else {
                return Ok(None);
            };
            length |= usize::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 != 0 {
                continue;
            }
            if index > 0 && byte == 0 {
                return Err("remaining length not in its shortest encoding".to_owned());
            }
            let header = 2 + index;
            if self.buffer.len() < header + length {
                return Ok(None);
            }
            let first_byte = self.buffer[0];
            self.buffer.advance(header);
            let body = self.buffer.split_to(length).to_vec();
            return Ok(Some(RawPacket { first_byte, body }));
        }
        Err("remaining length of more than 4 bytes".to_owned())
    }

    async fn next_packet(&mut self) -> Result<RawPacket, String> {
        match self.receive(WAIT).await? {
            Received::Packet(packet) => Ok(packet),
            Received::Closed => Err("the server closed the connection".to_owned()),
            Received::Nothing => Err(format!("no packet within {WAIT:?}")),
        }
    }

    async fn expect(&mut self, expect: &Expect) -> Result<(), String> {
        match expect {
            Expect::Bytes(expected) => {
                let packet = self.next_packet().await?;
                let actual = packet_bytes(&packet);
                if &actual != expected {
                    return Err(format!("expected {expected:02x?}, got {actual:02x?}"));
                }
            }
            Expect::Connack {
                session_present,
                code,
            } => {
                let packet = self.next_packet().await?;
                check_connack(&packet, *session_present, *code)?;
            }
            Expect::Packet(what, check) => {
                let packet = self.next_packet().await?;
                check(&packet).map_err(|error| format!("expected {what}: {error}"))?;
            }
            Expect::Closed => match self.receive(WAIT).await? {
                Received::Closed => {}
                Received::Packet(packet) => {
                    return Err(format!("expected a close, got {packet:02x?}"));
                }
                Received::Nothing => return Err(format!("not closed within {WAIT:?}")),
            },
            Expect::Disconnect(code) => {
                let packet = self.next_packet().await?;
                if packet.first_byte != 0xE0 || packet.body.first() != Some(code) {
                    return Err(format!(
                        "expected DISCONNECT 0x{code:02x}, got {packet:02x?}"
                    ));
                }
                Box::pin(self.expect(&Expect::Closed)).await?;
            }
            Expect::Silence(duration) => match self.receive(*duration).await? {
                Received::Nothing => {}
                Received::Closed => return Err("expected silence, got a close".to_owned()),
                Received::Packet(packet) => {
                    return Err(format!("expected silence, got {packet:02x?}"));
                }
            },
        }
        Ok(())
    }
}

fn packet_bytes(packet: &RawPacket) -> Vec<u8> {
    frame(packet.first_byte, &packet.body)
}

fn check_connack(packet: &RawPacket, session_present: bool, code: u8) -> Result<(), String> {
    if packet.first_byte != 0x20 || packet.body.len() < 2 {
        return Err(format!("expected CONNACK, got {packet:02x?}"));
    }
    let flags = packet.body[0];
    if flags & 0xFE != 0 {
        return Err(format!("CONNACK sets reserved flag bits: 0x{flags:02x}"));
    }
    if (flags == 1) != session_present || packet.body[1] != code {
        return Err(format!(
            "expected CONNACK session present {session_present} code 0x{code:02x}, got flags 0x{flags:02x} code 0x{:02x}",
            packet.body[1]
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Packet builders
// ---------------------------------------------------------------------------

/// Encodes a Variable Byte Integer.
pub fn var_int(mut value: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return out;
        }
    }
}

/// Builds a packet from its first byte and body.
pub fn frame(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(var_int(body.len()));
    out.extend_from_slice(body);
    out
}

/// Encodes an MQTT string or binary field: a big-endian length and the bytes.
pub fn string(value: &[u8]) -> Vec<u8> {
    let mut out = (value.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(value);
    out
}

/// MQTT 5 property identifiers used by the rows.
pub mod property {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
}

/// Encodes a property with a one-byte value.
pub fn prop_u8(id: u8, value: u8) -> Vec<u8> {
    vec![id, value]
}

pub fn prop_u16(id: u8, value: u16) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(value.to_be_bytes());
    out
}

pub fn prop_u32(id: u8, value: u32) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(value.to_be_bytes());
    out
}

/// Encodes a property with a string or binary value.
pub fn prop_str(id: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(string(value));
    out
}

pub fn user_property(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![property::USER_PROPERTY];
    out.extend(string(name));
    out.extend(string(value));
    out
}

/// Encodes a property list with its length in front.
pub fn properties(list: &[Vec<u8>]) -> Vec<u8> {
    let bytes: Vec<u8> = list.concat();
    let mut out = var_int(bytes.len());
    out.extend(bytes);
    out
}

/// A will message in a CONNECT.
#[derive(Clone)]
pub struct Will {
    /// MQTT 5 will properties, without their length.
    pub properties: Vec<Vec<u8>>,
    pub topic: Vec<u8>,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

impl Will {
    pub fn new(topic: &str, payload: &[u8]) -> Self {
        Self {
            properties: Vec::new(),
            topic: topic.as_bytes().to_vec(),
            payload: payload.to_vec(),
            qos: 0,
            retain: false,
        }
    }
}

/// A CONNECT packet whose every field a row may change.
#[derive(Clone)]
pub struct Connect {
    pub version: Version,
    pub protocol_name: Vec<u8>,
    pub level: u8,
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 properties, without their length.
    pub properties: Vec<Vec<u8>>,
    pub client_id: Vec<u8>,
    pub will: Option<Will>,
    pub username: Option<Vec<u8>>,
    pub password: Option<Vec<u8>>,
    /// Replaces the flags computed from the fields.
    pub flags: Option<u8>,
    /// Replaces the payload computed from the fields.
    pub payload: Option<Vec<u8>>,
}

impl Connect {
    pub fn new(version: Version, client_id: &str, token: &str) -> Self {
        Self {
            version,
            protocol_name: b"MQTT".to_vec(),
            level: match version {
                Version::V311 => 4,
                Version::V5 => 5,
            },
            clean: true,
            keep_alive: 60,
            properties: Vec::new(),
            client_id: client_id.as_bytes().to_vec(),
            will: None,
            username: Some(token.as_bytes().to_vec()),
            password: None,
            flags: None,
            payload: None,
        }
    }

    pub fn clean(mut self, clean: bool) -> Self {
        self.clean = clean;
        self
    }

    pub fn with_property(mut self, property: Vec<u8>) -> Self {
        self.properties.push(property);
        self
    }

    pub fn with_will(mut self, will: Will) -> Self {
        self.will = Some(will);
        self
    }

    /// MQTT 5: keeps the session for `seconds` after the connection closes.
    pub fn expiry(self, seconds: u32) -> Self {
        self.with_property(prop_u32(property::SESSION_EXPIRY_INTERVAL, seconds))
    }

    pub fn computed_flags(&self) -> u8 {
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some(will) = &self.will {
            flags |= 0x04 | (will.qos << 3);
            if will.retain {
                flags |= 0x20;
            }
        }
        if self.password.is_some() {
            flags |= 0x40;
        }
        if self.username.is_some() {
            flags |= 0x80;
        }
        flags
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut body = string(&self.protocol_name);
        body.push(self.level);
        body.push(self.flags.unwrap_or_else(|| self.computed_flags()));
        body.extend(self.keep_alive.to_be_bytes());
        if self.version == Version::V5 {
            body.extend(properties(&self.properties));
        }
        match &self.payload {
            Some(payload) => body.extend_from_slice(payload),
            None => {
                body.extend(string(&self.client_id));
                if let Some(will) = &self.will {
                    if self.version == Version::V5 {
                        body.extend(properties(&will.properties));
                    }
                    body.extend(string(&will.topic));
                    body.extend(string(&will.payload));
                }
                if let Some(username) = &self.username {
                    body.extend(string(username));
                }
                if let Some(password) = &self.password {
                    body.extend(string(password));
                }
            }
        }
        frame(0x10, &body)
    }
}

/// Builds a PUBLISH. `flags` are the low four bits besides QoS: 0x08 DUP, 0x01
/// RETAIN. `props` are MQTT 5 properties, ignored for 3.1.1.
pub fn publish(
    version: Version,
    qos: u8,
    flags: u8,
    topic: &[u8],
    packet_id: u16,
    props: &[Vec<u8>],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = string(topic);
    if qos > 0 {
        body.extend(packet_id.to_be_bytes());
    }
    if version == Version::V5 {
        body.extend(properties(props));
    }
    body.extend_from_slice(payload);
    frame(0x30 | (qos << 1) | flags, &body)
}

/// Builds a plain PUBLISH of `payload` to `topic`.
pub fn publish_simple(
    version: Version,
    qos: u8,
    topic: &str,
    packet_id: u16,
    payload: &[u8],
) -> Vec<u8> {
    publish(version, qos, 0, topic.as_bytes(), packet_id, &[], payload)
}

/// Builds a SUBSCRIBE with (filter, subscription options) pairs.
pub fn subscribe(version: Version, packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0);
    }
    for (filter, options) in filters {
        body.extend(string(filter.as_bytes()));
        body.push(*options);
    }
    frame(0x82, &body)
}

pub fn unsubscribe(version: Version, packet_id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if version == Version::V5 {
        body.push(0);
    }
    for filter in filters {
        body.extend(string(filter.as_bytes()));
    }
    frame(0xA2, &body)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) without a
/// reason code.
pub fn ack(first_byte: u8, packet_id: u16) -> Vec<u8> {
    frame(first_byte, &packet_id.to_be_bytes())
}

/// Builds an acknowledgement with a reason code and no properties.
pub fn ack_with_reason(first_byte: u8, packet_id: u16, reason: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.push(reason);
    frame(first_byte, &body)
}

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];
pub const DISCONNECT_V311: [u8; 2] = [0xE0, 0x00];

/// Builds an MQTT 5 DISCONNECT with a reason code and properties.
pub fn disconnect_v5(reason: u8, props: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![reason];
    body.extend(properties(props));
    frame(0xE0, &body)
}

// ---------------------------------------------------------------------------
// Packet parsers and reusable expectations
// ---------------------------------------------------------------------------

/// One MQTT 5 property: its identifier and its value bytes.
pub type Property = (u8, Vec<u8>);

/// Reads a Variable Byte Integer; returns the value and its length.
fn read_var_int(bytes: &[u8]) -> Result<(usize, usize), String> {
    let mut value = 0usize;
    for (index, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return Ok((value, index + 1));
        }
    }
    Err("invalid variable byte integer".to_owned())
}

fn read_string(bytes: &[u8]) -> Result<(Vec<u8>, usize), String> {
    if bytes.len() < 2 {
        return Err("string length missing".to_owned());
    }
    let length = usize::from(u16::from_be_bytes([bytes[0], bytes[1]]));
    let value = bytes
        .get(2..2 + length)
        .ok_or("string shorter than its length")?;
    Ok((value.to_vec(), 2 + length))
}

/// Parses an MQTT 5 property list that starts with its length; returns
/// the properties as (identifier, value bytes) and the bytes read.
pub fn read_properties(bytes: &[u8]) -> Result<(Vec<Property>, usize), String> {
    let (length, length_bytes) = read_var_int(bytes)?;
    let end = length_bytes + length;
    let mut list = Vec::new();
    let mut at = length_bytes;
    while at < end {
        let id = *bytes
            .get(at)
            .ok_or("property list shorter than its length")?;
        at += 1;
        let rest = bytes
            .get(at..end)
            .ok_or("property list shorter than its length")?;
        let size = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x0B => read_var_int(rest)?.1,
            0x26 => {
                let (_, first) = read_string(rest)?;
                first + read_string(&rest[first..])?.1
            }
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => read_string(rest)?.1,
            other => return Err(format!("unknown property 0x{other:02x}")),
        };
        let value = rest.get(..size).ok_or("property value cut short")?;
        list.push((id, value.to_vec()));
        at += size;
    }
    Ok((list, end))
}

/// A PUBLISH as received.
#[derive(Debug)]
pub struct Publish {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub topic: Vec<u8>,
    pub packet_id: Option<u16>,
    pub properties: Vec<Property>,
    pub payload: Vec<u8>,
}

pub fn parse_publish(version: Version, packet: &RawPacket) -> Result<Publish, String> {
    if packet.first_byte >> 4 != 3 {
        return Err(format!("expected PUBLISH, got {packet:02x?}"));
    }
    let qos = (packet.first_byte >> 1) & 0x03;
    let (topic, mut at) = read_string(&packet.body)?;
    let packet_id = if qos > 0 {
        let bytes = packet.body.get(at..at + 2).ok_or("packet id missing")?;
        at += 2;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    } else {
        None
    };
    let mut props = Vec::new();
    if version == Version::V5 {
        let (list, read) = read_properties(&packet.body[at..])?;
        props = list;
        at += read;
    }
    Ok(Publish {
        qos,
        dup: packet.first_byte & 0x08 != 0,
        retain: packet.first_byte & 0x01 != 0,
        topic,
        packet_id,
        properties: props,
        payload: packet.body[at..].to_vec(),
    })
}

/// Expects a PUBLISH with this topic, payload, QoS, and RETAIN and DUP 0.
pub fn expect_publish(version: Version, topic: &str, payload: &[u8], qos: u8) -> Expect {
    let topic = topic.as_bytes().to_vec();
    let payload = payload.to_vec();
    Expect::Packet(
        "PUBLISH",
        Box::new(move |packet| {
            let publish = parse_publish(version, packet)?;
            if publish.topic != topic || publish.payload != payload || publish.qos != qos {
                return Err(format!(
                    "expected topic {:?} payload {:?} QoS {qos}, got {publish:?}",
                    String::from_utf8_lossy(&topic),
                    String::from_utf8_lossy(&payload)
                ));
            }
            if publish.retain || publish.dup {
                return Err(format!("RETAIN and DUP must be 0: {publish:?}"));
            }
            if (qos == 0) != publish.packet_id.is_none() || publish.packet_id == Some(0) {
                return Err(format!("packet id does not fit QoS {qos}: {publish:?}"));
            }
            Ok(())
        }),
    )
}

/// Packet ids of deliveries that one row records, so that a later step can
/// compare a resend with the first delivery.
pub type SeenIds = Arc<Mutex<Vec<u16>>>;

/// Expects a first QoS 1 delivery of `payload` (DUP 0) and records its
/// packet id in `seen`.
pub fn expect_first_delivery(version: Version, payload: &'static [u8], seen: &SeenIds) -> Expect {
    let seen = seen.clone();
    expect_publish_where(version, "a first QoS 1 delivery", move |publish| {
        if publish.payload != payload || publish.qos != 1 || publish.dup {
            return Err(format!(
                "expected {:?} at QoS 1 with DUP 0, got {publish:?}",
                String::from_utf8_lossy(payload)
            ));
        }
        let packet_id = publish.packet_id.ok_or("packet id missing")?;
        seen.lock().expect("ids lock").push(packet_id);
        Ok(())
    })
}

/// Expects the resend of the `index`-th recorded delivery: the same payload
/// and packet id with DUP 1 ([MQTT-3.3.1-1], [MQTT-2.3.1-4] in 3.1.1).
pub fn expect_resend(
    version: Version,
    payload: &'static [u8],
    seen: &SeenIds,
    index: usize,
) -> Expect {
    let seen = seen.clone();
    expect_publish_where(version, "a resend with DUP 1", move |publish| {
        let first_id = seen.lock().expect("ids lock").get(index).copied();
        if publish.payload != payload || publish.qos != 1 || !publish.dup {
            return Err(format!(
                "expected {:?} resent at QoS 1 with DUP 1, got {publish:?}",
                String::from_utf8_lossy(payload)
            ));
        }
        if publish.packet_id != first_id {
            return Err(format!(
                "expected the first delivery's packet id {first_id:?}, got {:?}",
                publish.packet_id
            ));
        }
        Ok(())
    })
}

/// Expects a PUBLISH that passes `check`.
pub fn expect_publish_where(
    version: Version,
    what: &'static str,
    check: impl Fn(&Publish) -> Result<(), String> + Send + Sync + 'static,
) -> Expect {
    Expect::Packet(
        what,
        Box::new(move |packet| check(&parse_publish(version, packet)?)),
    )
}

/// Expects PUBACK, PUBREC or PUBCOMP (by first byte) for `packet_id` with
/// `reason` (0 may be left out in MQTT 5), and checks its MQTT 5 properties.
pub fn expect_ack_where(
    first_byte: u8,
    packet_id: u16,
    reason: u8,
    check_properties: impl Fn(&[Property]) -> Result<(), String> + Send + Sync + 'static,
) -> Expect {
    Expect::Packet(
        "acknowledgement",
        Box::new(move |packet| {
            if packet.first_byte != first_byte || packet.body.len() < 2 {
                return Err(format!("expected 0x{first_byte:02x}, got {packet:02x?}"));
            }
            let id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
            let actual = packet.body.get(2).copied().unwrap_or(0);
            if id != packet_id || actual != reason {
                return Err(format!(
                    "expected packet id {packet_id} reason 0x{reason:02x}, got {packet:02x?}"
                ));
            }
            let props = if packet.body.len() > 3 {
                let (list, read) = read_properties(&packet.body[3..])?;
                if 3 + read != packet.body.len() {
                    return Err("bytes after the properties".to_owned());
                }
                list
            } else {
                Vec::new()
            };
            check_properties(&props)
        }),
    )
}

pub fn expect_ack(first_byte: u8, packet_id: u16, reason: u8) -> Expect {
    expect_ack_where(first_byte, packet_id, reason, |_| Ok(()))
}

/// Expects SUBACK (0x90) or UNSUBACK (0xB0) for `packet_id` with these
/// codes (3.1.1 UNSUBACK has none).
pub fn expect_sub_ack(version: Version, first_byte: u8, packet_id: u16, codes: &[u8]) -> Expect {
    let codes = codes.to_vec();
    Expect::Packet(
        "SUBACK or UNSUBACK",
        Box::new(move |packet| {
            if packet.first_byte != first_byte || packet.body.len() < 2 {
                return Err(format!("expected 0x{first_byte:02x}, got {packet:02x?}"));
            }
            let id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
            let mut at = 2;
            if version == Version::V5 {
                at += read_properties(&packet.body[2..])?.1;
            }
            let actual = &packet.body[at..];
            if id != packet_id || actual != codes {
                return Err(format!(
                    "expected packet id {packet_id} codes {codes:02x?}, got id {id} codes {actual:02x?}"
                ));
            }
            Ok(())
        }),
    )
}

/// Expects a successful MQTT 5 CONNACK whose properties pass `check`.
pub fn expect_connack_where(
    session_present: bool,
    code: u8,
    check: impl Fn(&[Property]) -> Result<(), String> + Send + Sync + 'static,
) -> Expect {
    Expect::Packet(
        "CONNACK",
        Box::new(move |packet| {
            check_connack(packet, session_present, code)?;
            let (list, read) = read_properties(&packet.body[2..])?;
            if 2 + read != packet.body.len() {
                return Err("bytes after the CONNACK properties".to_owned());
            }
            check(&list)
        }),
    )
}

/// Expects any packet whose encoded size is at most `max` bytes.
pub fn expect_size_at_most(first_byte: u8, max: usize) -> Expect {
    Expect::Packet(
        "a packet within the client's Maximum Packet Size",
        Box::new(move |packet| {
            let size = packet_bytes(packet).len();
            if packet.first_byte != first_byte {
                return Err(format!("expected 0x{first_byte:02x}, got {packet:02x?}"));
            }
            if size > max {
                return Err(format!("{size} bytes exceed {max}: {packet:02x?}"));
            }
            Ok(())
        }),
    )
}

/// Returns the value of `id` in a property list.
pub fn find_property(list: &[Property], id: u8) -> Option<&[u8]> {
    list.iter()
        .find(|(found, _)| *found == id)
        .map(|(_, value)| value.as_slice())
}

pub fn lacks(list: &[Property], id: u8, name: &str) -> Result<(), String> {
    match find_property(list, id) {
        Some(value) => Err(format!("{name} must be absent, got {value:02x?}")),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mqtt_3_1_1_server_statements() {
    run_table(Version::V311, v311::rows).await;
}

#[tokio::test]
async fn mqtt_5_server_statements() {
    run_table(Version::V5, v5::rows).await;
}
