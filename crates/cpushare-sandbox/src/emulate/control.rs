//! The control page: how the jail's stub hands a system call to the
//! supervisor and gets the result, in microseconds.
//!
//! A pipe round trip costs about 15 µs here (two wake-ups), too slow for
//! programs that make many small calls. So both sides share one page and
//! spin on it briefly; only when the other side is slow does one go to sleep
//! on a pipe, saying so in the page first so the other knows to wake it.
//!
//! Layout (all little-endian, shared with `loader/main.rs`):
//!
//! | offset | field |
//! |---|---|
//! | 0 | u32 request sequence (the stub increments it) |
//! | 4 | u32 reply sequence (the supervisor sets it to the request's) |
//! | 8 | u32 the stub sleeps on its wake pipe |
//! | 12 | u32 the supervisor sleeps on its wake pipe |
//! | 16 | u64 system call number |
//! | 24 | u64 × 6 arguments |
//! | 72 | i64 result |
//! | 128 | u64 count, then (guest address, length, memfd offset) × count: the memory layout |
//!
//! The page is the program's to scribble on: everything read from it is
//! treated as hostile (copied once, then checked).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

const REQ_SEQ: usize = 0;
const RESP_SEQ: usize = 4;
const GUEST_SLEEPS: usize = 8;
const SUPER_SLEEPS: usize = 12;
const NR: usize = 16;
const ARGS: usize = 24;
const RET: usize = 72;
pub(crate) const LAYOUT: usize = 128;
pub(crate) const LAYOUT_MAX: usize = 40;

/// How long the supervisor spins for the next request before it sleeps.
const SPIN: Duration = Duration::from_micros(50);

/// One system call of the program's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub nr: u64,
    pub args: [u64; 6],
}

pub(crate) struct Control {
    page: *mut u8,
    /// Read end of the pipe the stub writes to wake the supervisor.
    wake_me: OwnedFd,
    /// Write end of the pipe that wakes the stub.
    wake_guest: OwnedFd,
    seq: u32,
}

// The page is only touched by the supervisor thread that owns this.
unsafe impl Send for Control {}

impl Control {
    /// `page` is the supervisor's mapping of the control memfd (4096 bytes).
    pub(crate) fn new(page: *mut u8, wake_me: OwnedFd, wake_guest: OwnedFd) -> Control {
        Control { page, wake_me, wake_guest, seq: 0 }
    }

    fn at(&self, off: usize) -> &AtomicU32 {
        unsafe { AtomicU32::from_ptr(self.page.add(off) as *mut u32) }
    }

    fn u64_at(&self, off: usize) -> u64 {
        unsafe { std::ptr::read_volatile(self.page.add(off) as *const u64) }
    }

    /// The memory layout the loader wrote: (guest address, length, memfd offset).
    pub(crate) fn layout(&self) -> Vec<(u64, u64, u64)> {
        let count = (self.u64_at(LAYOUT) as usize).min(LAYOUT_MAX);
        (0..count).map(|i| {
            let e = LAYOUT + 8 + i * 24;
            (self.u64_at(e), self.u64_at(e + 8), self.u64_at(e + 16))
        })
        .collect()
    }

    /// Waits for the next request; `None` when the program is gone.
    pub(crate) fn next(&mut self) -> io::Result<Option<Request>> {
        let started = Instant::now();
        loop {
            let seq = self.at(REQ_SEQ).load(Ordering::Acquire);
            if seq != self.seq {
                self.seq = seq;
                let mut args = [0u64; 6];
                for (i, a) in args.iter_mut().enumerate() {
                    *a = self.u64_at(ARGS + 8 * i);
                }
                return Ok(Some(Request { nr: self.u64_at(NR), args }));
            }
            if started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            self.at(SUPER_SLEEPS).store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if self.at(REQ_SEQ).load(Ordering::Acquire) != self.seq {
                self.at(SUPER_SLEEPS).store(0, Ordering::Relaxed);
                continue;
            }
            let mut b = [0u8; 64];
            let n = unsafe { libc::read(self.wake_me.as_raw_fd(), b.as_mut_ptr().cast(), b.len()) };
            self.at(SUPER_SLEEPS).store(0, Ordering::Relaxed);
            match n {
                0 => return Ok(None), // every write end closed: the program ended
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                _ => {}
            }
        }
    }

    /// Answers the request `next` returned.
    pub(crate) fn reply(&mut self, ret: i64) {
        unsafe { std::ptr::write_volatile(self.page.add(RET) as *mut i64, ret) };
        self.at(RESP_SEQ).store(self.seq, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.at(GUEST_SLEEPS).load(Ordering::Relaxed) != 0 {
            self.at(GUEST_SLEEPS).store(0, Ordering::Relaxed);
            let b = 0u8;
            // A full pipe means wake-ups are already pending: nothing lost.
            unsafe { libc::write(self.wake_guest.as_raw_fd(), (&b as *const u8).cast(), 1) };
        }
    }
}
