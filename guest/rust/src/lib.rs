//! Write programs for the cpushare jail in Rust.
//!
//! A jailed program runs under seccomp strict mode: it may `read`, `write` and
//! `exit`, and nothing else (any other system call kills it, and the buyer is
//! told which one). Its input is on fd 0, its output goes to fd 1, its log to
//! fd 2. There is no allocator, no files, no clock, no threads: a fragment of
//! work is a pure function from input bytes to output bytes.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//!
//! static mut INPUT: [u8; 4096] = [0; 4096];
//!
//! fn main() -> i32 {
//!     let input = cpushare_guest::read_input(unsafe { &mut *core::ptr::addr_of_mut!(INPUT) });
//!     let Ok(input) = input else { cpushare_guest::log("input too large"); return 2 };
//!     cpushare_guest::write_all(cpushare_guest::OUTPUT, input).map_or(1, |_| 0)
//! }
//!
//! cpushare_guest::entry!(main);
//! ```
//!
//! Build with this directory's `.cargo/config.toml` (static, no startup files,
//! `panic = "abort"`), e.g. `cargo build --release --example mandelbrot`, and
//! give the binary to `cpushare run`. See `guest/README.md`.
#![no_std]

use core::arch::asm;

/// The program's input.
pub const INPUT: i32 = 0;
/// The program's output: what the buyer gets back.
pub const OUTPUT: i32 = 1;
/// The program's log: shown to the buyer when a fragment fails.
pub const LOG: i32 = 2;

/// A failed system call: the negated errno the kernel returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

/// The input did not fit in the buffer given to [`read_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputError {
    TooLarge,
    Read(Errno),
}

#[inline(always)]
unsafe fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
    let r: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => r, in("rdi") a, in("rsi") b, in("rdx") c,
             lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    r
}

/// One `read`: the number of bytes read, 0 at the end of the input.
pub fn read(fd: i32, buf: &mut [u8]) -> Result<usize, Errno> {
    let r = unsafe { syscall3(0, fd as usize, buf.as_mut_ptr() as usize, buf.len()) };
    if r < 0 { Err(Errno(-r as i32)) } else { Ok(r as usize) }
}

/// One `write`: the number of bytes written.
pub fn write(fd: i32, buf: &[u8]) -> Result<usize, Errno> {
    let r = unsafe { syscall3(1, fd as usize, buf.as_ptr() as usize, buf.len()) };
    if r < 0 { Err(Errno(-r as i32)) } else { Ok(r as usize) }
}

/// Ends the program with `status` (0 is success; anything else fails the
/// fragment, and the buyer sees the status and the log).
pub fn exit(status: i32) -> ! {
    loop {
        unsafe { syscall3(60, status as usize, 0, 0) };
    }
}

/// Reads the whole input into `buf` and returns the part filled.
pub fn read_input(buf: &mut [u8]) -> Result<&[u8], InputError> {
    let mut got = 0;
    loop {
        if got == buf.len() {
            let mut extra = [0u8; 1];
            return match read(INPUT, &mut extra) {
                Ok(0) => Ok(&buf[..got]),
                Ok(_) => Err(InputError::TooLarge),
                Err(e) => Err(InputError::Read(e)),
            };
        }
        match read(INPUT, &mut buf[got..]) {
            Ok(0) => return Ok(&buf[..got]),
            Ok(n) => got += n,
            Err(e) => return Err(InputError::Read(e)),
        }
    }
}

/// Writes all of `buf` to `fd`.
pub fn write_all(fd: i32, mut buf: &[u8]) -> Result<(), Errno> {
    while !buf.is_empty() {
        let n = write(fd, buf)?;
        buf = &buf[n..];
    }
    Ok(())
}

/// A line in the log.
pub fn log(line: &str) {
    let _ = write_all(LOG, line.as_bytes());
    let _ = write_all(LOG, b"\n");
}

/// `core::fmt` onto a file descriptor, unbuffered: `write!(Fd(OUTPUT), ...)`.
pub struct Fd(pub i32);

impl core::fmt::Write for Fd {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_all(self.0, s.as_bytes()).map_err(|_| core::fmt::Error)
    }
}

/// Stream mode (`cpushare run --stream`): one jail serves many fragments, which
/// matters when fragments are small (starting a jail costs about half a
/// millisecond).
///
/// ```ignore
/// fn main() -> i32 {
///     static mut BUF: [u8; 65536] = [0; 65536];
///     cpushare_guest::stream::serve(unsafe { &mut *core::ptr::addr_of_mut!(BUF) }, |input, out| {
///         out.write(input);
///         0
///     })
/// }
/// ```
///
/// Inputs arrive on fd 0 as an 8-byte little-endian length and the bytes;
/// output goes to fd 1 as records (1, u32 length, bytes), and the end of a
/// fragment as (2, i32 status). What the program logs while a fragment runs is
/// that fragment's log.
pub mod stream {
    use super::{log, read, write_all, Errno, InputError, INPUT, OUTPUT};

    fn read_exact(mut buf: &mut [u8]) -> Result<(), ()> {
        while !buf.is_empty() {
            match read(INPUT, buf) {
                Ok(0) | Err(_) => return Err(()),
                Ok(n) => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    /// The next fragment's input, read into `buf`; `None` when there is no
    /// more work. A fragment larger than `buf` is skipped and reported as
    /// `InputError::TooLarge` (end it with a failure status).
    pub fn next(buf: &mut [u8]) -> Option<Result<&[u8], InputError>> {
        let mut head = [0u8; 8];
        read_exact(&mut head).ok()?;
        let n = u64::from_le_bytes(head);
        if n > buf.len() as u64 {
            let mut left = n;
            let mut skip = [0u8; 4096];
            while left > 0 {
                let step = left.min(skip.len() as u64) as usize;
                read_exact(&mut skip[..step]).ok()?;
                left -= step as u64;
            }
            return Some(Err(InputError::TooLarge));
        }
        let input = &mut buf[..n as usize];
        read_exact(input).ok()?;
        Some(Ok(input))
    }

    fn record(kind: u8, value: u32) -> Result<(), Errno> {
        let v = value.to_le_bytes();
        write_all(OUTPUT, &[kind, v[0], v[1], v[2], v[3]])
    }

    /// The current fragment's output, written as it comes.
    pub struct Output(());

    impl Output {
        /// Part of the current fragment's output.
        pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), Errno> {
            while !bytes.is_empty() {
                let step = bytes.len().min(1 << 30);
                record(1, step as u32)?;
                write_all(OUTPUT, &bytes[..step])?;
                bytes = &bytes[step..];
            }
            Ok(())
        }
    }

    impl core::fmt::Write for Output {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.write(s.as_bytes()).map_err(|_| core::fmt::Error)
        }
    }

    /// Ends the current fragment: 0 for success, anything else fails it.
    pub fn end(status: i32) {
        let _ = record(2, status as u32);
    }

    /// Serves every fragment with `work` (input, output) -> status; returns 0
    /// when the work is done, for `entry!`'s main to return.
    pub fn serve(buf: &mut [u8], mut work: impl FnMut(&[u8], &mut Output) -> i32) -> i32 {
        while let Some(input) = next(buf) {
            let status = match input {
                Ok(input) => work(input, &mut Output(())),
                Err(_) => {
                    log("the fragment is larger than the program's input buffer");
                    2
                }
            };
            end(status);
        }
        0
    }
}

/// Makes `fn() -> i32` the program: defines the entry point (`_start`), the
/// panic handler (the message goes to the log, the exit status is 101) and the
/// few symbols a `no_std` binary without libc must bring itself.
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        #[unsafe(no_mangle)]
        extern "C" fn __cpushare_main() -> ! {
            let f: fn() -> i32 = $main;
            $crate::exit(f())
        }

        /// The jail enters here with the stack pointer 16-byte aligned; a call
        /// leaves it as every function expects.
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn _start() -> ! {
            core::arch::naked_asm!("and rsp, -16", "call {main}", "ud2", main = sym __cpushare_main)
        }

        #[panic_handler]
        fn __cpushare_panic(info: &core::panic::PanicInfo) -> ! {
            use core::fmt::Write;
            let _ = writeln!($crate::Fd($crate::LOG), "{info}");
            $crate::exit(101)
        }

        /// The prebuilt `core` names an unwinding personality; nothing unwinds.
        #[unsafe(no_mangle)]
        pub extern "C" fn rust_eh_personality() {}

        $crate::__memory_functions!();
    };
}

/// The memory functions the compiler calls on its own (there is no libc).
/// They are defined in the program's own crate so the linker always finds them.
#[doc(hidden)]
#[macro_export]
macro_rules! __memory_functions {
    () => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
            unsafe {
                core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
                                 options(nostack, preserves_flags));
            }
            dst
        }

        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
            if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
                unsafe { memcpy(dst, src, n) }
            } else {
                unsafe {
                    core::arch::asm!("std", "rep movsb", "cld", inout("rdi") dst.add(n - 1) => _,
                                     inout("rsi") src.add(n - 1) => _, inout("rcx") n => _, options(nostack));
                }
                dst
            }
        }

        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
            unsafe {
                core::arch::asm!("rep stosb", inout("rdi") dst => _, in("al") c as u8, inout("rcx") n => _,
                                 options(nostack, preserves_flags));
            }
            dst
        }

        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            let mut i = 0;
            while i < n {
                // Volatile reads keep the compiler from turning this loop into a call to memcmp.
                let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
                if x != y {
                    return x as i32 - y as i32;
                }
                i += 1;
            }
            0
        }

        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
            unsafe { memcmp(a, b, n) }
        }
    };
}
