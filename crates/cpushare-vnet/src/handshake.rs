//! The handshake: Noise IKpsk2 (WireGuard's pattern, through `snow`) between
//! two members of a cluster, with WireGuard's denial-of-service defences.
//!
//! - IK: the initiator knows the responder's static key (from the cluster's
//!   member list, where each key is signed by its node's certificate); one
//!   round trip; the initiator's identity travels encrypted.
//! - psk2: a per-cluster secret mixed in, so that a node's key is good for
//!   its own cluster only: a member of another cluster cannot complete a
//!   handshake here even with a valid certificate.
//! - A TAI64N timestamp in the initiation: a replayed initiation is refused.
//! - mac1 (keyed with the responder's public key) lets a responder drop junk
//!   without a Diffie-Hellman; under load it asks for mac2, keyed with a
//!   cookie bound to the sender's address, which takes a round trip to earn:
//!   a flood from spoofed addresses costs the responder no Diffie-Hellman.

use std::net::SocketAddr;

use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::XChaCha20Poly1305;

use crate::wire::{self, MAC};

const PARAMS: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"cpushare vnet 1";

type Mac16 = Blake2sMac<blake2::digest::consts::U16>;

/// A node's static X25519 key pair for the virtual network.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKeys {
    pub secret: [u8; 32],
    pub public: [u8; 32],
}

impl std::fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticKeys {{ public: {:02x?}, .. }}", &self.public[..4])
    }
}

impl StaticKeys {
    pub fn generate() -> StaticKeys {
        let kp = snow::Builder::new(PARAMS.parse().expect("valid Noise parameters")).generate_keypair().expect("a key pair");
        StaticKeys { secret: kp.private.try_into().expect("32 bytes"), public: kp.public.try_into().expect("32 bytes") }
    }
}

/// Keys a finished handshake yields, and who holds them.
pub struct Established {
    pub send: [u8; 32],
    pub receive: [u8; 32],
    /// The peer's static public key.
    pub peer: [u8; 32],
    pub local_index: u32,
    pub remote_index: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("mac1 does not match: not meant for us")]
    Mac1,
    #[error("the Noise message does not decrypt (another cluster's secret, a wrong key, or tampering)")]
    Noise,
    #[error("an initiation from a key that is not a member of this cluster")]
    Stranger,
    #[error("a replayed or stale initiation")]
    Replay,
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn mac(key: &[u8], msg: &[u8]) -> [u8; MAC] {
    let mut m = <Mac16 as KeyInit>::new_from_slice(key).expect("a key of at most 32 bytes");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Constant-time equality of two MACs.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key of mac1 for messages to `responder`.
pub fn mac1_key(responder: &[u8; 32]) -> [u8; 32] {
    hash(&[b"mac1----", responder])
}

fn cookie_key(responder: &[u8; 32]) -> [u8; 32] {
    hash(&[b"cookie--", responder])
}

/// Fills in a handshake message's mac1 and mac2 (`cookie`, if one was earned).
fn seal_macs(msg: &mut [u8], responder: &[u8; 32], cookie: Option<&[u8; MAC]>) {
    let n = msg.len();
    let m1 = mac(&mac1_key(responder), &msg[..n - 2 * MAC]);
    msg[n - 2 * MAC..n - MAC].copy_from_slice(&m1);
    let m2 = cookie.map_or([0; MAC], |c| mac(c, &msg[..n - MAC]));
    msg[n - MAC..].copy_from_slice(&m2);
}

/// Whether a handshake message's mac1 is ours.
pub fn mac1_ok(msg: &[u8], our_mac1_key: &[u8; 32]) -> bool {
    let n = msg.len();
    let expect = mac(our_mac1_key, &msg[..n - 2 * MAC]);
    same(&expect, &msg[n - 2 * MAC..n - MAC])
}

/// TAI64N of now: what makes initiations unrepeatable.
pub fn tai64n(now: std::time::SystemTime) -> [u8; 12] {
    let d = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&((1u64 << 62) + d.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&d.subsec_nanos().to_be_bytes());
    t
}

/// An initiation in flight.
pub struct Initiating {
    state: snow::HandshakeState,
    pub local_index: u32,
    pub responder: [u8; 32],
}

/// Starts a handshake with `responder`: the initiation datagram to send.
pub fn initiate(me: &StaticKeys, responder: &[u8; 32], psk: &[u8; 32], local_index: u32, now: [u8; 12], cookie: Option<&[u8; MAC]>) -> (Initiating, Vec<u8>) {
    let mut state = snow::Builder::new(PARAMS.parse().expect("valid"))
        .local_private_key(&me.secret)
        .and_then(|b| b.remote_public_key(responder))
        .and_then(|b| b.psk(2, psk))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_initiator())
        .expect("a handshake with 32-byte keys");
    let mut msg = vec![0u8; wire::INITIATION_LEN];
    msg[0] = wire::INITIATION;
    msg[4..8].copy_from_slice(&local_index.to_le_bytes());
    let n = state.write_message(&now, &mut msg[8..8 + wire::INIT_NOISE]).expect("an initiation fits");
    debug_assert_eq!(n, wire::INIT_NOISE);
    seal_macs(&mut msg, responder, cookie);
    (Initiating { state, local_index, responder: *responder }, msg)
}

/// What a responder learnt from an initiation.
pub struct Initiation {
    pub peer: [u8; 32],
    pub timestamp: [u8; 12],
    state: snow::HandshakeState,
    remote_index: u32,
}

/// Reads an initiation (mac1 already checked): who sent it and when.
pub fn read_initiation(me: &StaticKeys, psk: &[u8; 32], sender: u32, noise: &[u8]) -> Result<Initiation, HandshakeError> {
    let mut state = snow::Builder::new(PARAMS.parse().expect("valid"))
        .local_private_key(&me.secret)
        .and_then(|b| b.psk(2, psk))
        .and_then(|b| b.prologue(PROLOGUE))
        .and_then(|b| b.build_responder())
        .expect("a handshake with 32-byte keys");
    let mut timestamp = [0u8; 64];
    let n = state.read_message(noise, &mut timestamp).map_err(|_| HandshakeError::Noise)?;
    if n != 12 {
        return Err(HandshakeError::Noise);
    }
    let peer: [u8; 32] = state.get_remote_static().and_then(|s| s.try_into().ok()).ok_or(HandshakeError::Noise)?;
    Ok(Initiation { peer, timestamp: timestamp[..12].try_into().expect("12"), state, remote_index: sender })
}

/// Answers an initiation: the response datagram and the session's keys.
pub fn respond(mut i: Initiation, local_index: u32, cookie: Option<&[u8; MAC]>) -> (Established, Vec<u8>) {
    let mut msg = vec![0u8; wire::RESPONSE_LEN];
    msg[0] = wire::RESPONSE;
    msg[4..8].copy_from_slice(&local_index.to_le_bytes());
    msg[8..12].copy_from_slice(&i.remote_index.to_le_bytes());
    let n = i.state.write_message(&[], &mut msg[12..12 + wire::RESPONSE_NOISE]).expect("a response fits");
    debug_assert_eq!(n, wire::RESPONSE_NOISE);
    seal_macs(&mut msg, &i.peer, cookie);
    let (to_responder, to_initiator) = i.state.dangerously_get_raw_split();
    (Established { send: to_initiator, receive: to_responder, peer: i.peer, local_index, remote_index: i.remote_index }, msg)
}

/// Completes a handshake this node started, from the response's Noise message.
pub fn finish(mut i: Initiating, sender: u32, noise: &[u8]) -> Result<Established, HandshakeError> {
    let mut empty = [0u8; 16];
    i.state.read_message(noise, &mut empty).map_err(|_| HandshakeError::Noise)?;
    let (to_responder, to_initiator) = i.state.dangerously_get_raw_split();
    Ok(Established { send: to_responder, receive: to_initiator, peer: i.responder, local_index: i.local_index, remote_index: sender })
}

/// The responder's side of cookies: a secret that changes every two minutes.
pub struct CookieJar {
    secret: [u8; 32],
    made: std::time::Instant,
}

impl CookieJar {
    pub fn new(now: std::time::Instant) -> CookieJar {
        CookieJar { secret: rand::random(), made: now }
    }

    fn cookie(&mut self, from: SocketAddr, now: std::time::Instant) -> [u8; MAC] {
        if now.duration_since(self.made) > std::time::Duration::from_secs(120) {
            *self = CookieJar::new(now);
        }
        mac(&self.secret, from.to_string().as_bytes())
    }

    /// Whether `msg` (a handshake message from `from`) carries a valid mac2.
    pub fn mac2_ok(&mut self, msg: &[u8], from: SocketAddr, now: std::time::Instant) -> bool {
        let n = msg.len();
        let cookie = self.cookie(from, now);
        same(&mac(&cookie, &msg[..n - MAC]), &msg[n - MAC..])
    }

    /// The cookie reply to `msg` from `from`: the cookie, sealed under a key
    /// only holders of our public key derive, bound to that message's mac1.
    pub fn reply(&mut self, me: &StaticKeys, msg: &[u8], receiver: u32, from: SocketAddr, now: std::time::Instant) -> Vec<u8> {
        let n = msg.len();
        let mac1 = &msg[n - 2 * MAC..n - MAC];
        let cookie = self.cookie(from, now);
        let nonce: [u8; 24] = rand::random();
        let aead = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&cookie_key(&me.public).into());
        let sealed = aead.encrypt(&nonce.into(), Payload { msg: &cookie, aad: mac1 }).expect("sealing cannot fail");
        let mut out = Vec::with_capacity(wire::COOKIE_LEN);
        out.extend_from_slice(&[wire::COOKIE_REPLY, 0, 0, 0]);
        out.extend_from_slice(&receiver.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }
}

/// Opens a cookie reply from `responder` to the message whose mac1 was `mac1`.
pub fn open_cookie(responder: &[u8; 32], mac1: &[u8], nonce: &[u8], sealed: &[u8]) -> Option<[u8; MAC]> {
    let aead = <XChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&cookie_key(responder).into());
    let nonce: [u8; 24] = nonce.try_into().ok()?;
    aead.decrypt(&nonce.into(), Payload { msg: sealed, aad: mac1 }).ok()?.try_into().ok()
}

/// mac1 of a message this node sent (what its cookie reply is bound to).
pub fn mac1_of(msg: &[u8]) -> &[u8] {
    let n = msg.len();
    &msg[n - 2 * MAC..n - MAC]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{parse, Datagram};

    #[test]
    fn both_sides_derive_the_same_keys_and_the_wrong_cluster_fails() {
        let (a, b) = (StaticKeys::generate(), StaticKeys::generate());
        let psk = [7u8; 32];
        let (init, msg) = initiate(&a, &b.public, &psk, 11, tai64n(std::time::SystemTime::now()), None);
        assert!(mac1_ok(&msg, &mac1_key(&b.public)));
        assert!(!mac1_ok(&msg, &mac1_key(&a.public)), "mac1 is for the responder only");
        let Datagram::Initiation { sender, noise, .. } = parse(&msg).unwrap() else { panic!() };
        let got = read_initiation(&b, &psk, sender, noise).unwrap();
        assert_eq!(got.peer, a.public);
        let (rb, reply) = respond(got, 22, None);
        let Datagram::Response { sender, receiver, noise, .. } = parse(&reply).unwrap() else { panic!() };
        assert_eq!(receiver, 11);
        let ra = finish(init, sender, noise).unwrap();
        assert_eq!((ra.send, ra.receive, ra.remote_index), (rb.receive, rb.send, 22));
        assert_ne!(ra.send, ra.receive);

        // Another cluster's secret (mixed in at the response, as in WireGuard):
        // the initiator cannot complete the handshake, so no session exists.
        let (init, msg) = initiate(&a, &b.public, &[8u8; 32], 12, tai64n(std::time::SystemTime::now()), None);
        let Datagram::Initiation { sender, noise, .. } = parse(&msg).unwrap() else { panic!() };
        let (_, reply) = respond(read_initiation(&b, &psk, sender, noise).unwrap(), 23, None);
        let Datagram::Response { sender, noise, .. } = parse(&reply).unwrap() else { panic!() };
        assert_eq!(finish(init, sender, noise).err(), Some(HandshakeError::Noise));
        // A flipped bit anywhere in the Noise message: refused.
        let (_, mut msg) = initiate(&a, &b.public, &psk, 13, tai64n(std::time::SystemTime::now()), None);
        msg[40] ^= 1;
        let Datagram::Initiation { sender, noise, .. } = parse(&msg).unwrap() else { panic!() };
        assert_eq!(read_initiation(&b, &psk, sender, noise).err(), Some(HandshakeError::Noise));
    }

    #[test]
    fn a_cookie_earned_from_one_address_makes_mac2_valid_from_that_address_only() {
        let (a, b) = (StaticKeys::generate(), StaticKeys::generate());
        let now = std::time::Instant::now();
        let mut jar = CookieJar::new(now);
        let from: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let (_, msg) = initiate(&a, &b.public, &[0; 32], 1, tai64n(std::time::SystemTime::now()), None);
        assert!(!jar.mac2_ok(&msg, from, now), "no cookie yet");
        let reply = jar.reply(&b, &msg, 1, from, now);
        let Datagram::CookieReply { nonce, sealed, .. } = parse(&reply).unwrap() else { panic!() };
        let cookie = open_cookie(&b.public, mac1_of(&msg), nonce, sealed).unwrap();
        let (_, again) = initiate(&a, &b.public, &[0; 32], 2, tai64n(std::time::SystemTime::now()), Some(&cookie));
        assert!(jar.mac2_ok(&again, from, now));
        assert!(!jar.mac2_ok(&again, "10.0.0.2:5000".parse().unwrap(), now), "bound to the address");
        assert!(open_cookie(&a.public, mac1_of(&msg), nonce, sealed).is_none(), "only for whoever knows the responder");
    }
}
