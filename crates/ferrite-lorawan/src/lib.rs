//! Pure LoRaWAN code for Ferrite: no sockets, no async, no clock and no
//! random numbers, so the network server, the tools and the tests share it
//! and it can be fuzzed.
//!
//! - [`semtech`]: the Semtech UDP packet forwarder protocol (versions 1 and
//!   2) that gateways use to forward radio packets.
//! - [`region`]: EU868 and US915 regional parameters: data rates, receive
//!   windows and their delays.
//! - [`mac`]: LoRaWAN 1.0.x frames on top of the `lorawan` crate: uplink
//!   parsing, MIC checks, FRMPayload decryption, join accepts with session
//!   key derivation and downlinks.
//! - [`fcnt`]: rebuilding the 32-bit uplink frame counter from its 16 bits
//!   on the air.
//!
//! Left out on purpose: class B and C, ADR, MAC commands, LoRaWAN 1.1 and
//! every region other than EU868 and US915.

pub mod fcnt;
pub mod mac;
pub mod region;
pub mod semtech;
