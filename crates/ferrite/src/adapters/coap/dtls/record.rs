//! The few fields of a DTLS 1.2 record (RFC 6347 §4.1) and handshake
//! header (§4.2.2) that the listener reads before it keeps any state for a
//! peer. Pure code: no sockets, no OpenSSL.

/// Content type of handshake records.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Major byte of every DTLS version on the wire (1.0 is 0xfeff, 1.2 is 0xfefd).
const DTLS_VERSION_MAJOR: u8 = 0xfe;
/// Handshake message type of ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Record header: type (1), version (2), epoch (2), sequence number (6),
/// length (2).
const RECORD_HEADER_LEN: usize = 13;

/// Kind of the first record of a datagram from an unknown peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRecord {
    /// A ClientHello in epoch 0: the only record that may start an
    /// association.
    ClientHello,
    /// A well-formed DTLS record of another kind, such as application data
    /// for a session that this server no longer has.
    OtherRecord,
    /// Not a DTLS record: too short, another protocol, or a length that
    /// does not fit the datagram.
    Invalid,
}

/// Classifies the first record of `datagram`. Only the headers are read;
/// OpenSSL parses the ClientHello itself.
pub fn classify(datagram: &[u8]) -> FirstRecord {
    if datagram.len() < RECORD_HEADER_LEN || datagram[1] != DTLS_VERSION_MAJOR {
        return FirstRecord::Invalid;
    }
    let length = usize::from(u16::from_be_bytes([datagram[11], datagram[12]]));
    let Some(fragment) = datagram[RECORD_HEADER_LEN..].get(..length) else {
        return FirstRecord::Invalid;
    };
    let epoch = u16::from_be_bytes([datagram[3], datagram[4]]);
    let is_client_hello = datagram[0] == CONTENT_TYPE_HANDSHAKE
        && epoch == 0
        && fragment.first() == Some(&HANDSHAKE_CLIENT_HELLO);
    if is_client_hello {
        FirstRecord::ClientHello
    } else {
        FirstRecord::OtherRecord
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(content_type: u8, epoch: u16, fragment: &[u8]) -> Vec<u8> {
        let mut bytes = vec![content_type, 0xfe, 0xfd];
        bytes.extend_from_slice(&epoch.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
        bytes.extend_from_slice(fragment);
        bytes
    }

    #[test]
    fn client_hello_in_epoch_zero() {
        let hello = record(22, 0, &[1, 0, 0, 40]);
        assert_eq!(classify(&hello), FirstRecord::ClientHello);
    }

    #[test]
    fn other_records_are_not_hellos() {
        let cases = [
            ("application data", record(23, 1, &[9, 9, 9])),
            ("hello in epoch 1", record(22, 1, &[1, 0, 0, 1])),
            ("server hello", record(22, 0, &[2, 0, 0, 1])),
            ("alert", record(21, 0, &[2, 40])),
            ("empty handshake", record(22, 0, &[])),
        ];
        for (case, bytes) in cases {
            assert_eq!(classify(&bytes), FirstRecord::OtherRecord, "{case}");
        }
    }

    #[test]
    fn malformed_datagrams_are_invalid() {
        let mut truncated = record(22, 0, &[1, 0, 0, 40]);
        truncated.truncate(15);
        let mut coap = vec![0x40, 0x01, 0x12, 0x34];
        coap.extend_from_slice(&[0xb4; 12]);
        let cases: [(&str, &[u8]); 4] = [
            ("empty", &[]),
            ("short header", &[22, 0xfe, 0xfd, 0, 0]),
            ("length beyond datagram", &truncated),
            ("plain CoAP", &coap),
        ];
        for (case, bytes) in cases {
            assert_eq!(classify(bytes), FirstRecord::Invalid, "{case}");
        }
    }
}
