//! Protocol adapters: each owns its listener and sessions, authenticates
//! devices, checks payloads, appends envelopes to the ingest log and
//! acknowledges only after the append is durable. Adapters call `auth`, `decode` and
//! `ingest`, nothing else.

pub mod coap;
pub mod http;
pub mod lorawan;
pub mod lorawan_integrations;
pub mod mqtt;
pub mod websocket;
