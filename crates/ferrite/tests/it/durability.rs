//! Crash safety: a SIGKILL at any moment loses nothing that was acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::support::Server;

/// Writers send numbered points and record each acknowledged number; the
/// server is killed at a random moment, restarted, and this repeats. Every
/// acknowledged number must then be stored exactly once.
///
/// Short partitions and a short cold delay make flushes write several
/// segment files and background compactions run during the load, so the
/// kills land in flushes, in compactions and between them. The seed of the
/// kill moments is printed; `FERRITE_TEST_SEED` repeats a run.
#[tokio::test]
async fn kill_under_load_loses_no_acknowledged_point() {
    let mut server = Server::start_with_env(&[
        ("FERRITE_STORAGE_FLUSH_INTERVAL", "200ms"),
        ("FERRITE_STORAGE_PARTITION", "10s"),
        ("FERRITE_STORAGE_COLD_AFTER", "1s"),
    ])
    .await;
    let device = server.create_device("crash").await;
    let acknowledged = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let t0 = 1_714_953_600_000u64;
    let seed: u64 = std::env::var("FERRITE_TEST_SEED")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("kill moments from FERRITE_TEST_SEED={seed}");
    let mut random = seed | 1;

    for _round in 0..5 {
        let url = format!("{}/api/v1/{}/telemetry", server.http_url, device.token);
        let mut writers = Vec::new();
        for _ in 0..8 {
            let url = url.clone();
            let acknowledged = acknowledged.clone();
            let next = next.clone();
            writers.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                // Bounded: at most 2000 requests per writer per round.
                for _ in 0..2000 {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    // 10 ms apart: a 10 s partition contains 1000 points.
                    let body = format!(r#"{{"ts": {}, "values": {{"n": {n}}}}}"#, t0 + n * 10);
                    match client
                        .post(&url)
                        .body(body)
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await
                    {
                        Ok(response) if response.status().is_success() => {
                            acknowledged.lock().push(n)
                        }
                        _ => return,
                    }
                }
            }));
        }
        // xorshift: a kill between 150 ms and 1.5 s into the round.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        tokio::time::sleep(Duration::from_millis(150 + random % 1350)).await;
        server.kill();
        for writer in writers {
            let _ = writer.await;
        }
        server.restart().await;
    }

    let expected: Vec<u64> = {
        let mut list = acknowledged.lock().clone();
        list.sort_unstable();
        list
    };
    assert!(
        expected.len() > 100,
        "the load was too small to mean anything: {}",
        expected.len()
    );

    let path = |start: u64| {
        format!(
            "/api/v1/devices/{}/telemetry?keys=n&start={start}&end={}&limit=10000",
            device.id,
            t0 + next.load(Ordering::Relaxed) * 10 + 1
        )
    };
    // Acknowledged points are durable but reach the store asynchronously:
    // poll for up to 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (complete, stored) = loop {
        let stored = stored_numbers(&server, &path).await;
        let complete = expected.iter().all(|n| stored.binary_search(n).is_ok());
        if complete || std::time::Instant::now() > deadline {
            break (complete, stored);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let missing: Vec<u64> = expected
        .iter()
        .copied()
        .filter(|n| stored.binary_search(n).is_err())
        .take(10)
        .collect();
    assert!(
        complete,
        "acknowledged points missing after kill -9: {missing:?} (of {})",
        expected.len()
    );
    let mut deduped = stored.clone();
    deduped.dedup();
    assert_eq!(deduped.len(), stored.len(), "a point is stored twice");
}

/// Reads every stored value of key `n`, sorted by timestamp (= by number).
async fn stored_numbers(server: &Server, path: &impl Fn(u64) -> String) -> Vec<u64> {
    let mut stored = Vec::new();
    let t0 = 1_714_953_600_000u64;
    let mut start = t0;
    loop {
        let (status, body) = server.get_json(&path(start)).await;
        assert_eq!(status, 200, "{body}");
        let page: Vec<u64> = body["n"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p: &Value| p["value"].as_u64().unwrap())
            .collect();
        let Some(last) = page.last().copied() else {
            break;
        };
        stored.extend(&page);
        if page.len() < 10000 {
            break;
        }
        start = t0 + last * 10 + 1;
    }
    stored
}
