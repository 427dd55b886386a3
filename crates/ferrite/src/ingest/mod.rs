//! The ingest log: every accepted message is appended here, synced to disk
//! and only then acknowledged. The pipeline consumes it in order.
//!
//! Adapters hold an [`IngestHandle`]; [`log::LogWriter`] owns the files.

mod envelope;
pub mod log;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use envelope::{ContentType, Envelope, Protocol};
pub use log::{Committed, LogControl, LogOptions, open};

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The log writer is behind; the client should retry later.
    #[error("the server is overloaded; retry in a few seconds")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The append failed on disk; nothing of it was acknowledged.
    #[error("the ingest log could not be written")]
    Io,
    /// One message is larger than a log record can be.
    #[error("a message of {0} bytes is larger than the ingest log's record limit of {max} bytes", max = log::MAX_RECORD_BODY)]
    TooLarge(usize),
}

pub(crate) struct AppendRequest {
    pub envelopes: Vec<Envelope>,
    pub done: oneshot::Sender<Result<(), IngestError>>,
}

pub(crate) enum LogCommand {
    Append(AppendRequest),
    /// Every record up to this sequence number is stored elsewhere: when
    /// that covers the whole segment being written, start a new one so the
    /// covered one can be deleted.
    Covered(u64),
    Shutdown,
}

/// Appends envelopes to the ingest log. Cheap to clone.
#[derive(Clone)]
pub struct IngestHandle {
    commands: mpsc::Sender<LogCommand>,
    append_timeout: Duration,
}

impl IngestHandle {
    /// Appends `envelopes` as one unit and returns once they are durable (as
    /// configured by `ingest.durability`). Either all of them are in the log
    /// or none is acknowledged.
    pub async fn append(&self, envelopes: Vec<Envelope>) -> Result<(), IngestError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        // The sequence number shares the record body with the envelope.
        if let Some(large) = envelopes
            .iter()
            .find(|envelope| envelope.encoded_len() + 8 > log::MAX_RECORD_BODY)
        {
            return Err(IngestError::TooLarge(large.encoded_len()));
        }
        let (done, wait) = oneshot::channel();
        let request = LogCommand::Append(AppendRequest { envelopes, done });

        // A full queue means the writer or the pipeline behind it is slower
        // than the input: wait a bounded time, then tell the client.
        match tokio::time::timeout(self.append_timeout, self.commands.send(request)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(IngestError::ShuttingDown),
            Err(_) => {
                metrics::counter!("ferrite_ingest_overloaded_total").increment(1);
                return Err(IngestError::Overloaded);
            }
        }
        wait.await.unwrap_or(Err(IngestError::ShuttingDown))
    }
}
