//! DTLS credentials of a device: its pre-shared key and its registered
//! client certificates. Admins and operators only; the key is never
//! returned.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use openssl::x509::X509;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::auth::Principal;
use crate::auth::revocation::Revoked;
use crate::ids::DeviceId;
use crate::metadata::credentials::{NewCertificate, StoredPsk, psk_seal_context};
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;

/// Longest PSK identity in bytes. RFC 4279 allows 2^16 - 1, but OpenSSL 3.0
/// accepts at most 256 (`PSK_MAX_IDENTITY_LEN` in `openssl/ssl.h`).
const MAX_IDENTITY_BYTES: usize = 256;
/// Shortest accepted key: 128 bits, the key size of the AES-128 suites.
const MIN_KEY_BYTES: usize = 16;
/// Longest accepted key. OpenSSL 3.0 takes up to 512 bytes
/// (`PSK_MAX_PSK_LEN`), but 64 bytes (512 bits) is far beyond the strength
/// of the AES-128 suites.
const MAX_KEY_BYTES: usize = 64;
/// Largest certificate body accepted.
const MAX_PEM_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PskRequest {
    identity: String,
    key: String,
}

fn psk_json(psk: &StoredPsk) -> serde_json::Value {
    json!({
        "device_id": psk.device_id,
        "identity": String::from_utf8_lossy(&psk.identity),
        "created_at": psk.created_at,
    })
}

fn parse_psk_request(body: &[u8]) -> Result<(String, Vec<u8>), ApiError> {
    let request: PskRequest = serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"identity\" and \"key\" (hex): {error}"
        ))
    })?;
    let identity = request.identity;
    if identity.is_empty()
        || identity.len() > MAX_IDENTITY_BYTES
        || identity.chars().any(char::is_control)
    {
        return Err(ApiError::invalid_param(
            "identity",
            format!("identity must be 1 to {MAX_IDENTITY_BYTES} bytes without control characters"),
        ));
    }
    let key = hex::decode(request.key.trim()).map_err(|error| {
        ApiError::invalid_param(
            "key",
            format!(
                "key must be hex digits, such as the output of `openssl rand -hex 16`: {error}"
            ),
        )
    })?;
    if !(MIN_KEY_BYTES..=MAX_KEY_BYTES).contains(&key.len()) {
        return Err(ApiError::invalid_param(
            "key",
            format!(
                "key has {} bytes; it must have {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes ({} to {} hex digits)",
                key.len(),
                MIN_KEY_BYTES * 2,
                MAX_KEY_BYTES * 2
            ),
        ));
    }
    Ok((identity, key))
}

/// `PUT /api/v1/devices/{id}/credentials/psk`: sets or replaces the
/// device's pre-shared key.
pub async fn set_psk(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let (identity, key) = parse_psk_request(&body)?;
    let sealed = state
        .keyring
        .seal(principal.tenant_id, &psk_seal_context(id), &key)
        .await
        .map_err(|error| {
            tracing::error!(tenant_id = %principal.tenant_id, %error, "cannot seal the device's pre-shared key");
            ApiError::internal()
        })?;
    let stored = state
        .metadata
        .set_device_psk(principal.tenant_id, id, identity.as_bytes(), &sealed)
        .await?;
    state.dtls_credentials.set_psk(&stored);
    // Sessions of the replaced key end; sessions of the new one stay,
    // because each session checks whether its own key is still current.
    state.auth.revocations().publish(Revoked::PreSharedKey(id));
    tracing::info!(device_id = %id, by = %principal.subject, "device PSK set");
    Ok(Json(psk_json(&stored)))
}

/// `GET /api/v1/devices/{id}/credentials/psk`: the PSK identity, without
/// the key.
pub async fn get_psk(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let stored = state
        .metadata
        .device_psk(principal.tenant_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device {id} has no pre-shared key")))?;
    Ok(Json(psk_json(&stored)))
}

/// `DELETE /api/v1/devices/{id}/credentials/psk`: removes the device's
/// pre-shared key; new handshakes with it fail and its sessions end at once.
pub async fn delete_psk(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let deleted = state
        .metadata
        .delete_device_psk(principal.tenant_id, id)
        .await?;
    if !deleted {
        return Err(ApiError::not_found(format!(
            "device {id} has no pre-shared key"
        )));
    }
    state.dtls_credentials.remove_psk(id);
    state.auth.revocations().publish(Revoked::PreSharedKey(id));
    tracing::info!(device_id = %id, by = %principal.subject, "device PSK deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateRequest {
    pem: String,
}

/// Parses one PEM certificate to register on `device` and returns what is
/// stored of it. A certificate whose subject CN is a device id may be
/// registered only on that device, because the DTLS listener lets a
/// CA-verified CN name its device before any registered fingerprint.
fn parse_certificate(pem: &str, device: DeviceId) -> Result<NewCertificate, ApiError> {
    let invalid = |detail: String| ApiError::invalid_param("pem", detail);
    if pem.len() > MAX_PEM_BYTES {
        return Err(invalid(format!(
            "pem has {} bytes; a certificate must fit in {MAX_PEM_BYTES}",
            pem.len()
        )));
    }
    let certificates = X509::stack_from_pem(pem.as_bytes()).map_err(|error| {
        invalid(format!(
            "pem is not a PEM certificate (\"-----BEGIN CERTIFICATE-----\"): {error}"
        ))
    })?;
    let [certificate] = certificates.as_slice() else {
        return Err(invalid(format!(
            "pem contains {} certificates; register the device's own certificate only, without its chain",
            certificates.len()
        )));
    };
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|_| ApiError::internal())?;
    if certificate.not_after() < now {
        return Err(invalid(format!(
            "the certificate expired at {}; issue a new one",
            certificate.not_after()
        )));
    }
    let named_device = crate::adapters::coap::dtls::common_name(certificate)
        .and_then(|name| name.parse::<DeviceId>().ok());
    if let Some(named_device) = named_device
        && named_device != device
    {
        return Err(invalid(format!(
            "the certificate's subject CN is the device id {named_device}, not {device}; register it on device {named_device}, or issue a certificate whose CN is {device}"
        )));
    }
    let fingerprint =
        crate::adapters::coap::dtls::fingerprint(certificate).ok_or_else(ApiError::internal)?;
    let subject = certificate
        .subject_name()
        .entries()
        .map(|entry| {
            let name = entry.object().nid().short_name().unwrap_or("?");
            let value = String::from_utf8_lossy(entry.data().as_slice()).into_owned();
            format!("{name}={value}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let not_after = asn1_time_ms(certificate.not_after()).ok_or_else(ApiError::internal)?;
    let pem = String::from_utf8(certificate.to_pem().map_err(|_| ApiError::internal())?)
        .map_err(|_| ApiError::internal())?;
    Ok(NewCertificate {
        fingerprint,
        subject,
        not_after,
        pem,
    })
}

/// Converts an ASN.1 time to epoch milliseconds.
pub(super) fn asn1_time_ms(time: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let diff = epoch.diff(time).ok()?;
    Some((i64::from(diff.days) * 86_400 + i64::from(diff.secs)) * 1000)
}

/// `POST /api/v1/devices/{id}/credentials/certificates`: registers a client
/// certificate by its SHA-256 fingerprint.
pub async fn add_certificate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let request: CertificateRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"pem\", the device's certificate in PEM: {error}"
        ))
    })?;
    let certificate = parse_certificate(&request.pem, id)?;
    let stored = state
        .metadata
        .add_device_certificate(principal.tenant_id, id, &certificate)
        .await?;
    state.dtls_credentials.add_certificate(&stored);
    tracing::info!(
        device_id = %id,
        fingerprint = hex::encode(&stored.fingerprint),
        by = %principal.subject,
        "device certificate registered"
    );
    Ok((StatusCode::CREATED, Json(json!(stored))))
}

/// `GET /api/v1/devices/{id}/credentials/certificates`: the registered
/// certificates, the oldest first.
pub async fn list_certificates(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let certificates = state
        .metadata
        .device_certificates(principal.tenant_id, id)
        .await?;
    Ok(Json(json!({ "certificates": certificates })))
}

/// `DELETE /api/v1/devices/{id}/credentials/certificates/{fingerprint}`:
/// unregisters one certificate; new handshakes with it fail and its
/// sessions end at once.
pub async fn delete_certificate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path((id, fingerprint)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let digest = hex::decode(fingerprint.replace(':', ""))
        .ok()
        .filter(|digest| digest.len() == 32)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "certificate {fingerprint:?} not found: certificates are named by their SHA-256 fingerprint in 64 hex digits"
            ))
        })?;
    let deleted = state
        .metadata
        .delete_device_certificate(principal.tenant_id, id, &digest)
        .await?;
    if !deleted {
        return Err(ApiError::not_found(format!(
            "certificate {fingerprint} is not registered on device {id}"
        )));
    }
    state.dtls_credentials.remove_certificate(&digest);
    if let Ok(fingerprint) = <[u8; 32]>::try_from(digest.as_slice()) {
        state
            .auth
            .revocations()
            .publish(Revoked::Certificate(fingerprint));
    }
    tracing::info!(device_id = %id, fingerprint, by = %principal.subject, "device certificate deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_request_is_checked() {
        let cases = [
            (
                r#"{"identity": "", "key": "00112233445566778899aabbccddeeff"}"#,
                "identity",
            ),
            (
                r#"{"identity": "a\u0001", "key": "00112233445566778899aabbccddeeff"}"#,
                "identity",
            ),
            (r#"{"identity": "a", "key": "xyz"}"#, "key"),
            (r#"{"identity": "a", "key": "0011"}"#, "key"),
        ];
        for (body, param) in cases {
            let error = parse_psk_request(body.as_bytes()).expect_err(body);
            assert_eq!(error.param, Some(param), "{body}");
        }
        let (identity, key) = parse_psk_request(
            br#"{"identity": "dev-1", "key": "00112233445566778899AABBCCDDEEFF"}"#,
        )
        .unwrap();
        assert_eq!(identity, "dev-1");
        assert_eq!(key.len(), 16);
        let error = parse_psk_request(br#"{"identity": "a"}"#).expect_err("missing key");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
    }

    /// A self-signed P-256 certificate with subject `CN={common_name}`.
    fn self_signed_pem(common_name: &str) -> String {
        use openssl::ec::{EcGroup, EcKey};
        use openssl::nid::Nid;
        use openssl::pkey::PKey;

        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_nid(Nid::COMMONNAME, common_name)
            .unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        let not_before = openssl::asn1::Asn1Time::days_from_now(0).unwrap();
        let not_after = openssl::asn1::Asn1Time::days_from_now(1).unwrap();
        builder.set_not_before(&not_before).unwrap();
        builder.set_not_after(&not_after).unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
    }

    #[test]
    fn certificate_pem_is_checked() {
        let device = DeviceId::new_random();
        let error = parse_certificate("not a pem", device).expect_err("garbage");
        assert_eq!(error.param, Some("pem"));

        let other_device = DeviceId::new_random();
        let pem = self_signed_pem(&other_device.to_string());
        let error = parse_certificate(&pem, device).expect_err("CN of another device");
        assert_eq!(error.param, Some("pem"));
        assert!(
            error.detail.contains(&other_device.to_string()),
            "{}",
            error.detail
        );

        let pem = self_signed_pem(&device.to_string());
        let parsed = parse_certificate(&pem, device).expect("CN of this device");
        assert!(parsed.subject.contains(&device.to_string()));
        let pem = self_signed_pem("camera-1");
        parse_certificate(&pem, device).expect("CN that is not a device id");
    }
}
