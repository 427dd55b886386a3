//! LoRaWAN: the registry API and, through a simulated gateway that speaks
//! the Semtech UDP protocol, the network server.

use serde_json::{Value, json};

use crate::support::Server;

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
