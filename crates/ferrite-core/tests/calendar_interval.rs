//! Tests of interval text: parsing, canonical display and nominal lengths.

use ferrite_core::calendar::{CalendarUnit, Interval, IntervalProblem};

const SECOND_NS: i64 = 1_000_000_000;
const DAY_NS: i64 = 86_400 * SECOND_NS;

fn calendar(unit: CalendarUnit, count: u32) -> Interval {
    Interval::Calendar { unit, count }
}

#[test]
fn parse_accepts_fixed_units() {
    let cases = [
        ("1ns", Interval::Fixed(1)),
        ("250us", Interval::Fixed(250_000)),
        ("500ms", Interval::Fixed(500_000_000)),
        ("10s", Interval::Fixed(10 * SECOND_NS)),
        ("5m", Interval::Fixed(300 * SECOND_NS)),
        ("1h", Interval::Fixed(3_600 * SECOND_NS)),
        ("6h", Interval::Fixed(21_600 * SECOND_NS)),
        ("24h", Interval::Fixed(DAY_NS)),
        ("0010s", Interval::Fixed(10 * SECOND_NS)),
    ];
    for (text, expected) in cases {
        assert_eq!(Interval::parse(text), Ok(expected), "{text}");
    }
}

#[test]
fn parse_accepts_calendar_units() {
    let cases = [
        ("1d", calendar(CalendarUnit::Day, 1)),
        ("7d", calendar(CalendarUnit::Day, 7)),
        ("1w", calendar(CalendarUnit::Week, 1)),
        ("1mo", calendar(CalendarUnit::Month, 1)),
        ("3mo", calendar(CalendarUnit::Month, 3)),
        ("12mo", calendar(CalendarUnit::Month, 12)),
    ];
    for (text, expected) in cases {
        assert_eq!(Interval::parse(text), Ok(expected), "{text}");
        assert_eq!(text.parse::<Interval>(), Ok(expected), "{text}");
    }
}

#[test]
fn parse_rejects_invalid_text() {
    let cases = [
        ("", IntervalProblem::MissingNumber),
        ("h", IntervalProblem::MissingNumber),
        ("10", IntervalProblem::MissingUnit),
        ("0s", IntervalProblem::NotPositive),
        ("0mo", IntervalProblem::NotPositive),
        ("-5m", IntervalProblem::NotPositive),
        ("1.5h", IntervalProblem::InvalidNumber),
        ("+5m", IntervalProblem::InvalidNumber),
        (" 5m", IntervalProblem::InvalidNumber),
        ("5 m", IntervalProblem::InvalidNumber),
        ("5M", IntervalProblem::UnknownUnit),
        ("1y", IntervalProblem::UnknownUnit),
        ("1hour", IntervalProblem::UnknownUnit),
        ("5m ", IntervalProblem::UnknownUnit),
        ("1µs", IntervalProblem::UnknownUnit),
        ("1.5µs", IntervalProblem::InvalidNumber),
        ("2562048h", IntervalProblem::TooLong { max: 2_562_047 }),
        (
            "9223372036854775808ns",
            IntervalProblem::TooLong {
                max: i64::MAX as u64,
            },
        ),
        (
            "99999999999999999999999s",
            IntervalProblem::TooLong { max: 9_223_372_036 },
        ),
        ("106752d", IntervalProblem::TooLong { max: 106_751 }),
        ("15251w", IntervalProblem::TooLong { max: 15_250 }),
        ("3559mo", IntervalProblem::TooLong { max: 3_558 }),
        ("4294967296mo", IntervalProblem::TooLong { max: 3_558 }),
    ];
    for (text, expected) in cases {
        let error = Interval::parse(text).unwrap_err();
        assert_eq!(error.problem(), expected, "{text:?}");
        assert_eq!(error.input(), text);
    }
}

#[test]
fn parse_accepts_longest_intervals() {
    assert_eq!(
        Interval::parse("2562047h"),
        Ok(Interval::Fixed(2_562_047 * 3_600 * SECOND_NS))
    );
    assert_eq!(
        Interval::parse("9223372036854775807ns"),
        Ok(Interval::Fixed(i64::MAX))
    );
    assert_eq!(
        Interval::parse("3558mo"),
        Ok(calendar(CalendarUnit::Month, 3_558))
    );
}

#[test]
fn parse_error_messages_name_problem_and_forms() {
    let message = Interval::parse("0s").unwrap_err().to_string();
    assert_eq!(
        message,
        "invalid interval \"0s\": the number must be greater than zero; expected a whole \
         number greater than zero followed by a unit: ns, us, ms, s, m or h for fixed-length \
         buckets, or d, w or mo for calendar days, weeks or months (for example 500ms, 10s, \
         5m, 1h, 1d, 1w, 3mo)"
    );

    let message = Interval::parse("1y").unwrap_err().to_string();
    assert!(
        message.starts_with("invalid interval \"1y\": the unit is unknown; "),
        "{message}"
    );

    let message = Interval::parse("106752d").unwrap_err().to_string();
    assert!(
        message.contains("the interval is longer than the maximum of 106751d"),
        "{message}"
    );
}

#[test]
fn display_is_canonical() {
    let cases = [
        ("500ms", "500ms"),
        ("1000ms", "1s"),
        ("60m", "1h"),
        ("90m", "90m"),
        ("1500us", "1500us"),
        ("24h", "24h"),
        ("7d", "7d"),
        ("1w", "1w"),
        ("3mo", "3mo"),
    ];
    for (text, canonical) in cases {
        assert_eq!(
            Interval::parse(text).unwrap().to_string(),
            canonical,
            "{text}"
        );
    }
}

#[test]
fn display_round_trips() {
    let intervals = [
        Interval::Fixed(1),
        Interval::Fixed(1_001),
        Interval::Fixed(7 * SECOND_NS + 1),
        Interval::Fixed(i64::MAX),
        calendar(CalendarUnit::Day, 1),
        calendar(CalendarUnit::Week, 15_250),
        calendar(CalendarUnit::Month, 3_558),
    ];
    for interval in intervals {
        assert_eq!(
            Interval::parse(&interval.to_string()),
            Ok(interval),
            "{interval:?}"
        );
    }
}

#[test]
fn nominal_lengths() {
    assert_eq!(Interval::Fixed(5 * SECOND_NS).nominal_ns(), 5 * SECOND_NS);
    assert_eq!(calendar(CalendarUnit::Day, 1).nominal_ns(), DAY_NS);
    assert_eq!(calendar(CalendarUnit::Day, 7).nominal_ns(), 7 * DAY_NS);
    assert_eq!(calendar(CalendarUnit::Week, 1).nominal_ns(), 7 * DAY_NS);
    assert_eq!(calendar(CalendarUnit::Month, 3).nominal_ns(), 90 * DAY_NS);
    assert_eq!(
        calendar(CalendarUnit::Month, u32::MAX).nominal_ns(),
        i64::MAX
    );
}
