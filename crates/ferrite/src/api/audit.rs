//! The audit log over HTTP: the layer that records every mutating API
//! call, and the endpoints that list, export and verify the records.
//!
//! Every POST, PUT, PATCH and DELETE of the REST API that carries a valid
//! credential is recorded after the handler ran, with its outcome, before
//! the response goes out. Requests without a valid credential are not
//! recorded (they changed nothing and anyone could fill the log with
//! them), except logins, which `login` records itself, failed or not.
//! Reads (GET) are not recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{
    ConnectInfo, FromRequestParts, MatchedPath, Query, RawPathParams, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::ApiError;
use super::time::parse_time;
use crate::auth::{Principal, Subject};
use crate::metadata::audit::{AuditFilter, AuditRecord, NewAuditRecord, chain_of};
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;

/// Records per page of `GET /api/v1/audit` when the request has no `limit`.
const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// Records read per query while streaming an export.
const EXPORT_PAGE: i64 = 1000;

/// Largest response body the layer reads to find the id of a created
/// object; larger bodies are passed on without it.
const MAX_INSPECTED_BODY: usize = 256 * 1024;

/// Maximum length of a user agent kept in a record, in bytes.
const MAX_USER_AGENT_LEN: usize = 256;

/// Response fields copied into a record's detail. Responses may contain
/// secrets (tokens, keys), so only these named, harmless fields are taken.
const DETAIL_FIELDS: [&str; 4] = ["name", "role", "email", "dev_eui"];

const LIST_PARAMS: [&str; 6] = ["from", "to", "actor", "action", "before", "limit"];
const EXPORT_PARAMS: [&str; 5] = ["from", "to", "actor", "action", "format"];

/// Action name and target of a mutating route: method, route pattern,
/// action, target type, and the path parameter that names the target
/// (`None` when the response body contains the new object's `id`).
/// A route missing here is still recorded, named `"METHOD /path"`.
#[rustfmt::skip]
const ACTIONS: &[(&str, &str, &str, &str, Option<&str>)] = &[
    ("POST", "/api/v1/devices", "device.create", "device", None),
    ("PATCH", "/api/v1/devices/{id}", "device.update", "device", Some("id")),
    ("DELETE", "/api/v1/devices/{id}", "device.delete", "device", Some("id")),
    ("POST", "/api/v1/devices/{id}/token", "device.token.rotate", "device", Some("id")),
    ("DELETE", "/api/v1/devices/{id}/dead-letters", "dead_letters.delete", "device", Some("id")),
    ("POST", "/api/v1/devices/{id}/dead-letters/replay", "dead_letters.replay", "device", Some("id")),
    ("PUT", "/api/v1/devices/{id}/credentials/psk", "device.psk.set", "device", Some("id")),
    ("DELETE", "/api/v1/devices/{id}/credentials/psk", "device.psk.delete", "device", Some("id")),
    ("POST", "/api/v1/devices/{id}/credentials/certificates", "device.certificate.add", "device", Some("id")),
    ("DELETE", "/api/v1/devices/{id}/credentials/certificates/{fingerprint}", "device.certificate.delete", "device", Some("id")),
    ("POST", "/api/v1/devices/{id}/commands", "device.command.send", "device", Some("id")),
    ("PUT", "/api/v1/devices/{id}/lorawan", "lorawan.device.set", "device", Some("id")),
    ("DELETE", "/api/v1/devices/{id}/lorawan", "lorawan.device.delete", "device", Some("id")),
    ("POST", "/api/v1/devices/{id}/lorawan/downlinks", "lorawan.downlink.queue", "device", Some("id")),
    ("POST", "/api/v1/lorawan/gateways", "lorawan.gateway.create", "lorawan_gateway", None),
    ("DELETE", "/api/v1/lorawan/gateways/{eui}", "lorawan.gateway.delete", "lorawan_gateway", Some("eui")),
    ("POST", "/api/v1/profiles", "profile.create", "profile", None),
    ("POST", "/api/v1/profiles/import", "profile.import", "profile", None),
    ("POST", "/api/v1/profiles/test", "profile.test", "profile", None),
    ("PUT", "/api/v1/profiles/{id}", "profile.replace", "profile", Some("id")),
    ("DELETE", "/api/v1/profiles/{id}", "profile.delete", "profile", Some("id")),
    ("POST", "/api/v1/alarms/{id}/ack", "alarm.acknowledge", "alarm", Some("id")),
    ("POST", "/api/v1/alarms/{id}/clear", "alarm.clear", "alarm", Some("id")),
    ("POST", "/api/v1/api-keys", "api_key.create", "api_key", None),
    ("DELETE", "/api/v1/api-keys/{id}", "api_key.revoke", "api_key", Some("id")),
    ("POST", "/api/v1/actions/deliveries/{id}/retry", "action_delivery.retry", "action_delivery", Some("id")),
    ("POST", "/api/v1/actions/test", "action.test", "action_delivery", None),
    ("POST", "/api/v1/admin/compact", "store.compact", "store", None),
];

/// The caller of a request, as a record names it.
struct Actor {
    kind: &'static str,
    id: Option<String>,
    name: Option<String>,
}

async fn actor_of(state: &AppState, principal: &Principal) -> Actor {
    match &principal.subject {
        Subject::User(id) => Actor {
            kind: "user",
            id: Some(id.to_string()),
            // A failed lookup leaves the email out; the id is enough to
            // find the user.
            name: state.metadata.user_email(*id).await.ok().flatten(),
        },
        Subject::ApiKey(name) => Actor {
            kind: "api_key",
            id: None,
            name: Some(name.clone()),
        },
        Subject::ServiceAccount(id) => Actor {
            kind: "service_account",
            id: Some(id.to_string()),
            name: None,
        },
    }
}

/// The rejection of a request's credential by [`record_mutations`], for
/// the handler's [`Principal`] extractor.
#[derive(Clone)]
pub struct RejectedCredential(pub ApiError);

/// Source address and user agent of a request.
pub struct RequestOrigin {
    pub source: Option<String>,
    pub user_agent: Option<String>,
}

impl RequestOrigin {
    pub fn from_parts(headers: &HeaderMap, peer: Option<&ConnectInfo<SocketAddr>>) -> Self {
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .map(|text| truncate(text, MAX_USER_AGENT_LEN));
        Self {
            source: peer.map(|ConnectInfo(addr)| addr.to_string()),
            user_agent,
        }
    }
}

fn truncate(text: &str, max_len: usize) -> String {
    let mut end = text.len().min(max_len);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Returns the outcome of an HTTP status as a record names it.
pub fn outcome_of(status: StatusCode) -> &'static str {
    if status.is_success() || status.is_redirection() {
        "success"
    } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        "denied"
    } else {
        "failed"
    }
}

/// Appends a record, logging instead of failing: the action it describes
/// has already happened, so the caller still gets its response.
pub async fn append(state: &AppState, record: NewAuditRecord) {
    let action = record.action.clone();
    if let Err(error) = state.metadata.append_audit(record).await {
        metrics::counter!("ferrite_audit_write_errors_total").increment(1);
        tracing::error!(%error, action, "cannot write an audit record; the action was done but is not in the audit log");
    }
}

/// The layer on the REST API routes that records mutating requests.
///
/// It authenticates the request itself, so it has the actor even when
/// the handler rejects the call, and hands the [`Principal`] to the
/// handler through the request extensions.
pub async fn record_mutations(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let Some(route) = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
    else {
        return next.run(request).await;
    };
    if route == "/api/v1/auth/login" {
        // `login` records its own outcome with the email it was given.
        return next.run(request).await;
    }

    let (mut parts, body) = request.into_parts();
    let principal = match Principal::from_request_parts(&mut parts, &state).await {
        Ok(principal) => principal,
        Err(error) => {
            // The handler sees the same rejection without authenticating
            // again, so a bad key counts once towards the login throttle.
            parts.extensions.insert(RejectedCredential(error));
            return next.run(Request::from_parts(parts, body)).await;
        }
    };
    parts.extensions.insert(principal.clone());
    let origin = RequestOrigin::from_parts(&parts.headers, parts.extensions.get());
    let params: Vec<(String, String)> = RawPathParams::from_request_parts(&mut parts, &state)
        .await
        .map(|params| {
            params
                .iter()
                .map(|(name, value)| (name.to_owned(), value.to_owned()))
                .collect()
        })
        .unwrap_or_default();

    let response = next.run(Request::from_parts(parts, body)).await;

    let status = response.status();
    let entry = ACTIONS
        .iter()
        .find(|(row_method, row_route, ..)| *row_method == method.as_str() && *row_route == route);
    let (action, target_type, target_param) = match entry {
        Some((_, _, action, target_type, target_param)) => (
            (*action).to_owned(),
            Some((*target_type).to_owned()),
            *target_param,
        ),
        None => (format!("{method} {route}"), None, None),
    };

    let mut detail = serde_json::Map::new();
    let mut target_id = None;
    for (name, value) in &params {
        if Some(name.as_str()) == target_param {
            target_id = Some(value.clone());
        } else {
            detail.insert(name.clone(), Value::String(value.clone()));
        }
    }
    let response = if status.is_success() && target_param.is_none() {
        let (response, fields) = inspect_response(response).await;
        if let Some(Value::Object(fields)) = fields {
            target_id = fields.get("id").map(json_text);
            for name in DETAIL_FIELDS {
                if let Some(value) = fields.get(name) {
                    detail.insert(name.to_owned(), value.clone());
                }
            }
        }
        response
    } else {
        response
    };

    let actor = actor_of(&state, &principal).await;
    append(
        &state,
        NewAuditRecord {
            tenant_id: Some(principal.tenant_id),
            actor_type: actor.kind,
            actor_id: actor.id,
            actor_name: actor.name,
            action,
            target_type,
            target_id,
            detail: Value::Object(detail),
            source: origin.source,
            user_agent: origin.user_agent,
            outcome: outcome_of(status),
            status: Some(status.as_u16()),
        },
    )
    .await;
    response
}

fn json_text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Reads a small JSON response body to find the id of what it created, and
/// rebuilds the response from the bytes read.
async fn inspect_response(response: Response) -> (Response, Option<Value>) {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    // Handlers build JSON responses from one buffer, so their size is
    // known; a streamed body has no exact size and is left alone.
    let small = HttpBody::size_hint(response.body())
        .exact()
        .is_some_and(|length| length <= MAX_INSPECTED_BODY as u64);
    if !is_json || !small {
        return (response, None);
    }
    let (parts, body) = response.into_parts();
    match axum::body::to_bytes(body, MAX_INSPECTED_BODY).await {
        Ok(bytes) => {
            let value = serde_json::from_slice(&bytes).ok();
            (Response::from_parts(parts, Body::from(bytes)), value)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read a response body for the audit log");
            (Response::from_parts(parts, Body::empty()), None)
        }
    }
}

/// Records a login attempt: in the user's tenant when the email belongs to
/// a user, in the system chain otherwise.
pub async fn record_login(
    state: &AppState,
    email: &str,
    origin: RequestOrigin,
    status: StatusCode,
) {
    let user = state.metadata.user_by_email(email).await.ok().flatten();
    let email = truncate(email, 320);
    append(
        state,
        NewAuditRecord {
            tenant_id: user.as_ref().map(|user| user.tenant_id),
            actor_type: if user.is_some() { "user" } else { "anonymous" },
            actor_id: user.as_ref().map(|user| user.id.to_string()),
            actor_name: Some(email),
            action: "auth.login".to_owned(),
            target_type: None,
            target_id: None,
            detail: json!({}),
            source: origin.source,
            user_agent: origin.user_agent,
            outcome: outcome_of(status),
            status: Some(status.as_u16()),
        },
    )
    .await;
}

fn check_params(params: &HashMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|name| !allowed.contains(&name.as_str())) {
        Some(unknown) => Err(ApiError::invalid_param(
            "query",
            format!(
                "unknown query parameter {unknown:?}; this endpoint takes {}",
                allowed.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

fn parse_filter(params: &HashMap<String, String>) -> Result<AuditFilter, ApiError> {
    let time_ms = |param: &'static str| -> Result<Option<i64>, ApiError> {
        params
            .get(param)
            .map(|text| parse_time(param, text).map(|time| time.ns.div_euclid(1_000_000)))
            .transpose()
    };
    let before_seq = params
        .get("before")
        .map(|text| {
            text.parse::<i64>().map_err(|_| {
                ApiError::invalid_param(
                    "before",
                    format!(
                        "before {text:?} is invalid: pass the next_before of the previous page"
                    ),
                )
            })
        })
        .transpose()?;
    Ok(AuditFilter {
        from_ms: time_ms("from")?,
        to_ms: time_ms("to")?,
        actor: params.get("actor").cloned(),
        action: params.get("action").cloned(),
        before_seq,
        after_seq: None,
    })
}

/// `GET /api/v1/audit?from=&to=&actor=&action=&before=&limit=`: the
/// caller's tenant's records, newest first. `next_before` pages to older
/// ones (admins only).
pub async fn list(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Admin)?;
    check_params(&params, &LIST_PARAMS)?;
    let filter = parse_filter(&params)?;
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "limit",
                    format!("limit {text:?} is invalid: give a number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let chain = chain_of(Some(principal.tenant_id));
    let records = state
        .metadata
        .list_audit(&chain, &filter, false, limit)
        .await?;
    let next_before = (records.len() as i64 == limit)
        .then(|| records.last().map(|record| record.seq))
        .flatten();
    Ok(Json(json!({
        "records": records,
        "next_before": next_before,
    })))
}

/// `GET /api/v1/audit/verify`: walks the caller's tenant's chain and
/// reports the first broken record (admins only).
pub async fn verify(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<Value>, ApiError> {
    principal.require(Role::Admin)?;
    let chain = chain_of(Some(principal.tenant_id));
    let report = state.metadata.verify_audit_chain(&chain).await?;
    if !report.intact {
        tracing::error!(chain, first_broken = ?report.first_broken, "the audit log chain is broken: records were edited or deleted");
    }
    Ok(Json(json!(report)))
}

#[derive(Clone, Copy, PartialEq)]
enum ExportFormat {
    JsonLines,
    Csv,
}

const CSV_HEADER: &str = "id,seq,at_ms,tenant_id,actor_type,actor_id,actor_name,action,target_type,target_id,detail,source,user_agent,outcome,status,prev_hash,hash\r\n";

/// Quotes a CSV field as RFC 4180 does when it needs it.
fn csv_field(output: &mut String, text: &str) {
    if text.contains([',', '"', '\r', '\n']) {
        output.push('"');
        output.push_str(&text.replace('"', "\"\""));
        output.push('"');
    } else {
        output.push_str(text);
    }
}

fn csv_line(record: &AuditRecord) -> String {
    let optional = |value: &Option<String>| value.clone().unwrap_or_default();
    let fields = [
        record.id.to_string(),
        record.seq.to_string(),
        record.at_ms.to_string(),
        optional(&record.tenant_id),
        record.actor_type.clone(),
        optional(&record.actor_id),
        optional(&record.actor_name),
        record.action.clone(),
        optional(&record.target_type),
        optional(&record.target_id),
        record.detail_text.clone(),
        optional(&record.source),
        optional(&record.user_agent),
        record.outcome.clone(),
        record
            .status
            .map(|status| status.to_string())
            .unwrap_or_default(),
        record.prev_hash.clone(),
        record.hash.clone(),
    ];
    let mut line = String::new();
    for (index, field) in fields.iter().enumerate() {
        if index > 0 {
            line.push(',');
        }
        csv_field(&mut line, field);
    }
    line.push_str("\r\n");
    line
}

fn export_line(format: ExportFormat, record: &AuditRecord) -> String {
    match format {
        ExportFormat::Csv => csv_line(record),
        ExportFormat::JsonLines => {
            let mut line = json!(record).to_string();
            line.push('\n');
            line
        }
    }
}

/// `GET /api/v1/audit/export?format=jsonl|csv&from=&to=&actor=&action=`:
/// the caller's tenant's records, oldest first, streamed (admins only).
/// Each record keeps `prev_hash` and `hash`, so an unfiltered export can be
/// verified elsewhere.
pub async fn export(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    principal.require(Role::Admin)?;
    check_params(&params, &EXPORT_PARAMS)?;
    let filter = parse_filter(&params)?;
    let format = match params.get("format").map(String::as_str) {
        None | Some("jsonl") | Some("ndjson") => ExportFormat::JsonLines,
        Some("csv") => ExportFormat::Csv,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "format",
                format!("invalid format {other:?}: give jsonl or csv"),
            ));
        }
    };
    let chain = chain_of(Some(principal.tenant_id));

    // Pages are read as the client takes them; `after_seq` moves on.
    let start = (state, chain, filter, true);
    let pages =
        futures::stream::unfold(start, move |(state, chain, mut filter, more)| async move {
            if !more {
                return None;
            }
            let page = match state
                .metadata
                .list_audit(&chain, &filter, true, EXPORT_PAGE)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(%error, chain, "audit export failed");
                    let error = std::io::Error::other("audit export failed; see the server log");
                    return Some((Err(error), (state, chain, filter, false)));
                }
            };
            if page.is_empty() {
                return None;
            }
            let more = page.len() as i64 == EXPORT_PAGE;
            filter.after_seq = page.last().map(|record| record.seq);
            let text: String = page
                .iter()
                .map(|record| export_line(format, record))
                .collect();
            Some((Ok(Bytes::from(text)), (state, chain, filter, more)))
        });

    let (content_type, header_line) = match format {
        ExportFormat::Csv => ("text/csv; charset=utf-8", CSV_HEADER),
        ExportFormat::JsonLines => ("application/x-ndjson", ""),
    };
    let header_chunk = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(
        header_line.as_bytes(),
    ))]);
    let body = Body::from_stream(futures::StreamExt::chain(header_chunk, pages));
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_field_quotes_special_characters() {
        let mut output = String::new();
        csv_field(&mut output, "a,\"b\"");
        assert_eq!(output, "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn outcome_names_denials() {
        assert_eq!(outcome_of(StatusCode::CREATED), "success");
        assert_eq!(outcome_of(StatusCode::FORBIDDEN), "denied");
        assert_eq!(outcome_of(StatusCode::UNAUTHORIZED), "denied");
        assert_eq!(outcome_of(StatusCode::NOT_FOUND), "failed");
    }

    #[test]
    fn user_agent_is_truncated_on_char_boundary() {
        assert_eq!(truncate("ééé", 3), "é");
    }
}
