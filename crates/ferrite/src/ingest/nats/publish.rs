//! The append side of the JetStream backend: publishes envelopes and waits
//! for JetStream's acknowledgements. It also takes the owner's checkpoints
//! and shutdown, which it passes to the consumer task.

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, connection::State};
use bytes::Bytes;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::{LogThrottle, NatsOptions};
use crate::ingest::{Envelope, IngestError, IngestLog};

/// Bytes a record takes beyond its payload, rounded up: the envelope's
/// 48-byte header and the NATS header block with the message id (about 60).
pub(super) const RECORD_OVERHEAD: usize = 256;

/// Room left for the NATS header block when a body is compared with the
/// server's `max_payload`.
const HEADER_BLOCK_BYTES: usize = 128;

/// Publishes of one append: the first, and retries of those that failed
/// without a reply from the stream (a broken connection, no responders
/// during a leader election).
const PUBLISH_ATTEMPTS: u32 = 3;
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Appends through JetStream; shared by the adapters' handles and the
/// owner's control.
pub(super) struct NatsLog {
    client: Client,
    context: jetstream::Context,
    subject_prefix: String,
    stream: String,
    append_timeout: Duration,
    /// Random per process, so that message ids of two runs never meet in
    /// the duplicate window.
    id_prefix: String,
    next_id: AtomicU64,
    /// Set by shutdown; later appends are rejected.
    closed: AtomicBool,
    /// The latest checkpoint, for the consumer task.
    markers: watch::Sender<u64>,
    /// Cancelled by shutdown: the consumer task stops pulling.
    stop: CancellationToken,
    /// Resolves once the consumer task stopped pulling and closed the
    /// pipeline's channel; taken by the first shutdown.
    pull_stopped: Mutex<Option<oneshot::Receiver<()>>>,
    warnings: Mutex<LogThrottle>,
}

/// One envelope ready to publish.
struct Outgoing {
    subject: String,
    id: String,
    body: Bytes,
}

/// Outcome of a publish that JetStream did not acknowledge.
enum Failure {
    /// Publish it again with the same message id.
    Retry(PublishError),
    /// Give up on the append.
    Fail(IngestError),
}

impl NatsLog {
    pub(super) fn new(
        client: Client,
        context: jetstream::Context,
        options: &NatsOptions,
        markers: watch::Sender<u64>,
        stop: CancellationToken,
        pull_stopped: oneshot::Receiver<()>,
    ) -> NatsLog {
        NatsLog {
            client,
            context,
            subject_prefix: options.subject_prefix.clone(),
            stream: options.stream.clone(),
            append_timeout: options.append_timeout,
            id_prefix: format!("{:016x}", rand::random::<u64>()),
            next_id: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            markers,
            stop,
            pull_stopped: Mutex::new(Some(pull_stopped)),
            warnings: Mutex::new(LogThrottle::new(Duration::from_secs(10))),
        }
    }

    async fn append_envelopes(&self, envelopes: Vec<Envelope>) -> Result<(), IngestError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(IngestError::ShuttingDown);
        }
        // Publishes would wait in the client's buffer until a reconnect;
        // the client is better off retrying.
        if self.client.connection_state() != State::Connected {
            self.warn("NATS is unreachable; appends fail until the connection is back");
            metrics::counter!("ferrite_ingest_log_errors_total").increment(1);
            return Err(IngestError::Io);
        }
        // Checked before anything is published, so that an append fails whole.
        let max_payload = self.client.server_info().max_payload;
        if let Some(large) = envelopes
            .iter()
            .find(|envelope| envelope.encoded_len() + HEADER_BLOCK_BYTES > max_payload)
        {
            return Err(IngestError::TooLarge(large.encoded_len()));
        }

        let messages: Vec<Outgoing> = envelopes
            .iter()
            .map(|envelope| Outgoing {
                subject: format!(
                    "{}.{}.{}",
                    self.subject_prefix, envelope.tenant_id, envelope.device_id
                ),
                id: format!(
                    "{}-{}",
                    self.id_prefix,
                    self.next_id.fetch_add(1, Ordering::Relaxed)
                ),
                body: encode(envelope),
            })
            .collect();
        match tokio::time::timeout(self.append_timeout, self.publish_until_stored(&messages)).await
        {
            Ok(Ok(())) => {
                metrics::counter!("ferrite_ingest_log_records_total")
                    .increment(messages.len() as u64);
                Ok(())
            }
            Ok(Err(error)) => Err(error),
            Err(_elapsed) if self.client.connection_state() == State::Connected => {
                self.warn("JetStream did not acknowledge an append within ingest.append_timeout; the client is told the server is overloaded");
                metrics::counter!("ferrite_ingest_overloaded_total").increment(1);
                Err(IngestError::Overloaded)
            }
            Err(_elapsed) => {
                self.warn("lost the connection to NATS during an append; the client gets an error");
                metrics::counter!("ferrite_ingest_log_errors_total").increment(1);
                Err(IngestError::Io)
            }
        }
    }

    /// Publishes `messages` and waits until JetStream has stored every one,
    /// publishing those again whose acknowledgement failed without a reply
    /// from the stream. The message ids make a repeated publish of a stored
    /// message a no-op.
    ///
    /// NOTE: a message published again lands behind the rest of its append.
    /// Points of one series and timestamp in one append could then swap
    /// their order; it takes a publish failing while later ones succeed.
    async fn publish_until_stored(&self, messages: &[Outgoing]) -> Result<(), IngestError> {
        let mut pending: Vec<&Outgoing> = messages.iter().collect();
        let mut attempt = 1;
        loop {
            let (failed, last_error) = self.publish_once(&pending).await?;
            let Some(error) = last_error else {
                return Ok(());
            };
            if attempt == PUBLISH_ATTEMPTS {
                if let Some(suppressed) = self.warnings.lock().allow() {
                    tracing::error!(
                        stream = %self.stream,
                        %error,
                        attempts = PUBLISH_ATTEMPTS,
                        suppressed,
                        "JetStream did not store an append; the client gets an error"
                    );
                }
                metrics::counter!("ferrite_ingest_log_errors_total").increment(1);
                return Err(IngestError::Io);
            }
            pending = failed;
            attempt += 1;
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }

    /// Publishes `messages` one after the other without waiting, then waits
    /// for each acknowledgement. Returns the messages to publish again and
    /// the last error that asked for it.
    async fn publish_once<'a>(
        &self,
        messages: &[&'a Outgoing],
    ) -> Result<(Vec<&'a Outgoing>, Option<PublishError>), IngestError> {
        let mut acks = Vec::with_capacity(messages.len());
        for message in messages {
            let publish = PublishMessage::build()
                .payload(message.body.clone())
                .message_id(&message.id);
            acks.push(
                self.context
                    .send_publish(message.subject.clone(), publish)
                    .await,
            );
        }

        let mut failed = Vec::new();
        let mut last_error = None;
        for (message, ack) in messages.iter().zip(acks) {
            let stored = match ack {
                Ok(ack) => ack.await,
                Err(error) => Err(error),
            };
            let Err(error) = stored else {
                continue;
            };
            match self.classify(error, message) {
                Failure::Retry(error) => {
                    failed.push(*message);
                    last_error = Some(error);
                }
                Failure::Fail(error) => return Err(error),
            }
        }
        Ok((failed, last_error))
    }

    fn classify(&self, error: PublishError, message: &Outgoing) -> Failure {
        match error.kind() {
            PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound => Failure::Retry(error),
            PublishErrorKind::MaxPayloadExceeded => {
                Failure::Fail(IngestError::TooLarge(message.body.len()))
            }
            PublishErrorKind::MaxAckPending => {
                metrics::counter!("ferrite_ingest_overloaded_total").increment(1);
                Failure::Fail(IngestError::Overloaded)
            }
            _ if is_out_of_space(&error) => {
                self.warn("the JetStream stream is full (ingest.nats.max_bytes) or out of storage; appends fail as overloaded until the pipeline has stored and purged older messages");
                metrics::counter!("ferrite_ingest_overloaded_total").increment(1);
                Failure::Fail(IngestError::Overloaded)
            }
            _ => {
                if let Some(suppressed) = self.warnings.lock().allow() {
                    tracing::error!(stream = %self.stream, %error, suppressed, "JetStream rejected a message; the client gets an error");
                }
                metrics::counter!("ferrite_ingest_log_errors_total").increment(1);
                Failure::Fail(IngestError::Io)
            }
        }
    }

    fn warn(&self, message: &'static str) {
        if let Some(suppressed) = self.warnings.lock().allow() {
            tracing::warn!(stream = %self.stream, suppressed, "{message}");
        }
    }

    async fn stop_pulling(&self) {
        self.closed.store(true, Ordering::Release);
        self.stop.cancel();
        let pull_stopped = self.pull_stopped.lock().take();
        if let Some(pull_stopped) = pull_stopped {
            let _ = pull_stopped.await;
        }
        tracing::info!(stream = %self.stream, "ingest log: stopped pulling from NATS JetStream");
    }
}

impl IngestLog for NatsLog {
    fn append(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.append_envelopes(envelopes))
    }

    /// Passes `marker` to the consumer task, which acknowledges and purges
    /// the records up to it.
    fn checkpoint(&self, marker: u64) {
        self.markers.send_if_modified(|current| {
            if marker > *current {
                *current = marker;
                true
            } else {
                false
            }
        });
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.stop_pulling())
    }
}

fn encode(envelope: &Envelope) -> Bytes {
    let mut body = Vec::with_capacity(envelope.encoded_len());
    envelope.encode_into(&mut body);
    body.into()
}

/// Returns whether JetStream rejected a message for lack of space: the
/// stream is at `max_bytes` with the discard policy "new", or the server or
/// account has no storage left.
fn is_out_of_space(error: &PublishError) -> bool {
    let Some(source) = error
        .source()
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
    else {
        return false;
    };
    let code = source.error_code();
    // NATS server 2.9.10 rejects a message to a full stream with the generic
    // "store failed" code 10077 and the description "maximum bytes exceeded"
    // (or "maximum messages exceeded"), so only the description identifies it.
    let text = source.to_string();
    code == ErrorCode::INSUFFICIENT_RESOURCES
        || code == ErrorCode::STORAGE_RESOURCES_EXCEEDED
        || code == ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
        || text.contains("maximum bytes exceeded")
        || text.contains("maximum messages exceeded")
}
