//! The REST API: login, devices and telemetry queries.
//!
//! Every endpoint except login, refresh, logout, the OpenID Connect login
//! and the OAuth 2.0 token endpoint takes `Authorization: Bearer <JWT or
//! API key>` and works inside the caller's tenant; ids of other tenants get
//! 404. A credential with scopes is checked against the scope of the
//! request's path ([`crate::auth::scopes::required_scope`]) before any
//! handler runs.

mod actions;
mod alarms;
pub mod audit;
mod buckets;
mod commands;
mod credentials;
mod dead_letters;
mod device_cas;
pub mod devices;
pub mod error;
mod fleet;
mod identity;
pub(crate) mod live;
pub mod lorawan;
pub mod profiles;
mod service_accounts;
mod telemetry;

pub use telemetry::query as telemetry_query;
mod time;

use std::sync::Arc;

use axum::extract::{FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};

pub use error::ApiError;

use crate::auth::Principal;
use crate::metadata::Role;
use crate::server::AppState;

pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        // Login, tokens, users and service accounts.
        .merge(identity::router())
        .route("/api/v1/audit", get(audit::list))
        .route("/api/v1/audit/export", get(audit::export))
        .route("/api/v1/audit/verify", get(audit::verify))
        .route("/api/v1/devices", get(devices::list).post(devices::create))
        .route(
            "/api/v1/devices/{id}",
            get(devices::get_one)
                .patch(devices::update)
                .delete(devices::delete),
        )
        .route(
            "/api/v1/devices/{id}/dead-letters",
            get(dead_letters::list_device).delete(dead_letters::delete),
        )
        .route(
            "/api/v1/devices/{id}/dead-letters/replay",
            post(dead_letters::replay),
        )
        .route("/api/v1/dead-letters", get(dead_letters::list))
        .route(
            "/api/v1/profiles",
            get(profiles::list).post(profiles::create),
        )
        .route(
            "/api/v1/profiles/import",
            // The handler applies its own, larger limit.
            post(profiles::import).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/api/v1/profiles/test", post(profiles::test))
        .route(
            "/api/v1/profiles/{id}",
            get(profiles::get_one)
                .put(profiles::replace)
                .delete(profiles::delete),
        )
        .route("/api/v1/alarms", get(alarms::list))
        .route("/api/v1/alarms/{id}", get(alarms::get_one))
        .route("/api/v1/alarms/{id}/ack", post(alarms::acknowledge))
        .route("/api/v1/alarms/{id}/clear", post(alarms::clear))
        .route("/api/v1/devices/{id}/token", post(devices::rotate_token))
        .route(
            "/api/v1/devices/{id}/credentials",
            get(devices::list_credentials).delete(devices::revoke_credentials),
        )
        .route(
            "/api/v1/devices/{id}/credentials/psk",
            get(credentials::get_psk)
                .put(credentials::set_psk)
                .delete(credentials::delete_psk),
        )
        .route(
            "/api/v1/devices/{id}/credentials/certificates",
            get(credentials::list_certificates).post(credentials::add_certificate),
        )
        .route(
            "/api/v1/devices/{id}/credentials/certificates/{fingerprint}",
            axum::routing::delete(credentials::delete_certificate),
        )
        .route(
            "/api/v1/device-cas",
            get(device_cas::list).post(device_cas::create),
        )
        .route(
            "/api/v1/device-cas/{fingerprint}",
            get(device_cas::get_one).delete(device_cas::delete),
        )
        .route("/api/v1/devices/{id}/commands", post(commands::send))
        .route(
            "/api/v1/devices/{id}/telemetry/latest",
            get(telemetry::latest),
        )
        .route("/api/v1/devices/{id}/telemetry/keys", get(telemetry::keys))
        .route("/api/v1/telemetry/latest", get(fleet::latest))
        .route("/api/v1/telemetry/aggregate", get(fleet::aggregate))
        .route("/api/v1/admin/compact", post(compact))
        .route("/api/v1/export", get(crate::export::http::export))
        .route(
            "/api/v1/api-keys",
            get(devices::list_api_keys)
                .post(devices::create_api_key)
                .layer(identity::no_store()),
        )
        .route(
            "/api/v1/api-keys/{id}",
            axum::routing::delete(devices::revoke_api_key),
        )
        .route("/api/v1/actions/deliveries", get(actions::list))
        .route("/api/v1/actions/deliveries/{id}", get(actions::get_one))
        .route(
            "/api/v1/actions/deliveries/{id}/retry",
            post(actions::retry),
        )
        .route("/api/v1/actions/test", post(actions::test))
        .route(
            "/api/v1/devices/{id}/lorawan",
            get(lorawan::get_device)
                .put(lorawan::put_device)
                .delete(lorawan::delete_device),
        )
        .route(
            "/api/v1/devices/{id}/lorawan/downlinks",
            get(lorawan::list_downlinks).post(lorawan::queue_downlink),
        )
        .route(
            "/api/v1/lorawan/gateways",
            get(lorawan::list_gateways).post(lorawan::create_gateway),
        )
        .route(
            "/api/v1/lorawan/gateways/{eui}",
            axum::routing::delete(lorawan::delete_gateway),
        )
        // GET /api/v1/live/ws and GET /api/v1/live/sse.
        .merge(live::router())
        // Records every mutating call; applied to the routes above only.
        .route_layer(axum::middleware::from_fn_with_state(
            state,
            audit::record_mutations,
        ))
}

/// `POST /api/v1/admin/compact`: writes the points held in memory to
/// segments (which lets the ingest log shrink), merges the stored data into
/// its most compact form and waits until done (admins only). Background
/// work does the same over time; this is for backups, benchmarks and tests.
async fn compact(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let started = std::time::Instant::now();
    if !state
        .flush_requests
        .flush(std::time::Duration::from_secs(120))
        .await
    {
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "Flush timed out",
            "the store did not finish a flush within 120 s; the server is overloaded or the disk is failing, see the server log",
        ));
    }
    let store = state.store.clone();
    let (files, bytes) = tokio::task::spawn_blocking(move || {
        store.compact()?;
        Ok::<_, crate::store::StoreError>(store.disk_usage())
    })
    .await
    .map_err(|_| ApiError::internal())??;
    Ok(Json(serde_json::json!({
        "segments": files,
        "bytes": bytes,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })))
}

/// Parses a comma-separated `keys` parameter; `None` (no parameter) means
/// every key. An empty list is an error naming `keys`.
pub fn parse_key_list(text: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let keys: Vec<String> = text
        .split(',')
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        return Err(ApiError::invalid_param(
            "keys",
            "keys is empty: give a comma-separated list of keys, or leave it out for all keys",
        ));
    }
    Ok(Some(keys))
}

/// Returns the bearer credential of a request, if any.
pub fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then(|| token.trim())
}

impl FromRequestParts<Arc<AppState>> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        // The audit layer authenticates mutating requests first.
        if let Some(principal) = parts.extensions.get::<Principal>() {
            return Ok(principal.clone());
        }
        if let Some(audit::RejectedCredential(error)) = parts.extensions.get() {
            return Err(error.clone());
        }
        let token = bearer_token(parts).ok_or_else(|| {
            ApiError::unauthorized(
                "missing credentials: send Authorization: Bearer <access token or API key>",
            )
        })?;
        let principal = state.auth.authenticate_bearer(token).await?;
        if let Some(scope) = crate::auth::scopes::required_scope(&parts.method, parts.uri.path()) {
            principal.require_scope(scope)?;
        }
        Ok(principal)
    }
}

impl Principal {
    /// Fails with 403 unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this action needs the {role} role; the caller has {}",
                self.role
            )))
        }
    }
}
