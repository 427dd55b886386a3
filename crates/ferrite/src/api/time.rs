//! Parsing of time and duration query parameters.
//!
//! Times are epoch milliseconds (an integer) or RFC 3339 strings; durations
//! are milliseconds (an integer) or a unit form such as `15m`, `1h`, `1d`.

use std::time::Duration;

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

/// Parses a positive duration in milliseconds or with a unit.
pub fn parse_interval(param: &'static str, text: &str) -> Result<Duration, ApiError> {
    let text = text.trim();
    let duration = match text.parse::<i64>() {
        Ok(ms) if ms > 0 => Duration::from_millis(ms as u64),
        Ok(ms) => {
            return Err(ApiError::invalid_param(
                param,
                format!("{param}={ms} must be a positive number of milliseconds"),
            ));
        }
        Err(_) => humantime::parse_duration(text).map_err(|_| {
            ApiError::invalid_param(
                param,
                format!("invalid {param} {text:?}: expected milliseconds (e.g. 3600000) or a duration such as 15m, 1h or 1d"),
            )
        })?,
    };
    if duration.is_zero() {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be greater than zero"),
        ));
    }
    Ok(duration)
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

    #[test]
    fn parse_interval_forms() {
        assert_eq!(
            parse_interval("interval", "3600000").unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_interval("interval", "1h").unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(
            parse_interval("interval", "1d").unwrap(),
            Duration::from_secs(86400)
        );
        assert!(parse_interval("interval", "0").is_err());
        assert!(parse_interval("interval", "-1000").is_err());
    }
}
