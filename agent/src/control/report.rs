//! The agent's LoadReports, read from what the request path counts anyway:
//! - per endpoint, the requests and errors since the previous report (deltas of the counters
//!   kept for `/metrics`), and the latency EWMA and requests in flight (current values of the
//!   balancer's `EndpointLoad`);
//! - per route, the answers by class, local replies, latency histogram buckets and cache
//!   hits/misses since the previous report (deltas of the route's `/metrics` counters);
//! - the endpoints this agent itself keeps traffic from (failing active checks, ejected,
//!   throttled), with why — only those, so a healthy mesh reports nothing there.
//!
//! Reading them is a few relaxed loads per endpoint and route every report; nothing is added
//! to the request path.
//!
//! The endpoint counters are per endpoint address, shared by every route that names it (that
//! is how the request path counts), so an address used by several routes is reported once,
//! under the first of them by name. The controller adds the reports up by address anyway.

use crate::metrics::{BUCKETS, RouteTotals};
use crate::route::table::Table;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use weir_proto::v1::LoadReport;
use weir_proto::v1::load_report::endpoint_health::Problem;
use weir_proto::v1::load_report::{EndpointHealth, EndpointLoad, RouteTraffic};

/// What a route had counted at the previous report.
#[derive(Debug, Clone, Copy, Default)]
struct RouteMark {
    totals: RouteTotals,
    /// Cache (hits + stale, misses).
    cache: (u64, u64),
}

/// Remembers the counters at the previous report, to report differences.
#[derive(Debug)]
pub(crate) struct LoadReporter {
    /// (requests, errors) at the previous report, by address, for the endpoints of the table
    /// in force then.
    last: HashMap<SocketAddr, (u64, u64)>,
    /// Route counters at the previous report, by route name.
    routes: HashMap<Arc<str>, RouteMark>,
    at: Instant,
}

/// `now - before`, or all of `now` when the counter went down: a counter only goes down when
/// its series was forgotten and made again (route or endpoint removed and back), so
/// everything it holds is new.
fn since(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

impl LoadReporter {
    /// Starts counting at `now`: the first report covers what happens from then on.
    pub(crate) fn new(table: &Table, now: Instant) -> Self {
        let mut reporter = Self {
            last: HashMap::new(),
            routes: HashMap::new(),
            at: now,
        };
        let _ = reporter.report(table, now);
        reporter
    }

    /// The report on `table` since the previous one (cache totals left at 0 for the caller).
    pub(crate) fn report(&mut self, table: &Table, now: Instant) -> LoadReport {
        let endpoints = self.endpoints(table);
        let routes = self.routes(table);
        let interval_ms = now.saturating_duration_since(self.at).as_millis() as u64;
        self.at = now;
        LoadReport {
            endpoints,
            interval_ms,
            unhealthy: unhealthy(table, crate::health::now_ms()),
            latency_bounds_ms: if routes.is_empty() {
                Vec::new()
            } else {
                BUCKETS.iter().map(|s| s * 1000.0).collect()
            },
            routes,
            ..LoadReport::default()
        }
    }

    /// The endpoints of `table` that took requests since the previous report.
    fn endpoints(&mut self, table: &Table) -> Vec<EndpointLoad> {
        let mut next = HashMap::with_capacity(self.last.len());
        let mut out = Vec::new();
        for rt in table.routes() {
            for m in rt.rules.iter().flat_map(|rule| rule.members.iter()) {
                let std::collections::hash_map::Entry::Vacant(slot) = next.entry(m.addr) else {
                    continue; // reported under an earlier route
                };
                let now_counts = (m.counters.requests.get(), m.counters.failures.get());
                slot.insert(now_counts);
                let (requests, errors) = match self.last.get(&m.addr) {
                    Some(&(r, e)) if now_counts.0 >= r => {
                        (now_counts.0 - r, now_counts.1.saturating_sub(e))
                    }
                    _ => now_counts,
                };
                if requests == 0 {
                    continue;
                }
                out.push(EndpointLoad {
                    route: rt.name.to_string(),
                    address: m.addr.to_string(),
                    requests,
                    errors: errors.min(requests),
                    latency_ewma_ms: m.load.latency_ewma_ms().unwrap_or(0.0),
                    in_flight: m.load.in_flight(),
                });
            }
        }
        self.last = next;
        out
    }

    /// The routes of `table` that answered requests or used their cache since the previous
    /// report.
    fn routes(&mut self, table: &Table) -> Vec<RouteTraffic> {
        let mut next = HashMap::with_capacity(self.routes.len());
        let mut out = Vec::new();
        for rt in table.routes() {
            let mark = RouteMark {
                totals: rt.counters.totals(),
                cache: rt.cache.as_ref().map_or((0, 0), |c| c.hits_and_misses()),
            };
            let before = self
                .routes
                .get(&rt.shared_name)
                .copied()
                .unwrap_or_default();
            next.insert(rt.shared_name.clone(), mark);
            let class = |i: usize| since(mark.totals.by_class[i], before.totals.by_class[i]);
            let requests: u64 = (0..5).map(class).sum();
            let cache_hits = since(mark.cache.0, before.cache.0);
            let cache_misses = since(mark.cache.1, before.cache.1);
            if requests == 0 && cache_hits == 0 && cache_misses == 0 {
                continue;
            }
            out.push(RouteTraffic {
                route: rt.name.to_string(),
                requests,
                responses_5xx: class(4),
                responses_4xx: class(3),
                local_replies: since(mark.totals.local_replies, before.totals.local_replies),
                latency_buckets: mark
                    .totals
                    .latency
                    .iter()
                    .zip(before.totals.latency.iter())
                    .map(|(now, was)| since(*now, *was))
                    .collect(),
                cache_hits,
                cache_misses,
            });
        }
        self.routes = next;
        out
    }
}

/// The endpoints of `table` this agent keeps traffic from at `now_ms`, and why.
fn unhealthy(table: &Table, now_ms: u64) -> Vec<EndpointHealth> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in table
        .routes()
        .flat_map(|rt| rt.rules.iter())
        .flat_map(|rule| rule.members.iter())
    {
        if !seen.insert(m.addr) {
            continue;
        }
        // One entry per problem: an endpoint can fail its check and be ejected at once. The
        // endpoint keeps one reason text (its latest transition), so each entry uses it only
        // when it is about that problem.
        let reason = (!m.is_healthy(now_ms))
            .then(|| m.reason(now_ms))
            .flatten()
            .unwrap_or_default();
        if !m.active_check_passing() {
            out.push(EndpointHealth {
                address: m.addr.to_string(),
                problem: Problem::ActiveCheckFailing as i32,
                detail: if reason.starts_with("active") {
                    reason.clone()
                } else {
                    "active health check failing".into()
                },
            });
        }
        if m.is_ejected(now_ms) {
            out.push(EndpointHealth {
                address: m.addr.to_string(),
                problem: Problem::Ejected as i32,
                detail: if reason.starts_with("ejected") {
                    reason
                } else {
                    let left = m.ejected_until().unwrap_or(now_ms).saturating_sub(now_ms);
                    format!("ejected by outlier detection for {} s more", left / 1000)
                },
            });
        }
        if let Some(until) = m.throttled_until(now_ms) {
            out.push(EndpointHealth {
                address: m.addr.to_string(),
                problem: Problem::Throttled as i32,
                detail: format!(
                    "answered 429 or 503 with Retry-After: less traffic for {} ms more",
                    until - now_ms
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::state::Shared;
    use std::time::Duration;
    use weir_proto::v1 as pb;

    fn route(name: &str, endpoints: &[&str]) -> pb::Route {
        pb::Route {
            name: name.into(),
            hosts: vec![name.into()],
            rules: vec![pb::Rule {
                backends: vec![pb::Backend {
                    service: "svc".into(),
                    weight: 1,
                    endpoints: endpoints
                        .iter()
                        .map(|a| pb::Endpoint {
                            address: a.to_string(),
                            ready: true,
                            weight: 1,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn reports_what_each_endpoint_took_since_the_previous_report() {
        let s = Shared::new("n".into(), String::new(), None);
        let t = s
            .apply(pb::RoutingUpdate {
                version: 1,
                full: true,
                upserted: vec![
                    route("a", &["10.0.0.1:80", "10.0.0.2:80"]),
                    route("b", &["10.0.0.2:80", "10.0.0.3:80"]),
                ],
                ..Default::default()
            })
            .expect("table");
        let member = |addr: &str| {
            t.routes()
                .flat_map(|r| r.rules.iter())
                .flat_map(|r| r.members.iter())
                .find(|m| m.addr.to_string() == addr)
                .expect("member")
                .clone()
        };
        let (e1, e2) = (member("10.0.0.1:80"), member("10.0.0.2:80"));
        // Counts from before the reporter started are not reported.
        e1.counters.requests.inc_by(100);
        let t0 = Instant::now();
        let mut reporter = LoadReporter::new(&t, t0);
        e1.counters.requests.inc_by(5);
        e1.counters.failures.inc();
        e1.load.start();
        e1.load
            .end(Duration::from_millis(4), crate::health::now_nanos());
        e1.load.start();
        e2.counters.requests.inc_by(3);

        let r = reporter.report(&t, t0 + Duration::from_millis(5_000));
        let (got, interval) = (r.endpoints, r.interval_ms);
        assert_eq!(interval, 5_000);
        assert_eq!(got.len(), 2, "10.0.0.3 took nothing: {got:?}");
        assert_eq!(
            (got[0].route.as_str(), got[0].address.as_str()),
            ("a", "10.0.0.1:80")
        );
        assert_eq!(
            (got[0].requests, got[0].errors, got[0].in_flight),
            (5, 1, 1)
        );
        assert!((got[0].latency_ewma_ms - 4.0).abs() < 1e-9, "{got:?}");
        // Shared by a and b: reported once, under a.
        assert_eq!(
            (
                got[1].route.as_str(),
                got[1].address.as_str(),
                got[1].requests
            ),
            ("a", "10.0.0.2:80", 3)
        );
        assert_eq!(got[1].latency_ewma_ms, 0.0, "no sample yet");

        e2.counters.requests.inc_by(2);
        let r = reporter.report(&t, t0 + Duration::from_millis(9_000));
        let (got, interval) = (r.endpoints, r.interval_ms);
        assert_eq!(interval, 4_000);
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].address.as_str(), got[0].requests),
            ("10.0.0.2:80", 2)
        );
        let got = reporter.report(&t, t0 + Duration::from_millis(9_500));
        assert!(got.endpoints.is_empty());
    }

    #[test]
    fn reports_route_traffic_deltas_and_only_the_unhealthy_endpoints() {
        let s = Shared::new("n".into(), String::new(), None);
        let t = s
            .apply(pb::RoutingUpdate {
                version: 1,
                full: true,
                upserted: vec![
                    route("a", &["10.0.0.1:80", "10.0.0.2:80"]),
                    route("b", &["10.0.0.3:80"]),
                ],
                ..Default::default()
            })
            .expect("table");
        let rt = |name: &str| {
            t.routes()
                .find(|r| &*r.name == name)
                .expect("route")
                .clone()
        };
        let a = rt("a");
        // Before the reporter: not reported.
        a.counters.response(http::StatusCode::OK);
        let t0 = Instant::now();
        let mut reporter = LoadReporter::new(&t, t0);
        for _ in 0..3 {
            a.counters.response(http::StatusCode::OK);
            a.counters.latency.observe(Duration::from_micros(300));
        }
        a.counters.response(http::StatusCode::INTERNAL_SERVER_ERROR);
        a.counters.latency.observe(Duration::from_millis(30));
        a.counters
            .reply(crate::http::reply::LocalReply::NoHealthyEndpoint);
        let sick = a.rules[0].members[1].clone();
        assert!(sick.set_active(false, "HTTP 500"));

        let r = reporter.report(&t, t0 + Duration::from_millis(5_000));
        assert_eq!(r.routes.len(), 1, "b saw nothing: {:?}", r.routes);
        let got = &r.routes[0];
        assert_eq!(got.route, "a");
        assert_eq!(
            (
                got.requests,
                got.responses_5xx,
                got.responses_4xx,
                got.local_replies
            ),
            (5, 2, 0, 1)
        );
        assert_eq!(got.latency_buckets.len(), BUCKETS.len() + 1);
        assert_eq!(got.latency_buckets[0], 3, "{:?}", got.latency_buckets);
        assert_eq!(got.latency_buckets.iter().sum::<u64>(), 4);
        assert_eq!(r.latency_bounds_ms.len(), BUCKETS.len());
        assert!((r.latency_bounds_ms[0] - 0.5).abs() < 1e-9);
        assert_eq!(r.unhealthy.len(), 1, "{:?}", r.unhealthy);
        assert_eq!(r.unhealthy[0].address, "10.0.0.2:80");
        assert_eq!(r.unhealthy[0].problem, Problem::ActiveCheckFailing as i32);
        assert!(
            r.unhealthy[0].detail.contains("HTTP 500"),
            "{:?}",
            r.unhealthy
        );

        // Nothing new: no route traffic; the endpoint is still unhealthy, so still listed.
        let r = reporter.report(&t, t0 + Duration::from_millis(10_000));
        assert!(r.routes.is_empty(), "{:?}", r.routes);
        assert!(r.latency_bounds_ms.is_empty());
        assert_eq!(r.unhealthy.len(), 1);
        assert!(sick.set_active(true, ""));
        let r = reporter.report(&t, t0 + Duration::from_millis(15_000));
        assert!(r.unhealthy.is_empty(), "{:?}", r.unhealthy);
    }
}
