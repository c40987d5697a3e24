//! The system calls an unmodified static program makes, answered by the
//! supervisor from the program's memory and the buyer's files.
//!
//! A call that is not emulated returns ENOSYS (and is reported once in the
//! log): it never kills, and never reaches the kernel.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::control::Request;
use super::files::{errno, normalize, open_beneath, Files, Handle, Place};
use super::memory::Memory;
use super::mirror::Need;

const ENOSYS: i64 = -libc::ENOSYS as i64;
const EINVAL: i64 = -libc::EINVAL as i64;
const EBADF: i64 = -libc::EBADF as i64;
const ENOENT: i64 = -libc::ENOENT as i64;
const ENOTTY: i64 = -libc::ENOTTY as i64;
const EROFS: i64 = -libc::EROFS as i64;
const AT_FDCWD: i64 = -100;
/// The longest path accepted.
const PATH_MAX: usize = 4096;
/// The most bytes one read or write moves (a larger request is done in part, as the kernel may).
const IO_MAX: u64 = 64 << 20;
/// Clocks are rounded to this: no fine timer in the jail.
const CLOCK_GRAIN_NS: u64 = 1_000_000;

pub(crate) struct Emulator {
    /// The jail's process, for signals the program sends itself.
    pub pid: libc::pid_t,
    pub mem: Memory,
    pub files: Files,
    seed: [u8; 32],
    random_counter: u64,
    /// Calls answered ENOSYS, each reported once.
    pub not_emulated: BTreeSet<u64>,
}

fn coarse(d: Duration) -> (u64, u64) {
    let ns = d.as_nanos() as u64 / CLOCK_GRAIN_NS * CLOCK_GRAIN_NS;
    (ns / 1_000_000_000, ns % 1_000_000_000)
}

fn monotonic() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ret<T>(r: Result<T, i64>, f: impl FnOnce(T) -> i64) -> i64 {
    match r {
        Ok(v) => f(v),
        Err(e) => e,
    }
}

impl Emulator {
    pub(crate) fn new(pid: libc::pid_t, mem: Memory, files: Files, seed: [u8; 32]) -> Emulator {
        Emulator { pid, mem, files, seed, random_counter: 0, not_emulated: BTreeSet::new() }
    }

    /// poll / ppoll: files and streams are always ready (reads block in the
    /// supervisor); a closed descriptor is POLLNVAL.
    fn poll(&mut self, fds: u64, count: u64) -> i64 {
        if count > 1024 {
            return EINVAL;
        }
        let mut list = match self.mem.read(fds, count * 8) {
            Ok(l) => l,
            Err(e) => return e,
        };
        let mut ready = 0;
        for p in list.chunks_mut(8) {
            let fd = i32::from_le_bytes(p[..4].try_into().unwrap());
            let events = i16::from_le_bytes(p[4..6].try_into().unwrap());
            let revents = if fd < 0 {
                0
            } else if self.files.get(fd as u64).is_err() {
                libc::POLLNVAL
            } else {
                events & (libc::POLLIN | libc::POLLOUT)
            };
            p[6..8].copy_from_slice(&revents.to_le_bytes());
            ready += (revents != 0) as i64;
        }
        ret(self.mem.write(fds, &list), |_| ready)
    }

    /// kill / tkill / tgkill aimed at the program itself (its pid is 2).
    fn signal_self(&mut self, target: u64, sig: u64) -> i64 {
        let target = target as i32;
        if target != 2 && target != 0 {
            return -libc::EPERM as i64;
        }
        if sig == 0 {
            return 0;
        }
        if !(1..=64).contains(&sig) {
            return EINVAL;
        }
        unsafe { libc::kill(self.pid, sig as i32) };
        0
    }

    /// Answers one call.
    pub(crate) fn call(&mut self, r: Request) -> i64 {
        let [a, b, c, d, e, _f] = r.args;
        match r.nr {
            0 => self.read(a, b, c, None),
            1 => self.write(a, b, c, None),
            2 => self.openat(AT_FDCWD as u64, a, b, c),
            3 => self.files.close(a),
            4 => self.stat_path(AT_FDCWD as u64, a, b, 0),
            6 => self.stat_path(AT_FDCWD as u64, a, b, libc::AT_SYMLINK_NOFOLLOW as u64),
            5 => self.fstat(a, b),
            8 => self.lseek(a, b as i64, c),
            9 => self.mmap(a, b, c, d, e as i64, r.args[5]),
            10 => 0, // mprotect: the arena is read-write; protections are not narrowed
            11 => self.mem.munmap(a, b),
            12 => self.mem.brk(a),
            13 | 14 => {
                // rt_sigaction / rt_sigprocmask: no signals reach the program; say "none set".
                if c != 0 {
                    let len = if r.nr == 13 { 32 } else { d.min(128) };
                    let _ = self.mem.write(c, &vec![0; len as usize]);
                }
                0
            }
            16 => self.ioctl(a, b),
            17 => self.read(a, b, c, Some(d)),
            18 => self.write(a, b, c, Some(d)),
            19 => self.vector(a, b, c, false),
            20 => self.vector(a, b, c, true),
            21 => self.access(AT_FDCWD as u64, a),
            24 => 0, // sched_yield
            25 => self.mem.mremap(a, b, c, d),
            28 => if c == libc::MADV_DONTNEED as u64 { self.mem.madvise_dontneed(a, b) } else { 0 },
            32 => match self.files.duplicate(a) {
                Ok(h) => self.files.install(h, 0),
                Err(e) => e,
            },
            33 => self.files.dup_to(a, b),
            292 => if a == b { EINVAL } else { self.files.dup_to(a, b) },
            35 => self.sleep(a),
            39 | 186 => 2, // getpid, gettid: the program is alone in its world
            110 => 1, // getppid
            63 => self.uname(a),
            72 => self.fcntl(a, b, c),
            74 | 75 => if self.files.get(a).is_ok() { 0 } else { EBADF }, // fsync, fdatasync
            77 => self.ftruncate(a, b),
            79 => self.getcwd(a, b),
            80 => self.chdir(a),
            82 => self.rename(AT_FDCWD as u64, a, AT_FDCWD as u64, b),
            83 => self.mkdir(AT_FDCWD as u64, a, b),
            84 => self.unlink(AT_FDCWD as u64, a, libc::AT_REMOVEDIR as u64),
            87 => self.unlink(AT_FDCWD as u64, a, 0),
            89 => ENOENT, // readlink: no symlinks to show (not even /proc/self/exe)
            95 => 0o022, // umask
            96 => self.gettimeofday(a),
            97 | 302 => self.rlimit(if r.nr == 97 { a } else { b }, if r.nr == 97 { b } else { d }),
            102 | 104 | 107 | 108 => 1000, // getuid, getgid, geteuid, getegid
            131 => 0, // sigaltstack
            158 => self.arch_prctl(a, b),
            201 => self.time(a),
            202 => 0, // futex: one thread, nothing ever waits
            204 => self.affinity(b, c),
            217 => self.getdents(a, b, c),
            218 => 2, // set_tid_address
            221 => 0, // fadvise64
            228 => self.clock_gettime(a, b),
            229 => if b != 0 { ret(self.mem.write(b, &timespec(0, CLOCK_GRAIN_NS)), |_| 0) } else { 0 },
            230 => self.sleep(c),
            257 => self.openat(a, b, c, d),
            258 => self.mkdir(a, b, c),
            262 => self.stat_path(a, b, c, d),
            263 => self.unlink(a, b, c),
            264 | 316 => self.rename(a, b, c, d),
            269 | 439 => self.access(a, b),
            273 => 0, // set_robust_list
            318 => self.getrandom(a, b),
            // Privileges: the program is user 1000 and may "drop" to it, nothing else.
            105 | 106 => if a == 1000 { 0 } else { -libc::EPERM as i64 },
            113 | 114 | 117 | 119 => 0, // setreuid, setregid, setresuid, setresgid (to itself)
            116 => 0, // setgroups
            157 => match a as i32 {
                libc::PR_SET_NAME | libc::PR_SET_DUMPABLE | libc::PR_SET_NO_NEW_PRIVS => 0,
                _ => EINVAL,
            },
            7 | 271 => self.poll(a, b),
            // A signal to itself (abort, raise): delivered for real, by the supervisor.
            62 | 200 => self.signal_self(a, b),
            234 => self.signal_self(b, c),
            // Probed by libc at start; "not here" is the expected answer, not worth a log line.
            334 => ENOSYS, // rseq
            _ => {
                self.not_emulated.insert(r.nr);
                ENOSYS
            }
        }
    }

    fn path(&mut self, dirfd: u64, addr: u64) -> Result<String, i64> {
        let raw = self.mem.string(addr, PATH_MAX)?;
        let p = String::from_utf8(raw).map_err(|_| ENOENT)?;
        if p.is_empty() {
            return Err(ENOENT);
        }
        // Descriptors are C ints: only the low 32 bits of the register count.
        if p.starts_with('/') || dirfd as i32 as i64 == AT_FDCWD {
            return Ok(normalize(&self.files.cwd, &p));
        }
        // Relative to a directory the program opened, by the guest path it was opened at.
        match self.files.get(dirfd)? {
            Handle::File { path: dir, .. } | Handle::Virtual { path: dir, .. } => Ok(normalize(dir, &p)),
            _ => Err(-libc::ENOTDIR as i64),
        }
    }

    fn openat(&mut self, dirfd: u64, path: u64, flags: u64, mode: u64) -> i64 {
        match self.path(dirfd, path) {
            Ok(p) => self.files.open(&p, flags, mode),
            Err(e) => e,
        }
    }

    fn read(&mut self, fd: u64, buf: u64, len: u64, at: Option<u64>) -> i64 {
        let len = len.min(IO_MAX);
        let out = match self.mem.buffer(buf, len) {
            Ok(b) => b,
            Err(e) => return e,
        };
        let r = match self.files.get(fd) {
            Err(e) => return e,
            Ok(Handle::Std(0)) => self.files.stdin.read(out),
            Ok(Handle::Std(_)) => return EBADF,
            Ok(Handle::Null) => Ok(0),
            Ok(Handle::Virtual { .. }) => return -libc::EISDIR as i64,
            Ok(Handle::File { file, .. }) => match at {
                Some(off) => file.read_at(out, off),
                None => file.read(out),
            },
        };
        match r {
            Ok(n) => n as i64,
            Err(e) => errno(&e),
        }
    }

    fn write(&mut self, fd: u64, buf: u64, len: u64, at: Option<u64>) -> i64 {
        let len = len.min(IO_MAX);
        let data = match self.mem.buffer(buf, len) {
            Ok(b) => &*b,
            Err(e) => return e,
        };
        let r = match self.files.get(fd) {
            Err(e) => return e,
            Ok(Handle::Std(0)) => return EBADF,
            Ok(Handle::Std(1)) => self.files.stdout.write_all(data).and_then(|_| self.files.stdout.flush()).map(|_| data.len()),
            Ok(Handle::Std(_)) => self.files.stderr.write_all(data).and_then(|_| self.files.stderr.flush()).map(|_| data.len()),
            Ok(Handle::Null) => Ok(data.len()),
            Ok(Handle::Virtual { .. }) => return -libc::EISDIR as i64,
            Ok(Handle::File { writable: false, .. }) => return EBADF,
            Ok(Handle::File { .. }) => {
                // Writes on a seller count against the disk the run may fill.
                if let Err(e) = self.files.charge(data.len() as u64) {
                    return e;
                }
                let Ok(Handle::File { file, .. }) = self.files.get(fd) else { return EBADF };
                match at {
                    Some(off) => file.write_at(data, off),
                    None => file.write(data),
                }
            }
        };
        match r {
            Ok(n) => n as i64,
            Err(e) => errno(&e),
        }
    }

    /// readv / writev: one call per piece, stopping at a short one.
    fn vector(&mut self, fd: u64, iov: u64, count: u64, write: bool) -> i64 {
        if count > 1024 {
            return EINVAL;
        }
        let vec = match self.mem.read(iov, count * 16) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let mut total = 0i64;
        for piece in vec.chunks(16) {
            let (base, len) = (u64::from_le_bytes(piece[..8].try_into().unwrap()), u64::from_le_bytes(piece[8..].try_into().unwrap()));
            if len == 0 {
                continue;
            }
            let n = if write { self.write(fd, base, len, None) } else { self.read(fd, base, len, None) };
            if n < 0 {
                return if total > 0 { total } else { n };
            }
            total += n;
            if (n as u64) < len {
                break;
            }
        }
        total
    }

    fn lseek(&mut self, fd: u64, off: i64, whence: u64) -> i64 {
        let Handle::File { file, .. } = (match self.files.get(fd) {
            Ok(h) => h,
            Err(e) => return e,
        }) else {
            return -libc::ESPIPE as i64;
        };
        let pos = match whence {
            0 if off >= 0 => SeekFrom::Start(off as u64),
            1 => SeekFrom::Current(off),
            2 => SeekFrom::End(off),
            _ => return EINVAL,
        };
        match file.seek(pos) {
            Ok(p) => p as i64,
            Err(e) => errno(&e),
        }
    }

    fn mmap(&mut self, addr: u64, len: u64, _prot: u64, flags: u64, fd: i64, off: u64) -> i64 {
        let at = self.mem.mmap(addr, len, flags);
        if at < 0 || flags & libc::MAP_ANONYMOUS as u64 != 0 {
            return at;
        }
        // A file mapping: a private copy of the file's bytes (writes do not reach the file).
        let Ok(Handle::File { file, .. }) = self.files.get(fd as u64) else {
            self.mem.munmap(at as u64, len);
            return EBADF;
        };
        let buf = self.mem.buffer(at as u64, len).expect("the arena holds what it handed out");
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => {
                    self.mem.munmap(at as u64, len);
                    return errno(&e);
                }
            }
        }
        at
    }

    fn fstat(&mut self, fd: u64, out: u64) -> i64 {
        let st = match self.files.get(fd) {
            Err(e) => return e,
            Ok(Handle::File { file, .. }) => match host_stat(file.as_raw_fd(), c"", libc::AT_EMPTY_PATH) {
                Ok(st) => st,
                Err(e) => return e,
            },
            Ok(Handle::Virtual { .. }) => fake_stat(libc::S_IFDIR | 0o755),
            Ok(Handle::Null) => fake_stat(libc::S_IFCHR | 0o666),
            Ok(Handle::Std(_)) => fake_stat(libc::S_IFIFO | 0o600),
        };
        write_stat(&self.mem, out, st)
    }

    fn stat_path(&mut self, dirfd: u64, path: u64, out: u64, flags: u64) -> i64 {
        if flags & libc::AT_EMPTY_PATH as u64 != 0 && self.mem.string(path, 1).map(|p| p.is_empty()).unwrap_or(false) {
            return self.fstat(dirfd, out);
        }
        let p = match self.path(dirfd, path) {
            Ok(p) => p,
            Err(e) => return e,
        };
        let st = match self.files.place(&p, Need::Look) {
            Place::Failed(e) => return e,
            Place::Nowhere => return ENOENT,
            Place::DevNull => fake_stat(libc::S_IFCHR | 0o666),
            Place::Above => fake_stat(libc::S_IFDIR | 0o755),
            Place::Mounted { root, rest, .. } => {
                // Resolve inside the mount as open does, then stat what was found.
                let nofollow = if flags & libc::AT_SYMLINK_NOFOLLOW as u64 != 0 { libc::O_NOFOLLOW } else { 0 };
                let fd = match open_beneath(root.as_raw_fd(), &rest, (libc::O_PATH | nofollow) as u64) {
                    Ok(fd) => fd,
                    Err(e) => return e,
                };
                match host_stat(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH) {
                    Ok(st) => st,
                    Err(e) => return e,
                }
            }
        };
        write_stat(&self.mem, out, st)
    }

    fn access(&mut self, dirfd: u64, path: u64) -> i64 {
        let p = match self.path(dirfd, path) {
            Ok(p) => p,
            Err(e) => return e,
        };
        match self.files.place(&p, Need::Look) {
            Place::Failed(e) => e,
            Place::Nowhere => ENOENT,
            Place::DevNull | Place::Above => 0,
            Place::Mounted { root, rest, .. } => match open_beneath(root.as_raw_fd(), &rest, libc::O_PATH as u64) {
                Ok(_) => 0,
                Err(e) => e,
            },
        }
    }

    /// Runs a path call (mkdir, unlink, rename) inside the mount `path` is in.
    fn in_mount(&mut self, dirfd: u64, path: u64, need: Need, f: impl FnOnce(i32, &std::ffi::CStr) -> i64) -> i64 {
        let p = match self.path(dirfd, path) {
            Ok(p) => p,
            Err(e) => return e,
        };
        match self.files.place(&p, need) {
            Place::Failed(e) => e,
            Place::Mounted { read_only: true, .. } | Place::Above | Place::DevNull => EROFS,
            Place::Nowhere => ENOENT,
            Place::Mounted { root, rest, .. } => {
                // The parent, resolved inside the mount; then the last name alone.
                let (parent, name) = split_last(&rest);
                match open_beneath(root.as_raw_fd(), &parent, (libc::O_PATH | libc::O_DIRECTORY) as u64) {
                    Ok(dir) => f(dir.as_raw_fd(), &name),
                    Err(e) => e,
                }
            }
        }
    }

    fn mkdir(&mut self, dirfd: u64, path: u64, mode: u64) -> i64 {
        self.in_mount(dirfd, path, Need::Change, |dir, name| check(unsafe { libc::mkdirat(dir, name.as_ptr(), (mode & 0o777) as libc::mode_t) }))
    }

    fn unlink(&mut self, dirfd: u64, path: u64, flags: u64) -> i64 {
        let flags = (flags & libc::AT_REMOVEDIR as u64) as i32;
        self.in_mount(dirfd, path, Need::Change, |dir, name| check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }))
    }

    fn rename(&mut self, olddir: u64, old: u64, newdir: u64, new: u64) -> i64 {
        let target = match self.path(newdir, new) {
            Ok(p) => p,
            Err(e) => return e,
        };
        // Both ends must be in the same writable mount: resolve the target's parent there too.
        let (to_mount, to_root, to_rest) = match self.files.place(&target, Need::Change) {
            Place::Mounted { read_only: false, mount, root, rest } => (mount, root.as_raw_fd(), rest),
            Place::Failed(e) => return e,
            Place::Nowhere => return ENOENT,
            _ => return EROFS,
        };
        let (to_parent, to_name) = split_last(&to_rest);
        let to_dir = match open_beneath(to_root, &to_parent, (libc::O_PATH | libc::O_DIRECTORY) as u64) {
            Ok(d) => d,
            Err(e) => return e,
        };
        let r = self.in_mount(olddir, old, Need::Move, |dir, name| check(unsafe { libc::renameat(dir, name.as_ptr(), to_dir.as_raw_fd(), to_name.as_ptr()) }));
        if let (0, Some(mirror)) = (r, &mut self.files.mirror) {
            mirror.moved(to_mount, to_rest.to_str().unwrap_or(""));
        }
        r
    }

    fn getdents(&mut self, fd: u64, buf: u64, len: u64) -> i64 {
        let len = len.min(1 << 20);
        let out = match self.mem.buffer(buf, len) {
            Ok(b) => b,
            Err(e) => return e,
        };
        // Only a virtual directory lists mount points.
        let mounts = match self.files.get(fd) {
            Ok(Handle::Virtual { .. }) => self.files.mount_points(),
            _ => Vec::new(),
        };
        match self.files.get(fd) {
            Err(e) => e,
            Ok(Handle::File { file, .. }) => {
                let n = unsafe { libc::syscall(libc::SYS_getdents64, file.as_raw_fd(), out.as_mut_ptr(), out.len()) };
                if n < 0 {
                    errno(&std::io::Error::last_os_error())
                } else {
                    n
                }
            }
            Ok(Handle::Virtual { path, listed }) => {
                if *listed {
                    return 0;
                }
                // The next name of each mount below this directory.
                let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
                let mut names: Vec<&str> = mounts.iter().filter_map(|m| m.strip_prefix(&prefix)).map(|r| r.split('/').next().unwrap_or("")).filter(|n| !n.is_empty()).collect();
                names.sort();
                names.dedup();
                let mut at = 0usize;
                for (i, name) in [".", ".."].into_iter().chain(names).enumerate() {
                    let reclen = (19 + name.len() + 1).div_ceil(8) * 8;
                    if at + reclen > out.len() {
                        if at == 0 {
                            return EINVAL;
                        }
                        break;
                    }
                    let rec = &mut out[at..at + reclen];
                    rec.fill(0);
                    rec[0..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
                    rec[8..16].copy_from_slice(&((at + reclen) as u64).to_le_bytes());
                    rec[16..18].copy_from_slice(&(reclen as u16).to_le_bytes());
                    rec[18] = libc::DT_DIR;
                    rec[19..19 + name.len()].copy_from_slice(name.as_bytes());
                    at += reclen;
                }
                *listed = true;
                at as i64
            }
            Ok(_) => -libc::ENOTDIR as i64,
        }
    }

    fn ioctl(&mut self, fd: u64, _request: u64) -> i64 {
        // No terminals in the jail: every stream is a pipe or a file.
        match self.files.get(fd) {
            Ok(_) => ENOTTY,
            Err(e) => e,
        }
    }

    fn fcntl(&mut self, fd: u64, cmd: u64, arg: u64) -> i64 {
        if self.files.get(fd).is_err() {
            return EBADF;
        }
        match cmd as i32 {
            libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => match self.files.duplicate(fd) {
                Ok(h) => self.files.install(h, arg as usize),
                Err(e) => e,
            },
            libc::F_GETFD | libc::F_SETFD | libc::F_SETFL => 0,
            libc::F_GETFL => match self.files.get(fd) {
                Ok(Handle::File { writable: true, .. }) | Ok(Handle::Std(1)) | Ok(Handle::Std(2)) => libc::O_RDWR as i64,
                _ => libc::O_RDONLY as i64,
            },
            _ => EINVAL,
        }
    }

    fn ftruncate(&mut self, fd: u64, len: u64) -> i64 {
        let grows = match self.files.get(fd) {
            Ok(Handle::File { file, writable: true, .. }) => len.saturating_sub(file.metadata().map_or(0, |m| m.len())),
            Ok(_) => return EINVAL,
            Err(e) => return e,
        };
        if let Err(e) = self.files.charge(grows) {
            return e;
        }
        match self.files.get(fd) {
            Ok(Handle::File { file, .. }) => match file.set_len(len) {
                Ok(()) => 0,
                Err(e) => errno(&e),
            },
            _ => EBADF,
        }
    }

    fn getcwd(&mut self, buf: u64, len: u64) -> i64 {
        let mut cwd = self.files.cwd.clone().into_bytes();
        cwd.push(0);
        if (cwd.len() as u64) > len {
            return -libc::ERANGE as i64;
        }
        ret(self.mem.write(buf, &cwd), |_| cwd.len() as i64)
    }

    fn chdir(&mut self, path: u64) -> i64 {
        let p = match self.path(AT_FDCWD as u64, path) {
            Ok(p) => p,
            Err(e) => return e,
        };
        match self.files.place(&p, Need::Look) {
            Place::Above => {}
            Place::Mounted { root, rest, .. } => {
                if let Err(e) = open_beneath(root.as_raw_fd(), &rest, (libc::O_PATH | libc::O_DIRECTORY) as u64) {
                    return e;
                }
            }
            _ => return ENOENT,
        }
        self.files.cwd = p;
        0
    }

    fn uname(&mut self, out: u64) -> i64 {
        let mut buf = [0u8; 390];
        for (i, field) in ["Linux", "cpushare", "6.1.0-cpushare", "#1", "x86_64", ""].iter().enumerate() {
            buf[i * 65..i * 65 + field.len()].copy_from_slice(field.as_bytes());
        }
        ret(self.mem.write(out, &buf), |_| 0)
    }

    fn rlimit(&mut self, resource: u64, out: u64) -> i64 {
        if out == 0 {
            return 0; // setting a limit: accepted, changes nothing
        }
        let (soft, hard) = match resource as u32 {
            libc::RLIMIT_STACK => (8u64 << 20, 8u64 << 20),
            libc::RLIMIT_NOFILE => (1024, 1024),
            _ => (u64::MAX, u64::MAX),
        };
        let mut b = soft.to_le_bytes().to_vec();
        b.extend_from_slice(&hard.to_le_bytes());
        ret(self.mem.write(out, &b), |_| 0)
    }

    fn arch_prctl(&mut self, code: u64, _addr: u64) -> i64 {
        // ARCH_SET_FS is done by the stub with wrfsbase; here only when the CPU
        // lacks it, and then nothing can be done in strict mode.
        match code {
            0x1002 => {
                self.not_emulated.insert(158);
                ENOSYS
            }
            _ => EINVAL,
        }
    }

    fn time(&mut self, out: u64) -> i64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if out != 0 {
            if let Err(e) = self.mem.write_u64(out, now) {
                return e;
            }
        }
        now as i64
    }

    fn gettimeofday(&mut self, out: u64) -> i64 {
        if out == 0 {
            return 0;
        }
        let (s, ns) = coarse(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default());
        ret(self.mem.write(out, &timespec(s, ns / 1000)), |_| 0)
    }

    fn clock_gettime(&mut self, clock: u64, out: u64) -> i64 {
        let t = match clock as i32 {
            libc::CLOCK_REALTIME | libc::CLOCK_REALTIME_COARSE => SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default(),
            libc::CLOCK_MONOTONIC | libc::CLOCK_MONOTONIC_COARSE | libc::CLOCK_MONOTONIC_RAW | libc::CLOCK_BOOTTIME => monotonic(),
            // CPU clocks: the wall clock since start is close enough for a one-thread program.
            libc::CLOCK_PROCESS_CPUTIME_ID | libc::CLOCK_THREAD_CPUTIME_ID => monotonic(),
            _ => return EINVAL,
        };
        let (s, ns) = coarse(t);
        ret(self.mem.write(out, &timespec(s, ns)), |_| 0)
    }

    fn sleep(&mut self, req: u64) -> i64 {
        let t = match self.mem.read(req, 16) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let (s, ns) = (u64::from_le_bytes(t[..8].try_into().unwrap()), u64::from_le_bytes(t[8..].try_into().unwrap()));
        if ns >= 1_000_000_000 {
            return EINVAL;
        }
        std::thread::sleep(Duration::new(s.min(3600), ns as u32));
        0
    }

    fn affinity(&mut self, len: u64, out: u64) -> i64 {
        if len < 8 {
            return EINVAL;
        }
        ret(self.mem.write(out, &1u64.to_le_bytes()), |_| 8) // one CPU
    }

    /// Random bytes from the buyer's seed: runs repeat exactly.
    fn getrandom(&mut self, out: u64, len: u64) -> i64 {
        let len = len.min(1 << 20);
        let buf = match self.mem.buffer(out, len) {
            Ok(b) => b,
            Err(e) => return e,
        };
        for chunk in buf.chunks_mut(32) {
            let block = Sha256::new().chain_update(self.seed).chain_update(self.random_counter.to_le_bytes()).finalize();
            self.random_counter += 1;
            chunk.copy_from_slice(&block[..chunk.len()]);
        }
        len as i64
    }
}

fn timespec(a: u64, b: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&a.to_le_bytes());
    t[8..].copy_from_slice(&b.to_le_bytes());
    t
}

fn check(r: i32) -> i64 {
    if r < 0 {
        errno(&std::io::Error::last_os_error())
    } else {
        r as i64
    }
}

fn split_last(rest: &std::ffi::CStr) -> (std::ffi::CString, std::ffi::CString) {
    let s = rest.to_bytes();
    match s.iter().rposition(|&b| b == b'/') {
        Some(i) => (std::ffi::CString::new(&s[..i.max(1)]).unwrap(), std::ffi::CString::new(&s[i + 1..]).unwrap()),
        None => (c".".to_owned(), std::ffi::CString::new(s).unwrap()),
    }
}

fn host_stat(fd: i32, path: &std::ffi::CStr, flags: i32) -> Result<libc::stat, i64> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(fd, path.as_ptr(), &mut st, flags) } < 0 {
        return Err(errno(&std::io::Error::last_os_error()));
    }
    Ok(st)
}

fn fake_stat(mode: u32) -> libc::stat {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    st.st_mode = mode;
    st.st_nlink = 1;
    st.st_blksize = 4096;
    st
}

/// The kernel's `struct stat` (x86-64: the same as libc's), owned by the program's user.
fn write_stat(mem: &Memory, out: u64, mut st: libc::stat) -> i64 {
    st.st_uid = 1000;
    st.st_gid = 1000;
    let bytes = unsafe { std::slice::from_raw_parts(&st as *const libc::stat as *const u8, std::mem::size_of::<libc::stat>()) };
    ret(mem.write(out, bytes), |_| 0)
}
