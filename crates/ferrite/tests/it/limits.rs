//! Rate limits and resource limits over real sockets: each test starts a
//! server with small `[limits]` values, goes over one limit, checks the
//! protocol's response and the counter, and checks that the server still
//! serves others afterwards.
//!
//! Run with `cargo test -p ferrite --test it -- limits::`.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use coap_lite::{MessageClass, MessageType, Packet, RequestType, ResponseType};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

use crate::mqtt_conformance::{Connect, Version, publish_simple, subscribe};
use crate::support::{Server, TestDevice};

/// Maximum wait for an expected packet or response.
const WAIT: Duration = Duration::from_secs(10);
const TELEMETRY_TOPIC: &str = "v1/devices/me/telemetry";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A raw MQTT connection that reads whole packets.
struct MqttClient {
    stream: TcpStream,
    buffer: BytesMut,
}

/// One packet from the server: the first byte and the body.
#[derive(Debug)]
struct RawPacket {
    first_byte: u8,
    body: Vec<u8>,
}

impl MqttClient {
    async fn open(server: &Server) -> Self {
        let stream = TcpStream::connect(server.mqtt_addr)
            .await
            .expect("connect to the MQTT port");
        Self {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// Connects with `version` and returns the CONNACK reason or return
    /// code.
    async fn connect(
        server: &Server,
        version: Version,
        client_id: &str,
        token: &str,
    ) -> (Self, u8) {
        let mut client = Self::open(server).await;
        client
            .send(&Connect::new(version, client_id, token).bytes())
            .await;
        let connack = client.next().await.expect("CONNACK");
        assert_eq!(
            connack.first_byte, 0x20,
            "expected CONNACK, got {connack:02x?}"
        );
        (client, connack.body[1])
    }

    async fn connected(server: &Server, version: Version, client_id: &str, token: &str) -> Self {
        let (client, code) = Self::connect(server, version, client_id, token).await;
        assert_eq!(code, 0, "CONNACK refused the connection of {client_id}");
        client
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .expect("send to the server");
    }

    /// Returns the next packet, or `None` when the server closed the
    /// connection or sent nothing within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<RawPacket> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buffer)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn next(&mut self) -> Option<RawPacket> {
        self.next_within(WAIT).await
    }

    fn take_packet(&mut self) -> Option<RawPacket> {
        let mut length = 0usize;
        for index in 0..4 {
            let byte = *self.buffer.get(1 + index)?;
            length |= usize::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 != 0 {
                continue;
            }
            let header = 2 + index;
            if self.buffer.len() < header + length {
                return None;
            }
            let first_byte = self.buffer[0];
            self.buffer.advance(header);
            let body = self.buffer.split_to(length).to_vec();
            return Some(RawPacket { first_byte, body });
        }
        panic!("remaining length of more than 4 bytes");
    }
}

/// Returns the packet id and reason code of a PUBACK; a PUBACK without a
/// reason code is a success.
fn puback(packet: &RawPacket) -> (u16, u8) {
    assert_eq!(
        packet.first_byte, 0x40,
        "expected PUBACK, got {packet:02x?}"
    );
    let packet_id = u16::from_be_bytes([packet.body[0], packet.body[1]]);
    (packet_id, packet.body.get(2).copied().unwrap_or(0))
}

/// Returns the reason codes of a SUBACK (MQTT 5).
fn suback_codes(packet: &RawPacket) -> Vec<u8> {
    assert_eq!(
        packet.first_byte, 0x90,
        "expected SUBACK, got {packet:02x?}"
    );
    let properties_length = usize::from(packet.body[2]);
    packet.body[3 + properties_length..].to_vec()
}

/// Returns the value of the first metric line that starts with
/// `line_start`, 0 when there is none. Retries while the HTTP listener
/// rejects connections, because some tests set a tiny connection limit.
async fn metric(server: &Server, line_start: &str) -> f64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let response = reqwest::get(format!("{}/metrics", server.http_url)).await;
        if let Ok(response) = response
            && response.status() == 200
        {
            break response.text().await.expect("metrics text");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GET /metrics kept failing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

/// Checks that the server responds to `/healthz` and stores telemetry of a
/// fresh device over HTTP.
async fn assert_healthy(server: &Server) {
    let health = reqwest::get(format!("{}/healthz", server.http_url))
        .await
        .expect("GET /healthz");
    assert_eq!(health.status(), 200);
    let device = server.create_device("after-attack").await;
    let stored = post_telemetry(server, &device, r#"{"after": 1}"#).await;
    assert_eq!(
        stored.status(),
        200,
        "a fresh device cannot store telemetry"
    );
}

async fn post_telemetry(server: &Server, device: &TestDevice, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!(
            "{}/api/v1/{}/telemetry",
            server.http_url, device.token
        ))
        .body(body.to_owned())
        .send()
        .await
        .expect("POST telemetry")
}

// ---------------------------------------------------------------------------
// MQTT
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mqtt5_device_rate_gets_0x97() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "3"),
        ("FERRITE_LIMITS_MQTT_RATE_LIMITED_BEFORE_DISCONNECT", "20"),
    ])
    .await;
    let device = server.create_device("fast-v5").await;
    let mut client = MqttClient::connected(&server, Version::V5, "fast-v5", &device.token).await;

    let mut burst = Vec::new();
    for packet_id in 1..=6u16 {
        burst.extend(publish_simple(
            Version::V5,
            1,
            TELEMETRY_TOPIC,
            packet_id,
            br#"{"n": 1}"#,
        ));
    }
    client.send(&burst).await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let packet = client.next().await.expect("a PUBACK for every PUBLISH");
        codes.push(puback(&packet).1);
    }
    assert_eq!(&codes[..3], &[0x00, 0x00, 0x00], "the burst is accepted");
    assert_eq!(&codes[3..], &[0x97, 0x97, 0x97], "beyond the burst: 0x97");

    let limited = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="mqtt",limit="device_messages"}"#,
    )
    .await;
    assert!(limited >= 3.0, "counted {limited}");
    // Only the three accepted messages were stored.
    let stored_metric = r#"ferrite_ingest_messages_total{protocol="mqtt"}"#;
    assert!(
        crate::support::wait_until(
            || async { metric(&server, stored_metric).await == 3.0 },
            WAIT
        )
        .await,
        "stored {}",
        metric(&server, stored_metric).await
    );
    assert_healthy(&server).await;
}

#[tokio::test]
async fn mqtt5_client_that_keeps_going_is_disconnected() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "1"),
        ("FERRITE_LIMITS_MQTT_RATE_LIMITED_BEFORE_DISCONNECT", "5"),
    ])
    .await;
    let device = server.create_device("flood-v5").await;
    let mut client = MqttClient::connected(&server, Version::V5, "flood-v5", &device.token).await;

    let mut flood = Vec::new();
    for packet_id in 1..=50u16 {
        flood.extend(publish_simple(
            Version::V5,
            1,
            TELEMETRY_TOPIC,
            packet_id,
            br#"{"n": 1}"#,
        ));
    }
    client.send(&flood).await;

    let mut acks = Vec::new();
    let disconnect = loop {
        let packet = client.next().await.expect("PUBACKs, then DISCONNECT");
        if packet.first_byte == 0xE0 {
            break packet;
        }
        acks.push(puback(&packet).1);
    };
    assert_eq!(disconnect.body[0], 0x96, "DISCONNECT reason");
    assert_eq!(
        acks,
        vec![0x00, 0x97, 0x97, 0x97, 0x97],
        "one success, four 0x97"
    );
    assert!(
        client.next_within(Duration::from_secs(2)).await.is_none(),
        "closed"
    );
    assert_healthy(&server).await;
}

#[tokio::test]
async fn mqtt311_client_is_slowed_not_dropped() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "5"),
        ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "5"),
    ])
    .await;
    let noisy = server.create_device("noisy-311").await;
    let quiet = server.create_device("quiet-311").await;
    let mut noisy_client =
        MqttClient::connected(&server, Version::V311, "noisy-311", &noisy.token).await;
    let mut quiet_client =
        MqttClient::connected(&server, Version::V311, "quiet-311", &quiet.token).await;

    // 40 QoS 1 messages at once: at 5 per second they need about 7 s.
    let mut flood = Vec::new();
    for packet_id in 1..=40u16 {
        flood.extend(publish_simple(
            Version::V311,
            1,
            TELEMETRY_TOPIC,
            packet_id,
            br#"{"n": 1}"#,
        ));
    }
    noisy_client.send(&flood).await;

    // The quiet device is served at once while the noisy one waits.
    let mut quiet_burst = Vec::new();
    for packet_id in 1..=5u16 {
        quiet_burst.extend(publish_simple(
            Version::V311,
            1,
            TELEMETRY_TOPIC,
            packet_id,
            br#"{"q": 1}"#,
        ));
    }
    quiet_client.send(&quiet_burst).await;
    for expected in 1..=5u16 {
        let packet = quiet_client
            .next()
            .await
            .expect("PUBACK of the quiet device");
        assert_eq!(puback(&packet), (expected, 0));
    }

    // The noisy device gets acknowledgements in order, at its rate: the
    // burst and a few more in the second that follows, never a gap.
    let mut acknowledged = Vec::new();
    let window = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Some(packet) = noisy_client
        .next_within(window.saturating_duration_since(tokio::time::Instant::now()))
        .await
    {
        acknowledged.push(puback(&packet).0);
    }
    let count = acknowledged.len();
    assert!((5..=25).contains(&count), "acknowledged {count} in 2 s");
    let expected: Vec<u16> = (1..=count as u16).collect();
    assert_eq!(acknowledged, expected, "acknowledged in order without gaps");

    let delayed = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="mqtt",limit="device_messages"}"#,
    )
    .await;
    assert!(delayed >= 1.0, "counted {delayed}");
    // Still connected: a PINGREQ gets its PINGRESP after the queued PUBACKs.
    noisy_client.send(&[0xC0, 0x00]).await;
    let mut ping_returned = false;
    while let Some(packet) = noisy_client.next_within(WAIT).await {
        if packet.first_byte == 0xD0 {
            ping_returned = true;
            break;
        }
    }
    assert!(ping_returned, "the slowed connection stays open");
    assert_healthy(&server).await;
}

#[tokio::test]
async fn mqtt_connections_per_address_get_0x9f() {
    let server = Server::start_with_env(&[("FERRITE_LIMITS_CONNECTIONS_PER_ADDRESS", "2")]).await;
    let device = server.create_device("many-connections").await;

    let first = MqttClient::connected(&server, Version::V5, "c1", &device.token).await;
    let _second = MqttClient::connected(&server, Version::V5, "c2", &device.token).await;
    let (_, code) = MqttClient::connect(&server, Version::V5, "c3", &device.token).await;
    assert_eq!(code, 0x9F, "MQTT 5: Connection rate exceeded");
    let (_, code) = MqttClient::connect(&server, Version::V311, "c4", &device.token).await;
    assert_eq!(code, 0x03, "MQTT 3.1.1: Server unavailable");

    let refused = metric(
        &server,
        r#"ferrite_connections_refused_total{protocol="mqtt",reason="connections_per_address"}"#,
    )
    .await;
    assert_eq!(refused, 2.0);

    // A closed connection gives its place back.
    drop(first);
    assert!(
        crate::support::wait_until(
            || async {
                let (_, code) =
                    MqttClient::connect(&server, Version::V5, "c5", &device.token).await;
                code == 0
            },
            WAIT,
        )
        .await
    );
}

#[tokio::test]
async fn mqtt_subscriptions_and_topics_are_bounded() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_MAX_SUBSCRIPTIONS_PER_CLIENT", "2"),
        ("FERRITE_LIMITS_MAX_TOPIC_LENGTH", "128"),
        ("FERRITE_LIMITS_MAX_TOPIC_LEVELS", "8"),
    ])
    .await;
    let device = server.create_device("subscriber").await;
    let mut client = MqttClient::connected(&server, Version::V5, "subscriber", &device.token).await;

    let long_filter = format!("v1/devices/me/{}", "x".repeat(200));
    client
        .send(&subscribe(
            Version::V5,
            1,
            &[
                ("v1/devices/me/attributes", 1),
                ("v1/devices/me/rpc/request/+", 1),
                ("v1/devices/me/other", 1),
                (&long_filter, 1),
            ],
        ))
        .await;
    let codes = suback_codes(&client.next().await.expect("SUBACK"));
    assert_eq!(codes, vec![0x01, 0x01, 0x97, 0x8F]);

    // Subscribing again to a held filter replaces it and is granted.
    client
        .send(&subscribe(
            Version::V5,
            2,
            &[("v1/devices/me/attributes", 0)],
        ))
        .await;
    let codes = suback_codes(&client.next().await.expect("SUBACK"));
    assert_eq!(codes, vec![0x00]);

    // A topic name with too many levels gets PUBACK 0x90.
    let deep = "v1/devices/me/a/b/c/d/e/f";
    client
        .send(&publish_simple(Version::V5, 1, deep, 7, b"{}"))
        .await;
    assert_eq!(puback(&client.next().await.expect("PUBACK")), (7, 0x90));

    let subscriptions = metric(
        &server,
        r#"ferrite_resource_limited_total{protocol="mqtt",limit="subscriptions"}"#,
    )
    .await;
    assert_eq!(subscriptions, 1.0);
    assert_healthy(&server).await;
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn http_tenant_rate_gets_429() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_TENANT_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_TENANT_MESSAGE_BURST", "4"),
    ])
    .await;
    let first = server.create_device("tenant-a").await;
    let second = server.create_device("tenant-b").await;

    let mut statuses = Vec::new();
    for device in [&first, &second, &first, &second] {
        statuses.push(
            post_telemetry(&server, device, r#"{"t": 1}"#)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 200], "the tenant's burst");

    let response = post_telemetry(&server, &second, r#"{"t": 2}"#).await;
    assert_eq!(response.status(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .expect("Retry-After header")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["limit"], "limits.tenant_messages_per_second");
    assert_eq!(body["limit_value"], 1);
    assert!(
        body["detail"].as_str().unwrap().contains("tenant"),
        "{body}"
    );

    let limited = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="http",limit="tenant_messages"}"#,
    )
    .await;
    assert_eq!(limited, 1.0);
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(
        post_telemetry(&server, &first, r#"{"t": 3}"#)
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn http_address_rate_covers_devices() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_ADDRESS_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_ADDRESS_MESSAGE_BURST", "3"),
    ])
    .await;
    let mut devices = Vec::new();
    for index in 0..5 {
        devices.push(server.create_device(&format!("address-{index}")).await);
    }
    let mut statuses = Vec::new();
    for device in &devices {
        statuses.push(
            post_telemetry(&server, device, r#"{"t": 1}"#)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    let limited = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="http",limit="address_messages"}"#,
    )
    .await;
    assert_eq!(limited, 2.0);
}

#[tokio::test]
async fn api_credential_rate_gets_429() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_API_REQUESTS_PER_SECOND", "1"),
        ("FERRITE_LIMITS_API_REQUEST_BURST", "3"),
    ])
    .await;
    let busy = server.create_api_key("busy", "viewer");
    let calm = server.create_api_key("calm", "viewer");
    let client = reqwest::Client::new();
    let list = |key: &str| {
        client
            .get(format!("{}/api/v1/devices", server.http_url))
            .bearer_auth(key)
            .send()
    };

    for _ in 0..3 {
        assert_eq!(list(&busy).await.expect("GET").status(), 200);
    }
    let response = list(&busy).await.expect("GET");
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.expect("problem JSON");
    assert_eq!(body["limit"], "limits.api_requests_per_second");
    assert_eq!(body["limit_value"], 1);

    // Another credential from the same address is not limited.
    assert_eq!(list(&calm).await.expect("GET").status(), 200);
    let limited = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="api",limit="api_credential_requests"}"#,
    )
    .await;
    assert_eq!(limited, 1.0);
}

#[tokio::test]
async fn http_connections_per_address_get_429() {
    let server = Server::start_with_env(&[("FERRITE_LIMITS_CONNECTIONS_PER_ADDRESS", "2")]).await;
    // The connections of the start-up health check close first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Two open connections that have sent one byte each, so that neither
    // is closed as silent.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(server.http_addr).await.expect("connect");
        stream.write_all(b"G").await.expect("write");
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut third = TcpStream::connect(server.http_addr).await.expect("connect");
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ferrite\r\n\r\n")
        .await
        .expect("write request");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, third.read_to_end(&mut response))
        .await
        .expect("the rejected connection gets a response and is closed")
        .expect("read response");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 429"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 5"),
        "{text}"
    );
    assert!(text.contains("limits.connections_per_address"), "{text}");

    drop(held);
    assert!(
        crate::support::wait_until(
            || async {
                reqwest::get(format!("{}/healthz", server.http_url))
                    .await
                    .is_ok_and(|response| response.status() == 200)
            },
            WAIT,
        )
        .await
    );
}

#[tokio::test]
async fn http_oversized_and_slow_bodies_are_rejected() {
    let server = Server::start_with_env(&[
        ("FERRITE_HTTP_MAX_BODY_BYTES", "2048"),
        ("FERRITE_HTTP_REQUEST_TIMEOUT", "2s"),
    ])
    .await;
    let device = server.create_device("uploader").await;

    let large = format!(r#"{{"text": "{}"}}"#, "x".repeat(4096));
    assert_eq!(post_telemetry(&server, &device, &large).await.status(), 413);

    // A body that never arrives in full ends with 408 after the request
    // timeout, and other clients are served meanwhile.
    let mut slow = TcpStream::connect(server.http_addr).await.expect("connect");
    let head = format!(
        "POST /api/v1/{}/telemetry HTTP/1.1\r\nHost: ferrite\r\nContent-Length: 1000\r\n\r\n{{\"a\"",
        device.token
    );
    slow.write_all(head.as_bytes()).await.expect("write");
    assert_eq!(
        post_telemetry(&server, &device, r#"{"b": 1}"#)
            .await
            .status(),
        200
    );
    let mut response = vec![0u8; 1024];
    let read = tokio::time::timeout(WAIT, slow.read(&mut response))
        .await
        .expect("a response within the request timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&response[..read]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert_healthy(&server).await;
}

// ---------------------------------------------------------------------------
// Device WebSocket and CoAP
// ---------------------------------------------------------------------------

#[tokio::test]
async fn device_websocket_rate_keeps_socket_open() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "2"),
    ])
    .await;
    let device = server.create_device("socket").await;
    let url = format!(
        "ws://{}/api/v1/devices/ws?access_token={}",
        server.http_addr, device.token
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");

    for index in 1..=3 {
        let message = format!(r#"{{"type":"telemetry","id":{index},"data":{{"n":{index}}}}}"#);
        socket.send(Message::text(message)).await.expect("send");
    }
    let mut replies = Vec::new();
    while replies.len() < 3 {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a reply per message")
            .expect("socket open")
            .expect("valid frame");
        if let Message::Text(text) = message {
            replies.push(serde_json::from_str::<Value>(&text).expect("JSON reply"));
        }
    }
    assert_eq!(replies[0]["type"], "ack");
    assert_eq!(replies[1]["type"], "ack");
    assert_eq!(replies[2]["type"], "error");
    assert_eq!(replies[2]["error"], "rate_limited");
    assert_eq!(replies[2]["id"], 3);
    assert_eq!(replies[2]["limit"], "limits.device_messages_per_second");
    assert_eq!(replies[2]["limit_value"], 1);
    let retry_after = replies[2]["retry_after"].as_u64().expect("retry_after");

    // The socket stays open; after the wait the message is accepted.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    socket
        .send(Message::text(
            r#"{"type":"telemetry","id":4,"data":{"n":4}}"#,
        ))
        .await
        .expect("send");
    let reply = loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a reply")
            .expect("socket open")
            .expect("valid frame");
        if let Message::Text(text) = message {
            break serde_json::from_str::<Value>(&text).expect("JSON reply");
        }
    };
    assert_eq!(reply["type"], "ack", "{reply}");
}

async fn coap_post(socket: &UdpSocket, message_id: u16, token: &str) -> Packet {
    let mut request = Packet::new();
    request.header.set_version(1);
    request.header.set_type(MessageType::Confirmable);
    request.header.code = MessageClass::Request(RequestType::Post);
    request.header.message_id = message_id;
    request.set_token(message_id.to_be_bytes().to_vec());
    for segment in ["api", "v1", token, "telemetry"] {
        request.add_option(coap_lite::CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    request.add_option(coap_lite::CoapOption::ContentFormat, vec![50]);
    request.payload = br#"{"c": 1}"#.to_vec();
    socket
        .send(&request.to_bytes().expect("encode"))
        .await
        .expect("send datagram");
    let mut buffer = vec![0u8; 2048];
    let length = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
        .await
        .expect("a CoAP response")
        .expect("receive");
    Packet::from_bytes(&buffer[..length]).expect("valid CoAP")
}

#[tokio::test]
async fn coap_device_rate_gets_4_29() {
    let server = Server::start_with_env(&[
        ("FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND", "1"),
        ("FERRITE_LIMITS_DEVICE_MESSAGE_BURST", "2"),
    ])
    .await;
    let device = server.create_device("coap-fast").await;
    let other = server.create_device("coap-calm").await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.connect(server.coap_addr).await.expect("connect");

    let mut codes = Vec::new();
    for message_id in 1..=3u16 {
        let response = coap_post(&socket, message_id, &device.token).await;
        codes.push(response.header.code);
        if message_id == 3 {
            let max_age = response
                .get_option(coap_lite::CoapOption::MaxAge)
                .and_then(|values| values.front().cloned())
                .expect("Max-Age on 4.29");
            assert_eq!(max_age, vec![1], "Max-Age in seconds");
            let diagnostic = String::from_utf8_lossy(&response.payload);
            assert!(
                diagnostic.contains("limits.device_messages_per_second"),
                "{diagnostic}"
            );
        }
    }
    assert_eq!(
        codes,
        vec![
            MessageClass::Response(ResponseType::Changed),
            MessageClass::Response(ResponseType::Changed),
            MessageClass::Response(ResponseType::TooManyRequests),
        ]
    );
    // Another device on the same socket is not limited.
    let response = coap_post(&socket, 4, &other.token).await;
    assert_eq!(
        response.header.code,
        MessageClass::Response(ResponseType::Changed)
    );
    let limited = metric(
        &server,
        r#"ferrite_rate_limited_total{protocol="coap",limit="device_messages"}"#,
    )
    .await;
    assert_eq!(limited, 1.0);
    assert_healthy(&server).await;
}
