"""A paho-mqtt 2.x client whose callbacks record CONNACK, PUBACK, SUBACK,
messages and disconnects, for tests that wait for each of them."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from harness import FerriteServer

ACK_TIMEOUT_S = 5.0


def wait_until(condition: Callable[[], bool], description: str, timeout: float = ACK_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {description}")
        time.sleep(0.01)


class PahoDevice:
    """A paho client of one device for the test server."""

    def __init__(
        self,
        server: FerriteServer,
        token: str | None,
        protocol: int,
        client_id: str = "",
        clean: bool = True,
    ) -> None:
        self.server = server
        self.protocol = protocol
        self.clean = clean
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"interop-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
            clean_session=clean if protocol != mqtt.MQTTv5 else None,
        )
        if token is not None:
            self.client.username_pw_set(token)
        # Paho reconnects on its own after a lost connection. The long delay
        # keeps a retry from hiding the first disconnect from the tests.
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)

        self.connack: tuple[ReasonCode, bool] | None = None
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.disconnect_reason: ReasonCode | None = None

        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = (reason_code, bool(flags.session_present))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.pubacks[mid] = reason_code

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        self.subacks[mid] = list(reason_code_list)

    def _on_message(self, client, userdata, message) -> None:
        self.messages.put(message)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.disconnect_reason = reason_code

    def connect(self) -> tuple[ReasonCode, bool]:
        """Connect and return the CONNACK reason code and session-present flag."""
        properties = None
        clean_start: bool | int = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.protocol == mqtt.MQTTv5:
            clean_start = self.clean
            if not self.clean:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", self.server.mqtt_port, keepalive=30, clean_start=clean_start, properties=properties)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, "CONNACK")
        assert self.connack is not None
        return self.connack

    def connect_ok(self) -> bool:
        reason, session_present = self.connect()
        assert reason == 0, f"CONNACK refused: {reason}"
        return session_present

    def publish(self, topic: str, payload: Any, qos: int) -> ReasonCode:
        """Publish JSON and return the PUBACK reason code (QoS 1) or, for
        QoS 0, the code paho reports once the packet is written."""
        return self.publish_bytes(topic, json.dumps(payload).encode(), qos)

    def publish_bytes(self, topic: str, payload: bytes, qos: int) -> ReasonCode:
        """Publish `payload` as it is; see `publish`."""
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        wait_until(lambda: info.mid in self.pubacks, f"PUBACK of {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, filters: list[tuple[str, int]]) -> list[ReasonCode]:
        result, mid = self.client.subscribe(filters)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        wait_until(lambda: mid in self.subacks, "SUBACK")
        return self.subacks[mid]

    def wait_disconnected(self) -> ReasonCode:
        wait_until(lambda: self.disconnect_reason is not None, "the server to close the connection")
        assert self.disconnect_reason is not None
        return self.disconnect_reason

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
            wait_until(lambda: self.disconnect_reason is not None, "DISCONNECT")
        self.client.loop_stop()
