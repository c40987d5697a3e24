//! A VM lease: the buyer's livecd, received once (resumable, verified before
//! boot, cached by SHA-256 with a size cap and least-recently-used eviction,
//! shared between leases and buyers), booted in QEMU
//! (`cpushare_sandbox::vm`), its serial console streamed back to the buyer.
//! Upload time is not billed: the lease turns running when the guest shows
//! its first sign of life on the console.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cpushare_exchange::job;
use cpushare_proto::v1::{self as pb, job_message::Body as Job, seller_message::Body as Say};
use cpushare_sandbox::vm::{self, Accel, Boot, VmSpec};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// The largest image a seller takes.
const MAX_IMAGE: u64 = 8 << 30;
/// A guest silent on its console this long after starting is taken as booted anyway.
const SILENT_BOOT: Duration = Duration::from_secs(60);

/// Buyers' images, by SHA-256: `HEX` when whole and verified, `HEX.part` while arriving.
pub struct Images {
    dir: PathBuf,
    /// Bytes of whole images kept.
    cap: u64,
}

fn hex(sha: &[u8]) -> String {
    sha.iter().map(|b| format!("{b:02x}")).collect()
}

impl Images {
    pub fn new(dir: PathBuf, cap: u64) -> io::Result<Images> {
        std::fs::create_dir_all(&dir)?;
        Ok(Images { dir, cap })
    }

    fn whole(&self, sha: &[u8]) -> PathBuf {
        self.dir.join(hex(sha))
    }

    fn part(&self, sha: &[u8]) -> PathBuf {
        self.dir.join(format!("{}.part", hex(sha)))
    }

    /// Where an upload of this image starts: its size when it is here (no
    /// upload), else the end of what an interrupted upload left.
    pub fn have(&self, sha: &[u8], size: u64) -> u64 {
        if std::fs::metadata(self.whole(sha)).is_ok_and(|m| m.len() == size) {
            return size;
        }
        std::fs::metadata(self.part(sha)).map_or(0, |m| m.len().min(size))
    }

    /// Holds the image for one receiver: waits while another lease (of this
    /// seller, or of another process sharing the cache) is receiving it, so
    /// that two uploads never append to one part. Held until dropped.
    pub async fn receiving(&self, sha: &[u8]) -> io::Result<File> {
        let path = self.dir.join(format!("{}.lock", hex(sha)));
        tokio::task::spawn_blocking(move || {
            let f = File::options().create(true).truncate(false).write(true).open(path)?;
            f.lock()?;
            Ok(f)
        })
        .await?
    }

    /// Where arriving bytes are appended.
    pub fn part_file(&self, sha: &[u8]) -> io::Result<File> {
        File::options().create(true).append(true).open(self.part(sha))
    }

    /// Appends arriving bytes.
    pub fn append(&self, sha: &[u8], data: &[u8]) -> io::Result<()> {
        self.part_file(sha)?.write_all(data)
    }

    /// The whole image, verified: its size and SHA-256 must be the offer's,
    /// or it is thrown away (never booted).
    pub fn finish(&self, sha: &[u8], size: u64) -> Result<PathBuf, String> {
        let part = self.part(sha);
        let verified = (|| {
            let file = File::open(&part).map_err(|e| format!("the image: {e}"))?;
            let (digest, len) = vm::image_sha256(file).map_err(|e| e.to_string())?;
            if len != size {
                return Err(format!("the image is {len} bytes, not the {size} offered"));
            }
            if digest.as_slice() != sha {
                return Err("the image does not match its SHA-256: refused, not booted".into());
            }
            Ok(())
        })();
        if let Err(e) = verified {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        let whole = self.whole(sha);
        std::fs::rename(&part, &whole).map_err(|e| e.to_string())?;
        Ok(whole)
    }

    /// Marks an image used now, and drops the least recently used whole
    /// images (never `keep`) until the rest fit the cap.
    pub fn used(&self, keep: &[u8]) {
        let keep = self.whole(keep);
        if let Ok(f) = File::options().append(true).open(&keep) {
            let _ = f.set_modified(SystemTime::now());
        }
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut whole: Vec<(SystemTime, u64, PathBuf)> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().ends_with(".part") && !e.file_name().to_string_lossy().ends_with(".lock"))
            .filter_map(|e| e.metadata().ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), e.path())))
            .collect();
        let mut total: u64 = whole.iter().map(|w| w.1).sum();
        whole.sort();
        for (_, len, path) in whole {
            if total <= self.cap {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                total -= len;
            }
        }
    }
}

/// What a VM lease needs of the seller.
pub(crate) struct Setup {
    pub lease: u64,
    pub images: std::sync::Arc<Images>,
    pub accel: Accel,
    pub slot_ram_mib: u32,
    /// The node (its key and certificate sign what it booted; it joins networks).
    pub node: std::sync::Arc<cpushare_exchange::node::NodeConfig>,
    pub qemu_version: String,
    pub work: PathBuf,
    pub session: SessionLink,
}

/// The seller's session with the exchange now open. A VM outlives the
/// session and the relay its lease began on (the exchange restarting, a
/// partition, break both, not the lease): what it says goes to the new ones.
pub(crate) type SessionLink = std::sync::Arc<std::sync::Mutex<mpsc::Sender<pb::SellerMessage>>>;

/// Tells the exchange the lease's VM is up (metering starts). Said again on
/// every new relay: one the exchange lost in a restart counts, a second is
/// refused and harmless.
async fn say_ready(setup: &Setup) {
    let session = setup.session.lock().unwrap().clone();
    let _ = session.send(pb::SellerMessage { body: Some(Say::Ready(pb::Ready { lease: setup.lease })) }).await;
}

/// The seller cannot run the lease's VM: the buyer is told why, and the
/// lease is given back (charged only for what was delivered: nothing, before
/// the VM ran), so that the buyer's order finds another slot.
pub(crate) async fn give_back(setup: &Setup, out: &mpsc::Sender<pb::RelayFrame>, why: String) -> anyhow::Result<()> {
    let outcome = pb::Outcome { killed: why.clone(), seller_fault: true, ..Default::default() };
    let _ = out.send(job::frame(Job::Outcome(outcome))).await;
    let session = setup.session.lock().unwrap().clone();
    session.send(pb::SellerMessage { body: Some(Say::Ended(pb::Ended { lease: setup.lease, why })) }).await?;
    Ok(())
}

/// One relay to the buyer: its frames in, ours out, and how much of the
/// console the buyer said it has.
struct Relay {
    inbound: tonic::Streaming<pb::RelayFrame>,
    out: mpsc::Sender<pb::RelayFrame>,
    console_from: u64,
}

/// Console output the buyer may not have yet, for a relay opened again: the
/// last `CONSOLE_KEPT` bytes, and how many the VM has written in all (what a
/// relay sent just before it broke may not have arrived either).
#[derive(Default)]
struct ConsoleTail {
    kept: std::collections::VecDeque<u8>,
    written: u64,
}

const CONSOLE_KEPT: usize = 1 << 20;

impl ConsoleTail {
    fn push(&mut self, data: &[u8]) {
        self.kept.extend(data);
        let over = self.kept.len().saturating_sub(CONSOLE_KEPT);
        self.kept.drain(..over);
        self.written += data.len() as u64;
    }

    /// What follows the first `from` bytes, as far as it is kept.
    fn since(&self, from: u64) -> Vec<u8> {
        let start = self.written - self.kept.len() as u64;
        if from < start {
            tracing::warn!(lost = start - from, "console output the buyer missed is no longer kept");
        }
        let skip = (from.clamp(start, self.written) - start) as usize;
        self.kept.range(skip..).copied().collect()
    }
}

/// Sends console bytes in relay-sized frames; a relay gone is not an error.
async fn send_console(out: &mpsc::Sender<pb::RelayFrame>, data: &[u8]) -> anyhow::Result<()> {
    for piece in data.chunks(64 << 10) {
        let frame = job::chunk_frame(Job::Console, |to, _| {
            to.extend_from_slice(piece);
            Ok(())
        })?;
        if out.send(frame).await.is_err() {
            break;
        }
    }
    Ok(())
}

impl Relay {
    /// Opens the lease's relay again and waits for the buyer, which offers
    /// the image again: it is told the image is all here (its VM runs on).
    /// Tries until it succeeds; the lease ending aborts the whole task.
    async fn reopen(setup: &Setup, sha256: &[u8], size: u64) -> Relay {
        let mut pause = Duration::from_millis(500);
        loop {
            match Relay::try_reopen(setup, sha256, size).await {
                Ok(r) => return r,
                Err(e) => tracing::info!(lease = setup.lease, "the relay is not back yet: {e:#}"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn try_reopen(setup: &Setup, sha256: &[u8], size: u64) -> anyhow::Result<Relay> {
        let mut conn = setup.node.connect().await?;
        let (out, rx) = mpsc::channel::<pb::RelayFrame>(8);
        out.send(pb::RelayFrame { lease: setup.lease, data: Default::default() }).await?;
        let mut inbound = conn.exchange.relay(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map_err(|s| anyhow::anyhow!("the relay refused: {}", s.message()))?.into_inner();
        let console_from = match job::next(&mut inbound).await? {
            Some(Job::ImageOffer(o)) if o.sha256 == sha256 && o.size == size => o.console_from,
            other => anyhow::bail!("the buyer came back with {other:?}, not this VM's image"),
        };
        out.send(job::frame(Job::ImageWanted(pb::ImageWanted { from: size }))).await?;
        Ok(Relay { inbound, out, console_from })
    }

    /// Until the buyer's side breaks off (what it sends meanwhile is not asked for).
    async fn broken(&mut self) {
        while let Ok(Some(_)) = job::next(&mut self.inbound).await {}
    }
}

/// The signed statement of exactly what this VM runs.
fn attest(setup: &Setup, image_sha256: &[u8], boot: &Boot) -> anyhow::Result<pb::VmAttestation> {
    use prost::Message;
    let mut s = pb::VmStatement {
        lease: setup.lease,
        image_sha256: image_sha256.to_vec(),
        accel: accel_name(setup.accel).into(),
        qemu_version: setup.qemu_version.clone(),
        ..Default::default()
    };
    match boot {
        Boot::Direct { cmdline, kernel_sha256, initrd_sha256 } => {
            s.boot = "direct".into();
            s.cmdline = cmdline.clone();
            s.kernel_sha256 = kernel_sha256.to_vec();
            s.initrd_sha256 = initrd_sha256.map(|d| d.to_vec()).unwrap_or_default();
        }
        Boot::Bios { .. } => s.boot = "bios".into(),
    }
    let statement = s.encode_to_vec();
    let signature = setup.node.identity.sign_statement(job::VM_BOOT_STATEMENT, &statement)?;
    Ok(pb::VmAttestation { statement, signature, certificate: setup.node.identity.cert.to_vec() })
}

fn accel_name(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    }
}

/// Serves a VM lease whose relay opened with `offer`; returns when the VM
/// has stopped and the buyer has been told.
pub(crate) async fn serve(
    setup: Setup,
    offer: pb::ImageOffer,
    mut inbound: tonic::Streaming<pb::RelayFrame>,
    out: mpsc::Sender<pb::RelayFrame>,
) -> anyhow::Result<()> {
    let refuse = |why: String| pb::Outcome { killed: why, ..Default::default() };
    if offer.sha256.len() != 32 || offer.size == 0 || offer.size > MAX_IMAGE {
        out.send(job::frame(Job::Outcome(refuse(format!("an image must be 1 byte to {MAX_IMAGE} bytes with a SHA-256"))))).await?;
        return Ok(());
    }
    let ram_mib = offer.ram_mib.max(64);
    if ram_mib as u64 + offer.scratch_mib as u64 > setup.slot_ram_mib as u64 {
        let why = format!("{ram_mib} MiB of RAM and a {} MiB scratch disk do not fit this slot's {} MiB", offer.scratch_mib, setup.slot_ram_mib);
        out.send(job::frame(Job::Outcome(refuse(why)))).await?;
        return Ok(());
    }
    let images = setup.images.clone();
    let receiving = images.receiving(&offer.sha256).await?;
    let from = images.have(&offer.sha256, offer.size);
    out.send(job::frame(Job::ImageWanted(pb::ImageWanted { from }))).await?;
    let mut got = from;
    let mut part = if from < offer.size { Some(images.part_file(&offer.sha256)?) } else { None };
    while got < offer.size {
        match job::next(&mut inbound).await? {
            Some(Job::Image(c)) => {
                anyhow::ensure!(got + c.data.len() as u64 <= offer.size, "the buyer sent more image than offered");
                part.as_mut().expect("open while bytes are missing").write_all(&c.data)?;
                got += c.data.len() as u64;
            }
            None => anyhow::bail!("the buyer left during the upload (it resumes from {got} bytes)"),
            other => anyhow::bail!("expected the image, got {other:?}"),
        }
    }
    drop(part);
    let iso = if from == offer.size {
        images.whole(&offer.sha256)
    } else {
        // Hashing a large image takes seconds: not on the runtime's threads,
        // where it would stall this seller's relays and heartbeats.
        let (store, sha, size) = (images.clone(), offer.sha256.clone(), offer.size);
        match tokio::task::spawn_blocking(move || store.finish(&sha, size)).await? {
            Ok(p) => p,
            Err(why) => {
                out.send(job::frame(Job::Outcome(refuse(why)))).await?;
                return Ok(());
            }
        }
    };
    drop(receiving);
    images.used(&offer.sha256);

    let _ = std::fs::remove_dir_all(&setup.work);
    std::fs::create_dir_all(&setup.work)?;
    // The scratch disk: a sparse file in RAM (tmpfs), counted against the
    // slot's RAM above; beside the VM only where this host has no /dev/shm.
    let scratch_file = match offer.scratch_mib {
        0 => None,
        mib => {
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() { shm } else { setup.work.as_path() };
            let at = dir.join(format!("cpushare-scratch-{}-{}", setup.lease, crate::process_tag::own()));
            File::create(&at)?.set_len(mib as u64 * (1 << 20))?;
            Some(RemoveOnDrop(at))
        }
    };
    let scratch = scratch_file.as_ref().map(|s| s.0.clone());
    // The cluster's network: this seller joins it for the lease, and the VM's
    // card is a socket pair with the node (no tap, no root).
    let network = match offer.network_order {
        0 => None,
        order => {
            let (ours, vm) = (setup.work.join("net.sock"), setup.work.join("vm.sock"));
            let conn = setup.node.connect().await?;
            let local = cpushare_exchange::netclient::Local::Vm { ours: ours.clone(), vm: vm.clone() };
            match cpushare_exchange::netclient::attach(&conn, &setup.node.identity, &setup.node.ca, order, setup.lease, local, Some(setup.work.join("vnet.json"))).await {
                Ok(a) => Some((a, vm, ours)),
                Err(e) => return give_back(&setup, &out, format!("the seller could not join the cluster's network: {e:#}")).await,
            }
        }
    };
    let net = network.as_ref().map(|(a, vm, ours)| vm::VmNet { vm: vm.clone(), node: ours.clone(), mac: a.me.mac });
    let spec = VmSpec { iso, ram_mib, accel: setup.accel, work: setup.work.clone(), bios: false, scratch, net };
    let mut machine = match vm::start(&spec).await {
        Ok(m) => m,
        Err(e) => return give_back(&setup, &out, format!("the seller could not start QEMU: {e}")).await,
    };
    let (boot, cmdline) = match &machine.boot {
        Boot::Direct { cmdline, .. } => ("direct".to_string(), cmdline.clone()),
        Boot::Bios { why } => {
            tracing::info!(lease = setup.lease, "booting through the BIOS: {why}");
            ("bios".to_string(), String::new())
        }
    };
    let attestation = attest(&setup, &offer.sha256, &machine.boot)?;
    let (ip, mac) = network.as_ref().map_or((String::new(), Vec::new()), |(a, _, _)| (a.me.ip.to_string(), a.me.mac.to_vec()));
    let booted = pb::VmBooted { boot, accel: accel_name(setup.accel).into(), cmdline, attestation: Some(attestation), ip, mac };

    // The console to the buyer. The guest has booted when it first writes
    // there (or has stayed silent a minute): the buyer is told, and metering
    // starts. When the relay breaks, the VM runs on and the relay is opened
    // again; the buyer then gets the console from where its log stops.
    let mut ready = false;
    let silent = tokio::time::sleep(SILENT_BOOT);
    tokio::pin!(silent);
    let mut buf = vec![0u8; 64 << 10];
    let mut tail = ConsoleTail::default();
    let mut relay = Some(Relay { inbound, out, console_from: 0 });
    let reopen = || Box::pin(Relay::reopen(&setup, &offer.sha256, offer.size));
    let mut reopening = None;
    loop {
        tokio::select! {
            n = machine.console.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    break;
                }
                if !ready {
                    ready = true;
                    say_ready(&setup).await;
                    if let Some(r) = &relay {
                        let _ = r.out.send(job::frame(Job::VmBooted(booted.clone()))).await;
                    }
                }
                tail.push(&buf[..n]);
                // A buyer that stopped listening does not stop the VM: the lease does.
                if let Some(r) = &relay {
                    send_console(&r.out, &buf[..n]).await?;
                }
            }
            _ = &mut silent, if !ready => {
                ready = true;
                say_ready(&setup).await;
                if let Some(r) = &relay {
                    let _ = r.out.send(job::frame(Job::VmBooted(booted.clone()))).await;
                }
            }
            _ = async { relay.as_mut().expect("guarded").broken().await }, if relay.is_some() => {
                tracing::info!(lease = setup.lease, "the relay broke; the VM runs on");
                relay = None;
                reopening = Some(reopen());
            }
            r = async { reopening.as_mut().expect("guarded").await }, if reopening.is_some() => {
                tracing::info!(lease = setup.lease, "the relay is back");
                reopening = None;
                if ready {
                    say_ready(&setup).await;
                    let _ = r.out.send(job::frame(Job::VmBooted(booted.clone()))).await;
                }
                send_console(&r.out, &tail.since(r.console_from)).await?;
                relay = Some(r);
            }
        }
    }
    let status = machine.wait().await?;
    let _ = std::fs::remove_dir_all(&setup.work);
    let outcome = pb::Outcome { success: status.success(), exit_code: status.code().unwrap_or(-1), ..Default::default() };
    // The buyer hears how it ended, on a relay opened again if need be (for a while).
    let relay = match (relay, reopening) {
        (Some(r), _) => Some(r),
        (None, Some(r)) => tokio::time::timeout(Duration::from_secs(60), r).await.ok(),
        (None, None) => None,
    };
    if let Some(mut r) = relay {
        let _ = r.out.send(job::frame(Job::Outcome(outcome))).await;
        // Our end of the relay stays open until the buyer closes it or the lease ends.
        let _ = tokio::time::timeout(Duration::from_secs(60), r.broken()).await;
    }
    Ok(())
}

/// Kills the VMs that sellers killed before they could stop them left
/// running, and removes their work directories: `cache_dir/vm/lease-N-TAG`,
/// TAG a seller process now gone (see `process_tag`), holding QEMU's pid file.
pub fn remove_stale_vms(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir.join("vm")) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(seller) = name.strip_prefix("lease-").and_then(|r| r.rsplit('-').next()) else { continue };
        if crate::process_tag::alive(seller) {
            continue;
        }
        let qemu = std::fs::read_to_string(e.path().join(vm::PIDFILE)).ok().and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = qemu {
            // Only a QEMU: the pid may have been reused since.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("qemu-system") {
                tracing::warn!(pid, "killing a VM a previous seller process left running");
                // SAFETY: kill(2) with a pid and a signal number touches no memory.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(e.path());
    }
}

/// Removes the scratch disks that sellers killed before they could clean up
/// left in RAM (their names end with the tag of the seller that made them, now gone).
pub fn remove_stale_scratch() {
    let Ok(entries) = std::fs::read_dir("/dev/shm") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(seller) = name.strip_prefix("cpushare-scratch-").and_then(|r| r.rsplit('-').next()) else { continue };
        if !crate::process_tag::alive(seller) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether a real Linux guest boots under KVM here: probed once (with a time
/// limit) per host kernel, CPU model, QEMU and probe kernel, then read from
/// `cache_dir/kvm-probe.json`, so that a seller restarting, or several on one
/// host, do not each boot a probe guest.
pub async fn kvm_verdict(cache_dir: &Path, qemu_version: &str) -> bool {
    let Some(kernel) = host_kernel() else { return false };
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let key = format!("{} | {} | {qemu_version} | {}", crate::kernel_release(), crate::bench::cpu_model(), kernel.display());
    let file = cache_dir.join("kvm-probe.json");
    let mut cache: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string(&file).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
    if let Some(v) = cache.get(&key).and_then(|v| v.as_bool()) {
        return v;
    }
    // A real KVM guest reaches the probe's line in well under a second.
    let verdict = vm::kvm_boots(&kernel, &cache_dir.join("kvm-probe"), Duration::from_secs(10)).await;
    cache.insert(key, verdict.into());
    let _ = std::fs::create_dir_all(cache_dir);
    let _ = std::fs::write(&file, serde_json::to_string_pretty(&cache).unwrap_or_default());
    verdict
}

/// A Linux kernel of this host's to probe KVM with, if it has one.
pub fn host_kernel() -> Option<PathBuf> {
    let release = crate::kernel_release();
    let own = Path::new("/boot").join(format!("vmlinuz-{release}"));
    if own.exists() {
        return Some(own);
    }
    std::fs::read_dir("/boot").ok()?.flatten().map(|e| e.path()).find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn an_interrupted_upload_resumes_and_a_corrupt_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::new(dir.path().join("images"), 1 << 30).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let sha: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!(images.have(&sha, data.len() as u64), 0);
        images.append(&sha, &data[..30_000]).unwrap();
        assert_eq!(images.have(&sha, data.len() as u64), 30_000, "resumes where it stopped");
        images.append(&sha, &data[30_000..]).unwrap();
        let whole = images.finish(&sha, data.len() as u64).unwrap();
        assert_eq!(std::fs::read(&whole).unwrap(), data);
        assert_eq!(images.have(&sha, data.len() as u64), data.len() as u64, "a second lease uploads nothing");

        let other: [u8; 32] = Sha256::digest(b"something else").into();
        images.append(&other, &data).unwrap();
        let why = images.finish(&other, data.len() as u64).unwrap_err();
        assert!(why.contains("does not match its SHA-256"), "{why}");
        assert_eq!(images.have(&other, data.len() as u64), 0, "nothing of a corrupt image is kept");
        images.append(&other, &data[..10]).unwrap();
        assert!(images.finish(&other, data.len() as u64).unwrap_err().contains("not the 100000 offered"));
    }

    #[test]
    fn a_vm_left_by_a_killed_seller_is_killed_at_the_next_start() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        // A seller process that is gone (this pid, started at another time:
        // what a reused pid looks like), and one that lives (this one).
        let live = crate::process_tag::own();
        let (pid, start) = live.split_once('.').unwrap();
        let dead = format!("{pid}.{}", start.parse::<u64>().unwrap() + 1);
        let orphan_dir = dir.path().join(format!("vm/lease-7-{dead}"));
        let live_dir = dir.path().join(format!("vm/lease-8-{live}"));
        // What looks like its QEMU (only a QEMU is killed: a pid may be reused).
        let mut qemu = std::process::Command::new("sleep").arg0("qemu-system-x86_64").arg("600").spawn().unwrap();
        // spawn returns once the child's exec has replaced its memory, which
        // is before the kernel has set where its arguments are: until then
        // /proc/PID/cmdline reads empty and it would not look like a QEMU.
        // (Read at once after spawn it was empty in 1,980 of 2,000 tries here; CI once hit it.)
        let cmdline = format!("/proc/{}/cmdline", qemu.id());
        let shown_by = std::time::Instant::now() + Duration::from_secs(10);
        while !String::from_utf8_lossy(&std::fs::read(&cmdline).unwrap_or_default()).contains("qemu-system") {
            assert!(std::time::Instant::now() < shown_by, "the stand-in QEMU never showed its command line");
            std::thread::sleep(Duration::from_millis(1));
        }
        for d in [&orphan_dir, &live_dir] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(vm::PIDFILE), format!("{}\n", qemu.id())).unwrap();
        }
        let mut bystander = std::process::Command::new("sleep").arg("600").spawn().unwrap();
        let other = dir.path().join(format!("vm/lease-9-{dead}"));
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join(vm::PIDFILE), bystander.id().to_string()).unwrap();

        remove_stale_vms(dir.path());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = qemu.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                let _ = qemu.kill();
                panic!("the orphaned QEMU was not killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert!(!orphan_dir.exists() && !other.exists(), "the dead sellers' directories are gone");
        assert!(live_dir.exists(), "a live seller's VM is its own business");
        assert!(bystander.try_wait().unwrap().is_none(), "a process that is not QEMU is left alone");
        bystander.kill().unwrap();
    }

    #[test]
    fn a_relay_opened_again_gets_the_console_from_where_the_buyer_stopped() {
        let mut tail = ConsoleTail::default();
        tail.push(b"tick 0\n");
        tail.push(b"tick 1\n");
        assert_eq!(tail.since(0), b"tick 0\ntick 1\n");
        assert_eq!(tail.since(7), b"tick 1\n", "what the buyer has is not sent again");
        assert_eq!(tail.since(14), b"");
        assert_eq!(tail.since(99), b"", "a buyer claiming more gets nothing");
        // Only the last MiB is kept: a buyer further behind gets that much.
        let line = vec![b'x'; 1000];
        for _ in 0..2000 {
            tail.push(&line);
        }
        assert_eq!(tail.written, 14 + 2_000_000);
        let late = tail.since(7);
        assert_eq!(late.len(), CONSOLE_KEPT);
        assert!(late.iter().all(|&b| b == b'x'));
        assert_eq!(tail.since(tail.written - 3), b"xxx");
    }

    #[test]
    fn the_cache_keeps_the_most_recently_used_images_under_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::new(dir.path().to_path_buf(), 250_000).unwrap();
        let mut shas = Vec::new();
        for k in 0..3u8 {
            let data = vec![k; 100_000];
            let sha: [u8; 32] = Sha256::digest(&data).into();
            images.append(&sha, &data).unwrap();
            images.finish(&sha, 100_000).unwrap();
            let f = File::options().append(true).open(images.whole(&sha)).unwrap();
            f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + k as u64)).unwrap();
            shas.push(sha);
        }
        images.used(&shas[0]);
        assert_eq!(images.have(&shas[0], 100_000), 100_000, "just used: kept");
        assert_eq!(images.have(&shas[1], 100_000), 0, "least recently used: evicted");
        assert_eq!(images.have(&shas[2], 100_000), 100_000);
    }
}
