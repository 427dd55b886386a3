//! The audit log through the real binary: what API calls, logins and CLI
//! commands record, the export formats, and verification after someone
//! edits the SQLite file.

use serde_json::{Value, json};

use crate::support::{ADMIN_EMAIL, Server, run_cli};

async fn send(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http_url))
        .header("User-Agent", "audit-test/1.0");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

fn find<'a>(records: &'a [Value], action: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|record| record["action"] == action)
        .collect()
}

#[tokio::test]
async fn audit_records_api_login_and_cli() {
    let server = Server::start().await;
    let token = server.admin_token().await;
    let viewer = server.create_api_key("audit-viewer", "viewer");

    let (status, text) = send(
        &server,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(&token),
        Some(json!({"name": "audited"})),
    )
    .await;
    assert_eq!(status, 201, "{text}");
    let device: Value = serde_json::from_str(&text).unwrap();
    let device_id = device["id"].as_str().unwrap().to_owned();
    let device_token = device["token"].as_str().unwrap().to_owned();
    let (status, _) = send(
        &server,
        reqwest::Method::DELETE,
        &format!("/api/v1/devices/{device_id}"),
        Some(&viewer),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = send(
        &server,
        reqwest::Method::POST,
        "/api/v1/auth/login",
        None,
        Some(json!({"email": ADMIN_EMAIL, "password": "not the password"})),
    )
    .await;
    assert_eq!(status, 401);
    run_cli(&["device", "create", "from-cli"], &server.data_dir, None);

    let (status, text) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let records = body["records"].as_array().unwrap();

    let created = find(records, "device.create");
    let by_api = created
        .iter()
        .find(|record| record["actor_type"] == "user")
        .expect("device.create by the API");
    assert_eq!(by_api["target_id"], device_id.as_str());
    assert_eq!(by_api["actor_name"], ADMIN_EMAIL);
    assert_eq!(by_api["outcome"], "success");
    assert_eq!(by_api["status"], 201);
    assert_eq!(by_api["detail"]["name"], "audited");
    assert_eq!(by_api["user_agent"], "audit-test/1.0");
    assert!(by_api["source"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        created
            .iter()
            .any(|record| record["actor_type"] == "cli" && record["detail"]["name"] == "from-cli")
    );

    let denied = find(records, "device.delete");
    assert_eq!(denied.len(), 1, "{records:?}");
    assert_eq!(denied[0]["outcome"], "denied");
    assert_eq!(denied[0]["actor_type"], "api_key");
    assert_eq!(denied[0]["actor_name"], "audit-viewer");

    let logins = find(records, "auth.login");
    assert!(logins.iter().any(|record| record["outcome"] == "success"));
    assert!(logins.iter().any(|record| record["outcome"] == "denied"));

    // No secret reaches the log.
    assert!(
        !text.contains(&device_token),
        "device token in the audit log"
    );
    assert!(
        !text.contains("not the password"),
        "password in the audit log"
    );

    // Filters and paging.
    let (_, text) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit?action=device.*&limit=1",
        Some(&token),
        None,
    )
    .await;
    let page: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(page["records"].as_array().unwrap().len(), 1);
    let before = page["next_before"].as_i64().expect("next_before");
    let (_, text) = send(
        &server,
        reqwest::Method::GET,
        &format!("/api/v1/audit?action=device.*&before={before}"),
        Some(&token),
        None,
    )
    .await;
    let rest: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rest["records"].as_array().unwrap().len(), 2, "{rest}");
    let (status, _) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit?colour=red",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn audit_export_has_every_record() {
    let server = Server::start().await;
    let token = server.admin_token().await;
    for name in ["one", "two, with a comma"] {
        let (status, _) = send(
            &server,
            reqwest::Method::POST,
            "/api/v1/devices",
            Some(&token),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 201);
    }

    let (status, jsonl) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit/export",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let lines: Vec<Value> = jsonl
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    let seqs: Vec<i64> = lines
        .iter()
        .map(|record| record["seq"].as_i64().unwrap())
        .collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "oldest first, without gaps");
    for pair in lines.windows(2) {
        assert_eq!(pair[1]["prev_hash"], pair[0]["hash"]);
    }

    let (status, csv) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit/export?format=csv",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert!(csv.starts_with("id,seq,at_ms,"), "{csv}");
    assert_eq!(csv.matches("\r\n").count(), lines.len() + 1, "{csv}");
    assert!(
        csv.contains(r#""{""name"":""two, with a comma""}""#),
        "{csv}"
    );
}

#[tokio::test]
async fn audit_verify_finds_tampered_row() {
    let server = Server::start().await;
    let token = server.admin_token().await;
    for name in ["first", "second", "third"] {
        let (status, _) = send(
            &server,
            reqwest::Method::POST,
            "/api/v1/devices",
            Some(&token),
            Some(json!({"name": name})),
        )
        .await;
        assert_eq!(status, 201);
    }
    let (status, text) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit/verify",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["intact"], true, "{report}");
    let (_, text) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit?action=device.create",
        Some(&token),
        None,
    )
    .await;
    let listed: Value = serde_json::from_str(&text).unwrap();
    let second = listed["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|record| record["detail"]["name"] == "second")
        .expect("record of the second device")
        .clone();

    // Someone with write access to the file drops the trigger that
    // protects the table and rewrites a record.
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(server.data_dir.join("metadata.db"))
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let error = sqlx::query("UPDATE audit_log SET detail = '{\"name\":\"innocent\"}' WHERE id = ?")
        .bind(second["id"].as_i64().unwrap())
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("append-only"), "{error}");
    sqlx::query("DROP TRIGGER audit_log_no_update")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_log SET detail = '{\"name\":\"innocent\"}' WHERE id = ?")
        .bind(second["id"].as_i64().unwrap())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let (status, text) = send(
        &server,
        reqwest::Method::GET,
        "/api/v1/audit/verify",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["intact"], false, "{report}");
    assert_eq!(report["first_broken"]["id"], second["id"], "{report}");
    assert_eq!(report["first_broken"]["seq"], second["seq"], "{report}");
    assert_eq!(report["records"], second["seq"].as_i64().unwrap() - 1);
}
