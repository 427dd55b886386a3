//! The alarm manager: turns rule transitions from the pipeline into alarms,
//! keeps their lifecycle (active, acknowledged, cleared), publishes every
//! change to the live bus and runs the rule's actions.
//!
//! ## Ownership
//! One task owns alarm creation and automatic clearing; it receives
//! [`AlarmSignal`]s from the pipeline workers through a bounded channel, so
//! a slow database slows the workers down instead of losing transitions.
//! Acknowledging and clearing by hand come from the API and go through the
//! same [`AlarmManager`], whose map of open alarms is the one place that
//! decides whether a raise is new.
//!
//! ## Silence
//! `no_data` rules are checked every [`NO_DATA_CHECK_INTERVAL`] against the
//! devices' last-seen times (written by the server every 2 s), so a silent
//! device raises within the rule's duration plus about 7 s.
//!
//! ## Shutdown
//! The task ends when every sender is gone (the pipeline has finished) or
//! the shutdown token fires, after handling what is queued.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ids::{AlarmId, DeviceId, TenantId};
use crate::live::{AlarmChange, AlarmEvent, LiveBus, LiveEvent};
use crate::metadata::alarms::{Alarm, NewAlarm};
use crate::metadata::{MetadataError, SqliteMetadata};
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
struct OpenAlarm {
    id: AlarmId,
    severity: Severity,
}

pub struct AlarmManager {
    metadata: Arc<SqliteMetadata>,
    directory: Arc<Directory>,
    live: LiveBus,
    /// Open alarms by device and rule name.
    open: Mutex<HashMap<(DeviceId, String), OpenAlarm>>,
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

impl AlarmManager {
    /// Loads the open alarms and returns the manager with the sender the
    /// pipeline uses.
    pub async fn open(
        metadata: Arc<SqliteMetadata>,
        directory: Arc<Directory>,
        live: LiveBus,
    ) -> Result<
        (
            Arc<AlarmManager>,
            mpsc::Sender<AlarmSignal>,
            mpsc::Receiver<AlarmSignal>,
        ),
        MetadataError,
    > {
        let open = metadata
            .open_alarms()
            .await?
            .into_iter()
            .map(|alarm| {
                (
                    (alarm.device_id, alarm.rule.clone()),
                    OpenAlarm {
                        id: alarm.id,
                        severity: alarm.severity,
                    },
                )
            })
            .collect();
        let (sender, receiver) = mpsc::channel(SIGNAL_QUEUE_CAPACITY);
        let manager = Arc::new(AlarmManager {
            metadata,
            directory,
            live,
            open: Mutex::new(open),
            changes: tokio::sync::Mutex::new(()),
        });
        Ok((manager, sender, receiver))
    }

    /// Handles signals until every sender is gone (the pipeline has
    /// drained), and checks `no_data` rules on a timer until `shutdown`.
    /// It does not stop at `shutdown` itself: workers that drain the log
    /// may still send transitions, and a stopped receiver would block them.
    pub async fn run(
        self: Arc<Self>,
        mut signals: mpsc::Receiver<AlarmSignal>,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(NO_DATA_CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                signal = signals.recv() => match signal {
                    Some(signal) => self.apply(signal).await,
                    None => return,
                },
                _ = ticker.tick(), if !shutdown.is_cancelled() => self.check_silence().await,
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
                Err(MetadataError::Database(error)) if attempt < APPLY_ATTEMPTS => {
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

    async fn raise(
        &self,
        device: &DeviceInfo,
        profile: &CompiledProfile,
        transition: &Transition,
    ) -> Result<(), MetadataError> {
        let _serial = self.changes.lock().await;
        let key = (device.id, transition.rule.clone());
        let open = self.open.lock().get(&key).copied();
        let details = details(transition);
        let (alarm, change) = match open {
            Some(open) if open.severity == transition.severity => return Ok(()),
            // A repeated raise only reopens an alarm cleared by hand; the
            // severity of an open one changes with the profile's edges.
            Some(_) if transition.repeated => return Ok(()),
            Some(open) => {
                let alarm = self
                    .metadata
                    .update_alarm(
                        open.id,
                        transition.severity,
                        &transition.message,
                        &details,
                        now_ms(),
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
                    })
                    .await?;
                (alarm, AlarmChange::Raised)
            }
        };
        self.open.lock().insert(
            key,
            OpenAlarm {
                id: alarm.id,
                severity: alarm.severity,
            },
        );
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
        let key = (device.id, transition.rule.clone());
        let Some(open) = self.open.lock().get(&key).copied() else {
            return Ok(());
        };
        let alarm = match self
            .metadata
            .clear_alarm(open.id, &details(transition), now_ms(), None)
            .await
        {
            Ok(alarm) => alarm,
            // Cleared by hand meanwhile, or the device was deleted.
            Err(MetadataError::Conflict(_) | MetadataError::NotFound(_)) => {
                self.open.lock().remove(&key);
                return Ok(());
            }
            Err(error) => return Err(error),
        };
        self.open.lock().remove(&key);
        metrics::counter!("ferrite_alarms_total", "change" => "cleared").increment(1);
        let profile = match device.profile_id {
            Some(id) => self.directory.profile(id).await.ok().and_then(Result::ok),
            None => None,
        };
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
            )
            .await?;
        self.open
            .lock()
            .remove(&(alarm.device_id, alarm.rule.clone()));
        metrics::counter!("ferrite_alarms_total", "change" => "cleared").increment(1);
        let profile = self.profile_of(&alarm).await;
        self.announce(alarm.clone(), AlarmChange::Cleared, profile.as_deref());
        Ok(alarm)
    }

    async fn profile_of(&self, alarm: &Alarm) -> Option<Arc<CompiledProfile>> {
        let id = alarm.profile_id?;
        self.directory.profile(id).await.ok().and_then(Result::ok)
    }

    fn announce(&self, alarm: Alarm, change: AlarmChange, profile: Option<&CompiledProfile>) {
        let alarm_json = Arc::new(serde_json::to_value(&alarm).unwrap_or_default());
        // TODO: run the rule's actions here once they land.
        let _ = profile;
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
        let profiles = match self.metadata.all_profiles().await {
            Ok(profiles) => profiles,
            Err(error) => {
                tracing::warn!(%error, "cannot read profiles for the no-data check; retrying");
                return;
            }
        };
        let now = now_ms();
        for stored in profiles {
            if !stored
                .spec
                .rules
                .iter()
                .any(|rule| matches!(rule.condition, crate::rules::Condition::NoData { .. }))
            {
                continue;
            }
            let Ok(Ok(profile)) = self.directory.profile(stored.id).await else {
                continue;
            };
            let devices = match self.metadata.devices_of_profile(stored.id).await {
                Ok(devices) => devices,
                Err(error) => {
                    tracing::warn!(%error, "cannot read devices for the no-data check; retrying");
                    return;
                }
            };
            for device in devices {
                let silent_since = device.last_seen_at.unwrap_or(device.created_at);
                let device = Arc::new(DeviceInfo::from(device));
                for rule in &profile.rules {
                    let Some(no_data) = &rule.no_data else {
                        continue;
                    };
                    let limit = i64::try_from(no_data.duration.as_millis()).unwrap_or(i64::MAX);
                    if now.saturating_sub(silent_since) < limit {
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
                        repeated: false,
                    };
                    if let Err(error) = self.raise(&device, &profile, &transition).await {
                        tracing::error!(device_id = %device.id, rule = %rule.name, %error, "cannot raise a no-data alarm");
                    }
                }
            }
        }
    }
}
