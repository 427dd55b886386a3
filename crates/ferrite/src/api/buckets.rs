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

/// Default of `max_points` when `interval=auto`.
pub const DEFAULT_AUTO_POINTS: usize = 1000;

/// The `interval` parameter: a given interval or `auto`.
#[derive(Debug, Clone, Copy)]
pub enum IntervalParam {
    Given(Interval),
    Auto,
}

impl IntervalParam {
    pub fn parse(text: &str) -> Result<IntervalParam, ApiError> {
        if text.trim() == "auto" {
            return Ok(IntervalParam::Auto);
        }
        parse_interval(text).map(IntervalParam::Given)
    }

    /// Returns the interval that a default `start` is aligned to.
    pub fn given(self) -> Option<Interval> {
        match self {
            IntervalParam::Given(interval) => Some(interval),
            IntervalParam::Auto => None,
        }
    }
}

/// Parses `max_points`: 1 to [`MAX_BUCKETS`].
pub fn parse_max_points(text: Option<&str>) -> Result<Option<usize>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BUCKETS).contains(&n) => Ok(Some(n)),
        _ => Err(ApiError::invalid_param(
            "max_points",
            format!("max_points must be a whole number from 1 to {MAX_BUCKETS}, got {text:?}"),
        )),
    }
}

/// Chooses the interval and builds the grid. With `interval=auto`, the
/// finest rollup interval (then a week, then a month) whose grid has at most
/// `max_points` buckets; with a given interval, a grid of more than
/// `max_points` buckets is an error.
pub fn plan(
    interval: IntervalParam,
    max_points: Option<usize>,
    tz: Option<&str>,
    start: TimestampNs,
    end: TimestampNs,
    tier_intervals: &[i64],
) -> Result<(Interval, Option<BucketGrid>), ApiError> {
    match interval {
        IntervalParam::Given(interval) => {
            let grid = grid(interval, tz, start, end)?;
            if let (Some(max), Some(grid)) = (max_points, &grid)
                && grid.len() > max
            {
                return Err(ApiError::invalid_param(
                    "max_points",
                    format!(
                        "interval {interval} makes {} buckets, more than max_points={max}; choose a longer interval, a shorter range, or interval=auto",
                        grid.len()
                    ),
                ));
            }
            Ok((interval, grid))
        }
        IntervalParam::Auto => {
            let max = max_points.unwrap_or(DEFAULT_AUTO_POINTS);
            let candidates = tier_intervals.iter().map(|ns| Interval::Fixed(*ns)).chain([
                Interval::Calendar {
                    unit: ferrite_core::calendar::CalendarUnit::Week,
                    count: 1,
                },
                Interval::Calendar {
                    unit: ferrite_core::calendar::CalendarUnit::Month,
                    count: 1,
                },
            ]);
            for candidate in candidates {
                match BucketGrid::new(candidate, tz, start, end, max) {
                    Ok(grid) => return Ok((candidate, Some(grid))),
                    Err(GridError::TooManyBuckets { .. }) => continue,
                    Err(GridError::EmptyRange { .. }) => {
                        return Ok((candidate, self::grid(candidate, tz, start, end)?));
                    }
                    Err(error) => return Err(grid_error(error)),
                }
            }
            Err(ApiError::invalid_param(
                "max_points",
                format!(
                    "even monthly buckets are more than max_points={max} over this range; raise max_points or shorten the range"
                ),
            ))
        }
    }
}

/// Name of the data that serves a query: `raw` or a rollup interval such as `1h`.
pub fn tier_name(tier: Option<i64>) -> String {
    const DAY_NS: i64 = 86_400_000_000_000;
    match tier {
        None => "raw".to_owned(),
        Some(ns) if ns % DAY_NS == 0 => format!("{}d", ns / DAY_NS),
        Some(ns) => Interval::Fixed(ns).to_string(),
    }
}

/// Builds the bucket grid of `[start, end)`, or `None` for an empty range.
pub fn grid(
    interval: Interval,
    tz: Option<&str>,
    start: TimestampNs,
    end: TimestampNs,
) -> Result<Option<BucketGrid>, ApiError> {
    if start == end {
        if let Some(name) = tz {
            // Still report an unknown zone name.
            BucketGrid::new(
                interval,
                Some(name),
                start,
                start.saturating_add(1),
                MAX_BUCKETS,
            )
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

/// Returns the grid's buckets clipped to `[start, end)`: the ranges the store
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_forms() {
        assert_eq!(
            parse_interval("3600000").unwrap(),
            Interval::Fixed(3_600_000_000_000)
        );
        assert_eq!(
            parse_interval("1h").unwrap(),
            Interval::Fixed(3_600_000_000_000)
        );
        assert!(matches!(
            parse_interval("1d").unwrap(),
            Interval::Calendar { .. }
        ));
        for bad in ["0", "-1000", "1x", ""] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
    }
}
