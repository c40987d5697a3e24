//! The system calls behind a node: a UDP socket with batched, segmented
//! sends and coalesced receives (GSO/GRO, where one system call moves tens
//! of datagrams), a tap device with offloads (64 KiB frames, checksums left
//! to the end), and unix datagram ports for QEMU's `-netdev dgram`.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use crate::frames::VNET_HDR;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads an int from a valid pointer of the given length.
    check(unsafe { libc::setsockopt(fd, level, name, &value as *const _ as *const libc::c_void, std::mem::size_of::<libc::c_int>() as u32) }).map(drop)
}

fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write(&mut s as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write(&mut s as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(sin.sin_addr.s_addr.to_ne_bytes().into(), u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(sin6.sin6_addr.s6_addr.into(), u16::from_be(sin6.sin6_port), sin6.sin6_flowinfo, sin6.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Datagrams received in one call: each buffer may hold several datagrams
/// of `segment` bytes (coalesced by GRO), the last possibly shorter.
pub struct Received {
    pub from: SocketAddr,
    pub len: usize,
    pub segment: usize,
}

/// Batch size of receives and sends.
pub const BATCH: usize = 32;
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;
/// A coalesced receive holds up to 64 KiB.
pub const RECV_BUF: usize = 65_536;

pub struct Udp {
    fd: OwnedFd,
    gso: bool,
    pub bufs: Vec<Vec<u8>>,
}

impl Udp {
    /// A non-blocking socket bound to `addr`, with GRO on receive and GSO on
    /// send where the kernel has them, and buffers big enough for bursts.
    pub fn bind(addr: SocketAddr) -> io::Result<Udp> {
        let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
        // SAFETY: plain socket(2).
        let fd = check(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (sa, len) = to_sockaddr(&addr);
        // SAFETY: bind with a valid address of the given length.
        check(unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) })?;
        for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
            // Without CAP_NET_ADMIN only up to the system's cap.
            if set_int(fd.as_raw_fd(), libc::SOL_SOCKET, force, 8 << 20).is_err() {
                let _ = set_int(fd.as_raw_fd(), libc::SOL_SOCKET, plain, 8 << 20);
            }
        }
        let _ = set_int(fd.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1);
        Ok(Udp { fd, gso: true, bufs: vec![vec![0u8; RECV_BUF]; BATCH] })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        // SAFETY: getsockname into storage of the right size.
        let mut s: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        check(unsafe { libc::getsockname(self.fd.as_raw_fd(), &mut s as *mut _ as *mut libc::sockaddr, &mut len) })?;
        from_sockaddr(&s).ok_or_else(|| io::Error::other("not an IP socket"))
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Receives up to BATCH buffers in one call (empty when none wait).
    pub fn recv(&mut self) -> io::Result<Vec<Received>> {
        const CMSG: usize = 64;
        // SAFETY: all the structures below are plain data, zeroed then filled in.
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: Vec<libc::iovec> = self.bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr() as *mut _, iov_len: b.len() }).collect();
        let mut cmsgs = [[0u8; CMSG]; BATCH];
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_control = cmsgs[i].as_mut_ptr() as *mut libc::c_void;
            msgs[i].msg_hdr.msg_controllen = CMSG;
        }
        // SAFETY: every pointer in msgs refers to live buffers above.
        let n = unsafe { libc::recvmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, libc::MSG_DONTWAIT, std::ptr::null_mut()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(Vec::new()) } else { Err(e) };
        }
        let mut out = Vec::with_capacity(n as usize);
        for (i, m) in msgs.iter().enumerate().take(n as usize) {
            let Some(from) = from_sockaddr(&names[i]) else { continue };
            let len = m.msg_len as usize;
            let mut segment = len;
            // SAFETY: walking the control messages the kernel wrote.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        segment = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int) as usize;
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
            out.push(Received { from, len, segment: segment.max(1) });
        }
        Ok(out)
    }

    /// Sends `data` to `to`: one datagram, or (`segment` > 0) datagrams of
    /// `segment` bytes in one call with UDP segmentation offload, falling back
    /// to one call per datagram where the path refuses it.
    pub fn send(&mut self, to: SocketAddr, data: &[u8], segment: usize) -> io::Result<()> {
        if segment == 0 || data.len() <= segment {
            return self.send_one(to, data, 0);
        }
        if self.gso {
            // One call carries at most 64 segments and 64 KiB in all.
            let per_call = (GSO_MAX_BYTES / segment).clamp(1, GSO_MAX_SEGMENTS) * segment;
            let mut sent = 0;
            for part in data.chunks(per_call) {
                match self.send_one(to, part, if part.len() > segment { segment } else { 0 }) {
                    Ok(()) => sent += part.len(),
                    Err(e) if e.raw_os_error() == Some(libc::EIO) || e.raw_os_error() == Some(libc::EINVAL) => {
                        self.gso = false;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if sent == data.len() {
                return Ok(());
            }
            return self.send_each(to, &data[sent..], segment);
        }
        self.send_each(to, data, segment)
    }

    fn send_each(&mut self, to: SocketAddr, data: &[u8], segment: usize) -> io::Result<()> {
        for d in data.chunks(segment) {
            self.send_one(to, d, 0)?;
        }
        Ok(())
    }

    fn send_one(&self, to: SocketAddr, data: &[u8], segment: usize) -> io::Result<()> {
        let (sa, len) = to_sockaddr(&to);
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        // SAFETY: plain data, filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &sa as *const _ as *mut libc::c_void;
        msg.msg_namelen = len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let mut control = [0u8; 32];
        if segment > 0 {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: CMSG_SPACE of a u16.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            // SAFETY: the control buffer has room for one cmsg carrying a u16.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, segment as u16);
            }
        }
        loop {
            // SAFETY: msg points at live buffers.
            let r = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, 0) };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                // A full socket buffer: wait for room rather than drop.
                io::ErrorKind::WouldBlock => wait(self.fd.as_raw_fd(), libc::POLLOUT, 100),
                io::ErrorKind::Interrupted => {}
                // Nobody listens there (yet): the peer's problem, not ours.
                io::ErrorKind::ConnectionRefused => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}

/// Waits until `fd` is ready for `events` or `ms` pass.
pub fn wait(fd: RawFd, events: libc::c_short, ms: libc::c_int) {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;

/// A tap device whose frames carry a virtio-net header (offloads on).
pub struct Tap {
    file: std::fs::File,
    pub name: String,
}

impl Tap {
    /// Creates `name` (needs CAP_NET_ADMIN), brings it up with `address`
    /// (CIDR) and `mac`, MTU 1500.
    pub fn create(name: &str, address: &str, mac: [u8; 6]) -> io::Result<Tap> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open("/dev/net/tun")?;
        // SAFETY: ifreq is plain data.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (i, b) in name.bytes().take(libc::IFNAMSIZ - 1).enumerate() {
            ifr.ifr_name[i] = b as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        // SAFETY: the tun ioctls with the arguments they expect.
        unsafe {
            check(libc::ioctl(file.as_raw_fd(), TUNSETIFF, &ifr))?;
            let size: libc::c_int = VNET_HDR as libc::c_int;
            check(libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size))?;
            check(libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) as libc::c_ulong))?;
        }
        let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        for args in [vec!["link", "set", "dev", name, "address", &mac], vec!["addr", "add", address, "dev", name], vec!["link", "set", "dev", name, "up"]] {
            let out = std::process::Command::new("ip").args(&args).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
            }
        }
        Ok(Tap { file, name: name.to_string() })
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// One frame (header first) into `buf`; None when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        use std::io::Read;
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&self, frame: &[u8]) -> io::Result<()> {
        use std::io::Write;
        loop {
            match (&self.file).write(frame) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait(self.fd(), libc::POLLOUT, 100),
                Err(e) => return Err(e),
            }
        }
    }
}

/// One end of a unix datagram socket pair, as QEMU's `-netdev dgram` uses:
/// ours bound at a path, the peer's at another. Connected to the peer (once
/// it exists) so that a full peer queue blocks sends instead of losing them
/// (Linux holds as few as 10 datagrams, `net.unix.max_dgram_qlen`, at a
/// receiver): what cannot go now waits here, up to [`LINK_QUEUE`] frames,
/// until the socket polls writable.
pub struct DgramLink {
    sock: UnixDatagram,
    peer: PathBuf,
    connected: bool,
    queue: std::collections::VecDeque<Vec<u8>>,
    /// Frames lost: the peer not there, or the queue full.
    pub dropped: u64,
}

/// Frames a link holds for a slow peer before it drops (about 1.5 MB of full frames).
pub const LINK_QUEUE: usize = 1024;

impl DgramLink {
    pub fn bind(path: &Path, peer: &Path) -> io::Result<DgramLink> {
        let _ = std::fs::remove_file(path);
        let sock = UnixDatagram::bind(path)?;
        sock.set_nonblocking(true)?;
        Ok(DgramLink { sock, peer: peer.to_path_buf(), connected: false, queue: Default::default(), dropped: 0 })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// One datagram into `buf`; None when none waits.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.sock.recv(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Queues `frame` and sends what it can.
    pub fn send(&mut self, frame: Vec<u8>) -> io::Result<()> {
        if self.queue.len() >= LINK_QUEUE {
            self.dropped += 1;
            return Ok(());
        }
        self.queue.push_back(frame);
        self.flush()
    }

    /// Whether frames wait for the socket to turn writable (poll for POLLOUT).
    pub fn backlogged(&self) -> bool {
        !self.queue.is_empty()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Sends what waits, until the peer's queue is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while let Some(f) = self.queue.front() {
            if !self.connected {
                match self.sock.connect(&self.peer) {
                    Ok(()) => self.connected = true,
                    // The peer is not there (yet): what waits is lost, as on an unplugged wire.
                    Err(_) => {
                        self.dropped += self.queue.len() as u64;
                        self.queue.clear();
                        return Ok(());
                    }
                }
            }
            match self.sock.send(f) {
                Ok(_) => drop(self.queue.pop_front()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                // The peer went away (a VM restarted binds anew): reconnect next time.
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                    self.connected = false;
                    self.dropped += 1;
                    self.queue.pop_front();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A VM's network card: QEMU's `-netdev dgram` with a unix socket at each
/// end. Ours is bound at `path`; QEMU's is `peer`. Frames are plain
/// Ethernet (no virtio-net header) both ways.
pub struct Port {
    link: std::cell::RefCell<DgramLink>,
}

impl Port {
    pub fn bind(path: &Path, peer: &Path) -> io::Result<Port> {
        Ok(Port { link: DgramLink::bind(path, peer)?.into() })
    }

    pub fn fd(&self) -> RawFd {
        self.link.borrow().fd()
    }

    /// One frame into `buf[VNET_HDR..]` with a zero header in front; None when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let n = self.link.borrow().recv(&mut buf[VNET_HDR..])?;
        Ok(n.map(|n| {
            buf[..VNET_HDR].fill(0);
            VNET_HDR + n
        }))
    }

    /// A frame (header first): segmented and checksummed here if it needs it.
    pub fn write(&self, frame: &[u8]) -> io::Result<()> {
        let Some(plain) = crate::gso::plain_frames(frame) else { return Ok(()) };
        let mut link = self.link.borrow_mut();
        for f in plain {
            link.send(f)?;
        }
        Ok(())
    }

    pub fn backlogged(&self) -> bool {
        self.link.borrow().backlogged()
    }

    pub fn flush(&self) -> io::Result<()> {
        self.link.borrow_mut().flush()
    }
}
