//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{root}/cpushare/v1/exchange.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([&file], [root])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
