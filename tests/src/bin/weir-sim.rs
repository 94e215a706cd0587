//! `weir-sim`: many simulated agents against a real controller (see `weir_tests::sim`), with
//! an admin port for the scale benchmark (`tests/bench/scale.py`).
//!
//!     weir-sim --controller http://127.0.0.1:18000 --agents 1000 --admin-addr 127.0.0.1:18091
//!
//! Admin API (loopback only):
//! * `GET /stats`: counters, versions, per-version bytes and per-endpoint-change
//!   observations as JSON; `GET /stats?brief` leaves the last two out (cheap to poll);
//! * `POST /reconnect`: every agent drops its stream and reconnects at once (a reconnect
//!   storm); `/stats` → `storm` tells when each got its full table again;
//! * `POST /report`: writes `--report` now.
//!
//! `--report FILE` is also written on SIGTERM and SIGINT, before exiting. One connection per
//! agent needs as many file descriptors: the simulator raises its soft limit up to the hard
//! one (`ulimit -Hn`), and `--channels K` shares K connections instead.

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use weir_tests::sim::{Sim, SimConfig};

#[derive(Parser, Debug)]
#[command(
    name = "weir-sim",
    about = "Simulated weir agents against a real controller"
)]
struct Args {
    /// Controller URL; repeat for several (agents rotate through them on reconnect).
    #[arg(long = "controller", required = true)]
    controllers: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Node names are `{prefix}-{i}`.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Comma-separated zones, spread round robin over the agents.
    #[arg(long, default_value = "z1,z2,z3", value_delimiter = ',')]
    zones: Vec<String>,
    /// HTTP/2 connections shared by all agents; 0: one per agent, like real agents.
    #[arg(long, default_value_t = 0)]
    channels: usize,
    /// Spread the agents' first connects over this long (e.g. 2s); 0: all at once.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    ramp: Duration,
    /// Agents announce a cache peer address, so the controller sends each its zone's peer
    /// list (`/stats` → `cache_peers`).
    #[arg(long)]
    cache_peers: bool,
    /// Admin HTTP address (loopback).
    #[arg(long, default_value = "127.0.0.1:18091")]
    admin_addr: SocketAddr,
    /// JSON report (full stats) written at exit and on `POST /report`.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.admin_addr.ip().is_loopback() {
        bail!("--admin-addr must be a loopback address");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("bind --admin-addr {}", args.admin_addr))?;
    let sim = Arc::new(Sim::start(SimConfig {
        controllers: args.controllers.clone(),
        agents: args.agents,
        prefix: args.prefix.clone(),
        zones: args.zones.clone(),
        channels: args.channels,
        ramp: args.ramp,
        cache_peers: args.cache_peers,
    })?);
    eprintln!(
        "weir-sim: {} agents -> {}; admin on http://{}",
        args.agents,
        args.controllers.join(", "),
        args.admin_addr
    );
    let report = args.report.clone();
    {
        let sim = sim.clone();
        let report = report.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors, most likely: retry shortly rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let sim = sim.clone();
                let report = report.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let sim = sim.clone();
                        let report = report.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(admin(&sim, report.as_deref(), req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    if let Some(path) = &report {
        write_report(&sim, path)?;
        eprintln!("weir-sim: report written to {}", path.display());
    }
    Ok(())
}

fn write_report(sim: &Sim, path: &Path) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(&sim.stats(true))?;
    // Whole, then renamed, so a reader never sees half a report.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))?;
    Ok(())
}

fn admin(sim: &Sim, report: Option<&Path>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let json = |status: StatusCode, body: Vec<u8>| {
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    let text = |status: StatusCode, body: String| json(status, body.into_bytes());
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/stats") => {
            let brief = req.uri().query().is_some_and(|q| q.contains("brief"));
            match serde_json::to_vec(&sim.stats(!brief)) {
                Ok(body) => json(StatusCode::OK, body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{{\"error\":\"{e}\"}}"),
                ),
            }
        }
        (&Method::POST, "/reconnect") => {
            let epoch = sim.reconnect_all();
            text(StatusCode::OK, format!("{{\"epoch\":{epoch}}}"))
        }
        (&Method::POST, "/report") => match report {
            None => text(
                StatusCode::BAD_REQUEST,
                "{\"error\":\"no --report\"}".into(),
            ),
            Some(path) => match write_report(sim, path) {
                Ok(()) => text(
                    StatusCode::OK,
                    format!("{{\"written\":{:?}}}", path.display().to_string()),
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{{\"error\":{:?}}}", format!("{e:#}")),
                ),
            },
        },
        _ => text(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".into()),
    }
}
