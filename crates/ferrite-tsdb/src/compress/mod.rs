//! Placeholder column codecs with the final API; replaced by the real ones.

use crate::encoding::{Reader, put_ivarint, put_uvarint};

#[derive(Debug)]
pub(crate) struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

fn err(e: crate::encoding::DecodeError) -> DecodeError {
    DecodeError(e.0.to_owned())
}

pub(crate) fn encode_timestamps(ts: &[i64], out: &mut Vec<u8>) {
    encode_ints(ts, out)
}

pub(crate) fn decode_timestamps(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    decode_ints(input, count)
}

pub(crate) fn encode_floats(values: &[f64], out: &mut Vec<u8>) {
    for v in values {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
}

pub(crate) fn decode_floats(input: &[u8], count: usize) -> Result<Vec<f64>, DecodeError> {
    if input.len() != count * 8 {
        return Err(DecodeError("float column length".into()));
    }
    Ok(input
        .chunks_exact(8)
        .map(|c| f64::from_bits(u64::from_le_bytes(c.try_into().unwrap())))
        .collect())
}

pub(crate) fn encode_ints(values: &[i64], out: &mut Vec<u8>) {
    for v in values {
        put_ivarint(out, *v);
    }
}

pub(crate) fn decode_ints(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    let mut reader = Reader::new(input);
    let mut out = Vec::with_capacity(count.min(input.len()));
    for _ in 0..count {
        out.push(reader.ivarint().map_err(err)?);
    }
    Ok(out)
}

pub(crate) fn encode_bools(values: &[bool], out: &mut Vec<u8>) {
    out.extend(values.iter().map(|b| u8::from(*b)));
}

pub(crate) fn decode_bools(input: &[u8], count: usize) -> Result<Vec<bool>, DecodeError> {
    if input.len() != count {
        return Err(DecodeError("bool column length".into()));
    }
    Ok(input.iter().map(|b| *b != 0).collect())
}

pub(crate) fn encode_strings(values: &[&str], out: &mut Vec<u8>) {
    for v in values {
        put_uvarint(out, v.len() as u64);
        out.extend_from_slice(v.as_bytes());
    }
}

pub(crate) fn decode_strings(input: &[u8], count: usize) -> Result<Vec<String>, DecodeError> {
    let mut reader = Reader::new(input);
    let mut out = Vec::with_capacity(count.min(input.len()));
    for _ in 0..count {
        out.push(reader.string().map_err(err)?);
    }
    Ok(out)
}
