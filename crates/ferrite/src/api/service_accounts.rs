//! Service accounts and the OAuth 2.0 token endpoint for them.
//!
//! An admin creates a service account with a role and optional scopes and
//! receives its `client_id` and `client_secret` once. The service then
//! gets short-lived access tokens from `POST /api/v1/oauth/token` with the
//! client credentials grant (RFC 6749 section 4.4) and sends them as
//! bearer tokens. Errors of the token endpoint have the body of RFC 6749
//! section 5.2, not the problem details of the rest of the API, so that
//! OAuth 2.0 client libraries understand them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::ApiError;
use super::identity::PeerAddr;
use crate::auth::scopes::Scopes;
use crate::auth::tokens::random_url_safe;
use crate::auth::{AuthError, Principal, hash_secret};
use crate::ids::ServiceAccountId;
use crate::metadata::Role;
use crate::server::AppState;

/// Prefix of client ids, and of client secrets, so that they are
/// recognizable in logs and scanners.
const CLIENT_ID_PREFIX: &str = "fsc_";
const CLIENT_SECRET_PREFIX: &str = "fss_";
const MAX_NAME_BYTES: usize = 128;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/oauth/token", post(token))
        .route("/api/v1/service-accounts", get(list).post(create))
        .route(
            "/api/v1/service-accounts/{id}",
            axum::routing::delete(delete),
        )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateServiceAccount {
    name: String,
    role: String,
    scopes: Option<Vec<String>>,
}

fn account_json(account: &crate::metadata::identity::ServiceAccount) -> serde_json::Value {
    json!({
        "id": account.id,
        "name": account.name,
        "client_id": account.client_id,
        "role": account.role,
        "scopes": account.scopes.as_deref().map(|scopes| scopes.split(' ').collect::<Vec<_>>()),
        "created_at": account.created_at,
    })
}

/// `POST /api/v1/service-accounts`: creates a service account (admins
/// only) and returns its client secret once.
async fn create(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Admin)?;
    let request: CreateServiceAccount = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"name\", \"role\" and optionally \"scopes\" (a list): {error}"
        ))
    })?;
    if request.name.trim().is_empty()
        || request.name.len() > MAX_NAME_BYTES
        || request.name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid_param(
            "name",
            format!("name must be 1 to {MAX_NAME_BYTES} bytes without control characters"),
        ));
    }
    let role: Role = request
        .role
        .parse()
        .map_err(|message: String| ApiError::invalid_param("role", message))?;
    let scopes = request
        .scopes
        .as_deref()
        .map(Scopes::from_list)
        .transpose()
        .map_err(|message| ApiError::invalid_param("scopes", message))?;
    if let Some(scopes) = &scopes {
        scopes
            .check_role(role)
            .map_err(|message| ApiError::invalid_param("scopes", message))?;
    }

    let client_id = format!("{CLIENT_ID_PREFIX}{}", random_url_safe(12));
    let client_secret = format!("{CLIENT_SECRET_PREFIX}{}", random_url_safe(32));
    let scope_text = scopes.as_ref().map(ToString::to_string);
    let account = state
        .metadata
        .create_service_account(
            principal.tenant_id,
            &request.name,
            &client_id,
            &hash_secret(&client_secret),
            role,
            scope_text.as_deref(),
        )
        .await?;
    tracing::info!(service_account_id = %account.id, %role, by = %principal.subject, "service account created");
    let mut body = account_json(&account);
    body["client_secret"] = json!(client_secret);
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /api/v1/service-accounts`: the tenant's service accounts, without
/// secrets (admins only).
async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let accounts = state
        .metadata
        .list_service_accounts(principal.tenant_id)
        .await?;
    let accounts: Vec<_> = accounts.iter().map(account_json).collect();
    Ok(Json(json!({ "service_accounts": accounts })))
}

/// `DELETE /api/v1/service-accounts/{id}`: revokes the account; its access
/// tokens stop working and its open streams end at once in this process
/// (admins only).
async fn delete(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let id: ServiceAccountId = id.parse().map_err(|_| {
        ApiError::not_found(format!(
            "service account {id:?} not found: service account ids are UUIDs"
        ))
    })?;
    state
        .metadata
        .revoke_service_account(principal.tenant_id, id)
        .await?;
    state.auth.revoke_service_account(id);
    state
        .auth
        .revocations()
        .publish(crate::auth::revocation::Revoked::ServiceAccount(id));
    tracing::info!(service_account_id = %id, by = %principal.subject, "service account revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// An error response of the token endpoint (RFC 6749 section 5.2).
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
    retry_after: Option<u64>,
}

impl OAuthError {
    fn new(error: &'static str, description: impl Into<String>) -> Self {
        let status = if error == "invalid_client" {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::BAD_REQUEST
        };
        Self {
            status,
            error,
            description: description.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.error, "error_description": self.description});
        let mut response = (self.status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"ferrite\""),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Returns the client id and secret of HTTP Basic authentication, whose
/// parts are form-urlencoded (RFC 6749 section 2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, OAuthError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let invalid = || {
        OAuthError::new(
            "invalid_client",
            "the Authorization header is not valid HTTP Basic authentication",
        )
    };
    let value = value.to_str().map_err(|_| invalid())?;
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Err(invalid());
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid());
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| invalid())?;
    let decoded = String::from_utf8(decoded).map_err(|_| invalid())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(invalid)?;
    let decode = |part: &str| {
        form_urlencoded::parse(format!("x={part}").as_bytes())
            .next()
            .map(|(_, value)| value.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((decode(id), decode(secret))))
}

/// Parses a form body, rejecting repeated parameters (RFC 6749 section 3.2).
fn form_parameters(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<std::collections::HashMap<String, String>, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("application/x-www-form-urlencoded")
    {
        return Err(OAuthError::new(
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let mut parameters = std::collections::HashMap::new();
    for (name, value) in form_urlencoded::parse(body) {
        if parameters
            .insert(name.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return Err(OAuthError::new(
                "invalid_request",
                format!("the parameter {name:?} is given more than once"),
            ));
        }
    }
    Ok(parameters)
}

/// `POST /api/v1/oauth/token`: the client credentials grant.
async fn token(
    State(state): State<Arc<AppState>>,
    PeerAddr(peer): PeerAddr,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, OAuthError> {
    let mut parameters = form_parameters(&headers, &body)?;
    match parameters.get("grant_type").map(String::as_str) {
        None => {
            return Err(OAuthError::new(
                "invalid_request",
                "grant_type is missing; this endpoint serves grant_type=client_credentials",
            ));
        }
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                "unsupported_grant_type",
                format!("grant_type {other:?} is not supported; use client_credentials"),
            ));
        }
    }

    let body_id = parameters.remove("client_id");
    let body_secret = parameters.remove("client_secret");
    let (client_id, client_secret) = match (basic_credentials(&headers)?, body_id, body_secret) {
        (Some(_), _, Some(_)) => {
            return Err(OAuthError::new(
                "invalid_request",
                "the client is authenticated twice: use either HTTP Basic or the client_id and client_secret parameters",
            ));
        }
        // Some clients repeat the client id in the body next to HTTP Basic.
        (Some(basic), Some(id), None) if id != basic.0 => {
            return Err(OAuthError::new(
                "invalid_request",
                "client_id in the body differs from the client id of HTTP Basic",
            ));
        }
        (Some(basic), _, None) => basic,
        (None, Some(id), Some(secret)) => (id, secret),
        (None, _, _) => {
            return Err(OAuthError::new(
                "invalid_client",
                "client authentication is missing: send HTTP Basic with the client id and secret, or client_id and client_secret",
            ));
        }
    };

    let account = authenticate_client(&state, &client_id, &client_secret, peer).await?;

    let allowed = account
        .scopes
        .as_deref()
        .map(Scopes::parse)
        .transpose()
        .map_err(|_| {
            OAuthError::new(
                "invalid_scope",
                "the service account's stored scopes are invalid",
            )
        })?;
    let granted = match parameters.get("scope") {
        None => allowed,
        Some(requested) => {
            let requested = Scopes::parse(requested)
                .map_err(|message| OAuthError::new("invalid_scope", message))?;
            if let Some(allowed) = &allowed
                && !allowed.covers(&requested)
            {
                return Err(OAuthError::new(
                    "invalid_scope",
                    format!("the service account may request only the scopes {allowed}"),
                ));
            }
            requested
                .check_role(account.role)
                .map_err(|message| OAuthError::new("invalid_scope", message))?;
            Some(requested)
        }
    };

    let issued = state
        .auth
        .issue_service_token(&account, granted.as_ref())
        .map_err(|_| OAuthError::new("server_error", "the token could not be signed"))?;
    tracing::info!(service_account_id = %account.id, "issued an access token to a service account");
    let mut response = Json(issued).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response_headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// Finds the service account and checks its secret, throttled per source
/// address and client id like password logins.
async fn authenticate_client(
    state: &AppState,
    client_id: &str,
    client_secret: &str,
    peer: Option<std::net::IpAddr>,
) -> Result<crate::metadata::identity::ServiceAccount, OAuthError> {
    let throttle = state.auth.throttle();
    if let Err(AuthError::Throttled { retry_after }) = throttle.check(peer, Some(client_id)) {
        return Err(OAuthError {
            status: StatusCode::TOO_MANY_REQUESTS,
            error: "invalid_client",
            description: format!(
                "too many failed client authentications from this address or for this client; retry in {} s",
                retry_after.as_secs().max(1)
            ),
            retry_after: Some(retry_after.as_secs().max(1)),
        });
    }
    let found = state
        .metadata
        .service_account_by_client_id(client_id)
        .await
        .map_err(|error| {
            tracing::error!(%error, "looking up a service account failed");
            OAuthError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                error: "server_error",
                description: "the server failed to check the client; the cause is in its log"
                    .to_owned(),
                retry_after: None,
            }
        })?;
    let presented = hash_secret(client_secret);
    match found {
        Some((account, stored)) if bool::from(stored.as_slice().ct_eq(&presented)) => Ok(account),
        _ => {
            throttle.record_failure(peer, Some(client_id));
            if let Some(failures) = state.auth.failure_due("oauth_client") {
                tracing::warn!(
                    client_id,
                    peer = ?peer,
                    failures,
                    "rejected a client with an unknown id or a wrong secret"
                );
            }
            Err(OAuthError::new(
                "invalid_client",
                "unknown client_id or wrong client_secret",
            ))
        }
    }
}
