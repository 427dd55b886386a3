//! WebSocket endpoints on the HTTP listener, for devices that cannot open
//! a TCP port of their own, such as browsers and devices behind proxies:
//!
//! - `/mqtt`: MQTT 3.1.1 and 5 over WebSocket with the subprotocol `mqtt`
//!   (`mqtt.rs`), served by the MQTT server's connection code;
//! - `GET /api/v1/devices/ws`: the device WebSocket (`device.rs`), JSON
//!   telemetry in and commands out, with the messages of `messages.rs`.
//!
//! Both upgrade only after the request was checked, so a bad request gets
//! an HTTP error with a problem document. Both end at shutdown through the
//! MQTT server's shutdown token, which also waits for them.
//! See docs/protocols/websocket.md for the client's view.

mod device;
mod messages;
mod mqtt;

pub use device::endpoint as device_endpoint;
pub use mqtt::endpoint as mqtt_endpoint;
