//! The OpenSSL side of the DTLS listener: the server context with its
//! cipher suites and callbacks (cookie, PSK, client certificate), the
//! stateless cookie exchange, and the in-memory datagram pipe that an
//! `SslStream` reads from and writes to.

use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use foreign_types::ForeignTypeRef;
use hmac::{Hmac, Mac};
use openssl::error::ErrorStack;
use openssl::ex_data::Index;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions, SslRef,
    SslStream, SslVerifyMode,
};
use openssl::x509::{X509Ref, X509StoreContextRef, X509VerifyResult};
use rand::RngCore;
use sha2::Sha256;

use crate::auth::dtls::{CredentialOwner, DtlsCredentials};
use crate::config::CoapDtlsConfig;
use crate::encryption::Keyring;
use crate::ids::DeviceId;
use crate::metadata::credentials::psk_seal_context;

/// TLS 1.2 cipher suites offered, strongest match first. CCM_8 is the
/// mandatory suite of CoAP (RFC 7252 §9.1.3.1 for PSK, §9.1.3.3 for
/// certificates); GCM and CBC are for clients without CCM.
const CIPHER_LIST: &str = concat!(
    "PSK-AES128-CCM8:PSK-AES128-GCM-SHA256:PSK-AES128-CCM:PSK-AES128-CBC-SHA256:",
    "ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-CCM:",
    "ECDHE-ECDSA-AES128-SHA256"
);

/// Largest DTLS datagram the server writes. 1280 bytes is the IPv6 minimum
/// MTU; 1200 leaves room for the IP and UDP headers of either family.
pub const DATAGRAM_MTU: u32 = 1200;

/// Length of a cookie time window. A cookie is valid in its window and the
/// next, so a client has at least this long to respond to a HelloVerifyRequest.
const COOKIE_WINDOW_SECS: u64 = 60;

/// Outcome of the PSK callback, kept on the handshake's `Ssl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PskOutcome {
    /// The PSK identity was found, and the handshake used its key.
    Found {
        owner: CredentialOwner,
        identity: Vec<u8>,
        /// The key as sealed when the handshake read it. Setting the PSK
        /// again seals it anew, which later checks of the session notice.
        sealed_key: Vec<u8>,
    },
    /// The client named a PSK identity that no device has.
    UnknownIdentity,
}

struct ExIndexes {
    peer: Index<Ssl, SocketAddr>,
    psk: Index<Ssl, PskOutcome>,
}

fn ex_indexes() -> &'static ExIndexes {
    static INDEXES: OnceLock<ExIndexes> = OnceLock::new();
    INDEXES.get_or_init(|| ExIndexes {
        peer: Ssl::new_ex_index().expect("OpenSSL allocates an ex_data index"),
        psk: Ssl::new_ex_index().expect("OpenSSL allocates an ex_data index"),
    })
}

/// Returns what the PSK callback recorded on `ssl`, if it ran.
pub fn psk_outcome(ssl: &SslRef) -> Option<PskOutcome> {
    ssl.ex_data(ex_indexes().psk).cloned()
}

/// The server context of the DTLS listener.
pub struct DtlsContext {
    context: SslContext,
    /// Whether client certificates are requested (a server certificate is
    /// configured).
    pub certificates: bool,
    /// Whether a CA file is configured, so that a verified chain names a
    /// device by its subject CN.
    pub ca_configured: bool,
}

impl DtlsContext {
    /// Builds the context from the `[coap.dtls]` settings. Fails with the
    /// file name when a certificate, key or CA file cannot be loaded.
    pub fn build(
        config: &CoapDtlsConfig,
        credentials: Arc<DtlsCredentials>,
        keyring: Arc<Keyring>,
    ) -> anyhow::Result<Self> {
        let mut builder = SslContextBuilder::new(SslMethod::dtls())?;
        builder.set_min_proto_version(Some(openssl::ssl::SslVersion::DTLS1_2))?;
        builder.set_cipher_list(CIPHER_LIST)?;
        builder.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION);
        // Idle sessions give back their record buffers, an estimated 34 KiB
        // per session (a 16 KiB record and its overhead in each direction),
        // which matters with thousands of sleeping devices.
        builder.set_mode(SslMode::RELEASE_BUFFERS);
        set_cookie_callbacks(&mut builder);

        if config.psk {
            let credentials = credentials.clone();
            builder.set_psk_server_callback(move |ssl, identity, key| {
                Ok(find_psk(ssl, identity, key, &credentials, &keyring))
            });
        }

        let certificates = config.cert_file.is_some();
        if let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) {
            builder
                .set_certificate_chain_file(cert_file)
                .with_context(|| {
                    format!(
                        "cannot load coap.dtls.cert_file {}: it must be a PEM certificate chain",
                        cert_file.display()
                    )
                })?;
            builder
                .set_private_key_file(key_file, SslFiletype::PEM)
                .with_context(|| {
                    format!(
                        "cannot load coap.dtls.key_file {}: it must be a PEM private key",
                        key_file.display()
                    )
                })?;
            builder.check_private_key().with_context(|| {
                format!(
                    "coap.dtls.key_file {} is not the key of coap.dtls.cert_file {}",
                    key_file.display(),
                    cert_file.display()
                )
            })?;
            if let Some(ca_file) = &config.ca_file {
                builder.set_ca_file(ca_file).with_context(|| {
                    format!(
                        "cannot load coap.dtls.ca_file {}: it must contain PEM certificates",
                        ca_file.display()
                    )
                })?;
            }
            let credentials = credentials.clone();
            builder.set_verify_callback(
                SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
                move |preverified, store| {
                    verify_client_certificate(preverified, store, &credentials)
                },
            );
        }

        Ok(Self {
            context: builder.build(),
            certificates,
            ca_configured: config.ca_file.is_some(),
        })
    }

    /// Runs the cookie exchange of RFC 6347 §4.2.1 on one datagram from a
    /// peer without a session. OpenSSL responds to a ClientHello without a
    /// valid cookie with a HelloVerifyRequest and keeps nothing. Only a
    /// ClientHello that returns a valid cookie yields a stream to continue
    /// the handshake with.
    pub fn listen(&self, peer: SocketAddr, datagram: Bytes) -> Result<ListenOutcome, ErrorStack> {
        let mut ssl = Ssl::new(&self.context)?;
        ssl.set_ex_data(ex_indexes().peer, peer);
        ssl.set_mtu(DATAGRAM_MTU)?;
        let mut pipe = DatagramPipe::default();
        pipe.push(datagram);
        let mut stream = SslStream::new(ssl, pipe)?;

        let accepted = dtls_listen(stream.ssl());
        if accepted {
            return Ok(ListenOutcome::Accepted(Box::new(stream)));
        }
        let replies = stream.get_mut().take_outbound();
        if replies.is_empty() {
            Ok(ListenOutcome::Dropped)
        } else {
            Ok(ListenOutcome::VerifyRequested(replies))
        }
    }
}

/// Result of [`DtlsContext::listen`].
pub enum ListenOutcome {
    /// The ClientHello returned a valid cookie. The stream contains it and
    /// continues the handshake.
    Accepted(Box<SslStream<DatagramPipe>>),
    /// The ClientHello had no valid cookie; send these datagrams (a
    /// HelloVerifyRequest) and forget the peer.
    VerifyRequested(Vec<Bytes>),
    /// The datagram was not a usable ClientHello (a fragment, a version
    /// below DTLS 1.2, malformed).
    Dropped,
}

unsafe extern "C" {
    /// Declared here because openssl-sys 0.9 does not bind it; libssl 1.1.0
    /// and later export it.
    fn DTLSv1_listen(ssl: *mut openssl_sys::SSL, client: *mut c_void) -> c_int;
    fn BIO_ADDR_new() -> *mut c_void;
    fn BIO_ADDR_free(address: *mut c_void);
}

/// `DTLS_CTRL_HANDLE_TIMEOUT` of `openssl/ssl.h`, which `DTLSv1_handle_timeout`
/// expands to.
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

/// Calls `DTLSv1_listen` and returns whether the datagram was a ClientHello
/// with a valid cookie. Clears the thread's OpenSSL error queue on every
/// path.
fn dtls_listen(ssl: &SslRef) -> bool {
    // SAFETY: `ssl` is a live SSL object with its BIO attached by
    // `SslStream::new`. DTLSv1_listen writes the client address into the
    // BIO_ADDR (or clears it, as for this BIO), which is freed right after.
    // When it rejects a datagram it pushes errors onto the calling thread's
    // error queue, which the caller must clear.
    let result = unsafe {
        let address = BIO_ADDR_new();
        if address.is_null() {
            clear_error_queue();
            return false;
        }
        let result = DTLSv1_listen(ssl.as_ptr(), address);
        BIO_ADDR_free(address);
        result
    };
    // A malformed ClientHello from anyone leaves errors here. Left on the
    // queue, they make `SSL_get_error` of the next session that runs on this
    // thread return `SSL_ERROR_SSL` instead of "want read", which ends that
    // unrelated session.
    clear_error_queue();
    result == 1
}

/// Empties the calling thread's OpenSSL error queue (`ERR_clear_error`).
/// `SSL_get_error` reports `SSL_ERROR_SSL` whenever the queue is not empty,
/// so each SSL call of a session starts with an empty queue. Errors left by
/// another session or another OpenSSL user of this worker thread then
/// cannot end it.
pub fn clear_error_queue() {
    // SAFETY: ERR_clear_error takes no argument and only touches the
    // calling thread's error queue.
    unsafe { openssl_sys::ERR_clear_error() }
}

/// Retransmits the last flight when OpenSSL's retransmission timer has
/// expired (`DTLSv1_handle_timeout`). Returns false when the handshake gave
/// up after too many retransmissions.
pub fn handle_retransmission_timer(ssl: &SslRef) -> bool {
    clear_error_queue();
    // SAFETY: `ssl` is a live SSL object; the control takes no argument.
    let result = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            DTLS_CTRL_HANDLE_TIMEOUT,
            0,
            std::ptr::null_mut(),
        )
    };
    result >= 0
}

/// Stateless cookies: HMAC-SHA256 of the peer address and the time window
/// under a secret made at start. A restart makes outstanding cookies
/// invalid, which costs clients one more HelloVerifyRequest.
fn set_cookie_callbacks(builder: &mut SslContextBuilder) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let secret = Arc::new(secret);

    let generate_secret = secret.clone();
    builder.set_cookie_generate_cb(move |ssl, cookie| {
        let Some(peer) = ssl.ex_data(ex_indexes().peer) else {
            return Err(ErrorStack::get());
        };
        let tag = cookie_tag(&generate_secret, peer, current_cookie_window());
        cookie[..tag.len()].copy_from_slice(&tag);
        Ok(tag.len())
    });
    builder.set_cookie_verify_cb(move |ssl, cookie| {
        let Some(peer) = ssl.ex_data(ex_indexes().peer) else {
            return false;
        };
        let window = current_cookie_window();
        [window, window.saturating_sub(1)]
            .iter()
            .any(|window| verify_cookie(&secret, peer, *window, cookie))
    });
}

fn current_cookie_window() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs() / COOKIE_WINDOW_SECS)
        .unwrap_or(0)
}

fn cookie_mac(secret: &[u8; 32], peer: &SocketAddr, window: u64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&window.to_be_bytes());
    mac.update(peer.to_string().as_bytes());
    mac
}

fn cookie_tag(secret: &[u8; 32], peer: &SocketAddr, window: u64) -> [u8; 32] {
    cookie_mac(secret, peer, window)
        .finalize()
        .into_bytes()
        .into()
}

fn verify_cookie(secret: &[u8; 32], peer: &SocketAddr, window: u64, cookie: &[u8]) -> bool {
    cookie_mac(secret, peer, window)
        .verify_slice(cookie)
        .is_ok()
}

/// The PSK server callback: copies the key of `identity` into `key` and
/// returns its length, or returns 0, which makes OpenSSL end the handshake
/// with an `unknown_psk_identity` alert.
fn find_psk(
    ssl: &mut SslRef,
    identity: Option<&[u8]>,
    key: &mut [u8],
    credentials: &DtlsCredentials,
    keyring: &Keyring,
) -> usize {
    let found = identity.and_then(|identity| Some((identity, credentials.psk(identity)?)));
    let Some((identity, (owner, sealed_key))) = found else {
        ssl.set_ex_data(ex_indexes().psk, PskOutcome::UnknownIdentity);
        return 0;
    };
    let plain = match keyring.open(
        owner.tenant_id,
        &psk_seal_context(owner.device_id),
        &sealed_key,
    ) {
        Ok(plain) => plain,
        Err(error) => {
            tracing::error!(
                device_id = %owner.device_id,
                %error,
                "cannot open the device's pre-shared key; set it again with PUT /api/v1/devices/{{id}}/credentials/psk"
            );
            return 0;
        }
    };
    if plain.len() > key.len() {
        return 0;
    }
    key[..plain.len()].copy_from_slice(&plain);
    let outcome = PskOutcome::Found {
        owner,
        identity: identity.to_vec(),
        sealed_key,
    };
    ssl.set_ex_data(ex_indexes().psk, outcome);
    plain.len()
}

/// Verification errors that mean only "the issuer is not a configured CA".
/// A certificate registered on a device is accepted despite them, because
/// its fingerprint is the trust anchor.
fn is_untrusted_issuer(error: X509VerifyResult) -> bool {
    [
        openssl_sys::X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT,
        openssl_sys::X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
        openssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT,
        openssl_sys::X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
        openssl_sys::X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE,
        openssl_sys::X509_V_ERR_CERT_UNTRUSTED,
    ]
    .contains(&error.as_raw())
}

fn verify_client_certificate(
    preverified: bool,
    store: &mut X509StoreContextRef,
    credentials: &DtlsCredentials,
) -> bool {
    if preverified {
        return true;
    }
    if !is_untrusted_issuer(store.error()) {
        return false;
    }
    let leaf = store
        .chain()
        .and_then(|chain| chain.get(0))
        .or_else(|| store.current_cert());
    leaf.and_then(fingerprint)
        .is_some_and(|fingerprint| credentials.certificate(&fingerprint).is_some())
}

/// SHA-256 of a certificate's DER encoding.
pub fn fingerprint(certificate: &X509Ref) -> Option<[u8; 32]> {
    let digest = certificate.digest(MessageDigest::sha256()).ok()?;
    digest.as_ref().try_into().ok()
}

/// Device named by a client certificate, and the way it was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateIdentity {
    /// The certificate's fingerprint is registered on this device.
    Registered {
        owner: CredentialOwner,
        fingerprint: [u8; 32],
    },
    /// The certificate chains to `ca_file` and its subject CN is this id.
    CommonName(DeviceId),
}

/// Finds the device of the client certificate of a finished handshake.
/// Returns `None` when there is no certificate or it names no device.
///
/// A certificate that chains to `ca_file` and whose subject CN is a device
/// id names that device, even when its fingerprint is registered on another
/// device. A client certificate is public (DTLS 1.2 sends it in the clear),
/// so registering it must not move its device elsewhere, possibly into
/// another tenant. Any other certificate names the device that its
/// fingerprint is registered on.
pub fn certificate_identity(
    ssl: &SslRef,
    credentials: &DtlsCredentials,
    ca_configured: bool,
) -> Option<CertificateIdentity> {
    let certificate = ssl.peer_certificate()?;
    let ca_verified = ca_configured && ssl.verify_result() == X509VerifyResult::OK;
    if ca_verified
        && let Some(device) = common_name(&certificate).and_then(|name| name.parse().ok())
    {
        return Some(CertificateIdentity::CommonName(device));
    }
    let digest = fingerprint(&certificate)?;
    let owner = credentials.certificate(&digest)?;
    Some(CertificateIdentity::Registered {
        owner,
        fingerprint: digest,
    })
}

/// Datagrams between a session's `SslStream` and the UDP socket. OpenSSL
/// reads one datagram per read call and writes one record per write call,
/// so each element is one datagram.
#[derive(Debug, Default)]
pub struct DatagramPipe {
    inbound: VecDeque<Bytes>,
    outbound: Vec<Bytes>,
}

impl DatagramPipe {
    pub fn push(&mut self, datagram: Bytes) {
        self.inbound.push_back(datagram);
    }

    /// Takes the datagrams OpenSSL wrote since the last call.
    pub fn take_outbound(&mut self) -> Vec<Bytes> {
        std::mem::take(&mut self.outbound)
    }
}

impl io::Read for DatagramPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(datagram) = self.inbound.pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        // A datagram longer than OpenSSL's buffer is cut, as a UDP socket
        // would; the record layer then drops it.
        let length = datagram.len().min(buf.len());
        buf[..length].copy_from_slice(&datagram[..length]);
        Ok(length)
    }
}

impl io::Write for DatagramPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push(Bytes::copy_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Returns the subject CN of a certificate, if it has exactly one.
pub fn common_name(certificate: &X509Ref) -> Option<String> {
    let mut entries = certificate.subject_name().entries_by_nid(Nid::COMMONNAME);
    let entry = entries.next()?;
    if entries.next().is_some() {
        return None;
    }
    // PrintableString and UTF8String, the usual CN types, are UTF-8 bytes.
    String::from_utf8(entry.data().as_slice().to_vec()).ok()
}
