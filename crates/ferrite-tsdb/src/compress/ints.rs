//! Integer sequences: the `ints` column and the inner coding of timestamp
//! deltas, decimal floats and string dictionary indexes.
//!
//! The encoder computes the exact size of the constant, run-length and
//! bit-packed codings from one pass each, encodes with pco only when the
//! sequence is long enough for pco's header to pay off, and keeps the
//! smallest. Layouts are in the parent module's documentation.

use super::bits::{
    BitReader, BitWriter, ByteReader, bit_width, gcd, ivarint_len, put_ivarint, put_uvarint,
    uvarint_len,
};
use super::pcodec;
use super::{DecodeError, MODE_INT_BITPACK, MODE_INT_CONSTANT, MODE_INT_PCO, MODE_INT_RLE};

/// Highest difference order of the bit-packed coding: 0 packs the values,
/// 1 their deltas, 2 their deltas of deltas.
const MAX_ORDER: u8 = 2;

/// One coding of an integer sequence, for tests and measurements that force
/// a coding instead of letting the encoder choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "used by tests and the codec_sizes example")
)]
pub(crate) enum IntCoding {
    Constant,
    RunLength,
    BitPacked { order: u8 },
    Pco,
}

impl IntCoding {
    #[cfg_attr(
        not(test),
        allow(dead_code, reason = "used by tests and the codec_sizes example")
    )]
    pub(crate) const ALL: [IntCoding; 6] = [
        IntCoding::Constant,
        IntCoding::RunLength,
        IntCoding::BitPacked { order: 0 },
        IntCoding::BitPacked { order: 1 },
        IntCoding::BitPacked { order: 2 },
        IntCoding::Pco,
    ];
}

/// Appends the smallest coding of `values`, which must not be empty.
pub(super) fn encode(values: &[i64], out: &mut Vec<u8>) {
    debug_assert!(!values.is_empty());

    if is_constant(values) {
        encode_constant(values[0], out);
        return;
    }

    // Every residual offset of order k is a multiple of the gcd of order
    // k - 1, so a gcd of 1 at a higher order means 1 at all lower ones.
    // Planning from the highest order down skips most gcd computations.
    let mut best_plan: Option<BitPackPlan> = None;
    let mut gcd_is_one = false;
    for order in (0..=MAX_ORDER).rev() {
        let Some(plan) = plan_bitpack(values, order, gcd_is_one) else {
            continue;
        };
        gcd_is_one = plan.gcd == 1;
        if best_plan.as_ref().is_none_or(|best| plan.size <= best.size) {
            best_plan = Some(plan);
        }
    }
    let best_plan = best_plan.expect("a non-empty sequence has order 0");
    let rle_size = run_length_size(values);

    let start = out.len();
    if rle_size < best_plan.size {
        encode_run_length(values, out);
    } else {
        encode_bitpack(values, &best_plan, out);
    }

    if super::try_pco(values.len()) {
        let mut candidate = Vec::with_capacity(out.len() - start);
        if encode_pco(values, &mut candidate) && candidate.len() < out.len() - start {
            out.truncate(start);
            out.extend_from_slice(&candidate);
        }
    }
}

/// Appends `values` in the given coding. Returns `false`, leaving `out`
/// unchanged, when the coding cannot represent them: a constant coding of a
/// varying sequence, or a difference order not below the length.
#[cfg_attr(
    not(test),
    allow(dead_code, reason = "used by tests and the codec_sizes example")
)]
pub(crate) fn encode_as(values: &[i64], coding: IntCoding, out: &mut Vec<u8>) -> bool {
    if values.is_empty() {
        return false;
    }
    match coding {
        IntCoding::Constant => {
            if !is_constant(values) {
                return false;
            }
            encode_constant(values[0], out);
        }
        IntCoding::RunLength => encode_run_length(values, out),
        IntCoding::BitPacked { order } => {
            let Some(plan) = plan_bitpack(values, order, false) else {
                return false;
            };
            encode_bitpack(values, &plan, out);
        }
        IntCoding::Pco => return encode_pco(values, out),
    }
    true
}

/// Decodes exactly `count` values from all of `input`.
pub(super) fn decode(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    let mut reader = ByteReader::new(input);
    let mode = reader.u8()?;
    if count == 0 {
        return Err(DecodeError::new(format!(
            "integer mode {mode:#04x} used for an empty sequence"
        )));
    }

    match mode {
        MODE_INT_CONSTANT => {
            let value = reader.ivarint()?;
            reader.finish()?;
            Ok(vec![value; count])
        }
        MODE_INT_RLE => decode_run_length(&mut reader, count),
        MODE_INT_BITPACK => decode_bitpack(&mut reader, count),
        MODE_INT_PCO => pcodec::decode::<i64>(reader.rest(), count),
        _ => Err(DecodeError::new(format!(
            "unknown integer sequence mode {mode:#04x}"
        ))),
    }
}

fn is_constant(values: &[i64]) -> bool {
    values.iter().all(|&value| value == values[0])
}

fn encode_constant(value: i64, out: &mut Vec<u8>) {
    out.push(MODE_INT_CONSTANT);
    put_ivarint(out, value);
}

fn encode_pco(values: &[i64], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.push(MODE_INT_PCO);
    if pcodec::encode(values, out).is_none() {
        out.truncate(start);
        return false;
    }
    true
}

/// Calls `visit` with each run of equal values and its length.
fn for_each_run(values: &[i64], mut visit: impl FnMut(i64, u64)) {
    let mut run_value = values[0];
    let mut run_len: u64 = 0;
    for &value in values {
        if value == run_value {
            run_len += 1;
        } else {
            visit(run_value, run_len);
            run_value = value;
            run_len = 1;
        }
    }
    visit(run_value, run_len);
}

fn run_length_size(values: &[i64]) -> usize {
    let mut size = 1;
    let mut previous = 0i64;
    for_each_run(values, |value, len| {
        size += ivarint_len(value.wrapping_sub(previous)) + uvarint_len(len);
        previous = value;
    });
    size
}

fn encode_run_length(values: &[i64], out: &mut Vec<u8>) {
    out.push(MODE_INT_RLE);
    let mut previous = 0i64;
    for_each_run(values, |value, len| {
        put_ivarint(out, value.wrapping_sub(previous));
        put_uvarint(out, len);
        previous = value;
    });
}

fn decode_run_length(reader: &mut ByteReader, count: usize) -> Result<Vec<i64>, DecodeError> {
    let mut values = Vec::new();
    let mut previous = 0i64;
    while values.len() < count {
        let value = previous.wrapping_add(reader.ivarint()?);
        let remaining = count - values.len();
        let len = reader.uvarint()?;
        if len == 0 || len > remaining as u64 {
            return Err(DecodeError::new(format!(
                "run length {len} is invalid with {remaining} values left"
            )));
        }
        values.resize(values.len() + len as usize, value);
        previous = value;
    }
    reader.finish()?;
    Ok(values)
}

/// The bit-packed coding of one difference order. The residuals are the
/// values (order 0), their deltas (1) or their deltas of deltas (2), all
/// computed with wrapping arithmetic so that any `i64` sequence round-trips.
/// Each residual is stored as `(residual - min) / gcd` in `width` bits.
struct BitPackPlan {
    order: u8,
    min: i64,
    gcd: u64,
    width: u32,
    /// Encoded size in bytes, mode byte included.
    size: usize,
}

/// Calls `visit` with each residual of the given order.
fn for_each_residual(values: &[i64], order: u8, mut visit: impl FnMut(i64)) {
    match order {
        0 => values.iter().for_each(|&value| visit(value)),
        1 => values
            .windows(2)
            .for_each(|pair| visit(pair[1].wrapping_sub(pair[0]))),
        _ => values.windows(3).for_each(|triple| {
            let delta = triple[2].wrapping_sub(triple[1]);
            visit(delta.wrapping_sub(triple[1].wrapping_sub(triple[0])));
        }),
    }
}

/// Returns the first `order` values that the decoder needs to undo the
/// differences: the first value, then (order 2) the first delta.
fn seeds(values: &[i64], order: u8) -> [i64; 2] {
    match order {
        0 => [0, 0],
        1 => [values[0], 0],
        _ => [values[0], values[1].wrapping_sub(values[0])],
    }
}

/// Plans the bit-packed coding of one order. With `gcd_is_one` the caller
/// already knows that the gcd is 1, which saves a pass.
fn plan_bitpack(values: &[i64], order: u8, gcd_is_one: bool) -> Option<BitPackPlan> {
    if order > MAX_ORDER || values.len() <= order as usize {
        return None;
    }

    let mut min = i64::MAX;
    let mut max = i64::MIN;
    for_each_residual(values, order, |residual| {
        min = min.min(residual);
        max = max.max(residual);
    });

    // Once the gcd reaches 1 it stays 1, so later residuals skip the
    // computation.
    let mut divisor = u64::from(gcd_is_one);
    for_each_residual(values, order, |residual| {
        if divisor != 1 {
            divisor = gcd(divisor, residual.wrapping_sub(min) as u64);
        }
    });
    let span = max.wrapping_sub(min) as u64;
    let width = span.checked_div(divisor).map_or(0, bit_width);

    let seed_values = seeds(values, order);
    let residual_count = values.len() - order as usize;
    let size = 3
        + seed_values[..order as usize]
            .iter()
            .map(|&seed| ivarint_len(seed))
            .sum::<usize>()
        + ivarint_len(min)
        + uvarint_len(divisor)
        + (residual_count * width as usize).div_ceil(8);
    Some(BitPackPlan {
        order,
        min,
        gcd: divisor,
        width,
        size,
    })
}

fn encode_bitpack(values: &[i64], plan: &BitPackPlan, out: &mut Vec<u8>) {
    out.push(MODE_INT_BITPACK);
    out.push(plan.order);
    for &seed in &seeds(values, plan.order)[..plan.order as usize] {
        put_ivarint(out, seed);
    }
    put_ivarint(out, plan.min);
    put_uvarint(out, plan.gcd);
    out.push(plan.width as u8);

    if plan.width == 0 {
        return;
    }
    let mut writer = BitWriter::new(out);
    for_each_residual(values, plan.order, |residual| {
        let offset = residual.wrapping_sub(plan.min) as u64;
        let packed = if plan.gcd == 1 {
            offset
        } else {
            offset / plan.gcd
        };
        writer.write(packed, plan.width);
    });
    writer.finish();
}

fn decode_bitpack(reader: &mut ByteReader, count: usize) -> Result<Vec<i64>, DecodeError> {
    let order = reader.u8()?;
    if order > MAX_ORDER || count <= order as usize {
        return Err(DecodeError::new(format!(
            "bit-packed difference order {order} is invalid for {count} values"
        )));
    }
    let mut seed_values = [0i64; 2];
    for seed in &mut seed_values[..order as usize] {
        *seed = reader.ivarint()?;
    }
    let min = reader.ivarint()?;
    let divisor = reader.uvarint()?;
    let width = u32::from(reader.u8()?);
    if width > 64 {
        return Err(DecodeError::new(format!("bit width {width} exceeds 64")));
    }

    let residual_count = count - order as usize;
    let packed = reader.rest();
    let needed_bits = residual_count.checked_mul(width as usize);
    if needed_bits.is_none_or(|bits| bits.div_ceil(8) != packed.len()) {
        return Err(DecodeError::new(format!(
            "{} bytes of packed data do not match {residual_count} values of {width} bits",
            packed.len()
        )));
    }

    let mut bits = BitReader::new(packed);
    let mut values = Vec::with_capacity(count);
    if order >= 1 {
        values.push(seed_values[0]);
    }
    if order == 2 {
        values.push(seed_values[0].wrapping_add(seed_values[1]));
    }
    let mut previous = values.last().copied().unwrap_or(0);
    let mut delta = seed_values[1];
    for _ in 0..residual_count {
        let residual = min.wrapping_add(bits.read(width)?.wrapping_mul(divisor) as i64);
        let value = match order {
            0 => residual,
            1 => previous.wrapping_add(residual),
            _ => {
                delta = delta.wrapping_add(residual);
                previous.wrapping_add(delta)
            }
        };
        values.push(value);
        previous = value;
    }
    bits.finish()?;
    Ok(values)
}
