//! The LoRaWAN registry and downlink queue.
//!
//! - `PUT|GET|DELETE /api/v1/devices/{id}/lorawan`: the device's DevEUI,
//!   activation, region and keys. Keys are sealed with the tenant's data
//!   key before they are stored and are never returned.
//! - `POST|GET /api/v1/devices/{id}/lorawan/downlinks`: queues a downlink
//!   for the device's next receive window, or lists the queue.
//! - `POST|GET /api/v1/lorawan/gateways`, `DELETE
//!   /api/v1/lorawan/gateways/{eui}`: gateways allowed to forward packets.
//!
//! Reading needs the viewer role, changing devices and queueing downlinks
//! the operator role, and changing gateways the admin role.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::json;

use super::ApiError;
use super::devices::device_id;
use crate::auth::Principal;
use crate::encryption::DataKey;
use crate::ids::DeviceId;
use crate::metadata::Role;
use crate::metadata::lorawan::{
    Activation, LorawanDevice, NewLorawanDevice, Region, SealedKeys, key_context, parse_dev_addr,
    parse_eui,
};
use crate::server::AppState;

/// LoRaWAN MAC versions the network server implements.
const MAC_VERSIONS: [&str; 5] = ["1.0.0", "1.0.1", "1.0.2", "1.0.3", "1.0.4"];
const DEFAULT_MAC_VERSION: &str = "1.0.3";
const MAX_GATEWAY_NAME_BYTES: usize = 128;

/// Body of `PUT /api/v1/devices/{id}/lorawan`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutDevice {
    dev_eui: String,
    activation: String,
    region: Option<String>,
    join_eui: Option<String>,
    mac_version: Option<String>,
    app_key: Option<String>,
    dev_addr: Option<String>,
    nwk_s_key: Option<String>,
    app_s_key: Option<String>,
}

fn invalid(param: &'static str, message: String) -> ApiError {
    ApiError::invalid_param(param, message)
}

fn require<'a>(
    value: &'a Option<String>,
    param: &'static str,
    activation: Activation,
) -> Result<&'a str, ApiError> {
    value.as_deref().ok_or_else(|| {
        invalid(
            param,
            format!("{param} is missing: activation {activation} needs it"),
        )
    })
}

fn forbid(
    value: &Option<String>,
    param: &'static str,
    activation: Activation,
) -> Result<(), ApiError> {
    if value.is_some() {
        return Err(invalid(
            param,
            format!("{param} is not used with activation {activation}; leave it out"),
        ));
    }
    Ok(())
}

/// Parses an AES-128 key given as 32 hex digits.
fn parse_key(text: &str, param: &'static str) -> Result<[u8; 16], ApiError> {
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok());
    bytes.ok_or_else(|| invalid(param, format!("{param} must be 32 hex digits (16 bytes)")))
}

fn seal(data_key: &DataKey, field: &str, device: DeviceId, key: [u8; 16]) -> Vec<u8> {
    data_key.seal(&key_context(field, device), &key)
}

/// Checks a `PUT` body against its activation and seals the keys.
fn new_device(
    request: PutDevice,
    device: DeviceId,
    data_key: &DataKey,
) -> Result<NewLorawanDevice, ApiError> {
    let activation: Activation = request
        .activation
        .parse()
        .map_err(|message| invalid("activation", message))?;
    let dev_eui = parse_eui(&request.dev_eui).map_err(|message| invalid("dev_eui", message))?;
    let region = request
        .region
        .as_deref()
        .map(str::parse::<Region>)
        .transpose()
        .map_err(|message| invalid("region", message))?;
    let mac_version = request
        .mac_version
        .unwrap_or_else(|| DEFAULT_MAC_VERSION.to_owned());
    if !MAC_VERSIONS.contains(&mac_version.as_str()) {
        return Err(invalid(
            "mac_version",
            format!(
                "mac_version {mac_version:?} is not supported: expected one of {}",
                MAC_VERSIONS.join(", ")
            ),
        ));
    }

    let mut new = NewLorawanDevice {
        dev_eui,
        join_eui: None,
        region,
        activation,
        mac_version,
        keys: SealedKeys::default(),
        dev_addr: None,
    };
    if activation != Activation::External && region.is_none() {
        return Err(invalid(
            "region",
            format!("region is missing: activation {activation} needs EU868 or US915"),
        ));
    }
    match activation {
        Activation::Otaa => {
            forbid(&request.dev_addr, "dev_addr", activation)?;
            forbid(&request.nwk_s_key, "nwk_s_key", activation)?;
            forbid(&request.app_s_key, "app_s_key", activation)?;
            let join_eui = require(&request.join_eui, "join_eui", activation)?;
            new.join_eui =
                Some(parse_eui(join_eui).map_err(|message| invalid("join_eui", message))?);
            let app_key = parse_key(require(&request.app_key, "app_key", activation)?, "app_key")?;
            new.keys.app_key = Some(seal(data_key, "app_key", device, app_key));
        }
        Activation::Abp => {
            forbid(&request.join_eui, "join_eui", activation)?;
            forbid(&request.app_key, "app_key", activation)?;
            let dev_addr = require(&request.dev_addr, "dev_addr", activation)?;
            new.dev_addr =
                Some(parse_dev_addr(dev_addr).map_err(|message| invalid("dev_addr", message))?);
            let nwk_s_key = parse_key(
                require(&request.nwk_s_key, "nwk_s_key", activation)?,
                "nwk_s_key",
            )?;
            let app_s_key = parse_key(
                require(&request.app_s_key, "app_s_key", activation)?,
                "app_s_key",
            )?;
            new.keys.nwk_s_key = Some(seal(data_key, "nwk_s_key", device, nwk_s_key));
            new.keys.app_s_key = Some(seal(data_key, "app_s_key", device, app_s_key));
        }
        Activation::External => {
            forbid(&request.join_eui, "join_eui", activation)?;
            forbid(&request.app_key, "app_key", activation)?;
            forbid(&request.dev_addr, "dev_addr", activation)?;
            forbid(&request.nwk_s_key, "nwk_s_key", activation)?;
            forbid(&request.app_s_key, "app_s_key", activation)?;
        }
    }
    Ok(new)
}

/// Returns the registration as the API shows it, without keys.
fn device_json(device: &LorawanDevice) -> serde_json::Value {
    json!({
        "device_id": device.device_id,
        "dev_eui": device.dev_eui,
        "join_eui": device.join_eui,
        "region": device.region,
        "activation": device.activation,
        "mac_version": device.mac_version,
        "dev_addr": device.dev_addr,
        "f_cnt_up": device.f_cnt_up,
        "f_cnt_down": device.n_f_cnt_down,
        "joined_at": device.joined_at,
        "created_at": device.created_at,
        "updated_at": device.updated_at,
    })
}

/// `PUT /api/v1/devices/{id}/lorawan`: registers the device or replaces
/// its registration, which starts a new session.
pub async fn put_device(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let request: PutDevice = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"dev_eui\", \"activation\" and the fields that activation needs: {error}"
        ))
    })?;
    let data_key = state
        .keyring
        .data_key(principal.tenant_id)
        .await
        .map_err(|error| {
            tracing::error!(tenant_id = %principal.tenant_id, %error, "cannot load the tenant's data key");
            ApiError::internal()
        })?;
    let new = new_device(request, id, &data_key)?;
    let stored = state
        .metadata
        .put_lorawan_device(principal.tenant_id, id, &new)
        .await?;
    tracing::info!(device_id = %id, dev_eui = %stored.dev_eui, activation = %stored.activation, by = %principal.subject, "LoRaWAN device registered");
    Ok(Json(device_json(&stored)))
}

/// `GET /api/v1/devices/{id}/lorawan`
pub async fn get_device(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let device = state
        .metadata
        .lorawan_device(principal.tenant_id, device_id(&id)?)
        .await?;
    Ok(Json(device_json(&device)))
}

/// `DELETE /api/v1/devices/{id}/lorawan`: removes the registration, its
/// session and its downlink queue; the device stays.
pub async fn delete_device(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    state
        .metadata
        .delete_lorawan_device(principal.tenant_id, id)
        .await?;
    tracing::info!(device_id = %id, by = %principal.subject, "LoRaWAN device removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Body of `POST /api/v1/devices/{id}/lorawan/downlinks`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueDownlink {
    f_port: u8,
    data: String,
    #[serde(default)]
    confirmed: bool,
}

/// Decodes downlink data: an even number of hex digits is hex, anything
/// else is standard base64.
fn decode_data(text: &str) -> Result<Vec<u8>, ApiError> {
    let text = text.trim();
    if text.len().is_multiple_of(2) && text.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(hex::decode(text).expect("checked hex digits"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|error| {
            invalid(
                "data",
                format!("data must be hex digits or standard base64: {error}"),
            )
        })
}

/// Returns the largest FRMPayload that every receive window of the region
/// can carry, so a queued downlink fits whichever window sends it: the
/// slowest downlink data rates (EU868 DR0, US915 DR8) carry 51 and 33
/// bytes.
fn max_downlink_bytes(region: Option<Region>) -> usize {
    match region {
        Some(Region::Us915) => 33,
        _ => 51,
    }
}

/// `POST /api/v1/devices/{id}/lorawan/downlinks`
pub async fn queue_downlink(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Operator)?;
    let id = device_id(&id)?;
    let request: QueueDownlink = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"f_port\" (1 to 223), \"data\" (hex or base64) and optionally \"confirmed\": {error}"
        ))
    })?;
    if !(1..=223).contains(&request.f_port) {
        return Err(invalid(
            "f_port",
            format!(
                "f_port {} is not an application port: use 1 to 223",
                request.f_port
            ),
        ));
    }
    let data = decode_data(&request.data)?;

    let device = state
        .metadata
        .lorawan_device(principal.tenant_id, id)
        .await?;
    if device.activation == Activation::External {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "Conflict",
            "the device is run by an external network server; queue downlinks there",
        ));
    }
    let max = max_downlink_bytes(device.region);
    if data.len() > max {
        return Err(invalid(
            "data",
            format!(
                "data is {} bytes; the device's region carries at most {max} bytes in every receive window",
                data.len()
            ),
        ));
    }
    let queued = state
        .metadata
        .queue_lorawan_downlink(
            principal.tenant_id,
            id,
            request.f_port,
            &data,
            request.confirmed,
        )
        .await?;
    tracing::info!(device_id = %id, f_port = request.f_port, bytes = data.len(), by = %principal.subject, "LoRaWAN downlink queued");
    Ok((StatusCode::CREATED, Json(json!(queued))))
}

/// `GET /api/v1/devices/{id}/lorawan/downlinks`: downlinks not yet sent.
pub async fn list_downlinks(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let queue = state
        .metadata
        .pending_lorawan_downlinks(principal.tenant_id, device_id(&id)?)
        .await?;
    Ok(Json(json!({ "downlinks": queue })))
}

/// Body of `POST /api/v1/lorawan/gateways`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGateway {
    gateway_eui: String,
    name: String,
}

/// `POST /api/v1/lorawan/gateways`
pub async fn create_gateway(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    body: Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    principal.require(Role::Admin)?;
    let request: CreateGateway = serde_json::from_slice(&body).map_err(|error| {
        ApiError::bad_request(format!(
            "the body must be a JSON object with \"gateway_eui\" and \"name\": {error}"
        ))
    })?;
    let gateway_eui =
        parse_eui(&request.gateway_eui).map_err(|message| invalid("gateway_eui", message))?;
    let name = request.name.trim();
    if name.is_empty() || name.len() > MAX_GATEWAY_NAME_BYTES || name.chars().any(char::is_control)
    {
        return Err(invalid(
            "name",
            format!("name must be 1 to {MAX_GATEWAY_NAME_BYTES} bytes without control characters"),
        ));
    }
    let gateway = state
        .metadata
        .create_lorawan_gateway(principal.tenant_id, &gateway_eui, name)
        .await?;
    tracing::info!(gateway_eui = %gateway.gateway_eui, by = %principal.subject, "LoRaWAN gateway registered");
    Ok((StatusCode::CREATED, Json(json!(gateway))))
}

/// `GET /api/v1/lorawan/gateways`
pub async fn list_gateways(
    State(state): State<Arc<AppState>>,
    principal: Principal,
) -> Result<Json<serde_json::Value>, ApiError> {
    let gateways = state
        .metadata
        .list_lorawan_gateways(principal.tenant_id)
        .await?;
    Ok(Json(json!({ "gateways": gateways })))
}

/// `DELETE /api/v1/lorawan/gateways/{eui}`
pub async fn delete_gateway(
    State(state): State<Arc<AppState>>,
    principal: Principal,
    Path(eui): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require(Role::Admin)?;
    let gateway_eui = parse_eui(&eui).map_err(|_| {
        ApiError::not_found(format!(
            "gateway {eui:?} not found: gateway EUIs are 16 hex digits"
        ))
    })?;
    state
        .metadata
        .delete_lorawan_gateway(principal.tenant_id, &gateway_eui)
        .await?;
    tracing::info!(gateway_eui = %gateway_eui, by = %principal.subject, "LoRaWAN gateway removed");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_key() -> DataKey {
        DataKey::from_bytes(&[9; 32], 1)
    }

    fn request(value: serde_json::Value) -> PutDevice {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn otaa_registration_seals_app_key() {
        let device = DeviceId::new_random();
        let new = new_device(
            request(json!({
                "dev_eui": "0011223344556677", "activation": "otaa", "region": "EU868",
                "join_eui": "70B3D57ED0000000", "app_key": "000102030405060708090a0b0c0d0e0f",
            })),
            device,
            &data_key(),
        )
        .unwrap();
        assert_eq!(new.join_eui.as_deref(), Some("70b3d57ed0000000"));
        let sealed = new.keys.app_key.unwrap();
        let opened = data_key()
            .open(&key_context("app_key", device), &sealed)
            .unwrap();
        assert_eq!(opened, (0u8..16).collect::<Vec<_>>());
    }

    #[test]
    fn registration_errors_name_the_field() {
        let cases = [
            (json!({"dev_eui": "00", "activation": "abp"}), "dev_eui"),
            (
                json!({"dev_eui": "0011223344556677", "activation": "magic"}),
                "activation",
            ),
            (
                json!({"dev_eui": "0011223344556677", "activation": "otaa", "region": "EU868", "app_key": "000102030405060708090a0b0c0d0e0f"}),
                "join_eui",
            ),
            (
                json!({"dev_eui": "0011223344556677", "activation": "abp", "dev_addr": "01020304", "nwk_s_key": "00", "app_s_key": "000102030405060708090a0b0c0d0e0f", "region": "EU868"}),
                "nwk_s_key",
            ),
            (
                json!({"dev_eui": "0011223344556677", "activation": "abp", "dev_addr": "01020304"}),
                "region",
            ),
            (
                json!({"dev_eui": "0011223344556677", "activation": "external", "app_key": "000102030405060708090a0b0c0d0e0f"}),
                "app_key",
            ),
            (
                json!({"dev_eui": "0011223344556677", "activation": "external", "mac_version": "1.1"}),
                "mac_version",
            ),
        ];
        for (body, param) in cases {
            let error =
                new_device(request(body.clone()), DeviceId::new_random(), &data_key()).unwrap_err();
            assert_eq!(error.param, Some(param), "{body}: {}", error.detail);
        }
    }

    #[test]
    fn external_registration_needs_only_dev_eui() {
        let new = new_device(
            request(json!({"dev_eui": "0011223344556677", "activation": "external"})),
            DeviceId::new_random(),
            &data_key(),
        )
        .unwrap();
        assert_eq!(new.activation, Activation::External);
        assert!(new.keys.app_key.is_none());
        assert!(new.region.is_none());
    }

    #[test]
    fn downlink_data_accepts_hex_and_base64() {
        assert_eq!(decode_data("0a0B").unwrap(), vec![0x0a, 0x0b]);
        assert_eq!(decode_data("AQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_data("!!").unwrap_err().param, Some("data"));
    }
}
