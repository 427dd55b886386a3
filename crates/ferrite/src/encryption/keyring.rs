//! The keyring: tenant data keys, unwrapped and cached in memory.
//!
//! ## Invariants
//! - A data key exists in the database only wrapped by a master key; the
//!   unwrapped key lives only in this cache.
//! - Version 1 of a tenant's data key is created the first time something
//!   of the tenant is sealed. Every process that creates one reads the
//!   current master key inside the database write transaction, so a
//!   rotation running in another process either rewraps the new key or
//!   sees it wrapped by the new master key already.
//! - Opening is synchronous and uses only the cache, because the DTLS
//!   handshake callback cannot wait. [`Keyring::refresh`] runs
//!   periodically in the server: it loads keys created by other processes
//!   and drops those of deleted tenants.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;
use rand::RngCore;

use super::master::{MasterKeySource, MasterKeys};
use super::{DataKey, MASTER_FORMAT, OpenError, TENANT_FORMAT, data_key_version, sealed_format};
use crate::ids::TenantId;
use crate::metadata::tenant_keys::{StoredTenantKey, WrappedKey};
use crate::metadata::{MetadataError, SqliteMetadata};

/// The version a tenant's first data key gets.
const FIRST_VERSION: u32 = 1;

/// Interval of [`Keyring::refresh`] in the server. It bounds how long the
/// server keeps the data keys of a tenant that `ferrite tenant delete`
/// removed; a deletion through the server drops them at once.
pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("cannot load the master key: {0}")]
    MasterKey(String),
    #[error(
        "data key version {version} of tenant {tenant} is wrapped by master key {master_key_id}, which is not available; restore that key as master.key.previous (or FERRITE_MASTER_KEY_PREVIOUS) and run `ferrite master-key rotate`"
    )]
    MissingMasterKey {
        tenant: TenantId,
        version: u32,
        master_key_id: String,
    },
    #[error("data key version {version} of tenant {tenant} cannot be unwrapped: {source}")]
    Unwrap {
        tenant: TenantId,
        version: u32,
        source: OpenError,
    },
    #[error("the wrapped data key version {version} of tenant {tenant} is not 32 bytes long")]
    BadDataKey { tenant: TenantId, version: u32 },
}

/// The data keys of one tenant.
struct TenantKeys {
    /// The version that seals new values: the newest.
    current: u32,
    keys: BTreeMap<u32, DataKey>,
    /// When the keys were read from the database, so that a refresh that
    /// started earlier does not drop a key created after its read.
    loaded_at: Instant,
}

/// Tenant data keys and the master keys that wrap them.
pub struct Keyring {
    source: MasterKeySource,
    metadata: Arc<SqliteMetadata>,
    masters: RwLock<Arc<MasterKeys>>,
    tenants: RwLock<HashMap<TenantId, Arc<TenantKeys>>>,
    /// Tenant ids at the last refresh, to tell which were deleted since.
    known_tenants: parking_lot::Mutex<Option<HashSet<TenantId>>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("master_key", &self.masters.read().current().id())
            .field("tenants", &self.tenants.read().len())
            .finish()
    }
}

/// Returns the associated data a data key is wrapped with.
fn wrap_context(tenant: TenantId, version: u32) -> String {
    format!("tenant_key/{tenant}/{version}")
}

/// Unwraps a stored data key to its raw bytes.
fn unwrap_bytes(masters: &MasterKeys, stored: &StoredTenantKey) -> Result<[u8; 32], KeyringError> {
    let master =
        masters
            .by_id(&stored.master_key_id)
            .ok_or_else(|| KeyringError::MissingMasterKey {
                tenant: stored.tenant_id,
                version: stored.version,
                master_key_id: stored.master_key_id.clone(),
            })?;
    let bytes = master
        .open(
            &wrap_context(stored.tenant_id, stored.version),
            &stored.wrapped_key,
        )
        .map_err(|source| KeyringError::Unwrap {
            tenant: stored.tenant_id,
            version: stored.version,
            source,
        })?;
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| KeyringError::BadDataKey {
            tenant: stored.tenant_id,
            version: stored.version,
        })
}

fn unwrap_key(masters: &MasterKeys, stored: &StoredTenantKey) -> Result<DataKey, KeyringError> {
    Ok(DataKey::from_bytes(
        &unwrap_bytes(masters, stored)?,
        stored.version,
    ))
}

/// Unwraps the keys of one tenant (`stored` holds only its rows).
fn tenant_keys_from(
    masters: &MasterKeys,
    stored: &[StoredTenantKey],
    loaded_at: Instant,
) -> Result<Option<TenantKeys>, KeyringError> {
    let mut keys = BTreeMap::new();
    for row in stored {
        keys.insert(row.version, unwrap_key(masters, row)?);
    }
    let Some(&current) = keys.keys().next_back() else {
        return Ok(None);
    };
    Ok(Some(TenantKeys {
        current,
        keys,
        loaded_at,
    }))
}

/// Groups rows by tenant.
fn by_tenant(rows: Vec<StoredTenantKey>) -> HashMap<TenantId, Vec<StoredTenantKey>> {
    let mut grouped: HashMap<TenantId, Vec<StoredTenantKey>> = HashMap::new();
    for row in rows {
        grouped.entry(row.tenant_id).or_default().push(row);
    }
    grouped
}

impl Keyring {
    /// Loads the master keys (creating `master.key` on first start when
    /// `create_master_key`) and unwraps every tenant data key. Fails when a
    /// data key cannot be unwrapped, because running on would leave that
    /// tenant's secrets unreadable, most likely after a wrong master key
    /// was configured.
    pub async fn load(
        source: MasterKeySource,
        metadata: Arc<SqliteMetadata>,
        create_master_key: bool,
    ) -> Result<Self, KeyringError> {
        let masters = source
            .load(create_master_key)
            .map_err(|error| KeyringError::MasterKey(format!("{error:#}")))?;
        let keyring = Self {
            source,
            metadata,
            masters: RwLock::new(Arc::new(masters)),
            tenants: RwLock::new(HashMap::new()),
            known_tenants: parking_lot::Mutex::new(None),
        };
        let loaded_at = Instant::now();
        let rows = keyring.metadata.tenant_keys().await?;
        let masters = keyring.masters();
        let mut tenants = HashMap::new();
        for (tenant, rows) in by_tenant(rows) {
            if let Some(keys) = tenant_keys_from(&masters, &rows, loaded_at)? {
                tenants.insert(tenant, Arc::new(keys));
            }
        }
        *keyring.tenants.write() = tenants;
        Ok(keyring)
    }

    /// Returns the master keys currently loaded.
    pub fn masters(&self) -> Arc<MasterKeys> {
        self.masters.read().clone()
    }

    /// Reads the master keys again from their source.
    fn reload_masters(&self) -> Result<Arc<MasterKeys>, KeyringError> {
        let masters = Arc::new(
            self.source
                .load(false)
                .map_err(|error| KeyringError::MasterKey(format!("{error:#}")))?,
        );
        let mut current = self.masters.write();
        if current.current().id() != masters.current().id() {
            tracing::info!(master_key_id = %masters.current().id(), "master key changed");
        }
        *current = masters.clone();
        Ok(masters)
    }

    /// Seals `plaintext` under the tenant's current data key, creating the
    /// tenant's first data key if it has none.
    pub async fn seal(
        &self,
        tenant: TenantId,
        context: &str,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, KeyringError> {
        Ok(self.data_key(tenant).await?.seal(context, plaintext))
    }

    /// Returns the tenant's current data key, creating the tenant's first
    /// data key if it has none; for code that seals several values.
    pub async fn data_key(&self, tenant: TenantId) -> Result<DataKey, KeyringError> {
        let keys = self.tenant_keys(tenant).await?;
        Ok(keys.keys[&keys.current].clone())
    }

    /// Returns the tenant's current data key if this process has it loaded,
    /// for synchronous code that cannot await [`Keyring::data_key`].
    pub fn cached_data_key(&self, tenant: TenantId) -> Option<DataKey> {
        let keys = self.tenants.read().get(&tenant).cloned()?;
        keys.keys.get(&keys.current).cloned()
    }

    /// Opens a value sealed under a data key of `tenant` (format 2) or
    /// directly under a master key (format 1, written by older versions).
    pub fn open(
        &self,
        tenant: TenantId,
        context: &str,
        sealed: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        match sealed_format(sealed)? {
            MASTER_FORMAT => self.masters().open(context, sealed),
            TENANT_FORMAT => {
                let version = data_key_version(sealed);
                let keys = self.tenants.read().get(&tenant).cloned();
                let key = keys
                    .as_ref()
                    .and_then(|keys| keys.keys.get(&version))
                    .ok_or(OpenError::MissingDataKey { version })?;
                key.open_body(context, sealed)
            }
            other => Err(OpenError::UnknownVersion(other)),
        }
    }

    /// Returns the tenant's keys from the cache, or loads them, creating
    /// version 1 if the tenant has none.
    async fn tenant_keys(&self, tenant: TenantId) -> Result<Arc<TenantKeys>, KeyringError> {
        if let Some(keys) = self.tenants.read().get(&tenant) {
            return Ok(keys.clone());
        }

        if self.metadata.tenant_keys_of(tenant).await?.is_empty() {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let created = self
                .metadata
                .insert_tenant_key(tenant, FIRST_VERSION, || -> Result<_, KeyringError> {
                    // Read inside the write transaction; see the module
                    // invariants.
                    let masters = self.reload_masters()?;
                    let master = masters.current();
                    Ok(WrappedKey {
                        master_key_id: master.id().to_owned(),
                        wrapped_key: master.seal(&wrap_context(tenant, FIRST_VERSION), &key),
                    })
                })
                .await?;
            if created {
                tracing::info!(tenant_id = %tenant, "tenant data key created");
            }
        }
        self.load_tenant(tenant).await
    }

    /// Reads and unwraps the tenant's keys into the cache. Reads the master
    /// keys again when a key is wrapped by one this process does not hold,
    /// which happens after a rotation by another process.
    async fn load_tenant(&self, tenant: TenantId) -> Result<Arc<TenantKeys>, KeyringError> {
        let loaded_at = Instant::now();
        let rows = self.metadata.tenant_keys_of(tenant).await?;
        let keys = match tenant_keys_from(&self.masters(), &rows, loaded_at) {
            Err(KeyringError::MissingMasterKey { .. }) => {
                let masters = self.reload_masters()?;
                // The rows may have been rewrapped after they were read.
                let rows = self.metadata.tenant_keys_of(tenant).await?;
                tenant_keys_from(&masters, &rows, loaded_at)?
            }
            other => other?,
        };
        let keys = Arc::new(keys.ok_or(MetadataError::NotFound("tenant data key"))?);
        self.tenants.write().insert(tenant, keys.clone());
        Ok(keys)
    }

    /// Loads data keys created by other processes and drops those of
    /// tenants deleted meanwhile. Returns the tenants deleted since the
    /// previous refresh (none at the first). A key that cannot be unwrapped
    /// is logged and its cached copy, if any, is kept.
    pub async fn refresh(&self) -> Result<Vec<TenantId>, KeyringError> {
        let started = Instant::now();
        let tenant_ids: HashSet<TenantId> = self.metadata.tenant_ids().await?.into_iter().collect();
        let rows = by_tenant(self.metadata.tenant_keys().await?);
        let mut masters = self.masters();
        let needs_reload = rows
            .values()
            .flatten()
            .any(|row| masters.by_id(&row.master_key_id).is_none());
        if needs_reload {
            masters = self.reload_masters()?;
        }

        let mut loaded = HashMap::new();
        for (tenant, rows) in &rows {
            match tenant_keys_from(&masters, rows, started) {
                Ok(Some(keys)) => {
                    loaded.insert(*tenant, keys);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(tenant_id = %tenant, %error, "cannot load the tenant's data keys");
                }
            }
        }

        let mut tenants = self.tenants.write();
        tenants.retain(|tenant, keys| {
            let keep = rows.contains_key(tenant) || keys.loaded_at > started;
            if !keep {
                tracing::info!(tenant_id = %tenant, "tenant data keys dropped: the tenant was deleted");
            }
            keep
        });
        for (tenant, keys) in loaded {
            let newer = tenants
                .get(&tenant)
                .is_some_and(|cached| cached.loaded_at > started);
            if !newer {
                tenants.insert(tenant, Arc::new(keys));
            }
        }
        drop(tenants);

        let previous = self.known_tenants.lock().replace(tenant_ids.clone());
        let deleted = previous
            .map(|previous| previous.difference(&tenant_ids).copied().collect())
            .unwrap_or_default();
        Ok(deleted)
    }

    /// Rewraps every data key that the current master key does not wrap,
    /// reading the master keys from their source first. Returns how many
    /// keys were rewrapped. The data sealed under the data keys stays as it
    /// is.
    pub async fn rewrap_all(&self) -> Result<usize, KeyringError> {
        let masters = self.reload_masters()?;
        let current = masters.current();
        self.metadata
            .rewrap_tenant_keys(|stored| {
                if stored.master_key_id == current.id() {
                    return Ok(None);
                }
                let bytes = unwrap_bytes(&masters, stored)?;
                Ok(Some(WrappedKey {
                    master_key_id: current.id().to_owned(),
                    wrapped_key: current
                        .seal(&wrap_context(stored.tenant_id, stored.version), &bytes),
                }))
            })
            .await
    }

    /// Adds a new data key version for `tenant`, which seals every new
    /// value from now on; older versions stay to open older values.
    /// Returns the new version.
    pub async fn rotate_tenant_key(&self, tenant: TenantId) -> Result<u32, KeyringError> {
        let existing = self.metadata.tenant_keys_of(tenant).await?;
        let version = existing.last().map_or(FIRST_VERSION, |row| row.version + 1);
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let created = self
            .metadata
            .insert_tenant_key(tenant, version, || -> Result<_, KeyringError> {
                let masters = self.reload_masters()?;
                let master = masters.current();
                Ok(WrappedKey {
                    master_key_id: master.id().to_owned(),
                    wrapped_key: master.seal(&wrap_context(tenant, version), &key),
                })
            })
            .await?;
        if !created {
            return Err(MetadataError::Conflict(format!(
                "data key version {version} of tenant {tenant} was created by another process at the same time; run the rotation again"
            ))
            .into());
        }
        self.load_tenant(tenant).await?;
        tracing::info!(tenant_id = %tenant, version, "tenant data key rotated");
        Ok(version)
    }

    /// Reseals device secrets that older versions sealed directly with the
    /// master key (format 1) under their tenant's data key. Returns how
    /// many values were resealed. A value that cannot be opened is logged
    /// and left as it is.
    pub async fn reseal_legacy_values(&self) -> Result<usize, KeyringError> {
        let mut count = 0;
        for value in self.metadata.sealed_values().await? {
            if value.sealed.first() != Some(&MASTER_FORMAT) {
                continue;
            }
            let context = value.column.context(value.device_id);
            let plain = match self.masters().open(&context, &value.sealed) {
                Ok(plain) => plain,
                Err(error) => {
                    tracing::error!(device_id = %value.device_id, column = ?value.column, %error, "cannot open a secret sealed by the master key; set it again through the API");
                    continue;
                }
            };
            let sealed = self.seal(value.tenant_id, &context, &plain).await?;
            if self.metadata.replace_sealed_value(&value, &sealed).await? {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// Opens the server's keyring: loads the master keys from the environment
/// or the data directory (creating `master.key` on first start), unwraps
/// the data keys and reseals secrets that older versions sealed with the
/// master key.
pub async fn open_for_server(
    data_dir: &std::path::Path,
    metadata: Arc<SqliteMetadata>,
) -> Result<Arc<Keyring>, KeyringError> {
    let source = MasterKeySource::detect(data_dir);
    let keyring = Keyring::load(source, metadata, true).await?;
    let resealed = keyring.reseal_legacy_values().await?;
    if resealed > 0 {
        tracing::info!(
            resealed,
            "resealed device secrets under their tenant's data key"
        );
    }
    Ok(Arc::new(keyring))
}

impl Keyring {
    /// Runs [`Keyring::refresh`] every [`REFRESH_INTERVAL`] until
    /// `shutdown`, and calls `on_deleted` for every tenant that another
    /// process deleted.
    pub async fn refresh_periodically(
        self: Arc<Self>,
        on_deleted: impl Fn(TenantId) + Send + 'static,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(REFRESH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => match self.refresh().await {
                    Ok(deleted) => {
                        for tenant in deleted {
                            tracing::info!(tenant_id = %tenant, "tenant deleted by another process; ending its connections");
                            on_deleted(tenant);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot refresh the tenant data keys; retrying at the next interval");
                    }
                },
                () = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encryption::master::{install_new_key_file, remove_previous_key_file};
    use crate::encryption::{MASTER_KEY_FILE, MasterKey};
    use crate::metadata::MetadataStore;

    struct Fixture {
        dir: tempfile::TempDir,
        metadata: Arc<SqliteMetadata>,
    }

    impl Fixture {
        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let metadata = Arc::new(SqliteMetadata::open(dir.path()).await.unwrap());
            Self { dir, metadata }
        }

        fn source(&self) -> MasterKeySource {
            MasterKeySource::Files {
                data_dir: self.dir.path().to_owned(),
            }
        }

        async fn keyring(&self) -> Keyring {
            Keyring::load(self.source(), self.metadata.clone(), true)
                .await
                .unwrap()
        }

        async fn tenant(&self) -> TenantId {
            self.metadata.default_tenant().await.unwrap().id
        }

        async fn other_tenant(&self, name: &str) -> TenantId {
            self.metadata.insert_test_tenant(name).await
        }
    }

    #[tokio::test]
    async fn sealed_value_opens_after_reopen() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let sealed = fixture
            .keyring()
            .await
            .seal(tenant, "device_psk/d1", b"secret")
            .await
            .unwrap();
        assert_eq!(sealed[0], TENANT_FORMAT);

        let reopened = fixture.keyring().await;
        assert_eq!(
            reopened.open(tenant, "device_psk/d1", &sealed).unwrap(),
            b"secret"
        );
        assert_eq!(
            reopened.open(tenant, "device_psk/d2", &sealed),
            Err(OpenError::Decrypt)
        );
    }

    #[tokio::test]
    async fn tenants_get_distinct_keys() {
        let fixture = Fixture::new().await;
        let first = fixture.tenant().await;
        let second = fixture.other_tenant("second").await;
        let keyring = fixture.keyring().await;
        let sealed = keyring.seal(first, "c", b"secret").await.unwrap();
        keyring.seal(second, "c", b"other").await.unwrap();

        assert_eq!(keyring.open(second, "c", &sealed), Err(OpenError::Decrypt));
        let stored = fixture.metadata.tenant_keys().await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_ne!(stored[0].wrapped_key, stored[1].wrapped_key);
    }

    #[tokio::test]
    async fn wrapped_key_does_not_contain_data_key() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let keyring = fixture.keyring().await;
        keyring.seal(tenant, "c", b"secret").await.unwrap();

        let stored = &fixture.metadata.tenant_keys().await.unwrap()[0];
        let master = keyring.masters();
        assert_eq!(stored.master_key_id, master.current().id());
        let raw = unwrap_bytes(&master, stored).unwrap();
        assert!(
            !stored
                .wrapped_key
                .windows(raw.len())
                .any(|window| window == raw)
        );
        let wrong = MasterKey::from_bytes(&[0u8; 32]);
        assert!(
            wrong
                .open(&wrap_context(tenant, 1), &stored.wrapped_key)
                .is_err()
        );
    }

    #[tokio::test]
    async fn legacy_value_opens_and_is_resealed() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let keyring = fixture.keyring().await;
        let device = fixture
            .metadata
            .create_device(tenant, "d1", &[1; 32])
            .await
            .unwrap();
        let context = crate::metadata::credentials::psk_seal_context(device.id);
        let legacy = keyring
            .masters()
            .current()
            .seal(&context, b"0123456789abcdef");
        fixture
            .metadata
            .set_device_psk(tenant, device.id, b"d1-identity", &legacy)
            .await
            .unwrap();
        assert_eq!(
            keyring.open(tenant, &context, &legacy).unwrap(),
            b"0123456789abcdef"
        );

        assert_eq!(keyring.reseal_legacy_values().await.unwrap(), 1);
        let values = fixture.metadata.sealed_values().await.unwrap();
        assert_eq!(values.len(), 1);
        assert_eq!(values[0].sealed[0], TENANT_FORMAT);
        assert_eq!(
            keyring.open(tenant, &context, &values[0].sealed).unwrap(),
            b"0123456789abcdef"
        );
        assert_eq!(keyring.reseal_legacy_values().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn master_rotation_rewraps_without_resealing() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let keyring = fixture.keyring().await;
        let sealed = keyring.seal(tenant, "c", b"secret").await.unwrap();
        let old_id = keyring.masters().current().id().to_owned();

        assert!(install_new_key_file(fixture.dir.path()).unwrap());
        assert_eq!(keyring.rewrap_all().await.unwrap(), 1);
        remove_previous_key_file(fixture.dir.path()).unwrap();
        assert_eq!(keyring.rewrap_all().await.unwrap(), 0);

        let stored = &fixture.metadata.tenant_keys().await.unwrap()[0];
        assert_ne!(stored.master_key_id, old_id);
        // A fresh process holds only the new master key and still opens
        // the value sealed before the rotation.
        let reopened = fixture.keyring().await;
        assert_eq!(reopened.masters().current().id(), stored.master_key_id);
        assert!(reopened.masters().previous().is_none());
        assert_eq!(reopened.open(tenant, "c", &sealed).unwrap(), b"secret");
    }

    #[tokio::test]
    async fn running_keyring_follows_rotation() {
        let fixture = Fixture::new().await;
        let first = fixture.tenant().await;
        let running = fixture.keyring().await;
        running.seal(first, "c", b"secret").await.unwrap();

        // Another process rotates the master key and removes the old one.
        let cli = fixture.keyring().await;
        install_new_key_file(fixture.dir.path()).unwrap();
        cli.rewrap_all().await.unwrap();
        remove_previous_key_file(fixture.dir.path()).unwrap();

        // The running keyring wraps a new tenant's key with the new master
        // key, which it reads from the file.
        let second = fixture.other_tenant("second").await;
        let sealed = running.seal(second, "c", b"later").await.unwrap();
        let new_id = cli.masters().current().id().to_owned();
        for stored in fixture.metadata.tenant_keys().await.unwrap() {
            assert_eq!(stored.master_key_id, new_id);
        }
        let reopened = fixture.keyring().await;
        assert_eq!(reopened.open(second, "c", &sealed).unwrap(), b"later");
    }

    #[tokio::test]
    async fn wrong_master_key_fails_open() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        fixture
            .keyring()
            .await
            .seal(tenant, "c", b"x")
            .await
            .unwrap();
        std::fs::remove_file(fixture.dir.path().join(MASTER_KEY_FILE)).unwrap();

        let error = Keyring::load(fixture.source(), fixture.metadata.clone(), true)
            .await
            .unwrap_err();
        assert!(
            matches!(error, KeyringError::MissingMasterKey { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn tenant_key_rotation_keeps_old_versions() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let keyring = fixture.keyring().await;
        let old = keyring.seal(tenant, "c", b"old").await.unwrap();

        assert_eq!(keyring.rotate_tenant_key(tenant).await.unwrap(), 2);
        let new = keyring.seal(tenant, "c", b"new").await.unwrap();
        assert_eq!(data_key_version(&old), 1);
        assert_eq!(data_key_version(&new), 2);

        let reopened = fixture.keyring().await;
        assert_eq!(reopened.open(tenant, "c", &old).unwrap(), b"old");
        assert_eq!(reopened.open(tenant, "c", &new).unwrap(), b"new");
    }

    #[tokio::test]
    async fn deleted_tenant_data_is_unreadable() {
        let fixture = Fixture::new().await;
        let tenant = fixture.other_tenant("doomed").await;
        let keyring = fixture.keyring().await;
        let sealed = keyring.seal(tenant, "c", b"secret").await.unwrap();
        let wrapped = fixture.metadata.tenant_keys_of(tenant).await.unwrap()[0]
            .wrapped_key
            .clone();

        assert!(keyring.refresh().await.unwrap().is_empty());
        fixture.metadata.delete_tenant(tenant).await.unwrap();
        assert_eq!(keyring.refresh().await.unwrap(), vec![tenant]);
        assert_eq!(
            keyring.open(tenant, "c", &sealed),
            Err(OpenError::MissingDataKey { version: 1 })
        );

        // Someone with the master key and the database files finds neither
        // the key row nor its bytes.
        let reopened = fixture.keyring().await;
        assert_eq!(
            reopened.open(tenant, "c", &sealed),
            Err(OpenError::MissingDataKey { version: 1 })
        );
        assert!(
            fixture
                .metadata
                .tenant_keys_of(tenant)
                .await
                .unwrap()
                .is_empty()
        );
        for name in ["metadata.db", "metadata.db-wal"] {
            let Ok(bytes) = std::fs::read(fixture.dir.path().join(name)) else {
                continue;
            };
            assert!(
                !bytes.windows(wrapped.len()).any(|window| window == wrapped),
                "{name} still contains the wrapped key"
            );
        }
    }

    #[tokio::test]
    async fn default_tenant_cannot_be_deleted() {
        let fixture = Fixture::new().await;
        let tenant = fixture.tenant().await;
        let error = fixture.metadata.delete_tenant(tenant).await.unwrap_err();
        assert!(matches!(error, MetadataError::Conflict(_)), "{error}");
    }
}
