//! Optional encryption of block payloads under per-tenant keys.
//!
//! The store has no keys of its own. The caller passes a [`BlockCipher`] in
//! [`crate::StoreOptions::cipher`], and the segment writer seals every block
//! payload under the key of the series' tenant. A sealed payload starts with
//! a zero byte, which no plain payload can start with (a plain payload
//! starts with its point count, a varint of at least 1):
//!
//! ```text
//! sealed payload: 0 u8 | tenant string | cipher output
//! ```
//!
//! The associated data binds the block to the segment's sequence number
//! (unique across raw and rollup tiers), its offset in the file and its index summary (count and time
//! range), so a block copied to another place fails to open. Plain and
//! sealed blocks can sit side by side, so the cipher can be set for a store
//! whose files were written without it, and compaction seals what it
//! rewrites.
//!
//! A block whose tenant key is gone (the tenant was deleted) or that fails
//! to open is skipped by queries and compaction and counted in
//! [`crate::Store::unreadable_blocks`]. Compaction drops such blocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ferrite_core::TimestampNs;

use crate::encoding::put_bytes;

/// First payload byte of a sealed block.
pub(crate) const SEALED_TAG: u8 = 0;

/// Error of a sealed block that cannot be opened: its tenant key is gone,
/// or the cipher output failed authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreadable(pub String);

/// Error of a block payload that cannot be sealed, for example because
/// the tenant has no key any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SealError(pub String);

/// Authenticated encryption of block payloads with a key per tenant.
///
/// `tenant` is the tenant name of the series, as given to
/// [`crate::Store::write`]. `aad` is associated data that `open` must be
/// given unchanged. Implementations are called from flush, compaction and
/// query threads, never from an async task.
pub trait BlockCipher: Send + Sync {
    fn seal(&self, tenant: &str, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError>;
    fn open(&self, tenant: &str, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, Unreadable>;
}

/// The cipher of a store, if any, and the counters of blocks it could not
/// handle. Every segment of a store shares one.
#[derive(Default)]
pub(crate) struct Sealing {
    pub(crate) cipher: Option<Arc<dyn BlockCipher>>,
    /// Seals new blocks with `cipher`; otherwise it only opens them.
    pub(crate) seal_writes: bool,
    /// Blocks that queries or compaction skipped because they did not open.
    pub(crate) unreadable_blocks: AtomicU64,
    /// Series whose points a flush or compaction dropped because their
    /// tenant had no key to seal them with.
    pub(crate) unsealable_series: AtomicU64,
}

impl Sealing {
    pub(crate) fn new(cipher: Option<Arc<dyn BlockCipher>>, seal_writes: bool) -> Arc<Sealing> {
        Arc::new(Sealing {
            cipher,
            seal_writes,
            ..Sealing::default()
        })
    }

    /// Returns the cipher that seals new blocks, if any.
    pub(crate) fn write_cipher(&self) -> Option<&dyn BlockCipher> {
        self.cipher.as_deref().filter(|_| self.seal_writes)
    }

    pub(crate) fn note_unreadable(&self) {
        self.unreadable_blocks.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn note_unsealable(&self) {
        self.unsealable_series.fetch_add(1, Ordering::Relaxed);
    }
}

/// Location of a block and its index summary, which the associated data
/// binds.
pub(crate) struct BlockPlace {
    /// Sequence number of the segment, unique across tiers.
    pub(crate) seq: u64,
    pub(crate) offset: u64,
    pub(crate) count: u32,
    pub(crate) min_ts: TimestampNs,
    pub(crate) max_ts: TimestampNs,
}

impl BlockPlace {
    /// Associated data of the block at this place.
    pub(crate) fn aad(&self) -> Vec<u8> {
        let mut aad = Vec::with_capacity(48);
        aad.extend_from_slice(b"ferrite-tsdb block 1");
        aad.extend_from_slice(&self.seq.to_le_bytes());
        aad.extend_from_slice(&self.offset.to_le_bytes());
        aad.extend_from_slice(&self.count.to_le_bytes());
        aad.extend_from_slice(&self.min_ts.to_le_bytes());
        aad.extend_from_slice(&self.max_ts.to_le_bytes());
        aad
    }
}

/// Builds a sealed payload: the tag, the tenant and the cipher output.
pub(crate) fn seal_payload(
    cipher: &dyn BlockCipher,
    tenant: &str,
    plain: &[u8],
    place: &BlockPlace,
) -> Result<Vec<u8>, SealError> {
    let sealed = cipher.seal(tenant, plain, &place.aad())?;
    let mut payload = Vec::with_capacity(sealed.len() + tenant.len() + 4);
    payload.push(SEALED_TAG);
    put_bytes(&mut payload, tenant.as_bytes());
    payload.extend_from_slice(&sealed);
    Ok(payload)
}

/// Opens a sealed payload (one that starts with [`SEALED_TAG`]) and returns
/// the plain payload.
pub(crate) fn open_payload(
    cipher: Option<&dyn BlockCipher>,
    payload: &[u8],
    place: &BlockPlace,
) -> Result<Vec<u8>, Unreadable> {
    let mut reader = crate::encoding::Reader::new(&payload[1..]);
    let tenant = reader
        .len()
        .and_then(|len| reader.take(len))
        .ok()
        .and_then(|bytes| std::str::from_utf8(bytes).ok())
        .ok_or_else(|| Unreadable("sealed block has an invalid tenant name".to_owned()))?;
    let Some(cipher) = cipher else {
        return Err(Unreadable(format!(
            "block of tenant {tenant:?} is sealed but the store has no cipher"
        )));
    };
    let sealed = reader.rest();
    cipher.open(tenant, sealed, &place.aad())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// XOR with the key byte and a CRC-32 tag over key, associated data
    /// and plain text: enough to tell a changed byte or a wrong place.
    struct XorCipher;

    impl XorCipher {
        fn key(tenant: &str) -> Option<u8> {
            (tenant == "t1").then_some(0x5A)
        }

        fn tag(key: u8, aad: &[u8], plain: &[u8]) -> [u8; 4] {
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&[key]);
            hasher.update(aad);
            hasher.update(plain);
            hasher.finalize().to_le_bytes()
        }
    }

    impl BlockCipher for XorCipher {
        fn seal(&self, tenant: &str, plain: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
            let key = XorCipher::key(tenant).ok_or_else(|| SealError("no key".to_owned()))?;
            let mut sealed: Vec<u8> = plain.iter().map(|byte| byte ^ key).collect();
            sealed.extend_from_slice(&XorCipher::tag(key, aad, plain));
            Ok(sealed)
        }

        fn open(&self, tenant: &str, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, Unreadable> {
            let key = XorCipher::key(tenant).ok_or_else(|| Unreadable("no key".to_owned()))?;
            let split = sealed
                .len()
                .checked_sub(4)
                .ok_or_else(|| Unreadable("too short".to_owned()))?;
            let plain: Vec<u8> = sealed[..split].iter().map(|byte| byte ^ key).collect();
            if XorCipher::tag(key, aad, &plain) != sealed[split..] {
                return Err(Unreadable("tag mismatch".to_owned()));
            }
            Ok(plain)
        }
    }

    fn place(offset: u64) -> BlockPlace {
        BlockPlace {
            seq: 7,
            offset,
            count: 3,
            min_ts: 10,
            max_ts: 30,
        }
    }

    #[test]
    fn sealed_payload_round_trip() {
        let plain = b"\x03columns of three points";
        let sealed = seal_payload(&XorCipher, "t1", plain, &place(32)).unwrap();
        assert_eq!(sealed[0], SEALED_TAG);
        assert!(!sealed.windows(7).any(|window| window == b"columns"));
        let opened = open_payload(Some(&XorCipher), &sealed, &place(32)).unwrap();
        assert_eq!(opened, plain);
    }

    #[test]
    fn tampered_payload_rejected() {
        let sealed = seal_payload(&XorCipher, "t1", b"\x01plain", &place(32)).unwrap();
        let mut tampered = sealed.clone();
        let last = tampered.len() - 6;
        tampered[last] ^= 1;
        assert!(open_payload(Some(&XorCipher), &tampered, &place(32)).is_err());
    }

    #[test]
    fn moved_payload_rejected() {
        let sealed = seal_payload(&XorCipher, "t1", b"\x01plain", &place(32)).unwrap();
        let moved = open_payload(Some(&XorCipher), &sealed, &place(64));
        assert!(
            moved.is_err(),
            "a block copied to another offset must not open"
        );
    }

    #[test]
    fn payload_without_key_unreadable() {
        assert!(seal_payload(&XorCipher, "t2", b"\x01plain", &place(32)).is_err());
        let sealed = seal_payload(&XorCipher, "t1", b"\x01plain", &place(32)).unwrap();
        assert!(open_payload(None, &sealed, &place(32)).is_err());
        let mut other_tenant = vec![SEALED_TAG];
        crate::encoding::put_bytes(&mut other_tenant, b"t2");
        other_tenant.extend_from_slice(&sealed[4..]);
        assert!(open_payload(Some(&XorCipher), &other_tenant, &place(32)).is_err());
    }
}
