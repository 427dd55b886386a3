//! Encoder for line protocol, used by load generators and tests.

use std::fmt::Write;

use ferrite_core::{TimestampNs, Value};

/// Characters escaped in a measurement.
const MEASUREMENT_SPECIALS: [char; 3] = [',', ' ', '\\'];

/// Characters escaped in tag keys, tag values and field keys.
const NAME_SPECIALS: [char; 4] = [',', '=', ' ', '\\'];

/// Encodes one point as a line of line protocol, without a line ending.
/// The timestamp is written in nanoseconds, so parse the line with
/// [`Precision::Ns`](super::Precision::Ns).
///
/// The encoder escapes every special character, so the line parses back to
/// the same measurement, tags, fields and timestamp when the input follows
/// the parser's rules. It does not check them:
/// - the measurement must not start with `#`, and names and tag values must
///   not contain a newline or `\r`;
/// - names and tag values must not be empty, keys must not repeat and there
///   must be at least one field;
/// - floats must be finite;
/// - lengths must stay within the limits of the `line_protocol` module.
pub fn encode_line(
    measurement: &str,
    tags: &[(String, String)],
    fields: &[(String, Value)],
    timestamp_ns: Option<TimestampNs>,
) -> String {
    let mut line = String::with_capacity(64);
    push_line(&mut line, measurement, tags, fields, timestamp_ns);
    line
}

/// Appends one line, followed by `\n`, to `body`. Repeated calls build a
/// batch without an allocation per line. The rules of [`encode_line`]
/// apply.
pub fn write_line(
    body: &mut String,
    measurement: &str,
    tags: &[(String, String)],
    fields: &[(String, Value)],
    timestamp_ns: Option<TimestampNs>,
) {
    push_line(body, measurement, tags, fields, timestamp_ns);
    body.push('\n');
}

fn push_line(
    out: &mut String,
    measurement: &str,
    tags: &[(String, String)],
    fields: &[(String, Value)],
    timestamp_ns: Option<TimestampNs>,
) {
    push_escaped(out, measurement, &MEASUREMENT_SPECIALS);
    for (key, value) in tags {
        out.push(',');
        push_escaped(out, key, &NAME_SPECIALS);
        out.push('=');
        push_escaped(out, value, &NAME_SPECIALS);
    }

    for (index, (key, value)) in fields.iter().enumerate() {
        out.push(if index == 0 { ' ' } else { ',' });
        push_escaped(out, key, &NAME_SPECIALS);
        out.push('=');
        push_value(out, value);
    }

    if let Some(timestamp_ns) = timestamp_ns {
        push_display(out, format_args!(" {timestamp_ns}"));
    }
}

fn push_escaped(out: &mut String, text: &str, specials: &[char]) {
    if !text.contains(specials) {
        out.push_str(text);
        return;
    }
    for character in text.chars() {
        if specials.contains(&character) {
            out.push('\\');
        }
        out.push(character);
    }
}

fn push_value(out: &mut String, value: &Value) {
    match value {
        // Debug output is the shortest text that parses back to the same
        // f64, and it always has a "." or an exponent, so it never looks
        // like an integer to a reader.
        Value::Float(number) => push_display(out, format_args!("{number:?}")),
        Value::Int(number) => push_display(out, format_args!("{number}i")),
        Value::Bool(flag) => out.push_str(if *flag { "true" } else { "false" }),
        Value::Str(text) => {
            out.push('"');
            for character in text.chars() {
                match character {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    _ => out.push(character),
                }
            }
            out.push('"');
        }
    }
}

fn push_display(out: &mut String, arguments: std::fmt::Arguments<'_>) {
    out.write_fmt(arguments)
        .expect("formatting into a String does not fail");
}
