//! Logins, refresh token rotation, logout and revocation of the sessions
//! of people, and the access tokens of service accounts.
//!
//! A login starts a session: a refresh token family (see
//! `metadata::identity`) and access tokens that name the family in their
//! `sid` claim. Revoking the family in this process also rejects its
//! access tokens at once. Another process (the CLI) revokes only the
//! refresh tokens, so the access tokens then end with their `exp`.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::oidc::{Oidc, OidcError, OidcIdentity};
use super::revocation::Revoked;
use super::scopes::Scopes;
use super::tokens::{self, AccessClaims, SubjectKind};
use super::{Auth, AuthError, hash_secret};
use crate::config::OidcConfig;
use crate::ids::{ServiceAccountId, UserId};
use crate::metadata::identity::{RefreshOutcome, ServiceAccount};
use crate::metadata::{MetadataStore, Role, User};

/// Shortest time between two deletions of stale refresh tokens.
const REFRESH_CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Age after expiry or revocation at which a refresh token row is
/// deleted. Used tokens stay until then, so that a stolen copy presented
/// before it expires is still recognized as reuse.
const STALE_REFRESH_TOKEN_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Response to a login or a refresh.
#[derive(Debug, Serialize)]
pub struct TokenPair {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub refresh_token: String,
    /// Seconds until the refresh token expires unless it is used.
    pub refresh_expires_in: u64,
    pub role: Role,
}

/// Response of the OAuth 2.0 token endpoint (RFC 6749 section 5.1).
#[derive(Debug, Serialize)]
pub struct ServiceToken {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl Auth {
    /// Checks an email and password sent from `peer` and starts a session.
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<TokenPair, AuthError> {
        let user = self.verify_login(email, password, peer).await?;
        let pair = self.start_session(&user).await?;
        tracing::info!(user_id = %user.id, tenant_id = %user.tenant_id, peer = ?peer, "user logged in");
        Ok(pair)
    }

    /// Issues the first refresh token of a new family and an access token.
    pub async fn start_session(&self, user: &User) -> Result<TokenPair, AuthError> {
        self.delete_stale_refresh_tokens();
        let family_id = uuid::Uuid::new_v4().to_string();
        let refresh_token = tokens::generate_refresh_token();
        self.metadata
            .insert_refresh_token(
                &hash_secret(&refresh_token),
                &family_id,
                user,
                self.refresh_expires_at(),
            )
            .await?;
        self.token_pair(user, family_id, refresh_token)
    }

    /// Exchanges a refresh token for a new access token and a new refresh
    /// token. A token presented a second time revokes its whole family.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, AuthError> {
        let new_token = tokens::generate_refresh_token();
        let outcome = self
            .metadata
            .rotate_refresh_token(
                &hash_secret(refresh_token),
                &hash_secret(&new_token),
                self.refresh_expires_at(),
            )
            .await?;
        let invalid = |message: &str| Err(AuthError::InvalidRefreshToken(message.to_owned()));
        match outcome {
            RefreshOutcome::Rotated { user_id, family_id } => {
                let Some(user) = self.metadata.user_by_id(user_id).await? else {
                    return invalid("the refresh token's user no longer exists");
                };
                self.token_pair(&user, family_id, new_token)
            }
            RefreshOutcome::Reused { user_id, family_id } => {
                // Either the client or someone with a copy of its token
                // used it first. The server cannot tell which, so both lose it.
                tracing::warn!(
                    user_id = %user_id,
                    family_id,
                    "a used refresh token was presented again, so it was probably stolen: revoked every token of its login"
                );
                metrics::counter!("ferrite_auth_refresh_reuse_total").increment(1);
                self.mark_session_revoked(&family_id);
                invalid(
                    "the refresh token was already used, which means a copy of it exists; every token of this login is now revoked, log in again",
                )
            }
            RefreshOutcome::Revoked => invalid(
                "the refresh token was revoked (logout, or a change of the account's password or role); log in again",
            ),
            RefreshOutcome::Expired => invalid("the refresh token has expired; log in again"),
            RefreshOutcome::Unknown => invalid(
                "the refresh token is unknown; send the refresh_token of the last login or refresh",
            ),
        }
    }

    /// Revokes the session of a refresh token. Unknown tokens are ignored,
    /// so the response reveals nothing about them.
    pub async fn logout(&self, refresh_token: &str) -> Result<(), AuthError> {
        if let Some((family_id, user_id)) = self
            .metadata
            .revoke_refresh_family(&hash_secret(refresh_token))
            .await?
        {
            self.mark_session_revoked(&family_id);
            tracing::info!(user_id = %user_id, "user logged out");
        }
        Ok(())
    }

    /// Revokes every session of a user whose account was deleted or whose
    /// password or role changed, and ends the user's open connections.
    pub async fn revoke_user_sessions(&self, user: UserId) -> Result<(), AuthError> {
        let families = self.metadata.revoke_user_refresh_tokens(user).await?;
        for family in &families {
            self.mark_session_revoked(family);
        }
        self.revocations.publish(Revoked::User(user));
        tracing::info!(user_id = %user, sessions = families.len(), "revoked the user's sessions");
        Ok(())
    }

    /// Rejects the access tokens of a deleted service account from now on.
    pub fn revoke_service_account(&self, id: ServiceAccountId) {
        let now = Instant::now();
        let mut revoked = self.revoked_services.lock();
        revoked.retain(|_, at| now.duration_since(*at) <= self.revocation_memory());
        revoked.insert(id, now);
    }

    /// Issues an access token to a service account with `scopes`, which
    /// the caller has checked against the account's scopes.
    pub fn issue_service_token(
        &self,
        account: &ServiceAccount,
        scopes: Option<&Scopes>,
    ) -> Result<ServiceToken, AuthError> {
        let scope = scopes.map(ToString::to_string);
        let claims = self.claims(
            account.id.to_string(),
            account.tenant_id.to_string(),
            account.role,
            SubjectKind::Service,
            None,
            scope.clone(),
        );
        let access_token = self.sign(&claims)?;
        Ok(ServiceToken {
            access_token,
            token_type: "Bearer",
            expires_in: self.access_token_ttl.as_secs(),
            scope,
        })
    }

    /// Returns the OpenID Connect login, when `auth.oidc` is configured.
    pub fn oidc(&self) -> Option<&Oidc> {
        self.oidc.as_ref()
    }

    /// Finishes an OpenID Connect login and starts a session for the user
    /// with the verified email, creating the user on first login when a
    /// role is configured for new users.
    pub async fn finish_oidc_login(&self, code: &str, state: &str) -> Result<TokenPair, AuthError> {
        let oidc = self.oidc.as_ref().ok_or_else(|| {
            OidcError::NotAllowed(
                "OpenID Connect login is not configured on this server".to_owned(),
            )
        })?;
        let identity = oidc.finish(code, state).await?;
        let user = match self.metadata.user_by_email(&identity.email).await? {
            Some(user) => user,
            None => self.create_oidc_user(oidc.config(), &identity).await?,
        };
        let pair = self.start_session(&user).await?;
        tracing::info!(
            user_id = %user.id,
            tenant_id = %user.tenant_id,
            provider_subject = identity.subject,
            "user logged in through OpenID Connect"
        );
        Ok(pair)
    }

    async fn create_oidc_user(
        &self,
        config: &OidcConfig,
        identity: &OidcIdentity,
    ) -> Result<User, AuthError> {
        let claimed = identity
            .role
            .as_deref()
            .and_then(|role| role.parse::<Role>().ok());
        let configured = (!config.default_role.is_empty())
            .then(|| config.default_role.parse::<Role>().ok())
            .flatten();
        let Some(role) = claimed.or(configured) else {
            return Err(OidcError::NotAllowed(format!(
                "no user has the email {:?}, and new users are not created (auth.oidc.default_role is empty and the ID token has no valid role claim); ask an admin to create the user",
                identity.email
            ))
            .into());
        };
        let tenant = self
            .metadata
            .tenant_by_name(&config.tenant)
            .await
            .map(Some)
            .or_else(|error| match error {
                crate::metadata::MetadataError::NotFound(_) => Ok(None),
                error => Err(error),
            })?
            .ok_or_else(|| {
                tracing::error!(tenant = config.tenant, "auth.oidc.tenant names no tenant");
                OidcError::NotAllowed(format!(
                    "the tenant {:?} of auth.oidc.tenant does not exist",
                    config.tenant
                ))
            })?;
        // The user logs in through the provider only: the password is
        // random and never shown.
        let password = tokens::random_url_safe(32);
        let hash = tokio::task::spawn_blocking(move || super::hash_password(&password))
            .await
            .map_err(|_| AuthError::InvalidLogin)?
            .map_err(|error| {
                tracing::error!(%error, "hashing a password failed");
                AuthError::InvalidLogin
            })?;
        let user = self
            .metadata
            .create_user(tenant.id, &identity.email, &hash, role)
            .await?;
        tracing::info!(user_id = %user.id, tenant_id = %tenant.id, %role, "created a user at their first OpenID Connect login");
        Ok(user)
    }

    /// Deletes refresh tokens that ended [`STALE_REFRESH_TOKEN_AGE`] ago,
    /// in the background and at most once per [`REFRESH_CLEANUP_INTERVAL`].
    fn delete_stale_refresh_tokens(&self) {
        let now = chrono::Utc::now().timestamp_millis();
        let last = self.last_refresh_cleanup.load(Ordering::Relaxed);
        if now - last < REFRESH_CLEANUP_INTERVAL.as_millis() as i64
            || self
                .last_refresh_cleanup
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let metadata = self.metadata.clone();
        tokio::spawn(async move {
            let keep = STALE_REFRESH_TOKEN_AGE.as_millis() as i64;
            match metadata.delete_stale_refresh_tokens(keep).await {
                Ok(deleted) => tracing::debug!(deleted, "deleted stale refresh tokens"),
                Err(error) => tracing::warn!(%error, "deleting stale refresh tokens failed"),
            }
        });
    }

    pub(super) fn session_revoked(&self, family_id: &str) -> bool {
        self.revoked_sessions.lock().contains_key(family_id)
    }

    pub(super) fn service_revoked(&self, id: ServiceAccountId) -> bool {
        self.revoked_services.lock().contains_key(&id)
    }

    fn mark_session_revoked(&self, family_id: &str) {
        let now = Instant::now();
        let mut revoked = self.revoked_sessions.lock();
        revoked.retain(|_, at| now.duration_since(*at) <= self.revocation_memory());
        revoked.insert(family_id.to_owned(), now);
    }

    /// How long a revocation must be remembered: until every access token
    /// issued before it has expired.
    fn revocation_memory(&self) -> std::time::Duration {
        self.access_token_ttl + std::time::Duration::from_secs(tokens::LEEWAY_SECONDS + 1)
    }

    fn refresh_expires_at(&self) -> i64 {
        chrono::Utc::now().timestamp_millis() + self.refresh_token_ttl.as_millis() as i64
    }

    fn token_pair(
        &self,
        user: &User,
        family_id: String,
        refresh_token: String,
    ) -> Result<TokenPair, AuthError> {
        let claims = self.claims(
            user.id.to_string(),
            user.tenant_id.to_string(),
            user.role,
            SubjectKind::User,
            Some(family_id),
            None,
        );
        Ok(TokenPair {
            access_token: self.sign(&claims)?,
            token_type: "Bearer",
            expires_in: self.access_token_ttl.as_secs(),
            refresh_token,
            refresh_expires_in: self.refresh_token_ttl.as_secs(),
            role: user.role,
        })
    }

    fn claims(
        &self,
        sub: String,
        tenant: String,
        role: Role,
        kind: SubjectKind,
        sid: Option<String>,
        scope: Option<String>,
    ) -> AccessClaims {
        let now = jsonwebtoken::get_current_timestamp();
        AccessClaims {
            iss: tokens::ISSUER.to_owned(),
            aud: tokens::AUDIENCE.to_owned(),
            sub,
            jti: uuid::Uuid::new_v4().to_string(),
            iat: now,
            exp: now + self.access_token_ttl.as_secs(),
            tenant,
            role,
            kind,
            sid,
            scope,
        }
    }

    fn sign(&self, claims: &AccessClaims) -> Result<String, AuthError> {
        self.keys.sign(claims).map_err(|error| {
            tracing::error!(%error, "signing an access token failed");
            AuthError::InvalidLogin
        })
    }
}
