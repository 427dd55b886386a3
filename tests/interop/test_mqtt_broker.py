"""Broker features with the Eclipse Paho Python client (paho-mqtt 2.x),
over MQTT 3.1.1 and 5: application clients, retained messages, outbound
QoS 2, shared subscriptions and MQTT 5 request/response.

| test | MQTT 5.0 statements |
|---|---|
| test_retained_message_reaches_new_subscriber | [MQTT-3.3.1-5], [MQTT-3.3.1-9] |
| test_retained_empty_payload_deletes | [MQTT-3.3.1-6], [MQTT-3.3.1-7] |
| test_qos2_delivered_once | QoS 2 delivery with the server as sender (MQTT 5.0 section 4.3.3) |
| test_shared_subscription_alternates | [MQTT-4.8.2-1] |
| test_command_response_with_correlation_data | [MQTT-3.3.2-15], [MQTT-3.3.2-16] |
"""

from __future__ import annotations

import json
import queue
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness import FerriteServer

PROTOCOLS = [pytest.param(mqtt.MQTTv311, id="mqtt311"), pytest.param(mqtt.MQTTv5, id="mqtt5")]
WAIT_S = 10.0
QUIET_S = 0.7


class Client:
    """A paho client that connects, records every message it receives and
    waits for acknowledgements."""

    def __init__(self, server: FerriteServer, user: str, protocol: int, password: str = "") -> None:
        self.protocol = protocol
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.reason_code: int | None = None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"interop-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _client, _userdata, message: self.messages.put(message)
        self.client.connect("127.0.0.1", server.mqtt_port)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"
        assert self.reason_code == 0, f"connection refused with {self.reason_code}"

    def _on_connect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.reason_code = reason_code.value
        self.connected.set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_args: done.set()
        self.client.subscribe(topic_filter, qos)
        assert done.wait(WAIT_S), f"no SUBACK for {topic_filter}"

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        info.wait_for_publish(WAIT_S)
        assert info.is_published(), f"PUBLISH on {topic} was not acknowledged"

    def next_message(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)

    def quiet_messages(self) -> list[mqtt.MQTTMessage]:
        """Returns the messages that arrive within QUIET_S."""
        received = []
        try:
            while True:
                received.append(self.messages.get(timeout=QUIET_S))
        except queue.Empty:
            return received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    opened: list[Client] = []

    def open_client(*args, **kwargs) -> Client:
        client = Client(*args, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_application_receives_device_telemetry(server: FerriteServer, clients, protocol: int) -> None:
    device = server.create_device()
    app = clients(server, server.create_api_key("viewer"), protocol)
    app.subscribe("devices/+/telemetry")
    device_client = clients(server, device.token, protocol)

    device_client.publish("v1/devices/me/telemetry", json.dumps({"humidity": 40}))

    message = app.next_message()
    assert message.topic == f"devices/{device.id}/telemetry"
    body = json.loads(message.payload)
    assert body["type"] == "telemetry"
    assert body["device_id"] == device.id
    assert body["points"][0]["key"] == "humidity"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_reaches_new_subscriber(server: FerriteServer, clients, protocol: int) -> None:
    key = server.create_api_key("operator")
    topic = f"apps/retained/{uuid.uuid4().hex}"
    publisher = clients(server, key, protocol)
    publisher.publish(topic, b"old", retain=True)
    publisher.publish(topic, b"new", retain=True)

    subscriber = clients(server, key, protocol)
    subscriber.subscribe(topic)

    received = subscriber.quiet_messages()
    assert [message.payload for message in received] == [b"new"]
    assert received[0].retain


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_empty_payload_deletes(server: FerriteServer, clients, protocol: int) -> None:
    key = server.create_api_key("operator")
    topic = f"apps/retained/{uuid.uuid4().hex}"
    publisher = clients(server, key, protocol)
    publisher.publish(topic, b"value", retain=True)
    publisher.publish(topic, b"", retain=True)

    subscriber = clients(server, key, protocol)
    subscriber.subscribe(topic)

    assert subscriber.quiet_messages() == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos2_delivered_once(server: FerriteServer, clients, protocol: int) -> None:
    key = server.create_api_key("operator")
    topic = f"apps/exactly-once/{uuid.uuid4().hex}"
    subscriber = clients(server, key, protocol)
    subscriber.subscribe(topic, qos=2)
    publisher = clients(server, key, protocol)

    publisher.publish(topic, b"once", qos=2)

    received = [subscriber.next_message()] + subscriber.quiet_messages()
    assert [message.payload for message in received] == [b"once"]
    assert received[0].qos == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_subscription_alternates(server: FerriteServer, clients, protocol: int) -> None:
    key = server.create_api_key("operator")
    topic = f"apps/jobs/{uuid.uuid4().hex}"
    members = [clients(server, key, protocol) for _ in range(2)]
    for member in members:
        member.subscribe(f"$share/workers/{topic}")
    publisher = clients(server, key, protocol)

    for index in range(4):
        publisher.publish(topic, str(index))

    counts = [len(member.quiet_messages()) for member in members]
    assert counts == [2, 2]


def test_command_response_with_correlation_data(server: FerriteServer, clients) -> None:
    device = server.create_device()
    device_client = clients(server, device.token, mqtt.MQTTv311)

    def respond(_client, _userdata, message: mqtt.MQTTMessage) -> None:
        request_id = message.topic.rsplit("/", 1)[-1]
        device_client.client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps({"done": True}), qos=1)

    device_client.client.message_callback_add("v1/devices/me/rpc/request/+", respond)
    device_client.subscribe("v1/devices/me/rpc/request/+")

    app = clients(server, server.create_api_key("operator"), mqtt.MQTTv5)
    response_topic = f"apps/responses/{uuid.uuid4().hex}"
    app.subscribe(response_topic)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = response_topic
    properties.CorrelationData = b"\x00request-7"

    app.publish(f"devices/{device.id}/commands", json.dumps({"method": "start"}), properties=properties)

    response = app.next_message()
    assert response.topic == response_topic
    assert response.properties.CorrelationData == b"\x00request-7"
    assert json.loads(response.payload)["response"] == {"done": True}
