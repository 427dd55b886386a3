//! The time-series store seam.
//!
//! [`TimeSeriesStore`] is what the pipeline writes and the API reads;
//! [`EmbeddedStore`] implements it on `ferrite_tsdb` in `DATA_DIR/tsdb`.
//! Series are addressed by tenant id, device id and key.

pub mod cipher;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrite_core::{TimestampNs, Value};
pub use ferrite_tsdb::{Bucket, RangePage};
use ferrite_tsdb::{SeriesKey, Store, StoreOptions};

use crate::ids::{DeviceId, TenantId};

pub type StoreError = ferrite_tsdb::StoreError;

/// One series: a key of a device of a tenant.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub tenant: TenantId,
    pub device: DeviceId,
    pub key: &'a str,
}

impl<'a> Series<'a> {
    pub fn new(tenant: TenantId, device: DeviceId, key: &'a str) -> Self {
        Self {
            tenant,
            device,
            key,
        }
    }

    fn to_key(self) -> SeriesKey {
        SeriesKey {
            tenant: self.tenant.to_string(),
            device: self.device.to_string(),
            key: self.key.to_owned(),
        }
    }
}

/// Storage of telemetry points. Methods may block on disk; async callers use
/// `spawn_blocking`.
pub trait TimeSeriesStore: Send + Sync + 'static {
    /// Adds points of one device (not yet durable; see `flush`).
    fn write(
        &self,
        tenant: TenantId,
        device: DeviceId,
        points: &[(&str, TimestampNs, Value)],
    ) -> Result<(), StoreError>;
    /// Memory held by points that are not yet flushed, in bytes.
    fn pending_bytes(&self) -> usize;
    /// `pending_bytes` at which to flush; may shrink as series are added.
    fn flush_threshold(&self) -> usize;
    /// Estimated memory in bytes by part, for metrics, and under `series`
    /// the number of series.
    fn memory_usage(&self) -> Vec<(&'static str, usize)> {
        Vec::new()
    }
    /// Sealed blocks skipped because they did not open, and series whose
    /// points were dropped because their tenant had no data key, both
    /// counted since open (see `storage.encrypt`).
    fn sealing_failures(&self) -> (u64, u64) {
        (0, 0)
    }
    /// Makes every written point durable and records `marker` with them.
    fn flush(&self, marker: u64) -> Result<(), StoreError>;
    /// The marker of the last completed flush.
    fn durable_marker(&self) -> u64;
    fn latest(&self, tenant: TenantId, device: DeviceId) -> Vec<(String, TimestampNs, Value)>;
    fn range(
        &self,
        series: Series<'_>,
        start: TimestampNs,
        end: TimestampNs,
        after: Option<TimestampNs>,
        limit: usize,
    ) -> Result<RangePage, StoreError>;
    /// Aggregates into caller-defined `[start, end)` buckets, ascending and
    /// not overlapping.
    fn aggregate_buckets(
        &self,
        series: Series<'_>,
        bounds: &[(TimestampNs, TimestampNs)],
    ) -> Result<Vec<Bucket>, StoreError>;
    /// Rollup interval (ns) that serves `aggregate_buckets` for these
    /// bounds, `None` for raw points.
    fn rollup_tier_for(&self, bounds: &[(TimestampNs, TimestampNs)]) -> Option<i64>;
    /// Intervals of the rollup tiers in nanoseconds.
    fn rollup_intervals(&self) -> Vec<i64>;
    /// Merges the stored data into its most compact form now.
    fn compact(&self) -> Result<(), StoreError>;
    /// Number of files and bytes on disk.
    fn disk_usage(&self) -> (usize, u64);
    /// Replaces the raw-data retention of single devices, such as the one
    /// their device profile sets. A listed device keeps its raw points for
    /// the given duration or its tenant's retention, whichever is shorter,
    /// and a device listed twice gets the shorter duration. Devices not
    /// listed follow their tenant again. Queries apply it at once, and
    /// maintenance removes expired points from disk as their files expire or
    /// are compacted. When a device's retention gets longer, points already
    /// past its old cutoff stay expired. The default does nothing, for
    /// stores that never expire data.
    fn set_device_retention(
        &self,
        devices: Vec<((TenantId, DeviceId), Duration)>,
    ) -> Result<(), StoreError> {
        let _ = devices;
        Ok(())
    }
}

/// Converts a duration to nanoseconds, saturating at `i64::MAX`.
fn duration_ns(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The embedded default: `ferrite_tsdb` in the data directory.
pub struct EmbeddedStore {
    store: Store,
    /// Raw retention from the configuration, which device entries are
    /// merged into.
    #[allow(dead_code)]
    configured_retention: ferrite_tsdb::Retention,
}

impl EmbeddedStore {
    /// Opens the store without a cipher: sealed blocks are skipped.
    pub fn open(dir: &Path, config: &crate::config::StorageConfig) -> Result<Self, StoreError> {
        Self::open_with_cipher(dir, config, None)
    }

    /// Opens the store with `cipher` for reading sealed blocks, which also
    /// seals new blocks when `storage.encrypt` is set.
    pub fn open_with_cipher(
        dir: &Path,
        config: &crate::config::StorageConfig,
        cipher: Option<Arc<dyn ferrite_tsdb::BlockCipher>>,
    ) -> Result<Self, StoreError> {
        let nanos = duration_ns;
        let options = StoreOptions {
            head_budget_bytes: config.head_budget_bytes,
            memory_budget_bytes: Some(config.memory_budget_bytes),
            partition_ns: nanos(config.partition).max(1),
            cold_after: config.cold_after,
            retention: ferrite_tsdb::Retention {
                default: config.retention.map(nanos),
                tenants: config
                    .tenant_retention
                    .iter()
                    .map(|(tenant, setting)| (tenant.clone(), setting.0.map(nanos)))
                    .collect(),
                devices: Default::default(),
            },
            rollup_intervals: config.rollups.iter().map(|d| nanos(*d)).collect(),
            rollup_retention: config
                .rollups
                .iter()
                .map(|interval| {
                    let name = humantime::format_duration(*interval).to_string();
                    let keep = config
                        .rollup_retention
                        .iter()
                        .find(|(key, _)| {
                            humantime::parse_duration(key).ok() == Some(*interval) || **key == name
                        })
                        .and_then(|(_, setting)| setting.0);
                    ferrite_tsdb::Retention {
                        default: keep.map(nanos),
                        ..Default::default()
                    }
                })
                .collect(),
            seal_writes: config.encrypt,
            cipher,
            ..StoreOptions::default()
        };
        let configured_retention = options.retention.clone();
        Ok(Self {
            store: Store::open(dir, options)?,
            configured_retention,
        })
    }
}

impl TimeSeriesStore for EmbeddedStore {
    fn write(
        &self,
        tenant: TenantId,
        device: DeviceId,
        points: &[(&str, TimestampNs, Value)],
    ) -> Result<(), StoreError> {
        self.store
            .write(&tenant.to_string(), &device.to_string(), points)
    }

    fn pending_bytes(&self) -> usize {
        self.store.head_bytes()
    }

    fn flush_threshold(&self) -> usize {
        self.store.head_budget()
    }

    fn memory_usage(&self) -> Vec<(&'static str, usize)> {
        let usage = self.store.memory_usage();
        vec![
            ("series", usage.series),
            ("names", usage.names),
            ("latest", usage.latest),
            ("open_rows", usage.open_rows),
            ("segments", usage.segments),
            ("head", usage.head),
            ("frozen_head", usage.frozen_head),
        ]
    }

    fn sealing_failures(&self) -> (u64, u64) {
        (
            self.store.unreadable_blocks(),
            self.store.unsealable_series(),
        )
    }

    fn flush(&self, marker: u64) -> Result<(), StoreError> {
        self.store.flush(marker)
    }

    fn durable_marker(&self) -> u64 {
        self.store.durable_marker()
    }

    fn latest(&self, tenant: TenantId, device: DeviceId) -> Vec<(String, TimestampNs, Value)> {
        self.store.latest(&tenant.to_string(), &device.to_string())
    }

    fn range(
        &self,
        series: Series<'_>,
        start: TimestampNs,
        end: TimestampNs,
        after: Option<TimestampNs>,
        limit: usize,
    ) -> Result<RangePage, StoreError> {
        self.store.range(&series.to_key(), start, end, after, limit)
    }

    fn aggregate_buckets(
        &self,
        series: Series<'_>,
        bounds: &[(TimestampNs, TimestampNs)],
    ) -> Result<Vec<Bucket>, StoreError> {
        self.store.aggregate_buckets(&series.to_key(), bounds)
    }

    fn rollup_tier_for(&self, bounds: &[(TimestampNs, TimestampNs)]) -> Option<i64> {
        self.store.rollup_tier_for(bounds)
    }

    fn rollup_intervals(&self) -> Vec<i64> {
        self.store.rollup_intervals().to_vec()
    }

    fn compact(&self) -> Result<(), StoreError> {
        self.store.compact()
    }

    fn disk_usage(&self) -> (usize, u64) {
        self.store.disk_usage()
    }

    fn set_device_retention(
        &self,
        devices: Vec<((TenantId, DeviceId), Duration)>,
    ) -> Result<(), StoreError> {
        let mut retention = self.configured_retention.clone();
        for ((tenant, device), keep) in devices {
            let tenant = tenant.to_string();
            let device = device.to_string();
            // The shorter retention wins, as in the ingest check of points
            // against a device profile.
            let mut keep = duration_ns(keep);
            if let Some(tenant_keep) = retention.of(&tenant) {
                keep = keep.min(tenant_keep);
            }
            let listed = retention
                .devices
                .get(&tenant)
                .and_then(|devices| devices.get(&device))
                .copied()
                .flatten();
            if let Some(listed) = listed {
                keep = keep.min(listed);
            }
            retention.set_device(tenant, device, Some(keep));
        }
        self.store.set_retention(retention)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RetentionSetting, StorageConfig};

    const HOUR: Duration = Duration::from_secs(3600);

    fn now_ns() -> TimestampNs {
        duration_ns(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap(),
        )
    }

    fn stored(store: &EmbeddedStore, tenant: TenantId, device: DeviceId) -> usize {
        let series = Series::new(tenant, device, "v");
        let page = store
            .range(series, TimestampNs::MIN, TimestampNs::MAX, None, 100)
            .unwrap();
        page.points.len()
    }

    #[test]
    fn device_retention_is_capped_by_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = TenantId::new_random();
        let mut config = StorageConfig::default();
        config
            .tenant_retention
            .insert(tenant.to_string(), RetentionSetting(Some(3 * HOUR)));
        let store = EmbeddedStore::open(dir.path(), &config).unwrap();

        let short = DeviceId::new_random();
        let long = DeviceId::new_random();
        let other = DeviceId::new_random();
        let two_hours_ago = now_ns() - duration_ns(2 * HOUR);
        for device in [short, long, other] {
            store
                .write(tenant, device, &[("v", two_hours_ago, Value::Int(1))])
                .unwrap();
        }
        store
            .set_device_retention(vec![((tenant, short), HOUR), ((tenant, long), 48 * HOUR)])
            .unwrap();

        assert_eq!(stored(&store, tenant, short), 0);
        assert_eq!(stored(&store, tenant, long), 1);
        assert_eq!(stored(&store, tenant, other), 1);
        let retention = store.store.retention();
        assert_eq!(
            retention.of_device(&tenant.to_string(), &long.to_string()),
            Some(duration_ns(3 * HOUR)),
            "the tenant's shorter retention caps the device's"
        );

        let error = store
            .set_device_retention(vec![((tenant, other), Duration::ZERO)])
            .unwrap_err();
        assert!(
            error.to_string().contains("expected a positive number"),
            "{error}"
        );
    }
}
