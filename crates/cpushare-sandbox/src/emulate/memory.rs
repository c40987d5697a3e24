//! The program's memory, as the supervisor sees it, and the heap calls
//! (`brk`, `mmap`, `munmap`, `mremap`, `madvise`) served from it.
//!
//! Every page of an emulated program (its segments, its stack, its heap arena)
//! is a shared mapping of one memfd sized to the slot's RAM, which the
//! supervisor maps whole. A pointer the program passes is translated through
//! the layout the loader recorded; bulk data (a file read, say) lands in the
//! program's buffer with one copy, never through a pipe. Freed heap memory is
//! given back to the system by punching holes in the memfd (which also makes it
//! read as zeros, as fresh anonymous memory must).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

pub(crate) const PAGE: u64 = 4096;
const EFAULT: i64 = -libc::EFAULT as i64;
const ENOMEM: i64 = -libc::ENOMEM as i64;
const EINVAL: i64 = -libc::EINVAL as i64;

#[derive(Debug, Clone, Copy)]
struct Region {
    guest: u64,
    len: u64,
    offset: u64,
}

pub(crate) struct Memory {
    fd: OwnedFd,
    base: *mut u8,
    size: u64,
    regions: Vec<Region>,
    /// The heap arena: the last piece of the layout.
    heap: Region,
    brk: u64,
    /// Anonymous mappings in the arena, by start: their lengths.
    maps: BTreeMap<u64, u64>,
}

unsafe impl Send for Memory {}

impl Drop for Memory {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

fn round_up(n: u64) -> Option<u64> {
    n.checked_add(PAGE - 1).map(|n| n & !(PAGE - 1))
}

impl Memory {
    /// Maps the memory memfd (of `size` bytes) into the supervisor.
    pub(crate) fn new(fd: OwnedFd, size: u64) -> io::Result<Memory> {
        let base = unsafe { libc::mmap(std::ptr::null_mut(), size as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let empty = Region { guest: 0, len: 0, offset: 0 };
        Ok(Memory { fd, base: base.cast(), size, regions: Vec::new(), heap: empty, brk: 0, maps: BTreeMap::new() })
    }

    /// Takes the layout the loader wrote (checked: every piece inside the memfd).
    pub(crate) fn set_layout(&mut self, layout: &[(u64, u64, u64)]) {
        self.regions = layout
            .iter()
            .filter(|(g, l, o)| o.checked_add(*l).is_some_and(|end| end <= self.size) && g.checked_add(*l).is_some())
            .map(|&(guest, len, offset)| Region { guest, len, offset })
            .collect();
        if let Some(&heap) = self.regions.last() {
            self.heap = heap;
            self.brk = heap.guest;
        }
    }

    /// The supervisor's address of `len` bytes at guest address `addr`, if they
    /// lie within one piece of the program's memory.
    fn host(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let end = addr.checked_add(len)?;
        let r = self.regions.iter().find(|r| addr >= r.guest && end <= r.guest + r.len)?;
        Some(unsafe { self.base.add((r.offset + addr - r.guest) as usize) })
    }

    /// A copy of the program's bytes at `addr`.
    pub(crate) fn read(&self, addr: u64, len: u64) -> Result<Vec<u8>, i64> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let p = self.host(addr, len).ok_or(EFAULT)?;
        Ok(unsafe { std::slice::from_raw_parts(p, len as usize) }.to_vec())
    }

    /// The program's buffer at `addr`, for the supervisor to fill or send
    /// (the program may change it meanwhile: it only hurts itself).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn buffer(&self, addr: u64, len: u64) -> Result<&mut [u8], i64> {
        if len == 0 {
            return Ok(&mut []);
        }
        let p = self.host(addr, len).ok_or(EFAULT)?;
        Ok(unsafe { std::slice::from_raw_parts_mut(p, len as usize) })
    }

    pub(crate) fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), i64> {
        self.buffer(addr, bytes.len() as u64)?.copy_from_slice(bytes);
        Ok(())
    }

    pub(crate) fn write_u64(&self, addr: u64, v: u64) -> Result<(), i64> {
        self.write(addr, &v.to_le_bytes())
    }

    /// A NUL-terminated string at `addr` of at most `max` bytes.
    pub(crate) fn string(&self, addr: u64, max: usize) -> Result<Vec<u8>, i64> {
        let mut out = Vec::new();
        let mut at = addr;
        loop {
            // Up to the end of the page, so a string that ends near a region's end is fine.
            let chunk = PAGE - at % PAGE;
            let bytes = self.buffer(at, chunk)?;
            if let Some(n) = bytes.iter().position(|&b| b == 0) {
                out.extend_from_slice(&bytes[..n]);
                return if out.len() > max { Err(-libc::ENAMETOOLONG as i64) } else { Ok(out) };
            }
            out.extend_from_slice(bytes);
            if out.len() > max {
                return Err(-libc::ENAMETOOLONG as i64);
            }
            at += chunk;
        }
    }

    /// Gives the pages of `[addr, addr + len)` in the arena back (they read as zeros after).
    fn release(&self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let off = self.heap.offset + (addr - self.heap.guest);
        unsafe {
            libc::fallocate(self.fd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off as i64, len as i64);
        }
    }

    fn in_heap(&self, addr: u64, len: u64) -> bool {
        addr >= self.heap.guest && addr.checked_add(len).is_some_and(|e| e <= self.heap.guest + self.heap.len)
    }

    /// The lowest mapping in the arena bounds the break.
    fn brk_limit(&self) -> u64 {
        self.maps.keys().next().copied().unwrap_or(self.heap.guest + self.heap.len)
    }

    pub(crate) fn brk(&mut self, want: u64) -> i64 {
        if want == 0 || want < self.heap.guest || want > self.brk_limit() {
            return self.brk as i64; // unchanged: the program sees it failed
        }
        let (old, new) = (round_up(self.brk).unwrap_or(u64::MAX), round_up(want).unwrap_or(u64::MAX));
        if new < old {
            self.release(new, old - new);
        }
        self.brk = want;
        want as i64
    }

    /// A free range of `len` bytes in the arena, as high as possible.
    fn find(&self, len: u64) -> Option<u64> {
        let mut top = self.heap.guest + self.heap.len;
        for (&start, &l) in self.maps.iter().rev() {
            if top - (start + l) >= len {
                break;
            }
            top = start;
        }
        let floor = round_up(self.brk)?;
        (top >= floor && top - floor >= len).then(|| top - len)
    }

    /// Drops the mappings overlapping `[addr, addr + len)`, keeping the parts outside.
    fn unmap_range(&mut self, addr: u64, len: u64) {
        let end = addr + len;
        let hit: Vec<(u64, u64)> = self.maps.range(..end).filter(|(&s, &l)| s + l > addr).map(|(&s, &l)| (s, l)).collect();
        for (s, l) in hit {
            self.maps.remove(&s);
            if s < addr {
                self.maps.insert(s, addr - s);
            }
            if s + l > end {
                self.maps.insert(end, s + l - end);
            }
        }
    }

    /// Anonymous memory (file mappings are read into it by the caller).
    pub(crate) fn mmap(&mut self, addr: u64, len: u64, flags: u64) -> i64 {
        let Some(len) = round_up(len).filter(|&l| l > 0) else { return EINVAL };
        if flags & libc::MAP_FIXED as u64 != 0 {
            if !addr.is_multiple_of(PAGE) || !self.in_heap(addr, len) || addr < round_up(self.brk).unwrap_or(u64::MAX) {
                return ENOMEM;
            }
            self.unmap_range(addr, len);
            self.release(addr, len);
            self.maps.insert(addr, len);
            return addr as i64;
        }
        match self.find(len) {
            Some(at) => {
                self.maps.insert(at, len);
                at as i64
            }
            None => ENOMEM,
        }
    }

    pub(crate) fn munmap(&mut self, addr: u64, len: u64) -> i64 {
        let Some(len) = round_up(len) else { return EINVAL };
        if !addr.is_multiple_of(PAGE) {
            return EINVAL;
        }
        if self.in_heap(addr, len) {
            self.unmap_range(addr, len);
            self.release(addr, len);
        }
        // Anything else (the program's own segments) stays: there is nothing to give back.
        0
    }

    pub(crate) fn madvise_dontneed(&mut self, addr: u64, len: u64) -> i64 {
        if let Some(len) = round_up(len) {
            if self.in_heap(addr, len) && addr.is_multiple_of(PAGE) {
                self.release(addr, len);
            }
        }
        0
    }

    pub(crate) fn mremap(&mut self, old: u64, old_len: u64, new_len: u64, flags: u64) -> i64 {
        let (Some(old_len), Some(new_len)) = (round_up(old_len), round_up(new_len)) else { return EINVAL };
        if self.maps.get(&old) != Some(&old_len) || new_len == 0 {
            return EINVAL; // only whole mappings of the arena move
        }
        if new_len <= old_len {
            self.maps.insert(old, new_len);
            self.release(old + new_len, old_len - new_len);
            return old as i64;
        }
        // Grow in place if the pages above are free.
        let next = self.maps.range(old + 1..).next().map(|(&s, _)| s).unwrap_or(self.heap.guest + self.heap.len);
        if next - old >= new_len {
            self.maps.insert(old, new_len);
            return old as i64;
        }
        if flags & libc::MREMAP_MAYMOVE as u64 == 0 {
            return ENOMEM;
        }
        let Some(at) = self.find(new_len) else { return ENOMEM };
        self.maps.insert(at, new_len);
        let (from, to) = (self.host(old, old_len).unwrap(), self.host(at, new_len).unwrap());
        unsafe { std::ptr::copy_nonoverlapping(from, to, old_len as usize) };
        self.maps.remove(&old);
        self.release(old, old_len);
        at as i64
    }
}
