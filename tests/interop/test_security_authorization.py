"""Authorization attacks with real clients: a device or application tries
to reach another device's data or commands, in the same tenant and from
another tenant, on every protocol. Each attempt must fail the expected way
(MQTT 5 PUBACK/SUBACK/CONNACK 0x87, a closed MQTT 3.1.1 connection, HTTP
401/403/404, CoAP 4.01/4.04) and leave the victim's data untouched, and the
server must stay healthy.

Also: revocation with real clients. A rotated token ends a paho MQTT
session, a mosquitto_sub subscription, a device WebSocket (close code 1008)
and a libcoap observation (4.01) at once.

Clients: paho-mqtt 2 (MQTT 3.1.1 and 5), mosquitto_pub and mosquitto_sub,
httpx, websockets, libcoap's coap-client-notls, and raw MQTT packets where a
client library refuses to send the attack (wildcards and U+0000 in a topic
name, a 65,535-byte topic).
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect

from harness import Device, FerriteServer, unique_name

WAIT_S = 10.0
QUIET_S = 0.7
# Maximum time from the revoking API call to the end of a connection.
END_WITHIN_S = 1.0
NOT_AUTHORIZED = 0x87


# --- the cast ---------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    id: str
    admin_key: str


def create_tenant(server: FerriteServer) -> Tenant:
    """Create a second tenant with an admin API key directly in the metadata
    database, because the command line creates keys only in the default
    tenant. The server reads both tables on every lookup."""
    key = "fak_" + secrets.token_hex(16)
    tenant_id = str(uuid.uuid4())
    with sqlite3.connect(server.data_dir / "metadata.db", timeout=10) as db:
        db.execute("INSERT INTO tenants (id, name, created_at) VALUES (?, ?, 0)", (tenant_id, unique_name("tenant")))
        db.execute(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, role, created_at) VALUES (?, ?, 'attacker', ?, 'admin', 0)",
            (str(uuid.uuid4()), tenant_id, hashlib.sha256(key.encode()).digest()),
        )
    return Tenant(id=tenant_id, admin_key=key)


def create_device_in(server: FerriteServer, tenant: Tenant) -> Device:
    name = unique_name("foreign")
    response = httpx.post(
        f"{server.http_url}/api/v1/devices",
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        json={"name": name},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    return Device(id=body["id"], name=name, token=body["token"])


@pytest.fixture(scope="module")
def cast(server: FerriteServer) -> dict[str, Any]:
    """The victim device, an attacking device of the same tenant, another
    tenant with its admin key and a device of its own."""
    tenant = create_tenant(server)
    return {
        "victim": server.create_device("victim"),
        "attacker": server.create_device("attacker"),
        "tenant": tenant,
        "foreign": create_device_in(server, tenant),
    }


def assert_untouched(server: FerriteServer, victim: Device) -> None:
    """The victim's latest values contain only what the victim itself
    stored: the `marker` of this check."""
    latest = server.latest_after_marker(victim)
    assert set(latest) == {"marker"}, f"the victim's data changed: {latest}"


def assert_healthy(server: FerriteServer) -> None:
    assert httpx.get(f"{server.http_url}/healthz", timeout=5).status_code == 200
    assert server.process is not None and server.process.poll() is None, "the server exited"


# --- paho client --------------------------------------------------------------


class Paho:
    """A paho-mqtt client that records PUBACK and SUBACK reason codes,
    received messages and the server's DISCONNECT."""

    def __init__(self, server: FerriteServer, user: str, protocol: int = mqtt.MQTTv5, *,
                 will: tuple[str, bytes] | None = None, password: str = "") -> None:
        self.protocol = protocol
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connack: int | None = None
        self.disconnect_reason: int | None = None
        self.pubacks: dict[int, int] = {}
        self.subacks: dict[int, list[int]] = {}
        self.acked = threading.Condition()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"attack-{uuid.uuid4().hex[:12]}", protocol=protocol
        )
        self.client.username_pw_set(user, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _client, _userdata, message: self.messages.put(message)
        self.client.connect("127.0.0.1", server.mqtt_port, keepalive=60)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK"

    def _on_connect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.connack = reason_code.value
        self.connected.set()

    def _on_disconnect(self, _client, _userdata, _flags, reason_code, _properties) -> None:
        self.disconnect_reason = reason_code.value
        self.disconnected.set()

    def _on_publish(self, _client, _userdata, mid, reason_code, _properties) -> None:
        with self.acked:
            self.pubacks[mid] = reason_code.value
            self.acked.notify_all()

    def _on_subscribe(self, _client, _userdata, mid, reason_codes, _properties) -> None:
        with self.acked:
            self.subacks[mid] = [code.value for code in reason_codes]
            self.acked.notify_all()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False,
                properties: Properties | None = None) -> int | None:
        """Publish with QoS 1; return the PUBACK reason code, or None when
        the server closed the connection instead."""
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        with self.acked:
            self.acked.wait_for(lambda: info.mid in self.pubacks or self.disconnected.is_set(), WAIT_S)
            return self.pubacks.get(info.mid)

    def subscribe(self, topic_filter: str) -> list[int] | None:
        """Subscribe with QoS 1; return the SUBACK reason codes, or None
        when the server closed the connection instead."""
        _result, mid = self.client.subscribe(topic_filter, 1)
        with self.acked:
            self.acked.wait_for(lambda: mid in self.subacks or self.disconnected.is_set(), WAIT_S)
            return self.subacks.get(mid)

    def quiet_messages(self) -> list[mqtt.MQTTMessage]:
        received = []
        try:
            while True:
                received.append(self.messages.get(timeout=QUIET_S))
        except queue.Empty:
            return received

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- raw MQTT 5 -----------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value % 128
        value //= 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mqtt_string(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def raw_connect(server: FerriteServer, token: str) -> socket.socket:
    """Open a raw MQTT 5 connection and read its CONNACK."""
    body = mqtt_string(b"MQTT") + bytes([5, 0x82]) + struct.pack(">H", 60) + b"\x00"
    body += mqtt_string(f"raw-{uuid.uuid4().hex[:10]}".encode()) + mqtt_string(token.encode())
    sock = socket.create_connection(("127.0.0.1", server.mqtt_port), timeout=WAIT_S)
    sock.sendall(b"\x10" + varint(len(body)) + body)
    connack = sock.recv(64)
    assert connack[:1] == b"\x20", connack.hex()
    assert connack[3] == 0, connack.hex()
    return sock


def raw_publish(sock: socket.socket, topic: bytes, payload: bytes = b'{"t":1}') -> bytes:
    """Send a QoS 1 PUBLISH and return what the server sends back (a
    PUBACK or a DISCONNECT), or b"" when it closed the connection."""
    body = mqtt_string(topic) + struct.pack(">H", 7) + b"\x00" + payload
    sock.sendall(b"\x32" + varint(len(body)) + body)
    try:
        return sock.recv(256)
    except (ConnectionResetError, TimeoutError):
        return b""


# --- MQTT: publishing into the victim's namespace ------------------------------------


def forbidden_topics(victim: Device, attacker: Device) -> list[str]:
    return [
        f"devices/{victim.id}/telemetry",
        f"devices/{victim.id.upper()}/telemetry",
        f"devices/{victim.id.replace('-', '')}/telemetry",
        f"devices/urn:uuid:{victim.id}/telemetry",
        f"v1/devices/{victim.id}/telemetry",
        f"v1/devices/{victim.name}/telemetry",
        f"devices/{victim.id}/attributes",
        f"devices/{victim.id}/rpc/response/1",
        f"devices/%7B{victim.id}%7D/telemetry",
        f"devices/{victim.id}%2Ftelemetry",
        f"devices/{victim.id}/../{attacker.id}/telemetry",
        f"/devices/{victim.id}/telemetry",
        f"$share/group/devices/{victim.id}/telemetry",
        f"apps/devices/{victim.id}/telemetry",
        "v1/devices/me",
        "telemetry",
    ]


def test_device_cannot_publish_to_victim_mqtt5(server: FerriteServer, cast) -> None:
    victim, attacker = cast["victim"], cast["attacker"]
    client = Paho(server, attacker.token)
    try:
        for topic in forbidden_topics(victim, attacker):
            code = client.publish(topic, '{"stolen":1}')
            if code is None:
                pytest.fail(f"the server closed the MQTT 5 connection on {topic!r} instead of PUBACK 0x87")
            assert code == NOT_AUTHORIZED, f"PUBACK {code:#x} for {topic!r}"
    finally:
        client.close()
    assert_untouched(server, victim)
    assert_healthy(server)


def test_dot_levels_stay_in_own_namespace(server: FerriteServer, cast) -> None:
    """MQTT topics have no path semantics: `..` levels after the own prefix
    stay in the own namespace. The server may take the message, but it
    never reaches the victim's subscribers or data."""
    victim, attacker = cast["victim"], cast["attacker"]
    owner = Paho(server, victim.token)
    intruder = Paho(server, attacker.token)
    try:
        codes = owner.subscribe("v1/devices/me/#")
        assert codes is not None and codes[0] < 0x80, codes
        for topic in (
            f"v1/devices/me/../../devices/{victim.id}/telemetry",
            f"v1/devices/me/../{victim.id}/attributes",
            f"devices/{attacker.id}/../{victim.id}/rpc/request/1",
        ):
            code = intruder.publish(topic, '{"stolen":1}')
            assert code is not None, f"the connection closed on {topic!r}"
        assert owner.quiet_messages() == []
    finally:
        owner.close()
        intruder.close()
    assert_untouched(server, victim)


def test_foreign_tenant_device_cannot_publish_to_victim(server: FerriteServer, cast) -> None:
    victim = cast["victim"]
    client = Paho(server, cast["foreign"].token)
    try:
        for topic in (f"devices/{victim.id}/telemetry", f"v1/devices/{victim.id}/telemetry"):
            assert client.publish(topic, '{"stolen":1}') == NOT_AUTHORIZED, topic
    finally:
        client.close()
    assert_untouched(server, victim)


@pytest.mark.parametrize("topic", ["devices/{victim}/telemetry", "v1/devices/{victim}/telemetry"])
def test_device_publish_to_victim_closes_mqtt311(server: FerriteServer, cast, topic: str) -> None:
    victim = cast["victim"]
    result = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-V", "mqttv311", "-q", "1",
         "-u", cast["attacker"].token, "-t", topic.format(victim=victim.id), "-m", '{"stolen":1}'],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0, "MQTT 3.1.1 publish to another device's topic succeeded"
    assert_untouched(server, victim)


def test_topic_alias_cannot_point_to_victim(server: FerriteServer, cast) -> None:
    """An alias set on a forbidden topic must not make a later publish with
    the alias alone reach it, and an alias of the own topic must not be
    redirected by a forbidden one."""
    victim = cast["victim"]
    client = Paho(server, cast["attacker"].token)
    try:
        alias = Properties(PacketTypes.PUBLISH)
        alias.TopicAlias = 1
        assert client.publish(f"devices/{victim.id}/telemetry", '{"stolen":1}', properties=alias) == NOT_AUTHORIZED
        assert client.publish("", '{"stolen":2}', properties=alias) == NOT_AUTHORIZED

        own = Properties(PacketTypes.PUBLISH)
        own.TopicAlias = 2
        assert client.publish("v1/devices/me/telemetry", '{"own":1}', properties=own) == 0
        assert client.publish(f"devices/{victim.id}/telemetry", '{"stolen":3}', properties=own) == NOT_AUTHORIZED
        assert client.publish("", '{"stolen":4}', properties=own) == NOT_AUTHORIZED
    finally:
        client.close()
    assert_untouched(server, victim)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param(b"devices/+/telemetry", id="plus"),
        pytest.param(b"devices/#", id="hash"),
        pytest.param(b"v1/devices/me/telemetry\x00devices/x/telemetry", id="nul"),
        pytest.param(b"devices/{victim}/" + b"a" * 65_000, id="very-long"),
    ],
)
def test_malformed_topic_names_end_connection(server: FerriteServer, cast, topic: bytes) -> None:
    victim = cast["victim"]
    topic = topic.replace(b"{victim}", victim.id.encode())
    sock = raw_connect(server, cast["attacker"].token)
    try:
        reply = raw_publish(sock, topic)
    finally:
        sock.close()
    # A PUBACK with a success code would mean that the server took it.
    if reply[:1] == b"\x40":
        assert reply[4] >= 0x80, f"PUBACK {reply.hex()} for a malformed topic"
    else:
        assert reply == b"" or reply[:1] == b"\xe0", f"unexpected reply {reply[:16].hex()}"
    assert_untouched(server, victim)
    assert_healthy(server)


# --- MQTT: subscribing to the victim's topics ------------------------------------------


def test_device_cannot_subscribe_to_victim(server: FerriteServer, cast) -> None:
    victim, attacker = cast["victim"], cast["attacker"]
    client = Paho(server, attacker.token)
    filters = [
        f"devices/{victim.id}/rpc/request/+",
        f"devices/{victim.id}/#",
        f"v1/devices/{victim.id}/rpc/request/+",
        "devices/+/rpc/request/+",
        "v1/devices/+/rpc/request/+",
        "devices/#",
        "#",
        "+/+/+/+/+",
        f"$share/group/devices/{victim.id}/#",
        "$share/group/#",
        f"devices/{victim.id.upper()}/#",
    ]
    owner = Paho(server, victim.token)
    try:
        for topic_filter in filters:
            codes = client.subscribe(topic_filter)
            assert codes is not None, f"the connection closed on {topic_filter!r}"
            assert codes[0] >= 0x80, f"SUBACK {codes} for {topic_filter!r}"
        # A shared subscription of the own namespace is granted, but its
        # group is scoped to the device: the victim's group of the same
        # name does not share the victim's commands with the attacker.
        shared = "$share/group/v1/devices/me/rpc/request/+"
        codes = client.subscribe(shared)
        assert codes is not None and codes[0] < 0x80, codes
        codes = owner.subscribe(shared)
        assert codes is not None and codes[0] < 0x80, codes
        # A command for the victim reaches no one of the attacker's filters.
        response = server.api.post(
            f"{server.http_url}/api/v1/devices/{victim.id}/commands",
            json={"method": "unlock", "params": {}, "timeout_ms": 500},
            timeout=10,
        )
        assert response.status_code in (200, 202, 404, 408, 504), response.text
        assert client.quiet_messages() == []
        # The victim itself receives the command on its own topic.
        topics = [message.topic for message in owner.quiet_messages()]
        assert all(topic.startswith("v1/devices/me/rpc/request/") for topic in topics), topics
    finally:
        client.close()
        owner.close()
    assert_healthy(server)


def test_mosquitto_sub_to_victim_commands_is_refused(server: FerriteServer, cast) -> None:
    result = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-V", "mqttv5", "-q", "1",
         "-u", cast["attacker"].token, "-t", f"devices/{cast['victim'].id}/rpc/request/+", "-C", "1", "-W", "3"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    # mosquitto_sub 2.0 reports a refused subscription on stderr and exits
    # with 0.
    assert "denied" in result.stderr.lower() or "not authorized" in result.stderr.lower(), result.stderr
    assert result.stdout == ""


# --- MQTT: will and retained messages ------------------------------------------------------


def test_will_on_victim_topic_is_refused(server: FerriteServer, cast) -> None:
    victim = cast["victim"]
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"will-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
    client.username_pw_set(cast["attacker"].token, "")
    client.will_set(f"devices/{victim.id}/telemetry", '{"stolen":1}', qos=1)
    connack: queue.Queue[int] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason_code, _p: connack.put(reason_code.value)
    client.connect("127.0.0.1", server.mqtt_port)
    client.loop_start()
    try:
        assert connack.get(timeout=WAIT_S) == NOT_AUTHORIZED
    finally:
        client.loop_stop()
        client.disconnect()
    assert_untouched(server, victim)


def test_retained_on_victim_topic_is_refused(server: FerriteServer, cast) -> None:
    victim = cast["victim"]
    attacker = Paho(server, cast["attacker"].token)
    try:
        code = attacker.publish(f"devices/{victim.id}/attributes", '{"firmware":"evil"}', retain=True)
        assert code == NOT_AUTHORIZED
    finally:
        attacker.close()
    owner = Paho(server, victim.token)
    try:
        codes = owner.subscribe("v1/devices/me/#")
        assert codes is not None and codes[0] < 0x80, codes
        assert [message.topic for message in owner.quiet_messages()] == []
    finally:
        owner.close()


# --- applications of another tenant -------------------------------------------------------------


def test_foreign_application_cannot_reach_victim(server: FerriteServer, cast) -> None:
    victim, tenant = cast["victim"], cast["tenant"]
    app = Paho(server, tenant.admin_key)
    try:
        for topic_filter in (f"devices/{victim.id}/telemetry", f"devices/{victim.id}/attributes", "devices/#"):
            codes = app.subscribe(topic_filter)
            assert codes is not None, topic_filter
        code = app.publish(f"devices/{victim.id}/commands", '{"method":"unlock","params":{}}')
        assert code is not None and code >= 0x80, f"PUBACK {code} for a command to another tenant's device"

        # The victim's telemetry reaches none of those subscriptions.
        # The victim's own message, with the key that the final check expects.
        response = httpx.post(f"{server.http_url}/api/v1/{victim.token}/telemetry", json={"marker": 2}, timeout=10)
        assert response.status_code == 200, response.text
        assert app.quiet_messages() == []
    finally:
        app.close()


# --- HTTP -------------------------------------------------------------------------------------------


def test_http_ingest_with_wrong_token_is_rejected(server: FerriteServer, cast) -> None:
    victim = cast["victim"]
    attempts = [
        (f"/api/v1/devices/{victim.id}/telemetry", cast["attacker"].token, (401, 403, 404)),
        (f"/api/v1/devices/{victim.id}/telemetry", cast["foreign"].token, (401, 403, 404)),
        (f"/api/v1/devices/{victim.id.upper()}/telemetry", cast["attacker"].token, (401, 403, 404)),
        (f"/api/v1/devices/{victim.id}/telemetry", cast["tenant"].admin_key, (401, 403, 404)),
        (f"/api/v1/{victim.id}/telemetry", None, (401, 404)),
        (f"/api/v1/{victim.token.upper()}/telemetry", None, (401, 404)),
        (f"/api/v1/{victim.token}%00/telemetry", None, (400, 401, 404)),
        (f"/api/v1/devices/{victim.id}%2F..%2F{cast['attacker'].id}/telemetry", cast["attacker"].token, (400, 401, 403, 404)),
    ]
    with httpx.Client(base_url=server.http_url, timeout=10) as client:
        for path, token, expected in attempts:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = client.post(path, json={"stolen": 1}, headers=headers)
            assert response.status_code in expected, f"{path}: {response.status_code} {response.text}"
    assert_untouched(server, victim)


def test_foreign_tenant_api_sees_victim_as_missing(server: FerriteServer, cast) -> None:
    victim, tenant = cast["victim"], cast["tenant"]
    headers = {"Authorization": f"Bearer {tenant.admin_key}"}
    with httpx.Client(base_url=server.http_url, headers=headers, timeout=10) as client:
        requests_to_make = [
            ("GET", f"/api/v1/devices/{victim.id}", None),
            ("GET", f"/api/v1/devices/{victim.id}/telemetry/latest", None),
            ("GET", f"/api/v1/devices/{victim.id}/credentials", None),
            ("DELETE", f"/api/v1/devices/{victim.id}/credentials", None),
            ("POST", f"/api/v1/devices/{victim.id}/token", {}),
            ("POST", f"/api/v1/devices/{victim.id}/commands", {"method": "unlock", "params": {}}),
            ("DELETE", f"/api/v1/devices/{victim.id}", None),
        ]
        for method, path, body in requests_to_make:
            response = client.request(method, path, json=body)
            assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text}"
            assert victim.name not in response.text
    assert_untouched(server, victim)


def test_foreign_live_stream_cannot_filter_victim(server: FerriteServer, cast) -> None:
    victim, tenant = cast["victim"], cast["tenant"]
    response = httpx.get(
        f"{server.http_url}/api/v1/live/sse",
        params={"device": victim.id},
        headers={"Authorization": f"Bearer {tenant.admin_key}"},
        timeout=10,
    )
    assert response.status_code in (400, 404), response.text
    assert "not found" in response.text

    url = f"ws://127.0.0.1:{server.http_port}/api/v1/live/ws?access_token={tenant.admin_key}"
    with websocket_connect(url, open_timeout=WAIT_S) as stream:
        stream.send('{"subscribe": {"device": ["%s"]}}' % victim.id)
        reply = stream.recv(timeout=WAIT_S)
        assert '"error"' in reply, reply
        httpx.post(f"{server.http_url}/api/v1/{victim.token}/telemetry", json={"marker": 3}, timeout=10)
        with pytest.raises(TimeoutError):
            stream.recv(timeout=QUIET_S)


# --- device WebSocket ---------------------------------------------------------------------------------


def test_device_websocket_ignores_other_ids(server: FerriteServer, cast) -> None:
    victim, attacker = cast["victim"], cast["attacker"]
    base = f"ws://127.0.0.1:{server.http_port}/api/v1/devices/ws"
    for query in (f"?access_token={victim.id}", f"?access_token={cast['tenant'].admin_key}", f"?device_id={victim.id}"):
        with pytest.raises(Exception) as raised:
            with websocket_connect(base + query, open_timeout=WAIT_S):
                pass
        assert "401" in str(raised.value) or "400" in str(raised.value), str(raised.value)

    # Fields that name another device in a message are refused.
    with websocket_connect(f"{base}?access_token={attacker.token}&device_id={victim.id}", open_timeout=WAIT_S) as socket_:
        socket_.send('{"type":"telemetry","id":"m1","device_id":"%s","data":{"stolen":1}}' % victim.id)
        reply = socket_.recv(timeout=WAIT_S)
        assert '"error"' in reply, reply
    assert_untouched(server, victim)


# --- CoAP ---------------------------------------------------------------------------------------------


def coap_client(*args: str) -> str:
    executable = shutil.which("coap-client-notls")
    if executable is None:
        pytest.fail("coap-client-notls not found: install the libcoap3-bin package (.ci/install-deps)", pytrace=False)
    result = subprocess.run([executable, "-B", "5", *args], capture_output=True, timeout=30, check=False)
    return (result.stdout + result.stderr).decode(errors="replace")


def test_coap_paths_with_other_ids_are_rejected(server: FerriteServer, cast) -> None:
    victim = cast["victim"]
    base = f"coap://127.0.0.1:{server.coap_port}"
    attempts = [
        (f"/api/v1/{victim.id}/telemetry", "4.01"),
        (f"/api/v1/{victim.token.upper()}/telemetry", "4.01"),
        (f"/api/v1/{cast['tenant'].admin_key}/telemetry", "4.01"),
        (f"/api/v1/{cast['foreign'].token}/rpc/1", "4.04"),
        (f"/api/v1/{cast['attacker'].token}/rpc/1", "4.04"),
        (f"/api/v1/{cast['attacker'].token}/../{victim.token}/telemetry", "4.04"),
    ]
    for path, expected in attempts:
        output = coap_client("-m", "post", "-t", "50", "-e", '{"stolen":1}', base + path)
        assert expected in output, f"{path}: {output}"
    output = coap_client("-m", "post", "-t", "50", "-e", '{"stolen":1}', f"{base}/telemetry?token={victim.id}")
    assert "4.01" in output, output
    assert_untouched(server, victim)


def test_command_response_of_another_device_is_not_taken(server: FerriteServer, cast) -> None:
    """The attacker sends a response to the victim's pending command with
    the victim's request id, over MQTT and CoAP. The command still times
    out."""
    victim, attacker = cast["victim"], cast["attacker"]
    owner = Paho(server, victim.token)
    owner.subscribe("v1/devices/me/rpc/request/+")
    results: queue.Queue[httpx.Response] = queue.Queue()

    def call() -> None:
        results.put(httpx.post(
            f"{server.http_url}/api/v1/devices/{victim.id}/commands",
            headers={"Authorization": server.api.headers["Authorization"]},
            json={"method": "unlock", "params": {}, "timeout_ms": 3000},
            timeout=20,
        ))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        request = owner.messages.get(timeout=WAIT_S)
        request_id = request.topic.rsplit("/", 1)[1]
        intruder = Paho(server, attacker.token)
        try:
            intruder.publish(f"v1/devices/me/rpc/response/{request_id}", '{"unlocked":true}')
            code = intruder.publish(f"devices/{victim.id}/rpc/response/{request_id}", '{"unlocked":true}')
            assert code == NOT_AUTHORIZED
        finally:
            intruder.close()
        output = coap_client("-m", "post", "-t", "50", "-e", '{"unlocked":true}',
                             f"coap://127.0.0.1:{server.coap_port}/api/v1/{attacker.token}/rpc/{request_id}")
        assert "4.04" in output, output
        caller.join(timeout=20)
        response = results.get(timeout=1)
        assert "unlocked" not in response.text, f"the attacker's response reached the caller: {response.text}"
        assert response.status_code >= 400, response.text
    finally:
        owner.close()
    assert_healthy(server)


# --- revocation with real clients ----------------------------------------------------------------------


def rotate(server: FerriteServer, device: Device) -> str:
    response = server.api.post(f"{server.http_url}/api/v1/devices/{device.id}/token", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["token"]


def test_rotation_ends_paho_sessions(server: FerriteServer) -> None:
    device5 = server.create_device("revoked-paho5")
    device3 = server.create_device("revoked-paho3")
    client5 = Paho(server, device5.token)
    client3 = Paho(server, device3.token, protocol=mqtt.MQTTv311)
    try:
        rotate(server, device5)
        started = time.monotonic()
        assert client5.disconnected.wait(WAIT_S), "MQTT 5 session still open"
        assert time.monotonic() - started <= END_WITHIN_S, f"ended after {time.monotonic() - started:.2f} s"
        assert client5.disconnect_reason == NOT_AUTHORIZED

        rotate(server, device3)
        started = time.monotonic()
        assert client3.disconnected.wait(WAIT_S), "MQTT 3.1.1 session still open"
        assert time.monotonic() - started <= END_WITHIN_S, f"ended after {time.monotonic() - started:.2f} s"
    finally:
        client5.client.loop_stop()
        client3.client.loop_stop()


def test_rotation_ends_mosquitto_sub(server: FerriteServer) -> None:
    device = server.create_device("revoked-sub")
    subscriber = subprocess.Popen(
        ["mosquitto_sub", "-d", "-h", "127.0.0.1", "-p", str(server.mqtt_port), "-V", "mqttv5", "-q", "1",
         "-u", device.token, "-t", "v1/devices/me/rpc/request/+"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.0)
        assert subscriber.poll() is None, subscriber.stderr.read() if subscriber.stderr else ""
        rotate(server, device)
        started = time.monotonic()
        # mosquitto_sub reconnects after a DISCONNECT; with the old token it
        # is refused and exits.
        subscriber.wait(timeout=WAIT_S)
        assert time.monotonic() - started <= WAIT_S
        stdout, stderr = subscriber.communicate(timeout=5)
        # `-d` prints the packets: the server's DISCONNECT with 0x87 (135).
        assert "Received DISCONNECT" in stdout, stdout + stderr
        assert "135" in stdout or "Not authorized" in stdout + stderr, stdout + stderr
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.wait()


def test_rotation_closes_device_websocket(server: FerriteServer) -> None:
    device = server.create_device("revoked-ws")
    url = f"ws://127.0.0.1:{server.http_port}/api/v1/devices/ws?access_token={device.token}"
    with websocket_connect(url, open_timeout=WAIT_S) as device_socket:
        rotate(server, device)
        started = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                device_socket.recv(timeout=END_WITHIN_S)
        assert time.monotonic() - started <= END_WITHIN_S + 0.2
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value


def test_rotation_ends_coap_observation(server: FerriteServer) -> None:
    device = server.create_device("revoked-coap")
    executable = shutil.which("coap-client-notls")
    if executable is None:
        pytest.fail("coap-client-notls not found: install the libcoap3-bin package (.ci/install-deps)", pytrace=False)
    observer = subprocess.Popen(
        [executable, "-s", "10", f"coap://127.0.0.1:{server.coap_port}/api/v1/{device.token}/attributes"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        rotate(server, device)
        observer.wait(timeout=WAIT_S + 10)
        stdout, stderr = observer.communicate(timeout=5)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.wait()
    output = (stdout + stderr).decode(errors="replace")
    assert "4.01" in output or "revoked" in output, output
