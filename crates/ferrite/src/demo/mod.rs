//! The demo fleet that `ferrite serve --demo` starts: simulated devices that
//! send telemetry to this server through its own MQTT and HTTP listeners,
//! with the same clients and credentials that real devices would use.
//!
//! ## What it does
//! - Creates the devices `demo-truck-NNN` and `demo-sensor-NNN` in the
//!   default tenant on the first start. On later starts it reuses them and
//!   rotates their access tokens, because only hashes of the old tokens are
//!   stored.
//! - Two of every five devices are trucks ([`sensors::Truck`]): GPS
//!   position, speed, heading, fuel level, engine on/off and odometer. Each
//!   publishes every 5 s over its own MQTT 3.1.1 connection with QoS 1 on
//!   `v1/devices/me/telemetry`, with its token as the username.
//! - The others are environment sensors ([`sensors::EnvironmentSensor`]):
//!   temperature with a daily cycle, humidity, battery and RSSI. They post
//!   every 10 s to `POST /api/v1/{token}/telemetry` through one shared HTTP
//!   client.
//! - Each wait between messages is jittered by ±10% and the first one starts
//!   at a random phase, so the fleet does not send in lockstep. 120 devices
//!   send about 17 messages per second (48 trucks / 5 s + 72 sensors / 10 s).
//! - A device's model is seeded from its index in the fleet, so it behaves
//!   the same on every start for the same sequence of time steps.
//! - Creates an API key named `demo` with the viewer role on every start,
//!   and prints (to stdout) and logs two `curl` commands that query the data
//!   with it.
//! - Logs each failed send at debug and warns at most once a minute with the
//!   number of failures. It never stops the server.
//! - Stops when the server starts shutting down. The server gives start
//!   hooks no shutdown signal, so the fleet polls the readiness flag that
//!   the server clears first when it shuts down.
//!
//! ## What it leaves out
//! - Model state is not saved: on every start the trucks set off again near
//!   their depots, and tanks and batteries start at the level of their seed.
//! - Only telemetry: no attributes, commands, RPC or MQTT 5 features, and no
//!   TLS, since the clients talk to the loopback address.
//! - Devices of earlier, larger fleets are not deleted; they stay idle.
//! - Each truck holds one TCP connection with both ends in this process, so
//!   fleets of a few hundred trucks or more may need a higher limit of open
//!   files (`ulimit -n`).

mod fleet;
mod sensors;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::auth;
use crate::metadata::{MetadataStore, Role};
use crate::server::{AfterStart, AppState, ServerAddrs};
use fleet::{DemoDevice, DeviceKind};
use transport::FleetContext;

/// Maximum fleet size. A larger `--demo-devices` is lowered to it with a
/// warning, which keeps a typo from opening tens of thousands of connections.
pub const MAX_DEVICES: usize = 10_000;
/// Name of the API key created on every start.
const API_KEY_NAME: &str = "demo";

/// Returns the start hook that launches `devices` simulated devices. The hook
/// spawns the fleet and returns at once.
pub fn starter(devices: usize) -> AfterStart {
    Box::new(move |state: Arc<AppState>, addrs: ServerAddrs| {
        tokio::spawn(run(state, addrs, devices));
    })
}

/// Devices, API key and HTTP client of a fleet that is ready to start.
struct Setup {
    devices: Vec<DemoDevice>,
    created: usize,
    api_key: String,
    http_client: reqwest::Client,
}

/// Sets up the fleet, spawns one task per device and prints the query
/// commands.
async fn run(state: Arc<AppState>, addrs: ServerAddrs, requested: usize) {
    let count = requested.min(MAX_DEVICES);
    if count < requested {
        tracing::warn!(
            requested,
            started = count,
            "demo fleet: --demo-devices is above the maximum of {MAX_DEVICES}, so only {MAX_DEVICES} devices start"
        );
    }
    if count == 0 {
        tracing::info!("demo fleet: --demo-devices is 0, so no devices are started");
        return;
    }

    let (Some(http), Some(mqtt)) = (addrs.http, addrs.mqtt) else {
        tracing::warn!(
            "the demo fleet needs the plain HTTP and MQTT listeners; it does not start with tls.plain_listeners = false"
        );
        return;
    };

    let fleet = Arc::new(FleetContext::new(state.clone()));
    tokio::spawn(fleet.clone().cancel_on_shutdown());

    let setup = match set_up(&state, count).await {
        Ok(setup) => setup,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "demo fleet failed to start, so the server runs without it"
            );
            return;
        }
    };
    if fleet.cancel.is_cancelled() {
        return;
    }

    let http = transport::connect_address(http);
    let mqtt = transport::connect_address(mqtt);
    let started_at_ms = chrono::Utc::now().timestamp_millis();
    let trucks = setup
        .devices
        .iter()
        .filter(|d| d.spec.kind == DeviceKind::Truck)
        .count();
    let sensors = setup.devices.len() - trucks;
    let commands = query_commands(http, &setup.api_key, &setup.devices[0], started_at_ms);

    tokio::spawn(fleet.clone().report_failures());
    for device in setup.devices {
        let fleet = fleet.clone();
        match device.spec.kind {
            DeviceKind::Truck => {
                tokio::spawn(transport::run_truck(device, mqtt, fleet));
            }
            DeviceKind::EnvironmentSensor => {
                let client = setup.http_client.clone();
                tokio::spawn(transport::run_sensor(device, client, http, fleet));
            }
        }
    }

    tracing::info!(
        trucks,
        sensors,
        created = setup.created,
        reused = count - setup.created,
        "demo fleet started: trucks publish over MQTT every 5 s, sensors post over HTTP every 10 s"
    );
    // The commands contain the API key, a secret, so they go to standard
    // output only and never into the log.
    tracing::info!("demo fleet: curl commands that query it are printed on standard output");
    println!(
        "\nDemo fleet: {trucks} trucks (MQTT) and {sensors} environment sensors (HTTP) send telemetry to this server.\n\
         Query it with the viewer API key created for this run; the first data arrives within 10 seconds:\n\n  \
         {}\n  {}\n",
        commands.latest, commands.aggregate
    );
}

/// Creates or reuses the devices, creates the API key and builds the HTTP
/// client.
async fn set_up(state: &AppState, count: usize) -> anyhow::Result<Setup> {
    let metadata = &state.metadata;
    let tenant = metadata
        .default_tenant()
        .await
        .context("cannot read the default tenant")?;

    let provisioned = fleet::provision(metadata, &state.auth, tenant.id, fleet::layout(count))
        .await
        .context("cannot create or update the demo devices")?;

    // The key of an earlier start is printed in its output; revoke it so that
    // only the newest demo key works.
    let revoked = metadata
        .revoke_api_keys_named(tenant.id, API_KEY_NAME)
        .await
        .context("cannot revoke the earlier demo API keys")?;
    if revoked > 0 {
        tracing::debug!(revoked, "revoked the demo API keys of earlier starts");
    }
    let api_key = auth::generate_api_key();
    metadata
        .create_api_key(
            tenant.id,
            API_KEY_NAME,
            Role::Viewer,
            &auth::hash_secret(&api_key),
        )
        .await
        .context("cannot create the demo API key")?;

    let http_client = transport::http_client().context("cannot build the HTTP client")?;
    Ok(Setup {
        devices: provisioned.devices,
        created: provisioned.created,
        api_key,
        http_client,
    })
}

/// Ready-to-paste queries for the data of one device.
struct QueryCommands {
    latest: String,
    aggregate: String,
}

/// Builds the `curl` commands for `device`: its latest values, and one-minute
/// averages of its main value since the start of the minute the fleet
/// started (the default range of one day would print mostly empty buckets).
fn query_commands(
    http: SocketAddr,
    api_key: &str,
    device: &DemoDevice,
    started_at_ms: i64,
) -> QueryCommands {
    let base = format!("http://{http}/api/v1/devices/{}/telemetry", device.id);
    let key = match device.spec.kind {
        DeviceKind::Truck => "speed",
        DeviceKind::EnvironmentSensor => "temperature",
    };
    let start = started_at_ms - started_at_ms.rem_euclid(60_000);
    let curl = |url: String| format!("curl -s -H \"Authorization: Bearer {api_key}\" \"{url}\"");
    QueryCommands {
        latest: curl(format!("{base}/latest")),
        aggregate: curl(format!(
            "{base}?keys={key}&interval=1m&agg=avg&start={start}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_commands_for_truck() {
        let device = DemoDevice {
            spec: fleet::layout(1).remove(0),
            id: "0192e5b0-0000-7000-8000-000000000001".parse().unwrap(),
            token: "fdt_unused".to_owned(),
        };
        let http: SocketAddr = "127.0.0.1:18080".parse().unwrap();
        let commands = query_commands(http, "fak_key", &device, 1_714_953_601_234);
        assert_eq!(
            commands.latest,
            "curl -s -H \"Authorization: Bearer fak_key\" \"http://127.0.0.1:18080/api/v1/devices/0192e5b0-0000-7000-8000-000000000001/telemetry/latest\""
        );
        assert_eq!(
            commands.aggregate,
            "curl -s -H \"Authorization: Bearer fak_key\" \"http://127.0.0.1:18080/api/v1/devices/0192e5b0-0000-7000-8000-000000000001/telemetry?keys=speed&interval=1m&agg=avg&start=1714953600000\""
        );
    }
}
