use ferrite_core::Value;

use super::*;

fn parse_one(body: &str) -> Record {
    let mut records = parse_telemetry(body.as_bytes()).unwrap_or_else(|error| {
        panic!("{body}: {error}");
    });
    assert_eq!(records.len(), 1, "{body}");
    records.remove(0)
}

fn parse_error(body: &str) -> JsonError {
    match parse_telemetry(body.as_bytes()) {
        Ok(records) => panic!("{body}: expected an error, got {records:?}"),
        Err(error) => error,
    }
}

fn assert_message_contains(error: &JsonError, fragment: &str) {
    assert!(
        error.message.contains(fragment),
        "message {:?} does not contain {fragment:?}",
        error.message
    );
}

fn values(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

#[test]
fn floats_keep_their_exact_text_value() {
    let record = parse_one(
        r#"{"ts":1714953601000,"values":{"a":7e-06,"b":1E+3,"c":-0.0,"d":0.00000000123456789,"e":123456789000000000000.0}}"#,
    );

    assert_eq!(record.ts_ns, Some(1_714_953_601_000_000_000));
    assert_eq!(
        record.values,
        values(&[
            ("a", Value::Float(7e-06)),
            ("b", Value::Float(1000.0)),
            ("c", Value::Float(-0.0)),
            ("d", Value::Float(1.23456789e-09)),
            ("e", Value::Float(1.23456789e+20)),
        ])
    );
    // -0.0 == 0.0 in f64 comparison, so check the sign separately.
    let Value::Float(negative_zero) = record.values[2].1 else {
        panic!("c is not a float");
    };
    assert!(negative_zero.is_sign_negative());
}

#[test]
fn integers_beyond_i64_become_floats() {
    let record =
        parse_one(r#"{"f":9007199254740993,"g":-9223372036854775808,"h":9223372036854775808}"#);

    assert_eq!(record.ts_ns, None);
    assert_eq!(
        record.values,
        values(&[
            ("f", Value::Int(9_007_199_254_740_993)),
            ("g", Value::Int(i64::MIN)),
            ("h", Value::Float(9.223372036854776e18)),
        ])
    );
}

#[test]
fn float_out_of_range_names_key() {
    let error = parse_error(r#"{"i":1e400}"#);

    assert_eq!(error.key.as_deref(), Some("i"));
    assert_message_contains(
        &error,
        "value of \"i\" is outside the range of a 64-bit float",
    );
    assert!(error.to_string().contains("\"i\""), "{error}");
}

#[test]
fn strings_are_never_coerced() {
    let record =
        parse_one(r#"{"k":"NaN","l":"21.5","m":"true","n":true,"o":false,"p":"é\n\"q\""}"#);

    assert_eq!(
        record.values,
        values(&[
            ("k", Value::Str("NaN".to_owned())),
            ("l", Value::Str("21.5".to_owned())),
            ("m", Value::Str("true".to_owned())),
            ("n", Value::Bool(true)),
            ("o", Value::Bool(false)),
            ("p", Value::Str("é\n\"q\"".to_owned())),
        ])
    );
}

#[test]
fn malformed_json_reports_position() {
    let bodies = [
        r#"{"j":NaN}"#,
        r#"{"j":Infinity}"#,
        r#"{"o":01}"#,
        r#"{"p":.5}"#,
        r#"{"q":1,}"#,
        r#"[{"q":1},]"#,
        r#"{"q":1} x"#,
        "",
    ];
    for body in bodies {
        let error = parse_error(body);
        assert!(
            error.message.starts_with("malformed JSON:"),
            "{body}: {}",
            error.message
        );
        assert!(
            error.message.contains("line 1 column"),
            "{body}: {}",
            error.message
        );
        assert_eq!(error.key, None, "{body}");
    }

    let error = parse_telemetry(b"{\"a\":\"\xff\"}").unwrap_err();
    assert!(
        error.message.starts_with("malformed JSON:"),
        "{}",
        error.message
    );
}

#[test]
fn null_and_arrays_name_key() {
    let error = parse_error(r#"{"a":1,"b":null}"#);
    assert_eq!(error.key.as_deref(), Some("b"));
    assert_message_contains(
        &error,
        "null is not a telemetry value; omit the key instead",
    );
    assert_message_contains(&error, "\"b\"");

    let error = parse_error(r#"{"gps":{"fix":[1,2]}}"#);
    assert_eq!(error.key.as_deref(), Some("gps.fix"));
    assert_message_contains(&error, "\"gps.fix\"");
    assert_message_contains(&error, "arrays are not telemetry values");
}

#[test]
fn nested_objects_are_flattened() {
    let record = parse_one(r#"{"gps":{"lat":1,"lon":2.5,"fix":{"ok":true}},"temp":20}"#);

    assert_eq!(
        record.values,
        values(&[
            ("gps.lat", Value::Int(1)),
            ("gps.lon", Value::Float(2.5)),
            ("gps.fix.ok", Value::Bool(true)),
            ("temp", Value::Int(20)),
        ])
    );
}

#[test]
fn duplicate_keys_are_rejected() {
    let error = parse_error(r#"{"a":1,"a":2}"#);
    assert_eq!(error.key.as_deref(), Some("a"));
    assert_message_contains(&error, "duplicate key \"a\"");

    let error = parse_error(r#"{"gps.lat":1,"gps":{"lat":2}}"#);
    assert_eq!(error.key.as_deref(), Some("gps.lat"));
    assert_message_contains(&error, "duplicate key \"gps.lat\"");
}

#[test]
fn empty_payloads_have_no_values() {
    for body in ["{}", "[]", r#"{"ts":1714953600000,"values":{}}"#, " [ ] "] {
        let error = parse_error(body);
        assert!(
            error.message.starts_with("no values"),
            "{body}: {}",
            error.message
        );
    }
}

#[test]
fn keys_must_be_valid() {
    let error = parse_error(r#"{"":1}"#);
    assert_message_contains(&error, "empty key");

    let error = parse_error(r#"{"gps":{"":1}}"#);
    assert_eq!(error.key.as_deref(), Some("gps"));
    assert_message_contains(&error, "empty key inside \"gps\"");

    let long_key = "k".repeat(257);
    let error = parse_error(&format!(r#"{{"{long_key}":1}}"#));
    assert_message_contains(&error, "257 bytes");
    assert_message_contains(&error, "256 bytes");

    let at_limit = "k".repeat(256);
    let record = parse_one(&format!(r#"{{"{at_limit}":1}}"#));
    assert_eq!(record.values[0].0, at_limit);

    let nested_long = format!(r#"{{"{}":{{"{}":1}}}}"#, "a".repeat(128), "b".repeat(128));
    let error = parse_error(&nested_long);
    assert_message_contains(&error, "257 bytes");

    let error = parse_error(r#"{"gps":{}}"#);
    assert_eq!(error.key.as_deref(), Some("gps"));
    assert_message_contains(&error, "empty object");
}

#[test]
fn nesting_depth_is_limited() {
    let nested = |depth: usize| {
        let mut body = String::new();
        for _ in 0..depth {
            body.push_str(r#"{"a":"#);
        }
        body.push('1');
        for _ in 0..depth {
            body.push('}');
        }
        body
    };

    let record = parse_one(&nested(MAX_NESTING_DEPTH));
    assert_eq!(record.values[0].0.split('.').count(), MAX_NESTING_DEPTH);

    let error = parse_error(&nested(MAX_NESTING_DEPTH + 1));
    assert_message_contains(&error, "deeper than 32 levels");

    // Far deeper: still an error, not a stack overflow.
    let error = parse_error(&nested(100_000));
    assert_message_contains(&error, "deeper than 32 levels");
}

#[test]
fn string_value_limit() {
    let at_limit = format!(r#"{{"s":"{}"}}"#, "a".repeat(MAX_STRING_VALUE_BYTES));
    assert_eq!(
        parse_one(&at_limit).values[0].1,
        Value::Str("a".repeat(MAX_STRING_VALUE_BYTES))
    );

    let over_limit = format!(r#"{{"s":"{}"}}"#, "a".repeat(MAX_STRING_VALUE_BYTES + 1));
    let error = parse_error(&over_limit);
    assert_eq!(error.key.as_deref(), Some("s"));
    assert_message_contains(&error, "65536 bytes");
}

#[test]
fn ts_accepts_millis_and_rfc3339() {
    let millis = parse_one(r#"{"ts":1714953600000,"values":{"a":1}}"#);
    let utc = parse_one(r#"{"ts":"2024-05-06T00:00:00Z","values":{"a":1}}"#);
    let offset = parse_one(r#"{"values":{"a":1},"ts":"2024-05-06T02:00:00.000+02:00"}"#);

    assert_eq!(millis.ts_ns, Some(1_714_953_600_000_000_000));
    assert_eq!(utc.ts_ns, millis.ts_ns);
    assert_eq!(offset.ts_ns, millis.ts_ns);

    let fraction = parse_one(r#"{"ts":"2024-05-06T00:00:00.123456789Z","values":{"a":1}}"#);
    assert_eq!(fraction.ts_ns, Some(1_714_953_600_123_456_789));
}

#[test]
fn ts_rejects_non_integers() {
    for ts in ["1.5e12", "1.5", "1714953600000.0"] {
        let error = parse_error(&format!(r#"{{"ts":{ts},"values":{{"a":1}}}}"#));
        assert_eq!(error.key.as_deref(), Some("ts"), "{ts}");
        assert_message_contains(
            &error,
            "ts must be an integer number of milliseconds since the epoch",
        );
    }

    for ts in ["true", "null", "{}", "[]"] {
        let error = parse_error(&format!(r#"{{"ts":{ts},"values":{{"a":1}}}}"#));
        assert_eq!(error.key.as_deref(), Some("ts"), "{ts}");
        assert_message_contains(&error, "ts must be an integer");
    }
}

#[test]
fn ts_in_seconds_is_implausible() {
    let error = parse_error(r#"{"ts":1714953600,"values":{"a":1}}"#);
    assert_eq!(error.key.as_deref(), Some("ts"));
    assert_eq!(
        error.message,
        "ts 1714953600 is before 1973-03-03: ts is in milliseconds since the epoch; a value \
         in seconds must be multiplied by 1000"
    );

    let error = parse_error(r#"{"ts":-1,"values":{"a":1}}"#);
    assert_message_contains(&error, "ts -1 is before 1973-03-03");

    let record = parse_one(&format!(
        r#"{{"ts":{MIN_PLAUSIBLE_TS_MS},"values":{{"a":1}}}}"#
    ));
    assert_eq!(record.ts_ns, Some(MIN_PLAUSIBLE_TS_MS * 1_000_000));
}

#[test]
fn ts_out_of_range() {
    for ts in [
        "9223372036855",
        "9223372036854775807",
        "99999999999999999999",
    ] {
        let error = parse_error(&format!(r#"{{"ts":{ts},"values":{{"a":1}}}}"#));
        assert_eq!(error.key.as_deref(), Some("ts"), "{ts}");
        assert_message_contains(&error, "outside the storable range");
    }

    let error = parse_error(r#"{"ts":"2300-01-01T00:00:00Z","values":{"a":1}}"#);
    assert_message_contains(&error, "outside the storable range");

    let error = parse_error(r#"{"ts":"yesterday","values":{"a":1}}"#);
    assert_message_contains(&error, "not an RFC 3339 timestamp");
}

#[test]
fn envelope_needs_exactly_ts_and_values() {
    let bodies = [
        r#"{"ts":1714953600000,"temp":1}"#,
        r#"{"values":{"a":1}}"#,
        r#"{"ts":1714953600000,"values":{"a":1},"extra":2}"#,
        r#"{"ts":1714953600000,"ts":1714953600000}"#,
    ];
    for body in bodies {
        let error = parse_error(body);
        assert_message_contains(&error, "exactly these two keys");
    }

    let error = parse_error(r#"{"ts":1714953600000,"values":5}"#);
    assert_eq!(error.key.as_deref(), Some("values"));
    assert_message_contains(&error, "\"values\" must be an object");
}

#[test]
fn arrays_of_records() {
    let records = parse_telemetry(
        br#" [{"ts":1714953600000,"values":{"a":1}}, {"b":"x"}, {"ts":"2024-05-06T00:00:01Z","values":{"c":{"d":false}}}] "#,
    )
    .unwrap();

    assert_eq!(
        records,
        vec![
            Record {
                ts_ns: Some(1_714_953_600_000_000_000),
                values: values(&[("a", Value::Int(1))]),
            },
            Record {
                ts_ns: None,
                values: values(&[("b", Value::Str("x".to_owned()))]),
            },
            Record {
                ts_ns: Some(1_714_953_601_000_000_000),
                values: values(&[("c.d", Value::Bool(false))]),
            },
        ]
    );
}

#[test]
fn array_errors_name_the_record() {
    let error = parse_error(r#"[{"a":1},{"b":null}]"#);
    assert_eq!(error.key.as_deref(), Some("b"));
    assert_message_contains(&error, "record at index 1: ");

    let error = parse_error(r#"[{"a":1},5]"#);
    assert_message_contains(
        &error,
        "record at index 1: expected a JSON object, found a number",
    );
}

#[test]
fn scalar_payload_is_rejected() {
    for (body, kind) in [("5", "a number"), (r#""x""#, "a string"), ("null", "null")] {
        let error = parse_error(body);
        assert_message_contains(&error, "expected a JSON object or an array of objects");
        assert_message_contains(&error, kind);
    }
}

#[test]
fn whitespace_around_values_is_ignored() {
    let record = parse_one(" {\n \"a\" :\t1 ,\"b\": {\"c\" : \"x\" } }\n");
    assert_eq!(
        record.values,
        values(&[("a", Value::Int(1)), ("b.c", Value::Str("x".to_owned()))])
    );
}
