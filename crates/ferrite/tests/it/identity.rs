//! People and services: refresh token rotation and theft detection,
//! forged access tokens, the users API, scoped and expiring API keys, the
//! OAuth 2.0 client credentials grant, login lockout and security headers.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::{ADMIN_EMAIL, ADMIN_PASSWORD, Server};

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}

async fn post_json(server: &Server, path: &str, bearer: Option<&str>, body: Value) -> Reply {
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", server.http_url))
        .json(&body);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    send(request).await
}

async fn get(server: &Server, path: &str, bearer: &str) -> Reply {
    send(
        reqwest::Client::new()
            .get(format!("{}{path}", server.http_url))
            .bearer_auth(bearer),
    )
    .await
}

async fn login(server: &Server, email: &str, password: &str) -> Reply {
    post_json(
        server,
        "/api/v1/auth/login",
        None,
        json!({"email": email, "password": password}),
    )
    .await
}

fn text(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} missing in {value}"))
        .to_owned()
}

async fn assert_healthy(server: &Server) {
    let status = reqwest::get(format!("{}/healthz", server.http_url))
        .await
        .expect("healthz")
        .status();
    assert_eq!(status, 200, "server unhealthy");
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_family() {
    let server = Server::start().await;
    let first = login(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["expires_in"], 900);
    let refresh_1 = text(&first.body, "refresh_token");

    let second = post_json(
        &server,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": refresh_1}),
    )
    .await;
    assert_eq!(second.status, 200, "{}", second.body);
    let refresh_2 = text(&second.body, "refresh_token");
    let access_2 = text(&second.body, "access_token");
    assert_ne!(refresh_1, refresh_2);
    assert_eq!(get(&server, "/api/v1/devices", &access_2).await.status, 200);

    // A thief replays the first token: the whole family is revoked.
    let replay = post_json(
        &server,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": refresh_1}),
    )
    .await;
    assert_eq!(replay.status, 401);
    assert!(
        text(&replay.body, "detail").contains("already used"),
        "{}",
        replay.body
    );

    let successor = post_json(
        &server,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": refresh_2}),
    )
    .await;
    assert_eq!(successor.status, 401, "{}", successor.body);
    let access = get(&server, "/api/v1/devices", &access_2).await;
    assert_eq!(access.status, 401, "{}", access.body);
    assert!(
        text(&access.body, "detail").contains("revoked"),
        "{}",
        access.body
    );

    // Another login still works.
    assert_eq!(
        login(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await.status,
        200
    );
}

#[tokio::test]
async fn logout_revokes_refresh_and_access_tokens() {
    let server = Server::start().await;
    let session = login(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await.body;
    let access = text(&session, "access_token");
    let refresh = text(&session, "refresh_token");

    let out = post_json(
        &server,
        "/api/v1/auth/logout",
        None,
        json!({"refresh_token": refresh}),
    )
    .await;
    assert_eq!(out.status, 204);
    assert_eq!(get(&server, "/api/v1/devices", &access).await.status, 401);
    let again = post_json(
        &server,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": refresh}),
    )
    .await;
    assert_eq!(again.status, 401);
    assert!(
        text(&again.body, "detail").contains("revoked"),
        "{}",
        again.body
    );
}

fn encode(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

fn hs256(header: &Value, claims: &Value, key: &[u8]) -> String {
    let signing_input = format!("{}.{}", encode(header), encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC key");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

#[tokio::test]
async fn forged_access_tokens_are_rejected() {
    let server = Server::start().await;
    let key = std::fs::read(server.data_dir.join("jwt.key")).expect("jwt.key");
    let me = get(&server, "/api/v1/auth/me", &server.admin_token().await).await;
    assert_eq!(me.status, 200, "{}", me.body);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss": "ferrite", "aud": "ferrite-api", "sub": me.body["id"], "jti": "forged",
        "iat": now, "exp": now + 600, "tenant": me.body["tenant_id"], "role": "admin", "kind": "user",
    });
    let header = json!({"alg": "HS256", "typ": "at+jwt"});
    let valid = hs256(&header, &claims, &key);
    assert_eq!(get(&server, "/api/v1/devices", &valid).await.status, 200);

    let mut expired = claims.clone();
    expired["exp"] = json!(now - 60);
    let mut missing_exp = claims.clone();
    missing_exp.as_object_mut().unwrap().remove("exp");
    let mut other_audience = claims.clone();
    other_audience["aud"] = json!("someone-else");
    let mut viewer = claims.clone();
    viewer["role"] = json!("viewer");
    let viewer_token = hs256(&header, &viewer, &key);
    let viewer_parts: Vec<&str> = viewer_token.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        viewer_parts[0],
        encode(&claims),
        viewer_parts[2]
    );

    let cases = [
        (
            "alg none",
            format!(
                "{}.{}.",
                encode(&json!({"alg": "none", "typ": "at+jwt"})),
                encode(&claims)
            ),
            "\"none\"",
        ),
        (
            "wrong key",
            hs256(&header, &claims, b"another key of thirty-two bytes!"),
            "signature",
        ),
        (
            "RS256 header with HMAC key",
            hs256(&json!({"alg": "RS256", "typ": "at+jwt"}), &claims, &key),
            "RS256",
        ),
        ("expired", hs256(&header, &expired, &key), "expired"),
        ("missing exp", hs256(&header, &missing_exp, &key), "exp"),
        (
            "other audience",
            hs256(&header, &other_audience, &key),
            "aud",
        ),
        (
            "typ JWT",
            hs256(&json!({"alg": "HS256", "typ": "JWT"}), &claims, &key),
            "typ",
        ),
        ("tampered payload", tampered, "signature"),
        ("garbage", "not-a-token".to_owned(), "neither"),
    ];
    for (name, token, expected) in cases {
        let reply = get(&server, "/api/v1/devices", &token).await;
        assert_eq!(reply.status, 401, "{name}: {}", reply.body);
        let detail = text(&reply.body, "detail");
        assert!(detail.contains(expected), "{name}: {detail}");
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn users_api_manages_users_and_revokes_sessions() {
    let server = Server::start().await;
    let admin = server.admin_token().await;

    let weak = post_json(
        &server,
        "/api/v1/users",
        Some(&admin),
        json!({"email": "ops@example.com", "role": "viewer", "password": "password2024!"}),
    )
    .await;
    assert_eq!(weak.status, 400, "{}", weak.body);
    assert!(
        text(&weak.body, "detail").contains("too common"),
        "{}",
        weak.body
    );
    let short = post_json(
        &server,
        "/api/v1/users",
        Some(&admin),
        json!({"email": "ops@example.com", "role": "viewer", "password": "Tr0ub4dor&3"}),
    )
    .await;
    assert!(
        text(&short.body, "detail").contains("at least 12"),
        "{}",
        short.body
    );

    let created = post_json(
        &server,
        "/api/v1/users",
        Some(&admin),
        json!({"email": "ops@example.com", "role": "viewer", "password": "violet staple lantern"}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = text(&created.body, "id");
    assert!(created.body.get("password_hash").is_none());

    let listed = get(&server, "/api/v1/users", &admin).await;
    assert_eq!(listed.status, 200);
    assert!(
        !listed.body.to_string().contains("argon2"),
        "{}",
        listed.body
    );
    assert_eq!(listed.body["users"].as_array().unwrap().len(), 2);

    let session = login(&server, "ops@example.com", "violet staple lantern").await;
    assert_eq!(session.status, 200, "{}", session.body);
    let access = text(&session.body, "access_token");
    let refresh = text(&session.body, "refresh_token");
    let forbidden = get(&server, "/api/v1/users", &access).await;
    assert_eq!(forbidden.status, 403);

    // A role change ends the user's sessions.
    let patch = send(
        reqwest::Client::new()
            .patch(format!("{}/api/v1/users/{id}", server.http_url))
            .bearer_auth(&admin)
            .json(&json!({"role": "operator"})),
    )
    .await;
    assert_eq!(patch.status, 200, "{}", patch.body);
    assert_eq!(patch.body["role"], "operator");
    assert_eq!(get(&server, "/api/v1/devices", &access).await.status, 401);
    let refreshed = post_json(
        &server,
        "/api/v1/auth/refresh",
        None,
        json!({"refresh_token": refresh}),
    )
    .await;
    assert_eq!(refreshed.status, 401);

    // The user changes their own password; the old one stops working.
    let session = login(&server, "ops@example.com", "violet staple lantern")
        .await
        .body;
    let access = text(&session, "access_token");
    let wrong = post_json(
        &server,
        "/api/v1/auth/password",
        Some(&access),
        json!({"current_password": "not my password", "new_password": "amber kettle horizon"}),
    )
    .await;
    assert_eq!(wrong.status, 400, "{}", wrong.body);
    let changed = post_json(&server, "/api/v1/auth/password", Some(&access),
        json!({"current_password": "violet staple lantern", "new_password": "amber kettle horizon"})).await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(get(&server, "/api/v1/devices", &access).await.status, 401);
    let fresh = text(&changed.body, "access_token");
    assert_eq!(get(&server, "/api/v1/devices", &fresh).await.status, 200);
    assert_eq!(
        login(&server, "ops@example.com", "violet staple lantern")
            .await
            .status,
        401
    );

    // Deleting the user ends everything; the last admin cannot go.
    let deleted = send(
        reqwest::Client::new()
            .delete(format!("{}/api/v1/users/{id}", server.http_url))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(get(&server, "/api/v1/devices", &fresh).await.status, 401);
    assert_eq!(
        login(&server, "ops@example.com", "amber kettle horizon")
            .await
            .status,
        401
    );
    let me = get(&server, "/api/v1/auth/me", &admin).await;
    let last_admin = send(
        reqwest::Client::new()
            .delete(format!(
                "{}/api/v1/users/{}",
                server.http_url,
                text(&me.body, "id")
            ))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(last_admin.status, 409, "{}", last_admin.body);
}

#[tokio::test]
async fn api_key_scopes_narrow_the_role_and_expire() {
    let server = Server::start().await;
    let admin = server.admin_token().await;

    let too_wide = post_json(
        &server,
        "/api/v1/api-keys",
        Some(&admin),
        json!({"name": "reader", "role": "viewer", "scopes": ["devices:write"]}),
    )
    .await;
    assert_eq!(too_wide.status, 400, "{}", too_wide.body);
    let unknown = post_json(
        &server,
        "/api/v1/api-keys",
        Some(&admin),
        json!({"name": "reader", "role": "viewer", "scopes": ["devices:delete"]}),
    )
    .await;
    assert!(
        text(&unknown.body, "detail").contains("devices:delete"),
        "{}",
        unknown.body
    );

    let created = post_json(
        &server,
        "/api/v1/api-keys",
        Some(&admin),
        json!({"name": "reader", "role": "operator", "scopes": ["devices:read"], "expires_in": 2}),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.headers["cache-control"], "no-store");
    let key = text(&created.body, "key");

    assert_eq!(get(&server, "/api/v1/devices", &key).await.status, 200);
    let write = post_json(
        &server,
        "/api/v1/devices",
        Some(&key),
        json!({"name": "scoped"}),
    )
    .await;
    assert_eq!(write.status, 403, "{}", write.body);
    assert!(
        text(&write.body, "detail").contains("devices:write"),
        "{}",
        write.body
    );
    assert_eq!(
        get(&server, "/api/v1/telemetry/latest", &key).await.status,
        403
    );
    assert_eq!(get(&server, "/api/v1/api-keys", &key).await.status, 403);

    let listed = get(&server, "/api/v1/api-keys", &admin).await;
    let entry = listed.body["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == "reader")
        .cloned()
        .expect("listed");
    assert_eq!(entry["scopes"], json!(["devices:read"]));
    assert!(entry["expires_at"].is_i64());
    assert!(entry.get("key").is_none());

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = get(&server, "/api/v1/devices", &key).await;
    assert_eq!(expired.status, 401, "{}", expired.body);
    assert!(
        text(&expired.body, "detail").contains("expired"),
        "{}",
        expired.body
    );
}

async fn token_request(
    server: &Server,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> Reply {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/v1/oauth/token", server.http_url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form.iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join("&"),
        );
    if let Some((id, secret)) = basic {
        request = request.basic_auth(id, Some(secret));
    }
    send(request).await
}

#[tokio::test]
async fn client_credentials_grant_issues_scoped_tokens() {
    let server = Server::start().await;
    let admin = server.admin_token().await;
    let created = post_json(&server, "/api/v1/service-accounts", Some(&admin),
        json!({"name": "exporter", "role": "operator", "scopes": ["devices:read", "telemetry:read"]})).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = text(&created.body, "id");
    let client_id = text(&created.body, "client_id");
    let secret = text(&created.body, "client_secret");
    let listed = get(&server, "/api/v1/service-accounts", &admin).await;
    assert!(!listed.body.to_string().contains(&secret));

    let issued = token_request(
        &server,
        Some((&client_id, &secret)),
        &[
            ("grant_type", "client_credentials"),
            ("scope", "devices:read"),
        ],
    )
    .await;
    assert_eq!(issued.status, 200, "{}", issued.body);
    assert_eq!(issued.headers["cache-control"], "no-store");
    assert_eq!(issued.body["token_type"], "Bearer");
    assert_eq!(issued.body["scope"], "devices:read");
    let token = text(&issued.body, "access_token");
    assert_eq!(get(&server, "/api/v1/devices", &token).await.status, 200);
    assert_eq!(
        get(&server, "/api/v1/telemetry/latest", &token)
            .await
            .status,
        403
    );

    let in_body = token_request(
        &server,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &client_id),
            ("client_secret", &secret),
        ],
    )
    .await;
    assert_eq!(in_body.status, 200, "{}", in_body.body);

    let errors = [
        (
            Some((client_id.as_str(), "wrong")),
            vec![("grant_type", "client_credentials")],
            401,
            "invalid_client",
        ),
        (
            Some((client_id.as_str(), secret.as_str())),
            vec![("grant_type", "password")],
            400,
            "unsupported_grant_type",
        ),
        (
            Some((client_id.as_str(), secret.as_str())),
            vec![("grant_type", "client_credentials"), ("scope", "admin")],
            400,
            "invalid_scope",
        ),
        (
            Some((client_id.as_str(), secret.as_str())),
            vec![],
            400,
            "invalid_request",
        ),
        (
            None,
            vec![("grant_type", "client_credentials")],
            401,
            "invalid_client",
        ),
    ];
    for (basic, form, status, error) in errors {
        let reply = token_request(&server, basic, &form).await;
        assert_eq!(reply.status, status, "{form:?}: {}", reply.body);
        assert_eq!(reply.body["error"], error, "{form:?}: {}", reply.body);
    }

    let deleted = send(
        reqwest::Client::new()
            .delete(format!("{}/api/v1/service-accounts/{id}", server.http_url))
            .bearer_auth(&admin),
    )
    .await;
    assert_eq!(deleted.status, 204);
    assert_eq!(get(&server, "/api/v1/devices", &token).await.status, 401);
    let after = token_request(
        &server,
        Some((&client_id, &secret)),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(after.body["error"], "invalid_client");
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_with_retry_after() {
    let server = Server::start().await;
    for attempt in 0..5 {
        let reply = login(&server, ADMIN_EMAIL, "wrong password here").await;
        assert_eq!(reply.status, 401, "attempt {attempt}: {}", reply.body);
    }
    let locked = login(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(locked.status, 429, "{}", locked.body);
    let retry_after: u64 = locked.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");
    // Another account from the same address is not locked.
    assert_eq!(
        login(&server, "someone@example.com", "whatever password")
            .await
            .status,
        401
    );
    assert_healthy(&server).await;
}

#[tokio::test]
async fn responses_carry_security_headers() {
    let server = Server::start().await;
    let client = reqwest::Client::new();
    for path in ["/healthz", "/api/v1/nothing-here", "/api/v1/devices"] {
        let response = client
            .get(format!("{}{path}", server.http_url))
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'"),
            "{path}"
        );
    }
    let session = login(&server, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(session.headers["cache-control"], "no-store");
}
