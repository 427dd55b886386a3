//! Device profiles: the settings shared by a kind of device (payload codec,
//! key schema, transformations, enrichment, rules and retention), and the
//! directory through which pipeline workers and adapters read profiles and
//! devices.
//!
//! Profiles are documents (see [`spec`]) stored in the metadata database,
//! managed over the REST API and exported and imported as YAML or JSON
//! files. A profile is checked completely when it is saved: every problem is
//! reported at once, naming the field, so a saved profile always compiles.
//!
//! ## Processing order
//! decode (codec) → transform (steps in order) → validate (schema) → store →
//! rules. A message is stored whole or not at all: the first failing step
//! sends the whole envelope to the dead-letter log with the reason.

pub mod process;
pub mod spec;
pub mod units;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

pub use process::{Field, Processor, Record, Rejection, Stage};
pub use spec::{CodecSpec, ProfileSpec};

use crate::ids::{DeviceId, ProfileId, TenantId};
use crate::ingest::ContentType;
use crate::metadata::profiles::StoredProfile;
use crate::metadata::{Attributes, Device, Labels, SqliteMetadata};
use crate::rules::CompiledRule;

/// Shortens `text` for a message.
pub fn preview(text: &str) -> String {
    const MAX_PREVIEW_CHARS: usize = 64;

    if text.chars().count() <= MAX_PREVIEW_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_PREVIEW_CHARS).collect();
    format!("{cut}... ({} bytes)", text.len())
}

/// A profile checked and ready for the pipeline.
#[derive(Debug)]
pub struct CompiledProfile {
    pub id: ProfileId,
    pub tenant_id: TenantId,
    pub version: i64,
    pub name: Arc<str>,
    pub spec: ProfileSpec,
    pub processor: Processor,
    pub rules: Vec<CompiledRule>,
}

impl CompiledProfile {
    /// Checks a profile document. Returns every problem, each naming its
    /// field.
    pub fn compile(
        id: ProfileId,
        tenant_id: TenantId,
        version: i64,
        spec: ProfileSpec,
    ) -> Result<CompiledProfile, Vec<String>> {
        let mut problems = check_header(&spec);
        let processor = Processor::new(&spec).map_err(|found| problems.extend(found));
        let rules = crate::rules::compile(&spec.rules).map_err(|found| problems.extend(found));
        match (processor, rules) {
            (Ok(processor), Ok(rules)) if problems.is_empty() => Ok(CompiledProfile {
                id,
                tenant_id,
                version,
                name: spec.name.as_str().into(),
                spec,
                processor,
                rules,
            }),
            _ => Err(problems),
        }
    }

    pub fn from_stored(stored: StoredProfile) -> Result<CompiledProfile, Vec<String>> {
        CompiledProfile::compile(stored.id, stored.tenant_id, stored.version, stored.spec)
    }
}

fn check_header(spec: &ProfileSpec) -> Vec<String> {
    let mut problems = Vec::new();
    let name = spec.name.trim();
    if name.is_empty() || spec.name.len() > spec::MAX_NAME_BYTES {
        problems.push(format!("name must be 1 to {} bytes", spec::MAX_NAME_BYTES));
    } else if name != spec.name || spec.name.chars().any(char::is_control) {
        problems.push(format!(
            "name {:?} has surrounding spaces or control characters",
            preview(&spec.name)
        ));
    }
    if let CodecSpec::Script {
        script,
        max_run_time,
    } = &spec.codec
    {
        if script.len() > spec::MAX_SCRIPT_BYTES {
            problems.push(format!(
                "codec.script is {} bytes; the limit is {} bytes",
                script.len(),
                spec::MAX_SCRIPT_BYTES
            ));
        }
        if let Some(limit) = max_run_time
            && (limit.is_zero() || *limit > Duration::from_secs(5))
        {
            problems.push("codec.max_run_time must be between 1 ms and 5 s".to_owned());
        } else if script.len() <= spec::MAX_SCRIPT_BYTES
            && let Err(error) = ferrite_script::Decoder::compile(
                script,
                ferrite_script::Limits {
                    max_run_time: max_run_time.unwrap_or(Duration::from_millis(100)),
                    ..ferrite_script::Limits::default()
                },
            )
        {
            // Compiling evaluates the script's top level (about 0.2 ms), which
            // finds syntax errors and a missing decodeUplink at save time.
            problems.push(format!("codec.script: {error}"));
        }
    }
    if let Some(retention) = spec.retention
        && retention < Duration::from_secs(3600)
    {
        problems.push("retention must be at least 1h".to_owned());
    }
    problems
}

/// The formats a profile document may be read from and written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentFormat {
    Json,
    Yaml,
}

/// Reads one or more profile documents: a JSON object or array, or YAML with
/// one profile per document (`---` separated) or a list.
pub fn parse_documents(text: &str, format: DocumentFormat) -> Result<Vec<ProfileSpec>, String> {
    match format {
        DocumentFormat::Json => {
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|error| format!("the body is not valid JSON: {error}"))?;
            let items = match value {
                serde_json::Value::Array(items) => items,
                other => vec![other],
            };
            items
                .into_iter()
                .enumerate()
                .map(|(index, item)| {
                    serde_json::from_value(item)
                        .map_err(|error| format!("profile {index}: {error}"))
                })
                .collect()
        }
        DocumentFormat::Yaml => {
            // Documents go through JSON values: serde_yaml_ng reads
            // externally tagged enums (`- rename: {...}`) only from its own
            // tagged syntax, while the same maps read fine as JSON.
            let mut specs = Vec::new();
            for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
                let value = <serde_json::Value as serde::Deserialize>::deserialize(document)
                    .map_err(|error| format!("YAML document {index}: {error}"))?;
                match value {
                    serde_json::Value::Null => {}
                    serde_json::Value::Array(items) => {
                        for item in items {
                            specs.push(serde_json::from_value(item).map_err(|error| {
                                format!("YAML document {index}, profile {}: {error}", specs.len())
                            })?);
                        }
                    }
                    other => specs.push(
                        serde_json::from_value(other)
                            .map_err(|error| format!("YAML document {index}: {error}"))?,
                    ),
                }
            }
            Ok(specs)
        }
    }
}

/// Writes profiles as YAML documents separated by `---`. They go through
/// JSON values, so enums come out as plain maps (`- rename: {...}`) rather
/// than YAML tags, which [`parse_documents`] and people read alike.
pub fn to_yaml(specs: &[&ProfileSpec]) -> String {
    let mut out = String::new();
    for spec in specs {
        let value = serde_json::to_value(spec).unwrap_or_default();
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&value).unwrap_or_default());
    }
    out
}

/// Device properties the pipeline reads for every message.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: DeviceId,
    pub tenant_id: TenantId,
    pub name: Arc<str>,
    pub profile_id: Option<ProfileId>,
    pub labels: Arc<Labels>,
    pub attributes: Arc<Attributes>,
}

impl From<Device> for DeviceInfo {
    fn from(device: Device) -> Self {
        DeviceInfo {
            id: device.id,
            tenant_id: device.tenant_id,
            name: device.name.into(),
            profile_id: device.profile_id,
            labels: Arc::new(device.labels),
            attributes: Arc::new(device.attributes),
        }
    }
}

/// How long a cached device is used before it is read again, so changes
/// made by another process (the CLI, another node) arrive eventually. The
/// API invalidates devices it changes at once.
const DEVICE_CACHE_TTL: Duration = Duration::from_secs(30);

/// Cached profiles and devices, shared by the pipeline workers, the adapters
/// and the API (which invalidates what it changes).
pub struct Directory {
    metadata: Arc<SqliteMetadata>,
    profiles: RwLock<HashMap<ProfileId, Arc<CompiledProfile>>>,
    devices: RwLock<HashMap<DeviceId, (Arc<DeviceInfo>, Instant)>>,
    /// Grows with every change the API makes to a device. A database read
    /// that started before a change must not refill the cache with what it
    /// read.
    device_changes: std::sync::atomic::AtomicU64,
}

/// A profile that is stored but does not compile (saved by an older
/// version with other rules): the pipeline sends its devices' messages to
/// the dead-letter log with this reason.
#[derive(Debug, Clone)]
pub struct BrokenProfile(pub String);

impl Directory {
    pub fn new(metadata: Arc<SqliteMetadata>) -> Directory {
        Directory {
            metadata,
            profiles: RwLock::default(),
            devices: RwLock::default(),
            device_changes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Creates a directory whose database is never reached, for tests of
    /// the cache alone.
    #[cfg(test)]
    pub fn new_for_tests() -> Directory {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(":memory:");
        let pool = sqlx::sqlite::SqlitePoolOptions::new().connect_lazy_with(options);
        Directory::new(Arc::new(SqliteMetadata::from_pool(pool)))
    }

    /// Returns a device, from the cache or the database. `None` when the
    /// device was deleted.
    pub async fn device(
        &self,
        id: DeviceId,
    ) -> Result<Option<Arc<DeviceInfo>>, crate::metadata::MetadataError> {
        if let Some((device, fetched)) = self.devices.read().get(&id)
            && fetched.elapsed() < DEVICE_CACHE_TTL
        {
            return Ok(Some(device.clone()));
        }
        let changes_before = self
            .device_changes
            .load(std::sync::atomic::Ordering::Acquire);
        let Some(device) = self.metadata.device_by_id(id).await? else {
            self.devices.write().remove(&id);
            return Ok(None);
        };
        let device = Arc::new(DeviceInfo::from(device));
        let mut devices = self.devices.write();
        if self
            .device_changes
            .load(std::sync::atomic::Ordering::Acquire)
            == changes_before
        {
            devices.insert(id, (device.clone(), Instant::now()));
        }
        Ok(Some(device))
    }

    pub fn forget_device(&self, id: DeviceId) {
        let mut devices = self.devices.write();
        self.device_changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        devices.remove(&id);
    }

    /// Puts a device the API just changed into the cache, so that the
    /// pipeline and open MQTT connections use its new profile at once.
    pub fn store_device(&self, device: Device) {
        let mut devices = self.devices.write();
        self.device_changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        devices.insert(
            device.id,
            (Arc::new(DeviceInfo::from(device)), Instant::now()),
        );
    }

    /// Returns the profile of a cached device without waiting, however old
    /// the entry; `None` when the device is not cached.
    pub fn cached_profile_of(&self, id: DeviceId) -> Option<Option<ProfileId>> {
        self.devices
            .read()
            .get(&id)
            .map(|(device, _)| device.profile_id)
    }

    /// Returns a compiled profile, from the cache or the database.
    pub async fn profile(
        &self,
        id: ProfileId,
    ) -> Result<Result<Arc<CompiledProfile>, BrokenProfile>, crate::metadata::MetadataError> {
        if let Some(profile) = self.profiles.read().get(&id) {
            return Ok(Ok(profile.clone()));
        }
        let stored = self.metadata.profile_by_id(id).await?;
        let name = stored.spec.name.clone();
        // Compiling a script runs its top level, which may take up to its
        // time limit; keep it off the async threads.
        let compiled = tokio::task::spawn_blocking(move || CompiledProfile::from_stored(stored))
            .await
            .map_err(|_| {
                crate::metadata::MetadataError::Conflict("compiling the profile panicked".into())
            })?;
        match compiled {
            Ok(profile) => {
                let profile = Arc::new(profile);
                Ok(Ok(self.store_profile(profile)))
            }
            Err(problems) => Ok(Err(BrokenProfile(format!(
                "profile {name:?} does not compile: {}; fix it through the API",
                problems.join("; ")
            )))),
        }
    }

    /// Puts a profile that the API just saved into the cache, so the next
    /// message uses it, unless the cache already holds a newer version (a
    /// read that raced with a change). Returns the version in the cache.
    pub fn store_profile(&self, profile: Arc<CompiledProfile>) -> Arc<CompiledProfile> {
        let mut profiles = self.profiles.write();
        match profiles.get(&profile.id) {
            Some(cached) if cached.version > profile.version => cached.clone(),
            _ => {
                profiles.insert(profile.id, profile.clone());
                profile
            }
        }
    }

    pub fn forget_profile(&self, id: ProfileId) {
        self.profiles.write().remove(&id);
    }

    /// Chooses how an adapter passes on a payload of a device with
    /// `profile`, without waiting: built-in formats are checked at once,
    /// and bytes for a Cayenne LPP or script codec go on as they are. A
    /// profile not in the cache gives `Raw`, which the pipeline decodes
    /// with whatever codec the profile has. `declared` is the content type
    /// the client named, if any.
    pub fn content_type_for(
        &self,
        profile: Option<ProfileId>,
        declared: Option<&str>,
        payload: &[u8],
    ) -> Result<ContentType, String> {
        let codec = match profile {
            None => Some(CodecSpec::Json),
            Some(id) => self
                .profiles
                .read()
                .get(&id)
                .map(|profile| profile.spec.codec.clone()),
        };
        let declared = declared.map(|text| {
            text.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        match declared.as_deref() {
            Some("application/senml+json") => return Ok(ContentType::SenmlJson),
            Some("application/senml+cbor") => return Ok(ContentType::SenmlCbor),
            Some("application/octet-stream") => {
                return match &codec {
                    Some(codec) if !codec.takes_raw_bytes() => Err(format!(
                        "binary payloads need a profile with the cayenne_lpp or script codec; this device's profile uses {}",
                        codec.name()
                    )),
                    _ => Ok(ContentType::Raw),
                };
            }
            _ => {}
        }
        Ok(match codec {
            Some(CodecSpec::Json) => ContentType::Json,
            Some(CodecSpec::Senml) => crate::decode::senml_content_type(payload),
            Some(CodecSpec::CayenneLpp | CodecSpec::Script { .. }) | None => ContentType::Raw,
        })
    }

    /// Loads a profile into the cache, so that [`Directory::content_type_for`]
    /// knows its codec; adapters call it when a device connects.
    pub async fn warm(&self, profile: Option<ProfileId>) {
        if let Some(id) = profile
            && let Err(error) = self.profile(id).await
        {
            tracing::warn!(profile_id = %id, %error, "cannot load a device profile");
        }
    }

    pub fn metadata(&self) -> &Arc<SqliteMetadata> {
        &self.metadata
    }
}

#[cfg(test)]
mod tests;
