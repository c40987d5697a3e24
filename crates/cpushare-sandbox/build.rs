//! Builds what the jail runs: the loader (a no_std Rust program, compiled with
//! the same rustc into a static binary at a fixed high address) and the guest
//! programs (the SDK's examples and the test guests, with the C compiler that
//! Rust already needs as its linker).

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the compiler for {what}: {e}"));
    if !out.status.success() {
        panic!(
            "building {what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());

    let loader_src = manifest.join("loader/main.rs");
    println!("cargo:rerun-if-changed={}", loader_src.display());
    println!("cargo:rerun-if-changed={}", manifest.join("loader/elf.rs").display());
    run(
        Command::new(&rustc)
            .args([
                "--edition=2021",
                "--crate-type=bin",
                "-Cpanic=abort",
                "-Copt-level=2",
                "-Cdebuginfo=0",
                "-Cstrip=symbols",
                "-Crelocation-model=pic",
                "-Clink-arg=-nostartfiles",
                "-Clink-arg=-static",
                "-Clink-arg=-no-pie",
                "-Clink-arg=-Wl,--image-base=0x7e0000000000",
                "-Clink-arg=-Wl,--build-id=none",
            ])
            .arg(&loader_src)
            .arg("-o")
            .arg(out.join("cpushare-loader")),
        "the jail's loader",
    );

    let sdk = manifest.join("../../guest/c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let guest = |src: &Path, name: &str| {
        println!("cargo:rerun-if-changed={}", src.display());
        run(
            Command::new(&cc)
                .args([
                    "-O2",
                    "-static",
                    "-nostdlib",
                    "-ffreestanding",
                    "-fno-pie",
                    "-no-pie",
                    "-fno-stack-protector",
                    "-fcf-protection=none",
                ])
                .arg(format!("-I{}", sdk.display()))
                .arg("-T")
                .arg(sdk.join("cpushare.ld"))
                .arg(sdk.join("crt0.c"))
                .arg(src)
                .arg("-lgcc")
                .arg("-o")
                .arg(out.join(name)),
            name,
        );
    };
    for f in ["cpushare.h", "crt0.c", "cpushare.ld"] {
        println!("cargo:rerun-if-changed={}", sdk.join(f).display());
    }
    for example in ["mandelbrot", "crack"] {
        guest(
            &manifest.join(format!("../../guest/examples/{example}.c")),
            example,
        );
    }
    rust_guest(&rustc, &manifest.join("../../guest/rust"), &out);

    let guests = manifest.join("tests/guests");
    println!("cargo:rerun-if-changed={}", guests.display());
    for entry in std::fs::read_dir(&guests).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "c") {
            let name = format!("guest-{}", path.file_stem().unwrap().to_str().unwrap());
            guest(&path, &name);
        }
    }
}

/// The Rust SDK's example, built the way `guest/rust/.cargo/config.toml` builds
/// it but with rustc alone (a build script cannot run cargo on another
/// workspace cheaply): the SDK as an rlib, then the example against it.
fn rust_guest(rustc: &str, sdk: &Path, out: &Path) {
    let common = [
        "--edition=2021",
        "-Cpanic=abort",
        "-Copt-level=3",
        "-Cdebuginfo=0",
        "--target=x86_64-unknown-linux-gnu",
    ];
    let lib = sdk.join("src/lib.rs");
    println!("cargo:rerun-if-changed={}", lib.display());
    run(
        Command::new(rustc)
            .args(common)
            .args(["--crate-type=rlib", "--crate-name=cpushare_guest"])
            .arg(&lib)
            .arg("--out-dir")
            .arg(out),
        "the Rust guest SDK",
    );
    for name in ["mandelbrot", "wordcount"] {
        let example = sdk.join(format!("examples/{name}.rs"));
        println!("cargo:rerun-if-changed={}", example.display());
        run(
            Command::new(rustc)
                .args(common)
                .args([
                    "--crate-type=bin",
                    "-Crelocation-model=static",
                    "-Clink-arg=-nostartfiles",
                    "-Clink-arg=-nostdlib",
                    "-Clink-arg=-static",
                    "-Clink-arg=-no-pie",
                    "-Clink-arg=-Wl,--build-id=none",
                ])
                .arg(format!(
                    "--extern=cpushare_guest={}",
                    out.join("libcpushare_guest.rlib").display()
                ))
                .arg(&example)
                .arg("-o")
                .arg(out.join(format!("rust-{name}"))),
            "a Rust SDK example",
        );
    }
}
