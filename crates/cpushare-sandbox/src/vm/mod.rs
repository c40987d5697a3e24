//! The VM runner: a buyer's livecd in QEMU, one VM per lease.
//!
//! QEMU runs unprivileged with `-nodefaults`, its own seccomp sandbox on, no
//! network and no host files but the read-only image; the serial console is
//! the VM's only output. The kernel, initrd and command line are read from the
//! image's boot configuration ([`boot`]) and started directly on the `microvm`
//! machine (ACPI on: Debian's kernel finds virtio-mmio devices only through
//! ACPI), with the image as a read-only virtio disk; an image that cannot be
//! booted that way boots from the CD through the BIOS, as any x86 livecd can.
//!
//! KVM is used only where a real Linux guest has been seen to boot under it
//! ([`kvm_boots`]); otherwise software emulation (TCG).

pub mod boot;
mod qemu;

pub use qemu::{boots, kvm_boots, start, Accel, Boot, Vm, VmSpec};
