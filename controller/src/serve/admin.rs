//! The controller's admin HTTP API: `/healthz`, `/readyz`, `/metrics` (Prometheus text),
//! `/state` (policies with their computed status and errors, backends and endpoints with
//! their health as the agents see it, per-route traffic, manifest file problems, and the
//! connected agents with their versions and last NACK, as JSON; see
//! [`crate::serve::view`]) and `/dashboard` (the same as an HTML page, `/` redirects there).

use crate::serve::dashboard;
use crate::serve::hub::Hub;
use crate::serve::server::Agents;
use crate::serve::view::View;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::net::TcpListener;

/// Process-level metrics, refreshed from the hub and the agent registry when scraped.
struct Metrics {
    registry: Registry,
    version: Gauge<i64, AtomicI64>,
    agents: Gauge<i64, AtomicI64>,
    updates_sent: Gauge<i64, AtomicI64>,
    update_bytes_sent: Gauge<i64, AtomicI64>,
    nacks: Gauge<i64, AtomicI64>,
    policies_rejected: Gauge<i64, AtomicI64>,
    files_broken: Gauge<i64, AtomicI64>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("weir_controller");
        let m = Self {
            registry: Registry::default(),
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
        Self { registry, ..m }
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
                let state = self.hub.config_state();
                metrics.version.set(state.version as i64);
                metrics.agents.set(self.agents.count() as i64);
                metrics
                    .updates_sent
                    .set(self.agents.updates_sent.load(Ordering::Relaxed) as i64);
                metrics
                    .update_bytes_sent
                    .set(self.agents.bytes_sent.load(Ordering::Relaxed) as i64);
                metrics
                    .nacks
                    .set(self.agents.nacks.load(Ordering::Relaxed) as i64);
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
    let metrics = Arc::new(Metrics::new());
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
