"""InfluxDB line protocol writes from the InfluxDB 2.x Python client
(`influxdb-client`) and from 1.x-style HTTP requests.

The client cannot add the `device_tag` query parameter, so its points name
their device with the default tag `device`. The server creates a device on
its first write. `org` and `bucket` are required by the client and ignored
by the server.
"""

from __future__ import annotations

import pytest
import requests
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from harness import FerriteServer, now_ms, same_value, unique_name


def write(server: FerriteServer, token: str, records) -> None:
    with InfluxDBClient(url=server.http_url, token=token, org="any", timeout=10_000) as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="any", record=records)


def test_point_ms_creates_device(server: FerriteServer) -> None:
    name = unique_name("truck")
    ts = now_ms() - 2000
    point = Point("readings").tag("device", name).tag("fleet", "north").field("velocity", 42.0).time(ts, WritePrecision.MS)

    write(server, server.operator_key, point)

    device = server.wait_for_device(name)
    server.wait_for_latest(device["id"], {"readings.velocity": 42.0}, {"readings.velocity": ts})


def test_field_types_stored(server: FerriteServer) -> None:
    name = unique_name("sensor")
    ts = now_ms() - 2000
    point = (
        Point("state")
        .tag("device", name)
        .field("count", 7)
        .field("ratio", 0.25)
        .field("armed", True)
        .field("label", "zone a")
        .time(ts, WritePrecision.MS)
    )

    write(server, server.operator_key, point)

    device = server.wait_for_device(name)
    latest = server.wait_for_latest(
        device["id"], {"state.count": 7, "state.ratio": 0.25, "state.armed": True, "state.label": "zone a"}
    )
    assert all(latest[key]["ts"] == ts for key in latest)


def test_batch_of_points_stored(server: FerriteServer) -> None:
    names = [unique_name("meter"), unique_name("meter")]
    start = now_ms() - 600_000
    counts = {names[0]: 300, names[1]: 200}
    points = [
        Point("energy").tag("device", name).field("kwh", float(i)).time(start + i * 1000, WritePrecision.MS)
        for name, count in counts.items()
        for i in range(count)
    ]

    write(server, server.operator_key, points)

    for name, count in counts.items():
        device = server.wait_for_device(name)
        stored = server.wait_for_point_count(device["id"], "energy.kwh", start, start + 600_000, count)
        assert len(stored) == count
        assert [point["ts"] for point in stored] == [start + i * 1000 for i in range(count)]
        assert all(same_value(point["value"], float(i)) for i, point in enumerate(stored))


def test_precision_ns_and_s(server: FerriteServer) -> None:
    name = unique_name("probe")
    ts_s = now_ms() // 1000 - 30
    points = [
        Point("probe").tag("device", name).field("fine", 1.5).time(ts_s * 1_000_000_000 + 123_456_789, WritePrecision.NS),
        Point("probe").tag("device", name).field("coarse", 2.5).time(ts_s - 1, WritePrecision.S),
    ]

    write(server, server.operator_key, points)

    device = server.wait_for_device(name)
    server.wait_for_latest(
        device["id"],
        {"probe.fine": 1.5, "probe.coarse": 2.5},
        {"probe.fine": ts_s * 1000 + 123, "probe.coarse": (ts_s - 1) * 1000},
    )


def test_device_token_writes_own_device(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 2000
    # A device token ignores the device tag: every line goes to its own device.
    point = Point("own").tag("device", "some-other-name").field("value", 3.0).time(ts, WritePrecision.MS)

    write(server, device.token, point)

    server.wait_for_latest(device.id, {"own.value": 3.0}, {"own.value": ts})
    assert server.device_by_name("some-other-name") is None


def test_viewer_key_forbidden(server: FerriteServer) -> None:
    viewer_key = server.create_api_key("viewer")
    name = unique_name("blocked")

    with pytest.raises(ApiException) as raised:
        write(server, viewer_key, Point("m").tag("device", name).field("v", 1.0))

    assert raised.value.status == 403
    assert server.device_by_name(name) is None


def test_unknown_token_unauthorized(server: FerriteServer) -> None:
    with pytest.raises(ApiException) as raised:
        write(server, "not-a-real-token", Point("m").tag("device", unique_name("x")).field("v", 1.0))

    assert raised.value.status == 401


# --- InfluxDB 1.x style ----------------------------------------------------


def test_v1_write_p_parameter_device_token(server: FerriteServer) -> None:
    device = server.create_device()
    ts_s = now_ms() // 1000 - 5

    response = requests.post(
        f"{server.http_url}/write?db=x&precision=s&p={device.token}",
        data=f"cpu,host=a usage=12.5 {ts_s}\ncpu,host=a idle=80i {ts_s}\n",
        timeout=10,
    )

    assert response.status_code == 204, response.text
    server.wait_for_latest(device.id, {"cpu.usage": 12.5, "cpu.idle": 80}, {"cpu.usage": ts_s * 1000})


def test_v1_write_basic_auth_api_key(server: FerriteServer) -> None:
    name = unique_name("host")
    ts_s = now_ms() // 1000 - 5

    response = requests.post(
        f"{server.http_url}/write",
        params={"db": "x", "precision": "s", "u": "any"},
        data=f"mem,device={name} used=1024i {ts_s}\n",
        auth=("any", server.operator_key),
        timeout=10,
    )

    assert response.status_code == 204, response.text
    device = server.wait_for_device(name)
    server.wait_for_latest(device["id"], {"mem.used": 1024}, {"mem.used": ts_s * 1000})


def test_v1_write_wrong_p_unauthorized(server: FerriteServer) -> None:
    response = requests.post(f"{server.http_url}/write?db=x&precision=s&p=wrong", data="cpu usage=1", timeout=10)

    assert response.status_code == 401, response.text
