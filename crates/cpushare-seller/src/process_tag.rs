//! Names for what a seller process leaves on disk (VM directories, scratch
//! disks) that say which process made them, so that a later seller can tell
//! whether their maker is gone. A pid alone is not enough: the kernel reuses
//! pids, and a busy host may give a dead seller's pid to a new process at once,
//! which would keep its leftovers forever. The tag is the pid and the process's
//! start time (clock ticks since boot), which no other process shares.

use std::path::Path;

/// This process's tag: `PID.START`.
pub(crate) fn own() -> String {
    let pid = std::process::id();
    match start_time(pid) {
        Some(start) => format!("{pid}.{start}"),
        None => pid.to_string(),
    }
}

/// Whether the process a tag names still runs. A bare pid (a tag made where
/// `/proc/PID/stat` could not be read) is alive while that pid is.
pub(crate) fn alive(tag: &str) -> bool {
    let (pid, start) = match tag.split_once('.') {
        Some((pid, start)) => (pid, Some(start)),
        None => (tag, None),
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    match start {
        Some(start) => start_time(pid).is_some_and(|s| s.to_string() == start),
        None => Path::new("/proc").join(pid.to_string()).exists(),
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // fields from the last ')'; the state is field 3.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_names_this_process_and_no_other() {
        let tag = own();
        assert!(alive(&tag), "{tag}");
        let (pid, start) = tag.split_once('.').expect("a start time on Linux");
        let start: u64 = start.parse().unwrap();
        // The same pid started at another time is another process: gone.
        assert!(!alive(&format!("{pid}.{}", start + 1)));
        assert!(alive(pid), "a bare pid counts while it runs");
        assert!(!alive("not-a-pid"));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let theirs = format!("{}.{}", child.id(), start);
        child.wait().unwrap();
        assert!(!alive(&theirs));
    }
}
