//! Helpers shared by the emulated jail's tests (each test file uses some).
#![allow(dead_code)]

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A `Write` whose bytes the test reads afterwards.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

/// A prerequisite program, or None (a skip, said aloud) outside CI.
pub fn needs(path: &str) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => panic!("{path} is needed under CI: {e}"),
        Err(e) => {
            eprintln!("skipped: {path}: {e} (scripts/test installs it)");
            None
        }
    }
}
