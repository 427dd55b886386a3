//! Revocation as a black box: a credential is taken away through the REST
//! API while a client has an open connection, and the connection must
//! end within [`END_WITHIN`] on every protocol: MQTT 5 (DISCONNECT 0x87),
//! MQTT 3.1.1 (closed), the device WebSocket and live streams (close code
//! 1008, SSE by ending), CoAP observations (a 4.01 notification) and DTLS
//! sessions (close_notify). The periodic re-check stays at its default of
//! 30 s in these tests, so only the revocation events can end the
//! connections in time.
//!
//! Also: token rotation with a grace period, the credential listing and the
//! revocation of every credential of a device at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use futures::StreamExt;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet as Packet5};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{Server, TestDevice};

/// Maximum time from the revoking API call to the end of the connection.
const END_WITHIN: Duration = Duration::from_secs(1);
/// Maximum wait for a connection to open or a first message.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Sends a REST request with the admin token; returns status and JSON body.
async fn api(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = server.admin_token().await;
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http_url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("REST request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("response body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Rotates the device's token with `grace_seconds`; returns the new token.
async fn rotate(server: &Server, device: &TestDevice, grace_seconds: u64) -> String {
    let (status, body) = api(
        server,
        reqwest::Method::POST,
        &format!("/api/v1/devices/{}/token", device.id),
        Some(json!({"grace_seconds": grace_seconds})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

/// Posts one telemetry message with `token`; returns the HTTP status.
async fn post_telemetry(server: &Server, device: &TestDevice, token: &str) -> u16 {
    reqwest::Client::new()
        .post(format!(
            "{}/api/v1/devices/{}/telemetry",
            server.http_url, device.id
        ))
        .bearer_auth(token)
        .json(&json!({"temperature": 21.5}))
        .send()
        .await
        .expect("telemetry request")
        .status()
        .as_u16()
}

/// Connects an MQTT 5 client and waits for its CONNACK.
async fn connect_v5(
    server: &Server,
    client_id: &str,
    user: &str,
) -> (v5::AsyncClient, v5::EventLoop) {
    let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(user, "");
    options.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = v5::AsyncClient::new(options, 16);
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("CONNACK in time")
            .expect("MQTT 5 connection");
        if let v5::Event::Incoming(Packet5::ConnAck(_)) = event {
            return (client, eventloop);
        }
    }
}

/// Returns the reason code of the server's DISCONNECT if the connection
/// ends within `wait`, `Some(None)` if it ends without one, and `None` if
/// it stays open.
async fn v5_end(
    eventloop: &mut v5::EventLoop,
    wait: Duration,
) -> Option<Option<DisconnectReasonCode>> {
    let deadline = Instant::now() + wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(event) = tokio::time::timeout(remaining, eventloop.poll()).await else {
            return None;
        };
        match event {
            Ok(v5::Event::Incoming(Packet5::Disconnect(disconnect))) => {
                return Some(Some(disconnect.reason_code));
            }
            Ok(_) => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => return Some(Some(reason_code)),
            Err(_) => return Some(None),
        }
    }
}

/// Asserts that an MQTT 5 connection ends with 0x87 within [`END_WITHIN`].
async fn assert_v5_not_authorized(eventloop: &mut v5::EventLoop, context: &str) {
    let started = Instant::now();
    let end = v5_end(eventloop, END_WITHIN).await;
    assert_eq!(
        end,
        Some(Some(DisconnectReasonCode::NotAuthorized)),
        "{context}: expected DISCONNECT 0x87 within {END_WITHIN:?}, waited {:?}",
        started.elapsed()
    );
}

/// Opens a WebSocket at `path` (with its query) on the HTTP listener.
async fn open_websocket(
    server: &Server,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let request = format!("ws://{}{path}", server.http_addr)
        .into_client_request()
        .expect("WebSocket request");
    let (socket, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("WebSocket opened in time")
        .expect("WebSocket upgrade");
    socket
}

/// Reads until a close frame; returns its code and reason, or `None` when
/// nothing closes the socket within `wait`.
async fn close_frame<S>(socket: &mut S, wait: Duration) -> Option<(u16, String)>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = Instant::now() + wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, socket.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return Some((u16::from(frame.code), frame.reason.to_string()));
            }
            Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) => {
                return Some((0, String::new()));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn create_api_key(server: &Server, name: &str, role: &str) -> (String, String) {
    let (status, body) = api(
        server,
        reqwest::Method::POST,
        "/api/v1/api-keys",
        Some(json!({"name": name, "role": role})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().expect("id").to_owned(),
        body["key"].as_str().expect("key").to_owned(),
    )
}

// ---------------------------------------------------------------------------
// MQTT
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mqtt5_session_ends_on_token_rotation() {
    let server = Server::start().await;
    let device = server.create_device("rotated-mqtt5").await;
    let other = server.create_device("untouched-mqtt5").await;
    let (_client, mut eventloop) = connect_v5(&server, "rotated-mqtt5", &device.token).await;
    let (_other_client, mut other_loop) =
        connect_v5(&server, "untouched-mqtt5", &other.token).await;

    let new_token = rotate(&server, &device, 0).await;
    assert_v5_not_authorized(&mut eventloop, "rotated token").await;
    assert_eq!(
        v5_end(&mut other_loop, Duration::from_millis(300)).await,
        None,
        "another device's session ended"
    );

    assert_eq!(post_telemetry(&server, &device, &device.token).await, 401);
    assert_eq!(post_telemetry(&server, &device, &new_token).await, 200);
    let (_client, _eventloop) = connect_v5(&server, "rotated-mqtt5", &new_token).await;
}

#[tokio::test]
async fn mqtt311_connection_closes_on_device_delete() {
    let server = Server::start().await;
    let device = server.create_device("deleted-mqtt311").await;
    let mut options =
        rumqttc::MqttOptions::new("deleted-mqtt311", "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(&device.token, "");
    options.set_keep_alive(Duration::from_secs(60));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    loop {
        let event = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("CONNACK in time")
            .expect("MQTT 3.1.1 connection");
        if let rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)) = event {
            break;
        }
    }

    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/devices/{}", device.id),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let started = Instant::now();
    let ended = loop {
        let remaining = END_WITHIN.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, eventloop.poll()).await {
            Err(_) => break false,
            Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
    };
    assert!(
        ended,
        "MQTT 3.1.1 connection still open {:?} after the device was deleted",
        started.elapsed()
    );
}

#[tokio::test]
async fn mqtt_application_ends_on_api_key_revoke() {
    let server = Server::start().await;
    let (key_id, key) = create_api_key(&server, "revoked-app", "operator").await;
    let (_other_id, other_key) = create_api_key(&server, "kept-app", "viewer").await;
    let (_client, mut eventloop) = connect_v5(&server, "revoked-app", &key).await;
    let (_other, mut other_loop) = connect_v5(&server, "kept-app", &other_key).await;

    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/api-keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert_v5_not_authorized(&mut eventloop, "revoked API key").await;
    assert_eq!(
        v5_end(&mut other_loop, Duration::from_millis(300)).await,
        None,
        "another key's session ended"
    );
}

// ---------------------------------------------------------------------------
// WebSockets and live streams
// ---------------------------------------------------------------------------

#[tokio::test]
async fn device_websocket_closes_with_1008() {
    let server = Server::start().await;
    let device = server.create_device("rotated-websocket").await;
    let mut socket = open_websocket(
        &server,
        &format!("/api/v1/devices/ws?access_token={}", device.token),
    )
    .await;

    rotate(&server, &device, 0).await;
    let started = Instant::now();
    let frame = close_frame(&mut socket, END_WITHIN).await;
    let (code, reason) = frame.unwrap_or_else(|| {
        panic!(
            "device WebSocket still open {:?} after the rotation",
            started.elapsed()
        )
    });
    assert_eq!(code, 1008, "close code, reason {reason:?}");
    assert!(reason.contains("revoked"), "{reason}");
}

#[tokio::test]
async fn mqtt_over_websocket_ends_on_device_delete() {
    let server = Server::start().await;
    let device = server.create_device("deleted-ws-mqtt").await;
    let mut request = format!("ws://{}/mqtt", server.http_addr)
        .into_client_request()
        .expect("WebSocket request");
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "mqtt".parse().expect("header value"),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket upgrade");

    // MQTT 5 CONNECT with the token as user name, keep alive 60 s.
    let token = device.token.as_bytes();
    let client_id = b"ws-revoked";
    let mut variable = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x82, 0, 60, 0];
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id);
    variable.extend_from_slice(&(token.len() as u16).to_be_bytes());
    variable.extend_from_slice(token);
    let mut connect = vec![0x10];
    let mut length = variable.len();
    loop {
        let mut byte = (length % 128) as u8;
        length /= 128;
        if length > 0 {
            byte |= 0x80;
        }
        connect.push(byte);
        if length == 0 {
            break;
        }
    }
    connect.extend_from_slice(&variable);
    futures::SinkExt::send(&mut socket, Message::binary(connect))
        .await
        .expect("send CONNECT");
    let connack = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("CONNACK in time");
    let Some(Ok(Message::Binary(connack))) = connack else {
        panic!("expected CONNACK, got {connack:?}");
    };
    assert_eq!(connack[0], 0x20, "CONNACK");
    assert_eq!(connack[3], 0x00, "CONNACK reason code");

    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/devices/{}", device.id),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let started = Instant::now();
    let disconnect = loop {
        let remaining = END_WITHIN.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, socket.next()).await {
            Err(_) => panic!(
                "MQTT over WebSocket still open {:?} after the delete",
                started.elapsed()
            ),
            Ok(Some(Ok(Message::Binary(bytes)))) if bytes.first() == Some(&0xE0) => break bytes,
            Ok(Some(Ok(_))) => {}
            Ok(other) => panic!("connection ended without DISCONNECT: {other:?}"),
        }
    };
    assert_eq!(disconnect[2], 0x87, "DISCONNECT reason code");
}

#[tokio::test]
async fn live_streams_end_on_api_key_revoke() {
    let server = Server::start().await;
    let (key_id, key) = create_api_key(&server, "live-viewer", "viewer").await;
    let mut socket = open_websocket(&server, &format!("/api/v1/live/ws?access_token={key}")).await;
    let sse = reqwest::Client::new()
        .get(format!("{}/api/v1/live/sse", server.http_url))
        .bearer_auth(&key)
        .send()
        .await
        .expect("SSE request");
    assert_eq!(sse.status(), 200);
    let mut sse = sse;

    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/api-keys/{key_id}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let started = Instant::now();
    let frame = close_frame(&mut socket, END_WITHIN).await;
    let (code, reason) = frame.unwrap_or_else(|| {
        panic!(
            "live WebSocket still open {:?} after the revoke",
            started.elapsed()
        )
    });
    assert_eq!(code, 1008, "close code, reason {reason:?}");

    let sse_ended = loop {
        let remaining = END_WITHIN.saturating_sub(started.elapsed());
        match tokio::time::timeout(remaining, sse.chunk()).await {
            Err(_) => break false,
            Ok(Ok(None)) | Ok(Err(_)) => break true,
            Ok(Ok(Some(_))) => {}
        }
    };
    assert!(
        sse_ended,
        "live SSE stream still open {:?} after the revoke",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// CoAP and DTLS
// ---------------------------------------------------------------------------

/// Registers an observer of the device's attributes over plain CoAP and
/// returns the socket after the 2.05 registration response.
async fn observe_attributes(server: &Server, token: &str) -> tokio::net::UdpSocket {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    socket.connect(server.coap_addr).await.expect("connect");
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Get);
    packet.header.message_id = 0x2001;
    packet.set_token(vec![0xAB, 0xCD]);
    packet.add_option(CoapOption::Observe, vec![]);
    for segment in ["api", "v1", token, "attributes"] {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    socket
        .send(&packet.to_bytes().expect("encode"))
        .await
        .expect("send");
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
        .await
        .expect("registration response in time")
        .expect("receive");
    let reply = Packet::from_bytes(&buffer[..length]).expect("CoAP");
    assert_eq!(
        reply.header.code.to_string(),
        "2.05",
        "registration response"
    );
    assert!(
        reply.get_observe_value().is_some(),
        "registration response without Observe"
    );
    socket
}

#[tokio::test]
async fn coap_observation_ends_with_401_on_rotation() {
    let server = Server::start().await;
    let device = server.create_device("rotated-coap").await;
    let socket = observe_attributes(&server, &device.token).await;

    rotate(&server, &device, 0).await;
    let started = Instant::now();
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(END_WITHIN, socket.recv(&mut buffer))
        .await
        .unwrap_or_else(|_| panic!("no notification {:?} after the rotation", started.elapsed()))
        .expect("receive");
    let notification = Packet::from_bytes(&buffer[..length]).expect("CoAP");
    assert_eq!(notification.header.code.to_string(), "4.01");
    assert_eq!(notification.get_token(), &[0xAB, 0xCD]);
}

/// A connected UDP socket as the blocking stream of an OpenSSL client.
#[derive(Debug)]
struct UdpStream(UdpSocket);

impl Read for UdpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for UdpStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a DTLS session with a PSK; blocking, so run on a thread.
fn dtls_psk_session(
    server: SocketAddr,
    identity: &str,
    key: &[u8],
) -> openssl::ssl::SslStream<UdpStream> {
    use openssl::ssl::{Ssl, SslContextBuilder, SslMethod, SslVerifyMode};

    let mut builder = SslContextBuilder::new(SslMethod::dtls()).expect("DTLS context");
    builder.set_verify(SslVerifyMode::NONE);
    builder
        .set_cipher_list("PSK-AES128-CCM8")
        .expect("cipher list");
    let identity = identity.to_owned();
    let key = key.to_vec();
    builder.set_psk_client_callback(move |_, _, identity_out, key_out| {
        identity_out[..identity.len()].copy_from_slice(identity.as_bytes());
        identity_out[identity.len()] = 0;
        key_out[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let context = builder.build();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(server).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    Ssl::new(&context)
        .expect("SSL")
        .connect(UdpStream(socket))
        .unwrap_or_else(|error| panic!("DTLS handshake failed: {error:?}"))
}

#[tokio::test]
async fn dtls_session_closes_on_psk_delete() {
    let server = Server::start().await;
    let device = server.create_device("revoked-dtls").await;
    let key = [0x42u8; 16];
    let (status, body) = api(
        &server,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{}/credentials/psk", device.id),
        Some(json!({"identity": "revoked-dtls-identity", "key": hex::encode(key)})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let coaps = server.coaps_addr;
    let mut session =
        tokio::task::spawn_blocking(move || dtls_psk_session(coaps, "revoked-dtls-identity", &key))
            .await
            .expect("handshake thread");
    session
        .get_ref()
        .0
        .set_read_timeout(Some(END_WITHIN))
        .expect("read timeout");

    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/devices/{}/credentials/psk", device.id),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let started = Instant::now();
    let closed = tokio::task::spawn_blocking(move || {
        let mut buffer = [0u8; 1024];
        match session.ssl_read(&mut buffer) {
            Err(error) => error.code() == openssl::ssl::ErrorCode::ZERO_RETURN,
            Ok(_) => false,
        }
    })
    .await
    .expect("read thread");
    assert!(
        closed,
        "no close_notify {:?} after the PSK was deleted",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// Rotation with a grace period, listing, revocation of every credential
// ---------------------------------------------------------------------------

#[tokio::test]
async fn rotation_grace_keeps_old_token() {
    let server = Server::start().await;
    let device = server.create_device("graceful").await;
    let (_client, mut eventloop) = connect_v5(&server, "graceful", &device.token).await;

    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        &format!("/api/v1/devices/{}/token", device.id),
        Some(json!({"grace_seconds": 2})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["old_token_expires_at"].is_i64(), "{body}");
    let new_token = body["token"].as_str().expect("token").to_owned();
    let rotated_at = Instant::now();

    // Both tokens work during the grace period.
    assert_eq!(post_telemetry(&server, &device, &device.token).await, 200);
    assert_eq!(post_telemetry(&server, &device, &new_token).await, 200);
    let (status, listed) = api(
        &server,
        reqwest::Method::GET,
        &format!("/api/v1/devices/{}/credentials", device.id),
        None,
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    assert_eq!(
        v5_end(&mut eventloop, Duration::from_millis(1200)).await,
        None,
        "session ended during the grace period"
    );

    // The old token's session ends when the period does.
    let remaining = Duration::from_secs(2).saturating_sub(rotated_at.elapsed());
    assert_v5_not_authorized_within(&mut eventloop, remaining + END_WITHIN).await;
    assert_eq!(post_telemetry(&server, &device, &device.token).await, 401);
    assert_eq!(post_telemetry(&server, &device, &new_token).await, 200);

    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        &format!("/api/v1/devices/{}/token", device.id),
        Some(json!({"grace_seconds": 8 * 24 * 3600})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "grace_seconds", "{body}");
}

async fn assert_v5_not_authorized_within(eventloop: &mut v5::EventLoop, wait: Duration) {
    let end = v5_end(eventloop, wait).await;
    assert_eq!(
        end,
        Some(Some(DisconnectReasonCode::NotAuthorized)),
        "expected DISCONNECT 0x87 within {wait:?}"
    );
}

#[tokio::test]
async fn revoking_all_credentials_ends_every_connection() {
    let server = Server::start().await;
    let device = server.create_device("compromised").await;
    let (_client, mut eventloop) = connect_v5(&server, "compromised", &device.token).await;
    let mut socket = open_websocket(
        &server,
        &format!("/api/v1/devices/ws?access_token={}", device.token),
    )
    .await;
    let path = format!("/api/v1/devices/{}/credentials", device.id);
    let (status, body) = api(
        &server,
        reqwest::Method::PUT,
        &format!("{path}/psk"),
        Some(
            json!({"identity": "compromised-identity", "key": "00112233445566778899aabbccddeeff"}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, listed) = api(&server, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["tokens"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    assert_eq!(
        listed["pre_shared_key"]["identity"], "compromised-identity",
        "{listed}"
    );
    let text = listed.to_string();
    assert!(!text.contains(&device.token), "the listing shows the token");
    assert!(
        !text.contains("00112233445566778899aabbccddeeff"),
        "the listing shows the key"
    );

    let (status, revoked) = api(&server, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 200, "{revoked}");
    assert_eq!(revoked["tokens_revoked"], 1, "{revoked}");
    assert_eq!(revoked["pre_shared_key_deleted"], true, "{revoked}");
    assert_v5_not_authorized(&mut eventloop, "all credentials revoked").await;
    let frame = close_frame(&mut socket, END_WITHIN).await;
    assert_eq!(
        frame.map(|(code, _)| code),
        Some(1008),
        "device WebSocket close code"
    );
    assert_eq!(post_telemetry(&server, &device, &device.token).await, 401);

    let (status, listed) = api(&server, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["tokens"], json!([]), "{listed}");
    assert_eq!(listed["pre_shared_key"], Value::Null, "{listed}");

    // The device stays and gets a new token.
    let new_token = rotate(&server, &device, 0).await;
    assert_eq!(post_telemetry(&server, &device, &new_token).await, 200);
}
