//! The pipeline: consumes committed envelopes from the ingest log and runs
//! each through the steps of [`worker`]: decode with the profile's codec,
//! transform, validate, store, publish to live subscribers and evaluate
//! rules. Messages that fail a step go to the dead-letter log.
//!
//! ## Threads and ownership
//! - The dispatcher thread receives committed batches in sequence order and
//!   splits them by device across `workers` worker threads. A device always
//!   maps to the same worker, so each series is written in log order, and
//!   "last write wins" means the last write in the log.
//! - Every worker gets every batch's sequence number, also when no envelope
//!   of the batch is its own, and records it after writing. The smallest
//!   recorded number is the pipeline's applied position: every record up to
//!   it is in the store's memory.
//! - The flusher thread flushes the store when its unflushed memory reaches
//!   the budget or `flush_interval` has passed, with the applied position as
//!   the store's durable marker, then lets the log delete the segments below.
//!
//! ## Backpressure
//! Channels between the threads are bounded. When workers fall behind, the
//! dispatcher blocks, the log writer blocks on its hand-over and appends wait
//! in the log's queue, which returns "overloaded" after a timeout.
//!
//! ## Shutdown
//! When the log writer stops it closes its channel; the dispatcher and
//! workers drain what they have and exit, and [`Pipeline::finish`] flushes
//! the store a last time.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::ids::DeviceId;
use crate::ingest::{Committed, Envelope, LogControl};
use crate::store::TimeSeriesStore;

mod worker;

pub use worker::Processing;

/// Devices seen since the last metadata update, with the newest receive time
/// in epoch milliseconds.
pub type SeenDevices = Arc<Mutex<HashMap<DeviceId, i64>>>;

pub(crate) struct Work {
    last_seq: u64,
    /// Envelopes with their ingest log positions.
    envelopes: Vec<(u64, Envelope)>,
}

/// Lets other tasks request a flush now (before a compaction
/// on demand, for example) and wait for it.
#[derive(Default)]
pub struct FlushRequests {
    requested: AtomicU64,
    done: AtomicU64,
    wake: Option<Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>>,
}

impl FlushRequests {
    /// Requests a flush and waits until one that started after the request
    /// has finished, for at most `timeout`. Returns false on timeout.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let ticket = self.requested.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(wake) = &self.wake {
            wake.1.notify_all();
        }
        let deadline = Instant::now() + timeout;
        while self.done.load(Ordering::Acquire) < ticket {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

pub struct Pipeline {
    flush_requests: Arc<FlushRequests>,
    dispatcher: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    flusher: Option<JoinHandle<()>>,
    stop_flusher: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    applied: Arc<Vec<AtomicU64>>,
    store: Arc<dyn TimeSeriesStore>,
    log: Arc<LogControl>,
}

/// How often the flusher refreshes the store's memory gauges. The estimate
/// visits every device, so it is not refreshed at every flusher tick.
const MEMORY_REPORT_EVERY: Duration = Duration::from_secs(10);

pub struct PipelineOptions {
    pub workers: usize,
    pub flush_interval: Duration,
}

impl Pipeline {
    /// Starts the dispatcher, workers and flusher. `start_marker` is the
    /// store's durable marker: everything up to it is already stored.
    pub fn start(
        committed: mpsc::Receiver<Committed>,
        store: Arc<dyn TimeSeriesStore>,
        log: Arc<LogControl>,
        processing: Arc<Processing>,
        options: PipelineOptions,
    ) -> anyhow::Result<Pipeline> {
        let start_marker = store.durable_marker();
        let applied: Arc<Vec<AtomicU64>> = Arc::new(
            (0..options.workers)
                .map(|_| AtomicU64::new(start_marker))
                .collect(),
        );

        let mut senders = Vec::with_capacity(options.workers);
        let mut workers = Vec::with_capacity(options.workers);
        for index in 0..options.workers {
            let (sender, receiver) = sync_channel::<Work>(16);
            senders.push(sender);
            let store = store.clone();
            let applied = applied.clone();
            let processing = processing.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("pipeline-{index}"))
                    .spawn(move || {
                        worker::run(receiver, store.as_ref(), &applied[index], &processing)
                    })?,
            );
        }

        let dispatcher = std::thread::Builder::new()
            .name("pipeline-dispatch".into())
            .spawn(move || run_dispatcher(committed, senders))?;

        let stop_flusher = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let flush_requests = Arc::new(FlushRequests {
            wake: Some(stop_flusher.clone()),
            ..FlushRequests::default()
        });
        let flusher = {
            let store = store.clone();
            let log = log.clone();
            let applied = applied.clone();
            let stop = stop_flusher.clone();
            let requests = flush_requests.clone();
            std::thread::Builder::new()
                .name("store-flush".into())
                .spawn(move || {
                    run_flusher(store.as_ref(), &log, &applied, &stop, &requests, &options)
                })?
        };

        Ok(Pipeline {
            flush_requests,
            dispatcher: Some(dispatcher),
            workers,
            flusher: Some(flusher),
            stop_flusher,
            applied,
            store,
            log,
        })
    }

    /// Returns the handle through which other tasks request a flush now.
    pub fn flush_requests(&self) -> Arc<FlushRequests> {
        self.flush_requests.clone()
    }

    /// Waits for the pipeline to drain after the log writer stopped, then
    /// flushes the store so the next start replays nothing.
    pub fn finish(mut self) {
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.join();
        }
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
        {
            let (stopped, wake) = &*self.stop_flusher;
            *stopped.lock().expect("flusher lock") = true;
            wake.notify_all();
        }
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        flush_once(self.store.as_ref(), &self.log, &self.applied);
    }
}

fn worker_index(device: DeviceId, workers: usize) -> usize {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut hasher);
    (hasher.finish() % workers as u64) as usize
}

fn run_dispatcher(mut committed: mpsc::Receiver<Committed>, senders: Vec<SyncSender<Work>>) {
    while let Some(batch) = committed.blocking_recv() {
        let mut parts: Vec<Vec<(u64, Envelope)>> = senders.iter().map(|_| Vec::new()).collect();
        for (seq, envelope) in batch.records {
            parts[worker_index(envelope.device_id, senders.len())].push((seq, envelope));
        }
        for (sender, envelopes) in senders.iter().zip(parts) {
            let work = Work {
                last_seq: batch.last_seq,
                envelopes,
            };
            if sender.send(work).is_err() {
                tracing::error!(
                    "a pipeline worker stopped; records stay in the ingest log for replay"
                );
                return;
            }
        }
    }
}

fn applied_position(applied: &[AtomicU64]) -> u64 {
    applied
        .iter()
        .map(|position| position.load(Ordering::Acquire))
        .min()
        .unwrap_or(0)
}

fn flush_once(store: &dyn TimeSeriesStore, log: &LogControl, applied: &[AtomicU64]) {
    // Read the position before the flush: every record up to it is already
    // in the store's memory, so the flush makes all of them durable.
    let marker = applied_position(applied);
    if marker == store.durable_marker() && store.pending_bytes() == 0 {
        return;
    }
    let started = Instant::now();
    match store.flush(marker) {
        Ok(()) => {
            log.checkpoint(marker);
            metrics::histogram!("ferrite_store_flush_seconds")
                .record(started.elapsed().as_secs_f64());
            tracing::debug!(
                marker,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "store flushed"
            );
        }
        Err(error) => {
            tracing::error!(%error, "store flush failed; data stays in the ingest log and the flush is retried");
            metrics::counter!("ferrite_store_flush_errors_total").increment(1);
        }
    }
}

fn run_flusher(
    store: &dyn TimeSeriesStore,
    log: &LogControl,
    applied: &[AtomicU64],
    stop: &(std::sync::Mutex<bool>, std::sync::Condvar),
    requests: &FlushRequests,
    options: &PipelineOptions,
) {
    let (stopped, wake) = stop;
    let mut last_flush = Instant::now();
    let mut last_memory_report = Instant::now() - MEMORY_REPORT_EVERY;
    loop {
        {
            let guard = stopped.lock().expect("flusher lock");
            let (guard, _) = wake
                .wait_timeout(guard, Duration::from_millis(200))
                .expect("flusher lock");
            if *guard {
                return;
            }
        }
        metrics::gauge!("ferrite_store_pending_bytes").set(store.pending_bytes() as f64);
        let over_budget = store.pending_bytes() >= store.flush_threshold();
        if last_memory_report.elapsed() >= MEMORY_REPORT_EVERY {
            for (part, bytes) in store.memory_usage() {
                if part == "series" {
                    metrics::gauge!("ferrite_store_series").set(bytes as f64);
                } else {
                    metrics::gauge!("ferrite_store_memory_bytes", "part" => part).set(bytes as f64);
                }
            }
            let (unreadable, unsealable) = store.sealing_failures();
            metrics::counter!("ferrite_store_unreadable_blocks_total").absolute(unreadable);
            metrics::counter!("ferrite_store_unsealable_series_total").absolute(unsealable);
            last_memory_report = Instant::now();
        }
        let due = last_flush.elapsed() >= options.flush_interval;
        let requested = requests.requested.load(Ordering::Acquire);
        let flush_requested = requested > requests.done.load(Ordering::Acquire);
        if over_budget || due || flush_requested {
            flush_once(store, log, applied);
            last_flush = Instant::now();
            requests.done.store(requested, Ordering::Release);
        }
    }
}
