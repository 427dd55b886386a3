//! Retained MQTT messages in SQLite (table `mqtt_retained`). The MQTT
//! server loads them at start and writes every change through
//! [`SqliteMetadata::apply_mqtt_retained`]; it keeps the working copy in
//! memory.

use sqlx::Row;

use super::sqlite::{now_ms, parse_id};
use super::{MetadataError, SqliteMetadata};
use crate::ids::{DeviceId, TenantId};

/// One retained message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRow {
    pub tenant_id: TenantId,
    /// `None` for the topic tree of the tenant's applications.
    pub device_id: Option<DeviceId>,
    /// For a device, the topic after its namespace prefix.
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub payload_is_utf8: bool,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
    /// Epoch milliseconds after which the message is dropped.
    pub expires_at: Option<i64>,
}

/// A change to the retained messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetainedChange {
    /// Stores a message, replacing the one on the same topic.
    Set(RetainedRow),
    /// Deletes the message on a topic, if any.
    Delete {
        tenant_id: TenantId,
        device_id: Option<DeviceId>,
        topic: String,
    },
}

fn device_column(device_id: Option<DeviceId>) -> String {
    device_id.map(|id| id.to_string()).unwrap_or_default()
}

impl SqliteMetadata {
    /// Deletes the expired retained messages and those of deleted
    /// devices, and returns the others.
    pub async fn load_mqtt_retained(&self) -> Result<Vec<RetainedRow>, MetadataError> {
        sqlx::query("DELETE FROM mqtt_retained WHERE expires_at IS NOT NULL AND expires_at <= ?")
            .bind(now_ms())
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "DELETE FROM mqtt_retained WHERE device_id <> '' AND device_id NOT IN (SELECT id FROM devices)",
        )
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(
            "SELECT tenant_id, device_id, topic, payload, qos, payload_is_utf8, content_type, response_topic, correlation_data, user_properties, expires_at FROM mqtt_retained",
        )
        .fetch_all(&self.pool)
        .await?;

        let mut retained = Vec::with_capacity(rows.len());
        for row in rows {
            let device: String = row.try_get("device_id")?;
            let device_id = if device.is_empty() {
                None
            } else {
                Some(parse_id(device)?)
            };
            let user_properties: String = row.try_get("user_properties")?;
            retained.push(RetainedRow {
                tenant_id: parse_id(row.try_get("tenant_id")?)?,
                device_id,
                topic: row.try_get("topic")?,
                payload: row.try_get("payload")?,
                qos: row.try_get("qos")?,
                payload_is_utf8: row.try_get("payload_is_utf8")?,
                content_type: row.try_get("content_type")?,
                response_topic: row.try_get("response_topic")?,
                correlation_data: row.try_get("correlation_data")?,
                user_properties: serde_json::from_str(&user_properties).unwrap_or_default(),
                expires_at: row.try_get("expires_at")?,
            });
        }
        Ok(retained)
    }

    /// Applies `changes` in order, in one transaction.
    pub async fn apply_mqtt_retained(
        &self,
        changes: &[RetainedChange],
    ) -> Result<(), MetadataError> {
        let now = now_ms();
        let mut tx = self.begin_write().await?;
        for change in changes {
            match change {
                RetainedChange::Set(row) => {
                    let user_properties = serde_json::to_string(&row.user_properties)
                        .unwrap_or_else(|_| "[]".to_owned());
                    sqlx::query(
                        "INSERT OR REPLACE INTO mqtt_retained (tenant_id, device_id, topic, payload, qos, payload_is_utf8, content_type, response_topic, correlation_data, user_properties, expires_at, updated_at)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(row.tenant_id.to_string())
                    .bind(device_column(row.device_id))
                    .bind(&row.topic)
                    .bind(&row.payload)
                    .bind(row.qos)
                    .bind(row.payload_is_utf8)
                    .bind(&row.content_type)
                    .bind(&row.response_topic)
                    .bind(&row.correlation_data)
                    .bind(user_properties)
                    .bind(row.expires_at)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                RetainedChange::Delete {
                    tenant_id,
                    device_id,
                    topic,
                } => {
                    sqlx::query(
                        "DELETE FROM mqtt_retained WHERE tenant_id = ? AND device_id = ? AND topic = ?",
                    )
                    .bind(tenant_id.to_string())
                    .bind(device_column(*device_id))
                    .bind(topic)
                    .execute(&mut *tx)
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
