//! Reader for the JSON representation (`application/senml+json`, RFC 8428
//! section 5).

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::fields::{FieldValue, Format, Label, RawRecord};
use super::resolve::Resolver;
use super::{MAX_FIELDS_PER_RECORD, MAX_RECORDS, Record, SenmlError};
use crate::preview;

/// Parses a JSON pack and resolves its records. See the module docs.
pub(super) fn parse(payload: &[u8], now_ns: i64) -> Result<Vec<Record>, SenmlError> {
    let elements = read_elements(payload)?;

    let mut resolver = Resolver::new(Format::Json, now_ns);
    for (index, element) in elements.into_iter().enumerate() {
        let members = match element {
            Element::Object(members) => members,
            Element::Other(kind) => {
                return Err(SenmlError::in_record(
                    index,
                    format!("is {kind}, but a SenML record must be a JSON object"),
                ));
            }
        };
        let raw = to_raw_record(index, members)?;
        resolver.push(index, raw)?;
    }
    resolver.finish()
}

/// One element of the top-level array.
enum Element {
    /// Members in document order, repeated keys included.
    Object(Vec<(String, serde_json::Value)>),
    /// Any other JSON value, described for messages.
    Other(&'static str),
}

/// Parses the top-level array, stopping at the first limit that the
/// payload exceeds.
fn read_elements(payload: &[u8]) -> Result<Vec<Element>, SenmlError> {
    let first_byte = payload
        .iter()
        .find(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'));
    let found = match first_byte {
        Some(b'[') => None,
        Some(b'{') => Some("an object; wrap a single record in [ ]"),
        Some(_) => Some("another JSON value"),
        None => Some("an empty payload"),
    };
    if let Some(found) = found {
        return Err(SenmlError::general(format!(
            "expected a JSON array of SenML records, found {found}"
        )));
    }

    let limit_error = Cell::new(None);
    let mut deserializer = serde_json::Deserializer::from_slice(payload);
    let result = PackSeed {
        limit_error: &limit_error,
    }
    .deserialize(&mut deserializer)
    .and_then(|elements| deserializer.end().map(|()| elements));

    match result {
        Ok(elements) if elements.is_empty() => Err(SenmlError::general(
            "no records: the SenML pack is an empty array".to_owned(),
        )),
        Ok(elements) => Ok(elements),
        Err(error) => Err(limit_error
            .take()
            .unwrap_or_else(|| SenmlError::general(format!("malformed JSON: {error}")))),
    }
}

/// Checks the members of one record and stores the known fields.
fn to_raw_record(
    index: usize,
    members: Vec<(String, serde_json::Value)>,
) -> Result<RawRecord, SenmlError> {
    let mut raw = RawRecord::default();
    for (key, value) in members {
        let Some(label) = Label::from_json_label(&key) else {
            if key.ends_with('_') {
                return Err(SenmlError::in_field(
                    index,
                    &key,
                    &format!("\"{}\"", preview(&key)),
                    "Ferrite does not know this field, and a field whose label ends with '_' \
                     must be understood (RFC 8428 section 4.4); remove it or send the pack to \
                     a reader that supports it"
                        .to_owned(),
                ));
            }
            // RFC 8428 section 4.4: other unknown fields are ignored.
            continue;
        };

        raw.set(label, to_field_value(value), Format::Json)
            .map_err(|detail| {
                SenmlError::in_field(
                    index,
                    label.json_label(),
                    &label.describe(Format::Json),
                    detail,
                )
            })?;
    }
    Ok(raw)
}

fn to_field_value(value: serde_json::Value) -> FieldValue {
    match value {
        serde_json::Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                FieldValue::Integer(i128::from(integer))
            } else if let Some(integer) = number.as_u64() {
                FieldValue::Integer(i128::from(integer))
            } else {
                // serde_json rejects numbers outside the range of f64, so
                // this is finite.
                FieldValue::Float(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(text) => FieldValue::Text(text),
        serde_json::Value::Bool(boolean) => FieldValue::Bool(boolean),
        serde_json::Value::Null => FieldValue::Other("null".to_owned()),
        serde_json::Value::Array(_) => FieldValue::Other("an array".to_owned()),
        serde_json::Value::Object(_) => FieldValue::Other("an object".to_owned()),
    }
}

/// Deserializes the top-level array. A limit that is exceeded is stored in
/// `limit_error`, so that the caller can report it without the location
/// suffix that serde_json adds to every error.
struct PackSeed<'a> {
    limit_error: &'a Cell<Option<SenmlError>>,
}

impl<'de> DeserializeSeed<'de> for PackSeed<'_> {
    type Value = Vec<Element>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PackSeed<'_> {
    type Value = Vec<Element>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON array of SenML records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::new();
        loop {
            let seed = ElementSeed {
                limit_error: self.limit_error,
                index: elements.len(),
            };
            let Some(element) = seq.next_element_seed(seed)? else {
                return Ok(elements);
            };
            if elements.len() == MAX_RECORDS {
                self.limit_error.set(Some(too_many_records()));
                return Err(de::Error::custom("too many records"));
            }
            elements.push(element);
        }
    }
}

fn too_many_records() -> SenmlError {
    SenmlError::general(format!(
        "too many records: a pack may have at most {MAX_RECORDS} records; split it into \
         several requests"
    ))
}

struct ElementSeed<'a> {
    limit_error: &'a Cell<Option<SenmlError>>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = Element;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed<'_> {
    type Value = Element;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a SenML record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(member) = map.next_entry::<String, serde_json::Value>()? {
            if members.len() == MAX_FIELDS_PER_RECORD {
                self.limit_error.set(Some(SenmlError::in_record(
                    self.index,
                    format!(
                        "has more than {MAX_FIELDS_PER_RECORD} fields; a SenML record needs at \
                         most a few"
                    ),
                )));
                return Err(de::Error::custom("too many fields"));
            }
            members.push(member);
        }
        Ok(Element::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Element::Other("an array"))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Element::Other("a boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Element::Other("a number"))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Element::Other("a string"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Element::Other("null"))
    }
}
