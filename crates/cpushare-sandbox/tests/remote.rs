//! The emulated jail as on a seller: the program's mounts start empty and are
//! filled from the buyer's directories as it reaches them (here the buyer is
//! in the same process: the relay is tested end to end in the CLI's tests),
//! and what it changed goes back.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cpushare_sandbox::emulate::share::Share;
use cpushare_sandbox::emulate::{run_emulated_remote, Cache, Changed, EmulatedRun, Entry, Fetch, Mount, Remote, World};
use cpushare_sandbox::{Limits, Options, Program};
use support::{needs, Captured};

mod support;

/// The buyer's share, counting what the seller asked of it.
struct Counting {
    share: Share,
    lists: Arc<AtomicUsize>,
    reads: Arc<Mutex<Vec<String>>>,
}

impl Fetch for Counting {
    fn list(&mut self, mount: usize, path: &str) -> Result<Vec<Entry>, i32> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        Fetch::list(&mut self.share, mount, path)
    }
    fn read(&mut self, mount: usize, path: &str, to: &mut File, limit: u64) -> Result<u64, i32> {
        self.reads.lock().unwrap().push(path.to_string());
        Fetch::read(&mut self.share, mount, path, to, limit)
    }
}

struct Seller {
    /// Where the seller keeps its copy (empty before each run).
    mirror: tempfile::TempDir,
    cache: tempfile::TempDir,
}

struct Ran {
    run: EmulatedRun,
    stdout: String,
    stderr: String,
    lists: usize,
    reads: Vec<String>,
}

/// Runs busybox with `args` on a "seller" whose mounts mirror the buyer's `mounts`.
fn on_seller(busybox: &[u8], args: &[&str], buyer: &[Mount], seller: &Seller, stdin: &[u8]) -> Ran {
    let program = Program::new(busybox).unwrap();
    let local = tempfile::tempdir_in(seller.mirror.path()).unwrap();
    let mut mounts = Vec::new();
    for (i, m) in buyer.iter().enumerate() {
        let dir = local.path().join(i.to_string());
        std::fs::create_dir(&dir).unwrap();
        mounts.push(Mount { host: dir, guest: m.guest.clone(), read_only: m.read_only });
    }
    let (lists, reads) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(Vec::new())));
    let fetch = Counting { share: Share::new(buyer).unwrap(), lists: lists.clone(), reads: reads.clone() };
    let remote = Remote {
        fetch: Box::new(fetch),
        cache: Some(Cache { dir: seller.cache.path().into(), scope: b"account 7".to_vec() }),
        disk_bytes: 1 << 30,
        stop: Default::default(),
    };
    let world = World { cwd: buyer[0].guest.clone(), mounts, ..World::default() };
    let (out, err) = (Captured::default(), Captured::default());
    let limits = Limits { ram_bytes: 512 << 20, ..Limits::default() };
    let run = run_emulated_remote(&program, args, &world, remote, Box::new(std::io::Cursor::new(stdin.to_vec())), Box::new(out.clone()), Box::new(err.clone()), &limits, &Options::default()).unwrap();
    let reads = reads.lock().unwrap().clone();
    Ran { run, stdout: out.text(), stderr: err.text(), lists: lists.load(Ordering::SeqCst), reads }
}

/// Applies a run's changes to the buyer's directories, as `cpushare run` does.
fn send_back(run: &EmulatedRun, buyer: &[Mount]) {
    let share = Share::new(buyer).unwrap();
    for c in &run.changes {
        share.apply(c.mount, &c.path, &c.state).unwrap_or_else(|e| panic!("{}: errno {e}", c.path));
    }
}

fn native(args: &[&str], dir: &Path) -> String {
    let out = Command::new("/usr/bin/busybox").args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn buyer_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..20_000u32 {
        text.push_str(&format!("{} line {} of the buyer's data\n", (i * 7919) % 20_000, i));
    }
    std::fs::write(dir.path().join("data.txt"), &text).unwrap();
    std::fs::create_dir_all(dir.path().join("deep/er")).unwrap();
    std::fs::write(dir.path().join("deep/er/numbers.txt"), "3 4\n10 20\n-1 1\n").unwrap();
    std::fs::write(dir.path().join("unread.bin"), vec![7u8; 1 << 20]).unwrap();
    dir
}

fn seller() -> Seller {
    Seller { mirror: tempfile::tempdir().unwrap(), cache: tempfile::tempdir().unwrap() }
}

#[test]
fn applets_read_the_buyers_files_fetched_on_demand() {
    let Some(busybox) = needs("/usr/bin/busybox") else { return };
    let dir = buyer_dir();
    let buyer = [Mount { host: dir.path().into(), guest: "/work".into(), read_only: false }];
    let s = seller();
    let cases: &[&[&str]] = &[
        &["sha256sum", "data.txt", "deep/er/numbers.txt"],
        &["sort", "-n", "data.txt"],
        &["wc", "data.txt"],
        &["awk", "{ s += $1 * $2 } END { print s, NR }", "deep/er/numbers.txt"],
        &["ls", "-l", "-R", "."],
        &["stat", "-c", "%s %a %Y %n", "unread.bin", "data.txt"],
    ];
    for args in cases {
        let r = on_seller(&busybox, args, &buyer, &s, b"");
        assert!(r.run.ending.success(), "{args:?}: {:?} {}", r.run.ending, r.stderr);
        let expected = native(args, dir.path());
        // ls -l shows owners, which the jail does not pretend to be.
        if args[0] != "ls" {
            assert_eq!(r.stdout, expected, "{args:?}");
        } else {
            assert_eq!(r.stdout.lines().count(), expected.lines().count(), "{}\n---\n{expected}", r.stdout);
        }
        assert!(r.run.changes.is_empty(), "reading changes nothing: {:?}", r.run.changes);
        // Only what the program opened crossed over; the 1 MiB file nobody read never did.
        assert!(!r.reads.iter().any(|p| p == "unread.bin"), "{args:?} fetched {:?}", r.reads);
    }
    let r = on_seller(&busybox, &["cat", "deep/er/numbers.txt"], &buyer, &s, b"");
    assert_eq!(r.reads, ["deep/er/numbers.txt"]);
    assert_eq!(r.lists, 3, "the root, deep and deep/er are each listed once");
    // A path outside every mount does not exist, on the seller as locally.
    let r = on_seller(&busybox, &["cat", "/etc/hostname"], &buyer, &s, b"");
    assert!(!r.run.ending.success() && r.stderr.contains("No such file"), "{}", r.stderr);
}

#[test]
fn what_the_program_changes_comes_back_to_the_buyer() {
    let Some(busybox) = needs("/usr/bin/busybox") else { return };
    let dir = buyer_dir();
    let buyer = [Mount { host: dir.path().into(), guest: "/work".into(), read_only: false }];
    let s = seller();
    let steps: &[&[&str]] = &[
        &["gzip", "-k", "-9", "data.txt"],
        &["mkdir", "-p", "out/inner"],
        &["cp", "deep/er/numbers.txt", "out/inner/copy.txt"],
        &["mv", "out", "moved"],
        &["rm", "-r", "deep"],
        &["sed", "-i", "s/line/LINE/", "data.txt"],
    ];
    for args in steps {
        let r = on_seller(&busybox, args, &buyer, &s, b"");
        assert!(r.run.ending.success(), "{args:?}: {:?} {}", r.run.ending, r.stderr);
        send_back(&r.run, &buyer);
    }
    // The same steps natively, on a copy of the original.
    let twin = buyer_dir();
    for args in steps {
        native(args, twin.path());
    }
    let listing = |d: &Path| native(&["find", ".", "-exec", "sh", "-c", "printf '%s ' \"$0\"; (test -f \"$0\" && sha256sum < \"$0\") || echo dir", "{}", ";"], d);
    let (ours, theirs) = (listing(dir.path()), listing(twin.path()));
    assert!(ours.contains("./moved/inner/copy.txt") && !ours.contains("./deep") && ours.contains("./data.txt.gz"), "{ours}");
    let sorted = |s: &str| {
        let mut l: Vec<&str> = s.lines().collect();
        l.sort();
        l.join("\n")
    };
    assert_eq!(sorted(&ours), sorted(&theirs));
    assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("cpushare")), "no temporary file is left behind");
}

#[test]
fn read_only_files_cross_once_per_seller_and_stay_read_only() {
    let Some(busybox) = needs("/usr/bin/busybox") else { return };
    let dir = buyer_dir();
    let out = tempfile::tempdir().unwrap();
    let buyer = [
        Mount { host: out.path().into(), guest: "/out".into(), read_only: false },
        Mount { host: dir.path().into(), guest: "/in".into(), read_only: true },
    ];
    let s = seller();
    let first = on_seller(&busybox, &["sha256sum", "/in/data.txt"], &buyer, &s, b"");
    assert_eq!(first.reads, ["data.txt"]);
    let second = on_seller(&busybox, &["sha256sum", "/in/data.txt"], &buyer, &s, b"");
    assert!(second.reads.is_empty(), "the second lease is served from the cache: {:?}", second.reads);
    assert_eq!(first.stdout, second.stdout);
    // A changed file is a new version: fetched again.
    std::fs::write(dir.path().join("data.txt"), "new\n").unwrap();
    let third = on_seller(&busybox, &["cat", "/in/data.txt"], &buyer, &s, b"");
    assert_eq!((third.stdout.as_str(), third.reads.as_slice()), ("new\n", &["data.txt".to_string()][..]));
    // Writes to the read-only mount fail in the jail and nothing comes back.
    let r = on_seller(&busybox, &["cp", "/in/data.txt", "/in/copy.txt"], &buyer, &s, b"");
    assert!(!r.run.ending.success() && r.run.changes.is_empty(), "{:?} {}", r.run.changes, r.stderr);
    let r = on_seller(&busybox, &["cp", "/in/data.txt", "/out/copy.txt"], &buyer, &s, b"");
    assert!(r.run.ending.success(), "{}", r.stderr);
    send_back(&r.run, &buyer);
    assert_eq!(std::fs::read(out.path().join("copy.txt")).unwrap(), b"new\n");
}

#[test]
fn a_hostile_seller_reaches_nothing_outside_the_buyers_mounts() {
    let dir = buyer_dir();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("keep.txt"), "keep").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
    let share = Share::new(&[
        Mount { host: dir.path().into(), guest: "/w".into(), read_only: false },
        Mount { host: ro.path().into(), guest: "/r".into(), read_only: true },
    ])
    .unwrap();
    let outside_path = outside.path().join("secret").to_string_lossy().into_owned();
    for path in ["../secret", "escape/secret", outside_path.trim_start_matches('/'), "deep/../../secret"] {
        assert!(share.read(0, path).is_err(), "{path} must not be readable");
    }
    assert!(share.list(0, "..").is_err() && share.list(0, "escape").map_or(true, |l| l.is_empty()));
    assert!(share.read(7, "data.txt").is_err(), "no such mount");
    assert_eq!(share.remove(1, "keep.txt"), Err(libc::EROFS));
    assert_eq!(share.write(1, "new.txt", 0o644).err(), Some(libc::EROFS));
    for path in ["", ".", "..", "deep/..", "deep/../.."] {
        assert_eq!(share.remove(0, path), Err(libc::EINVAL), "{path:?}: the mount and what holds it are never removed");
    }
    assert!(dir.path().join("data.txt").exists());
    assert!(share.remove(0, "escape/secret").is_ok());
    assert!(outside.path().join("secret").exists(), "removal through a link never leaves the mount");
    if let Ok(mut w) = share.write(0, "escape/planted", 0o644) {
        w.write_all(b"x").unwrap();
        let _ = w.finish();
    }
    assert!(!outside.path().join("planted").exists());
    assert!(ro.path().join("keep.txt").exists());
    // The change kinds the seller sends are applied only where allowed.
    let tmp = tempfile::tempfile().unwrap();
    assert_eq!(share.apply(1, "x", &Changed::File { mode: 0o644, file: tmp }), Err(libc::EROFS));
}
