//! Alarms: listing with filters, one alarm with its history, and the
//! acknowledge and clear actions of operators.
//!
//! - `GET /api/v1/alarms[?status=active|acknowledged|cleared|open][&device_id=][&rule=][&severity=MIN][&before=CURSOR][&limit=N]`
//!   lists newest first; `next_before` in the response is the cursor of the
//!   next page.
//! - `GET /api/v1/alarms/{id}`: the alarm and its history.
//! - `POST /api/v1/alarms/{id}/ack` and `POST /api/v1/alarms/{id}/clear`
//!   (operator role).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::auth::Principal;
use crate::ids::AlarmId;
use crate::metadata::Role;
use crate::metadata::alarms::AlarmFilter;
use crate::rules::Severity;
use crate::server::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    status: Option<String>,
    device_id: Option<String>,
    rule: Option<String>,
    severity: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

fn alarm_id(text: &str) -> Result<AlarmId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::not_found(format!("alarm {text:?} not found: alarm ids are UUIDs")))
}

/// `GET /api/v1/alarms`
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_param(
            "limit",
            "limit must be from 1 to 1000",
        ));
    }
    if let Some(status) = &params.status
        && !["active", "acknowledged", "cleared", "open"].contains(&status.as_str())
    {
        return Err(ApiError::invalid_param(
            "status",
            format!("unknown status {status:?}; use active, acknowledged, cleared or open"),
        ));
    }
    let min_severity = params
        .severity
        .as_deref()
        .map(|text| {
            Severity::parse(text).ok_or_else(|| {
                ApiError::invalid_param(
                    "severity",
                    format!("unknown severity {text:?}; use indeterminate, warning, minor, major or critical"),
                )
            })
        })
        .transpose()?;
    let filter = AlarmFilter {
        status: params.status,
        device_id: params.device_id.as_deref().map(device_id).transpose()?,
        rule: params.rule,
        min_severity,
        before: params.before,
        limit,
    };
    let alarms = state
        .metadata
        .list_alarms(principal.tenant_id, &filter)
        .await?;
    let next_before = (alarms.len() as i64 == limit)
        .then(|| alarms.last().map(|alarm| alarm.cursor))
        .flatten();
    Ok(Json(
        json!({ "alarms": alarms, "next_before": next_before }),
    ))
}

/// `GET /api/v1/alarms/{id}`
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let alarm = state
        .metadata
        .alarm(principal.tenant_id, alarm_id(&id)?)
        .await?;
    let history = state.metadata.alarm_history(alarm.id).await?;
    let mut body = serde_json::to_value(&alarm).map_err(|_| ApiError::internal())?;
    body["history"] = json!(history);
    Ok(Json(body))
}

/// `POST /api/v1/alarms/{id}/ack`
pub async fn acknowledge(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let alarm = state
        .alarms
        .acknowledge(
            principal.tenant_id,
            alarm_id(&id)?,
            &principal.subject.to_string(),
        )
        .await?;
    tracing::info!(alarm_id = %alarm.id, by = %principal.subject, "alarm acknowledged");
    Ok(Json(
        serde_json::to_value(&alarm).map_err(|_| ApiError::internal())?,
    ))
}

/// `POST /api/v1/alarms/{id}/clear`: clears an alarm by hand; if its
/// condition still holds, the next message raises a new one.
pub async fn clear(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let alarm = state
        .alarms
        .clear(
            principal.tenant_id,
            alarm_id(&id)?,
            &principal.subject.to_string(),
        )
        .await?;
    tracing::info!(alarm_id = %alarm.id, by = %principal.subject, "alarm cleared by hand");
    Ok(Json(
        serde_json::to_value(&alarm).map_err(|_| ApiError::internal())?,
    ))
}
