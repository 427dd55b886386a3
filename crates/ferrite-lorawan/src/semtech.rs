//! The Semtech UDP packet forwarder protocol, versions 1 and 2.
//!
//! Every datagram starts with a 4-byte header: protocol version, a 2-byte
//! random token and a packet identifier. Gateways send PUSH_DATA with
//! received packets and status, which the server acknowledges with
//! PUSH_ACK. They send PULL_DATA as a keep-alive that opens the path for
//! downlinks, acknowledged with PULL_ACK. Version 2 gateways also send
//! TX_ACK with the outcome of a downlink. The server sends PULL_RESP with a
//! downlink to the address the last PULL_DATA came from.
//!
//! ```text
//! PUSH_DATA  ver | token(2) | 0x00 | gateway EUI(8) | JSON {"rxpk": [..], "stat": {..}}
//! PUSH_ACK   ver | token(2) | 0x01
//! PULL_DATA  ver | token(2) | 0x02 | gateway EUI(8)
//! PULL_RESP  ver | token(2) | 0x03 | JSON {"txpk": {..}}
//! PULL_ACK   ver | token(2) | 0x04
//! TX_ACK     ver | token(2) | 0x05 | gateway EUI(8) | optional JSON {"txpk_ack": {..}}
//! ```
//!
//! Decoding is strict about what the server reads: a missing or mistyped
//! field is an error that names it (`rxpk[0].tmst`). Fields the server does
//! not read are ignored, because forwarders add their own.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::region::DataRate;

const HEADER_LEN: usize = 4;
const EUI_LEN: usize = 8;

/// Packet identifiers.
pub const PUSH_DATA: u8 = 0x00;
pub const PUSH_ACK: u8 = 0x01;
pub const PULL_DATA: u8 = 0x02;
pub const PULL_RESP: u8 = 0x03;
pub const PULL_ACK: u8 = 0x04;
pub const TX_ACK: u8 = 0x05;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SemtechError {
    #[error(
        "the datagram is {len} bytes, shorter than the {needed} bytes the {packet} header needs"
    )]
    Truncated {
        packet: &'static str,
        len: usize,
        needed: usize,
    },
    #[error("protocol version {0} is not supported: expected 1 or 2")]
    UnsupportedVersion(u8),
    #[error("unknown packet identifier 0x{0:02x}: expected 0x00 to 0x05")]
    UnknownIdentifier(u8),
    #[error("invalid {packet} JSON at {field}: {message}")]
    InvalidJson {
        packet: &'static str,
        field: String,
        message: String,
    },
    #[error("invalid {field}: {message}")]
    InvalidField { field: String, message: String },
}

/// One datagram of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    PushData {
        version: u8,
        token: u16,
        gateway_eui: [u8; 8],
        payload: PushDataPayload,
    },
    PushAck {
        version: u8,
        token: u16,
    },
    PullData {
        version: u8,
        token: u16,
        gateway_eui: [u8; 8],
    },
    PullResp {
        version: u8,
        token: u16,
        payload: PullRespPayload,
    },
    PullAck {
        version: u8,
        token: u16,
    },
    TxAck {
        version: u8,
        token: u16,
        gateway_eui: [u8; 8],
        payload: TxAckPayload,
    },
}

/// JSON body of PUSH_DATA.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushDataPayload {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rxpk: Vec<RxPk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
}

/// A packet the gateway received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RxPk {
    /// UTC time of reception (ISO 8601), when the gateway has GPS or NTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// GPS time of reception in milliseconds since 1980-01-06.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmms: Option<u64>,
    /// Concentrator counter in microseconds at the end of reception; it
    /// wraps at 2^32 and is what downlinks are scheduled against.
    pub tmst: u32,
    /// Centre frequency in MHz.
    pub freq: f64,
    #[serde(default)]
    pub chan: u8,
    #[serde(default)]
    pub rfch: u8,
    /// CRC status: 1 OK, -1 failed, 0 no CRC.
    pub stat: i8,
    /// Modulation: `LORA` or `FSK`.
    pub modu: String,
    /// `SF7BW125` for LoRa, bits per second for FSK.
    pub datr: DataRateField,
    /// LoRa coding rate, such as `4/5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codr: Option<String>,
    /// Received signal strength in dBm.
    pub rssi: i32,
    /// LoRa signal-to-noise ratio in dB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsnr: Option<f64>,
    /// Size of the PHYPayload in bytes.
    pub size: u16,
    /// The PHYPayload, base64.
    pub data: String,
}

/// The `datr` field: a string for LoRa, a number for FSK.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DataRateField {
    Lora(String),
    Fsk(u32),
}

impl RxPk {
    /// Returns the LoRa data rate, or `None` for FSK.
    pub fn lora_data_rate(&self) -> Option<DataRate> {
        match &self.datr {
            DataRateField::Lora(text) if self.modu == "LORA" => text.parse().ok(),
            _ => None,
        }
    }

    /// Returns the decoded PHYPayload.
    pub fn phy_payload(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .unwrap_or_default()
    }
}

/// Gateway status, sent about every 30 s. Every field is optional because
/// forwarders differ in what they fill in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stat {
    /// UTC time of the status, `2014-01-12 08:59:28 GMT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lati: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alti: Option<i32>,
    /// Packets received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rxnb: Option<u32>,
    /// Packets received with a valid CRC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rxok: Option<u32>,
    /// Packets forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rxfw: Option<u32>,
    /// Percentage of upstream datagrams that were acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ackr: Option<f64>,
    /// Downlinks received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dwnb: Option<u32>,
    /// Packets transmitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txnb: Option<u32>,
}

/// JSON body of PULL_RESP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRespPayload {
    pub txpk: TxPk,
}

/// A packet for the gateway to transmit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxPk {
    /// Send at once, ignoring `tmst`.
    #[serde(default)]
    pub imme: bool,
    /// Concentrator counter in microseconds at which to transmit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmms: Option<u64>,
    /// Centre frequency in MHz.
    pub freq: f64,
    pub rfch: u8,
    /// Transmit power in dBm.
    pub powe: u8,
    pub modu: String,
    pub datr: DataRateField,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codr: Option<String>,
    /// Inverted polarization, which LoRaWAN downlinks use so that other
    /// gateways do not hear them as uplinks.
    #[serde(default)]
    pub ipol: bool,
    pub size: u16,
    pub data: String,
    /// Leave out the physical-layer CRC, as LoRaWAN downlinks do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ncrc: Option<bool>,
}

impl TxPk {
    /// Returns the decoded PHYPayload.
    pub fn phy_payload(&self) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .unwrap_or_default()
    }
}

/// JSON body of TX_ACK; version 2 gateways may send none, meaning success.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TxAckPayload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txpk_ack: Option<TxPkAck>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TxPkAck {
    /// `NONE` on success, otherwise `TOO_LATE`, `TOO_EARLY`,
    /// `COLLISION_PACKET`, `COLLISION_BEACON`, `TX_FREQ`, `TX_POWER` or
    /// `GPS_UNLOCKED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A warning, such as `TX_POWER` when the gateway lowered the power.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warn: Option<String>,
}

impl TxAckPayload {
    /// Returns the error code of a failed transmission, or `None` when the
    /// gateway sent the packet.
    pub fn error(&self) -> Option<&str> {
        self.txpk_ack
            .as_ref()
            .and_then(|ack| ack.error.as_deref())
            .filter(|code| *code != "NONE")
    }
}

fn packet_name(identifier: u8) -> &'static str {
    match identifier {
        PUSH_DATA => "PUSH_DATA",
        PUSH_ACK => "PUSH_ACK",
        PULL_DATA => "PULL_DATA",
        PULL_RESP => "PULL_RESP",
        PULL_ACK => "PULL_ACK",
        TX_ACK => "TX_ACK",
        _ => "unknown",
    }
}

fn check_len(bytes: &[u8], identifier: u8, needed: usize) -> Result<(), SemtechError> {
    if bytes.len() < needed {
        return Err(SemtechError::Truncated {
            packet: packet_name(identifier),
            len: bytes.len(),
            needed,
        });
    }
    Ok(())
}

fn read_eui(bytes: &[u8]) -> [u8; 8] {
    bytes[HEADER_LEN..HEADER_LEN + EUI_LEN]
        .try_into()
        .expect("length checked before")
}

/// Parses JSON, naming the path of the first wrong field in the error.
fn parse_json<T: serde::de::DeserializeOwned>(
    json: &[u8],
    packet: &'static str,
) -> Result<T, SemtechError> {
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        SemtechError::InvalidJson {
            packet,
            field: if path == "." {
                "the top level".to_owned()
            } else {
                path
            },
            message: error.into_inner().to_string(),
        }
    })
}

/// Checks the values of received packets that serde cannot check: base64
/// data whose length matches `size`, and a known modulation and data rate.
fn validate_rxpk(rxpk: &[RxPk]) -> Result<(), SemtechError> {
    for (index, packet) in rxpk.iter().enumerate() {
        let invalid = |field: &str, message: String| SemtechError::InvalidField {
            field: format!("rxpk[{index}].{field}"),
            message,
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(&packet.data)
            .map_err(|error| invalid("data", format!("not base64: {error}")))?;
        if data.len() != usize::from(packet.size) {
            return Err(invalid(
                "size",
                format!("size is {} but data has {} bytes", packet.size, data.len()),
            ));
        }
        match (packet.modu.as_str(), &packet.datr) {
            ("LORA", DataRateField::Lora(text)) => {
                text.parse::<DataRate>()
                    .map_err(|error| invalid("datr", error.to_string()))?;
            }
            ("FSK", DataRateField::Fsk(_)) => {}
            ("LORA" | "FSK", _) => {
                return Err(invalid(
                    "datr",
                    format!(
                        "datr must be a string such as \"SF7BW125\" for LORA and a number for FSK; modu is {}",
                        packet.modu
                    ),
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "modu",
                    format!("unknown modulation {other:?}: expected LORA or FSK"),
                ));
            }
        }
        if !packet.freq.is_finite() || packet.freq <= 0.0 {
            return Err(invalid(
                "freq",
                format!("{} is not a frequency in MHz", packet.freq),
            ));
        }
    }
    Ok(())
}

/// Decodes one datagram.
pub fn decode(bytes: &[u8]) -> Result<Packet, SemtechError> {
    if bytes.len() < HEADER_LEN {
        return Err(SemtechError::Truncated {
            packet: "Semtech UDP",
            len: bytes.len(),
            needed: HEADER_LEN,
        });
    }
    let version = bytes[0];
    if version != 1 && version != 2 {
        return Err(SemtechError::UnsupportedVersion(version));
    }
    let token = u16::from_be_bytes([bytes[1], bytes[2]]);
    let identifier = bytes[3];

    match identifier {
        PUSH_DATA => {
            check_len(bytes, identifier, HEADER_LEN + EUI_LEN)?;
            let payload: PushDataPayload = parse_json(&bytes[HEADER_LEN + EUI_LEN..], "PUSH_DATA")?;
            validate_rxpk(&payload.rxpk)?;
            Ok(Packet::PushData {
                version,
                token,
                gateway_eui: read_eui(bytes),
                payload,
            })
        }
        PUSH_ACK => Ok(Packet::PushAck { version, token }),
        PULL_DATA => {
            check_len(bytes, identifier, HEADER_LEN + EUI_LEN)?;
            Ok(Packet::PullData {
                version,
                token,
                gateway_eui: read_eui(bytes),
            })
        }
        PULL_RESP => Ok(Packet::PullResp {
            version,
            token,
            payload: parse_json(&bytes[HEADER_LEN..], "PULL_RESP")?,
        }),
        PULL_ACK => Ok(Packet::PullAck { version, token }),
        TX_ACK => {
            check_len(bytes, identifier, HEADER_LEN + EUI_LEN)?;
            let json = &bytes[HEADER_LEN + EUI_LEN..];
            // Some forwarders end the datagram with a NUL byte.
            let json = json.strip_suffix(&[0]).unwrap_or(json);
            let payload = if json.iter().all(u8::is_ascii_whitespace) {
                TxAckPayload::default()
            } else {
                parse_json(json, "TX_ACK")?
            };
            Ok(Packet::TxAck {
                version,
                token,
                gateway_eui: read_eui(bytes),
                payload,
            })
        }
        other => Err(SemtechError::UnknownIdentifier(other)),
    }
}

fn header(version: u8, token: u16, identifier: u8) -> Vec<u8> {
    let token = token.to_be_bytes();
    vec![version, token[0], token[1], identifier]
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("the packet bodies serialize to JSON")
}

/// Encodes one datagram.
pub fn encode(packet: &Packet) -> Vec<u8> {
    match packet {
        Packet::PushData {
            version,
            token,
            gateway_eui,
            payload,
        } => {
            let mut bytes = header(*version, *token, PUSH_DATA);
            bytes.extend_from_slice(gateway_eui);
            bytes.extend(to_json(payload));
            bytes
        }
        Packet::PushAck { version, token } => header(*version, *token, PUSH_ACK),
        Packet::PullData {
            version,
            token,
            gateway_eui,
        } => {
            let mut bytes = header(*version, *token, PULL_DATA);
            bytes.extend_from_slice(gateway_eui);
            bytes
        }
        Packet::PullResp {
            version,
            token,
            payload,
        } => {
            let mut bytes = header(*version, *token, PULL_RESP);
            bytes.extend(to_json(payload));
            bytes
        }
        Packet::PullAck { version, token } => header(*version, *token, PULL_ACK),
        Packet::TxAck {
            version,
            token,
            gateway_eui,
            payload,
        } => {
            let mut bytes = header(*version, *token, TX_ACK);
            bytes.extend_from_slice(gateway_eui);
            if payload.txpk_ack.is_some() {
                bytes.extend(to_json(payload));
            }
            bytes
        }
    }
}

/// Builds the `txpk` of a LoRa downlink: inverted polarization, no CRC,
/// coding rate 4/5, sent at concentrator time `tmst` (microseconds).
pub fn lora_txpk(
    phy_payload: &[u8],
    tmst: u32,
    frequency_hz: u32,
    data_rate: DataRate,
    power_dbm: u8,
) -> TxPk {
    TxPk {
        imme: false,
        tmst: Some(tmst),
        tmms: None,
        freq: crate::region::hz_to_mhz(frequency_hz),
        rfch: 0,
        powe: power_dbm,
        modu: "LORA".to_owned(),
        datr: DataRateField::Lora(data_rate.to_string()),
        codr: Some("4/5".to_owned()),
        ipol: true,
        size: phy_payload.len() as u16,
        data: base64::engine::general_purpose::STANDARD.encode(phy_payload),
        ncrc: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const EUI: [u8; 8] = [0xaa, 0x55, 0x5a, 0, 0, 0, 0, 0x01];

    fn push_data(json: &str) -> Vec<u8> {
        let mut bytes = vec![2, 0x12, 0x34, PUSH_DATA];
        bytes.extend_from_slice(&EUI);
        bytes.extend_from_slice(json.as_bytes());
        bytes
    }

    const RXPK: &str = r#"{"rxpk":[{"time":"2013-03-31T16:21:17.528002Z","tmst":3512348611,"chan":2,"rfch":0,"freq":866.349812,"stat":1,"modu":"LORA","datr":"SF7BW125","codr":"4/6","rssi":-35,"lsnr":5.1,"size":32,"data":"+DS4CGaDCdG+48eJNM3Vai+zDpsR71Pn9CPA9uCON84="}]}"#;

    #[test]
    fn push_data_with_rxpk_decodes() {
        let Packet::PushData {
            version,
            token,
            gateway_eui,
            payload,
        } = decode(&push_data(RXPK)).unwrap()
        else {
            panic!("not PUSH_DATA");
        };
        assert_eq!(version, 2);
        assert_eq!(token, 0x1234);
        assert_eq!(gateway_eui, EUI);
        let rxpk = &payload.rxpk[0];
        assert_eq!(rxpk.tmst, 3_512_348_611);
        assert_eq!(rxpk.lora_data_rate(), Some(DataRate::new(7, 125)));
        assert_eq!(rxpk.lsnr, Some(5.1));
        assert_eq!(rxpk.phy_payload().len(), 32);
    }

    #[test]
    fn stat_only_push_data_decodes() {
        let json = r#"{"stat":{"time":"2014-01-12 08:59:28 GMT","lati":46.24,"long":3.2523,"alti":145,"rxnb":2,"rxok":2,"rxfw":2,"ackr":100.0,"dwnb":2,"txnb":2}}"#;
        let Packet::PushData { payload, .. } = decode(&push_data(json)).unwrap() else {
            panic!("not PUSH_DATA");
        };
        assert!(payload.rxpk.is_empty());
        assert_eq!(payload.stat.unwrap().rxnb, Some(2));
    }

    #[test]
    fn json_errors_name_the_field() {
        let cases = [
            (r#"{"rxpk":[{"tmst":"x"}]}"#, "rxpk[0].tmst"),
            (
                r#"{"rxpk":[{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","rssi":-3,"size":1,"data":"AAA="}]}"#,
                "rxpk[0].size",
            ),
            (
                r#"{"rxpk":[{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF6BW125","rssi":-3,"size":1,"data":"AA=="}]}"#,
                "rxpk[0].datr",
            ),
            (
                r#"{"rxpk":[{"tmst":1,"freq":868.1,"stat":1,"modu":"LORA","datr":"SF7BW125","rssi":-3,"size":1,"data":"%%"}]}"#,
                "rxpk[0].data",
            ),
            (
                r#"{"rxpk":[{"tmst":1,"freq":868.1,"stat":1,"modu":"QPSK","datr":"SF7BW125","rssi":-3,"size":1,"data":"AA=="}]}"#,
                "rxpk[0].modu",
            ),
            (r#"{"stat":{"rxnb":-1}}"#, "stat.rxnb"),
            (r#""text""#, "the top level"),
        ];
        for (json, field) in cases {
            let error = decode(&push_data(json)).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(field), "{json}: {text}");
        }
    }

    #[test]
    fn truncated_and_unknown_datagrams_are_errors() {
        assert!(matches!(
            decode(&[2, 0, 0]),
            Err(SemtechError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[2, 0, 0, PULL_DATA, 1, 2, 3]),
            Err(SemtechError::Truncated { needed: 12, .. })
        ));
        assert_eq!(
            decode(&[3, 0, 0, PULL_DATA]),
            Err(SemtechError::UnsupportedVersion(3))
        );
        assert_eq!(
            decode(&[1, 0, 0, 0x09]),
            Err(SemtechError::UnknownIdentifier(9))
        );
    }

    #[test]
    fn tx_ack_with_and_without_json() {
        let mut bytes = vec![2, 0, 7, TX_ACK];
        bytes.extend_from_slice(&EUI);
        let Packet::TxAck { payload, token, .. } = decode(&bytes).unwrap() else {
            panic!("not TX_ACK");
        };
        assert_eq!(token, 7);
        assert_eq!(payload.error(), None);

        bytes.extend_from_slice(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
        bytes.push(0);
        let Packet::TxAck { payload, .. } = decode(&bytes).unwrap() else {
            panic!("not TX_ACK");
        };
        assert_eq!(payload.error(), Some("TOO_LATE"));
    }

    #[test]
    fn packets_round_trip() {
        let txpk = lora_txpk(
            &[1, 2, 3],
            5_000_000,
            869_525_000,
            DataRate::new(12, 125),
            14,
        );
        let packets = [
            Packet::PushAck {
                version: 2,
                token: 9,
            },
            Packet::PullAck {
                version: 1,
                token: 65_535,
            },
            Packet::PullData {
                version: 2,
                token: 1,
                gateway_eui: EUI,
            },
            Packet::PullResp {
                version: 2,
                token: 3,
                payload: PullRespPayload { txpk },
            },
            Packet::TxAck {
                version: 2,
                token: 3,
                gateway_eui: EUI,
                payload: TxAckPayload {
                    txpk_ack: Some(TxPkAck {
                        error: Some("NONE".to_owned()),
                        warn: None,
                    }),
                },
            },
        ];
        for packet in packets {
            assert_eq!(decode(&encode(&packet)).unwrap(), packet);
        }
    }

    #[test]
    fn txpk_json_has_the_downlink_settings() {
        let txpk = lora_txpk(&[1, 2, 3], 42, 868_100_000, DataRate::new(7, 125), 14);
        let json = serde_json::to_value(&txpk).unwrap();
        assert_eq!(json["tmst"], 42);
        assert_eq!(json["freq"], 868.1);
        assert_eq!(json["datr"], "SF7BW125");
        assert_eq!(json["ipol"], true);
        assert_eq!(json["size"], 3);
        assert_eq!(json["data"], "AQID");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_of_any_json_body_never_panics(version in 1u8..=2, identifier in 0u8..=5, body in ".{0,80}") {
            let mut bytes = vec![version, 0, 0, identifier];
            bytes.extend_from_slice(&EUI);
            bytes.extend_from_slice(body.as_bytes());
            let _ = decode(&bytes);
        }
    }
}
