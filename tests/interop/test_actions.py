"""Alarm actions and device commands with Python clients.

- Webhooks go to a receiver on 127.0.0.1 written with `http.server`. The
  test checks the signature with Python's `hmac`, as the example in
  docs/actions.md does.
- `mqtt_publish` actions go to the Mosquitto broker on 127.0.0.1:1883, and
  a paho-mqtt subscriber reads them back.
- Commands go to a paho-mqtt device that responds like a ThingsBoard device.

Actions run through `POST /api/v1/actions/test`, which records a delivery
for a made-up alarm change, because rules are configured elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import requests
from paho.mqtt.enums import CallbackAPIVersion

from harness import Device, FerriteServer, ferrite_binary
from paho_device import PahoDevice, wait_until

MOSQUITTO_PORT = 1883
DELIVERY_TIMEOUT_S = 15.0
SIGNATURE_MAX_AGE_S = 300


def verify_signature(secret: bytes, timestamp: str, signature: str, body: bytes) -> bool:
    """Check a webhook request as the example in docs/actions.md does:
    `timestamp` and `signature` are the X-Ferrite-Timestamp and
    X-Ferrite-Signature headers, `body` the raw request body."""
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > SIGNATURE_MAX_AGE_S:
        return False
    expected = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, "sha256=" + expected)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that responds to POSTs with scripted
    statuses (then 204) and records the requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                # Header names are case-insensitive, so they are kept in lower case.
                headers = {name.lower(): value for name, value in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append((headers, body, time.monotonic()))
                    status, headers = receiver.script.pop(0) if receiver.script else (204, {})
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, status: int, headers: dict[str, str] | None = None) -> None:
        with self.lock:
            self.script.append((status, headers or {}))

    def received(self) -> list[tuple[dict[str, str], bytes, float]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ActionsServer(FerriteServer):
    """A server whose alarm actions publish to Mosquitto and retry fast."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["FERRITE_ACTIONS_MQTT_URL"] = f"mqtt://127.0.0.1:{MOSQUITTO_PORT}"
        env["FERRITE_ACTIONS_RETRY_INITIAL_DELAY"] = "100ms"
        env["FERRITE_ACTIONS_RETRY_MAX_DELAY"] = "1s"
        return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FerriteServer]:
    base: Path = tmp_path_factory.mktemp("ferrite-actions")
    instance = ActionsServer(ferrite_binary(), data_dir=base / "data", log_path=base / "ferrite.log")
    try:
        instance.start()
    except BaseException:
        instance.stop()
        raise
    yield instance
    exit_code = instance.stop()
    assert "panicked" not in instance.log_text(), f"the server panicked:\n{instance.log_tail()}"
    assert exit_code == 0, f"ferrite serve exited with {exit_code}:\n{instance.log_tail()}"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    instance = WebhookReceiver()
    yield instance
    instance.close()


def run_action(server: FerriteServer, device: Device, action: dict[str, Any], change: str = "raised") -> dict[str, Any]:
    """Run `action` once for `device` and return the recorded delivery."""
    response = server.api.post(
        f"{server.http_url}/api/v1/actions/test",
        json={"action": action, "device_id": device.id, "change": change, "alarm": {"rule": "overheat"}},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    return response.json()


def wait_for_delivery(server: FerriteServer, delivery_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + DELIVERY_TIMEOUT_S
    while True:
        response = server.get(f"/api/v1/actions/deliveries/{delivery_id}")
        assert response.status_code == 200, response.text
        delivery = response.json()
        if delivery["status"] == status:
            return delivery
        if time.monotonic() > deadline:
            raise AssertionError(f"delivery {delivery_id} is not {status} after {DELIVERY_TIMEOUT_S} s: {delivery}")
        time.sleep(0.05)


# --- webhooks -------------------------------------------------------------


def test_webhook_signature_verifies_with_python_hmac(server: FerriteServer, receiver: WebhookReceiver) -> None:
    device = server.create_device("boiler")
    secret = "whsec-" + uuid.uuid4().hex

    delivery = run_action(server, device, {"type": "webhook", "url": receiver.url, "secret": secret}, change="cleared")
    wait_for_delivery(server, delivery["id"], "succeeded")

    [(headers, body, _)] = receiver.received()
    timestamp, signature = headers["x-ferrite-timestamp"], headers["x-ferrite-signature"]
    assert verify_signature(secret.encode(), timestamp, signature, body)
    assert not verify_signature(b"another secret", timestamp, signature, body)
    assert not verify_signature(secret.encode(), timestamp, signature, body + b" ")
    assert not verify_signature(secret.encode(), str(int(timestamp) - 1), signature, body)
    assert headers["x-ferrite-event"] == "alarm.cleared"
    assert headers["x-ferrite-delivery"] == delivery["id"]
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert document["event"] == "alarm.cleared"
    assert document["device"] == {"id": device.id, "name": device.name}
    assert document["alarm"]["rule"] == "overheat"
    assert document["alarm"]["status"] == "cleared"
    assert isinstance(document["sent_at"], int)


def test_webhook_server_error_is_retried(server: FerriteServer, receiver: WebhookReceiver) -> None:
    device = server.create_device("pump")
    receiver.respond(500)
    receiver.respond(503)

    delivery = run_action(server, device, {"type": "webhook", "url": receiver.url})
    done = wait_for_delivery(server, delivery["id"], "succeeded")

    assert done["attempts"] == 3
    received = receiver.received()
    assert len(received) == 3
    assert len({headers["x-ferrite-delivery"] for headers, _, _ in received}) == 1


def test_webhook_429_waits_for_retry_after(server: FerriteServer, receiver: WebhookReceiver) -> None:
    device = server.create_device("fan")
    receiver.respond(429, {"Retry-After": "2"})

    delivery = run_action(server, device, {"type": "webhook", "url": receiver.url})
    wait_for_delivery(server, delivery["id"], "succeeded")

    first, second = receiver.received()
    # The configured backoff alone would retry after about 0.1 s.
    assert second[2] - first[2] >= 1.9


def test_webhook_client_error_is_not_retried(server: FerriteServer, receiver: WebhookReceiver) -> None:
    device = server.create_device("valve")
    receiver.respond(422)

    delivery = run_action(server, device, {"type": "webhook", "url": receiver.url})
    failed = wait_for_delivery(server, delivery["id"], "failed")

    assert failed["attempts"] == 1
    assert failed["last_status_code"] == 422
    time.sleep(0.5)
    assert len(receiver.received()) == 1
    listed = server.get("/api/v1/actions/deliveries", status="failed").json()["deliveries"]
    assert delivery["id"] in [item["id"] for item in listed]


# --- MQTT -----------------------------------------------------------------


def test_mqtt_publish_reaches_mosquitto(server: FerriteServer) -> None:
    device = server.create_device("tank")
    prefix = f"ferrite-interop/{uuid.uuid4().hex}"
    messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"interop-sub-{uuid.uuid4().hex[:8]}")
    subscriber.on_connect = lambda client, userdata, flags, reason, properties: client.subscribe(f"{prefix}/#", qos=1)
    subscriber.on_subscribe = lambda client, userdata, mid, reasons, properties: subscribed.set()
    subscriber.on_message = lambda client, userdata, message: messages.put(message)
    subscriber.connect("127.0.0.1", MOSQUITTO_PORT)
    subscriber.loop_start()
    try:
        assert subscribed.wait(10), "no SUBACK from Mosquitto on 127.0.0.1:1883"

        delivery = run_action(server, device, {"type": "mqtt_publish", "topic": prefix + "/{device_name}/{rule}/{change}", "qos": 1})
        message = messages.get(timeout=DELIVERY_TIMEOUT_S)
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()

    assert message.topic == f"{prefix}/{device.name}/overheat/raised"
    document = json.loads(message.payload)
    assert document["event"] == "alarm.raised"
    assert document["device"]["id"] == device.id
    wait_for_delivery(server, delivery["id"], "succeeded")


class AnsweringDevice:
    """A paho device subscribed to its RPC requests. It responds to each
    request on the response topic, unless the method is `ignore`."""

    def __init__(self, server: FerriteServer, device: Device, protocol: int) -> None:
        self.client = PahoDevice(server, device.token, protocol)
        self.client.connect_ok()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.stop = threading.Event()
        self.client.client.on_message = self._on_message
        codes = self.client.subscribe([("v1/devices/me/rpc/request/+", 1)])
        assert all(code < 0x80 for code in codes), codes

    def _on_message(self, client, userdata, message) -> None:
        request_id = message.topic.rsplit("/", 1)[-1]
        request = json.loads(message.payload)
        self.requests.append((request_id, request))
        if request["method"] != "ignore":
            response = {"ok": True, "method": request["method"], "params": request["params"]}
            client.publish(f"v1/devices/me/rpc/response/{request_id}", json.dumps(response), qos=1)

    def close(self) -> None:
        self.client.close()


@pytest.mark.parametrize("protocol", [pytest.param(mqtt.MQTTv311, id="mqtt311"), pytest.param(mqtt.MQTTv5, id="mqtt5")])
def test_command_round_trip_with_paho_device(server: FerriteServer, protocol: int) -> None:
    device = server.create_device("thermostat")
    url = f"{server.http_url}/api/v1/devices/{device.id}/commands"
    operator = {"Authorization": f"Bearer {server.operator_key}"}

    offline = requests.post(url, json={"method": "getTemp"}, headers=operator, timeout=10)
    assert offline.status_code == 409, offline.text

    answering = AnsweringDevice(server, device, protocol)
    try:
        response = requests.post(url, json={"method": "setPoint", "params": {"celsius": 20.5}, "timeout_ms": 5000}, headers=operator, timeout=10)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["response"] == {"ok": True, "method": "setPoint", "params": {"celsius": 20.5}}
        assert answering.requests[-1] == (str(body["request_id"]), {"method": "setPoint", "params": {"celsius": 20.5}})

        silent = requests.post(url, json={"method": "ignore", "timeout_ms": 300}, headers=operator, timeout=10)
        assert silent.status_code == 504, silent.text
        assert silent.headers["Content-Type"] == "application/problem+json"
    finally:
        answering.close()


def test_command_action_reaches_paho_device(server: FerriteServer) -> None:
    device = server.create_device("siren")
    answering = AnsweringDevice(server, device, mqtt.MQTTv311)
    try:
        delivery = run_action(server, device, {"type": "command", "method": "alarmOn", "params": {"volume": 7}})
        wait_for_delivery(server, delivery["id"], "succeeded")
        wait_until(lambda: len(answering.requests) == 1, "the RPC request at the device")
    finally:
        answering.close()
    request_id, request = answering.requests[0]
    assert request == {"method": "alarmOn", "params": {"volume": 7}}
    assert request_id.isdigit()
