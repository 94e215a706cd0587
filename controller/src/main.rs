//! `weir-controller`: computes routing tables from TrafficPolicies, Services and
//! EndpointSlices and pushes them to agents.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weir_controller::k8s::{leader, nodeagent, status};
use weir_controller::serve::{admin, hub::Hub, server, stopping, tls};
use weir_controller::source::watch as local;

#[derive(Parser, Debug)]
#[command(name = "weir-controller", version, about)]
struct Args {
    /// Local mode: read TrafficPolicy, Service and EndpointSlice manifests from this folder
    /// and follow its changes. Without it the controller runs against the Kubernetes API.
    #[arg(long, env = "WEIR_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Address of the gRPC server agents connect to.
    #[arg(long, env = "WEIR_GRPC_ADDR", default_value = "127.0.0.1:18000")]
    grpc_addr: SocketAddr,
    /// Address of the admin HTTP API (/healthz, /readyz, /metrics, /state).
    #[arg(long, env = "WEIR_ADMIN_ADDR", default_value = "127.0.0.1:18080")]
    admin_addr: SocketAddr,
    /// Serve gRPC in plain text (the default in local mode).
    #[arg(long, env = "WEIR_PLAINTEXT")]
    plaintext: bool,
    /// Certificate of the gRPC server (PEM).
    #[arg(long, env = "WEIR_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Private key of the gRPC server (PEM).
    #[arg(long, env = "WEIR_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA that agents' client certificates must chain to (PEM).
    #[arg(long, env = "WEIR_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Namespace of the leader-election Lease (Kubernetes mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weir-system")]
    namespace: String,
    /// How long the leader-election Lease stays valid without renewal (Kubernetes mode);
    /// the leader renews it every third of this.
    #[arg(long, env = "WEIR_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How often agents' load reports are folded into load-aware weights.
    #[arg(long, env = "WEIR_LOAD_ROUND", default_value = "10s", value_parser = humantime::parse_duration)]
    load_round: Duration,
    /// This replica's identity in the Lease and in `NodeAgent.status.controller` (default:
    /// `POD_NAME`, else host name and pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often the `--tls-*` files are checked for new contents (certificate rotation);
    /// new connections use the new certificate, established streams stay.
    #[arg(long, env = "WEIR_TLS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    tls_reload_interval: Duration,
    /// How long a Node must have been gone before the leader deletes its NodeAgent
    /// (Kubernetes mode).
    #[arg(long, env = "WEIR_NODE_GONE_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    node_gone_grace: Duration,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// Where the controller's objects come from.
enum Mode {
    Local(PathBuf),
    Kubernetes(kube::Client),
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tls = tls_files(&args)?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mode = match args.config_dir.clone() {
        // Local mode defaults to plain text; TLS flags, when given, are honoured.
        Some(dir) => Mode::Local(dir),
        None => {
            // In a cluster the agent stream carries routing for every node: refuse to serve
            // it unauthenticated unless the operator said so explicitly.
            if tls.is_none() && !args.plaintext {
                anyhow::bail!(
                    "Kubernetes mode needs --tls-cert, --tls-key and --tls-ca for the agent stream, \
                     or --plaintext to serve it unencrypted (only on a trusted network); \
                     for local mode pass --config-dir DIR"
                );
            }
            if tls.is_some() && args.plaintext {
                anyhow::bail!(
                    "--plaintext contradicts --tls-cert/--tls-key/--tls-ca; pass one or the other"
                );
            }
            let client = kube::Client::try_default().await.context(
                "cannot configure the Kubernetes client (no in-cluster config and no usable KUBECONFIG); \
                 for local mode pass --config-dir DIR",
            )?;
            Mode::Kubernetes(client)
        }
    };
    // Seeding versions from the clock keeps them increasing across controller restarts.
    let first_version = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let hub = Hub::new(first_version);
    let agents = Arc::new(server::Agents::default());

    let admin_listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("cannot listen on --admin-addr {}", args.admin_addr))?;
    let grpc_listener = listen_for_agents(args.grpc_addr)
        .with_context(|| format!("cannot listen on --grpc-addr {}", args.grpc_addr))?;
    // Turned true by SIGTERM / Ctrl-C: the leader releases its Lease at once while the gRPC
    // server drains.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut election_task = None;
    let mut source = match mode {
        Mode::Local(dir) => {
            tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, dir = %dir.display(), "weir-controller starting in local mode");
            tokio::spawn(local::run(dir, hub.clone()))
        }
        Mode::Kubernetes(client) => {
            tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, namespace = %args.namespace, "weir-controller starting in Kubernetes mode");
            // Every replica serves agents; only the leader writes status.
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
            // Renew and retry like client-go (every 2 s), or faster with a short lease.
            let election = leader::Config {
                lease_duration: args.lease_duration,
                renew_every: (args.lease_duration / 3).min(Duration::from_secs(2)),
            };
            election_task = Some(tokio::spawn(leader::run(
                client.clone(),
                args.namespace.clone(),
                identity.clone(),
                election,
                leader_tx,
                stop_rx.clone(),
            )));
            let source = weir_controller::source::kube::Source::start(&client);
            // Every replica writes the NodeAgents of its own agents.
            tokio::spawn(nodeagent::run_writer(
                client.clone(),
                hub.clone(),
                agents.clone(),
                source.stores.nodeagents.clone(),
                source.stores.agents_synced.clone(),
                identity.clone(),
            ));
            tokio::spawn(nodeagent::run_cleanup(
                client.clone(),
                source.stores.nodeagents.clone(),
                source.stores.nodes.clone(),
                source.stores.agents_synced.clone(),
                nodeagent::Cleanup {
                    grace: args.node_gone_grace,
                },
                leader_rx.clone(),
            ));
            let recorder = kube::runtime::events::Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: "weir-controller".to_string(),
                    instance: Some(identity.clone()),
                },
            );
            tokio::spawn(status::run(
                client,
                hub.clone(),
                source.stores.nodeagents.clone(),
                source.stores.agents_synced.clone(),
                source.stores.policies.clone(),
                recorder,
                leader_rx,
            ));
            let hub = hub.clone();
            tokio::spawn(async move { source.run(hub).await.map_err(anyhow::Error::from) })
        }
    };
    let admin = Arc::new(admin::Admin {
        hub: hub.clone(),
        agents: agents.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin));
    tokio::spawn(weir_controller::serve::load::run(
        hub.clone(),
        agents.clone(),
        args.load_round,
        stop_rx.clone(),
    ));

    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(weir_controller::serve::wire::RoutingDiscoveryServer::new(
            server::DiscoveryService::new(hub.clone(), agents).with_stop(stop_rx.clone()),
        ));
    // TLS is served here rather than by tonic so that rotated certificates are picked up.
    let grpc = match tls {
        Some(files) => {
            let reloader = tls::Reloader::new(files)
                .context("invalid TLS configuration for the agent stream")?;
            tokio::spawn(reloader.clone().run(args.tls_reload_interval));
            futures::future::Either::Left(router.serve_with_incoming_shutdown(
                tls::incoming(grpc_listener, reloader),
                stopping(stop_rx.clone()),
            ))
        }
        None => futures::future::Either::Right(router.serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            stopping(stop_rx.clone()),
        )),
    };

    // Agent streams never end by themselves, so a graceful drain gets a deadline: after it
    // the process exits and the agents reconnect to another replica (they would on a
    // crash as well).
    let drained = async {
        stopping(stop_rx.clone()).await;
        tokio::time::sleep(SHUTDOWN_DRAIN).await;
        tracing::info!(
            "agent streams still open {}s after the signal; exiting",
            SHUTDOWN_DRAIN.as_secs()
        );
    };
    tokio::select! {
        r = grpc => r.context("gRPC server failed")?,
        r = &mut source => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => anyhow::bail!("config source task failed: {e}"),
        },
        () = drained => {}
    }
    if let Some(task) = election_task
        && tokio::time::timeout(Duration::from_secs(3), task)
            .await
            .is_err()
    {
        tracing::warn!("the lease was not released in time; it will expire");
    }
    drop(stop_rx);
    tracing::info!("weir-controller stopped");
    Ok(())
}

/// The mTLS files of the agent stream: the server presents `--tls-cert`/`--tls-key` and
/// accepts only clients whose certificate chains to `--tls-ca`. `None` without flags.
fn tls_files(args: &Args) -> anyhow::Result<Option<tls::Files>> {
    match (&args.tls_cert, &args.tls_key, &args.tls_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => Ok(Some(tls::Files {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        })),
        _ => anyhow::bail!("--tls-cert, --tls-key and --tls-ca must be given together"),
    }
}

/// A Lease holder name unique per process: the host name (the pod name in a cluster) and pid.
fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "weir-controller".to_string());
    format!("{host}-{}", std::process::id())
}

/// How long a stopping controller lets agent streams drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

/// Resolves once the controller has been told to stop.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// The agents' listener, with a backlog for reconnect storms: when a controller restarts,
/// every agent of the cluster connects within the same second, and tokio's default backlog
/// (1,024) drops the SYNs beyond it, each then retried a second later by the kernel.
fn listen_for_agents(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    const BACKLOG: u32 = 8192;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The kernel caps this at net.core.somaxconn.
    socket.listen(BACKLOG)
}
