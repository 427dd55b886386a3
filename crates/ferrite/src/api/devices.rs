//! Device and API key management.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use crate::auth::revocation::Revoked;
use crate::auth::{self, Principal};
use crate::ids::DeviceId;
use crate::metadata::{Device, MetadataStore, Role};
use crate::server::AppState;

/// A device counts as online when its last message is at most this old.
pub const ONLINE_WINDOW_MS: i64 = 5 * 60 * 1000;
const MAX_NAME_BYTES: usize = 128;

pub fn device_id(text: &str) -> Result<DeviceId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::not_found(format!("device {text:?} not found: device ids are UUIDs"))
    })
}

fn device_json(state: &AppState, device: &Device) -> serde_json::Value {
    let pending = state.seen.lock().get(&device.id).copied();
    let last_seen_at = match (device.last_seen_at, pending) {
        (Some(stored), Some(pending)) => Some(stored.max(pending)),
        (stored, pending) => stored.or(pending),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let mut labels = device.labels.clone();
    if let Some(pending) = state.pending_labels.lock().get(&device.id) {
        labels.extend(pending.clone());
    }
    json!({
        "id": device.id,
        "name": device.name,
        "created_at": device.created_at,
        "last_seen_at": last_seen_at,
        "online": last_seen_at.is_some_and(|at| now - at <= ONLINE_WINDOW_MS),
        "labels": labels,
        "profile_id": device.profile_id,
        "attributes": device.attributes,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    limit: Option<i64>,
    offset: Option<i64>,
    /// Exact device name: the response contains that device or nothing.
    name: Option<String>,
}

/// `GET /api/v1/devices`: devices by name, a page at a time.
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if let Some(name) = &params.name {
        let found = state
            .metadata
            .device_by_name(principal.tenant_id, name)
            .await?;
        let page: Vec<_> = found
            .iter()
            .map(|device| device_json(&state, device))
            .collect();
        return Ok(Json(json!({ "devices": page, "next_offset": null })));
    }
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_param(
            "limit",
            "limit must be from 1 to 1000",
        ));
    }
    let offset = params.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid_param(
            "offset",
            "offset must not be negative",
        ));
    }
    let devices = state
        .metadata
        .list_devices(principal.tenant_id, limit + 1, offset)
        .await?;
    let has_more = devices.len() as i64 > limit;
    let page: Vec<_> = devices
        .iter()
        .take(limit as usize)
        .map(|device| device_json(&state, device))
        .collect();
    Ok(Json(json!({
        "devices": page,
        "next_offset": has_more.then_some(offset + limit),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDevice {
    name: String,
    #[serde(flatten)]
    changes: DevicePatch,
}

/// Body of `PATCH /api/v1/devices/{id}`; also accepted at creation.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    /// Profile name or id; `null` removes the profile.
    #[serde(default, deserialize_with = "present")]
    profile: Option<Option<String>>,
    /// JSON merge patch of the labels (strings; `null` removes one).
    #[serde(default)]
    labels: Option<serde_json::Map<String, serde_json::Value>>,
    /// JSON merge patch of the attributes.
    #[serde(default)]
    attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Tells a field set to `null` (`Some(None)`) from a missing one (`None`).
fn present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

impl DevicePatch {
    fn is_empty(&self) -> bool {
        self.profile.is_none() && self.labels.is_none() && self.attributes.is_none()
    }
}

/// Applies a device patch and refreshes the caches that hold the device.
async fn apply_patch(
    state: &AppState,
    principal: &Principal,
    id: DeviceId,
    patch: DevicePatch,
) -> Result<Device, ApiError> {
    if let Some(labels) = &patch.labels {
        crate::metadata::profiles::check_label_patch(labels)
            .map_err(|message| ApiError::invalid_param("labels", message))?;
    }
    let profile_id = match &patch.profile {
        None => None,
        Some(None) => Some(None),
        Some(Some(reference)) => {
            let profile = super::profiles::find(state, principal.tenant_id, reference).await?;
            Some(Some(profile.id))
        }
    };
    let changes = crate::metadata::profiles::DeviceChanges {
        profile_id,
        labels: patch.labels,
        attributes: patch.attributes,
    };
    let profile_changed = changes.profile_id.is_some();
    let device = state
        .metadata
        .update_device(principal.tenant_id, id, &changes)
        .await?;
    state.directory.store_device(device.clone());
    // The authentication cache holds the profile, which picks the codec.
    state.auth.forget_device(id);
    if profile_changed {
        // Alarms of the old profile's rules have nothing left to clear them.
        let profile = match device.profile_id {
            Some(profile) => state
                .directory
                .profile(profile)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        state.alarms.reconcile(profile.as_deref(), Some(id)).await;
        state.sync_device_retention().await;
    }
    Ok(device)
}

/// `PATCH /api/v1/devices/{id}`: sets the profile, labels and attributes.
pub async fn update(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let patch: DevicePatch = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with any of \"profile\", \"labels\" and \"attributes\": {error}"
        ))
    })?;
    let changed_attributes = patch.attributes.clone();
    let device = apply_patch(&state, &principal, id, patch).await?;
    tracing::info!(device_id = %id, by = %principal.subject, "device updated");
    // The device learns of changed attributes as a ThingsBoard device does:
    // MQTT subscribers of v1/devices/me/attributes and CoAP observers get
    // the changed keys (null for a deleted one).
    if let Some(changed) = changed_attributes {
        state.mqtt_router.publish_to_device(
            id,
            "attributes",
            Bytes::from(serde_json::Value::Object(changed).to_string()),
            mqtt5_protocol::QoS::AtLeastOnce,
        );
    }
    Ok(Json(device_json(&state, &device)))
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(ApiError::invalid_param(
            "name",
            format!("name must be 1 to {MAX_NAME_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

/// `POST /api/v1/devices`: creates a device and returns its token once.
pub async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Operator)?;
    let request: CreateDevice = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"name\" and optionally \"profile\", \"labels\" and \"attributes\": {error}"
        ))
    })?;
    check_name(&request.name)?;
    // Check the labels and the profile before the device exists, so a
    // mistake does not leave a device behind.
    if let Some(labels) = &request.changes.labels {
        crate::metadata::profiles::check_label_patch(labels)
            .map_err(|message| ApiError::invalid_param("labels", message))?;
    }
    if let Some(Some(reference)) = &request.changes.profile {
        super::profiles::find(&state, principal.tenant_id, reference).await?;
    }
    let token = auth::generate_device_token();
    let device = state
        .metadata
        .create_device(
            principal.tenant_id,
            &request.name,
            &auth::hash_secret(&token),
        )
        .await?;
    let device = if request.changes.is_empty() {
        device
    } else {
        apply_patch(&state, &principal, device.id, request.changes).await?
    };
    tracing::info!(device_id = %device.id, name = %device.name, by = %principal.subject, "device created");
    let mut body = device_json(&state, &device);
    body["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&id)?)
        .await?;
    Ok(Json(device_json(&state, &device)))
}

/// `DELETE /api/v1/devices/{id}`: removes the device and its credentials,
/// and ends its open connections. Its stored telemetry stays until
/// retention removes it.
pub async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let device = state.metadata.device(principal.tenant_id, id).await?;
    state
        .metadata
        .delete_device(principal.tenant_id, id)
        .await?;
    state.auth.forget_device(id);
    state.mqtt_router.remove_external_device(id);
    state.dtls_credentials.forget_device(id);
    state.directory.forget_device(id);
    state.forget_device_name(principal.tenant_id, &device.name);
    state.auth.revocations().publish(Revoked::Device(id));
    tracing::info!(device_id = %id, by = %principal.subject, "device deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Longest grace period of a token rotation: long enough for a fleet to
/// roll over in maintenance windows, short enough that a leaked old token
/// ends within a week.
const MAX_GRACE_SECONDS: u64 = 7 * 24 * 3600;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateToken {
    /// Seconds the old tokens stay valid; 0 ends them at once.
    #[serde(default)]
    grace_seconds: u64,
}

/// `POST /api/v1/devices/{id}/token`: issues a new token. The old tokens
/// end at once, or after `grace_seconds` from the optional JSON body.
/// Connections that use an old token end when it does.
pub async fn rotate_token(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let request: RotateToken = if body.iter().all(u8::is_ascii_whitespace) {
        RotateToken::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::bad_request(format!(
                "the body must be empty or a JSON object with \"grace_seconds\", the seconds the old token stays valid: {error}"
            ))
        })?
    };
    if request.grace_seconds > MAX_GRACE_SECONDS {
        return Err(ApiError::invalid_param(
            "grace_seconds",
            format!(
                "grace_seconds is {}; it must be from 0 to {MAX_GRACE_SECONDS} (7 days)",
                request.grace_seconds
            ),
        ));
    }

    let token = auth::generate_device_token();
    let grace = Duration::from_secs(request.grace_seconds);
    let now = chrono::Utc::now().timestamp_millis();
    let old_valid_until = now.saturating_add(grace.as_millis() as i64);
    let old = state
        .metadata
        .rotate_device_token_with_grace(
            principal.tenant_id,
            id,
            &auth::hash_secret(&token),
            old_valid_until,
        )
        .await?;

    if grace.is_zero() {
        end_tokens(&state, &old);
        state.auth.forget_device(id);
    } else {
        // NOTE: the timer lives in this process only. After a restart
        // within the grace period, connections with the old token end at
        // their next periodic re-check instead of at the end of the period.
        let state = state.clone();
        let old = old.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            end_tokens(&state, &old);
        });
    }
    tracing::info!(
        device_id = %id,
        by = %principal.subject,
        grace_seconds = request.grace_seconds,
        old_tokens = old.len(),
        "device token rotated"
    );
    let old_token_expires_at = (!grace.is_zero() && !old.is_empty()).then_some(old_valid_until);
    Ok(Json(json!({
        "id": id,
        "token": token,
        "old_token_expires_at": old_token_expires_at,
    })))
}

/// Ends the tokens with these hashes in this process: drops their cached
/// lookups and ends the connections that hold them.
fn end_tokens(state: &AppState, hashes: &[[u8; 32]]) {
    for hash in hashes {
        state.auth.forget_token(hash);
        state
            .auth
            .revocations()
            .publish(Revoked::DeviceToken(*hash));
    }
}

/// `GET /api/v1/devices/{id}/credentials`: the device's valid tokens, its
/// pre-shared key identity and its certificates, without any secret.
pub async fn list_credentials(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let tokens = state
        .metadata
        .device_tokens(principal.tenant_id, id)
        .await?;
    let psk = state.metadata.device_psk(principal.tenant_id, id).await?;
    let certificates = state
        .metadata
        .device_certificates(principal.tenant_id, id)
        .await?;
    let certificates: Vec<_> = certificates
        .iter()
        .map(|certificate| {
            json!({
                "fingerprint": hex::encode(&certificate.fingerprint),
                "subject": certificate.subject,
                "not_after": certificate.not_after,
                "created_at": certificate.created_at,
            })
        })
        .collect();
    Ok(Json(json!({
        "device_id": id,
        "tokens": tokens,
        "pre_shared_key": psk.map(|psk| json!({
            "identity": String::from_utf8_lossy(&psk.identity),
            "created_at": psk.created_at,
        })),
        "certificates": certificates,
    })))
}

/// `DELETE /api/v1/devices/{id}/credentials`: revokes every token and
/// deletes the pre-shared key and certificates of the device, and ends its
/// open connections. The device and its data stay; `POST .../token` gives
/// it a new token.
pub async fn revoke_credentials(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let revoked = state
        .metadata
        .revoke_device_credentials(principal.tenant_id, id)
        .await?;
    state.auth.forget_device(id);
    state.mqtt_router.remove_external_device(id);
    state.dtls_credentials.forget_device(id);
    state.auth.revocations().publish(Revoked::Device(id));
    tracing::info!(
        device_id = %id,
        by = %principal.subject,
        tokens = revoked.tokens.len(),
        certificates = revoked.certificates.len(),
        pre_shared_key = revoked.pre_shared_key,
        "device credentials revoked"
    );
    Ok(Json(json!({
        "device_id": id,
        "tokens_revoked": revoked.tokens.len(),
        "certificates_deleted": revoked.certificates.len(),
        "pre_shared_key_deleted": revoked.pre_shared_key,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiKey {
    name: String,
    role: String,
    /// Scopes that narrow the role; missing means everything the role allows.
    scopes: Option<Vec<String>>,
    /// Lifetime in seconds from now.
    expires_in: Option<u64>,
    /// End of validity in epoch milliseconds.
    expires_at: Option<i64>,
}

/// Maximum lifetime that `expires_in` accepts: ten years.
const MAX_API_KEY_LIFETIME_SECONDS: u64 = 10 * 365 * 24 * 3600;

fn api_key_json(key: &crate::metadata::identity::ApiKeyRecord) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp_millis();
    json!({
        "id": key.id,
        "name": key.name,
        "role": key.role,
        "scopes": key.scopes.as_deref().map(|scopes| scopes.split(' ').collect::<Vec<_>>()),
        "created_at": key.created_at,
        "expires_at": key.expires_at,
        "expired": key.expires_at.is_some_and(|expires_at| expires_at <= now),
        "last_used_at": key.last_used_at,
    })
}

/// `POST /api/v1/api-keys`: creates an API key (admins only) and returns it once.
pub async fn create_api_key(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Admin)?;
    let request: CreateApiKey = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"name\", \"role\" and optionally \"scopes\" (a list), \"expires_in\" (seconds) or \"expires_at\" (epoch milliseconds): {error}"
        ))
    })?;
    check_name(&request.name)?;
    let role: Role = request
        .role
        .parse()
        .map_err(|message: String| ApiError::invalid_param("role", message))?;
    let scopes = request
        .scopes
        .as_deref()
        .map(auth::scopes::Scopes::from_list)
        .transpose()
        .map_err(|message| ApiError::invalid_param("scopes", message))?;
    if let Some(scopes) = &scopes {
        scopes
            .check_role(role)
            .map_err(|message| ApiError::invalid_param("scopes", message))?;
    }
    let now = chrono::Utc::now().timestamp_millis();
    let expires_at = match (request.expires_in, request.expires_at) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "expires_in",
                "give expires_in or expires_at, not both",
            ));
        }
        (Some(seconds), None) => {
            if seconds == 0 || seconds > MAX_API_KEY_LIFETIME_SECONDS {
                return Err(ApiError::invalid_param(
                    "expires_in",
                    format!("expires_in must be from 1 to {MAX_API_KEY_LIFETIME_SECONDS} seconds"),
                ));
            }
            Some(now + seconds as i64 * 1000)
        }
        (None, Some(at)) => {
            if at <= now {
                return Err(ApiError::invalid_param(
                    "expires_at",
                    format!(
                        "expires_at {at} is not in the future; give epoch milliseconds after {now}"
                    ),
                ));
            }
            Some(at)
        }
        (None, None) => None,
    };

    let key = auth::generate_api_key();
    let scope_text = scopes.as_ref().map(ToString::to_string);
    let created = state
        .metadata
        .create_scoped_api_key(
            principal.tenant_id,
            &request.name,
            role,
            &auth::hash_secret(&key),
            scope_text.as_deref(),
            expires_at,
        )
        .await?;
    tracing::info!(api_key_id = %created.id, role = %role, scopes = ?scope_text, by = %principal.subject, "API key created");
    let mut body = api_key_json(&created);
    body["key"] = json!(key);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /api/v1/api-keys`: the tenant's API keys, without the secrets (admins only).
pub async fn list_api_keys(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let keys = state
        .metadata
        .list_api_key_records(principal.tenant_id)
        .await?;
    let keys: Vec<_> = keys.iter().map(api_key_json).collect();
    Ok(Json(json!({"api_keys": keys})))
}

/// `DELETE /api/v1/api-keys/{id}`: revokes an API key at once (admins only)
/// and ends the connections that use it.
pub async fn revoke_api_key(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let id = id.parse().map_err(|_| {
        ApiError::not_found(format!("API key {id:?} not found: API key ids are UUIDs"))
    })?;
    state
        .metadata
        .revoke_api_key(principal.tenant_id, id)
        .await?;
    state
        .auth
        .revocations()
        .publish(Revoked::ApiKey { id, hash: None });
    tracing::info!(api_key_id = %id, by = %principal.subject, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
