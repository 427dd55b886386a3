//! The HTTP listener: device telemetry (JSON), InfluxDB line protocol,
//! uplinks from other LoRaWAN network servers, the REST API, `/healthz` and
//! `/metrics`.
//!
//! Device endpoints follow ThingsBoard's HTTP device API
//! (`POST /api/v1/{access_token}/telemetry`) so existing firmware works, and
//! InfluxDB's write APIs (`POST /write`, `POST /api/v2/write`) so Telegraf
//! and the InfluxDB client libraries can write. Bodies may be gzip-encoded;
//! the size limit applies after decompression.

pub(crate) mod body;
mod connection;
mod line_protocol;
mod telemetry;

pub use telemetry::now_ns;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::handler::Handler;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::decompression::RequestDecompressionLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

use crate::adapters::lorawan_integrations;
use crate::adapters::websocket;
use crate::api;
use crate::server::AppState;

/// Time a connection over `limits.connections_per_address` has to send its
/// request and read the 429, so that rejected connections do not pile up.
const REJECTED_CONNECTION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// `Retry-After` of a connection rejected for the connections per address.
const CONNECTION_RETRY_AFTER_SECS: u64 = 5;
/// Pause after a failed accept.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

pub fn router(state: Arc<AppState>) -> Router {
    let timeout = state.config.http.request_timeout;
    let router = Router::new()
        .route("/healthz", get(healthz))
        // Health checks of the InfluxDB 1.x and 2.x client libraries.
        .route("/ping", get(ping).head(ping))
        .route("/health", get(influx_health))
        .route("/metrics", get(metrics))
        .route("/api/v1/{token}/telemetry", post(telemetry::by_token))
        .route(
            "/api/v1/devices/{id}/telemetry",
            post(telemetry::by_device_id).get(api::telemetry_query.layer(
                axum::middleware::from_fn_with_state(state.clone(), limit_api_requests),
            )),
        )
        .route("/write", post(line_protocol::write))
        .route("/api/v2/write", post(line_protocol::write))
        .route("/mqtt", get(websocket::mqtt_endpoint))
        .route("/api/v1/devices/ws", get(websocket::device_endpoint))
        .route(
            "/api/v1/integrations/chirpstack",
            post(lorawan_integrations::http::chirpstack),
        )
        .route(
            "/api/v1/integrations/tts",
            post(lorawan_integrations::http::tts),
        )
        .merge(
            api::router(state.clone()).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                limit_api_requests,
            )),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(RequestDecompressionLayer::new())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(CatchPanicLayer::new());
    add_security_headers(router).with_state(state)
}

/// Content-Security-Policy of every response. Ferrite serves JSON, text
/// and streams but no HTML, so a browser that renders a response anyway
/// may load nothing and frame nothing.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Adds headers to every HTTP response that does not set them itself: no
/// MIME type sniffing, no framing, no referrer, and
/// [`CONTENT_SECURITY_POLICY`].
fn add_security_headers<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("DENY"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
}

/// The HTTPS listener and its TLS acceptor.
pub struct TlsListener {
    pub listener: TcpListener,
    pub tls: crate::tls::TlsListener,
}

/// Accepts from `listener`, or waits forever when there is none.
async fn accept_from(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Returns the `Strict-Transport-Security` value for `max_age`, or `None`
/// when it is zero.
fn hsts_value(max_age: std::time::Duration) -> Option<HeaderValue> {
    if max_age.is_zero() {
        return None;
    }
    HeaderValue::from_str(&format!("max-age={}", max_age.as_secs())).ok()
}

/// Serves HTTP on `listener` and HTTPS on `tls`, each when given, until
/// `shutdown` is cancelled, then lets running requests finish for up to
/// `http.request_timeout`.
///
/// The accept loop is written out instead of using `axum::serve` because
/// that offers no header read timeout, and without one a client that
/// connects and sends nothing keeps its connection open forever.
pub async fn serve(
    listener: Option<TcpListener>,
    tls: Option<TlsListener>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) {
    let drain_timeout = state.config.http.request_timeout;
    let header_read_timeout = state.config.http.header_read_timeout;
    let hsts = hsts_value(state.config.tls.hsts_max_age);
    let router = router(state.clone());
    // HSTS only on HTTPS: over plain HTTP a man in the middle could strip
    // or forge it anyway (RFC 6797 section 7.2).
    let https_router = router.clone().layer(axum::middleware::map_response(
        move |mut response: axum::response::Response| {
            let hsts = hsts.clone();
            async move {
                if let Some(value) = hsts {
                    response
                        .headers_mut()
                        .insert(header::STRICT_TRANSPORT_SECURITY, value);
                }
                response
            }
        },
    ));
    let connections = tokio_util::task::TaskTracker::new();

    loop {
        let accepted = tokio::select! {
            accepted = accept_from(listener.as_ref()) => accepted.map(|accepted| (accepted, false)),
            accepted = accept_from(tls.as_ref().map(|tls| &tls.listener)) => accepted.map(|accepted| (accepted, true)),
            () = shutdown.cancelled() => break,
        };
        let ((stream, peer), over_tls) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually too many open files: pause instead of spinning.
                tracing::warn!(%error, "HTTP accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Some(address_slot) = state.limits.http_connection(peer.ip()) else {
            crate::limits::count_connection_refused("http", "connections_per_address");
            tokio::spawn(reject_connection(
                stream,
                state.limits.config().connections_per_address,
            ));
            continue;
        };
        let connection_shutdown = shutdown.clone();
        let handshake = match (over_tls, &tls) {
            (true, Some(tls)) => Some(tls.tls.clone()),
            _ => None,
        };
        // The peer address, for handlers that log it (MQTT over WebSocket).
        let service = match handshake {
            Some(_) => {
                TowerToHyperService::new(https_router.clone().map_request(insert_peer(peer)))
            }
            None => TowerToHyperService::new(router.clone().map_request(insert_peer(peer))),
        };
        connections.spawn(async move {
            // A connection that sends nothing at all is closed here, before
            // the TLS handshake or hyper starts.
            let mut first_byte = [0u8; 1];
            if tokio::time::timeout(header_read_timeout, stream.peek(&mut first_byte))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "closed an HTTP connection that sent nothing");
                return;
            }
            let served = match handshake {
                Some(tls) => {
                    let stream = match tls.accept(stream).await {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::debug!(%peer, %error, "HTTPS connection closed");
                            return;
                        }
                    };
                    let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    connection::serve(
                        stream,
                        http2,
                        service,
                        header_read_timeout,
                        connection_shutdown,
                    )
                    .await
                }
                None => {
                    connection::serve(
                        stream,
                        false,
                        service,
                        header_read_timeout,
                        connection_shutdown,
                    )
                    .await
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
            drop(address_slot);
        });
    }

    drop(listener);
    drop(tls);
    connections.close();
    if tokio::time::timeout(drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?drain_timeout,
            "HTTP requests still running at shutdown were cut off"
        );
    }
}

/// Responds to every request of a connection over
/// `limits.connections_per_address` with 429 and closes it after the first
/// response, so that the client learns why instead of seeing a reset.
async fn reject_connection(stream: tokio::net::TcpStream, max_per_address: u32) {
    let rejection = move || async move {
        let limited = api::ApiError {
            retry_after: Some(CONNECTION_RETRY_AFTER_SECS),
            limit: Some(Box::new((
                "limits.connections_per_address",
                u64::from(max_per_address),
            ))),
            ..api::ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests",
                format!(
                    "{max_per_address} connections from this address are open (limits.connections_per_address); close some or retry later"
                ),
            )
        };
        let mut response = limited.into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        response
    };
    let service = TowerToHyperService::new(Router::new().fallback(rejection));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(REJECTED_CONNECTION_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REJECTED_CONNECTION_TIMEOUT, connection).await;
}

/// Applies the REST API rate limits of the request's source address and
/// credential (the `Authorization` header as sent).
async fn limit_api_requests(
    State(state): State<Arc<AppState>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let credential = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let address = peer_address(request.extensions());
    match state.limits.check_api_request(credential, address) {
        Ok(()) => next.run(request).await,
        Err(limited) => {
            crate::limits::count_rate_limited("api", &limited);
            api::ApiError::rate_limited(&limited).into_response()
        }
    }
}

/// Takes a token for one message from the message rate limits. `device`
/// is `None` for a tenant's fleet write. Over a limit the request fails
/// with 429.
pub(crate) fn check_message_rate(
    state: &AppState,
    parts: &axum::http::request::Parts,
    tenant: crate::ids::TenantId,
    device: Option<crate::ids::DeviceId>,
) -> Result<(), api::ApiError> {
    let sender = crate::limits::Sender {
        tenant,
        device,
        address: peer_address(&parts.extensions),
    };
    state.limits.check_message(&sender).map_err(|limited| {
        crate::limits::count_rate_limited("http", &limited);
        telemetry::count_rejected("rate_limited");
        api::ApiError::rate_limited(&limited)
    })
}

/// Returns the client's address recorded by [`insert_peer`].
fn peer_address(extensions: &axum::http::Extensions) -> Option<std::net::IpAddr> {
    extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip())
}

/// Returns a request mapper that records the connection's peer address
/// as [`ConnectInfo`].
fn insert_peer<B>(
    peer: std::net::SocketAddr,
) -> impl Fn(axum::http::Request<B>) -> axum::http::Request<B> + Clone {
    move |mut request| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    }
}

async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting or stopping\n")
    }
}

async fn ping() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn influx_health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let ready = state.ready.load(Ordering::Acquire);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "name": "ferrite",
        "status": if ready { "pass" } else { "fail" },
        "version": env!("CARGO_PKG_VERSION"),
    });
    (status, axum::Json(body))
}

async fn not_found(uri: axum::http::Uri) -> api::ApiError {
    api::ApiError::not_found(format!(
        "no endpoint at {}; see the API documentation for the paths Ferrite serves",
        uri.path()
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> api::ApiError {
    api::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
