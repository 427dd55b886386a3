//! Broker features of the MQTT server over real sockets: application
//! clients of a tenant (API key or email and password), their topic tree,
//! commands with MQTT 5 request/response, forwarded properties, retained
//! messages and outbound QoS 2. Commands also reach devices that observe
//! RPC over CoAP.
//!
//! Statements of the MQTT 5.0 specification each test checks:
//!
//! | test | statements |
//! |---|---|
//! | `forwarded_properties_reach_subscribers_unchanged` | [MQTT-3.3.2-4], [MQTT-3.3.2-15], [MQTT-3.3.2-16], [MQTT-3.3.2-17], [MQTT-3.3.2-18], [MQTT-3.3.2-20] |
//! | `command_response_goes_to_response_topic` | [MQTT-3.3.2-15], [MQTT-3.3.2-16] (request/response, MQTT 5.0 4.10) |
//! | `command_with_wildcard_response_topic_closes` | [MQTT-3.3.2-14] |
//! | `response_information_is_returned_on_request` | MQTT 5.0 3.2.2.3.15 (Response Information) |
//! | `retained_message_replaced_and_sent_on_subscribe` | [MQTT-3.3.1-5], [MQTT-3.3.1-9] |
//! | `retained_empty_payload_deletes` | [MQTT-3.3.1-6], [MQTT-3.3.1-7], [MQTT-3.3.1-8] |
//! | `retain_handling_controls_sending` | [MQTT-3.3.1-9], [MQTT-3.3.1-10], [MQTT-3.3.1-11] |
//! | `retain_as_published_keeps_flag` | [MQTT-3.3.1-12], [MQTT-3.3.1-13] |
//! | `qos2_flow_resumes_across_reconnects` | [MQTT-4.4.0-1] |
//! | `topic_alias_sets_and_uses_topic` | [MQTT-3.3.2-9] |
//! | `shared_subscription_alternates_members` | [MQTT-4.8.2-1] |
//! | `shared_subscription_rules` | [MQTT-4.8.2-2] |
//! | `shared_subscription_with_no_local_closes` | [MQTT-3.8.3-4] |
//! | `application_session_is_taken_over` | [MQTT-3.1.4-3] |
//! | `client_id_of_another_owner_is_rejected` | [MQTT-3.1.3-5] (the server may reject a client id) |
//! | `offline_session_queues_qos1_qos2_with_expiry` | [MQTT-3.3.2-5], [MQTT-3.3.2-6] |
//! | `command_reaches_a_coap_observer_of_the_tenant` | request/response (MQTT 5.0 4.10) with a CoAP device |

use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, ConnectReturnCode, DisconnectReasonCode, Filter, Packet, PubAckReason,
    PublishProperties, RetainForwardRule, SubscribeReasonCode,
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

/// Repeated wrong passwords for one email are throttled: after the limit
/// the server answers 0x9F without checking, even the right password, and
/// the REST login of that email gets 429.
#[tokio::test]
async fn password_guessing_is_throttled() {
    let server = Server::start().await;

    // One address locks itself out of an account after 5 failures in a row.
    for attempt in 0..5 {
        let code = connack_code(options(
            &server,
            &format!("guess-{attempt}"),
            ADMIN_EMAIL,
            "wrong password",
        ))
        .await;
        assert_eq!(
            code,
            ConnectReturnCode::BadUserNamePassword,
            "attempt {attempt}"
        );
    }

    let code = connack_code(options(
        &server,
        "guess-late",
        ADMIN_EMAIL,
        "wrong password",
    ))
    .await;
    assert_eq!(code, ConnectReturnCode::ConnectionRateExceeded);
    let code = connack_code(options(&server, "owner", ADMIN_EMAIL, ADMIN_PASSWORD)).await;
    assert_eq!(code, ConnectReturnCode::ConnectionRateExceeded);

    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/login", server.http_url))
        .json(&serde_json::json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .expect("POST login");
    assert_eq!(response.status().as_u16(), 429);

    let throttled = metric(&server, "ferrite_auth_attempts_throttled_total").await;
    assert!(throttled >= 3.0, "throttled {throttled} attempts");
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

// ---------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------

/// Publishes `payload` with RETAIN at QoS 1 and returns the PUBACK reason.
async fn publish_retained(
    client: &v5::AsyncClient,
    eventloop: &mut v5::EventLoop,
    topic: &str,
    payload: &[u8],
) -> PubAckReason {
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_vec())
        .await
        .expect("queue PUBLISH");
    wait_for(eventloop, |packet| match packet {
        Packet::PubAck(ack) => Some(ack.reason),
        _ => None,
    })
    .await
}

/// Subscribes with `filter` and returns the PUBLISHes that arrive within
/// [`QUIET`] after SUBACK.
async fn subscribe_and_collect(
    client: &v5::AsyncClient,
    eventloop: &mut v5::EventLoop,
    filter: Filter,
) -> Vec<v5::mqttbytes::v5::Publish> {
    client
        .subscribe_many([filter])
        .await
        .expect("queue SUBSCRIBE");
    wait_for(eventloop, |packet| match packet {
        Packet::SubAck(_) => Some(()),
        _ => None,
    })
    .await;
    publishes_during_quiet(eventloop).await
}

fn filter(path: &str, rule: RetainForwardRule, preserve_retain: bool) -> Filter {
    Filter {
        path: path.to_owned(),
        qos: QoS::AtLeastOnce,
        nolocal: false,
        preserve_retain,
        retain_forward_rule: rule,
    }
}

/// [MQTT-3.3.1-5] (5.0): a retained PUBLISH replaces the message on its
/// topic; [MQTT-3.3.1-9] (5.0): a new subscription receives it with RETAIN.
#[tokio::test]
async fn retained_message_replaced_and_sent_on_subscribe() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, connack) =
        connect(options(&server, "publisher", &key, "")).await;
    let retain_available = connack
        .properties
        .and_then(|properties| properties.retain_available);
    assert_ne!(retain_available, Some(0), "CONNACK Retain Available");

    for payload in [&b"first"[..], b"second"] {
        let reason =
            publish_retained(&publisher, &mut publisher_loop, "apps/status", payload).await;
        assert_eq!(reason, PubAckReason::Success);
    }

    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    let received = subscribe_and_collect(
        &subscriber,
        &mut subscriber_loop,
        filter("apps/#", RetainForwardRule::OnEverySubscribe, false),
    )
    .await;
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(&received[0].payload[..], b"second");
    assert!(received[0].retain, "RETAIN flag of a retained message");
}

/// [MQTT-3.3.1-6], [MQTT-3.3.1-7] (5.0): an empty retained PUBLISH deletes
/// the retained message and is not stored itself. [MQTT-3.3.1-8] (5.0): a
/// PUBLISH without RETAIN leaves the retained message alone.
#[tokio::test]
async fn retained_empty_payload_deletes() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;
    publish_retained(&publisher, &mut publisher_loop, "apps/kept", b"kept").await;
    publish_retained(&publisher, &mut publisher_loop, "apps/gone", b"gone").await;
    publish_retained(&publisher, &mut publisher_loop, "apps/gone", b"").await;
    publisher
        .publish(
            "apps/kept",
            QoS::AtLeastOnce,
            false,
            b"not retained".to_vec(),
        )
        .await
        .expect("queue PUBLISH");
    wait_for(&mut publisher_loop, |packet| match packet {
        Packet::PubAck(_) => Some(()),
        _ => None,
    })
    .await;

    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    let received = subscribe_and_collect(
        &subscriber,
        &mut subscriber_loop,
        filter("apps/#", RetainForwardRule::OnEverySubscribe, false),
    )
    .await;
    let topics: Vec<&[u8]> = received.iter().map(|publish| &publish.topic[..]).collect();
    assert_eq!(topics, [&b"apps/kept"[..]]);
    assert_eq!(&received[0].payload[..], b"kept");
}

/// [MQTT-3.3.1-10] (5.0): Retain Handling 1 sends retained messages only
/// for a new subscription. [MQTT-3.3.1-11] (5.0): Retain Handling 2 never.
#[tokio::test]
async fn retain_handling_controls_sending() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;
    publish_retained(&publisher, &mut publisher_loop, "apps/a", b"1").await;

    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    let cases = [
        (
            "new subscription, handling 1",
            RetainForwardRule::OnNewSubscribe,
            1,
        ),
        (
            "existing subscription, handling 1",
            RetainForwardRule::OnNewSubscribe,
            0,
        ),
        ("handling 2", RetainForwardRule::Never, 0),
        ("handling 0", RetainForwardRule::OnEverySubscribe, 1),
    ];
    for (case, rule, expected) in cases {
        let received = subscribe_and_collect(
            &subscriber,
            &mut subscriber_loop,
            filter("apps/a", rule, false),
        )
        .await;
        assert_eq!(received.len(), expected, "{case}");
    }
}

/// [MQTT-3.3.1-12], [MQTT-3.3.1-13] (5.0): a forwarded message has RETAIN
/// cleared unless the subscription sets Retain As Published.
#[tokio::test]
async fn retain_as_published_keeps_flag() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (plain, mut plain_loop, _) = connect(options(&server, "plain", &key, "")).await;
    subscribe_and_collect(
        &plain,
        &mut plain_loop,
        filter("apps/live", RetainForwardRule::Never, false),
    )
    .await;
    let (keeping, mut keeping_loop, _) = connect(options(&server, "keeping", &key, "")).await;
    subscribe_and_collect(
        &keeping,
        &mut keeping_loop,
        filter("apps/live", RetainForwardRule::Never, true),
    )
    .await;

    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;
    publish_retained(&publisher, &mut publisher_loop, "apps/live", b"x").await;

    let to_plain = next_publish_on(&mut plain_loop, "apps/live").await;
    assert!(!to_plain.retain, "Retain As Published 0 clears RETAIN");
    let to_keeping = next_publish_on(&mut keeping_loop, "apps/live").await;
    assert!(to_keeping.retain, "Retain As Published 1 keeps RETAIN");
}

#[tokio::test]
async fn retained_message_survives_restart() {
    let mut server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    {
        let (publisher, mut publisher_loop, _) =
            connect(options(&server, "publisher", &key, "")).await;
        let reason = publish_retained(&publisher, &mut publisher_loop, "apps/config", b"v1").await;
        assert_eq!(reason, PubAckReason::Success);
    }
    // SIGKILL: the PUBACK promised that the message is on disk.
    server.restart().await;

    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    let received = subscribe_and_collect(
        &subscriber,
        &mut subscriber_loop,
        filter("apps/config", RetainForwardRule::OnEverySubscribe, false),
    )
    .await;
    assert_eq!(received.len(), 1);
    assert_eq!(&received[0].payload[..], b"v1");
}

#[tokio::test]
async fn retained_device_telemetry_is_stored() {
    let server = Server::start().await;
    let device = server.create_device("sensor").await;
    let (device_client, mut device_loop, _) =
        connect(options(&server, "sensor", &device.token, "")).await;
    let reason = publish_retained(
        &device_client,
        &mut device_loop,
        "v1/devices/me/telemetry",
        br#"{"level": 7}"#,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let stored = crate::support::wait_until(
        || async { server.latest(&device.id).await.get("level").is_some() },
        WAIT,
    )
    .await;
    assert!(stored, "retained telemetry was not stored as telemetry");

    // The same topic in the other spelling is the same retained message.
    let (second, mut second_loop, _) =
        connect(options(&server, "sensor-2", &device.token, "")).await;
    let received = subscribe_and_collect(
        &second,
        &mut second_loop,
        filter(
            &format!("devices/{}/telemetry", device.id),
            RetainForwardRule::OnEverySubscribe,
            false,
        ),
    )
    .await;
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].topic,
        format!("devices/{}/telemetry", device.id).as_bytes()
    );
    assert!(received[0].retain);
}

#[tokio::test]
async fn retained_limit_rejects_new_topics() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_RETAINED_MESSAGES", "2")]).await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;

    let cases = [
        ("apps/1", PubAckReason::Success),
        ("apps/2", PubAckReason::Success),
        ("apps/3", PubAckReason::QuotaExceeded),
        ("apps/1", PubAckReason::Success),
    ];
    for (topic, expected) in cases {
        let reason = publish_retained(&publisher, &mut publisher_loop, topic, b"x").await;
        assert_eq!(reason, expected, "topic {topic}");
    }
}

// ---------------------------------------------------------------------------
// Outbound QoS 2
// ---------------------------------------------------------------------------

/// A TCP connection that sends and reads MQTT 5 packets as bytes, for the
/// flows a client library hides (withheld acknowledgements, resends).
struct RawClient {
    stream: tokio::net::TcpStream,
    buffer: bytes::BytesMut,
}

/// One packet read from the server: the first byte and the body.
#[derive(Debug)]
struct RawPacket {
    first_byte: u8,
    body: Vec<u8>,
}

impl RawPacket {
    /// Packet id of a QoS 1 or 2 PUBLISH.
    fn publish_packet_id(&self) -> u16 {
        let topic_len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        u16::from_be_bytes([self.body[2 + topic_len], self.body[3 + topic_len]])
    }

    /// Packet id of an acknowledgement (PUBREL and the like).
    fn ack_packet_id(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }
}

impl RawClient {
    /// Connects with MQTT 5, Clean Start 0 and a session expiry of 300 s,
    /// and returns the client and the CONNACK's session present flag.
    async fn connect(server: &Server, client_id: &str, user: &str) -> (Self, bool) {
        use mqtt5_protocol::packet::connect::ConnectPacket;

        let stream = tokio::net::TcpStream::connect(server.mqtt_addr)
            .await
            .expect("connect to the MQTT port");
        let mut client = Self {
            stream,
            buffer: bytes::BytesMut::new(),
        };
        let options = mqtt5_protocol::ConnectOptions::new(client_id)
            .with_clean_start(false)
            .with_session_expiry_interval(300)
            .with_credentials(user, Vec::<u8>::new());
        client.send(&ConnectPacket::new(options)).await;
        let connack = client.next_packet().await.expect("CONNACK");
        assert_eq!(connack.first_byte, 0x20, "expected CONNACK: {connack:?}");
        assert_eq!(connack.body[1], 0x00, "connection refused: {connack:?}");
        (client, connack.body[0] & 0x01 == 1)
    }

    async fn send(&mut self, packet: &impl mqtt5_protocol::packet::MqttPacket) {
        use tokio::io::AsyncWriteExt;

        let mut bytes = bytes::BytesMut::new();
        packet.encode(&mut bytes).expect("encode a test packet");
        self.stream.write_all(&bytes).await.expect("send bytes");
    }

    /// Reads the next packet; `None` when the server closed the connection
    /// or sent nothing within `QUIET`.
    async fn next_packet_within(&mut self, limit: Duration) -> Option<RawPacket> {
        use tokio::io::AsyncReadExt;

        let deadline = Instant::now() + limit;
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            let read =
                tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.buffer));
            match read.await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    async fn next_packet(&mut self) -> Option<RawPacket> {
        self.next_packet_within(WAIT).await
    }

    fn take_packet(&mut self) -> Option<RawPacket> {
        use bytes::Buf;

        let mut length = 0usize;
        for index in 0..4 {
            let byte = *self.buffer.get(1 + index)?;
            length |= usize::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                let header = 2 + index;
                if self.buffer.len() < header + length {
                    return None;
                }
                let first_byte = self.buffer[0];
                self.buffer.advance(header);
                let body = self.buffer.split_to(length).to_vec();
                return Some(RawPacket { first_byte, body });
            }
        }
        None
    }
}

/// Publishes one QoS 2 message on `topic` from a separate application.
async fn publish_qos2(server: &Server, key: &str, topic: &str, payload: &[u8]) {
    let (publisher, mut publisher_loop, _) =
        connect(options(server, "qos2-publisher", key, "")).await;
    publisher
        .publish(topic, QoS::ExactlyOnce, false, payload.to_vec())
        .await
        .expect("queue PUBLISH");
    wait_for(&mut publisher_loop, |packet| match packet {
        Packet::PubComp(_) => Some(()),
        _ => None,
    })
    .await;
}

/// Sums the samples of the metric lines that start with `line_start`.
async fn metric(server: &Server, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A client that never acknowledges and subscribes again and again gets
/// at most `mqtt.max_queued_messages` retained messages queued; the rest
/// are dropped and counted.
#[tokio::test]
async fn retained_on_subscribe_respects_queue_limit() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_QUEUED_MESSAGES", "5")]).await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, _) = connect(options(&server, "retainer", &key, "")).await;
    for index in 0..10 {
        let reason = publish_retained(
            &publisher,
            &mut publisher_loop,
            &format!("apps/flood/{index}"),
            b"x",
        )
        .await;
        assert_eq!(reason, PubAckReason::Success);
    }

    let mut slow_options = options(&server, "slow-reader", &key, "");
    slow_options.set_manual_acks(true);
    let mut properties = ConnectProperties::new();
    properties.receive_maximum = Some(1);
    slow_options.set_connect_properties(properties);
    let (slow, mut slow_loop, _) = connect(slow_options).await;
    for _ in 0..3 {
        subscribe(&slow, &mut slow_loop, "apps/flood/#").await;
    }
    let received = publishes_during_quiet(&mut slow_loop).await;
    assert!(
        received.len() <= 1,
        "Receive Maximum 1 allows one unacknowledged message, got {}",
        received.len()
    );

    // 30 retained copies were due; at most 5 queued and 1 in flight.
    let dropped = metric(
        &server,
        "ferrite_mqtt_deliveries_dropped_total{reason=\"retained_queue_full\"}",
    )
    .await;
    assert!(dropped >= 24.0, "dropped {dropped} retained messages");
}

#[tokio::test]
async fn qos2_subscription_is_granted_and_delivered() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    subscriber
        .subscribe("apps/q", QoS::ExactlyOnce)
        .await
        .expect("queue SUBSCRIBE");
    let codes = wait_for(&mut subscriber_loop, |packet| match packet {
        Packet::SubAck(suback) => Some(suback.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::ExactlyOnce)]);

    publish_qos2(&server, &key, "apps/q", b"once").await;
    let message = next_publish_on(&mut subscriber_loop, "apps/q").await;
    assert_eq!(message.qos, QoS::ExactlyOnce);
    assert_eq!(&message.payload[..], b"once");
    // rumqttc sends PUBREC and PUBCOMP; the flow must end without a
    // second copy.
    assert!(
        publishes_during_quiet(&mut subscriber_loop)
            .await
            .is_empty()
    );
}

/// [MQTT-4.4.0-1]: on resume the server resends the unacknowledged
/// PUBLISH (with DUP) and, once PUBREC came, only the PUBREL, both with
/// their original packet ids.
#[tokio::test]
async fn qos2_flow_resumes_across_reconnects() {
    use mqtt5_protocol::packet::pubcomp::PubCompPacket;
    use mqtt5_protocol::packet::pubrec::PubRecPacket;
    use mqtt5_protocol::packet::subscribe::SubscribePacket;

    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");

    let (mut first, present) = RawClient::connect(&server, "exactly-once", &key).await;
    assert!(!present);
    first
        .send(&SubscribePacket::new(1).add_filter("apps/q", mqtt5_protocol::QoS::ExactlyOnce))
        .await;
    let suback = first.next_packet().await.expect("SUBACK");
    assert_eq!(suback.first_byte, 0x90);
    publish_qos2(&server, &key, "apps/q", b"exactly once").await;
    let publish = first.next_packet().await.expect("PUBLISH");
    assert_eq!(
        publish.first_byte & 0xF6,
        0x34,
        "QoS 2 PUBLISH: {publish:?}"
    );
    assert_eq!(publish.first_byte & 0x08, 0, "first send has DUP 0");
    let packet_id = publish.publish_packet_id();
    drop(first);

    // Resume without PUBREC: the PUBLISH comes again, with DUP.
    let (mut second, present) = RawClient::connect(&server, "exactly-once", &key).await;
    assert!(present);
    let resent = second.next_packet().await.expect("resent PUBLISH");
    assert_eq!(resent.first_byte & 0xF6, 0x34, "{resent:?}");
    assert_eq!(resent.first_byte & 0x08, 0x08, "resend has DUP 1");
    assert_eq!(resent.publish_packet_id(), packet_id);
    second.send(&PubRecPacket::new(packet_id)).await;
    let pubrel = second.next_packet().await.expect("PUBREL");
    assert_eq!(pubrel.first_byte, 0x62);
    assert_eq!(pubrel.ack_packet_id(), packet_id);
    drop(second);

    // Resume after PUBREC: only the PUBREL comes again.
    let (mut third, present) = RawClient::connect(&server, "exactly-once", &key).await;
    assert!(present);
    let pubrel = third.next_packet().await.expect("resent PUBREL");
    assert_eq!(pubrel.first_byte, 0x62, "{pubrel:?}");
    assert_eq!(pubrel.ack_packet_id(), packet_id);
    third.send(&PubCompPacket::new(packet_id)).await;
    assert!(
        third.next_packet_within(QUIET).await.is_none(),
        "nothing more after PUBCOMP"
    );
    drop(third);

    // The flow is complete: nothing is resent.
    let (mut fourth, _) = RawClient::connect(&server, "exactly-once", &key).await;
    assert!(fourth.next_packet_within(QUIET).await.is_none());
}

// ---------------------------------------------------------------------------
// Topic aliases
// ---------------------------------------------------------------------------

/// [MQTT-3.3.2-9]: an alias above the Topic Alias Maximum of CONNACK is
/// invalid, and the server closes with 0x94; a set alias stands for its
/// topic in later PUBLISHes of the same connection.
#[tokio::test]
async fn topic_alias_sets_and_uses_topic() {
    use mqtt5_protocol::packet::publish::PublishPacket;

    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (subscriber, mut subscriber_loop, _) =
        connect(options(&server, "subscriber", &key, "")).await;
    subscribe(&subscriber, &mut subscriber_loop, "apps/#").await;

    let (mut raw, _) = RawClient::connect(&server, "aliasing", &key).await;
    let set = PublishPacket::new(
        "apps/long/topic",
        &b"first"[..],
        mqtt5_protocol::QoS::AtMostOnce,
    )
    .with_topic_alias(1);
    raw.send(&set).await;
    let used =
        PublishPacket::new("", &b"second"[..], mqtt5_protocol::QoS::AtMostOnce).with_topic_alias(1);
    raw.send(&used).await;

    for expected in [&b"first"[..], b"second"] {
        let message = next_publish_on(&mut subscriber_loop, "apps/long/topic").await;
        assert_eq!(&message.payload[..], expected);
        let alias = message
            .properties
            .and_then(|properties| properties.topic_alias);
        assert_eq!(alias, None, "the alias is not forwarded");
    }

    let too_high = PublishPacket::new("apps/x", &b"x"[..], mqtt5_protocol::QoS::AtMostOnce)
        .with_topic_alias(u16::MAX);
    raw.send(&too_high).await;
    let disconnect = raw.next_packet().await.expect("DISCONNECT");
    assert_eq!(disconnect.first_byte, 0xE0, "{disconnect:?}");
    assert_eq!(disconnect.body[0], 0x94, "reason code Topic Alias invalid");
}

// ---------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------

/// Publishes `count` QoS 1 messages on `topic`, numbered from 0.
async fn publish_numbered(server: &Server, key: &str, topic: &str, count: usize) {
    let (publisher, mut publisher_loop, _) =
        connect(options(server, "numbered-publisher", key, "")).await;
    for index in 0..count {
        publisher
            .publish(topic, QoS::AtLeastOnce, false, index.to_string())
            .await
            .expect("queue PUBLISH");
        wait_for(&mut publisher_loop, |packet| match packet {
            Packet::PubAck(_) => Some(()),
            _ => None,
        })
        .await;
    }
}

/// [MQTT-4.8.2-1]: `$share/{ShareName}/{filter}` is a shared
/// subscription; each message goes to one member, round robin.
#[tokio::test]
async fn shared_subscription_alternates_members() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let mut members = Vec::new();
    for name in ["worker-a", "worker-b"] {
        let (client, mut eventloop, connack) = connect(options(&server, name, &key, "")).await;
        let available = connack
            .properties
            .and_then(|properties| properties.shared_subscription_available);
        assert_ne!(available, Some(0), "CONNACK Shared Subscription Available");
        subscribe(&client, &mut eventloop, "$share/workers/apps/jobs").await;
        members.push((client, eventloop));
    }

    publish_numbered(&server, &key, "apps/jobs", 6).await;

    let mut total = 0;
    for (name, (_client, eventloop)) in ["worker-a", "worker-b"].iter().zip(members.iter_mut()) {
        let received = publishes_during_quiet(eventloop).await;
        assert_eq!(received.len(), 3, "{name} received {received:?}");
        total += received.len();
    }
    assert_eq!(total, 6, "each message reaches exactly one member");
}

/// An offline persistent member queues a message only when no member is
/// online; its queue is delivered when it reconnects.
#[tokio::test]
async fn shared_subscription_prefers_online_members() {
    use mqtt5_protocol::packet::subscribe::SubscribePacket;

    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (mut persistent, _) = RawClient::connect(&server, "persistent-member", &key).await;
    persistent
        .send(
            &SubscribePacket::new(1)
                .add_filter("$share/workers/apps/jobs", mqtt5_protocol::QoS::AtLeastOnce),
        )
        .await;
    let suback = persistent.next_packet().await.expect("SUBACK");
    assert_eq!(suback.first_byte, 0x90);
    drop(persistent);

    let (online, mut online_loop, _) = connect(options(&server, "online-member", &key, "")).await;
    subscribe(&online, &mut online_loop, "$share/workers/apps/jobs").await;
    publish_numbered(&server, &key, "apps/jobs", 2).await;
    let received = publishes_during_quiet(&mut online_loop).await;
    assert_eq!(received.len(), 2, "the online member gets every message");
    online.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(QUIET, async { while online_loop.poll().await.is_ok() {} }).await;

    publish_numbered(&server, &key, "apps/jobs", 1).await;
    let (mut resumed, present) = RawClient::connect(&server, "persistent-member", &key).await;
    assert!(present);
    let queued = resumed.next_packet().await.expect("queued PUBLISH");
    assert_eq!(queued.first_byte & 0xF0, 0x30, "{queued:?}");
    assert!(
        resumed.next_packet_within(QUIET).await.is_none(),
        "only the message published while no member was online is queued"
    );
}

/// [MQTT-4.8.2-2]: a ShareName with `+` or `#`, or without `/` and a
/// filter after it, is rejected with SUBACK 0x8F; retained messages are
/// not sent to a shared subscription.
#[tokio::test]
async fn shared_subscription_rules() {
    use mqtt5_protocol::packet::subscribe::SubscribePacket;

    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;
    publish_retained(&publisher, &mut publisher_loop, "apps/state", b"retained").await;

    let (mut raw, _) = RawClient::connect(&server, "share-rules", &key).await;
    let filters = [
        "$share/g+/apps/x",
        "$share/g#/apps/x",
        "$share/group",
        "$share/group/apps/state",
    ];
    let mut subscribe = SubscribePacket::new(7);
    for filter in filters {
        subscribe = subscribe.add_filter(filter, mqtt5_protocol::QoS::AtLeastOnce);
    }
    raw.send(&subscribe).await;
    let suback = raw.next_packet().await.expect("SUBACK");
    assert_eq!(suback.first_byte, 0x90);
    // Packet id (2 bytes), property length 0, then one code per filter.
    assert_eq!(&suback.body[3..], &[0x8F, 0x8F, 0x8F, 0x01]);
    assert!(
        raw.next_packet_within(QUIET).await.is_none(),
        "no retained message for a shared subscription"
    );
}

/// It is a protocol error to set No Local on a shared subscription.
#[tokio::test]
async fn shared_subscription_with_no_local_closes() {
    use mqtt5_protocol::packet::subscribe::{SubscribePacket, SubscriptionOptions, TopicFilter};

    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (mut raw, _) = RawClient::connect(&server, "no-local", &key).await;
    let options = SubscriptionOptions {
        no_local: true,
        ..SubscriptionOptions::default()
    };
    raw.send(
        &SubscribePacket::new(1)
            .add_filter_with_options(TopicFilter::with_options("$share/g/apps/x", options)),
    )
    .await;
    let disconnect = raw.next_packet().await.expect("DISCONNECT");
    assert_eq!(disconnect.first_byte, 0xE0, "{disconnect:?}");
    assert_eq!(disconnect.body[0], 0x82, "reason code Protocol Error");
}

// ---------------------------------------------------------------------------
// Persistent sessions
// ---------------------------------------------------------------------------

fn persistent_options(server: &Server, client_id: &str, key: &str) -> v5::MqttOptions {
    let mut options = options(server, client_id, key, "");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(300));
    options
}

/// An offline persistent session queues QoS 1 and 2 messages; on resume
/// they arrive with their QoS, an expired one is dropped, and the
/// Message Expiry Interval of the others is decremented.
#[tokio::test]
async fn offline_session_queues_qos1_qos2_with_expiry() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    {
        let (client, mut eventloop, _) = connect(persistent_options(&server, "queued", &key)).await;
        client
            .subscribe("apps/queue/#", QoS::ExactlyOnce)
            .await
            .expect("queue SUBSCRIBE");
        wait_for(&mut eventloop, |packet| match packet {
            Packet::SubAck(_) => Some(()),
            _ => None,
        })
        .await;
        client.disconnect().await.expect("queue DISCONNECT");
        let _ =
            tokio::time::timeout(QUIET, async { while eventloop.poll().await.is_ok() {} }).await;
    }

    let (publisher, mut publisher_loop, _) = connect(options(&server, "publisher", &key, "")).await;
    let cases = [
        ("apps/queue/one", QoS::AtLeastOnce, None),
        ("apps/queue/two", QoS::ExactlyOnce, Some(60)),
        ("apps/queue/expired", QoS::AtLeastOnce, Some(1)),
    ];
    for (topic, qos, expiry) in cases {
        let properties = PublishProperties {
            message_expiry_interval: expiry,
            ..PublishProperties::default()
        };
        publisher
            .publish_with_properties(topic, qos, false, b"x".to_vec(), properties)
            .await
            .expect("queue PUBLISH");
        wait_for(&mut publisher_loop, |packet| match packet {
            Packet::PubAck(_) | Packet::PubComp(_) => Some(()),
            _ => None,
        })
        .await;
    }
    // Let the 1 s expiry pass while the session is offline.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (_client, mut eventloop, connack) =
        connect(persistent_options(&server, "queued", &key)).await;
    assert!(connack.session_present);
    let received = publishes_during_quiet(&mut eventloop).await;
    let topics: Vec<&[u8]> = received.iter().map(|publish| &publish.topic[..]).collect();
    assert_eq!(topics, [&b"apps/queue/one"[..], b"apps/queue/two"]);
    assert_eq!(received[0].qos, QoS::AtLeastOnce);
    assert_eq!(received[1].qos, QoS::ExactlyOnce);
    let interval = received[1]
        .properties
        .as_ref()
        .and_then(|properties| properties.message_expiry_interval)
        .expect("Message Expiry Interval");
    assert!(
        interval < 60,
        "the interval was not decremented: {interval}"
    );
    assert!(interval >= 50, "the interval dropped too far: {interval}");
}

/// [MQTT-3.1.4-3]: a second connection with the same client id takes the
/// session over, and the first gets DISCONNECT 0x8E.
#[tokio::test]
async fn application_session_is_taken_over() {
    let server = Server::start().await;
    let key = server.create_api_key("ops", "operator");
    let (first, mut first_loop, _) = connect(persistent_options(&server, "twin-app", &key)).await;
    subscribe(&first, &mut first_loop, "apps/twin").await;

    let (_second, mut second_loop, connack) =
        connect(persistent_options(&server, "twin-app", &key)).await;
    assert!(
        connack.session_present,
        "the session moves to the new connection"
    );

    let deadline = Instant::now() + WAIT;
    let code = loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, first_loop.poll())
            .await
            .expect("the first connection was not closed")
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
    assert_eq!(code, Some(DisconnectReasonCode::SessionTakenOver));

    // The subscription moved with the session.
    publish_numbered(&server, &key, "apps/twin", 1).await;
    next_publish_on(&mut second_loop, "apps/twin").await;
}

/// Waits up to [`QUIET`] for the server to end a connection; returns the
/// DISCONNECT reason, or `None` when the connection stays open or closes
/// without one.
async fn disconnect_during_quiet(eventloop: &mut v5::EventLoop) -> Option<DisconnectReasonCode> {
    let deadline = Instant::now() + QUIET;
    while let Ok(event) = tokio::time::timeout_at(deadline.into(), eventloop.poll()).await {
        match event {
            Ok(v5::Event::Incoming(Packet::Disconnect(disconnect))) => {
                return Some(disconnect.reason_code);
            }
            Ok(_) => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => return Some(reason_code),
            Err(_) => return None,
        }
    }
    None
}

/// A client id is scoped by tenant, and within a tenant it cannot take
/// over or end the session of another owner.
#[tokio::test]
async fn client_id_of_another_owner_is_rejected() {
    let server = Server::start().await;
    let device = server.create_device("victim").await;
    let other_device = server.create_device("intruder").await;
    let other_tenant_key = api_key_in_new_tenant(&server, "admin").await;
    let key = server.create_api_key("ops", "operator");

    let (victim, mut victim_loop, _) = connect(persistent_options(
        &server,
        "victim-device-1",
        &device.token,
    ))
    .await;
    subscribe(&victim, &mut victim_loop, "v1/devices/me/rpc/request/+").await;

    // Another tenant gets a session of its own under the same client id.
    let (_other, mut other_loop, connack) = connect(persistent_options(
        &server,
        "victim-device-1",
        &other_tenant_key,
    ))
    .await;
    assert!(!connack.session_present);
    assert_eq!(disconnect_during_quiet(&mut victim_loop).await, None);
    assert_eq!(disconnect_during_quiet(&mut other_loop).await, None);

    // Another device and the applications of the same tenant are rejected.
    for credential in [&other_device.token, &key] {
        let code = connack_code(persistent_options(&server, "victim-device-1", credential)).await;
        assert_eq!(code, ConnectReturnCode::ClientIdentifierNotValid);
    }
    assert_eq!(disconnect_during_quiet(&mut victim_loop).await, None);

    // The device's session is intact when it reconnects.
    victim.disconnect().await.expect("queue DISCONNECT");
    let _ = tokio::time::timeout(QUIET, async { while victim_loop.poll().await.is_ok() {} }).await;
    let (_victim, _victim_loop, connack) = connect(persistent_options(
        &server,
        "victim-device-1",
        &device.token,
    ))
    .await;
    assert!(connack.session_present);
}

/// Sends an admin DELETE and checks that it succeeded with 204.
async fn admin_delete(server: &Server, path: &str) {
    let response = reqwest::Client::new()
        .delete(format!("{}{path}", server.http_url))
        .bearer_auth(server.admin_token().await)
        .send()
        .await
        .expect("DELETE request");
    assert_eq!(response.status().as_u16(), 204, "DELETE {path}");
}

/// Waits up to [`WAIT`] for the server to end a connection and returns
/// its DISCONNECT reason, or `None` when it closed without one.
async fn server_disconnect(eventloop: &mut v5::EventLoop) -> Option<DisconnectReasonCode> {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("the connection was not closed")
        {
            Ok(v5::Event::Incoming(Packet::Disconnect(disconnect))) => {
                return Some(disconnect.reason_code);
            }
            Ok(_) => {}
            Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => return Some(reason_code),
            Err(_) => return None,
        }
    }
}

/// An open connection whose API key is revoked, or whose device is
/// deleted, is closed with 0x87 Not authorized at the next check.
#[tokio::test]
async fn revoked_credentials_end_open_connections() {
    let server =
        Server::start_with_env(&[("FERRITE_MQTT_CREDENTIAL_RECHECK_INTERVAL", "300ms")]).await;
    let created = admin_post(
        &server,
        "/api/v1/api-keys",
        serde_json::json!({"name": "revoked-later", "role": "operator"}),
    )
    .await;
    let key = created["key"].as_str().expect("key in response").to_owned();
    let key_id = created["id"].as_str().expect("id in response").to_owned();
    let device = server.create_device("deleted-later").await;

    let (application, mut application_loop, _) =
        connect(options(&server, "revoked-app", &key, "")).await;
    subscribe(&application, &mut application_loop, "devices/#").await;
    let (_device_client, mut device_loop, _) =
        connect(options(&server, "deleted-device", &device.token, "")).await;

    // Both stay connected across several checks while their credentials
    // are valid.
    assert_eq!(disconnect_during_quiet(&mut application_loop).await, None);
    assert_eq!(disconnect_during_quiet(&mut device_loop).await, None);

    admin_delete(&server, &format!("/api/v1/api-keys/{key_id}")).await;
    assert_eq!(
        server_disconnect(&mut application_loop).await,
        Some(DisconnectReasonCode::NotAuthorized)
    );

    admin_delete(&server, &format!("/api/v1/devices/{}", device.id)).await;
    assert_eq!(
        server_disconnect(&mut device_loop).await,
        Some(DisconnectReasonCode::NotAuthorized)
    );
}

/// Deleting a device deletes its stored retained messages.
#[tokio::test]
async fn deleted_device_loses_retained_messages() {
    let server = Server::start().await;
    let device = server.create_device("retaining").await;
    {
        let (client, mut eventloop, _) =
            connect(options(&server, "retaining", &device.token, "")).await;
        let reason = publish_retained(&client, &mut eventloop, "v1/devices/me/state", b"on").await;
        assert_eq!(reason, PubAckReason::Success);
    }

    let url = format!("sqlite://{}", server.data_dir.join("metadata.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the metadata database");
    let count_rows = || {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM mqtt_retained WHERE device_id = ?")
            .bind(device.id.clone())
            .fetch_one(&pool)
    };
    assert_eq!(count_rows().await.expect("count retained rows"), 1);

    admin_delete(&server, &format!("/api/v1/devices/{}", device.id)).await;
    assert_eq!(count_rows().await.expect("count retained rows"), 0);
    pool.close().await;
}

#[tokio::test]
async fn application_receives_device_attributes() {
    let server = Server::start().await;
    let device = server.create_device("gateway").await;
    let key = server.create_api_key("dashboard", "viewer");
    let (app, mut app_loop, _) = connect(options(&server, "dashboard", &key, "")).await;
    subscribe(&app, &mut app_loop, "devices/+/attributes").await;

    let (device_client, mut device_loop, _) =
        connect(options(&server, "gateway", &device.token, "")).await;
    let reason = publish_acked(
        &device_client,
        &mut device_loop,
        "v1/devices/me/attributes",
        br#"{"firmware": "1.2.0"}"#,
        PublishProperties::default(),
    )
    .await;
    assert_eq!(reason, PubAckReason::Success, "an application took it");

    let topic = format!("devices/{}/attributes", device.id);
    let message = next_publish_on(&mut app_loop, &topic).await;
    assert_eq!(&message.payload[..], br#"{"firmware": "1.2.0"}"#);
}

/// POSTs `body` with the admin token and returns the JSON response,
/// checking for 201 Created.
async fn admin_post(server: &Server, path: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url))
        .bearer_auth(server.admin_token().await)
        .json(&body)
        .send()
        .await
        .expect("POST request");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 201, "POST {path}: {body}");
    body
}

#[tokio::test]
async fn application_receives_alarm_changes() {
    let server = Server::start().await;
    let profile = serde_json::json!({
        "name": "tank",
        "rules": [{
            "name": "low-level",
            "severity": "minor",
            "condition": {"threshold": {"key": "level", "op": "<", "value": 10}},
        }],
    });
    admin_post(&server, "/api/v1/profiles", profile).await;
    let device = admin_post(
        &server,
        "/api/v1/devices",
        serde_json::json!({"name": "tank-1", "profile": "tank"}),
    )
    .await;
    let device_id = device["id"].as_str().expect("device id").to_owned();
    let token = device["token"].as_str().expect("device token").to_owned();

    let key = server.create_api_key("dashboard", "viewer");
    let (app, mut app_loop, _) = connect(options(&server, "dashboard", &key, "")).await;
    subscribe(&app, &mut app_loop, "alarms/#").await;

    let (device_client, mut device_loop, _) = connect(options(&server, "tank-1", &token, "")).await;
    // Each change is awaited before the next message, so that the test
    // does not depend on how the pipeline batches messages.
    let topic = format!("alarms/{device_id}/low-level");
    for (level, expected) in [(5, "raised"), (50, "cleared")] {
        let body = format!(r#"{{"level": {level}}}"#);
        publish_acked(
            &device_client,
            &mut device_loop,
            "v1/devices/me/telemetry",
            body.as_bytes(),
            PublishProperties::default(),
        )
        .await;
        let message = next_publish_on(&mut app_loop, &topic).await;
        let body: Value = serde_json::from_slice(&message.payload).expect("alarm is JSON");
        assert_eq!(body["type"], "alarm");
        assert_eq!(body["change"], expected, "{body}");
        assert_eq!(body["alarm"]["rule"], "low-level");
    }
}

// ---------------------------------------------------------------------------
// Commands to a device that observes RPC over CoAP
// ---------------------------------------------------------------------------

/// Sends a Confirmable CoAP request with `token` to `path` and returns the
/// response, skipping an empty ACK that announces a separate response.
async fn coap_request(
    socket: &tokio::net::UdpSocket,
    message_id: u16,
    method: coap_lite::RequestType,
    path: &str,
    observe: bool,
    payload: &[u8],
) -> coap_lite::Packet {
    use coap_lite::{CoapOption, MessageClass, MessageType};

    let mut packet = coap_lite::Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(method);
    packet.header.message_id = message_id;
    packet.set_token(b"rpc".to_vec());
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    if observe {
        packet.add_option(CoapOption::Observe, vec![]);
    }
    packet.payload = payload.to_vec();
    socket
        .send(&packet.to_bytes().expect("encode CoAP"))
        .await
        .expect("send CoAP request");
    loop {
        let reply = coap_receive(socket).await;
        if reply.header.code != MessageClass::Empty {
            return reply;
        }
    }
}

async fn coap_receive(socket: &tokio::net::UdpSocket) -> coap_lite::Packet {
    let mut buffer = vec![0u8; 2048];
    let length = tokio::time::timeout(WAIT, socket.recv(&mut buffer))
        .await
        .expect("timed out waiting for a CoAP message")
        .expect("receive CoAP datagram");
    coap_lite::Packet::from_bytes(&buffer[..length]).expect("server sent valid CoAP")
}

#[tokio::test]
async fn command_reaches_a_coap_observer_of_the_tenant() {
    let server = Server::start().await;
    let device = server.create_device("coap-lamp").await;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind CoAP client");
    socket
        .connect(server.coap_addr)
        .await
        .expect("connect CoAP client");
    let rpc_path = format!("/api/v1/{}/rpc", device.token);
    let registered = coap_request(
        &socket,
        0x2001,
        coap_lite::RequestType::Get,
        &rpc_path,
        true,
        b"",
    )
    .await;
    assert_eq!(registered.header.code.to_string(), "2.05");

    // An application of another tenant learns nothing about the device:
    // it reads as not connected.
    let topic = format!("devices/{}/commands", device.id);
    let other_key = api_key_in_new_tenant(&server, "admin").await;
    let (other, mut other_loop, _) = connect(options(&server, "other", &other_key, "")).await;
    let reason = publish_acked(
        &other,
        &mut other_loop,
        &topic,
        br#"{"method": "x"}"#,
        PublishProperties::default(),
    )
    .await;
    assert_eq!(reason, PubAckReason::ImplementationSpecificError);

    let key = server.create_api_key("ops", "operator");
    let (app, mut app_loop, _) = connect(options(&server, "ops", &key, "")).await;
    subscribe(&app, &mut app_loop, "apps/responses/ops/#").await;
    let properties = PublishProperties {
        response_topic: Some("apps/responses/ops/coap".to_owned()),
        correlation_data: Some(Bytes::from_static(b"coap-1")),
        ..PublishProperties::default()
    };
    let reason = publish_acked(
        &app,
        &mut app_loop,
        &topic,
        br#"{"method": "setLed", "params": {"on": true}}"#,
        properties,
    )
    .await;
    assert_eq!(reason, PubAckReason::Success);

    let notification = coap_receive(&socket).await;
    let id = notification.header.message_id.to_be_bytes();
    socket
        .send(&[0x60, 0, id[0], id[1]])
        .await
        .expect("acknowledge the notification");
    let request: Value = serde_json::from_slice(&notification.payload).expect("JSON request");
    assert_eq!(request["method"], "setLed");
    let request_id = request["id"].as_u64().expect("request id");

    let answered = coap_request(
        &socket,
        0x2002,
        coap_lite::RequestType::Post,
        &format!("{rpc_path}/{request_id}"),
        false,
        br#"{"led": "on"}"#,
    )
    .await;
    assert_eq!(answered.header.code.to_string(), "2.04");

    let response = next_publish_on(&mut app_loop, "apps/responses/ops/coap").await;
    let properties = response.properties.expect("MQTT 5 properties");
    assert_eq!(properties.correlation_data.as_deref(), Some(&b"coap-1"[..]));
    let body: Value = serde_json::from_slice(&response.payload).expect("response is JSON");
    assert_eq!(body["response"]["led"], "on", "{body}");
}
