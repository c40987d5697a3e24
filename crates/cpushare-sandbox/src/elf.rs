//! The jail's ELF checks on the supervisor's side: the loader's own code
//! (`loader/elf.rs`), run on the whole file before anything runs it, so that a
//! buyer hears "dynamically linked" before paying for CPUs, not from a seller.

#[path = "../loader/elf.rs"]
#[allow(dead_code)] // the loader uses the constants this side does not
mod plan;

pub use plan::{header, plan, Header, Plan, Refusal, Segment, PAGE, PROGRAM_TOP};

/// Loader detail code 11: a segment's file bytes past the end of the file.
const PAST_THE_END: u32 = 11;

/// Whether the jail's loader would take `elf`; if not, why, in the words a
/// jail's report uses.
pub fn check(elf: &[u8]) -> Result<Plan, &'static str> {
    let h = header(elf).map_err(words)?;
    let table = h.phoff.checked_add(plan::PHENT * h.phnum).and_then(|end| elf.get(h.phoff..end)).ok_or(words(Refusal(5, 0, 0)))?;
    let p = plan(&h, table).map_err(words)?;
    for s in &p.segments[..p.count] {
        if s.offset.checked_add(s.filesz).is_none_or(|end| end > elf.len()) {
            return Err(words(Refusal(PAST_THE_END, 0, 0)));
        }
    }
    Ok(p)
}

/// What a refusal's detail code means.
pub fn why(code: u64) -> &'static str {
    match code {
        1 => "not a 64-bit little-endian ELF file",
        2 => "not an x86-64 program",
        3 => "neither a static executable nor a static position-independent one",
        6 => "dynamically linked (link it statically)",
        8 => "a segment lies outside the addresses a program may use",
        9 => "overlapping segments",
        12 => "no loadable segment",
        _ => "malformed program headers",
    }
}

fn words(r: Refusal) -> &'static str {
    why(r.0 as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::examples::MANDELBROT;

    #[test]
    fn an_example_passes_and_its_segments_hold_its_bytes() {
        let p = check(MANDELBROT).unwrap();
        assert!(p.count >= 1);
        for s in &p.segments[..p.count] {
            assert!(s.start <= s.load_at && s.load_at + s.filesz <= s.end && s.offset + s.filesz <= MANDELBROT.len(), "{s:?}");
        }
        assert!(p.segments[..p.count].iter().any(|s| s.prot & 4 != 0), "a code segment: {p:?}");
    }

    #[test]
    fn refusals_say_why() {
        assert_eq!(check(b"#!/bin/sh\n").unwrap_err(), "not a 64-bit little-endian ELF file");
        assert_eq!(check(&MANDELBROT[..64]).unwrap_err(), "malformed program headers");
        let mut e = MANDELBROT.to_vec();
        e[18] = 40; // ARM
        assert_eq!(check(&e).unwrap_err(), "not an x86-64 program");
        // A file that ends inside its own segment.
        let p = check(MANDELBROT).unwrap();
        let last = p.segments[..p.count].iter().map(|s| s.offset + s.filesz).max().unwrap();
        assert_eq!(check(&MANDELBROT[..last - 1]).unwrap_err(), "malformed program headers");
    }
}
