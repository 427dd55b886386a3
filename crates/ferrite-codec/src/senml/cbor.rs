//! Reader for the CBOR representation (`application/senml+cbor`, RFC 8428
//! section 6), built on ciborium.

use std::fmt;

use ciborium::Value as CborValue;
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::fields::{FieldValue, Format, Label, RawRecord};
use super::resolve::Resolver;
use super::{MAX_FIELDS_PER_RECORD, MAX_RECORDS, Record, SenmlError};
use crate::preview;

/// CBOR decimal fraction, `[exponent, mantissa]` (RFC 8949 section 3.4.4),
/// which RFC 8428 allows for numbers.
const TAG_DECIMAL_FRACTION: u64 = 4;

/// Major types of the first byte (RFC 8949 section 3.1).
const MAJOR_TYPE_ARRAY: u8 = 4;
const MAJOR_TYPE_TAG: u8 = 6;

/// Parses a CBOR pack and resolves its records. See the module docs.
pub(super) fn parse(payload: &[u8], now_ns: i64) -> Result<Vec<Record>, SenmlError> {
    let items = read_items(payload)?;

    let mut resolver = Resolver::new(Format::Cbor, now_ns);
    for (index, item) in items.into_iter().enumerate() {
        let entries = match item {
            Item::Map(entries) => entries,
            Item::Other(kind) => {
                return Err(SenmlError::in_record(
                    index,
                    format!("is {kind}, but a SenML record must be a CBOR map"),
                ));
            }
        };
        let raw = to_raw_record(index, entries)?;
        resolver.push(index, raw)?;
    }
    resolver.finish()
}

/// One element of the top-level array.
enum Item {
    Map(Vec<(CborValue, CborValue)>),
    /// Any other CBOR item, described for messages.
    Other(&'static str),
}

/// An element as [`ElementSeed`] reads it.
enum Element {
    Item(Item),
    /// A map with more than [`MAX_FIELDS_PER_RECORD`] entries, not read to
    /// its end.
    TooManyFields,
}

/// The top-level array, or the first limit that it exceeds. On a limit
/// the rest of the payload is left unread, which ciborium allows.
enum Pack {
    Complete(Vec<Item>),
    LimitExceeded(SenmlError),
}

fn read_items(payload: &[u8]) -> Result<Vec<Item>, SenmlError> {
    let Some(&first_byte) = payload.first() else {
        return Err(SenmlError::general(
            "expected a CBOR array of SenML records, found an empty payload".to_owned(),
        ));
    };
    let major_type = first_byte >> 5;
    if major_type != MAJOR_TYPE_ARRAY && major_type != MAJOR_TYPE_TAG {
        return Err(SenmlError::general(format!(
            "expected a CBOR array of SenML records, found {}",
            major_type_name(major_type)
        )));
    }

    let mut rest = payload;
    let pack: Pack = ciborium::de::from_reader(&mut rest).map_err(|error| malformed(&error))?;
    let items = match pack {
        Pack::LimitExceeded(error) => return Err(error),
        Pack::Complete(items) => items,
    };

    if !rest.is_empty() {
        return Err(SenmlError::general(format!(
            "malformed CBOR: {} bytes follow the array of records; send one array per payload",
            rest.len()
        )));
    }
    if items.is_empty() {
        return Err(SenmlError::general(
            "no records: the SenML pack is an empty array".to_owned(),
        ));
    }
    Ok(items)
}

fn malformed(error: &ciborium::de::Error<std::io::Error>) -> SenmlError {
    let message = match error {
        ciborium::de::Error::Io(io_error)
            if io_error.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            "truncated CBOR: the payload ends inside an item; send the complete pack".to_owned()
        }
        ciborium::de::Error::Io(io_error) => format!("malformed CBOR: {io_error}"),
        ciborium::de::Error::Syntax(offset) => {
            format!("malformed CBOR: invalid item at byte {offset}")
        }
        ciborium::de::Error::Semantic(Some(offset), detail) => {
            format!("malformed CBOR at byte {offset}: {detail}")
        }
        ciborium::de::Error::Semantic(None, detail) => format!("malformed CBOR: {detail}"),
        ciborium::de::Error::RecursionLimitExceeded => {
            "malformed CBOR: items nest too deeply".to_owned()
        }
    };
    SenmlError::general(message)
}

/// Checks the entries of one record map and stores the known fields.
fn to_raw_record(
    index: usize,
    entries: Vec<(CborValue, CborValue)>,
) -> Result<RawRecord, SenmlError> {
    let mut raw = RawRecord::default();
    for (key, value) in entries {
        let Some(label) = to_label(index, key)? else {
            continue;
        };
        raw.set(label, to_field_value(value), Format::Cbor)
            .map_err(|detail| {
                SenmlError::in_field(
                    index,
                    label.json_label(),
                    &label.describe(Format::Cbor),
                    detail,
                )
            })?;
    }
    Ok(raw)
}

/// Returns the label of a map key, `None` for a field to ignore, or an
/// error for a key that must be understood.
fn to_label(index: usize, key: CborValue) -> Result<Option<Label>, SenmlError> {
    match key {
        // RFC 8428 Table 4 is conclusive, and other integer labels are
        // unknown fields, which are ignored.
        CborValue::Integer(integer) => Ok(Label::from_cbor_label(i128::from(integer))),
        CborValue::Text(text) => {
            if let Some(label) = Label::from_json_label(&text) {
                return Err(SenmlError::in_field(
                    index,
                    &text,
                    &format!("\"{text}\""),
                    format!(
                        "SenML CBOR names this field with the integer label {} instead of the \
                         text \"{text}\" of the JSON representation",
                        label.cbor_label()
                    ),
                ));
            }
            if text.ends_with('_') {
                return Err(SenmlError::in_field(
                    index,
                    &text,
                    &format!("\"{}\"", preview(&text)),
                    "Ferrite does not know this field, and a field whose label ends with '_' \
                     must be understood (RFC 8428 section 4.4); remove it or send the pack to \
                     a reader that supports it"
                        .to_owned(),
                ));
            }
            Ok(None)
        }
        other => Err(SenmlError::in_record(
            index,
            format!(
                "has a map key that is {}; keys must be integer labels or text strings",
                item_kind(&other)
            ),
        )),
    }
}

fn to_field_value(value: CborValue) -> FieldValue {
    match value {
        CborValue::Integer(integer) => FieldValue::Integer(i128::from(integer)),
        CborValue::Float(float) => FieldValue::Float(float),
        CborValue::Text(text) => FieldValue::Text(text),
        CborValue::Bytes(bytes) => FieldValue::Bytes(bytes),
        CborValue::Bool(boolean) => FieldValue::Bool(boolean),
        CborValue::Tag(TAG_DECIMAL_FRACTION, content) => decimal_fraction(&content),
        other => FieldValue::Other(item_kind(&other)),
    }
}

/// Converts the content of a decimal fraction to the nearest `f64`.
fn decimal_fraction(content: &CborValue) -> FieldValue {
    if let CborValue::Array(parts) = content
        && let [CborValue::Integer(exponent), CborValue::Integer(mantissa)] = parts[..]
    {
        let exponent = i128::from(exponent);
        let mantissa = i128::from(mantissa);
        // Rust parses decimal text with correct rounding, and to infinity
        // or zero when the exponent is out of range.
        if let Ok(float) = format!("{mantissa}e{exponent}").parse::<f64>() {
            return FieldValue::Float(float);
        }
    }
    FieldValue::Other(
        "a decimal fraction (tag 4) that is not [integer exponent, integer mantissa]".to_owned(),
    )
}

fn item_kind(value: &CborValue) -> String {
    match value {
        CborValue::Integer(_) => "an integer".to_owned(),
        CborValue::Float(_) => "a float".to_owned(),
        CborValue::Text(_) => "a text string".to_owned(),
        CborValue::Bytes(_) => "a byte string".to_owned(),
        CborValue::Bool(_) => "a boolean".to_owned(),
        CborValue::Null => "null".to_owned(),
        CborValue::Tag(tag, _) => format!("an item with CBOR tag {tag}"),
        CborValue::Array(_) => "an array".to_owned(),
        CborValue::Map(_) => "a map".to_owned(),
        _ => "an unsupported CBOR item".to_owned(),
    }
}

fn major_type_name(major_type: u8) -> &'static str {
    match major_type {
        0 | 1 => "an integer",
        2 => "a byte string",
        3 => "a text string",
        4 => "an array",
        5 => "a map; wrap a single record in an array",
        6 => "a tagged item",
        _ => "a float or simple value",
    }
}

impl<'de> Deserialize<'de> for Pack {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PackVisitor)
    }
}

struct PackVisitor;

impl<'de> Visitor<'de> for PackVisitor {
    type Value = Pack;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a CBOR array of SenML records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(element) = seq.next_element_seed(ElementSeed)? {
            let item = match element {
                Element::Item(item) => item,
                Element::TooManyFields => {
                    return Ok(Pack::LimitExceeded(SenmlError::in_record(
                        items.len(),
                        format!(
                            "has more than {MAX_FIELDS_PER_RECORD} fields; a SenML record needs \
                             at most a few"
                        ),
                    )));
                }
            };
            if items.len() == MAX_RECORDS {
                return Ok(Pack::LimitExceeded(SenmlError::general(format!(
                    "too many records: a pack may have at most {MAX_RECORDS} records; split it \
                     into several requests"
                ))));
            }

            let is_map = matches!(item, Item::Map(_));
            items.push(item);
            if !is_map {
                // The item may be partly unread, so stop here. The caller
                // reports it after the records before it.
                return Ok(Pack::Complete(items));
            }
        }
        Ok(Pack::Complete(items))
    }
}

struct ElementSeed;

impl<'de> DeserializeSeed<'de> for ElementSeed {
    type Value = Element;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed {
    type Value = Element;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a SenML record")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<CborValue, CborValue>()? {
            if entries.len() == MAX_FIELDS_PER_RECORD {
                return Ok(Element::TooManyFields);
            }
            entries.push(entry);
        }
        Ok(Element::Item(Item::Map(entries)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Ok(Element::Item(Item::Other("an array")))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        // ciborium presents a tagged item as an enum.
        Ok(Element::Item(Item::Other("a tagged item")))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("a boolean")))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("an integer")))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("an integer")))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("an integer")))
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("an integer")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("a float")))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("a text string")))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("a byte string")))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("null")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Element::Item(Item::Other("null")))
    }
}
