//! Metrics of the action runner and the limiter for repeated warnings, so
//! that metric names and label values are written in one place. Label
//! values come from fixed sets: an action kind and an outcome.

use std::time::{Duration, Instant};

use crate::metadata::ActionKind;

/// Shortest time between two warnings of one kind.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

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

/// Lets one warning through per [`WARN_INTERVAL`] and counts the rest, so
/// that a broken receiver or an alarm storm cannot flood the log.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// Returns `Some(suppressed since the last warning)` when a warning may
    /// be logged now.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limiter_counts_suppressed_repeats() {
        let mut limiter = WarnLimiter::default();
        let start = Instant::now();
        assert_eq!(limiter.allow(start), Some(0));
        assert_eq!(limiter.allow(start + Duration::from_secs(1)), None);
        assert_eq!(limiter.allow(start + WARN_INTERVAL), Some(1));
    }
}
