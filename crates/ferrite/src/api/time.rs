//! Parsing of time and duration query parameters.
//!
//! Times are epoch milliseconds (an integer) or RFC 3339 strings. Intervals
//! are parsed in the `buckets` module.

use ferrite_core::{TimestampNs, millis_to_nanos};

use super::ApiError;

/// Epoch milliseconds below this (1973-03-03) are most likely seconds.
pub const SECONDS_SUSPECT_BELOW_MS: i64 = 100_000_000_000;

/// A parsed time parameter, with whether it looks like seconds.
pub struct TimeParam {
    pub ns: TimestampNs,
    pub looks_like_seconds: bool,
}

pub fn parse_time(param: &'static str, text: &str) -> Result<TimeParam, ApiError> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<i64>() {
        let ns = millis_to_nanos(ms).ok_or_else(|| {
            ApiError::invalid_param(
                param,
                format!("{param}={ms} is outside the supported range of epoch milliseconds (1677-09-21 to 2262-04-11)"),
            )
        })?;
        return Ok(TimeParam {
            ns,
            looks_like_seconds: (0..SECONDS_SUSPECT_BELOW_MS).contains(&ms),
        });
    }
    let parsed = chrono::DateTime::parse_from_rfc3339(text).map_err(|_| {
        ApiError::invalid_param(
            param,
            format!("invalid {param} {text:?}: expected epoch milliseconds (e.g. 1714953600000) or an RFC 3339 time (e.g. 2024-05-06T00:00:00Z)"),
        )
    })?;
    let ns = parsed.timestamp_nanos_opt().ok_or_else(|| {
        ApiError::invalid_param(
            param,
            format!("{param} {text:?} is outside the supported range 1677-09-21 to 2262-04-11"),
        )
    })?;
    Ok(TimeParam {
        ns,
        looks_like_seconds: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_time_accepts_millis_and_rfc3339() {
        let ms = parse_time("start", "1714953600000").unwrap();
        let iso = parse_time("start", "2024-05-06T00:00:00Z").unwrap();
        assert_eq!(ms.ns, iso.ns);
        assert!(!ms.looks_like_seconds);
        assert!(
            parse_time("start", "1714953600")
                .unwrap()
                .looks_like_seconds
        );
    }

    #[test]
    fn parse_time_rejects_garbage() {
        let error = parse_time("start", "abc").err().unwrap();
        assert_eq!(error.param, Some("start"));
    }
}
