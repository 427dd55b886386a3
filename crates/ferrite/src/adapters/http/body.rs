//! Reading request bodies with the configured size limit.

use axum::body::{Body, Bytes};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::api::ApiError;

/// Reads the whole body, failing with 413 past `limit` bytes. With
/// `Content-Encoding: gzip` the limit applies to the decompressed bytes.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            if error.downcast_ref::<LengthLimitError>().is_some() {
                metrics::counter!("ferrite_ingest_rejected_total", "protocol" => "http", "reason" => "too_large").increment(1);
                Err(ApiError::payload_too_large(limit))
            } else {
                Err(ApiError::bad_request(format!(
                    "cannot read the request body: {error}; if it is gzip-encoded, check that it is complete"
                )))
            }
        }
    }
}
