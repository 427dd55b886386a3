//! Encryption at rest: secrets sealed under tenant data keys survive a
//! restart and a master key rotation while the server runs, never appear
//! in plain text in the data directory, and become unreadable when their
//! tenant is deleted. DTLS handshakes use `openssl s_client` and the
//! database is read and changed with the `sqlite3` shell, so no code of
//! this project checks itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::{Server, TestDevice, run_cli, wait_until};

const PSK_HEX: &str = "5e4b2a1c0d9f8e7d6c5b4a3928170605";
const NWK_S_KEY: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0";
const APP_S_KEY: &str = "b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
const WEBHOOK_SECRET: &str = "webhook-s3cr3t-at-rest";
const HEADER_TOKEN: &str = "Bearer header-t0ken-at-rest";

async fn api(
    server: &Server,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http_url))
        .bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn set_psk(server: &Server, token: &str, device: &str, identity: &str) {
    let (status, body) = api(
        server,
        token,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{device}/credentials/psk"),
        Some(json!({"identity": identity, "key": PSK_HEX})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Runs a DTLS 1.2 PSK handshake with `openssl s_client`; returns whether
/// it completed.
async fn psk_handshake(server: &Server, identity: &str) -> bool {
    let addr = server.coaps_addr.to_string();
    let identity = identity.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = Command::new("openssl")
            .args(["s_client", "-dtls1_2", "-connect", &addr])
            .args(["-psk_identity", &identity, "-psk", PSK_HEX])
            .args(["-cipher", "PSK-AES128-CCM8", "-brief"])
            .stdin(Stdio::null())
            .output()
            .expect("run openssl s_client");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        text.contains("CONNECTION ESTABLISHED")
    })
    .await
    .expect("handshake thread")
}

fn sqlite(data_dir: &Path, sql: &str) -> String {
    let output = Command::new("sqlite3")
        .arg(data_dir.join("metadata.db"))
        .arg(sql)
        .output()
        .expect("run sqlite3");
    assert!(
        output.status.success(),
        "sqlite3 {sql:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

/// Returns the files of the data directory that contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if bytes.windows(needle.len()).any(|window| window == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

fn webhook_profile() -> Value {
    json!({
        "name": "sealed-hooks",
        "rules": [{
            "name": "hot",
            "condition": {"threshold": {"key": "t", "op": ">", "value": 30}},
            "actions": [{
                "type": "webhook",
                "url": "http://127.0.0.1:9/hook",
                "secret": WEBHOOK_SECRET,
                "headers": {"Authorization": HEADER_TOKEN},
            }],
        }],
    })
}

#[tokio::test]
async fn secrets_are_sealed_and_survive_restart() {
    let mut server = Server::start().await;
    let token = server.admin_token().await;
    let device = server.create_device("sealed-psk").await;
    set_psk(&server, &token, &device.id, "sealed-psk-identity").await;

    let lorawan = server.create_device("sealed-lorawan").await;
    let (status, body) = api(
        &server,
        &token,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{}/lorawan", lorawan.id),
        Some(json!({
            "dev_eui": "0011223344556677", "activation": "abp", "region": "EU868",
            "dev_addr": "26011f22", "nwk_s_key": NWK_S_KEY, "app_s_key": APP_S_KEY,
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = api(
        &server,
        &token,
        reqwest::Method::POST,
        "/api/v1/profiles",
        Some(webhook_profile()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let webhook = &body["spec"]["rules"][0]["actions"][0];
    assert_eq!(webhook["secret"], "<set>", "{body}");
    assert_eq!(webhook["headers"]["Authorization"], "<set>", "{body}");

    // Sending the document back with "<set>" keeps the stored values.
    let mut resent = webhook_profile();
    resent["rules"][0]["actions"][0]["secret"] = json!("<set>");
    resent["rules"][0]["actions"][0]["headers"]["Authorization"] = json!("<set>");
    let (status, body) = api(
        &server,
        &token,
        reqwest::Method::PUT,
        "/api/v1/profiles/sealed-hooks",
        Some(resent),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    assert!(psk_handshake(&server, "sealed-psk-identity").await);

    // A clean stop checkpoints the write-ahead log into metadata.db.
    server.terminate();
    let secrets: [(&str, Vec<u8>); 5] = [
        ("PSK", hex::decode(PSK_HEX).unwrap()),
        ("NwkSKey", hex::decode(NWK_S_KEY).unwrap()),
        ("AppSKey", hex::decode(APP_S_KEY).unwrap()),
        ("webhook secret", WEBHOOK_SECRET.as_bytes().to_vec()),
        ("header value", HEADER_TOKEN.as_bytes().to_vec()),
    ];
    for (name, secret) in &secrets {
        let found = files_containing(&server.data_dir, secret);
        assert!(found.is_empty(), "the {name} is in plain text in {found:?}");
    }
    let formats = sqlite(
        &server.data_dir,
        "SELECT DISTINCT hex(substr(sealed_key, 1, 1)) FROM device_psks",
    );
    assert_eq!(formats, "02", "PSKs are sealed in the tenant key format");

    server.restart().await;
    assert!(psk_handshake(&server, "sealed-psk-identity").await);
    let (status, body) = server.get_json("/api/v1/profiles/sealed-hooks").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spec"]["rules"][0]["actions"][0]["secret"], "<set>");
}

#[tokio::test]
async fn master_key_rotates_while_serving() {
    let mut server = Server::start().await;
    let token = server.admin_token().await;
    let first = server.create_device("rotate-first").await;
    set_psk(&server, &token, &first.id, "rotate-first-identity").await;
    let old_key = std::fs::read(server.data_dir.join("master.key")).expect("master.key");
    let old_wrapped = sqlite(&server.data_dir, "SELECT hex(wrapped_key) FROM tenant_keys");

    let output = run_cli(&["master-key", "rotate"], &server.data_dir, None);
    let rotation: Value = serde_json::from_str(output.trim()).expect("rotation JSON");
    assert_eq!(rotation["rewrapped_data_keys"], 1, "{rotation}");
    assert_ne!(
        rotation["master_key_id"],
        rotation["previous_master_key_id"]
    );
    assert!(!server.data_dir.join("master.key.previous").exists());
    let new_key = std::fs::read(server.data_dir.join("master.key")).expect("master.key");
    assert_ne!(new_key, old_key);
    let master_ids = sqlite(
        &server.data_dir,
        "SELECT DISTINCT master_key_id FROM tenant_keys",
    );
    assert_eq!(master_ids, rotation["master_key_id"].as_str().unwrap());
    assert_ne!(
        sqlite(&server.data_dir, "SELECT hex(wrapped_key) FROM tenant_keys"),
        old_wrapped
    );

    // The running server goes on opening and sealing with its data keys.
    assert!(psk_handshake(&server, "rotate-first-identity").await);
    let second = server.create_device("rotate-second").await;
    set_psk(&server, &token, &second.id, "rotate-second-identity").await;
    assert!(psk_handshake(&server, "rotate-second-identity").await);

    // After a restart only the new master key exists, and it opens both.
    server.restart().await;
    assert!(psk_handshake(&server, "rotate-first-identity").await);
    assert!(psk_handshake(&server, "rotate-second-identity").await);
}

/// Creates tenant `name` with an admin API key by writing the rows as an
/// operator would restore them; returns the tenant id and the key.
fn create_tenant(data_dir: &Path, name: &str) -> (String, String) {
    let tenant = uuid::Uuid::new_v4().to_string();
    let key = format!("fak_{}", hex::encode(rand::random::<[u8; 24]>()));
    let hash = hex::encode(Sha256::digest(key.as_bytes()));
    sqlite(
        data_dir,
        &format!(
            "INSERT INTO tenants (id, name, created_at) VALUES ('{tenant}', '{name}', 0);
             INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at)
             VALUES ('{}', '{tenant}', 'test', X'{hash}', 'admin', 0);",
            uuid::Uuid::new_v4()
        ),
    );
    (tenant, key)
}

#[tokio::test]
async fn deleted_tenant_secrets_stay_unreadable() {
    let mut server = Server::start().await;
    let (tenant, key) = create_tenant(&server.data_dir, "doomed");
    let (status, body) = api(
        &server,
        &key,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(json!({"name": "doomed-device"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let device = TestDevice {
        id: body["id"].as_str().expect("id").to_owned(),
        token: String::new(),
    };
    set_psk(&server, &key, &device.id, "doomed-identity").await;
    assert!(psk_handshake(&server, "doomed-identity").await);

    // What an attacker with a copy of the database would keep.
    let sealed = sqlite(
        &server.data_dir,
        &format!(
            "SELECT hex(sealed_key) FROM device_psks WHERE device_id = '{}'",
            device.id
        ),
    );
    let wrapped = sqlite(
        &server.data_dir,
        &format!("SELECT hex(wrapped_key) FROM tenant_keys WHERE tenant_id = '{tenant}'"),
    );
    assert!(!sealed.is_empty(), "the device has no sealed PSK");
    assert!(!wrapped.is_empty(), "the tenant has no data key");

    let refused = Command::new(crate::support::BINARY)
        .args(["tenant", "delete", "doomed", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .expect("run ferrite");
    assert!(!refused.status.success(), "deletion needs --yes");
    let output = run_cli(
        &["tenant", "delete", "doomed", "--yes"],
        &server.data_dir,
        None,
    );
    let deleted: Value = serde_json::from_str(output.trim()).expect("deletion JSON");
    assert_eq!(deleted["id"], tenant.as_str());

    // The API key of the tenant no longer works.
    let (status, _) = api(&server, &key, reqwest::Method::GET, "/api/v1/devices", None).await;
    assert_eq!(status, 401);

    // Neither the database nor its write-ahead log keeps the wrapped key.
    let wrapped_bytes = hex::decode(&wrapped).unwrap();
    let found = files_containing(&server.data_dir, &wrapped_bytes);
    assert!(found.is_empty(), "the destroyed key is still in {found:?}");

    // Someone with the master key restores the tenant, device and sealed
    // PSK rows. The server, restarted with the same master key, still
    // cannot open the PSK, so the handshake fails.
    server.terminate();
    sqlite(
        &server.data_dir,
        &format!(
            "INSERT INTO tenants (id, name, created_at) VALUES ('{tenant}', 'doomed', 0);
             INSERT INTO devices (id, tenant_id, name, created_at) VALUES ('{id}', '{tenant}', 'doomed-device', 0);
             INSERT INTO device_psks (device_id, tenant_id, identity, sealed_key, created_at)
             VALUES ('{id}', '{tenant}', CAST('doomed-identity' AS BLOB), X'{sealed}', 0);",
            id = device.id
        ),
    );
    server.restart().await;
    assert!(!psk_handshake(&server, "doomed-identity").await);
    let still_sealed = sqlite(
        &server.data_dir,
        &format!(
            "SELECT hex(sealed_key) FROM device_psks WHERE device_id = '{}'",
            device.id
        ),
    );
    assert_eq!(still_sealed, sealed, "the unreadable PSK was left as it is");
}

#[tokio::test]
async fn tenant_deleted_by_cli_ends_server_keys() {
    let server = Server::start().await;
    let (_tenant, key) = create_tenant(&server.data_dir, "short-lived");
    let (status, body) = api(
        &server,
        &key,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(json!({"name": "short-lived-device"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let device = body["id"].as_str().expect("id").to_owned();
    set_psk(&server, &key, &device, "short-lived-identity").await;
    assert!(psk_handshake(&server, "short-lived-identity").await);

    run_cli(
        &["tenant", "delete", "short-lived", "--yes"],
        &server.data_dir,
        None,
    );
    // The server drops the tenant's data keys at its next refresh, after
    // which even a PSK still in its DTLS index cannot be opened.
    let dropped = wait_until(
        || async { !psk_handshake(&server, "short-lived-identity").await },
        Duration::from_secs(40),
    )
    .await;
    assert!(dropped, "the server kept the deleted tenant's keys");
}

#[tokio::test]
async fn ingest_log_is_sealed_when_enabled() {
    let mut server = Server::start_with_env(&[("FERRITE_INGEST_ENCRYPT", "true")]).await;
    let device = server.create_device("sealed-log").await;
    let marker = "sealed-log-reading-7f3a";
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/{}/telemetry",
            server.http_url, device.token
        ))
        .header("content-type", "application/json")
        .body(json!({"note": marker, "t": 21.5}).to_string())
        .send()
        .await
        .expect("POST telemetry");
    assert_eq!(response.status(), 200);

    // Acknowledged means in the log; no record there shows the payload.
    let log_dir = server.data_dir.join("log");
    let found = files_containing(&log_dir, marker.as_bytes());
    assert!(
        found.is_empty(),
        "the payload is in plain text in {found:?}"
    );
    let found = files_containing(&log_dir, b"\"note\"");
    assert!(
        found.is_empty(),
        "the payload keys are in plain text in {found:?}"
    );

    // A kill and a restart replay the sealed records.
    server.kill();
    server.restart().await;
    let stored = wait_until(
        || async { server.latest(&device.id).await["note"]["value"] == marker },
        Duration::from_secs(10),
    )
    .await;
    assert!(stored, "the sealed record was not replayed");
}

/// Posts one JSON telemetry message for the device with `token`.
async fn post_telemetry(server: &Server, token: &str, body: Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/{token}/telemetry", server.http_url))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST telemetry");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn store_blocks_are_sealed_when_enabled() {
    let mut server = Server::start_with_env(&[
        ("FERRITE_STORAGE_ENCRYPT", "true"),
        ("FERRITE_INGEST_ENCRYPT", "true"),
    ])
    .await;
    let kept = server.create_device("kept-sensor").await;
    let (tenant, key) = create_tenant(&server.data_dir, "doomed");
    let (status, body) = api(
        &server,
        &key,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(json!({"name": "doomed-sensor"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let doomed_id = body["id"].as_str().expect("id").to_owned();
    let doomed_token = body["token"].as_str().expect("token").to_owned();

    let kept_marker = "kept-reading-4c1d9e";
    let doomed_marker = "doomed-reading-8b2f07";
    post_telemetry(&server, &kept.token, json!({"note": kept_marker, "t": 1.5})).await;
    post_telemetry(&server, &doomed_token, json!({"note": doomed_marker})).await;

    // Compaction flushes first, so every point is in the store files.
    let admin = server.admin_token().await;
    let (status, body) = api(
        &server,
        &admin,
        reqwest::Method::POST,
        "/api/v1/admin/compact",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let tsdb_files = files_containing(&server.data_dir.join("tsdb"), b"FERRTSEG");
    assert!(!tsdb_files.is_empty(), "compaction wrote no segment files");
    for marker in [kept_marker, doomed_marker] {
        let found = files_containing(&server.data_dir, marker.as_bytes());
        assert!(found.is_empty(), "{marker} is in plain text in {found:?}");
    }
    assert_eq!(server.latest(&kept.id).await["note"]["value"], kept_marker);

    run_cli(
        &["tenant", "delete", "doomed", "--yes"],
        &server.data_dir,
        None,
    );
    server.terminate();
    server.restart().await;

    // The other tenant's points are read back from sealed blocks.
    assert_eq!(server.latest(&kept.id).await["note"]["value"], kept_marker);
    assert_eq!(server.latest(&kept.id).await["t"]["value"], 1.5);

    // Someone with the master key restores the tenant's rows. The server
    // has the master key but no data key of the tenant, so its blocks stay
    // unreadable, while the server and other tenants keep working.
    server.terminate();
    sqlite(
        &server.data_dir,
        &format!(
            "INSERT INTO tenants (id, name, created_at) VALUES ('{tenant}', 'doomed', 0);
             INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at)
             VALUES ('{}', '{tenant}', 'restored', X'{}', 'admin', 0);
             INSERT INTO devices (id, tenant_id, name, created_at)
             VALUES ('{doomed_id}', '{tenant}', 'doomed-sensor', 0);",
            uuid::Uuid::new_v4(),
            hex::encode(Sha256::digest(key.as_bytes())),
        ),
    );
    server.restart().await;
    let (status, body) = api(
        &server,
        &key,
        reqwest::Method::GET,
        &format!("/api/v1/devices/{doomed_id}/telemetry/latest"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !body.to_string().contains(doomed_marker),
        "the deleted tenant's point is readable: {body}"
    );
    assert_eq!(server.latest(&kept.id).await["note"]["value"], kept_marker);
}
