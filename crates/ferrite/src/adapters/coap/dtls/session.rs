//! One DTLS session: the handshake after the cookie exchange, then
//! decryption of the peer's datagrams for the CoAP handler and encryption
//! of the replies. Each session is a task that owns its `SslStream`, so a
//! slow handshake step or handler never holds up the listener or other
//! peers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use openssl::ssl::{ErrorCode, SslStream, SslVerifyMode};
use openssl::x509::X509VerifyResult;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::context::{
    CertificateIdentity, DatagramPipe, PskOutcome, certificate_identity, clear_error_queue,
    handle_retransmission_timer, psk_outcome,
};
use super::{DatagramHandler, Input, Shared, events};
use crate::adapters::coap::transport::PeerAuth;
use crate::auth::DeviceIdentity;
use crate::auth::revocation::{HeldAccess, RevocationWatch, Revoked, Signal};

/// Interval at which a handshake checks OpenSSL's retransmission timer,
/// which starts at 1 s and doubles per retransmission.
const RETRANSMISSION_CHECK: Duration = Duration::from_millis(200);
/// Largest plaintext of one record: 2^14 bytes (RFC 6347 §4.1).
const MAX_PLAINTEXT: usize = 16 * 1024;

/// The credential that authenticated a session. A matching revocation
/// event ends the session at once; the credential is also checked again
/// every `recheck_interval` while datagrams arrive, for changes that no
/// event announced (another process).
#[derive(Debug, Clone)]
enum SessionCredential {
    Psk {
        identity: Vec<u8>,
        sealed_key: Vec<u8>,
    },
    RegisteredCertificate([u8; 32]),
    /// A certificate of `ca_file` whose CN is the device id; only the
    /// device's existence is checked again.
    CommonName,
}

/// Reason a session ended, the label of `ferrite_coap_dtls_sessions_closed_total`.
type CloseReason = &'static str;

pub(super) struct Session<H> {
    pub peer: SocketAddr,
    pub id: u64,
    pub stream: SslStream<DatagramPipe>,
    pub inbox: mpsc::Receiver<Input>,
    /// Bytes of the inputs in `inbox`, shared with the session's handle.
    pub queued_bytes: Arc<AtomicUsize>,
    pub shared: Arc<Shared<H>>,
    /// Counts the handshake against `limits.dtls_handshakes_per_address`
    /// until it ends.
    pub handshake_slot: Option<crate::limits::AddressSlot>,
}

impl<H: DatagramHandler> Session<H> {
    /// Runs the session to its end and removes it from the registry.
    pub async fn run(mut self) {
        let reason = self.run_phases().await;
        self.shared.sessions.remove(self.peer, self.id);
        // Inputs still queued give their bytes back to the total bound.
        self.inbox.close();
        while let Ok(input) = self.inbox.try_recv() {
            self.release(&input);
        }
        events::session_closed(reason);
        tracing::debug!(reason, "DTLS session closed");
    }

    async fn run_phases(&mut self) -> CloseReason {
        // Subscribed before the handshake, so that a credential removed
        // while it runs ends the session.
        let revocations = self
            .shared
            .revocations
            .as_ref()
            .map(tokio::sync::broadcast::Receiver::resubscribe);
        let handshake = self.handshake().await;
        let identity = match handshake {
            Ok(()) => self.authenticated_device().await,
            Err(result) => Err(result),
        };
        self.shared.sessions.handshake_finished();
        self.handshake_slot = None;
        let (identity, credential) = match identity {
            Ok(identity) => identity,
            Err(result) => {
                events::handshake_finished(result);
                self.log_failed_handshake(result);
                return "handshake_failed";
            }
        };
        events::handshake_finished("ok");
        tracing::debug!(device_id = %identity.device_id, "DTLS handshake finished");

        if let Some(handle) = self.shared.sessions.get(self.peer)
            && handle.id == self.id
        {
            handle.established.store(true, Ordering::Release);
        }
        let held = held_access(&identity, &credential);
        let watch = revocations.map(|receiver| RevocationWatch::new(receiver, held));
        self.serve(identity, credential, watch).await
    }

    /// Drives the handshake until it finishes, fails or times out. Returns
    /// the handshake result label on failure.
    async fn handshake(&mut self) -> Result<(), &'static str> {
        let deadline = Instant::now() + self.shared.config.handshake_timeout;
        // Owned, because `next_input` borrows the whole session.
        let shutdown = self.shared.shutdown.clone();
        loop {
            clear_error_queue();
            let step = self.stream.accept();
            self.flush();
            match step {
                Ok(()) => return Ok(()),
                Err(error) if error.code() == ErrorCode::WANT_READ => {}
                Err(_) => return Err(self.classify_failure()),
            }

            tokio::select! {
                input = self.next_input() => match input {
                    Some(Input::Datagram(datagram)) => self.stream.get_mut().push(datagram),
                    // The sink sends replies only to established sessions.
                    Some(Input::Send(_)) => {}
                    None => return Err("failed"),
                },
                () = tokio::time::sleep(RETRANSMISSION_CHECK) => {
                    let alive = handle_retransmission_timer(self.stream.ssl());
                    self.flush();
                    if !alive {
                        return Err("timed_out");
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err("timed_out"),
                () = shutdown.cancelled() => return Err("failed"),
            }
        }
    }

    /// Receives the next input and gives its bytes back to the queue bounds.
    async fn next_input(&mut self) -> Option<Input> {
        let input = self.inbox.recv().await?;
        self.release(&input);
        Some(input)
    }

    fn release(&self, input: &Input) {
        self.shared
            .sessions
            .release(&self.queued_bytes, input.len());
    }

    fn classify_failure(&self) -> &'static str {
        let ssl = self.stream.ssl();
        if psk_outcome(ssl) == Some(PskOutcome::UnknownIdentity) {
            return "unknown_psk_identity";
        }
        if ssl.verify_mode().contains(SslVerifyMode::PEER)
            && ssl.verify_result() != X509VerifyResult::OK
        {
            return "bad_certificate";
        }
        "failed"
    }

    fn log_failed_handshake(&self, result: &'static str) {
        let mut limiter = self.shared.failure_warnings.lock();
        if let Some(suppressed) = limiter.allow(std::time::Instant::now()) {
            tracing::warn!(
                result,
                suppressed,
                "DTLS handshake failed; see ferrite_coap_dtls_handshakes_total for counts"
            );
        }
    }

    /// Finds the device that the handshake authenticated: by the PSK
    /// identity, or by the client certificate.
    async fn authenticated_device(
        &self,
    ) -> Result<(DeviceIdentity, SessionCredential), &'static str> {
        let ssl = self.stream.ssl();
        let (device_id, credential) = if let Some(PskOutcome::Found {
            owner,
            identity,
            sealed_key,
        }) = psk_outcome(ssl)
        {
            let credential = SessionCredential::Psk {
                identity,
                sealed_key,
            };
            (owner.device_id, credential)
        } else {
            let identity = certificate_identity(
                ssl,
                &self.shared.credentials,
                self.shared.context.ca_configured,
            );
            match identity {
                Some(CertificateIdentity::Registered { owner, fingerprint }) => (
                    owner.device_id,
                    SessionCredential::RegisteredCertificate(fingerprint),
                ),
                Some(CertificateIdentity::CommonName(device_id)) => {
                    (device_id, SessionCredential::CommonName)
                }
                None => return Err("bad_certificate"),
            }
        };
        let identity = self.load_device(device_id).await.ok_or("unknown_device")?;
        Ok((identity, credential))
    }

    /// Loads the device's current name and profile; `None` when it no
    /// longer exists or cannot be read.
    async fn load_device(&self, device_id: crate::ids::DeviceId) -> Option<DeviceIdentity> {
        let device = match self
            .shared
            .metadata
            .device_by_id_any_tenant(device_id)
            .await
        {
            Ok(device) => device?,
            Err(error) => {
                tracing::warn!(%device_id, %error, "cannot load the device of a DTLS session");
                return None;
            }
        };
        Some(DeviceIdentity {
            tenant_id: device.tenant_id,
            device_id: device.id,
            name: device.name,
            profile_id: device.profile_id,
        })
    }

    /// Returns whether the credential of the session still names `device`.
    fn credential_is_current(
        &self,
        credential: &SessionCredential,
        device: &DeviceIdentity,
    ) -> bool {
        let credentials = &self.shared.credentials;
        match credential {
            SessionCredential::Psk {
                identity,
                sealed_key,
            } => credentials.psk(identity).is_some_and(|(owner, current)| {
                owner.device_id == device.device_id && current == *sealed_key
            }),
            SessionCredential::RegisteredCertificate(fingerprint) => credentials
                .certificate(fingerprint)
                .is_some_and(|owner| owner.device_id == device.device_id),
            SessionCredential::CommonName => true,
        }
    }

    /// Checks the credential and reloads the device. Returns the fresh
    /// identity, or `None` when the session must end.
    async fn recheck(
        &self,
        credential: &SessionCredential,
        device: &DeviceIdentity,
    ) -> Option<DeviceIdentity> {
        if !self.credential_is_current(credential, device) {
            return None;
        }
        self.load_device(device.device_id).await
    }

    /// Passes decrypted datagrams to the handler and encrypts replies until
    /// the peer closes, goes idle or the server shuts down.
    async fn serve(
        &mut self,
        mut device: DeviceIdentity,
        credential: SessionCredential,
        mut revocation: Option<RevocationWatch>,
    ) -> CloseReason {
        let idle_timeout = self.shared.config.idle_timeout;
        let mut checked_at = Instant::now();
        let shutdown = self.shared.shutdown.clone();
        loop {
            let input = tokio::select! {
                input = tokio::time::timeout(idle_timeout, self.next_input()) => input,
                () = shutdown.cancelled() => {
                    self.close();
                    return "shutdown";
                }
                signal = next_signal(&mut revocation) => {
                    let still_valid = match signal {
                        // A replaced key ends only the sessions of the old one.
                        Signal::Revoked(Revoked::PreSharedKey(_)) => {
                            self.credential_is_current(&credential, &device)
                        }
                        Signal::Revoked(_) => false,
                        Signal::Lagged => match self.recheck(&credential, &device).await {
                            Some(fresh) => {
                                device = fresh;
                                checked_at = Instant::now();
                                true
                            }
                            None => false,
                        },
                    };
                    if !still_valid {
                        tracing::info!(device_id = %device.device_id, "closing a DTLS session whose credential or device was revoked");
                        self.close();
                        return "revoked";
                    }
                    continue;
                }
            };
            match input {
                Err(_elapsed) => {
                    self.close();
                    return "idle";
                }
                // The listener dropped the handle: the peer finished a new
                // handshake from the same address.
                Ok(None) => return "replaced",
                Ok(Some(Input::Send(message))) => self.send(&message),
                Ok(Some(Input::Datagram(datagram))) => {
                    if checked_at.elapsed() >= self.shared.recheck_interval {
                        let Some(fresh) = self.recheck(&credential, &device).await else {
                            tracing::info!(device_id = %device.device_id, "closing a DTLS session whose credential or device was removed");
                            self.close();
                            return "revoked";
                        };
                        device = fresh;
                        checked_at = Instant::now();
                    }
                    self.stream.get_mut().push(datagram);
                    let auth = PeerAuth::Device(device.clone());
                    if let Some(reason) = self.read_records(&auth).await {
                        return reason;
                    }
                }
            }
        }
    }

    /// Decrypts the datagrams in the pipe and hands each message to the handler.
    /// Returns the close reason when the session ended.
    async fn read_records(&mut self, auth: &PeerAuth) -> Option<CloseReason> {
        // Allocated per datagram rather than per session, so that idle
        // sessions cost no plaintext buffer.
        let mut plaintext = vec![0u8; MAX_PLAINTEXT];
        loop {
            clear_error_queue();
            let read = self.stream.ssl_read(&mut plaintext);
            // Reading can write: a retransmitted final flight, or the
            // reply to close_notify.
            self.flush();
            match read {
                Ok(length) => {
                    let message = Bytes::copy_from_slice(&plaintext[..length]);
                    self.shared
                        .handler
                        .clone()
                        .handle(self.peer, message, auth.clone())
                        .await;
                }
                Err(error) if error.code() == ErrorCode::WANT_READ => return None,
                Err(error) if error.code() == ErrorCode::ZERO_RETURN => {
                    self.close();
                    return Some("close_notify");
                }
                Err(error) => {
                    tracing::debug!(%error, "DTLS session failed");
                    return Some("error");
                }
            }
        }
    }

    fn send(&mut self, message: &[u8]) {
        clear_error_queue();
        if let Err(error) = self.stream.ssl_write(message) {
            tracing::debug!(%error, "cannot encrypt a CoAP message for the peer");
            events::datagram_dropped("send_failed");
        }
        self.flush();
    }

    /// Sends close_notify without waiting for the peer's reply, which
    /// RFC 5246 §7.2.1 allows.
    fn close(&mut self) {
        clear_error_queue();
        let _ = self.stream.shutdown();
        self.flush();
    }

    /// Sends what OpenSSL wrote to the pipe.
    fn flush(&mut self) {
        for datagram in self.stream.get_mut().take_outbound() {
            if self
                .shared
                .socket
                .try_send_to(&datagram, self.peer)
                .is_err()
            {
                events::datagram_dropped("send_failed");
            }
        }
    }
}

/// Describes what a session holds, for matching revocation events.
fn held_access(device: &DeviceIdentity, credential: &SessionCredential) -> HeldAccess {
    let mut held = device.held_access(None);
    match credential {
        SessionCredential::Psk { .. } => held.pre_shared_key = true,
        SessionCredential::RegisteredCertificate(fingerprint) => {
            held.certificate = Some(*fingerprint);
        }
        SessionCredential::CommonName => {}
    }
    held
}

/// Waits for the next revocation signal; never returns without a watch.
async fn next_signal(watch: &mut Option<RevocationWatch>) -> Signal {
    match watch {
        Some(watch) => watch.next().await,
        None => std::future::pending().await,
    }
}
