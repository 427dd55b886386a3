//! CSV encoding of an export, following RFC 4180.
//!
//! - UTF-8 without a byte order mark, a header line, records ended by CRLF.
//! - A field is enclosed in double quotes when it is empty or contains a
//!   comma, a double quote, CR or LF; a double quote inside it is doubled.
//! - A null value is an empty unquoted field and an empty string is `""`.
//!   Many readers, DuckDB and pandas among them, read both as null by default.
//! - `time` is RFC 3339 in UTC with nine fraction digits.
//! - `value_float` always has a decimal point or an exponent, so that a
//!   reader that guesses column types does not take whole floats for
//!   integers. It is the shortest text that parses back to the same double.

use std::io::{self, Write};

use ferrite_core::{TimestampNs, Value};

use super::{ExportError, RowWriter, SeriesColumns};

pub const HEADER: &str =
    "device_id,device,key,time,value_float,value_int,value_bool,value_string\r\n";

/// Buffered bytes after which the buffer goes to the output.
const FLUSH_BYTES: usize = 64 * 1024;

const NANOS_PER_SECOND: i64 = 1_000_000_000;
const SECONDS_PER_DAY: i64 = 86_400;

pub struct CsvWriter<W: Write> {
    output: W,
    buffer: Vec<u8>,
    /// The day number (days since 1970-01-01) and its `YYYY-MM-DD` text, so
    /// consecutive points of one day format the date once.
    day: Option<(i64, [u8; 10])>,
}

impl<W: Write> CsvWriter<W> {
    /// Creates the writer and writes the header line.
    pub fn new(output: W) -> io::Result<Self> {
        let mut buffer = Vec::with_capacity(FLUSH_BYTES + 4096);
        buffer.extend_from_slice(HEADER.as_bytes());
        Ok(Self {
            output,
            buffer,
            day: None,
        })
    }

    /// Writes the buffered lines and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.output.write_all(&self.buffer)?;
        self.buffer.clear();
        self.output.flush()?;
        Ok(self.output)
    }

    fn push_time(&mut self, ts: TimestampNs) {
        let seconds = ts.div_euclid(NANOS_PER_SECOND);
        let nanos = ts.rem_euclid(NANOS_PER_SECOND);
        let day = seconds.div_euclid(SECONDS_PER_DAY);
        let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);

        let date = match self.day {
            Some((cached, text)) if cached == day => text,
            _ => {
                let text = format_date(day);
                self.day = Some((day, text));
                text
            }
        };
        self.buffer.extend_from_slice(&date);
        self.buffer.push(b'T');
        push_digits(&mut self.buffer, second_of_day / 3600, 2);
        self.buffer.push(b':');
        push_digits(&mut self.buffer, second_of_day / 60 % 60, 2);
        self.buffer.push(b':');
        push_digits(&mut self.buffer, second_of_day % 60, 2);
        self.buffer.push(b'.');
        push_digits(&mut self.buffer, nanos, 9);
        self.buffer.push(b'Z');
    }
}

impl<W: Write> RowWriter for CsvWriter<W> {
    fn write_points(
        &mut self,
        series: &SeriesColumns<'_>,
        points: &[(TimestampNs, Value)],
    ) -> Result<(), ExportError> {
        let mut prefix = Vec::new();
        for field in [series.device_id, series.device, series.key] {
            push_field(&mut prefix, field);
            prefix.push(b',');
        }

        for (ts, value) in points {
            self.buffer.extend_from_slice(&prefix);
            self.push_time(*ts);
            match value {
                Value::Float(v) => {
                    self.buffer.push(b',');
                    push_float(&mut self.buffer, *v);
                    self.buffer.extend_from_slice(b",,,");
                }
                Value::Int(v) => {
                    self.buffer.extend_from_slice(b",,");
                    write!(self.buffer, "{v}").expect("writing to a Vec cannot fail");
                    self.buffer.extend_from_slice(b",,");
                }
                Value::Bool(v) => {
                    self.buffer.extend_from_slice(b",,,");
                    self.buffer
                        .extend_from_slice(if *v { b"true" } else { b"false" });
                    self.buffer.push(b',');
                }
                Value::Str(v) => {
                    self.buffer.extend_from_slice(b",,,,");
                    push_field(&mut self.buffer, v);
                }
            }
            self.buffer.extend_from_slice(b"\r\n");

            if self.buffer.len() >= FLUSH_BYTES {
                self.output.write_all(&self.buffer)?;
                self.buffer.clear();
            }
        }
        Ok(())
    }
}

/// Appends a text field, quoted when RFC 4180 requires it and when empty.
fn push_field(buffer: &mut Vec<u8>, text: &str) {
    let needs_quotes = text.is_empty()
        || text
            .bytes()
            .any(|byte| matches!(byte, b',' | b'"' | b'\r' | b'\n'));
    if !needs_quotes {
        buffer.extend_from_slice(text.as_bytes());
        return;
    }
    buffer.push(b'"');
    for (index, part) in text.split('"').enumerate() {
        if index > 0 {
            buffer.extend_from_slice(b"\"\"");
        }
        buffer.extend_from_slice(part.as_bytes());
    }
    buffer.push(b'"');
}

/// Appends a finite float as the shortest text that parses back to it:
/// plain decimal from 1e-5 to 1e16 (and zero), scientific notation outside.
fn push_float(buffer: &mut Vec<u8>, value: f64) {
    let start = buffer.len();
    let magnitude = value.abs();
    if magnitude == 0.0 || (1e-5..1e16).contains(&magnitude) {
        write!(buffer, "{value}").expect("writing to a Vec cannot fail");
    } else {
        write!(buffer, "{value:e}").expect("writing to a Vec cannot fail");
    }
    if !buffer[start..]
        .iter()
        .any(|byte| matches!(byte, b'.' | b'e' | b'E'))
    {
        buffer.extend_from_slice(b".0");
    }
}

/// Appends `value` as exactly `width` decimal digits with leading zeros.
fn push_digits(buffer: &mut Vec<u8>, value: i64, width: usize) {
    let start = buffer.len();
    buffer.resize(start + width, b'0');
    let mut rest = value;
    for slot in buffer[start..].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
}

/// Formats a day number (days since 1970-01-01) as `YYYY-MM-DD`. Every
/// storable timestamp falls in the years 1677 to 2262, so the year has four
/// digits.
fn format_date(day: i64) -> [u8; 10] {
    let date = chrono::DateTime::from_timestamp(day * SECONDS_PER_DAY, 0)
        .expect("a day of a storable timestamp is a valid date")
        .date_naive();
    let mut text = [0u8; 10];
    text.copy_from_slice(date.format("%Y-%m-%d").to_string().as_bytes());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv_of(points: &[(TimestampNs, Value)], series: SeriesColumns<'_>) -> String {
        let mut writer = CsvWriter::new(Vec::new()).unwrap();
        writer.write_points(&series, points).unwrap();
        String::from_utf8(writer.finish().unwrap()).unwrap()
    }

    fn series<'a>(device: &'a str, key: &'a str) -> SeriesColumns<'a> {
        SeriesColumns {
            device_id: "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f",
            device,
            key,
        }
    }

    #[test]
    fn rows_have_one_value_column_each() {
        let points = [
            (1_714_953_600_000_000_000, Value::Float(21.5)),
            (1_714_953_600_000_000_001, Value::Int(-7)),
            (1_714_953_600_123_456_789, Value::Bool(true)),
            (1_714_953_601_000_000_000, Value::Str("eco".into())),
        ];
        let text = csv_of(&points, series("boiler-1", "mode"));
        let expected = [
            HEADER,
            "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f,boiler-1,mode,2024-05-06T00:00:00.000000000Z,21.5,,,\r\n",
            "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f,boiler-1,mode,2024-05-06T00:00:00.000000001Z,,-7,,\r\n",
            "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f,boiler-1,mode,2024-05-06T00:00:00.123456789Z,,,true,\r\n",
            "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f,boiler-1,mode,2024-05-06T00:00:01.000000000Z,,,,eco\r\n",
        ]
        .concat();
        assert_eq!(text, expected);
    }

    #[test]
    fn fields_are_quoted_per_rfc_4180() {
        let cases = [
            ("plain", "plain"),
            ("", "\"\""),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("\"", "\"\"\"\""),
            ("line\nbreak", "\"line\nbreak\""),
            ("carriage\rreturn", "\"carriage\rreturn\""),
            ("ünïcode ✓", "ünïcode ✓"),
        ];
        for (text, expected) in cases {
            let mut buffer = Vec::new();
            push_field(&mut buffer, text);
            assert_eq!(String::from_utf8(buffer).unwrap(), expected, "{text:?}");
        }
    }

    #[test]
    fn series_columns_are_quoted() {
        let text = csv_of(
            &[(0, Value::Str("x".into()))],
            series("hall, \"north\"", "a\r\nb"),
        );
        let line = text.strip_prefix(HEADER).unwrap();
        assert_eq!(
            line,
            "0190f4b2-7c1e-7d1a-9a4e-3f2b1c0d9e8f,\"hall, \"\"north\"\"\",\"a\r\nb\",1970-01-01T00:00:00.000000000Z,,,,x\r\n"
        );
    }

    #[test]
    fn floats_round_trip_and_look_like_floats() {
        let cases = [
            (1.0, "1.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (21.5, "21.5"),
            (1e16, "1e16"),
            (1.5e300, "1.5e300"),
            (1e-7, "1e-7"),
            (123456789012345.6, "123456789012345.6"),
            (f64::MAX, "1.7976931348623157e308"),
            (f64::MIN_POSITIVE, "2.2250738585072014e-308"),
        ];
        for (value, expected) in cases {
            let mut buffer = Vec::new();
            push_float(&mut buffer, value);
            let text = String::from_utf8(buffer).unwrap();
            assert_eq!(text, expected, "{value}");
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), value.to_bits());
        }
    }

    #[test]
    fn times_before_1970_and_at_the_limits() {
        let cases = [
            (-1, "1969-12-31T23:59:59.999999999Z"),
            (
                ferrite_core::MIN_TIMESTAMP_NS,
                "1677-09-21T00:12:43.145224194Z",
            ),
            (
                ferrite_core::MAX_TIMESTAMP_NS,
                "2262-04-11T23:47:16.854775806Z",
            ),
            (951_782_400_000_000_000, "2000-02-29T00:00:00.000000000Z"),
        ];
        for (ts, expected) in cases {
            let mut writer = CsvWriter::new(Vec::new()).unwrap();
            writer.buffer.clear();
            writer.push_time(ts);
            assert_eq!(String::from_utf8(writer.buffer).unwrap(), expected, "{ts}");
        }
    }
}
