//! Webhook endpoints for ChirpStack's HTTP integration and The Things
//! Stack's webhooks.
//!
//! Both network servers send custom headers with each request, so both
//! endpoints take an API key (or JWT) as `Authorization: Bearer` with at
//! least the operator role, the role that may write telemetry. The key's
//! tenant is the only tenant whose devices the request reaches.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::{
    IntegrationContext, NetworkServer, ParseError, TenantScope, Uplink, chirpstack, count_delivery,
    tts,
};
use crate::adapters::http::body::read_limited;
use crate::api::ApiError;
use crate::auth::Principal;
use crate::metadata::Role;
use crate::server::AppState;

#[derive(Debug, Deserialize)]
pub struct EventQuery {
    event: Option<String>,
}

/// `POST /api/v1/integrations/chirpstack?event=up`: ChirpStack's HTTP
/// integration posts every event type to one URL and names it in `event`.
/// Uplinks (`up`) are stored; other events get 204 and are ignored.
pub async fn chirpstack(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(query): Query<EventQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    principal.require(Role::Operator)?;
    let Some(event) = query.event else {
        return Err(ApiError::invalid_param(
            "event",
            "missing query parameter event: ChirpStack's HTTP integration adds ?event=up to each request; check the endpoint URL",
        ));
    };
    if event != "up" {
        count_delivery(NetworkServer::ChirpStack.as_str(), "http", "ignored");
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if declared_content_type(&request).as_deref() == Some("application/octet-stream") {
        count_delivery(NetworkServer::ChirpStack.as_str(), "http", "invalid");
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported payload format",
            "ChirpStack sent the event as Protobuf; set the HTTP integration's payload encoding to JSON",
        ));
    }

    let body = read_limited(request.into_body(), state.config.http.max_body_bytes).await?;
    let uplink = chirpstack::parse_uplink(&body)
        .map_err(|error| rejected(NetworkServer::ChirpStack, &error))?;
    store(&state.lorawan_integrations, &uplink, &principal).await
}

/// `POST /api/v1/integrations/tts`: a webhook of The Things Stack with the
/// "Uplink message" type. Other message types get 204 and are ignored.
pub async fn tts(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    request: Request,
) -> Result<Response, ApiError> {
    principal.require(Role::Operator)?;
    let body = read_limited(request.into_body(), state.config.http.max_body_bytes).await?;
    let message = tts::parse_message(&body)
        .map_err(|error| rejected(NetworkServer::TheThingsStack, &error))?;
    let uplink = match message {
        tts::Message::Uplink(uplink) => *uplink,
        tts::Message::Other(kind) => {
            tracing::debug!(
                kind,
                "ignored a message of The Things Stack that is no uplink"
            );
            count_delivery(NetworkServer::TheThingsStack.as_str(), "http", "ignored");
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    };
    store(&state.lorawan_integrations, &uplink, &principal).await
}

async fn store(
    context: &IntegrationContext,
    uplink: &Uplink,
    principal: &Principal,
) -> Result<Response, ApiError> {
    let network_server = uplink.network_server.as_str();
    let accepted = context
        .accept(uplink, TenantScope::Only(principal.tenant_id))
        .await
        .map_err(|error| {
            count_delivery(network_server, "http", error.outcome());
            tracing::debug!(
                network_server,
                dev_eui = %uplink.dev_eui,
                f_cnt = uplink.f_cnt,
                %error,
                "rejected an uplink from a network server"
            );
            ApiError::from(error)
        })?;
    count_delivery(network_server, "http", accepted.outcome());
    let body = serde_json::json!({
        "device_id": accepted.device_id().to_string(),
        "outcome": accepted.outcome(),
    });
    // A repeat gets 200 as well, so the network server stops retrying.
    Ok((StatusCode::OK, Json(body)).into_response())
}

fn rejected(network_server: NetworkServer, error: &ParseError) -> ApiError {
    count_delivery(network_server.as_str(), "http", "invalid");
    tracing::debug!(
        network_server = network_server.as_str(),
        field = error.field(),
        %error,
        "rejected an invalid event"
    );
    ApiError::new(StatusCode::BAD_REQUEST, "Invalid event", error.to_string())
}

fn declared_content_type(request: &Request) -> Option<String> {
    let value = request.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        value
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}
