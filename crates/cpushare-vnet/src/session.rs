//! One direction-pair of keys between two nodes, after a handshake: data
//! packets sealed with AES-256-GCM (the nonce is the packet's counter, as in
//! Noise and WireGuard), authenticated with their header, checked against a
//! replay window, and retired after a lifetime or a message count.
//!
//! Why AES-256-GCM and not WireGuard's ChaCha20-Poly1305 (the handshake keeps
//! its ChaChaPoly): ring runs it on the CPU's AES and carry-less multiply
//! instructions (AES-NI/VAES on x86-64, the ARMv8 crypto extensions), 3.6 GiB/s
//! against 1.3 GiB/s for 1,400-byte packets on our machine (`benches/seal.rs`,
//! BENCHMARKS.md), and sealing and opening were the largest part of a node's
//! CPU. It is Nebula's default too. A CPU without those instructions gets ring's constant-time
//! software AES, slower but safe. Counter nonces never repeat within a
//! session, and sessions end long before GCM's limits.

use std::time::{Duration, Instant};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::handshake::Established;
use crate::replay::ReplayWindow;
use crate::wire::{self, TAG};

/// A session is renewed by a new handshake after this long...
pub const REKEY_AFTER: Duration = Duration::from_secs(120);
/// ...and refuses to send or receive after this long.
pub const REJECT_AFTER: Duration = Duration::from_secs(180);
/// ...or after this many messages either way.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);

pub struct Session {
    send: LessSafeKey,
    receive: LessSafeKey,
    next_counter: u64,
    replay: ReplayWindow,
    pub local_index: u32,
    pub remote_index: u32,
    pub created: Instant,
    /// Whether this node initiated the handshake (the initiator renews it).
    pub initiator: bool,
    /// The responder sends only once the initiator has shown it holds the keys.
    pub confirmed: bool,
}

fn key(k: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, k).expect("a 32-byte key"))
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

impl Session {
    pub fn new(e: &Established, initiator: bool, now: Instant) -> Session {
        Session {
            send: key(&e.send),
            receive: key(&e.receive),
            next_counter: 0,
            replay: ReplayWindow::default(),
            local_index: e.local_index,
            remote_index: e.remote_index,
            created: now,
            initiator,
            confirmed: initiator,
        }
    }

    pub fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.created) >= REJECT_AFTER || self.next_counter >= REJECT_AFTER_MESSAGES
    }

    pub fn wants_rekey(&self, now: Instant) -> bool {
        self.initiator && (now.duration_since(self.created) >= REKEY_AFTER || self.next_counter >= REKEY_AFTER_MESSAGES)
    }

    /// Seals `out[at + DATA_HEADER..]` (the plaintext, already in place
    /// after room for the header) into a data packet: writes the header and
    /// appends the tag.
    pub fn seal_data(&mut self, out: &mut Vec<u8>, at: usize) {
        let counter = self.next_counter;
        self.next_counter += 1;
        let header = wire::data_header(self.remote_index, counter);
        out[at..at + wire::DATA_HEADER].copy_from_slice(&header);
        let tag = self
            .send
            .seal_in_place_separate_tag(nonce(counter), Aad::from(&header), &mut out[at + wire::DATA_HEADER..])
            .expect("a packet is far below the AEAD's limit");
        out.extend_from_slice(tag.as_ref());
    }

    /// Whether `counter` has not been seen (a replay needs no decryption to refuse).
    pub fn replay_fresh(&self, counter: u64) -> bool {
        self.replay.fresh(counter)
    }

    /// Opens a data packet in place; returns its plaintext's length (the
    /// plaintext starts at `sealed[0]`). None if it does not authenticate or
    /// is a replay.
    pub fn open_data(&mut self, header: &[u8], counter: u64, sealed: &mut [u8], now: Instant) -> Option<usize> {
        if self.expired(now) || !self.replay.fresh(counter) {
            return None;
        }
        let plain = self.receive.open_in_place(nonce(counter), Aad::from(header), sealed).ok()?.len();
        if !self.replay.accept(counter) {
            return None;
        }
        self.confirmed = true;
        Some(plain)
    }

    /// The tag of a relay wrapper: `out` holds the relay header and the
    /// inner datagram; the tag is appended (nothing is encrypted: the inner
    /// datagram is the two end nodes' business).
    pub fn seal_relay(&mut self, out: &mut Vec<u8>, at: usize, to: u32) {
        let counter = self.next_counter;
        self.next_counter += 1;
        out[at..at + wire::RELAY_HEADER].copy_from_slice(&wire::relay_header(self.remote_index, counter, to));
        let tag = self.send.seal_in_place_separate_tag(nonce(counter), Aad::from(&out[at..]), &mut []).expect("sealing nothing");
        out.extend_from_slice(tag.as_ref());
    }

    /// Checks a relay wrapper (`wrapped` = header and inner datagram).
    pub fn open_relay(&mut self, counter: u64, wrapped: &[u8], tag: &[u8], now: Instant) -> bool {
        if self.expired(now) || !self.replay.fresh(counter) || tag.len() != TAG {
            return false;
        }
        let mut t = [0u8; TAG];
        t.copy_from_slice(tag);
        if self.receive.open_in_place(nonce(counter), Aad::from(wrapped), &mut t).is_err() {
            return false;
        }
        self.confirmed = true;
        self.replay.accept(counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let now = Instant::now();
        let a = Established { send: [1; 32], receive: [2; 32], peer: [0; 32], local_index: 10, remote_index: 20 };
        let b = Established { send: [2; 32], receive: [1; 32], peer: [0; 32], local_index: 20, remote_index: 10 };
        (Session::new(&a, true, now), Session::new(&b, false, now))
    }

    fn data(s: &mut Session, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; wire::DATA_HEADER];
        out.extend_from_slice(plain);
        s.seal_data(&mut out, 0);
        out
    }

    #[test]
    fn sealed_packets_open_once_and_not_after_a_change() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let p = data(&mut a, b"hello");
        let open = |b: &mut Session, p: &[u8]| {
            let mut p = p.to_vec();
            let counter = u64::from_le_bytes(p[8..16].try_into().unwrap());
            let (h, rest) = p.split_at_mut(wire::DATA_HEADER);
            b.open_data(h, counter, rest, now).map(|n| rest[..n].to_vec())
        };
        assert!(!b.confirmed);
        assert_eq!(open(&mut b, &p).as_deref(), Some(&b"hello"[..]));
        assert!(b.confirmed, "the initiator proved it holds the keys");
        assert_eq!(open(&mut b, &p), None, "a replay");
        let mut t = data(&mut a, b"world");
        t[20] ^= 1;
        assert_eq!(open(&mut b, &t), None, "tampered ciphertext");
        let mut h = data(&mut a, b"again");
        h[4] ^= 1;
        assert_eq!(open(&mut b, &h), None, "tampered header");
        let later = now + REJECT_AFTER;
        let p = data(&mut a, b"late");
        let mut q = p.clone();
        let (hd, rest) = q.split_at_mut(wire::DATA_HEADER);
        assert_eq!(b.open_data(hd, 4, rest, later), None, "an expired session refuses");
    }

    #[test]
    fn a_relay_wrapper_authenticates_without_touching_what_it_carries() {
        let (mut a, mut b) = pair();
        let now = Instant::now();
        let mut out = vec![0u8; wire::RELAY_HEADER];
        out.extend_from_slice(b"opaque inner datagram");
        a.seal_relay(&mut out, 0, 99);
        let n = out.len();
        assert_eq!(&out[wire::RELAY_HEADER..n - TAG], b"opaque inner datagram");
        let counter = u64::from_le_bytes(out[8..16].try_into().unwrap());
        assert!(b.open_relay(counter, &out[..n - TAG], &out[n - TAG..], now));
        assert!(!b.open_relay(counter, &out[..n - TAG], &out[n - TAG..], now), "once");
        let mut other = out.clone();
        other[17] ^= 1; // another destination
        assert!(!b.open_relay(counter + 1, &other[..n - TAG], &other[n - TAG..], now));
    }
}
