//! Timestamp column: the first timestamp, then the deltas divided by their
//! greatest common divisor as an integer sequence. The integer coder turns
//! regular sampling into a constant, gaps into runs, and jitter into
//! bit-packed deltas of deltas.

use super::bits::{ByteReader, gcd, put_uvarint};
use super::{DecodeError, MODE_EMPTY, MODE_TS_DELTA, ints};

pub(super) fn encode(timestamps: &[i64], out: &mut Vec<u8>) {
    debug_assert!(
        timestamps.windows(2).all(|pair| pair[0] < pair[1]),
        "timestamps must be strictly ascending"
    );
    let Some(&first) = timestamps.first() else {
        out.push(MODE_EMPTY);
        return;
    };
    out.push(MODE_TS_DELTA);
    out.extend_from_slice(&first.to_le_bytes());
    if timestamps.len() == 1 {
        return;
    }

    // A delta is at least 1 and at most u64::MAX, so it always fits in u64
    // even where the i64 subtraction would overflow.
    let deltas: Vec<u64> = timestamps
        .windows(2)
        .map(|pair| pair[1].wrapping_sub(pair[0]) as u64)
        .collect();
    let mut divisor = 0u64;
    for &delta in &deltas {
        divisor = gcd(divisor, delta);
        if divisor == 1 {
            break;
        }
    }
    // Only reachable when the input breaks the ascending contract.
    let divisor = divisor.max(1);
    put_uvarint(out, divisor);

    // The integer coder works on i64; the cast keeps all 64 bits.
    let scaled: Vec<i64> = deltas
        .iter()
        .map(|&delta| (delta / divisor) as i64)
        .collect();
    ints::encode(&scaled, out);
}

pub(super) fn decode(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    let mut reader = ByteReader::new(input);
    let mode = reader.u8()?;
    if mode == MODE_EMPTY {
        return super::decode_empty(&reader, count, Vec::new());
    }
    if mode != MODE_TS_DELTA {
        return Err(DecodeError::new(format!(
            "unknown timestamp column mode {mode:#04x}"
        )));
    }
    if count == 0 {
        return Err(DecodeError::new("timestamp mode used for an empty column"));
    }

    let first = reader.u64_le()? as i64;
    if count == 1 {
        reader.finish()?;
        return Ok(vec![first]);
    }
    let divisor = reader.uvarint()?;
    if divisor == 0 {
        return Err(DecodeError::new("timestamp delta divisor is 0"));
    }

    let scaled = ints::decode(reader.rest(), count - 1)?;
    let mut timestamps = Vec::with_capacity(count);
    timestamps.push(first);
    let mut previous = first;
    for (index, &value) in scaled.iter().enumerate() {
        let next = (value as u64)
            .checked_mul(divisor)
            .filter(|&delta| delta > 0)
            .and_then(|delta| previous.checked_add_unsigned(delta))
            .ok_or_else(|| {
                DecodeError::new(format!(
                    "timestamp {} is not above {previous} or overflows i64",
                    index + 1
                ))
            })?;
        timestamps.push(next);
        previous = next;
    }
    Ok(timestamps)
}
