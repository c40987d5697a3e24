//! A node's side of the virtual network's control plane: proving its
//! endpoint takes inbound UDP, joining a cluster's network with its key
//! signed by its node certificate, and checking every other member's key the
//! same way before trusting it.

use std::net::SocketAddr;

use anyhow::Context;
use cpushare_proto::v1 as pb;
use prost::Message;

use crate::client::Connection;
use crate::networks::VNET_KEY_STATEMENT;
use crate::pki::{verify_statement, Identity};

/// A member whose key checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub node: u64,
    pub public: [u8; 32],
    pub endpoint: SocketAddr,
    pub inbound: bool,
    pub relay: bool,
    pub mac: [u8; 6],
    pub ip: std::net::Ipv4Addr,
    pub lease: u64,
}

/// A network as a member sees it.
#[derive(Debug, Clone)]
pub struct View {
    pub psk: [u8; 32],
    pub me: u32,
    pub prefix: u8,
    pub members: Vec<Member>,
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("the exchange refused: {}", s.message())
}

/// Asks the exchange to probe `port` (on the address it sees us at); returns
/// the probe and where it was sent.
pub async fn request_probe(conn: &Connection, port: u16) -> anyhow::Result<(u64, String)> {
    let r = conn.exchange.clone().probe_inbound(pb::ProbeInboundRequest { endpoint: format!("0.0.0.0:{port}") }).await.map_err(status)?.into_inner();
    Ok((r.probe, r.endpoint))
}

pub async fn confirm_probe(conn: &Connection, probe: u64, token: [u8; 16]) -> anyhow::Result<()> {
    conn.exchange.clone().confirm_inbound(pb::ConfirmInboundRequest { probe, token: token.to_vec() }).await.map_err(status)?;
    Ok(())
}

/// Has the exchange probe `udp` and answers it if the probe arrives within a
/// second; returns the socket and the confirmed probe's id (0: it did not
/// arrive, so this endpoint takes no unsolicited UDP).
pub async fn prove_inbound(conn: &Connection, mut udp: cpushare_vnet::io::Udp) -> anyhow::Result<(cpushare_vnet::io::Udp, u64)> {
    let (probe, _) = request_probe(conn, udp.local_addr()?.port()).await?;
    let (udp, token) = tokio::task::spawn_blocking(move || {
        let t = cpushare_vnet::run::await_probe(&mut udp, std::time::Duration::from_secs(1));
        (udp, t)
    })
    .await?;
    match token {
        Some(t) => {
            confirm_probe(conn, probe, t).await?;
            Ok((udp, probe))
        }
        None => Ok((udp, 0)),
    }
}

/// Whether this host takes unsolicited UDP (proved on a fresh socket): what
/// a seller's slots may then claim.
pub async fn takes_inbound_udp(conn: &Connection) -> anyhow::Result<bool> {
    let udp = cpushare_vnet::io::Udp::bind("0.0.0.0:0".parse().expect("an address")).context("binding a UDP socket")?;
    Ok(prove_inbound(conn, udp).await?.1 != 0)
}

/// Joins `order`'s network (`lease` 0: as its buyer) with `public` as this
/// node's key, receiving at `port` (probe: the one confirmed for it, or 0).
pub async fn join(conn: &Connection, identity: &Identity, order: u64, lease: u64, public: [u8; 32], port: u16, probe: u64) -> anyhow::Result<tonic::Streaming<pb::NetworkView>> {
    let req = Joining { identity, order, lease, public, port }.request(probe, 0)?;
    Ok(conn.exchange.clone().join_network(req).await.map_err(status)?.into_inner())
}

/// Who joins which network, with which key, receiving at which port.
struct Joining<'a> {
    identity: &'a Identity,
    order: u64,
    lease: u64,
    public: [u8; 32],
    port: u16,
}

impl Joining<'_> {
    /// What it asks, `rejoin_as` the member id it had (0: none).
    fn request(&self, probe: u64, rejoin_as: u32) -> anyhow::Result<pb::JoinNetworkRequest> {
        let Joining { identity, order, lease, public, port } = *self;
        let statement = pb::VnetKey { order, public: public.to_vec() }.encode_to_vec();
        let signature = identity.sign_statement(VNET_KEY_STATEMENT, &statement)?;
        let key = pb::SignedStatement { statement, signature, certificate: identity.cert.to_vec() };
        Ok(pb::JoinNetworkRequest { order, lease, public: public.to_vec(), key: Some(key), endpoint: format!("0.0.0.0:{port}"), probe, rejoin_as })
    }
}

/// A member whose stream broke (the exchange restarted, the link failed)
/// joins again as itself: the same key, port and id, its inbound UDP proved
/// again through the running node (which hands over the probe's token).
/// Tries until it is back, or returns None once the exchange says it may no
/// longer join (its lease or order ended).
async fn rejoin(conn: &Connection, who: &Joining<'_>, me: u32, tokens: &std::sync::Mutex<std::sync::mpsc::Receiver<[u8; 16]>>) -> Option<tonic::Streaming<pb::NetworkView>> {
    let order = who.order;
    let mut pause = std::time::Duration::from_millis(500);
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
        let next_token = || tokens.lock().unwrap().try_recv().ok();
        while next_token().is_some() {}
        let Ok((probe, _)) = request_probe(conn, who.port).await else { continue };
        let mut token = None;
        for _ in 0..20 {
            if let Some(t) = next_token() {
                token = Some(t);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let probe = match token {
            Some(t) if confirm_probe(conn, probe, t).await.is_ok() => probe,
            _ => 0,
        };
        let Ok(req) = who.request(probe, me) else { return None };
        match conn.exchange.clone().join_network(req).await {
            Ok(r) => {
                tracing::info!(order, member = me, "back on the network's member list");
                return Some(r.into_inner());
            }
            Err(s) if matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::NotFound | tonic::Code::InvalidArgument) => {
                tracing::info!(order, member = me, "no longer a member: {}", s.message());
                return None;
            }
            Err(_) => {}
        }
    }
}

/// The members of a view whose keys are signed by certificates of `ca` naming
/// their nodes; the others are left out (and said so in the log).
pub fn verify(ca: &rustls::pki_types::CertificateDer<'_>, order: u64, v: &pb::NetworkView) -> anyhow::Result<View> {
    let psk: [u8; 32] = v.psk.as_slice().try_into().context("a network secret that is not 32 bytes")?;
    let mut members = Vec::new();
    for m in &v.members {
        match member(ca, order, m) {
            Ok(x) => members.push(x),
            Err(e) => tracing::warn!(member = m.id, node = m.node, "left out of the network: {e}"),
        }
    }
    anyhow::ensure!(members.iter().any(|m| m.id == v.me), "the exchange's member list leaves this node out");
    Ok(View { psk, me: v.me, prefix: v.prefix as u8, members })
}

fn member(ca: &rustls::pki_types::CertificateDer<'_>, order: u64, m: &pb::NetworkMember) -> anyhow::Result<Member> {
    let key = m.key.as_ref().context("no signed key")?;
    verify_statement(ca, &key.certificate, m.node, VNET_KEY_STATEMENT, &key.statement, &key.signature).map_err(|e| anyhow::anyhow!(e))?;
    let stated = pb::VnetKey::decode(key.statement.as_slice())?;
    anyhow::ensure!(stated.order == order && stated.public == m.public, "its signed key is for another network or another key");
    Ok(Member {
        id: m.id,
        node: m.node,
        public: m.public.as_slice().try_into().context("a key that is not 32 bytes")?,
        endpoint: m.endpoint.parse().context("an endpoint that is not IP:port")?,
        inbound: m.inbound,
        relay: m.relay,
        mac: m.mac.as_slice().try_into().context("a MAC address that is not 6 bytes")?,
        ip: m.ip.parse().context("an IP address that is not IPv4")?,
        lease: m.lease,
    })
}

/// The member list in the data plane's terms.
pub fn members(v: &View) -> Vec<cpushare_vnet::node::Member> {
    v.members.iter().map(|m| cpushare_vnet::node::Member { node: m.id, public: m.public, endpoint: m.endpoint, inbound: m.inbound, relay: m.relay }).collect()
}

/// A node of a cluster's network, running on a thread of its own; it
/// leaves the network when dropped.
pub struct Attached {
    /// This node as the network lists it (its id, MAC and IP).
    pub me: Member,
    /// The network's prefix length (10.77.0.0/16: 16).
    pub prefix: u8,
    /// Where its SOCKS5 proxy takes clients, with [`Local::Stack`] and a proxy.
    pub socks: Option<SocketAddr>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>,
    views: tokio::task::JoinHandle<()>,
    /// The stack's sockets, removed with it.
    _sockets: Option<tempfile::TempDir>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.views.abort();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What to attach to the network on this node.
pub enum Local {
    /// The buyer's interface (`name`, taking the member's address).
    Tap(String),
    /// A VM's card: our socket and QEMU's; the VM's DHCP client gets the member's address.
    Vm { ours: std::path::PathBuf, vm: std::path::PathBuf },
    /// A userspace TCP/IP stack at the member's address (no CAP_NET_ADMIN
    /// needed), with a SOCKS5 proxy in front and ports it serves.
    Stack(cpushare_vnet::stack::Services),
    /// Nothing (a relay only).
    Nothing,
}

/// Joins `order`'s network and runs its node: binds a UDP socket, has the
/// exchange probe it (so that peers send here directly if it takes inbound
/// UDP), joins with a fresh key, and follows the member list.
pub async fn attach(conn: &Connection, identity: &Identity, ca: &rustls::pki_types::CertificateDer<'static>, order: u64, lease: u64, local: Local, stats: Option<std::path::PathBuf>) -> anyhow::Result<Attached> {
    use cpushare_vnet::run::{Attachments, Control, PortSpec, TapSpec};
    let keys = cpushare_vnet::handshake::StaticKeys::generate();
    let udp = cpushare_vnet::io::Udp::bind("0.0.0.0:0".parse().expect("an address")).context("binding the network's UDP socket")?;
    let port = udp.local_addr()?.port();
    let (udp, probe) = prove_inbound(conn, udp).await?;
    let mut stream = join(conn, identity, order, lease, keys.public, port, probe).await?;
    let first = stream.message().await.map_err(status)?.context("the exchange closed the network's stream")?;
    let view = verify(ca, order, &first)?;
    let me = view.members.iter().find(|m| m.id == view.me).cloned().expect("verify keeps this node");
    let config = cpushare_vnet::node::Config { cluster: order, psk: view.psk, me: view.me, secret: keys.secret, public: keys.public, members: members(&view) };
    let address = format!("{}/{}", me.ip, view.prefix);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (mut socks, mut sockets, mut threads) = (None, None, Vec::new());
    let attachments = match local {
        Local::Tap(name) => Attachments { tap: Some(TapSpec { name, address, mac: me.mac }), ports: vec![] },
        Local::Vm { ours, vm } => Attachments { tap: None, ports: vec![PortSpec { path: ours, peer: vm, dhcp: Some(cpushare_vnet::dhcp::Lease { mac: me.mac, ip: me.ip, prefix: view.prefix }) }] },
        Local::Stack(services) => {
            // The stack is the node's one "VM", on a socket pair of its own.
            let dir = tempfile::Builder::new().prefix("cpushare-net-").tempdir().context("a directory for the stack's sockets")?;
            let (ours, stack) = (dir.path().join("node.sock"), dir.path().join("stack.sock"));
            socks = services.socks.as_ref().map(|l| l.local_addr()).transpose()?;
            let spec = cpushare_vnet::stack::StackSpec { mac: me.mac, address: me.ip, prefix: view.prefix };
            let (node, stop) = (ours.clone(), stop.clone());
            let s = stack.clone();
            threads.push(std::thread::Builder::new().name(format!("stack-{order}")).spawn(move || cpushare_vnet::stack::serve(&spec, services, &s, &node, stop))?);
            sockets = Some(dir);
            Attachments { tap: None, ports: vec![PortSpec { path: ours, peer: stack, dhcp: None }] }
        }
        Local::Nothing => Attachments { tap: None, ports: vec![] },
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let (token_tx, tokens) = std::sync::mpsc::channel();
    let thread_stop = stop.clone();
    // Errors creating the attachment (a tap without CAP_NET_ADMIN) are the caller's to hear.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let thread = std::thread::Builder::new().name(format!("vnet-{order}")).spawn(move || {
        let control = Control { members: Some(rx), probes: Some(token_tx), ready: Some(ready_tx) };
        cpushare_vnet::run::run_on(&config, udp, attachments, control, stats, thread_stop)
    })?;
    let failed = |threads: Vec<std::thread::JoinHandle<anyhow::Result<()>>>| {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in threads {
            let _ = t.join();
        }
    };
    match tokio::task::spawn_blocking(move || ready_rx.recv()).await? {
        Ok(Ok(())) => threads.push(thread),
        Ok(Err(e)) => {
            failed(threads);
            let _ = thread.join();
            anyhow::bail!("{e}");
        }
        Err(_) => {
            failed(threads);
            let r = thread.join().map_err(|_| anyhow::anyhow!("the network's thread panicked"))?;
            r?;
            anyhow::bail!("the network's thread ended at once");
        }
    }
    let (ca, conn, identity, public, me_id) = (ca.clone(), conn.clone(), identity.clone(), keys.public, me.id);
    let tokens = std::sync::Mutex::new(tokens);
    let views = tokio::spawn(async move {
        loop {
            while let Ok(Some(v)) = stream.message().await {
                match verify(&ca, order, &v) {
                    Ok(view) if view.me != me_id => tracing::warn!(order, "the exchange made this node member {} (it was {me_id}): the list is not followed", view.me),
                    Ok(view) => {
                        if tx.send(members(&view)).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("a member list refused: {e:#}"),
                }
            }
            let who = Joining { identity: &identity, order, lease, public, port };
            match rejoin(&conn, &who, me_id, &tokens).await {
                Some(s) => stream = s,
                None => return,
            }
        }
    });
    Ok(Attached { me, prefix: view.prefix, socks, stop, threads, views, _sockets: sockets })
}
