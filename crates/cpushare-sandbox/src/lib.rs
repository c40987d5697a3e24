//! The seller's jail for buyers' native code.
//!
//! A buyer's static x86-64 program runs in a fresh process that can only read
//! its input, write its output and log, and exit: `SECCOMP_MODE_STRICT`, entered
//! by a small loader after it has mapped the program, closed every other
//! descriptor and applied the slot's limits. [`jail::run`] runs one program on
//! one input and says how it ended, in words a buyer can act on.

pub mod elf;
pub mod emulate;
pub mod jail;
pub mod session;
pub mod syscalls;
pub mod vm;

pub use jail::{run, Ending, Kill, Limits, Options, Program, Run};
pub use session::Session;

/// The loader binary (see `loader/main.rs`), built by this crate's build script.
pub static LOADER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cpushare-loader"));

/// The guest SDK's examples, built from `guest/examples` by this crate's build script.
pub mod examples {
    /// Renders a Mandelbrot tile: input "X0 Y0 STEP WIDTH HEIGHT MAXITER", output a PGM image.
    pub static MANDELBROT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mandelbrot"));
    /// Searches a key range for a password with a given SHA-256: input
    /// "SHA256HEX CHARSET LENGTH START COUNT", output "found PASSWORD" or "none".
    pub static CRACK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/crack"));
    /// The Rust SDK's mandelbrot (`guest/rust/examples`): the same output as [`MANDELBROT`].
    pub static RUST_MANDELBROT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust-mandelbrot"));
    /// The Rust SDK's stream-mode example: "LINES WORDS BYTES" for each fragment of text.
    pub static RUST_WORDCOUNT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rust-wordcount"));
}

/// Guests for the jail's own tests (honest and hostile); see `tests/guests`.
#[doc(hidden)]
pub mod test_guests {
    macro_rules! guest {
        ($name:ident, $file:literal) => {
            pub static $name: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-", $file));
        };
    }
    guest!(HELLO, "hello");
    guest!(FORK, "fork");
    guest!(OPEN, "open");
    guest!(RDTSC, "rdtsc");
    guest!(SPIN, "spin");
    guest!(HOG, "hog");
    guest!(DEEP, "deep");
    guest!(SPEW, "spew");
    guest!(CRASH, "crash");
    guest!(SNEAKY, "sneaky");
    guest!(EXITCODE, "exitcode");
    guest!(CAT, "cat");
    guest!(STREAM, "stream");
    guest!(VMPROBE, "vmprobe");
}
