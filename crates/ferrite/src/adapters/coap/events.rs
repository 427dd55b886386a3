//! Metrics of the CoAP adapter, so that metric names and label values are
//! written in one place. Every label value comes from a fixed set: a peer
//! address, token or device id never becomes a label.

/// Registers the metrics with their descriptions, so that they appear on
/// `/metrics` before the first datagram.
pub fn register() {
    metrics::describe_counter!(
        "ferrite_coap_datagrams_received_total",
        "Datagrams received by the CoAP endpoints."
    );

    metrics::describe_counter!(
        "ferrite_coap_datagrams_rejected_total",
        "Datagrams that are no valid CoAP message, by reason; Confirmable ones get a Reset."
    );

    metrics::describe_counter!(
        "ferrite_coap_datagrams_dropped_total",
        "Outgoing CoAP messages that the transport could not take, by reason."
    );

    metrics::describe_counter!(
        "ferrite_coap_responses_total",
        "CoAP responses sent, by response code."
    );

    metrics::describe_counter!(
        "ferrite_coap_requests_rejected_total",
        "CoAP requests answered with an error response, by reason."
    );

    metrics::describe_counter!(
        "ferrite_coap_duplicates_total",
        "Duplicate CoAP requests answered from the exchange cache, by message type."
    );

    metrics::describe_counter!(
        "ferrite_coap_exchanges_evicted_total",
        "Exchanges forgotten before EXCHANGE_LIFETIME because coap.max_exchanges was reached."
    );

    metrics::describe_counter!(
        "ferrite_coap_retransmissions_total",
        "Confirmable messages sent again because no ACK arrived."
    );

    metrics::describe_counter!(
        "ferrite_coap_confirmable_failures_total",
        "Confirmable messages that got a Reset or no ACK after every retransmission, by outcome."
    );

    metrics::describe_counter!(
        "ferrite_coap_block_transfers_abandoned_total",
        "Block-wise uploads dropped before their last block, by reason."
    );

    metrics::describe_counter!(
        "ferrite_coap_observers_total",
        "Changes of the CoAP observer lists, by event."
    );

    for name in [
        "ferrite_coap_datagrams_received_total",
        "ferrite_coap_retransmissions_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

pub fn datagram_received() {
    metrics::counter!("ferrite_coap_datagrams_received_total").increment(1);
}

/// `reason` is one of `truncated`, `unsupported_version`,
/// `invalid_token_length`, `format_error`, `unexpected_message`.
pub fn datagram_rejected(reason: &'static str) {
    metrics::counter!("ferrite_coap_datagrams_rejected_total", "reason" => reason).increment(1);
}

/// `reason` is `transport_full` or `encode_failed`.
pub fn datagram_dropped(reason: &'static str) {
    metrics::counter!("ferrite_coap_datagrams_dropped_total", "reason" => reason).increment(1);
}

/// `code` is a response code such as `2.04`; the set of codes Ferrite
/// sends is fixed.
pub fn response_sent(code: String) {
    metrics::counter!("ferrite_coap_responses_total", "code" => code).increment(1);
}

/// `message_type` is `con` or `non`.
pub fn duplicate(message_type: &'static str) {
    metrics::counter!("ferrite_coap_duplicates_total", "type" => message_type).increment(1);
}

pub fn exchange_evicted() {
    metrics::counter!("ferrite_coap_exchanges_evicted_total").increment(1);
}

pub fn retransmission() {
    metrics::counter!("ferrite_coap_retransmissions_total").increment(1);
}

/// `outcome` is `reset` or `timed_out`.
pub fn confirmable_failed(outcome: &'static str) {
    metrics::counter!("ferrite_coap_confirmable_failures_total", "outcome" => outcome).increment(1);
}

/// `reason` is `timed_out`, `gap`, `replaced` or `limit`.
pub fn block_transfer_abandoned(reason: &'static str) {
    metrics::counter!("ferrite_coap_block_transfers_abandoned_total", "reason" => reason)
        .increment(1);
}

/// `event` is `registered`, `deregistered`, `reset`, `timed_out` or
/// `limit`.
pub fn observer(event: &'static str) {
    metrics::counter!("ferrite_coap_observers_total", "event" => event).increment(1);
}

pub fn ingested() {
    metrics::counter!("ferrite_ingest_messages_total", "protocol" => "coap").increment(1);
}

/// `reason` is a label of [`super::error::CoapError::reason`].
pub fn request_rejected(reason: &'static str) {
    metrics::counter!("ferrite_coap_requests_rejected_total", "reason" => reason).increment(1);
}
