//! Server-side RPC to devices in the style of ThingsBoard's MQTT device
//! API. Ferrite publishes `{"method", "params"}` to
//! `v1/devices/me/rpc/request/{request_id}`, and a device responds by
//! publishing to `v1/devices/me/rpc/response/{request_id}`.
//!
//! Request ids are decimal integers, because firmware written for
//! ThingsBoard often parses them as numbers. They start at a random value
//! below 2^30 and count up, so a late response from before a restart is
//! unlikely to match a new request.
//!
//! A caller that waits for the response registers a [`PendingResponse`]
//! before it sends. [`super::Router`] hands a device's publish on its
//! response topic to the waiting request instead of routing it to the
//! device's own subscribers. A response that no request waits for is
//! routed like any other publish of the device.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::ids::DeviceId;

/// Topic suffix of requests to a device, before the request id.
pub const REQUEST_SUFFIX: &str = "rpc/request/";
/// Topic suffix of a device's responses, before the request id.
pub const RESPONSE_SUFFIX: &str = "rpc/response/";

/// Requests that wait for a device's response, by device and request id.
#[derive(Debug)]
pub(super) struct PendingRequests {
    waiting: Mutex<HashMap<(DeviceId, u32), oneshot::Sender<Bytes>>>,
    next_id: AtomicU32,
}

impl Default for PendingRequests {
    fn default() -> Self {
        Self {
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(rand::random_range(1..1 << 30)),
        }
    }
}

impl PendingRequests {
    /// Returns a new request id, never 0.
    pub(super) fn next_request_id(&self) -> u32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if id != 0 {
                return id;
            }
        }
    }

    /// Registers a wait for the response of `device_id` to `request_id`.
    pub(super) fn register(
        self: &Arc<Self>,
        device_id: DeviceId,
        request_id: u32,
    ) -> PendingResponse {
        let (sender, receiver) = oneshot::channel();
        self.waiting.lock().insert((device_id, request_id), sender);
        PendingResponse {
            request_id,
            receiver,
            registration: Registration {
                requests: self.clone(),
                key: (device_id, request_id),
            },
        }
    }

    /// Hands a device's publish on `suffix` to the request waiting for it.
    /// Returns false when `suffix` is no response topic or no request waits.
    pub(super) fn complete(&self, device_id: DeviceId, suffix: &str, payload: &Bytes) -> bool {
        let Some(request_id) = suffix
            .strip_prefix(RESPONSE_SUFFIX)
            .and_then(|id| id.parse::<u32>().ok())
        else {
            return false;
        };
        let Some(sender) = self.waiting.lock().remove(&(device_id, request_id)) else {
            return false;
        };
        // The receiver is gone only when the request stopped waiting this
        // very moment; the response is then dropped like a late one.
        let _ = sender.send(payload.clone());
        true
    }
}

/// Removes the registration when the waiting request ends in any way.
#[derive(Debug)]
struct Registration {
    requests: Arc<PendingRequests>,
    key: (DeviceId, u32),
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.requests.waiting.lock().remove(&self.key);
    }
}

/// A registered wait for one response.
#[derive(Debug)]
pub struct PendingResponse {
    request_id: u32,
    receiver: oneshot::Receiver<Bytes>,
    registration: Registration,
}

impl PendingResponse {
    pub fn request_id(&self) -> u32 {
        self.request_id
    }

    /// Waits up to `timeout` for the device's response payload; `None`
    /// when it does not arrive in time.
    pub async fn wait(self, timeout: Duration) -> Option<Bytes> {
        let PendingResponse {
            receiver,
            registration,
            ..
        } = self;
        let response = tokio::time::timeout(timeout, receiver).await;
        drop(registration);
        response.ok().and_then(Result::ok)
    }
}

/// Error of sending an RPC request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RpcSendError {
    #[error("the device has no open MQTT connection or device WebSocket")]
    NotConnected,
    #[error(
        "the device has no MQTT session subscribed to v1/devices/me/rpc/request/+ (or devices/{{id}}/rpc/request/+)"
    )]
    NotSubscribed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn response_reaches_the_waiting_request() {
        let requests = Arc::new(PendingRequests::default());
        let device = DeviceId::new_random();
        let pending = requests.register(device, 42);

        assert!(!requests.complete(device, "rpc/response/41", &Bytes::from_static(b"x")));
        assert!(!requests.complete(DeviceId::new_random(), "rpc/response/42", &Bytes::new()));
        assert!(!requests.complete(device, "rpc/request/42", &Bytes::new()));
        assert!(requests.complete(device, "rpc/response/42", &Bytes::from_static(b"{}")));

        let response = pending.wait(Duration::from_secs(1)).await;
        assert_eq!(response.as_deref(), Some(&b"{}"[..]));
        assert!(requests.waiting.lock().is_empty());
    }

    #[tokio::test]
    async fn timed_out_request_unregisters() {
        let requests = Arc::new(PendingRequests::default());
        let device = DeviceId::new_random();
        let pending = requests.register(device, 7);

        assert_eq!(pending.wait(Duration::from_millis(10)).await, None);
        assert!(requests.waiting.lock().is_empty());
        assert!(!requests.complete(device, "rpc/response/7", &Bytes::new()));
    }

    #[test]
    fn request_ids_are_positive_and_distinct() {
        let requests = PendingRequests::default();
        requests.next_id.store(u32::MAX, Ordering::Relaxed);
        let first = requests.next_request_id();
        let second = requests.next_request_id();
        assert_ne!(first, 0);
        assert_ne!(second, 0);
        assert_ne!(first, second);
        assert!(first <= i32::MAX as u32, "{first}");
        assert!(second <= i32::MAX as u32, "{second}");
    }
}
