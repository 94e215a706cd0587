//! The agent's admin HTTP API: `/healthz`, `/readyz` (ready once a routing table is in
//! force), `/metrics` (Prometheus text) and `/config` (the applied table with the weights in
//! force, the controller's load-aware factors, every endpoint's health and why, and the
//! control connection, as JSON).

use crate::control::state::Shared;
use crate::health::now_ms;
use crate::route::table::RuleRt;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use weir_proto::v1 as pb;

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/cache/purge" {
        if req.method() != Method::POST {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "POST /cache/purge[?host=H][&prefix=/P]\n",
            );
        }
        let purged = purge(shared, req.uri().query().unwrap_or(""));
        return with_type(
            StatusCode::OK,
            "application/json",
            json!({ "purged": purged }).to_string().into_bytes(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if shared.is_draining() {
                // Shutting down: a Service should stop sending while connections drain.
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
            } else if shared.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: no routing table yet\n",
                )
            }
        }
        "/config" => {
            let body = config_json(shared);
            match serde_json::to_vec_pretty(&body) {
                Ok(b) => with_type(StatusCode::OK, "application/json", b),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
        "/metrics" => {
            match refresh_cache_metrics(shared).and_then(|()| shared.routing.metrics.encode()) {
                Ok(s) => with_type(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    s.into_bytes(),
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Copies every route cache's statistics into the metrics families before a scrape.
fn refresh_cache_metrics(shared: &Shared) -> Result<(), std::fmt::Error> {
    use crate::metrics::CacheLabels;
    let table = shared.routing.table.load();
    for rt in table.routes() {
        let Some(cache) = &rt.cache else { continue };
        let st = cache.stats();
        let values = [
            ("hits", st.hits),
            ("misses", st.misses),
            ("stale", st.stale),
            ("coalesced", st.coalesced),
            ("bypass", st.bypass),
            ("stores", st.stores),
            ("evictions", st.evictions),
            ("peer_hits", st.peer_hits),
            ("peer_fills", st.peer_fills),
            ("peer_errors", st.peer_errors),
            ("bytes", st.bytes),
            ("entries", st.entries),
        ];
        // The lower tiers, as more stats of the same family.
        let t = cache.tier_stats().unwrap_or_default();
        let tiers = cache.tier_stats().map(|_| {
            [
                ("disk_hits", t.disk_hits),
                ("disk_misses", t.disk_misses),
                ("disk_bytes", t.disk_bytes),
                ("disk_entries", t.disk_entries),
                ("shared_hits", t.shared_hits),
                ("shared_misses", t.shared_misses),
                ("shared_errors", t.shared_errors),
                ("tier_writes", t.writes),
                ("tier_writes_dropped", t.writes_dropped),
            ]
        });
        for (stat, v) in values.into_iter().chain(tiers.into_iter().flatten()) {
            shared
                .routing
                .metrics
                .cache
                .get_or_create(&CacheLabels {
                    route: rt.name.to_string(),
                    stat,
                })
                .set(v as i64);
        }
    }
    Ok(())
}

/// Purges cached responses: all of them, those of `host=`, or those under `prefix=` (of
/// `host=` when given). Returns how many objects went.
fn purge(shared: &Shared, query: &str) -> u64 {
    let mut host = None;
    let mut prefix = None;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        // Percent-decoded, so a prefix may hold `&`, `=` or `%` (as `%26`, `%3D`, `%25`).
        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        match k {
            "host" => host = Some(v.to_ascii_lowercase()),
            "prefix" => prefix = Some(v.into_owned()),
            _ => {}
        }
    }
    let table = shared.routing.table.load();
    table
        .routes()
        .filter_map(|r| r.cache.as_ref())
        .map(|c| match (&host, &prefix) {
            (None, None) => c.purge_all(),
            (Some(h), None) => c.purge_host(h),
            (h, Some(p)) => c.purge_prefix(h.as_deref(), p),
        })
        .sum()
}

/// The applied table as JSON. Built from the protobuf routes kept in the table, so what is
/// shown is exactly what was received.
pub(crate) fn config_json(shared: &Shared) -> Value {
    let table = shared.routing.table.load();
    let now = now_ms();
    let routes: Vec<Value> = table
        .routes()
        .map(|rt| (rt, &rt.source))
        .map(|(rt, r)| {
            let slow_start_ms = rt.slow_start.map_or(0, |s| s.window_ms);
            json!({
                "name": r.name,
                "hosts": r.hosts,
                "algorithm": r.load_balancer.as_ref()
                    .and_then(|lb| pb::Algorithm::try_from(lb.algorithm).ok())
                    .unwrap_or_default()
                    .as_str_name(),
                "loadAware": r.load_balancer.as_ref().is_some_and(|lb| lb.load_aware),
                // 0 when off (plain consistent hashing or another algorithm).
                "hashBalanceFactor": r.load_balancer.as_ref().map_or(0, |lb| lb.hash_balance_factor),
                "slowStartWindowMs": rt.slow_start.map(|s| s.window_ms),
                "note": rt.note,
                "timeoutMs": rt.timeout.map(|t| t.as_millis() as u64),
                "minHealthyPercent": r.min_healthy_percent,
                "retry": {
                    "attempts": rt.retry.attempts,
                    "perTryTimeoutMs": rt.retry.per_try_timeout.map(|t| t.as_millis() as u64),
                    "budgetPercent": rt.retry.budget_percent,
                },
                "maxRequestsPerEndpoint": rt.max_per_endpoint,
                "rateLimit": rt.rate_limit.as_ref().map(|l| json!({
                    "requestsPerSecond": l.requests_per_second,
                    "burst": l.burst,
                })),
                "cache": rt.cache.as_ref().map(|c| {
                    let st = c.stats();
                    let tiers = c.tier_stats();
                    let (hits, misses) = c.hits_and_misses();
                    let lookups = hits + misses;
                    json!({
                        "stats": st,
                        "hitRatio": if lookups == 0 { 0.0 } else { hits as f64 / lookups as f64 },
                        "maxSize": c.config().max_size,
                        "eviction": c.config().eviction.name(),
                        "diskMaxSize": c.config().disk_max_size,
                        "shared": c.config().shared,
                        "peers": c.config().peers,
                        "tiers": tiers,
                    })
                }),
                "rules": rt.rules.iter().map(|rule| rule_json(rule, now, slow_start_ms)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "node": shared.node_name,
        "zone": shared.zone,
        "version": table.version,
        "ready": shared.is_ready(),
        "control": shared.status(),
        "cachePeerAddress": shared.cache_peer_address.map(|a| a.to_string()),
        "cachePeers": peers_json(shared),
        "routes": routes,
    })
}

/// The cache peers in force: each with whether it is this agent and whether it is passed
/// over (could not be reached lately).
fn peers_json(shared: &Shared) -> Value {
    let set = shared.routing.peers.load();
    let now = crate::health::now_ms();
    set.peers
        .iter()
        .map(|p| {
            json!({
                "node": &*p.node,
                "address": p.addr.to_string(),
                "me": p.me,
                "down": p.is_down(now),
            })
        })
        .collect()
}

/// A rule with the weights in force and every endpoint's health and why (and, with a slow
/// start of `slow_start_ms`, until when each warming endpoint ramps up).
fn rule_json(rt: &RuleRt, now: u64, slow_start_ms: u64) -> Value {
    let rule = &rt.effective;
    let mut members = rt.members.iter();
    json!({
        "matches": rule.matches.iter().map(|m| json!({
            "method": (!m.method.is_empty()).then_some(&m.method),
            "path": m.path.as_ref().map(|p| json!({
                "type": pb::path_match::Kind::try_from(p.kind).map(|k| k.as_str_name()).unwrap_or("?"),
                "value": p.value,
            })),
            "headers": m.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "activeTier": rule.active_tier,
        "panic": rule.panic,
        "mirror": rt.mirror.as_ref().map(|m| json!({
            "service": m.service,
            "percent": m.percent,
            "endpoints": m.targets().map(|a| a.to_string()).collect::<Vec<_>>(),
        })),
        "backends": rule.backends.iter().map(|b| json!({
            "service": b.service,
            "port": b.port,
            "tier": b.tier,
            "weight": b.weight,
            "protocol": pb::Protocol::try_from(b.protocol).map(|p| p.as_str_name()).unwrap_or("?"),
            "endpoints": b.endpoints.iter().map(|e| {
                let health = members.next();
                let why = match health.and_then(|h| h.reason(now)) {
                    Some(r) => Some(r),
                    None if !e.ready => Some("not ready in its EndpointSlice".to_string()),
                    None => None,
                };
                let mut v = json!({
                    "address": e.address,
                    "ready": e.ready,
                    "healthy": e.ready && why.is_none(),
                    "why": why,
                    "zone": e.zone,
                    "weight": e.weight,
                    "inFlight": health.map(|h| h.load.in_flight()),
                    "ejections": health.map(|h| h.ejections()),
                });
                // Wall-clock, unlike the agent's monotonic `now_ms`, so an operator can read it.
                if let Some(until) = health.and_then(|h| h.warming_until(now, slow_start_ms)) {
                    v["warmingUntilUnixMs"] = json!(unix_ms() + (until - now));
                }
                // Asked for less traffic (429 / 503 with Retry-After) until then.
                if let Some(until) = health.and_then(|h| h.throttled_until(now)) {
                    v["throttledUntilUnixMs"] = json!(unix_ms() + (until - now));
                }
                // The controller's load-aware factor, only where it moved off an even share.
                if e.load_permille != 0 {
                    v["loadPermille"] = json!(e.load_permille);
                }
                v
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn with_type(status: StatusCode, ctype: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    resp
}

/// Serves the admin API on `listener` forever.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&shared, &req);
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

    #[test]
    fn config_shows_load_aware_routes_and_their_factors() {
        let s = Shared::new("n".into(), String::new(), None);
        let endpoint = |address: &str, load_permille| pb::Endpoint {
            address: address.into(),
            ready: true,
            weight: 1,
            load_permille,
            ..Default::default()
        };
        let route = pb::Route {
            name: "a/web".into(),
            hosts: vec!["web".into()],
            load_balancer: Some(pb::LoadBalancer {
                load_aware: true,
                ..Default::default()
            }),
            rules: vec![pb::Rule {
                backends: vec![pb::Backend {
                    service: "web".into(),
                    weight: 1,
                    endpoints: vec![endpoint("10.0.0.1:80", 500), endpoint("10.0.0.2:80", 0)],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        s.apply(pb::RoutingUpdate {
            version: 1,
            full: true,
            upserted: vec![route],
            ..Default::default()
        })
        .expect("table");
        let cfg = config_json(&s);
        let r = &cfg["routes"][0];
        assert_eq!(r["loadAware"], true);
        let eps = &r["rules"][0]["backends"][0]["endpoints"];
        assert_eq!(eps[0]["loadPermille"], 500);
        assert!(eps[1].get("loadPermille").is_none(), "{eps}");
    }
}
