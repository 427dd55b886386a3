//! Duplicate detection (RFC 7252 section 4.5): the message IDs a peer used
//! within EXCHANGE_LIFETIME, with the message sent in reply, so that a
//! retransmitted request gets the same reply without being processed twice.
//!
//! The cache holds at most `coap.max_exchanges` entries over all peers.
//! When it is full the oldest entry is forgotten early and counted in
//! `ferrite_coap_exchanges_evicted_total`; a duplicate of a forgotten
//! request is processed again. A request that fails before its device is
//! authenticated keeps no entry once answered ([`ExchangeCache::forget`]),
//! because processing its duplicate again changes nothing. So
//! unauthenticated traffic holds entries only while it is processed and
//! cannot push out the entries of devices. GET requests keep no entry
//! either, so the replies kept are those of POST requests, which are
//! small (a code, a few options and at most a diagnostic).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::events;

/// EXCHANGE_LIFETIME with the default transmission parameters of RFC 7252
/// section 4.8.2: 247 seconds.
pub const EXCHANGE_LIFETIME: Duration = Duration::from_secs(247);

/// A peer's message ID.
pub type ExchangeKey = (SocketAddr, u16);

/// The state of a message ID seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExchangeState {
    /// The request is still being processed; a duplicate gets no reply yet
    /// and the client retransmits.
    InProgress,
    /// The message sent in reply (a piggybacked response, an empty ACK or
    /// a Non-confirmable response), sent again for a duplicate.
    Replied(Bytes),
}

/// Result of [`ExchangeCache::begin`].
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    New,
    Duplicate(ExchangeState),
}

#[derive(Debug)]
struct Exchange {
    state: ExchangeState,
    expires: Instant,
}

#[derive(Debug)]
pub struct ExchangeCache {
    max_entries: usize,
    entries: HashMap<ExchangeKey, Exchange>,
    /// Keys in insertion order, which is also expiry order. A key may
    /// appear twice when it was reused after expiry; the stale copy is
    /// skipped because its expiry differs.
    order: VecDeque<(ExchangeKey, Instant)>,
}

impl ExchangeCache {
    pub fn new(max_entries: usize) -> ExchangeCache {
        ExchangeCache {
            max_entries,
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `key` as in progress, or returns what is known about it.
    pub fn begin(&mut self, key: ExchangeKey, now: Instant) -> Seen {
        self.remove_expired(now);
        if let Some(exchange) = self.entries.get(&key) {
            return Seen::Duplicate(exchange.state.clone());
        }
        while self.entries.len() >= self.max_entries {
            let Some((old, expires)) = self.order.pop_front() else {
                break;
            };
            if self
                .entries
                .get(&old)
                .is_some_and(|entry| entry.expires == expires)
            {
                self.entries.remove(&old);
                events::exchange_evicted();
            }
        }
        let expires = now + EXCHANGE_LIFETIME;
        self.entries.insert(
            key,
            Exchange {
                state: ExchangeState::InProgress,
                expires,
            },
        );
        self.order.push_back((key, expires));
        Seen::New
    }

    /// Stores the message sent in reply to `key`.
    pub fn finish(&mut self, key: ExchangeKey, reply: Bytes) {
        if let Some(exchange) = self.entries.get_mut(&key) {
            exchange.state = ExchangeState::Replied(reply);
        }
    }

    /// Removes `key`, so that a duplicate is processed again. Its copy in
    /// the expiry order is skipped later, like that of an evicted key.
    pub fn forget(&mut self, key: ExchangeKey) {
        self.entries.remove(&key);
    }

    fn remove_expired(&mut self, now: Instant) {
        while let Some((key, expires)) = self.order.front().copied() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            if self
                .entries
                .get(&key)
                .is_some_and(|entry| entry.expires == expires)
            {
                self.entries.remove(&key);
            }
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(message_id: u16) -> ExchangeKey {
        ("127.0.0.1:5000".parse().unwrap(), message_id)
    }

    #[test]
    fn duplicate_returns_the_stored_reply() {
        let mut cache = ExchangeCache::new(10);
        let now = Instant::now();
        assert_eq!(cache.begin(key(1), now), Seen::New);
        assert_eq!(
            cache.begin(key(1), now),
            Seen::Duplicate(ExchangeState::InProgress)
        );
        cache.finish(key(1), Bytes::from_static(b"ack"));
        assert_eq!(
            cache.begin(key(1), now),
            Seen::Duplicate(ExchangeState::Replied(Bytes::from_static(b"ack")))
        );
    }

    #[test]
    fn entries_expire_after_exchange_lifetime() {
        let mut cache = ExchangeCache::new(10);
        let now = Instant::now();
        cache.begin(key(1), now);
        let later = now + EXCHANGE_LIFETIME + Duration::from_secs(1);
        assert_eq!(cache.begin(key(1), later), Seen::New);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn forgotten_key_is_new_again() {
        let mut cache = ExchangeCache::new(10);
        let now = Instant::now();
        cache.begin(key(1), now);
        cache.forget(key(1));
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.begin(key(1), now), Seen::New);
    }

    #[test]
    fn full_cache_forgets_the_oldest() {
        let mut cache = ExchangeCache::new(2);
        let now = Instant::now();
        cache.begin(key(1), now);
        cache.begin(key(2), now);
        cache.begin(key(3), now);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.begin(key(1), now), Seen::New, "key 1 was evicted");
        assert!(matches!(cache.begin(key(3), now), Seen::Duplicate(_)));
    }
}
