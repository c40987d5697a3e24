//! The VM runner: a buyer's livecd in QEMU, one VM per lease.
//!
//! QEMU runs unprivileged with `-nodefaults`, its own seccomp sandbox on, no
//! network and no host files but the read-only image; the serial console is
//! the VM's only output. The kernel, initrd and command line are read from the
//! image's boot configuration ([`boot`]) and started directly (on `microvm`
//! with ACPI under KVM, on `pc` under TCG, whose timers a loaded host needs:
//! see `direct_machine`), with the image as a read-only virtio disk; an image
//! that cannot be booted that way boots from the CD through the BIOS, as any
//! x86 livecd can.
//!
//! KVM is used only where a real Linux guest has been seen to boot under it
//! ([`kvm_boots`]); otherwise software emulation (TCG).

pub mod boot;
mod qemu;

pub use qemu::{boots, kvm_boots, qemu_version, start, Accel, Boot, Vm, VmNet, VmSpec, PIDFILE};

/// An image's SHA-256 and size, read in 1 MiB pieces: what images are
/// addressed and checked by, on both sides of a VM lease.
pub fn image_sha256(mut from: impl std::io::Read) -> std::io::Result<([u8; 32], u64)> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok((h.finalize().into(), size));
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
}

/// For tests and benchmarks: a livecd built by this repository's
/// `scripts/make-live-iso`, with `init` as its payload's init script.
#[doc(hidden)]
pub mod testing {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// `DIR/NAME.iso`, or None (said aloud) when QEMU or the script's tools
    /// are missing outside CI; under `CI=true` a missing prerequisite fails.
    pub fn livecd(dir: &Path, name: &str, init: &str) -> Option<PathBuf> {
        livecd_with(dir, name, init, &[])
    }

    /// [`livecd`], with `options` for make-live-iso (such as `--share data`).
    pub fn livecd_with(dir: &Path, name: &str, init: &str, options: &[&str]) -> Option<PathBuf> {
        let ci = std::env::var("CI").as_deref() == Ok("true");
        if Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
            assert!(!ci, "qemu-system-x86 is needed under CI");
            eprintln!("skipped: no qemu-system-x86_64 (scripts/test installs qemu-system-x86)");
            return None;
        }
        let payload = dir.join(format!("{name}-payload"));
        std::fs::create_dir_all(&payload).unwrap();
        let script = payload.join("init");
        std::fs::write(&script, init).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let iso = dir.join(format!("{name}.iso"));
        let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-live-iso");
        let out = Command::new(tool).args(options).arg(&iso).arg(&payload).output().unwrap();
        if !out.status.success() {
            assert!(!ci, "make-live-iso failed under CI: {}", String::from_utf8_lossy(&out.stderr));
            eprintln!("skipped: make-live-iso failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(iso)
    }

    /// `iso` followed by data up to `mib` MiB, in `dir`: a bigger image, still
    /// the same ISO 9660. Written, not a sparse hole (which would read as
    /// zeroed pages rather than file data), and synced, so that an upload
    /// timed next does not race its writeback; `tag` gives each its own SHA-256.
    pub fn padded(iso: &Path, mib: usize, tag: u8, dir: &Path) -> PathBuf {
        use std::io::Write;
        let out = dir.join(format!("padded-{tag}.iso"));
        std::fs::copy(iso, &out).unwrap();
        let mut f = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(&out).unwrap());
        let mut left = ((mib as u64) << 20).saturating_sub(std::fs::metadata(iso).unwrap().len());
        let mut block = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ tag as u64;
        while left > 0 {
            for w in block.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n]).unwrap();
            left -= n as u64;
        }
        f.into_inner().unwrap().sync_all().unwrap();
        out
    }
}
