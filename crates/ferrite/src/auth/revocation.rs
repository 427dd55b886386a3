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
use tokio::sync::broadcast::error::RecvError;

use crate::ids::{ApiKeyId, DeviceId, ServiceAccountId, TenantId, UserId};

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
    /// One client certificate, or a device CA and every certificate that
    /// chains to it, by its SHA-256 fingerprint.
    Certificate([u8; 32]),
    /// The device's DTLS pre-shared key was replaced or deleted. Its
    /// access tokens and certificates stay valid.
    PreSharedKey(DeviceId),
    /// An API key, by id and by the SHA-256 hash of the key.
    ApiKey {
        id: ApiKeyId,
        hash: Option<[u8; 32]>,
    },
    /// A user was deleted, disabled or logged out everywhere.
    // NOTE: nothing publishes this event yet; connections already match it.
    #[allow(dead_code)]
    User(UserId),
    /// A service account was revoked: the access tokens it was issued.
    ServiceAccount(ServiceAccountId),
    /// A tenant was deleted: everything inside it.
    // NOTE: nothing publishes this event yet; connections already match it.
    #[allow(dead_code)]
    Tenant(TenantId),
}

/// Names the revoked thing for logs; hashes and fingerprints by their
/// first 4 bytes, as elsewhere in the logs.
impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Revoked::Device(id) => write!(f, "device {id}"),
            Revoked::DeviceToken(hash) => write!(f, "device token {}", hex::encode(&hash[..4])),
            Revoked::Certificate(fingerprint) => {
                write!(f, "certificate {}", hex::encode(&fingerprint[..4]))
            }
            Revoked::PreSharedKey(id) => write!(f, "pre-shared key of device {id}"),
            Revoked::ApiKey { id, .. } => write!(f, "API key {id}"),
            Revoked::User(id) => write!(f, "user {id}"),
            Revoked::ServiceAccount(id) => write!(f, "service account {id}"),
            Revoked::Tenant(id) => write!(f, "tenant {id}"),
        }
    }
}

/// The credentials, device and tenant of a connection, matched against
/// [`Revoked`] events.
#[derive(Debug, Clone, Default)]
pub struct HeldAccess {
    pub tenant: Option<TenantId>,
    pub device: Option<DeviceId>,
    pub device_token: Option<[u8; 32]>,
    pub certificate: Option<[u8; 32]>,
    /// The registered CA that `certificate` chains to, by its SHA-256
    /// fingerprint; deleting the CA publishes its fingerprint.
    pub ca_certificate: Option<[u8; 32]>,
    pub api_key_hash: Option<[u8; 32]>,
    pub api_key_id: Option<ApiKeyId>,
    pub user: Option<UserId>,
    pub service_account: Option<ServiceAccountId>,
    /// The connection authenticated with the pre-shared key of `device`.
    pub pre_shared_key: bool,
}

impl Revoked {
    /// Returns whether this event takes away the access `held` describes.
    pub fn matches(&self, held: &HeldAccess) -> bool {
        match self {
            Revoked::Device(id) => held.device == Some(*id),
            Revoked::DeviceToken(hash) => held.device_token == Some(*hash),
            Revoked::Certificate(fingerprint) => {
                held.certificate == Some(*fingerprint) || held.ca_certificate == Some(*fingerprint)
            }
            Revoked::PreSharedKey(id) => held.pre_shared_key && held.device == Some(*id),
            Revoked::ApiKey { id, hash } => {
                held.api_key_id == Some(*id) || (hash.is_some() && held.api_key_hash == *hash)
            }
            Revoked::User(id) => held.user == Some(*id),
            Revoked::ServiceAccount(id) => held.service_account == Some(*id),
            Revoked::Tenant(id) => held.tenant == Some(*id),
        }
    }
}

/// A signal from [`RevocationWatch::next`] to its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// An event took away the access the connection holds.
    Revoked(Revoked),
    /// The connection missed events and must check its credential again.
    Lagged,
}

/// The revocation events of one connection, filtered by what it holds.
pub struct RevocationWatch {
    receiver: broadcast::Receiver<Revoked>,
    held: HeldAccess,
}

impl RevocationWatch {
    pub fn new(receiver: broadcast::Receiver<Revoked>, held: HeldAccess) -> Self {
        Self { receiver, held }
    }

    /// Waits for an event that matches the held access, or for a lag.
    /// Cancel-safe: a cancelled call loses only events that did not match.
    /// Never returns once the channel is closed, because a closed channel
    /// can carry no more revocations.
    pub async fn next(&mut self) -> Signal {
        loop {
            match self.receiver.recv().await {
                Ok(event) if event.matches(&self.held) => return Signal::Revoked(event),
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "missed revocation events; checking the credential again"
                    );
                    return Signal::Lagged;
                }
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
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
        tracing::debug!(%event, "credential revoked");
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
        assert!(!Revoked::PreSharedKey(device).matches(&held));

        let psk_session = HeldAccess {
            device: Some(device),
            pre_shared_key: true,
            ..HeldAccess::default()
        };
        assert!(Revoked::PreSharedKey(device).matches(&psk_session));
        assert!(!Revoked::PreSharedKey(DeviceId::new_random()).matches(&psk_session));
    }

    #[tokio::test]
    async fn watch_skips_other_events_and_reports_lag() {
        let revocations = Revocations::default();
        let device = DeviceId::new_random();
        let held = HeldAccess {
            device: Some(device),
            ..HeldAccess::default()
        };
        let mut watch = RevocationWatch::new(revocations.subscribe(), held);
        revocations.publish(Revoked::Device(DeviceId::new_random()));
        revocations.publish(Revoked::Device(device));
        assert_eq!(watch.next().await, Signal::Revoked(Revoked::Device(device)));

        for _ in 0..CAPACITY + 1 {
            revocations.publish(Revoked::DeviceToken([1; 32]));
        }
        assert_eq!(watch.next().await, Signal::Lagged);
    }

    #[test]
    fn certificate_event_matches_leaf_and_ca() {
        let held = HeldAccess {
            certificate: Some([1; 32]),
            ca_certificate: Some([2; 32]),
            ..HeldAccess::default()
        };
        assert!(Revoked::Certificate([1; 32]).matches(&held));
        assert!(Revoked::Certificate([2; 32]).matches(&held));
        assert!(!Revoked::Certificate([3; 32]).matches(&held));
    }
}
