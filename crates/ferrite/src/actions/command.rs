//! One attempt of a `command` action: an RPC request to the alarm's device
//! over Ferrite's MQTT server, as ThingsBoard sends them
//! (`v1/devices/me/rpc/request/{request_id}` with `{"method", "params"}`).
//!
//! The attempt succeeds when a session of the device took the request or,
//! offline but persistent, queued it. It does not wait for the device's
//! response. A device without a subscribed session is retried, because it
//! may connect later.

use super::retry::Attempt;
use super::spec::CommandSpec;
use crate::adapters::mqtt::Router;
use crate::ids::DeviceId;

pub fn send(router: &Router, device_id: DeviceId, spec: &CommandSpec) -> Attempt {
    match router.send_rpc_request(device_id, &spec.method, &spec.params) {
        Ok(request_id) => {
            tracing::debug!(%device_id, request_id, method = %spec.method, "sent an alarm command to the device");
            Attempt::Delivered { status_code: None }
        }
        Err(error) => Attempt::Retry {
            error: format!("device {device_id}: {error}"),
            status_code: None,
            retry_after: None,
        },
    }
}
