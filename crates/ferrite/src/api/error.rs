//! Errors of the HTTP API as RFC 9457 problem details.
//!
//! This is the one place where failures become HTTP responses. Clients see
//! what was wrong with their request; internal causes are logged here and
//! replaced by a generic message.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::decode::DecodeError;
use crate::ingest::IngestError;
use crate::metadata::MetadataError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub title: &'static str,
    pub detail: String,
    /// The query parameter or body field that was wrong.
    pub param: Option<&'static str>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// Every problem found, when there is more than one (a profile with
    /// several mistakes, for example).
    pub errors: Vec<String>,
    /// The rate limit that was exceeded: its setting and its value. Boxed
    /// so that every `Result<_, ApiError>` stays small.
    pub limit: Option<Box<(&'static str, u64)>>,
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'static str,
    status: u16,
    detail: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    param: Option<&'static str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    errors: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit_value: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            title,
            detail: detail.into(),
            param: None,
            retry_after: None,
            errors: Vec::new(),
            limit: None,
        }
    }

    /// Creates a 422 response that lists every problem of a document.
    pub fn invalid_document(title: &'static str, problems: Vec<String>) -> Self {
        let detail = match problems.len() {
            1 => problems[0].clone(),
            count => format!("{count} problems: {}", problems.join("; ")),
        };
        Self {
            errors: problems,
            ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, title, detail)
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad request", detail)
    }

    /// Creates the error for a bad query parameter or body field, named in
    /// the response.
    pub fn invalid_param(param: &'static str, detail: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "Invalid parameter", detail)
        }
    }

    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", detail)
    }

    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Not found", detail)
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!(
                "the request body exceeds the limit of {limit} bytes (after gzip decompression); send smaller batches or raise http.max_body_bytes"
            ),
        )
    }

    /// Creates the 429 response of a rate limit, with `Retry-After` and
    /// the limit's setting and value in the body.
    pub fn rate_limited(limited: &crate::limits::RateLimited) -> Self {
        Self {
            retry_after: Some(limited.retry_after_secs()),
            limit: Some(Box::new((
                limited.limit.setting(),
                u64::from(limited.per_second),
            ))),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                limited.to_string(),
            )
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            "the server failed to handle the request; the cause is in its log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: "about:blank",
            title: self.title,
            status: self.status.as_u16(),
            detail: &self.detail,
            param: self.param,
            errors: &self.errors,
            limit: self.limit.as_deref().map(|(setting, _)| *setting),
            limit_value: self.limit.as_deref().map(|(_, value)| *value),
            retry_after: self.limit.as_ref().and(self.retry_after),
        };
        let mut response = (self.status, Json(&problem)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<DecodeError> for ApiError {
    fn from(error: DecodeError) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Invalid payload",
            error.to_string(),
        )
    }
}

impl From<IngestError> for ApiError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Overloaded | IngestError::ShuttingDown => Self {
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    error.to_string(),
                )
            },
            IngestError::TooLarge(_) => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload too large",
                format!("{error}; send smaller batches"),
            ),
            IngestError::Io => Self {
                retry_after: Some(5),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "the server could not store the data; nothing was accepted, retry later",
                )
            },
        }
    }
}

impl From<MetadataError> for ApiError {
    fn from(error: MetadataError) -> Self {
        match error {
            MetadataError::NotFound(what) => Self::not_found(format!("{what} not found")),
            MetadataError::Conflict(detail) => Self::new(StatusCode::CONFLICT, "Conflict", detail),
            other => {
                tracing::error!(error = %other, "metadata request failed");
                Self::internal()
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Metadata(error) => error.into(),
            AuthError::DeviceTokenNotAllowed | AuthError::ScopeMissing { .. } => {
                Self::forbidden(error.to_string())
            }
            AuthError::Throttled { retry_after } => Self {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too Many Requests",
                    error.to_string(),
                )
            },
            AuthError::Oidc(error) => {
                use crate::auth::oidc::OidcError;
                let status = match &error {
                    OidcError::UnknownState => StatusCode::BAD_REQUEST,
                    OidcError::Provider(_) | OidcError::InvalidIdToken(_) => {
                        StatusCode::UNAUTHORIZED
                    }
                    OidcError::NotAllowed(_) => StatusCode::FORBIDDEN,
                    OidcError::Unavailable => StatusCode::BAD_GATEWAY,
                };
                Self::new(status, "OpenID Connect login failed", error.to_string())
            }
            other => Self::unauthorized(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(error: crate::store::StoreError) -> Self {
        tracing::error!(%error, "time-series query failed");
        Self::internal()
    }
}

impl From<crate::adapters::lorawan_integrations::AcceptError> for ApiError {
    fn from(error: crate::adapters::lorawan_integrations::AcceptError) -> Self {
        use crate::adapters::lorawan_integrations::AcceptError;
        match error {
            AcceptError::UnknownDevEui { .. } => Self::not_found(error.to_string()),
            AcceptError::InFlight { .. } => Self {
                retry_after: Some(1),
                ..Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    error.to_string(),
                )
            },
            AcceptError::Ingest(error) => error.into(),
            AcceptError::Metadata(error) => error.into(),
        }
    }
}
