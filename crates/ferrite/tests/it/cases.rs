//! Faults that other IoT platforms and time-series databases suffered, each
//! as a table of inputs with the response Ferrite must give: line-protocol
//! escaping, timestamp units and range, JSON number forms, bucket alignment,
//! and query validation with paging.

use serde_json::{Value, json};

use crate::support::{Server, TestDevice};

async fn write_lp(
    server: &Server,
    token: &str,
    precision: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut url = format!("{}/write", server.http_url);
    if let Some(precision) = precision {
        url.push_str(&format!("?precision={precision}"));
    }
    let response = reqwest::Client::new()
        .post(url)
        .header("Authorization", format!("Token {token}"))
        .header("Content-Type", "text/plain")
        .body(body.to_owned())
        .send()
        .await
        .expect("write request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

async fn post_json(server: &Server, token: &str, body: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/{token}/telemetry", server.http_url))
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("telemetry request");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Raw points of one key over [start, end) in epoch ms, waiting until the
/// pipeline has stored `expected` points (or 5 s passed).
async fn points(
    server: &Server,
    device: &TestDevice,
    key: &str,
    start: i64,
    end: i64,
    expected: usize,
) -> Vec<Value> {
    let path = format!(
        "/api/v1/devices/{}/telemetry?keys={}&start={start}&end={end}&limit=10000",
        device.id,
        urlencode(key)
    );
    let mut last = Vec::new();
    for _ in 0..100 {
        let (status, body) = server.get_json(&path).await;
        assert_eq!(status, 200, "query failed: {body}");
        last = body[key].as_array().cloned().unwrap_or_default();
        if last.len() >= expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    last
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

const TS_MS: i64 = 1_700_000_000_000;

/// Writes a marker point and waits for it, so that every earlier accepted
/// write is known to be stored too (the pipeline keeps per-device order).
async fn sync_marker(server: &Server, device: &TestDevice) {
    let (status, body) = write_lp(
        server,
        &device.token,
        Some("ms"),
        "marker,dev=x seq=1i 1700000000001",
    )
    .await;
    assert_eq!(status, 204, "{body}");
    let found = points(server, device, "marker.seq", TS_MS, TS_MS + 2, 1).await;
    assert_eq!(found.len(), 1, "marker point not stored");
}

#[tokio::test]
async fn line_protocol_escaping_cases() {
    let server = Server::start().await;
    let device = server.create_device("lp-escaping").await;

    // (line, expected): None = 4xx, Some((key, value)) = stored.
    let big_tag = format!("room,loc={} t=1 1700000000000000000", "a".repeat(70_000));
    let rows: Vec<(&str, Option<(&str, Value)>)> = vec![
        (
            r"disk,check=C:\,host=srv-01 value=52.45 1700000000000000000",
            None,
        ),
        (
            r"room,loc=New\ York,dev=a\,b,k\=x=1 t=21.5 1700000000000000000",
            Some(("room.t", json!(21.5))),
        ),
        (
            r"my\ meas,dev=d1 f\ 1=2 1700000000000000000",
            Some(("my meas.f 1", json!(2.0))),
        ),
        (r#"note,dev=d1 s="a "b" c" 1700000000000000000"#, None),
        (
            r#"note,dev=d1 s="a \"b\" c" 1700000000000000000"#,
            Some(("note.s", json!("a \"b\" c"))),
        ),
        (
            r#"note,dev=d1 s2="\\"howdy doody\\"" 1700000000000000000"#,
            None,
        ),
        (
            r#"note,dev=d1 s3="\\\"howdy doody\\\"" 1700000000000000000"#,
            Some(("note.s3", json!("\\\"howdy doody\\\""))),
        ),
        (
            r#"note,dev=d1 s4="hello\\" 1700000000000000000"#,
            Some(("note.s4", json!("hello\\"))),
        ),
        (
            r#"note,dev=d1 s5="to\ee" 1700000000000000000"#,
            Some(("note.s5", json!("to\\ee"))),
        ),
        (
            r#"note,dev=d1 s6="line1\nline2" 1700000000000000000"#,
            Some(("note.s6", json!("line1\nline2"))),
        ),
        (
            "room,loc=Küche,icon=🌡 t2=21.5 1700000000000000000",
            Some(("room.t2", json!(21.5))),
        ),
        ("room,loc=x t3=21.5,t3=22.0 1700000000000000000", None),
        ("room,loc=x 1700000000000000000", None),
        ("room,loc= t4=1 1700000000000000000", None),
        (big_tag.as_str(), None),
    ];
    for (line, expected) in &rows {
        let (status, body) =
            write_lp(&server, &device.token, Some("ns"), &format!("{line}\n")).await;
        match expected {
            None => {
                assert_eq!(status, 400, "line {line:.80} should be rejected: {body}");
                assert!(body.contains("line 1"), "the error names line 1: {body}");
            }
            Some(_) => assert_eq!(status, 204, "line {line:.80} should be stored: {body}"),
        }
        // The server keeps serving after every bad line.
        let (health, _) = server.get_json("/api/v1/devices").await;
        assert_eq!(health, 200);
    }
    sync_marker(&server, &device).await;
    for (line, expected) in &rows {
        if let Some((key, value)) = expected {
            let found = points(&server, &device, key, TS_MS, TS_MS + 1, 1).await;
            assert_eq!(found.len(), 1, "{key} from {line:.60}");
            assert_eq!(&found[0]["value"], value, "{key} from {line:.60}");
        }
    }
    // Nothing from a rejected line was stored half-way.
    let latest = server.latest(&device.id).await;
    assert!(latest.get("disk.value").is_none(), "{latest}");
    assert!(latest.get("room.t3").is_none(), "{latest}");
    assert!(latest.get("room.t4").is_none(), "{latest}");
}

#[tokio::test]
async fn line_protocol_batch_is_atomic() {
    let server = Server::start().await;
    let device = server.create_device("lp-batch").await;
    let batch = concat!(
        r"room,loc=New\ York,dev=a\,b,k\=x=1 batch_t=21.5 1700000000000000000",
        "\n",
        r"disk,check=C:\,host=srv-01 batch_v=52.45 1700000000000000000",
        "\n",
        r#"note,dev=d1 batch_s="a \"b\" c" 1700000000000000000"#,
        "\n"
    );
    let (status, body) = write_lp(&server, &device.token, None, batch).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("line 2"), "the error names line 2: {body}");
    assert!(!body.contains("line 1:"), "line 1 is valid: {body}");

    sync_marker(&server, &device).await;
    let latest = server.latest(&device.id).await;
    for key in ["room.batch_t", "disk.batch_v", "note.batch_s"] {
        assert!(
            latest.get(key).is_none(),
            "{key} stored from a rejected batch: {latest}"
        );
    }
}

#[tokio::test]
async fn timestamp_precision_and_range() {
    let server = Server::start().await;
    let device = server.create_device("lp-time").await;

    // The same instant in four precisions is one point.
    for (value, precision) in [
        ("1700000000", "s"),
        ("1700000000000", "ms"),
        ("1700000000000000", "us"),
        ("1700000000000000000", "ns"),
    ] {
        let (status, body) = write_lp(
            &server,
            &device.token,
            Some(precision),
            &format!("env,dev=p1 t=20.5 {value}"),
        )
        .await;
        assert_eq!(status, 204, "{precision}: {body}");
    }
    // No precision: nanoseconds, applied exactly.
    let (status, body) = write_lp(&server, &device.token, None, "env,dev=p2 t2=1 1700000000").await;
    assert_eq!(status, 204, "{body}");

    let rows: [(&str, Option<&str>, u16); 6] = [
        ("env,dev=p3 t3=1 -1000000000", None, 204),
        ("env,dev=p3 t3=2 9223372036854775806", None, 400),
        ("env,dev=p3 t3=3 9223372036854775807", None, 400),
        ("env,dev=p3 t3=4 -9223372036854775807", None, 400),
        ("env,dev=p3 t3=5 9300000000", Some("s"), 400),
        ("env,dev=p3 t3=6 1.7e18", None, 400),
    ];
    for (line, precision, expected) in rows {
        let (status, body) = write_lp(&server, &device.token, precision, line).await;
        assert_eq!(status, expected, "{line}: {body}");
    }

    sync_marker(&server, &device).await;
    let same = points(&server, &device, "env.t", TS_MS - 1, TS_MS + 1, 1).await;
    assert_eq!(same, vec![json!({"ts": TS_MS, "value": 20.5})]);
    let default_ns = points(&server, &device, "env.t2", 0, 10_000, 1).await;
    assert_eq!(default_ns, vec![json!({"ts": 1700, "value": 1.0})]);
    let pre_epoch = points(&server, &device, "env.t3", -2000, 0, 1).await;
    assert_eq!(pre_epoch, vec![json!({"ts": -1000, "value": 1.0})]);
}

#[tokio::test]
async fn json_timestamps() {
    let server = Server::start().await;
    let device = server.create_device("json-time").await;
    let rows: [(&str, u16); 5] = [
        (r#"{"ts":1714953600,"values":{"t":20.5}}"#, 400),
        (r#"{"ts":1714953600000,"values":{"t":20.5}}"#, 200),
        (r#"{"ts":"2024-05-06T00:00:00Z","values":{"t":21.5}}"#, 200),
        (r#"{"ts":-1,"values":{"t":1}}"#, 400),
        (r#"{"ts":1.5e12,"values":{"t":1}}"#, 400),
    ];
    for (body, expected) in rows {
        let (status, text) = post_json(&server, &device.token, body).await;
        assert_eq!(status, expected, "{body}: {text}");
        if expected == 400 {
            assert!(text.contains("ts"), "the error names ts: {text}");
        }
    }
    // The ISO form is the same instant as the millisecond form: one point, last write wins.
    let found = points(
        &server,
        &device,
        "t",
        1_714_953_600_000,
        1_714_953_600_001,
        1,
    )
    .await;
    assert_eq!(
        found,
        vec![json!({"ts": 1_714_953_600_000i64, "value": 21.5})]
    );
}

#[tokio::test]
async fn json_number_forms() {
    let server = Server::start().await;
    let device = server.create_device("probe-7").await;
    let ts = |n: i64| 1_714_953_600_000 + n * 1000;
    let accepted = [
        format!(
            r#"{{"ts":{},"values":{{"a":7e-06,"b":1E+3,"c":-0.0,"d":0.00000000123456789,"e":123456789000000000000.0}}}}"#,
            ts(1)
        ),
        format!(
            r#"{{"ts":{},"values":{{"f":9007199254740993,"g":-9223372036854775808,"h":9223372036854775808}}}}"#,
            ts(2)
        ),
        format!(
            r#"{{"ts":{},"values":{{"k":"NaN","l":"21.5","m":"true","n":true}}}}"#,
            ts(5)
        ),
    ];
    for body in &accepted {
        let (status, text) = post_json(&server, &device.token, body).await;
        assert_eq!(status, 200, "{body}: {text}");
    }
    let rejected = [
        (
            format!(r#"{{"ts":{},"values":{{"i":1e400}}}}"#, ts(3)),
            Some("\"i\""),
        ),
        (format!(r#"{{"ts":{},"values":{{"j":NaN}}}}"#, ts(4)), None),
        (
            format!(r#"{{"ts":{},"values":{{"j":Infinity}}}}"#, ts(4)),
            None,
        ),
        (format!(r#"{{"ts":{},"values":{{"o":01}}}}"#, ts(6)), None),
        (format!(r#"{{"ts":{},"values":{{"p":.5}}}}"#, ts(6)), None),
    ];
    for (body, names) in &rejected {
        let (status, text) = post_json(&server, &device.token, body).await;
        assert_eq!(status, 400, "{body}: {text}");
        if let Some(name) = names {
            let problem: Value = serde_json::from_str(&text).expect("problem JSON");
            let detail = problem["detail"].as_str().unwrap();
            assert!(detail.contains(name), "the error names {name}: {detail}");
        }
    }

    let expected = [
        ("a", json!(7e-06)),
        ("b", json!(1000.0)),
        ("d", json!(1.23456789e-09)),
        ("e", json!(1.23456789e20)),
        ("f", json!(9_007_199_254_740_993i64)),
        ("g", json!(i64::MIN)),
        ("h", json!(9.223372036854776e18)),
        ("k", json!("NaN")),
        ("l", json!("21.5")),
        ("m", json!("true")),
        ("n", json!(true)),
    ];
    for (key, value) in &expected {
        let found = points(&server, &device, key, ts(0), ts(10), 1).await;
        assert_eq!(found.len(), 1, "{key}");
        assert_eq!(&found[0]["value"], value, "{key}");
    }
    let c = points(&server, &device, "c", ts(0), ts(10), 1).await;
    assert_eq!(c[0]["value"].as_f64(), Some(0.0));
    let latest = server.latest(&device.id).await;
    for key in ["i", "j", "o", "p"] {
        assert!(latest.get(key).is_none(), "{key} stored: {latest}");
    }

    // A string key is excluded from numeric aggregates, visibly.
    let (status, body) = server
        .get_json(&format!(
            "/api/v1/devices/{}/telemetry?keys=l&start={}&end={}&interval=1h&agg=avg",
            device.id,
            ts(0),
            ts(0) + 3_600_000
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["l"][0]["value"], Value::Null);
    assert_eq!(body["l"][0]["non_numeric"], json!(1));
}

/// Writes `values` as (ts ms, value) with one line-protocol request.
async fn write_series(server: &Server, device: &TestDevice, key: &str, values: &[(i64, f64)]) {
    let mut body = String::new();
    for (ts, value) in values {
        body.push_str(&format!("m,dev=x {key}={value} {ts}\n"));
    }
    let (status, text) = write_lp(server, &device.token, Some("ms"), &body).await;
    assert_eq!(status, 204, "{text}");
}

#[tokio::test]
async fn bucket_alignment_and_empty_buckets() {
    let server = Server::start().await;
    let device = server.create_device("d1").await;
    let first = 1_709_679_600_000i64;
    let every_ten_minutes: Vec<(i64, f64)> =
        (0..=156).map(|i| (first + i * 600_000, i as f64)).collect();
    write_series(&server, &device, "temp", &every_ten_minutes).await;
    let gappy: Vec<(i64, f64)> = every_ten_minutes
        .iter()
        .copied()
        .filter(|(ts, _)| !(18..=29).contains(&((ts - first) / 600_000)))
        .collect();
    write_series(&server, &device, "gap", &gappy).await;
    points(
        &server,
        &device,
        "m.gap",
        first,
        first + 157 * 600_000,
        gappy.len(),
    )
    .await;

    let query = |key: &str, agg: &str| {
        format!(
            "/api/v1/devices/{}/telemetry?keys={key}&start=1709683200000&end=1709769600000&interval=3600000&agg={agg}",
            device.id
        )
    };
    let (status, body) = server.get_json(&query("m.temp", "avg")).await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["m.temp"].as_array().unwrap();
    assert_eq!(buckets.len(), 24);
    for (i, bucket) in buckets.iter().enumerate() {
        assert_eq!(
            bucket["ts"],
            json!(1_709_683_200_000i64 + i as i64 * 3_600_000)
        );
        assert_eq!(bucket["value"], json!(8.5 + 6.0 * i as f64), "bucket {i}");
    }

    for (agg, value_of) in [
        ("count", (|i: f64| 6.0 + 0.0 * i) as fn(f64) -> f64),
        ("min", |i| 6.0 + 6.0 * i),
        ("max", |i| 11.0 + 6.0 * i),
        ("last", |i| 11.0 + 6.0 * i),
    ] {
        let (status, body) = server.get_json(&query("m.gap", agg)).await;
        assert_eq!(status, 200, "{body}");
        let buckets = body["m.gap"].as_array().unwrap();
        assert_eq!(buckets.len(), 24, "{agg}");
        for (i, bucket) in buckets.iter().enumerate() {
            if i == 2 || i == 3 {
                assert_eq!(bucket["count"], json!(0), "{agg} bucket {i}");
                let expected = if agg == "count" {
                    json!(0)
                } else {
                    Value::Null
                };
                assert_eq!(bucket["value"], expected, "{agg} bucket {i}");
            } else {
                assert_eq!(
                    bucket["value"].as_f64(),
                    Some(value_of(i as f64)),
                    "{agg} bucket {i}"
                );
            }
        }
    }
}

#[tokio::test]
async fn bucket_intervals_longer_than_days() {
    let server = Server::start().await;
    let device = server.create_device("d2").await;
    let first = 1_546_128_000_000i64; // 2018-12-30T00:00Z
    let last = 1_547_683_200_000i64; // 2019-01-17T00:00Z
    let hourly: Vec<(i64, f64)> = (0..)
        .map(|i| first + i * 3_600_000)
        .take_while(|ts| *ts <= last)
        .map(|ts| (ts, 1.0))
        .collect();
    write_series(&server, &device, "v", &hourly).await;
    points(&server, &device, "m.v", first, last + 1, hourly.len()).await;

    let path = |interval: i64| {
        format!(
            "/api/v1/devices/{}/telemetry?keys=m.v&start=1546300800000&end=1547596800000&interval={interval}&agg=count",
            device.id
        )
    };
    let (status, body) = server.get_json(&path(172_800_000)).await;
    assert_eq!(status, 200, "{body}");
    let counts: Vec<i64> = body["m.v"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["value"].as_i64().unwrap())
        .collect();
    // Fixed intervals align to multiples of the interval from the Unix epoch
    // (documented in docs/api.md): the first 2-day bucket starts on
    // 2018-12-31 but only counts points from the range start on.
    assert_eq!(counts, vec![24, 48, 48, 48, 48, 48, 48, 48]);
    assert_eq!(body["m.v"][0]["ts"], json!(1_546_214_400_000i64));
    assert_eq!(counts.iter().sum::<i64>(), 360);

    let (status, body) = server.get_json(&path(63_072_000_000)).await;
    assert_eq!(status, 200, "{body}");
    let buckets = body["m.v"].as_array().unwrap();
    assert_eq!(buckets.len(), 1);
    assert_eq!(buckets[0]["value"], json!(360));
}

#[tokio::test]
async fn query_validation_and_paging() {
    let server = Server::start().await;
    let device = server.create_device("d5").await;
    let t0 = 1_714_953_600_000i64;
    let values: Vec<(i64, f64)> = (0..250).map(|i| (t0 + i * 1000, i as f64)).collect();
    write_series(&server, &device, "v", &values).await;
    points(&server, &device, "m.v", t0, t0 + 250_000, 250).await;
    let base = format!("/api/v1/devices/{}/telemetry?keys=m.v", device.id);

    // Parameter errors name the parameter.
    let rows = [
        (format!("&start={}&end={t0}", t0 + 10_000), "start"),
        (
            format!(
                "&start={t0}&end={}&interval=1000&agg=avg",
                t0 + 31_536_000_000
            ),
            "interval",
        ),
        (
            format!("&start={t0}&end={}&interval=0&agg=avg", t0 + 1000),
            "interval",
        ),
        (
            format!("&start={t0}&end={}&interval=-1000&agg=avg", t0 + 1000),
            "interval",
        ),
        (
            format!("&start={t0}&end={}&interval=1000&agg=median", t0 + 1000),
            "agg",
        ),
        (format!("&start={t0}&end={}&limit=0", t0 + 1000), "limit"),
        (format!("&start={t0}&end={}&limit=-5", t0 + 1000), "limit"),
        ("&start=abc".to_owned(), "start"),
    ];
    for (query, param) in &rows {
        let (status, body) = server.get_json(&format!("{base}{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["param"], json!(param), "{query}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(param),
            "{query}: {body}"
        );
    }

    // An empty half-open range is an empty list.
    let (status, body) = server
        .get_json(&format!("{base}&start={t0}&end={t0}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"m.v": []}));

    // Seconds given to a millisecond API: the normal shape, with zero points.
    let (status, body) = server
        .get_json(&format!("{base}&start=1714953600&end=1714957200"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"m.v": []}));

    // Paging: 100, 100, 50, with a continuation on all but the last page.
    let client = reqwest::Client::new();
    let token = server.admin_token().await;
    let mut url = format!(
        "{}{base}&start={t0}&end={}&limit=100",
        server.http_url,
        t0 + 250_000
    );
    let mut seen = Vec::new();
    let mut pages = Vec::new();
    loop {
        let response = client.get(&url).bearer_auth(&token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let next = response
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_owned());
        let body: Value = response.json().await.unwrap();
        let page = body["m.v"].as_array().unwrap();
        pages.push(page.len());
        seen.extend(page.iter().map(|p| p["value"].as_f64().unwrap() as i64));
        match next {
            Some(link) => {
                let target = link
                    .trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap()
                    .to_owned();
                url = format!("{}{target}", server.http_url);
            }
            None => break,
        }
    }
    assert_eq!(pages, vec![100, 100, 50]);
    assert_eq!(seen, (0..250).collect::<Vec<_>>());

    // Without a limit all 250 fit in the default page of 1000.
    let (status, body) = server
        .get_json(&format!("{base}&start={t0}&end={}", t0 + 250_000))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["m.v"].as_array().unwrap().len(), 250);
}

/// Reads a device's labels, waiting until `key` appears (labels reach the
/// metadata store asynchronously).
async fn labels_with(server: &Server, device: &TestDevice, key: &str, value: &str) -> Value {
    let mut labels = Value::Null;
    for _ in 0..100 {
        let (status, body) = server
            .get_json(&format!("/api/v1/devices/{}", device.id))
            .await;
        assert_eq!(status, 200, "{body}");
        labels = body["labels"].clone();
        if labels[key] == json!(value) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    labels
}

#[tokio::test]
async fn line_protocol_tags_become_labels() {
    let server = Server::start().await;
    let device = server.create_device("lp-labels").await;
    let line = r"room,loc=New\ York,dev=a\,b,k\=x=1 t=21.5 1700000000000000000";
    let (status, body) = write_lp(&server, &device.token, None, line).await;
    assert_eq!(status, 204, "{body}");
    let labels = labels_with(&server, &device, "loc", "New York").await;
    assert_eq!(labels, json!({"loc": "New York", "dev": "a,b", "k=x": "1"}));

    // UTF-8 tag values arrive byte-identical; newer values replace older ones.
    let line = "room,loc=Küche,icon=🌡 t=21.5 1700000000000000000";
    let (status, body) = write_lp(&server, &device.token, None, line).await;
    assert_eq!(status, 204, "{body}");
    let labels = labels_with(&server, &device, "loc", "Küche").await;
    assert_eq!(
        labels,
        json!({"loc": "Küche", "icon": "🌡", "dev": "a,b", "k=x": "1"})
    );

    // Labels survive a restart: they are in the metadata store.
    let mut server = server;
    server.terminate();
    server.restart().await;
    let (_, body) = server
        .get_json(&format!("/api/v1/devices/{}", device.id))
        .await;
    assert_eq!(body["labels"]["icon"], json!("🌡"));
}
