//! Rows for the server statements of MQTT 3.1.1. A device may use only its
//! own namespace, so topics are under `v1/devices/me/` or `devices/{id}/`.

use std::time::Duration;

use super::*;

const TELEMETRY: &str = "v1/devices/me/telemetry";
const JSON: &[u8] = br#"{"t":1}"#;

pub fn rows(lane: &Lane, v: Version) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.extend(encoding_rows(lane, v));
    rows.extend(connect_rows(lane, v));
    rows.extend(session_rows(lane, v));
    rows.extend(will_rows(lane, v));
    rows.extend(publish_rows(lane, v));
    rows.extend(subscribe_rows(lane, v));
    rows.extend(topic_rows(lane, v));
    rows
}

/// Steps that connect `slot` and send `bytes`.
fn after_connect(lane: &Lane, v: Version, slot: usize, bytes: Vec<u8>) -> Vec<Step> {
    let mut steps = connected(slot, &lane.connect(v));
    steps.push(Step::Send(slot, bytes));
    steps
}

/// Builds a row that connects, sends `bytes` and expects the server to close.
fn closes(lane: &Lane, v: Version, id: &'static str, case: &'static str, bytes: Vec<u8>) -> Row {
    let mut steps = after_connect(lane, v, 1, bytes);
    steps.push(Step::Expect(1, Expect::Closed));
    Row { id, case, steps }
}

/// Builds a row that sends `connect` as the first packet and expects a close
/// without CONNACK.
fn connect_closes(id: &'static str, case: &'static str, connect: Vec<u8>) -> Row {
    Row {
        id,
        case,
        steps: vec![
            Step::Open(1),
            Step::Send(1, connect),
            Step::Expect(1, Expect::Closed),
        ],
    }
}

/// Steps: slot 2 subscribes to `filter` with `qos` and gets it granted.
fn subscribed(lane: &Lane, v: Version, slot: usize, filter: &str, qos: u8) -> Vec<Step> {
    let mut steps = connected(slot, &lane.connect(v));
    steps.push(Step::Send(slot, subscribe(v, 1, &[(filter, qos)])));
    steps.push(Step::Expect(
        slot,
        expect_sub_ack(v, 0x90, 1, &[qos.min(1)]),
    ));
    steps
}

fn encoding_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let bad_utf8 = b"v1/devices/me/\xED\xA0\x80".to_vec();
    let with_null = b"v1/devices/me/a\x00b".to_vec();
    let bom_topic = "v1/devices/me/\u{FEFF}bom";

    let mut bom = subscribed(lane, v, 1, "v1/devices/me/#", 0);
    bom.push(Step::Send(1, publish_simple(v, 0, bom_topic, 0, b"x")));
    bom.push(Step::Expect(1, expect_publish(v, bom_topic, b"x", 0)));

    let mut zero_id = connect_closes_rows_zero_id(lane, v);
    zero_id.extend([
        closes(
            lane,
            v,
            "MQTT-1.5.3-1",
            "PUBLISH topic with an encoded surrogate",
            publish(v, 0, 0, &bad_utf8, 0, &[], b"x"),
        ),
        closes(
            lane,
            v,
            "MQTT-1.5.3-2",
            "PUBLISH topic with U+0000",
            publish(v, 0, 0, &with_null, 0, &[], b"x"),
        ),
        Row {
            id: "MQTT-1.5.3-3",
            case: "U+FEFF in a topic is delivered unchanged",
            steps: bom,
        },
        closes(
            lane,
            v,
            "MQTT-2.2.2-2",
            "PUBREL with flags 0000",
            ack(0x60, 1),
        ),
        closes(
            lane,
            v,
            "MQTT-2.2.2-2",
            "PUBACK with flags 0001",
            ack(0x41, 1),
        ),
        closes(
            lane,
            v,
            "MQTT-2.2.2-2",
            "PINGREQ with flags 0001",
            vec![0xC1, 0x00],
        ),
        closes(lane, v, "MQTT-2.2.2-2", "SUBSCRIBE with flags 0000", {
            let mut bytes = subscribe(v, 1, &[("v1/devices/me/a", 0)]);
            bytes[0] = 0x80;
            bytes
        }),
    ]);
    zero_id
}

/// Rows for packet identifiers.
fn connect_closes_rows_zero_id(lane: &Lane, v: Version) -> Vec<Row> {
    let mut puback_id = after_connect(lane, v, 1, publish_simple(v, 1, TELEMETRY, 0x1234, JSON));
    puback_id.push(Step::Expect(1, Expect::Bytes(ack(0x40, 0x1234))));

    let mut suback_id = after_connect(lane, v, 1, subscribe(v, 0x4321, &[("v1/devices/me/a", 1)]));
    suback_id.push(Step::Expect(1, expect_sub_ack(v, 0x90, 0x4321, &[1])));
    suback_id.push(Step::Send(1, unsubscribe(v, 0x4322, &["v1/devices/me/a"])));
    suback_id.push(Step::Expect(1, Expect::Bytes(ack(0xB0, 0x4322))));

    let mut qos0_no_id = subscribed(lane, v, 1, "v1/devices/me/q0", 0);
    qos0_no_id.push(Step::Send(
        1,
        publish_simple(v, 0, "v1/devices/me/q0", 0, b"p"),
    ));
    qos0_no_id.push(Step::Expect(
        1,
        Expect::Bytes(frame(
            0x30,
            &[string(b"v1/devices/me/q0"), b"p".to_vec()].concat(),
        )),
    ));

    vec![
        closes(
            lane,
            v,
            "MQTT-2.3.1-1",
            "PUBLISH QoS 1 with packet id 0",
            publish_simple(v, 1, TELEMETRY, 0, JSON),
        ),
        closes(
            lane,
            v,
            "MQTT-2.3.1-1",
            "SUBSCRIBE with packet id 0",
            subscribe(v, 0, &[("v1/devices/me/a", 0)]),
        ),
        closes(
            lane,
            v,
            "MQTT-2.3.1-1",
            "UNSUBSCRIBE with packet id 0",
            unsubscribe(v, 0, &["v1/devices/me/a"]),
        ),
        Row {
            id: "MQTT-2.3.1-5",
            case: "QoS 0 PUBLISH to a subscriber has no packet id",
            steps: qos0_no_id,
        },
        Row {
            id: "MQTT-2.3.1-6",
            case: "PUBACK carries the PUBLISH packet id",
            steps: puback_id,
        },
        Row {
            id: "MQTT-2.3.1-7",
            case: "SUBACK and UNSUBACK carry the request's packet id",
            steps: suback_id,
        },
    ]
}

fn connect_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let connect = || lane.connect(v);

    let mut second_connect = connected(1, &connect());
    second_connect.push(Step::Send(1, connect().bytes()));
    second_connect.push(Step::Expect(1, Expect::Closed));

    let mut level_3 = connect();
    level_3.level = 3;
    let mut level_6 = connect();
    level_6.level = 6;
    let mut wrong_name = connect();
    wrong_name.protocol_name = b"MQTX".to_vec();
    let mut reserved = connect();
    reserved.flags = Some(connect().computed_flags() | 0x01);

    let mut username_absent = connect();
    username_absent.flags = Some(0x02);
    let mut username_missing = connect();
    username_missing.username = None;
    username_missing.flags = Some(0x82 | 0x80);
    let mut password_absent = connect();
    password_absent.payload = Some(
        [
            string(&connect().client_id),
            string(lane.token.as_bytes()),
            string(b"pw"),
        ]
        .concat(),
    );
    let mut password_missing = connect();
    password_missing.flags = Some(0x82 | 0x80 | 0x40);
    let mut password_without_user = connect();
    password_without_user.username = None;
    password_without_user.password = Some(lane.token.as_bytes().to_vec());

    let mut empty_payload = connect();
    empty_payload.payload = Some(Vec::new());
    let mut bad_client_id = connect();
    bad_client_id.client_id = b"id\xFF".to_vec();
    let mut bad_username = connect();
    bad_username.username = Some(b"tok\xC3".to_vec());
    let mut truncated = connect().bytes();
    truncated.truncate(truncated.len() - 3);
    truncated[1] -= 3;

    let mut all_fields = connect().with_will(Will::new("v1/devices/me/status", b"gone"));
    all_fields.password = Some(b"secret".to_vec());
    let mut alphanumeric = connect();
    alphanumeric.client_id = b"0123456789abcdefghijXYZ".to_vec();
    let mut empty_id = connect();
    empty_id.client_id = Vec::new();
    let empty_id_persistent = {
        let mut c = connect().clean(false);
        c.client_id = Vec::new();
        c
    };

    let mut bad_token = connect();
    bad_token.username = Some(b"not-a-token".to_vec());
    let mut rejected_then_publish = bad_token.bytes();
    rejected_then_publish.extend(publish_simple(v, 1, TELEMETRY, 1, JSON));

    let mut connack_first = connect().bytes();
    connack_first.extend(PINGREQ);

    let mut ping = connected(1, &connect());
    ping.push(Step::Send(1, PINGREQ.to_vec()));
    ping.push(Step::Expect(1, Expect::Bytes(PINGRESP.to_vec())));

    let mut keep_alive = connect();
    keep_alive.keep_alive = 1;
    let mut keep_alive_steps = connected(1, &keep_alive);
    keep_alive_steps.push(Step::Expect(
        1,
        Expect::Silence(Duration::from_millis(1200)),
    ));
    keep_alive_steps.push(Step::Expect(1, Expect::Closed));

    let mut disconnect_flags = connected(1, &connect());
    disconnect_flags.push(Step::Send(1, vec![0xE1, 0x00]));
    disconnect_flags.push(Step::Expect(1, Expect::Closed));

    vec![
        connect_closes(
            "MQTT-3.1.0-1",
            "PINGREQ as the first packet",
            PINGREQ.to_vec(),
        ),
        connect_closes(
            "MQTT-3.1.0-1",
            "PUBLISH as the first packet",
            publish_simple(v, 0, TELEMETRY, 0, JSON),
        ),
        Row {
            id: "MQTT-3.1.0-2",
            case: "second CONNECT on a connection",
            steps: second_connect,
        },
        connect_closes("MQTT-3.1.2-1", "protocol name MQTX", wrong_name.bytes()),
        Row {
            id: "MQTT-3.1.2-2",
            case: "protocol level 3 gets return code 0x01",
            steps: vec![
                Step::Open(1),
                Step::Send(1, level_3.bytes()),
                Step::Expect(1, Expect::Bytes(vec![0x20, 0x02, 0x00, 0x01])),
                Step::Expect(1, Expect::Closed),
            ],
        },
        Row {
            id: "MQTT-3.1.2-2",
            case: "protocol level 6 is refused",
            steps: vec![
                Step::Open(1),
                Step::Send(1, level_6.bytes()),
                Step::Expect(
                    1,
                    Expect::Packet(
                        "a CONNACK refusal",
                        Box::new(|packet| {
                            if packet.first_byte == 0x20
                                && packet.body.get(1).is_some_and(|code| *code != 0)
                            {
                                Ok(())
                            } else {
                                Err(format!("got {packet:02x?}"))
                            }
                        }),
                    ),
                ),
                Step::Expect(1, Expect::Closed),
            ],
        },
        connect_closes(
            "MQTT-3.1.2-3",
            "reserved connect flag set",
            reserved.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.2-18",
            "user name flag 0 with a user name",
            username_absent.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.2-19",
            "user name flag 1 without a user name",
            username_missing.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.2-20",
            "password flag 0 with a password",
            password_absent.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.2-21",
            "password flag 1 without a password",
            password_missing.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.2-22",
            "password flag 1 with user name flag 0",
            password_without_user.bytes(),
        ),
        Row {
            id: "MQTT-3.1.2-24",
            case: "keep alive 1 s: closed after 1.5 s of silence",
            steps: keep_alive_steps,
        },
        Row {
            id: "MQTT-3.1.3-1",
            case: "client id, will, user name and password in order",
            steps: connected(1, &all_fields),
        },
        connect_closes(
            "MQTT-3.1.3-3",
            "CONNECT without a payload",
            empty_payload.bytes(),
        ),
        connect_closes(
            "MQTT-3.1.3-4",
            "client id that is not UTF-8",
            bad_client_id.bytes(),
        ),
        Row {
            id: "MQTT-3.1.3-5",
            case: "23 alphanumeric characters are accepted",
            steps: connected(1, &alphanumeric),
        },
        Row {
            id: "MQTT-3.1.3-6",
            case: "empty client id with clean session 1 is accepted",
            steps: connected(1, &empty_id),
        },
        Row {
            id: "MQTT-3.1.3-8",
            case: "empty client id with clean session 0 gets 0x02",
            steps: vec![
                Step::Open(1),
                Step::Send(1, empty_id_persistent.bytes()),
                Step::Expect(1, Expect::Bytes(vec![0x20, 0x02, 0x00, 0x02])),
                Step::Expect(1, Expect::Closed),
            ],
        },
        connect_closes(
            "MQTT-3.1.3-11",
            "user name that is not UTF-8",
            bad_username.bytes(),
        ),
        connect_closes("MQTT-3.1.4-1", "CONNECT cut short", truncated),
        Row {
            id: "MQTT-3.1.4-4",
            case: "valid CONNECT gets return code 0",
            steps: connected(1, &connect()),
        },
        Row {
            id: "MQTT-3.1.4-5",
            case: "PUBLISH after a refused CONNECT is not acknowledged",
            steps: vec![
                Step::Open(1),
                Step::Send(1, rejected_then_publish),
                Step::Expect(1, Expect::Bytes(vec![0x20, 0x02, 0x00, 0x05])),
                Step::Expect(1, Expect::Closed),
            ],
        },
        Row {
            id: "MQTT-3.2.0-1",
            case: "CONNACK comes before the PINGRESP of a PINGREQ sent with CONNECT",
            steps: vec![
                Step::Open(1),
                Step::Send(1, connack_first),
                Step::Expect(1, Expect::Bytes(vec![0x20, 0x02, 0x00, 0x00])),
                Step::Expect(1, Expect::Bytes(PINGRESP.to_vec())),
            ],
        },
        Row {
            id: "MQTT-3.2.2-4",
            case: "refused CONNECT has session present 0",
            steps: vec![
                Step::Open(1),
                Step::Send(1, bad_token.clone().clean(false).bytes()),
                Step::Expect(
                    1,
                    Expect::Connack {
                        session_present: false,
                        code: 0x05,
                    },
                ),
            ],
        },
        Row {
            id: "MQTT-3.2.2-5",
            case: "refused CONNECT is followed by a close",
            steps: vec![
                Step::Open(1),
                Step::Send(1, bad_token.bytes()),
                Step::Expect(
                    1,
                    Expect::Connack {
                        session_present: false,
                        code: 0x05,
                    },
                ),
                Step::Expect(1, Expect::Closed),
            ],
        },
        connect_closes(
            "MQTT-3.2.2-6",
            "malformed CONNECT gets no CONNACK",
            truncated_connect(lane, v),
        ),
        Row {
            id: "MQTT-3.12.4-1",
            case: "PINGREQ gets PINGRESP",
            steps: ping,
        },
        Row {
            id: "MQTT-3.14.1-1",
            case: "DISCONNECT with flags 0001",
            steps: disconnect_flags,
        },
    ]
}

/// Builds a CONNECT whose remaining length claims fewer bytes than its fields need.
fn truncated_connect(lane: &Lane, v: Version) -> Vec<u8> {
    let mut connect = lane.connect(v);
    connect.payload = Some(vec![0x00, 0x10, b'a']);
    connect.bytes()
}

fn session_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let topic = "v1/devices/me/session";

    // A session with clean session 0 is kept after DISCONNECT and resumed.
    let persistent = lane.connect(v).clean(false);
    let mut resume = connected(1, &persistent);
    resume.push(Step::Send(1, subscribe(v, 1, &[(topic, 1)])));
    resume.push(Step::Expect(1, expect_sub_ack(v, 0x90, 1, &[1])));
    resume.push(Step::Send(1, DISCONNECT_V311.to_vec()));
    resume.push(Step::Expect(1, Expect::Closed));
    let mut offline = copy_steps(&resume);
    resume.extend([
        Step::Open(1),
        Step::Send(1, persistent.bytes()),
        Step::Expect(
            1,
            Expect::Connack {
                session_present: true,
                code: 0,
            },
        ),
    ]);

    // Messages for an offline persistent session are kept.
    offline.extend(connected(2, &lane.connect(v)));
    offline.push(Step::Send(2, publish_simple(v, 1, topic, 7, b"kept")));
    offline.push(Step::Expect(2, Expect::Bytes(ack(0x40, 7))));
    offline.extend([
        Step::Open(1),
        Step::Send(1, persistent.bytes()),
        Step::Expect(
            1,
            Expect::Connack {
                session_present: true,
                code: 0,
            },
        ),
        Step::Expect(1, expect_publish(v, topic, b"kept", 1)),
    ]);

    // A clean session 1 CONNECT discards the stored session.
    let discard_id = lane.client_id();
    let mut first = Connect::new(v, &discard_id, &lane.token).clean(false);
    first.keep_alive = 60;
    let mut discard = connected(1, &first);
    discard.push(Step::Send(
        1,
        subscribe(v, 1, &[("v1/devices/me/discard", 1)]),
    ));
    discard.push(Step::Expect(1, expect_sub_ack(v, 0x90, 1, &[1])));
    discard.push(Step::Close(1));
    discard.push(Step::Pause(Duration::from_millis(100)));
    discard.extend(connected(1, &Connect::new(v, &discard_id, &lane.token)));
    discard.extend(connected(2, &lane.connect(v)));
    discard.push(Step::Send(
        2,
        publish_simple(v, 1, "v1/devices/me/discard", 3, b"x"),
    ));
    discard.push(Step::Expect(2, Expect::Bytes(ack(0x40, 3))));
    discard.push(Step::Expect(1, Expect::Silence(SILENCE)));

    let new_persistent = lane.connect(v).clean(false);

    // Takeover: a second connection with the same client id.
    let takeover_id = lane.client_id();
    let mut takeover = connected(1, &Connect::new(v, &takeover_id, &lane.token));
    takeover.extend(connected(2, &Connect::new(v, &takeover_id, &lane.token)));
    takeover.push(Step::Expect(1, Expect::Closed));
    takeover.push(Step::Send(2, PINGREQ.to_vec()));
    takeover.push(Step::Expect(2, Expect::Bytes(PINGRESP.to_vec())));

    // Unacknowledged QoS 1 messages are sent again, in order, with DUP 1
    // and the same packet ids.
    let resend_id = lane.client_id();
    let resend_topic = "v1/devices/me/resend";
    let receiver = Connect::new(v, &resend_id, &lane.token).clean(false);
    let mut resend = connected(1, &receiver);
    resend.push(Step::Send(1, subscribe(v, 1, &[(resend_topic, 1)])));
    resend.push(Step::Expect(1, expect_sub_ack(v, 0x90, 1, &[1])));
    resend.extend(connected(2, &lane.connect(v)));
    resend.push(Step::Send(2, publish_simple(v, 1, resend_topic, 1, b"one")));
    resend.push(Step::Send(2, publish_simple(v, 1, resend_topic, 2, b"two")));
    let seen = SeenIds::default();
    resend.push(Step::Expect(1, expect_first_delivery(v, b"one", &seen)));
    resend.push(Step::Expect(1, expect_first_delivery(v, b"two", &seen)));
    resend.push(Step::Close(1));
    resend.push(Step::Pause(Duration::from_millis(100)));
    resend.extend([
        Step::Open(1),
        Step::Send(1, receiver.bytes()),
        Step::Expect(
            1,
            Expect::Connack {
                session_present: true,
                code: 0,
            },
        ),
        Step::Expect(1, expect_resend(v, b"one", &seen, 0)),
        Step::Expect(1, expect_resend(v, b"two", &seen, 1)),
    ]);

    vec![
        Row {
            id: "MQTT-3.1.2-4",
            case: "clean session 0 resumes the stored session",
            steps: resume,
        },
        Row {
            id: "MQTT-3.1.2-5",
            case: "QoS 1 message for an offline session is delivered on resume",
            steps: offline,
        },
        Row {
            id: "MQTT-3.1.2-6",
            case: "clean session 1 discards the stored subscriptions",
            steps: discard,
        },
        Row {
            id: "MQTT-3.2.2-3",
            case: "clean session 0 without a stored session has session present 0",
            steps: connected(1, &new_persistent),
        },
        Row {
            id: "MQTT-3.1.4-2",
            case: "same client id closes the older connection",
            steps: takeover,
        },
        Row {
            id: "MQTT-4.4.0-1",
            case: "unacknowledged PUBLISHes are resent on resume",
            steps: resend,
        },
    ]
}

fn will_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let status = "v1/devices/me/status";
    let will_connect = |qos: u8, retain: bool| {
        let mut will = Will::new(status, b"gone");
        will.qos = qos;
        will.retain = retain;
        lane.connect(v).with_will(will)
    };

    // Slot 2 watches the status topic; slot 1 leaves in some way.
    let watched = |leave: Vec<Step>, expect: Expect| {
        let mut steps = subscribed(lane, v, 2, status, 1);
        steps.extend(connected(1, &will_connect(0, false)));
        steps.extend(leave);
        steps.push(Step::Expect(2, expect));
        steps
    };
    let published = || expect_publish(v, status, b"gone", 0);

    let no_will = {
        let mut steps = subscribed(lane, v, 2, status, 1);
        steps.extend(connected(1, &lane.connect(v)));
        steps.push(Step::Close(1));
        steps.push(Step::Expect(2, Expect::Silence(SILENCE)));
        steps
    };

    let mut will_flag_missing_fields = will_connect(0, false);
    will_flag_missing_fields.payload = Some(
        [
            string(&lane.client_id().into_bytes()),
            string(lane.token.as_bytes()),
        ]
        .concat(),
    );
    let mut qos_without_will = lane.connect(v);
    qos_without_will.flags = Some(qos_without_will.computed_flags() | 0x08);
    let mut retain_without_will = lane.connect(v);
    retain_without_will.flags = Some(retain_without_will.computed_flags() | 0x20);
    let mut will_qos_3 = will_connect(0, false);
    will_qos_3.flags = Some(will_qos_3.computed_flags() | 0x18);
    let mut bad_will_topic = will_connect(0, false);
    bad_will_topic.will.as_mut().unwrap().topic = b"v1/devices/me/\xC0\xAF".to_vec();

    let will_retain_not_retained = {
        let mut steps = subscribed(lane, v, 2, status, 1);
        steps.extend(connected(1, &will_connect(0, true)));
        steps.push(Step::Close(1));
        steps.push(Step::Expect(2, published()));
        steps
    };

    vec![
        Row {
            id: "MQTT-3.1.2-8",
            case: "will is published when the socket closes",
            steps: watched(vec![Step::Close(1)], published()),
        },
        Row {
            id: "MQTT-3.1.2-8",
            case: "will is published after a protocol violation",
            steps: watched(vec![Step::Send(1, vec![0xC1, 0x00])], published()),
        },
        connect_closes(
            "MQTT-3.1.2-9",
            "will flag 1 without will topic and message",
            will_flag_missing_fields.bytes(),
        ),
        Row {
            id: "MQTT-3.1.2-10",
            case: "will is discarded after DISCONNECT",
            steps: watched(
                vec![Step::Send(1, DISCONNECT_V311.to_vec())],
                Expect::Silence(SILENCE),
            ),
        },
        connect_closes(
            "MQTT-3.1.2-11",
            "will QoS 1 with will flag 0",
            qos_without_will.bytes(),
        ),
        Row {
            id: "MQTT-3.1.2-12",
            case: "no will is published without the will flag",
            steps: no_will,
        },
        connect_closes("MQTT-3.1.2-14", "will QoS 3", will_qos_3.bytes()),
        connect_closes(
            "MQTT-3.1.2-15",
            "will retain 1 with will flag 0",
            retain_without_will.bytes(),
        ),
        Row {
            id: "MQTT-3.1.2-16",
            case: "will with retain 0 is published with RETAIN 0",
            steps: watched(vec![Step::Close(1)], published()),
        },
        Row {
            id: "MQTT-3.1.2-17",
            case: "retained will reaches an established subscription with RETAIN 0",
            steps: will_retain_not_retained,
        },
        connect_closes(
            "MQTT-3.1.3-10",
            "will topic that is not UTF-8",
            bad_will_topic.bytes(),
        ),
        Row {
            id: "MQTT-3.14.1-1",
            case: "DISCONNECT with flags 0001 publishes the will",
            steps: watched(vec![Step::Send(1, vec![0xE1, 0x00])], published()),
        },
    ]
}

fn publish_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let topic = "v1/devices/me/pub";

    // Slot 2 subscribes to `topic` with `granted`; slot 1 publishes.
    let routed = |granted: u8, sent: Vec<u8>, acks: Vec<Expect>, received: Vec<Expect>| {
        let mut steps = subscribed(lane, v, 2, topic, granted);
        steps.extend(connected(1, &lane.connect(v)));
        steps.push(Step::Send(1, sent));
        steps.extend(acks.into_iter().map(|expect| Step::Expect(1, expect)));
        steps.extend(received.into_iter().map(|expect| Step::Expect(2, expect)));
        steps
    };

    let dup_in = publish(v, 1, 0x08, topic.as_bytes(), 4, &[], b"d");
    let retain_in = publish(v, 1, 0x01, topic.as_bytes(), 5, &[], b"r");

    let qos_responses = {
        let mut steps = connected(1, &lane.connect(v));
        steps.push(Step::Send(1, publish_simple(v, 0, TELEMETRY, 0, JSON)));
        steps.push(Step::Send(1, publish_simple(v, 1, TELEMETRY, 11, JSON)));
        steps.push(Step::Send(1, publish_simple(v, 2, TELEMETRY, 12, JSON)));
        steps.push(Step::Expect(1, Expect::Bytes(ack(0x40, 11))));
        steps.push(Step::Expect(1, Expect::Bytes(ack(0x50, 12))));
        steps.push(Step::Send(1, ack(0x62, 12)));
        steps.push(Step::Expect(1, Expect::Bytes(ack(0x70, 12))));
        steps
    };

    let overlapping = {
        let mut steps = connected(2, &lane.connect(v));
        steps.push(Step::Send(
            2,
            subscribe(v, 1, &[("v1/devices/me/#", 0), (topic, 1)]),
        ));
        steps.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[0, 1])));
        steps.extend(connected(1, &lane.connect(v)));
        steps.push(Step::Send(1, publish_simple(v, 1, topic, 6, b"o")));
        steps.push(Step::Expect(1, Expect::Bytes(ack(0x40, 6))));
        steps.push(Step::Expect(
            2,
            expect_publish_where(v, "PUBLISH at the larger QoS", |publish| {
                if publish.qos == 1 && publish.payload == b"o" {
                    Ok(())
                } else {
                    Err(format!(
                        "expected the message at QoS 1 first, got {publish:?}"
                    ))
                }
            }),
        ));
        steps
    };

    let mut qos2_flow = subscribed(lane, v, 2, topic, 1);
    qos2_flow.extend(connected(1, &lane.connect(v)));
    qos2_flow.extend([
        Step::Send(1, publish_simple(v, 2, topic, 20, b"once")),
        Step::Expect(1, Expect::Bytes(ack(0x50, 20))),
        Step::Send(1, publish(v, 2, 0x08, topic.as_bytes(), 20, &[], b"once")),
        Step::Expect(1, Expect::Bytes(ack(0x50, 20))),
        Step::Send(1, ack(0x62, 20)),
        Step::Expect(1, Expect::Bytes(ack(0x70, 20))),
        Step::Expect(2, expect_publish(v, topic, b"once", 1)),
        Step::Send(2, ack(0x40, 1)),
        Step::Expect(2, Expect::Silence(SILENCE)),
        // After PUBCOMP the same packet id is a new message.
        Step::Send(1, publish_simple(v, 2, topic, 20, b"again")),
        Step::Expect(1, Expect::Bytes(ack(0x50, 20))),
        Step::Send(1, ack(0x62, 20)),
        Step::Expect(1, Expect::Bytes(ack(0x70, 20))),
        Step::Expect(2, expect_publish(v, topic, b"again", 1)),
    ]);

    let qos1_new_after_ack = routed(
        0,
        [
            publish_simple(v, 1, topic, 9, b"a"),
            publish(v, 1, 0x08, topic.as_bytes(), 9, &[], b"a"),
        ]
        .concat(),
        vec![Expect::Bytes(ack(0x40, 9)), Expect::Bytes(ack(0x40, 9))],
        vec![
            expect_publish(v, topic, b"a", 0),
            expect_publish(v, topic, b"a", 0),
        ],
    );

    let ordered_acks = {
        let mut steps = connected(1, &lane.connect(v));
        let mut burst = Vec::new();
        for id in 1..=5u16 {
            burst.extend(publish_simple(v, 1, TELEMETRY, id, JSON));
            burst.extend(publish_simple(v, 2, TELEMETRY, 100 + id, JSON));
        }
        steps.push(Step::Send(1, burst));
        for id in 1..=5u16 {
            steps.push(Step::Expect(1, Expect::Bytes(ack(0x40, id))));
            steps.push(Step::Expect(1, Expect::Bytes(ack(0x50, 100 + id))));
        }
        steps
    };

    let ordered_delivery = {
        let mut burst = Vec::new();
        let mut acks = Vec::new();
        let mut received = Vec::new();
        for index in 1..=5u16 {
            let payload = format!("m{index}").into_bytes();
            burst.extend(publish_simple(v, 1, topic, index, &payload));
            acks.push(Expect::Bytes(ack(0x40, index)));
            received.push(expect_publish(v, topic, &payload, 1));
        }
        routed(1, burst, acks, received)
    };

    let distinct_ids = {
        let mut steps = subscribed(lane, v, 2, topic, 1);
        steps.extend(connected(1, &lane.connect(v)));
        steps.push(Step::Send(
            1,
            [
                publish_simple(v, 1, topic, 1, b"x"),
                publish_simple(v, 1, topic, 2, b"y"),
            ]
            .concat(),
        ));
        steps.push(Step::Expect(
            2,
            expect_publish_where(v, "first QoS 1 PUBLISH", |publish| {
                (publish.packet_id == Some(1) && !publish.dup)
                    .then_some(())
                    .ok_or(format!("expected packet id 1 and DUP 0, got {publish:?}"))
            }),
        ));
        steps.push(Step::Expect(
            2,
            expect_publish_where(v, "second QoS 1 PUBLISH", |publish| {
                (publish.packet_id == Some(2) && !publish.dup)
                    .then_some(())
                    .ok_or(format!(
                        "expected a new packet id 2 and DUP 0, got {publish:?}"
                    ))
            }),
        ));
        steps
    };

    let mut not_authorized = after_connect(
        lane,
        v,
        1,
        publish_simple(
            v,
            1,
            "devices/00000000-0000-0000-0000-000000000000/telemetry",
            1,
            JSON,
        ),
    );
    not_authorized.push(Step::Expect(1, Expect::Closed));

    vec![
        Row {
            id: "MQTT-3.3.1-3",
            case: "DUP 1 of an incoming PUBLISH is not passed on",
            steps: routed(
                1,
                dup_in,
                vec![Expect::Bytes(ack(0x40, 4))],
                vec![expect_publish(v, topic, b"d", 1)],
            ),
        },
        closes(
            lane,
            v,
            "MQTT-3.3.1-4",
            "PUBLISH with QoS 3",
            publish(v, 3, 0, TELEMETRY.as_bytes(), 1, &[], JSON),
        ),
        Row {
            id: "MQTT-3.3.1-9",
            case: "RETAIN 1 is cleared for an established subscription",
            steps: routed(
                1,
                retain_in,
                vec![Expect::Bytes(ack(0x40, 5))],
                vec![expect_publish(v, topic, b"r", 1)],
            ),
        },
        closes(
            lane,
            v,
            "MQTT-3.3.2-1",
            "PUBLISH topic that is not UTF-8",
            publish(v, 0, 0, b"v1/devices/me/\xFF", 0, &[], b"x"),
        ),
        closes(
            lane,
            v,
            "MQTT-3.3.2-2",
            "PUBLISH topic with +",
            publish_simple(v, 0, "v1/devices/me/+", 0, b"x"),
        ),
        closes(
            lane,
            v,
            "MQTT-3.3.2-2",
            "PUBLISH topic with #",
            publish_simple(v, 0, "v1/devices/me/#", 0, b"x"),
        ),
        Row {
            id: "MQTT-3.3.4-1",
            case: "QoS 0, 1 and 2 get none, PUBACK and PUBREC",
            steps: qos_responses,
        },
        Row {
            id: "MQTT-3.3.5-1",
            case: "overlapping subscriptions deliver at the larger QoS",
            steps: overlapping,
        },
        Row {
            id: "MQTT-3.3.5-2",
            case: "PUBLISH outside the namespace closes the connection",
            steps: not_authorized,
        },
        closes(
            lane,
            v,
            "MQTT-3.6.1-1",
            "PUBREL with flags 0000",
            ack(0x60, 1),
        ),
        Row {
            id: "MQTT-4.3.1-1",
            case: "QoS 0 delivery has DUP 0",
            steps: routed(
                0,
                publish_simple(v, 0, topic, 0, b"z"),
                vec![],
                vec![expect_publish(v, topic, b"z", 0)],
            ),
        },
        Row {
            id: "MQTT-4.3.2-1",
            case: "QoS 1 deliveries have distinct packet ids and DUP 0",
            steps: distinct_ids,
        },
        Row {
            id: "MQTT-4.3.2-2",
            case: "same packet id after PUBACK is a new message",
            steps: qos1_new_after_ack,
        },
        Row {
            id: "MQTT-4.3.3-2",
            case: "QoS 2: resend before PUBREL is not delivered twice",
            steps: qos2_flow,
        },
        Row {
            id: "MQTT-4.6.0-2",
            case: "PUBACK and PUBREC follow the PUBLISH order",
            steps: ordered_acks,
        },
        Row {
            id: "MQTT-4.6.0-6",
            case: "messages reach a subscriber in the order sent",
            steps: ordered_delivery,
        },
    ]
}

fn subscribe_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let topic = "v1/devices/me/sub";
    let subscriber = |filters: &[(&str, u8)], codes: &[u8]| {
        let mut steps = connected(1, &lane.connect(v));
        steps.push(Step::Send(1, subscribe(v, 7, filters)));
        steps.push(Step::Expect(1, expect_sub_ack(v, 0x90, 7, codes)));
        steps
    };

    let mut replace = subscriber(&[(topic, 1)], &[1]);
    replace.push(Step::Send(1, subscribe(v, 8, &[(topic, 0)])));
    replace.push(Step::Expect(1, expect_sub_ack(v, 0x90, 8, &[0])));
    replace.extend(connected(2, &lane.connect(v)));
    replace.push(Step::Send(2, publish_simple(v, 1, topic, 1, b"q")));
    replace.push(Step::Expect(2, Expect::Bytes(ack(0x40, 1))));
    replace.push(Step::Expect(1, expect_publish(v, topic, b"q", 0)));
    replace.push(Step::Expect(1, Expect::Silence(SILENCE)));

    let downgrade = |granted: u8, sent: u8, delivered: u8| {
        let mut steps = subscriber(&[(topic, granted)], &[granted]);
        steps.extend(connected(2, &lane.connect(v)));
        steps.push(Step::Send(2, publish_simple(v, sent, topic, 1, b"m")));
        if sent == 1 {
            steps.push(Step::Expect(2, Expect::Bytes(ack(0x40, 1))));
        }
        steps.push(Step::Expect(1, expect_publish(v, topic, b"m", delivered)));
        steps
    };

    let unsubscribe_row = |filters: &[&str], then_publish: &str, delivered: bool| {
        let mut steps = subscriber(&[("v1/devices/me/u/+", 0)], &[0]);
        steps.push(Step::Send(1, unsubscribe(v, 9, filters)));
        steps.push(Step::Expect(1, Expect::Bytes(ack(0xB0, 9))));
        steps.extend(connected(2, &lane.connect(v)));
        steps.push(Step::Send(2, publish_simple(v, 0, then_publish, 0, b"u")));
        steps.push(Step::Expect(
            1,
            if delivered {
                expect_publish(v, then_publish, b"u", 0)
            } else {
                Expect::Silence(SILENCE)
            },
        ));
        steps
    };

    let mut no_filters = after_connect(lane, v, 1, frame(0x82, &[0x00, 0x01]));
    no_filters.push(Step::Expect(1, Expect::Closed));

    let by_id_topic = format!("devices/{}/sub/x", lane.device_id);
    let by_id_filter = format!("devices/{}/sub/+", lane.device_id);
    let mut matches_filter = connected(1, &lane.connect(v));
    matches_filter.push(Step::Send(1, subscribe(v, 7, &[(&by_id_filter, 0)])));
    matches_filter.push(Step::Expect(1, expect_sub_ack(v, 0x90, 7, &[0])));
    matches_filter.extend(connected(2, &lane.connect(v)));
    matches_filter.push(Step::Send(
        2,
        publish_simple(v, 0, "v1/devices/me/sub/x", 0, b"n"),
    ));
    matches_filter.push(Step::Expect(1, expect_publish(v, &by_id_topic, b"n", 0)));

    let mut unsubscribe_delivery = {
        let mut steps = subscriber(&[(topic, 1)], &[1]);
        steps.extend(connected(2, &lane.connect(v)));
        steps.push(Step::Send(2, publish_simple(v, 1, topic, 1, b"before")));
        steps.push(Step::Expect(1, expect_publish(v, topic, b"before", 1)));
        steps
    };
    unsubscribe_delivery.push(Step::Send(1, unsubscribe(v, 9, &[topic])));
    unsubscribe_delivery.push(Step::Expect(1, Expect::Bytes(ack(0xB0, 9))));
    unsubscribe_delivery.push(Step::Send(1, ack(0x40, 1)));
    unsubscribe_delivery.push(Step::Send(1, PINGREQ.to_vec()));
    unsubscribe_delivery.push(Step::Expect(1, Expect::Bytes(PINGRESP.to_vec())));

    let mut bad_options = subscribe(v, 7, &[("v1/devices/me/a", 0)]);
    let last = bad_options.len() - 1;
    bad_options[last] = 0x04;

    vec![
        closes(lane, v, "MQTT-3.8.1-1", "SUBSCRIBE with flags 0000", {
            let mut bytes = subscribe(v, 1, &[("v1/devices/me/a", 0)]);
            bytes[0] = 0x80;
            bytes
        }),
        closes(lane, v, "MQTT-3.8.3-1", "filter that is not UTF-8", {
            let mut body = vec![0x00, 0x01];
            body.extend(string(b"v1/devices/me/\xFE"));
            body.push(0);
            frame(0x82, &body)
        }),
        Row {
            id: "MQTT-3.8.3-2",
            case: "wildcard filters are supported and granted",
            steps: subscriber(&[("v1/devices/me/+/x", 0), ("v1/devices/me/#", 1)], &[0, 1]),
        },
        Row {
            id: "MQTT-3.8.3-3",
            case: "SUBSCRIBE without filters",
            steps: no_filters,
        },
        closes(
            lane,
            v,
            "MQTT-3.8.3-4",
            "requested QoS 3",
            subscribe(v, 7, &[("v1/devices/me/a", 3)]),
        ),
        closes(
            lane,
            v,
            "MQTT-3.8.3-4",
            "reserved option bits set",
            bad_options,
        ),
        Row {
            id: "MQTT-3.8.4-1",
            case: "SUBSCRIBE gets SUBACK",
            steps: subscriber(&[(topic, 0)], &[0]),
        },
        Row {
            id: "MQTT-3.8.4-2",
            case: "SUBACK has the SUBSCRIBE packet id",
            steps: subscriber(&[(topic, 1)], &[1]),
        },
        Row {
            id: "MQTT-3.8.4-3",
            case: "same filter again replaces the subscription",
            steps: replace,
        },
        Row {
            id: "MQTT-3.8.4-4",
            case: "several filters get one SUBACK",
            steps: subscriber(&[("v1/devices/me/a", 0), ("v1/devices/me/b", 1)], &[0, 1]),
        },
        Row {
            id: "MQTT-3.8.4-5",
            case: "QoS 2 request: granted QoS 1 or 2",
            steps: super::v5::subscribe_qos2(lane, v),
        },
        Row {
            id: "MQTT-3.8.4-6",
            case: "QoS 1 message to a QoS 0 subscription is sent at QoS 0",
            steps: downgrade(0, 1, 0),
        },
        Row {
            id: "MQTT-3.8.4-6",
            case: "QoS 0 message to a QoS 1 subscription is sent at QoS 0",
            steps: downgrade(1, 0, 0),
        },
        Row {
            id: "MQTT-3.9.3-1",
            case: "return codes follow the filter order",
            steps: subscriber(
                &[
                    ("v1/devices/me/a", 1),
                    ("v1/devices/other/a", 1),
                    ("v1/devices/me/b", 0),
                ],
                &[1, 0x80, 0],
            ),
        },
        Row {
            id: "MQTT-3.9.3-2",
            case: "refused filters get 0x80",
            steps: subscriber(&[("$SYS/#", 0), ("v1/devices/me/a#", 0)], &[0x80, 0x80]),
        },
        closes(lane, v, "MQTT-3.10.1-1", "UNSUBSCRIBE with flags 0000", {
            let mut bytes = unsubscribe(v, 1, &["v1/devices/me/a"]);
            bytes[0] = 0xA0;
            bytes
        }),
        closes(
            lane,
            v,
            "MQTT-3.10.3-1",
            "UNSUBSCRIBE filter that is not UTF-8",
            {
                let mut body = vec![0x00, 0x01];
                body.extend(string(b"v1/devices/me/\xFE"));
                frame(0xA2, &body)
            },
        ),
        closes(
            lane,
            v,
            "MQTT-3.10.3-2",
            "UNSUBSCRIBE without filters",
            frame(0xA2, &[0x00, 0x01]),
        ),
        Row {
            id: "MQTT-3.10.4-1",
            case: "filters are compared as text, not matched",
            steps: unsubscribe_row(&["v1/devices/me/u/x"], "v1/devices/me/u/x", true),
        },
        Row {
            id: "MQTT-3.10.4-2",
            case: "no new messages after UNSUBSCRIBE",
            steps: unsubscribe_row(&["v1/devices/me/u/+"], "v1/devices/me/u/x", false),
        },
        Row {
            id: "MQTT-3.10.4-3",
            case: "a QoS 1 delivery in flight completes after UNSUBSCRIBE",
            steps: unsubscribe_delivery,
        },
        Row {
            id: "MQTT-3.10.4-4",
            case: "UNSUBACK has the UNSUBSCRIBE packet id",
            steps: unsubscribe_row(&["v1/devices/me/u/+"], "v1/devices/me/u/y", false),
        },
        Row {
            id: "MQTT-3.10.4-5",
            case: "UNSUBACK also when no filter matched",
            steps: unsubscribe_row(&["v1/devices/me/none"], "v1/devices/me/u/z", true),
        },
        Row {
            id: "MQTT-3.10.4-6",
            case: "several filters get one UNSUBACK",
            steps: unsubscribe_row(
                &["v1/devices/me/none", "v1/devices/me/u/+"],
                "v1/devices/me/u/w",
                false,
            ),
        },
        Row {
            id: "MQTT-3.3.2-3",
            case: "delivered topic uses the subscriber's spelling",
            steps: matches_filter,
        },
    ]
}

fn topic_rows(lane: &Lane, v: Version) -> Vec<Row> {
    let subscriber = |filter: &str, publish_to: &str, delivered: bool| {
        let mut steps = subscribed(lane, v, 1, filter, 0);
        steps.extend(connected(2, &lane.connect(v)));
        steps.push(Step::Send(2, publish_simple(v, 0, publish_to, 0, b"t")));
        steps.push(Step::Expect(
            1,
            if delivered {
                expect_publish(v, publish_to, b"t", 0)
            } else {
                Expect::Silence(SILENCE)
            },
        ));
        steps
    };
    let refused = |filter: &str| {
        let mut steps = connected(1, &lane.connect(v));
        steps.push(Step::Send(1, subscribe(v, 3, &[(filter, 0)])));
        steps.push(Step::Expect(1, expect_sub_ack(v, 0x90, 3, &[0x80])));
        steps
    };

    vec![
        closes(
            lane,
            v,
            "MQTT-4.7.1-1",
            "PUBLISH topic with + in a level",
            publish_simple(v, 0, "v1/devices/me/a+", 0, b"x"),
        ),
        Row {
            id: "MQTT-4.7.1-2",
            case: "# not last",
            steps: refused("v1/devices/me/#/a"),
        },
        Row {
            id: "MQTT-4.7.1-2",
            case: "# inside a level",
            steps: refused("v1/devices/me/a#"),
        },
        Row {
            id: "MQTT-4.7.1-3",
            case: "+ inside a level",
            steps: refused("v1/devices/me/a+"),
        },
        Row {
            id: "MQTT-4.7.1-3",
            case: "+ matches one whole level",
            steps: subscriber("v1/devices/me/+/end", "v1/devices/me/mid/end", true),
        },
        Row {
            id: "MQTT-4.7.2-1",
            case: "filters that start with a wildcard are outside every namespace",
            steps: refused("#"),
        },
        Row {
            id: "MQTT-4.7.2-1",
            case: "+ as the first level is refused",
            steps: refused("+/devices/me/a"),
        },
        closes(
            lane,
            v,
            "MQTT-4.7.3-1",
            "PUBLISH with an empty topic",
            publish_simple(v, 0, "", 0, b"x"),
        ),
        Row {
            id: "MQTT-4.7.3-1",
            case: "empty filter",
            steps: refused(""),
        },
        closes(
            lane,
            v,
            "MQTT-4.7.3-2",
            "filter with U+0000",
            subscribe(v, 3, &[("v1/devices/me/a\0b", 0)]),
        ),
        Row {
            id: "MQTT-4.7.3-4",
            case: "upper and lower case are different topics",
            steps: subscriber("v1/devices/me/Case", "v1/devices/me/case", false),
        },
        Row {
            id: "MQTT-4.7.3-4",
            case: "a trailing / makes a different topic",
            steps: subscriber("v1/devices/me/slash", "v1/devices/me/slash/", false),
        },
        Row {
            id: "MQTT-4.7.3-4",
            case: "same bytes match",
            steps: subscriber("v1/devices/me/Case", "v1/devices/me/Case", true),
        },
    ]
}
