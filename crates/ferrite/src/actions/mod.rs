//! Alarm actions: webhooks, publishes to an external MQTT broker and RPC
//! commands to devices, run when an alarm of a rule changes.
//!
//! The alarm manager calls [`Actions::submit`] with an action of the rule
//! ([`ActionSpec`]) and the change ([`ActionEvent`]). Each such run is a
//! delivery: a row in the metadata table `action_deliveries` with its state
//! (pending, succeeded, failed), its attempts and its last error.
//!
//! ## Guarantees
//! - `submit` never waits. The queue in front of the database is bounded
//!   (`actions.queue_capacity`); when it is full the delivery is dropped
//!   and counted.
//! - Delivery is at least once. A delivery is attempted until it succeeds,
//!   is rejected (a 4xx response), or runs out of attempts or age
//!   (`retry.rs`). Pending deliveries survive a restart. A receiver can see
//!   a delivery twice, for example when its response was lost, and can drop
//!   repeats by the delivery id.
//! - Deliveries of one alarm are not ordered: a retry of `raised` may
//!   arrive after `cleared`. The body's `alarm` carries the state and times
//!   to order them by.
//!
//! ## Layout
//! - `spec.rs`: the action specification and its validation;
//! - `runner.rs`: the queue, the scheduler and the retention;
//! - `retry.rs`: the retry schedule;
//! - `webhook.rs`, `mqtt.rs`, `command.rs`: one attempt of each kind;
//! - `secrets.rs`: webhook secrets and header values sealed in profiles;
//! - `events.rs`: metrics and rate-limited warnings.

mod command;
mod events;
mod mqtt;
mod retry;
pub mod runner;
pub mod secrets;
pub mod spec;
mod webhook;

#[cfg(test)]
mod tests;

pub use runner::{Actions, RetryError};
pub use spec::{ActionSpec, Trigger, validate_method, validate_params};

use serde_json::json;

use crate::ids::{AlarmId, DeviceId, TenantId};
use crate::live::AlarmChange;

/// One change of one alarm: the input of an action.
#[derive(Debug, Clone)]
pub struct ActionEvent {
    pub tenant_id: TenantId,
    pub device_id: DeviceId,
    pub device_name: String,
    pub change: AlarmChange,
    /// The alarm as the REST API returns it: id, rule, severity, status,
    /// value and times.
    pub alarm: serde_json::Value,
}

impl ActionEvent {
    /// Returns the event name of webhooks and deliveries, such as
    /// `alarm.raised`.
    pub fn event_name(&self) -> String {
        format!("alarm.{}", self.change.as_str())
    }

    /// Returns the alarm's `id` when it is a UUID.
    pub fn alarm_id(&self) -> Option<AlarmId> {
        self.alarm.get("id")?.as_str()?.parse().ok()
    }

    /// Builds the body of webhooks and MQTT publishes without `sent_at`,
    /// which each attempt adds.
    pub fn document(&self) -> serde_json::Value {
        json!({
            "event": self.event_name(),
            "device": {"id": self.device_id, "name": self.device_name},
            "alarm": self.alarm,
        })
    }
}
