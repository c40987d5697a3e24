//! A network node fed what the internet could send it: the input is a
//! script of steps, each datagrams from a member's address or a stranger's,
//! frames from its local port, or time passing. Between two real nodes, the
//! datagrams one sends the other are delivered, mutated by the input, so the
//! fuzzer reaches past the handshake into sessions, relaying and pieces.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cpushare_vnet::handshake::StaticKeys;
use cpushare_vnet::node::{Config, Member, Node};
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static [StaticKeys; 3] {
    static KEYS: OnceLock<[StaticKeys; 3]> = OnceLock::new();
    KEYS.get_or_init(|| [StaticKeys::generate(), StaticKeys::generate(), StaticKeys::generate()])
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i as u8 + 1], 51820))
}

fn nodes(now: Instant) -> Vec<Node> {
    let k = keys();
    let members: Vec<Member> = (0..3).map(|i| Member { node: i as u32 + 1, public: k[i].public, endpoint: addr(i), inbound: i != 2, relay: i == 0 }).collect();
    (0..3)
        .map(|i| {
            let c = Config { cluster: 7, psk: [3; 32], me: i as u32 + 1, secret: k[i].secret, public: k[i].public, members: members.clone() };
            Node::new(&c, vec![0], now).unwrap()
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut net = nodes(now);
    let mut input = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if input.len() < n {
            return None;
        }
        let (a, b) = input.split_at(n);
        input = b;
        Some(a)
    };
    while let Some(&[op, who]) = take(2) {
        let Some(&[len]) = take(1) else { break };
        let body = take(len as usize * 4).unwrap_or_default().to_vec();
        let at = who as usize % 3;
        match op % 5 {
            // A datagram to node `at`, from a member or from a stranger.
            0 | 1 => {
                let from = if op % 5 == 0 { addr((who as usize / 3) % 3) } else { SocketAddr::from(([192, 0, 2, who], 4000)) };
                let mut d = body;
                net[at].from_network(from, &mut d, now);
            }
            // A frame from node `at`'s VM (virtio-net header first).
            2 => net[at].from_port(0, &body, now),
            // Time passes.
            3 => {
                now += Duration::from_millis(u64::from(who) * 50);
                for n in &mut net {
                    n.tick(now);
                }
            }
            // What the nodes sent each other, delivered, with `body` XORed into each datagram.
            _ => {
                let mut flight = Vec::new();
                for (i, n) in net.iter_mut().enumerate() {
                    n.deliveries.clear();
                    for t in n.transmits.drain(..) {
                        let seg = if t.segment == 0 { t.data.len().max(1) } else { t.segment };
                        for d in t.data.chunks(seg) {
                            flight.push((i, t.to, d.to_vec()));
                        }
                    }
                }
                for (k, (from, to, mut d)) in flight.into_iter().enumerate() {
                    if !body.is_empty() {
                        let x = body[k % body.len()];
                        let i = (k * 7 + x as usize) % d.len().max(1);
                        if let Some(b) = d.get_mut(i) {
                            *b ^= x;
                        }
                    }
                    if let Some(j) = (0..3).find(|&j| addr(j) == to) {
                        net[j].from_network(addr(from), &mut d, now);
                    }
                }
            }
        }
    }
    for n in &net {
        let _ = n.counters(now);
    }
});
