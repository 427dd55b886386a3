//! The live bus: processed telemetry and alarm changes, published by the
//! pipeline and the alarm manager to live subscribers (WebSocket and
//! server-sent event streams, which filter by tenant, device, key and
//! profile).
//!
//! The bus is a bounded broadcast channel. Publishing never waits: a
//! subscriber that falls more than [`LIVE_BUS_CAPACITY`] events behind loses
//! the oldest ones and is told how many it lost, so a slow client can never
//! stall the pipeline.
//!
//! Shutdown: [`LiveBus::close`] cancels a token that every stream watches,
//! so open streams end before the HTTP listener waits for its connections.
//!
//! [`LiveFilter`] decides which events and points one subscriber receives.
//! It only matches; the API parses it from requests.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferrite_core::{TimestampNs, Value};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

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
    /// Token that [`LiveBus::close`] cancels at shutdown, which ends the streams.
    closed: CancellationToken,
}

impl Default for LiveBus {
    fn default() -> Self {
        LiveBus {
            sender: broadcast::channel(LIVE_BUS_CAPACITY).0,
            closed: CancellationToken::new(),
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

    /// Ends every live stream, at server shutdown. Publishing still works,
    /// but no stream receives the events.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Returns the token that [`LiveBus::close`] cancels.
    pub fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

/// The selection of events and points that one subscriber receives, inside
/// its tenant. An event passes when it passes every part, and an empty part
/// passes everything.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveFilter {
    /// Devices to include; empty means every device.
    pub devices: BTreeSet<DeviceId>,
    /// Telemetry keys to include; empty means every key.
    pub keys: Vec<KeyPattern>,
    /// The device profile to include; `None` means every device.
    pub profile: Option<ProfileId>,
    /// Labels a device must have, each with the given value.
    pub labels: Vec<(String, String)>,
    pub telemetry: bool,
    pub alarms: bool,
}

impl Default for LiveFilter {
    /// Returns a filter that passes every telemetry event and alarm change.
    fn default() -> Self {
        LiveFilter {
            devices: BTreeSet::new(),
            keys: Vec::new(),
            profile: None,
            labels: Vec::new(),
            telemetry: true,
            alarms: true,
        }
    }
}

/// One `key` selector: a key name, or a prefix when it ends with `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPattern {
    Exact(String),
    /// `temp*` is `Prefix("temp")`; `*` alone is `Prefix("")`, every key.
    Prefix(String),
}

impl KeyPattern {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            KeyPattern::Exact(name) => key == name,
            KeyPattern::Prefix(prefix) => key.starts_with(prefix.as_str()),
        }
    }
}

impl std::fmt::Display for KeyPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyPattern::Exact(name) => f.write_str(name),
            KeyPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

impl LiveFilter {
    pub fn matches_device(&self, device: DeviceId) -> bool {
        self.devices.is_empty() || self.devices.contains(&device)
    }

    pub fn matches_profile(&self, profile: Option<ProfileId>) -> bool {
        self.profile.is_none() || self.profile == profile
    }

    pub fn matches_labels(&self, labels: &Labels) -> bool {
        self.labels
            .iter()
            .all(|(name, value)| labels.get(name) == Some(value))
    }

    pub fn matches_key(&self, key: &str) -> bool {
        self.keys.is_empty() || self.keys.iter().any(|pattern| pattern.matches(key))
    }

    /// Checks an alarm change; the caller checks the device's labels.
    pub fn passes_alarm(&self, event: &AlarmEvent) -> bool {
        self.alarms
            && self.matches_device(event.device_id)
            && self.matches_profile(event.profile_id)
    }

    /// Returns the points of `event` that pass the filter, or `None` when
    /// the event does not pass or no point is left. `labels` are the
    /// device's current labels, because an event carries them only when
    /// its profile enriches with labels.
    pub fn telemetry_points<'a>(
        &self,
        event: &'a TelemetryEvent,
        labels: &Labels,
    ) -> Option<Vec<&'a (String, TimestampNs, Value)>> {
        let passes = self.telemetry
            && self.matches_device(event.device_id)
            && self.matches_profile(event.profile_id)
            && self.matches_labels(labels);
        if !passes {
            return None;
        }
        let points: Vec<_> = event
            .points
            .iter()
            .filter(|(key, _, _)| self.matches_key(key))
            .collect();
        (!points.is_empty()).then_some(points)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry(profile: Option<ProfileId>) -> TelemetryEvent {
        TelemetryEvent {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            device_name: Arc::from("pump-1"),
            profile_id: profile,
            profile_name: profile.map(|_| Arc::from("pump")),
            labels: Arc::default(),
            attributes: Arc::default(),
            received_at_ns: 1_700_000_000_000_000_000,
            points: vec![
                ("temperature".into(), 1, Value::Float(21.5)),
                ("temp.inner".into(), 1, Value::Int(20)),
                ("humidity".into(), 1, Value::Int(40)),
            ],
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    fn keys(points: Option<Vec<&(String, TimestampNs, Value)>>) -> Option<Vec<&str>> {
        points.map(|points| points.iter().map(|(key, _, _)| key.as_str()).collect())
    }

    #[test]
    fn default_filter_passes_every_point() {
        let event = telemetry(None);
        let passed = keys(LiveFilter::default().telemetry_points(&event, &Labels::new()));
        assert_eq!(passed, Some(vec!["temperature", "temp.inner", "humidity"]));
    }

    #[test]
    fn key_patterns_keep_matching_points() {
        let event = telemetry(None);
        let no_labels = Labels::new();
        let filter = LiveFilter {
            keys: vec![
                KeyPattern::Prefix("temp".into()),
                KeyPattern::Exact("battery".into()),
            ],
            ..LiveFilter::default()
        };
        assert_eq!(
            keys(filter.telemetry_points(&event, &no_labels)),
            Some(vec!["temperature", "temp.inner"])
        );

        let exact = LiveFilter {
            keys: vec![KeyPattern::Exact("temp".into())],
            ..LiveFilter::default()
        };
        assert_eq!(keys(exact.telemetry_points(&event, &no_labels)), None);

        let every = LiveFilter {
            keys: vec![KeyPattern::Prefix(String::new())],
            ..LiveFilter::default()
        };
        assert_eq!(
            keys(every.telemetry_points(&event, &no_labels)).map(|k| k.len()),
            Some(3)
        );
    }

    #[test]
    fn device_filter_skips_other_devices() {
        let event = telemetry(None);
        let other = LiveFilter {
            devices: BTreeSet::from([DeviceId::new_random()]),
            ..LiveFilter::default()
        };
        assert!(other.telemetry_points(&event, &Labels::new()).is_none());
        let own = LiveFilter {
            devices: BTreeSet::from([event.device_id]),
            ..LiveFilter::default()
        };
        assert!(own.telemetry_points(&event, &Labels::new()).is_some());
    }

    #[test]
    fn labels_and_profile_must_all_match() {
        let profile = ProfileId::new_random();
        let event = telemetry(Some(profile));
        let device_labels = labels(&[("site", "north"), ("floor", "2")]);
        let cases = [
            (vec![("site", "north")], None, true),
            (vec![("site", "north"), ("floor", "2")], None, true),
            (vec![("site", "south")], None, false),
            (vec![("room", "2")], None, false),
            (vec![], Some(profile), true),
            (vec![], Some(ProfileId::new_random()), false),
            (
                vec![("site", "north")],
                Some(ProfileId::new_random()),
                false,
            ),
        ];
        for (selectors, profile, expected) in cases {
            let filter = LiveFilter {
                labels: selectors
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
                profile,
                ..LiveFilter::default()
            };
            assert_eq!(
                filter.telemetry_points(&event, &device_labels).is_some(),
                expected,
                "labels {selectors:?}, profile {profile:?}"
            );
        }
    }

    #[test]
    fn alarm_filter_checks_type_device_profile() {
        let profile = ProfileId::new_random();
        let alarm = AlarmEvent {
            tenant_id: TenantId::new_random(),
            device_id: DeviceId::new_random(),
            profile_id: Some(profile),
            change: AlarmChange::Raised,
            alarm: Arc::new(serde_json::json!({})),
        };
        assert!(LiveFilter::default().passes_alarm(&alarm));
        let cases = [
            LiveFilter {
                alarms: false,
                ..LiveFilter::default()
            },
            LiveFilter {
                devices: BTreeSet::from([DeviceId::new_random()]),
                ..LiveFilter::default()
            },
            LiveFilter {
                profile: Some(ProfileId::new_random()),
                ..LiveFilter::default()
            },
        ];
        for filter in cases {
            assert!(!filter.passes_alarm(&alarm), "{filter:?}");
        }
    }

    #[test]
    fn alarms_only_filter_skips_telemetry() {
        let event = telemetry(None);
        let filter = LiveFilter {
            telemetry: false,
            ..LiveFilter::default()
        };
        assert!(filter.telemetry_points(&event, &Labels::new()).is_none());
    }

    #[tokio::test]
    async fn close_cancels_the_token_of_every_clone() {
        let bus = LiveBus::default();
        let clone = bus.clone();
        bus.close();
        assert!(clone.closed().is_cancelled());
    }
}
