//! Uplinks from other LoRaWAN network servers (ChirpStack v4, The Things
//! Stack v3) that run the devices themselves, so that Ferrite stores and
//! decodes their data like uplinks from its own network server.
//!
//! Shape, as for every adapter:
//! - configuration: API keys for the webhooks, `[lorawan.chirpstack_mqtt]`
//!   for ChirpStack's MQTT integration;
//! - delivery: [`http`] (ChirpStack's HTTP integration and The Things
//!   Stack's webhooks) and [`mqtt`] (a client of the broker ChirpStack
//!   publishes to);
//! - mapping: [`chirpstack`] and [`tts`] parse the events into an
//!   [`uplink::Uplink`] without I/O, and [`IntegrationContext::accept`]
//!   turns it into one `Raw` envelope with a JSON `meta`.
//!
//! A device is found by its DevEUI in the LoRaWAN registry
//! (`PUT /api/v1/devices/{id}/lorawan`, usually with the `external`
//! activation). Every delivery is acknowledged only after the ingest log has
//! stored it. Keys, frame counters and downlinks stay with the other
//! network server; this module only receives.

mod chirpstack;
mod dedup;
mod fields;
pub mod http;
pub mod mqtt;
mod tts;
mod uplink;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::ids::{DeviceId, TenantId};
use crate::ingest::{ContentType, Envelope, IngestError, IngestHandle, Protocol};
use crate::metadata::{MetadataError, SqliteMetadata};
use crate::pipeline::SeenDevices;

pub use dedup::RecentUplinks;
use dedup::{Claim, UplinkId};
pub use fields::ParseError;
pub use uplink::{NetworkServer, Uplink};

/// Tenants whose devices a delivery may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantScope {
    /// The tenant of the API key that signed the webhook request.
    Only(TenantId),
    /// Any tenant: DevEUIs are unique on a node, so the registry alone
    /// decides. Used by the MQTT client when no tenant is configured.
    Any,
}

/// Outcome of an accepted uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Appended to the ingest log.
    Stored(DeviceId),
    /// The same uplink was stored within the deduplication window.
    Duplicate(DeviceId),
    /// No application payload: only the device's last-seen time changed.
    MacOnly(DeviceId),
}

impl Accepted {
    pub fn device_id(self) -> DeviceId {
        match self {
            Accepted::Stored(id) | Accepted::Duplicate(id) | Accepted::MacOnly(id) => id,
        }
    }

    /// Returns the value of the `outcome` metric label.
    pub fn outcome(self) -> &'static str {
        match self {
            Accepted::Stored(_) => "stored",
            Accepted::Duplicate(_) => "duplicate",
            Accepted::MacOnly(_) => "mac_only",
        }
    }
}

/// Reason an uplink was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// No device of the scope has this DevEUI.
    #[error(
        "no device with DevEUI {dev_eui} is registered; register it with PUT /api/v1/devices/{{id}}/lorawan and the activation \"external\""
    )]
    UnknownDevEui { dev_eui: String },
    /// Another delivery of the same uplink is being stored.
    #[error("the same uplink (DevEUI {dev_eui}, FCnt {f_cnt}) is being stored; retry in a second")]
    InFlight { dev_eui: String, f_cnt: u32 },
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

impl AcceptError {
    /// Returns the value of the `outcome` metric label.
    pub fn outcome(&self) -> &'static str {
        match self {
            AcceptError::UnknownDevEui { .. } => "unknown_device",
            AcceptError::InFlight { .. } => "in_flight",
            AcceptError::Ingest(_) | AcceptError::Metadata(_) => "failed",
        }
    }

    /// Returns true when the same delivery may succeed later.
    pub fn is_transient(&self) -> bool {
        !matches!(self, AcceptError::UnknownDevEui { .. })
    }
}

/// State that the webhook endpoints and the MQTT client share to store
/// uplinks.
pub struct IntegrationContext {
    pub metadata: Arc<SqliteMetadata>,
    pub ingest: IngestHandle,
    /// Receive times for the device status task, which writes them as
    /// last-seen times.
    pub seen: SeenDevices,
    /// Deliveries of the last minute, for dropping repeats.
    pub recent: RecentUplinks,
}

/// A device of the LoRaWAN registry that an uplink maps to.
struct TargetDevice {
    tenant_id: TenantId,
    device_id: DeviceId,
}

impl IntegrationContext {
    /// Stores one uplink: finds the device by DevEUI, drops a repeat, and
    /// appends a `Raw` envelope with the FRMPayload and the transport
    /// metadata. Returns after the append is durable.
    pub async fn accept(
        &self,
        uplink: &Uplink,
        scope: TenantScope,
    ) -> Result<Accepted, AcceptError> {
        let device = self.find_device(&uplink.dev_eui, scope).await?;
        let now_ns = now_ns();

        if uplink.is_mac_only() {
            self.record_seen(device.device_id, now_ns);
            return Ok(Accepted::MacOnly(device.device_id));
        }

        let id = UplinkId::new(&uplink.dev_eui, uplink.f_cnt, &uplink.frm_payload);
        match self.recent.claim(&id, Instant::now()) {
            Claim::New => {}
            Claim::Duplicate => return Ok(Accepted::Duplicate(device.device_id)),
            Claim::InFlight => {
                return Err(AcceptError::InFlight {
                    dev_eui: uplink.dev_eui.clone(),
                    f_cnt: uplink.f_cnt,
                });
            }
        }

        let envelope = build_envelope(uplink, &device, now_ns);
        let appended = self.ingest.append(vec![envelope]).await;
        self.recent.finish(&id, appended.is_ok(), Instant::now());
        appended?;
        metrics::counter!("ferrite_ingest_messages_total", "protocol" => Protocol::Lorawan.as_str())
            .increment(1);
        Ok(Accepted::Stored(device.device_id))
    }

    async fn find_device(
        &self,
        dev_eui: &str,
        scope: TenantScope,
    ) -> Result<TargetDevice, AcceptError> {
        let registered = self.metadata.lorawan_device_by_dev_eui(dev_eui).await?;
        let device = registered.filter(|device| match scope {
            TenantScope::Only(tenant) => device.tenant_id == tenant,
            TenantScope::Any => true,
        });
        // A DevEUI of another tenant gets the same error as an unknown one,
        // so that a caller learns nothing about other tenants.
        let Some(device) = device else {
            return Err(AcceptError::UnknownDevEui {
                dev_eui: dev_eui.to_owned(),
            });
        };
        Ok(TargetDevice {
            tenant_id: device.tenant_id,
            device_id: device.device_id,
        })
    }

    fn record_seen(&self, device: DeviceId, at_ns: i64) {
        let mut seen = self.seen.lock();
        let entry = seen.entry(device).or_insert(at_ns);
        *entry = (*entry).max(at_ns);
    }
}

/// Builds the envelope of a data uplink. Its protocol is LoRaWAN whatever
/// carried the event, so the pipeline, dead letters and metrics treat it
/// like an uplink of Ferrite's own network server. The receive time is the network
/// server's when it has one, so an uplink delivered late (an MQTT backlog
/// after an outage) keeps the time of its reception. A network server
/// clock ahead of Ferrite's is capped at `now_ns`.
fn build_envelope(uplink: &Uplink, device: &TargetDevice, now_ns: i64) -> Envelope {
    let received_at_ns = uplink
        .received_at
        .as_ref()
        .map_or(now_ns, |(nanos, _)| (*nanos).min(now_ns));
    Envelope {
        tenant_id: device.tenant_id,
        device_id: device.device_id,
        protocol: Protocol::Lorawan,
        received_at_ns,
        content_type: ContentType::Raw,
        payload: Bytes::copy_from_slice(&uplink.frm_payload),
        meta: Bytes::from(uplink.meta_json()),
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now()
        .timestamp_nanos_opt()
        .unwrap_or(i64::MAX - 1)
}

/// Counts one delivery by network server, transport and outcome.
pub fn count_delivery(
    network_server: &'static str,
    transport: &'static str,
    outcome: &'static str,
) {
    metrics::counter!(
        "ferrite_lorawan_integration_uplinks_total",
        "network_server" => network_server,
        "transport" => transport,
        "outcome" => outcome
    )
    .increment(1);
}

#[cfg(test)]
mod tests;
