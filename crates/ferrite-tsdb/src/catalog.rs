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

/// Keys of one device and their series ids.
pub(crate) type DeviceSeries = HashMap<String, SeriesId>;

/// Name index of all live series. Nested maps let the write path look up
/// the tenant and device once per call and only the key per point, all by
/// `&str` without building a `SeriesKey`.
#[derive(Default)]
pub(crate) struct Catalog {
    tenants: HashMap<String, HashMap<String, DeviceSeries>>,
}

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
        None
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
        removed
    }
}
