//! Uplinks from other LoRaWAN network servers (ChirpStack v4, The Things
//! Stack v3) that run the devices themselves.

mod chirpstack;
mod dedup;
mod fields;
mod tts;
mod uplink;
