//! Downlinks: choosing the gateway and receive window, sending PULL_RESP
//! and matching the gateway's TX_ACK to it.
//!
//! The gateway is the one with the best signal among those that heard the
//! uplink and have sent PULL_DATA. RX1 is used when the PULL_RESP can reach
//! the gateway in time and the frame fits RX1's data rate, otherwise RX2.
//! The time is the uplink's `tmst` plus the window's delay, so the gateway
//! schedules it against its own clock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ferrite_lorawan::region::{Region, Window};
use ferrite_lorawan::semtech::{self, Packet, PullRespPayload, TxAckPayload};
use parking_lot::Mutex;

use super::events;
use super::uplink::UplinkContext;
use super::{Listener, Warnings};
use crate::ids::DeviceId;

/// Time the PULL_RESP needs to reach the gateway and enter its queue
/// before the window opens.
///
/// NOTE: an estimate for gateways on a local network or a fast backhaul;
/// gateways behind slow links may report TOO_LATE for RX1.
const SCHEDULE_MARGIN: Duration = Duration::from_millis(150);
/// Time after which an unanswered downlink token is forgotten.
const TOKEN_TTL: Duration = Duration::from_secs(30);
/// MHDR, FHDR without FOpts, FPort and MIC: the bytes of a data frame
/// around its FRMPayload.
const DATA_FRAME_OVERHEAD: usize = 1 + 7 + 1 + 4;

/// Downlinks waiting for a TX_ACK, by PULL_RESP token.
#[derive(Default)]
pub struct SentDownlinks {
    tokens: Mutex<HashMap<u16, SentDownlink>>,
}

struct SentDownlink {
    /// The gateway the PULL_RESP went to, the only one whose TX_ACK
    /// matches the token.
    gateway_eui: String,
    device_id: DeviceId,
    kind: &'static str,
    at: Instant,
}

impl SentDownlinks {
    fn insert(&self, token: u16, gateway_eui: &str, device_id: DeviceId, kind: &'static str) {
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, sent| sent.at.elapsed() < TOKEN_TTL);
        tokens.insert(
            token,
            SentDownlink {
                gateway_eui: gateway_eui.to_owned(),
                device_id,
                kind,
                at: Instant::now(),
            },
        );
    }

    /// Removes and returns the downlink sent to `gateway_eui` with this
    /// token. A token sent to another gateway is kept.
    fn take(&self, token: u16, gateway_eui: &str) -> Option<SentDownlink> {
        let mut tokens = self.tokens.lock();
        if tokens.get(&token)?.gateway_eui != gateway_eui {
            return None;
        }
        tokens.remove(&token)
    }
}

/// Returns whether a PHYPayload fits the largest frame of a downlink data
/// rate.
fn fits(region: Region, window: &Window, phy_payload: &[u8]) -> bool {
    region
        .max_frm_payload_bytes(window.data_rate_index)
        .is_ok_and(|max| phy_payload.len() <= max + DATA_FRAME_OVERHEAD)
}

impl Listener {
    /// Sends `phy_payload` in RX1 or RX2 after the uplink; `delays` are the
    /// delays of RX1 and RX2 from the end of the uplink. Returns whether a
    /// gateway got it.
    pub(super) async fn send_downlink(
        &self,
        uplink: &UplinkContext,
        region: Region,
        phy_payload: Vec<u8>,
        kind: &'static str,
        delays: (Duration, Duration),
        device_id: DeviceId,
    ) -> bool {
        let Some((reception, pull)) = uplink.receptions.iter().find_map(|reception| {
            self.gateways
                .pull_address(&reception.gateway_eui)
                .map(|pull| (reception, pull))
        }) else {
            events::downlink_dropped("no_gateway");
            tracing::warn!(%device_id, kind, "no gateway that heard the uplink has sent PULL_DATA; downlink dropped");
            return false;
        };

        let rxpk = &reception.rxpk;
        let rx1 = rxpk
            .lora_data_rate()
            .and_then(|rate| region.uplink_data_rate_index(rate).ok())
            .zip(ferrite_lorawan::region::mhz_to_hz(rxpk.freq))
            .and_then(|(index, frequency_hz)| region.rx1_window(frequency_hz, index, 0).ok());
        let elapsed = uplink.started.elapsed() + SCHEDULE_MARGIN;
        let (window, delay) = match rx1 {
            Some(rx1) if elapsed < delays.0 && fits(region, &rx1, &phy_payload) => (rx1, delays.0),
            _ if elapsed < delays.1 => (region.rx2_window(), delays.1),
            _ => {
                events::downlink_dropped("too_late");
                tracing::warn!(%device_id, kind, elapsed_ms = elapsed.as_millis() as u64, "both receive windows passed before the downlink was ready; dropped");
                return false;
            }
        };

        let tmst = rxpk.tmst.wrapping_add(delay.as_micros() as u32);
        let txpk = semtech::lora_txpk(
            &phy_payload,
            tmst,
            window.frequency_hz,
            window.data_rate,
            region.downlink_tx_power_dbm(),
        );
        // Version 1 gateways send no TX_ACK, so their token is unused.
        let token = if pull.version >= 2 {
            rand::random::<u16>()
        } else {
            0
        };
        let packet = Packet::PullResp {
            version: pull.version,
            token,
            payload: PullRespPayload { txpk },
        };
        if !self.send(&semtech::encode(&packet), pull.addr).await {
            events::downlink_dropped("send_failed");
            return false;
        }
        if pull.version >= 2 {
            self.downlinks
                .insert(token, &reception.gateway_eui, device_id, kind);
        }
        events::downlink_sent(kind);
        tracing::debug!(%device_id, kind, gateway_eui = %reception.gateway_eui, frequency_hz = window.frequency_hz, data_rate = %window.data_rate, tmst, "LoRaWAN downlink sent");
        true
    }

    /// Logs and counts a gateway's report of a failed transmission.
    pub(super) fn handle_tx_ack(&self, gateway_eui: &str, token: u16, payload: &TxAckPayload) {
        let sent = self.downlinks.take(token, gateway_eui);
        let Some(code) = payload.error() else {
            return;
        };
        events::tx_ack_error(code);
        if let Some(suppressed) = Warnings::allow(&self.warnings.tx_ack) {
            let device_id = sent.as_ref().map(|sent| sent.device_id.to_string());
            let kind = sent.as_ref().map(|sent| sent.kind);
            tracing::warn!(
                gateway_eui,
                error = code,
                device_id,
                kind,
                suppressed,
                "LoRaWAN gateway could not transmit a downlink"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_only_its_gateway() {
        let sent = SentDownlinks::default();
        let device_id = DeviceId::new_random();
        sent.insert(7, "0000000000000001", device_id, "data");

        assert!(sent.take(7, "0000000000000002").is_none());
        let downlink = sent
            .take(7, "0000000000000001")
            .expect("token of the gateway");
        assert_eq!(downlink.device_id, device_id);
        assert!(sent.take(7, "0000000000000001").is_none());
    }
}
