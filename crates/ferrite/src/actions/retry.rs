//! The retry schedule: what the outcome of one attempt does to a delivery.
//!
//! Retries wait `retry_initial_delay * 2^(n-1)` after the n-th failed
//! attempt, capped at `retry_max_delay`, each delay drawn from ±20 % of
//! that value so that many deliveries that failed together do not retry in
//! lockstep. With the defaults that is about 1 s, 2 s, 4 s, ... 256 s, then
//! 300 s. A `Retry-After` from the receiver replaces the computed delay. A
//! delivery fails for good after `max_attempts` attempts, or when its next
//! attempt would fall more than `max_age` after the first.

use std::time::Duration;

use crate::config::ActionsConfig;
use crate::metadata::{AttemptResult, DeliveryStatus};

/// Spread of the jitter around the computed delay, as a fraction.
const JITTER: f64 = 0.2;

/// The result of one attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Delivered {
        status_code: Option<u16>,
    },
    /// Another attempt may succeed: a network error, a timeout, a 5xx or
    /// 429 response, a device without a session.
    Retry {
        error: String,
        status_code: Option<u16>,
        /// The receiver's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Another attempt would fail the same way, such as a 4xx response.
    Reject {
        error: String,
        status_code: Option<u16>,
    },
}

/// The retry settings of `[actions]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub fn from_config(config: &ActionsConfig) -> Self {
        Self {
            max_attempts: config.max_attempts,
            max_age: config.max_age,
            initial_delay: config.retry_initial_delay,
            max_delay: config.retry_max_delay,
        }
    }

    /// Returns the delay after `failed_attempts` failed attempts (at least
    /// 1), before jitter.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        let doublings = failed_attempts.saturating_sub(1).min(31);
        self.initial_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay)
    }

    /// Applies the jitter to a delay: `random` in [0, 1) maps to 80 % to
    /// 120 % of `delay`, never above `max_delay`.
    pub fn jitter(&self, delay: Duration, random: f64) -> Duration {
        let factor = 1.0 - JITTER + 2.0 * JITTER * random.clamp(0.0, 1.0);
        delay.mul_f64(factor).min(self.max_delay)
    }

    /// Computes the state of a delivery after its `attempts`-th attempt
    /// ended with `attempt`. `started_at_ms` is the start of the current
    /// round of attempts and `now_ms` the end of this one, both in epoch
    /// milliseconds. `random`, in [0, 1), draws the jitter.
    pub fn after_attempt(
        &self,
        attempt: Attempt,
        attempts: u32,
        started_at_ms: i64,
        now_ms: i64,
        random: f64,
    ) -> AttemptResult {
        let (error, status_code, retry_after) = match attempt {
            Attempt::Delivered { status_code } => {
                return AttemptResult {
                    status: DeliveryStatus::Succeeded,
                    attempts,
                    last_error: None,
                    last_status_code: status_code,
                    next_attempt_at: None,
                    updated_at: now_ms,
                };
            }
            Attempt::Reject { error, status_code } => {
                return failed(attempts, error, status_code, now_ms);
            }
            Attempt::Retry {
                error,
                status_code,
                retry_after,
            } => (error, status_code, retry_after),
        };

        if attempts >= self.max_attempts {
            let error =
                format!("{error}; gave up after {attempts} attempts (actions.max_attempts)");
            return failed(attempts, error, status_code, now_ms);
        }
        let delay = retry_after.unwrap_or_else(|| self.jitter(self.backoff(attempts), random));
        let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        let next_attempt_at = now_ms.saturating_add(delay_ms);
        let max_age_ms = i64::try_from(self.max_age.as_millis()).unwrap_or(i64::MAX);
        if next_attempt_at.saturating_sub(started_at_ms) > max_age_ms {
            let error = format!(
                "{error}; gave up: the next attempt, in {}, would come more than actions.max_age ({}) after the first",
                humantime::format_duration(Duration::from_millis(delay_ms.max(0) as u64)),
                humantime::format_duration(self.max_age)
            );
            return failed(attempts, error, status_code, now_ms);
        }
        AttemptResult {
            status: DeliveryStatus::Pending,
            attempts,
            last_error: Some(error),
            last_status_code: status_code,
            next_attempt_at: Some(next_attempt_at),
            updated_at: now_ms,
        }
    }
}

fn failed(attempts: u32, error: String, status_code: Option<u16>, now_ms: i64) -> AttemptResult {
    AttemptResult {
        status: DeliveryStatus::Failed,
        attempts,
        last_error: Some(error),
        last_status_code: status_code,
        next_attempt_at: None,
        updated_at: now_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::from_config(&ActionsConfig::default())
    }

    fn retry(retry_after: Option<Duration>) -> Attempt {
        Attempt::Retry {
            error: "HTTP 500".to_owned(),
            status_code: Some(500),
            retry_after,
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = policy();
        let delays: Vec<u64> = (1..=11).map(|n| policy.backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_the_cap() {
        let policy = policy();
        let base = Duration::from_secs(10);
        assert_eq!(policy.jitter(base, 0.0), Duration::from_secs(8));
        assert_eq!(policy.jitter(base, 0.5), Duration::from_secs(10));
        assert!(policy.jitter(base, 0.999) <= Duration::from_secs(12));
        assert_eq!(
            policy.jitter(Duration::from_secs(300), 0.999),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn success_clears_the_error() {
        let result = policy().after_attempt(
            Attempt::Delivered {
                status_code: Some(204),
            },
            3,
            0,
            5_000,
            0.5,
        );
        assert_eq!(result.status, DeliveryStatus::Succeeded);
        assert_eq!(result.attempts, 3);
        assert_eq!(result.last_error, None);
        assert_eq!(result.last_status_code, Some(204));
        assert_eq!(result.next_attempt_at, None);
    }

    #[test]
    fn rejection_fails_at_once() {
        let attempt = Attempt::Reject {
            error: "HTTP 400".to_owned(),
            status_code: Some(400),
        };
        let result = policy().after_attempt(attempt, 1, 0, 1_000, 0.5);
        assert_eq!(result.status, DeliveryStatus::Failed);
        assert_eq!(result.last_error.as_deref(), Some("HTTP 400"));
        assert_eq!(result.next_attempt_at, None);
    }

    #[test]
    fn retry_is_scheduled_with_backoff() {
        let result = policy().after_attempt(retry(None), 3, 0, 10_000, 0.5);
        assert_eq!(result.status, DeliveryStatus::Pending);
        assert_eq!(result.next_attempt_at, Some(14_000));
        assert_eq!(result.last_status_code, Some(500));
    }

    #[test]
    fn retry_after_replaces_the_backoff() {
        let result = policy().after_attempt(retry(Some(Duration::from_secs(30))), 1, 0, 1_000, 0.5);
        assert_eq!(result.next_attempt_at, Some(31_000));
    }

    #[test]
    fn last_attempt_fails_the_delivery() {
        let policy = policy();
        let result = policy.after_attempt(retry(None), policy.max_attempts, 0, 1_000, 0.5);
        assert_eq!(result.status, DeliveryStatus::Failed);
        let error = result.last_error.unwrap();
        assert!(
            error.starts_with("HTTP 500; gave up after 20 attempts"),
            "{error}"
        );
    }

    #[test]
    fn retry_past_max_age_fails_the_delivery() {
        let policy = policy();
        let day_ms = 24 * 3600 * 1000;
        let result = policy.after_attempt(retry(None), 5, 0, day_ms - 1_000, 0.5);
        assert_eq!(result.status, DeliveryStatus::Failed);
        let error = result.last_error.unwrap();
        assert!(error.contains("actions.max_age (1day)"), "{error}");

        let long_wait = retry(Some(Duration::from_secs(2 * 24 * 3600)));
        let result = policy.after_attempt(long_wait, 1, 0, 1_000, 0.5);
        assert_eq!(result.status, DeliveryStatus::Failed);
    }
}
