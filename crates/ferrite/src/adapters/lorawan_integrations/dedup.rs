//! Recognizes an uplink that a network server delivers twice: a webhook
//! retried after a timeout, or an MQTT message redelivered after a
//! reconnect.
//!
//! An uplink is identified by its DevEUI, FCnt and a hash of its
//! FRMPayload, so a device that restarts its frame counter and sends new
//! data is not taken for a repeat. Entries live for [`WINDOW`]. The table
//! contains at most [`MAX_ENTRIES`], and when it is full it drops expired
//! entries first, then the oldest ones. The table is in memory, so a repeat that arrives
//! after a restart of Ferrite is stored again.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How long an uplink is remembered. ChirpStack's HTTP integration does
/// not retry a failed request.
/// NOTE: a minute is an estimate meant to cover a webhook retried after a
/// timeout and an MQTT redelivery after a quick reconnect; no retry
/// schedule of The Things Stack was checked.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Uplinks remembered at most, about 100 bytes each.
pub const MAX_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct UplinkKey {
    dev_eui: String,
    f_cnt: u32,
    payload_hash: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    /// The first delivery is being appended to the ingest log.
    InFlight,
    /// The first delivery was stored at this instant.
    Stored(Instant),
}

/// Decision about one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A new uplink: store it, then call [`RecentUplinks::finish`].
    New,
    /// Already stored within the window: acknowledge without storing.
    Duplicate,
    /// Another delivery of the same uplink is being stored right now; the
    /// sender should retry, because that append may still fail.
    InFlight,
}

/// Uplinks seen recently, shared by the HTTP endpoints and the MQTT client.
#[derive(Debug, Default)]
pub struct RecentUplinks {
    entries: Mutex<HashMap<UplinkKey, Entry>>,
}

/// Identifies one uplink for [`RecentUplinks`].
#[derive(Debug, Clone)]
pub struct UplinkId(UplinkKey);

impl UplinkId {
    pub fn new(dev_eui: &str, f_cnt: u32, frm_payload: &[u8]) -> UplinkId {
        let mut hasher = DefaultHasher::new();
        frm_payload.hash(&mut hasher);
        UplinkId(UplinkKey {
            dev_eui: dev_eui.to_owned(),
            f_cnt,
            payload_hash: hasher.finish(),
        })
    }
}

impl RecentUplinks {
    /// Claims `id` for storing at `now`.
    pub fn claim(&self, id: &UplinkId, now: Instant) -> Claim {
        let mut entries = self.entries.lock();
        match entries.get(&id.0) {
            Some(Entry::InFlight) => return Claim::InFlight,
            Some(Entry::Stored(at)) if now.duration_since(*at) < WINDOW => {
                return Claim::Duplicate;
            }
            _ => {}
        }
        if entries.len() >= MAX_ENTRIES {
            evict(&mut entries, now);
        }
        entries.insert(id.0.clone(), Entry::InFlight);
        Claim::New
    }

    /// Records the outcome of a claimed delivery: a stored uplink is
    /// remembered, a failed one is forgotten so that a retry stores it.
    pub fn finish(&self, id: &UplinkId, stored: bool, now: Instant) {
        let mut entries = self.entries.lock();
        if stored {
            entries.insert(id.0.clone(), Entry::Stored(now));
        } else {
            entries.remove(&id.0);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// Drops expired entries and, if that frees less than a tenth of the
/// table, the oldest stored ones, so that a burst of new uplinks costs one
/// pass per tenth of the table instead of one per uplink.
fn evict(entries: &mut HashMap<UplinkKey, Entry>, now: Instant) {
    entries.retain(|_, entry| match entry {
        Entry::InFlight => true,
        Entry::Stored(at) => now.duration_since(*at) < WINDOW,
    });
    let target = MAX_ENTRIES - MAX_ENTRIES / 10;
    if entries.len() <= target {
        return;
    }
    let mut stored: Vec<(Instant, UplinkKey)> = entries
        .iter()
        .filter_map(|(key, entry)| match entry {
            Entry::Stored(at) => Some((*at, key.clone())),
            Entry::InFlight => None,
        })
        .collect();
    stored.sort_unstable_by_key(|(at, _)| *at);
    let excess = entries.len() - target;
    for (_, key) in stored.into_iter().take(excess) {
        entries.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_delivery_is_duplicate() {
        let recent = RecentUplinks::default();
        let id = UplinkId::new("0102030405060708", 7, &[1, 2]);
        let now = Instant::now();
        assert_eq!(recent.claim(&id, now), Claim::New);
        assert_eq!(recent.claim(&id, now), Claim::InFlight);
        recent.finish(&id, true, now);
        assert_eq!(
            recent.claim(&id, now + Duration::from_secs(1)),
            Claim::Duplicate
        );
    }

    #[test]
    fn delivery_after_window_is_new() {
        let recent = RecentUplinks::default();
        let id = UplinkId::new("0102030405060708", 7, &[1, 2]);
        let now = Instant::now();
        assert_eq!(recent.claim(&id, now), Claim::New);
        recent.finish(&id, true, now);
        assert_eq!(recent.claim(&id, now + WINDOW), Claim::New);
    }

    #[test]
    fn failed_append_is_forgotten() {
        let recent = RecentUplinks::default();
        let id = UplinkId::new("0102030405060708", 7, &[1, 2]);
        let now = Instant::now();
        assert_eq!(recent.claim(&id, now), Claim::New);
        recent.finish(&id, false, now);
        assert_eq!(recent.claim(&id, now), Claim::New);
    }

    #[test]
    fn other_payload_or_counter_is_new() {
        let recent = RecentUplinks::default();
        let now = Instant::now();
        let first = UplinkId::new("0102030405060708", 7, &[1, 2]);
        assert_eq!(recent.claim(&first, now), Claim::New);
        recent.finish(&first, true, now);
        for other in [
            UplinkId::new("0102030405060708", 7, &[1, 3]),
            UplinkId::new("0102030405060708", 8, &[1, 2]),
            UplinkId::new("0102030405060709", 7, &[1, 2]),
        ] {
            assert_eq!(recent.claim(&other, now), Claim::New);
        }
    }

    #[test]
    fn full_table_evicts_oldest() {
        let recent = RecentUplinks::default();
        let start = Instant::now();
        for f_cnt in 0..MAX_ENTRIES as u32 {
            let id = UplinkId::new("0102030405060708", f_cnt, &[]);
            assert_eq!(recent.claim(&id, start), Claim::New);
            recent.finish(&id, true, start + Duration::from_micros(f_cnt.into()));
        }
        let later = start + Duration::from_secs(1);
        let id = UplinkId::new("0102030405060708", u32::MAX, &[]);
        assert_eq!(recent.claim(&id, later), Claim::New);
        assert!(recent.len() <= MAX_ENTRIES - MAX_ENTRIES / 10 + 1);
        let newest = UplinkId::new("0102030405060708", MAX_ENTRIES as u32 - 1, &[]);
        assert_eq!(recent.claim(&newest, later), Claim::Duplicate);
        let oldest = UplinkId::new("0102030405060708", 0, &[]);
        assert_eq!(recent.claim(&oldest, later), Claim::New);
    }
}
