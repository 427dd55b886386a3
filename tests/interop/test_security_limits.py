"""Rate limits and resource limits seen by third-party clients: paho-mqtt
(MQTT 5 reason codes), mosquitto_pub (MQTT 3.1.1), httpx and requests
(HTTP 429 with Retry-After) and aiocoap (CoAP 4.29 with Max-Age).

Each test starts its own server with small `[limits]` values through
`FERRITE_LIMITS_*` variables, goes over one limit, and checks the response,
that nothing acknowledged was lost, and that the server still serves a
fresh device afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
import requests

from harness import FerriteServer, ferrite_binary, now_ms
from paho_device import PahoDevice, wait_until

MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
CONNECTION_RATE_EXCEEDED = 0x9F
TOPIC_NAME_INVALID = 0x90
PACKET_TOO_LARGE = 0x95
TELEMETRY = "v1/devices/me/telemetry"


@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[Callable[..., FerriteServer]]:
    """Start servers with the given `FERRITE_*` settings through the
    returned function; each is stopped at teardown and must exit cleanly."""
    started: list[FerriteServer] = []

    def start(**settings: str) -> FerriteServer:
        base = tmp_path / f"server-{len(started)}"
        env = {f"FERRITE_LIMITS_{name.upper()}": value for name, value in settings.items()}
        instance = FerriteServer(ferrite_binary(), base / "data", base / "ferrite.log", settings=env)
        started.append(instance)
        instance.start()
        return instance

    yield start
    for instance in started:
        exit_code = instance.stop()
        assert "panicked" not in instance.log_text(), instance.log_tail()
        assert exit_code == 0, f"exit code {exit_code}:\n{instance.log_tail()}"


@pytest.fixture
def paho_clients():
    """Open `PahoDevice`s through the returned function and close them at
    teardown."""
    opened: list[PahoDevice] = []

    def open_client(*args, **kwargs) -> PahoDevice:
        client = PahoDevice(*args, **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def metric(server: FerriteServer, line_start: str) -> float:
    text = requests.get(f"{server.http_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_healthy(server: FerriteServer) -> None:
    """Check that the server responds to /healthz and stores telemetry of a fresh device."""
    assert requests.get(f"{server.http_url}/healthz", timeout=10).status_code == 200
    device = server.create_device("after-attack")
    response = requests.post(f"{server.http_url}/api/v1/{device.token}/telemetry", json={"after": 1}, timeout=10)
    assert response.status_code == 200, response.text
    server.wait_for_latest(device.id, {"after": 1})


# --- MQTT ------------------------------------------------------------------


def test_paho_v5_sees_quota_exceeded(limited_server, paho_clients) -> None:
    server = limited_server(device_messages_per_second="1", device_message_burst="3")
    device = server.create_device("paho-fast")
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    infos = [client.client.publish(TELEMETRY, json.dumps({"n": n}), qos=1) for n in range(6)]
    wait_until(lambda: all(info.mid in client.pubacks for info in infos), "six PUBACKs")
    codes = [client.pubacks[info.mid].value for info in infos]

    assert codes.count(0) >= 3, codes
    assert QUOTA_EXCEEDED in codes, codes
    assert client.pubacks[infos[-1].mid].getName() == "Quota exceeded"
    # Exactly the acknowledged messages were stored.
    stored = [n for n, code in enumerate(codes) if code == 0]
    points = server.wait_for_point_count(device.id, "n", 0, now_ms() + 60_000, len(stored))
    assert sorted(point["value"] for point in points) == stored
    assert metric(server, 'ferrite_rate_limited_total{protocol="mqtt",limit="device_messages"}') >= 1
    assert_healthy(server)


def test_paho_v5_that_keeps_going_is_disconnected(limited_server, paho_clients) -> None:
    server = limited_server(
        device_messages_per_second="1", device_message_burst="1", mqtt_rate_limited_before_disconnect="5"
    )
    device = server.create_device("paho-flood")
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    for n in range(30):
        client.client.publish(TELEMETRY, json.dumps({"n": n}), qos=1)

    reason = client.wait_disconnected()
    assert reason.value == MESSAGE_RATE_TOO_HIGH, reason
    assert reason.getName() == "Message rate too high"
    assert_healthy(server)


def test_mosquitto_pub_311_is_slowed_without_loss(limited_server, tmp_path: Path) -> None:
    server = limited_server(device_messages_per_second="5", device_message_burst="5")
    device = server.create_device("mosquitto-slowed")
    lines = tmp_path / "lines.txt"
    count = 20
    lines.write_text("".join(json.dumps({"seq": n}) + "\n" for n in range(count)))

    started = time.monotonic()
    with open(lines, "rb") as stdin:
        result = subprocess.run(
            [shutil.which("mosquitto_pub") or "mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.mqtt_port),
             "-V", "mqttv311", "-q", "1", "-u", device.token, "-t", TELEMETRY, "-l"],
            stdin=stdin, capture_output=True, timeout=60, check=False,
        )
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # 15 messages beyond the burst at 5 per second cannot finish sooner.
    assert elapsed >= 2.5, f"finished in {elapsed:.1f} s"
    points = server.wait_for_point_count(device.id, "seq", 0, now_ms() + 60_000, count)
    assert sorted(point["value"] for point in points) == list(range(count))
    assert_healthy(server)


def test_limited_device_does_not_slow_another(limited_server, paho_clients) -> None:
    server = limited_server(device_messages_per_second="2", device_message_burst="5")
    noisy_device = server.create_device("noisy")
    quiet_device = server.create_device("quiet")
    noisy = paho_clients(server, noisy_device.token, mqtt.MQTTv5)
    quiet = paho_clients(server, quiet_device.token, mqtt.MQTTv5)
    noisy.connect_ok()
    quiet.connect_ok()

    # QoS 0 flood: dropped beyond the rate, never acknowledged.
    for n in range(300):
        noisy.client.publish(TELEMETRY, json.dumps({"noise": n}), qos=0)
    codes = [quiet.publish(TELEMETRY, {"quiet": n}, qos=1).value for n in range(5)]

    assert codes == [0, 0, 0, 0, 0]
    server.wait_for_latest(quiet_device.id, {"quiet": 4})
    assert metric(server, 'ferrite_rate_limited_total{protocol="mqtt",limit="device_messages"}') >= 1
    assert_healthy(server)


def test_connections_per_address_get_connection_rate_exceeded(limited_server, paho_clients) -> None:
    server = limited_server(connections_per_address="2")
    device = server.create_device("crowd")
    first = paho_clients(server, device.token, mqtt.MQTTv5)
    second = paho_clients(server, device.token, mqtt.MQTTv5)
    first.connect_ok()
    second.connect_ok()

    third = paho_clients(server, device.token, mqtt.MQTTv5)
    reason, _ = third.connect()
    assert reason.value == CONNECTION_RATE_EXCEEDED, reason
    result = subprocess.run(
        [shutil.which("mosquitto_sub") or "mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.mqtt_port),
         "-V", "mqttv311", "-u", device.token, "-t", "v1/devices/me/attributes", "-C", "1", "-W", "5"],
        capture_output=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert b"unavailable" in result.stderr.lower(), result.stderr
    assert metric(server, 'ferrite_connections_refused_total{protocol="mqtt",reason="connections_per_address"}') >= 2


def test_subscriptions_and_topic_levels_are_bounded(limited_server, paho_clients) -> None:
    server = limited_server(max_subscriptions_per_client="2", max_topic_levels="8")
    device = server.create_device("subscriber")
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    codes = client.subscribe([("v1/devices/me/attributes", 1), ("v1/devices/me/rpc/request/+", 1), ("v1/devices/me/x", 1)])
    assert [code.value for code in codes] == [1, 1, QUOTA_EXCEEDED]

    reason = client.publish("v1/devices/me/a/b/c/d/e/f", {"deep": 1}, qos=1)
    assert reason.value == TOPIC_NAME_INVALID, reason
    assert_healthy(server)


def test_oversized_payload_gets_packet_too_large(limited_server, paho_clients) -> None:
    server = limited_server()
    device = server.create_device("large")
    client = paho_clients(server, device.token, mqtt.MQTTv5)
    client.connect_ok()

    client.client.publish(TELEMETRY, b"x" * (300 * 1024), qos=1)
    assert client.wait_disconnected().value == PACKET_TOO_LARGE
    assert_healthy(server)


# --- HTTP ------------------------------------------------------------------


def test_httpx_sees_429_with_retry_after(limited_server) -> None:
    server = limited_server(tenant_messages_per_second="1", tenant_message_burst="3")
    devices = [server.create_device(f"tenant-{n}") for n in range(2)]

    with httpx.Client(base_url=server.http_url, timeout=10, trust_env=False) as http:
        statuses = [
            http.post(f"/api/v1/{devices[n % 2].token}/telemetry", json={"t": n}).status_code for n in range(3)
        ]
        limited = http.post(f"/api/v1/{devices[1].token}/telemetry", json={"t": 99})

        assert statuses == [200, 200, 200]
        assert limited.status_code == 429
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 2
        problem = limited.json()
        assert problem["limit"] == "limits.tenant_messages_per_second"
        assert problem["limit_value"] == 1
        assert problem["status"] == 429

        time.sleep(retry_after)
        assert http.post(f"/api/v1/{devices[0].token}/telemetry", json={"t": 100}).status_code == 200
    assert metric(server, 'ferrite_rate_limited_total{protocol="http",limit="tenant_messages"}') == 1


def test_requests_api_key_rate_gets_429(limited_server) -> None:
    server = limited_server(api_requests_per_second="1", api_request_burst="2")
    key = server.create_api_key("viewer")
    headers = {"Authorization": f"Bearer {key}"}

    statuses = [requests.get(f"{server.http_url}/api/v1/devices", headers=headers, timeout=10).status_code for _ in range(3)]

    assert statuses[:2] == [200, 200]
    assert statuses[2] == 429
    response = requests.get(f"{server.http_url}/api/v1/devices", headers=headers, timeout=10)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["limit"] == "limits.api_requests_per_second"
    # The admin session is another credential.
    assert server.get("/api/v1/devices").status_code == 200


def test_oversized_body_gets_413(limited_server) -> None:
    server = limited_server()
    device = server.create_device("big-body")
    body = json.dumps({"text": "x" * (300 * 1024)})

    response = requests.post(f"{server.http_url}/api/v1/{device.token}/telemetry", data=body, timeout=10)

    assert response.status_code == 413
    assert "http.max_body_bytes" in response.json()["detail"]
    assert_healthy(server)


# --- CoAP ------------------------------------------------------------------


def test_aiocoap_sees_too_many_requests(limited_server) -> None:
    import aiocoap
    from aiocoap.numbers.codes import Code

    server = limited_server(device_messages_per_second="1", device_message_burst="2")
    device = server.create_device("coap-fast")
    uri = f"coap://127.0.0.1:{server.coap_port}/api/v1/{device.token}/telemetry"

    async def post_three() -> list[aiocoap.Message]:
        context = await aiocoap.Context.create_client_context()
        try:
            responses = []
            for n in range(3):
                request = aiocoap.Message(code=Code.POST, uri=uri, payload=json.dumps({"c": n}).encode())
                request.opt.content_format = 50
                responses.append(await asyncio.wait_for(context.request(request).response, 30))
            return responses
        finally:
            await context.shutdown()

    responses = asyncio.run(post_three())

    assert [response.code for response in responses] == [Code.CHANGED, Code.CHANGED, Code.TOO_MANY_REQUESTS]
    assert responses[2].opt.max_age is not None and responses[2].opt.max_age >= 1
    assert b"limits.device_messages_per_second" in responses[2].payload
    server.wait_for_latest(device.id, {"c": 1})
    assert metric(server, 'ferrite_rate_limited_total{protocol="coap",limit="device_messages"}') == 1
    assert_healthy(server)
