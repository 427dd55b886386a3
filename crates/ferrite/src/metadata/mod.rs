//! Metadata: tenants, users, devices and credentials, and (in their own
//! modules) device profiles, the dead-letter log, alarms and action
//! deliveries.
//!
//! NOTE: profiles, dead letters, alarms and the identity tables (user
//! management, refresh tokens, scoped API keys, service accounts) are
//! inherent methods of [`SqliteMetadata`] rather than part of
//! [`MetadataStore`]; the trait grows to cover them when a second backend
//! (PostgreSQL) is built.
//!
//! [`MetadataStore`] is the seam for the scale-out backend; [`SqliteMetadata`]
//! is the embedded default, a SQLite file `metadata.db` in the data directory
//! opened in WAL mode, so the `ferrite device create` command can write while
//! the server runs. Migrations live in `migrations/` and run at open.

pub mod alarms;
pub mod audit;
pub mod credentials;
pub mod dead_letters;
pub mod device_cas;
pub mod device_tokens;
pub mod identity;
pub mod lorawan;
pub mod mqtt_retained;
pub mod profiles;
mod sqlite;
pub mod tenant_keys;
mod tenants;

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::ids::{AlarmId, ApiKeyId, DeviceId, ProfileId, TenantId, UserId};

pub use sqlite::SqliteMetadata;
pub use tenants::check_tenant_name;

/// Role of a person or service on the REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "invalid role {other:?}: expected admin, operator or viewer"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: UserId,
    pub tenant_id: TenantId,
    pub email: String,
    pub role: Role,
    #[serde(skip)]
    pub password_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Device {
    pub id: DeviceId,
    pub tenant_id: TenantId,
    pub name: String,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
    /// Time of the last accepted message in epoch milliseconds.
    pub last_seen_at: Option<i64>,
    /// Labels set through the API or written as line-protocol tags, newest
    /// value per label.
    pub labels: Labels,
    /// The device profile; `None` means telemetry JSON without schema or
    /// rules.
    pub profile_id: Option<ProfileId>,
    /// Server-side attributes set through the API, such as `location`.
    pub attributes: Attributes,
}

/// Server-side attributes of a device, by name.
pub type Attributes = serde_json::Map<String, serde_json::Value>;

/// Labels of a device, by name.
pub type Labels = std::collections::BTreeMap<String, String>;

#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
    /// Creation time in epoch milliseconds.
    pub created_at: i64,
}

/// Errors of the metadata layer. Domain errors are kept apart from database
/// failures so the API can return 404/409 without exposing internals.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("metadata database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("metadata migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

/// Storage of tenants, users, devices and credentials. Hashes are computed
/// by the caller (`auth`), so the store never receives a secret.
#[allow(async_fn_in_trait)]
pub trait MetadataStore: Send + Sync {
    async fn default_tenant(&self) -> Result<Tenant, MetadataError>;
    async fn count_users(&self) -> Result<i64, MetadataError>;
    async fn create_user(
        &self,
        tenant: TenantId,
        email: &str,
        password_hash: &str,
        role: Role,
    ) -> Result<User, MetadataError>;
    async fn user_by_email(&self, email: &str) -> Result<Option<User>, MetadataError>;
    async fn create_device(
        &self,
        tenant: TenantId,
        name: &str,
        token_hash: &[u8],
    ) -> Result<Device, MetadataError>;
    /// Creates the devices named in `new`, each with its token hash, in one
    /// transaction; names that already exist are skipped. Returns the
    /// names and ids of the devices it created.
    async fn create_devices(
        &self,
        tenant: TenantId,
        new: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, DeviceId)>, MetadataError>;
    /// Returns the ids of the devices among `names` that exist.
    async fn device_ids_by_names(
        &self,
        tenant: TenantId,
        names: &[String],
    ) -> Result<Vec<(String, DeviceId)>, MetadataError>;
    async fn device(&self, tenant: TenantId, id: DeviceId) -> Result<Device, MetadataError>;
    async fn device_by_name(
        &self,
        tenant: TenantId,
        name: &str,
    ) -> Result<Option<Device>, MetadataError>;
    async fn list_devices(
        &self,
        tenant: TenantId,
        limit: i64,
        offset: i64,
    ) -> Result<Vec<Device>, MetadataError>;
    async fn delete_device(&self, tenant: TenantId, id: DeviceId) -> Result<(), MetadataError>;
    /// Replaces the device's tokens by one new token and revokes the old ones.
    async fn rotate_device_token(
        &self,
        tenant: TenantId,
        id: DeviceId,
        token_hash: &[u8],
    ) -> Result<(), MetadataError>;
    /// Returns the device that owns an unrevoked token with this hash.
    async fn device_by_token_hash(
        &self,
        token_hash: &[u8],
    ) -> Result<Option<Device>, MetadataError>;
    async fn record_last_seen(&self, seen: &[(DeviceId, i64)]) -> Result<(), MetadataError>;
    /// Merges `labels` into each device's labels; a new value replaces the old one.
    async fn merge_labels(&self, labels: &[(DeviceId, Labels)]) -> Result<(), MetadataError>;
    async fn create_api_key(
        &self,
        tenant: TenantId,
        name: &str,
        role: Role,
        key_hash: &[u8],
    ) -> Result<ApiKey, MetadataError>;
    /// Revokes one API key; it stops working on the next request.
    async fn revoke_api_key(&self, tenant: TenantId, id: ApiKeyId) -> Result<(), MetadataError>;
    /// Revokes every unrevoked key of the tenant with this name; returns how many.
    async fn revoke_api_keys_named(
        &self,
        tenant: TenantId,
        name: &str,
    ) -> Result<u64, MetadataError>;
    /// Records new action deliveries as pending, each due at its creation
    /// time.
    async fn insert_action_deliveries(
        &self,
        deliveries: &[NewDelivery],
    ) -> Result<(), MetadataError>;
    /// Returns up to `limit` pending deliveries of every tenant whose next
    /// attempt is due at `now_ms`, the earliest first.
    async fn due_action_deliveries(
        &self,
        now_ms: i64,
        limit: i64,
    ) -> Result<Vec<Delivery>, MetadataError>;
    /// Stores the outcome of one attempt of a delivery.
    async fn record_action_attempt(
        &self,
        id: DeliveryId,
        result: &AttemptResult,
    ) -> Result<(), MetadataError>;
    async fn action_delivery(
        &self,
        tenant: TenantId,
        id: DeliveryId,
    ) -> Result<Delivery, MetadataError>;
    /// Lists the tenant's deliveries that match `filter`, the newest first.
    async fn list_action_deliveries(
        &self,
        tenant: TenantId,
        filter: &DeliveryFilter,
    ) -> Result<Vec<Delivery>, MetadataError>;
    /// Makes a delivery pending again with a new round of attempts that
    /// starts at `now_ms`, and returns it.
    async fn restart_action_delivery(
        &self,
        tenant: TenantId,
        id: DeliveryId,
        now_ms: i64,
    ) -> Result<Delivery, MetadataError>;
    /// Deletes succeeded deliveries last updated before `succeeded_before`
    /// and failed ones last updated before `failed_before` (epoch
    /// milliseconds); returns how many it deleted.
    async fn delete_finished_action_deliveries(
        &self,
        succeeded_before: i64,
        failed_before: i64,
    ) -> Result<u64, MetadataError>;
}

/// Id of one action delivery: a UUID v7, so that ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeliveryId(pub uuid::Uuid);

impl DeliveryId {
    pub fn new_v7() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl fmt::Display for DeliveryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for DeliveryId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

/// Kind of an action, as stored and shown by the deliveries API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Webhook,
    MqttPublish,
    Command,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Webhook => "webhook",
            ActionKind::MqttPublish => "mqtt_publish",
            ActionKind::Command => "command",
        }
    }
}

impl FromStr for ActionKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "webhook" => Ok(ActionKind::Webhook),
            "mqtt_publish" => Ok(ActionKind::MqttPublish),
            "command" => Ok(ActionKind::Command),
            other => Err(format!(
                "invalid action kind {other:?}: expected webhook, mqtt_publish or command"
            )),
        }
    }
}

/// State of a delivery. Pending deliveries have a next attempt time;
/// succeeded and failed ones are final until a manual retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    Pending,
    Succeeded,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Succeeded => "succeeded",
            DeliveryStatus::Failed => "failed",
        }
    }
}

impl FromStr for DeliveryStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(DeliveryStatus::Pending),
            "succeeded" => Ok(DeliveryStatus::Succeeded),
            "failed" => Ok(DeliveryStatus::Failed),
            other => Err(format!(
                "invalid delivery status {other:?}: expected pending, succeeded or failed"
            )),
        }
    }
}

/// A delivery to record: one action run for one alarm change.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: DeliveryId,
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub alarm_id: Option<AlarmId>,
    pub kind: ActionKind,
    /// Destination of the action as the API shows it, without credentials.
    pub target: String,
    /// Event name such as `alarm.raised`.
    pub event: String,
    /// The action as JSON, secret included, so that retries after a
    /// restart send the same request.
    pub spec: String,
    /// The device and the alarm as JSON, the body without `sent_at`.
    pub payload: String,
    /// Epoch milliseconds.
    pub created_at: i64,
}

/// A recorded delivery. `spec` and `payload` are never shown by the API.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub id: DeliveryId,
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub alarm_id: Option<AlarmId>,
    pub kind: ActionKind,
    pub target: String,
    pub event: String,
    #[serde(skip)]
    pub spec: String,
    #[serde(skip)]
    pub payload: String,
    pub status: DeliveryStatus,
    /// Attempts made in the current round (since creation or the last
    /// manual retry).
    pub attempts: u32,
    pub last_error: Option<String>,
    /// HTTP status of the last webhook response.
    pub last_status_code: Option<u16>,
    /// Epoch milliseconds; set only while pending.
    pub next_attempt_at: Option<i64>,
    /// Start of the current round of attempts in epoch milliseconds, from
    /// which `actions.max_age` counts.
    #[serde(skip)]
    pub started_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The outcome of one attempt, written over the delivery's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub last_status_code: Option<u16>,
    pub next_attempt_at: Option<i64>,
    pub updated_at: i64,
}

/// Filter and page of a deliveries list.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub alarm_id: Option<AlarmId>,
    /// Only deliveries created before this one (paging).
    pub before: Option<DeliveryId>,
    pub limit: i64,
}
