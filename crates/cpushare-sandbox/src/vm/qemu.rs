//! Starting QEMU for a lease, and the KVM probe.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use super::boot::direct_boot;

/// How the guest's CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// QEMU's software emulation: slower, works everywhere.
    Tcg,
}

/// How the image was booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Its kernel started directly on `microvm`: what it started, by SHA-256.
    Direct { cmdline: String, kernel_sha256: [u8; 32], initrd_sha256: Option<[u8; 32]> },
    /// From the CD through SeaBIOS, because (the reason) it could not be booted directly.
    Bios { why: String },
}

/// One VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The buyer's livecd (ISO 9660), attached read-only.
    pub iso: PathBuf,
    pub ram_mib: u32,
    pub accel: Accel,
    /// A directory of this VM's own, for the kernel and initrd taken from the image.
    pub work: PathBuf,
    /// Force the BIOS path (to compare the two boots).
    pub bios: bool,
    /// A writable scratch disk (a file, RAM-backed on a seller), attached after the image.
    pub scratch: Option<PathBuf>,
    /// A network card on a unix datagram socket (QEMU's `-netdev dgram`).
    pub net: Option<VmNet>,
}

/// A VM's network card: frames go to `node` (the seller's socket) from `vm` (QEMU's).
#[derive(Debug, Clone)]
pub struct VmNet {
    pub vm: PathBuf,
    pub node: PathBuf,
    pub mac: [u8; 6],
}

fn net_args(net: &VmNet, device: &str) -> io::Result<Vec<String>> {
    let mac = net.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    Ok(vec![
        "-netdev".into(),
        format!("dgram,id=net0,local.type=unix,local.path={},remote.type=unix,remote.path={}", path(&net.vm)?.replace(',', ",,"), path(&net.node)?.replace(',', ",,")),
        "-device".into(),
        format!("{device},netdev=net0,mac={mac}"),
    ])
}

/// A running VM. Dropped, it is shut down as [`Vm::shutdown`] does, in the
/// background (or killed at once outside a runtime).
pub struct Vm {
    child: Option<Child>,
    /// The serial console, as the guest writes it.
    pub console: ChildStdout,
    pub boot: Boot,
    /// QEMU's monitor (QMP) socket.
    qmp: PathBuf,
}

/// QEMU's process id, in the VM's work directory.
pub const PIDFILE: &str = "qemu.pid";

/// How long a guest asked to power off has before it is killed.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Vm {
    /// Waits until QEMU exits (the guest powered off, crashed or was killed).
    pub async fn wait(&mut self) -> io::Result<std::process::ExitStatus> {
        self.child.as_mut().expect("a VM not shut down yet").wait().await
    }

    /// Presses the guest's power button (ACPI, over QMP) so it can shut down
    /// cleanly, and kills it if it has not within `grace`, whatever the guest does.
    /// The console stays readable to its end.
    pub async fn shutdown(&mut self, grace: Duration) -> io::Result<std::process::ExitStatus> {
        let child = self.child.take().expect("a VM is shut down once");
        shut_down(child, &self.qmp, grace).await
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let qmp = self.qmp.clone();
                rt.spawn(async move { shut_down(child, &qmp, SHUTDOWN_GRACE).await });
            }
            Err(_) => {
                let _ = child.start_kill();
            }
        }
    }
}

async fn shut_down(mut child: Child, qmp: &Path, grace: Duration) -> io::Result<std::process::ExitStatus> {
    if let Ok(None) = child.try_wait() {
        // A monitor that does not answer gets the guest killed at once.
        if power_button(qmp).await.is_ok() {
            if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
                return status;
            }
        }
    }
    child.kill().await?;
    child.wait().await
}

/// `system_powerdown` over QMP: the greeting, capabilities, then the button.
async fn power_button(socket: &Path) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let talk = async {
        let mut stream = BufReader::new(tokio::net::UnixStream::connect(socket).await?);
        let mut line = String::new();
        stream.read_line(&mut line).await?;
        for command in ["{\"execute\":\"qmp_capabilities\"}\n", "{\"execute\":\"system_powerdown\"}\n"] {
            stream.get_mut().write_all(command.as_bytes()).await?;
            // The answer, after any events QEMU sends first.
            loop {
                line.clear();
                if stream.read_line(&mut line).await? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "QMP closed"));
                }
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") {
                    return Err(io::Error::other(format!("QMP: {}", line.trim())));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), talk).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "QMP did not answer"))?
}

const QEMU: &str = "qemu-system-x86_64";

/// What every VM gets: no default devices, no network, no host files, the
/// serial console on stdout, and QEMU's own seccomp sandbox.
fn common(spec: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot", "-smp", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend(["-m".into(), format!("{}M", spec.ram_mib)]);
    a.extend(["-sandbox".into(), "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into()]);
    match spec.accel {
        Accel::Kvm => a.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
        Accel::Tcg => a.extend(["-accel", "tcg", "-cpu", "max"].map(String::from)),
    }
    a
}

/// The machine a kernel boots on directly, and the virtio block device it
/// takes. Under KVM: `microvm` with ACPI (Debian's kernel finds virtio-mmio
/// devices only through ACPI), the smallest machine there is. Under TCG: the
/// `pc` machine, whose HPET and ACPI PM timer let the guest calibrate its
/// clock; on `microvm` only the PIT can, and on a loaded host (three TCG
/// guests on two cores) its calibration failed and the kernel hung before
/// userspace in 16 boots of 24, against 0 of 24 on `pc`, which boots as fast
/// (4.5 s against 4.4 s here).
fn direct_machine(accel: Accel) -> (&'static str, &'static str) {
    match accel {
        Accel::Kvm => ("microvm,acpi=on", "virtio-blk-device"),
        Accel::Tcg => ("pc", "virtio-blk-pci"),
    }
}

/// Starts the VM `spec` describes: directly if its image allows, else through the BIOS.
pub async fn start(spec: &VmSpec) -> io::Result<Vm> {
    let mut args = common(spec);
    let iso = spec.iso.to_str().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the image's path is not UTF-8"))?;
    // QEMU's -drive option separates with commas.
    let iso = iso.replace(',', ",,");
    let direct = if spec.bios { Err("asked for the BIOS path".to_string()) } else { direct_boot(&spec.iso) };
    let boot = match direct {
        Ok(d) => {
            std::fs::create_dir_all(&spec.work)?;
            let kernel = spec.work.join("kernel");
            std::fs::write(&kernel, &d.kernel)?;
            let (machine, disk) = direct_machine(spec.accel);
            args.extend(["-M".into(), machine.into(), "-kernel".into(), path(&kernel)?]);
            if let Some(initrd) = &d.initrd {
                let at = spec.work.join("initrd");
                std::fs::write(&at, initrd)?;
                args.extend(["-initrd".into(), path(&at)?]);
            }
            args.extend(["-append".into(), d.cmdline.clone()]);
            let (kernel_sha256, initrd_sha256) = d.digests();
            args.extend(["-drive".into(), format!("file={iso},if=none,id=image,readonly=on,format=raw"), "-device".into(), format!("{disk},drive=image")]);
            if let Some(scratch) = &spec.scratch {
                let scratch = path(scratch)?.replace(',', ",,");
                args.extend(["-drive".into(), format!("file={scratch},if=none,id=scratch,format=raw"), "-device".into(), format!("{disk},drive=scratch")]);
            }
            if let Some(net) = &spec.net {
                args.extend(net_args(net, if disk == "virtio-blk-pci" { "virtio-net-pci" } else { "virtio-net-device" })?);
            }
            Boot::Direct { cmdline: d.cmdline, kernel_sha256, initrd_sha256 }
        }
        Err(why) => {
            args.extend(["-M".into(), "pc".into(), "-drive".into(), format!("file={iso},media=cdrom,readonly=on,if=ide,format=raw"), "-boot".into(), "d".into()]);
            if let Some(scratch) = &spec.scratch {
                args.extend(["-drive".into(), format!("file={},if=ide,format=raw", path(scratch)?.replace(',', ",,"))]);
            }
            if let Some(net) = &spec.net {
                args.extend(net_args(net, "virtio-net-pci")?);
            }
            Boot::Bios { why }
        }
    };
    std::fs::create_dir_all(&spec.work)?;
    let qmp = spec.work.join("qmp.sock");
    let _ = std::fs::remove_file(&qmp);
    args.extend(["-qmp".into(), format!("unix:{},server=on,wait=off", path(&qmp)?.replace(',', ",,"))]);
    // For whoever finds this VM orphaned (its seller killed): see `PIDFILE`.
    args.extend(["-pidfile".into(), path(&spec.work.join(PIDFILE))?.replace(',', ",,")]);
    let mut command = Command::new(QEMU);
    command.args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
    // A seller killed outright (SIGKILL, a crash) runs no destructor: the
    // kernel kills its VMs with it. (It fires when the spawning thread ends:
    // a runtime worker, which lives as long as the seller.)
    // SAFETY: prctl(2) with integer arguments only, async-signal-safe, between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let console = child.stdout.take().expect("piped");
    Ok(Vm { child: Some(child), console, boot, qmp })
}

/// The first line of `qemu-system-x86_64 --version`, what attestations name.
pub fn qemu_version() -> io::Result<String> {
    let out = std::process::Command::new(QEMU).arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().next() {
        Some(line) if out.status.success() => Ok(line.trim().to_string()),
        _ => Err(io::Error::other(format!("{QEMU} --version failed: {}", String::from_utf8_lossy(&out.stderr).trim()))),
    }
}

fn path(p: &Path) -> io::Result<String> {
    p.to_str().map(str::to_string).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path that is not UTF-8"))
}

/// Whether a real Linux guest boots under KVM here: `kernel` (a Linux bzImage)
/// is started with KVM and a one-program initramfs that prints a line and
/// powers off, within `limit`. `/dev/kvm` existing is not enough: on some
/// hosts it runs tiny guests but a stock kernel crashes under it.
pub async fn kvm_boots(kernel: &Path, work: &Path, limit: Duration) -> bool {
    Path::new("/dev/kvm").exists() && boots(kernel, Accel::Kvm, work, limit).await
}

/// Whether `kernel` boots to userspace under `accel` within `limit` (see [`kvm_boots`]).
pub async fn boots(kernel: &Path, accel: Accel, work: &Path, limit: Duration) -> bool {
    let probe = async {
        std::fs::create_dir_all(work)?;
        let initrd = work.join("probe-initrd");
        std::fs::write(&initrd, probe_initramfs()?)?;
        let spec = VmSpec { iso: PathBuf::new(), ram_mib: 128, accel, work: work.to_path_buf(), bios: false, scratch: None, net: None };
        let mut args = common(&spec);
        args.extend(["-M".into(), direct_machine(accel).0.into(), "-kernel".into(), path(kernel)?, "-initrd".into(), path(&initrd)?]);
        args.extend(["-append".into(), "console=ttyS0 quiet panic=-1".into()]);
        let mut child = Command::new(QEMU).args(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut errors = BufReader::new(child.stderr.take().expect("piped")).lines();
        let mut errors_open = true;
        loop {
            tokio::select! {
                line = lines.next_line() => match line? {
                    Some(l) if l.contains("cpushare-vm-probe: booted") => return io::Result::Ok(true),
                    Some(_) => {}
                    None => return Ok(false),
                },
                // A guest KVM cannot run makes QEMU stop it and wait: "KVM
                // internal error", then nothing. No need to sit out the limit.
                line = errors.next_line(), if errors_open => match line? {
                    Some(l) if l.contains("internal error") || l.contains("emulation failure") => return Ok(false),
                    Some(_) => {}
                    None => errors_open = false,
                },
            }
        }
    };
    matches!(tokio::time::timeout(limit, probe).await, Ok(Ok(true)))
}

/// A newc cpio archive with `/dev/console` and the probe as `/init`.
fn probe_initramfs() -> io::Result<Vec<u8>> {
    let program = crate::test_guests::VMPROBE;
    let mut out = Vec::new();
    let w = cpio::newc::Builder::new("dev").mode(0o40755).write(&mut out, 0);
    w.finish()?;
    let w = cpio::newc::Builder::new("dev/console").mode(0o20600).rdev_major(5).rdev_minor(1).write(&mut out, 0);
    w.finish()?;
    let mut w = cpio::newc::Builder::new("init").mode(0o100755).write(&mut out, program.len() as u32);
    w.write_all(program)?;
    w.finish()?;
    cpio::newc::trailer(&mut out)?;
    Ok(out)
}
