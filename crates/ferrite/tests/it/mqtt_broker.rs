//! Broker features of the MQTT server over real sockets: application
//! clients of a tenant (API key or email and password), their topic tree,
//! commands with MQTT 5 request/response, and forwarded properties.
//!
//! Statements of the MQTT 5.0 specification each test checks:
//!
//! | test | statements |
//! |---|---|
//! | `forwarded_properties_reach_subscribers_unchanged` | [MQTT-3.3.2-4], [MQTT-3.3.2-15], [MQTT-3.3.2-16], [MQTT-3.3.2-17], [MQTT-3.3.2-18], [MQTT-3.3.2-20] |
//! | `command_response_goes_to_response_topic` | [MQTT-3.3.2-15], [MQTT-3.3.2-16] (request/response, MQTT 5.0 4.10) |
//! | `command_with_wildcard_response_topic_closes` | [MQTT-3.3.2-14] |
//! | `response_information_is_returned_on_request` | MQTT 5.0 3.2.2.3.15 (Response Information) |

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason,
    PublishProperties, SubscribeReasonCode,
};
use serde_json::Value;

use crate::support::{ADMIN_EMAIL, ADMIN_PASSWORD, Server, TestDevice};

/// Maximum wait for an expected packet or close.
const WAIT: Duration = Duration::from_secs(10);
/// Time in which a message that should not arrive would have arrived.
const QUIET: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn options(server: &Server, client_id: &str, user: &str, password: &str) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(user, password);
    options
}

/// Polls until `pick` accepts an incoming packet; panics on a connection
/// error or after [`WAIT`].
async fn wait_for<T>(
    eventloop: &mut v5::EventLoop,
    mut pick: impl FnMut(&Packet) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("timed out waiting for an MQTT 5 packet")
            .expect("MQTT 5 connection failed");
        if let v5::Event::Incoming(packet) = event
            && let Some(found) = pick(&packet)
        {
            return found;
        }
    }
}

/// Polls for [`QUIET`] and returns the PUBLISH packets that arrived.
async fn publishes_during_quiet(eventloop: &mut v5::EventLoop) -> Vec<v5::mqttbytes::v5::Publish> {
    let deadline = Instant::now() + QUIET;
    let mut received = Vec::new();
    while let Ok(event) = tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
        if let Ok(v5::Event::Incoming(Packet::Publish(publish))) = event {
            received.push(publish);
        }
    }
    received
}

/// Connects and returns the client, its event loop and the CONNACK.
async fn connect(
    options: v5::MqttOptions,
) -> (v5::AsyncClient, v5::EventLoop, v5::mqttbytes::v5::ConnAck) {
    let (client, mut eventloop) = v5::AsyncClient::new(options, 64);
    let connack = wait_for(&mut eventloop, |packet| match packet {
        Packet::ConnAck(connack) => Some(connack.clone()),
        _ => None,
    })
    .await;
    (client, eventloop, connack)
}

/// Returns the CONNACK reason code of a connection attempt.
async fn connack_code(options: v5::MqttOptions) -> ConnectReturnCode {
    let (_client, mut eventloop) = v5::AsyncClient::new(options, 8);
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("timed out waiting for CONNACK")
        {
            Ok(v5::Event::Incoming(Packet::ConnAck(connack))) => return connack.code,
            Ok(_) => {}
            Err(v5::ConnectionError::ConnectionRefused(code)) => return code,
            Err(error) => panic!("connection failed before CONNACK: {error}"),
        }
    }
}

async fn subscribe(client: &v5::AsyncClient, eventloop: &mut v5::EventLoop, filter: &str) {
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    let codes = wait_for(eventloop, |packet| match packet {
        Packet::SubAck(suback) => Some(suback.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "SUBACK for {filter:?}"
    );
}

/// Publishes at QoS 1 and returns the PUBACK reason.
async fn publish_acked(
    client: &v5::AsyncClient,
    eventloop: &mut v5::EventLoop,
    topic: &str,
    payload: &[u8],
    properties: PublishProperties,
) -> PubAckReason {
    client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), properties)
        .await
        .expect("queue PUBLISH");
    wait_for(eventloop, |packet| match packet {
        Packet::PubAck(ack) => Some(ack.reason),
        _ => None,
    })
    .await
}

/// Waits for a PUBLISH on `topic`.
async fn next_publish_on(eventloop: &mut v5::EventLoop, topic: &str) -> v5::mqttbytes::v5::Publish {
    wait_for(eventloop, |packet| match packet {
        Packet::Publish(publish) if publish.topic == topic.as_bytes() => Some(publish.clone()),
        _ => None,
    })
    .await
}

/// Connects a device that subscribes to its RPC requests and responds to each
/// with `{"ok": true, "method": ...}`. Returns the task; abort it to stop.
async fn answering_device(server: &Server, device: &TestDevice) -> tokio::task::JoinHandle<()> {
    let mut device_options =
        rumqttc::MqttOptions::new("answering-device", "127.0.0.1", server.mqtt_addr.port());
    device_options.set_credentials(device.token.clone(), "");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(device_options, 16);
    client
        .subscribe("v1/devices/me/rpc/request/+", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    // Wait for SUBACK so that commands sent after this call reach it.
    loop {
        let event = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .expect("timed out waiting for the device's SUBACK")
            .expect("device connection failed");
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = event {
            break;
        }
    }
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            let rumqttc::Event::Incoming(rumqttc::Packet::Publish(request)) = event else {
                continue;
            };
            let request_id = request.topic.rsplit('/').next().unwrap_or("0").to_owned();
            let body: Value = serde_json::from_slice(&request.payload).unwrap_or(Value::Null);
            let response = serde_json::json!({"ok": true, "method": body["method"]});
            let _ = client
                .publish(
                    format!("v1/devices/me/rpc/response/{request_id}"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    response.to_string(),
                )
                .await;
        }
    })
}

/// Creates a second tenant with an API key of `role` directly in the
/// metadata database, since the command line creates keys only in the
/// default tenant. Returns the key.
async fn api_key_in_new_tenant(server: &Server, role: &str) -> String {
    use sha2::Digest;

    let key = format!("fak_{}", uuid::Uuid::new_v4().simple());
    let hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
    let url = format!("sqlite://{}", server.data_dir.join("metadata.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the metadata database");
    let tenant_id = uuid::Uuid::now_v7().to_string();
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, 0)")
        .bind(&tenant_id)
        .bind(format!("other-{tenant_id}"))
        .execute(&pool)
        .await
        .expect("insert a tenant");
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at) VALUES (?, ?, 'other', ?, ?, 0)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&tenant_id)
    .bind(&hash[..])
    .bind(role)
    .execute(&pool)
    .await
    .expect("insert an API key");
    pool.close().await;
    key
}

// ---------------------------------------------------------------------------
// Application clients: authentication and authorization
// ---------------------------------------------------------------------------

#[tokio::test]
async fn application_credentials_are_checked() {
    let server = Server::start().await;
    let key = server.create_api_key("dashboard", "viewer");

    let cases = [
        (
            "API key as user name",
            key.as_str(),
            "",
            ConnectReturnCode::Success,
        ),
        (
            "API key as password",
            "dashboard",
            key.as_str(),
            ConnectReturnCode::Success,
        ),
        (
            "email and password",
            ADMIN_EMAIL,
            ADMIN_PASSWORD,
            ConnectReturnCode::Success,
        ),
        (
            "wrong password",
            ADMIN_EMAIL,
            "wrong password",
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            "unknown API key",
            "fak_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "",
            ConnectReturnCode::BadUserNamePassword,
        ),
    ];
    for (index, (case, user, password, expected)) in cases.into_iter().enumerate() {
        let code = connack_code(options(&server, &format!("app-{index}"), user, password)).await;
        assert_eq!(code, expected, "{case}");
    }
}

#[tokio::test]
async fn application_receives_device_telemetry() {
    let server = Server::start().await;
    let device = server.create_device("thermometer").await;
    let key = server.create_api_key("dashboard", "viewer");
    let (app, mut app_loop, _) = connect(options(&server, "dashboard", &key, "")).await;
    subscribe(&app, &mut app_loop, "devices/+/telemetry").await;

    let (device_client, mut device_loop, _) =
        connect(options(&server, "thermometer", &device.token, "")).await;
    let reason = publish_acked(
        &device_client,
        &mut device_loop,
        "v1/devices/me/telemetry",
        br#"{"temp": 21.5}"#,
        PublishProperties::default(),
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let topic = format!("devices/{}/telemetry", device.id);
    let message = next_publish_on(&mut app_loop, &topic).await;
    let body: Value = serde_json::from_slice(&message.payload).expect("telemetry is JSON");
    assert_eq!(body["type"], "telemetry");
    assert_eq!(body["device_id"], device.id.as_str());
    assert_eq!(body["points"][0]["key"], "temp");
    assert_eq!(body["points"][0]["value"], 21.5);
    let properties = message.properties.expect("MQTT 5 properties");
    assert_eq!(properties.content_type.as_deref(), Some("application/json"));
}

#[tokio::test]
async fn tenants_do_not_see_each_other() {
    let server = Server::start().await;
    let device = server.create_device("meter").await;
    let other_key = api_key_in_new_tenant(&server, "admin").await;
    let (other, mut other_loop, _) = connect(options(&server, "other", &other_key, "")).await;
    subscribe(&other, &mut other_loop, "#").await;
    let own_key = server.create_api_key("own", "viewer");
    let (own, mut own_loop, _) = connect(options(&server, "own", &own_key, "")).await;
    subscribe(&own, &mut own_loop, "#").await;

    let (device_client, mut device_loop, _) =
        connect(options(&server, "meter", &device.token, "")).await;
    publish_acked(
        &device_client,
        &mut device_loop,
        "v1/devices/me/telemetry",
        br#"{"kwh": 3}"#,
        PublishProperties::default(),
    )
    .await;
    next_publish_on(&mut own_loop, &format!("devices/{}/telemetry", device.id)).await;
    assert!(
        publishes_during_quiet(&mut other_loop).await.is_empty(),
        "another tenant's application received the device's telemetry"
    );

    // A command to a device of another tenant is treated as a command to
    // a device that is not connected.
    let reason = publish_acked(
        &other,
        &mut other_loop,
        &format!("devices/{}/commands", device.id),
        br#"{"method": "reboot"}"#,
        PublishProperties::default(),
    )
    .await;
    assert_eq!(reason, PubAckReason::ImplementationSpecificError);
}

#[tokio::test]
async fn viewer_may_subscribe_but_not_publish() {
    let server = Server::start().await;
    let device = server.create_device("pump").await;
    let key = server.create_api_key("viewer", "viewer");
    let (app, mut app_loop, _) = connect(options(&server, "viewer", &key, "")).await;
    subscribe(&app, &mut app_loop, "alarms/#").await;

    let cases = [
        format!("devices/{}/commands", device.id),
        "apps/chat".to_owned(),
    ];
    for topic in cases {
        let reason = publish_acked(
            &app,
            &mut app_loop,
            &topic,
            br#"{"method": "stop"}"#,
            PublishProperties::default(),
        )
        .await;
        assert_eq!(reason, PubAckReason::NotAuthorized, "topic {topic:?}");
    }
}

#[tokio::test]
async fn application_topics_outside_the_tree_are_rejected() {
    let server = Server::start().await;
    let device = server.create_device("valve").await;
    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;

    for topic in [
        format!("devices/{}/telemetry", device.id),
        "v1/devices/me/telemetry".to_owned(),
        "alarms/x/y".to_owned(),
    ] {
        let reason = publish_acked(
            &app,
            &mut app_loop,
            &topic,
            b"{}",
            PublishProperties::default(),
        )
        .await;
        assert_eq!(reason, PubAckReason::NotAuthorized, "topic {topic:?}");
    }

    app.subscribe("$SYS/#", QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    let codes = wait_for(&mut app_loop, |packet| match packet {
        Packet::SubAck(suback) => Some(suback.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(codes, [SubscribeReasonCode::NotAuthorized]);
}

// ---------------------------------------------------------------------------
// Commands with request/response
// ---------------------------------------------------------------------------

#[tokio::test]
async fn command_response_goes_to_response_topic() {
    let server = Server::start().await;
    let device = server.create_device("lamp").await;
    let responder = answering_device(&server, &device).await;
    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;
    subscribe(&app, &mut app_loop, "apps/responses/ops/#").await;

    let properties = PublishProperties {
        response_topic: Some("apps/responses/ops/1".to_owned()),
        correlation_data: Some(Bytes::from_static(b"request-1")),
        ..PublishProperties::default()
    };
    let reason = publish_acked(
        &app,
        &mut app_loop,
        &format!("devices/{}/commands", device.id),
        br#"{"method": "switch", "params": {"on": true}}"#,
        properties,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let response = next_publish_on(&mut app_loop, "apps/responses/ops/1").await;
    let properties = response.properties.expect("MQTT 5 properties");
    assert_eq!(
        properties.correlation_data.as_deref(),
        Some(&b"request-1"[..])
    );
    let body: Value = serde_json::from_slice(&response.payload).expect("response is JSON");
    assert!(body["request_id"].is_u64(), "{body}");
    assert_eq!(body["response"]["ok"], true);
    assert_eq!(body["response"]["method"], "switch");
    responder.abort();
}

#[tokio::test]
async fn command_timeout_is_reported_on_response_topic() {
    let server = Server::start().await;
    let device = server.create_device("silent").await;
    // Connected and subscribed, but it never responds.
    let (device_client, mut device_loop, _) =
        connect(options(&server, "silent", &device.token, "")).await;
    subscribe(
        &device_client,
        &mut device_loop,
        "v1/devices/me/rpc/request/+",
    )
    .await;
    let device_task = tokio::spawn(async move { while device_loop.poll().await.is_ok() {} });

    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;
    subscribe(&app, &mut app_loop, "apps/replies/#").await;
    let properties = PublishProperties {
        response_topic: Some("apps/replies/1".to_owned()),
        correlation_data: Some(Bytes::from_static(b"c1")),
        ..PublishProperties::default()
    };
    let reason = publish_acked(
        &app,
        &mut app_loop,
        &format!("devices/{}/commands", device.id),
        br#"{"method": "ping", "timeout_ms": 300}"#,
        properties,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let response = next_publish_on(&mut app_loop, "apps/replies/1").await;
    let body: Value = serde_json::from_slice(&response.payload).expect("response is JSON");
    let error = body["error"].as_str().expect("an error message");
    assert!(error.contains("did not respond within 300 ms"), "{error}");
    device_task.abort();
}

#[tokio::test]
async fn command_errors_have_reason_codes() {
    let server = Server::start().await;
    let device = server.create_device("offline").await;
    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;
    let topic = format!("devices/{}/commands", device.id);

    let cases: [(&str, &[u8], Option<&str>, PubAckReason); 3] = [
        (
            "invalid body",
            b"not json",
            None,
            PubAckReason::PayloadFormatInvalid,
        ),
        (
            "response topic outside apps/",
            br#"{"method": "x"}"#,
            Some("devices/x/telemetry"),
            PubAckReason::NotAuthorized,
        ),
        (
            "device not connected",
            br#"{"method": "x"}"#,
            None,
            PubAckReason::ImplementationSpecificError,
        ),
    ];
    for (case, payload, response_topic, expected) in cases {
        let properties = PublishProperties {
            response_topic: response_topic.map(str::to_owned),
            ..PublishProperties::default()
        };
        let reason = publish_acked(&app, &mut app_loop, &topic, payload, properties).await;
        assert_eq!(reason, expected, "{case}");
    }
}

/// [MQTT-3.3.2-14]: a Response Topic with a wildcard is a protocol error.
#[tokio::test]
async fn command_with_wildcard_response_topic_closes() {
    let server = Server::start().await;
    let device = server.create_device("lamp").await;
    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;

    let properties = PublishProperties {
        response_topic: Some("apps/+/x".to_owned()),
        ..PublishProperties::default()
    };
    app.publish_with_properties(
        format!("devices/{}/commands", device.id),
        QoS::AtLeastOnce,
        false,
        br#"{"method": "x"}"#.to_vec(),
        properties,
    )
    .await
    .expect("queue PUBLISH");

    let deadline = Instant::now() + WAIT;
    let code = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, app_loop.poll())
            .await
            .expect("the connection was not closed")
        {
            Ok(v5::Event::Incoming(Packet::Disconnect(disconnect))) => {
                break Some(disconnect.reason_code);
            }
            Ok(_) => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => break Some(reason_code),
            Err(_) => break None,
        }
    };
    assert_eq!(code, Some(DisconnectReasonCode::ProtocolError));
}

#[tokio::test]
async fn response_information_is_returned_on_request() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let mut app_options = options(&server, "ops/1", &key, "");
    app_options.set_connect_properties(ConnectProperties {
        request_response_info: Some(1),
        ..ConnectProperties::new()
    });
    let (_app, _app_loop, connack) = connect(app_options).await;
    let information = connack
        .properties
        .and_then(|properties| properties.response_information);
    assert_eq!(information.as_deref(), Some("apps/responses/ops_1/"));
}

// ---------------------------------------------------------------------------
// Forwarded properties
// ---------------------------------------------------------------------------

#[tokio::test]
async fn forwarded_properties_reach_subscribers_unchanged() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (receiver, mut receiver_loop, _) = connect(options(&server, "receiver", &key, "")).await;
    subscribe(&receiver, &mut receiver_loop, "apps/chat/#").await;
    let (sender, mut sender_loop, _) = connect(options(&server, "sender", &key, "")).await;

    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        response_topic: Some("apps/chat/replies".to_owned()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 255])),
        user_properties: vec![
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "3".to_owned()),
        ],
        content_type: Some("text/plain".to_owned()),
        ..PublishProperties::default()
    };
    let reason = publish_acked(
        &sender,
        &mut sender_loop,
        "apps/chat/room",
        b"hello",
        sent.clone(),
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let message = next_publish_on(&mut receiver_loop, "apps/chat/room").await;
    assert_eq!(&message.payload[..], b"hello");
    let received = message.properties.expect("MQTT 5 properties");
    assert_eq!(received.payload_format_indicator, Some(1));
    assert_eq!(received.response_topic, sent.response_topic);
    assert_eq!(received.correlation_data, sent.correlation_data);
    assert_eq!(received.user_properties, sent.user_properties);
    assert_eq!(received.content_type, sent.content_type);
}
