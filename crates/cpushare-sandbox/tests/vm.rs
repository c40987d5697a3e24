//! The VM runner with a real livecd (built by `scripts/make-live-iso` from
//! Debian's kernel and busybox) in real QEMU, under software emulation.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cpushare_sandbox::vm::{boot::direct_boot, boots, kvm_boots, start, Accel, Boot, VmSpec};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The test livecd: says hello, lists its disks, mounts its own image read-only.
fn livecd(dir: &Path) -> Option<PathBuf> {
    let init = "#!/bin/sh\necho hello from the payload\nfor d in /sys/block/vd*; do echo \"disk $(basename $d) sectors=$(cat $d/size) ro=$(cat $d/ro)\"; done\nmount -t iso9660 -o ro /dev/vda /mnt && ls /mnt/isolinux && umount /mnt\n";
    cpushare_sandbox::vm::testing::livecd(dir, "live", init)
}

/// The console's lines until the guest powers off (or `limit` passes).
async fn console(vm: &mut cpushare_sandbox::vm::Vm, limit: Duration) -> Vec<String> {
    let mut lines = BufReader::new(&mut vm.console).lines();
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.contains("cpushare-livecd: powering off");
            seen.push(line);
            if done {
                break;
            }
        }
    })
    .await;
    seen
}

#[tokio::test]
async fn a_livecd_boots_directly_and_through_the_bios_under_tcg() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = livecd(tmp.path()) else { return };
    let d = direct_boot(&iso).unwrap();
    assert_eq!(d.cmdline, "console=ttyS0 quiet panic=-1");
    assert!(d.kernel.len() > 1 << 20 && d.initrd.as_ref().is_some_and(|i| i.len() > 100_000));

    for bios in [false, true] {
        let scratch = tmp.path().join(format!("scratch-{bios}"));
        std::fs::File::create(&scratch).unwrap().set_len(64 << 20).unwrap();
        let spec = VmSpec { iso: iso.clone(), ram_mib: 256, accel: Accel::Tcg, work: tmp.path().join(format!("vm-{bios}")), bios, scratch: Some(scratch), net: None };
        let mut vm = start(&spec).await.unwrap();
        assert_eq!(matches!(vm.boot, Boot::Direct { .. }), !bios, "{:?}", vm.boot);
        let lines = console(&mut vm, Duration::from_secs(120)).await;
        let text = lines.join("\n");
        assert!(text.contains("cpushare-livecd: up (kernel 6."), "bios={bios}: {text}");
        assert!(text.contains("hello from the payload"), "bios={bios}: {text}");
        assert!(text.contains("cpushare-livecd: powering off"), "bios={bios}: {text}");
        if !bios {
            // The image, read-only, then the 64 MiB scratch disk, writable; the guest mounts its image.
            let iso_sectors = std::fs::metadata(&iso).unwrap().len() / 512;
            assert!(text.contains(&format!("disk vda sectors={iso_sectors} ro=1")), "{text}");
            assert!(text.contains("disk vdb sectors=131072 ro=0"), "{text}");
            assert!(text.contains("isolinux.cfg"), "the guest mounted its own image: {text}");
        }
    }
}

#[tokio::test]
async fn the_kvm_probe_says_whether_a_real_guest_boots_under_kvm() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(iso) = livecd(tmp.path()) else { return };
    let kernel = tmp.path().join("probe-kernel");
    std::fs::write(&kernel, direct_boot(&iso).unwrap().kernel).unwrap();
    // The probe's own machinery (its one-program initramfs, the line it waits
    // for) works: under software emulation the kernel always boots.
    assert!(boots(&kernel, Accel::Tcg, &tmp.path().join("probe-tcg"), Duration::from_secs(120)).await, "the probe boots under TCG");
    let says = kvm_boots(&kernel, &tmp.path().join("probe"), Duration::from_secs(10)).await;
    // What really happens with KVM: the livecd boots, or it does not.
    let really = if Path::new("/dev/kvm").exists() {
        let spec = VmSpec { iso: iso.clone(), ram_mib: 256, accel: Accel::Kvm, work: tmp.path().join("kvm"), bios: false, scratch: None, net: None };
        let mut vm = start(&spec).await.unwrap();
        console(&mut vm, Duration::from_secs(20)).await.iter().any(|l| l.contains("cpushare-livecd: up"))
    } else {
        false
    };
    assert_eq!(says, really, "the probe must agree with a real boot");
    eprintln!("KVM boots a real guest here: {says} (otherwise sellers offer vm-tcg only)");
}

/// Reads the console until a line contains `what`.
async fn until(lines: &mut tokio::io::Lines<BufReader<&mut tokio::process::ChildStdout>>, what: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let hit = line.contains(what);
            seen.push(line);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {what:?} on the console: {seen:?}");
    seen
}

#[tokio::test]
async fn a_vm_shut_down_gets_its_power_button_and_is_killed_if_it_ignores_it() {
    let tmp = tempfile::tempdir().unwrap();
    use cpushare_sandbox::vm::testing::livecd;
    let Some(listens) = livecd(tmp.path(), "listens", "#!/bin/sh\necho staying up\nsleep 600\n") else { return };
    let deaf = livecd(tmp.path(), "deaf", "#!/bin/sh\nkillall acpid\necho staying up\nsleep 600\n").unwrap();
    let spec = |iso: &PathBuf, work: &str| VmSpec { iso: iso.clone(), ram_mib: 256, accel: Accel::Tcg, work: tmp.path().join(work), bios: false, scratch: None, net: None };

    // A guest that listens for the button shuts down by itself.
    let mut vm = start(&spec(&listens, "clean")).await.unwrap();
    until(&mut BufReader::new(&mut vm.console).lines(), "staying up").await;
    let t = std::time::Instant::now();
    let status = vm.shutdown(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "QEMU exits cleanly when the guest powers off: {status:?}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let mut rest = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut vm.console, &mut rest).await.unwrap();
    assert!(rest.contains("cpushare-livecd: power button: shutting down"), "{rest}");

    // One that does not (its acpid is gone) is killed once the grace is over.
    let mut vm = start(&spec(&deaf, "deaf")).await.unwrap();
    until(&mut BufReader::new(&mut vm.console).lines(), "staying up").await;
    let t = std::time::Instant::now();
    let status = vm.shutdown(Duration::from_secs(2)).await.unwrap();
    let took = t.elapsed();
    assert!(!status.success() && took >= Duration::from_secs(2), "killed, not powered off: {status:?} after {took:?}");
    assert!(took < Duration::from_secs(10), "killed soon after the grace: {took:?}");
}

#[test]
fn an_image_that_is_not_a_bootable_livecd_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.iso");
    std::fs::write(&junk, vec![0x5au8; 1 << 20]).unwrap();
    let why = direct_boot(&junk).unwrap_err();
    assert!(why.contains("not an ISO 9660 image"), "{why}");
    let why = direct_boot(&tmp.path().join("missing.iso")).unwrap_err();
    assert!(why.contains("No such file"), "{why}");
}
