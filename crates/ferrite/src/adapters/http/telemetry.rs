//! JSON telemetry from devices over HTTP.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use bytes::Bytes;

use super::body::read_limited;
use crate::api::{ApiError, bearer_token, devices::device_id};
use crate::auth::DeviceIdentity;
use crate::decode::check_payload;
use crate::ingest::{ContentType, Envelope, Protocol};
use crate::metadata::Role;
use crate::server::AppState;

pub fn now_ns() -> i64 {
    chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX - 1)
}

pub fn count_rejected(reason: &'static str) {
    metrics::counter!("ferrite_ingest_rejected_total", "protocol" => "http", "reason" => reason)
        .increment(1);
}

/// `POST /api/v1/{access_token}/telemetry` (ThingsBoard's device API).
pub async fn by_token(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let device = state
        .auth
        .authenticate_device(&token)
        .await
        .map_err(|error| {
            count_rejected("not_authorized");
            ApiError::from(error)
        })?;
    accept_json(&state, &device, request).await
}

/// `POST /api/v1/devices/{id}/telemetry` with the device token, or an API
/// key or JWT with the operator role, as bearer.
pub async fn by_device_id(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let id = device_id(&id)?;
    let (parts, body) = request.into_parts();
    let token = bearer_token(&parts).ok_or_else(|| {
        count_rejected("not_authorized");
        ApiError::unauthorized(
            "missing credentials: send Authorization: Bearer <device access token>",
        )
    })?;

    let device = if token.starts_with(crate::auth::DEVICE_TOKEN_PREFIX) {
        let device = state
            .auth
            .authenticate_device(token)
            .await
            .map_err(|error| {
                count_rejected("not_authorized");
                ApiError::from(error)
            })?;
        if device.device_id != id {
            count_rejected("not_authorized");
            tracing::warn!(device_id = %device.device_id, target = %id, "device token used for another device's telemetry");
            return Err(ApiError::forbidden(
                "this access token belongs to another device; a device may write only its own telemetry",
            ));
        }
        device
    } else {
        let principal = state.auth.authenticate_bearer(token).await?;
        principal.require(Role::Operator)?;
        principal.require_scope(crate::auth::scopes::Scope::TelemetryWrite)?;
        let device = {
            use crate::metadata::MetadataStore;
            state.metadata.device(principal.tenant_id, id).await?
        };
        DeviceIdentity {
            tenant_id: device.tenant_id,
            device_id: device.id,
            name: device.name,
            profile_id: device.profile_id,
        }
    };
    accept_json(&state, &device, Request::from_parts(parts, body)).await
}

async fn accept_json(
    state: &AppState,
    device: &DeviceIdentity,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let (parts, body) = request.into_parts();
    super::check_message_rate(state, &parts, device.tenant_id, Some(device.device_id))?;
    let request = Request::from_parts(parts, body);
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let payload: Bytes =
        read_limited(request.into_body(), state.config.http.max_body_bytes).await?;
    let received_at_ns = now_ns();
    state.directory.warm(device.profile_id).await;
    let content_type = state
        .directory
        .content_type_for(device.profile_id, declared.as_deref(), &payload)
        .map_err(|message| {
            count_rejected("wrong_codec");
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported payload format",
                message,
            )
        })?;
    // Bytes for a profile's Cayenne LPP or script codec are decoded by the
    // pipeline; failures go to the device's dead-letter log.
    if content_type != ContentType::Raw {
        check_payload(
            content_type,
            &payload,
            received_at_ns,
            crate::decode::TimeWindow::new(&state.config, &device.tenant_id.to_string()),
        )
        .map_err(|error| {
            count_rejected(error.reason());
            tracing::debug!(device_id = %device.device_id, %error, "rejected HTTP telemetry");
            ApiError::from(error)
        })?;
    }

    let envelope = Envelope {
        tenant_id: device.tenant_id,
        device_id: device.device_id,
        protocol: Protocol::Http,
        received_at_ns,
        content_type,
        payload,
        meta: Bytes::new(),
    };
    state.ingest.append(vec![envelope]).await.map_err(|error| {
        count_rejected("overloaded");
        ApiError::from(error)
    })?;
    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "http").increment(1);
    Ok(StatusCode::OK)
}
