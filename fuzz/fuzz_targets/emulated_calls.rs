//! The emulated jail's system-call requests: whatever calls a hostile
//! program makes, with whatever arguments and memory, the supervisor answers
//! without panicking, and nothing outside the program's mounted directory
//! changes (a sentinel file beside it stays as it was, nothing appears
//! there).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use cpushare_sandbox::emulate::fuzzing::{emulated, MEMORY_AT};
use cpushare_sandbox::emulate::Mount;
use libfuzzer_sys::fuzz_target;

/// The calls the emulator answers (and a few it does not); sleeps are left
/// out, as they only wait.
const CALLS: &[u64] = &[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 25, 28, 32, 33, 39, 62, 63, 72, 74, 77, 79, 80, 82, 83, 84, 87, 89, 96, 97, 105, 157, 158, 200, 201, 202, 204, 217,
    228, 229, 234, 257, 258, 262, 263, 264, 269, 271, 292, 302, 316, 318, 334, 439, 56, 59,
];

struct World {
    root: PathBuf,
    pid: i32,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir(root.join("outside")).unwrap();
        std::fs::write(root.join("outside/keep"), b"untouched").unwrap();
        // Where the program's signals to itself go: a child that is never
        // reaped (so its pid is not reused) and ends soon after the fuzzer.
        let watch = format!("while kill -0 {} 2>/dev/null; do sleep 1; done", std::process::id());
        let null = std::process::Stdio::null;
        let child = std::process::Command::new("sh").args(["-c", &watch]).stdin(null()).stdout(null()).stderr(null()).spawn().unwrap();
        let pid = child.id() as i32;
        std::mem::forget(child);
        World { root, pid }
    })
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let data_dir = w.root.join("data");
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir(&data_dir).unwrap();
    std::fs::write(data_dir.join("file"), b"some bytes").unwrap();
    // The calls first, the program's memory after them.
    let (calls, memory) = data.split_at(data.len() / 2 / 13 * 13);
    let mounts = vec![Mount { host: data_dir.clone(), guest: "/data".into(), read_only: false }];
    let mut e = emulated(w.pid, mounts, memory).unwrap();
    // Each call: a byte choosing the number, then six 16-bit arguments: with
    // the top bit set, an address in the program's memory; else a small number.
    for c in calls.chunks_exact(13).take(64) {
        let nr = CALLS[c[0] as usize % CALLS.len()];
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            let v = u16::from_le_bytes([c[1 + 2 * i], c[2 + 2 * i]]) as u64;
            *a = if v & 0x8000 != 0 { MEMORY_AT + (v & 0x7fff) } else { v };
        }
        let _ = e.call(nr, args);
    }
    drop(e);
    assert_eq!(names(&w.root), ["data", "outside"], "something appeared beside the mount");
    assert_eq!(names(&w.root.join("outside")), ["keep"]);
    assert_eq!(std::fs::read(w.root.join("outside/keep")).unwrap(), b"untouched");
});
