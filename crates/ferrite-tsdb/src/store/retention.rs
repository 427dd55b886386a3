//! Retention as the store applies it: [`RetentionRules`] hold a caller's
//! [`Retention`] with the floors that changes at run time leave, and
//! [`Cutoffs`] give the cutoff of every series during one maintenance pass.
//!
//! # Floors
//!
//! A cutoff never moves back in time. When [`crate::Store::set_retention`]
//! makes a retention longer, points that the old one had already expired
//! stay expired. Maintenance may not have deleted them from disk yet, so
//! showing them again would make queries depend on when compaction last
//! ran, and disagree with the latest points that maintenance forgot.
//! Every tenant and device entry therefore carries a *floor*, the cutoff it
//! had when its retention last changed, and its cutoff is the later of the
//! floor and `now - retention`. Once `now - retention` passes the floor,
//! the floor has no effect.
//!
//! NOTE: floors live in memory only. After a restart, points that a shorter
//! retention had hidden but compaction had not yet deleted are visible
//! again when the retention given at open is longer.
//!
//! # Retention groups
//!
//! Maintenance deletes a segment file whole when every series in it is past
//! its cutoff. Series that share a cutoff form a *retention group*: each
//! tenant (by its catalog number), and each device with an entry of its own
//! (by [`DEVICE_GROUP`] plus the entry's index). A segment caches the
//! greatest timestamp per group, so the check is one comparison per group
//! rather than one per series. The numbering changes when the rules change,
//! so the cache is keyed by [`RetentionRules::generation`] and rebuilt from
//! the segment's index after a change.
//!
//! The other way to handle devices with their own retention would be to
//! leave them out of the whole-file check and let compaction rewrite the
//! segments that contain them. A rewrite reads and writes a whole partition
//! where a deletion costs one unlink, while the groups cost one index read
//! per segment and retention change, and 16 bytes per group and segment.
//! Retention changes when device profiles or their assignments change,
//! which is rare next to maintenance passes (every few seconds), so groups
//! are cheaper.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrite_core::TimestampNs;

use super::Inner;
use crate::catalog::{MAX_TENANTS, NO_TENANT, SeriesId};
use crate::error::StoreError;
use crate::item::StoredValue;
use crate::segment::{GroupMaxTs, Segment};
use crate::{Retention, cutoff_at};

/// Flag of the retention groups of devices with their own entry. Tenant
/// numbers stay below it (see [`MAX_TENANTS`]).
const DEVICE_GROUP: u32 = MAX_TENANTS;

/// Source of [`RetentionRules::generation`].
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

/// A [`Retention`] with its floors, and its device entries numbered as
/// retention groups.
pub(super) struct RetentionRules {
    /// The retention as the caller gave it.
    retention: Retention,
    /// Unique among all rules of the process, so that greatest timestamps
    /// that a segment cached per group under other rules are not reused.
    generation: u64,
    /// Floor of the tenants without an entry in `tenant_floors`.
    default_floor: TimestampNs,
    /// Floor of every tenant listed in `retention.tenants`, and of every
    /// other tenant whose cutoff would differ with `default_floor`.
    tenant_floors: HashMap<String, TimestampNs>,
    /// Every device listed in `retention.devices`, and every other device
    /// whose cutoff would differ from its tenant's, sorted by tenant and
    /// device name. The index is the device's retention group.
    devices: Vec<DeviceRule>,
    /// Index into `devices` by tenant and device name.
    device_index: HashMap<String, HashMap<String, u32>>,
}

struct DeviceRule {
    tenant: String,
    device: String,
    /// Retention in nanoseconds: the device's own entry, else its tenant's.
    keep: Option<i64>,
    floor: TimestampNs,
}

impl DeviceRule {
    fn cutoff(&self, now: TimestampNs) -> TimestampNs {
        cutoff_at(self.keep, now).max(self.floor)
    }
}

impl RetentionRules {
    /// Builds rules without floors, as at open. `setting` names the
    /// retention in errors.
    pub(super) fn new(retention: Retention, setting: &str) -> Result<RetentionRules, StoreError> {
        retention.validate(setting)?;
        let tenant_floors = retention
            .tenants
            .keys()
            .map(|tenant| (tenant.clone(), TimestampNs::MIN))
            .collect();
        let listed: BTreeMap<(&str, &str), Option<i64>> = retention
            .devices
            .iter()
            .flat_map(|(tenant, devices)| {
                devices
                    .iter()
                    .map(move |(device, keep)| ((tenant.as_str(), device.as_str()), *keep))
            })
            .collect();
        let devices = listed
            .into_iter()
            .map(|((tenant, device), keep)| DeviceRule {
                tenant: tenant.to_owned(),
                device: device.to_owned(),
                keep,
                floor: TimestampNs::MIN,
            })
            .collect();
        RetentionRules::assemble(retention, TimestampNs::MIN, tenant_floors, devices)
    }

    /// Builds the rules for `retention` that replace these at time `now`.
    /// Every entry's floor becomes the cutoff it has under these rules, so
    /// that no cutoff moves back in time.
    pub(super) fn replace(
        &self,
        retention: Retention,
        now: TimestampNs,
    ) -> Result<RetentionRules, StoreError> {
        retention.validate("retention")?;

        let default_keep = retention.default;
        let default_floor = relevant_floor(self.default_cutoff(now), default_keep, now);
        let new_default_cutoff = cutoff_at(default_keep, now).max(default_floor);

        // A tenant without an entry of its own needs one while its cutoff
        // differs from the default's.
        let tenant_names: BTreeSet<&str> = retention
            .tenants
            .keys()
            .chain(self.tenant_floors.keys())
            .map(String::as_str)
            .collect();
        let mut tenant_floors = HashMap::new();
        for tenant in tenant_names {
            let keep = retention.of(tenant);
            let floor = relevant_floor(self.tenant_cutoff(tenant, now), keep, now);
            let listed = retention.tenants.contains_key(tenant);
            if listed || cutoff_at(keep, now).max(floor) != new_default_cutoff {
                tenant_floors.insert(tenant.to_owned(), floor);
            }
        }
        let new_tenant_cutoff = |tenant: &str| {
            let floor = tenant_floors.get(tenant).copied().unwrap_or(default_floor);
            cutoff_at(retention.of(tenant), now).max(floor)
        };

        // Likewise a device without an entry of its own needs one while its
        // cutoff differs from its tenant's.
        let device_names: BTreeSet<(&str, &str)> = retention
            .devices
            .iter()
            .flat_map(|(tenant, devices)| {
                devices
                    .keys()
                    .map(move |device| (tenant.as_str(), device.as_str()))
            })
            .chain(
                self.devices
                    .iter()
                    .map(|rule| (rule.tenant.as_str(), rule.device.as_str())),
            )
            .collect();
        let mut devices = Vec::new();
        for (tenant, device) in device_names {
            let keep = retention.of_device(tenant, device);
            let floor = relevant_floor(self.device_cutoff(tenant, device, now), keep, now);
            let listed = retention.device_entry(tenant, device).is_some();
            if listed || cutoff_at(keep, now).max(floor) != new_tenant_cutoff(tenant) {
                devices.push(DeviceRule {
                    tenant: tenant.to_owned(),
                    device: device.to_owned(),
                    keep,
                    floor,
                });
            }
        }
        RetentionRules::assemble(retention, default_floor, tenant_floors, devices)
    }

    fn assemble(
        retention: Retention,
        default_floor: TimestampNs,
        tenant_floors: HashMap<String, TimestampNs>,
        devices: Vec<DeviceRule>,
    ) -> Result<RetentionRules, StoreError> {
        if devices.len() >= DEVICE_GROUP as usize {
            return Err(StoreError::InvalidArgument(format!(
                "retention lists {} devices, more than the maximum of {}",
                devices.len(),
                DEVICE_GROUP - 1
            )));
        }
        let mut device_index: HashMap<String, HashMap<String, u32>> = HashMap::new();
        for (index, rule) in devices.iter().enumerate() {
            device_index
                .entry(rule.tenant.clone())
                .or_default()
                .insert(rule.device.clone(), index as u32);
        }
        Ok(RetentionRules {
            retention,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            default_floor,
            tenant_floors,
            devices,
            device_index,
        })
    }

    pub(super) fn retention(&self) -> &Retention {
        &self.retention
    }

    /// True when no entry limits retention and no floor is left.
    pub(super) fn keeps_everything(&self) -> bool {
        self.retention.keeps_everything()
            && self.default_floor == TimestampNs::MIN
            && self
                .tenant_floors
                .values()
                .all(|floor| *floor == TimestampNs::MIN)
            && self
                .devices
                .iter()
                .all(|rule| rule.floor == TimestampNs::MIN)
    }

    fn default_cutoff(&self, now: TimestampNs) -> TimestampNs {
        cutoff_at(self.retention.default, now).max(self.default_floor)
    }

    /// Cutoff of the series of `tenant` whose device has no entry.
    pub(super) fn tenant_cutoff(&self, tenant: &str, now: TimestampNs) -> TimestampNs {
        let floor = self
            .tenant_floors
            .get(tenant)
            .copied()
            .unwrap_or(self.default_floor);
        cutoff_at(self.retention.of(tenant), now).max(floor)
    }

    /// Cutoff of the series of `device` of `tenant`: oldest timestamp still
    /// kept at `now`, `TimestampNs::MIN` when all are kept.
    pub(super) fn device_cutoff(
        &self,
        tenant: &str,
        device: &str,
        now: TimestampNs,
    ) -> TimestampNs {
        let index = self
            .device_index
            .get(tenant)
            .and_then(|devices| devices.get(device));
        match index {
            Some(index) => self.devices[*index as usize].cutoff(now),
            None => self.tenant_cutoff(tenant, now),
        }
    }
}

/// `floor` when it can still matter under retention `keep` from `now` on,
/// else `TimestampNs::MIN` (a cutoff only grows with time).
fn relevant_floor(floor: TimestampNs, keep: Option<i64>, now: TimestampNs) -> TimestampNs {
    if floor > cutoff_at(keep, now) {
        floor
    } else {
        TimestampNs::MIN
    }
}

/// Retention cutoffs during one maintenance pass.
pub(super) struct Cutoffs {
    /// Generation of the rules that numbered the groups.
    generation: u64,
    /// Cutoff per tenant number.
    by_tenant: Vec<TimestampNs>,
    /// Cutoff per device group, without the [`DEVICE_GROUP`] flag.
    by_device: Vec<TimestampNs>,
    /// Retention group per series id: the tenant number copied from the
    /// catalog, replaced by the device group for devices with an entry.
    group_of: Vec<u32>,
}

impl Cutoffs {
    fn group(&self, id: SeriesId) -> u32 {
        usize::try_from(id.0)
            .ok()
            .and_then(|index| self.group_of.get(index))
            .copied()
            .unwrap_or(NO_TENANT)
    }

    /// Series that are not live (deleted) expire entirely.
    pub(super) fn of(&self, id: SeriesId) -> TimestampNs {
        self.of_group(self.group(id))
    }

    fn of_group(&self, group: u32) -> TimestampNs {
        let cutoff = if group == NO_TENANT {
            None
        } else if group & DEVICE_GROUP != 0 {
            self.by_device.get((group & !DEVICE_GROUP) as usize)
        } else {
            self.by_tenant.get(group as usize)
        };
        cutoff.copied().unwrap_or(TimestampNs::MAX)
    }

    /// True when every point of `segment` is older than the cutoff of its
    /// series. The greatest timestamp per retention group is read from the
    /// index once per segment and generation of the rules.
    pub(super) fn all_expired<V: StoredValue>(
        &self,
        segment: &Segment<V>,
    ) -> Result<bool, StoreError> {
        if let Some(cached) = segment.group_max_ts.lock().as_ref()
            && cached.generation == self.generation
        {
            return Ok(self.groups_expired(&cached.max_ts));
        }

        // The index is read without holding the cache's lock, which
        // memory accounting takes as well.
        let mut max_ts: BTreeMap<u32, TimestampNs> = BTreeMap::new();
        for entry in segment.entries() {
            let (id, entry) = entry?;
            let slot = max_ts.entry(self.group(id)).or_insert(entry.max_ts);
            *slot = (*slot).max(entry.max_ts);
        }
        let max_ts: Vec<(u32, TimestampNs)> = max_ts.into_iter().collect();
        let expired = self.groups_expired(&max_ts);
        *segment.group_max_ts.lock() = Some(GroupMaxTs {
            generation: self.generation,
            max_ts,
        });
        Ok(expired)
    }

    fn groups_expired(&self, max_ts: &[(u32, TimestampNs)]) -> bool {
        max_ts
            .iter()
            .all(|(group, max_ts)| *max_ts < self.of_group(*group))
    }
}

impl Inner {
    /// Returns the retention of raw points that applies now.
    pub(super) fn raw_retention(&self) -> Arc<RetentionRules> {
        Arc::clone(&self.retention.read())
    }

    /// Replaces the retention of raw points, keeping every cutoff where it
    /// is or moving it forward.
    pub(super) fn set_retention(&self, retention: Retention) -> Result<(), StoreError> {
        let now = self.now();
        let mut current = self.retention.write();
        let rules = current.replace(retention, now)?;
        tracing::info!(
            tenants = rules.retention.tenants.len(),
            devices = rules
                .retention
                .devices
                .values()
                .map(HashMap::len)
                .sum::<usize>(),
            device_groups = rules.devices.len(),
            "replaced the retention of raw points"
        );
        *current = Arc::new(rules);
        drop(current);
        self.wake_maintenance();
        Ok(())
    }

    /// Cutoff of the raw points of `device` of `tenant` at the current time.
    pub(super) fn cutoff(&self, tenant: &str, device: &str) -> TimestampNs {
        let now = self.now();
        self.retention.read().device_cutoff(tenant, device, now)
    }

    /// Retention cutoff per series, or `None` when `rules` keep everything.
    pub(super) fn cutoffs_for(&self, rules: &RetentionRules) -> Option<Cutoffs> {
        if rules.keeps_everything() {
            return None;
        }
        let now = self.now();
        let state = self.state.read();
        let by_tenant = state
            .catalog
            .tenant_names()
            .iter()
            .map(|tenant| rules.tenant_cutoff(tenant, now))
            .collect();
        let by_device = rules.devices.iter().map(|rule| rule.cutoff(now)).collect();

        // One catalog lookup per device entry, so a pass costs the copy of
        // the tenant numbers plus the series of those devices.
        let mut group_of = state.catalog.tenants_by_id().to_vec();
        for (index, rule) in rules.devices.iter().enumerate() {
            let Some(keys) = state.catalog.device(&rule.tenant, &rule.device) else {
                continue;
            };
            for id in keys.values() {
                if let Some(group) = usize::try_from(id.0)
                    .ok()
                    .and_then(|index| group_of.get_mut(index))
                {
                    *group = DEVICE_GROUP | index as u32;
                }
            }
        }
        Some(Cutoffs {
            generation: rules.generation,
            by_tenant,
            by_device,
            group_of,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 100;

    fn retention(tenant: Option<i64>, devices: &[(&str, Option<i64>)]) -> Retention {
        let mut retention = Retention {
            default: None,
            tenants: [("t".to_owned(), tenant)].into(),
            devices: HashMap::new(),
        };
        for (device, keep) in devices {
            retention.set_device("t", *device, *keep);
        }
        retention
    }

    #[test]
    fn device_entry_replaces_tenant_retention() {
        let rules = RetentionRules::new(retention(Some(DAY), &[("a", Some(10)), ("b", None)]), "r")
            .unwrap();

        assert_eq!(rules.device_cutoff("t", "a", 1000), 990);
        assert_eq!(rules.device_cutoff("t", "b", 1000), TimestampNs::MIN);
        assert_eq!(rules.device_cutoff("t", "c", 1000), 900);
        assert_eq!(rules.device_cutoff("other", "a", 1000), TimestampNs::MIN);
    }

    #[test]
    fn lengthening_keeps_cutoff_as_floor() {
        let rules = RetentionRules::new(retention(Some(DAY), &[("a", Some(10))]), "r").unwrap();
        let longer = rules
            .replace(retention(Some(DAY), &[("a", Some(50))]), 1000)
            .unwrap();

        assert_eq!(longer.device_cutoff("t", "a", 1000), 990);
        assert_eq!(longer.device_cutoff("t", "a", 1030), 990);
        assert_eq!(longer.device_cutoff("t", "a", 1060), 1010);
    }

    #[test]
    fn removed_entry_keeps_floor_until_tenant_passes_it() {
        let rules = RetentionRules::new(retention(Some(DAY), &[("a", Some(10))]), "r").unwrap();
        let removed = rules.replace(retention(Some(DAY), &[]), 1000).unwrap();

        assert_eq!(removed.devices.len(), 1, "floor-only entry of a");
        assert_eq!(removed.device_cutoff("t", "a", 1000), 990);
        assert_eq!(removed.device_cutoff("t", "c", 1000), 900);

        let later = removed.replace(retention(Some(DAY), &[]), 1100).unwrap();
        assert!(later.devices.is_empty(), "the floor no longer matters");
        assert!(later.tenant_floors.values().all(|f| *f == TimestampNs::MIN));
    }

    #[test]
    fn shortening_leaves_no_floor() {
        let rules = RetentionRules::new(retention(None, &[]), "r").unwrap();
        let shorter = rules
            .replace(retention(None, &[("a", Some(10))]), 1000)
            .unwrap();

        assert_eq!(shorter.devices[0].floor, TimestampNs::MIN);
        assert_eq!(shorter.device_cutoff("t", "a", 1000), 990);
        assert_eq!(shorter.device_cutoff("t", "b", 1000), TimestampNs::MIN);
    }

    #[test]
    fn unlimited_rules_keep_everything() {
        let rules = RetentionRules::new(retention(None, &[("a", None)]), "r").unwrap();
        assert!(rules.keeps_everything());

        let limited = rules
            .replace(retention(None, &[("a", Some(10))]), 1000)
            .unwrap();
        assert!(!limited.keeps_everything());

        let unlimited_again = limited.replace(retention(None, &[]), 2000).unwrap();
        assert!(
            !unlimited_again.keeps_everything(),
            "the floor of a still hides its expired points"
        );
    }

    #[test]
    fn nonpositive_retention_is_rejected() {
        let error = RetentionRules::new(retention(Some(DAY), &[("a", Some(0))]), "retention")
            .err()
            .expect("zero retention is invalid");
        let message = error.to_string();
        assert!(
            message.contains("device \"a\" of tenant \"t\""),
            "{message}"
        );
        assert!(message.contains("expected a positive number"), "{message}");

        let rules = RetentionRules::new(retention(Some(DAY), &[]), "retention").unwrap();
        assert!(rules.replace(retention(Some(-1), &[]), 0).is_err());
    }

    #[test]
    fn generations_differ() {
        let first = RetentionRules::new(Retention::default(), "r").unwrap();
        let second = first.replace(Retention::default(), 0).unwrap();
        assert_ne!(first.generation, second.generation);
    }
}
