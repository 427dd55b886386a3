"""Live streams with third-party clients: the `websockets` library on
`/api/v1/live/ws` and `httpx-sse` on `/api/v1/live/sse`, fed by telemetry
sent with paho-mqtt and requests."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt
import paho.mqtt.client as mqtt
import pytest
import requests
from httpx_sse import connect_sse
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness import Device, FerriteServer
from paho_device import PahoDevice

RECEIVE_TIMEOUT_S = 10.0


def ws_url(server: FerriteServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.http_port}/api/v1/live/ws{query}"


def sse_url(server: FerriteServer) -> str:
    return f"{server.http_url}/api/v1/live/sse"


def admin_token(server: FerriteServer) -> str:
    return server.api.headers["Authorization"].removeprefix("Bearer ")


@contextmanager
def websocket(server: FerriteServer, query: str = "", token: str | None = None) -> Iterator[ClientConnection]:
    headers = {"Authorization": f"Bearer {token or admin_token(server)}"}
    with connect(ws_url(server, query), additional_headers=headers, proxy=None, open_timeout=10) as client:
        yield client


def next_message(client: ClientConnection) -> dict[str, Any]:
    return json.loads(client.recv(timeout=RECEIVE_TIMEOUT_S))


def post_telemetry(server: FerriteServer, device: Device, body: dict[str, Any]) -> None:
    response = requests.post(f"{server.http_url}/api/v1/{device.token}/telemetry", json=body, timeout=10)
    assert response.status_code == 200, response.text


def point_keys(message: dict[str, Any]) -> list[str]:
    return [point["key"] for point in message["points"]]


def other_tenant_token(server: FerriteServer) -> str:
    """A valid access token of a tenant that is not the server's, signed
    with the server's own key."""
    key = (server.data_dir / "jwt.key").read_bytes()
    now = int(time.time())
    claims = {
        "iss": "ferrite",
        "aud": "ferrite-api",
        "sub": str(uuid.uuid4()),
        "jti": str(uuid.uuid4()),
        "tenant": str(uuid.uuid4()),
        "role": "admin",
        "kind": "user",
        "iat": now,
        "exp": now + 600,
    }
    return jwt.encode(claims, key, algorithm="HS256", headers={"typ": "at+jwt"})


@pytest.mark.parametrize(
    ("token", "status"),
    [(None, 401), ("fak_not-a-key", 401), ("not.a.jwt", 401), ("device", 403)],
)
def test_credentials_rejected(server: FerriteServer, token: str | None, status: int) -> None:
    if token == "device":
        token = server.create_device("live-auth").token
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    with pytest.raises(InvalidStatus) as rejected:
        with connect(ws_url(server), additional_headers=headers, proxy=None):
            pass
    assert rejected.value.response.status_code == status

    response = requests.get(sse_url(server), headers=headers, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/problem+json"


def test_bad_filter_rejected_before_upgrade(server: FerriteServer) -> None:
    headers = {"Authorization": f"Bearer {admin_token(server)}"}
    with pytest.raises(InvalidStatus) as rejected:
        with connect(ws_url(server, "?key=te*mp"), additional_headers=headers, proxy=None):
            pass
    assert rejected.value.response.status_code == 400

    response = requests.get(sse_url(server), params={"device": "pump-1"}, headers=headers, timeout=10)
    assert response.status_code == 400
    assert response.json()["param"] == "device"


def test_mqtt_publish_reaches_websocket(server: FerriteServer) -> None:
    device = server.create_device("live-mqtt")
    with websocket(server) as client:
        publisher = PahoDevice(server, device.token, mqtt.MQTTv311)
        publisher.connect_ok()
        try:
            assert publisher.publish("v1/devices/me/telemetry", {"temperature": 21.5, "state": "on"}, qos=1) == 0
        finally:
            publisher.close()

        message = next_message(client)
    assert message["type"] == "telemetry"
    assert message["device_id"] == device.id
    assert message["device_name"] == device.name
    values = {point["key"]: point["value"] for point in message["points"]}
    assert values == {"temperature": 21.5, "state": "on"}


def test_access_token_in_query(server: FerriteServer) -> None:
    """Browsers cannot set headers on a WebSocket, so the token may come in
    the query string."""
    device = server.create_device("live-query")
    with connect(ws_url(server, f"?access_token={admin_token(server)}"), proxy=None) as client:
        post_telemetry(server, device, {"temperature": 3})
        assert next_message(client)["device_id"] == device.id


def test_sse_filters_by_device_and_key(server: FerriteServer) -> None:
    wanted = server.create_device("live-wanted")
    other = server.create_device("live-other")
    headers = {"Authorization": f"Bearer {admin_token(server)}"}
    params = {"device": wanted.id, "key": "temp*"}
    with httpx.Client(timeout=RECEIVE_TIMEOUT_S, trust_env=False) as http:
        with connect_sse(http, "GET", sse_url(server), params=params, headers=headers) as source:
            assert source.response.status_code == 200
            post_telemetry(server, other, {"temperature": 1})
            post_telemetry(server, wanted, {"humidity": 40})
            post_telemetry(server, wanted, {"humidity": 41, "temperature": 22})

            event = next(source.iter_sse())
    assert event.event == "telemetry"
    assert event.id == "1"
    message = event.json()
    assert message["device_id"] == wanted.id
    assert point_keys(message) == ["temperature"]


def test_other_tenant_sees_nothing(server: FerriteServer) -> None:
    device = server.create_device("live-tenant")
    with websocket(server, token=other_tenant_token(server)) as foreign, websocket(server) as own:
        post_telemetry(server, device, {"temperature": 20})
        # Every stream gets an event at the same moment, so once the own
        # tenant's stream has it the other has had its chance too.
        assert next_message(own)["device_id"] == device.id
        with pytest.raises(TimeoutError):
            foreign.recv(timeout=0.5)


def test_subscribe_message_changes_filter(server: FerriteServer) -> None:
    first = server.create_device("live-first")
    second = server.create_device("live-second")
    with websocket(server, f"?device={first.id}") as client:
        client.send(json.dumps({"subscribe": {"device": second.id, "key": "t*"}}))
        reply = next_message(client)
        assert reply["type"] == "subscribed"
        assert reply["filter"]["device"] == [second.id]
        assert reply["filter"]["key"] == ["t*"]

        client.send(json.dumps({"subscribe": {"events": "metrics"}}))
        error = next_message(client)
        assert error["type"] == "error"
        assert error["param"] == "events"

        post_telemetry(server, first, {"temperature": 1})
        post_telemetry(server, second, {"temperature": 2, "humidity": 3})
        message = next_message(client)
    assert message["device_id"] == second.id
    assert point_keys(message) == ["temperature"]
