//! InfluxDB line protocol writes: `POST /write` (1.x) and `POST /api/v2/write`.
//!
//! Credentials: `Authorization: Bearer X` or `Token X` (2.x clients), HTTP
//! basic auth with the credential as password, or the `p` query parameter
//! (1.x clients). A device access token writes every line to its own device.
//! An API key or JWT with the operator role writes for a fleet: each line
//! goes to the device named by its tag `device_tag` (default `device`), and
//! unknown names create devices when `auth.auto_create_devices` is on.
//!
//! Tags other than the device tag become labels of the device (the newest
//! value per tag wins), shown on the device in the REST API.
//!
//! A batch is atomic: if any line is invalid, nothing is stored and the 400
//! response lists the invalid lines by number. The stored key of a field is
//! `measurement.field`. Query parameters `db`, `rp`, `bucket`, `org` and
//! `consistency` are accepted and ignored.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::http::header;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use ferrite_codec::line_protocol::{self, Line, Precision};

use super::body::read_limited;
use super::telemetry::{count_rejected, now_ns};
use crate::api::{ApiError, bearer_token};
use crate::auth::{self, DEVICE_TOKEN_PREFIX};
use crate::ids::{DeviceId, TenantId};
use crate::ingest::{ContentType, Envelope, Protocol};
use crate::metadata::{Labels, MetadataStore, Role};
use crate::server::AppState;

const DEFAULT_DEVICE_TAG: &str = "device";

/// The writer of a request: one device, or a fleet named by a tag.
enum Writer {
    Device { tenant: TenantId, device: DeviceId },
    Fleet { tenant: TenantId, may_create: bool },
}

pub async fn write(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
    request: Request,
) -> Result<StatusCode, ApiError> {
    let (parts, body) = request.into_parts();
    let precision = match params.get("precision") {
        None => Precision::Ns,
        Some(text) => text.parse::<Precision>().map_err(|_| {
            ApiError::invalid_param(
                "precision",
                format!("unsupported precision {text:?}: use ns, us, ms or s"),
            )
        })?,
    };
    let credential = credential(&parts, &params).ok_or_else(|| {
        count_rejected("not_authorized");
        ApiError::unauthorized(
            "missing credentials: send Authorization: Token <device token or API key>",
        )
    })?;
    let writer = resolve_writer(&state, &credential).await.inspect_err(|_| {
        count_rejected("not_authorized");
    })?;
    // A batch counts as one message, as a PUBLISH with many points does.
    let (tenant, device) = match &writer {
        Writer::Device { tenant, device } => (*tenant, Some(*device)),
        Writer::Fleet { tenant, .. } => (*tenant, None),
    };
    super::check_message_rate(&state, &parts, tenant, device)?;

    let payload = read_limited(body, state.config.http.max_body_bytes).await?;
    let text = std::str::from_utf8(&payload).map_err(|_| {
        count_rejected("invalid_encoding");
        ApiError::bad_request("the body is not valid UTF-8 text")
    })?;
    let lines = line_protocol::parse_batch(text, precision).map_err(|errors| {
        count_rejected("invalid_line_protocol");
        let listed: Vec<String> = errors.iter().map(ToString::to_string).collect();
        ApiError::bad_request(format!(
            "{} invalid line(s); nothing from this batch was stored: {}",
            errors.len(),
            listed.join("; ")
        ))
    })?;
    if lines.is_empty() {
        count_rejected("invalid_line_protocol");
        return Err(ApiError::bad_request("the body contains no lines"));
    }

    let received_at_ns = now_ns();
    let tenant = match &writer {
        Writer::Device { tenant, .. } | Writer::Fleet { tenant, .. } => *tenant,
    };
    check_timestamps(&lines, received_at_ns, &state, &tenant.to_string())?;

    let (envelopes, labels) = match writer {
        Writer::Device { tenant, device } => {
            let mut labels = Labels::new();
            for line in &lines {
                labels.extend(line.tags.iter().cloned());
            }
            let envelope = envelope(tenant, device, received_at_ns, precision, payload.clone());
            (vec![envelope], vec![(device, labels)])
        }
        Writer::Fleet { tenant, may_create } => {
            let device_tag = params
                .get("device_tag")
                .map(String::as_str)
                .unwrap_or(DEFAULT_DEVICE_TAG);
            fleet_envelopes(
                &state,
                tenant,
                may_create,
                device_tag,
                &lines,
                received_at_ns,
                precision,
            )
            .await?
        }
    };

    let count = envelopes.len() as u64;
    state.ingest.append(envelopes).await.map_err(|error| {
        count_rejected("overloaded");
        ApiError::from(error)
    })?;
    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "http").increment(count);

    // NOTE: labels reach the metadata store within about 2 s and are not in
    // the ingest log, so a crash in between loses them until the device
    // writes its tags again.
    let mut pending = state.pending_labels.lock();
    for (device, labels) in labels {
        if !labels.is_empty() {
            pending.entry(device).or_default().extend(labels);
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

fn envelope(
    tenant: TenantId,
    device: DeviceId,
    received_at_ns: i64,
    precision: Precision,
    payload: Bytes,
) -> Envelope {
    Envelope {
        tenant_id: tenant,
        device_id: device,
        protocol: Protocol::Http,
        received_at_ns,
        content_type: ContentType::LineProtocol(precision),
        payload,
        meta: Bytes::new(),
    }
}

/// Returns the credential from the headers or the 1.x `p` parameter.
fn credential(
    parts: &axum::http::request::Parts,
    params: &HashMap<String, String>,
) -> Option<String> {
    if let Some(token) = bearer_token(parts) {
        return Some(token.to_owned());
    }
    if let Some(value) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((scheme, encoded)) = value.split_once(' ')
        && scheme.eq_ignore_ascii_case("basic")
        && let Ok(decoded) = STANDARD.decode(encoded.trim())
        && let Ok(text) = String::from_utf8(decoded)
    {
        let password = text.split_once(':').map_or(text.as_str(), |(_, p)| p);
        return Some(password.to_owned());
    }
    params.get("p").cloned()
}

async fn resolve_writer(state: &AppState, credential: &str) -> Result<Writer, ApiError> {
    if credential.starts_with(DEVICE_TOKEN_PREFIX) {
        let device = state.auth.authenticate_device(credential).await?;
        return Ok(Writer::Device {
            tenant: device.tenant_id,
            device: device.device_id,
        });
    }
    let principal = state.auth.authenticate_bearer(credential).await?;
    principal.require(Role::Operator)?;
    principal.require_scope(crate::auth::scopes::Scope::TelemetryWrite)?;
    Ok(Writer::Fleet {
        tenant: principal.tenant_id,
        may_create: state.config.auth.auto_create_devices,
    })
}

fn check_timestamps(
    lines: &[Line<'_>],
    received_at_ns: i64,
    state: &AppState,
    tenant: &str,
) -> Result<(), ApiError> {
    let window = crate::decode::TimeWindow::new(&state.config, tenant);
    for line in lines {
        if let Some(ts) = line.timestamp_ns
            && let Err(problem) =
                window.check(&format!("line {}", line.line_number), ts, received_at_ns)
        {
            count_rejected("invalid_timestamp");
            return Err(ApiError::bad_request(format!(
                "{problem}. Nothing from this batch was stored"
            )));
        }
    }
    Ok(())
}

/// Splits a fleet batch into one envelope per device, with each device's
/// labels: its tags other than `device_tag`.
async fn fleet_envelopes(
    state: &AppState,
    tenant: TenantId,
    may_create: bool,
    device_tag: &str,
    lines: &[Line<'_>],
    received_at_ns: i64,
    precision: Precision,
) -> Result<(Vec<Envelope>, Vec<(DeviceId, Labels)>), ApiError> {
    let mut by_device: Vec<(String, String, Labels)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for line in lines {
        let Some((_, name)) = line.tags.iter().find(|(key, _)| key == device_tag) else {
            count_rejected("invalid_line_protocol");
            return Err(ApiError::bad_request(format!(
                "line {}: the tag {device_tag:?} that names the device is missing; add it or set the device_tag parameter. Nothing from this batch was stored",
                line.line_number
            )));
        };
        let slot = *index.entry(name.as_str()).or_insert_with(|| {
            by_device.push((name.clone(), String::new(), Labels::new()));
            by_device.len() - 1
        });
        let (_, payload, labels) = &mut by_device[slot];
        payload.push_str(line.raw);
        payload.push('\n');
        labels.extend(
            line.tags
                .iter()
                .filter(|(key, _)| key != device_tag)
                .cloned(),
        );
    }

    let names: Vec<&str> = by_device.iter().map(|(name, _, _)| name.as_str()).collect();
    let ids = device_ids(state, tenant, &names, may_create).await?;
    let mut envelopes = Vec::with_capacity(by_device.len());
    let mut labels_by_device = Vec::with_capacity(by_device.len());
    for ((_, payload, labels), device) in by_device.into_iter().zip(ids) {
        envelopes.push(envelope(
            tenant,
            device,
            received_at_ns,
            precision,
            Bytes::from(payload),
        ));
        labels_by_device.push((device, labels));
    }
    Ok((envelopes, labels_by_device))
}

/// Returns the ids of the devices `names`, in order: from the name cache,
/// else from the metadata store in one query, creating the missing ones in
/// one transaction when `may_create` is set. A batch that names thousands
/// of new devices so costs two statements per device in one transaction
/// rather than a transaction each.
async fn device_ids(
    state: &AppState,
    tenant: TenantId,
    names: &[&str],
    may_create: bool,
) -> Result<Vec<DeviceId>, ApiError> {
    let mut ids: Vec<Option<DeviceId>> = {
        let cache = state.device_names.lock();
        names
            .iter()
            .map(|name| cache.get(&(tenant, (*name).to_owned())).copied())
            .collect()
    };
    let missing: Vec<String> = names
        .iter()
        .zip(&ids)
        .filter(|(_, id)| id.is_none())
        .map(|(name, _)| (*name).to_owned())
        .collect();
    if missing.is_empty() {
        return Ok(ids.into_iter().flatten().collect());
    }

    let mut found: HashMap<String, DeviceId> = state
        .metadata
        .device_ids_by_names(tenant, &missing)
        .await?
        .into_iter()
        .collect();
    let unknown: Vec<String> = missing
        .into_iter()
        .filter(|name| !found.contains_key(name))
        .collect();
    if !unknown.is_empty() {
        if !may_create {
            count_rejected("unknown_device");
            return Err(ApiError::not_found(format!(
                "device {:?} not found; create it first or enable auth.auto_create_devices. Nothing from this batch was stored",
                unknown[0]
            )));
        }
        // The token of an auto-created device is not shown to anyone; an
        // operator rotates it when the device itself needs to connect.
        let new: Vec<(String, Vec<u8>)> = unknown
            .iter()
            .map(|name| {
                let token = auth::generate_device_token();
                (name.clone(), auth::hash_secret(&token).to_vec())
            })
            .collect();
        let created = state.metadata.create_devices(tenant, &new).await?;
        if !created.is_empty() {
            tracing::info!(
                devices = created.len(),
                first = %created[0].0,
                "created devices on their first line-protocol write"
            );
        }
        found.extend(created);
        // Names that another request created at the same moment.
        let raced: Vec<String> = unknown
            .into_iter()
            .filter(|name| !found.contains_key(name))
            .collect();
        if !raced.is_empty() {
            found.extend(state.metadata.device_ids_by_names(tenant, &raced).await?);
        }
    }

    let mut cache = state.device_names.lock();
    for (name, id) in names.iter().zip(&mut ids) {
        if id.is_none() {
            let device = *found.get(*name).ok_or_else(ApiError::internal)?;
            cache.insert((tenant, (*name).to_owned()), device);
            *id = Some(device);
        }
    }
    Ok(ids.into_iter().flatten().collect())
}
