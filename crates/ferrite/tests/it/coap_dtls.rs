//! CoAP over DTLS as a black box: OpenSSL clients over real UDP sockets
//! with a PSK or a client certificate, credentials set through the REST
//! API, and the handshake counters on `/metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslStream, SslVerifyMode,
};
use openssl::x509::{X509, X509NameBuilder};
use serde_json::{Value, json};

use crate::support::{Server, TestDevice, wait_until};

const KEY_HEX: &str = "00112233445566778899aabbccddeeff";
/// Maximum wait for stored telemetry to show in the latest values.
const STORE_WAIT: Duration = Duration::from_secs(10);

/// A connected UDP socket as the blocking stream of an OpenSSL client.
#[derive(Debug)]
struct UdpStream(UdpSocket);

impl Read for UdpStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for UdpStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type DtlsStream = SslStream<UdpStream>;

fn client_context(setup: impl FnOnce(&mut SslContextBuilder)) -> SslContext {
    let mut builder = SslContextBuilder::new(SslMethod::dtls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    setup(&mut builder);
    builder.build()
}

fn psk_client(identity: &str, key_hex: &str) -> SslContext {
    let identity = identity.to_owned();
    let key = hex::decode(key_hex).unwrap();
    client_context(move |builder| {
        builder.set_cipher_list("PSK-AES128-CCM8").unwrap();
        builder.set_psk_client_callback(move |_, _, identity_out, key_out| {
            identity_out[..identity.len()].copy_from_slice(identity.as_bytes());
            identity_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
    })
}

fn certificate_client(cert: &X509, key: &PKey<Private>) -> SslContext {
    client_context(|builder| {
        builder.set_cipher_list("ECDHE-ECDSA-AES128-CCM8").unwrap();
        builder.set_certificate(cert).unwrap();
        builder.set_private_key(key).unwrap();
    })
}

/// Runs a blocking handshake on a thread; the error names the failure.
async fn connect(context: SslContext, server: SocketAddr) -> Result<DtlsStream, String> {
    tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        Ssl::new(&context)
            .unwrap()
            .connect(UdpStream(socket))
            .map_err(|error| match error {
                HandshakeError::Failure(mid) => format!("failure: {}", mid.error()),
                HandshakeError::WouldBlock(mid) => format!("timed out: {}", mid.error()),
                HandshakeError::SetupFailure(error) => format!("setup: {error}"),
            })
    })
    .await
    .unwrap()
}

fn post(path: &str, payload: &[u8], message_id: u16) -> Packet {
    let mut packet = Packet::new();
    packet.header.set_type(MessageType::Confirmable);
    packet.header.code = MessageClass::Request(RequestType::Post);
    packet.header.message_id = message_id;
    packet.set_token(vec![0x7a, message_id as u8]);
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        packet.add_option(CoapOption::UriPath, segment.as_bytes().to_vec());
    }
    packet.add_option(CoapOption::ContentFormat, vec![50]);
    packet.payload = payload.to_vec();
    packet
}

/// Sends a request over the session and returns the response code and
/// payload, following a separate response after an empty ACK.
async fn request(stream: DtlsStream, packet: Packet) -> (DtlsStream, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut stream = stream;
        stream.ssl_write(&packet.to_bytes().unwrap()).unwrap();
        let mut buffer = vec![0u8; 4096];
        loop {
            let length = stream.ssl_read(&mut buffer).expect("a response in time");
            let reply = Packet::from_bytes(&buffer[..length]).expect("valid CoAP");
            if reply.header.code == MessageClass::Empty {
                continue;
            }
            if reply.header.get_type() == MessageType::Confirmable {
                let id = reply.header.message_id.to_be_bytes();
                stream.ssl_write(&[0x60, 0, id[0], id[1]]).unwrap();
            }
            let payload = String::from_utf8_lossy(&reply.payload).into_owned();
            return (stream, reply.header.code.to_string(), payload);
        }
    })
    .await
    .unwrap()
}

async fn metric(server: &Server, line_start: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|line| line.starts_with(line_start))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn handshakes(server: &Server, result: &str) -> f64 {
    metric(
        server,
        &format!("ferrite_coap_dtls_handshakes_total{{result=\"{result}\"}}"),
    )
    .await
}

async fn api(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let token = server.admin_token().await;
    api_as(server, &token, method, path, body).await
}

/// Sends a REST request with `token` as the bearer credential.
async fn api_as(
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
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn set_psk(server: &Server, device: &TestDevice, identity: &str) {
    let (status, body) = api(
        server,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{}/credentials/psk", device.id),
        Some(json!({"identity": identity, "key": KEY_HEX})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn wait_for_latest(
    server: &Server,
    device: &TestDevice,
    key: &str,
    expected: &Value,
) -> bool {
    wait_until(
        || async {
            server
                .latest(&device.id)
                .await
                .get(key)
                .is_some_and(|point| &point["value"] == expected)
        },
        STORE_WAIT,
    )
    .await
}

#[tokio::test]
async fn psk_device_posts_telemetry_without_token() {
    let server = Server::start().await;
    let device = server.create_device("dtls-psk").await;
    set_psk(&server, &device, "dtls-psk-identity").await;

    let stream = connect(psk_client("dtls-psk-identity", KEY_HEX), server.coaps_addr)
        .await
        .expect("PSK handshake");
    let (stream, code, payload) = request(stream, post("/telemetry", br#"{"temp": 21}"#, 1)).await;
    assert_eq!(code, "2.04", "{payload}");
    assert!(wait_for_latest(&server, &device, "temp", &json!(21)).await);

    // The device's own token is accepted too.
    let path = format!("/api/v1/{}/telemetry", device.token);
    let (_stream, code, payload) = request(stream, post(&path, br#"{"temp": 22}"#, 2)).await;
    assert_eq!(code, "2.04", "{payload}");
    assert!(wait_for_latest(&server, &device, "temp", &json!(22)).await);
    assert_eq!(handshakes(&server, "ok").await, 1.0);
}

#[tokio::test]
async fn token_of_another_device_is_forbidden() {
    let server = Server::start().await;
    let device = server.create_device("dtls-owner").await;
    let other = server.create_device("dtls-other").await;
    set_psk(&server, &device, "dtls-owner-identity").await;

    let stream = connect(
        psk_client("dtls-owner-identity", KEY_HEX),
        server.coaps_addr,
    )
    .await
    .expect("PSK handshake");
    let path = format!("/api/v1/{}/telemetry", other.token);
    let (_stream, code, payload) = request(stream, post(&path, br#"{"temp": 1}"#, 1)).await;
    assert_eq!(code, "4.03", "{payload}");
}

#[tokio::test]
async fn failed_handshakes_are_counted() {
    let server = Server::start_with_env(&[("FERRITE_COAP_DTLS_HANDSHAKE_TIMEOUT", "1s")]).await;
    let device = server.create_device("dtls-fail").await;
    set_psk(&server, &device, "dtls-fail-identity").await;

    let unknown = connect(psk_client("nobody", KEY_HEX), server.coaps_addr).await;
    assert!(unknown.is_err(), "unknown identity");
    let wrong_key = connect(
        psk_client("dtls-fail-identity", "ffeeddccbbaa99887766554433221100"),
        server.coaps_addr,
    )
    .await;
    assert!(wrong_key.is_err(), "wrong key");

    assert!(
        wait_until(
            || async { handshakes(&server, "unknown_psk_identity").await == 1.0 },
            Duration::from_secs(5)
        )
        .await
    );
    assert!(
        wait_until(
            || async { handshakes(&server, "timed_out").await == 1.0 },
            Duration::from_secs(5)
        )
        .await
    );

    // The failures left the listener serving.
    let stream = connect(psk_client("dtls-fail-identity", KEY_HEX), server.coaps_addr)
        .await
        .expect("PSK handshake after failed ones");
    let (_stream, code, _) = request(stream, post("/telemetry", br#"{"n": 1}"#, 1)).await;
    assert_eq!(code, "2.04");
}

#[tokio::test]
async fn deleted_psk_stops_new_handshakes() {
    let server = Server::start().await;
    let device = server.create_device("dtls-delete").await;
    set_psk(&server, &device, "dtls-delete-identity").await;
    let path = format!("/api/v1/devices/{}/credentials/psk", device.id);
    let (status, _) = api(&server, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 204);
    let (status, _) = api(&server, reqwest::Method::DELETE, &path, None).await;
    assert_eq!(status, 404);

    let result = connect(
        psk_client("dtls-delete-identity", KEY_HEX),
        server.coaps_addr,
    )
    .await;
    assert!(result.is_err(), "handshake with a deleted PSK");
}

#[tokio::test]
async fn psk_api_checks_and_hides_the_key() {
    let server = Server::start().await;
    let device = server.create_device("dtls-api").await;
    let other = server.create_device("dtls-api-2").await;
    let path = format!("/api/v1/devices/{}/credentials/psk", device.id);

    let (status, body) = api(
        &server,
        reqwest::Method::PUT,
        &path,
        Some(json!({"identity": "dtls-api", "key": KEY_HEX})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["identity"], "dtls-api");
    assert!(body.get("key").is_none(), "{body}");
    let (status, body) = api(&server, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200);
    assert!(!body.to_string().contains(KEY_HEX), "{body}");

    let cases = [
        (json!({"identity": "x", "key": "0011"}), 400, "key"),
        (json!({"identity": "x", "key": "zz"}), 400, "key"),
        (json!({"identity": "", "key": KEY_HEX}), 400, "identity"),
    ];
    for (body, expected, param) in cases {
        let (status, problem) = api(&server, reqwest::Method::PUT, &path, Some(body.clone())).await;
        assert_eq!(status, expected, "{body}");
        assert_eq!(problem["param"], param, "{problem}");
    }

    // PSK identities are unique across devices.
    let (status, problem) = api(
        &server,
        reqwest::Method::PUT,
        &format!("/api/v1/devices/{}/credentials/psk", other.id),
        Some(json!({"identity": "dtls-api", "key": KEY_HEX})),
    )
    .await;
    assert_eq!(status, 409, "{problem}");

    let viewer = server.create_api_key("viewer", "viewer");
    let response = reqwest::Client::new()
        .get(format!("{}{path}", server.http_url))
        .bearer_auth(viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn certificate(
    common_name: &str,
    key: &PKey<Private>,
    issuer: Option<(&X509, &PKey<Private>)>,
    is_ca: bool,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .unwrap();
    let name = name.build();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = BigNum::from_u32(rand::random::<u32>() >> 1)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    builder.set_subject_name(&name).unwrap();
    builder
        .set_issuer_name(issuer.map_or(&name, |(cert, _)| cert.subject_name()))
        .unwrap();
    builder.set_pubkey(key).unwrap();
    builder
        .set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    if is_ca {
        let constraints = openssl::x509::extension::BasicConstraints::new()
            .critical()
            .ca()
            .build()
            .unwrap();
        builder.append_extension(constraints).unwrap();
    }
    builder
        .sign(issuer.map_or(key, |(_, key)| key), MessageDigest::sha256())
        .unwrap();
    builder.build()
}

/// A CA, with the server's certificate files written to `dir`.
struct Pki {
    ca_cert: X509,
    ca_key: PKey<Private>,
}

impl Pki {
    fn write(dir: &Path) -> Pki {
        let ca_key = ec_key();
        let ca_cert = certificate("Ferrite test CA", &ca_key, None, true);
        let server_key = ec_key();
        let server_cert = certificate("localhost", &server_key, Some((&ca_cert, &ca_key)), false);
        std::fs::write(dir.join("server.pem"), server_cert.to_pem().unwrap()).unwrap();
        std::fs::write(
            dir.join("server.key"),
            server_key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("ca.pem"), ca_cert.to_pem().unwrap()).unwrap();
        Pki { ca_cert, ca_key }
    }

    fn issue(&self, common_name: &str) -> (X509, PKey<Private>) {
        let key = ec_key();
        let cert = certificate(
            common_name,
            &key,
            Some((&self.ca_cert, &self.ca_key)),
            false,
        );
        (cert, key)
    }
}

async fn start_with_certificates() -> (Server, Pki, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let pki = Pki::write(files.path());
    let path = |name: &str| files.path().join(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let server = Server::start_with_env(&[
        ("FERRITE_COAP_DTLS_CERT_FILE", &cert),
        ("FERRITE_COAP_DTLS_KEY_FILE", &key),
        ("FERRITE_COAP_DTLS_CA_FILE", &ca),
    ])
    .await;
    (server, pki, files)
}

#[tokio::test]
async fn certificates_authenticate_devices() {
    let (server, pki, _files) = start_with_certificates().await;
    let registered = server.create_device("dtls-cert-registered").await;
    let named = server.create_device("dtls-cert-named").await;

    // A self-signed certificate registered through the API.
    let key = ec_key();
    let cert = certificate("whatever", &key, None, false);
    let pem = String::from_utf8(cert.to_pem().unwrap()).unwrap();
    let path = format!("/api/v1/devices/{}/credentials/certificates", registered.id);
    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        &path,
        Some(json!({"pem": pem})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let fingerprint = body["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(fingerprint.len(), 64);
    let (status, _) = api(
        &server,
        reqwest::Method::POST,
        &path,
        Some(json!({"pem": pem})),
    )
    .await;
    assert_eq!(status, 409, "registered twice");
    let (_, list) = api(&server, reqwest::Method::GET, &path, None).await;
    assert_eq!(list["certificates"][0]["fingerprint"], fingerprint);

    let stream = connect(certificate_client(&cert, &key), server.coaps_addr)
        .await
        .expect("handshake with a registered certificate");
    let (_stream, code, payload) = request(stream, post("/telemetry", br#"{"cert": 1}"#, 1)).await;
    assert_eq!(code, "2.04", "{payload}");
    assert!(wait_for_latest(&server, &registered, "cert", &json!(1)).await);

    // A certificate of the CA whose CN is the device id.
    let (cert_named, key_named) = pki.issue(&named.id);
    let stream = connect(
        certificate_client(&cert_named, &key_named),
        server.coaps_addr,
    )
    .await
    .expect("handshake with a CA-signed certificate");
    let (_stream, code, payload) = request(stream, post("/telemetry", br#"{"cert": 2}"#, 1)).await;
    assert_eq!(code, "2.04", "{payload}");
    assert!(wait_for_latest(&server, &named, "cert", &json!(2)).await);

    // Unregistered: the handshake with it fails.
    let (status, _) = api(
        &server,
        reqwest::Method::DELETE,
        &format!("{path}/{fingerprint}"),
        None,
    )
    .await;
    assert_eq!(status, 204);
    let result = connect(certificate_client(&cert, &key), server.coaps_addr).await;
    assert!(
        result.is_err(),
        "handshake with an unregistered certificate"
    );
    assert!(
        wait_until(
            || async { handshakes(&server, "bad_certificate").await == 1.0 },
            Duration::from_secs(5)
        )
        .await
    );
}

/// Adds a second tenant straight into SQLite, as the API has no endpoint
/// for tenants, and returns an admin API key of it.
async fn admin_key_of_new_tenant(server: &Server) -> String {
    use sha2::Digest;

    let key = format!("fak_{}", uuid::Uuid::new_v4().simple());
    let key_hash: [u8; 32] = sha2::Sha256::digest(key.as_bytes()).into();
    let url = format!("sqlite://{}", server.data_dir.join("metadata.db").display());
    let pool = sqlx::SqlitePool::connect(&url)
        .await
        .expect("open the metadata database");
    let tenant_id = uuid::Uuid::now_v7().to_string();
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, 0)")
        .bind(&tenant_id)
        .bind(format!("tenant-b-{tenant_id}"))
        .execute(&pool)
        .await
        .expect("insert a tenant");
    sqlx::query(concat!(
        "INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at) ",
        "VALUES (?, ?, 'tenant-b-admin', ?, 'admin', 0)"
    ))
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(&tenant_id)
    .bind(&key_hash[..])
    .execute(&pool)
    .await
    .expect("insert an API key");
    pool.close().await;
    key
}

/// Creates a device through the API with `token` and returns its id.
async fn create_device_as(server: &Server, token: &str, name: &str) -> String {
    let (status, body) = api_as(
        server,
        token,
        reqwest::Method::POST,
        "/api/v1/devices",
        Some(json!({"name": name})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// Returns the latest value of `key` of a device, read with `token`.
async fn latest_value_as(server: &Server, token: &str, device_id: &str, key: &str) -> Value {
    let path = format!("/api/v1/devices/{device_id}/telemetry/latest");
    let (status, body) = api_as(server, token, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
    body[key]["value"].clone()
}

fn pem_of(cert: &X509) -> String {
    String::from_utf8(cert.to_pem().unwrap()).unwrap()
}

#[tokio::test]
async fn ca_certificate_cannot_be_taken_by_other_tenant() {
    let (server, pki, _files) = start_with_certificates().await;
    let tenant_b = admin_key_of_new_tenant(&server).await;
    let device_b = create_device_as(&server, &tenant_b, "dtls-tenant-b").await;
    let device_a = server.create_device("dtls-tenant-a").await;
    let (cert_b, key_b) = pki.issue(&device_b);

    let stream = connect(certificate_client(&cert_b, &key_b), server.coaps_addr)
        .await
        .expect("handshake with a CA-signed certificate");
    let (_stream, code, payload) = request(stream, post("/telemetry", br#"{"probe": 1}"#, 1)).await;
    assert_eq!(code, "2.04", "{payload}");
    let stored = wait_until(
        || async { latest_value_as(&server, &tenant_b, &device_b, "probe").await == json!(1) },
        STORE_WAIT,
    )
    .await;
    assert!(stored, "the first value on tenant B's device");

    // Tenant A registers tenant B's public certificate on its own device.
    let path = format!("/api/v1/devices/{}/credentials/certificates", device_a.id);
    let (status, body) = api(
        &server,
        reqwest::Method::POST,
        &path,
        Some(json!({"pem": pem_of(&cert_b)})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "pem", "{body}");

    let stream = connect(certificate_client(&cert_b, &key_b), server.coaps_addr)
        .await
        .expect("handshake after the rejected registration");
    let (_stream, code, payload) = request(stream, post("/telemetry", br#"{"probe": 2}"#, 1)).await;
    assert_eq!(code, "2.04", "{payload}");
    let stored = wait_until(
        || async { latest_value_as(&server, &tenant_b, &device_b, "probe").await == json!(2) },
        STORE_WAIT,
    )
    .await;
    assert!(stored, "the second value on tenant B's device");
    assert!(
        server.latest(&device_a.id).await.get("probe").is_none(),
        "tenant A's device received tenant B's value"
    );
}

#[tokio::test]
async fn credential_conflicts_hide_the_holder() {
    let (server, _pki, _files) = start_with_certificates().await;
    let tenant_b = admin_key_of_new_tenant(&server).await;
    let device_b = create_device_as(&server, &tenant_b, "dtls-holder-b").await;
    let first_a = server.create_device("dtls-holder-a1").await;
    let second_a = server.create_device("dtls-holder-a2").await;

    // PSK identities: held in tenant B, and held by a device of tenant A.
    let psk_path = |device: &str| format!("/api/v1/devices/{device}/credentials/psk");
    let psk = |identity: &str| Some(json!({"identity": identity, "key": KEY_HEX}));
    let (status, body) = api_as(
        &server,
        &tenant_b,
        reqwest::Method::PUT,
        &psk_path(&device_b),
        psk("held-by-b"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    set_psk(&server, &first_a, "held-by-a").await;
    let (status, other_tenant) = api(
        &server,
        reqwest::Method::PUT,
        &psk_path(&second_a.id),
        psk("held-by-b"),
    )
    .await;
    assert_eq!(status, 409, "{other_tenant}");
    let (status, same_tenant) = api(
        &server,
        reqwest::Method::PUT,
        &psk_path(&second_a.id),
        psk("held-by-a"),
    )
    .await;
    assert_eq!(status, 409, "{same_tenant}");
    assert_eq!(other_tenant, same_tenant);

    // Certificates: the reply differs only in the fingerprint.
    let cert_path = |device: &str| format!("/api/v1/devices/{device}/credentials/certificates");
    let register = |token: String, device: String, cert: X509| {
        let server = &server;
        async move {
            api_as(
                server,
                &token,
                reqwest::Method::POST,
                &cert_path(&device),
                Some(json!({"pem": pem_of(&cert)})),
            )
            .await
        }
    };
    let cert_b = certificate("held-by-b", &ec_key(), None, false);
    let cert_a = certificate("held-by-a", &ec_key(), None, false);
    let admin = server.admin_token().await;
    let (status, body) = register(tenant_b.clone(), device_b.clone(), cert_b.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = register(admin.clone(), first_a.id.clone(), cert_a.clone()).await;
    assert_eq!(status, 201, "{body}");
    let (status, other_tenant) = register(admin.clone(), second_a.id.clone(), cert_b.clone()).await;
    assert_eq!(status, 409, "{other_tenant}");
    let (status, same_tenant) = register(admin, second_a.id.clone(), cert_a.clone()).await;
    assert_eq!(status, 409, "{same_tenant}");
    let without_fingerprint = |body: &Value, cert: &X509| {
        let fingerprint = hex::encode(cert.digest(MessageDigest::sha256()).unwrap());
        body["detail"]
            .as_str()
            .unwrap()
            .replace(&fingerprint, "<fingerprint>")
    };
    assert_eq!(
        without_fingerprint(&other_tenant, &cert_b),
        without_fingerprint(&same_tenant, &cert_a)
    );
    for body in [&other_tenant, &same_tenant] {
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains(&device_b), "{detail}");
        assert!(!detail.contains(&first_a.id), "{detail}");
    }
}

#[tokio::test]
async fn malformed_hellos_end_no_session() {
    let server = Server::start().await;
    let mut sessions = Vec::new();
    for index in 0..3 {
        let device = server
            .create_device(&format!("dtls-survivor-{index}"))
            .await;
        let identity = format!("dtls-survivor-{index}");
        set_psk(&server, &device, &identity).await;
        let stream = connect(psk_client(&identity, KEY_HEX), server.coaps_addr)
            .await
            .expect("PSK handshake");
        sessions.push(stream);
    }

    // A ClientHello whose handshake header is cut short, from an address
    // without a session: OpenSSL rejects it in the stateless listen step.
    let malformed = [22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0];
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    for round in 0..10u16 {
        for _ in 0..3 {
            attacker.send_to(&malformed, server.coaps_addr).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut next = Vec::new();
        for stream in sessions {
            let payload = format!(r#"{{"round": {round}}}"#);
            let (stream, code, body) =
                request(stream, post("/telemetry", payload.as_bytes(), round + 1)).await;
            assert_eq!(code, "2.04", "round {round}: {body}");
            next.push(stream);
        }
        sessions = next;
    }
    let closed = metric(&server, "ferrite_coap_dtls_sessions_closed_total").await;
    assert_eq!(closed, 0.0, "sessions closed during the flood");
}
