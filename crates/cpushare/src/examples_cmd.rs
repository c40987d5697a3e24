//! `cpushare examples DIR`: ready-to-run work for `cpushare run`, so a buyer
//! can try the exchange before writing a program of their own.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use cpushare_sandbox::examples;

#[derive(Args)]
pub struct ExamplesArgs {
    /// Where to write the programs and their inputs.
    #[arg(default_value = "cpushare-examples")]
    dir: PathBuf,
}

/// The password the crack example's fragments search for, and where.
const SECRET: &str = "share";
const CHARSET: &str = "abcdefghijklmnopqrstuvwxyz";
const CRACK_FRAGMENTS: u64 = 26;

pub fn run(args: ExamplesArgs) -> anyhow::Result<()> {
    let dir = &args.dir;
    write_program(dir, "mandelbrot", examples::MANDELBROT)?;
    write_program(dir, "crack", examples::CRACK)?;

    // A 960x640 view of the whole set in 6x4 tiles.
    let tiles = dir.join("mandelbrot-tiles");
    fresh_dir(&tiles)?;
    let (tw, th, step) = (160u32, 160u32, 3.0 / 960.0);
    for ty in 0..4 {
        for tx in 0..6 {
            let (x0, y0) = (-2.1 + f64::from(tx * tw) * step, -1.0 + f64::from(ty * th) * step);
            let input = format!("{x0} {y0} {step} {tw} {th} 1000\n");
            std::fs::write(tiles.join(format!("tile-{ty}-{tx}")), input)?;
        }
    }

    // Every five-letter lowercase password, in equal ranges; one holds SECRET.
    let ranges = dir.join("crack-ranges");
    fresh_dir(&ranges)?;
    let hash = sha256_hex(SECRET.as_bytes());
    let space = (CHARSET.len() as u64).pow(SECRET.len() as u32);
    let per = space.div_ceil(CRACK_FRAGMENTS);
    for i in 0..CRACK_FRAGMENTS {
        let start = i * per;
        let count = per.min(space - start);
        std::fs::write(ranges.join(format!("range-{i:02}")), format!("{hash} {CHARSET} {} {start} {count}\n", SECRET.len()))?;
    }

    let d = dir.display();
    println!("wrote {d}/mandelbrot and {d}/crack (static programs for the jail), with inputs:");
    println!("  {d}/mandelbrot-tiles   24 tiles of a 960x640 Mandelbrot image (PGM output)");
    println!("  {d}/crack-ranges       {CRACK_FRAGMENTS} ranges of 5-letter passwords, one holds the hash's password");
    println!();
    println!("try them here first (no exchange, no money):");
    println!("  cpushare run --local {d}/crack --inputs {d}/crack-ranges --outputs {d}/crack-out");
    println!("then on rented CPUs:");
    println!("  cpushare run --cpus 4 --max-price 5 {d}/mandelbrot --inputs {d}/mandelbrot-tiles --outputs {d}/tiles-out");
    Ok(())
}

fn write_program(dir: &Path, name: &str, elf: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, elf).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// An inputs directory holding only what this command writes (stale inputs
/// from an earlier run would become fragments too).
fn fresh_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}
