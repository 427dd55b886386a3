//! The CoAP listener as a black box: raw datagrams built with coap-lite
//! over a real UDP socket, for telemetry in each content format, error
//! responses, malformed messages, duplicates, block-wise transfers and
//! Observe.

use std::net::SocketAddr;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::support::{Server, TestDevice, wait_until};

/// Maximum wait for one reply datagram.
const REPLY_WAIT: Duration = Duration::from_secs(5);
/// Maximum wait for stored telemetry to show in the latest values.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// A CoAP client socket connected to the server.
struct Client {
    socket: UdpSocket,
    next_message_id: u16,
}

impl Client {
    async fn connect(server: SocketAddr) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        socket.connect(server).await.expect("connect client");
        Client {
            socket,
            next_message_id: 0x1000,
        }
    }

    fn message_id(&mut self) -> u16 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    async fn send_raw(&self, bytes: &[u8]) {
        self.socket.send(bytes).await.expect("send datagram");
    }

    async fn receive(&self, wait: Duration) -> Option<Packet> {
        let mut buffer = vec![0u8; 65_536];
        let length = tokio::time::timeout(wait, self.socket.recv(&mut buffer))
            .await
            .ok()?
            .expect("receive datagram");
        Some(Packet::from_bytes(&buffer[..length]).expect("server sent valid CoAP"))
    }

    /// Sends `packet` and returns the response, following a separate
    /// response after an empty ACK.
    async fn request(&mut self, mut packet: Packet) -> Packet {
        if packet.header.message_id == 0 {
            packet.header.message_id = self.message_id();
        }
        self.send_raw(&packet.to_bytes().unwrap()).await;
        loop {
            let reply = self.receive(REPLY_WAIT).await.expect("a reply in time");
            if reply.header.code == MessageClass::Empty {
                continue;
            }
            if reply.header.get_type() == MessageType::Confirmable {
                self.acknowledge(&reply).await;
            }
            return reply;
        }
    }

    async fn acknowledge(&self, message: &Packet) {
        let id = message.header.message_id.to_be_bytes();
        self.send_raw(&[0x60, 0, id[0], id[1]]).await;
    }
}

fn request(method: RequestType, path: &str, token: &[u8]) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(method);
    packet.set_token(token.to_vec());
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    for item in query.split('&').filter(|item| !item.is_empty()) {
        packet.add_option(CoapOption::UriQuery, item.as_bytes().to_vec());
    }
    packet
}

fn post(path: &str, content_format: Option<u16>, payload: &[u8]) -> Packet {
    let mut packet = request(RequestType::Post, path, b"t1");
    if let Some(format) = content_format {
        packet.add_option(CoapOption::ContentFormat, uint(u32::from(format)));
    }
    packet.payload = payload.to_vec();
    packet
}

fn uint(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|byte| **byte == 0).count();
    bytes[skip..].to_vec()
}

fn uint_value(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0, |value, byte| (value << 8) | u32::from(*byte))
}

fn code(packet: &Packet) -> String {
    packet.header.code.to_string()
}

fn block_value(num: u32, more: bool, szx: u8) -> Vec<u8> {
    uint((num << 4) | (u32::from(more) << 3) | u32::from(szx))
}

fn cbor(value: &Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes).unwrap();
    bytes
}

/// Encodes one SenML CBOR record. SenML CBOR uses integer labels (RFC
/// 8428 section 6): 0 is the name and 2 the value.
fn senml_cbor(name: &str, value: i64) -> Vec<u8> {
    let record = ciborium::Value::Map(vec![
        (
            ciborium::Value::Integer(0.into()),
            ciborium::Value::Text(name.into()),
        ),
        (
            ciborium::Value::Integer(2.into()),
            ciborium::Value::Integer(value.into()),
        ),
    ]);
    let mut bytes = Vec::new();
    ciborium::into_writer(&ciborium::Value::Array(vec![record]), &mut bytes).unwrap();
    bytes
}

async fn wait_for_latest(
    server: &Server,
    device: &TestDevice,
    key: &str,
    expected: &Value,
) -> bool {
    wait_until(
        || async {
            server
                .latest(&device.id)
                .await
                .get(key)
                .is_some_and(|point| &point["value"] == expected)
        },
        STORE_WAIT,
    )
    .await
}

/// Sets attributes of `device` through the REST API.
async fn patch_attributes(server: &Server, device: &TestDevice, attributes: Value) {
    let response = reqwest::Client::new()
        .patch(format!("{}/api/v1/devices/{}", server.http_url, device.id))
        .bearer_auth(server.admin_token().await)
        .json(&json!({"attributes": attributes}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn metric(server: &Server, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn telemetry_in_each_content_format_is_stored() {
    let server = Server::start().await;
    let device = server.create_device("coap-formats").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/telemetry", device.token);

    let cases: Vec<(&str, Option<u16>, Vec<u8>, &str)> = vec![
        ("no format", None, br#"{"plain": 1}"#.to_vec(), "plain"),
        ("json", Some(50), br#"{"json": 1}"#.to_vec(), "json"),
        ("cbor", Some(60), cbor(&json!({"cbor": 1})), "cbor"),
        (
            "senml json",
            Some(110),
            json!([{"n": "senml_json", "v": 1}])
                .to_string()
                .into_bytes(),
            "senml_json",
        ),
        (
            "senml cbor",
            Some(112),
            senml_cbor("senml_cbor", 1),
            "senml_cbor",
        ),
    ];
    for (name, format, payload, key) in &cases {
        let packet = post(&path, *format, payload);
        let reply = client.request(packet).await;
        assert_eq!(
            reply.header.get_type(),
            MessageType::Acknowledgement,
            "{name}"
        );
        assert_eq!(
            code(&reply),
            "2.04",
            "{name}: {}",
            String::from_utf8_lossy(&reply.payload)
        );
        assert_eq!(reply.get_token(), b"t1", "{name}");
        assert!(
            wait_for_latest(&server, &device, key, &json!(1.0)).await
                || wait_for_latest(&server, &device, key, &json!(1)).await,
            "{name}: {key} not stored: {}",
            server.latest(&device.id).await
        );
    }

    let query_path = format!("/telemetry?token={}", device.token);
    let reply = client
        .request(post(&query_path, Some(50), br#"{"by_query": 2}"#))
        .await;
    assert_eq!(code(&reply), "2.04");
    assert!(wait_for_latest(&server, &device, "by_query", &json!(2)).await);
}

#[tokio::test]
async fn failures_get_codes_and_diagnostics() {
    let server = Server::start_with_env(&[("FERRITE_COAP_MAX_PAYLOAD_BYTES", "2048")]).await;
    let device = server.create_device("coap-errors").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/telemetry", device.token);

    let mut unknown_option = post(&path, Some(50), b"{}");
    unknown_option.add_option(CoapOption::Unknown(2049), vec![1]);
    let mut critical_after_elective = post(&path, Some(50), b"{}");
    critical_after_elective.add_option(CoapOption::Unknown(2), vec![1]);
    critical_after_elective.add_option(CoapOption::Unknown(9), vec![1]);
    let mut proxy_after_elective = post(&path, Some(50), b"{}");
    proxy_after_elective.add_option(CoapOption::Unknown(8), vec![1]);
    proxy_after_elective.add_option(CoapOption::ProxyUri, b"coap://[::1]/x".to_vec());
    let mut unknown_method = post(&path, Some(50), b"{}");
    unknown_method.header.code = MessageClass::Reserved(0x08);
    let mut not_acceptable = request(
        RequestType::Get,
        &format!("/api/v1/{}/attributes", device.token),
        b"a",
    );
    not_acceptable.add_option(CoapOption::Accept, vec![60]);
    let cases: Vec<(&str, Packet, &str)> = vec![
        ("not acceptable", not_acceptable, "4.06"),
        (
            "bad token",
            post("/api/v1/not-a-token/telemetry", Some(50), b"{}"),
            "4.01",
        ),
        ("no token", post("/telemetry", Some(50), b"{}"), "4.01"),
        (
            "unknown path",
            post(&format!("/api/v1/{}/nothing", device.token), None, b"{}"),
            "4.04",
        ),
        (
            "wrong method",
            request(RequestType::Put, &path, b""),
            "4.05",
        ),
        ("unknown method", unknown_method, "4.05"),
        ("unknown critical option", unknown_option, "4.02"),
        (
            "critical option after an elective one",
            critical_after_elective,
            "4.02",
        ),
        (
            "proxy option after an elective one",
            proxy_after_elective,
            "5.05",
        ),
        ("unsupported format", post(&path, Some(41), b"<x/>"), "4.15"),
        ("invalid json", post(&path, Some(50), b"{\"a\":"), "4.00"),
        (
            "long Uri-Query",
            post(
                &format!("{path}?a={}&b={}", "q".repeat(200), "q".repeat(200)),
                Some(50),
                b"{}",
            ),
            "4.00",
        ),
        (
            "too large",
            post(&path, Some(50), &vec![b' '; 3000]),
            "4.13",
        ),
    ];
    for (name, packet, expected) in cases {
        let reply = client.request(packet).await;
        assert_eq!(
            code(&reply),
            expected,
            "{name}: {}",
            String::from_utf8_lossy(&reply.payload)
        );
        assert!(
            !reply.payload.is_empty(),
            "{name}: a failure names its problem"
        );
        assert!(
            !String::from_utf8_lossy(&reply.payload).contains(&device.token),
            "{name}: a diagnostic must not repeat the access token"
        );
        if expected == "4.13" {
            let size1 = reply.get_first_option(CoapOption::Size1).expect("Size1");
            assert_eq!(uint_value(size1), 2048);
        }
    }
}

#[tokio::test]
async fn reserved_token_lengths_are_rejected() {
    let server = Server::start().await;
    let client = Client::connect(server.coap_addr).await;

    for token_len in 9u8..=15 {
        let message_id = 0x2000 + u16::from(token_len);
        let id = message_id.to_be_bytes();
        let mut confirmable = vec![0x40 | token_len, 0x02, id[0], id[1]];
        confirmable.extend(std::iter::repeat_n(0xab, usize::from(token_len)));
        client.send_raw(&confirmable).await;
        let reply = client.receive(REPLY_WAIT).await.expect("a Reset");
        assert_eq!(
            reply.header.get_type(),
            MessageType::Reset,
            "TKL {token_len}"
        );
        assert_eq!(reply.header.message_id, message_id, "TKL {token_len}");

        let mut non_confirmable = confirmable.clone();
        non_confirmable[0] = 0x50 | token_len;
        client.send_raw(&non_confirmable).await;
        assert!(
            client.receive(Duration::from_millis(300)).await.is_none(),
            "TKL {token_len}: a Non-confirmable message with a format error is dropped"
        );
    }
    assert!(
        metric(
            &server,
            "ferrite_coap_datagrams_rejected_total{reason=\"invalid_token_length\"}"
        )
        .await
            >= 14.0
    );
}

#[tokio::test]
async fn malformed_datagrams_do_not_stop_the_listener() {
    let server = Server::start().await;
    let device = server.create_device("coap-malformed").await;
    let mut client = Client::connect(server.coap_addr).await;

    client.send_raw(&[0x40, 0x01]).await;
    assert!(
        client.receive(Duration::from_millis(300)).await.is_none(),
        "too short for a header"
    );

    // A Confirmable message that ends inside its 4-byte token.
    client.send_raw(&[0x44, 0x02, 0x30, 0x01, 0xaa]).await;
    let reply = client.receive(REPLY_WAIT).await.expect("a Reset");
    assert_eq!(reply.header.get_type(), MessageType::Reset);
    assert_eq!(reply.header.message_id, 0x3001);

    // A message of another CoAP version is dropped silently.
    client.send_raw(&[0x80, 0x02, 0x30, 0x03]).await;
    assert!(
        client.receive(Duration::from_millis(300)).await.is_none(),
        "version 2"
    );

    // An empty Confirmable message is a ping, and the reply is a Reset.
    client.send_raw(&[0x40, 0x00, 0x30, 0x02]).await;
    let reply = client.receive(REPLY_WAIT).await.expect("a Reset");
    assert_eq!(reply.header.get_type(), MessageType::Reset);

    let path = format!("/api/v1/{}/telemetry", device.token);
    let reply = client
        .request(post(&path, Some(50), br#"{"after_garbage": 1}"#))
        .await;
    assert_eq!(code(&reply), "2.04");
}

#[tokio::test]
async fn duplicate_confirmable_gets_the_same_reply() {
    let server = Server::start().await;
    let device = server.create_device("coap-duplicates").await;
    let client = Client::connect(server.coap_addr).await;
    let mut packet = post(
        &format!("/api/v1/{}/telemetry", device.token),
        Some(50),
        br#"{"dup": 1}"#,
    );
    packet.header.message_id = 0x4242;
    let bytes = packet.to_bytes().unwrap();

    client.send_raw(&bytes).await;
    let first = client.receive(REPLY_WAIT).await.expect("first reply");
    client.send_raw(&bytes).await;
    let second = client.receive(REPLY_WAIT).await.expect("replayed reply");
    assert_eq!(code(&first), "2.04");
    assert_eq!(first, second);
    assert!(metric(&server, "ferrite_coap_duplicates_total").await >= 1.0);
    assert!(wait_for_latest(&server, &device, "dup", &json!(1)).await);
}

#[tokio::test]
async fn unauthenticated_flood_keeps_duplicate_detection() {
    let server = Server::start_with_env(&[("FERRITE_COAP_MAX_EXCHANGES", "50")]).await;
    let device = server.create_device("coap-flood").await;
    let mut client = Client::connect(server.coap_addr).await;
    let mut packet = post(
        &format!("/api/v1/{}/telemetry", device.token),
        Some(50),
        br#"{"flood": 1}"#,
    );
    packet.header.message_id = client.message_id();
    let first = client.request(packet.clone()).await;
    assert_eq!(code(&first), "2.04");
    let stored = metric(&server, "ferrite_ingest_messages_total{protocol=\"coap\"}").await;

    // Ten times the cache size of requests that fail before a device is
    // known: unknown paths and invalid tokens.
    let mut flooder = Client::connect(server.coap_addr).await;
    for index in 0..500u32 {
        let path = if index % 2 == 0 {
            "/x".to_owned()
        } else {
            "/api/v1/not-a-token/telemetry".to_owned()
        };
        let mut flood = post(&path, Some(50), b"{}");
        flood.header.set_type(MessageType::NonConfirmable);
        flood.header.message_id = flooder.message_id();
        flooder.send_raw(&flood.to_bytes().unwrap()).await;
        if index % 50 == 49 {
            // Paces the flood, so that replies are not dropped.
            while flooder.receive(Duration::from_millis(200)).await.is_some() {}
        }
    }
    while flooder.receive(Duration::from_millis(500)).await.is_some() {}

    // The retransmission gets the stored reply and is not stored again.
    client.send_raw(&packet.to_bytes().unwrap()).await;
    let again = client.receive(REPLY_WAIT).await.expect("the stored reply");
    assert_eq!(again.header.message_id, packet.header.message_id);
    assert_eq!(code(&again), "2.04");
    let after = metric(&server, "ferrite_ingest_messages_total{protocol=\"coap\"}").await;
    assert_eq!(after, stored, "the duplicate was stored again");
    assert!(metric(&server, "ferrite_coap_duplicates_total").await >= 1.0);
}

#[tokio::test]
async fn duplicate_get_is_served_again() {
    let server = Server::start().await;
    let device = server.create_device("coap-duplicate-get").await;
    let mut client = Client::connect(server.coap_addr).await;
    patch_attributes(&server, &device, json!({"v": 1})).await;
    let mut get = request(
        RequestType::Get,
        &format!("/api/v1/{}/attributes", device.token),
        b"g",
    );
    get.header.message_id = client.message_id();
    assert_eq!(code(&client.request(get.clone()).await), "2.05");

    // The GET's reply is not kept, so the retransmission is read again
    // and sees the newer state.
    patch_attributes(&server, &device, json!({"v": 2})).await;
    let again = client.request(get).await;
    assert_eq!(code(&again), "2.05");
    let body: Value = serde_json::from_slice(&again.payload).unwrap();
    assert_eq!(body["shared"]["v"], 2);
    assert_eq!(metric(&server, "ferrite_coap_duplicates_total").await, 0.0);
}

#[tokio::test]
async fn block1_upload_is_reassembled() {
    let server = Server::start().await;
    let device = server.create_device("coap-block1").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/telemetry", device.token);
    let mut body = json!({"big": 7, "padding": "x".repeat(3000)})
        .to_string()
        .into_bytes();
    body.extend(std::iter::repeat_n(b' ', 64 - body.len() % 64 + 10));
    let block_size = 64;
    let blocks: Vec<&[u8]> = body.chunks(block_size).collect();

    for (num, chunk) in blocks.iter().enumerate() {
        let more = num + 1 < blocks.len();
        let mut packet = post(&path, Some(50), chunk);
        // A new token per block, as RFC 7959 allows.
        packet.set_token(vec![num as u8, 1]);
        packet.add_option(CoapOption::Block1, block_value(num as u32, more, 2));
        let reply = client.request(packet).await;
        let expected = if more { "2.31" } else { "2.04" };
        assert_eq!(
            code(&reply),
            expected,
            "block {num}: {}",
            String::from_utf8_lossy(&reply.payload)
        );
        let echo = reply
            .get_first_option(CoapOption::Block1)
            .expect("Block1 echo");
        assert_eq!(uint_value(echo) >> 4, num as u32);
    }
    assert!(wait_for_latest(&server, &device, "big", &json!(7)).await);

    // A gap fails the upload with 4.08.
    let mut first = post(&path, Some(50), &body[..64]);
    first.add_option(CoapOption::Block1, block_value(0, true, 2));
    assert_eq!(code(&client.request(first).await), "2.31");
    let mut skipped = post(&path, Some(50), &body[128..192]);
    skipped.add_option(CoapOption::Block1, block_value(2, true, 2));
    let reply = client.request(skipped).await;
    assert_eq!(code(&reply), "4.08");
    assert!(!reply.payload.is_empty());
}

#[tokio::test]
async fn attributes_are_read_in_blocks_and_observed() {
    let server = Server::start().await;
    let device = server.create_device("coap-attributes").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/attributes", device.token);
    let patch = |attributes: Value| patch_attributes(&server, &device, attributes);
    patch(json!({"firmware": "1.0", "notes": "n".repeat(2000)})).await;

    // Block2: the response comes in 1024-byte blocks.
    let mut body = Vec::new();
    for num in 0..10u32 {
        let mut packet = request(RequestType::Get, &path, b"g");
        if num > 0 {
            packet.add_option(CoapOption::Block2, block_value(num, false, 6));
        }
        let reply = client.request(packet).await;
        assert_eq!(code(&reply), "2.05");
        body.extend_from_slice(&reply.payload);
        let block2 = uint_value(reply.get_first_option(CoapOption::Block2).expect("Block2"));
        if block2 & 0x8 == 0 {
            break;
        }
    }
    let attributes: Value = serde_json::from_slice(&body).expect("whole JSON");
    assert_eq!(attributes["shared"]["firmware"], "1.0");

    // Observe: registration, then a notification per change.
    let mut observe = request(RequestType::Get, &path, b"obs");
    observe.add_option(CoapOption::Observe, vec![]);
    observe.add_option(CoapOption::Block2, block_value(0, false, 6));
    let registered = client.request(observe).await;
    assert_eq!(code(&registered), "2.05");
    let first_sequence = uint_value(
        registered
            .get_first_option(CoapOption::Observe)
            .expect("Observe"),
    );

    let mut last_sequence = first_sequence;
    for version in ["2.0", "3.0"] {
        patch(json!({"firmware": version})).await;
        let notification = client.receive(REPLY_WAIT).await.expect("a notification");
        if notification.header.get_type() == MessageType::Confirmable {
            client.acknowledge(&notification).await;
        }
        assert_eq!(notification.get_token(), b"obs");
        let sequence = uint_value(
            notification
                .get_first_option(CoapOption::Observe)
                .expect("Observe"),
        );
        assert!(sequence > last_sequence, "{sequence} after {last_sequence}");
        last_sequence = sequence;
        let update: Value = serde_json::from_slice(&notification.payload).unwrap();
        assert_eq!(update["firmware"], version);
    }

    // Deregistration: no more notifications.
    let mut deregister = request(RequestType::Get, &path, b"obs");
    deregister.add_option(CoapOption::Observe, vec![1]);
    deregister.add_option(CoapOption::Block2, block_value(0, false, 6));
    let reply = client.request(deregister).await;
    assert!(reply.get_first_option(CoapOption::Observe).is_none());
    patch(json!({"firmware": "4.0"})).await;
    assert!(client.receive(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn large_notification_is_sent_in_blocks() {
    let server = Server::start().await;
    let device = server.create_device("coap-large-notification").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/attributes", device.token);
    let mut observe = request(RequestType::Get, &path, b"big");
    observe.add_option(CoapOption::Observe, vec![]);
    assert_eq!(code(&client.request(observe).await), "2.05");

    // Larger than a datagram: coap-lite frames at most 64,000 bytes.
    patch_attributes(&server, &device, json!({"blob": "b".repeat(70_000)})).await;
    let notification = client.receive(REPLY_WAIT).await.expect("a notification");
    if notification.header.get_type() == MessageType::Confirmable {
        client.acknowledge(&notification).await;
    }
    assert_eq!(code(&notification), "2.05");
    assert_eq!(notification.get_token(), b"big");
    assert!(notification.get_first_option(CoapOption::Observe).is_some());
    assert_eq!(notification.payload.len(), 1024);
    let block2 = uint_value(
        notification
            .get_first_option(CoapOption::Block2)
            .expect("Block2"),
    );
    assert_eq!(block2, (1 << 3) | 6, "block 0, more blocks, 1024 bytes");
    let size2 = uint_value(
        notification
            .get_first_option(CoapOption::Size2)
            .expect("Size2"),
    );
    assert!(size2 > 70_000, "Size2 {size2}");
}

#[tokio::test]
async fn failed_observe_get_registers_no_observer() {
    let server = Server::start().await;
    let device = server.create_device("coap-failed-observe").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/attributes", device.token);
    patch_attributes(&server, &device, json!({"a": 1})).await;

    // Block 5 lies past the end of the short response, so the GET fails.
    let mut past_end = request(RequestType::Get, &path, b"bad");
    past_end.add_option(CoapOption::Observe, vec![]);
    past_end.add_option(CoapOption::Block2, block_value(5, false, 6));
    let reply = client.request(past_end).await;
    assert_eq!(code(&reply), "4.00");
    assert!(reply.get_first_option(CoapOption::Observe).is_none());

    patch_attributes(&server, &device, json!({"a": 2})).await;
    let notification = client.receive(Duration::from_secs(1)).await;
    assert!(
        notification.is_none(),
        "a failed GET must not observe: {notification:?}"
    );
}

#[tokio::test]
async fn rpc_request_reaches_an_observer_and_returns() {
    let server = Server::start().await;
    let device = server.create_device("coap-rpc").await;
    let mut client = Client::connect(server.coap_addr).await;

    let mut observe = request(
        RequestType::Get,
        &format!("/api/v1/{}/rpc", device.token),
        b"rpc",
    );
    observe.add_option(CoapOption::Observe, vec![]);
    let registered = client.request(observe).await;
    assert_eq!(code(&registered), "2.05");
    assert!(registered.get_first_option(CoapOption::Observe).is_some());

    let command = {
        let url = format!("{}/api/v1/devices/{}/commands", server.http_url, device.id);
        let token = server.admin_token().await;
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"method": "setLed", "params": {"on": true}, "timeout_ms": 5000}))
                .send()
                .await
                .unwrap()
        })
    };

    let notification = client
        .receive(REPLY_WAIT)
        .await
        .expect("an RPC notification");
    assert_eq!(notification.header.get_type(), MessageType::Confirmable);
    client.acknowledge(&notification).await;
    assert_eq!(notification.get_token(), b"rpc");
    let rpc: Value = serde_json::from_slice(&notification.payload).unwrap();
    assert_eq!(rpc["method"], "setLed");
    assert_eq!(rpc["params"]["on"], true);
    let request_id = rpc["id"].as_u64().expect("id");

    let response_path = format!("/api/v1/{}/rpc/{request_id}", device.token);
    let reply = client
        .request(post(&response_path, Some(50), br#"{"led": "on"}"#))
        .await;
    assert_eq!(code(&reply), "2.04");

    let response = command.await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["response"]["led"], "on");

    let late = client.request(post(&response_path, Some(50), b"{}")).await;
    assert_eq!(code(&late), "4.04");
}

#[tokio::test]
async fn rpc_notifications_wait_for_the_ack() {
    let server = Server::start().await;
    let device = server.create_device("coap-rpc-order").await;
    let mut client = Client::connect(server.coap_addr).await;
    let mut observe = request(
        RequestType::Get,
        &format!("/api/v1/{}/rpc", device.token),
        b"rpc",
    );
    observe.add_option(CoapOption::Observe, vec![]);
    assert_eq!(code(&client.request(observe).await), "2.05");

    let admin = server.admin_token().await;
    let url = format!("{}/api/v1/devices/{}/commands", server.http_url, device.id);
    for method in ["first", "second"] {
        let url = url.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(admin)
                .json(&json!({"method": method, "params": {}, "timeout_ms": 10000}))
                .send()
                .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let first = client.receive(REPLY_WAIT).await.expect("the first request");
    let rpc: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(rpc["method"], "first");

    // Until the ACK, only retransmissions of the first may arrive.
    while let Some(message) = client.receive(Duration::from_millis(1500)).await {
        assert_eq!(
            message.header.message_id, first.header.message_id,
            "a second notification was sent before the first was acknowledged"
        );
    }
    client.acknowledge(&first).await;

    let second = client
        .receive(REPLY_WAIT)
        .await
        .expect("the second request");
    assert_eq!(second.header.get_type(), MessageType::Confirmable);
    let rpc: Value = serde_json::from_slice(&second.payload).unwrap();
    assert_eq!(rpc["method"], "second");
    let sequence = |packet: &Packet| {
        uint_value(
            packet
                .get_first_option(CoapOption::Observe)
                .expect("Observe"),
        )
    };
    assert!(sequence(&second) > sequence(&first));
    client.acknowledge(&second).await;
}

#[tokio::test]
async fn token_rotation_ends_observations() {
    let server = Server::start().await;
    let device = server.create_device("coap-rotate").await;
    let mut client = Client::connect(server.coap_addr).await;
    let mut observe = request(
        RequestType::Get,
        &format!("/api/v1/{}/rpc", device.token),
        b"old",
    );
    observe.add_option(CoapOption::Observe, vec![]);
    assert_eq!(code(&client.request(observe).await), "2.05");

    let admin = server.admin_token().await;
    let rotated = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/devices/{}/token",
            server.http_url, device.id
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), 200);

    let ended = client
        .receive(REPLY_WAIT)
        .await
        .expect("a final notification");
    assert_eq!(code(&ended), "4.01");
    assert_eq!(ended.get_token(), b"old");

    // A command now finds no observer to carry it.
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/devices/{}/commands",
            server.http_url, device.id
        ))
        .bearer_auth(&admin)
        .json(&json!({"method": "getSecret", "params": {}, "timeout_ms": 1000}))
        .send()
        .await
        .unwrap();
    assert_ne!(response.status(), 200);
    assert!(
        client.receive(Duration::from_millis(500)).await.is_none(),
        "the old observer received the command"
    );
}

#[tokio::test]
async fn slow_append_gets_a_separate_response() {
    // With no wait, every Confirmable request gets an empty ACK first.
    let server = Server::start_with_env(&[("FERRITE_COAP_PIGGYBACK_WAIT", "0s")]).await;
    let device = server.create_device("coap-separate").await;
    let mut client = Client::connect(server.coap_addr).await;
    let mut packet = post(
        &format!("/api/v1/{}/telemetry", device.token),
        Some(50),
        br#"{"separate": 1}"#,
    );
    packet.header.message_id = client.message_id();
    client.send_raw(&packet.to_bytes().unwrap()).await;

    let ack = client.receive(REPLY_WAIT).await.expect("an empty ACK");
    assert_eq!(ack.header.get_type(), MessageType::Acknowledgement);
    assert_eq!(ack.header.code, MessageClass::Empty);
    assert_eq!(ack.header.message_id, packet.header.message_id);

    let response = client
        .receive(REPLY_WAIT)
        .await
        .expect("a separate response");
    assert_eq!(response.header.get_type(), MessageType::Confirmable);
    assert_eq!(code(&response), "2.04");
    assert_eq!(response.get_token(), b"t1");
    assert!(wait_for_latest(&server, &device, "separate", &json!(1)).await);

    // Unacknowledged, it is sent again with the same message ID after
    // ACK_TIMEOUT (2 to 3 s).
    let again = client
        .receive(Duration::from_secs(4))
        .await
        .expect("a retransmission");
    assert_eq!(again.header.message_id, response.header.message_id);
    client.acknowledge(&again).await;
    assert!(
        client.receive(Duration::from_secs(5)).await.is_none(),
        "no retransmission after the ACK"
    );
    assert!(metric(&server, "ferrite_coap_retransmissions_total").await >= 1.0);
}

#[tokio::test]
async fn unacknowledged_separate_responses_free_slots() {
    let server = Server::start_with_env(&[
        ("FERRITE_COAP_PIGGYBACK_WAIT", "0s"),
        ("FERRITE_COAP_MAX_CONCURRENT_REQUESTS", "2"),
    ])
    .await;
    let device = server.create_device("coap-slots").await;
    let path = format!("/api/v1/{}/telemetry", device.token);

    // Two clients take both slots and never ACK their separate responses,
    // so the server keeps retransmitting them.
    let mut silent = Vec::new();
    for index in 0..2 {
        let mut client = Client::connect(server.coap_addr).await;
        let mut packet = post(
            &path,
            Some(50),
            format!("{{\"silent\": {index}}}").as_bytes(),
        );
        packet.header.message_id = client.message_id();
        client.send_raw(&packet.to_bytes().unwrap()).await;
        let ack = client.receive(REPLY_WAIT).await.expect("an empty ACK");
        assert_eq!(ack.header.code, MessageClass::Empty);
        let response = client
            .receive(REPLY_WAIT)
            .await
            .expect("a separate response");
        assert_eq!(code(&response), "2.04");
        silent.push(client);
    }

    let mut third = Client::connect(server.coap_addr).await;
    let reply = third
        .request(post(&path, Some(50), br#"{"third": 1}"#))
        .await;
    assert_eq!(
        code(&reply),
        "2.04",
        "{}",
        String::from_utf8_lossy(&reply.payload)
    );
}

#[tokio::test]
async fn idle_block1_upload_is_dropped() {
    let server = Server::start_with_env(&[("FERRITE_COAP_BLOCK_TIMEOUT", "1s")]).await;
    let device = server.create_device("coap-block-timeout").await;
    let mut client = Client::connect(server.coap_addr).await;
    let path = format!("/api/v1/{}/telemetry", device.token);

    let mut first = post(&path, Some(50), &[b' '; 64]);
    first.add_option(CoapOption::Block1, block_value(0, true, 2));
    assert_eq!(code(&client.request(first).await), "2.31");

    // The sweeper runs every 5 s.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut second = post(&path, Some(50), br#"{"late": 1}"#);
    second.add_option(CoapOption::Block1, block_value(1, false, 2));
    let reply = client.request(second).await;
    assert_eq!(code(&reply), "4.08");
    assert!(
        metric(
            &server,
            "ferrite_coap_block_transfers_abandoned_total{reason=\"timed_out\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn reset_of_a_notification_ends_the_observation() {
    let server = Server::start().await;
    let device = server.create_device("coap-reset").await;
    let mut client = Client::connect(server.coap_addr).await;
    let mut observe = request(
        RequestType::Get,
        &format!("/api/v1/{}/rpc", device.token),
        b"rpc",
    );
    observe.add_option(CoapOption::Observe, vec![]);
    assert_eq!(code(&client.request(observe).await), "2.05");

    let url = format!("{}/api/v1/devices/{}/commands", server.http_url, device.id);
    let token = server.admin_token().await;
    let send_command = || {
        let (url, token) = (url.clone(), token.clone());
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"method": "ping", "timeout_ms": 1000}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };

    let first = send_command();
    let notification = client
        .receive(REPLY_WAIT)
        .await
        .expect("an RPC notification");
    let id = notification.header.message_id.to_be_bytes();
    client.send_raw(&[0x70, 0, id[0], id[1]]).await;
    assert_eq!(first.await.unwrap(), 504, "the device never responded");

    let second = send_command().await.unwrap();
    assert_eq!(
        second, 409,
        "the observer is gone, so the device is unreachable"
    );
}

#[tokio::test]
async fn observers_per_device_are_limited() {
    let server = Server::start_with_env(&[("FERRITE_COAP_MAX_OBSERVERS_PER_DEVICE", "2")]).await;
    let device = server.create_device("coap-observer-limit").await;
    let path = format!("/api/v1/{}/attributes", device.token);

    let mut observing = Vec::new();
    for index in 0..3 {
        let mut client = Client::connect(server.coap_addr).await;
        let mut observe = request(RequestType::Get, &path, b"lim");
        observe.add_option(CoapOption::Observe, vec![]);
        let reply = client.request(observe).await;
        assert_eq!(code(&reply), "2.05", "client {index}");
        observing.push(reply.get_first_option(CoapOption::Observe).is_some());
    }
    assert_eq!(
        observing,
        [true, true, false],
        "the third registration is served without Observe"
    );
}
