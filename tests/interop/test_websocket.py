"""The WebSocket endpoints with third-party clients: the `websockets`
library on the device WebSocket (`/api/v1/devices/ws`), and paho-mqtt with
transport="websockets" and MQTT.js (Node.js, `node/mqtt_websocket.js`) on
MQTT over WebSocket (`/mqtt`)."""

from __future__ import annotations

import json
import queue
import random
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness import Device, FerriteServer
from paho_device import wait_until

RECEIVE_TIMEOUT_S = 10.0
NODE_DIR = Path(__file__).parent / "node"


def device_ws_url(server: FerriteServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.http_port}/api/v1/devices/ws{query}"


def open_device_socket(server: FerriteServer, device: Device) -> ClientConnection:
    return connect(device_ws_url(server, f"?access_token={device.token}"), proxy=None, open_timeout=10)


def next_json(client: ClientConnection) -> dict[str, Any]:
    return json.loads(client.recv(timeout=RECEIVE_TIMEOUT_S))


def send_json(client: ClientConnection, message: dict[str, Any]) -> None:
    client.send(json.dumps(message))


def post_command_in_background(server: FerriteServer, device: Device, body: dict[str, Any]) -> queue.Queue:
    """POST a command from a thread, because the request waits for the
    device's response; the queue receives the `requests.Response`."""
    responses: queue.Queue[requests.Response] = queue.Queue()

    def post() -> None:
        responses.put(server.api.post(f"{server.http_url}/api/v1/devices/{device.id}/commands", json=body, timeout=15))

    threading.Thread(target=post, daemon=True).start()
    return responses


# --- device WebSocket --------------------------------------------------------


def test_device_socket_acknowledges_telemetry(server: FerriteServer) -> None:
    device = server.create_device("ws")
    value = random.randint(1, 1_000_000)

    with open_device_socket(server, device) as client:
        send_json(client, {"type": "telemetry", "id": "first", "data": {"counter": value}})
        send_json(client, {"type": "telemetry", "id": 2, "data": [{"state": "on"}]})

        assert next_json(client) == {"type": "ack", "id": "first"}
        assert next_json(client) == {"type": "ack", "id": 2}

    server.wait_for_latest(device.id, {"counter": value, "state": "on"})


def test_device_socket_takes_bearer_header(server: FerriteServer) -> None:
    device = server.create_device("ws-bearer")
    headers = {"Authorization": f"Bearer {device.token}"}

    with connect(device_ws_url(server), additional_headers=headers, proxy=None, open_timeout=10) as client:
        send_json(client, {"type": "telemetry", "id": "h", "data": {"bearer": 1}})
        assert next_json(client) == {"type": "ack", "id": "h"}


@pytest.mark.parametrize(
    ("query", "status"),
    [("", 401), ("?access_token=wrong", 401)],
    ids=["missing", "invalid"],
)
def test_device_socket_rejects_credentials(server: FerriteServer, query: str, status: int) -> None:
    with pytest.raises(InvalidStatus) as raised:
        with connect(device_ws_url(server, query), proxy=None, open_timeout=10):
            pass

    response = raised.value.response
    assert response.status_code == status
    problem = json.loads(response.body)
    assert problem["detail"], problem


def test_device_socket_errors_keep_it_open(server: FerriteServer) -> None:
    device = server.create_device("ws-errors")

    with open_device_socket(server, device) as client:
        client.send("not json")
        error = next_json(client)
        assert error["type"] == "error"
        assert error["error"] == "invalid_json"
        assert "JSON" in error["message"]

        send_json(client, {"type": "telemetry", "id": "x"})
        error = next_json(client)
        assert error["id"] == "x"
        assert error["error"] == "invalid_message"
        assert '"data"' in error["message"]

        send_json(client, {"type": "telemetry", "id": "ok", "data": {"fine": True}})
        assert next_json(client) == {"type": "ack", "id": "ok"}


def test_device_socket_command_round_trip(server: FerriteServer) -> None:
    device = server.create_device("ws-command")

    with open_device_socket(server, device) as client:
        responses = post_command_in_background(
            server, device, {"method": "setLed", "params": {"on": True}, "timeout_ms": 5000}
        )
        command = next_json(client)
        assert command["type"] == "command"
        assert command["method"] == "setLed"
        assert command["params"] == {"on": True}

        send_json(client, {"type": "command_response", "id": command["id"], "result": {"led": "on"}})
        response = responses.get(timeout=RECEIVE_TIMEOUT_S)

    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": command["id"], "response": {"led": "on"}}


# --- MQTT over WebSocket: paho-mqtt -----------------------------------------


class PahoWebSocketDevice:
    """A paho client over WebSocket that records CONNACK, PUBACKs and
    messages."""

    def __init__(self, server: FerriteServer, token: str, protocol: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"paho-ws-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
            transport="websockets",
        )
        self.client.ws_set_options(path="/mqtt")
        self.client.username_pw_set(token)
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)
        self.server = server
        self.connack: Any = None
        self.pubacks: set[int] = set()
        self.subacks: dict[int, list[Any]] = {}
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = lambda client, userdata, flags, reason, properties: setattr(self, "connack", reason)
        self.client.on_publish = lambda client, userdata, mid, reason, properties: self.pubacks.add(mid)
        self.client.on_subscribe = lambda client, userdata, mid, reasons, properties: self.subacks.update(
            {mid: list(reasons)}
        )
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)

    def connect(self) -> None:
        self.client.connect("127.0.0.1", self.server.http_port, keepalive=30)
        self.client.loop_start()
        wait_until(lambda: self.connack is not None, "CONNACK over WebSocket")
        assert self.connack == 0, f"CONNACK refused: {self.connack}"

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        info = self.client.publish(topic, json.dumps(payload), qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        wait_until(lambda: info.mid in self.pubacks, f"PUBACK of {topic}")

    def subscribe(self, topic: str) -> None:
        result, mid = self.client.subscribe(topic, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS, mqtt.error_string(result)
        wait_until(lambda: mid in self.subacks, "SUBACK")
        assert self.subacks[mid][0] == 1, self.subacks[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_paho_over_websocket(server: FerriteServer, protocol: int) -> None:
    device = server.create_device("paho-ws")
    value = random.randint(1, 1_000_000)
    client = PahoWebSocketDevice(server, device.token, protocol)
    client.connect()
    try:
        client.publish("v1/devices/me/telemetry", {"paho_ws": value})
        server.wait_for_latest(device.id, {"paho_ws": value})

        client.subscribe("v1/devices/me/rpc/request/+")
        responses = post_command_in_background(server, device, {"method": "ping", "timeout_ms": 5000})
        request = client.messages.get(timeout=RECEIVE_TIMEOUT_S)
        request_id = request.topic.rsplit("/", 1)[1]
        assert json.loads(request.payload) == {"method": "ping", "params": {}}
        client.publish(f"v1/devices/me/rpc/response/{request_id}", {"pong": True})
        response = responses.get(timeout=RECEIVE_TIMEOUT_S)
    finally:
        client.close()

    assert response.status_code == 200, response.text
    assert response.json()["response"] == {"pong": True}


def test_mqtt_upgrade_without_subprotocol_is_rejected(server: FerriteServer) -> None:
    url = f"ws://127.0.0.1:{server.http_port}/mqtt"

    with pytest.raises(InvalidStatus) as raised:
        with connect(url, proxy=None, open_timeout=10):
            pass

    response = raised.value.response
    assert response.status_code == 400
    assert "subprotocol" in json.loads(response.body)["detail"]


# --- MQTT over WebSocket: MQTT.js -------------------------------------------


@pytest.mark.parametrize("version", [4, 5], ids=["mqtt311", "mqtt5"])
def test_mqttjs_over_websocket(server: FerriteServer, version: int) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "mqtt").is_dir():
        pytest.fail("Node.js and MQTT.js are needed: run npm ci --prefix tests/interop/node", pytrace=False)
    device = server.create_device("mqttjs-ws")
    value = random.randint(1, 1_000_000)
    url = f"ws://127.0.0.1:{server.http_port}/mqtt"

    process = subprocess.Popen(
        [node, "mqtt_websocket.js", url, device.token, str(version), str(value)],
        cwd=NODE_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()
        assert json.loads(ready or "null") == {"event": "ready"}, process.stderr.read() if process.stderr else ""
        server.wait_for_latest(device.id, {"mqttjs": value})

        responses = post_command_in_background(server, device, {"method": "blink", "params": {"n": 3}, "timeout_ms": 5000})
        answered = json.loads(process.stdout.readline() or "null")
        response = responses.get(timeout=RECEIVE_TIMEOUT_S)
        exit_code = process.wait(timeout=RECEIVE_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert exit_code == 0
    assert answered["event"] == "answered"
    assert response.status_code == 200, response.text
    assert response.json() == {
        "request_id": answered["id"],
        "response": {"echo": {"method": "blink", "params": {"n": 3}}},
    }
