//! Live streams of the real binary: a WebSocket client (tokio-tungstenite)
//! and an SSE stream read with reqwest, fed by telemetry sent over MQTT and
//! HTTP.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::support::{Server, TestDevice};

/// Maximum wait for one expected message.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(10);

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn try_connect(
    server: &Server,
    query: &str,
    token: Option<&str>,
) -> Result<Client, tungstenite::Error> {
    let mut request = format!("ws://{}/api/v1/live/ws{query}", server.http_addr)
        .into_client_request()
        .expect("request");
    if let Some(token) = token {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(client, _)| client)
}

async fn connect(server: &Server, query: &str) -> Client {
    let token = server.admin_token().await;
    try_connect(server, query, Some(&token))
        .await
        .expect("WebSocket connection")
}

/// Returns the next text message as JSON, skipping pings and pongs.
async fn next_json(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(RECEIVE_TIMEOUT, client.next())
            .await
            .expect("a message within the timeout")
            .expect("an open stream")
            .expect("a valid message");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

async fn get_sse(server: &Server, query: &str, token: Option<&str>) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().get(format!("{}/api/v1/live/sse{query}", server.http_url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("SSE request")
}

/// Reads `event:` and `data:` pairs from an SSE body, skipping comments.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(server: &Server, query: &str) -> SseReader {
        let token = server.admin_token().await;
        let response = get_sse(server, query, Some(&token)).await;
        assert_eq!(response.status(), 200);
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// Returns (event name, data as JSON), or `None` when the body ends.
    async fn next_event(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = None;
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("event: ") {
                        name = value.to_owned();
                    } else if let Some(value) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(value).expect("JSON data"));
                    }
                }
                if let Some(data) = data {
                    return Some((name, data));
                }
                continue;
            }
            let chunk = tokio::time::timeout(RECEIVE_TIMEOUT, self.response.chunk())
                .await
                .expect("SSE data within the timeout")
                .expect("SSE body")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }
}

async fn post_telemetry(server: &Server, device: &TestDevice, body: Value) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/{}/telemetry",
            server.http_url, device.token
        ))
        .json(&body)
        .send()
        .await
        .expect("telemetry request");
    assert_eq!(response.status(), 200, "telemetry was not accepted");
}

/// Publishes one QoS 1 message and waits for its PUBACK.
async fn publish_mqtt(server: &Server, device: &TestDevice, payload: Value) {
    let mut options = rumqttc::MqttOptions::new(
        format!("live-{}", &device.id[..8]),
        "127.0.0.1",
        server.mqtt_addr.port(),
    );
    options.set_credentials(device.token.clone(), "");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    client
        .publish(
            "v1/devices/me/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            payload.to_string(),
        )
        .await
        .expect("queue publish");
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("PUBACK within the timeout")
            .expect("MQTT connection");
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = event {
            break;
        }
    }
    let _ = client.disconnect().await;
}

/// Signs an access token for a tenant that is not the server's, with the
/// server's own signing key: valid credentials of another tenant.
pub(crate) fn other_tenant_token(server: &Server) -> String {
    let key = std::fs::read(server.data_dir.join("jwt.key")).expect("signing key");
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": "ferrite",
        "aud": "ferrite-api",
        "sub": uuid::Uuid::new_v4().to_string(),
        "jti": uuid::Uuid::new_v4().to_string(),
        "tenant": uuid::Uuid::new_v4().to_string(),
        "role": "admin",
        "kind": "user",
        "iat": now,
        "exp": now + 600,
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some("at+jwt".to_owned());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&key).expect("signing key"),
    )
    .expect("token")
}

#[tokio::test]
async fn credentials_are_required() {
    let server = Server::start().await;
    let device = server.create_device("sensor").await;
    let cases = [
        (None, 401),
        (Some("fak_not-a-key".to_owned()), 401),
        (Some("not.a.jwt".to_owned()), 401),
        (Some(device.token.clone()), 403),
    ];
    for (token, expected) in cases {
        let response = get_sse(&server, "", token.as_deref()).await;
        assert_eq!(response.status(), expected, "SSE with {token:?}");
        let body: Value = response.json().await.expect("problem JSON");
        assert_eq!(body["status"], expected, "{body}");

        match try_connect(&server, "", token.as_deref()).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), expected, "WebSocket with {token:?}");
            }
            other => panic!("WebSocket with {token:?}: expected {expected}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn access_token_parameter_authenticates() {
    let server = Server::start().await;
    let token = server.admin_token().await;
    let response = get_sse(&server, &format!("?access_token={token}"), None).await;
    assert_eq!(response.status(), 200);
    try_connect(&server, &format!("?access_token={token}"), None)
        .await
        .expect("WebSocket with access_token");
}

#[tokio::test]
async fn bad_filter_gets_400() {
    let server = Server::start().await;
    let token = server.admin_token().await;
    for (query, param) in [
        ("?device=sensor", "device"),
        ("?key=a*b", "key"),
        ("?events=metrics", "events"),
        ("?since=0", "query"),
    ] {
        let response = get_sse(&server, query, Some(&token)).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.expect("problem JSON");
        assert_eq!(body["param"], param, "{query}: {body}");
    }
}

#[tokio::test]
async fn mqtt_publish_reaches_websocket() {
    let server = Server::start().await;
    let device = server.create_device("pump-1").await;
    let mut client = connect(&server, "").await;

    publish_mqtt(
        &server,
        &device,
        json!({"temperature": 21.5, "running": true}),
    )
    .await;

    let message = next_json(&mut client).await;
    assert_eq!(message["type"], "telemetry", "{message}");
    assert_eq!(message["device_id"], device.id, "{message}");
    assert_eq!(message["device_name"], "pump-1");
    assert!(message["received_at"].is_string(), "{message}");
    let points = message["points"].as_array().expect("points");
    let value_of = |key: &str| {
        points
            .iter()
            .find(|point| point["key"] == key)
            .map(|point| point["value"].clone())
    };
    assert_eq!(value_of("temperature"), Some(json!(21.5)), "{message}");
    assert_eq!(value_of("running"), Some(json!(true)), "{message}");
}

#[tokio::test]
async fn http_publish_reaches_sse_with_filters() {
    let server = Server::start().await;
    let wanted = server.create_device("pump-1").await;
    let other = server.create_device("pump-2").await;
    let mut reader = SseReader::open(&server, &format!("?device={}&key=temp*", wanted.id)).await;

    post_telemetry(&server, &other, json!({"temperature": 1})).await;
    post_telemetry(&server, &wanted, json!({"humidity": 40})).await;
    post_telemetry(&server, &wanted, json!({"humidity": 41, "temperature": 22})).await;

    let (name, message) = reader.next_event().await.expect("an event");
    assert_eq!(name, "telemetry");
    assert_eq!(message["device_id"], wanted.id, "{message}");
    let keys: Vec<&str> = message["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|point| point["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["temperature"], "{message}");
}

#[tokio::test]
async fn other_tenant_sees_nothing() {
    let server = Server::start().await;
    let device = server.create_device("pump-1").await;
    let foreign = other_tenant_token(&server);
    let mut foreign_client = try_connect(&server, "", Some(&foreign))
        .await
        .expect("a valid token of another tenant connects");
    let mut own_client = connect(&server, "").await;

    post_telemetry(&server, &device, json!({"temperature": 20})).await;
    // The bus hands every event to all streams at once, so once the own
    // tenant's stream has it, the other stream has had its chance too.
    assert_eq!(next_json(&mut own_client).await["device_id"], device.id);
    let leaked = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match foreign_client.next().await {
                Some(Ok(Message::Text(text))) => return text,
                Some(Ok(_)) => {}
                other => panic!("the other tenant's stream ended: {other:?}"),
            }
        }
    })
    .await;
    assert!(leaked.is_err(), "another tenant received {leaked:?}");
}

#[tokio::test]
async fn subscribe_message_changes_filter() {
    let server = Server::start().await;
    let first = server.create_device("pump-1").await;
    let second = server.create_device("pump-2").await;
    let mut client = connect(&server, &format!("?device={}", first.id)).await;

    client
        .send(Message::text(
            json!({"subscribe": {"device": [second.id.clone()]}}).to_string(),
        ))
        .await
        .expect("send");
    let reply = next_json(&mut client).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");

    post_telemetry(&server, &first, json!({"temperature": 1})).await;
    post_telemetry(&server, &second, json!({"temperature": 2})).await;
    assert_eq!(next_json(&mut client).await["device_id"], second.id);
}

#[tokio::test]
async fn sigterm_ends_open_streams() {
    let mut server = Server::start().await;
    let mut client = connect(&server, "").await;
    let mut reader = SseReader::open(&server, "").await;

    let started = std::time::Instant::now();
    server.terminate();
    // The HTTP listener waits up to 30 s for open requests at shutdown.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?} with open streams",
        started.elapsed()
    );
    match tokio::time::timeout(RECEIVE_TIMEOUT, client.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected close code 1001, got {other:?}"),
    }
    assert!(reader.next_event().await.is_none(), "the SSE body ends");
}
