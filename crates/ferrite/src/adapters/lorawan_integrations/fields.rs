//! Reading fields of a JSON event with errors that name the full field
//! path (`rxInfo[1].rssi`), so a network server operator sees which value
//! was wrong. Pure: no I/O.
//!
//! Both network servers write their events with the protobuf JSON mapping,
//! where a scalar field equal to its default (0, false, "") may be left out.
//! The readers here therefore return `None` for a missing or `null` field,
//! and the parsers treat that as the default unless the field is required.

use base64::Engine;
use serde_json::{Map, Value};

/// Reason an event body was rejected. `Display` is the message for the
/// network server's operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is not valid JSON: {0}")]
    Syntax(String),
    #[error("missing field {field}: {hint}")]
    Missing { field: String, hint: &'static str },
    #[error("invalid field {field}: {detail}")]
    Invalid { field: String, detail: String },
}

impl ParseError {
    /// Returns the field path that was missing or invalid, if the body was
    /// JSON.
    pub fn field(&self) -> Option<&str> {
        match self {
            ParseError::Syntax(_) => None,
            ParseError::Missing { field, .. } | ParseError::Invalid { field, .. } => Some(field),
        }
    }
}

/// Parses a body that must be a JSON object.
pub fn parse_root(body: &[u8]) -> Result<Map<String, Value>, ParseError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|error| ParseError::Syntax(error.to_string()))?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(ParseError::Invalid {
            field: "(body)".to_owned(),
            detail: format!("expected a JSON object, got {}", kind_of(&other)),
        }),
    }
}

/// A JSON object and its path in the event, for error messages.
#[derive(Clone)]
pub struct Object<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Object<'a> {
    pub fn root(map: &'a Map<String, Value>) -> Object<'a> {
        Object {
            map,
            path: String::new(),
        }
    }

    /// Returns the path of `key` below this object.
    pub fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Returns the value of `key`, or `None` when it is missing or `null`.
    pub fn value(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    /// Returns `key` when it is present; absent or `null` is an error with
    /// `hint` saying where the value comes from.
    pub fn required(&self, key: &str, hint: &'static str) -> Result<&'a Value, ParseError> {
        self.value(key).ok_or_else(|| ParseError::Missing {
            field: self.path_of(key),
            hint,
        })
    }

    pub fn invalid(&self, key: &str, detail: String) -> ParseError {
        ParseError::Invalid {
            field: self.path_of(key),
            detail,
        }
    }

    /// Reads a nested object.
    pub fn object(&self, key: &str) -> Result<Option<Object<'a>>, ParseError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Object {
                map,
                path: self.path_of(key),
            })),
            Some(other) => {
                Err(self.invalid(key, format!("expected an object, got {}", kind_of(other))))
            }
        }
    }

    pub fn string(&self, key: &str) -> Result<Option<&'a str>, ParseError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => {
                Err(self.invalid(key, format!("expected a string, got {}", kind_of(other))))
            }
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ParseError> {
        match self.value(key) {
            None => Ok(None),
            Some(Value::Bool(flag)) => Ok(Some(*flag)),
            Some(other) => Err(self.invalid(
                key,
                format!("expected true or false, got {}", kind_of(other)),
            )),
        }
    }

    /// Reads an unsigned integer up to `max`. A decimal string is accepted
    /// too, because the protobuf JSON mapping writes 64-bit integers as
    /// strings (The Things Stack's `settings.frequency`).
    pub fn unsigned(&self, key: &str, max: u64) -> Result<Option<u64>, ParseError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        let number = match value {
            Value::Number(number) => number.as_u64(),
            Value::String(text) => text.trim().parse::<u64>().ok(),
            _ => None,
        };
        match number {
            Some(number) if number <= max => Ok(Some(number)),
            _ => Err(self.invalid(
                key,
                format!(
                    "expected an integer from 0 to {max}, got {}",
                    describe(value)
                ),
            )),
        }
    }

    /// Reads a signed integer in `min..=max`.
    pub fn signed(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ParseError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        let number = match value {
            Value::Number(number) => number.as_i64(),
            Value::String(text) => text.trim().parse::<i64>().ok(),
            _ => None,
        };
        match number {
            Some(number) if (min..=max).contains(&number) => Ok(Some(number)),
            _ => Err(self.invalid(
                key,
                format!(
                    "expected an integer from {min} to {max}, got {}",
                    describe(value)
                ),
            )),
        }
    }

    /// Reads a finite number.
    pub fn float(&self, key: &str) -> Result<Option<f64>, ParseError> {
        let Some(value) = self.value(key) else {
            return Ok(None);
        };
        match value.as_f64().filter(|number| number.is_finite()) {
            Some(number) => Ok(Some(number)),
            None => Err(self.invalid(key, format!("expected a number, got {}", describe(value)))),
        }
    }

    /// Reads an array; each item is returned with its own path.
    pub fn array(&self, key: &str) -> Result<Vec<(String, &'a Value)>, ParseError> {
        match self.value(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => {
                let base = self.path_of(key);
                Ok(items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| (format!("{base}[{index}]"), item))
                    .collect())
            }
            Some(other) => {
                Err(self.invalid(key, format!("expected an array, got {}", kind_of(other))))
            }
        }
    }

    /// Decodes a base64 string (standard or URL-safe alphabet, padding
    /// optional, as protobuf JSON parsers accept). Missing gives no bytes.
    pub fn base64(&self, key: &str) -> Result<Vec<u8>, ParseError> {
        let Some(text) = self.string(key)? else {
            return Ok(Vec::new());
        };
        decode_base64(text).ok_or_else(|| {
            self.invalid(
                key,
                format!(
                    "expected base64 bytes, got {:?}",
                    crate::profiles::preview(text)
                ),
            )
        })
    }

    /// Reads an RFC 3339 time as nanoseconds since the Unix epoch.
    pub fn time_ns(&self, key: &str) -> Result<Option<(i64, &'a str)>, ParseError> {
        let Some(text) = self.string(key)? else {
            return Ok(None);
        };
        let nanos = chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .and_then(|time| time.timestamp_nanos_opt());
        match nanos {
            Some(nanos) => Ok(Some((nanos, text))),
            None => Err(self.invalid(
                key,
                format!(
                    "expected an RFC 3339 time such as 2026-01-31T12:00:00Z, got {:?}",
                    crate::profiles::preview(text)
                ),
            )),
        }
    }
}

/// Views an array item as an object, or fails naming `path`.
pub fn item_object(path: String, value: &Value) -> Result<Object<'_>, ParseError> {
    match value {
        Value::Object(map) => Ok(Object { map, path }),
        other => Err(ParseError::Invalid {
            field: path,
            detail: format!("expected an object, got {}", kind_of(other)),
        }),
    }
}

/// Normalizes a DevEUI or gateway EUI to 16 lowercase hex digits.
pub fn normalize_eui(text: &str) -> Option<String> {
    let text = text.trim();
    (text.len() == 16 && text.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| text.to_ascii_lowercase())
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

    let text = text.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(text).ok())
}

/// Shows a wrong value in a message: a short one as JSON, a long string or
/// a container by its start or kind, so that a huge value does not flood
/// the response.
pub fn describe(value: &Value) -> String {
    match value {
        Value::String(text) => format!("{:?}", crate::profiles::preview(text)),
        Value::Array(_) | Value::Object(_) => kind_of(value).to_owned(),
        other => other.to_string(),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Map<String, Value> {
        parse_root(text.as_bytes()).expect("test JSON is an object")
    }

    #[test]
    fn integers_accept_decimal_strings() {
        let map = root(r#"{"frequency": "868100000", "fCnt": 7}"#);
        let object = Object::root(&map);
        assert_eq!(
            object.unsigned("frequency", u32::MAX.into()),
            Ok(Some(868_100_000))
        );
        assert_eq!(object.unsigned("fCnt", u32::MAX.into()), Ok(Some(7)));
        assert_eq!(object.unsigned("missing", 10), Ok(None));
    }

    #[test]
    fn out_of_range_integer_names_field() {
        let map = root(r#"{"fPort": 300}"#);
        let error = Object::root(&map).unsigned("fPort", 255).unwrap_err();
        assert_eq!(error.field(), Some("fPort"));
        assert!(error.to_string().contains("0 to 255"), "{error}");
    }

    #[test]
    fn base64_accepts_both_alphabets() {
        let map = root(r#"{"a": "AQID", "b": "_-8", "c": "not base64!"}"#);
        let object = Object::root(&map);
        assert_eq!(object.base64("a"), Ok(vec![1, 2, 3]));
        assert_eq!(object.base64("b"), Ok(vec![0xff, 0xef]));
        assert_eq!(object.base64("missing"), Ok(Vec::new()));
        assert_eq!(object.base64("c").unwrap_err().field(), Some("c"));
    }

    #[test]
    fn null_counts_as_missing() {
        let map = root(r#"{"object": null}"#);
        let error = Object::root(&map).required("object", "test").unwrap_err();
        assert_eq!(error.field(), Some("object"));
    }

    #[test]
    fn non_object_body_is_rejected() {
        assert!(matches!(
            parse_root(b"[1, 2]"),
            Err(ParseError::Invalid { .. })
        ));
        assert!(matches!(parse_root(b"{"), Err(ParseError::Syntax(_))));
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let long = "9".repeat(10_000);
        let map = root(&format!(r#"{{"fCnt": "{long}", "rssi": [1, 2, 3]}}"#));
        let object = Object::root(&map);
        let error = object.unsigned("fCnt", 10).unwrap_err().to_string();
        assert!(error.len() < 200, "{error}");
        let error = object.signed("rssi", -200, 0).unwrap_err().to_string();
        assert!(error.ends_with("got an array"), "{error}");
    }

    #[test]
    fn eui_is_normalized_to_lowercase() {
        assert_eq!(
            normalize_eui("0004A30B001C0530").as_deref(),
            Some("0004a30b001c0530")
        );
        assert_eq!(normalize_eui("0004a30b001c05"), None);
        assert_eq!(normalize_eui("0004a30b001c053g"), None);
    }
}
