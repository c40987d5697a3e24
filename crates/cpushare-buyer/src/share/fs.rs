//! The exported directories as an NFSv3 file system, confined: every path is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the
//! export's directory, and every name a guest sends is one component, so no
//! `..`, absolute path or symlink (made by a guest, or swapped in on the
//! host mid-call) reaches anything outside. Guests resolve symlinks
//! themselves, in their own file system, as NFS clients do; the server never
//! follows one.
//!
//! The guest is root in its VM; here it is the buyer's own user, and sees
//! every file as root's (so `cp -p` and `tar` work): ownership changes are
//! ignored, and set-user-id, set-group-id and sticky bits are never set.

use std::ffi::CStr;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use nfs3_server::nfs3_types::nfs3::{createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime, set_mtime, specdata3, stable_how, Nfs3Option};
use nfs3_server::vfs::{DirEntryPlus, FileHandleU64, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat, Timespec, Timestamps};
use rustix::io::Errno;

use super::tree::{Tree, ROOT};

/// A directory exported under a name.
pub struct Export {
    pub name: String,
    pub dir: OwnedFd,
}

/// The exports as one file system: `/NAME` is export NAME.
pub struct ShareFs {
    exports: Vec<Export>,
    tree: Mutex<Tree>,
    /// The times the list of exports shows.
    started: nfstime3,
}

/// What every open takes: never a symlink, never outside the export.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);
/// The mode bits a guest may set.
const PERMISSIONS: u32 = 0o777;

fn nfs_error(e: Errno) -> nfsstat3 {
    match e {
        Errno::NOENT => nfsstat3::NFS3ERR_NOENT,
        Errno::EXIST => nfsstat3::NFS3ERR_EXIST,
        Errno::NOTDIR => nfsstat3::NFS3ERR_NOTDIR,
        Errno::ISDIR => nfsstat3::NFS3ERR_ISDIR,
        Errno::NOTEMPTY => nfsstat3::NFS3ERR_NOTEMPTY,
        Errno::ACCESS => nfsstat3::NFS3ERR_ACCES,
        Errno::PERM => nfsstat3::NFS3ERR_PERM,
        Errno::NOSPC => nfsstat3::NFS3ERR_NOSPC,
        Errno::DQUOT => nfsstat3::NFS3ERR_DQUOT,
        Errno::ROFS => nfsstat3::NFS3ERR_ROFS,
        Errno::NAMETOOLONG => nfsstat3::NFS3ERR_NAMETOOLONG,
        Errno::XDEV => nfsstat3::NFS3ERR_XDEV,
        Errno::FBIG => nfsstat3::NFS3ERR_FBIG,
        Errno::INVAL => nfsstat3::NFS3ERR_INVAL,
        // A symlink met on the way (RESOLVE_NO_SYMLINKS, O_NOFOLLOW): as if it were not there.
        Errno::LOOP => nfsstat3::NFS3ERR_NOENT,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

/// A name a guest may make or look up: one path component.
fn component<'a>(name: &'a filename3<'_>) -> Result<&'a [u8], nfsstat3> {
    let n: &[u8] = name.as_ref();
    if n.len() > 255 {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    if n.is_empty() || n == b"." || n == b".." || n.contains(&b'/') || n.contains(&0) {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    Ok(n)
}

fn time(seconds: i64, nanos: i64) -> nfstime3 {
    nfstime3 { seconds: seconds.clamp(0, u32::MAX as i64) as u32, nseconds: nanos as u32 }
}

fn attributes(id: u64, st: &Stat) -> fattr3 {
    let type_ = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => ftype3::NF3DIR,
        FileType::Symlink => ftype3::NF3LNK,
        FileType::BlockDevice => ftype3::NF3BLK,
        FileType::CharacterDevice => ftype3::NF3CHR,
        FileType::Socket => ftype3::NF3SOCK,
        FileType::Fifo => ftype3::NF3FIFO,
        _ => ftype3::NF3REG,
    };
    fattr3 {
        type_,
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink as u32,
        uid: 0,
        gid: 0,
        size: st.st_size as u64,
        used: st.st_blocks as u64 * 512,
        rdev: specdata3::default(),
        fsid: 1,
        fileid: id,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
    }
}

/// Where a readdir resumes: a name's fixed hash, so that a listing goes on
/// right even when the entry it stopped at was removed since (as `rm -r` does).
fn cookie(name: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    h.finish() | 1
}

impl ShareFs {
    pub fn new(exports: Vec<Export>) -> ShareFs {
        let tree = Tree::new(exports.iter().map(|e| e.name.as_str()));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        ShareFs { exports, tree: Mutex::new(tree), started: time(now.as_secs() as i64, now.subsec_nanos() as i64) }
    }

    fn tree(&self) -> std::sync::MutexGuard<'_, Tree> {
        self.tree.lock().expect("the share's tree")
    }

    /// Opens `id` with `flags` (never following a symlink, never leaving its export).
    fn open(&self, id: u64, flags: OFlags) -> Result<OwnedFd, nfsstat3> {
        let place = self.tree().place(id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        let root = &self.exports[place.export].dir;
        let mut path = Vec::new();
        for (i, name) in place.path.iter().enumerate() {
            if i > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(name);
        }
        if path.is_empty() {
            path.push(b'.');
        }
        rustix::fs::openat2(root, path.as_slice(), flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty(), RESOLVE).map_err(|e| match e {
            // RESOLVE_BENEATH's answer to a path leaving the export: not there.
            Errno::XDEV => nfsstat3::NFS3ERR_NOENT,
            e => nfs_error(e),
        })
    }

    /// A directory `id` to make, remove or look up names in.
    fn directory(&self, id: u64) -> Result<OwnedFd, nfsstat3> {
        if id == ROOT {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        self.open(id, OFlags::PATH | OFlags::DIRECTORY).map_err(|e| if e == nfsstat3::NFS3ERR_NOENT { nfsstat3::NFS3ERR_STALE } else { e })
    }

    /// A regular file `id`, for reading or writing (a FIFO or device in the share is neither).
    fn regular(&self, id: u64, flags: OFlags) -> Result<File, nfsstat3> {
        if id == ROOT || self.tree().export_root(id).is_some() {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        // O_NONBLOCK: a FIFO in the share neither blocks the open nor is read.
        let file = File::from(self.open(id, flags | OFlags::NONBLOCK)?);
        let st = rustix::fs::fstat(&file).map_err(nfs_error)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(file),
            FileType::Directory => Err(nfsstat3::NFS3ERR_ISDIR),
            _ => Err(nfsstat3::NFS3ERR_INVAL),
        }
    }

    fn root_attributes(&self) -> fattr3 {
        fattr3 {
            type_: ftype3::NF3DIR,
            mode: 0o555,
            nlink: 2 + self.exports.len() as u32,
            uid: 0,
            gid: 0,
            size: 4096,
            used: 4096,
            rdev: specdata3::default(),
            fsid: 1,
            fileid: ROOT,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
        }
    }

    fn stat(&self, id: u64) -> Result<fattr3, nfsstat3> {
        if id == ROOT {
            return Ok(self.root_attributes());
        }
        let o = self.open(id, OFlags::PATH)?;
        Ok(attributes(id, &rustix::fs::fstat(&o).map_err(nfs_error)?))
    }

    /// The name `name` in `dir`: its id and attributes, if it is there.
    fn entry(&self, dir: u64, dirfd: &OwnedFd, name: &[u8]) -> Result<(u64, fattr3), nfsstat3> {
        let st = rustix::fs::statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(nfs_error)?;
        let id = self.tree().child(dir, name).ok_or(nfsstat3::NFS3ERR_STALE)?;
        Ok((id, attributes(id, &st)))
    }

    fn apply(&self, id: u64, set: &sattr3) -> Result<(), nfsstat3> {
        if id == ROOT {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        if let Nfs3Option::Some(size) = set.size {
            self.regular(id, OFlags::WRONLY)?.set_len(size).map_err(|e| nfs_error(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        }
        let o = self.open(id, OFlags::PATH)?;
        let st = rustix::fs::fstat(&o).map_err(nfs_error)?;
        let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        if let Nfs3Option::Some(mode) = set.mode {
            // A symlink's mode means nothing; anything else through its O_PATH descriptor.
            if !is_link {
                let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&o));
                rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(mode & PERMISSIONS)).map_err(nfs_error)?;
            }
        }
        let atime = match set.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW }),
            set_atime::SET_TO_CLIENT_TIME(t) => Some(Timespec { tv_sec: t.seconds as i64, tv_nsec: t.nseconds as _ }),
        };
        let mtime = match set.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW }),
            set_mtime::SET_TO_CLIENT_TIME(t) => Some(Timespec { tv_sec: t.seconds as i64, tv_nsec: t.nseconds as _ }),
        };
        if atime.is_some() || mtime.is_some() {
            let omit = Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT };
            let times = Timestamps { last_access: atime.unwrap_or(omit), last_modification: mtime.unwrap_or(omit) };
            // AT_EMPTY_PATH on the O_PATH descriptor: the object itself, a symlink included.
            rustix::fs::utimensat(&o, c"", &times, AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW).map_err(nfs_error)?;
        }
        // Ownership is the buyer's: uid and gid are not changed (see the module's note).
        Ok(())
    }
}

/// A directory's entries after a cookie, their attributes read as they are listed.
pub struct Listing<'a> {
    fs: &'a ShareFs,
    dir: u64,
    dirfd: Option<OwnedFd>,
    /// (cookie, name), in cookie order.
    names: std::vec::IntoIter<(u64, Vec<u8>)>,
    /// The export names, for the root.
    exports: bool,
}

impl ReadDirPlusIterator<FileHandleU64> for Listing<'_> {
    async fn next(&mut self) -> NextResult<DirEntryPlus<FileHandleU64>> {
        for (cookie, name) in self.names.by_ref() {
            let found = if self.exports {
                let id = self.fs.tree().child(ROOT, &name);
                id.map(|id| (id, self.fs.stat(id))).and_then(|(id, a)| a.ok().map(|a| (id, a)))
            } else {
                self.dirfd.as_ref().and_then(|fd| self.fs.entry(self.dir, fd, &name).ok())
            };
            // Gone since the listing was read: left out.
            let Some((id, attr)) = found else { continue };
            return NextResult::Ok(DirEntryPlus { fileid: id, name: name.into(), cookie, name_attributes: Some(attr), name_handle: Some(FileHandleU64::new(id)) });
        }
        NextResult::Eof
    }
}

impl NfsReadFileSystem for ShareFs {
    type Handle = FileHandleU64;

    fn root_dir(&self) -> FileHandleU64 {
        FileHandleU64::new(ROOT)
    }

    async fn lookup(&self, dirid: &FileHandleU64, filename: &filename3<'_>) -> Result<FileHandleU64, nfsstat3> {
        let dir = dirid.as_u64();
        let name: &[u8] = filename.as_ref();
        if name == b"." {
            return Ok(*dirid);
        }
        if name == b".." {
            return self.tree().parent(dir).map(FileHandleU64::new).ok_or(nfsstat3::NFS3ERR_STALE);
        }
        let name = component(filename)?;
        if dir == ROOT {
            return self.tree().child(ROOT, name).map(FileHandleU64::new).ok_or(nfsstat3::NFS3ERR_NOENT);
        }
        let d = self.directory(dir)?;
        self.entry(dir, &d, name).map(|(id, _)| FileHandleU64::new(id))
    }

    async fn getattr(&self, id: &FileHandleU64) -> Result<fattr3, nfsstat3> {
        self.stat(id.as_u64())
    }

    async fn read(&self, id: &FileHandleU64, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        let file = self.regular(id.as_u64(), OFlags::RDONLY)?;
        let size = file.metadata().map_err(|_| nfsstat3::NFS3ERR_IO)?.len();
        let want = (count as u64).min(size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(nfs_error(Errno::from_io_error(&e).unwrap_or(Errno::IO))),
            }
        }
        buf.truncate(got);
        Ok((buf, offset + got as u64 >= size))
    }

    async fn readdirplus(&self, dirid: &FileHandleU64, after: u64) -> Result<impl ReadDirPlusIterator<FileHandleU64>, nfsstat3> {
        let dir = dirid.as_u64();
        let (dirfd, mut names): (Option<OwnedFd>, Vec<(u64, Vec<u8>)>) = if dir == ROOT {
            (None, self.exports.iter().map(|e| (cookie(e.name.as_bytes()), e.name.as_bytes().to_vec())).collect())
        } else {
            let listed = self.open(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
            let mut names = Vec::new();
            for entry in rustix::fs::Dir::read_from(&listed).map_err(nfs_error)? {
                let entry = entry.map_err(nfs_error)?;
                let name: &CStr = entry.file_name();
                let name = name.to_bytes();
                if name != b"." && name != b".." {
                    names.push((cookie(name), name.to_vec()));
                }
            }
            (Some(self.open(dir, OFlags::PATH | OFlags::DIRECTORY)?), names)
        };
        names.sort_unstable();
        names.retain(|(c, _)| *c > after);
        Ok(Listing { fs: self, dir, dirfd, names: names.into_iter(), exports: dir == ROOT })
    }

    async fn readlink(&self, id: &FileHandleU64) -> Result<nfspath3<'_>, nfsstat3> {
        let o = self.open(id.as_u64(), OFlags::PATH)?;
        // The link's own text (AT_EMPTY_PATH on its O_PATH descriptor): the guest resolves it.
        let target = rustix::fs::readlinkat(&o, c"", Vec::new()).map_err(nfs_error)?;
        Ok(nfspath3::from(target.into_bytes()))
    }
}

impl NfsFileSystem for ShareFs {
    async fn setattr(&self, id: &FileHandleU64, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        self.apply(id.as_u64(), &setattr)?;
        self.stat(id.as_u64())
    }

    async fn write(&self, id: &FileHandleU64, offset: u64, data: &[u8], stable: stable_how) -> Result<(fattr3, stable_how), nfsstat3> {
        let file = self.regular(id.as_u64(), OFlags::WRONLY)?;
        file.write_all_at(data, offset).map_err(|e| nfs_error(Errno::from_io_error(&e).unwrap_or(Errno::IO)))?;
        // What the guest asked to be stable is on the buyer's disk before the answer.
        if stable != stable_how::UNSTABLE {
            file.sync_data().map_err(|_| nfsstat3::NFS3ERR_IO)?;
        }
        let st = rustix::fs::fstat(&file).map_err(nfs_error)?;
        Ok((attributes(id.as_u64(), &st), stable))
    }

    async fn create(&self, dirid: &FileHandleU64, filename: &filename3<'_>, attr: sattr3) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let (dir, name) = (dirid.as_u64(), component(filename)?);
        let d = self.directory(dir)?;
        let mode = match attr.mode {
            Nfs3Option::Some(m) => m & PERMISSIONS,
            Nfs3Option::None => 0o644,
        };
        // An unchecked create of an existing file opens it (NFSv3 UNCHECKED); a symlink there is refused.
        let fd = rustix::fs::openat(&d, name, OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::from_raw_mode(mode)).map_err(nfs_error)?;
        if FileType::from_raw_mode(rustix::fs::fstat(&fd).map_err(nfs_error)?.st_mode) != FileType::RegularFile {
            return Err(nfsstat3::NFS3ERR_EXIST);
        }
        drop(fd);
        let (id, _) = self.entry(dir, &d, name)?;
        let rest = sattr3 { mode: Nfs3Option::None, ..attr };
        self.apply(id, &rest)?;
        Ok((FileHandleU64::new(id), self.stat(id)?))
    }

    async fn create_exclusive(&self, dirid: &FileHandleU64, filename: &filename3<'_>, _verf: createverf3) -> Result<FileHandleU64, nfsstat3> {
        let (dir, name) = (dirid.as_u64(), component(filename)?);
        let d = self.directory(dir)?;
        rustix::fs::openat(&d, name, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC, Mode::from_raw_mode(0o644)).map_err(nfs_error)?;
        self.entry(dir, &d, name).map(|(id, _)| FileHandleU64::new(id))
    }

    async fn mkdir(&self, dirid: &FileHandleU64, dirname: &filename3<'_>) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let (dir, name) = (dirid.as_u64(), component(dirname)?);
        let d = self.directory(dir)?;
        rustix::fs::mkdirat(&d, name, Mode::from_raw_mode(0o755)).map_err(nfs_error)?;
        self.entry(dir, &d, name).map(|(id, a)| (FileHandleU64::new(id), a))
    }

    async fn remove(&self, dirid: &FileHandleU64, filename: &filename3<'_>) -> Result<(), nfsstat3> {
        let (dir, name) = (dirid.as_u64(), component(filename)?);
        let d = self.directory(dir)?;
        let st = rustix::fs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW).map_err(nfs_error)?;
        let flags = if FileType::from_raw_mode(st.st_mode) == FileType::Directory { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        rustix::fs::unlinkat(&d, name, flags).map_err(nfs_error)?;
        self.tree().forget(dir, name);
        Ok(())
    }

    async fn rename<'a>(&self, from_dirid: &FileHandleU64, from_filename: &filename3<'a>, to_dirid: &FileHandleU64, to_filename: &filename3<'a>) -> Result<(), nfsstat3> {
        let (from, name) = (from_dirid.as_u64(), component(from_filename)?);
        let (to, to_name) = (to_dirid.as_u64(), component(to_filename)?);
        let (fd, td) = (self.directory(from)?, self.directory(to)?);
        rustix::fs::renameat(&fd, name, &td, to_name).map_err(nfs_error)?;
        self.tree().rename(from, name, to, to_name);
        Ok(())
    }

    async fn symlink<'a>(&self, dirid: &FileHandleU64, linkname: &filename3<'a>, symlink: &nfspath3<'a>, _attr: &sattr3) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let (dir, name) = (dirid.as_u64(), component(linkname)?);
        let target: &[u8] = symlink.as_ref();
        if target.is_empty() || target.contains(&0) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let d = self.directory(dir)?;
        // Any text may be a link's: only guests ever follow it, in their own file system.
        rustix::fs::symlinkat(target, &d, name).map_err(nfs_error)?;
        self.entry(dir, &d, name).map(|(id, a)| (FileHandleU64::new(id), a))
    }

    async fn commit(&self, id: &FileHandleU64, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        // A guest's fsync: what it wrote is on the buyer's disk before the answer.
        self.regular(id.as_u64(), OFlags::RDONLY)?.sync_data().map_err(|_| nfsstat3::NFS3ERR_IO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(dir: &std::path::Path) -> ShareFs {
        let fd = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap();
        ShareFs::new(vec![Export { name: "data".into(), dir: fd }])
    }

    fn name(s: &str) -> filename3<'_> {
        filename3::from(s.as_bytes())
    }

    async fn export(fs: &ShareFs) -> FileHandleU64 {
        fs.lookup(&fs.root_dir(), &name("data")).await.unwrap()
    }

    #[tokio::test]
    async fn files_made_through_the_share_are_the_buyers_under_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fs = share(dir.path());
        let root = export(&fs).await;
        let (sub, attr) = fs.mkdir(&root, &name("out")).await.unwrap();
        assert_eq!(attr.type_, ftype3::NF3DIR);
        let set = sattr3 { mode: Nfs3Option::Some(0o4755), ..Default::default() };
        let (f, _) = fs.create(&sub, &name("a.txt"), set).await.unwrap();
        let (attr, stable) = fs.write(&f, 0, b"hello from a VM", stable_how::FILE_SYNC).await.unwrap();
        assert_eq!((attr.size, stable), (15, stable_how::FILE_SYNC));
        assert_eq!((attr.uid, attr.gid), (0, 0), "guests see their files as root's");
        assert_eq!(std::fs::read(dir.path().join("out/a.txt")).unwrap(), b"hello from a VM");
        let meta = std::fs::metadata(dir.path().join("out/a.txt")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(meta.uid(), unsafe { libc::getuid() }, "owned by the buyer's user");
        assert_eq!(meta.permissions().mode() & 0o7000, 0, "no set-user-id bit reaches the buyer's disk");
        assert_eq!(fs.read(&f, 6, 100).await.unwrap(), (b"from a VM".to_vec(), true));
        assert_eq!(fs.read(&f, 0, 5).await.unwrap(), (b"hello".to_vec(), false));
        // Renamed, its handle still reads it; removed, it is gone.
        fs.rename(&sub, &name("a.txt"), &root, &name("b.txt")).await.unwrap();
        assert_eq!(fs.read(&f, 0, 5).await.unwrap().0, b"hello");
        assert!(dir.path().join("b.txt").exists());
        fs.remove(&root, &name("b.txt")).await.unwrap();
        assert!(!dir.path().join("b.txt").exists());
        assert_eq!(fs.read(&f, 0, 5).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
    }

    #[tokio::test]
    async fn listings_page_on_and_the_root_lists_the_exports() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let fs = share(dir.path());
        let root = export(&fs).await;
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let mut page = fs.readdirplus(&root, after).await.unwrap();
            let mut n = 0;
            while let NextResult::Ok(e) = page.next().await {
                after = e.cookie;
                seen.push(String::from_utf8(e.name.as_ref().to_vec()).unwrap());
                // A listing that removes what it listed (rm -r) still goes on.
                std::fs::remove_file(dir.path().join(seen.last().unwrap())).unwrap();
                n += 1;
                if n == 7 {
                    break;
                }
            }
            if n < 7 {
                break;
            }
        }
        seen.sort();
        let mut want: Vec<String> = (0..50).map(|i| format!("f{i}")).collect();
        want.sort();
        assert_eq!(seen, want);
        let top_dir = fs.root_dir();
        let mut top = fs.readdirplus(&top_dir, 0).await.unwrap();
        let NextResult::Ok(e) = top.next().await else { panic!("the root lists its export") };
        assert_eq!(e.name.as_ref(), b"data");
        assert!(matches!(top.next().await, NextResult::Eof));
    }

    #[tokio::test]
    async fn nothing_outside_the_export_is_reached() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"the buyer's other files").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fs = share(dir.path());
        let root = export(&fs).await;
        // Names that are paths.
        for bad in ["../secret", "a/b", "..", "/etc/passwd", ""] {
            let e = fs.create(&root, &name(bad), sattr3::default()).await.unwrap_err();
            assert!(matches!(e, nfsstat3::NFS3ERR_INVAL), "{bad}: {e:?}");
        }
        assert_eq!(fs.lookup(&root, &name("..")).await.unwrap(), root, "the export's .. is itself");
        assert_eq!(fs.lookup(&root, &name("a/../..")).await.unwrap_err(), nfsstat3::NFS3ERR_INVAL);
        // A guest's symlink out: made, read back as text, never followed.
        let target = outside.path().join("secret");
        let (link, attr) = fs.symlink(&root, &name("out"), &nfspath3::from(target.to_str().unwrap().as_bytes()), &sattr3::default()).await.unwrap();
        assert_eq!(attr.type_, ftype3::NF3LNK);
        assert_eq!(fs.readlink(&link).await.unwrap().as_ref(), target.to_str().unwrap().as_bytes());
        assert!(fs.read(&link, 0, 100).await.is_err(), "reading a symlink's handle does not follow it");
        assert!(fs.write(&link, 0, b"x", stable_how::UNSTABLE).await.is_err());
        assert!(fs.setattr(&link, sattr3 { size: Nfs3Option::Some(0), ..Default::default() }).await.is_err());
        assert!(fs.lookup(&link, &name("secret")).await.is_err(), "nor is it a directory to look in");
        assert!(fs.create(&link, &name("x"), sattr3::default()).await.is_err());
        // The buyer's own symlink to a directory outside, in the share: not followed either.
        std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
        let escape = fs.lookup(&root, &name("escape")).await.unwrap();
        assert!(fs.lookup(&escape, &name("secret")).await.is_err());
        assert!(fs.readdirplus(&escape, 0).await.is_err());
        assert!(fs.create(&root, &name("escape"), sattr3::default()).await.is_err(), "a create over a symlink does not write through it");
        // A directory swapped for a symlink under a handle the guest holds.
        let (sub, _) = fs.mkdir(&root, &name("sub")).await.unwrap();
        let (f, _) = fs.create(&sub, &name("secret"), sattr3::default()).await.unwrap();
        std::fs::remove_file(dir.path().join("sub/secret")).unwrap();
        std::fs::remove_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
        assert!(fs.read(&f, 0, 100).await.is_err(), "sub/secret now resolves through a symlink: refused");
        assert!(fs.create(&sub, &name("new"), sattr3::default()).await.is_err());
        // Made-up handles.
        for id in [0, 2 + 1000, u64::MAX] {
            assert_eq!(fs.getattr(&FileHandleU64::new(id)).await.unwrap_err(), nfsstat3::NFS3ERR_STALE);
        }
        // Nothing under the root but the exports, and nothing made there.
        assert!(fs.lookup(&fs.root_dir(), &name("etc")).await.is_err());
        assert!(fs.mkdir(&fs.root_dir(), &name("x")).await.is_err());
        assert_eq!(std::fs::read(outside.path().join("secret")).unwrap(), b"the buyer's other files");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1, "nothing made outside");
    }
}
