//! The buyer's side of a run on a seller: answers the seller's listings and
//! reads from the buyer's mounted directories, and applies what the program
//! changed. A seller is a stranger: every path it names is resolved with
//! `openat2(RESOLVE_IN_ROOT)` under the mount, so nothing outside it is ever
//! read, listed or touched, and a read-only mount is never changed.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::files::{open_beneath, Mount};
use super::mirror::{Entry, Fetch};

const EINVAL: i32 = libc::EINVAL;
const EROFS: i32 = libc::EROFS;

/// The buyer's directories, as a seller may reach them.
pub struct Share {
    mounts: Vec<(Mount, OwnedFd)>,
    /// Tells this machine's inode numbers from another's in file versions.
    machine: Vec<u8>,
}

fn code(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A path a seller names: below the mount's root, `/`-separated, "" for the root.
fn relative(path: &str) -> Result<CString, i32> {
    if path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(EINVAL);
    }
    CString::new(if path.is_empty() { "." } else { path }).map_err(|_| EINVAL)
}

/// The parent of a non-empty path and its last name.
fn split(path: &str) -> Result<(&str, CString), i32> {
    relative(path)?;
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    // Never "..": removing "dir/.." would remove what holds the mount.
    if name.is_empty() || name == "." || name == ".." {
        return Err(EINVAL);
    }
    Ok((parent, CString::new(name).map_err(|_| EINVAL)?))
}

fn check(r: libc::c_int) -> Result<(), i32> {
    if r < 0 {
        Err(code(&io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

impl Share {
    pub fn new(mounts: &[Mount]) -> io::Result<Share> {
        let mut opened = Vec::new();
        for m in mounts {
            let dir = File::open(&m.host).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", m.host.display())))?;
            opened.push((m.clone(), OwnedFd::from(dir)));
        }
        let machine = std::fs::read("/etc/machine-id").unwrap_or_default();
        Ok(Share { mounts: opened, machine })
    }

    fn root(&self, mount: usize) -> Result<&(Mount, OwnedFd), i32> {
        self.mounts.get(mount).ok_or(EINVAL)
    }

    fn open(&self, mount: usize, path: &str, flags: i32) -> Result<OwnedFd, i32> {
        let (_, root) = self.root(mount)?;
        open_beneath(root.as_raw_fd(), &relative(path)?, flags as u64).map_err(|e| -e as i32)
    }

    /// A writable mount's directory `path`, made if missing (with its parents).
    fn make_dirs(&self, mount: usize, path: &str, mode: u32) -> Result<OwnedFd, i32> {
        let (m, root) = self.root(mount)?;
        if m.read_only {
            return Err(EROFS);
        }
        let mut dir = open_beneath(root.as_raw_fd(), c".", (libc::O_PATH | libc::O_DIRECTORY) as u64).map_err(|e| -e as i32)?;
        let mut so_far = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            so_far = if so_far.is_empty() { part.to_string() } else { format!("{so_far}/{part}") };
            let flags = (libc::O_PATH | libc::O_DIRECTORY) as u64;
            dir = match open_beneath(root.as_raw_fd(), &relative(&so_far)?, flags) {
                Ok(d) => d,
                Err(e) if e == -libc::ENOENT as i64 => {
                    let name = CString::new(part).map_err(|_| EINVAL)?;
                    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode & 0o777) })?;
                    open_beneath(root.as_raw_fd(), &relative(&so_far)?, flags).map_err(|e| -e as i32)?
                }
                Err(e) => return Err(-e as i32),
            };
        }
        Ok(dir)
    }

    /// The entries of directory `path` of mount `mount`. Symbolic links are
    /// followed inside the mount (one that leads out of it is left out).
    pub fn list(&self, mount: usize, path: &str) -> Result<Vec<Entry>, i32> {
        let dir = self.open(mount, path, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let names = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(|e| code(&e))?;
        let mut out = Vec::new();
        for name in names.flatten() {
            let Some(name) = name.file_name().to_str().map(str::to_string) else { continue };
            let full = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
            let Ok(fd) = self.open(mount, &full, libc::O_PATH) else { continue };
            let Ok(meta) = File::from(fd).metadata() else { continue };
            if !meta.is_dir() && !meta.is_file() {
                continue;
            }
            let mut version = self.machine.clone();
            for n in [meta.dev(), meta.ino(), meta.size(), meta.mtime_nsec() as u64, meta.mtime() as u64, meta.ctime() as u64, meta.ctime_nsec() as u64] {
                version.extend_from_slice(&n.to_le_bytes());
            }
            out.push(Entry {
                name,
                dir: meta.is_dir(),
                size: if meta.is_dir() { 0 } else { meta.size() },
                mode: meta.mode() & 0o777,
                mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
                version,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// File `path` of mount `mount`, to read.
    pub fn read(&self, mount: usize, path: &str) -> Result<File, i32> {
        let file = File::from(self.open(mount, path, libc::O_RDONLY)?);
        match file.metadata() {
            Ok(m) if m.is_file() => Ok(file),
            Ok(m) if m.is_dir() => Err(libc::EISDIR),
            Ok(_) => Err(EINVAL),
            Err(e) => Err(code(&e)),
        }
    }

    /// Makes directory `path` (and its parents) in a writable mount.
    pub fn make_dir(&self, mount: usize, path: &str, mode: u32) -> Result<(), i32> {
        split(path)?;
        self.make_dirs(mount, path, mode).map(drop)
    }

    /// Removes `path` (a file, or a directory and all it holds) from a writable mount.
    pub fn remove(&self, mount: usize, path: &str) -> Result<(), i32> {
        let (parent, name) = split(path)?;
        let (m, _) = self.root(mount)?;
        if m.read_only {
            return Err(EROFS);
        }
        let dir = match self.open(mount, parent, libc::O_PATH | libc::O_DIRECTORY) {
            Ok(d) => d,
            Err(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        match check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }) {
            Ok(()) | Err(libc::ENOENT) => Ok(()),
            // The directory is reached through our own descriptor of its parent;
            // remove_dir_all never follows a link out of it.
            Err(libc::EISDIR) => std::fs::remove_dir_all(format!("/proc/self/fd/{}/{}", dir.as_raw_fd(), name.to_string_lossy())).map_err(|e| code(&e)),
            Err(e) => Err(e),
        }
    }

    /// Starts replacing file `path` of a writable mount: the content goes to
    /// a temporary file beside it, which takes its place on [`Incoming::finish`].
    pub fn write(&self, mount: usize, path: &str, mode: u32) -> Result<Incoming, i32> {
        let (parent, name) = split(path)?;
        let dir = self.make_dirs(mount, parent, 0o755)?;
        let temp = CString::new(format!(".{}.cpushare-part", name.to_string_lossy())).map_err(|_| EINVAL)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = unsafe { libc::openat(dir.as_raw_fd(), temp.as_ptr(), flags, mode & 0o777) };
        check(fd)?;
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Incoming { file, dir, temp, name })
    }
}

/// A changed file arriving from the seller.
pub struct Incoming {
    file: File,
    dir: OwnedFd,
    temp: CString,
    name: CString,
}

impl Incoming {
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.file.write_all(data)
    }

    /// Puts the file in place (atomically: a reader sees the old or the new).
    pub fn finish(self) -> Result<(), i32> {
        check(unsafe { libc::renameat(self.dir.as_raw_fd(), self.temp.as_ptr(), self.dir.as_raw_fd(), self.name.as_ptr()) })
    }

    /// Gives up: the old file stays.
    pub fn abandon(self) {
        unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.temp.as_ptr(), 0) };
    }
}

/// A seller and its buyer in one process (tests, benchmarks): the mirror
/// reaches the share directly instead of over a relay.
impl Fetch for Share {
    fn list(&mut self, mount: usize, path: &str) -> Result<Vec<Entry>, i32> {
        Share::list(self, mount, path)
    }

    fn read(&mut self, mount: usize, path: &str, to: &mut File, limit: u64) -> Result<u64, i32> {
        let file = Share::read(self, mount, path)?;
        io::copy(&mut io::Read::take(file, limit), to).map_err(|e| code(&e))
    }
}

impl Share {
    /// Applies one change the program made (the file's content in `data`).
    pub fn apply(&self, mount: usize, path: &str, state: &super::mirror::Changed) -> Result<(), i32> {
        use super::mirror::Changed;
        match state {
            Changed::Gone => self.remove(mount, path),
            Changed::Dir { mode } => self.make_dir(mount, path, *mode),
            Changed::File { mode, file } => {
                let mut incoming = self.write(mount, path, *mode)?;
                let mut from = file;
                match io::copy(&mut from, &mut incoming.file) {
                    Ok(_) => incoming.finish(),
                    Err(e) => {
                        incoming.abandon();
                        Err(code(&e))
                    }
                }
            }
        }
    }
}
