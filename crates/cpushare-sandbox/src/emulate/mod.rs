//! The emulated jail: unmodified static programs (musl or glibc, static or
//! static-pie) in the same strict-mode jail, their system calls answered by
//! the supervisor.
//!
//! The loader maps every page of the program from a memfd the supervisor
//! also maps, turns on Syscall User Dispatch for everything outside its own
//! image and enters `SECCOMP_MODE_STRICT`. Each system call the program
//! makes becomes a SIGSYS in the loader's stub, which hands it over through
//! the control page ([`control`]) using only `read` and `write`; the
//! supervisor answers it here ([`calls`]) from the program's memory
//! ([`memory`]) and the buyer's files ([`files`]; on a seller, fetched from
//! the buyer as the program reaches them: [`mirror`], served by [`share`]).
//! The kernel never sees the program's calls, so the seller's attack surface
//! is strict mode's.

mod calls;
mod control;
mod files;
mod memory;
pub mod mirror;
pub mod share;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

pub use files::Mount;
pub use mirror::{Cache, Change, Changed, Entry, Fetch, Remote, Stopper};

use crate::jail::{cvt, ending, high, loader, loader_argv, pipe, spawn, wait, KillOnDrop, StatusPage};
use crate::{syscalls, Ending, Limits, Options, Program};

/// What an emulated program sees besides its arguments.
#[derive(Debug, Clone)]
pub struct World {
    /// Its environment, `NAME=value`.
    pub env: Vec<String>,
    /// Its working directory (a guest path).
    pub cwd: String,
    /// The buyer's directories it can reach; nothing else exists.
    pub mounts: Vec<Mount>,
    /// Where `getrandom` draws from: the same seed gives the same bytes.
    pub seed: [u8; 32],
}

impl Default for World {
    fn default() -> Self {
        World { env: Vec::new(), cwd: "/".into(), mounts: Vec::new(), seed: [0; 32] }
    }
}

/// How an emulated run went.
#[derive(Debug)]
pub struct EmulatedRun {
    pub ending: Ending,
    pub cpu: Duration,
    pub wall: Duration,
    /// System calls the program made that are not emulated (each returned ENOSYS).
    pub not_emulated: Vec<u64>,
    /// System calls answered.
    pub calls: u64,
    /// On a seller: what the program changed in the buyer's directories, to send back.
    pub changes: Vec<Change>,
}

fn memfd(name: &std::ffi::CStr, size: u64) -> io::Result<OwnedFd> {
    unsafe {
        let fd = OwnedFd::from_raw_fd(cvt(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC))?);
        cvt(libc::ftruncate(fd.as_raw_fd(), size as i64))?;
        Ok(fd)
    }
}

/// Runs `program` with `args` (its argv[0] first) in a new emulated jail; its
/// standard streams are `stdin`, `stdout` and `stderr`. Blocks until it ends.
#[allow(clippy::too_many_arguments)]
pub fn run_emulated(
    program: &Program,
    args: &[&str],
    world: &World,
    stdin: Box<dyn Read + Send>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    limits: &Limits,
    options: &Options,
) -> io::Result<EmulatedRun> {
    run(program, args, world, None, stdin, stdout, stderr, limits, options)
}

/// [`run_emulated`] on a seller: the mounts in `world` are empty local
/// directories that `remote` fills from the buyer's as the program reaches
/// into them; what the program changed comes back in [`EmulatedRun::changes`].
#[allow(clippy::too_many_arguments)]
pub fn run_emulated_remote(
    program: &Program,
    args: &[&str],
    world: &World,
    remote: Remote,
    stdin: Box<dyn Read + Send>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    limits: &Limits,
    options: &Options,
) -> io::Result<EmulatedRun> {
    run(program, args, world, Some(remote), stdin, stdout, stderr, limits, options)
}

#[allow(clippy::too_many_arguments)]
fn run(
    program: &Program,
    args: &[&str],
    world: &World,
    remote: Option<Remote>,
    stdin: Box<dyn Read + Send>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
    limits: &Limits,
    options: &Options,
) -> io::Result<EmulatedRun> {
    let started = Instant::now();
    let mut files = files::Files::new(world.mounts.clone(), files::normalize("/", &world.cwd), stdin, stdout, stderr)?;
    files.mirror = remote.map(|r| mirror::Mirror::new(r, world.mounts.iter().map(|m| (m.host.clone(), m.read_only)).collect()));
    let loader = loader()?;
    let status = StatusPage::new()?;
    let control_fd = memfd(c"cpushare-control", 4096)?;
    let size = limits.ram_bytes.next_multiple_of(memory::PAGE);
    let memory_fd = memfd(c"cpushare-memory", size)?;
    let (wake_me, wake_me_w) = pipe()?;
    let (wake_guest_r, wake_guest) = pipe()?;
    // Never block the supervisor on a wake-up: a full pipe already holds one.
    unsafe { cvt(libc::fcntl(wake_guest.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK))? };
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let children = [
        high(null.as_raw_fd())?,
        high(null.as_raw_fd())?,
        high(null.as_raw_fd())?,
        high(program.fd.as_raw_fd())?,
        high(status.fd.as_raw_fd())?,
        high(control_fd.as_raw_fd())?,
        high(wake_me_w.as_raw_fd())?,
        high(wake_guest_r.as_raw_fd())?,
        high(memory_fd.as_raw_fd())?,
    ];
    drop((wake_me_w, wake_guest_r, null));
    let (uid, gid) = options.run_as.unwrap_or((65534, 65534));
    let env: Vec<&str> = world.env.iter().map(|s| s.as_str()).collect();
    let argv = loader_argv(limits.ram_bytes, limits.cpu_seconds, (uid, gid), 2 | options.debuggable as u32 | if options.fallback { 4 | 8 } else { 0 }, &env, args)?;
    let pid = spawn(loader.as_raw_fd(), &children, &argv)?;
    drop(children);
    let mut guard = KillOnDrop(Some(pid));
    let stopper = files.mirror.as_ref().map(|m| m.stopper());
    if let Some(s) = &stopper {
        s.started(pid);
    }

    let page = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, control_fd.as_raw_fd(), 0) };
    if page == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let page = Page(page.cast());
    let mut control = control::Control::new(page.0, wake_me, wake_guest);
    let mut emulator = calls::Emulator::new(pid, memory::Memory::new(memory_fd, size)?, files, world.seed);
    let mut calls = 0u64;
    while let Some(request) = control.next()? {
        if calls == 0 {
            // The loader wrote the layout before the program ran.
            emulator.mem.set_layout(&control.layout());
        }
        calls += 1;
        let known = emulator.not_emulated.len();
        let ret = emulator.call(request);
        if emulator.not_emulated.len() > known {
            let nr = request.nr;
            let name = syscalls::name(nr).map(|n| format!(" ({n})")).unwrap_or_default();
            let _ = writeln!(emulator.files.stderr, "cpushare: system call {nr}{name} is not emulated in the jail; the program got ENOSYS");
        }
        control.reply(ret);
    }
    let _ = emulator.files.stdout.flush();
    if let Some(s) = &stopper {
        s.ended();
    }
    let (wstatus, cpu) = wait(pid)?;
    guard.0 = None;
    let ending = ending(None, &status, wstatus, cpu, limits);
    let changes = emulator.files.mirror.take().map(|m| m.changes()).unwrap_or_default();
    Ok(EmulatedRun { ending, cpu, wall: started.elapsed(), not_emulated: emulator.not_emulated.into_iter().collect(), calls, changes })
}

/// The supervisor's mapping of the control page.
struct Page(*mut u8);

impl Drop for Page {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.0.cast(), 4096) };
    }
}

/// For the fuzzer (`fuzz/fuzz_targets/emulated_calls.rs`): a program's system
/// calls answered as in an emulated jail, without the jail. Its memory is one
/// piece of 1 MiB at 0x10000, starting with the given bytes, and a heap arena
/// of 1 MiB; signals it sends itself go to `pid`.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    pub const MEMORY_AT: u64 = 0x10000;
    const PIECE: u64 = 1 << 20;
    const ARENA_AT: u64 = 0x1000_0000_0000;

    pub struct Emulated(calls::Emulator);

    pub fn emulated(pid: libc::pid_t, mounts: Vec<Mount>, memory: &[u8]) -> io::Result<Emulated> {
        let files = files::Files::new(mounts, "/".into(), Box::new(io::empty()), Box::new(io::sink()), Box::new(io::sink()))?;
        let mut mem = memory::Memory::new(super::memfd(c"cpushare-fuzz", 2 * PIECE)?, 2 * PIECE)?;
        mem.set_layout(&[(MEMORY_AT, PIECE, 0), (ARENA_AT, PIECE, PIECE)]);
        mem.write(MEMORY_AT, &memory[..memory.len().min(PIECE as usize)]).map_err(|e| io::Error::from_raw_os_error(-e as i32))?;
        Ok(Emulated(calls::Emulator::new(pid, mem, files, [7; 32])))
    }

    impl Emulated {
        pub fn call(&mut self, nr: u64, args: [u64; 6]) -> i64 {
            self.0.call(control::Request { nr, args })
        }
    }
}
