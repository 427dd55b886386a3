//! Decoders for the telemetry payloads that Ferrite accepts over HTTP and MQTT.
//!
//! - [`line_protocol`] decodes InfluxDB line protocol and encodes it for load
//!   generators and tests.
//! - [`json`] decodes telemetry JSON: flat objects, `{"ts", "values"}`
//!   records and arrays of either.
//! - [`senml`] decodes SenML packs (RFC 8428) in their JSON and CBOR
//!   representations.
//! - [`cayenne_lpp`] decodes Cayenne Low Power Payload, the binary format
//!   of many LoRaWAN devices.
//!
//! Each turns a payload into typed [`ferrite_core::Value`]s, with nanosecond
//! timestamps where the format carries time, or into an error that names
//! the offending line, record, key, field or byte offset and explains how
//! to fix it. The rules each decoder applies (escaping, value types,
//! timestamps, limits) are part of Ferrite's user-facing behaviour and are
//! written down in the module docs.
//!
//! The crate is pure: no I/O, no async, no logging, no global state, so the
//! server, tools, tests and fuzzers all share it. It leaves these to the
//! caller:
//! - the receive time for values that carry no timestamp, and the "now"
//!   that SenML relative times count from,
//! - rejecting timestamps too far in the future,
//! - request body size limits and decompression,
//! - UTF-8 validation of line protocol bodies, because
//!   [`line_protocol::parse_batch`] takes a `&str`,
//! - authentication and mapping of payloads to tenants and devices.

pub mod cayenne_lpp;
pub mod json;
pub mod line_protocol;
pub mod senml;

/// Maximum length in bytes of a measurement name, tag key, field key,
/// telemetry JSON key (a flattened key, for nested JSON objects), or SenML
/// name, base name or unit.
pub const MAX_KEY_BYTES: usize = 256;

/// Maximum length in bytes of a string value, after unescaping.
pub const MAX_STRING_VALUE_BYTES: usize = 65_536;

/// Shortens `text` for an error message, so that a 70 KB token does not
/// end up in a response body or a log line.
pub(crate) fn preview(text: &str) -> String {
    const MAX_PREVIEW_BYTES: usize = 64;

    if text.len() <= MAX_PREVIEW_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_PREVIEW_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// Returns a key that appears more than once in `pairs`, or `None`.
pub(crate) fn first_duplicate_key<T>(pairs: &[(String, T)]) -> Option<&str> {
    // Lines and records usually have a handful of keys, where comparing
    // every pair is cheaper than sorting.
    const MAX_KEYS_FOR_PAIRWISE: usize = 16;

    if pairs.len() <= MAX_KEYS_FOR_PAIRWISE {
        for (index, (key, _)) in pairs.iter().enumerate() {
            if pairs[..index].iter().any(|(earlier, _)| earlier == key) {
                return Some(key);
            }
        }
        return None;
    }

    let mut keys: Vec<&str> = pairs.iter().map(|(key, _)| key.as_str()).collect();
    keys.sort_unstable();
    keys.windows(2)
        .find(|window| window[0] == window[1])
        .map(|window| window[0])
}
