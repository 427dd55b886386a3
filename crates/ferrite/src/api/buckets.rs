//! Bucket grids of aggregate queries: the `interval` and `tz` parameters,
//! and merging buckets of several series.
//!
//! Fixed intervals (`15m`, `1h`, or milliseconds) align to multiples of the
//! interval from the Unix epoch; calendar intervals (`1d`, `1w`, `1mo`)
//! align to local midnight, Monday and the first of the month in the time
//! zone `tz` (an IANA name, default UTC), so a day is 23 or 25 hours long
//! when daylight-saving time starts or ends. A bucket is labelled with its
//! aligned start but only counts points inside the query range.

use ferrite_core::TimestampNs;
use ferrite_core::calendar::{BucketGrid, GridError, Interval};

use super::ApiError;
use crate::store::Bucket;

/// Most buckets one query may return per series or group.
pub const MAX_BUCKETS: usize = 10_000;

/// Parses `interval`: milliseconds, or a unit form such as `15m`, `1h`,
/// `1d`, `1w`, `1mo`.
pub fn parse_interval(text: &str) -> Result<Interval, ApiError> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        if ms <= 0 {
            return Err(ApiError::invalid_param(
                "interval",
                format!("interval must be positive, got {ms}"),
            ));
        }
        return ms
            .checked_mul(1_000_000)
            .map(Interval::Fixed)
            .ok_or_else(|| ApiError::invalid_param("interval", "interval is too long"));
    }
    Interval::parse(text).map_err(|error| ApiError::invalid_param("interval", error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_forms() {
        assert_eq!(parse_interval("3600000").unwrap(), Interval::Fixed(3_600_000_000_000));
        assert_eq!(parse_interval("1h").unwrap(), Interval::Fixed(3_600_000_000_000));
        assert!(matches!(parse_interval("1d").unwrap(), Interval::Calendar { .. }));
        for bad in ["0", "-1000", "1x", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}

/// The bucket grid of `[start, end)`, or `None` for an empty range.
pub fn grid(
    interval: Interval,
    tz: Option<&str>,
    start: TimestampNs,
    end: TimestampNs,
) -> Result<Option<BucketGrid>, ApiError> {
    if start == end {
        if let Some(name) = tz {
            // Still report an unknown zone name.
            BucketGrid::new(interval, Some(name), start, start.saturating_add(1), MAX_BUCKETS)
                .map_err(grid_error)?;
        }
        return Ok(None);
    }
    BucketGrid::new(interval, tz, start, end, MAX_BUCKETS)
        .map(Some)
        .map_err(grid_error)
}

fn grid_error(error: GridError) -> ApiError {
    let param = match error {
        GridError::UnknownTimeZone { .. } => "tz",
        GridError::EmptyRange { .. } | GridError::OutOfRange { .. } => "start",
        _ => "interval",
    };
    ApiError::invalid_param(param, error.to_string())
}

/// The grid's buckets clipped to `[start, end)`: the ranges the store
/// aggregates. Labels come from [`BucketGrid::bucket`].
pub fn clipped_bounds(
    grid: &BucketGrid,
    start: TimestampNs,
    end: TimestampNs,
) -> Vec<(TimestampNs, TimestampNs)> {
    grid.iter()
        .map(|(bucket_start, bucket_end)| (bucket_start.max(start), bucket_end.min(end)))
        .collect()
}

/// Relabels buckets computed over [`clipped_bounds`] with the grid starts.
pub fn relabel(grid: &BucketGrid, buckets: &mut [Bucket]) {
    for (index, bucket) in buckets.iter_mut().enumerate() {
        bucket.start = grid.bucket(index).0;
    }
}

/// Adds the points summarised by `from` to `into` (same bucket, another
/// series).
pub fn merge_into(into: &mut Bucket, from: &Bucket) {
    into.count += from.count;
    into.numeric_count += from.numeric_count;
    into.sum = match (into.sum, from.sum) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    into.min = match (into.min, from.min) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    into.max = match (into.max, from.max) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    if let Some(first) = &from.first
        && into.first.as_ref().is_none_or(|current| first.0 < current.0)
    {
        into.first = Some(first.clone());
    }
    if let Some(last) = &from.last
        && into.last.as_ref().is_none_or(|current| last.0 > current.0)
    {
        into.last = Some(last.clone());
    }
}
