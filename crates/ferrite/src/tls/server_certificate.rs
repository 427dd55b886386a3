//! The server certificate of the TLS listeners, read from PEM files and
//! reloaded when they change.
//!
//! [`ServerCertificate`] is the rustls certificate resolver. It holds the
//! loaded chain and key behind a lock, so a reload affects the handshakes
//! that start after it and leaves open connections alone. [`watch`] polls
//! the files' modification times every `tls.reload_interval` and reloads
//! on SIGHUP. A file that fails to load (missing, not PEM, a key that does
//! not match the certificate) is logged and the previous certificate stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Remaining validity below which the server certificate is warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The certificate chain and key that the TLS listeners present.
#[derive(Debug)]
pub struct ServerCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug, Clone)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// Modification times of the certificate and key files at loading.
    modified: (Option<SystemTime>, Option<SystemTime>),
}

impl ServerCertificate {
    /// Loads the certificate chain and key; fails when either file is
    /// missing or invalid, or the key does not match the certificate.
    pub fn load(cert_file: &Path, key_file: &Path) -> anyhow::Result<Self> {
        let loaded = load_pair(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(loaded),
        })
    }

    /// Loads the files again when their modification time changed, or
    /// always with `force`. Returns whether a new certificate is in use.
    pub fn reload(&self, force: bool) -> anyhow::Result<bool> {
        let modified = (modified(&self.cert_file), modified(&self.key_file));
        if !force && modified == self.current.read().modified {
            return Ok(false);
        }
        match load_pair(&self.cert_file, &self.key_file) {
            Ok(loaded) => {
                *self.current.write() = loaded;
                Ok(true)
            }
            Err(error) => {
                // Remember the times of the bad files, so that the error is
                // logged once per change and not at every poll.
                self.current.write().modified = modified;
                Err(error)
            }
        }
    }

    /// Logs a warning when the leaf certificate in use expires within
    /// [`EXPIRY_WARNING`] or has expired, because clients then fail.
    pub fn warn_if_expiring(&self) {
        let Some(leaf) = self.current.read().key.cert.first().cloned() else {
            return;
        };
        let Ok(leaf) = openssl::x509::X509::from_der(&leaf) else {
            return;
        };
        let Ok(now) = openssl::asn1::Asn1Time::days_from_now(0) else {
            return;
        };
        let Ok(left) = now.diff(leaf.not_after()) else {
            return;
        };
        let seconds_left = i64::from(left.days) * 86_400 + i64::from(left.secs);
        if seconds_left < 0 {
            tracing::error!(
                not_after = %leaf.not_after(),
                cert_file = %self.cert_file.display(),
                "the TLS server certificate has expired; clients reject it until it is renewed"
            );
        } else if seconds_left < EXPIRY_WARNING.as_secs() as i64 {
            tracing::warn!(
                not_after = %leaf.not_after(),
                cert_file = %self.cert_file.display(),
                "the TLS server certificate expires within 14 days; a renewed file is loaded without restart"
            );
        }
    }

    /// SHA-256 fingerprint of the leaf certificate in use, for the log.
    pub fn fingerprint(&self) -> String {
        let current = self.current.read();
        current
            .key
            .cert
            .first()
            .map(|leaf| hex::encode(super::sha256(leaf)))
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().key.clone())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

/// Reads and checks a certificate chain and its private key.
fn load_pair(cert_file: &Path, key_file: &Path) -> anyhow::Result<Loaded> {
    let modified = (modified(cert_file), modified(key_file));
    let cert_pem = std::fs::read(cert_file)
        .with_context(|| format!("cannot read tls.cert_file {}", cert_file.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "tls.cert_file {} is not a valid PEM certificate chain",
                cert_file.display()
            )
        })?;
    anyhow::ensure!(
        !chain.is_empty(),
        "tls.cert_file {} contains no \"-----BEGIN CERTIFICATE-----\" block",
        cert_file.display()
    );

    let key_pem = std::fs::read(key_file)
        .with_context(|| format!("cannot read tls.key_file {}", key_file.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
        format!(
            "tls.key_file {} contains no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_file.display()
        )
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).with_context(|| {
        format!(
            "the key in tls.key_file {} is not an RSA, ECDSA (P-256, P-384) or Ed25519 key",
            key_file.display()
        )
    })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().with_context(|| {
        format!(
            "the key in tls.key_file {} does not belong to the first certificate of tls.cert_file {}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        modified,
    })
}

/// Interval of the expiry warning while the certificate stays the same.
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// Reloads `certificate` when its files change (checked every `interval`)
/// and on SIGHUP, until `shutdown` is cancelled. Logs the expiry warning
/// of [`ServerCertificate::warn_if_expiring`] once a day and after each
/// reload.
pub async fn watch(
    certificate: Arc<ServerCertificate>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first check is at startup, outside this loop.
    let mut expiry_ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + EXPIRY_CHECK_INTERVAL,
        EXPIRY_CHECK_INTERVAL,
    );
    expiry_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; the TLS certificate is reloaded only when its files change");
            None
        }
    };

    loop {
        #[cfg(unix)]
        let hangup_received = async {
            match hangup.as_mut() {
                Some(signal) => signal.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup_received = std::future::pending::<Option<()>>();

        let force = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => false,
            _ = hangup_received => true,
            _ = expiry_ticker.tick() => {
                certificate.warn_if_expiring();
                continue;
            }
        };
        let reloading = certificate.clone();
        let reloaded = tokio::task::spawn_blocking(move || {
            reloading
                .reload(force)
                .map(|changed| changed.then(|| reloading.fingerprint()))
        })
        .await;
        match reloaded {
            Ok(Ok(Some(fingerprint))) => {
                tracing::info!(fingerprint, "loaded a new TLS server certificate");
                certificate.warn_if_expiring();
            }
            Ok(Ok(None)) => {}
            Ok(Err(error)) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "cannot load the changed TLS certificate or key; the previous certificate stays in use"
                );
            }
            Err(error) => tracing::error!(%error, "the TLS certificate reload task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log destination that tests can read.
    #[derive(Clone, Default)]
    struct SharedBuffer(Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl SharedBuffer {
        fn count(&self, text: &str) -> usize {
            String::from_utf8_lossy(&self.0.lock())
                .matches(text)
                .count()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_warning_repeats_daily() {
        let dir = tempfile::tempdir().unwrap();
        // A server certificate valid for one day is within the warning.
        crate::certs::init(dir.path(), &[], 1).unwrap();
        let certificate = Arc::new(
            ServerCertificate::load(
                &dir.path().join("server.pem"),
                &dir.path().join("server-key.pem"),
            )
            .unwrap(),
        );
        let logs = SharedBuffer::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let shutdown = CancellationToken::new();
        let reload_interval = Duration::from_secs(1000 * 24 * 60 * 60);
        let task = tokio::spawn(watch(certificate, reload_interval, shutdown.clone()));
        let warning = "expires within 14 days";
        tokio::time::sleep(Duration::from_secs(60 * 60)).await;
        assert_eq!(
            logs.count(warning),
            0,
            "the startup check is not in the loop"
        );
        tokio::time::sleep(EXPIRY_CHECK_INTERVAL).await;
        assert_eq!(logs.count(warning), 1, "after one day");
        tokio::time::sleep(EXPIRY_CHECK_INTERVAL).await;
        assert_eq!(logs.count(warning), 2, "after two days");

        shutdown.cancel();
        task.await.unwrap();
    }
}
