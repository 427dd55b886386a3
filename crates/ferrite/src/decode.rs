//! Turns an envelope's payload into points, with the checks every adapter
//! runs before it acknowledges.
//!
//! Adapters call [`check_payload`] before they append an envelope, so a bad
//! payload gets an error and never reaches the log. The pipeline
//! calls [`decode_envelope`] on the same bytes later. Decoding is
//! deterministic: a record without a timestamp gets the envelope's receive
//! time, so a replay of the log stores exactly the same points.

use std::collections::HashMap;
use std::time::Duration;

use ferrite_codec::{cayenne_lpp, json, line_protocol, senml};
use ferrite_core::{TimestampNs, Value};

use crate::ingest::{ContentType, Envelope};
use crate::profiles::{CodecSpec, Field, Record};

/// Reason a payload was rejected. `Display` is the message for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DecodeError {
    #[error("{0}")]
    Json(String),
    #[error("{0}")]
    LineProtocol(String),
    #[error("the payload is not valid UTF-8 text")]
    NotUtf8,
    #[error("{0}")]
    Timestamp(String),
    #[error("{0}")]
    Senml(String),
    #[error("{0}")]
    CayenneLpp(String),
    #[error("{0}")]
    Script(String),
    /// Raw bytes arrived for a device whose profile codec does not take them.
    #[error("{0}")]
    Codec(String),
}

impl DecodeError {
    /// Short, bounded label for the `reason` metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Json(_) => "invalid_json",
            DecodeError::LineProtocol(_) => "invalid_line_protocol",
            DecodeError::NotUtf8 => "invalid_encoding",
            DecodeError::Timestamp(_) => "invalid_timestamp",
            DecodeError::Senml(_) => "invalid_senml",
            DecodeError::CayenneLpp(_) => "invalid_cayenne_lpp",
            DecodeError::Script(_) => "script_failed",
            DecodeError::Codec(_) => "wrong_codec",
        }
    }
}

/// The timestamps a tenant may write, relative to the receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// How far ahead of the server clock a timestamp may be.
    pub max_future: Duration,
    /// Raw retention: older timestamps would expire at once. `None` keeps
    /// data forever.
    pub retention: Option<Duration>,
    /// `ingest.max_past`: how far behind the server clock a timestamp may
    /// be.
    pub max_past: Option<Duration>,
}

impl TimeWindow {
    pub fn new(config: &crate::config::Config, tenant: &str) -> TimeWindow {
        TimeWindow {
            max_future: config.ingest.max_future,
            retention: config.storage.retention_for(tenant),
            max_past: config.ingest.max_past,
        }
    }

    /// Checks one timestamp; `what` names the value in the message.
    pub fn check(
        &self,
        what: &str,
        ts: TimestampNs,
        received_at_ns: TimestampNs,
    ) -> Result<(), String> {
        if ts > latest_allowed_ts(received_at_ns, self.max_future) {
            return Err(format!(
                "the timestamp of {what} ({}) is more than {} ahead of the server clock; check the device clock and the timestamp unit",
                format_ts(ts),
                format_duration(self.max_future)
            ));
        }
        if let Some(max_past) = self.max_past {
            let keep = i64::try_from(max_past.as_nanos()).unwrap_or(i64::MAX);
            let earliest = received_at_ns.saturating_sub(keep);
            if ts < earliest {
                return Err(format!(
                    "the timestamp of {what} ({}) is more than {} behind the server clock (ingest.max_past); check the device clock and the timestamp unit",
                    format_ts(ts),
                    format_duration(max_past)
                ));
            }
        }
        if let Some(retention) = self.retention {
            let keep = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
            let earliest = received_at_ns.saturating_sub(keep);
            if ts < earliest {
                return Err(format!(
                    "the timestamp of {what} ({}) is older than the retention of {}: points before {} are not kept; check the timestamp unit or raise storage.retention",
                    format_ts(ts),
                    format_duration(retention),
                    format_ts(earliest)
                ));
            }
        }
        Ok(())
    }
}

/// Validates a payload as the pipeline will decode it, plus the checks that
/// depend on the receive time. Returns the number of points.
pub fn check_payload(
    content_type: ContentType,
    payload: &[u8],
    received_at_ns: TimestampNs,
    window: TimeWindow,
) -> Result<usize, DecodeError> {
    let mut count = 0;
    for_each_point(content_type, payload, received_at_ns, |key, ts, _, _| {
        window
            .check(&format!("{key:?}"), ts, received_at_ns)
            .map_err(DecodeError::Timestamp)?;
        count += 1;
        Ok(())
    })?;
    Ok(count)
}

/// Runs scripted decoders; each pipeline worker keeps one.
pub trait ScriptRunner {
    /// Runs the profile's `decodeUplink` and returns its `data` as telemetry
    /// JSON.
    fn decode_uplink(
        &mut self,
        codec: &CodecSpec,
        cache_key: (crate::ids::ProfileId, i64),
        envelope: &Envelope,
    ) -> Result<Vec<u8>, DecodeError>;
}

/// Decodes an envelope with the codec of the device's profile into records
/// of points that share a timestamp, in payload order.
pub fn decode_records(
    envelope: &Envelope,
    codec: &CodecSpec,
    cache_key: Option<(crate::ids::ProfileId, i64)>,
    scripts: &mut dyn ScriptRunner,
) -> Result<Vec<Record>, DecodeError> {
    let mut records: Vec<Record> = Vec::new();
    // Record index by timestamp, so a batch of many lines stays linear.
    let mut by_ts: HashMap<TimestampNs, usize> = HashMap::new();
    // Records that got values from more than one line or record of the
    // payload, which may repeat a key.
    let mut merged: Vec<usize> = Vec::new();
    let mut push = |key: &str, ts: TimestampNs, value: &Value, unit: Option<&str>| {
        let field = Field {
            key: key.to_owned(),
            value: value.clone(),
            unit: unit.map(str::to_owned),
        };
        match by_ts.get(&ts) {
            Some(&index) => {
                if merged.last() != Some(&index) {
                    merged.push(index);
                }
                records[index].fields.push(field);
            }
            None => {
                by_ts.insert(ts, records.len());
                records.push(Record {
                    ts,
                    fields: vec![field],
                });
            }
        }
        Ok(())
    };

    let received_at_ns = envelope.received_at_ns;
    match (envelope.content_type, codec) {
        (ContentType::Raw, CodecSpec::CayenneLpp) => {
            let values = cayenne_lpp::decode(&envelope.payload)
                .map_err(|error| DecodeError::CayenneLpp(error.to_string()))?;
            for (key, value) in &values {
                push(key, received_at_ns, value, None)?;
            }
        }
        (ContentType::Raw, CodecSpec::Script { .. }) => {
            let Some(cache_key) = cache_key else {
                return Err(DecodeError::Codec(
                    "a scripted codec needs a stored profile".to_owned(),
                ));
            };
            let json = scripts.decode_uplink(codec, cache_key, envelope)?;
            for_each_point(ContentType::Json, &json, received_at_ns, push).map_err(|error| {
                DecodeError::Script(format!("the decoder's data cannot be stored: {error}"))
            })?;
        }
        (ContentType::Raw, CodecSpec::Senml) => {
            let content_type = senml_content_type(&envelope.payload);
            for_each_point(content_type, &envelope.payload, received_at_ns, push)?;
        }
        (ContentType::Raw, CodecSpec::Json) => {
            for_each_point(ContentType::Json, &envelope.payload, received_at_ns, push)?;
        }
        (content_type, _) => for_each_point(content_type, &envelope.payload, received_at_ns, push)?,
    }
    // A later value of the same key and timestamp in one message wins, as
    // it would in the store.
    merged.sort_unstable();
    merged.dedup();
    for index in merged {
        let fields = &mut records[index].fields;
        let mut seen = std::collections::HashSet::with_capacity(fields.len());
        let mut kept: Vec<Field> = Vec::with_capacity(fields.len());
        for field in fields.drain(..).rev() {
            if seen.insert(field.key.clone()) {
                kept.push(field);
            }
        }
        kept.reverse();
        *fields = kept;
    }
    Ok(records)
}

/// Tells SenML JSON from SenML CBOR by the first byte: JSON starts with `[`
/// after optional white space; a CBOR array starts with a major type 4 byte
/// (0x80 to 0x9f).
pub fn senml_content_type(payload: &[u8]) -> ContentType {
    match payload.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'[') | Some(b'{') => ContentType::SenmlJson,
        _ => ContentType::SenmlCbor,
    }
}

fn for_each_point(
    content_type: ContentType,
    payload: &[u8],
    received_at_ns: TimestampNs,
    mut on_point: impl FnMut(&str, TimestampNs, &Value, Option<&str>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    match content_type {
        ContentType::Json => {
            let records = json::parse_telemetry(payload)
                .map_err(|error| DecodeError::Json(error.to_string()))?;
            for record in &records {
                let ts = record.ts_ns.unwrap_or(received_at_ns);
                for (key, value) in &record.values {
                    on_point(key, ts, value, None)?;
                }
            }
        }
        ContentType::SenmlJson | ContentType::SenmlCbor => {
            let records = if content_type == ContentType::SenmlJson {
                senml::parse_json(payload, received_at_ns)
            } else {
                senml::parse_cbor(payload, received_at_ns)
            }
            .map_err(|error| DecodeError::Senml(error.to_string()))?;
            for record in &records {
                let ts = record.ts_ns.unwrap_or(received_at_ns);
                // The key is the record's own name; the base name usually
                // names the device, which Ferrite knows from the
                // credentials. A record without a name uses the base name.
                let key = if record.name.is_empty() {
                    record.full_name()
                } else {
                    record.name.clone()
                };
                on_point(&key, ts, &record.value, record.unit.as_deref())?;
            }
        }
        ContentType::Raw => {
            return Err(DecodeError::Codec(
                "raw bytes need the codec of the device's profile".to_owned(),
            ));
        }
        ContentType::LineProtocol(precision) => {
            let text = std::str::from_utf8(payload).map_err(|_| DecodeError::NotUtf8)?;
            let lines = line_protocol::parse_batch(text, precision).map_err(|errors| {
                DecodeError::LineProtocol(
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            })?;
            let mut key = String::new();
            for line in &lines {
                let ts = line.timestamp_ns.unwrap_or(received_at_ns);
                for (field, value) in &line.fields {
                    key.clear();
                    key.push_str(&line.measurement);
                    key.push('.');
                    key.push_str(field);
                    on_point(&key, ts, value, None)?;
                }
            }
        }
    }
    Ok(())
}

/// Returns the latest timestamp accepted for data received at
/// `received_at_ns`: `max_future` later, saturating instead of wrapping for
/// very long settings.
pub fn latest_allowed_ts(received_at_ns: TimestampNs, max_future: Duration) -> TimestampNs {
    let max_future = i64::try_from(max_future.as_nanos()).unwrap_or(i64::MAX);
    received_at_ns.saturating_add(max_future)
}

/// Formats a duration for messages in the largest whole unit: `24h`, `90s`.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 3600 && seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds >= 60 && seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{}s", duration.as_secs_f64())
    }
}

/// Formats a timestamp as RFC 3339 for messages.
pub fn format_ts(ts: TimestampNs) -> String {
    chrono::DateTime::from_timestamp_nanos(ts).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_window_names_the_limit_that_refused() {
        let now = 1_700_000_000_000_000_000;
        let hour = Duration::from_secs(3600);
        let window = TimeWindow {
            max_future: hour,
            retention: Some(hour * 48),
            max_past: Some(hour * 24),
        };
        assert!(window.check("t", now - 23 * 3_600_000_000_000, now).is_ok());
        let past = window
            .check("t", now - 25 * 3_600_000_000_000, now)
            .unwrap_err();
        assert!(past.contains("ingest.max_past"), "{past}");
        let future = window
            .check("t", now + 2 * 3_600_000_000_000, now)
            .unwrap_err();
        assert!(future.contains("ahead of the server clock"), "{future}");
        let retention = TimeWindow {
            max_past: None,
            ..window
        }
        .check("t", now - 49 * 3_600_000_000_000, now)
        .unwrap_err();
        assert!(retention.contains("retention"), "{retention}");
        let open = TimeWindow {
            max_future: hour,
            retention: None,
            max_past: None,
        };
        assert!(
            open.check("t", -1_000_000_000, now).is_ok(),
            "before 1970 is valid"
        );
    }

    #[test]
    fn latest_allowed_saturates_for_long_limits() {
        let now = 1_700_000_000_000_000_000;
        assert_eq!(
            latest_allowed_ts(now, Duration::from_secs(1)),
            now + 1_000_000_000
        );
        let centuries = Duration::from_secs(1000 * 365 * 86_400);
        assert_eq!(latest_allowed_ts(now, centuries), i64::MAX);
    }

    struct NoScripts;

    impl ScriptRunner for NoScripts {
        fn decode_uplink(
            &mut self,
            _: &CodecSpec,
            _: (crate::ids::ProfileId, i64),
            _: &Envelope,
        ) -> Result<Vec<u8>, DecodeError> {
            unreachable!("no script codec in these tests")
        }
    }

    #[test]
    fn records_group_points_by_timestamp_and_the_last_value_wins() {
        let envelope = Envelope {
            tenant_id: crate::ids::TenantId::new_random(),
            device_id: crate::ids::DeviceId::new_random(),
            protocol: crate::ingest::Protocol::Http,
            received_at_ns: 0,
            content_type: ContentType::LineProtocol(line_protocol::Precision::S),
            payload: bytes::Bytes::from_static(b"m a=1,b=2 10\nm c=3 20\nm a=4 10\n"),
            meta: bytes::Bytes::new(),
        };
        let records = decode_records(&envelope, &CodecSpec::Json, None, &mut NoScripts).unwrap();
        let shape: Vec<(i64, Vec<(&str, Value)>)> = records
            .iter()
            .map(|record| {
                (
                    record.ts,
                    record
                        .fields
                        .iter()
                        .map(|field| (field.key.as_str(), field.value.clone()))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            [
                (
                    10_000_000_000,
                    vec![("m.b", Value::Float(2.0)), ("m.a", Value::Float(4.0))]
                ),
                (20_000_000_000, vec![("m.c", Value::Float(3.0))]),
            ]
        );
    }

    #[test]
    fn durations_print_in_whole_units() {
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(120)), "2m");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    }
}
