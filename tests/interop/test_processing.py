"""Device profiles and their codecs with payloads built by independent
encoders (cbor2 for SenML CBOR, pycayennelpp for Cayenne LPP) and sent by
paho-mqtt and requests."""

from __future__ import annotations

import cbor2
import paho.mqtt.client as mqtt
import pytest
from cayennelpp import LppFrame

from harness import FerriteServer, STORE_TIMEOUT_S, unique_name
from paho_device import PahoDevice, wait_until

TELEMETRY_TOPIC = "v1/devices/me/telemetry"


def create_profile(server: FerriteServer, yaml_text: str) -> dict:
    response = server.api.post(
        f"{server.http_url}/api/v1/profiles",
        data=yaml_text.encode(),
        headers={"Content-Type": "application/yaml"},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()


def create_device(server: FerriteServer, profile: str) -> dict:
    response = server.api.post(
        f"{server.http_url}/api/v1/devices",
        json={"name": unique_name(profile), "profile": profile},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture
def device_client():
    opened: list[PahoDevice] = []

    def open_client(server: FerriteServer, token: str) -> PahoDevice:
        client = PahoDevice(server, token, mqtt.MQTTv5)
        opened.append(client)
        code, _ = client.connect()
        assert code == 0, code
        return client

    yield open_client
    for client in opened:
        client.close()


def test_cayenne_lpp_frames_from_pycayennelpp_over_mqtt(server: FerriteServer, device_client):
    name = unique_name("lpp")
    create_profile(server, f"name: {name}\ncodec: {{ type: cayenne_lpp }}\n")
    device = create_device(server, name)
    frame = LppFrame()
    frame.add_temperature(3, 27.2)
    frame.add_humidity(2, 55.5)
    frame.add_gps(1, 42.3519, -87.9094, 10)
    client = device_client(server, device["token"])
    assert client.publish_bytes(TELEMETRY_TOPIC, bytes(frame), qos=1) == 0

    latest = server.wait_for_latest(
        device["id"],
        {
            "temperature_3": 27.2,
            "relative_humidity_2": 55.5,
            "gps_1.latitude": 42.3519,
            "gps_1.longitude": -87.9094,
            "gps_1.altitude": 10.0,
        },
    )
    assert set(latest) == {
        "temperature_3",
        "relative_humidity_2",
        "gps_1.latitude",
        "gps_1.longitude",
        "gps_1.altitude",
    }


def test_senml_cbor_from_cbor2_over_http_and_senml_json_over_mqtt(
    server: FerriteServer, device_client
):
    name = unique_name("senml")
    create_profile(server, f"name: {name}\ncodec: {{ type: senml }}\nkeys: {{ temp: {{ unit: Cel }} }}\n")
    device = create_device(server, name)

    # RFC 8428 section 6 labels: bn -2, bt -3, n 0, u 1, v 2, t 6.
    pack = [
        {-2: "urn:dev:ow:10e2073a01080063:", -3: 1_700_000_000, 0: "temp", 1: "Cel", 2: 21.5},
        {0: "temp", 1: "K", 2: 295.15, 6: 10},
    ]
    response = server.api.post(
        f"{server.http_url}/api/v1/{device['token']}/telemetry",
        data=cbor2.dumps(pack),
        headers={"Content-Type": "application/senml+cbor"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    server.wait_for_latest(device["id"], {"temp": 22.0}, timestamps={"temp": 1_700_000_010_000})

    # SenML JSON over MQTT: the profile's codec tells the format.
    client = device_client(server, device["token"])
    records = [{"bt": 1_700_000_020, "n": "temp", "u": "Cel", "v": 19.0}]
    assert client.publish(TELEMETRY_TOPIC, records, qos=1) == 0
    server.wait_for_latest(device["id"], {"temp": 19.0}, timestamps={"temp": 1_700_000_020_000})


def test_schema_violations_reach_the_dead_letter_log_with_the_reason(
    server: FerriteServer, device_client
):
    name = unique_name("strict")
    create_profile(
        server,
        f"name: {name}\nkeys: {{ level: {{ type: number, min: 0, max: 100, required: true }} }}\nunknown_keys: reject\n",
    )
    device = create_device(server, name)
    client = device_client(server, device["token"])
    # Both are valid JSON, so MQTT acknowledges them; the profile rejects them.
    assert client.publish(TELEMETRY_TOPIC, {"level": 150}, qos=1) == 0
    assert client.publish(TELEMETRY_TOPIC, {"level": 50, "extra": 1}, qos=1) == 0
    assert client.publish(TELEMETRY_TOPIC, {"level": 42}, qos=1) == 0

    path = f"/api/v1/devices/{device['id']}/dead-letters"

    def two_letters() -> bool:
        return len(server.get(path).json()["dead_letters"]) == 2

    wait_until(two_letters, "two dead letters", STORE_TIMEOUT_S)
    reasons = [letter["reason"] for letter in server.get(path).json()["dead_letters"]]
    assert 'key "extra" is not in the schema' in reasons[0]
    assert "above the maximum 100" in reasons[1]
    server.wait_for_latest(device["id"], {"level": 42})
