//! Device profiles: create, read, update, delete, export and import as YAML
//! or JSON, and a dry run of a profile on a sample payload.
//!
//! - `GET /api/v1/profiles[?format=yaml]`: every profile of the tenant.
//! - `POST /api/v1/profiles`: creates one profile from a JSON or YAML body
//!   (by `Content-Type`).
//! - `GET|PUT|DELETE /api/v1/profiles/{id or name}[?format=yaml]`.
//! - `POST /api/v1/profiles/import`: creates or replaces profiles by name
//!   from a file of several (YAML documents or a JSON array). Every profile
//!   is checked before any is saved.
//! - `POST /api/v1/profiles/test`: decodes, transforms and validates a
//!   sample payload with a stored profile or one in the request, without
//!   storing anything.
//!
//! Reading needs the viewer role, testing the operator role and changing
//! profiles the admin role, because profiles carry scripts and actions.
//!
//! Webhook secrets and header values are sealed before a profile is stored
//! and shown as `<set>`; sending `<set>` back keeps the stored value (see
//! `actions/secrets.rs`).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::actions::secrets::{self, SecretError};
use crate::auth::Principal;
use crate::ids::{ProfileId, TenantId};
use crate::ingest::{ContentType, Envelope, Protocol};
use crate::metadata::Role;
use crate::metadata::profiles::StoredProfile;
use crate::profiles::{CompiledProfile, DocumentFormat, ProfileSpec, Record};
use crate::server::AppState;

/// Largest profile file the import takes, in bytes.
const MAX_IMPORT_BYTES: usize = 4 * 1024 * 1024;

/// Finds a profile of the tenant by id or name.
pub async fn find(
    state: &AppState,
    tenant: TenantId,
    reference: &str,
) -> Result<StoredProfile, ApiError> {
    if let Ok(id) = reference.parse::<ProfileId>() {
        return Ok(state.metadata.profile(tenant, id).await?);
    }
    state
        .metadata
        .profile_by_name(tenant, reference)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("profile {reference:?} not found")))
}

fn profile_json(profile: &StoredProfile) -> serde_json::Value {
    json!({
        "id": profile.id,
        "name": profile.spec.name,
        "version": profile.version,
        "created_at": profile.created_at,
        "updated_at": profile.updated_at,
        "spec": secrets::redact_profile(&profile.spec),
    })
}

/// Seals the webhook secrets of a profile a client sent; `existing` is the
/// stored version whose values `<set>` keeps.
async fn seal_secrets(
    state: &AppState,
    tenant: TenantId,
    spec: &mut ProfileSpec,
    existing: Option<&ProfileSpec>,
) -> Result<(), ApiError> {
    match secrets::seal_profile(&state.keyring, tenant, spec, existing).await {
        Ok(()) => Ok(()),
        Err(SecretError::Keyring(error)) => {
            tracing::error!(tenant_id = %tenant, %error, "cannot seal the webhook secrets of a profile");
            Err(ApiError::internal())
        }
        Err(error) => Err(ApiError::invalid_document(
            "Invalid profile",
            vec![format!("profile {:?}: {error}", spec.name)],
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatParams {
    format: Option<String>,
}

fn wants_yaml(params: &FormatParams, headers: &HeaderMap) -> Result<bool, ApiError> {
    match params.format.as_deref() {
        Some("yaml") => return Ok(true),
        Some("json") => return Ok(false),
        Some(other) => {
            return Err(ApiError::invalid_param(
                "format",
                format!("unknown format {other:?}; use json or yaml"),
            ));
        }
        None => {}
    }
    Ok(headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("yaml")))
}

fn body_format(headers: &HeaderMap) -> DocumentFormat {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    if content_type.contains("yaml") {
        DocumentFormat::Yaml
    } else {
        DocumentFormat::Json
    }
}

fn yaml_response(text: String) -> Response {
    ([(header::CONTENT_TYPE, "application/yaml")], text).into_response()
}

/// Reads the profile documents of a request body.
fn read_documents(headers: &HeaderMap, body: &[u8]) -> Result<Vec<ProfileSpec>, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the body is not valid UTF-8 text"))?;
    crate::profiles::parse_documents(text, body_format(headers))
        .map_err(|message| ApiError::invalid_document("Invalid profile", vec![message]))
}

/// Compiles a profile document, or returns every problem as a 422.
/// Compiling a script runs its top level for up to its time limit, so it
/// runs off the async threads.
async fn check(spec: ProfileSpec) -> Result<CompiledProfile, ApiError> {
    tokio::task::spawn_blocking(move || {
        CompiledProfile::compile(ProfileId::new_random(), TenantId::new_random(), 0, spec)
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(|problems| ApiError::invalid_document("Invalid profile", problems))
}

fn single(mut specs: Vec<ProfileSpec>) -> Result<ProfileSpec, ApiError> {
    match specs.len() {
        1 => Ok(specs.remove(0)),
        0 => Err(ApiError::bad_request("the body contains no profile")),
        count => Err(ApiError::bad_request(format!(
            "the body contains {count} profiles; send one, or use POST /api/v1/profiles/import"
        ))),
    }
}

/// Compiles a stored profile, puts it into the pipeline's cache and clears
/// open alarms of rules it no longer has. Returns the compiled profile.
async fn publish(state: &AppState, stored: &StoredProfile) -> Option<Arc<CompiledProfile>> {
    let stored = stored.clone();
    let id = stored.id;
    match tokio::task::spawn_blocking(move || CompiledProfile::from_stored(stored)).await {
        Ok(Ok(compiled)) => {
            let compiled = state.directory.store_profile(Arc::new(compiled));
            state.alarms.reconcile(Some(&compiled), None).await;
            state.sync_device_retention().await;
            Some(compiled)
        }
        // Checked before saving, so this is a bug; the pipeline reports it
        // per message.
        Ok(Err(problems)) => {
            tracing::error!(profile_id = %id, ?problems, "a saved profile does not compile");
            None
        }
        Err(_) => None,
    }
}

/// `GET /api/v1/profiles`
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<FormatParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let profiles = state.metadata.list_profiles(principal.tenant_id).await?;
    if wants_yaml(&params, &headers)? {
        let redacted: Vec<ProfileSpec> = profiles
            .iter()
            .map(|profile| secrets::redact_profile(&profile.spec))
            .collect();
        let specs: Vec<&ProfileSpec> = redacted.iter().collect();
        return Ok(yaml_response(crate::profiles::to_yaml(&specs)));
    }
    let items: Vec<_> = profiles.iter().map(profile_json).collect();
    Ok(Json(json!({ "profiles": items })).into_response())
}

/// `GET /api/v1/profiles/{id}`
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(reference): Path<String>,
    Query(params): Query<FormatParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let profile = find(&state, principal.tenant_id, &reference).await?;
    if wants_yaml(&params, &headers)? {
        let redacted = secrets::redact_profile(&profile.spec);
        return Ok(yaml_response(crate::profiles::to_yaml(&[&redacted])));
    }
    Ok(Json(profile_json(&profile)).into_response())
}

/// `POST /api/v1/profiles`
pub async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Admin)?;
    let mut spec = single(read_documents(&headers, &body)?)?;
    check(spec.clone()).await?;
    seal_secrets(&state, principal.tenant_id, &mut spec, None).await?;
    let stored = state
        .metadata
        .create_profile(principal.tenant_id, &spec)
        .await?;
    publish(&state, &stored).await;
    tracing::info!(profile_id = %stored.id, name = %spec.name, by = %principal.subject, "profile created");
    Ok((StatusCode::CREATED, Json(profile_json(&stored))))
}

/// `PUT /api/v1/profiles/{id}`: replaces the document; devices use the new
/// version from their next message on.
pub async fn replace(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(reference): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let existing = find(&state, principal.tenant_id, &reference).await?;
    let mut spec = single(read_documents(&headers, &body)?)?;
    check(spec.clone()).await?;
    seal_secrets(&state, principal.tenant_id, &mut spec, Some(&existing.spec)).await?;
    let stored = state
        .metadata
        .update_profile(principal.tenant_id, existing.id, &spec)
        .await?;
    publish(&state, &stored).await;
    tracing::info!(profile_id = %stored.id, version = stored.version, by = %principal.subject, "profile updated");
    Ok(Json(profile_json(&stored)))
}

/// `DELETE /api/v1/profiles/{id}`: only a profile no device uses.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(reference): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let existing = find(&state, principal.tenant_id, &reference).await?;
    state
        .metadata
        .delete_profile(principal.tenant_id, existing.id)
        .await?;
    state.directory.forget_profile(existing.id);
    tracing::info!(profile_id = %existing.id, by = %principal.subject, "profile deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/profiles/import`: creates or replaces profiles by name.
/// Nothing is saved unless every profile in the file is valid.
pub async fn import(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = axum::body::to_bytes(body, MAX_IMPORT_BYTES)
        .await
        .map_err(|_| ApiError::payload_too_large(MAX_IMPORT_BYTES))?;
    principal.require(Role::Admin)?;
    let mut specs = read_documents(&headers, &body)?;
    if specs.is_empty() {
        return Err(ApiError::bad_request("the file contains no profile"));
    }
    let mut problems = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        if specs[..index].iter().any(|other| other.name == spec.name) {
            problems.push(format!("profile {:?} appears twice in the file", spec.name));
        }
        if let Err(error) = check(spec.clone()).await {
            problems.extend(
                error
                    .errors
                    .into_iter()
                    .map(|problem| format!("profile {:?}: {problem}", spec.name)),
            );
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid_document("Invalid profile file", problems));
    }
    for spec in &mut specs {
        let existing = state
            .metadata
            .profile_by_name(principal.tenant_id, &spec.name)
            .await?;
        let existing = existing.as_ref().map(|profile| &profile.spec);
        seal_secrets(&state, principal.tenant_id, spec, existing).await?;
    }

    let stored = state
        .metadata
        .import_profiles(principal.tenant_id, &specs)
        .await?;
    let mut results = Vec::with_capacity(stored.len());
    for (profile, action) in &stored {
        if *action != "unchanged" {
            publish(&state, profile).await;
        }
        results.push(json!({
            "id": profile.id,
            "name": profile.spec.name,
            "version": profile.version,
            "action": action,
        }));
    }
    tracing::info!(profiles = results.len(), by = %principal.subject, "profiles imported");
    Ok(Json(json!({ "profiles": results })))
}

/// Body of `POST /api/v1/profiles/test`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestRequest {
    /// A stored profile by id or name.
    profile: Option<String>,
    /// A profile document to try before saving it.
    spec: Option<ProfileSpec>,
    /// The payload as text (JSON, SenML JSON).
    payload: Option<String>,
    payload_base64: Option<String>,
    payload_hex: Option<String>,
    /// `json`, `senml+json`, `senml+cbor` or `raw`; by default the
    /// profile's codec decides.
    content_type: Option<String>,
    /// LoRaWAN port given to scripted decoders.
    f_port: Option<u8>,
}

fn records_json(records: &[Record]) -> serde_json::Value {
    json!(records
        .iter()
        .map(|record| json!({
            "ts": ferrite_core::nanos_to_millis(record.ts),
            "values": record
                .fields
                .iter()
                .map(|field| (field.key.clone(), serde_json::to_value(&field.value).unwrap_or_default()))
                .collect::<serde_json::Map<_, _>>(),
        }))
        .collect::<Vec<_>>())
}

/// `POST /api/v1/profiles/test`: runs the decode, transform and validate
/// steps of the pipeline on a sample payload and reports each result.
/// Nothing is stored and no rule runs.
pub async fn test(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let request: TestRequest = serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("invalid test request: {error}")))?;
    let compiled = match (&request.profile, request.spec) {
        (Some(reference), None) => {
            let stored = find(&state, principal.tenant_id, reference).await?;
            CompiledProfile::from_stored(stored)
                .map_err(|problems| ApiError::invalid_document("Invalid profile", problems))?
        }
        (None, Some(spec)) => check(spec).await?,
        _ => {
            return Err(ApiError::bad_request(
                "give either \"profile\" (a stored profile's id or name) or \"spec\" (a profile document)",
            ));
        }
    };
    let payload = match (
        &request.payload,
        &request.payload_base64,
        &request.payload_hex,
    ) {
        (Some(text), None, None) => text.clone().into_bytes(),
        (None, Some(encoded), None) => base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|error| {
                ApiError::invalid_param("payload_base64", format!("invalid base64: {error}"))
            })?,
        (None, None, Some(encoded)) => {
            hex::decode(encoded.trim().replace(' ', "")).map_err(|error| {
                ApiError::invalid_param("payload_hex", format!("invalid hex: {error}"))
            })?
        }
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of \"payload\", \"payload_base64\" and \"payload_hex\"",
            ));
        }
    };
    let content_type = match request.content_type.as_deref() {
        None => match &compiled.spec.codec {
            crate::profiles::CodecSpec::Json => ContentType::Json,
            crate::profiles::CodecSpec::Senml => crate::decode::senml_content_type(&payload),
            _ => ContentType::Raw,
        },
        Some(name) => ContentType::from_name(name).ok_or_else(|| {
            ApiError::invalid_param(
                "content_type",
                format!("unknown content type {name:?}; use json, senml+json, senml+cbor or raw"),
            )
        })?,
    };
    let meta = match request.f_port {
        Some(port) => bytes::Bytes::from(json!({ "f_port": port }).to_string()),
        None => bytes::Bytes::new(),
    };
    let envelope = Envelope {
        tenant_id: principal.tenant_id,
        device_id: crate::ids::DeviceId::new_random(),
        protocol: Protocol::Http,
        received_at_ns: chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or(i64::MAX - 1),
        content_type,
        payload: payload.into(),
        meta,
    };

    let scripts = crate::scripts::runner_factory(&state.config.processing);
    let outcome = tokio::task::spawn_blocking(move || {
        let mut runner = scripts();
        // A profile in the request has no stored version; key its script by
        // a fresh id so it is compiled for this run.
        let cache_key = Some((compiled.id, compiled.version));
        let decoded = crate::decode::decode_records(
            &envelope,
            &compiled.spec.codec,
            cache_key,
            runner.as_mut(),
        );
        let decoded = match decoded {
            Ok(records) => records,
            Err(error) => {
                return json!({"ok": false, "stage": "decode", "error": error.to_string()});
            }
        };
        let mut processed = decoded.clone();
        match compiled.processor.run(&mut processed) {
            Ok(()) => json!({
                "ok": true,
                "decoded": records_json(&decoded),
                "stored": records_json(&processed),
            }),
            Err(rejection) => json!({
                "ok": false,
                "stage": rejection.stage.as_str(),
                "error": rejection.reason,
                "decoded": records_json(&decoded),
            }),
        }
    })
    .await
    .map_err(|_| ApiError::internal())?;
    Ok(Json(outcome))
}
