//! InfluxDB line protocol, following the InfluxDB v2 line protocol reference.
//!
//! ```text
//! measurement[,tag_key=tag_value...] field_key=field_value[,field_key=field_value...] [timestamp]
//! room,site=lab-1,dev=t-17 temp=21.5,on=true,count=3i 1700000000000000000
//! ```
//!
//! # Lines and batches
//!
//! A body is split at `\n`, and a `\r` before the `\n` is dropped, so CRLF
//! bodies parse like LF bodies. Spaces and tabs at the start and end of a
//! line are ignored. Blank lines and lines whose first other character is
//! `#` are comments and produce nothing. Sections (measurement and tags,
//! fields, timestamp) are separated by one or more spaces. A raw newline
//! always ends a line, even inside a quoted string: write `\n` there.
//!
//! A batch is atomic. [`parse_batch`] returns either every line of the body
//! or the errors of every bad line (at most [`MAX_REPORTED_ERRORS`]), so a
//! body with one bad line stores nothing and the client can fix and resend
//! the whole body without creating duplicates.
//!
//! # Escaping
//!
//! | Element                        | Backslash escapes       |
//! |--------------------------------|-------------------------|
//! | measurement                    | `\,` `\ ` `\\`          |
//! | tag key, tag value, field key  | `\,` `\=` `\ ` `\\`     |
//! | string field value (quoted)    | `\"` `\\` `\n`          |
//!
//! - A backslash before any other character is kept literally: `C:\temp`
//!   stays `C:\temp`, and `"to\ee"` is the string `to\ee`.
//! - Two backslashes are one literal backslash, as in the "Escaping
//!   backslashes" table of the InfluxDB 3 line protocol reference. They are
//!   the only way to end a name or value with a backslash:
//!   `path=C:\\,host=a` is the tag `path` = `C:\` followed by the tag
//!   `host`. NOTE: some clients (Telegraf among them) do not escape
//!   backslashes in names and tag values, so a `\\` that they send arrives
//!   here as one backslash.
//! - An unescaped `=` inside a tag value is an error. In
//!   `check=C:\,host=srv-01` the `\,` escapes the comma, so the value runs on
//!   to `host=srv-01` and its `=` is unescaped.
//! - `\n` in a string field value is a newline (U+000A).
//! - An unescaped `"` inside a string field value ends the string, and any
//!   text after it other than `,`, a space or the end of the line is an
//!   error.
//!
//! Consequences: a measurement cannot start with `#` (the line would be a
//! comment), and names and tag values cannot contain a newline.
//!
//! # Field values
//!
//! | Text                                            | Value                           |
//! |-------------------------------------------------|---------------------------------|
//! | `1`, `-1.5`, `1e-3`, `.5`                       | `Float`                         |
//! | `1i`, `-7i`                                     | `Int` (out of `i64` rejected)   |
//! | `1u`                                            | `Int` up to `i64::MAX`, larger values rejected |
//! | `t` `T` `true` `True` `TRUE` `f` `F` `false` `False` `FALSE` | `Bool`             |
//! | `"text"`                                        | `Str`                           |
//!
//! NaN, infinity and floats outside the range of `f64` are rejected. Ferrite
//! has no unsigned type, so an unsigned value above `i64::MAX` is rejected
//! instead of being wrapped or rounded.
//!
//! # Timestamps
//!
//! The timestamp is optional. When present it is a signed integer in the
//! unit of the request's [`Precision`] (nanoseconds by default). It is
//! scaled to nanoseconds with checked arithmetic and must land inside
//! Ferrite's storable range, 1677-09-21T00:12:43.145224194Z to
//! 2262-04-11T23:47:16.854775806Z. A line without a timestamp gets
//! `timestamp_ns: None`, and the caller uses the receive time.
//!
//! # Other rules
//!
//! - Every line needs a measurement and at least one field.
//! - Tag keys, tag values and field keys must not be empty.
//! - A tag key or field key may appear only once per line. A duplicate is
//!   rejected, because keeping either value would lose the other silently.
//! - Limits, in bytes after unescaping: [`MAX_KEY_BYTES`] for measurement,
//!   tag keys and field keys, [`MAX_TAG_VALUE_BYTES`] for tag values and
//!   [`MAX_STRING_FIELD_BYTES`] for string field values.
//! - Tags and fields are returned in input order, not sorted.

mod encoder;
mod parser;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use ferrite_core::{TimestampNs, Value};

pub use crate::MAX_KEY_BYTES;
pub use encoder::{encode_line, write_line};

/// Maximum length in bytes of a tag value, after unescaping.
pub const MAX_TAG_VALUE_BYTES: usize = 1024;

/// Maximum length in bytes of a string field value, after unescaping.
pub const MAX_STRING_FIELD_BYTES: usize = crate::MAX_STRING_VALUE_BYTES;

/// Maximum number of errors that [`parse_batch`] returns for one body.
pub const MAX_REPORTED_ERRORS: usize = 100;

/// Unit of the timestamps in a line protocol body, set by the request (the
/// `precision` query parameter of the InfluxDB write APIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    #[default]
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    /// Number of nanoseconds in one unit of this precision.
    pub fn nanos_per_unit(self) -> i64 {
        match self {
            Precision::Ns => 1,
            Precision::Us => 1_000,
            Precision::Ms => 1_000_000,
            Precision::S => 1_000_000_000,
        }
    }

    /// Converts a timestamp in this precision to nanoseconds, or `None` when
    /// the result overflows `i64`. The result is not checked against the
    /// storable range.
    pub fn scale(self, ts: i64) -> Option<i64> {
        ts.checked_mul(self.nanos_per_unit())
    }

    /// Name of the precision as the InfluxDB v2 API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Ns => "ns",
            Precision::Us => "us",
            Precision::Ms => "ms",
            Precision::S => "s",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a precision name that [`Precision::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid precision \"{0}\": expected one of ns, us, ms, s (or n, u, µs)")]
pub struct InvalidPrecision(pub String);

impl FromStr for Precision {
    type Err = InvalidPrecision;

    /// Accepts the InfluxDB v2 names (`ns`, `us`, `ms`, `s`) and the v1
    /// names (`n`, `u`, `µs`). Minutes and hours (v1 `m` and `h`) are not
    /// supported.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "ns" | "n" => Ok(Precision::Ns),
            // Both the micro sign U+00B5 and the Greek small letter mu U+03BC.
            "us" | "u" | "\u{b5}s" | "\u{3bc}s" => Ok(Precision::Us),
            "ms" => Ok(Precision::Ms),
            "s" => Ok(Precision::S),
            _ => Err(InvalidPrecision(crate::preview(name))),
        }
    }
}

/// One parsed line: a point with its tags and fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Line<'a> {
    /// Position of the line in the body, starting at 1.
    pub line_number: usize,
    /// The line as it appeared in the body, without the line ending.
    pub raw: &'a str,
    /// Measurement name, unescaped.
    pub measurement: String,
    /// Tag keys and values, unescaped, in input order.
    pub tags: Vec<(String, String)>,
    /// Field keys (unescaped) and values, in input order.
    pub fields: Vec<(String, Value)>,
    /// Timestamp scaled to nanoseconds, or `None` when the line has none.
    pub timestamp_ns: Option<TimestampNs>,
}

/// A line that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line_number}: {message}")]
pub struct LineError {
    /// Position of the line in the body, starting at 1.
    pub line_number: usize,
    /// Description of the problem, with the offending token and the fix.
    pub message: String,
}

/// Parses one line of line protocol. `text` may end with `\r` but must not
/// contain `\n`.
///
/// Returns `Ok(None)` for a blank line or a `#` comment.
pub fn parse_line(
    text: &str,
    line_number: usize,
    precision: Precision,
) -> Result<Option<Line<'_>>, LineError> {
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.contains('\n') {
        return Err(LineError {
            line_number,
            message: "the text contains a newline, which ends a line; parse a \
                      multi-line body with parse_batch"
                .to_owned(),
        });
    }
    parser::parse(text, line_number, precision)
}

/// Parses a whole body. The batch is atomic: it returns every line, or the
/// errors of the bad lines (the first [`MAX_REPORTED_ERRORS`] of them)
/// when any line is bad.
///
/// An empty body, or one with only blank lines and comments, returns an
/// empty list. The caller decides whether that is an error.
pub fn parse_batch(body: &str, precision: Precision) -> Result<Vec<Line<'_>>, Vec<LineError>> {
    // One pass to size the output saves the repeated reallocations of a
    // 5,000-line batch.
    let line_count = body.bytes().filter(|&byte| byte == b'\n').count() + 1;
    let mut lines = Vec::with_capacity(line_count);
    let mut errors = Vec::new();

    for (index, text) in body.split('\n').enumerate() {
        let text = text.strip_suffix('\r').unwrap_or(text);
        match parser::parse(text, index + 1, precision) {
            Ok(Some(line)) => {
                if errors.is_empty() {
                    lines.push(line);
                }
            }
            Ok(None) => {}
            Err(error) => {
                // The lines parsed so far will not be returned, so free them.
                lines.clear();
                errors.push(error);
                if errors.len() == MAX_REPORTED_ERRORS {
                    break;
                }
            }
        }
    }

    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}
