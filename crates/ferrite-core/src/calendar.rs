//! Bucket grids for aggregate queries: the time buckets that a `GROUP BY`
//! interval splits a query range into.
//!
//! An [`Interval`] is either fixed-length (`500ms`, `10s`, `5m`, `1h`) or a
//! count of calendar units (`1d`, `7d`, `1w`, `1mo`, `3mo`). A [`BucketGrid`]
//! lists the half-open buckets `[start, end)` that one interval gives over one
//! query range, and finds the bucket of a timestamp by index.
//!
//! # Alignment rules
//!
//! - **Fixed intervals** start at multiples of the interval counted from the
//!   Unix epoch (1970-01-01T00:00:00Z), whatever the time zone. A `1h` grid
//!   therefore starts on UTC hours even in Asia/Kolkata (+05:30), and `24h`
//!   differs from `1d`. InfluxQL's `GROUP BY time()` likewise uses preset
//!   round-number boundaries that do not depend on the query range
//!   (InfluxDB documentation, "InfluxQL date and time functions"). The time
//!   zone name is still checked.
//! - **Days** run from local midnight to the next local midnight in the time
//!   zone (UTC when none is given). A day is therefore 23 or 25 hours long on
//!   a daylight saving time change day, or some other length where a zone
//!   changed its offset.
//! - **Weeks** start on Monday at local midnight (ISO 8601).
//! - **Months** start on the 1st at local midnight.
//! - **Counts above 1** group consecutive units counted from a fixed origin.
//!   A bucket therefore never depends on where the query range starts, and
//!   moving the range keeps the buckets it still covers. `Nd` counts days
//!   from 1970-01-01, `Nw` counts weeks from Monday 1969-12-29 (the Monday of
//!   the ISO week that contains 1970-01-01), and `Nmo` counts months from
//!   January 1970. Every count that divides 12 aligns to the calendar year:
//!   `3mo` gives quarters, `6mo` half years and `12mo` years.
//!   The origin is local, so `7d` starts on Thursdays (1970-01-01 was a
//!   Thursday) while `1w` starts on Mondays, and `2w` pairs do not follow
//!   the parity of ISO week numbers across years with 53 weeks.
//!
//! # Where local midnight is missing or repeated
//!
//! A local day starts at the earliest instant whose local time is at or
//! after its midnight.
//!
//! - When a transition skips midnight (a gap, as in America/Havana on
//!   2024-03-10, where clocks jump from 00:00 to 01:00), the day starts at
//!   the transition, the first instant that exists after midnight. This is
//!   jiff's [`Disambiguation::Later`](jiff::tz::Disambiguation::Later) (and
//!   `Compatible`) result whenever the gap begins exactly at midnight. When
//!   midnight lies inside a gap, as in America/Toronto on 1919-03-31
//!   (23:30 jumped to 00:30), `Later` would give 01:00 and the day starts at
//!   the transition (00:30) instead.
//! - When midnight occurs twice (a fold, as in America/Havana on 2024-11-03,
//!   where clocks fall back from 01:00 to 00:00), the day starts at the
//!   first occurrence: jiff's
//!   [`Disambiguation::Earlier`](jiff::tz::Disambiguation::Earlier). Where
//!   clocks fall back across midnight (America/Moncton on 2006-10-29, from
//!   00:01 to 23:01), the instants that read 23:01 to 00:00 of the previous
//!   date a second time belong to the new day, because each bucket is one
//!   contiguous span.
//! - A local date that a zone skipped entirely (Pacific/Apia skipped
//!   2011-12-30) yields no bucket.
//!
//! # Range of the grid
//!
//! The first bucket is the one that contains `start`, so it may begin before
//! `start`. The last is the one that contains `end - 1`, so it may end after
//! `end`. Every bucket edge must fit in a [`TimestampNs`]. A grid whose first
//! bucket would begin before `i64::MIN` ns (1677-09-21T00:12:43.145224192Z)
//! or whose last would end after `i64::MAX` ns
//! (2262-04-11T23:47:16.854775807Z) is rejected with
//! [`GridError::OutOfRange`].

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{SignedDuration, Timestamp};

use crate::TimestampNs;

const NANOS_PER_SECOND: i64 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;
const NANOS_PER_DAY: i64 = SECONDS_PER_DAY * NANOS_PER_SECOND;

/// Fixed-length units, longest first so that `Display` picks the longest
/// unit that divides an interval exactly.
const FIXED_UNITS: [(&str, i64); 6] = [
    ("h", 3_600 * NANOS_PER_SECOND),
    ("m", 60 * NANOS_PER_SECOND),
    ("s", NANOS_PER_SECOND),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

const ACCEPTED_FORMS: &str = "expected a whole number greater than zero \
    followed by a unit: ns, us, ms, s, m or h for fixed-length buckets, \
    or d, w or mo for calendar days, weeks or months \
    (for example 500ms, 10s, 5m, 1h, 1d, 1w, 3mo)";

/// Origin of day counting: day 0 of `Nd` grids.
const EPOCH_DATE: Date = Date::constant(1970, 1, 1);

/// Origin of week counting: the Monday of the ISO week that contains
/// 1970-01-01, so week 0 of `Nw` grids.
const EPOCH_MONDAY: Date = Date::constant(1969, 12, 29);

/// Year whose January is month 0 of `Nmo` grids.
const EPOCH_YEAR: i64 = 1970;

/// Length of the buckets that an aggregate query groups points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interval {
    /// Fixed length in nanoseconds, greater than zero. Buckets start at
    /// multiples of it counted from the Unix epoch.
    Fixed(i64),
    /// `count` consecutive calendar units (at least 1) in the grid's time
    /// zone.
    Calendar { unit: CalendarUnit, count: u32 },
}

/// Calendar unit of an [`Interval::Calendar`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CalendarUnit {
    /// From local midnight to the next local midnight.
    Day,
    /// Seven days starting on Monday (ISO 8601).
    Week,
    /// From the 1st of a month to the 1st of the next.
    Month,
}

impl CalendarUnit {
    /// Suffix of the unit in interval text.
    fn suffix(self) -> &'static str {
        match self {
            CalendarUnit::Day => "d",
            CalendarUnit::Week => "w",
            CalendarUnit::Month => "mo",
        }
    }

    /// Nominal length: a day is 24 hours, a week 7 days, a month 30 days.
    fn nominal_ns(self) -> i64 {
        match self {
            CalendarUnit::Day => NANOS_PER_DAY,
            CalendarUnit::Week => 7 * NANOS_PER_DAY,
            CalendarUnit::Month => 30 * NANOS_PER_DAY,
        }
    }

    /// Largest count whose nominal length fits in an `i64` of nanoseconds
    /// (106751 days, 15250 weeks or 3558 months).
    fn max_count(self) -> u64 {
        (i64::MAX / self.nominal_ns()) as u64
    }
}

impl Interval {
    /// Parses interval text: a whole number greater than zero followed by a
    /// unit. `ns`, `us`, `ms`, `s`, `m` and `h` give fixed intervals, while
    /// `d`, `w` and `mo` give calendar intervals.
    ///
    /// # Errors
    ///
    /// Returns an [`IntervalError`] when the number is missing, not a whole
    /// number, zero or negative, when the unit is missing or unknown, or when
    /// the interval is longer than an `i64` of nanoseconds (about 292 years).
    pub fn parse(text: &str) -> Result<Interval, IntervalError> {
        let unit_start = text.find(|c: char| c.is_alphabetic()).unwrap_or(text.len());
        let (number, unit) = text.split_at(unit_start);
        let error = |problem| IntervalError {
            input: text.to_owned(),
            problem,
        };

        if number.is_empty() {
            return Err(error(IntervalProblem::MissingNumber));
        }
        let count = parse_count(number).map_err(error)?;
        if unit.is_empty() {
            return Err(error(IntervalProblem::MissingUnit));
        }

        if let Some(&(_, unit_ns)) = FIXED_UNITS.iter().find(|(suffix, _)| *suffix == unit) {
            let max = (i64::MAX / unit_ns) as u64;
            if count > max {
                return Err(error(IntervalProblem::TooLong { max }));
            }
            return Ok(Interval::Fixed(count as i64 * unit_ns));
        }

        let unit = match unit {
            "d" => CalendarUnit::Day,
            "w" => CalendarUnit::Week,
            "mo" => CalendarUnit::Month,
            _ => return Err(error(IntervalProblem::UnknownUnit)),
        };
        let max = unit.max_count();
        if count > max {
            return Err(error(IntervalProblem::TooLong { max }));
        }
        Ok(Interval::Calendar {
            unit,
            count: count as u32,
        })
    }

    /// Returns the nominal length in nanoseconds, counting a day as 24 hours,
    /// a week as 7 days and a month as 30 days. It suits choosing a storage
    /// tier or estimating bucket counts, not computing bucket edges. It
    /// saturates at `i64::MAX` for a calendar count too large for
    /// [`Interval::parse`].
    pub fn nominal_ns(&self) -> i64 {
        match *self {
            Interval::Fixed(ns) => ns,
            Interval::Calendar { unit, count } => {
                i64::from(count).saturating_mul(unit.nominal_ns())
            }
        }
    }
}

/// Parses the number of an interval, which must be a whole number above 0.
/// A number above `u64::MAX` saturates so that the unit check still runs and
/// a known unit then reports the interval as too long.
fn parse_count(number: &str) -> Result<u64, IntervalProblem> {
    if number.starts_with('-') {
        return Err(IntervalProblem::NotPositive);
    }
    if !number.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(IntervalProblem::InvalidNumber);
    }
    // All digits, so parsing fails only when the value exceeds u64::MAX.
    let count = number.parse::<u64>().unwrap_or(u64::MAX);
    if count == 0 {
        return Err(IntervalProblem::NotPositive);
    }
    Ok(count)
}

impl FromStr for Interval {
    type Err = IntervalError;

    fn from_str(text: &str) -> Result<Interval, IntervalError> {
        Interval::parse(text)
    }
}

/// Writes the canonical text: the longest unit that divides a fixed interval
/// exactly (`90m` becomes `90m`, `60m` becomes `1h`) and the count and unit
/// of a calendar interval. `Interval::parse` reads it back to the same value
/// for every valid interval.
impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Interval::Fixed(ns) => {
                let (suffix, unit_ns) = FIXED_UNITS
                    .iter()
                    .find(|(_, unit_ns)| ns % unit_ns == 0)
                    .copied()
                    .unwrap_or(("ns", 1));
                write!(f, "{}{suffix}", ns / unit_ns)
            }
            Interval::Calendar { unit, count } => write!(f, "{count}{}", unit.suffix()),
        }
    }
}

/// Error of [`Interval::parse`]: the rejected text and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntervalError {
    input: String,
    problem: IntervalProblem,
}

/// Reason why [`Interval::parse`] rejected a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IntervalProblem {
    /// No number before the unit, or empty text.
    MissingNumber,
    /// The number is not made of ASCII digits only (a fraction, a sign or
    /// whitespace).
    InvalidNumber,
    /// The number is zero or negative.
    NotPositive,
    /// No unit after the number.
    MissingUnit,
    /// The unit is not one of `ns`, `us`, `ms`, `s`, `m`, `h`, `d`, `w`,
    /// `mo`.
    UnknownUnit,
    /// The interval is longer than an `i64` of nanoseconds. `max` is the
    /// largest count accepted for the unit.
    TooLong { max: u64 },
}

impl IntervalError {
    /// Returns the rejected text.
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Returns the reason the text was rejected.
    pub fn problem(&self) -> IntervalProblem {
        self.problem
    }
}

impl fmt::Display for IntervalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid interval {:?}: ", self.input)?;
        match self.problem {
            IntervalProblem::MissingNumber => f.write_str("the number is missing")?,
            IntervalProblem::InvalidNumber => f.write_str("the number is not a whole number")?,
            IntervalProblem::NotPositive => f.write_str("the number must be greater than zero")?,
            IntervalProblem::MissingUnit => f.write_str("the unit is missing")?,
            IntervalProblem::UnknownUnit => f.write_str("the unit is unknown")?,
            IntervalProblem::TooLong { max } => {
                let unit = self.input.trim_start_matches(|c: char| c.is_ascii_digit());
                write!(f, "the interval is longer than the maximum of {max}{unit}")?
            }
        }
        write!(f, "; {ACCEPTED_FORMS}")
    }
}

impl std::error::Error for IntervalError {}

/// Error of [`BucketGrid::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GridError {
    /// The query range `[start, end)` is empty because `start >= end`.
    EmptyRange {
        start: TimestampNs,
        end: TimestampNs,
    },
    /// A fixed interval of zero or fewer nanoseconds, or a calendar interval
    /// with a count of 0.
    InvalidInterval { interval: Interval },
    /// The time zone name is not in the IANA time zone database.
    UnknownTimeZone { name: String },
    /// The range needs more buckets than the caller allows.
    TooManyBuckets {
        interval: Interval,
        needed: u64,
        max: usize,
    },
    /// A bucket edge falls outside the range of [`TimestampNs`].
    OutOfRange { interval: Interval },
}

impl fmt::Display for GridError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GridError::EmptyRange { start, end } => write!(
                f,
                "invalid time range: start {} is not before end {}; \
                 the range is [start, end) and must not be empty",
                format_ns(*start),
                format_ns(*end),
            ),
            GridError::InvalidInterval { interval } => write!(
                f,
                "invalid interval {interval:?}: a fixed interval must be at least 1 ns \
                 and a calendar interval needs a count of at least 1",
            ),
            GridError::UnknownTimeZone { name } => write!(
                f,
                "unknown time zone {name:?}: expected an IANA time zone name \
                 such as \"UTC\", \"Europe/Berlin\" or \"America/New_York\"",
            ),
            GridError::TooManyBuckets {
                interval,
                needed,
                max,
            } => write!(
                f,
                "the time range needs {needed} buckets of {interval}, more than the maximum of \
                 {max}; use a longer interval or a shorter time range",
            ),
            GridError::OutOfRange { interval } => write!(
                f,
                "a bucket of {interval} around this time range would begin before \
                 1677-09-21T00:12:43.145224192Z or end after 2262-04-11T23:47:16.854775807Z, \
                 the limits of nanosecond timestamps; use a shorter interval or a time range \
                 further from these limits",
            ),
        }
    }
}

impl std::error::Error for GridError {}

/// Formats nanoseconds since the epoch as RFC 3339 in UTC.
fn format_ns(ns: TimestampNs) -> String {
    match Timestamp::from_nanosecond(i128::from(ns)) {
        Ok(timestamp) => timestamp.to_string(),
        Err(_) => format!("{ns} ns"),
    }
}

/// The buckets that one interval gives over one query range.
///
/// Buckets are half-open `[start, end)`, contiguous and strictly increasing,
/// and together they cover the query range. A grid always has at least one
/// bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketGrid {
    interval: Interval,
    layout: Layout,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// `len` buckets of `step` ns, the first starting at `first_start`.
    /// Construction checked that `first_start + len * step` fits in an i64.
    Uniform {
        first_start: TimestampNs,
        step: i64,
        len: usize,
    },
    /// Bucket `i` is `[edges[i], edges[i + 1])`. The edges are strictly
    /// increasing and there are at least two.
    Edges(Vec<TimestampNs>),
}

impl BucketGrid {
    /// Builds the buckets covering `[start, end)` for `interval` in time zone
    /// `tz` (an IANA name, UTC when `None`). The module documentation gives
    /// the alignment rules.
    ///
    /// # Errors
    ///
    /// - [`GridError::InvalidInterval`] for `Fixed(ns)` with `ns <= 0` or a
    ///   calendar count of 0.
    /// - [`GridError::EmptyRange`] when `start >= end`.
    /// - [`GridError::UnknownTimeZone`] when `tz` names no known zone, also
    ///   for fixed intervals, which ignore the zone.
    /// - [`GridError::TooManyBuckets`] when more than `max_buckets` buckets
    ///   would be needed. For calendar intervals the count includes calendar
    ///   periods that a zone skipped entirely and that yield no bucket.
    /// - [`GridError::OutOfRange`] when a bucket edge does not fit in a
    ///   [`TimestampNs`].
    pub fn new(
        interval: Interval,
        tz: Option<&str>,
        start: TimestampNs,
        end: TimestampNs,
        max_buckets: usize,
    ) -> Result<BucketGrid, GridError> {
        let valid = match interval {
            Interval::Fixed(ns) => ns > 0,
            Interval::Calendar { count, .. } => count > 0,
        };
        if !valid {
            return Err(GridError::InvalidInterval { interval });
        }
        if start >= end {
            return Err(GridError::EmptyRange { start, end });
        }
        let time_zone = match tz {
            None => TimeZone::UTC,
            Some(name) => TimeZone::get(name).map_err(|_| GridError::UnknownTimeZone {
                name: name.to_owned(),
            })?,
        };

        let layout = match interval {
            Interval::Fixed(step) => uniform_layout(interval, step, start, end, max_buckets)?,
            Interval::Calendar { unit, count } => {
                let calendar = LocalCalendar {
                    time_zone: &time_zone,
                    unit,
                    count: i64::from(count),
                };
                calendar.edge_layout(interval, start, end, max_buckets)?
            }
        };
        Ok(BucketGrid { interval, layout })
    }

    /// Returns the interval the grid was built for.
    pub fn interval(&self) -> Interval {
        self.interval
    }

    /// Returns the number of buckets, at least 1.
    pub fn len(&self) -> usize {
        match &self.layout {
            Layout::Uniform { len, .. } => *len,
            Layout::Edges(edges) => edges.len() - 1,
        }
    }

    /// Returns false: a grid always has at least one bucket.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns bucket `index` as `(start, end)`, start inclusive and end
    /// exclusive.
    ///
    /// # Panics
    ///
    /// Panics when `index >= self.len()`.
    pub fn bucket(&self, index: usize) -> (TimestampNs, TimestampNs) {
        match &self.layout {
            Layout::Uniform {
                first_start,
                step,
                len,
            } => {
                assert!(
                    index < *len,
                    "bucket index {index} out of range for a grid of {len} buckets"
                );
                // Computed in i128 because index * step alone can exceed
                // i64::MAX. Both results fit in an i64 because construction
                // checked the end of the last bucket.
                let start = i128::from(*first_start) + index as i128 * i128::from(*step);
                (start as i64, (start + i128::from(*step)) as i64)
            }
            Layout::Edges(edges) => (edges[index], edges[index + 1]),
        }
    }

    /// Returns the index of the bucket that contains `ts`, or `None` when
    /// `ts` lies before the first bucket or at or after the end of the last.
    /// Takes O(1) time for fixed intervals and O(log n) for calendar ones.
    pub fn index_of(&self, ts: TimestampNs) -> Option<usize> {
        match &self.layout {
            Layout::Uniform {
                first_start,
                step,
                len,
            } => {
                if ts < *first_start {
                    return None;
                }
                // i128 because ts - first_start can exceed i64::MAX.
                let index = (i128::from(ts) - i128::from(*first_start)) / i128::from(*step);
                usize::try_from(index).ok().filter(|index| index < len)
            }
            Layout::Edges(edges) => {
                let last_end = *edges.last()?;
                if ts < edges[0] || ts >= last_end {
                    return None;
                }
                Some(edges.partition_point(|&edge| edge <= ts) - 1)
            }
        }
    }

    /// Iterates over the buckets in time order as `(start, end)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (TimestampNs, TimestampNs)> + '_ {
        (0..self.len()).map(|index| self.bucket(index))
    }
}

/// Lays out a fixed interval of `step` ns aligned to multiples of `step`
/// from the Unix epoch.
fn uniform_layout(
    interval: Interval,
    step: i64,
    start: TimestampNs,
    end: TimestampNs,
    max_buckets: usize,
) -> Result<Layout, GridError> {
    let first = start.div_euclid(step);
    // end > start, so end - 1 cannot overflow.
    let last = (end - 1).div_euclid(step);

    // At most 2^64 - 1 buckets (step 1 over the whole i64 range).
    let needed = i128::from(last) - i128::from(first) + 1;
    let needed = u64::try_from(needed).unwrap_or(u64::MAX);
    check_bucket_count(interval, needed, max_buckets)?;

    let out_of_range = || GridError::OutOfRange { interval };
    let first_start = first.checked_mul(step).ok_or_else(out_of_range)?;
    last.checked_add(1)
        .and_then(|after_last| after_last.checked_mul(step))
        .ok_or_else(out_of_range)?;

    Ok(Layout::Uniform {
        first_start,
        step,
        len: needed as usize,
    })
}

fn check_bucket_count(interval: Interval, needed: u64, max: usize) -> Result<(), GridError> {
    if needed > max as u64 {
        return Err(GridError::TooManyBuckets {
            interval,
            needed,
            max,
        });
    }
    Ok(())
}

/// Calendar arithmetic for one time zone and one calendar interval.
///
/// Buckets are numbered by group: group `g` is the `count` consecutive units
/// that start `g * count` units after the origin of the unit (see the module
/// documentation), and groups before the origin have negative numbers.
struct LocalCalendar<'a> {
    time_zone: &'a TimeZone,
    unit: CalendarUnit,
    count: i64,
}

/// Failure of calendar arithmetic: a date or instant outside jiff's range
/// (years -9999 to 9999) or an overflowing group number. Both lie far outside
/// the range of a `TimestampNs`, so callers report `GridError::OutOfRange`.
struct OutsideCalendar;

impl LocalCalendar<'_> {
    fn edge_layout(
        &self,
        interval: Interval,
        start: TimestampNs,
        end: TimestampNs,
        max_buckets: usize,
    ) -> Result<Layout, GridError> {
        let out_of_range = |_: OutsideCalendar| GridError::OutOfRange { interval };
        let first = self.group_containing(start).map_err(out_of_range)?;
        let last = self.group_containing(end - 1).map_err(out_of_range)?;

        // i64 timestamps lie within 106752 days of 1970-01-01, so group
        // numbers are small and this cannot overflow.
        let needed = u64::try_from(last - first + 1).unwrap_or(u64::MAX);
        check_bucket_count(interval, needed, max_buckets)?;

        let mut edges: Vec<TimestampNs> = Vec::with_capacity(needed as usize + 1);
        for group in first..=last + 1 {
            let edge = self.group_start(group).map_err(out_of_range)?;
            let edge = i64::try_from(edge.as_nanosecond())
                .map_err(|_| GridError::OutOfRange { interval })?;
            // A group whose days the zone skipped entirely starts where the
            // next one starts and would be an empty bucket, so it is dropped.
            if edges.last().is_none_or(|&previous| edge > previous) {
                edges.push(edge);
            }
        }
        Ok(Layout::Edges(edges))
    }

    /// Returns the group whose span contains `ts`.
    fn group_containing(&self, ts: TimestampNs) -> Result<i64, OutsideCalendar> {
        let instant = Timestamp::from_nanosecond(i128::from(ts)).map_err(|_| OutsideCalendar)?;
        let local_date = self.time_zone.to_datetime(instant).date();
        let mut group = self.group_of_date(local_date);

        // The group of the local date starts at or before `instant`, because
        // a day starts at the earliest instant whose local time reaches its
        // midnight. It can end at or before `instant` too: when clocks fall
        // back across midnight, the instants that read the previous date a
        // second time already belong to the next day.
        while self.group_start(group + 1)? <= instant {
            group += 1;
        }
        Ok(group)
    }

    fn group_of_date(&self, date: Date) -> i64 {
        match self.unit {
            CalendarUnit::Day => days_since(EPOCH_DATE, date).div_euclid(self.count),
            CalendarUnit::Week => days_since(EPOCH_MONDAY, date).div_euclid(7 * self.count),
            CalendarUnit::Month => {
                let months =
                    (i64::from(date.year()) - EPOCH_YEAR) * 12 + i64::from(date.month()) - 1;
                months.div_euclid(self.count)
            }
        }
    }

    /// Returns the instant at which group `group` starts.
    fn group_start(&self, group: i64) -> Result<Timestamp, OutsideCalendar> {
        let first_unit = group.checked_mul(self.count).ok_or(OutsideCalendar)?;
        let first_date = match self.unit {
            CalendarUnit::Day => add_days(EPOCH_DATE, first_unit)?,
            CalendarUnit::Week => {
                let days = first_unit.checked_mul(7).ok_or(OutsideCalendar)?;
                add_days(EPOCH_MONDAY, days)?
            }
            CalendarUnit::Month => {
                let years = first_unit.div_euclid(12);
                let year = EPOCH_YEAR.checked_add(years).ok_or(OutsideCalendar)?;
                let year = i16::try_from(year).map_err(|_| OutsideCalendar)?;
                let month = first_unit.rem_euclid(12) as i8 + 1;
                Date::new(year, month, 1).map_err(|_| OutsideCalendar)?
            }
        };
        self.day_start(first_date)
    }

    /// Returns the instant at which local date `date` starts: the earliest
    /// instant whose local time is at or after its midnight.
    fn day_start(&self, date: Date) -> Result<Timestamp, OutsideCalendar> {
        let midnight = date.to_datetime(Time::midnight());
        let ambiguous = self.time_zone.to_ambiguous_timestamp(midnight);
        let start = match ambiguous.offset() {
            // In a fold, the first occurrence of midnight.
            AmbiguousOffset::Unambiguous { .. } | AmbiguousOffset::Fold { .. } => {
                ambiguous.earlier()
            }
            AmbiguousOffset::Gap { .. } => {
                // Midnight read with the offset after the gap is an instant
                // before the transition, and the next transition after it is
                // the first instant after midnight that exists. `later()`
                // reads midnight with the offset before the gap, which lands
                // after the transition when the gap begins before midnight.
                let before_transition = ambiguous.earlier().map_err(|_| OutsideCalendar)?;
                match self.time_zone.following(before_transition).next() {
                    Some(transition) => Ok(transition.timestamp()),
                    None => ambiguous.later(),
                }
            }
        };
        start.map_err(|_| OutsideCalendar)
    }
}

/// Returns whole days from `origin` to `date`, negative when `date` is
/// earlier.
fn days_since(origin: Date, date: Date) -> i64 {
    // Civil days are exactly 24 hours long, so the division is exact.
    date.duration_since(origin).as_secs() / SECONDS_PER_DAY
}

fn add_days(date: Date, days: i64) -> Result<Date, OutsideCalendar> {
    let seconds = days.checked_mul(SECONDS_PER_DAY).ok_or(OutsideCalendar)?;
    date.checked_add(SignedDuration::from_secs(seconds))
        .map_err(|_| OutsideCalendar)
}
