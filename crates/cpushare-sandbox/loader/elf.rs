//! The ELF checks and the segment plan of a buyer's program. Pure: no system
//! calls, no allocation, core only, so that one copy serves both sides: the
//! jail's loader (`main.rs`) maps what the plan says, and the supervisor
//! (`src/elf.rs`) refuses a bad program before anything runs it; there it is
//! also fuzzed (`fuzz/fuzz_targets/elf.rs`). Every number comes from a
//! hostile file, so every sum is checked.

pub const PAGE: usize = 4096;
/// Programs live below this (and above the first 64 KiB).
pub const PROGRAM_TOP: usize = 0x7d00_0000_0000;
const PROGRAM_BOTTOM: usize = 0x10000;
/// Where a position-independent static program is placed.
pub const PIE_BASE: usize = 0x1000_0000;
pub const MAX_PHDRS: usize = 32;
pub const PHENT: usize = 56;

const PT_LOAD: usize = 1;
const PT_INTERP: usize = 3;
const PT_PHDR: usize = 6;

/// Why a program is refused: the loader's detail code (the supervisor words
/// it: `elf::why` in src/elf.rs) and two numbers for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal(pub u32, pub u64, pub u64);

/// What the ELF header says.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Added to every address: 0 for a static executable, [`PIE_BASE`] for a static-pie.
    pub bias: usize,
    pub entry: usize,
    pub phoff: usize,
    pub phnum: usize,
}

/// One loadable segment, as the loader maps it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Segment {
    /// Its pages (biased, page-aligned).
    pub start: usize,
    pub end: usize,
    /// Where its new pages begin: `start`, or the end of the previous
    /// segment's pages when the two share a page (the shared one is mapped already).
    pub map_from: usize,
    /// Where its file bytes go (biased), from which offset of the file, how many.
    pub load_at: usize,
    pub offset: usize,
    pub filesz: usize,
    /// PROT_READ / WRITE / EXEC bits.
    pub prot: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub segments: [Segment; MAX_PHDRS],
    pub count: usize,
    /// Where the program headers are in memory (for AT_PHDR), or 0.
    pub phdr_addr: usize,
}

fn u16_at(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}
fn u32_at(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}
fn u64_at(b: &[u8], at: usize) -> usize {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x) as usize
}

/// Checks the first 64 bytes of the file: a 64-bit little-endian x86-64
/// static executable or static-pie with a sane program header table.
pub fn header(eh: &[u8]) -> Result<Header, Refusal> {
    if eh.len() < 64 || eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Err(Refusal(1, 0, 0)); // not a 64-bit little-endian ELF
    }
    if u16_at(eh, 18) != 62 {
        return Err(Refusal(2, 0, 0)); // not x86-64
    }
    let bias = match u16_at(eh, 16) {
        2 => 0,        // ET_EXEC
        3 => PIE_BASE, // ET_DYN: a static-pie, which relocates itself
        _ => return Err(Refusal(3, 0, 0)),
    };
    let (entry, phoff, phentsize, phnum) = (u64_at(eh, 24), u64_at(eh, 32), u16_at(eh, 54), u16_at(eh, 56));
    if phentsize != PHENT || phnum == 0 || phnum > MAX_PHDRS {
        return Err(Refusal(4, 0, 0));
    }
    Ok(Header { bias, entry, phoff, phnum })
}

/// Plans the segments from the program header table `ph` (`phnum` entries):
/// each inside the program's addresses, in ascending order, overlapping the
/// previous one at most in the page they share.
pub fn plan(h: &Header, ph: &[u8]) -> Result<Plan, Refusal> {
    if ph.len() < PHENT * h.phnum {
        return Err(Refusal(5, 0, 0));
    }
    let mut plan = Plan { segments: [Segment::default(); MAX_PHDRS], count: 0, phdr_addr: 0 };
    let mut mapped_end = 0; // end of the highest page mapped so far
    for i in 0..h.phnum {
        let e = &ph[i * PHENT..(i + 1) * PHENT];
        match u32_at(e, 0) {
            PT_INTERP => return Err(Refusal(6, 0, 0)), // dynamically linked: not allowed
            PT_PHDR => {
                plan.phdr_addr = h.bias.wrapping_add(u64_at(e, 16));
                continue;
            }
            PT_LOAD => {}
            _ => continue,
        }
        let (flags, offset, vaddr, filesz, memsz) = (u32_at(e, 4), u64_at(e, 8), u64_at(e, 16), u64_at(e, 32), u64_at(e, 40));
        if filesz > memsz || vaddr.checked_add(memsz).is_none() {
            return Err(Refusal(7, 0, 0));
        }
        // [bias + vaddr, bias + vaddr + memsz), rounded out to pages; any overflow is outside.
        let span = h.bias.checked_add(vaddr).and_then(|load_at| Some((load_at, load_at.checked_add(memsz)?.checked_add(PAGE - 1)?)));
        let Some((load_at, end)) = span else {
            return Err(Refusal(8, 0, 0));
        };
        let (start, end) = (load_at & !(PAGE - 1), end & !(PAGE - 1));
        if start < PROGRAM_BOTTOM || end > PROGRAM_TOP || end <= start {
            return Err(Refusal(8, start as u64, end as u64));
        }
        if plan.phdr_addr == 0 && offset <= h.phoff && h.phoff < offset.saturating_add(filesz) {
            plan.phdr_addr = load_at + (h.phoff - offset);
        }
        // Segments may share a page with the previous one, no more.
        if start < mapped_end && start + PAGE < mapped_end {
            return Err(Refusal(9, start as u64, mapped_end as u64));
        }
        let map_from = start.max(mapped_end);
        mapped_end = mapped_end.max(end);
        let prot = (if flags & 4 != 0 { 1 } else { 0 }) | (if flags & 2 != 0 { 2 } else { 0 }) | (if flags & 1 != 0 { 4 } else { 0 });
        plan.segments[plan.count] = Segment { start, end, map_from, load_at, offset, filesz, prot };
        plan.count += 1;
    }
    if plan.count == 0 {
        return Err(Refusal(12, 0, 0));
    }
    Ok(plan)
}
