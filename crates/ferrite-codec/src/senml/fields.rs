//! SenML labels and the type checks for one record's fields, shared by the
//! JSON and CBOR readers.

use std::fmt;

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use crate::{MAX_KEY_BYTES, MAX_STRING_VALUE_BYTES, preview};

/// Base64 with the URL-safe alphabet of RFC 4648 section 5. Decoding accepts
/// input with or without padding, and encoding writes none, as RFC 8428
/// requires for `vd`.
pub(super) const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The representation a pack arrived in. It decides how `vd` is encoded and
/// how fields are named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Json,
    Cbor,
}

/// A SenML label, the key of a field (RFC 8428 Table 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Label {
    BaseVersion,
    BaseName,
    BaseTime,
    BaseUnit,
    BaseValue,
    BaseSum,
    Name,
    Unit,
    Value,
    StringValue,
    BooleanValue,
    Sum,
    Time,
    UpdateTime,
    DataValue,
}

impl Label {
    const ALL: [Label; 15] = [
        Label::BaseVersion,
        Label::BaseName,
        Label::BaseTime,
        Label::BaseUnit,
        Label::BaseValue,
        Label::BaseSum,
        Label::Name,
        Label::Unit,
        Label::Value,
        Label::StringValue,
        Label::BooleanValue,
        Label::Sum,
        Label::Time,
        Label::UpdateTime,
        Label::DataValue,
    ];

    /// Returns the label as the JSON representation spells it.
    pub(super) fn json_label(self) -> &'static str {
        match self {
            Label::BaseVersion => "bver",
            Label::BaseName => "bn",
            Label::BaseTime => "bt",
            Label::BaseUnit => "bu",
            Label::BaseValue => "bv",
            Label::BaseSum => "bs",
            Label::Name => "n",
            Label::Unit => "u",
            Label::Value => "v",
            Label::StringValue => "vs",
            Label::BooleanValue => "vb",
            Label::Sum => "s",
            Label::Time => "t",
            Label::UpdateTime => "ut",
            Label::DataValue => "vd",
        }
    }

    /// Returns the integer map key of the CBOR representation (RFC 8428
    /// Table 4).
    pub(super) fn cbor_label(self) -> i8 {
        match self {
            Label::BaseVersion => -1,
            Label::BaseName => -2,
            Label::BaseTime => -3,
            Label::BaseUnit => -4,
            Label::BaseValue => -5,
            Label::BaseSum => -6,
            Label::Name => 0,
            Label::Unit => 1,
            Label::Value => 2,
            Label::StringValue => 3,
            Label::BooleanValue => 4,
            Label::Sum => 5,
            Label::Time => 6,
            Label::UpdateTime => 7,
            Label::DataValue => 8,
        }
    }

    pub(super) fn from_json_label(key: &str) -> Option<Label> {
        Label::ALL
            .into_iter()
            .find(|label| label.json_label() == key)
    }

    pub(super) fn from_cbor_label(key: i128) -> Option<Label> {
        Label::ALL
            .into_iter()
            .find(|label| i128::from(label.cbor_label()) == key)
    }

    /// Returns true for a base field, which carries over to the records that
    /// follow. Base fields have negative CBOR labels.
    pub(super) fn is_base(self) -> bool {
        self.cbor_label() < 0
    }

    fn bit(self) -> u16 {
        1 << (self.cbor_label() + 6)
    }

    /// Returns the field as messages name it: `"t"`, or
    /// `"t" (CBOR label 6)`.
    pub(super) fn describe(self, format: Format) -> String {
        match format {
            Format::Json => format!("\"{}\"", self.json_label()),
            Format::Cbor => format!(
                "\"{}\" (CBOR label {})",
                self.json_label(),
                self.cbor_label()
            ),
        }
    }
}

/// A number as the payload wrote it. Integers stay exact so that times in
/// whole seconds convert to nanoseconds without rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Number {
    Integer(i128),
    /// Always finite.
    Float(f64),
}

impl Number {
    pub(super) fn to_f64(self) -> f64 {
        match self {
            Number::Integer(integer) => integer as f64,
            Number::Float(float) => float,
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Integer(integer) => write!(f, "{integer}"),
            Number::Float(float) if (1e-6..1e15).contains(&float.abs()) || *float == 0.0 => {
                write!(f, "{float}")
            }
            Number::Float(float) => write!(f, "{float:e}"),
        }
    }
}

/// A field value as the JSON or CBOR reader found it, before its type is
/// checked against the label.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum FieldValue {
    Integer(i128),
    /// Any float, including NaN and infinities from CBOR.
    Float(f64),
    Text(String),
    Bool(bool),
    Bytes(Vec<u8>),
    /// Any other item, described for messages ("null", "an array", ...).
    Other(String),
}

impl FieldValue {
    fn kind(&self) -> String {
        match self {
            FieldValue::Integer(_) => "an integer".to_owned(),
            FieldValue::Float(float) if float.is_nan() => "NaN".to_owned(),
            FieldValue::Float(float) if float.is_infinite() => "an infinite number".to_owned(),
            FieldValue::Float(_) => "a number".to_owned(),
            FieldValue::Text(_) => "a string".to_owned(),
            FieldValue::Bool(_) => "a boolean".to_owned(),
            FieldValue::Bytes(_) => "a byte string".to_owned(),
            FieldValue::Other(kind) => kind.clone(),
        }
    }
}

/// The fields of one record, with their types checked but base fields not
/// yet applied.
#[derive(Debug, Default)]
pub(super) struct RawRecord {
    pub(super) base_version: Option<u64>,
    pub(super) base_name: Option<String>,
    pub(super) base_time: Option<Number>,
    pub(super) base_unit: Option<String>,
    pub(super) base_value: Option<Number>,
    pub(super) base_sum: Option<Number>,
    pub(super) name: Option<String>,
    pub(super) unit: Option<String>,
    pub(super) value: Option<Number>,
    pub(super) string_value: Option<String>,
    pub(super) boolean_value: Option<bool>,
    /// Base64url without padding, whatever the representation.
    pub(super) data_value: Option<String>,
    pub(super) sum: Option<Number>,
    pub(super) time: Option<Number>,
    pub(super) update_time: Option<f64>,
    /// One bit per label that the record contains.
    seen: u16,
}

impl RawRecord {
    /// Stores one field after checking its type and size. The error is the
    /// message without the record and field, which the caller adds.
    pub(super) fn set(
        &mut self,
        label: Label,
        value: FieldValue,
        format: Format,
    ) -> Result<(), String> {
        if self.seen & label.bit() != 0 {
            return Err("the field appears twice in the record; keep one".to_owned());
        }
        self.seen |= label.bit();

        match label {
            Label::BaseVersion => self.base_version = Some(version(value)?),
            Label::BaseName => self.base_name = Some(text(value, MAX_KEY_BYTES)?),
            Label::BaseTime => self.base_time = Some(number(value)?),
            Label::BaseUnit => self.base_unit = Some(text(value, MAX_KEY_BYTES)?),
            Label::BaseValue => self.base_value = Some(number(value)?),
            Label::BaseSum => self.base_sum = Some(number(value)?),
            Label::Name => self.name = Some(text(value, MAX_KEY_BYTES)?),
            Label::Unit => self.unit = Some(text(value, MAX_KEY_BYTES)?),
            Label::Value => self.value = Some(number(value)?),
            Label::StringValue => {
                self.string_value = Some(text(value, MAX_STRING_VALUE_BYTES)?);
            }
            Label::BooleanValue => self.boolean_value = Some(boolean(value)?),
            Label::Sum => self.sum = Some(number(value)?),
            Label::Time => self.time = Some(number(value)?),
            Label::UpdateTime => self.update_time = Some(update_time(value)?),
            Label::DataValue => self.data_value = Some(data_value(value, format)?),
        }
        Ok(())
    }

    /// Returns true when the record has a regular field (a label that is
    /// not a base field).
    pub(super) fn has_regular_field(&self) -> bool {
        Label::ALL
            .into_iter()
            .any(|label| !label.is_base() && self.seen & label.bit() != 0)
    }
}

fn number(value: FieldValue) -> Result<Number, String> {
    match value {
        FieldValue::Integer(integer) => Ok(Number::Integer(integer)),
        FieldValue::Float(float) if float.is_finite() => Ok(Number::Float(float)),
        other => Err(format!("must be a finite number, found {}", other.kind())),
    }
}

fn text(value: FieldValue, max_bytes: usize) -> Result<String, String> {
    match value {
        FieldValue::Text(text) if text.len() > max_bytes => Err(format!(
            "the string \"{}\" is {} bytes, over the limit of {max_bytes} bytes",
            preview(&text),
            text.len()
        )),
        FieldValue::Text(text) => Ok(text),
        other => Err(format!("must be a string, found {}", other.kind())),
    }
}

fn boolean(value: FieldValue) -> Result<bool, String> {
    match value {
        FieldValue::Bool(boolean) => Ok(boolean),
        other => Err(format!("must be true or false, found {}", other.kind())),
    }
}

fn version(value: FieldValue) -> Result<u64, String> {
    match value {
        FieldValue::Integer(integer) if integer >= 1 => {
            Ok(u64::try_from(integer).unwrap_or(u64::MAX))
        }
        FieldValue::Integer(integer) => Err(format!(
            "the version must be a positive integer, found {integer}"
        )),
        other => Err(format!(
            "the version must be a positive integer, found {}",
            other.kind()
        )),
    }
}

fn update_time(value: FieldValue) -> Result<f64, String> {
    let seconds = number(value)?.to_f64();
    if seconds < 0.0 {
        return Err(format!(
            "the update time is a period in seconds and cannot be negative, found {seconds}"
        ));
    }
    Ok(seconds)
}

/// Checks a data value and returns it as base64url without padding.
fn data_value(value: FieldValue, format: Format) -> Result<String, String> {
    let encoded = match (format, value) {
        (Format::Json, FieldValue::Text(text)) => {
            let bytes = BASE64URL.decode(&text).map_err(|error| {
                format!(
                    "\"{}\" is not base64url ({error}); encode the data with the URL-safe \
                     alphabet of RFC 4648 section 5 ('-' and '_' instead of '+' and '/'), \
                     without padding",
                    preview(&text)
                )
            })?;
            BASE64URL.encode(bytes)
        }
        (Format::Cbor, FieldValue::Bytes(bytes)) => BASE64URL.encode(bytes),
        (Format::Json, other) => {
            return Err(format!(
                "must be a base64url string, found {}",
                other.kind()
            ));
        }
        (Format::Cbor, other) => {
            return Err(format!(
                "must be a CBOR byte string, found {}",
                other.kind()
            ));
        }
    };

    if encoded.len() > MAX_STRING_VALUE_BYTES {
        return Err(format!(
            "the data is {} bytes in base64url, over the limit of {MAX_STRING_VALUE_BYTES} \
             bytes",
            encoded.len()
        ));
    }
    Ok(encoded)
}
