//! Login through an external OpenID Connect provider: the authorization
//! code flow with PKCE (RFC 7636), `state` and `nonce`.
//!
//! 1. `GET /api/v1/auth/oidc/login` reads the provider's discovery
//!    document (once, then cached), stores a pending login under a random
//!    `state` with its `nonce` and PKCE verifier, and redirects to the
//!    provider's authorization endpoint.
//! 2. The provider redirects the browser to `redirect_url` with `code`
//!    and `state`. The pending login is taken: each `state` works once,
//!    within [`PENDING_TTL`]. The code is exchanged at the token endpoint
//!    with the client secret (HTTP Basic) and the verifier. The ID token
//!    must be signed by a key of the provider's JWKS (RS256 or ES256) and
//!    carry the right `iss`, `aud`, `exp` and `nonce`.
//! 3. The user is found by the token's email (and created on first login
//!    when a role is configured); Ferrite then issues its own tokens.
//!
//! The client secret is read from a file or an environment variable at
//! start and kept only in memory.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use reqwest::Url;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::tokens::random_url_safe;
use crate::config::OidcConfig;

/// Time a user has to finish the login at the provider.
pub const PENDING_TTL: Duration = Duration::from_secs(10 * 60);
/// Pending logins kept at a time; when full, the oldest are dropped.
const MAX_PENDING: usize = 10_000;
/// Time limit of each request to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest time between two downloads of the JWKS, so that ID tokens
/// with unknown key ids cannot make the server hammer the provider.
const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Errors of an OpenID Connect login; the text is for the user.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the login is unknown or took longer than 10 minutes; start again")]
    UnknownState,
    #[error("the identity provider rejected the login: {0}")]
    Provider(String),
    #[error("the identity provider is unreachable or answered badly; retry later")]
    Unavailable,
    #[error("the ID token is invalid: {0}")]
    InvalidIdToken(String),
    #[error("{0}")]
    NotAllowed(String),
}

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

struct Provider {
    discovery: Discovery,
    jwks: JwkSet,
    jwks_fetched: Instant,
}

struct Pending {
    nonce: String,
    verifier: String,
    created: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// The verified identity of a finished login.
#[derive(Debug, Clone)]
pub struct OidcIdentity {
    pub email: String,
    /// The value of the configured role claim, if present.
    pub role: Option<String>,
    /// The provider's subject, for the log.
    pub subject: String,
}

pub struct Oidc {
    config: OidcConfig,
    client_secret: String,
    http: reqwest::Client,
    provider: tokio::sync::Mutex<Option<Provider>>,
    pending: Mutex<HashMap<String, Pending>>,
}

impl Oidc {
    /// Reads the client secret; fails when it is missing.
    pub fn new(config: OidcConfig) -> anyhow::Result<Self> {
        let client_secret = match &config.client_secret_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| {
                    format!(
                        "cannot read auth.oidc.client_secret_file {}",
                        path.display()
                    )
                })?
                .trim()
                .to_owned(),
            None => std::env::var(&config.client_secret_env).with_context(|| {
                format!(
                    "the environment variable {} named by auth.oidc.client_secret_env is not set",
                    config.client_secret_env
                )
            })?,
        };
        anyhow::ensure!(
            !client_secret.is_empty(),
            "the OpenID Connect client secret is empty"
        );
        let http = reqwest::Client::builder()
            .timeout(PROVIDER_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("cannot build the HTTP client for the OpenID Connect provider")?;
        Ok(Self {
            config,
            client_secret,
            http,
            provider: tokio::sync::Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Starts a login and returns the provider's authorization URL.
    pub async fn authorization_url(&self) -> Result<Url, OidcError> {
        let authorization_endpoint = {
            let mut provider = self.provider.lock().await;
            self.load_provider(&mut provider).await?;
            provider
                .as_ref()
                .map(|provider| provider.discovery.authorization_endpoint.clone())
                .ok_or(OidcError::Unavailable)?
        };

        let state = random_url_safe(24);
        let nonce = random_url_safe(24);
        // RFC 7636 section 4.1: 43 to 128 characters; 32 bytes give 43.
        let verifier = random_url_safe(32);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        {
            let mut pending = self.pending.lock();
            let now = Instant::now();
            pending.retain(|_, login| now.duration_since(login.created) < PENDING_TTL);
            if pending.len() >= MAX_PENDING
                && let Some(oldest) = pending
                    .iter()
                    .min_by_key(|(_, login)| login.created)
                    .map(|(state, _)| state.clone())
            {
                pending.remove(&oldest);
            }
            pending.insert(
                state.clone(),
                Pending {
                    nonce: nonce.clone(),
                    verifier,
                    created: now,
                },
            );
        }

        let mut url = Url::parse(&authorization_endpoint).map_err(|error| {
            tracing::warn!(%error, "the provider's authorization_endpoint is not a URL");
            OidcError::Unavailable
        })?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.config.client_id)
            .append_pair("redirect_uri", &self.config.redirect_url)
            .append_pair("scope", &self.config.scopes)
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url)
    }

    /// Finishes a login: exchanges `code` and validates the ID token.
    pub async fn finish(&self, code: &str, state: &str) -> Result<OidcIdentity, OidcError> {
        let pending = self
            .pending
            .lock()
            .remove(state)
            .filter(|login| login.created.elapsed() < PENDING_TTL)
            .ok_or(OidcError::UnknownState)?;

        let token_endpoint = {
            let mut provider = self.provider.lock().await;
            self.load_provider(&mut provider).await?;
            provider
                .as_ref()
                .map(|provider| provider.discovery.token_endpoint.clone())
                .ok_or(OidcError::Unavailable)?
        };
        let response = self
            .http
            .post(&token_endpoint)
            .basic_auth(&self.config.client_id, Some(&self.client_secret))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.config.redirect_url),
                ("code_verifier", &pending.verifier),
                ("client_id", &self.config.client_id),
            ])
            .send()
            .await
            .map_err(|error| {
                tracing::warn!(%error, "the OpenID Connect token request failed");
                OidcError::Unavailable
            })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|_| OidcError::Unavailable)?;
        if !status.is_success() {
            let detail = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|error| match error.error_description {
                    Some(description) => format!("{}: {description}", error.error),
                    None => error.error,
                })
                .unwrap_or_else(|_| format!("HTTP status {status}"));
            return Err(OidcError::Provider(detail));
        }
        let tokens: TokenResponse = serde_json::from_slice(&body).map_err(|error| {
            tracing::warn!(%error, "the provider's token response is not valid JSON");
            OidcError::Unavailable
        })?;
        let id_token = tokens.id_token.ok_or_else(|| {
            OidcError::Provider(
                "the token response has no id_token; is openid in auth.oidc.scopes?".to_owned(),
            )
        })?;
        self.validate_id_token(&id_token, &pending.nonce).await
    }

    async fn validate_id_token(&self, token: &str, nonce: &str) -> Result<OidcIdentity, OidcError> {
        let invalid = |message: String| OidcError::InvalidIdToken(message);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| invalid(format!("its header cannot be read: {error}")))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(invalid(format!(
                "it is signed with {:?}; only RS256 and ES256 are accepted",
                header.alg
            )));
        }
        let kid = header.kid.unwrap_or_default();

        let (key, issuer) = {
            let mut provider = self.provider.lock().await;
            self.load_provider(&mut provider).await?;
            let Some(loaded) = provider.as_mut() else {
                return Err(OidcError::Unavailable);
            };
            if loaded.jwks.find(&kid).is_none()
                && loaded.jwks_fetched.elapsed() >= JWKS_REFRESH_INTERVAL
            {
                // The provider may have rotated its keys.
                loaded.jwks = self.fetch_jwks(&loaded.discovery.jwks_uri).await?;
                loaded.jwks_fetched = Instant::now();
            }
            let jwk = if kid.is_empty() && loaded.jwks.keys.len() == 1 {
                loaded.jwks.keys.first()
            } else {
                loaded.jwks.find(&kid)
            };
            let jwk = jwk.ok_or_else(|| {
                invalid(format!("its key id {kid:?} is not in the provider's JWKS"))
            })?;
            let key = DecodingKey::from_jwk(jwk).map_err(|error| {
                invalid(format!("the provider's key {kid:?} is unusable: {error}"))
            })?;
            (key, loaded.discovery.issuer.clone())
        };

        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&self.config.client_id]);
        validation.leeway = 30;
        let claims = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &validation,
        )
        .map_err(|error| invalid(error.to_string()))?
        .claims;

        if claims.get("nonce").and_then(serde_json::Value::as_str) != Some(nonce) {
            return Err(invalid("its nonce does not match the login".to_owned()));
        }
        let email = claims
            .get("email")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                invalid("it has no email claim; add email to auth.oidc.scopes".to_owned())
            })?
            .to_owned();
        if claims
            .get("email_verified")
            .and_then(serde_json::Value::as_bool)
            == Some(false)
        {
            return Err(OidcError::NotAllowed(format!(
                "the provider has not verified the email {email:?}"
            )));
        }
        let domain = email
            .rsplit_once('@')
            .map(|(_, domain)| domain.to_lowercase());
        let allowed = &self.config.allowed_email_domains;
        if !allowed.is_empty()
            && !domain.as_ref().is_some_and(|domain| {
                allowed
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(domain))
            })
        {
            return Err(OidcError::NotAllowed(format!(
                "the email domain of {email:?} is not allowed to log in here"
            )));
        }
        let role = if self.config.role_claim.is_empty() {
            None
        } else {
            claims
                .get(&self.config.role_claim)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let subject = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned();
        Ok(OidcIdentity {
            email,
            role,
            subject,
        })
    }

    /// Reads the discovery document and the JWKS unless already loaded.
    async fn load_provider(&self, provider: &mut Option<Provider>) -> Result<(), OidcError> {
        if provider.is_some() {
            return Ok(());
        }
        let issuer = self.config.issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let discovery: Discovery = self.get_json(&url).await?;
        if discovery.issuer.trim_end_matches('/') != issuer {
            tracing::warn!(
                configured = issuer,
                discovered = discovery.issuer,
                "the provider's discovery document names another issuer; check auth.oidc.issuer"
            );
            return Err(OidcError::Unavailable);
        }
        let jwks = self.fetch_jwks(&discovery.jwks_uri).await?;
        tracing::info!(
            issuer,
            keys = jwks.keys.len(),
            "loaded the OpenID Connect provider's configuration"
        );
        *provider = Some(Provider {
            discovery,
            jwks,
            jwks_fetched: Instant::now(),
        });
        Ok(())
    }

    async fn fetch_jwks(&self, url: &str) -> Result<JwkSet, OidcError> {
        self.get_json(url).await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let response = self.http.get(url).send().await.map_err(|error| {
            tracing::warn!(url, %error, "request to the OpenID Connect provider failed");
            OidcError::Unavailable
        })?;
        if !response.status().is_success() {
            tracing::warn!(url, status = %response.status(), "the OpenID Connect provider returned an error status");
            return Err(OidcError::Unavailable);
        }
        response.json().await.map_err(|error| {
            tracing::warn!(url, %error, "the OpenID Connect provider's response is not the expected JSON");
            OidcError::Unavailable
        })
    }
}
