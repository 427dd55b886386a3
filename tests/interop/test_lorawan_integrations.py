"""Uplinks from other LoRaWAN network servers: ChirpStack v4 and The Things
Stack v3 webhooks posted with httpx and requests, and ChirpStack's MQTT
integration played by paho-mqtt publishing to the Mosquitto broker on
127.0.0.1:1883. Payloads are Cayenne LPP frames built by pycayennelpp, so
the device profile's codec decodes bytes that Ferrite did not encode.

The events are written for these tests from the field lists of
ChirpStack's `UplinkEvent` and The Things Stack's uplink message."""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import requests
from cayennelpp import LppFrame
from paho.mqtt.enums import CallbackAPIVersion

from harness import FerriteServer, ferrite_binary, unique_name

MOSQUITTO_HOST = "127.0.0.1"
MOSQUITTO_PORT = 1883
MQTT_TIMEOUT_S = 20.0


def random_dev_eui() -> str:
    return secrets.token_hex(8)


def lpp_frame(temperature: float, humidity: float) -> bytes:
    frame = LppFrame()
    frame.add_temperature(1, temperature)
    frame.add_humidity(2, humidity)
    return bytes(frame)


def chirpstack_up(
    dev_eui: str, f_cnt: int, payload: bytes, time_text: str = "2026-03-14T09:26:53.589Z"
) -> dict[str, Any]:
    return {
        "deduplicationId": str(uuid.uuid4()),
        "time": time_text,
        "deviceInfo": {
            "tenantId": str(uuid.uuid4()),
            "applicationId": str(uuid.uuid4()),
            "applicationName": "interop",
            "deviceName": "sensor",
            "devEui": dev_eui.upper(),
        },
        "devAddr": "01a2b3c4",
        "dr": 3,
        "fCnt": f_cnt,
        "fPort": 1,
        "confirmed": False,
        "data": base64.b64encode(payload).decode(),
        "rxInfo": [{"gatewayId": "a840411d3a0c4150", "rssi": -88, "snr": 4.75}],
        "txInfo": {"frequency": 867500000, "modulation": {"lora": {"bandwidth": 125000, "spreadingFactor": 9}}},
    }


def tts_uplink(dev_eui: str, f_cnt: int, payload: bytes) -> dict[str, Any]:
    return {
        "end_device_ids": {
            "device_id": "sensor",
            "application_ids": {"application_id": "interop"},
            "dev_eui": dev_eui.upper(),
        },
        "received_at": "2026-03-14T09:40:00.500Z",
        "uplink_message": {
            "f_port": 1,
            "f_cnt": f_cnt,
            "frm_payload": base64.b64encode(payload).decode(),
            "rx_metadata": [{"gateway_ids": {"gateway_id": "lab", "eui": "A840411D3A0C4150"}, "rssi": -70, "snr": 8}],
            "settings": {"data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 8}}, "frequency": "868500000"},
            "received_at": "2026-03-14T09:40:00.400Z",
        },
    }


def lorawan_device(server: FerriteServer, dev_eui: str) -> str:
    """Create a Cayenne LPP profile, a device with it and an external LoRaWAN
    registration; return the device id."""
    profile = unique_name("lpp")
    response = server.api.post(
        f"{server.http_url}/api/v1/profiles",
        data=f"name: {profile}\ncodec: {{ type: cayenne_lpp }}\n".encode(),
        headers={"Content-Type": "application/yaml"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    response = server.api.post(
        f"{server.http_url}/api/v1/devices", json={"name": unique_name("lorawan"), "profile": profile}, timeout=10
    )
    assert response.status_code == 201, response.text
    device_id = response.json()["id"]
    response = server.api.put(
        f"{server.http_url}/api/v1/devices/{device_id}/lorawan",
        json={"dev_eui": dev_eui, "activation": "external"},
        timeout=10,
    )
    assert response.status_code in (200, 201), response.text
    return device_id


def test_chirpstack_webhook_with_httpx(server: FerriteServer) -> None:
    dev_eui = random_dev_eui()
    device_id = lorawan_device(server, dev_eui)
    event = chirpstack_up(dev_eui, 12, lpp_frame(19.5, 61.0))

    with httpx.Client(headers={"Authorization": f"Bearer {server.operator_key}"}, timeout=10) as client:
        response = client.post(
            f"{server.http_url}/api/v1/integrations/chirpstack", params={"event": "up"}, json=event
        )
        assert response.status_code == 200, response.text
        assert response.json() == {"device_id": device_id, "outcome": "stored"}

        repeat = client.post(f"{server.http_url}/api/v1/integrations/chirpstack", params={"event": "up"}, json=event)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json()["outcome"] == "duplicate"

        status = client.post(
            f"{server.http_url}/api/v1/integrations/chirpstack",
            params={"event": "status"},
            json={"deviceInfo": {"devEui": dev_eui}, "batteryLevel": 80},
        )
        assert status.status_code == 204, status.text

    server.wait_for_latest(
        device_id,
        {"temperature_1": 19.5, "relative_humidity_2": 61.0},
        timestamps={"temperature_1": 1_773_480_413_589},
    )


def test_tts_webhook_with_requests(server: FerriteServer) -> None:
    dev_eui = random_dev_eui()
    device_id = lorawan_device(server, dev_eui)

    response = requests.post(
        f"{server.http_url}/api/v1/integrations/tts",
        json=tts_uplink(dev_eui, 3, lpp_frame(-4.5, 80.0)),
        headers={"Authorization": f"Bearer {server.operator_key}"},
        timeout=10,
    )

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "stored"
    server.wait_for_latest(
        device_id,
        {"temperature_1": -4.5, "relative_humidity_2": 80.0},
        timestamps={"temperature_1": 1_773_481_200_400},
    )


def test_webhook_errors_are_problem_json(server: FerriteServer) -> None:
    headers = {"Authorization": f"Bearer {server.operator_key}"}
    url = f"{server.http_url}/api/v1/integrations/tts"

    unknown = requests.post(url, json=tts_uplink(random_dev_eui(), 1, b"\x01\x67\x00\x10"), headers=headers, timeout=10)
    assert unknown.status_code == 404, unknown.text
    assert unknown.headers["Content-Type"] == "application/problem+json"
    assert "PUT /api/v1/devices/{id}/lorawan" in unknown.json()["detail"]

    message = tts_uplink(random_dev_eui(), 1, b"")
    message["uplink_message"]["rx_metadata"][0]["rssi"] = "weak"
    invalid = requests.post(url, json=message, headers=headers, timeout=10)
    assert invalid.status_code == 400, invalid.text
    assert "uplink_message.rx_metadata[0].rssi" in invalid.json()["detail"]

    unauthorized = requests.post(url, json=message, headers={"Authorization": "Bearer fk_wrong"}, timeout=10)
    assert unauthorized.status_code == 401, unauthorized.text


class MqttIntegrationServer(FerriteServer):
    """A server whose ChirpStack MQTT integration subscribes to
    `{prefix}/application/+/device/+/event/up` on Mosquitto."""

    def __init__(self, binary: Path, data_dir: Path, log_path: Path, prefix: str) -> None:
        super().__init__(binary, data_dir, log_path)
        self.prefix = prefix
        self.client_id = f"{prefix}-ferrite"

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["FERRITE_LORAWAN_CHIRPSTACK_MQTT_URL"] = f"mqtt://{MOSQUITTO_HOST}:{MOSQUITTO_PORT}"
        env["FERRITE_LORAWAN_CHIRPSTACK_MQTT_TOPIC_FILTER"] = f"{self.prefix}/application/+/device/+/event/up"
        env["FERRITE_LORAWAN_CHIRPSTACK_MQTT_CLIENT_ID"] = self.client_id
        return env


def clear_session(client_id: str) -> None:
    """Connect once with a clean session, so Mosquitto drops the persistent
    session that Ferrite left behind."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    client.connect(MOSQUITTO_HOST, MOSQUITTO_PORT, keepalive=5)
    client.loop_start()
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()


@pytest.fixture
def mqtt_server(tmp_path: Path) -> Iterator[MqttIntegrationServer]:
    prefix = f"ferrite-interop-{uuid.uuid4().hex[:10]}"
    instance = MqttIntegrationServer(ferrite_binary(), tmp_path / "data", tmp_path / "ferrite.log", prefix)
    try:
        instance.start()
    except BaseException:
        instance.stop()
        raise
    yield instance
    exit_code = instance.stop()
    clear_session(instance.client_id)
    assert "panicked" not in instance.log_text(), instance.log_tail()
    assert exit_code == 0, instance.log_tail()


def publish_to_mosquitto(topic: str, payload: bytes, qos: int = 1) -> None:
    """Publish with `qos` and wait until Mosquitto acknowledges it (QoS 1) or
    until it is sent (QoS 0)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_name("interop-pub"))
    client.connect(MOSQUITTO_HOST, MOSQUITTO_PORT, keepalive=10)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"Mosquitto did not acknowledge the publish to {topic}"
    finally:
        client.disconnect()
        client.loop_stop()


def test_chirpstack_mqtt_with_paho(mqtt_server: MqttIntegrationServer) -> None:
    dev_eui = random_dev_eui()
    device_id = lorawan_device(mqtt_server, dev_eui)
    topic = f"{mqtt_server.prefix}/application/{uuid.uuid4()}/device/{dev_eui}/event/up"
    event = chirpstack_up(dev_eui, 1, lpp_frame(22.5, 40.0), time_text="2026-03-14T11:00:00Z")

    # The subscription is made shortly after start: repeat the same uplink
    # (a repeat is dropped) until it is stored.
    deadline = time.monotonic() + MQTT_TIMEOUT_S
    while True:
        publish_to_mosquitto(topic, json.dumps(event).encode())
        latest = mqtt_server.latest(device_id)
        if "temperature_1" in latest:
            break
        assert time.monotonic() < deadline, f"no uplink arrived over MQTT:\n{mqtt_server.log_tail()}"
        time.sleep(0.5)

    mqtt_server.wait_for_latest(
        device_id,
        {"temperature_1": 22.5, "relative_humidity_2": 40.0},
        timestamps={"temperature_1": 1_773_486_000_000},
    )

    # Other ChirpStack events on a broader subscription are skipped, and a
    # broken event does not stop the next one.
    publish_to_mosquitto(f"{mqtt_server.prefix}/application/x/device/{dev_eui}/event/up", b"{not json")
    next_event = chirpstack_up(dev_eui, 2, lpp_frame(23.0, 41.0), time_text="2026-03-14T11:05:00Z")
    publish_to_mosquitto(topic, json.dumps(next_event).encode())
    mqtt_server.wait_for_latest(device_id, {"temperature_1": 23.0, "relative_humidity_2": 41.0})

    # ChirpStack publishes with QoS 0 unless configured otherwise; such
    # messages need no PUBACK and are stored all the same.
    qos0_event = chirpstack_up(dev_eui, 3, lpp_frame(24.0, 42.0), time_text="2026-03-14T11:10:00Z")
    publish_to_mosquitto(topic, json.dumps(qos0_event).encode(), qos=0)
    mqtt_server.wait_for_latest(device_id, {"temperature_1": 24.0, "relative_humidity_2": 42.0})
