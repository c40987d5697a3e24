//! cpushare-loader: the first and last code the seller runs inside a jail.
//!
//! The supervisor spawns this small static binary (never a fork of the large
//! daemon) with exactly these descriptors:
//!
//!   0  the program's input        1  its output        2  its log
//!   3  the program (a static x86-64 ELF, in a memfd)
//!   4  the status page (a memfd page the supervisor reads after the exit)
//!
//! and `argv = [loader, ram_bytes, cpu_seconds, uid, gid, flags, envc, env..., program argv...]`
//! (flags: 1 = debuggable, 2 = emulated, 4 = emulated through the seccomp-filter
//! fallback even where it is not needed, 8 = as if the CPU had no FSGSBASE;
//! the last two let tests prove the fallback on any machine).
//! It maps the program's PT_LOAD segments itself (the program is never
//! `execve`d), builds its stack, closes every other descriptor, applies the
//! limits (address space, CPU time, no core dumps, nice 19, no new privileges,
//! `rdtsc` faulting, an unprivileged uid when started as root), then enters
//! `SECCOMP_MODE_STRICT` and jumps to the program's entry point. From then on the
//! kernel allows only read, write, exit and sigreturn.
//!
//! To say precisely why hostile code died, the loader also turns on Syscall
//! User Dispatch for everything outside its own image: each system call the
//! program makes arrives here as SIGSYS first. Read, write and exit are made on
//! its behalf; anything else is written to the status page ("forbidden system
//! call 57") and ends the program. Strict mode stays the only security
//! boundary: code that switches dispatch off can still only read, write and
//! exit, and anything else is killed by the kernel (then reported without the
//! number).
//!
//! In emulated mode (for unmodified static binaries) the supervisor also passes
//!
//!   5  the control page (a shared memfd page: requests and replies)
//!   6  the write end of a pipe that wakes the supervisor
//!   7  the read end of a pipe that wakes this process
//!   8  the memory memfd, sized to the slot's RAM
//!
//! and every page of the program (segments, stack, heap arena) is a shared
//! mapping of the memory memfd, so the supervisor sees all of it. Every system
//! call but exit and `arch_prctl(ARCH_SET_FS)` (done here with `wrfsbase`) is
//! forwarded through the control page; see `src/emulate/control.rs` for the
//! protocol. Strict mode still holds: this stub only reads and writes.
//!
//! Where Syscall User Dispatch is missing (kernels before 5.11), or the CPU
//! cannot set the thread pointer itself (no FSGSBASE), emulated mode uses the
//! fallback instead of strict mode: a seccomp filter that lets only this
//! loader's code read, write, exit, return from signals and set the thread
//! pointer (`arch_prctl(ARCH_SET_FS)` and nothing else), and turns every
//! system call made anywhere else into the same SIGSYS. The kernel surface is
//! strict mode's plus that one call.
//!
//! Built by the sandbox crate's build script with rustc alone: no_std, no libc,
//! linked at a fixed high address (0x7e00_0000_0000) so that it never collides
//! with a program's segments.

#![no_std]
#![no_main]

use core::arch::{asm, naked_asm};
use core::ptr;

// ---- system calls ----

const SYS_READ: usize = 0;
const SYS_WRITE: usize = 1;
const SYS_MMAP: usize = 9;
const SYS_MPROTECT: usize = 10;
const SYS_RT_SIGACTION: usize = 13;
const SYS_RT_SIGRETURN: usize = 15;
const SYS_PREAD64: usize = 17;
const SYS_LSEEK: usize = 8;
const SYS_ARCH_PRCTL: usize = 158;
const SYS_DUP3: usize = 292;
const SYS_EXIT: usize = 60;
const SYS_GETUID: usize = 102;
const SYS_SETGROUPS: usize = 116;
const SYS_SETRESUID: usize = 117;
const SYS_SETRESGID: usize = 119;
const SYS_SIGALTSTACK: usize = 131;
const SYS_SETPRIORITY: usize = 141;
const SYS_PRCTL: usize = 157;
const SYS_SETRLIMIT: usize = 160;
const SYS_EXIT_GROUP: usize = 231;
const SYS_GETRANDOM: usize = 318;
const SYS_CLOSE_RANGE: usize = 436;

#[inline(always)]
unsafe fn syscall6(n: usize, a: usize, b: usize, c: usize, d: usize, e: usize, f: usize) -> isize {
    let ret: isize;
    unsafe {
        asm!("syscall", inlateout("rax") n as isize => ret, in("rdi") a, in("rsi") b, in("rdx") c,
             in("r10") d, in("r8") e, in("r9") f, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

#[inline(always)]
unsafe fn syscall3(n: usize, a: usize, b: usize, c: usize) -> isize {
    unsafe { syscall6(n, a, b, c, 0, 0, 0) }
}

fn exit(code: usize) -> ! {
    unsafe { asm!("syscall", in("rax") SYS_EXIT, in("rdi") code, options(noreturn, nostack)) }
}

// ---- the status page the supervisor reads ----

const STATUS_MAGIC: u32 = 0x4a55_5043; // "CPUJ"
pub const FORBIDDEN_SYSCALL: u32 = 1;
pub const RDTSC: u32 = 2;
pub const SEGFAULT: u32 = 3;
pub const CPU_LIMIT: u32 = 4;
pub const ADDRESS_SPACE: u32 = 5;
pub const BAD_PROGRAM: u32 = 6;
pub const STACK_OVERFLOW: u32 = 7;
pub const BUS_ERROR: u32 = 8;
pub const ILLEGAL_INSTRUCTION: u32 = 9;
pub const ARITHMETIC: u32 = 10;
pub const LOADER_FAILED: u32 = 11;

#[repr(C)]
struct Status {
    magic: u32,
    reason: u32,
    detail: u64,
    rip: u64,
    addr: u64,
}

static mut STATUS: *mut Status = ptr::null_mut();

/// Records why the program ends, and ends it.
fn report(reason: u32, detail: u64, rip: u64, addr: u64) -> ! {
    unsafe {
        let s = STATUS;
        if !s.is_null() {
            ptr::write_volatile(&mut (*s).reason, reason);
            ptr::write_volatile(&mut (*s).detail, detail);
            ptr::write_volatile(&mut (*s).rip, rip);
            ptr::write_volatile(&mut (*s).addr, addr);
            ptr::write_volatile(&mut (*s).magic, STATUS_MAGIC);
        }
    }
    exit(125)
}

// ---- memory functions the compiler may call (there is no libc) ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe { asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack)) };
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        unsafe { memcpy(dst, src, n) }
    } else {
        unsafe {
            asm!("std", "rep movsb", "cld", inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 inout("rcx") n => _, options(nostack));
        }
        dst
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    unsafe { asm!("rep stosb", inout("rdi") dst => _, in("al") c as u8, inout("rcx") n => _, options(nostack)) };
    dst
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = unsafe { (ptr::read_volatile(a.add(i)), ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    while unsafe { ptr::read_volatile(s.add(n)) } != 0 {
        n += 1;
    }
    n
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    report(LOADER_FAILED, 0, 0, 0)
}

/// The prebuilt `core` refers to an unwinding personality; nothing here unwinds.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

// ---- entry ----

#[unsafe(naked)]
#[unsafe(no_mangle)]
pub unsafe extern "C" fn _start() -> ! {
    naked_asm!("mov rdi, rsp", "and rsp, -16", "call {main}", "ud2", main = sym main)
}

mod elf;
use elf::PAGE;

/// The loader's own image; system calls from here pass dispatch.
const LOADER_BASE: usize = 0x7e00_0000_0000;
const LOADER_SPAN: usize = 0x1000_0000;

/// Executable ranges of the program, for telling `rdtsc` from other faults.
static mut EXEC: [(usize, usize); 16] = [(0, 0); 16];
static mut EXEC_COUNT: usize = 0;
static mut GUARD: (usize, usize) = (0, 0);
static mut VDSO: usize = 0;
/// Syscall User Dispatch selector: 1 = block (dispatch to SIGSYS).
static mut SELECTOR: u8 = 1;
/// Emulated mode behind the seccomp filter rather than dispatch and strict mode.
static mut FILTERED: bool = false;
static mut ALT_STACK: [u8; 65536] = [0; 65536];
/// Emulated mode: the control page, and whether `wrfsbase` may be used.
static mut CONTROL: *mut u8 = ptr::null_mut();
static mut FSGSBASE: bool = false;
static mut HWCAP: usize = 0;
static mut HWCAP2: usize = 0;

// ---- emulated mode: the control page (layout shared with src/emulate/control.rs) ----
const C_REQ_SEQ: usize = 0;
const C_RESP_SEQ: usize = 4;
const C_GUEST_SLEEPS: usize = 8;
const C_SUPER_SLEEPS: usize = 12;
const C_NR: usize = 16;
const C_ARGS: usize = 24;
const C_RET: usize = 72;
const C_LAYOUT: usize = 128;
const LAYOUT_MAX: usize = 40;
/// Where the heap arena (brk and anonymous mmap) starts in an emulated program.
const ARENA_BASE: usize = 0x1000_0000_0000;
/// Pauses to spin for a reply before sleeping on the wake pipe (tens of microseconds).
const SPIN: usize = 4000;
const WAKE_SUPER: usize = 3;
const WAKE_GUEST: usize = 4;

unsafe fn cstr_len(p: *const u8) -> usize {
    unsafe { strlen(p) }
}

unsafe fn parse(p: *const u8) -> Option<usize> {
    let len = unsafe { cstr_len(p) };
    if len == 0 || len > 20 {
        return None;
    }
    let mut v: usize = 0;
    for i in 0..len {
        let c = unsafe { *p.add(i) };
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as usize)?;
    }
    Some(v)
}

fn pread_exact(fd: usize, buf: *mut u8, len: usize, offset: usize) -> bool {
    let mut done = 0;
    while done < len {
        let n = unsafe { syscall6(SYS_PREAD64, fd, buf as usize + done, len - done, offset + done, 0, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

fn set_limit(resource: usize, soft: usize, hard: usize) {
    let lim = [soft, hard];
    if unsafe { syscall3(SYS_SETRLIMIT, resource, lim.as_ptr() as usize, 0) } != 0 {
        report(LOADER_FAILED, resource as u64, 0, 0);
    }
}

fn prctl(option: usize, a: usize, b: usize, c: usize) -> isize {
    unsafe { syscall6(SYS_PRCTL, option, a, b, c, 0, 0) }
}

extern "C" fn main(sp: *const usize) -> ! {
    unsafe {
        let argc = *sp;
        let argv = sp.add(1) as *const *const u8;
        // Our own auxiliary vector: find the vDSO (to read its bytes when it faults).
        let mut p = argv.add(argc + 1) as *const usize;
        while *p != 0 {
            p = p.add(1);
        }
        p = p.add(1);
        while *p != 0 {
            match *p {
                33 => VDSO = *p.add(1),
                16 => HWCAP = *p.add(1),
                26 => HWCAP2 = *p.add(1),
                _ => {}
            }
            p = p.add(2);
        }
        if argc < 8 {
            exit(126);
        }
        let (Some(ram), Some(cpu), Some(uid), Some(gid), Some(flags), Some(envc)) = (
            parse(*argv.add(1)),
            parse(*argv.add(2)),
            parse(*argv.add(3)),
            parse(*argv.add(4)),
            parse(*argv.add(5)),
            parse(*argv.add(6)),
        ) else {
            exit(126)
        };
        if 7 + envc > argc {
            exit(126);
        }
        let debuggable = flags & 1 != 0;
        let emulated = flags & 2 != 0;

        // The status page first, so every later failure can be reported.
        let page = syscall6(SYS_MMAP, 0, PAGE, 3, 1, 4, 0); // PROT_READ|WRITE, MAP_SHARED, fd 4
        if page < 0 {
            exit(126);
        }
        STATUS = page as *mut Status;
        if emulated {
            let page = syscall6(SYS_MMAP, 0, PAGE, 3, 1, 5, 0);
            if page < 0 {
                report(LOADER_FAILED, 30, 0, 0);
            }
            CONTROL = page as *mut u8;
            FSGSBASE = HWCAP2 & 2 != 0 && flags & 8 == 0;
            FILTERED = flags & 4 != 0 || !FSGSBASE;
        }
        let env = core::slice::from_raw_parts(argv.add(7), envc);
        let args = core::slice::from_raw_parts(argv.add(7 + envc), argc - 7 - envc);
        load(env, args, ram, cpu, uid, gid, debuggable)
    }
}

/// Emulated mode: maps `len` bytes at `addr` from the memory memfd, recording
/// the piece in the control page's layout table for the supervisor.
unsafe fn map_memory(addr: usize, len: usize, fixed: bool, next: &mut usize, size: usize, need: usize, ram: usize) -> usize {
    if *next + len > size {
        report(ADDRESS_SPACE, (need + len) as u64, ram as u64, 0);
    }
    let flags = if fixed { 0x01 | 0x100000 } else { 0x01 }; // MAP_SHARED (| MAP_FIXED_NOREPLACE)
    let r = unsafe { syscall6(SYS_MMAP, addr, len, 3, flags, 8, *next) };
    if r < 0 {
        report(BAD_PROGRAM, 10, addr as u64, (-r) as u64);
    }
    unsafe {
        let c = CONTROL;
        let count = ptr::read_volatile(c.add(C_LAYOUT) as *const usize);
        if count >= LAYOUT_MAX {
            report(BAD_PROGRAM, 4, 0, 0);
        }
        let e = c.add(C_LAYOUT + 8 + count * 24) as *mut usize;
        ptr::write_volatile(e, r as usize);
        ptr::write_volatile(e.add(1), len);
        ptr::write_volatile(e.add(2), *next);
        ptr::write_volatile(c.add(C_LAYOUT) as *mut usize, count + 1);
    }
    *next += len;
    r as usize
}

unsafe fn load(env: &[*const u8], args: &[*const u8], ram: usize, cpu: usize, uid: usize, gid: usize, debuggable: bool) -> ! {
    let emulated = unsafe { !CONTROL.is_null() };
    // Emulated mode: the memory memfd's size, and how much of it is handed out.
    let mem_size = if emulated { unsafe { syscall3(SYS_LSEEK, 8, 0, 2) } } else { 0 };
    if mem_size < 0 {
        report(LOADER_FAILED, 31, 0, 0);
    }
    let mem_size = mem_size as usize;
    let mut mem_next = 0usize;
    // ---- the program's headers (checked and planned by elf.rs) ----
    let mut eh = [0u8; 64];
    if !pread_exact(3, eh.as_mut_ptr(), 64, 0) {
        report(BAD_PROGRAM, 1, 0, 0);
    }
    let header = match elf::header(&eh) {
        Ok(h) => h,
        Err(elf::Refusal(why, a, b)) => report(BAD_PROGRAM, why as u64, a, b),
    };
    let mut ph = [0u8; elf::PHENT * elf::MAX_PHDRS];
    if !pread_exact(3, ph.as_mut_ptr(), elf::PHENT * header.phnum, header.phoff) {
        report(BAD_PROGRAM, 5, 0, 0);
    }
    let plan = match elf::plan(&header, &ph) {
        Ok(p) => p,
        Err(elf::Refusal(why, a, b)) => report(BAD_PROGRAM, why as u64, a, b),
    };
    let (bias, entry, phnum, phdr_addr) = (header.bias, header.entry, header.phnum, plan.phdr_addr);

    // ---- limits, before any of the program's memory exists ----
    // RLIMIT_AS: the slot's RAM (in emulated mode the memory memfd holds the
    // program's memory, sized to the RAM; the limit then covers only it and the loader).
    let address_space = if emulated { ram + (64 << 20) } else { ram };
    set_limit(9, address_space, address_space);
    set_limit(0, cpu, cpu + 1); // RLIMIT_CPU: SIGXCPU, then SIGKILL
    set_limit(4, 0, 0); // RLIMIT_CORE: no core dumps
    set_limit(1, 0, 0); // RLIMIT_FSIZE

    // ---- the program's segments ----
    let mut prev_prot = 0;
    let mut need = 0usize;
    for seg in &plan.segments[..plan.count] {
        let elf::Segment { start, end, map_from, load_at, offset, filesz, prot } = *seg;
        if end > map_from && emulated {
            need += end - map_from;
            map_memory(map_from, end - map_from, true, &mut mem_next, mem_size, need, ram);
        } else if end > map_from {
            need += end - map_from;
            let r = syscall6(SYS_MMAP, map_from, end - map_from, 3, 0x22 | 0x100000, usize::MAX, 0); // PRIVATE|ANON|FIXED_NOREPLACE
            if r == -12 {
                report(ADDRESS_SPACE, need as u64, ram as u64, 0);
            } else if r < 0 {
                report(BAD_PROGRAM, 10, map_from as u64, (-r) as u64);
            }
        }
        if filesz > 0 && !pread_exact(3, load_at as *mut u8, filesz, offset) {
            report(BAD_PROGRAM, 11, 0, 0);
        }
        // A page shared with the previous segment keeps both segments' permissions.
        let shared = start < map_from;
        if shared {
            syscall3(SYS_MPROTECT, start, PAGE, prot | prev_prot);
        }
        if end > map_from {
            syscall3(SYS_MPROTECT, map_from, end - map_from, prot);
        }
        prev_prot = prot;
        if prot & 4 != 0 && EXEC_COUNT < 16 {
            EXEC[EXEC_COUNT] = (start, end);
            EXEC_COUNT += 1;
        }
    }

    // ---- the stack: an eighth of the slot's RAM, 64 KiB to 8 MiB, over a guard page ----
    let size = (ram / 8).clamp(64 << 10, 8 << 20) & !(PAGE - 1);
    let base = if emulated {
        need += size + PAGE;
        map_memory(0, size + PAGE, false, &mut mem_next, mem_size, need, ram) as isize
    } else {
        syscall6(SYS_MMAP, 0, size + PAGE, 3, 0x22, usize::MAX, 0)
    };
    if base == -12 {
        report(ADDRESS_SPACE, (need + size) as u64, ram as u64, 0);
    } else if base < 0 {
        report(LOADER_FAILED, 13, 0, 0);
    }
    let base = base as usize;
    syscall3(SYS_MPROTECT, base, PAGE, 0);
    GUARD = (base, base + PAGE);
    let top = base + PAGE + size;

    // Emulated mode: the rest of the memory memfd is the heap arena (the last
    // piece of the layout), for brk and anonymous mmap.
    if emulated && mem_size > mem_next {
        map_memory(ARENA_BASE, (mem_size - mem_next) & !(PAGE - 1), true, &mut mem_next, mem_size, need, ram);
    }

    // Strings at the top: the program's argv, its environment and 16 random bytes.
    let mut cursor = top;
    let pargc = args.len();
    // As many as the supervisor allows (`jail::MAX_STRINGS`).
    let mut pointers = [0usize; 256];
    let mut env_pointers = [0usize; 256];
    if pargc > pointers.len() || env.len() > env_pointers.len() {
        report(LOADER_FAILED, 14, 0, 0);
    }
    for (strings, out) in [(args, &mut pointers), (env, &mut env_pointers)] {
        for i in (0..strings.len()).rev() {
            let s = strings[i];
            let len = cstr_len(s) + 1;
            if len > size / 4 || cursor - len < base + PAGE + size / 2 {
                report(LOADER_FAILED, 15, 0, 0);
            }
            cursor -= len;
            memcpy(cursor as *mut u8, s, len);
            out[i] = cursor;
        }
    }
    cursor -= 16;
    let random = cursor;
    if syscall3(SYS_GETRANDOM, random, 16, 0) != 16 {
        report(LOADER_FAILED, 16, 0, 0);
    }
    // argc, argv..., NULL, envp NULL, auxv pairs; rsp 16-aligned at argc.
    let auxv: [(usize, usize); 16] = [
        (3, phdr_addr),        // AT_PHDR
        (4, 56),               // AT_PHENT
        (5, phnum),            // AT_PHNUM
        (6, PAGE),             // AT_PAGESZ
        (9, bias + entry),     // AT_ENTRY
        (23, 0),               // AT_SECURE
        (25, random),          // AT_RANDOM
        (7, 0),                // AT_BASE
        (16, HWCAP),           // AT_HWCAP
        (26, HWCAP2),          // AT_HWCAP2
        (17, 100),             // AT_CLKTCK
        (11, 1000),            // AT_UID
        (12, 1000),            // AT_EUID
        (13, 1000),            // AT_GID
        (14, 1000),            // AT_EGID
        (0, 0),                // AT_NULL
    ];
    let words = 1 + pargc + 1 + env.len() + 1 + auxv.len() * 2;
    let mut sp = (cursor - words * 8) & !15;
    let stack = sp as *mut usize;
    let mut w = 0;
    *stack.add(w) = pargc;
    w += 1;
    for p in pointers.iter().take(pargc) {
        *stack.add(w) = *p;
        w += 1;
    }
    *stack.add(w) = 0; // end of argv
    w += 1;
    for p in env_pointers.iter().take(env.len()) {
        *stack.add(w) = *p;
        w += 1;
    }
    *stack.add(w) = 0; // end of the environment
    w += 1;
    for (k, v) in auxv {
        *stack.add(w) = k;
        *stack.add(w + 1) = v;
        w += 2;
    }
    sp = stack as usize;

    // ---- close everything but 0, 1, 2 (and in emulated mode the wake pipes, as 3 and 4) ----
    let keep = if emulated {
        if syscall3(SYS_DUP3, 6, WAKE_SUPER, 0) < 0 || syscall3(SYS_DUP3, 7, WAKE_GUEST, 0) < 0 {
            report(LOADER_FAILED, 32, 0, 0);
        }
        5
    } else {
        3
    };
    if syscall3(SYS_CLOSE_RANGE, keep, u32::MAX as usize, 0) != 0 {
        report(LOADER_FAILED, 17, 0, 0);
    }

    // ---- who the program runs as ----
    if syscall3(SYS_GETUID, 0, 0, 0) == 0 && uid != 0 {
        if syscall3(SYS_SETGROUPS, 0, 0, 0) != 0
            || syscall3(SYS_SETRESGID, gid, gid, gid) != 0
            || syscall3(SYS_SETRESUID, uid, uid, uid) != 0
            || syscall3(SYS_GETUID, 0, 0, 0) != uid as isize
        {
            report(LOADER_FAILED, 18, 0, 0);
        }
    }
    syscall3(SYS_SETPRIORITY, 0, 0, 19); // nice 19
    if prctl(38, 1, 0, 0) != 0 {
        report(LOADER_FAILED, 19, 0, 0); // PR_SET_NO_NEW_PRIVS
    }
    if !debuggable {
        prctl(4, 0, 0, 0); // PR_SET_DUMPABLE 0: no one else may ptrace or read its memory
    }
    if prctl(26, 2, 0, 0) != 0 {
        report(LOADER_FAILED, 20, 0, 0); // PR_SET_TSC: rdtsc faults
    }

    // ---- signal handlers on their own stack, then dispatch, then strict mode ----
    let ss = [ptr::addr_of_mut!(ALT_STACK) as usize, 0, 65536];
    if syscall3(SYS_SIGALTSTACK, ss.as_ptr() as usize, 0, 0) != 0 {
        report(LOADER_FAILED, 21, 0, 0);
    }
    for sig in [31, 11, 7, 4, 8, 24] {
        // SIGSYS, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGXCPU
        let act = [handler as *const () as usize, 0x04 | 0x0800_0000 | 0x0400_0000, restorer as *const () as usize, usize::MAX];
        if syscall6(SYS_RT_SIGACTION, sig, act.as_ptr() as usize, 0, 8, 0, 0) != 0 {
            report(LOADER_FAILED, 22, 0, 0);
        }
    }
    // PR_SET_SYSCALL_USER_DISPATCH, on, for everything outside the loader's image. Without it
    // (kernels before 5.11) strict mode still holds; reports of forbidden calls lose the number,
    // and emulated programs need the filter.
    let dispatch = syscall6(SYS_PRCTL, 59, 1, LOADER_BASE, LOADER_SPAN, ptr::addr_of_mut!(SELECTOR) as usize, 0) == 0;
    if !CONTROL.is_null() && (FILTERED || !dispatch) {
        FILTERED = true;
        if prctl(22, 2, ptr::addr_of!(FILTER_PROG) as usize, 0) != 0 {
            report(LOADER_FAILED, 24, 0, 0); // PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        }
    } else if prctl(22, 1, 0, 0) != 0 {
        report(LOADER_FAILED, 23, 0, 0); // PR_SET_SECCOMP, SECCOMP_MODE_STRICT
    }

    // ---- jump: entry in r11, stack in r12, everything else zero ----
    asm!(
        "mov rsp, r12",
        "xor eax, eax", "xor ebx, ebx", "xor ecx, ecx", "xor edx, edx", "xor esi, esi", "xor edi, edi",
        "xor ebp, ebp", "xor r8d, r8d", "xor r9d, r9d", "xor r10d, r10d", "xor r12d, r12d", "xor r13d, r13d",
        "xor r14d, r14d", "xor r15d, r15d",
        "jmp r11",
        in("r11") bias + entry, in("r12") sp, options(noreturn)
    )
}

// ---- the fallback filter (classic BPF over struct seccomp_data) ----

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

unsafe impl Sync for SockFprog {}

const fn op(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET: u16 = 0x06; // BPF_RET | BPF_K
const KILL_PROCESS: u32 = 0x8000_0000;
const TRAP: u32 = 0x0003_0000;
const ALLOW: u32 = 0x7fff_0000;

// seccomp_data: nr at 0, arch at 4, instruction pointer at 8 (low) and 12
// (high), arguments from 16. Jumps count instructions skipped; the three
// returns are the last three instructions (KILL, TRAP, ALLOW).
const FILTER: [SockFilter; 20] = [
    op(LD_W_ABS, 0, 0, 4),
    op(JEQ, 0, 15, 0xc000_003e),                  // not x86-64: kill
    op(LD_W_ABS, 0, 0, 12),
    op(JEQ, 0, 14, (LOADER_BASE >> 32) as u32),   // not the loader's code: trap
    op(LD_W_ABS, 0, 0, 8),
    op(JGE, 12, 0, LOADER_SPAN as u32),           // (the loader's image starts at a 4 GiB boundary)
    op(LD_W_ABS, 0, 0, 0),
    op(JEQ, 11, 0, SYS_READ as u32),
    op(JEQ, 10, 0, SYS_WRITE as u32),
    op(JEQ, 9, 0, SYS_EXIT as u32),
    op(JEQ, 8, 0, SYS_EXIT_GROUP as u32),
    op(JEQ, 7, 0, SYS_RT_SIGRETURN as u32),
    op(JEQ, 0, 4, SYS_ARCH_PRCTL as u32),
    op(LD_W_ABS, 0, 0, 16),
    op(JEQ, 0, 2, 0x1002),                        // ARCH_SET_FS only
    op(LD_W_ABS, 0, 0, 20),
    op(JEQ, 2, 0, 0),
    op(RET, 0, 0, KILL_PROCESS),
    op(RET, 0, 0, TRAP),
    op(RET, 0, 0, ALLOW),
];

static FILTER_PROG: SockFprog = SockFprog { len: FILTER.len() as u16, filter: FILTER.as_ptr() };

#[unsafe(naked)]
unsafe extern "C" fn restorer() -> ! {
    naked_asm!("mov eax, 15", "syscall", "ud2")
}

// ucontext_t: general registers start at byte 40, 8 bytes each.
const REG_R8: usize = 0;
const REG_R9: usize = 1;
const REG_R10: usize = 2;
const REG_RDI: usize = 8;
const REG_RSI: usize = 9;
const REG_RDX: usize = 12;
const REG_RAX: usize = 13;
const REG_RIP: usize = 16;

unsafe fn reg(uc: *mut u8, r: usize) -> *mut usize {
    unsafe { uc.add(40 + 8 * r) as *mut usize }
}

fn readable(rip: usize, len: usize) -> bool {
    unsafe {
        for i in 0..EXEC_COUNT {
            let (s, e) = EXEC[i];
            if rip >= s && rip + len <= e {
                return true;
            }
        }
        VDSO != 0 && rip >= VDSO && rip + len <= VDSO + 2 * PAGE
    }
}

extern "C" fn handler(sig: i32, info: *mut u8, uc: *mut u8) {
    unsafe {
        let rip = *reg(uc, REG_RIP);
        let addr = *(info.add(16) as *const usize);
        match sig {
            31 => {
                let code = *(info.add(8) as *const i32);
                let nr = *(info.add(24) as *const i32) as usize;
                // SYS_USER_DISPATCH, or SYS_SECCOMP from the fallback filter.
                if code != 2 && !(code == 1 && FILTERED) {
                    report(FORBIDDEN_SYSCALL, nr as u64, rip as u64, 0);
                }
                if !CONTROL.is_null() {
                    *reg(uc, REG_RAX) = emulate(nr, uc) as usize;
                    return;
                }
                let (a, b, c) = (*reg(uc, REG_RDI), *reg(uc, REG_RSI), *reg(uc, REG_RDX));
                match nr {
                    SYS_READ | SYS_WRITE => *reg(uc, REG_RAX) = syscall3(nr, a, b, c) as usize,
                    SYS_EXIT | SYS_EXIT_GROUP => exit(a & 0xff),
                    _ => report(FORBIDDEN_SYSCALL, nr as u64, rip as u64, 0),
                }
            }
            11 => {
                if readable(rip, 3) {
                    let b = core::slice::from_raw_parts(rip as *const u8, 3);
                    if b[0] == 0x0f && (b[1] == 0x31 || (b[1] == 0x01 && b[2] == 0xf9)) {
                        report(RDTSC, 0, rip as u64, 0);
                    }
                }
                // Large frames can skip the guard page: a fault up to 1 MiB below it is the stack too.
                if addr < GUARD.1 && addr >= GUARD.0.saturating_sub(1 << 20) {
                    report(STACK_OVERFLOW, 0, rip as u64, addr as u64);
                }
                report(SEGFAULT, 0, rip as u64, addr as u64);
            }
            7 => report(BUS_ERROR, 0, rip as u64, addr as u64),
            4 => report(ILLEGAL_INSTRUCTION, 0, rip as u64, 0),
            8 => report(ARITHMETIC, 0, rip as u64, 0),
            24 => report(CPU_LIMIT, 0, rip as u64, 0),
            _ => report(LOADER_FAILED, sig as u64, rip as u64, 0),
        }
    }
}

/// Emulated mode: one system call of the program's. Exit and the thread
/// pointer are done here; everything else goes to the supervisor.
unsafe fn emulate(nr: usize, uc: *mut u8) -> isize {
    use core::sync::atomic::{fence, AtomicU32, Ordering};
    unsafe {
        let arg = |r: usize| *reg(uc, r);
        let args = [arg(REG_RDI), arg(REG_RSI), arg(REG_RDX), arg(REG_R10), arg(REG_R8), arg(REG_R9)];
        match nr {
            SYS_EXIT | SYS_EXIT_GROUP => exit(args[0] & 0xff),
            SYS_ARCH_PRCTL if args[0] == 0x1002 && FSGSBASE => {
                // ARCH_SET_FS: the program's thread pointer, set without the kernel.
                asm!("wrfsbase {}", in(reg) args[1], options(nostack));
                return 0;
            }
            // Without FSGSBASE the filter lets this one call through, from here only.
            SYS_ARCH_PRCTL if args[0] == 0x1002 && FILTERED => return syscall3(SYS_ARCH_PRCTL, 0x1002, args[1], 0),
            _ => {}
        }
        let c = CONTROL;
        let at = |off: usize| AtomicU32::from_ptr(c.add(off) as *mut u32);
        ptr::write_volatile(c.add(C_NR) as *mut usize, nr);
        for (i, a) in args.iter().enumerate() {
            ptr::write_volatile(c.add(C_ARGS + 8 * i) as *mut usize, *a);
        }
        let seq = at(C_REQ_SEQ).load(Ordering::Relaxed).wrapping_add(1);
        at(C_REQ_SEQ).store(seq, Ordering::Release);
        fence(Ordering::SeqCst);
        if at(C_SUPER_SLEEPS).load(Ordering::Relaxed) != 0 {
            let b = 0u8;
            syscall3(SYS_WRITE, WAKE_SUPER, &b as *const u8 as usize, 1);
        }
        // Spin a little (the supervisor usually answers in microseconds), then sleep.
        let mut spins = 0;
        while at(C_RESP_SEQ).load(Ordering::Acquire) != seq {
            if spins < SPIN {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            at(C_GUEST_SLEEPS).store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if at(C_RESP_SEQ).load(Ordering::Acquire) == seq {
                at(C_GUEST_SLEEPS).store(0, Ordering::Relaxed);
                break;
            }
            let mut b = 0u8;
            if syscall3(SYS_READ, WAKE_GUEST, &mut b as *mut u8 as usize, 1) <= 0 {
                exit(125); // the supervisor is gone
            }
            at(C_GUEST_SLEEPS).store(0, Ordering::Relaxed);
        }
        ptr::read_volatile(c.add(C_RET) as *const isize)
    }
}

// Silence "unused" for constants documented for the supervisor.
const _: u32 = RDTSC + SEGFAULT + CPU_LIMIT + ADDRESS_SPACE + BAD_PROGRAM + STACK_OVERFLOW + BUS_ERROR + ILLEGAL_INSTRUCTION + ARITHMETIC + LOADER_FAILED;
const _: usize = SYS_RT_SIGRETURN + SYS_WRITE;
