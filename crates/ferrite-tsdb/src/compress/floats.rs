//! Float column. When every value is a short decimal, the column stores
//! scaled integers. Other columns use XOR coding or pco, whichever is
//! smaller, with the raw bits as the fallback. The XOR coding is the one of
//! Facebook's Gorilla (Pelkonen et al., VLDB 2015). Every coding round-trips
//! the bits exactly.

use super::bits::{BitReader, BitWriter, ByteReader};
use super::{
    DecodeError, MODE_EMPTY, MODE_FLOAT_DECIMAL, MODE_FLOAT_PCO, MODE_FLOAT_RAW, MODE_FLOAT_XOR,
    ints, pcodec,
};

/// Highest decimal scale: values with up to 18 digits after the point.
/// 10^18 is the largest power of ten below 2^63, and every power up to it is
/// an exact f64.
const MAX_SCALE: u8 = 18;

const POWERS_OF_TEN: [f64; MAX_SCALE as usize + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18,
];

/// One coding of a float column, for tests and measurements that force a
/// coding instead of letting the encoder choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "used by tests and the codec_sizes example")
)]
pub(crate) enum FloatCoding {
    Raw,
    Xor,
    Decimal,
    Pco,
}

impl FloatCoding {
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "used by tests and the codec_sizes example")
    )]
    pub(crate) const ALL: [FloatCoding; 4] = [
        FloatCoding::Raw,
        FloatCoding::Xor,
        FloatCoding::Decimal,
        FloatCoding::Pco,
    ];
}

pub(super) fn encode(values: &[f64], out: &mut Vec<u8>) {
    if values.is_empty() {
        out.push(MODE_EMPTY);
        return;
    }
    if let Some(scale) = decimal_scale(values) {
        encode_decimal(values, scale, out);
        return;
    }

    let start = out.len();
    encode_xor(values, out);
    if super::try_pco(values.len()) {
        let mut candidate = Vec::with_capacity(out.len() - start);
        if encode_pco(values, &mut candidate) && candidate.len() < out.len() - start {
            out.truncate(start);
            out.extend_from_slice(&candidate);
        }
    }
    if out.len() - start > raw_size(values.len()) {
        out.truncate(start);
        encode_raw(values, out);
    }
}

/// Appends `values` in the given coding. Returns `false`, leaving `out`
/// unchanged, when the coding cannot represent them (decimal coding of a
/// value that is not a short decimal) or `values` is empty.
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "used by tests and the codec_sizes example")
)]
pub(crate) fn encode_as(values: &[f64], coding: FloatCoding, out: &mut Vec<u8>) -> bool {
    if values.is_empty() {
        return false;
    }
    match coding {
        FloatCoding::Raw => encode_raw(values, out),
        FloatCoding::Xor => encode_xor(values, out),
        FloatCoding::Decimal => match decimal_scale(values) {
            Some(scale) => encode_decimal(values, scale, out),
            None => return false,
        },
        FloatCoding::Pco => return encode_pco(values, out),
    }
    true
}

pub(super) fn decode(input: &[u8], count: usize) -> Result<Vec<f64>, DecodeError> {
    let mut reader = ByteReader::new(input);
    let mode = reader.u8()?;
    if mode == MODE_EMPTY {
        return super::decode_empty(&reader, count, Vec::new());
    }
    if count == 0 {
        return Err(DecodeError::new(format!(
            "float mode {mode:#04x} used for an empty column"
        )));
    }

    match mode {
        MODE_FLOAT_RAW => decode_raw(&mut reader, count),
        MODE_FLOAT_XOR => decode_xor(reader.rest(), count),
        MODE_FLOAT_DECIMAL => {
            let scale = reader.u8()?;
            if scale > MAX_SCALE {
                return Err(DecodeError::new(format!(
                    "decimal scale {scale} exceeds the maximum {MAX_SCALE}"
                )));
            }
            let scaled = ints::decode(reader.rest(), count)?;
            Ok(scaled
                .into_iter()
                .map(|value| unscale(value, scale))
                .collect())
        }
        MODE_FLOAT_PCO => pcodec::decode::<f64>(reader.rest(), count),
        _ => Err(DecodeError::new(format!(
            "unknown float column mode {mode:#04x}"
        ))),
    }
}

fn raw_size(count: usize) -> usize {
    1 + 8 * count
}

fn encode_raw(values: &[f64], out: &mut Vec<u8>) {
    out.push(MODE_FLOAT_RAW);
    for value in values {
        out.extend_from_slice(&value.to_bits().to_le_bytes());
    }
}

fn decode_raw(reader: &mut ByteReader, count: usize) -> Result<Vec<f64>, DecodeError> {
    if reader.remaining() != count * 8 {
        return Err(DecodeError::new(format!(
            "raw float column has {} bytes, {count} values need {}",
            reader.remaining(),
            count * 8
        )));
    }
    let bytes = reader.rest();
    Ok(bytes
        .chunks_exact(8)
        .map(|chunk| {
            let mut array = [0u8; 8];
            array.copy_from_slice(chunk);
            f64::from_bits(u64::from_le_bytes(array))
        })
        .collect())
}

fn encode_pco(values: &[f64], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.push(MODE_FLOAT_PCO);
    if pcodec::encode(values, out).is_none() {
        out.truncate(start);
        return false;
    }
    true
}

/// Converts a scaled integer back to the float. Encoder and decoder must
/// both use this one expression: IEEE division is correctly rounded, so for
/// `|scaled| <= 2^53` it returns the f64 nearest to `scaled / 10^scale`, the
/// same value that parsing the decimal text gives.
fn unscale(scaled: i64, scale: u8) -> f64 {
    scaled as f64 / POWERS_OF_TEN[scale as usize]
}

/// Returns `value * 10^scale` rounded to the nearest integer. Results out
/// of range saturate; the round-trip check in [`fits_scale`] rejects them.
fn scale_value(value: f64, scale: u8) -> i64 {
    // `f64::round` is a library call on baseline x86-64, so round by hand:
    // the fraction `scaled - truncated` is exact for |scaled| < 2^52.
    let scaled = value * POWERS_OF_TEN[scale as usize];
    let truncated = scaled as i64;
    let fraction = scaled - truncated as f64;
    if fraction >= 0.5 {
        truncated.saturating_add(1)
    } else if fraction <= -0.5 {
        truncated.saturating_sub(1)
    } else {
        truncated
    }
}

fn fits_scale(value: f64, scale: u8) -> bool {
    unscale(scale_value(value, scale), scale).to_bits() == value.to_bits()
}

/// Returns the smallest scale at which every value round-trips bit-exactly
/// through [`scale_value`] and [`unscale`], or `None`. Negative zero never
/// does, because the integer 0 carries no sign.
fn decimal_scale(values: &[f64]) -> Option<u8> {
    let mut scale = 0u8;
    for &value in values {
        while !fits_scale(value, scale) {
            scale += 1;
            if scale > MAX_SCALE {
                return None;
            }
        }
    }
    // Values before the last increase were checked at a lower scale only.
    values
        .iter()
        .all(|&value| fits_scale(value, scale))
        .then_some(scale)
}

fn encode_decimal(values: &[f64], scale: u8, out: &mut Vec<u8>) {
    out.push(MODE_FLOAT_DECIMAL);
    out.push(scale);
    let scaled: Vec<i64> = values
        .iter()
        .map(|&value| scale_value(value, scale))
        .collect();
    ints::encode(&scaled, out);
}

/// Bits that store the count of leading zeros of an XOR; counts above 31
/// are stored as 31.
const LEADING_BITS: u32 = 5;
/// Bits that store the length of the meaningful XOR bits; 64 is stored as 0.
const LENGTH_BITS: u32 = 6;

fn encode_xor(values: &[f64], out: &mut Vec<u8>) {
    out.push(MODE_FLOAT_XOR);
    let mut writer = BitWriter::new(out);
    let mut previous = values[0].to_bits();
    writer.write(previous, 64);

    // The window (leading zeros, trailing zeros) of the last XOR whose
    // position was written out; `None` until the first one.
    let mut window: Option<(u32, u32)> = None;
    for value in &values[1..] {
        let bits = value.to_bits();
        let xor = bits ^ previous;
        previous = bits;
        if xor == 0 {
            writer.write_bit(false);
            continue;
        }
        writer.write_bit(true);

        let leading = xor.leading_zeros().min(31);
        let trailing = xor.trailing_zeros();
        match window {
            Some((window_leading, window_trailing))
                if leading >= window_leading && trailing >= window_trailing =>
            {
                writer.write_bit(false);
                writer.write(
                    xor >> window_trailing,
                    64 - window_leading - window_trailing,
                );
            }
            _ => {
                let length = 64 - leading - trailing;
                writer.write_bit(true);
                writer.write(u64::from(leading), LEADING_BITS);
                writer.write(u64::from(length % 64), LENGTH_BITS);
                writer.write(xor >> trailing, length);
                window = Some((leading, trailing));
            }
        }
    }
    writer.finish();
}

fn decode_xor(input: &[u8], count: usize) -> Result<Vec<f64>, DecodeError> {
    // Each value after the first takes at least one bit, so a short input
    // cannot make this allocate for a large count.
    let min_bits = 63usize.saturating_add(count);
    if input.len().saturating_mul(8) < min_bits {
        return Err(DecodeError::new(format!(
            "XOR float column of {} bytes is too short for {count} values",
            input.len()
        )));
    }

    let mut reader = BitReader::new(input);
    let mut values = Vec::with_capacity(count);
    let mut previous = reader.read(64)?;
    values.push(f64::from_bits(previous));
    let mut window: Option<(u32, u32)> = None;
    for _ in 1..count {
        if reader.read_bit()? {
            let (leading, trailing) = if reader.read_bit()? {
                let leading = reader.read(LEADING_BITS)? as u32;
                let length = match reader.read(LENGTH_BITS)? as u32 {
                    0 => 64,
                    length => length,
                };
                if leading + length > 64 {
                    return Err(DecodeError::new(format!(
                        "XOR window of {leading} leading zeros and {length} bits exceeds 64 bits"
                    )));
                }
                let trailing = 64 - leading - length;
                window = Some((leading, trailing));
                (leading, trailing)
            } else {
                window.ok_or_else(|| {
                    DecodeError::new("XOR value reuses a window before one was defined")
                })?
            };
            let meaningful = reader.read(64 - leading - trailing)?;
            previous ^= meaningful << trailing;
        }
        values.push(f64::from_bits(previous));
    }
    reader.finish()?;
    Ok(values)
}
