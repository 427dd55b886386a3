//! Property tests of bucket grids: for random ranges, intervals and time
//! zones, the buckets are contiguous, strictly increasing and cover the
//! range, calendar buckets start at local midnight or at a transition, and
//! `index_of` agrees with a linear scan.

use ferrite_core::TimestampNs;
use ferrite_core::calendar::{BucketGrid, CalendarUnit, GridError, Interval};
use jiff::Timestamp;
use jiff::civil::{Date, Time, Weekday};
use jiff::tz::TimeZone;
use proptest::prelude::*;

const SECOND_NS: i64 = 1_000_000_000;
const MAX_BUCKETS: usize = 2_000;

/// Zones with daylight saving time in both hemispheres, fractional offsets,
/// transitions at or across midnight, and a skipped day.
const ZONES: [&str; 14] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Sydney",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Pacific/Chatham",
    "America/Havana",
    "America/Moncton",
    "America/Toronto",
    "America/Santiago",
    "Asia/Beirut",
    "Antarctica/Casey",
    "Pacific/Apia",
];

fn interval() -> impl Strategy<Value = Interval> {
    let unit = prop_oneof![
        Just(CalendarUnit::Day),
        Just(CalendarUnit::Week),
        Just(CalendarUnit::Month),
    ];
    prop_oneof![
        prop::sample::select(vec![1, 15 * 60, 3_600, 5_400, 21_600, 86_400])
            .prop_map(|seconds: i64| Interval::Fixed(seconds * SECOND_NS)),
        (1..=100 * 86_400 * SECOND_NS).prop_map(Interval::Fixed),
        (unit, 1..=13u32).prop_map(|(unit, count)| Interval::Calendar { unit, count }),
    ]
}

/// An interval, a start between 1900 and 2100, and a range length of up to
/// 40 nominal intervals.
fn grid_request() -> impl Strategy<Value = (Interval, TimestampNs, i64)> {
    let first = ns("1900-01-01T00:00:00Z");
    let last = ns("2100-01-01T00:00:00Z");
    interval().prop_flat_map(move |interval| {
        let max_length = interval.nominal_ns().saturating_mul(40);
        (Just(interval), first..last, 1..=max_length)
    })
}

fn ns(rfc3339: &str) -> TimestampNs {
    let timestamp: Timestamp = rfc3339.parse().expect("valid RFC 3339 text");
    i64::try_from(timestamp.as_nanosecond()).expect("fits in i64")
}

/// Returns the bucket containing `ts` by scanning every bucket.
fn linear_index_of(grid: &BucketGrid, ts: TimestampNs) -> Option<usize> {
    grid.iter().position(|(start, end)| start <= ts && ts < end)
}

/// Checks that the buckets are non-empty, contiguous and strictly
/// increasing, that they cover `[start, end)` with the first containing
/// `start` and the last containing `end - 1`, and that `index_of` agrees with
/// a linear scan around every edge and at `probes`.
fn check_grid(
    grid: &BucketGrid,
    start: TimestampNs,
    end: TimestampNs,
    probes: &[TimestampNs],
) -> Result<(), TestCaseError> {
    let buckets: Vec<(TimestampNs, TimestampNs)> = grid.iter().collect();
    prop_assert!(!buckets.is_empty());
    prop_assert_eq!(buckets.len(), grid.len());

    for (index, &(bucket_start, bucket_end)) in buckets.iter().enumerate() {
        prop_assert!(bucket_start < bucket_end, "bucket {} is empty", index);
        prop_assert_eq!(grid.bucket(index), (bucket_start, bucket_end));
    }
    for pair in buckets.windows(2) {
        prop_assert_eq!(pair[0].1, pair[1].0, "buckets are not contiguous");
    }

    let (first_start, first_end) = buckets[0];
    prop_assert!(first_start <= start && start < first_end);
    let (last_start, last_end) = buckets[buckets.len() - 1];
    prop_assert!(last_start < end && end <= last_end);

    let mut points = probes.to_vec();
    points.extend([start, end - 1, end]);
    for &(bucket_start, bucket_end) in &buckets {
        points.extend([bucket_start, bucket_end]);
        points.extend(bucket_start.checked_sub(1));
        points.extend(bucket_start.checked_add(1));
        points.extend(bucket_end.checked_sub(1));
    }
    for ts in points {
        prop_assert_eq!(grid.index_of(ts), linear_index_of(grid, ts), "at {}", ts);
    }
    Ok(())
}

/// Checks that a calendar bucket starts at local midnight of a date aligned
/// to the interval, or else exactly at a time zone transition (a day whose
/// midnight a transition skipped).
fn check_calendar_start(
    interval: Interval,
    time_zone: &TimeZone,
    bucket_start: TimestampNs,
) -> Result<(), TestCaseError> {
    let Interval::Calendar { unit, count } = interval else {
        return Ok(());
    };
    let instant = Timestamp::from_nanosecond(i128::from(bucket_start)).expect("valid timestamp");
    let local = time_zone.to_datetime(instant);

    if local.time() != Time::midnight() {
        let previous = time_zone
            .preceding(
                instant
                    .checked_add(jiff::SignedDuration::from_nanos(1))
                    .unwrap(),
            )
            .next()
            .map(|transition| transition.timestamp());
        prop_assert_eq!(
            previous,
            Some(instant),
            "bucket start {} is neither midnight nor a transition",
            local
        );
        return Ok(());
    }

    let date = local.date();
    let count = i64::from(count);
    match unit {
        CalendarUnit::Day => {
            let days = date.duration_since(Date::constant(1970, 1, 1)).as_hours() / 24;
            prop_assert_eq!(days.rem_euclid(count), 0, "day bucket starts on {}", date);
        }
        CalendarUnit::Week => {
            prop_assert_eq!(date.weekday(), Weekday::Monday);
            let days = date.duration_since(Date::constant(1969, 12, 29)).as_hours() / 24;
            prop_assert_eq!(
                (days / 7).rem_euclid(count),
                0,
                "week bucket starts on {}",
                date
            );
        }
        CalendarUnit::Month => {
            prop_assert_eq!(date.day(), 1);
            let months = (i64::from(date.year()) - 1970) * 12 + i64::from(date.month()) - 1;
            prop_assert_eq!(
                months.rem_euclid(count),
                0,
                "month bucket starts on {}",
                date
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn grids_cover_range(
        (interval, start, length) in grid_request(),
        zone in prop::sample::select(ZONES.to_vec()),
        offsets in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let end = start + length;
        let grid = match BucketGrid::new(interval, Some(zone), start, end, MAX_BUCKETS) {
            Ok(grid) => grid,
            Err(GridError::TooManyBuckets { .. }) => return Ok(()),
            Err(error) => return Err(TestCaseError::fail(error.to_string())),
        };

        // Random probes from one bucket before the grid to one after it.
        let (first_start, _) = grid.bucket(0);
        let (_, last_end) = grid.bucket(grid.len() - 1);
        let margin = interval.nominal_ns();
        let span = (last_end - first_start + 2 * margin) as usize;
        let probes: Vec<TimestampNs> = offsets
            .iter()
            .map(|offset| first_start - margin + offset.index(span) as i64)
            .collect();
        check_grid(&grid, start, end, &probes)?;

        let time_zone = TimeZone::get(zone).expect("listed zones exist");
        for (bucket_start, _) in grid.iter() {
            check_calendar_start(interval, &time_zone, bucket_start)?;
        }
    }

    #[test]
    fn grids_near_range_ends_do_not_panic(
        interval in interval(),
        zone in prop::sample::select(ZONES.to_vec()),
        start in prop_oneof![any::<i64>(), i64::MIN..i64::MIN + 400 * 86_400 * SECOND_NS],
        length in prop_oneof![1..=i64::MAX, 1..=400 * 86_400 * SECOND_NS],
        from_end in any::<bool>(),
    ) {
        // Either [start, start + length) or [end - length, end) with end
        // near i64::MAX, clipped to the i64 range.
        let (start, end) = if from_end {
            let end = i64::MAX - start.rem_euclid(400 * 86_400 * SECOND_NS);
            (end.saturating_sub(length), end)
        } else {
            (start, start.saturating_add(length))
        };
        prop_assume!(start < end);

        match BucketGrid::new(interval, Some(zone), start, end, MAX_BUCKETS) {
            Ok(grid) => check_grid(&grid, start, end, &[i64::MIN, i64::MAX])?,
            Err(GridError::TooManyBuckets { needed, .. }) => {
                prop_assert!(needed > MAX_BUCKETS as u64);
            }
            Err(GridError::OutOfRange { .. }) => {}
            Err(error) => return Err(TestCaseError::fail(error.to_string())),
        }
    }
}
