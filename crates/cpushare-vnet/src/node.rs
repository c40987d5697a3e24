//! One member of a cluster's network, as a state machine without I/O: frames
//! come in from local ports (the buyer's `cpushare0`, a seller's VMs) and
//! datagrams from the network; frames go out to ports and datagrams to
//! peers. Time is an argument. The I/O shell (`crate::io`) feeds it.
//!
//! Forwarding is a switch's: source MAC addresses are learnt (local port, or
//! the peer a frame came from); a unicast frame goes to the port or peer that
//! owns its destination; broadcasts and unknown destinations go to every
//! other local port and, as one copy each, to every peer, which deliver them
//! to their own ports only (nothing is forwarded twice, so there are no loops).
//!
//! A frame for a peer goes straight to it when the peer accepts inbound UDP
//! and the direct path answers; otherwise it goes through the cluster's relay
//! (the buyer's node), wrapped in a relay datagram that the relay checks and
//! unwraps but cannot read: the frame stays encrypted end to end.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::frames::{self, is_group, Mac, Reassembly, MIN_FRAME};
use crate::handshake::{self, CookieJar, Initiating, StaticKeys};
use crate::session::Session;
use crate::wire::{self, Datagram, Inner, DATA_HEADER, PIECE_HEADER, RELAY_HEADER, TAG};

pub type NodeId = u32;
pub type PortId = u32;

/// Payload bytes of a frame per datagram: a datagram is then at most 1,439
/// bytes, which fits a 1,500-byte path over IPv4 or IPv6.
pub const PIECE: usize = 1400;
/// ...and through the relay, which adds its own header and tag.
pub const RELAYED_PIECE: usize = PIECE - RELAY_HEADER - TAG;
/// An initiation unanswered this long is sent again...
const RETRY: Duration = Duration::from_millis(1000);
/// ...and after this many on the direct path, the relay is tried instead.
const DIRECT_TRIES: u32 = 2;
/// A direct path that failed is tried again after this long.
const DIRECT_RETRY: Duration = Duration::from_secs(60);
/// A peer silent this long while we send to it is probed...
const PROBE_AFTER: Duration = Duration::from_secs(5);
/// ...and its direct path given up if the probe is not answered in this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Keepalives to the relay keep the way back open through firewalls.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Learnt MAC addresses are forgotten after this long unheard.
const MAC_AGING: Duration = Duration::from_secs(300);
/// Frames kept per peer while its handshake runs.
const QUEUE: usize = 64;
/// More handshake messages than this per second: the node is under load and
/// asks for cookies (mac2) before doing any Diffie-Hellman.
pub const UNDER_LOAD: u32 = 50;
/// Handshakes per second (and burst) one source address may cost under load.
const PER_SOURCE: f64 = 10.0;

/// Hex in JSON for keys.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&k.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let bytes: Result<Vec<u8>, _> = (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).map_or(Err(()), |h| u8::from_str_radix(h, 16).map_err(|_| ()))).collect();
        bytes.ok().and_then(|b| b.try_into().ok()).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// A member of the cluster, as the control plane lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    /// Its static key for this network.
    #[serde(with = "hex32")]
    pub public: [u8; 32],
    /// Where it receives datagrams.
    pub endpoint: SocketAddr,
    /// Whether it accepts datagrams it did not ask for (the exchange probed it).
    pub inbound: bool,
    /// The cluster's relay: the buyer's node.
    #[serde(default)]
    pub relay: bool,
}

/// Everything a node needs to join its cluster's network.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub cluster: u64,
    /// The cluster's secret (Noise psk): another cluster's members cannot complete a handshake.
    #[serde(with = "hex32")]
    pub psk: [u8; 32],
    pub me: NodeId,
    #[serde(with = "hex32")]
    pub secret: [u8; 32],
    #[serde(with = "hex32")]
    pub public: [u8; 32],
    pub members: Vec<Member>,
}

/// Datagrams to send: one, or several of `segment` bytes each (the last may
/// be shorter) to send with UDP segmentation offload.
#[derive(Debug)]
pub struct Transmit {
    pub to: SocketAddr,
    pub data: Vec<u8>,
    pub segment: usize,
}

/// A frame for a local port.
#[derive(Debug)]
pub struct Delivery {
    pub port: PortId,
    pub frame: Vec<u8>,
}

/// What passed, per peer, in datagrams.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerCounters {
    pub tx_direct: u64,
    pub tx_relayed: u64,
    pub rx_direct: u64,
    pub rx_relayed: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub handshakes: u64,
    /// How this node reaches the peer now: "direct" or "relayed" (for one
    /// that left, how it was reached last).
    pub path: String,
    /// The peer has left the network; these are its final counts.
    #[serde(default)]
    pub left: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub peers: std::collections::BTreeMap<NodeId, PeerCounters>,
    /// Relay datagrams passed on for other nodes (the relay only).
    pub relayed_for_others: u64,
    /// Datagrams that did not authenticate (tampered, another cluster's, junk).
    pub dropped_unauthenticated: u64,
    /// Datagrams seen before.
    pub dropped_replayed: u64,
    /// Handshakes from keys that are not members.
    pub dropped_strangers: u64,
    /// Handshake messages refused for the rate limit, or answered with a cookie instead.
    pub dropped_rate_limited: u64,
    pub cookies_sent: u64,
    pub frames_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Relayed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Port(PortId),
    Peer(NodeId),
}

struct Pending {
    state: Initiating,
    message: Vec<u8>,
    sent: Instant,
    tries: u32,
}

struct Peer {
    member: Member,
    /// Where its datagrams come from (learnt from authenticated ones).
    endpoint: SocketAddr,
    /// Newest first.
    sessions: Vec<Session>,
    pending: Option<Pending>,
    cookie: Option<[u8; wire::MAC]>,
    last_timestamp: [u8; 12],
    queue: VecDeque<Vec<u8>>,
    /// When the direct path last failed (its handshake or probe went unanswered).
    direct_failed: Option<Instant>,
    last_rx: Option<Instant>,
    last_tx: Option<Instant>,
    probe: Option<(u64, Instant)>,
    reassembly: Reassembly,
    next_frame: u32,
    counters: PeerCounters,
}

pub struct Node {
    cluster: u64,
    psk: [u8; 32],
    me: NodeId,
    keys: StaticKeys,
    mac1_key: [u8; 32],
    relay: Option<NodeId>,
    peers: HashMap<NodeId, Peer>,
    by_index: HashMap<u32, NodeId>,
    by_key: HashMap<[u8; 32], NodeId>,
    macs: HashMap<Mac, (Place, Instant)>,
    ports: Vec<PortId>,
    cookies: CookieJar,
    load: (Instant, u32),
    sources: HashMap<IpAddr, (Instant, f64)>,
    /// Relay datagrams waiting for a session with the relay.
    via_relay: VecDeque<(NodeId, Vec<u8>)>,
    last_keepalive: Option<Instant>,
    counters: Counters,
    /// What to send and deliver: drained by the I/O shell.
    pub transmits: Vec<Transmit>,
    pub deliveries: Vec<Delivery>,
}

impl Node {
    pub fn new(config: &Config, ports: Vec<PortId>, now: Instant) -> anyhow::Result<Node> {
        let keys = StaticKeys { secret: config.secret, public: config.public };
        let mut node = Node {
            cluster: config.cluster,
            psk: config.psk,
            me: config.me,
            mac1_key: handshake::mac1_key(&keys.public),
            keys,
            relay: None,
            peers: HashMap::new(),
            by_index: HashMap::new(),
            by_key: HashMap::new(),
            macs: HashMap::new(),
            ports,
            cookies: CookieJar::new(now),
            load: (now, 0),
            sources: HashMap::new(),
            via_relay: VecDeque::new(),
            last_keepalive: None,
            counters: Counters::default(),
            transmits: Vec::new(),
            deliveries: Vec::new(),
        };
        node.set_members(&config.members, now)?;
        Ok(node)
    }

    /// Takes a new member list (the control plane's, as members join and
    /// leave): peers that stay keep their sessions; new ones are added; gone
    /// ones are forgotten, with everything learnt about them but their final
    /// counts. Refused (and
    /// nothing changed) if the list is inconsistent.
    pub fn set_members(&mut self, members: &[Member], now: Instant) -> anyhow::Result<()> {
        let mut relay = None;
        let mut keys = HashMap::new();
        for m in members {
            if m.relay {
                anyhow::ensure!(relay.replace(m.node).is_none(), "two relays in the member list");
            }
            if m.node == self.me {
                anyhow::ensure!(m.public == self.keys.public, "the member list has another key for this node");
            }
            anyhow::ensure!(keys.insert(m.public, m.node).is_none(), "two members with one key");
        }
        anyhow::ensure!(members.iter().any(|m| m.node == self.me), "this node ({}) is not in the member list", self.me);
        let gone: Vec<NodeId> = self.peers.keys().filter(|id| !members.iter().any(|m| m.node == **id && m.public == self.peers[id].member.public)).copied().collect();
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                // What it carried stays in the counters.
                let mut last = p.counters.clone();
                last.path = self.path_name(&p, now).into();
                last.left = true;
                self.counters.peers.insert(id, last);
                for s in &p.sessions {
                    self.by_index.remove(&s.local_index);
                }
                if let Some(q) = &p.pending {
                    self.by_index.remove(&q.state.local_index);
                }
            }
            self.macs.retain(|_, (place, _)| *place != Place::Peer(id));
        }
        for m in members.iter().filter(|m| m.node != self.me) {
            match self.peers.get_mut(&m.node) {
                // Its endpoint may have moved; what it accepts may have been found out since.
                Some(p) => {
                    if p.member.endpoint != m.endpoint {
                        p.endpoint = m.endpoint;
                    }
                    p.member = m.clone();
                }
                None => {
                    self.peers.insert(
                        m.node,
                        Peer {
                            member: m.clone(),
                            endpoint: m.endpoint,
                            sessions: Vec::new(),
                            pending: None,
                            cookie: None,
                            last_timestamp: [0; 12],
                            queue: VecDeque::new(),
                            direct_failed: None,
                            last_rx: None,
                            last_tx: None,
                            probe: None,
                            reassembly: Reassembly::default(),
                            next_frame: 0,
                            counters: PeerCounters::default(),
                        },
                    );
                }
            }
        }
        keys.remove(&self.keys.public);
        self.by_key = keys;
        self.relay = relay;
        Ok(())
    }

    pub fn cluster(&self) -> u64 {
        self.cluster
    }

    pub fn counters(&self, now: Instant) -> Counters {
        let mut c = self.counters.clone();
        for (id, p) in &self.peers {
            let mut pc = p.counters.clone();
            pc.path = self.path_name(p, now).into();
            c.peers.insert(*id, pc);
        }
        c
    }

    fn path_name(&self, p: &Peer, now: Instant) -> &'static str {
        match self.path(p, now) {
            Path::Direct => "direct",
            Path::Relayed => "relayed",
        }
    }

    // ---- frames from local ports ----

    /// A frame (virtio-net header first) from a local port.
    pub fn from_port(&mut self, port: PortId, frame: &[u8], now: Instant) {
        if frame.len() < MIN_FRAME || frame.len() > frames::MAX_FRAME {
            self.counters.frames_dropped += 1;
            return;
        }
        let (dst, src) = (frames::destination(frame), frames::source(frame));
        if !is_group(&src) {
            self.macs.insert(src, (Place::Port(port), now));
        }
        match self.macs.get(&dst).map(|e| e.0) {
            Some(Place::Port(p)) if !is_group(&dst) => {
                if p != port {
                    self.deliveries.push(Delivery { port: p, frame: frame.to_vec() });
                }
            }
            Some(Place::Peer(n)) if !is_group(&dst) => self.send_frame(n, frame, now),
            _ => {
                for &p in self.ports.iter().filter(|&&p| p != port) {
                    self.deliveries.push(Delivery { port: p, frame: frame.to_vec() });
                }
                let peers: Vec<NodeId> = self.peers.keys().copied().collect();
                for n in peers {
                    self.send_frame(n, frame, now);
                }
            }
        }
    }

    fn path(&self, p: &Peer, now: Instant) -> Path {
        let relay_usable = self.relay.is_some_and(|r| r != p.member.node && r != self.me);
        if !relay_usable {
            return Path::Direct;
        }
        let failed = p.direct_failed.is_some_and(|t| now.duration_since(t) < DIRECT_RETRY);
        if p.member.inbound && !failed {
            Path::Direct
        } else {
            Path::Relayed
        }
    }

    fn send_frame(&mut self, to: NodeId, frame: &[u8], now: Instant) {
        let Some(p) = self.peers.get_mut(&to) else { return };
        p.counters.frames_out += 1;
        if !p.sessions.iter().any(|s| s.confirmed) {
            if p.queue.len() >= QUEUE {
                p.queue.pop_front();
                self.counters.frames_dropped += 1;
            }
            p.queue.push_back(frame.to_vec());
            self.ensure_handshake(to, now);
            return;
        }
        let path = self.path(&self.peers[&to], now);
        if path == Path::Relayed && !self.relay_ready() {
            let p = self.peers.get_mut(&to).expect("present");
            if p.queue.len() >= QUEUE {
                p.queue.pop_front();
                self.counters.frames_dropped += 1;
            }
            p.queue.push_back(frame.to_vec());
            let relay = self.relay.expect("relayed implies a relay");
            self.ensure_handshake(relay, now);
            return;
        }
        let piece = if path == Path::Relayed { RELAYED_PIECE } else { PIECE };
        let count = frame.len().div_ceil(piece);
        let p = self.peers.get_mut(&to).expect("present");
        let id = p.next_frame;
        p.next_frame = p.next_frame.wrapping_add(1);
        let mut data = Vec::with_capacity(frame.len() + count * (DATA_HEADER + PIECE_HEADER + TAG + RELAY_HEADER + TAG));
        for (i, bytes) in frame.chunks(piece).enumerate() {
            let mut inner = Vec::with_capacity(PIECE_HEADER + bytes.len());
            inner.extend_from_slice(&wire::piece_header(id, i as u8, count as u8));
            inner.extend_from_slice(bytes);
            if !self.seal_for(to, &inner, path, &mut data, now) {
                return;
            }
        }
        let segment = match path {
            Path::Direct => DATA_HEADER + PIECE_HEADER + piece + TAG,
            Path::Relayed => RELAY_HEADER + DATA_HEADER + PIECE_HEADER + piece + TAG + TAG,
        };
        let (addr, segment) = (self.address_for(to, path), if count > 1 { segment } else { 0 });
        self.transmits.push(Transmit { to: addr, data, segment });
    }

    fn relay_ready(&self) -> bool {
        self.relay.and_then(|r| self.peers.get(&r)).is_some_and(|r| r.sessions.iter().any(|s| s.confirmed))
    }

    fn address_for(&self, to: NodeId, path: Path) -> SocketAddr {
        match path {
            Path::Direct => self.peers[&to].endpoint,
            Path::Relayed => self.peers[&self.relay.expect("relayed implies a relay")].endpoint,
        }
    }

    /// Appends one data packet of `inner` for `to` to `out` (wrapped for the
    /// relay when `path` says so). False if there is no session to seal with.
    fn seal_for(&mut self, to: NodeId, inner: &[u8], path: Path, out: &mut Vec<u8>, now: Instant) -> bool {
        let wrap_at = out.len();
        if path == Path::Relayed {
            out.resize(out.len() + RELAY_HEADER, 0);
        }
        let at = out.len();
        out.resize(at + DATA_HEADER, 0);
        out.extend_from_slice(inner);
        let p = self.peers.get_mut(&to).expect("present");
        let Some(s) = p.sessions.iter_mut().find(|s| s.confirmed) else {
            out.truncate(wrap_at);
            return false;
        };
        s.seal_data(out, at);
        p.last_tx = Some(now);
        match path {
            Path::Direct => {
                p.counters.tx_direct += 1;
                true
            }
            Path::Relayed => {
                p.counters.tx_relayed += 1;
                self.wrap(to, out, wrap_at)
            }
        }
    }

    /// Seals the relay wrapper around `out[at + RELAY_HEADER..]` for `to`.
    fn wrap(&mut self, to: NodeId, out: &mut Vec<u8>, at: usize) -> bool {
        let relay = self.relay.expect("relayed implies a relay");
        let r = self.peers.get_mut(&relay).expect("the relay is a peer");
        match r.sessions.iter_mut().find(|s| s.confirmed) {
            Some(s) => {
                s.seal_relay(out, at, to);
                true
            }
            None => {
                out.truncate(at);
                false
            }
        }
    }

    /// Sends a handshake message (or any whole datagram) to `to` by its path.
    fn send_datagram(&mut self, to: NodeId, datagram: Vec<u8>, now: Instant) {
        let path = self.path(&self.peers[&to], now);
        match path {
            Path::Direct => {
                let addr = self.peers[&to].endpoint;
                self.transmits.push(Transmit { to: addr, data: datagram, segment: 0 });
            }
            Path::Relayed => {
                let relay = self.relay.expect("relayed implies a relay");
                let mut out = vec![0u8; RELAY_HEADER];
                out.extend_from_slice(&datagram);
                if self.wrap(to, &mut out, 0) {
                    let addr = self.peers[&relay].endpoint;
                    self.transmits.push(Transmit { to: addr, data: out, segment: 0 });
                } else {
                    // Until there is a session with the relay.
                    if self.via_relay.len() >= QUEUE {
                        self.via_relay.pop_front();
                    }
                    self.via_relay.push_back((to, datagram));
                    self.ensure_handshake(relay, now);
                }
            }
        }
    }

    // ---- handshakes ----

    fn new_index(&mut self, peer: NodeId) -> u32 {
        loop {
            let i: u32 = rand::random();
            if i != 0 && !self.by_index.contains_key(&i) {
                self.by_index.insert(i, peer);
                return i;
            }
        }
    }

    fn ensure_handshake(&mut self, to: NodeId, now: Instant) {
        if self.peers[&to].pending.is_none() {
            self.initiate(to, now, 0);
        }
    }

    fn initiate(&mut self, to: NodeId, now: Instant, tries: u32) {
        let index = self.new_index(to);
        let p = &self.peers[&to];
        let (state, message) = handshake::initiate(&self.keys, &p.member.public, &self.psk, index, handshake::tai64n(SystemTime::now()), p.cookie.as_ref());
        if let Some(old) = self.peers.get_mut(&to).expect("present").pending.take() {
            self.by_index.remove(&old.state.local_index);
        }
        self.peers.get_mut(&to).expect("present").pending = Some(Pending { state, message: message.clone(), sent: now, tries });
        self.send_datagram(to, message, now);
    }

    /// Whether a handshake message from `from` may be worked on now.
    fn admit(&mut self, msg: &[u8], from: SocketAddr, receiver: u32, now: Instant) -> bool {
        if now.duration_since(self.load.0) >= Duration::from_secs(1) {
            self.load = (now, 0);
        }
        self.load.1 += 1;
        if self.load.1 <= UNDER_LOAD {
            return true;
        }
        if !self.cookies.mac2_ok(msg, from, now) {
            // A cookie costs no Diffie-Hellman; it proves the sender owns its address.
            self.counters.dropped_rate_limited += 1;
            if self.load.1 <= UNDER_LOAD * 20 {
                let reply = self.cookies.reply(&self.keys, msg, receiver, from, now);
                self.counters.cookies_sent += 1;
                self.transmits.push(Transmit { to: from, data: reply, segment: 0 });
            }
            return false;
        }
        let (at, tokens) = self.sources.entry(from.ip()).or_insert((now, PER_SOURCE));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * PER_SOURCE).min(PER_SOURCE);
        *at = now;
        if *tokens < 1.0 {
            self.counters.dropped_rate_limited += 1;
            return false;
        }
        *tokens -= 1.0;
        true
    }

    fn on_initiation(&mut self, from: SocketAddr, bytes: &[u8], sender: u32, noise: &[u8], relayed: bool, now: Instant) {
        if !handshake::mac1_ok(bytes, &self.mac1_key) {
            self.counters.dropped_unauthenticated += 1;
            return;
        }
        if !self.admit(bytes, from, sender, now) {
            return;
        }
        let Ok(init) = handshake::read_initiation(&self.keys, &self.psk, sender, noise) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let Some(&peer) = self.by_key.get(&init.peer) else {
            self.counters.dropped_strangers += 1;
            return;
        };
        let p = self.peers.get_mut(&peer).expect("keys map to peers");
        if init.timestamp <= p.last_timestamp {
            self.counters.dropped_replayed += 1;
            return;
        }
        p.last_timestamp = init.timestamp;
        if !relayed {
            p.endpoint = from;
        }
        let index = self.new_index(peer);
        let p = &self.peers[&peer];
        let (keys, response) = handshake::respond(init, index, p.cookie.as_ref());
        let session = Session::new(&keys, false, now);
        self.add_session(peer, session);
        let p = self.peers.get_mut(&peer).expect("present");
        p.counters.handshakes += 1;
        p.last_rx = Some(now);
        self.send_datagram(peer, response, now);
    }

    fn on_response(&mut self, from: SocketAddr, bytes: &[u8], sender: u32, receiver: u32, noise: &[u8], relayed: bool, now: Instant) {
        if !handshake::mac1_ok(bytes, &self.mac1_key) {
            self.counters.dropped_unauthenticated += 1;
            return;
        }
        if !self.admit(bytes, from, sender, now) {
            return;
        }
        let Some(&peer) = self.by_index.get(&receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let p = self.peers.get_mut(&peer).expect("indexes map to peers");
        let Some(pending) = p.pending.take_if(|q| q.state.local_index == receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let Ok(keys) = handshake::finish(pending.state, sender, noise) else {
            self.by_index.remove(&receiver);
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        if !relayed {
            p.endpoint = from;
        }
        p.last_rx = Some(now);
        p.counters.handshakes += 1;
        self.add_session(peer, Session::new(&keys, true, now));
        // The responder sends only once it knows we hold the keys.
        self.send_inner(peer, &[], now);
        self.flush(peer, now);
    }

    fn on_cookie(&mut self, receiver: u32, nonce: &[u8], sealed: &[u8], now: Instant) {
        let Some(&peer) = self.by_index.get(&receiver) else { return };
        let p = self.peers.get_mut(&peer).expect("present");
        let Some(pending) = &p.pending else { return };
        if let Some(cookie) = handshake::open_cookie(&p.member.public, handshake::mac1_of(&pending.message), nonce, sealed) {
            p.cookie = Some(cookie);
            let tries = pending.tries;
            self.initiate(peer, now, tries);
        }
    }

    fn add_session(&mut self, peer: NodeId, s: Session) {
        let p = self.peers.get_mut(&peer).expect("present");
        p.sessions.insert(0, s);
        // Current, previous and one more in transition are enough.
        for old in p.sessions.drain(3.min(p.sessions.len())..) {
            self.by_index.remove(&old.local_index);
        }
    }

    /// Sends what waited for a session with `peer`.
    fn flush(&mut self, peer: NodeId, now: Instant) {
        let queued: Vec<Vec<u8>> = self.peers.get_mut(&peer).expect("present").queue.drain(..).collect();
        for f in queued {
            self.peers.get_mut(&peer).expect("present").counters.frames_out -= 1;
            self.send_frame(peer, &f, now);
        }
        if Some(peer) == self.relay {
            let waiting: Vec<(NodeId, Vec<u8>)> = self.via_relay.drain(..).collect();
            for (to, d) in waiting {
                self.send_datagram(to, d, now);
            }
            // Frames for peers reached through the relay waited for this too.
            let others: Vec<NodeId> = self.peers.iter().filter(|(_, p)| !p.queue.is_empty() && p.sessions.iter().any(|s| s.confirmed)).map(|(n, _)| *n).collect();
            for n in others {
                self.flush(n, now);
            }
        }
    }

    /// One data packet of `inner` (a keepalive when empty) to `peer`.
    fn send_inner(&mut self, peer: NodeId, inner: &[u8], now: Instant) {
        let path = self.path(&self.peers[&peer], now);
        let mut out = Vec::with_capacity(64 + inner.len());
        if self.seal_for(peer, inner, path, &mut out, now) {
            let addr = self.address_for(peer, path);
            self.transmits.push(Transmit { to: addr, data: out, segment: 0 });
        }
    }

    // ---- datagrams from the network ----

    /// A datagram from `from`. It is opened in place.
    pub fn from_network(&mut self, from: SocketAddr, datagram: &mut [u8], now: Instant) {
        let relayed = self.relay.is_some_and(|r| r != self.me && self.peers.get(&r).is_some_and(|p| p.endpoint == from));
        self.receive(from, datagram, relayed, now);
    }

    fn receive(&mut self, from: SocketAddr, datagram: &mut [u8], via_relay_addr: bool, now: Instant) {
        let parsed = match wire::parse(datagram) {
            Ok(d) => d,
            Err(_) => {
                self.counters.dropped_unauthenticated += 1;
                return;
            }
        };
        match parsed {
            Datagram::Initiation { sender, noise, .. } => {
                let noise = noise.to_vec();
                self.on_initiation(from, datagram, sender, &noise, via_relay_addr, now)
            }
            Datagram::Response { sender, receiver, noise, .. } => {
                let noise = noise.to_vec();
                self.on_response(from, datagram, sender, receiver, &noise, via_relay_addr, now)
            }
            Datagram::CookieReply { receiver, nonce, sealed } => {
                let (nonce, sealed) = (nonce.to_vec(), sealed.to_vec());
                self.on_cookie(receiver, &nonce, &sealed, now)
            }
            Datagram::Data { receiver, counter, .. } => self.on_data(from, datagram, receiver, counter, via_relay_addr, now),
            Datagram::Relay { receiver, counter, to, .. } => self.on_relay(from, datagram, receiver, counter, to, now),
        }
    }

    fn on_data(&mut self, from: SocketAddr, datagram: &mut [u8], receiver: u32, counter: u64, via_relay_addr: bool, now: Instant) {
        let Some(&peer) = self.by_index.get(&receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let p = self.peers.get_mut(&peer).expect("indexes map to peers");
        let Some(s) = p.sessions.iter_mut().find(|s| s.local_index == receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let fresh = s.replay_fresh(counter);
        let (header, sealed) = datagram.split_at_mut(DATA_HEADER);
        let Some(n) = s.open_data(header, counter, sealed, now) else {
            if fresh {
                self.counters.dropped_unauthenticated += 1;
            } else {
                self.counters.dropped_replayed += 1;
            }
            return;
        };
        // A packet from the relay's address for another peer came through the relay.
        let relayed = via_relay_addr && Some(peer) != self.relay;
        if relayed {
            p.counters.rx_relayed += 1;
        } else {
            p.counters.rx_direct += 1;
            p.endpoint = from;
        }
        p.last_rx = Some(now);
        p.probe = None;
        let inner = &sealed[..n];
        let was_confirmed_flush = !p.queue.is_empty();
        match wire::parse_inner(inner) {
            Ok(Inner::Keepalive) => {}
            Ok(Inner::Probe(v)) => {
                self.send_inner(peer, &wire::probe(wire::PROBE_ANSWER, v), now);
            }
            Ok(Inner::ProbeAnswer(_)) => {}
            Ok(Inner::Piece { frame, index, count, bytes }) => {
                if let Some(f) = p.reassembly.add(frame, index, count, bytes, now) {
                    p.counters.frames_in += 1;
                    self.deliver(peer, f, now);
                }
            }
            Err(_) => self.counters.frames_dropped += 1,
        }
        if was_confirmed_flush {
            self.flush(peer, now);
        }
    }

    /// A frame from `peer`: to our own ports only (see the module's comment).
    fn deliver(&mut self, peer: NodeId, frame: Vec<u8>, now: Instant) {
        if frame.len() < MIN_FRAME {
            self.counters.frames_dropped += 1;
            return;
        }
        let (dst, src) = (frames::destination(&frame), frames::source(&frame));
        if !is_group(&src) {
            self.macs.insert(src, (Place::Peer(peer), now));
        }
        match self.macs.get(&dst).map(|e| e.0) {
            Some(Place::Port(p)) if !is_group(&dst) => self.deliveries.push(Delivery { port: p, frame }),
            Some(Place::Peer(_)) if !is_group(&dst) => self.counters.frames_dropped += 1,
            _ => {
                if let Some((&last, rest)) = self.ports.split_last() {
                    for &p in rest {
                        self.deliveries.push(Delivery { port: p, frame: frame.clone() });
                    }
                    self.deliveries.push(Delivery { port: last, frame });
                }
            }
        }
    }

    fn on_relay(&mut self, from: SocketAddr, datagram: &mut [u8], receiver: u32, counter: u64, to: NodeId, now: Instant) {
        let Some(&peer) = self.by_index.get(&receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let p = self.peers.get_mut(&peer).expect("present");
        let Some(s) = p.sessions.iter_mut().find(|s| s.local_index == receiver) else {
            self.counters.dropped_unauthenticated += 1;
            return;
        };
        let n = datagram.len();
        if !s.open_relay(counter, &datagram[..n - TAG], &datagram[n - TAG..], now) {
            self.counters.dropped_unauthenticated += 1;
            return;
        }
        p.endpoint = from;
        p.last_rx = Some(now);
        let inner = &datagram[RELAY_HEADER..n - TAG];
        if to == self.me {
            // Meant for us after all: as if it came straight from `peer`.
            let mut inner = inner.to_vec();
            self.receive(from, &mut inner, false, now);
            return;
        }
        let Some(dest) = self.peers.get(&to) else {
            self.counters.frames_dropped += 1;
            return;
        };
        self.counters.relayed_for_others += 1;
        let to = dest.endpoint;
        self.push_datagram(to, inner);
    }

    /// Queues one datagram, joined to the transmit before it when that goes
    /// to the same place in datagrams of this size: a relay passes a burst on
    /// in one segmented send instead of one system call per datagram.
    fn push_datagram(&mut self, to: SocketAddr, d: &[u8]) {
        if let Some(last) = self.transmits.last_mut() {
            let segment = if last.segment == 0 { last.data.len() } else { last.segment };
            if last.to == to && d.len() <= segment && last.data.len() % segment == 0 && last.data.len() < 64 * segment {
                last.segment = segment;
                last.data.extend_from_slice(d);
                return;
            }
        }
        self.transmits.push(Transmit { to, data: d.to_vec(), segment: 0 });
    }

    // ---- time ----

    /// Retries, renewals, probes, keepalives and expiry.
    pub fn tick(&mut self, now: Instant) {
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        for id in ids {
            let path = self.path(&self.peers[&id], now);
            let p = self.peers.get_mut(&id).expect("present");
            let expired: Vec<u32> = p.sessions.iter().filter(|s| s.expired(now)).map(|s| s.local_index).collect();
            p.sessions.retain(|s| !s.expired(now));
            for i in expired {
                self.by_index.remove(&i);
            }
            p.reassembly.expire(now);
            let p = self.peers.get_mut(&id).expect("present");
            if let Some(pending) = &p.pending {
                if now.duration_since(pending.sent) >= RETRY {
                    let tries = pending.tries + 1;
                    if path == Path::Direct && tries >= DIRECT_TRIES && Some(id) != self.relay && self.relay.is_some() {
                        // The direct path does not answer: through the relay from now on.
                        p.direct_failed = Some(now);
                    }
                    self.initiate(id, now, tries);
                    continue;
                }
            }
            let wants_rekey = p.pending.is_none() && p.sessions.first().is_some_and(|s| s.wants_rekey(now));
            if wants_rekey {
                self.initiate(id, now, 0);
                continue;
            }
            // A direct peer gone quiet while we talk to it: probe, then give up on the path.
            if path == Path::Direct && Some(id) != self.relay && self.relay.is_some() && p.sessions.iter().any(|s| s.confirmed) {
                let quiet = p.last_rx.is_none_or(|t| now.duration_since(t) >= PROBE_AFTER);
                let talking = p.last_tx.is_some_and(|t| now.duration_since(t) < PROBE_AFTER);
                match p.probe {
                    Some((_, sent)) if now.duration_since(sent) >= PROBE_TIMEOUT => {
                        p.direct_failed = Some(now);
                        p.probe = None;
                    }
                    None if quiet && talking => {
                        let v: u64 = rand::random();
                        p.probe = Some((v, now));
                        self.send_inner(id, &wire::probe(wire::PROBE, v), now);
                    }
                    _ => {}
                }
            }
        }
        // Keep the way to the relay open, and the relay's way back to us.
        if let Some(relay) = self.relay.filter(|&r| r != self.me) {
            if self.last_keepalive.is_none_or(|t| now.duration_since(t) >= KEEPALIVE) {
                self.last_keepalive = Some(now);
                if self.peers[&relay].sessions.iter().any(|s| s.confirmed) {
                    self.send_inner(relay, &[], now);
                } else {
                    self.ensure_handshake(relay, now);
                }
            }
        }
        self.macs.retain(|_, (_, t)| now.duration_since(*t) < MAC_AGING);
    }
}
