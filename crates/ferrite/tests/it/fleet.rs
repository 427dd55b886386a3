//! Fleet queries by label, calendar buckets in a time zone, rollup tiers and
//! the compaction endpoint, through the HTTP API of the real binary.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Server, wait_until};

/// 2024-03-30T00:00:00Z: the Saturday before daylight-saving time starts in
/// Europe on Sunday 2024-03-31 at 01:00 UTC.
const T0_MS: i64 = 1_711_756_800_000;

async fn write_lines(server: &Server, key: &str, body: String) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/write?precision=ms&device_tag=name",
            server.http_url
        ))
        .header("Authorization", format!("Token {key}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
}

/// Three trucks in two fleets, one reading per 10 minutes for three days.
fn fleet_lines() -> String {
    let trucks = [
        ("truck_1", "South", 1.0),
        ("truck_2", "South", 2.0),
        ("truck_3", "North", 3.0),
    ];
    let mut body = String::new();
    for step in 0..(3 * 144) {
        let ts = T0_MS + step * 600_000;
        for (name, fleet, base) in trucks {
            let fuel = if name == "truck_2" { 0.05 } else { 0.5 };
            body.push_str(&format!(
                "readings,name={name},fleet={fleet} velocity={base},fuel={fuel} {ts}\n"
            ));
        }
    }
    body
}

#[tokio::test]
async fn fleet_latest_aggregate_and_calendar_days() {
    let server = Server::start_with_env(&[("FERRITE_STORAGE_FLUSH_INTERVAL", "200ms")]).await;
    let key = server.create_api_key("fleet", "admin");
    write_lines(&server, &key, fleet_lines()).await;
    let last_ms = T0_MS + (3 * 144 - 1) * 600_000;

    // Labels reach the metadata store asynchronously.
    let labelled = wait_until(
        || async {
            let (_, body) = server
                .get_json("/api/v1/telemetry/latest?keys=readings.velocity&label=fleet:South")
                .await;
            body["devices"].as_array().is_some_and(|d| d.len() == 2)
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(labelled, "fleet South never had two trucks");

    let (status, body) = server
        .get_json("/api/v1/telemetry/latest?keys=readings.velocity&label=fleet:South")
        .await;
    assert_eq!(status, 200, "{body}");
    let mut names: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["truck_1", "truck_2"]);
    let first = &body["devices"][0];
    assert_eq!(first["values"]["readings.velocity"]["ts"], json!(last_ms));
    assert_eq!(first["labels"]["fleet"], json!("South"));

    let (status, body) = server
        .get_json("/api/v1/telemetry/latest?keys=readings.fuel&filter=readings.fuel<0.1")
        .await;
    assert_eq!(status, 200, "{body}");
    let low: Vec<&str> = body["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(low, ["truck_2"]);

    // Average per fleet per hour over one day: every point weighs the same.
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/telemetry/aggregate?key=readings.velocity&agg=avg&interval=1h&start={T0_MS}&end={}&group_by=fleet",
            T0_MS + 86_400_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let groups = body["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2);
    let south = groups
        .iter()
        .find(|g| g["group"] == json!("South"))
        .unwrap();
    assert_eq!(south["buckets"].as_array().unwrap().len(), 24);
    assert_eq!(south["buckets"][0]["value"], json!(1.5));
    assert_eq!(south["buckets"][0]["count"], json!(12));

    // Calendar days in Berlin: 2024-03-31 has 23 hours, so 138 readings
    // of each truck, against 144 on the day before.
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/telemetry/aggregate?key=readings.velocity&agg=count&interval=1d&tz=Europe/Berlin&start={T0_MS}&end={}&group_by=device&label=fleet:North",
            T0_MS + 3 * 86_400_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["groups"][0]["buckets"].as_array().unwrap();
    let starts: Vec<i64> = buckets.iter().map(|b| b["ts"].as_i64().unwrap()).collect();
    // Local midnights: 2024-03-29T23:00Z, 03-30T23:00Z, 03-31T22:00Z, 04-01T22:00Z.
    assert_eq!(
        starts,
        [
            T0_MS - 3_600_000,
            T0_MS + 23 * 3_600_000,
            T0_MS + 46 * 3_600_000,
            T0_MS + 70 * 3_600_000
        ]
    );
    let counts: Vec<i64> = buckets
        .iter()
        .map(|b| b["count"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [138, 138, 144, 12]);
    assert_eq!(body["tier"], json!("1h"), "Berlin days are whole UTC hours");

    // An unknown zone and too many points are rejected, naming the parameter.
    let (status, body) = server
        .get_json(
            "/api/v1/telemetry/aggregate?key=readings.velocity&agg=avg&interval=1d&tz=Mars/Olympus",
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["param"], json!("tz"), "{body}");
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/telemetry/aggregate?key=readings.velocity&agg=avg&interval=1m&max_points=100&start={T0_MS}&end={last_ms}"
        ))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["param"], json!("max_points"), "{body}");
}

#[tokio::test]
async fn rollup_tiers_answer_and_agree_with_raw_points() {
    let server = Server::start_with_env(&[("FERRITE_STORAGE_FLUSH_INTERVAL", "200ms")]).await;
    let key = server.create_api_key("fleet", "admin");
    write_lines(&server, &key, fleet_lines()).await;
    let (_, devices) = server.get_json("/api/v1/devices?name=truck_3").await;
    let id = devices["devices"][0]["id"].as_str().unwrap().to_owned();

    // A late point inside an already written hour changes that hour's row.
    write_lines(
        &server,
        &key,
        format!(
            "readings,name=truck_3,fleet=North velocity=303 {}\n",
            T0_MS + 60_000
        ),
    )
    .await;

    let query = |interval: &str| {
        format!(
            "/api/v1/devices/{id}/telemetry?keys=readings.velocity&agg=sum&interval={interval}&start={T0_MS}&end={}",
            T0_MS + 86_400_000
        )
    };
    let fetch = |path: String| {
        let server = &server;
        async move {
            let response = reqwest::Client::new()
                .get(format!("{}{path}", server.http_url))
                .bearer_auth(server.admin_token().await)
                .send()
                .await
                .unwrap();
            let tier = response
                .headers()
                .get("ferrite-tier")
                .map(|v| v.to_str().unwrap().to_owned());
            let body: Value = response.json().await.unwrap();
            (tier, body)
        }
    };
    // Wait until the late point is visible.
    let seen = wait_until(
        || async {
            let (_, body) = fetch(query("1h")).await;
            body["readings.velocity"][0]["value"] == json!(3.0 * 6.0 + 303.0)
        },
        Duration::from_secs(10),
    )
    .await;
    assert!(seen, "the late point never reached the hourly sum");

    let (tier, hourly) = fetch(query("1h")).await;
    assert_eq!(tier.as_deref(), Some("1h"));
    let (tier, raw) = fetch(query("3600001")).await;
    assert_eq!(tier.as_deref(), Some("raw"));
    let (tier, daily) = fetch(query("1d")).await;
    assert_eq!(tier.as_deref(), Some("1d"));
    let hourly_sum: f64 = hourly["readings.velocity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["value"].as_f64().unwrap())
        .sum();
    let raw_sum: f64 = raw["readings.velocity"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["value"].as_f64().unwrap_or(0.0))
        .sum();
    assert_eq!(hourly_sum, 144.0 * 3.0 + 303.0);
    assert_eq!(raw_sum, hourly_sum);
    assert_eq!(daily["readings.velocity"][0]["value"], json!(hourly_sum));

    // Compaction on demand keeps every result.
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/admin/compact", server.http_url))
        .bearer_auth(server.admin_token().await)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, after) = fetch(query("1h")).await;
    assert_eq!(after, hourly);

    // interval=auto picks the finest tier within max_points.
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/devices/{id}/telemetry?keys=readings.velocity&agg=avg&interval=auto&max_points=30&start={T0_MS}&end={}",
            T0_MS + 86_400_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["readings.velocity"].as_array().unwrap().len(), 24);
}
