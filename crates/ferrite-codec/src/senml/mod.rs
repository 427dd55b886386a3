//! SenML, Sensor Measurement Lists (RFC 8428), in the JSON
//! (`application/senml+json`) and CBOR (`application/senml+cbor`)
//! representations.
//!
//! ```text
//! [{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.276020076001e+09,"n":"voltage","u":"V","v":120.1},
//!  {"n":"current","t":-5,"u":"A","v":1.2}]
//! ```
//!
//! A pack is an array of records. [`parse_json`] and [`parse_cbor`] return
//! the resolved records of a pack in pack order, or the first error. The
//! XML and EXI representations and SensML streams sent in parts are not
//! supported, although a CBOR pack may use an indefinite-length array.
//!
//! # Resolution (RFC 8428 sections 4.1 to 4.6)
//!
//! A base field (`bn`, `bt`, `bu`, `bv`, `bs`, `bver`) applies to its own
//! record and to every record after it, until a later record sets the same
//! base field again.
//!
//! - Name: [`Record::full_name`] is `bn + n`. It must not be empty, must
//!   start with a letter or digit, and may then contain only letters,
//!   digits and `-` `:` `.` `/` `_`. It may be at most [`MAX_KEY_BYTES`]
//!   bytes long, and so may `bn`, `n` and units.
//! - Unit: `u`, or else `bu`, or else `None`.
//! - Time: `bt + t` in seconds, a missing one counting as zero. A result of
//!   2**28 s (1978-07-04T21:24:16Z) or more is seconds since the epoch. A
//!   smaller result, negative ones included, is relative to the `now_ns`
//!   argument: `t: -5` is five seconds before `now_ns`, and `t: 0` is
//!   `now_ns`. A record with neither `t` nor a `bt` in effect gets
//!   `ts_ns: None`, and the caller uses the receive time. Times convert to
//!   nanoseconds exactly from their decimal digits: `1.276020076001e+09`
//!   becomes `1_276_020_076_001_000_000`. Digits below a nanosecond are
//!   rounded half away from zero. A time whose result is outside Ferrite's
//!   storable range (1677-09-21 to 2262-04-11) is rejected with an error,
//!   never wrapped or clamped.
//! - Version: `bver` must be a positive integer no larger than
//!   [`SENML_VERSION`] (10, the default), and every record of a pack must
//!   have the same version.
//!
//! # Values
//!
//! A record carries exactly one of `v`, `vs`, `vb` and `vd`, unless it has
//! a sum, in which case it may carry none. A record that contains only base
//! fields and has no sum is allowed and produces nothing: it sets base
//! fields for the records after it, as in the actuator example of RFC 8428
//! section 5.1.7.
//!
//! | Field | Value                                                         |
//! |-------|---------------------------------------------------------------|
//! | `v`   | `Float(bv + v)`, also for whole numbers such as `20`          |
//! | `vs`  | `Str`, up to [`MAX_STRING_VALUE_BYTES`] bytes                 |
//! | `vb`  | `Bool`                                                        |
//! | `vd`  | `Str` holding the data as base64url without padding          |
//! | `s`   | `Float(bs + s)` in a record of its own, see below             |
//!
//! `v` is always a `Float` because SenML defines it as a double: a series
//! keeps one type when a reading happens to be whole, and `20` and `20.0`
//! mean the same. `vd` arrives as base64url text in JSON and as a byte
//! string in CBOR. Both become the same base64url text (RFC 4648 section 5,
//! `-` and `_`, no padding), because Ferrite has no bytes value. JSON input
//! may carry padding, which is dropped. `bv` applies to `v` only.
//!
//! A sum becomes a record of its own, after the value record, whose `name`
//! is the record's name followed by [`SUM_NAME_SUFFIX`] (`.sum`), so the
//! sum of `energy` is stored as `energy.sum`, in the same way as Ferrite's
//! JSON flattens `{"energy": {"sum": ...}}`. A record has a sum when it
//! contains `s` or a `bs` is in effect, since RFC 8428 section 4.5.4 counts
//! a missing `s` as zero when `bs` is present. So after a `bs`, every record
//! yields a sum record too.
//!
//! # Other fields
//!
//! `ut` (update time) must be a non-negative number of seconds and is
//! returned in [`Record::update_time_s`]. An unknown field whose label ends
//! with `_` is rejected, as RFC 8428 section 4.4 requires. Other unknown
//! fields are ignored. In CBOR, the fields above use the integer labels of
//! RFC 8428 Table 4 (`bver` -1, `bn` -2, `bt` -3, `bu` -4, `bv` -5, `bs`
//! -6, `n` 0, `u` 1, `v` 2, `vs` 3, `vb` 4, `s` 5, `t` 6, `ut` 7, `vd` 8).
//! A CBOR text key that spells one of them (`"v"`) is rejected with a
//! message naming the integer label. Unknown integer labels are ignored.
//! CBOR numbers may be integers, floats of any width or decimal fractions
//! (tag 4).
//!
//! # Limits and errors
//!
//! A pack may have at most [`MAX_RECORDS`] records and a record at most
//! [`MAX_FIELDS_PER_RECORD`] fields. An empty pack, a pack without any
//! value, a field that appears twice in a record, a field of the wrong type,
//! NaN and infinite numbers are rejected. Every error about one record
//! names its index (counting from 0) in [`SenmlError::record_index`] and in
//! the message, and the field when there is one.

mod cbor;
mod fields;
mod json;
mod resolve;
#[cfg(test)]
mod tests;

use ferrite_core::{TimestampNs, Value};

pub use crate::{MAX_KEY_BYTES, MAX_STRING_VALUE_BYTES};

/// Maximum number of records in a pack.
pub const MAX_RECORDS: usize = 10_000;

/// Maximum number of fields in one record, counting unknown fields.
pub const MAX_FIELDS_PER_RECORD: usize = 64;

/// The SenML version of RFC 8428, the default and newest accepted `bver`.
pub const SENML_VERSION: u64 = 10;

/// Suffix appended to [`Record::name`] for the record that contains a sum.
pub const SUM_NAME_SUFFIX: &str = ".sum";

/// One resolved value: a SenML record with the base fields before it
/// applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Base name in effect for the record (`bn`), or empty.
    pub base_name: String,
    /// The record's own name (`n`), or empty. A sum record has
    /// [`SUM_NAME_SUFFIX`] appended.
    pub name: String,
    /// `u`, or else the base unit `bu` in effect.
    pub unit: Option<String>,
    /// `Float` for `v` and sums, `Str` for `vs` and `vd`, `Bool` for `vb`.
    pub value: Value,
    /// Resolved time, or `None` when neither `t` nor `bt` applies.
    pub ts_ns: Option<TimestampNs>,
    /// Update time `ut` in seconds: the maximum time before the sensor
    /// sends a new reading.
    pub update_time_s: Option<f64>,
}

impl Record {
    /// Returns the name that identifies the sensor: base name + name.
    pub fn full_name(&self) -> String {
        format!("{}{}", self.base_name, self.name)
    }
}

/// A pack that could not be decoded. Its `Display` output is the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SenmlError {
    /// Index of the record the error is about, counting from 0, when it is
    /// about one record.
    pub record_index: Option<usize>,
    /// JSON label of the field the error is about (`"t"`, also for CBOR),
    /// or the key as sent for an unknown field.
    pub field: Option<String>,
    /// Description of the problem and the fix.
    pub message: String,
}

impl SenmlError {
    fn general(message: String) -> Self {
        SenmlError {
            record_index: None,
            field: None,
            message,
        }
    }

    fn in_record(index: usize, detail: String) -> Self {
        SenmlError {
            record_index: Some(index),
            field: None,
            message: format!("record at index {index} {detail}"),
        }
    }

    /// `described_field` is the field as the message names it, such as
    /// `"t" (CBOR label 6)`.
    fn in_field(index: usize, field: &str, described_field: &str, detail: String) -> Self {
        SenmlError {
            record_index: Some(index),
            field: Some(crate::preview(field)),
            message: format!("record at index {index}, field {described_field}: {detail}"),
        }
    }
}

/// Parses a SenML JSON pack (`application/senml+json`). `now_ns` is the
/// time that relative times count from, usually the receive time.
pub fn parse_json(payload: &[u8], now_ns: i64) -> Result<Vec<Record>, SenmlError> {
    json::parse(payload, now_ns)
}

/// Parses a SenML CBOR pack (`application/senml+cbor`). `now_ns` is the
/// time that relative times count from, usually the receive time.
pub fn parse_cbor(payload: &[u8], now_ns: i64) -> Result<Vec<Record>, SenmlError> {
    cbor::parse(payload, now_ns)
}
