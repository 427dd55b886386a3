//! The ingest log: every accepted message is appended here and acknowledged
//! to the device only once the log reports it durable. The pipeline consumes
//! the log in order and checkpoints it once the store has flushed.
//!
//! ## Backends
//! `ingest.backend` picks one of two implementations of [`IngestLog`] at
//! start ([`open`]):
//! - [`log`]: the embedded log, segment files in the data directory with
//!   group commit. One node, no other service.
//! - [`nats`]: a NATS JetStream stream, so that the queue lives outside the
//!   node and survives it.
//!
//! Adapters hold an [`IngestHandle`], which can only append. The server and
//! the pipeline hold the [`LogControl`], which checkpoints and shuts down.
//! Both wrap the same `Arc<dyn IngestLog>`. Committed records reach the
//! pipeline through a `tokio::sync::mpsc::Receiver<Committed>` whatever the
//! backend.
//!
//! The seam is a trait object rather than an enum of the two backends. The
//! backend is chosen at run time, each one keeps its code in its own file
//! behind three methods, and a test can put a fake log behind a handle. It
//! costs one boxed future per append, which is small next to the disk sync
//! or network round trip that every append waits for.
//!
//! ## Contract of every backend
//! - `append` returns `Ok` only when every envelope of the call is durable as
//!   the backend defines it. On `Err`, none of them was acknowledged, but
//!   some may still be delivered to the pipeline. A client that retries can
//!   then cause the same points to be written twice. The store absorbs that
//!   for points that carry their own timestamp (the last write per series
//!   and timestamp wins), while JSON values without one get a second point.
//! - Sequence numbers grow strictly. Batches reach the pipeline in sequence
//!   order, and every record up to a batch's `last_seq` is in that batch or
//!   an earlier one.
//! - `checkpoint(marker)` states that the store has flushed every record up
//!   to `marker`, so the backend may delete them. Records above the store's
//!   durable marker are delivered again after a restart.
//! - `shutdown` rejects new appends, lets the pipeline receive what was
//!   acknowledged (the embedded log commits its queue first), and then
//!   closes the channel of committed batches.

mod envelope;
pub mod log;
pub mod nats;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, IngestBackend};

pub use envelope::{ContentType, Envelope, Protocol};
pub use log::LogOptions;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The log or the pipeline behind it is behind, or the queue is full;
    /// the client should retry later.
    #[error("the server is overloaded; retry in a few seconds")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The append could not be stored (a disk error, or the NATS server is
    /// unreachable); nothing of it was acknowledged.
    #[error("the ingest queue is unavailable; retry later")]
    Io,
    /// One message is larger than the backend accepts in one record.
    #[error("a message of {0} bytes is larger than the ingest queue accepts in one record")]
    TooLarge(usize),
}

/// Committed envelopes, in sequence order, for the pipeline.
pub struct Committed {
    /// Sequence number of the last record in this batch; every record up to
    /// it is in this batch or an earlier one.
    pub last_seq: u64,
    pub records: Vec<(u64, Envelope)>,
}

/// One implementation of the ingest log; see the module documentation for
/// the contract.
pub trait IngestLog: Send + Sync {
    /// Appends `envelopes`, which is not empty, and resolves once all of them
    /// are durable.
    fn append(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>>;

    /// Records that the store has flushed every record up to `marker`. It
    /// must not block: the flusher thread calls it.
    fn checkpoint(&self, marker: u64);

    /// Stops accepting appends and closes the channel of committed batches
    /// once the pipeline has been handed what was acknowledged.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// Appends envelopes to the ingest log. Cheap to clone.
#[derive(Clone)]
pub struct IngestHandle {
    log: Arc<dyn IngestLog>,
}

impl IngestHandle {
    /// Appends `envelopes` as one unit and returns once they are durable (as
    /// configured by `ingest.backend` and, for the embedded log,
    /// `ingest.durability`). On an error none of them is acknowledged.
    pub async fn append(&self, envelopes: Vec<Envelope>) -> Result<(), IngestError> {
        if envelopes.is_empty() {
            return Ok(());
        }
        self.log.append(envelopes).await
    }
}

/// Owner-side control of the ingest log: checkpoints and shutdown.
pub struct LogControl {
    log: Arc<dyn IngestLog>,
}

impl LogControl {
    /// Lets the log delete every record up to `marker`, which the store has
    /// flushed. Does not block.
    pub fn checkpoint(&self, marker: u64) {
        self.log.checkpoint(marker);
    }

    /// Stops accepting appends, hands what was acknowledged to the pipeline
    /// and closes its channel.
    pub async fn shutdown(&self) {
        self.log.shutdown().await;
    }
}

/// Wraps one backend into the adapters' handle and the owner's control.
fn split(log: Arc<dyn IngestLog>) -> (IngestHandle, LogControl) {
    (IngestHandle { log: log.clone() }, LogControl { log })
}

/// An opened ingest log.
pub struct OpenedLog {
    pub handle: IngestHandle,
    pub control: LogControl,
    /// Committed batches in sequence order, starting with the records above
    /// the store's durable marker.
    pub committed: mpsc::Receiver<Committed>,
    /// Resolves once the records that were in the log at start have been
    /// handed to `committed` (the embedded log replays them first). `Err`
    /// means the log cannot be trusted and the server must not start.
    pub ready: oneshot::Receiver<anyhow::Result<()>>,
}

/// Opens the backend that `config.ingest.backend` names. Every record above
/// `replay_after`, the store's durable marker, is delivered to the pipeline.
/// `keyring` opens sealed records and, with `ingest.encrypt`, which needs
/// it, seals new ones.
pub async fn open(
    config: &Config,
    replay_after: u64,
    keyring: Option<Arc<crate::encryption::Keyring>>,
) -> anyhow::Result<OpenedLog> {
    anyhow::ensure!(
        keyring.is_some() || !config.ingest.encrypt,
        "ingest.encrypt needs the encryption keys"
    );
    match config.ingest.backend {
        IngestBackend::Embedded => {
            let options = LogOptions {
                durability: config.ingest.durability,
                segment_bytes: config.ingest.segment_bytes,
                queue_capacity: config.ingest.queue_capacity,
                append_timeout: config.ingest.append_timeout,
                keyring,
                encrypt: config.ingest.encrypt,
            };
            let (handle, control, committed, ready) =
                log::open(&config.data_dir.join("log"), options, replay_after)?;
            Ok(OpenedLog {
                handle,
                control,
                committed,
                ready,
            })
        }
        IngestBackend::Nats => {
            let options = nats::NatsOptions::from_config(config);
            nats::open(options, replay_after).await
        }
    }
}
