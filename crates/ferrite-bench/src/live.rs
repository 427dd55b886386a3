//! `live`: latency from an MQTT publish to its delivery on a live WebSocket.
//!
//! One WebSocket subscriber connects to `/api/v1/live/ws?key=sent_ns` with
//! an API key from `--api-key-file`. Then `--devices` MQTT 3.1.1
//! connections (one device token each, reused round-robin) publish QoS 1
//! messages on a fixed schedule of `--rate` messages per second in total.
//! Message `j` of the run is due at `j / rate` seconds, and connection
//! `j mod devices` sends it. Each payload is `{"sent_ns": <wall clock in
//! ns>}`, taken right before the publish call. The subscriber records, for every delivered message, its
//! receive time minus `sent_ns`. Both clocks are this machine's wall clock.
//!
//! Messages sent during `--warmup-s` are not measured. After `--duration-s`
//! the publishers stop, and the subscriber keeps reading for `--drain-s`
//! before the counts are taken: `missing` is published minus delivered.
//! A message that is due while its connection is still sending earlier ones
//! goes out late. Its latency counts from the actual send, and `behind_ms`
//! reports how far the publishers fell behind the schedule.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::mqtt::wait_for_connack;
use crate::stats::{percentile, round3};
use crate::target::{load_tokens, loopback_socket};

/// Maximum wait for CONNACK on one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Unacknowledged QoS 1 messages allowed per connection.
const INFLIGHT: u16 = 100;
/// The payload key that carries the send time.
const SENT_KEY: &str = "sent_ns";

#[derive(Args, Debug)]
pub struct LiveArgs {
    /// Ferrite's HTTP listener (WebSocket), IP:PORT on loopback.
    #[arg(long)]
    http_addr: String,
    /// Ferrite's MQTT listener, IP:PORT on loopback.
    #[arg(long)]
    mqtt_addr: String,
    /// File whose first line is the API key (or JWT) of the WebSocket
    /// subscriber; a file keeps the secret out of command lines and logs.
    #[arg(long)]
    api_key_file: PathBuf,
    /// A single device token used as username by every connection.
    #[arg(long, conflicts_with = "tokens_file")]
    token: Option<String>,
    /// File with one device token per line, used round-robin as usernames.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Publishing MQTT connections.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Messages per second over all connections together.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of measured publishing, at most 600.
    #[arg(long, default_value_t = 20)]
    duration_s: u64,
    /// Seconds of publishing before measuring starts.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    /// Seconds the subscriber keeps reading after the last publish.
    #[arg(long, default_value_t = 5)]
    drain_s: u64,
    /// Deliveries slower than this many milliseconds count as late.
    #[arg(long, default_value_t = 100)]
    late_ms: u64,
    #[arg(long, default_value = "v1/devices/me/telemetry")]
    topic: String,
    /// Client ids are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench-live")]
    client_id_prefix: String,
    /// Name of the system under test, copied into the result line.
    #[arg(long, default_value = "ferrite")]
    label: String,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct LiveLatency {
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// The result line of one `live` run.
#[derive(Debug, Serialize)]
pub struct LiveResult {
    figure: &'static str,
    system: String,
    devices: usize,
    connected: usize,
    rate_per_s: u64,
    duration_s: f64,
    /// Messages published in the measured window.
    published: u64,
    /// Of those, messages the subscriber received.
    delivered: u64,
    missing: u64,
    /// Deliveries slower than `late_ms`.
    late: u64,
    late_ms: u64,
    lagged_notices: u64,
    lagged_missed: u64,
    latency_ms: LiveLatency,
    /// How far the slowest publisher fell behind its schedule.
    behind_ms: f64,
    errors: usize,
    first_error: Option<String>,
}

/// Wall-clock time in nanoseconds since the Unix epoch.
fn wall_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as i64)
}

/// The measured window in both clocks: the publishers follow the monotonic
/// one, and the subscriber selects messages by their `sent_ns`.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    measure_until: Instant,
    measure_from_ns: i64,
    measure_until_ns: i64,
}

#[derive(Default)]
struct SubscriberTally {
    latencies_ns: Vec<i64>,
    lagged_notices: u64,
    lagged_missed: u64,
    error: Option<String>,
}

pub async fn run(args: LiveArgs) -> anyhow::Result<LiveResult> {
    let http = loopback_socket(&args.http_addr)?;
    let mqtt = loopback_socket(&args.mqtt_addr)?;
    let tokens = load_tokens(args.token.as_deref(), args.tokens_file.as_deref())?;
    anyhow::ensure!(
        !tokens.is_empty(),
        "give device tokens with --token or --tokens-file"
    );
    anyhow::ensure!(args.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        (1..=1_000_000).contains(&args.rate),
        "--rate must be from 1 to 1000000 messages per second"
    );
    anyhow::ensure!(
        (1..=600).contains(&args.duration_s),
        "--duration-s must be from 1 to 600"
    );
    anyhow::ensure!(args.drain_s <= 60, "--drain-s must be at most 60");

    let api_key = std::fs::read_to_string(&args.api_key_file).with_context(|| {
        format!(
            "cannot read the API key file {}",
            args.api_key_file.display()
        )
    })?;
    let api_key = api_key.lines().next().unwrap_or("").trim();
    anyhow::ensure!(
        !api_key.is_empty(),
        "the API key file {} is empty; write the key on its first line",
        args.api_key_file.display()
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let (window_tx, window_rx) = watch::channel::<Option<Window>>(None);
    let subscriber = connect_subscriber(http, api_key).await?;
    let subscriber = tokio::spawn(read_subscriber(subscriber, window_rx.clone(), stop_rx));

    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.devices);
    let behind_ns = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(args.devices as f64 / args.rate as f64);
    let mut publishers = Vec::with_capacity(args.devices);
    for index in 0..args.devices {
        let mut options = MqttOptions::new(
            format!("{}-{index}", args.client_id_prefix),
            mqtt.ip().to_string(),
            mqtt.port(),
        );
        options
            .set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_inflight(INFLIGHT)
            .set_request_channel_capacity(usize::from(INFLIGHT))
            .set_credentials(tokens[index % tokens.len()].clone(), "");
        let publisher = Publisher {
            options,
            topic: args.topic.clone(),
            // Connection `index` sends messages index, index + devices, ...
            offset: Duration::from_secs_f64(index as f64 / args.rate as f64),
            period,
            ready: ready_tx.clone(),
            window: window_rx.clone(),
            behind_ns: behind_ns.clone(),
        };
        publishers.push(tokio::spawn(publisher.run()));
    }
    drop(ready_tx);

    let mut connected = 0;
    let mut errors = Vec::new();
    while let Some(outcome) = ready_rx.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(error) => errors.push(error),
        }
    }

    let start = Instant::now() + Duration::from_millis(200);
    let start_ns = wall_ns() + 200_000_000;
    let warmup = Duration::from_secs(args.warmup_s);
    let duration = Duration::from_secs(args.duration_s);
    let window = Window {
        start,
        measure_until: start + warmup + duration,
        measure_from_ns: start_ns + warmup.as_nanos() as i64,
        measure_until_ns: start_ns + (warmup + duration).as_nanos() as i64,
    };
    window_tx
        .send(Some(window))
        .context("every task ended before the start")?;

    let mut published = 0;
    for publisher in publishers {
        let tally = publisher.await.context("a publisher task panicked")?;
        published += tally.published;
        if let Some(error) = tally.error {
            errors.push(error);
        }
    }
    tokio::time::sleep(Duration::from_secs(args.drain_s)).await;
    let _ = stop_tx.send(true);
    let tally = subscriber.await.context("the subscriber task panicked")?;
    if let Some(error) = tally.error {
        errors.push(error);
    }

    let late_ns = args.late_ms as i64 * 1_000_000;
    let late = tally
        .latencies_ns
        .iter()
        .filter(|&&ns| ns > late_ns)
        .count() as u64;
    let delivered = tally.latencies_ns.len() as u64;
    Ok(LiveResult {
        figure: "live",
        system: args.label,
        devices: args.devices,
        connected,
        rate_per_s: args.rate,
        duration_s: round3(duration.as_secs_f64()),
        published,
        delivered,
        missing: published.saturating_sub(delivered),
        late,
        late_ms: args.late_ms,
        lagged_notices: tally.lagged_notices,
        lagged_missed: tally.lagged_missed,
        latency_ms: summarize(&tally.latencies_ns),
        behind_ms: round3(behind_ns.load(Ordering::Relaxed) as f64 / 1e6),
        errors: errors.len(),
        first_error: errors.into_iter().next(),
    })
}

fn summarize(latencies_ns: &[i64]) -> LiveLatency {
    let mut millis: Vec<f64> = latencies_ns.iter().map(|&ns| ns as f64 / 1e6).collect();
    millis.sort_by(f64::total_cmp);
    LiveLatency {
        p50: round3(percentile(&millis, 50.0)),
        p90: round3(percentile(&millis, 90.0)),
        p99: round3(percentile(&millis, 99.0)),
        p999: round3(percentile(&millis, 99.9)),
        max: round3(millis.last().copied().unwrap_or(0.0)),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_subscriber(http: std::net::SocketAddr, api_key: &str) -> anyhow::Result<Socket> {
    let mut request = format!("ws://{http}/api/v1/live/ws?key={SENT_KEY}")
        .into_client_request()
        .context("building the WebSocket request")?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {api_key}")
            .parse()
            .context("the API key is not a valid header value")?,
    );
    let (socket, _) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .context("the WebSocket connection timed out")?
            .context("the WebSocket connection failed")?;
    Ok(socket)
}

/// Reads live messages until `stop`, recording the latency of every
/// delivered message that was sent in the measured window.
async fn read_subscriber(
    mut socket: Socket,
    mut window: watch::Receiver<Option<Window>>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberTally {
    let mut tally = SubscriberTally::default();
    loop {
        let message = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            message = socket.next() => message,
        };
        let received_ns = wall_ns();
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                tally.error = Some(format!("the WebSocket failed: {error}"));
                break;
            }
            None => {
                tally.error = Some("the server closed the WebSocket".into());
                break;
            }
        };
        let Some(window) = *window.borrow_and_update() else {
            continue;
        };
        record(&mut tally, &text, received_ns, &window);
    }
    let _ = socket.close(None).await;
    tally
}

fn record(tally: &mut SubscriberTally, text: &str, received_ns: i64, window: &Window) {
    let Ok(message) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    if message["type"] == "lagged" {
        tally.lagged_notices += 1;
        tally.lagged_missed += message["missed"].as_u64().unwrap_or(0);
        return;
    }
    let Some(points) = message["points"].as_array() else {
        return;
    };
    for point in points {
        let Some(sent_ns) = point["value"].as_i64() else {
            continue;
        };
        if (window.measure_from_ns..window.measure_until_ns).contains(&sent_ns) {
            tally.latencies_ns.push(received_ns - sent_ns);
        }
    }
}

#[derive(Default)]
struct PublisherTally {
    published: u64,
    error: Option<String>,
}

/// One publishing connection on its share of the schedule.
struct Publisher {
    options: MqttOptions,
    topic: String,
    offset: Duration,
    period: Duration,
    ready: mpsc::Sender<Result<(), String>>,
    window: watch::Receiver<Option<Window>>,
    behind_ns: Arc<AtomicU64>,
}

impl Publisher {
    async fn run(mut self) -> PublisherTally {
        let (client, mut eventloop) = AsyncClient::new(
            self.options.clone(),
            self.options.request_channel_capacity(),
        );
        if let Err(error) = wait_for_connack(&mut eventloop, CONNECT_TIMEOUT).await {
            let _ = self.ready.send(Err(error)).await;
            return PublisherTally::default();
        }
        let _ = self.ready.send(Ok(())).await;
        drop(self.ready);

        let window = match self.window.wait_for(Option::is_some).await {
            Ok(window) => window.expect("wait_for returns only a set window"),
            Err(_) => return PublisherTally::default(),
        };
        // The event loop writes the PUBLISHes and reads the PUBACKs. The
        // server closes the connection after our DISCONNECT, which ends it.
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return None,
                    Ok(_) => {}
                    Err(error) => return Some(format!("the MQTT connection failed: {error}")),
                }
            }
        });

        let mut tally = PublisherTally::default();
        let mut due = window.start + self.offset;
        let mut behind = Duration::ZERO;
        while due < window.measure_until {
            tokio::time::sleep_until(due).await;
            behind = behind.max(Instant::now().saturating_duration_since(due));
            let sent_ns = wall_ns();
            let payload = format!("{{\"{SENT_KEY}\":{sent_ns}}}");
            if client
                .publish(self.topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                tally.error = Some("the MQTT client stopped".into());
                break;
            }
            if (window.measure_from_ns..window.measure_until_ns).contains(&sent_ns) {
                tally.published += 1;
            }
            due += self.period;
        }
        self.behind_ns
            .fetch_max(behind.as_nanos() as u64, Ordering::Relaxed);

        // Let the last PUBLISHes go out before disconnecting.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = client.disconnect().await;
        match tokio::time::timeout(Duration::from_secs(2), poller).await {
            Ok(Ok(Some(error))) => {
                tally.error.get_or_insert(error);
            }
            Ok(_) => {}
            Err(_) => {
                tally
                    .error
                    .get_or_insert("the DISCONNECT was not written within 2 s".into());
            }
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_window_and_lag() {
        let window = Window {
            start: Instant::now(),
            measure_until: Instant::now(),
            measure_from_ns: 1_000,
            measure_until_ns: 2_000,
        };
        let mut tally = SubscriberTally::default();
        let message = |sent: i64| {
            format!(
                r#"{{"type":"telemetry","points":[{{"key":"sent_ns","ts":0,"value":{sent}}}]}}"#
            )
        };
        record(&mut tally, &message(500), 3_000, &window);
        record(&mut tally, &message(1_500), 3_000, &window);
        record(
            &mut tally,
            r#"{"type":"lagged","missed":7}"#,
            3_000,
            &window,
        );
        assert_eq!(tally.latencies_ns, vec![1_500]);
        assert_eq!(tally.lagged_notices, 1);
        assert_eq!(tally.lagged_missed, 7);
    }

    #[test]
    fn summary_has_the_tail_percentiles() {
        // 3 slow samples of 2,000 are above the 99th percentile but make
        // up the 99.9th, whichever way the nearest rank rounds.
        let mut latencies = vec![1_000_000_i64; 1997];
        latencies.extend([50_000_000; 3]);
        let summary = summarize(&latencies);
        assert_eq!(summary.p50, 1.0);
        assert_eq!(summary.p90, 1.0);
        assert_eq!(summary.p99, 1.0);
        assert_eq!(summary.p999, 50.0);
        assert_eq!(summary.max, 50.0);
    }
}
