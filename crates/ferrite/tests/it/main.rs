//! Black-box tests: each starts the real `ferrite` binary on free loopback
//! ports with its own data directory and talks to it over sockets.

pub mod actions;
mod at_rest;
mod audit;
mod cases;
mod coap;
mod coap_dtls;
mod durability;
mod export;
mod fleet;
mod http;
mod identity;
mod limits;
mod live;
mod lorawan;
mod lorawan_integrations;
mod mqtt;
mod mqtt_broker;
mod mqtt_conformance;
mod nats;
mod processing;
mod revocation;
mod support;
mod tenancy;
mod tls;
mod websocket;
