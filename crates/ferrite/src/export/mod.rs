//! Export of stored telemetry to Parquet or CSV, for `ferrite export` and
//! `GET /api/v1/export`.
//!
//! Both write one long table with one row per point, ordered by device name,
//! key and time:
//!
//! | column | Parquet type | content |
//! |---|---|---|
//! | `device_id` | UTF8 (dictionary) | device id, a UUID |
//! | `device` | UTF8 (dictionary) | device name |
//! | `key` | UTF8 (dictionary) | telemetry key |
//! | `time` | INT64 TIMESTAMP(NANOS, UTC) | point time |
//! | `value_float` | DOUBLE, nullable | value of a float point |
//! | `value_int` | INT64, nullable | value of an integer point |
//! | `value_bool` | BOOLEAN, nullable | value of a boolean point |
//! | `value_string` | UTF8 (dictionary), nullable | value of a string point |
//!
//! Exactly one value column of a row is set, the one of the point's type.
//! CSV has the same columns (see [`csv`]).
//!
//! Memory stays bounded whatever the export's size. Points are read one
//! page of [`PAGE_POINTS`] at a time through [`TimeSeriesStore::range`].
//! CSV is written line by line through a small buffer, and Parquet row
//! groups are closed at a fixed row count and encoded size (see `parquet.rs`).
//!
//! Only the methods of [`TimeSeriesStore`] are used, so the export works with
//! any engine behind it. A running server keeps writing during an export:
//! each series is read page by page, so points written meanwhile may or may
//! not be included.

pub mod cli;
mod csv;
pub mod http;
#[cfg(feature = "export")]
mod parquet;

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrite_core::{MIN_TIMESTAMP_NS, TimestampNs, Value, millis_to_nanos};

use crate::ids::{DeviceId, TenantId};
use crate::metadata::{Device, MetadataError, MetadataStore};
use crate::store::{Series, StoreError, TimeSeriesStore};

/// Points read from the store per `range` call.
const PAGE_POINTS: usize = 16_384;

/// Devices fetched from the metadata store per `list_devices` call.
const DEVICE_PAGE: i64 = 1_000;

/// Epoch milliseconds below this (1973-03-03) are most likely seconds.
const SECONDS_SUSPECT_BELOW_MS: i64 = 100_000_000_000;

/// Output file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
}

impl Format {
    /// Parses the `format` query parameter.
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "parquet" => Some(Format::Parquet),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// Returns the format that a file name's extension stands for:
    /// `.parquet` or `.pq`, and `.csv`, in any case.
    pub fn from_extension(path: &std::path::Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "parquet" | "pq" => Some(Format::Parquet),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Csv => "csv",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Parquet => "application/vnd.apache.parquet",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    /// Returns whether this build can write the format. Parquet needs the
    /// cargo feature `export`.
    pub fn is_supported(self) -> bool {
        match self {
            Format::Parquet => cfg!(feature = "export"),
            Format::Csv => true,
        }
    }
}

/// Errors of an export. Each message names the value and the next step.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("device {0:?} not found: give a device name or id as listed by GET /api/v1/devices")]
    DeviceNotFound(String),

    #[error(transparent)]
    Metadata(#[from] MetadataError),

    #[error("reading the time-series store failed: {0}")]
    Store(#[from] StoreError),

    #[error("writing the export failed: {0}")]
    Io(#[from] io::Error),

    #[cfg(feature = "export")]
    #[error("writing the Parquet file failed: {0}")]
    Parquet(#[from] ::parquet::errors::ParquetError),

    #[error(
        "this build of ferrite has no Parquet support (it was built without the cargo feature \"export\"); export as CSV instead"
    )]
    ParquetUnsupported,

    #[error("the export was cancelled")]
    Cancelled,
}

/// A parsed time bound, with whether it looks like seconds.
#[derive(Debug, Clone, Copy)]
pub struct TimeBound {
    pub ns: TimestampNs,
    pub looks_like_seconds: bool,
}

/// Parses a `start` or `end` bound: epoch milliseconds or an RFC 3339 time.
/// The error message names the bound and the accepted forms.
pub fn parse_time_bound(name: &str, text: &str) -> Result<TimeBound, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        let ns = millis_to_nanos(ms).ok_or_else(|| {
            format!(
                "{name} {ms} is outside the supported range of epoch milliseconds (1677-09-21 to 2262-04-11)"
            )
        })?;
        return Ok(TimeBound {
            ns,
            looks_like_seconds: (0..SECONDS_SUSPECT_BELOW_MS).contains(&ms),
        });
    }
    let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| {
        format!(
            "invalid {name} {text:?}: expected epoch milliseconds (e.g. 1714953600000) or an RFC 3339 time (e.g. 2024-05-06T00:00:00Z)"
        )
    })?;
    let ns = parsed.timestamp_nanos_opt().ok_or_else(|| {
        format!("{name} {text:?} is outside the supported range 1677-09-21 to 2262-04-11")
    })?;
    Ok(TimeBound {
        ns,
        looks_like_seconds: false,
    })
}

/// The half-open time range `[start, end)` of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: TimestampNs,
    pub end: TimestampNs,
}

impl TimeRange {
    /// Builds the range from optional bounds. A missing start means the
    /// oldest storable time and a missing end means no upper bound.
    pub fn new(start: Option<TimestampNs>, end: Option<TimestampNs>) -> Result<TimeRange, String> {
        let range = TimeRange {
            start: start.unwrap_or(MIN_TIMESTAMP_NS),
            // i64::MAX is no valid timestamp, so every stored point is before it.
            end: end.unwrap_or(i64::MAX),
        };
        if range.start >= range.end {
            return Err(format!(
                "start ({}) is not before end ({}): the range is [start, end), so give a start earlier than the end",
                format_bound(range.start),
                format_bound(range.end)
            ));
        }
        Ok(range)
    }
}

fn format_bound(ns: TimestampNs) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Selects the devices to export in output order (name, then id). An empty
/// `requested` selects every device of the tenant. Each requested entry is
/// a device id or name. An id that matches no device is tried as a name.
pub async fn select_devices(
    metadata: &impl MetadataStore,
    tenant: TenantId,
    requested: &[String],
) -> Result<Vec<Device>, ExportError> {
    let mut devices = Vec::new();
    if requested.is_empty() {
        let mut offset = 0;
        loop {
            let page = metadata.list_devices(tenant, DEVICE_PAGE, offset).await?;
            let complete = (page.len() as i64) < DEVICE_PAGE;
            offset += page.len() as i64;
            devices.extend(page);
            if complete {
                break;
            }
        }
    } else {
        for text in requested {
            devices.push(find_device(metadata, tenant, text).await?);
        }
    }

    devices.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    devices.dedup_by_key(|device| device.id);
    Ok(devices)
}

async fn find_device(
    metadata: &impl MetadataStore,
    tenant: TenantId,
    text: &str,
) -> Result<Device, ExportError> {
    if let Ok(id) = text.trim().parse::<DeviceId>() {
        match metadata.device(tenant, id).await {
            Ok(device) => return Ok(device),
            Err(MetadataError::NotFound(_)) => {}
            Err(error) => return Err(error.into()),
        }
    }
    metadata
        .device_by_name(tenant, text)
        .await?
        .ok_or_else(|| ExportError::DeviceNotFound(text.to_owned()))
}

/// One series of an export plan.
#[derive(Debug, Clone)]
pub struct PlannedSeries {
    /// Index into [`ExportPlan::devices`].
    pub device: usize,
    pub key: String,
}

/// The series an export reads, in output order.
#[derive(Debug, Clone)]
pub struct ExportPlan {
    pub tenant: TenantId,
    pub devices: Vec<Device>,
    pub series: Vec<PlannedSeries>,
    pub range: TimeRange,
    /// Requested keys that none of the selected devices has.
    pub missing_keys: Vec<String>,
}

impl ExportPlan {
    /// Lists the series of `devices`, restricted to `keys` when given. Keys
    /// come from [`TimeSeriesStore::latest`], which lists every key with at
    /// least one point. Blocks on the store.
    pub fn build(
        store: &dyn TimeSeriesStore,
        tenant: TenantId,
        devices: Vec<Device>,
        keys: Option<&[String]>,
        range: TimeRange,
    ) -> ExportPlan {
        let mut series = Vec::new();
        let mut found_keys = std::collections::HashSet::new();
        for (index, device) in devices.iter().enumerate() {
            let mut device_keys: Vec<String> = store
                .latest(tenant, device.id)
                .into_iter()
                .map(|(key, _, _)| key)
                .filter(|key| keys.is_none_or(|keys| keys.contains(key)))
                .collect();
            device_keys.sort_unstable();
            device_keys.dedup();
            for key in device_keys {
                found_keys.insert(key.clone());
                series.push(PlannedSeries { device: index, key });
            }
        }

        let missing_keys = keys
            .unwrap_or_default()
            .iter()
            .filter(|key| !found_keys.contains(*key))
            .cloned()
            .collect();
        ExportPlan {
            tenant,
            devices,
            series,
            range,
            missing_keys,
        }
    }
}

/// Row, series and byte counts of a finished export.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExportSummary {
    pub rows: u64,
    /// Devices with at least one exported row.
    pub devices: u64,
    /// Series with at least one exported row.
    pub series: u64,
    /// Bytes of the output file.
    pub bytes: u64,
    pub elapsed: Duration,
}

impl ExportSummary {
    pub fn rows_per_second(&self) -> f64 {
        self.rows as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The columns of a series that are the same in each of its rows.
pub struct SeriesColumns<'a> {
    pub device_id: &'a str,
    pub device: &'a str,
    pub key: &'a str,
}

/// Encoder of one output format.
trait RowWriter {
    fn write_points(
        &mut self,
        series: &SeriesColumns<'_>,
        points: &[(TimestampNs, Value)],
    ) -> Result<(), ExportError>;
}

/// Writes the rows of `plan` to `output` and returns the summary with the
/// writer. `cancel` stops the export between two pages. Blocks on the store
/// and on `output`, so async callers use `spawn_blocking`.
pub fn write_export<W: Write + Send>(
    store: &dyn TimeSeriesStore,
    plan: &ExportPlan,
    format: Format,
    output: W,
    cancel: &AtomicBool,
) -> Result<(ExportSummary, W), ExportError> {
    let started = Instant::now();
    let output = CountingWriter::new(output);

    let (mut summary, output) = match format {
        Format::Csv => {
            let mut writer = csv::CsvWriter::new(output)?;
            let summary = copy_rows(store, plan, &mut writer, cancel)?;
            (summary, writer.finish()?)
        }
        #[cfg(feature = "export")]
        Format::Parquet => {
            let mut writer = parquet::ParquetWriter::new(output)?;
            let summary = copy_rows(store, plan, &mut writer, cancel)?;
            (summary, writer.finish()?)
        }
        #[cfg(not(feature = "export"))]
        Format::Parquet => return Err(ExportError::ParquetUnsupported),
    };

    summary.bytes = output.bytes;
    summary.elapsed = started.elapsed();
    Ok((summary, output.inner))
}

/// Reads every planned series page by page and hands the points to `writer`.
fn copy_rows(
    store: &dyn TimeSeriesStore,
    plan: &ExportPlan,
    writer: &mut impl RowWriter,
    cancel: &AtomicBool,
) -> Result<ExportSummary, ExportError> {
    let mut summary = ExportSummary::default();
    let mut last_device_with_rows = None;

    for planned in &plan.series {
        let device = &plan.devices[planned.device];
        let device_id = device.id.to_string();
        let columns = SeriesColumns {
            device_id: &device_id,
            device: &device.name,
            key: &planned.key,
        };
        let series = Series::new(plan.tenant, device.id, &planned.key);

        let mut after = None;
        let mut series_rows = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(ExportError::Cancelled);
            }
            let page = store.range(series, plan.range.start, plan.range.end, after, PAGE_POINTS)?;
            let Some(&(last, _)) = page.points.last() else {
                break;
            };
            writer.write_points(&columns, &page.points)?;
            series_rows += page.points.len() as u64;
            after = Some(last);
            if !page.has_more {
                break;
            }
        }

        if series_rows > 0 {
            summary.rows += series_rows;
            summary.series += 1;
            if last_device_with_rows != Some(planned.device) {
                summary.devices += 1;
                last_device_with_rows = Some(planned.device);
            }
        }
    }
    Ok(summary)
}

/// A writer that counts the bytes written through it.
struct CountingWriter<W> {
    inner: W,
    bytes: u64,
}

impl<W> CountingWriter<W> {
    fn new(inner: W) -> Self {
        Self { inner, bytes: 0 }
    }
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A scripted store for the tests of the command and the endpoint.
#[cfg(test)]
mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ferrite_core::{TimestampNs, Value};

    use super::{ExportPlan, TimeRange};
    use crate::ids::{DeviceId, TenantId};
    use crate::metadata::Device;
    use crate::store::{Bucket, RangePage, Series, StoreError, TimeSeriesStore};

    /// A store with one series that returns `pages` full pages and then
    /// fails, or ends after them when `fail` is false.
    pub struct ScriptedStore {
        pub pages: AtomicUsize,
        pub fail: bool,
    }

    impl TimeSeriesStore for ScriptedStore {
        fn write(
            &self,
            _: TenantId,
            _: DeviceId,
            _: &[(&str, TimestampNs, Value)],
        ) -> Result<(), StoreError> {
            Ok(())
        }

        fn pending_bytes(&self) -> usize {
            0
        }

        fn flush_threshold(&self) -> usize {
            usize::MAX
        }

        fn flush(&self, _: u64) -> Result<(), StoreError> {
            Ok(())
        }

        fn durable_marker(&self) -> u64 {
            0
        }

        fn latest(&self, _: TenantId, _: DeviceId) -> Vec<(String, TimestampNs, Value)> {
            vec![("level".to_owned(), 0, Value::Int(0))]
        }

        fn range(
            &self,
            _: Series<'_>,
            _: TimestampNs,
            _: TimestampNs,
            after: Option<TimestampNs>,
            limit: usize,
        ) -> Result<RangePage, StoreError> {
            let remaining = self.pages.load(Ordering::Relaxed);
            if remaining == 0 {
                if self.fail {
                    return Err(StoreError::InvalidArgument("injected read failure".into()));
                }
                return Ok(RangePage {
                    points: Vec::new(),
                    has_more: false,
                });
            }
            self.pages.store(remaining - 1, Ordering::Relaxed);
            let first = after.map_or(0, |after| after + 1);
            let points = (first..first + limit as i64)
                .map(|ts| (ts, Value::Int(ts)))
                .collect();
            Ok(RangePage {
                points,
                has_more: true,
            })
        }

        fn aggregate_buckets(
            &self,
            _: Series<'_>,
            _: &[(TimestampNs, TimestampNs)],
        ) -> Result<Vec<Bucket>, StoreError> {
            Ok(Vec::new())
        }

        fn rollup_tier_for(&self, _: &[(TimestampNs, TimestampNs)]) -> Option<i64> {
            None
        }

        fn rollup_intervals(&self) -> Vec<i64> {
            Vec::new()
        }

        fn compact(&self) -> Result<(), StoreError> {
            Ok(())
        }

        fn disk_usage(&self) -> (usize, u64) {
            (0, 0)
        }
    }

    /// Plans an export of one device with every key of `store`.
    pub fn plan(store: &dyn TimeSeriesStore) -> ExportPlan {
        let tenant = TenantId::new_random();
        let device = Device {
            id: DeviceId::new_random(),
            tenant_id: tenant,
            name: "tank".to_owned(),
            created_at: 0,
            last_seen_at: None,
            labels: Default::default(),
            profile_id: None,
            attributes: Default::default(),
        };
        ExportPlan::build(
            store,
            tenant,
            vec![device],
            None,
            TimeRange::new(None, None).unwrap(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_time_bound_accepts_millis_and_rfc3339() {
        let ms = parse_time_bound("start", "1714953600000").unwrap();
        let rfc3339 = parse_time_bound("start", "2024-05-06T00:00:00Z").unwrap();
        assert_eq!(ms.ns, rfc3339.ns);
        assert!(!ms.looks_like_seconds);
        assert!(
            parse_time_bound("start", "1714953600")
                .unwrap()
                .looks_like_seconds
        );
        let nanos = parse_time_bound("end", "2024-05-06T00:00:00.000000001+02:00").unwrap();
        assert_eq!(nanos.ns, rfc3339.ns - 2 * 3_600_000_000_000 + 1);
    }

    #[test]
    fn parse_time_bound_names_bad_value() {
        let error = parse_time_bound("end", "yesterday").unwrap_err();
        assert!(error.contains("end"), "{error}");
        assert!(error.contains("\"yesterday\""), "{error}");
        let error = parse_time_bound("start", "99999999999999999").unwrap_err();
        assert!(error.contains("outside the supported range"), "{error}");
    }

    #[test]
    fn time_range_rejects_empty_range() {
        assert!(TimeRange::new(Some(5), Some(5)).is_err());
        assert!(TimeRange::new(Some(6), Some(5)).is_err());
        assert_eq!(
            TimeRange::new(None, None).unwrap(),
            TimeRange {
                start: MIN_TIMESTAMP_NS,
                end: i64::MAX
            }
        );
    }

    #[test]
    fn format_from_extension() {
        use std::path::Path;
        assert_eq!(
            Format::from_extension(Path::new("a/b.parquet")),
            Some(Format::Parquet)
        );
        assert_eq!(
            Format::from_extension(Path::new("b.PQ")),
            Some(Format::Parquet)
        );
        assert_eq!(
            Format::from_extension(Path::new("b.csv")),
            Some(Format::Csv)
        );
        assert_eq!(Format::from_extension(Path::new("b.txt")), None);
        assert_eq!(Format::from_extension(Path::new("b")), None);
    }
}
