use ferrite_core::{MAX_TIMESTAMP_NS, Value};

use super::*;

const TS: i64 = 1_700_000_000_000_000_000;

/// Expected result of parsing one line.
enum Expected {
    Line {
        measurement: &'static str,
        tags: &'static [(&'static str, &'static str)],
        fields: Vec<(&'static str, Value)>,
    },
    /// An error whose message contains every one of these texts.
    Error(&'static [&'static str]),
}

struct Case {
    name: &'static str,
    line: String,
    expected: Expected,
}

fn case(name: &'static str, line: &str, expected: Expected) -> Case {
    Case {
        name,
        line: line.to_owned(),
        expected,
    }
}

fn line(
    measurement: &'static str,
    tags: &'static [(&'static str, &'static str)],
    fields: Vec<(&'static str, Value)>,
) -> Expected {
    Expected::Line {
        measurement,
        tags,
        fields,
    }
}

fn str_value(text: &str) -> Value {
    Value::Str(text.to_owned())
}

fn check_case(case: &Case) {
    let result = parse_line(&case.line, 1, Precision::Ns);
    match (&case.expected, result) {
        (
            Expected::Line {
                measurement,
                tags,
                fields,
            },
            Ok(Some(parsed)),
        ) => {
            assert_eq!(
                parsed.measurement, *measurement,
                "{}: measurement",
                case.name
            );
            let parsed_tags: Vec<(&str, &str)> = parsed
                .tags
                .iter()
                .map(|(key, value)| (key.as_str(), value.as_str()))
                .collect();
            assert_eq!(parsed_tags, *tags, "{}: tags", case.name);
            let parsed_fields: Vec<(&str, Value)> = parsed
                .fields
                .iter()
                .map(|(key, value)| (key.as_str(), value.clone()))
                .collect();
            assert_eq!(parsed_fields, *fields, "{}: fields", case.name);
            assert_eq!(parsed.timestamp_ns, Some(TS), "{}: timestamp", case.name);
            assert_eq!(parsed.line_number, 1, "{}: line number", case.name);
            assert_eq!(parsed.raw, case.line, "{}: raw", case.name);
        }
        (Expected::Error(fragments), Err(error)) => {
            assert_eq!(error.line_number, 1, "{}: line number", case.name);
            let display = error.to_string();
            assert!(display.starts_with("line 1: "), "{}: {display}", case.name);
            for fragment in *fragments {
                assert!(
                    error.message.contains(fragment),
                    "{}: message {:?} does not contain {fragment:?}",
                    case.name,
                    error.message
                );
            }
        }
        (Expected::Line { .. }, other) => {
            panic!("{}: expected a line, got {other:?}", case.name)
        }
        (Expected::Error(_), other) => {
            panic!("{}: expected an error, got {other:?}", case.name)
        }
    }
}

#[test]
fn parse_line_reference_cases() {
    let long_tag = format!("room,loc={} t=21.5 {TS}", "a".repeat(70_000));
    let cases = vec![
        case(
            "1: escaped comma makes the = of the next tag part of the value",
            r"disk,check=C:\,host=srv-01 value=52.45 1700000000000000000",
            Expected::Error(&[r#""C:\,host=srv-01""#, "unescaped \"=\"", r#""\\""#]),
        ),
        case(
            "2: escaped space, comma and equals sign in tags",
            r"room,loc=New\ York,dev=a\,b,k\=x=1 t=21.5 1700000000000000000",
            line(
                "room",
                &[("loc", "New York"), ("dev", "a,b"), ("k=x", "1")],
                vec![("t", Value::Float(21.5))],
            ),
        ),
        case(
            "3: escaped spaces in measurement and field key",
            r"my\ meas,dev=d1 f\ 1=2 1700000000000000000",
            line(
                "my meas",
                &[("dev", "d1")],
                vec![("f 1", Value::Float(2.0))],
            ),
        ),
        case(
            "4: unescaped quotes inside a string",
            r#"note,dev=d1 s="a "b" c" 1700000000000000000"#,
            Expected::Error(&["field \"s\"", "after the closing quote"]),
        ),
        case(
            "5: escaped quotes inside a string",
            r#"note,dev=d1 s="a \"b\" c" 1700000000000000000"#,
            line(
                "note",
                &[("dev", "d1")],
                vec![("s", str_value(r#"a "b" c"#))],
            ),
        ),
        case(
            "6: escaped backslash then a closing quote",
            r#"note,dev=d1 s="\\"howdy doody\\"" 1700000000000000000"#,
            Expected::Error(&["field \"s\"", "after the closing quote"]),
        ),
        case(
            "7: escaped backslash then escaped quote",
            r#"note,dev=d1 s="\\\"howdy doody\\\"" 1700000000000000000"#,
            line(
                "note",
                &[("dev", "d1")],
                vec![("s", str_value(r#"\"howdy doody\""#))],
            ),
        ),
        case(
            "8: string ending in an escaped backslash",
            r#"note,dev=d1 s="hello\\" 1700000000000000000"#,
            line("note", &[("dev", "d1")], vec![("s", str_value(r"hello\"))]),
        ),
        case(
            "9: backslash before another character is literal",
            r#"note,dev=d1 s="to\ee" 1700000000000000000"#,
            line("note", &[("dev", "d1")], vec![("s", str_value(r"to\ee"))]),
        ),
        case(
            "10: backslash n in a string is a newline",
            r#"note,dev=d1 s="line1\nline2" 1700000000000000000"#,
            line(
                "note",
                &[("dev", "d1")],
                vec![("s", str_value("line1\nline2"))],
            ),
        ),
        case(
            "11: UTF-8 tag values",
            "room,loc=Küche,icon=🌡 t=21.5 1700000000000000000",
            line(
                "room",
                &[("loc", "Küche"), ("icon", "🌡")],
                vec![("t", Value::Float(21.5))],
            ),
        ),
        case(
            "12: duplicate field key",
            "room,loc=x t=21.5,t=22.0 1700000000000000000",
            Expected::Error(&["duplicate field key \"t\""]),
        ),
        case(
            "13: no field set",
            "room,loc=x 1700000000000000000",
            Expected::Error(&["missing field set", "1700000000000000000"]),
        ),
        case(
            "14: empty tag value",
            "room,loc= t=1 1700000000000000000",
            Expected::Error(&["empty tag value", "\"loc\""]),
        ),
        Case {
            name: "15: tag value over the limit",
            line: long_tag,
            expected: Expected::Error(&["\"loc\"", "70000 bytes", "1024 bytes"]),
        },
    ];

    for case in &cases {
        check_case(case);
    }
}

#[test]
fn parse_line_value_types_and_escapes() {
    let cases = vec![
        case(
            "integer, unsigned, boolean and float types",
            "m a=1i,b=-7i,c=3u,d=t,e=FALSE,f=-1.5e3,g=.5,h=1. 1700000000000000000",
            line(
                "m",
                &[],
                vec![
                    ("a", Value::Int(1)),
                    ("b", Value::Int(-7)),
                    ("c", Value::Int(3)),
                    ("d", Value::Bool(true)),
                    ("e", Value::Bool(false)),
                    ("f", Value::Float(-1500.0)),
                    ("g", Value::Float(0.5)),
                    ("h", Value::Float(1.0)),
                ],
            ),
        ),
        case(
            "every boolean spelling",
            "m a=t,b=T,c=true,d=True,e=TRUE,f=f,g=F,h=false,i=False,j=FALSE 1700000000000000000",
            line(
                "m",
                &[],
                vec![
                    ("a", Value::Bool(true)),
                    ("b", Value::Bool(true)),
                    ("c", Value::Bool(true)),
                    ("d", Value::Bool(true)),
                    ("e", Value::Bool(true)),
                    ("f", Value::Bool(false)),
                    ("g", Value::Bool(false)),
                    ("h", Value::Bool(false)),
                    ("i", Value::Bool(false)),
                    ("j", Value::Bool(false)),
                ],
            ),
        ),
        case(
            "integer limits",
            "m a=9223372036854775807i,b=-9223372036854775808i,c=9223372036854775807u 1700000000000000000",
            line(
                "m",
                &[],
                vec![
                    ("a", Value::Int(i64::MAX)),
                    ("b", Value::Int(i64::MIN)),
                    ("c", Value::Int(i64::MAX)),
                ],
            ),
        ),
        case(
            "double backslash ends a tag value with a backslash",
            r"m,path=C:\\,host=a v=1 1700000000000000000",
            line(
                "m",
                &[("path", r"C:\"), ("host", "a")],
                vec![("v", Value::Float(1.0))],
            ),
        ),
        case(
            "backslash before other characters is literal in names",
            r"me\as\=,dir=C:\temp v\x=1 1700000000000000000",
            line(
                "me\\as\\=",
                &[("dir", r"C:\temp")],
                vec![(r"v\x", Value::Float(1.0))],
            ),
        ),
        case(
            "equals sign is literal in a measurement",
            "a=b v=1 1700000000000000000",
            line("a=b", &[], vec![("v", Value::Float(1.0))]),
        ),
        case(
            "string with commas, spaces and equals signs",
            r#"m s="a, b = c",v=1 1700000000000000000"#,
            line(
                "m",
                &[],
                vec![("s", str_value("a, b = c")), ("v", Value::Float(1.0))],
            ),
        ),
        case(
            "empty string",
            r#"m s="" 1700000000000000000"#,
            line("m", &[], vec![("s", str_value(""))]),
        ),
        case(
            "extra spaces between sections and around the line",
            " \tm,t=a  v=1   1700000000000000000 \t",
            line("m", &[("t", "a")], vec![("v", Value::Float(1.0))]),
        ),
        case(
            "integer overflow",
            "m a=9223372036854775808i 1700000000000000000",
            Expected::Error(&["9223372036854775808i", "\"a\"", "64-bit signed integer"]),
        ),
        case(
            "unsigned beyond i64",
            "m a=9223372036854775808u 1700000000000000000",
            Expected::Error(&["9223372036854775808u", "\"a\"", "9223372036854775807"]),
        ),
        case(
            "unsigned beyond u64",
            "m a=18446744073709551616u 1700000000000000000",
            Expected::Error(&["18446744073709551616u", "64-bit unsigned"]),
        ),
        case(
            "negative unsigned",
            "m a=-1u 1700000000000000000",
            Expected::Error(&["-1u", "cannot be negative"]),
        ),
        case(
            "infinity rejected",
            "m a=inf 1700000000000000000",
            Expected::Error(&["inf", "NaN and infinity"]),
        ),
        case(
            "NaN rejected",
            "m a=NaN 1700000000000000000",
            Expected::Error(&["NaN", "NaN and infinity"]),
        ),
        case(
            "float out of range",
            "m a=1e400 1700000000000000000",
            Expected::Error(&["1e400", "\"a\"", "64-bit float"]),
        ),
        case(
            "malformed float",
            "m a=1.2.3 1700000000000000000",
            Expected::Error(&["invalid float 1.2.3"]),
        ),
        case(
            "unquoted string",
            "m a=hello 1700000000000000000",
            Expected::Error(&["invalid value hello", "double-quoted string"]),
        ),
        case(
            "missing field value",
            "m a= 1700000000000000000",
            Expected::Error(&["missing value for field \"a\""]),
        ),
        case(
            "unterminated string",
            r#"m s="abc 1700000000000000000"#,
            Expected::Error(&["unterminated string", "\"s\""]),
        ),
        case(
            "string ending in an escaped quote is unterminated",
            r#"m s="abc\" 1700000000000000000"#,
            Expected::Error(&["unterminated string"]),
        ),
        case(
            "empty field key",
            "m =1 1700000000000000000",
            Expected::Error(&["empty field key"]),
        ),
        case(
            "empty tag key",
            "m,=a v=1 1700000000000000000",
            Expected::Error(&["empty tag key"]),
        ),
        case(
            "trailing comma in tag set",
            "m,t=a, v=1 1700000000000000000",
            Expected::Error(&["empty tag"]),
        ),
        case(
            "trailing comma in field set",
            "m a=1, 1700000000000000000",
            Expected::Error(&["empty field"]),
        ),
        case(
            "tag without equals sign",
            "m,host v=1 1700000000000000000",
            Expected::Error(&["invalid tag \"host\"", "missing \"=\""]),
        ),
        case(
            "field without equals sign",
            "m temp 1700000000000000000",
            Expected::Error(&["invalid field \"temp\"", "missing \"=\""]),
        ),
        case(
            "duplicate tag key",
            "m,t=a,t=b v=1 1700000000000000000",
            Expected::Error(&["duplicate tag key \"t\""]),
        ),
        case(
            "missing measurement",
            ",t=a v=1 1700000000000000000",
            Expected::Error(&["missing measurement"]),
        ),
        case(
            "measurement only",
            "m",
            Expected::Error(&["missing field set"]),
        ),
        case(
            "tags without fields",
            "m,t=a",
            Expected::Error(&["missing field set"]),
        ),
        case(
            "trailing text after the timestamp",
            "m v=1 1700000000000000000 extra",
            Expected::Error(&["unexpected text \"extra\"", "1700000000000000000"]),
        ),
        case(
            "measurement over the key limit",
            &format!("{} v=1 1700000000000000000", "m".repeat(257)),
            Expected::Error(&["measurement", "257 bytes", "256 bytes"]),
        ),
        case(
            "field key over the key limit",
            &format!("m {}=1 1700000000000000000", "k".repeat(257)),
            Expected::Error(&["field key", "257 bytes"]),
        ),
    ];

    for case in &cases {
        check_case(case);
    }
}

#[test]
fn parse_line_string_limit() {
    let at_limit = format!("m s=\"{}\"", "a".repeat(MAX_STRING_FIELD_BYTES));
    let parsed = parse_line(&at_limit, 1, Precision::Ns).unwrap().unwrap();
    assert_eq!(
        parsed.fields[0].1,
        Value::Str("a".repeat(MAX_STRING_FIELD_BYTES))
    );

    let over_limit = format!("m s=\"{}\"", "a".repeat(MAX_STRING_FIELD_BYTES + 1));
    let error = parse_line(&over_limit, 1, Precision::Ns).unwrap_err();
    assert!(error.message.contains("65536 bytes"), "{}", error.message);
    assert!(
        error.message.len() < 300,
        "message too long: {} bytes",
        error.message.len()
    );
}

#[test]
fn parse_line_skips_blank_and_comment_lines() {
    for text in ["", "   ", "\t", "# a comment", "  # indented comment", "\r"] {
        assert_eq!(parse_line(text, 1, Precision::Ns), Ok(None), "{text:?}");
    }
}

#[test]
fn parse_line_rejects_embedded_newline() {
    let error = parse_line("m v=1\nm v=2", 4, Precision::Ns).unwrap_err();
    assert_eq!(error.line_number, 4);
    assert!(error.message.contains("parse_batch"), "{}", error.message);
}

#[test]
fn parse_line_without_timestamp() {
    let parsed = parse_line("m v=1", 1, Precision::Ns).unwrap().unwrap();
    assert_eq!(parsed.timestamp_ns, None);

    let parsed = parse_line("m v=1   ", 1, Precision::Ns).unwrap().unwrap();
    assert_eq!(parsed.timestamp_ns, None);
}

#[test]
fn timestamps_scale_by_precision() {
    let cases = [
        ("1700000000", Precision::S),
        ("1700000000000", Precision::Ms),
        ("1700000000000000", Precision::Us),
        ("1700000000000000000", Precision::Ns),
    ];
    for (timestamp, precision) in cases {
        let text = format!("m v=1 {timestamp}");
        let parsed = parse_line(&text, 1, precision).unwrap().unwrap();
        assert_eq!(
            parsed.timestamp_ns,
            Some(TS),
            "{timestamp} with {precision}"
        );
    }
}

#[test]
fn timestamps_at_range_edges() {
    let accepted = [
        ("-1000000000", -1_000_000_000),
        ("9223372036854775806", MAX_TIMESTAMP_NS),
        ("-9223372036854775806", ferrite_core::MIN_TIMESTAMP_NS),
        ("+5", 5),
    ];
    for (timestamp, expected) in accepted {
        let text = format!("m v=1 {timestamp}");
        let parsed = parse_line(&text, 1, Precision::Ns).unwrap().unwrap();
        assert_eq!(parsed.timestamp_ns, Some(expected), "{timestamp}");
    }

    for timestamp in [
        "9223372036854775807",
        "-9223372036854775807",
        "-9223372036854775808",
    ] {
        let text = format!("m v=1 {timestamp}");
        let error = parse_line(&text, 1, Precision::Ns).unwrap_err();
        assert!(error.message.contains(timestamp), "{}", error.message);
        assert!(
            error.message.contains("outside the storable range"),
            "{}",
            error.message
        );
    }
}

#[test]
fn timestamp_overflow_names_precision() {
    let error = parse_line("m v=1 9300000000", 1, Precision::S).unwrap_err();
    assert!(
        error
            .message
            .contains("timestamp 9300000000 with precision s overflows the nanosecond range"),
        "{}",
        error.message
    );

    let error = parse_line("m v=1 99999999999999999999", 1, Precision::Ns).unwrap_err();
    assert!(error.message.contains("overflows"), "{}", error.message);
}

#[test]
fn timestamp_must_be_integer() {
    for timestamp in ["1.7e18", "1700000000000000000.0", "abc", "17i", "-"] {
        let text = format!("m v=1 {timestamp}");
        let error = parse_line(&text, 1, Precision::Ns).unwrap_err();
        assert!(
            error.message.contains("timestamp must be an integer"),
            "{timestamp}: {}",
            error.message
        );
    }
}

#[test]
fn batch_reports_bad_line_number() {
    let body = [
        r"room,loc=New\ York,dev=a\,b,k\=x=1 t=21.5 1700000000000000000",
        r"disk,check=C:\,host=srv-01 value=52.45 1700000000000000000",
        r#"note,dev=d1 s="a \"b\" c" 1700000000000000000"#,
    ]
    .join("\n");

    let errors = parse_batch(&body, Precision::Ns).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line_number, 2);
    assert!(
        errors[0].to_string().starts_with("line 2: "),
        "{}",
        errors[0]
    );
}

#[test]
fn batch_accepts_crlf_comments_and_blank_lines() {
    let body = "# header\r\nm v=1 1\r\n\r\nm v=2 2\r\n";
    let lines = parse_batch(body, Precision::Ns).unwrap();

    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].line_number, 2);
    assert_eq!(lines[0].raw, "m v=1 1");
    assert_eq!(lines[0].timestamp_ns, Some(1));
    assert_eq!(lines[1].line_number, 4);
    assert_eq!(lines[1].raw, "m v=2 2");
}

#[test]
fn batch_of_empty_body_is_empty() {
    assert_eq!(parse_batch("", Precision::Ns), Ok(Vec::new()));
    assert_eq!(
        parse_batch("\n\n# only comments\n", Precision::Ns),
        Ok(Vec::new())
    );
}

#[test]
fn batch_caps_reported_errors() {
    let body = "bad\n".repeat(250);
    let errors = parse_batch(&body, Precision::Ns).unwrap_err();

    assert_eq!(errors.len(), MAX_REPORTED_ERRORS);
    assert_eq!(errors[0].line_number, 1);
    assert_eq!(errors[99].line_number, 100);
}

#[test]
fn batch_reports_every_bad_line() {
    let body = "m v=1\nbad\nm v=2\nm,t= v=1\n";
    let errors = parse_batch(body, Precision::Ns).unwrap_err();
    let line_numbers: Vec<usize> = errors.iter().map(|error| error.line_number).collect();
    assert_eq!(line_numbers, [2, 4]);
}

#[test]
fn precision_names() {
    let accepted = [
        ("ns", Precision::Ns),
        ("n", Precision::Ns),
        ("us", Precision::Us),
        ("u", Precision::Us),
        ("µs", Precision::Us),
        ("ms", Precision::Ms),
        ("s", Precision::S),
    ];
    for (name, precision) in accepted {
        assert_eq!(name.parse::<Precision>(), Ok(precision), "{name}");
    }
    for precision in [Precision::Ns, Precision::Us, Precision::Ms, Precision::S] {
        assert_eq!(precision.to_string().parse::<Precision>(), Ok(precision));
    }

    let error = "h".parse::<Precision>().unwrap_err();
    assert!(error.to_string().contains("\"h\""), "{error}");
    assert_eq!(Precision::default(), Precision::Ns);
}

#[test]
fn precision_scale_is_checked() {
    assert_eq!(Precision::S.scale(2), Some(2_000_000_000));
    assert_eq!(Precision::Ms.scale(-3), Some(-3_000_000));
    assert_eq!(Precision::S.scale(9_300_000_000), None);
    assert_eq!(Precision::Ns.scale(i64::MAX), Some(i64::MAX));
}

#[test]
fn encode_line_escapes_specials() {
    let tags = vec![
        ("k=y".to_owned(), "New York, NY".to_owned()),
        ("path".to_owned(), r"C:\".to_owned()),
    ];
    let fields = vec![
        ("f 1".to_owned(), Value::Float(2.0)),
        ("n".to_owned(), Value::Int(-3)),
        ("b".to_owned(), Value::Bool(true)),
        ("s".to_owned(), Value::Str("say \"hi\"\\\n".to_owned())),
    ];

    let encoded = encode_line("my meas,x", &tags, &fields, Some(TS));
    assert_eq!(
        encoded,
        r#"my\ meas\,x,k\=y=New\ York\,\ NY,path=C:\\ f\ 1=2.0,n=-3i,b=true,s="say \"hi\"\\\n" 1700000000000000000"#
    );

    let parsed = parse_line(&encoded, 1, Precision::Ns).unwrap().unwrap();
    assert_eq!(parsed.measurement, "my meas,x");
    assert_eq!(parsed.tags, tags);
    assert_eq!(parsed.fields, fields);
    assert_eq!(parsed.timestamp_ns, Some(TS));
}

#[test]
fn write_line_builds_batch() {
    let mut body = String::new();
    let fields = vec![("v".to_owned(), Value::Float(0.1))];
    write_line(&mut body, "m", &[], &fields, None);
    write_line(&mut body, "m", &[], &fields, Some(7));

    assert_eq!(body, "m v=0.1\nm v=0.1 7\n");
    let lines = parse_batch(&body, Precision::Ns).unwrap();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1].timestamp_ns, Some(7));
}
