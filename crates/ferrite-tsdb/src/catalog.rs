//! Series ids and the in-memory name index (tenant → device → key → id).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::SeriesKey;

/// Id of a series, assigned by the store and never reused. 0 is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesId(pub(crate) u64);

/// Multiplicative hasher for maps keyed by [`SeriesId`]. Ids are assigned by
/// the store, not by clients, so hash flooding is not a concern, and the
/// write path does one such lookup per point.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const GOLDEN_RATIO_64: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(GOLDEN_RATIO_64);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0 ^ value).wrapping_mul(GOLDEN_RATIO_64);
    }
}

pub(crate) type IdMap<V> = HashMap<SeriesId, V, BuildHasherDefault<IdHasher>>;

/// Estimated heap bytes of a hash table with room for `capacity` entries:
/// slots at the table's 7/8 load factor, each with one control byte.
pub(crate) fn table_bytes<K, V>(capacity: usize) -> usize {
    capacity * 8 / 7 * (size_of::<K>() + size_of::<V>() + 1)
}

/// Estimated bytes of one heap allocation of `len` bytes, modelled on glibc
/// malloc, which adds an 8-byte header, rounds to 16 and allocates at least
/// 32. Other allocators differ by a few bytes per allocation.
pub(crate) fn heap_bytes(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len + 8).next_multiple_of(16).max(32)
    }
}

/// Keys of one device and their series ids.
pub(crate) type DeviceSeries = HashMap<String, SeriesId>;

/// Name index of all live series. Nested maps let the write path look up
/// the tenant and device once per call and only the key per point, all by
/// `&str` without building a `SeriesKey`.
#[derive(Default)]
pub(crate) struct Catalog {
    tenants: HashMap<String, HashMap<String, DeviceSeries>>,
    /// Tenant number per tenant name, assigned in order of first use and
    /// never reused while the store is open.
    tenant_numbers: HashMap<String, u32>,
    tenant_names: Vec<String>,
    /// Tenant number of every series by id ([`NO_TENANT`] for deleted or
    /// unknown ids): 4 bytes per series, so that retention finds the
    /// tenant of an id without a map per pass.
    tenant_of: Vec<u32>,
    /// Estimated heap bytes of the key names, kept as keys are added and
    /// removed so that [`Catalog::estimated_bytes`] need not visit them.
    key_bytes: usize,
}

/// Tenant number of ids that belong to no live series.
pub(crate) const NO_TENANT: u32 = u32::MAX;

/// Tenant numbers stay below this, so that retention can number the groups
/// of devices with their own retention above them.
pub(crate) const MAX_TENANTS: u32 = 1 << 31;

impl Catalog {
    pub(crate) fn get(&self, series: &SeriesKey) -> Option<SeriesId> {
        self.device(&series.tenant, &series.device)?
            .get(&series.key)
            .copied()
    }

    pub(crate) fn device(&self, tenant: &str, device: &str) -> Option<&DeviceSeries> {
        self.tenants.get(tenant)?.get(device)
    }

    /// Returns the key map of a device, creating empty maps when needed.
    pub(crate) fn device_entry(&mut self, tenant: &str, device: &str) -> &mut DeviceSeries {
        if !self.tenants.contains_key(tenant) {
            self.tenants.insert(tenant.to_owned(), HashMap::new());
        }
        let devices = self.tenants.get_mut(tenant).expect("tenant inserted above");
        if !devices.contains_key(device) {
            devices.insert(device.to_owned(), HashMap::new());
        }
        devices.get_mut(device).expect("device inserted above")
    }

    /// Adds a series. Returns the id already registered under that name, if
    /// any, and leaves it in place.
    pub(crate) fn insert(&mut self, series: &SeriesKey, id: SeriesId) -> Option<SeriesId> {
        let keys = self.device_entry(&series.tenant, &series.device);
        if let Some(existing) = keys.get(&series.key) {
            return Some(*existing);
        }
        keys.insert(series.key.clone(), id);
        self.key_bytes += heap_bytes(series.key.len());
        let tenant = self.tenant_number(&series.tenant);
        self.set_tenant(id, tenant);
        None
    }

    /// Returns the number of a tenant, assigning the next one to a new name.
    pub(crate) fn tenant_number(&mut self, tenant: &str) -> u32 {
        if let Some(number) = self.tenant_numbers.get(tenant) {
            return *number;
        }
        let number = u32::try_from(self.tenant_names.len())
            .ok()
            .filter(|n| *n < MAX_TENANTS)
            .expect("fewer than 2^31 tenants");
        self.tenant_numbers.insert(tenant.to_owned(), number);
        self.tenant_names.push(tenant.to_owned());
        number
    }

    /// Records the tenant of a series added by the write path.
    pub(crate) fn set_tenant(&mut self, id: SeriesId, tenant: u32) {
        let index = usize::try_from(id.0).expect("series ids fit in memory");
        if self.tenant_of.len() <= index {
            self.tenant_of.resize(index + 1, NO_TENANT);
        }
        self.tenant_of[index] = tenant;
    }

    /// Tenant number of every series id, see [`Catalog::tenant_of`].
    pub(crate) fn tenants_by_id(&self) -> &[u32] {
        &self.tenant_of
    }

    /// Counts the heap bytes of key names that the write path added to a
    /// device's map directly.
    pub(crate) fn note_added_keys(&mut self, bytes: usize) {
        self.key_bytes += bytes;
    }

    /// Estimated heap bytes of the name index and the tenant table. Visits
    /// every device, so it is meant for once per flush, not per write.
    pub(crate) fn estimated_bytes(&self) -> usize {
        let mut bytes = self.tenant_of.capacity() * size_of::<u32>()
            + table_bytes::<String, u32>(self.tenant_numbers.capacity())
            + self.tenant_names.capacity() * size_of::<String>();
        for (tenant, devices) in &self.tenants {
            bytes += 2 * heap_bytes(tenant.len())
                + table_bytes::<String, DeviceSeries>(devices.capacity());
            for (device, keys) in devices {
                bytes +=
                    heap_bytes(device.len()) + table_bytes::<String, SeriesId>(keys.capacity());
            }
        }
        bytes + self.key_bytes
    }

    /// Names of the tenants in number order.
    pub(crate) fn tenant_names(&self) -> &[String] {
        &self.tenant_names
    }

    /// Lists every live series id, grouped by tenant name.
    pub(crate) fn series_by_tenant(
        &self,
    ) -> impl Iterator<Item = (&str, impl Iterator<Item = SeriesId> + '_)> {
        self.tenants.iter().map(|(tenant, devices)| {
            (
                tenant.as_str(),
                devices.values().flat_map(|keys| keys.values().copied()),
            )
        })
    }

    pub(crate) fn remove_device(&mut self, tenant: &str, device: &str) -> Option<DeviceSeries> {
        let devices = self.tenants.get_mut(tenant)?;
        let removed = devices.remove(device);
        if devices.is_empty() {
            self.tenants.remove(tenant);
        }
        let removed_key_bytes: usize = removed
            .iter()
            .flat_map(|keys| keys.keys())
            .map(|key| heap_bytes(key.len()))
            .sum();
        self.key_bytes = self.key_bytes.saturating_sub(removed_key_bytes);
        for id in removed.iter().flat_map(|keys| keys.values()) {
            if let Some(tenant) = usize::try_from(id.0)
                .ok()
                .and_then(|index| self.tenant_of.get_mut(index))
            {
                *tenant = NO_TENANT;
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_follows_added_and_removed_keys() {
        let mut catalog = Catalog::default();
        let empty = catalog.estimated_bytes();
        for (n, key) in ["a-rather-long-key-name", "velocity"].iter().enumerate() {
            let series = SeriesKey::new("t", "d", *key);
            assert_eq!(catalog.insert(&series, SeriesId(n as u64 + 1)), None);
        }
        let with_keys = catalog.estimated_bytes();
        assert!(with_keys >= empty + heap_bytes(22) + heap_bytes(8));

        catalog.remove_device("t", "d");
        assert_eq!(catalog.key_bytes, 0);
        assert!(catalog.estimated_bytes() < with_keys);
        assert_eq!(catalog.tenants_by_id()[1], NO_TENANT);
    }
}
