//! The HTTP listener: device telemetry (JSON), InfluxDB line protocol, the
//! REST API, `/healthz` and `/metrics`.
//!
//! Device endpoints follow ThingsBoard's HTTP device API
//! (`POST /api/v1/{access_token}/telemetry`) so existing firmware works, and
//! InfluxDB's write APIs (`POST /write`, `POST /api/v2/write`) so Telegraf
//! and the InfluxDB client libraries can write. Bodies may be gzip-encoded;
//! the size limit applies after decompression.

mod body;
mod line_protocol;
mod telemetry;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::timeout::TimeoutLayer;

use crate::api;
use crate::server::AppState;

pub fn router(state: Arc<AppState>) -> Router {
    let timeout = state.config.http.request_timeout;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/{token}/telemetry", post(telemetry::by_token))
        .route(
            "/api/v1/devices/{id}/telemetry",
            post(telemetry::by_device_id).get(api::telemetry_query),
        )
        .route("/write", post(line_protocol::write))
        .route("/api/v2/write", post(line_protocol::write))
        .merge(api::router())
        .layer(RequestDecompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// Serves HTTP until `shutdown` is cancelled, then lets running requests finish.
pub async fn serve(listener: TcpListener, state: Arc<AppState>, shutdown: CancellationToken) {
    let app = router(state);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting or stopping\n")
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
