//! The control plane of clusters' virtual networks: who is in each network
//! (the buyer of a buy order and the sellers of its leases), their keys,
//! endpoints, MAC and IP addresses, and whether each takes inbound UDP, which
//! the exchange finds out by sending a probe datagram there. Soft state:
//! after a restart, members join again (their streams broke), each asking
//! for the id it had; each network's secret is derived from the exchange's
//! own, so it is the same after a restart.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cpushare_market::NodeId;
use cpushare_proto::v1 as pb;
use tokio::sync::watch;
use tonic::Status;

/// What the exchange's probe datagram starts with (see the protocol).
pub const PROBE_MAGIC: &[u8; 16] = b"cpushare probe\0\0";
/// What a node's signed statement of its network key is called.
pub const VNET_KEY_STATEMENT: &str = "vnet-key";
/// A probe not confirmed this long is forgotten.
const PROBE_LIFETIME: Duration = Duration::from_secs(30);
/// The cluster subnet: 10.77.0.0/16, the buyer at .1.
pub const PREFIX: u32 = 16;
/// The highest member id (10.77.255.254).
const MAX_MEMBER: u32 = 0xfffe;

struct Probe {
    node: NodeId,
    endpoint: SocketAddr,
    token: [u8; 16],
    sent: Instant,
    confirmed: bool,
}

struct Network {
    next_id: u32,
    members: BTreeMap<u32, pb::NetworkMember>,
    views: watch::Sender<Vec<pb::NetworkMember>>,
}

/// Every network, by its cluster's buy order.
pub struct Networks {
    socket: UdpSocket,
    /// What each network's secret is derived from.
    secret: [u8; 32],
    probes: Mutex<HashMap<u64, Probe>>,
    networks: Mutex<HashMap<u64, Network>>,
    /// Nodes whose probe came back (what their slots may claim).
    inbound: Mutex<HashMap<NodeId, SocketAddr>>,
}

/// The member's MAC address: a locally administered one with its id.
pub fn member_mac(id: u32) -> [u8; 6] {
    [0x52, 0x54, 0x00, 0x77, (id >> 8) as u8, id as u8]
}

pub fn member_ip(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, (id >> 8) as u8, id as u8)
}

/// An endpoint a node gave, its IP filled in from where its call came from.
pub fn resolve_endpoint(given: &str, seen: Option<SocketAddr>) -> Result<SocketAddr, Status> {
    let mut e: SocketAddr = given.parse().map_err(|_| Status::invalid_argument(format!("{given:?} is not an IP:port endpoint")))?;
    if e.ip().is_unspecified() {
        let ip = seen.map(|s| s.ip()).ok_or_else(|| Status::invalid_argument("an endpoint of 0.0.0.0 needs a connection address to fill in"))?;
        e.set_ip(ip);
    }
    if e.port() == 0 {
        return Err(Status::invalid_argument("an endpoint needs a port"));
    }
    Ok(e)
}

impl Networks {
    /// `secret`: the exchange's own, lasting across its restarts.
    pub fn new(secret: [u8; 32]) -> std::io::Result<Networks> {
        Ok(Networks { socket: UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?, secret, probes: Mutex::default(), networks: Mutex::default(), inbound: Mutex::default() })
    }

    /// The secret of `order`'s network: derived, so the same after a restart.
    pub fn psk(&self, order: u64) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::new().chain_update(self.secret).chain_update(order.to_le_bytes()).finalize().into()
    }

    /// Sends a probe datagram to `endpoint` for `node`; returns its id.
    pub fn probe(&self, node: NodeId, endpoint: SocketAddr) -> Result<u64, Status> {
        let token: [u8; 16] = rand::random();
        let id: u64 = rand::random::<u64>() | 1;
        let mut d = PROBE_MAGIC.to_vec();
        d.extend_from_slice(&token);
        // IPv6 endpoints need an IPv6 socket; one retry covers a lost datagram on loopback-like paths.
        let sent = if endpoint.is_ipv4() { self.socket.send_to(&d, endpoint) } else { UdpSocket::bind("[::]:0").and_then(|s| s.send_to(&d, endpoint)) };
        sent.map_err(|e| Status::invalid_argument(format!("cannot send a probe to {endpoint}: {e}")))?;
        let mut probes = self.probes.lock().unwrap();
        probes.retain(|_, p| p.sent.elapsed() < PROBE_LIFETIME);
        probes.insert(id, Probe { node, endpoint, token, sent: Instant::now(), confirmed: false });
        Ok(id)
    }

    pub fn confirm(&self, node: NodeId, probe: u64, token: &[u8]) -> Result<(), Status> {
        let mut probes = self.probes.lock().unwrap();
        let p = probes.get_mut(&probe).filter(|p| p.node == node).ok_or_else(|| Status::not_found("no such probe of this node (it may have expired: probe again)"))?;
        if p.token != token {
            return Err(Status::permission_denied("the token is not the probe's"));
        }
        p.confirmed = true;
        self.inbound.lock().unwrap().insert(node, p.endpoint);
        Ok(())
    }

    /// Whether `node` showed it takes inbound UDP.
    pub fn takes_inbound(&self, node: NodeId) -> bool {
        self.inbound.lock().unwrap().contains_key(&node)
    }

    fn confirmed(&self, node: NodeId, probe: u64, endpoint: SocketAddr) -> bool {
        self.probes.lock().unwrap().get(&probe).is_some_and(|p| p.node == node && p.confirmed && p.endpoint == endpoint)
    }

    /// Adds a member to `order`'s network (made on first join); returns its
    /// id and a receiver of the member lists. A member joining again gets the
    /// id it asks for (`rejoin_as`) unless another node holds it.
    pub fn join(&self, order: u64, mut member: pb::NetworkMember, probe: u64, relay: bool, rejoin_as: u32) -> (u32, watch::Receiver<Vec<pb::NetworkMember>>) {
        let endpoint: SocketAddr = member.endpoint.parse().expect("resolved before");
        member.inbound = relay || self.confirmed(NodeId(member.node), probe, endpoint);
        let mut networks = self.networks.lock().unwrap();
        let net = networks.entry(order).or_insert_with(|| Network { next_id: 2, members: BTreeMap::new(), views: watch::channel(Vec::new()).0 });
        let free = |id: u32| net.members.get(&id).is_none_or(|m| m.node == member.node);
        let id = if relay {
            1
        } else if (2..=MAX_MEMBER).contains(&rejoin_as) && free(rejoin_as) {
            net.next_id = net.next_id.max(rejoin_as + 1);
            rejoin_as
        } else {
            while !free(net.next_id) {
                net.next_id += 1;
            }
            net.next_id += 1;
            net.next_id - 1
        };
        member.id = id;
        member.relay = relay;
        member.mac = member_mac(id).to_vec();
        member.ip = member_ip(id).to_string();
        net.members.insert(id, member);
        let list: Vec<pb::NetworkMember> = net.members.values().cloned().collect();
        net.views.send_replace(list);
        (id, net.views.subscribe())
    }

    /// A member leaves (its stream closed, its lease ended).
    pub fn leave(&self, order: u64, id: u32) {
        let mut networks = self.networks.lock().unwrap();
        if let Some(net) = networks.get_mut(&order) {
            net.members.remove(&id);
            if net.members.is_empty() {
                networks.remove(&order);
                return;
            }
            let list = net.members.values().cloned().collect();
            net.views.send_replace(list);
        }
    }

    /// Members on `lease` leave: it ended.
    pub fn lease_ended(&self, lease: u64) {
        let found: Vec<(u64, u32)> = self
            .networks
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(order, net)| net.members.values().filter(|m| m.lease == lease && m.lease != 0).map(|m| (*order, m.id)).collect::<Vec<_>>())
            .collect();
        for (order, id) in found {
            self.leave(order, id);
        }
    }
}

/// The view a member gets.
pub fn view(psk: [u8; 32], me: u32, members: Vec<pb::NetworkMember>) -> pb::NetworkView {
    pb::NetworkView { psk: psk.to_vec(), me, members, prefix: PREFIX }
}

/// Leaves a network when dropped (with the member's stream).
pub struct Leave {
    pub networks: std::sync::Arc<Networks>,
    pub order: u64,
    pub id: u32,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.networks.leave(self.order, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(node: u64) -> pb::NetworkMember {
        pb::NetworkMember { node, endpoint: "127.0.0.1:9".into(), ..Default::default() }
    }

    #[test]
    fn members_joining_again_keep_their_ids_and_the_secret_outlives_a_restart() {
        let secret = [7u8; 32];
        let before = Networks::new(secret).unwrap();
        assert_eq!(before.join(5, member(1), 0, true, 0).0, 1, "the buyer is 1");
        assert_eq!(before.join(5, member(2), 0, false, 0).0, 2);
        assert_eq!(before.join(5, member(3), 0, false, 0).0, 3);
        let psk = before.psk(5);
        assert_ne!(Networks::new(secret).unwrap().psk(6), psk, "each network its own secret");

        // The exchange restarted: the members come back in another order, a new one among them.
        let after = Networks::new(secret).unwrap();
        assert_eq!(after.join(5, member(3), 0, false, 3).0, 3, "the id it asks for");
        assert_eq!(after.join(5, member(4), 0, false, 0).0, 4, "a new member takes none held");
        assert_eq!(after.join(5, member(2), 0, false, 2).0, 2);
        assert_eq!(after.join(5, member(1), 0, true, 0).0, 1);
        assert_eq!(after.psk(5), psk, "the same secret");
        // An id another node holds is not given; nor one outside the subnet.
        assert_eq!(after.join(5, member(9), 0, false, 3).0, 5);
        assert_eq!(after.join(5, member(10), 0, false, 70_000).0, 6);
        let ips: Vec<String> = after.networks.lock().unwrap()[&5].members.values().map(|m| m.ip.clone()).collect();
        assert_eq!(ips, ["10.77.0.1", "10.77.0.2", "10.77.0.3", "10.77.0.4", "10.77.0.5", "10.77.0.6"]);
    }

    #[test]
    fn a_new_member_skips_ids_taken_by_members_that_joined_again() {
        let n = Networks::new([1; 32]).unwrap();
        assert_eq!(n.join(8, member(2), 0, false, 2).0, 2);
        assert_eq!(n.join(8, member(3), 0, false, 4).0, 4);
        // next_id went past 4; 3 stays free for its owner, who may still come back.
        assert_eq!(n.join(8, member(5), 0, false, 0).0, 5);
        assert_eq!(n.join(8, member(6), 0, false, 3).0, 3);
    }
}
