//! Tenant isolation and roles, driven by one table of every HTTP route.
//!
//! [`ROUTES`] lists every route of the HTTP router with who may call it.
//! `route_table_covers_router` reads the router's source and fails when a
//! route has no row, so a new endpoint cannot skip these checks.
//! `roles_doc_matches_route_table` keeps the roles table of
//! docs/security.md equal to it.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::support::{ADMIN_PASSWORD, Server, run_cli};

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Access {
    /// Anyone: health checks, metrics, login and the token endpoints.
    Public,
    /// A device's access token (or the MQTT CONNECT of MQTT over
    /// WebSocket); people and services have no access.
    Device,
    /// A user's access token or an API key with at least this role.
    Min(Role),
    /// Any credential of a tenant (user, API key or service account) of
    /// any role, for routes about the caller's own identity.
    Any,
    /// A signed-in user of any role. API keys and service accounts get 403.
    User,
}

#[derive(Clone, Copy, PartialEq, PartialOrd, Debug)]
enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What the `{id}` of a route names.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Target {
    None,
    Device,
    Profile,
    Alarm,
    Delivery,
    ApiKey,
    User,
    ServiceAccount,
    DeviceCa,
}

/// The request body a row sends; `$device`, `$profile_name`, `$pem`,
/// `$dev_eui`, `$matrix_gateway` and `$matrix_ca_pem` are filled in for the
/// tenant under test.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Body {
    None,
    Json(&'static str),
    Yaml(&'static str),
    /// A stream that never ends (live SSE): only the status is read.
    Stream,
}

struct Row {
    method: &'static str,
    /// The route pattern exactly as the router declares it.
    path: &'static str,
    access: Access,
    target: Target,
    body: Body,
}

const fn row(
    method: &'static str,
    path: &'static str,
    access: Access,
    target: Target,
    body: Body,
) -> Row {
    Row {
        method,
        path,
        access,
        target,
        body,
    }
}

use Access::{Any, Device as DeviceOnly, Min, Public, User as UserOnly};
use Role::{Admin, Operator, Viewer};

const PROFILE_YAML: &str = r#"
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

/// Every route of the HTTP router, in the router's order. The roles table
/// of docs/security.md is this table.
#[rustfmt::skip]
const ROUTES: &[Row] = &[
    row("POST", "/api/v1/auth/login", Public, Target::None, Body::Json(r#"{"email": "nobody@example.com", "password": "wrong password"}"#)),
    row("POST", "/api/v1/auth/refresh", Public, Target::None, Body::Json(r#"{"refresh_token": "not-a-refresh-token"}"#)),
    row("POST", "/api/v1/auth/logout", Public, Target::None, Body::Json(r#"{"refresh_token": "not-a-refresh-token"}"#)),
    row("GET", "/api/v1/auth/me", Any, Target::None, Body::None),
    row("POST", "/api/v1/auth/password", UserOnly, Target::None, Body::Json(r#"{"current_password": "wrong current password", "new_password": "matrix new password 2026"}"#)),
    row("GET", "/api/v1/auth/oidc/login", Public, Target::None, Body::None),
    row("GET", "/api/v1/auth/oidc/callback", Public, Target::None, Body::None),
    row("GET", "/api/v1/users", Min(Admin), Target::None, Body::None),
    row("POST", "/api/v1/users", Min(Admin), Target::None, Body::Json(r#"{"email": "matrix@example.com", "role": "viewer", "password": "matrix user password 2026"}"#)),
    row("GET", "/api/v1/users/{id}", Min(Admin), Target::User, Body::None),
    row("PATCH", "/api/v1/users/{id}", Min(Admin), Target::User, Body::Json(r#"{"role": "viewer"}"#)),
    row("DELETE", "/api/v1/users/{id}", Min(Admin), Target::User, Body::None),
    row("POST", "/api/v1/oauth/token", Public, Target::None, Body::None),
    row("GET", "/api/v1/service-accounts", Min(Admin), Target::None, Body::None),
    row("POST", "/api/v1/service-accounts", Min(Admin), Target::None, Body::Json(r#"{"name": "matrix-account", "role": "viewer"}"#)),
    row("DELETE", "/api/v1/service-accounts/{id}", Min(Admin), Target::ServiceAccount, Body::None),
    row("GET", "/api/v1/audit", Min(Admin), Target::None, Body::None),
    row("GET", "/api/v1/audit/export", Min(Admin), Target::None, Body::None),
    row("GET", "/api/v1/audit/verify", Min(Admin), Target::None, Body::None),
    row("GET", "/api/v1/devices", Min(Viewer), Target::None, Body::None),
    row("POST", "/api/v1/devices", Min(Operator), Target::None, Body::Json(r#"{"name": "matrix-device", "profile": "$profile_name"}"#)),
    row("GET", "/api/v1/devices/{id}", Min(Viewer), Target::Device, Body::None),
    row("PATCH", "/api/v1/devices/{id}", Min(Operator), Target::Device, Body::Json(r#"{"labels": {"site": "matrix"}}"#)),
    row("DELETE", "/api/v1/devices/{id}", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/dead-letters", Min(Viewer), Target::Device, Body::None),
    row("DELETE", "/api/v1/devices/{id}/dead-letters", Min(Operator), Target::Device, Body::None),
    row("POST", "/api/v1/devices/{id}/dead-letters/replay", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/dead-letters", Min(Viewer), Target::None, Body::None),
    row("GET", "/api/v1/profiles", Min(Viewer), Target::None, Body::None),
    row("POST", "/api/v1/profiles", Min(Admin), Target::None, Body::Yaml(PROFILE_YAML)),
    row("POST", "/api/v1/profiles/import", Min(Admin), Target::None, Body::Yaml(PROFILE_YAML)),
    row("POST", "/api/v1/profiles/test", Min(Operator), Target::None, Body::Json(r#"{"profile": "$profile_name", "payload": "{\"temp\": 20}"}"#)),
    row("GET", "/api/v1/profiles/{id}", Min(Viewer), Target::Profile, Body::None),
    row("PUT", "/api/v1/profiles/{id}", Min(Admin), Target::Profile, Body::Yaml(PROFILE_YAML)),
    row("DELETE", "/api/v1/profiles/{id}", Min(Admin), Target::Profile, Body::None),
    row("GET", "/api/v1/alarms", Min(Viewer), Target::None, Body::None),
    row("GET", "/api/v1/alarms/{id}", Min(Viewer), Target::Alarm, Body::None),
    row("POST", "/api/v1/alarms/{id}/ack", Min(Operator), Target::Alarm, Body::Json("{}")),
    row("POST", "/api/v1/alarms/{id}/clear", Min(Operator), Target::Alarm, Body::Json("{}")),
    row("POST", "/api/v1/devices/{id}/token", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/credentials", Min(Operator), Target::Device, Body::None),
    row("DELETE", "/api/v1/devices/{id}/credentials", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/credentials/psk", Min(Operator), Target::Device, Body::None),
    row("PUT", "/api/v1/devices/{id}/credentials/psk", Min(Operator), Target::Device, Body::Json(r#"{"identity": "matrix-psk", "key": "00112233445566778899aabbccddeeff"}"#)),
    row("DELETE", "/api/v1/devices/{id}/credentials/psk", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/credentials/certificates", Min(Operator), Target::Device, Body::None),
    row("POST", "/api/v1/devices/{id}/credentials/certificates", Min(Operator), Target::Device, Body::Json(r#"{"pem": "$pem"}"#)),
    row("DELETE", "/api/v1/devices/{id}/credentials/certificates/{fingerprint}", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/device-cas", Min(Admin), Target::None, Body::None),
    row("POST", "/api/v1/device-cas", Min(Admin), Target::None, Body::Json(r#"{"pem": "$matrix_ca_pem"}"#)),
    row("GET", "/api/v1/device-cas/{fingerprint}", Min(Admin), Target::DeviceCa, Body::None),
    row("DELETE", "/api/v1/device-cas/{fingerprint}", Min(Admin), Target::DeviceCa, Body::None),
    row("POST", "/api/v1/devices/{id}/commands", Min(Operator), Target::Device, Body::Json(r#"{"method": "matrix", "timeout_ms": 500}"#)),
    row("GET", "/api/v1/devices/{id}/telemetry/latest", Min(Viewer), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/telemetry/keys", Min(Viewer), Target::Device, Body::None),
    row("GET", "/api/v1/telemetry/latest", Min(Viewer), Target::None, Body::None),
    row("GET", "/api/v1/telemetry/aggregate", Min(Viewer), Target::None, Body::None),
    row("POST", "/api/v1/admin/compact", Min(Admin), Target::None, Body::None),
    row("GET", "/api/v1/export", Min(Operator), Target::None, Body::None),
    row("GET", "/api/v1/api-keys", Min(Admin), Target::None, Body::None),
    row("POST", "/api/v1/api-keys", Min(Admin), Target::None, Body::Json(r#"{"name": "matrix-key", "role": "viewer"}"#)),
    row("DELETE", "/api/v1/api-keys/{id}", Min(Admin), Target::ApiKey, Body::None),
    row("GET", "/api/v1/actions/deliveries", Min(Operator), Target::None, Body::None),
    row("GET", "/api/v1/actions/deliveries/{id}", Min(Operator), Target::Delivery, Body::None),
    row("POST", "/api/v1/actions/deliveries/{id}/retry", Min(Operator), Target::Delivery, Body::None),
    row("POST", "/api/v1/actions/test", Min(Operator), Target::None, Body::Json(r#"{"action": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "device_id": "$device"}"#)),
    row("GET", "/api/v1/devices/{id}/lorawan", Min(Viewer), Target::Device, Body::None),
    row("PUT", "/api/v1/devices/{id}/lorawan", Min(Operator), Target::Device, Body::Json(r#"{"dev_eui": "$dev_eui", "activation": "external"}"#)),
    row("DELETE", "/api/v1/devices/{id}/lorawan", Min(Operator), Target::Device, Body::None),
    row("GET", "/api/v1/devices/{id}/lorawan/downlinks", Min(Viewer), Target::Device, Body::None),
    row("POST", "/api/v1/devices/{id}/lorawan/downlinks", Min(Operator), Target::Device, Body::Json(r#"{"f_port": 1, "data": "0102"}"#)),
    row("GET", "/api/v1/lorawan/gateways", Min(Viewer), Target::None, Body::None),
    row("POST", "/api/v1/lorawan/gateways", Min(Admin), Target::None, Body::Json(r#"{"gateway_eui": "$matrix_gateway", "name": "matrix"}"#)),
    row("DELETE", "/api/v1/lorawan/gateways/{eui}", Min(Admin), Target::None, Body::None),
    row("GET", "/api/v1/live/ws", Min(Viewer), Target::None, Body::None),
    row("GET", "/api/v1/live/sse", Min(Viewer), Target::None, Body::Stream),
    row("GET", "/healthz", Public, Target::None, Body::None),
    row("GET", "/ping", Public, Target::None, Body::None),
    row("HEAD", "/ping", Public, Target::None, Body::None),
    row("GET", "/health", Public, Target::None, Body::None),
    row("GET", "/metrics", Public, Target::None, Body::None),
    row("POST", "/api/v1/{token}/telemetry", DeviceOnly, Target::None, Body::Json(r#"{"temp": 20}"#)),
    row("POST", "/api/v1/devices/{id}/telemetry", Min(Operator), Target::Device, Body::Json(r#"{"temp": 20}"#)),
    row("GET", "/api/v1/devices/{id}/telemetry", Min(Viewer), Target::Device, Body::None),
    row("POST", "/write", Min(Operator), Target::None, Body::None),
    row("POST", "/api/v2/write", Min(Operator), Target::None, Body::None),
    row("GET", "/mqtt", DeviceOnly, Target::None, Body::None),
    row("GET", "/api/v1/devices/ws", DeviceOnly, Target::None, Body::None),
    row("POST", "/api/v1/integrations/chirpstack", Min(Operator), Target::None, Body::Json("{}")),
    row("POST", "/api/v1/integrations/tts", Min(Operator), Target::None, Body::Json("{}")),
];

/// Source files that declare routes, relative to the crate.
const ROUTER_SOURCES: [&str; 5] = [
    "src/api/mod.rs",
    "src/api/identity.rs",
    "src/api/service_accounts.rs",
    "src/api/live.rs",
    "src/adapters/http/mod.rs",
];

/// Extracts `(METHOD, path)` of every `.route("path", ...)` call in Rust
/// source: the methods are the `get(`, `post(`, ... calls inside it.
fn routes_in_source(source: &str) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    let mut rest = source;
    while let Some(start) = rest.find(".route(") {
        rest = &rest[start + ".route(".len()..];
        // The call's text runs to the parenthesis that closes `.route(`.
        let mut depth = 1;
        let mut end = rest.len();
        for (index, c) in rest.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = index;
                        break;
                    }
                }
                _ => {}
            }
        }
        let call = &rest[..end];
        let Some(path) = call.split('"').nth(1) else {
            continue;
        };
        for method in ["get", "post", "put", "patch", "delete", "head"] {
            let found = call.match_indices(&format!("{method}(")).any(|(index, _)| {
                let before = call[..index].chars().last();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            });
            if found {
                routes.push((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    routes
}

#[test]
fn route_table_covers_router() {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let mut declared = BTreeSet::new();
    for file in ROUTER_SOURCES {
        let source = std::fs::read_to_string(format!("{crate_dir}/{file}")).expect("read source");
        declared.extend(routes_in_source(&source));
    }
    let table: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|row| (row.method.to_owned(), row.path.to_owned()))
        .collect();

    let missing: Vec<_> = declared.difference(&table).collect();
    let extra: Vec<_> = table.difference(&declared).collect();
    assert!(
        missing.is_empty(),
        "routes without a row in ROUTES (add one, and a line to the roles table of docs/security.md): {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "rows of ROUTES that no router declares: {extra:?}"
    );
    assert_eq!(table.len(), ROUTES.len(), "ROUTES has a duplicate row");
}

fn access_text(access: Access) -> &'static str {
    match access {
        Public => "public",
        DeviceOnly => "device",
        Min(role) => role.name(),
        Any => "any",
        UserOnly => "user",
    }
}

#[test]
fn roles_doc_matches_route_table() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/security.md"
    ))
    .expect("read docs/security.md");
    let section = doc
        .split("\n## Roles\n")
        .nth(1)
        .expect("docs/security.md has a \"## Roles\" section")
        .split("\n## ")
        .next()
        .unwrap();
    let documented: Vec<(String, String, String)> = section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (method, path) = cells[1]
                .trim_matches('`')
                .split_once(' ')
                .expect("a cell such as `GET /path`");
            (method.to_owned(), path.to_owned(), cells[2].to_owned())
        })
        .collect();
    let expected: Vec<(String, String, String)> = ROUTES
        .iter()
        .map(|row| {
            (
                row.method.to_owned(),
                row.path.to_owned(),
                access_text(row.access).to_owned(),
            )
        })
        .collect();
    assert_eq!(
        documented, expected,
        "the roles table of docs/security.md differs from ROUTES; print the table with `cargo test -p ferrite --test it -- roles_doc_table --nocapture --ignored`"
    );
}

/// Prints the roles table for docs/security.md.
#[test]
#[ignore = "prints the documentation table; run by hand"]
fn roles_doc_table() {
    println!("| endpoint | minimum |\n|---|---|");
    for row in ROUTES {
        println!(
            "| `{} {}` | {} |",
            row.method,
            row.path,
            access_text(row.access)
        );
    }
}

/// A tenant with its credentials and one object of each kind.
struct Tenant {
    id: String,
    admin_email: String,
    admin_jwt: String,
    /// API keys by role.
    keys: Vec<(Role, String)>,
    device_id: String,
    device_name: String,
    device_token: String,
    profile_id: String,
    alarm_id: String,
    delivery_id: String,
    /// An API key made to be revoked by the tests.
    spare_key_id: String,
    spare_key_name: String,
    gateway_eui: String,
    dev_eui: String,
    fingerprint: String,
    psk_identity: String,
    pem: String,
    /// A viewer created through the users API, and its access token.
    user_id: String,
    user_email: String,
    user_jwt: String,
    service_account_id: String,
    service_account_name: String,
    client_id: String,
    client_secret: String,
    /// SHA-256 fingerprint in hex, and the subject CN of a device CA.
    ca_fingerprint: String,
    ca_name: String,
    ca_pem: String,
}

impl Tenant {
    fn key(&self, role: Role) -> &str {
        &self
            .keys
            .iter()
            .find(|(key_role, _)| *key_role == role)
            .expect("key of role")
            .1
    }

    /// Strings that only this tenant's data contains.
    fn markers(&self) -> Vec<&str> {
        vec![
            &self.id,
            &self.admin_email,
            &self.device_id,
            &self.device_name,
            &self.profile_id,
            &self.alarm_id,
            &self.delivery_id,
            &self.spare_key_id,
            &self.spare_key_name,
            &self.gateway_eui,
            &self.dev_eui,
            &self.fingerprint,
            &self.psk_identity,
            &self.user_id,
            &self.user_email,
            &self.service_account_id,
            &self.service_account_name,
            &self.client_id,
            &self.ca_fingerprint,
            &self.ca_name,
        ]
    }
}

struct Client<'a> {
    server: &'a Server,
    http: reqwest::Client,
}

impl Client<'_> {
    async fn send(
        &self,
        method: &str,
        path: &str,
        credential: &str,
        body: Option<(&str, String)>,
    ) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.server.http_url))
            .bearer_auth(credential)
            .timeout(Duration::from_secs(30));
        if let Some((content_type, body)) = body {
            request = request.header("Content-Type", content_type).body(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    async fn json(&self, method: &str, path: &str, credential: &str, body: Value) -> (u16, Value) {
        let (status, text) = self
            .send(
                method,
                path,
                credential,
                Some(("application/json", body.to_string())),
            )
            .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn wait_for(
        &self,
        path: &str,
        credential: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (status, text) = self.send("GET", path, credential, None).await;
            let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            if status == 200 && check(&body) {
                return body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{path} never matched; last response {status}: {text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Creates a self-signed certificate and returns its PEM. With `ca` set it
/// is a CA certificate.
fn self_signed_pem(common_name: &str, ca: bool) -> String {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::{BasicConstraints, KeyUsage};
    use openssl::x509::{X509, X509NameBuilder};

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .unwrap();
    let name = name.build();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(&name).unwrap();
    builder.set_pubkey(&key).unwrap();
    let serial = openssl::bn::BigNum::from_u32(1)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    builder
        .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    if ca {
        builder
            .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        builder
            .append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()
                    .unwrap(),
            )
            .unwrap();
    }
    builder
        .sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
}

fn cli_json(server: &Server, args: &[&str], stdin: Option<&str>) -> Value {
    let output = run_cli(args, &server.data_dir, stdin);
    serde_json::from_str(output.trim()).expect("CLI JSON output")
}

/// Creates a tenant through the CLI and one object of each kind in it
/// through the API. `digit` makes its EUIs unique.
async fn seed_tenant(server: &Server, name: &str, digit: char) -> Tenant {
    let client = Client {
        server,
        http: reqwest::Client::new(),
    };
    let created = cli_json(server, &["tenant", "create", name], None);
    let tenant_id = created["id"].as_str().expect("tenant id").to_owned();
    let admin_email = format!("admin@{name}.example");
    cli_json(
        server,
        &[
            "user",
            "create",
            &admin_email,
            "--role",
            "admin",
            "--tenant",
            name,
        ],
        Some(&format!("{ADMIN_PASSWORD}\n")),
    );
    let mut keys = Vec::new();
    for role in [Viewer, Operator, Admin] {
        let key = cli_json(
            server,
            &[
                "api-key",
                "create",
                &format!("{name}-{}", role.name()),
                "--role",
                role.name(),
                "--tenant",
                name,
            ],
            None,
        );
        keys.push((role, key["key"].as_str().expect("key").to_owned()));
    }
    let admin = keys[2].1.clone();

    let (status, login) = client
        .json(
            "POST",
            "/api/v1/auth/login",
            "",
            json!({"email": admin_email, "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let admin_jwt = login["access_token"].as_str().unwrap().to_owned();

    let (status, text) = client
        .send(
            "POST",
            "/api/v1/profiles",
            &admin,
            Some(("application/yaml", PROFILE_YAML.to_owned())),
        )
        .await;
    assert_eq!(status, 201, "{text}");
    let profile: Value = serde_json::from_str(&text).unwrap();
    let profile_id = profile["id"].as_str().expect("profile id").to_owned();

    let device_name = format!("{name}-boiler");
    let (status, device) = client
        .json(
            "POST",
            "/api/v1/devices",
            &admin,
            json!({"name": device_name, "profile": "thermometer"}),
        )
        .await;
    assert_eq!(status, 201, "{device}");
    let device_id = device["id"].as_str().unwrap().to_owned();
    let device_token = device["token"].as_str().unwrap().to_owned();

    // One reading raises an alarm, one lacks the required key and becomes
    // a dead letter.
    for body in [r#"{"temp": 45}"#, r#"{"humidity": 1}"#] {
        let status = client
            .http
            .post(format!(
                "{}/api/v1/{device_token}/telemetry",
                server.http_url
            ))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }

    let psk_identity = format!("{name}-psk");
    let (status, body) = client
        .json(
            "PUT",
            &format!("/api/v1/devices/{device_id}/credentials/psk"),
            &admin,
            json!({"identity": psk_identity, "key": "00112233445566778899aabbccddeeff"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let pem = self_signed_pem(name, false);
    let (status, body) = client
        .json(
            "POST",
            &format!("/api/v1/devices/{device_id}/credentials/certificates"),
            &admin,
            json!({"pem": pem}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let fingerprint = body["fingerprint"].as_str().unwrap().to_owned();

    let dev_eui: String = std::iter::repeat_n(digit, 15).chain(['1']).collect();
    let (status, body) = client
        .json(
            "PUT",
            &format!("/api/v1/devices/{device_id}/lorawan"),
            &admin,
            json!({"dev_eui": dev_eui, "activation": "external"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let gateway_eui: String = std::iter::repeat_n(digit, 15).chain(['2']).collect();
    let (status, body) = client
        .json(
            "POST",
            "/api/v1/lorawan/gateways",
            &admin,
            json!({"gateway_eui": gateway_eui, "name": format!("{name}-gateway")}),
        )
        .await;
    assert!(status == 201 || status == 200, "{status} {body}");

    let (status, delivery) = client
        .json(
            "POST",
            "/api/v1/actions/test",
            &admin,
            json!({"action": {"type": "webhook", "url": "http://127.0.0.1:9/"}, "device_id": device_id}),
        )
        .await;
    assert_eq!(status, 202, "{delivery}");
    let delivery_id = json_id(&delivery["id"]);

    let spare_key_name = format!("{name}-spare");
    let (status, spare) = client
        .json(
            "POST",
            "/api/v1/api-keys",
            &admin,
            json!({"name": spare_key_name, "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{spare}");
    let spare_key_id = spare["id"].as_str().unwrap().to_owned();

    let user_email = format!("viewer@{name}.example");
    let (status, user) = client
        .json(
            "POST",
            "/api/v1/users",
            &admin,
            json!({"email": user_email, "role": "viewer", "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(status, 201, "{user}");
    let user_id = json_id(&user["id"]);
    let (status, login) = client
        .json(
            "POST",
            "/api/v1/auth/login",
            "",
            json!({"email": user_email, "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(status, 200, "{login}");
    let user_jwt = login["access_token"].as_str().unwrap().to_owned();

    let service_account_name = format!("{name}-service");
    let (status, account) = client
        .json(
            "POST",
            "/api/v1/service-accounts",
            &admin,
            json!({"name": service_account_name, "role": "viewer"}),
        )
        .await;
    assert_eq!(status, 201, "{account}");
    let service_account_id = json_id(&account["id"]);
    let client_id = account["client_id"].as_str().unwrap().to_owned();
    let client_secret = account["client_secret"].as_str().unwrap().to_owned();

    let ca_name = format!("{name}-device-ca");
    let ca_pem = self_signed_pem(&ca_name, true);
    let (status, ca) = client
        .json("POST", "/api/v1/device-cas", &admin, json!({"pem": ca_pem}))
        .await;
    assert_eq!(status, 201, "{ca}");
    let ca_fingerprint = ca["fingerprint"].as_str().unwrap().to_owned();

    let alarms = client
        .wait_for("/api/v1/alarms?status=active", &admin, |body| {
            body["alarms"]
                .as_array()
                .is_some_and(|alarms| !alarms.is_empty())
        })
        .await;
    let alarm_id = alarms["alarms"][0]["id"].as_str().unwrap().to_owned();
    client
        .wait_for(
            &format!("/api/v1/devices/{device_id}/dead-letters"),
            &admin,
            |body| {
                body["dead_letters"]
                    .as_array()
                    .is_some_and(|letters| !letters.is_empty())
            },
        )
        .await;

    Tenant {
        id: tenant_id,
        admin_email,
        admin_jwt,
        keys,
        device_id,
        device_name,
        device_token,
        profile_id,
        alarm_id,
        delivery_id,
        spare_key_id,
        spare_key_name,
        gateway_eui: gateway_eui.to_lowercase(),
        dev_eui,
        fingerprint,
        psk_identity,
        pem,
        user_id,
        user_email,
        user_jwt,
        service_account_id,
        service_account_name,
        client_id,
        client_secret,
        ca_fingerprint,
        ca_name,
        ca_pem,
    }
}

fn json_id(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A CA certificate that the rows registering a device CA send, so they
/// never collide with a tenant's own CA.
static MATRIX_CA_PEM: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| self_signed_pem("matrix-device-ca", true));

/// Builds the path and body of a row's request aimed at `target`'s objects.
fn request_for(row: &Row, target: &Tenant) -> (String, Option<(&'static str, String)>) {
    let id = match row.target {
        Target::None => "",
        Target::Device => &target.device_id,
        Target::Profile => &target.profile_id,
        Target::Alarm => &target.alarm_id,
        Target::Delivery => &target.delivery_id,
        Target::ApiKey => &target.spare_key_id,
        Target::User => &target.user_id,
        Target::ServiceAccount => &target.service_account_id,
        Target::DeviceCa => "",
    };
    let fingerprint = match row.target {
        Target::DeviceCa => &target.ca_fingerprint,
        _ => &target.fingerprint,
    };
    let mut path = row
        .path
        .replace("{id}", id)
        .replace("{eui}", &target.gateway_eui)
        .replace("{fingerprint}", fingerprint)
        .replace("{token}", &target.device_token);
    match row.path {
        "/api/v1/telemetry/aggregate" => path.push_str("?key=temperature&agg=max&interval=1h"),
        "/api/v1/export" => path.push_str("?format=csv"),
        "/api/v1/audit/export" => path.push_str("?format=csv"),
        _ => {}
    }
    let fill = |template: &str| {
        template
            .replace("$device", &target.device_id)
            .replace("$profile_name", "thermometer")
            .replace("$pem", &target.pem.replace('\n', "\\n"))
            .replace("$dev_eui", &target.dev_eui)
            .replace("$matrix_gateway", "00000000000000ff")
            .replace("$matrix_ca_pem", &MATRIX_CA_PEM.replace('\n', "\\n"))
    };
    let body = match row.body {
        Body::Json(template) => Some(("application/json", fill(template))),
        Body::Yaml(template) => Some(("application/yaml", fill(template))),
        Body::None | Body::Stream => None,
    };
    (path, body)
}

/// Sends a row's request and returns the status and, unless the route
/// streams forever, the body.
async fn call(
    client: &Client<'_>,
    row: &Row,
    path: &str,
    credential: &str,
    body: Option<(&'static str, String)>,
) -> (u16, String) {
    if row.body == Body::Stream {
        let response = client
            .http
            .get(format!("{}{path}", client.server.http_url))
            .bearer_auth(credential)
            .send()
            .await
            .expect("request");
        return (response.status().as_u16(), String::new());
    }
    client.send(row.method, path, credential, body).await
}

#[tokio::test]
async fn tenant_routes_never_reach_other_tenant() {
    let server = Server::start().await;
    let client = Client {
        server: &server,
        http: reqwest::Client::new(),
    };
    let a = seed_tenant(&server, "acme", 'a').await;
    let b = seed_tenant(&server, "globex", 'b').await;

    let mut failures = Vec::new();
    // Everything A has sent so far: A's audit log records the ids of A's
    // own requests, so they are no leak there.
    let mut sent_by_a = String::new();
    for row in ROUTES {
        if matches!(row.access, Public | DeviceOnly) {
            continue;
        }
        let (path, body) = request_for(row, &b);
        let request_text = format!("{path} {}", body.as_ref().map_or("", |(_, body)| body));
        let audit = row.path.starts_with("/api/v1/audit");
        for credential in [a.key(Admin), a.admin_jwt.as_str()] {
            let (status, text) = call(&client, row, &path, credential, body.clone()).await;
            let names_b = path.contains(&b.device_id)
                || path.contains(&b.profile_id)
                || path.contains(&b.alarm_id)
                || path.contains(&b.delivery_id)
                || path.contains(&b.spare_key_id)
                || path.contains(&b.gateway_eui)
                || path.contains(&b.user_id)
                || path.contains(&b.service_account_id)
                || path.contains(&b.ca_fingerprint)
                || request_text.contains(&b.device_id);
            if names_b && status != 404 {
                failures.push(format!(
                    "{} {path}: {status}, expected 404: {text}",
                    row.method
                ));
            }
            // An error may repeat the ids of the request; any other string
            // of B is a leak.
            for marker in b.markers() {
                let echoed = request_text.contains(marker) || (audit && sent_by_a.contains(marker));
                if text.contains(marker) && !echoed {
                    failures.push(format!(
                        "{} {path} returned B's {marker:?}: {text}",
                        row.method
                    ));
                }
            }
        }
        sent_by_a.push_str(&request_text);
    }

    // B's ids in query parameters and bodies, where the routes above put
    // A's own values.
    let sse_probe = format!("/api/v1/live/sse?profile={}", b.profile_id);
    let probes: Vec<(&str, String, Option<Value>, bool)> = vec![
        (
            "GET",
            format!("/api/v1/telemetry/latest?profile={}", b.profile_id),
            None,
            true,
        ),
        (
            "GET",
            format!(
                "/api/v1/telemetry/aggregate?key=temperature&agg=max&interval=1h&profile={}",
                b.profile_id
            ),
            None,
            true,
        ),
        (
            "GET",
            format!("/api/v1/export?format=csv&device={}", b.device_id),
            None,
            true,
        ),
        (
            "GET",
            format!("/api/v1/export?format=csv&device={}", b.device_name),
            None,
            true,
        ),
        (
            "PATCH",
            format!("/api/v1/devices/{}", a.device_id),
            Some(json!({"profile": b.profile_id})),
            true,
        ),
        (
            "POST",
            "/api/v1/devices".to_owned(),
            Some(json!({"name": "probe", "profile": b.profile_id})),
            true,
        ),
        (
            "POST",
            "/api/v1/profiles/test".to_owned(),
            Some(json!({"profile": b.profile_id, "payload": "{\"temp\": 20}"})),
            true,
        ),
        (
            "GET",
            format!("/api/v1/actions/deliveries?alarm_id={}", b.alarm_id),
            None,
            false,
        ),
        (
            "GET",
            format!("/api/v1/alarms?device={}", b.device_id),
            None,
            false,
        ),
        // Emails are unique across tenants because login is by email, so
        // this is a conflict that must name nothing of B but the email.
        (
            "POST",
            "/api/v1/users".to_owned(),
            Some(json!({"email": b.user_email, "role": "viewer", "password": ADMIN_PASSWORD})),
            false,
        ),
    ];
    for (method, path, body, expect_404) in probes {
        let body = body.map(|body| ("application/json", body.to_string()));
        let request_text = format!("{path} {}", body.as_ref().map_or("", |(_, body)| body));
        let (status, text) = client.send(method, &path, a.key(Admin), body).await;
        if expect_404 && status != 404 {
            failures.push(format!("{method} {path}: {status}, expected 404: {text}"));
        }
        for marker in b.markers() {
            if text.contains(marker) && !request_text.contains(marker) {
                failures.push(format!("{method} {path} returned B's {marker:?}: {text}"));
            }
        }
    }
    // B's CA is rejected with the message that any registered CA gets,
    // which names only the fingerprint of the request's certificate.
    let (status, text) = client
        .json(
            "POST",
            "/api/v1/device-cas",
            a.key(Admin),
            json!({"pem": b.ca_pem}),
        )
        .await;
    if status != 409 {
        failures.push(format!(
            "POST /api/v1/device-cas with B's CA: {status}, expected 409: {text}"
        ));
    }
    let text = text.to_string();
    for marker in b.markers() {
        if marker != b.ca_fingerprint && text.contains(marker) {
            failures.push(format!(
                "POST /api/v1/device-cas with B's CA returned B's {marker:?}: {text}"
            ));
        }
    }

    let response = client
        .http
        .get(format!("{}{sse_probe}", server.http_url))
        .bearer_auth(a.key(Admin))
        .send()
        .await
        .unwrap();
    if response.status() != 404 {
        failures.push(format!(
            "GET {sse_probe}: {}, expected 404",
            response.status()
        ));
    }
    assert!(
        failures.is_empty(),
        "tenant isolation failures:\n{}",
        failures.join("\n")
    );

    // Tenant B still has everything A aimed at.
    let b_admin = b.key(Admin);
    for path in [
        format!("/api/v1/devices/{}", b.device_id),
        format!("/api/v1/profiles/{}", b.profile_id),
        format!("/api/v1/devices/{}/credentials/psk", b.device_id),
        format!("/api/v1/devices/{}/lorawan", b.device_id),
    ] {
        let (status, text) = client.send("GET", &path, b_admin, None).await;
        assert_eq!(status, 200, "{path}: {text}");
    }
    let (_, alarm) = client
        .send(
            "GET",
            &format!("/api/v1/alarms/{}", b.alarm_id),
            b_admin,
            None,
        )
        .await;
    assert!(alarm.contains("\"active\""), "B's alarm changed: {alarm}");
    let (_, keys) = client.send("GET", "/api/v1/api-keys", b_admin, None).await;
    assert!(
        keys.contains(&b.spare_key_id),
        "B's API key was revoked: {keys}"
    );
    let (_, gateways) = client
        .send("GET", "/api/v1/lorawan/gateways", b_admin, None)
        .await;
    assert!(
        gateways.contains(&b.gateway_eui),
        "B's gateway was deleted: {gateways}"
    );
    let (_, certificates) = client
        .send(
            "GET",
            &format!("/api/v1/devices/{}/credentials/certificates", b.device_id),
            b_admin,
            None,
        )
        .await;
    assert!(
        certificates.contains(&b.fingerprint),
        "B's certificate was deleted"
    );
    let (status, user) = client
        .send(
            "GET",
            &format!("/api/v1/users/{}", b.user_id),
            b_admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "B's user: {user}");
    assert!(user.contains("\"viewer\""), "B's user changed: {user}");
    let (status, login) = client
        .json(
            "POST",
            "/api/v1/auth/login",
            "",
            json!({"email": b.user_email, "password": ADMIN_PASSWORD}),
        )
        .await;
    assert_eq!(status, 200, "B's user cannot log in: {login}");
    let (status, me) = client
        .send("GET", "/api/v1/auth/me", &b.user_jwt, None)
        .await;
    assert_eq!(status, 200, "B's user session ended: {me}");
    let token = client
        .http
        .post(format!("{}/api/v1/oauth/token", server.http_url))
        .basic_auth(&b.client_id, Some(&b.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(
        token.status(),
        200,
        "B's service account was revoked: {}",
        token.text().await.unwrap_or_default()
    );
    let (status, ca) = client
        .send(
            "GET",
            &format!("/api/v1/device-cas/{}", b.ca_fingerprint),
            b_admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "B's device CA was deleted: {ca}");
    let (status, credentials) = client
        .send(
            "GET",
            &format!("/api/v1/devices/{}/credentials", b.device_id),
            b_admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "{credentials}");
    assert!(
        credentials.contains(&b.psk_identity),
        "B's device credentials were revoked: {credentials}"
    );
    let (status, _) = client
        .send(
            "POST",
            "/api/v1/devices",
            b.key(Admin),
            Some(("application/json", "{".into())),
        )
        .await;
    assert_eq!(status, 400, "B's admin key still works");
}

#[tokio::test]
async fn tenant_streams_never_carry_other_tenant() {
    let server = Server::start().await;
    let a = seed_tenant(&server, "acme", 'a').await;
    let b = seed_tenant(&server, "globex", 'b').await;
    let http = reqwest::Client::new();

    // A stream filtered to B's device is refused like a missing device.
    let response = http
        .get(format!(
            "{}/api/v1/live/sse?device={}",
            server.http_url, b.device_id
        ))
        .bearer_auth(a.key(Viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "{}", response.text().await.unwrap());

    // A's live streams and MQTT application subscription, open before
    // both tenants send.
    let sse = http
        .get(format!("{}/api/v1/live/sse", server.http_url))
        .bearer_auth(a.key(Viewer))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut sse_body = chunks(sse);
    let ws_url = format!(
        "ws://{}/api/v1/live/ws?access_token={}",
        server.http_addr,
        a.key(Viewer)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("live WebSocket");
    let (mqtt, mut mqtt_messages) = mqtt_application(&server, a.key(Viewer)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    for (tenant, body) in [(&b, r#"{"temp": 50}"#), (&a, r#"{"temp": 51}"#)] {
        let status = http
            .post(format!(
                "{}/api/v1/{}/telemetry",
                server.http_url, tenant.device_token
            ))
            .header("Content-Type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }

    // Each stream gets A's reading; whatever it gets until then and for a
    // moment after must not be B's.
    let mut sse_text = String::new();
    let mut ws_text = String::new();
    let mut mqtt_text = String::new();
    let seen_all = |sse: &str, ws: &str, mqtt: &str| {
        [sse, ws, mqtt]
            .iter()
            .all(|text| text.contains(&a.device_id))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let quiet_until = loop {
        tokio::select! {
            Some(chunk) = sse_body.recv() => sse_text.push_str(&String::from_utf8_lossy(&chunk)),
            Some(Ok(message)) = ws.next() => ws_text.push_str(&message.to_string()),
            Some((topic, payload)) = mqtt_messages.recv() => {
                mqtt_text.push_str(&topic);
                mqtt_text.push_str(&String::from_utf8_lossy(&payload));
            }
            () = tokio::time::sleep_until(deadline) => panic!(
                "A's streams did not all receive A's reading: sse={sse_text} ws={ws_text} mqtt={mqtt_text}"
            ),
        }
        if seen_all(&sse_text, &ws_text, &mqtt_text) {
            break tokio::time::Instant::now() + Duration::from_millis(500);
        }
    };
    loop {
        tokio::select! {
            Some(chunk) = sse_body.recv() => sse_text.push_str(&String::from_utf8_lossy(&chunk)),
            Some(Ok(message)) = ws.next() => ws_text.push_str(&message.to_string()),
            Some((topic, payload)) = mqtt_messages.recv() => {
                mqtt_text.push_str(&topic);
                mqtt_text.push_str(&String::from_utf8_lossy(&payload));
            }
            () = tokio::time::sleep_until(quiet_until) => break,
        }
    }
    for (stream, text) in [
        ("SSE", &sse_text),
        ("WebSocket", &ws_text),
        ("MQTT", &mqtt_text),
    ] {
        for marker in b.markers() {
            assert!(
                !text.contains(marker),
                "A's {stream} stream carried B's {marker:?}: {text}"
            );
        }
    }
    drop(mqtt);
}

/// Forwards the body chunks of a streamed response to a channel.
fn chunks(mut response: reqwest::Response) -> tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(chunk)) = response.chunk().await {
            if sender.send(chunk).is_err() {
                return;
            }
        }
    });
    receiver
}

/// Connects an MQTT application client with an API key, subscribed to
/// everything of its tenant.
async fn mqtt_application(
    server: &Server,
    api_key: &str,
) -> (
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<(String, bytes::Bytes)>,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let mut options = MqttOptions::new("tenancy-app", "127.0.0.1", server.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_credentials(api_key, "");
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let (messages, messages_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(subscribed) = subscribed_tx.take() {
                        let _ = subscribed.send(());
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
    client
        .subscribe("#", QoS::AtLeastOnce)
        .await
        .expect("queue SUBSCRIBE");
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .expect("timed out subscribing")
        .expect("SUBACK");
    (client, messages_rx)
}

#[tokio::test]
async fn role_matrix_matches_route_table() {
    let server = Server::start().await;
    let client = Client {
        server: &server,
        http: reqwest::Client::new(),
    };
    let tenant = seed_tenant(&server, "roles", 'c').await;

    let mut failures = Vec::new();
    for row in ROUTES {
        let minimum = match row.access {
            Public | DeviceOnly => continue,
            Any | UserOnly => {
                check_self_service(&client, row, &tenant, &mut failures).await;
                continue;
            }
            Min(minimum) => minimum,
        };
        for role in [Viewer, Operator, Admin] {
            let (path, body) = request_for(row, &tenant);
            let (status, text) = call(&client, row, &path, tenant.key(role), body).await;
            let allowed = role >= minimum;
            if allowed && status == 403 {
                failures.push(format!(
                    "{} {path} as {}: 403, expected access (minimum {}): {text}",
                    row.method,
                    role.name(),
                    minimum.name()
                ));
            }
            if !allowed && status != 403 {
                failures.push(format!(
                    "{} {path} as {}: {status}, expected 403 (minimum {}): {text}",
                    row.method,
                    role.name(),
                    minimum.name()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "role failures:\n{}",
        failures.join("\n")
    );
}

/// Checks a route for the caller's own identity: every user may call it,
/// and so may every API key and service account unless the row is for
/// users only.
async fn check_self_service(
    client: &Client<'_>,
    row: &Row,
    tenant: &Tenant,
    failures: &mut Vec<String>,
) {
    let response = client
        .http
        .post(format!("{}/api/v1/oauth/token", client.server.http_url))
        .basic_auth(&tenant.client_id, Some(&tenant.client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "service account token");
    let issued: Value = response.json().await.unwrap();
    let service_token = issued["access_token"].as_str().expect("access_token");

    let mut callers = vec![
        ("viewer user", tenant.user_jwt.as_str(), true),
        ("admin user", tenant.admin_jwt.as_str(), true),
        ("service account", service_token, row.access == Any),
    ];
    for role in [Viewer, Operator, Admin] {
        callers.push((role.name(), tenant.key(role), row.access == Any));
    }
    for (caller, credential, allowed) in callers {
        let (path, body) = request_for(row, tenant);
        let (status, text) = call(client, row, &path, credential, body).await;
        if allowed && (status == 401 || status == 403) {
            failures.push(format!(
                "{} {path} as {caller}: {status}, expected access: {text}",
                row.method
            ));
        }
        if !allowed && status != 403 {
            failures.push(format!(
                "{} {path} as {caller}: {status}, expected 403 (users only): {text}",
                row.method
            ));
        }
    }
}

#[tokio::test]
async fn tenant_cli_creates_and_lists() {
    let server = Server::start().await;
    let created = cli_json(&server, &["tenant", "create", "initech"], None);
    assert_eq!(created["name"], "initech");

    let listed = cli_json(&server, &["tenant", "list"], None);
    let names: Vec<&str> = listed
        .as_array()
        .expect("JSON array")
        .iter()
        .map(|tenant| tenant["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "initech"]);

    // A device created in the new tenant is invisible to the default
    // tenant's admin.
    let device = cli_json(
        &server,
        &["device", "create", "press", "--tenant", "initech"],
        None,
    );
    let (status, _) = server
        .get_json(&format!(
            "/api/v1/devices/{}",
            device["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, 404);
}

#[test]
fn tenant_cli_rejects_bad_names() {
    let temp = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (vec!["tenant", "create", "a b"], "not allowed"),
        (
            vec!["device", "create", "x", "--tenant", "missing"],
            "not found",
        ),
    ] {
        let output = std::process::Command::new(crate::support::BINARY)
            .args(&args)
            .arg("--data-dir")
            .arg(temp.path())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{args:?} succeeded");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
