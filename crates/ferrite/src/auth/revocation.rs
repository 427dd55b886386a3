//! Revocation events, so that open connections end at once when their
//! credential, device, user or tenant is revoked or deleted.
//!
//! Every change that takes a credential away publishes a [`Revoked`] event
//! through [`Revocations::publish`]; every long-lived connection (MQTT,
//! WebSockets, live streams, DTLS sessions, CoAP observations) subscribes
//! and ends itself when an event [`Revoked::matches`] what it holds. The
//! periodic re-check of held credentials stays as the fallback for changes
//! made by another process (the CLI, another node).

use tokio::sync::broadcast;

use crate::ids::{ApiKeyId, DeviceId, TenantId, UserId};

/// Events kept for subscribers that are slow to read. A subscriber that
/// falls further behind gets `RecvError::Lagged` and must re-check its
/// credential, because it may have missed an event that concerns it.
const CAPACITY: usize = 1024;

/// Something that no longer grants access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// The device was deleted or all its credentials were taken away.
    Device(DeviceId),
    /// One device access token, by its SHA-256 hash.
    DeviceToken([u8; 32]),
    /// One client certificate, by its SHA-256 fingerprint.
    Certificate([u8; 32]),
    /// An API key, by id and by the SHA-256 hash of the key.
    ApiKey {
        id: ApiKeyId,
        hash: Option<[u8; 32]>,
    },
    /// A user was deleted, disabled or logged out everywhere.
    User(UserId),
    /// A tenant was deleted: everything inside it.
    Tenant(TenantId),
}

/// What a connection holds, to match against [`Revoked`] events.
#[derive(Debug, Clone, Default)]
pub struct HeldAccess {
    pub tenant: Option<TenantId>,
    pub device: Option<DeviceId>,
    pub device_token: Option<[u8; 32]>,
    pub certificate: Option<[u8; 32]>,
    pub api_key_hash: Option<[u8; 32]>,
    pub api_key_id: Option<ApiKeyId>,
    pub user: Option<UserId>,
}

impl Revoked {
    /// Returns whether this event takes away the access `held` describes.
    pub fn matches(&self, held: &HeldAccess) -> bool {
        match self {
            Revoked::Device(id) => held.device == Some(*id),
            Revoked::DeviceToken(hash) => held.device_token == Some(*hash),
            Revoked::Certificate(fingerprint) => held.certificate == Some(*fingerprint),
            Revoked::ApiKey { id, hash } => {
                held.api_key_id == Some(*id) || (hash.is_some() && held.api_key_hash == *hash)
            }
            Revoked::User(id) => held.user == Some(*id),
            Revoked::Tenant(id) => held.tenant == Some(*id),
        }
    }
}

/// The broadcast channel of revocation events of this process.
pub struct Revocations {
    sender: broadcast::Sender<Revoked>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }
}

impl Revocations {
    /// Tells every open connection of this process about `event`.
    pub fn publish(&self, event: Revoked) {
        tracing::debug!(?event, "credential revoked");
        // An error only means that no connection listens.
        let _ = self.sender.send(event);
    }

    /// Receives every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Revoked> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_match_only_what_they_revoke() {
        let device = DeviceId::new_random();
        let held = HeldAccess {
            device: Some(device),
            device_token: Some([7; 32]),
            ..HeldAccess::default()
        };
        assert!(Revoked::Device(device).matches(&held));
        assert!(Revoked::DeviceToken([7; 32]).matches(&held));
        assert!(!Revoked::DeviceToken([8; 32]).matches(&held));
        assert!(!Revoked::Device(DeviceId::new_random()).matches(&held));
        assert!(!Revoked::Certificate([7; 32]).matches(&held));
    }
}
