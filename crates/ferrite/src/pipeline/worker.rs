//! One pipeline worker: the steps every envelope walks, in log order per
//! device.
//!
//! 1. Resolve the device and its profile (cached in the [`Directory`]).
//! 2. Decode the payload with the profile's codec.
//! 3. Transform and validate the records (see `crate::profiles::process`).
//! 4. Check timestamps against the tenant's window and the profile's
//!    retention.
//! 5. Write the points to the store.
//! 6. Publish them to live subscribers, enriched with device properties.
//! 7. Evaluate the profile's rules and send transitions to the alarm
//!    manager.
//!
//! A failure in steps 2 to 4 sends the envelope to the dead-letter log with
//! the step and the reason; nothing of it is stored. The dead letters of a
//! batch are written before the worker reports the batch as applied, so a
//! crash replays the batch instead of losing them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use ferrite_core::{TimestampNs, Value};
use tokio::sync::mpsc;

use super::{SeenDevices, Work};
use crate::alarms::AlarmSignal;
use crate::config::Config;
use crate::decode::{DecodeError, ScriptRunner, TimeWindow, decode_records};
use crate::ids::{DeviceId, ProfileId};
use crate::ingest::Envelope;
use crate::live::{LiveBus, LiveEvent, TelemetryEvent};
use crate::metadata::dead_letters::NewDeadLetter;
use crate::profiles::{
    CodecSpec, CompiledProfile, DeviceInfo, Directory, Record, Rejection, Stage,
};
use crate::rules::DeviceState;
use crate::store::TimeSeriesStore;

/// State shared by the workers: caches, the buses they publish to and settings.
pub struct Processing {
    pub config: Config,
    pub directory: Arc<Directory>,
    pub live: LiveBus,
    pub alarms: mpsc::Sender<AlarmSignal>,
    /// The alarm manager's open alarms, which decide what is a change.
    pub open_alarms: Arc<crate::alarms::OpenAlarms>,
    pub seen: SeenDevices,
    /// Runs the metadata calls of the workers, which are OS threads.
    pub runtime: tokio::runtime::Handle,
    pub scripts: Arc<dyn Fn() -> Box<dyn ScriptRunner> + Send + Sync>,
}

/// State one worker keeps between batches.
struct Worker<'a> {
    processing: &'a Processing,
    store: &'a dyn TimeSeriesStore,
    scripts: Box<dyn ScriptRunner>,
    devices: HashMap<DeviceId, DeviceState>,
    /// Profile version each device's rule state was built with.
    rule_versions: HashMap<DeviceId, (ProfileId, i64)>,
}

/// The outcome of one envelope.
enum Outcome {
    Stored,
    Rejected(Rejection, Option<Arc<CompiledProfile>>),
    /// The device was deleted after the message was accepted.
    UnknownDevice,
    /// The store or the metadata database failed, for a reason other than
    /// the input.
    Failed,
}

pub(super) fn run(
    receiver: Receiver<Work>,
    store: &dyn TimeSeriesStore,
    applied: &AtomicU64,
    processing: &Processing,
) {
    let mut worker = Worker {
        processing,
        store,
        scripts: (processing.scripts)(),
        devices: HashMap::new(),
        rule_versions: HashMap::new(),
    };
    // Set when a message could not be processed after every retry, for a
    // reason other than its content (the database or the disk failing).
    // The applied position then stays below it, so the log keeps it and the
    // next start processes it again.
    let mut stalled = false;
    while let Ok(work) = receiver.recv() {
        // Workers wait above twice the flush threshold: a flush that cannot
        // keep up, or keeps failing, then slows the input down instead of
        // filling memory.
        while store.pending_bytes() > store.flush_threshold().saturating_mul(2) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut last_seen: HashMap<DeviceId, i64> = HashMap::new();
        let mut dead_letters = Vec::new();
        for (seq, envelope) in &work.envelopes {
            match worker.process_with_retries(*seq, envelope) {
                Outcome::Stored => {}
                Outcome::Rejected(rejection, profile) => {
                    metrics::counter!("ferrite_pipeline_dead_letters_total", "stage" => rejection.stage.as_str())
                        .increment(1);
                    tracing::debug!(device_id = %envelope.device_id, stage = rejection.stage.as_str(), reason = %rejection.reason, "message sent to the dead-letter log");
                    dead_letters.push(dead_letter(*seq, envelope, rejection, profile.as_deref()));
                }
                Outcome::UnknownDevice => {
                    metrics::counter!("ferrite_pipeline_unknown_device_total").increment(1);
                    continue;
                }
                Outcome::Failed => stalled = true,
            }
            let received_ms = ferrite_core::nanos_to_millis(envelope.received_at_ns);
            let entry = last_seen.entry(envelope.device_id).or_insert(received_ms);
            *entry = (*entry).max(received_ms);
        }
        if !dead_letters.is_empty() && !worker.write_dead_letters(&dead_letters) {
            stalled = true;
        }
        if !last_seen.is_empty() {
            let mut seen = processing.seen.lock();
            for (device, at) in last_seen {
                let entry = seen.entry(device).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
        if !stalled {
            applied.store(work.last_seq, Ordering::Release);
        }
    }
}

/// Attempts of one message whose processing fails for a reason other than
/// its content. The pause before the second attempt is `FIRST_PAUSE`, and
/// each later pause doubles (0.1 + 0.2 + 0.4 + 0.8 s in all).
const ATTEMPTS: u32 = 5;
const FIRST_PAUSE: Duration = Duration::from_millis(100);

fn dead_letter(
    seq: u64,
    envelope: &Envelope,
    rejection: Rejection,
    profile: Option<&CompiledProfile>,
) -> NewDeadLetter {
    NewDeadLetter {
        log_seq: seq,
        tenant_id: envelope.tenant_id,
        device_id: envelope.device_id,
        received_at_ns: envelope.received_at_ns,
        protocol: envelope.protocol.as_str().to_owned(),
        content_type: envelope.content_type.name(),
        payload: envelope.payload.to_vec(),
        meta: envelope.meta.to_vec(),
        stage: rejection.stage.as_str(),
        reason: rejection.reason,
        profile_id: profile.map(|profile| profile.id),
        profile_version: profile.map(|profile| profile.version),
    }
}

fn reject(
    stage: Stage,
    reason: impl Into<String>,
    profile: Option<Arc<CompiledProfile>>,
) -> Outcome {
    Outcome::Rejected(
        Rejection {
            stage,
            reason: reason.into(),
        },
        profile,
    )
}

impl Worker<'_> {
    /// Processes one message, retrying failures of the store or the
    /// database a few times. A panic (a bug, or a library that panics on
    /// some input) rejects the message to the dead-letter log instead of
    /// stopping the worker, which would stop ingest for every device.
    fn process_with_retries(&mut self, seq: u64, envelope: &Envelope) -> Outcome {
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.process(seq, envelope)
            }));
            match outcome {
                Ok(Outcome::Failed) if attempt < ATTEMPTS => {
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Ok(outcome) => return outcome,
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|text| (*text).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown cause".to_owned());
                    metrics::counter!("ferrite_pipeline_panics_total").increment(1);
                    tracing::error!(device_id = %envelope.device_id, panic = %message, "processing a message panicked; it goes to the dead-letter log");
                    // The rule state of the device may be half updated.
                    self.devices.remove(&envelope.device_id);
                    return reject(
                        Stage::Transform,
                        format!(
                            "processing the message failed inside Ferrite ({message}); report this as a bug with the payload"
                        ),
                        None,
                    );
                }
            }
        }
        Outcome::Failed
    }

    /// Writes a batch's dead letters; false when the database keeps
    /// failing.
    fn write_dead_letters(&self, letters: &[NewDeadLetter]) -> bool {
        let processing = self.processing;
        let metadata = processing.directory.metadata().clone();
        let config = &processing.config.processing;
        let mut pause = FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS {
            match processing.runtime.block_on(metadata.insert_dead_letters(
                letters,
                config.dead_letters_per_device,
                config.dead_letters_total,
            )) {
                Ok(()) => return true,
                Err(error) if attempt < ATTEMPTS => {
                    tracing::warn!(%error, attempt, "cannot write to the dead-letter log; retrying");
                    std::thread::sleep(pause);
                    pause *= 2;
                }
                Err(error) => {
                    tracing::error!(%error, count = letters.len(), "cannot write to the dead-letter log; the messages stay in the ingest log and are processed again at the next start");
                }
            }
        }
        false
    }

    fn process(&mut self, seq: u64, envelope: &Envelope) -> Outcome {
        let processing = self.processing;

        // Step 1: the device and its profile.
        let device = match processing
            .runtime
            .block_on(processing.directory.device(envelope.device_id))
        {
            Ok(Some(device)) => device,
            Ok(None) => return Outcome::UnknownDevice,
            Err(error) => {
                tracing::error!(device_id = %envelope.device_id, %error, "cannot read the device; the message is processed again at the next start");
                return Outcome::Failed;
            }
        };
        let profile = match device.profile_id {
            None => None,
            Some(id) => match processing
                .runtime
                .block_on(processing.directory.profile(id))
            {
                Ok(Ok(profile)) if profile.tenant_id == device.tenant_id => Some(profile),
                Ok(Ok(_)) => {
                    return reject(
                        Stage::Profile,
                        "the device's profile belongs to another tenant; assign a profile of the device's tenant",
                        None,
                    );
                }
                Ok(Err(broken)) => return reject(Stage::Profile, broken.0, None),
                Err(error) => {
                    tracing::error!(device_id = %device.id, %error, "cannot read the device's profile; the message is processed again at the next start");
                    return Outcome::Failed;
                }
            },
        };

        // Step 2: decode.
        let default_codec = CodecSpec::Json;
        let codec = profile
            .as_ref()
            .map_or(&default_codec, |profile| &profile.spec.codec);
        let cache_key = profile
            .as_ref()
            .map(|profile| (profile.id, profile.version));
        let mut records = match decode_records(envelope, codec, cache_key, self.scripts.as_mut()) {
            Ok(records) => records,
            Err(error) => return reject(Stage::Decode, decode_reason(&error), profile),
        };
        if records.is_empty() {
            return reject(Stage::Decode, "the message carries no values", profile);
        }

        // Step 3: transform and validate.
        if let Some(profile) = &profile
            && let Err(rejection) = profile.processor.run(&mut records)
        {
            return Outcome::Rejected(rejection, Some(profile.clone()));
        }
        records.retain(|record| !record.fields.is_empty());
        if records.is_empty() {
            return reject(
                Stage::Validate,
                "no values are left after the profile's transformations and schema",
                profile,
            );
        }

        // Step 4: timestamps.
        if let Err(reason) = self.check_times(&device, profile.as_deref(), envelope, &records) {
            return reject(Stage::Timestamp, reason, profile);
        }

        // Step 5: store.
        let points: Vec<(&str, TimestampNs, Value)> = records
            .iter()
            .flat_map(|record| {
                record
                    .fields
                    .iter()
                    .map(|field| (field.key.as_str(), record.ts, field.value.clone()))
            })
            .collect();
        if let Err(error) = self
            .store
            .write(envelope.tenant_id, envelope.device_id, &points)
        {
            metrics::counter!("ferrite_store_write_errors_total").increment(1);
            if matches!(error, ferrite_tsdb::StoreError::InvalidArgument(_)) {
                return reject(
                    Stage::Validate,
                    format!("the store rejected the points: {error}"),
                    profile,
                );
            }
            tracing::error!(device_id = %envelope.device_id, %error, "store write failed; the points stay in the ingest log and are written again at the next start");
            return Outcome::Failed;
        }
        metrics::counter!("ferrite_pipeline_points_total", "protocol" => envelope.protocol.as_str())
            .increment(points.len() as u64);

        // Step 6: live subscribers.
        if processing.live.has_subscribers() {
            processing
                .live
                .publish(LiveEvent::Telemetry(telemetry_event(
                    &device,
                    profile.as_deref(),
                    envelope,
                    &records,
                )));
        }

        // Step 7: rules.
        if let Some(profile) = &profile
            && !profile.rules.is_empty()
        {
            self.evaluate_rules(seq, &device, profile, &records);
        }
        Outcome::Stored
    }

    fn check_times(
        &self,
        device: &DeviceInfo,
        profile: Option<&CompiledProfile>,
        envelope: &Envelope,
        records: &[Record],
    ) -> Result<(), String> {
        let mut window = TimeWindow::new(&self.processing.config, &device.tenant_id.to_string());
        if let Some(retention) = profile.and_then(|profile| profile.spec.retention) {
            window.retention = Some(
                window
                    .retention
                    .map_or(retention, |tenant| tenant.min(retention)),
            );
        }
        for record in records {
            let what = record
                .fields
                .first()
                .map_or_else(String::new, |field| format!("{:?}", field.key));
            window.check(&what, record.ts, envelope.received_at_ns)?;
        }
        Ok(())
    }

    fn evaluate_rules(
        &mut self,
        seq: u64,
        device: &Arc<DeviceInfo>,
        profile: &Arc<CompiledProfile>,
        records: &[Record],
    ) {
        let version = (profile.id, profile.version);
        let state = self.devices.entry(device.id).or_default();
        if self.rule_versions.insert(device.id, version) != Some(version) {
            state.retain_rules(&profile.rules);
        }
        let open = &self.processing.open_alarms;
        let transitions = state.evaluate(&profile.rules, &device.name, records, &|rule| {
            open.severity(device.id, rule)
        });
        for mut transition in transitions {
            transition.seq = Some(seq);
            let signal = AlarmSignal {
                device: device.clone(),
                profile: profile.clone(),
                transition,
            };
            if self.processing.alarms.blocking_send(signal).is_err() {
                tracing::warn!("the alarm manager has stopped; a rule transition is lost");
            }
        }
    }
}

fn decode_reason(error: &DecodeError) -> String {
    error.to_string()
}

fn telemetry_event(
    device: &DeviceInfo,
    profile: Option<&CompiledProfile>,
    envelope: &Envelope,
    records: &[Record],
) -> TelemetryEvent {
    let enrich = profile.map(|profile| &profile.spec.enrich);
    let labels = match enrich {
        Some(enrich) if !enrich.labels => Arc::default(),
        _ => device.labels.clone(),
    };
    let attributes = match enrich {
        Some(enrich) if !enrich.attributes.is_empty() => Arc::new(
            enrich
                .attributes
                .iter()
                .filter_map(|name| {
                    device
                        .attributes
                        .get(name)
                        .map(|value| (name.clone(), value.clone()))
                })
                .collect(),
        ),
        _ => Arc::default(),
    };
    TelemetryEvent {
        tenant_id: device.tenant_id,
        device_id: device.id,
        device_name: device.name.clone(),
        profile_id: profile.map(|profile| profile.id),
        profile_name: profile.map(|profile| profile.name.clone()),
        labels,
        attributes,
        received_at_ns: envelope.received_at_ns,
        points: records
            .iter()
            .flat_map(|record| {
                record
                    .fields
                    .iter()
                    .map(|field| (field.key.clone(), record.ts, field.value.clone()))
            })
            .collect(),
    }
}
