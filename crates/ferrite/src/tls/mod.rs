//! TLS for the HTTPS and MQTT over TLS listeners, with rustls and its ring
//! provider.
//!
//! - Protocol versions: TLS 1.3 and 1.2 only; rustls has no code for older
//!   versions, so SSLv3, TLS 1.0 and TLS 1.1 handshakes fail.
//! - The server certificate comes from `tls.cert_file` and `tls.key_file`
//!   and is reloaded when they change (`server_certificate.rs`).
//! - MQTT over TLS requests a client certificate (`client_auth.rs`); HTTPS
//!   does not, so browsers show no certificate prompt.
//! - Every handshake has `tls.handshake_timeout` to finish, so a client that
//!   opens a connection and sends nothing, or stops halfway, is closed.

pub mod client_auth;
mod server_certificate;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

pub use client_auth::{ClientCertificate, DeviceTrust};
pub use server_certificate::ServerCertificate;

use crate::auth::dtls::DtlsCredentials;
use crate::config::TlsConfig;

/// SHA-256 of a DER encoding, the fingerprint of certificates.
pub fn sha256(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// The ring provider with its default cipher suites and key exchange
/// groups.
// rustls 0.23.48 deprecates it because ring has no post-quantum key
// exchange; the aws-lc-rs provider that has one is not used in Ferrite.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the TLS connections of one listener.
#[derive(Clone)]
pub struct TlsListener {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// Label of the listener in metrics: "https" or "mqtts".
    name: &'static str,
}

/// Failure of a TLS handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the TLS handshake did not finish within {0:?}")]
    TimedOut(Duration),
    #[error("the TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

impl TlsListener {
    /// Runs the server side of the handshake on an accepted connection.
    pub async fn accept(&self, stream: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let result = match tokio::time::timeout(
            self.handshake_timeout,
            self.acceptor.accept(stream),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(HandshakeError::Failed(error)),
            Err(_) => Err(HandshakeError::TimedOut(self.handshake_timeout)),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(HandshakeError::TimedOut(_)) => "timeout",
            Err(HandshakeError::Failed(_)) => "failed",
        };
        metrics::counter!("ferrite_tls_handshakes_total", "listener" => self.name, "result" => outcome)
            .increment(1);
        result
    }
}

/// The TLS side of a server: the certificate, the device trust and the
/// acceptors of both listeners.
pub struct TlsSetup {
    pub certificate: Arc<ServerCertificate>,
    pub trust: Arc<DeviceTrust>,
    pub https: TlsListener,
    pub mqtts: TlsListener,
}

impl TlsSetup {
    /// Loads the server certificate and `tls.client_ca_file`. `registered`
    /// contains the certificates registered on devices.
    pub fn new(config: &TlsConfig, registered: Arc<DtlsCredentials>) -> anyhow::Result<Self> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            anyhow::bail!("TLS needs tls.cert_file and tls.key_file");
        };
        let provider = provider();
        let certificate = Arc::new(ServerCertificate::load(cert_file, key_file)?);
        let trust = Arc::new(DeviceTrust::new(
            provider.clone(),
            config.client_ca_file.as_deref(),
            registered,
        )?);

        let mut https = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("cannot configure TLS 1.2 and 1.3")?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        https.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let verifier =
            client_auth::DeviceCertVerifier::new(trust.clone(), config.require_client_certificate);
        let mqtts = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("cannot configure TLS 1.2 and 1.3")?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(certificate.clone());

        Ok(Self {
            certificate,
            trust,
            https: TlsListener {
                acceptor: TlsAcceptor::from(Arc::new(https)),
                handshake_timeout: config.handshake_timeout,
                name: "https",
            },
            mqtts: TlsListener {
                acceptor: TlsAcceptor::from(Arc::new(mqtts)),
                handshake_timeout: config.handshake_timeout,
                name: "mqtts",
            },
        })
    }

    /// Starts the task that reloads the server certificate when its files
    /// change or on SIGHUP.
    pub fn watch_certificate(
        &self,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(server_certificate::watch(
            self.certificate.clone(),
            interval,
            shutdown,
        ))
    }
}

/// Returns the client certificate that the handshake of `stream` accepted.
pub fn client_certificate(
    stream: &TlsStream<TcpStream>,
    trust: &DeviceTrust,
) -> Option<ClientCertificate> {
    let (_, connection) = stream.get_ref();
    let (leaf, intermediates) = connection.peer_certificates()?.split_first()?;
    // The chain passed the same check during the handshake moments ago; it
    // is repeated here because rustls keeps no result of the verifier.
    match trust.check(leaf, intermediates, rustls::pki_types::UnixTime::now()) {
        Ok(certificate) => Some(certificate),
        Err(error) => {
            tracing::debug!(%error, "a client certificate accepted at the handshake failed its second check");
            None
        }
    }
}
