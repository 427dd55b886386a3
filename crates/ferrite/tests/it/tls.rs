//! HTTPS and MQTT over TLS: the server certificate from `ferrite certs`,
//! client certificates of devices, refused handshakes, timeouts and the
//! plain listeners turned off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::support::{BINARY, Server, free_port};

/// Runs `ferrite certs ARGS` and returns its standard output.
fn certs(args: &[&str]) -> String {
    let output = Command::new(BINARY)
        .arg("certs")
        .args(args)
        .output()
        .expect("run ferrite certs");
    assert!(
        output.status.success(),
        "ferrite certs {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// A certificate directory made by `ferrite certs init`.
struct Certs {
    _temp: tempfile::TempDir,
    dir: PathBuf,
}

impl Certs {
    fn new() -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("certs");
        certs(&["init", "--dir", dir.to_str().unwrap(), "--days", "30"]);
        Self { _temp: temp, dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// Issues a device certificate with subject CN `common_name`; returns
    /// the certificate and key paths.
    fn device(&self, common_name: &str) -> (PathBuf, PathBuf) {
        certs(&[
            "device",
            common_name,
            "--dir",
            self.dir.to_str().unwrap(),
            "--days",
            "30",
        ]);
        (
            self.dir.join(format!("device-{common_name}.pem")),
            self.dir.join(format!("device-{common_name}-key.pem")),
        )
    }
}

/// Returns the environment that turns TLS on with the certificates of
/// `certs`.
fn tls_env(certs: &Certs, https: SocketAddr, mqtts: SocketAddr) -> Vec<(String, String)> {
    vec![
        ("FERRITE_TLS_CERT_FILE".into(), certs.path("server.pem")),
        ("FERRITE_TLS_KEY_FILE".into(), certs.path("server-key.pem")),
        ("FERRITE_TLS_CLIENT_CA_FILE".into(), certs.path("ca.pem")),
        ("FERRITE_TLS_HTTPS_LISTEN".into(), https.to_string()),
        ("FERRITE_TLS_MQTTS_LISTEN".into(), mqtts.to_string()),
        ("FERRITE_TLS_RELOAD_INTERVAL".into(), "200ms".into()),
        ("FERRITE_TLS_HANDSHAKE_TIMEOUT".into(), "1s".into()),
        ("FERRITE_HTTP_HEADER_READ_TIMEOUT".into(), "1s".into()),
        (
            "FERRITE_MQTT_CREDENTIAL_RECHECK_INTERVAL".into(),
            "300ms".into(),
        ),
    ]
}

struct TlsServer {
    server: Server,
    certs: Certs,
    https: SocketAddr,
    mqtts: SocketAddr,
}

async fn start_tls_server() -> TlsServer {
    start_tls_server_with(&[]).await
}

/// Starts a TLS server with `overrides` after the environment of
/// [`tls_env`], so they replace its values.
async fn start_tls_server_with(overrides: &[(&str, &str)]) -> TlsServer {
    let certs = Certs::new();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mqtts: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut env = tls_env(&certs, https, mqtts);
    env.extend(
        overrides
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string())),
    );
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start_with_env(&env).await;
    TlsServer {
        server,
        certs,
        https,
        mqtts,
    }
}

fn read_certificates(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("certificate file")
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

/// Builds a TLS client that trusts the CA of `ca_file`, with an optional
/// client certificate and key.
fn connector(ca_file: &Path, client: Option<(&Path, &Path)>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(ca_file) {
        roots.add(certificate).expect("CA certificate");
    }
    // Deprecated in rustls 0.23.48 for lacking post-quantum key exchange,
    // but the ring provider is the one the server uses.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                read_certificates(cert),
                PrivateKeyDer::from_pem_file(key).expect("client key"),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

async fn tls_connect(
    addr: SocketAddr,
    connector: &TlsConnector,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Encodes an MQTT 3.1.1 CONNECT with clean session, keep alive 60 s and an
/// optional user name.
fn connect_packet(client_id: &str, username: Option<&str>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if username.is_some() { 0x82 } else { 0x02 });
    body.extend_from_slice(&[0, 60]);
    for text in std::iter::once(client_id).chain(username) {
        body.extend_from_slice(&(text.len() as u16).to_be_bytes());
        body.extend_from_slice(text.as_bytes());
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Encodes a QoS 1 PUBLISH with packet id 1.
fn publish_packet(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&[0, 1]);
    body.extend_from_slice(payload);
    let mut packet = vec![0x32, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Reads exactly `count` bytes within 5 s.
async fn read_exact<S: AsyncReadExt + Unpin>(stream: &mut S, count: usize) -> Vec<u8> {
    let mut buffer = vec![0; count];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buffer))
        .await
        .expect("reply within 5 s")
        .expect("reply bytes");
    buffer
}

/// Sends CONNECT and returns the CONNACK return code.
async fn mqtt_connect<S>(stream: &mut S, client_id: &str, username: Option<&str>) -> u8
where
    S: AsyncReadExt + AsyncWriteExt + Unpin,
{
    stream
        .write_all(&connect_packet(client_id, username))
        .await
        .expect("send CONNECT");
    let connack = read_exact(stream, 4).await;
    assert_eq!(connack[0], 0x20, "expected CONNACK, got {connack:?}");
    connack[3]
}

/// Returns whether the peer closes the connection within `within`.
async fn closed_within<S: AsyncReadExt + Unpin>(stream: &mut S, within: Duration) -> bool {
    let mut buffer = [0u8; 64];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

fn https_client(ca_file: &Path) -> reqwest::Client {
    let ca = std::fs::read(ca_file).expect("CA file");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA PEM"))
        .build()
        .expect("HTTPS client")
}

#[tokio::test]
async fn https_serves_api_with_hsts() {
    let tls = start_tls_server().await;
    let client = https_client(&tls.certs.dir.join("ca.pem"));

    let response = client
        .get(format!("https://localhost:{}/healthz", tls.https.port()))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(response.status(), 200);
    let hsts = response
        .headers()
        .get("strict-transport-security")
        .expect("HSTS header over HTTPS");
    assert_eq!(hsts, "max-age=31536000");

    let plain = reqwest::get(format!("{}/healthz", tls.server.http_url))
        .await
        .expect("HTTP request");
    assert_eq!(plain.status(), 200);
    assert!(
        plain.headers().get("strict-transport-security").is_none(),
        "no HSTS header over plain HTTP"
    );
}

#[tokio::test]
async fn client_certificate_authenticates_device() {
    let tls = start_tls_server().await;
    let device = tls.server.create_device("tls-sensor").await;
    let (cert, key) = tls.certs.device(&device.id);
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));

    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    // No user name: the certificate is the credential.
    assert_eq!(mqtt_connect(&mut stream, "tls-sensor", None).await, 0);
    stream
        .write_all(&publish_packet(
            "v1/devices/me/telemetry",
            br#"{"temperature": 21.5}"#,
        ))
        .await
        .unwrap();
    assert_eq!(read_exact(&mut stream, 4).await, [0x40, 2, 0, 1], "PUBACK");

    let stored = crate::support::wait_until(
        || async {
            let latest = tls.server.latest(&device.id).await;
            latest.to_string().contains("21.5")
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(stored, "telemetry of the certificate's device is stored");
}

#[tokio::test]
async fn token_still_works_without_certificate() {
    let tls = start_tls_server().await;
    let device = tls.server.create_device("token-over-tls").await;
    let connector = connector(&tls.certs.dir.join("ca.pem"), None);
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(
        mqtt_connect(&mut stream, "token-over-tls", Some(&device.token)).await,
        0
    );

    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(
        mqtt_connect(&mut stream, "no-credentials", None).await,
        0x04,
        "no certificate and no user name: bad user name or password"
    );
}

#[tokio::test]
async fn unknown_ca_is_refused_at_handshake() {
    let tls = start_tls_server().await;
    let device = tls.server.create_device("stranger").await;
    let other = Certs::new();
    let (cert, key) = other.device(&device.id);
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));

    // In TLS 1.3 the client sees the server's alert at its first read.
    let refused = match tls_connect(tls.mqtts, &connector).await {
        Err(_) => true,
        Ok(mut stream) => {
            let _ = stream.write_all(&connect_packet("stranger", None)).await;
            let mut buffer = [0u8; 4];
            !matches!(
                tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await,
                Ok(Ok(4))
            )
        }
    };
    assert!(refused, "a certificate of an unknown CA gets no CONNACK");

    let response = reqwest::get(format!("{}/healthz", tls.server.http_url))
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the server stays healthy");
}

/// The environment of a server whose periodic credential re-check is too
/// slow to matter within a test, so that only revocation events end
/// sessions.
const SLOW_RECHECK: [(&str, &str); 1] = [("FERRITE_MQTT_CREDENTIAL_RECHECK_INTERVAL", "300s")];

#[tokio::test]
async fn device_ca_creates_device_and_delete_ends_session() {
    let tls = start_tls_server_with(&SLOW_RECHECK).await;
    // A second CA, registered by the tenant through the API.
    let tenant_ca = Certs::new();
    let ca_pem = std::fs::read_to_string(tenant_ca.dir.join("ca.pem")).unwrap();
    let client = reqwest::Client::new();
    let token = tls.server.admin_token().await;
    let response = client
        .post(format!("{}/api/v1/device-cas", tls.server.http_url))
        .bearer_auth(&token)
        .json(&json!({"pem": ca_pem, "auto_create_devices": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let registered: Value = response.json().await.unwrap();
    let fingerprint = registered["fingerprint"].as_str().unwrap().to_owned();
    assert_eq!(fingerprint.len(), 64);

    let again = client
        .post(format!("{}/api/v1/device-cas", tls.server.http_url))
        .bearer_auth(&token)
        .json(&json!({"pem": ca_pem}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409, "a CA is registered once");

    let (cert, key) = tenant_ca.device("truck-7");
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(mqtt_connect(&mut stream, "truck-7", None).await, 0);

    let (status, devices) = tls.server.get_json("/api/v1/devices").await;
    assert_eq!(status, 200);
    assert!(
        devices.to_string().contains("\"truck-7\""),
        "the device was created with the CN as name: {devices}"
    );

    let deleted = client
        .delete(format!(
            "{}/api/v1/device-cas/{fingerprint}",
            tls.server.http_url
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(
        closed_within(&mut stream, Duration::from_secs(1)).await,
        "deleting the CA ends the open session within a second"
    );
    let reconnect = match tls_connect(tls.mqtts, &connector).await {
        Err(_) => true,
        Ok(mut stream) => {
            let _ = stream.write_all(&connect_packet("truck-7", None)).await;
            closed_within(&mut stream, Duration::from_secs(5)).await
        }
    };
    assert!(reconnect, "certificates of a deleted CA are refused");
}

#[tokio::test]
async fn silent_clients_are_closed_before_handshake_ends() {
    let tls = start_tls_server().await;
    for addr in [tls.mqtts, tls.https] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut stream, Duration::from_secs(4)).await,
            "a client that sends nothing to {addr} is closed"
        );
    }
    // A client that stops after a partial ClientHello.
    let mut stream = TcpStream::connect(tls.mqtts).await.unwrap();
    stream
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(4)).await,
        "a stalled handshake is closed"
    );
}

#[tokio::test]
async fn certificate_reload_needs_no_restart() {
    let tls = start_tls_server().await;
    let connector = connector(&tls.certs.dir.join("ca.pem"), None);
    let first = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    let first_leaf = first.get_ref().1.peer_certificates().unwrap()[0].clone();

    // A bad file keeps the old certificate.
    let key_path = tls.certs.dir.join("server-key.pem");
    let good_key = std::fs::read(&key_path).unwrap();
    std::fs::write(&key_path, b"not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let during = tls_connect(tls.mqtts, &connector)
        .await
        .expect("handshake with the previous certificate");
    assert_eq!(
        during.get_ref().1.peer_certificates().unwrap()[0],
        first_leaf
    );
    std::fs::write(&key_path, good_key).unwrap();

    // `certs init` again reuses the CA and writes a new server certificate.
    certs(&[
        "init",
        "--dir",
        tls.certs.dir.to_str().unwrap(),
        "--days",
        "31",
    ]);
    let renewed = crate::support::wait_until(
        || async {
            let stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
            stream.get_ref().1.peer_certificates().unwrap()[0] != first_leaf
        },
        Duration::from_secs(5),
    )
    .await;
    assert!(renewed, "new clients see the renewed certificate");
}

#[tokio::test]
async fn plain_listeners_can_be_turned_off() {
    let certs = Certs::new();
    let temp = tempfile::tempdir().unwrap();
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mqtts: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http_port = free_port();
    let mqtt_port = free_port();
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--data-dir"])
        .arg(temp.path())
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .args(["--mqtt-listen", &format!("127.0.0.1:{mqtt_port}")])
        .args([
            "--coap-listen",
            "127.0.0.1:0",
            "--lorawan-listen",
            "127.0.0.1:0",
        ])
        .args(["--coaps-listen", "127.0.0.1:0"])
        .env("FERRITE_TLS_PLAIN_LISTENERS", "false")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in tls_env(&certs, https, mqtts) {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start ferrite serve");

    let client = https_client(&certs.dir.join("ca.pem"));
    let healthy = crate::support::wait_until(
        || async {
            client
                .get(format!("https://localhost:{}/healthz", https.port()))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        },
        Duration::from_secs(20),
    )
    .await;
    let http = TcpStream::connect(("127.0.0.1", http_port)).await;
    let mqtt = TcpStream::connect(("127.0.0.1", mqtt_port)).await;
    let _ = child.kill();
    let _ = child.wait();

    assert!(healthy, "HTTPS serves with the plain listeners off");
    assert!(http.is_err(), "plain HTTP refuses connections");
    assert!(mqtt.is_err(), "plain MQTT refuses connections");
}

/// Sends `POST path` with a JSON body as the admin; returns the status and
/// the JSON response.
async fn post_json(tls: &TlsServer, path: &str, body: &Value) -> (u16, Value) {
    let token = tls.server.admin_token().await;
    let response = reqwest::Client::new()
        .post(format!("{}{path}", tls.server.http_url))
        .bearer_auth(&token)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Sends `DELETE path` as the admin; returns the status.
async fn delete(tls: &TlsServer, path: &str) -> u16 {
    let token = tls.server.admin_token().await;
    reqwest::Client::new()
        .delete(format!("{}{path}", tls.server.http_url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Registers the certificate at `cert` on the device; returns its
/// fingerprint.
async fn register_certificate(tls: &TlsServer, device_id: &str, cert: &Path) -> String {
    let pem = std::fs::read_to_string(cert).unwrap();
    let (status, body) = post_json(
        tls,
        &format!("/api/v1/devices/{device_id}/credentials/certificates"),
        &json!({ "pem": pem }),
    )
    .await;
    assert_eq!(status, 201, "register the certificate: {body}");
    body["fingerprint"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn certificate_revocation_ends_session_at_once() {
    let tls = start_tls_server_with(&SLOW_RECHECK).await;
    let device = tls.server.create_device("registered-cert").await;
    // A CA the server does not trust, so the registration is the only path.
    let issuer = Certs::new();
    let (cert, key) = issuer.device("registered-cert");
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));

    let fingerprint = register_certificate(&tls, &device.id, &cert).await;
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(mqtt_connect(&mut stream, "registered-cert", None).await, 0);
    let path = format!(
        "/api/v1/devices/{}/credentials/certificates/{fingerprint}",
        device.id
    );
    assert_eq!(delete(&tls, &path).await, 204);
    assert!(
        closed_within(&mut stream, Duration::from_secs(1)).await,
        "deleting the registered certificate ends the session within a second"
    );

    register_certificate(&tls, &device.id, &cert).await;
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(mqtt_connect(&mut stream, "registered-cert", None).await, 0);
    assert_eq!(
        delete(&tls, &format!("/api/v1/devices/{}", device.id)).await,
        204
    );
    assert!(
        closed_within(&mut stream, Duration::from_secs(1)).await,
        "deleting the device ends the session within a second"
    );
}

#[tokio::test]
async fn client_ca_file_anchor_is_not_registrable() {
    let tls = start_tls_server().await;
    let ca_pem = std::fs::read_to_string(tls.certs.dir.join("ca.pem")).unwrap();
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": ca_pem })).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.to_string().contains("tls.client_ca_file"),
        "the message names the setting: {body}"
    );

    // A new certificate with the same subject and key is the same CA.
    let copy = resign(&tls.certs.dir, &tls.certs.dir.join("copy-of-ca.pem"));
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": copy })).await;
    assert_eq!(status, 409, "a re-signed copy of the anchor: {body}");
}

/// Self-signs the CA of `dir` again with its own key, which gives a new
/// certificate with the same subject, key and extensions; returns its PEM.
fn resign(dir: &Path, out: &Path) -> String {
    let status = Command::new("openssl")
        .args(["x509", "-in"])
        .arg(dir.join("ca.pem"))
        .arg("-signkey")
        .arg(dir.join("ca-key.pem"))
        .args(["-days", "20", "-out"])
        .arg(out)
        .stderr(Stdio::null())
        .status()
        .expect("run openssl x509");
    assert!(status.success(), "openssl x509 -signkey failed");
    std::fs::read_to_string(out).unwrap()
}

#[tokio::test]
async fn device_ca_identity_is_subject_and_key() {
    let tls = start_tls_server().await;
    let tenant_ca = Certs::new();
    let ca_pem = std::fs::read_to_string(tenant_ca.dir.join("ca.pem")).unwrap();
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": ca_pem })).await;
    assert_eq!(status, 201, "{body}");

    let copy = resign(&tenant_ca.dir, &tenant_ca.dir.join("copy-of-ca.pem"));
    assert_ne!(copy, ca_pem, "the copy is a different certificate");
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": copy })).await;
    assert_eq!(status, 409, "same subject and key: {body}");
    assert!(
        body.to_string().contains("same subject and public key"),
        "{body}"
    );
}

#[tokio::test]
async fn device_ca_needs_ca_extensions() {
    let tls = start_tls_server().await;
    let (leaf, _) = tls.certs.device("not-a-ca");
    let leaf_pem = std::fs::read_to_string(leaf).unwrap();
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": leaf_pem })).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("CA:TRUE"), "{body}");
}

#[tokio::test]
async fn paths_to_two_devices_are_rejected() {
    let tls = start_tls_server().await;
    let tenant_ca = Certs::new();
    let ca_pem = std::fs::read_to_string(tenant_ca.dir.join("ca.pem")).unwrap();
    let (status, body) = post_json(&tls, "/api/v1/device-cas", &json!({ "pem": ca_pem })).await;
    assert_eq!(status, 201, "{body}");
    tls.server.create_device("truck-9").await;
    let decoy = tls.server.create_device("decoy").await;
    let (cert, key) = tenant_ca.device("truck-9");
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));

    // The CA leads to truck-9 by its CN, the registration to the decoy.
    let fingerprint = register_certificate(&tls, &decoy.id, &cert).await;
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(
        mqtt_connect(&mut stream, "truck-9", None).await,
        0x05,
        "two devices: not authorized"
    );

    let path = format!(
        "/api/v1/devices/{}/credentials/certificates/{fingerprint}",
        decoy.id
    );
    assert_eq!(delete(&tls, &path).await, 204);
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(
        mqtt_connect(&mut stream, "truck-9", None).await,
        0,
        "with one path left the device connects"
    );
}

/// Builds a TLS client without a client certificate that offers `alpn`.
fn connector_with_alpn(ca_file: &Path, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_certificates(ca_file) {
        roots.add(certificate).expect("CA certificate");
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn idle_https_connections_are_closed() {
    // http.header_read_timeout is 1 s in `tls_env`.
    let tls = start_tls_server().await;
    let ca = tls.certs.dir.join("ca.pem");
    for alpn in [&[][..], &[&b"http/1.1"[..]][..], &[&b"h2"[..]][..]] {
        let connector = connector_with_alpn(&ca, alpn);
        let mut stream = tls_connect(tls.https, &connector).await.expect("handshake");
        let negotiated = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            negotiated.as_deref(),
            alpn.first().copied(),
            "the server selects the offered protocol"
        );
        let started = Instant::now();
        assert!(
            closed_within(&mut stream, Duration::from_secs(3)).await,
            "a connection with ALPN {alpn:?} that sends nothing after the handshake is closed"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed by the timeout, not at once: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn partial_plain_http_request_is_closed() {
    let tls = start_tls_server().await;
    let address = tls.server.http_url.trim_start_matches("http://").to_owned();
    // "P" starts both "POST" and the HTTP/2 connection preface "PRI".
    let mut stream = TcpStream::connect(&address).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    assert!(
        closed_within(&mut stream, Duration::from_secs(3)).await,
        "a connection that sent one byte is closed after http.header_read_timeout"
    );
}

#[tokio::test]
async fn https_negotiates_http2_with_curl() {
    let tls = start_tls_server().await;
    let ca = tls.certs.path("ca.pem");
    let url = format!("https://{}/healthz", tls.https);
    for (flag, expected) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let output = Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert", &ca, flag])
            .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
            .arg(&url)
            .output()
            .expect("run curl");
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            text,
            format!("{expected} 200"),
            "curl {flag}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Writes a self-signed P-256 certificate for `common_name` that expires
/// `valid_for` from now, and its key; returns both paths.
fn short_lived_certificate(
    dir: &Path,
    common_name: &str,
    valid_for: Duration,
) -> (PathBuf, PathBuf) {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::nid::Nid;
    use openssl::pkey::PKey;

    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .unwrap();
    let name = name.build();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut builder = openssl::x509::X509::builder().unwrap();
    builder.set_version(2).unwrap();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(&name).unwrap();
    builder.set_pubkey(&key).unwrap();
    let not_before = openssl::asn1::Asn1Time::from_unix(now - 60).unwrap();
    let not_after = openssl::asn1::Asn1Time::from_unix(now + valid_for.as_secs() as i64).unwrap();
    builder.set_not_before(&not_before).unwrap();
    builder.set_not_after(&not_after).unwrap();
    builder
        .sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    let cert = dir.join(format!("{common_name}.pem"));
    let key_path = dir.join(format!("{common_name}-key.pem"));
    std::fs::write(&cert, builder.build().to_pem().unwrap()).unwrap();
    std::fs::write(&key_path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (cert, key_path)
}

#[tokio::test]
async fn session_ends_when_certificate_expires() {
    // The credential re-check runs every 300 ms in `tls_env`.
    let tls = start_tls_server().await;
    let device = tls.server.create_device("short-lived").await;
    let (cert, key) =
        short_lived_certificate(&tls.certs.dir, "short-lived", Duration::from_secs(4));
    register_certificate(&tls, &device.id, &cert).await;
    let connector = connector(&tls.certs.dir.join("ca.pem"), Some((&cert, &key)));
    let mut stream = tls_connect(tls.mqtts, &connector).await.expect("handshake");
    assert_eq!(mqtt_connect(&mut stream, "short-lived", None).await, 0);

    assert!(
        !closed_within(&mut stream, Duration::from_secs(1)).await,
        "the session stays open while the certificate is valid"
    );
    assert!(
        closed_within(&mut stream, Duration::from_secs(6)).await,
        "the session ends at the first re-check after the certificate expires"
    );
}
