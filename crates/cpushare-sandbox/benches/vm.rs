//! Boot times of the test livecd (`scripts/make-live-iso`) under software
//! emulation: the VM runner's direct boot and BIOS boot of the same image,
//! against plain `qemu-system-x86_64 -kernel -initrd` with the same kernel,
//! initrd and command line, all in the same run. Time is from starting QEMU
//! to the guest's userspace saying it is up. See BENCHMARKS.md.
//!
//! CPUSHARE_BENCH_BOOTS (default 5) boots of each.

use std::process::Stdio;
use std::time::{Duration, Instant};

use cpushare_sandbox::vm::{boot::direct_boot, start, Accel, VmSpec};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

async fn until_up(console: impl AsyncRead + Unpin) -> bool {
    let mut lines = BufReader::new(console).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("cpushare-livecd: up") {
            return true;
        }
    }
    false
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let boots: usize = std::env::var("CPUSHARE_BENCH_BOOTS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = cpushare_sandbox::vm::testing::livecd(tmp.path(), "live", "#!/bin/sh\n") else {
        println!("skipped: scripts/make-live-iso failed (QEMU and the ISO tools are installed by scripts/test)");
        return;
    };
    let d = direct_boot(&iso).unwrap();
    let (kernel, initrd) = (tmp.path().join("k"), tmp.path().join("i"));
    std::fs::write(&kernel, &d.kernel).unwrap();
    std::fs::write(&initrd, d.initrd.as_ref().unwrap()).unwrap();

    let (mut direct, mut bios, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..boots {
        for bios_path in [false, true] {
            let spec = VmSpec { iso: iso.clone(), ram_mib: 256, accel: Accel::Tcg, work: tmp.path().join(format!("w{round}{bios_path}")), bios: bios_path, scratch: None, net: None };
            let t = Instant::now();
            let mut vm = start(&spec).await.unwrap();
            assert!(until_up(&mut vm.console).await);
            if bios_path {
                bios.push(t.elapsed())
            } else {
                direct.push(t.elapsed())
            }
        }
        // The peer: QEMU told the kernel, initrd and command line directly.
        let t = Instant::now();
        let mut child = tokio::process::Command::new("qemu-system-x86_64")
            .args([
                // The machine the runner boots TCG guests on (see `direct_machine`).
                "-M",
                "pc",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-m",
                "256M",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &d.cmdline])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        assert!(until_up(child.stdout.take().unwrap()).await);
        plain.push(t.elapsed());
    }
    let (direct, bios, plain) = (median(direct), median(bios), median(plain));
    println!("boot to userspace, TCG, median of {boots}: runner direct {:.2} s, runner BIOS {:.2} s, plain qemu -kernel {:.2} s (direct/plain {:.2}, BIOS/direct {:.2})",
        direct.as_secs_f64(), bios.as_secs_f64(), plain.as_secs_f64(), direct.as_secs_f64() / plain.as_secs_f64(), bios.as_secs_f64() / direct.as_secs_f64());
}
