"""Send telemetry with ThingsBoard's Python device SDK (tb-mqtt-client).

Usage: tb_device_client.py HOST PORT TOKEN PAYLOAD_JSON [PAYLOAD_JSON ...]

Each PAYLOAD_JSON goes to `send_telemetry` with QoS 1. The last line of the
output is JSON: `results` contains what `TBPublishInfo.get()` returned for each
payload and `published` whether paho saw every PUBACK within get()'s wait.

This runs in its own process because the SDK needs ThingsBoard's fork of
paho-mqtt (tb-paho-mqtt-client), which installs the same `paho` package as
paho-mqtt. `.ci/install-deps` installs the SDK and the fork into
`tests/interop/.deps/tb-sdk`, and the test puts that folder first on
PYTHONPATH.
"""

import json
import sys
import time

from tb_device_mqtt import TBDeviceMqttClient, TBPublishInfo

CONNECT_TIMEOUT_S = 10.0


def main() -> int:
    host, port, token, *payloads = sys.argv[1:]
    client = TBDeviceMqttClient(host, port=int(port), username=token, quality_of_service=1)
    client.connect()
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not client.is_connected():
        if time.monotonic() > deadline:
            print(f"not connected to {host}:{port} after {CONNECT_TIMEOUT_S} s", file=sys.stderr)
            client.stop()
            return 2
        time.sleep(0.05)

    results = []
    published = True
    for payload in payloads:
        info = client.send_telemetry(json.loads(payload), quality_of_service=1)
        results.append(info.get())
        published = published and all(message.is_published() for message in info.message_info)

    client.disconnect()
    client.stop()
    print(json.dumps({"results": results, "published": published, "success": TBPublishInfo.TB_ERR_SUCCESS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
