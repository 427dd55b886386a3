//! LoRaWAN: the registry API and, through a simulated gateway that speaks
//! the Semtech UDP protocol, the network server.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use ferrite_lorawan::mac::{self, AesKey, DataFrame, DevAddr, Eui64, SessionKeys};
use ferrite_lorawan::semtech::{self, Packet, TxPk};
use serde_json::{Value, json};
use tokio::net::UdpSocket;

use crate::support::{Server, wait_until};

/// Sends `method path` with a JSON body and the admin token; returns status
/// and JSON body.
async fn send_json(server: &Server, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("HTTP method");
    let mut request = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http_url))
        .bearer_auth(server.admin_token().await);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn registry_api_stores_devices_without_returning_keys() {
    let server = Server::start().await;
    let device = server.create_device("lora-api-1").await;
    let path = format!("/api/v1/devices/{}/lorawan", device.id);

    let (status, body) = send_json(&server, "GET", &path, None).await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = send_json(
        &server,
        "PUT",
        &path,
        Some(json!({
            "dev_eui": "00-11-22-33-44-55-66-77", "activation": "abp", "region": "EU868",
            "dev_addr": "26011BDA",
            "nwk_s_key": "000102030405060708090a0b0c0d0e0f",
            "app_s_key": "101112131415161718191a1b1c1d1e1f",
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["dev_eui"], "0011223344556677");
    assert_eq!(body["dev_addr"], "26011bda");
    assert!(body.get("nwk_s_key").is_none(), "{body}");

    let (status, body) = send_json(&server, "GET", &path, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["activation"], "abp");
    assert_eq!(body["region"], "EU868");
    assert!(
        !body
            .to_string()
            .contains("000102030405060708090a0b0c0d0e0f")
    );

    let (status, body) = send_json(
        &server,
        "PUT",
        &path,
        Some(json!({"dev_eui": "0011223344556677", "activation": "abp", "region": "EU868"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "dev_addr");

    let other = server.create_device("lora-api-2").await;
    let (status, body) = send_json(
        &server,
        "PUT",
        &format!("/api/v1/devices/{}/lorawan", other.id),
        Some(json!({"dev_eui": "0011223344556677", "activation": "external"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    let (status, _) = send_json(&server, "DELETE", &path, None).await;
    assert_eq!(status, 204);
    let (status, _) = send_json(&server, "GET", &path, None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn gateway_api_registers_lists_and_deletes() {
    let server = Server::start().await;
    let (status, body) = send_json(
        &server,
        "POST",
        "/api/v1/lorawan/gateways",
        Some(json!({"gateway_eui": "AA555A0000000101", "name": "roof"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["gateway_eui"], "aa555a0000000101");

    let (status, body) = send_json(
        &server,
        "POST",
        "/api/v1/lorawan/gateways",
        Some(json!({"gateway_eui": "aa555a0000000101", "name": "again"})),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    let (status, body) = send_json(
        &server,
        "POST",
        "/api/v1/lorawan/gateways",
        Some(json!({"gateway_eui": "aa55", "name": "short"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "gateway_eui");

    let (status, body) = send_json(&server, "GET", "/api/v1/lorawan/gateways", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["gateways"].as_array().unwrap().len(), 1);

    let (status, _) = send_json(
        &server,
        "DELETE",
        "/api/v1/lorawan/gateways/aa555a0000000101",
        None,
    )
    .await;
    assert_eq!(status, 204);
    let (status, _) = send_json(
        &server,
        "DELETE",
        "/api/v1/lorawan/gateways/aa555a0000000101",
        None,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn downlink_queue_validates_and_lists() {
    let server = Server::start().await;
    let device = server.create_device("lora-downlink-api").await;
    let (status, body) = send_json(
        &server,
        "PUT",
        &format!("/api/v1/devices/{}/lorawan", device.id),
        Some(json!({
            "dev_eui": "0011223344556688", "activation": "otaa", "region": "US915",
            "join_eui": "0000000000000000", "app_key": "000102030405060708090a0b0c0d0e0f",
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let path = format!("/api/v1/devices/{}/lorawan/downlinks", device.id);

    let (status, body) = send_json(
        &server,
        "POST",
        &path,
        Some(json!({"f_port": 0, "data": "01"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "f_port");

    let (status, body) = send_json(
        &server,
        "POST",
        &path,
        Some(json!({"f_port": 2, "data": "00".repeat(34)})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["param"], "data");

    let (status, body) = send_json(
        &server,
        "POST",
        &path,
        Some(json!({"f_port": 2, "data": "AQID", "confirmed": true})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"], "010203");

    let (status, body) = send_json(&server, "GET", &path, None).await;
    assert_eq!(status, 200);
    let queue = body["downlinks"].as_array().unwrap();
    assert_eq!(queue.len(), 1);
    assert_eq!(queue[0]["f_port"], 2);
    assert_eq!(queue[0]["confirmed"], true);
}

// --- simulated gateway ----------------------------------------------------

const NWK_S_KEY: [u8; 16] = [
    0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15, 0x88, 0x09, 0xcf, 0x4f, 0x3c,
];
const APP_S_KEY: [u8; 16] = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
];
const APP_KEY: [u8; 16] = [
    0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf, 0xb0,
];
/// Cayenne LPP: temperature 27.2 °C on channel 3.
const LPP_TEMPERATURE: [u8; 4] = [0x03, 0x67, 0x01, 0x10];

fn abp_keys() -> SessionKeys {
    SessionKeys {
        nwk_s_key: AesKey(NWK_S_KEY),
        app_s_key: AesKey(APP_S_KEY),
    }
}

/// A packet forwarder on a loopback UDP socket, speaking protocol version 2.
struct Gateway {
    socket: UdpSocket,
    eui: [u8; 8],
    server: SocketAddr,
    /// PULL_RESP packets received while waiting for something else.
    pull_resps: Vec<(u16, TxPk)>,
    next_token: u16,
}

impl Gateway {
    /// Binds a gateway and, when `register` is set, registers its EUI.
    async fn start(server: &Server, eui: [u8; 8], register: bool) -> Gateway {
        if register {
            let (status, body) = send_json(
                server,
                "POST",
                "/api/v1/lorawan/gateways",
                Some(json!({"gateway_eui": hex::encode(eui), "name": "test gateway"})),
            )
            .await;
            assert_eq!(status, 201, "{body}");
        }
        Gateway {
            socket: UdpSocket::bind("127.0.0.1:0").await.expect("bind gateway"),
            eui,
            server: server.lorawan_addr,
            pull_resps: Vec::new(),
            next_token: 1,
        }
    }

    fn token(&mut self) -> u16 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    /// Receives until `accept` takes a packet or `timeout` passes; PULL_RESP
    /// packets are kept for [`Gateway::pull_resp`].
    async fn receive(
        &mut self,
        timeout: Duration,
        accept: impl Fn(&Packet) -> bool,
    ) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut buffer = vec![0u8; 65_535];
        loop {
            let received = tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await;
            let Ok(Ok(len)) = received else {
                return None;
            };
            let packet = semtech::decode(&buffer[..len]).expect("the server sends valid packets");
            if accept(&packet) {
                return Some(packet);
            }
            if let Packet::PullResp { token, payload, .. } = packet {
                self.pull_resps.push((token, payload.txpk));
            }
        }
    }

    /// Sends PULL_DATA and returns whether PULL_ACK came back.
    async fn pull(&mut self) -> bool {
        let token = self.token();
        let packet = Packet::PullData {
            version: 2,
            token,
            gateway_eui: self.eui,
        };
        self.socket
            .send_to(&semtech::encode(&packet), self.server)
            .await
            .unwrap();
        self.receive(
            Duration::from_secs(2),
            |packet| matches!(packet, Packet::PullAck { token: acked, .. } if *acked == token),
        )
        .await
        .is_some()
    }

    /// Sends PUSH_DATA with `rxpk` and returns whether PUSH_ACK came back.
    async fn push(&mut self, rxpk: Vec<Value>) -> bool {
        let token = self.token();
        let mut bytes = vec![2, (token >> 8) as u8, token as u8, semtech::PUSH_DATA];
        bytes.extend_from_slice(&self.eui);
        bytes.extend_from_slice(json!({ "rxpk": rxpk }).to_string().as_bytes());
        self.socket.send_to(&bytes, self.server).await.unwrap();
        self.receive(
            Duration::from_secs(2),
            |packet| matches!(packet, Packet::PushAck { token: acked, .. } if *acked == token),
        )
        .await
        .is_some()
    }

    /// Returns the next PULL_RESP with its token, waiting up to `timeout`.
    async fn pull_resp(&mut self, timeout: Duration) -> Option<(u16, TxPk)> {
        if !self.pull_resps.is_empty() {
            return Some(self.pull_resps.remove(0));
        }
        match self
            .receive(timeout, |packet| matches!(packet, Packet::PullResp { .. }))
            .await
        {
            Some(Packet::PullResp { token, payload, .. }) => Some((token, payload.txpk)),
            _ => None,
        }
    }

    async fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).await.unwrap();
    }
}

/// Builds an `rxpk` object for a PHYPayload received on 868.1 MHz, SF7BW125.
fn rxpk(phy_payload: &[u8], tmst: u32, rssi: i32, snr: f64) -> Value {
    json!({
        "tmst": tmst, "chan": 0, "rfch": 0, "freq": 868.1, "stat": 1,
        "modu": "LORA", "datr": "SF7BW125", "codr": "4/5",
        "rssi": rssi, "lsnr": snr, "size": phy_payload.len(),
        "data": base64::engine::general_purpose::STANDARD.encode(phy_payload),
    })
}

fn uplink(
    dev_addr: u32,
    f_cnt: u32,
    confirmed: bool,
    f_port: Option<u8>,
    payload: &[u8],
    keys: &SessionKeys,
) -> Vec<u8> {
    mac::build_data_up(
        &DataFrame {
            dev_addr: DevAddr(dev_addr),
            f_cnt,
            confirmed,
            ack: false,
            f_pending: false,
            f_port,
            frm_payload: payload.to_vec(),
        },
        keys,
    )
    .expect("valid uplink")
}

/// Creates a device, optionally with a profile, and registers it for ABP
/// with [`abp_keys`].
async fn abp_device(
    server: &Server,
    name: &str,
    dev_eui: &str,
    dev_addr: u32,
    profile: Option<&str>,
) -> String {
    let device = server.create_device(name).await;
    if let Some(profile) = profile {
        let (status, body) = send_json(
            server,
            "PATCH",
            &format!("/api/v1/devices/{}", device.id),
            Some(json!({ "profile": profile })),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = send_json(
        server,
        "PUT",
        &format!("/api/v1/devices/{}/lorawan", device.id),
        Some(json!({
            "dev_eui": dev_eui, "activation": "abp", "region": "EU868",
            "dev_addr": format!("{dev_addr:08x}"),
            "nwk_s_key": hex::encode(NWK_S_KEY), "app_s_key": hex::encode(APP_S_KEY),
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    device.id
}

async fn create_lpp_profile(server: &Server) {
    let (status, body) = send_json(
        server,
        "POST",
        "/api/v1/profiles",
        Some(json!({"name": "lpp", "codec": {"type": "cayenne_lpp"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

/// Returns the value of one metric line, such as
/// `ferrite_lorawan_uplinks_total{outcome="stored"}`, or 0 when absent.
async fn metric(server: &Server, series: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", server.http_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

async fn wait_for_metric(server: &Server, series: &str, expected: f64) {
    let reached = wait_until(
        || async { metric(server, series).await >= expected },
        Duration::from_secs(5),
    )
    .await;
    assert!(
        reached,
        "{series} did not reach {expected}: {}",
        metric(server, series).await
    );
}

async fn wait_for_latest(server: &Server, device_id: &str, key: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let latest = server.latest(device_id).await;
        if let Some(point) = latest.get(key) {
            return point.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{key} not stored: {latest}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the device's first dead letter and returns the list.
async fn wait_for_dead_letters(server: &Server, device_id: &str) -> Vec<Value> {
    let path = format!("/api/v1/devices/{device_id}/dead-letters");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, body) = send_json(server, "GET", &path, None).await;
        if let Some(list) = body["dead_letters"].as_array()
            && !list.is_empty()
        {
            return list.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- network server -------------------------------------------------------

#[tokio::test]
async fn abp_uplink_decoded_by_lpp_profile() {
    let server = Server::start().await;
    create_lpp_profile(&server).await;
    let device = abp_device(
        &server,
        "abp-lpp",
        "0000000000000101",
        0x2601_0101,
        Some("lpp"),
    )
    .await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 1], true).await;

    let phy = uplink(
        0x2601_0101,
        1,
        false,
        Some(2),
        &LPP_TEMPERATURE,
        &abp_keys(),
    );
    assert!(
        gateway.push(vec![rxpk(&phy, 1_000_000, -40, 7.5)]).await,
        "no PUSH_ACK"
    );

    let temperature = wait_for_latest(&server, &device, "temperature_3").await;
    assert_eq!(temperature["value"], 27.2);
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"stored\"}",
        1.0,
    )
    .await;
    let (_, registration) = send_json(
        &server,
        "GET",
        &format!("/api/v1/devices/{device}/lorawan"),
        None,
    )
    .await;
    assert_eq!(registration["f_cnt_up"], 1);
}

#[tokio::test]
async fn otaa_join_accept_gives_working_session() {
    let server = Server::start().await;
    create_lpp_profile(&server).await;
    let device = server.create_device("otaa-1").await;
    let (status, body) = send_json(
        &server,
        "PATCH",
        &format!("/api/v1/devices/{}", device.id),
        Some(json!({"profile": "lpp"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let join_eui = Eui64([0x70, 0xb3, 0xd5, 0x7e, 0xd0, 0, 0, 0x01]);
    let dev_eui = Eui64([0, 0, 0, 0, 0, 0, 0x02, 0x01]);
    let (status, body) = send_json(
        &server,
        "PUT",
        &format!("/api/v1/devices/{}/lorawan", device.id),
        Some(json!({
            "dev_eui": dev_eui.to_string(), "activation": "otaa", "region": "EU868",
            "join_eui": join_eui.to_string(), "app_key": hex::encode(APP_KEY),
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 2], true).await;
    assert!(gateway.pull().await, "no PULL_ACK");

    let dev_nonce = 0x1234;
    let request = mac::build_join_request(join_eui, dev_eui, dev_nonce, AesKey(APP_KEY));
    let tmst = 4_294_000_000u32;
    assert!(gateway.push(vec![rxpk(&request, tmst, -60, 9.0)]).await);
    let (_, txpk) = gateway
        .pull_resp(Duration::from_secs(3))
        .await
        .expect("join accept in PULL_RESP");

    // RX1 of a join accept: JOIN_ACCEPT_DELAY1 (5 s) after the uplink, on
    // the uplink's frequency and data rate, with inverted polarity.
    assert_eq!(txpk.tmst, Some(tmst.wrapping_add(5_000_000)));
    assert_eq!(txpk.freq, 868.1);
    assert_eq!(txpk.datr, semtech::DataRateField::Lora("SF7BW125".into()));
    assert!(txpk.ipol);
    let (accept, keys) = mac::open_join_accept(&txpk.phy_payload(), AesKey(APP_KEY), dev_nonce)
        .expect("join accept opens with the AppKey");
    assert_eq!(accept.rx2_data_rate, 0);
    assert_eq!(accept.rx1_dr_offset, 0);
    let (_, registration) = send_json(
        &server,
        "GET",
        &format!("/api/v1/devices/{}/lorawan", device.id),
        None,
    )
    .await;
    assert_eq!(registration["dev_addr"], accept.dev_addr.to_string());
    assert!(registration["joined_at"].is_i64(), "{registration}");

    // The session the device derived works for data.
    let phy = uplink(
        accept.dev_addr.0,
        0,
        false,
        Some(1),
        &LPP_TEMPERATURE,
        &keys,
    );
    assert!(gateway.push(vec![rxpk(&phy, 10, -60, 9.0)]).await);
    let temperature = wait_for_latest(&server, &device.id, "temperature_3").await;
    assert_eq!(temperature["value"], 27.2);

    // The same join request again is a replay.
    assert!(gateway.push(vec![rxpk(&request, tmst, -60, 9.0)]).await);
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"dev_nonce_replayed\"}",
        1.0,
    )
    .await;
    assert!(
        gateway
            .pull_resp(Duration::from_millis(500))
            .await
            .is_none(),
        "replayed join got an answer"
    );
}

#[tokio::test]
async fn two_gateways_merge_into_one_uplink() {
    let server = Server::start().await;
    // No profile: the raw uplink lands in the dead-letter log with its
    // metadata, which shows both gateways.
    let device = abp_device(&server, "abp-two", "0000000000000301", 0x2601_0301, None).await;
    let mut near = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 3], true).await;
    let mut far = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 4], true).await;

    let phy = uplink(0x2601_0301, 5, false, Some(3), b"\x01\x02", &abp_keys());
    assert!(far.push(vec![rxpk(&phy, 100, -110, -5.0)]).await);
    assert!(near.push(vec![rxpk(&phy, 200, -50, 8.0)]).await);

    wait_for_dead_letters(&server, &device).await;
    // Give a second copy time to show up if deduplication failed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let list = wait_for_dead_letters(&server, &device).await;
    assert_eq!(list.len(), 1, "{list:?}");
    let meta = &list[0]["meta"];
    assert_eq!(meta["f_port"], 3);
    assert_eq!(meta["f_cnt"], 5);
    assert_eq!(meta["dev_eui"], "0000000000000301");
    assert_eq!(meta["dev_addr"], "26010301");
    assert_eq!(meta["frequency_hz"], 868_100_000);
    assert_eq!(meta["data_rate"], "SF7BW125");
    let gateways = meta["gateways"].as_array().unwrap();
    assert_eq!(gateways.len(), 2, "{meta}");
    // The best signal comes first.
    assert_eq!(gateways[0]["gateway_eui"], "0100000000000003");
    assert_eq!(gateways[0]["rssi"], -50);
    assert_eq!(gateways[0]["snr"], 8.0);
    assert_eq!(gateways[1]["gateway_eui"], "0100000000000004");
    assert_eq!(gateways[1]["tmst"], 100);
    assert!(gateways[1]["received_at"].is_string());
    assert_eq!(
        metric(&server, "ferrite_lorawan_duplicate_receptions_total").await,
        1.0
    );
}

#[tokio::test]
async fn f_cnt_replay_rejected_and_rollover_accepted() {
    let server = Server::start().await;
    create_lpp_profile(&server).await;
    let device = abp_device(
        &server,
        "abp-fcnt",
        "0000000000000401",
        0x2601_0401,
        Some("lpp"),
    )
    .await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 5], true).await;
    let keys = abp_keys();
    let counter_path = format!("/api/v1/devices/{device}/lorawan");

    for (f_cnt, expected_last) in [
        (65_534u32, 65_534),
        (65_535, 65_535),
        (65_536, 65_536),
        (65_540, 65_540),
    ] {
        let phy = uplink(0x2601_0401, f_cnt, false, Some(2), &LPP_TEMPERATURE, &keys);
        assert!(gateway.push(vec![rxpk(&phy, f_cnt, -40, 7.0)]).await);
        let advanced = wait_until(
            || async {
                send_json(&server, "GET", &counter_path, None).await.1["f_cnt_up"] == expected_last
            },
            Duration::from_secs(5),
        )
        .await;
        assert!(advanced, "f_cnt_up did not reach {expected_last}");
    }

    // Frames 65535 (before the rollover) and 65540 again are replays.
    for f_cnt in [65_535u32, 65_540] {
        let phy = uplink(0x2601_0401, f_cnt, false, Some(2), &LPP_TEMPERATURE, &keys);
        assert!(gateway.push(vec![rxpk(&phy, 7, -40, 7.0)]).await);
    }
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"f_cnt_replayed\"}",
        2.0,
    )
    .await;
    assert_eq!(
        send_json(&server, "GET", &counter_path, None).await.1["f_cnt_up"],
        65_540
    );
    assert_eq!(
        metric(&server, "ferrite_lorawan_uplinks_total{outcome=\"stored\"}").await,
        4.0
    );
}

#[tokio::test]
async fn invalid_mic_dropped_and_counted() {
    let server = Server::start().await;
    let device = abp_device(&server, "abp-mic", "0000000000000501", 0x2601_0501, None).await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 6], true).await;
    let wrong = SessionKeys {
        nwk_s_key: AesKey([9; 16]),
        app_s_key: AesKey(APP_S_KEY),
    };
    let phy = uplink(0x2601_0501, 1, false, Some(2), b"\x01", &wrong);
    assert!(gateway.push(vec![rxpk(&phy, 1, -40, 7.0)]).await);
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"mic_invalid\"}",
        1.0,
    )
    .await;
    let (_, registration) = send_json(
        &server,
        "GET",
        &format!("/api/v1/devices/{device}/lorawan"),
        None,
    )
    .await;
    assert!(registration["f_cnt_up"].is_null(), "{registration}");

    // An unknown DevAddr is counted apart.
    let phy = uplink(0x0bad_0bad, 1, false, Some(2), b"\x01", &abp_keys());
    assert!(gateway.push(vec![rxpk(&phy, 2, -40, 7.0)]).await);
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"unknown_device\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn confirmed_uplink_gets_ack_downlink() {
    let server = Server::start().await;
    abp_device(&server, "abp-ack", "0000000000000601", 0x2601_0601, None).await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 7], true).await;
    assert!(gateway.pull().await);

    let phy = uplink(0x2601_0601, 3, true, Some(2), b"\x01", &abp_keys());
    let tmst = 3_000_000;
    assert!(gateway.push(vec![rxpk(&phy, tmst, -40, 7.0)]).await);
    let (token, txpk) = gateway
        .pull_resp(Duration::from_secs(2))
        .await
        .expect("ACK downlink");
    assert_eq!(
        txpk.tmst,
        Some(tmst + 1_000_000),
        "RX1 is one second after the uplink"
    );
    assert_eq!(txpk.freq, 868.1);
    let down = mac::open_data_down(&txpk.phy_payload(), &abp_keys(), 0)
        .expect("downlink opens with the session keys");
    assert!(down.ack);
    assert_eq!(down.dev_addr, DevAddr(0x2601_0601));
    assert_eq!(down.f_port, None);

    // A TX_ACK error of the gateway is counted.
    let mut tx_ack = vec![2, (token >> 8) as u8, token as u8, semtech::TX_ACK];
    tx_ack.extend_from_slice(&gateway.eui);
    tx_ack.extend_from_slice(br#"{"txpk_ack":{"error":"TOO_LATE"}}"#);
    gateway.send_raw(&tx_ack).await;
    wait_for_metric(
        &server,
        "ferrite_lorawan_tx_ack_errors_total{error=\"TOO_LATE\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn confirmed_retransmission_acked_again() {
    let server = Server::start().await;
    abp_device(&server, "abp-retx", "0000000000000602", 0x2601_0602, None).await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 12], true).await;
    assert!(gateway.pull().await);

    // The device did not hear the first ACK, so it sends the confirmed
    // uplink again with the same FCnt after the deduplication window.
    let phy = uplink(0x2601_0602, 5, true, Some(2), b"\x01", &abp_keys());
    for (attempt, tmst) in [(0u32, 5_000_000u32), (1, 9_000_000)] {
        assert!(gateway.push(vec![rxpk(&phy, tmst, -40, 7.0)]).await);
        let (_, txpk) = gateway
            .pull_resp(Duration::from_secs(2))
            .await
            .expect("ACK downlink for every transmission");
        let down = mac::open_data_down(&txpk.phy_payload(), &abp_keys(), attempt)
            .expect("downlink opens with the next FCntDown");
        assert!(down.ack, "attempt {attempt} is acknowledged");
    }

    // The data is stored once; the retransmission is counted apart.
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"retransmission\"}",
        1.0,
    )
    .await;
    assert_eq!(
        metric(&server, "ferrite_lorawan_uplinks_total{outcome=\"stored\"}").await,
        1.0
    );

    // An unconfirmed frame with an old counter stays a replay.
    let replay = uplink(0x2601_0602, 5, false, Some(2), b"\x01", &abp_keys());
    assert!(
        gateway
            .push(vec![rxpk(&replay, 13_000_000, -40, 7.0)])
            .await
    );
    wait_for_metric(
        &server,
        "ferrite_lorawan_uplinks_total{outcome=\"f_cnt_replayed\"}",
        1.0,
    )
    .await;
    assert!(
        gateway
            .pull_resp(Duration::from_millis(1500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn queued_downlink_sent_after_next_uplink() {
    let server = Server::start().await;
    let device = abp_device(&server, "abp-queue", "0000000000000701", 0x2601_0701, None).await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 8], true).await;
    assert!(gateway.pull().await);
    let queue_path = format!("/api/v1/devices/{device}/lorawan/downlinks");
    let (status, body) = send_json(
        &server,
        "POST",
        &queue_path,
        Some(json!({"f_port": 10, "data": "cafe"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let phy = uplink(0x2601_0701, 1, false, Some(2), b"\x01", &abp_keys());
    assert!(gateway.push(vec![rxpk(&phy, 50, -40, 7.0)]).await);
    let (_, txpk) = gateway
        .pull_resp(Duration::from_secs(2))
        .await
        .expect("queued downlink");
    let down = mac::open_data_down(&txpk.phy_payload(), &abp_keys(), 0).expect("downlink opens");
    assert_eq!(down.f_port, Some(10));
    assert_eq!(down.frm_payload, vec![0xca, 0xfe]);
    assert!(!down.ack);

    // The server marks the downlink sent right after it sends the
    // PULL_RESP, so the queue may still list it for a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let queue = loop {
        let (_, queue) = send_json(&server, "GET", &queue_path, None).await;
        if queue["downlinks"].as_array().unwrap().is_empty()
            || tokio::time::Instant::now() > deadline
        {
            break queue;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(queue["downlinks"].as_array().unwrap().len(), 0, "{queue}");
    let (_, registration) = send_json(
        &server,
        "GET",
        &format!("/api/v1/devices/{device}/lorawan"),
        None,
    )
    .await;
    assert_eq!(registration["f_cnt_down"], 1);
}

#[tokio::test]
async fn unknown_gateway_gets_no_ack() {
    let server = Server::start().await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 9], false).await;
    let phy = uplink(0x2601_0801, 1, false, Some(2), b"\x01", &abp_keys());
    assert!(
        !gateway.push(vec![rxpk(&phy, 1, -40, 7.0)]).await,
        "PUSH_ACK to an unknown gateway"
    );
    assert!(!gateway.pull().await, "PULL_ACK to an unknown gateway");
    wait_for_metric(
        &server,
        "ferrite_lorawan_datagrams_rejected_total{reason=\"unknown_gateway\"}",
        2.0,
    )
    .await;

    // A TX_ACK of an unknown gateway neither counts as a gateway's
    // transmission error nor consumes another gateway's token.
    let mut tx_ack = vec![2, 0x12, 0x34, semtech::TX_ACK];
    tx_ack.extend_from_slice(&gateway.eui);
    tx_ack.extend_from_slice(br#"{"txpk_ack":{"error":"COLLISION_PACKET"}}"#);
    gateway.send_raw(&tx_ack).await;
    wait_for_metric(
        &server,
        "ferrite_lorawan_datagrams_rejected_total{reason=\"unknown_gateway\"}",
        3.0,
    )
    .await;
    assert_eq!(
        metric(
            &server,
            "ferrite_lorawan_tx_ack_errors_total{error=\"COLLISION_PACKET\"}"
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn malformed_datagrams_counted_listener_serves_on() {
    let server = Server::start().await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 10], true).await;
    let mut header = vec![2, 0, 1, semtech::PUSH_DATA];
    header.extend_from_slice(&gateway.eui);
    let bad_json = [header.clone(), b"{\"rxpk\":[{\"tmst\":\"soon\"}]}".to_vec()].concat();
    let not_json = [header.clone(), b"\xff\xfe".to_vec()].concat();
    for datagram in [
        &[2u8, 0][..],
        &[2, 0, 1, semtech::PULL_DATA, 1, 2],
        &[9, 0, 0, 0],
        &bad_json,
        &not_json,
    ] {
        gateway.send_raw(datagram).await;
    }
    wait_for_metric(
        &server,
        "ferrite_lorawan_datagrams_rejected_total{reason=\"malformed\"}",
        5.0,
    )
    .await;
    assert!(gateway.pull().await, "the listener stopped serving");
}

#[tokio::test]
async fn script_decoder_sees_f_port() {
    let server = Server::start().await;
    let script = "function decodeUplink(input) { return { data: { port: input.fPort, first: input.bytes[0] } }; }";
    let (status, body) = send_json(
        &server,
        "POST",
        "/api/v1/profiles",
        Some(json!({"name": "ports", "codec": {"type": "script", "script": script}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let device = abp_device(
        &server,
        "abp-script",
        "0000000000000901",
        0x2601_0901,
        Some("ports"),
    )
    .await;
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 11], true).await;

    let phy = uplink(0x2601_0901, 1, false, Some(42), b"\x07", &abp_keys());
    assert!(gateway.push(vec![rxpk(&phy, 1, -40, 7.0)]).await);
    assert_eq!(
        wait_for_latest(&server, &device, "port").await["value"],
        42.0
    );
    assert_eq!(
        wait_for_latest(&server, &device, "first").await["value"],
        7.0
    );
}

#[tokio::test]
async fn us915_confirmed_uplink_answered_on_rx1_channel() {
    let server = Server::start().await;
    let device = server.create_device("us915-ack").await;
    let (status, body) = send_json(
        &server,
        "PUT",
        &format!("/api/v1/devices/{}/lorawan", device.id),
        Some(json!({
            "dev_eui": "0000000000000a01", "activation": "abp", "region": "US915",
            "dev_addr": "26010a01",
            "nwk_s_key": hex::encode(NWK_S_KEY), "app_s_key": hex::encode(APP_S_KEY),
        })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut gateway = Gateway::start(&server, [1, 0, 0, 0, 0, 0, 0, 12], true).await;
    assert!(gateway.pull().await);

    // Uplink channel 9 (904.1 MHz) at DR2 (SF8BW125).
    let phy = uplink(0x2601_0a01, 1, true, Some(2), b"\x01", &abp_keys());
    let mut packet = rxpk(&phy, 9_000_000, -40, 7.0);
    packet["freq"] = json!(904.1);
    packet["datr"] = json!("SF8BW125");
    assert!(gateway.push(vec![packet]).await);
    let (_, txpk) = gateway
        .pull_resp(Duration::from_secs(2))
        .await
        .expect("ACK downlink");
    // RX1: downlink channel 9 mod 8 = 1 (923.9 MHz) at DR12 (SF8BW500).
    assert_eq!(txpk.tmst, Some(10_000_000));
    assert_eq!(txpk.freq, 923.9);
    assert_eq!(txpk.datr, semtech::DataRateField::Lora("SF8BW500".into()));
    assert_eq!(txpk.powe, 20);
    let down = mac::open_data_down(&txpk.phy_payload(), &abp_keys(), 0).expect("downlink opens");
    assert!(down.ack);
}
