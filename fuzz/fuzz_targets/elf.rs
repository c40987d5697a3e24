//! ELF loading: a buyer's program as the jail's loader checks and plans it
//! (the same code runs in the loader, `loader/elf.rs`). What passes must be
//! safe to map: whole pages inside the program's addresses, file bytes inside
//! the file and inside their segment, each segment's new pages above all
//! earlier ones, sharing at most one page with them.
#![no_main]

use cpushare_sandbox::elf::{self, PAGE, PROGRAM_TOP};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(plan) = elf::check(data) else { return };
    let mut mapped_end = 0;
    for s in &plan.segments[..plan.count] {
        assert!(s.start % PAGE == 0 && s.end % PAGE == 0 && 0x10000 <= s.start && s.start < s.end && s.end <= PROGRAM_TOP, "{s:?}");
        assert!(s.start <= s.load_at && s.load_at + s.filesz <= s.end, "{s:?}");
        assert!(s.offset + s.filesz <= data.len(), "{s:?}");
        assert!(s.start + PAGE >= mapped_end && s.map_from == s.start.max(mapped_end), "{s:?} after {mapped_end:#x}");
        mapped_end = mapped_end.max(s.end);
    }
});
