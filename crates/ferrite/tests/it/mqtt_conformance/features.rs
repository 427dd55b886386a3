//! Statements about the broker features: retained messages, outgoing
//! QoS 2, topic aliases, shared subscriptions, message expiry,
//! request/response and the forwarding of PUBLISH properties. Each test
//! runs its rows on a fresh server, and the statement ids are in the test
//! names.

use std::time::Duration;

use super::property as p;
use super::*;

const ME: &str = "v1/devices/me/";

fn topic(suffix: &str) -> String {
    format!("{ME}{suffix}")
}

/// Runs the rows of one statement on a fresh server.
async fn run(version: Version, build: fn(&Lane, Version) -> Vec<Row>) {
    run_table(version, build).await;
}

/// Steps: slot 1 connects and publishes `bytes`; with QoS 1 it expects
/// PUBACK id 1.
fn publisher(lane: &Lane, v: Version, bytes: Vec<u8>, acked: bool) -> Vec<Step> {
    let mut steps = connected(1, &lane.connect(v));
    steps.push(Step::Send(1, bytes));
    if acked {
        steps.push(Step::Expect(1, expect_ack(0x40, 1, 0)));
    }
    steps
}

/// Steps: slot `slot` connects and subscribes to `filter` with `options`.
fn subscriber(lane: &Lane, v: Version, slot: usize, filter: &str, options: u8) -> Vec<Step> {
    let mut steps = connected(slot, &lane.connect(v));
    steps.push(Step::Send(slot, subscribe(v, 1, &[(filter, options)])));
    steps.push(Step::Expect(
        slot,
        Expect::Packet(
            "SUBACK",
            Box::new(|packet| {
                (packet.first_byte == 0x90 && packet.body.last().is_some_and(|code| *code < 0x80))
                    .then_some(())
                    .ok_or(format!("expected a granted SUBACK, got {packet:02x?}"))
            }),
        ),
    ));
    steps
}

fn expect_retained(v: Version, topic: String, payload: &'static [u8]) -> Expect {
    expect_publish_where(v, "a retained PUBLISH", move |publish| {
        if publish.topic != topic.as_bytes() || publish.payload != payload || !publish.retain {
            return Err(format!(
                "expected {payload:?} with RETAIN 1 on {topic}, got {publish:?}"
            ));
        }
        Ok(())
    })
}

fn one(id: &'static str, case: &'static str, steps: Vec<Step>) -> Vec<Row> {
    vec![Row { id, case, steps }]
}

// ---------------------------------------------------------------------------
// Retained messages
// ---------------------------------------------------------------------------

/// Checks that a retained QoS 1 message reaches a later subscriber with RETAIN 1.
fn retained_stored(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/a");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 1, 0x01, t.as_bytes(), 1, &[], b"kept"),
        true,
    );
    steps.extend(subscriber(lane, v, 2, &t, 1));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"kept")));
    one(
        "MQTT-3.3.1-5",
        "retained message reaches a later subscriber",
        steps,
    )
}

/// Checks that a later retained message on a topic replaces the earlier one.
fn retained_replaced(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/b");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"old"),
        false,
    );
    steps.push(Step::Send(
        1,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"new"),
    ));
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"new")));
    steps.push(Step::Expect(2, Expect::Silence(SILENCE)));
    let id = match v {
        Version::V311 => "MQTT-3.3.1-7",
        Version::V5 => "MQTT-3.3.1-5",
    };
    one(
        id,
        "QoS 0 retained message replaces the previous one",
        steps,
    )
}

/// Checks that an empty retained message deletes the retained message and is not stored.
fn retained_deleted(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/c");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"old"),
        false,
    );
    steps.push(Step::Send(
        1,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b""),
    ));
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, Expect::Silence(SILENCE)));
    let id = match v {
        Version::V311 => "MQTT-3.3.1-10",
        Version::V5 => "MQTT-3.3.1-6",
    };
    one(id, "empty retained message deletes the retained one", steps)
}

/// RETAIN 0 neither stores nor replaces the retained message.
fn retain_zero_kept(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/d");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"kept"),
        false,
    );
    steps.push(Step::Send(
        1,
        publish(v, 0, 0, t.as_bytes(), 0, &[], b"plain"),
    ));
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"kept")));
    steps.push(Step::Expect(2, Expect::Silence(SILENCE)));
    let id = match v {
        Version::V311 => "MQTT-3.3.1-12",
        Version::V5 => "MQTT-3.3.1-8",
    };
    one(id, "RETAIN 0 does not replace the retained message", steps)
}

/// A retained will is published as a retained message.
fn retained_will(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/will");
    let mut will = Will::new(&t, b"gone");
    will.retain = true;
    let mut steps = connected(1, &lane.connect(v).with_will(will));
    steps.push(Step::Close(1));
    steps.push(Step::Pause(Duration::from_millis(200)));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"gone")));
    let id = match v {
        Version::V311 => "MQTT-3.1.2-17",
        Version::V5 => "MQTT-3.1.2-15",
    };
    one(id, "retained will is kept for later subscribers", steps)
}

/// Retained messages outlive the session that published them.
fn retained_outlives_session(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/session");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"stays"),
        false,
    );
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.push(Step::Close(1));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"stays")));
    let id = match v {
        Version::V311 => "MQTT-3.1.2-7",
        Version::V5 => "MQTT-3.3.1-5",
    };
    // MQTT 5 has no statement of its own for this; storing is 3.3.1-5.
    one(id, "retained message stays after its session ends", steps)
}

/// Subscribing again to the same filter sends the retained message again.
fn retained_resent_on_replace(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/again");
    let mut steps = publisher(
        lane,
        v,
        publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"again"),
        false,
    );
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.extend(subscriber(lane, v, 2, &t, 0));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"again")));
    steps.push(Step::Send(2, subscribe(v, 2, &[(&t, 0)])));
    steps.push(Step::Expect(
        2,
        Expect::Packet(
            "SUBACK",
            Box::new(|packet| {
                (packet.first_byte == 0x90)
                    .then_some(())
                    .ok_or(format!("got {packet:02x?}"))
            }),
        ),
    ));
    steps.push(Step::Expect(2, expect_retained(v, t.clone(), b"again")));
    let id = match v {
        Version::V311 => "MQTT-3.8.4-3",
        Version::V5 => "MQTT-3.8.4-4",
    };
    one(id, "same filter again re-sends the retained message", steps)
}

/// MQTT 5 Retain Handling 1 and 2, and Retain As Published.
fn retain_handling(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("retained/handling");
    let seeded = || {
        publisher(
            lane,
            v,
            publish(v, 0, 0x01, t.as_bytes(), 0, &[], b"r"),
            false,
        )
    };

    let mut handling_1 = seeded();
    handling_1.extend(subscriber(lane, v, 2, &t, 0x10));
    handling_1.push(Step::Expect(2, expect_retained(v, t.clone(), b"r")));
    handling_1.push(Step::Send(2, subscribe(v, 2, &[(&t, 0x10)])));
    handling_1.push(Step::Expect(2, expect_sub_ack(v, 0x90, 2, &[0])));
    handling_1.push(Step::Expect(2, Expect::Silence(SILENCE)));

    let mut handling_2 = seeded();
    handling_2.extend(subscriber(lane, v, 2, &t, 0x20));
    handling_2.push(Step::Expect(2, Expect::Silence(SILENCE)));

    let mut as_published_0 = subscriber(lane, v, 2, &t, 0);
    as_published_0.extend(seeded());
    as_published_0.push(Step::Expect(2, expect_publish(v, &t, b"r", 0)));

    let mut as_published_1 = subscriber(lane, v, 2, &t, 0x08);
    as_published_1.extend(seeded());
    as_published_1.push(Step::Expect(2, expect_retained(v, t.clone(), b"r")));

    let mut handling_0 = seeded();
    handling_0.extend(subscriber(lane, v, 2, &t, 0));
    handling_0.push(Step::Expect(2, expect_retained(v, t.clone(), b"r")));

    vec![
        Row {
            id: "MQTT-3.3.1-9",
            case: "Retain Handling 0 sends retained messages",
            steps: handling_0,
        },
        Row {
            id: "MQTT-3.3.1-10",
            case: "Retain Handling 1 sends them only for a new subscription",
            steps: handling_1,
        },
        Row {
            id: "MQTT-3.3.1-11",
            case: "Retain Handling 2 sends none",
            steps: handling_2,
        },
        Row {
            id: "MQTT-3.3.1-12",
            case: "Retain As Published 0 clears RETAIN",
            steps: as_published_0,
        },
        Row {
            id: "MQTT-3.3.1-13",
            case: "Retain As Published 1 keeps RETAIN",
            steps: as_published_1,
        },
    ]
}

#[tokio::test]
async fn mqtt_3_1_1_retained_3_3_1_5_to_12_and_3_1_2_7_and_17() {
    for build in [
        retained_stored as fn(&Lane, Version) -> Vec<Row>,
        retained_replaced,
        retained_deleted,
        retain_zero_kept,
        retained_will,
        retained_outlives_session,
        retained_resent_on_replace,
    ] {
        run(Version::V311, build).await;
    }
}

#[tokio::test]
async fn mqtt_5_retained_3_3_1_5_to_13_and_3_1_2_15_and_3_8_4_4() {
    for build in [
        retained_stored as fn(&Lane, Version) -> Vec<Row>,
        retained_replaced,
        retained_deleted,
        retain_zero_kept,
        retained_will,
        retained_outlives_session,
        retained_resent_on_replace,
        retain_handling,
    ] {
        run(Version::V5, build).await;
    }
}

// ---------------------------------------------------------------------------
// Outgoing QoS 2
// ---------------------------------------------------------------------------

/// Checks QoS 2 delivery with the server as sender: PUBLISH QoS 2 DUP 0, PUBREL
/// after PUBREC with the same id, no PUBLISH resend after PUBREL, and
/// PUBREL resent on resume.
fn outgoing_qos2(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("qos2");
    let receiver_id = lane.client_id();
    let mut receiver = Connect::new(v, &receiver_id, &lane.token).clean(false);
    if v == Version::V5 {
        receiver = receiver.expiry(60);
    }
    let mut steps = connected(2, &receiver);
    steps.push(Step::Send(2, subscribe(v, 1, &[(&t, 2)])));

    steps.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[2])));
    steps.extend(connected(1, &lane.connect(v)));
    steps.push(Step::Send(1, publish_simple(v, 2, &t, 1, b"two")));
    steps.push(Step::Expect(
        1,
        Expect::Packet(
            "PUBREC",
            Box::new(|packet| {
                (packet.first_byte == 0x50)
                    .then_some(())
                    .ok_or(format!("got {packet:02x?}"))
            }),
        ),
    ));
    steps.push(Step::Send(1, ack(0x62, 1)));

    // NOTE: the steps assume that the server gives the first message of a
    // new session packet id 1, but any unused id is valid.
    steps.push(Step::Expect(2, expect_publish(v, &t, b"two", 2)));
    steps.push(Step::Send(2, ack(0x50, 1)));
    // Ferrite sends PUBREL without properties, so it never carries a Reason
    // String or User Properties beyond the client's Maximum Packet Size
    // ([MQTT-3.6.2-2], [MQTT-3.6.2-3]).
    steps.push(Step::Expect(
        2,
        expect_ack_where(0x62, 1, 0, |properties| {
            properties.is_empty().then_some(()).ok_or(format!(
                "expected PUBREL without properties, got {properties:02x?}"
            ))
        }),
    ));

    // PUBREL, not PUBLISH, is resent on resume.
    steps.push(Step::Close(2));
    steps.push(Step::Pause(Duration::from_millis(100)));
    steps.push(Step::Open(2));
    steps.push(Step::Send(2, receiver.bytes()));
    steps.push(Step::Expect(
        2,
        Expect::Connack {
            session_present: true,
            code: 0,
        },
    ));
    steps.push(Step::Expect(2, expect_ack(0x62, 1, 0)));
    steps.push(Step::Send(2, ack(0x70, 1)));
    steps.push(Step::Expect(2, Expect::Silence(SILENCE)));
    let id = match v {
        Version::V311 => "MQTT-4.3.3-1",
        Version::V5 => "MQTT-4.3.3-4",
    };
    one(
        id,
        "QoS 2 delivery to a subscriber, with PUBREL resent on resume",
        steps,
    )
}

/// PUBRELs go out in the order of the PUBRECs.
fn pubrel_order(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("qos2order");
    let mut qos2 = subscriber(lane, v, 3, &t, 2);
    qos2.extend(connected(4, &lane.connect(v)));
    qos2.push(Step::Send(
        4,
        [
            publish_simple(v, 2, &t, 1, b"x"),
            ack(0x62, 1),
            publish_simple(v, 2, &t, 2, b"y"),
            ack(0x62, 2),
        ]
        .concat(),
    ));
    qos2.push(Step::Expect(3, expect_publish(v, &t, b"x", 2)));
    qos2.push(Step::Expect(3, expect_publish(v, &t, b"y", 2)));
    qos2.push(Step::Send(3, [ack(0x50, 2), ack(0x50, 1)].concat()));
    qos2.push(Step::Expect(3, expect_ack(0x62, 2, 0)));
    qos2.push(Step::Expect(3, expect_ack(0x62, 1, 0)));
    one(
        "MQTT-4.6.0-4",
        "PUBRELs follow the order of the PUBRECs",
        qos2,
    )
}

#[tokio::test]
async fn mqtt_3_1_1_outgoing_qos2_4_3_3_1_and_4_6_0_4() {
    run(Version::V311, outgoing_qos2).await;
    run(Version::V311, pubrel_order).await;
}

#[tokio::test]
async fn mqtt_5_outgoing_qos2_4_3_3_1_to_6_and_4_6_0_4_and_3_6_2_1() {
    run(Version::V5, outgoing_qos2).await;
    run(Version::V5, pubrel_order).await;
}

// ---------------------------------------------------------------------------
// Topic aliases (MQTT 5)
// ---------------------------------------------------------------------------

/// Checks that the server accepts topic aliases up to its Topic Alias
/// Maximum and drops them when the connection ends.
fn inbound_aliases(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("alias");
    let mut steps = subscriber(lane, v, 2, &t, 0);
    steps.extend(connected(1, &lane.connect(v)));

    // The first PUBLISH sets alias 1, the second uses it with an empty topic.
    steps.push(Step::Send(
        1,
        publish(
            v,
            0,
            0,
            t.as_bytes(),
            0,
            &[prop_u16(p::TOPIC_ALIAS, 1)],
            b"set",
        ),
    ));
    steps.push(Step::Send(
        1,
        publish(v, 0, 0, b"", 0, &[prop_u16(p::TOPIC_ALIAS, 1)], b"used"),
    ));
    steps.push(Step::Expect(
        2,
        expect_publish_where(v, "PUBLISH set", |publish| {
            (publish.payload == b"set")
                .then_some(())
                .ok_or(format!("got {publish:?}"))
        }),
    ));
    steps.push(Step::Expect(
        2,
        expect_publish_where(v, "PUBLISH through the alias", |publish| {
            (publish.payload == b"used")
                .then_some(())
                .ok_or(format!("got {publish:?}"))
        }),
    ));

    // A new connection starts without the alias.
    steps.push(Step::Close(1));
    steps.extend(connected(1, &lane.connect(v)));
    steps.push(Step::Send(
        1,
        publish(v, 0, 0, b"", 0, &[prop_u16(p::TOPIC_ALIAS, 1)], b"stale"),
    ));
    steps.push(Step::Expect(1, Expect::Disconnect(0x82)));

    vec![
        Row {
            id: "MQTT-3.3.2-12",
            case: "alias within the maximum is accepted",
            steps: copy_steps(&steps),
        },
        Row {
            id: "MQTT-3.3.2-7",
            case: "aliases end with the connection",
            steps,
        },
    ]
}

/// Checks that the server sends aliases only up to the client's Topic Alias Maximum.
fn outbound_aliases(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("alias/out");
    let receiver = lane
        .connect(v)
        .with_property(prop_u16(p::TOPIC_ALIAS_MAXIMUM, 1));
    let mut steps = connected(2, &receiver);
    steps.push(Step::Send(
        2,
        subscribe(v, 1, &[(&format!("{ME}alias/#"), 0)]),
    ));
    steps.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[0])));
    steps.extend(connected(1, &lane.connect(v)));
    for index in 0..3 {
        steps.push(Step::Send(
            1,
            publish_simple(v, 0, &format!("{t}{index}"), 0, b"a"),
        ));
        steps.push(Step::Expect(
            2,
            expect_publish_where(v, "PUBLISH with an alias of at most 1", |publish| {
                match find_property(&publish.properties, p::TOPIC_ALIAS) {
                    None | Some([0, 1]) => Ok(()),
                    Some(other) => {
                        Err(format!("Topic Alias {other:02x?} exceeds the maximum of 1"))
                    }
                }
            }),
        ));
    }
    one(
        "MQTT-3.1.2-26",
        "server aliases stay within the client's maximum",
        steps,
    )
}

#[tokio::test]
async fn mqtt_5_topic_aliases_3_3_2_7_and_3_3_2_12() {
    run(Version::V5, inbound_aliases).await;
}

#[tokio::test]
async fn mqtt_5_topic_aliases_3_1_2_26_and_3_3_2_11() {
    run(Version::V5, outbound_aliases).await;
}

// ---------------------------------------------------------------------------
// Shared subscriptions (MQTT 5)
// ---------------------------------------------------------------------------

fn shared(lane: &Lane, v: Version) -> Vec<Row> {
    let filter = format!("$share/group/{ME}shared");
    let t = topic("shared");

    let mut granted = connected(1, &lane.connect(v));
    granted.push(Step::Send(1, subscribe(v, 1, &[(&filter, 1)])));
    granted.push(Step::Expect(1, expect_sub_ack(v, 0x90, 1, &[1])));

    let mut invalid_names = connected(1, &lane.connect(v));
    invalid_names.push(Step::Send(
        1,
        subscribe(
            v,
            1,
            &[
                ("$share//v1/devices/me/a", 0),
                ("$share/a+b/v1/devices/me/a", 0),
                ("$share/g", 0),
            ],
        ),
    ));
    invalid_names.push(Step::Expect(
        1,
        expect_sub_ack(v, 0x90, 1, &[0x8F, 0x8F, 0x8F]),
    ));

    let mut one_member = connected(1, &lane.connect(v));
    one_member.push(Step::Send(1, subscribe(v, 1, &[(&filter, 1)])));
    one_member.push(Step::Expect(1, expect_sub_ack(v, 0x90, 1, &[1])));
    one_member.extend(connected(2, &lane.connect(v)));
    one_member.push(Step::Send(2, subscribe(v, 1, &[(&filter, 0)])));
    one_member.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[0])));
    one_member.extend(connected(3, &lane.connect(v)));
    one_member.push(Step::Send(3, publish_simple(v, 1, &t, 1, b"s")));
    one_member.push(Step::Expect(3, expect_ack(0x40, 1, 0)));
    one_member.push(Step::Pause(Duration::from_millis(300)));
    one_member.push(Step::Send(1, PINGREQ.to_vec()));
    one_member.push(Step::Send(2, PINGREQ.to_vec()));
    one_member.push(Step::Expect(
        1,
        Expect::Packet(
            "the shared message or PINGRESP",
            Box::new(|packet| {
                matches!(packet.first_byte >> 4, 3 | 13)
                    .then_some(())
                    .ok_or(format!("got {packet:02x?}"))
            }),
        ),
    ));

    // Two members; whichever gets the message refuses it with PUBACK 0x80,
    // and then neither may get it again.
    let mut refused_by_member = Vec::new();
    for slot in [1, 2] {
        refused_by_member.extend(connected(slot, &lane.connect(v)));
        refused_by_member.push(Step::Send(slot, subscribe(v, 1, &[(&filter, 1)])));
        refused_by_member.push(Step::Expect(slot, expect_sub_ack(v, 0x90, 1, &[1])));
    }
    refused_by_member.extend(connected(3, &lane.connect(v)));
    refused_by_member.push(Step::Send(3, publish_simple(v, 1, &t, 1, b"no")));
    refused_by_member.push(Step::Expect(3, expect_ack(0x40, 1, 0)));
    refused_by_member.push(Step::Pause(Duration::from_millis(300)));
    for slot in [1, 2] {
        // A PUBACK 0x80 for packet id 1 is ignored by the member that did
        // not get the message.
        refused_by_member.push(Step::Send(slot, ack_with_reason(0x40, 1, 0x80)));
    }
    for slot in [1, 2] {
        refused_by_member.push(Step::Send(slot, PINGREQ.to_vec()));
    }
    for slot in [1, 2] {
        refused_by_member.push(Step::Expect(
            slot,
            Expect::Packet(
                "PINGRESP or the first copy",
                Box::new(|packet| {
                    matches!(packet.first_byte >> 4, 3 | 13)
                        .then_some(())
                        .ok_or(format!("got {packet:02x?}"))
                }),
            ),
        ));
    }
    refused_by_member.push(Step::Pause(Duration::from_millis(300)));
    for slot in [1, 2] {
        refused_by_member.push(Step::Send(slot, PINGREQ.to_vec()));
        refused_by_member.push(Step::Expect(slot, expect_any_but_publish()));
    }

    let mut no_local = connected(1, &lane.connect(v));
    no_local.push(Step::Send(1, subscribe(v, 1, &[(&filter, 0x04)])));
    no_local.push(Step::Expect(1, Expect::Disconnect(0x82)));

    vec![
        Row {
            id: "MQTT-4.8.2-1",
            case: "$share/{name}/{filter} is granted",
            steps: granted,
        },
        Row {
            id: "MQTT-4.8.2-2",
            case: "empty share name, wildcard in it, or no filter",
            steps: invalid_names,
        },
        Row {
            id: "MQTT-4.8.2-3",
            case: "a message goes to one member at its granted QoS",
            steps: one_member,
        },
        Row {
            id: "MQTT-3.8.3-4",
            case: "No Local on a shared subscription",
            steps: no_local,
        },
        Row {
            id: "MQTT-4.8.2-6",
            case: "a message refused by a member goes to no other member",
            steps: refused_by_member,
        },
    ]
}

#[tokio::test]
async fn mqtt_5_shared_subscriptions_4_8_2_1_to_3_and_6_and_3_8_3_4() {
    run(Version::V5, shared).await;
}

/// Steps: slot `slot` sends `connect` and joins the shared group `filter`
/// with QoS 2.
fn shared_member(slot: usize, connect: &Connect, filter: &str) -> Vec<Step> {
    let v = Version::V5;
    let mut steps = connected(slot, connect);
    steps.push(Step::Send(slot, subscribe(v, 1, &[(filter, 2)])));
    steps.push(Step::Expect(slot, expect_sub_ack(v, 0x90, 1, &[2])));
    steps
}

/// Steps: slot 1 publishes `payload` with QoS 2 to `topic` and completes
/// the flow.
fn qos2_publisher(lane: &Lane, topic: &str, payload: &[u8]) -> Vec<Step> {
    let v = Version::V5;
    let mut steps = connected(1, &lane.connect(v));
    steps.push(Step::Send(1, publish_simple(v, 2, topic, 1, payload)));
    steps.push(Step::Expect(1, expect_ack(0x50, 1, 0)));
    steps.push(Step::Send(1, ack(0x62, 1)));
    steps.push(Step::Expect(1, expect_ack(0x70, 1, 0)));
    steps
}

/// QoS 2 deliveries to a shared group member whose connection breaks
/// before the flow completes.
fn shared_qos2(lane: &Lane, v: Version) -> Vec<Row> {
    // The member reconnects to its session and gets the PUBLISH again.
    let t = topic("sharedq2");
    let filter = format!("$share/q2/{t}");
    let member_id = lane.client_id();
    let member = Connect::new(v, &member_id, &lane.token)
        .clean(false)
        .expiry(60);
    let mut completed = shared_member(2, &member, &filter);
    completed.extend(qos2_publisher(lane, &t, b"s"));
    completed.push(Step::Expect(2, expect_publish(v, &t, b"s", 2)));
    completed.push(Step::Close(2));
    completed.push(Step::Pause(Duration::from_millis(100)));
    completed.push(Step::Open(2));
    completed.push(Step::Send(2, member.bytes()));
    completed.push(Step::Expect(
        2,
        Expect::Connack {
            session_present: true,
            code: 0,
        },
    ));
    // NOTE: the first message of a new session gets packet id 1 from this
    // server, but any unused id is valid.
    completed.push(Step::Expect(
        2,
        expect_publish_where(v, "the QoS 2 PUBLISH resent with DUP 1", |publish| {
            (publish.payload == b"s" && publish.qos == 2 && publish.dup)
                .then_some(())
                .ok_or(format!(
                    "expected \"s\" resent at QoS 2 with DUP 1, got {publish:?}"
                ))
        }),
    ));
    completed.push(Step::Send(2, ack(0x50, 1)));
    completed.push(Step::Expect(2, expect_ack(0x62, 1, 0)));
    completed.push(Step::Send(2, ack(0x70, 1)));

    // The member's session ends before it reconnects: another member that
    // joined meanwhile does not get the message.
    let lost_topic = topic("sharedq2lost");
    let lost_filter = format!("$share/q2lost/{lost_topic}");
    let short_lived = Connect::new(v, &lane.client_id(), &lane.token)
        .clean(false)
        .expiry(1);
    let mut not_redirected = shared_member(2, &short_lived, &lost_filter);
    not_redirected.extend(qos2_publisher(lane, &lost_topic, b"l"));
    not_redirected.push(Step::Expect(2, expect_publish(v, &lost_topic, b"l", 2)));
    not_redirected.push(Step::Close(2));
    not_redirected.extend(shared_member(3, &lane.connect(v), &lost_filter));
    // NOTE: the server removes expired offline sessions once a minute, so
    // within this wait the first member's session may still be stored. The
    // row checks that the message is not handed to the other member when
    // the connection breaks or the session expiry passes.
    not_redirected.push(Step::Pause(Duration::from_millis(1500)));
    not_redirected.push(Step::Expect(3, Expect::Silence(SILENCE)));

    vec![
        Row {
            id: "MQTT-4.8.2-4",
            case: "broken QoS 2 shared delivery completes on reconnect",
            steps: completed,
        },
        Row {
            id: "MQTT-4.8.2-5",
            case: "message of an ended member session goes to no other member",
            steps: not_redirected,
        },
    ]
}

#[tokio::test]
async fn mqtt_5_shared_qos2_4_8_2_4_and_4_8_2_5() {
    run(Version::V5, shared_qos2).await;
}

// ---------------------------------------------------------------------------
// Message expiry (MQTT 5)
// ---------------------------------------------------------------------------

fn expiry(lane: &Lane, v: Version) -> Vec<Row> {
    let t = topic("expiry");
    let receiver_id = lane.client_id();
    let receiver = Connect::new(v, &receiver_id, &lane.token)
        .clean(false)
        .expiry(60);
    let offline = |delay: Duration, expect: Expect| {
        let mut steps = connected(2, &receiver);
        steps.push(Step::Send(2, subscribe(v, 1, &[(&t, 1)])));
        steps.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[1])));
        steps.push(Step::Send(2, disconnect_v5(0, &[])));
        steps.push(Step::Expect(2, Expect::Closed));
        steps.extend(connected(1, &lane.connect(v)));
        steps.push(Step::Send(
            1,
            publish(
                v,
                1,
                0,
                t.as_bytes(),
                1,
                &[prop_u32(p::MESSAGE_EXPIRY_INTERVAL, 2)],
                b"e",
            ),
        ));
        steps.push(Step::Expect(1, expect_ack(0x40, 1, 0)));
        steps.push(Step::Pause(delay));
        steps.push(Step::Open(2));
        steps.push(Step::Send(2, receiver.bytes()));
        steps.push(Step::Expect(
            2,
            Expect::Connack {
                session_present: true,
                code: 0,
            },
        ));
        steps.push(Step::Expect(2, expect));
        steps
    };
    // A QoS 2 PUBLISH sent before its expiry is resent after it: once sent,
    // the message no longer expires.
    let qos2_topic = topic("expiry2");
    let qos2_receiver_id = lane.client_id();
    let qos2_receiver = Connect::new(v, &qos2_receiver_id, &lane.token)
        .clean(false)
        .expiry(60);
    let mut sent_then_expired = connected(2, &qos2_receiver);
    sent_then_expired.push(Step::Send(2, subscribe(v, 1, &[(&qos2_topic, 2)])));
    sent_then_expired.push(Step::Expect(2, expect_sub_ack(v, 0x90, 1, &[2])));
    sent_then_expired.extend(connected(1, &lane.connect(v)));
    sent_then_expired.push(Step::Send(
        1,
        publish(
            v,
            2,
            0,
            qos2_topic.as_bytes(),
            1,
            &[prop_u32(p::MESSAGE_EXPIRY_INTERVAL, 1)],
            b"x",
        ),
    ));
    sent_then_expired.push(Step::Expect(1, expect_ack(0x50, 1, 0)));
    sent_then_expired.push(Step::Send(1, ack(0x62, 1)));
    sent_then_expired.push(Step::Expect(1, expect_ack(0x70, 1, 0)));
    // NOTE: the first message of a new session gets packet id 1 from this
    // server, but any unused id is valid.
    sent_then_expired.push(Step::Expect(
        2,
        expect_publish_where(v, "the first QoS 2 delivery", |publish| {
            (publish.payload == b"x" && publish.qos == 2 && !publish.dup)
                .then_some(())
                .ok_or(format!(
                    "expected \"x\" at QoS 2 with DUP 0, got {publish:?}"
                ))
        }),
    ));
    // No PUBREC: the connection drops and the message expires meanwhile.
    sent_then_expired.push(Step::Close(2));
    sent_then_expired.push(Step::Pause(Duration::from_millis(1500)));
    sent_then_expired.push(Step::Open(2));
    sent_then_expired.push(Step::Send(2, qos2_receiver.bytes()));
    sent_then_expired.push(Step::Expect(
        2,
        Expect::Connack {
            session_present: true,
            code: 0,
        },
    ));
    sent_then_expired.push(Step::Expect(
        2,
        expect_publish_where(v, "the QoS 2 PUBLISH resent after its expiry", |publish| {
            (publish.payload == b"x"
                && publish.qos == 2
                && publish.dup
                && publish.packet_id == Some(1))
            .then_some(())
            .ok_or(format!(
                "expected \"x\" resent with DUP 1 and id 1, got {publish:?}"
            ))
        }),
    ));

    vec![
        Row {
            id: "MQTT-4.3.3-7",
            case: "sent QoS 2 message is resent after its expiry",
            steps: sent_then_expired,
        },
        Row {
            id: "MQTT-3.3.2-5",
            case: "expired message is not delivered",
            steps: offline(Duration::from_millis(2500), Expect::Silence(SILENCE)),
        },
        Row {
            id: "MQTT-3.3.2-6",
            case: "delivered message carries the remaining expiry",
            steps: offline(
                Duration::from_millis(1100),
                expect_publish_where(
                    v,
                    "PUBLISH with a lower Message Expiry Interval",
                    |publish| match find_property(&publish.properties, p::MESSAGE_EXPIRY_INTERVAL) {
                        Some([0, 0, 0, 1]) => Ok(()),
                        other => Err(format!(
                            "expected a remaining expiry of 1 s, got {other:02x?}"
                        )),
                    },
                ),
            ),
        },
    ]
}

#[tokio::test]
async fn mqtt_5_message_expiry_3_3_2_5_and_3_3_2_6_and_4_3_3_7() {
    run(Version::V5, expiry).await;
}

// ---------------------------------------------------------------------------
// Request/response and PUBLISH properties (MQTT 5)
// ---------------------------------------------------------------------------

/// Builds a row that checks that PUBLISH properties reach the subscriber unchanged.
fn forwarded(
    lane: &Lane,
    v: Version,
    id: &'static str,
    case: &'static str,
    props: Vec<Vec<u8>>,
    expected: Vec<Property>,
) -> Row {
    let t = topic("props");
    let mut steps = subscriber(lane, v, 2, &t, 0);
    steps.extend(connected(1, &lane.connect(v)));
    steps.push(Step::Send(
        1,
        publish(v, 0, 0, t.as_bytes(), 0, &props, b"{}"),
    ));
    steps.push(Step::Expect(
        2,
        expect_publish_where(v, "PUBLISH with its properties", move |publish| {
            let kept: Vec<&Property> = publish
                .properties
                .iter()
                .filter(|(id, _)| expected.iter().any(|(wanted, _)| wanted == id))
                .collect();
            let expected: Vec<&Property> = expected.iter().collect();
            (kept == expected)
                .then_some(())
                .ok_or(format!("expected {expected:02x?}, got {kept:02x?}"))
        }),
    ));
    Row { id, case, steps }
}

fn request_response(lane: &Lane, v: Version) -> Vec<Row> {
    let response_topic = topic("responses/1");
    vec![
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-15",
            "Response Topic is forwarded unchanged",
            vec![prop_str(p::RESPONSE_TOPIC, response_topic.as_bytes())],
            vec![(p::RESPONSE_TOPIC, string(response_topic.as_bytes()))],
        ),
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-16",
            "Correlation Data is forwarded unchanged",
            vec![prop_str(p::CORRELATION_DATA, b"\x00\x01corr")],
            vec![(p::CORRELATION_DATA, string(b"\x00\x01corr"))],
        ),
    ]
}

/// Expects a packet other than PUBLISH.
fn expect_any_but_publish() -> Expect {
    Expect::Packet(
        "no PUBLISH",
        Box::new(|packet| {
            (packet.first_byte >> 4 != 3)
                .then_some(())
                .ok_or(format!("the message was sent again: {packet:02x?}"))
        }),
    )
}

fn properties_forwarded(lane: &Lane, v: Version) -> Vec<Row> {
    let status = topic("status");
    let mut will = Will::new(&status, b"gone");
    will.properties = vec![user_property(b"b", b"2"), user_property(b"a", b"1")];
    let mut will_order = subscriber(lane, v, 2, &status, 0);
    will_order.extend(connected(1, &lane.connect(v).with_will(will)));
    will_order.push(Step::Close(1));
    will_order.push(Step::Expect(
        2,
        expect_publish_where(v, "the will with its User Properties in order", |publish| {
            let kept: Vec<&Property> = publish
                .properties
                .iter()
                .filter(|(id, _)| *id == p::USER_PROPERTY)
                .collect();
            let expected = [
                (p::USER_PROPERTY, [string(b"b"), string(b"2")].concat()),
                (p::USER_PROPERTY, [string(b"a"), string(b"1")].concat()),
            ];
            (kept == expected.iter().collect::<Vec<_>>())
                .then_some(())
                .ok_or(format!("expected {expected:02x?}, got {kept:02x?}"))
        }),
    ));

    vec![
        Row {
            id: "MQTT-3.1.3-10",
            case: "will User Properties keep their order",
            steps: will_order,
        },
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-4",
            "Payload Format Indicator is forwarded unchanged",
            vec![prop_u8(p::PAYLOAD_FORMAT_INDICATOR, 1)],
            vec![(p::PAYLOAD_FORMAT_INDICATOR, vec![1])],
        ),
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-17",
            "User Properties are forwarded",
            vec![user_property(b"k", b"v")],
            vec![(p::USER_PROPERTY, [string(b"k"), string(b"v")].concat())],
        ),
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-18",
            "User Properties keep their order",
            vec![
                user_property(b"b", b"2"),
                user_property(b"a", b"1"),
                user_property(b"b", b"3"),
            ],
            vec![
                (p::USER_PROPERTY, [string(b"b"), string(b"2")].concat()),
                (p::USER_PROPERTY, [string(b"a"), string(b"1")].concat()),
                (p::USER_PROPERTY, [string(b"b"), string(b"3")].concat()),
            ],
        ),
        forwarded(
            lane,
            v,
            "MQTT-3.3.2-20",
            "Content Type is forwarded unchanged",
            vec![prop_str(p::CONTENT_TYPE, b"application/json")],
            vec![(p::CONTENT_TYPE, string(b"application/json"))],
        ),
    ]
}

#[tokio::test]
async fn mqtt_5_request_response_3_3_2_15_and_3_3_2_16() {
    run(Version::V5, request_response).await;
}

#[tokio::test]
async fn mqtt_5_properties_forwarded_3_3_2_4_17_18_20_and_3_1_3_10() {
    run(Version::V5, properties_forwarded).await;
}
