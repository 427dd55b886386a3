//! Golden tests of bucket grids: exact bucket edges for fixed and calendar
//! intervals, daylight saving time changes, midnight transitions and errors.
//!
//! Expected edges are written in RFC 3339 with the zone's local offset. They
//! were cross-checked against Python's `zoneinfo` module and the system time
//! zone database, independently of jiff.

use ferrite_core::calendar::{BucketGrid, CalendarUnit, GridError, Interval};
use ferrite_core::{MAX_TIMESTAMP_NS, MIN_TIMESTAMP_NS, TimestampNs};
use jiff::Timestamp;

const HOUR_NS: i64 = 3_600_000_000_000;
const DAY_NS: i64 = 24 * HOUR_NS;

/// Converts RFC 3339 text to nanoseconds since the epoch.
fn ns(rfc3339: &str) -> TimestampNs {
    let timestamp: Timestamp = rfc3339
        .parse()
        .unwrap_or_else(|error| panic!("invalid RFC 3339 text {rfc3339:?}: {error}"));
    i64::try_from(timestamp.as_nanosecond()).expect("test timestamps fit in i64")
}

/// Formats nanoseconds since the epoch as RFC 3339 in UTC.
fn utc(ns: TimestampNs) -> String {
    Timestamp::from_nanosecond(i128::from(ns))
        .expect("i64 nanoseconds are a valid jiff timestamp")
        .to_string()
}

fn grid(interval: &str, tz: Option<&str>, start: &str, end: &str) -> BucketGrid {
    let interval = Interval::parse(interval).expect("test intervals are valid");
    BucketGrid::new(interval, tz, ns(start), ns(end), 10_000)
        .unwrap_or_else(|error| panic!("grid {interval} in {tz:?} failed: {error}"))
}

/// Asserts that the grid's buckets run between consecutive `edges`, then
/// checks `index_of` around every edge.
fn assert_edges(grid: &BucketGrid, edges: &[&str]) {
    let expected: Vec<(String, String)> = edges
        .windows(2)
        .map(|pair| (utc(ns(pair[0])), utc(ns(pair[1]))))
        .collect();
    let actual: Vec<(String, String)> = grid
        .iter()
        .map(|(start, end)| (utc(start), utc(end)))
        .collect();
    assert_eq!(actual, expected);
    assert_eq!(grid.len(), edges.len() - 1);
    assert!(!grid.is_empty());
    assert_index_of_at_edges(grid);
}

/// Checks `index_of` at every bucket start (inclusive), at every bucket end
/// (exclusive) and one nanosecond on either side of each.
fn assert_index_of_at_edges(grid: &BucketGrid) {
    for (index, (start, end)) in grid.iter().enumerate() {
        assert_eq!(grid.index_of(start), Some(index), "start of bucket {index}");
        assert_eq!(
            grid.index_of(start + 1),
            Some(index),
            "start + 1 ns of bucket {index}"
        );
        assert_eq!(
            grid.index_of(end - 1),
            Some(index),
            "end - 1 ns of bucket {index}"
        );
        let after = if index + 1 < grid.len() {
            Some(index + 1)
        } else {
            None
        };
        assert_eq!(grid.index_of(end), after, "end of bucket {index}");

        let before = index.checked_sub(1);
        assert_eq!(
            grid.index_of(start - 1),
            before,
            "start - 1 ns of bucket {index}"
        );
    }
}

fn bucket_length(grid: &BucketGrid, index: usize) -> i64 {
    let (start, end) = grid.bucket(index);
    end - start
}

#[test]
fn hour_grid_utc() {
    let grid = grid("1h", None, "2024-01-01T00:30:00Z", "2024-01-01T03:00:00Z");
    assert_edges(
        &grid,
        &[
            "2024-01-01T00:00:00Z",
            "2024-01-01T01:00:00Z",
            "2024-01-01T02:00:00Z",
            "2024-01-01T03:00:00Z",
        ],
    );
}

#[test]
fn quarter_hour_grid_utc() {
    // The end is one nanosecond past 11:00, so the bucket that starts at
    // 11:00 is included.
    let grid = grid(
        "15m",
        Some("UTC"),
        "2024-06-30T10:07:00Z",
        "2024-06-30T11:00:00.000000001Z",
    );
    assert_edges(
        &grid,
        &[
            "2024-06-30T10:00:00Z",
            "2024-06-30T10:15:00Z",
            "2024-06-30T10:30:00Z",
            "2024-06-30T10:45:00Z",
            "2024-06-30T11:00:00Z",
            "2024-06-30T11:15:00Z",
        ],
    );
}

#[test]
fn fixed_grid_ignores_time_zone() {
    // Fixed intervals align to UTC hours, which are half hours in Kolkata.
    let grid = grid(
        "1h",
        Some("Asia/Kolkata"),
        "2024-01-01T05:45:00+05:30",
        "2024-01-01T07:00:00+05:30",
    );
    assert_edges(
        &grid,
        &[
            "2024-01-01T05:30:00+05:30",
            "2024-01-01T06:30:00+05:30",
            "2024-01-01T07:30:00+05:30",
        ],
    );
}

#[test]
fn fixed_grid_before_epoch() {
    let grid = grid(
        "500ms",
        None,
        "1969-12-31T23:59:59.250Z",
        "1970-01-01T00:00:00.600Z",
    );
    assert_edges(
        &grid,
        &[
            "1969-12-31T23:59:59Z",
            "1969-12-31T23:59:59.5Z",
            "1970-01-01T00:00:00Z",
            "1970-01-01T00:00:00.5Z",
            "1970-01-01T00:00:01Z",
        ],
    );
}

#[test]
fn berlin_days_across_spring_change() {
    let grid = grid(
        "1d",
        Some("Europe/Berlin"),
        "2024-03-30T12:00:00+01:00",
        "2024-04-01T12:00:00+02:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-03-30T00:00:00+01:00",
            "2024-03-31T00:00:00+01:00",
            "2024-04-01T00:00:00+02:00",
            "2024-04-02T00:00:00+02:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 1), 23 * HOUR_NS);
}

#[test]
fn berlin_days_across_autumn_change() {
    let grid = grid(
        "1d",
        Some("Europe/Berlin"),
        "2024-10-26T00:00:00+02:00",
        "2024-10-28T00:00:00+01:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-10-26T00:00:00+02:00",
            "2024-10-27T00:00:00+02:00",
            "2024-10-28T00:00:00+01:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 0), 24 * HOUR_NS);
    assert_eq!(bucket_length(&grid, 1), 25 * HOUR_NS);
}

#[test]
fn new_york_days_across_changes() {
    let spring = grid(
        "1d",
        Some("America/New_York"),
        "2024-03-10T00:00:00-05:00",
        "2024-03-10T23:00:00-04:00",
    );
    assert_edges(
        &spring,
        &["2024-03-10T00:00:00-05:00", "2024-03-11T00:00:00-04:00"],
    );
    assert_eq!(bucket_length(&spring, 0), 23 * HOUR_NS);

    let autumn = grid(
        "1d",
        Some("America/New_York"),
        "2024-11-02T18:00:00-04:00",
        "2024-11-04T00:00:00.000000001-05:00",
    );
    assert_edges(
        &autumn,
        &[
            "2024-11-02T00:00:00-04:00",
            "2024-11-03T00:00:00-04:00",
            "2024-11-04T00:00:00-05:00",
            "2024-11-05T00:00:00-05:00",
        ],
    );
    assert_eq!(bucket_length(&autumn, 1), 25 * HOUR_NS);
}

#[test]
fn kolkata_days() {
    let grid = grid(
        "1d",
        Some("Asia/Kolkata"),
        "2024-01-01T00:00:00+05:30",
        "2024-01-02T23:59:59+05:30",
    );
    assert_edges(
        &grid,
        &[
            "2024-01-01T00:00:00+05:30",
            "2024-01-02T00:00:00+05:30",
            "2024-01-03T00:00:00+05:30",
        ],
    );
    assert_eq!(utc(grid.bucket(0).0), "2023-12-31T18:30:00Z");
}

#[test]
fn berlin_weeks_start_on_monday() {
    // 2024-03-20 is a Wednesday, and the week of 2024-03-25 contains the
    // spring change, so it is one hour short.
    let grid = grid(
        "1w",
        Some("Europe/Berlin"),
        "2024-03-20T09:00:00+01:00",
        "2024-04-03T09:00:00+02:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-03-18T00:00:00+01:00",
            "2024-03-25T00:00:00+01:00",
            "2024-04-01T00:00:00+02:00",
            "2024-04-08T00:00:00+02:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 1), 7 * DAY_NS - HOUR_NS);
}

#[test]
fn sydney_months_of_2024() {
    // Southern hemisphere: summer time (+11) ends on 2024-04-07 and starts
    // again on 2024-10-06.
    let grid = grid(
        "1mo",
        Some("Australia/Sydney"),
        "2024-01-01T00:00:00+11:00",
        "2025-01-01T00:00:00+11:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-01-01T00:00:00+11:00",
            "2024-02-01T00:00:00+11:00",
            "2024-03-01T00:00:00+11:00",
            "2024-04-01T00:00:00+11:00",
            "2024-05-01T00:00:00+10:00",
            "2024-06-01T00:00:00+10:00",
            "2024-07-01T00:00:00+10:00",
            "2024-08-01T00:00:00+10:00",
            "2024-09-01T00:00:00+10:00",
            "2024-10-01T00:00:00+10:00",
            "2024-11-01T00:00:00+11:00",
            "2024-12-01T00:00:00+11:00",
            "2025-01-01T00:00:00+11:00",
        ],
    );
    // Leap February.
    assert_eq!(bucket_length(&grid, 1), 29 * DAY_NS);
    assert_eq!(bucket_length(&grid, 3), 30 * DAY_NS + HOUR_NS);
    assert_eq!(bucket_length(&grid, 9), 31 * DAY_NS - HOUR_NS);
}

#[test]
fn quarters_of_2024() {
    // Starts mid-quarter: the first bucket is the whole second quarter.
    let grid = grid(
        "3mo",
        Some("America/New_York"),
        "2024-05-15T00:00:00-04:00",
        "2025-01-01T00:00:00.000000001-05:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-04-01T00:00:00-04:00",
            "2024-07-01T00:00:00-04:00",
            "2024-10-01T00:00:00-04:00",
            "2025-01-01T00:00:00-05:00",
            "2025-04-01T00:00:00-04:00",
        ],
    );
}

#[test]
fn quarters_before_epoch() {
    let grid = grid("3mo", None, "1969-11-15T00:00:00Z", "1970-02-01T00:00:00Z");
    assert_edges(
        &grid,
        &[
            "1969-10-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "1970-04-01T00:00:00Z",
        ],
    );
}

#[test]
fn day_groups_count_from_1970() {
    // 7d buckets start on multiples of 7 days after 1970-01-01, a Thursday.
    let grid = grid("7d", None, "2024-01-01T00:00:00Z", "2024-01-10T00:00:00Z");
    assert_edges(
        &grid,
        &[
            "2023-12-28T00:00:00Z",
            "2024-01-04T00:00:00Z",
            "2024-01-11T00:00:00Z",
        ],
    );
    // Moving the range keeps the buckets it still covers.
    let shifted = crate::grid("7d", None, "2024-01-05T00:00:00Z", "2024-01-12T00:00:00Z");
    assert_eq!(shifted.bucket(0), grid.bucket(1));
}

#[test]
fn week_groups_count_from_monday_1969_12_29() {
    // 2024-01-01 is 2818 weeks after 1969-12-29, an even number, so a 2w
    // pair starts there.
    let grid = grid("2w", None, "2024-01-10T00:00:00Z", "2024-01-20T00:00:00Z");
    assert_edges(
        &grid,
        &[
            "2024-01-01T00:00:00Z",
            "2024-01-15T00:00:00Z",
            "2024-01-29T00:00:00Z",
        ],
    );
}

#[test]
fn havana_day_starts_after_midnight_gap() {
    // On 2024-03-10 clocks jump from 00:00 to 01:00, so the day starts at
    // 01:00 local time, the first instant after midnight that exists.
    let grid = grid(
        "1d",
        Some("America/Havana"),
        "2024-03-09T12:00:00-05:00",
        "2024-03-10T12:00:00-04:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-03-09T00:00:00-05:00",
            "2024-03-10T01:00:00-04:00",
            "2024-03-11T00:00:00-04:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 1), 23 * HOUR_NS);
}

#[test]
fn havana_day_starts_at_first_midnight() {
    // On 2024-11-03 clocks fall back from 01:00 to 00:00, so midnight occurs
    // twice and the day starts at the first occurrence (-04:00).
    let grid = grid(
        "1d",
        Some("America/Havana"),
        "2024-11-02T12:00:00-04:00",
        "2024-11-03T12:00:00-05:00",
    );
    assert_edges(
        &grid,
        &[
            "2024-11-02T00:00:00-04:00",
            "2024-11-03T00:00:00-04:00",
            "2024-11-04T00:00:00-05:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 1), 25 * HOUR_NS);
    // The second occurrence of midnight lies inside the day.
    assert_eq!(grid.index_of(ns("2024-11-03T00:00:00-05:00")), Some(1));
}

#[test]
fn toronto_day_starts_at_transition_inside_gap() {
    // On 1919-03-31 clocks jumped from 23:30 to 00:30, so midnight lies
    // inside the gap. The day starts at the transition (00:30 local), not at
    // jiff's compatible choice of 01:00.
    let grid = grid(
        "1d",
        Some("America/Toronto"),
        "1919-03-30T12:00:00-05:00",
        "1919-03-31T12:00:00-04:00",
    );
    assert_edges(
        &grid,
        &[
            "1919-03-30T00:00:00-05:00",
            "1919-03-31T00:30:00-04:00",
            "1919-04-01T00:00:00-04:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 0), 23 * HOUR_NS + HOUR_NS / 2);
}

#[test]
fn moncton_fall_back_across_midnight() {
    // On 2006-10-29 at 00:01 ADT (-03:00) clocks fell back to 23:01 AST
    // (-04:00) of 2006-10-28. The day 2006-10-29 starts at the first
    // midnight, and the instants that read 23:01 to 00:00 of 2006-10-28 a
    // second time belong to it.
    let grid = grid(
        "1d",
        Some("America/Moncton"),
        "2006-10-28T12:00:00-03:00",
        "2006-10-29T12:00:00-04:00",
    );
    assert_edges(
        &grid,
        &[
            "2006-10-28T00:00:00-03:00",
            "2006-10-29T00:00:00-03:00",
            "2006-10-30T00:00:00-04:00",
        ],
    );
    assert_eq!(bucket_length(&grid, 1), 25 * HOUR_NS);
    assert_eq!(grid.index_of(ns("2006-10-28T23:30:00-04:00")), Some(1));

    // A range that starts in the repeated hour begins with 2006-10-29.
    let repeated = crate::grid(
        "1d",
        Some("America/Moncton"),
        "2006-10-28T23:30:00-04:00",
        "2006-10-29T01:00:00-04:00",
    );
    assert_edges(
        &repeated,
        &["2006-10-29T00:00:00-03:00", "2006-10-30T00:00:00-04:00"],
    );
}

#[test]
fn apia_skipped_day_has_no_bucket() {
    // Samoa skipped 2011-12-30: clocks went from 2011-12-29 24:00 (-10:00)
    // to 2011-12-31 00:00 (+14:00).
    let grid = grid(
        "1d",
        Some("Pacific/Apia"),
        "2011-12-29T12:00:00-10:00",
        "2011-12-31T12:00:00+14:00",
    );
    assert_edges(
        &grid,
        &[
            "2011-12-29T00:00:00-10:00",
            "2011-12-31T00:00:00+14:00",
            "2012-01-01T00:00:00+14:00",
        ],
    );
}

#[test]
fn start_equal_to_end_is_rejected() {
    let start = ns("2024-01-01T00:00:00Z");
    let error = BucketGrid::new(Interval::Fixed(HOUR_NS), None, start, start, 100).unwrap_err();
    assert_eq!(error, GridError::EmptyRange { start, end: start });
    let message = error.to_string();
    assert!(message.contains("is not before end"), "{message}");
    assert!(message.contains("2024-01-01T00:00:00Z"), "{message}");
}

#[test]
fn start_after_end_is_rejected() {
    let start = ns("2024-01-02T00:00:00Z");
    let end = ns("2024-01-01T00:00:00Z");
    let interval = Interval::Calendar {
        unit: CalendarUnit::Day,
        count: 1,
    };
    let error = BucketGrid::new(interval, None, start, end, 100).unwrap_err();
    assert_eq!(error, GridError::EmptyRange { start, end });
}

#[test]
fn unknown_time_zone_is_rejected() {
    let start = ns("2024-01-01T00:00:00Z");
    for interval in [Interval::Fixed(HOUR_NS), Interval::parse("1d").unwrap()] {
        let error = BucketGrid::new(
            interval,
            Some("Europe/Atlantis"),
            start,
            start + DAY_NS,
            100,
        )
        .unwrap_err();
        assert_eq!(
            error,
            GridError::UnknownTimeZone {
                name: "Europe/Atlantis".to_owned()
            }
        );
        let message = error.to_string();
        assert!(message.contains("\"Europe/Atlantis\""), "{message}");
        assert!(message.contains("IANA time zone name"), "{message}");
    }
}

#[test]
fn too_many_buckets_is_rejected() {
    let start = ns("2024-01-01T00:00:00Z");
    let end = ns("2024-01-02T00:00:00Z");

    let error =
        BucketGrid::new(Interval::parse("1m").unwrap(), None, start, end, 1000).unwrap_err();
    assert_eq!(
        error,
        GridError::TooManyBuckets {
            interval: Interval::Fixed(60_000_000_000),
            needed: 1440,
            max: 1000,
        }
    );
    let message = error.to_string();
    assert!(message.contains("needs 1440 buckets of 1m"), "{message}");
    assert!(message.contains("maximum of 1000"), "{message}");
    assert!(
        message.contains("longer interval or a shorter time range"),
        "{message}"
    );

    // Exactly at the limit is accepted.
    let grid = BucketGrid::new(Interval::parse("1m").unwrap(), None, start, end, 1440).unwrap();
    assert_eq!(grid.len(), 1440);

    let year_end = ns("2025-01-01T00:00:00Z");
    let error = BucketGrid::new(
        Interval::parse("1d").unwrap(),
        Some("Europe/Berlin"),
        start,
        year_end,
        100,
    )
    .unwrap_err();
    // 2024-01-01T00:00Z is still 2024-01-01 in Berlin, and the last instant
    // of 2024 UTC is already 2025-01-01 there: 367 local days.
    assert!(
        matches!(
            error,
            GridError::TooManyBuckets {
                needed: 367,
                max: 100,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn nanosecond_grid_of_whole_range() {
    // 2^64 - 1 buckets: one more than the limit is rejected.
    let error =
        BucketGrid::new(Interval::Fixed(1), None, i64::MIN, i64::MAX, usize::MAX - 1).unwrap_err();
    assert_eq!(
        error,
        GridError::TooManyBuckets {
            interval: Interval::Fixed(1),
            needed: u64::MAX,
            max: usize::MAX - 1,
        }
    );

    // The grid itself is never materialized, so it can be built.
    let grid = BucketGrid::new(Interval::Fixed(1), None, i64::MIN, i64::MAX, usize::MAX).unwrap();
    assert_eq!(grid.len(), usize::MAX);
    assert_eq!(grid.bucket(0), (i64::MIN, i64::MIN + 1));
    assert_eq!(grid.bucket(usize::MAX - 1), (i64::MAX - 1, i64::MAX));
    assert_eq!(grid.index_of(i64::MIN), Some(0));
    assert_eq!(grid.index_of(i64::MAX - 1), Some(usize::MAX - 1));
    assert_eq!(grid.index_of(i64::MAX), None);
}

#[test]
fn invalid_interval_is_rejected() {
    let start = ns("2024-01-01T00:00:00Z");
    for interval in [
        Interval::Fixed(0),
        Interval::Fixed(-HOUR_NS),
        Interval::Calendar {
            unit: CalendarUnit::Month,
            count: 0,
        },
    ] {
        let error = BucketGrid::new(interval, None, start, start + 1, 100).unwrap_err();
        assert_eq!(error, GridError::InvalidInterval { interval });
    }
}

#[test]
fn edges_past_timestamp_range_are_rejected() {
    // The UTC day of the smallest storable timestamp began 12 minutes and
    // 43 seconds before i64::MIN nanoseconds.
    let day = Interval::parse("1d").unwrap();
    let error = BucketGrid::new(day, None, MIN_TIMESTAMP_NS, MIN_TIMESTAMP_NS + 1, 10).unwrap_err();
    assert_eq!(error, GridError::OutOfRange { interval: day });
    assert!(error.to_string().contains("1677-09-21T00:12:43.145224192Z"));

    // The hour of the largest storable timestamp ends after i64::MAX.
    let hour = Interval::parse("1h").unwrap();
    let error = BucketGrid::new(hour, None, MAX_TIMESTAMP_NS - 1, i64::MAX, 10).unwrap_err();
    assert_eq!(error, GridError::OutOfRange { interval: hour });

    let month = Interval::parse("1mo").unwrap();
    let error = BucketGrid::new(
        month,
        Some("Pacific/Kiritimati"),
        MAX_TIMESTAMP_NS - 1,
        i64::MAX,
        10,
    )
    .unwrap_err();
    assert_eq!(error, GridError::OutOfRange { interval: month });
}

#[test]
fn grids_near_timestamp_range_ends() {
    // The second of the smallest storable timestamp began before i64::MIN
    // nanoseconds, but the next second fits.
    let second = Interval::parse("1s").unwrap();
    let error =
        BucketGrid::new(second, None, MIN_TIMESTAMP_NS, MIN_TIMESTAMP_NS + 1, 10).unwrap_err();
    assert_eq!(error, GridError::OutOfRange { interval: second });

    let start = ns("1677-09-21T00:12:44Z");
    let grid = BucketGrid::new(second, None, start, start + 1, 10).unwrap();
    assert_edges(&grid, &["1677-09-21T00:12:44Z", "1677-09-21T00:12:45Z"]);
    assert_eq!(grid.index_of(i64::MIN), None);
    assert_eq!(grid.index_of(i64::MAX), None);

    // The last whole UTC day before the largest timestamp.
    let day = Interval::parse("1d").unwrap();
    let start = ns("2262-04-10T12:00:00Z");
    let grid = BucketGrid::new(day, None, start, ns("2262-04-11T00:00:00Z"), 10).unwrap();
    assert_edges(&grid, &["2262-04-10T00:00:00Z", "2262-04-11T00:00:00Z"]);
    assert_eq!(grid.index_of(i64::MIN), None);
    assert_eq!(grid.index_of(i64::MAX), None);
}
