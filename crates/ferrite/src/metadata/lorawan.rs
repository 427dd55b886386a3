//! The LoRaWAN registry in SQLite: gateways, devices with their sealed keys
//! and session, used DevNonces and the downlink queue.
//!
//! Keys arrive and leave sealed (see [`crate::encryption`]), so this module
//! never handles a key in clear. EUIs and DevAddrs are stored as lowercase hex,
//! which the caller normalizes with [`parse_eui`] and [`parse_dev_addr`].

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, TenantId};

/// Activation method, which decides how a device obtains its session keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// Over-the-air activation: a join request derives new session keys
    /// from the AppKey.
    Otaa,
    /// Activation by personalization: DevAddr and session keys are set
    /// through the API.
    Abp,
    /// Another network server runs the device and forwards its decoded
    /// uplinks through an integration; Ferrite stores no keys.
    External,
}

impl Activation {
    pub fn as_str(self) -> &'static str {
        match self {
            Activation::Otaa => "otaa",
            Activation::Abp => "abp",
            Activation::External => "external",
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Activation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "otaa" => Ok(Activation::Otaa),
            "abp" => Ok(Activation::Abp),
            "external" => Ok(Activation::External),
            other => Err(format!(
                "invalid activation {other:?}: expected otaa, abp or external"
            )),
        }
    }
}

/// Regional parameters a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Region {
    #[serde(rename = "EU868")]
    Eu868,
    #[serde(rename = "US915")]
    Us915,
}

impl Region {
    pub fn as_str(self) -> &'static str {
        match self {
            Region::Eu868 => "EU868",
            Region::Us915 => "US915",
        }
    }
}

impl FromStr for Region {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "EU868" => Ok(Region::Eu868),
            "US915" => Ok(Region::Us915),
            other => Err(format!("invalid region {other:?}: expected EU868 or US915")),
        }
    }
}

/// Keys of a device, each sealed with the tenant's data key under the context
/// from [`key_context`].
#[derive(Clone, Default)]
pub struct SealedKeys {
    pub app_key: Option<Vec<u8>>,
    pub nwk_s_key: Option<Vec<u8>>,
    pub app_s_key: Option<Vec<u8>>,
}

impl fmt::Debug for SealedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedKeys")
            .field("app_key", &self.app_key.is_some())
            .field("nwk_s_key", &self.nwk_s_key.is_some())
            .field("app_s_key", &self.app_s_key.is_some())
            .finish()
    }
}

/// Returns the sealing context of one key field of a device, such as
/// `lorawan/app_key/{device id}`, so a sealed key copied to another field
/// or device fails to open.
pub fn key_context(field: &str, device: DeviceId) -> String {
    format!("lorawan/{field}/{device}")
}

/// A device's LoRaWAN registration and session as stored.
#[derive(Debug, Clone)]
pub struct LorawanDevice {
    pub device_id: DeviceId,
    pub tenant_id: TenantId,
    /// 16 lowercase hex digits.
    pub dev_eui: String,
    pub join_eui: Option<String>,
    /// `None` only for external devices.
    pub region: Option<Region>,
    pub activation: Activation,
    /// LoRaWAN MAC version, such as `1.0.3`.
    pub mac_version: String,
    pub keys: SealedKeys,
    /// 8 lowercase hex digits; `None` before an OTAA device joins.
    pub dev_addr: Option<String>,
    /// The 32-bit counter of the last accepted uplink of the session.
    pub f_cnt_up: Option<u32>,
    /// The counter the next downlink uses.
    pub n_f_cnt_down: u32,
    /// Epoch milliseconds of the last join.
    pub joined_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The registration a `PUT` stores; the session starts over (counters at 0).
#[derive(Debug, Clone)]
pub struct NewLorawanDevice {
    pub dev_eui: String,
    pub join_eui: Option<String>,
    pub region: Option<Region>,
    pub activation: Activation,
    pub mac_version: String,
    pub keys: SealedKeys,
    pub dev_addr: Option<String>,
}

/// A gateway allowed to forward packets.
#[derive(Debug, Clone, Serialize)]
pub struct LorawanGateway {
    pub gateway_eui: String,
    pub name: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub last_seen_at: Option<i64>,
}

/// A downlink queued through the API.
#[derive(Debug, Clone, Serialize)]
pub struct QueuedDownlink {
    pub id: i64,
    pub f_port: u8,
    #[serde(serialize_with = "serialize_hex")]
    pub data: Vec<u8>,
    pub confirmed: bool,
    pub created_at: i64,
    pub sent_at: Option<i64>,
    pub f_cnt_down: Option<u32>,
}

fn serialize_hex<S: serde::Serializer>(data: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&hex::encode(data))
}

/// Parses an EUI-64 given as 16 hex digits (optionally separated by `-` or
/// `:`) and returns it as 16 lowercase hex digits.
pub fn parse_eui(text: &str) -> Result<String, String> {
    parse_hex_id(text, 16, "EUI")
}

/// Parses a DevAddr given as 8 hex digits and returns it in lowercase.
pub fn parse_dev_addr(text: &str) -> Result<String, String> {
    parse_hex_id(text, 8, "DevAddr")
}

fn parse_hex_id(text: &str, digits: usize, what: &str) -> Result<String, String> {
    let compact: String = text.chars().filter(|c| *c != '-' && *c != ':').collect();
    if compact.len() != digits || !compact.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "invalid {what} {text:?}: expected {digits} hex digits"
        ));
    }
    Ok(compact.to_ascii_lowercase())
}

fn decode_error(message: String) -> MetadataError {
    MetadataError::Database(sqlx::Error::Decode(message.into()))
}

fn counter(value: Option<i64>, column: &str) -> Result<Option<u32>, MetadataError> {
    value
        .map(|value| {
            u32::try_from(value)
                .map_err(|_| decode_error(format!("invalid {column} {value} in metadata database")))
        })
        .transpose()
}

macro_rules! device_columns {
    () => {
        "device_id, tenant_id, dev_eui, join_eui, region, activation, mac_version, app_key, \
         nwk_s_key, app_s_key, dev_addr, f_cnt_up, n_f_cnt_down, joined_at, created_at, updated_at"
    };
}

fn device_from_row(row: sqlx::sqlite::SqliteRow) -> Result<LorawanDevice, MetadataError> {
    let region: Option<String> = row.try_get("region")?;
    let activation: String = row.try_get("activation")?;
    Ok(LorawanDevice {
        device_id: parse_id(row.try_get("device_id")?)?,
        tenant_id: parse_id(row.try_get("tenant_id")?)?,
        dev_eui: row.try_get("dev_eui")?,
        join_eui: row.try_get("join_eui")?,
        region: region
            .map(|text| text.parse().map_err(decode_error))
            .transpose()?,
        activation: activation.parse().map_err(decode_error)?,
        mac_version: row.try_get("mac_version")?,
        keys: SealedKeys {
            app_key: row.try_get("app_key")?,
            nwk_s_key: row.try_get("nwk_s_key")?,
            app_s_key: row.try_get("app_s_key")?,
        },
        dev_addr: row.try_get("dev_addr")?,
        f_cnt_up: counter(row.try_get("f_cnt_up")?, "f_cnt_up")?,
        n_f_cnt_down: counter(Some(row.try_get("n_f_cnt_down")?), "n_f_cnt_down")?.unwrap_or(0),
        joined_at: row.try_get("joined_at")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn gateway_from_row(row: sqlx::sqlite::SqliteRow) -> Result<LorawanGateway, MetadataError> {
    Ok(LorawanGateway {
        gateway_eui: row.try_get("gateway_eui")?,
        name: row.try_get("name")?,
        created_at: row.try_get("created_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

fn downlink_from_row(row: sqlx::sqlite::SqliteRow) -> Result<QueuedDownlink, MetadataError> {
    let f_port: i64 = row.try_get("f_port")?;
    Ok(QueuedDownlink {
        id: row.try_get("id")?,
        f_port: u8::try_from(f_port)
            .map_err(|_| decode_error(format!("invalid f_port {f_port} in metadata database")))?,
        data: row.try_get("data")?,
        confirmed: row.try_get("confirmed")?,
        created_at: row.try_get("created_at")?,
        sent_at: row.try_get("sent_at")?,
        f_cnt_down: counter(row.try_get("f_cnt_down")?, "f_cnt_down")?,
    })
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The outcome of recording a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinRecord {
    Accepted,
    /// The device joined with this DevNonce before.
    DevNonceReused,
}

impl SqliteMetadata {
    /// Stores the LoRaWAN registration of a device of `tenant`, replacing
    /// an earlier one. The session starts over: counters return to 0 and an
    /// OTAA device has to join again. A DevEUI that another device uses is
    /// a conflict.
    pub async fn put_lorawan_device(
        &self,
        tenant: TenantId,
        device: DeviceId,
        new: &NewLorawanDevice,
    ) -> Result<LorawanDevice, MetadataError> {
        let owner = sqlx::query("SELECT 1 FROM devices WHERE tenant_id = ? AND id = ?")
            .bind(tenant.to_string())
            .bind(device.to_string())
            .fetch_optional(&self.pool)
            .await?;
        if owner.is_none() {
            return Err(MetadataError::NotFound("device"));
        }

        let now = now_ms();
        let row = sqlx::query(concat!(
            "INSERT INTO lorawan_devices (device_id, tenant_id, dev_eui, join_eui, region, activation,
                 mac_version, app_key, nwk_s_key, app_s_key, dev_addr, f_cnt_up, n_f_cnt_down,
                 joined_at, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 0, NULL, ?, ?)
             ON CONFLICT (device_id) DO UPDATE SET
                 dev_eui = excluded.dev_eui, join_eui = excluded.join_eui,
                 region = excluded.region, activation = excluded.activation,
                 mac_version = excluded.mac_version, app_key = excluded.app_key,
                 nwk_s_key = excluded.nwk_s_key, app_s_key = excluded.app_s_key,
                 dev_addr = excluded.dev_addr, f_cnt_up = NULL, n_f_cnt_down = 0,
                 joined_at = NULL, updated_at = excluded.updated_at
             RETURNING ",
            device_columns!()
        ))
        .bind(device.to_string())
        .bind(tenant.to_string())
        .bind(&new.dev_eui)
        .bind(&new.join_eui)
        .bind(new.region.map(Region::as_str))
        .bind(new.activation.as_str())
        .bind(&new.mac_version)
        .bind(&new.keys.app_key)
        .bind(&new.keys.nwk_s_key)
        .bind(&new.keys.app_s_key)
        .bind(&new.dev_addr)
        .bind(now)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                MetadataError::Conflict(format!(
                    "DevEUI {} is registered to another device",
                    new.dev_eui
                ))
            } else {
                error.into()
            }
        })?;
        device_from_row(row)
    }

    /// Returns the LoRaWAN registration of a device of `tenant`.
    pub async fn lorawan_device(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<LorawanDevice, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM lorawan_devices WHERE tenant_id = ? AND device_id = ?"
        ))
        .bind(tenant.to_string())
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row)
            .transpose()?
            .ok_or(MetadataError::NotFound(
                "LoRaWAN registration of the device",
            ))
    }

    /// Returns the device registered with this DevEUI (16 lowercase hex
    /// digits) in any tenant.
    pub async fn lorawan_device_by_dev_eui(
        &self,
        dev_eui: &str,
    ) -> Result<Option<LorawanDevice>, MetadataError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM lorawan_devices WHERE dev_eui = ?"
        ))
        .bind(dev_eui)
        .fetch_optional(&self.pool)
        .await?;
        row.map(device_from_row).transpose()
    }

    /// Returns the devices whose session uses this DevAddr (8 lowercase hex
    /// digits). Several devices may share one, so the caller checks the MIC
    /// with each device's key to find the sender.
    pub async fn lorawan_devices_by_dev_addr(
        &self,
        dev_addr: &str,
    ) -> Result<Vec<LorawanDevice>, MetadataError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            device_columns!(),
            " FROM lorawan_devices WHERE dev_addr = ? AND activation != 'external'"
        ))
        .bind(dev_addr)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(device_from_row).collect()
    }

    /// Removes the LoRaWAN registration of a device; the device stays.
    pub async fn delete_lorawan_device(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<(), MetadataError> {
        let result =
            sqlx::query("DELETE FROM lorawan_devices WHERE tenant_id = ? AND device_id = ?")
                .bind(tenant.to_string())
                .bind(device.to_string())
                .execute(&self.pool)
                .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound(
                "LoRaWAN registration of the device",
            ));
        }
        Ok(())
    }

    /// Records a join: remembers the DevNonce and starts the new session
    /// with counters at 0, in one transaction. A DevNonce the device used
    /// before changes nothing.
    pub async fn record_lorawan_join(
        &self,
        device: DeviceId,
        dev_nonce: u16,
        dev_addr: &str,
        nwk_s_key: &[u8],
        app_s_key: &[u8],
    ) -> Result<JoinRecord, MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;

        let inserted = sqlx::query(
            "INSERT INTO lorawan_dev_nonces (device_id, dev_nonce, used_at) VALUES (?, ?, ?)",
        )
        .bind(device.to_string())
        .bind(i64::from(dev_nonce))
        .bind(now)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Ok(JoinRecord::DevNonceReused),
            Err(error) => return Err(error.into()),
        }

        sqlx::query(
            "UPDATE lorawan_devices SET dev_addr = ?, nwk_s_key = ?, app_s_key = ?,
                 f_cnt_up = NULL, n_f_cnt_down = 0, joined_at = ?, updated_at = ?
             WHERE device_id = ?",
        )
        .bind(dev_addr)
        .bind(nwk_s_key)
        .bind(app_s_key)
        .bind(now)
        .bind(now)
        .bind(device.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(JoinRecord::Accepted)
    }

    /// Returns whether `dev_nonce` was used by the device before, without
    /// recording it.
    pub async fn lorawan_dev_nonce_used(
        &self,
        device: DeviceId,
        dev_nonce: u16,
    ) -> Result<bool, MetadataError> {
        let row =
            sqlx::query("SELECT 1 FROM lorawan_dev_nonces WHERE device_id = ? AND dev_nonce = ?")
                .bind(device.to_string())
                .bind(i64::from(dev_nonce))
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }

    /// Stores `f_cnt_up` as the device's last uplink counter if it is
    /// greater than the stored one, and returns whether it was. The
    /// comparison happens in the database, so two uplinks with one counter
    /// cannot both be accepted.
    pub async fn advance_lorawan_f_cnt_up(
        &self,
        device: DeviceId,
        f_cnt_up: u32,
    ) -> Result<bool, MetadataError> {
        let result = sqlx::query(
            "UPDATE lorawan_devices SET f_cnt_up = ?
             WHERE device_id = ? AND (f_cnt_up IS NULL OR f_cnt_up < ?)",
        )
        .bind(i64::from(f_cnt_up))
        .bind(device.to_string())
        .bind(i64::from(f_cnt_up))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Takes the next downlink counter of the device and returns it.
    pub async fn take_lorawan_f_cnt_down(&self, device: DeviceId) -> Result<u32, MetadataError> {
        let row = sqlx::query(
            "UPDATE lorawan_devices SET n_f_cnt_down = n_f_cnt_down + 1
             WHERE device_id = ? RETURNING n_f_cnt_down - 1 AS f_cnt_down",
        )
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?
        .ok_or(MetadataError::NotFound(
            "LoRaWAN registration of the device",
        ))?;
        let value: i64 = row.try_get("f_cnt_down")?;
        Ok(counter(Some(value), "n_f_cnt_down")?.unwrap_or(0))
    }

    /// Queues a downlink for a device of `tenant` and returns it.
    pub async fn queue_lorawan_downlink(
        &self,
        tenant: TenantId,
        device: DeviceId,
        f_port: u8,
        data: &[u8],
        confirmed: bool,
    ) -> Result<QueuedDownlink, MetadataError> {
        self.lorawan_device(tenant, device).await?;
        let row = sqlx::query(
            "INSERT INTO lorawan_downlinks (device_id, f_port, data, confirmed, created_at)
             VALUES (?, ?, ?, ?, ?) RETURNING *",
        )
        .bind(device.to_string())
        .bind(i64::from(f_port))
        .bind(data)
        .bind(confirmed)
        .bind(now_ms())
        .fetch_one(&self.pool)
        .await?;
        downlink_from_row(row)
    }

    /// Lists the downlinks of a device of `tenant` not yet sent, oldest
    /// first.
    pub async fn pending_lorawan_downlinks(
        &self,
        tenant: TenantId,
        device: DeviceId,
    ) -> Result<Vec<QueuedDownlink>, MetadataError> {
        self.lorawan_device(tenant, device).await?;
        let rows = sqlx::query(
            "SELECT * FROM lorawan_downlinks WHERE device_id = ? AND sent_at IS NULL ORDER BY id",
        )
        .bind(device.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(downlink_from_row).collect()
    }

    /// Returns the oldest downlink of the device not yet sent.
    pub async fn next_lorawan_downlink(
        &self,
        device: DeviceId,
    ) -> Result<Option<QueuedDownlink>, MetadataError> {
        let row = sqlx::query(
            "SELECT * FROM lorawan_downlinks WHERE device_id = ? AND sent_at IS NULL
             ORDER BY id LIMIT 1",
        )
        .bind(device.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(downlink_from_row).transpose()
    }

    /// Marks a queued downlink as sent with the counter it used.
    pub async fn mark_lorawan_downlink_sent(
        &self,
        id: i64,
        f_cnt_down: u32,
    ) -> Result<(), MetadataError> {
        sqlx::query("UPDATE lorawan_downlinks SET sent_at = ?, f_cnt_down = ? WHERE id = ?")
            .bind(now_ms())
            .bind(i64::from(f_cnt_down))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Registers a gateway; an EUI already registered is a conflict.
    pub async fn create_lorawan_gateway(
        &self,
        tenant: TenantId,
        gateway_eui: &str,
        name: &str,
    ) -> Result<LorawanGateway, MetadataError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO lorawan_gateways (gateway_eui, tenant_id, name, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(gateway_eui)
        .bind(tenant.to_string())
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(|error| {
            if is_unique_violation(&error) {
                MetadataError::Conflict(format!("gateway {gateway_eui} is already registered"))
            } else {
                error.into()
            }
        })?;
        Ok(LorawanGateway {
            gateway_eui: gateway_eui.to_owned(),
            name: name.to_owned(),
            created_at: now,
            last_seen_at: None,
        })
    }

    /// Lists the tenant's gateways by EUI.
    pub async fn list_lorawan_gateways(
        &self,
        tenant: TenantId,
    ) -> Result<Vec<LorawanGateway>, MetadataError> {
        let rows =
            sqlx::query("SELECT * FROM lorawan_gateways WHERE tenant_id = ? ORDER BY gateway_eui")
                .bind(tenant.to_string())
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(gateway_from_row).collect()
    }

    /// Returns the gateway with this EUI in any tenant.
    pub async fn lorawan_gateway(
        &self,
        gateway_eui: &str,
    ) -> Result<Option<LorawanGateway>, MetadataError> {
        let row = sqlx::query("SELECT * FROM lorawan_gateways WHERE gateway_eui = ?")
            .bind(gateway_eui)
            .fetch_optional(&self.pool)
            .await?;
        row.map(gateway_from_row).transpose()
    }

    pub async fn delete_lorawan_gateway(
        &self,
        tenant: TenantId,
        gateway_eui: &str,
    ) -> Result<(), MetadataError> {
        let result =
            sqlx::query("DELETE FROM lorawan_gateways WHERE tenant_id = ? AND gateway_eui = ?")
                .bind(tenant.to_string())
                .bind(gateway_eui)
                .execute(&self.pool)
                .await?;
        if result.rows_affected() == 0 {
            return Err(MetadataError::NotFound("gateway"));
        }
        Ok(())
    }

    /// Records when gateways were last heard from, as epoch milliseconds.
    pub async fn record_lorawan_gateways_seen(
        &self,
        seen: &[(String, i64)],
    ) -> Result<(), MetadataError> {
        let mut tx = self.pool.begin().await?;
        for (gateway_eui, at) in seen {
            sqlx::query(
                "UPDATE lorawan_gateways SET last_seen_at = MAX(COALESCE(last_seen_at, 0), ?)
                 WHERE gateway_eui = ?",
            )
            .bind(at)
            .bind(gateway_eui)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MetadataStore;

    async fn open() -> (tempfile::TempDir, SqliteMetadata, TenantId, DeviceId) {
        let dir = tempfile::tempdir().unwrap();
        let metadata = SqliteMetadata::open(dir.path()).await.unwrap();
        let tenant = metadata.default_tenant().await.unwrap().id;
        let device = metadata
            .create_device(tenant, "node-1", b"token-hash")
            .await
            .unwrap()
            .id;
        (dir, metadata, tenant, device)
    }

    fn abp(dev_eui: &str) -> NewLorawanDevice {
        NewLorawanDevice {
            dev_eui: dev_eui.to_owned(),
            join_eui: None,
            region: Some(Region::Eu868),
            activation: Activation::Abp,
            mac_version: "1.0.3".to_owned(),
            keys: SealedKeys {
                app_key: None,
                nwk_s_key: Some(vec![1; 45]),
                app_s_key: Some(vec![2; 45]),
            },
            dev_addr: Some("26011bda".to_owned()),
        }
    }

    #[test]
    fn eui_parsing_normalizes_case_and_separators() {
        assert_eq!(
            parse_eui("70-B3-D5-7E-D0-00-00-01").unwrap(),
            "70b3d57ed0000001"
        );
        assert_eq!(parse_dev_addr("26011BDA").unwrap(), "26011bda");
        assert!(
            parse_eui("70b3d57ed00000")
                .unwrap_err()
                .contains("16 hex digits")
        );
        assert!(parse_dev_addr("2601zzzz").is_err());
    }

    #[tokio::test]
    async fn device_found_by_eui_and_addr() {
        let (_dir, metadata, tenant, device) = open().await;
        let stored = metadata
            .put_lorawan_device(tenant, device, &abp("0011223344556677"))
            .await
            .unwrap();
        assert_eq!(stored.activation, Activation::Abp);
        assert_eq!(stored.f_cnt_up, None);

        let by_eui = metadata
            .lorawan_device_by_dev_eui("0011223344556677")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(by_eui.device_id, device);
        assert_eq!(by_eui.tenant_id, tenant);
        assert_eq!(by_eui.keys.nwk_s_key, Some(vec![1; 45]));

        let by_addr = metadata
            .lorawan_devices_by_dev_addr("26011bda")
            .await
            .unwrap();
        assert_eq!(by_addr.len(), 1);
        assert!(
            metadata
                .lorawan_device_by_dev_eui("ffffffffffffffff")
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn dev_eui_of_other_device_conflicts() {
        let (_dir, metadata, tenant, device) = open().await;
        let other = metadata
            .create_device(tenant, "node-2", b"other-hash")
            .await
            .unwrap()
            .id;
        metadata
            .put_lorawan_device(tenant, device, &abp("0011223344556677"))
            .await
            .unwrap();
        let error = metadata
            .put_lorawan_device(tenant, other, &abp("0011223344556677"))
            .await
            .unwrap_err();
        assert!(matches!(error, MetadataError::Conflict(_)), "{error}");
    }

    #[tokio::test]
    async fn f_cnt_up_only_moves_forward() {
        let (_dir, metadata, tenant, device) = open().await;
        metadata
            .put_lorawan_device(tenant, device, &abp("0011223344556677"))
            .await
            .unwrap();
        assert!(metadata.advance_lorawan_f_cnt_up(device, 0).await.unwrap());
        assert!(!metadata.advance_lorawan_f_cnt_up(device, 0).await.unwrap());
        assert!(
            metadata
                .advance_lorawan_f_cnt_up(device, 70_000)
                .await
                .unwrap()
        );
        assert!(
            !metadata
                .advance_lorawan_f_cnt_up(device, 69_999)
                .await
                .unwrap()
        );
        assert_eq!(metadata.take_lorawan_f_cnt_down(device).await.unwrap(), 0);
        assert_eq!(metadata.take_lorawan_f_cnt_down(device).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn join_rejects_reused_dev_nonce_and_resets_session() {
        let (_dir, metadata, tenant, device) = open().await;
        let mut otaa = abp("0011223344556677");
        otaa.activation = Activation::Otaa;
        otaa.dev_addr = None;
        metadata
            .put_lorawan_device(tenant, device, &otaa)
            .await
            .unwrap();
        let first = metadata
            .record_lorawan_join(device, 7, "00aabbcc", &[3; 45], &[4; 45])
            .await
            .unwrap();
        assert_eq!(first, JoinRecord::Accepted);
        assert!(metadata.lorawan_dev_nonce_used(device, 7).await.unwrap());
        metadata.advance_lorawan_f_cnt_up(device, 5).await.unwrap();

        let again = metadata
            .record_lorawan_join(device, 7, "00aabbdd", &[5; 45], &[6; 45])
            .await
            .unwrap();
        assert_eq!(again, JoinRecord::DevNonceReused);
        let stored = metadata.lorawan_device(tenant, device).await.unwrap();
        assert_eq!(stored.dev_addr.as_deref(), Some("00aabbcc"));
        assert_eq!(stored.f_cnt_up, Some(5));

        metadata
            .record_lorawan_join(device, 8, "00aabbee", &[5; 45], &[6; 45])
            .await
            .unwrap();
        let stored = metadata.lorawan_device(tenant, device).await.unwrap();
        assert_eq!(stored.f_cnt_up, None);
        assert!(stored.joined_at.is_some());
    }

    #[tokio::test]
    async fn downlinks_queue_in_order_until_sent() {
        let (_dir, metadata, tenant, device) = open().await;
        metadata
            .put_lorawan_device(tenant, device, &abp("0011223344556677"))
            .await
            .unwrap();
        let first = metadata
            .queue_lorawan_downlink(tenant, device, 10, b"\x01", false)
            .await
            .unwrap();
        metadata
            .queue_lorawan_downlink(tenant, device, 11, b"\x02", true)
            .await
            .unwrap();
        let next = metadata
            .next_lorawan_downlink(device)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(next.id, first.id);
        metadata
            .mark_lorawan_downlink_sent(first.id, 3)
            .await
            .unwrap();
        let pending = metadata
            .pending_lorawan_downlinks(tenant, device)
            .await
            .unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].f_port, 11);
        assert!(pending[0].confirmed);
    }

    #[tokio::test]
    async fn gateways_register_once_and_delete() {
        let (_dir, metadata, tenant, _device) = open().await;
        metadata
            .create_lorawan_gateway(tenant, "0102030405060708", "roof")
            .await
            .unwrap();
        let error = metadata
            .create_lorawan_gateway(tenant, "0102030405060708", "again")
            .await
            .unwrap_err();
        assert!(matches!(error, MetadataError::Conflict(_)));
        metadata
            .record_lorawan_gateways_seen(&[("0102030405060708".to_owned(), 42)])
            .await
            .unwrap();
        let listed = metadata.list_lorawan_gateways(tenant).await.unwrap();
        assert_eq!(listed[0].last_seen_at, Some(42));
        metadata
            .delete_lorawan_gateway(tenant, "0102030405060708")
            .await
            .unwrap();
        assert!(
            metadata
                .lorawan_gateway("0102030405060708")
                .await
                .unwrap()
                .is_none()
        );
    }
}
