//! Deliveries of alarm actions: listing, manual retries and test runs.
//! Every endpoint needs the operator role and works only on the caller's
//! tenant.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::actions::{ActionEvent, ActionSpec, RetryError, Trigger};
use crate::auth::Principal;
use crate::ids::AlarmId;
use crate::live::AlarmChange;
use crate::metadata::{DeliveryFilter, DeliveryId, DeliveryStatus, MetadataStore, Role};
use crate::server::AppState;

const LIST_PARAMS: [&str; 4] = ["status", "alarm_id", "before", "limit"];
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

fn delivery_id(text: &str) -> Result<DeliveryId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::not_found(format!(
            "delivery {text:?} not found: delivery ids are UUIDs"
        ))
    })
}

/// `GET /api/v1/actions/deliveries?status=&alarm_id=&before=&limit=`: the
/// newest deliveries first. `next_before` pages to older ones.
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let filter = parse_list_params(&params)?;
    let deliveries = state
        .metadata
        .list_action_deliveries(principal.tenant_id, &filter)
        .await?;
    let next_before = (deliveries.len() as i64 == filter.limit)
        .then(|| deliveries.last().map(|delivery| delivery.id))
        .flatten();
    Ok(Json(json!({
        "deliveries": deliveries,
        "next_before": next_before,
    })))
}

fn parse_list_params(params: &HashMap<String, String>) -> Result<DeliveryFilter, ApiError> {
    if let Some(unknown) = params
        .keys()
        .find(|name| !LIST_PARAMS.contains(&name.as_str()))
    {
        return Err(ApiError::invalid_param(
            "query",
            format!(
                "unknown query parameter {unknown:?}; this endpoint takes {}",
                LIST_PARAMS.join(", ")
            ),
        ));
    }
    let status = params
        .get("status")
        .map(|text| text.parse::<DeliveryStatus>())
        .transpose()
        .map_err(|message| ApiError::invalid_param("status", message))?;
    let alarm_id = params
        .get("alarm_id")
        .map(|text| {
            text.parse::<AlarmId>().map_err(|_| {
                ApiError::invalid_param(
                    "alarm_id",
                    format!("alarm_id {text:?} is not an alarm id: alarm ids are UUIDs"),
                )
            })
        })
        .transpose()?;
    let before = params
        .get("before")
        .map(|text| {
            text.parse::<DeliveryId>().map_err(|_| {
                ApiError::invalid_param(
                    "before",
                    format!(
                        "before {text:?} is not a delivery id: pass the next_before of the previous page"
                    ),
                )
            })
        })
        .transpose()?;
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "limit",
                    format!("limit {text:?} is invalid: give a number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    Ok(DeliveryFilter {
        status,
        alarm_id,
        before,
        limit,
    })
}

/// `GET /api/v1/actions/deliveries/{id}`.
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let delivery = state
        .metadata
        .action_delivery(principal.tenant_id, delivery_id(&id)?)
        .await?;
    Ok(Json(json!(delivery)))
}

/// `POST /api/v1/actions/deliveries/{id}/retry`: a new round of attempts,
/// the first one now, with the action as it was when the delivery was
/// created.
pub async fn retry(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Operator)?;
    let id = delivery_id(&id)?;
    let delivery =
        state
            .actions
            .retry(principal.tenant_id, id)
            .await
            .map_err(|error| match error {
                RetryError::Busy => ApiError::new(
                    StatusCode::CONFLICT,
                    "Delivery busy",
                    format!("delivery {id}: {error}"),
                ),
                RetryError::Metadata(error) => error.into(),
            })?;
    tracing::info!(delivery_id = %id, by = %principal.subject, "alarm action delivery retried by hand");
    Ok((StatusCode::ACCEPTED, Json(json!(delivery))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TestRequest {
    action: serde_json::Value,
    device_id: String,
    #[serde(default)]
    change: Option<Trigger>,
    #[serde(default)]
    alarm: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /api/v1/actions/test`: runs an action once for a made-up alarm
/// change of a device, to try a webhook, topic or command before putting
/// it into a profile. The delivery is recorded and retried like any other.
pub async fn test(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Operator)?;
    let request: TestRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"action\" and \"device_id\", and optionally \"change\" and \"alarm\": {error}"
        ))
    })?;
    let mut spec: ActionSpec = serde_json::from_value(request.action)
        .map_err(|error| ApiError::invalid_param("action", format!("invalid action: {error}")))?;
    spec.validate()
        .map_err(|error| ApiError::invalid_param("action", error.to_string()))?;
    match crate::actions::secrets::seal_action(&state.keyring, principal.tenant_id, &mut spec).await
    {
        Ok(()) => {}
        Err(crate::actions::secrets::SecretError::Keyring(error)) => {
            tracing::error!(tenant_id = %principal.tenant_id, %error, "cannot seal the secrets of a test action");
            return Err(ApiError::internal());
        }
        Err(error) => return Err(ApiError::invalid_param("action", error.to_string())),
    }
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&request.device_id)?)
        .await?;

    let change = match request.change.unwrap_or(Trigger::Raised) {
        Trigger::Raised => AlarmChange::Raised,
        Trigger::Updated => AlarmChange::Updated,
        Trigger::Acknowledged => AlarmChange::Acknowledged,
        Trigger::Cleared => AlarmChange::Cleared,
    };
    let alarm = test_alarm(change, request.alarm);
    let event = ActionEvent {
        tenant_id: principal.tenant_id,
        device_id: device.id,
        device_name: device.name,
        change,
        alarm,
    };
    let delivery = state.actions.record_delivery(&spec, &event).await?;
    tracing::info!(delivery_id = %delivery.id, kind = delivery.kind.as_str(), by = %principal.subject, "alarm action test run");
    Ok((StatusCode::ACCEPTED, Json(json!(delivery))))
}

/// Builds the alarm of a test run: the caller's fields over defaults that
/// mark it as a test (`"rule": "test"`, `"test": true`) and a new random id.
fn test_alarm(
    change: AlarmChange,
    fields: Option<serde_json::Map<String, serde_json::Value>>,
) -> serde_json::Value {
    let status = match change {
        AlarmChange::Raised | AlarmChange::Updated => "active",
        AlarmChange::Acknowledged => "acknowledged",
        AlarmChange::Cleared => "cleared",
    };
    let mut alarm = json!({
        "id": AlarmId::new_random(),
        "rule": "test",
        "severity": "warning",
        "status": status,
        "value": null,
        "test": true,
    });
    if let (Some(object), Some(fields)) = (alarm.as_object_mut(), fields) {
        object.extend(fields);
    }
    alarm
}
