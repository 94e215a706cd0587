//! `weir-agent`: the per-node proxy. Follows the controllers' routing tables and forwards
//! HTTP/1.1 and h2c traffic to the endpoints they name.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use weir_agent::control::{checks, client, state, state::Shared};
use weir_agent::{admin, listen};

#[derive(Parser, Debug)]
#[command(name = "weir-agent", version, about)]
struct Args {
    /// Controller gRPC address (repeatable, or comma-separated); tried in turn.
    #[arg(
        long = "controller",
        env = "WEIR_CONTROLLER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:18000"
    )]
    controllers: Vec<String>,
    /// Address of the proxy listener (HTTP/1.1 and h2c).
    #[arg(long, env = "WEIR_LISTEN", default_value = "127.0.0.1:15001")]
    listen: SocketAddr,
    /// Address of the admin API (/healthz, /readyz, /metrics, /config).
    #[arg(long, env = "WEIR_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// This node's name, as the controller and `kubectl get nodeagents` show it.
    #[arg(long, env = "WEIR_NODE_NAME", default_value = "local")]
    node_name: String,
    /// This node's zone (topology.kubernetes.io/zone).
    #[arg(long, env = "WEIR_ZONE", default_value = "")]
    zone: String,
    /// Folder where the last applied table is kept, to serve from it when no controller
    /// answers at start-up.
    #[arg(long, env = "WEIR_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Proxy worker threads, each with its own runtime and listener (default: one per core).
    #[arg(long, env = "WEIR_WORKERS")]
    workers: Option<usize>,
    /// How often the agent reports per-endpoint load (and cache counters) to the controller.
    #[arg(long, env = "WEIR_LOAD_REPORT_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    load_report_interval: std::time::Duration,
    /// Time a client has to send a complete request head before its connection is closed
    /// (slowloris guard), e.g. `10s`.
    #[arg(long, env = "WEIR_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_read_timeout: std::time::Duration,
    /// On SIGTERM or Ctrl-C, how long requests in flight may take to finish before the
    /// connections still open are cut and the agent exits, e.g. `30s`.
    #[arg(long, env = "WEIR_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
    /// Client certificate for the controller stream (PEM).
    #[arg(long, env = "WEIR_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, env = "WEIR_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA the controller's certificate must chain to (PEM).
    #[arg(long, env = "WEIR_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Folder of the disk cache tier: policies with `spec.cache.disk` keep their objects
    /// here (one subfolder each), and find them again after a restart.
    #[arg(long, env = "WEIR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Redis or Valkey server of the shared cache tier (`redis://HOST:PORT[/DB]`), used by
    /// policies with `spec.cache.shared: true`.
    #[arg(long, env = "WEIR_CACHE_REDIS")]
    cache_redis: Option<String>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "WEIR_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .with_writer(std::io::stderr)
        .init();
    let tls = match (&args.tls_ca, &args.tls_cert, &args.tls_key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => {
            let files = client::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            // Read once now so that a wrong path fails at start; each connect reads again.
            files.load()?;
            Some(files)
        }
        _ => anyhow::bail!("--tls-ca, --tls-cert and --tls-key go together"),
    };
    if args.controllers.is_empty() {
        anyhow::bail!("at least one --controller is needed");
    }
    // Cache tiers: set before the first table (persisted or pushed) builds the caches.
    weir_agent::cache::tier::configure(weir_agent::cache::tier::TierEnv {
        cache_dir: args.cache_dir.clone(),
        shared: match &args.cache_redis {
            None => None,
            Some(url) => Some(Arc::new(weir_agent::cache::tier::shared::SharedTier::new(
                url,
            )?)),
        },
    });
    let shared = Arc::new(Shared::new(
        args.node_name.clone(),
        args.zone.clone(),
        args.state_dir.clone(),
    ));
    shared.load_persisted();

    let workers = args
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let listeners = listen::bind_listeners(args.listen, workers)
        .with_context(|| format!("cannot listen on --listen {}", args.listen))?;
    let limits = listen::Limits {
        header_read_timeout: args.header_read_timeout,
    };
    let drain = listen::Drain::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let routing = shared.routing();
        let drain = drain.clone();
        std::thread::Builder::new()
            .name(format!("weir-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start worker runtime");
                        std::process::exit(1);
                    }
                };
                if let Err(e) = rt.block_on(listen::serve(listener, routing, limits, drain)) {
                    tracing::error!(error = %e, "worker stopped");
                    std::process::exit(1);
                }
            })?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
            .await
            .with_context(|| format!("cannot listen on --admin-addr {}", args.admin_addr))?;
        tracing::info!(listen = %args.listen, admin = %args.admin_addr, workers, node = %args.node_name, "weir-agent started");
        tokio::spawn(admin::serve(admin_listener, shared.clone()));
        tokio::spawn(checks::run(shared.clone()));
        tokio::spawn(state::persist_loop(shared.clone()));
        tokio::spawn(client::run(
            args.controllers,
            shared.clone(),
            tls,
            args.load_report_interval,
        ));
        shutdown_signal().await;
        // Not ready first, so that a Service stops sending while the listeners close.
        shared.set_draining();
        drain.start();
        tracing::info!(open = drain.open(), timeout = ?args.drain_timeout, "weir-agent draining");
        let cut = drain.wait_closed(args.drain_timeout).await;
        if cut > 0 {
            tracing::warn!(cut, "drain timeout passed; cutting the connections still open");
        }
        tracing::info!("weir-agent stopping");
        // Persistence is asynchronous: write the table applied last if it is not on disk
        // yet, but do not let a hung disk hold the shutdown forever.
        let flush = shared.flush_persisted();
        if tokio::time::timeout(std::time::Duration::from_secs(2), flush)
            .await
            .is_err()
        {
            tracing::warn!("the routing table applied last could not be persisted in time");
        }
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}
