//! `lorawan`: uplinks of many ABP devices through one simulated Semtech UDP
//! gateway, decoded by a Cayenne LPP profile and stored.
//!
//! Setup through the REST API (an admin API key, because profiles and
//! gateways need that role): the profile `lorawan-bench-lpp`, the gateway
//! `00000000beec0001` and devices `lorawan-bench-0` to `N-1`, each
//! registered for ABP with DevAddr `27000000 + i`. Registering again resets
//! the frame counters, so runs can repeat on one data directory.
//!
//! Load: `--uplinks-per-device` rounds over every device, one uplink per
//! PUSH_DATA datagram, paced to `--rate` uplinks/s. Each uplink carries an
//! LPP temperature on channel 3 whose value encodes the round. The result
//! is the time from the first datagram until every device's latest stored
//! temperature is the one of its last round, so it includes the network
//! server's deduplication window, decryption, the ingest log and decoding
//! in the pipeline.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::Args;
use ferrite_lorawan::mac::{self, AesKey, DataFrame, DevAddr, SessionKeys};
use serde::Serialize;
use serde_json::json;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::stats::round3;
use crate::target::{ensure_loopback_url, loopback_socket};

const PROFILE: &str = "lorawan-bench-lpp";
const GATEWAY_EUI: [u8; 8] = [0, 0, 0, 0, 0xbe, 0xec, 0, 1];
const FIRST_DEV_ADDR: u32 = 0x2700_0000;
const NWK_S_KEY: [u8; 16] = [0x11; 16];
const APP_S_KEY: [u8; 16] = [0x22; 16];

#[derive(Args, Debug)]
pub struct LorawanArgs {
    /// Base URL of the REST API, on loopback, such as http://127.0.0.1:8080.
    #[arg(long)]
    http: String,
    /// UDP address of the LoRaWAN listener, IP:PORT on loopback.
    #[arg(long)]
    lorawan: String,
    /// File whose first line is an API key with the admin role.
    #[arg(long)]
    api_key_file: PathBuf,
    /// Simulated ABP devices.
    #[arg(long, default_value_t = 100)]
    devices: u32,
    /// Uplinks each device sends.
    #[arg(long, default_value_t = 20)]
    uplinks_per_device: u32,
    /// Uplinks sent per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds to wait for the last uplinks to be stored.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Serialize, Debug)]
pub struct LorawanReport {
    pub scenario: &'static str,
    pub devices: u32,
    pub uplinks_sent: u64,
    /// PUSH_ACKs received; fewer than sent means datagrams were lost.
    pub push_acks: u64,
    /// Seconds from the first datagram until every device's last uplink
    /// was stored.
    pub elapsed_s: f64,
    /// Uplinks sent divided by `elapsed_s`.
    pub uplinks_per_s: f64,
    /// Whether every device's last uplink was stored within the timeout.
    pub all_stored: bool,
}

struct Api {
    client: reqwest::Client,
    base: String,
    api_key: String,
}

impl Api {
    /// Sends a JSON request; returns the status and the JSON body.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let mut request = self
            .client
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.api_key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path} failed"))?;
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        Ok((status, body))
    }

    /// Sends a request that must succeed or, for creations, may conflict.
    async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
        allow_conflict: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, response) = self.send(method.clone(), path, Some(body)).await?;
        let ok = (200..300).contains(&status) || (allow_conflict && status == 409);
        anyhow::ensure!(ok, "{method} {path} returned {status}: {response}");
        Ok(response)
    }
}

fn keys() -> SessionKeys {
    SessionKeys {
        nwk_s_key: AesKey(NWK_S_KEY),
        app_s_key: AesKey(APP_S_KEY),
    }
}

/// Returns the temperature (0.1 °C units) that device `index` sends in
/// `round`, so the last round's value identifies the last uplink.
fn temperature(round: u32, index: u32) -> i16 {
    ((round % 300) * 10 + index % 10) as i16
}

/// Creates the profile, the gateway and the devices; returns device ids.
async fn set_up(api: &Api, devices: u32) -> anyhow::Result<Vec<String>> {
    use reqwest::Method;
    api.expect(
        Method::POST,
        "/api/v1/profiles",
        json!({"name": PROFILE, "codec": {"type": "cayenne_lpp"}}),
        true,
    )
    .await?;
    let gateway_eui: String = GATEWAY_EUI
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    api.expect(
        Method::POST,
        "/api/v1/lorawan/gateways",
        json!({"gateway_eui": gateway_eui, "name": "ferrite-bench"}),
        true,
    )
    .await?;

    let mut ids = Vec::with_capacity(devices as usize);
    for index in 0..devices {
        let name = format!("lorawan-bench-{index}");
        let (status, created) = api
            .send(
                Method::POST,
                "/api/v1/devices",
                Some(json!({"name": name, "profile": PROFILE})),
            )
            .await?;
        let id = match status {
            201 => created["id"].as_str().unwrap_or_default().to_owned(),
            409 => {
                let (_, found) = api
                    .send(Method::GET, &format!("/api/v1/devices?name={name}"), None)
                    .await?;
                found["devices"][0]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            }
            other => anyhow::bail!("creating device {name} returned {other}: {created}"),
        };
        anyhow::ensure!(!id.is_empty(), "no id for device {name}");
        api.expect(
            Method::PUT,
            &format!("/api/v1/devices/{id}/lorawan"),
            json!({
                "dev_eui": format!("{:016x}", 0xbe4c_0000_0000_0000u64 + u64::from(index)),
                "activation": "abp",
                "region": "EU868",
                "dev_addr": format!("{:08x}", FIRST_DEV_ADDR + index),
                "nwk_s_key": NWK_S_KEY.iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
                "app_s_key": APP_S_KEY.iter().map(|byte| format!("{byte:02x}")).collect::<String>(),
            }),
            false,
        )
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Builds one PUSH_DATA datagram with one uplink.
fn push_data(token: u16, round: u32, index: u32) -> anyhow::Result<Vec<u8>> {
    let value = temperature(round, index).to_be_bytes();
    let phy_payload = mac::build_data_up(
        &DataFrame {
            dev_addr: DevAddr(FIRST_DEV_ADDR + index),
            f_cnt: round,
            confirmed: false,
            ack: false,
            f_pending: false,
            f_port: Some(2),
            frm_payload: vec![0x03, 0x67, value[0], value[1]],
        },
        &keys(),
    )?;
    let rxpk = json!({
        "tmst": round.wrapping_mul(1_000_000), "chan": 0, "rfch": 0, "freq": 868.1,
        "stat": 1, "modu": "LORA", "datr": "SF7BW125", "codr": "4/5",
        "rssi": -60, "lsnr": 7.0, "size": phy_payload.len(),
        "data": base64::engine::general_purpose::STANDARD.encode(&phy_payload),
    });
    let token = token.to_be_bytes();
    let mut datagram = vec![2, token[0], token[1], 0x00];
    datagram.extend_from_slice(&GATEWAY_EUI);
    datagram.extend_from_slice(json!({ "rxpk": [rxpk] }).to_string().as_bytes());
    Ok(datagram)
}

/// Returns whether the device's latest temperature is `expected`.
async fn last_stored(api: &Api, id: &str, expected: f64) -> anyhow::Result<bool> {
    let (status, latest) = api
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/devices/{id}/telemetry/latest"),
            None,
        )
        .await?;
    let value = latest["temperature_3"]["value"].as_f64();
    Ok(status == 200 && value.is_some_and(|value| (value - expected).abs() < 1e-6))
}

pub async fn run(args: LorawanArgs) -> anyhow::Result<LorawanReport> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.devices),
        "--devices must be from 1 to 100000"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.uplinks_per_device),
        "--uplinks-per-device must be from 1 to 10000"
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.rate),
        "--rate must be from 1 to 100000 uplinks per second"
    );
    anyhow::ensure!(
        (1..=600).contains(&args.timeout_s),
        "--timeout-s must be from 1 to 600"
    );
    let lorawan = loopback_socket(&args.lorawan)?;
    let base = reqwest::Url::parse(&args.http)
        .with_context(|| format!("invalid --http URL {:?}", args.http))?;
    ensure_loopback_url(&base)?;
    let api_key = std::fs::read_to_string(&args.api_key_file).with_context(|| {
        format!(
            "cannot read the API key file {}",
            args.api_key_file.display()
        )
    })?;
    let api = Api {
        client: reqwest::Client::new(),
        base: args.http.trim_end_matches('/').to_owned(),
        api_key: api_key.lines().next().unwrap_or("").trim().to_owned(),
    };
    let ids = set_up(&api, args.devices).await?;

    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    socket.connect(lorawan).await?;
    let push_acks = Arc::new(AtomicU64::new(0));
    let receiver = tokio::spawn({
        let socket = socket.clone();
        let push_acks = push_acks.clone();
        async move {
            let mut buffer = [0u8; 64];
            while let Ok(len) = socket.recv(&mut buffer).await {
                if len >= 4 && buffer[3] == 0x01 {
                    push_acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    // Send, paced: uplink n leaves no earlier than n / rate seconds after
    // the start.
    let started = Instant::now();
    let mut sent = 0u64;
    for round in 0..args.uplinks_per_device {
        for index in 0..args.devices {
            let due = started + Duration::from_secs_f64(sent as f64 / f64::from(args.rate));
            tokio::time::sleep_until(due).await;
            socket
                .send(&push_data(sent as u16, round, index)?)
                .await
                .context("cannot send a PUSH_DATA datagram")?;
            sent += 1;
        }
    }

    // Wait until every device's last uplink is stored.
    let last_round = args.uplinks_per_device - 1;
    let deadline = started + Duration::from_secs(args.timeout_s);
    let mut pending: Vec<(u32, &String)> = (0..args.devices).zip(ids.iter()).collect();
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (index, id) in pending {
            let expected = f64::from(temperature(last_round, index)) / 10.0;
            if !last_stored(&api, id, expected).await? {
                still.push((index, id));
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    receiver.abort();

    Ok(LorawanReport {
        scenario: "lorawan",
        devices: args.devices,
        uplinks_sent: sent,
        push_acks: push_acks.load(Ordering::Relaxed),
        elapsed_s: round3(elapsed),
        uplinks_per_s: round3(sent as f64 / elapsed),
        all_stored: pending.is_empty(),
    })
}
