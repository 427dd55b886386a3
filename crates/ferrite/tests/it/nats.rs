//! The NATS JetStream ingest backend end to end: `ferrite serve` with
//! `ingest.backend = "nats"` against the NATS server on 127.0.0.1:4222.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::Value;

use crate::support::{Server, TestDevice, wait_until};

const NATS_ADDR: &str = "127.0.0.1:4222";
const START_NATS: &str = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log";
/// Timestamp of point number 0; point n is stamped 10 ms later per number.
const T0: u64 = 1_714_953_600_000;

async fn jetstream_context() -> jetstream::Context {
    match tokio::time::timeout(Duration::from_secs(5), async_nats::connect(NATS_ADDR)).await {
        Ok(Ok(client)) => jetstream::new(client),
        Ok(Err(error)) => {
            panic!("NATS does not respond on {NATS_ADDR} ({error}); start it with: {START_NATS}")
        }
        Err(_) => {
            panic!("NATS does not respond on {NATS_ADDR} (timed out); start it with: {START_NATS}")
        }
    }
}

/// A configuration file naming a stream and subject prefix of this test; the
/// stream is deleted when this is dropped.
struct NatsSetup {
    stream: String,
    config_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl NatsSetup {
    async fn new() -> NatsSetup {
        // Fails early, with the start command, when NATS is down.
        jetstream_context().await;
        let suffix = format!("{:08x}", rand::random::<u32>());
        let stream = format!("FERRITE_IT_{suffix}");
        let dir = tempfile::tempdir().expect("temp dir");
        let config_file = dir.path().join("ferrite.toml");
        let config = format!(
            r#"[ingest]
backend = "nats"

[ingest.nats]
url = "nats://{NATS_ADDR}"
stream = "{stream}"
subject_prefix = "ferrite.it.{suffix}"
consumer = "pipeline"
ack_wait = "10s"

[storage]
flush_interval = "200ms"
"#
        );
        std::fs::write(&config_file, config).expect("write the configuration file");
        NatsSetup {
            stream,
            config_file,
            _dir: dir,
        }
    }

    fn env(&self) -> Vec<(&str, &str)> {
        vec![(
            "FERRITE_CONFIG",
            self.config_file.to_str().expect("UTF-8 path"),
        )]
    }

    async fn stream_state(&self) -> jetstream::stream::State {
        let mut stream = jetstream_context()
            .await
            .get_stream(&self.stream)
            .await
            .expect("the server created the stream");
        stream.info().await.expect("stream info").state.clone()
    }
}

impl Drop for NatsSetup {
    fn drop(&mut self) {
        let name = self.stream.clone();
        // Drop cannot await: delete on a runtime of its own.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                if let Ok(Ok(client)) =
                    tokio::time::timeout(Duration::from_secs(5), async_nats::connect(NATS_ADDR))
                        .await
                {
                    let _ = jetstream::new(client).delete_stream(&name).await;
                }
            });
        });
        let _ = deleted.join();
    }
}

/// Writes numbered points from 4 connections until `stop_after` passes or
/// each wrote 500; records every number the server acknowledged.
async fn write_numbers(
    server: &Server,
    device: &TestDevice,
    next: &Arc<AtomicU64>,
    acknowledged: &Arc<parking_lot::Mutex<Vec<u64>>>,
    stop_after: Duration,
) -> Vec<tokio::task::JoinHandle<()>> {
    let url = format!("{}/api/v1/{}/telemetry", server.http_url, device.token);
    let deadline = Instant::now() + stop_after;
    (0..4)
        .map(|_| {
            let url = url.clone();
            let next = next.clone();
            let acknowledged = acknowledged.clone();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                for _ in 0..500 {
                    if Instant::now() > deadline {
                        return;
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let body = format!(r#"{{"ts": {}, "values": {{"n": {n}}}}}"#, T0 + n * 10);
                    match client
                        .post(&url)
                        .body(body)
                        .timeout(Duration::from_secs(3))
                        .send()
                        .await
                    {
                        Ok(response) if response.status().is_success() => {
                            acknowledged.lock().push(n)
                        }
                        // The server was killed, or is not up yet.
                        _ => return,
                    }
                }
            })
        })
        .collect()
}

/// Reads every stored value of key `n`, in timestamp order (= by number).
async fn stored_numbers(server: &Server, device: &TestDevice, end: u64) -> Vec<u64> {
    let mut stored = Vec::new();
    let mut start = T0;
    loop {
        let path = format!(
            "/api/v1/devices/{}/telemetry?keys=n&start={start}&end={end}&limit=10000",
            device.id
        );
        let (status, body) = server.get_json(&path).await;
        assert_eq!(status, 200, "{body}");
        let page: Vec<u64> = body["n"]
            .as_array()
            .expect("an array of points")
            .iter()
            .map(|point: &Value| point["value"].as_u64().expect("a number"))
            .collect();
        let Some(last) = page.last().copied() else {
            break;
        };
        stored.extend(&page);
        if page.len() < 10000 {
            break;
        }
        start = T0 + last * 10 + 1;
    }
    stored
}

/// Writers send numbered points while the server, pipeline included, is
/// killed and restarted; then it stops cleanly and starts once more. Every
/// acknowledged number must be stored exactly once, and the stream must be
/// empty once the store has flushed.
#[tokio::test]
async fn kill_and_restart_lose_and_duplicate_nothing() {
    let nats = NatsSetup::new().await;
    let mut server = Server::start_with_env(&nats.env()).await;
    let device = server.create_device("nats-sensor").await;
    let next = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));

    // Kill moments from the clock; printed so a failure can be related to them.
    let mut random = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    for round in 0..3 {
        let writers = write_numbers(
            &server,
            &device,
            &next,
            &acknowledged,
            Duration::from_secs(5),
        )
        .await;
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let kill_after = Duration::from_millis(300 + random % 1200);
        println!("round {round}: kill after {kill_after:?}");
        tokio::time::sleep(kill_after).await;
        server.restart().await;
        for writer in writers {
            let _ = writer.await;
        }
    }

    // A last round that ends with a clean stop.
    let writers = write_numbers(
        &server,
        &device,
        &next,
        &acknowledged,
        Duration::from_millis(500),
    )
    .await;
    for writer in writers {
        let _ = writer.await;
    }
    server.terminate();
    let server = Server::start_in(&server.data_dir, &nats.env()).await;

    let expected: Vec<u64> = {
        let mut numbers = acknowledged.lock().clone();
        numbers.sort_unstable();
        numbers
    };
    assert!(
        expected.len() > 100,
        "the load was too small to mean anything: {} points",
        expected.len()
    );
    // The points went through the stream: its sequence counts them.
    let last_sequence = nats.stream_state().await.last_sequence;
    assert!(
        last_sequence >= expected.len() as u64,
        "the stream's last sequence {last_sequence} is below the {} acknowledged points",
        expected.len()
    );
    let end = T0 + next.load(Ordering::Relaxed) * 10 + 1;
    // Acknowledged points reach the store asynchronously: poll for 15 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    let stored = loop {
        let stored = stored_numbers(&server, &device, end).await;
        let complete = expected.iter().all(|n| stored.binary_search(n).is_ok());
        if complete || Instant::now() > deadline {
            break stored;
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
        missing.is_empty(),
        "acknowledged points missing: {missing:?} (of {})",
        expected.len()
    );
    let mut distinct = stored.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), stored.len(), "a point is stored twice");

    // Everything is in the store, so checkpoints purge the whole stream.
    let purged = wait_until(
        || async { nats.stream_state().await.messages == 0 },
        Duration::from_secs(10),
    )
    .await;
    assert!(
        purged,
        "{} messages stay in the stream after the store flushed",
        nats.stream_state().await.messages
    );
}
