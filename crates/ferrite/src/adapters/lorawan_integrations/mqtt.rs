//! A client of the MQTT broker that ChirpStack's MQTT integration
//! publishes to (`[lorawan.chirpstack_mqtt]`), for uplink events in JSON on
//! `application/{application id}/device/{DevEUI}/event/up`.
//!
//! Two tasks share one `rumqttc` client. The connection task polls the
//! event loop, subscribes with QoS 1 after every CONNACK, reconnects with
//! exponential backoff, and hands each PUBLISH to the ingest task over a
//! bounded channel. The ingest task stores the uplinks one at a time, in
//! the order they arrived, and only then sends the PUBACK (manual acks).
//! The session is persistent (clean session off, fixed client id), so the
//! broker delivers again a message that was not yet acknowledged when the
//! connection dropped. The table of recent uplinks drops the repeat. This
//! needs ChirpStack to publish with QoS 1
//! (`[integration.mqtt] qos = 1`; its default is 0): a QoS 0 message is
//! neither acknowledged nor kept for an offline session.
//!
//! A message that can never be stored (invalid JSON, unknown DevEUI) is
//! acknowledged and counted, because the broker would only deliver it
//! again. A message that fails for a transient reason (ingest log full,
//! database error) is retried until it is stored or Ferrite shuts down,
//! which holds back the messages behind it. Shutdown leaves unacknowledged
//! messages in the broker's session for the next start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{IntegrationContext, NetworkServer, TenantScope, chirpstack, count_delivery};
use crate::config::{BrokerAddress, ChirpstackMqttConfig};
use crate::warn_limit::WarnLimiter;

/// Messages waiting for the ingest task. The broker sends no more than its
/// in-flight limit for QoS 1 anyway (20 by default in Mosquitto).
const QUEUE: usize = 64;
/// Requests (PUBACKs, SUBSCRIBE) waiting for the event loop.
const CLIENT_QUEUE: usize = 64;
/// Largest MQTT packet accepted; an event with many gateways stays far
/// below it.
const MAX_PACKET_BYTES: usize = 1024 * 1024;
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(60);
/// Time to send DISCONNECT at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts both tasks; they end when `shutdown` is cancelled. `broker` is
/// the parsed `config.url`.
pub fn start(
    config: ChirpstackMqttConfig,
    broker: BrokerAddress,
    scope: TenantScope,
    context: Arc<IntegrationContext>,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut options = MqttOptions::new(config.client_id.clone(), broker.host.clone(), broker.port);
    options
        .set_keep_alive(config.keep_alive)
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if !config.username.is_empty() {
        options.set_credentials(&config.username, &config.password);
    }
    let (client, event_loop) = AsyncClient::new(options, CLIENT_QUEUE);
    let (publishes, received) = mpsc::channel(QUEUE);

    tracing::info!(
        host = %broker.host,
        port = broker.port,
        topic_filter = %config.topic_filter,
        client_id = %config.client_id,
        "starting the ChirpStack MQTT integration"
    );
    let connection = Connection {
        client: client.clone(),
        topic_filter: config.topic_filter.clone(),
        broker,
        publishes,
    };
    let ingest = IngestTask {
        client,
        scope,
        context,
        warnings: Mutex::new(WarnLimiter::default()),
    };
    vec![
        tokio::spawn(connection.run(event_loop, shutdown.clone())),
        tokio::spawn(ingest.run(received, shutdown)),
    ]
}

struct Connection {
    client: AsyncClient,
    topic_filter: String,
    broker: BrokerAddress,
    publishes: mpsc::Sender<Publish>,
}

impl Connection {
    async fn run(self, mut event_loop: EventLoop, shutdown: CancellationToken) {
        let mut retry_delay = FIRST_RETRY_DELAY;
        let mut warnings = WarnLimiter::default();
        loop {
            let event = tokio::select! {
                event = event_loop.poll() => event,
                () = shutdown.cancelled() => break,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    retry_delay = FIRST_RETRY_DELAY;
                    tracing::info!(
                        host = %self.broker.host,
                        port = self.broker.port,
                        session_present = ack.session_present,
                        "connected to the ChirpStack MQTT broker"
                    );
                    // The persistent session keeps the subscription, but a
                    // broker that lost its sessions needs it again.
                    if let Err(error) = self
                        .client
                        .try_subscribe(self.topic_filter.clone(), QoS::AtLeastOnce)
                    {
                        tracing::warn!(%error, topic_filter = %self.topic_filter, "cannot subscribe to ChirpStack events");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let rejected = ack
                        .return_codes
                        .iter()
                        .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure));
                    if rejected {
                        tracing::error!(topic_filter = %self.topic_filter, "the broker rejected the subscription to ChirpStack events; check the topic filter and the user's access rights");
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let sent = tokio::select! {
                        sent = self.publishes.send(publish) => sent.is_ok(),
                        () = shutdown.cancelled() => false,
                    };
                    if !sent {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    if let Some(suppressed) = warnings.allow(Instant::now()) {
                        tracing::warn!(
                            host = %self.broker.host,
                            port = self.broker.port,
                            %error,
                            retry_in = ?retry_delay,
                            suppressed,
                            "the connection to the ChirpStack MQTT broker failed; reconnecting"
                        );
                    }
                    tokio::select! {
                        () = tokio::time::sleep(retry_delay) => {}
                        () = shutdown.cancelled() => break,
                    }
                    retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                }
            }
        }
        self.disconnect(event_loop).await;
        tracing::info!("stopped the ChirpStack MQTT integration");
    }

    /// Sends DISCONNECT, so the broker keeps the session without waiting
    /// for the keep-alive to expire.
    async fn disconnect(&self, mut event_loop: EventLoop) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

struct IngestTask {
    client: AsyncClient,
    scope: TenantScope,
    context: Arc<IntegrationContext>,
    warnings: Mutex<WarnLimiter>,
}

impl IngestTask {
    async fn run(self, mut received: mpsc::Receiver<Publish>, shutdown: CancellationToken) {
        while let Some(publish) = tokio::select! {
            publish = received.recv() => publish,
            () = shutdown.cancelled() => None,
        } {
            if !self.handle(&publish, &shutdown).await {
                // Shutting down before the message was stored: no PUBACK,
                // so the broker delivers it again at the next start.
                return;
            }
            if let Err(error) = self.client.ack(&publish).await {
                tracing::debug!(%error, "cannot acknowledge a ChirpStack event");
            }
        }
    }

    /// Stores one message, retrying transient failures. Returns false when
    /// shutdown interrupted it before the message was dealt with.
    async fn handle(&self, publish: &Publish, shutdown: &CancellationToken) -> bool {
        let network_server = NetworkServer::ChirpStack.as_str();
        if !publish.topic.ends_with("/event/up") {
            // A broader topic filter also brings other event types.
            count_delivery(network_server, "mqtt", "ignored");
            return true;
        }
        let uplink = match chirpstack::parse_uplink(&publish.payload) {
            Ok(uplink) => uplink,
            Err(error) => {
                count_delivery(network_server, "mqtt", "invalid");
                self.warn(&publish.topic, &error.to_string());
                return true;
            }
        };

        let mut retry_delay = FIRST_RETRY_DELAY;
        loop {
            match self.context.accept(&uplink, self.scope).await {
                Ok(accepted) => {
                    count_delivery(network_server, "mqtt", accepted.outcome());
                    return true;
                }
                Err(error) if error.is_transient() => {
                    count_delivery(network_server, "mqtt", error.outcome());
                    self.warn(
                        &publish.topic,
                        &format!("{error}; retrying in {retry_delay:?}"),
                    );
                }
                Err(error) => {
                    count_delivery(network_server, "mqtt", error.outcome());
                    self.warn(&publish.topic, &error.to_string());
                    return true;
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry_delay) => {}
                () = shutdown.cancelled() => return false,
            }
            retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
        }
    }

    fn warn(&self, topic: &str, error: &str) {
        if let Some(suppressed) = self.warnings.lock().allow(Instant::now()) {
            tracing::warn!(
                topic,
                error,
                suppressed,
                "cannot store a ChirpStack uplink from MQTT"
            );
        }
    }
}
