//! The alarm manager: turns rule transitions from the pipeline into alarms,
//! keeps their lifecycle (active, acknowledged, cleared), publishes every
//! change to the live bus and runs the rule's actions.
//!
//! ## Ownership
//! One task applies the transitions that pipeline workers send through a
//! bounded channel, so a slow database slows the workers down instead of
//! losing transitions. Acknowledging and clearing by hand come from the
//! API and go through the same [`AlarmManager`]; a lock serializes all
//! changes. The map of open alarms ([`OpenAlarms`]) is shared with the
//! workers, which read it to decide whether an outcome is a change (see
//! `crate::rules`).
//!
//! ## Replay
//! Every alarm row records the ingest log position of the last transition
//! applied to it. After a crash the log replays the messages that the store
//! had not flushed. Their transitions carry positions at or below the
//! recorded one, so they are skipped and alarms and actions do not fire
//! twice.
//!
//! ## Silence
//! `no_data` rules are checked every [`NO_DATA_CHECK_INTERVAL`] against the
//! devices' last-seen times, in memory and in the database, so a silent
//! device raises within the rule's duration plus the check interval. A
//! device that was silent only because the server was down gets the time
//! the server started as its last-seen time.
//!
//! ## Shutdown
//! The signal task ends when every sender is gone (the pipeline has
//! finished), after handling what is queued; the silence check stops at
//! the shutdown token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::actions::{ActionEvent, Actions};
use crate::ids::{AlarmId, DeviceId, ProfileId, TenantId};
use crate::live::{AlarmChange, AlarmEvent, LiveBus, LiveEvent};
use crate::metadata::alarms::{Alarm, NewAlarm};
use crate::metadata::{MetadataError, SqliteMetadata};
use crate::pipeline::SeenDevices;
use crate::profiles::{CompiledProfile, DeviceInfo, Directory};
use crate::rules::{Severity, Transition};

/// How often `no_data` rules are checked.
pub const NO_DATA_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Attempts to record one alarm change before it is given up.
const APPLY_ATTEMPTS: u32 = 5;

/// Signals the pipeline may queue before workers wait.
pub const SIGNAL_QUEUE_CAPACITY: usize = 4096;

/// A rule transition on one device, from a pipeline worker.
#[derive(Debug)]
pub struct AlarmSignal {
    pub device: Arc<DeviceInfo>,
    pub profile: Arc<CompiledProfile>,
    pub transition: Transition,
}

#[derive(Debug, Clone, Copy)]
pub struct OpenAlarm {
    id: AlarmId,
    pub severity: Severity,
    profile_id: Option<ProfileId>,
}

/// Open alarms by device and rule name, shared with the pipeline workers.
#[derive(Default)]
pub struct OpenAlarms(Mutex<HashMap<DeviceId, HashMap<String, OpenAlarm>>>);

impl OpenAlarms {
    /// Returns the severity of the device's open alarm of `rule`.
    pub fn severity(&self, device: DeviceId, rule: &str) -> Option<Severity> {
        self.0
            .lock()
            .get(&device)
            .and_then(|rules| rules.get(rule))
            .map(|alarm| alarm.severity)
    }

    fn get(&self, device: DeviceId, rule: &str) -> Option<OpenAlarm> {
        self.0
            .lock()
            .get(&device)
            .and_then(|rules| rules.get(rule))
            .copied()
    }

    fn insert(&self, device: DeviceId, rule: &str, alarm: OpenAlarm) {
        self.0
            .lock()
            .entry(device)
            .or_default()
            .insert(rule.to_owned(), alarm);
    }

    fn remove(&self, device: DeviceId, rule: &str) {
        let mut open = self.0.lock();
        if let Some(rules) = open.get_mut(&device) {
            rules.remove(rule);
            if rules.is_empty() {
                open.remove(&device);
            }
        }
    }

    /// Lists the open alarms that `stale` selects, by device and rule.
    fn select(
        &self,
        stale: impl Fn(DeviceId, &str, &OpenAlarm) -> bool,
    ) -> Vec<(DeviceId, String)> {
        self.0
            .lock()
            .iter()
            .flat_map(|(device, rules)| {
                rules
                    .iter()
                    .filter(|(rule, alarm)| stale(*device, rule, alarm))
                    .map(|(rule, _)| (*device, rule.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

pub struct AlarmManager {
    metadata: Arc<SqliteMetadata>,
    /// Runs the rules' actions (webhooks, MQTT publishes, commands).
    actions: Actions,
    directory: Arc<Directory>,
    live: LiveBus,
    open: Arc<OpenAlarms>,
    /// Ingest log position of the last transition applied per device and
    /// rule, to skip replayed ones.
    applied: Mutex<HashMap<(DeviceId, String), u64>>,
    /// Receive times not yet written to the metadata store.
    seen: SeenDevices,
    /// Epoch milliseconds of the start: no device counts as silent since
    /// before it.
    started_at: i64,
    /// Serializes changes, so a raise and a manual clear of the same alarm
    /// cannot interleave between the map and the database.
    changes: tokio::sync::Mutex<()>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn details(transition: &Transition) -> serde_json::Value {
    let values: serde_json::Map<String, serde_json::Value> = transition
        .values
        .iter()
        .map(|(key, value)| (key.clone(), serde_json::to_value(value).unwrap_or_default()))
        .collect();
    json!({
        "values": values,
        "ts": ferrite_core::nanos_to_millis(transition.ts),
    })
}

/// True for database errors that a retry cannot fix (a constraint
/// violation: the device or profile was deleted meanwhile).
fn is_permanent(error: &MetadataError) -> bool {
    match error {
        MetadataError::Database(sqlx::Error::Database(db)) => {
            db.is_foreign_key_violation() || db.is_unique_violation() || db.is_check_violation()
        }
        MetadataError::Database(_) => false,
        _ => true,
    }
}

impl AlarmManager {
    /// Loads the open alarms and returns the manager with the channel the
    /// pipeline sends transitions through.
    pub async fn open(
        metadata: Arc<SqliteMetadata>,
        directory: Arc<Directory>,
        live: LiveBus,
        actions: Actions,
        seen: SeenDevices,
    ) -> Result<
        (
            Arc<AlarmManager>,
            mpsc::Sender<AlarmSignal>,
            mpsc::Receiver<AlarmSignal>,
        ),
        MetadataError,
    > {
        let open = Arc::new(OpenAlarms::default());
        for alarm in metadata.open_alarms().await? {
            open.insert(
                alarm.device_id,
                &alarm.rule,
                OpenAlarm {
                    id: alarm.id,
                    severity: alarm.severity,
                    profile_id: alarm.profile_id,
                },
            );
        }
        let applied = metadata.alarm_positions().await?;
        let (sender, receiver) = mpsc::channel(SIGNAL_QUEUE_CAPACITY);
        let manager = Arc::new(AlarmManager {
            metadata,
            actions,
            directory,
            live,
            open,
            applied: Mutex::new(applied),
            seen,
            started_at: now_ms(),
            changes: tokio::sync::Mutex::new(()),
        });
        Ok((manager, sender, receiver))
    }

    /// Returns the open alarms, for the pipeline workers.
    pub fn open_alarms(&self) -> Arc<OpenAlarms> {
        self.open.clone()
    }

    /// Handles signals until every sender is gone (the pipeline has
    /// drained). It does not stop at `shutdown`: workers that drain the log
    /// may still send transitions, and a stopped receiver would block them.
    pub async fn run(self: Arc<Self>, mut signals: mpsc::Receiver<AlarmSignal>) {
        while let Some(signal) = signals.recv().await {
            self.apply(signal).await;
        }
    }

    /// Checks `no_data` rules every [`NO_DATA_CHECK_INTERVAL`] until
    /// `shutdown`.
    pub async fn watch_silence(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(NO_DATA_CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.check_silence().await,
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn apply(&self, signal: AlarmSignal) {
        let AlarmSignal {
            device,
            profile,
            transition,
        } = signal;
        // A busy or briefly failing database gets a few attempts before the
        // transition is given up.
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=APPLY_ATTEMPTS {
            let result = if transition.raise {
                self.raise(&device, &profile, &transition).await
            } else {
                self.clear_by_rule(&device, &transition).await
            };
            match result {
                Ok(()) => return,
                Err(error) if attempt < APPLY_ATTEMPTS && !is_permanent(&error) => {
                    tracing::warn!(device_id = %device.id, rule = %transition.rule, %error, attempt, "cannot record an alarm change; retrying");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(error) => {
                    metrics::counter!("ferrite_alarm_errors_total").increment(1);
                    tracing::error!(device_id = %device.id, rule = %transition.rule, %error, "cannot record an alarm change; it is lost");
                    return;
                }
            }
        }
    }

    /// True when a transition at this log position was already applied
    /// (a replay after a crash).
    fn replayed(&self, device: DeviceId, transition: &Transition) -> bool {
        let Some(seq) = transition.seq else {
            return false;
        };
        self.applied
            .lock()
            .get(&(device, transition.rule.clone()))
            .is_some_and(|applied| seq <= *applied)
    }

    fn record_position(&self, device: DeviceId, transition: &Transition) {
        if let Some(seq) = transition.seq {
            let mut applied = self.applied.lock();
            let entry = applied
                .entry((device, transition.rule.clone()))
                .or_insert(seq);
            *entry = (*entry).max(seq);
        }
    }

    async fn raise(
        &self,
        device: &DeviceInfo,
        profile: &CompiledProfile,
        transition: &Transition,
    ) -> Result<(), MetadataError> {
        let _serial = self.changes.lock().await;
        if self.replayed(device.id, transition) {
            return Ok(());
        }
        let open = self.open.get(device.id, &transition.rule);
        let details = details(transition);
        let (alarm, change) = match open {
            Some(open) if open.severity == transition.severity => return Ok(()),
            Some(open) => {
                let alarm = self
                    .metadata
                    .update_alarm(
                        open.id,
                        transition.severity,
                        &transition.message,
                        &details,
                        now_ms(),
                        transition.seq,
                    )
                    .await?;
                (alarm, AlarmChange::Updated)
            }
            None => {
                let alarm = self
                    .metadata
                    .raise_alarm(NewAlarm {
                        tenant_id: device.tenant_id,
                        device_id: device.id,
                        profile_id: Some(profile.id),
                        rule: &transition.rule,
                        severity: transition.severity,
                        message: &transition.message,
                        details: &details,
                        at: now_ms(),
                        seq: transition.seq,
                    })
                    .await?;
                (alarm, AlarmChange::Raised)
            }
        };
        self.open.insert(
            device.id,
            &transition.rule,
            OpenAlarm {
                id: alarm.id,
                severity: alarm.severity,
                profile_id: alarm.profile_id,
            },
        );
        self.record_position(device.id, transition);
        metrics::counter!("ferrite_alarms_total", "change" => change.as_str()).increment(1);
        self.announce(alarm, change, Some(profile));
        Ok(())
    }

    async fn clear_by_rule(
        &self,
        device: &DeviceInfo,
        transition: &Transition,
    ) -> Result<(), MetadataError> {
        let _serial = self.changes.lock().await;
        if self.replayed(device.id, transition) {
            return Ok(());
        }
        let Some(open) = self.open.get(device.id, &transition.rule) else {
            return Ok(());
        };
        let cleared = self
            .metadata
            .clear_alarm(
                open.id,
                &details(transition),
                now_ms(),
                None,
                transition.seq,
            )
            .await;
        self.record_position(device.id, transition);
        self.finish_clear(device.id, &transition.rule, cleared)
            .await
    }

    /// Updates the open map after a clear and announces it. A conflict or
    /// a missing row means the alarm was cleared by hand or its device was
    /// deleted meanwhile.
    async fn finish_clear(
        &self,
        device: DeviceId,
        rule: &str,
        cleared: Result<Alarm, MetadataError>,
    ) -> Result<(), MetadataError> {
        let alarm = match cleared {
            Ok(alarm) => alarm,
            Err(MetadataError::Conflict(_) | MetadataError::NotFound(_)) => {
                self.open.remove(device, rule);
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        self.open.remove(device, rule);
        metrics::counter!("ferrite_alarms_total", "change" => "cleared").increment(1);
        let profile = self.profile_of(&alarm).await;
        self.announce(alarm, AlarmChange::Cleared, profile.as_deref());
        Ok(())
    }

    /// Acknowledges an alarm for a person of the tenant.
    pub async fn acknowledge(
        &self,
        tenant: TenantId,
        id: AlarmId,
        actor: &str,
    ) -> Result<Alarm, MetadataError> {
        let _serial = self.changes.lock().await;
        let alarm = self.metadata.acknowledge_alarm(tenant, id, actor).await?;
        metrics::counter!("ferrite_alarms_total", "change" => "acknowledged").increment(1);
        let profile = self.profile_of(&alarm).await;
        self.announce(alarm.clone(), AlarmChange::Acknowledged, profile.as_deref());
        Ok(alarm)
    }

    /// Clears an alarm by hand. If the condition still holds, the next
    /// message raises a new alarm.
    pub async fn clear(
        &self,
        tenant: TenantId,
        id: AlarmId,
        actor: &str,
    ) -> Result<Alarm, MetadataError> {
        let _serial = self.changes.lock().await;
        let alarm = self.metadata.alarm(tenant, id).await?;
        let alarm = self
            .metadata
            .clear_alarm(
                alarm.id,
                &json!({"cleared_by_hand": true}),
                now_ms(),
                Some(actor),
                None,
            )
            .await?;
        self.open.remove(alarm.device_id, &alarm.rule);
        metrics::counter!("ferrite_alarms_total", "change" => "cleared").increment(1);
        let profile = self.profile_of(&alarm).await;
        self.announce(alarm.clone(), AlarmChange::Cleared, profile.as_deref());
        Ok(alarm)
    }

    /// Clears open alarms that their profile no longer explains: alarms of
    /// rules that `profile` dropped or renamed, or of devices that moved to
    /// another profile. `device` limits the check to one device.
    pub async fn reconcile(&self, profile: Option<&CompiledProfile>, device: Option<DeviceId>) {
        let stale = self.open.select(|open_device, rule, alarm| {
            if device.is_some_and(|device| device != open_device) {
                return false;
            }
            match profile {
                // One device: every alarm of another profile, or of a rule
                // the profile does not have.
                Some(profile) if device.is_some() => {
                    alarm.profile_id != Some(profile.id)
                        || !profile.rules.iter().any(|r| r.name == rule)
                }
                Some(profile) => {
                    alarm.profile_id == Some(profile.id)
                        && !profile.rules.iter().any(|r| r.name == rule)
                }
                // The device has no profile any more.
                None => device.is_some(),
            }
        });
        for (device, rule) in stale {
            let _serial = self.changes.lock().await;
            let Some(open) = self.open.get(device, &rule) else {
                continue;
            };
            let cleared = self
                .metadata
                .clear_alarm(
                    open.id,
                    &json!({"cleared_because": "the rule or the device's profile changed"}),
                    now_ms(),
                    Some("profile change"),
                    None,
                )
                .await;
            if let Err(error) = self.finish_clear(device, &rule, cleared).await {
                tracing::warn!(device_id = %device, %rule, %error, "cannot clear an alarm whose rule is gone");
            }
        }
    }

    async fn profile_of(&self, alarm: &Alarm) -> Option<Arc<CompiledProfile>> {
        let id = alarm.profile_id?;
        self.directory.profile(id).await.ok().and_then(Result::ok)
    }

    fn announce(&self, alarm: Alarm, change: AlarmChange, profile: Option<&CompiledProfile>) {
        let alarm_json = Arc::new(serde_json::to_value(&alarm).unwrap_or_default());
        if let Some(rule) =
            profile.and_then(|profile| profile.rules.iter().find(|rule| rule.name == alarm.rule))
            && !rule.actions.is_empty()
        {
            let event = ActionEvent {
                tenant_id: alarm.tenant_id,
                device_id: alarm.device_id,
                device_name: alarm.device_name.clone(),
                change,
                alarm: (*alarm_json).clone(),
            };
            for action in &rule.actions {
                self.actions.submit(action, &event);
            }
        }
        self.live.publish(LiveEvent::Alarm(AlarmEvent {
            tenant_id: alarm.tenant_id,
            device_id: alarm.device_id,
            profile_id: alarm.profile_id,
            change,
            alarm: alarm_json,
        }));
    }

    /// Raises `no_data` alarms of devices that have been silent for longer
    /// than their rule allows.
    async fn check_silence(&self) {
        let profiles = match self.metadata.profiles_with_silence_rules().await {
            Ok(profiles) => profiles,
            Err(error) => {
                tracing::warn!(%error, "cannot read profiles for the no-data check; retrying");
                return;
            }
        };
        let now = now_ms();
        for stored in profiles {
            let Ok(Ok(profile)) = self.directory.profile(stored.id).await else {
                continue;
            };
            let Some(shortest) = profile
                .rules
                .iter()
                .filter_map(|rule| rule.no_data.as_ref())
                .map(|no_data| no_data.duration)
                .min()
            else {
                continue;
            };
            let shortest_ms = i64::try_from(shortest.as_millis()).unwrap_or(i64::MAX);
            // Only devices whose stored last-seen time is old enough; the
            // newer in-memory time is checked below.
            let devices = match self
                .metadata
                .silent_devices(stored.id, now.saturating_sub(shortest_ms))
                .await
            {
                Ok(devices) => devices,
                Err(error) => {
                    tracing::warn!(%error, "cannot read devices for the no-data check; retrying");
                    return;
                }
            };
            for device in devices {
                let pending = self.seen.lock().get(&device.id).copied();
                let silent_since = device
                    .last_seen_at
                    .unwrap_or(device.created_at)
                    .max(pending.unwrap_or(i64::MIN))
                    .max(self.started_at);
                let device = Arc::new(DeviceInfo::from(device));
                for rule in &profile.rules {
                    let Some(no_data) = &rule.no_data else {
                        continue;
                    };
                    let limit = i64::try_from(no_data.duration.as_millis()).unwrap_or(i64::MAX);
                    if now.saturating_sub(silent_since) < limit
                        || self.open.severity(device.id, &rule.name) == Some(rule.severity)
                    {
                        continue;
                    }
                    let transition = Transition {
                        rule: rule.name.clone(),
                        raise: true,
                        severity: rule.severity,
                        ts: silent_since.saturating_mul(1_000_000),
                        message: format!(
                            "{}: no data from {} for {}",
                            rule.name,
                            device.name,
                            crate::decode::format_duration(no_data.duration)
                        ),
                        values: Vec::new(),
                        seq: None,
                    };
                    if let Err(error) = self.raise(&device, &profile, &transition).await {
                        tracing::error!(device_id = %device.id, rule = %rule.name, %error, "cannot raise a no-data alarm");
                    }
                }
            }
        }
    }
}
