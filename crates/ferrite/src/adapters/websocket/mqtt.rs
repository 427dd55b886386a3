//! `/mqtt`: the HTTP side of MQTT over WebSocket. It negotiates the
//! subprotocol, takes a connection slot within `mqtt.max_connections` and
//! hands the upgraded socket to the MQTT server.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::adapters::mqtt::{PACKET_HEADROOM, serve_websocket};
use crate::api::ApiError;
use crate::server::AppState;

/// Subprotocols in order of preference: `mqtt` for MQTT 3.1.1 and 5 (MQTT 5
/// section 6), `mqttv3.1` as older clients name it.
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// `GET /mqtt`: upgrades to MQTT over WebSocket. The client authenticates
/// in CONNECT, as over TCP.
pub async fn endpoint(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "WebSocket upgrade required",
            format!(
                "{}; connect with an MQTT client over WebSocket, subprotocol mqtt",
                rejection.body_text()
            ),
        )
    })?;
    let upgrade = upgrade.protocols(SUBPROTOCOLS);
    if upgrade.selected_protocol().is_none() {
        let offered: Vec<String> = upgrade
            .requested_protocols()
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .collect();
        let offered = if offered.is_empty() {
            "none".to_owned()
        } else {
            offered.join(", ")
        };
        return Err(ApiError::bad_request(format!(
            "no MQTT subprotocol offered (Sec-WebSocket-Protocol: {offered}); offer mqtt, or mqttv3.1"
        )));
    }

    let server = state.mqtt.clone();
    let Some(slot) = server.reserve_connection(peer) else {
        return Err(ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many connections",
                format!(
                    "mqtt.max_connections ({}) MQTT connections are open; retry later",
                    server.config().max_connections
                ),
            )
        });
    };

    // A message may contain several packets, so it may be larger than one
    // packet; a packet that is too large gets its MQTT reason code.
    let max_packet = server
        .config()
        .max_payload_bytes
        .saturating_add(PACKET_HEADROOM);
    let max_message = max_packet.saturating_mul(2);
    Ok(upgrade
        .max_message_size(max_message)
        .max_frame_size(max_message)
        .on_upgrade(move |socket| serve_websocket(socket, server, slot, peer))
        .into_response())
}
