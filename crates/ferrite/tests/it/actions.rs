//! Alarm actions and device commands over the REST API. The tests cover
//! test runs of webhooks against a receiver on 127.0.0.1, manual retries
//! and a pending delivery across a crash. They also cover publishes to the
//! Mosquitto broker on 127.0.0.1:1883 and two-way RPC with an MQTT device
//! client (`rumqttc`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

use crate::support::{Server, TestDevice};

/// Maximum wait for a delivery state, a message or a response.
const WAIT: Duration = Duration::from_secs(15);
/// The Mosquitto broker of this machine.
const MOSQUITTO_PORT: u16 = 1883;

/// A scripted response: the status code and an optional `Retry-After`.
type ScriptedStatus = (u16, Option<&'static str>);

/// A webhook receiver on 127.0.0.1 that responds to each request with the
/// next status of its script (then 200) and records the requests.
pub struct Receiver {
    pub url: String,
    pub requests: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    statuses: Arc<Mutex<Vec<ScriptedStatus>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// Starts the receiver; `statuses` are the scripted status codes with
    /// an optional `Retry-After`, in order.
    pub async fn start(statuses: Vec<ScriptedStatus>) -> Receiver {
        let requests: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let statuses = Arc::new(Mutex::new(statuses));
        let handler = {
            let requests = requests.clone();
            let statuses = statuses.clone();
            move |headers: HeaderMap, body: Bytes| {
                let requests = requests.clone();
                let statuses = statuses.clone();
                async move {
                    requests.lock().push((headers, body));
                    let next = {
                        let mut statuses = statuses.lock();
                        (!statuses.is_empty()).then(|| statuses.remove(0))
                    };
                    let (status, retry_after) = next.unwrap_or((200, None));
                    let mut response = StatusCode::from_u16(status).unwrap().into_response();
                    if let Some(seconds) = retry_after {
                        response
                            .headers_mut()
                            .insert("retry-after", seconds.parse().unwrap());
                    }
                    response
                }
            }
        };
        let app = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("receiver runs");
        });
        Receiver {
            url,
            requests,
            statuses,
            task,
        }
    }

    pub fn requests(&self) -> Vec<(HeaderMap, Bytes)> {
        self.requests.lock().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
        self.statuses.lock().clear();
    }
}

async fn post_json(server: &Server, path: &str, token: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .expect("POST request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_json(server: &Server, path: &str, token: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", server.http_url))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Runs `action` once for `device` through `POST /api/v1/actions/test` and
/// returns the recorded delivery.
async fn test_run(server: &Server, device: &TestDevice, action: Value) -> Value {
    let token = server.admin_token().await;
    let (status, body) = post_json(
        server,
        "/api/v1/actions/test",
        &token,
        &json!({"action": action, "device_id": device.id, "alarm": {"severity": "major"}}),
    )
    .await;
    assert_eq!(status, 202, "test run failed: {body}");
    body
}

/// Polls the delivery until `done` accepts it; panics with the last state
/// after [`WAIT`].
async fn wait_for_delivery(server: &Server, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let token = server.admin_token().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, delivery) =
            get_json(server, &format!("/api/v1/actions/deliveries/{id}"), &token).await;
        assert_eq!(status, 200, "delivery {id}: {delivery}");
        if done(&delivery) {
            return delivery;
        }
        assert!(
            Instant::now() < deadline,
            "delivery {id} did not reach the expected state: {delivery}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has_status(status: &'static str) -> impl Fn(&Value) -> bool {
    move |delivery| delivery["status"] == status
}

// ---------------------------------------------------------------------------
// Webhooks and the deliveries API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn webhook_test_run_is_delivered_and_listed() {
    let server = Server::start().await;
    let device = server.create_device("boiler").await;
    let receiver = Receiver::start(Vec::new()).await;

    let created = test_run(
        &server,
        &device,
        json!({"type": "webhook", "url": format!("{}?key=s3cr3t", receiver.url), "secret": "k"}),
    )
    .await;
    assert_eq!(created["kind"], "webhook");
    assert_eq!(created["event"], "alarm.raised");
    assert_eq!(created["device_id"], device.id.as_str());
    assert_eq!(created["target"], receiver.url.as_str());
    assert!(created.get("spec").is_none(), "{created}");
    assert!(created.get("payload").is_none(), "{created}");
    let id = created["id"].as_str().expect("delivery id");

    let delivery = wait_for_delivery(&server, id, has_status("succeeded")).await;
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["last_status_code"], 200);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let (headers, body) = &requests[0];
    assert_eq!(headers["x-ferrite-delivery"], id);
    assert!(headers.contains_key("x-ferrite-signature"));
    let body: Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(body["device"]["name"], "boiler");
    assert_eq!(body["alarm"]["severity"], "major");
    assert_eq!(body["alarm"]["test"], true);

    let token = server.admin_token().await;
    let (status, page) = get_json(
        &server,
        "/api/v1/actions/deliveries?status=succeeded",
        &token,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["deliveries"][0]["id"], id);
    let alarm_id = body["alarm"]["id"].as_str().expect("alarm id");
    let (_, by_alarm) = get_json(
        &server,
        &format!("/api/v1/actions/deliveries?alarm_id={alarm_id}"),
        &token,
    )
    .await;
    assert_eq!(by_alarm["deliveries"].as_array().map(Vec::len), Some(1));
    let (_, pending) = get_json(&server, "/api/v1/actions/deliveries?status=pending", &token).await;
    assert_eq!(pending["deliveries"], json!([]));
}

#[tokio::test]
async fn failed_delivery_is_retried_by_hand() {
    let server = Server::start().await;
    let device = server.create_device("pump").await;
    let receiver = Receiver::start(vec![(400, None)]).await;
    let created = test_run(
        &server,
        &device,
        json!({"type": "webhook", "url": receiver.url}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();

    let failed = wait_for_delivery(&server, &id, has_status("failed")).await;
    assert_eq!(failed["last_status_code"], 400);
    assert!(
        failed["last_error"].as_str().unwrap().contains("400"),
        "{failed}"
    );
    let token = server.admin_token().await;
    let (_, listed) = get_json(&server, "/api/v1/actions/deliveries?status=failed", &token).await;
    assert_eq!(listed["deliveries"][0]["id"], id.as_str());

    let (status, restarted) = post_json(
        &server,
        &format!("/api/v1/actions/deliveries/{id}/retry"),
        &token,
        &json!(null),
    )
    .await;
    assert_eq!(status, 202, "{restarted}");
    assert_eq!(restarted["attempts"], 0);
    let delivered = wait_for_delivery(&server, &id, has_status("succeeded")).await;
    assert_eq!(delivered["attempts"], 1);
    assert_eq!(receiver.requests().len(), 2);
}

#[tokio::test]
async fn pending_delivery_is_sent_after_a_crash() {
    let mut server = Server::start().await;
    let device = server.create_device("chiller").await;
    // The first attempt gets 503 and a retry in 2 s; the server is killed
    // before that.
    let receiver = Receiver::start(vec![(503, Some("2"))]).await;
    let created = test_run(
        &server,
        &device,
        json!({"type": "webhook", "url": receiver.url}),
    )
    .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let pending = wait_for_delivery(&server, &id, |delivery| delivery["attempts"] == 1).await;
    assert_eq!(pending["status"], "pending");

    server.restart().await;
    let delivered = wait_for_delivery(&server, &id, has_status("succeeded")).await;
    assert_eq!(delivered["attempts"], 2);
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].0["x-ferrite-delivery"],
        requests[1].0["x-ferrite-delivery"]
    );
}

#[tokio::test]
async fn deliveries_api_rejects_mistakes() {
    let server = Server::start().await;
    let device = server.create_device("valve").await;
    let admin = server.admin_token().await;
    let viewer = server.create_api_key("dashboard", "viewer");

    let (status, body) = get_json(&server, "/api/v1/actions/deliveries", &viewer).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = post_json(
        &server,
        "/api/v1/actions/test",
        &viewer,
        &json!({"action": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "device_id": device.id}),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    let bad_queries = [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=abc", "limit"),
        ("alarm_id=42", "alarm_id"),
        ("before=x", "before"),
        ("colour=red", "query"),
    ];
    for (query, param) in bad_queries {
        let (status, body) = get_json(
            &server,
            &format!("/api/v1/actions/deliveries?{query}"),
            &admin,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["param"], param, "{query}: {body}");
    }

    let (status, body) = get_json(
        &server,
        "/api/v1/actions/deliveries/0190a5d6-0000-7000-8000-000000000000",
        &admin,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post_json(
        &server,
        "/api/v1/actions/deliveries/not-an-id/retry",
        &admin,
        &json!(null),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    let bad_actions = [
        (json!({"type": "webhook", "url": "ftp://x"}), "scheme"),
        (json!({"type": "webhook"}), "url"),
        (json!({"type": "sms", "to": "+1"}), "sms"),
        (json!({"type": "mqtt_publish", "topic": "a/#"}), "wildcard"),
        (json!({"type": "command", "method": "x", "qos": 1}), "qos"),
    ];
    for (action, fragment) in bad_actions {
        let (status, body) = post_json(
            &server,
            "/api/v1/actions/test",
            &admin,
            &json!({"action": action, "device_id": device.id}),
        )
        .await;
        assert_eq!(status, 400, "{action}: {body}");
        assert_eq!(body["param"], "action", "{action}: {body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(fragment), "{action}: {body}");
    }
    let (status, body) = post_json(
        &server,
        "/api/v1/actions/test",
        &admin,
        &json!({"action": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "device_id": "0190a5d6-0000-7000-8000-000000000000"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
}

// ---------------------------------------------------------------------------
// MQTT: the external broker and device commands
// ---------------------------------------------------------------------------

/// Connects a client and waits for CONNACK; returns the client and a
/// channel of received publishes (topic, payload).
async fn mqtt_client(
    client_id: &str,
    port: u16,
    token: Option<&str>,
    subscribe: Option<&str>,
) -> (
    AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    if let Some(token) = token {
        options.set_credentials(token, "");
    }
    let (client, mut eventloop) = AsyncClient::new(options, 16);

    // The client counts as ready at CONNACK, or at SUBACK when it subscribes.
    let (connected, connected_rx) = tokio::sync::oneshot::channel();
    let (messages, messages_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut connected = Some(connected);
    let mut subscribed = subscribe.map(|_| ());
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if subscribed.is_none() => {
                    if let Some(connected) = connected.take() {
                        let _ = connected.send(());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed = None;
                    if let Some(connected) = connected.take() {
                        let _ = connected.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let _ = messages.send((publish.topic.clone(), publish.payload.clone()));
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });

    if let Some(filter) = subscribe {
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
    }
    tokio::time::timeout(WAIT, connected_rx)
        .await
        .expect("timed out connecting the MQTT client")
        .expect("MQTT client connected");
    (client, messages_rx)
}

async fn next_message(
    messages: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
) -> (String, Bytes) {
    tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("timed out waiting for an MQTT message")
        .expect("MQTT client running")
}

#[tokio::test]
async fn mqtt_publish_reaches_mosquitto() {
    let server = Server::start_with_env(&[(
        "FERRITE_ACTIONS_MQTT_URL",
        &format!("mqtt://127.0.0.1:{MOSQUITTO_PORT}"),
    )])
    .await;
    let device = server.create_device("tank/7").await;
    let prefix = format!("ferrite-it/{}", uuid::Uuid::new_v4().simple());
    let (_subscriber, mut messages) = mqtt_client(
        &format!("sub-{}", uuid::Uuid::new_v4().simple()),
        MOSQUITTO_PORT,
        None,
        Some(&format!("{prefix}/#")),
    )
    .await;

    let created = test_run(
        &server,
        &device,
        json!({"type": "mqtt_publish", "topic": format!("{prefix}/{{device_name}}/{{severity}}/{{change}}")}),
    )
    .await;
    let expected_topic = format!("{prefix}/tank_7/major/raised");
    assert_eq!(created["target"], expected_topic.as_str());
    let (topic, payload) = next_message(&mut messages).await;
    assert_eq!(topic, expected_topic);
    let body: Value = serde_json::from_slice(&payload).expect("JSON payload");
    assert_eq!(body["event"], "alarm.raised");
    assert_eq!(body["device"]["id"], device.id.as_str());
    assert_eq!(body["alarm"]["severity"], "major");

    let id = created["id"].as_str().unwrap();
    wait_for_delivery(&server, id, has_status("succeeded")).await;
}

/// Responds to every RPC request with `{"echo": request}`, unless the
/// method is `ignore`, and records the requests in `seen`.
fn respond_to_requests(
    client: AsyncClient,
    mut messages: tokio::sync::mpsc::UnboundedReceiver<(String, Bytes)>,
    seen: Arc<Mutex<Vec<Value>>>,
) {
    tokio::spawn(async move {
        while let Some((topic, payload)) = messages.recv().await {
            let Some(request_id) = topic.strip_prefix("v1/devices/me/rpc/request/") else {
                continue;
            };
            let request: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
            seen.lock().push(request.clone());
            if request["method"] == "ignore" {
                continue;
            }
            let response = json!({"echo": request});
            let _ = client
                .publish(
                    format!("v1/devices/me/rpc/response/{request_id}"),
                    QoS::AtLeastOnce,
                    false,
                    response.to_string(),
                )
                .await;
        }
    });
}

#[tokio::test]
async fn command_round_trip_with_a_device() {
    let server = Server::start().await;
    let device = server.create_device("thermostat").await;
    let token = server.admin_token().await;
    let path = format!("/api/v1/devices/{}/commands", device.id);

    let (status, body) = post_json(&server, &path, &token, &json!({"method": "getTemp"})).await;
    assert_eq!(status, 409, "not connected: {body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not connected"),
        "{body}"
    );

    let (_silent, _silent_messages) =
        mqtt_client("silent", server.mqtt_addr.port(), Some(&device.token), None).await;
    let (status, body) = post_json(&server, &path, &token, &json!({"method": "getTemp"})).await;
    assert_eq!(status, 409, "not subscribed: {body}");
    assert!(
        body["detail"].as_str().unwrap().contains("rpc/request/+"),
        "{body}"
    );

    let (client, messages) = mqtt_client(
        "answering",
        server.mqtt_addr.port(),
        Some(&device.token),
        Some("v1/devices/me/rpc/request/+"),
    )
    .await;
    let seen = Arc::default();
    respond_to_requests(client, messages, Arc::clone(&seen));

    let (status, body) = post_json(
        &server,
        &path,
        &token,
        &json!({"method": "setPoint", "params": {"celsius": 21.5}, "timeout_ms": 5000}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["request_id"].as_u64().is_some_and(|id| id > 0),
        "{body}"
    );
    assert_eq!(
        body["response"],
        json!({"echo": {"method": "setPoint", "params": {"celsius": 21.5}}})
    );

    let started = Instant::now();
    let (status, body) = post_json(
        &server,
        &path,
        &token,
        &json!({"method": "ignore", "timeout_ms": 300}),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(
        body["detail"].as_str().unwrap().contains("did not respond"),
        "{body}"
    );

    let bad_bodies = [
        (json!({"params": {}}), 400),
        (json!({"method": ""}), 400),
        (json!({"method": "x", "timeout_ms": 10}), 400),
        (json!({"method": "x", "colour": "red"}), 400),
    ];
    for (request, expected) in bad_bodies {
        let (status, body) = post_json(&server, &path, &token, &request).await;
        assert_eq!(status, expected, "{request}: {body}");
    }
    let viewer = server.create_api_key("wall", "viewer");
    let (status, _) = post_json(&server, &path, &viewer, &json!({"method": "x"})).await;
    assert_eq!(status, 403);
    let (status, _) = post_json(
        &server,
        "/api/v1/devices/0190a5d6-0000-7000-8000-000000000000/commands",
        &token,
        &json!({"method": "x"}),
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn command_action_reaches_the_device() {
    let server = Server::start().await;
    let device = server.create_device("siren").await;
    let (client, messages) = mqtt_client(
        "siren-1",
        server.mqtt_addr.port(),
        Some(&device.token),
        Some("v1/devices/me/rpc/request/+"),
    )
    .await;
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    respond_to_requests(client, messages, Arc::clone(&seen));

    let created = test_run(
        &server,
        &device,
        json!({"type": "command", "method": "alarmOn", "params": {"volume": 7}}),
    )
    .await;
    assert_eq!(created["target"], "alarmOn");
    let id = created["id"].as_str().unwrap();
    wait_for_delivery(&server, id, has_status("succeeded")).await;

    let deadline = Instant::now() + WAIT;
    while seen.lock().is_empty() {
        assert!(Instant::now() < deadline, "the device got no request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        seen.lock()[0],
        json!({"method": "alarmOn", "params": {"volume": 7}})
    );
}
