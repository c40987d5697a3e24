//! Memory for the market's large tables, in pages the kernel may make huge.
//!
//! Why: an exchange's slot, order and lease tables run to a hundred megabytes
//! or more, and every operation reads a few records at random in them. With
//! the usual 4 KiB pages each of those reads also misses the CPU's address
//! translation cache and walks the page tables (in a virtual machine, two sets
//! of them), which measured a fifth of the matching engine's time
//! (BENCHMARKS.md). A table of 2 MiB or more is therefore allocated on a 2 MiB
//! boundary and the kernel is asked (`madvise(MADV_HUGEPAGE)`) to back it with
//! transparent huge pages where it can. Where it cannot (no THP, another OS),
//! nothing changes but the alignment.

use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

/// A huge page on x86-64 and AArch64 Linux with 4 KiB base pages.
const HUGE_PAGE: usize = 2 << 20;

/// The allocator of the market's tables: small blocks as usual, large ones in
/// whole huge pages.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LargePages;

/// The block a large request is given: whole huge pages, on a huge-page boundary.
fn huge(layout: Layout) -> Option<Layout> {
    if layout.size() < HUGE_PAGE {
        return None;
    }
    Layout::from_size_align(layout.size().next_multiple_of(HUGE_PAGE), layout.align().max(HUGE_PAGE)).ok()
}

// SAFETY: every block comes from `Global` and goes back to it with the layout it
// was allocated with (`huge` maps a request's layout to the same block layout on
// both sides).
unsafe impl Allocator for LargePages {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        let Some(block) = huge(layout) else { return Global.allocate(layout) };
        let memory = Global.allocate(block)?;
        advise_huge_pages(memory);
        Ok(memory)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: the caller gives back a block this allocator handed out for `layout`.
        unsafe { Global.deallocate(ptr, huge(layout).unwrap_or(layout)) }
    }
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(memory: NonNull<[u8]>) {
    use nix::sys::mman::{madvise, MmapAdvise};
    // SAFETY: the range is the block just allocated, whole pages on a page boundary;
    // the advice changes how it is backed, never its contents. A kernel without
    // transparent huge pages refuses the advice, which costs nothing.
    let _ = unsafe { madvise(memory.cast(), memory.len(), MmapAdvise::MADV_HUGEPAGE) };
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_: NonNull<[u8]>) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_whole_aligned_huge_pages_and_small_ones_are_as_asked() {
        let small = Layout::from_size_align(4096, 64).unwrap();
        let block = LargePages.allocate(small).unwrap();
        assert_eq!(block.len(), 4096);
        // SAFETY: allocated just above with this layout.
        unsafe { LargePages.deallocate(block.cast(), small) };

        let large = Layout::from_size_align(3 * HUGE_PAGE + 100, 64).unwrap();
        let block = LargePages.allocate(large).unwrap();
        assert_eq!(block.len(), 4 * HUGE_PAGE);
        assert_eq!(block.cast::<u8>().as_ptr() as usize % HUGE_PAGE, 0);
        // The whole block is ours to write.
        // SAFETY: `block` is a live allocation of `block.len()` bytes.
        unsafe { block.cast::<u8>().as_ptr().write_bytes(7, block.len()) };
        // SAFETY: allocated just above with this layout.
        unsafe { LargePages.deallocate(block.cast(), large) };
    }
}
