//! Generates the tonic/prost code from `weir/v1/*.proto` at build time.
//!
//! `protox` is a pure-Rust protobuf compiler, so a fresh machine builds this crate with no
//! system `protoc` installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["weir/v1/routing.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
