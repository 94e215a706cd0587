//! `weir-controller`: computes routing tables from TrafficPolicies, Services and
//! EndpointSlices and pushes them to agents.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use weir_controller::{admin, hub::Hub, local, server};
use weir_proto::v1::routing_discovery_server::RoutingDiscoveryServer;

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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Some(dir) = args.config_dir.clone() else {
        anyhow::bail!(
            "Kubernetes mode is not available in this build yet; run in local mode with --config-dir DIR"
        );
    };
    if args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_ca.is_some() {
        anyhow::bail!(
            "TLS for the agent stream is not available in this build yet; local mode uses plain text"
        );
    }
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
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("cannot listen on --grpc-addr {}", args.grpc_addr))?;
    tracing::info!(grpc = %args.grpc_addr, admin = %args.admin_addr, dir = %dir.display(), "weir-controller starting in local mode");

    let mut source = tokio::spawn(local::run(dir, hub.clone()));
    let admin = Arc::new(admin::Admin {
        hub: hub.clone(),
        agents: agents.clone(),
    });
    tokio::spawn(admin::serve(admin_listener, admin));

    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(RoutingDiscoveryServer::new(server::DiscoveryService::new(
            hub.clone(),
            agents,
        )))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            shutdown_signal(),
        );

    tokio::select! {
        r = grpc => r.context("gRPC server failed")?,
        r = &mut source => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => anyhow::bail!("config source task failed: {e}"),
        },
    }
    tracing::info!("weir-controller stopped");
    Ok(())
}

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
