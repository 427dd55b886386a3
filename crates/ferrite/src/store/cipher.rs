//! Sealing of time-series blocks under tenant data keys
//! (`storage.encrypt`).
//!
//! The store names a series' tenant by its id string, so the cipher parses
//! it and seals with the tenant's current data key from the [`Keyring`],
//! in the sealed format 2 of `crate::encryption` (which names the data key
//! version). The store's associated data becomes the context string. A
//! deleted tenant has no data key, so its blocks neither seal nor open.

use std::sync::Arc;

use ferrite_tsdb::{BlockCipher, SealError, Unreadable};

use crate::encryption::{DataKey, Keyring};
use crate::ids::TenantId;

/// [`BlockCipher`] backed by the tenant data keys of a [`Keyring`].
pub struct TenantBlockCipher {
    keyring: Arc<Keyring>,
    /// Runtime that loads a data key missing from the keyring's cache;
    /// the store calls the cipher from threads outside any async task.
    runtime: tokio::runtime::Handle,
}

impl TenantBlockCipher {
    /// Creates the cipher; call it inside the server's Tokio runtime.
    pub fn new(keyring: Arc<Keyring>) -> Self {
        Self {
            keyring,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Returns the tenant's current data key, loading it from the database
    /// when it is not cached (the first block of a tenant after a start).
    fn data_key(&self, tenant: TenantId) -> Result<DataKey, SealError> {
        if let Some(key) = self.keyring.cached_data_key(tenant) {
            return Ok(key);
        }
        // A fresh thread is outside any async context, so `block_on` is
        // allowed there whichever thread the store called from.
        let keyring = &self.keyring;
        let runtime = &self.runtime;
        let loaded = std::thread::scope(|scope| {
            scope
                .spawn(|| runtime.block_on(keyring.data_key(tenant)))
                .join()
        });
        match loaded {
            Ok(Ok(key)) => Ok(key),
            Ok(Err(error)) => Err(SealError(format!(
                "failed to load the data key of tenant {tenant}: {error}"
            ))),
            Err(_) => Err(SealError(format!(
                "loading the data key of tenant {tenant} panicked"
            ))),
        }
    }
}

/// Parses the tenant name the store keeps, which is a tenant id.
fn tenant_id(tenant: &str) -> Option<TenantId> {
    tenant.parse().ok()
}

/// Context string of a block's associated data.
fn block_context(aad: &[u8]) -> String {
    format!("tsdb/block/{}", hex::encode(aad))
}

impl BlockCipher for TenantBlockCipher {
    fn seal(&self, tenant: &str, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let id = tenant_id(tenant)
            .ok_or_else(|| SealError(format!("invalid tenant id {tenant:?} in a series name")))?;
        Ok(self.data_key(id)?.seal(&block_context(aad), plain))
    }

    fn open(&self, tenant: &str, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, Unreadable> {
        let id = tenant_id(tenant)
            .ok_or_else(|| Unreadable(format!("invalid tenant id {tenant:?} in a sealed block")))?;
        self.keyring
            .open(id, &block_context(aad), sealed)
            .map_err(|error| Unreadable(format!("tenant {tenant}: {error}")))
    }
}
