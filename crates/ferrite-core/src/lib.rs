//! Value and time types shared by Ferrite's codecs, storage engine and server.
//!
//! Timestamps are `i64` nanoseconds since the Unix epoch (UTC) everywhere inside
//! Ferrite, so the storable range is exactly the range of a signed 64-bit
//! nanosecond count: 1677-09-21T00:12:43.145224194Z to
//! 2262-04-11T23:47:16.854775806Z. `i64::MAX` and `i64::MIN` are not valid
//! timestamps: the first is kept as an open "end of time" bound in queries and
//! the second is kept free for symmetry, as InfluxDB does.

pub mod calendar;

use serde::{Serialize, Serializer};

/// Nanoseconds since 1970-01-01T00:00:00Z.
pub type TimestampNs = i64;

/// Smallest storable timestamp: 1677-09-21T00:12:43.145224194Z.
pub const MIN_TIMESTAMP_NS: TimestampNs = i64::MIN + 2;

/// Largest storable timestamp: 2262-04-11T23:47:16.854775806Z.
pub const MAX_TIMESTAMP_NS: TimestampNs = i64::MAX - 1;

pub const NANOS_PER_MILLI: i64 = 1_000_000;

/// Returns true when `ts` lies inside the storable range.
pub fn is_storable_timestamp(ts: TimestampNs) -> bool {
    (MIN_TIMESTAMP_NS..=MAX_TIMESTAMP_NS).contains(&ts)
}

/// Converts epoch milliseconds to nanoseconds, or `None` when the result
/// leaves the storable range.
pub fn millis_to_nanos(ms: i64) -> Option<TimestampNs> {
    ms.checked_mul(NANOS_PER_MILLI)
        .filter(|ns| is_storable_timestamp(*ns))
}

/// Converts nanoseconds to epoch milliseconds, rounding towards negative
/// infinity so that a point never appears later than it happened.
pub fn nanos_to_millis(ns: TimestampNs) -> i64 {
    ns.div_euclid(NANOS_PER_MILLI)
}

/// One telemetry value.
///
/// Type rule: every point keeps the type it arrived with, and a series may
/// hold points of several types. Numeric aggregates (sum, min, max, avg) use
/// the `Float` and `Int` points of a bucket and report how many other points
/// they skipped; `count`, `first` and `last` use every point.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Float(f64),
    Int(i64),
    Bool(bool),
    Str(String),
}

impl Value {
    /// The value as a float when it is numeric (`Float` or `Int`).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::Int(v) => Some(*v as f64),
            Value::Bool(_) | Value::Str(_) => None,
        }
    }

    /// Name of the value's type as the API reports it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Float(_) => "float",
            Value::Int(_) => "integer",
            Value::Bool(_) => "boolean",
            Value::Str(_) => "string",
        }
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Float(v) => serializer.serialize_f64(*v),
            Value::Int(v) => serializer.serialize_i64(*v),
            Value::Bool(v) => serializer.serialize_bool(*v),
            Value::Str(v) => serializer.serialize_str(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_conversion_rejects_overflow() {
        assert_eq!(millis_to_nanos(1), Some(1_000_000));
        assert_eq!(millis_to_nanos(-1), Some(-1_000_000));
        assert_eq!(millis_to_nanos(i64::MAX / 1_000), None);
        assert_eq!(
            millis_to_nanos(9_223_372_036_854),
            Some(9_223_372_036_854_000_000)
        );
    }

    #[test]
    fn nanos_to_millis_rounds_down() {
        assert_eq!(nanos_to_millis(1_999_999), 1);
        assert_eq!(nanos_to_millis(-1), -1);
    }
}
