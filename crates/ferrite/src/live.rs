//! The live bus: processed telemetry and alarm changes, published by the
//! pipeline and the alarm manager to live subscribers (WebSocket and
//! server-sent event streams, which filter by tenant, device, key and
//! profile).
//!
//! The bus is a bounded broadcast channel. Publishing never waits: a
//! subscriber that falls more than [`LIVE_BUS_CAPACITY`] events behind loses
//! the oldest ones and is told how many it lost, so a slow client can never
//! stall the pipeline.

use std::sync::Arc;

use ferrite_core::{TimestampNs, Value};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::ids::{DeviceId, ProfileId, TenantId};
use crate::metadata::{Attributes, Labels};

/// Events a subscriber may fall behind before it loses the oldest.
pub const LIVE_BUS_CAPACITY: usize = 16_384;

/// One event on the live bus.
#[derive(Debug, Clone)]
pub enum LiveEvent {
    Telemetry(TelemetryEvent),
    /// An alarm was raised, acknowledged, cleared or its severity changed.
    Alarm(AlarmEvent),
}

impl LiveEvent {
    pub fn tenant_id(&self) -> TenantId {
        match self {
            LiveEvent::Telemetry(event) => event.tenant_id,
            LiveEvent::Alarm(event) => event.tenant_id,
        }
    }

    pub fn device_id(&self) -> DeviceId {
        match self {
            LiveEvent::Telemetry(event) => event.device_id,
            LiveEvent::Alarm(event) => event.device_id,
        }
    }
}

/// The points that one message of one device stored, after decoding,
/// validation and transformation.
#[derive(Debug, Clone)]
pub struct TelemetryEvent {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub device_name: Arc<str>,
    pub profile_id: Option<ProfileId>,
    pub profile_name: Option<Arc<str>>,
    /// The device's labels when the message was processed (enrichment).
    pub labels: Arc<Labels>,
    /// The device attributes the profile's `enrich.attributes` names.
    pub attributes: Arc<Attributes>,
    /// Server time when the message arrived, in nanoseconds.
    pub received_at_ns: TimestampNs,
    /// Stored points as (key, timestamp in nanoseconds, value).
    pub points: Vec<(String, TimestampNs, Value)>,
}

/// A change of one alarm. `alarm` is the alarm as the REST API returns it,
/// so live clients and the API see the same fields.
#[derive(Debug, Clone)]
pub struct AlarmEvent {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub profile_id: Option<ProfileId>,
    /// What happened: `raised`, `updated`, `acknowledged` or `cleared`.
    pub change: AlarmChange,
    pub alarm: Arc<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmChange {
    Raised,
    /// Still active, with a new value or severity.
    Updated,
    Acknowledged,
    Cleared,
}

impl AlarmChange {
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmChange::Raised => "raised",
            AlarmChange::Updated => "updated",
            AlarmChange::Acknowledged => "acknowledged",
            AlarmChange::Cleared => "cleared",
        }
    }
}

/// Sending side of the live bus. Cheap to clone.
#[derive(Clone)]
pub struct LiveBus {
    sender: broadcast::Sender<Arc<LiveEvent>>,
}

impl Default for LiveBus {
    fn default() -> Self {
        LiveBus {
            sender: broadcast::channel(LIVE_BUS_CAPACITY).0,
        }
    }
}

impl LiveBus {
    /// Publishes an event to every current subscriber without waiting.
    pub fn publish(&self, event: LiveEvent) {
        // An error only means that nobody subscribes right now.
        let _ = self.sender.send(Arc::new(event));
    }

    /// True when at least one subscriber listens, so that publishers can
    /// skip building events nobody reads.
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.sender.subscribe()
    }
}
