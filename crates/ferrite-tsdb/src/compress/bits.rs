//! Byte and bit primitives shared by the column codecs: LEB128 varints,
//! zigzag mapping, a bounds-checked byte cursor and LSB-first bit packing.

use super::DecodeError;

pub(super) fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

pub(super) fn unzigzag(raw: u64) -> i64 {
    ((raw >> 1) as i64) ^ -((raw & 1) as i64)
}

pub(super) fn put_uvarint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

pub(super) fn put_ivarint(out: &mut Vec<u8>, value: i64) {
    put_uvarint(out, zigzag(value));
}

/// Returns the encoded length of `value` as an unsigned varint.
pub(super) fn uvarint_len(value: u64) -> usize {
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub(super) fn ivarint_len(value: i64) -> usize {
    uvarint_len(zigzag(value))
}

/// Returns the number of bits needed to store `value` (0 for 0).
pub(super) fn bit_width(value: u64) -> u32 {
    64 - value.leading_zeros()
}

/// Returns the greatest common divisor, with `gcd(0, 0) == 0`. Binary
/// (Stein's) algorithm: shifts and subtractions instead of slow divisions.
pub(super) fn gcd(mut a: u64, mut b: u64) -> u64 {
    if a == 0 {
        return b;
    }
    if b == 0 {
        return a;
    }
    let shift = (a | b).trailing_zeros();
    a >>= a.trailing_zeros();
    loop {
        b >>= b.trailing_zeros();
        if a > b {
            (a, b) = (b, a);
        }
        b -= a;
        if b == 0 {
            return a << shift;
        }
    }
}

/// A cursor over one encoded column. Every read checks bounds.
pub(super) struct ByteReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> ByteReader<'a> {
        ByteReader { bytes, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self.bytes.get(self.pos).ok_or_else(|| {
            DecodeError::new(format!("input ends at byte {} inside a header", self.pos))
        })?;
        self.pos += 1;
        Ok(byte)
    }

    pub(super) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::new(format!(
                "input too short: {len} bytes needed at byte {}, {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let slice = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(slice)
    }

    pub(super) fn u64_le(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    pub(super) fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError::new(format!(
                    "varint at byte {start} overflows 64 bits"
                )));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::new(format!(
            "varint at byte {start} is longer than 10 bytes"
        )))
    }

    pub(super) fn ivarint(&mut self) -> Result<i64, DecodeError> {
        Ok(unzigzag(self.uvarint()?))
    }

    /// Reads a varint that counts items and checks it against `max`.
    pub(super) fn count(&mut self, what: &str, max: usize) -> Result<usize, DecodeError> {
        let value = self.uvarint()?;
        match usize::try_from(value) {
            Ok(count) if count <= max => Ok(count),
            _ => Err(DecodeError::new(format!(
                "{what} {value} exceeds the maximum {max}"
            ))),
        }
    }

    /// Returns the unread bytes and moves the cursor to the end.
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }

    /// Checks that every byte was read.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(DecodeError::new(format!(
                "{} unexpected bytes after the end of the column",
                self.remaining()
            )))
        }
    }
}

/// Appends bit fields LSB-first: the first field occupies the lowest bits of
/// the first byte. [`BitWriter::finish`] pads the last byte with zero bits.
pub(super) struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    pending: u64,
    pending_bits: u32,
}

impl<'a> BitWriter<'a> {
    pub(super) fn new(out: &'a mut Vec<u8>) -> BitWriter<'a> {
        BitWriter {
            out,
            pending: 0,
            pending_bits: 0,
        }
    }

    /// Appends the low `width` bits of `value`; `width` is at most 64 and
    /// the higher bits of `value` must be zero.
    #[inline]
    pub(super) fn write(&mut self, value: u64, width: u32) {
        debug_assert!(width <= 64);
        debug_assert!(width == 64 || value >> width == 0);
        if width == 0 {
            return;
        }
        self.pending |= value << self.pending_bits;
        let total = self.pending_bits + width;
        if total >= 64 {
            self.out.extend_from_slice(&self.pending.to_le_bytes());
            // The bits of `value` that did not fit into the flushed word.
            self.pending = if self.pending_bits == 0 {
                0
            } else {
                value >> (64 - self.pending_bits)
            };
            self.pending_bits = total - 64;
        } else {
            self.pending_bits = total;
        }
    }

    pub(super) fn write_bit(&mut self, bit: bool) {
        self.write(u64::from(bit), 1);
    }

    pub(super) fn finish(self) {
        let bytes = self.pending_bits.div_ceil(8) as usize;
        self.out
            .extend_from_slice(&self.pending.to_le_bytes()[..bytes]);
    }
}

/// Reads bit fields written by [`BitWriter`]. Every read checks bounds.
pub(super) struct BitReader<'a> {
    bytes: &'a [u8],
    /// Position of the next unread bit.
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> BitReader<'a> {
        BitReader { bytes, pos: 0 }
    }

    pub(super) fn remaining_bits(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    /// Loads 8 bytes starting at `index`, with zeros past the end.
    #[inline]
    fn load_word(&self, index: usize) -> u64 {
        let mut array = [0u8; 8];
        if let Some(bytes) = self.bytes.get(index..index + 8) {
            array.copy_from_slice(bytes);
        } else if let Some(bytes) = self.bytes.get(index..) {
            array[..bytes.len()].copy_from_slice(bytes);
        }
        u64::from_le_bytes(array)
    }

    #[inline]
    pub(super) fn read(&mut self, width: u32) -> Result<u64, DecodeError> {
        debug_assert!(width <= 64);
        if width == 0 {
            return Ok(0);
        }
        if width as usize > self.remaining_bits() {
            return Err(DecodeError::new(format!(
                "bit stream ends at bit {}, {width} more bits needed",
                self.pos
            )));
        }

        let index = self.pos / 8;
        let shift = (self.pos % 8) as u32;
        let mut value = self.load_word(index) >> shift;
        if shift + width > 64 {
            // The field reaches into the ninth byte.
            let next = u64::from(self.bytes.get(index + 8).copied().unwrap_or(0));
            value |= next << (64 - shift);
        }
        self.pos += width as usize;

        if width == 64 {
            Ok(value)
        } else {
            Ok(value & ((1u64 << width) - 1))
        }
    }

    pub(super) fn read_bit(&mut self) -> Result<bool, DecodeError> {
        Ok(self.read(1)? == 1)
    }

    /// Checks that only zero padding of the last byte is left.
    pub(super) fn finish(&self) -> Result<(), DecodeError> {
        let remaining = self.remaining_bits();
        if remaining >= 8 {
            return Err(DecodeError::new(format!(
                "{} unexpected bytes after the end of the bit stream",
                remaining / 8
            )));
        }
        let last = self.bytes.last().copied().unwrap_or(0);
        if remaining > 0 && last >> (8 - remaining) != 0 {
            return Err(DecodeError::new(
                "padding bits of the bit stream are not zero",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcd_matches_definition() {
        assert_eq!(gcd(0, 0), 0);
        assert_eq!(gcd(0, 12), 12);
        assert_eq!(gcd(12, 0), 12);
        assert_eq!(gcd(12, 18), 6);
        assert_eq!(gcd(10_000_000_000, 20_000_000_000), 10_000_000_000);
        assert_eq!(gcd(u64::MAX, u64::MAX - 1), 1);
        assert_eq!(gcd(1 << 63, 1 << 40), 1 << 40);
    }

    #[test]
    fn varint_lengths_match_encoding() {
        for value in [0, 1, 127, 128, 16_383, 16_384, u64::MAX / 2, u64::MAX] {
            let mut out = Vec::new();
            put_uvarint(&mut out, value);
            assert_eq!(out.len(), uvarint_len(value), "value {value}");
            assert_eq!(ByteReader::new(&out).uvarint().unwrap(), value);
        }
    }

    #[test]
    fn zigzag_round_trips_extremes() {
        for value in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
    }

    #[test]
    fn varint_rejects_overflow() {
        let bytes = [0xff; 9].into_iter().chain([0x02]).collect::<Vec<_>>();
        assert!(ByteReader::new(&bytes).uvarint().is_err());
        let bytes = [0x80; 11];
        assert!(ByteReader::new(&bytes).uvarint().is_err());
    }

    #[test]
    fn bits_round_trip_all_widths() {
        let mut out = Vec::new();
        let mut writer = BitWriter::new(&mut out);
        let mut fields = Vec::new();
        for width in 0..=64u32 {
            let value = if width == 0 {
                0
            } else {
                0xdead_beef_cafe_f00d_u64 >> (64 - width)
            };
            writer.write(value, width);
            writer.write_bit(width % 2 == 1);
            fields.push((value, width));
        }
        writer.finish();

        let mut reader = BitReader::new(&out);
        for (value, width) in fields {
            assert_eq!(reader.read(width).unwrap(), value, "width {width}");
            assert_eq!(reader.read_bit().unwrap(), width % 2 == 1);
        }
        reader.finish().unwrap();
        assert!(reader.read(8).is_err());
    }
}
