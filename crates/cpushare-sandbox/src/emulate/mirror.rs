//! The seller's copy of a buyer's directories, filled on demand.
//!
//! When the program runs on a seller, its mounts are the buyer's directories
//! on another machine. Each mount gets a local directory here that starts
//! empty and is filled as the program reaches into it: a directory is listed
//! (one round trip) the first time a path goes through it, its files appear
//! as sparse placeholders of the right size, mode and time, and a file's
//! content is fetched (one streamed transfer) the first time it is opened.
//! From then on the program works on local files at local speed, through the
//! same `openat2(RESOLVE_IN_ROOT)` code as a local run.
//!
//! Every path the program changes is remembered; when it ends, [`Mirror::changes`]
//! gives the final state of each (a file's content, a directory, or gone) to
//! send back to the buyer. Read-only mounts can be served from a cache kept
//! between leases, keyed by the buyer's account and the file's version, so a
//! buyer's big input crosses the network once per seller.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// A file or directory in a listing of a buyer's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub dir: bool,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub mtime_ns: i64,
    /// Changes whenever the file's content may have (the buyer's choice of
    /// inode, size and times): what the cache is keyed by.
    pub version: Vec<u8>,
}

/// How the seller reaches the buyer's files: over the lease's relay, or in
/// tests over a direct call.
pub trait Fetch: Send {
    /// The entries of directory `path` ("" is the mount's root) of mount `mount`.
    fn list(&mut self, mount: usize, path: &str) -> Result<Vec<Entry>, i32>;
    /// Writes the content of file `path` of mount `mount` into `to`, at most
    /// `limit` bytes; returns how many were written.
    fn read(&mut self, mount: usize, path: &str, to: &mut File, limit: u64) -> Result<u64, i32>;
}

/// Where read-only files are kept between leases.
#[derive(Debug, Clone)]
pub struct Cache {
    pub dir: PathBuf,
    /// Whose files these are (the buyer's account, as the exchange says): one
    /// buyer can never be served another's.
    pub scope: Vec<u8>,
}

/// The buyer's files, seen from a seller.
pub struct Remote {
    pub fetch: Box<dyn Fetch>,
    pub cache: Option<Cache>,
    /// Disk the run may fill here: fetched content and the program's writes.
    pub disk_bytes: u64,
    /// Ends the run from elsewhere (the lease ended, the buyer went away).
    pub stop: Stopper,
}

/// Kills a run's jail from another thread: at once if it is running, as soon
/// as it starts otherwise.
#[derive(Clone, Default)]
pub struct Stopper(Arc<Mutex<(bool, Option<libc::pid_t>)>>);

impl Stopper {
    pub fn stop(&self) {
        let mut s = self.0.lock().unwrap();
        s.0 = true;
        if let Some(pid) = s.1 {
            // Not yet reaped (see `started` and `ended`), so still the jail.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    pub(crate) fn started(&self, pid: libc::pid_t) {
        let mut s = self.0.lock().unwrap();
        s.1 = Some(pid);
        if s.0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }

    /// Before the jail is reaped: its pid may be reused afterwards.
    pub(crate) fn ended(&self) {
        self.0.lock().unwrap().1 = None;
    }
}

/// The final state of a path the program changed, to send back.
#[derive(Debug)]
pub struct Change {
    /// The mount's index in [`super::World::mounts`].
    pub mount: usize,
    /// Below the mount's root, `/`-separated; never empty.
    pub path: String,
    pub state: Changed,
}

#[derive(Debug)]
pub enum Changed {
    Gone,
    Dir { mode: u32 },
    File { mode: u32, file: File },
}

/// What a call is about to do with a path: how much of it must be here first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Its metadata (stat, access, chdir).
    Look,
    /// Opening it; a file's content is needed unless it is truncated.
    Open { writes: bool, truncates: bool },
    /// Creating or removing it (mkdir, unlink, rmdir, the target of rename).
    Change,
    /// Renaming it away: everything below it comes along.
    Move,
}

const EIO: i32 = libc::EIO;
const ENOSPC: i32 = libc::ENOSPC;
/// The most entries one listing may add.
const MAX_ENTRIES: usize = 100_000;
/// What one listed entry counts against the run's disk allowance.
const ENTRY_COST: u64 = 4096;

pub(crate) struct Mirror {
    remote: Remote,
    /// Per mount: its local directory and whether it is read-only.
    roots: Vec<(PathBuf, bool)>,
    /// Directories that exist on the buyer's side and have not been listed.
    unlisted: HashSet<(usize, String)>,
    /// Files here as placeholders only.
    shadows: HashMap<(usize, String), Entry>,
    /// Paths the program changed.
    dirty: BTreeSet<(usize, String)>,
    disk_left: u64,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// A name a buyer's listing may hold: one path component.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && name.len() <= 255 && !name.contains(['/', '\0']) && !name.starts_with(TEMP_PREFIX)
}

/// Content being fetched lands in a file named so first.
const TEMP_PREFIX: &str = ".cpushare-fetch-";

impl Mirror {
    /// `roots`: each mount's (empty) local directory and whether it is read-only.
    pub(crate) fn stopper(&self) -> Stopper {
        self.remote.stop.clone()
    }

    pub(crate) fn new(remote: Remote, roots: Vec<(PathBuf, bool)>) -> Mirror {
        let unlisted = (0..roots.len()).map(|m| (m, String::new())).collect();
        let disk_left = remote.disk_bytes;
        Mirror { remote, roots, unlisted, shadows: HashMap::new(), dirty: BTreeSet::new(), disk_left }
    }

    fn local(&self, m: usize, path: &str) -> PathBuf {
        if path.is_empty() {
            self.roots[m].0.clone()
        } else {
            self.roots[m].0.join(path)
        }
    }

    /// Takes `n` bytes of the run's disk allowance.
    pub(crate) fn charge(&mut self, n: u64) -> Result<(), i64> {
        self.disk_left = self.disk_left.checked_sub(n).ok_or(-(ENOSPC as i64))?;
        Ok(())
    }

    /// Makes what `need` requires of `path` (below mount `m`'s root, "." for
    /// the root itself) present here.
    pub(crate) fn prepare(&mut self, m: usize, path: &str, need: Need) -> Result<(), i64> {
        let path = if path == "." { "" } else { path };
        let parts: Vec<&str> = if path.is_empty() { Vec::new() } else { path.split('/').collect() };
        let mut dir = String::new();
        self.list(m, &dir)?;
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            dir = join(&dir, part);
            self.list(m, &dir)?;
        }
        let writable = !self.roots[m].1;
        match need {
            Need::Look => {}
            Need::Open { writes, truncates } => {
                self.list(m, path)?;
                if truncates {
                    self.shadows.remove(&(m, path.to_string()));
                } else {
                    self.content(m, path)?;
                }
                if writes && writable {
                    self.dirty.insert((m, path.to_string()));
                }
            }
            Need::Change => {
                // rmdir must see what the directory holds.
                self.list(m, path)?;
                self.shadows.remove(&(m, path.to_string()));
                if writable {
                    self.dirty.insert((m, path.to_string()));
                }
            }
            Need::Move => {
                self.everything(m, path)?;
                if writable {
                    self.dirty.insert((m, path.to_string()));
                }
            }
        }
        Ok(())
    }

    /// After a rename to `path`: it and everything below it changed.
    pub(crate) fn moved(&mut self, m: usize, path: &str) {
        if self.roots[m].1 {
            return;
        }
        let mut stack = vec![path.to_string()];
        while let Some(p) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(self.local(m, &p)) {
                stack.extend(entries.flatten().map(|e| join(&p, &e.file_name().to_string_lossy())));
            }
            self.dirty.insert((m, p));
        }
    }

    /// Lists directory `dir` if it is still unlisted: its subdirectories and
    /// placeholders for its files appear here.
    fn list(&mut self, m: usize, dir: &str) -> Result<(), i64> {
        let key = (m, dir.to_string());
        if !self.unlisted.contains(&key) {
            return Ok(());
        }
        let entries = self.remote.fetch.list(m, dir).map_err(|e| -(e as i64))?;
        // Each entry costs an inode here: counted as a block of the run's disk.
        self.charge(ENTRY_COST * entries.len().min(MAX_ENTRIES) as u64)?;
        self.unlisted.remove(&key);
        let local = self.local(m, dir);
        for e in entries.into_iter().take(MAX_ENTRIES) {
            if !valid_name(&e.name) {
                continue;
            }
            let path = join(dir, &e.name);
            let at = local.join(&e.name);
            if e.dir {
                // Writable by us so that listing it later can fill it.
                if std::fs::create_dir(&at).is_ok() {
                    let _ = std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o700 | (e.mode & 0o777)));
                    self.unlisted.insert((m, path));
                }
            } else if placeholder(&at, &e).is_ok() {
                self.shadows.insert((m, path), e);
            }
        }
        Ok(())
    }

    /// Fetches file `path`'s content if only its placeholder is here.
    fn content(&mut self, m: usize, path: &str) -> Result<(), i64> {
        let key = (m, path.to_string());
        let Some(entry) = self.shadows.remove(&key) else { return Ok(()) };
        let result = self.fill(m, path, &entry);
        if result.is_err() {
            self.shadows.insert(key, entry);
        }
        result
    }

    fn fill(&mut self, m: usize, path: &str, entry: &Entry) -> Result<(), i64> {
        let at = self.local(m, path);
        let temp = at.with_file_name(format!("{TEMP_PREFIX}{}", std::process::id()));
        let cached = match (&self.remote.cache, self.roots[m].1) {
            (Some(cache), true) => Some(cache_path(cache, m, path, entry)),
            _ => None,
        };
        if let Some(cached) = &cached {
            if cached.exists() {
                // Same inode, shared with the cache: the mount is read-only.
                let _ = std::fs::remove_file(&at);
                if std::fs::hard_link(cached, &at).is_ok() || std::fs::copy(cached, &at).is_ok() {
                    finish(&at, entry);
                    return Ok(());
                }
            }
        }
        self.charge(entry.size)?;
        let into = match &cached {
            Some(c) => c.with_extension(format!("part{}", std::process::id())),
            None => temp.clone(),
        };
        let written = (|| {
            let mut file = File::create(&into).map_err(|e| errno(&e))?;
            // Its blocks at once rather than page by page as it arrives.
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, entry.size as libc::off_t) };
            let n = self.remote.fetch.read(m, path, &mut file, entry.size).map_err(|e| -(e as i64))?;
            file.set_len(n).map_err(|e| errno(&e))?;
            Ok::<_, i64>(n)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&into);
            return Err(e);
        }
        let placed = match &cached {
            Some(c) => std::fs::rename(&into, c).and_then(|_| {
                let _ = std::fs::remove_file(&at);
                std::fs::hard_link(c, &at).or_else(|_| std::fs::copy(c, &at).map(|_| ()))
            }),
            None => std::fs::rename(&into, &at),
        };
        placed.map_err(|e| errno(&e))?;
        finish(&at, entry);
        Ok(())
    }

    /// Lists and fetches everything below `path` (for a rename that moves it).
    fn everything(&mut self, m: usize, path: &str) -> Result<(), i64> {
        self.content(m, path)?;
        self.list(m, path)?;
        let below: Vec<String> = self
            .shadows
            .keys()
            .chain(self.unlisted.iter())
            .filter(|(k, p)| *k == m && p.starts_with(path) && p[path.len()..].starts_with('/'))
            .map(|(_, p)| p.clone())
            .collect();
        for p in below {
            self.everything(m, &p)?;
        }
        Ok(())
    }

    /// The final state of every path the program changed: directories to
    /// make first (shallowest first), then files, then what is gone
    /// (deepest first).
    pub(crate) fn changes(self) -> Vec<Change> {
        let mut out = Vec::new();
        for (m, path) in self.dirty {
            if path.is_empty() {
                continue;
            }
            let at = self.roots[m].0.join(&path);
            let state = match std::fs::symlink_metadata(&at) {
                Ok(meta) if meta.is_dir() => Changed::Dir { mode: meta.permissions().mode() & 0o777 },
                Ok(meta) if meta.is_file() => match File::open(&at) {
                    Ok(file) => Changed::File { mode: meta.permissions().mode() & 0o777, file },
                    Err(_) => continue,
                },
                Ok(_) => continue,
                Err(_) => Changed::Gone,
            };
            out.push(Change { mount: m, path, state });
        }
        let depth = |c: &Change| c.path.matches('/').count();
        out.sort_by_key(|c| match c.state {
            Changed::Dir { .. } => (0, depth(c) as i64),
            Changed::File { .. } => (1, 0),
            Changed::Gone => (2, -(depth(c) as i64)),
        });
        out
    }
}

fn errno(e: &io::Error) -> i64 {
    -(e.raw_os_error().unwrap_or(EIO) as i64)
}

/// A sparse file with `entry`'s size, mode and time: stat sees the buyer's file.
fn placeholder(at: &Path, entry: &Entry) -> io::Result<()> {
    let file = File::create_new(at)?;
    file.set_len(entry.size)?;
    drop(file);
    finish(at, entry);
    Ok(())
}

fn finish(at: &Path, entry: &Entry) {
    if let Ok(file) = File::options().write(true).open(at).or_else(|_| File::open(at)) {
        let _ = file.set_modified(UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns.max(0) as u64));
    }
    let _ = std::fs::set_permissions(at, std::fs::Permissions::from_mode(entry.mode & 0o777));
}

/// Where a read-only file of this buyer, at this version, is cached.
fn cache_path(cache: &Cache, m: usize, path: &str, entry: &Entry) -> PathBuf {
    let mut h = Sha256::new();
    for part in [&cache.scope[..], &(m as u64).to_le_bytes(), path.as_bytes(), &entry.version] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    let name: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    cache.dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_single_components_are_names() {
        for bad in ["", ".", "..", "a/b", "/", "a\0b", ".cpushare-fetch-1"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("data.csv") && valid_name("..hidden"));
    }
}
