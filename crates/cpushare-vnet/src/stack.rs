//! The buyer's way onto its cluster's network without CAP_NET_ADMIN: a
//! userspace TCP/IP stack (smoltcp) attached to a node's port exactly as a
//! VM is, with a SOCKS5 proxy on this host in front of it, so that
//! `curl --socks5-hostname 127.0.0.1:1080 http://10.77.0.2/` (or ssh with a
//! ProxyCommand, or anything that speaks SOCKS) reaches the nodes. It answers
//! ARP and ping at the member's address like any host on the network, and
//! takes connections to the ports it is told to serve there (the buyer's
//! share), handing each to its server as one end of a socket pair: nothing
//! listens for them on this host, so only the cluster's network reaches them.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};

use crate::io::DgramLink;
use crate::socks5::{self, Parsed};

/// Where the stack sits on the cluster's network.
#[derive(Debug, Clone)]
pub struct StackSpec {
    pub mac: [u8; 6],
    pub address: Ipv4Addr,
    pub prefix: u8,
}

/// A port the stack serves at its address: each connection a node opens to
/// it goes to `handed` (with who opened it) as one end of a socket pair; the
/// stack relays between the other end and the node.
pub struct Inbound {
    pub port: u16,
    pub handed: Box<dyn Fn(UnixStream, SocketAddrV4) + Send>,
}

/// What the stack offers: a SOCKS5 proxy out into the cluster, ports served in it, or both.
#[derive(Default)]
pub struct Services {
    pub socks: Option<TcpListener>,
    pub inbound: Vec<Inbound>,
}

/// How long a CONNECT may take before the client is told the host is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Each connection's buffers, each way (a window's worth at cluster latencies).
const SOCKET_BUFFER: usize = 256 << 10;
/// At most this much read from a client ahead of what the stack has taken.
const CLIENT_AHEAD: usize = 64 << 10;
/// How long a node's connection to a served port may take to be established.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The stack's card: a unix datagram socket to the node's port, one
/// Ethernet frame per datagram (QEMU's `-netdev dgram` framing).
struct Wire {
    link: DgramLink,
    buf: Vec<u8>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut DgramLink);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        // Queued while the node is busy; lost, as on a wire, if it is not there (TCP resends).
        if let Err(e) = self.0.send(frame) {
            tracing::debug!("a frame to the node: {e}");
        }
        r
    }
}

impl Device for Wire {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let n = self.link.recv(&mut self.buf).ok()??;
        Some((Rx(self.buf[..n].to_vec()), Tx(&mut self.link)))
    }

    /// None while frames wait for the node: the stack holds back (and its
    /// TCP paces itself) rather than pile up more.
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        (self.link.queued() < 64).then_some(Tx(&mut self.link))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = 1514;
        c
    }
}

enum Phase {
    Greeting,
    Request,
    Connecting { socket: SocketHandle, since: std::time::Instant, from: SocketAddrV4 },
    Relaying { socket: SocketHandle, fin_sent: bool, fin_passed: bool },
    /// Refused: the last reply is flushed, then the client is closed.
    Closing,
}

/// This host's side of a connection: a SOCKS client, or the server of a served port.
trait Local: Read + Write + Send {
    fn fd(&self) -> RawFd;
    fn shutdown_write(&self);
}

impl Local for TcpStream {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Local for UnixStream {
    fn fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// One connection through the stack: a SOCKS client's, or one a node opened to a served port.
struct Client {
    stream: Box<dyn Local>,
    phase: Phase,
    /// From the client, not yet taken.
    from_client: Vec<u8>,
    client_eof: bool,
    /// To the client, not yet written.
    to_client: VecDeque<u8>,
    done: bool,
}

/// The proxy: the stack, its sockets and its clients.
struct Proxy {
    spec: StackSpec,
    iface: Interface,
    wire: Wire,
    sockets: SocketSet<'static>,
    next_port: u16,
    /// Sockets ending, removed once the stack has sent what ends them.
    ending: Vec<SocketHandle>,
    /// The served ports, each with its socket listening now.
    inbound: Vec<(Inbound, SocketHandle)>,
    /// Connections to a served port not yet established: the socket, since when, which port.
    accepting: Vec<(SocketHandle, std::time::Instant, usize)>,
}

/// Runs the stack until `stop` is set, on the port `node` (our socket is
/// bound at `ours`), with `services`.
pub fn serve(spec: &StackSpec, services: Services, ours: &Path, node: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let link = DgramLink::bind(ours, node).with_context(|| format!("binding {}", ours.display()))?;
    let listener = services.socks;
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    let mut wire = Wire { link, buf: vec![0; 65_536] };
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(spec.mac)));
    config.random_seed = rand::random();
    let mut iface = Interface::new(config, &mut wire, Instant::now());
    iface.update_ip_addrs(|a| {
        let _ = a.push(IpCidr::new(IpAddress::Ipv4(spec.address), spec.prefix));
    });
    let mut p = Proxy { spec: spec.clone(), iface, wire, sockets: SocketSet::new(Vec::new()), next_port: 49_152, ending: Vec::new(), inbound: Vec::new(), accepting: Vec::new() };
    for i in services.inbound {
        let listening = p.listen(i.port)?;
        p.inbound.push((i, listening));
    }
    let mut clients: Vec<Client> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        p.poll();
        while let Some(l) = &listener {
            match l.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true)?;
                    let _ = stream.set_nodelay(true);
                    clients.push(Client::new(Box::new(stream), Phase::Greeting));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("the SOCKS listener: {e}");
                    break;
                }
            }
        }
        p.accept(&mut clients)?;
        for c in &mut clients {
            p.step(c);
        }
        clients.retain(|c| !c.done);
        p.poll();
        p.wait(listener.as_ref(), &clients)?;
    }
    Ok(())
}

/// The SOCKS5 proxy alone (`cpushare vnet socks`): [`serve`] with clients taken on `listener`.
pub fn socks(spec: &StackSpec, listener: TcpListener, ours: &Path, node: &Path, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    serve(spec, Services { socks: Some(listener), inbound: Vec::new() }, ours, node, stop)
}

impl Proxy {
    fn poll(&mut self) {
        if let Err(e) = self.wire.link.flush() {
            tracing::debug!("frames to the node: {e}");
        }
        self.iface.poll(Instant::now(), &mut self.wire, &mut self.sockets);
        // What was ending has had its RST or FIN sent.
        let sockets = &mut self.sockets;
        self.ending.retain(|&h| {
            let s = sockets.get::<tcp::Socket>(h);
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                sockets.remove(h);
                false
            } else {
                true
            }
        });
    }

    /// A socket listening on `port` at the stack's address.
    fn listen(&mut self, port: u16) -> anyhow::Result<SocketHandle> {
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]), tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]));
        s.set_nagle_enabled(false);
        s.listen(port).map_err(|e| anyhow::anyhow!("listening on port {port}: {e}"))?;
        Ok(self.sockets.add(s))
    }

    /// Takes the connections nodes opened to the served ports: a socket that
    /// left Listen is this connection's (another listens in its place); once
    /// established, its server gets one end of a socket pair.
    fn accept(&mut self, clients: &mut Vec<Client>) -> anyhow::Result<()> {
        for i in 0..self.inbound.len() {
            let (port, socket) = (self.inbound[i].0.port, self.inbound[i].1);
            if self.sockets.get::<tcp::Socket>(socket).state() != tcp::State::Listen {
                self.accepting.push((socket, std::time::Instant::now(), i));
                self.inbound[i].1 = self.listen(port)?;
            }
        }
        let mut still = Vec::new();
        for (socket, since, i) in std::mem::take(&mut self.accepting) {
            let s = self.sockets.get::<tcp::Socket>(socket);
            match (s.state(), s.remote_endpoint()) {
                (tcp::State::Established, Some(from)) => {
                    let IpAddress::Ipv4(ip) = from.addr;
                    let from = SocketAddrV4::new(ip, from.port);
                    let (ours, theirs) = UnixStream::pair()?;
                    ours.set_nonblocking(true)?;
                    (self.inbound[i].0.handed)(theirs, from);
                    tracing::debug!(%from, port = self.inbound[i].0.port, "a connection to a served port");
                    clients.push(Client::new(Box::new(ours), Phase::Relaying { socket, fin_sent: false, fin_passed: false }));
                }
                // Reset before it was established (a SYN-RECEIVED socket goes back to Listen).
                (tcp::State::Listen | tcp::State::Closed, _) => drop(self.sockets.remove(socket)),
                _ if since.elapsed() > ACCEPT_TIMEOUT => self.abort(socket),
                _ => still.push((socket, since, i)),
            }
        }
        self.accepting = still;
        Ok(())
    }

    /// Sleeps until the wire, the listener or a client has something, or the stack has a timer due.
    fn wait(&mut self, listener: Option<&TcpListener>, clients: &[Client]) -> io::Result<()> {
        let wire_events = if self.wire.link.backlogged() { libc::POLLIN | libc::POLLOUT } else { libc::POLLIN };
        let mut fds = vec![libc::pollfd { fd: self.wire.link.fd(), events: wire_events, revents: 0 }];
        if let Some(l) = listener {
            fds.push(libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        for c in clients {
            let mut events = 0;
            if c.wants_input() {
                events |= libc::POLLIN;
            }
            if !c.to_client.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd { fd: c.stream.fd(), events, revents: 0 });
        }
        let due = self.iface.poll_delay(Instant::now(), &self.sockets).map_or(100, |d| d.total_millis().min(100)) as i32;
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, due) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn in_cluster(&self, ip: Ipv4Addr) -> bool {
        let mask = crate::dhcp::netmask(self.spec.prefix);
        u32::from(ip) & mask == u32::from(self.spec.address) & mask
    }

    /// Resets a connection (its client gave up or went away); removed once the RST is out.
    fn abort(&mut self, socket: SocketHandle) {
        self.sockets.get_mut::<tcp::Socket>(socket).abort();
        self.ending.push(socket);
    }

    fn step(&mut self, c: &mut Client) {
        c.read();
        match c.phase {
            Phase::Greeting => match socks5::greeting(&c.from_client) {
                Ok(Parsed::More) => c.done |= c.client_eof,
                Ok(Parsed::Done((), n)) => {
                    c.from_client.drain(..n);
                    c.to_client.extend(socks5::NO_AUTHENTICATION);
                    c.phase = Phase::Request;
                }
                Err(_) => c.refuse(&socks5::NO_ACCEPTABLE_METHOD),
            },
            Phase::Request => match socks5::request(&c.from_client) {
                Ok(Parsed::More) => c.done |= c.client_eof,
                Ok(Parsed::Done(to, n)) => {
                    c.from_client.drain(..n);
                    self.connect(c, to);
                }
                Err(e) => {
                    tracing::debug!("a SOCKS request refused: {e}");
                    c.refuse(&socks5::reply(e.reply_code(), unspecified()));
                }
            },
            Phase::Connecting { socket, since, from } => {
                let state = self.sockets.get::<tcp::Socket>(socket).state();
                if state == tcp::State::Established {
                    c.to_client.extend(socks5::reply(socks5::SUCCEEDED, from));
                    c.phase = Phase::Relaying { socket, fin_sent: false, fin_passed: false };
                } else if state == tcp::State::Closed {
                    self.ending.push(socket);
                    // refuse() moves the client to Closing: the socket is not ended twice.
                    c.refuse(&socks5::reply(socks5::CONNECTION_REFUSED, unspecified()));
                } else if since.elapsed() > CONNECT_TIMEOUT {
                    self.abort(socket);
                    c.refuse(&socks5::reply(socks5::HOST_UNREACHABLE, unspecified()));
                }
            }
            Phase::Relaying { .. } | Phase::Closing => {}
        }
        if let Phase::Relaying { socket, ref mut fin_sent, ref mut fin_passed } = c.phase {
            let s = self.sockets.get_mut::<tcp::Socket>(socket);
            if !c.from_client.is_empty() && s.can_send() {
                if let Ok(n) = s.send_slice(&c.from_client) {
                    c.from_client.drain(..n);
                }
            }
            if c.client_eof && c.from_client.is_empty() && !*fin_sent {
                s.close();
                *fin_sent = true;
            }
            if c.to_client.len() < CLIENT_AHEAD && s.can_recv() {
                let _ = s.recv(|d| {
                    c.to_client.extend(d.iter());
                    (d.len(), ())
                });
            }
            let remote_done = !s.may_recv() && !s.can_recv();
            let state = s.state();
            if remote_done && c.to_client.is_empty() && !*fin_passed {
                tracing::debug!(?state, "the far end closed");
                c.stream.shutdown_write();
                *fin_passed = true;
            }
            if state == tcp::State::Closed || (*fin_passed && *fin_sent && matches!(state, tcp::State::TimeWait | tcp::State::LastAck | tcp::State::Closing)) {
                tracing::debug!(?state, fin_sent = *fin_sent, fin_passed = *fin_passed, "a proxied connection ended");
                self.ending.push(socket);
                c.phase = Phase::Closing;
            }
        }
        if let Err(e) = c.flush() {
            tracing::debug!("a SOCKS client went away: {e}");
            c.done = true;
        }
        if matches!(c.phase, Phase::Closing) && c.to_client.is_empty() {
            c.done = true;
        }
        // A client gone mid-connection: its connection in the cluster is reset.
        if c.done {
            if let Phase::Relaying { socket, .. } | Phase::Connecting { socket, .. } = c.phase {
                self.abort(socket);
                c.phase = Phase::Closing;
            }
        }
    }

    fn connect(&mut self, c: &mut Client, to: SocketAddrV4) {
        if !self.in_cluster(*to.ip()) {
            tracing::debug!("a SOCKS request for {to}, outside the cluster, refused");
            return c.refuse(&socks5::reply(socks5::NOT_ALLOWED, unspecified()));
        }
        let mut s = tcp::Socket::new(tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]), tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]));
        s.set_nagle_enabled(false);
        let port = self.next_port;
        self.next_port = if port == u16::MAX { 49_152 } else { port + 1 };
        match s.connect(self.iface.context(), (IpAddress::Ipv4(*to.ip()), to.port()), port) {
            Ok(()) => {
                let socket = self.sockets.add(s);
                c.phase = Phase::Connecting { socket, since: std::time::Instant::now(), from: SocketAddrV4::new(self.spec.address, port) };
            }
            Err(e) => {
                tracing::debug!("connecting to {to}: {e}");
                c.refuse(&socks5::reply(socks5::GENERAL_FAILURE, unspecified()));
            }
        }
    }
}

fn unspecified() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
}

impl Client {
    fn new(stream: Box<dyn Local>, phase: Phase) -> Client {
        Client { stream, phase, from_client: Vec::new(), client_eof: false, to_client: VecDeque::new(), done: false }
    }

    /// Whether to read from the client now: during the handshake, and while
    /// the stack keeps up (backpressure otherwise).
    fn wants_input(&self) -> bool {
        !self.client_eof && !matches!(self.phase, Phase::Closing | Phase::Connecting { .. }) && self.from_client.len() < CLIENT_AHEAD
    }

    fn read(&mut self) {
        let mut buf = [0u8; 16 << 10];
        while self.wants_input() {
            match self.stream.read(&mut buf) {
                Ok(0) => self.client_eof = true,
                Ok(n) => self.from_client.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.client_eof = true;
                    self.done = true;
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        while !self.to_client.is_empty() {
            let (front, _) = self.to_client.as_slices();
            match self.stream.write(front) {
                Ok(n) => drop(self.to_client.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn refuse(&mut self, reply: &[u8]) {
        self.to_client.extend(reply);
        self.phase = Phase::Closing;
    }
}
