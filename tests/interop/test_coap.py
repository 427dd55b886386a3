"""CoAP with third-party clients: libcoap's `coap-client-notls` (Debian
package libcoap3-bin) and the aiocoap library."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
import requests

from harness import Device, FerriteServer

CLIENT_TIMEOUT_S = 30
JSON, CBOR, SENML_JSON, SENML_CBOR = 50, 60, 110, 112


def coap_client(*args: str, timeout: float = CLIENT_TIMEOUT_S) -> subprocess.CompletedProcess[bytes]:
    """Run libcoap's client without DTLS and return the result."""
    executable = shutil.which("coap-client-notls")
    if executable is None:
        pytest.fail("coap-client-notls not found: install the libcoap3-bin package (.ci/install-deps)", pytrace=False)
    return subprocess.run([executable, *args], capture_output=True, timeout=timeout, check=False)


def uri(server: FerriteServer, path: str) -> str:
    return f"coap://127.0.0.1:{server.coap_port}{path}"


def payload_cases() -> list[tuple[str, int, bytes, dict[str, float]]]:
    return [
        ("json", JSON, json.dumps({"json_value": 1.5}).encode(), {"json_value": 1.5}),
        ("cbor", CBOR, cbor2.dumps({"cbor_value": 2.5}), {"cbor_value": 2.5}),
        ("senml_json", SENML_JSON, json.dumps([{"n": "senml_json_value", "v": 3.5}]).encode(), {"senml_json_value": 3.5}),
        # SenML CBOR labels: 0 is the name, 2 the value (RFC 8428 section 6).
        ("senml_cbor", SENML_CBOR, cbor2.dumps([{0: "senml_cbor_value", 2: 4.5}]), {"senml_cbor_value": 4.5}),
    ]


@pytest.mark.parametrize("name,content_format,payload,expected", payload_cases(), ids=[case[0] for case in payload_cases()])
def test_coap_client_telemetry_stored(server: FerriteServer, tmp_path: Path, name: str, content_format: int, payload: bytes, expected: dict[str, float]) -> None:
    device = server.create_device(f"coap-{name}")
    body = tmp_path / "body"
    body.write_bytes(payload)

    result = coap_client("-m", "post", "-t", str(content_format), "-f", str(body), uri(server, f"/api/v1/{device.token}/telemetry"))

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    server.wait_for_latest(device.id, expected)


def test_coap_client_block_upload(server: FerriteServer, tmp_path: Path) -> None:
    device = server.create_device("coap-block")
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"block_value": 7, "padding": "x" * 4000}))

    result = coap_client("-m", "post", "-t", str(JSON), "-b", "64", "-f", str(body), uri(server, f"/telemetry?token={device.token}"))

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    server.wait_for_latest(device.id, {"block_value": 7})
    assert continue_responses(server) >= 4000 // 64, "the body went in 64-byte blocks, each but the last answered with 2.31"


def continue_responses(server: FerriteServer) -> float:
    metrics = requests.get(f"{server.http_url}/metrics", timeout=10).text
    prefix = 'ferrite_coap_responses_total{code="2.31"}'
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(prefix))


def test_coap_client_wrong_token_is_unauthorized(server: FerriteServer) -> None:
    result = coap_client("-m", "post", "-t", str(JSON), "-e", "{}", uri(server, "/api/v1/not-a-token/telemetry"))

    output = (result.stdout + result.stderr).decode(errors="replace")
    assert "4.01" in output, output


def patch_attributes(server: FerriteServer, device: Device, attributes: dict[str, object]) -> None:
    response = server.api.patch(f"{server.http_url}/api/v1/devices/{device.id}", json={"attributes": attributes}, timeout=10)
    assert response.status_code == 200, response.text


def test_coap_client_observes_attributes(server: FerriteServer) -> None:
    device = server.create_device("coap-observe")
    patch_attributes(server, device, {"interval": 10})
    executable = shutil.which("coap-client-notls")
    assert executable is not None, "install the libcoap3-bin package (.ci/install-deps)"

    observer = subprocess.Popen(
        [executable, "-s", "4", uri(server, f"/api/v1/{device.token}/attributes")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1.0)
        patch_attributes(server, device, {"interval": 20})
        stdout, stderr = observer.communicate(timeout=CLIENT_TIMEOUT_S)
    finally:
        if observer.poll() is None:
            observer.kill()
            observer.wait()

    output = stdout.decode(errors="replace")
    assert '"interval":10' in output, output + stderr.decode(errors="replace")
    assert '"interval":20' in output, output + stderr.decode(errors="replace")


def test_aiocoap_telemetry_and_block_upload(server: FerriteServer) -> None:
    device = server.create_device("aiocoap")

    async def run() -> list[aiocoap.numbers.codes.Code]:
        context = await aiocoap.Context.create_client_context()
        try:
            codes = []
            for payload in (
                json.dumps({"aiocoap_value": 1}).encode(),
                # Larger than one datagram: aiocoap sends it with Block1.
                json.dumps({"aiocoap_big": 2, "padding": "y" * 3000}).encode(),
            ):
                request = aiocoap.Message(code=aiocoap.POST, uri=uri(server, f"/api/v1/{device.token}/telemetry"), payload=payload, content_format=JSON)
                response = await context.request(request).response
                codes.append(response.code)
            return codes
        finally:
            await context.shutdown()

    codes = asyncio.run(asyncio.wait_for(run(), CLIENT_TIMEOUT_S))

    assert codes == [aiocoap.CHANGED, aiocoap.CHANGED]
    server.wait_for_latest(device.id, {"aiocoap_value": 1, "aiocoap_big": 2})


def test_aiocoap_receives_and_answers_a_command(server: FerriteServer) -> None:
    device = server.create_device("aiocoap-rpc")
    commands_url = f"{server.http_url}/api/v1/devices/{device.id}/commands"
    operator = {"Authorization": f"Bearer {server.operator_key}"}

    async def run() -> requests.Response:
        context = await aiocoap.Context.create_client_context()
        try:
            observation = context.request(aiocoap.Message(code=aiocoap.GET, uri=uri(server, f"/api/v1/{device.token}/rpc"), observe=0))
            registered = await observation.response
            assert registered.code == aiocoap.CONTENT, registered
            command = asyncio.create_task(
                asyncio.to_thread(
                    requests.post,
                    commands_url,
                    json={"method": "setLed", "params": {"on": True}, "timeout_ms": 5000},
                    headers=operator,
                    timeout=10,
                )
            )
            notification = await anext(aiter(observation.observation))
            rpc = json.loads(notification.payload)
            assert rpc["method"] == "setLed", rpc
            assert rpc["params"] == {"on": True}, rpc
            answer = aiocoap.Message(
                code=aiocoap.POST,
                uri=uri(server, f"/api/v1/{device.token}/rpc/{rpc['id']}"),
                payload=json.dumps({"led": "on"}).encode(),
                content_format=JSON,
            )
            answered = await context.request(answer).response
            assert answered.code == aiocoap.CHANGED, answered
            return await command
        finally:
            await context.shutdown()

    response = asyncio.run(asyncio.wait_for(run(), CLIENT_TIMEOUT_S))

    assert response.status_code == 200, response.text
    assert response.json()["response"] == {"led": "on"}
