//! `cpushare vnet`: the virtual network's parts on their own, for operators,
//! tests and benchmarks: run a node from a configuration file, join a tap to
//! a node's VM port as a VM would be, and write the configuration of a
//! cluster by hand (the exchange does this for real clusters).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};
use cpushare_vnet::handshake::StaticKeys;
use cpushare_vnet::node::{Config, Member};
use cpushare_vnet::run::{Attachments, PortSpec, TapSpec};

#[derive(Subcommand)]
pub enum VnetCmd {
    /// Run one node of a cluster's network until SIGTERM or Ctrl-C.
    Node(NodeArgs),
    /// Join a new tap (with the kernel's TCP/IP stack behind it) to a node's VM port, as QEMU's `-netdev dgram` would.
    Bridge(BridgeArgs),
    /// Join a userspace TCP/IP stack to a node's VM port, with a SOCKS5 proxy into the network in front of it (no CAP_NET_ADMIN needed).
    Socks(SocksArgs),
    /// Write node-N.json for a cluster of the given endpoints (the first is the buyer, the relay).
    Plan(PlanArgs),
    /// Serve directories over NFSv3 as `cluster start --share` does, at an
    /// address of this host (for networks made by hand, and benchmarks).
    Share(ShareArgs),
}

#[derive(Args)]
pub struct ShareArgs {
    /// Where to take NFS and mount calls (mount with port= and mountport= this port, nolock).
    #[arg(long, default_value = "10.77.0.1:2049")]
    listen: SocketAddr,
    /// Take only connections arriving on this interface (a node's tap; needs CAP_NET_RAW).
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// The directories: DIR (exported as its own name) or DIR:NAME, mounted as ADDRESS:/NAME.
    #[arg(required = true, value_name = "DIR[:NAME]")]
    shares: Vec<cpushare_buyer::share::ShareSpec>,
}

#[derive(Args)]
pub struct NodeArgs {
    /// The node's configuration (what `cpushare vnet plan` writes).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where to receive datagrams [default: this node's endpoint in the member list].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Attach a tap with this name (needs CAP_NET_ADMIN)...
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// ...with this address (CIDR)...
    #[arg(long, value_name = "CIDR", requires = "tap")]
    address: Option<String>,
    /// ...and this MAC address [default: 52:54:00 and the node's id].
    #[arg(long, value_name = "MAC", requires = "tap")]
    mac: Option<String>,
    /// A VM port: our socket, then the VM's (as in QEMU's -netdev dgram,remote.path=OURS,local.path=VMS).
    #[arg(long, value_name = "OURS:VMS")]
    port: Vec<String>,
    /// Write the node's counters here (JSON) every half second.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
}

#[derive(Args)]
pub struct BridgeArgs {
    /// The tap to create.
    #[arg(long)]
    tap: String,
    #[command(flatten)]
    port: VmPortArgs,
}

#[derive(Args)]
pub struct SocksArgs {
    /// Where SOCKS5 clients connect (`curl --socks5 127.0.0.1:1080 http://10.77.0.2/`).
    #[arg(long, default_value = "127.0.0.1:1080")]
    listen: SocketAddr,
    #[command(flatten)]
    port: VmPortArgs,
}

/// What stands where a VM would on a node's port: its address, its MAC and the socket pair.
#[derive(Args)]
pub struct VmPortArgs {
    /// Its address on the network (CIDR).
    #[arg(long, value_name = "CIDR")]
    address: String,
    /// Its MAC address (like 52:54:00:77:00:05).
    #[arg(long, value_name = "MAC")]
    mac: String,
    /// Its socket (created here).
    #[arg(long, value_name = "PATH")]
    vm: PathBuf,
    /// The node's socket for it.
    #[arg(long, value_name = "PATH")]
    node: PathBuf,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Where to write node-1.json, node-2.json...
    #[arg(long)]
    dir: PathBuf,
    /// Every member's UDP endpoint, the buyer first.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<SocketAddr>,
    /// Members (1-based) that do not accept inbound UDP (their traffic goes through the buyer).
    #[arg(long, value_delimiter = ',')]
    closed: Vec<u32>,
    #[arg(long, default_value_t = 1)]
    cluster: u64,
}

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().with_context(|| format!("{s:?} is not a MAC address (like 52:54:00:00:00:01)"))?;
    parts.try_into().map_err(|_| anyhow::anyhow!("{s:?} is not a MAC address (six bytes, like 52:54:00:00:00:01)"))
}

/// Runs `work` on a thread of its own until it ends or SIGTERM/SIGINT asks it to stop.
async fn until_signalled(work: impl FnOnce(Arc<AtomicBool>) -> anyhow::Result<()> + Send + 'static) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::task::spawn_blocking({
        let stop = stop.clone();
        move || work(stop)
    });
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::pin!(task);
    tokio::select! {
        r = &mut task => return r?,
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    task.await?
}

pub async fn run(cmd: VnetCmd) -> anyhow::Result<()> {
    // Warnings by default; RUST_LOG=cpushare_vnet=debug tells more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    match cmd {
        VnetCmd::Node(a) => {
            let text = std::fs::read_to_string(&a.config).with_context(|| format!("reading {}", a.config.display()))?;
            let config: Config = serde_json::from_str(&text).with_context(|| format!("{} is not a node configuration", a.config.display()))?;
            let me = config.members.iter().find(|m| m.node == config.me).context("the configuration's own node is not in its member list")?;
            let listen = a.listen.unwrap_or(me.endpoint);
            let tap = match a.tap {
                Some(name) => Some(TapSpec {
                    name,
                    address: a.address.context("--tap needs --address")?,
                    mac: a.mac.as_deref().map(parse_mac).transpose()?.unwrap_or([0x52, 0x54, 0, 0, (config.me >> 8) as u8, config.me as u8]),
                }),
                None => None,
            };
            let ports = a
                .port
                .iter()
                .map(|p| {
                    let (ours, vm) = p.split_once(':').with_context(|| format!("--port {p:?}: expected OURS:VMS (two socket paths)"))?;
                    Ok(PortSpec { path: ours.into(), peer: vm.into(), dhcp: None })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            anyhow::ensure!(tap.is_some() || !ports.is_empty(), "nothing to attach: give --tap or --port");
            until_signalled(move |stop| cpushare_vnet::run::run(&config, listen, Attachments { tap, ports }, a.stats, stop)).await
        }
        VnetCmd::Bridge(a) => {
            let tap = TapSpec { name: a.tap, address: a.port.address, mac: parse_mac(&a.port.mac)? };
            until_signalled(move |stop| cpushare_vnet::run::bridge(&tap, &a.port.vm, &a.port.node, stop)).await
        }
        VnetCmd::Socks(a) => {
            let p = a.port;
            let (ip, prefix) = p.address.split_once('/').with_context(|| format!("--address {:?}: expected an address with its prefix, like 10.77.0.5/16", p.address))?;
            let spec = cpushare_vnet::stack::StackSpec {
                mac: parse_mac(&p.mac)?,
                address: ip.parse().with_context(|| format!("--address {:?}: not an IPv4 address", p.address))?,
                prefix: prefix.parse().ok().filter(|n| *n <= 32).with_context(|| format!("--address {:?}: the prefix is 0 to 32", p.address))?,
            };
            let listener = std::net::TcpListener::bind(a.listen).with_context(|| format!("listening on {}", a.listen))?;
            eprintln!("cpushare: SOCKS5 proxy into the network at {}", listener.local_addr()?);
            until_signalled(move |stop| cpushare_vnet::stack::socks(&spec, listener, &p.vm, &p.node, stop)).await
        }
        VnetCmd::Share(a) => {
            let server = cpushare_buyer::share::ShareServer::new(&a.shares)?;
            let listener = match &a.device {
                Some(dev) => cpushare_buyer::share::listen_on_device(a.listen, dev).with_context(|| format!("listening on {} ({dev})", a.listen))?,
                None => tokio::net::TcpListener::bind(a.listen).await.with_context(|| format!("listening on {}", a.listen))?,
            };
            for s in &a.shares {
                eprintln!("cpushare: sharing {} as {}:/{}", s.dir.display(), a.listen.ip(), s.name);
            }
            tokio::select! {
                _ = server.accept(listener, |_| true) => Ok(()),
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        VnetCmd::Plan(a) => {
            std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
            let keys: Vec<StaticKeys> = a.endpoints.iter().map(|_| StaticKeys::generate()).collect();
            let members: Vec<Member> = a
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, &endpoint)| {
                    let node = i as u32 + 1;
                    Member { node, public: keys[i].public, endpoint, inbound: i == 0 || !a.closed.contains(&node), relay: i == 0 }
                })
                .collect();
            let psk: [u8; 32] = rand::random();
            for (i, k) in keys.iter().enumerate() {
                let c = Config { cluster: a.cluster, psk, me: i as u32 + 1, secret: k.secret, public: k.public, members: members.clone() };
                let path = a.dir.join(format!("node-{}.json", i + 1));
                write_private(&path, &serde_json::to_string_pretty(&c)?)?;
            }
            println!("wrote {} node configurations to {}", keys.len(), a.dir.display());
            Ok(())
        }
    }
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
