//! Whole clusters of nodes in one process, over a simulated network with
//! stateful firewalls (a node that does not accept inbound UDP receives only
//! from addresses it has sent to), driven step by step.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cpushare_vnet::handshake::StaticKeys;
use cpushare_vnet::node::{Config, Member, Node, Transmit};

const PORT: u32 = 0;

struct Host {
    node: Node,
    addr: SocketAddr,
    /// Really takes unsolicited datagrams (may differ from what the member list claims).
    open: bool,
    contacted: HashSet<SocketAddr>,
    got: Vec<Vec<u8>>,
}

struct Sim {
    hosts: Vec<Host>,
    now: Instant,
    /// Called on every datagram in flight: may change or drop it.
    meddle: Box<dyn FnMut(usize, &mut Vec<u8>) -> bool>,
    /// Every datagram that crossed, for replaying.
    log: Vec<(usize, SocketAddr, Vec<u8>)>,
    keys: Vec<StaticKeys>,
}

/// Host `i`'s node id.
fn id(i: usize) -> u32 {
    i as u32 + 1
}

fn addr(i: usize) -> SocketAddr {
    format!("10.0.0.{}:51820", i + 1).parse().unwrap()
}

fn mac(i: usize) -> [u8; 6] {
    [0x52, 0x54, 0, 0, 0, i as u8 + 1]
}

/// A frame from endpoint `from` to `to` (None: broadcast), virtio-net header first.
fn frame(from: usize, to: Option<usize>, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend_from_slice(&to.map_or([0xff; 6], mac));
    f.extend_from_slice(&mac(from));
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(payload);
    f
}

/// Members: 0 is the buyer (the relay); `open[i]` says who accepts inbound UDP.
fn cluster(open: &[bool], psk: [u8; 32]) -> (Vec<Config>, Vec<StaticKeys>) {
    let keys: Vec<StaticKeys> = open.iter().map(|_| StaticKeys::generate()).collect();
    let members: Vec<Member> = open
        .iter()
        .enumerate()
        .map(|(i, &inbound)| Member { node: i as u32 + 1, public: keys[i].public, endpoint: addr(i), inbound: inbound || i == 0, relay: i == 0 })
        .collect();
    let configs = (0..open.len())
        .map(|i| Config { cluster: 7, psk, me: i as u32 + 1, secret: keys[i].secret, public: keys[i].public, members: members.clone() })
        .collect();
    (configs, keys)
}

impl Sim {
    fn new(open: &[bool]) -> Sim {
        let now = Instant::now();
        let (configs, keys) = cluster(open, [3; 32]);
        let hosts = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Host { node: Node::new(c, vec![PORT], now).unwrap(), addr: addr(i), open: open[i] || i == 0, contacted: HashSet::new(), got: Vec::new() })
            .collect();
        Sim { hosts, now, meddle: Box::new(|_, _| true), log: Vec::new(), keys }
    }

    /// Splits a transmit into its datagrams, as UDP segmentation offload does.
    fn datagrams(t: Transmit) -> Vec<Vec<u8>> {
        if t.segment == 0 {
            vec![t.data]
        } else {
            t.data.chunks(t.segment).map(<[u8]>::to_vec).collect()
        }
    }

    /// Moves everything in flight until nothing moves.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut flight = Vec::new();
            for (i, h) in self.hosts.iter_mut().enumerate() {
                for d in h.node.deliveries.drain(..) {
                    h.got.push(d.frame);
                }
                for t in h.node.transmits.drain(..) {
                    let to = t.to;
                    h.contacted.insert(to);
                    for d in Self::datagrams(t) {
                        flight.push((i, to, d));
                    }
                }
            }
            if flight.is_empty() {
                return;
            }
            for (from, to, mut d) in flight {
                let Some(j) = self.hosts.iter().position(|h| h.addr == to) else { continue };
                let src = self.hosts[from].addr;
                if !self.hosts[j].open && !self.hosts[j].contacted.contains(&src) {
                    continue; // the firewall drops what was not asked for
                }
                if !(self.meddle)(from, &mut d) {
                    continue;
                }
                self.log.push((j, src, d.clone()));
                self.hosts[j].node.from_network(src, &mut d, self.now);
            }
        }
        panic!("the network never settled");
    }

    fn send(&mut self, from: usize, f: &[u8]) {
        self.hosts[from].node.from_port(PORT, f, self.now);
        self.settle();
    }

    fn wait(&mut self, d: Duration) {
        let step = Duration::from_millis(250);
        let mut left = d;
        while left > Duration::ZERO {
            self.now += step;
            left = left.saturating_sub(step);
            for h in &mut self.hosts {
                h.node.tick(self.now);
            }
            self.settle();
        }
    }

    /// `who` broadcast a hello each (as ARP would), so that everyone learns
    /// where they are; what was heard is forgotten.
    fn introduce(&mut self, who: &[usize]) {
        for &i in who {
            self.send(i, &frame(i, None, b"hello"));
        }
        for i in 0..self.hosts.len() {
            self.took(i);
        }
    }

    fn took(&mut self, i: usize) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.hosts[i].got)
    }

    fn counters(&self, i: usize) -> cpushare_vnet::node::Counters {
        self.hosts[i].node.counters(self.now)
    }
}

#[test]
fn frames_go_direct_between_open_sellers_and_through_the_buyer_to_a_closed_one() {
    // 0 buyer, 1 and 2 accept inbound UDP, 3 does not.
    let mut sim = Sim::new(&[true, true, true, false]);
    // Everyone says hello to everyone (as ARP would): each learns where the others are.
    for i in 0..4 {
        sim.send(i, &frame(i, None, format!("hello from {i}").as_bytes()));
    }
    for i in 0..4 {
        let got = sim.took(i);
        let mut from: Vec<String> = got.iter().map(|f| String::from_utf8_lossy(&f[24..]).into_owned()).collect();
        from.sort();
        let expect: Vec<String> = (0..4).filter(|&j| j != i).map(|j| format!("hello from {j}")).collect();
        assert_eq!(from, expect, "node {i} hears every broadcast once");
    }
    // Unicast, both ways, between every pair of sellers.
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (3, 2), (3, 0), (0, 3)] {
        sim.send(a, &frame(a, Some(b), b"unicast"));
        assert_eq!(sim.took(b), vec![frame(a, Some(b), b"unicast")], "{a} to {b}");
        for other in (0..4).filter(|&o| o != b) {
            assert!(sim.took(other).is_empty(), "{a} to {b} reached {other}: a switch, not a hub");
        }
    }
    let c1 = sim.counters(1);
    assert_eq!((c1.peers[&id(3)].path.as_str(), c1.peers[&id(2)].path.as_str()), ("relayed", "direct"));
    assert!(c1.peers[&id(2)].tx_direct > 0 && c1.peers[&id(2)].tx_relayed == 0, "1 and 2 talk directly: {c1:?}");
    assert!(c1.peers[&id(3)].tx_relayed > 0 && c1.peers[&id(3)].tx_direct == 0, "1 reaches 3 through the buyer: {c1:?}");
    let c3 = sim.counters(3);
    assert!(c3.peers[&id(1)].rx_relayed > 0, "{c3:?}");
    assert!(sim.counters(0).relayed_for_others > 0, "the buyer relayed");
}

#[test]
fn a_64_kib_offload_frame_crosses_whole_direct_and_relayed() {
    let mut sim = Sim::new(&[true, true, false]);
    sim.introduce(&[1, 2]);
    let big: Vec<u8> = (0..65_000u32).map(|i| (i * 7) as u8).collect();
    for (a, b) in [(0, 1), (1, 2), (2, 1)] {
        sim.send(a, &frame(a, Some(b), &big));
        assert_eq!(sim.took(b), vec![frame(a, Some(b), &big)], "{a} to {b}");
    }
}

#[test]
fn tampered_replayed_and_foreign_datagrams_get_nothing_through() {
    let mut sim = Sim::new(&[true, true, true]);
    sim.introduce(&[1, 2]);
    // Tampered: every data datagram from 1 gets a bit flipped.
    sim.meddle = Box::new(|from, d| {
        if from == 1 && d[0] == 4 {
            let n = d.len();
            d[n / 2] ^= 0x40;
        }
        true
    });
    let before = sim.counters(2).dropped_unauthenticated;
    sim.send(1, &frame(1, Some(2), b"tampered"));
    assert!(sim.took(2).is_empty());
    assert!(sim.counters(2).dropped_unauthenticated > before);
    sim.meddle = Box::new(|_, _| true);
    // Replayed: the last datagram 2 received, again.
    sim.send(1, &frame(1, Some(2), b"once"));
    assert_eq!(sim.took(2).len(), 1);
    let (j, from, mut d) = sim.log.iter().rev().find(|(j, _, d)| *j == 2 && d[0] == 4).cloned().unwrap();
    let replayed = sim.counters(2).dropped_replayed;
    sim.hosts[j].node.from_network(from, &mut d, sim.now);
    assert!(sim.hosts[2].node.deliveries.is_empty(), "a replay delivers nothing");
    assert_eq!(sim.counters(2).dropped_replayed, replayed + 1);

    // Another cluster's node, even one that knows 2's key and address: its
    // handshake fails (wrong secret), so nothing it sends is delivered.
    let now = sim.now;
    let (mut other, _) = cluster(&[true, true], [9; 32]);
    let victim = sim.hosts[2].node.counters(now);
    // It aims at host 2 of our cluster: its real key (so mac1 is right) and address.
    other[1].members[0].public = sim.keys[2].public;
    let mut intruder = Node::new(&other[1], vec![PORT], now).unwrap();
    intruder.from_port(PORT, &frame(9, None, b"let me in"), now);
    for t in intruder.transmits.drain(..) {
        for mut d in Sim::datagrams(t) {
            sim.hosts[2].node.from_network("10.9.9.9:1".parse().unwrap(), &mut d, now);
        }
    }
    sim.settle();
    assert!(sim.took(2).is_empty());
    let after = sim.hosts[2].node.counters(now);
    assert_eq!(after.dropped_strangers, victim.dropped_strangers + 1, "its key is no member's");
}

#[test]
fn a_node_of_another_cluster_with_a_member_key_but_not_the_secret_cannot_join() {
    // The same keys, another cluster's psk: the handshake cannot complete.
    let now = Instant::now();
    let (configs, _) = cluster(&[true, true], [3; 32]);
    let mut outsider = configs[1].clone();
    outsider.psk = [4; 32];
    let mut a = Node::new(&configs[0], vec![PORT], now).unwrap();
    let mut b = Node::new(&outsider, vec![PORT], now).unwrap();
    b.from_port(PORT, &frame(1, None, b"hello"), now);
    for _ in 0..10 {
        for t in b.transmits.drain(..).collect::<Vec<_>>() {
            for mut d in Sim::datagrams(t) {
                a.from_network(addr(1), &mut d, now);
            }
        }
        for t in a.transmits.drain(..).collect::<Vec<_>>() {
            for mut d in Sim::datagrams(t) {
                b.from_network(addr(0), &mut d, now);
            }
        }
    }
    assert!(a.deliveries.is_empty() && b.deliveries.is_empty(), "no frame either way");
    assert!(b.counters(now).dropped_unauthenticated > 0, "the response did not open");
}

#[test]
fn a_direct_path_that_does_not_answer_falls_back_to_the_relay() {
    // 2 claims to accept inbound UDP, but its firewall drops it.
    let mut sim = Sim::new(&[true, true, true]);
    sim.hosts[2].open = false;
    sim.wait(Duration::from_secs(1)); // 2 keeps its way to the relay open
    sim.send(1, &frame(1, None, b"are you there"));
    assert!(sim.took(2).is_empty(), "not directly");
    sim.wait(Duration::from_secs(4));
    assert_eq!(sim.took(2), vec![frame(1, None, b"are you there")], "delivered once the relay took over");
    let c = sim.counters(1);
    assert_eq!(c.peers[&id(2)].path, "relayed", "{c:?}");
}

#[test]
fn a_handshake_flood_gets_cookies_not_diffie_hellman() {
    let now = Instant::now();
    let (configs, keys) = cluster(&[true, true], [3; 32]);
    let mut victim = Node::new(&configs[0], vec![PORT], now).unwrap();
    // A stranger who knows the victim's public key (so mac1 is right) floods it.
    let me = StaticKeys::generate();
    let mut replies = 0;
    for i in 0..150u32 {
        let (_, msg) = cpushare_vnet::handshake::initiate(&me, &keys[0].public, &[0; 32], i, cpushare_vnet::handshake::tai64n(std::time::SystemTime::now()), None);
        let from: SocketAddr = format!("192.0.2.{}:{}", i % 250, 1000 + i).parse().unwrap();
        victim.from_network(from, &mut msg.clone(), now);
        replies += victim.transmits.drain(..).filter(|t| t.data[0] == 3).count();
    }
    let c = victim.counters(now);
    assert_eq!(c.dropped_strangers, cpushare_vnet::node::UNDER_LOAD as u64, "Diffie-Hellman only until the node is under load");
    assert_eq!(c.cookies_sent as usize, replies);
    assert_eq!(c.dropped_rate_limited, 150 - cpushare_vnet::node::UNDER_LOAD as u64);
}

#[test]
fn members_leave_and_join_while_the_others_carry_on() {
    let mut sim = Sim::new(&[true, true, true, true]);
    sim.introduce(&[0, 1, 2, 3]);
    for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
        sim.send(a, &frame(a, Some(b), b"before"));
        assert_eq!(sim.took(b).len(), 1, "{a} to {b}");
    }
    let members = |sim: &Sim, keep: &[usize]| -> Vec<Member> {
        keep.iter().map(|&i| Member { node: id(i), public: sim.keys[i].public, endpoint: addr(i), inbound: true, relay: i == 0 }).collect()
    };
    let handshakes = sim.counters(1).peers[&id(2)].handshakes;

    // 3 leaves (its lease ended): the others forget it, and it gets nothing through.
    let now = sim.now;
    let without = members(&sim, &[0, 1, 2]);
    for i in 0..3 {
        sim.hosts[i].node.set_members(&without, now).unwrap();
    }
    sim.send(3, &frame(3, Some(1), b"after leaving"));
    assert!(sim.took(1).is_empty(), "a node that left reaches nobody");
    let c1 = sim.counters(1);
    assert!(c1.peers[&id(3)].left && c1.peers[&id(3)].frames_in == 2, "its final counts stay (a hello and a frame): {c1:?}");
    // 1 and 2 carry on in the session they had.
    sim.send(1, &frame(1, Some(2), b"still here"));
    assert_eq!(sim.took(2), vec![frame(1, Some(2), b"still here")]);
    assert_eq!(sim.counters(1).peers[&id(2)].handshakes, handshakes, "no new handshake for a member list change");

    // A fifth node joins (a replacement): told of the others, and they of it.
    sim.keys.push(StaticKeys::generate());
    let with = members(&sim, &[0, 1, 2, 4]);
    let config = Config { cluster: 7, psk: [3; 32], me: id(4), secret: sim.keys[4].secret, public: sim.keys[4].public, members: with.clone() };
    assert!(Node::new(&Config { members: without.clone(), ..config.clone() }, vec![PORT], now).is_err(), "a node is refused a member list without itself");
    sim.hosts.push(Host { node: Node::new(&config, vec![PORT], now).unwrap(), addr: addr(4), open: true, contacted: HashSet::new(), got: Vec::new() });
    for i in 0..3 {
        sim.hosts[i].node.set_members(&with, now).unwrap();
    }
    for (a, b) in [(4, 1), (1, 4), (2, 4), (4, 0)] {
        sim.send(a, &frame(a, Some(b), b"welcome"));
        assert_eq!(sim.took(b), vec![frame(a, Some(b), b"welcome")], "{a} to {b}");
    }
    let c4 = sim.counters(4);
    assert!([1, 2].iter().all(|&p| c4.peers[&id(p)].path == "direct" && !c4.peers[&id(p)].left), "{c4:?}");
    // An inconsistent list (two members with one key) is refused and changes nothing.
    let mut bad = with.clone();
    bad[2].public = bad[1].public;
    assert!(sim.hosts[1].node.set_members(&bad, now).is_err());
    sim.send(1, &frame(1, Some(2), b"unchanged"));
    assert_eq!(sim.took(2).len(), 1);
}
