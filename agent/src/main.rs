//! `weir-agent`: the per-node proxy. Follows the controllers' routing tables and forwards
//! HTTP/1.1 and h2c traffic to the endpoints they name.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use weir_agent::control::{checks, client, state, state::Shared};
use weir_agent::listen::handoff;
use weir_agent::{admin, listen, observe};

/// A share between 0 and 1.
fn ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!(
            "{text:?} is not a share between 0 and 1 (e.g. 0.05)"
        )),
    }
}

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
    /// Access log on standard output, one line per request: `json`, `common` (NCSA common
    /// log format plus route, upstream, cache verdict and milliseconds to the response head),
    /// or off when unset.
    #[arg(long, env = "WEIR_ACCESS_LOG", value_enum)]
    access_log: Option<observe::Format>,
    /// Share of requests the access log writes, 0–1 (e.g. `0.01` for 1 %).
    #[arg(long, env = "WEIR_ACCESS_LOG_SAMPLE", default_value_t = 1.0, value_parser = ratio)]
    access_log_sample: f64,
    /// OTLP/HTTP collector to export request spans to, e.g. `http://127.0.0.1:4318`
    /// (`/v1/traces` is appended); tracing is off when unset.
    #[arg(long, env = "WEIR_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Share of requests without a sampled `traceparent` that start a trace, 0–1. Requests
    /// whose `traceparent` is sampled are always recorded (parent-based sampling).
    #[arg(long, env = "WEIR_TRACE_SAMPLE", default_value_t = 0.01, value_parser = ratio)]
    trace_sample: f64,
    /// An upgraded connection (WebSocket or other `Upgrade`, h2 extended CONNECT) with no
    /// byte in either direction for this long is closed, e.g. `5m` (at least 1s).
    #[arg(long, env = "WEIR_UPGRADE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_upgrade_idle_timeout)]
    upgrade_idle_timeout: std::time::Duration,
    /// Client certificate for the controller stream (PEM).
    #[arg(long, env = "WEIR_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM).
    #[arg(long, env = "WEIR_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA the controller's certificate must chain to (PEM).
    #[arg(long, env = "WEIR_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Unix socket through which a new agent takes over this one's listening sockets for a
    /// zero-downtime restart (and which this agent then listens on for the next one).
    /// Default: `<state-dir>/handoff.sock` with `--state-dir`, else none; `off` turns it off.
    #[arg(long, env = "WEIR_HANDOFF_SOCKET")]
    handoff_socket: Option<PathBuf>,
    /// After handing the sockets to a new agent and draining, exit (`true`), or stay idle
    /// until SIGTERM (`false`: under a supervisor that would restart an exited agent, such as
    /// a Kubernetes pod, which would then take the sockets back).
    #[arg(long, env = "WEIR_EXIT_AFTER_HANDOFF", default_value_t = true, action = clap::ArgAction::Set)]
    exit_after_handoff: bool,
    /// Folder of the disk cache tier: policies with `spec.cache.disk` keep their objects
    /// here (one subfolder each), and find them again after a restart.
    #[arg(long, env = "WEIR_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Redis or Valkey server of the shared cache tier (`redis://HOST:PORT[/DB]`), used by
    /// policies with `spec.cache.shared: true`.
    #[arg(long, env = "WEIR_CACHE_REDIS")]
    cache_redis: Option<String>,
    /// Serve cache peer fills (policies with `spec.cache.peers: true`): the IP:port at which
    /// the other agents of the zone reach this agent's proxy listener (in a pod:
    /// `$(POD_IP):<proxy port>`). The controller then sends this agent the zone's peers.
    #[arg(long, env = "WEIR_CACHE_PEER_ADDR", value_parser = weir_agent::control::state::parse_cache_peer_address)]
    cache_peer_addr: Option<std::net::SocketAddr>,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax.
    #[arg(long, env = "WEIR_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let shared = Arc::new(
        Shared::new(
            args.node_name.clone(),
            args.zone.clone(),
            args.state_dir.clone(),
        )
        .with_cache_peer_address(args.cache_peer_addr),
    );
    shared.load_persisted();
    let access = args
        .access_log
        .map(|format| observe::AccessLog::stdout(format, args.access_log_sample))
        .transpose()
        .context("cannot start the access log writer")?;
    let (tracer, exporter) = match &args.otlp_endpoint {
        None => (None, None),
        Some(url) => {
            let (t, e) = observe::Tracer::new(url, args.trace_sample, &args.node_name)
                .map_err(|e| anyhow::anyhow!("--otlp-endpoint: {e}"))?;
            (Some(t), Some(e))
        }
    };
    shared
        .routing()
        .set_observe(observe::Observe::new(access, tracer));

    let workers = args
        .workers
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let limits = listen::Limits {
        header_read_timeout: args.header_read_timeout,
        upgrade_idle_timeout: args.upgrade_idle_timeout,
    };
    let drain = listen::Drain::new();

    // Zero-downtime restart: take the listening sockets over from a running agent, or bind.
    let handoff_path = match &args.handoff_socket {
        Some(p) if p.as_os_str() == "off" => None,
        Some(p) => Some(p.clone()),
        None => handoff::default_path(args.state_dir.as_deref()),
    };
    let mut sockets = handoff::acquire(
        handoff_path.as_deref(),
        args.listen,
        args.admin_addr,
        workers,
    )?;
    let offer = match &handoff_path {
        Some(_) => match handoff::Offer::new(&sockets, args.listen, args.admin_addr) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "no hand-off to a next agent: a restart will have to stop this one first");
                None
            }
        },
        None => None,
    };
    let predecessor = sockets.predecessor.take();
    let worker_listeners = std::mem::take(&mut sockets.workers);
    // Taken over from a running agent: accept nothing (proxy or admin, which would answer
    // with no table) until a table is in force; the old agent serves meanwhile.
    let mut deferred = None;
    if predecessor.is_some() {
        deferred = Some(worker_listeners);
    } else {
        start_workers(worker_listeners, &shared, limits, &drain)?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let admin_listener = tokio::net::TcpListener::from_std(sockets.admin)
            .with_context(|| format!("cannot listen on --admin-addr {}", args.admin_addr))?;
        tracing::info!(listen = %args.listen, admin = %args.admin_addr, workers, node = %args.node_name, handoff = ?handoff_path, "weir-agent started");
        let admin_task = std::sync::OnceLock::new();
        let mut admin_listener = Some(admin_listener);
        if predecessor.is_none()
            && let Some(l) = admin_listener.take()
        {
            let _ = admin_task.set(tokio::spawn(admin::serve(l, shared.clone())).abort_handle());
        }
        tokio::spawn(checks::run(shared.clone()));
        tokio::spawn(state::persist_loop(shared.clone()));
        if let Some(exporter) = exporter {
            tokio::spawn(exporter.run());
        }
        tokio::spawn(client::run(
            args.controllers,
            shared.clone(),
            tls,
            args.load_report_interval,
        ));
        let lifecycle = async {
            if let Some(pred) = predecessor {
                tracing::info!(old_pid = pred.pid(), "waiting for a routing table before accepting; the old agent serves meanwhile");
                handoff::wait_ready(&shared).await;
                if let Some(listeners) = deferred.take() {
                    start_workers(listeners, &shared, limits, &drain)?;
                }
                if let Some(l) = admin_listener.take() {
                    let _ = admin_task.set(tokio::spawn(admin::serve(l, shared.clone())).abort_handle());
                }
                if let Err(e) = pred.confirm_ready().await {
                    // It may be gone (killed): the sockets are this agent's either way.
                    tracing::warn!(error = %e, "the old agent did not confirm the hand-off");
                }
            }
            if let (Some(path), Some(offer)) = (&handoff_path, offer) {
                match handoff::listen(path) {
                    Ok(l) => return anyhow::Ok(Some(handoff::offer(l, offer).await)),
                    Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot listen on the hand-off socket: a restart will have to stop this agent first"),
                }
            }
            std::future::pending::<()>().await;
            anyhow::Ok(None)
        };
        let handed_over = tokio::select! {
            () = shutdown_signal() => None,
            r = lifecycle => r?,
        };
        if let Some(new_pid) = handed_over {
            // The admin socket is the new agent's now: answering on it too would mix this
            // agent's "draining" into the node's /readyz.
            if let Some(t) = admin_task.get() {
                t.abort();
            }
            tracing::info!(new_pid, "handed over to the new agent; draining");
        }
        // Not ready first, so that a Service stops sending while the listeners close.
        shared.set_draining();
        drain.start();
        tracing::info!(open = drain.open(), timeout = ?args.drain_timeout, "weir-agent draining");
        let cut = drain.wait_closed(args.drain_timeout).await;
        if cut > 0 {
            tracing::warn!(cut, "drain timeout passed; cutting the connections still open");
        }
        if handed_over.is_some() && !args.exit_after_handoff {
            tracing::info!("drained; idle until SIGTERM (--exit-after-handoff=false)");
            shutdown_signal().await;
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

/// Starts one worker thread per list of listeners, each with its own current-thread runtime.
fn start_workers(
    per_worker: Vec<Vec<std::net::TcpListener>>,
    shared: &Shared,
    limits: listen::Limits,
    drain: &listen::Drain,
) -> anyhow::Result<()> {
    for (i, listeners) in per_worker.into_iter().enumerate() {
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
                if let Err(e) = rt.block_on(listen::serve(listeners, routing, limits, drain)) {
                    tracing::error!(error = %e, "worker stopped");
                    std::process::exit(1);
                }
            })?;
    }
    Ok(())
}

/// `--upgrade-idle-timeout`: a duration of at least a second (shorter would cut tunnels
/// between a client's keep-alive pings; zero would close them at once).
fn parse_upgrade_idle_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 5m, 90s)"))?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!(
            "{s} is too short: the upgrade idle timeout must be at least 1s"
        ));
    }
    Ok(d)
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
