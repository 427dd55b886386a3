"""Acknowledged data survives a crash: after PUBACK or an HTTP success the
server is killed with SIGKILL (or stopped with SIGTERM), started again on
the same data directory, and every acknowledged point must be there."""

from __future__ import annotations

import json

import paho.mqtt.client as mqtt
import pytest
import requests

from harness import FerriteServer, now_ms
from paho_device import PahoDevice

POINTS = 50


def restart(server: FerriteServer, signal_name: str) -> None:
    if signal_name == "sigkill":
        server.kill()
    else:
        assert server.stop() == 0, server.log_tail()
    server.launch()


@pytest.mark.parametrize("signal_name", ["sigkill", "sigterm"])
@pytest.mark.parametrize("protocol", [pytest.param(mqtt.MQTTv311, id="mqtt311"), pytest.param(mqtt.MQTTv5, id="mqtt5")])
def test_mqtt_puback_survives_restart(own_server: FerriteServer, protocol: int, signal_name: str) -> None:
    device = own_server.create_device()
    start = now_ms() - 60_000
    client = PahoDevice(own_server, device.token, protocol)
    client.connect_ok()
    try:
        # Publish everything before waiting, so that acknowledgements and
        # appends overlap as they do under load.
        infos = [
            client.client.publish("v1/devices/me/telemetry", json.dumps({"ts": start + i, "values": {"seq": i}}), qos=1)
            for i in range(POINTS)
        ]
        for info in infos:
            info.wait_for_publish(timeout=5)
        acknowledged = [i for i, info in enumerate(infos) if info.mid in client.pubacks and client.pubacks[info.mid] == 0]
        assert len(acknowledged) == POINTS
    finally:
        client.client.loop_stop()

    restart(own_server, signal_name)

    points = own_server.wait_for_point_count(device.id, "seq", start, start + POINTS, POINTS)
    assert [point["ts"] for point in points] == [start + i for i in range(POINTS)]


@pytest.mark.parametrize("signal_name", ["sigkill", "sigterm"])
def test_http_write_survives_restart(own_server: FerriteServer, signal_name: str) -> None:
    device = own_server.create_device()
    start = now_ms() - 60_000
    for i in range(POINTS):
        response = requests.post(
            f"{own_server.http_url}/write",
            params={"precision": "ms"},
            data=f"batch seq={i}i {start + i}",
            headers={"Authorization": f"Token {device.token}"},
            timeout=10,
        )
        assert response.status_code == 204, response.text

    restart(own_server, signal_name)

    points = own_server.wait_for_point_count(device.id, "batch.seq", start, start + POINTS, POINTS)
    assert [point["value"] for point in points] == list(range(POINTS))
