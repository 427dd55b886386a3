//! Byte encodings shared by segment and series files: LEB128 varints, zigzag
//! integers, values and data blocks. Pure functions, no I/O.
//!
//! The layouts are described in the crate documentation; this module is the
//! only place that produces or parses them.

use ferrite_core::{TimestampNs, Value};

/// One stored point: timestamp and value.
pub(crate) type Point = (TimestampNs, Value);

/// A decoding failure. The caller adds the file path and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(pub &'static str);

const TAG_FLOAT: u8 = 0;
const TAG_INT: u8 = 1;
const TAG_FALSE: u8 = 2;
const TAG_TRUE: u8 = 3;
const TAG_STR: u8 = 4;

/// Length of the frame in front of every block payload: payload length and
/// CRC32, both `u32` little-endian.
pub(crate) const BLOCK_FRAME_LEN: usize = 8;

pub(crate) fn put_uvarint(buf: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        buf.push((value as u8) | 0x80);
        value >>= 7;
    }
    buf.push(value as u8);
}

pub(crate) fn put_ivarint(buf: &mut Vec<u8>, value: i64) {
    put_uvarint(buf, ((value << 1) ^ (value >> 63)) as u64);
}

pub(crate) fn put_bytes(buf: &mut Vec<u8>, bytes: &[u8]) {
    put_uvarint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

pub(crate) fn put_value(buf: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Float(v) => {
            buf.push(TAG_FLOAT);
            buf.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        Value::Int(v) => {
            buf.push(TAG_INT);
            put_ivarint(buf, *v);
        }
        Value::Bool(false) => buf.push(TAG_FALSE),
        Value::Bool(true) => buf.push(TAG_TRUE),
        Value::Str(v) => {
            buf.push(TAG_STR);
            put_bytes(buf, v.as_bytes());
        }
    }
}

/// A cursor over an encoded byte slice. Every read checks bounds.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, pos: 0 }
    }

    /// Returns the unread bytes and moves to the end.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let rest = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        rest
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// Number of bytes read so far.
    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self
            .bytes
            .get(self.pos)
            .ok_or(DecodeError("unexpected end of data"))?;
        self.pos += 1;
        Ok(byte)
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(DecodeError("length field points past the end of data"))?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    pub(crate) fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(DecodeError("varint overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError("varint longer than 10 bytes"))
    }

    pub(crate) fn ivarint(&mut self) -> Result<i64, DecodeError> {
        let raw = self.uvarint()?;
        Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64))
    }

    /// Reads a varint and checks that it fits `usize`.
    pub(crate) fn len(&mut self) -> Result<usize, DecodeError> {
        usize::try_from(self.uvarint()?).map_err(|_| DecodeError("length does not fit in memory"))
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError("string is not valid UTF-8"))
    }

    pub(crate) fn value(&mut self) -> Result<Value, DecodeError> {
        match self.u8()? {
            TAG_FLOAT => {
                let bytes: [u8; 8] = self.take(8)?.try_into().expect("took 8 bytes");
                Ok(Value::Float(f64::from_bits(u64::from_le_bytes(bytes))))
            }
            TAG_INT => Ok(Value::Int(self.ivarint()?)),
            TAG_FALSE => Ok(Value::Bool(false)),
            TAG_TRUE => Ok(Value::Bool(true)),
            TAG_STR => Ok(Value::Str(self.string()?)),
            _ => Err(DecodeError("unknown value type tag")),
        }
    }
}

/// Encodes the points of one format 1 block incrementally. Points must
/// arrive in strictly ascending timestamp order. Only tests write format 1
/// blocks now.
#[cfg(test)]
pub(crate) struct BlockEncoder {
    body: Vec<u8>,
    count: u32,
    min_ts: TimestampNs,
    max_ts: TimestampNs,
}

#[cfg(test)]
impl BlockEncoder {
    pub(crate) fn new() -> BlockEncoder {
        BlockEncoder {
            body: Vec::new(),
            count: 0,
            min_ts: 0,
            max_ts: 0,
        }
    }

    /// Appends a point. The first point stores its timestamp as a zigzag
    /// varint, later points the unsigned distance to the previous one.
    pub(crate) fn push(&mut self, ts: TimestampNs, value: &Value) {
        if self.count == 0 {
            put_ivarint(&mut self.body, ts);
            self.min_ts = ts;
        } else {
            debug_assert!(ts > self.max_ts, "block points must be strictly ascending");
            put_uvarint(&mut self.body, ts.wrapping_sub(self.max_ts) as u64);
        }
        put_value(&mut self.body, value);
        self.max_ts = ts;
        self.count += 1;
    }

    /// Writes the framed block (length, CRC32, payload) to `out` and resets
    /// the encoder. Returns the number of bytes written.
    pub(crate) fn finish_into(&mut self, out: &mut Vec<u8>) -> usize {
        let mut payload = Vec::with_capacity(self.body.len() + 5);
        put_uvarint(&mut payload, u64::from(self.count));
        payload.extend_from_slice(&self.body);

        let start = out.len();
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);

        self.body.clear();
        self.count = 0;
        out.len() - start
    }
}

/// Checks the frame of a format 1 block read from disk and decodes its
/// points. `frame` must be exactly the bytes the index entry points at.
pub(crate) fn decode_framed_block(frame: &[u8]) -> Result<Vec<Point>, DecodeError> {
    decode_block_payload(unframe(frame)?)
}

/// Checks a block frame (length and CRC32, the same in both formats) and
/// returns its payload.
pub(crate) fn unframe(frame: &[u8]) -> Result<&[u8], DecodeError> {
    if frame.len() < BLOCK_FRAME_LEN {
        return Err(DecodeError("block shorter than its frame"));
    }
    let payload_len = u32::from_le_bytes(frame[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(frame[4..8].try_into().expect("4 bytes"));
    let payload = &frame[BLOCK_FRAME_LEN..];
    if payload.len() != payload_len {
        return Err(DecodeError("block length differs from the index"));
    }
    if crc32fast::hash(payload) != crc {
        return Err(DecodeError("block checksum mismatch"));
    }
    Ok(payload)
}

fn decode_block_payload(payload: &[u8]) -> Result<Vec<Point>, DecodeError> {
    let mut reader = Reader::new(payload);
    let count = reader.len()?;
    if count == 0 {
        return Err(DecodeError("empty block"));
    }
    // Every point takes at least two bytes, which bounds the allocation
    // even when the count field is damaged.
    let mut points = Vec::with_capacity(count.min(payload.len() / 2));

    let mut ts = reader.ivarint()?;
    points.push((ts, reader.value()?));
    for _ in 1..count {
        // A delta can exceed i64::MAX (from near i64::MIN to near i64::MAX),
        // so the sum is formed in i128.
        let delta = reader.uvarint()?;
        if delta == 0 {
            return Err(DecodeError(
                "timestamps in block are not strictly ascending",
            ));
        }
        ts = i64::try_from(i128::from(ts) + i128::from(delta))
            .map_err(|_| DecodeError("timestamp overflows in block"))?;
        points.push((ts, reader.value()?));
    }

    if !reader.is_empty() {
        return Err(DecodeError(
            "trailing bytes after the last point of a block",
        ));
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_value(a: &Value, b: &Value) -> bool {
        match (a, b) {
            (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
            _ => a == b,
        }
    }

    fn round_trip(points: &[Point]) -> Vec<Point> {
        let mut encoder = BlockEncoder::new();
        for (ts, value) in points {
            encoder.push(*ts, value);
        }
        let mut frame = Vec::new();
        let written = encoder.finish_into(&mut frame);
        assert_eq!(written, frame.len());
        decode_framed_block(&frame).expect("decode")
    }

    fn assert_same_points(expected: &[Point], actual: &[Point]) {
        assert_eq!(expected.len(), actual.len());
        for (e, a) in expected.iter().zip(actual) {
            assert_eq!(e.0, a.0);
            assert!(same_value(&e.1, &a.1), "expected {:?}, got {:?}", e.1, a.1);
        }
    }

    #[test]
    fn varint_round_trip_extremes() {
        let unsigned = [
            0,
            1,
            127,
            128,
            300,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ];
        let signed = [0, 1, -1, 63, -64, 64, -65, i64::MIN, i64::MAX, i64::MIN + 1];

        let mut buf = Vec::new();
        for v in unsigned {
            put_uvarint(&mut buf, v);
        }
        for v in signed {
            put_ivarint(&mut buf, v);
        }

        let mut reader = Reader::new(&buf);
        for v in unsigned {
            assert_eq!(reader.uvarint(), Ok(v));
        }
        for v in signed {
            assert_eq!(reader.ivarint(), Ok(v));
        }
        assert!(reader.is_empty());
    }

    #[test]
    fn varint_rejects_overflow() {
        let eleven_bytes = [0xff; 11];
        assert!(Reader::new(&eleven_bytes).uvarint().is_err());

        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert!(Reader::new(&too_big).uvarint().is_err());

        assert!(Reader::new(&[0x80]).uvarint().is_err());
    }

    #[test]
    fn block_round_trip_every_value_type() {
        let long_string: String = "x".repeat(5 * 1024);
        let unicode = "Küche 🌡 température ✓".to_string();
        let points = vec![
            (ferrite_core::MIN_TIMESTAMP_NS, Value::Float(0.0)),
            (-1_000_000_000, Value::Float(-0.0)),
            (-1, Value::Float(f64::MIN_POSITIVE)),
            (0, Value::Float(f64::MAX)),
            (1, Value::Float(-f64::MAX)),
            (2, Value::Float(1.0e-300)),
            (3, Value::Int(i64::MIN)),
            (4, Value::Int(i64::MAX)),
            (5, Value::Int(0)),
            (6, Value::Int(-1)),
            (7, Value::Bool(false)),
            (8, Value::Bool(true)),
            (9, Value::Str(String::new())),
            (10, Value::Str(long_string)),
            (11, Value::Str(unicode)),
            (1_700_000_000_000_000_000, Value::Float(21.5)),
            (ferrite_core::MAX_TIMESTAMP_NS, Value::Int(42)),
        ];

        let decoded = round_trip(&points);

        assert_same_points(&points, &decoded);
        let Value::Float(negative_zero) = decoded[1].1 else {
            panic!("expected a float, got {:?}", decoded[1].1);
        };
        assert_eq!(negative_zero, 0.0);
        assert!(negative_zero.is_sign_negative());
    }

    #[test]
    fn block_round_trip_widest_delta() {
        let points = vec![
            (ferrite_core::MIN_TIMESTAMP_NS, Value::Int(1)),
            (ferrite_core::MAX_TIMESTAMP_NS, Value::Int(2)),
        ];
        assert_same_points(&points, &round_trip(&points));
    }

    #[test]
    fn block_round_trip_single_point() {
        let points = vec![(i64::MIN + 2, Value::Bool(true))];
        assert_same_points(&points, &round_trip(&points));
    }

    #[test]
    fn block_detects_flipped_byte() {
        let mut encoder = BlockEncoder::new();
        encoder.push(10, &Value::Float(1.5));
        encoder.push(20, &Value::Str("abc".into()));
        let mut frame = Vec::new();
        encoder.finish_into(&mut frame);

        for i in 0..frame.len() {
            let mut damaged = frame.clone();
            damaged[i] ^= 0x40;
            assert!(
                decode_framed_block(&damaged).is_err(),
                "flip at byte {i} not detected"
            );
        }
        assert!(decode_framed_block(&frame[..frame.len() - 1]).is_err());
    }

    #[test]
    fn block_rejects_zero_delta() {
        let mut payload = Vec::new();
        put_uvarint(&mut payload, 2);
        put_ivarint(&mut payload, 5);
        put_value(&mut payload, &Value::Int(1));
        put_uvarint(&mut payload, 0);
        put_value(&mut payload, &Value::Int(2));

        assert_eq!(
            decode_block_payload(&payload),
            Err(DecodeError(
                "timestamps in block are not strictly ascending"
            ))
        );
    }

    #[test]
    fn value_rejects_unknown_tag_and_bad_utf8() {
        assert!(Reader::new(&[9]).value().is_err());
        assert!(Reader::new(&[TAG_STR, 2, 0xc3, 0x28]).value().is_err());
        assert!(Reader::new(&[TAG_FLOAT, 0, 0]).value().is_err());
    }
}
