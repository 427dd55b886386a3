"""CoAP over DTLS with libcoap's clients (Debian package libcoap3-bin):
`coap-client-openssl` and `coap-client-gnutls`, with a pre-shared key and
with client certificates.

libcoap's `-k` takes the key as text, so the tests set the key through the
API as the hex of that text. libcoap 4.3.1 exits with code 0 even when the
handshake fails, so failures are checked by what was stored and by the
handshake counters on /metrics.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import Device, FerriteServer, ferrite_binary

CLIENT_TIMEOUT_S = 30
JSON = 50
PSK_TEXT = "interop-psk-0123"
CLIENTS = ["coap-client-openssl", "coap-client-gnutls"]


def coap_client(client: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run one of libcoap's DTLS clients and return the result. `-B`
    bounds how long the client waits, for handshakes that never finish."""
    executable = shutil.which(client)
    if executable is None:
        pytest.fail(f"{client} not found: install the libcoap3-bin package (.ci/install-deps)", pytrace=False)
    return subprocess.run([executable, "-B", "10", *args], capture_output=True, timeout=CLIENT_TIMEOUT_S, check=False)


def coaps_uri(server: FerriteServer, path: str) -> str:
    return f"coaps://127.0.0.1:{server.coaps_port}{path}"


def set_psk(server: FerriteServer, device: Device, identity: str, key_text: str = PSK_TEXT) -> None:
    response = server.api.put(
        f"{server.http_url}/api/v1/devices/{device.id}/credentials/psk",
        json={"identity": identity, "key": key_text.encode().hex()},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def handshakes(server: FerriteServer, result: str) -> float:
    metrics = requests.get(f"{server.http_url}/metrics", timeout=10).text
    prefix = f'ferrite_coap_dtls_handshakes_total{{result="{result}"}}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def wait_for_handshakes(server: FerriteServer, result: str, at_least: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        count = handshakes(server, result)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def output_of(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


def make_certificate(directory: Path, name: str, subject: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    """Create a P-256 key and a certificate for `subject`, signed by `ca`
    (certificate and key) or self-signed, with the openssl command."""
    key = directory / f"{name}.key"
    cert = directory / f"{name}.pem"
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)  # noqa: E731
    run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    if ca is None:
        run("req", "-x509", "-new", "-key", str(key), "-subj", subject, "-days", "30", "-out", str(cert))
    else:
        request = directory / f"{name}.csr"
        run("req", "-new", "-key", str(key), "-subj", subject, "-out", str(request))
        run("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial", "-days", "30", "-out", str(cert))
    return cert, key


class DtlsServer(FerriteServer):
    """A server with a DTLS certificate, its key and a CA of devices, and a
    short handshake timeout, so that a failed handshake is counted soon."""

    def __init__(self, binary: Path, data_dir: Path, log_path: Path, files: Path) -> None:
        super().__init__(binary, data_dir, log_path)
        self.files = files

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["FERRITE_COAP_DTLS_CERT_FILE"] = str(self.files / "server.pem")
        env["FERRITE_COAP_DTLS_KEY_FILE"] = str(self.files / "server.key")
        env["FERRITE_COAP_DTLS_CA_FILE"] = str(self.files / "ca.pem")
        env["FERRITE_COAP_DTLS_HANDSHAKE_TIMEOUT"] = "3s"
        return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DtlsServer]:
    base = tmp_path_factory.mktemp("ferrite-dtls")
    files = base / "pki"
    files.mkdir()
    ca = make_certificate(files, "ca", "/CN=Ferrite interop CA")
    make_certificate(files, "server", "/CN=localhost", ca)
    try:
        binary = ferrite_binary()
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
    instance = DtlsServer(binary, base / "data", base / "ferrite.log", files)
    try:
        instance.start()
    except BaseException:
        instance.stop()
        raise
    yield instance
    exit_code = instance.stop()
    assert "panicked" not in instance.log_text(), instance.log_tail()
    assert exit_code == 0, f"ferrite serve exited with {exit_code}:\n{instance.log_tail()}"


@pytest.mark.parametrize("client", CLIENTS)
def test_psk_client_telemetry_stored(server: FerriteServer, client: str) -> None:
    device = server.create_device(f"dtls-psk-{client}")
    identity = f"identity-{device.id}"
    set_psk(server, device, identity)

    result = coap_client(client, "-m", "post", "-t", str(JSON), "-e", json.dumps({"psk_value": 1}), "-u", identity, "-k", PSK_TEXT, coaps_uri(server, "/telemetry"))

    assert result.returncode == 0, output_of(result)
    server.wait_for_latest(device.id, {"psk_value": 1})


def test_psk_unknown_identity_and_wrong_key_fail(server: FerriteServer) -> None:
    device = server.create_device("dtls-psk-fail")
    identity = f"identity-{device.id}"
    set_psk(server, device, identity)
    unknown_before = handshakes(server, "unknown_psk_identity")
    timed_out_before = handshakes(server, "timed_out")

    coap_client("coap-client-openssl", "-m", "post", "-t", str(JSON), "-e", '{"never": 1}', "-u", "no-such-identity", "-k", PSK_TEXT, coaps_uri(server, "/telemetry"))
    coap_client("coap-client-openssl", "-m", "post", "-t", str(JSON), "-e", '{"never": 1}', "-u", identity, "-k", "another-key-0123", coaps_uri(server, "/telemetry"))

    assert wait_for_handshakes(server, "unknown_psk_identity", unknown_before + 1) >= unknown_before + 1
    # A wrong key is noticed only when the handshake times out: the server
    # cannot decrypt the client's Finished and DTLS drops it silently.
    assert wait_for_handshakes(server, "timed_out", timed_out_before + 1, timeout=15) >= timed_out_before + 1
    assert "never" not in server.latest(device.id)

    # The failures left the listener serving.
    result = coap_client("coap-client-openssl", "-m", "post", "-t", str(JSON), "-e", '{"after_failures": 1}', "-u", identity, "-k", PSK_TEXT, coaps_uri(server, "/telemetry"))
    assert result.returncode == 0, output_of(result)
    server.wait_for_latest(device.id, {"after_failures": 1})


@pytest.mark.parametrize("client", CLIENTS)
def test_registered_certificate_authenticates(server: DtlsServer, tmp_path: Path, client: str) -> None:
    device = server.create_device(f"dtls-cert-{client}")
    cert, key = make_certificate(tmp_path, "device", "/CN=any-name")
    response = server.api.post(
        f"{server.http_url}/api/v1/devices/{device.id}/credentials/certificates",
        json={"pem": cert.read_text()},
        timeout=10,
    )
    assert response.status_code == 201, response.text

    result = coap_client(client, "-m", "post", "-t", str(JSON), "-e", '{"registered": 1}', "-c", str(cert), "-j", str(key), "-C", str(server.files / "ca.pem"), coaps_uri(server, "/telemetry"))

    assert result.returncode == 0, output_of(result)
    server.wait_for_latest(device.id, {"registered": 1})


def test_ca_certificate_names_device_by_id(server: DtlsServer, tmp_path: Path) -> None:
    device = server.create_device("dtls-cert-ca")
    ca = (server.files / "ca.pem", server.files / "ca.key")
    cert, key = make_certificate(tmp_path, "device", f"/CN={device.id}", ca)

    result = coap_client("coap-client-openssl", "-m", "post", "-t", str(JSON), "-e", '{"ca_signed": 1}', "-c", str(cert), "-j", str(key), "-C", str(ca[0]), coaps_uri(server, "/telemetry"))

    assert result.returncode == 0, output_of(result)
    server.wait_for_latest(device.id, {"ca_signed": 1})


def test_unregistered_certificate_fails(server: DtlsServer, tmp_path: Path) -> None:
    before = handshakes(server, "bad_certificate")
    cert, key = make_certificate(tmp_path, "stranger", "/CN=stranger")

    result = coap_client("coap-client-openssl", "-m", "post", "-t", str(JSON), "-e", '{"stranger": 1}', "-c", str(cert), "-j", str(key), "-C", str(server.files / "ca.pem"), coaps_uri(server, "/telemetry"))

    assert "alert" in output_of(result), output_of(result)
    assert wait_for_handshakes(server, "bad_certificate", before + 1) >= before + 1
