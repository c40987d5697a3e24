//! The program's files: the buyer's directories mounted at guest paths, and
//! its standard streams. Nothing else of the machine is visible: a path
//! outside every mount does not exist.
//!
//! Paths are resolved lexically against the guest's working directory (`..`
//! never climbs above `/`), matched to the longest mount, and opened with
//! `openat2(RESOLVE_IN_ROOT)` under the mount's directory, so no `..` or
//! symlink inside a mount can lead out of it.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use super::mirror::{Mirror, Need};

/// A buyer directory the program sees.
#[derive(Debug, Clone)]
pub struct Mount {
    /// The directory on the buyer's (or, for local runs, this) machine.
    pub host: PathBuf,
    /// Where the program sees it: an absolute path.
    pub guest: String,
    pub read_only: bool,
}

impl Mount {
    /// Parses `HOST_DIR:GUEST_PATH[:ro]`.
    pub fn parse(spec: &str) -> Result<Mount, String> {
        let (rest, read_only) = match spec.strip_suffix(":ro") {
            Some(r) => (r, true),
            None => (spec.strip_suffix(":rw").unwrap_or(spec), false),
        };
        let Some((host, guest)) = rest.rsplit_once(':') else {
            return Err(format!("--mount {spec}: expected HOST_DIR:GUEST_PATH[:ro]"));
        };
        if !guest.starts_with('/') {
            return Err(format!("--mount {spec}: the guest path must be absolute"));
        }
        let host = PathBuf::from(host);
        if !host.is_dir() {
            return Err(format!("--mount {spec}: {} is not a directory", host.display()));
        }
        Ok(Mount { host, guest: normalize("/", guest), read_only })
    }
}

/// `path` made absolute against `cwd`, with `.` and `..` resolved.
pub(crate) fn normalize(cwd: &str, path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{cwd}/{path}") };
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

pub(crate) enum Handle {
    /// The program's standard input, output or error (0, 1, 2), wherever dup'ed.
    Std(u8),
    Null,
    /// A file or directory in a mount, and the guest path it was opened at
    /// (what `openat` relative to it starts from).
    File { file: File, writable: bool, path: String },
    /// A directory that only exists because mounts lie below it.
    Virtual { path: String, listed: bool },
}

const ENOENT: i64 = -libc::ENOENT as i64;
const EBADF: i64 = -libc::EBADF as i64;
const EROFS: i64 = -libc::EROFS as i64;
const EMFILE: i64 = -libc::EMFILE as i64;

/// The most descriptors a program may hold.
const MAX_FDS: usize = 1024;

pub(crate) struct Files {
    pub stdin: Box<dyn Read + Send>,
    pub stdout: Box<dyn Write + Send>,
    pub stderr: Box<dyn Write + Send>,
    /// Each mount's index (its place in the world's list), the mount, its directory.
    mounts: Vec<(usize, Mount, OwnedFd)>,
    fds: Vec<Option<Handle>>,
    pub cwd: String,
    /// When the mounts are a buyer's directories on another machine.
    pub mirror: Option<Mirror>,
}

pub(crate) fn errno(e: &io::Error) -> i64 {
    -(e.raw_os_error().unwrap_or(libc::EIO) as i64)
}

/// Where a guest path leads.
pub(crate) enum Place<'a> {
    /// Inside a mount: its index, its root, the path below it (relative, maybe "."), read-only or not.
    Mounted { mount: usize, root: &'a OwnedFd, rest: CString, read_only: bool },
    /// A directory above some mount ("/" when "/data" is mounted).
    Above,
    DevNull,
    Nowhere,
    /// The buyer's side could not provide it (an errno).
    Failed(i64),
}

impl Files {
    pub(crate) fn new(mounts: Vec<Mount>, cwd: String, stdin: Box<dyn Read + Send>, stdout: Box<dyn Write + Send>, stderr: Box<dyn Write + Send>) -> io::Result<Files> {
        let mut opened = Vec::new();
        for (i, m) in mounts.into_iter().enumerate() {
            let dir = File::open(&m.host).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", m.host.display())))?;
            opened.push((i, m, OwnedFd::from(dir)));
        }
        // Longest guest path first, so the deepest mount wins.
        opened.sort_by_key(|(_, m, _)| std::cmp::Reverse(m.guest.len()));
        let fds = vec![Some(Handle::Std(0)), Some(Handle::Std(1)), Some(Handle::Std(2))];
        Ok(Files { stdin, stdout, stderr, mounts: opened, fds, cwd, mirror: None })
    }

    /// Where `path` (absolute, normalized) leads, once what `need` requires
    /// of it is here (for a buyer's files on another machine).
    pub(crate) fn place(&mut self, path: &str, need: Need) -> Place<'_> {
        if path == "/dev/null" {
            return Place::DevNull;
        }
        let found = self.mounts.iter().position(|(_, m, _)| {
            path == m.guest || m.guest == "/" || path.strip_prefix(m.guest.as_str()).is_some_and(|r| r.starts_with('/'))
        });
        if let Some(k) = found {
            let (mount, m, _) = &self.mounts[k];
            let rest = path[m.guest.len()..].trim_start_matches('/');
            let rest = if rest.is_empty() { "." } else { rest };
            let Ok(rest) = CString::new(rest) else { return Place::Nowhere };
            let (mount, read_only) = (*mount, m.read_only);
            if let Some(mirror) = &mut self.mirror {
                if let Err(e) = mirror.prepare(mount, rest.to_str().unwrap_or("."), need) {
                    return Place::Failed(e);
                }
            }
            return Place::Mounted { mount, root: &self.mounts[k].2, rest, read_only };
        }
        let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
        if self.mounts.iter().any(|(_, m, _)| m.guest.starts_with(&prefix)) {
            return Place::Above;
        }
        Place::Nowhere
    }

    /// Where each mount appears to the program.
    pub(crate) fn mount_points(&self) -> Vec<String> {
        self.mounts.iter().map(|(_, m, _)| m.guest.clone()).collect()
    }

    /// Takes `n` bytes of the disk a run on a seller may fill.
    pub(crate) fn charge(&mut self, n: u64) -> Result<(), i64> {
        match &mut self.mirror {
            Some(mirror) => mirror.charge(n),
            None => Ok(()),
        }
    }

    pub(crate) fn get(&mut self, fd: u64) -> Result<&mut Handle, i64> {
        // Descriptors are C ints: only the low 32 bits of the register count.
        self.fds.get_mut(fd as u32 as usize).and_then(|h| h.as_mut()).ok_or(EBADF)
    }

    pub(crate) fn install(&mut self, h: Handle, min: usize) -> i64 {
        let free = (min..self.fds.len()).find(|&i| self.fds[i].is_none());
        match free {
            Some(i) => {
                self.fds[i] = Some(h);
                i as i64
            }
            None if self.fds.len() < MAX_FDS => {
                while self.fds.len() < min {
                    self.fds.push(None);
                }
                self.fds.push(Some(h));
                (self.fds.len() - 1) as i64
            }
            None => EMFILE,
        }
    }

    pub(crate) fn close(&mut self, fd: u64) -> i64 {
        match self.fds.get_mut(fd as u32 as usize).and_then(|h| h.take()) {
            Some(_) => 0,
            None => EBADF,
        }
    }

    /// A second descriptor for the same open file.
    pub(crate) fn duplicate(&mut self, fd: u64) -> Result<Handle, i64> {
        Ok(match self.get(fd)? {
            Handle::File { file, writable, path } => Handle::File { file: file.try_clone().map_err(|e| errno(&e))?, writable: *writable, path: path.clone() },
            Handle::Virtual { path, .. } => Handle::Virtual { path: path.clone(), listed: false },
            Handle::Null => Handle::Null,
            Handle::Std(n) => Handle::Std(*n),
        })
    }

    pub(crate) fn dup_to(&mut self, fd: u64, to: u64) -> i64 {
        let to = to as u32 as u64;
        if to as usize >= MAX_FDS {
            return EBADF;
        }
        if fd == to {
            return if self.get(fd).is_ok() { to as i64 } else { EBADF };
        }
        let h = match self.duplicate(fd) {
            Ok(h) => h,
            Err(e) => return e,
        };
        while self.fds.len() <= to as usize {
            self.fds.push(None);
        }
        self.fds[to as usize] = Some(h);
        to as i64
    }

    /// Opens `path` (absolute, normalized) with open(2) `flags` and `mode`.
    pub(crate) fn open(&mut self, path: &str, flags: u64, mode: u64) -> i64 {
        let access = flags & libc::O_ACCMODE as u64;
        let writes = access != libc::O_RDONLY as u64 || flags & (libc::O_CREAT | libc::O_TRUNC) as u64 != 0;
        let truncates = flags & libc::O_TRUNC as u64 != 0 && access != libc::O_RDONLY as u64;
        let handle = match self.place(path, Need::Open { writes, truncates }) {
            Place::Failed(e) => return e,
            Place::Nowhere => return ENOENT,
            Place::DevNull => Handle::Null,
            Place::Above if writes => return -libc::EISDIR as i64,
            Place::Above => Handle::Virtual { path: path.to_string(), listed: false },
            Place::Mounted { read_only: true, .. } if writes => return EROFS,
            Place::Mounted { root, rest, .. } => {
                // The program's flags, less those that would reach past its files.
                let allowed = (libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_APPEND | libc::O_DIRECTORY | libc::O_NOFOLLOW) as u64;
                let flags = flags & allowed;
                let fd = match open_beneath_mode(root.as_raw_fd(), &rest, flags, mode & 0o777) {
                    Ok(fd) => fd,
                    Err(e) => return e,
                };
                Handle::File { file: File::from(fd), writable: access != libc::O_RDONLY as u64, path: path.to_string() }
            }
        };
        self.install(handle, 0)
    }
}

/// The kernel's `struct open_how` (libc's cannot be built outside libc).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(root, rest, RESOLVE_IN_ROOT)`: nothing outside `root` is reachable,
/// whatever `..` or symlinks `rest` holds.
pub(crate) fn open_beneath(root: i32, rest: &std::ffi::CStr, flags: u64) -> Result<OwnedFd, i64> {
    open_beneath_mode(root, rest, flags, 0)
}

fn open_beneath_mode(root: i32, rest: &std::ffi::CStr, flags: u64, mode: u64) -> Result<OwnedFd, i64> {
    let creates = flags & (libc::O_CREAT | libc::O_TMPFILE) as u64 != 0;
    let how = OpenHow { flags: flags | libc::O_CLOEXEC as u64, mode: if creates { mode } else { 0 }, resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS };
    let fd = unsafe { libc::syscall(libc::SYS_openat2, root, rest.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>()) };
    if fd < 0 {
        return Err(errno(&io::Error::last_os_error()));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
