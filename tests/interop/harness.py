"""Start a `ferrite serve` process and talk to its REST API.

The tests treat the server as a black box: they create devices, users and
API keys with the `ferrite` command line, send data with third-party
clients and read it back through the REST API.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "interop-admin-password"

# Data reaches the store asynchronously after the acknowledgement, usually
# within milliseconds. This bounds every wait for stored data.
STORE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.05
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
CLI_TIMEOUT_S = 30.0


def ferrite_binary() -> Path:
    """Return the server binary: `FERRITE_BIN`, or `target/debug/ferrite`.

    A relative `FERRITE_BIN` is taken relative to the repository root.
    """
    configured = Path(os.environ.get("FERRITE_BIN", "target/debug/ferrite"))
    binary = configured if configured.is_absolute() else REPO_ROOT / configured
    if not binary.is_file():
        raise FileNotFoundError(
            f"ferrite binary not found at {binary}: run `cargo build -p ferrite` "
            "or set FERRITE_BIN to the binary's path"
        )
    return binary


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def same_value(stored: Any, expected: Any) -> bool:
    """Compare a stored value with an expected one without Python's
    `True == 1`: a boolean matches only a boolean, and numbers compare as
    floats because the store may return an integer as a float."""
    if isinstance(stored, bool) or isinstance(expected, bool):
        return isinstance(stored, bool) and isinstance(expected, bool) and stored == expected
    if isinstance(stored, (int, float)) and isinstance(expected, (int, float)):
        return float(stored) == float(expected)
    return stored == expected


@dataclass(frozen=True)
class Device:
    id: str
    name: str
    token: str


class FerriteServer:
    """One `ferrite serve` process on free loopback ports with its own data
    directory, plus an admin session on its REST API."""

    def __init__(
        self,
        binary: Path,
        data_dir: Path,
        log_path: Path,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        # `FERRITE_*` variables for the server process only, such as
        # {"FERRITE_LIMITS_DEVICE_MESSAGES_PER_SECOND": "2"}.
        self.settings = dict(settings or {})
        self.data_dir = data_dir
        self.log_path = log_path
        self.http_port = free_port()
        self.mqtt_port = free_port()
        self.coap_port = free_udp_port()
        self.lorawan_port = free_udp_port()
        self.coaps_port = free_udp_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.api = requests.Session()
        self.operator_key = ""
        # Variables added to the server's environment after the `FERRITE_*`
        # ones are removed, such as `FERRITE_CONFIG`.
        self.extra_env: dict[str, str] = {}

    # --- process ---------------------------------------------------------

    def environment(self) -> dict[str, str]:
        """The server's environment: this one without `FERRITE_*` variables,
        because the server reads those as settings. `FERRITE_TEST_LOG` sets
        its `RUST_LOG` (default `warn`)."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("FERRITE_")}
        env["RUST_LOG"] = os.environ.get("FERRITE_TEST_LOG", "warn")
        env["NO_COLOR"] = "1"
        env.update(self.extra_env)
        env.update(self.settings)
        return env

    def run_cli(self, *args: str, stdin: str | None = None) -> dict[str, Any]:
        """Run `ferrite ARGS --data-dir DIR` and return its JSON output."""
        command = [str(self.binary), *args, "--data-dir", str(self.data_dir)]
        result = subprocess.run(
            command,
            input=(stdin or "").encode(),
            capture_output=True,
            env=self.environment(),
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed with exit code {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return json.loads(result.stdout)

    def start(self) -> None:
        """Create the admin user and an operator API key, then launch."""
        self.run_cli("user", "create", ADMIN_EMAIL, "--role", "admin", stdin=ADMIN_PASSWORD + "\n")
        self.operator_key = self.create_api_key("operator")
        self.launch()

    def launch(self) -> None:
        """Start `ferrite serve` on the data directory, wait for `/healthz`
        and log in as the admin."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.binary),
                    "serve",
                    "--data-dir",
                    str(self.data_dir),
                    "--http-listen",
                    f"127.0.0.1:{self.http_port}",
                    "--mqtt-listen",
                    f"127.0.0.1:{self.mqtt_port}",
                    "--coap-listen",
                    f"127.0.0.1:{self.coap_port}",
                    "--lorawan-listen",
                    f"127.0.0.1:{self.lorawan_port}",
                    "--coaps-listen",
                    f"127.0.0.1:{self.coaps_port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
            )
        self._wait_until_healthy()

        response = requests.post(
            f"{self.http_url}/api/v1/auth/login",
            json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD},
            timeout=10,
        )
        response.raise_for_status()
        self.api.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def kill(self) -> None:
        """Stop the server with SIGKILL, as a crash or power loss would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ferrite serve exited with code {self.process.returncode} during start-up:\n"
                    f"{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.http_url}/healthz", timeout=1).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"ferrite serve was not healthy after {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Send SIGTERM to the server process, kill it if it has not exited
        after `STOP_TIMEOUT_S`, and return its exit code (None if killed)."""
        if self.process is None:
            return None
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
            return None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # --- provisioning ----------------------------------------------------

    def create_device(self, prefix: str = "device") -> Device:
        created = self.run_cli("device", "create", unique_name(prefix))
        return Device(id=created["id"], name=created["name"], token=created["token"])

    def create_api_key(self, role: str) -> str:
        return self.run_cli("api-key", "create", unique_name(f"{role}-key"), "--role", role)["key"]

    # --- REST API --------------------------------------------------------

    def get(self, path: str, **params: Any) -> requests.Response:
        return self.api.get(f"{self.http_url}{path}", params=params, timeout=10)

    def latest(self, device_id: str) -> dict[str, dict[str, Any]]:
        response = self.get(f"/api/v1/devices/{device_id}/telemetry/latest")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_latest(
        self,
        device_id: str,
        expected: dict[str, Any],
        timestamps: dict[str, int] | None = None,
        timeout: float = STORE_TIMEOUT_S,
    ) -> dict[str, dict[str, Any]]:
        """Poll the latest values of a device until every key of `expected`
        has its value (and, for keys in `timestamps`, that `ts` in epoch
        milliseconds). Fail with the last response after `timeout` seconds."""
        timestamps = timestamps or {}
        deadline = time.monotonic() + timeout
        latest: dict[str, dict[str, Any]] = {}
        while True:
            latest = self.latest(device_id)
            if all(
                key in latest
                and same_value(latest[key]["value"], value)
                and (key not in timestamps or latest[key]["ts"] == timestamps[key])
                for key, value in expected.items()
            ):
                return latest
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"device {device_id}: expected latest values {expected} "
                    f"(timestamps {timestamps}) within {timeout} s, got {latest}"
                )
            time.sleep(POLL_INTERVAL_S)

    def latest_after_marker(self, device: Device) -> dict[str, dict[str, Any]]:
        """Store a `marker` value for `device` over HTTP, wait for it and
        return the latest values. Data that the server had accepted before
        is stored by then, so a test can check that a rejected message left
        nothing behind."""
        response = requests.post(f"{self.http_url}/api/v1/{device.token}/telemetry", json={"marker": 1}, timeout=10)
        assert response.status_code == 200, response.text
        return self.wait_for_latest(device.id, {"marker": 1})

    def wait_for_point_count(
        self, device_id: str, key: str, start: int, end: int, count: int, timeout: float = STORE_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        """Poll a raw range query until `key` has `count` points in
        `[start, end)`, and return them."""
        deadline = time.monotonic() + timeout
        points: list[dict[str, Any]] = []
        while True:
            response = self.get(
                f"/api/v1/devices/{device_id}/telemetry", keys=key, start=start, end=end, limit=10_000
            )
            assert response.status_code == 200, response.text
            points = response.json().get(key, [])
            if len(points) >= count:
                return points
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"device {device_id}: expected {count} points of {key!r} within {timeout} s, "
                    f"got {len(points)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def device_by_name(self, name: str) -> dict[str, Any] | None:
        """Find a device by name, following `next_offset` through the list."""
        offset = 0
        while True:
            response = self.get("/api/v1/devices", limit=1000, offset=offset)
            assert response.status_code == 200, response.text
            page = response.json()
            for device in page["devices"]:
                if device["name"] == name:
                    return device
            if page.get("next_offset") is None:
                return None
            offset = page["next_offset"]

    def wait_for_device(self, name: str, timeout: float = STORE_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            device = self.device_by_name(name)
            if device is not None:
                return device
            if time.monotonic() > deadline:
                raise AssertionError(f"no device named {name!r} after {timeout} s")
            time.sleep(POLL_INTERVAL_S)
