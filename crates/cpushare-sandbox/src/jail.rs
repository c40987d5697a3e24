//! The supervisor: runs a program in a fresh jail and says how it ended.
//!
//! The jail is a new process made with `posix_spawn` (never a fork of the
//! daemon, which is large) from the loader binary, held in a sealed memfd.
//! It gets exactly five descriptors, then keeps three (see `loader/main.rs`).
//! Input is written by a task, output and log are read with caps: a program
//! that writes more output than its lease allows is killed, so it cannot
//! exhaust the seller's memory.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::syscalls;

/// What a jail may use.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Address space, bytes: the slot's RAM.
    pub ram_bytes: u64,
    /// CPU time, seconds.
    pub cpu_seconds: u64,
    /// Output kept at most; more ends the program.
    pub output_bytes: usize,
    /// Log kept at most; more is dropped (the program carries on).
    pub log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { ram_bytes: 512 << 20, cpu_seconds: 3600, output_bytes: 64 << 20, log_bytes: 64 << 10 }
    }
}

/// How the jail is made.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// User and group to run as when the supervisor is root (default: nobody).
    pub run_as: Option<(u32, u32)>,
    /// Leave the program traceable by its owner (for `cpushare run --local` with gdb or strace).
    pub debuggable: bool,
    /// Emulated mode only: run it behind the seccomp-filter fallback, as on a
    /// machine without Syscall User Dispatch or FSGSBASE (for tests).
    pub fallback: bool,
}

/// A program ready to run: its bytes in a sealed memfd, and their SHA-256.
pub struct Program {
    pub(crate) fd: OwnedFd,
    sha256: [u8; 32],
    len: usize,
}

impl Program {
    pub fn new(elf: &[u8]) -> io::Result<Program> {
        let fd = sealed_memfd(c"cpushare-program", elf)?;
        Ok(Program { fd, sha256: Sha256::digest(elf).into(), len: elf.len() })
    }

    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why the jail ended a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kill {
    ForbiddenSyscall { nr: u64 },
    /// Killed by the kernel's strict mode, the call unknown (dispatch was switched off).
    ForbiddenUnknown,
    Rdtsc,
    Segfault { addr: u64, rip: u64 },
    StackOverflow,
    CpuLimit { seconds: u64 },
    AddressSpace { needed: u64, limit: u64 },
    BadProgram { why: &'static str },
    BusError { addr: u64 },
    IllegalInstruction { rip: u64 },
    Arithmetic { rip: u64 },
    OutputLimit { bytes: usize },
    WallClock { seconds: u64 },
    Signal(i32),
    LoaderFailed { detail: u64 },
}

impl fmt::Display for Kill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kill::ForbiddenSyscall { nr } => match syscalls::name(*nr) {
                Some(name) => write!(f, "killed by the jail: forbidden system call {nr} ({name})"),
                None => write!(f, "killed by the jail: forbidden system call {nr}"),
            },
            Kill::ForbiddenUnknown => write!(f, "killed by the jail: forbidden system call"),
            Kill::Rdtsc => write!(f, "killed: rdtsc (the time-stamp counter is off in the jail)"),
            Kill::Segfault { addr, rip } => write!(f, "killed: segmentation fault at {addr:#x} (instruction {rip:#x})"),
            Kill::StackOverflow => write!(f, "killed: stack overflow"),
            Kill::CpuLimit { seconds } => write!(f, "killed: CPU time limit ({seconds} s)"),
            Kill::AddressSpace { needed, limit } => write!(
                f,
                "killed: address-space limit (the program needs {} MiB, the slot offers {} MiB)",
                needed.div_ceil(1 << 20),
                limit >> 20
            ),
            Kill::BadProgram { why } => write!(f, "not a program the jail can run: {why}"),
            Kill::BusError { addr } => write!(f, "killed: bus error at {addr:#x}"),
            Kill::IllegalInstruction { rip } => write!(f, "killed: illegal instruction at {rip:#x}"),
            Kill::Arithmetic { rip } => write!(f, "killed: arithmetic fault (division by zero?) at {rip:#x}"),
            Kill::OutputLimit { bytes } => write!(f, "killed: output larger than the {bytes} bytes this lease allows"),
            Kill::WallClock { seconds } => write!(f, "killed: still running after {seconds} s of wall-clock time"),
            Kill::Signal(s) => write!(f, "killed by signal {s}"),
            Kill::LoaderFailed { detail } => write!(f, "the jail could not be set up (step {detail}); this is the seller's fault"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Killed(Kill),
}

impl Ending {
    pub fn success(&self) -> bool {
        *self == Ending::Exited(0)
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Exited(c) => write!(f, "exited with status {c}"),
            Ending::Killed(k) => k.fmt(f),
        }
    }
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct Run {
    pub ending: Ending,
    pub output: Vec<u8>,
    pub log: Vec<u8>,
    pub cpu: Duration,
    pub wall: Duration,
}

pub(crate) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sealed_memfd(name: &std::ffi::CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    unsafe {
        let fd = cvt(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING))?;
        let fd = OwnedFd::from_raw_fd(fd);
        let mut done = 0;
        while done < bytes.len() {
            let n = libc::write(fd.as_raw_fd(), bytes[done..].as_ptr().cast(), bytes.len() - done);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            done += n as usize;
        }
        cvt(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL))?;
        Ok(fd)
    }
}

/// The loader, once per process.
pub(crate) fn loader() -> io::Result<&'static OwnedFd> {
    static LOADER: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = LOADER.get() {
        return Ok(fd);
    }
    // Numbered high, so that arranging the jail's descriptors never covers it.
    let fd = high(sealed_memfd(c"cpushare-loader", crate::LOADER)?.as_raw_fd())?;
    Ok(LOADER.get_or_init(|| fd))
}

/// A copy of `fd` numbered 10 or above (so that arranging 0..4 in the child never
/// overwrites a source), close-on-exec.
pub(crate) fn high(fd: RawFd) -> io::Result<OwnedFd> {
    Ok(unsafe { OwnedFd::from_raw_fd(cvt(libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10))?) })
}

pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    unsafe {
        cvt(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC))?;
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// The status page the loader writes when it ends a program.
pub(crate) struct StatusPage {
    pub(crate) fd: OwnedFd,
}

impl StatusPage {
    pub(crate) fn new() -> io::Result<StatusPage> {
        unsafe {
            let fd = OwnedFd::from_raw_fd(cvt(libc::memfd_create(c"cpushare-status".as_ptr(), libc::MFD_CLOEXEC))?);
            cvt(libc::ftruncate(fd.as_raw_fd(), 4096))?;
            Ok(StatusPage { fd })
        }
    }

    /// (reason, detail, rip, addr) if the loader reported.
    fn read(&self) -> Option<(u32, u64, u64, u64)> {
        let mut buf = [0u8; 32];
        let n = unsafe { libc::pread(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 32, 0) };
        if n != 32 || u32::from_le_bytes(buf[0..4].try_into().unwrap()) != 0x4a55_5043 {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().unwrap());
        Some((u32::from_le_bytes(buf[4..8].try_into().unwrap()), u64_at(8), u64_at(16), u64_at(24)))
    }
}

fn kill_from(reason: u32, detail: u64, rip: u64, addr: u64, limits: &Limits) -> Kill {
    match reason {
        1 => Kill::ForbiddenSyscall { nr: detail },
        2 => Kill::Rdtsc,
        3 => Kill::Segfault { addr, rip },
        4 => Kill::CpuLimit { seconds: limits.cpu_seconds },
        5 => Kill::AddressSpace { needed: detail, limit: rip },
        6 => Kill::BadProgram { why: crate::elf::why(detail) },
        7 => Kill::StackOverflow,
        8 => Kill::BusError { addr },
        9 => Kill::IllegalInstruction { rip },
        10 => Kill::Arithmetic { rip },
        _ => Kill::LoaderFailed { detail },
    }
}

/// A jail just started: its process and the supervisor's ends of its pipes.
pub(crate) struct Started {
    pub pid: libc::pid_t,
    /// Kills the jail if it is dropped before being reaped.
    pub guard: KillOnDrop,
    pub stdin: tokio::net::unix::pipe::Sender,
    pub stdout: tokio::net::unix::pipe::Receiver,
    pub stderr: tokio::net::unix::pipe::Receiver,
    pub status: StatusPage,
}

/// Starts `program` in a new jail with `cpu_seconds` of CPU time (RLIMIT_CPU).
pub(crate) fn start(program: &Program, args: &[&str], limits: &Limits, cpu_seconds: u64, options: &Options) -> io::Result<Started> {
    let loader = loader()?;
    let status = StatusPage::new()?;
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (log_r, log_w) = pipe()?;
    // Bigger pipes move large fragments with fewer wake-ups (best effort: the
    // unprivileged maximum is /proc/sys/fs/pipe-max-size).
    for fd in [&in_w, &out_r] {
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    }
    let (uid, gid) = options.run_as.unwrap_or((65534, 65534));
    let children = [high(in_r.as_raw_fd())?, high(out_w.as_raw_fd())?, high(log_w.as_raw_fd())?, high(program.fd.as_raw_fd())?, high(status.fd.as_raw_fd())?];
    drop((in_r, out_w, log_w));

    let argv = loader_argv(limits.ram_bytes, cpu_seconds, (uid, gid), options.debuggable as u32, &[], args)?;
    let pid = spawn(loader.as_raw_fd(), &children, &argv)?;
    drop(children);
    let guard = KillOnDrop(Some(pid));
    Ok(Started {
        pid,
        guard,
        stdin: tokio::net::unix::pipe::Sender::from_owned_fd(in_w)?,
        stdout: tokio::net::unix::pipe::Receiver::from_owned_fd(out_r)?,
        stderr: tokio::net::unix::pipe::Receiver::from_owned_fd(log_r)?,
        status,
    })
}

/// The most arguments, and the most environment variables, a program gets
/// (the loader's stack tables hold this many).
pub const MAX_STRINGS: usize = 256;

/// The loader's argv (see `loader/main.rs`): limits, user, flags, the
/// program's environment and arguments.
pub(crate) fn loader_argv(ram: u64, cpu_seconds: u64, (uid, gid): (u32, u32), flags: u32, env: &[&str], args: &[&str]) -> io::Result<Vec<CString>> {
    let mut argv: Vec<CString> = [
        "cpushare-loader".to_string(),
        ram.to_string(),
        cpu_seconds.to_string(),
        uid.to_string(),
        gid.to_string(),
        flags.to_string(),
        env.len().to_string(),
    ]
    .into_iter()
    .map(|a| CString::new(a).unwrap())
    .collect();
    if env.len() > MAX_STRINGS || args.len() > MAX_STRINGS {
        let why = format!("at most {MAX_STRINGS} arguments and {MAX_STRINGS} environment variables");
        return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
    }
    for a in env.iter().chain(args) {
        argv.push(CString::new(*a).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "an argument holds a NUL byte"))?);
    }
    Ok(argv)
}

/// Appends what `from` holds to `log`, up to `cap` bytes in all (the rest is
/// read and dropped, so the program never blocks on its log).
pub(crate) fn keep_log(log: &mut Vec<u8>, from: &[u8], cap: usize) {
    let room = cap.saturating_sub(log.len());
    log.extend_from_slice(&from[..from.len().min(room)]);
}

/// The wall-clock limit for `cpu_seconds` of work: generous, for a busy machine.
pub(crate) fn wall_limit(cpu_seconds: u64) -> Duration {
    Duration::from_secs(cpu_seconds.saturating_mul(4).saturating_add(10))
}

/// Collects what the program logs (fd 2), up to `cap` bytes.
fn spawn_logger(mut stderr: tokio::net::unix::pipe::Receiver, cap: usize) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut log = Vec::new();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stderr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => keep_log(&mut log, &buf[..n], cap),
            }
        }
        log
    })
}

/// [`run`] with the input arriving in pieces and the output leaving in
/// pieces as the program writes it, so that neither is ever held whole: a
/// large fragment streams through. `input` yields the input (its end is the
/// channel's); `output` gets the output in pieces of `piece` bytes, except
/// the last, which is returned in [`Run::output`] (all of it, if the output
/// is smaller than one piece: it can then travel with the outcome).
pub async fn run_piped(
    program: &Program,
    args: &[&str],
    mut input: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    output: tokio::sync::mpsc::Sender<bytes::Bytes>,
    piece: usize,
    limits: &Limits,
    options: &Options,
) -> io::Result<Run> {
    let started = Instant::now();
    let Started { pid, mut guard, mut stdin, mut stdout, stderr, status } = start(program, args, limits, limits.cpu_seconds, options)?;
    let feeder = tokio::spawn(async move {
        while let Some(data) = input.recv().await {
            // A program that does not read all its input just ends the pipe:
            // not an error; the rest is taken and dropped.
            if stdin.write_all(&data).await.is_err() {
                while input.recv().await.is_some() {}
                return;
            }
        }
    });
    let logger = spawn_logger(stderr, limits.log_bytes);
    let waiter = tokio::task::spawn_blocking(move || wait(pid));
    let wall_limit = wall_limit(limits.cpu_seconds);
    let mut killed = None;
    let mut total = 0usize;
    let mut current = bytes::BytesMut::with_capacity(piece);
    let deadline = tokio::time::sleep(wall_limit);
    tokio::pin!(deadline);
    loop {
        if current.len() == piece {
            let full = std::mem::replace(&mut current, bytes::BytesMut::with_capacity(piece)).freeze();
            if output.send(full).await.is_err() {
                // Nobody takes the output any more: the fragment is abandoned.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
        }
        let room = piece - current.len();
        let mut into = bytes::BufMut::limit(&mut current, room);
        tokio::select! {
            r = stdout.read_buf(&mut into) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    total += n;
                    if total > limits.output_bytes {
                        current.truncate(current.len() - (total - limits.output_bytes));
                        killed = Some(Kill::OutputLimit { bytes: limits.output_bytes });
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        break;
                    }
                }
            },
            _ = &mut deadline => {
                killed = Some(Kill::WallClock { seconds: wall_limit.as_secs() });
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
        }
    }
    let (wstatus, cpu) = waiter.await.map_err(io::Error::other)??;
    guard.0 = None;
    feeder.abort();
    let log = logger.await.unwrap_or_default();
    let ending = ending(killed, &status, wstatus, cpu, limits);
    Ok(Run { ending, output: current.into(), log, cpu, wall: started.elapsed() })
}

/// Runs `program` with `args` (its argv[0] first) on `input`, in a new jail.
pub async fn run(program: &Program, args: &[&str], input: Vec<u8>, limits: &Limits, options: &Options) -> io::Result<Run> {
    let started = Instant::now();
    let Started { pid, mut guard, mut stdin, mut stdout, stderr, status } = start(program, args, limits, limits.cpu_seconds, options)?;
    let input_len = input.len();
    let feeder = tokio::spawn(async move {
        // A program that does not read all its input just ends the pipe: not an error.
        let _ = stdin.write_all(&input).await;
    });
    let logger = spawn_logger(stderr, limits.log_bytes);
    let waiter = tokio::task::spawn_blocking(move || wait(pid));

    let wall_limit = wall_limit(limits.cpu_seconds);
    // Room for an output as large as the input (many programs transform their
    // input), read straight into it: untouched room costs no memory, and a
    // large output is not copied again as the vector grows.
    let mut output = Vec::with_capacity(input_len.min(limits.output_bytes));
    let mut killed = None;
    let deadline = tokio::time::sleep(wall_limit);
    tokio::pin!(deadline);
    // When the room is full, a small read first: an output exactly as large
    // as its input (the usual case) then ends without the vector doubling
    // (a fresh allocation and a copy of all of it) just to read the end.
    let mut probe = [0u8; 4096];
    loop {
        let full = output.len() == output.capacity();
        tokio::select! {
            r = async {
                if full {
                    let n = stdout.read(&mut probe).await?;
                    if n > 0 {
                        output.reserve(output.len().max(64 << 10));
                        output.extend_from_slice(&probe[..n]);
                    }
                    Ok(n)
                } else {
                    stdout.read_buf(&mut output).await
                }
            } => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if output.len() > limits.output_bytes {
                        output.truncate(limits.output_bytes);
                        killed = Some(Kill::OutputLimit { bytes: limits.output_bytes });
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                        break;
                    }
                }
            },
            _ = &mut deadline => {
                killed = Some(Kill::WallClock { seconds: wall_limit.as_secs() });
                unsafe { libc::kill(pid, libc::SIGKILL) };
                break;
            }
        }
    }
    let (wstatus, cpu) = waiter.await.map_err(io::Error::other)??;
    guard.0 = None;
    feeder.abort();
    let log = logger.await.unwrap_or_default();
    let ending = ending(killed, &status, wstatus, cpu, limits);
    Ok(Run { ending, output, log, cpu, wall: started.elapsed() })
}

/// How a reaped jail ended: the supervisor's own kill first, then the loader's
/// report, then the kernel's wait status.
pub(crate) fn ending(killed: Option<Kill>, status: &StatusPage, wstatus: libc::c_int, cpu: Duration, limits: &Limits) -> Ending {
    if let Some(kill) = killed {
        Ending::Killed(kill)
    } else if let Some((reason, detail, rip, addr)) = status.read() {
        Ending::Killed(kill_from(reason, detail, rip, addr, limits))
    } else if libc::WIFEXITED(wstatus) {
        match libc::WEXITSTATUS(wstatus) {
            126 => Ending::Killed(Kill::LoaderFailed { detail: 0 }),
            code => Ending::Exited(code),
        }
    } else {
        let sig = libc::WTERMSIG(wstatus);
        if sig == libc::SIGXCPU || (sig == libc::SIGKILL && cpu.as_secs() >= limits.cpu_seconds) {
            Ending::Killed(Kill::CpuLimit { seconds: limits.cpu_seconds })
        } else if sig == libc::SIGKILL || sig == libc::SIGSYS {
            // Strict mode's own kill (or the fallback filter's): the program
            // reached the kernel with dispatch off.
            Ending::Killed(Kill::ForbiddenUnknown)
        } else {
            Ending::Killed(Kill::Signal(sig))
        }
    }
}

/// Kills the jail unless it has been reaped.
pub(crate) struct KillOnDrop(pub Option<libc::pid_t>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // Not yet reaped, so the pid is still this child's.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

pub(crate) fn spawn(loader: RawFd, fds: &[OwnedFd], argv: &[CString]) -> io::Result<libc::pid_t> {
    let path = CString::new(format!("/proc/self/fd/{loader}")).unwrap();
    let mut ptrs: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr() as *mut _).collect();
    ptrs.push(std::ptr::null_mut());
    let env: [*mut libc::c_char; 1] = [std::ptr::null_mut()];
    unsafe {
        let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut actions);
        libc::posix_spawnattr_init(&mut attr);
        for (target, fd) in fds.iter().enumerate() {
            libc::posix_spawn_file_actions_adddup2(&mut actions, fd.as_raw_fd(), target as libc::c_int);
        }
        // Default dispositions and an empty mask: nothing inherited from the daemon.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::posix_spawnattr_setsigdefault(&mut attr, &all);
        libc::posix_spawnattr_setsigmask(&mut attr, &none);
        libc::posix_spawnattr_setflags(&mut attr, (libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETSIGMASK) as libc::c_short);
        let mut pid = 0;
        let r = libc::posix_spawn(&mut pid, path.as_ptr(), &actions, &attr, ptrs.as_ptr(), env.as_ptr());
        libc::posix_spawn_file_actions_destroy(&mut actions);
        libc::posix_spawnattr_destroy(&mut attr);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(pid)
    }
}

/// Waits for the jail; its wait status and the CPU time it used.
pub(crate) fn wait(pid: libc::pid_t) -> io::Result<(libc::c_int, Duration)> {
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    Ok((status, tv(usage.ru_utime) + tv(usage.ru_stime)))
}
