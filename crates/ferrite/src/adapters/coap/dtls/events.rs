//! Metrics of the DTLS listener, so that names and label values are
//! written in one place. Every label value comes from a fixed set.

/// Registers the metrics with their descriptions, so that they appear on
/// `/metrics` before the first peer.
pub fn register() {
    metrics::describe_gauge!(
        "ferrite_coap_dtls_sessions",
        "DTLS sessions, handshaking or established."
    );
    metrics::describe_gauge!(
        "ferrite_coap_dtls_handshakes_in_progress",
        "DTLS handshakes past the cookie exchange and not yet finished."
    );
    metrics::describe_counter!(
        "ferrite_coap_dtls_handshakes_total",
        "Finished DTLS handshakes, by result."
    );
    metrics::describe_counter!(
        "ferrite_coap_dtls_hello_verify_requests_total",
        "HelloVerifyRequests sent to ClientHellos without a valid cookie."
    );
    metrics::describe_counter!(
        "ferrite_coap_dtls_datagrams_dropped_total",
        "Received or outgoing DTLS datagrams that were dropped, by reason."
    );
    metrics::describe_counter!(
        "ferrite_coap_dtls_sessions_closed_total",
        "Ended DTLS sessions, by reason."
    );
    metrics::gauge!("ferrite_coap_dtls_sessions").set(0.0);
    metrics::gauge!("ferrite_coap_dtls_handshakes_in_progress").set(0.0);
    metrics::counter!("ferrite_coap_dtls_handshakes_total", "result" => "ok").increment(0);
    metrics::counter!("ferrite_coap_dtls_hello_verify_requests_total").increment(0);
}

pub fn session_started() {
    metrics::gauge!("ferrite_coap_dtls_sessions").increment(1.0);
    metrics::gauge!("ferrite_coap_dtls_handshakes_in_progress").increment(1.0);
}

/// Counts a finished handshake. `result` is one of `ok`,
/// `unknown_psk_identity`, `bad_certificate`, `unknown_device`, `failed`
/// (any other alert or protocol error) and `timed_out`. A client with a
/// wrong pre-shared key counts as `timed_out`, because DTLS drops records
/// that fail to decrypt without an alert.
pub fn handshake_finished(result: &'static str) {
    metrics::gauge!("ferrite_coap_dtls_handshakes_in_progress").decrement(1.0);
    metrics::counter!("ferrite_coap_dtls_handshakes_total", "result" => result).increment(1);
}

/// Counts an ended session. `reason` is one of `handshake_failed`,
/// `close_notify`, `idle`, `replaced` (the peer started a new handshake),
/// `revoked` (its credential or device was removed), `error` and
/// `shutdown`.
pub fn session_closed(reason: &'static str) {
    metrics::gauge!("ferrite_coap_dtls_sessions").decrement(1.0);
    metrics::counter!("ferrite_coap_dtls_sessions_closed_total", "reason" => reason).increment(1);
}

pub fn hello_verify_request_sent() {
    metrics::counter!("ferrite_coap_dtls_hello_verify_requests_total").increment(1);
}

/// Counts a dropped datagram by `reason`:
/// - `unknown_peer`: a record other than a ClientHello from a peer without
///   a session.
/// - `invalid`: not a DTLS record.
/// - `max_sessions`, `max_handshakes`: a ClientHello beyond the limits.
/// - `too_large`: a datagram longer than the largest DTLS record.
/// - `queue_full`: the session's queue of datagrams or replies is full, in
///   count or in bytes.
/// - `memory_limit`: the queues of all sessions together hold their byte
///   limit.
/// - `no_session`: a reply for a peer without an established session.
/// - `send_failed`: the socket did not take an outgoing datagram.
pub fn datagram_dropped(reason: &'static str) {
    metrics::counter!("ferrite_coap_dtls_datagrams_dropped_total", "reason" => reason).increment(1);
}
