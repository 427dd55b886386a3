//! Property tests: encoded lines parse back to their input, the SenML JSON
//! and CBOR readers agree on the same pack, and no decoder panics on
//! arbitrary input.

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

mod senml_properties {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ciborium::Value as CborValue;
    use ferrite_codec::senml::{parse_cbor, parse_json};
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    const NOW_NS: i64 = 1_700_000_000_000_000_000;

    /// The JSON and CBOR labels of RFC 8428 Table 4, and two unknown
    /// fields: one to ignore and one that must be understood.
    const LABELS: [(&str, Option<i8>); 17] = [
        ("bver", Some(-1)),
        ("bn", Some(-2)),
        ("bt", Some(-3)),
        ("bu", Some(-4)),
        ("bv", Some(-5)),
        ("bs", Some(-6)),
        ("n", Some(0)),
        ("u", Some(1)),
        ("v", Some(2)),
        ("vs", Some(3)),
        ("vb", Some(4)),
        ("s", Some(5)),
        ("t", Some(6)),
        ("ut", Some(7)),
        ("vd", Some(8)),
        ("extension", None),
        ("extension_", None),
    ];

    /// A field value that both representations can carry.
    #[derive(Debug, Clone)]
    enum FieldValue {
        Integer(i64),
        Float(f64),
        Text(String),
        Bool(bool),
        Data(Vec<u8>),
    }

    fn field() -> impl Strategy<Value = (usize, FieldValue)> {
        let ordinary = prop_oneof![
            (-400_000_000_i64..400_000_000).prop_map(FieldValue::Integer),
            select(vec![
                0.5,
                -1.25,
                -0.0,
                1.7e9,
                1.276020076001e9,
                268_435_456.0,
                1e300,
                -9e9,
            ])
            .prop_map(FieldValue::Float),
            "[a-z0-9:_ -]{0,5}".prop_map(FieldValue::Text),
            any::<bool>().prop_map(FieldValue::Bool),
        ];
        (0..LABELS.len(), ordinary, vec(any::<u8>(), 0..6)).prop_map(|(label, value, data)| {
            // JSON carries vd as base64url text and CBOR as bytes, so vd
            // always gets data, which the two can express alike.
            if LABELS[label].0 == "vd" {
                (label, FieldValue::Data(data))
            } else {
                (label, value)
            }
        })
    }

    /// Generates a value of the type that the label expects, so that most
    /// records built from these fields are valid.
    fn typed_field(label: usize) -> BoxedStrategy<(usize, FieldValue)> {
        let number = prop_oneof![
            (-300_i64..300).prop_map(FieldValue::Integer),
            select(vec![0.5, -1.25, 20.0, 1.7e9, 1.276020076001e9]).prop_map(FieldValue::Float),
        ];
        let value = match LABELS[label].0 {
            "bver" => Just(FieldValue::Integer(10)).boxed(),
            "bn" | "n" => "[a-z][a-z0-9:/._-]{0,4}".prop_map(FieldValue::Text).boxed(),
            "bu" | "u" | "vs" | "extension" => "[ -~]{0,5}".prop_map(FieldValue::Text).boxed(),
            "vb" => any::<bool>().prop_map(FieldValue::Bool).boxed(),
            "vd" => vec(any::<u8>(), 0..6).prop_map(FieldValue::Data).boxed(),
            "ut" => (0_i64..600).prop_map(FieldValue::Integer).boxed(),
            _ => number.boxed(),
        };
        value.prop_map(move |value| (label, value)).boxed()
    }

    fn label_index(name: &str) -> usize {
        LABELS.iter().position(|(label, _)| *label == name).unwrap()
    }

    /// Generates a record with a name, one value field and up to three other
    /// fields.
    fn typed_record() -> impl Strategy<Value = Vec<(usize, FieldValue)>> {
        let value_label = select(vec!["v", "vs", "vb", "vd", "s"]).prop_map(label_index);
        let other_label = select(vec![
            "bn",
            "bt",
            "bu",
            "bv",
            "bs",
            "u",
            "t",
            "ut",
            "extension",
        ])
        .prop_map(label_index);
        (
            typed_field(label_index("n")),
            value_label.prop_flat_map(typed_field),
            vec(other_label.prop_flat_map(typed_field), 0..3),
        )
            .prop_map(|(name, value, others)| {
                let mut fields = vec![name, value];
                fields.extend(others);
                fields
            })
    }

    /// Generates mostly well-typed records, and some with arbitrary fields.
    fn record() -> impl Strategy<Value = Vec<(usize, FieldValue)>> {
        prop_oneof![4 => typed_record(), 1 => vec(field(), 0..5)]
    }

    fn json_pack(records: &[Vec<(usize, FieldValue)>]) -> String {
        let records: Vec<String> = records
            .iter()
            .map(|fields| {
                let members: Vec<String> = fields
                    .iter()
                    .map(|(label, value)| {
                        let value = match value {
                            FieldValue::Integer(integer) => integer.to_string(),
                            FieldValue::Float(float) => serde_json::to_string(float).unwrap(),
                            FieldValue::Text(text) => serde_json::to_string(text).unwrap(),
                            FieldValue::Bool(boolean) => boolean.to_string(),
                            FieldValue::Data(data) => {
                                format!("\"{}\"", URL_SAFE_NO_PAD.encode(data))
                            }
                        };
                        format!("\"{}\":{value}", LABELS[*label].0)
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            })
            .collect();
        format!("[{}]", records.join(","))
    }

    fn cbor_pack(records: &[Vec<(usize, FieldValue)>]) -> Vec<u8> {
        let records = records
            .iter()
            .map(|fields| {
                let entries = fields
                    .iter()
                    .map(|(label, value)| {
                        let key = match LABELS[*label] {
                            (_, Some(cbor_label)) => CborValue::Integer(cbor_label.into()),
                            ("extension", None) => CborValue::Integer(42.into()),
                            (text, None) => CborValue::Text(text.to_owned()),
                        };
                        let value = match value {
                            FieldValue::Integer(integer) => CborValue::Integer((*integer).into()),
                            FieldValue::Float(float) => CborValue::Float(*float),
                            FieldValue::Text(text) => CborValue::Text(text.clone()),
                            FieldValue::Bool(boolean) => CborValue::Bool(*boolean),
                            FieldValue::Data(data) => CborValue::Bytes(data.clone()),
                        };
                        (key, value)
                    })
                    .collect();
                CborValue::Map(entries)
            })
            .collect();
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(&CborValue::Array(records), &mut bytes).unwrap();
        bytes
    }

    /// Generates the JSON fragments that SenML packs are made of.
    fn json_token() -> impl Strategy<Value = &'static str> {
        select(vec![
            "[",
            "]",
            "{",
            "}",
            ",",
            ":",
            "\"n\"",
            "\"bn\"",
            "\"v\"",
            "\"vs\"",
            "\"vd\"",
            "\"s\"",
            "\"bs\"",
            "\"t\"",
            "\"bt\"",
            "\"bver\"",
            "\"x_\"",
            "\"a:\"",
            "\"b\"",
            "\"aGkgCg\"",
            "1",
            "-5",
            "0.1",
            "1e300",
            "1.7e9",
            "268435456",
            "true",
            "null",
        ])
    }

    /// Generates the bytes that CBOR packs are made of: array and map headers, the
    /// labels, short strings, floats and breaks.
    fn cbor_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            select(vec![
                0x81, 0x82, 0x9f, 0xa1, 0xa2, 0xa3, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                0x08, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x41, 0x61, 0x62, 0xc4, 0xf4, 0xf5, 0xf6,
                0xf9, 0xfa, 0xfb, 0xff, 0x7f, 0x5f, 0x1b,
            ]),
            any::<u8>(),
        ]
    }

    proptest! {
        #[test]
        fn json_parser_never_panics(bytes in vec(any::<u8>(), 0..300)) {
            let _ = parse_json(&bytes, NOW_NS);
        }

        #[test]
        fn json_parser_never_panics_on_near_valid_input(tokens in vec(json_token(), 0..40)) {
            let _ = parse_json(tokens.concat().as_bytes(), NOW_NS);
        }

        #[test]
        fn cbor_parser_never_panics(bytes in vec(any::<u8>(), 0..300)) {
            let _ = parse_cbor(&bytes, NOW_NS);
        }

        #[test]
        fn cbor_parser_never_panics_on_near_valid_input(bytes in vec(cbor_byte(), 0..80)) {
            let _ = parse_cbor(&bytes, NOW_NS);
        }

        #[test]
        fn json_and_cbor_agree(records in vec(record(), 1..5)) {
            let json = parse_json(json_pack(&records).as_bytes(), NOW_NS);
            let cbor = parse_cbor(&cbor_pack(&records), NOW_NS);

            match (json, cbor) {
                (Ok(json), Ok(cbor)) => prop_assert_eq!(json, cbor),
                (Err(json), Err(cbor)) => {
                    prop_assert_eq!(json.record_index, cbor.record_index, "{} / {}", json, cbor);
                    prop_assert_eq!(&json.field, &cbor.field, "{} / {}", json, cbor);
                }
                (json, cbor) => prop_assert!(false, "JSON gave {:?}, CBOR gave {:?}", json, cbor),
            }
        }
    }
}

mod cayenne_lpp_properties {
    use ferrite_codec::cayenne_lpp::decode;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::select;

    /// Data sizes by type code, from the ElectronicCats CayenneLPP table:
    /// an oracle independent of the decoder's own table.
    const SIZES: [(u8, usize, usize); 26] = [
        // (code, data bytes, values)
        (0, 1, 1),
        (1, 1, 1),
        (2, 2, 1),
        (3, 2, 1),
        (100, 4, 1),
        (101, 2, 1),
        (102, 1, 1),
        (103, 2, 1),
        (104, 1, 1),
        (113, 6, 3),
        (115, 2, 1),
        (116, 2, 1),
        (117, 2, 1),
        (118, 4, 1),
        (120, 1, 1),
        (121, 2, 1),
        (125, 2, 1),
        (128, 2, 1),
        (130, 4, 1),
        (131, 4, 1),
        (132, 2, 1),
        (133, 4, 1),
        (134, 6, 3),
        (135, 3, 3),
        (136, 9, 3),
        (142, 1, 1),
    ];

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in vec(any::<u8>(), 0..120)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_known_types(
            bytes in vec(prop_oneof![select(SIZES.map(|(code, _, _)| code).to_vec()), any::<u8>()], 0..80),
        ) {
            let _ = decode(&bytes);
        }

        #[test]
        fn well_formed_payloads_decode(
            entries in vec((0..SIZES.len(), any::<u8>(), vec(any::<u8>(), 9)), 0..12),
        ) {
            let mut payload = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut expected_values = 0;
            for (type_index, channel, data) in entries {
                let (code, size, value_count) = SIZES[type_index];
                if !seen.insert((code, channel)) {
                    continue;
                }
                payload.extend_from_slice(&[channel, code]);
                payload.extend_from_slice(&data[..size]);
                expected_values += value_count;
            }

            let decoded = decode(&payload);

            prop_assert!(decoded.is_ok(), "{:02x?}: {:?}", payload, decoded);
            prop_assert_eq!(decoded.unwrap().len(), expected_values);
        }
    }
}
