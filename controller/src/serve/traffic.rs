//! What the agents see, for `/state` and the dashboard: the last LoadReport of every
//! connected agent (with when it arrived), and the pure aggregation of those reports into
//! per-route traffic (rps, 5xx ratio, p99, cache hit ratio) and per-endpoint agent-side
//! health (how many agents hold it unhealthy, and why).
//!
//! Only the last report per agent is kept (a few hundred bytes per busy route), replaced on
//! every report and dropped when the agent disconnects, so memory follows the number of
//! agents, not time. Reports older than [`STALE_AFTER_INTERVALS`] of the agent's own report
//! interval are left out of every figure: an agent that went silent stops counting without
//! anyone having to notice its stream died.

use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weir_proto::v1::LoadReport;
use weir_proto::v1::load_report::endpoint_health::Problem;

/// A report older than this many of its agent's report intervals no longer counts.
pub(crate) const STALE_AFTER_INTERVALS: u32 = 3;
/// The interval assumed for a report that does not say (the agent's default).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// One agent's last report.
#[derive(Debug, Clone)]
pub(crate) struct LastReport {
    pub node: String,
    pub at: Instant,
    pub report: LoadReport,
}

impl LastReport {
    fn interval(&self) -> Duration {
        match self.report.interval_ms {
            0 => DEFAULT_INTERVAL,
            ms => Duration::from_millis(ms),
        }
    }

    /// Whether the agent reported within the last [`STALE_AFTER_INTERVALS`] intervals.
    pub(crate) fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.at) <= self.interval() * STALE_AFTER_INTERVALS
    }
}

/// The last report of every connected agent, by session id.
#[derive(Debug, Default)]
pub(crate) struct Reports(Mutex<BTreeMap<u64, LastReport>>);

impl Reports {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, LastReport>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `report` as session `id`'s last one (the previous one is dropped).
    pub(crate) fn record(&self, id: u64, node: String, report: LoadReport, at: Instant) {
        self.lock().insert(id, LastReport { node, at, report });
    }

    /// Forgets a session that ended.
    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Aggregates the fresh reports at `now`.
    pub(crate) fn observed(&self, now: Instant) -> Observed {
        aggregate(self.lock().values(), now)
    }
}

/// One policy's traffic over the agents' last report intervals (`/state`
/// `policies[*].traffic`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Traffic {
    /// Requests per second, summed over agents (each agent's requests over its interval).
    pub rps: f64,
    /// Requests in the agents' last intervals, summed.
    pub requests: u64,
    /// Share of answers with a 5xx status (local replies included); null without requests.
    pub error_ratio: Option<f64>,
    /// 99th percentile of the time to the upstream's response head, in ms, from the merged
    /// latency histograms (interpolated inside the bucket); null without samples.
    pub p99_ms: Option<f64>,
    /// Cache hits / (hits + misses); null when the route's cache was not used.
    pub cache_hit_ratio: Option<f64>,
    /// Agents whose last (fresh) report carried traffic for this route.
    pub agents: u32,
}

/// Why one agent holds an endpoint unhealthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HealthReason {
    pub node: String,
    /// `activeCheckFailing`, `ejected` or `throttled`.
    pub problem: &'static str,
    pub detail: String,
}

/// One endpoint's health as the agents see it (`/state`
/// `policies[*].backends[*].endpoints[*].agentHealth`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentHealth {
    /// Agents that hold the endpoint unhealthy (for any reason).
    pub unhealthy_on: u32,
    /// Agents with a fresh report (the agents whose view is known).
    pub of: u32,
    /// One per (agent, problem), sorted by node.
    pub reasons: Vec<HealthReason>,
}

/// Every figure derived from the fresh reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Observed {
    /// By route name (`namespace/name`); routes no agent reported are absent.
    pub routes: BTreeMap<String, Traffic>,
    /// By endpoint address; only endpoints some agent holds unhealthy.
    pub unhealthy: BTreeMap<String, AgentHealth>,
    /// Agents with a fresh report.
    pub agents: u32,
}

impl Observed {
    /// The agent-side health of `address`: unhealthy nowhere unless reported.
    pub(crate) fn health(&self, address: &str) -> AgentHealth {
        self.unhealthy.get(address).cloned().unwrap_or(AgentHealth {
            of: self.agents,
            ..AgentHealth::default()
        })
    }
}

fn problem_name(p: i32) -> &'static str {
    match Problem::try_from(p) {
        Ok(Problem::ActiveCheckFailing) => "activeCheckFailing",
        Ok(Problem::Ejected) => "ejected",
        Ok(Problem::Throttled) => "throttled",
        // Unset, or a newer agent's problem this controller does not know yet.
        Ok(Problem::Unspecified) | Err(_) => "unknown",
    }
}

/// Sums of one route over agents, before the ratios.
#[derive(Default)]
struct RouteSums {
    rps: f64,
    requests: u64,
    errors: u64,
    cache_hits: u64,
    cache_misses: u64,
    bounds: Option<Vec<f64>>,
    buckets: Vec<u64>,
    agents: u32,
}

/// Aggregates the fresh reports among `reports` at `now`.
pub(crate) fn aggregate<'a>(
    reports: impl IntoIterator<Item = &'a LastReport>,
    now: Instant,
) -> Observed {
    let mut sums: BTreeMap<&str, RouteSums> = BTreeMap::new();
    // Address → (nodes that hold it unhealthy, reasons).
    let mut sick: BTreeMap<&str, (BTreeSet<&str>, Vec<HealthReason>)> = BTreeMap::new();
    let mut agents = 0;
    for last in reports.into_iter().filter(|r| r.is_fresh(now)) {
        agents += 1;
        let r = &last.report;
        let secs = r.interval_ms as f64 / 1000.0;
        for t in &r.routes {
            let s = sums.entry(t.route.as_str()).or_default();
            s.agents += 1;
            s.requests += t.requests;
            if secs > 0.0 {
                s.rps += t.requests as f64 / secs;
            }
            s.errors += t.responses_5xx;
            s.cache_hits += t.cache_hits;
            s.cache_misses += t.cache_misses;
            // Histograms merge only over the same bounds (agents of one release share
            // them); a report with other bounds still counts everywhere but in the p99.
            let bounds_fit = t.latency_buckets.len() == r.latency_bounds_ms.len() + 1;
            match &s.bounds {
                _ if !bounds_fit => {}
                None => {
                    s.bounds = Some(r.latency_bounds_ms.clone());
                    s.buckets = t.latency_buckets.clone();
                }
                Some(b) if *b == r.latency_bounds_ms => {
                    for (sum, n) in s.buckets.iter_mut().zip(&t.latency_buckets) {
                        *sum += n;
                    }
                }
                Some(_) => {}
            }
        }
        for u in &r.unhealthy {
            let (nodes, reasons) = sick.entry(u.address.as_str()).or_default();
            nodes.insert(last.node.as_str());
            reasons.push(HealthReason {
                node: last.node.clone(),
                problem: problem_name(u.problem),
                detail: u.detail.clone(),
            });
        }
    }
    let ratio = |part: u64, whole: u64| (whole > 0).then(|| part as f64 / whole as f64);
    Observed {
        routes: sums
            .into_iter()
            .map(|(route, s)| {
                let p99_ms = s
                    .bounds
                    .as_deref()
                    .and_then(|b| quantile(b, &s.buckets, 0.99));
                let traffic = Traffic {
                    rps: s.rps,
                    requests: s.requests,
                    error_ratio: ratio(s.errors, s.requests),
                    p99_ms,
                    cache_hit_ratio: ratio(s.cache_hits, s.cache_hits + s.cache_misses),
                    agents: s.agents,
                };
                (route.to_string(), traffic)
            })
            .collect(),
        unhealthy: sick
            .into_iter()
            .map(|(address, (nodes, mut reasons))| {
                reasons.sort_by(|a, b| (&a.node, a.problem).cmp(&(&b.node, b.problem)));
                let health = AgentHealth {
                    unhealthy_on: nodes.len() as u32,
                    of: agents,
                    reasons,
                };
                (address.to_string(), health)
            })
            .collect(),
        agents,
    }
}

/// The `q` quantile (0..=1) of a histogram with upper `bounds` (ascending) and non-cumulative
/// `counts` (one more than the bounds: the last is +Inf), interpolated linearly inside the
/// bucket it falls in, as Prometheus' `histogram_quantile` does: the first bucket starts at
/// 0, and a quantile in the +Inf bucket is the largest finite bound. `None` without samples.
pub(crate) fn quantile(bounds: &[f64], counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 || counts.len() != bounds.len() + 1 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        let through = below + n;
        if n > 0 && through as f64 >= rank {
            let Some(&upper) = bounds.get(i) else {
                return bounds.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
            return Some(lower + (upper - lower) * (rank - below as f64) / n as f64);
        }
        below = through;
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::v1::load_report::{EndpointHealth, RouteTraffic};

    const BOUNDS: [f64; 3] = [1.0, 10.0, 100.0];

    fn assert_close(got: Option<f64>, want: f64) {
        let got = got.expect("a quantile");
        assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
    }

    #[test]
    fn p99_is_interpolated_inside_its_bucket() {
        // 100 samples: 90 under 1 ms, 10 in (1, 10]: the 99th is the 9th of those 10.
        assert_close(quantile(&BOUNDS, &[90, 10, 0, 0], 0.99), 1.0 + 9.0 * 0.9);
        // All in the first bucket: from 0 up.
        assert_close(quantile(&BOUNDS, &[100, 0, 0, 0], 0.5), 0.5);
        // The median of 10 samples evenly in (10, 100].
        assert_close(quantile(&BOUNDS, &[0, 0, 10, 0], 0.5), 55.0);
        // Beyond the last bound: the largest finite bound, not infinity.
        assert_close(quantile(&BOUNDS, &[1, 0, 0, 99], 0.99), 100.0);
        // Empty buckets before the rank are skipped, not interpolated into.
        assert_close(quantile(&BOUNDS, &[0, 0, 1, 0], 0.99), 10.0 + 90.0 * 0.99);
    }

    #[test]
    fn p99_needs_samples_and_matching_shapes() {
        assert_eq!(quantile(&BOUNDS, &[0, 0, 0, 0], 0.99), None);
        assert_eq!(quantile(&BOUNDS, &[1, 2], 0.99), None);
    }

    fn report(node: &str, at: Instant, interval_ms: u64, routes: Vec<RouteTraffic>) -> LastReport {
        LastReport {
            node: node.into(),
            at,
            report: LoadReport {
                interval_ms,
                latency_bounds_ms: BOUNDS.to_vec(),
                routes,
                ..LoadReport::default()
            },
        }
    }

    fn traffic(route: &str, requests: u64, errors: u64, buckets: [u64; 4]) -> RouteTraffic {
        RouteTraffic {
            route: route.into(),
            requests,
            responses_5xx: errors,
            latency_buckets: buckets.to_vec(),
            ..RouteTraffic::default()
        }
    }

    #[test]
    fn routes_sum_over_agents_and_ratios_use_the_sums() {
        let now = Instant::now();
        let mut a = report(
            "n1",
            now,
            5_000,
            vec![traffic("ns/web", 500, 5, [99, 1, 0, 0])],
        );
        a.report.routes[0].cache_hits = 30;
        a.report.routes[0].cache_misses = 10;
        let b = report(
            "n2",
            now,
            2_000,
            vec![
                traffic("ns/web", 100, 15, [0, 0, 100, 0]),
                traffic("ns/api", 10, 0, [10, 0, 0, 0]),
            ],
        );
        let got = aggregate([&a, &b], now);
        assert_eq!(got.agents, 2);
        let web = &got.routes["ns/web"];
        // 500 in 5 s + 100 in 2 s.
        assert!((web.rps - 150.0).abs() < 1e-9, "{web:?}");
        assert_eq!(web.requests, 600);
        assert_close(web.error_ratio, 20.0 / 600.0);
        assert_eq!(web.cache_hit_ratio, Some(0.75));
        assert_eq!(web.agents, 2);
        // Merged [99, 1, 100, 0]: rank 198 of 200 is the 98th of the 100 in (10, 100].
        let p99 = web.p99_ms.expect("p99");
        assert!((p99 - (10.0 + 90.0 * 0.98)).abs() < 1e-9, "{p99}");
        let api = &got.routes["ns/api"];
        assert_eq!(
            (api.agents, api.error_ratio, api.cache_hit_ratio),
            (1, Some(0.0), None)
        );
    }

    #[test]
    fn silent_agents_stop_counting_after_three_of_their_intervals() {
        let t0 = Instant::now();
        let quick = report(
            "n1",
            t0,
            1_000,
            vec![traffic("ns/web", 10, 0, [10, 0, 0, 0])],
        );
        let slow = report(
            "n2",
            t0,
            5_000,
            vec![traffic("ns/web", 50, 0, [50, 0, 0, 0])],
        );
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            aggregate([&quick, &slow], at(3_000)).routes["ns/web"].agents,
            2
        );
        // 3.5 s: more than 3 of n1's 1 s intervals, less than 3 of n2's 5 s.
        let got = aggregate([&quick, &slow], at(3_500));
        assert_eq!(got.agents, 1);
        assert_eq!(got.routes["ns/web"].requests, 50);
        assert!((got.routes["ns/web"].rps - 10.0).abs() < 1e-9);
        let got = aggregate([&quick, &slow], at(15_001));
        assert_eq!(got.agents, 0);
        assert!(got.routes.is_empty());
    }

    #[test]
    fn endpoint_health_counts_agents_and_keeps_every_reason() {
        let now = Instant::now();
        let sick = |address: &str, problem: Problem, detail: &str| EndpointHealth {
            address: address.into(),
            problem: problem as i32,
            detail: detail.into(),
        };
        let mut a = report("n2", now, 5_000, Vec::new());
        a.report.unhealthy = vec![
            sick(
                "10.0.0.1:80",
                Problem::ActiveCheckFailing,
                "active health check failing: HTTP 500",
            ),
            sick("10.0.0.1:80", Problem::Throttled, "429"),
        ];
        let mut b = report("n1", now, 5_000, Vec::new());
        b.report.unhealthy = vec![sick("10.0.0.1:80", Problem::Ejected, "ejected")];
        let c = report("n3", now, 5_000, Vec::new());
        let mut gone = report("n4", now - Duration::from_secs(60), 5_000, Vec::new());
        gone.report.unhealthy = vec![sick("10.0.0.2:80", Problem::Ejected, "old news")];

        let got = aggregate([&a, &b, &c, &gone], now);
        let h = got.health("10.0.0.1:80");
        assert_eq!((h.unhealthy_on, h.of), (2, 3));
        let reasons: Vec<_> = h
            .reasons
            .iter()
            .map(|r| (r.node.as_str(), r.problem))
            .collect();
        assert_eq!(
            reasons,
            [
                ("n1", "ejected"),
                ("n2", "activeCheckFailing"),
                ("n2", "throttled")
            ]
        );
        assert!(h.reasons[1].detail.contains("HTTP 500"));
        // The silent agent's verdict is dropped with it.
        assert_eq!(
            got.health("10.0.0.2:80"),
            AgentHealth {
                of: 3,
                ..AgentHealth::default()
            }
        );
    }

    #[test]
    fn a_report_replaces_the_previous_one_and_a_disconnect_forgets_it() {
        let reports = Reports::default();
        let now = Instant::now();
        let with = |n| LoadReport {
            interval_ms: 1_000,
            latency_bounds_ms: BOUNDS.to_vec(),
            routes: vec![traffic("ns/web", n, 0, [n, 0, 0, 0])],
            ..LoadReport::default()
        };
        reports.record(1, "n1".into(), with(10), now);
        reports.record(1, "n1".into(), with(30), now);
        assert_eq!(reports.observed(now).routes["ns/web"].requests, 30);
        reports.remove(1);
        assert_eq!(reports.observed(now), Observed::default());
    }
}
