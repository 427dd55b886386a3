use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

use super::floats::FloatCoding;
use super::ints::IntCoding;
use super::*;

const SECOND: i64 = 1_000_000_000;

fn timestamps_round_trip(timestamps: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_timestamps(timestamps, &mut out);
    let decoded = decode_timestamps(&out, timestamps.len()).unwrap();
    assert_eq!(decoded, timestamps);
    out
}

fn floats_round_trip(values: &[f64]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_floats(values, &mut out);
    let decoded = decode_floats(&out, values.len()).unwrap();
    assert_bits_eq(&decoded, values);
    out
}

fn ints_round_trip(values: &[i64]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_ints(values, &mut out);
    assert_eq!(decode_ints(&out, values.len()).unwrap(), values);
    out
}

fn bools_round_trip(values: &[bool]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_bools(values, &mut out);
    assert_eq!(decode_bools(&out, values.len()).unwrap(), values);
    out
}

fn strings_round_trip(values: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_strings(values, &mut out);
    assert_eq!(decode_strings(&out, values.len()).unwrap(), values);
    out
}

fn assert_bits_eq(decoded: &[f64], expected: &[f64]) {
    assert_eq!(decoded.len(), expected.len());
    for (index, (got, want)) in decoded.iter().zip(expected).enumerate() {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "value {index}: decoded {got:e}, expected {want:e}"
        );
    }
}

/// Decodes `input` as every column type with `count`, so a test can check
/// that none of them panics.
fn decode_all(input: &[u8], count: usize) {
    let _ = decode_timestamps(input, count);
    let _ = decode_floats(input, count);
    let _ = decode_ints(input, count);
    let _ = decode_bools(input, count);
    let _ = decode_strings(input, count);
}

/// Regular 10 s sampling from `start`, skipping the points in `missing`.
fn sampled_every_10s(start: i64, count: usize, missing: &[usize]) -> Vec<i64> {
    (0..count)
        .filter(|index| !missing.contains(index))
        .map(|index| start + index as i64 * 10 * SECOND)
        .collect()
}

// Timestamps

#[test]
fn timestamps_empty_and_single() {
    assert_eq!(timestamps_round_trip(&[]), [MODE_EMPTY]);
    for ts in [
        0,
        -1,
        i64::MIN,
        i64::MAX - 1,
        i64::MAX,
        1_700_000_000 * SECOND,
    ] {
        assert_eq!(timestamps_round_trip(&[ts]).len(), 9, "timestamp {ts}");
    }
}

#[test]
fn timestamps_at_i64_extremes() {
    timestamps_round_trip(&[i64::MIN, i64::MAX]);
    timestamps_round_trip(&[i64::MIN, i64::MIN + 1, i64::MAX - 1]);
    timestamps_round_trip(&[i64::MIN, -1, 0, i64::MAX - 1]);
    timestamps_round_trip(&[i64::MAX - 3, i64::MAX - 2, i64::MAX - 1]);
    timestamps_round_trip(&[-5 * SECOND, -3 * SECOND, 0, 7]);
}

#[test]
fn timestamps_huge_delta_changes() {
    // Deltas that alternate between 1 and u64::MAX / 2 overflow a naive
    // i64 delta of delta.
    let half = i64::MAX / 2;
    let timestamps = [
        i64::MIN,
        i64::MIN + 1,
        i64::MIN + 1 + half,
        i64::MIN + 2 + half,
    ];
    timestamps_round_trip(&timestamps);
    timestamps_round_trip(&[i64::MIN, i64::MIN + 1, i64::MAX - 1, i64::MAX]);
}

#[test]
fn timestamps_regular_use_constant_delta() {
    let timestamps = sampled_every_10s(1_700_000_000 * SECOND, 8640, &[]);
    let encoded = timestamps_round_trip(&timestamps);
    // mode, first timestamp, gcd, constant mode, delta/gcd = 1.
    assert_eq!(encoded.len(), 1 + 8 + 5 + 1 + 1);
    assert_eq!(encoded[14], MODE_INT_CONSTANT);
}

#[test]
fn timestamps_with_gaps_stay_small() {
    let missing: Vec<usize> = (0..8640).filter(|index| index % 97 == 5).collect();
    let timestamps = sampled_every_10s(1_700_000_000 * SECOND, 8640, &missing);
    let encoded = timestamps_round_trip(&timestamps);
    assert!(
        encoded.len() < timestamps.len() / 10,
        "{} bytes for {} timestamps",
        encoded.len(),
        timestamps.len()
    );
}

#[test]
fn timestamps_with_jitter_round_trip() {
    let mut state = 7u64;
    let timestamps: Vec<i64> = (0..500)
        .map(|index| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            1_700_000_000 * SECOND + index * 10 * SECOND + (state >> 40) as i64 % 1000
        })
        .collect();
    timestamps_round_trip(&timestamps);
}

#[test]
fn timestamps_reject_non_ascending() {
    // Deltas column: first 100, gcd 1, constant delta 0.
    let mut input = vec![MODE_TS_DELTA];
    input.extend_from_slice(&100i64.to_le_bytes());
    input.extend_from_slice(&[1, MODE_INT_CONSTANT, 0]);
    let err = decode_timestamps(&input, 3).unwrap_err();
    assert!(err.to_string().contains("not above"), "{err}");
}

#[test]
fn timestamps_reject_overflow() {
    let mut input = vec![MODE_TS_DELTA];
    input.extend_from_slice(&(i64::MAX - 1).to_le_bytes());
    input.extend_from_slice(&[1, MODE_INT_CONSTANT, 4]);
    assert!(decode_timestamps(&input, 3).is_err());

    let mut input = vec![MODE_TS_DELTA];
    input.extend_from_slice(&0i64.to_le_bytes());
    input.extend_from_slice(&[0, MODE_INT_CONSTANT, 2]);
    assert!(decode_timestamps(&input, 2).is_err(), "gcd 0 accepted");
}

// Floats

#[test]
fn floats_empty_and_single() {
    assert_eq!(floats_round_trip(&[]), [MODE_EMPTY]);
    for value in [0.0, -0.0, 1.5, f64::MAX, f64::MIN, 5e-324, 45.12345] {
        floats_round_trip(&[value]);
    }
}

#[test]
fn floats_special_values_round_trip() {
    let values = [
        -0.0,
        0.0,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        f64::MIN_POSITIVE / 3.0,
        -5e-324,
        5e-324,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0 / 3.0,
        -0.0,
        f64::NAN,
        f64::from_bits(0x7ff0_0000_dead_beef),
        f64::from_bits(0xfff8_0000_0000_0001),
    ];
    floats_round_trip(&values);
    for coding in FloatCoding::ALL {
        let mut out = Vec::new();
        if floats::encode_as(&values, coding, &mut out) {
            assert_bits_eq(&decode_floats(&out, values.len()).unwrap(), &values);
        } else {
            assert_eq!(coding, FloatCoding::Decimal);
            assert!(out.is_empty());
        }
    }
}

#[test]
fn floats_negative_zero_disables_decimal() {
    let values = [1.5, -0.0, 2.5];
    let encoded = floats_round_trip(&values);
    assert_ne!(encoded[0], MODE_FLOAT_DECIMAL);
}

#[test]
fn floats_short_decimals_use_decimal_mode() {
    let values: Vec<f64> = ["45.12345", "45.12349", "45.1235", "-0.00001", "12"]
        .iter()
        .map(|text| text.parse().unwrap())
        .collect();
    let encoded = floats_round_trip(&values);
    assert_eq!(encoded[0], MODE_FLOAT_DECIMAL);
    assert_eq!(encoded[1], 5, "scale");

    let integers = [0.0, 359.0, 12.0, 4096.0];
    let encoded = floats_round_trip(&integers);
    assert_eq!(&encoded[..2], [MODE_FLOAT_DECIMAL, 0]);
}

#[test]
fn floats_inexact_decimals_fall_back() {
    // 0.1 + 0.2 is not the f64 nearest to any decimal of 17 digits or
    // fewer that this mode could store; it must still round-trip.
    let values = [0.1 + 0.2, 0.1, 1e300, 2.0f64.powi(60) + 4096.0];
    let encoded = floats_round_trip(&values);
    assert_ne!(encoded[0], MODE_FLOAT_DECIMAL);
}

#[test]
fn floats_every_coding_round_trips() {
    let values: Vec<f64> = (0..300)
        .map(|index| (index as f64 * 0.37).sin() * 1000.0)
        .collect();
    for coding in FloatCoding::ALL {
        let mut out = Vec::new();
        if floats::encode_as(&values, coding, &mut out) {
            assert_bits_eq(&decode_floats(&out, values.len()).unwrap(), &values);
        }
    }
}

#[test]
fn floats_xor_rejects_window_before_definition() {
    // First value 0.0, then control bits 1 (changed) and 0 (reuse window).
    let mut input = vec![MODE_FLOAT_XOR];
    input.extend_from_slice(&[0; 8]);
    input.push(0b01);
    let err = decode_floats(&input, 2).unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
}

// Integers

#[test]
fn ints_empty_and_single() {
    assert_eq!(ints_round_trip(&[]), [MODE_EMPTY]);
    for value in [0, 1, -1, i64::MIN, i64::MAX] {
        assert_eq!(ints_round_trip(&[value])[0], MODE_INT_CONSTANT);
    }
}

#[test]
fn ints_extremes_in_every_coding() {
    let values = [i64::MIN, i64::MAX, 0, -1, i64::MAX, i64::MIN, 1, i64::MIN];
    ints_round_trip(&values);
    for coding in IntCoding::ALL {
        let mut out = Vec::new();
        if ints::encode_as(&values, coding, &mut out) {
            assert_eq!(
                decode_ints(&out, values.len()).unwrap(),
                values,
                "{coding:?}"
            );
        } else {
            assert_eq!(coding, IntCoding::Constant);
        }
    }
}

#[test]
fn ints_choose_expected_modes() {
    let runs: Vec<i64> = (0..100).map(|index| index / 25 * 1000).collect();
    assert_eq!(ints_round_trip(&runs)[0], MODE_INT_RLE);

    let ramp: Vec<i64> = (0..100).map(|index| 5 + index * 3).collect();
    let encoded = ints_round_trip(&ramp);
    assert_eq!(encoded[0], MODE_INT_BITPACK);
    assert!(
        encoded.len() <= 8,
        "{} bytes for a linear ramp",
        encoded.len()
    );

    assert_eq!(ints_round_trip(&[7; 50]), [MODE_INT_CONSTANT, 14]);
}

#[test]
fn ints_gcd_scales_residuals() {
    let values: Vec<i64> = (0..40)
        .map(|index| (index * 7919 % 13) * 1_000_000)
        .collect();
    let encoded = ints_round_trip(&values);
    // 40 values of 4 bits each plus a short header.
    assert!(encoded.len() <= 30, "{} bytes", encoded.len());
}

#[test]
fn ints_reject_bad_bitpack_headers() {
    // Order 3 does not exist.
    assert!(decode_ints(&[MODE_INT_BITPACK, 3, 0, 0, 0], 5).is_err());
    // Width 65.
    assert!(decode_ints(&[MODE_INT_BITPACK, 0, 0, 1, 65, 0], 1).is_err());
    // 3 values of 8 bits need 3 bytes, 2 given.
    assert!(decode_ints(&[MODE_INT_BITPACK, 0, 0, 1, 8, 1, 2], 3).is_err());
    // Order 1 needs at least 2 values.
    assert!(decode_ints(&[MODE_INT_BITPACK, 1, 2, 0, 0, 0], 1).is_err());
}

#[test]
fn ints_reject_bad_runs() {
    // A run of 0.
    assert!(decode_ints(&[MODE_INT_RLE, 2, 0], 3).is_err());
    // A run longer than the count.
    assert!(decode_ints(&[MODE_INT_RLE, 2, 4], 3).is_err());
    // Runs that stop short of the count.
    assert!(decode_ints(&[MODE_INT_RLE, 2, 2], 3).is_err());
}

// Booleans

#[test]
fn bools_empty_and_single() {
    assert_eq!(bools_round_trip(&[]), [MODE_EMPTY]);
    assert_eq!(bools_round_trip(&[true]), [MODE_BOOL_BITMAP, 1]);
    assert_eq!(bools_round_trip(&[false]), [MODE_BOOL_BITMAP, 0]);
}

#[test]
fn bools_choose_runs_or_bitmap() {
    let runs: Vec<bool> = (0..1000).map(|index| index >= 400).collect();
    assert_eq!(
        bools_round_trip(&runs),
        [MODE_BOOL_RLE, 0, 0x90, 0x03, 0xd8, 0x04]
    );

    let alternating: Vec<bool> = (0..1001).map(|index| index % 2 == 0).collect();
    let encoded = bools_round_trip(&alternating);
    assert_eq!(encoded[0], MODE_BOOL_BITMAP);
    assert_eq!(encoded.len(), 1 + 126);
}

#[test]
fn bools_reject_invalid_columns() {
    assert!(
        decode_bools(&[MODE_BOOL_RLE, 2, 1], 1).is_err(),
        "first value 2"
    );
    assert!(
        decode_bools(&[MODE_BOOL_RLE, 0, 2], 1).is_err(),
        "run too long"
    );
    assert!(
        decode_bools(&[MODE_BOOL_RLE, 0, 1, 1], 1).is_err(),
        "trailing run"
    );
    assert!(
        decode_bools(&[MODE_BOOL_BITMAP, 0xff], 3).is_err(),
        "padding bits set"
    );
    assert!(
        decode_bools(&[MODE_BOOL_BITMAP, 0, 0], 3).is_err(),
        "extra byte"
    );
}

// Strings

#[test]
fn strings_empty_and_single() {
    assert_eq!(strings_round_trip(&[]), [MODE_EMPTY]);
    strings_round_trip(&["only"]);
    strings_round_trip(&[""]);
}

#[test]
fn strings_repeated_values_share_entries() {
    let values: Vec<&str> = (0..1000)
        .map(|index| ["idle", "driving", "loading", "ünïcødé ✓", ""][index / 100 % 5])
        .collect();
    let encoded = strings_round_trip(&values);
    assert_eq!(encoded[0], MODE_STR_DICT);
    assert!(encoded.len() < 80, "{} bytes", encoded.len());
}

#[test]
fn strings_all_distinct_round_trip() {
    let owned: Vec<String> = (0..300).map(|index| format!("value-{index}")).collect();
    let values: Vec<&str> = owned.iter().map(String::as_str).collect();
    strings_round_trip(&values);
}

#[test]
fn strings_reject_invalid_columns() {
    // Index 1 in a dictionary of one entry.
    let input = [MODE_STR_DICT, 1, 1, b'a', MODE_INT_CONSTANT, 2];
    assert!(decode_strings(&input, 2).is_err());
    // Entry that is not UTF-8.
    let input = [MODE_STR_DICT, 1, 1, 0xff, MODE_INT_CONSTANT, 0];
    assert!(decode_strings(&input, 1).is_err());
    // Negative index.
    let input = [MODE_STR_DICT, 1, 1, b'a', MODE_INT_CONSTANT, 1];
    assert!(decode_strings(&input, 1).is_err());
    // Empty dictionary.
    let input = [MODE_STR_DICT, 0, MODE_INT_CONSTANT, 0];
    assert!(decode_strings(&input, 1).is_err());
}

#[test]
fn strings_reject_expansion_past_limit() {
    // One entry of 1 MiB repeated 300 times exceeds 256 MiB of text.
    let mut input = vec![MODE_STR_DICT, 1];
    bits::put_uvarint(&mut input, 1 << 20);
    input.resize(input.len() + (1 << 20), b'x');
    input.extend_from_slice(&[MODE_INT_CONSTANT, 0]);
    let err = decode_strings(&input, 300).unwrap_err();
    assert!(err.to_string().contains("exceed"), "{err}");
}

// Damaged input

#[test]
fn decoders_reject_count_above_maximum() {
    let mut out = Vec::new();
    encode_ints(&[1, 2, 3], &mut out);
    let err = decode_ints(&out, MAX_COUNT + 1).unwrap_err();
    assert!(err.to_string().contains("maximum"), "{err}");
    assert!(decode_timestamps(&[MODE_EMPTY], usize::MAX).is_err());
}

#[test]
fn decoders_reject_wrong_counts_and_empty_input() {
    let mut columns: Vec<(&str, Vec<u8>, usize)> = Vec::new();
    let mut out = Vec::new();
    encode_timestamps(&sampled_every_10s(0, 100, &[3]), &mut out);
    columns.push(("timestamps", out, 99));
    let mut out = Vec::new();
    encode_floats(&[1.5, 2.25, -0.0], &mut out);
    columns.push(("floats", out, 3));

    for (name, encoded, count) in &columns {
        // A count a few values too large can decode from the zero bits
        // that pad the last byte, so only larger errors are checked.
        for wrong in [0, count - 1, count + 1000, MAX_COUNT] {
            let result = match *name {
                "timestamps" => decode_timestamps(encoded, wrong).map(|_| ()),
                _ => decode_floats(encoded, wrong).map(|_| ()),
            };
            assert!(result.is_err(), "{name} decoded with count {wrong}");
        }
    }
    for count in [0, 1, 5] {
        assert!(decode_timestamps(&[], count).is_err());
        assert!(decode_floats(&[], count).is_err());
        assert!(decode_ints(&[], count).is_err());
        assert!(decode_bools(&[], count).is_err());
        assert!(decode_strings(&[], count).is_err());
    }
}

/// Returns whether a column decodes with the count that the test expects.
type DecodesCheck = Box<dyn Fn(&[u8]) -> bool>;

#[test]
fn decoders_reject_every_truncation() {
    let timestamps = sampled_every_10s(1_700_000_000 * SECOND, 300, &[10, 200]);
    let floats: Vec<f64> = (0..300).map(|index| index as f64 * 0.1 + 0.05).collect();
    let xor_floats: Vec<f64> = (0..300).map(|index| (index as f64).sqrt()).collect();
    let ints: Vec<i64> = (0..300).map(|index| index * index - 50).collect();
    let bools: Vec<bool> = (0..300).map(|index| index % 3 == 0).collect();
    let strings: Vec<&str> = (0..300).map(|index| ["a", "bb"][index % 2]).collect();

    let mut cases: Vec<(&str, Vec<u8>, DecodesCheck)> = Vec::new();
    let mut out = Vec::new();
    encode_timestamps(&timestamps, &mut out);
    cases.push((
        "timestamps",
        out,
        Box::new(|input| decode_timestamps(input, 298).is_ok()),
    ));
    let mut out = Vec::new();
    encode_floats(&floats, &mut out);
    cases.push((
        "decimal floats",
        out,
        Box::new(|input| decode_floats(input, 300).is_ok()),
    ));
    let mut out = Vec::new();
    encode_floats(&xor_floats, &mut out);
    cases.push((
        "other floats",
        out,
        Box::new(|input| decode_floats(input, 300).is_ok()),
    ));
    let mut out = Vec::new();
    encode_ints(&ints, &mut out);
    cases.push((
        "ints",
        out,
        Box::new(|input| decode_ints(input, 300).is_ok()),
    ));
    let mut out = Vec::new();
    encode_bools(&bools, &mut out);
    cases.push((
        "bools",
        out,
        Box::new(|input| decode_bools(input, 300).is_ok()),
    ));
    let mut out = Vec::new();
    encode_strings(&strings, &mut out);
    cases.push((
        "strings",
        out,
        Box::new(|input| decode_strings(input, 300).is_ok()),
    ));

    for (name, encoded, decodes) in &cases {
        assert!(decodes(encoded), "{name}: full column does not decode");
        for len in 0..encoded.len() {
            assert!(
                !decodes(&encoded[..len]),
                "{name}: prefix of {len} bytes decodes"
            );
        }
        let mut longer = encoded.clone();
        longer.push(0);
        assert!(!decodes(&longer), "{name}: trailing byte accepted");
    }
}

#[test]
fn pco_columns_reject_trailing_bytes() {
    let values: Vec<i64> = (0..1000).map(|index| (index * 7919) % 1013).collect();
    let mut out = Vec::new();
    assert!(ints::encode_as(&values, IntCoding::Pco, &mut out));
    assert_eq!(decode_ints(&out, values.len()).unwrap(), values);
    out.push(0);
    assert!(decode_ints(&out, values.len()).is_err());
}

// Property tests

/// Test settings with `cases` cases, or as many as the `PROPTEST_CASES`
/// environment variable sets, for longer fuzzing runs.
fn proptest_config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/compress.txt",
        ))),
        ..ProptestConfig::default()
    }
}

/// Strictly ascending timestamps from a start and deltas, cut where the
/// next one would overflow.
fn ascending(start: i64, deltas: &[u64]) -> Vec<i64> {
    let mut timestamps = vec![start];
    for &delta in deltas {
        let last = *timestamps.last().unwrap();
        match last.checked_add_unsigned(delta.max(1)) {
            Some(next) => timestamps.push(next),
            None => break,
        }
    }
    timestamps
}

fn any_deltas() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(
        prop_oneof![
            1u64..100,
            Just(10_000_000_000u64),
            Just(20_000_000_000u64),
            any::<u64>(),
            (1u64..1 << 40)
        ],
        0..300,
    )
}

fn realistic_timestamps() -> impl Strategy<Value = Vec<i64>> {
    (
        0i64..2_000_000_000,
        prop::collection::vec(prop_oneof![20 => Just(1u64), 1 => 2u64..4], 0..400),
        prop::bool::ANY,
    )
        .prop_map(|(start_seconds, steps, jitter)| {
            let mut ts = start_seconds * SECOND;
            let mut timestamps = vec![ts];
            for (index, step) in steps.into_iter().enumerate() {
                ts += step as i64 * 10 * SECOND;
                let offset = if jitter {
                    (index as i64 * 7919) % 997
                } else {
                    0
                };
                timestamps.push(ts + offset);
            }
            timestamps
        })
}

/// Finite floats of every class: normal, subnormal, zeros of both signs.
fn any_finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => prop::num::f64::POSITIVE
            | prop::num::f64::NEGATIVE
            | prop::num::f64::NORMAL
            | prop::num::f64::SUBNORMAL
            | prop::num::f64::ZERO,
        1 => Just(f64::MAX),
        1 => Just(f64::MIN),
    ]
}

/// Decimal random walks as a logger prints them, parsed back from text.
fn realistic_floats() -> impl Strategy<Value = Vec<f64>> {
    (
        -1_000_000i64..1_000_000,
        0usize..7,
        prop::collection::vec(-500i64..=500, 0..400),
    )
        .prop_map(|(start, decimals, steps)| {
            let mut value = start;
            let mut values = Vec::with_capacity(steps.len());
            for step in steps {
                value += step;
                let text = format!(
                    "{:.*}",
                    decimals,
                    value as f64 / 10f64.powi(decimals as i32)
                );
                values.push(text.parse().unwrap());
            }
            values
        })
}

fn realistic_ints() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        prop::collection::vec(-3i64..=3, 0..400).prop_map(|steps| {
            steps
                .into_iter()
                .scan(1000i64, |value, step| {
                    *value += step;
                    Some(*value)
                })
                .collect()
        }),
        prop::collection::vec((0i64..5000, 1usize..40), 0..30).prop_map(|runs| {
            runs.into_iter()
                .flat_map(|(value, len)| std::iter::repeat_n(value, len))
                .collect()
        }),
    ]
}

proptest! {
    #![proptest_config(proptest_config(256))]

    #[test]
    fn timestamps_round_trip_any(start in any::<i64>(), deltas in any_deltas()) {
        timestamps_round_trip(&ascending(start, &deltas));
    }

    #[test]
    fn timestamps_round_trip_realistic(timestamps in realistic_timestamps()) {
        timestamps_round_trip(&timestamps);
    }

    #[test]
    fn floats_round_trip_any(values in prop::collection::vec(any_finite(), 0..300)) {
        floats_round_trip(&values);
    }

    #[test]
    fn floats_round_trip_realistic(values in realistic_floats()) {
        floats_round_trip(&values);
    }

    #[test]
    fn float_codings_round_trip(values in prop::collection::vec(any_finite(), 1..100)) {
        for coding in FloatCoding::ALL {
            let mut out = Vec::new();
            if floats::encode_as(&values, coding, &mut out) {
                assert_bits_eq(&decode_floats(&out, values.len()).unwrap(), &values);
            }
        }
    }

    #[test]
    fn ints_round_trip_any(values in prop::collection::vec(any::<i64>(), 0..300)) {
        ints_round_trip(&values);
    }

    #[test]
    fn ints_round_trip_realistic(values in realistic_ints()) {
        ints_round_trip(&values);
    }

    #[test]
    fn int_codings_round_trip(values in prop::collection::vec(any::<i64>(), 1..100)) {
        for coding in IntCoding::ALL {
            let mut out = Vec::new();
            if ints::encode_as(&values, coding, &mut out) {
                prop_assert_eq!(decode_ints(&out, values.len()).unwrap(), values.clone());
            }
        }
    }

    #[test]
    fn bools_round_trip_any(values in prop::collection::vec(any::<bool>(), 0..300)) {
        bools_round_trip(&values);
    }

    #[test]
    fn bools_round_trip_runs(runs in prop::collection::vec(1usize..200, 0..20)) {
        let values: Vec<bool> = runs
            .iter()
            .enumerate()
            .flat_map(|(index, &len)| std::iter::repeat_n(index % 2 == 0, len))
            .collect();
        bools_round_trip(&values);
    }

    #[test]
    fn strings_round_trip_any(values in prop::collection::vec(".{0,12}", 0..200)) {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        strings_round_trip(&values);
    }

    #[test]
    fn strings_round_trip_few_distinct(indexes in prop::collection::vec(0usize..4, 0..300)) {
        let values: Vec<&str> = indexes.iter().map(|&index| ["ok", "warn", "", "fail ✗"][index]).collect();
        strings_round_trip(&values);
    }
}

proptest! {
    #![proptest_config(proptest_config(2048))]

    #[test]
    fn random_bytes_never_panic(
        input in prop::collection::vec(any::<u8>(), 0..200),
        count in prop_oneof![0usize..20, 0usize..2000, Just(MAX_COUNT), any::<usize>()],
    ) {
        decode_all(&input, count);
    }

    #[test]
    fn random_bytes_after_mode_never_panic(
        mode in prop::sample::select(vec![
            MODE_EMPTY, MODE_INT_CONSTANT, MODE_INT_RLE, MODE_INT_BITPACK, MODE_INT_PCO,
            MODE_TS_DELTA, MODE_FLOAT_RAW, MODE_FLOAT_XOR, MODE_FLOAT_DECIMAL, MODE_FLOAT_PCO,
            MODE_BOOL_RLE, MODE_BOOL_BITMAP, MODE_STR_DICT,
        ]),
        body in prop::collection::vec(any::<u8>(), 0..200),
        count in prop_oneof![0usize..20, 0usize..2000, Just(MAX_COUNT)],
    ) {
        let mut input = vec![mode];
        input.extend_from_slice(&body);
        decode_all(&input, count);
    }
}

/// Columns of every mode, for the mutation test below.
fn sample_columns() -> Vec<(Vec<u8>, usize)> {
    let mut columns = Vec::new();
    let ints: Vec<i64> = (0..300).map(|index| (index * 7919) % 1013 - 500).collect();
    for coding in IntCoding::ALL {
        let mut out = Vec::new();
        if ints::encode_as(&ints, coding, &mut out) {
            columns.push((out, ints.len()));
        }
    }
    let floats: Vec<f64> = (0..300)
        .map(|index| (index as f64 * 0.3).cos() * 50.0)
        .collect();
    for coding in FloatCoding::ALL {
        let mut out = Vec::new();
        if floats::encode_as(&floats, coding, &mut out) {
            columns.push((out, floats.len()));
        }
    }
    let decimals: Vec<f64> = (0..300).map(|index| (index % 17) as f64 / 4.0).collect();
    let mut out = Vec::new();
    encode_floats(&decimals, &mut out);
    columns.push((out, decimals.len()));
    let mut out = Vec::new();
    encode_timestamps(&sampled_every_10s(0, 300, &[7, 8, 100]), &mut out);
    columns.push((out, 297));
    let mut out = Vec::new();
    encode_bools(
        &(0..300).map(|index| index % 5 == 0).collect::<Vec<_>>(),
        &mut out,
    );
    columns.push((out, 300));
    let mut out = Vec::new();
    encode_strings(
        &(0..300)
            .map(|index| ["x", "yz"][index % 3 / 2])
            .collect::<Vec<_>>(),
        &mut out,
    );
    columns.push((out, 300));
    columns
}

proptest! {
    #![proptest_config(proptest_config(2048))]

    #[test]
    fn mutated_columns_never_panic(
        column in prop::sample::select(sample_columns()),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let (mut input, count) = column;
        for (index, byte) in edits {
            let position = index.index(input.len());
            input[position] = byte;
        }
        if truncate {
            input.truncate(cut.index(input.len()));
        }
        decode_all(&input, count);
    }
}
