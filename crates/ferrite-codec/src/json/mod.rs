//! Telemetry JSON.
//!
//! # Accepted shapes
//!
//! 1. A flat object of values. Its `ts_ns` is `None`, and the caller uses
//!    the receive time: `{"temp": 21.5, "on": true}`
//! 2. A record with a timestamp, with exactly the keys `ts` and `values`:
//!    `{"ts": 1714953600000, "values": {"temp": 21.5}}`
//! 3. An array of objects of shape 1 or 2, each one record:
//!    `[{"ts": 1714953600000, "values": {"temp": 21.5}}, {"temp": 22.0}]`
//!
//! The keys `ts` and `values` are reserved at the top level of a record: an
//! object with either of them must have exactly these two keys. So a flat
//! object cannot carry a value named `ts` or `values` at its top level,
//! which keeps a misspelled record from being stored as ordinary values.
//! An empty object, an empty `values` object and an empty array are
//! rejected with "no values".
//!
//! # Keys
//!
//! Nested objects are flattened by joining keys with dots:
//! `{"gps": {"lat": 1, "lon": 2}}` gives `gps.lat` and `gps.lon`. Objects
//! may nest [`MAX_NESTING_DEPTH`] levels deep, counting the object that
//! contains the values, and a nested empty object is rejected. Every key
//! must be non-empty, and a flattened key may be at most [`MAX_KEY_BYTES`]
//! bytes long. A key may appear only once per record after flattening, so
//! `{"a.b": 1, "a": {"b": 2}}` is rejected, as is a key repeated in the same
//! object.
//!
//! # Value types
//!
//! Values are typed from their literal JSON text, not from an intermediate
//! `f64`, so no precision is lost on the way:
//!
//! | JSON                                         | Value                                   |
//! |----------------------------------------------|-----------------------------------------|
//! | integer that fits `i64` (`42`, `-7`)         | `Int`                                   |
//! | integer beyond `i64` (`9223372036854775808`) | `Float`, the nearest `f64`              |
//! | number with a fraction or exponent (`1.5`, `1e3`, `-0.0`) | `Float`, correctly rounded |
//! | `true`, `false`                              | `Bool`                                  |
//! | string                                       | `Str`, up to [`MAX_STRING_VALUE_BYTES`] bytes |
//!
//! Strings are never converted to numbers or booleans: `"21.5"` and `"true"`
//! stay strings. A number outside the range of `f64` (`1e400`), `null` and
//! arrays are rejected with an error that names the key.
//!
//! # Timestamps
//!
//! `ts` is either a JSON integer in milliseconds since the Unix epoch or an
//! RFC 3339 string such as `"2024-05-06T00:00:00Z"` or
//! `"2024-05-06T02:00:00.250+02:00"`. A number with a fraction or exponent
//! (`1.5e12`) is rejected. An integer below [`MIN_PLAUSIBLE_TS_MS`]
//! (1973-03-03T09:46:40Z) is rejected too, because it is almost always a
//! timestamp in seconds: the plausibility rule. The rule applies to integer
//! timestamps only. A timestamp outside the storable range of
//! `ferrite_core` is rejected. The caller checks timestamps that are too
//! far in the future.
//!
//! # Errors
//!
//! Invalid JSON, including `NaN`, `Infinity`, leading zeros (`01`), `.5`,
//! trailing commas and invalid UTF-8, gives a message that starts with
//! `malformed JSON:` and, where serde_json reports them, the line and
//! column. Other errors set [`JsonError::key`] and name the key in the
//! message. In an array, the message starts with the index of the record.

#[cfg(test)]
mod tests;

use std::fmt;

use ferrite_core::{TimestampNs, Value, is_storable_timestamp, millis_to_nanos};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

pub use crate::{MAX_KEY_BYTES, MAX_STRING_VALUE_BYTES};
use crate::{first_duplicate_key, preview};

/// Smallest accepted integer `ts`, in milliseconds: 1973-03-03T09:46:40Z.
/// A smaller value is almost always a timestamp in seconds.
pub const MIN_PLAUSIBLE_TS_MS: i64 = 100_000_000_000;

/// Maximum number of nested object levels in a record, counting the object
/// that contains the values.
pub const MAX_NESTING_DEPTH: usize = 32;

/// Values that share one timestamp.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Timestamp from `ts`, or `None` for a flat object.
    pub ts_ns: Option<TimestampNs>,
    /// Flattened keys and their values, in document order.
    pub values: Vec<(String, Value)>,
}

/// A payload that could not be decoded. Its `Display` output is the
/// message, which names the key when there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct JsonError {
    /// The flattened key the error is about, when there is one, shortened
    /// like in the message when it is over [`MAX_KEY_BYTES`].
    pub key: Option<String>,
    /// Description of the problem and the fix.
    pub message: String,
}

impl JsonError {
    fn general(message: String) -> Self {
        JsonError { key: None, message }
    }

    fn for_key(key: &str, message: String) -> Self {
        JsonError {
            key: Some(key.to_owned()),
            message,
        }
    }

    fn malformed(error: &serde_json::Error) -> Self {
        JsonError::general(format!("malformed JSON: {error}"))
    }

    fn in_record(mut self, index: usize) -> Self {
        self.message = format!("record at index {index}: {}", self.message);
        self
    }
}

/// Parses a telemetry JSON payload into records. See the module docs for
/// the accepted shapes and rules.
pub fn parse_telemetry(body: &[u8]) -> Result<Vec<Record>, JsonError> {
    let text = std::str::from_utf8(body).map_err(|error| {
        JsonError::general(format!(
            "malformed JSON: the payload is not valid UTF-8: {error}"
        ))
    })?;
    // Parsing into a RawValue checks the syntax of the whole payload first,
    // so the later steps can slice it without meeting syntax errors.
    let root: &RawValue =
        serde_json::from_str(text).map_err(|error| JsonError::malformed(&error))?;
    let root_text = root.get().trim_start();

    if root_text.starts_with('{') {
        return Ok(vec![parse_record(root_text)?]);
    }
    if !root_text.starts_with('[') {
        return Err(JsonError::general(format!(
            "expected a JSON object or an array of objects, found {}",
            kind_name(root_text)
        )));
    }

    let elements: Vec<&RawValue> =
        serde_json::from_str(root_text).map_err(|error| JsonError::malformed(&error))?;
    if elements.is_empty() {
        return Err(JsonError::general(
            "no values: the array is empty".to_owned(),
        ));
    }
    let mut records = Vec::with_capacity(elements.len());
    for (index, element) in elements.iter().enumerate() {
        let element_text = element.get().trim_start();
        if !element_text.starts_with('{') {
            return Err(JsonError::general(format!(
                "expected a JSON object, found {}",
                kind_name(element_text)
            ))
            .in_record(index));
        }
        records.push(parse_record(element_text).map_err(|error| error.in_record(index))?);
    }
    Ok(records)
}

/// Parses one record from the text of a JSON object.
fn parse_record(text: &str) -> Result<Record, JsonError> {
    let members = parse_members(text)?;

    let is_envelope = members
        .iter()
        .any(|(key, _)| key == "ts" || key == "values");
    let (ts_ns, value_members) = if is_envelope {
        let (ts, values) = split_envelope(&members)?;
        (Some(parse_ts(ts)?), parse_members(values)?)
    } else {
        (None, members)
    };

    let mut values = Vec::with_capacity(value_members.len());
    flatten(None, value_members, 1, &mut values)?;
    if values.is_empty() {
        let empty_part = if is_envelope {
            "\"values\" is an empty object"
        } else {
            "the record is an empty object"
        };
        return Err(JsonError::general(format!("no values: {empty_part}")));
    }
    if let Some(key) = first_duplicate_key(&values) {
        return Err(JsonError::for_key(
            key,
            format!(
                "duplicate key \"{}\": a key may appear only once in a record, counting \
                 nested keys after they are joined with dots",
                preview(key)
            ),
        ));
    }

    Ok(Record { ts_ns, values })
}

/// Returns the texts of `ts` and `values` from a record of shape
/// `{"ts": ..., "values": {...}}`.
fn split_envelope<'a>(members: &[(String, &'a RawValue)]) -> Result<(&'a str, &'a str), JsonError> {
    let find = |name: &str| {
        members
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.get().trim_start())
    };
    let (Some(ts), Some(values), 2) = (find("ts"), find("values"), members.len()) else {
        return Err(JsonError::general(format!(
            "invalid record: a record with \"ts\" or \"values\" must have exactly these two \
             keys, as in {{\"ts\": 1714953600000, \"values\": {{\"temp\": 21.5}}}}, but it has \
             the keys {}",
            list_keys(members)
        )));
    };

    if !values.starts_with('{') {
        return Err(JsonError::for_key(
            "values",
            format!(
                "\"values\" must be an object of telemetry values, found {}",
                kind_name(values)
            ),
        ));
    }
    Ok((ts, values))
}

/// Flattens the members of an object at nesting level `depth` into `out`,
/// prefixing their keys with `prefix` and a dot.
fn flatten(
    prefix: Option<&str>,
    members: Vec<(String, &RawValue)>,
    depth: usize,
    out: &mut Vec<(String, Value)>,
) -> Result<(), JsonError> {
    for (name, raw) in members {
        if name.is_empty() {
            return Err(match prefix {
                None => JsonError::general(
                    "empty key: every telemetry value needs a non-empty key".to_owned(),
                ),
                Some(prefix) => JsonError::for_key(
                    prefix,
                    format!(
                        "empty key inside \"{}\": every telemetry value needs a non-empty key",
                        preview(prefix)
                    ),
                ),
            });
        }
        let key = match prefix {
            None => name,
            Some(prefix) => format!("{prefix}.{name}"),
        };
        if key.len() > MAX_KEY_BYTES {
            return Err(JsonError::for_key(
                &preview(&key),
                format!(
                    "key \"{}\" is {} bytes, over the limit of {MAX_KEY_BYTES} bytes (a nested \
                     key counts in full, with its dots)",
                    preview(&key),
                    key.len()
                ),
            ));
        }

        let text = raw.get().trim_start();
        if !text.starts_with('{') {
            let value = parse_value(&key, text)?;
            out.push((key, value));
            continue;
        }

        if depth == MAX_NESTING_DEPTH {
            return Err(JsonError::for_key(
                &key,
                format!(
                    "value of \"{}\" nests objects deeper than {MAX_NESTING_DEPTH} levels",
                    preview(&key)
                ),
            ));
        }
        let nested = parse_members(text)?;
        if nested.is_empty() {
            return Err(JsonError::for_key(
                &key,
                format!(
                    "value of \"{}\" is an empty object; omit the key instead",
                    preview(&key)
                ),
            ));
        }
        flatten(Some(&key), nested, depth + 1, out)?;
    }
    Ok(())
}

/// Converts the text of a JSON scalar or array into a value.
fn parse_value(key: &str, text: &str) -> Result<Value, JsonError> {
    match text.as_bytes().first() {
        Some(b'"') => {
            let string: String =
                serde_json::from_str(text).map_err(|error| JsonError::malformed(&error))?;
            if string.len() > MAX_STRING_VALUE_BYTES {
                return Err(JsonError::for_key(
                    key,
                    format!(
                        "string value of \"{}\" is {} bytes, over the limit of \
                         {MAX_STRING_VALUE_BYTES} bytes",
                        preview(key),
                        string.len()
                    ),
                ));
            }
            Ok(Value::Str(string))
        }
        Some(b't') => Ok(Value::Bool(true)),
        Some(b'f') => Ok(Value::Bool(false)),
        Some(b'n') => Err(JsonError::for_key(
            key,
            format!(
                "invalid value of \"{}\": null is not a telemetry value; omit the key instead",
                preview(key)
            ),
        )),
        Some(b'[') => Err(JsonError::for_key(
            key,
            format!(
                "invalid value of \"{0}\": arrays are not telemetry values; send each element \
                 under its own key, as in \"{0}.0\"",
                preview(key)
            ),
        )),
        _ => parse_number(key, text),
    }
}

/// Converts the literal text of a JSON number: an integer that fits `i64`
/// becomes `Int`, anything else `Float`.
fn parse_number(key: &str, text: &str) -> Result<Value, JsonError> {
    let is_integer = !text.bytes().any(|byte| matches!(byte, b'.' | b'e' | b'E'));
    if is_integer && let Ok(integer) = text.parse::<i64>() {
        return Ok(Value::Int(integer));
    }

    // `f64::from_str` rounds correctly, and it accepts every JSON number.
    match text.parse::<f64>() {
        Ok(float) if float.is_finite() => Ok(Value::Float(float)),
        _ => Err(JsonError::for_key(
            key,
            format!(
                "value of \"{}\" is outside the range of a 64-bit float: {}",
                preview(key),
                preview(text)
            ),
        )),
    }
}

/// Converts the text of `ts` to nanoseconds.
fn parse_ts(text: &str) -> Result<TimestampNs, JsonError> {
    match text.as_bytes().first() {
        Some(b'"') => {
            let string: String =
                serde_json::from_str(text).map_err(|error| JsonError::malformed(&error))?;
            parse_rfc3339_ts(&string)
        }
        Some(b'-' | b'0'..=b'9') => parse_millis_ts(text),
        _ => Err(JsonError::for_key(
            "ts",
            format!(
                "ts must be an integer number of milliseconds since the epoch or an RFC 3339 \
                 string, found {}",
                kind_name(text)
            ),
        )),
    }
}

fn parse_millis_ts(text: &str) -> Result<TimestampNs, JsonError> {
    if text.bytes().any(|byte| matches!(byte, b'.' | b'e' | b'E')) {
        return Err(JsonError::for_key(
            "ts",
            format!(
                "ts must be an integer number of milliseconds since the epoch, found {}",
                preview(text)
            ),
        ));
    }

    let out_of_range = || {
        JsonError::for_key(
            "ts",
            format!(
                "ts {} is outside the storable range 1677-09-21..2262-04-11 (ts is in \
                 milliseconds since the epoch)",
                preview(text)
            ),
        )
    };
    let millis = text.parse::<i64>().map_err(|_| out_of_range())?;
    if millis < MIN_PLAUSIBLE_TS_MS {
        return Err(JsonError::for_key(
            "ts",
            format!(
                "ts {millis} is before 1973-03-03: ts is in milliseconds since the epoch; a \
                 value in seconds must be multiplied by 1000"
            ),
        ));
    }
    millis_to_nanos(millis).ok_or_else(out_of_range)
}

fn parse_rfc3339_ts(text: &str) -> Result<TimestampNs, JsonError> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|error| {
        JsonError::for_key(
            "ts",
            format!(
                "ts \"{}\" is not an RFC 3339 timestamp ({error}); write it like \
                 \"2024-05-06T00:00:00Z\", or as an integer number of milliseconds since \
                 the epoch",
                preview(text)
            ),
        )
    })?;

    match parsed.timestamp_nanos_opt() {
        Some(nanos) if is_storable_timestamp(nanos) => Ok(nanos),
        _ => Err(JsonError::for_key(
            "ts",
            format!(
                "ts \"{}\" is outside the storable range 1677-09-21..2262-04-11",
                preview(text)
            ),
        )),
    }
}

/// Members of a JSON object in document order, including repeated keys,
/// with their values still as raw JSON text.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(MembersVisitor)
    }
}

struct MembersVisitor;

impl<'de> Visitor<'de> for MembersVisitor {
    type Value = Members<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0));
        while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
            members.push((key, value));
        }
        Ok(Members(members))
    }
}

fn parse_members(text: &str) -> Result<Vec<(String, &RawValue)>, JsonError> {
    let members: Members<'_> =
        serde_json::from_str(text).map_err(|error| JsonError::malformed(&error))?;
    Ok(members.0)
}

/// Name of the JSON type of `text` for messages.
fn kind_name(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Lists the keys of an object for messages, shortened after a few keys.
fn list_keys(members: &[(String, &RawValue)]) -> String {
    const MAX_LISTED_KEYS: usize = 8;

    let mut listed: Vec<String> = members
        .iter()
        .take(MAX_LISTED_KEYS)
        .map(|(key, _)| format!("\"{}\"", preview(key)))
        .collect();
    if members.len() > MAX_LISTED_KEYS {
        listed.push(format!("and {} more", members.len() - MAX_LISTED_KEYS));
    }
    listed.join(", ")
}
