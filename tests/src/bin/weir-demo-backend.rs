//! `weir-demo-backend`: the e2e tests' HTTP backend as a process of its own, for tests that
//! kill a backend for real. Prints `listening on ADDR` once it accepts connections.
//!
//!     weir-demo-backend --listen 127.0.0.1:9081 --name shop-v1 [--mode normal|hang|status:503|delay:50]

use clap::Parser;
use std::io::Write;
use std::net::SocketAddr;
use weir_tests::backend::{Backend, Mode};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long, default_value = "backend")]
    name: String,
    #[arg(long, default_value = "normal", value_parser = |s: &str| Mode::parse(s).ok_or("normal, hang, status:N or delay:MS"))]
    mode: Mode,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let backend = Backend::start(args.listen, &args.name).await?;
    backend.set_mode(args.mode);
    println!("listening on {}", backend.addr);
    std::io::stdout().flush()?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
