//! The Things Stack v3 webhook messages in JSON. Pure: no I/O.
//!
//! Field names follow The Things Stack's "Data Formats" documentation for
//! v3 (application uplink messages: `end_device_ids`, `uplink_message` with
//! `f_port`, `f_cnt`, `frm_payload`, `decoded_payload`, `rx_metadata`,
//! `settings`, `received_at`). The Things Stack leaves out every field whose
//! value is empty, 0 or false, and writes 64-bit integers such as
//! `settings.frequency` as strings. Unknown fields are ignored.

use super::fields::{Object, ParseError, describe, item_object, normalize_eui, parse_root};
use super::uplink::{DataRate, GatewayReception, NetworkServer, Uplink};

/// Message types of The Things Stack other than uplinks, by the field that
/// carries each (the other members of `ApplicationUp` in the v3.36 API). A
/// webhook with one URL for several message types posts them all to the
/// same endpoint.
const OTHER_MESSAGES: [&str; 10] = [
    "join_accept",
    "downlink_ack",
    "downlink_nack",
    "downlink_sent",
    "downlink_failed",
    "downlink_queued",
    "downlink_queue_invalidated",
    "location_solved",
    "service_data",
    "uplink_normalized",
];

/// A webhook message: an uplink, or another message type that is ignored.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Uplink(Box<Uplink>),
    /// A message type that carries no uplink, named by its field.
    Other(&'static str),
}

/// Parses the body of a webhook request.
pub fn parse_message(body: &[u8]) -> Result<Message, ParseError> {
    let map = parse_root(body)?;
    let root = Object::root(&map);

    let Some(uplink_message) = root.object("uplink_message")? else {
        if let Some(kind) = OTHER_MESSAGES
            .iter()
            .find(|kind| root.value(kind).is_some())
        {
            return Ok(Message::Other(kind));
        }
        return Err(ParseError::Missing {
            field: "uplink_message".to_owned(),
            hint: "this endpoint takes uplink messages; enable only \"Uplink message\" for this webhook in The Things Stack",
        });
    };

    let device_ids = root
        .object("end_device_ids")?
        .ok_or_else(|| ParseError::Missing {
            field: "end_device_ids".to_owned(),
            hint: "The Things Stack names the device in end_device_ids.dev_eui",
        })?;
    let dev_eui_text = device_ids.required(
        "dev_eui",
        "Ferrite maps devices by DevEUI; give the end device a DevEUI in The Things Stack",
    )?;
    let dev_eui = dev_eui_text
        .as_str()
        .and_then(normalize_eui)
        .ok_or_else(|| {
            device_ids.invalid(
                "dev_eui",
                format!("expected 16 hex digits, got {}", describe(dev_eui_text)),
            )
        })?;

    let gateways = uplink_message
        .array("rx_metadata")?
        .into_iter()
        .map(|(path, value)| parse_rx_metadata(item_object(path, value)?))
        .collect::<Result<Vec<_>, _>>()?;

    let mut data_rate = DataRate::default();
    let mut frequency = None;
    if let Some(settings) = uplink_message.object("settings")? {
        frequency = settings.unsigned("frequency", u64::MAX)?;
        if let Some(rate) = settings.object("data_rate")? {
            read_data_rate(&rate, &mut data_rate)?;
        }
    }

    // The Application Server's receive time is on the message; the Network
    // Server's is on `uplink_message`, closer to the radio reception.
    let received_at = match uplink_message.time_ns("received_at")? {
        Some(time) => Some(time),
        None => root.time_ns("received_at")?,
    }
    .map(|(nanos, text)| (nanos, text.to_owned()));

    Ok(Message::Uplink(Box::new(Uplink {
        network_server: NetworkServer::TheThingsStack,
        dev_eui,
        f_port: uplink_message.unsigned("f_port", 255)?.unwrap_or(0) as u8,
        f_cnt: uplink_message
            .unsigned("f_cnt", u32::MAX.into())?
            .unwrap_or(0) as u32,
        frm_payload: uplink_message.base64("frm_payload")?,
        confirmed: uplink_message.bool("confirmed")?.unwrap_or(false),
        received_at,
        frequency,
        data_rate,
        gateways,
        decoded: uplink_message.value("decoded_payload").cloned(),
    })))
}

fn parse_rx_metadata(metadata: Object<'_>) -> Result<GatewayReception, ParseError> {
    let mut reception = GatewayReception::default();
    if let Some(ids) = metadata.object("gateway_ids")? {
        reception.gateway_id = ids.string("gateway_id")?.unwrap_or_default().to_owned();
        reception.gateway_eui = match ids.string("eui")? {
            None => None,
            Some(text) => Some(normalize_eui(text).ok_or_else(|| {
                ids.invalid(
                    "eui",
                    format!(
                        "expected 16 hex digits, got {:?}",
                        crate::profiles::preview(text)
                    ),
                )
            })?),
        };
    }
    // `rssi` is the signal strength of the whole packet; older gateways
    // report only the channel's.
    let rssi = match metadata.signed("rssi", i32::MIN.into(), i32::MAX.into())? {
        Some(rssi) => Some(rssi),
        None => metadata.signed("channel_rssi", i32::MIN.into(), i32::MAX.into())?,
    };
    reception.rssi = rssi.map(|rssi| rssi as i32);
    reception.snr = metadata.float("snr")?;
    Ok(reception)
}

/// Reads `settings.data_rate`, which contains one of `lora`, `fsk` or
/// `lrfhss`.
fn read_data_rate(rate: &Object<'_>, data_rate: &mut DataRate) -> Result<(), ParseError> {
    if let Some(lora) = rate.object("lora")? {
        data_rate.modulation = Some("lora");
        data_rate.spreading_factor = lora
            .unsigned("spreading_factor", u8::MAX.into())?
            .map(|factor| factor as u8);
        data_rate.bandwidth = lora
            .unsigned("bandwidth", u32::MAX.into())?
            .map(|hz| hz as u32);
        data_rate.coding_rate = lora.string("coding_rate")?.map(str::to_owned);
    } else if let Some(fsk) = rate.object("fsk")? {
        data_rate.modulation = Some("fsk");
        data_rate.bit_rate = fsk
            .unsigned("bit_rate", u32::MAX.into())?
            .map(|rate| rate as u32);
    } else if rate.value("lrfhss").is_some() {
        data_rate.modulation = Some("lr_fhss");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An uplink message with every field Ferrite reads, written for these
    /// tests from the documented field list.
    const FULL_MESSAGE: &str = r#"{
        "end_device_ids": {
            "device_id": "bench-3",
            "application_ids": {"application_id": "greenhouse"},
            "dev_eui": "70B3D57ED0001A2B",
            "join_eui": "0000000000000000",
            "dev_addr": "260B1C2D"
        },
        "correlation_ids": ["as:up:01HZX"],
        "received_at": "2026-03-14T09:26:54.120Z",
        "uplink_message": {
            "session_key_id": "AYb4",
            "f_port": 3,
            "f_cnt": 41,
            "frm_payload": "AWcA1wJoZA==",
            "decoded_payload": {"temperature_1": 21.5, "relative_humidity_2": 50},
            "rx_metadata": [
                {
                    "gateway_ids": {"gateway_id": "roof-north", "eui": "B827EBFFFE6C279D"},
                    "time": "2026-03-14T09:26:53.580Z",
                    "rssi": -57,
                    "channel_rssi": -57,
                    "snr": 9.5,
                    "channel_index": 2
                },
                {
                    "gateway_ids": {"gateway_id": "packetbroker"},
                    "channel_rssi": -108,
                    "snr": -11
                }
            ],
            "settings": {
                "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7, "coding_rate": "4/5"}},
                "frequency": "868300000",
                "timestamp": 2861003
            },
            "received_at": "2026-03-14T09:26:53.589Z",
            "confirmed": true,
            "consumed_airtime": "0.061696s",
            "network_ids": {"net_id": "000013"}
        }
    }"#;

    fn uplink(body: &str) -> Uplink {
        match parse_message(body.as_bytes()).unwrap() {
            Message::Uplink(uplink) => *uplink,
            Message::Other(kind) => panic!("expected an uplink, got {kind}"),
        }
    }

    #[test]
    fn full_message_is_parsed() {
        let uplink = uplink(FULL_MESSAGE);
        assert_eq!(uplink.network_server, NetworkServer::TheThingsStack);
        assert_eq!(uplink.dev_eui, "70b3d57ed0001a2b");
        assert_eq!(uplink.f_port, 3);
        assert_eq!(uplink.f_cnt, 41);
        assert_eq!(
            uplink.frm_payload,
            [0x01, 0x67, 0x00, 0xd7, 0x02, 0x68, 0x64]
        );
        assert!(uplink.confirmed);
        assert_eq!(uplink.frequency, Some(868_300_000));
        assert_eq!(uplink.data_rate.modulation, Some("lora"));
        assert_eq!(uplink.data_rate.spreading_factor, Some(7));
        assert_eq!(uplink.data_rate.bandwidth, Some(125_000));
        assert_eq!(uplink.data_rate.coding_rate.as_deref(), Some("4/5"));
        assert_eq!(uplink.data_rate.index, None);
        assert_eq!(
            uplink.received_at.as_ref().map(|(_, text)| text.as_str()),
            Some("2026-03-14T09:26:53.589Z"),
            "the Network Server's time comes first"
        );
        assert_eq!(
            uplink.decoded,
            Some(serde_json::json!({"temperature_1": 21.5, "relative_humidity_2": 50}))
        );
    }

    #[test]
    fn gateways_keep_id_and_eui() {
        let uplink = uplink(FULL_MESSAGE);
        assert_eq!(uplink.gateways.len(), 2);
        assert_eq!(uplink.gateways[0].gateway_id, "roof-north");
        assert_eq!(
            uplink.gateways[0].gateway_eui.as_deref(),
            Some("b827ebfffe6c279d")
        );
        assert_eq!(uplink.gateways[0].rssi, Some(-57));
        assert_eq!(uplink.gateways[0].snr, Some(9.5));
        assert_eq!(uplink.gateways[1].gateway_eui, None);
        assert_eq!(uplink.gateways[1].rssi, Some(-108), "channel_rssi fills in");
        assert_eq!(uplink.gateways[1].snr, Some(-11.0));
    }

    #[test]
    fn omitted_zero_fields_get_defaults() {
        let uplink = uplink(
            r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "received_at": "2026-03-14T09:26:54Z", "uplink_message": {"frm_payload": "AQ=="}}"#,
        );
        assert_eq!(uplink.f_port, 0);
        assert_eq!(uplink.f_cnt, 0);
        assert!(!uplink.confirmed);
        assert_eq!(uplink.frm_payload, [1]);
        assert_eq!(
            uplink.received_at.map(|(_, text)| text),
            Some("2026-03-14T09:26:54Z".to_owned()),
            "the message's own time is the fallback"
        );
    }

    #[test]
    fn other_message_types_are_recognized() {
        let body = br#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "join_accept": {"session_key_id": "AYb4"}}"#;
        assert_eq!(parse_message(body), Ok(Message::Other("join_accept")));
    }

    #[test]
    fn bad_messages_name_the_field() {
        let cases: &[(&str, &str)] = &[
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}}"#,
                "uplink_message",
            ),
            (r#"{"uplink_message": {}}"#, "end_device_ids"),
            (
                r#"{"end_device_ids": {"device_id": "a"}, "uplink_message": {}}"#,
                "end_device_ids.dev_eui",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "xyz"}, "uplink_message": {}}"#,
                "end_device_ids.dev_eui",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"f_cnt": -1}}"#,
                "uplink_message.f_cnt",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"frm_payload": 5}}"#,
                "uplink_message.frm_payload",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"settings": {"frequency": "high"}}}"#,
                "uplink_message.settings.frequency",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"rx_metadata": [{"gateway_ids": {"eui": "12"}}]}}"#,
                "uplink_message.rx_metadata[0].gateway_ids.eui",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"rx_metadata": [{"snr": "good"}]}}"#,
                "uplink_message.rx_metadata[0].snr",
            ),
            (
                r#"{"end_device_ids": {"dev_eui": "0102030405060708"}, "uplink_message": {"received_at": 12}}"#,
                "uplink_message.received_at",
            ),
        ];
        for (body, field) in cases {
            let error = parse_message(body.as_bytes()).unwrap_err();
            assert_eq!(error.field(), Some(*field), "{body}: {error}");
            assert!(error.to_string().contains(field), "{body}: {error}");
        }
    }
}
