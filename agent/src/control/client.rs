//! The agent's side of `weir.v1.RoutingDiscovery`: keeps one stream open to one of the
//! `--controller` addresses, applies every update and answers ACK or NACK.
//!
//! Reconnects rotate through the controllers with capped exponential backoff and full
//! jitter, so a controller restart does not bring every agent back in the same millisecond.
//! A stream that stays silent for longer than three controller pings is treated as dead.
//!
//! Every [`LOAD_REPORT_EVERY`] the agent sends a LoadReport: per endpoint that took requests,
//! its requests and errors since the previous report, latency EWMA and in-flight count; per
//! route that saw traffic, its answers, latency buckets and cache use since then; the
//! endpoints the agent itself holds unhealthy, with why (see [`crate::control::report`]);
//! and its cache totals (summed over the routes' caches). All relaxed atomic loads, nothing
//! on the request path. The controller turns them into
//! `NodeAgent.status` and, every two reports, into load-aware weights.
//!
//! The `--tls-*` files are read again at every (re)connect, so a client certificate that
//! cert-manager rotated in place is used from the next connection on, without a restart.

use crate::control::report::LoadReporter;
use crate::control::state::{NackStatus, Shared};
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use weir_proto::v1::routing_discovery_client::RoutingDiscoveryClient;
use weir_proto::v1::{
    Ack, AgentMessage, Hello, LoadReport, Nack, agent_message, controller_message,
};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The controller pings every 15 s.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// How often the agent reports its load to the controller: 5 s, so that each round of the
/// controller's load-aware weights (every 10 s) sees two reports of every agent, and an
/// endpoint turning slow is acted on within one round. A report is a few hundred bytes per
/// busy endpoint; 10,000 agents send 2,000 a second, which the controller takes in stride.
pub const LOAD_REPORT_EVERY: Duration = Duration::from_secs(5);

/// The `--tls-*` files, read at every connect.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// A TLS file that could not be read, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {flag} {}: {source}", path.display())]
pub struct TlsReadError {
    flag: &'static str,
    path: std::path::PathBuf,
    source: std::io::Error,
}

impl TlsFiles {
    /// Reads the files now, with an error naming the flag and file that failed.
    pub fn load(&self) -> Result<Tls, TlsReadError> {
        let read = |flag: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| TlsReadError {
                flag,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Tls {
            ca_pem: read("--tls-ca", &self.ca)?,
            cert_pem: read("--tls-cert", &self.cert)?,
            key_pem: read("--tls-key", &self.key)?,
        })
    }
}

/// The cache totals of every route's cache: hits (fresh and stale answers) and misses.
pub(crate) fn cache_totals(shared: &Shared) -> (u64, u64) {
    let table = shared.routing.table.load();
    table
        .routes()
        .filter_map(|rt| rt.cache.as_ref())
        .map(|c| c.hits_and_misses())
        .fold((0, 0), |(h, m), (hits, misses)| (h + hits, m + misses))
}

/// TLS material for `https://` controller addresses: the CA the controller's certificate must
/// chain to, and this agent's client certificate (mTLS).
#[derive(Clone)]
pub struct Tls {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
}

impl Tls {
    fn config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }
}

/// Follows the controllers forever.
/// `report_every` is the load-report period (`--load-report-interval`, default
/// [`LOAD_REPORT_EVERY`]).
pub async fn run(
    controllers: Vec<String>,
    shared: Arc<Shared>,
    tls: Option<TlsFiles>,
    report_every: Duration,
) {
    let mut failures: u32 = 0;
    let mut next = 0usize;
    loop {
        let url = &controllers[next % controllers.len()];
        next += 1;
        let got_update = match session(url, &shared, tls.as_ref(), report_every).await {
            Ok(got) => got,
            Err((got, e)) => {
                tracing::warn!(controller = %url, error = %e, "controller stream ended");
                shared.set_status(|s| s.last_error = Some(format!("{url}: {e}")));
                got
            }
        };
        shared.routing.metrics.controller_connected.set(0);
        shared.set_status(|s| s.connected_to = None);
        failures = if got_update {
            0
        } else {
            failures.saturating_add(1)
        };
        let cap = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(6))
            .min(BACKOFF_MAX);
        let delay = rand::rng().random_range(cap / 2..=cap);
        tokio::time::sleep(delay).await;
    }
}

/// One stream's life. Returns whether any update arrived (which resets the backoff).
async fn session(
    url: &str,
    shared: &Shared,
    tls: Option<&TlsFiles>,
    report_every: Duration,
) -> Result<bool, (bool, String)> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| (false, format!("bad controller address: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let Some(tls) = tls else {
            return Err((
                false,
                "https:// controller but no --tls-ca/--tls-cert/--tls-key".into(),
            ));
        };
        // Read now, not at start: the files may have been rotated since.
        let tls = tls.load().map_err(|e| (false, e.to_string()))?;
        endpoint = endpoint
            .tls_config(tls.config())
            .map_err(|e| (false, format!("TLS settings: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| (false, format!("connect: {e}")))?;
    let mut client = RoutingDiscoveryClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: shared.node_name.clone(),
            zone: shared.zone.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            capabilities: vec!["delta".into(), "peer-delta".into()],
            applied_version: shared.routing.table.load().version,
            cache_peer_address: shared
                .cache_peer_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
        })),
    };
    tx.send(hello)
        .await
        .map_err(|_| (false, "stream closed".to_string()))?;
    let mut inbound = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|e| (false, format!("open stream: {e}")))?
        .into_inner();
    tracing::info!(controller = %url, "controller stream open");
    shared.routing.metrics.controller_connected.set(1);
    shared.set_status(|s| {
        s.connected_to = Some(url.to_string());
        s.last_error = None;
    });

    let mut got_update = false;
    let mut report = tokio::time::interval(report_every.max(Duration::from_millis(100)));
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    report.tick().await;
    let mut reporter = LoadReporter::new(&shared.routing.table.load(), std::time::Instant::now());
    let mut silence = std::pin::pin!(tokio::time::sleep(SILENCE_LIMIT));
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = &mut silence => {
                return Err((got_update, "no message from the controller for 45s".into()));
            }
            _ = report.tick() => {
                let (cache_hits, cache_misses) = cache_totals(shared);
                let report =
                    reporter.report(&shared.routing.table.load(), std::time::Instant::now());
                let load = AgentMessage {
                    kind: Some(agent_message::Kind::Load(LoadReport {
                        cache_hits,
                        cache_misses,
                        ..report
                    })),
                };
                if tx.send(load).await.is_err() {
                    return Err((got_update, "stream closed".into()));
                }
                continue;
            }
        };
        silence
            .as_mut()
            .reset(tokio::time::Instant::now() + SILENCE_LIMIT);
        let msg = match next {
            Err(status) => return Err((got_update, status.to_string())),
            Ok(None) => return Err((got_update, "stream closed by the controller".into())),
            Ok(Some(m)) => m,
        };
        let update = match msg.kind {
            Some(controller_message::Kind::Update(update)) => update,
            Some(controller_message::Kind::Peers(peers)) => {
                shared.set_peers(peers);
                continue;
            }
            _ => continue, // pings only prove liveness
        };
        got_update = true;
        let version = update.version;
        let reply = match shared.apply(update) {
            Ok(_) => {
                shared.routing.metrics.updates_applied.inc();
                // Persisted in the background (`state::persist_loop`), not before the ACK,
                // except the first table of this process.
                shared.persist_first().await;
                agent_message::Kind::Ack(Ack { version })
            }
            Err(error) => {
                let error = error.to_string();
                shared.routing.metrics.updates_rejected.inc();
                let applied = shared.routing.table.load().version;
                tracing::error!(version, applied, %error, "routing update rejected; keeping the table in force");
                shared.set_status(|s| {
                    s.last_nack = Some(NackStatus {
                        version,
                        error: error.clone(),
                    })
                });
                agent_message::Kind::Nack(Nack {
                    version,
                    applied_version: applied,
                    error,
                })
            }
        };
        if tx.send(AgentMessage { kind: Some(reply) }).await.is_err() {
            return Err((got_update, "stream closed".into()));
        }
    }
}
