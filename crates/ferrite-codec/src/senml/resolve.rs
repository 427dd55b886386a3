//! Resolution of records against the base fields before them (RFC 8428
//! section 4.6): names, units, times, values and sums.

use ferrite_core::{TimestampNs, Value, is_storable_timestamp};

use super::fields::{Format, Label, Number, RawRecord};
use super::{MAX_KEY_BYTES, Record, SENML_VERSION, SUM_NAME_SUFFIX, SenmlError};
use crate::preview;

const NANOS_PER_SECOND: i128 = 1_000_000_000;

/// Resolved times below 2**28 s (1978-07-04T21:24:16Z) are relative to now.
const RELATIVE_TIME_LIMIT_NS: i128 = (1 << 28) * NANOS_PER_SECOND;

const STORABLE_RANGE: &str = "1677-09-21..2262-04-11";

/// Applies the base fields of a pack to its records, one record at a time
/// and in pack order.
pub(super) struct Resolver {
    format: Format,
    now_ns: i64,
    /// Version of the pack: the first record's `bver`, or 10.
    version: u64,
    base_name: String,
    /// Index of the record that set `base_name`, for messages.
    base_name_index: usize,
    base_time_ns: Option<i128>,
    base_unit: Option<String>,
    base_value: Option<f64>,
    base_sum: Option<f64>,
    records: Vec<Record>,
}

impl Resolver {
    pub(super) fn new(format: Format, now_ns: i64) -> Self {
        Resolver {
            format,
            now_ns,
            version: SENML_VERSION,
            base_name: String::new(),
            base_name_index: 0,
            base_time_ns: None,
            base_unit: None,
            base_value: None,
            base_sum: None,
            records: Vec::new(),
        }
    }

    /// Resolves the record at `index` and appends the values it carries.
    pub(super) fn push(&mut self, index: usize, raw: RawRecord) -> Result<(), SenmlError> {
        self.check_version(index, raw.base_version)?;
        self.update_base_fields(index, &raw)?;

        let value = self.resolve_value(index, &raw)?;
        let sum = self.resolve_sum(index, &raw)?;
        if value.is_none() && sum.is_none() {
            // A record with only base fields sets them for the records after
            // it, as in the actuator example of RFC 8428 section 5.1.7.
            if raw.has_regular_field() {
                return Err(SenmlError::in_record(
                    index,
                    "has no value: add exactly one of \"v\", \"vs\", \"vb\" or \"vd\", or a \
                     sum \"s\""
                        .to_owned(),
                ));
            }
            return Ok(());
        }

        let name = raw.name.unwrap_or_default();
        self.check_name(index, &name, "")?;
        let unit = raw.unit.or_else(|| self.base_unit.clone());
        let ts_ns = self.resolve_time(index, raw.time)?;

        if let Some(value) = value {
            self.records.push(Record {
                base_name: self.base_name.clone(),
                name: name.clone(),
                unit: unit.clone(),
                value,
                ts_ns,
                update_time_s: raw.update_time,
            });
        }
        if let Some(sum) = sum {
            self.check_name(index, &name, SUM_NAME_SUFFIX)?;
            self.records.push(Record {
                base_name: self.base_name.clone(),
                name: format!("{name}{SUM_NAME_SUFFIX}"),
                unit,
                value: Value::Float(sum),
                ts_ns,
                update_time_s: raw.update_time,
            });
        }
        Ok(())
    }

    /// Returns the resolved records, or an error when the pack had none.
    pub(super) fn finish(self) -> Result<Vec<Record>, SenmlError> {
        if self.records.is_empty() {
            return Err(SenmlError::general(
                "no values: no record in the pack has a value or a sum".to_owned(),
            ));
        }
        Ok(self.records)
    }

    fn check_version(&mut self, index: usize, version: Option<u64>) -> Result<(), SenmlError> {
        let Some(version) = version else {
            return Ok(());
        };

        if version > SENML_VERSION {
            return Err(self.field_error(
                index,
                Label::BaseVersion,
                format!(
                    "version {version} is newer than SenML version {SENML_VERSION} of RFC \
                     8428, the newest that Ferrite reads; send the pack as version \
                     {SENML_VERSION}"
                ),
            ));
        }
        if index == 0 {
            self.version = version;
        } else if version != self.version {
            return Err(self.field_error(
                index,
                Label::BaseVersion,
                format!(
                    "version {version} differs from version {} of the records before it; all \
                     records of a pack must have the same version, so set \"bver\" in the \
                     first record only",
                    self.version
                ),
            ));
        }
        Ok(())
    }

    fn update_base_fields(&mut self, index: usize, raw: &RawRecord) -> Result<(), SenmlError> {
        if let Some(base_name) = &raw.base_name {
            self.base_name.clone_from(base_name);
            self.base_name_index = index;
        }
        if let Some(base_time) = raw.base_time {
            let base_time_ns = seconds_to_nanos(base_time).ok_or_else(|| {
                self.field_error(index, Label::BaseTime, time_out_of_range(base_time))
            })?;
            self.base_time_ns = Some(base_time_ns);
        }
        if let Some(base_unit) = &raw.base_unit {
            self.base_unit = Some(base_unit.clone());
        }
        if let Some(base_value) = raw.base_value {
            self.base_value = Some(base_value.to_f64());
        }
        if let Some(base_sum) = raw.base_sum {
            self.base_sum = Some(base_sum.to_f64());
        }
        Ok(())
    }

    /// Returns the value of the record's one value field, or `None` when it
    /// has none.
    fn resolve_value(&self, index: usize, raw: &RawRecord) -> Result<Option<Value>, SenmlError> {
        let present: Vec<Label> = [
            (Label::Value, raw.value.is_some()),
            (Label::StringValue, raw.string_value.is_some()),
            (Label::BooleanValue, raw.boolean_value.is_some()),
            (Label::DataValue, raw.data_value.is_some()),
        ]
        .into_iter()
        .filter_map(|(label, is_present)| is_present.then_some(label))
        .collect();
        if let [first, second, ..] = present[..] {
            return Err(SenmlError::in_record(
                index,
                format!(
                    "has two value fields, {} and {}; a record carries exactly one of \"v\", \
                     \"vs\", \"vb\" and \"vd\", so send each value in its own record",
                    first.describe(self.format),
                    second.describe(self.format)
                ),
            ));
        }

        if let Some(value) = raw.value {
            let resolved = add_base(self.base_value, value.to_f64());
            if !resolved.is_finite() {
                return Err(self.field_error(
                    index,
                    Label::Value,
                    format!(
                        "the base value plus the value ({} + {value}) is outside the range \
                         of a 64-bit float",
                        self.base_value.unwrap_or(0.0)
                    ),
                ));
            }
            return Ok(Some(Value::Float(resolved)));
        }
        let value = if let Some(text) = &raw.string_value {
            Some(Value::Str(text.clone()))
        } else if let Some(boolean) = raw.boolean_value {
            Some(Value::Bool(boolean))
        } else {
            raw.data_value.clone().map(Value::Str)
        };
        Ok(value)
    }

    /// Returns the sum, which exists when the record has `s` or a base sum
    /// is in effect (RFC 8428 section 4.5.4).
    fn resolve_sum(&self, index: usize, raw: &RawRecord) -> Result<Option<f64>, SenmlError> {
        let sum = match (self.base_sum, raw.sum) {
            (None, None) => return Ok(None),
            (base_sum, Some(sum)) => add_base(base_sum, sum.to_f64()),
            (Some(base_sum), None) => base_sum,
        };
        if !sum.is_finite() {
            return Err(self.field_error(
                index,
                Label::Sum,
                "the base sum plus the sum is outside the range of a 64-bit float".to_owned(),
            ));
        }
        Ok(Some(sum))
    }

    /// Checks the concatenated name `base name + name + suffix` against the
    /// rules of RFC 8428 section 4.5.1 and the key length limit.
    fn check_name(&self, index: usize, name: &str, suffix: &str) -> Result<(), SenmlError> {
        let full_name = format!("{}{name}{suffix}", self.base_name);
        let composition = if self.base_name.is_empty() {
            String::new()
        } else {
            format!(
                " (base name \"{}\" from the record at index {} + name \"{}\")",
                preview(&self.base_name),
                self.base_name_index,
                preview(name)
            )
        };
        let blamed_label = if name.is_empty() {
            Label::BaseName
        } else {
            Label::Name
        };

        if full_name.is_empty() {
            return Err(SenmlError::in_record(
                index,
                "has no name: set \"n\", or a base name \"bn\" in this or an earlier record"
                    .to_owned(),
            ));
        }
        if full_name.len() > MAX_KEY_BYTES {
            let suffix_note = if suffix.is_empty() {
                String::new()
            } else {
                format!(", counting the suffix \"{suffix}\" of sums")
            };
            return Err(self.field_error(
                index,
                blamed_label,
                format!(
                    "the name \"{}\"{composition} is {} bytes, over the limit of \
                     {MAX_KEY_BYTES} bytes{suffix_note}",
                    preview(&full_name),
                    full_name.len()
                ),
            ));
        }

        let Some(position) = full_name
            .bytes()
            .enumerate()
            .position(|(position, byte)| !is_name_byte(byte, position == 0))
        else {
            return Ok(());
        };
        let character = full_name[position..].chars().next().unwrap_or_default();
        let label = if position < self.base_name.len() {
            Label::BaseName
        } else {
            Label::Name
        };
        let rule = if position == 0 {
            "must start with a letter or digit".to_owned()
        } else {
            format!(
                "contains {character:?} at byte {position}; after the first character a \
                 name may contain only letters, digits and - : . / _"
            )
        };
        Err(self.field_error(
            index,
            label,
            format!(
                "the name \"{}\"{composition} {rule} (RFC 8428 section 4.5.1)",
                preview(&full_name)
            ),
        ))
    }

    /// Returns the time of a record: `bt + t` in nanoseconds, with times
    /// below 2**28 s taken relative to `now_ns`, or `None` when neither
    /// `bt` nor `t` applies.
    fn resolve_time(
        &self,
        index: usize,
        time: Option<Number>,
    ) -> Result<Option<TimestampNs>, SenmlError> {
        let time_ns = match time {
            Some(time) => Some(
                seconds_to_nanos(time)
                    .ok_or_else(|| self.field_error(index, Label::Time, time_out_of_range(time)))?,
            ),
            None => None,
        };
        if time_ns.is_none() && self.base_time_ns.is_none() {
            return Ok(None);
        }

        // Both terms fit i64, so the sum cannot overflow i128.
        let total_ns = self.base_time_ns.unwrap_or(0) + time_ns.unwrap_or(0);
        let is_relative = total_ns < RELATIVE_TIME_LIMIT_NS;
        let ts_ns = if is_relative {
            i128::from(self.now_ns) + total_ns
        } else {
            total_ns
        };
        if let Ok(ts_ns) = i64::try_from(ts_ns)
            && is_storable_timestamp(ts_ns)
        {
            return Ok(Some(ts_ns));
        }

        let label = if time.is_some() {
            Label::Time
        } else {
            Label::BaseTime
        };
        let total_s = total_ns as f64 / NANOS_PER_SECOND as f64;
        let detail = if is_relative {
            format!(
                "the resolved time bt + t = {total_s} s is relative to now (below 2**28 s), \
                 and now plus {total_s} s is outside the storable range {STORABLE_RANGE}"
            )
        } else {
            format!(
                "the resolved time bt + t = {total_s} s since the epoch is outside the \
                 storable range {STORABLE_RANGE}"
            )
        };
        Err(self.field_error(index, label, detail))
    }

    fn field_error(&self, index: usize, label: Label, detail: String) -> SenmlError {
        SenmlError::in_field(
            index,
            label.json_label(),
            &label.describe(self.format),
            detail,
        )
    }
}

/// Adds a base value, keeping the sign of `-0.0` when there is no base.
fn add_base(base: Option<f64>, value: f64) -> f64 {
    match base {
        Some(base) => base + value,
        None => value,
    }
}

fn is_name_byte(byte: u8, is_first: bool) -> bool {
    byte.is_ascii_alphanumeric() || (!is_first && matches!(byte, b'-' | b':' | b'.' | b'/' | b'_'))
}

fn time_out_of_range(seconds: Number) -> String {
    format!(
        "{seconds} s is too far from the epoch: a time must convert to a nanosecond timestamp \
         in the storable range {STORABLE_RANGE}"
    )
}

/// Converts seconds to nanoseconds, or `None` when the result does not fit
/// `i64`.
///
/// A float goes through its shortest decimal representation, the digits
/// that JSON would print for it, so `1.276020076001e+09` gives exactly
/// 1_276_020_076_001_000_000 ns. Multiplying by 1e9 in `f64` would give the
/// nearest multiple of 256 ns instead. Digits below a nanosecond are
/// rounded half away from zero. No crate offers this conversion, hence the
/// hand-written digit arithmetic.
pub(super) fn seconds_to_nanos(seconds: Number) -> Option<i128> {
    let nanos = match seconds {
        Number::Integer(integer) => integer.checked_mul(NANOS_PER_SECOND)?,
        Number::Float(float) => float_seconds_to_nanos(float)?,
    };
    let fits_i64 = (i128::from(i64::MIN)..=i128::from(i64::MAX)).contains(&nanos);
    fits_i64.then_some(nanos)
}

fn float_seconds_to_nanos(seconds: f64) -> Option<i128> {
    if !seconds.is_finite() {
        return None;
    }

    // `{:e}` prints the shortest digits that round-trip, as in "-1.5e-3".
    let text = format!("{:e}", seconds.abs());
    let (mantissa, exponent) = text.split_once('e')?;
    let exponent: i32 = exponent.parse().ok()?;
    let (integer_digits, fraction_digits) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    // At most 17 significant digits, so the mantissa fits i128.
    let digits: i128 = format!("{integer_digits}{fraction_digits}").parse().ok()?;
    let fraction_len = i32::try_from(fraction_digits.len()).ok()?;
    let scale = exponent - fraction_len + 9;

    let magnitude = if digits == 0 {
        0
    } else if scale >= 0 {
        // 10**19 ns is already beyond i64, so larger scales overflow.
        if scale > 19 {
            return None;
        }
        digits.checked_mul(10_i128.pow(scale.unsigned_abs()))?
    } else if scale < -18 {
        // The mantissa is below 10**17, so it rounds to zero.
        0
    } else {
        let divisor = 10_i128.pow(scale.unsigned_abs());
        let quotient = digits / divisor;
        let remainder = digits % divisor;
        if remainder * 2 >= divisor {
            quotient + 1
        } else {
            quotient
        }
    };

    Some(if seconds.is_sign_negative() {
        -magnitude
    } else {
        magnitude
    })
}
