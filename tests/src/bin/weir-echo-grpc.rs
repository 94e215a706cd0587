//! `weir-echo-grpc`: the test gRPC echo server as a process of its own, for tests that kill
//! an endpoint for real and for the gRPC benchmark. Prints `listening on ADDR` when ready.
//!
//!     weir-echo-grpc --listen 127.0.0.1:50051 --name e1

use clap::Parser;
use std::io::Write;
use std::net::SocketAddr;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, default_value = "echo")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = weir_tests::grpc::start(args.listen, &args.name, Default::default()).await?;
    println!("listening on {}", server.addr);
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
