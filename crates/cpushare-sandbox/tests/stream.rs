//! Stream mode: one jail serves many fragments, and a fragment that kills its
//! jail is reported as precisely as in a one-shot jail, without harming the
//! fragments after it.

use std::sync::Arc;

use cpushare_sandbox::{test_guests as g, Ending, Kill, Limits, Options, Program, Session};

fn session(limits: Limits) -> Session {
    Session::new(Arc::new(Program::new(g::STREAM).unwrap()), &["stream"], limits, Options::default())
}

fn limits() -> Limits {
    Limits { ram_bytes: 256 << 20, cpu_seconds: 2, output_bytes: 1 << 20, log_bytes: 4096 }
}

#[tokio::test]
async fn one_jail_serves_many_fragments() {
    let mut s = session(limits());
    for i in 0..500 {
        let input = format!("fragment {i}");
        let r = s.run(input.as_bytes()).await.unwrap();
        assert_eq!(r.ending, Ending::Exited(0));
        assert_eq!(r.output, input.to_uppercase().as_bytes());
        assert!(r.log.is_empty());
    }
    // Empty and large inputs (larger than a pipe holds) too.
    assert_eq!(s.run(b"").await.unwrap().output, b"");
    let big = vec![b'a'; 60_000];
    assert_eq!(s.run(&big).await.unwrap().output, vec![b'A'; 60_000]);
    assert_eq!(s.jails_started(), 1);
}

#[tokio::test]
async fn each_fragment_has_its_own_log_and_status() {
    let mut s = session(limits());
    let r = s.run(b"log").await.unwrap();
    assert_eq!(r.log, b"stream: a line for this fragment\n");
    assert_eq!(r.output, b"LOG");
    let r = s.run(b"fail").await.unwrap();
    assert_eq!(r.ending, Ending::Exited(3));
    let r = s.run(b"quiet").await.unwrap();
    assert!(r.log.is_empty() && r.ending.success());
    let r = s.run(&vec![b'x'; 70_000]).await.unwrap();
    assert_eq!(r.ending, Ending::Exited(2));
    assert_eq!(r.log, b"stream: input too large\n");
    assert_eq!(s.run(b"still here").await.unwrap().output, b"STILL HERE");
    assert_eq!(s.jails_started(), 1);
}

#[tokio::test]
async fn a_fragment_that_kills_its_jail_is_reported_and_the_next_gets_a_new_one() {
    let mut s = session(limits());
    let cases: [(&[u8], fn(&Ending) -> bool); 5] = [
        (b"crash", |e| matches!(e, Ending::Killed(Kill::Segfault { addr: 8, .. }))),
        (b"fork", |e| e.to_string() == "killed by the jail: forbidden system call 57 (fork)"),
        (b"exit7", |e| *e == Ending::Exited(7)),
        (b"flood", |e| *e == Ending::Killed(Kill::OutputLimit { bytes: 1 << 20 })),
        (b"spin", |e| *e == Ending::Killed(Kill::CpuLimit { seconds: 2 })),
    ];
    for (n, (input, expected)) in cases.iter().enumerate() {
        assert_eq!(s.run(b"before").await.unwrap().output, b"BEFORE");
        let r = s.run(input).await.unwrap();
        assert!(expected(&r.ending), "{}: {}", String::from_utf8_lossy(input), r.ending);
        let after = s.run(b"after").await.unwrap();
        assert_eq!(after.output, b"AFTER");
        assert_eq!(s.jails_started(), n as u64 + 2);
    }
}

#[tokio::test]
async fn every_fragment_gets_the_full_cpu_limit() {
    // Two spinning fragments in a row each run for their own limit, not a shared one.
    let mut s = session(Limits { cpu_seconds: 1, ..limits() });
    for _ in 0..2 {
        let r = s.run(b"spin").await.unwrap();
        assert_eq!(r.ending, Ending::Killed(Kill::CpuLimit { seconds: 1 }));
        assert!(r.cpu.as_millis() >= 900, "{:?}", r.cpu);
    }
}

#[tokio::test]
async fn the_rust_sdk_serves_a_stream() {
    let program = Arc::new(Program::new(cpushare_sandbox::examples::RUST_WORDCOUNT).unwrap());
    let mut s = Session::new(program, &["wordcount"], limits(), Options::default());
    for (text, expected) in [("one two three\n", "1 3 14\n"), ("", "0 0 0\n"), ("a\nb c\n\n  d", "3 4 10\n")] {
        let r = s.run(text.as_bytes()).await.unwrap();
        assert_eq!(r.ending, Ending::Exited(0), "{}", String::from_utf8_lossy(&r.log));
        assert_eq!(String::from_utf8(r.output).unwrap(), expected);
    }
    assert_eq!(s.jails_started(), 1);
}
