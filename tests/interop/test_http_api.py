"""HTTP ingest and the REST query API, driven with `requests`."""

from __future__ import annotations

import gzip
import json

import pytest
import requests

from harness import FerriteServer, now_ms, same_value, unique_name

MAX_BODY_BYTES = 256 * 1024
HOUR_MS = 3_600_000


def assert_problem(response: requests.Response, status: int, param: str | None = None) -> dict:
    """Check that `response` is an RFC 9457 problem with `status` and return it."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert problem["detail"]
    if param is not None:
        assert problem.get("param") == param, problem
    return problem


def post_json(server: FerriteServer, path: str, body: object, **kwargs) -> requests.Response:
    return requests.post(f"{server.http_url}{path}", data=json.dumps(body), timeout=10, **kwargs)


# --- JSON telemetry --------------------------------------------------------


def test_token_path_json_stored(server: FerriteServer) -> None:
    device = server.create_device()

    response = post_json(server, f"/api/v1/{device.token}/telemetry", {"temperature": 21.5, "door": "open"})

    assert response.status_code == 200, response.text
    server.wait_for_latest(device.id, {"temperature": 21.5, "door": "open"})


@pytest.mark.parametrize(
    ("payload", "expected", "timestamps"),
    [
        pytest.param({"ts": 1_700_000_000_123, "values": {"rpm": 900}}, {"rpm": 900}, {"rpm": 1_700_000_000_123}, id="ts-values"),
        pytest.param(
            [{"ts": 1_700_000_000_000, "values": {"a": 1}}, {"ts": 1_700_000_001_000, "values": {"a": 2}}],
            {"a": 2},
            {"a": 1_700_000_001_000},
            id="array",
        ),
        pytest.param(
            {"engine": {"oil": {"pressure": 3.5}, "on": True}},
            {"engine.oil.pressure": 3.5, "engine.on": True},
            {},
            id="nested",
        ),
    ],
)
def test_token_path_payload_forms(server: FerriteServer, payload, expected, timestamps) -> None:
    device = server.create_device()

    response = post_json(server, f"/api/v1/{device.token}/telemetry", payload)

    assert response.status_code == 200, response.text
    server.wait_for_latest(device.id, expected, timestamps)


def test_device_path_bearer_token(server: FerriteServer) -> None:
    device = server.create_device()

    response = post_json(
        server,
        f"/api/v1/devices/{device.id}/telemetry",
        {"humidity": 40},
        headers={"Authorization": f"Bearer {device.token}"},
    )

    assert response.status_code == 200, response.text
    server.wait_for_latest(device.id, {"humidity": 40})


def test_device_path_operator_key(server: FerriteServer) -> None:
    device = server.create_device()

    response = post_json(
        server,
        f"/api/v1/devices/{device.id}/telemetry",
        {"battery": 87},
        headers={"Authorization": f"Bearer {server.operator_key}"},
    )

    assert response.status_code == 200, response.text
    server.wait_for_latest(device.id, {"battery": 87})


def test_device_path_other_token_forbidden(server: FerriteServer) -> None:
    owner = server.create_device()
    intruder = server.create_device()

    response = post_json(
        server,
        f"/api/v1/devices/{owner.id}/telemetry",
        {"x": 1},
        headers={"Authorization": f"Bearer {intruder.token}"},
    )

    assert_problem(response, 403)
    assert set(server.latest_after_marker(owner)) == {"marker"}


def test_unknown_token_unauthorized(server: FerriteServer) -> None:
    response = post_json(server, "/api/v1/not-a-real-token/telemetry", {"x": 1})

    assert_problem(response, 401)


def test_malformed_json_rejected(server: FerriteServer) -> None:
    device = server.create_device()

    response = requests.post(
        f"{server.http_url}/api/v1/{device.token}/telemetry", data=b'{"temperature": 21.5,', timeout=10
    )

    assert_problem(response, 400)
    assert set(server.latest_after_marker(device)) == {"marker"}


def test_oversized_json_rejected(server: FerriteServer) -> None:
    device = server.create_device()
    body = json.dumps({"blob": "x" * (MAX_BODY_BYTES + 1)})

    response = requests.post(f"{server.http_url}/api/v1/{device.token}/telemetry", data=body, timeout=10)

    assert_problem(response, 413)
    assert set(server.latest_after_marker(device)) == {"marker"}


# --- line protocol ---------------------------------------------------------


def test_write_device_token(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 1000

    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms"},
        data=f"climate,room=kitchen temp=19.5,ok=true {ts}\n",
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )

    assert response.status_code == 204, response.text
    server.wait_for_latest(device.id, {"climate.temp": 19.5, "climate.ok": True}, {"climate.temp": ts})


def test_write_v2_gzip(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 1000
    body = "".join(f"power,phase=L{i} watts={i * 100}i {ts + i}\n" for i in range(1, 4))

    response = requests.post(
        f"{server.http_url}/api/v2/write",
        params={"org": "any", "bucket": "any", "precision": "ms"},
        data=gzip.compress(body.encode()),
        headers={"Authorization": f"Token {device.token}", "Content-Encoding": "gzip"},
        timeout=10,
    )

    assert response.status_code == 204, response.text
    server.wait_for_latest(device.id, {"power.watts": 300}, {"power.watts": ts + 3})


@pytest.mark.parametrize(("precision", "units_per_second"), [("ns", 10**9), ("us", 10**6), ("ms", 10**3), ("s", 1)])
def test_write_precision(server: FerriteServer, precision: str, units_per_second: int) -> None:
    device = server.create_device()
    ts_s = now_ms() // 1000 - 60

    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": precision},
        data=f"gauge level=7 {ts_s * units_per_second}",
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )

    assert response.status_code == 204, response.text
    server.wait_for_latest(device.id, {"gauge.level": 7.0}, {"gauge.level": ts_s * 1000})


def test_write_fleet_device_tag(server: FerriteServer) -> None:
    first = unique_name("pump")
    second = unique_name("pump")
    ts = now_ms() - 1000
    body = f"pump,name={first} flow=1.5 {ts}\npump,name={second} flow=2.5 {ts}\n"

    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms", "device_tag": "name"},
        data=body,
        headers={"Authorization": f"Token {server.operator_key}"},
        timeout=10,
    )

    assert response.status_code == 204, response.text
    server.wait_for_latest(server.wait_for_device(first)["id"], {"pump.flow": 1.5}, {"pump.flow": ts})
    server.wait_for_latest(server.wait_for_device(second)["id"], {"pump.flow": 2.5}, {"pump.flow": ts})


def test_write_fleet_missing_tag_rejected(server: FerriteServer) -> None:
    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms"},
        data="pump,name=no-device-tag flow=1",
        headers={"Authorization": f"Token {server.operator_key}"},
        timeout=10,
    )

    assert_problem(response, 400)


def test_write_invalid_line_rejects_batch(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 1000
    body = f"batch good=1 {ts}\nbatch good=2 {ts + 1}\nbatch this is not line protocol\n"

    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms"},
        data=body,
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )
    problem = assert_problem(response, 400)
    assert "line 3" in problem["detail"], problem

    # The rejected batch would be stored by the time a later write is.
    marker = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms"},
        data=f"marker seen=1 {ts}",
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )
    assert marker.status_code == 204, marker.text
    latest = server.wait_for_latest(device.id, {"marker.seen": 1})
    assert "batch.good" not in latest


def test_write_oversized_rejected(server: FerriteServer) -> None:
    device = server.create_device()
    line = "bulk value=1\n"
    body = line * (MAX_BODY_BYTES // len(line) + 1)

    response = requests.post(
        f"{server.http_url}/write",
        data=body,
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )

    assert_problem(response, 413)
    assert set(server.latest_after_marker(device)) == {"marker"}


def test_write_gzip_limit_after_decompression(server: FerriteServer) -> None:
    device = server.create_device()
    line = "bulk value=1\n"
    body = gzip.compress((line * (MAX_BODY_BYTES // len(line) + 1)).encode())
    assert len(body) < MAX_BODY_BYTES

    response = requests.post(
        f"{server.http_url}/write",
        data=body,
        headers={"Authorization": f"Token {device.token}", "Content-Encoding": "gzip"},
        timeout=10,
    )

    assert_problem(response, 413)
    assert set(server.latest_after_marker(device)) == {"marker"}


def test_write_without_credentials_unauthorized(server: FerriteServer) -> None:
    response = requests.post(f"{server.http_url}/write", data="m value=1", timeout=10)

    assert_problem(response, 401)
    assert response.headers.get("WWW-Authenticate") == "Bearer"


def test_write_bad_precision_names_param(server: FerriteServer) -> None:
    device = server.create_device()

    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "minutes"},
        data="m value=1",
        headers={"Authorization": f"Token {device.token}"},
        timeout=10,
    )

    assert_problem(response, 400, param="precision")


# --- query API -------------------------------------------------------------


def write_points(server: FerriteServer, token: str, lines: list[str]) -> None:
    response = requests.post(
        f"{server.http_url}/write",
        params={"precision": "ms"},
        data="\n".join(lines),
        headers={"Authorization": f"Token {token}"},
        timeout=10,
    )
    assert response.status_code == 204, response.text


def test_devices_list_shows_activity(server: FerriteServer) -> None:
    device = server.create_device()
    post_json(server, f"/api/v1/{device.token}/telemetry", {"alive": True}).raise_for_status()
    server.wait_for_latest(device.id, {"alive": True})

    listed = server.device_by_name(device.name)

    assert listed is not None
    assert listed["id"] == device.id
    assert listed["online"] is True
    assert isinstance(listed["last_seen_at"], int)
    assert abs(listed["last_seen_at"] - now_ms()) < 60_000


def test_devices_list_pages(server: FerriteServer) -> None:
    for _ in range(3):
        server.create_device("paged")

    first = server.get("/api/v1/devices", limit=2)
    assert first.status_code == 200, first.text
    page = first.json()
    assert len(page["devices"]) == 2
    assert page["next_offset"] == 2

    second = server.get("/api/v1/devices", limit=2, offset=page["next_offset"])
    assert second.status_code == 200, second.text
    first_ids = {device["id"] for device in page["devices"]}
    assert first_ids.isdisjoint(device["id"] for device in second.json()["devices"])


def test_query_latest(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 5000
    write_points(server, device.token, [f"env temp=20 {ts}", f"env temp=21 {ts + 1000}", f"env label=\"b\" {ts}"])

    latest = server.wait_for_latest(
        device.id, {"env.temp": 21, "env.label": "b"}, {"env.temp": ts + 1000, "env.label": ts}
    )

    assert set(latest) == {"env.temp", "env.label"}
    assert set(latest["env.temp"]) == {"ts", "value"}


def test_query_raw_link_paging(server: FerriteServer) -> None:
    device = server.create_device()
    start = now_ms() - 60_000
    write_points(server, device.token, [f"series n={i}i {start + i * 100}" for i in range(25)])
    server.wait_for_point_count(device.id, "series.n", start, start + 10_000, 25)

    url = f"{server.http_url}/api/v1/devices/{device.id}/telemetry"
    params: dict | None = {"keys": "series.n", "start": start, "end": start + 10_000, "limit": 10}
    pages = []
    while url:
        response = server.api.get(url, params=params, timeout=10)
        assert response.status_code == 200, response.text
        pages.append(response.json()["series.n"])
        next_link = response.links.get("next")
        if next_link:
            assert response.headers.get("Ferrite-Next-Cursor")
            url = requests.compat.urljoin(server.http_url, next_link["url"])
            params = None
        else:
            assert "Ferrite-Next-Cursor" not in response.headers
            url = None

    assert [len(page) for page in pages] == [10, 10, 5]
    points = [point for page in pages for point in page]
    assert [point["ts"] for point in points] == [start + i * 100 for i in range(25)]
    assert all(same_value(point["value"], i) for i, point in enumerate(points))


def test_query_range_is_half_open(server: FerriteServer) -> None:
    device = server.create_device()
    start = now_ms() - 60_000
    write_points(server, device.token, [f"edge v={i} {start + i * 1000}" for i in range(3)])
    server.wait_for_point_count(device.id, "edge.v", start, start + 3000, 3)

    response = server.get(f"/api/v1/devices/{device.id}/telemetry", keys="edge.v", start=start, end=start + 2000)

    assert response.status_code == 200, response.text
    assert [point["ts"] for point in response.json()["edge.v"]] == [start, start + 1000]


def test_query_hourly_average(server: FerriteServer) -> None:
    device = server.create_device()
    base = (now_ms() // HOUR_MS - 4) * HOUR_MS
    write_points(
        server,
        device.token,
        [
            f"load pct=10 {base + 60_000}",
            f"load pct=20 {base + 30 * 60_000}",
            f"load pct=30 {base + HOUR_MS + 5 * 60_000}",
        ],
    )
    server.wait_for_point_count(device.id, "load.pct", base, base + 3 * HOUR_MS, 3)

    response = server.get(
        f"/api/v1/devices/{device.id}/telemetry",
        keys="load.pct",
        start=base,
        end=base + 3 * HOUR_MS,
        interval="1h",
        agg="avg",
    )

    assert response.status_code == 200, response.text
    buckets = response.json()["load.pct"]
    assert [bucket["ts"] for bucket in buckets] == [base, base + HOUR_MS, base + 2 * HOUR_MS]
    assert [bucket["count"] for bucket in buckets] == [2, 1, 0]
    assert same_value(buckets[0]["value"], 15.0)
    assert same_value(buckets[1]["value"], 30.0)
    assert buckets[2]["value"] is None


@pytest.mark.parametrize(
    ("params", "param"),
    [
        pytest.param({"start": 2000, "end": 1000}, "start", id="start-after-end"),
        pytest.param({"start": "yesterday"}, "start", id="bad-start"),
        pytest.param({"interval": "1h", "agg": "median"}, "agg", id="bad-agg"),
        pytest.param({"interval": "1h"}, "agg", id="interval-without-agg"),
        pytest.param({"agg": "avg"}, "interval", id="agg-without-interval"),
        pytest.param({"limit": 0}, "limit", id="zero-limit"),
        pytest.param({"cursor": "not-a-cursor"}, "cursor", id="bad-cursor"),
    ],
)
def test_query_invalid_params(server: FerriteServer, params: dict, param: str) -> None:
    device = server.create_device()

    response = server.get(f"/api/v1/devices/{device.id}/telemetry", **params)

    assert_problem(response, 400, param=param)


def test_query_without_credentials_unauthorized(server: FerriteServer) -> None:
    device = server.create_device()

    response = requests.get(f"{server.http_url}/api/v1/devices/{device.id}/telemetry/latest", timeout=10)

    assert_problem(response, 401)
    assert response.headers.get("WWW-Authenticate") == "Bearer"


def test_query_unknown_device_not_found(server: FerriteServer) -> None:
    response = server.get("/api/v1/devices/00000000-0000-4000-8000-000000000000/telemetry/latest")

    assert_problem(response, 404)
