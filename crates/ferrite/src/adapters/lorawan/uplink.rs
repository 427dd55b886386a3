//! Uplinks: deduplication of copies from several gateways, then one pass
//! through the steps of a join request or a data uplink.
//!
//! A data uplink goes through: find the session (DevAddr, frame counter,
//! MIC), advance the stored counter (replay protection), decrypt, store
//! (or only mark the device seen), and send a downlink when the uplink was
//! confirmed or a downlink is queued. A join request goes
//! through: find the OTAA device by DevEUI, check the MIC with the AppKey,
//! reject a used DevNonce, create and store the session, send the join
//! accept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrite_lorawan::fcnt::{FCntError, reconstruct_f_cnt_up};
use ferrite_lorawan::mac::{
    self, AesKey, DataFrame, DataUp, DevAddr, JoinAccept, JoinRequest, SessionKeys, Uplink,
};
use ferrite_lorawan::region::{self, JOIN_ACCEPT_DELAY1, JOIN_ACCEPT_DELAY2, Region};
use ferrite_lorawan::semtech::RxPk;
use parking_lot::Mutex;
use serde_json::json;

use super::events::{self, UplinkOutcome};
use super::{Listener, Warnings};
use crate::ingest::{ContentType, Envelope, Protocol};
use crate::metadata::lorawan::{self as registry, Activation, JoinRecord, LorawanDevice};

/// One gateway's copy of an uplink.
#[derive(Debug, Clone)]
pub struct Reception {
    pub gateway_eui: String,
    pub rxpk: RxPk,
    /// Server time of arrival in epoch nanoseconds.
    pub received_at_ns: i64,
}

impl Reception {
    /// Orders receptions by signal quality: SNR first, then RSSI.
    fn signal(&self) -> (i64, i32) {
        let snr_centi_db = (self.rxpk.lsnr.unwrap_or(f64::MIN / 1000.0) * 100.0) as i64;
        (snr_centi_db, self.rxpk.rssi)
    }
}

/// Copies of uplinks in their deduplication window, by PHYPayload.
pub struct Deduplicator {
    window: Duration,
    pending: Mutex<HashMap<Vec<u8>, Vec<Reception>>>,
}

impl Deduplicator {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Adds a copy; returns true when it is the first, whose owner handles
    /// the uplink after the window.
    ///
    /// A gateway's second copy of one PHYPayload is dropped, so the copies
    /// of an uplink are bounded by the number of registered gateways even
    /// when one gateway repeats a frame.
    fn add(&self, phy_payload: &[u8], reception: Reception) -> bool {
        let mut pending = self.pending.lock();
        match pending.get_mut(phy_payload) {
            Some(copies) => {
                let repeated = copies
                    .iter()
                    .any(|copy| copy.gateway_eui == reception.gateway_eui);
                if !repeated {
                    copies.push(reception);
                }
                false
            }
            None => {
                pending.insert(phy_payload.to_vec(), vec![reception]);
                true
            }
        }
    }

    fn take(&self, phy_payload: &[u8]) -> Vec<Reception> {
        self.pending.lock().remove(phy_payload).unwrap_or_default()
    }
}

/// An uplink after deduplication.
pub struct UplinkContext {
    pub phy_payload: Vec<u8>,
    /// Every copy, the best signal first.
    pub receptions: Vec<Reception>,
    /// When the first copy arrived, from which the receive windows count.
    pub started: Instant,
}

impl UplinkContext {
    fn received_at_ns(&self) -> i64 {
        self.receptions
            .iter()
            .map(|reception| reception.received_at_ns)
            .min()
            .unwrap_or_default()
    }

    /// Returns the gateways' metadata for the envelope.
    fn gateways_json(&self) -> Vec<serde_json::Value> {
        self.receptions
            .iter()
            .map(|reception| {
                let rxpk = &reception.rxpk;
                json!({
                    "gateway_eui": reception.gateway_eui,
                    "rssi": rxpk.rssi,
                    "snr": rxpk.lsnr,
                    "frequency_hz": region::mhz_to_hz(rxpk.freq),
                    "data_rate": rxpk.lora_data_rate().map(|rate| rate.to_string()),
                    "channel": rxpk.chan,
                    "rf_chain": rxpk.rfch,
                    "tmst": rxpk.tmst,
                    "time": rxpk.time,
                    "received_at": rfc3339(reception.received_at_ns),
                })
            })
            .collect()
    }
}

fn rfc3339(epoch_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(epoch_ns)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

pub fn crate_region(region: registry::Region) -> Region {
    match region {
        registry::Region::Eu868 => Region::Eu868,
        registry::Region::Us915 => Region::Us915,
    }
}

/// A device's session as found for a data uplink.
struct Session {
    device: LorawanDevice,
    keys: SessionKeys,
    region: Region,
    /// The rebuilt 32-bit frame counter of this uplink.
    f_cnt: u32,
}

/// The outcome of looking for the sender of a data uplink.
enum Lookup {
    Found(Box<Session>),
    /// A confirmed uplink with the session's last accepted counter and a
    /// valid MIC: the device repeats it because it missed the ACK.
    Retransmission(Box<Session>),
    Rejected(UplinkOutcome),
}

impl Listener {
    /// Takes one packet from a gateway into deduplication.
    pub(super) fn receive(self: Arc<Self>, gateway_eui: &str, rxpk: RxPk) {
        // Packets with a failed or missing CRC and FSK packets are noise to
        // a LoRaWAN network server.
        if rxpk.stat != 1 || rxpk.lora_data_rate().is_none() {
            tracing::debug!(gateway_eui, stat = rxpk.stat, modu = %rxpk.modu, "packet without a valid CRC or not LoRa; skipped");
            return;
        }
        let phy_payload = rxpk.phy_payload();
        let reception = Reception {
            gateway_eui: gateway_eui.to_owned(),
            rxpk,
            received_at_ns: now_ns(),
        };
        if !self.deduplicator.add(&phy_payload, reception) {
            events::duplicate_reception();
            return;
        }

        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            self.deduplicator.take(&phy_payload);
            events::uplink(UplinkOutcome::Overloaded, 1);
            if let Some(suppressed) = Warnings::allow(&self.warnings.rejected_uplink) {
                tracing::warn!(
                    suppressed,
                    "too many LoRaWAN uplinks in flight; uplink dropped"
                );
            }
            return;
        };
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(self.deduplicator.window).await;
            let mut receptions = self.deduplicator.take(&phy_payload);
            receptions.sort_by_key(|reception| std::cmp::Reverse(reception.signal()));
            let uplink = UplinkContext {
                phy_payload,
                receptions,
                started,
            };
            let outcome = self.handle_uplink(&uplink).await;
            events::uplink(outcome, 1);
            drop(permit);
        });
    }

    async fn handle_uplink(&self, uplink: &UplinkContext) -> UplinkOutcome {
        match mac::parse_uplink(&uplink.phy_payload) {
            Ok(Uplink::Data(frame)) => self.handle_data(uplink, &frame).await,
            Ok(Uplink::JoinRequest(request)) => self.handle_join(uplink, &request).await,
            Ok(Uplink::Ignored(mtype)) => {
                tracing::debug!(
                    mtype,
                    "frame heard by a gateway that is not an uplink; skipped"
                );
                UplinkOutcome::NotAnUplink
            }
            Err(error) => {
                self.warn_rejected(&error.to_string(), None);
                UplinkOutcome::NotAnUplink
            }
        }
    }

    /// Logs a rejected uplink, rate-limited across all devices.
    fn warn_rejected(&self, reason: &str, device: Option<&str>) {
        if let Some(suppressed) = Warnings::allow(&self.warnings.rejected_uplink) {
            tracing::warn!(reason, device, suppressed, "LoRaWAN uplink rejected");
        }
    }

    /// Opens one sealed key of a device.
    fn open_key(
        &self,
        device: &LorawanDevice,
        field: &str,
        sealed: Option<&Vec<u8>>,
    ) -> Option<AesKey> {
        let sealed = sealed?;
        let context = registry::key_context(field, device.device_id);
        match self
            .context
            .keyring
            .open(device.tenant_id, &context, sealed)
        {
            Ok(bytes) => bytes.try_into().ok().map(AesKey),
            Err(error) => {
                tracing::error!(device_id = %device.device_id, field, %error, "cannot open a sealed LoRaWAN key");
                None
            }
        }
    }

    async fn handle_data(&self, uplink: &UplinkContext, frame: &DataUp) -> UplinkOutcome {
        let session = match self.find_session(frame).await {
            Lookup::Found(session) => session,
            Lookup::Retransmission(session) => {
                // A LoRaWAN 1.0.x device keeps FCntUp when it repeats a
                // frame, so the repeat gets an ACK but its data was stored
                // the first time.
                // NOTE: a replayed copy of the last confirmed uplink also
                // gets an ACK and takes a downlink counter.
                self.answer_data_uplink(uplink, frame, &session).await;
                return UplinkOutcome::Retransmission;
            }
            Lookup::Rejected(outcome) => {
                let device = frame.dev_addr.to_string();
                self.warn_rejected(outcome.label(), Some(&device));
                return outcome;
            }
        };
        let device_id = session.device.device_id;

        match self
            .context
            .metadata
            .advance_lorawan_f_cnt_up(device_id, session.f_cnt)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Another copy or a concurrent uplink took this counter.
                self.warn_rejected("f_cnt_replayed", Some(&session.device.dev_eui));
                return UplinkOutcome::FCntReplayed;
            }
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot store a LoRaWAN frame counter; uplink dropped");
                return UplinkOutcome::InternalError;
            }
        }

        let data = frame.decrypt_frm_payload(
            session.keys.nwk_s_key,
            session.keys.app_s_key,
            session.f_cnt,
        );
        let outcome = match frame.f_port {
            Some(f_port) if f_port > 0 && !data.is_empty() => {
                self.store(uplink, frame, &session, f_port, data).await
            }
            _ => {
                self.mark_seen(device_id);
                UplinkOutcome::MacOnly
            }
        };

        self.answer_data_uplink(uplink, frame, &session).await;
        outcome
    }

    /// Finds the device whose session key gives this uplink a valid MIC,
    /// with the rebuilt 32-bit frame counter.
    async fn find_session(&self, frame: &DataUp) -> Lookup {
        let candidates = match self
            .context
            .metadata
            .lorawan_devices_by_dev_addr(&frame.dev_addr.to_string())
            .await
        {
            Ok(candidates) => candidates,
            Err(error) => {
                tracing::error!(dev_addr = %frame.dev_addr, %error, "cannot look up LoRaWAN devices by DevAddr");
                return Lookup::Rejected(UplinkOutcome::InternalError);
            }
        };
        if candidates.is_empty() {
            return Lookup::Rejected(UplinkOutcome::UnknownDevice);
        }

        let mut rejected = UplinkOutcome::MicInvalid;
        for device in candidates {
            let Some(region) = device.region.map(crate_region) else {
                continue;
            };
            let (Some(nwk_s_key), Some(app_s_key)) = (
                self.open_key(&device, "nwk_s_key", device.keys.nwk_s_key.as_ref()),
                self.open_key(&device, "app_s_key", device.keys.app_s_key.as_ref()),
            ) else {
                continue;
            };

            let gap = self.context.config.max_f_cnt_gap;
            match reconstruct_f_cnt_up(device.f_cnt_up, frame.f_cnt, gap) {
                Ok(f_cnt) if frame.verify_mic(nwk_s_key, f_cnt) => {
                    return Lookup::Found(Box::new(Session {
                        device,
                        keys: SessionKeys {
                            nwk_s_key,
                            app_s_key,
                        },
                        region,
                        f_cnt,
                    }));
                }
                Ok(_) => {}
                Err(FCntError::Replayed { .. })
                    if frame.confirmed
                        && device.f_cnt_up.is_some_and(|last| {
                            last as u16 == frame.f_cnt && frame.verify_mic(nwk_s_key, last)
                        }) =>
                {
                    let f_cnt = device.f_cnt_up.unwrap_or_default();
                    return Lookup::Retransmission(Box::new(Session {
                        device,
                        keys: SessionKeys {
                            nwk_s_key,
                            app_s_key,
                        },
                        region,
                        f_cnt,
                    }));
                }
                Err(error) => {
                    // Tell a replay of this device's frame from another
                    // device's frame: the MIC is valid with the counter in
                    // the last counter's 65536 block or the one before.
                    let last = device.f_cnt_up.unwrap_or(0);
                    let same_block = (last & 0xffff_0000) | u32::from(frame.f_cnt);
                    let earlier = [Some(same_block), same_block.checked_sub(0x1_0000)];
                    let replayed = earlier
                        .into_iter()
                        .flatten()
                        .any(|f_cnt| frame.verify_mic(nwk_s_key, f_cnt));
                    if replayed {
                        rejected = match error {
                            FCntError::Replayed { .. } => UplinkOutcome::FCntReplayed,
                            FCntError::Exhausted { .. } => UplinkOutcome::FCntExhausted,
                        };
                    }
                }
            }
        }
        Lookup::Rejected(rejected)
    }

    async fn store(
        &self,
        uplink: &UplinkContext,
        frame: &DataUp,
        session: &Session,
        f_port: u8,
        data: Vec<u8>,
    ) -> UplinkOutcome {
        let best = &uplink.receptions[0].rxpk;
        let meta = json!({
            "f_port": f_port,
            "f_cnt": session.f_cnt,
            "dev_eui": session.device.dev_eui,
            "dev_addr": frame.dev_addr.to_string(),
            "confirmed": frame.confirmed,
            "adr": frame.adr,
            "region": session.region.name(),
            "frequency_hz": region::mhz_to_hz(best.freq),
            "data_rate": best.lora_data_rate().map(|rate| rate.to_string()),
            "received_at": rfc3339(uplink.received_at_ns()),
            "gateways": uplink.gateways_json(),
        });
        let envelope = Envelope {
            tenant_id: session.device.tenant_id,
            device_id: session.device.device_id,
            protocol: Protocol::Lorawan,
            received_at_ns: uplink.received_at_ns(),
            content_type: ContentType::Raw,
            payload: Bytes::from(data),
            meta: Bytes::from(serde_json::to_vec(&meta).expect("JSON values serialize")),
        };
        match self.context.ingest.append(vec![envelope]).await {
            Ok(()) => {
                events::messages_stored(1);
                UplinkOutcome::Stored
            }
            Err(error) => {
                tracing::warn!(device_id = %session.device.device_id, %error, "LoRaWAN uplink lost: the ingest log rejected it after the gateway was acknowledged");
                UplinkOutcome::IngestFailed
            }
        }
    }

    fn mark_seen(&self, device: crate::ids::DeviceId) {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut seen = self.context.seen.lock();
        let entry = seen.entry(device).or_insert(now_ms);
        *entry = (*entry).max(now_ms);
    }

    /// Sends the downlink a data uplink calls for: an ACK for a confirmed
    /// uplink and the oldest queued downlink, in one frame.
    async fn answer_data_uplink(&self, uplink: &UplinkContext, frame: &DataUp, session: &Session) {
        let device_id = session.device.device_id;
        let metadata = &self.context.metadata;
        let queued = match metadata.next_lorawan_downlink(device_id).await {
            Ok(queued) => queued,
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot read the LoRaWAN downlink queue");
                None
            }
        };
        if !frame.confirmed && queued.is_none() {
            return;
        }

        let f_cnt_down = match metadata.take_lorawan_f_cnt_down(device_id).await {
            Ok(f_cnt) => f_cnt,
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot take a LoRaWAN downlink frame counter; no downlink sent");
                return;
            }
        };
        // NOTE: FPending is never set, so a device learns of further queued
        // downlinks only after its next uplink.
        let down = DataFrame {
            dev_addr: frame.dev_addr,
            f_cnt: f_cnt_down,
            confirmed: queued.as_ref().is_some_and(|queued| queued.confirmed),
            ack: frame.confirmed,
            f_pending: false,
            f_port: queued.as_ref().map(|queued| queued.f_port),
            frm_payload: queued
                .as_ref()
                .map(|queued| queued.data.clone())
                .unwrap_or_default(),
        };
        let phy_payload = match mac::build_data_down(&down, &session.keys) {
            Ok(phy_payload) => phy_payload,
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot build a LoRaWAN downlink");
                return;
            }
        };

        let delays = (region::RECEIVE_DELAY1, region::RECEIVE_DELAY2);
        let sent = self
            .send_downlink(
                uplink,
                session.region,
                phy_payload,
                "data",
                delays,
                device_id,
            )
            .await;
        if let (true, Some(queued)) = (sent, queued)
            && let Err(error) = metadata
                .mark_lorawan_downlink_sent(queued.id, f_cnt_down)
                .await
        {
            tracing::error!(%device_id, downlink = queued.id, %error, "cannot mark a LoRaWAN downlink as sent; it may be sent again");
        }
    }

    async fn handle_join(&self, uplink: &UplinkContext, request: &JoinRequest) -> UplinkOutcome {
        let dev_eui = request.dev_eui.to_string();
        let device = match self
            .context
            .metadata
            .lorawan_device_by_dev_eui(&dev_eui)
            .await
        {
            Ok(Some(device)) if device.activation == Activation::Otaa => device,
            Ok(_) => {
                self.warn_rejected(
                    "join request of an unknown DevEUI or of a device without OTAA",
                    Some(&dev_eui),
                );
                return UplinkOutcome::UnknownDevice;
            }
            Err(error) => {
                tracing::error!(dev_eui, %error, "cannot look up a LoRaWAN device by DevEUI");
                return UplinkOutcome::InternalError;
            }
        };
        let device_id = device.device_id;
        if device.join_eui.as_deref() != Some(request.join_eui.to_string().as_str()) {
            self.warn_rejected(
                "join request with a JoinEUI other than the registered one",
                Some(&dev_eui),
            );
            return UplinkOutcome::UnknownDevice;
        }
        let (Some(app_key), Some(region)) = (
            self.open_key(&device, "app_key", device.keys.app_key.as_ref()),
            device.region.map(crate_region),
        ) else {
            return UplinkOutcome::InternalError;
        };
        if !request.verify_mic(app_key) {
            self.warn_rejected("mic_invalid", Some(&dev_eui));
            return UplinkOutcome::MicInvalid;
        }

        // Checked before the session is created, so a replayed request
        // costs no key derivation; record_lorawan_join checks again
        // atomically.
        match self
            .context
            .metadata
            .lorawan_dev_nonce_used(device_id, request.dev_nonce)
            .await
        {
            Ok(false) => {}
            Ok(true) => {
                self.warn_rejected("dev_nonce_replayed", Some(&dev_eui));
                return UplinkOutcome::DevNonceReplayed;
            }
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot check a LoRaWAN DevNonce");
                return UplinkOutcome::InternalError;
            }
        }

        let accept = JoinAccept {
            join_nonce: rand::random::<u32>() & 0x00ff_ffff,
            net_id: self.net_id,
            // The 7 low bits of the NetID (the NwkID) lead the DevAddr.
            dev_addr: DevAddr(((self.net_id & 0x7f) << 25) | (rand::random::<u32>() & 0x01ff_ffff)),
            rx1_dr_offset: 0,
            rx2_data_rate: region.rx2_data_rate_index(),
            rx_delay: 1,
        };
        let (phy_payload, keys) = mac::build_join_accept(&accept, app_key, request.dev_nonce);
        let data_key = match self.context.keyring.data_key(device.tenant_id).await {
            Ok(data_key) => data_key,
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot load the tenant's data key to seal LoRaWAN session keys");
                return UplinkOutcome::InternalError;
            }
        };
        let sealed_nwk = data_key.seal(
            &registry::key_context("nwk_s_key", device_id),
            &keys.nwk_s_key.0,
        );
        let sealed_app = data_key.seal(
            &registry::key_context("app_s_key", device_id),
            &keys.app_s_key.0,
        );
        match self
            .context
            .metadata
            .record_lorawan_join(
                device_id,
                request.dev_nonce,
                &accept.dev_addr.to_string(),
                &sealed_nwk,
                &sealed_app,
            )
            .await
        {
            Ok(JoinRecord::Accepted) => {}
            Ok(JoinRecord::DevNonceReused) => {
                self.warn_rejected("dev_nonce_replayed", Some(&dev_eui));
                return UplinkOutcome::DevNonceReplayed;
            }
            Err(error) => {
                tracing::error!(%device_id, %error, "cannot store a LoRaWAN session; join request dropped");
                return UplinkOutcome::InternalError;
            }
        }

        tracing::info!(%device_id, dev_eui, dev_addr = %accept.dev_addr, "LoRaWAN device joined");
        self.mark_seen(device_id);
        self.send_downlink(
            uplink,
            region,
            phy_payload,
            "join_accept",
            (JOIN_ACCEPT_DELAY1, JOIN_ACCEPT_DELAY2),
            device_id,
        )
        .await;
        UplinkOutcome::Joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reception(gateway_eui: &str) -> Reception {
        let rxpk = serde_json::from_value(json!({
            "tmst": 1, "freq": 868.1, "stat": 1, "modu": "LORA",
            "datr": "SF7BW125", "rssi": -40, "lsnr": 7.0, "size": 1, "data": "AA==",
        }))
        .expect("valid rxpk");
        Reception {
            gateway_eui: gateway_eui.to_owned(),
            rxpk,
            received_at_ns: 0,
        }
    }

    #[test]
    fn deduplicator_keeps_one_copy_per_gateway() {
        let deduplicator = Deduplicator::new(Duration::from_millis(200));
        assert!(deduplicator.add(b"frame", reception("0000000000000001")));
        for _ in 0..1000 {
            assert!(!deduplicator.add(b"frame", reception("0000000000000001")));
        }
        assert!(!deduplicator.add(b"frame", reception("0000000000000002")));

        let copies = deduplicator.take(b"frame");
        let gateways: Vec<&str> = copies
            .iter()
            .map(|copy| copy.gateway_eui.as_str())
            .collect();
        assert_eq!(gateways, ["0000000000000001", "0000000000000002"]);
    }
}
