//! WebSocket tests over real sockets with `tokio-tungstenite`: MQTT over
//! WebSocket at `/mqtt` with raw MQTT packets (so that packets can be split
//! across messages and batched into one), and the device WebSocket at
//! `/api/v1/devices/ws`.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::{ConnectOptions, QoS};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{Server, TestDevice, wait_until};

/// Maximum wait for an expected message or close.
const WAIT: Duration = Duration::from_secs(10);
/// Maximum wait for stored telemetry to show in the latest values.
const STORE_WAIT: Duration = Duration::from_secs(5);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;
/// Extra request headers as name and value.
type Headers<'a> = &'a [(&'a str, &'a str)];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Opens a WebSocket at `path` with optional subprotocols and headers.
async fn open(
    server: &Server,
    path: &str,
    protocols: Option<&str>,
    headers: Headers<'_>,
) -> Result<(Client, Option<String>), (u16, Value)> {
    let mut request = format!("ws://{}{path}", server.http_addr)
        .into_client_request()
        .expect("WebSocket request");
    if let Some(protocols) = protocols {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(protocols).expect("header value"),
        );
    }
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((client, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .map(|value| value.to_str().expect("ASCII").to_owned());
            Ok((client, protocol))
        }
        Err(WsError::Http(response)) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice(body).ok())
                .unwrap_or(Value::Null);
            Err((status, body))
        }
        Err(error) => panic!("WebSocket connection to {path} failed: {error}"),
    }
}

async fn open_mqtt(server: &Server) -> Client {
    let (client, protocol) = open(server, "/mqtt", Some("mqtt"), &[])
        .await
        .expect("MQTT over WebSocket upgrade");
    assert_eq!(protocol.as_deref(), Some("mqtt"));
    client
}

async fn open_device(server: &Server, device: &TestDevice) -> Client {
    let path = format!("/api/v1/devices/ws?access_token={}", device.token);
    let (client, _) = open(server, &path, None, &[])
        .await
        .expect("device WebSocket upgrade");
    client
}

/// Reads the next data or close message, skipping pings and pongs; `None`
/// when the connection ended without a close frame.
async fn next_message(client: &mut Client) -> Option<Message> {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, client.next())
            .await
            .expect("timed out waiting for a WebSocket message");
        match message {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(message)) => return Some(message),
            None | Some(Err(_)) => return None,
        }
    }
}

async fn next_json(client: &mut Client) -> Value {
    match next_message(client).await {
        Some(Message::Text(text)) => serde_json::from_str(text.as_str()).expect("JSON message"),
        other => panic!("expected a JSON text message, got {other:?}"),
    }
}

/// Reads until the close frame and returns its code and reason.
async fn expect_close(client: &mut Client) -> (CloseCode, String) {
    loop {
        match next_message(client).await {
            Some(Message::Close(Some(frame))) => return (frame.code, frame.reason.to_string()),
            Some(Message::Close(None)) => return (CloseCode::Status, String::new()),
            Some(_) => continue,
            None => panic!("the connection ended without a close frame"),
        }
    }
}

fn encode(packet: &impl MqttPacket) -> Vec<u8> {
    let mut bytes = BytesMut::new();
    packet.encode(&mut bytes).expect("encode a test packet");
    bytes.to_vec()
}

fn connect_packet(client_id: &str, token: &str) -> Vec<u8> {
    let options = ConnectOptions::new(client_id)
        .with_keep_alive(Duration::from_secs(30))
        .with_credentials(token, b"");
    encode(&ConnectPacket::new_v311(options))
}

fn publish_packet(payload: &str, packet_id: u16) -> Vec<u8> {
    let publish = PublishPacket::new_v311(
        "v1/devices/me/telemetry",
        payload.as_bytes().to_vec(),
        QoS::AtLeastOnce,
    )
    .with_packet_id(packet_id);
    encode(&publish)
}

/// Reads binary messages until `count` bytes arrived; MQTT packets may
/// come split or batched.
async fn read_bytes(client: &mut Client, count: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < count {
        match next_message(client).await {
            Some(Message::Binary(data)) => bytes.extend_from_slice(&data),
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
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

async fn metric_value(server: &Server, line_start: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .expect("metrics request")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

async fn post_command(server: &Server, device: &TestDevice, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/devices/{}/commands",
            server.http_url, device.id
        ))
        .bearer_auth(server.admin_token().await)
        .json(&body)
        .send()
        .await
        .expect("command request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------
// MQTT over WebSocket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mqtt_packets_split_and_batched_are_stored() {
    let server = Server::start().await;
    let device = server.create_device("ws-mqtt").await;
    let mut client = open_mqtt(&server).await;

    // CONNECT split across two messages.
    let connect = connect_packet("ws-split", &device.token);
    let (head, tail) = connect.split_at(3);
    client
        .send(Message::binary(head.to_vec()))
        .await
        .expect("send");
    client
        .send(Message::binary(tail.to_vec()))
        .await
        .expect("send");
    let connack = read_bytes(&mut client, 4).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "CONNACK accepted");

    // Two PUBLISHes in one message.
    let mut batch = publish_packet(r#"{"a":1}"#, 1);
    batch.extend(publish_packet(r#"{"b":2}"#, 2));
    client.send(Message::binary(batch)).await.expect("send");
    let acks = read_bytes(&mut client, 8).await;
    assert_eq!(acks, [0x40, 0x02, 0x00, 0x01, 0x40, 0x02, 0x00, 0x02]);

    assert!(wait_for_latest(&server, &device, "a", &json!(1)).await);
    assert!(wait_for_latest(&server, &device, "b", &json!(2)).await);

    // DISCONNECT ends with a normal close frame.
    client
        .send(Message::binary(vec![0xE0, 0x00]))
        .await
        .expect("send");
    let (code, _) = expect_close(&mut client).await;
    assert_eq!(code, CloseCode::Normal);
}

#[tokio::test]
async fn mqtt_upgrade_needs_mqtt_subprotocol() {
    let server = Server::start().await;

    for offered in [None, Some("graphql-ws"), Some("mqtt5, wamp")] {
        let (status, body) = open(&server, "/mqtt", offered, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("{offered:?}: upgrade accepted"));
        assert_eq!(status, 400, "{offered:?}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains("no MQTT subprotocol"),
            "{offered:?}: {detail}"
        );
    }

    let (_client, protocol) = open(&server, "/mqtt", Some("wamp, mqttv3.1"), &[])
        .await
        .expect("mqttv3.1 accepted");
    assert_eq!(protocol.as_deref(), Some("mqttv3.1"));
}

#[tokio::test]
async fn mqtt_bad_token_gets_refusing_connack() {
    let server = Server::start().await;
    let mut client = open_mqtt(&server).await;

    client
        .send(Message::binary(connect_packet("ws-bad", "not-a-token")))
        .await
        .expect("send");
    let connack = read_bytes(&mut client, 4).await;
    assert_eq!(&connack[..2], [0x20, 0x02]);
    assert_ne!(connack[3], 0x00, "CONNACK must refuse: {connack:?}");
}

#[tokio::test]
async fn mqtt_text_message_closes_with_1003() {
    let server = Server::start().await;
    let device = server.create_device("ws-text").await;
    let mut client = open_mqtt(&server).await;
    client
        .send(Message::binary(connect_packet("ws-text", &device.token)))
        .await
        .expect("send");
    read_bytes(&mut client, 4).await;

    client.send(Message::text("{}")).await.expect("send");
    let (code, reason) = expect_close(&mut client).await;
    assert_eq!(code, CloseCode::Unsupported);
    assert!(reason.contains("binary"), "{reason}");
}

#[tokio::test]
async fn mqtt_packet_and_message_size_limits() {
    // Packets may have 1 KiB of payload plus 8 KiB of headroom, and
    // messages twice that.
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_PAYLOAD_BYTES", "1024")]).await;
    let device = server.create_device("ws-size").await;

    let mut client = open_mqtt(&server).await;
    let options = ConnectOptions::new("ws-size-5")
        .with_keep_alive(Duration::from_secs(30))
        .with_credentials(&device.token, b"");
    client
        .send(Message::binary(encode(&ConnectPacket::new(options))))
        .await
        .expect("send");
    let connack = read_bytes(&mut client, 3).await;
    assert_eq!(connack[0], 0x20, "CONNACK: {connack:?}");

    let payload = "x".repeat(12 * 1024);
    let publish = PublishPacket::new(
        "v1/devices/me/telemetry",
        payload.into_bytes(),
        QoS::AtLeastOnce,
    )
    .with_packet_id(1);
    client
        .send(Message::binary(encode(&publish)))
        .await
        .expect("send");
    let mut disconnect = Vec::new();
    let (code, _) = loop {
        match next_message(&mut client).await {
            Some(Message::Binary(data)) => disconnect.extend_from_slice(&data),
            Some(Message::Close(Some(frame))) => break (frame.code, frame.reason),
            other => panic!("expected DISCONNECT and a close frame, got {other:?}"),
        }
    };
    // CONNACK's properties may come in the same messages; DISCONNECT is last.
    let position = disconnect.iter().rposition(|byte| *byte == 0xE0);
    let reason = position.and_then(|index| disconnect.get(index + 2));
    assert_eq!(
        reason,
        Some(&0x95),
        "DISCONNECT Packet Too Large: {disconnect:?}"
    );
    assert_eq!(code, CloseCode::Normal);

    let mut client = open_mqtt(&server).await;
    client
        .send(Message::binary(vec![0u8; 40 * 1024]))
        .await
        .expect("send");
    let ended = loop {
        match next_message(&mut client).await {
            None => break true,
            Some(Message::Close(frame)) => panic!("expected no close frame, got {frame:?}"),
            Some(_) => {}
        }
    };
    assert!(ended);
}

#[tokio::test]
async fn mqtt_silent_client_is_closed_after_connect_timeout() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_CONNECT_TIMEOUT", "1s")]).await;
    let mut client = open_mqtt(&server).await;

    let started = Instant::now();
    expect_close(&mut client).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn mqtt_connection_limit_covers_tcp_and_websocket() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_CONNECTIONS", "1")]).await;
    let device = server.create_device("ws-limit").await;

    let mut first = open_mqtt(&server).await;
    first
        .send(Message::binary(connect_packet("ws-first", &device.token)))
        .await
        .expect("send");
    read_bytes(&mut first, 4).await;

    let (status, body) = open(&server, "/mqtt", Some("mqtt"), &[])
        .await
        .expect_err("second WebSocket refused");
    assert_eq!(status, 503, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("mqtt.max_connections"),
        "{body}"
    );

    // The TCP listener counts the WebSocket connection too: it closes a
    // new connection at once.
    let mut tcp = TcpStream::connect(server.mqtt_addr).await.expect("connect");
    let mut buffer = [0u8; 8];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut tcp, &mut buffer))
        .await
        .expect("closed in time");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

// ---------------------------------------------------------------------------
// Device WebSocket
// ---------------------------------------------------------------------------

#[tokio::test]
async fn device_telemetry_is_acknowledged_in_order() {
    let server = Server::start().await;
    let device = server.create_device("ws-device").await;
    let mut client = open_device(&server, &device).await;

    let messages = [
        json!({"type": "telemetry", "id": "m1", "data": {"temperature": 21.5}}),
        json!({"type": "telemetry", "id": 2, "data": {"ts": 1_700_000_000_000u64, "values": {"old": 1}}}),
        json!({"type": "telemetry", "data": [{"humidity": 40}]}),
    ];
    for message in &messages {
        client
            .send(Message::text(message.to_string()))
            .await
            .expect("send");
    }
    for expected_id in [json!("m1"), json!(2), Value::Null] {
        let ack = next_json(&mut client).await;
        assert_eq!(ack, json!({"type": "ack", "id": expected_id}));
    }

    assert!(wait_for_latest(&server, &device, "temperature", &json!(21.5)).await);
    assert!(wait_for_latest(&server, &device, "humidity", &json!(40)).await);
}

#[tokio::test]
async fn device_close_with_pending_acks_completes() {
    let server = Server::start().await;
    let device = server.create_device("ws-close-pending").await;
    let mut client = open_device(&server, &device).await;

    for index in 0..5 {
        let message = json!({"type": "telemetry", "id": index, "data": {"n": index}});
        client
            .send(Message::text(message.to_string()))
            .await
            .expect("send");
    }
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    client
        .close(Some(frame))
        .await
        .expect("send the close frame");

    // The server answers with its close frame rather than dropping the
    // connection, and every message taken before the close is stored.
    let (code, _) = expect_close(&mut client).await;
    assert_eq!(code, CloseCode::Normal);
    assert!(wait_for_latest(&server, &device, "n", &json!(4)).await);
}

#[tokio::test]
async fn device_socket_checks_credentials_before_upgrade() {
    let server = Server::start().await;
    let device = server.create_device("ws-auth").await;
    let api_key = server.create_api_key("ws-key", "admin");
    let bearer = format!("Bearer {}", device.token);

    let (mut client, _) = open(
        &server,
        "/api/v1/devices/ws",
        None,
        &[("authorization", &bearer)],
    )
    .await
    .expect("bearer header accepted");
    client
        .send(Message::text(
            json!({"type": "telemetry", "id": 1, "data": {"x": 1}}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(next_json(&mut client).await["type"], "ack");

    let both = format!("/api/v1/devices/ws?access_token={}", device.token);
    let api_key_path = format!("/api/v1/devices/ws?access_token={api_key}");
    let cases: [(&str, Headers, u16, &str); 4] = [
        ("/api/v1/devices/ws", &[], 401, "missing credentials"),
        ("/api/v1/devices/ws?access_token=wrong", &[], 401, ""),
        (&both, &[("authorization", &bearer)], 400, "given twice"),
        (&api_key_path, &[], 401, "device access token"),
    ];
    for (path, headers, expected, fragment) in cases {
        let (status, body) = open(&server, path, None, headers)
            .await
            .err()
            .unwrap_or_else(|| panic!("{path}: upgrade accepted"));
        assert_eq!(status, expected, "{path}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(fragment), "{path}: {detail}");
    }
}

#[tokio::test]
async fn device_errors_keep_socket_open() {
    let server = Server::start().await;
    let device = server.create_device("ws-errors").await;
    let mut client = open_device(&server, &device).await;

    let cases: [(Message, Value, &str); 6] = [
        (Message::text("{not json"), Value::Null, "invalid_json"),
        (
            Message::binary(vec![1, 2, 3]),
            Value::Null,
            "binary_message",
        ),
        (
            Message::text(json!({"type": "hello", "id": "a"}).to_string()),
            json!("a"),
            "invalid_message",
        ),
        (
            Message::text(json!({"type": "telemetry", "id": "b"}).to_string()),
            json!("b"),
            "invalid_message",
        ),
        (
            Message::text(json!({"type": "telemetry", "id": "c", "data": "text"}).to_string()),
            json!("c"),
            "invalid_json",
        ),
        (
            Message::text(json!({"type": "command_response", "id": 77, "result": 1}).to_string()),
            json!(77),
            "unknown_command",
        ),
    ];
    for (message, id, code) in cases {
        let description = format!("{message:?}");
        client.send(message).await.expect("send");
        let reply = next_json(&mut client).await;
        assert_eq!(reply["type"], "error", "{description}: {reply}");
        assert_eq!(reply["id"], id, "{description}: {reply}");
        assert_eq!(reply["error"], code, "{description}: {reply}");
        assert!(
            !reply["message"].as_str().unwrap_or_default().is_empty(),
            "{description}: {reply}"
        );
    }

    client
        .send(Message::text(
            json!({"type": "telemetry", "id": "ok", "data": {"after_errors": 1}}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut client).await,
        json!({"type": "ack", "id": "ok"})
    );
}

#[tokio::test]
async fn device_socket_answers_commands() {
    let server = Server::start().await;
    let device = server.create_device("ws-commands").await;
    let mut client = open_device(&server, &device).await;

    let request = tokio::spawn({
        let server_url = server.http_url.clone();
        let token = server.admin_token().await;
        let device_id = device.id.clone();
        async move {
            let response = reqwest::Client::new()
                .post(format!("{server_url}/api/v1/devices/{device_id}/commands"))
                .bearer_auth(token)
                .json(&json!({"method": "setPoint", "params": {"celsius": 19}, "timeout_ms": 5000}))
                .send()
                .await
                .expect("command request");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    });

    let command = next_json(&mut client).await;
    assert_eq!(command["type"], "command", "{command}");
    assert_eq!(command["method"], "setPoint");
    assert_eq!(command["params"], json!({"celsius": 19}));
    let id = command["id"].as_u64().expect("numeric command id");

    client
        .send(Message::text(
            json!({"type": "command_response", "id": id, "result": {"applied": true}}).to_string(),
        ))
        .await
        .expect("send");
    let (status, body) = request.await.expect("request task");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["request_id"], json!(id));
    assert_eq!(body["response"], json!({"applied": true}));

    // Once the socket is closed, the device is no longer reachable.
    client.close(None).await.expect("close");
    drop(client);
    let unreachable = wait_until(
        || async {
            let (status, _) = post_command(
                &server,
                &device,
                json!({"method": "ping", "timeout_ms": 100}),
            )
            .await;
            status == 409
        },
        WAIT,
    )
    .await;
    assert!(unreachable, "commands still reach a closed socket");
}

#[tokio::test]
async fn device_silent_socket_times_out() {
    let server = Server::start_with_env(&[
        ("FERRITE_WEBSOCKET_PING_INTERVAL", "200ms"),
        ("FERRITE_WEBSOCKET_IDLE_TIMEOUT", "1s"),
    ])
    .await;
    let device = server.create_device("ws-idle").await;
    let mut answering = open_device(&server, &device).await;
    let silent = open_device(&server, &device).await;

    // A client that reads gets the pings and replies with pongs, so it
    // stays open. The silent one never reads, so it never sends a pong.
    let started = Instant::now();
    let pings = tokio::time::timeout(Duration::from_millis(2500), async {
        let mut pings = 0;
        while let Some(Ok(message)) = answering.next().await {
            if matches!(message, Message::Ping(_)) {
                pings += 1;
            }
        }
        pings
    })
    .await;
    assert!(pings.is_err(), "the answering socket was closed: {pings:?}");
    assert!(started.elapsed() >= Duration::from_secs(2));

    // Reading now makes the client send pongs for the old pings on a
    // socket that the server has closed. That may reset the connection
    // before the close frame is read, so the metric shows why it closed.
    let counted = metric_value(
        &server,
        "ferrite_websocket_device_disconnects_total{reason=\"idle_timeout\"}",
    )
    .await;
    assert_eq!(counted, Some(1.0));
    let mut silent = silent;
    loop {
        match next_message(&mut silent).await {
            Some(Message::Close(Some(frame))) => {
                assert_eq!(frame.code, CloseCode::Away);
                assert!(frame.reason.contains("idle"), "{}", frame.reason);
                break;
            }
            None => break,
            Some(_) => {}
        }
    }
}

#[tokio::test]
async fn device_that_never_reads_is_closed_alone() {
    let server = Server::start_with_env(&[("FERRITE_WEBSOCKET_MAX_OUTGOING_MESSAGES", "4")]).await;
    let slow_device = server.create_device("ws-slow").await;
    let other_device = server.create_device("ws-other").await;

    // A small receive buffer, so that the server's writes block soon.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let stream = socket.connect(server.http_addr).await.expect("connect");
    let request = format!(
        "ws://{}/api/v1/devices/ws?access_token={}",
        server.http_addr, slow_device.token
    );
    let (slow, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("device WebSocket upgrade");
    let mut other = open_device(&server, &other_device).await;

    // Commands of 60 KiB each, which the slow client never reads. Bounded:
    // at most 400 commands, 16 at a time.
    let params = json!({"blob": "x".repeat(60 * 1024)});
    let mut closed = false;
    for _batch in 0..25 {
        let requests = (0..16).map(|_| {
            post_command(
                &server,
                &slow_device,
                json!({"method": "fill", "params": params, "timeout_ms": 100}),
            )
        });
        let results = futures::future::join_all(requests).await;
        if results.iter().any(|(status, _)| *status == 409) {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "the socket of a client that never reads stayed open"
    );
    let counted = metric_value(
        &server,
        "ferrite_websocket_device_disconnects_total{reason=\"slow_client\"}",
    )
    .await;
    assert_eq!(counted, Some(1.0));
    drop(slow);

    other
        .send(Message::text(
            json!({"type": "telemetry", "id": "still", "data": {"v": 1}}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut other).await,
        json!({"type": "ack", "id": "still"})
    );
}

#[tokio::test]
async fn shutdown_closes_both_socket_kinds() {
    let mut server = Server::start().await;
    let device = server.create_device("ws-shutdown").await;
    let mut device_socket = open_device(&server, &device).await;
    let mut mqtt = open_mqtt(&server).await;
    mqtt.send(Message::binary(connect_packet(
        "ws-shutdown",
        &device.token,
    )))
    .await
    .expect("send");
    read_bytes(&mut mqtt, 4).await;

    let terminate = tokio::task::spawn_blocking(move || {
        server.terminate();
        server
    });

    let (code, reason) = expect_close(&mut device_socket).await;
    assert_eq!(code, CloseCode::Away);
    assert!(reason.contains("shutting down"), "{reason}");
    // MQTT 3.1.1 has no DISCONNECT from the server; the close frame follows.
    let (code, _) = expect_close(&mut mqtt).await;
    assert_eq!(code, CloseCode::Normal);
    let _server = terminate.await.expect("server stopped");
}

#[tokio::test]
async fn sockets_outlive_http_request_timeout() {
    let server = Server::start_with_env(&[("FERRITE_HTTP_REQUEST_TIMEOUT", "1s")]).await;
    let device = server.create_device("ws-long").await;
    let mut device_socket = open_device(&server, &device).await;
    let mut mqtt = open_mqtt(&server).await;
    mqtt.send(Message::binary(connect_packet("ws-long", &device.token)))
        .await
        .expect("send");
    read_bytes(&mut mqtt, 4).await;

    tokio::time::sleep(Duration::from_millis(2500)).await;

    device_socket
        .send(Message::text(
            json!({"type": "telemetry", "id": "late", "data": {"late": 1}}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(
        next_json(&mut device_socket).await,
        json!({"type": "ack", "id": "late"})
    );
    mqtt.send(Message::binary(vec![0xC0, 0x00]))
        .await
        .expect("send PINGREQ");
    assert_eq!(read_bytes(&mut mqtt, 2).await, [0xD0, 0x00]);
}

#[tokio::test]
async fn device_socket_limit_rejects_with_503() {
    let server = Server::start_with_env(&[("FERRITE_WEBSOCKET_MAX_CONNECTIONS", "1")]).await;
    let device = server.create_device("ws-max").await;
    let path = format!("/api/v1/devices/ws?access_token={}", device.token);
    let mut first = open_device(&server, &device).await;

    let (status, body) = open(&server, &path, None, &[])
        .await
        .expect_err("second socket rejected");
    assert_eq!(status, 503, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("websocket.max_connections"), "{detail}");

    first.close(None).await.expect("close");
    drop(first);
    let reopened = wait_until(
        || async { open(&server, &path, None, &[]).await.is_ok() },
        WAIT,
    )
    .await;
    assert!(reopened, "the slot of a closed socket was not returned");
}
