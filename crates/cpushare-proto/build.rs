//! Compiles proto/ with protox (a pure-Rust protobuf compiler), so building
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto");
    let file = format!("{root}/cpushare/v1/exchange.proto");
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([&file], [root])?;
    // Bulk data as `Bytes`: decoding slices the received buffer instead of copying it.
    tonic_prost_build::configure()
        .bytes(".cpushare.v1.RelayFrame.data")
        .bytes(".cpushare.v1.Chunk.data")
        .bytes(".cpushare.v1.Outcome.output")
        .compile_fds(fds)?;
    Ok(())
}
