//! The listener's view of gateways: which EUIs are registered (cached for
//! [`REGISTERED_TTL`]), the address of each gateway's last PULL_DATA, which
//! is the only address a downlink can be sent to, and when each was last
//! heard from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::metadata::SqliteMetadata;
use crate::metadata::lorawan::LorawanGateway;

/// Time a registered gateway stays cached. A gateway deleted through the
/// API keeps being served for up to this long.
pub const REGISTERED_TTL: Duration = Duration::from_secs(10);
/// Time an unknown EUI stays cached, so that a flood of datagrams with
/// unregistered EUIs costs one database query per EUI and second instead
/// of one per datagram. A gateway registered later waits up to this long.
pub const UNKNOWN_TTL: Duration = Duration::from_secs(1);
/// Maximum unknown EUIs cached; the cache is emptied when it is full, so a
/// flood of distinct EUIs cannot grow it without limit.
const MAX_UNKNOWN: usize = 4096;

/// Address and protocol version of a gateway's last PULL_DATA.
#[derive(Debug, Clone, Copy)]
pub struct PullAddress {
    pub addr: SocketAddr,
    /// Protocol version of the gateway's last PULL_DATA, used in PULL_RESP.
    pub version: u8,
}

#[derive(Default)]
pub struct Gateways {
    registered: Mutex<HashMap<String, (LorawanGateway, Instant)>>,
    /// EUIs found unregistered, with the time of the lookup.
    unknown: Mutex<HashMap<String, Instant>>,
    pull: Mutex<HashMap<String, PullAddress>>,
    /// Last time each gateway was heard from, in epoch milliseconds, until
    /// the next flush to the metadata database.
    seen: Mutex<HashMap<String, i64>>,
}

impl Gateways {
    /// Returns the registered gateway with this EUI (16 lowercase hex
    /// digits), or `None`.
    pub async fn registered(
        &self,
        metadata: &SqliteMetadata,
        gateway_eui: &str,
    ) -> Result<Option<LorawanGateway>, crate::metadata::MetadataError> {
        if let Some((gateway, at)) = self.registered.lock().get(gateway_eui)
            && at.elapsed() < REGISTERED_TTL
        {
            return Ok(Some(gateway.clone()));
        }
        if let Some(at) = self.unknown.lock().get(gateway_eui)
            && at.elapsed() < UNKNOWN_TTL
        {
            return Ok(None);
        }

        let found = metadata.lorawan_gateway(gateway_eui).await?;
        let mut registered = self.registered.lock();
        match &found {
            Some(gateway) => {
                registered.insert(gateway_eui.to_owned(), (gateway.clone(), Instant::now()));
            }
            None => {
                registered.remove(gateway_eui);
                let mut unknown = self.unknown.lock();
                if unknown.len() >= MAX_UNKNOWN {
                    unknown.clear();
                }
                unknown.insert(gateway_eui.to_owned(), Instant::now());
            }
        }
        Ok(found)
    }

    pub fn record_pull(&self, gateway_eui: &str, address: PullAddress) {
        self.pull.lock().insert(gateway_eui.to_owned(), address);
    }

    pub fn pull_address(&self, gateway_eui: &str) -> Option<PullAddress> {
        self.pull.lock().get(gateway_eui).copied()
    }

    pub fn record_seen(&self, gateway_eui: &str, at_ms: i64) {
        self.seen.lock().insert(gateway_eui.to_owned(), at_ms);
    }

    /// Writes last-seen times to the metadata database; a failure keeps
    /// them for the next flush.
    pub async fn flush_seen(&self, metadata: &SqliteMetadata) {
        let pending: Vec<(String, i64)> = self.seen.lock().drain().collect();
        if pending.is_empty() {
            return;
        }
        if let Err(error) = metadata.record_lorawan_gateways_seen(&pending).await {
            tracing::warn!(%error, gateways = pending.len(), "cannot record when LoRaWAN gateways were last seen; retrying later");
            let mut seen = self.seen.lock();
            for (gateway_eui, at) in pending {
                let entry = seen.entry(gateway_eui).or_insert(at);
                *entry = (*entry).max(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::MetadataStore;

    #[tokio::test]
    async fn unknown_eui_cached_briefly() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = SqliteMetadata::open(dir.path()).await.unwrap();
        let tenant = metadata.default_tenant().await.unwrap().id;
        let gateways = Gateways::default();
        let eui = "0102030405060708";

        assert!(gateways.registered(&metadata, eui).await.unwrap().is_none());
        metadata
            .create_lorawan_gateway(tenant, eui, "roof")
            .await
            .unwrap();

        // Within UNKNOWN_TTL the cached result is returned without a query.
        assert!(gateways.registered(&metadata, eui).await.unwrap().is_none());

        tokio::time::sleep(UNKNOWN_TTL).await;
        let found = gateways.registered(&metadata, eui).await.unwrap();
        assert_eq!(
            found.map(|gateway| gateway.gateway_eui).as_deref(),
            Some(eui)
        );
    }
}
