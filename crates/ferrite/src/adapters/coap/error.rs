//! Failures of CoAP requests and the one place that maps them to response
//! codes. Every failure response carries a diagnostic payload that names
//! the problem and what to change; internal details stay in the log.

use coap_lite::ResponseType;

use super::message::Reply;
use crate::auth::AuthError;
use crate::decode::DecodeError;
use crate::ingest::IngestError;

/// Max-Age of a 5.03 response: the seconds a client should wait before it
/// retries.
pub const RETRY_AFTER_SECS: u32 = 5;

/// A request that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CoapError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("option {0} is critical and not supported; remove it from the request")]
    BadOption(u16),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("Accept {0} is not available: responses are JSON (50); send Accept 50 or none")]
    NotAcceptable(u32),
    #[error("{method} is not allowed on {path}; {allowed}")]
    MethodNotAllowed {
        method: String,
        path: String,
        allowed: &'static str,
    },
    #[error("{0}")]
    RequestEntityIncomplete(String),
    #[error(
        "the payload of {size} bytes is larger than the limit of {limit} bytes (coap.max_payload_bytes)"
    )]
    RequestEntityTooLarge { size: usize, limit: usize },
    #[error("{0}")]
    UnsupportedContentFormat(String),
    #[error("{0}")]
    ServiceUnavailable(String),
    /// A rate limit (RFC 8516: 4.29 with Max-Age).
    #[error("{0}")]
    TooManyRequests(crate::limits::RateLimited),
    #[error("Ferrite is no proxy; remove Proxy-Uri and Proxy-Scheme")]
    ProxyingNotSupported,
    #[error("the request could not be stored; retry later")]
    Internal,
}

impl CoapError {
    /// Label value of `ferrite_coap_requests_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            CoapError::BadRequest(_) => "bad_request",
            CoapError::Unauthorized(_) => "not_authorized",
            CoapError::BadOption(_) => "bad_option",
            CoapError::Forbidden(_) => "forbidden",
            CoapError::NotFound(_) => "not_found",
            CoapError::NotAcceptable(_) => "not_acceptable",
            CoapError::MethodNotAllowed { .. } => "method_not_allowed",
            CoapError::RequestEntityIncomplete(_) => "incomplete_block_transfer",
            CoapError::RequestEntityTooLarge { .. } => "too_large",
            CoapError::UnsupportedContentFormat(_) => "unsupported_content_format",
            CoapError::ServiceUnavailable(_) => "overloaded",
            CoapError::TooManyRequests(_) => "rate_limited",
            CoapError::ProxyingNotSupported => "proxying_not_supported",
            CoapError::Internal => "internal",
        }
    }

    /// Builds the response for this failure.
    pub fn reply(&self) -> Reply {
        let code = match self {
            CoapError::BadRequest(_) => ResponseType::BadRequest,
            CoapError::Unauthorized(_) => ResponseType::Unauthorized,
            CoapError::BadOption(_) => ResponseType::BadOption,
            CoapError::Forbidden(_) => ResponseType::Forbidden,
            CoapError::NotFound(_) => ResponseType::NotFound,
            CoapError::NotAcceptable(_) => ResponseType::NotAcceptable,
            CoapError::MethodNotAllowed { .. } => ResponseType::MethodNotAllowed,
            CoapError::RequestEntityIncomplete(_) => ResponseType::RequestEntityIncomplete,
            CoapError::RequestEntityTooLarge { .. } => ResponseType::RequestEntityTooLarge,
            CoapError::UnsupportedContentFormat(_) => ResponseType::UnsupportedContentFormat,
            CoapError::ServiceUnavailable(_) => ResponseType::ServiceUnavailable,
            CoapError::TooManyRequests(_) => ResponseType::TooManyRequests,
            CoapError::ProxyingNotSupported => ResponseType::ProxyingNotSupported,
            CoapError::Internal => ResponseType::InternalServerError,
        };
        let mut reply = Reply::diagnostic(code, self.to_string());
        match self {
            // RFC 7252 section 5.9.2.9: Size1 carries the largest body
            // accepted.
            CoapError::RequestEntityTooLarge { limit, .. } => {
                reply.size1 = Some(u32::try_from(*limit).unwrap_or(u32::MAX));
            }
            CoapError::ServiceUnavailable(_) => reply.max_age = Some(RETRY_AFTER_SECS),
            // RFC 8516: Max-Age is the time before a retry may succeed.
            CoapError::TooManyRequests(limited) => {
                let seconds = limited.retry_after_secs();
                reply.max_age = Some(u32::try_from(seconds).unwrap_or(u32::MAX));
            }
            _ => {}
        }
        reply
    }
}

impl From<AuthError> for CoapError {
    fn from(error: AuthError) -> CoapError {
        match error {
            AuthError::Metadata(_) => CoapError::Internal,
            other => CoapError::Unauthorized(format!(
                "{other}; create a device to get a valid access token"
            )),
        }
    }
}

impl From<DecodeError> for CoapError {
    fn from(error: DecodeError) -> CoapError {
        CoapError::BadRequest(format!("invalid payload: {error}"))
    }
}

impl From<IngestError> for CoapError {
    fn from(error: IngestError) -> CoapError {
        match error {
            IngestError::Overloaded | IngestError::ShuttingDown | IngestError::Io => {
                CoapError::ServiceUnavailable(error.to_string())
            }
            IngestError::TooLarge(size) => CoapError::RequestEntityTooLarge {
                size,
                limit: crate::ingest::log::MAX_RECORD_BODY - 1024,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_sets_max_age() {
        let reply = CoapError::from(IngestError::Overloaded).reply();
        assert_eq!(reply.code, ResponseType::ServiceUnavailable);
        assert_eq!(reply.max_age, Some(RETRY_AFTER_SECS));
        assert!(!reply.payload.is_empty());
    }

    #[test]
    fn too_large_sets_size1() {
        let reply = CoapError::RequestEntityTooLarge {
            size: 5000,
            limit: 4096,
        }
        .reply();
        assert_eq!(reply.code, ResponseType::RequestEntityTooLarge);
        assert_eq!(reply.size1, Some(4096));
        let text = String::from_utf8(reply.payload).unwrap();
        assert!(text.contains("5000"), "{text}");
        assert!(text.contains("4096"), "{text}");
    }
}
