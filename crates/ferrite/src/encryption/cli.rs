//! The key commands of the CLI: `ferrite master-key rotate|generate`,
//! `ferrite tenant rotate-key` and `ferrite tenant delete`. They work
//! while a server uses the same data directory, because the metadata
//! database is in WAL mode and the server reads changed keys again (see
//! the keyring's invariants).

use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};

use super::master::{install_new_key_file, remove_previous_key_file};
use super::{Keyring, MasterKeySource};
use crate::metadata::SqliteMetadata;

/// Rotates the master key: installs a new one (key files only), reseals
/// secrets that older versions sealed with the master key, rewraps every
/// tenant data key under the new key, then removes the previous key file.
///
/// With `FERRITE_MASTER_KEY` set, the new key is that variable and the old
/// one `FERRITE_MASTER_KEY_PREVIOUS`; the command only rewraps.
pub async fn rotate_master_key(
    data_dir: &std::path::Path,
    metadata: Arc<SqliteMetadata>,
) -> anyhow::Result<Value> {
    let source = MasterKeySource::detect(data_dir);
    let resumed = match &source {
        MasterKeySource::Files { data_dir } => !install_new_key_file(data_dir)?,
        MasterKeySource::Environment => false,
    };

    let keyring = Keyring::load(source.clone(), metadata, false)
        .await
        .context("cannot unwrap the tenant data keys with the current or previous master key")?;
    let masters = keyring.masters();
    let resealed = keyring.reseal_legacy_values().await?;
    let rewrapped = keyring.rewrap_all().await?;

    let mut output = json!({
        "master_key_id": masters.current().id(),
        "previous_master_key_id": masters.previous().map(|key| key.id()),
        "rewrapped_data_keys": rewrapped,
        "resealed_legacy_secrets": resealed,
        "resumed": resumed,
    });
    match source {
        MasterKeySource::Files { data_dir } => {
            remove_previous_key_file(&data_dir)?;
            output["next_step"] = json!(
                "back up the new master.key now; backups of the data directory made before the rotation need the old key"
            );
        }
        MasterKeySource::Environment => {
            output["next_step"] = json!(format!(
                "remove {} from the server's environment at its next restart",
                super::PREVIOUS_MASTER_KEY_ENV
            ));
        }
    }
    Ok(output)
}

/// Adds a new data key version for the tenant named `name`; new secrets are
/// sealed under it and older ones stay readable.
pub async fn rotate_tenant_key(
    data_dir: &std::path::Path,
    metadata: Arc<SqliteMetadata>,
    name: &str,
) -> anyhow::Result<Value> {
    let tenant = metadata
        .tenant_by_name(name)
        .await
        .with_context(|| format!("cannot find tenant {name:?}"))?;
    let keyring = Keyring::load(MasterKeySource::detect(data_dir), metadata, false).await?;
    let version = keyring.rotate_tenant_key(tenant.id).await?;
    Ok(json!({"tenant": tenant.name, "id": tenant.id, "data_key_version": version}))
}

/// Deletes the tenant named `name` with everything in it and destroys its
/// data keys.
pub async fn delete_tenant(metadata: &SqliteMetadata, name: &str) -> anyhow::Result<Value> {
    let tenant = metadata
        .tenant_by_name(name)
        .await
        .with_context(|| format!("cannot find tenant {name:?}"))?;
    metadata
        .delete_tenant(tenant.id)
        .await
        .with_context(|| format!("cannot delete tenant {name:?}"))?;
    Ok(json!({"deleted": tenant.name, "id": tenant.id}))
}
