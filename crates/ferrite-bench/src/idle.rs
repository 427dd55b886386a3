//! `idle`: many idle MQTT 3.1.1 connections, held open for a memory reading.
//!
//! Opens `--count` connections (at most `--connect-concurrency` handshakes at
//! a time), each with its own client id and a device token as username,
//! reused round-robin. When every connection has its CONNACK or has failed,
//! the command creates `--ready-file`, the signal for a driver script to
//! read the broker's memory. Then it keeps every event loop polled (it sends
//! nothing but keep-alive pings) for `--hold-s` seconds and closes all
//! connections.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rumqttc::{AsyncClient, MqttOptions};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::mqtt::wait_for_connack;
use crate::stats::round3;
use crate::target::{load_tokens, loopback_socket};

/// Maximum wait for CONNACK on one connection, counted from its handshake permit.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug)]
pub struct IdleArgs {
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
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
    /// Seconds to hold the connections after the last one is open.
    #[arg(long, default_value_t = 30)]
    hold_s: u64,
    /// MQTT keep-alive in seconds.
    #[arg(long, default_value_t = 60)]
    keep_alive_s: u64,
    /// Handshakes in progress at the same time.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Client ids are PREFIX-0, PREFIX-1, ...; give each generator process its own.
    #[arg(long, default_value = "bench-idle")]
    client_id_prefix: String,
    /// File created once every connection is open or has failed.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Name of the system under test, copied into the result line.
    #[arg(long, default_value = "unnamed")]
    label: String,
}

/// The result line of one `idle` run.
#[derive(Debug, Serialize)]
pub struct IdleResult {
    figure: &'static str,
    system: String,
    count: usize,
    connected: usize,
    connect_failed: usize,
    /// Connections that were open at the start of the hold and lost during it.
    dropped_while_held: usize,
    connect_s: f64,
    hold_s: u64,
    first_error: Option<String>,
}

enum Outcome {
    Connected,
    Failed(String),
}

pub async fn run(args: IdleArgs) -> anyhow::Result<IdleResult> {
    let addr = loopback_socket(&args.addr)?;
    let tokens = load_tokens(args.token.as_deref(), args.tokens_file.as_deref())?;
    anyhow::ensure!(
        args.connect_concurrency > 0,
        "--connect-concurrency must be at least 1"
    );

    let handshakes = Arc::new(Semaphore::new(args.connect_concurrency));
    let (outcome_tx, mut outcome_rx) = mpsc::unbounded_channel::<Outcome>();
    let (release_tx, release_rx) = watch::channel(false);
    let started = Instant::now();

    let mut tasks = Vec::with_capacity(args.count);
    for index in 0..args.count {
        let mut options = MqttOptions::new(
            format!("{}-{index}", args.client_id_prefix),
            addr.ip().to_string(),
            addr.port(),
        );
        options
            .set_keep_alive(Duration::from_secs(args.keep_alive_s))
            .set_clean_session(true)
            .set_request_channel_capacity(4);
        if !tokens.is_empty() {
            options.set_credentials(tokens[index % tokens.len()].clone(), "");
        }
        tasks.push(tokio::spawn(hold_connection(
            options,
            Arc::clone(&handshakes),
            outcome_tx.clone(),
            release_rx.clone(),
        )));
    }
    drop(outcome_tx);

    // Wait until every connection reported its handshake outcome.
    let mut connected = 0;
    let mut connect_failed = 0;
    let mut first_error = None;
    for _ in 0..args.count {
        match outcome_rx.recv().await {
            Some(Outcome::Connected) => connected += 1,
            Some(Outcome::Failed(error)) => {
                connect_failed += 1;
                first_error.get_or_insert(error);
            }
            None => break,
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{connected}\n"))
            .with_context(|| format!("cannot create the ready file {}", path.display()))?;
    }

    tokio::time::sleep(Duration::from_secs(args.hold_s)).await;
    let _ = release_tx.send(true);

    let mut dropped_while_held = 0;
    for task in tasks {
        if let Some(error) = task.await.context("an idle connection task panicked")? {
            dropped_while_held += 1;
            first_error.get_or_insert(error);
        }
    }

    Ok(IdleResult {
        figure: "idle",
        system: args.label,
        count: args.count,
        connected,
        connect_failed,
        dropped_while_held,
        connect_s: round3(connect_s),
        hold_s: args.hold_s,
        first_error,
    })
}

/// Connects, reports the outcome, then polls until released. Returns the
/// error that ended an established connection before the release.
async fn hold_connection(
    options: MqttOptions,
    handshakes: Arc<Semaphore>,
    outcome: mpsc::UnboundedSender<Outcome>,
    mut release: watch::Receiver<bool>,
) -> Option<String> {
    let (client, mut eventloop) = AsyncClient::new(options, 4);

    let permit = handshakes.acquire_owned().await.ok();
    let handshake = wait_for_connack(&mut eventloop, CONNECT_TIMEOUT).await;
    drop(permit);
    if let Err(error) = handshake {
        let _ = outcome.send(Outcome::Failed(error));
        return None;
    }
    let _ = outcome.send(Outcome::Connected);
    drop(outcome);

    let lost = loop {
        tokio::select! {
            _ = release.wait_for(|released| *released) => break None,
            polled = eventloop.poll() => {
                if let Err(error) = polled {
                    break Some(format!("connection lost while held: {error}"));
                }
            }
        }
    };
    if lost.is_none() && client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), eventloop.poll()).await;
    }
    lost
}
