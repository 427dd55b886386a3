//! Publishing to the external broker of `[actions.mqtt]` for
//! `mqtt_publish` actions.
//!
//! One task owns the `rumqttc` client and its event loop. It starts at the
//! first publish, connects when a publish needs the connection, and keeps
//! the connection alive between publishes. After a failure it connects
//! again at the next publish, so a broker that is down costs no work while
//! nothing is published.
//!
//! Publishes are sent one at a time: a publish succeeds when the client
//! has written it (QoS 0) or the broker has acknowledged it (QoS 1, PUBACK),
//! and only then does the next one start. That keeps the match between a
//! publish and its packet id simple, at the cost of one round trip per
//! publish, which is plenty for alarm changes. After a failure or timeout
//! the client's queue and session are dropped, so a publish that the
//! delivery retries is not also sent again by the client. A publish whose
//! PUBACK was lost can still reach subscribers twice (QoS 1 is at least
//! once).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::retry::Attempt;
use crate::config::{ActionsMqttConfig, BrokerAddress};

/// Publishes waiting for the publisher task.
const JOB_QUEUE: usize = 64;
/// Largest MQTT packet sent or accepted. rumqttc's default of 10 KiB is
/// too small for an alarm with a large value.
const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Handle to the publisher task, which starts at the first publish.
pub struct MqttPublisher {
    config: ActionsMqttConfig,
    broker: Option<BrokerAddress>,
    jobs: OnceLock<mpsc::Sender<PublishJob>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct PublishJob {
    topic: String,
    payload: Bytes,
    qos: QoS,
    retain: bool,
    deadline: Instant,
    done: oneshot::Sender<Result<(), String>>,
}

impl MqttPublisher {
    /// Creates the handle; `broker` is the parsed `config.url`. The task
    /// runs on `tasks` and ends when `shutdown` is cancelled.
    pub fn new(
        config: ActionsMqttConfig,
        broker: Option<BrokerAddress>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            config,
            broker,
            jobs: OnceLock::new(),
            tasks,
            shutdown,
        }
    }

    /// Publishes `payload` and waits up to `timeout` for the result.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        qos: u8,
        retain: bool,
        timeout: Duration,
    ) -> Attempt {
        let Some(broker) = &self.broker else {
            return Attempt::Reject {
                error: "no MQTT broker is configured for mqtt_publish actions: set actions.mqtt.url, restart, then retry the delivery".to_owned(),
                status_code: None,
            };
        };
        let jobs = self
            .jobs
            .get_or_init(|| self.start_task(broker.clone()))
            .clone();

        let deadline = Instant::now() + timeout;
        let (done, result) = oneshot::channel();
        let job = PublishJob {
            topic: topic.to_owned(),
            payload,
            qos: if qos == 0 {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            },
            retain,
            deadline,
            done,
        };
        let outcome = tokio::time::timeout_at(deadline, async move {
            jobs.send(job)
                .await
                .map_err(|_| "the MQTT publisher has stopped".to_owned())?;
            result
                .await
                .map_err(|_| "the MQTT publisher has stopped".to_owned())?
        })
        .await;
        let error = match outcome {
            Ok(Ok(())) => return Attempt::Delivered { status_code: None },
            Ok(Err(error)) => error,
            Err(_) => format!(
                "timed out after {} waiting for the MQTT broker at {}:{} (actions.attempt_timeout)",
                humantime::format_duration(timeout),
                broker.host,
                broker.port
            ),
        };
        Attempt::Retry {
            error,
            status_code: None,
            retry_after: None,
        }
    }

    fn start_task(&self, broker: BrokerAddress) -> mpsc::Sender<PublishJob> {
        let (sender, receiver) = mpsc::channel(JOB_QUEUE);
        let client_id = if self.config.client_id.is_empty() {
            format!("ferrite-actions-{:08x}", rand::random::<u32>())
        } else {
            self.config.client_id.clone()
        };
        let mut options = MqttOptions::new(client_id, broker.host.clone(), broker.port);
        options
            .set_keep_alive(self.config.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if !self.config.username.is_empty() {
            options.set_credentials(&self.config.username, &self.config.password);
        }
        tracing::info!(host = %broker.host, port = broker.port, "starting the MQTT publisher of alarm actions");
        self.tasks
            .spawn(run_publisher(options, receiver, self.shutdown.clone()));
        sender
    }
}

/// Takes publishes one at a time until `shutdown` is cancelled.
async fn run_publisher(
    options: MqttOptions,
    mut jobs: mpsc::Receiver<PublishJob>,
    shutdown: CancellationToken,
) {
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    let mut connected = false;

    loop {
        // While connected, the event loop also runs between publishes, so
        // that keep-alive pings go out and a lost connection is noticed.
        let job = tokio::select! {
            () = shutdown.cancelled() => break,
            job = jobs.recv() => job,
            event = eventloop.poll(), if connected => {
                if let Err(error) = event {
                    tracing::info!(%error, "lost the connection to the MQTT broker of alarm actions; reconnecting at the next publish");
                    reset(&mut eventloop);
                    connected = false;
                }
                continue;
            }
        };
        let Some(job) = job else {
            break;
        };
        if job.done.is_closed() {
            // The delivery stopped waiting; it will be retried.
            continue;
        }
        let result = publish_one(&client, &mut eventloop, &mut connected, &job).await;
        if result.is_err() {
            reset(&mut eventloop);
            connected = false;
        }
        let _ = job.done.send(result);
    }

    if connected {
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    }
    tracing::debug!("the MQTT publisher of alarm actions stopped");
}

/// Drops the connection, the client's queue and its session state.
fn reset(eventloop: &mut EventLoop) {
    eventloop.clean();
    eventloop.pending.clear();
}

async fn publish_one(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    connected: &mut bool,
    job: &PublishJob,
) -> Result<(), String> {
    // Connect before the publish is queued, so that nothing stays queued
    // in the client for a connection that fails.
    while !*connected {
        match tokio::time::timeout_at(job.deadline, eventloop.poll()).await {
            Err(_) => return Err("timed out connecting to the MQTT broker".to_owned()),
            Ok(Err(error)) => return Err(format!("cannot connect to the MQTT broker: {error}")),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => *connected = true,
            Ok(Ok(_)) => {}
        }
    }

    client
        .try_publish(&job.topic, job.qos, job.retain, job.payload.clone())
        .map_err(|error| format!("cannot queue the publish: {error}"))?;
    let mut packet_id = None;
    loop {
        let event = match tokio::time::timeout_at(job.deadline, eventloop.poll()).await {
            Err(_) => return Err("timed out waiting for the MQTT broker's PUBACK".to_owned()),
            Ok(Err(error)) => {
                return Err(format!("lost the connection to the MQTT broker: {error}"));
            }
            Ok(Ok(event)) => event,
        };
        match event {
            // The client sends queued requests in order, and this is the
            // only one, so the first outgoing PUBLISH is this job's.
            Event::Outgoing(Outgoing::Publish(id)) if packet_id.is_none() => {
                if job.qos == QoS::AtMostOnce {
                    return Ok(());
                }
                packet_id = Some(id);
            }
            Event::Incoming(Packet::PubAck(ack)) if Some(ack.pkid) == packet_id => return Ok(()),
            _ => {}
        }
    }
}
