"""MQTT 3.1.1 and 5 with the Eclipse Paho Python client (paho-mqtt 2.x)."""

from __future__ import annotations

import json
import random
import uuid

import paho.mqtt.client as mqtt
import pytest

from harness import Device, FerriteServer, now_ms
from paho_device import ACK_TIMEOUT_S, PahoDevice, wait_until

PROTOCOLS = [pytest.param(mqtt.MQTTv311, id="mqtt311"), pytest.param(mqtt.MQTTv5, id="mqtt5")]

NOT_AUTHORIZED = 0x87
NO_MATCHING_SUBSCRIBERS = 0x10
PAYLOAD_FORMAT_INVALID = 0x99
BAD_USER_NAME_OR_PASSWORD = 0x86
SUBACK_FAILURE_V311 = 0x80


@pytest.fixture
def paho_clients():
    """Open `PahoDevice`s through the returned function and close them all
    at teardown."""
    opened: list[PahoDevice] = []

    def open_client(*args, **kwargs) -> PahoDevice:
        client = PahoDevice(*args, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def telemetry_topic(device: Device, style: str) -> str:
    return "v1/devices/me/telemetry" if style == "me" else f"devices/{device.id}/telemetry"


@pytest.mark.parametrize("style", ["me", "id"])
@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_stored(server: FerriteServer, paho_clients, protocol: int, qos: int, style: str) -> None:
    device = server.create_device()
    value = random.randint(1, 1_000_000)
    client = paho_clients(server, device.token, protocol)
    client.connect_ok()

    reason = client.publish(telemetry_topic(device, style), {"counter": value, "state": "on"}, qos)

    assert reason == 0
    server.wait_for_latest(device.id, {"counter": value, "state": "on"})


@pytest.mark.parametrize(
    ("payload", "expected", "timestamps"),
    [
        pytest.param({"ts": 1_700_000_000_456, "values": {"rpm": 1200}}, {"rpm": 1200}, {"rpm": 1_700_000_000_456}, id="ts-values"),
        pytest.param(
            [{"ts": 1_700_000_000_000, "values": {"v": 1}}, {"ts": 1_700_000_002_000, "values": {"v": 3}}],
            {"v": 3},
            {"v": 1_700_000_002_000},
            id="array",
        ),
        pytest.param({"gps": {"lat": 52.5, "lon": 13.4}}, {"gps.lat": 52.5, "gps.lon": 13.4}, {}, id="nested"),
    ],
)
def test_publish_payload_forms(server: FerriteServer, paho_clients, payload, expected, timestamps) -> None:
    device = server.create_device()
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    assert client.publish("v1/devices/me/telemetry", payload, 1) == 0

    server.wait_for_latest(device.id, expected, timestamps)


def test_mqtt5_other_device_topic_not_authorized(server: FerriteServer, paho_clients) -> None:
    device = server.create_device()
    other = server.create_device()
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    reason = client.publish(f"devices/{other.id}/telemetry", {"stolen": 1}, 1)

    assert reason == NOT_AUTHORIZED, str(reason)
    # The connection stays usable, and its later publish is stored.
    assert client.publish("v1/devices/me/telemetry", {"after": 1}, 1) == 0
    server.wait_for_latest(device.id, {"after": 1})
    assert set(server.latest_after_marker(other)) == {"marker"}


@pytest.mark.parametrize("qos", [0, 1])
def test_mqtt311_other_device_topic_disconnects(server: FerriteServer, paho_clients, qos: int) -> None:
    device = server.create_device()
    other = server.create_device()
    client = paho_clients(server, device.token, mqtt.MQTTv311)
    client.connect_ok()

    client.client.publish(f"devices/{other.id}/telemetry", json.dumps({"stolen": 1}), qos=qos)

    client.wait_disconnected()
    assert set(server.latest_after_marker(other)) == {"marker"}


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        # MQTT 3.1.1 has no negative PUBACK: the message is acknowledged and dropped.
        pytest.param(mqtt.MQTTv311, 0, id="mqtt311"),
        pytest.param(mqtt.MQTTv5, PAYLOAD_FORMAT_INVALID, id="mqtt5"),
    ],
)
def test_publish_invalid_json_not_stored(server: FerriteServer, paho_clients, protocol: int, expected: int) -> None:
    device = server.create_device()
    client = paho_clients(server, device.token, protocol)
    client.connect_ok()

    info = client.client.publish("v1/devices/me/telemetry", b'{"lost": ', qos=1)
    wait_until(lambda: info.mid in client.pubacks, "PUBACK")

    assert client.pubacks[info.mid] == expected, str(client.pubacks[info.mid])
    assert client.publish("v1/devices/me/telemetry", {"next": 1}, 1) == 0
    assert set(server.wait_for_latest(device.id, {"next": 1})) == {"next"}


@pytest.mark.parametrize(
    ("protocol", "refused"),
    [
        pytest.param(mqtt.MQTTv311, SUBACK_FAILURE_V311, id="mqtt311"),
        pytest.param(mqtt.MQTTv5, NOT_AUTHORIZED, id="mqtt5"),
    ],
)
def test_subscribe_other_namespace_refused(server: FerriteServer, paho_clients, protocol: int, refused: int) -> None:
    device = server.create_device()
    other = server.create_device()
    client = paho_clients(server, device.token, protocol)
    client.connect_ok()

    codes = client.subscribe([("v1/devices/me/attributes", 1), (f"devices/{other.id}/#", 1), ("#", 0)])

    assert [code.value for code in codes] == [1, refused, refused]


@pytest.mark.parametrize("token", [pytest.param("wrong-token", id="unknown-token"), pytest.param(None, id="no-user-name")])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_connect_bad_token_refused(server: FerriteServer, paho_clients, protocol: int, token: str | None) -> None:
    client = paho_clients(server, token, protocol)

    reason, _ = client.connect()

    assert reason.is_failure
    assert reason.value in (BAD_USER_NAME_OR_PASSWORD, NOT_AUTHORIZED), str(reason)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_gets_offline_message(server: FerriteServer, paho_clients, protocol: int) -> None:
    device = server.create_device()
    client_id = f"persistent-{uuid.uuid4().hex[:12]}"
    topic = "v1/devices/me/attributes"
    payload = {"firmware": "2.0.1", "sent_at": now_ms()}

    subscriber = paho_clients(server, device.token, protocol, client_id=client_id, clean=False)
    subscriber.connect_ok()
    assert [code.value for code in subscriber.subscribe([(topic, 1)])] == [1]
    subscriber.close()

    publisher = paho_clients(server, device.token, protocol)
    publisher.connect_ok()
    # Non-telemetry topics are routed, not stored. The offline persistent
    # session takes the message, so MQTT 5 answers 0x00; 0x10 would mean
    # no session took it.
    assert publisher.publish(topic, payload, 1) == 0

    resumed = paho_clients(server, device.token, protocol, client_id=client_id, clean=False)
    assert resumed.connect_ok() is True, "CONNACK did not report the stored session"
    message = resumed.messages.get(timeout=ACK_TIMEOUT_S)
    assert message.topic == topic
    assert message.qos == 1
    assert json.loads(message.payload) == payload
