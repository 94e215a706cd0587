//! Active health checks, and the control-thread loop that turns health transitions into
//! table rebuilds.
//!
//! One task per (endpoint, check settings) probes the endpoint with an HTTP GET at the
//! policy's interval (jittered ±10 % so a thousand agents do not probe in step), and flips the
//! endpoint's verdict after `unhealthyThreshold` failures or `healthyThreshold` successes in
//! a row. An endpoint starts healthy: the EndpointSlice already said it is ready, and failing
//! closed on start-up would blackhole a fresh agent's traffic for a whole interval.

use crate::control::state::Shared;
use crate::health::{EndpointHealth, Event, now_ms};
use crate::route::table::Table;
use bytes::Bytes;
use http::{HeaderValue, Request, header};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Settings of one active check, as the policy gives them (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CheckSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) path: String,
    pub(crate) host: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) healthy_threshold: u32,
    pub(crate) unhealthy_threshold: u32,
    /// Probe with `grpc.health.v1.Health/Check` for this service name instead of a GET.
    pub(crate) grpc_service: Option<String>,
}

/// The desired checks of a table.
pub(crate) fn desired(table: &Table) -> HashMap<CheckSpec, Arc<EndpointHealth>> {
    let mut out = HashMap::new();
    for rt in table.routes() {
        let route = &rt.source;
        let Some(hc) = &route.health_check else {
            continue;
        };
        if hc.grpc_service.is_none() && hc.path.is_empty() {
            continue;
        }
        for rule in rt.rules.iter() {
            for m in rule.members.iter() {
                let spec = CheckSpec {
                    addr: m.addr,
                    path: hc.path.clone(),
                    host: route.hosts.first().cloned().unwrap_or_default(),
                    interval: ms_or(hc.interval_ms, 5_000),
                    timeout: ms_or(hc.timeout_ms, 1_000),
                    healthy_threshold: hc.healthy_threshold.max(1),
                    unhealthy_threshold: hc.unhealthy_threshold.max(1),
                    grpc_service: hc.grpc_service.clone(),
                };
                out.insert(spec, m.clone());
            }
        }
    }
    out
}

fn ms_or(ms: u64, default: u64) -> Duration {
    Duration::from_millis(if ms == 0 { default } else { ms })
}

/// The running checks.
#[derive(Default)]
pub(crate) struct Checks {
    running: HashMap<CheckSpec, (Arc<EndpointHealth>, JoinHandle<()>)>,
}

impl Checks {
    /// Starts the checks `table` wants and stops the others. An endpoint whose check is
    /// stopped is healthy again as far as active checking goes.
    pub(crate) fn reconcile(&mut self, table: &Table, shared: &Arc<Shared>) {
        let want = desired(table);
        let mut changed = false;
        self.running.retain(|spec, (health, task)| {
            if want.contains_key(spec) {
                return true;
            }
            task.abort();
            changed |= health.set_active(true, "");
            false
        });
        for (spec, health) in want {
            if self.running.contains_key(&spec) {
                continue;
            }
            let task = tokio::spawn(probe_loop(spec.clone(), health.clone(), shared.clone()));
            self.running.insert(spec, (health, task));
        }
        if changed {
            shared.routing.endpoints.notify(Event::Changed);
        }
    }
}

async fn probe_loop(spec: CheckSpec, health: Arc<EndpointHealth>, shared: Arc<Shared>) {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let uri = format!("http://{}{}", spec.addr, spec.path);
    let host = HeaderValue::from_str(&spec.host).unwrap_or(HeaderValue::from_static("localhost"));
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    // Spread the first probe over one interval.
    let first = rand::rng().random_range(0.0..1.0) * spec.interval.as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(first)).await;
    loop {
        let verdict = match &spec.grpc_service {
            Some(service) => grpc_probe(&spec, service).await,
            None => http_probe(&client, &uri, &host, spec.timeout).await,
        };
        match verdict {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                if ok_run >= spec.healthy_threshold && health.set_active(true, "") {
                    tracing::info!(endpoint = %spec.addr, path = %spec.path, "active health check passing again");
                    shared.routing.endpoints.notify(Event::Changed);
                }
            }
            Err(why) => {
                fail_run += 1;
                ok_run = 0;
                let why = why.to_string();
                if fail_run >= spec.unhealthy_threshold && health.set_active(false, &why) {
                    tracing::warn!(endpoint = %spec.addr, path = %spec.path, %why, "active health check failing; endpoint taken out");
                    shared.routing.endpoints.notify(Event::Changed);
                }
            }
        }
        let jitter = rand::rng().random_range(0.9..1.1);
        tokio::time::sleep(spec.interval.mul_f64(jitter)).await;
    }
}

/// Why an active check failed; its text is what `/config` shows as the endpoint's `why`.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("bad check request: {0}")]
    Request(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed: {0}")]
    Failed(String),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("grpc.health.v1 {0:?}: {1}")]
    Grpc(tonic::Code, String),
    #[error("grpc.health.v1 status {0}")]
    NotServing(&'static str),
    #[error("grpc.health.v1 unknown status")]
    UnknownStatus,
}

async fn http_probe(
    client: &Client<HttpConnector, Empty<Bytes>>,
    uri: &str,
    host: &HeaderValue,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let req = Request::get(uri)
        .header(header::HOST, host.clone())
        .header(header::USER_AGENT, "weir-health-check")
        .body(Empty::new())
        .map_err(|e| ProbeError::Request(e.to_string()))?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(ProbeError::Timeout(timeout)),
        Ok(Err(e)) => Err(ProbeError::Failed(e.to_string())),
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(ProbeError::Status(resp.status().as_u16())),
    }
}

/// The gRPC Health Checking Protocol over h2c: SERVING passes, anything else fails.
async fn grpc_probe(spec: &CheckSpec, service: &str) -> Result<(), ProbeError> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let probe = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", spec.addr))
            .map_err(|e| ProbeError::Request(e.to_string()))?
            .connect_timeout(spec.timeout)
            .connect()
            .await
            .map_err(|e| ProbeError::Connect(e.to_string()))?;
        let resp = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .map_err(|s| ProbeError::Grpc(s.code(), s.message().to_owned()))?;
        match ServingStatus::try_from(resp.into_inner().status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(ProbeError::NotServing(other.as_str_name())),
            Err(_) => Err(ProbeError::UnknownStatus),
        }
    };
    match tokio::time::timeout(spec.timeout, probe).await {
        Err(_) => Err(ProbeError::Timeout(spec.timeout)),
        Ok(r) => r,
    }
}

/// The control thread's health loop: rebuilds the table on every transition, readmits
/// ejected endpoints when their time is up, rebuilds every warm-up tick while endpoints are
/// in slow start (their weights are fixed at build), and keeps the active checks in line
/// with the table in force.
pub async fn run(shared: Arc<Shared>) {
    let Some(mut events) = shared.take_events() else {
        return;
    };
    let mut checks = Checks::default();
    let mut seen: Option<Arc<Table>> = None;
    // When the next slow-start rebuild is due. Kept across wake-ups, so that controller
    // updates arriving more often than the tick cannot postpone it forever.
    let mut warm_up_due: Option<Instant> = None;
    loop {
        let current = shared.routing.table.load_full();
        warm_up_due = current
            .warm_up_tick()
            .map(|tick| warm_up_due.unwrap_or_else(|| Instant::now() + tick));
        if seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &current)) {
            checks.reconcile(&current, &shared);
            seen = Some(current);
        }
        let next_readmission = shared
            .routing
            .endpoints
            .all()
            .iter()
            .filter_map(|e| e.ejected_until())
            .min();
        let wait = next_readmission
            .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
            .into_iter()
            .chain(warm_up_due.map(|due| due.saturating_duration_since(Instant::now())))
            .min()
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            ev = events.recv() => {
                if ev.is_none() {
                    return;
                }
                // Coalesce a burst of transitions into one rebuild.
                while events.try_recv().is_ok() {}
                shared.rebuild();
                warm_up_due = None;
            }
            _ = tokio::time::sleep(wait) => {
                let now = now_ms();
                let mut any = false;
                for e in shared.routing.endpoints.all() {
                    if e.readmit_if_due(now) {
                        tracing::info!(endpoint = %e.addr, "ejection over; endpoint readmitted");
                        any = true;
                    }
                }
                // A warm-up tick rebuilds even with no readmission: the ramp moved on.
                let warm_up = warm_up_due.is_some_and(|due| due <= Instant::now());
                if any || warm_up {
                    shared.rebuild();
                    warm_up_due = None;
                }
            }
            _ = shared.table_changed.notified() => {}
        }
    }
}
