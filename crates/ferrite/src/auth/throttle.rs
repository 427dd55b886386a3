//! Throttle and lockout against password and API key guessing.
//!
//! Failed checks are counted under three keys, checked in this order:
//!
//! 1. The pair of source address and account (a user's email). After
//!    [`PAIR_THRESHOLD`] failures in a row the pair is locked for
//!    [`PAIR_BASE_LOCKOUT`], and every further failure after a lock ends
//!    doubles the time, up to [`PAIR_MAX_LOCKOUT`]. A successful login
//!    resets the pair. This stops one attacker guessing one account.
//! 2. The source address alone: [`MAX_FAILURES_PER_ADDRESS`] failures in a
//!    window of [`ADDRESS_WINDOW`] block the address for the rest of the
//!    window, for every account and for API keys.
//! 3. The account alone: [`ACCOUNT_THRESHOLD`] failures within
//!    [`ACCOUNT_WINDOW`], from any addresses, lock the account for
//!    [`ACCOUNT_BASE_LOCKOUT`], doubling with each lockout up to
//!    [`ACCOUNT_MAX_LOCKOUT`]. This stops guesses spread over many
//!    addresses.
//!
//! The pair locks first and its lock grows, so one address alone adds at
//! most 9 failures to an account in [`ACCOUNT_WINDOW`]: 5 at once, then one
//! after each lock of 30 s, 60 s, 120 s and 240 s. That stays below
//! [`ACCOUNT_THRESHOLD`], so one address cannot lock an account for
//! everyone. Many addresses together can, for up to [`ACCOUNT_MAX_LOCKOUT`]
//! at a time; that is the price of stopping distributed guessing.
//!
//! Locked attempts are rejected without a password hash, so they cost
//! nothing and learn nothing, and are counted in
//! `ferrite_auth_attempts_throttled_total`. The state lives in memory: a
//! restart clears it, and each process counts on its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::AuthError;

/// Failures in a row of one address for one account before a lock.
pub const PAIR_THRESHOLD: u32 = 5;
/// First lock of an address for an account.
pub const PAIR_BASE_LOCKOUT: Duration = Duration::from_secs(30);
/// Maximum lock of an address for an account.
pub const PAIR_MAX_LOCKOUT: Duration = Duration::from_secs(15 * 60);
/// Counting window of the failures of one source address.
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(60);
/// Failed checks from one source address per window, over all accounts.
pub const MAX_FAILURES_PER_ADDRESS: u32 = 20;
/// Counting window of the failures of one account.
pub const ACCOUNT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures of one account within the window, from any address, before
/// the account is locked.
pub const ACCOUNT_THRESHOLD: u32 = 20;
/// First lock of an account.
pub const ACCOUNT_BASE_LOCKOUT: Duration = Duration::from_secs(60);
/// Maximum lock of an account.
pub const ACCOUNT_MAX_LOCKOUT: Duration = Duration::from_secs(60 * 60);
/// Entries idle this long are forgotten, and with them the growth of
/// their lock time.
const IDLE_FORGET: Duration = Duration::from_secs(6 * 60 * 60);
/// Keys tracked at a time. When full, idle entries are removed, and
/// failures of new keys go uncounted until there is room.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Pair(IpAddr, String),
    Address(IpAddr),
    /// A user's email, in lower case.
    Account(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_started: Instant,
    failures: u32,
    locked_until: Option<Instant>,
    lockouts: u32,
    last_failure: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            window_started: now,
            failures: 0,
            locked_until: None,
            lockouts: 0,
            last_failure: now,
        }
    }

    fn retry_after(&self, key: &Key, now: Instant) -> Option<Duration> {
        if let Key::Address(_) = key {
            let ends = self.window_started + ADDRESS_WINDOW;
            return (self.failures >= MAX_FAILURES_PER_ADDRESS && ends > now).then(|| ends - now);
        }
        let until = self.locked_until?;
        (until > now).then(|| until - now)
    }

    fn record_failure(&mut self, key: &Key, now: Instant) {
        self.last_failure = now;
        match key {
            Key::Address(_) => {
                if self.window_started + ADDRESS_WINDOW <= now {
                    self.window_started = now;
                    self.failures = 0;
                }
                self.failures += 1;
            }
            Key::Pair(..) => {
                self.failures += 1;
                if self.failures >= PAIR_THRESHOLD {
                    self.lock(now, PAIR_BASE_LOCKOUT, PAIR_MAX_LOCKOUT);
                }
            }
            Key::Account(_) => {
                if self.window_started + ACCOUNT_WINDOW <= now {
                    self.window_started = now;
                    self.failures = 0;
                }
                self.failures += 1;
                if self.failures >= ACCOUNT_THRESHOLD {
                    self.lock(now, ACCOUNT_BASE_LOCKOUT, ACCOUNT_MAX_LOCKOUT);
                    self.window_started = now;
                    self.failures = 0;
                }
            }
        }
    }

    /// Locks for `base` doubled once per earlier lock, at most `max`.
    fn lock(&mut self, now: Instant, base: Duration, max: Duration) {
        let doubling = self.lockouts.min(16);
        let duration = base.saturating_mul(1 << doubling).min(max);
        self.lockouts += 1;
        self.locked_until = Some(now + duration);
    }
}

/// Counts of recent failed checks; see the module documentation.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    entries: Mutex<HashMap<Key, Entry>>,
}

fn keys(peer: Option<IpAddr>, account: Option<&str>) -> Vec<Key> {
    let account = account.map(str::to_lowercase);
    let mut keys = Vec::with_capacity(3);
    if let (Some(peer), Some(account)) = (peer, &account) {
        keys.push(Key::Pair(peer, account.clone()));
    }
    if let Some(peer) = peer {
        keys.push(Key::Address(peer));
    }
    if let Some(account) = account {
        keys.push(Key::Account(account));
    }
    keys
}

impl LoginThrottle {
    /// Rejects an attempt while its address, account or pair of both is
    /// locked.
    pub fn check(&self, peer: Option<IpAddr>, account: Option<&str>) -> Result<(), AuthError> {
        self.check_at(peer, account, Instant::now())
    }

    /// Counts a failed check for the address, the account and the pair.
    pub fn record_failure(&self, peer: Option<IpAddr>, account: Option<&str>) {
        self.record_failure_at(peer, account, Instant::now());
    }

    /// Forgets the failures of the pair after a successful login, so that
    /// a user who mistyped a few times starts afresh.
    pub fn record_success(&self, peer: Option<IpAddr>, account: &str) {
        if let Some(peer) = peer {
            self.entries
                .lock()
                .remove(&Key::Pair(peer, account.to_lowercase()));
        }
    }

    fn check_at(
        &self,
        peer: Option<IpAddr>,
        account: Option<&str>,
        now: Instant,
    ) -> Result<(), AuthError> {
        let entries = self.entries.lock();
        let retry_after = keys(peer, account)
            .iter()
            .filter_map(|key| entries.get(key)?.retry_after(key, now))
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
        let mut entries = self.entries.lock();
        if entries.len() >= MAX_KEYS {
            entries.retain(|_, entry| {
                now.duration_since(entry.last_failure) < IDLE_FORGET
                    && entry.locked_until.is_some_and(|until| until > now)
            });
        }
        for key in keys(peer, account) {
            if entries.len() >= MAX_KEYS && !entries.contains_key(&key) {
                continue;
            }
            let entry = entries
                .entry(key.clone())
                .or_insert_with(|| Entry::new(now));
            if now.duration_since(entry.last_failure) >= IDLE_FORGET {
                *entry = Entry::new(now);
            }
            entry.record_failure(&key, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([192, 0, 2, last]))
    }

    fn retry_after(result: Result<(), AuthError>) -> Option<Duration> {
        match result {
            Ok(()) => None,
            Err(AuthError::Throttled { retry_after }) => Some(retry_after),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn pair_locks_after_threshold_with_growing_time() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..PAIR_THRESHOLD {
            assert!(
                throttle
                    .check_at(address(1), Some("a@example.com"), now)
                    .is_ok()
            );
            throttle.record_failure_at(address(1), Some("a@example.com"), now);
        }
        let first = retry_after(throttle.check_at(address(1), Some("A@example.com"), now));
        assert_eq!(first, Some(PAIR_BASE_LOCKOUT));

        // Another address still gets in, and so does the same address for
        // another account.
        assert!(
            throttle
                .check_at(address(2), Some("a@example.com"), now)
                .is_ok()
        );
        assert!(
            throttle
                .check_at(address(1), Some("b@example.com"), now)
                .is_ok()
        );

        let later = now + PAIR_BASE_LOCKOUT;
        assert!(
            throttle
                .check_at(address(1), Some("a@example.com"), later)
                .is_ok()
        );
        throttle.record_failure_at(address(1), Some("a@example.com"), later);
        let second = retry_after(throttle.check_at(address(1), Some("a@example.com"), later));
        assert_eq!(second, Some(PAIR_BASE_LOCKOUT * 2));
    }

    #[test]
    fn success_resets_the_pair() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..PAIR_THRESHOLD - 1 {
            throttle.record_failure_at(address(1), Some("a@example.com"), now);
        }
        throttle.record_success(address(1), "a@example.com");
        throttle.record_failure_at(address(1), Some("a@example.com"), now);
        assert!(
            throttle
                .check_at(address(1), Some("a@example.com"), now)
                .is_ok()
        );
    }

    #[test]
    fn one_address_cannot_lock_an_account_for_everyone() {
        let throttle = LoginThrottle::default();
        let start = Instant::now();
        let mut now = start;
        // The attacker retries as soon as each lock ends, for an hour.
        while now < start + Duration::from_secs(3600) {
            match retry_after(throttle.check_at(address(1), Some("a@example.com"), now)) {
                Some(wait) => now += wait,
                None => throttle.record_failure_at(address(1), Some("a@example.com"), now),
            }
        }
        assert!(
            throttle
                .check_at(address(2), Some("a@example.com"), now)
                .is_ok()
        );
        assert!(throttle.check_at(None, Some("a@example.com"), now).is_ok());
    }

    #[test]
    fn many_addresses_lock_the_account() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for index in 0..ACCOUNT_THRESHOLD {
            throttle.record_failure_at(address(index as u8), Some("a@example.com"), now);
        }
        let locked = retry_after(throttle.check_at(address(250), Some("a@example.com"), now));
        assert_eq!(locked, Some(ACCOUNT_BASE_LOCKOUT));
        assert!(
            throttle
                .check_at(address(250), Some("b@example.com"), now)
                .is_ok()
        );
    }

    #[test]
    fn address_is_blocked_across_accounts() {
        let throttle = LoginThrottle::default();
        let now = Instant::now();
        for index in 0..MAX_FAILURES_PER_ADDRESS {
            throttle.record_failure_at(address(7), Some(&format!("{index}@example.com")), now);
        }

        let blocked = throttle.check_at(address(7), Some("new@example.com"), now);
        assert!(matches!(blocked, Err(AuthError::Throttled { .. })));
        assert!(
            throttle
                .check_at(None, Some("new@example.com"), now)
                .is_ok()
        );
        assert!(
            throttle
                .check_at(address(7), None, now + ADDRESS_WINDOW)
                .is_ok()
        );
    }
}
