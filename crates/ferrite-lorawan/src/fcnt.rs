//! The 32-bit uplink frame counter.
//!
//! A LoRaWAN 1.0 device keeps a 32-bit FCntUp but sends only its low 16
//! bits. The network server rebuilds the full value from the last counter
//! it accepted: the counter must grow, and may skip at most `max_gap`
//! frames (MAX_FCNT_GAP is 16384 in LoRaWAN 1.0.0 to 1.0.3). An uplink whose
//! 16 bits are not ahead of the last counter within that gap is a replay or
//! a frame from an older session.

/// MAX_FCNT_GAP of LoRaWAN 1.0.0 to 1.0.3: the most frames that may be lost
/// in a row before the server stops recognizing the device's counter.
pub const MAX_FCNT_GAP: u32 = 16_384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FCntError {
    /// The counter is not ahead of the last accepted one: the frame was
    /// received before, or comes from an older session.
    #[error(
        "frame counter {received} (16 bits) is not ahead of the last accepted counter {last}: replayed or old frame"
    )]
    Replayed { received: u16, last: u32 },
    /// The 32-bit counter is exhausted; the device must join again (OTAA)
    /// or be given new session keys (ABP).
    #[error("the 32-bit frame counter is exhausted after {last}; the session must be renewed")]
    Exhausted { last: u32 },
}

/// Returns the 32-bit counter of an uplink from its 16-bit `received`
/// field and the `last` accepted counter of the session (`None` before the
/// first uplink, in which case the counter is the 16-bit value).
///
/// The received value must be 1 to `max_gap` ahead of the last counter's
/// low 16 bits, counting modulo 2^16. When it is numerically smaller, the
/// 16-bit field rolled over and the counter moves to the next 65536 block.
/// Anything else is rejected.
pub fn reconstruct_f_cnt_up(
    last: Option<u32>,
    received: u16,
    max_gap: u32,
) -> Result<u32, FCntError> {
    let Some(last) = last else {
        return Ok(u32::from(received));
    };

    // The distance from the last counter's low 16 bits to the received
    // value, forward and modulo 2^16: 0 means the same counter again.
    let low = last as u16;
    let ahead = u32::from(received.wrapping_sub(low));
    if ahead == 0 || ahead > max_gap {
        return Err(FCntError::Replayed { received, last });
    }
    last.checked_add(ahead).ok_or(FCntError::Exhausted { last })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn first_uplink_takes_the_16_bit_value() {
        assert_eq!(reconstruct_f_cnt_up(None, 0, MAX_FCNT_GAP), Ok(0));
        assert_eq!(reconstruct_f_cnt_up(None, 65_535, MAX_FCNT_GAP), Ok(65_535));
    }

    #[test]
    fn rollover_moves_to_the_next_block() {
        assert_eq!(
            reconstruct_f_cnt_up(Some(65_535), 0, MAX_FCNT_GAP),
            Ok(65_536)
        );
        assert_eq!(
            reconstruct_f_cnt_up(Some(65_530), 4, MAX_FCNT_GAP),
            Ok(65_540)
        );
        assert_eq!(
            reconstruct_f_cnt_up(Some(0x0002_ffff), 0x0001, MAX_FCNT_GAP),
            Ok(0x0003_0001)
        );
    }

    #[test]
    fn same_or_older_counter_is_replayed() {
        let replayed = FCntError::Replayed {
            received: 10,
            last: 10,
        };
        assert_eq!(
            reconstruct_f_cnt_up(Some(10), 10, MAX_FCNT_GAP),
            Err(replayed)
        );
        assert!(reconstruct_f_cnt_up(Some(10), 9, MAX_FCNT_GAP).is_err());
        assert!(reconstruct_f_cnt_up(Some(70_000), 4_000, MAX_FCNT_GAP).is_err());
    }

    #[test]
    fn gap_beyond_max_is_rejected() {
        assert_eq!(
            reconstruct_f_cnt_up(Some(0), 16_384, MAX_FCNT_GAP),
            Ok(16_384)
        );
        assert!(reconstruct_f_cnt_up(Some(0), 16_385, MAX_FCNT_GAP).is_err());
    }

    #[test]
    fn exhausted_counter_is_reported() {
        assert_eq!(
            reconstruct_f_cnt_up(Some(u32::MAX), 0, MAX_FCNT_GAP),
            Err(FCntError::Exhausted { last: u32::MAX })
        );
    }

    proptest! {
        #[test]
        fn counter_within_gap_is_rebuilt(last in 0u32..u32::MAX - MAX_FCNT_GAP, step in 1u32..=MAX_FCNT_GAP) {
            let sent = last + step;
            prop_assert_eq!(
                reconstruct_f_cnt_up(Some(last), sent as u16, MAX_FCNT_GAP),
                Ok(sent)
            );
        }

        #[test]
        fn counter_at_or_behind_last_is_rejected(last in any::<u32>(), back in 0u32..(65_536 - MAX_FCNT_GAP)) {
            let sent = last.wrapping_sub(back) as u16;
            prop_assert!(reconstruct_f_cnt_up(Some(last), sent, MAX_FCNT_GAP).is_err());
        }

        #[test]
        fn accepted_counter_always_grows(last in any::<u32>(), received in any::<u16>(), gap in 1u32..65_536) {
            if let Ok(full) = reconstruct_f_cnt_up(Some(last), received, gap) {
                prop_assert!(full > last);
                prop_assert!(full - last <= gap);
                prop_assert_eq!(full as u16, received);
            }
        }
    }
}
