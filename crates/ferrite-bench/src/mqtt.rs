//! `mqtt`: QoS 1 PUBLISH throughput from many MQTT 3.1.1 connections.
//!
//! Every connection gets its own client id and a device token as username
//! (tokens are reused round-robin when there are fewer than connections).
//! All connections are opened first. Then each publishes the same small JSON
//! payload as fast as the broker acknowledges, with at most `--inflight`
//! unacknowledged messages (rumqttc's inflight window). After `--warmup-s`
//! the PUBACKs that arrive during `--duration-s` are counted, and the time
//! from handing a PUBLISH to the socket to its PUBACK is recorded.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::stats::{LatencySummary, round3};
use crate::target::{load_tokens, loopback_socket};

/// Maximum wait for CONNACK on one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Args, Debug)]
pub struct MqttArgs {
    /// Broker address, IP:PORT on loopback.
    #[arg(long)]
    addr: String,
    /// A single device token used as username by every connection.
    #[arg(long, conflicts_with = "tokens_file")]
    token: Option<String>,
    /// File with one device token per line, used round-robin as usernames.
    /// Without --token and --tokens-file the connections are anonymous.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Publishing connections.
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Unacknowledged QoS 1 messages allowed per connection.
    #[arg(long, default_value_t = 20)]
    inflight: u16,
    /// Seconds during which PUBACKs are counted.
    #[arg(long, default_value_t = 15)]
    duration_s: u64,
    /// Seconds of publishing before counting starts.
    #[arg(long, default_value_t = 2)]
    warmup_s: u64,
    #[arg(long, default_value = "v1/devices/me/telemetry")]
    topic: String,
    #[arg(
        long,
        default_value = r#"{"temperature":21.5,"humidity":40,"battery":3.7}"#
    )]
    payload: String,
    /// Client ids are PREFIX-0, PREFIX-1, ...
    #[arg(long, default_value = "bench-pub")]
    client_id_prefix: String,
    /// Name of the system under test, copied into the result line.
    #[arg(long, default_value = "unnamed")]
    label: String,
}

/// The result line of one `mqtt` run.
#[derive(Debug, Serialize)]
pub struct MqttResult {
    figure: &'static str,
    system: String,
    connections: usize,
    connected: usize,
    inflight: u16,
    payload_bytes: usize,
    duration_s: f64,
    acks: u64,
    acks_per_s: f64,
    latency_ms: LatencySummary,
    /// Connections that failed to connect or dropped before the end.
    errors: usize,
    first_error: Option<String>,
}

/// The phases every connection follows, sent from the coordinator.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    measure_from: Instant,
    measure_until: Instant,
}

#[derive(Default)]
struct ConnectionTally {
    acks: u64,
    latencies: Vec<Duration>,
    error: Option<String>,
}

pub async fn run(args: MqttArgs) -> anyhow::Result<MqttResult> {
    let addr = loopback_socket(&args.addr)?;
    let tokens = load_tokens(args.token.as_deref(), args.tokens_file.as_deref())?;
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.inflight > 0, "--inflight must be at least 1");
    anyhow::ensure!(args.duration_s > 0, "--duration-s must be at least 1");

    let payload = Bytes::from(args.payload.clone());
    let topic: Arc<str> = Arc::from(args.topic.as_str());
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.connections);
    let (start_tx, start_rx) = watch::channel::<Option<Schedule>>(None);

    let mut tasks = Vec::with_capacity(args.connections);
    for index in 0..args.connections {
        let mut options = MqttOptions::new(
            format!("{}-{index}", args.client_id_prefix),
            addr.ip().to_string(),
            addr.port(),
        );
        options
            .set_keep_alive(Duration::from_secs(60))
            .set_clean_session(true)
            .set_inflight(args.inflight)
            .set_request_channel_capacity(usize::from(args.inflight));
        if !tokens.is_empty() {
            options.set_credentials(tokens[index % tokens.len()].clone(), "");
        }
        let connection = Connection {
            options,
            topic: Arc::clone(&topic),
            payload: payload.clone(),
            ready: ready_tx.clone(),
            start: start_rx.clone(),
        };
        tasks.push(tokio::spawn(connection.run()));
    }
    drop(ready_tx);

    // Start publishing only when every connection has connected or failed.
    let mut connected = 0;
    let mut connect_errors = Vec::new();
    while let Some(outcome) = ready_rx.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(error) => connect_errors.push(error),
        }
    }
    let measure_from = Instant::now() + Duration::from_secs(args.warmup_s);
    let schedule = Schedule {
        measure_from,
        measure_until: measure_from + Duration::from_secs(args.duration_s),
    };
    start_tx
        .send(Some(schedule))
        .context("every connection task ended before the start")?;

    let mut total = ConnectionTally::default();
    let mut errors = connect_errors.len();
    let mut first_error = connect_errors.into_iter().next();
    for task in tasks {
        let tally = task.await.context("an MQTT connection task panicked")?;
        total.acks += tally.acks;
        total.latencies.extend(tally.latencies);
        if let Some(error) = tally.error {
            errors += 1;
            first_error.get_or_insert(error);
        }
    }

    let duration = schedule.measure_until - schedule.measure_from;
    Ok(MqttResult {
        figure: "mqtt",
        system: args.label,
        connections: args.connections,
        connected,
        inflight: args.inflight,
        payload_bytes: payload.len(),
        duration_s: round3(duration.as_secs_f64()),
        acks: total.acks,
        acks_per_s: (total.acks as f64 / duration.as_secs_f64()).round(),
        latency_ms: LatencySummary::from_durations(&total.latencies),
        errors,
        first_error,
    })
}

/// One publishing connection and the channels to the coordinator.
struct Connection {
    options: MqttOptions,
    topic: Arc<str>,
    payload: Bytes,
    ready: mpsc::Sender<Result<(), String>>,
    start: watch::Receiver<Option<Schedule>>,
}

impl Connection {
    async fn run(mut self) -> ConnectionTally {
        let (client, mut eventloop) = AsyncClient::new(
            self.options.clone(),
            self.options.request_channel_capacity(),
        );

        if let Err(error) = wait_for_connack(&mut eventloop, CONNECT_TIMEOUT).await {
            let _ = self.ready.send(Err(error)).await;
            return ConnectionTally::default();
        }
        let _ = self.ready.send(Ok(())).await;
        drop(self.ready);

        // The coordinator sends the schedule once every connection is ready.
        let schedule = match self.start.wait_for(Option::is_some).await {
            Ok(schedule) => schedule.expect("wait_for returns only a set schedule"),
            Err(_) => return ConnectionTally::default(),
        };

        let publisher = tokio::spawn(publish_until(
            client.clone(),
            Arc::clone(&self.topic),
            self.payload.clone(),
            schedule.measure_until,
        ));
        let tally = count_acks(&mut eventloop, schedule).await;
        publisher.abort();
        disconnect(&client, &mut eventloop).await;
        tally
    }
}

/// Polls a new event loop until its CONNACK, or returns why the connection failed.
pub async fn wait_for_connack(eventloop: &mut EventLoop, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => return Err(format!("no CONNACK within {timeout:?}")),
            Ok(Err(error)) => return Err(format!("connect failed: {error}")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Queues PUBLISHes until `until`; the request channel and the inflight
/// window make `publish_bytes` wait while the broker is behind.
async fn publish_until(client: AsyncClient, topic: Arc<str>, payload: Bytes, until: Instant) {
    while Instant::now() < until {
        if client
            .publish_bytes(topic.as_ref(), QoS::AtLeastOnce, false, payload.clone())
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Drives the event loop until the end of the schedule, counting PUBACKs in
/// the measured window and the latency of each from its PUBLISH.
async fn count_acks(eventloop: &mut EventLoop, schedule: Schedule) -> ConnectionTally {
    let mut tally = ConnectionTally::default();
    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    loop {
        let event = match tokio::time::timeout_at(schedule.measure_until, eventloop.poll()).await {
            Err(_) => break,
            Ok(Err(error)) => {
                tally.error = Some(format!("connection lost while publishing: {error}"));
                break;
            }
            Ok(Ok(event)) => event,
        };
        let now = Instant::now();
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                sent_at.insert(pkid, now);
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                let sent = sent_at.remove(&ack.pkid);
                if now >= schedule.measure_from && now < schedule.measure_until {
                    tally.acks += 1;
                    if let Some(sent) = sent {
                        tally.latencies.push(now - sent);
                    }
                }
            }
            _ => {}
        }
    }
    tally
}

/// Sends DISCONNECT and gives the event loop a moment to write it.
async fn disconnect(client: &AsyncClient, eventloop: &mut EventLoop) {
    if client.try_disconnect().is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(event)) = tokio::time::timeout_at(deadline, eventloop.poll()).await {
        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
}
