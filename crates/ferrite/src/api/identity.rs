//! People: login, refresh, logout, the caller's identity, password
//! changes, OpenID Connect login, and user management by admins.
//!
//! Every response of these endpoints carries `Cache-Control: no-store`,
//! because most of them contain tokens.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tower_http::set_header::SetResponseHeaderLayer;

use super::ApiError;
use crate::auth::{Principal, Subject, TokenPair};
use crate::ids::UserId;
use crate::metadata::identity::UserRecord;
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/me", get(me))
        .route("/api/v1/auth/password", post(change_password))
        .route("/api/v1/auth/oidc/login", get(oidc_login))
        .route("/api/v1/auth/oidc/callback", get(oidc_callback))
        .route("/api/v1/users", get(list_users).post(create_user))
        .route(
            "/api/v1/users/{id}",
            get(get_user).patch(update_user).delete(delete_user),
        )
        .merge(super::service_accounts::router())
        .layer(no_store())
}

/// Returns the layer that adds `Cache-Control: no-store` to responses with tokens
/// or secrets.
pub fn no_store() -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
}

/// The source address of the request, when the listener recorded it.
/// `X-Forwarded-For` is not read, because any client can set it.
pub struct PeerAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ))
    }
}

/// Parses a JSON body, with an error that names the expected fields.
fn parse_body<T: DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with {expected}: {error}"
        ))
    })
}

#[derive(Deserialize)]
struct LoginRequest {
    email: String,
    password: String,
}

/// `POST /api/v1/auth/login`: checks an email and password and returns an
/// access token and a refresh token.
async fn login(
    State(state): State<Arc<AppState>>,
    PeerAddr(peer): PeerAddr,
    connect_info: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<TokenPair>, ApiError> {
    let request: LoginRequest = parse_body(&body, "\"email\" and \"password\"")?;
    let result = state
        .auth
        .login(&request.email, &request.password, peer)
        .await
        .map_err(ApiError::from);
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(error) => error.status,
    };
    let origin = super::audit::RequestOrigin::from_parts(
        &headers,
        connect_info.as_ref().map(|info| &info.0),
    );
    super::audit::record_login(&state, &request.email, origin, status).await;
    Ok(Json(result?))
}

#[derive(Deserialize)]
struct RefreshRequest {
    refresh_token: String,
}

/// `POST /api/v1/auth/refresh`: exchanges a refresh token for new tokens;
/// the presented one stops working.
async fn refresh(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<Json<TokenPair>, ApiError> {
    let request: RefreshRequest = parse_body(&body, "\"refresh_token\"")?;
    Ok(Json(state.auth.refresh(&request.refresh_token).await?))
}

/// `POST /api/v1/auth/logout`: revokes the refresh token, every token
/// refreshed from the same login, and their access tokens.
async fn logout(
    State(state): State<Arc<AppState>>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let request: RefreshRequest = parse_body(&body, "\"refresh_token\"")?;
    state.auth.logout(&request.refresh_token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/auth/me`: the caller's identity, role and scopes.
async fn me(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let scopes = principal.scopes.as_ref().map(|scopes| scopes.names());
    let body = match &principal.subject {
        Subject::User(id) => {
            let user = state.metadata.user_record(principal.tenant_id, *id).await?;
            json!({"type": "user", "id": user.id, "email": user.email, "role": user.role})
        }
        Subject::ApiKey(name) => json!({"type": "api_key", "name": name, "role": principal.role}),
        Subject::ServiceAccount(id) => {
            json!({"type": "service_account", "id": id, "role": principal.role})
        }
    };
    let mut body = body;
    body["tenant_id"] = json!(principal.tenant_id);
    body["scopes"] = json!(scopes);
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangePassword {
    current_password: String,
    new_password: String,
}

/// `POST /api/v1/auth/password`: changes the caller's own password. Every
/// session of the user ends; the response starts a new one.
async fn change_password(
    State(state): State<Arc<AppState>>,
    PeerAddr(peer): PeerAddr,
    principal: Principal,
    body: axum::body::Bytes,
) -> Result<Json<TokenPair>, ApiError> {
    let Subject::User(id) = principal.subject else {
        return Err(ApiError::forbidden(
            "only users have a password; API keys and service accounts are replaced instead",
        ));
    };
    let request: ChangePassword = parse_body(&body, "\"current_password\" and \"new_password\"")?;
    let user = state.metadata.user_record(principal.tenant_id, id).await?;
    crate::auth::check_password_rules(&request.new_password, &user.email)
        .map_err(|error| ApiError::invalid_param("new_password", error.to_string()))?;
    state
        .auth
        .authenticate_user(&user.email, &request.current_password, peer)
        .await
        .map_err(|error| match error {
            crate::auth::AuthError::InvalidLogin => {
                ApiError::invalid_param("current_password", "the current password is wrong")
            }
            other => other.into(),
        })?;

    let hash = hash_password(request.new_password).await?;
    state
        .metadata
        .set_password_hash(principal.tenant_id, id, &hash)
        .await?;
    state.auth.revoke_user_sessions(id).await?;
    tracing::info!(user_id = %id, "user changed their password");
    let user = state
        .metadata
        .user_by_id(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user not found"))?;
    Ok(Json(state.auth.start_session(&user).await?))
}

async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || crate::auth::hash_password(&password))
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(|error| {
            tracing::error!(%error, "hashing a password failed");
            ApiError::internal()
        })
}

fn oidc_not_configured() -> ApiError {
    ApiError::not_found(
        "OpenID Connect login is not configured on this server; set [auth.oidc] in the configuration",
    )
}

/// `GET /api/v1/auth/oidc/login`: redirects to the identity provider.
async fn oidc_login(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let oidc = state.auth.oidc().ok_or_else(oidc_not_configured)?;
    let url = oidc
        .authorization_url()
        .await
        .map_err(crate::auth::AuthError::from)?;
    Ok(Redirect::to(url.as_str()).into_response())
}

#[derive(Deserialize)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /api/v1/auth/oidc/callback`: finishes the login at the provider
/// and returns Ferrite's access and refresh tokens.
async fn oidc_callback(
    State(state): State<Arc<AppState>>,
    Query(params): Query<CallbackParams>,
) -> Result<Json<TokenPair>, ApiError> {
    if state.auth.oidc().is_none() {
        return Err(oidc_not_configured());
    }
    if let Some(error) = params.error {
        let description = params.error_description.unwrap_or_default();
        return Err(ApiError::unauthorized(format!(
            "the identity provider returned the error {error:?} {description}"
        )));
    }
    let (Some(code), Some(login_state)) = (params.code, params.state) else {
        return Err(ApiError::bad_request(
            "the callback needs the code and state parameters from the identity provider",
        ));
    };
    Ok(Json(
        state.auth.finish_oidc_login(&code, &login_state).await?,
    ))
}

// ------------------------------------------------------------- users ---

fn user_id(text: &str) -> Result<UserId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::not_found(format!("user {text:?} not found: user ids are UUIDs")))
}

fn check_email(email: &str) -> Result<(), ApiError> {
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.contains('@')
        });
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_param(
            "email",
            format!("invalid email {email:?}: give an address such as ops@example.com"),
        ))
    }
}

fn parse_role(text: &str) -> Result<Role, ApiError> {
    text.parse()
        .map_err(|message: String| ApiError::invalid_param("role", message))
}

/// `GET /api/v1/users`: the tenant's users (admins only).
async fn list_users(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Admin)?;
    let users = state.metadata.list_users(principal.tenant_id).await?;
    Ok(Json(json!({ "users": users })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateUser {
    email: String,
    role: String,
    password: String,
}

/// `POST /api/v1/users`: creates a user in the caller's tenant (admins only).
async fn create_user(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<UserRecord>), ApiError> {
    principal.require(Role::Admin)?;
    let request: CreateUser = parse_body(&body, "\"email\", \"role\" and \"password\"")?;
    check_email(&request.email)?;
    let role = parse_role(&request.role)?;
    crate::auth::check_password_rules(&request.password, &request.email)
        .map_err(|error| ApiError::invalid_param("password", error.to_string()))?;
    let hash = hash_password(request.password).await?;
    let user = state
        .metadata
        .create_user(principal.tenant_id, &request.email, &hash, role)
        .await?;
    tracing::info!(user_id = %user.id, %role, by = %principal.subject, "user created");
    let record = state
        .metadata
        .user_record(principal.tenant_id, user.id)
        .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

/// `GET /api/v1/users/{id}` (admins only).
async fn get_user(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<UserRecord>, ApiError> {
    principal.require(Role::Admin)?;
    Ok(Json(
        state
            .metadata
            .user_record(principal.tenant_id, user_id(&id)?)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateUser {
    role: Option<String>,
    password: Option<String>,
}

/// `PATCH /api/v1/users/{id}`: changes the role or resets the password
/// (admins only). Either change ends every session of the user.
async fn update_user(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<UserRecord>, ApiError> {
    principal.require(Role::Admin)?;
    let id = user_id(&id)?;
    let request: UpdateUser = parse_body(&body, "\"role\" and/or \"password\"")?;
    if request.role.is_none() && request.password.is_none() {
        return Err(ApiError::bad_request(
            "nothing to change: give \"role\" and/or \"password\"",
        ));
    }
    let user = state.metadata.user_record(principal.tenant_id, id).await?;
    let role = request.role.as_deref().map(parse_role).transpose()?;
    let hash = match request.password {
        Some(password) => {
            crate::auth::check_password_rules(&password, &user.email)
                .map_err(|error| ApiError::invalid_param("password", error.to_string()))?;
            Some(hash_password(password).await?)
        }
        None => None,
    };

    if let Some(role) = role {
        state
            .metadata
            .set_user_role(principal.tenant_id, id, role)
            .await?;
    }
    if let Some(hash) = &hash {
        state
            .metadata
            .set_password_hash(principal.tenant_id, id, hash)
            .await?;
    }
    state.auth.revoke_user_sessions(id).await?;
    tracing::info!(
        user_id = %id,
        role = ?role,
        password_reset = hash.is_some(),
        by = %principal.subject,
        "user updated"
    );
    Ok(Json(
        state.metadata.user_record(principal.tenant_id, id).await?,
    ))
}

/// `DELETE /api/v1/users/{id}` (admins only): the user's sessions and open
/// connections end at once.
async fn delete_user(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let id = user_id(&id)?;
    // Checks the tenant and the last admin before anything is revoked.
    let user = state.metadata.user_record(principal.tenant_id, id).await?;
    if user.role == Role::Admin {
        let admins = state
            .metadata
            .list_users(principal.tenant_id)
            .await?
            .iter()
            .filter(|user| user.role == Role::Admin)
            .count();
        if admins <= 1 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "Conflict",
                "this user is the tenant's last admin; make another user admin first",
            ));
        }
    }
    // The refresh tokens go with the user through the foreign key, so
    // their families are collected and revoked first.
    state.auth.revoke_user_sessions(id).await?;
    state.metadata.delete_user(principal.tenant_id, id).await?;
    tracing::info!(user_id = %id, by = %principal.subject, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}
