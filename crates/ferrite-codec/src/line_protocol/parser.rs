//! Parser for one line of line protocol. The rules it implements are listed
//! in the docs of the `line_protocol` module.
//!
//! The parser walks the bytes of the line once. Every delimiter is ASCII, so
//! each position where it stops is a UTF-8 character boundary and tokens are
//! sliced from the line without copying. Only the final names and values are
//! allocated, and only tokens that contain escapes take the slower unescaping
//! path.

use ferrite_core::{TimestampNs, Value, is_storable_timestamp};

use super::{
    Line, LineError, MAX_KEY_BYTES, MAX_STRING_FIELD_BYTES, MAX_TAG_VALUE_BYTES, Precision,
};
use crate::{first_duplicate_key, preview};

/// Parses `text`, a line without its line ending.
pub(super) fn parse(
    text: &str,
    line_number: usize,
    precision: Precision,
) -> Result<Option<Line<'_>>, LineError> {
    let content = text.trim_matches([' ', '\t']);
    if content.is_empty() || content.starts_with('#') {
        return Ok(None);
    }

    let mut parser = LineParser {
        text: content,
        pos: 0,
    };
    match parser.parse_point(precision) {
        Ok(point) => Ok(Some(Line {
            line_number,
            raw: text,
            measurement: point.measurement,
            tags: point.tags,
            fields: point.fields,
            timestamp_ns: point.timestamp_ns,
        })),
        Err(message) => Err(LineError {
            line_number,
            message,
        }),
    }
}

/// The parts of a [`Line`] that the parser produces.
struct Point {
    measurement: String,
    tags: Vec<(String, String)>,
    fields: Vec<(String, Value)>,
    timestamp_ns: Option<TimestampNs>,
}

/// Element of a line whose text can contain backslash escapes.
#[derive(Clone, Copy)]
enum Element {
    Measurement,
    TagKey,
    TagValue,
    FieldKey,
}

impl Element {
    /// Returns true when a backslash before `byte` is an escape, and false
    /// when the backslash is kept literally.
    fn is_escapable(self, byte: u8) -> bool {
        match self {
            Element::Measurement => matches!(byte, b',' | b' ' | b'\\'),
            Element::TagKey | Element::TagValue | Element::FieldKey => {
                matches!(byte, b',' | b'=' | b' ' | b'\\')
            }
        }
    }

    /// Returns true when an unescaped `byte` ends the element.
    fn is_delimiter(self, byte: u8) -> bool {
        match self {
            Element::Measurement => matches!(byte, b',' | b' '),
            Element::TagKey | Element::TagValue | Element::FieldKey => {
                matches!(byte, b',' | b'=' | b' ')
            }
        }
    }
}

/// Text of one element, still escaped, and the delimiter that ended it.
struct Token<'a> {
    text: &'a str,
    has_escapes: bool,
    /// The unescaped delimiter after the token, or `None` at the end of the
    /// line. The parser's position is on this delimiter.
    delimiter: Option<u8>,
}

impl Token<'_> {
    fn unescape(&self, element: Element) -> String {
        if !self.has_escapes {
            return self.text.to_owned();
        }

        let mut unescaped = String::with_capacity(self.text.len());
        let mut rest = self.text;
        while let Some(index) = rest.find('\\') {
            match rest.as_bytes().get(index + 1) {
                Some(&next) if element.is_escapable(next) => {
                    unescaped.push_str(&rest[..index]);
                    unescaped.push(char::from(next));
                    rest = &rest[index + 2..];
                }
                _ => {
                    unescaped.push_str(&rest[..=index]);
                    rest = &rest[index + 1..];
                }
            }
        }
        unescaped.push_str(rest);
        unescaped
    }
}

struct LineParser<'a> {
    /// The line without line ending and without surrounding spaces and tabs.
    text: &'a str,
    /// Byte offset of the next unread byte in `text`.
    pos: usize,
}

impl<'a> LineParser<'a> {
    fn parse_point(&mut self, precision: Precision) -> Result<Point, String> {
        let measurement = self.parse_measurement()?;

        let mut tags = Vec::new();
        if self.peek() == Some(b',') {
            self.pos += 1;
            tags = self.parse_tags()?;
        }

        self.skip_spaces();
        if self.peek().is_none() {
            return Err(missing_field_set());
        }
        let fields = self.parse_fields()?;

        self.skip_spaces();
        let timestamp_ns = if self.peek().is_none() {
            None
        } else {
            Some(self.parse_timestamp(precision)?)
        };

        Ok(Point {
            measurement,
            tags,
            fields,
            timestamp_ns,
        })
    }

    fn parse_measurement(&mut self) -> Result<String, String> {
        let token = self.scan(Element::Measurement);
        if token.text.is_empty() {
            return Err(
                "missing measurement: the line starts with \",\"; start it with the \
                 measurement name, as in \"room,site=lab temp=21.5\""
                    .to_owned(),
            );
        }

        let measurement = token.unescape(Element::Measurement);
        check_key_length("measurement", &measurement)?;
        if token.delimiter.is_none() {
            return Err(missing_field_set());
        }
        Ok(measurement)
    }

    /// Parses the tag set after the comma that follows the measurement and
    /// stops on the space before the field set.
    fn parse_tags(&mut self) -> Result<Vec<(String, String)>, String> {
        let mut tags = Vec::new();
        loop {
            let key_token = self.scan(Element::TagKey);
            if key_token.delimiter != Some(b'=') {
                if key_token.text.is_empty() {
                    return Err(
                        "empty tag: a \",\" in the tag set is not followed by a tag; \
                         remove the extra comma"
                            .to_owned(),
                    );
                }
                return Err(format!(
                    "invalid tag \"{}\": missing \"=\" between tag key and tag value",
                    preview(key_token.text)
                ));
            }
            if key_token.text.is_empty() {
                return Err("empty tag key: every tag needs a key, as in \"site=lab\"".to_owned());
            }
            let key = key_token.unescape(Element::TagKey);
            check_key_length("tag key", &key)?;
            self.pos += 1;

            let value_start = self.pos;
            let value_token = self.scan(Element::TagValue);
            if value_token.delimiter == Some(b'=') {
                return Err(self.unescaped_equals_error(&key, value_start));
            }
            if value_token.text.is_empty() {
                return Err(format!(
                    "empty tag value for tag key \"{}\": omit a tag that has no value",
                    preview(&key)
                ));
            }
            let value = value_token.unescape(Element::TagValue);
            if value.len() > MAX_TAG_VALUE_BYTES {
                return Err(format!(
                    "tag value for tag key \"{}\" is {} bytes, over the limit of \
                     {MAX_TAG_VALUE_BYTES} bytes; shorten it or send it as a string field",
                    preview(&key),
                    value.len()
                ));
            }
            tags.push((key, value));

            match value_token.delimiter {
                Some(b',') => self.pos += 1,
                Some(_) => break,
                None => return Err(missing_field_set()),
            }
        }

        if let Some(key) = first_duplicate_key(&tags) {
            return Err(format!(
                "duplicate tag key \"{}\": a tag key may appear only once per line",
                preview(key)
            ));
        }
        Ok(tags)
    }

    /// Builds the error for a tag value that contains an unescaped `=`,
    /// showing the whole value up to the next unescaped `,` or space.
    fn unescaped_equals_error(&self, key: &str, value_start: usize) -> String {
        let bytes = self.text.as_bytes();
        let mut end = value_start;
        while let Some(&byte) = bytes.get(end) {
            if byte == b'\\'
                && bytes
                    .get(end + 1)
                    .is_some_and(|&next| Element::TagValue.is_escapable(next))
            {
                end += 2;
            } else if byte == b',' || byte == b' ' {
                break;
            } else {
                end += 1;
            }
        }
        let raw_value = &self.text[value_start..end];

        let mut message = format!(
            "invalid tag value \"{}\" for tag key \"{}\": it contains an unescaped \"=\"; \
             escape it as \"\\=\"",
            preview(raw_value),
            preview(key)
        );
        // The common cause: a value meant to end in a backslash, whose
        // backslash escaped the comma or space that should have ended it.
        if raw_value.contains("\\,") || raw_value.contains("\\ ") {
            message.push_str(
                ". A backslash before \",\" or \" \" escapes it, so the value did not end \
                 there; to end a tag value with a literal backslash, write it as \"\\\\\"",
            );
        }
        message
    }

    /// Parses the field set and stops on the space before the timestamp or
    /// at the end of the line.
    fn parse_fields(&mut self) -> Result<Vec<(String, Value)>, String> {
        let mut fields = Vec::new();
        loop {
            let key_token = self.scan(Element::FieldKey);
            if key_token.delimiter != Some(b'=') {
                return Err(self.missing_equals_error(&key_token, fields.is_empty()));
            }
            if key_token.text.is_empty() {
                return Err(
                    "empty field key: every field needs a key, as in \"temp=21.5\"".to_owned(),
                );
            }
            let key = key_token.unescape(Element::FieldKey);
            check_key_length("field key", &key)?;
            self.pos += 1;

            let value = self.parse_field_value(&key)?;
            fields.push((key, value));

            if self.peek() == Some(b',') {
                self.pos += 1;
            } else {
                break;
            }
        }

        if let Some(key) = first_duplicate_key(&fields) {
            return Err(format!(
                "duplicate field key \"{}\": a field key may appear only once per line",
                preview(key)
            ));
        }
        Ok(fields)
    }

    fn missing_equals_error(&self, key_token: &Token<'_>, is_first_field: bool) -> String {
        let looks_like_timestamp = !key_token.text.is_empty()
            && key_token
                .text
                .bytes()
                .all(|byte| byte.is_ascii_digit() || byte == b'-');
        if is_first_field && key_token.delimiter.is_none() && looks_like_timestamp {
            return format!(
                "missing field set: \"{}\" looks like a timestamp, but a line needs at least \
                 one field (key=value) before it, as in \"room temp=21.5 {}\"",
                preview(key_token.text),
                preview(key_token.text)
            );
        }
        if key_token.text.is_empty() {
            return "empty field: a \",\" in the field set is not followed by a field; \
                    remove the extra comma"
                .to_owned();
        }
        format!(
            "invalid field \"{}\": missing \"=\" between field key and field value",
            preview(key_token.text)
        )
    }

    /// Parses a field value and stops on the `,` or space after it, or at
    /// the end of the line.
    fn parse_field_value(&mut self, key: &str) -> Result<Value, String> {
        if self.peek() == Some(b'"') {
            return self.parse_string_value(key);
        }

        let start = self.pos;
        while let Some(byte) = self.peek() {
            if byte == b',' || byte == b' ' {
                break;
            }
            self.pos += 1;
        }
        parse_unquoted_value(key, &self.text[start..self.pos])
    }

    /// Parses a double-quoted string value starting at its opening quote.
    fn parse_string_value(&mut self, key: &str) -> Result<Value, String> {
        let bytes = self.text.as_bytes();
        let start = self.pos + 1;
        let mut end = start;
        let mut has_escapes = false;
        loop {
            match bytes.get(end) {
                None => {
                    return Err(format!(
                        "unterminated string value for field \"{}\": missing closing double \
                         quote; a raw newline ends the line, so write a newline inside a \
                         string as \\n",
                        preview(key)
                    ));
                }
                Some(b'\\') if matches!(bytes.get(end + 1), Some(b'"' | b'\\' | b'n')) => {
                    has_escapes = true;
                    end += 2;
                }
                Some(b'"') => break,
                Some(_) => end += 1,
            }
        }
        let raw = &self.text[start..end];
        self.pos = end + 1;

        if !matches!(self.peek(), None | Some(b',' | b' ')) {
            let rest_start = self.pos;
            while let Some(byte) = self.peek() {
                if byte == b',' || byte == b' ' {
                    break;
                }
                self.pos += 1;
            }
            return Err(format!(
                "invalid string value for field \"{}\": unexpected text {} after the closing \
                 quote of \"{}\"; escape a double quote inside a string as \\\" and a \
                 backslash before a quote as \\\\",
                preview(key),
                preview(&self.text[rest_start..self.pos]),
                preview(raw)
            ));
        }

        let value = if has_escapes {
            unescape_string(raw)
        } else {
            raw.to_owned()
        };
        if value.len() > MAX_STRING_FIELD_BYTES {
            return Err(format!(
                "string value for field \"{}\" is {} bytes, over the limit of \
                 {MAX_STRING_FIELD_BYTES} bytes",
                preview(key),
                value.len()
            ));
        }
        Ok(Value::Str(value))
    }

    /// Parses the timestamp, the last token of the line.
    fn parse_timestamp(&mut self, precision: Precision) -> Result<TimestampNs, String> {
        let start = self.pos;
        while let Some(byte) = self.peek() {
            if byte == b' ' || byte == b'\t' {
                break;
            }
            self.pos += 1;
        }
        let token = &self.text[start..self.pos];

        // Spaces and tabs at the end of the line were trimmed before
        // parsing, so anything left after them is extra text.
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
        if self.pos < self.text.len() {
            return Err(format!(
                "unexpected text \"{}\" after the timestamp \"{}\"; a line ends with its \
                 timestamp, and spaces inside names and values must be escaped",
                preview(&self.text[self.pos..]),
                preview(token)
            ));
        }

        scale_timestamp(token, precision)
    }

    fn scan(&mut self, element: Element) -> Token<'a> {
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let mut has_escapes = false;
        while let Some(&byte) = bytes.get(self.pos) {
            if byte == b'\\' {
                if bytes
                    .get(self.pos + 1)
                    .is_some_and(|&next| element.is_escapable(next))
                {
                    has_escapes = true;
                    self.pos += 2;
                } else {
                    self.pos += 1;
                }
            } else if element.is_delimiter(byte) {
                break;
            } else {
                self.pos += 1;
            }
        }
        Token {
            text: &self.text[start..self.pos],
            has_escapes,
            delimiter: bytes.get(self.pos).copied(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.pos += 1;
        }
    }
}

fn missing_field_set() -> String {
    "missing field set: a line needs at least one field after the measurement and tags, \
     as in \"room,site=lab temp=21.5\""
        .to_owned()
}

fn check_key_length(kind: &str, key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "{kind} \"{}\" is {} bytes, over the limit of {MAX_KEY_BYTES} bytes",
            preview(key),
            key.len()
        ));
    }
    Ok(())
}

/// Unescapes a string field value: `\"`, `\\` and `\n` (newline). A
/// backslash before any other character is kept.
fn unescape_string(raw: &str) -> String {
    let mut unescaped = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(index) = rest.find('\\') {
        let replacement = match rest.as_bytes().get(index + 1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'n') => Some('\n'),
            _ => None,
        };
        match replacement {
            Some(character) => {
                unescaped.push_str(&rest[..index]);
                unescaped.push(character);
                rest = &rest[index + 2..];
            }
            None => {
                unescaped.push_str(&rest[..=index]);
                rest = &rest[index + 1..];
            }
        }
    }
    unescaped.push_str(rest);
    unescaped
}

/// Parses a field value that is not a quoted string: a float, an integer
/// (`i` suffix), an unsigned integer (`u` suffix) or a boolean.
fn parse_unquoted_value(key: &str, token: &str) -> Result<Value, String> {
    if token.is_empty() {
        return Err(format!(
            "missing value for field \"{}\": write a value after \"=\", as in \"temp=21.5\"",
            preview(key)
        ));
    }

    if let Some(digits) = token.strip_suffix('i')
        && is_integer_syntax(digits)
    {
        return match digits.parse::<i64>() {
            Ok(value) => Ok(Value::Int(value)),
            Err(_) => Err(format!(
                "integer {} for field \"{}\" is outside the range of a 64-bit signed integer",
                preview(token),
                preview(key)
            )),
        };
    }
    if let Some(digits) = token.strip_suffix('u')
        && is_integer_syntax(digits)
    {
        return parse_unsigned(key, token, digits);
    }

    match token {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }

    if is_float_syntax(token) {
        return match token.parse::<f64>() {
            Ok(value) if value.is_finite() => Ok(Value::Float(value)),
            Ok(_) => Err(format!(
                "float {} for field \"{}\" is outside the range of a 64-bit float",
                preview(token),
                preview(key)
            )),
            Err(_) => Err(format!(
                "invalid float {} for field \"{}\"",
                preview(token),
                preview(key)
            )),
        };
    }

    let unsigned = token.trim_start_matches(['-', '+']);
    if ["nan", "inf", "infinity"]
        .iter()
        .any(|name| unsigned.eq_ignore_ascii_case(name))
    {
        return Err(format!(
            "invalid value {} for field \"{}\": NaN and infinity are not valid float values",
            preview(token),
            preview(key)
        ));
    }
    Err(format!(
        "invalid value {} for field \"{}\": expected a float (21.5), an integer (3i), an \
         unsigned integer (3u), a boolean (true or false) or a double-quoted string \
         (\"text\")",
        preview(token),
        preview(key)
    ))
}

fn parse_unsigned(key: &str, token: &str, digits: &str) -> Result<Value, String> {
    if digits.starts_with('-') {
        return Err(format!(
            "invalid unsigned integer {} for field \"{}\": an unsigned integer cannot be \
             negative; use the i suffix for a signed integer",
            preview(token),
            preview(key)
        ));
    }
    let Ok(value) = digits.parse::<u64>() else {
        return Err(format!(
            "unsigned integer {} for field \"{}\" is outside the range of a 64-bit unsigned \
             integer",
            preview(token),
            preview(key)
        ));
    };
    match i64::try_from(value) {
        Ok(value) => Ok(Value::Int(value)),
        Err(_) => Err(format!(
            "unsigned integer {} for field \"{}\" is larger than {}, the largest integer \
             Ferrite stores; send it as a float (without the u suffix) if losing precision \
             is acceptable",
            preview(token),
            preview(key),
            i64::MAX
        )),
    }
}

/// Returns true for an optional sign followed by one or more ASCII digits.
fn is_integer_syntax(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
}

/// Returns true when `text` uses only the characters of a decimal float and
/// starts like one. `f64::from_str` checks the rest. This check keeps out
/// the words that it would also accept (`inf`, `NaN`, `infinity`).
fn is_float_syntax(text: &str) -> bool {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    unsigned
        .bytes()
        .next()
        .is_some_and(|byte| byte.is_ascii_digit() || byte == b'.')
        && unsigned
            .bytes()
            .all(|byte| byte.is_ascii_digit() || matches!(byte, b'.' | b'e' | b'E' | b'+' | b'-'))
}

/// Converts a timestamp token in `precision` units to nanoseconds.
fn scale_timestamp(token: &str, precision: Precision) -> Result<TimestampNs, String> {
    if !is_integer_syntax(token) {
        return Err(format!(
            "invalid timestamp \"{}\": timestamp must be an integer number of {} since the \
             epoch (precision {precision})",
            preview(token),
            unit_name(precision)
        ));
    }

    let overflow = || {
        format!(
            "timestamp {} with precision {precision} overflows the nanosecond range \
             1677-09-21..2262-04-11; check that the precision matches the unit of the \
             timestamps",
            preview(token)
        )
    };
    let value = token.parse::<i64>().map_err(|_| overflow())?;
    let nanos = precision.scale(value).ok_or_else(overflow)?;
    if !is_storable_timestamp(nanos) {
        return Err(format!(
            "timestamp {token} with precision {precision} is outside the storable range \
             1677-09-21T00:12:43.145224194Z..2262-04-11T23:47:16.854775806Z"
        ));
    }
    Ok(nanos)
}

fn unit_name(precision: Precision) -> &'static str {
    match precision {
        Precision::Ns => "nanoseconds",
        Precision::Us => "microseconds",
        Precision::Ms => "milliseconds",
        Precision::S => "seconds",
    }
}
