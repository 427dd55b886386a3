//! The NATS JetStream backend of the ingest log (`ingest.backend = "nats"`):
//! the queue lives in a JetStream stream outside the node.
//!
//! ## Layout in JetStream
//! - One stream (`ingest.nats.stream`) takes the subjects `{prefix}.>`. It
//!   uses file storage and the "limits" retention with no age or count
//!   limit, and `max_bytes` with the discard policy "new", so a full stream
//!   refuses new messages instead of dropping old ones. It keeps `replicas`
//!   copies and a `duplicate_window`.
//! - An envelope is one message on `{prefix}.{tenant_id}.{device_id}`. Its
//!   body is the output of [`Envelope::encode_into`]. Its `Nats-Msg-Id`
//!   header, a random prefix per process and a counter, lets JetStream store
//!   a retried publish only once within the duplicate window.
//! - One durable pull consumer (`ingest.nats.consumer`) reads the whole
//!   stream with the ack policy "all" and no delivery limit.
//! - A record's sequence number is its stream sequence, so the store's
//!   durable marker is a stream sequence.
//!
//! ## Durability
//! An append returns once JetStream has acknowledged every message of it.
//! JetStream acknowledges a message once the stream leader has written it to
//! its file store and, with more than one replica, a quorum of replicas has
//! it. The file store writes through the operating system's page cache and
//! forces a sync every `jetstream.sync_interval` of the NATS server, 2
//! minutes by default according to the NATS server documentation
//! (`always` syncs every message, at a large cost in throughput). With one
//! replica, a crash of the NATS process loses nothing acknowledged, but a
//! power loss or kernel crash of its host can lose what was acknowledged
//! within that interval. With three replicas an acknowledged message
//! survives the loss of one host.
//!
//! ## Retention "limits", not "work queue"
//! A work-queue stream deletes a message once it is acknowledged, but
//! JetStream accepts only the ack policy "explicit" on it. Every message
//! would then need its own acknowledgement, and its reply subject would
//! have to be kept until the flush that stores it: millions of them between
//! two flushes.
//! With "limits", one acknowledgement of the last record at or below the
//! checkpoint covers all earlier ones (ack policy "all"), and the backend
//! deletes the stored range by purging the stream below the checkpoint. So
//! a message leaves the stream when it is in the store, as a segment of the
//! embedded log does.
//!
//! ## Ack wait
//! A delivered message is acknowledged by the checkpoint after the flush
//! that stores it, at the latest `storage.flush_interval` plus the flush's
//! own time after delivery. With a shorter `ack_wait`, JetStream would
//! deliver every message again before its flush. The consumer drops such
//! redeliveries (below), so the cost would be traffic, not duplicates, but
//! the configuration check still requires `ack_wait` above the flush
//! interval. The default of 5 minutes is five times the default interval.
//!
//! ## Order and redelivery
//! - Batches reach the pipeline in stream order. A record at or below the
//!   highest sequence already handed over (which starts at the store's
//!   durable marker) is never handed over again: a redelivery after ack wait
//!   is dropped, and acknowledged when the store has it.
//! - A delivery lost on the way, for example at a reconnect in the middle of
//!   a pull, would come back only after ack wait, behind newer records. The
//!   consumer detects it by a gap in the consumer sequence, which every
//!   delivery (first or repeated) advances by one. After a reconnect it
//!   compares the consumer's delivered stream sequence with the last one
//!   received. Either way it then recreates the consumer to start right
//!   after the last record handed over.
//! - At start the consumer is kept when it has delivered nothing above the
//!   store's marker. Otherwise the previous process stopped before flushing
//!   what it had received, and those deliveries would come back only after
//!   ack wait, so the consumer is recreated to start after the marker.
//! - A message that is not an envelope this version can read stops the
//!   consumer with an error in the log: skipping it would let a checkpoint
//!   purge it unstored. Appends go on until the stream is full.
//!
//! ## Start-up
//! The stream is created, or updated to these settings. Records at or below
//! the store's marker are purged. A store whose marker is above the
//! stream's last sequence was filled through another log (the embedded one,
//! or another stream): when the stream is empty, purging up to the marker
//! makes its sequence continue after the marker; when it still contains
//! messages, start-up fails, because they would be taken as stored.
//!
//! ## Outages
//! The client reconnects without limit. While it is disconnected, appends
//! fail at once with [`IngestError::Io`]; an append whose acknowledgements
//! do not arrive within `ingest.append_timeout` while connected fails as
//! overloaded. The consumer pulls again once the connection is back.
//!
//! ## Shutdown
//! [`super::LogControl::shutdown`] rejects new appends (acknowledged ones
//! are in the stream already), stops pulling and closes the channel to the
//! pipeline. The consumer task keeps serving checkpoints until the control
//! is dropped, so the pipeline's last flush is usually acknowledged and
//! purged; when the process ends first, the next start purges that range.
//!
//! NOTE: one consumer per stream. Only one Ferrite node may use a stream,
//! because each node would recreate the consumer at start and purge the
//! stream up to its own store's marker.

mod consumer;
mod publish;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::OpenedLog;
use crate::config::Config;

/// Time to establish the first connection at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the JetStream backend, from `[ingest]` and `[ingest.nats]`.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Server URLs separated by commas.
    pub url: String,
    pub credentials_file: Option<PathBuf>,
    pub stream: String,
    pub subject_prefix: String,
    pub consumer: String,
    pub max_bytes: u64,
    pub replicas: usize,
    pub duplicate_window: Duration,
    pub ack_wait: Duration,
    /// Maximum wait for the acknowledgements of one append.
    pub append_timeout: Duration,
    /// Largest message the adapters accept, compared with the server's
    /// `max_payload` at start.
    pub largest_message: usize,
}

impl NatsOptions {
    pub fn from_config(config: &Config) -> NatsOptions {
        let nats = &config.ingest.nats;
        NatsOptions {
            url: nats.url.clone(),
            credentials_file: nats.credentials_file.clone(),
            stream: nats.stream.clone(),
            subject_prefix: nats.subject_prefix.clone(),
            consumer: nats.consumer.clone(),
            max_bytes: nats.max_bytes,
            replicas: nats.replicas,
            duplicate_window: nats.duplicate_window,
            ack_wait: nats.ack_wait,
            append_timeout: config.ingest.append_timeout,
            largest_message: config
                .http
                .max_body_bytes
                .max(config.mqtt.max_payload_bytes),
        }
    }
}

/// Connects to NATS, sets up the stream and the consumer and starts the
/// consumer task. Every record above `replay_after`, the store's durable
/// marker, goes to the pipeline.
pub async fn open(options: NatsOptions, replay_after: u64) -> anyhow::Result<OpenedLog> {
    let reconnected = Arc::new(Notify::new());
    let client = connect(&options, reconnected.clone()).await?;
    warn_if_messages_exceed_max_payload(&client, &options);
    let context = jetstream::ContextBuilder::new()
        .timeout(options.append_timeout)
        .build(client.clone());

    let mut stream = ensure_stream(&context, &options).await?;
    reconcile_with_marker(&mut stream, &options, replay_after).await?;

    let (markers, marker_updates) = watch::channel(replay_after);
    let (committed_tx, committed) = mpsc::channel(16);
    let (pull_stopped_tx, pull_stopped) = oneshot::channel();
    let stop = CancellationToken::new();
    let mut task = consumer::ConsumerTask::new(consumer::TaskParts {
        context: context.clone(),
        stream,
        options: options.clone(),
        committed: committed_tx,
        markers: marker_updates,
        stop: stop.clone(),
        reconnected,
        pull_stopped: pull_stopped_tx,
        start_after: replay_after,
    });
    let pull_consumer = task
        .ensure_consumer(false)
        .await
        .with_context(|| format!("cannot set up the JetStream consumer {}", options.consumer))?;
    tokio::spawn(task.run(pull_consumer));

    tracing::info!(
        url = %options.url,
        stream = %options.stream,
        consumer = %options.consumer,
        replay_after,
        "ingest log: NATS JetStream is ready"
    );
    let log = publish::NatsLog::new(client, context, &options, markers, stop, pull_stopped);
    let (handle, control) = super::split(Arc::new(log));
    let (ready_tx, ready) = oneshot::channel();
    // Nothing is replayed before live traffic: the consumer delivers the
    // records above the marker first, as they come in stream order.
    let _ = ready_tx.send(Ok(()));
    Ok(OpenedLog {
        handle,
        control,
        committed,
        ready,
    })
}

/// Connects to the servers of `options.url`; the client then reconnects
/// without limit and notifies `reconnected` at every connection.
async fn connect(options: &NatsOptions, reconnected: Arc<Notify>) -> anyhow::Result<Client> {
    let mut servers = Vec::new();
    for url in options.url.split(',').map(str::trim) {
        let server: ServerAddr = url.parse().with_context(|| {
            format!(
                "ingest.nats.url: {url:?} is not a NATS server URL such as \"nats://127.0.0.1:4222\""
            )
        })?;
        servers.push(server);
    }

    let connect_options = match &options.credentials_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| {
                format!(
                    "cannot read the NATS credentials file {} (ingest.nats.credentials_file)",
                    path.display()
                )
            })?,
        None => ConnectOptions::new(),
    };
    let events = Arc::new(parking_lot::Mutex::new(LogThrottle::new(
        Duration::from_secs(10),
    )));
    connect_options
        .name("ferrite")
        .connection_timeout(CONNECT_TIMEOUT)
        .max_reconnects(None)
        .event_callback(move |event| {
            let reconnected = reconnected.clone();
            let events = events.clone();
            async move { log_connection_event(event, &reconnected, &events) }
        })
        .connect(servers)
        .await
        .with_context(|| {
            format!(
                "cannot connect to NATS at {} (ingest.nats.url); start the NATS server with JetStream enabled (nats-server -js) or correct the URL",
                options.url
            )
        })
}

/// Logs a change of the connection. Only the connection's state changes are
/// logged at every occurrence; repeated errors are throttled.
fn log_connection_event(
    event: Event,
    reconnected: &Notify,
    throttle: &parking_lot::Mutex<LogThrottle>,
) {
    match event {
        Event::Connected => {
            tracing::info!("connected to NATS");
            reconnected.notify_one();
        }
        Event::Disconnected => {
            tracing::warn!("lost the connection to NATS; appends fail until it is back")
        }
        // Only when the client is dropped: reconnects have no limit.
        Event::Closed => tracing::info!("the NATS connection is closed"),
        Event::LameDuckMode => {
            tracing::warn!(
                "the NATS server is shutting down (lame duck mode); reconnecting elsewhere when it closes"
            )
        }
        Event::SlowConsumer(subscription) => {
            // The consumer detects the lost deliveries by their sequence.
            tracing::error!(
                subscription,
                "the NATS client dropped messages of a slow subscription"
            );
        }
        Event::ServerError(error) => {
            if let Some(suppressed) = throttle.lock().allow() {
                tracing::warn!(%error, suppressed, "the NATS server reported an error");
            }
        }
        Event::ClientError(error) => {
            if let Some(suppressed) = throttle.lock().allow() {
                tracing::warn!(%error, suppressed, "the NATS client reported an error");
            }
        }
        Event::Draining => {}
    }
}

/// Warns when the adapters accept messages that the NATS server's
/// `max_payload` refuses; appends of those fail as too large.
fn warn_if_messages_exceed_max_payload(client: &Client, options: &NatsOptions) {
    let max_payload = client.server_info().max_payload;
    let largest_record = options.largest_message + publish::RECORD_OVERHEAD;
    if largest_record > max_payload {
        tracing::warn!(
            max_payload,
            largest_record,
            "the NATS server accepts messages of at most max_payload bytes, less than http.max_body_bytes or mqtt.max_payload_bytes allow; larger messages are rejected as too large. Raise max_payload on the NATS server or lower those settings"
        );
    }
}

/// Creates the stream, or updates an existing one to these settings.
async fn ensure_stream(
    context: &jetstream::Context,
    options: &NatsOptions,
) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: options.stream.clone(),
        description: Some("Ferrite ingest log".to_owned()),
        subjects: vec![format!("{}.>", options.subject_prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::New,
        max_bytes: i64::try_from(options.max_bytes).unwrap_or(i64::MAX),
        num_replicas: options.replicas,
        duplicate_window: options.duplicate_window,
        ..Default::default()
    };
    context.create_or_update_stream(config).await.with_context(|| {
        format!(
            "cannot create or update the JetStream stream {} (ingest.nats.stream). Check that JetStream is enabled on the server (nats-server -js). An existing stream of that name must use file storage and the \"limits\" retention and take no subjects of another stream; choose another name otherwise",
            options.stream
        )
    })?;
    context
        .get_stream(&options.stream)
        .await
        .with_context(|| format!("cannot read the JetStream stream {}", options.stream))
}

/// Purges the records the store already has, and makes a fresh stream's
/// sequence continue after the store's marker.
async fn reconcile_with_marker(
    stream: &mut stream::Stream,
    options: &NatsOptions,
    marker: u64,
) -> anyhow::Result<()> {
    let state = stream_state(stream).await?;

    if marker > state.last_sequence {
        anyhow::ensure!(
            state.messages == 0,
            "the store's durable marker {marker} is above the last sequence {} of the JetStream stream {}, which still contains {} messages: the store was filled through another ingest log (the embedded one or another stream), and these messages would be taken as stored. Start with the previous ingest settings until the stream is empty, or choose a new stream with ingest.nats.stream",
            state.last_sequence,
            options.stream,
            state.messages,
        );
        // Purging up to a sequence above the last one moves the stream's
        // next sequence there.
        stream
            .purge()
            .sequence(marker + 1)
            .await
            .with_context(|| format!("cannot purge the JetStream stream {}", options.stream))?;
        let moved = stream_state(stream).await?;
        anyhow::ensure!(
            moved.last_sequence >= marker,
            "the JetStream stream {} did not move its sequence to {marker} after a purge (it is at {}); choose a new stream with ingest.nats.stream",
            options.stream,
            moved.last_sequence
        );
        tracing::info!(
            stream = %options.stream,
            next_sequence = marker + 1,
            "the stream continues after the store's durable marker"
        );
        return Ok(());
    }

    if state.messages > 0 && state.first_sequence <= marker {
        let purged = stream
            .purge()
            .sequence(marker + 1)
            .await
            .with_context(|| format!("cannot purge the JetStream stream {}", options.stream))?;
        tracing::info!(
            stream = %options.stream,
            purged = purged.purged,
            marker,
            "purged the messages the store already has"
        );
    } else if state.messages > 0 && state.first_sequence > marker + 1 {
        tracing::error!(
            stream = %options.stream,
            first_missing = marker + 1,
            last_missing = state.first_sequence - 1,
            "messages between the store's durable marker and the stream's first message were deleted from the stream before the store had them; they are lost"
        );
    }
    Ok(())
}

async fn stream_state(stream: &mut stream::Stream) -> anyhow::Result<stream::State> {
    let info = stream
        .info()
        .await
        .context("cannot read the state of the JetStream stream")?;
    Ok(info.state.clone())
}

/// Lets one warning of a repeated kind through per interval and counts the
/// ones held back.
struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    fn new(every: Duration) -> LogThrottle {
        LogThrottle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Returns how many warnings were held back since the last one let
    /// through, or `None` when this one is to be held back.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}
