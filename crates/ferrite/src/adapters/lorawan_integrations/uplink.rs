//! [`Uplink`]: one data uplink as another network server reports it,
//! whatever its event format, and the JSON `meta` it becomes in the
//! envelope. Pure: no I/O.

use serde::Serialize;

/// The network server that delivered an uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NetworkServer {
    #[serde(rename = "chirpstack")]
    ChirpStack,
    #[serde(rename = "the_things_stack")]
    TheThingsStack,
}

impl NetworkServer {
    /// Returns the name used in `meta.network_server`, log fields and metric
    /// labels.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkServer::ChirpStack => "chirpstack",
            NetworkServer::TheThingsStack => "the_things_stack",
        }
    }
}

/// A data uplink. Fields the event left out have their protobuf default
/// (0, false, empty) or are `None` where no default makes sense.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    pub network_server: NetworkServer,
    /// 16 lowercase hex digits.
    pub dev_eui: String,
    pub f_port: u8,
    pub f_cnt: u32,
    /// The decrypted FRMPayload; empty for a frame with MAC commands only.
    pub frm_payload: Vec<u8>,
    pub confirmed: bool,
    /// Time the network server received the uplink, in nanoseconds since
    /// the Unix epoch, with the text it was read from.
    pub received_at: Option<(i64, String)>,
    /// Uplink frequency in Hz.
    pub frequency: Option<u64>,
    pub data_rate: DataRate,
    /// Every gateway that received the frame, as the network server lists
    /// them.
    pub gateways: Vec<GatewayReception>,
    /// The network server's own decoding of the payload, if it has a codec
    /// for the device.
    pub decoded: Option<serde_json::Value>,
}

/// Modulation parameters of an uplink; each is `None` when the event does
/// not carry it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DataRate {
    /// Regional data rate index (DR0, DR1, ...), which ChirpStack reports.
    pub index: Option<u8>,
    /// `lora`, `fsk` or `lr_fhss`.
    pub modulation: Option<&'static str>,
    pub spreading_factor: Option<u8>,
    /// LoRa bandwidth in Hz.
    pub bandwidth: Option<u32>,
    /// Such as `4/5`.
    pub coding_rate: Option<String>,
    /// FSK bit rate in bit/s.
    pub bit_rate: Option<u32>,
}

impl DataRate {
    /// Returns the LoRa data rate identifier of the Semtech packet
    /// forwarder protocol, such as `SF7BW125`, which Ferrite's own network
    /// server also writes into `meta.data_rate`.
    pub fn identifier(&self) -> Option<String> {
        let spreading_factor = self.spreading_factor?;
        let bandwidth = self.bandwidth?;
        Some(format!("SF{spreading_factor}BW{}", bandwidth / 1000))
    }
}

/// One gateway's reception of an uplink.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GatewayReception {
    /// The gateway's id in the network server: its EUI in ChirpStack, a
    /// name chosen by its owner in The Things Stack.
    pub gateway_id: String,
    /// The gateway EUI in lowercase hex, when the event carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_eui: Option<String>,
    /// Received signal strength in dBm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rssi: Option<i32>,
    /// Signal-to-noise ratio in dB (LoRa only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snr: Option<f64>,
}

/// The envelope's `meta` object. Field names follow the LoRaWAN
/// specification (`f_port`, `f_cnt`) and the `meta` of Ferrite's own
/// network server, and scripted decoders read `f_port` from it.
#[derive(Serialize)]
struct Meta<'a> {
    network_server: &'static str,
    dev_eui: &'a str,
    f_port: u8,
    f_cnt: u32,
    confirmed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    received_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_hz: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_rate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_rate_index: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modulation: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    coding_rate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bit_rate: Option<u32>,
    gateways: &'a [GatewayReception],
}

impl Uplink {
    /// Returns true for a frame without application payload (FPort 0 or
    /// no FRMPayload): it only shows that the device is alive.
    pub fn is_mac_only(&self) -> bool {
        self.f_port == 0 || self.frm_payload.is_empty()
    }

    /// Serializes the transport metadata for `Envelope::meta`. The decoded
    /// object of the network server is left out: Ferrite decodes the bytes
    /// with the device's profile.
    pub fn meta_json(&self) -> Vec<u8> {
        let meta = Meta {
            network_server: self.network_server.as_str(),
            dev_eui: &self.dev_eui,
            f_port: self.f_port,
            f_cnt: self.f_cnt,
            confirmed: self.confirmed,
            received_at: self.received_at.as_ref().map(|(_, text)| text.as_str()),
            frequency_hz: self.frequency,
            data_rate: self.data_rate.identifier(),
            data_rate_index: self.data_rate.index,
            modulation: self.data_rate.modulation,
            coding_rate: self.data_rate.coding_rate.as_deref(),
            bit_rate: self.data_rate.bit_rate,
            gateways: &self.gateways,
        };
        serde_json::to_vec(&meta).expect("the meta object always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Uplink {
        Uplink {
            network_server: NetworkServer::ChirpStack,
            dev_eui: "70b3d57ed0001a2b".to_owned(),
            f_port: 3,
            f_cnt: 41,
            frm_payload: vec![1, 103, 0, 215],
            confirmed: false,
            received_at: Some((0, "1970-01-01T00:00:00Z".to_owned())),
            frequency: Some(868_300_000),
            data_rate: DataRate {
                index: Some(5),
                modulation: Some("lora"),
                spreading_factor: Some(7),
                bandwidth: Some(125_000),
                coding_rate: Some("4/5".to_owned()),
                bit_rate: None,
            },
            gateways: vec![GatewayReception {
                gateway_id: "b827ebfffe6c279d".to_owned(),
                gateway_eui: None,
                rssi: Some(-57),
                snr: Some(9.5),
            }],
            decoded: None,
        }
    }

    #[test]
    fn meta_carries_lorawan_fields() {
        let meta: serde_json::Value = serde_json::from_slice(&sample().meta_json()).unwrap();
        assert_eq!(meta["network_server"], "chirpstack");
        assert_eq!(meta["f_port"], 3);
        assert_eq!(meta["f_cnt"], 41);
        assert_eq!(meta["dev_eui"], "70b3d57ed0001a2b");
        assert_eq!(meta["frequency_hz"], 868_300_000);
        assert_eq!(meta["data_rate"], "SF7BW125");
        assert_eq!(meta["data_rate_index"], 5);
        assert_eq!(meta["modulation"], "lora");
        assert_eq!(meta["coding_rate"], "4/5");
        assert!(meta.get("bit_rate").is_none());
        assert_eq!(meta["gateways"][0]["rssi"], -57);
        assert_eq!(meta["gateways"][0]["snr"], 9.5);
        assert!(meta["gateways"][0].get("gateway_eui").is_none());
    }

    #[test]
    fn mac_only_frames_are_recognized() {
        let mut uplink = sample();
        assert!(!uplink.is_mac_only());
        uplink.f_port = 0;
        assert!(uplink.is_mac_only());
        uplink.f_port = 3;
        uplink.frm_payload.clear();
        assert!(uplink.is_mac_only());
    }
}
