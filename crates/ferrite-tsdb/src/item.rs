//! The value a segment stores per timestamp: a raw [`Value`], or a rollup row
//! (a [`Bucket`] summarising the points of one interval). Segments, blocks,
//! merging and compaction are generic over [`StoredValue`], so both kinds
//! share one file format, one last-write-wins rule and one compactor.

use ferrite_core::{TimestampNs, Value};

use crate::Bucket;
use crate::block;
use crate::encoding::{DecodeError, Reader, put_ivarint, put_uvarint, put_value};

pub(crate) trait StoredValue:
    Clone + PartialEq + std::fmt::Debug + Send + Sync + 'static
{
    /// True for raw points, false for rollup rows.
    const RAW: bool;

    /// Sets the timestamp a decoded value belongs to (a rollup row keeps
    /// its bucket start).
    fn at(self, _ts: TimestampNs) -> Self {
        self
    }

    /// Cheap value left behind when a merge moves a value out.
    fn placeholder() -> Self;

    /// Value written as the index entry's last value of a sealed segment,
    /// which must not reveal the real one; `read_last` must accept it.
    fn index_placeholder() -> Self;

    /// Uncompressed size estimate, which bounds block size.
    fn raw_size(&self) -> usize;

    /// Appends the value columns of a block (everything after count and
    /// timestamps).
    fn encode_columns(values: &[Self], out: &mut Vec<u8>);

    /// Decodes what [`StoredValue::encode_columns`] wrote.
    fn decode_columns(reader: &mut Reader<'_>, count: usize) -> Result<Vec<Self>, DecodeError>;

    /// Index encoding of the value at a series' greatest timestamp.
    fn put_last(&self, buf: &mut Vec<u8>);
    fn read_last(reader: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Decodes a format 1 block; only raw points have one.
    fn decode_version_1_block(frame: &[u8]) -> Result<Vec<(TimestampNs, Self)>, DecodeError>;
}

impl StoredValue for Value {
    const RAW: bool = true;

    fn placeholder() -> Value {
        Value::Bool(false)
    }

    fn index_placeholder() -> Value {
        Value::Bool(false)
    }

    fn raw_size(&self) -> usize {
        8 + match self {
            Value::Str(s) => s.len() + 2,
            _ => 8,
        }
    }

    fn encode_columns(values: &[Value], out: &mut Vec<u8>) {
        block::encode_values(values, out);
    }

    fn decode_columns(reader: &mut Reader<'_>, count: usize) -> Result<Vec<Value>, DecodeError> {
        block::decode_values(reader, count)
    }

    fn put_last(&self, buf: &mut Vec<u8>) {
        put_value(buf, self);
    }

    fn read_last(reader: &mut Reader<'_>) -> Result<Value, DecodeError> {
        reader.value()
    }

    fn decode_version_1_block(frame: &[u8]) -> Result<Vec<(TimestampNs, Value)>, DecodeError> {
        crate::encoding::decode_framed_block(frame)
    }
}

/// Rollup rows: `count`, `numeric_count`, `sum`, `min`, `max`, first and
/// last point. Rows are never empty; `sum`, `min` and `max` are `None`
/// exactly when `numeric_count` is 0 and are stored as 0.0 then.
///
/// ```text
/// columns: count ints | numeric_count ints | sum floats | min floats | max floats
///          | first_ts ints | first values | last_ts ints | last values
/// ```
///
/// each framed as `len varint | column`; the values columns use the raw
/// value layout (kind byte and column).
impl StoredValue for Bucket {
    const RAW: bool = false;

    fn placeholder() -> Bucket {
        Bucket::empty(0)
    }

    fn index_placeholder() -> Bucket {
        Bucket {
            count: 1,
            first: Some((0, Value::Bool(false))),
            last: Some((0, Value::Bool(false))),
            ..Bucket::empty(0)
        }
    }

    fn at(mut self, ts: TimestampNs) -> Bucket {
        self.start = ts;
        self
    }

    fn raw_size(&self) -> usize {
        let text = |point: &Option<(TimestampNs, Value)>| {
            point.as_ref().map_or(0, |(_, value)| value.raw_size())
        };
        48 + text(&self.first) + text(&self.last)
    }

    fn encode_columns(rows: &[Bucket], out: &mut Vec<u8>) {
        let ints = |f: &dyn Fn(&Bucket) -> i64, out: &mut Vec<u8>| {
            let column: Vec<i64> = rows.iter().map(f).collect();
            framed(out, |buf| crate::compress::encode_ints(&column, buf));
        };
        let floats = |f: &dyn Fn(&Bucket) -> f64, out: &mut Vec<u8>| {
            let column: Vec<f64> = rows.iter().map(f).collect();
            framed(out, |buf| crate::compress::encode_floats(&column, buf));
        };
        ints(&|row| row.count as i64, out);
        ints(&|row| row.numeric_count as i64, out);
        floats(&|row| row.sum.unwrap_or(0.0), out);
        floats(&|row| row.min.unwrap_or(0.0), out);
        floats(&|row| row.max.unwrap_or(0.0), out);
        for pick in [first_of as fn(&Bucket) -> &(TimestampNs, Value), last_of] {
            ints(&|row| pick(row).0, out);
            let values: Vec<Value> = rows.iter().map(|row| pick(row).1.clone()).collect();
            framed(out, |buf| block::encode_values(&values, buf));
        }
    }

    fn decode_columns(reader: &mut Reader<'_>, count: usize) -> Result<Vec<Bucket>, DecodeError> {
        let ints = |reader: &mut Reader<'_>| -> Result<Vec<i64>, DecodeError> {
            let len = reader.len()?;
            crate::compress::decode_ints(reader.take(len)?, count)
                .map_err(|_| DecodeError("damaged rollup column"))
        };
        let floats = |reader: &mut Reader<'_>| -> Result<Vec<f64>, DecodeError> {
            let len = reader.len()?;
            crate::compress::decode_floats(reader.take(len)?, count)
                .map_err(|_| DecodeError("damaged rollup column"))
        };
        let values = |reader: &mut Reader<'_>| -> Result<Vec<Value>, DecodeError> {
            let len = reader.len()?;
            let mut inner = Reader::new(reader.take(len)?);
            block::decode_values(&mut inner, count)
        };
        let counts = ints(reader)?;
        let numeric = ints(reader)?;
        let sums = floats(reader)?;
        let mins = floats(reader)?;
        let maxes = floats(reader)?;
        let first_ts = ints(reader)?;
        let first_values = values(reader)?;
        let last_ts = ints(reader)?;
        let last_values = values(reader)?;

        let mut rows = Vec::with_capacity(count);
        let mut first_values = first_values.into_iter();
        let mut last_values = last_values.into_iter();
        for i in 0..count {
            let count = u64::try_from(counts[i]).map_err(|_| DecodeError("negative count"))?;
            let numeric_count =
                u64::try_from(numeric[i]).map_err(|_| DecodeError("negative count"))?;
            if count == 0 || numeric_count > count {
                return Err(DecodeError("rollup row with inconsistent counts"));
            }
            let numeric = |value: f64| (numeric_count > 0).then_some(value);
            rows.push(Bucket {
                start: 0,
                count,
                numeric_count,
                sum: numeric(sums[i]),
                min: numeric(mins[i]),
                max: numeric(maxes[i]),
                first: Some((first_ts[i], first_values.next().expect("count values"))),
                last: Some((last_ts[i], last_values.next().expect("count values"))),
            });
        }
        Ok(rows)
    }

    fn put_last(&self, buf: &mut Vec<u8>) {
        put_uvarint(buf, self.count);
        put_uvarint(buf, self.numeric_count);
        for value in [self.sum, self.min, self.max] {
            buf.extend_from_slice(&value.unwrap_or(0.0).to_bits().to_le_bytes());
        }
        for (ts, value) in [first_of(self), last_of(self)] {
            put_ivarint(buf, *ts);
            put_value(buf, value);
        }
    }

    fn read_last(reader: &mut Reader<'_>) -> Result<Bucket, DecodeError> {
        let count = reader.uvarint()?;
        let numeric_count = reader.uvarint()?;
        if count == 0 || numeric_count > count {
            return Err(DecodeError("rollup row with inconsistent counts"));
        }
        let mut float = || -> Result<Option<f64>, DecodeError> {
            let bytes = reader.take(8)?;
            let value = f64::from_bits(u64::from_le_bytes(bytes.try_into().expect("8 bytes")));
            Ok((numeric_count > 0).then_some(value))
        };
        let (sum, min, max) = (float()?, float()?, float()?);
        let first = Some((reader.ivarint()?, reader.value()?));
        let last = Some((reader.ivarint()?, reader.value()?));
        Ok(Bucket {
            start: 0,
            count,
            numeric_count,
            sum,
            min,
            max,
            first,
            last,
        })
    }

    fn decode_version_1_block(_frame: &[u8]) -> Result<Vec<(TimestampNs, Bucket)>, DecodeError> {
        Err(DecodeError("format 1 has no rollup blocks"))
    }
}

fn first_of(row: &Bucket) -> &(TimestampNs, Value) {
    row.first.as_ref().expect("rollup rows are never empty")
}

fn last_of(row: &Bucket) -> &(TimestampNs, Value) {
    row.last.as_ref().expect("rollup rows are never empty")
}

fn framed(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
    let mut column = Vec::new();
    write(&mut column);
    put_uvarint(out, column.len() as u64);
    out.extend_from_slice(&column);
}
