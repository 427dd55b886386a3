//! Device CAs of a tenant: client certificates that chain to one of them
//! authenticate the tenant's devices over MQTT over TLS (see
//! `crate::tls::client_auth`). Admins only, because a CA can create
//! devices. A CA is named by the SHA-256 fingerprint of its DER encoding,
//! and is unique on the server by its subject and public key, because any
//! certificate with the same subject and key verifies the same chains.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use openssl::x509::X509;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::auth::Principal;
use crate::auth::revocation::Revoked;
use crate::metadata::MetadataError;
use crate::metadata::Role;
use crate::metadata::device_cas::NewDeviceCa;
use crate::server::AppState;

/// Largest CA certificate body accepted.
const MAX_PEM_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceCaRequest {
    pem: String,
    #[serde(default)]
    auto_create_devices: bool,
}

/// Parses one PEM CA certificate and returns what is stored of it.
fn parse_ca(request: DeviceCaRequest, state: &AppState) -> Result<NewDeviceCa, ApiError> {
    let invalid = |detail: String| ApiError::invalid_param("pem", detail);
    if request.pem.len() > MAX_PEM_BYTES {
        return Err(invalid(format!(
            "pem has {} bytes; a CA certificate must fit in {MAX_PEM_BYTES}",
            request.pem.len()
        )));
    }
    let certificates = X509::stack_from_pem(request.pem.as_bytes()).map_err(|error| {
        invalid(format!(
            "pem is not a PEM certificate (\"-----BEGIN CERTIFICATE-----\"): {error}"
        ))
    })?;
    let [certificate] = certificates.as_slice() else {
        return Err(invalid(format!(
            "pem contains {} certificates; register one CA certificate per request",
            certificates.len()
        )));
    };
    crate::tls::client_auth::check_ca_extensions(certificate).map_err(invalid)?;
    let now = openssl::asn1::Asn1Time::days_from_now(0).map_err(|_| ApiError::internal())?;
    if certificate.not_after() <= now {
        return Err(invalid(format!(
            "the CA certificate expired at {}; register a valid one",
            certificate.not_after()
        )));
    }
    if certificate.not_before() > now {
        return Err(invalid(format!(
            "the CA certificate is not valid before {}; register it from then on",
            certificate.not_before()
        )));
    }
    let identity =
        crate::tls::client_auth::ca_identity(certificate).map_err(|_| ApiError::internal())?;
    if let Some(trust) = &state.device_trust
        && trust.is_client_ca_file_anchor(&identity)
    {
        return Err(ApiError::from(MetadataError::Conflict(
            "the CA has the subject and public key of a CA in the server's tls.client_ca_file, which already authenticates devices of every tenant by device id; issue device certificates from a CA of your own".to_owned(),
        )));
    }
    let der = certificate.to_der().map_err(|_| ApiError::internal())?;
    let pem = String::from_utf8(certificate.to_pem().map_err(|_| ApiError::internal())?)
        .map_err(|_| ApiError::internal())?;
    // The same parser as at the handshake, so a stored CA always loads.
    if let Some(trust) = &state.device_trust {
        trust.check_ca_pem(&pem).map_err(|error| {
            invalid(format!(
                "the certificate cannot be a trust anchor: {error:#}"
            ))
        })?;
    }
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
    let not_after =
        super::credentials::asn1_time_ms(certificate.not_after()).ok_or_else(ApiError::internal)?;
    Ok(NewDeviceCa {
        fingerprint: crate::tls::sha256(&der),
        identity,
        subject,
        not_after,
        pem,
        auto_create_devices: request.auto_create_devices,
    })
}

/// Decodes a fingerprint path segment: 64 hex digits, colons allowed.
fn parse_fingerprint(text: &str) -> Result<Vec<u8>, ApiError> {
    hex::decode(text.replace(':', ""))
        .ok()
        .filter(|digest| digest.len() == 32)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "device CA {text:?} not found: device CAs are named by their SHA-256 fingerprint in 64 hex digits"
            ))
        })
}

/// `POST /api/v1/device-cas`: registers a CA for the tenant's device
/// certificates.
pub async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Admin)?;
    let request: DeviceCaRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"pem\", the CA certificate in PEM, and optionally \"auto_create_devices\" (boolean): {error}"
        ))
    })?;
    let ca = parse_ca(request, &state)?;

    // Serializes the check for a CA with the same subject and key and the
    // insert, within this process.
    static REGISTRATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _registration = REGISTRATION.lock().await;
    let duplicate = state.metadata.all_device_cas().await?.iter().any(|stored| {
        crate::tls::client_auth::ca_identity_of_pem(&stored.pem) == Some(ca.identity)
    });
    if duplicate {
        // The same message whichever tenant has the CA, so it reveals
        // nothing about other tenants.
        return Err(ApiError::from(MetadataError::Conflict(
            "a CA with the same subject and public key is already registered; a CA can be registered by only one tenant of the server, so issue device certificates from a CA of your own".to_owned(),
        )));
    }
    let stored = state
        .metadata
        .add_device_ca(principal.tenant_id, &ca)
        .await?;
    if let Some(trust) = &state.device_trust {
        trust.add_ca(&stored);
    }
    tracing::info!(
        tenant_id = %principal.tenant_id,
        fingerprint = hex::encode(&stored.fingerprint),
        auto_create_devices = stored.auto_create_devices,
        by = %principal.subject,
        "device CA registered"
    );
    Ok((StatusCode::CREATED, Json(json!(stored))))
}

/// `GET /api/v1/device-cas`: the tenant's device CAs, the oldest first.
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let cas = state.metadata.device_cas(principal.tenant_id).await?;
    Ok(Json(json!({ "device_cas": cas })))
}

/// `GET /api/v1/device-cas/{fingerprint}`.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(fingerprint): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let digest = parse_fingerprint(&fingerprint)?;
    let ca = state
        .metadata
        .device_ca(principal.tenant_id, &digest)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("device CA {fingerprint} not found")))?;
    Ok(Json(json!(ca)))
}

/// `DELETE /api/v1/device-cas/{fingerprint}`: new handshakes with its
/// certificates fail, and open connections that authenticated with them
/// end.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(fingerprint): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let digest = parse_fingerprint(&fingerprint)?;
    let deleted = state
        .metadata
        .delete_device_ca(principal.tenant_id, &digest)
        .await?;
    if !deleted {
        return Err(ApiError::not_found(format!(
            "device CA {fingerprint} not found"
        )));
    }
    if let Some(trust) = &state.device_trust {
        trust.remove_ca(&digest);
    }
    if let Ok(digest) = <[u8; 32]>::try_from(digest.as_slice()) {
        state
            .auth
            .revocations()
            .publish(Revoked::Certificate(digest));
    }
    tracing::info!(
        tenant_id = %principal.tenant_id,
        fingerprint,
        by = %principal.subject,
        "device CA deleted"
    );
    Ok(StatusCode::NO_CONTENT)
}
