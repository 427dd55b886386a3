//! MQTT server tests over real sockets: `rumqttc` clients for MQTT 3.1.1
//! (`v4` in rumqttc) and 5, and raw TCP bytes for malformed input and for
//! flows a client library hides (QoS 2 resends, silent connections).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use mqtt5_protocol::packet::MqttPacket;
use mqtt5_protocol::packet::connect::ConnectPacket;
use mqtt5_protocol::packet::disconnect::DisconnectPacket;
use mqtt5_protocol::packet::publish::PublishPacket;
use mqtt5_protocol::packet::pubrel::PubRelPacket;
use mqtt5_protocol::{ConnectOptions, QoS as RawQoS, WillMessage};
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as V5ConnectCode, DisconnectReasonCode, Filter, PubAckReason,
    SubscribeReasonCode as V5SubCode,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{Server, TestDevice, wait_until};

/// Maximum wait for an expected packet or close.
const WAIT: Duration = Duration::from_secs(10);
/// Maximum wait for stored telemetry to show in the latest values. The
/// data is durable when PUBACK arrives but reaches the store asynchronously.
const STORE_WAIT: Duration = Duration::from_secs(5);
const TELEMETRY: &str = "v1/devices/me/telemetry";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

// ---------------------------------------------------------------------------
// Helpers: rumqttc clients
// ---------------------------------------------------------------------------

fn v4_options(server: &Server, client_id: &str, token: Option<&str>) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    if let Some(token) = token {
        options.set_credentials(token, "");
    }
    options
}

fn v5_options(server: &Server, client_id: &str, token: Option<&str>) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(client_id, "127.0.0.1", server.mqtt_addr.port());
    if let Some(token) = token {
        options.set_credentials(token, "");
    }
    options
}

/// Polls until `pick` accepts an incoming packet; panics on a connection
/// error or after [`WAIT`].
async fn v4_wait<T>(
    eventloop: &mut rumqttc::EventLoop,
    mut pick: impl FnMut(&rumqttc::Packet) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("timed out waiting for an MQTT 3.1.1 packet")
            .expect("MQTT 3.1.1 connection failed");
        if let rumqttc::Event::Incoming(packet) = event
            && let Some(found) = pick(&packet)
        {
            return found;
        }
    }
}

async fn v5_wait<T>(
    eventloop: &mut v5::EventLoop,
    mut pick: impl FnMut(&v5::mqttbytes::v5::Packet) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("timed out waiting for an MQTT 5 packet")
            .expect("MQTT 5 connection failed");
        if let v5::Event::Incoming(packet) = event
            && let Some(found) = pick(&packet)
        {
            return found;
        }
    }
}

/// Connects an MQTT 3.1.1 client and waits for its CONNACK.
async fn v4_connect(
    options: rumqttc::MqttOptions,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop, bool) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    let session_present = v4_wait(&mut eventloop, |packet| match packet {
        rumqttc::Packet::ConnAck(connack) => Some(connack.session_present),
        _ => None,
    })
    .await;
    (client, eventloop, session_present)
}

async fn v5_connect(options: v5::MqttOptions) -> (v5::AsyncClient, v5::EventLoop, bool) {
    let (client, mut eventloop) = v5::AsyncClient::new(options, 64);
    let session_present = v5_wait(&mut eventloop, |packet| match packet {
        v5::mqttbytes::v5::Packet::ConnAck(connack) => Some(connack.session_present),
        _ => None,
    })
    .await;
    (client, eventloop, session_present)
}

/// Polls until the connection fails; returns the error.
async fn v4_closed(eventloop: &mut rumqttc::EventLoop) -> rumqttc::ConnectionError {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, eventloop.poll()).await {
            Err(_) => panic!("the MQTT 3.1.1 connection was not closed"),
            Ok(Err(error)) => return error,
            Ok(Ok(_)) => {}
        }
    }
}

/// Polls until the server disconnects an MQTT 5 client; returns the
/// DISCONNECT reason code, or `None` when the socket closed without one.
async fn v5_disconnected(eventloop: &mut v5::EventLoop) -> Option<DisconnectReasonCode> {
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, eventloop.poll()).await {
            Err(_) => panic!("the MQTT 5 connection was not closed"),
            Ok(Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Disconnect(disconnect)))) => {
                return Some(disconnect.reason_code);
            }
            Ok(Ok(_)) => {}
            Ok(Err(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            }))) => {
                return Some(reason_code);
            }
            Ok(Err(_)) => return None,
        }
    }
}

/// Waits until the latest value of `key` equals `expected`.
async fn wait_for_latest(
    server: &Server,
    device: &TestDevice,
    key: &str,
    expected: &Value,
) -> bool {
    wait_until(
        || async {
            server
                .latest(&device.id)
                .await
                .get(key)
                .map(|point| &point["value"] == expected)
                .unwrap_or(false)
        },
        STORE_WAIT,
    )
    .await
}

// ---------------------------------------------------------------------------
// Helpers: raw TCP
// ---------------------------------------------------------------------------

/// A TCP connection that sends and reads MQTT bytes directly.
struct RawClient {
    stream: TcpStream,
    buffer: BytesMut,
}

/// One packet read from the server: the first byte and the body.
#[derive(Debug)]
struct RawPacket {
    first_byte: u8,
    body: Vec<u8>,
}

impl RawClient {
    async fn connect(server: &Server) -> Self {
        let stream = TcpStream::connect(server.mqtt_addr)
            .await
            .expect("connect to the MQTT port");
        Self {
            stream,
            buffer: BytesMut::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send bytes");
    }

    async fn send_packet(&mut self, packet: &impl MqttPacket) {
        let mut bytes = BytesMut::new();
        packet.encode(&mut bytes).expect("encode a test packet");
        self.send(&bytes).await;
    }

    /// Reads the next packet; `None` when the server closed the connection.
    async fn next_packet(&mut self) -> Option<RawPacket> {
        tokio::time::timeout(WAIT, self.read_packet())
            .await
            .expect("timed out waiting for a packet from the server")
    }

    async fn read_packet(&mut self) -> Option<RawPacket> {
        loop {
            if let Some(packet) = self.take_packet() {
                return Some(packet);
            }
            match self.stream.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn take_packet(&mut self) -> Option<RawPacket> {
        let mut length = 0usize;
        for index in 0..4 {
            let byte = *self.buffer.get(1 + index)?;
            length |= usize::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                let header = 2 + index;
                if self.buffer.len() < header + length {
                    return None;
                }
                let first_byte = self.buffer[0];
                self.buffer.advance(header);
                let body = self.buffer.split_to(length).to_vec();
                return Some(RawPacket { first_byte, body });
            }
        }
        None
    }

    /// Reads until the server closes the connection; returns the packets it
    /// sent before closing.
    async fn expect_closed(&mut self) -> Vec<RawPacket> {
        let mut packets = Vec::new();
        while let Some(packet) = self.next_packet().await {
            packets.push(packet);
        }
        packets
    }
}

fn raw_connect(
    version: Version,
    client_id: &str,
    token: Option<&str>,
    keep_alive_secs: u64,
    will: Option<(&str, &[u8])>,
) -> ConnectPacket {
    let mut options =
        ConnectOptions::new(client_id).with_keep_alive(Duration::from_secs(keep_alive_secs));
    if let Some(token) = token {
        options = options.with_credentials(token, b"");
    }
    if let Some((topic, payload)) = will {
        options = options.with_will(WillMessage::new(topic, payload));
    }
    match version {
        Version::V311 => ConnectPacket::new_v311(options),
        Version::V5 => ConnectPacket::new(options),
    }
}

fn raw_publish(
    version: Version,
    topic: &str,
    payload: &[u8],
    qos: RawQoS,
    packet_id: u16,
) -> PublishPacket {
    let mut publish = match version {
        Version::V311 => PublishPacket::new_v311(topic, payload.to_vec(), qos),
        Version::V5 => PublishPacket::new(topic, payload.to_vec(), qos),
    };
    if qos != RawQoS::AtMostOnce {
        publish = publish.with_packet_id(packet_id);
    }
    publish
}

/// Connects with raw bytes and a client id of its own, and checks that
/// CONNACK accepts the connection.
async fn raw_connected(
    server: &Server,
    version: Version,
    token: &str,
    keep_alive_secs: u64,
    will: Option<(&str, &[u8])>,
) -> RawClient {
    static NEXT_CLIENT: AtomicUsize = AtomicUsize::new(1);
    let client_id = format!("raw-{}", NEXT_CLIENT.fetch_add(1, Ordering::Relaxed));
    let mut client = RawClient::connect(server).await;
    client
        .send_packet(&raw_connect(
            version,
            &client_id,
            Some(token),
            keep_alive_secs,
            will,
        ))
        .await;
    let connack = client.next_packet().await.expect("CONNACK");
    assert_eq!(
        connack.first_byte, 0x20,
        "expected CONNACK, got {connack:?}"
    );
    assert_eq!(connack.body[1], 0x00, "connection refused: {connack:?}");
    client
}

// ---------------------------------------------------------------------------
// Telemetry
// ---------------------------------------------------------------------------

#[tokio::test]
async fn telemetry_is_stored_over_3_1_1_and_5() {
    let server = Server::start().await;
    let device = server.create_device("sensor").await;
    let by_id = format!("devices/{}/telemetry", device.id);

    let cases = [
        (Version::V311, TELEMETRY, 0u8, "v311_me_qos0"),
        (Version::V311, TELEMETRY, 1, "v311_me_qos1"),
        (Version::V311, by_id.as_str(), 1, "v311_id_qos1"),
        (Version::V311, TELEMETRY, 2, "v311_me_qos2"),
        (Version::V5, TELEMETRY, 0, "v5_me_qos0"),
        (Version::V5, TELEMETRY, 1, "v5_me_qos1"),
        (Version::V5, by_id.as_str(), 2, "v5_id_qos2"),
    ];
    for (index, (version, topic, qos, key)) in cases.into_iter().enumerate() {
        let payload = format!(r#"{{"{key}": {index}}}"#);
        match version {
            Version::V311 => {
                let qos = rumqttc::qos(qos).expect("valid QoS");
                let (client, mut eventloop, _) =
                    v4_connect(v4_options(&server, key, Some(&device.token))).await;
                client
                    .publish(topic, qos, false, payload)
                    .await
                    .expect("queue publish");
                if qos == rumqttc::QoS::AtMostOnce {
                    // QoS 0 has no acknowledgement. The server handles
                    // packets in order, so the PUBLISH is appended before
                    // the DISCONNECT closes the connection.
                    client.disconnect().await.expect("queue disconnect");
                    let _ = v4_closed(&mut eventloop).await;
                } else {
                    v4_wait(&mut eventloop, |packet| {
                        matches!(
                            packet,
                            rumqttc::Packet::PubAck(_) | rumqttc::Packet::PubComp(_)
                        )
                        .then_some(())
                    })
                    .await;
                }
            }
            Version::V5 => {
                let qos = v5::mqttbytes::qos(qos).expect("valid QoS");
                let (client, mut eventloop, _) =
                    v5_connect(v5_options(&server, key, Some(&device.token))).await;
                client
                    .publish(topic, qos, false, payload)
                    .await
                    .expect("queue publish");
                if qos == v5::mqttbytes::QoS::AtMostOnce {
                    client.disconnect().await.expect("queue disconnect");
                    let _ = v5_disconnected(&mut eventloop).await;
                } else {
                    v5_wait(&mut eventloop, |packet| match packet {
                        v5::mqttbytes::v5::Packet::PubAck(ack) => {
                            assert_eq!(ack.reason, PubAckReason::Success, "{key}");
                            Some(())
                        }
                        v5::mqttbytes::v5::Packet::PubComp(_) => Some(()),
                        _ => None,
                    })
                    .await;
                }
            }
        }
        assert!(
            wait_for_latest(&server, &device, key, &Value::from(index)).await,
            "{key} not stored: {}",
            server.latest(&device.id).await
        );
    }
}

#[tokio::test]
async fn puback_arrives_only_for_stored_data() {
    let server = Server::start().await;
    let device = server.create_device("acked").await;

    for version in [Version::V311, Version::V5] {
        for index in 0..5 {
            let key = format!("acked_{version:?}_{index}");
            let payload = format!(r#"{{"{key}": {index}}}"#);
            match version {
                Version::V311 => {
                    let (client, mut eventloop, _) =
                        v4_connect(v4_options(&server, &key, Some(&device.token))).await;
                    client
                        .publish(TELEMETRY, rumqttc::QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                    v4_wait(&mut eventloop, |packet| {
                        matches!(packet, rumqttc::Packet::PubAck(_)).then_some(())
                    })
                    .await;
                }
                Version::V5 => {
                    let (client, mut eventloop, _) =
                        v5_connect(v5_options(&server, &key, Some(&device.token))).await;
                    client
                        .publish(TELEMETRY, v5::mqttbytes::QoS::AtLeastOnce, false, payload)
                        .await
                        .unwrap();
                    v5_wait(&mut eventloop, |packet| {
                        matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
                    })
                    .await;
                }
            }
            // Acknowledged means durable: the value must reach the store.
            assert!(
                wait_for_latest(&server, &device, &key, &Value::from(index)).await,
                "{key} acknowledged but not stored"
            );
        }
    }
}

#[tokio::test]
async fn pubacks_follow_publish_order() {
    let server = Server::start().await;
    let device = server.create_device("ordered").await;
    let (client, mut eventloop, _) =
        v5_connect(v5_options(&server, "ordered", Some(&device.token))).await;

    // Mix stored, invalid and unstored topics so that some
    // acknowledgements are decided on receipt and others wait for the log.
    let publishes = [
        (TELEMETRY, r#"{"ordered": 1}"#, PubAckReason::Success),
        (TELEMETRY, "{oops", PubAckReason::PayloadFormatInvalid),
        (
            "v1/devices/me/attributes",
            r#"{"a": 1}"#,
            PubAckReason::NoMatchingSubscribers,
        ),
        (TELEMETRY, r#"{"ordered": 2}"#, PubAckReason::Success),
        (
            "devices/00000000-0000-0000-0000-000000000000/telemetry",
            r#"{"x": 1}"#,
            PubAckReason::NotAuthorized,
        ),
        (TELEMETRY, r#"{"ordered": 3}"#, PubAckReason::Success),
    ];
    for (topic, payload, _) in &publishes {
        client
            .publish(
                *topic,
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_string(),
            )
            .await
            .unwrap();
    }

    let mut reasons = Vec::new();
    while reasons.len() < publishes.len() {
        let ack = v5_wait(&mut eventloop, |packet| match packet {
            v5::mqttbytes::v5::Packet::PubAck(ack) => Some((ack.pkid, ack.reason)),
            _ => None,
        })
        .await;
        reasons.push(ack);
    }
    let pkids: Vec<u16> = reasons.iter().map(|(pkid, _)| *pkid).collect();
    let mut sorted = pkids.clone();
    sorted.sort_unstable();
    assert_eq!(pkids, sorted, "PUBACKs out of order");
    let expected: Vec<PubAckReason> = publishes.iter().map(|(_, _, reason)| *reason).collect();
    let received: Vec<PubAckReason> = reasons.iter().map(|(_, reason)| *reason).collect();
    assert_eq!(received, expected);
    assert!(wait_for_latest(&server, &device, "ordered", &Value::from(3)).await);
}

#[tokio::test]
async fn invalid_and_unstored_payloads_get_reason_codes() {
    let server = Server::start().await;
    let device = server.create_device("invalid").await;
    let (client, mut eventloop, _) =
        v5_connect(v5_options(&server, "invalid-v5", Some(&device.token))).await;

    let cases = [
        (TELEMETRY, "{oops", PubAckReason::PayloadFormatInvalid, true),
        (
            TELEMETRY,
            r#"{"ts": 99999999999999, "values": {"far_future": 1}}"#,
            PubAckReason::PayloadFormatInvalid,
            true,
        ),
        (
            "v1/devices/me/attributes",
            r#"{"fw": "1.0"}"#,
            PubAckReason::NoMatchingSubscribers,
            true,
        ),
    ];
    for (topic, payload, expected, has_reason_string) in cases {
        client
            .publish(
                topic,
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.to_owned(),
            )
            .await
            .unwrap();
        let ack = v5_wait(&mut eventloop, |packet| match packet {
            v5::mqttbytes::v5::Packet::PubAck(ack) => Some(ack.clone()),
            _ => None,
        })
        .await;
        assert_eq!(ack.reason, expected, "{topic} {payload}");
        let reason_string = ack
            .properties
            .and_then(|properties| properties.reason_string);
        assert_eq!(
            reason_string.is_some(),
            has_reason_string,
            "{topic} {payload}: {reason_string:?}"
        );
    }

    // MQTT 3.1.1 cannot carry a reason: the invalid payload is acknowledged
    // and dropped.
    let (v4_client, mut v4_eventloop, _) =
        v4_connect(v4_options(&server, "invalid-v4", Some(&device.token))).await;
    v4_client
        .publish(TELEMETRY, rumqttc::QoS::AtLeastOnce, false, "[1, 2")
        .await
        .unwrap();
    v4_wait(&mut v4_eventloop, |packet| {
        matches!(packet, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    v4_client
        .publish(
            TELEMETRY,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"after_invalid": 1}"#,
        )
        .await
        .unwrap();
    v4_wait(&mut v4_eventloop, |packet| {
        matches!(packet, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(wait_for_latest(&server, &device, "after_invalid", &Value::from(1)).await);
    let latest = server.latest(&device.id).await;
    assert!(
        latest.get("fw").is_none(),
        "attributes were stored as telemetry: {latest}"
    );
    assert!(latest.get("far_future").is_none(), "{latest}");
}

#[tokio::test]
async fn resent_qos2_publish_is_stored_once() {
    let server = Server::start().await;
    let device = server.create_device("qos2").await;
    let mut client = raw_connected(&server, Version::V311, &device.token, 60, None).await;

    client
        .send_packet(&raw_publish(
            Version::V311,
            TELEMETRY,
            br#"{"qos2": 1}"#,
            RawQoS::ExactlyOnce,
            7,
        ))
        .await;
    let pubrec = client.next_packet().await.expect("PUBREC");
    assert_eq!(
        (pubrec.first_byte, pubrec.body.as_slice()),
        (0x50, &[0, 7][..])
    );

    // The same packet id again before PUBREL: acknowledged, not stored again.
    let resend = raw_publish(
        Version::V311,
        TELEMETRY,
        br#"{"qos2": 2}"#,
        RawQoS::ExactlyOnce,
        7,
    )
    .with_dup(true);
    client.send_packet(&resend).await;
    let pubrec = client.next_packet().await.expect("second PUBREC");
    assert_eq!(
        (pubrec.first_byte, pubrec.body.as_slice()),
        (0x50, &[0, 7][..])
    );

    client.send_packet(&PubRelPacket::new(7)).await;
    let pubcomp = client.next_packet().await.expect("PUBCOMP");
    assert_eq!(
        (pubcomp.first_byte, pubcomp.body.as_slice()),
        (0x70, &[0, 7][..])
    );

    // After PUBREL the id is free: a new message with it is stored.
    client
        .send_packet(&raw_publish(
            Version::V311,
            TELEMETRY,
            br#"{"qos2_next": 3}"#,
            RawQoS::ExactlyOnce,
            7,
        ))
        .await;
    assert_eq!(client.next_packet().await.expect("PUBREC").first_byte, 0x50);
    assert!(wait_for_latest(&server, &device, "qos2_next", &Value::from(3)).await);
    assert_eq!(
        server.latest(&device.id).await["qos2"]["value"],
        Value::from(1)
    );
}

// ---------------------------------------------------------------------------
// Authentication and authorization
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_credentials_are_refused_with_the_right_connack_code() {
    let server = Server::start().await;
    let device = server.create_device("auth").await;
    let other = server.create_device("auth-other").await;
    let foreign_will = format!("devices/{}/telemetry", other.id);

    // (case, token, will topic, 3.1.1 code, 5 code)
    let cases = [
        (
            "unknown token",
            Some("not-a-token"),
            None,
            rumqttc::ConnectReturnCode::NotAuthorized,
            V5ConnectCode::BadUserNamePassword,
        ),
        (
            "no user name",
            None,
            None,
            rumqttc::ConnectReturnCode::BadUserNamePassword,
            V5ConnectCode::BadUserNamePassword,
        ),
        (
            "will to another device",
            Some(device.token.as_str()),
            Some(foreign_will.as_str()),
            rumqttc::ConnectReturnCode::NotAuthorized,
            V5ConnectCode::NotAuthorized,
        ),
    ];
    for (case, token, will, v4_code, v5_code) in cases {
        let mut options = v4_options(&server, "refused-v4", token);
        if let Some(topic) = will {
            options.set_last_will(rumqttc::LastWill::new(
                topic,
                "{}",
                rumqttc::QoS::AtMostOnce,
                false,
            ));
        }
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
        match v4_closed(&mut eventloop).await {
            rumqttc::ConnectionError::ConnectionRefused(code) => {
                assert_eq!(code, v4_code, "3.1.1: {case}")
            }
            other => panic!("3.1.1 {case}: expected a refused CONNACK, got {other:?}"),
        }

        let mut options = v5_options(&server, "refused-v5", token);
        if let Some(topic) = will {
            options.set_last_will(v5::mqttbytes::v5::LastWill::new(
                topic,
                "{}",
                v5::mqttbytes::QoS::AtMostOnce,
                false,
                None,
            ));
        }
        let (_client, mut eventloop) = v5::AsyncClient::new(options, 8);
        let deadline = Instant::now() + WAIT;
        let error = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, eventloop.poll())
                .await
                .expect("MQTT 5 CONNACK")
            {
                Ok(_) => {}
                Err(error) => break error,
            }
        };
        match error {
            v5::ConnectionError::ConnectionRefused(code) => assert_eq!(code, v5_code, "5: {case}"),
            other => panic!("5 {case}: expected a refused CONNACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn unsupported_protocol_level_is_refused() {
    let server = Server::start().await;
    // (case, CONNECT bytes, expected CONNACK bytes)
    let cases: [(&str, Vec<u8>, Vec<u8>); 2] = [
        (
            "MQTT 3.1 (MQIsdp, level 3)",
            [
                &[0x10, 0x12, 0x00, 0x06][..],
                b"MQIsdp",
                &[0x03, 0x02, 0x00, 0x3C, 0x00, 0x04],
                b"abcd",
            ]
            .concat(),
            vec![0x20, 0x02, 0x00, 0x01],
        ),
        (
            "level 6",
            [
                &[0x10, 0x11, 0x00, 0x04][..],
                b"MQTT",
                &[0x06, 0x02, 0x00, 0x3C, 0x00, 0x00, 0x04],
                b"abcd",
            ]
            .concat(),
            vec![0x20, 0x03, 0x00, 0x84, 0x00],
        ),
    ];
    for (case, connect, expected) in cases {
        let mut client = RawClient::connect(&server).await;
        client.send(&connect).await;
        let packets = client.expect_closed().await;
        let connack = packets
            .first()
            .unwrap_or_else(|| panic!("{case}: no CONNACK"));
        let received = [
            &[connack.first_byte, connack.body.len() as u8][..],
            &connack.body,
        ]
        .concat();
        assert_eq!(received, expected, "{case}");
    }
}

#[tokio::test]
async fn publish_to_another_devices_topic_is_refused() {
    let server = Server::start().await;
    let device = server.create_device("intruder").await;
    let victim = server.create_device("victim").await;
    let (victim_client, mut victim_eventloop, _) =
        v5_connect(v5_options(&server, "victim", Some(&victim.token))).await;
    victim_client
        .publish(
            TELEMETRY,
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"owner": 1}"#,
        )
        .await
        .unwrap();
    v5_wait(&mut victim_eventloop, |packet| {
        matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(wait_for_latest(&server, &victim, "owner", &Value::from(1)).await);

    // MQTT 5: PUBACK 0x87 and the connection stays open.
    let (client, mut eventloop, _) =
        v5_connect(v5_options(&server, "intruder-v5", Some(&device.token))).await;
    for topic in [
        format!("devices/{}/telemetry", victim.id),
        "v1/devices/other/telemetry".to_owned(),
        "telemetry".to_owned(),
    ] {
        client
            .publish(
                topic.as_str(),
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                r#"{"owner": 666}"#,
            )
            .await
            .unwrap();
        let reason = v5_wait(&mut eventloop, |packet| match packet {
            v5::mqttbytes::v5::Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await;
        assert_eq!(reason, PubAckReason::NotAuthorized, "{topic}");
    }

    // MQTT 3.1.1: no PUBACK, the connection is closed.
    let (client, mut eventloop, _) =
        v4_connect(v4_options(&server, "intruder-v4", Some(&device.token))).await;
    client
        .publish(
            format!("devices/{}/telemetry", victim.id),
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"owner": 667}"#,
        )
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, eventloop.poll())
            .await
            .expect("the connection was not closed")
        {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack))) => {
                panic!("refused publish acknowledged: {ack:?}")
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }

    // The victim's data is unchanged: its own later value arrives and the
    // refused ones never do.
    victim_client
        .publish(
            TELEMETRY,
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"marker": 1}"#,
        )
        .await
        .unwrap();
    v5_wait(&mut victim_eventloop, |packet| {
        matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(wait_for_latest(&server, &victim, "marker", &Value::from(1)).await);
    assert_eq!(
        server.latest(&victim.id).await["owner"]["value"],
        Value::from(1)
    );
    assert!(server.latest(&device.id).await.get("owner").is_none());
}

#[tokio::test]
async fn subscribe_outside_namespace_is_refused() {
    let server = Server::start().await;
    let device = server.create_device("subscriber").await;
    let other = server.create_device("other").await;
    let own_by_id = format!("devices/{}/#", device.id);
    let other_by_id = format!("devices/{}/#", other.id);

    // MQTT 5: allowed filters succeed in the same SUBSCRIBE as refused ones.
    let (v5_client, mut v5_eventloop, _) =
        v5_connect(v5_options(&server, "sub-v5", Some(&device.token))).await;
    let filters = [
        "v1/devices/me/attributes",
        other_by_id.as_str(),
        "#",
        "v1/devices/+/attributes",
    ]
    .map(|path| Filter::new(path, v5::mqttbytes::QoS::AtLeastOnce));
    v5_client.subscribe_many(filters).await.unwrap();
    let codes = v5_wait(&mut v5_eventloop, |packet| match packet {
        v5::mqttbytes::v5::Packet::SubAck(suback) => Some(suback.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        [
            V5SubCode::Success(v5::mqttbytes::QoS::AtLeastOnce),
            V5SubCode::NotAuthorized,
            V5SubCode::NotAuthorized,
            V5SubCode::NotAuthorized
        ]
    );

    // MQTT 3.1.1: refused filters get 0x80.
    let (v4_client, mut v4_eventloop, _) =
        v4_connect(v4_options(&server, "sub-v4", Some(&device.token))).await;
    let filters = [own_by_id.as_str(), other_by_id.as_str()]
        .map(|path| rumqttc::SubscribeFilter::new(path.to_owned(), rumqttc::QoS::AtMostOnce));
    v4_client.subscribe_many(filters).await.unwrap();
    let codes = v4_wait(&mut v4_eventloop, |packet| match packet {
        rumqttc::Packet::SubAck(suback) => Some(suback.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        [
            rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::AtMostOnce),
            rumqttc::SubscribeReasonCode::Failure
        ]
    );

    // The granted subscriptions work: a publish of the same device reaches
    // both, each in the spelling of its filter.
    let (publisher, mut publisher_eventloop, _) =
        v4_connect(v4_options(&server, "publisher", Some(&device.token))).await;
    publisher
        .publish(
            "v1/devices/me/attributes",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"fw": "2.0"}"#,
        )
        .await
        .unwrap();
    v4_wait(&mut publisher_eventloop, |packet| {
        matches!(packet, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;

    let topic = v5_wait(&mut v5_eventloop, |packet| match packet {
        v5::mqttbytes::v5::Packet::Publish(publish) => {
            Some(String::from_utf8_lossy(&publish.topic).into_owned())
        }
        _ => None,
    })
    .await;
    assert_eq!(topic, "v1/devices/me/attributes");
    let topic = v4_wait(&mut v4_eventloop, |packet| match packet {
        rumqttc::Packet::Publish(publish) => Some(publish.topic.clone()),
        _ => None,
    })
    .await;
    assert_eq!(topic, format!("devices/{}/attributes", device.id));
}

// ---------------------------------------------------------------------------
// Malformed input and limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_and_truncated_connect_close_the_connection() {
    let server = Server::start().await;
    let device = server.create_device("survivor").await;

    let mut valid_connect = BytesMut::new();
    raw_connect(Version::V311, "truncated", Some(&device.token), 60, None)
        .encode(&mut valid_connect)
        .unwrap();
    let truncated = valid_connect[..valid_connect.len() / 2].to_vec();

    // (case, bytes, close the sending side after them)
    let cases: [(&str, Vec<u8>, bool); 6] = [
        (
            "HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        ("random bytes", vec![0xFF; 64], false),
        ("truncated CONNECT", truncated, true),
        (
            "five-byte remaining length",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            false,
        ),
        (
            "CONNECT larger than the packet limit",
            vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F],
            false,
        ),
        (
            "CONNECT with the reserved flag set",
            [
                &[0x10, 0x10, 0x00, 0x04][..],
                b"MQTT",
                &[0x04, 0x03, 0x00, 0x3C, 0x00, 0x04],
                b"abcd",
            ]
            .concat(),
            false,
        ),
    ];
    for (case, bytes, close_write) in cases {
        let mut client = RawClient::connect(&server).await;
        client.send(&bytes).await;
        if close_write {
            client
                .stream
                .shutdown()
                .await
                .expect("close the sending side");
        }
        let started = Instant::now();
        let packets = client.expect_closed().await;
        assert!(packets.is_empty(), "{case}: unexpected answer {packets:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{case}: closed only after {:?}",
            started.elapsed()
        );
    }

    // The server keeps serving other clients.
    let (client, mut eventloop, _) =
        v4_connect(v4_options(&server, "survivor", Some(&device.token))).await;
    client
        .publish(
            TELEMETRY,
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"survived": 1}"#,
        )
        .await
        .unwrap();
    v4_wait(&mut eventloop, |packet| {
        matches!(packet, rumqttc::Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(wait_for_latest(&server, &device, "survived", &Value::from(1)).await);
}

#[tokio::test]
async fn protocol_violations_close_with_a_reason_code() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_PAYLOAD_BYTES", "1024")]).await;
    let device = server.create_device("violator").await;

    let mut wildcard = BytesMut::new();
    raw_publish(
        Version::V5,
        "v1/devices/me/+",
        b"{}",
        RawQoS::AtLeastOnce,
        1,
    )
    .encode(&mut wildcard)
    .unwrap();
    let mut too_large = BytesMut::new();
    raw_publish(
        Version::V5,
        TELEMETRY,
        &vec![b' '; 4096],
        RawQoS::AtLeastOnce,
        1,
    )
    .encode(&mut too_large)
    .unwrap();
    let mut second_connect = BytesMut::new();
    raw_connect(Version::V5, "again", Some(&device.token), 60, None)
        .encode(&mut second_connect)
        .unwrap();

    // (case, bytes after CONNACK, DISCONNECT reason code)
    let cases = [
        ("wildcard in a PUBLISH topic", wildcard.to_vec(), 0x82),
        (
            "payload over mqtt.max_payload_bytes",
            too_large.to_vec(),
            0x95,
        ),
        ("second CONNECT", second_connect.to_vec(), 0x82),
        ("reserved packet type 0", vec![0x00, 0x00], 0x81),
        (
            "SUBSCRIBE with wrong flags",
            vec![0x80, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],
            0x81,
        ),
    ];
    for (case, bytes, code) in cases {
        let mut client = raw_connected(&server, Version::V5, &device.token, 60, None).await;
        client.send(&bytes).await;
        let packets = client.expect_closed().await;
        let disconnect = packets
            .iter()
            .find(|packet| packet.first_byte == 0xE0)
            .unwrap_or_else(|| panic!("{case}: no DISCONNECT in {packets:?}"));
        assert_eq!(disconnect.body.first(), Some(&code), "{case}");
    }
}

#[tokio::test]
async fn connections_over_the_limit_are_closed_at_accept() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_MAX_CONNECTIONS", "2")]).await;
    let device = server.create_device("crowd").await;
    let _first = raw_connected(&server, Version::V311, &device.token, 60, None).await;
    let second = raw_connected(&server, Version::V311, &device.token, 60, None).await;

    let mut third = RawClient::connect(&server).await;
    third
        .send_packet(&raw_connect(
            Version::V311,
            "third",
            Some(&device.token),
            60,
            None,
        ))
        .await;
    assert!(
        third.expect_closed().await.is_empty(),
        "third connection answered"
    );

    // A slot frees when a connection ends.
    drop(second);
    let accepted = wait_until(
        || async {
            let mut client = RawClient::connect(&server).await;
            client
                .send_packet(&raw_connect(
                    Version::V311,
                    "fourth",
                    Some(&device.token),
                    60,
                    None,
                ))
                .await;
            client
                .next_packet()
                .await
                .is_some_and(|connack| connack.first_byte == 0x20)
        },
        WAIT,
    )
    .await;
    assert!(accepted, "no slot freed after a connection closed");
}

#[tokio::test]
async fn silent_client_is_closed_after_connect_timeout() {
    let server = Server::start_with_env(&[("FERRITE_MQTT_CONNECT_TIMEOUT", "1s")]).await;
    let mut client = RawClient::connect(&server).await;
    let started = Instant::now();
    let packets = client.expect_closed().await;
    let elapsed = started.elapsed();
    assert!(packets.is_empty(), "{packets:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "closed too late: {elapsed:?}"
    );
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn persistent_session_receives_message_queued_while_offline() {
    let server = Server::start().await;
    let device = server.create_device("persistent").await;
    let (publisher, mut publisher_eventloop, _) = v5_connect(v5_options(
        &server,
        "persistent-publisher",
        Some(&device.token),
    ))
    .await;

    for version in [Version::V311, Version::V5] {
        let client_id = format!("persistent-{version:?}");
        let topic = format!("v1/devices/me/rpc/request/{version:?}");

        // Subscribe in a persistent session, then go away cleanly.
        match version {
            Version::V311 => {
                let mut options = v4_options(&server, &client_id, Some(&device.token));
                options.set_clean_session(false);
                let (client, mut eventloop, _) = v4_connect(options).await;
                client
                    .subscribe("v1/devices/me/rpc/request/+", rumqttc::QoS::AtLeastOnce)
                    .await
                    .unwrap();
                v4_wait(&mut eventloop, |packet| {
                    matches!(packet, rumqttc::Packet::SubAck(_)).then_some(())
                })
                .await;
                client.disconnect().await.unwrap();
                let _ = v4_closed(&mut eventloop).await;
            }
            Version::V5 => {
                let mut options = v5_options(&server, &client_id, Some(&device.token));
                options
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(300));
                let (client, mut eventloop, _) = v5_connect(options).await;
                client
                    .subscribe(
                        "v1/devices/me/rpc/request/+",
                        v5::mqttbytes::QoS::AtLeastOnce,
                    )
                    .await
                    .unwrap();
                v5_wait(&mut eventloop, |packet| {
                    matches!(packet, v5::mqttbytes::v5::Packet::SubAck(_)).then_some(())
                })
                .await;
                client.disconnect().await.unwrap();
                let _ = v5_disconnected(&mut eventloop).await;
            }
        }

        // A message for the offline session.
        publisher
            .publish(
                topic.as_str(),
                v5::mqttbytes::QoS::AtLeastOnce,
                false,
                r#"{"method": "reboot"}"#,
            )
            .await
            .unwrap();
        v5_wait(&mut publisher_eventloop, |packet| {
            matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
        })
        .await;

        // Reconnect: the session is present and the message arrives.
        match version {
            Version::V311 => {
                let mut options = v4_options(&server, &client_id, Some(&device.token));
                options.set_clean_session(false);
                let (_client, mut eventloop, session_present) = v4_connect(options).await;
                assert!(session_present, "3.1.1 session not present");
                let received = v4_wait(&mut eventloop, |packet| match packet {
                    rumqttc::Packet::Publish(publish) => Some(publish.topic.clone()),
                    _ => None,
                })
                .await;
                assert_eq!(received, topic);
            }
            Version::V5 => {
                let mut options = v5_options(&server, &client_id, Some(&device.token));
                options
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(300));
                let (_client, mut eventloop, session_present) = v5_connect(options).await;
                assert!(session_present, "5 session not present");
                let received = v5_wait(&mut eventloop, |packet| match packet {
                    v5::mqttbytes::v5::Packet::Publish(publish) => {
                        Some(String::from_utf8_lossy(&publish.topic).into_owned())
                    }
                    _ => None,
                })
                .await;
                assert_eq!(received, topic);
            }
        }
    }

    // A clean session starts without state.
    let (_client, _eventloop, session_present) =
        v4_connect(v4_options(&server, "persistent-V311", Some(&device.token))).await;
    assert!(!session_present, "clean session reported a present session");
}

#[tokio::test]
async fn client_id_takeover_disconnects_the_older_connection() {
    let server = Server::start().await;
    let device = server.create_device("twin").await;

    // MQTT 5: the older connection gets DISCONNECT 0x8E.
    let (_first, mut first_eventloop, _) =
        v5_connect(v5_options(&server, "twin", Some(&device.token))).await;
    let (second, mut second_eventloop, _) =
        v5_connect(v5_options(&server, "twin", Some(&device.token))).await;
    assert_eq!(
        v5_disconnected(&mut first_eventloop).await,
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    second
        .publish(
            TELEMETRY,
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"twin": 2}"#,
        )
        .await
        .unwrap();
    v5_wait(&mut second_eventloop, |packet| {
        matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
    })
    .await;
    assert!(wait_for_latest(&server, &device, "twin", &Value::from(2)).await);

    // MQTT 3.1.1: the older connection is closed.
    let (_first, mut first_eventloop, _) =
        v4_connect(v4_options(&server, "twin-v4", Some(&device.token))).await;
    let (_second, _second_eventloop, _) =
        v4_connect(v4_options(&server, "twin-v4", Some(&device.token))).await;
    let _ = v4_closed(&mut first_eventloop).await;
}

// ---------------------------------------------------------------------------
// Will messages and keep-alive
// ---------------------------------------------------------------------------

#[tokio::test]
async fn will_message_is_stored_on_ungraceful_close_only() {
    let server = Server::start().await;
    let device = server.create_device("will").await;

    // A normal DISCONNECT discards the will.
    let mut graceful = raw_connected(
        &server,
        Version::V311,
        &device.token,
        60,
        Some((TELEMETRY, br#"{"graceful_will": 1}"#)),
    )
    .await;
    graceful.send(&[0xE0, 0x00]).await;
    assert!(graceful.expect_closed().await.is_empty());

    // MQTT 5 DISCONNECT with 0x04 requests the will.
    let mut requested = raw_connected(
        &server,
        Version::V5,
        &device.token,
        60,
        Some((TELEMETRY, br#"{"requested_will": 1}"#)),
    )
    .await;
    requested
        .send_packet(&DisconnectPacket::new(
            mqtt5_protocol::ReasonCode::DisconnectWithWillMessage,
        ))
        .await;
    let _ = requested.expect_closed().await;
    assert!(wait_for_latest(&server, &device, "requested_will", &Value::from(1)).await);

    // Closing the socket without DISCONNECT publishes the will.
    let ungraceful = raw_connected(
        &server,
        Version::V311,
        &device.token,
        60,
        Some((TELEMETRY, br#"{"will": 1}"#)),
    )
    .await;
    drop(ungraceful);
    assert!(
        wait_for_latest(&server, &device, "will", &Value::from(1)).await,
        "will not stored: {}",
        server.latest(&device.id).await
    );
    assert!(
        server
            .latest(&device.id)
            .await
            .get("graceful_will")
            .is_none()
    );
}

#[tokio::test]
async fn will_delay_waits_and_resumed_session_cancels_it() {
    let server = Server::start().await;
    let device = server.create_device("delayed").await;
    let connect = |client_id: &str, will: Option<&[u8]>| {
        let mut options = ConnectOptions::new(client_id)
            .with_credentials(device.token.as_str(), b"")
            .with_clean_start(false)
            .with_session_expiry_interval(60);
        if let Some(payload) = will {
            let mut will = WillMessage::new(TELEMETRY, payload);
            will.properties.will_delay_interval = Some(2);
            options = options.with_will(will);
        }
        ConnectPacket::new(options)
    };

    // The session is resumed before the delay passes: no will.
    let mut first = RawClient::connect(&server).await;
    first
        .send_packet(&connect("resumed", Some(br#"{"cancelled_will": 1}"#)))
        .await;
    assert_eq!(first.next_packet().await.expect("CONNACK").body[1], 0x00);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut resumed = RawClient::connect(&server).await;
    resumed.send_packet(&connect("resumed", None)).await;
    let connack = resumed.next_packet().await.expect("CONNACK");
    assert_eq!(connack.body[..2], [0x01, 0x00], "session not present");

    // Nobody resumes this one: the will arrives after its delay.
    let mut abandoned = RawClient::connect(&server).await;
    abandoned
        .send_packet(&connect("abandoned", Some(br#"{"delayed_will": 1}"#)))
        .await;
    assert_eq!(
        abandoned.next_packet().await.expect("CONNACK").body[1],
        0x00
    );
    drop(abandoned);
    let dropped_at = Instant::now();
    assert!(wait_for_latest(&server, &device, "delayed_will", &Value::from(1)).await);
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(1900),
        "will sent before its delay: {:?}",
        dropped_at.elapsed()
    );

    // The cancelled will was due earlier than the one just stored.
    assert!(
        server
            .latest(&device.id)
            .await
            .get("cancelled_will")
            .is_none()
    );
}

#[tokio::test]
async fn keep_alive_timeout_closes_a_silent_connection() {
    let server = Server::start().await;
    let device = server.create_device("silent").await;

    for (version, key) in [
        (Version::V311, "keep_alive_will_v311"),
        (Version::V5, "keep_alive_will_v5"),
    ] {
        let will = format!(r#"{{"{key}": 1}}"#);
        let mut client = raw_connected(
            &server,
            version,
            &device.token,
            1,
            Some((TELEMETRY, will.as_bytes())),
        )
        .await;
        let started = Instant::now();
        let packets = client.expect_closed().await;
        let elapsed = started.elapsed();

        // 1.5 times the keep alive of 1 s, with room for a busy machine.
        assert!(
            elapsed >= Duration::from_millis(1400),
            "{version:?}: closed too early: {elapsed:?}"
        );
        assert!(
            elapsed < Duration::from_secs(5),
            "{version:?}: closed too late: {elapsed:?}"
        );
        if version == Version::V5 {
            let disconnect = packets.iter().find(|packet| packet.first_byte == 0xE0);
            assert_eq!(
                disconnect.and_then(|packet| packet.body.first()),
                Some(&0x8D),
                "{packets:?}"
            );
        }
        assert!(
            wait_for_latest(&server, &device, key, &Value::from(1)).await,
            "{version:?}: will not stored"
        );
    }

    // A client that pings stays connected past the keep alive.
    let mut pinging = raw_connected(&server, Version::V311, &device.token, 1, None).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        pinging.send(&[0xC0, 0x00]).await;
        let pong = pinging.next_packet().await.expect("PINGRESP");
        assert_eq!(pong.first_byte, 0xD0);
    }
}

#[tokio::test]
async fn shutdown_tells_mqtt5_clients_and_keeps_acknowledged_data() {
    let mut server = Server::start().await;
    let device = server.create_device("shutdown").await;
    let (client, mut eventloop, _) =
        v5_connect(v5_options(&server, "shutdown", Some(&device.token))).await;
    client
        .publish(
            TELEMETRY,
            v5::mqttbytes::QoS::AtLeastOnce,
            false,
            r#"{"before_shutdown": 1}"#,
        )
        .await
        .unwrap();
    v5_wait(&mut eventloop, |packet| {
        matches!(packet, v5::mqttbytes::v5::Packet::PubAck(_)).then_some(())
    })
    .await;

    // SIGTERM; `terminate` checks that the server exits successfully. The
    // DISCONNECT waits in the client's socket until it is polled.
    server.terminate();
    assert_eq!(
        v5_disconnected(&mut eventloop).await,
        Some(DisconnectReasonCode::ServerShuttingDown)
    );

    let data_dir = server.data_dir.clone();
    let restarted = Server::start_in(&data_dir, &[]).await;
    assert!(wait_for_latest(&restarted, &device, "before_shutdown", &Value::from(1)).await);
}

// ---------------------------------------------------------------------------
// Capacity checks, run by hand with
//   cargo test -p ferrite --test it mqtt::capacity -- --ignored --nocapture
// They start the debug build of the server like every other test, so a
// release build reaches higher numbers.
// ---------------------------------------------------------------------------

/// Resident memory of the server process, found by its data directory.
fn server_rss_kib(server: &Server) -> u64 {
    let data_dir = server.data_dir.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").expect("read /proc") {
        let path = entry.expect("proc entry").path();
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("serve") && cmdline.contains(&data_dir) {
            let status = std::fs::read_to_string(path.join("status")).expect("process status");
            let line = status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .expect("VmRSS line");
            return line
                .split_whitespace()
                .nth(1)
                .expect("VmRSS value")
                .parse()
                .expect("VmRSS number");
        }
    }
    panic!("server process not found");
}

#[tokio::test]
#[ignore = "opens 10,000 connections; run by hand"]
async fn capacity_10000_idle_connections_use_little_memory() {
    const CONNECTIONS: usize = 10_000;
    let server = Server::start().await;
    let device = server.create_device("idle").await;
    let before = server_rss_kib(&server);

    let mut clients = Vec::with_capacity(CONNECTIONS);
    for index in 0..CONNECTIONS {
        let mut client = RawClient::connect(&server).await;
        client
            .send_packet(&raw_connect(
                Version::V311,
                &format!("idle-{index}"),
                Some(&device.token),
                600,
                None,
            ))
            .await;
        clients.push(client);
    }
    for client in &mut clients {
        let connack = client.next_packet().await.expect("CONNACK");
        assert_eq!(connack.body, [0, 0]);
    }

    let after = server_rss_kib(&server);
    let per_connection = (after.saturating_sub(before)) * 1024 / CONNECTIONS as u64;
    println!(
        "RSS before {before} KiB, with {CONNECTIONS} idle connections {after} KiB ({per_connection} bytes each)"
    );
    assert!(after < 200 * 1024, "RSS {after} KiB exceeds 200 MiB");
}

#[tokio::test]
#[ignore = "load test; run by hand"]
async fn capacity_100_devices_publishing_qos1() {
    const DEVICES: usize = 100;
    const IN_FLIGHT: usize = 32;
    const DURATION: Duration = Duration::from_secs(10);

    let server = Server::start().await;
    let mut tokens = Vec::with_capacity(DEVICES);
    for index in 0..DEVICES {
        tokens.push(server.create_device(&format!("load-{index}")).await.token);
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let addr = server.mqtt_addr;
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let mut client = RawClient {
                stream,
                buffer: BytesMut::new(),
            };
            client
                .send_packet(&raw_connect(
                    Version::V311,
                    &format!("load-{index}"),
                    Some(&token),
                    60,
                    None,
                ))
                .await;
            assert_eq!(client.next_packet().await.expect("CONNACK").body, [0, 0]);

            let mut next_id: u16 = 1;
            let mut in_flight = 0;
            let mut acked = 0u64;
            let mut batch = BytesMut::new();
            while started.elapsed() < DURATION {
                while in_flight < IN_FLIGHT {
                    let payload = format!(r#"{{"temperature": {acked}, "humidity": 40.5}}"#);
                    raw_publish(
                        Version::V311,
                        TELEMETRY,
                        payload.as_bytes(),
                        RawQoS::AtLeastOnce,
                        next_id,
                    )
                    .encode(&mut batch)
                    .expect("encode");
                    next_id = next_id.checked_add(1).unwrap_or(1);
                    in_flight += 1;
                }
                client.send(&batch).await;
                batch.clear();
                let ack = client.next_packet().await.expect("PUBACK");
                assert_eq!(ack.first_byte, 0x40);
                in_flight -= 1;
                acked += 1;
                while let Some(ack) = client.take_packet() {
                    assert_eq!(ack.first_byte, 0x40);
                    in_flight -= 1;
                    acked += 1;
                }
            }
            acked
        }));
    }

    let mut total = 0;
    for task in tasks {
        total += task.await.expect("load task");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!(
        "{DEVICES} devices, QoS 1, {IN_FLIGHT} in flight each: {total} messages acknowledged, {rate:.0} messages/s"
    );
}
