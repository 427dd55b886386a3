//! Reassembly of Block1 uploads (RFC 7959 section 2.5).
//!
//! An upload is identified by the peer and the request without its token
//! (method, Uri-Path, Uri-Query and Content-Format), because a client may
//! use a new token for each block. Blocks must arrive in order: block 0
//! starts (or restarts) an upload, and a later block must start exactly
//! where the received bytes end. A client may lower the block size during
//! an upload, which keeps that rule true. A gap fails the upload with 4.08.
//!
//! Memory is bounded three ways: the reassembled body by
//! `coap.max_payload_bytes`, the uploads of one peer by
//! `coap.max_block_transfers_per_peer`, and the bytes of all unfinished
//! uploads by `coap.max_block_bytes`. Each upload counts its body plus
//! [`TRANSFER_OVERHEAD_BYTES`], and its key is a fixed-size digest of the
//! request, so no part of a request is held without being counted.
//! Uploads idle for `coap.block_timeout` are dropped by
//! [`BlockStore::remove_idle`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::error::CoapError;
use super::events;
use super::message::BlockValue;

/// Limits of the store, from `[coap]`.
#[derive(Debug, Clone, Copy)]
pub struct BlockLimits {
    pub max_payload_bytes: usize,
    pub max_transfers_per_peer: usize,
    pub max_total_bytes: usize,
    pub idle_timeout: Duration,
}

/// Bytes counted for each upload besides its body: the key, the map entry
/// and the body's allocation header. An estimate from the type sizes, so
/// that many tiny uploads cannot hold far more than `coap.max_block_bytes`.
pub const TRANSFER_OVERHEAD_BYTES: usize = 128;

/// An upload's identity: the peer and the SHA-256 digest of its request
/// without the token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TransferKey {
    peer: SocketAddr,
    request: [u8; 32],
}

impl TransferKey {
    /// Builds the key of `request`, the request formatted without its
    /// token, payload and block options. The digest keeps the key's size
    /// fixed however long the request's options are.
    pub fn new(peer: SocketAddr, request: &str) -> TransferKey {
        use sha2::Digest;
        TransferKey {
            peer,
            request: sha2::Sha256::digest(request.as_bytes()).into(),
        }
    }
}

#[derive(Debug)]
struct Transfer {
    body: Vec<u8>,
    last_activity: Instant,
}

/// The endpoint's next step after a received block.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockOutcome {
    /// Send 2.31 Continue with this Block1 value.
    Continue(BlockValue),
    /// The last block arrived: process the whole body.
    Complete(Vec<u8>),
}

#[derive(Debug)]
pub struct BlockStore {
    limits: BlockLimits,
    transfers: HashMap<TransferKey, Transfer>,
    per_peer: HashMap<SocketAddr, usize>,
    total_bytes: usize,
}

impl BlockStore {
    pub fn new(limits: BlockLimits) -> BlockStore {
        BlockStore {
            limits,
            transfers: HashMap::new(),
            per_peer: HashMap::new(),
            total_bytes: 0,
        }
    }

    /// Adds one block of the upload `key`. `size1` is the total size the
    /// client announced, if any.
    pub fn receive(
        &mut self,
        key: TransferKey,
        block: BlockValue,
        payload: &[u8],
        size1: Option<u32>,
        now: Instant,
    ) -> Result<BlockOutcome, CoapError> {
        let limit = self.limits.max_payload_bytes;
        if let Some(size) = size1.map(|size| size as usize)
            && size > limit
        {
            self.remove(&key);
            return Err(CoapError::RequestEntityTooLarge { size, limit });
        }
        if block.more && payload.len() != block.size() {
            return Err(CoapError::BadRequest(format!(
                "block {} has {} bytes, but a block with more blocks following must have exactly the block size of {} bytes",
                block.num,
                payload.len(),
                block.size()
            )));
        }
        if payload.len() > block.size() {
            return Err(CoapError::BadRequest(format!(
                "block {} has {} bytes, more than its block size of {} bytes",
                block.num,
                payload.len(),
                block.size()
            )));
        }

        if block.num == 0 {
            if self.remove(&key) {
                events::block_transfer_abandoned("replaced");
            }
            if !block.more {
                return Ok(BlockOutcome::Complete(payload.to_vec()));
            }
            self.start(&key, now)?;
        }

        let Some(transfer) = self.transfers.get_mut(&key) else {
            return Err(CoapError::RequestEntityIncomplete(format!(
                "block {} arrived, but no upload of this request is in progress (it timed out or never started); send again from block 0",
                block.num
            )));
        };
        let received = transfer.body.len();
        if block.offset() != received {
            self.remove(&key);
            events::block_transfer_abandoned("gap");
            return Err(CoapError::RequestEntityIncomplete(format!(
                "block {} of {} bytes starts at byte {}, but {received} bytes were received; send again from block 0",
                block.num,
                block.size(),
                block.offset()
            )));
        }
        let size = received + payload.len();
        if size > limit {
            self.remove(&key);
            return Err(CoapError::RequestEntityTooLarge { size, limit });
        }
        if block.more && self.total_bytes + payload.len() > self.limits.max_total_bytes {
            self.remove(&key);
            events::block_transfer_abandoned("limit");
            return Err(CoapError::ServiceUnavailable(
                "too many block-wise uploads are in progress on the server (coap.max_block_bytes); retry later".into(),
            ));
        }

        let transfer = self.transfers.get_mut(&key).expect("checked above");
        transfer.body.extend_from_slice(payload);
        transfer.last_activity = now;
        self.total_bytes += payload.len();
        if block.more {
            return Ok(BlockOutcome::Continue(BlockValue {
                num: block.num,
                more: true,
                szx: block.szx,
            }));
        }
        let transfer = self.take(&key).expect("checked above");
        Ok(BlockOutcome::Complete(transfer.body))
    }

    fn start(&mut self, key: &TransferKey, now: Instant) -> Result<(), CoapError> {
        let count = self.per_peer.entry(key.peer).or_default();
        if *count >= self.limits.max_transfers_per_peer {
            events::block_transfer_abandoned("limit");
            return Err(CoapError::ServiceUnavailable(format!(
                "this client has {count} block-wise uploads in progress, the limit (coap.max_block_transfers_per_peer); finish one first"
            )));
        }
        *count += 1;
        self.total_bytes += TRANSFER_OVERHEAD_BYTES;
        self.transfers.insert(
            key.clone(),
            Transfer {
                body: Vec::new(),
                last_activity: now,
            },
        );
        Ok(())
    }

    fn take(&mut self, key: &TransferKey) -> Option<Transfer> {
        let transfer = self.transfers.remove(key)?;
        self.total_bytes -= transfer.body.len() + TRANSFER_OVERHEAD_BYTES;
        if let Some(count) = self.per_peer.get_mut(&key.peer) {
            *count -= 1;
            if *count == 0 {
                self.per_peer.remove(&key.peer);
            }
        }
        Some(transfer)
    }

    fn remove(&mut self, key: &TransferKey) -> bool {
        self.take(key).is_some()
    }

    /// Drops uploads idle for longer than the timeout; returns how many.
    pub fn remove_idle(&mut self, now: Instant) -> usize {
        let timeout = self.limits.idle_timeout;
        let idle: Vec<TransferKey> = self
            .transfers
            .iter()
            .filter(|(_, transfer)| now.duration_since(transfer.last_activity) > timeout)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &idle {
            self.remove(key);
            events::block_transfer_abandoned("timed_out");
        }
        idle.len()
    }

    /// Bytes counted for unfinished uploads, overhead included.
    #[cfg(test)]
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.transfers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BlockLimits {
        BlockLimits {
            max_payload_bytes: 1024,
            max_transfers_per_peer: 2,
            max_total_bytes: 4096,
            idle_timeout: Duration::from_secs(10),
        }
    }

    fn key(request: &str) -> TransferKey {
        TransferKey::new("127.0.0.1:5000".parse().unwrap(), request)
    }

    fn block(num: u32, more: bool) -> BlockValue {
        BlockValue { num, more, szx: 0 }
    }

    #[test]
    fn blocks_in_order_reassemble() {
        let mut store = BlockStore::new(limits());
        let now = Instant::now();
        let first = store.receive(key("a"), block(0, true), &[1; 16], None, now);
        assert_eq!(first.unwrap(), BlockOutcome::Continue(block(0, true)));
        let second = store.receive(key("a"), block(1, true), &[2; 16], None, now);
        assert_eq!(second.unwrap(), BlockOutcome::Continue(block(1, true)));
        let last = store.receive(key("a"), block(2, false), &[3; 5], None, now);
        let mut expected = vec![1; 16];
        expected.extend([2; 16]);
        expected.extend([3; 5]);
        assert_eq!(last.unwrap(), BlockOutcome::Complete(expected));
        assert_eq!(store.len(), 0);
        assert_eq!(store.total_bytes(), 0);
    }

    #[test]
    fn smaller_block_size_mid_transfer_is_accepted() {
        let mut store = BlockStore::new(limits());
        let now = Instant::now();
        let big = BlockValue {
            num: 0,
            more: true,
            szx: 1,
        };
        store.receive(key("a"), big, &[1; 32], None, now).unwrap();
        // Byte 32 is block 2 at 16 bytes.
        let outcome = store.receive(key("a"), block(2, false), &[2; 4], None, now);
        assert!(matches!(outcome, Ok(BlockOutcome::Complete(body)) if body.len() == 36));
    }

    #[test]
    fn gap_fails_with_incomplete() {
        let mut store = BlockStore::new(limits());
        let now = Instant::now();
        store
            .receive(key("a"), block(0, true), &[1; 16], None, now)
            .unwrap();
        let error = store
            .receive(key("a"), block(2, true), &[1; 16], None, now)
            .unwrap_err();
        assert!(
            matches!(error, CoapError::RequestEntityIncomplete(_)),
            "{error}"
        );
        assert_eq!(store.len(), 0, "the failed upload is freed");
    }

    #[test]
    fn block_without_upload_fails_with_incomplete() {
        let mut store = BlockStore::new(limits());
        let error = store
            .receive(key("a"), block(3, false), &[1; 4], None, Instant::now())
            .unwrap_err();
        assert!(matches!(error, CoapError::RequestEntityIncomplete(_)));
    }

    #[test]
    fn oversized_upload_fails_with_too_large() {
        let mut store = BlockStore::new(limits());
        let now = Instant::now();
        let announced = store.receive(key("a"), block(0, true), &[0; 16], Some(5000), now);
        assert!(matches!(
            announced,
            Err(CoapError::RequestEntityTooLarge {
                size: 5000,
                limit: 1024
            })
        ));

        let big = |num| BlockValue {
            num,
            more: true,
            szx: 6,
        };
        store
            .receive(key("b"), big(0), &[0; 1024], None, now)
            .unwrap();
        let error = store
            .receive(key("b"), big(1), &[0; 1024], None, now)
            .unwrap_err();
        assert!(matches!(
            error,
            CoapError::RequestEntityTooLarge { size: 2048, .. }
        ));
        assert_eq!(store.len(), 0);
    }

    #[test]
    fn uploads_per_peer_are_limited() {
        let mut store = BlockStore::new(limits());
        let now = Instant::now();
        store
            .receive(key("a"), block(0, true), &[0; 16], None, now)
            .unwrap();
        store
            .receive(key("b"), block(0, true), &[0; 16], None, now)
            .unwrap();
        let error = store
            .receive(key("c"), block(0, true), &[0; 16], None, now)
            .unwrap_err();
        assert!(matches!(error, CoapError::ServiceUnavailable(_)));
    }

    #[test]
    fn idle_uploads_are_removed() {
        let mut store = BlockStore::new(limits());
        let start = Instant::now();
        store
            .receive(key("a"), block(0, true), &[0; 16], None, start)
            .unwrap();
        assert_eq!(store.remove_idle(start + Duration::from_secs(5)), 0);
        assert_eq!(store.remove_idle(start + Duration::from_secs(11)), 1);
        assert_eq!(store.total_bytes(), 0);
        let late = store.receive(key("a"), block(1, false), &[0; 4], None, start);
        assert!(matches!(late, Err(CoapError::RequestEntityIncomplete(_))));
    }

    #[test]
    fn uploads_count_their_overhead() {
        let mut store = BlockStore::new(BlockLimits {
            max_transfers_per_peer: 100,
            ..limits()
        });
        let now = Instant::now();
        store
            .receive(key("a"), block(0, true), &[0; 16], None, now)
            .unwrap();
        assert_eq!(store.total_bytes(), 16 + TRANSFER_OVERHEAD_BYTES);

        // 4096 bytes hold 28 uploads of 16 bytes with their overhead, not
        // the 256 that counting bodies alone would allow.
        let accepted = (0..100)
            .map(|index| format!("upload {index}"))
            .filter(|request| {
                store
                    .receive(key(request), block(0, true), &[0; 16], None, now)
                    .is_ok()
            })
            .count();
        assert_eq!(accepted, 4096 / (16 + TRANSFER_OVERHEAD_BYTES) - 1);
        assert!(store.total_bytes() <= 4096);
    }

    #[test]
    fn long_requests_have_fixed_size_keys() {
        let peer = "127.0.0.1:5000".parse().unwrap();
        let short = TransferKey::new(peer, "POST /telemetry? None");
        let long = TransferKey::new(
            peer,
            &format!("POST /telemetry?{} None", "q".repeat(60_000)),
        );
        assert_eq!(std::mem::size_of_val(&short), std::mem::size_of_val(&long));
        assert_ne!(short, long);
    }

    #[test]
    fn wrong_block_length_is_rejected() {
        let mut store = BlockStore::new(limits());
        let error = store
            .receive(key("a"), block(0, true), &[0; 10], None, Instant::now())
            .unwrap_err();
        assert!(matches!(error, CoapError::BadRequest(_)));
    }
}
