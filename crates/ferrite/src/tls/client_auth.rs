//! Client certificates of devices on MQTT over TLS.
//!
//! A certificate is trusted through any of these paths:
//! 1. It chains to a CA that a tenant registered (`/api/v1/device-cas`) and
//!    that is within its validity period. It names a device of that tenant
//!    by its subject CN: the device id, or else the device name. A CA with
//!    `auto_create_devices` creates a device named after the CN when none
//!    matches.
//! 2. It chains to `tls.client_ca_file`. Its subject CN must be a device id,
//!    of any tenant, as with `coap.dtls.ca_file`.
//! 3. Its SHA-256 fingerprint is registered on a device
//!    (`/api/v1/devices/{id}/credentials/certificates`), by any issuer.
//!    It must be within its validity period.
//!
//! Every path is evaluated, and the certificate is rejected when two paths
//! lead to different devices: at the handshake when they name different
//! tenants, else after the device lookup. So neither registering someone
//! else's certificate, which is public, nor registering a copy of someone
//! else's CA moves their device; it makes the certificate unusable until
//! an operator removes the conflicting registration, and the rejection is
//! logged with both owners. Chains are checked with
//! rustls' WebPKI verifier (validity, signatures, the clientAuth extended
//! key usage when present), and rustls checks the handshake signature with
//! the certificate's key, so the client proves it holds the private key.
//! The device is looked up only after the handshake ([`resolve_device`]),
//! because the lookup needs the metadata database.

use std::sync::Arc;

use anyhow::Context;
use foreign_types::ForeignTypeRef;
use openssl::x509::{X509, X509Ref};
use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};

use crate::auth::dtls::{CredentialOwner, DtlsCredentials};
use crate::auth::{CertificateTrust, DeviceIdentity, HeldCredential};
use crate::ids::{DeviceId, TenantId};
use crate::metadata::device_cas::StoredDeviceCa;
use crate::metadata::{MetadataError, MetadataStore, SqliteMetadata};

/// The trust path that accepted a client certificate at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateGrant {
    /// It chains to a CA that the tenant registered.
    DeviceCa {
        tenant_id: TenantId,
        ca_fingerprint: [u8; 32],
        auto_create_devices: bool,
    },
    /// It chains to `tls.client_ca_file`.
    ClientCaFile,
    /// Its fingerprint is registered on this device.
    Registered(CredentialOwner),
}

impl CertificateGrant {
    /// Returns the tenant that this path leads to, when it is known before
    /// the device lookup.
    fn tenant(&self) -> Option<TenantId> {
        match self {
            CertificateGrant::DeviceCa { tenant_id, .. } => Some(*tenant_id),
            CertificateGrant::ClientCaFile => None,
            CertificateGrant::Registered(owner) => Some(owner.tenant_id),
        }
    }
}

/// A client certificate accepted at the handshake.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// SHA-256 of the leaf certificate's DER encoding.
    pub fingerprint: [u8; 32],
    /// The subject CN of the leaf certificate.
    pub common_name: Option<String>,
    /// End of the leaf certificate's validity, in Unix seconds.
    pub not_after: i64,
    /// Every trust path that accepted the certificate, never empty. The
    /// tenant CAs come first, then `tls.client_ca_file`, then the
    /// registration.
    pub grants: Vec<CertificateGrant>,
}

/// A CA registered by a tenant, with a verifier for chains to it.
struct DeviceCa {
    tenant_id: TenantId,
    fingerprint: [u8; 32],
    auto_create_devices: bool,
    /// Validity period in Unix seconds. Outside it the CA is skipped,
    /// because WebPKI does not check the validity of trust anchors.
    not_before: i64,
    not_after: i64,
    verifier: Arc<dyn ClientCertVerifier>,
}

/// Returns the SHA-256 of a CA's subject name and public key (both DER),
/// which identify the CA whichever certificate carries them: a chain
/// verifies against any certificate with the same subject and key.
pub fn ca_identity(certificate: &X509Ref) -> Result<[u8; 32], openssl::error::ErrorStack> {
    let mut bytes = certificate.subject_name().to_der()?;
    bytes.extend(certificate.public_key()?.public_key_to_der()?);
    Ok(super::sha256(&bytes))
}

/// Returns the identity ([`ca_identity`]) of one PEM certificate.
pub fn ca_identity_of_pem(pem: &str) -> Option<[u8; 32]> {
    let certificate = X509::from_pem(pem.as_bytes()).ok()?;
    ca_identity(&certificate).ok()
}

/// Checks that a certificate may issue others: basicConstraints with
/// CA:TRUE and, when it has a key usage extension, keyCertSign.
pub fn check_ca_extensions(certificate: &X509Ref) -> Result<(), String> {
    // SAFETY: the pointer is valid for the borrow of `certificate`; both
    // calls only compute and read the cached extension flags of OpenSSL.
    let (flags, key_usage) = unsafe {
        (
            openssl_sys::X509_get_extension_flags(certificate.as_ptr()),
            openssl_sys::X509_get_key_usage(certificate.as_ptr()),
        )
    };
    if flags & openssl_sys::EXFLAG_INVALID != 0 {
        return Err("the certificate has malformed or duplicate extensions".to_owned());
    }
    if flags & openssl_sys::EXFLAG_BCONS == 0 || flags & openssl_sys::EXFLAG_CA == 0 {
        return Err(
            "the certificate is not a CA: it needs the basicConstraints extension with CA:TRUE"
                .to_owned(),
        );
    }
    if flags & openssl_sys::EXFLAG_KUSAGE != 0
        && key_usage & openssl_sys::X509v3_KU_KEY_CERT_SIGN == 0
    {
        return Err(
            "the certificate's key usage extension lacks keyCertSign, so it cannot sign device certificates"
                .to_owned(),
        );
    }
    Ok(())
}

/// Converts an ASN.1 time to Unix seconds.
pub fn unix_seconds(time: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(time).ok()?;
    Some(i64::from(diff.days) * 86_400 + i64::from(diff.secs))
}

/// The CAs and certificates that authenticate devices over TLS.
pub struct DeviceTrust {
    provider: Arc<CryptoProvider>,
    /// Chains to `tls.client_ca_file`.
    client_ca_file: Option<Arc<dyn ClientCertVerifier>>,
    /// The identities ([`ca_identity`]) of the anchors of
    /// `tls.client_ca_file`, which tenants may not register.
    client_ca_file_identities: Vec<[u8; 32]>,
    /// CAs registered by tenants; the API updates them.
    device_cas: RwLock<Vec<DeviceCa>>,
    /// Registered certificates by fingerprint, shared with the DTLS
    /// listener.
    registered: Arc<DtlsCredentials>,
}

impl std::fmt::Debug for DeviceTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTrust")
            .field("client_ca_file", &self.client_ca_file.is_some())
            .field("device_cas", &self.device_cas.read().len())
            .finish()
    }
}

/// Builds a verifier that accepts chains to `roots` and lets clients
/// without a certificate through, so that the caller decides.
fn chain_verifier(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("cannot build the client certificate verifier")
}

/// Parses one PEM CA certificate into a verifier.
fn device_ca_verifier(
    pem: &str,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).context("invalid PEM certificate")?;
    let mut roots = RootCertStore::empty();
    roots
        .add(der)
        .context("the certificate cannot be used as a trust anchor")?;
    chain_verifier(roots, provider)
}

impl DeviceTrust {
    /// Creates the trust with the CAs of `client_ca_file` and no tenant
    /// CAs yet ([`DeviceTrust::reload`] loads them).
    pub fn new(
        provider: Arc<CryptoProvider>,
        client_ca_file: Option<&std::path::Path>,
        registered: Arc<DtlsCredentials>,
    ) -> anyhow::Result<Self> {
        let mut client_ca_file_identities = Vec::new();
        let client_ca_file = match client_ca_file {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| {
                    format!("cannot read tls.client_ca_file {}", path.display())
                })?;
                let mut roots = RootCertStore::empty();
                for der in CertificateDer::pem_slice_iter(&pem) {
                    let der = der.with_context(|| {
                        format!("tls.client_ca_file {} is not valid PEM", path.display())
                    })?;
                    let identity = X509::from_der(&der)
                        .and_then(|certificate| ca_identity(&certificate))
                        .with_context(|| {
                            format!(
                                "tls.client_ca_file {} contains a certificate that cannot be parsed",
                                path.display()
                            )
                        })?;
                    client_ca_file_identities.push(identity);
                    roots.add(der).with_context(|| {
                        format!(
                            "tls.client_ca_file {} contains a certificate that cannot be a trust anchor",
                            path.display()
                        )
                    })?;
                }
                anyhow::ensure!(
                    !roots.is_empty(),
                    "tls.client_ca_file {} contains no \"-----BEGIN CERTIFICATE-----\" block",
                    path.display()
                );
                Some(chain_verifier(roots, &provider)?)
            }
            None => None,
        };
        Ok(Self {
            provider,
            client_ca_file,
            client_ca_file_identities,
            device_cas: RwLock::new(Vec::new()),
            registered,
        })
    }

    /// Replaces the tenant CAs with every stored one. A stored CA that no
    /// longer parses is skipped and logged.
    pub async fn reload(&self, metadata: &SqliteMetadata) -> Result<(), MetadataError> {
        let mut loaded = Vec::new();
        for ca in metadata.all_device_cas().await? {
            if let Some(entry) = self.entry(&ca) {
                loaded.push(entry);
            }
        }
        *self.device_cas.write() = loaded;
        Ok(())
    }

    fn entry(&self, ca: &StoredDeviceCa) -> Option<DeviceCa> {
        let fingerprint = <[u8; 32]>::try_from(ca.fingerprint.as_slice()).ok()?;
        let loaded = device_ca_verifier(&ca.pem, &self.provider).and_then(|verifier| {
            let certificate = X509::from_pem(ca.pem.as_bytes())?;
            let validity = unix_seconds(certificate.not_before())
                .zip(unix_seconds(certificate.not_after()))
                .context("the validity period cannot be read")?;
            Ok((verifier, validity))
        });
        match loaded {
            Ok((verifier, (not_before, not_after))) => Some(DeviceCa {
                tenant_id: ca.tenant_id,
                fingerprint,
                auto_create_devices: ca.auto_create_devices,
                not_before,
                not_after,
                verifier,
            }),
            Err(error) => {
                tracing::warn!(
                    tenant_id = %ca.tenant_id,
                    fingerprint = hex::encode(fingerprint),
                    error = format!("{error:#}"),
                    "ignoring a stored device CA that cannot be loaded"
                );
                None
            }
        }
    }

    /// Checks that `pem` is one CA certificate that can be a trust anchor.
    pub fn check_ca_pem(&self, pem: &str) -> anyhow::Result<()> {
        device_ca_verifier(pem, &self.provider).map(|_| ())
    }

    /// Returns whether a CA with this identity ([`ca_identity`]) is an
    /// anchor of `tls.client_ca_file`.
    pub fn is_client_ca_file_anchor(&self, identity: &[u8; 32]) -> bool {
        self.client_ca_file_identities.contains(identity)
    }

    /// Adds a CA that a tenant registered.
    pub fn add_ca(&self, ca: &StoredDeviceCa) {
        if let Some(entry) = self.entry(ca) {
            let mut cas = self.device_cas.write();
            cas.retain(|existing| existing.fingerprint != entry.fingerprint);
            cas.push(entry);
        }
    }

    pub fn remove_ca(&self, fingerprint: &[u8]) {
        self.device_cas
            .write()
            .retain(|ca| ca.fingerprint.as_slice() != fingerprint);
    }

    /// Checks a client's certificate chain against every CA and the
    /// registered certificates. Rejects it when the paths that accept it
    /// lead to different tenants (see the module documentation).
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertificate, Error> {
        let fingerprint = super::sha256(end_entity);
        let leaf = X509::from_der(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let mut grants = Vec::new();

        // A specific error of a CA that the chain leads to, such as an
        // expired certificate, replaces "unknown issuer".
        let mut chain_error = None;
        // NOTE: each tenant CA is tried in turn, which costs one parse of
        // the chain per CA; an index by issuer name would be needed for
        // many thousands of CAs.
        for ca in self.device_cas.read().iter() {
            if now_secs < ca.not_before || now_secs >= ca.not_after {
                continue;
            }
            match ca
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                Ok(_) => grants.push(CertificateGrant::DeviceCa {
                    tenant_id: ca.tenant_id,
                    ca_fingerprint: ca.fingerprint,
                    auto_create_devices: ca.auto_create_devices,
                }),
                Err(error) => keep_specific_error(&mut chain_error, error),
            }
        }
        if let Some(verifier) = &self.client_ca_file {
            match verifier.verify_client_cert(end_entity, intermediates, now) {
                Ok(_) => grants.push(CertificateGrant::ClientCaFile),
                Err(error) => keep_specific_error(&mut chain_error, error),
            }
        }
        if let Some(owner) = self.registered.certificate(&fingerprint) {
            match check_validity(&leaf, now) {
                Ok(()) => grants.push(CertificateGrant::Registered(owner)),
                Err(error) => chain_error = Some(error),
            }
        }
        if grants.is_empty() {
            return Err(
                chain_error.unwrap_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))
            );
        }

        let mut tenants = grants.iter().filter_map(CertificateGrant::tenant);
        if let Some(first) = tenants.next()
            && let Some(other) = tenants.find(|tenant| *tenant != first)
        {
            tracing::warn!(
                fingerprint = hex::encode(fingerprint),
                tenant_id = %first,
                other_tenant_id = %other,
                "rejected a client certificate that is trusted for devices of two tenants; remove the registered CA or certificate that should not trust it"
            );
            return Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ClientCertificate {
            fingerprint,
            common_name: crate::adapters::coap::dtls::common_name(&leaf),
            not_after: unix_seconds(leaf.not_after()).unwrap_or(i64::MIN),
            grants,
        })
    }
}

/// Stores `error` unless it is "unknown issuer" and an error is stored.
fn keep_specific_error(kept: &mut Option<Error>, error: Error) {
    let unknown_issuer = matches!(
        error,
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    if kept.is_none() || !unknown_issuer {
        *kept = Some(error);
    }
}

/// Checks the validity period of a registered certificate, which no chain
/// verification covers.
fn check_validity(leaf: &openssl::x509::X509, now: UnixTime) -> Result<(), Error> {
    let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let now = openssl::asn1::Asn1Time::from_unix(now_secs)
        .map_err(|_| Error::General("cannot read the clock".to_owned()))?;
    if leaf.not_after() < now {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    if leaf.not_before() > now {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    Ok(())
}

/// The rustls client certificate verifier of the MQTT over TLS listener.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    trust: Arc<DeviceTrust>,
    mandatory: bool,
}

impl DeviceCertVerifier {
    pub fn new(trust: Arc<DeviceTrust>, mandatory: bool) -> Self {
        Self { trust, mandatory }
    }
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    // An empty list lets clients send whatever certificate they have,
    // because the registered certificates have no common issuer.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.trust
            .check(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.trust.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Failure to find the device of a certificate accepted at the handshake.
#[derive(Debug, thiserror::Error)]
pub enum DeviceLookupError {
    #[error(
        "the client certificate's subject CN {common_name:?} names no device of the CA's tenant, and the CA does not create devices"
    )]
    UnknownDevice { common_name: String },
    #[error(
        "the client certificate chains to tls.client_ca_file, but its subject CN {common_name:?} is not the id of a device"
    )]
    NotADeviceId { common_name: String },
    #[error("the client certificate has no subject CN to name its device")]
    MissingCommonName,
    #[error(
        "the client certificate's subject CN {common_name:?} is not a valid device name: it must be 1 to {MAX_DEVICE_NAME_BYTES} bytes without control characters"
    )]
    InvalidDeviceName { common_name: String },
    #[error("the device of the registered client certificate was deleted")]
    DeviceDeleted,
    #[error(
        "the client certificate is trusted for more than one device, through registered CAs, tls.client_ca_file or a registered fingerprint; it is rejected until an operator removes the registration that should not trust it"
    )]
    ConflictingOwners,
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

/// Finds, or creates when the CA allows it, the device that a client
/// certificate authenticates, and returns the credential to hold. Every
/// trust path must lead to the same device.
pub async fn resolve_device(
    metadata: &SqliteMetadata,
    certificate: &ClientCertificate,
) -> Result<(DeviceIdentity, HeldCredential), DeviceLookupError> {
    // The first device found, and the first auto-create CA whose tenant
    // has no device named by the CN yet.
    let mut found: Option<(crate::metadata::Device, CertificateTrust)> = None;
    let mut creatable = None;
    let mut first_error = None;
    for grant in &certificate.grants {
        match device_of_grant(metadata, certificate, grant).await {
            Ok(Some((device, trust))) => match &found {
                None => found = Some((device, trust)),
                Some((existing, _)) if existing.id == device.id => {}
                Some((existing, _)) => {
                    return Err(conflict(certificate, existing.id, Some(device.id)));
                }
            },
            Ok(None) => {
                if let CertificateGrant::DeviceCa {
                    tenant_id,
                    ca_fingerprint,
                    ..
                } = grant
                {
                    creatable.get_or_insert((*tenant_id, *ca_fingerprint));
                }
            }
            Err(DeviceLookupError::Metadata(error)) => return Err(error.into()),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }

    let (device, trust) = match (found, creatable) {
        (Some((device, _)), Some(_)) => return Err(conflict(certificate, device.id, None)),
        (Some(found), None) => found,
        (None, Some((tenant_id, ca_fingerprint))) => {
            let common_name = certificate
                .common_name
                .clone()
                .ok_or(DeviceLookupError::MissingCommonName)?;
            if !is_valid_device_name(&common_name) {
                return Err(DeviceLookupError::InvalidDeviceName { common_name });
            }
            let device = create_device(metadata, tenant_id, &common_name, &ca_fingerprint).await?;
            (device, CertificateTrust::DeviceCa(ca_fingerprint))
        }
        (None, None) => return Err(first_error.unwrap_or(DeviceLookupError::MissingCommonName)),
    };
    let identity = DeviceIdentity {
        tenant_id: device.tenant_id,
        device_id: device.id,
        name: device.name,
        profile_id: device.profile_id,
    };
    let credential = HeldCredential::Certificate {
        fingerprint: certificate.fingerprint,
        device: identity.device_id,
        trust,
        not_after: certificate.not_after,
    };
    Ok((identity, credential))
}

/// Logs a certificate whose trust paths lead to different devices and
/// returns the error. `other` is `None` for a device that an auto-create
/// CA would create.
fn conflict(
    certificate: &ClientCertificate,
    device: DeviceId,
    other: Option<DeviceId>,
) -> DeviceLookupError {
    tracing::warn!(
        fingerprint = hex::encode(certificate.fingerprint),
        device_id = %device,
        other_device_id = other.map(|id| id.to_string()).unwrap_or_else(|| "a new device of an auto-create CA".to_owned()),
        "rejected a client certificate that is trusted for two devices; remove the registered CA or certificate that should not trust it"
    );
    DeviceLookupError::ConflictingOwners
}

/// Returns the device that one trust path leads to, or `None` for a CA
/// with `auto_create_devices` whose tenant has no device named by the CN.
async fn device_of_grant(
    metadata: &SqliteMetadata,
    certificate: &ClientCertificate,
    grant: &CertificateGrant,
) -> Result<Option<(crate::metadata::Device, CertificateTrust)>, DeviceLookupError> {
    let common_name = || {
        certificate
            .common_name
            .clone()
            .ok_or(DeviceLookupError::MissingCommonName)
    };
    match grant {
        CertificateGrant::Registered(owner) => {
            let device = metadata
                .device_by_id_any_tenant(owner.device_id)
                .await?
                .filter(|device| device.tenant_id == owner.tenant_id)
                .ok_or(DeviceLookupError::DeviceDeleted)?;
            Ok(Some((device, CertificateTrust::Registered)))
        }
        CertificateGrant::ClientCaFile => {
            let common_name = common_name()?;
            let device = match common_name.parse::<DeviceId>() {
                Ok(id) => metadata.device_by_id_any_tenant(id).await?,
                Err(_) => None,
            };
            let device = device.ok_or(DeviceLookupError::NotADeviceId { common_name })?;
            Ok(Some((device, CertificateTrust::ClientCaFile)))
        }
        CertificateGrant::DeviceCa {
            tenant_id,
            ca_fingerprint,
            auto_create_devices,
        } => {
            let common_name = common_name()?;
            match device_of_tenant(metadata, *tenant_id, &common_name).await? {
                Some(device) => Ok(Some((device, CertificateTrust::DeviceCa(*ca_fingerprint)))),
                None if *auto_create_devices => Ok(None),
                None => Err(DeviceLookupError::UnknownDevice { common_name }),
            }
        }
    }
}

/// Longest device name in bytes, as for names given through the API.
const MAX_DEVICE_NAME_BYTES: usize = 128;

/// Applies the rules of device names from the API to a certificate's CN.
fn is_valid_device_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_DEVICE_NAME_BYTES
        && !name.chars().any(char::is_control)
}

/// Returns the tenant's device whose id or, failing that, name is
/// `common_name`.
async fn device_of_tenant(
    metadata: &SqliteMetadata,
    tenant: TenantId,
    common_name: &str,
) -> Result<Option<crate::metadata::Device>, MetadataError> {
    if let Ok(id) = common_name.parse::<DeviceId>() {
        match metadata.device(tenant, id).await {
            Ok(device) => return Ok(Some(device)),
            Err(MetadataError::NotFound(_)) => {}
            Err(error) => return Err(error),
        }
    }
    metadata.device_by_name(tenant, common_name).await
}

/// Creates a device named `name` for a certificate of an auto-create CA. Its
/// access token is random and never shown, so the certificate is its only
/// credential until the token is rotated through the API.
async fn create_device(
    metadata: &SqliteMetadata,
    tenant: TenantId,
    name: &str,
    ca_fingerprint: &[u8; 32],
) -> Result<crate::metadata::Device, MetadataError> {
    let token = crate::auth::generate_device_token();
    match metadata
        .create_device(tenant, name, &crate::auth::hash_secret(&token))
        .await
    {
        Ok(device) => {
            tracing::info!(
                tenant_id = %tenant,
                device_id = %device.id,
                device_name = name,
                ca_fingerprint = hex::encode(ca_fingerprint),
                "created a device for a client certificate of an auto-create CA"
            );
            Ok(device)
        }
        // Another connection of the same device created it first.
        Err(MetadataError::Conflict(_)) => metadata
            .device_by_name(tenant, name)
            .await?
            .ok_or(MetadataError::NotFound("device")),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::credentials::StoredCertificate;

    /// Builds a self-signed P-256 certificate for `common_name`, valid
    /// from `not_before` to `not_after` (Unix seconds), with its DER.
    fn self_signed(common_name: &str, not_before: i64, not_after: i64) -> Vec<u8> {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::nid::Nid;
        use openssl::pkey::PKey;

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, common_name)
            .unwrap();
        let name = name.build();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        let not_before = openssl::asn1::Asn1Time::from_unix(not_before).unwrap();
        let not_after = openssl::asn1::Asn1Time::from_unix(not_after).unwrap();
        builder.set_not_before(&not_before).unwrap();
        builder.set_not_after(&not_after).unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        builder.build().to_der().unwrap()
    }

    fn register(registered: &DtlsCredentials, der: &[u8], device: DeviceId, tenant: TenantId) {
        registered.add_certificate(&StoredCertificate {
            fingerprint: super::super::sha256(der).to_vec(),
            device_id: device,
            tenant_id: tenant,
            subject: String::new(),
            not_after: 0,
            pem: String::new(),
            created_at: 0,
        });
    }

    fn now_secs() -> i64 {
        i64::try_from(UnixTime::now().as_secs()).unwrap()
    }

    #[test]
    fn registered_certificate_is_checked() {
        let registered = Arc::new(DtlsCredentials::default());
        let trust = DeviceTrust::new(super::super::provider(), None, registered.clone()).unwrap();
        let device = DeviceId::new_random();
        let tenant = TenantId::new_random();
        let now = now_secs();
        let valid = self_signed("camera-1", now - 60, now + 3600);
        let expired = self_signed("camera-1", now - 7200, now - 3600);
        let future = self_signed("camera-1", now + 3600, now + 7200);

        let error = trust
            .check(&CertificateDer::from(valid.clone()), &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(
            error,
            Error::InvalidCertificate(CertificateError::UnknownIssuer),
            "an unregistered self-signed certificate"
        );

        for der in [&valid, &expired, &future] {
            register(&registered, der, device, tenant);
        }
        let accepted = trust
            .check(&CertificateDer::from(valid.clone()), &[], UnixTime::now())
            .unwrap();
        assert_eq!(
            accepted.grants,
            vec![CertificateGrant::Registered(CredentialOwner {
                tenant_id: tenant,
                device_id: device,
            })]
        );
        assert_eq!(accepted.common_name.as_deref(), Some("camera-1"));
        let error = trust
            .check(&CertificateDer::from(expired), &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(error, Error::InvalidCertificate(CertificateError::Expired));
        let error = trust
            .check(&CertificateDer::from(future), &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(
            error,
            Error::InvalidCertificate(CertificateError::NotValidYet)
        );

        registered.remove_certificate(&super::super::sha256(&valid));
        assert!(
            trust
                .check(&CertificateDer::from(valid), &[], UnixTime::now())
                .is_err(),
            "a removed registration is refused"
        );
    }

    /// A CA made by `ferrite certs init`, with a leaf for `sensor-9` valid
    /// for one day.
    struct TestCa {
        _dir: tempfile::TempDir,
        pem: String,
        fingerprint: [u8; 32],
        leaf: CertificateDer<'static>,
    }

    impl TestCa {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            crate::certs::init(dir.path(), &[], 1).unwrap();
            crate::certs::device(dir.path(), "sensor-9", 1).unwrap();
            let pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            let leaf =
                CertificateDer::from_pem_file(dir.path().join("device-sensor-9.pem")).unwrap();
            Self {
                _dir: dir,
                fingerprint: super::super::sha256(&der),
                pem,
                leaf,
            }
        }

        fn stored(&self, tenant: TenantId) -> StoredDeviceCa {
            StoredDeviceCa {
                fingerprint: self.fingerprint.to_vec(),
                tenant_id: tenant,
                subject: String::new(),
                not_after: 0,
                pem: self.pem.clone(),
                auto_create_devices: true,
                created_at: 0,
            }
        }
    }

    #[test]
    fn paths_to_two_tenants_are_rejected() {
        let ca = TestCa::new();
        let registered = Arc::new(DtlsCredentials::default());
        let trust = DeviceTrust::new(super::super::provider(), None, registered.clone()).unwrap();
        let tenant = TenantId::new_random();
        trust.add_ca(&ca.stored(tenant));
        let accepted = trust.check(&ca.leaf, &[], UnixTime::now()).unwrap();
        assert_eq!(
            accepted.grants,
            vec![CertificateGrant::DeviceCa {
                tenant_id: tenant,
                ca_fingerprint: ca.fingerprint,
                auto_create_devices: true,
            }]
        );

        // Someone registers the (public) certificate on a device of theirs.
        let other_tenant = TenantId::new_random();
        register(&registered, &ca.leaf, DeviceId::new_random(), other_tenant);
        let error = trust.check(&ca.leaf, &[], UnixTime::now()).unwrap_err();
        assert_eq!(
            error,
            Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure),
            "a CA of one tenant and a registration of another"
        );

        // A registration in the CA's own tenant adds a path; the device
        // lookup then checks that both lead to the same device.
        let own_device = DeviceId::new_random();
        register(&registered, &ca.leaf, own_device, tenant);
        let accepted = trust.check(&ca.leaf, &[], UnixTime::now()).unwrap();
        assert_eq!(accepted.grants.len(), 2, "{:?}", accepted.grants);

        trust.remove_ca(&ca.fingerprint);
        let accepted = trust.check(&ca.leaf, &[], UnixTime::now()).unwrap();
        assert_eq!(
            accepted.grants,
            vec![CertificateGrant::Registered(CredentialOwner {
                tenant_id: tenant,
                device_id: own_device,
            })],
            "without the CA only the registration is left"
        );
    }

    #[test]
    fn same_ca_in_two_tenants_is_rejected() {
        let ca = TestCa::new();
        let registered = Arc::new(DtlsCredentials::default());
        let trust = DeviceTrust::new(super::super::provider(), None, registered).unwrap();
        trust.add_ca(&ca.stored(TenantId::new_random()));
        // The same CA under another fingerprint, as a re-encoded copy
        // would have.
        let mut copy = ca.stored(TenantId::new_random());
        copy.fingerprint = vec![7; 32];
        trust.add_ca(&copy);
        let error = trust.check(&ca.leaf, &[], UnixTime::now()).unwrap_err();
        assert_eq!(
            error,
            Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
        );
    }

    #[test]
    fn expired_device_ca_is_skipped() {
        let ca = TestCa::new();
        let registered = Arc::new(DtlsCredentials::default());
        let trust = DeviceTrust::new(super::super::provider(), None, registered).unwrap();
        trust.add_ca(&ca.stored(TenantId::new_random()));
        // `ferrite certs init` makes a CA valid for 3650 days.
        let after_ca_expiry = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            UnixTime::now().as_secs() + 3700 * 86_400,
        ));
        // With the CA tried, WebPKI would report the expired leaf instead.
        let error = trust.check(&ca.leaf, &[], after_ca_expiry).unwrap_err();
        assert_eq!(
            error,
            Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );
    }

    #[test]
    fn ca_extensions_are_checked() {
        let ca = TestCa::new();
        let ca_certificate = X509::from_pem(ca.pem.as_bytes()).unwrap();
        assert_eq!(check_ca_extensions(&ca_certificate), Ok(()));
        let leaf = X509::from_der(&ca.leaf).unwrap();
        assert!(check_ca_extensions(&leaf).is_err(), "a device certificate");
        let now = now_secs();
        let bare = X509::from_der(&self_signed("no-extensions", now - 60, now + 60)).unwrap();
        assert!(
            check_ca_extensions(&bare).is_err(),
            "a certificate without basicConstraints"
        );
    }

    #[test]
    fn ca_identity_ignores_encoding() {
        let ca = TestCa::new();
        let certificate = X509::from_pem(ca.pem.as_bytes()).unwrap();
        let identity = ca_identity(&certificate).unwrap();
        assert_eq!(ca_identity_of_pem(&ca.pem), Some(identity));
        let other = TestCa::new();
        assert_ne!(ca_identity_of_pem(&other.pem), Some(identity));
    }

    #[test]
    fn device_names_from_certificates_are_checked() {
        assert!(is_valid_device_name("truck-7"));
        assert!(!is_valid_device_name(" "));
        assert!(!is_valid_device_name("a\u{7}b"));
        assert!(!is_valid_device_name(&"x".repeat(129)));
    }
}
