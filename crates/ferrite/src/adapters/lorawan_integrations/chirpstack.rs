//! ChirpStack v4 uplink events (`up`) in JSON. Pure: no I/O.
//!
//! Field names follow ChirpStack v4's protobuf definitions
//! (`api/proto/integration/integration.proto`, message `UplinkEvent`, and
//! `api/proto/gw/gw.proto`, messages `UplinkRxInfo` and `UplinkTxInfo`) in
//! the protobuf JSON mapping, so `f_cnt` is written `fCnt` and bytes are
//! base64. ChirpStack writes every field of the event itself, but the
//! fields of `rxInfo` and `txInfo` only when they are not 0, so those
//! default to "unknown". Unknown fields are ignored.

use super::fields::{Object, ParseError, describe, item_object, normalize_eui, parse_root};
use super::uplink::{DataRate, GatewayReception, NetworkServer, Uplink};

/// Parses the body of an `up` event.
pub fn parse_uplink(body: &[u8]) -> Result<Uplink, ParseError> {
    let map = parse_root(body)?;
    let root = Object::root(&map);

    let device_info = root
        .object("deviceInfo")?
        .ok_or_else(|| ParseError::Missing {
            field: "deviceInfo".to_owned(),
            hint: "ChirpStack uplink events name the device in deviceInfo.devEui; check that the integration posts the up event in JSON",
        })?;
    let dev_eui_text = device_info.required(
        "devEui",
        "every ChirpStack uplink event carries the device's DevEUI",
    )?;
    let dev_eui = dev_eui_text
        .as_str()
        .and_then(normalize_eui)
        .ok_or_else(|| {
            device_info.invalid(
                "devEui",
                format!("expected 16 hex digits, got {}", describe(dev_eui_text)),
            )
        })?;

    let gateways = root
        .array("rxInfo")?
        .into_iter()
        .map(|(path, value)| parse_rx_info(item_object(path, value)?))
        .collect::<Result<Vec<_>, _>>()?;

    let mut data_rate = DataRate {
        index: root.unsigned("dr", 15)?.map(|index| index as u8),
        ..DataRate::default()
    };
    let mut frequency = None;
    if let Some(tx_info) = root.object("txInfo")? {
        frequency = tx_info.unsigned("frequency", u32::MAX.into())?;
        if let Some(modulation) = tx_info.object("modulation")? {
            read_modulation(&modulation, &mut data_rate)?;
        }
    }

    let received_at = root
        .time_ns("time")?
        .map(|(nanos, text)| (nanos, text.to_owned()));

    Ok(Uplink {
        network_server: NetworkServer::ChirpStack,
        dev_eui,
        f_port: root.unsigned("fPort", 255)?.unwrap_or(0) as u8,
        f_cnt: root.unsigned("fCnt", u32::MAX.into())?.unwrap_or(0) as u32,
        frm_payload: root.base64("data")?,
        confirmed: root.bool("confirmed")?.unwrap_or(false),
        received_at,
        frequency,
        data_rate,
        gateways,
        decoded: root.value("object").cloned(),
    })
}

fn parse_rx_info(rx_info: Object<'_>) -> Result<GatewayReception, ParseError> {
    let gateway_id = rx_info.string("gatewayId")?.unwrap_or_default().to_owned();
    Ok(GatewayReception {
        gateway_eui: normalize_eui(&gateway_id),
        gateway_id,
        rssi: rx_info
            .signed("rssi", i32::MIN.into(), i32::MAX.into())?
            .map(|rssi| rssi as i32),
        snr: rx_info.float("snr")?,
    })
}

/// Reads `txInfo.modulation`, which contains one of `lora`, `fsk` or `lrFhss`.
fn read_modulation(modulation: &Object<'_>, data_rate: &mut DataRate) -> Result<(), ParseError> {
    if let Some(lora) = modulation.object("lora")? {
        data_rate.modulation = Some("lora");
        data_rate.spreading_factor = lora
            .unsigned("spreadingFactor", u8::MAX.into())?
            .map(|factor| factor as u8);
        data_rate.bandwidth = lora
            .unsigned("bandwidth", u32::MAX.into())?
            .map(|hz| hz as u32);
        data_rate.coding_rate = lora.string("codeRate")?.and_then(coding_rate);
    } else if let Some(fsk) = modulation.object("fsk")? {
        data_rate.modulation = Some("fsk");
        data_rate.bit_rate = fsk
            .unsigned("datarate", u32::MAX.into())?
            .map(|rate| rate as u32);
    } else if modulation.value("lrFhss").is_some() {
        data_rate.modulation = Some("lr_fhss");
    }
    Ok(())
}

/// Turns ChirpStack's `CodeRate` enum name (`CR_4_5`, `CR_LI_4_8`) into the
/// usual `4/5` notation; `CR_UNDEFINED` gives none.
fn coding_rate(name: &str) -> Option<String> {
    let digits = name
        .strip_prefix("CR_LI_")
        .or_else(|| name.strip_prefix("CR_"))?;
    let (numerator, denominator) = digits.split_once('_')?;
    (numerator.parse::<u8>().is_ok() && denominator.parse::<u8>().is_ok())
        .then(|| format!("{numerator}/{denominator}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `up` event with every field Ferrite reads, written for these
    /// tests from the field list of `UplinkEvent`.
    const FULL_EVENT: &str = r#"{
        "deduplicationId": "5b7f8b0e-4d9a-4c1f-9a55-2f3e1c0d9b11",
        "time": "2026-03-14T09:26:53.589Z",
        "deviceInfo": {
            "tenantId": "0f6ad7b6-3c7e-4b8e-8f54-0d2c5e1a7b90",
            "applicationId": "6a1b2c3d-0000-4000-8000-00000000a001",
            "applicationName": "greenhouse",
            "deviceName": "bench-3",
            "devEui": "70B3D57ED0001A2B",
            "tags": {"row": "3"}
        },
        "devAddr": "0127ab9f",
        "adr": true,
        "dr": 5,
        "fCnt": 41,
        "fPort": 3,
        "confirmed": true,
        "data": "AWcA1wJoZA==",
        "object": {"temperature_1": 21.5},
        "rxInfo": [
            {"gatewayId": "b827ebfffe6c279d", "uplinkId": 1204, "rssi": -57, "snr": 9.5, "channel": 2, "context": "AAAAAA=="},
            {"gatewayId": "0016c001ff10a235", "rssi": -101, "snr": -7.25}
        ],
        "txInfo": {
            "frequency": 868300000,
            "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 7, "codeRate": "CR_4_5"}}
        },
        "someFutureField": {"ignored": true}
    }"#;

    #[test]
    fn full_event_is_parsed() {
        let uplink = parse_uplink(FULL_EVENT.as_bytes()).unwrap();
        assert_eq!(uplink.network_server, NetworkServer::ChirpStack);
        assert_eq!(uplink.dev_eui, "70b3d57ed0001a2b");
        assert_eq!(uplink.f_port, 3);
        assert_eq!(uplink.f_cnt, 41);
        assert_eq!(
            uplink.frm_payload,
            [0x01, 0x67, 0x00, 0xd7, 0x02, 0x68, 0x64]
        );
        assert!(uplink.confirmed);
        assert_eq!(uplink.frequency, Some(868_300_000));
        assert_eq!(uplink.data_rate.index, Some(5));
        assert_eq!(uplink.data_rate.modulation, Some("lora"));
        assert_eq!(uplink.data_rate.spreading_factor, Some(7));
        assert_eq!(uplink.data_rate.bandwidth, Some(125_000));
        assert_eq!(uplink.data_rate.coding_rate.as_deref(), Some("4/5"));
        assert_eq!(
            uplink.received_at,
            Some((
                1_773_480_413_589_000_000,
                "2026-03-14T09:26:53.589Z".to_owned()
            ))
        );
        assert_eq!(
            uplink.decoded,
            Some(serde_json::json!({"temperature_1": 21.5}))
        );
    }

    #[test]
    fn every_gateway_is_kept() {
        let uplink = parse_uplink(FULL_EVENT.as_bytes()).unwrap();
        assert_eq!(uplink.gateways.len(), 2);
        assert_eq!(uplink.gateways[0].gateway_id, "b827ebfffe6c279d");
        assert_eq!(
            uplink.gateways[0].gateway_eui.as_deref(),
            Some("b827ebfffe6c279d")
        );
        assert_eq!(uplink.gateways[0].rssi, Some(-57));
        assert_eq!(uplink.gateways[0].snr, Some(9.5));
        assert_eq!(uplink.gateways[1].rssi, Some(-101));
        assert_eq!(uplink.gateways[1].snr, Some(-7.25));
    }

    #[test]
    fn minimal_event_gets_defaults() {
        let uplink = parse_uplink(br#"{"deviceInfo": {"devEui": "0102030405060708"}}"#).unwrap();
        assert_eq!(uplink.f_port, 0);
        assert_eq!(uplink.f_cnt, 0);
        assert!(uplink.frm_payload.is_empty());
        assert!(uplink.is_mac_only());
        assert!(uplink.gateways.is_empty());
        assert_eq!(uplink.received_at, None);
        assert_eq!(uplink.decoded, None);
    }

    #[test]
    fn null_message_fields_are_absent() {
        let body = br#"{"deviceInfo": {"devEui": "0102030405060708"}, "object": null, "txInfo": null, "rxInfo": null, "fPort": 1, "data": "AQ=="}"#;
        let uplink = parse_uplink(body).unwrap();
        assert_eq!(uplink.decoded, None);
        assert_eq!(uplink.frequency, None);
        assert_eq!(uplink.frm_payload, [1]);
    }

    #[test]
    fn bad_events_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (r#"{"fCnt": 1}"#, "deviceInfo"),
            (
                r#"{"deviceInfo": {"deviceName": "a"}}"#,
                "deviceInfo.devEui",
            ),
            (
                r#"{"deviceInfo": {"devEui": "70b3d57e"}}"#,
                "deviceInfo.devEui",
            ),
            (r#"{"deviceInfo": {"devEui": 12}}"#, "deviceInfo.devEui"),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "fCnt": "x"}"#,
                "fCnt",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "fPort": 256}"#,
                "fPort",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "data": "%%"}"#,
                "data",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "time": "yesterday"}"#,
                "time",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "rxInfo": [{"rssi": -50}, {"rssi": "loud"}]}"#,
                "rxInfo[1].rssi",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "rxInfo": [7]}"#,
                "rxInfo[0]",
            ),
            (
                r#"{"deviceInfo": {"devEui": "0102030405060708"}, "txInfo": {"modulation": {"lora": {"spreadingFactor": -7}}}}"#,
                "txInfo.modulation.lora.spreadingFactor",
            ),
        ];
        for (body, field) in cases {
            let error = parse_uplink(body.as_bytes()).unwrap_err();
            assert_eq!(error.field(), Some(*field), "{body}: {error}");
            assert!(error.to_string().contains(field), "{body}: {error}");
        }
    }

    #[test]
    fn malformed_json_is_a_syntax_error() {
        let error = parse_uplink(b"{\"deviceInfo\": ").unwrap_err();
        assert!(matches!(error, ParseError::Syntax(_)), "{error}");
    }

    #[test]
    fn code_rate_names_become_fractions() {
        assert_eq!(coding_rate("CR_4_5").as_deref(), Some("4/5"));
        assert_eq!(coding_rate("CR_LI_4_8").as_deref(), Some("4/8"));
        assert_eq!(coding_rate("CR_UNDEFINED"), None);
    }
}
