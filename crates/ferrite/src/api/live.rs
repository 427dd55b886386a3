//! Live streams: processed telemetry and alarm changes, pushed to clients as
//! they happen.
//!
//! - `GET /api/v1/live/ws` upgrades to a WebSocket and sends one JSON text
//!   message per event. The client may replace its filter at any time with
//!   `{"subscribe": {...}}`; the server replies `subscribed` or `error`.
//! - `GET /api/v1/live/sse` returns server-sent events
//!   (`text/event-stream`): `event:` is `telemetry`, `alarm` or `lagged`,
//!   `id:` counts the events of the stream, `data:` is the same JSON.
//!
//! Both take the REST API's credentials, as `Authorization: Bearer` or as
//! `access_token=` because browsers cannot set headers on WebSocket and
//! EventSource connections. A stream only carries events of the caller's
//! tenant. The filters (`device`, `key`, `profile`, `events`, `label`) are
//! checked before the response starts, so a bad filter gets a 400.
//!
//! Bounds: the stream's broadcast receiver lets it fall at most
//! [`LIVE_BUS_CAPACITY`] events behind, after which it reports `lagged`.
//! Each stream writes one message at a time and gives up after
//! [`SEND_TIMEOUT`], so a client that stops reading costs one message of
//! memory and is disconnected. Every stream ends when the bus is closed at
//! shutdown.
//!
//! Revocation: a stream ends at once when its API key is revoked or its
//! user or tenant removed (a WebSocket with close code 1008, an SSE response
//! by ending). When the stream missed revocation events, an API key is
//! checked again; a stream opened with a user's access token ends instead,
//! because the token cannot be checked against the database, and the
//! client reconnects with a valid one.
//!
//! Left out: history and resuming. A new stream starts with the events
//! published after it opened, and `Last-Event-ID` is ignored.
//!
//! [`LIVE_BUS_CAPACITY`]: crate::live::LIVE_BUS_CAPACITY

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferrite_core::{TimestampNs, Value, nanos_to_millis};
use futures::stream::{SplitSink, Stream};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc};
use tracing::Instrument;

use super::ApiError;
use crate::auth::revocation::{RevocationWatch, Signal};
use crate::auth::{HeldCredential, Principal, is_api_key};
use crate::ids::{DeviceId, ProfileId, TenantId};
use crate::live::{AlarmChange, AlarmEvent, KeyPattern, LiveEvent, LiveFilter, TelemetryEvent};
use crate::metadata::{Attributes, Labels, MetadataStore, Role};
use crate::server::AppState;

/// Maximum wait for one message to reach the client's socket before the
/// stream is closed as a client that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of WebSocket pings. A client that has sent no pong for the
/// previous ping when the next one is due is disconnected.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Interval of SSE comment lines while no event is sent, so that proxies
/// do not close an idle stream.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events handed to the HTTP connection of an SSE stream but not yet written.
const SSE_QUEUE: usize = 64;
/// Largest message a WebSocket client may send (a `subscribe` message).
const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;
/// Maximum number of values of one filter field (`device`, `key` or `label`).
const MAX_FILTER_VALUES: usize = 1000;

/// Query parameters of both endpoints.
const QUERY_PARAMS: [&str; 6] = [
    "device",
    "key",
    "profile",
    "events",
    "label",
    "access_token",
];

type Params = Vec<(String, String)>;

/// Returns the routes of the live streams and registers their metrics.
pub fn router() -> Router<Arc<AppState>> {
    register_metrics();
    Router::new()
        .route("/api/v1/live/ws", get(websocket))
        .route("/api/v1/live/sse", get(sse))
}

// ---------------------------------------------------------------- metrics ---

#[derive(Debug, Clone, Copy)]
enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

fn register_metrics() {
    metrics::describe_gauge!(
        "ferrite_live_subscribers",
        "Open live streams, by transport (websocket, sse)."
    );
    metrics::describe_counter!(
        "ferrite_live_events_sent_total",
        "Telemetry and alarm events written to live streams, by transport."
    );
    metrics::describe_counter!(
        "ferrite_live_events_dropped_total",
        "Bus events that live streams missed because they fell behind, by transport. The count includes events the stream's filter would have skipped."
    );
    for transport in [Transport::WebSocket, Transport::Sse] {
        metrics::gauge!("ferrite_live_subscribers", "transport" => transport.as_str()).set(0.0);
        metrics::counter!("ferrite_live_events_sent_total", "transport" => transport.as_str())
            .increment(0);
        metrics::counter!("ferrite_live_events_dropped_total", "transport" => transport.as_str())
            .increment(0);
    }
}

/// Counts an open stream in `ferrite_live_subscribers` until dropped.
struct SubscriberGauge(Transport);

impl SubscriberGauge {
    fn open(transport: Transport) -> Self {
        metrics::gauge!("ferrite_live_subscribers", "transport" => transport.as_str())
            .increment(1.0);
        SubscriberGauge(transport)
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        metrics::gauge!("ferrite_live_subscribers", "transport" => self.0.as_str()).decrement(1.0);
    }
}

fn count_sent(transport: Transport) {
    metrics::counter!("ferrite_live_events_sent_total", "transport" => transport.as_str())
        .increment(1);
}

fn count_dropped(transport: Transport, missed: u64) {
    metrics::counter!("ferrite_live_events_dropped_total", "transport" => transport.as_str())
        .increment(missed);
}

// ---------------------------------------------------------- authentication ---

/// Authenticates a stream request by its `Authorization` header or its
/// `access_token` parameter, never both.
///
/// `from_header` is the REST API's own extractor, so both endpoints accept
/// exactly the credentials that the rest of the API accepts.
async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    from_header: Result<Principal, ApiError>,
    params: &Params,
) -> Result<(Principal, Option<String>), ApiError> {
    let query_token = single(params, "access_token")?;
    let header_token = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .map(|(_, token)| token.trim().to_owned());
    let principal = match (headers.contains_key(header::AUTHORIZATION), query_token) {
        (true, Some(_)) => {
            return Err(ApiError::bad_request(
                "credentials are given twice: send either the Authorization header or access_token, not both",
            ));
        }
        (true, None) => from_header?,
        (false, Some(token)) => {
            let principal = state.auth.authenticate_bearer(token.trim()).await?;
            principal.require_scope(crate::auth::scopes::Scope::TelemetryRead)?;
            principal
        }
        (false, None) => {
            return Err(ApiError::unauthorized(
                "missing credentials: send Authorization: Bearer <access token or API key>, or access_token=<access token or API key> where the client cannot set headers",
            ));
        }
    };
    principal.require(Role::Viewer)?;
    let bearer = header_token.or_else(|| query_token.map(|token| token.trim().to_owned()));
    Ok((principal, bearer))
}

// ---------------------------------------------------------------- filters ---

/// The raw values of the filter fields, from the query string or from a
/// WebSocket `subscribe` message.
#[derive(Debug, Default)]
struct FilterFields {
    device: Vec<String>,
    key: Vec<String>,
    profile: Vec<String>,
    events: Vec<String>,
    label: Vec<String>,
}

fn single<'a>(params: &'a Params, name: &'static str) -> Result<Option<&'a str>, ApiError> {
    let mut values = params
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::invalid_param(
            name,
            format!("{name} is given more than once; give it once"),
        ));
    }
    Ok(first)
}

impl FilterFields {
    fn from_query(params: &Params) -> Result<Self, ApiError> {
        if let Some((unknown, _)) = params
            .iter()
            .find(|(name, _)| !QUERY_PARAMS.contains(&name.as_str()))
        {
            return Err(ApiError::invalid_param(
                "query",
                format!(
                    "unknown query parameter {unknown:?}; this endpoint takes {}",
                    QUERY_PARAMS.join(", ")
                ),
            ));
        }
        let values = |name: &str| -> Vec<String> {
            params
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect()
        };
        Ok(FilterFields {
            device: values("device"),
            key: values("key"),
            profile: values("profile"),
            events: values("events"),
            label: values("label"),
        })
    }

    /// Reads the `subscribe` object of a WebSocket message. Each field is
    /// a string or an array of strings, as a query parameter may repeat.
    fn from_subscribe_message(text: &str) -> Result<Self, ApiError> {
        let invalid = |detail: String| ApiError::invalid_param("subscribe", detail);
        let message: serde_json::Value = serde_json::from_str(text).map_err(|error| {
            invalid(format!(
                "the message is not valid JSON ({error}); send {{\"subscribe\": {{\"device\": [...], \"key\": [...], \"profile\": \"...\", \"events\": \"telemetry,alarms\", \"label\": [\"NAME:VALUE\"]}}}}"
            ))
        })?;
        let Some(object) = message.as_object() else {
            return Err(invalid(
                "the message must be a JSON object with the field \"subscribe\"".into(),
            ));
        };
        if let Some(unknown) = object.keys().find(|name| *name != "subscribe") {
            return Err(invalid(format!(
                "unknown message field {unknown:?}; the server reads only \"subscribe\""
            )));
        }
        let Some(fields) = object
            .get("subscribe")
            .and_then(|fields| fields.as_object())
        else {
            return Err(invalid(
                "\"subscribe\" is missing or not an object; send {\"subscribe\": {}} for every event".into(),
            ));
        };

        let mut parsed = FilterFields::default();
        for (name, value) in fields {
            let target = match name.as_str() {
                "device" => &mut parsed.device,
                "key" => &mut parsed.key,
                "profile" => &mut parsed.profile,
                "events" => &mut parsed.events,
                "label" => &mut parsed.label,
                other => {
                    return Err(invalid(format!(
                        "unknown filter field {other:?}; use device, key, profile, events or label"
                    )));
                }
            };
            *target = strings_of(name, value).map_err(invalid)?;
        }
        Ok(parsed)
    }

    fn parse(&self) -> Result<LiveFilter, ApiError> {
        check_value_count("device", &self.device)?;
        check_value_count("key", &self.key)?;
        check_value_count("label", &self.label)?;

        let mut filter = LiveFilter::default();
        for text in &self.device {
            filter.devices.insert(parse_device_id(text)?);
        }
        for text in &self.key {
            filter.keys.push(parse_key_pattern(text)?);
        }
        (filter.telemetry, filter.alarms) = parse_event_types(&self.events)?;
        for text in &self.label {
            filter.labels.push(parse_label(text)?);
        }
        Ok(filter)
    }
}

fn check_value_count(name: &'static str, values: &[String]) -> Result<(), ApiError> {
    if values.len() > MAX_FILTER_VALUES {
        return Err(ApiError::invalid_param(
            name,
            format!(
                "{} values of {name} exceed the limit of {MAX_FILTER_VALUES}; select devices by label instead",
                values.len()
            ),
        ));
    }
    Ok(())
}

/// Returns a JSON string, or each element of an array of strings.
fn strings_of(name: &str, value: &serde_json::Value) -> Result<Vec<String>, String> {
    let wrong = || format!("{name} must be a string or an array of strings");
    match value {
        serde_json::Value::String(text) => Ok(vec![text.clone()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(wrong))
            .collect(),
        _ => Err(wrong()),
    }
}

fn parse_device_id(text: &str) -> Result<DeviceId, ApiError> {
    text.trim().parse().map_err(|_| {
        ApiError::invalid_param(
            "device",
            format!("invalid device id {text:?}: device ids are UUIDs, as GET /api/v1/devices lists them"),
        )
    })
}

/// Parses `NAME` or `PREFIX*`. A `*` anywhere but at the end is rejected
/// rather than taken literally, so that a mistyped pattern does not match
/// nothing in silence.
fn parse_key_pattern(text: &str) -> Result<KeyPattern, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::invalid_param(
            "key",
            "key is empty: give a key name, or a prefix that ends in *, such as temp*",
        ));
    }
    let (body, prefix) = match text.strip_suffix('*') {
        Some(body) => (body, true),
        None => (text, false),
    };
    if body.contains('*') {
        return Err(ApiError::invalid_param(
            "key",
            format!(
                "invalid key pattern {text:?}: * may only end a pattern, as in temp*, and matches any rest of the key"
            ),
        ));
    }
    Ok(if prefix {
        KeyPattern::Prefix(body.to_owned())
    } else {
        KeyPattern::Exact(body.to_owned())
    })
}

/// Returns the one `profile` value, a profile's id or name, if given.
fn profile_reference(values: &[String]) -> Result<Option<&str>, ApiError> {
    let [text] = values else {
        if values.is_empty() {
            return Ok(None);
        }
        return Err(ApiError::invalid_param(
            "profile",
            "profile is given more than once; give one profile name or id",
        ));
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(ApiError::invalid_param(
            "profile",
            "profile is empty: give a profile name or id, or leave it out for every profile",
        ));
    }
    Ok(Some(text))
}

/// Parses the `events` values, each a comma-separated list of `telemetry`
/// and `alarms`, into (telemetry, alarms). No value means both.
fn parse_event_types(values: &[String]) -> Result<(bool, bool), ApiError> {
    if values.is_empty() {
        return Ok((true, true));
    }
    let (mut telemetry, mut alarms) = (false, false);
    for name in values
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
    {
        match name {
            "telemetry" => telemetry = true,
            "alarms" => alarms = true,
            "" => {}
            other => {
                return Err(ApiError::invalid_param(
                    "events",
                    format!(
                        "unknown event type {other:?}: use telemetry, alarms or both, as in events=telemetry,alarms"
                    ),
                ));
            }
        }
    }
    if !telemetry && !alarms {
        return Err(ApiError::invalid_param(
            "events",
            "events is empty: give telemetry, alarms or telemetry,alarms, or leave it out for both",
        ));
    }
    Ok((telemetry, alarms))
}

/// Parses `NAME:VALUE`, as the fleet queries take it.
fn parse_label(text: &str) -> Result<(String, String), ApiError> {
    match text.split_once(':') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(ApiError::invalid_param(
            "label",
            format!("invalid label selector {text:?}: write NAME:VALUE, for example fleet:South"),
        )),
    }
}

/// Parses the filter fields and checks them against the tenant's devices
/// and profiles: an id or name that is not there would never pass an event,
/// so it is rejected.
async fn build_filter(
    state: &AppState,
    tenant: TenantId,
    fields: &FilterFields,
) -> Result<LiveFilter, ApiError> {
    let mut filter = fields.parse()?;
    check_devices(state, tenant, &filter).await?;
    if let Some(reference) = profile_reference(&fields.profile)? {
        let profile = super::profiles::find(state, tenant, reference)
            .await
            .map_err(|error| {
                if error.status == axum::http::StatusCode::NOT_FOUND {
                    ApiError {
                        param: Some("profile"),
                        ..ApiError::not_found(format!(
                            "profile {reference:?} not found; list the profiles with GET /api/v1/profiles"
                        ))
                    }
                } else {
                    error
                }
            })?;
        filter.profile = Some(profile.id);
    }
    Ok(filter)
}

async fn check_devices(
    state: &AppState,
    tenant: TenantId,
    filter: &LiveFilter,
) -> Result<(), ApiError> {
    for device in &filter.devices {
        match state.metadata.device(tenant, *device).await {
            Ok(_) => {}
            Err(crate::metadata::MetadataError::NotFound(_)) => {
                // 404 like any other route given an id that is not in the
                // caller's tenant.
                return Err(ApiError {
                    param: Some("device"),
                    ..ApiError::not_found(format!(
                        "device {device} not found; list the devices with GET /api/v1/devices"
                    ))
                });
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Renders a filter in the form of a `subscribe` message, for the reply.
fn filter_json(filter: &LiveFilter) -> serde_json::Value {
    let mut events = Vec::new();
    if filter.telemetry {
        events.push("telemetry");
    }
    if filter.alarms {
        events.push("alarms");
    }
    json!({
        "device": filter.devices,
        "key": filter.keys.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "profile": filter.profile,
        "events": events,
        "label": filter
            .labels
            .iter()
            .map(|(name, value)| format!("{name}:{value}"))
            .collect::<Vec<_>>(),
    })
}

// --------------------------------------------------------------- messages ---

#[derive(Serialize)]
struct TelemetryMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    device_id: DeviceId,
    device_name: &'a str,
    profile: Option<ProfileReference<'a>>,
    labels: &'a Labels,
    attributes: &'a Attributes,
    received_at: String,
    points: Vec<PointMessage<'a>>,
}

#[derive(Serialize)]
struct ProfileReference<'a> {
    id: ProfileId,
    name: Option<&'a str>,
}

/// One point. `value` goes through `Value`'s `Serialize`, as in the REST
/// telemetry queries (`point_json`), so both render a value alike.
#[derive(Serialize)]
struct PointMessage<'a> {
    key: &'a str,
    ts: i64,
    value: &'a Value,
}

#[derive(Serialize)]
struct AlarmMessage<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    change: AlarmChange,
    device_id: DeviceId,
    alarm: &'a serde_json::Value,
}

pub(crate) fn telemetry_message(
    event: &TelemetryEvent,
    points: &[&(String, TimestampNs, Value)],
) -> String {
    let message = TelemetryMessage {
        kind: "telemetry",
        device_id: event.device_id,
        device_name: &event.device_name,
        profile: event.profile_id.map(|id| ProfileReference {
            id,
            name: event.profile_name.as_deref(),
        }),
        labels: &event.labels,
        attributes: &event.attributes,
        received_at: chrono::DateTime::from_timestamp_nanos(event.received_at_ns)
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        points: points
            .iter()
            .map(|(key, ts, value)| PointMessage {
                key,
                ts: nanos_to_millis(*ts),
                value,
            })
            .collect(),
    };
    serde_json::to_string(&message).expect("a telemetry message serializes")
}

pub(crate) fn alarm_message(event: &AlarmEvent) -> String {
    let message = AlarmMessage {
        kind: "alarm",
        change: event.change,
        device_id: event.device_id,
        alarm: &event.alarm,
    };
    serde_json::to_string(&message).expect("an alarm message serializes")
}

fn lagged_message(missed: u64) -> String {
    json!({"type": "lagged", "missed": missed}).to_string()
}

/// One message for the client, rendered.
struct Outgoing {
    /// The SSE event name: `telemetry`, `alarm` or `lagged`.
    kind: &'static str,
    json: String,
}

// ----------------------------------------------------------- subscription ---

/// The transport-independent part of one stream: its tenant, filter and
/// place on the bus.
struct Subscription {
    state: Arc<AppState>,
    tenant_id: TenantId,
    filter: LiveFilter,
    receiver: broadcast::Receiver<Arc<LiveEvent>>,
    transport: Transport,
    /// Revocation events that end the stream.
    revocation: RevocationWatch,
    /// The API key hash, checked again after missed revocation events;
    /// `None` for a user's access token.
    credential: Option<HeldCredential>,
}

/// The reason a stream must end after a revocation signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RevokedEnd {
    /// The credential no longer grants access.
    Revoked,
    /// Revocation events were missed and the credential cannot be checked
    /// again here.
    MissedEvents,
}

impl Subscription {
    fn new(
        state: Arc<AppState>,
        tenant_id: TenantId,
        filter: LiveFilter,
        transport: Transport,
        revocation: RevocationWatch,
        credential: Option<HeldCredential>,
    ) -> Self {
        let receiver = state.live.subscribe();
        Subscription {
            state,
            tenant_id,
            filter,
            receiver,
            transport,
            revocation,
            credential,
        }
    }

    /// Decides on a revocation signal: `Some` ends the stream.
    async fn on_revocation_signal(&mut self, signal: Signal) -> Option<RevokedEnd> {
        match signal {
            Signal::Revoked(event) => {
                tracing::info!(%event, "ending a live stream whose credential was revoked");
                Some(RevokedEnd::Revoked)
            }
            Signal::Lagged => {
                let Some(credential) = &self.credential else {
                    return Some(RevokedEnd::MissedEvents);
                };
                match self.state.auth.recheck(credential).await {
                    Ok(_) => None,
                    Err(crate::auth::AuthError::Metadata(error)) => {
                        tracing::warn!(%error, "cannot check the API key of a live stream again: the metadata store failed");
                        None
                    }
                    Err(_) => Some(RevokedEnd::Revoked),
                }
            }
        }
    }

    /// Turns the result of one `receiver.recv()` into a message, or `None`
    /// when the event does not pass. Receiving stays outside so that the
    /// transports can await it in `select!`, where it is cancel-safe.
    async fn prepare(&mut self, received: Result<Arc<LiveEvent>, RecvError>) -> Option<Outgoing> {
        let event = match received {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                count_dropped(self.transport, missed);
                return Some(Outgoing {
                    kind: "lagged",
                    json: lagged_message(missed),
                });
            }
            // The bus lives as long as the server state that this holds.
            Err(RecvError::Closed) => return None,
        };
        if event.tenant_id() != self.tenant_id {
            return None;
        }
        // The cheap checks come first, so that the label lookup only runs
        // for events that can still pass.
        match event.as_ref() {
            LiveEvent::Telemetry(telemetry) => {
                let candidate = self.filter.telemetry
                    && self.filter.matches_device(telemetry.device_id)
                    && self.filter.matches_profile(telemetry.profile_id);
                if !candidate {
                    return None;
                }
                let labels = self.device_labels(telemetry.device_id).await;
                let points = self.filter.telemetry_points(telemetry, &labels)?;
                Some(Outgoing {
                    kind: "telemetry",
                    json: telemetry_message(telemetry, &points),
                })
            }
            LiveEvent::Alarm(alarm) => {
                if !self.filter.passes_alarm(alarm) {
                    return None;
                }
                let labels = self.device_labels(alarm.device_id).await;
                self.filter.matches_labels(&labels).then(|| Outgoing {
                    kind: "alarm",
                    json: alarm_message(alarm),
                })
            }
        }
    }

    /// Returns the device's labels for a `label` filter, and none without
    /// one. They come from the device cache that the pipeline uses, with
    /// the labels written since the last metadata update on top.
    async fn device_labels(&self, device: DeviceId) -> Labels {
        if self.filter.labels.is_empty() {
            return Labels::new();
        }
        let mut labels = match self.state.directory.device(device).await {
            Ok(Some(found)) => Labels::clone(&found.labels),
            Ok(None) => Labels::new(),
            Err(error) => {
                tracing::debug!(%error, %device, "cannot read a device's labels for a live filter");
                Labels::new()
            }
        };
        if let Some(pending) = self.state.pending_labels.lock().get(&device) {
            labels.extend(pending.clone());
        }
        labels
    }

    /// Applies a WebSocket `subscribe` message and returns the reply.
    async fn apply_subscribe_message(&mut self, text: &str) -> String {
        let parsed = match FilterFields::from_subscribe_message(text) {
            Ok(fields) => build_filter(&self.state, self.tenant_id, &fields).await,
            Err(error) => Err(error),
        };
        match parsed {
            Ok(filter) => {
                let reply = json!({"type": "subscribed", "filter": filter_json(&filter)});
                self.filter = filter;
                reply.to_string()
            }
            Err(error) => error_message(&error),
        }
    }
}

/// Renders an error for a WebSocket client; the stream goes on unchanged.
fn error_message(error: &ApiError) -> String {
    json!({"type": "error", "param": error.param, "message": error.detail}).to_string()
}

/// Parses the request into a subscription: credentials, then the filter.
async fn open_subscription(
    state: Arc<AppState>,
    headers: &HeaderMap,
    from_header: Result<Principal, ApiError>,
    params: &Params,
    transport: Transport,
) -> Result<Subscription, ApiError> {
    // Subscribed before the credential is checked, so that no revocation
    // in between is missed.
    let revocations = state.auth.revocations().subscribe();
    let (principal, bearer) = authenticate(&state, headers, from_header, params).await?;
    let fields = FilterFields::from_query(params)?;
    let filter = build_filter(&state, principal.tenant_id, &fields).await?;
    let credential = bearer
        .as_deref()
        .filter(|token| is_api_key(token))
        .map(HeldCredential::api_key);
    let held = match &credential {
        Some(credential) => {
            let identity = crate::auth::Identity::Principal(principal.clone());
            state.auth.held_access(credential, &identity).await
        }
        None => principal.held_access(bearer.as_deref()),
    };
    Ok(Subscription::new(
        state,
        principal.tenant_id,
        filter,
        transport,
        RevocationWatch::new(revocations, held),
        credential,
    ))
}

// -------------------------------------------------------------- WebSocket ---

/// `GET /api/v1/live/ws`: a WebSocket of live events.
async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    from_header: Result<Principal, ApiError>,
    Query(params): Query<Params>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let subscription =
        open_subscription(state, &headers, from_header, &params, Transport::WebSocket).await?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            "WebSocket upgrade required",
            format!(
                "{}; connect with a WebSocket client, or read GET /api/v1/live/sse as server-sent events",
                rejection.body_text()
            ),
        )
    })?;
    let span =
        tracing::debug_span!("live", transport = "websocket", tenant_id = %subscription.tenant_id);
    Ok(upgrade
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        .max_frame_size(MAX_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |socket| run_websocket(socket, subscription).instrument(span))
        .into_response())
}

/// The reason a WebSocket stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WebSocketEnd {
    /// The client closed the connection or it failed.
    ClientGone,
    ServerShutdown,
    /// A message waited [`SEND_TIMEOUT`] for the client's socket.
    ClientNotReading,
    /// The previous ping got no pong.
    NoPong,
    Revoked(RevokedEnd),
}

async fn run_websocket(socket: WebSocket, mut subscription: Subscription) {
    let _gauge = SubscriberGauge::open(Transport::WebSocket);
    tracing::debug!("live WebSocket stream opened");
    let closed = subscription.state.live.closed().clone();
    let (mut sink, mut incoming) = socket.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut pong_due = false;

    let end = loop {
        // Replies and pings are not events, so only events are counted.
        let mut is_event = false;
        let outgoing = tokio::select! {
            () = closed.cancelled() => break WebSocketEnd::ServerShutdown,
            message = incoming.next() => match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break WebSocketEnd::ClientGone,
                Some(Ok(Message::Pong(_))) => {
                    pong_due = false;
                    continue;
                }
                // tungstenite sends the pong itself.
                Some(Ok(Message::Ping(_))) => continue,
                Some(Ok(Message::Text(text))) => {
                    Message::text(subscription.apply_subscribe_message(text.as_str()).await)
                }
                Some(Ok(Message::Binary(_))) => Message::text(error_message(
                    &ApiError::invalid_param(
                        "subscribe",
                        "binary messages are not supported; send the subscribe message as JSON text",
                    ),
                )),
            },
            signal = subscription.revocation.next() => {
                match subscription.on_revocation_signal(signal).await {
                    Some(end) => break WebSocketEnd::Revoked(end),
                    None => continue,
                }
            },
            _ = ping.tick() => {
                if pong_due {
                    break WebSocketEnd::NoPong;
                }
                pong_due = true;
                Message::Ping(Default::default())
            },
            received = subscription.receiver.recv() => {
                match subscription.prepare(received).await {
                    Some(outgoing) => {
                        is_event = outgoing.kind != "lagged";
                        Message::text(outgoing.json)
                    }
                    None => continue,
                }
            },
        };

        // Each send flushes, so tungstenite buffers at most this message.
        match tokio::time::timeout(SEND_TIMEOUT, sink.send(outgoing)).await {
            Ok(Ok(())) => {
                if is_event {
                    count_sent(Transport::WebSocket);
                }
            }
            Ok(Err(_)) => break WebSocketEnd::ClientGone,
            Err(_) => break WebSocketEnd::ClientNotReading,
        }
    };

    let close = match end {
        WebSocketEnd::ClientGone => None,
        WebSocketEnd::ServerShutdown => Some((1001, "the server is shutting down")),
        WebSocketEnd::ClientNotReading => {
            tracing::warn!(
                timeout = ?SEND_TIMEOUT,
                "closed a live WebSocket stream whose client stopped reading"
            );
            Some((1008, "the client did not read for 10 s"))
        }
        WebSocketEnd::NoPong => Some((1008, "no pong within 30 s")),
        WebSocketEnd::Revoked(RevokedEnd::Revoked) => Some((
            1008,
            "the credential was revoked, or its user or tenant deleted",
        )),
        WebSocketEnd::Revoked(RevokedEnd::MissedEvents) => Some((
            1008,
            "revocation events were missed; connect again to check the credential",
        )),
    };
    if let Some((code, reason)) = close {
        send_close(&mut sink, code, reason).await;
    }
    tracing::debug!(?end, "live WebSocket stream ended");
}

/// Sends a close frame, waiting at most one second: a client that does not
/// read gets the TCP connection closed without it.
async fn send_close(sink: &mut SplitSink<WebSocket, Message>, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(frame))),
    )
    .await;
}

// -------------------------------------------------------- server-sent events ---

/// `GET /api/v1/live/sse`: live events as server-sent events.
async fn sse(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    from_header: Result<Principal, ApiError>,
    Query(params): Query<Params>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let subscription =
        open_subscription(state, &headers, from_header, &params, Transport::Sse).await?;
    let (sender, mut receiver) = mpsc::channel(SSE_QUEUE);
    let span = tracing::debug_span!("live", transport = "sse", tenant_id = %subscription.tenant_id);
    tokio::spawn(run_sse(subscription, sender).instrument(span));

    // The stream ends when `run_sse` drops the sender, which ends the
    // response.
    let events = futures::stream::poll_fn(move |context| receiver.poll_recv(context)).map(Ok);
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE).text("keep-alive")))
}

/// Feeds one SSE response until the client goes away, stops reading or the
/// server shuts down.
async fn run_sse(mut subscription: Subscription, sender: mpsc::Sender<Event>) {
    let _gauge = SubscriberGauge::open(Transport::Sse);
    tracing::debug!("live SSE stream opened");
    let closed = subscription.state.live.closed().clone();
    let mut next_id: u64 = 1;

    loop {
        let received = tokio::select! {
            () = closed.cancelled() => break,
            // The HTTP connection dropped the response body.
            () = sender.closed() => break,
            received = subscription.receiver.recv() => received,
            signal = subscription.revocation.next() => {
                match subscription.on_revocation_signal(signal).await {
                    Some(end) => {
                        tracing::debug!(?end, "live SSE stream ended by revocation");
                        break;
                    }
                    None => continue,
                }
            }
        };
        let Some(outgoing) = subscription.prepare(received).await else {
            continue;
        };
        let event = Event::default()
            .event(outgoing.kind)
            .id(next_id.to_string())
            .data(outgoing.json);
        next_id += 1;
        match sender.send_timeout(event, SEND_TIMEOUT).await {
            Ok(()) => {
                if outgoing.kind != "lagged" {
                    count_sent(Transport::Sse);
                }
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => break,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                // NOTE: hyper has no write timeout, so the connection of a
                // client that never reads stays open until the client reads
                // or disconnects. Its buffers are bounded, and this stream's
                // task and bus receiver end here.
                tracing::warn!(
                    timeout = ?SEND_TIMEOUT,
                    "ended a live SSE stream whose client stopped reading"
                );
                break;
            }
        }
    }
    tracing::debug!("live SSE stream ended");
}

#[cfg(test)]
mod tests {
    //! The endpoints behind the real HTTP listener on a loopback port, with
    //! events published straight to the bus.

    use std::net::SocketAddr;
    use std::sync::atomic::AtomicBool;

    use serde_json::Value as Json;
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
    use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::auth::Auth;
    use crate::config::Config;
    use crate::metadata::SqliteMetadata;
    use crate::store::{EmbeddedStore, TimeSeriesStore};

    /// Maximum wait for one expected message.
    const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

    type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

    struct TestServer {
        state: Arc<AppState>,
        addr: SocketAddr,
        tenant_id: TenantId,
        /// A viewer API key of the tenant.
        key: String,
        shutdown: CancellationToken,
        serve: tokio::task::JoinHandle<()>,
        _log: crate::ingest::LogControl,
        _dir: tempfile::TempDir,
    }

    async fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        let metadata = Arc::new(SqliteMetadata::open(dir.path()).await.expect("metadata"));
        let auth = Arc::new(
            Auth::open(
                dir.path(),
                metadata.clone(),
                &crate::config::AuthConfig::default(),
            )
            .expect("auth"),
        );
        let store: Arc<dyn TimeSeriesStore> = Arc::new(
            EmbeddedStore::open(&dir.path().join("tsdb"), &config.storage).expect("store"),
        );
        let keyring = Arc::new(
            crate::encryption::Keyring::load(
                crate::encryption::MasterKeySource::Files {
                    data_dir: dir.path().to_owned(),
                },
                metadata.clone(),
                true,
            )
            .await
            .expect("keyring"),
        );
        let crate::ingest::OpenedLog {
            handle: ingest,
            control: log,
            ..
        } = crate::ingest::open(&config, store.durable_marker(), Some(keyring.clone()))
            .await
            .expect("ingest log");

        let live = crate::live::LiveBus::default();
        let directory = Arc::new(crate::profiles::Directory::new(metadata.clone()));
        let mqtt_router = crate::adapters::mqtt::Router::new(&config.mqtt);
        let actions = crate::actions::Actions::start(
            &config.actions,
            metadata.clone(),
            keyring.clone(),
            mqtt_router.clone(),
        )
        .expect("actions");
        let seen = crate::pipeline::SeenDevices::default();
        let (alarms, _signals, _alarm_queue) = crate::alarms::AlarmManager::open(
            metadata.clone(),
            directory.clone(),
            live.clone(),
            actions.clone(),
            seen.clone(),
        )
        .await
        .expect("alarm manager");

        let tenant = metadata.default_tenant().await.expect("tenant");
        let key = crate::auth::generate_api_key();
        metadata
            .create_api_key(
                tenant.id,
                "live-test",
                Role::Viewer,
                &crate::auth::hash_secret(&key),
            )
            .await
            .expect("API key");

        let mqtt = crate::adapters::mqtt::MqttServer::new(
            Arc::new(crate::adapters::mqtt::MqttContext {
                config: config.mqtt.clone(),
                auth: auth.clone(),
                ingest: ingest.clone(),
                max_future: config.ingest.max_future,
                max_past: config.ingest.max_past,
                storage: config.storage.clone(),
                directory: directory.clone(),
                live: live.clone(),
                metadata: metadata.clone(),
                limits: crate::limits::Limits::new(&config.limits),
            }),
            mqtt_router.clone(),
            CancellationToken::new(),
        );
        let lorawan_integrations =
            Arc::new(crate::adapters::lorawan_integrations::IntegrationContext {
                metadata: metadata.clone(),
                ingest: ingest.clone(),
                seen: seen.clone(),
                recent: Default::default(),
            });
        let limits = crate::limits::Limits::new(&config.limits);
        let state = Arc::new(AppState {
            lorawan_integrations,
            config,
            auth,
            metadata,
            store,
            flush_requests: Default::default(),
            ingest,
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
            ready: AtomicBool::new(true),
            seen,
            pending_labels: Default::default(),
            device_names: Default::default(),
            live,
            directory,
            alarms,
            mqtt,
            device_socket_slots: Arc::new(tokio::sync::Semaphore::new(1)),
            mqtt_router,
            actions,
            keyring,
            dtls_credentials: Default::default(),
            device_trust: None,
            limits,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let serve = tokio::spawn(crate::adapters::http::serve(
            Some(listener),
            None,
            state.clone(),
            shutdown.clone(),
        ));
        TestServer {
            state,
            addr,
            tenant_id: tenant.id,
            key,
            shutdown,
            serve,
            _log: log,
            _dir: dir,
        }
    }

    impl TestServer {
        async fn create_device(&self, name: &str) -> DeviceId {
            let token = crate::auth::generate_device_token();
            self.state
                .metadata
                .create_device(self.tenant_id, name, &crate::auth::hash_secret(&token))
                .await
                .expect("device")
                .id
        }

        async fn connect(&self, query: &str) -> Client {
            self.try_connect(query, Some(&self.key))
                .await
                .expect("WebSocket connection")
        }

        async fn try_connect(
            &self,
            query: &str,
            token: Option<&str>,
        ) -> Result<Client, tungstenite::Error> {
            let mut request = format!("ws://{}/api/v1/live/ws{query}", self.addr)
                .into_client_request()
                .expect("request");
            if let Some(token) = token {
                request.headers_mut().insert(
                    header::AUTHORIZATION,
                    format!("Bearer {token}").parse().expect("header"),
                );
            }
            tokio_tungstenite::connect_async(request)
                .await
                .map(|(client, _)| client)
        }

        async fn get_sse(&self, query: &str, token: Option<&str>) -> reqwest::Response {
            let mut request =
                reqwest::Client::new().get(format!("http://{}/api/v1/live/sse{query}", self.addr));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            request.send().await.expect("SSE request")
        }

        fn publish_telemetry(&self, tenant: TenantId, device: DeviceId, keys: &[&str]) {
            self.state
                .live
                .publish(telemetry_event(tenant, device, keys));
        }
    }

    fn telemetry_event(tenant: TenantId, device: DeviceId, keys: &[&str]) -> LiveEvent {
        LiveEvent::Telemetry(TelemetryEvent {
            tenant_id: tenant,
            device_id: device,
            device_name: Arc::from("pump-7"),
            profile_id: None,
            profile_name: None,
            labels: Arc::default(),
            attributes: Arc::default(),
            received_at_ns: 1_767_225_600_123_000_000,
            points: keys
                .iter()
                .enumerate()
                .map(|(index, key)| {
                    (
                        key.to_string(),
                        1_767_225_600_000_000_000,
                        Value::Int(index as i64),
                    )
                })
                .collect(),
        })
    }

    fn alarm_event(tenant: TenantId, device: DeviceId) -> LiveEvent {
        LiveEvent::Alarm(AlarmEvent {
            tenant_id: tenant,
            device_id: device,
            profile_id: None,
            change: AlarmChange::Raised,
            alarm: Arc::new(json!({"severity": "major", "device_id": device})),
        })
    }

    /// Returns the next text message as JSON, skipping pings and pongs.
    async fn next_json(client: &mut Client) -> Json {
        loop {
            let message = tokio::time::timeout(RECEIVE_TIMEOUT, client.next())
                .await
                .expect("a message within the timeout")
                .expect("an open stream")
                .expect("a valid message");
            match message {
                WsMessage::Text(text) => return serde_json::from_str(&text).expect("JSON message"),
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    async fn send_json(client: &mut Client, message: Json) {
        client
            .send(WsMessage::text(message.to_string()))
            .await
            .expect("send");
    }

    /// One parsed server-sent event.
    #[derive(Debug, Default)]
    struct SseEvent {
        event: String,
        id: String,
        data: String,
    }

    /// Reads events from an SSE response body, skipping comments.
    struct SseReader {
        response: reqwest::Response,
        buffer: String,
    }

    impl SseReader {
        async fn next_event(&mut self) -> Option<SseEvent> {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let block: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent::default();
                    for line in block.lines() {
                        if let Some((field, value)) = line.split_once(':') {
                            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
                            match field {
                                "event" => event.event = value,
                                "id" => event.id = value,
                                "data" => event.data = value,
                                _ => {}
                            }
                        }
                    }
                    if !event.data.is_empty() {
                        return Some(event);
                    }
                    continue;
                }
                let chunk = tokio::time::timeout(RECEIVE_TIMEOUT, self.response.chunk())
                    .await
                    .expect("SSE data within the timeout")
                    .expect("SSE body");
                self.buffer
                    .push_str(std::str::from_utf8(&chunk?).expect("UTF-8"));
            }
        }
    }

    async fn problem(response: reqwest::Response) -> (u16, Json) {
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Json::Null))
    }

    #[tokio::test]
    async fn websocket_streams_only_own_tenant() {
        let server = start().await;
        let device = server.create_device("pump-7").await;
        let mut client = server.connect("").await;

        let other_tenant = TenantId::new_random();
        server.publish_telemetry(other_tenant, device, &["temperature"]);
        server.publish_telemetry(server.tenant_id, device, &["temperature", "humidity"]);

        let message = next_json(&mut client).await;
        assert_eq!(message["type"], "telemetry");
        assert_eq!(message["device_id"], device.to_string());
        assert_eq!(message["device_name"], "pump-7");
        assert_eq!(message["profile"], Json::Null);
        assert_eq!(message["labels"], json!({}));
        assert_eq!(message["received_at"], "2026-01-01T00:00:00.123Z");
        assert_eq!(
            message["points"],
            json!([
                {"key": "temperature", "ts": 1_767_225_600_000_i64, "value": 0},
                {"key": "humidity", "ts": 1_767_225_600_000_i64, "value": 1},
            ])
        );
    }

    #[tokio::test]
    async fn sse_names_and_numbers_events() {
        let server = start().await;
        let device = server.create_device("pump-7").await;
        let response = server.get_sse("", Some(&server.key)).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut reader = SseReader {
            response,
            buffer: String::new(),
        };

        server.publish_telemetry(TenantId::new_random(), device, &["temperature"]);
        server.publish_telemetry(server.tenant_id, device, &["temperature"]);
        server
            .state
            .live
            .publish(alarm_event(server.tenant_id, device));

        let telemetry = reader.next_event().await.expect("telemetry event");
        assert_eq!(telemetry.event, "telemetry");
        assert_eq!(telemetry.id, "1");
        let data: Json = serde_json::from_str(&telemetry.data).expect("JSON");
        assert_eq!(data["type"], "telemetry");
        assert_eq!(data["points"][0]["key"], "temperature");

        let alarm = reader.next_event().await.expect("alarm event");
        assert_eq!(alarm.event, "alarm");
        assert_eq!(alarm.id, "2");
        let data: Json = serde_json::from_str(&alarm.data).expect("JSON");
        assert_eq!(data["type"], "alarm");
        assert_eq!(data["change"], "raised");
        assert_eq!(data["device_id"], device.to_string());
        assert_eq!(data["alarm"]["severity"], "major");
    }

    #[tokio::test]
    async fn credentials_are_checked_first() {
        let server = start().await;
        let device_token = crate::auth::generate_device_token();
        let key = server.key.clone();
        let cases: [(&str, Option<&str>, u16); 6] = [
            ("", None, 401),
            ("", Some("fak_not-a-key"), 401),
            ("", Some("not.a.jwt"), 401),
            ("", Some(&device_token), 403),
            (&format!("?access_token={key}"), None, 200),
            (&format!("?access_token={key}"), Some(&key), 400),
        ];
        for (query, token, expected) in cases {
            let response = server.get_sse(query, token).await;
            if expected == 200 {
                // The body of an open stream never ends.
                assert_eq!(response.status(), 200, "SSE {query:?}");
            } else {
                let (status, body) = problem(response).await;
                assert_eq!(status, expected, "SSE {query:?} {token:?}: {body}");
            }

            let outcome = server.try_connect(query, token).await;
            match (outcome, expected) {
                (Ok(_), 200) => {}
                (Err(tungstenite::Error::Http(response)), _) => {
                    assert_eq!(response.status().as_u16(), expected, "WebSocket {query:?}");
                }
                (other, _) => panic!("WebSocket {query:?}: expected {expected}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn bad_filters_get_400_naming_the_parameter() {
        let server = start().await;
        let unknown_device = DeviceId::new_random();
        let cases = [
            ("?colour=red".to_owned(), "query", 400),
            ("?device=pump-7".to_owned(), "device", 400),
            // Ids of no device of the caller's tenant get 404, as ids of
            // other tenants do.
            (format!("?device={unknown_device}"), "device", 404),
            ("?key=te*mp".to_owned(), "key", 400),
            ("?key=".to_owned(), "key", 400),
            ("?events=metrics".to_owned(), "events", 400),
            ("?events=,".to_owned(), "events", 400),
            ("?label=site".to_owned(), "label", 400),
            ("?profile=a&profile=b".to_owned(), "profile", 400),
            ("?profile=no-such-profile".to_owned(), "profile", 404),
            (
                format!("?profile={}", ProfileId::new_random()),
                "profile",
                404,
            ),
        ];
        for (query, param, expected) in cases {
            let (status, body) = problem(server.get_sse(&query, Some(&server.key)).await).await;
            assert_eq!(status, expected, "SSE {query}: {body}");
            assert_eq!(body["param"], param, "SSE {query}: {body}");

            match server.try_connect(&query, Some(&server.key)).await {
                Err(tungstenite::Error::Http(response)) => {
                    assert_eq!(response.status(), expected, "WebSocket {query}");
                }
                other => panic!("WebSocket {query}: expected {expected}, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn plain_get_on_websocket_path_gets_problem() {
        let server = start().await;
        let response = reqwest::Client::new()
            .get(format!("http://{}/api/v1/live/ws", server.addr))
            .bearer_auth(&server.key)
            .send()
            .await
            .expect("request");
        let (status, body) = problem(response).await;
        assert!((400..500).contains(&status), "{status}: {body}");
        let detail = body["detail"].as_str().expect("detail");
        assert!(detail.contains("/api/v1/live/sse"), "{detail}");
    }

    #[tokio::test]
    async fn device_and_key_filters_apply() {
        let server = start().await;
        let wanted = server.create_device("pump-1").await;
        let other = server.create_device("pump-2").await;
        let mut client = server.connect(&format!("?device={wanted}&key=temp*")).await;

        server.publish_telemetry(server.tenant_id, other, &["temperature"]);
        server.publish_telemetry(server.tenant_id, wanted, &["humidity"]);
        server.publish_telemetry(server.tenant_id, wanted, &["humidity", "temp.inner"]);

        let message = next_json(&mut client).await;
        assert_eq!(message["device_id"], wanted.to_string());
        assert_eq!(
            message["points"],
            json!([{"key": "temp.inner", "ts": 1_767_225_600_000_i64, "value": 1}])
        );
    }

    #[tokio::test]
    async fn label_filter_uses_device_labels() {
        let server = start().await;
        let north = server.create_device("pump-north").await;
        let south = server.create_device("pump-south").await;
        let unlabelled = server.create_device("pump-unlabelled").await;
        let site = |value: &str| Labels::from([("site".to_owned(), value.to_owned())]);
        server
            .state
            .metadata
            .merge_labels(&[(north, site("north")), (south, site("south"))])
            .await
            .expect("labels");
        let mut client = server.connect("?label=site:north").await;

        for device in [unlabelled, south, north] {
            server
                .state
                .live
                .publish(alarm_event(server.tenant_id, device));
        }
        let message = next_json(&mut client).await;
        assert_eq!(message["type"], "alarm");
        assert_eq!(message["device_id"], north.to_string());

        // Labels written since the last metadata update count too.
        server
            .state
            .pending_labels
            .lock()
            .insert(unlabelled, site("north"));
        server.publish_telemetry(server.tenant_id, south, &["temperature"]);
        server.publish_telemetry(server.tenant_id, unlabelled, &["temperature"]);
        let message = next_json(&mut client).await;
        assert_eq!(message["type"], "telemetry");
        assert_eq!(message["device_id"], unlabelled.to_string());
    }

    #[tokio::test]
    async fn subscribe_message_replaces_filter() {
        let server = start().await;
        let first = server.create_device("pump-1").await;
        let second = server.create_device("pump-2").await;
        let mut client = server.connect("").await;

        send_json(
            &mut client,
            json!({"subscribe": {"device": second.to_string(), "events": ["telemetry"]}}),
        )
        .await;
        let reply = next_json(&mut client).await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["filter"]["device"], json!([second.to_string()]));
        assert_eq!(reply["filter"]["events"], json!(["telemetry"]));

        server.publish_telemetry(server.tenant_id, first, &["temperature"]);
        server.publish_telemetry(server.tenant_id, second, &["temperature"]);
        let message = next_json(&mut client).await;
        assert_eq!(message["device_id"], second.to_string());

        let invalid = [
            (json!({"subscribe": {"key": "a*b"}}), "key"),
            (json!({"subscribe": {"colour": "red"}}), "subscribe"),
            (json!({"subscribe": {"device": 7}}), "subscribe"),
            (json!({"unsubscribe": {}}), "subscribe"),
            (
                json!({"subscribe": {"device": DeviceId::new_random()}}),
                "device",
            ),
        ];
        for (message, param) in invalid {
            send_json(&mut client, message.clone()).await;
            let reply = next_json(&mut client).await;
            assert_eq!(reply["type"], "error", "{message}: {reply}");
            assert_eq!(reply["param"], param, "{message}: {reply}");
        }
        client
            .send(WsMessage::text("not JSON"))
            .await
            .expect("send");
        assert_eq!(next_json(&mut client).await["type"], "error");

        // The filter from before the errors still applies.
        server.publish_telemetry(server.tenant_id, first, &["temperature"]);
        server.publish_telemetry(server.tenant_id, second, &["humidity"]);
        let message = next_json(&mut client).await;
        assert_eq!(message["device_id"], second.to_string());
        assert_eq!(message["points"][0]["key"], "humidity");
    }

    /// Publishes more events than the bus keeps before the stream task can
    /// run, which the single-threaded test runtime guarantees.
    #[tokio::test]
    async fn lagging_stream_reports_missed_events() {
        let server = start().await;
        let device = server.create_device("pump-7").await;
        let mut client = server.connect("").await;
        let response = server.get_sse("", Some(&server.key)).await;
        let mut reader = SseReader {
            response,
            buffer: String::new(),
        };

        let extra = 5;
        for _ in 0..crate::live::LIVE_BUS_CAPACITY + extra {
            server.publish_telemetry(server.tenant_id, device, &["temperature"]);
        }

        let notice = next_json(&mut client).await;
        assert_eq!(notice, json!({"type": "lagged", "missed": extra}));
        assert_eq!(next_json(&mut client).await["type"], "telemetry");

        let notice = reader.next_event().await.expect("lagged event");
        assert_eq!(notice.event, "lagged");
        let data: Json = serde_json::from_str(&notice.data).expect("JSON");
        assert_eq!(data, json!({"type": "lagged", "missed": extra}));
        assert_eq!(
            reader.next_event().await.expect("telemetry").event,
            "telemetry"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_open_streams() {
        let server = start().await;
        let mut client = server.connect("").await;
        let mut reader = SseReader {
            response: server.get_sse("", Some(&server.key)).await,
            buffer: String::new(),
        };

        server.shutdown.cancel();
        server.state.live.close();
        // The listener's drain timeout is 30 s; open streams would hold it.
        tokio::time::timeout(Duration::from_secs(5), server.serve)
            .await
            .expect("the HTTP listener stops within 5 s")
            .expect("serve task");

        let close = tokio::time::timeout(RECEIVE_TIMEOUT, client.next())
            .await
            .expect("a close frame within the timeout");
        match close {
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
        assert!(reader.next_event().await.is_none(), "the SSE body ends");
    }

    /// Takes SEND_TIMEOUT (10 s): the clients never read, so the server's
    /// writes block until the timeout closes both streams.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_that_stops_reading_is_dropped() {
        let server = start().await;
        let device = server.create_device("pump-7").await;
        let _client = server.connect("").await;
        let _response = server.get_sse("", Some(&server.key)).await;

        // 160 events of 256 KiB are 40 MiB, more than the loopback socket
        // buffers take.
        let big = "x".repeat(256 * 1024);
        for _ in 0..160 {
            server
                .state
                .live
                .publish(LiveEvent::Telemetry(TelemetryEvent {
                    points: vec![("blob".into(), 0, Value::Str(big.clone()))],
                    ..match telemetry_event(server.tenant_id, device, &[]) {
                        LiveEvent::Telemetry(event) => event,
                        LiveEvent::Alarm(_) => unreachable!(),
                    }
                }));
        }

        let deadline = tokio::time::Instant::now() + SEND_TIMEOUT + Duration::from_secs(10);
        while server.state.live.has_subscribers() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the streams of clients that do not read are still open"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[test]
    fn points_render_like_rest_queries() {
        let values = [
            Value::Float(21.5),
            Value::Float(f64::NAN),
            Value::Int(-3),
            Value::Bool(true),
            Value::Str("open".into()),
        ];
        for value in values {
            let point = PointMessage {
                key: "k",
                ts: 1_000,
                value: &value,
            };
            let mut rendered = serde_json::to_value(&point).expect("point");
            rendered.as_object_mut().expect("object").remove("key");
            assert_eq!(
                rendered,
                super::super::telemetry::point_json(1_000_000_000, &value),
                "{value:?}"
            );
        }
    }

    #[test]
    fn key_patterns_parse() {
        assert_eq!(
            parse_key_pattern("temp*").unwrap(),
            KeyPattern::Prefix("temp".into())
        );
        assert_eq!(
            parse_key_pattern("*").unwrap(),
            KeyPattern::Prefix("".into())
        );
        assert_eq!(
            parse_key_pattern(" humidity ").unwrap(),
            KeyPattern::Exact("humidity".into())
        );
        for bad in ["", " ", "*temp", "te*mp", "**"] {
            assert!(parse_key_pattern(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn event_types_parse() {
        let parse = |values: &[&str]| {
            parse_event_types(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
        };
        assert_eq!(parse(&[]).unwrap(), (true, true));
        assert_eq!(parse(&["telemetry"]).unwrap(), (true, false));
        assert_eq!(parse(&["alarms"]).unwrap(), (false, true));
        assert_eq!(parse(&["telemetry,alarms"]).unwrap(), (true, true));
        assert_eq!(parse(&["alarms", "telemetry"]).unwrap(), (true, true));
        for bad in [&["alarm"][..], &[""], &["telemetry,metrics"]] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn profile_given_once_and_not_empty() {
        assert_eq!(profile_reference(&["pump".into()]).unwrap(), Some("pump"));
        assert_eq!(profile_reference(&[]).unwrap(), None);
        assert!(profile_reference(&[" ".into()]).is_err());
        assert!(profile_reference(&["a".into(), "b".into()]).is_err());
    }

    #[test]
    fn too_many_filter_values_are_rejected() {
        let fields = FilterFields {
            key: vec!["k".into(); MAX_FILTER_VALUES + 1],
            ..FilterFields::default()
        };
        let error = fields.parse().unwrap_err();
        assert_eq!(error.param, Some("key"));
    }
}
