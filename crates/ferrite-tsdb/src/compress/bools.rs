//! Boolean column: run lengths, or a bitmap when the value changes so often
//! that the runs would be larger.

use super::bits::{BitReader, BitWriter, ByteReader, put_uvarint, uvarint_len};
use super::{DecodeError, MODE_BOOL_BITMAP, MODE_BOOL_RLE, MODE_EMPTY};

/// Calls `visit` with the length of each run of equal values.
fn for_each_run(values: &[bool], mut visit: impl FnMut(u64)) {
    let mut current = values[0];
    let mut len = 0u64;
    for &value in values {
        if value == current {
            len += 1;
        } else {
            visit(len);
            current = value;
            len = 1;
        }
    }
    visit(len);
}

pub(super) fn encode(values: &[bool], out: &mut Vec<u8>) {
    if values.is_empty() {
        out.push(MODE_EMPTY);
        return;
    }

    let mut run_length_size = 2;
    for_each_run(values, |len| run_length_size += uvarint_len(len));
    let bitmap_size = 1 + values.len().div_ceil(8);

    if run_length_size <= bitmap_size {
        out.push(MODE_BOOL_RLE);
        out.push(u8::from(values[0]));
        for_each_run(values, |len| put_uvarint(out, len));
    } else {
        out.push(MODE_BOOL_BITMAP);
        let mut writer = BitWriter::new(out);
        for &value in values {
            writer.write_bit(value);
        }
        writer.finish();
    }
}

pub(super) fn decode(input: &[u8], count: usize) -> Result<Vec<bool>, DecodeError> {
    let mut reader = ByteReader::new(input);
    let mode = reader.u8()?;
    if mode == MODE_EMPTY {
        return super::decode_empty(&reader, count, Vec::new());
    }
    if count == 0 {
        return Err(DecodeError::new(format!(
            "boolean mode {mode:#04x} used for an empty column"
        )));
    }

    match mode {
        MODE_BOOL_RLE => {
            let mut value = match reader.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(DecodeError::new(format!(
                        "first boolean is {other}, expected 0 or 1"
                    )));
                }
            };
            let mut values = Vec::new();
            while values.len() < count {
                let remaining = count - values.len();
                let len = reader.uvarint()?;
                if len == 0 || len > remaining as u64 {
                    return Err(DecodeError::new(format!(
                        "run length {len} is invalid with {remaining} values left"
                    )));
                }
                values.resize(values.len() + len as usize, value);
                value = !value;
            }
            reader.finish()?;
            Ok(values)
        }
        MODE_BOOL_BITMAP => {
            let bitmap = reader.rest();
            if bitmap.len() != count.div_ceil(8) {
                return Err(DecodeError::new(format!(
                    "bitmap has {} bytes, {count} values need {}",
                    bitmap.len(),
                    count.div_ceil(8)
                )));
            }
            let mut bits = BitReader::new(bitmap);
            let values = (0..count)
                .map(|_| bits.read_bit())
                .collect::<Result<Vec<bool>, DecodeError>>()?;
            bits.finish()?;
            Ok(values)
        }
        _ => Err(DecodeError::new(format!(
            "unknown boolean column mode {mode:#04x}"
        ))),
    }
}
