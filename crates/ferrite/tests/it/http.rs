//! HTTP telemetry, line protocol, the REST API and the process interface.

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{BINARY, Server, free_port, wait_until};

async fn post(
    server: &Server,
    path: &str,
    bearer: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url))
        .body(body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn wait_for_key(server: &Server, device_id: &str, key: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let latest = server.latest(device_id).await;
        if let Some(point) = latest.get(key) {
            return point.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{key} not stored: {latest}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn json_shapes_are_stored() {
    let server = Server::start().await;
    let device = server.create_device("shapes").await;
    let rows = [
        (
            r#"{"temperature": 21.5, "on": true, "mode": "eco"}"#,
            vec![
                ("temperature", json!(21.5)),
                ("on", json!(true)),
                ("mode", json!("eco")),
            ],
        ),
        (
            r#"{"ts": 1714953600000, "values": {"humidity": 40}}"#,
            vec![("humidity", json!(40))],
        ),
        (
            r#"[{"ts": 1714953601000, "values": {"a": 1}}, {"b": 2.5}]"#,
            vec![("a", json!(1)), ("b", json!(2.5))],
        ),
        (
            r#"{"gps": {"lat": 52.1, "lon": 4.3}}"#,
            vec![("gps.lat", json!(52.1)), ("gps.lon", json!(4.3))],
        ),
    ];
    for (body, expected) in &rows {
        let (status, text) = post(
            &server,
            &format!("/api/v1/{}/telemetry", device.token),
            None,
            *body,
        )
        .await;
        assert_eq!(status, 200, "{body}: {text}");
        for (key, value) in expected {
            let point = wait_for_key(&server, &device.id, key).await;
            assert_eq!(&point["value"], value, "{key}");
        }
    }
    let humidity = wait_for_key(&server, &device.id, "humidity").await;
    assert_eq!(humidity["ts"], json!(1_714_953_600_000i64));
}

#[tokio::test]
async fn bad_json_payloads_are_rejected() {
    let server = Server::start().await;
    let device = server.create_device("bad-json").await;
    let path = format!("/api/v1/{}/telemetry", device.token);
    let far_future = chrono::Utc::now().timestamp_millis() + 10 * 86_400_000;
    let future_body = format!("{{\"ts\": {far_future}, \"values\": {{\"t\": 1}}}}");
    let rows = [
        ("{\"t\": 1", "malformed"),
        ("{\"t\": null}", "\"t\""),
        ("{\"t\": [1, 2]}", "\"t\""),
        ("{}", "no values"),
        ("not json", "malformed"),
        (future_body.as_str(), "ahead of the server clock"),
    ];
    for (body, needle) in rows {
        let (status, text) = post(&server, &path, None, body.to_owned()).await;
        assert_eq!(status, 400, "{body}: {text}");
        let problem: Value = serde_json::from_str(&text).expect("problem JSON");
        assert!(
            problem["detail"].as_str().unwrap().contains(needle),
            "{body}: {text}"
        );
    }
    let (status, _) = post(&server, &path, None, "{\"ok\": 1}").await;
    assert_eq!(status, 200, "the device still writes after bad input");
}

#[tokio::test]
async fn invalid_tokens_are_rejected() {
    let server = Server::start().await;
    let device = server.create_device("tokens").await;
    let (status, text) = post(
        &server,
        "/api/v1/fdt_not-a-token/telemetry",
        None,
        "{\"t\":1}",
    )
    .await;
    assert_eq!(status, 401, "{text}");

    // A device token cannot write another device's telemetry.
    let other = server.create_device("other").await;
    let (status, text) = post(
        &server,
        &format!("/api/v1/devices/{}/telemetry", other.id),
        Some(&device.token),
        "{\"t\":1}",
    )
    .await;
    assert_eq!(status, 403, "{text}");
    let (status, _) = post(
        &server,
        &format!("/api/v1/devices/{}/telemetry", device.id),
        Some(&device.token),
        "{\"t\":1}",
    )
    .await;
    assert_eq!(status, 200);

    // A rotated token stops working at once.
    let admin = server.admin_token().await;
    let (status, text) = post(
        &server,
        &format!("/api/v1/devices/{}/token", device.id),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        "{\"t\":1}",
    )
    .await;
    assert_eq!(status, 401);
    let new_token = serde_json::from_str::<Value>(&text).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = post(
        &server,
        &format!("/api/v1/{new_token}/telemetry"),
        None,
        "{\"t\":1}",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_and_gzip_bodies() {
    let server = Server::start_with_env(&[("FERRITE_HTTP_MAX_BODY_BYTES", "4096")]).await;
    let device = server.create_device("sizes").await;
    let big = format!("{{\"s\": \"{}\"}}", "x".repeat(5000));
    let (status, text) = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        big.clone(),
    )
    .await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("4096"), "{text}");

    // A gzip body that inflates past the limit is rejected too.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(big.as_bytes()).unwrap();
    let compressed = encoder.finish().unwrap();
    assert!(compressed.len() < 4096);
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/{}/telemetry",
            server.http_url, device.token
        ))
        .header("Content-Encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // A small gzip line-protocol body is accepted.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder
        .write_all(b"weather,device=x temp=3.5 1714953600000\n")
        .unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/api/v2/write?precision=ms", server.http_url))
        .header("Authorization", format!("Token {}", device.token))
        .header("Content-Encoding", "gzip")
        .body(encoder.finish().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let point = wait_for_key(&server, &device.id, "weather.temp").await;
    assert_eq!(point, json!({"ts": 1_714_953_600_000i64, "value": 3.5}));
}

#[tokio::test]
async fn api_key_writes_a_fleet_by_tag() {
    let server = Server::start().await;
    let key = server.create_api_key("telegraf", "operator");
    let viewer = server.create_api_key("grafana", "viewer");
    let body = "readings,name=truck-1,fleet=East velocity=50.5 1714953600000000000\n\
                readings,name=truck-2,fleet=West velocity=20 1714953600000000000\n\
                diagnostics,name=truck-1 fuel_state=0.7 1714953600000000000\n";
    let (status, text) = post(&server, "/write?device_tag=name", Some(&viewer), body).await;
    assert_eq!(status, 403, "a viewer key cannot write: {text}");
    let (status, text) = post(&server, "/write?device_tag=name", Some(&key), body).await;
    assert_eq!(status, 204, "{text}");

    let (status, list) = server.get_json("/api/v1/devices").await;
    assert_eq!(status, 200);
    let devices = list["devices"].as_array().unwrap();
    let truck1 = devices
        .iter()
        .find(|d| d["name"] == "truck-1")
        .expect("truck-1 created");
    let id = truck1["id"].as_str().unwrap();
    let velocity = wait_for_key(&server, id, "readings.velocity").await;
    assert_eq!(velocity["value"], json!(50.5));
    let fuel = wait_for_key(&server, id, "diagnostics.fuel_state").await;
    assert_eq!(fuel["value"], json!(0.7));

    // Tags other than the device tag become labels of the device.
    let labels_stored = wait_until(
        || async {
            let (_, device) = server.get_json(&format!("/api/v1/devices/{id}")).await;
            device["labels"] == json!({"fleet": "East"})
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(
        labels_stored,
        "truck-1 has the label fleet=East and no name label"
    );

    // A line without the device tag rejects the batch.
    let (status, text) = post(
        &server,
        "/write?device_tag=name",
        Some(&key),
        "readings velocity=1 1\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("line 1"), "{text}");

    // The API key also works on the query API.
    let response = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/devices/{id}/telemetry/latest",
            server.http_url
        ))
        .bearer_auth(&viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn concurrent_batches_create_each_new_device_once() {
    let server = Server::start().await;
    let key = server.create_api_key("telegraf", "operator");
    // More names than one lookup statement takes, sent by four requests at
    // once, each in its own order.
    const DEVICES: usize = 1200;
    let body = |shift: usize| -> String {
        (0..DEVICES)
            .map(|n| {
                let truck = (n + shift * 300) % DEVICES;
                format!("readings,name=truck-{truck} velocity={n} 1714953600000000000\n")
            })
            .collect()
    };
    let requests = (0..4).map(|shift| {
        let (server, key, body) = (&server, &key, body(shift));
        async move { post(server, "/write?device_tag=name", Some(key), body).await }
    });
    for (status, text) in futures::future::join_all(requests).await {
        assert_eq!(status, 204, "{text}");
    }

    let mut names = std::collections::BTreeSet::new();
    for offset in [0, 1000] {
        let (status, list) = server
            .get_json(&format!("/api/v1/devices?limit=1000&offset={offset}"))
            .await;
        assert_eq!(status, 200);
        for device in list["devices"].as_array().unwrap() {
            assert!(
                names.insert(device["name"].as_str().unwrap().to_owned()),
                "{} listed twice",
                device["name"]
            );
        }
    }
    assert_eq!(names.len(), DEVICES);
}

#[tokio::test]
async fn devices_api_and_last_seen() {
    let server = Server::start().await;
    let admin = server.admin_token().await;
    let (status, text) = post(
        &server,
        "/api/v1/devices",
        Some(&admin),
        r#"{"name": "boiler-1"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let token = created["token"].as_str().unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(created["online"], json!(false));

    let (status, text) = post(
        &server,
        "/api/v1/devices",
        Some(&admin),
        r#"{"name": "boiler-1"}"#,
    )
    .await;
    assert_eq!(status, 409, "{text}");

    let (status, _) = post(
        &server,
        &format!("/api/v1/{token}/telemetry"),
        None,
        r#"{"t": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let online = wait_until(
        || async {
            let (_, device) = server.get_json(&format!("/api/v1/devices/{id}")).await;
            device["online"] == json!(true) && device["last_seen_at"].is_i64()
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(online, "last_seen_at is set after a message");

    // Errors are problem details naming what was wrong.
    let (status, body) = server.get_json("/api/v1/devices/not-a-uuid").await;
    assert_eq!(status, 404);
    assert_eq!(body["status"], json!(404));
    let response = reqwest::Client::new()
        .get(format!("{}/api/v1/devices", server.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    let (status, _) = post(
        &server,
        "/api/v1/auth/login",
        None,
        r#"{"email": "tester@example.com", "password": "wrong"}"#,
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn health_and_metrics() {
    let server = Server::start().await;
    let device = server.create_device("metrics").await;
    let _ = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        "{oops",
    )
    .await;
    let _ = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        r#"{"t": 1}"#,
    )
    .await;
    let health = reqwest::get(format!("{}/healthz", server.http_url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let metrics = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "ferrite_ingest_messages_total",
        "ferrite_ingest_rejected_total",
        "ferrite_ingest_log_records_total",
        "ferrite_mqtt_connections",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(metrics.contains("reason=\"invalid_json\""), "{metrics}");
}

#[tokio::test]
async fn port_in_use_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(BINARY)
        .args(["serve", "--data-dir"])
        .arg(data.path())
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--mqtt-listen"), "{stderr}");
    assert!(stderr.contains(&port.to_string()), "{stderr}");
}

#[tokio::test]
async fn graceful_shutdown_keeps_data() {
    let mut server = Server::start().await;
    let device = server.create_device("shutdown").await;
    let (status, _) = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        r#"{"ts": 1714953600000, "values": {"t": 7}}"#,
    )
    .await;
    assert_eq!(status, 200);
    server.terminate();
    // After a clean stop the log is drained into the store: nothing to replay.
    server.restart().await;
    let latest = server.latest(&device.id).await;
    assert_eq!(latest["t"], json!({"ts": 1_714_953_600_000i64, "value": 7}));
}

#[tokio::test]
async fn silent_http_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let server = Server::start_with_env(&[("FERRITE_HTTP_HEADER_READ_TIMEOUT", "1s")]).await;
    let partial_request: &[&[u8]] = &[
        b"",
        b"POST /write HTTP/1.1\r\nHost: x\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for sent in partial_request {
        let mut stream = tokio::net::TcpStream::connect(server.http_addr)
            .await
            .unwrap();
        stream.write_all(sent).await.unwrap();
        let started = std::time::Instant::now();
        // Read until the server closes: a complete request gets its
        // response first, then the idle kept-alive connection is closed.
        let mut received = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
        assert!(
            read.is_ok(),
            "a connection that sent {sent:?} is still open after 5 s"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "closed too early"
        );
    }
    let health = reqwest::get(format!("{}/healthz", server.http_url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn api_mistakes_get_problem_details() {
    let server = Server::start().await;
    let device = server.create_device("mistakes").await;
    let (status, _) = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        r#"{"a": 1, "b": 2}"#,
    )
    .await;
    assert_eq!(status, 200);
    wait_for_key(&server, &device.id, "b").await;
    let client = reqwest::Client::new();

    // A device token cannot read the API, and the error names what to use.
    let response = client
        .get(format!(
            "{}/api/v1/devices/{}/telemetry/latest",
            server.http_url, device.id
        ))
        .bearer_auth(&device.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("API key"),
        "{problem}"
    );

    // Latest values can be filtered by key; a misspelt parameter is an error.
    let (status, latest) = server
        .get_json(&format!(
            "/api/v1/devices/{}/telemetry/latest?keys=b",
            device.id
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        latest.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["b"]
    );
    let (status, problem) = server
        .get_json(&format!(
            "/api/v1/devices/{}/telemetry?keys=a&startt=1",
            device.id
        ))
        .await;
    assert_eq!(status, 400);
    assert!(
        problem["detail"].as_str().unwrap().contains("startt"),
        "{problem}"
    );

    // Unknown paths and methods also get problem details.
    let response = client
        .get(format!("{}/api/v1/nothing/here", server.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let response = client
        .delete(format!("{}/api/v1/auth/login", server.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );

    // InfluxDB clients check /ping and /health before writing.
    let ping = client
        .get(format!("{}/ping", server.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 204);
    let health: Value = client
        .get(format!("{}/health", server.http_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], json!("pass"));
}

#[tokio::test]
async fn default_start_aligns_buckets_to_the_interval() {
    let server = Server::start().await;
    let device = server.create_device("aligned").await;
    let (status, _) = post(
        &server,
        &format!("/api/v1/{}/telemetry", device.token),
        None,
        r#"{"t": 1}"#,
    )
    .await;
    assert_eq!(status, 200);
    wait_for_key(&server, &device.id, "t").await;
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/devices/{}/telemetry?keys=t&interval=1h&agg=count",
            device.id
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["t"].as_array().unwrap();
    assert!(
        buckets.len() >= 24 && buckets.len() <= 25,
        "{} buckets",
        buckets.len()
    );
    for bucket in buckets {
        assert_eq!(bucket["ts"].as_i64().unwrap() % 3_600_000, 0, "{bucket}");
    }
    let total: i64 = buckets.iter().map(|b| b["count"].as_i64().unwrap()).sum();
    assert_eq!(total, 1);
}

#[tokio::test]
async fn api_keys_are_listed_and_revoked() {
    let server = Server::start().await;
    let admin = server.admin_token().await;
    let (status, text) = post(
        &server,
        "/api/v1/api-keys",
        Some(&admin),
        r#"{"name": "grafana", "role": "viewer"}"#,
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let created: Value = serde_json::from_str(&text).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();

    let (status, list) = server.get_json("/api/v1/api-keys").await;
    assert_eq!(status, 200);
    let listed = list["api_keys"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|k| k["id"] == json!(id) && k["name"] == json!("grafana")),
        "{list}"
    );
    assert!(
        !list.to_string().contains(&key),
        "the list must not contain secrets"
    );

    // A viewer key can neither list nor revoke keys.
    let client = reqwest::Client::new();
    let response = client
        .get(format!("{}/api/v1/api-keys", server.http_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // After revocation the key stops working at once.
    let response = client
        .delete(format!("{}/api/v1/api-keys/{id}", server.http_url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = client
        .get(format!("{}/api/v1/devices", server.http_url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let response = client
        .delete(format!("{}/api/v1/api-keys/{id}", server.http_url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "revoking twice is not found");
}
