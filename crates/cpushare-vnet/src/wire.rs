//! The datagrams nodes exchange over UDP, and what a data packet carries.
//!
//! Every datagram starts with a type byte and three reserved zero bytes, as
//! in WireGuard, whose layouts these follow:
//!
//! | type | layout (after the 4-byte type word) |
//! |---|---|
//! | 1 initiation | sender index u32, Noise message (108 B), mac1 (16), mac2 (16) |
//! | 2 response | sender index u32, receiver index u32, Noise message (48 B), mac1, mac2 |
//! | 3 cookie reply | receiver index u32, nonce (24), sealed cookie (32) |
//! | 4 data | receiver index u32, counter u64, ciphertext, tag (16) |
//! | 5 relay | receiver index u32, counter u64, destination node u32, an inner datagram, tag (16) |
//!
//! Integers are little-endian. A relay datagram asks the buyer's node to pass
//! the inner datagram (end-to-end encrypted between two other nodes) to the
//! destination; its tag authenticates the whole wrapper under the sender's
//! session with the relay, which never decrypts the inner datagram.
//!
//! The plaintext of a data packet is empty (a keepalive) or starts with a
//! kind byte: a piece of an Ethernet frame (frame id u32, piece index u8,
//! piece count u8, then the bytes), or a path probe or its answer (u64 each).

use thiserror::Error;

pub const INITIATION: u8 = 1;
pub const RESPONSE: u8 = 2;
pub const COOKIE_REPLY: u8 = 3;
pub const DATA: u8 = 4;
pub const RELAY: u8 = 5;

/// Type word, receiver index, counter.
pub const DATA_HEADER: usize = 16;
/// The relay's header: a data header and the destination node.
pub const RELAY_HEADER: usize = DATA_HEADER + 4;
pub const TAG: usize = 16;
pub const MAC: usize = 16;
/// The Noise IKpsk2 messages: initiation (e, s, a 12-byte timestamp) and response (e, empty payload).
pub const INIT_NOISE: usize = 32 + 32 + TAG + 12 + TAG;
pub const RESPONSE_NOISE: usize = 32 + TAG;
pub const INITIATION_LEN: usize = 8 + INIT_NOISE + 2 * MAC;
pub const RESPONSE_LEN: usize = 12 + RESPONSE_NOISE + 2 * MAC;
pub const COOKIE_LEN: usize = 8 + 24 + 16 + TAG;

/// Inner kinds.
pub const PIECE: u8 = 0;
pub const PROBE: u8 = 1;
pub const PROBE_ANSWER: u8 = 2;
/// kind, frame id, index, count.
pub const PIECE_HEADER: usize = 7;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("an empty datagram")]
    Empty,
    #[error("unknown datagram type {0}")]
    UnknownType(u8),
    #[error("a type {kind} datagram of {len} bytes (expected {expected})")]
    Length { kind: u8, len: usize, expected: String },
    #[error("reserved bytes are not zero")]
    Reserved,
    #[error("a piece header that does not add up")]
    Piece,
}

/// A parsed datagram, borrowing from the bytes it was parsed from.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram<'a> {
    Initiation { sender: u32, noise: &'a [u8], mac1: &'a [u8], mac2: &'a [u8] },
    Response { sender: u32, receiver: u32, noise: &'a [u8], mac1: &'a [u8], mac2: &'a [u8] },
    CookieReply { receiver: u32, nonce: &'a [u8], sealed: &'a [u8] },
    /// `header` is the 16 bytes the AEAD authenticates as associated data.
    Data { receiver: u32, counter: u64, header: &'a [u8], sealed: &'a [u8] },
    Relay { receiver: u32, counter: u64, to: u32, inner: &'a [u8], tag: &'a [u8] },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn exactly(kind: u8, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() == n {
        Ok(())
    } else {
        Err(WireError::Length { kind, len: b.len(), expected: n.to_string() })
    }
}

fn at_least(kind: u8, b: &[u8], n: usize) -> Result<(), WireError> {
    if b.len() >= n {
        Ok(())
    } else {
        Err(WireError::Length { kind, len: b.len(), expected: format!("at least {n}") })
    }
}

/// Parses a datagram's framing (no cryptography: that is the session's).
pub fn parse(b: &[u8]) -> Result<Datagram<'_>, WireError> {
    let kind = *b.first().ok_or(WireError::Empty)?;
    if !(INITIATION..=RELAY).contains(&kind) {
        return Err(WireError::UnknownType(kind));
    }
    at_least(kind, b, 4)?;
    if b[1..4] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    Ok(match kind {
        INITIATION => {
            exactly(kind, b, INITIATION_LEN)?;
            let m = 8 + INIT_NOISE;
            Datagram::Initiation { sender: u32_at(b, 4), noise: &b[8..m], mac1: &b[m..m + MAC], mac2: &b[m + MAC..] }
        }
        RESPONSE => {
            exactly(kind, b, RESPONSE_LEN)?;
            let m = 12 + RESPONSE_NOISE;
            Datagram::Response { sender: u32_at(b, 4), receiver: u32_at(b, 8), noise: &b[12..m], mac1: &b[m..m + MAC], mac2: &b[m + MAC..] }
        }
        COOKIE_REPLY => {
            exactly(kind, b, COOKIE_LEN)?;
            Datagram::CookieReply { receiver: u32_at(b, 4), nonce: &b[8..32], sealed: &b[32..] }
        }
        DATA => {
            at_least(kind, b, DATA_HEADER + TAG)?;
            Datagram::Data { receiver: u32_at(b, 4), counter: u64_at(b, 8), header: &b[..DATA_HEADER], sealed: &b[DATA_HEADER..] }
        }
        _ => {
            at_least(kind, b, RELAY_HEADER + DATA_HEADER + TAG + TAG)?;
            let end = b.len() - TAG;
            Datagram::Relay { receiver: u32_at(b, 4), counter: u64_at(b, 8), to: u32_at(b, 16), inner: &b[RELAY_HEADER..end], tag: &b[end..] }
        }
    })
}

/// The 16-byte header of a data packet.
pub fn data_header(receiver: u32, counter: u64) -> [u8; DATA_HEADER] {
    let mut h = [0u8; DATA_HEADER];
    h[0] = DATA;
    h[4..8].copy_from_slice(&receiver.to_le_bytes());
    h[8..16].copy_from_slice(&counter.to_le_bytes());
    h
}

/// The header of a relay datagram.
pub fn relay_header(receiver: u32, counter: u64, to: u32) -> [u8; RELAY_HEADER] {
    let mut h = [0u8; RELAY_HEADER];
    h[..DATA_HEADER].copy_from_slice(&data_header(receiver, counter));
    h[0] = RELAY;
    h[16..20].copy_from_slice(&to.to_le_bytes());
    h
}

/// What a data packet's plaintext says.
#[derive(Debug, PartialEq, Eq)]
pub enum Inner<'a> {
    Keepalive,
    Piece { frame: u32, index: u8, count: u8, bytes: &'a [u8] },
    Probe(u64),
    ProbeAnswer(u64),
}

pub fn parse_inner(p: &[u8]) -> Result<Inner<'_>, WireError> {
    let Some(&kind) = p.first() else { return Ok(Inner::Keepalive) };
    match kind {
        PIECE if p.len() >= PIECE_HEADER => {
            let (index, count) = (p[5], p[6]);
            if count == 0 || index >= count {
                return Err(WireError::Piece);
            }
            Ok(Inner::Piece { frame: u32_at(p, 1), index, count, bytes: &p[PIECE_HEADER..] })
        }
        PROBE | PROBE_ANSWER if p.len() == 9 => {
            let v = u64_at(p, 1);
            Ok(if kind == PROBE { Inner::Probe(v) } else { Inner::ProbeAnswer(v) })
        }
        _ => Err(WireError::Piece),
    }
}

pub fn piece_header(frame: u32, index: u8, count: u8) -> [u8; PIECE_HEADER] {
    let mut h = [PIECE, 0, 0, 0, 0, index, count];
    h[1..5].copy_from_slice(&frame.to_le_bytes());
    h
}

pub fn probe(kind: u8, v: u64) -> [u8; 9] {
    let mut p = [kind; 9];
    p[1..].copy_from_slice(&v.to_le_bytes());
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn each_type_parses_at_its_length_and_not_otherwise() {
        let mut init = vec![0u8; INITIATION_LEN];
        init[0] = INITIATION;
        init[4] = 7;
        assert!(matches!(parse(&init), Ok(Datagram::Initiation { sender: 7, .. })));
        assert!(matches!(parse(&init[..INITIATION_LEN - 1]), Err(WireError::Length { .. })));
        init[2] = 1;
        assert_eq!(parse(&init), Err(WireError::Reserved));
        let mut data = data_header(9, 42).to_vec();
        data.extend_from_slice(&[0; TAG]);
        assert!(matches!(parse(&data), Ok(Datagram::Data { receiver: 9, counter: 42, .. })));
        assert!(matches!(parse(&data[..DATA_HEADER + TAG - 1]), Err(WireError::Length { .. })));
        assert_eq!(parse(&[9, 0, 0, 0]), Err(WireError::UnknownType(9)));
        assert_eq!(parse(&[]), Err(WireError::Empty));
        let mut relay = relay_header(1, 2, 3).to_vec();
        relay.extend_from_slice(&data);
        relay.extend_from_slice(&[5; TAG]);
        match parse(&relay).unwrap() {
            Datagram::Relay { receiver: 1, counter: 2, to: 3, inner, tag } => {
                assert_eq!(inner, &data[..]);
                assert_eq!(tag, &[5; TAG]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn inner_kinds() {
        let mut p = piece_header(5, 1, 3).to_vec();
        p.extend_from_slice(b"abc");
        assert_eq!(parse_inner(&p), Ok(Inner::Piece { frame: 5, index: 1, count: 3, bytes: b"abc" }));
        assert_eq!(parse_inner(&piece_header(5, 3, 3)), Err(WireError::Piece));
        assert_eq!(parse_inner(&probe(PROBE, 77)), Ok(Inner::Probe(77)));
        assert_eq!(parse_inner(&[]), Ok(Inner::Keepalive));
        assert_eq!(parse_inner(&[PROBE, 1]), Err(WireError::Piece));
    }

    proptest! {
        /// Any bytes at all: an error or a datagram, never a panic.
        #[test]
        fn parsing_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&b);
            let _ = parse_inner(&b);
        }
    }
}
