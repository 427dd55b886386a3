//! One webhook attempt: the signed POST request and the classification of
//! its response.
//!
//! Headers of every request:
//! - `X-Ferrite-Event`: the event name, such as `alarm.raised`;
//! - `X-Ferrite-Delivery`: the delivery id, the same in every attempt, so
//!   that receivers can drop repeats;
//! - `X-Ferrite-Timestamp`: Unix time of the attempt in seconds;
//! - `X-Ferrite-Signature: sha256=<hex>` when the action has a secret: the
//!   HMAC-SHA256 with the secret as key of `{timestamp}.{body}`, so that a
//!   receiver can check both the sender and the age of the request.
//!
//! Redirects are not followed: a client that follows a 301 or 302 turns
//! the POST into a GET, so the receiver would not get the event.

use std::error::Error as _;
use std::time::{Duration, SystemTime};

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use sha2::Sha256;

use super::retry::Attempt;
use super::spec::WebhookSpec;
use crate::metadata::DeliveryId;

/// Bytes of a failed response's body kept in the delivery's error.
const ERROR_BODY_BYTES: usize = 256;

/// Creates the HTTP client of all webhooks: `timeout` bounds each request
/// from connecting to the end of the response, and redirects are not
/// followed.
pub fn client(timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Ferrite/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Returns the value of `X-Ferrite-Signature`: `sha256=` and the hex
/// HMAC-SHA256 of `{timestamp}.{body}` keyed with `secret`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The request of one attempt.
pub struct WebhookRequest<'a> {
    pub spec: &'a WebhookSpec,
    pub delivery_id: DeliveryId,
    pub event: &'a str,
    pub body: Vec<u8>,
    /// Unix time of the attempt in seconds.
    pub timestamp: u64,
}

impl WebhookRequest<'_> {
    fn headers(&self) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::new();
        // Validation of the spec checked the names and values of the
        // extra headers; a stored spec that fails here is rejected.
        for (name, value) in &self.spec.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("invalid value of the header {name}"))?;
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let event = HeaderValue::from_str(self.event)
            .map_err(|_| format!("invalid event name {:?}", self.event))?;
        headers.insert("x-ferrite-event", event);
        let delivery_id = HeaderValue::from_str(&self.delivery_id.to_string())
            .map_err(|_| "invalid delivery id".to_owned())?;
        headers.insert("x-ferrite-delivery", delivery_id);
        headers.insert("x-ferrite-timestamp", HeaderValue::from(self.timestamp));
        if let Some(secret) = &self.spec.secret {
            let signature = signature(secret.as_bytes(), self.timestamp, &self.body);
            headers.insert(
                "x-ferrite-signature",
                HeaderValue::from_str(&signature).map_err(|_| "invalid signature".to_owned())?,
            );
        }
        Ok(headers)
    }
}

/// Sends one attempt and classifies the result.
pub async fn send(client: &reqwest::Client, request: WebhookRequest<'_>) -> Attempt {
    let headers = match request.headers() {
        Ok(headers) => headers,
        Err(error) => {
            return Attempt::Reject {
                error: format!("cannot build the request: {error}"),
                status_code: None,
            };
        }
    };
    let sent = client
        .post(&request.spec.url)
        .headers(headers)
        .body(request.body)
        .send()
        .await;
    match sent {
        Ok(response) => classify(response).await,
        Err(error) if error.is_builder() => Attempt::Reject {
            error: format!("cannot build the request: {}", error_chain(error)),
            status_code: None,
        },
        Err(error) => Attempt::Retry {
            error: format!("request failed: {}", error_chain(error)),
            status_code: None,
            retry_after: None,
        },
    }
}

/// 2xx succeeds. 429 and 5xx are retried, after `Retry-After` if the
/// receiver sent one. Every other status fails the delivery.
async fn classify(response: reqwest::Response) -> Attempt {
    let status = response.status();
    if status.is_success() {
        return Attempt::Delivered {
            status_code: Some(status.as_u16()),
        };
    }
    let retry_after = response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| parse_retry_after(value, SystemTime::now()));
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(super::spec::display_url);
    let excerpt = body_excerpt(response).await;

    let mut error = format!("HTTP {status}");
    if let Some(location) = location.filter(|_| status.is_redirection()) {
        error.push_str(&format!(
            ": redirects are not followed; set the url to {location}"
        ));
    }
    if !excerpt.is_empty() {
        error.push_str(&format!(": {excerpt}"));
    }
    let status_code = Some(status.as_u16());
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Attempt::Retry {
            error,
            status_code,
            retry_after,
        }
    } else {
        Attempt::Reject { error, status_code }
    }
}

/// Reads the start of a response body, for the delivery's error.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let truncated = bytes.len() > ERROR_BODY_BYTES;
    bytes.truncate(ERROR_BODY_BYTES);
    let mut text: String = String::from_utf8_lossy(&bytes)
        .chars()
        .map(|character| {
            if character.is_control() {
                ' '
            } else {
                character
            }
        })
        .collect();
    text = text.trim().to_owned();
    if truncated {
        text.push_str(" ...");
    }
    text
}

/// Parses `Retry-After` as seconds or as an HTTP date (RFC 9110, section
/// 10.2.3). A date in the past means now.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Formats an error with its sources, without the URL, which may contain
/// credentials.
fn error_chain(error: reqwest::Error) -> String {
    let timed_out = error.is_timeout();
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    if timed_out {
        text.push_str(" (timed out; see actions.attempt_timeout)");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_value() {
        // Computed with Python: hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest()
        assert_eq!(
            signature(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
