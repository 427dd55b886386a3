//! Column codecs for the points of one series inside a block.
//!
//! A block stores each column (timestamps, then values of one type)
//! separately. The caller frames every encoded column with its byte length
//! and stores the point count, so each decoder gets exactly its own bytes and
//! the count. Encoders try the codings that fit their column and keep the
//! smallest. Decoders check every length, count and index, and return
//! [`DecodeError`] instead of panicking. They also reject counts above
//! [`MAX_COUNT`] before allocating, so the values decoded from a damaged or
//! hostile numeric column take at most 8 MiB. String columns also cap their
//! decoded text at [`MAX_DECODED_TEXT_LEN`] bytes.
//!
//! NOTE: a count that is slightly too large is not always detected. The
//! constant codings repeat their value for any count, and the bit-packed,
//! XOR and bitmap codings may read the extra values from the zero bits that
//! pad their last byte. The caller must store the count reliably.
//!
//! # Format
//!
//! This is an on-disk format: the byte layouts below are stable. Each column
//! starts with a mode byte, so a later version adds codings under new mode
//! bytes and keeps reading the old ones. Integers are little-endian,
//! *varint* is unsigned LEB128 (at most 10 bytes), *zigzag* is a signed
//! integer zigzag-mapped onto a varint. Bit fields are packed LSB-first: the
//! first field starts at the lowest bit of the first byte, and the last byte
//! is padded with zero bits. Integer arithmetic (deltas, sums, offsets) wraps
//! modulo 2^64, so every `i64` sequence round-trips.
//!
//! ## Every column type
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x00` | empty | nothing follows; only valid for count 0 |
//!
//! ## Integer sequences
//!
//! The `ints` column, and the inner sequence that the timestamp, decimal
//! float and string codings end with. A sequence fills the rest of its column
//! and contains at least one value.
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x01` | constant | value zigzag |
//! | `0x02` | run-length | per run: (value − previous run's value, 0 before the first) zigzag, length varint ≥ 1; runs add up to the count |
//! | `0x03` | bit-packed | order u8 (0–2), seeds, min zigzag, gcd varint, width u8 (0–64), packed residuals |
//! | `0x04` | pco | a pco (`pco` crate, format 1) *wrapped* header, chunk metadata and one page of `count` i64 values |
//!
//! Bit-packed: the residuals are the values (order 0), their `count − 1`
//! deltas (order 1) or their `count − 2` deltas of deltas (order 2). The
//! seeds are the first value (orders 1 and 2) and then the first delta
//! (order 2), each zigzag. Each residual `r` is stored as `(r − min) / gcd`
//! in `width` bits, which fill exactly the rest of the column. A gcd of 0
//! means that every residual equals `min`, and then `width` is 0.
//!
//! ## Timestamps
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x10` | deltas | first timestamp i64; if the count is at least 2: gcd varint ≥ 1, then an integer sequence of the `count − 1` values `delta / gcd` |
//!
//! A delta is the difference to the previous timestamp as a `u64` (at least
//! 1), stored in the integer sequence as the `i64` with the same bits. The
//! sequence's coding does the rest: a constant for regular sampling,
//! run-length for occasional gaps, bit-packed order 1 (delta of delta) for
//! jitter, pco for long irregular columns.
//!
//! ## Floats
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x20` | raw | `count` × f64 bits as u64 |
//! | `0x21` | XOR | bit stream, see below |
//! | `0x22` | decimal | scale u8 (0–18), then an integer sequence of the scaled values `m` |
//! | `0x23` | pco | as integer mode `0x04`, with f64 values |
//!
//! Decimal: the value is `m as f64 / 10^scale`, computed in f64 exactly this
//! way. IEEE division rounds correctly, so this is the f64 nearest to the
//! decimal number, which is what parsing its text gives. The encoder uses
//! this mode only when it reproduces every value's bits (never for −0.0).
//!
//! XOR: the first value's 64 bits, then per further value the XOR `x` with
//! the previous value: bit `0` if `x` is 0; otherwise bit `1` and either bit
//! `0` followed by the bits of `x` inside the current window, or bit `1`,
//! the leading zero count of `x` (5 bits, counts above 31 stored as 31), the
//! window length (6 bits, 64 stored as 0) and the bits of `x` inside the
//! new window, which becomes the current one. A window is (leading zeros,
//! trailing zeros); the current one is reused when `x` has at least as many
//! of both.
//!
//! ## Booleans
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x30` | run-length | first value u8 (0 or 1), then run lengths varint ≥ 1, alternating values, adding up to the count |
//! | `0x31` | bitmap | one bit per value |
//!
//! ## Strings
//!
//! | mode | name | layout |
//! |---|---|---|
//! | `0x40` | dictionary | entry count varint ≥ 1, per entry: byte length varint and UTF-8 bytes, then an integer sequence of each value's entry index |

mod bits;
mod bools;
pub(crate) mod floats;
pub(crate) mod ints;
mod pcodec;
mod strings;
mod timestamps;

#[cfg(test)]
mod tests;

use std::fmt;

/// Maximum count of values in one column. Decoders reject larger counts
/// before allocating, so the decoded values of a damaged `i64` or `f64`
/// column take at most 8 MiB.
pub(crate) const MAX_COUNT: usize = 1 << 20;

/// Maximum total length in bytes of the strings of one string column, so
/// that a small dictionary with many indexes cannot expand without bound.
pub(crate) const MAX_DECODED_TEXT_LEN: usize = 1 << 28;

/// Shortest sequence that the encoders also try to compress with pco. Below
/// it pco's header and tables (tens of bytes) cost more than they save.
const PCO_MIN_COUNT: usize = 64;

thread_local! {
    static FAST_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `write` with the fast codings only, without pco. Flushes use it:
/// measured on the fleet dataset, pco's search for its bins made a flush of
/// 2 million points take 4.4 s instead of well under one, which stalled
/// ingest; the background compaction that merges a partition into one
/// segment rewrites the blocks with every coding.
pub(crate) fn fast_codings<R>(write: impl FnOnce() -> R) -> R {
    let previous = FAST_ONLY.with(|fast| fast.replace(true));
    let result = write();
    FAST_ONLY.with(|fast| fast.set(previous));
    result
}

/// True when an encoder should also try pco for `count` values.
fn try_pco(count: usize) -> bool {
    count >= PCO_MIN_COUNT && !FAST_ONLY.with(std::cell::Cell::get)
}

const MODE_EMPTY: u8 = 0x00;
const MODE_INT_CONSTANT: u8 = 0x01;
const MODE_INT_RLE: u8 = 0x02;
const MODE_INT_BITPACK: u8 = 0x03;
const MODE_INT_PCO: u8 = 0x04;
const MODE_TS_DELTA: u8 = 0x10;
const MODE_FLOAT_RAW: u8 = 0x20;
const MODE_FLOAT_XOR: u8 = 0x21;
const MODE_FLOAT_DECIMAL: u8 = 0x22;
const MODE_FLOAT_PCO: u8 = 0x23;
const MODE_BOOL_RLE: u8 = 0x30;
const MODE_BOOL_BITMAP: u8 = 0x31;
const MODE_STR_DICT: u8 = 0x40;

/// A column that cannot be decoded: truncated, damaged, or inconsistent
/// with the count. The message states what is wrong, and the caller adds
/// where the column is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DecodeError(String);

impl DecodeError {
    fn new(message: impl Into<String>) -> DecodeError {
        DecodeError(message.into())
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// Returns the name of a mode byte, for tools and measurements.
#[allow(dead_code, reason = "used by the codec_sizes example")]
pub(crate) fn mode_name(mode: u8) -> &'static str {
    match mode {
        MODE_EMPTY => "empty",
        MODE_INT_CONSTANT => "constant",
        MODE_INT_RLE => "run-length",
        MODE_INT_BITPACK => "bit-packed",
        MODE_INT_PCO => "pco",
        MODE_TS_DELTA => "deltas",
        MODE_FLOAT_RAW => "raw",
        MODE_FLOAT_XOR => "XOR",
        MODE_FLOAT_DECIMAL => "decimal",
        MODE_FLOAT_PCO => "pco",
        MODE_BOOL_RLE => "run-length",
        MODE_BOOL_BITMAP => "bitmap",
        MODE_STR_DICT => "dictionary",
        _ => "unknown",
    }
}

fn check_count(count: usize) -> Result<(), DecodeError> {
    if count > MAX_COUNT {
        return Err(DecodeError::new(format!(
            "count {count} exceeds the maximum {MAX_COUNT} values per column"
        )));
    }
    Ok(())
}

fn assert_count(count: usize) {
    assert!(
        count <= MAX_COUNT,
        "column of {count} values exceeds the maximum {MAX_COUNT}"
    );
}

/// Finishes decoding an empty-mode column.
fn decode_empty<T>(
    reader: &bits::ByteReader,
    count: usize,
    empty: Vec<T>,
) -> Result<Vec<T>, DecodeError> {
    if count != 0 {
        return Err(DecodeError::new(format!(
            "empty column mode used for {count} values"
        )));
    }
    reader.finish()?;
    Ok(empty)
}

/// Appends the timestamp column of `timestamps`, which must be strictly
/// ascending. Any `i64` values are allowed.
///
/// # Panics
///
/// If there are more than [`MAX_COUNT`] timestamps.
pub(crate) fn encode_timestamps(timestamps: &[i64], out: &mut Vec<u8>) {
    assert_count(timestamps.len());
    timestamps::encode(timestamps, out);
}

/// Decodes a column written by [`encode_timestamps`]. Also rejects columns
/// whose timestamps are not strictly ascending.
pub(crate) fn decode_timestamps(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    check_count(count)?;
    timestamps::decode(input, count)
}

/// Appends the float column of `values`. Every bit pattern round-trips,
/// including −0.0, subnormals, infinities and NaN payloads. The store
/// passes finite values only, so no coding is tuned for NaN.
///
/// # Panics
///
/// If there are more than [`MAX_COUNT`] values.
pub(crate) fn encode_floats(values: &[f64], out: &mut Vec<u8>) {
    assert_count(values.len());
    floats::encode(values, out);
}

pub(crate) fn decode_floats(input: &[u8], count: usize) -> Result<Vec<f64>, DecodeError> {
    check_count(count)?;
    floats::decode(input, count)
}

/// Appends the integer column of `values`.
///
/// # Panics
///
/// If there are more than [`MAX_COUNT`] values.
pub(crate) fn encode_ints(values: &[i64], out: &mut Vec<u8>) {
    assert_count(values.len());
    if values.is_empty() {
        out.push(MODE_EMPTY);
        return;
    }
    ints::encode(values, out);
}

pub(crate) fn decode_ints(input: &[u8], count: usize) -> Result<Vec<i64>, DecodeError> {
    check_count(count)?;
    if input.first() == Some(&MODE_EMPTY) {
        return decode_empty(&bits::ByteReader::new(&input[1..]), count, Vec::new());
    }
    ints::decode(input, count)
}

/// Appends the boolean column of `values`.
///
/// # Panics
///
/// If there are more than [`MAX_COUNT`] values.
pub(crate) fn encode_bools(values: &[bool], out: &mut Vec<u8>) {
    assert_count(values.len());
    bools::encode(values, out);
}

pub(crate) fn decode_bools(input: &[u8], count: usize) -> Result<Vec<bool>, DecodeError> {
    check_count(count)?;
    bools::decode(input, count)
}

/// Appends the string column of `values`.
///
/// # Panics
///
/// If there are more than [`MAX_COUNT`] values or their total length
/// exceeds [`MAX_DECODED_TEXT_LEN`] bytes.
pub(crate) fn encode_strings(values: &[&str], out: &mut Vec<u8>) {
    assert_count(values.len());
    strings::encode(values, out);
}

pub(crate) fn decode_strings(input: &[u8], count: usize) -> Result<Vec<String>, DecodeError> {
    check_count(count)?;
    strings::decode(input, count)
}
