//! Metrics of the LoRaWAN adapter, so that metric names and label values
//! are written in one place.
//!
//! Every label value comes from a fixed set: a DevEUI, DevAddr or gateway
//! EUI never becomes a label.

/// Registers the metrics with their descriptions, so that they appear on
/// `/metrics` before the first datagram.
pub fn register() {
    metrics::describe_counter!(
        "ferrite_lorawan_datagrams_total",
        "Semtech UDP datagrams received, by packet type."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_datagrams_rejected_total",
        "Semtech UDP datagrams dropped without an acknowledgement, by reason (malformed, unknown_gateway)."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_uplinks_total",
        "LoRaWAN uplinks handled after deduplication, by outcome."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_duplicate_receptions_total",
        "Copies of an uplink heard by more than one gateway and merged into one."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_downlinks_total",
        "Downlinks sent to gateways in PULL_RESP, by kind (join_accept, data)."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_downlinks_dropped_total",
        "Downlinks that could not be sent, by reason."
    );
    metrics::describe_counter!(
        "ferrite_lorawan_tx_ack_errors_total",
        "TX_ACK datagrams in which a gateway reported a failed transmission, by error."
    );
    for reason in ["malformed", "unknown_gateway"] {
        metrics::counter!("ferrite_lorawan_datagrams_rejected_total", "reason" => reason)
            .increment(0);
    }
    for outcome in [
        UplinkOutcome::Stored,
        UplinkOutcome::MicInvalid,
        UplinkOutcome::FCntReplayed,
    ] {
        uplink(outcome, 0);
    }
}

/// Counts a datagram by packet type (`PUSH_DATA`, `PULL_DATA`, `TX_ACK`,
/// or `other` for packets a gateway does not send).
pub fn datagram(packet: &'static str) {
    metrics::counter!("ferrite_lorawan_datagrams_total", "type" => packet).increment(1);
}

pub fn datagram_malformed() {
    metrics::counter!("ferrite_lorawan_datagrams_rejected_total", "reason" => "malformed")
        .increment(1);
}

pub fn datagram_from_unknown_gateway() {
    metrics::counter!("ferrite_lorawan_datagrams_rejected_total", "reason" => "unknown_gateway")
        .increment(1);
}

/// Outcome of one uplink after deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkOutcome {
    /// Decrypted and appended to the ingest log.
    Stored,
    /// Accepted, but without application data (no FRMPayload or FPort 0),
    /// so only the device's last-seen time changed.
    MacOnly,
    /// A join request that got a join accept.
    Joined,
    /// No device has this DevAddr, or this DevEUI as an OTAA device.
    UnknownDevice,
    /// The MIC matches no device with this DevAddr, or not the AppKey.
    MicInvalid,
    /// The frame counter is not ahead of the last accepted one.
    FCntReplayed,
    /// A confirmed uplink sent again with the last accepted counter,
    /// because the device missed the ACK: acknowledged again, not stored.
    Retransmission,
    /// The device joined with this DevNonce before.
    DevNonceReplayed,
    /// The 32-bit frame counter is used up.
    FCntExhausted,
    /// The ingest log rejected the append (overloaded, shutting down or
    /// failing); the uplink is lost.
    IngestFailed,
    /// The metadata database or a sealed key failed.
    InternalError,
    /// More uplinks were being handled than the adapter allows at once.
    Overloaded,
    /// Not a LoRaWAN 1.0 uplink (a downlink or proprietary frame heard by
    /// a gateway, or a frame that cannot be parsed).
    NotAnUplink,
}

impl UplinkOutcome {
    pub fn label(self) -> &'static str {
        match self {
            UplinkOutcome::Stored => "stored",
            UplinkOutcome::MacOnly => "mac_only",
            UplinkOutcome::Joined => "joined",
            UplinkOutcome::UnknownDevice => "unknown_device",
            UplinkOutcome::MicInvalid => "mic_invalid",
            UplinkOutcome::FCntReplayed => "f_cnt_replayed",
            UplinkOutcome::Retransmission => "retransmission",
            UplinkOutcome::DevNonceReplayed => "dev_nonce_replayed",
            UplinkOutcome::FCntExhausted => "f_cnt_exhausted",
            UplinkOutcome::IngestFailed => "ingest_failed",
            UplinkOutcome::InternalError => "internal_error",
            UplinkOutcome::Overloaded => "overloaded",
            UplinkOutcome::NotAnUplink => "not_an_uplink",
        }
    }
}

pub fn uplink(outcome: UplinkOutcome, count: u64) {
    metrics::counter!("ferrite_lorawan_uplinks_total", "outcome" => outcome.label())
        .increment(count);
}

pub fn duplicate_reception() {
    metrics::counter!("ferrite_lorawan_duplicate_receptions_total").increment(1);
}

/// Counts a downlink sent; `kind` is `join_accept` or `data`.
pub fn downlink_sent(kind: &'static str) {
    metrics::counter!("ferrite_lorawan_downlinks_total", "kind" => kind).increment(1);
}

/// Counts a downlink not sent; `reason` is `no_gateway` (no gateway that
/// heard the uplink has sent PULL_DATA), `too_late` (both receive windows
/// passed) or `send_failed`.
pub fn downlink_dropped(reason: &'static str) {
    metrics::counter!("ferrite_lorawan_downlinks_dropped_total", "reason" => reason).increment(1);
}

/// Counts a TX_ACK error. Codes outside the protocol's list count as
/// `other`, so a gateway cannot create labels.
pub fn tx_ack_error(code: &str) {
    const KNOWN: [&str; 7] = [
        "TOO_LATE",
        "TOO_EARLY",
        "COLLISION_PACKET",
        "COLLISION_BEACON",
        "TX_FREQ",
        "TX_POWER",
        "GPS_UNLOCKED",
    ];
    let label = KNOWN
        .iter()
        .find(|known| **known == code)
        .copied()
        .unwrap_or("other");
    metrics::counter!("ferrite_lorawan_tx_ack_errors_total", "error" => label).increment(1);
}

/// Counts uplinks appended to the ingest log.
pub fn messages_stored(count: usize) {
    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "lorawan")
        .increment(count as u64);
}
