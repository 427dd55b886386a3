//! Throttle for password and API key guessing.
//!
//! Failed checks are counted per source address and per account (a user's
//! email) in fixed windows of [`WINDOW`]. Once a key reaches its limit,
//! further attempts for it are rejected without a check until its window
//! ends, so that guessing costs no password hash and learns nothing.
//! Successful logins do not reset the count. Rejected attempts are
//! counted in `ferrite_auth_attempts_throttled_total`.
//!
//! The per-account limit lets anyone delay the logins of a known email by
//! failing on purpose; that is the usual price of stopping guesses spread
//! over many addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::AuthError;

/// Length of one counting window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Failed checks from one source address per window.
pub const MAX_FAILURES_PER_ADDRESS: u32 = 20;
/// Failed logins for one account per window.
pub const MAX_FAILURES_PER_ACCOUNT: u32 = 10;
/// Keys tracked at a time. When full, expired windows are removed, and
/// failures of new keys go uncounted until there is room.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    /// A user's email, in lower case.
    Account(String),
}

impl Key {
    fn limit(&self) -> u32 {
        match self {
            Key::Address(_) => MAX_FAILURES_PER_ADDRESS,
            Key::Account(_) => MAX_FAILURES_PER_ACCOUNT,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts of recent failed checks; see the module documentation.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    windows: Mutex<HashMap<Key, Window>>,
}

fn keys(peer: Option<IpAddr>, account: Option<&str>) -> impl Iterator<Item = Key> {
    peer.map(Key::Address)
        .into_iter()
        .chain(account.map(|email| Key::Account(email.to_lowercase())))
}

impl LoginThrottle {
    /// Rejects an attempt while its address or account is over the limit.
    pub fn check(&self, peer: Option<IpAddr>, account: Option<&str>) -> Result<(), AuthError> {
        self.check_at(peer, account, Instant::now())
    }

    /// Counts a failed check for the address and the account.
    pub fn record_failure(&self, peer: Option<IpAddr>, account: Option<&str>) {
        self.record_failure_at(peer, account, Instant::now());
    }

    fn check_at(
        &self,
        peer: Option<IpAddr>,
        account: Option<&str>,
        now: Instant,
    ) -> Result<(), AuthError> {
        let windows = self.windows.lock();
        let retry_after = keys(peer, account)
            .filter_map(|key| {
                let window = windows.get(&key)?;
                let ends = window.started + WINDOW;
                (window.failures >= key.limit() && ends > now).then(|| ends - now)
            })
            .max();
        match retry_after {
            Some(retry_after) => {
                metrics::counter!("ferrite_auth_attempts_throttled_total").increment(1);
                Err(AuthError::Throttled { retry_after })
            }
            None => Ok(()),
        }
    }

    fn record_failure_at(&self, peer: Option<IpAddr>, account: Option<&str>, now: Instant) {
        let mut windows = self.windows.lock();
        if windows.len() >= MAX_KEYS {
            windows.retain(|_, window| window.started + WINDOW > now);
        }
        for key in keys(peer, account) {
            if windows.len() >= MAX_KEYS && !windows.contains_key(&key) {
                continue;
            }
            let window = windows.entry(key).or_insert(Window {
                started: now,
                failures: 0,
            });
            if window.started + WINDOW <= now {
                *window = Window {
                    started: now,
                    failures: 0,
                };
            }
            window.failures += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address() -> Option<IpAddr> {
        Some("192.0.2.7".parse().expect("valid address"))
    }

    #[test]
    fn account_is_blocked_after_its_limit() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES_PER_ACCOUNT {
            assert!(throttle.check_at(None, Some("a@example.com"), now).is_ok());
            throttle.record_failure_at(None, Some("a@example.com"), now);
        }

        let blocked = throttle.check_at(None, Some("A@example.com"), now);
        assert!(matches!(blocked, Err(AuthError::Throttled { .. })));
        assert!(throttle.check_at(None, Some("b@example.com"), now).is_ok());
        assert!(
            throttle
                .check_at(None, Some("a@example.com"), now + WINDOW)
                .is_ok()
        );
    }

    #[test]
    fn address_is_blocked_across_accounts() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for index in 0..MAX_FAILURES_PER_ADDRESS {
            throttle.record_failure_at(address(), Some(&format!("{index}@example.com")), now);
        }

        let blocked = throttle.check_at(address(), Some("new@example.com"), now);
        assert!(matches!(blocked, Err(AuthError::Throttled { .. })));
        assert!(
            throttle
                .check_at(None, Some("new@example.com"), now)
                .is_ok()
        );
    }

    #[test]
    fn window_restarts_after_it_ends() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..MAX_FAILURES_PER_ADDRESS {
            throttle.record_failure_at(address(), None, now);
        }
        let later = now + WINDOW;
        throttle.record_failure_at(address(), None, later);
        assert!(throttle.check_at(address(), None, later).is_ok());
    }
}
