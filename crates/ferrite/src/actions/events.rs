//! Metrics of the action runner and the limiter for repeated warnings, so
//! that metric names and label values are written in one place. Label
//! values come from fixed sets: an action kind and an outcome.

use crate::metadata::ActionKind;

/// Outcome of one attempt, a label of `ferrite_action_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The attempt failed and another one is scheduled.
    Retrying,
    /// The delivery failed for good.
    Failed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Retrying => "retrying",
            Outcome::Failed => "failed",
        }
    }
}

/// Registers the metrics with their descriptions, so that they appear on
/// `/metrics` before the first delivery.
pub fn register() {
    metrics::describe_counter!(
        "ferrite_action_deliveries_total",
        "Attempts of alarm action deliveries, by action kind and outcome (succeeded, retrying, failed)."
    );
    metrics::describe_counter!(
        "ferrite_action_queue_dropped_total",
        "Alarm action deliveries dropped because the action queue was full (actions.queue_capacity)."
    );
    metrics::counter!("ferrite_action_queue_dropped_total").increment(0);
}

pub fn attempt_finished(kind: ActionKind, outcome: Outcome) {
    metrics::counter!(
        "ferrite_action_deliveries_total",
        "kind" => kind.as_str(),
        "outcome" => outcome.as_str()
    )
    .increment(1);
}

pub fn queue_dropped() {
    metrics::counter!("ferrite_action_queue_dropped_total").increment(1);
}

pub use crate::warn_limit::WarnLimiter;
