//! A limiter for repeated warnings, shared by the adapters and the action
//! runner, so that a device repeating a mistake or a broken webhook
//! receiver cannot flood the log.

use std::time::{Duration, Instant};

/// Shortest time between two warnings of one kind.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Lets one warning through per [`WARN_INTERVAL`] and counts the rest.
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
