"""LoRaWAN through the Semtech UDP packet forwarder protocol, with frames
built and checked by lora-packet (npm), an implementation independent of
Ferrite's Rust code.

A simulated gateway on a loopback UDP socket forwards the frames. Install
the node packages with `npm ci --prefix tests/interop/node` first.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
from typing import Any

import pytest

from harness import REPO_ROOT, FerriteServer

NODE_DIR = REPO_ROOT / "tests" / "interop" / "node"
NWK_S_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
APP_S_KEY = "000102030405060708090a0b0c0d0e0f"
APP_KEY = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0"
# Cayenne LPP: temperature 27.2 °C on channel 3.
LPP_TEMPERATURE = "03670110"
PUSH_DATA, PUSH_ACK, PULL_DATA, PULL_RESP, PULL_ACK = 0, 1, 2, 3, 4

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules" / "lora-packet").exists(),
    reason="needs node and `npm ci --prefix tests/interop/node`",
)


def lora_packet(command: str, **arguments: Any) -> dict[str, Any]:
    """Run one command of node/lorawan.js and return its JSON output."""
    result = subprocess.run(
        ["node", str(NODE_DIR / "lorawan.js"), command, json.dumps(arguments)],
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")},
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return json.loads(result.stdout)


class Gateway:
    """A packet forwarder speaking protocol version 2 on a loopback socket."""

    def __init__(self, server: FerriteServer, eui: str) -> None:
        response = server.api.post(
            f"{server.http_url}/api/v1/lorawan/gateways",
            json={"gateway_eui": eui, "name": "interop gateway"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        self.eui = bytes.fromhex(eui)
        self.server = ("127.0.0.1", server.lorawan_port)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.token = 0
        self.pull_resps: list[dict[str, Any]] = []

    def close(self) -> None:
        self.socket.close()

    def _next_token(self) -> bytes:
        self.token = (self.token + 1) % 65536
        return self.token.to_bytes(2, "big")

    def _wait_for(self, identifier: int, token: bytes | None, timeout: float) -> bytes | None:
        """Receive until a datagram with `identifier` (and `token`, when
        given) arrives; keep PULL_RESP bodies seen on the way."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.socket.settimeout(left)
            try:
                datagram = self.socket.recv(65535)
            except TimeoutError:
                return None
            if datagram[3] == identifier and (token is None or datagram[1:3] == token):
                return datagram
            if datagram[3] == PULL_RESP:
                self.pull_resps.append(json.loads(datagram[4:])["txpk"])
        return None

    def pull(self) -> None:
        token = self._next_token()
        self.socket.sendto(bytes([2]) + token + bytes([PULL_DATA]) + self.eui, self.server)
        assert self._wait_for(PULL_ACK, token, 2.0) is not None, "no PULL_ACK"

    def push(self, phy_payload_hex: str, tmst: int) -> None:
        phy_payload = bytes.fromhex(phy_payload_hex)
        rxpk = {
            "tmst": tmst, "chan": 1, "rfch": 0, "freq": 868.3, "stat": 1,
            "modu": "LORA", "datr": "SF9BW125", "codr": "4/5",
            "rssi": -57, "lsnr": 6.5, "size": len(phy_payload),
            "data": base64.b64encode(phy_payload).decode(),
        }
        token = self._next_token()
        body = json.dumps({"rxpk": [rxpk]}).encode()
        self.socket.sendto(bytes([2]) + token + bytes([PUSH_DATA]) + self.eui + body, self.server)
        assert self._wait_for(PUSH_ACK, token, 2.0) is not None, "no PUSH_ACK"

    def pull_resp(self, timeout: float = 3.0) -> dict[str, Any]:
        if not self.pull_resps:
            datagram = self._wait_for(PULL_RESP, None, timeout)
            assert datagram is not None, "no PULL_RESP"
            return json.loads(datagram[4:])["txpk"]
        return self.pull_resps.pop(0)


def api(server: FerriteServer, method: str, path: str, body: Any = None) -> Any:
    response = server.api.request(method, f"{server.http_url}{path}", json=body, timeout=10)
    assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
    return response.json() if response.content else None


def lpp_device(server: FerriteServer, registration: dict[str, Any]) -> str:
    """Create a device with a Cayenne LPP profile and a LoRaWAN registration."""
    if server.api.get(f"{server.http_url}/api/v1/profiles/lpp", timeout=10).status_code == 404:
        api(server, "POST", "/api/v1/profiles", {"name": "lpp", "codec": {"type": "cayenne_lpp"}})
    device = server.create_device("lora")
    api(server, "PATCH", f"/api/v1/devices/{device.id}", {"profile": "lpp"})
    api(server, "PUT", f"/api/v1/devices/{device.id}/lorawan", registration)
    return device.id


@pytest.fixture
def gateway(server: FerriteServer):
    instance = Gateway(server, os.urandom(8).hex())
    yield instance
    instance.close()


def test_abp_uplinks_with_rollover_are_decoded(server: FerriteServer, gateway: Gateway) -> None:
    dev_addr = "26011f01"
    device = lpp_device(
        server,
        {
            "dev_eui": os.urandom(8).hex(), "activation": "abp", "region": "EU868",
            "dev_addr": dev_addr, "nwk_s_key": NWK_S_KEY, "app_s_key": APP_S_KEY,
        },
    )
    # 65535, then 70000: the 16-bit field rolled over and lora-packet
    # puts the upper counter bits into the MIC and the key stream.
    for f_cnt in (65535, 70000):
        frame = lora_packet(
            "uplink", dev_addr=dev_addr, f_cnt=f_cnt, f_port=2, payload=LPP_TEMPERATURE,
            confirmed=False, nwk_s_key=NWK_S_KEY, app_s_key=APP_S_KEY,
        )
        gateway.push(frame["phy_payload"], tmst=f_cnt)
        deadline = time.monotonic() + 5
        while api(server, "GET", f"/api/v1/devices/{device}/lorawan")["f_cnt_up"] != f_cnt:
            assert time.monotonic() < deadline, f"uplink {f_cnt} was not accepted"
            time.sleep(0.05)
    server.wait_for_latest(device, {"temperature_3": 27.2})


def test_otaa_join_accept_opens_with_lora_packet(server: FerriteServer, gateway: Gateway) -> None:
    dev_eui = os.urandom(8).hex()
    join_eui = "70b3d57ed0000001"
    device = lpp_device(
        server,
        {"dev_eui": dev_eui, "activation": "otaa", "region": "EU868", "join_eui": join_eui, "app_key": APP_KEY},
    )
    gateway.pull()
    dev_nonce = 0x2A2B
    request = lora_packet("join_request", join_eui=join_eui, dev_eui=dev_eui, dev_nonce=dev_nonce, app_key=APP_KEY)
    gateway.push(request["phy_payload"], tmst=1_000_000)

    txpk = gateway.pull_resp()
    assert txpk["tmst"] == 6_000_000, "RX1 of a join accept is 5 s after the uplink"
    assert txpk["freq"] == 868.3
    assert txpk["datr"] == "SF9BW125"
    assert txpk["ipol"] is True
    accept = lora_packet(
        "join_accept", phy_payload=base64.b64decode(txpk["data"]).hex(), app_key=APP_KEY, dev_nonce=dev_nonce
    )
    assert accept["mic_ok"], accept
    assert accept["net_id"] == "000000"
    registration = api(server, "GET", f"/api/v1/devices/{device}/lorawan")
    assert registration["dev_addr"] == accept["dev_addr"]

    # The session keys lora-packet derived work for a data uplink.
    frame = lora_packet(
        "uplink", dev_addr=accept["dev_addr"], f_cnt=0, f_port=5, payload=LPP_TEMPERATURE,
        confirmed=False, nwk_s_key=accept["nwk_s_key"], app_s_key=accept["app_s_key"],
    )
    gateway.push(frame["phy_payload"], tmst=2_000_000)
    server.wait_for_latest(device, {"temperature_3": 27.2})


def test_confirmed_uplink_and_queued_downlink(server: FerriteServer, gateway: Gateway) -> None:
    dev_addr = "26011f02"
    device = lpp_device(
        server,
        {
            "dev_eui": os.urandom(8).hex(), "activation": "abp", "region": "EU868",
            "dev_addr": dev_addr, "nwk_s_key": NWK_S_KEY, "app_s_key": APP_S_KEY,
        },
    )
    gateway.pull()
    api(server, "POST", f"/api/v1/devices/{device}/lorawan/downlinks", {"f_port": 7, "data": "AQID"})
    frame = lora_packet(
        "uplink", dev_addr=dev_addr, f_cnt=1, f_port=2, payload=LPP_TEMPERATURE,
        confirmed=True, nwk_s_key=NWK_S_KEY, app_s_key=APP_S_KEY,
    )
    gateway.push(frame["phy_payload"], tmst=4_000_000)

    txpk = gateway.pull_resp()
    assert txpk["tmst"] == 5_000_000, "RX1 of a data downlink is 1 s after the uplink"
    down = lora_packet(
        "downlink", phy_payload=base64.b64decode(txpk["data"]).hex(), nwk_s_key=NWK_S_KEY, app_s_key=APP_S_KEY
    )
    assert down["mic_ok"], down
    assert down["ack"] is True
    assert down["f_cnt"] == 0
    assert down["f_port"] == 7
    assert down["payload"] == "010203"
