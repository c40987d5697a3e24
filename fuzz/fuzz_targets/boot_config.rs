//! A buyer's livecd as a seller reads it before booting it: its isolinux,
//! syslinux and GRUB configuration text, and the ISO 9660 image itself.
#![no_main]

use std::io::Write;

use cpushare_sandbox::vm::boot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = boot::syslinux_entry(&text, "/isolinux/isolinux.cfg");
    let _ = boot::grub_entry(&text);
    // As an image: anything but a bootable livecd is refused with a reason.
    let mut f = tempfile::NamedTempFile::new_in("/dev/shm").or_else(|_| tempfile::NamedTempFile::new()).unwrap();
    f.write_all(data).unwrap();
    if let Err(why) = boot::direct_boot(f.path()) {
        assert!(!why.is_empty());
    }
});
