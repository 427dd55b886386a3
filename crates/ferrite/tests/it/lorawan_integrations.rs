//! Uplinks from ChirpStack and The Things Stack: their webhooks over HTTP
//! and ChirpStack's MQTT integration through the Mosquitto broker on
//! 127.0.0.1:1883, stored and decoded by the device's profile.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::support::{Server, TestDevice, wait_until};

const MOSQUITTO: &str = "127.0.0.1:1883";

/// Cayenne LPP: temperature 21.5 °C on channel 1, humidity 50 % on
/// channel 2.
const LPP_BYTES: [u8; 7] = [0x01, 0x67, 0x00, 0xd7, 0x02, 0x68, 0x64];

struct Lorawan<'a> {
    server: &'a Server,
    client: reqwest::Client,
    admin: String,
    /// An API key with the operator role, as a network server would send.
    operator_key: String,
}

impl<'a> Lorawan<'a> {
    async fn new(server: &'a Server) -> Lorawan<'a> {
        Lorawan {
            server,
            client: reqwest::Client::new(),
            admin: server.admin_token().await,
            operator_key: server.create_api_key("network-server", "operator"),
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        content_type: &str,
        body: String,
    ) -> (u16, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.server.http_url))
            .bearer_auth(token)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Creates a profile, a device with it and an external LoRaWAN
    /// registration for `dev_eui`.
    async fn device(&self, name: &str, profile_yaml: &str, dev_eui: &str) -> TestDevice {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/profiles",
                &self.admin,
                "application/yaml",
                profile_yaml.to_owned(),
            )
            .await;
        assert!(status == 201 || status == 409, "profile: {status} {body}");
        let profile_name = profile_yaml
            .lines()
            .find_map(|line| line.strip_prefix("name: "))
            .expect("profile name");
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                "/api/v1/devices",
                &self.admin,
                "application/json",
                json!({"name": name, "profile": profile_name}).to_string(),
            )
            .await;
        assert_eq!(status, 201, "device: {body}");
        let device = TestDevice {
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        };
        let (status, body) = self
            .request(
                reqwest::Method::PUT,
                &format!("/api/v1/devices/{}/lorawan", device.id),
                &self.admin,
                "application/json",
                json!({"dev_eui": dev_eui, "activation": "external"}).to_string(),
            )
            .await;
        assert!(
            status == 200 || status == 201,
            "LoRaWAN registration: {status} {body}"
        );
        device
    }

    async fn chirpstack(&self, event: &str, body: &Value) -> (u16, Value) {
        self.chirpstack_as(&self.operator_key, event, body).await
    }

    async fn chirpstack_as(&self, token: &str, event: &str, body: &Value) -> (u16, Value) {
        self.request(
            reqwest::Method::POST,
            &format!("/api/v1/integrations/chirpstack?event={event}"),
            token,
            "application/json",
            body.to_string(),
        )
        .await
    }

    async fn tts(&self, body: &Value) -> (u16, Value) {
        self.request(
            reqwest::Method::POST,
            "/api/v1/integrations/tts",
            &self.operator_key,
            "application/json",
            body.to_string(),
        )
        .await
    }
}

/// Waits until the latest telemetry of `device` has `key`.
async fn latest_with(server: &Server, device: &TestDevice, key: &str) -> Value {
    let path = format!("/api/v1/devices/{}/telemetry/latest", device.id);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = server.get_json(&path).await;
        if status == 200 && body.get(key).is_some() {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{key} never arrived; latest: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A ChirpStack v4 `up` event in JSON, as its HTTP and MQTT integrations
/// send it.
fn chirpstack_up(dev_eui: &str, f_cnt: u32, f_port: u8, payload: &[u8]) -> Value {
    json!({
        "deduplicationId": "3b0c8d6e-2f41-4a55-9d0e-7c1b2a3f4e5d",
        "time": "2026-03-14T09:26:53.589Z",
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "applicationId": "ca739e26-7b67-4f14-b69e-d568c22a5a75",
            "applicationName": "greenhouse",
            "deviceName": "bench-3",
            "devEui": dev_eui.to_uppercase(),
        },
        "devAddr": "0127ab9f",
        "dr": 5,
        "fCnt": f_cnt,
        "fPort": f_port,
        "confirmed": false,
        "data": base64(payload),
        "rxInfo": [{"gatewayId": "b827ebfffe6c279d", "rssi": -57, "snr": 9.5}],
        "txInfo": {
            "frequency": 868100000,
            "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 7, "codeRate": "CR_4_5"}}
        }
    })
}

/// A The Things Stack v3 webhook uplink message.
fn tts_uplink(dev_eui: &str, f_cnt: u32, payload: &[u8]) -> Value {
    json!({
        "end_device_ids": {
            "device_id": "bench-4",
            "application_ids": {"application_id": "greenhouse"},
            "dev_eui": dev_eui.to_uppercase()
        },
        "received_at": "2026-03-14T09:30:00.250Z",
        "uplink_message": {
            "f_port": 2,
            "f_cnt": f_cnt,
            "frm_payload": base64(payload),
            "rx_metadata": [{
                "gateway_ids": {"gateway_id": "roof-north", "eui": "B827EBFFFE6C279D"},
                "rssi": -61,
                "snr": 7.25
            }],
            "settings": {
                "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 9, "coding_rate": "4/5"}},
                "frequency": "867300000"
            },
            "received_at": "2026-03-14T09:30:00.125Z"
        }
    })
}

const LPP_PROFILE: &str = "name: lorawan-lpp\ncodec: { type: cayenne_lpp }\n";

/// A scripted decoder that reports the FPort it was given, which comes
/// from the envelope's `meta`.
const PORT_PROFILE: &str = r#"name: lorawan-port
codec:
  type: script
  script: |
    function decodeUplink(input) {
      return { data: { port: input.fPort, first: input.bytes[0] } };
    }
"#;

#[tokio::test]
async fn chirpstack_webhook_uplink_is_decoded_by_profile() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("cs-lpp", LPP_PROFILE, "70b3d57ed0001a01")
        .await;

    let event = chirpstack_up("70b3d57ed0001a01", 41, 3, &LPP_BYTES);
    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "stored");
    assert_eq!(body["device_id"], device.id.as_str());

    let latest = latest_with(&server, &device, "relative_humidity_2").await;
    assert_eq!(latest["temperature_1"]["value"], 21.5);
    assert_eq!(latest["relative_humidity_2"]["value"], 50.0);
    // Stamped with ChirpStack's receive time, not Ferrite's.
    assert_eq!(latest["temperature_1"]["ts"], 1_773_480_413_589i64);
}

#[tokio::test]
async fn tts_webhook_uplink_reaches_scripted_decoder() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("tts-port", PORT_PROFILE, "70b3d57ed0001a02")
        .await;

    let (status, body) = lorawan
        .tts(&tts_uplink("70b3d57ed0001a02", 7, &[0x2a, 0x01]))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "stored");

    let latest = latest_with(&server, &device, "port").await;
    assert_eq!(latest["port"]["value"], 2.0, "f_port from meta: {latest}");
    assert_eq!(latest["first"]["value"], 42.0);
    assert_eq!(latest["port"]["ts"], 1_773_480_600_125i64);

    // Other message types of a shared webhook URL are ignored.
    let join = json!({
        "end_device_ids": {"dev_eui": "70B3D57ED0001A02"},
        "join_accept": {"session_key_id": "AYb4"}
    });
    let (status, _) = lorawan.tts(&join).await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn undecodable_uplink_keeps_meta_in_dead_letter() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("tts-broken", LPP_PROFILE, "70b3d57ed0001a0a")
        .await;

    // A temperature record cut short: accepted, then rejected by the codec.
    let (status, body) = lorawan
        .tts(&tts_uplink("70b3d57ed0001a0a", 5, &[0x01, 0x67, 0x00]))
        .await;
    assert_eq!(status, 200, "{body}");

    let path = format!("/api/v1/devices/{}/dead-letters", device.id);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let letters = loop {
        let (_, body) = server.get_json(&path).await;
        if body["dead_letters"]
            .as_array()
            .is_some_and(|list| !list.is_empty())
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let letter = &letters["dead_letters"][0];
    assert_eq!(letter["protocol"], "lorawan", "{letter}");
    assert_eq!(letter["content_type"], "raw");
    assert_eq!(letter["payload_base64"], "AWcA");
    let meta = &letter["meta"];
    assert_eq!(meta["network_server"], "the_things_stack", "{meta}");
    assert_eq!(meta["dev_eui"], "70b3d57ed0001a0a");
    assert_eq!(meta["f_port"], 2);
    assert_eq!(meta["f_cnt"], 5);
    assert_eq!(meta["frequency_hz"], 867_300_000);
    assert_eq!(meta["data_rate"], "SF9BW125");
    assert_eq!(meta["gateways"][0]["gateway_id"], "roof-north");
    assert_eq!(meta["gateways"][0]["gateway_eui"], "b827ebfffe6c279d");
    assert_eq!(meta["gateways"][0]["rssi"], -61);
    assert_eq!(meta["gateways"][0]["snr"], 7.25);
    assert_eq!(meta["received_at"], "2026-03-14T09:30:00.125Z");
}

#[tokio::test]
async fn repeated_delivery_is_stored_once() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("cs-dup", LPP_PROFILE, "70b3d57ed0001a03")
        .await;

    let event = chirpstack_up("70b3d57ed0001a03", 9, 3, &LPP_BYTES);
    let (status, first) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["outcome"], "stored");
    let (status, second) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "a repeat is acknowledged: {second}");
    assert_eq!(second["outcome"], "duplicate");
    assert_eq!(second["device_id"], device.id.as_str());

    // The same uplink through the other network server's endpoint is a
    // repeat too: the key is DevEUI, FCnt and payload.
    let (status, third) = lorawan
        .tts(&tts_uplink("70b3d57ed0001a03", 9, &LPP_BYTES))
        .await;
    assert_eq!(status, 200, "{third}");
    assert_eq!(third["outcome"], "duplicate");

    // A new frame counter is a new uplink.
    let next = chirpstack_up("70b3d57ed0001a03", 10, 3, &LPP_BYTES);
    let (_, body) = lorawan.chirpstack("up", &next).await;
    assert_eq!(body["outcome"], "stored");
}

#[tokio::test]
async fn mac_only_uplink_updates_last_seen() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("cs-mac", LPP_PROFILE, "70b3d57ed0001a04")
        .await;

    let event = chirpstack_up("70b3d57ed0001a04", 3, 0, &[]);
    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["outcome"], "mac_only");

    let path = format!("/api/v1/devices/{}", device.id);
    let seen = wait_until(
        || async {
            let (_, body) = server.get_json(&path).await;
            !body["last_seen_at"].is_null()
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(seen, "last_seen_at stayed empty");
    let (_, latest) = server
        .get_json(&format!("/api/v1/devices/{}/telemetry/latest", device.id))
        .await;
    assert_eq!(latest, json!({}), "no telemetry from a MAC-only frame");
}

#[tokio::test]
async fn unknown_dev_eui_is_not_found() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;

    let event = chirpstack_up("70b3d57ed0001aff", 1, 3, &LPP_BYTES);
    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 404, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("70b3d57ed0001aff"), "{detail}");
    assert!(
        detail.contains("PUT /api/v1/devices/{id}/lorawan"),
        "{detail}"
    );

    let (status, body) = lorawan
        .tts(&tts_uplink("70b3d57ed0001aff", 1, &LPP_BYTES))
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn other_tenant_dev_eui_is_not_found() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    lorawan
        .device("cs-tenant", LPP_PROFILE, "70b3d57ed0001a09")
        .await;
    let foreign = crate::live::other_tenant_token(&server);

    let event = chirpstack_up("70b3d57ed0001a09", 1, 3, &LPP_BYTES);
    let (status, body) = lorawan.chirpstack_as(&foreign, "up", &event).await;
    assert_eq!(status, 404, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("no device with DevEUI 70b3d57ed0001a09"),
        "{detail}"
    );

    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "own tenant: {body}");
}

#[tokio::test]
async fn invalid_events_name_the_field() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;

    let mut event = chirpstack_up("70b3d57ed0001a05", 1, 3, &LPP_BYTES);
    event["deviceInfo"]
        .as_object_mut()
        .unwrap()
        .remove("devEui");
    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 400, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("deviceInfo.devEui"), "{detail}");

    let mut event = chirpstack_up("70b3d57ed0001a05", 1, 3, &LPP_BYTES);
    event["rxInfo"][0]["rssi"] = json!("strong");
    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("rxInfo[0].rssi"),
        "{body}"
    );

    let mut message = tts_uplink("70b3d57ed0001a05", 1, &LPP_BYTES);
    message["uplink_message"]["frm_payload"] = json!("not base64!");
    let (status, body) = lorawan.tts(&message).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("uplink_message.frm_payload"),
        "{body}"
    );

    let (status, body) = lorawan
        .request(
            reqwest::Method::POST,
            "/api/v1/integrations/tts",
            &lorawan.operator_key,
            "application/json",
            "{\"uplink_message\": ".to_owned(),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("not valid JSON"),
        "{body}"
    );
}

#[tokio::test]
async fn chirpstack_events_other_than_up_are_ignored() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    let join = json!({"deviceInfo": {"devEui": "70B3D57ED0001A06"}, "devAddr": "01020304"});
    for event in [
        "join",
        "status",
        "log",
        "ack",
        "txack",
        "location",
        "integration",
    ] {
        let (status, body) = lorawan.chirpstack(event, &join).await;
        assert_eq!(status, 204, "{event}: {body}");
    }

    let (status, body) = lorawan
        .request(
            reqwest::Method::POST,
            "/api/v1/integrations/chirpstack",
            &lorawan.operator_key,
            "application/json",
            join.to_string(),
        )
        .await;
    assert_eq!(status, 400, "missing event: {body}");
    assert_eq!(body["param"], "event");

    let (status, body) = lorawan
        .request(
            reqwest::Method::POST,
            "/api/v1/integrations/chirpstack?event=up",
            &lorawan.operator_key,
            "application/octet-stream",
            "\u{a}\u{10}".to_owned(),
        )
        .await;
    assert_eq!(status, 415, "Protobuf: {body}");
    assert!(body["detail"].as_str().unwrap().contains("JSON"), "{body}");
}

#[tokio::test]
async fn webhooks_need_operator_api_key() {
    let server = Server::start().await;
    let lorawan = Lorawan::new(&server).await;
    lorawan
        .device("cs-auth", LPP_PROFILE, "70b3d57ed0001a07")
        .await;
    let event = chirpstack_up("70b3d57ed0001a07", 1, 3, &LPP_BYTES);

    let (status, body) = lorawan
        .chirpstack_as("fk_not-a-real-key", "up", &event)
        .await;
    assert_eq!(status, 401, "wrong key: {body}");

    let (status, body) = lorawan
        .request(
            reqwest::Method::POST,
            "/api/v1/integrations/tts",
            "",
            "application/json",
            tts_uplink("70b3d57ed0001a07", 1, &LPP_BYTES).to_string(),
        )
        .await;
    assert_eq!(status, 401, "no key: {body}");

    let viewer = server.create_api_key("read-only", "viewer");
    let (status, body) = lorawan.chirpstack_as(&viewer, "up", &event).await;
    assert_eq!(status, 403, "viewer key: {body}");

    let (status, body) = lorawan.chirpstack("up", &event).await;
    assert_eq!(status, 200, "operator key: {body}");
}

/// Publishes `payload` with QoS 1 to the machine's Mosquitto and waits for
/// its PUBACK.
async fn publish_to_mosquitto(topic: &str, payload: Vec<u8>) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let client_id = format!("ferrite-it-pub-{:08x}", rand::random::<u32>());
    let mut options = MqttOptions::new(client_id, "127.0.0.1", 1883);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut event_loop) = AsyncClient::new(options, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .expect("queue the publish");
    let acknowledged = tokio::time::timeout(Duration::from_secs(10), async {
        while !matches!(
            event_loop.poll().await.expect("connect to Mosquitto"),
            Event::Incoming(Packet::PubAck(_))
        ) {}
    })
    .await;
    assert!(acknowledged.is_ok(), "Mosquitto did not acknowledge");
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), event_loop.poll()).await;
}

/// Connects once as `client_id` with a clean session, so Mosquitto drops
/// the persistent session that Ferrite left behind.
async fn clear_session(client_id: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

    let mut options = MqttOptions::new(client_id, "127.0.0.1", 1883);
    options.set_clean_session(true);
    let (client, mut event_loop) = AsyncClient::new(options, 10);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(
            event_loop.poll().await,
            Ok(Event::Incoming(Packet::ConnAck(_))) | Err(_)
        ) {}
    })
    .await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), event_loop.poll()).await;
}

fn mosquitto_available() -> bool {
    std::net::TcpStream::connect_timeout(&MOSQUITTO.parse().unwrap(), Duration::from_secs(1))
        .is_ok()
}

#[tokio::test]
async fn chirpstack_mqtt_uplinks_are_stored_across_restart() {
    assert!(
        mosquitto_available(),
        "these tests need Mosquitto on {MOSQUITTO}; .ci/run starts it"
    );
    // A unique prefix keeps this test's messages and session apart from
    // other runs on the same broker.
    let prefix = format!("ferrite-it-{:08x}", rand::random::<u32>());
    let filter = format!("{prefix}/application/+/device/+/event/up");
    let client_id = format!("{prefix}-subscriber");
    let env = [
        (
            "FERRITE_LORAWAN_CHIRPSTACK_MQTT_URL",
            "mqtt://127.0.0.1:1883",
        ),
        (
            "FERRITE_LORAWAN_CHIRPSTACK_MQTT_TOPIC_FILTER",
            filter.as_str(),
        ),
        (
            "FERRITE_LORAWAN_CHIRPSTACK_MQTT_CLIENT_ID",
            client_id.as_str(),
        ),
    ];
    let mut server = Server::start_with_env(&env).await;
    let lorawan = Lorawan::new(&server).await;
    let device = lorawan
        .device("mqtt-lpp", LPP_PROFILE, "70b3d57ed0001a08")
        .await;
    let topic = format!("{prefix}/application/ca739e26/device/70b3d57ed0001a08/event/up");

    // Wait for the subscription: publish until the first uplink arrives.
    let event = chirpstack_up("70b3d57ed0001a08", 1, 3, &LPP_BYTES);
    let path = format!("/api/v1/devices/{}/telemetry/latest", device.id);
    let stored = wait_until(
        || async {
            publish_to_mosquitto(&topic, event.to_string().into_bytes()).await;
            let (_, latest) = server.get_json(&path).await;
            latest.get("temperature_1").is_some()
        },
        Duration::from_secs(20),
    )
    .await;
    assert!(stored, "no uplink arrived over MQTT");
    let latest = latest_with(&server, &device, "relative_humidity_2").await;
    assert_eq!(latest["temperature_1"]["value"], 21.5);

    // An event that cannot be stored is acknowledged and skipped, so the
    // next one still arrives.
    publish_to_mosquitto(&topic, b"{\"deviceInfo\": 5}".to_vec()).await;

    drop(lorawan);

    // While Ferrite is down the broker keeps the messages of its
    // persistent session and delivers them after the restart.
    server.terminate();
    let later = json!({
        "time": "2026-03-14T10:00:00Z",
        "deviceInfo": {"devEui": "70B3D57ED0001A08"},
        "fCnt": 2,
        "fPort": 3,
        "data": base64(&[0x05, 0x67, 0x01, 0x10]),
    });
    publish_to_mosquitto(&topic, later.to_string().into_bytes()).await;
    server.restart().await;
    let latest = latest_with(&server, &device, "temperature_5").await;
    assert_eq!(latest["temperature_5"]["value"], 27.2);
    assert_eq!(latest["temperature_5"]["ts"], 1_773_482_400_000i64);

    server.terminate();
    clear_session(&client_id).await;
}
