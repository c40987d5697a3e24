//! Network namespaces on one switch, as root: the virtual network's test and
//! the soak build on it. Every name carries a prefix with this test's pid, so
//! tests running at once do not collide; everything is removed when dropped.

use std::process::{Child, Command, Output, Stdio};

pub struct Lab {
    prefix: String,
    /// The switch's subnet, as its first three octets ("10.210.0").
    subnet: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Each namespace takes its interfaces with it, and a veth's other end goes too.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs a command that must succeed; its standard output.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(out.status.success(), "{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether this test can build namespaces (root, and `tools` installed).
/// Under CI=true it must: a missing prerequisite fails the test. Elsewhere
/// it says what is missing, for the caller to skip.
pub fn can_build(tools: &[&str]) -> bool {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let found = |t: &&str| Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success());
    if root && tools.iter().all(|t| found(t)) && std::path::Path::new("/dev/net/tun").exists() {
        return true;
    }
    let need = format!("root, /dev/net/tun and {} (scripts/test installs them)", tools.join(", "));
    assert!(std::env::var("CI").as_deref() != Ok("true"), "under CI this test needs {need}");
    eprintln!("skipped: needs {need}");
    false
}

impl Lab {
    /// A switch (a bridge in a namespace of its own) on `subnet`/24.
    pub fn new(tag: &str, subnet: &str) -> Lab {
        let mut lab = Lab { prefix: format!("{tag}{}", std::process::id() % 100_000), subnet: subnet.into(), namespaces: Vec::new(), children: Vec::new(), dir: tempfile::tempdir().unwrap() };
        lab.add_ns("sw");
        sh(&["ip", "-n", &lab.ns("sw"), "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &lab.ns("sw"), "link", "set", "br0", "up"]);
        lab
    }

    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A command to run inside namespace `ns` (`ip netns exec` execs it:
    /// the child's pid is the command's own).
    pub fn command(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).args(args);
        c
    }

    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        self.command(ns, args).output().unwrap()
    }

    /// Starts a process in `ns` that lives as long as the lab; its standard error goes to a log in the lab's directory.
    pub fn spawn(&mut self, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{ns}-{}.log", self.children.len()))).unwrap();
        let child = self.command(ns, args).stdout(Stdio::null()).stderr(log).spawn().unwrap();
        self.children.push(child);
    }

    pub fn add_ns(&mut self, name: &str) {
        let ns = self.ns(name);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output(); // one an earlier run left
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns);
    }

    /// A new namespace `name` on the switch at the subnet's `.host`.
    pub fn plug(&mut self, name: &str, host: u8) {
        self.add_ns(name);
        let a = format!("{}{name}a", self.prefix);
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &self.cable(name)]);
        sh(&["ip", "link", "set", &a, "netns", &self.ns(name)]);
        self.to_switch(name);
        sh(&["ip", "-n", &self.ns(name), "addr", "add", &format!("{}.{host}/24", self.subnet), "dev", &a]);
        sh(&["ip", "-n", &self.ns(name), "link", "set", &a, "up"]);
    }

    /// This (the root) namespace on the switch at the subnet's `.host`, for
    /// a service the test's own commands reach as well as the namespaces.
    /// The root end goes when the switch does.
    pub fn plug_here(&mut self, host: u8) {
        let a = format!("{}herea", self.prefix);
        sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &self.cable("here")]);
        self.to_switch("here");
        sh(&["ip", "addr", "add", &format!("{}.{host}/24", self.subnet), "dev", &a]);
        sh(&["ip", "link", "set", &a, "up"]);
    }

    /// The switch's end of `name`'s cable.
    fn cable(&self, name: &str) -> String {
        format!("{}{name}b", self.prefix)
    }

    fn to_switch(&self, name: &str) {
        let b = self.cable(name);
        sh(&["ip", "link", "set", &b, "netns", &self.ns("sw")]);
        sh(&["ip", "-n", &self.ns("sw"), "link", "set", &b, "master", "br0", "up"]);
    }

    /// Unplugs (`false`) or plugs back `name`'s cable at the switch: a partition.
    pub fn set_link(&self, name: &str, up: bool) {
        sh(&["ip", "-n", &self.ns("sw"), "link", "set", &self.cable(name), if up { "up" } else { "down" }]);
    }

    /// Drops `percent` of the packets to and from `name`, at random (0: none).
    /// (nftables: this kernel has no netem.)
    pub fn set_loss(&self, name: &str, percent: u32) {
        let _ = self.exec(name, &["nft", "delete", "table", "inet", "loss"]);
        if percent > 0 {
            let rules = format!(
                "table inet loss {{ chain i {{ type filter hook input priority 0; numgen random mod 100 < {percent} drop; }}; chain o {{ type filter hook output priority 0; numgen random mod 100 < {percent} drop; }}; }}"
            );
            sh(&["ip", "netns", "exec", &self.ns(name), "nft", &rules]);
        }
    }

    /// Chokes `name`'s link to `kbit` each way with a token bucket (0: unchoked), which also delays what queues behind it.
    pub fn set_rate(&self, name: &str, kbit: u32) {
        let ends = [(self.ns(name), format!("{}{name}a", self.prefix)), (self.ns("sw"), self.cable(name))];
        for (ns, dev) in &ends {
            let _ = Command::new("tc").args(["-n", ns, "qdisc", "del", "dev", dev, "root"]).output();
            if kbit > 0 {
                sh(&["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &format!("{kbit}kbit"), "burst", "16kbit", "latency", "500ms"]);
            }
        }
    }

    pub fn ping(&self, from: &str, to: &str) -> bool {
        self.exec(from, &["ping", "-c", "2", "-i", "0.2", "-W", "2", to]).status.success()
    }
}
