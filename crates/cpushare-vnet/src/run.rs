//! The I/O loop around a [`Node`]: one thread, `poll(2)` over the UDP
//! socket, the tap and the VM ports; everything ready is read in batches, fed
//! to the node, and what it wants sent goes out in batches too.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::frames::MAX_FRAME;
use crate::io::{Port, Tap, Udp};
use crate::node::{Config, Counters, Node, PortId};

/// How often timers run.
const TICK: Duration = Duration::from_millis(100);
/// Frames or buffers taken from one source before looking at the others.
const BUDGET: usize = 64;

/// The buyer's interface: a tap with the cluster's address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TapSpec {
    pub name: String,
    /// CIDR, e.g. 10.77.0.1/16.
    pub address: String,
    pub mac: [u8; 6],
}

/// A VM's card: our socket and QEMU's, and the address its DHCP client gets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortSpec {
    pub path: PathBuf,
    pub peer: PathBuf,
    #[serde(default)]
    pub dhcp: Option<crate::dhcp::Lease>,
}

pub struct Attachments {
    pub tap: Option<TapSpec>,
    pub ports: Vec<PortSpec>,
}

/// What the control plane says while a node runs.
#[derive(Default)]
pub struct Control {
    /// New member lists, as members join and leave.
    pub members: Option<std::sync::mpsc::Receiver<Vec<crate::node::Member>>>,
    /// Where the exchange's inbound probes (their tokens) go.
    pub probes: Option<std::sync::mpsc::Sender<[u8; 16]>>,
    /// Told once the attachments are made (or why they could not be).
    pub ready: Option<std::sync::mpsc::Sender<Result<(), String>>>,
}

/// Waits up to `limit` for the exchange's probe on `udp`; its token.
pub fn await_probe(udp: &mut Udp, limit: Duration) -> Option<[u8; 16]> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        crate::io::wait(udp.fd(), libc::POLLIN, until.saturating_duration_since(Instant::now()).as_millis().max(1) as i32);
        let got = udp.recv().ok()?;
        for (i, r) in got.iter().enumerate() {
            if let Some(t) = probe_token(&udp.bufs[i][..r.len]) {
                return Some(t);
            }
        }
    }
    None
}

/// What the exchange sends to check that a node takes unsolicited UDP: this, then a 16-byte token.
pub const PROBE_MAGIC: &[u8; 16] = b"cpushare probe\0\0";

/// The token of an inbound probe datagram.
pub fn probe_token(d: &[u8]) -> Option<[u8; 16]> {
    (d.len() == 32 && d.starts_with(PROBE_MAGIC)).then(|| d[16..].try_into().expect("16 bytes"))
}

enum Local {
    Tap(Tap),
    Port(Port),
}

impl Local {
    fn fd(&self) -> i32 {
        match self {
            Local::Tap(t) => t.fd(),
            Local::Port(p) => p.fd(),
        }
    }
    fn read(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match self {
            Local::Tap(t) => t.read(buf),
            Local::Port(p) => p.read(buf),
        }
    }
    fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Local::Tap(t) => t.write(frame),
            Local::Port(p) => p.write(frame),
        }
    }
    /// What to poll it for: input, and room for frames waiting to go out.
    fn events(&self) -> i16 {
        match self {
            Local::Port(p) if p.backlogged() => libc::POLLIN | libc::POLLOUT,
            _ => libc::POLLIN,
        }
    }
    fn flush(&self) -> std::io::Result<()> {
        match self {
            Local::Tap(_) => Ok(()),
            Local::Port(p) => p.flush(),
        }
    }
}

/// Runs a node until `stop` is set; writes its counters to `stats` (JSON)
/// every half second if asked.
pub fn run(config: &Config, listen: SocketAddr, attach: Attachments, stats: Option<PathBuf>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let udp = Udp::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    run_on(config, udp, attach, Control::default(), stats, stop)
}

/// [`run`] on a socket already bound (its address is what the control plane was told).
pub fn run_on(config: &Config, mut udp: Udp, attach: Attachments, control: Control, stats: Option<PathBuf>, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let dhcp: Vec<Option<crate::dhcp::Lease>> = attach.tap.iter().map(|_| None).chain(attach.ports.iter().map(|p| p.dhcp)).collect();
    let locals = (|| {
        let mut locals = Vec::new();
        if let Some(t) = &attach.tap {
            locals.push(Local::Tap(Tap::create(&t.name, &t.address, t.mac).with_context(|| format!("creating the interface {} (it needs CAP_NET_ADMIN)", t.name))?));
        }
        for p in &attach.ports {
            locals.push(Local::Port(Port::bind(&p.path, &p.peer).with_context(|| format!("binding {}", p.path.display()))?));
        }
        anyhow::Ok(locals)
    })();
    if let Some(ready) = &control.ready {
        let _ = ready.send(locals.as_ref().map(drop).map_err(|e| format!("{e:#}")));
    }
    let locals = locals?;
    let now = Instant::now();
    let mut node = Node::new(config, (0..locals.len() as PortId).collect(), now)?;
    let mut frame = vec![0u8; MAX_FRAME + 64];
    let (mut last_tick, mut last_stats) = (now, now);
    while !stop.load(Ordering::Relaxed) {
        let mut fds: Vec<libc::pollfd> = std::iter::once(libc::pollfd { fd: udp.fd(), events: libc::POLLIN, revents: 0 })
            .chain(locals.iter().map(|l| libc::pollfd { fd: l.fd(), events: l.events(), revents: 0 }))
            .collect();
        let wait = TICK.saturating_sub(last_tick.elapsed()).as_millis() as i32;
        // SAFETY: fds is a live array of pollfd.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.max(1)) };
        let now = Instant::now();
        if fds[0].revents & libc::POLLIN != 0 {
            for _ in 0..BUDGET {
                let got = udp.recv()?;
                if got.is_empty() {
                    break;
                }
                for (i, r) in got.iter().enumerate() {
                    let buf = &mut udp.bufs[i][..r.len];
                    for d in buf.chunks_mut(r.segment) {
                        match probe_token(d) {
                            Some(token) => {
                                if let Some(p) = &control.probes {
                                    let _ = p.send(token);
                                }
                            }
                            None => node.from_network(r.from, d, now),
                        }
                    }
                }
                flush(&mut node, &mut udp, &locals)?;
            }
        }
        for (i, l) in locals.iter().enumerate() {
            if fds[i + 1].revents & libc::POLLOUT != 0 {
                l.flush()?;
            }
            if fds[i + 1].revents & libc::POLLIN == 0 {
                continue;
            }
            for _ in 0..BUDGET {
                let Some(n) = l.read(&mut frame)? else { break };
                // A VM asking for its address is answered here, on its own port.
                if let Some(reply) = dhcp[i].as_ref().and_then(|lease| crate::dhcp::answer(&frame[..n], lease)) {
                    let _ = l.write(&reply);
                    continue;
                }
                node.from_port(i as PortId, &frame[..n], now);
                flush(&mut node, &mut udp, &locals)?;
            }
        }
        if let Some(updates) = &control.members {
            while let Ok(members) = updates.try_recv() {
                if let Err(e) = node.set_members(&members, now) {
                    tracing::warn!("a member list refused: {e:#}");
                }
            }
        }
        if now.duration_since(last_tick) >= TICK {
            last_tick = now;
            node.tick(now);
            flush(&mut node, &mut udp, &locals)?;
        }
        if let Some(path) = &stats {
            if now.duration_since(last_stats) >= Duration::from_millis(500) {
                last_stats = now;
                write_stats(path, &node.counters(now))?;
            }
        }
    }
    if let Some(path) = &stats {
        write_stats(path, &node.counters(Instant::now()))?;
    }
    Ok(())
}

fn flush(node: &mut Node, udp: &mut Udp, locals: &[Local]) -> anyhow::Result<()> {
    for t in node.transmits.drain(..) {
        // A datagram the network refuses (no route, too big) is lost, not fatal:
        // the peer's probes and handshakes find out, as with any lost packet.
        if let Err(e) = udp.send(t.to, &t.data, t.segment) {
            tracing::debug!("sending to {}: {e}", t.to);
        }
    }
    for d in node.deliveries.drain(..) {
        if let Some(l) = locals.get(d.port as usize) {
            // A frame the port will not take (a malformed one from a peer) is dropped, as on a wire.
            if let Err(e) = l.write(&d.frame) {
                tracing::debug!("frame to port {} dropped: {e}", d.port);
            }
        }
    }
    Ok(())
}

/// Counters as JSON, replaced whole (never half-written).
pub fn write_stats(path: &std::path::Path, c: &Counters) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(c)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A stand-in for a VM on a seller: a tap in this network namespace joined
/// to a node's port as QEMU's `-netdev dgram` would be (`vm` is the VM's
/// socket, `node` the node's). Lets tests and benchmarks put the kernel's own
/// TCP/IP stack, and unmodified programs, behind a seller's port.
pub fn bridge(tap: &TapSpec, vm: &std::path::Path, node: &std::path::Path, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let tap = Tap::create(&tap.name, &tap.address, tap.mac).with_context(|| format!("creating {}", tap.name))?;
    let port = Port::bind(vm, node).with_context(|| format!("binding {}", vm.display()))?;
    let mut buf = vec![0u8; MAX_FRAME + 64];
    while !stop.load(Ordering::Relaxed) {
        let port_events = if port.backlogged() { libc::POLLIN | libc::POLLOUT } else { libc::POLLIN };
        let mut fds = [libc::pollfd { fd: tap.fd(), events: libc::POLLIN, revents: 0 }, libc::pollfd { fd: port.fd(), events: port_events, revents: 0 }];
        // SAFETY: two live pollfds.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
        if fds[1].revents & libc::POLLOUT != 0 {
            port.flush()?;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            while let Some(n) = tap.read(&mut buf)? {
                port.write(&buf[..n])?;
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            while let Some(n) = port.read(&mut buf)? {
                tap.write(&buf[..n])?;
            }
        }
    }
    Ok(())
}
