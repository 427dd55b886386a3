//! Property test: random operations on a `Store` and on a simple in-memory
//! model must give the same results for latest, keys, paged range and
//! aggregate queries after every operation.
//!
//! The model keeps flushed points and head points apart, because a reopen
//! loses the head (writes are durable only after a flush). Tenant `t2` has a
//! retention of [`T2_RETENTION`] on a clock that the operations move
//! forward, and the operations switch between the retentions of
//! [`RETENTIONS`], some with device entries. Tiny partitions make flushes
//! and compactions span several partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use ferrite_core::Value;
use ferrite_tsdb::{Bucket, Retention, SeriesKey, Store, StoreOptions};
use proptest::prelude::*;

use crate::{Exact, exact, exact_points};

const TENANTS: [&str; 2] = ["t1", "t2"];
const DEVICES: [&str; 2] = ["d1", "d2"];
const KEYS: [&str; 2] = ["temp", "status"];

/// Small so that duplicates and out-of-order timestamps are frequent. The
/// ends of the storable range are mixed in as well.
const TS_RANGE: std::ops::Range<i64> = -20..60;

/// Tiny rollup tiers, so that the timestamps of the cases span many rows.
const ROLLUP_INTERVALS: [i64; 3] = [4, 8, 16];

/// Retention of tenant `t2`; `t1` keeps everything.
const T2_RETENTION: i64 = 30;
/// Clock value at the start of every case.
const START_CLOCK: i64 = 40;

/// Retention of one tenant or device: `None` keeps points forever.
type Keep = Option<i64>;

/// A raw-data retention: default, tenants and devices (by indexes into
/// [`TENANTS`] and [`DEVICES`]).
struct RetentionCase {
    default: Keep,
    tenants: &'static [(usize, Keep)],
    devices: &'static [(usize, usize, Keep)],
}

/// Retentions that [`Op::SetRetention`] switches between; the store opens
/// with the first. Device entries are shorter and longer than their
/// tenant's, and the last one limits `t1` through the default.
const RETENTIONS: [RetentionCase; 4] = [
    RetentionCase {
        default: None,
        tenants: &[(1, Some(T2_RETENTION))],
        devices: &[],
    },
    RetentionCase {
        default: None,
        tenants: &[(1, Some(T2_RETENTION))],
        devices: &[(0, 1, Some(12)), (1, 0, Some(50))],
    },
    RetentionCase {
        default: None,
        tenants: &[(1, Some(T2_RETENTION))],
        devices: &[(1, 1, Some(8)), (1, 0, None)],
    },
    RetentionCase {
        default: Some(45),
        tenants: &[(1, None)],
        devices: &[(1, 1, Some(20))],
    },
];

impl RetentionCase {
    fn keep(&self, tenant: usize, device: usize) -> Keep {
        if let Some((_, _, keep)) = self
            .devices
            .iter()
            .find(|(t, d, _)| (*t, *d) == (tenant, device))
        {
            return *keep;
        }
        match self.tenants.iter().find(|(t, _)| *t == tenant) {
            Some((_, keep)) => *keep,
            None => self.default,
        }
    }

    fn to_retention(&self) -> Retention {
        let mut retention = Retention {
            default: self.default,
            tenants: self
                .tenants
                .iter()
                .map(|(tenant, keep)| (TENANTS[*tenant].to_string(), *keep))
                .collect(),
            ..Retention::default()
        };
        for (tenant, device, keep) in self.devices {
            retention.set_device(TENANTS[*tenant], DEVICES[*device], *keep);
        }
        retention
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        tenant: usize,
        device: usize,
        points: Vec<(usize, i64, Value)>,
    },
    Flush,
    Reopen,
    Compact,
    Maintain,
    AdvanceClock(i64),
    /// Replaces the retention with `RETENTIONS[n]`.
    SetRetention(usize),
    DeleteDevice {
        tenant: usize,
        device: usize,
    },
}

/// Query parameters drawn once per case.
#[derive(Debug, Clone)]
struct QueryParams {
    page_limit: usize,
    start: i64,
    span: i64,
    interval: i64,
}

type Points = BTreeMap<i64, Value>;

struct Model {
    flushed: BTreeMap<SeriesKey, Points>,
    head: BTreeMap<SeriesKey, Points>,
    marker: u64,
    now: i64,
    /// Index into [`RETENTIONS`].
    retention: usize,
    /// Cutoff that each (tenant, device) had when the retention last
    /// changed: a cutoff never moves back in time.
    floors: BTreeMap<(usize, usize), i64>,
    /// Pairs that had a limited retention at some time. Rollup rows keep
    /// the points that raw retention hid, so only the other pairs compare
    /// rollup results with the raw view.
    ever_limited: BTreeSet<(usize, usize)>,
}

impl Default for Model {
    fn default() -> Model {
        let mut model = Model {
            flushed: BTreeMap::new(),
            head: BTreeMap::new(),
            marker: 0,
            now: START_CLOCK,
            retention: 0,
            floors: BTreeMap::new(),
            ever_limited: BTreeSet::new(),
        };
        model.note_limited();
        model
    }
}

impl Model {
    fn apply_write(&mut self, tenant: &str, device: &str, points: &[(usize, i64, Value)]) {
        for (key, ts, value) in points {
            let series = SeriesKey::new(tenant, device, KEYS[*key]);
            self.head
                .entry(series)
                .or_default()
                .insert(*ts, value.clone());
        }
    }

    fn flush(&mut self, marker: u64) {
        for (series, points) in std::mem::take(&mut self.head) {
            self.flushed.entry(series).or_default().extend(points);
        }
        self.marker = marker;
    }

    fn reopen(&mut self) {
        self.head.clear();
    }

    /// Pairs of tenant and device indexes.
    fn pairs() -> impl Iterator<Item = (usize, usize)> {
        (0..TENANTS.len()).flat_map(|tenant| (0..DEVICES.len()).map(move |device| (tenant, device)))
    }

    fn pair_of(series: &SeriesKey) -> (usize, usize) {
        let tenant = TENANTS.iter().position(|t| *t == series.tenant).unwrap();
        let device = DEVICES.iter().position(|d| *d == series.device).unwrap();
        (tenant, device)
    }

    fn retention_cutoff(&self, (tenant, device): (usize, usize)) -> i64 {
        RETENTIONS[self.retention]
            .keep(tenant, device)
            .map_or(i64::MIN, |keep| self.now.saturating_sub(keep))
    }

    /// Oldest timestamp of the pair that is still kept.
    fn cutoff(&self, pair: (usize, usize)) -> i64 {
        let floor = self.floors.get(&pair).copied().unwrap_or(i64::MIN);
        self.retention_cutoff(pair).max(floor)
    }

    fn set_retention(&mut self, retention: usize) {
        for pair in Model::pairs() {
            let floor = self.cutoff(pair);
            self.floors.insert(pair, floor);
        }
        self.retention = retention;
        self.note_limited();
    }

    fn note_limited(&mut self) {
        for (tenant, device) in Model::pairs() {
            if RETENTIONS[self.retention].keep(tenant, device).is_some() {
                self.ever_limited.insert((tenant, device));
            }
        }
    }

    /// True when a floor keeps a cutoff later than the retention alone.
    fn floors_matter(&self) -> bool {
        Model::pairs().any(|pair| self.cutoff(pair) > self.retention_cutoff(pair))
    }

    /// Mirrors a full compaction before a reopen that loses the floors:
    /// the compaction deletes every flushed point past its cutoff.
    fn drop_expired_and_floors(&mut self) {
        let cutoffs: BTreeMap<SeriesKey, i64> = self
            .flushed
            .keys()
            .map(|series| (series.clone(), self.cutoff(Model::pair_of(series))))
            .collect();
        for (series, points) in &mut self.flushed {
            let cutoff = cutoffs[series];
            points.retain(|ts, _| *ts >= cutoff);
        }
        self.floors.clear();
    }

    fn delete_device(&mut self, tenant: &str, device: &str) {
        let belongs = |series: &SeriesKey| series.tenant == tenant && series.device == device;
        self.flushed.retain(|series, _| !belongs(series));
        self.head.retain(|series, _| !belongs(series));
    }

    /// Flushed points overlaid with head points, without those past the
    /// retention.
    fn view(&self, series: &SeriesKey) -> Points {
        let mut points = self.flushed.get(series).cloned().unwrap_or_default();
        if let Some(head) = self.head.get(series) {
            points.extend(head.iter().map(|(ts, value)| (*ts, value.clone())));
        }
        let cutoff = self.cutoff(Model::pair_of(series));
        points.retain(|ts, _| *ts >= cutoff);
        points
    }

    fn aggregate(&self, series: &SeriesKey, start: i64, end: i64, interval: i64) -> Vec<Bucket> {
        let count = (end - start + interval - 1) / interval;
        let mut buckets: Vec<Bucket> = (0..count)
            .map(|i| Bucket {
                start: start + i * interval,
                count: 0,
                numeric_count: 0,
                sum: None,
                min: None,
                max: None,
                first: None,
                last: None,
            })
            .collect();

        for (ts, value) in self.view(series).range(start..end) {
            let bucket = &mut buckets[((ts - start) / interval) as usize];
            bucket.count += 1;
            let number = match value {
                Value::Float(v) => Some(*v),
                Value::Int(v) => Some(*v as f64),
                _ => None,
            };
            if let Some(number) = number {
                bucket.numeric_count += 1;
                bucket.sum = Some(bucket.sum.unwrap_or(0.0) + number);
                bucket.min = Some(bucket.min.map_or(number, |m| m.min(number)));
                bucket.max = Some(bucket.max.map_or(number, |m| m.max(number)));
            }
            if bucket.first.is_none() {
                bucket.first = Some((*ts, value.clone()));
            }
            bucket.last = Some((*ts, value.clone()));
        }
        buckets
    }
}

fn value_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec![0.0, -0.0, 1.5, -2.25, f64::MIN_POSITIVE]).prop_map(Value::Float),
        (-1.0e6..1.0e6f64).prop_map(Value::Float),
        prop::sample::select(vec![i64::MIN, i64::MAX, 0, -1]).prop_map(Value::Int),
        (-1000i64..1000).prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        "[a-zé🌡]{0,6}".prop_map(Value::Str),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let ts = prop_oneof![
        9 => TS_RANGE,
        1 => prop::sample::select(vec![ferrite_core::MIN_TIMESTAMP_NS, ferrite_core::MAX_TIMESTAMP_NS]),
    ];
    let point = (0..KEYS.len(), ts, value_strategy());
    let write = (
        0..TENANTS.len(),
        0..DEVICES.len(),
        prop::collection::vec(point, 1..12),
    )
        .prop_map(|(tenant, device, points)| Op::Write {
            tenant,
            device,
            points,
        });
    let delete = (0..TENANTS.len(), 0..DEVICES.len())
        .prop_map(|(tenant, device)| Op::DeleteDevice { tenant, device });
    prop_oneof![
        8 => write,
        3 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Compact),
        2 => Just(Op::Maintain),
        1 => (1i64..40).prop_map(Op::AdvanceClock),
        1 => (0..RETENTIONS.len()).prop_map(Op::SetRetention),
        1 => delete,
    ]
}

fn query_strategy() -> impl Strategy<Value = QueryParams> {
    (1usize..8, -25i64..50, 1i64..90, 1i64..40).prop_map(|(page_limit, start, span, interval)| {
        QueryParams {
            page_limit,
            start,
            span,
            interval,
        }
    })
}

fn options(clock: &Arc<AtomicI64>, retention: usize) -> StoreOptions {
    let clock = Arc::clone(clock);
    StoreOptions {
        head_budget_bytes: 1 << 20,
        partition_ns: 16,
        merge_fan_in: 2,
        cold_after: std::time::Duration::from_secs(3600),
        retention: RETENTIONS[retention].to_retention(),
        background_maintenance: false,
        rollup_intervals: ROLLUP_INTERVALS.to_vec(),
        clock: Arc::new(move || clock.load(Ordering::Relaxed)),
        ..StoreOptions::default()
    }
}

fn open(dir: &Path, clock: &Arc<AtomicI64>, retention: usize) -> Store {
    Store::open(dir, options(clock, retention)).expect("open store")
}

/// Reads `[start, end)` page by page and checks that pages join without gaps
/// or repeats.
fn read_all_pages(
    store: &Store,
    series: &SeriesKey,
    start: i64,
    end: i64,
    limit: usize,
) -> Vec<(i64, Exact)> {
    let mut all = Vec::new();
    let mut after = None;
    for _ in 0..1000 {
        let page = store.range(series, start, end, after, limit).unwrap();
        assert!(page.points.len() <= limit);
        if page.has_more {
            assert_eq!(
                page.points.len(),
                limit,
                "a page that is not full must be the last"
            );
        }
        after = page.points.last().map(|p| p.0).or(after);
        all.extend(exact_points(&page.points));
        if !page.has_more {
            return all;
        }
    }
    panic!("paging of {series:?} did not end");
}

fn check_store(store: &Store, model: &Model, params: &QueryParams) {
    for tenant in TENANTS {
        for device in DEVICES {
            let mut expected_latest: Vec<(String, i64, Exact)> = KEYS
                .iter()
                .filter_map(|key| {
                    let view = model.view(&SeriesKey::new(tenant, device, *key));
                    let (ts, value) = view.last_key_value()?;
                    Some((key.to_string(), *ts, exact(value)))
                })
                .collect();
            expected_latest.sort_by(|a, b| a.0.cmp(&b.0));
            let actual_latest: Vec<(String, i64, Exact)> = store
                .latest(tenant, device)
                .into_iter()
                .map(|(key, ts, value)| (key, ts, exact(&value)))
                .collect();
            assert_eq!(
                actual_latest, expected_latest,
                "latest of {tenant}/{device}"
            );

            let expected_keys: Vec<String> = expected_latest
                .iter()
                .map(|(key, _, _)| key.clone())
                .collect();
            assert_eq!(
                store.keys(tenant, device),
                expected_keys,
                "keys of {tenant}/{device}"
            );

            for key in KEYS {
                check_series(store, model, params, &SeriesKey::new(tenant, device, key));
            }
        }
    }
}

fn check_series(store: &Store, model: &Model, params: &QueryParams, series: &SeriesKey) {
    let view = model.view(series);

    let everything: Vec<(i64, Exact)> =
        view.iter().map(|(ts, value)| (*ts, exact(value))).collect();
    let paged = read_all_pages(store, series, i64::MIN, i64::MAX, params.page_limit);
    assert_eq!(paged, everything, "full range of {series:?}");

    let start = params.start;
    let end = params.start + params.span;
    let expected: Vec<(i64, Exact)> = view
        .range(start..end)
        .map(|(ts, value)| (*ts, exact(value)))
        .collect();
    let paged = read_all_pages(store, series, start, end, params.page_limit);
    assert_eq!(paged, expected, "range [{start}, {end}) of {series:?}");

    if !model.ever_limited.contains(&Model::pair_of(series)) {
        check_tiers(store, model, series, start, end);
    }

    let buckets = store
        .aggregate(series, start, end, params.interval)
        .unwrap();
    assert_eq!(
        buckets,
        model.aggregate(series, start, end, params.interval),
        "aggregate [{start}, {end}) by {} of {series:?}",
        params.interval
    );
}

/// Aggregates whose bucket edges line up with a rollup tier must equal the
/// raw result (sums up to rounding).
fn check_tiers(store: &Store, model: &Model, series: &SeriesKey, start: i64, end: i64) {
    let lo = start.div_euclid(16) * 16;
    let hi = (end.div_euclid(16) + 1) * 16;
    for width in [4i64, 8, 16, 12] {
        let bounds: Vec<(i64, i64)> = (0..)
            .map(|i| (lo + i * width, lo + (i + 1) * width))
            .take_while(|(s, _)| *s < hi)
            .collect();
        let expected_tier = match width {
            4 | 12 => Some(4),
            8 => Some(8),
            _ => Some(16),
        };
        assert_eq!(store.rollup_tier_for(&bounds), expected_tier);
        let actual = store.aggregate_buckets(series, &bounds).unwrap();
        for ((bucket_start, bucket_end), bucket) in bounds.iter().zip(&actual) {
            let expected = model.aggregate(
                series,
                *bucket_start,
                *bucket_end,
                bucket_end - bucket_start,
            );
            let expected = &expected[0];
            let context =
                format!("{series:?} bucket [{bucket_start}, {bucket_end}) by tier {width}");
            assert_eq!(bucket.count, expected.count, "count of {context}");
            assert_eq!(
                bucket.numeric_count, expected.numeric_count,
                "numeric count of {context}"
            );
            assert_eq!(bucket.min, expected.min, "min of {context}");
            assert_eq!(bucket.max, expected.max, "max of {context}");
            assert_eq!(
                bucket.first.as_ref().map(|(ts, v)| (*ts, exact(v))),
                expected.first.as_ref().map(|(ts, v)| (*ts, exact(v))),
                "first of {context}"
            );
            assert_eq!(
                bucket.last.as_ref().map(|(ts, v)| (*ts, exact(v))),
                expected.last.as_ref().map(|(ts, v)| (*ts, exact(v))),
                "last of {context}"
            );
            // Rows add in another order, so the sums may differ by rounding,
            // which scales with the magnitude of the values added.
            let magnitude: f64 = model
                .view(series)
                .range(*bucket_start..*bucket_end)
                .filter_map(|(_, value)| match value {
                    Value::Float(v) => Some(v.abs()),
                    Value::Int(v) => Some((*v as f64).abs()),
                    _ => None,
                })
                .sum();
            match (bucket.sum, expected.sum) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-12 * magnitude.max(1.0),
                    "sum of {context}: {a} vs {b}"
                ),
                (a, b) => assert_eq!(a, b, "sum of {context}"),
            }
        }
    }
}

fn run_case(ops: &[Op], params: &QueryParams) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(AtomicI64::new(START_CLOCK));
    let mut store = Some(open(dir.path(), &clock, 0));
    let mut model = Model::default();
    let mut next_marker = 1;

    for op in ops {
        let current = store.as_ref().unwrap();
        match op {
            Op::Write {
                tenant,
                device,
                points,
            } => {
                let batch: Vec<(&str, i64, Value)> = points
                    .iter()
                    .map(|(key, ts, value)| (KEYS[*key], *ts, value.clone()))
                    .collect();
                current
                    .write(TENANTS[*tenant], DEVICES[*device], &batch)
                    .unwrap();
                model.apply_write(TENANTS[*tenant], DEVICES[*device], points);
            }
            Op::Flush => {
                current.flush(next_marker).unwrap();
                model.flush(next_marker);
                next_marker += 1;
            }
            Op::Reopen => {
                // The store keeps floors in memory only. A full compaction
                // first deletes what they hide, so that the reopened store
                // and the model agree.
                if model.floors_matter() {
                    current.compact().unwrap();
                    model.drop_expired_and_floors();
                }
                drop(store.take());
                store = Some(open(dir.path(), &clock, model.retention));
                model.reopen();
            }
            Op::Compact => current.compact().unwrap(),
            Op::Maintain => current.run_maintenance().unwrap(),
            Op::AdvanceClock(by) => {
                model.now += by;
                clock.store(model.now, Ordering::Relaxed);
            }
            Op::SetRetention(retention) => {
                current
                    .set_retention(RETENTIONS[*retention].to_retention())
                    .unwrap();
                model.set_retention(*retention);
            }
            Op::DeleteDevice { tenant, device } => {
                current
                    .delete_device(TENANTS[*tenant], DEVICES[*device])
                    .unwrap();
                model.delete_device(TENANTS[*tenant], DEVICES[*device]);
            }
        }

        let current = store.as_ref().unwrap();
        assert_eq!(
            current.durable_marker(),
            model.marker,
            "durable marker after {op:?}"
        );
        check_store(current, &model, params);
    }

    // A full compaction leaves one segment per partition.
    let current = store.as_ref().unwrap();
    current.compact().unwrap();
    check_store(current, &model, params);
    let files = crate::segment_files(dir.path());
    let mut partitions: Vec<i64> = Vec::new();
    for tenant in TENANTS {
        for device in DEVICES {
            for key in KEYS {
                let series = SeriesKey::new(tenant, device, key);
                partitions.extend(model.view(&series).keys().map(|ts| ts.div_euclid(16)));
            }
        }
    }
    partitions.sort_unstable();
    partitions.dedup();
    assert!(
        files.len() <= partitions.len(),
        "{} segments for {} partitions after a full compaction",
        files.len(),
        partitions.len()
    );
    assert!(crate::corrupt_files(dir.path()).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op_strategy(), 1..40), params in query_strategy()) {
        run_case(&ops, &params);
    }
}

#[test]
fn model_case_overwrite_across_flush_and_reopen() {
    let write = |points: Vec<(usize, i64, Value)>| Op::Write {
        tenant: 0,
        device: 0,
        points,
    };
    let ops = vec![
        write(vec![
            (0, 5, Value::Int(1)),
            (0, 3, Value::Int(2)),
            (0, 5, Value::Int(3)),
        ]),
        Op::Flush,
        write(vec![(0, 5, Value::Float(-0.0)), (1, 7, Value::Bool(true))]),
        Op::Flush,
        write(vec![
            (0, 5, Value::Str("head".into())),
            (0, 9, Value::Int(9)),
        ]),
        Op::Reopen,
        Op::Compact,
        Op::DeleteDevice {
            tenant: 0,
            device: 0,
        },
        write(vec![(0, 1, Value::Int(1))]),
        Op::Flush,
        Op::Reopen,
    ];
    let params = QueryParams {
        page_limit: 1,
        start: 0,
        span: 10,
        interval: 3,
    };

    run_case(&ops, &params);
}
