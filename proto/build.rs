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
        .compile_fds(fds.clone())?;
    // A second server, for the controller, whose outgoing messages are already encoded
    // (`crate::Encoded`): one routing update is encoded once and its bytes shared by every
    // agent that receives it, instead of being copied and encoded per agent. Every other type
    // is the one generated above.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("encoded");
    std::fs::create_dir_all(&out)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(out)
        .extern_path(".weir.v1", "crate::v1")
        .extern_path(".weir.v1.ControllerMessage", "crate::Encoded")
        .compile_fds(fds)?;
    Ok(())
}
