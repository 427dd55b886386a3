"""MQTT with ThingsBoard's Python device SDK (`tb-mqtt-client`).

The SDK runs in a child process (see `tb_device_client.py` for why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import FerriteServer, now_ms

HERE = Path(__file__).resolve().parent
SDK_DIR = HERE / ".deps" / "tb-sdk"
CLIENT_SCRIPT = HERE / "tb_device_client.py"
CLIENT_TIMEOUT_S = 60


def run_sdk_client(server: FerriteServer, token: str, payloads: tuple[object, ...]) -> subprocess.CompletedProcess[str]:
    if not (SDK_DIR / "tb_device_mqtt.py").is_file():
        pytest.fail(f"tb-mqtt-client is not installed in {SDK_DIR}: run .ci/install-deps", pytrace=False)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SDK_DIR), env.get("PYTHONPATH")]))
    # The SDK runs `pip install` on import when a dependency is missing.
    # Without a package source that fails instead of changing this machine.
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_INDEX"] = "1"
    return subprocess.run(
        [sys.executable, str(CLIENT_SCRIPT), "127.0.0.1", str(server.mqtt_port), token, *map(json.dumps, payloads)],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
    )


def send_with_sdk(server: FerriteServer, token: str, *payloads: object) -> dict:
    """Send each payload with `send_telemetry` and return the script's report."""
    result = run_sdk_client(server, token, payloads)
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stderr}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_flat_telemetry_stored(server: FerriteServer) -> None:
    device = server.create_device()

    report = send_with_sdk(server, device.token, {"temperature": 22.5, "active": True, "mode": "auto"})

    assert report["results"] == [report["success"]]
    assert report["published"] is True
    server.wait_for_latest(device.id, {"temperature": 22.5, "active": True, "mode": "auto"})


def test_ts_values_telemetry_stored(server: FerriteServer) -> None:
    device = server.create_device()
    ts = now_ms() - 10_000

    report = send_with_sdk(server, device.token, {"ts": ts, "values": {"humidity": 55, "co2": 410}})

    assert report["results"] == [report["success"]]
    assert report["published"] is True
    server.wait_for_latest(device.id, {"humidity": 55, "co2": 410}, {"humidity": ts, "co2": ts})


def test_several_messages_stored_in_order(server: FerriteServer) -> None:
    device = server.create_device()
    start = now_ms() - 60_000
    payloads = [{"ts": start + i * 1000, "values": {"step": i}} for i in range(10)]
    payloads.append([{"ts": start + 20_000, "values": {"step": 20}}, {"ts": start + 21_000, "values": {"step": 21}}])

    report = send_with_sdk(server, device.token, *payloads)

    assert report["results"] == [report["success"]] * len(payloads)
    assert report["published"] is True
    points = server.wait_for_point_count(device.id, "step", start, start + 30_000, 12)
    assert [point["ts"] for point in points] == [start + i * 1000 for i in [*range(10), 20, 21]]


def test_wrong_token_not_connected(server: FerriteServer) -> None:
    result = run_sdk_client(server, "wrong-token", ({"x": 1},))

    # Exit code 2: the client reported no connection within its timeout.
    assert result.returncode == 2, result.stderr
