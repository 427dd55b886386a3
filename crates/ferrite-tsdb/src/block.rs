//! Blocks of format version 2: the points of one series stored as
//! compressed columns. Pure functions, no I/O.
//!
//! ```text
//! frame:    payload_len u32 | crc32(payload) u32 | payload
//! payload:  count varint | ts_len varint | timestamps column | kind u8 | values
//! values:   kind 0 Float: floats column
//!           kind 1 Int:   ints column
//!           kind 2 Bool:  bools column
//!           kind 3 Str:   strings column
//!           kind 4 mixed: tags_len varint | tags column (ints: 0 Float, 1 Int,
//!                         2 Bool, 3 Str, one per point) | then for each type
//!                         present, in tag order: len varint | its column
//! ```
//!
//! The column layouts belong to the `compress` module. A series usually
//! keeps one type, so the mixed kind is rare; it keeps a block valid when a
//! device changes the type of a key.

use ferrite_core::{TimestampNs, Value};

use crate::compress;
use crate::encoding::{DecodeError, Reader, put_uvarint};
use crate::item::StoredValue;

const KIND_FLOAT: u8 = 0;
const KIND_INT: u8 = 1;
const KIND_BOOL: u8 = 2;
const KIND_STR: u8 = 3;
const KIND_MIXED: u8 = 4;

/// Collects the points of one block; [`BlockBuilder::finish_payload`]
/// encodes them. Points must arrive in strictly ascending timestamp order.
pub(crate) struct BlockBuilder<V> {
    timestamps: Vec<TimestampNs>,
    values: Vec<V>,
    /// Uncompressed size estimate, which bounds block size for long strings.
    raw_bytes: usize,
}

impl<V> Default for BlockBuilder<V> {
    fn default() -> BlockBuilder<V> {
        BlockBuilder {
            timestamps: Vec::new(),
            values: Vec::new(),
            raw_bytes: 0,
        }
    }
}

impl<V: StoredValue> BlockBuilder<V> {
    pub(crate) fn count(&self) -> u32 {
        self.timestamps.len() as u32
    }

    pub(crate) fn raw_bytes(&self) -> usize {
        self.raw_bytes
    }

    pub(crate) fn min_ts(&self) -> TimestampNs {
        self.timestamps[0]
    }

    pub(crate) fn max_ts(&self) -> TimestampNs {
        self.timestamps[self.timestamps.len() - 1]
    }

    pub(crate) fn push(&mut self, ts: TimestampNs, value: &V) {
        debug_assert!(self.timestamps.last().is_none_or(|last| *last < ts));
        self.raw_bytes += value.raw_size();
        self.timestamps.push(ts);
        self.values.push(value.clone());
    }

    /// Writes the framed block to `out` and empties the builder. Returns the
    /// number of bytes written.
    #[cfg(test)]
    pub(crate) fn finish_into(&mut self, out: &mut Vec<u8>) -> usize {
        let payload = self.finish_payload();
        frame_into(&payload, out)
    }

    /// Encodes the points as a block payload (without its frame) and
    /// empties the builder.
    pub(crate) fn finish_payload(&mut self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(self.raw_bytes / 4 + 16);
        put_uvarint(&mut payload, self.timestamps.len() as u64);
        let mut column = Vec::new();
        compress::encode_timestamps(&self.timestamps, &mut column);
        put_uvarint(&mut payload, column.len() as u64);
        payload.extend_from_slice(&column);
        V::encode_columns(&self.values, &mut payload);

        self.timestamps.clear();
        self.values.clear();
        self.raw_bytes = 0;
        payload
    }
}

/// Writes `payload` with its frame (length and checksum) to `out`. Returns
/// the number of bytes written.
pub(crate) fn frame_into(payload: &[u8], out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out.len() - start
}

fn kind_of(value: &Value) -> u8 {
    match value {
        Value::Float(_) => KIND_FLOAT,
        Value::Int(_) => KIND_INT,
        Value::Bool(_) => KIND_BOOL,
        Value::Str(_) => KIND_STR,
    }
}

/// Appends a value column (kind byte and columns) for `values`.
pub(crate) fn encode_values(values: &[Value], out: &mut Vec<u8>) {
    let first = kind_of(&values[0]);
    if values.iter().all(|value| kind_of(value) == first) {
        out.push(first);
        encode_column(first, values.iter(), out);
        return;
    }

    out.push(KIND_MIXED);
    let tags: Vec<i64> = values.iter().map(|v| i64::from(kind_of(v))).collect();
    let mut column = Vec::new();
    compress::encode_ints(&tags, &mut column);
    put_uvarint(out, column.len() as u64);
    out.extend_from_slice(&column);
    for kind in [KIND_FLOAT, KIND_INT, KIND_BOOL, KIND_STR] {
        if !tags.contains(&i64::from(kind)) {
            continue;
        }
        column.clear();
        encode_column(
            kind,
            values.iter().filter(|v| kind_of(v) == kind),
            &mut column,
        );
        put_uvarint(out, column.len() as u64);
        out.extend_from_slice(&column);
    }
}

/// Encodes values that all have the type `kind`.
fn encode_column<'a>(kind: u8, values: impl Iterator<Item = &'a Value>, out: &mut Vec<u8>) {
    match kind {
        KIND_FLOAT => {
            let floats: Vec<f64> = values
                .map(|v| match v {
                    Value::Float(f) => *f,
                    _ => unreachable!("a column contains one type"),
                })
                .collect();
            compress::encode_floats(&floats, out);
        }
        KIND_INT => {
            let ints: Vec<i64> = values
                .map(|v| match v {
                    Value::Int(i) => *i,
                    _ => unreachable!("a column contains one type"),
                })
                .collect();
            compress::encode_ints(&ints, out);
        }
        KIND_BOOL => {
            let bools: Vec<bool> = values
                .map(|v| match v {
                    Value::Bool(b) => *b,
                    _ => unreachable!("a column contains one type"),
                })
                .collect();
            compress::encode_bools(&bools, out);
        }
        _ => {
            let strings: Vec<&str> = values
                .map(|v| match v {
                    Value::Str(s) => s.as_str(),
                    _ => unreachable!("a column contains one type"),
                })
                .collect();
            compress::encode_strings(&strings, out);
        }
    }
}

fn decode_column(kind: u8, input: &[u8], count: usize) -> Result<Vec<Value>, DecodeError> {
    let corrupt = |_| DecodeError("damaged value column");
    Ok(match kind {
        KIND_FLOAT => compress::decode_floats(input, count)
            .map_err(corrupt)?
            .into_iter()
            .map(Value::Float)
            .collect(),
        KIND_INT => compress::decode_ints(input, count)
            .map_err(corrupt)?
            .into_iter()
            .map(Value::Int)
            .collect(),
        KIND_BOOL => compress::decode_bools(input, count)
            .map_err(corrupt)?
            .into_iter()
            .map(Value::Bool)
            .collect(),
        KIND_STR => compress::decode_strings(input, count)
            .map_err(corrupt)?
            .into_iter()
            .map(Value::Str)
            .collect(),
        _ => return Err(DecodeError("unknown value column kind")),
    })
}

/// Checks the frame of a version 2 block and decodes its points.
#[cfg(test)]
pub(crate) fn decode_framed_block<V: StoredValue>(
    frame: &[u8],
) -> Result<Vec<(TimestampNs, V)>, DecodeError> {
    decode_payload(crate::encoding::unframe(frame)?)
}

/// Decodes a plain block payload.
pub(crate) fn decode_payload<V: StoredValue>(
    payload: &[u8],
) -> Result<Vec<(TimestampNs, V)>, DecodeError> {
    let mut reader = Reader::new(payload);
    let count = reader.len()?;
    if count == 0 {
        return Err(DecodeError("empty block"));
    }
    let ts_len = reader.len()?;
    let timestamps = compress::decode_timestamps(reader.take(ts_len)?, count)
        .map_err(|_| DecodeError("damaged timestamp column"))?;
    if timestamps.len() != count || timestamps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(DecodeError(
            "timestamps in block are not strictly ascending",
        ));
    }

    let values = V::decode_columns(&mut reader, count)?;
    if !reader.is_empty() {
        return Err(DecodeError("trailing bytes after the last column"));
    }
    if values.len() != count {
        return Err(DecodeError("value column length differs from the count"));
    }
    Ok(timestamps
        .into_iter()
        .zip(values)
        .map(|(ts, value)| (ts, value.at(ts)))
        .collect())
}

/// Reads a value column written by [`encode_values`]; it takes the rest of
/// `reader`.
pub(crate) fn decode_values(
    reader: &mut Reader<'_>,
    count: usize,
) -> Result<Vec<Value>, DecodeError> {
    let kind = reader.u8()?;
    let values = if kind == KIND_MIXED {
        let tags_len = reader.len()?;
        let tags = compress::decode_ints(reader.take(tags_len)?, count)
            .map_err(|_| DecodeError("damaged type column"))?;
        let mut columns: [Option<std::vec::IntoIter<Value>>; 4] = Default::default();
        for kind in [KIND_FLOAT, KIND_INT, KIND_BOOL, KIND_STR] {
            let n = tags.iter().filter(|t| **t == i64::from(kind)).count();
            if n == 0 {
                continue;
            }
            let len = reader.len()?;
            columns[kind as usize] = Some(decode_column(kind, reader.take(len)?, n)?.into_iter());
        }
        let mut values = Vec::with_capacity(count);
        for tag in &tags {
            let column = usize::try_from(*tag)
                .ok()
                .and_then(|t| columns.get_mut(t))
                .and_then(Option::as_mut)
                .ok_or(DecodeError("invalid type tag in block"))?;
            values.push(column.next().ok_or(DecodeError("value column too short"))?);
        }
        values
    } else {
        decode_column(kind, reader.rest(), count)?
    };
    if values.len() != count {
        return Err(DecodeError("value column length differs from the count"));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::encoding::Point;

    fn round_trip(points: &[Point]) -> Vec<Point> {
        let mut builder = BlockBuilder::<Value>::default();
        for (ts, value) in points {
            builder.push(*ts, value);
        }
        let mut frame = Vec::new();
        let len = builder.finish_into(&mut frame);
        assert_eq!(len, frame.len());
        decode_framed_block(&frame).unwrap()
    }

    #[test]
    fn single_type_blocks_round_trip() {
        let floats: Vec<Point> = (0..100)
            .map(|i| (i * 10, Value::Float(i as f64 * 0.1)))
            .collect();
        assert_eq!(round_trip(&floats), floats);
        let strings: Vec<Point> = (0..10)
            .map(|i| (i, Value::Str(format!("s{}", i % 3))))
            .collect();
        assert_eq!(round_trip(&strings), strings);
        let one = vec![(i64::MIN + 1, Value::Bool(true))];
        assert_eq!(round_trip(&one), one);
    }

    #[test]
    fn mixed_block_round_trips() {
        let points = vec![
            (-5, Value::Str("boot".into())),
            (1, Value::Int(2)),
            (2, Value::Float(-0.0)),
            (3, Value::Bool(false)),
            (4, Value::Int(i64::MIN)),
            (i64::MAX - 1, Value::Str(String::new())),
        ];
        let decoded = round_trip(&points);
        assert_eq!(decoded, points);
        assert!(matches!(decoded[2].1, Value::Float(f) if f.is_sign_negative()));
    }

    #[test]
    fn damage_is_detected() {
        let mut builder = BlockBuilder::<Value>::default();
        for i in 0..50 {
            builder.push(i, &Value::Int(i));
        }
        let mut frame = Vec::new();
        builder.finish_into(&mut frame);
        for at in [0, 5, 9, frame.len() - 1] {
            let mut damaged = frame.clone();
            damaged[at] ^= 0x40;
            assert!(
                decode_framed_block::<Value>(&damaged).is_err(),
                "flip at {at}"
            );
        }
    }
}
