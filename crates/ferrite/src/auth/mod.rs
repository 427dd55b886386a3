//! Authentication of devices and of people and services.
//!
//! - Device access tokens and API keys are 192 random bits, shown once and
//!   stored as SHA-256 hashes. A slow hash adds nothing for secrets of that
//!   strength, and it would cost a slow hash per MQTT connect and HTTP request.
//! - Passwords are hashed with argon2id.
//! - JWT access tokens are HS256, signed with a 256-bit key generated on
//!   first start and kept in `jwt.key` in the data directory (mode 0600);
//!   see [`tokens`] for what is checked. Refresh tokens are opaque, stored
//!   as SHA-256 hashes, and rotated on every use ([`sessions`]).
//! - API keys and service accounts may carry [`scopes`] that narrow their
//!   role.
//!
//! Device token lookups are cached in memory by hash. The cache entry is
//! dropped when the token is rotated or the device deleted through this
//! process; a token revoked by another process stops working after at most
//! [`DEVICE_CACHE_TTL`].

pub mod dtls;
pub mod oidc;
pub mod passwords;
pub mod revocation;
pub mod scopes;
mod secrets;
mod sessions;
mod throttle;
pub mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

use crate::config::AuthConfig;
use crate::ids::{ApiKeyId, DeviceId, ServiceAccountId, TenantId, UserId};
use crate::metadata::{MetadataError, MetadataStore, Role, SqliteMetadata};
use scopes::{Scope, Scopes};
use tokens::{JwtKeys, SubjectKind};

pub use secrets::{
    DEVICE_TOKEN_PREFIX, generate_api_key, generate_device_token, hash_password, hash_secret,
    verify_password,
};
pub use sessions::TokenPair;
pub use throttle::LoginThrottle;

/// Password hashes (argon2id) verified at the same time; more logins wait.
/// A fixed number, not derived from the machine's core count.
const MAX_CONCURRENT_HASHES: usize = 4;

/// How long a cached device token lookup is trusted.
pub const DEVICE_CACHE_TTL: Duration = Duration::from_secs(30);

/// An authenticated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub name: String,
    /// Selects the payload codec; see `crate::profiles`.
    pub profile_id: Option<crate::ids::ProfileId>,
}

impl DeviceIdentity {
    /// Describes the access of a connection of this device, for matching
    /// revocation events. `token_hash` is the access token it presented.
    pub fn held_access(&self, token_hash: Option<[u8; 32]>) -> revocation::HeldAccess {
        revocation::HeldAccess {
            tenant: Some(self.tenant_id),
            device: Some(self.device_id),
            device_token: token_hash,
            ..revocation::HeldAccess::default()
        }
    }
}

/// An authenticated person or service calling the REST API.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub role: Role,
    pub subject: Subject,
    /// Scopes that narrow the role (API keys and service accounts);
    /// `None` allows everything the role allows.
    pub scopes: Option<Scopes>,
}

impl Principal {
    /// Returns whether the principal's scopes allow `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .as_ref()
            .is_none_or(|scopes| scopes.allows(scope))
    }

    /// Fails unless the principal's scopes allow `scope`.
    pub fn require_scope(&self, scope: Scope) -> Result<(), AuthError> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(AuthError::ScopeMissing { scope })
        }
    }
}

#[derive(Debug, Clone)]
pub enum Subject {
    User(UserId),
    ApiKey(String),
    ServiceAccount(ServiceAccountId),
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::User(id) => write!(f, "user {id}"),
            Subject::ApiKey(name) => write!(f, "API key {name:?}"),
            Subject::ServiceAccount(id) => write!(f, "service account {id}"),
        }
    }
}

impl Principal {
    /// Describes the access of a connection of this principal, for
    /// matching revocation events. `bearer` is the credential it presented;
    /// an API key is held by its hash.
    pub fn held_access(&self, bearer: Option<&str>) -> revocation::HeldAccess {
        revocation::HeldAccess {
            tenant: Some(self.tenant_id),
            user: match &self.subject {
                Subject::User(id) => Some(*id),
                Subject::ApiKey(_) | Subject::ServiceAccount(_) => None,
            },
            service_account: match &self.subject {
                Subject::ServiceAccount(id) => Some(*id),
                Subject::User(_) | Subject::ApiKey(_) => None,
            },
            api_key_hash: bearer.filter(|token| is_api_key(token)).map(hash_secret),
            ..revocation::HeldAccess::default()
        }
    }
}

/// The credential of a long-lived connection, kept to check it again
/// while the connection is open ([`Auth::recheck`]). It contains hashes and
/// ids, never the secret itself.
#[derive(Debug, Clone)]
pub enum HeldCredential {
    DeviceToken([u8; 32]),
    ApiKey([u8; 32]),
    /// A user who sent an email and password. The password is not kept, so
    /// a changed password does not end the connection, but a deleted user
    /// does.
    User {
        email: String,
        id: UserId,
    },
    /// A TLS client certificate, by its SHA-256 fingerprint, and the
    /// device it authenticated.
    Certificate {
        fingerprint: [u8; 32],
        device: DeviceId,
        trust: CertificateTrust,
        /// End of the certificate's validity in Unix seconds; the session
        /// ends at the first re-check after it.
        not_after: i64,
    },
}

/// The trust path that accepted a client certificate, kept to check it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateTrust {
    /// Its fingerprint is registered on the device.
    Registered,
    /// It chains to the tenant's device CA with this SHA-256 fingerprint.
    DeviceCa([u8; 32]),
    /// It chains to `tls.client_ca_file`, which changes only with a restart.
    ClientCaFile,
}

impl HeldCredential {
    pub fn device_token(token: &str) -> Self {
        Self::DeviceToken(hash_secret(token))
    }

    pub fn api_key(key: &str) -> Self {
        Self::ApiKey(hash_secret(key))
    }
}

/// The result of [`Auth::recheck`]: a device, or a person or service.
#[derive(Debug, Clone)]
pub enum Identity {
    Device(DeviceIdentity),
    Principal(Principal),
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the access token is invalid or revoked")]
    InvalidDeviceToken,
    #[error("invalid email or password")]
    InvalidLogin,
    #[error("the client certificate expired, or its registration, CA or device was removed")]
    InvalidCertificate,
    #[error("the bearer token is invalid, expired or revoked")]
    InvalidBearer,
    /// Contains a sentence on what is wrong with the access token.
    #[error("{0}")]
    InvalidAccessToken(String),
    /// Contains a sentence on what is wrong with the refresh token.
    #[error("{0}")]
    InvalidRefreshToken(String),
    #[error("the API key expired; an admin can create a new one with POST /api/v1/api-keys")]
    ApiKeyExpired,
    #[error(
        "the credential's scopes do not include {scope}, which this request needs; use a credential with that scope"
    )]
    ScopeMissing { scope: Scope },
    #[error(transparent)]
    Oidc(#[from] oidc::OidcError),
    #[error(
        "a device access token only writes the device's telemetry; read the API with a JWT from POST /api/v1/auth/login or an API key"
    )]
    DeviceTokenNotAllowed,
    #[error(
        "too many failed logins from this address or for this account; retry in {} s",
        retry_after.as_secs().max(1)
    )]
    Throttled { retry_after: Duration },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

struct CachedDevice {
    identity: DeviceIdentity,
    fetched: Instant,
}

/// How long a device token that matched no device is rejected without a
/// database lookup. Tokens are random and issued once, so a token
/// rejected now cannot become valid later.
const REJECTED_TOKEN_TTL: Duration = Duration::from_secs(10);
/// Maximum rejected token hashes kept. When the map is full, the expired
/// hashes are dropped, and all of them if none has expired.
const MAX_REJECTED_TOKENS: usize = 4096;

/// Hashes of device tokens that matched no device, so that floods with
/// invalid tokens cost no database lookup each.
#[derive(Default)]
struct RejectedTokens {
    hashes: HashMap<[u8; 32], Instant>,
}

impl RejectedTokens {
    fn contains(&self, hash: &[u8; 32], now: Instant) -> bool {
        self.hashes
            .get(hash)
            .is_some_and(|rejected| now.duration_since(*rejected) < REJECTED_TOKEN_TTL)
    }

    fn insert(&mut self, hash: [u8; 32], now: Instant) {
        if self.hashes.len() >= MAX_REJECTED_TOKENS {
            self.hashes
                .retain(|_, rejected| now.duration_since(*rejected) < REJECTED_TOKEN_TTL);
        }
        if self.hashes.len() >= MAX_REJECTED_TOKENS {
            self.hashes.clear();
        }
        self.hashes.insert(hash, now);
    }
}

/// Shortest time between two warnings about failed authentication of one kind.
const FAILURE_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Rate limit for warnings about failed authentication: one line per
/// interval per kind, with the number of failures it stands for.
#[derive(Default)]
struct FailureLog {
    last: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl FailureLog {
    /// Returns the failures since the last warning when a warning is due.
    fn due(&self, kind: &'static str) -> Option<u64> {
        let mut last = self.last.lock();
        let now = Instant::now();
        let entry = last.entry(kind).or_insert((now - FAILURE_WARN_INTERVAL, 0));
        entry.1 += 1;
        if now.duration_since(entry.0) < FAILURE_WARN_INTERVAL {
            return None;
        }
        let failures = entry.1;
        *entry = (now, 0);
        Some(failures)
    }
}

pub struct Auth {
    metadata: Arc<SqliteMetadata>,
    failures: FailureLog,
    /// Failed password and API key checks per source address and account.
    throttle: LoginThrottle,
    /// Password hashes running at once, so that a burst of logins cannot
    /// take every thread of the blocking pool.
    hash_slots: tokio::sync::Semaphore,
    keys: JwtKeys,
    access_token_ttl: Duration,
    refresh_token_ttl: Duration,
    device_cache: Mutex<HashMap<[u8; 32], CachedDevice>>,
    rejected_tokens: Mutex<RejectedTokens>,
    revocations: revocation::Revocations,
    /// Refresh token families revoked by this process, with the time of
    /// revocation, so that their access tokens stop working at once. An
    /// entry is dropped once every access token of the family has expired.
    revoked_sessions: Mutex<HashMap<String, Instant>>,
    /// Service accounts revoked by this process, kept like
    /// `revoked_sessions`.
    revoked_services: Mutex<HashMap<ServiceAccountId, Instant>>,
    /// When each API key's last use was written to the database; writes
    /// happen at most once per [`API_KEY_USE_INTERVAL`] per key.
    api_key_uses: Mutex<HashMap<ApiKeyId, Instant>>,
    /// Login through an OpenID Connect provider, when configured.
    oidc: Option<oidc::Oidc>,
    /// Epoch milliseconds of the last deletion of stale refresh tokens.
    last_refresh_cleanup: std::sync::atomic::AtomicI64,
}

/// Shortest time between two writes of an API key's last use.
const API_KEY_USE_INTERVAL: Duration = Duration::from_secs(60);

impl Auth {
    /// Loads the JWT signing key from `data_dir/jwt.key`, creating it on first start.
    /// Reads the OpenID Connect client secret when `config.oidc` is set.
    pub fn open(
        data_dir: &Path,
        metadata: Arc<SqliteMetadata>,
        config: &AuthConfig,
    ) -> anyhow::Result<Self> {
        let key = secrets::load_or_create_key(&data_dir.join("jwt.key"))?;
        let oidc = if config.oidc.enabled() {
            Some(oidc::Oidc::new(config.oidc.clone())?)
        } else {
            None
        };
        Ok(Self {
            metadata,
            keys: JwtKeys::from_secret(&key)?,
            access_token_ttl: config.access_token_ttl,
            refresh_token_ttl: config.refresh_token_ttl,
            revoked_sessions: Mutex::new(HashMap::new()),
            revoked_services: Mutex::new(HashMap::new()),
            api_key_uses: Mutex::new(HashMap::new()),
            oidc,
            last_refresh_cleanup: std::sync::atomic::AtomicI64::new(0),
            device_cache: Mutex::new(HashMap::new()),
            rejected_tokens: Mutex::new(RejectedTokens::default()),
            revocations: revocation::Revocations::default(),
            failures: FailureLog::default(),
            throttle: LoginThrottle::default(),
            hash_slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_HASHES),
        })
    }

    /// Resolves a device access token to its device.
    pub async fn authenticate_device(&self, token: &str) -> Result<DeviceIdentity, AuthError> {
        let hash = hash_secret(token);
        if let Some(cached) = self.device_cache.lock().get(&hash)
            && cached.fetched.elapsed() < DEVICE_CACHE_TTL
        {
            return Ok(cached.identity.clone());
        }
        if self.rejected_tokens.lock().contains(&hash, Instant::now()) {
            return Err(AuthError::InvalidDeviceToken);
        }

        let Some(device) = self.metadata.device_by_token_hash(&hash).await? else {
            self.rejected_tokens.lock().insert(hash, Instant::now());
            // The hash prefix lets an operator match repeated attempts
            // without the token itself reaching the log.
            if let Some(failures) = self.failures.due("device_token") {
                tracing::warn!(
                    token_hash = hex::encode(&hash[..4]),
                    failures,
                    "rejected an invalid or revoked device access token"
                );
            }
            return Err(AuthError::InvalidDeviceToken);
        };
        let identity = DeviceIdentity {
            tenant_id: device.tenant_id,
            device_id: device.id,
            name: device.name,
            profile_id: device.profile_id,
        };
        self.device_cache.lock().insert(
            hash,
            CachedDevice {
                identity: identity.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(identity)
    }

    /// Checks again a credential that authenticated a long-lived
    /// connection. Returns the current identity, with the current role, or
    /// an error when the token or key was revoked or the user deleted.
    pub async fn recheck(&self, credential: &HeldCredential) -> Result<Identity, AuthError> {
        match credential {
            HeldCredential::DeviceToken(hash) => {
                if let Some(cached) = self.device_cache.lock().get(hash)
                    && cached.fetched.elapsed() < DEVICE_CACHE_TTL
                {
                    return Ok(Identity::Device(cached.identity.clone()));
                }
                let device = self
                    .metadata
                    .device_by_token_hash(hash)
                    .await?
                    .ok_or(AuthError::InvalidDeviceToken)?;
                Ok(Identity::Device(DeviceIdentity {
                    tenant_id: device.tenant_id,
                    device_id: device.id,
                    name: device.name,
                    profile_id: device.profile_id,
                }))
            }
            HeldCredential::ApiKey(hash) => {
                let key = self
                    .metadata
                    .api_key_record_by_hash(hash)
                    .await?
                    .ok_or(AuthError::InvalidBearer)?;
                Ok(Identity::Principal(api_key_principal(key)?))
            }
            HeldCredential::Certificate {
                fingerprint,
                device,
                trust,
                not_after,
            } => {
                let now = rustls::pki_types::UnixTime::now().as_secs();
                if i64::try_from(now).unwrap_or(i64::MAX) >= *not_after {
                    return Err(AuthError::InvalidCertificate);
                }
                let device = self
                    .metadata
                    .device_by_id_any_tenant(*device)
                    .await?
                    .ok_or(AuthError::InvalidCertificate)?;
                let trusted = match trust {
                    CertificateTrust::Registered => {
                        self.metadata
                            .device_certificate_registered(device.id, fingerprint)
                            .await?
                    }
                    CertificateTrust::DeviceCa(ca) => self
                        .metadata
                        .device_ca(device.tenant_id, ca)
                        .await?
                        .is_some(),
                    CertificateTrust::ClientCaFile => true,
                };
                if !trusted {
                    return Err(AuthError::InvalidCertificate);
                }
                Ok(Identity::Device(DeviceIdentity {
                    tenant_id: device.tenant_id,
                    device_id: device.id,
                    name: device.name,
                    profile_id: device.profile_id,
                }))
            }
            HeldCredential::User { email, id } => {
                let user = self
                    .metadata
                    .user_by_email(email)
                    .await?
                    .filter(|user| user.id == *id)
                    .ok_or(AuthError::InvalidLogin)?;
                Ok(Identity::Principal(Principal {
                    tenant_id: user.tenant_id,
                    role: user.role,
                    subject: Subject::User(user.id),
                    scopes: None,
                }))
            }
        }
    }

    /// Returns the throttle of password, API key and client secret checks.
    pub fn throttle(&self) -> &LoginThrottle {
        &self.throttle
    }

    /// Returns the failures of `kind` since the last warning when another
    /// warning is due, so that floods log one line per interval.
    pub fn failure_due(&self, kind: &'static str) -> Option<u64> {
        self.failures.due(kind)
    }

    /// Describes what a connection authenticated by `credential` as
    /// `identity` holds, for matching revocation events. An API key is
    /// looked up once for its id; when the lookup fails, events that name
    /// the key by hash still match, and the periodic re-check catches the
    /// rest.
    pub async fn held_access(
        &self,
        credential: &HeldCredential,
        identity: &Identity,
    ) -> revocation::HeldAccess {
        match (credential, identity) {
            (HeldCredential::DeviceToken(hash), Identity::Device(device)) => {
                device.held_access(Some(*hash))
            }
            (HeldCredential::ApiKey(hash), Identity::Principal(principal)) => {
                let mut held = principal.held_access(None);
                held.api_key_hash = Some(*hash);
                match self.metadata.api_key_record_by_hash(hash).await {
                    Ok(key) => held.api_key_id = key.map(|key| key.id),
                    Err(error) => {
                        tracing::warn!(%error, "cannot look up the id of an API key; its connection ends on revocation at the next periodic re-check")
                    }
                }
                held
            }
            (
                HeldCredential::Certificate {
                    fingerprint, trust, ..
                },
                Identity::Device(device),
            ) => {
                let mut held = device.held_access(None);
                held.certificate = Some(*fingerprint);
                if let CertificateTrust::DeviceCa(ca) = trust {
                    held.ca_certificate = Some(*ca);
                }
                held
            }
            (_, Identity::Device(device)) => device.held_access(None),
            (_, Identity::Principal(principal)) => principal.held_access(None),
        }
    }

    /// Drops the cached lookup of one device token, so that its revocation
    /// takes effect at once in this process.
    pub fn forget_token(&self, hash: &[u8; 32]) {
        self.device_cache.lock().remove(hash);
    }

    /// Returns the revocation events of this process. Publish when a
    /// credential is taken away; subscribe to end the connections using it.
    pub fn revocations(&self) -> &revocation::Revocations {
        &self.revocations
    }

    /// Drops every cached token of `device`, so a rotated or deleted
    /// credential stops working at once in this process.
    pub fn forget_device(&self, device: DeviceId) {
        self.device_cache
            .lock()
            .retain(|_, cached| cached.identity.device_id != device);
    }

    /// Checks an email and password without issuing a token, for clients
    /// that send them on every connection (MQTT applications).
    pub async fn authenticate_user(
        &self,
        email: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        let user = self.verify_login(email, password, peer).await?;
        Ok(Principal {
            tenant_id: user.tenant_id,
            role: user.role,
            subject: Subject::User(user.id),
            scopes: None,
        })
    }

    /// Returns the user with this email when the password matches. While
    /// `peer` or `email` has too many recent failures, the attempt is
    /// rejected without hashing the password.
    async fn verify_login(
        &self,
        email: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<crate::metadata::User, AuthError> {
        self.throttle.check(peer, Some(email))?;
        let user = self.metadata.user_by_email(email).await?;

        // Verify against a fixed hash when the user does not exist, so the
        // response time does not reveal which emails are registered.
        let hash = user
            .as_ref()
            .map(|user| user.password_hash.clone())
            .unwrap_or_else(|| secrets::DUMMY_PASSWORD_HASH.to_owned());
        let password = password.to_owned();
        // Acquiring fails only on a closed semaphore, and this one is never closed.
        let _slot = self.hash_slots.acquire().await.ok();
        let valid = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        let Some(user) = user.filter(|_| valid) else {
            self.throttle.record_failure(peer, Some(email));
            if let Some(failures) = self.failures.due("login") {
                tracing::warn!(
                    email,
                    failures,
                    "rejected a login with a wrong email or password"
                );
            }
            return Err(AuthError::InvalidLogin);
        };
        self.throttle.record_success(peer, email);
        Ok(user)
    }

    /// Resolves an API key to its tenant, role and scopes.
    pub async fn authenticate_api_key(&self, key: &str) -> Result<Principal, AuthError> {
        self.authenticate_api_key_from(key, None).await
    }

    /// Resolves an API key sent from `peer`, rejecting it while the address
    /// has too many recent failures. An expired key is rejected with its
    /// own error and is not counted as a guess.
    pub async fn authenticate_api_key_from(
        &self,
        key: &str,
        peer: Option<IpAddr>,
    ) -> Result<Principal, AuthError> {
        self.throttle.check(peer, None)?;
        let hash = hash_secret(key);
        let Some(key) = self.metadata.api_key_record_by_hash(&hash).await? else {
            self.throttle.record_failure(peer, None);
            if let Some(failures) = self.failures.due("api_key") {
                tracing::warn!(
                    key_hash = hex::encode(&hash[..4]),
                    failures,
                    "rejected an unknown or revoked API key"
                );
            }
            return Err(AuthError::InvalidBearer);
        };
        let id = key.id;
        let principal = api_key_principal(key)?;
        self.record_api_key_use(id);
        Ok(principal)
    }

    /// Writes the key's last use in the background, at most once per
    /// [`API_KEY_USE_INTERVAL`].
    fn record_api_key_use(&self, id: ApiKeyId) {
        let now = Instant::now();
        {
            let mut uses = self.api_key_uses.lock();
            if uses
                .get(&id)
                .is_some_and(|written| now.duration_since(*written) < API_KEY_USE_INTERVAL)
            {
                return;
            }
            if uses.len() >= 100_000 {
                uses.retain(|_, written| now.duration_since(*written) < API_KEY_USE_INTERVAL);
            }
            uses.insert(id, now);
        }
        let metadata = self.metadata.clone();
        tokio::spawn(async move {
            let at = chrono::Utc::now().timestamp_millis();
            if let Err(error) = metadata.record_api_key_use(id, at).await {
                tracing::warn!(api_key_id = %id, %error, "recording the last use of an API key failed");
            }
        });
    }

    /// Resolves an `Authorization` bearer value: a JWT access token or an API key.
    pub async fn authenticate_bearer(&self, token: &str) -> Result<Principal, AuthError> {
        if token.starts_with(secrets::DEVICE_TOKEN_PREFIX) {
            return Err(AuthError::DeviceTokenNotAllowed);
        }
        if is_api_key(token) {
            return self.authenticate_api_key(token).await;
        }
        if token.starts_with(tokens::REFRESH_TOKEN_PREFIX) {
            return Err(AuthError::InvalidAccessToken(
                "this is a refresh token; exchange it for an access token with POST /api/v1/auth/refresh".to_owned(),
            ));
        }

        let claims = match self.keys.verify(token) {
            Ok(claims) => claims,
            Err(reason) => {
                if let Some(failures) = self.failures.due("jwt") {
                    tracing::warn!(reason, failures, "rejected an access token");
                }
                return Err(AuthError::InvalidAccessToken(reason));
            }
        };
        let invalid = |what: &str| {
            AuthError::InvalidAccessToken(format!("the access token's {what} is invalid"))
        };
        let tenant_id = claims.tenant.parse().map_err(|_| invalid("tenant"))?;
        let (subject, scopes) = match claims.kind {
            SubjectKind::User => {
                let id = claims.sub.parse().map_err(|_| invalid("sub"))?;
                if claims
                    .sid
                    .as_deref()
                    .is_some_and(|sid| self.session_revoked(sid))
                {
                    return Err(AuthError::InvalidAccessToken(
                        "the access token's login was revoked (logout, or a change of the account's password or role); log in again".to_owned(),
                    ));
                }
                (Subject::User(id), None)
            }
            SubjectKind::Service => {
                let id = claims.sub.parse().map_err(|_| invalid("sub"))?;
                if self.service_revoked(id) {
                    return Err(AuthError::InvalidAccessToken(
                        "the service account of this access token was deleted".to_owned(),
                    ));
                }
                let scopes = claims
                    .scope
                    .as_deref()
                    .map(Scopes::parse)
                    .transpose()
                    .map_err(|_| invalid("scope"))?;
                (Subject::ServiceAccount(id), scopes)
            }
        };
        Ok(Principal {
            tenant_id,
            role: claims.role,
            subject,
            scopes,
        })
    }
}

/// Builds the principal of a stored API key, rejecting an expired one.
fn api_key_principal(key: crate::metadata::identity::ApiKeyRecord) -> Result<Principal, AuthError> {
    if key
        .expires_at
        .is_some_and(|expires_at| expires_at <= chrono::Utc::now().timestamp_millis())
    {
        return Err(AuthError::ApiKeyExpired);
    }
    let scopes = key
        .scopes
        .as_deref()
        .map(Scopes::parse)
        .transpose()
        .map_err(|message| {
            tracing::error!(api_key_id = %key.id, message, "stored API key scopes are invalid");
            AuthError::InvalidBearer
        })?;
    Ok(Principal {
        tenant_id: key.tenant_id,
        role: key.role,
        subject: Subject::ApiKey(key.name),
        scopes,
    })
}

/// Returns whether `text` has the form of an API key (its prefix), so that
/// callers can tell keys from device tokens, JWTs and passwords.
pub fn is_api_key(text: &str) -> bool {
    text.starts_with(secrets::API_KEY_PREFIX)
}

/// Checks a new password of the account `email` against the rules in
/// [`passwords`].
pub fn check_password_rules(password: &str, email: &str) -> anyhow::Result<()> {
    passwords::check_password_rules(password, Some(email))
        .map_err(|message| anyhow::anyhow!(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejected_tokens_expire_and_stay_bounded() {
        let mut rejected = RejectedTokens::default();
        let now = Instant::now();
        rejected.insert([1; 32], now);
        assert!(rejected.contains(&[1; 32], now));
        assert!(!rejected.contains(&[2; 32], now));
        assert!(!rejected.contains(&[1; 32], now + REJECTED_TOKEN_TTL));

        for index in 0..(MAX_REJECTED_TOKENS as u32 + 10) {
            let mut hash = [0; 32];
            hash[..4].copy_from_slice(&index.to_be_bytes());
            rejected.insert(hash, now);
        }
        assert!(rejected.hashes.len() <= MAX_REJECTED_TOKENS);
    }
}
