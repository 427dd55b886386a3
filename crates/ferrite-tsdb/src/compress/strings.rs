//! String column: a dictionary of the distinct strings in order of first
//! appearance, then each value's dictionary index as an integer sequence.

use std::collections::HashMap;

use super::bits::{ByteReader, put_uvarint};
use super::{DecodeError, MAX_DECODED_TEXT_LEN, MODE_EMPTY, MODE_STR_DICT, ints};

pub(super) fn encode(values: &[&str], out: &mut Vec<u8>) {
    if values.is_empty() {
        out.push(MODE_EMPTY);
        return;
    }
    let text_len: usize = values.iter().map(|value| value.len()).sum();
    assert!(
        text_len <= MAX_DECODED_TEXT_LEN,
        "string column holds {text_len} bytes of text, the maximum is {MAX_DECODED_TEXT_LEN}"
    );

    let mut dictionary: Vec<&str> = Vec::new();
    let mut index_of: HashMap<&str, i64> = HashMap::new();
    let indexes: Vec<i64> = values
        .iter()
        .map(|&value| {
            *index_of.entry(value).or_insert_with(|| {
                dictionary.push(value);
                dictionary.len() as i64 - 1
            })
        })
        .collect();

    out.push(MODE_STR_DICT);
    put_uvarint(out, dictionary.len() as u64);
    for entry in &dictionary {
        put_uvarint(out, entry.len() as u64);
        out.extend_from_slice(entry.as_bytes());
    }
    ints::encode(&indexes, out);
}

pub(super) fn decode(input: &[u8], count: usize) -> Result<Vec<String>, DecodeError> {
    let mut reader = ByteReader::new(input);
    let mode = reader.u8()?;
    if mode == MODE_EMPTY {
        return super::decode_empty(&reader, count, Vec::new());
    }
    if mode != MODE_STR_DICT {
        return Err(DecodeError::new(format!(
            "unknown string column mode {mode:#04x}"
        )));
    }
    if count == 0 {
        return Err(DecodeError::new("dictionary mode used for an empty column"));
    }

    // Every entry takes at least its one-byte length.
    let entry_count = reader.count("dictionary size", reader.remaining())?;
    if entry_count == 0 {
        return Err(DecodeError::new(
            "dictionary of a non-empty column is empty",
        ));
    }
    let mut dictionary = Vec::with_capacity(entry_count);
    for index in 0..entry_count {
        let len = reader.count("dictionary entry length", reader.remaining())?;
        let entry = std::str::from_utf8(reader.take(len)?).map_err(|err| {
            DecodeError::new(format!("dictionary entry {index} is not UTF-8: {err}"))
        })?;
        dictionary.push(entry);
    }

    let indexes = ints::decode(reader.rest(), count)?;
    let mut text_len = 0usize;
    for &index in &indexes {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|index| dictionary.get(index))
            .ok_or_else(|| {
                DecodeError::new(format!(
                    "dictionary index {index} is outside the {entry_count} entries"
                ))
            })?;
        text_len += entry.len();
        if text_len > MAX_DECODED_TEXT_LEN {
            return Err(DecodeError::new(format!(
                "decoded strings exceed the maximum of {MAX_DECODED_TEXT_LEN} bytes"
            )));
        }
    }

    Ok(indexes
        .into_iter()
        .map(|index| dictionary[index as usize].to_owned())
        .collect())
}
