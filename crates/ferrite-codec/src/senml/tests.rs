use ciborium::Value as CborValue;
use ferrite_core::Value;

use super::fields::Number;
use super::resolve::seconds_to_nanos;
use super::*;

/// Receive time used as "now" in these tests: 2023-11-14T22:13:20Z.
const NOW_NS: i64 = 1_700_000_000_000_000_000;

const SECOND_NS: i64 = 1_000_000_000;

fn parse_json_ok(text: &str) -> Vec<Record> {
    parse_json(text.as_bytes(), NOW_NS).unwrap_or_else(|error| panic!("{text}: {error}"))
}

fn parse_json_error(text: &str) -> SenmlError {
    match parse_json(text.as_bytes(), NOW_NS) {
        Ok(records) => panic!("{text}: expected an error, got {records:?}"),
        Err(error) => error,
    }
}

fn parse_cbor_ok(payload: &[u8]) -> Vec<Record> {
    parse_cbor(payload, NOW_NS).unwrap_or_else(|error| panic!("{payload:02x?}: {error}"))
}

fn parse_cbor_error(payload: &[u8]) -> SenmlError {
    match parse_cbor(payload, NOW_NS) {
        Ok(records) => panic!("{payload:02x?}: expected an error, got {records:?}"),
        Err(error) => error,
    }
}

fn assert_message_contains(error: &SenmlError, fragment: &str) {
    assert!(
        error.message.contains(fragment),
        "message {:?} does not contain {fragment:?}",
        error.message
    );
}

/// Decodes a hex dump, ignoring whitespace.
fn from_hex(dump: &str) -> Vec<u8> {
    let digits: Vec<u8> = dump
        .bytes()
        .filter(|byte| !byte.is_ascii_whitespace())
        .collect();
    digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).expect("ASCII hex");
            u8::from_str_radix(text, 16).expect("hex digits")
        })
        .collect()
}

/// Encodes records given as CBOR map entries into a CBOR pack.
fn cbor_pack(records: Vec<Vec<(CborValue, CborValue)>>) -> Vec<u8> {
    let pack = CborValue::Array(records.into_iter().map(CborValue::Map).collect());
    let mut bytes = Vec::new();
    ciborium::ser::into_writer(&pack, &mut bytes).expect("CBOR encoding");
    bytes
}

fn label(key: i8) -> CborValue {
    CborValue::Integer(key.into())
}

fn text(value: &str) -> CborValue {
    CborValue::Text(value.to_owned())
}

fn record(full_name: &str, unit: Option<&str>, value: Value, ts_ns: Option<i64>) -> Record {
    Record {
        base_name: String::new(),
        name: full_name.to_owned(),
        unit: unit.map(str::to_owned),
        value,
        ts_ns,
        update_time_s: None,
    }
}

/// Compares records by full name, so that tests need not repeat how a name
/// was split between `bn` and `n`.
fn assert_resolved(records: &[Record], expected: &[Record]) {
    assert_eq!(records.len(), expected.len(), "{records:#?}");
    for (index, (actual, expected)) in records.iter().zip(expected).enumerate() {
        assert_eq!(actual.full_name(), expected.full_name(), "record {index}");
        assert_eq!(actual.unit, expected.unit, "record {index}");
        assert_eq!(actual.value, expected.value, "record {index}");
        assert_eq!(actual.ts_ns, expected.ts_ns, "record {index}");
        assert_eq!(
            actual.update_time_s, expected.update_time_s,
            "record {index}"
        );
    }
}

// RFC 8428 section 5.1.2, second example, which is also the CBOR example of
// section 6.
const RFC_CURRENTS_JSON: &str = r#"[
     {"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e+09,
      "bu":"A","bver":5,
      "n":"voltage","u":"V","v":120.1},
     {"n":"current","t":-5,"v":1.2},
     {"n":"current","t":-4,"v":1.3},
     {"n":"current","t":-3,"v":1.4},
     {"n":"current","t":-2,"v":1.5},
     {"n":"current","t":-1,"v":1.6},
     {"n":"current","v":1.7}
   ]"#;

const RFC_CURRENTS_CBOR_HEX: &str = "
    87 a7 21 78 1b 75 72 6e 3a 64 65 76 3a 6f 77 3a
    31 30 65 32 30 37 33 61 30 31 30 38 30 30 36 3a
    22 fb 41 d3 03 a1 5b 00 10 62 23 61 41 20 05 00
    67 76 6f 6c 74 61 67 65 01 61 56 02 fb 40 5e 06
    66 66 66 66 66 a3 00 67 63 75 72 72 65 6e 74 06
    24 02 fb 3f f3 33 33 33 33 33 33 a3 00 67 63 75
    72 72 65 6e 74 06 23 02 fb 3f f4 cc cc cc cc cc
    cd a3 00 67 63 75 72 72 65 6e 74 06 22 02 fb 3f
    f6 66 66 66 66 66 66 a3 00 67 63 75 72 72 65 6e
    74 06 21 02 f9 3e 00 a3 00 67 63 75 72 72 65 6e
    74 06 20 02 fb 3f f9 99 99 99 99 99 9a a3 00 67
    63 75 72 72 65 6e 74 06 00 02 fb 3f fb 33 33 33
    33 33 33";

fn rfc_currents_expected() -> Vec<Record> {
    let base_name = "urn:dev:ow:10e2073a0108006:";
    let bt_ns = 1_276_020_076_001_000_000;
    let current = |seconds_before: i64, value: f64| {
        record(
            &format!("{base_name}current"),
            Some("A"),
            Value::Float(value),
            Some(bt_ns - seconds_before * SECOND_NS),
        )
    };
    vec![
        record(
            &format!("{base_name}voltage"),
            Some("V"),
            Value::Float(120.1),
            Some(bt_ns),
        ),
        current(5, 1.2),
        current(4, 1.3),
        current(3, 1.4),
        current(2, 1.5),
        current(1, 1.6),
        current(0, 1.7),
    ]
}

#[test]
fn rfc_single_data_point() {
    // RFC 8428 section 5.1.1.
    let records = parse_json_ok(r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#);

    assert_eq!(
        records,
        vec![record(
            "urn:dev:ow:10e2073a01080063",
            Some("Cel"),
            Value::Float(23.1),
            None
        )]
    );
}

#[test]
fn rfc_data_points_without_time() {
    // RFC 8428 section 5.1.2, first example.
    let records = parse_json_ok(
        r#"[
  {"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
  {"n":"current","u":"A","v":1.2}
]"#,
    );

    assert_eq!(records[0].base_name, "urn:dev:ow:10e2073a01080063:");
    assert_eq!(records[0].name, "voltage");
    assert_eq!(records[1].base_name, "urn:dev:ow:10e2073a01080063:");
    assert_eq!(records[1].name, "current");
    assert_resolved(
        &records,
        &[
            record(
                "urn:dev:ow:10e2073a01080063:voltage",
                Some("V"),
                Value::Float(120.1),
                None,
            ),
            record(
                "urn:dev:ow:10e2073a01080063:current",
                Some("A"),
                Value::Float(1.2),
                None,
            ),
        ],
    );
}

#[test]
fn rfc_data_points_with_base_time() {
    // RFC 8428 section 5.1.2, second example: version 5, a base unit that
    // the first record overrides, and times relative to the base time.
    let records = parse_json_ok(RFC_CURRENTS_JSON);

    assert_resolved(&records, &rfc_currents_expected());
}

#[test]
fn rfc_cbor_example_matches_json() {
    // RFC 8428 section 6: the example of section 5.1.2 in CBOR, with a
    // half-precision float (f9 3e 00 = 1.5) among the doubles.
    let payload = from_hex(RFC_CURRENTS_CBOR_HEX);
    assert_eq!(payload.len(), 0xc3);

    let records = parse_cbor_ok(&payload);

    assert_resolved(&records, &rfc_currents_expected());
    assert_eq!(records, parse_json_ok(RFC_CURRENTS_JSON));
}

#[test]
fn rfc_sensml_stream_example() {
    // RFC 8428 section 5.1.2, third example, closed after the records the
    // RFC shows.
    let records = parse_json_ok(
        r#"[
     {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
      "bu":"%RH","v":21.2},
     {"t":10,"v":21.3},
     {"t":20,"v":21.4},
     {"t":30,"v":21.4},
     {"t":40,"v":21.5},
     {"t":50,"v":21.5},
     {"t":60,"v":21.5},
     {"t":70,"v":21.6},
     {"t":80,"v":21.7}
   ]"#,
    );

    let values = [21.2, 21.3, 21.4, 21.4, 21.5, 21.5, 21.5, 21.6, 21.7];
    let expected: Vec<Record> = values
        .iter()
        .zip((0..).step_by(10))
        .map(|(&value, offset_s): (&f64, i64)| {
            record(
                "urn:dev:ow:10e2073a01080063",
                Some("%RH"),
                Value::Float(value),
                Some((1_320_067_464 + offset_s) * SECOND_NS),
            )
        })
        .collect();
    assert_resolved(&records, &expected);
}

#[test]
fn rfc_measurements_match_resolved_form() {
    // RFC 8428 section 5.1.3 and its resolved form in section 5.1.4.
    let packed = parse_json_ok(
        r#"[
     {"bn":"urn:dev:ow:10e2073a01080063","bt":1.320067464e+09,
      "bu":"%RH","v":20},
     {"u":"lon","v":24.30621},
     {"u":"lat","v":60.07965},
     {"t":60,"v":20.3},
     {"u":"lon","t":60,"v":24.30622},
     {"u":"lat","t":60,"v":60.07965},
     {"t":120,"v":20.7},
     {"u":"lon","t":120,"v":24.30623},
     {"u":"lat","t":120,"v":60.07966},
     {"u":"%EL","t":150,"v":98},
     {"t":180,"v":21.2},
     {"u":"lon","t":180,"v":24.30628},
     {"u":"lat","t":180,"v":60.07967}
   ]"#,
    );
    let resolved = parse_json_ok(
        r#"[
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067464e+09,
      "v":20},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067464e+09,
      "v":24.30621},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067464e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067524e+09,
      "v":20.3},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067524e+09,
      "v":24.30622},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067524e+09,
      "v":60.07965},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067584e+09,
      "v":20.7},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067584e+09,
      "v":24.30623},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067584e+09,
      "v":60.07966},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%EL","t":1.320067614e+09,
      "v":98},
     {"n":"urn:dev:ow:10e2073a01080063","u":"%RH","t":1.320067644e+09,
      "v":21.2},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lon","t":1.320067644e+09,
      "v":24.30628},
     {"n":"urn:dev:ow:10e2073a01080063","u":"lat","t":1.320067644e+09,
      "v":60.07967}
   ]"#,
    );

    assert_eq!(packed.len(), 13);
    assert_resolved(&packed, &resolved);
    assert_eq!(packed[0].base_name, "urn:dev:ow:10e2073a01080063");
    assert_eq!(packed[0].name, "");
    assert_eq!(resolved[0].base_name, "");
    assert_eq!(resolved[0].name, "urn:dev:ow:10e2073a01080063");
    assert_eq!(
        packed[9],
        Record {
            base_name: "urn:dev:ow:10e2073a01080063".to_owned(),
            name: String::new(),
            unit: Some("%EL".to_owned()),
            value: Value::Float(98.0),
            ts_ns: Some(1_320_067_614 * SECOND_NS),
            update_time_s: None,
        }
    );
}

#[test]
fn rfc_multiple_data_types() {
    // RFC 8428 section 5.1.5.
    let records = parse_json_ok(
        r#"[
    {"bn":"urn:dev:ow:10e2073a01080063:","n":"temp","u":"Cel","v":23.1},
    {"n":"label","vs":"Machine Room"},
    {"n":"open","vb":false},
    {"n":"nfv-reader","vd":"aGkgCg"}
  ]"#,
    );

    let name = |suffix: &str| format!("urn:dev:ow:10e2073a01080063:{suffix}");
    assert_resolved(
        &records,
        &[
            record(&name("temp"), Some("Cel"), Value::Float(23.1), None),
            record(
                &name("label"),
                None,
                Value::Str("Machine Room".to_owned()),
                None,
            ),
            record(&name("open"), None, Value::Bool(false), None),
            record(
                &name("nfv-reader"),
                None,
                Value::Str("aGkgCg".to_owned()),
                None,
            ),
        ],
    );
}

#[test]
fn rfc_collection_of_resources() {
    // RFC 8428 section 5.1.6: the last record uses the base name of the
    // third record and the base time of the first.
    let records = parse_json_ok(
        r#"[
     {"bn":"2001:db8::2/","bt":1.320078429e+09,
      "n":"temperature","u":"Cel","v":25.2},
     {"n":"humidity","u":"%RH","v":30},
     {"bn":"2001:db8::1/","n":"temperature","u":"Cel","v":12.3},
     {"n":"humidity","u":"%RH","v":67}
   ]"#,
    );

    let ts_ns = Some(1_320_078_429 * SECOND_NS);
    assert_resolved(
        &records,
        &[
            record(
                "2001:db8::2/temperature",
                Some("Cel"),
                Value::Float(25.2),
                ts_ns,
            ),
            record(
                "2001:db8::2/humidity",
                Some("%RH"),
                Value::Float(30.0),
                ts_ns,
            ),
            record(
                "2001:db8::1/temperature",
                Some("Cel"),
                Value::Float(12.3),
                ts_ns,
            ),
            record(
                "2001:db8::1/humidity",
                Some("%RH"),
                Value::Float(67.0),
                ts_ns,
            ),
        ],
    );
}

#[test]
fn rfc_actuator_examples() {
    // RFC 8428 section 5.1.7. The first record of the thermostat example
    // has only a base name and produces no value.
    let thermostat = parse_json_ok(
        r#"[
     {"bn":"urn:dev:ow:10e2073a01080063:"},
     {"n":"temp","u":"Cel","v":23.1},
     {"n":"heat","u":"/","v":1},
     {"n":"fan","u":"/","v":0}
   ]"#,
    );
    let lights_on = parse_json_ok(
        r#"[
     {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":1},
     {"n":"2001:db8::4","v":1}
   ]"#,
    );
    let lights_off = parse_json_ok(
        r#"[
     {"bt":1.320078429e+09,"bu":"/","n":"2001:db8::3","v":0.5},
     {"n":"2001:db8::4","v":0.5},
     {"n":"2001:db8::3","t":0.1,"v":0},
     {"n":"2001:db8::4","t":0.1,"v":0}
   ]"#,
    );

    let name = |suffix: &str| format!("urn:dev:ow:10e2073a01080063:{suffix}");
    assert_resolved(
        &thermostat,
        &[
            record(&name("temp"), Some("Cel"), Value::Float(23.1), None),
            record(&name("heat"), Some("/"), Value::Float(1.0), None),
            record(&name("fan"), Some("/"), Value::Float(0.0), None),
        ],
    );
    let ts_ns = Some(1_320_078_429 * SECOND_NS);
    assert_resolved(
        &lights_on,
        &[
            record("2001:db8::3", Some("/"), Value::Float(1.0), ts_ns),
            record("2001:db8::4", Some("/"), Value::Float(1.0), ts_ns),
        ],
    );
    let later_ns = Some(1_320_078_429 * SECOND_NS + 100_000_000);
    assert_resolved(
        &lights_off,
        &[
            record("2001:db8::3", Some("/"), Value::Float(0.5), ts_ns),
            record("2001:db8::4", Some("/"), Value::Float(0.5), ts_ns),
            record("2001:db8::3", Some("/"), Value::Float(0.0), later_ns),
            record("2001:db8::4", Some("/"), Value::Float(0.0), later_ns),
        ],
    );
}

#[test]
fn rfc_introduction_examples() {
    // RFC 8428 section 2: the same two readings with and without a base
    // name.
    let named = parse_json_ok(
        r#"[
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020076e+09,
      "v":23.5},
     {"n":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020091e+09,
      "v":23.6}
   ]"#,
    );
    let based = parse_json_ok(
        r#"[
     {"bn":"urn:dev:ow:10e2073a01080063","u":"Cel","t":1.276020076e+09,
      "v":23.5},
     {"u":"Cel","t":1.276020091e+09,
      "v":23.6}
   ]"#,
    );

    let expected = [
        record(
            "urn:dev:ow:10e2073a01080063",
            Some("Cel"),
            Value::Float(23.5),
            Some(1_276_020_076 * SECOND_NS),
        ),
        record(
            "urn:dev:ow:10e2073a01080063",
            Some("Cel"),
            Value::Float(23.6),
            Some(1_276_020_091 * SECOND_NS),
        ),
    ];
    assert_resolved(&named, &expected);
    assert_resolved(&based, &expected);
}

#[test]
fn relative_times_count_from_now() {
    let records = parse_json_ok(
        r#"[
     {"n":"a","t":-5,"v":1},
     {"n":"a","t":0,"v":2},
     {"n":"a","t":2.5,"v":3},
     {"bt":100,"n":"a","t":-5,"v":4},
     {"n":"a","v":5}
   ]"#,
    );

    let times: Vec<Option<i64>> = records.iter().map(|record| record.ts_ns).collect();
    assert_eq!(
        times,
        vec![
            Some(NOW_NS - 5 * SECOND_NS),
            Some(NOW_NS),
            Some(NOW_NS + 2_500_000_000),
            Some(NOW_NS + 95 * SECOND_NS),
            Some(NOW_NS + 100 * SECOND_NS),
        ]
    );
}

#[test]
fn time_of_2_pow_28_is_absolute() {
    let records = parse_json_ok(
        r#"[
     {"n":"a","t":268435456,"v":1},
     {"n":"a","t":268435455.5,"v":2},
     {"bt":268435000,"n":"a","t":456,"v":3},
     {"n":"a","t":-456,"v":4}
   ]"#,
    );

    assert_eq!(records[0].ts_ns, Some(268_435_456 * SECOND_NS));
    assert_eq!(records[1].ts_ns, Some(NOW_NS + 268_435_455_500_000_000));
    assert_eq!(records[2].ts_ns, Some(268_435_456 * SECOND_NS));
    assert_eq!(records[3].ts_ns, Some(NOW_NS + 268_434_544 * SECOND_NS));
}

#[test]
fn record_without_time_has_no_timestamp() {
    let records = parse_json_ok(r#"[{"n":"a","v":1},{"n":"b","vb":true}]"#);

    assert_eq!(records[0].ts_ns, None);
    assert_eq!(records[1].ts_ns, None);
}

#[test]
fn seconds_convert_to_exact_nanoseconds() {
    let cases = [
        (
            Number::Float(1.276020076001e9),
            Some(1_276_020_076_001_000_000),
        ),
        (
            Number::Float(-1.276020076001e9),
            Some(-1_276_020_076_001_000_000),
        ),
        (Number::Float(0.1), Some(100_000_000)),
        (Number::Float(1e-9), Some(1)),
        (Number::Float(1e-10), Some(0)),
        (Number::Float(5e-10), Some(1)),
        (Number::Float(-5e-10), Some(-1)),
        (Number::Float(1.5e-300), Some(0)),
        (Number::Float(0.0), Some(0)),
        (Number::Float(9.2e9), Some(9_200_000_000_000_000_000)),
        (Number::Float(9.3e9), None),
        (Number::Float(1e300), None),
        (Number::Float(f64::NAN), None),
        (Number::Float(f64::INFINITY), None),
        (Number::Integer(-5), Some(-5_000_000_000)),
        (
            Number::Integer(9_223_372_036),
            Some(9_223_372_036_000_000_000),
        ),
        (Number::Integer(9_223_372_037), None),
        (Number::Integer(i128::MAX), None),
    ];

    for (seconds, expected) in cases {
        assert_eq!(seconds_to_nanos(seconds), expected, "{seconds:?}");
    }
}

#[test]
fn time_out_of_range_names_record() {
    let huge_base = parse_json_error(r#"[{"n":"a","v":1},{"bt":1e300,"n":"a","v":1}]"#);
    let far_future = parse_json_error(r#"[{"n":"a","t":1e11,"v":1}]"#);
    let sum_too_late = parse_json_error(r#"[{"bt":9e9,"n":"a","t":9e8,"v":1}]"#);
    let far_past = parse_json_error(r#"[{"bt":-2e9,"n":"a","t":-9e9,"v":1}]"#);

    assert_eq!(huge_base.record_index, Some(1));
    assert_eq!(huge_base.field.as_deref(), Some("bt"));
    assert_message_contains(&huge_base, "record at index 1, field \"bt\"");
    assert_message_contains(&huge_base, "storable range 1677-09-21..2262-04-11");
    assert_eq!(far_future.field.as_deref(), Some("t"));
    assert_message_contains(&far_future, "100000000000 s is too far from the epoch");
    assert_eq!(sum_too_late.field.as_deref(), Some("t"));
    assert_message_contains(&sum_too_late, "bt + t = 9900000000 s since the epoch");
    assert_eq!(far_past.field.as_deref(), Some("t"));
    assert_message_contains(&far_past, "relative to now");
}

#[test]
fn cbor_nan_and_infinity_rejected() {
    let nan_time = cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(2), CborValue::Float(1.0)),
        (label(6), CborValue::Float(f64::NAN)),
    ]]);
    let infinite_value = cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(2), CborValue::Float(f64::INFINITY)),
    ]]);

    let nan_error = parse_cbor_error(&nan_time);
    let infinite_error = parse_cbor_error(&infinite_value);

    assert_eq!(nan_error.field.as_deref(), Some("t"));
    assert_message_contains(
        &nan_error,
        "field \"t\" (CBOR label 6): must be a finite number, found NaN",
    );
    assert_eq!(infinite_error.field.as_deref(), Some("v"));
    assert_message_contains(&infinite_error, "found an infinite number");
}

#[test]
fn whole_v_stays_float() {
    let records =
        parse_json_ok(r#"[{"n":"a","v":20},{"n":"b","v":-0.0},{"n":"c","v":9007199254740993}]"#);

    assert_eq!(records[0].value, Value::Float(20.0));
    let Value::Float(negative_zero) = records[1].value else {
        panic!("b is not a float");
    };
    assert!(negative_zero.is_sign_negative());
    assert_eq!(records[2].value, Value::Float(9_007_199_254_740_992.0));
}

#[test]
fn base_value_adds_to_v_only() {
    let records = parse_json_ok(
        r#"[
     {"bn":"m:","bv":10,"n":"a","v":1.5},
     {"n":"b","vs":"text"},
     {"n":"c","v":-10},
     {"bv":0.5,"n":"d","v":1}
   ]"#,
    );

    assert_eq!(records[0].value, Value::Float(11.5));
    assert_eq!(records[1].value, Value::Str("text".to_owned()));
    assert_eq!(records[2].value, Value::Float(0.0));
    assert_eq!(records[3].value, Value::Float(1.5));
}

#[test]
fn base_value_overflow_rejected() {
    let error = parse_json_error(r#"[{"bv":1e308,"n":"a","v":1e308}]"#);

    assert_eq!(error.field.as_deref(), Some("v"));
    assert_message_contains(&error, "outside the range of a 64-bit float");
}

#[test]
fn sum_becomes_own_record() {
    let records = parse_json_ok(
        r#"[
     {"bn":"meter1:","bt":1.7e9,"n":"energy","u":"J","v":5,"s":1000},
     {"n":"energy","t":60,"s":1300}
   ]"#,
    );

    let ts_ns = Some(1_700_000_000 * SECOND_NS);
    let later_ns = Some(1_700_000_060 * SECOND_NS);
    assert_resolved(
        &records,
        &[
            record("meter1:energy", Some("J"), Value::Float(5.0), ts_ns),
            record("meter1:energy.sum", Some("J"), Value::Float(1000.0), ts_ns),
            record("meter1:energy.sum", None, Value::Float(1300.0), later_ns),
        ],
    );
    assert_eq!(records[1].name, "energy.sum");
    assert_eq!(records[1].base_name, "meter1:");
}

#[test]
fn base_sum_gives_every_later_record_a_sum() {
    // RFC 8428 section 4.5.4: with only one of bs and s present, the other
    // counts as zero.
    let records = parse_json_ok(
        r#"[
     {"bs":100,"n":"a","s":5},
     {"n":"b","v":1},
     {"bs":7,"n":"c"}
   ]"#,
    );

    assert_resolved(
        &records,
        &[
            record("a.sum", None, Value::Float(105.0), None),
            record("b", None, Value::Float(1.0), None),
            record("b.sum", None, Value::Float(100.0), None),
            record("c.sum", None, Value::Float(7.0), None),
        ],
    );
}

#[test]
fn unit_and_update_time_resolve() {
    let records = parse_json_ok(
        r#"[
     {"bu":"Cel","n":"a","v":1,"ut":60},
     {"n":"b","u":"K","v":2},
     {"n":"c","v":3},
     {"bu":"%RH","n":"d","v":4}
   ]"#,
    );

    let units: Vec<Option<&str>> = records
        .iter()
        .map(|record| record.unit.as_deref())
        .collect();
    assert_eq!(
        units,
        vec![Some("Cel"), Some("K"), Some("Cel"), Some("%RH")]
    );
    assert_eq!(records[0].update_time_s, Some(60.0));
    assert_eq!(records[1].update_time_s, None);
}

#[test]
fn negative_update_time_rejected() {
    let error = parse_json_error(r#"[{"n":"a","v":1,"ut":-1}]"#);

    assert_eq!(error.field.as_deref(), Some("ut"));
    assert_message_contains(&error, "cannot be negative");
}

#[test]
fn data_value_normalized_to_unpadded_base64url() {
    let padded = parse_json_ok(r#"[{"n":"a","vd":"aGkgCg=="},{"n":"b","vd":"-_8"}]"#);
    let cbor = parse_cbor_ok(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(8), CborValue::Bytes(b"hi \n".to_vec())),
    ]]));

    assert_eq!(padded[0].value, Value::Str("aGkgCg".to_owned()));
    assert_eq!(padded[1].value, Value::Str("-_8".to_owned()));
    assert_eq!(cbor[0].value, Value::Str("aGkgCg".to_owned()));
}

#[test]
fn invalid_data_value_rejected() {
    let standard_alphabet = parse_json_error(r#"[{"n":"a","vd":"+/8"}]"#);
    let cbor_text = parse_cbor_error(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(8), text("aGkgCg")),
    ]]));

    assert_eq!(standard_alphabet.field.as_deref(), Some("vd"));
    assert_message_contains(&standard_alphabet, "is not base64url");
    assert_message_contains(&standard_alphabet, "'-' and '_' instead of '+' and '/'");
    assert_message_contains(&cbor_text, "must be a CBOR byte string, found a string");
}

#[test]
fn invalid_names_rejected() {
    let cases = [
        (
            r#"[{"n":"-temp","v":1}]"#,
            "n",
            "must start with a letter or digit",
        ),
        (
            r#"[{"bn":"_dev:","n":"temp","v":1}]"#,
            "bn",
            "must start with a letter or digit",
        ),
        (
            r#"[{"n":"temp erature","v":1}]"#,
            "n",
            "contains ' ' at byte 4",
        ),
        (
            r#"[{"n":"temp\u00e9","v":1}]"#,
            "n",
            "contains 'é' at byte 4",
        ),
        (
            r#"[{"bn":"dev#1:","n":"temp","v":1}]"#,
            "bn",
            "contains '#' at byte 3",
        ),
        (
            r#"[{"n":"a%b","v":1}]"#,
            "n",
            "only letters, digits and - : . / _",
        ),
    ];

    for (pack, field, fragment) in cases {
        let error = parse_json_error(pack);
        assert_eq!(error.record_index, Some(0), "{pack}");
        assert_eq!(error.field.as_deref(), Some(field), "{pack}");
        assert_message_contains(&error, fragment);
    }
}

#[test]
fn inherited_base_name_named_in_error() {
    let error = parse_json_error(r#"[{"bn":"dev 1:","n":"a","v":1},{"n":"b","v":2}]"#);

    assert_eq!(error.record_index, Some(0));
    assert_message_contains(
        &error,
        "base name \"dev 1:\" from the record at index 0 + name \"a\"",
    );
}

#[test]
fn missing_name_rejected() {
    let error = parse_json_error(r#"[{"v":1}]"#);

    assert_eq!(error.record_index, Some(0));
    assert_eq!(error.field, None);
    assert_message_contains(&error, "record at index 0 has no name");
}

#[test]
fn long_names_rejected() {
    let long_name = "a".repeat(MAX_KEY_BYTES + 1);
    let just_fits = "a".repeat(MAX_KEY_BYTES);
    let with_base = format!(
        r#"[{{"bn":"{}","n":"bb","v":1}}]"#,
        "a".repeat(MAX_KEY_BYTES - 1)
    );

    let too_long = parse_json_error(&format!(r#"[{{"n":"{long_name}","v":1}}]"#));
    let combined = parse_json_error(&with_base);
    let sum_suffix = parse_json_error(&format!(r#"[{{"n":"{just_fits}","s":1}}]"#));
    let fits = parse_json_ok(&format!(r#"[{{"n":"{just_fits}","v":1}}]"#));

    assert_message_contains(&too_long, "over the limit of 256 bytes");
    assert_eq!(combined.field.as_deref(), Some("n"));
    assert_message_contains(&combined, "is 257 bytes");
    assert_message_contains(&sum_suffix, "counting the suffix \".sum\" of sums");
    assert_eq!(fits[0].name, just_fits);
}

#[test]
fn two_value_fields_rejected() {
    let json = parse_json_error(r#"[{"n":"a","v":1},{"n":"b","v":1,"vs":"x"}]"#);
    let cbor = parse_cbor_error(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(4), CborValue::Bool(true)),
        (label(8), CborValue::Bytes(vec![1])),
    ]]));

    assert_eq!(json.record_index, Some(1));
    assert_message_contains(
        &json,
        "record at index 1 has two value fields, \"v\" and \"vs\"",
    );
    assert_message_contains(
        &cbor,
        "has two value fields, \"vb\" (CBOR label 4) and \"vd\" (CBOR label 8)",
    );
}

#[test]
fn record_without_value_rejected() {
    let error = parse_json_error(r#"[{"n":"a","u":"Cel"}]"#);

    assert_message_contains(&error, "record at index 0 has no value");
}

#[test]
fn only_base_records_rejected() {
    let error = parse_json_error(r#"[{"bn":"a:"},{"bt":1.7e9}]"#);

    assert_eq!(error.record_index, None);
    assert_message_contains(&error, "no values");
}

#[test]
fn duplicate_field_rejected() {
    let error = parse_json_error(r#"[{"n":"a","v":1,"v":2}]"#);

    assert_eq!(error.field.as_deref(), Some("v"));
    assert_message_contains(&error, "the field appears twice in the record");
}

#[test]
fn must_understand_fields_rejected() {
    let json = parse_json_error(r#"[{"n":"a","v":1,"geo_":true}]"#);
    let cbor = parse_cbor_error(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(2), CborValue::Integer(1.into())),
        (text("geo_"), CborValue::Bool(true)),
    ]]));

    for error in [json, cbor] {
        assert_eq!(error.record_index, Some(0));
        assert_eq!(error.field.as_deref(), Some("geo_"));
        assert_message_contains(&error, "must be understood");
    }
}

#[test]
fn unknown_fields_ignored() {
    let json = parse_json_ok(r#"[{"n":"a","v":1,"geo":{"lat":1},"l":"x","bfoo":[1]}]"#);
    let cbor = parse_cbor_ok(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(2), CborValue::Integer(1.into())),
        (label(9), text("link")),
        (label(-7), text("x")),
        (text("geo"), CborValue::Bool(true)),
    ]]));

    assert_eq!(json, vec![record("a", None, Value::Float(1.0), None)]);
    assert_eq!(cbor, json);
}

#[test]
fn versions_checked() {
    let cases = [
        (
            r#"[{"bver":11,"n":"a","v":1}]"#,
            "version 11 is newer than SenML version 10",
        ),
        (
            r#"[{"bver":0,"n":"a","v":1}]"#,
            "must be a positive integer, found 0",
        ),
        (
            r#"[{"bver":5.5,"n":"a","v":1}]"#,
            "must be a positive integer, found a number",
        ),
        (
            r#"[{"bver":"10","n":"a","v":1}]"#,
            "must be a positive integer, found a string",
        ),
        (
            r#"[{"bver":5,"n":"a","v":1},{"bver":6,"n":"a","v":1}]"#,
            "version 6 differs from version 5",
        ),
        (
            r#"[{"n":"a","v":1},{"bver":5,"n":"a","v":1}]"#,
            "version 5 differs from version 10",
        ),
    ];

    for (pack, fragment) in cases {
        let error = parse_json_error(pack);
        assert_eq!(error.field.as_deref(), Some("bver"), "{pack}");
        assert_message_contains(&error, fragment);
    }
    let accepted = parse_json_ok(r#"[{"bver":10,"n":"a","v":1},{"bver":10,"n":"b","v":1}]"#);
    assert_eq!(accepted.len(), 2);
}

#[test]
fn wrong_field_types_rejected() {
    let cases = [
        (
            r#"[{"n":5,"v":1}]"#,
            "n",
            "must be a string, found an integer",
        ),
        (
            r#"[{"n":"a","v":"1"}]"#,
            "v",
            "must be a finite number, found a string",
        ),
        (
            r#"[{"n":"a","vb":"true"}]"#,
            "vb",
            "must be true or false, found a string",
        ),
        (
            r#"[{"n":"a","vd":5}]"#,
            "vd",
            "must be a base64url string, found an integer",
        ),
        (
            r#"[{"n":"a","v":1,"t":"now"}]"#,
            "t",
            "must be a finite number, found a string",
        ),
        (r#"[{"n":"a","v":null}]"#, "v", "found null"),
        (r#"[{"bn":["a"],"n":"a","v":1}]"#, "bn", "found an array"),
        (r#"[{"n":"a","vs":{"x":1}}]"#, "vs", "found an object"),
    ];

    for (pack, field, fragment) in cases {
        let error = parse_json_error(pack);
        assert_eq!(error.record_index, Some(0), "{pack}");
        assert_eq!(error.field.as_deref(), Some(field), "{pack}");
        assert_message_contains(&error, fragment);
    }
}

#[test]
fn long_string_value_rejected() {
    let long_text = "x".repeat(MAX_STRING_VALUE_BYTES + 1);

    let error = parse_json_error(&format!(r#"[{{"n":"a","vs":"{long_text}"}}]"#));

    assert_eq!(error.field.as_deref(), Some("vs"));
    assert_message_contains(&error, "over the limit of 65536 bytes");
}

#[test]
fn cbor_text_label_of_known_field_rejected() {
    let error = parse_cbor_error(&cbor_pack(vec![vec![
        (text("n"), text("a")),
        (text("v"), CborValue::Float(1.0)),
    ]]));

    assert_eq!(error.field.as_deref(), Some("n"));
    assert_message_contains(&error, "integer label 0 instead of the text \"n\"");
}

#[test]
fn cbor_invalid_map_key_rejected() {
    let error = parse_cbor_error(&cbor_pack(vec![vec![(
        CborValue::Bytes(vec![1]),
        text("a"),
    )]]));

    assert_message_contains(
        &error,
        "record at index 0 has a map key that is a byte string",
    );
}

#[test]
fn truncated_cbor_rejected() {
    let payload = from_hex(RFC_CURRENTS_CBOR_HEX);

    for length in 1..payload.len() {
        let error = parse_cbor_error(&payload[..length]);
        assert_eq!(error.record_index, None, "length {length}");
    }
    let cut_in_string = parse_cbor_error(&payload[..10]);
    assert_message_contains(&cut_in_string, "truncated CBOR");
}

#[test]
fn trailing_cbor_bytes_rejected() {
    let mut payload = from_hex(RFC_CURRENTS_CBOR_HEX);
    payload.extend_from_slice(&[0x01, 0x02]);

    let error = parse_cbor_error(&payload);

    assert_message_contains(&error, "2 bytes follow the array of records");
}

#[test]
fn cbor_indefinite_array_and_decimal_fraction() {
    // [_ {0: "a", 2: 1.5, 6: 4([-3, 1276020076001])}]
    let mut record = cbor_pack(vec![vec![
        (label(0), text("a")),
        (label(2), CborValue::Float(1.5)),
        (
            label(6),
            CborValue::Tag(
                4,
                Box::new(CborValue::Array(vec![
                    CborValue::Integer((-3).into()),
                    CborValue::Integer(1_276_020_076_001_i64.into()),
                ])),
            ),
        ),
    ]]);
    // Replace the definite array header (0x81) by an indefinite one.
    assert_eq!(record[0], 0x81);
    record[0] = 0x9f;
    record.push(0xff);

    let records = parse_cbor_ok(&record);

    assert_eq!(
        records,
        vec![record_with_time("a", 1.5, 1_276_020_076_001_000_000)]
    );
}

fn record_with_time(name: &str, value: f64, ts_ns: i64) -> Record {
    record(name, None, Value::Float(value), Some(ts_ns))
}

#[test]
fn invalid_cbor_decimal_fraction_rejected() {
    let error = parse_cbor_error(&cbor_pack(vec![vec![
        (label(0), text("a")),
        (
            label(2),
            CborValue::Tag(4, Box::new(CborValue::Array(vec![text("x")]))),
        ),
    ]]));

    assert_message_contains(&error, "a decimal fraction (tag 4) that is not");
}

#[test]
fn pack_shape_errors() {
    let cases: [(&[u8], &str); 4] = [
        (
            b"{\"n\":\"a\",\"v\":1}",
            "found an object; wrap a single record in [ ]",
        ),
        (b"  ", "found an empty payload"),
        (b"[]", "no records: the SenML pack is an empty array"),
        (b"[{\"n\":\"a\",\"v\":1},", "malformed JSON"),
    ];
    for (payload, fragment) in cases {
        let error = parse_json(payload, NOW_NS).expect_err("invalid pack");
        assert_message_contains(&error, fragment);
    }

    let element = parse_json_error(r#"[{"n":"a","v":1},5]"#);
    assert_eq!(element.record_index, Some(1));
    assert_message_contains(
        &element,
        "record at index 1 is a number, but a SenML record must be a JSON object",
    );

    let cbor_map = parse_cbor_error(&[0xa1, 0x00, 0x61, 0x61]);
    assert_message_contains(&cbor_map, "found a map; wrap a single record in an array");
    let cbor_empty = parse_cbor_error(&[0x80]);
    assert_message_contains(&cbor_empty, "no records");
    let cbor_element = parse_cbor_error(&[0x82, 0xa0, 0x05]);
    assert_message_contains(
        &cbor_element,
        "record at index 1 is an integer, but a SenML record must be a CBOR map",
    );
    let cbor_nothing = parse_cbor_error(&[]);
    assert_message_contains(&cbor_nothing, "found an empty payload");
}

#[test]
fn invalid_utf8_json_rejected() {
    let error = parse_json(b"[{\"n\":\"\xff\",\"v\":1}]", NOW_NS).expect_err("invalid UTF-8");

    assert_message_contains(&error, "malformed JSON");
}

#[test]
fn too_many_records_rejected() {
    let record = r#"{"n":"a","v":1}"#;
    let at_limit = format!("[{}]", vec![record; MAX_RECORDS].join(","));
    let over_limit = format!("[{}]", vec![record; MAX_RECORDS + 1].join(","));
    let cbor_records =
        vec![vec![(label(0), text("a")), (label(2), CborValue::Float(1.0))]; MAX_RECORDS + 1];

    let accepted = parse_json_ok(&at_limit);
    let json = parse_json_error(&over_limit);
    let cbor = parse_cbor_error(&cbor_pack(cbor_records));

    assert_eq!(accepted.len(), MAX_RECORDS);
    for error in [json, cbor] {
        assert_eq!(
            error.message,
            "too many records: a pack may have at most 10000 records; split it into several requests"
        );
    }
}

#[test]
fn too_many_fields_rejected() {
    let fields: Vec<String> = (0..MAX_FIELDS_PER_RECORD)
        .map(|index| format!("\"x{index}\":1"))
        .collect();
    let json = parse_json_error(&format!(
        r#"[{{"n":"a","v":1}},{{"n":"a","v":1,{}}}]"#,
        fields.join(",")
    ));
    let mut entries = vec![(label(0), text("a")), (label(2), CborValue::Float(1.0))];
    entries.extend(
        (0..MAX_FIELDS_PER_RECORD).map(|index| (text(&format!("x{index}")), CborValue::Null)),
    );
    let cbor = parse_cbor_error(&cbor_pack(vec![entries]));

    assert_eq!(json.record_index, Some(1));
    assert_message_contains(&json, "record at index 1 has more than 64 fields");
    assert_eq!(cbor.record_index, Some(0));
    assert_message_contains(&cbor, "record at index 0 has more than 64 fields");
}

#[test]
fn cbor_self_described_pack_accepted() {
    // Tag 55799 (d9 d9 f7) marks a CBOR item and changes nothing else.
    let mut payload = vec![0xd9, 0xd9, 0xf7];
    payload.extend(from_hex(RFC_CURRENTS_CBOR_HEX));

    let records = parse_cbor_ok(&payload);

    assert_resolved(&records, &rfc_currents_expected());
}
