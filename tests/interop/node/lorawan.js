// Builds and checks LoRaWAN 1.0 frames with lora-packet, an implementation
// independent of the Rust code under test.
//
// Usage: node lorawan.js COMMAND JSON. The JSON argument contains the inputs
// (hex strings, EUIs and DevAddr most significant byte first); the result
// is printed as one JSON object.
//
//   uplink       {dev_addr, f_cnt, f_port, payload, confirmed, nwk_s_key, app_s_key} -> {phy_payload}
//   join_request {join_eui, dev_eui, dev_nonce, app_key} -> {phy_payload}
//   join_accept  {phy_payload, app_key, dev_nonce} -> {mic_ok, dev_addr, net_id, app_nonce, nwk_s_key, app_s_key}
//   downlink     {phy_payload, nwk_s_key, app_s_key} -> {mic_ok, ack, f_cnt, f_port, payload}
"use strict";

const lora = require("lora-packet");

const hex = (text) => Buffer.from(text, "hex");

function uplink(input) {
  const packet = lora.fromFields(
    {
      MType: input.confirmed ? "Confirmed Data Up" : "Unconfirmed Data Up",
      DevAddr: hex(input.dev_addr),
      FCtrl: { ADR: false, ACK: false, ADRACKReq: false, FPending: false },
      FCnt: input.f_cnt & 0xffff,
      FPort: input.f_port,
      payload: hex(input.payload),
    },
    hex(input.app_s_key),
    hex(input.nwk_s_key),
    undefined,
    // The upper 16 bits of the 32-bit counter, little-endian as they follow
    // the 16-bit field in the MIC and key stream blocks.
    Buffer.from([(input.f_cnt >>> 16) & 0xff, (input.f_cnt >>> 24) & 0xff]),
  );
  return { phy_payload: packet.getPHYPayload().toString("hex") };
}

function joinRequest(input) {
  const packet = lora.fromFields(
    {
      MType: "Join Request",
      AppEUI: hex(input.join_eui),
      DevEUI: hex(input.dev_eui),
      DevNonce: Buffer.from([(input.dev_nonce >> 8) & 0xff, input.dev_nonce & 0xff]),
    },
    undefined,
    undefined,
    hex(input.app_key),
  );
  return { phy_payload: packet.getPHYPayload().toString("hex") };
}

function joinAccept(input) {
  const appKey = hex(input.app_key);
  const encrypted = lora.fromWire(hex(input.phy_payload));
  const packet = lora.fromWire(lora.decryptJoinAccept(encrypted, appKey));
  const devNonce = Buffer.from([(input.dev_nonce >> 8) & 0xff, input.dev_nonce & 0xff]);
  const keys = lora.generateSessionKeys(appKey, packet.NetID, packet.AppNonce, devNonce);
  return {
    mic_ok: lora.verifyMIC(packet, undefined, appKey),
    dev_addr: packet.DevAddr.toString("hex"),
    net_id: packet.NetID.toString("hex"),
    app_nonce: packet.AppNonce.toString("hex"),
    nwk_s_key: keys.NwkSKey.toString("hex"),
    app_s_key: keys.AppSKey.toString("hex"),
  };
}

function downlink(input) {
  const packet = lora.fromWire(hex(input.phy_payload));
  const nwkSKey = hex(input.nwk_s_key);
  const appSKey = hex(input.app_s_key);
  return {
    mic_ok: lora.verifyMIC(packet, nwkSKey),
    ack: packet.getFCtrlACK(),
    f_cnt: packet.getFCnt(),
    f_port: packet.getFPort(),
    payload: packet.FRMPayload ? lora.decrypt(packet, appSKey, nwkSKey).toString("hex") : "",
  };
}

const commands = { uplink, join_request: joinRequest, join_accept: joinAccept, downlink };
const [command, argument] = process.argv.slice(2);
if (!commands[command]) {
  console.error(`unknown command ${command}: expected ${Object.keys(commands).join(", ")}`);
  process.exit(2);
}
console.log(JSON.stringify(commands[command](JSON.parse(argument))));
