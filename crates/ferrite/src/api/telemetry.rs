//! Telemetry queries: latest values, raw ranges with a cursor, and bucketed
//! aggregates.
//!
//! Rules that clients rely on:
//! - Ranges are half-open, `[start, end)`. `start` defaults to `end` minus
//!   one day and `end` to now. `start > end` is an error; `start == end` is an
//!   empty range and returns empty lists.
//! - Raw queries return at most `limit` points per key (default 1000, at
//!   most 10000), oldest first. When a key has more, the response carries a
//!   `Link: <...>; rel="next"` header and a `Ferrite-Next-Cursor` header; the
//!   next page is the same query with `cursor=<value>`. No header means the
//!   response is complete.
//! - Aggregates (`interval` and `agg` together) return one entry per bucket,
//!   also for empty buckets. Buckets are aligned as the `buckets` module
//!   describes (epoch multiples for fixed intervals, local calendar days,
//!   weeks and months in the time zone `tz`); the first is the one holding
//!   `start`, and only points inside `[start, end)` count. Each entry contains the bucket start `ts`, the
//!   `value` (null for an empty bucket, and for sum/min/max/avg of a bucket
//!   without numeric points) and the number of points `count`; a bucket
//!   with strings or booleans also gets `non_numeric`, the number of points
//!   sum/min/max/avg skipped. At most 10000 buckets per key.
//! - Integer `start`/`end` below 10^11 are most likely seconds; the query
//!   runs as asked and the response carries a `Ferrite-Warning` header.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferrite_core::{TimestampNs, Value, nanos_to_millis};
use serde_json::{Map, json};

use super::time::parse_time;
use super::{ApiError, devices::device_id};
use crate::auth::Principal;
use crate::metadata::{MetadataStore, Role};
use crate::server::AppState;
use crate::store::{Bucket, Series};

pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;
const DAY_NS: i64 = 86_400_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Aggregation {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    First,
    Last,
}

impl Aggregation {
    pub(super) fn parse(text: &str) -> Result<Self, ApiError> {
        Ok(match text {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "min" => Self::Min,
            "max" => Self::Max,
            "avg" => Self::Avg,
            "first" => Self::First,
            "last" => Self::Last,
            other => {
                return Err(ApiError::invalid_param(
                    "agg",
                    format!(
                        "unsupported agg {other:?}: use count, sum, min, max, avg, first or last"
                    ),
                ));
            }
        })
    }

    pub(super) fn value(self, bucket: &Bucket) -> serde_json::Value {
        let number = |value: Option<f64>| value.map_or(serde_json::Value::Null, |v| json!(v));
        match self {
            Self::Count => json!(bucket.count),
            Self::Sum => number(bucket.sum),
            Self::Min => number(bucket.min),
            Self::Max => number(bucket.max),
            Self::Avg => number(
                bucket
                    .sum
                    .filter(|_| bucket.numeric_count > 0)
                    .map(|sum| sum / bucket.numeric_count as f64),
            ),
            Self::First => bucket
                .first
                .as_ref()
                .map_or(serde_json::Value::Null, |(_, v)| value_json(v)),
            Self::Last => bucket
                .last
                .as_ref()
                .map_or(serde_json::Value::Null, |(_, v)| value_json(v)),
        }
    }

    pub(super) fn is_numeric(self) -> bool {
        matches!(self, Self::Sum | Self::Min | Self::Max | Self::Avg)
    }
}

fn value_json(value: &Value) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

pub(super) fn point_json(ts: TimestampNs, value: &Value) -> serde_json::Value {
    json!({"ts": nanos_to_millis(ts), "value": value_json(value)})
}

/// Query parameters of the raw and aggregate query.
const QUERY_PARAMS: [&str; 9] = [
    "keys",
    "start",
    "end",
    "interval",
    "agg",
    "tz",
    "max_points",
    "limit",
    "cursor",
];

fn reject_unknown_params(
    params: &HashMap<String, String>,
    allowed: &[&'static str],
) -> Result<(), ApiError> {
    let Some(unknown) = params.keys().find(|name| !allowed.contains(&name.as_str())) else {
        return Ok(());
    };
    Err(ApiError::invalid_param(
        "query",
        format!(
            "unknown query parameter {unknown:?}; this endpoint takes {}",
            allowed.join(", ")
        ),
    ))
}

/// Parses the optional `keys` list; `None` means every key.
fn parse_keys(params: &HashMap<String, String>) -> Result<Option<Vec<String>>, ApiError> {
    super::parse_key_list(params.get("keys").map(String::as_str))
}

/// `GET /api/v1/devices/{id}/telemetry/latest[?keys=K1,K2]`.
pub async fn latest(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    reject_unknown_params(&params, &["keys"])?;
    let requested = parse_keys(&params)?;
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&id)?)
        .await?;
    let store = state.store.clone();
    let latest = tokio::task::spawn_blocking(move || store.latest(device.tenant_id, device.id))
        .await
        .map_err(|_| ApiError::internal())?;
    let mut body = Map::new();
    for (key, ts, value) in latest {
        if requested
            .as_ref()
            .is_none_or(|requested| requested.contains(&key))
        {
            body.insert(key, point_json(ts, &value));
        }
    }
    Ok(Json(serde_json::Value::Object(body)))
}

pub async fn keys(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Vec<String>>, ApiError> {
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&id)?)
        .await?;
    let store = state.store.clone();
    let latest = tokio::task::spawn_blocking(move || store.latest(device.tenant_id, device.id))
        .await
        .map_err(|_| ApiError::internal())?;
    Ok(Json(latest.into_iter().map(|(key, _, _)| key).collect()))
}

/// Parses `start` and `end` with their defaults (`end`: now; `start`: one
/// day before `end`, aligned to a fixed interval). Returns the parameters
/// that look like seconds, for the `Ferrite-Warning` header.
pub(super) fn parse_range(
    start: Option<&str>,
    end: Option<&str>,
    interval: Option<ferrite_core::calendar::Interval>,
) -> Result<(TimestampNs, TimestampNs, Vec<&'static str>), ApiError> {
    let mut warnings = Vec::new();
    let end = match end {
        Some(text) => {
            let end = parse_time("end", text)?;
            if end.looks_like_seconds {
                warnings.push("end");
            }
            end.ns
        }
        None => chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap_or(ferrite_core::MAX_TIMESTAMP_NS),
    };
    let start = match start {
        Some(text) => {
            let start = parse_time("start", text)?;
            if start.looks_like_seconds {
                warnings.insert(0, "start");
            }
            start.ns
        }
        None => {
            let start = end.saturating_sub(DAY_NS);
            match interval {
                Some(ferrite_core::calendar::Interval::Fixed(interval)) => {
                    start - start.rem_euclid(interval)
                }
                _ => start,
            }
        }
    };
    if start > end {
        return Err(ApiError::invalid_param(
            "start",
            format!(
                "start ({}) is after end ({}); the range is [start, end)",
                nanos_to_millis(start),
                nanos_to_millis(end)
            ),
        ));
    }
    Ok((start, end, warnings))
}

/// `GET /api/v1/devices/{id}/telemetry`: raw points or aggregates.
pub async fn query(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    principal.require(Role::Viewer)?;
    reject_unknown_params(&params, &QUERY_PARAMS)?;
    let device = state
        .metadata
        .device(principal.tenant_id, device_id(&id)?)
        .await?;

    let interval = params
        .get("interval")
        .map(|text| super::buckets::IntervalParam::parse(text))
        .transpose()?;
    let max_points =
        super::buckets::parse_max_points(params.get("max_points").map(String::as_str))?;
    let agg = params
        .get("agg")
        .map(|text| Aggregation::parse(text))
        .transpose()?;

    let (start, end, warnings) = parse_range(
        params.get("start").map(String::as_str),
        params.get("end").map(String::as_str),
        interval.and_then(super::buckets::IntervalParam::given),
    )?;

    let keys: Vec<String> = match parse_keys(&params)? {
        Some(keys) => keys,
        None => {
            let store = state.store.clone();
            tokio::task::spawn_blocking(move || store.latest(device.tenant_id, device.id))
                .await
                .map_err(|_| ApiError::internal())?
                .into_iter()
                .map(|(key, _, _)| key)
                .collect()
        }
    };

    let mut response = match (interval, agg) {
        (Some(interval), Some(agg)) => {
            if params.contains_key("limit") || params.contains_key("cursor") {
                return Err(ApiError::invalid_param(
                    "limit",
                    "limit and cursor apply to raw queries; an aggregate query returns every bucket",
                ));
            }
            let (_, grid) = super::buckets::plan(
                interval,
                max_points,
                params.get("tz").map(String::as_str),
                start,
                end,
                &state.store.rollup_intervals(),
            )?;
            aggregate_response(
                &state,
                device.tenant_id,
                device.id,
                keys,
                start,
                end,
                grid,
                agg,
            )
            .await?
        }
        (Some(_), None) => {
            return Err(ApiError::invalid_param(
                "agg",
                "interval needs agg: one of count, sum, min, max, avg, first, last",
            ));
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid_param(
                "interval",
                "agg needs interval, for example interval=1h",
            ));
        }
        (None, None) => {
            for param in ["tz", "max_points"] {
                if params.contains_key(param) {
                    return Err(ApiError::invalid_param(
                        param,
                        format!("{param} applies to aggregate queries: add interval and agg"),
                    ));
                }
            }
            raw_response(
                &state,
                device.tenant_id,
                device.id,
                keys,
                start,
                end,
                &params,
                &uri,
            )
            .await?
        }
    };

    if !warnings.is_empty()
        && let Ok(value) = HeaderValue::from_str(&format!(
            "{} looks like seconds; times are epoch milliseconds",
            warnings.join(" and ")
        ))
    {
        response.headers_mut().insert("ferrite-warning", value);
    }
    Ok(response)
}

#[allow(clippy::too_many_arguments)]
async fn aggregate_response(
    state: &AppState,
    tenant: crate::ids::TenantId,
    device: crate::ids::DeviceId,
    keys: Vec<String>,
    start: TimestampNs,
    end: TimestampNs,
    grid: Option<ferrite_core::calendar::BucketGrid>,
    agg: Aggregation,
) -> Result<Response, ApiError> {
    let store = state.store.clone();
    let bounds = grid
        .as_ref()
        .map(|grid| super::buckets::clipped_bounds(grid, start, end));
    let tier = super::buckets::tier_name(
        bounds
            .as_deref()
            .and_then(|bounds| store.rollup_tier_for(bounds)),
    );
    let results = tokio::task::spawn_blocking(move || {
        let mut results = Vec::with_capacity(keys.len());
        for key in keys {
            let buckets = match (&grid, &bounds) {
                (Some(grid), Some(bounds)) => {
                    let mut buckets =
                        store.aggregate_buckets(Series::new(tenant, device, &key), bounds)?;
                    super::buckets::relabel(grid, &mut buckets);
                    buckets
                }
                _ => Vec::new(),
            };
            results.push((key, buckets));
        }
        Ok::<_, crate::store::StoreError>(results)
    })
    .await
    .map_err(|_| ApiError::internal())??;

    let mut body = Map::new();
    for (key, buckets) in results {
        let entries: Vec<serde_json::Value> = buckets
            .iter()
            .map(|bucket| {
                let mut entry = json!({
                    "ts": nanos_to_millis(bucket.start),
                    "value": agg.value(bucket),
                    "count": bucket.count,
                });
                let skipped = bucket.count - bucket.numeric_count;
                if agg.is_numeric() && skipped > 0 {
                    entry["non_numeric"] = json!(skipped);
                }
                entry
            })
            .collect();
        body.insert(key, serde_json::Value::Array(entries));
    }
    let mut response = Json(serde_json::Value::Object(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&tier) {
        response.headers_mut().insert("ferrite-tier", value);
    }
    Ok(response)
}

/// Cursor: the keys that have more points, each with the timestamp (ns) of
/// the last point already returned.
fn decode_cursor(text: &str) -> Result<BTreeMap<String, i64>, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            "cursor",
            "invalid cursor: pass the value of the Ferrite-Next-Cursor header unchanged",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
    serde_json::from_slice(&bytes).map_err(|_| invalid())
}

fn encode_cursor(cursor: &BTreeMap<String, i64>) -> String {
    URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(cursor).expect("a map of strings to integers serializes"))
}

#[allow(clippy::too_many_arguments)]
async fn raw_response(
    state: &AppState,
    tenant: crate::ids::TenantId,
    device: crate::ids::DeviceId,
    keys: Vec<String>,
    start: TimestampNs,
    end: TimestampNs,
    params: &HashMap<String, String>,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(text) => match text.trim().parse::<i64>() {
            Ok(limit) if (1..=MAX_LIMIT as i64).contains(&limit) => limit as usize,
            _ => {
                return Err(ApiError::invalid_param(
                    "limit",
                    format!("invalid limit {text:?}: give a whole number from 1 to {MAX_LIMIT}"),
                ));
            }
        },
    };
    let cursor = params
        .get("cursor")
        .map(|text| decode_cursor(text))
        .transpose()?;

    let store = state.store.clone();
    let pages = tokio::task::spawn_blocking(move || {
        let mut pages = Vec::with_capacity(keys.len());
        for key in keys {
            let after = match &cursor {
                // Keys missing from a cursor were complete on an earlier page.
                Some(cursor) => match cursor.get(&key) {
                    Some(after) => Some(*after),
                    None => {
                        pages.push((key, Vec::new(), false));
                        continue;
                    }
                },
                None => None,
            };
            if start == end {
                pages.push((key, Vec::new(), false));
                continue;
            }
            let page = store.range(Series::new(tenant, device, &key), start, end, after, limit)?;
            pages.push((key, page.points, page.has_more));
        }
        Ok::<_, crate::store::StoreError>(pages)
    })
    .await
    .map_err(|_| ApiError::internal())??;

    let mut body = Map::new();
    let mut next = BTreeMap::new();
    for (key, points, has_more) in pages {
        if has_more && let Some((last, _)) = points.last() {
            next.insert(key.clone(), *last);
        }
        let entries = points
            .iter()
            .map(|(ts, value)| point_json(*ts, value))
            .collect();
        body.insert(key, serde_json::Value::Array(entries));
    }

    let mut response = Json(serde_json::Value::Object(body)).into_response();
    if !next.is_empty() {
        let cursor = encode_cursor(&next);
        let headers: &mut HeaderMap = response.headers_mut();
        let query: Vec<String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty() && !pair.starts_with("cursor="))
            .map(str::to_owned)
            .chain(std::iter::once(format!("cursor={cursor}")))
            .collect();
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"));
        if let Ok(value) = HeaderValue::from_str(&link) {
            headers.insert("link", value);
        }
        if let Ok(value) = HeaderValue::from_str(&cursor) {
            headers.insert("ferrite-next-cursor", value);
        }
    }
    Ok(response)
}
