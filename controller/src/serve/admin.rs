//! The controller's admin HTTP API: `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! `/state` (policies with their computed status and errors, backends and endpoints with
//! their health as the agents see it, per-route traffic, manifest file problems, and the
//! connected agents with their versions and last NACK, as JSON; see
//! [`crate::serve::view`]) and `/dashboard` (the same as an HTML page, `/` redirects there).

use crate::serve::dashboard;
use crate::serve::hub::Hub;
use crate::serve::server::{AgentState, Agents};
use crate::serve::view::View;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::net::TcpListener;

/// Agents by how their applied table compares with the one in force.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentStateLabels {
    /// `synced` (runs the table in force), `nacked` (rejected a newer version than the one
    /// it runs), `behind` (not yet ACKed the table in force).
    state: &'static str,
}

/// One label per policy (`namespace/name`): bounded by the policies, never by endpoints or
/// agents, so thousands of pods do not multiply the controller's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

/// Process-level metrics, refreshed from the hub and the agent registry when scraped.
struct Metrics {
    registry: Registry,
    version: Gauge<i64, AtomicI64>,
    agents: Gauge<i64, AtomicI64>,
    agents_by_state: Family<AgentStateLabels, Gauge<i64, AtomicI64>>,
    updates_sent: Gauge<i64, AtomicI64>,
    update_bytes_sent: Gauge<i64, AtomicI64>,
    nacks: Gauge<i64, AtomicI64>,
    policies_rejected: Gauge<i64, AtomicI64>,
    files_broken: Gauge<i64, AtomicI64>,
    active_tier: Family<PolicyLabels, Gauge<i64, AtomicI64>>,
    panic: Family<PolicyLabels, Gauge<i64, AtomicI64>>,
    /// Serialises scrapes: the per-policy families are cleared and refilled on each, and two
    /// scrapes interleaving would show a half-filled family.
    scrape: Mutex<()>,
}

impl Metrics {
    fn new(agents: &Agents) -> Self {
        let mut root = Registry::default();
        let active_tier = Family::<PolicyLabels, Gauge<i64, AtomicI64>>::default();
        let panic = Family::<PolicyLabels, Gauge<i64, AtomicI64>>::default();
        root.register(
            "weir_policy_active_tier",
            "Highest failover tier taking traffic in the policy's rules (0: no failover)",
            active_tier.clone(),
        );
        root.register(
            "weir_policy_panic",
            "1 while some rule of the policy has no healthy endpoint in any tier and routes to all (panic)",
            panic.clone(),
        );
        let registry = root.sub_registry_with_prefix("weir_controller");
        let m = Self {
            registry: Registry::default(),
            agents_by_state: Family::default(),
            active_tier,
            panic,
            scrape: Mutex::new(()),
            version: Gauge::default(),
            agents: Gauge::default(),
            updates_sent: Gauge::default(),
            update_bytes_sent: Gauge::default(),
            nacks: Gauge::default(),
            policies_rejected: Gauge::default(),
            files_broken: Gauge::default(),
        };
        registry.register(
            "table_version",
            "Version of the routing table in force",
            m.version.clone(),
        );
        registry.register(
            "agents_connected",
            "Agents with an open stream",
            m.agents.clone(),
        );
        registry.register(
            "agents",
            "Connected agents by state: synced (runs the table in force), behind (not yet ACKed it), nacked (rejected a newer version)",
            m.agents_by_state.clone(),
        );
        registry.register(
            "agent_nacks",
            "Routing updates rejected by agents (NACKs) since start",
            agents.nacks.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "From a change the controller saw (first event of its debounce) to each agent's ACK of a version carrying it",
            agents.push_latency.clone(),
        );
        // Exposed as gauges that mirror monotonic counters kept in the registry of agents,
        // so the hot gRPC path bumps a plain atomic and nothing else.
        registry.register(
            "updates_sent",
            "Routing updates sent to agents since start",
            m.updates_sent.clone(),
        );
        registry.register(
            "update_bytes_sent",
            "Bytes of routing updates sent to agents since start (each encoded once, shared)",
            m.update_bytes_sent.clone(),
        );
        registry.register(
            "nacks",
            "Routing updates rejected by agents since start",
            m.nacks.clone(),
        );
        registry.register(
            "policies_rejected",
            "TrafficPolicies whose current spec is not in force",
            m.policies_rejected.clone(),
        );
        registry.register(
            "manifest_files_broken",
            "Manifest files that cannot be loaded (local mode)",
            m.files_broken.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }
}

/// How an agent's applied table compares with `current`, the version in force.
fn agent_state(a: &AgentState, current: u64) -> &'static str {
    if a.applied_version == current {
        "synced"
    } else if a
        .last_nack
        .as_ref()
        .is_some_and(|n| n.version > a.applied_version)
    {
        "nacked"
    } else {
        "behind"
    }
}

pub struct Admin {
    pub hub: Arc<Hub>,
    pub agents: Arc<Agents>,
}

impl Admin {
    fn handle(&self, req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                if self.hub.config_state().loaded {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: configuration not loaded yet\n",
                    )
                }
            }
            "/" => Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, "/dashboard")
                .body(Full::new(Bytes::from_static(b"see /dashboard\n")))
                .unwrap_or_default(),
            "/dashboard" => {
                let view = View::capture(&self.hub, &self.agents);
                let body = if req.uri().query() == Some("part=main") {
                    let mut out = String::with_capacity(16 * 1024);
                    dashboard::main(&mut out, &view);
                    out
                } else {
                    dashboard::page(&view)
                };
                Response::builder()
                    .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
                    .header(header::CACHE_CONTROL, "no-store")
                    .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
                    // Nothing but the page itself: no external script, style, image or
                    // connection can be loaded, whatever ends up in it.
                    .header(
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'none'; style-src 'unsafe-inline'; \
                         script-src 'unsafe-inline'; connect-src 'self'",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default()
            }
            "/state" => {
                let view = View::capture(&self.hub, &self.agents).to_json();
                match view.and_then(|v| serde_json::to_vec_pretty(&v)) {
                    Ok(body) => Response::builder()
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default(),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
                }
            }
            "/metrics" => {
                let _scrape = metrics.scrape.lock().unwrap_or_else(|e| e.into_inner());
                let state = self.hub.config_state();
                metrics.version.set(state.version as i64);
                let agents = self.agents.list();
                metrics.agents.set(agents.len() as i64);
                let current = self.hub.current().version;
                let mut by_state = [("synced", 0), ("behind", 0), ("nacked", 0)];
                for a in &agents {
                    let s = agent_state(a, current);
                    if let Some(slot) = by_state.iter_mut().find(|(name, _)| *name == s) {
                        slot.1 += 1;
                    }
                }
                for (name, n) in by_state {
                    metrics
                        .agents_by_state
                        .get_or_create(&AgentStateLabels { state: name })
                        .set(n);
                }
                // Policies come and go: rebuild their series so removed ones disappear.
                metrics.active_tier.clear();
                metrics.panic.clear();
                for (key, p) in state.policies.iter().filter(|(_, p)| p.programmed) {
                    let l = PolicyLabels {
                        policy: key.clone(),
                    };
                    if let Some(tier) = p.active_tier {
                        metrics.active_tier.get_or_create(&l).set(i64::from(tier));
                    }
                    metrics.panic.get_or_create(&l).set(i64::from(p.panic));
                }
                metrics
                    .updates_sent
                    .set(self.agents.updates_sent.load(Ordering::Relaxed) as i64);
                metrics
                    .update_bytes_sent
                    .set(self.agents.bytes_sent.load(Ordering::Relaxed) as i64);
                metrics.nacks.set(self.agents.nacks.get() as i64);
                metrics.policies_rejected.set(
                    state
                        .policies
                        .values()
                        .filter(|p| !p.errors.is_empty())
                        .count() as i64,
                );
                metrics
                    .files_broken
                    .set(state.files.iter().filter(|f| f.error.is_some()).count() as i64);
                let mut out = String::new();
                if let Err(e) = encode(&mut out, &metrics.registry) {
                    return text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n"));
                }
                Response::builder()
                    .header(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(out)))
                    .unwrap_or_default()
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    let metrics = Arc::new(Metrics::new(&admin.agents));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = admin.handle(&req, &metrics);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::server::NackState;

    fn agent(applied: u64, nacked: Option<u64>) -> AgentState {
        AgentState {
            node_name: "n1".into(),
            zone: String::new(),
            agent_version: String::new(),
            peer: String::new(),
            cache_peer_address: String::new(),
            connected_at_unix_ms: 0,
            sent_version: 9,
            applied_version: applied,
            last_ack_unix_ms: None,
            last_report_unix_ms: None,
            last_nack: nacked.map(|version| NackState {
                version,
                error: "bad route".into(),
                at_unix_ms: 0,
            }),
            cache: None,
        }
    }

    #[test]
    fn agents_are_synced_behind_or_stuck_on_a_nack() {
        assert_eq!(agent_state(&agent(9, None), 9), "synced");
        assert_eq!(agent_state(&agent(8, None), 9), "behind");
        assert_eq!(agent_state(&agent(8, Some(9)), 9), "nacked");
        // A NACK it has since moved past (it ACKed a newer version) is history.
        assert_eq!(agent_state(&agent(8, Some(7)), 9), "behind");
        assert_eq!(agent_state(&agent(9, Some(8)), 9), "synced");
    }
}
