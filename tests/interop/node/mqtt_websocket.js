// MQTT.js over WebSocket against Ferrite's /mqtt endpoint, run by
// tests/interop/test_websocket.py.
//
// Usage: node mqtt_websocket.js URL TOKEN PROTOCOL_VERSION VALUE
//
// Connects with the device access token as user name, publishes
// {"mqttjs": VALUE} to v1/devices/me/telemetry with QoS 1, subscribes to
// v1/devices/me/rpc/request/+ and prints one JSON line per step to stdout:
// {"event":"ready"} once subscribed, {"event":"answered","id":...} after it
// has echoed one command back as the response. Errors go to stderr with
// exit code 1; the script gives up after 20 s.

"use strict";

const mqtt = require("mqtt");

const [url, token, version, value] = process.argv.slice(2);
if (!url || !token || !version || value === undefined) {
  console.error("usage: node mqtt_websocket.js URL TOKEN PROTOCOL_VERSION VALUE");
  process.exit(2);
}

function report(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function fail(message) {
  console.error(message);
  process.exit(1);
}

const deadline = setTimeout(() => fail("timed out after 20 s"), 20000);

const client = mqtt.connect(url, {
  protocolVersion: Number(version),
  username: token,
  clientId: `mqttjs-${process.pid}-${Date.now()}`,
  reconnectPeriod: 0,
  connectTimeout: 10000,
});

client.on("error", (error) => fail(`MQTT error: ${error.message}`));

client.on("connect", async () => {
  try {
    await client.publishAsync("v1/devices/me/telemetry", JSON.stringify({ mqttjs: Number(value) }), { qos: 1 });
    const granted = await client.subscribeAsync("v1/devices/me/rpc/request/+", { qos: 1 });
    if (granted[0].qos !== 1) {
      fail(`subscription granted QoS ${granted[0].qos}, expected 1`);
    }
    report({ event: "ready" });
  } catch (error) {
    fail(`publish or subscribe failed: ${error.message}`);
  }
});

client.on("message", async (topic, payload) => {
  const id = topic.split("/").pop();
  const request = JSON.parse(payload.toString());
  try {
    await client.publishAsync(`v1/devices/me/rpc/response/${id}`, JSON.stringify({ echo: request }), { qos: 1 });
    report({ event: "answered", id: Number(id) });
    clearTimeout(deadline);
    await client.endAsync();
  } catch (error) {
    fail(`response failed: ${error.message}`);
  }
});
