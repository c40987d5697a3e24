//! The buyer's directories, shared with its cluster's VMs over NFSv3
//! (`cluster start --share DIR[:NAME]`): a userspace server in the buyer's
//! process, reached only through the cluster's own network at the buyer's
//! address (10.77.0.1:2049), so a VM needs nothing but its kernel's NFS
//! client and whatever a VM writes is on the buyer's disk the moment the
//! server answers, whatever becomes of the VM afterwards.
//!
//! The protocol is nfs3_server's; what is ours is the confinement ([`fs`])
//! and where connections come from: a listener bound to the buyer's
//! `cpushare0` device (so not even this host's other users reach it through
//! the address), or connections the userspace stack accepts at the buyer's
//! address (see `cpushare_vnet::stack`), handed over as socket pairs.

mod fs;
mod tree;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nfs3_server::test_reexports::{process_socket, RPCContext};
use rustix::fs::{Mode, OFlags};

pub use fs::ShareFs;

/// The port VMs mount the share at (NFS and its mount protocol both).
pub const NFS_PORT: u16 = 2049;

/// One `--share HOST_DIR[:NAME]`: a directory of the buyer's, mounted by
/// VMs as `10.77.0.1:/NAME` (NAME: the directory's own name unless given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub dir: PathBuf,
    pub name: String,
}

impl std::str::FromStr for ShareSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<ShareSpec, String> {
        let (dir, name) = match s.rsplit_once(':') {
            Some((dir, name)) if !dir.is_empty() => (PathBuf::from(dir), name.to_string()),
            _ => {
                let dir = PathBuf::from(s);
                let name = std::path::absolute(&dir).ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
                (dir, name)
            }
        };
        let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name == "." || name == ".." || !name.chars().all(fine) {
            return Err(format!("`{s}`: the share's name must be letters, digits, '-', '_' or '.' (give one as DIR:NAME)"));
        }
        Ok(ShareSpec { dir, name })
    }
}

/// The NFS server for one cluster's shares.
pub struct ShareServer {
    context: RPCContext<ShareFs>,
}

impl ShareServer {
    /// Opens the directories to export (each must be one; names must differ).
    pub fn new(shares: &[ShareSpec]) -> anyhow::Result<Arc<ShareServer>> {
        let mut exports = Vec::new();
        for (i, s) in shares.iter().enumerate() {
            anyhow::ensure!(!shares[..i].iter().any(|o| o.name == s.name), "two shares are named {}: give one another name with DIR:NAME", s.name);
            let dir = rustix::fs::open(&s.dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).with_context(|| format!("cannot share {}: not a directory this user can open", s.dir.display()))?;
            exports.push(fs::Export { name: s.name.clone(), dir });
        }
        // One context for every connection: one set of file handles (a VM
        // that reconnects keeps its handles) and one record of calls done
        // (a call sent again is not done twice).
        let context = RPCContext::test_ctx("/", Arc::new(ShareFs::new(exports)));
        Ok(Arc::new(ShareServer { context }))
    }

    /// Serves one connection (from `peer`) until it closes.
    pub fn serve<IO>(&self, io: IO, peer: String)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut context = self.context.clone();
        context.client_addr = peer;
        tokio::spawn(async move {
            if let Err(e) = process_socket(io, context).await {
                tracing::debug!("a share connection ended: {e:#}");
            }
        });
    }

    /// Serves the connections `listener` takes from peers `admit` lets in
    /// (others are closed at once).
    pub async fn accept(self: Arc<Self>, listener: tokio::net::TcpListener, admit: impl Fn(SocketAddr) -> bool + Send + 'static) {
        pace_by_loss(&listener);
        loop {
            match listener.accept().await {
                Ok((stream, peer)) if admit(peer) => {
                    let _ = stream.set_nodelay(true);
                    self.serve(stream, peer.to_string());
                }
                Ok((_, peer)) => tracing::info!("a share connection from {peer} refused: not a node of the cluster"),
                Err(e) => {
                    tracing::warn!("the share's listener: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Serves the connections the cluster's userspace stack hands over.
    pub async fn take(self: Arc<Self>, mut handed: tokio::sync::mpsc::UnboundedReceiver<(std::os::unix::net::UnixStream, SocketAddr)>) {
        while let Some((stream, peer)) = handed.recv().await {
            match stream.set_nonblocking(true).and_then(|()| tokio::net::UnixStream::from_std(stream)) {
                Ok(s) => self.serve(s, peer.to_string()),
                Err(e) => tracing::warn!("a share connection from {peer}: {e}"),
            }
        }
    }
}

/// The congestion control the share's replies are sent with: CUBIC, Linux's
/// (and Debian's) default, whatever this host's default is. A host set to
/// BBR paces every segment to its estimate of the path, and across the
/// overlay, whose queue depth swings with the nodes' batches, the estimate
/// runs low (see BENCHMARKS.md: reads across it, CUBIC against BBR). Set on
/// the listener, so that each connection starts with it: one switched after
/// it is accepted measured no faster (it keeps the pacing BBR turned on).
/// Best effort: a host without CUBIC keeps its default.
fn pace_by_loss(listener: &tokio::net::TcpListener) {
    if let Err(e) = socket2::SockRef::from(listener).set_tcp_congestion(CONGESTION) {
        tracing::debug!("the share keeps this host's congestion control: {e}");
    }
}

const CONGESTION: &[u8] = b"cubic";

/// A listener at `addr` bound to `device` (the buyer's cluster interface), so
/// that nothing arriving on another interface reaches it. This host's own
/// connections to its own address still would: [`cluster_peer`] keeps them out.
pub fn listen_on_device(addr: SocketAddr, device: &str) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(device.as_bytes()))?;
    s.bind(&addr.into())?;
    s.listen(64)?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Whether `peer` may use the share reached at `me` on a /`prefix` network:
/// a node of the cluster, that is an address of its subnet other than ours.
/// This host's own processes connect from `me` (or from outside the subnet);
/// one claiming a node's address (IP_FREEBIND) never completes the
/// handshake, as the answer is routed to the cluster's interface, not to it.
pub fn cluster_peer(peer: SocketAddr, me: std::net::Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix.min(32)) };
    match peer.ip() {
        std::net::IpAddr::V4(ip) => ip != me && u32::from(ip) & mask == u32::from(me) & mask,
        std::net::IpAddr::V6(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_flags_parse() {
        let s: ShareSpec = "/srv/results:out".parse().unwrap();
        assert_eq!(s, ShareSpec { dir: "/srv/results".into(), name: "out".into() });
        let s: ShareSpec = "/srv/results".parse().unwrap();
        assert_eq!(s.name, "results");
        assert!("/srv/x:bad/name".parse::<ShareSpec>().is_err());
        assert!("/srv/x:..".parse::<ShareSpec>().is_err());
        assert!("/".parse::<ShareSpec>().unwrap_err().contains("DIR:NAME"));
    }

    #[tokio::test]
    async fn connections_to_the_share_start_with_cubic() {
        // The kernel answers with its whole 16-byte field, NULs after the name.
        let congestion = |s: socket2::SockRef<'_>| {
            let mut name = s.tcp_congestion().unwrap();
            name.retain(|&b| b != 0);
            name
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = congestion((&listener).into());
        pace_by_loss(&listener);
        if congestion((&listener).into()) != CONGESTION {
            // This host allows unprivileged sockets only its own list (net.ipv4.tcp_allowed_congestion_control).
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CUBIC could not be set on the share's listener, as root under CI");
            eprintln!("skipped: this user may not choose CUBIC here (the host's default is {})", String::from_utf8_lossy(&host));
            return;
        }
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert_eq!(congestion((&accepted).into()), CONGESTION, "a connection inherits the listener's congestion control");
        drop(client);
    }

    #[test]
    fn only_other_members_of_the_subnet_are_peers() {
        let me = std::net::Ipv4Addr::new(10, 77, 0, 1);
        assert!(cluster_peer("10.77.0.2:900".parse().unwrap(), me, 16));
        assert!(cluster_peer("10.77.3.9:900".parse().unwrap(), me, 16));
        assert!(!cluster_peer("10.77.0.1:900".parse().unwrap(), me, 16), "this host itself");
        assert!(!cluster_peer("10.78.0.2:900".parse().unwrap(), me, 16));
        assert!(!cluster_peer("127.0.0.1:900".parse().unwrap(), me, 16));
        assert!(!cluster_peer("[::1]:900".parse().unwrap(), me, 16));
    }
}
