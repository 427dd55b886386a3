//! Open connections per source address.
//!
//! A counter keeps one entry per address with at least one open
//! connection; the entry goes when its last [`AddressSlot`] is dropped, so
//! the map never contains more entries than there are open connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Open connections by address, shared by a counter and its slots.
type OpenCounts = Arc<Mutex<HashMap<IpAddr, u32>>>;

/// Counts open connections per address against one maximum.
#[derive(Clone)]
pub struct ConnectionCounter {
    /// `None` when the limit is off (0).
    open: Option<OpenCounts>,
    max_per_address: u32,
}

impl ConnectionCounter {
    pub fn new(max_per_address: u32) -> Self {
        Self {
            open: (max_per_address > 0).then(Arc::default),
            max_per_address,
        }
    }

    /// Counts one more connection of `address`, or returns `None` when it
    /// already has the maximum open. Without a limit every call succeeds.
    pub fn try_acquire(&self, address: IpAddr) -> Option<AddressSlot> {
        let Some(open) = &self.open else {
            return Some(AddressSlot { held: None });
        };
        let mut counts = open.lock();
        let count = counts.entry(address).or_insert(0);
        if *count >= self.max_per_address {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            held: Some((open.clone(), address)),
        })
    }

    /// Returns the connections open from `address`.
    #[cfg(test)]
    pub fn open(&self, address: IpAddr) -> u32 {
        self.open
            .as_ref()
            .and_then(|open| open.lock().get(&address).copied())
            .unwrap_or(0)
    }
}

/// One counted connection; dropping it gives the place back.
pub struct AddressSlot {
    held: Option<(OpenCounts, IpAddr)>,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let Some((open, address)) = self.held.take() else {
            return;
        };
        let mut counts = open.lock();
        if let Some(count) = counts.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_address() {
        let counter = ConnectionCounter::new(2);
        let first: IpAddr = "192.0.2.1".parse().unwrap();
        let second: IpAddr = "192.0.2.2".parse().unwrap();

        let a = counter.try_acquire(first).expect("first slot");
        let b = counter.try_acquire(first).expect("second slot");
        assert!(counter.try_acquire(first).is_none());
        assert!(counter.try_acquire(second).is_some());

        drop(a);
        assert_eq!(counter.open(first), 1);
        let c = counter.try_acquire(first).expect("a slot was given back");
        drop((b, c));
        assert_eq!(counter.open(first), 0);
        assert!(counter.open.as_ref().unwrap().lock().is_empty());
    }
}
