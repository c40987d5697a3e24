//! wordcount, a stream-mode program (`cpushare run --stream`): for each
//! fragment (a piece of text), prints "LINES WORDS BYTES" as `wc` would.
//! One jail serves every fragment a seller is given.
#![no_std]
#![no_main]

use core::fmt::Write;

static mut BUF: [u8; 1 << 20] = [0; 1 << 20];

fn count(text: &[u8]) -> (usize, usize) {
    let lines = text.iter().filter(|&&b| b == b'\n').count();
    let words = text.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).count();
    (lines, words)
}

fn main() -> i32 {
    let buf: &mut [u8; 1 << 20] = unsafe { &mut *core::ptr::addr_of_mut!(BUF) };
    cpushare_guest::stream::serve(buf, |input, out| {
        let (lines, words) = count(input);
        match writeln!(out, "{lines} {words} {}", input.len()) {
            Ok(()) => 0,
            Err(_) => 1,
        }
    })
}

cpushare_guest::entry!(main);
