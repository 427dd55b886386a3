"""MQTT with the Mosquitto command line clients (`mosquitto_pub`, `mosquitto_sub`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest

from harness import FerriteServer

CLIENT_TIMEOUT_S = 20
VERSIONS = ["mqttv311", "mqttv5"]


def mosquitto(tool: str, server: FerriteServer, token: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a Mosquitto client against the test server and return the result."""
    executable = shutil.which(tool)
    if executable is None:
        pytest.fail(f"{tool} not found: install the mosquitto-clients package (.ci/install-deps)", pytrace=False)
    return subprocess.run(
        [executable, "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-u", token, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("style", ["me", "id"])
def test_pub_stored(server: FerriteServer, version: str, style: str) -> None:
    device = server.create_device()
    topic = "v1/devices/me/telemetry" if style == "me" else f"devices/{device.id}/telemetry"

    result = mosquitto("mosquitto_pub", server, device.token, "-V", version, "-q", "1", "-t", topic, "-m", '{"t":1}')

    assert result.returncode == 0, result.stderr
    server.wait_for_latest(device.id, {"t": 1})


@pytest.mark.parametrize("version", VERSIONS)
def test_pub_lines_from_stdin(server: FerriteServer, version: str) -> None:
    device = server.create_device()
    lines = "".join(json.dumps({"seq": i}) + "\n" for i in range(1, 51))

    result = mosquitto(
        "mosquitto_pub", server, device.token, "-V", version, "-q", "1", "-t", "v1/devices/me/telemetry", "-l", stdin=lines
    )

    assert result.returncode == 0, result.stderr
    server.wait_for_latest(device.id, {"seq": 50})


@pytest.mark.parametrize("version", VERSIONS)
def test_pub_wrong_token_fails(server: FerriteServer, version: str) -> None:
    result = mosquitto(
        "mosquitto_pub", server, "wrong-token", "-V", version, "-q", "1", "-t", "v1/devices/me/telemetry", "-m", '{"t":1}'
    )

    assert result.returncode != 0, result.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_sub_receives_own_topic(server: FerriteServer, version: str) -> None:
    device = server.create_device()
    topic = "v1/devices/me/attributes"
    executable = shutil.which("mosquitto_sub")
    if executable is None:
        pytest.fail("mosquitto_sub not found: install the mosquitto-clients package (.ci/install-deps)", pytrace=False)
    # -C 1 makes mosquitto_sub exit after one message, and -W after that many seconds without one.
    subscriber = subprocess.Popen(
        [
            executable, "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-u", device.token,
            "-V", version, "-q", "1", "-t", topic, "-C", "1", "-W", str(CLIENT_TIMEOUT_S), "-v",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # mosquitto_sub prints nothing once it has subscribed. Publishing
        # until it exits keeps a publish sent before its SUBACK from failing the test.
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while subscriber.poll() is None and time.monotonic() < deadline:
            published = mosquitto("mosquitto_pub", server, device.token, "-V", version, "-q", "1", "-t", topic, "-m", '{"mode":"eco"}')
            assert published.returncode == 0, published.stderr
            time.sleep(0.2)
        stdout, stderr = subscriber.communicate(timeout=CLIENT_TIMEOUT_S)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()

    assert subscriber.returncode == 0, stderr
    assert stdout.strip() == f'{topic} {{"mode":"eco"}}'


def test_pub_other_device_mqtt311_connection_lost(server: FerriteServer) -> None:
    device = server.create_device()
    other = server.create_device()

    result = mosquitto(
        "mosquitto_pub", server, device.token, "-V", "mqttv311", "-q", "1", "-t", f"devices/{other.id}/telemetry", "-m", '{"t":1}'
    )

    # The server closes a 3.1.1 connection that publishes outside its namespace.
    assert result.returncode != 0, result.stderr
    assert set(server.latest_after_marker(other)) == {"marker"}


def test_pub_other_device_mqtt5_not_authorized(server: FerriteServer) -> None:
    device = server.create_device()
    other = server.create_device()

    result = mosquitto(
        "mosquitto_pub", server, device.token, "-V", "mqttv5", "-q", "1", "-t", f"devices/{other.id}/telemetry", "-m", '{"t":1}'
    )

    # mosquitto_pub reports a failed PUBACK on stderr but exits with 0.
    assert "Not authorized" in result.stderr
    assert set(server.latest_after_marker(other)) == {"marker"}


def test_pub_invalid_json_mqtt5(server: FerriteServer) -> None:
    device = server.create_device()

    result = mosquitto(
        "mosquitto_pub", server, device.token, "-V", "mqttv5", "-q", "1", "-t", "v1/devices/me/telemetry", "-m", '{"t":'
    )

    assert "Payload format invalid" in result.stderr
    assert set(server.latest_after_marker(device)) == {"marker"}
