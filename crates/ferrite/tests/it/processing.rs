//! Device profiles, codecs, the dead-letter log and alarms through the API
//! and the device protocols of the real binary.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, TestDevice};

struct Api<'a> {
    server: &'a Server,
    client: reqwest::Client,
    token: String,
}

impl<'a> Api<'a> {
    async fn new(server: &'a Server) -> Api<'a> {
        Api {
            server,
            client: reqwest::Client::new(),
            token: server.admin_token().await,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.server.http_url))
            .bearer_auth(&self.token)
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

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            path,
            "application/json",
            body.to_string(),
        )
        .await
    }

    async fn yaml(&self, method: reqwest::Method, path: &str, yaml: &str) -> (u16, Value) {
        self.send(method, path, "application/yaml", yaml.to_owned())
            .await
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.server.get_json(path).await
    }

    /// Creates a device with a profile and returns it with its token.
    async fn device(&self, name: &str, profile: &str) -> TestDevice {
        let (status, body) = self
            .post("/api/v1/devices", json!({"name": name, "profile": profile}))
            .await;
        assert_eq!(status, 201, "{body}");
        TestDevice {
            id: body["id"].as_str().unwrap().to_owned(),
            token: body["token"].as_str().unwrap().to_owned(),
        }
    }

    async fn telemetry(&self, device: &TestDevice, content_type: &str, body: Vec<u8>) -> u16 {
        self.client
            .post(format!(
                "{}/api/v1/{}/telemetry",
                self.server.http_url, device.token
            ))
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .expect("telemetry request")
            .status()
            .as_u16()
    }

    async fn wait_for(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, body) = self.get(path).await;
            if status == 200 && check(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never matched; last response: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const THERMOMETER: &str = r#"
name: thermometer
keys:
  temperature: { type: number, unit: Cel, min: -40, max: 85, required: true }
transform:
  - rename: { from: temp, to: temperature }
rules:
  - name: overheating
    severity: critical
    condition: { threshold: { key: temperature, op: ">", value: 30 } }
    message: "{device} reads {temperature} °C"
"#;

#[tokio::test]
async fn profiles_are_created_exported_imported_and_protected_while_in_use() {
    let server = Server::start().await;
    let api = Api::new(&server).await;

    let (status, created) = api
        .yaml(reqwest::Method::POST, "/api/v1/profiles", THERMOMETER)
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["version"], 1);
    let (status, duplicate) = api
        .yaml(reqwest::Method::POST, "/api/v1/profiles", THERMOMETER)
        .await;
    assert_eq!(status, 409, "{duplicate}");

    // Every problem of a bad profile comes back at once.
    let (status, invalid) = api
        .yaml(
            reqwest::Method::POST,
            "/api/v1/profiles",
            "name: bad\nkeys: { t: { min: 5, max: 1 } }\ntransform: [{ convert: { key: t, from: Cel, to: m } }]\n",
        )
        .await;
    assert_eq!(status, 422, "{invalid}");
    assert_eq!(invalid["errors"].as_array().unwrap().len(), 2, "{invalid}");

    // Export as YAML, change it, import it with a new profile.
    let (status, exported) = api
        .send(
            reqwest::Method::GET,
            "/api/v1/profiles?format=yaml",
            "text/plain",
            "",
        )
        .await;
    assert_eq!(status, 200);
    let exported = exported.as_str().expect("YAML text").to_owned();
    assert!(exported.contains("name: thermometer"), "{exported}");
    let file = format!(
        "{}\n---\nname: counter\nkeys: {{ count: {{ type: integer }} }}\n",
        exported.replace("value: 30.0", "value: 35.0")
    );
    let (status, imported) = api
        .yaml(reqwest::Method::POST, "/api/v1/profiles/import", &file)
        .await;
    assert_eq!(status, 200, "{imported}");
    let actions: Vec<&str> = imported["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|profile| profile["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["updated", "created"]);
    let (_, again) = api
        .yaml(reqwest::Method::POST, "/api/v1/profiles/import", &file)
        .await;
    assert_eq!(again["profiles"][0]["action"], "unchanged", "{again}");
    let (_, thermometer) = api.get("/api/v1/profiles/thermometer").await;
    assert_eq!(thermometer["version"], 2);
    assert_eq!(
        thermometer["spec"]["rules"][0]["condition"]["threshold"]["value"],
        35.0
    );

    // An import with one bad profile saves nothing.
    let (status, rejected) = api
        .yaml(
            reqwest::Method::POST,
            "/api/v1/profiles/import",
            "name: fine\n---\nname: broken\nkeys: { t: { type: decimal } }\n",
        )
        .await;
    assert_eq!(status, 422, "{rejected}");
    assert_eq!(api.get("/api/v1/profiles/fine").await.0, 404);

    // A profile in use cannot be deleted.
    let device = api.device("probe", "thermometer").await;
    let (status, conflict) = api
        .send(
            reqwest::Method::DELETE,
            "/api/v1/profiles/thermometer",
            "text/plain",
            "",
        )
        .await;
    assert_eq!(status, 409, "{conflict}");
    let (status, _) = api
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/devices/{}", device.id),
            "application/json",
            json!({"profile": null}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .send(
            reqwest::Method::DELETE,
            "/api/v1/profiles/thermometer",
            "text/plain",
            "",
        )
        .await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn invalid_messages_go_to_the_dead_letter_log_and_replay_after_a_fix() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    let (status, _) = api
        .yaml(reqwest::Method::POST, "/api/v1/profiles", THERMOMETER)
        .await;
    assert_eq!(status, 201);
    let device = api.device("boiler", "thermometer").await;

    // The schema check runs in the pipeline: the device gets 200 because
    // the message is durable, and the reason lands in the dead-letter log.
    for body in [
        r#"{"temp": 21.5}"#,
        r#"{"temp": 90}"#,
        r#"{"humidity": 40}"#,
    ] {
        assert_eq!(
            api.telemetry(&device, "application/json", body.into())
                .await,
            200
        );
    }
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 2)
            },
        )
        .await;
    let reasons: Vec<&str> = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons[0].contains("required key \"temperature\""),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("above the maximum 85"), "{reasons:?}");
    assert_eq!(letters["dead_letters"][1]["stage"], "validate");
    assert_eq!(letters["dead_letters"][1]["payload"], r#"{"temp": 90}"#);
    let latest = server.latest(&device.id).await;
    assert_eq!(latest["temperature"]["value"], 21.5);

    // Fix the profile, replay: the hot reading is stored at its original
    // time and raises the alarm; the other one fails again.
    let fixed = THERMOMETER.replace("max: 85", "max: 120");
    let (status, body) = api
        .yaml(reqwest::Method::PUT, "/api/v1/profiles/thermometer", &fixed)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, replayed) = api
        .post(
            &format!("/api/v1/devices/{}/dead-letters/replay", device.id),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["replayed"], 2);
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", device.id),
        |body| body["temperature"]["value"] == 90,
    )
    .await;
    let pending = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters?pending=true", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 1)
            },
        )
        .await;
    assert!(
        pending["dead_letters"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("required key")
    );
    let alarms = api
        .wait_for("/api/v1/alarms?status=active", |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| alarms.len() == 1)
        })
        .await;
    assert_eq!(alarms["alarms"][0]["message"], "boiler reads 90 °C");
}

#[tokio::test]
async fn alarms_walk_from_active_to_acknowledged_to_cleared_with_history() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    api.yaml(reqwest::Method::POST, "/api/v1/profiles", THERMOMETER)
        .await;
    let device = api.device("oven", "thermometer").await;

    assert_eq!(
        api.telemetry(&device, "application/json", br#"{"temp": 45}"#.to_vec())
            .await,
        200
    );
    let active = api
        .wait_for("/api/v1/alarms?status=active", |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| !alarms.is_empty())
        })
        .await;
    let alarm = &active["alarms"][0];
    assert_eq!(alarm["severity"], "critical");
    assert_eq!(alarm["rule"], "overheating");
    assert_eq!(alarm["device_name"], "oven");
    let id = alarm["id"].as_str().unwrap().to_owned();

    // A second reading above the threshold does not raise a second alarm.
    assert_eq!(
        api.telemetry(&device, "application/json", br#"{"temp": 50}"#.to_vec())
            .await,
        200
    );

    let (status, acknowledged) = api
        .post(&format!("/api/v1/alarms/{id}/ack"), json!({}))
        .await;
    assert_eq!(status, 200, "{acknowledged}");
    assert_eq!(acknowledged["status"], "acknowledged");
    let (status, twice) = api
        .post(&format!("/api/v1/alarms/{id}/ack"), json!({}))
        .await;
    assert_eq!(status, 409, "{twice}");

    assert_eq!(
        api.telemetry(&device, "application/json", br#"{"temp": 20}"#.to_vec())
            .await,
        200
    );
    let cleared = api
        .wait_for(&format!("/api/v1/alarms/{id}"), |body| {
            body["status"] == "cleared"
        })
        .await;
    let changes: Vec<&str> = cleared["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["change"].as_str().unwrap())
        .collect();
    assert_eq!(changes, ["raised", "acknowledged", "cleared"]);
    let (_, all) = api.get("/api/v1/alarms").await;
    assert_eq!(all["alarms"].as_array().unwrap().len(), 1, "{all}");

    // Cleared by hand while the condition holds: the next reading raises a
    // new alarm.
    assert_eq!(
        api.telemetry(&device, "application/json", br#"{"temp": 40}"#.to_vec())
            .await,
        200
    );
    let second = api
        .wait_for("/api/v1/alarms?status=open", |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| alarms.len() == 1)
        })
        .await;
    let second_id = second["alarms"][0]["id"].as_str().unwrap().to_owned();
    assert_ne!(second_id, id);
    let (status, _) = api
        .post(&format!("/api/v1/alarms/{second_id}/clear"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.telemetry(&device, "application/json", br#"{"temp": 41}"#.to_vec())
            .await,
        200
    );
    api.wait_for("/api/v1/alarms?status=active", |body| {
        body["alarms"]
            .as_array()
            .is_some_and(|alarms| alarms.len() == 1 && alarms[0]["id"] != second_id.as_str())
    })
    .await;

    let (status, _) = api.get("/api/v1/alarms?status=sleeping").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_silent_device_raises_a_no_data_alarm_that_clears_on_data() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    api.yaml(
        reqwest::Method::POST,
        "/api/v1/profiles",
        "name: heartbeat\nrules:\n  - name: silent\n    severity: major\n    condition: { no_data: { for: 1s } }\n",
    )
    .await;
    let device = api.device("pump", "heartbeat").await;
    // Two silences in a row: each raises, and data clears each.
    for round in 1..=2 {
        let raised = api
            .wait_for("/api/v1/alarms?status=active", |body| {
                body["alarms"]
                    .as_array()
                    .is_some_and(|alarms| alarms.len() == 1)
            })
            .await;
        assert_eq!(raised["alarms"][0]["rule"], "silent");
        assert_eq!(
            api.telemetry(&device, "application/json", br#"{"on": true}"#.to_vec())
                .await,
            200
        );
        api.wait_for("/api/v1/alarms?status=cleared", |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| alarms.len() == round)
        })
        .await;
    }
}

#[tokio::test]
async fn senml_and_cayenne_lpp_payloads_are_decoded_by_their_codecs() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    for profile in [
        "name: senml\ncodec: { type: senml }\nkeys: { temp: { unit: Cel } }\n",
        "name: lpp\ncodec: { type: cayenne_lpp }\n",
    ] {
        let (status, body) = api
            .yaml(reqwest::Method::POST, "/api/v1/profiles", profile)
            .await;
        assert_eq!(status, 201, "{body}");
    }

    // SenML JSON with a unit the profile converts (RFC 8428 names).
    let senml = api.device("senml-1", "senml").await;
    let pack = json!([
        {"bn": "urn:dev:ow:10e2073a01080063:", "bt": 1.7e9, "n": "temp", "u": "K", "v": 300.15},
        {"n": "humidity", "u": "%RH", "v": 40, "t": 1}
    ]);
    assert_eq!(
        api.telemetry(
            &senml,
            "application/senml+json",
            pack.to_string().into_bytes()
        )
        .await,
        200
    );
    let latest = api
        .wait_for(
            &format!("/api/v1/devices/{}/telemetry/latest", senml.id),
            |body| body.get("humidity").is_some(),
        )
        .await;
    let temp = latest["temp"]["value"].as_f64().unwrap();
    assert!((temp - 27.0).abs() < 1e-9, "{latest}");
    assert_eq!(latest["temp"]["ts"], 1_700_000_000_000i64);
    assert_eq!(latest["humidity"]["ts"], 1_700_000_001_000i64);
    // A malformed pack is refused at once, naming the record.
    let status = api
        .telemetry(
            &senml,
            "application/senml+json",
            br#"[{"n":"x","v":1,"vs":"a"}]"#.to_vec(),
        )
        .await;
    assert_eq!(status, 400);

    // Cayenne LPP bytes: two temperatures and a GPS fix.
    let lpp = api.device("lpp-1", "lpp").await;
    let bytes = hex_bytes("03670110056700ff018806765ff2960a0003e8");
    assert_eq!(
        api.telemetry(&lpp, "application/octet-stream", bytes).await,
        200
    );
    let latest = api
        .wait_for(
            &format!("/api/v1/devices/{}/telemetry/latest", lpp.id),
            |body| body.get("gps_1.latitude").is_some(),
        )
        .await;
    assert_eq!(latest["temperature_3"]["value"], 27.2);
    assert_eq!(latest["temperature_5"]["value"], 25.5);
    assert_eq!(latest["gps_1.latitude"]["value"], 42.3519);
    // Truncated bytes are accepted (the codec runs in the pipeline) and
    // land in the dead-letter log with the offset.
    assert_eq!(
        api.telemetry(&lpp, "application/octet-stream", vec![3, 0x67, 1])
            .await,
        200
    );
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", lpp.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| !letters.is_empty())
            },
        )
        .await;
    let reason = letters["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("truncated"), "{reason}");
    assert_eq!(letters["dead_letters"][0]["payload_base64"], "A2cB");

    // The dry run decodes without storing.
    let (status, tried) = api
        .post(
            "/api/v1/profiles/test",
            json!({"profile": "lpp", "payload_hex": "03 67 01 10"}),
        )
        .await;
    assert_eq!(status, 200, "{tried}");
    assert_eq!(tried["ok"], true);
    assert_eq!(tried["stored"][0]["values"]["temperature_3"], 27.2);
}

#[tokio::test]
async fn json_payloads_for_a_binary_codec_and_binary_for_json_are_told_apart() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    let plain = server.create_device("plain").await;
    // Binary bytes for a device without a binary codec: 415 naming the codec.
    let status = api
        .telemetry(&plain, "application/octet-stream", vec![1, 2, 3])
        .await;
    assert_eq!(status, 415);
}

fn hex_bytes(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(&text[index..index + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn fleet_queries_filter_and_group_by_profile_and_api_labels() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    for name in ["boiler", "chiller"] {
        api.yaml(
            reqwest::Method::POST,
            "/api/v1/profiles",
            &format!("name: {name}\n"),
        )
        .await;
    }
    let mut devices = Vec::new();
    for (name, profile, site) in [
        ("b1", "boiler", "north"),
        ("b2", "boiler", "south"),
        ("c1", "chiller", "north"),
    ] {
        let device = api.device(name, profile).await;
        let (status, _) = api
            .send(
                reqwest::Method::PATCH,
                &format!("/api/v1/devices/{}", device.id),
                "application/json",
                json!({"labels": {"site": site}}).to_string(),
            )
            .await;
        assert_eq!(status, 200);
        let body = format!(
            r#"{{"ts": 1700000000000, "values": {{"t": {}}}}}"#,
            name.len() * 10
        );
        assert_eq!(
            api.telemetry(&device, "application/json", body.into_bytes())
                .await,
            200
        );
        devices.push(device);
    }
    for device in &devices {
        api.wait_for(
            &format!("/api/v1/devices/{}/telemetry/latest", device.id),
            |body| body.get("t").is_some(),
        )
        .await;
    }
    let (status, boilers) = api
        .get("/api/v1/telemetry/latest?keys=t&profile=boiler&label=site:north")
        .await;
    assert_eq!(status, 200, "{boilers}");
    let names: Vec<&str> = boilers["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| device["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1"]);
    let (status, grouped) = api
        .get("/api/v1/telemetry/aggregate?key=t&agg=count&interval=1d&start=2023-11-14T00:00:00Z&end=2023-11-15T00:00:00Z&group_by=profile")
        .await;
    assert_eq!(status, 200, "{grouped}");
    let groups: Vec<(&str, i64)> = grouped["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            (
                group["group"].as_str().unwrap(),
                group["buckets"][0]["count"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(groups, [("boiler", 2), ("chiller", 1)]);
    let (status, _) = api
        .get("/api/v1/telemetry/latest?keys=t&profile=nope")
        .await;
    assert_eq!(status, 404);
}

/// A formatter in the style of The Things Stack device repository: signed
/// 16-bit big-endian temperature in hundredths of a degree, humidity in
/// half percent, a battery flag, errors for a bad length.
const TH_DECODER: &str = r#"
function readInt16BE(bytes, index) {
  var value = (bytes[index] << 8) | bytes[index + 1];
  return value > 0x7fff ? value - 0x10000 : value;
}

function decodeUplink(input) {
  if (input.bytes.length !== 4) {
    return { errors: ["expected 4 bytes, got " + input.bytes.length] };
  }
  var warnings = [];
  var battery_low = (input.bytes[3] & 0x80) !== 0;
  if (battery_low) {
    warnings.push("battery low");
  }
  return {
    data: {
      temperature: readInt16BE(input.bytes, 0) / 100,
      humidity: (input.bytes[2]) / 2,
      battery: { low: battery_low },
      port: input.fPort
    },
    warnings: warnings
  };
}
"#;

#[tokio::test]
async fn scripted_decoders_run_unchanged_and_fail_into_the_dead_letter_log() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    let spec = json!({
        "name": "th-lora",
        "codec": {"type": "script", "script": TH_DECODER},
        "keys": {"temperature": {"type": "number", "min": -40, "max": 85}},
    });
    let (status, body) = api.post("/api/v1/profiles", spec).await;
    assert_eq!(status, 201, "{body}");

    // Try it before any device sends.
    let (status, tried) = api
        .post(
            "/api/v1/profiles/test",
            json!({"profile": "th-lora", "payload_hex": "f8 30 64 80"}),
        )
        .await;
    assert_eq!(status, 200, "{tried}");
    assert_eq!(tried["stored"][0]["values"]["temperature"], -20.0);
    assert_eq!(tried["stored"][0]["values"]["humidity"], 50.0);
    assert_eq!(tried["stored"][0]["values"]["battery.low"], true);

    let device = api.device("lora-7", "th-lora").await;
    // 0x0929 = 2345: 23.45 °C; 0x91 / 2 = 72.5 %.
    assert_eq!(
        api.telemetry(
            &device,
            "application/octet-stream",
            vec![0x09, 0x29, 0x91, 0x00]
        )
        .await,
        200
    );
    let latest = api
        .wait_for(
            &format!("/api/v1/devices/{}/telemetry/latest", device.id),
            |body| body.get("temperature").is_some(),
        )
        .await;
    assert_eq!(latest["temperature"]["value"], 23.45);
    assert_eq!(latest["humidity"]["value"], 72.5);
    assert_eq!(latest["battery.low"]["value"], false);

    // The script's own errors, and a value the schema rejects.
    assert_eq!(
        api.telemetry(&device, "application/octet-stream", vec![1, 2])
            .await,
        200
    );
    assert_eq!(
        api.telemetry(&device, "application/octet-stream", vec![0x27, 0x10, 0, 0])
            .await,
        200
    );
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 2)
            },
        )
        .await;
    let reasons: Vec<&str> = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap())
        .collect();
    assert!(reasons[0].contains("above the maximum 85"), "{reasons:?}");
    assert!(
        reasons[1].contains("expected 4 bytes, got 2"),
        "{reasons:?}"
    );
    assert_eq!(letters["dead_letters"][1]["stage"], "decode");

    // A script that never ends is stopped at its time limit and the worker
    // goes on with the next message.
    let (status, body) = api
        .post(
            "/api/v1/profiles",
            json!({"name": "spinner", "codec": {"type": "script", "max_run_time": "50ms",
                   "script": "function decodeUplink(input) { if (input.bytes[0] === 1) { while (true) {} } return {data: {v: input.bytes[0]}}; }"}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let spinner = api.device("spinner-1", "spinner").await;
    assert_eq!(
        api.telemetry(&spinner, "application/octet-stream", vec![1])
            .await,
        200
    );
    assert_eq!(
        api.telemetry(&spinner, "application/octet-stream", vec![2])
            .await,
        200
    );
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", spinner.id),
        |body| body["v"]["value"] == 2,
    )
    .await;
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", spinner.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 1)
            },
        )
        .await;
    let reason = letters["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("50ms") || reason.contains("time"),
        "{reason}"
    );

    // A script with a syntax error is refused when saved.
    let (status, invalid) = api
        .post(
            "/api/v1/profiles",
            json!({"name": "broken", "codec": {"type": "script", "script": "function decodeUplink(input) { return {data: {}; }"}}),
        )
        .await;
    assert_eq!(status, 422, "{invalid}");
    assert!(
        invalid["detail"].as_str().unwrap().contains("syntax error"),
        "{invalid}"
    );
}

#[tokio::test]
async fn alarm_changes_run_the_rule_webhook_signed() {
    let receiver = crate::actions::Receiver::start(Vec::new()).await;
    let server = Server::start().await;
    let api = Api::new(&server).await;
    let spec = json!({
        "name": "tank",
        "rules": [{
            "name": "low-level",
            "severity": "minor",
            "condition": {"threshold": {"key": "level", "op": "<", "value": 10}},
            "actions": [{"type": "webhook", "url": receiver.url, "secret": "s3cret"}],
        }],
    });
    let (status, body) = api.post("/api/v1/profiles", spec).await;
    assert_eq!(status, 201, "{body}");
    let device = api.device("tank-3", "tank").await;
    for level in [50, 5, 60] {
        let body = format!(r#"{{"level": {level}}}"#).into_bytes();
        assert_eq!(api.telemetry(&device, "application/json", body).await, 200);
        // Keep the messages apart, so each change is its own webhook.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while receiver.requests().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "webhooks did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests = receiver.requests();
    let events: Vec<&str> = requests
        .iter()
        .map(|(headers, _)| headers["x-ferrite-event"].to_str().unwrap())
        .collect();
    assert_eq!(events, ["alarm.raised", "alarm.cleared"]);
    let (headers, body) = &requests[0];
    assert!(
        headers["x-ferrite-signature"]
            .to_str()
            .unwrap()
            .starts_with("sha256=")
    );
    let body: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(body["alarm"]["rule"], "low-level");
    assert_eq!(body["device"]["name"], "tank-3");
}

#[tokio::test]
async fn a_crash_replay_repeats_no_alarm_and_no_dead_letter() {
    let mut server = Server::start().await;
    let device = {
        let api = Api::new(&server).await;
        api.yaml(reqwest::Method::POST, "/api/v1/profiles", THERMOMETER)
            .await;
        let device = api.device("kiln", "thermometer").await;
        for body in [r#"{"temp": 35}"#, r#"{"temp": 20}"#, r#"{"temp": 90}"#] {
            assert_eq!(
                api.telemetry(&device, "application/json", body.into())
                    .await,
                200
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        api.wait_for("/api/v1/alarms?status=cleared", |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| alarms.len() == 1)
        })
        .await;
        api.wait_for(
            &format!("/api/v1/devices/{}/dead-letters", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 1)
            },
        )
        .await;
        device
    };

    // SIGKILL before the store flushes: the log replays all three messages.
    server.restart().await;
    let api = Api::new(&server).await;
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", device.id),
        |body| body["temperature"]["value"] == 20,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, alarms) = api.get("/api/v1/alarms").await;
    assert_eq!(alarms["alarms"].as_array().unwrap().len(), 1, "{alarms}");
    let (_, letters) = api
        .get(&format!("/api/v1/devices/{}/dead-letters", device.id))
        .await;
    assert_eq!(
        letters["dead_letters"].as_array().unwrap().len(),
        1,
        "{letters}"
    );
}

#[tokio::test]
async fn an_expression_that_fails_on_some_input_rejects_only_that_message() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    // evalexpr's substring cuts bytes, so it fails on non-ASCII text.
    let (status, body) = api
        .yaml(
            reqwest::Method::POST,
            "/api/v1/profiles",
            "name: labels\ntransform:\n  - derive: { key: initial, expression: 'str::substring(status, 0, 1)' }\nrules:\n  - name: flag\n    condition: { expression: 'door_open && temperature > 30' }\n",
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let device = api.device("door-1", "labels").await;
    assert_eq!(
        api.telemetry(
            &device,
            "application/json",
            r#"{"status": "été"}"#.as_bytes().to_vec()
        )
        .await,
        200
    );
    assert_eq!(
        api.telemetry(
            &device,
            "application/json",
            br#"{"status": "open", "door_open": true, "temperature": 35}"#.to_vec()
        )
        .await,
        200
    );
    let latest = api
        .wait_for(
            &format!("/api/v1/devices/{}/telemetry/latest", device.id),
            |body| body.get("initial").is_some(),
        )
        .await;
    assert_eq!(latest["initial"]["value"], "o");
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 1)
            },
        )
        .await;
    assert_eq!(letters["dead_letters"][0]["stage"], "transform");
    api.wait_for("/api/v1/alarms?status=active", |body| {
        body["alarms"]
            .as_array()
            .is_some_and(|alarms| alarms.len() == 1)
    })
    .await;
}

#[tokio::test]
async fn an_open_mqtt_session_uses_the_profile_set_after_it_connected() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    api.yaml(
        reqwest::Method::POST,
        "/api/v1/profiles",
        "name: lpp\ncodec: { type: cayenne_lpp }\n",
    )
    .await;
    let device = server.create_device("switcher").await;
    let mut options = rumqttc::MqttOptions::new("switcher", "127.0.0.1", server.mqtt_addr.port());
    options.set_credentials(&device.token, "");
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let poller = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    client
        .publish(
            "v1/devices/me/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"a": 1}"#,
        )
        .await
        .unwrap();
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", device.id),
        |body| body.get("a").is_some(),
    )
    .await;

    let (status, _) = api
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/devices/{}", device.id),
            "application/json",
            json!({"profile": "lpp"}).to_string(),
        )
        .await;
    assert_eq!(status, 200);
    client
        .publish(
            "v1/devices/me/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            vec![0x03, 0x67, 0x01, 0x10],
        )
        .await
        .unwrap();
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", device.id),
        |body| body["temperature_3"]["value"] == 27.2,
    )
    .await;
    poller.abort();
}

#[tokio::test]
async fn points_older_than_the_profile_retention_are_rejected() {
    let server = Server::start().await;
    let api = Api::new(&server).await;
    api.yaml(
        reqwest::Method::POST,
        "/api/v1/profiles",
        "name: short-lived\nretention: 1h\n",
    )
    .await;
    let device = api.device("probe-9", "short-lived").await;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let old = format!(
        r#"{{"ts": {}, "values": {{"t": 1}}}}"#,
        now_ms - 2 * 3_600_000
    );
    let recent = format!(r#"{{"ts": {}, "values": {{"t": 2}}}}"#, now_ms - 60_000);
    for body in [old, recent] {
        assert_eq!(
            api.telemetry(&device, "application/json", body.into_bytes())
                .await,
            200
        );
    }
    let letters = api
        .wait_for(
            &format!("/api/v1/devices/{}/dead-letters", device.id),
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| letters.len() == 1)
            },
        )
        .await;
    assert_eq!(letters["dead_letters"][0]["stage"], "timestamp");
    let reason = letters["dead_letters"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("retention of 1h"), "{reason}");
    api.wait_for(
        &format!("/api/v1/devices/{}/telemetry/latest", device.id),
        |body| body["t"]["value"] == 2,
    )
    .await;
}
