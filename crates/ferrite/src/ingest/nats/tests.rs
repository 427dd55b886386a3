//! Tests against the NATS server with JetStream on 127.0.0.1:4222. Each test
//! uses a stream and subject prefix of its own and deletes them at the end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{NatsOptions, open};
use crate::ids::{DeviceId, TenantId};
use crate::ingest::{Committed, ContentType, Envelope, IngestError, OpenedLog, Protocol};

const NATS_ADDR: &str = "127.0.0.1:4222";
const START_NATS: &str = "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log";

/// Connects to the test server, or fails with how to start it.
async fn jetstream_context() -> jetstream::Context {
    let connected =
        tokio::time::timeout(Duration::from_secs(5), async_nats::connect(NATS_ADDR)).await;
    match connected {
        Ok(Ok(client)) => jetstream::new(client),
        Ok(Err(error)) => {
            panic!("NATS does not respond on {NATS_ADDR} ({error}); start it with: {START_NATS}")
        }
        Err(_) => {
            panic!("NATS does not respond on {NATS_ADDR} (timed out); start it with: {START_NATS}")
        }
    }
}

/// A stream, subject prefix and consumer of one test; the stream is deleted
/// when this is dropped, also after a failed assertion.
struct TestStream {
    options: NatsOptions,
}

impl TestStream {
    async fn new(tag: &str) -> TestStream {
        // Fails early with the start command when NATS is down.
        let client = jetstream_context().await.client();
        let account = client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .map(|reply| String::from_utf8_lossy(&reply.payload).into_owned());
        assert!(
            account
                .as_ref()
                .is_ok_and(|text| !text.contains("\"error\"")),
            "JetStream is not enabled on {NATS_ADDR} ({account:?}); start NATS with: {START_NATS}"
        );
        let suffix = format!("{:08x}", rand::random::<u32>());
        TestStream {
            options: NatsOptions {
                url: format!("nats://{NATS_ADDR}"),
                credentials_file: None,
                stream: format!("FERRITE_TEST_{tag}_{suffix}"),
                subject_prefix: format!("ferrite.test.{tag}.{suffix}"),
                consumer: "pipeline".to_owned(),
                max_bytes: 64 * 1024 * 1024,
                replicas: 1,
                duplicate_window: Duration::from_secs(120),
                ack_wait: Duration::from_secs(30),
                append_timeout: Duration::from_secs(5),
                largest_message: 256 * 1024,
            },
        }
    }

    async fn stream(&self) -> jetstream::stream::Stream {
        jetstream_context()
            .await
            .get_stream(&self.options.stream)
            .await
            .expect("the test stream exists")
    }

    async fn state(&self) -> jetstream::stream::State {
        self.stream().await.info().await.unwrap().state.clone()
    }

    async fn consumer_info(&self) -> jetstream::consumer::Info {
        self.stream()
            .await
            .consumer_info(&self.options.consumer)
            .await
            .expect("the consumer exists")
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let name = self.options.stream.clone();
        // Drop cannot await, and the test's runtime may be gone: delete on
        // a runtime of its own.
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

fn envelope(n: u32) -> Envelope {
    Envelope {
        tenant_id: TenantId::from_bytes([1; 16]),
        device_id: DeviceId::from_bytes([(n % 4) as u8; 16]),
        protocol: Protocol::Http,
        received_at_ns: i64::from(n),
        content_type: ContentType::Json,
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        meta: Bytes::new(),
    }
}

async fn open_log(options: &NatsOptions, replay_after: u64) -> OpenedLog {
    open(options.clone(), replay_after)
        .await
        .expect("open the NATS ingest log")
}

/// Receives batches until `count` records arrived or `timeout` passed;
/// checks on the way that batches are in order and `last_seq` is right.
async fn receive(
    committed: &mut mpsc::Receiver<Committed>,
    count: usize,
    timeout: Duration,
) -> Vec<(u64, Envelope)> {
    let deadline = Instant::now() + timeout;
    let mut records: Vec<(u64, Envelope)> = Vec::new();
    while records.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(batch)) = tokio::time::timeout(left, committed.recv()).await else {
            break;
        };
        assert_eq!(
            batch.records.last().map(|(seq, _)| *seq),
            Some(batch.last_seq),
            "last_seq is the sequence of the batch's last record"
        );
        for (seq, envelope) in batch.records {
            if let Some((previous, _)) = records.last() {
                assert!(seq > *previous, "sequence {seq} came after {previous}");
            }
            records.push((seq, envelope));
        }
    }
    records
}

fn sequences(records: &[(u64, Envelope)]) -> Vec<u64> {
    records.iter().map(|(seq, _)| *seq).collect()
}

/// Polls `check` every 50 ms for at most `timeout`.
async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn close(opened: OpenedLog) {
    opened.control.shutdown().await;
}

#[tokio::test]
async fn append_then_consume_in_order() {
    let test = TestStream::new("order").await;
    let mut opened = open_log(&test.options, 0).await;
    (&mut opened.ready).await.unwrap().unwrap();

    let expected: Vec<Envelope> = (0..50).map(envelope).collect();
    for chunk in expected.chunks(5) {
        opened.handle.append(chunk.to_vec()).await.unwrap();
    }
    let records = receive(&mut opened.committed, 50, Duration::from_secs(10)).await;
    assert_eq!(sequences(&records), (1..=50).collect::<Vec<_>>());
    let envelopes: Vec<Envelope> = records.into_iter().map(|(_, e)| e).collect();
    assert_eq!(envelopes, expected);

    // Subject layout and message id, as an operator sees them.
    let stored = test.stream().await.get_raw_message(1).await.unwrap();
    assert_eq!(
        stored.subject.as_str(),
        format!(
            "{}.{}.{}",
            test.options.subject_prefix, expected[0].tenant_id, expected[0].device_id
        )
    );
    assert!(
        stored.headers.get("Nats-Msg-Id").is_some(),
        "a message id header makes retried publishes idempotent"
    );

    // Shutdown closes the pipeline's channel and rejects appends.
    opened.control.shutdown().await;
    assert!(
        tokio::time::timeout(Duration::from_secs(5), opened.committed.recv())
            .await
            .unwrap()
            .is_none()
    );
    let rejected = opened.handle.append(vec![envelope(99)]).await;
    assert!(
        matches!(rejected, Err(IngestError::ShuttingDown)),
        "{rejected:?}"
    );
}

#[tokio::test]
async fn restart_before_checkpoint_redelivers_everything() {
    let test = TestStream::new("restart").await;
    let mut first = open_log(&test.options, 0).await;
    let expected: Vec<Envelope> = (0..20).map(envelope).collect();
    for envelope in &expected {
        first.handle.append(vec![envelope.clone()]).await.unwrap();
    }
    let received = receive(&mut first.committed, 20, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 20);
    // The pipeline side goes away before any checkpoint.
    close(first).await;

    // Nothing is in the store: everything comes again, at once and in order.
    let mut second = open_log(&test.options, 0).await;
    let started = Instant::now();
    let again = receive(&mut second.committed, 20, Duration::from_secs(10)).await;
    assert_eq!(sequences(&again), (1..=20).collect::<Vec<_>>());
    assert_eq!(
        again.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(
        started.elapsed() < test.options.ack_wait,
        "the redelivery did not wait for ack_wait"
    );
    close(second).await;

    // The store has flushed up to 8: the rest comes again.
    let mut third = open_log(&test.options, 8).await;
    let rest = receive(&mut third.committed, 12, Duration::from_secs(10)).await;
    assert_eq!(sequences(&rest), (9..=20).collect::<Vec<_>>());
    assert_eq!(rest[0].1, expected[8]);
    close(third).await;
}

#[tokio::test]
async fn redelivery_after_ack_wait_is_dropped() {
    let mut test = TestStream::new("ackwait").await;
    test.options.ack_wait = Duration::from_secs(1);
    let mut opened = open_log(&test.options, 0).await;
    for n in 0..5 {
        opened.handle.append(vec![envelope(n)]).await.unwrap();
    }
    let received = receive(&mut opened.committed, 5, Duration::from_secs(10)).await;
    assert_eq!(sequences(&received), vec![1, 2, 3, 4, 5]);

    // No checkpoint: JetStream delivers the five again after ack_wait, and
    // the pipeline must not see them twice.
    let redelivered = eventually(Duration::from_secs(10), || async {
        test.consumer_info().await.num_redelivered > 0
    })
    .await;
    assert!(redelivered, "JetStream redelivers after ack_wait");
    let duplicates = receive(&mut opened.committed, 1, Duration::from_millis(500)).await;
    assert!(duplicates.is_empty(), "redelivered: {duplicates:?}");

    opened.handle.append(vec![envelope(5)]).await.unwrap();
    let next = receive(&mut opened.committed, 1, Duration::from_secs(10)).await;
    assert_eq!(sequences(&next), vec![6]);

    // The checkpoint acknowledges everything and purges it.
    opened.control.checkpoint(6);
    let acknowledged = eventually(Duration::from_secs(10), || async {
        let info = test.consumer_info().await;
        info.ack_floor.stream_sequence == 6 && info.num_ack_pending == 0
    })
    .await;
    assert!(
        acknowledged,
        "ack floor after checkpoint: {:?}",
        test.consumer_info().await.ack_floor
    );
    assert_eq!(test.state().await.messages, 0, "stored messages are purged");
    close(opened).await;
}

#[tokio::test]
async fn checkpoint_acks_so_restart_redelivers_nothing() {
    let mut test = TestStream::new("checkpoint").await;
    test.options.ack_wait = Duration::from_secs(1);
    let mut opened = open_log(&test.options, 0).await;
    for n in 0..10 {
        opened.handle.append(vec![envelope(n)]).await.unwrap();
    }
    let received = receive(&mut opened.committed, 10, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 10);

    // A partial checkpoint purges up to it and keeps the rest.
    opened.control.checkpoint(4);
    let purged = eventually(Duration::from_secs(10), || async {
        test.state().await.first_sequence == 5
    })
    .await;
    assert!(
        purged,
        "first sequence after checkpoint 4: {}",
        test.state().await.first_sequence
    );
    assert_eq!(test.state().await.messages, 6);

    opened.control.checkpoint(10);
    let acknowledged = eventually(Duration::from_secs(10), || async {
        let info = test.consumer_info().await;
        info.ack_floor.stream_sequence == 10 && info.num_ack_pending == 0
    })
    .await;
    assert!(acknowledged, "the checkpoint acknowledges up to 10");
    assert_eq!(test.state().await.messages, 0);
    close(opened).await;

    // Restart with the store at 10: nothing comes back, not even after
    // ack_wait, and numbering goes on.
    let mut restarted = open_log(&test.options, 10).await;
    let again = receive(&mut restarted.committed, 1, Duration::from_millis(2500)).await;
    assert!(again.is_empty(), "redelivered after restart: {again:?}");
    restarted.handle.append(vec![envelope(10)]).await.unwrap();
    let next = receive(&mut restarted.committed, 1, Duration::from_secs(10)).await;
    assert_eq!(sequences(&next), vec![11]);
    close(restarted).await;
}

#[tokio::test]
async fn full_stream_rejects_as_overloaded() {
    let mut test = TestStream::new("full").await;
    test.options.max_bytes = 16 * 1024;
    let mut opened = open_log(&test.options, 0).await;

    let mut large = envelope(0);
    large.payload = Bytes::from(vec![b'x'; 1000]);
    let mut accepted = 0u64;
    let mut refusal = None;
    // Bounded: 16 KiB hold about 15 such messages.
    for _ in 0..100 {
        match opened.handle.append(vec![large.clone()]).await {
            Ok(()) => accepted += 1,
            Err(error) => {
                refusal = Some(error);
                break;
            }
        }
    }
    assert!(accepted > 0, "nothing fit into the stream");
    assert!(
        matches!(refusal, Some(IngestError::Overloaded)),
        "a full stream rejects appends as overloaded, got {refusal:?}"
    );

    // Once the store has everything, the purge makes room again.
    let received = receive(
        &mut opened.committed,
        accepted as usize,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(received.len() as u64, accepted);
    opened.control.checkpoint(accepted);
    let room = eventually(Duration::from_secs(10), || async {
        test.state().await.messages == 0
    })
    .await;
    assert!(room, "the checkpoint purges the stream");
    opened.handle.append(vec![large]).await.unwrap();
    close(opened).await;
}

#[tokio::test]
async fn marker_above_empty_stream_moves_sequence() {
    let test = TestStream::new("marker").await;
    // A store filled through the embedded log, now switched to NATS.
    let mut opened = open_log(&test.options, 1000).await;
    opened.handle.append(vec![envelope(1)]).await.unwrap();
    let received = receive(&mut opened.committed, 1, Duration::from_secs(10)).await;
    assert_eq!(sequences(&received), vec![1001]);
    close(opened).await;
}

#[tokio::test]
async fn marker_above_nonempty_stream_fails() {
    let test = TestStream::new("mismatch").await;
    let opened = open_log(&test.options, 0).await;
    for n in 0..3 {
        opened.handle.append(vec![envelope(n)]).await.unwrap();
    }
    close(opened).await;

    let error = match open(test.options.clone(), 1000).await {
        Ok(_) => panic!("start-up must fail"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("above the last sequence 3"), "{error}");
    assert!(error.contains("ingest.nats.stream"), "{error}");
}

#[tokio::test]
async fn unreachable_server_fails_start_up_clearly() {
    let mut test = TestStream::new("down").await;
    // Port 1 on loopback has no NATS server.
    test.options.url = "nats://127.0.0.1:1".to_owned();
    let error = match open(test.options.clone(), 0).await {
        Ok(_) => panic!("start-up must fail"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("cannot connect to NATS at nats://127.0.0.1:1"),
        "{error}"
    );
    assert!(error.contains("ingest.nats.url"), "{error}");
}

#[tokio::test]
async fn unreadable_message_stops_consuming() {
    let test = TestStream::new("unreadable").await;
    let opened = open_log(&test.options, 0).await;
    opened.handle.append(vec![envelope(0)]).await.unwrap();
    close(opened).await;

    // A message that is no envelope, as a stray publisher would send it.
    let context = jetstream_context().await;
    context
        .publish(
            format!("{}.not.ours", test.options.subject_prefix),
            Bytes::from_static(b"hello"),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let mut reopened = open_log(&test.options, 0).await;
    reopened.handle.append(vec![envelope(2)]).await.unwrap();
    let received = receive(&mut reopened.committed, 3, Duration::from_secs(2)).await;
    assert_eq!(
        sequences(&received),
        vec![1],
        "consuming stops before the unreadable message"
    );
    // Appends still land in the stream for a later version to consume.
    assert_eq!(test.state().await.messages, 3);
    close(reopened).await;
}

/// A TCP proxy to the NATS server, to cut the connection.
struct Proxy {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `addr` (port 0 for a free one) and forwards to NATS.
    async fn start(addr: SocketAddr) -> Proxy {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        let listener = socket.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            // Aborting this task drops the set, which aborts every connection.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(NATS_ADDR).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Proxy { addr, accept }
    }

    fn cut(self) -> SocketAddr {
        self.accept.abort();
        self.addr
    }
}

#[tokio::test]
async fn outage_fails_appends_and_consumer_resumes() {
    let mut test = TestStream::new("outage").await;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap()).await;
    test.options.url = format!("nats://{}", proxy.addr);
    test.options.append_timeout = Duration::from_secs(2);
    let mut opened = open_log(&test.options, 0).await;
    for n in 0..3 {
        opened.handle.append(vec![envelope(n)]).await.unwrap();
    }
    let before = receive(&mut opened.committed, 3, Duration::from_secs(10)).await;
    assert_eq!(sequences(&before), vec![1, 2, 3]);

    // NATS goes away: appends fail, and do not hang.
    let addr = proxy.cut();
    let mut failure = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while failure.is_none() && Instant::now() < deadline {
        let started = Instant::now();
        let result = opened.handle.append(vec![envelope(100)]).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "an append during the outage took {:?}",
            started.elapsed()
        );
        if let Err(error) = result {
            failure = Some(error);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(failure, Some(IngestError::Io | IngestError::Overloaded)),
        "{failure:?}"
    );
    let unavailable = eventually(Duration::from_secs(10), || async {
        matches!(
            opened.handle.append(vec![envelope(101)]).await,
            Err(IngestError::Io)
        )
    })
    .await;
    assert!(
        unavailable,
        "appends fail as unavailable while disconnected"
    );
    let started = Instant::now();
    let fast = opened.handle.append(vec![envelope(102)]).await;
    assert!(matches!(fast, Err(IngestError::Io)), "{fast:?}");
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a disconnected append fails at once, took {:?}",
        started.elapsed()
    );

    // NATS is back on the same address: appends succeed again and the
    // consumer delivers them.
    let proxy = Proxy::start(addr).await;
    let back = eventually(Duration::from_secs(20), || async {
        opened.handle.append(vec![envelope(200)]).await.is_ok()
    })
    .await;
    assert!(back, "appends succeed after NATS is back");
    for n in 201..205 {
        opened.handle.append(vec![envelope(n)]).await.unwrap();
    }
    // Appends that failed during the outage may have been stored as well.
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !(200..205).all(|n| {
            after
                .iter()
                .any(|(_, e): &(u64, Envelope)| e.received_at_ns == n)
        })
    {
        after.extend(receive(&mut opened.committed, 1, Duration::from_secs(1)).await);
    }
    let received: Vec<i64> = after.iter().map(|(_, e)| e.received_at_ns).collect();
    for n in 200..205 {
        assert!(
            received.contains(&n),
            "record {n} after the outage was not consumed: {received:?}"
        );
    }
    assert!(
        after.iter().all(|(seq, _)| *seq > 3),
        "nothing from before the outage comes twice: {:?}",
        sequences(&after)
    );
    close(opened).await;
    proxy.cut();
}
