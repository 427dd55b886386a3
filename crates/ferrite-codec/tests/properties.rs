//! Property tests: encoded lines parse back to their input, and neither
//! decoder panics on arbitrary input.

use ferrite_codec::json::parse_telemetry;
use ferrite_codec::line_protocol::{Precision, encode_line, parse_batch, parse_line};
use ferrite_core::{MAX_TIMESTAMP_NS, MIN_TIMESTAMP_NS, Value};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::string::string_regex;

/// Printable text, weighted towards the characters that line protocol
/// escapes.
fn printable(max_chars: usize) -> impl Strategy<Value = String> {
    let any_printable = format!("[^\\p{{C}}]{{1,{max_chars}}}");
    let specials = format!("[a-z ,=\"\\\\#]{{1,{max_chars}}}");
    prop_oneof![
        string_regex(&any_printable).expect("valid regex"),
        string_regex(&specials).expect("valid regex"),
    ]
}

fn measurement() -> impl Strategy<Value = String> {
    // A leading "#" would turn the line into a comment.
    printable(20).prop_filter("starts with #", |name| !name.starts_with('#'))
}

fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>()
            .prop_filter("finite", |number| number.is_finite())
            .prop_map(Value::Float),
        any::<i64>().prop_map(Value::Int),
        any::<bool>().prop_map(Value::Bool),
        // Strings may contain newlines, which the encoder writes as \n.
        "[^\\p{C}]{0,20}|[a-z \"\\\\\n]{0,20}".prop_map(Value::Str),
    ]
}

/// Removes repeated keys, keeping the first.
fn unique_keys<T>(mut pairs: Vec<(String, T)>) -> Vec<(String, T)> {
    let mut seen = std::collections::HashSet::new();
    pairs.retain(|(key, _)| seen.insert(key.clone()));
    pairs
}

proptest! {
    #[test]
    fn encoded_lines_round_trip(
        measurement in measurement(),
        tags in vec((printable(12), printable(12)), 0..5).prop_map(unique_keys),
        fields in vec((printable(12), field_value()), 1..6).prop_map(unique_keys),
        timestamp_ns in proptest::option::of(MIN_TIMESTAMP_NS..=MAX_TIMESTAMP_NS),
    ) {
        let encoded = encode_line(&measurement, &tags, &fields, timestamp_ns);
        let parsed = parse_line(&encoded, 1, Precision::Ns);
        let parsed = match parsed {
            Ok(Some(line)) => line,
            other => panic!("{encoded:?} did not parse: {other:?}"),
        };

        prop_assert_eq!(&parsed.measurement, &measurement);
        prop_assert_eq!(&parsed.tags, &tags);
        prop_assert_eq!(parsed.fields.len(), fields.len());
        for ((parsed_key, parsed_value), (key, value)) in parsed.fields.iter().zip(&fields) {
            prop_assert_eq!(parsed_key, key);
            match (parsed_value, value) {
                // Compare bits so that -0.0 and 0.0 count as different.
                (Value::Float(parsed), Value::Float(expected)) => {
                    prop_assert_eq!(parsed.to_bits(), expected.to_bits());
                }
                _ => prop_assert_eq!(parsed_value, value),
            }
        }
        prop_assert_eq!(parsed.timestamp_ns, timestamp_ns);
    }

    #[test]
    fn line_parser_never_panics(bytes in vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_batch(&text, Precision::Ns);
    }

    #[test]
    fn line_parser_never_panics_on_near_valid_input(
        text in "[a-z0-9 ,=\"\\\\#.\\-+eEituf\n\r\t]{0,80}",
        precision in prop_oneof![
            Just(Precision::Ns),
            Just(Precision::Us),
            Just(Precision::Ms),
            Just(Precision::S),
        ],
    ) {
        let _ = parse_batch(&text, precision);
    }

    #[test]
    fn json_parser_never_panics(bytes in vec(any::<u8>(), 0..200)) {
        let _ = parse_telemetry(&bytes);
    }

    #[test]
    fn json_parser_never_panics_on_near_valid_input(
        text in "[{}\\[\\]\",:a-z0-9.eE+\\- ]{0,80}",
    ) {
        let _ = parse_telemetry(text.as_bytes());
    }
}
