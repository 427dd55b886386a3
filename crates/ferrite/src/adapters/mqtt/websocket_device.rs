//! Sessions of devices on the device WebSocket (`GET /api/v1/devices/ws`).
//!
//! Such a device has no MQTT connection, but it gets an MQTT session in the
//! router, subscribed to `v1/devices/me/rpc/request/+`. Commands and RPC
//! requests ([`super::Router::call_device`], [`super::Router::send_rpc_request`])
//! therefore reach it through the same delivery channel as an MQTT
//! connection, and its responses go through [`super::Router`] like a
//! publish on `rpc/response/{id}`.
//!
//! The session has a random client id under `$ws/`, which MQTT clients do
//! not use by accident, and expiry 0: it ends when the socket closes.

use std::time::Instant;

use bytes::Bytes;
use mqtt5_protocol::QoS;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Router;
use super::rpc::{REQUEST_SUFFIX, RESPONSE_SUFFIX};
use super::session::{
    Attach, AttachRequest, ClientId, DeliveryState, Outgoing, Owner, RoutedMessage, Subscription,
};
use crate::ids::{DeviceId, TenantId};

/// Topic prefix of the device's own namespace, as the session subscribes.
const NAMESPACE_PREFIX: &str = "v1/devices/me/";

/// A command for the device: an RPC request from the router.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCommand {
    pub request_id: u32,
    pub method: String,
    pub params: serde_json::Value,
}

/// The body of an RPC request, as `Router` publishes it.
#[derive(Deserialize)]
struct RequestBody {
    method: String,
    #[serde(default)]
    params: serde_json::Value,
}

/// The router session of one device WebSocket. Dropping it ends the
/// session.
pub struct DeviceReceiver {
    router: Router,
    device_id: DeviceId,
    client_id: ClientId,
    generation: u64,
    deliveries: mpsc::Receiver<Box<Outgoing>>,
    /// Cancelled when the session is taken away from this socket.
    takeover: CancellationToken,
    finished: CancellationToken,
}

impl DeviceReceiver {
    /// Starts a session of `device_id` subscribed to its RPC requests.
    pub fn attach(router: &Router, device_id: DeviceId, tenant_id: TenantId) -> Self {
        let client_id = ClientId::new(&format!("$ws/{}", uuid::Uuid::new_v4()));
        let request = AttachRequest {
            client_id: client_id.clone(),
            owner: Owner::Device {
                device_id,
                tenant_id,
            },
            clean_start: true,
            expiry: std::time::Duration::ZERO,
            // The client id is new, so no other connection is attached to it.
            force: true,
        };
        let attached = match router.sessions().attach(&request, Instant::now()) {
            Attach::Attached(attached) => attached,
            Attach::Wait { .. } | Attach::Conflict => {
                unreachable!("the client id is new, so nobody else holds its session")
            }
        };

        let filter = format!("{NAMESPACE_PREFIX}{REQUEST_SUFFIX}+");
        let subscription = Subscription {
            suffix_filter: filter[NAMESPACE_PREFIX.len()..].to_owned(),
            prefix_len: NAMESPACE_PREFIX.len(),
            filter,
            filter_start: 0,
            shared: false,
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            identifier: None,
        };
        router.subscribe(&client_id, attached.generation, vec![subscription]);

        Self {
            router: router.clone(),
            device_id,
            client_id,
            generation: attached.generation,
            deliveries: attached.deliveries,
            takeover: attached.takeover,
            finished: attached.finished,
        }
    }

    /// Waits for the next command. Returns `None` when the session has
    /// ended, so the socket should close. Messages on the request topic
    /// that are not `{"method", "params"}` are skipped.
    pub async fn next_command(&mut self) -> Option<DeviceCommand> {
        loop {
            let message = tokio::select! {
                message = self.deliveries.recv() => message?,
                () = self.takeover.cancelled() => return None,
            };
            match parse_command(&message) {
                Some(command) => return Some(command),
                None => tracing::debug!(
                    topic = %message.topic,
                    "skipped a message on the RPC request topic that is not a command"
                ),
            }
        }
    }

    /// Hands the device's response to the request that waits for it.
    /// Returns false when no request of this device waits for
    /// `request_id` and no other session of the device subscribed to the
    /// response topic.
    pub fn respond(&self, request_id: u32, payload: Bytes) -> bool {
        let suffix = format!("{RESPONSE_SUFFIX}{request_id}");
        let receivers = self.router.route(
            self.device_id,
            &suffix,
            &RoutedMessage::plain(payload, QoS::AtLeastOnce),
            Some(&self.client_id),
        );
        receivers > 0
    }
}

impl Drop for DeviceReceiver {
    fn drop(&mut self) {
        // Expiry 0: the store removes the session at once.
        self.router.sessions().detach(
            &self.client_id,
            self.generation,
            DeliveryState::default(),
            &mut self.deliveries,
            None,
            Instant::now(),
        );
        self.finished.cancel();
    }
}

fn parse_command(message: &Outgoing) -> Option<DeviceCommand> {
    let request_id = message
        .topic
        .strip_prefix(NAMESPACE_PREFIX)?
        .strip_prefix(REQUEST_SUFFIX)?
        .parse()
        .ok()?;
    let body: RequestBody = serde_json::from_slice(&message.payload).ok()?;
    Some(DeviceCommand {
        request_id,
        method: body.method,
        params: body.params,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::MqttConfig;

    #[tokio::test]
    async fn command_reaches_the_receiver_and_response_completes() {
        let router = Router::new(&MqttConfig::default());
        let device = DeviceId::new_random();
        let mut receiver = DeviceReceiver::attach(&router, device, TenantId::new_random());
        assert!(router.is_device_connected(device));

        let pending = router
            .call_device(device, "reboot", &serde_json::json!({"delay": 5}))
            .expect("command sent");
        let command = receiver.next_command().await.expect("a command");
        assert_eq!(command.request_id, pending.request_id());
        assert_eq!(command.method, "reboot");
        assert_eq!(command.params, serde_json::json!({"delay": 5}));

        assert!(receiver.respond(command.request_id, Bytes::from_static(b"{\"ok\":true}")));
        let response = pending.wait(Duration::from_secs(1)).await;
        assert_eq!(response.as_deref(), Some(&b"{\"ok\":true}"[..]));
    }

    #[tokio::test]
    async fn response_without_waiting_request_is_not_delivered() {
        let router = Router::new(&MqttConfig::default());
        let receiver =
            DeviceReceiver::attach(&router, DeviceId::new_random(), TenantId::new_random());

        assert!(!receiver.respond(12345, Bytes::from_static(b"{}")));
    }

    #[test]
    fn dropped_receiver_ends_the_session() {
        let router = Router::new(&MqttConfig::default());
        let device = DeviceId::new_random();
        let receiver = DeviceReceiver::attach(&router, device, TenantId::new_random());
        drop(receiver);

        assert!(!router.is_device_connected(device));
        assert!(router.sessions().sessions.is_empty());
    }
}
