//! The embedded ingest log: append-only segment files with group commit.
//!
//! ## On-disk layout
//! `DATA_DIR/log/{first_seq:020}.log` files, each a sequence of records:
//! ```text
//! body_len u32 LE | crc32 u32 LE (over seq and body) | seq u64 LE | body (an encoded Envelope)
//! ```
//! Sequence numbers start at 1, grow by one per envelope and continue across
//! segments and restarts.
//!
//! ## Invariants
//! - An append is acknowledged only after its records are written and, with
//!   `durability = "fsync"`, `fdatasync`ed. One writer thread serves all
//!   appends: the requests that queue up while one sync runs share the next
//!   write and sync (group commit), so throughput does not depend on the sync
//!   rate.
//! - Committed records go to the pipeline in sequence order. The time-series
//!   store records the highest sequence number whose data it has flushed (its
//!   durable marker); at start-up every record above the marker is replayed.
//! - A segment is deleted only when all its records are at or below the
//!   marker, and never while it is the one being written.
//! - A record whose checksum fails or that is cut short at the end of the last
//!   segment is a torn write from a crash: the file is truncated there with a
//!   warning. Such a record was never acknowledged. Damage inside an older
//!   segment is logged as an error and the rest of that segment is skipped.
//! - A record with a valid checksum that does not decode (written by a newer
//!   version), or a segment that cannot be read, stops the start-up: going on
//!   would reuse sequence numbers and let a checkpoint delete records that
//!   were never replayed.
//! - After a failed write whose partial bytes cannot be cut off, or when the
//!   pipeline has stopped, the writer rejects every further append until a
//!   restart, so nothing is acknowledged that replay would not find.
//! - A record body is at most [`MAX_RECORD_BODY`] bytes; larger appends are
//!   rejected before they are acknowledged.
//!
//! ## Shutdown
//! [`LogControl::shutdown`] sends a marker through the request queue; the
//! writer commits everything queued before it, rejects what comes after,
//! closes the pipeline channel and exits.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::envelope::DecodeFailure;
use super::{Committed, Envelope, IngestError, IngestHandle, IngestLog, LogControl};
use crate::config::Durability;
use crate::encryption::{DataKey, Keyring, OpenError};
use crate::ids::{DeviceId, TenantId};

const RECORD_HEADER: usize = 4 + 4 + 8;
/// Bytes a sealed record adds to its envelope: the inner meta length, the
/// sealed format byte and data key version, the nonce and the tag.
const SEALED_OVERHEAD: usize = 4 + 1 + 4 + 12 + 16;
/// Largest record body; appends above it are rejected and longer lengths
/// read at replay mean damage.
pub const MAX_RECORD_BODY: usize = 64 * 1024 * 1024;
/// Bytes gathered into one write before the writer stops draining the queue.
const MAX_GROUP_BYTES: usize = 16 * 1024 * 1024;
/// A segment being written is closed early, so that a checkpoint can delete
/// it, once every record in it is stored and it contains at least this much.
const CLOSE_COVERED_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub durability: Durability,
    pub segment_bytes: u64,
    pub queue_capacity: usize,
    pub append_timeout: Duration,
    /// Opens sealed records at replay, and seals new ones when `encrypt`.
    pub keyring: Option<Arc<Keyring>>,
    /// Seal the meta and payload of new records under the tenant's data key.
    pub encrypt: bool,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
}

struct AppendRequest {
    envelopes: Vec<Envelope>,
    /// The data keys of the envelopes' tenants, when records are sealed.
    data_keys: HashMap<TenantId, DataKey>,
    done: oneshot::Sender<Result<(), IngestError>>,
}

enum LogCommand {
    Append(AppendRequest),
    /// Every record up to this sequence number is stored elsewhere: when
    /// that covers the whole segment being written, start a new one so the
    /// covered one can be deleted.
    Covered(u64),
    Shutdown,
}

/// The adapters' and the owner's side of the embedded log. The files belong
/// to the writer thread; this only queues commands for it and deletes
/// covered segments.
struct EmbeddedLog {
    segments: Arc<Mutex<Vec<Segment>>>,
    commands: mpsc::Sender<LogCommand>,
    append_timeout: Duration,
    /// Set when new records are sealed.
    keyring: Option<Arc<Keyring>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl EmbeddedLog {
    /// Queues `envelopes` for the writer and waits until they are written
    /// (and synced, with `durability = "fsync"`).
    async fn append_envelopes(&self, envelopes: Vec<Envelope>) -> Result<(), IngestError> {
        // The sequence number shares the record body with the envelope.
        if let Some(large) = envelopes
            .iter()
            .find(|envelope| envelope.encoded_len() + 8 + SEALED_OVERHEAD > MAX_RECORD_BODY)
        {
            return Err(IngestError::TooLarge(large.encoded_len()));
        }
        let mut data_keys = HashMap::new();
        if let Some(keyring) = &self.keyring {
            for envelope in &envelopes {
                let tenant = envelope.tenant_id;
                if data_keys.contains_key(&tenant) {
                    continue;
                }
                let key = keyring.data_key(tenant).await.map_err(|error| {
                    tracing::error!(tenant_id = %tenant, %error, "cannot load the tenant's data key to seal ingest log records");
                    IngestError::Io
                })?;
                data_keys.insert(tenant, key);
            }
        }
        let (done, wait) = oneshot::channel();
        let request = LogCommand::Append(AppendRequest {
            envelopes,
            data_keys,
            done,
        });

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

    /// Commits everything appended so far, stops the writer and waits for it.
    async fn stop_writer(&self) {
        let _ = self.commands.send(LogCommand::Shutdown).await;
        let writer = self.writer.lock().take();
        if let Some(writer) = writer {
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
    }
}

impl IngestLog for EmbeddedLog {
    fn append(&self, envelopes: Vec<Envelope>) -> BoxFuture<'_, Result<(), IngestError>> {
        Box::pin(self.append_envelopes(envelopes))
    }

    /// Deletes the segments whose records are all at or below `marker`,
    /// and requests that the writer close the segment it writes when `marker`
    /// covers all of it (a later checkpoint deletes it then).
    fn checkpoint(&self, marker: u64) {
        // Best effort: when the queue is full, a later checkpoint sends it again.
        let _ = self.commands.try_send(LogCommand::Covered(marker));
        delete_covered(&self.segments, marker);
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.stop_writer())
    }
}

/// Deletes the segments, except the last, whose records are all at or
/// below `marker`.
fn delete_covered(segments: &Mutex<Vec<Segment>>, marker: u64) {
    {
        let mut segments = segments.lock();

        // Segment i contains sequence numbers [first_seq(i), first_seq(i + 1)).
        let mut removable = 0;
        while removable + 1 < segments.len() && segments[removable + 1].first_seq <= marker + 1 {
            removable += 1;
        }
        for segment in segments.drain(..removable) {
            if let Err(error) = std::fs::remove_file(&segment.path) {
                tracing::warn!(path = %segment.path.display(), %error, "cannot delete ingest log segment");
            }
        }
    }
}

/// Opens the log in `dir`, starts the writer thread and returns the handle
/// for adapters, the owner's control and the receiver of committed batches.
/// Records above `replay_after` are sent to that receiver first, before any
/// new append.
/// The last return value reports once replay has finished: `Err` means the
/// log cannot be trusted and the server must not start.
#[allow(clippy::type_complexity)]
pub fn open(
    dir: &Path,
    options: LogOptions,
    replay_after: u64,
) -> anyhow::Result<(
    IngestHandle,
    LogControl,
    mpsc::Receiver<Committed>,
    oneshot::Receiver<anyhow::Result<()>>,
)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the ingest log directory {}", dir.display()))?;
    let segments = list_segments(dir)?;

    let (commands_tx, commands_rx) = mpsc::channel(options.queue_capacity);
    let (committed_tx, committed_rx) = mpsc::channel(16);
    let segments = Arc::new(Mutex::new(segments));
    let (ready_tx, ready_rx) = oneshot::channel();
    let writer = Writer {
        dir: dir.to_owned(),
        options: options.clone(),
        segments: segments.clone(),
        file: None,
        file_len: 0,
        next_seq: 1,
        committed: committed_tx,
        broken: None,
    };
    let thread = std::thread::Builder::new()
        .name("ingest-log".into())
        .spawn(move || writer.run(commands_rx, replay_after, ready_tx))
        .context("cannot start the ingest log writer thread")?;

    let (handle, control) = super::split(Arc::new(EmbeddedLog {
        segments,
        commands: commands_tx,
        append_timeout: options.append_timeout,
        keyring: options.keyring.clone().filter(|_| options.encrypt),
        writer: Mutex::new(Some(thread)),
    }));
    Ok((handle, control, committed_rx, ready_rx))
}

fn list_segments(dir: &Path) -> anyhow::Result<Vec<Segment>> {
    let mut segments = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().and_then(|e| e.to_str()) != Some("log") {
            continue;
        }
        if let Ok(first_seq) = stem.parse::<u64>() {
            segments.push(Segment { first_seq, path });
        }
    }
    segments.sort_by_key(|segment| segment.first_seq);
    Ok(segments)
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}.log"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

struct Writer {
    dir: PathBuf,
    options: LogOptions,
    segments: Arc<Mutex<Vec<Segment>>>,
    file: Option<File>,
    file_len: u64,
    next_seq: u64,
    committed: mpsc::Sender<Committed>,
    /// Reason the writer stopped accepting appends, once it has.
    broken: Option<&'static str>,
}

/// Outcome of replaying one segment.
enum SegmentEnd {
    Clean,
    /// Bytes from this offset on are not valid records.
    Damaged {
        offset: u64,
        reason: &'static str,
    },
}

impl Writer {
    fn run(
        mut self,
        mut commands: mpsc::Receiver<LogCommand>,
        replay_after: u64,
        ready: oneshot::Sender<anyhow::Result<()>>,
    ) {
        let started = self.replay(replay_after).and_then(|()| {
            // Never below a segment that exists, even an empty one: its name
            // is the sequence number its first record had or will have.
            let last_first_seq = self.segments.lock().last().map_or(1, |s| s.first_seq);
            self.next_seq = self.next_seq.max(replay_after + 1).max(last_first_seq);
            self.start_segment()
        });
        if let Err(error) = started {
            let _ = ready.send(Err(error.context("the ingest log cannot be opened")));
            return;
        }
        let _ = ready.send(Ok(()));

        let mut buffer = Vec::with_capacity(1024 * 1024);
        while let Some(command) = commands.blocking_recv() {
            let mut requests = Vec::new();
            let mut bytes = 0usize;
            let mut stop = false;
            let mut covered = None;
            match command {
                LogCommand::Append(request) => {
                    bytes += request
                        .envelopes
                        .iter()
                        .map(Envelope::encoded_len)
                        .sum::<usize>();
                    requests.push(request);
                }
                LogCommand::Covered(marker) => covered = Some(marker),
                LogCommand::Shutdown => stop = true,
            }

            // Group commit: take what queued up while the last sync ran.
            while bytes < MAX_GROUP_BYTES {
                match commands.try_recv() {
                    Ok(LogCommand::Append(request)) => {
                        bytes += request
                            .envelopes
                            .iter()
                            .map(Envelope::encoded_len)
                            .sum::<usize>();
                        requests.push(request);
                    }
                    Ok(LogCommand::Covered(marker)) => covered = Some(marker),
                    Ok(LogCommand::Shutdown) => stop = true,
                    Err(_) => break,
                }
            }
            if stop {
                commands.close();
                while let Ok(command) = commands.try_recv() {
                    if let LogCommand::Append(request) = command {
                        requests.push(request);
                    }
                }
            }
            metrics::gauge!("ferrite_ingest_queue_depth").set(commands.len() as f64);

            if !requests.is_empty() {
                self.commit(requests, &mut buffer);
            }
            if let Some(marker) = covered {
                self.close_if_covered(marker);
            }
            if stop {
                break;
            }
        }
        tracing::info!(next_seq = self.next_seq, "ingest log writer stopped");
    }

    /// Starts a new segment when every record of the current one is at or
    /// below `marker` and it is large enough to be worth deleting, then
    /// deletes the covered segments.
    fn close_if_covered(&mut self, marker: u64) {
        let whole_segment_covered = self.next_seq == marker.saturating_add(1);
        if self.broken.is_some() || !whole_segment_covered || self.file_len < CLOSE_COVERED_BYTES {
            return;
        }
        if let Err(error) = self.start_segment() {
            tracing::warn!(
                error = format!("{error:#}"),
                "cannot start a new ingest log segment; the stored one is kept"
            );
            return;
        }
        delete_covered(&self.segments, marker);
    }

    fn commit(&mut self, requests: Vec<AppendRequest>, buffer: &mut Vec<u8>) {
        if let Some(reason) = self.broken {
            tracing::error!(reason, "ingest log rejects appends until a restart");
            for request in requests {
                let _ = request.done.send(Err(IngestError::Io));
            }
            return;
        }
        buffer.clear();
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut records = Vec::with_capacity(requests.iter().map(|r| r.envelopes.len()).sum());
        let mut replies = Vec::with_capacity(requests.len());
        for request in requests {
            for envelope in request.envelopes {
                let data_key = request.data_keys.get(&envelope.tenant_id);
                encode_record(buffer, seq, &envelope, data_key);
                records.push((seq, envelope));
                seq += 1;
            }
            replies.push(request.done);
        }

        match self.write_and_sync(buffer) {
            Ok(()) => {
                self.next_seq = seq;
                metrics::counter!("ferrite_ingest_log_records_total")
                    .increment(records.len() as u64);
                metrics::counter!("ferrite_ingest_log_bytes_total").increment(buffer.len() as u64);
                for reply in replies {
                    let _ = reply.send(Ok(()));
                }
                let batch = Committed {
                    last_seq: seq - 1,
                    records,
                };
                // Blocks while the pipeline is behind: this is the
                // backpressure that reaches the adapters through the queue.
                if self.committed.blocking_send(batch).is_err() {
                    tracing::error!(
                        "the pipeline stopped; committed records stay in the log for replay, and new appends are rejected until a restart"
                    );
                    self.broken = Some("the pipeline stopped");
                }
            }
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    records = records.len(),
                    "ingest log append failed; the clients get an error"
                );
                metrics::counter!("ferrite_ingest_log_errors_total").increment(1);
                for reply in replies {
                    let _ = reply.send(Err(IngestError::Io));
                }
            }
        }
    }

    /// Writes one group of records, whose first sequence number is
    /// `self.next_seq`, starting a new segment first when the current one is full.
    fn write_and_sync(&mut self, buffer: &[u8]) -> anyhow::Result<()> {
        if self.file.is_none() || self.file_len >= self.options.segment_bytes {
            self.start_segment()?;
        }
        let file = self.file.as_mut().context("no open ingest log segment")?;
        let start_len = self.file_len;
        let written = file
            .write_all(buffer)
            .and_then(|()| match self.options.durability {
                Durability::Fsync => file.sync_data(),
                Durability::None => Ok(()),
            });
        if let Err(error) = written {
            // Cut off a partial write so the next append starts on a record
            // boundary. If even that fails, later records would follow
            // garbage that replay stops at, so stop accepting appends.
            if file.set_len(start_len).is_err() {
                self.file = None;
                self.broken = Some("a failed write could not be cut off");
            }
            return Err(error).context("write to the ingest log failed");
        }
        if self.options.durability == Durability::Fsync {
            metrics::counter!("ferrite_ingest_log_syncs_total").increment(1);
        }
        self.file_len += buffer.len() as u64;
        Ok(())
    }

    /// Starts a new segment whose first record is `next_seq`. An existing
    /// file of that name may only be empty (created just before a crash).
    fn start_segment(&mut self) -> anyhow::Result<()> {
        let path = segment_path(&self.dir, self.next_seq);
        if std::fs::metadata(&path).is_ok_and(|meta| meta.len() > 0) {
            anyhow::bail!(
                "the ingest log segment {} already contains records, so sequence number {} would be used twice; the log directory was changed by hand or damaged",
                path.display(),
                self.next_seq
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let len = file.metadata()?.len();
        sync_dir(&self.dir)?;
        self.file = Some(file);
        self.file_len = len;
        let mut segments = self.segments.lock();
        if !segments
            .iter()
            .any(|segment| segment.first_seq == self.next_seq)
        {
            segments.push(Segment {
                first_seq: self.next_seq,
                path,
            });
            segments.sort_by_key(|segment| segment.first_seq);
        }
        Ok(())
    }

    /// Sends every record above `after` to the pipeline and finds the next
    /// sequence number.
    fn replay(&mut self, after: u64) -> anyhow::Result<()> {
        let paths: Vec<(u64, PathBuf)> = self
            .segments
            .lock()
            .iter()
            .map(|segment| (segment.first_seq, segment.path.clone()))
            .collect();
        let mut replayed = 0u64;
        let mut unreadable = 0u64;
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        for (index, (_, path)) in paths.iter().enumerate() {
            let is_last = index + 1 == paths.len();
            let keyring = self.options.keyring.clone();
            let end = read_segment(path, keyring.as_deref(), |seq, envelope| {
                self.next_seq = self.next_seq.max(seq + 1);
                let Some(envelope) = envelope else {
                    if seq > after {
                        unreadable += 1;
                    }
                    return;
                };
                if seq > after {
                    batch_bytes += envelope.encoded_len();
                    batch.push((seq, envelope));
                    replayed += 1;
                    // Bounded in bytes as well, so a replay of large
                    // records uses no more memory than live traffic.
                    if batch.len() >= 4096 || batch_bytes >= MAX_GROUP_BYTES {
                        batch_bytes = 0;
                        let records = std::mem::take(&mut batch);
                        let last_seq = seq;
                        let _ = self
                            .committed
                            .blocking_send(Committed { last_seq, records });
                    }
                }
            })?;
            if let SegmentEnd::Damaged { offset, reason } = end {
                if is_last {
                    tracing::warn!(path = %path.display(), offset, reason, "cutting a torn record off the end of the ingest log");
                    OpenOptions::new().write(true).open(path)?.set_len(offset)?;
                } else {
                    tracing::error!(path = %path.display(), offset, reason, "ingest log segment is damaged; the rest of this segment is skipped");
                }
            }
        }
        if let Some((last_seq, _)) = batch.last() {
            let last_seq = *last_seq;
            let _ = self.committed.blocking_send(Committed {
                last_seq,
                records: batch,
            });
        }
        if replayed > 0 {
            tracing::info!(records = replayed, after, "replayed the ingest log");
        }
        if unreadable > 0 {
            tracing::warn!(
                records = unreadable,
                "skipped sealed ingest log records whose tenant data key is gone (deleted tenants)"
            );
        }
        Ok(())
    }
}

/// Returns the associated data of a sealed record, which binds it to its
/// device and position in the log.
fn record_context(device: DeviceId, seq: u64) -> String {
    format!("ingest/{device}/{seq}")
}

fn encode_record(buffer: &mut Vec<u8>, seq: u64, envelope: &Envelope, data_key: Option<&DataKey>) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0u8; 8]);
    buffer.extend_from_slice(&seq.to_le_bytes());
    match data_key {
        Some(key) => envelope.encode_sealed_into(buffer, |inner| {
            key.seal(&record_context(envelope.device_id, seq), inner)
        }),
        None => envelope.encode_into(buffer),
    }
    let body_len = (buffer.len() - start - RECORD_HEADER) as u32;
    let crc = crc32fast::hash(&buffer[start + 8..]);
    buffer[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buffer[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads every valid record of a segment in order. A sealed record whose
/// tenant data key is gone reaches `on_record` as `None`.
fn read_segment(
    path: &Path,
    keyring: Option<&Keyring>,
    mut on_record: impl FnMut(u64, Option<Envelope>),
) -> anyhow::Result<SegmentEnd> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::with_capacity(1024 * 1024, file);
    let mut offset = 0u64;
    let mut header = [0u8; RECORD_HEADER];
    let mut body = Vec::new();
    loop {
        match read_full(&mut reader, &mut header)? {
            0 => return Ok(SegmentEnd::Clean),
            n if n < RECORD_HEADER => {
                return Ok(SegmentEnd::Damaged {
                    offset,
                    reason: "record header cut short",
                });
            }
            _ => {}
        }
        let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if body_len > MAX_RECORD_BODY {
            return Ok(SegmentEnd::Damaged {
                offset,
                reason: "record length out of range",
            });
        }
        body.resize(body_len, 0);
        if read_full(&mut reader, &mut body)? < body_len {
            return Ok(SegmentEnd::Damaged {
                offset,
                reason: "record body cut short",
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&header[8..16]);
        hasher.update(&body);
        if hasher.finalize() != crc {
            return Ok(SegmentEnd::Damaged {
                offset,
                reason: "record checksum mismatch",
            });
        }
        let decoded = Envelope::decode_with(&body, |tenant, device, sealed| match keyring {
            Some(keyring) => keyring.open(tenant, &record_context(device, seq), sealed),
            None => Err(OpenError::MissingDataKey { version: 0 }),
        });
        match decoded {
            Ok(envelope) => on_record(seq, Some(envelope)),
            Err(DecodeFailure::Unreadable(OpenError::MissingDataKey { .. })) => {
                on_record(seq, None)
            }
            Err(DecodeFailure::Unreadable(error)) => anyhow::bail!(
                "record {seq} at offset {offset} of {} has a valid checksum but its seal does not open ({error}); the master key or the tenant keys differ from the ones that wrote it",
                path.display()
            ),
            Err(DecodeFailure::Invalid) => anyhow::bail!(
                "record {seq} at offset {offset} of {} has a valid checksum but is not an envelope this version can read; start the version that wrote it",
                path.display()
            ),
        }
        offset += (RECORD_HEADER + body_len) as u64;
    }
}

/// Reads until `buffer` is full or the file ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use bytes::Bytes;

    use super::*;
    use crate::ids::{DeviceId, TenantId};
    use crate::ingest::{ContentType, Protocol};

    fn options() -> LogOptions {
        LogOptions {
            durability: Durability::Fsync,
            segment_bytes: 4096,
            queue_capacity: 64,
            append_timeout: Duration::from_secs(5),
            keyring: None,
            encrypt: false,
        }
    }

    fn envelope(n: u32) -> Envelope {
        Envelope {
            tenant_id: TenantId::from_bytes([1; 16]),
            device_id: DeviceId::from_bytes([2; 16]),
            protocol: Protocol::Http,
            received_at_ns: n as i64,
            content_type: ContentType::Json,
            payload: Bytes::from(format!("{{\"n\":{n}}}")),
            meta: Bytes::new(),
        }
    }

    /// Opens the log, appends `count` envelopes, and returns every committed
    /// record the pipeline side received (replayed ones included).
    async fn append_and_collect(dir: &Path, replay_after: u64, count: u32) -> Vec<(u64, Envelope)> {
        let (handle, control, mut committed, ready) = open(dir, options(), replay_after).unwrap();
        let collector = tokio::spawn(async move {
            let mut records = Vec::new();
            while let Some(batch) = committed.recv().await {
                records.extend(batch.records);
            }
            records
        });
        ready.await.unwrap().unwrap();
        for n in 0..count {
            handle.append(vec![envelope(n)]).await.unwrap();
        }
        control.shutdown().await;
        drop(handle);
        drop(control);
        collector.await.unwrap()
    }

    /// Opens the log with `options`, appends `envelopes` one by one, and
    /// returns every committed record (replayed ones included).
    async fn run_log(
        dir: &Path,
        options: LogOptions,
        envelopes: Vec<Envelope>,
    ) -> Vec<(u64, Envelope)> {
        let (handle, control, mut committed, ready) = open(dir, options, 0).unwrap();
        let collector = tokio::spawn(async move {
            let mut records = Vec::new();
            while let Some(batch) = committed.recv().await {
                records.extend(batch.records);
            }
            records
        });
        ready.await.unwrap().unwrap();
        for envelope in envelopes {
            handle.append(vec![envelope]).await.unwrap();
        }
        control.shutdown().await;
        drop(handle);
        drop(control);
        collector.await.unwrap()
    }

    #[tokio::test]
    async fn sealed_records_replay_and_hide_payload() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = Arc::new(
            crate::metadata::SqliteMetadata::open(dir.path())
                .await
                .unwrap(),
        );
        let tenant = metadata.insert_test_tenant("sealed").await;
        let other_tenant = metadata.insert_test_tenant("other").await;
        let source = crate::encryption::MasterKeySource::Files {
            data_dir: dir.path().to_owned(),
        };
        let keyring = Arc::new(Keyring::load(source, metadata.clone(), true).await.unwrap());
        let options = LogOptions {
            keyring: Some(keyring.clone()),
            encrypt: true,
            ..options()
        };
        let log_dir = dir.path().join("log");
        let sealed_envelope = |n: u32| Envelope {
            tenant_id: tenant,
            payload: Bytes::from(format!("secret-reading-{n}")),
            meta: Bytes::from_static(b"{\"rssi\":-70}"),
            ..envelope(n)
        };

        let written = run_log(
            &log_dir,
            options.clone(),
            (0..3).map(sealed_envelope).collect(),
        )
        .await;
        assert_eq!(written.len(), 3);
        for segment in list_segments(&log_dir).unwrap() {
            let bytes = std::fs::read(&segment.path).unwrap();
            assert!(!bytes.windows(14).any(|window| window == b"secret-reading"));
            assert!(!bytes.windows(4).any(|window| window == b"rssi"));
        }

        let replayed = run_log(&log_dir, options.clone(), Vec::new()).await;
        assert_eq!(replayed, written);

        // Records of a deleted tenant are skipped, and numbering goes on.
        metadata.delete_tenant(tenant).await.unwrap();
        keyring.refresh().await.unwrap();
        let other = Envelope {
            tenant_id: other_tenant,
            ..envelope(9)
        };
        let after_deletion = run_log(&log_dir, options, vec![other]).await;
        let seqs: Vec<u64> = after_deletion.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, vec![4]);
    }

    #[tokio::test]
    async fn sealed_record_needs_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = Arc::new(
            crate::metadata::SqliteMetadata::open(dir.path())
                .await
                .unwrap(),
        );
        let tenant = metadata.insert_test_tenant("sealed").await;
        let source = crate::encryption::MasterKeySource::Files {
            data_dir: dir.path().to_owned(),
        };
        let keyring = Arc::new(Keyring::load(source, metadata.clone(), true).await.unwrap());
        let options = LogOptions {
            keyring: Some(keyring),
            encrypt: true,
            ..options()
        };
        let log_dir = dir.path().join("log");
        let sealed = Envelope {
            tenant_id: tenant,
            ..envelope(1)
        };
        run_log(&log_dir, options, vec![sealed]).await;

        // Without keys the record reads as one whose key is gone; with
        // another data key its seal fails, which stops a replay.
        let other = DataKey::from_bytes(&[5; 32], 1);
        let segment = list_segments(&log_dir).unwrap().remove(0);
        let error = read_segment(&segment.path, None, |_, envelope| {
            assert!(envelope.is_none());
        });
        assert!(error.is_ok());
        let body_error = Envelope::decode_with(
            &std::fs::read(&segment.path).unwrap()[RECORD_HEADER..],
            |_, device, sealed| other.open(&record_context(device, 1), sealed),
        );
        assert_eq!(
            body_error,
            Err(DecodeFailure::Unreadable(OpenError::Decrypt))
        );
    }

    /// Measures appends with and without `ingest.encrypt`: 20,000 envelopes
    /// of a 200-byte JSON payload in appends of 100, with `durability =
    /// "none"` so that disk syncs do not hide the CPU cost of sealing. Run
    /// with `cargo test -p ferrite --bin ferrite -- --ignored
    /// sealing_cost_of_appends --nocapture`; docs/benchmarks.md records the
    /// figures.
    #[tokio::test]
    #[ignore]
    async fn sealing_cost_of_appends() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = Arc::new(
            crate::metadata::SqliteMetadata::open(dir.path())
                .await
                .unwrap(),
        );
        let tenant = metadata.insert_test_tenant("bench").await;
        let source = crate::encryption::MasterKeySource::Files {
            data_dir: dir.path().to_owned(),
        };
        let keyring = Arc::new(Keyring::load(source, metadata, true).await.unwrap());
        let payload = Bytes::from(format!(
            "{{\"temperature\":21.5,\"note\":\"{}\"}}",
            "x".repeat(170)
        ));
        assert_eq!(payload.len(), 200);

        let mut rates = Vec::new();
        for (name, encrypt) in [("plain", false), ("sealed", true)] {
            let options = LogOptions {
                durability: Durability::None,
                segment_bytes: 64 * 1024 * 1024,
                keyring: Some(keyring.clone()),
                encrypt,
                ..options()
            };
            let (handle, control, mut committed, ready) =
                open(&dir.path().join(name), options, 0).unwrap();
            let drain = tokio::spawn(async move { while committed.recv().await.is_some() {} });
            ready.await.unwrap().unwrap();
            let started = std::time::Instant::now();
            for batch in 0..200 {
                let envelopes = (0..100)
                    .map(|n| Envelope {
                        tenant_id: tenant,
                        payload: payload.clone(),
                        ..envelope(batch * 100 + n)
                    })
                    .collect();
                handle.append(envelopes).await.unwrap();
            }
            let elapsed = started.elapsed();
            control.shutdown().await;
            drop(handle);
            drop(control);
            drain.await.unwrap();
            let rate = 20_000.0 / elapsed.as_secs_f64();
            println!("{name}: {rate:.0} envelopes/s ({elapsed:?})");
            rates.push(rate);
        }
        println!("sealed/plain throughput ratio: {:.2}", rates[1] / rates[0]);
    }

    #[tokio::test]
    async fn replay_returns_records_after_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let first = append_and_collect(dir.path(), 0, 100).await;
        assert_eq!(first.len(), 100);
        assert_eq!(first.first().unwrap().0, 1);
        assert_eq!(first.last().unwrap().0, 100);

        // Restart with records up to 60 already stored: 61..=100 come back,
        // then new appends continue the numbering.
        let second = append_and_collect(dir.path(), 60, 5).await;
        let seqs: Vec<u64> = second.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (61..=105).collect::<Vec<_>>());
        assert_eq!(second[0].1, envelope(60));
    }

    #[tokio::test]
    async fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        append_and_collect(dir.path(), 0, 10).await;

        // A crash in the middle of a write leaves half a record at the end.
        let last = list_segments(dir.path()).unwrap().pop().unwrap();
        let mut file = OpenOptions::new().append(true).open(&last.path).unwrap();
        file.write_all(&[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(file);

        let replayed = append_and_collect(dir.path(), 0, 1).await;
        let seqs: Vec<u64> = replayed.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (1..=11).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn corrupt_record_stops_replay_of_that_segment_only() {
        let dir = tempfile::tempdir().unwrap();
        append_and_collect(dir.path(), 0, 3).await;
        let segment = list_segments(dir.path()).unwrap().remove(0);
        let mut bytes = std::fs::read(&segment.path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&segment.path, bytes).unwrap();

        let replayed = append_and_collect(dir.path(), 0, 0).await;
        let seqs: Vec<u64> = replayed.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, vec![1, 2]);
    }

    #[tokio::test]
    async fn unreadable_record_stops_start_up() {
        let dir = tempfile::tempdir().unwrap();
        append_and_collect(dir.path(), 0, 3).await;

        // A record with a valid checksum and an unknown envelope version, as
        // a newer release would write it.
        let segment = list_segments(dir.path()).unwrap().remove(0);
        let mut body = 4u64.to_le_bytes().to_vec();
        body.extend_from_slice(&[99u8; 60]);
        let mut record = (body.len() as u32 - 8).to_le_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        record.extend_from_slice(&body);
        OpenOptions::new()
            .append(true)
            .open(&segment.path)
            .unwrap()
            .write_all(&record)
            .unwrap();
        let length_before = std::fs::metadata(&segment.path).unwrap().len();

        let (_handle, _control, mut committed, ready) = open(dir.path(), options(), 0).unwrap();
        let drain = tokio::spawn(async move { while committed.recv().await.is_some() {} });
        let error = ready.await.unwrap().expect_err("start-up must fail");
        assert!(format!("{error:#}").contains("valid checksum"), "{error:#}");
        drain.await.unwrap();
        // Nothing was cut off: the newer version can still read it.
        assert_eq!(
            std::fs::metadata(&segment.path).unwrap().len(),
            length_before
        );
    }

    #[tokio::test]
    async fn oversized_append_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, control, mut committed, ready) = open(dir.path(), options(), 0).unwrap();
        let drain = tokio::spawn(async move { while committed.recv().await.is_some() {} });
        ready.await.unwrap().unwrap();
        let mut large = envelope(1);
        large.payload = Bytes::from(vec![b'x'; MAX_RECORD_BODY]);
        let error = handle.append(vec![envelope(0), large]).await.unwrap_err();
        assert!(matches!(error, IngestError::TooLarge(_)), "{error}");
        handle.append(vec![envelope(2)]).await.unwrap();
        control.shutdown().await;
        drop(handle);
        drop(control);
        drain.await.unwrap();
    }

    #[tokio::test]
    async fn checkpoint_deletes_only_covered_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, control, mut committed, ready) = open(dir.path(), options(), 0).unwrap();
        let drain = tokio::spawn(async move { while committed.recv().await.is_some() {} });
        ready.await.unwrap().unwrap();
        // Each append is about 60 bytes; 4 KiB segments roll over often.
        for n in 0..300 {
            handle.append(vec![envelope(n)]).await.unwrap();
        }
        let before = list_segments(dir.path()).unwrap();
        assert!(before.len() > 2, "{} segments", before.len());

        control.checkpoint(150);
        let after = list_segments(dir.path()).unwrap();
        assert!(after.len() < before.len());
        // The first remaining segment still contains record 151.
        assert!(after[0].first_seq <= 151);
        control.checkpoint(u64::MAX - 1);
        assert_eq!(
            list_segments(dir.path()).unwrap().len(),
            1,
            "the active segment stays"
        );

        control.shutdown().await;
        drop(handle);
        drop(control);
        drain.await.unwrap();
    }

    #[tokio::test]
    async fn covered_segment_being_written_is_closed_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let options = LogOptions {
            segment_bytes: 64 * 1024 * 1024,
            ..options()
        };
        let (handle, control, mut committed, ready) = open(dir.path(), options, 0).unwrap();
        let drain = tokio::spawn(async move { while committed.recv().await.is_some() {} });
        ready.await.unwrap().unwrap();
        for n in 0..12 {
            let mut big = envelope(n);
            big.payload = Bytes::from(vec![b'x'; 100_000]);
            handle.append(vec![big]).await.unwrap();
        }
        assert_eq!(list_segments(dir.path()).unwrap().len(), 1);

        // Not all records covered: the segment stays.
        control.checkpoint(11);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(list_segments(dir.path()).unwrap()[0].first_seq, 1);

        // All 12 covered: the writer starts segment 13, the next
        // checkpoint (or the writer itself) deletes segment 1.
        control.checkpoint(12);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let segments = list_segments(dir.path()).unwrap();
            if segments.len() == 1 && segments[0].first_seq == 13 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "segment 1 was not deleted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        handle.append(vec![envelope(99)]).await.unwrap();

        control.shutdown().await;
        drop(handle);
        drop(control);
        drain.await.unwrap();
    }
}
