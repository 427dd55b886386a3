//! The action runner: records deliveries, runs their attempts and
//! schedules retries.
//!
//! Three tasks run until shutdown:
//! - the recorder takes submitted deliveries from the bounded queue and
//!   inserts them into `action_deliveries` in batches;
//! - the scheduler reads pending deliveries whose next attempt is due,
//!   earliest first, and starts an attempt for each, at most
//!   `actions.max_concurrent` at once. It runs when woken (a new delivery, a
//!   finished attempt, a manual retry) and at least every second;
//! - the cleaner deletes finished deliveries past their retention every
//!   hour.
//!
//! The table is the retry queue: an attempt only reads a row and writes its
//! outcome back, so pending deliveries survive a restart. The `busy` set
//! keeps the scheduler from starting a second attempt of a delivery whose
//! attempt is still running. A crash during an attempt leaves the row due,
//! and it is attempted again after the restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::events::{self, Outcome, WarnLimiter};
use super::mqtt::MqttPublisher;
use super::retry::{Attempt, RetryPolicy};
use super::spec::ActionSpec;
use super::webhook::{self, WebhookRequest};
use super::{ActionEvent, command};
use crate::adapters::mqtt::Router;
use crate::config::ActionsConfig;
use crate::encryption::Keyring;
use crate::ids::TenantId;
use crate::metadata::{
    Delivery, DeliveryId, DeliveryStatus, MetadataError, MetadataStore, NewDelivery, SqliteMetadata,
};

/// Maximum wait of the scheduler between two reads of the table.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Interval of the deletion of old finished deliveries.
const CLEANUP_INTERVAL: Duration = Duration::from_secs(3600);
/// Most deliveries the recorder inserts in one transaction.
const RECORD_BATCH: usize = 256;
/// Extra time shutdown gives running attempts beyond their own timeout.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Outcome of [`Actions::submit`] for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// Queued for recording and a first attempt.
    Queued(DeliveryId),
    /// The alarm change is not in the action's `on` list.
    NotTriggered,
    /// The queue was full, or the runner is shutting down.
    Dropped,
}

/// Error of [`Actions::retry`].
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("an attempt of this delivery is running; retry after it ends")]
    Busy,
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

/// Handle to the action runner. Cheap to clone; all clones share the
/// runner.
#[derive(Clone)]
pub struct Actions {
    inner: Arc<Inner>,
}

struct Inner {
    config: ActionsConfig,
    policy: RetryPolicy,
    metadata: Arc<SqliteMetadata>,
    /// Opens the sealed secrets and header values of webhooks.
    keyring: Arc<Keyring>,
    router: Router,
    http: reqwest::Client,
    mqtt: MqttPublisher,
    /// Submitted deliveries for the recorder.
    queue: mpsc::Sender<NewDelivery>,
    /// Wakes the scheduler.
    wake: Notify,
    /// Earliest retry time (epoch milliseconds) scheduled since the
    /// scheduler last looked, so that it wakes for it instead of at its next
    /// poll.
    next_retry_at: Mutex<Option<i64>>,
    /// Deliveries with a running attempt or a manual retry in progress.
    busy: Mutex<HashSet<DeliveryId>>,
    /// Permits for running attempts (`actions.max_concurrent`).
    slots: Arc<Semaphore>,
    drop_warnings: Mutex<WarnLimiter>,
    failure_warnings: Mutex<WarnLimiter>,
    database_warnings: Mutex<WarnLimiter>,
    /// The recorder, scheduler, cleaner, publisher and attempt tasks.
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Actions {
    /// Starts the runner's tasks. Pending deliveries from before a restart
    /// are attempted as soon as they are due.
    pub fn start(
        config: &ActionsConfig,
        metadata: Arc<SqliteMetadata>,
        keyring: Arc<Keyring>,
        router: Router,
    ) -> anyhow::Result<Actions> {
        events::register();
        let broker = config.mqtt.broker_address()?;
        let http = webhook::client(config.attempt_timeout)
            .map_err(|error| anyhow::anyhow!("cannot create the webhook HTTP client: {error}"))?;
        let tasks = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let (queue, submissions) = mpsc::channel(config.queue_capacity);
        let inner = Arc::new(Inner {
            config: config.clone(),
            policy: RetryPolicy::from_config(config),
            metadata,
            keyring,
            router,
            http,
            mqtt: MqttPublisher::new(config.mqtt.clone(), broker, tasks.clone(), shutdown.clone()),
            queue,
            wake: Notify::new(),
            next_retry_at: Mutex::new(None),
            busy: Mutex::new(HashSet::new()),
            slots: Arc::new(Semaphore::new(config.max_concurrent)),
            drop_warnings: Mutex::default(),
            failure_warnings: Mutex::default(),
            database_warnings: Mutex::default(),
            tasks: tasks.clone(),
            shutdown,
        });
        tasks.spawn(record_submissions(inner.clone(), submissions));
        tasks.spawn(schedule_attempts(inner.clone()));
        tasks.spawn(delete_old_deliveries(inner.clone()));
        Ok(Actions { inner })
    }

    /// Queues a delivery of `spec` for `event` if the event's change is one
    /// of the action's triggers. Never waits: when the queue is full the
    /// delivery is dropped, counted in `ferrite_action_queue_dropped_total`
    /// and logged (rate-limited).
    pub fn submit(&self, spec: &ActionSpec, event: &ActionEvent) -> Submission {
        if !spec.is_triggered_by(event.change) {
            return Submission::NotTriggered;
        }
        let delivery = match new_delivery(spec, event) {
            Ok(delivery) => delivery,
            Err(error) => {
                tracing::error!(%error, device_id = %event.device_id, "cannot serialize an action delivery; it is dropped");
                return Submission::Dropped;
            }
        };
        let id = delivery.id;
        match self.inner.queue.try_send(delivery) {
            Ok(()) => Submission::Queued(id),
            Err(mpsc::error::TrySendError::Full(_)) => {
                events::queue_dropped();
                let allowed = self.inner.drop_warnings.lock().allow(Instant::now());
                if let Some(suppressed) = allowed {
                    tracing::warn!(
                        capacity = self.inner.config.queue_capacity,
                        suppressed,
                        "dropped an alarm action: the action queue is full; later drops are counted in ferrite_action_queue_dropped_total, raise actions.queue_capacity if this repeats"
                    );
                }
                Submission::Dropped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!("dropped an alarm action submitted during shutdown");
                Submission::Dropped
            }
        }
    }

    /// Records a delivery of `spec` for `event` whatever its triggers, and
    /// schedules its first attempt now. Unlike [`Actions::submit`] it waits
    /// for the database, so the delivery exists when it returns.
    pub async fn record_delivery(
        &self,
        spec: &ActionSpec,
        event: &ActionEvent,
    ) -> Result<Delivery, MetadataError> {
        let delivery = new_delivery(spec, event)
            .map_err(|error| MetadataError::Database(sqlx::Error::Encode(error.into())))?;
        let (tenant, id) = (delivery.tenant_id, delivery.id);
        self.inner
            .metadata
            .insert_action_deliveries(std::slice::from_ref(&delivery))
            .await?;
        self.inner.wake.notify_one();
        self.inner.metadata.action_delivery(tenant, id).await
    }

    /// Makes a delivery of `tenant` pending again with a new round of
    /// attempts, the first one now. Works on failed and succeeded
    /// deliveries (a redelivery) and moves the next attempt of a pending one
    /// to now.
    pub async fn retry(&self, tenant: TenantId, id: DeliveryId) -> Result<Delivery, RetryError> {
        if !self.inner.busy.lock().insert(id) {
            return Err(RetryError::Busy);
        }
        let restarted = self
            .inner
            .metadata
            .restart_action_delivery(tenant, id, now_ms())
            .await;
        self.inner.busy.lock().remove(&id);
        self.inner.wake.notify_one();
        Ok(restarted?)
    }

    /// Stops the runner: records what is still queued, lets running
    /// attempts finish (each is bounded by `actions.attempt_timeout`) and
    /// stops the tasks. Deliveries still pending are attempted after the
    /// next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let limit = self.inner.config.attempt_timeout + SHUTDOWN_GRACE;
        if tokio::time::timeout(limit, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "alarm action attempts still running at shutdown were abandoned; they are retried after the next start"
            );
        }
    }
}

/// Builds the row of a new delivery: the spec and the event as JSON, and
/// the target as the API shows it.
fn new_delivery(spec: &ActionSpec, event: &ActionEvent) -> serde_json::Result<NewDelivery> {
    Ok(NewDelivery {
        id: DeliveryId::new_v7(),
        tenant_id: event.tenant_id,
        device_id: event.device_id,
        alarm_id: event.alarm_id(),
        kind: spec.kind(),
        target: spec.target(event),
        event: event.event_name(),
        spec: serde_json::to_string(spec)?,
        payload: serde_json::to_string(&event.document())?,
        created_at: now_ms(),
    })
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Inserts submitted deliveries in batches until shutdown, then records
/// what is still queued.
async fn record_submissions(inner: Arc<Inner>, mut submissions: mpsc::Receiver<NewDelivery>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    loop {
        let received = tokio::select! {
            received = submissions.recv_many(&mut batch, RECORD_BATCH) => received,
            () = inner.shutdown.cancelled() => break,
        };
        if received == 0 {
            break;
        }
        record(&inner, &mut batch).await;
    }

    // Record what was queued before shutdown, so that it is sent after the
    // next start.
    submissions.close();
    while let Some(delivery) = submissions.recv().await {
        batch.push(delivery);
        if batch.len() == RECORD_BATCH {
            record(&inner, &mut batch).await;
        }
    }
    record(&inner, &mut batch).await;
}

async fn record(inner: &Inner, batch: &mut Vec<NewDelivery>) {
    if batch.is_empty() {
        return;
    }
    match inner.metadata.insert_action_deliveries(batch).await {
        Ok(()) => inner.wake.notify_one(),
        Err(error) => {
            // An operator must act: these alarm notifications are lost.
            tracing::error!(%error, deliveries = batch.len(), "cannot record alarm action deliveries; they are lost");
        }
    }
    batch.clear();
}

/// Starts due attempts whenever woken, a retry falls due, or
/// [`POLL_INTERVAL`] passes, until shutdown.
async fn schedule_attempts(inner: Arc<Inner>) {
    loop {
        start_due_attempts(&inner).await;
        let wait = time_to_next_retry(&inner);
        tokio::select! {
            () = inner.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = inner.shutdown.cancelled() => return,
        }
    }
}

/// Returns the time until the earliest known retry, at most
/// [`POLL_INTERVAL`]. A retry time that has passed is forgotten, because
/// the look at the table that follows at once finds it due.
fn time_to_next_retry(inner: &Inner) -> Duration {
    let mut next_retry_at = inner.next_retry_at.lock();
    let now = now_ms();
    match *next_retry_at {
        Some(at) if at > now => Duration::from_millis((at - now) as u64).min(POLL_INTERVAL),
        Some(_) => {
            *next_retry_at = None;
            Duration::ZERO
        }
        None => POLL_INTERVAL,
    }
}

/// Starts an attempt for each due delivery while attempt slots are free.
async fn start_due_attempts(inner: &Arc<Inner>) {
    loop {
        let free = inner.slots.available_permits();
        if free == 0 || inner.shutdown.is_cancelled() {
            return;
        }
        // Busy deliveries may be among the due ones, so ask for more.
        let limit = free + inner.busy.lock().len();
        let due = match inner
            .metadata
            .due_action_deliveries(now_ms(), limit as i64)
            .await
        {
            Ok(due) => due,
            Err(error) => {
                warn_database(inner, &error);
                return;
            }
        };
        let fetched = due.len();

        let mut started = 0;
        for delivery in due {
            let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
                break;
            };
            if !inner.busy.lock().insert(delivery.id) {
                continue;
            }
            inner
                .tasks
                .spawn(run_attempt(inner.clone(), delivery, permit));
            started += 1;
        }
        if started == 0 || fetched < limit {
            return;
        }
    }
}

/// Runs one attempt of `delivery` and stores its outcome.
async fn run_attempt(inner: Arc<Inner>, due: Delivery, permit: OwnedSemaphorePermit) {
    let Some(delivery) = reread_due(&inner, &due).await else {
        inner.busy.lock().remove(&due.id);
        return;
    };
    let attempt = attempt(&inner, &delivery).await;
    let attempts = delivery.attempts.saturating_add(1);
    let result = inner.policy.after_attempt(
        attempt,
        attempts,
        delivery.started_at,
        now_ms(),
        rand::random::<f64>(),
    );

    if let Err(error) = inner
        .metadata
        .record_action_attempt(delivery.id, &result)
        .await
    {
        // The row keeps its old state and is attempted again.
        warn_database(&inner, &error);
    }
    report(&inner, &delivery, &result);
    if let Some(at) = result.next_attempt_at {
        let mut next_retry_at = inner.next_retry_at.lock();
        *next_retry_at = Some(next_retry_at.map_or(at, |known| known.min(at)));
    }

    inner.busy.lock().remove(&delivery.id);
    drop(permit);
    inner.wake.notify_one();
}

/// Reads the delivery again now that it is marked busy, and returns it if
/// it is still due. The scheduler's read may predate the end of an earlier
/// attempt, whose outcome was written before it left the busy set, so only
/// this read shows the current state.
async fn reread_due(inner: &Inner, due: &Delivery) -> Option<Delivery> {
    match inner.metadata.action_delivery(due.tenant_id, due.id).await {
        Ok(delivery)
            if delivery.status == DeliveryStatus::Pending
                && delivery.next_attempt_at.is_some_and(|at| at <= now_ms()) =>
        {
            Some(delivery)
        }
        Ok(_) | Err(MetadataError::NotFound(_)) => None,
        Err(error) => {
            warn_database(inner, &error);
            None
        }
    }
}

/// Sends the delivery once by its kind.
async fn attempt(inner: &Inner, delivery: &Delivery) -> Attempt {
    let spec: ActionSpec = match serde_json::from_str(&delivery.spec) {
        Ok(spec) => spec,
        Err(error) => {
            return Attempt::Reject {
                error: format!("the stored action is invalid: {error}"),
                status_code: None,
            };
        }
    };
    match &spec {
        ActionSpec::Webhook(webhook) => {
            let Some(body) = body_with_sent_at(&delivery.payload) else {
                return invalid_payload();
            };
            let webhook =
                match super::secrets::open_webhook(&inner.keyring, delivery.tenant_id, webhook) {
                    Ok(webhook) => webhook,
                    Err(error) => {
                        return Attempt::Reject {
                            error,
                            status_code: None,
                        };
                    }
                };
            let request = WebhookRequest {
                spec: &webhook,
                delivery_id: delivery.id,
                event: &delivery.event,
                body,
                timestamp: unix_seconds(),
            };
            webhook::send(&inner.http, request).await
        }
        ActionSpec::MqttPublish(publish) => {
            let Some(body) = body_with_sent_at(&delivery.payload) else {
                return invalid_payload();
            };
            inner
                .mqtt
                .publish(
                    &delivery.target,
                    Bytes::from(body),
                    publish.qos,
                    publish.retain,
                    inner.config.attempt_timeout,
                )
                .await
        }
        ActionSpec::Command(command) => command::send(&inner.router, delivery.device_id, command),
    }
}

fn invalid_payload() -> Attempt {
    Attempt::Reject {
        error: "the stored event is not a JSON object".to_owned(),
        status_code: None,
    }
}

/// Returns the stored event document with `sent_at` (epoch milliseconds)
/// added, as the request body.
fn body_with_sent_at(payload: &str) -> Option<Vec<u8>> {
    let mut document: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(payload).ok()?;
    document.insert("sent_at".to_owned(), now_ms().into());
    serde_json::to_vec(&document).ok()
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Counts the attempt and logs it: failures that end a delivery as
/// warnings (rate-limited), the rest at debug level.
fn report(inner: &Inner, delivery: &Delivery, result: &crate::metadata::AttemptResult) {
    let outcome = match result.status {
        DeliveryStatus::Succeeded => Outcome::Succeeded,
        DeliveryStatus::Pending => Outcome::Retrying,
        DeliveryStatus::Failed => Outcome::Failed,
    };
    events::attempt_finished(delivery.kind, outcome);
    let error = result.last_error.as_deref().unwrap_or("");
    match outcome {
        Outcome::Succeeded => tracing::debug!(
            delivery_id = %delivery.id,
            kind = delivery.kind.as_str(),
            attempts = result.attempts,
            "delivered an alarm action"
        ),
        Outcome::Retrying => tracing::debug!(
            delivery_id = %delivery.id,
            kind = delivery.kind.as_str(),
            attempts = result.attempts,
            next_attempt_at = result.next_attempt_at,
            error,
            "alarm action attempt failed; retrying later"
        ),
        Outcome::Failed => {
            let allowed = inner.failure_warnings.lock().allow(Instant::now());
            if let Some(suppressed) = allowed {
                tracing::warn!(
                    delivery_id = %delivery.id,
                    tenant_id = %delivery.tenant_id,
                    kind = delivery.kind.as_str(),
                    target = %delivery.target,
                    attempts = result.attempts,
                    error,
                    suppressed,
                    "alarm action delivery failed; see GET /api/v1/actions/deliveries?status=failed"
                );
            }
        }
    }
}

fn warn_database(inner: &Inner, error: &MetadataError) {
    let allowed = inner.database_warnings.lock().allow(Instant::now());
    if let Some(suppressed) = allowed {
        tracing::warn!(%error, suppressed, "cannot read or update alarm action deliveries; retrying");
    }
}

/// Deletes finished deliveries past their retention every
/// [`CLEANUP_INTERVAL`], until shutdown.
async fn delete_old_deliveries(inner: Arc<Inner>) {
    let mut ticker = tokio::time::interval(CLEANUP_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = inner.shutdown.cancelled() => return,
        }
        let now = now_ms();
        let age_ms = |retention: Duration| i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let deleted = inner
            .metadata
            .delete_finished_action_deliveries(
                now.saturating_sub(age_ms(inner.config.succeeded_retention)),
                now.saturating_sub(age_ms(inner.config.failed_retention)),
            )
            .await;
        match deleted {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "deleted old alarm action deliveries"),
            Err(error) => warn_database(&inner, &error),
        }
    }
}
