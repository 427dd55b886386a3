//! The consuming side of the JetStream backend: one task pulls messages in
//! stream order, hands them to the pipeline in batches, and turns the
//! pipeline's checkpoints into an acknowledgement and a purge.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::Subject;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::stream::{self, ConsumerErrorKind};
use async_nats::jetstream::{self, ErrorCode};
use futures::{FutureExt, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{LogThrottle, NatsOptions};
use crate::ingest::{Committed, Envelope};

/// Messages asked for in one pull request.
const PULL_BATCH: usize = 1024;
/// The server sends a heartbeat this often while a pull request waits, so
/// a dead connection is noticed.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// Bounds of one batch for the pipeline, as for the embedded log's replay.
const MAX_BATCH_RECORDS: usize = 4096;
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Wait before setting up the consumer again after a failure, and between
/// attempts to purge.
const RETRY_DELAY: Duration = Duration::from_secs(2);

/// Parts of the consumer task that [`super::open`] sets up.
pub(super) struct TaskParts {
    pub context: jetstream::Context,
    pub stream: stream::Stream,
    pub options: NatsOptions,
    pub committed: mpsc::Sender<Committed>,
    pub markers: watch::Receiver<u64>,
    pub stop: CancellationToken,
    pub reconnected: Arc<Notify>,
    pub pull_stopped: oneshot::Sender<()>,
    /// The store's durable marker at start.
    pub start_after: u64,
}

pub(super) struct ConsumerTask {
    context: jetstream::Context,
    stream: stream::Stream,
    options: NatsOptions,
    /// The pipeline's channel; dropped when pulling stops, which closes it.
    committed: Option<mpsc::Sender<Committed>>,
    /// Checkpoints from the flusher; the sender is dropped with the control.
    markers: watch::Receiver<u64>,
    stop: CancellationToken,
    /// Notified at every (re)connection.
    reconnected: Arc<Notify>,
    pull_stopped: Option<oneshot::Sender<()>>,
    /// Highest stream sequence handed to the pipeline; at start, the store's
    /// durable marker. Nothing at or below it is handed over again.
    delivered: u64,
    /// Consumer sequence of the last delivery from the current consumer.
    /// Every delivery takes the next one, so a jump means a lost delivery.
    last_delivery: u64,
    /// Highest checkpoint up to which the stream has been purged.
    purged: u64,
    /// Stream sequence and reply subject of the last record of each batch
    /// handed over and not yet acknowledged, ascending. A checkpoint
    /// acknowledges the last one at or below it, which with the ack policy
    /// "all" covers every earlier delivery.
    ack_points: VecDeque<(u64, Subject)>,
    /// Reply subject of the newest redelivery of a record that the store
    /// already has; acknowledging it stops further redeliveries.
    stale_ack: Option<Subject>,
    warnings: LogThrottle,
}

/// Reason a pull loop ended.
enum PullEnd {
    /// Shutdown, or the pipeline is gone.
    Stopped,
    /// The message stream ended or failed, or the connection came back:
    /// check the consumer and pull again.
    Reopen,
    /// A delivery was lost: recreate the consumer after `delivered`.
    Restart,
    /// A message is not an envelope; pulling stops until a restart.
    Unreadable,
}

/// Outcome of one received message.
enum Received {
    Taken,
    Dropped,
    Gap,
    Unreadable,
}

/// Records received for the pipeline, not yet handed over.
#[derive(Default)]
struct Batch {
    records: Vec<(u64, Envelope)>,
    bytes: usize,
    /// Reply subject of the last record.
    last_reply: Option<Subject>,
}

impl Batch {
    fn is_full(&self) -> bool {
        self.records.len() >= MAX_BATCH_RECORDS || self.bytes >= MAX_BATCH_BYTES
    }
}

impl ConsumerTask {
    pub(super) fn new(parts: TaskParts) -> ConsumerTask {
        ConsumerTask {
            context: parts.context,
            stream: parts.stream,
            options: parts.options,
            committed: Some(parts.committed),
            markers: parts.markers,
            stop: parts.stop,
            reconnected: parts.reconnected,
            pull_stopped: Some(parts.pull_stopped),
            delivered: parts.start_after,
            last_delivery: 0,
            // Start-up purged up to the marker.
            purged: parts.start_after,
            ack_points: VecDeque::new(),
            stale_ack: None,
            warnings: LogThrottle::new(Duration::from_secs(10)),
        }
    }

    /// Pulls until shutdown, then closes the pipeline's channel and serves
    /// checkpoints until the control is dropped.
    pub(super) async fn run(mut self, consumer: PullConsumer) {
        // The first connection stored a notification; `open` has just set
        // up the consumer, so there is nothing to check.
        let _ = self.reconnected.notified().now_or_never();
        self.pull_until_stopped(consumer).await;

        self.committed = None;
        if let Some(pull_stopped) = self.pull_stopped.take() {
            let _ = pull_stopped.send(());
        }
        // The pipeline's last flush checkpoints after the shutdown.
        while self.markers.changed().await.is_ok() {
            self.checkpoint().await;
        }
    }

    async fn pull_until_stopped(&mut self, mut consumer: PullConsumer) {
        loop {
            let end = match self.open_messages(&consumer).await {
                Ok(mut messages) => self.pull(&mut messages).await,
                Err(error) => {
                    if let Some(suppressed) = self.warnings.allow() {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            suppressed,
                            "cannot pull from the JetStream consumer; retrying"
                        );
                    }
                    if !self.pause(RETRY_DELAY).await {
                        return;
                    }
                    PullEnd::Reopen
                }
            };
            let recreate = match end {
                PullEnd::Stopped => return,
                PullEnd::Unreadable => {
                    self.serve_checkpoints_until_stopped().await;
                    return;
                }
                PullEnd::Reopen => false,
                PullEnd::Restart => true,
            };

            // Set up the consumer again, retrying until NATS replies.
            consumer = loop {
                match self.ensure_consumer(recreate).await {
                    Ok(consumer) => break consumer,
                    Err(error) => {
                        if let Some(suppressed) = self.warnings.allow() {
                            tracing::warn!(
                                error = format!("{error:#}"),
                                suppressed,
                                "cannot set up the JetStream consumer; retrying"
                            );
                        }
                        if !self.pause(RETRY_DELAY).await {
                            return;
                        }
                    }
                }
            };
        }
    }

    async fn open_messages(&self, consumer: &PullConsumer) -> anyhow::Result<pull::Stream> {
        consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(PULL_HEARTBEAT)
            .expires(PULL_EXPIRES)
            .messages()
            .await
            .context("cannot start a pull request")
    }

    /// Receives messages and hands them over in batches until something
    /// makes the pull end.
    async fn pull(&mut self, messages: &mut pull::Stream) -> PullEnd {
        let mut retry_purge = Box::pin(tokio::time::sleep(RETRY_DELAY));
        loop {
            let first = tokio::select! {
                biased;
                () = self.stop.cancelled() => return PullEnd::Stopped,
                changed = self.markers.changed() => {
                    if changed.is_err() {
                        return PullEnd::Stopped;
                    }
                    self.checkpoint().await;
                    continue;
                }
                () = self.reconnected.notified() => return PullEnd::Reopen,
                () = &mut retry_purge => {
                    retry_purge.set(tokio::time::sleep(RETRY_DELAY));
                    if *self.markers.borrow() > self.purged {
                        self.checkpoint().await;
                    }
                    continue;
                }
                item = messages.next() => item,
            };

            // Take what has arrived already into the same batch.
            let mut batch = Batch::default();
            let mut item = first;
            let end = loop {
                match item {
                    None => break Some(PullEnd::Reopen),
                    Some(Err(error)) => {
                        if let Some(end) = self.pull_error(error) {
                            break Some(end);
                        }
                    }
                    Some(Ok(message)) => match self.receive(message, &mut batch) {
                        Received::Taken | Received::Dropped => {}
                        Received::Gap => break Some(PullEnd::Restart),
                        Received::Unreadable => break Some(PullEnd::Unreadable),
                    },
                }
                if batch.is_full() {
                    break None;
                }
                match messages.next().now_or_never() {
                    Some(next) => item = next,
                    None => break None,
                }
            };

            if !self.hand_over(batch).await {
                return PullEnd::Stopped;
            }
            self.acknowledge_stale().await;
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Logs a failed pull; returns how the pull ends, or `None` to go on.
    fn pull_error(&mut self, error: pull::MessagesError) -> Option<PullEnd> {
        use pull::MessagesErrorKind;

        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(%error, suppressed, consumer = %self.options.consumer, "pulling from JetStream failed");
        }
        match error.kind() {
            // The message stream pulls again by itself.
            MessagesErrorKind::MissingHeartbeat | MessagesErrorKind::Pull => None,
            _ => Some(PullEnd::Reopen),
        }
    }

    /// Checks one delivery and adds it to `batch` when it is the next record.
    fn receive(&mut self, message: jetstream::Message, batch: &mut Batch) -> Received {
        let (stream_sequence, consumer_sequence) = match message.info() {
            Ok(info) => (info.stream_sequence, info.consumer_sequence),
            Err(error) => {
                tracing::warn!(%error, subject = %message.subject, "a JetStream delivery without a valid reply subject; recreating the consumer");
                return Received::Gap;
            }
        };
        if consumer_sequence != self.last_delivery + 1 {
            tracing::warn!(
                expected = self.last_delivery + 1,
                received = consumer_sequence,
                "a JetStream delivery was lost; recreating the consumer after the last record handed over"
            );
            return Received::Gap;
        }
        self.last_delivery = consumer_sequence;

        if stream_sequence <= self.delivered {
            self.note_redelivery(stream_sequence, message.reply.clone());
            return Received::Dropped;
        }
        let Some(envelope) = Envelope::decode(&message.payload) else {
            tracing::error!(
                stream = %self.options.stream,
                stream_sequence,
                subject = %message.subject,
                "a message in the ingest stream is not an envelope this version can read; the pipeline stops consuming here. Start the version that wrote it, or delete the message if it does not come from Ferrite, then restart"
            );
            return Received::Unreadable;
        };

        self.delivered = stream_sequence;
        batch.bytes += envelope.encoded_len();
        batch.records.push((stream_sequence, envelope));
        batch.last_reply = message.reply.clone();
        Received::Taken
    }

    /// Drops a redelivered record that the pipeline already has. When the
    /// store has it as well, its acknowledgement is sent after the batch.
    fn note_redelivery(&mut self, stream_sequence: u64, reply: Option<Subject>) {
        metrics::counter!("ferrite_ingest_redeliveries_dropped_total").increment(1);
        let Some(reply) = reply else {
            return;
        };
        if stream_sequence <= *self.markers.borrow() {
            self.stale_ack = Some(reply);
        } else if let Ok(index) = self
            .ack_points
            .binary_search_by_key(&stream_sequence, |(sequence, _)| *sequence)
        {
            // The newest delivery's reply subject is the one the server
            // expects an acknowledgement on.
            self.ack_points[index].1 = reply;
        }
    }

    /// Sends `batch` to the pipeline; false when it is to stop.
    async fn hand_over(&mut self, batch: Batch) -> bool {
        let Some(&(last_seq, _)) = batch.records.last() else {
            return true;
        };
        let Some(committed) = self.committed.clone() else {
            return false;
        };
        if let Some(reply) = batch.last_reply {
            self.ack_points.push_back((last_seq, reply));
        }
        let count = batch.records.len();
        let sent = tokio::select! {
            // The records stay in the stream for the next start.
            () = self.stop.cancelled() => return false,
            sent = committed.send(Committed { last_seq, records: batch.records }) => sent,
        };
        if sent.is_err() {
            tracing::error!(
                "the pipeline stopped; messages stay in the JetStream stream for the next start"
            );
            return false;
        }
        metrics::counter!("ferrite_ingest_log_records_consumed_total").increment(count as u64);
        true
    }

    async fn acknowledge_stale(&mut self) {
        if let Some(reply) = self.stale_ack.take()
            && let Err(error) = Acker::new(self.context.clone(), Some(reply)).ack().await
        {
            tracing::debug!(%error, "acknowledging a redelivered message failed");
        }
    }

    /// Acknowledges the deliveries up to the latest checkpoint and purges
    /// them from the stream. A failed purge is tried again later.
    async fn checkpoint(&mut self) {
        let marker = *self.markers.borrow_and_update();

        let mut covered = None;
        while self
            .ack_points
            .front()
            .is_some_and(|(sequence, _)| *sequence <= marker)
        {
            covered = self.ack_points.pop_front();
        }
        if let Some((sequence, reply)) = covered {
            let acker = Acker::new(self.context.clone(), Some(reply));
            if let Err(error) = acker.double_ack().await {
                // Harmless: redeliveries are dropped, and the purge below
                // removes the messages.
                tracing::debug!(%error, sequence, "acknowledging a JetStream delivery failed");
            }
        }

        if marker > self.purged {
            match self.stream.purge().sequence(marker + 1).await {
                Ok(response) => {
                    self.purged = marker;
                    tracing::debug!(
                        marker,
                        purged = response.purged,
                        "purged stored messages from the stream"
                    );
                }
                Err(error) => {
                    if let Some(suppressed) = self.warnings.allow() {
                        tracing::warn!(%error, marker, suppressed, "cannot purge stored messages from the JetStream stream; retrying");
                    }
                }
            }
        }
    }

    /// Waits `delay` while serving checkpoints; false on shutdown.
    async fn pause(&mut self, delay: Duration) -> bool {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                biased;
                () = self.stop.cancelled() => return false,
                changed = self.markers.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                    self.checkpoint().await;
                }
                () = &mut sleep => return true,
            }
        }
    }

    async fn serve_checkpoints_until_stopped(&mut self) {
        while self.pause(Duration::from_secs(3600)).await {}
    }

    /// Returns a pull consumer that continues right after `delivered`: the
    /// existing one when it has delivered nothing beyond, otherwise (or with
    /// `recreate`) a new one.
    pub(super) async fn ensure_consumer(&mut self, recreate: bool) -> anyhow::Result<PullConsumer> {
        let name = self.options.consumer.clone();
        let reason = if recreate {
            Some("a delivery was lost")
        } else {
            match self.stream.consumer_info(&name).await {
                Ok(info) => self.reason_to_recreate(&info),
                Err(error) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                    Some("it does not exist")
                }
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("cannot read the JetStream consumer {name}"));
                }
            }
        };
        let Some(reason) = reason else {
            let consumer: PullConsumer = self
                .stream
                .get_consumer(&name)
                .await
                .map_err(|error| anyhow::anyhow!(error))
                .with_context(|| format!("cannot read the JetStream consumer {name}"))?;
            self.last_delivery = consumer.cached_info().delivered.consumer_sequence;
            return Ok(consumer);
        };
        self.recreate_consumer(reason).await
    }

    /// Returns the reason the existing consumer cannot continue after
    /// `delivered`, or `None` when it can.
    fn reason_to_recreate(&self, info: &consumer::Info) -> Option<&'static str> {
        let config = &info.config;
        if config.deliver_subject.is_some() {
            Some("it is a push consumer")
        } else if config.ack_policy != AckPolicy::All {
            Some("its ack policy is not \"all\"")
        } else if config.ack_wait != self.options.ack_wait {
            Some("ingest.nats.ack_wait changed")
        } else if !config.filter_subject.is_empty() {
            Some("it filters subjects")
        } else if info.delivered.stream_sequence > self.delivered {
            // Those deliveries would come back only after ack wait, behind
            // newer records.
            Some("it delivered records that were not stored")
        } else {
            None
        }
    }

    async fn recreate_consumer(&mut self, reason: &str) -> anyhow::Result<PullConsumer> {
        let name = self.options.consumer.clone();
        match self.stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(error)
                if matches!(error.kind(), ConsumerErrorKind::JetStream(ref source)
                    if source.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("cannot delete the JetStream consumer {name}"));
            }
        }

        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some("Ferrite pipeline".to_owned()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: self.delivered + 1,
            },
            ack_policy: AckPolicy::All,
            ack_wait: self.options.ack_wait,
            // Never give up on a message: the store needs every one.
            max_deliver: -1,
            // No limit on unacknowledged deliveries: acknowledgements come
            // only at checkpoints, and what the consumer pulls is bounded by
            // the pipeline's backpressure already.
            max_ack_pending: -1,
            ..Default::default()
        };
        let consumer = self
            .stream
            .create_consumer(config)
            .await
            .with_context(|| format!("cannot create the JetStream consumer {name}"))?;

        // Reply subjects of the deleted consumer are void, and the new one
        // never delivers those records again.
        self.last_delivery = 0;
        self.ack_points.clear();
        self.stale_ack = None;
        tracing::info!(
            consumer = %name,
            start_sequence = self.delivered + 1,
            reason,
            "created the JetStream consumer"
        );
        Ok(consumer)
    }
}
