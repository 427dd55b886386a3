//! `GET /api/v1/export`: streams an export of the caller's tenant.
//!
//! Query parameters, each optional:
//! - `start`, `end`: the range `[start, end)` in epoch milliseconds or RFC 3339.
//! - `format`: `parquet` (the default) or `csv`.
//! - `device`: a device id or name, repeatable. Default: every device.
//! - `keys`: comma-separated keys. Default: every key.
//!
//! The endpoint needs the operator or admin role.
//!
//! Parameters and devices are checked before the response starts, so those
//! errors are problem details. The export then runs on a blocking thread
//! that writes into a bounded channel, which the response body drains. At
//! most [`CHANNEL_CHUNKS`] chunks of at most [`CHUNK_BYTES`] wait for a slow
//! client.
//! A failure after the status line was sent aborts the response, so the
//! client sees a transfer error instead of a short file.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use tokio::sync::mpsc;

use super::{ExportError, ExportPlan, Format, TimeRange, parse_time_bound};
use crate::api::ApiError;
use crate::auth::Principal;
use crate::metadata::Role;
use crate::server::AppState;
use crate::store::TimeSeriesStore;

/// Bytes collected before a chunk goes to the response body.
const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks that may wait in the channel for the client.
const CHANNEL_CHUNKS: usize = 8;

const PARAMS: [&str; 5] = ["start", "end", "format", "device", "keys"];

type Chunk = Result<Bytes, io::Error>;

/// The parsed query of an export request.
struct ExportQuery {
    range: TimeRange,
    format: Format,
    devices: Vec<String>,
    keys: Option<Vec<String>>,
    /// Names of `start`/`end` values that look like seconds.
    seconds_warnings: Vec<&'static str>,
}

/// `GET /api/v1/export`.
pub async fn export(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    principal.require(Role::Operator)?;
    let query = parse_query(&params)?;

    let devices =
        super::select_devices(state.metadata.as_ref(), principal.tenant_id, &query.devices)
            .await
            .map_err(|error| match error {
                // 404 like any other route given a device that is not in
                // the caller's tenant.
                ExportError::DeviceNotFound(_) => ApiError {
                    param: Some("device"),
                    ..ApiError::not_found(error.to_string())
                },
                ExportError::Metadata(error) => error.into(),
                other => {
                    tracing::error!(error = %other, "selecting devices for an export failed");
                    ApiError::internal()
                }
            })?;

    let store = state.store.clone();
    let tenant = principal.tenant_id;
    let keys = query.keys;
    let range = query.range;
    let plan = tokio::task::spawn_blocking(move || {
        ExportPlan::build(store.as_ref(), tenant, devices, keys.as_deref(), range)
    })
    .await
    .map_err(|_| ApiError::internal())?;

    let mut warnings: Vec<String> = Vec::new();
    if !query.seconds_warnings.is_empty() {
        warnings.push(format!(
            "{} looks like seconds; times are epoch milliseconds",
            query.seconds_warnings.join(" and ")
        ));
    }
    if !plan.missing_keys.is_empty() {
        warnings.push(format!(
            "none of the selected devices has the key(s) {}",
            plan.missing_keys.join(", ")
        ));
    }

    let (sender, receiver) = mpsc::channel::<Chunk>(CHANNEL_CHUNKS);
    spawn_export(
        state.store.clone(),
        plan,
        query.format,
        sender,
        principal.subject.to_string(),
    );
    Ok(streaming_response(query.format, receiver, &warnings))
}

fn parse_query(params: &[(String, String)]) -> Result<ExportQuery, ApiError> {
    if let Some((unknown, _)) = params
        .iter()
        .find(|(name, _)| !PARAMS.contains(&name.as_str()))
    {
        return Err(ApiError::invalid_param(
            "query",
            format!(
                "unknown query parameter {unknown:?}; this endpoint takes {}",
                PARAMS.join(", ")
            ),
        ));
    }
    let single = |name: &'static str| -> Result<Option<&str>, ApiError> {
        let mut values = params.iter().filter(|(param, _)| param == name);
        let first = values.next().map(|(_, value)| value.as_str());
        if values.next().is_some() {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} is given more than once; give it once"),
            ));
        }
        Ok(first)
    };

    let mut seconds_warnings = Vec::new();
    let mut bound = |name: &'static str| -> Result<Option<i64>, ApiError> {
        let Some(text) = single(name)? else {
            return Ok(None);
        };
        let bound =
            parse_time_bound(name, text).map_err(|detail| ApiError::invalid_param(name, detail))?;
        if bound.looks_like_seconds {
            seconds_warnings.push(name);
        }
        Ok(Some(bound.ns))
    };
    let start = bound("start")?;
    let end = bound("end")?;
    let range =
        TimeRange::new(start, end).map_err(|detail| ApiError::invalid_param("start", detail))?;

    let format = match single("format")? {
        None => Format::Parquet,
        Some(text) => Format::parse(text).ok_or_else(|| {
            ApiError::invalid_param(
                "format",
                format!("unsupported format {text:?}: use parquet or csv"),
            )
        })?,
    };
    if !format.is_supported() {
        return Err(ApiError::invalid_param(
            "format",
            "this server was built without Parquet support (cargo feature \"export\"); use format=csv",
        ));
    }

    let devices: Vec<String> = params
        .iter()
        .filter(|(name, _)| name == "device")
        .map(|(_, value)| value.clone())
        .collect();
    if devices.iter().any(|device| device.trim().is_empty()) {
        return Err(ApiError::invalid_param(
            "device",
            "device is empty: give a device id or name, or leave it out for every device",
        ));
    }

    let keys = crate::api::parse_key_list(single("keys")?)?;

    Ok(ExportQuery {
        range,
        format,
        devices,
        keys,
        seconds_warnings,
    })
}

/// Starts the export on a blocking thread that writes into `sender` and
/// logs how it ended.
fn spawn_export(
    store: Arc<dyn TimeSeriesStore>,
    plan: ExportPlan,
    format: Format,
    sender: mpsc::Sender<Chunk>,
    requested_by: String,
) {
    tokio::task::spawn_blocking(move || {
        let output = ChannelWriter::new(sender.clone());
        let not_cancelled = AtomicBool::new(false);
        match super::write_export(store.as_ref(), &plan, format, output, &not_cancelled) {
            Ok((summary, _)) => tracing::info!(
                by = %requested_by,
                format = format.extension(),
                rows = summary.rows,
                devices = summary.devices,
                series = summary.series,
                bytes = summary.bytes,
                elapsed_ms = summary.elapsed.as_millis() as u64,
                "export finished"
            ),
            Err(_) if sender.is_closed() => {
                tracing::info!(by = %requested_by, "export stopped: the client closed the connection");
            }
            Err(error) => {
                tracing::error!(by = %requested_by, %error, "export failed; the response was aborted");
                let _ = sender.blocking_send(Err(io::Error::other("the export failed")));
            }
        }
    });
}

fn streaming_response(
    format: Format,
    receiver: mpsc::Receiver<Chunk>,
    warnings: &[String],
) -> Response {
    let stream = futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    });
    let mut response = Response::new(Body::from_stream(stream));

    let file_name = format!(
        "ferrite-export-{}.{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        format.extension()
    );
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !warnings.is_empty()
        && let Ok(value) = HeaderValue::from_str(&warnings.join("; "))
    {
        headers.insert("ferrite-warning", value);
    }
    response
}

/// A blocking writer that sends its bytes into a channel in chunks of
/// [`CHUNK_BYTES`] (the last one may be shorter). A `write` takes at most
/// what fills the current chunk. Writes fail with `BrokenPipe` once the
/// receiver is gone.
struct ChannelWriter {
    sender: mpsc::Sender<Chunk>,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn new(sender: mpsc::Sender<Chunk>) -> Self {
        Self {
            sender,
            buffer: Vec::with_capacity(CHUNK_BYTES),
        }
    }

    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.sender
            .blocking_send(Ok(Bytes::from(chunk)))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the client closed the connection",
                )
            })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let taken = buf.len().min(CHUNK_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&buf[..taken]);
        if self.buffer.len() == CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::super::PAGE_POINTS;
    use super::super::testing::{ScriptedStore, plan};
    use super::*;

    /// Runs an export of a scripted store into a channel and returns the
    /// chunks that the response body would send.
    async fn stream_chunks(pages: usize, fail: bool) -> Vec<Chunk> {
        let store: Arc<dyn TimeSeriesStore> = Arc::new(ScriptedStore {
            pages: AtomicUsize::new(pages),
            fail,
        });
        let plan = plan(store.as_ref());
        let (sender, mut receiver) = mpsc::channel(CHANNEL_CHUNKS);
        spawn_export(store, plan, Format::Csv, sender, "test".to_owned());

        let mut chunks = Vec::new();
        while let Some(chunk) = receiver.recv().await {
            chunks.push(chunk);
        }
        chunks
    }

    #[tokio::test]
    async fn finished_export_streams_every_row() {
        let chunks = stream_chunks(3, false).await;

        assert!(chunks.len() > 1, "{} chunks", chunks.len());
        let mut body = Vec::new();
        for chunk in chunks {
            let chunk = chunk.expect("no error chunk");
            assert!(chunk.len() <= CHUNK_BYTES, "{} bytes", chunk.len());
            body.extend_from_slice(&chunk);
        }
        let lines = body.split(|byte| *byte == b'\n').count() - 1;
        assert_eq!(lines, 3 * PAGE_POINTS + 1);
    }

    #[tokio::test]
    async fn failed_export_ends_with_error_chunk() {
        let chunks = stream_chunks(3, true).await;

        let (last, sent) = chunks.split_last().expect("at least one chunk");
        assert!(last.is_err(), "the stream must end with an error");
        assert!(!sent.is_empty(), "rows before the failure were sent");
        assert!(sent.iter().all(Result::is_ok));
    }
}
