//! Tests of the DTLS listener with an echo handler and OpenSSL clients on
//! loopback UDP sockets.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    HandshakeError, MidHandshakeSslStream, Ssl, SslContext, SslContextBuilder, SslMethod,
    SslStream, SslVerifyMode,
};
use openssl::x509::{X509, X509NameBuilder};
use tokio_util::sync::CancellationToken;

use super::context::DatagramPipe;
use super::*;
use crate::config::CoapDtlsConfig;
use crate::encryption::MasterKeySource;
use crate::ids::DeviceId;
use crate::metadata::credentials::{NewCertificate, psk_seal_context};
use crate::metadata::{MetadataStore, SqliteMetadata};

/// Replies to each message with `{device name}:{message}`.
#[derive(Default)]
struct EchoHandler {
    sink: OnceLock<Arc<DtlsSink>>,
}

impl DatagramHandler for EchoHandler {
    async fn handle(self: Arc<Self>, peer: SocketAddr, datagram: Bytes, auth: PeerAuth) {
        let PeerAuth::Device(device) = auth else {
            panic!("a DTLS message without a device");
        };
        let mut reply = format!("{}:", device.name).into_bytes();
        reply.extend_from_slice(&datagram);
        self.sink.get().expect("sink set").send(peer, reply.into());
    }
}

struct Harness {
    addr: SocketAddr,
    sessions: Arc<Sessions>,
    metadata: Arc<SqliteMetadata>,
    credentials: Arc<DtlsCredentials>,
    keyring: Arc<Keyring>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Pki {
    ca_cert: X509,
    ca_key: PKey<Private>,
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

/// Creates a certificate for `common_name`, signed by `issuer` or by
/// itself.
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
        builder
            .append_extension(
                openssl::x509::extension::BasicConstraints::new()
                    .critical()
                    .ca()
                    .build()
                    .unwrap(),
            )
            .unwrap();
    }
    let signer = issuer.map_or(key, |(_, key)| key);
    builder.sign(signer, MessageDigest::sha256()).unwrap();
    builder.build()
}

impl Pki {
    fn new() -> Self {
        let ca_key = ec_key();
        let ca_cert = certificate("Ferrite test CA", &ca_key, None, true);
        Self { ca_cert, ca_key }
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

    /// Writes the server certificate, its key and the CA to `dir`.
    fn write_server_files(&self, dir: &Path, config: &mut CoapDtlsConfig) {
        let (cert, key) = self.issue("localhost");
        std::fs::write(dir.join("server.pem"), cert.to_pem().unwrap()).unwrap();
        std::fs::write(
            dir.join("server.key"),
            key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        std::fs::write(dir.join("ca.pem"), self.ca_cert.to_pem().unwrap()).unwrap();
        config.cert_file = Some(dir.join("server.pem"));
        config.key_file = Some(dir.join("server.key"));
        config.ca_file = Some(dir.join("ca.pem"));
    }
}

fn test_config() -> CoapDtlsConfig {
    CoapDtlsConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        handshake_timeout: Duration::from_secs(2),
        ..CoapDtlsConfig::default()
    }
}

async fn start(config: CoapDtlsConfig, pki: Option<&Pki>) -> Harness {
    start_with_limits(config, pki, None).await
}

async fn start_with_limits(
    config: CoapDtlsConfig,
    pki: Option<&Pki>,
    limits: Option<crate::limits::Limits>,
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config;
    if let Some(pki) = pki {
        pki.write_server_files(dir.path(), &mut config);
    }
    let metadata = Arc::new(SqliteMetadata::open(dir.path()).await.unwrap());
    let credentials = Arc::new(DtlsCredentials::default());
    let source = MasterKeySource::Files {
        data_dir: dir.path().to_owned(),
    };
    let keyring = Arc::new(Keyring::load(source, metadata.clone(), true).await.unwrap());
    let mut listener = DtlsListener::bind(&config, credentials.clone(), keyring.clone())
        .await
        .unwrap();
    // Every session checks its credential again at nearly every message.
    listener.recheck_interval = Duration::from_millis(100);
    if let Some(limits) = limits {
        listener = listener.with_limits(limits);
    }
    let addr = listener.local_addr().unwrap();
    let sessions = listener.sessions.clone();
    let handler = Arc::new(EchoHandler::default());
    let _ = handler.sink.set(listener.sink());
    let shutdown = CancellationToken::new();
    tokio::spawn(listener.serve(handler, metadata.clone(), shutdown.clone()));
    Harness {
        addr,
        sessions,
        metadata,
        credentials,
        keyring,
        shutdown,
        _dir: dir,
    }
}

impl Harness {
    async fn device(&self, name: &str) -> DeviceId {
        let tenant = self.metadata.default_tenant().await.unwrap();
        let device = self
            .metadata
            .create_device(tenant.id, name, name.as_bytes())
            .await
            .unwrap();
        device.id
    }

    async fn set_psk(&self, device: DeviceId, identity: &str, key: &[u8]) {
        let tenant = self.metadata.default_tenant().await.unwrap();
        let sealed = self
            .keyring
            .seal(tenant.id, &psk_seal_context(device), key)
            .await
            .unwrap();
        let stored = self
            .metadata
            .set_device_psk(tenant.id, device, identity.as_bytes(), &sealed)
            .await
            .unwrap();
        self.credentials.set_psk(&stored);
    }

    async fn register(&self, device: DeviceId, cert: &X509) {
        let tenant = self.metadata.default_tenant().await.unwrap();
        let new = NewCertificate {
            fingerprint: context::fingerprint(cert).unwrap(),
            subject: "CN=test".to_owned(),
            not_after: 0,
            pem: String::from_utf8(cert.to_pem().unwrap()).unwrap(),
        };
        let stored = self
            .metadata
            .add_device_certificate(tenant.id, device, &new)
            .await
            .unwrap();
        self.credentials.add_certificate(&stored);
    }

    async fn wait_for_sessions(&self, expected: usize) {
        for _ in 0..100 {
            if self.sessions.len() == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.sessions.len(), expected, "sessions");
    }
}

/// A connected UDP socket as the blocking stream of an OpenSSL client.
#[derive(Debug)]
struct UdpStream(StdUdpSocket);

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

fn udp_stream(server: SocketAddr) -> UdpStream {
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    UdpStream(socket)
}

fn client_context(setup: impl FnOnce(&mut SslContextBuilder)) -> SslContext {
    let mut builder = SslContextBuilder::new(SslMethod::dtls()).unwrap();
    builder.set_verify(SslVerifyMode::NONE);
    setup(&mut builder);
    builder.build()
}

fn psk_context(identity: &str, key: &[u8]) -> SslContext {
    let identity = identity.to_owned();
    let key = key.to_vec();
    client_context(move |builder| {
        builder
            .set_cipher_list("PSK-AES128-CCM8:PSK-AES128-GCM-SHA256")
            .unwrap();
        builder.set_psk_client_callback(move |_, _, identity_out, key_out| {
            identity_out[..identity.len()].copy_from_slice(identity.as_bytes());
            identity_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
    })
}

fn certificate_context(cert: &X509, key: &PKey<Private>) -> SslContext {
    client_context(|builder| {
        builder
            .set_cipher_list("ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256")
            .unwrap();
        builder.set_certificate(cert).unwrap();
        builder.set_private_key(key).unwrap();
    })
}

/// Starts a handshake that responds to the HelloVerifyRequest and then stops,
/// which leaves a half-open session on the server.
fn half_open_handshake(
    context: &SslContext,
    server: SocketAddr,
) -> (StdUdpSocket, MidHandshakeSslStream<DatagramPipe>) {
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(server).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let Err(HandshakeError::WouldBlock(mut mid)) =
        Ssl::new(context).unwrap().connect(DatagramPipe::default())
    else {
        panic!("expected the handshake to wait for the server");
    };
    for datagram in mid.get_mut().take_outbound() {
        socket.send(&datagram).unwrap();
    }
    let mut buffer = [0u8; 2048];
    let length = socket.recv(&mut buffer).expect("HelloVerifyRequest");
    mid.get_mut()
        .push(Bytes::copy_from_slice(&buffer[..length]));
    let Err(HandshakeError::WouldBlock(mut mid)) = mid.handshake() else {
        panic!("expected the handshake to wait for the ServerHello");
    };
    for datagram in mid.get_mut().take_outbound() {
        socket.send(&datagram).unwrap();
    }
    (socket, mid)
}

/// Runs a blocking client handshake on a thread.
async fn connect(context: SslContext, server: SocketAddr) -> Result<SslStream<UdpStream>, String> {
    tokio::task::spawn_blocking(move || {
        let mut ssl = Ssl::new(&context).unwrap();
        ssl.set_mtu(1200).unwrap();
        ssl.connect(udp_stream(server))
            .map_err(|error| match error {
                HandshakeError::Failure(mid) => format!("failure: {}", mid.error()),
                HandshakeError::WouldBlock(mid) => format!("timed out: {}", mid.error()),
                HandshakeError::SetupFailure(error) => format!("setup: {error}"),
            })
    })
    .await
    .unwrap()
}

/// Sends one message and returns the reply.
async fn exchange(
    mut stream: SslStream<UdpStream>,
    message: &[u8],
) -> (SslStream<UdpStream>, Vec<u8>) {
    let message = message.to_vec();
    tokio::task::spawn_blocking(move || {
        stream.ssl_write(&message).unwrap();
        let mut reply = vec![0u8; 2048];
        let length = stream.ssl_read(&mut reply).unwrap();
        reply.truncate(length);
        (stream, reply)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_session_echoes_with_device_identity() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;

    let stream = connect(
        psk_context("sensor-1-id", b"0123456789abcdef"),
        harness.addr,
    )
    .await
    .expect("handshake");
    let (stream, reply) = exchange(stream, b"hello").await;
    assert_eq!(reply, b"sensor-1:hello");
    let (_stream, reply) = exchange(stream, b"again").await;
    assert_eq!(reply, b"sensor-1:again");
    assert_eq!(harness.sessions.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_psk_ends_open_session() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let stream = connect(
        psk_context("sensor-1-id", b"0123456789abcdef"),
        harness.addr,
    )
    .await
    .expect("handshake");
    let (mut stream, reply) = exchange(stream, b"before").await;
    assert_eq!(reply, b"sensor-1:before");

    let tenant = harness.metadata.default_tenant().await.unwrap();
    harness
        .metadata
        .delete_device_psk(tenant.id, device)
        .await
        .unwrap();
    harness.credentials.remove_psk(device);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let read = tokio::task::spawn_blocking(move || {
        stream.ssl_write(b"after").unwrap();
        let mut reply = vec![0u8; 2048];
        stream
            .ssl_read(&mut reply)
            .map(|length| reply[..length].to_vec())
    })
    .await
    .unwrap();
    let error = read.expect_err("a reply after the PSK was removed");
    assert_eq!(
        error.code(),
        openssl::ssl::ErrorCode::ZERO_RETURN,
        "{error}"
    );
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_unknown_identity_fails_handshake() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;

    let error = connect(psk_context("nobody", b"0123456789abcdef"), harness.addr)
        .await
        .expect_err("unknown identity");
    assert!(error.starts_with("failure"), "{error}");
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psk_wrong_key_fails_handshake() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;

    connect(
        psk_context("sensor-1-id", b"fedcba9876543210"),
        harness.addr,
    )
    .await
    .expect_err("wrong key");
    // The server drops the client's Finished, which it cannot decrypt, and
    // gives up after handshake_timeout.
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_records_get_no_reply() {
    let harness = start(test_config(), None).await;
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let application_data = [23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 3, 1, 2, 3];
    for datagram in [&application_data[..], b"\x40\x01\x00\x01", b""] {
        socket.send_to(datagram, harness.addr).unwrap();
    }
    let mut buffer = [0u8; 64];
    assert!(
        socket.recv_from(&mut buffer).is_err(),
        "a reply to a stray record"
    );
    assert_eq!(harness.sessions.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_without_cookie_keeps_no_state() {
    let harness = start(test_config(), None).await;
    let socket = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(harness.addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let context = psk_context("x", b"0123456789abcdef");
    let Err(HandshakeError::WouldBlock(mut mid)) =
        Ssl::new(&context).unwrap().connect(DatagramPipe::default())
    else {
        panic!("expected the handshake to wait for the server");
    };
    let hello = mid.get_mut().take_outbound().remove(0);
    socket.send(&hello).unwrap();

    let mut buffer = [0u8; 2048];
    let length = socket.recv(&mut buffer).expect("HelloVerifyRequest");
    let reply = &buffer[..length];
    assert_eq!(reply[0], 22, "handshake record");
    assert_eq!(reply[13], 3, "HelloVerifyRequest message type");
    assert!(
        length <= hello.len(),
        "the reply is larger than the ClientHello"
    );
    assert_eq!(harness.sessions.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_handshake_does_not_block_others() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;

    let context = psk_context("sensor-1-id", b"0123456789abcdef");
    let _silent = half_open_handshake(&context, harness.addr);
    harness.wait_for_sessions(1).await;

    let stream = connect(context.clone(), harness.addr)
        .await
        .expect("handshake next to a half-open one");
    let (_stream, reply) = exchange(stream, b"ping").await;
    assert_eq!(reply, b"sensor-1:ping");
    assert_eq!(harness.sessions.len(), 2);

    // The silent handshake ends after handshake_timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.wait_for_sessions(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_notify_ends_session() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let stream = connect(
        psk_context("sensor-1-id", b"0123456789abcdef"),
        harness.addr,
    )
    .await
    .unwrap();
    let (mut stream, _) = exchange(stream, b"hello").await;
    harness.wait_for_sessions(1).await;
    let _ = stream.shutdown();
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_expires() {
    let config = CoapDtlsConfig {
        idle_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let harness = start(config, None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let stream = connect(
        psk_context("sensor-1-id", b"0123456789abcdef"),
        harness.addr,
    )
    .await
    .unwrap();
    let (_stream, _) = exchange(stream, b"hello").await;
    harness.wait_for_sessions(1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_handshakes_drops_new_peers() {
    // Longer than the second client's 3 s read timeout.
    let config = CoapDtlsConfig {
        max_handshakes: 1,
        handshake_timeout: Duration::from_secs(10),
        ..test_config()
    };
    let harness = start(config, None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let context = psk_context("sensor-1-id", b"0123456789abcdef");

    let _silent = half_open_handshake(&context, harness.addr);
    harness.wait_for_sessions(1).await;

    connect(context.clone(), harness.addr)
        .await
        .expect_err("a second handshake beyond max_handshakes");
    assert_eq!(harness.sessions.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_per_address_are_bounded() {
    // Longer than the second client's 3 s read timeout.
    let config = CoapDtlsConfig {
        handshake_timeout: Duration::from_secs(10),
        ..test_config()
    };
    let limits = crate::limits::Limits::new(&crate::config::LimitsConfig {
        dtls_handshakes_per_address: 1,
        ..crate::config::LimitsConfig::default()
    });
    let harness = start_with_limits(config, None, Some(limits)).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let context = psk_context("sensor-1-id", b"0123456789abcdef");

    let _silent = half_open_handshake(&context, harness.addr);
    harness.wait_for_sessions(1).await;

    connect(context.clone(), harness.addr)
        .await
        .expect_err("a second handshake from the same address");
    assert_eq!(harness.sessions.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_certificate_authenticates() {
    let pki = Pki::new();
    let harness = start(test_config(), Some(&pki)).await;
    let device = harness.device("camera-1").await;
    let key = ec_key();
    let cert = certificate("anything", &key, None, false);
    harness.register(device, &cert).await;

    let stream = connect(certificate_context(&cert, &key), harness.addr)
        .await
        .expect("handshake with a registered certificate");
    let (_stream, reply) = exchange(stream, b"hi").await;
    assert_eq!(reply, b"camera-1:hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_certificate_names_device_by_id() {
    let pki = Pki::new();
    let harness = start(test_config(), Some(&pki)).await;
    let device = harness.device("camera-2").await;
    let (cert, key) = pki.issue(&device.to_string());

    let stream = connect(certificate_context(&cert, &key), harness.addr)
        .await
        .expect("handshake with a CA-signed certificate");
    let (_stream, reply) = exchange(stream, b"hi").await;
    assert_eq!(reply, b"camera-2:hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_certificate_fails_handshake() {
    let pki = Pki::new();
    let harness = start(test_config(), Some(&pki)).await;
    harness.device("camera-3").await;
    let key = ec_key();
    let cert = certificate("camera-3", &key, None, false);

    let error = connect(certificate_context(&cert, &key), harness.addr)
        .await
        .expect_err("unregistered certificate");
    assert!(error.starts_with("failure"), "{error}");
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_certificate_for_unknown_device_is_closed() {
    let pki = Pki::new();
    let harness = start(test_config(), Some(&pki)).await;
    let (cert, key) = pki.issue(&DeviceId::new_random().to_string());

    // The handshake finishes on the client's side before the server looks
    // the device up; the session then ends without serving.
    if let Ok(stream) = connect(certificate_context(&cert, &key), harness.addr).await {
        drop(stream);
    }
    harness.wait_for_sessions(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_hellos_leave_sessions_open() {
    let harness = start(test_config(), None).await;
    let mut streams = Vec::new();
    for index in 0..3 {
        let name = format!("sensor-{index}");
        let device = harness.device(&name).await;
        harness.set_psk(device, &name, b"0123456789abcdef").await;
        let stream = connect(psk_context(&name, b"0123456789abcdef"), harness.addr)
            .await
            .expect("handshake");
        streams.push((name, stream));
    }

    // A ClientHello record whose handshake header is cut short: the
    // listener passes it to DTLSv1_listen, which rejects it and leaves
    // "length mismatch" on the thread's OpenSSL error queue.
    let malformed = [22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0];
    let attacker = StdUdpSocket::bind("127.0.0.1:0").unwrap();
    for round in 0..20 {
        for _ in 0..3 {
            attacker.send_to(&malformed, harness.addr).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        let mut next = Vec::new();
        for (name, stream) in streams {
            let message = format!("round-{round}");
            let (stream, reply) = exchange(stream, message.as_bytes()).await;
            assert_eq!(reply, format!("{name}:{message}").as_bytes());
            next.push((name, stream));
        }
        streams = next;
    }
    assert_eq!(harness.sessions.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_common_name_wins_over_registration() {
    let pki = Pki::new();
    let harness = start(test_config(), Some(&pki)).await;
    let named = harness.device("camera-named").await;
    let other = harness.device("camera-other").await;
    let (cert, key) = pki.issue(&named.to_string());
    // Registered on another device straight in the store, past the API's
    // check of the CN.
    harness.register(other, &cert).await;

    let stream = connect(certificate_context(&cert, &key), harness.addr)
        .await
        .expect("handshake with a CA-signed certificate");
    let (_stream, reply) = exchange(stream, b"hi").await;
    assert_eq!(reply, b"camera-named:hi");
}

fn test_handle(id: u64) -> (SessionHandle, mpsc::Receiver<Input>) {
    let (sender, receiver) = mpsc::channel(SESSION_QUEUE);
    let handle = SessionHandle {
        id,
        inbox: sender,
        queued_bytes: Arc::default(),
        established: Arc::default(),
    };
    (handle, receiver)
}

#[test]
fn session_queue_is_bounded_in_bytes() {
    let sessions = Sessions::default();
    let (handle, mut receiver) = test_handle(0);
    let half = Bytes::from(vec![0u8; SESSION_QUEUE_BYTES / 2]);

    for _ in 0..2 {
        sessions
            .enqueue(&handle, Input::Datagram(half.clone()))
            .expect("within the session's bytes");
    }
    let refused = sessions.enqueue(&handle, Input::Send(Bytes::from_static(b"x")));
    assert_eq!(refused.err(), Some("queue_full"));
    assert_eq!(
        sessions.queued_bytes.load(Ordering::Acquire),
        SESSION_QUEUE_BYTES
    );

    let input = receiver.try_recv().unwrap();
    sessions.release(&handle.queued_bytes, input.len());
    sessions
        .enqueue(&handle, Input::Send(Bytes::from_static(b"x")))
        .expect("room after one input left");
    assert_eq!(
        sessions.queued_bytes.load(Ordering::Acquire),
        SESSION_QUEUE_BYTES / 2 + 1
    );
}

#[test]
fn all_queues_share_a_byte_limit() {
    let sessions = Sessions::default();
    // Clones share one buffer, so the test holds one session's bytes only.
    let full = Bytes::from(vec![0u8; SESSION_QUEUE_BYTES]);
    let mut open = Vec::new();
    for id in 0..(TOTAL_QUEUE_BYTES / SESSION_QUEUE_BYTES) as u64 {
        let (handle, receiver) = test_handle(id);
        sessions
            .enqueue(&handle, Input::Datagram(full.clone()))
            .expect("within the total bytes");
        open.push((handle, receiver));
    }
    assert_eq!(
        sessions.queued_bytes.load(Ordering::Acquire),
        TOTAL_QUEUE_BYTES
    );

    let (handle, _receiver) = test_handle(u64::MAX);
    let refused = sessions.enqueue(&handle, Input::Datagram(Bytes::from_static(b"x")));
    assert_eq!(refused.err(), Some("memory_limit"));
    assert_eq!(handle.queued_bytes.load(Ordering::Acquire), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_datagram_is_dropped() {
    let harness = start(test_config(), None).await;
    let device = harness.device("sensor-1").await;
    harness
        .set_psk(device, "sensor-1-id", b"0123456789abcdef")
        .await;
    let stream = connect(
        psk_context("sensor-1-id", b"0123456789abcdef"),
        harness.addr,
    )
    .await
    .expect("handshake");

    // From the session's own address: one byte beyond the largest record.
    let oversized = vec![23u8; MAX_DATAGRAM + 1];
    stream.get_ref().0.send(&oversized).unwrap();
    let (_stream, reply) = exchange(stream, b"after").await;
    assert_eq!(reply, b"sensor-1:after");
    assert_eq!(harness.sessions.len(), 1);
    assert_eq!(harness.sessions.queued_bytes.load(Ordering::Acquire), 0);
}
