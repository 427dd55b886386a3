//! Fleet queries: one request across many devices, selected by label.
//!
//! - `GET /api/v1/telemetry/latest?keys=K1,K2[&label=NAME:VALUE...][&profile=P][&filter=KEY<OP>NUMBER]`
//!   returns the latest value of each key for every matching device that has
//!   one. `filter` keeps devices whose latest value of `KEY` satisfies the
//!   condition (`<`, `<=`, `>`, `>=`, `==`, `!=`; booleans and strings never
//!   satisfy a numeric condition).
//! - `GET /api/v1/telemetry/aggregate?key=K&agg=A&interval=I[&start][&end][&tz][&label...][&profile=P][&group_by=device|profile|LABEL]`
//!   aggregates one key over the matching devices into buckets, one series
//!   of buckets per group. Groups are devices (the default) or the values of
//!   a label; devices without that label form the group `null`. Averages
//!   divide the sum of all points of a group by their count, so every point
//!   weighs the same.
//!
//! `label` may repeat; a device matches when it has every listed label with
//! the given value. `profile=NAME_OR_ID` keeps the devices of one profile,
//! and `group_by=profile` groups by profile name (a label named `profile`
//! cannot be grouped by). Labels are the line-protocol tags of the device's
//! writes, other than the tag that names the device.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use ferrite_core::{TimestampNs, Value, nanos_to_millis};
use serde_json::{Map, json};

use super::ApiError;
use super::buckets;
use super::telemetry::{Aggregation, parse_range, point_json};
use crate::auth::Principal;
use crate::ids::ProfileId;
use crate::metadata::{Device, MetadataStore, Role};
use crate::server::AppState;
use crate::store::{Bucket, Series};

/// Devices fetched from the metadata store per page.
const DEVICE_PAGE: i64 = 1000;

type Params = Vec<(String, String)>;

fn reject_unknown(params: &Params, allowed: &[&'static str]) -> Result<(), ApiError> {
    if let Some((unknown, _)) = params
        .iter()
        .find(|(name, _)| !allowed.contains(&name.as_str()))
    {
        return Err(ApiError::invalid_param(
            "query",
            format!(
                "unknown query parameter {unknown:?}; this endpoint takes {}",
                allowed.join(", ")
            ),
        ));
    }
    Ok(())
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

/// Resolves the `profile` parameter (a profile's name or id).
async fn profile_selector(
    state: &AppState,
    principal: &Principal,
    params: &Params,
) -> Result<Option<ProfileId>, ApiError> {
    match single(params, "profile")? {
        Some(reference) => Ok(Some(
            super::profiles::find(state, principal.tenant_id, reference)
                .await?
                .id,
        )),
        None => Ok(None),
    }
}

/// Parses the repeated `label=NAME:VALUE` selectors.
fn label_selectors(params: &Params) -> Result<Vec<(String, String)>, ApiError> {
    params
        .iter()
        .filter(|(name, _)| name == "label")
        .map(|(_, text)| match text.split_once(':') {
            Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
            _ => Err(ApiError::invalid_param(
                "label",
                format!(
                    "invalid label selector {text:?}: write NAME:VALUE, for example fleet:South"
                ),
            )),
        })
        .collect()
}

/// Lists every device of the tenant whose labels match all selectors, with the
/// labels that are not yet written to the metadata store.
async fn matching_devices(
    state: &AppState,
    principal: &Principal,
    selectors: &[(String, String)],
    profile: Option<ProfileId>,
) -> Result<Vec<Device>, ApiError> {
    let mut matching = Vec::new();
    let mut offset = 0;
    loop {
        let page = state
            .metadata
            .list_devices(principal.tenant_id, DEVICE_PAGE, offset)
            .await?;
        let done = (page.len() as i64) < DEVICE_PAGE;
        offset += page.len() as i64;
        {
            let pending = state.pending_labels.lock();
            for mut device in page {
                if let Some(labels) = pending.get(&device.id) {
                    device.labels.extend(labels.clone());
                }
                if selectors
                    .iter()
                    .all(|(name, value)| device.labels.get(name) == Some(value))
                    && profile.is_none_or(|profile| device.profile_id == Some(profile))
                {
                    matching.push(device);
                }
            }
        }
        if done {
            return Ok(matching);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Comparison {
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    Equal,
    NotEqual,
}

struct Filter {
    key: String,
    comparison: Comparison,
    threshold: f64,
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, ApiError> {
        let invalid = || {
            ApiError::invalid_param(
                "filter",
                format!(
                    "invalid filter {text:?}: write KEY<OP>NUMBER with OP one of <, <=, >, >=, ==, !=, for example diagnostics.fuel_state<0.1"
                ),
            )
        };
        let operators = [
            ("<=", Comparison::LessOrEqual),
            (">=", Comparison::GreaterOrEqual),
            ("==", Comparison::Equal),
            ("!=", Comparison::NotEqual),
            ("<", Comparison::Less),
            (">", Comparison::Greater),
        ];
        let (at, len, comparison) = operators
            .iter()
            .filter_map(|(op, comparison)| text.find(op).map(|at| (at, op.len(), *comparison)))
            .min_by_key(|(at, len, _)| (*at, usize::MAX - len))
            .ok_or_else(invalid)?;
        let key = text[..at].trim();
        let threshold: f64 = text[at + len..].trim().parse().map_err(|_| invalid())?;
        if key.is_empty() || !threshold.is_finite() {
            return Err(invalid());
        }
        Ok(Filter {
            key: key.to_owned(),
            comparison,
            threshold,
        })
    }

    fn accepts(&self, value: &Value) -> bool {
        let Some(number) = value.as_f64() else {
            return false;
        };
        match self.comparison {
            Comparison::Less => number < self.threshold,
            Comparison::LessOrEqual => number <= self.threshold,
            Comparison::Greater => number > self.threshold,
            Comparison::GreaterOrEqual => number >= self.threshold,
            Comparison::Equal => number == self.threshold,
            Comparison::NotEqual => number != self.threshold,
        }
    }
}

fn device_summary(device: &Device) -> Map<String, serde_json::Value> {
    let mut entry = Map::new();
    entry.insert("id".into(), json!(device.id));
    entry.insert("name".into(), json!(device.name));
    entry.insert("labels".into(), json!(device.labels));
    entry
}

/// `GET /api/v1/telemetry/latest`: latest values across devices.
pub async fn latest(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<Params>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Viewer)?;
    reject_unknown(&params, &["keys", "label", "profile", "filter"])?;
    let keys = super::parse_key_list(single(&params, "keys")?)?;
    let filter = single(&params, "filter")?.map(Filter::parse).transpose()?;
    let selectors = label_selectors(&params)?;
    let profile = profile_selector(&state, &principal, &params).await?;
    let devices = matching_devices(&state, &principal, &selectors, profile).await?;

    let store = state.store.clone();
    let entries = tokio::task::spawn_blocking(move || {
        let mut entries = Vec::new();
        for device in devices {
            let latest = store.latest(device.tenant_id, device.id);
            if let Some(filter) = &filter {
                let passes = latest
                    .iter()
                    .find(|(key, _, _)| *key == filter.key)
                    .is_some_and(|(_, _, value)| filter.accepts(value));
                if !passes {
                    continue;
                }
            }
            let mut values = Map::new();
            for (key, ts, value) in &latest {
                if keys.as_ref().is_none_or(|keys| keys.contains(key)) {
                    values.insert(key.clone(), point_json(*ts, value));
                }
            }
            if values.is_empty() {
                continue;
            }
            let mut entry = device_summary(&device);
            entry.insert("values".into(), serde_json::Value::Object(values));
            entries.push(serde_json::Value::Object(entry));
        }
        entries
    })
    .await
    .map_err(|_| ApiError::internal())?;
    Ok(Json(json!({ "devices": entries })))
}

/// `GET /api/v1/telemetry/aggregate`: one key aggregated across devices,
/// grouped by device or by a label.
pub async fn aggregate(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Query(params): Query<Params>,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Viewer)?;
    reject_unknown(
        &params,
        &[
            "key",
            "agg",
            "interval",
            "max_points",
            "start",
            "end",
            "tz",
            "label",
            "profile",
            "group_by",
        ],
    )?;
    let key = single(&params, "key")?
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            ApiError::invalid_param("key", "key is required, for example key=readings.velocity")
        })?
        .to_owned();
    let agg = Aggregation::parse(single(&params, "agg")?.ok_or_else(|| {
        ApiError::invalid_param(
            "agg",
            "agg is required: one of count, sum, min, max, avg, first, last",
        )
    })?)?;
    let interval =
        buckets::IntervalParam::parse(single(&params, "interval")?.ok_or_else(|| {
            ApiError::invalid_param(
                "interval",
                "interval is required, for example interval=1h or interval=auto",
            )
        })?)?;
    let max_points = buckets::parse_max_points(single(&params, "max_points")?)?;
    let (start, end, _) = parse_range(
        single(&params, "start")?,
        single(&params, "end")?,
        interval.given(),
    )?;
    let (interval, grid) = buckets::plan(
        interval,
        max_points,
        single(&params, "tz")?,
        start,
        end,
        &state.store.rollup_intervals(),
    )?;
    let tier = buckets::tier_name(grid.as_ref().and_then(|grid| {
        state
            .store
            .rollup_tier_for(&buckets::clipped_bounds(grid, start, end))
    }));
    let group_by = single(&params, "group_by")?.unwrap_or("device").to_owned();
    let selectors = label_selectors(&params)?;
    let profile = profile_selector(&state, &principal, &params).await?;
    let devices = matching_devices(&state, &principal, &selectors, profile).await?;
    // `group_by=profile` groups by profile name.
    let profile_names: std::collections::HashMap<ProfileId, String> = if group_by == "profile" {
        state
            .metadata
            .list_profiles(principal.tenant_id)
            .await?
            .into_iter()
            .map(|profile| (profile.id, profile.spec.name))
            .collect()
    } else {
        Default::default()
    };

    let store = state.store.clone();
    let interval_text = interval.to_string();
    let groups = tokio::task::spawn_blocking(move || {
        let mut groups: BTreeMap<Option<String>, Vec<Bucket>> = BTreeMap::new();
        let Some(grid) = grid else {
            return Ok::<_, crate::store::StoreError>(groups);
        };
        let bounds = buckets::clipped_bounds(&grid, start, end);
        for device in &devices {
            let group = match group_by.as_str() {
                "device" => Some(device.name.clone()),
                "profile" => device
                    .profile_id
                    .and_then(|id| profile_names.get(&id).cloned()),
                label => device.labels.get(label).cloned(),
            };
            let mut series_buckets =
                store.aggregate_buckets(Series::new(device.tenant_id, device.id, &key), &bounds)?;
            if series_buckets.iter().all(|bucket| bucket.count == 0) {
                continue;
            }
            buckets::relabel(&grid, &mut series_buckets);
            match groups.get_mut(&group) {
                Some(existing) => {
                    for (into, from) in existing.iter_mut().zip(&series_buckets) {
                        into.merge(from);
                    }
                }
                None => {
                    groups.insert(group, series_buckets);
                }
            }
        }
        Ok(groups)
    })
    .await
    .map_err(|_| ApiError::internal())??;

    let groups: Vec<serde_json::Value> = groups
        .into_iter()
        .map(|(group, buckets)| {
            let entries: Vec<serde_json::Value> = buckets
                .iter()
                .map(|bucket| bucket_json(bucket.start, agg, bucket))
                .collect();
            json!({ "group": group, "buckets": entries })
        })
        .collect();
    Ok(Json(json!({
        "tier": tier,
        "interval": interval_text,
        "groups": groups,
    })))
}

fn bucket_json(ts: TimestampNs, agg: Aggregation, bucket: &Bucket) -> serde_json::Value {
    let mut entry = json!({
        "ts": nanos_to_millis(ts),
        "value": agg.value(bucket),
        "count": bucket.count,
    });
    let skipped = bucket.count - bucket.numeric_count;
    if agg.is_numeric() && skipped > 0 {
        entry["non_numeric"] = json!(skipped);
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_apply() {
        let filter = Filter::parse("diagnostics.fuel_state<0.1").unwrap();
        assert_eq!(filter.key, "diagnostics.fuel_state");
        assert!(filter.accepts(&Value::Float(0.05)));
        assert!(!filter.accepts(&Value::Float(0.1)));
        assert!(!filter.accepts(&Value::Str("0.01".into())));
        let filter = Filter::parse("t >= -5").unwrap();
        assert!(filter.accepts(&Value::Int(-5)));
        let filter = Filter::parse("a!=1").unwrap();
        assert!(filter.accepts(&Value::Int(2)));
        for bad in ["<1", "a<", "a<x", "a", "a<NaN", "a<inf"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }
}
