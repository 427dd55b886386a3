//! Two-way RPC commands to devices, as in ThingsBoard. The request goes to
//! the device over MQTT on `v1/devices/me/rpc/request/{request_id}`, or as
//! a `command` message on the device WebSocket, and the HTTP request waits
//! for the device's response on `v1/devices/me/rpc/response/{request_id}`
//! or in a `command_response` message.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::actions::{validate_method, validate_params};
use crate::adapters::mqtt::RpcSendError;
use crate::auth::Principal;
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;

const DEFAULT_TIMEOUT_MS: u64 = 10_000;
const MIN_TIMEOUT_MS: u64 = 100;
/// Upper bound of `timeout_ms` whatever `http.request_timeout` allows.
const MAX_TIMEOUT_MS: u64 = 60_000;
/// Time the handler keeps for itself within `http.request_timeout`, so that
/// the device's timeout is reported before the server's.
const RESPONSE_MARGIN: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    method: String,
    #[serde(default = "empty_object")]
    params: serde_json::Value,
    timeout_ms: Option<u64>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// `POST /api/v1/devices/{id}/commands`: sends `{"method", "params"}` to the
/// device and returns its response. Fails with 504 when the device does not
/// respond within `timeout_ms`, and with 409 when it is not connected.
pub async fn send(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let request: CommandRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"method\", and optionally \"params\" and \"timeout_ms\": {error}"
        ))
    })?;
    validate_method(&request.method)
        .map_err(|message| ApiError::invalid_param("method", message))?;
    validate_params(&request.params)
        .map_err(|message| ApiError::invalid_param("params", message))?;
    let timeout = command_timeout(request.timeout_ms, state.config.http.request_timeout)?;
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&id)?)
        .await?;

    let pending = state
        .mqtt_router
        .call_device(device.id, &request.method, &request.params)
        .map_err(|error| not_sent(device.id, error))?;
    let request_id = pending.request_id();
    tracing::debug!(device_id = %device.id, request_id, method = %request.method, by = %principal.subject, "sent a command to a device");

    let Some(response) = pending.wait(timeout).await else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "Device did not respond",
            format!(
                "device {} did not respond to request {request_id} within {} ms; a device responds by publishing to v1/devices/me/rpc/response/{request_id}",
                device.id,
                timeout.as_millis()
            ),
        ));
    };
    // A response that is not JSON is returned as a string.
    let response = serde_json::from_slice::<serde_json::Value>(&response)
        .unwrap_or_else(|_| String::from_utf8_lossy(&response).into_owned().into());
    Ok(Json(
        json!({"request_id": request_id, "response": response}),
    ))
}

/// Checks `timeout_ms` against its limits: at most 60 s, and short enough
/// to respond within `http.request_timeout`.
fn command_timeout(
    timeout_ms: Option<u64>,
    request_timeout: Duration,
) -> Result<Duration, ApiError> {
    let allowed = request_timeout.saturating_sub(RESPONSE_MARGIN);
    let max_ms = u64::try_from(allowed.as_millis())
        .unwrap_or(u64::MAX)
        .min(MAX_TIMEOUT_MS);
    let Some(timeout_ms) = timeout_ms else {
        return Ok(Duration::from_millis(DEFAULT_TIMEOUT_MS.min(max_ms)));
    };
    if timeout_ms < MIN_TIMEOUT_MS || timeout_ms > max_ms {
        return Err(ApiError::invalid_param(
            "timeout_ms",
            format!(
                "timeout_ms {timeout_ms} is out of range: give {MIN_TIMEOUT_MS} to {max_ms} (at most 60000, and {} ms less than http.request_timeout)",
                RESPONSE_MARGIN.as_millis()
            ),
        ));
    }
    Ok(Duration::from_millis(timeout_ms))
}

fn not_sent(device_id: crate::ids::DeviceId, error: RpcSendError) -> ApiError {
    let detail = match error {
        RpcSendError::NotConnected => format!(
            "device {device_id} is not connected over MQTT or the device WebSocket; commands reach only connected devices, so retry when it is online"
        ),
        RpcSendError::NotSubscribed => format!(
            "device {device_id} is connected but not subscribed to v1/devices/me/rpc/request/+; its firmware must subscribe to receive commands"
        ),
    };
    ApiError::new(StatusCode::CONFLICT, "Device not reachable", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_defaults_and_limits() {
        let thirty = Duration::from_secs(30);
        assert_eq!(
            command_timeout(None, thirty).unwrap(),
            Duration::from_secs(10)
        );
        assert_eq!(
            command_timeout(None, Duration::from_secs(2)).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            command_timeout(Some(29_500), thirty).unwrap(),
            Duration::from_millis(29_500)
        );
        for bad in [0, 99, 29_501, 1_000_000] {
            let error = command_timeout(Some(bad), thirty).unwrap_err();
            assert_eq!(error.param, Some("timeout_ms"));
            assert!(error.detail.contains("100 to 29500"), "{}", error.detail);
        }
    }
}
