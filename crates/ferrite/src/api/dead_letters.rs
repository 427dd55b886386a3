//! The dead-letter log: messages the pipeline did not store, with the step
//! that failed and why, and their replay once the profile is fixed.
//!
//! - `GET /api/v1/dead-letters[?device_id=&pending=true&before=ID&limit=N]`
//! - `GET /api/v1/devices/{id}/dead-letters[?pending=true&before=ID&limit=N]`
//! - `POST /api/v1/devices/{id}/dead-letters/replay` with an optional
//!   `{"ids": [...]}`: appends the messages to the ingest log again, with
//!   their original receive time, so they walk the pipeline with the
//!   device's current profile. Letters that fail again get new entries.
//! - `DELETE /api/v1/devices/{id}/dead-letters`

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::auth::Principal;
use crate::ids::DeviceId;
use crate::ingest::{ContentType, Envelope, Protocol};
use crate::metadata::dead_letters::{DeadLetter, DeadLetterFilter};
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;

/// Letters one replay request takes at most.
const MAX_REPLAY: i64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    device_id: Option<String>,
    pending: Option<bool>,
    before: Option<i64>,
    limit: Option<i64>,
}

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    let mut value = serde_json::to_value(letter).unwrap_or_default();
    value["received_at"] = json!(crate::decode::format_ts(letter.received_at_ns));
    // Text formats show as text; binary ones (and text that is not valid
    // UTF-8) as base64.
    let binary = matches!(letter.content_type.as_str(), "raw" | "senml+cbor");
    match std::str::from_utf8(&letter.payload) {
        Ok(text) if !binary => value["payload"] = json!(text),
        _ => {
            value["payload_base64"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&letter.payload));
        }
    }
    if !letter.meta.is_empty() {
        value["meta"] = serde_json::from_slice(&letter.meta).unwrap_or_default();
    }
    value
}

async fn list_for(
    state: &AppState,
    principal: &Principal,
    device: Option<DeviceId>,
    params: ListParams,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_param(
            "limit",
            "limit must be from 1 to 1000",
        ));
    }
    let filter = DeadLetterFilter {
        device_id: device,
        ids: Vec::new(),
        pending_only: params.pending.unwrap_or(false),
        before_id: params.before,
        limit,
        oldest_first: false,
    };
    let letters = state
        .metadata
        .list_dead_letters(principal.tenant_id, &filter)
        .await?;
    let next_before = (letters.len() as i64 == limit)
        .then(|| letters.last().map(|letter| letter.id))
        .flatten();
    Ok(Json(json!({
        "dead_letters": letters.iter().map(letter_json).collect::<Vec<_>>(),
        "next_before": next_before,
    })))
}

/// `GET /api/v1/dead-letters`
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = params.device_id.as_deref().map(device_id).transpose()?;
    list_for(&state, &principal, device, params).await
}

/// `GET /api/v1/devices/{id}/dead-letters`
pub async fn list_device(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if params.device_id.is_some() {
        return Err(ApiError::invalid_param(
            "device_id",
            "the device is in the path; leave out device_id",
        ));
    }
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    list_for(&state, &principal, Some(id), params).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    #[serde(default)]
    ids: Vec<i64>,
}

/// `POST /api/v1/devices/{id}/dead-letters/replay`
pub async fn replay(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let request: ReplayRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::bad_request(format!(
                "the body must be empty or a JSON object with \"ids\": {error}"
            ))
        })?
    };
    if request.ids.len() > MAX_REPLAY as usize {
        return Err(ApiError::invalid_param(
            "ids",
            format!(
                "ids lists {} letters; replay at most {MAX_REPLAY} per request",
                request.ids.len()
            ),
        ));
    }
    let filter = DeadLetterFilter {
        device_id: Some(id),
        ids: request.ids,
        pending_only: true,
        before_id: None,
        limit: MAX_REPLAY,
        // The device's messages keep their order.
        oldest_first: true,
    };
    let letters = state
        .metadata
        .list_dead_letters(principal.tenant_id, &filter)
        .await?;
    // Marking first means a concurrent replay cannot take the same letters.
    let claimed = state
        .metadata
        .claim_dead_letters(&letters.iter().map(|letter| letter.id).collect::<Vec<_>>())
        .await?;
    let mut envelopes = Vec::with_capacity(claimed.len());
    let mut ids = Vec::with_capacity(claimed.len());
    for letter in letters.iter().filter(|letter| claimed.contains(&letter.id)) {
        let Some(content_type) = ContentType::from_name(&letter.content_type) else {
            tracing::warn!(dead_letter = letter.id, content_type = %letter.content_type, "a dead letter has an unknown content type; it is skipped");
            continue;
        };
        envelopes.push(Envelope {
            tenant_id: principal.tenant_id,
            device_id: id,
            protocol: match letter.protocol.as_str() {
                "mqtt" => Protocol::Mqtt,
                "lorawan" => Protocol::Lorawan,
                _ => Protocol::Http,
            },
            received_at_ns: letter.received_at_ns,
            content_type,
            payload: letter.payload.clone().into(),
            meta: letter.meta.clone().into(),
        });
        ids.push(letter.id);
    }
    if !envelopes.is_empty()
        && let Err(error) = state.ingest.append(envelopes).await
    {
        if let Err(unclaim) = state.metadata.unclaim_dead_letters(&claimed).await {
            tracing::error!(%unclaim, "cannot mark dead letters as pending again after a failed replay");
        }
        return Err(error.into());
    }
    metrics::counter!("ferrite_pipeline_dead_letters_replayed_total").increment(ids.len() as u64);
    tracing::info!(device_id = %id, count = ids.len(), by = %principal.subject, "dead letters replayed");
    Ok(Json(json!({ "replayed": ids.len(), "ids": ids })))
}

/// `DELETE /api/v1/devices/{id}/dead-letters`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state.metadata.device(principal.tenant_id, id).await?;
    let deleted = state
        .metadata
        .delete_dead_letters(principal.tenant_id, id)
        .await?;
    Ok(Json(json!({ "deleted": deleted })))
}
