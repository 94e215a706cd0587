//! The agent's Prometheus metrics.
//!
//! Per-route counters are looked up in their label families once, when a table is built, and
//! the resulting handles (an `Arc` around an atomic) are kept in the route: the request path
//! then increments a plain atomic, with no label hashing and no lock. The families keep the
//! counters across table swaps, so a route's counts survive updates.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::http::reply::LocalReply;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteClassLabels {
    pub(crate) route: String,
    pub(crate) code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointLabels {
    pub(crate) endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    pub(crate) route: String,
    /// hits, misses, stale, coalesced, bypass, stores, evictions, bytes, entries.
    pub(crate) stat: &'static str,
}

/// gRPC calls by final status, route and endpoint.
pub(crate) type GrpcCallsFamily = Family<GrpcLabels, Counter>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct GrpcLabels {
    pub(crate) route: String,
    pub(crate) endpoint: String,
    pub(crate) grpc_status: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MirrorLabels {
    pub(crate) route: String,
    pub(crate) outcome: &'static str,
}

/// Counter handles of one route's mirror.
#[derive(Debug, Clone)]
pub(crate) struct MirrorCounters {
    pub(crate) sent: Counter,
    pub(crate) failed: Counter,
    pub(crate) dropped: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReplyLabels {
    pub(crate) route: String,
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct UpgradeLabels {
    /// `accepted` (the origin switched protocols) or `refused` (it answered anything else).
    pub(crate) result: &'static str,
}

/// Protocol upgrades (HTTP/1.1 `Upgrade`, WebSocket over h2 extended CONNECT): handles taken
/// once, so counting one is an atomic increment.
#[derive(Debug, Clone, Default)]
pub(crate) struct UpgradeCounters {
    pub(crate) accepted: Counter,
    pub(crate) refused: Counter,
    /// Tunnels open now (upgraded connections copying bytes).
    pub(crate) open: Gauge<i64, AtomicI64>,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counter handles of one route.
#[derive(Debug, Clone)]
pub(crate) struct RouteCounters {
    by_class: [Counter; 5],
    replies: [Counter; LocalReply::ALL.len()],
    pub(crate) retries: Counter,
    pub(crate) in_flight: Gauge<i64, AtomicI64>,
    pub(crate) latency: Histogram,
}

/// A copy of a route's counters, since the route's series were created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RouteTotals {
    /// Answers by status class, 1xx to 5xx (local replies included).
    pub(crate) by_class: [u64; 5],
    pub(crate) local_replies: u64,
    /// Non-cumulative latency bucket counts, bounds [`BUCKETS`] then +Inf.
    pub(crate) latency: [u64; BUCKETS.len() + 1],
}

/// Counter handles of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct EndpointCounters {
    pub(crate) requests: Counter,
    pub(crate) failures: Counter,
    ejections: Counter,
    /// Answers (429, or 503 with `Retry-After`) that made the agent send it less traffic.
    pub(crate) throttles: Counter,
}

impl EndpointCounters {
    pub(crate) fn ejected(&self) {
        self.ejections.inc();
    }
}

/// Upper bounds of the latency buckets, in seconds.
pub(crate) const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram of plain atomics: prometheus-client's own takes a lock per
/// observation, which the request path cannot afford.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histogram(Arc<HistogramInner>);

#[derive(Debug, Default)]
struct HistogramInner {
    /// Non-cumulative counts; the last slot is +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    #[inline]
    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Histogram {
    /// The non-cumulative count of every bucket (the last one is +Inf), for load reports.
    pub(crate) fn counts(&self) -> [u64; BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.0.buckets[i].load(Ordering::Relaxed))
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder takes counts per bucket and makes them cumulative itself (passing
        // cumulative counts made every bucket past the first too large).
        let mut count = 0;
        let mut buckets = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, upper) in BUCKETS.iter().chain([f64::MAX].iter()).enumerate() {
            let n = self.0.buckets[i].load(Ordering::Relaxed);
            count += n;
            buckets.push((*upper, n));
        }
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl RouteCounters {
    /// Counts an upstream response by status class.
    #[inline]
    pub(crate) fn response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
    }

    /// The route's counters now, for load reports (relaxed loads, nothing written).
    pub(crate) fn totals(&self) -> RouteTotals {
        RouteTotals {
            by_class: std::array::from_fn(|i| self.by_class[i].get()),
            local_replies: self.replies.iter().map(Counter::get).sum(),
            latency: self.latency.counts(),
        }
    }

    /// Counts an answer the agent gave itself.
    #[inline]
    pub(crate) fn reply(&self, reply: LocalReply) {
        let i = LocalReply::ALL
            .iter()
            .position(|r| *r == reply)
            .unwrap_or(0);
        self.replies[i].inc();
        self.response(reply.status());
    }
}

pub(crate) struct Metrics {
    pub(crate) registry: Registry,
    requests: Family<RouteClassLabels, Counter>,
    replies: Family<ReplyLabels, Counter>,
    retries: Family<RouteLabels, Counter>,
    in_flight: Family<RouteLabels, Gauge<i64, AtomicI64>>,
    latency: Family<RouteLabels, Histogram>,
    endpoint_requests: Family<EndpointLabels, Counter>,
    endpoint_failures: Family<EndpointLabels, Counter>,
    endpoint_ejections: Family<EndpointLabels, Counter>,
    endpoint_throttles: Family<EndpointLabels, Counter>,
    /// Mirrored copies by route and outcome (see [`MirrorCounters`]).
    mirrors: Family<MirrorLabels, Counter>,
    /// Response cache counters and sizes, by route; refreshed when scraped.
    pub(crate) cache: Family<CacheLabels, Gauge<i64, AtomicI64>>,
    /// gRPC calls by final status, route and endpoint.
    pub(crate) grpc_calls: GrpcCallsFamily,
    /// 1 healthy, 0 not (EndpointSlice ∧ active ∧ passive); refreshed on every table build.
    pub(crate) endpoint_healthy: Family<EndpointLabels, Gauge<i64, AtomicI64>>,
    pub(crate) table_version: Gauge<i64, AtomicI64>,
    pub(crate) controller_connected: Gauge<i64, AtomicI64>,
    pub(crate) updates_applied: Counter,
    pub(crate) updates_rejected: Counter,
    /// Counters for requests that matched no route.
    pub(crate) unrouted: RouteCounters,
    /// Upgrades accepted / refused by the origin, and tunnels open.
    pub(crate) upgrades: UpgradeCounters,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("weir_agent");
        let requests = Family::<RouteClassLabels, Counter>::default();
        let replies = Family::<ReplyLabels, Counter>::default();
        let table_version = Gauge::<i64, AtomicI64>::default();
        let controller_connected = Gauge::<i64, AtomicI64>::default();
        let updates_applied = Counter::default();
        let updates_rejected = Counter::default();
        registry.register(
            "requests",
            "Requests answered, by route and status class (local replies included)",
            requests.clone(),
        );
        registry.register(
            "local_replies",
            "Requests the agent answered itself, by route and reason (the x-weir-error value)",
            replies.clone(),
        );
        registry.register(
            "table_version",
            "Version of the routing table in force",
            table_version.clone(),
        );
        registry.register(
            "controller_connected",
            "1 while a controller stream is open",
            controller_connected.clone(),
        );
        registry.register(
            "updates_applied",
            "Routing updates applied",
            updates_applied.clone(),
        );
        registry.register(
            "updates_rejected",
            "Routing updates rejected (NACKed)",
            updates_rejected.clone(),
        );
        let retries = Family::<RouteLabels, Counter>::default();
        let in_flight = Family::<RouteLabels, Gauge<i64, AtomicI64>>::default();
        let latency = Family::<RouteLabels, Histogram>::default();
        let endpoint_requests = Family::<EndpointLabels, Counter>::default();
        let endpoint_failures = Family::<EndpointLabels, Counter>::default();
        let endpoint_ejections = Family::<EndpointLabels, Counter>::default();
        let endpoint_throttles = Family::<EndpointLabels, Counter>::default();
        let mirrors = Family::<MirrorLabels, Counter>::default();
        let endpoint_healthy = Family::<EndpointLabels, Gauge<i64, AtomicI64>>::default();
        let grpc_calls = GrpcCallsFamily::default();
        let cache = Family::<CacheLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "cache",
            "Response cache by route: hits, misses, stale answers, coalesced waits, bypasses, stores, evictions, peer_hits, peer_fills, peer_errors (since start), bytes and entries (now); with lower tiers also disk_hits, disk_misses, disk_bytes, disk_entries, shared_hits, shared_misses, shared_errors, tier_writes, tier_writes_dropped",
            cache.clone(),
        );
        registry.register(
            "grpc_calls",
            "gRPC calls answered by an upstream, by route, endpoint and grpc-status",
            grpc_calls.clone(),
        );
        registry.register("retries", "Retried tries, by route", retries.clone());
        registry.register(
            "in_flight",
            "Requests in flight, by route",
            in_flight.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the upstream's response head, by route (all tries)",
            latency.clone(),
        );
        registry.register(
            "endpoint_requests",
            "Tries sent to each endpoint",
            endpoint_requests.clone(),
        );
        registry.register(
            "endpoint_failures",
            "Tries that failed (5xx, connect failure, reset, timeout), by endpoint",
            endpoint_failures.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Outlier-detection ejections, by endpoint",
            endpoint_ejections.clone(),
        );
        registry.register(
            "endpoint_throttles",
            "Answers (429, or 503 with Retry-After) after which the endpoint got less traffic for the time it asked, by endpoint",
            endpoint_throttles.clone(),
        );
        registry.register(
            "mirror_requests",
            "Mirrored copies by route and outcome: sent (answered by the shadow), failed (no answer), dropped (not sent, or cut: the shadow was too slow or too busy)",
            mirrors.clone(),
        );
        registry.register(
            "endpoint_healthy",
            "1 while the endpoint may receive traffic (ready, passing checks, not ejected)",
            endpoint_healthy.clone(),
        );
        let upgrade_results = Family::<UpgradeLabels, Counter>::default();
        registry.register(
            "upgrades",
            "Upgrade requests (WebSocket and other Upgrade tokens, h2 extended CONNECT) that reached an origin, by result: accepted (101) or refused (any other answer)",
            upgrade_results.clone(),
        );
        let upgrades = UpgradeCounters {
            accepted: upgrade_results.get_or_create_owned(&UpgradeLabels { result: "accepted" }),
            refused: upgrade_results.get_or_create_owned(&UpgradeLabels { result: "refused" }),
            open: Gauge::default(),
        };
        registry.register(
            "tunnels_open",
            "Upgraded connections (tunnels) open now",
            upgrades.open.clone(),
        );
        let parts = Parts {
            requests: &requests,
            replies: &replies,
            retries: &retries,
            in_flight: &in_flight,
            latency: &latency,
        };
        let unrouted = parts.route("");
        Self {
            registry,
            requests,
            replies,
            retries,
            in_flight,
            latency,
            endpoint_requests,
            endpoint_failures,
            endpoint_ejections,
            endpoint_throttles,
            mirrors,
            endpoint_healthy,
            grpc_calls,
            cache,
            table_version,
            controller_connected,
            updates_applied,
            updates_rejected,
            unrouted,
            upgrades,
        }
    }

    /// The counter handles of `route`, created on first use.
    pub(crate) fn route_counters(&self, route: &str) -> RouteCounters {
        Parts {
            requests: &self.requests,
            replies: &self.replies,
            retries: &self.retries,
            in_flight: &self.in_flight,
            latency: &self.latency,
        }
        .route(route)
    }

    /// The counter handles of endpoint `addr`, created on first use.
    pub(crate) fn endpoint_counters(&self, addr: SocketAddr) -> EndpointCounters {
        let l = EndpointLabels {
            endpoint: addr.to_string(),
        };
        EndpointCounters {
            requests: self.endpoint_requests.get_or_create_owned(&l),
            failures: self.endpoint_failures.get_or_create_owned(&l),
            ejections: self.endpoint_ejections.get_or_create_owned(&l),
            throttles: self.endpoint_throttles.get_or_create_owned(&l),
        }
    }

    /// The mirror counters of `route`, created on first use.
    pub(crate) fn mirror_counters(&self, route: &str) -> MirrorCounters {
        let get = |outcome| {
            self.mirrors.get_or_create_owned(&MirrorLabels {
                route: route.to_owned(),
                outcome,
            })
        };
        MirrorCounters {
            sent: get("sent"),
            failed: get("failed"),
            dropped: get("dropped"),
        }
    }

    pub(crate) fn set_endpoint_healthy(&self, addr: SocketAddr, healthy: bool) {
        self.endpoint_healthy
            .get_or_create(&EndpointLabels {
                endpoint: addr.to_string(),
            })
            .set(i64::from(healthy));
    }

    /// Drops the series of an endpoint no table uses any more.
    pub(crate) fn forget_endpoint(&self, addr: SocketAddr) {
        let l = EndpointLabels {
            endpoint: addr.to_string(),
        };
        self.endpoint_requests.remove(&l);
        self.endpoint_failures.remove(&l);
        self.endpoint_ejections.remove(&l);
        self.endpoint_throttles.remove(&l);
        self.endpoint_healthy.remove(&l);
    }

    /// Drops the series of routes that no longer exist, so `/metrics` does not grow forever.
    pub(crate) fn forget_route(&self, route: &str) {
        for code in CLASSES {
            self.requests.remove(&RouteClassLabels {
                route: route.to_string(),
                code,
            });
        }
        for r in LocalReply::ALL {
            self.replies.remove(&ReplyLabels {
                route: route.to_string(),
                reason: r.code(),
            });
        }
        let l = RouteLabels {
            route: route.to_string(),
        };
        self.retries.remove(&l);
        self.in_flight.remove(&l);
        self.latency.remove(&l);
        for outcome in ["sent", "failed", "dropped"] {
            self.mirrors.remove(&MirrorLabels {
                route: route.to_string(),
                outcome,
            });
        }
    }

    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The families a route's handles come from.
struct Parts<'a> {
    requests: &'a Family<RouteClassLabels, Counter>,
    replies: &'a Family<ReplyLabels, Counter>,
    retries: &'a Family<RouteLabels, Counter>,
    in_flight: &'a Family<RouteLabels, Gauge<i64, AtomicI64>>,
    latency: &'a Family<RouteLabels, Histogram>,
}

impl Parts<'_> {
    fn route(&self, route: &str) -> RouteCounters {
        let l = RouteLabels {
            route: route.to_string(),
        };
        RouteCounters {
            by_class: CLASSES.map(|code| {
                self.requests.get_or_create_owned(&RouteClassLabels {
                    route: route.to_string(),
                    code,
                })
            }),
            replies: LocalReply::ALL.map(|r| {
                self.replies.get_or_create_owned(&ReplyLabels {
                    route: route.to_string(),
                    reason: r.code(),
                })
            }),
            retries: self.retries.get_or_create_owned(&l),
            in_flight: self.in_flight.get_or_create_owned(&l),
            latency: self.latency.get_or_create_owned(&l),
        }
    }
}

/// Where a gRPC call's final status is counted: one per (route, endpoint), made on the
/// endpoint's first call and kept in its [`crate::route::table::Target`].
pub(crate) type GrpcTally = Arc<GrpcCalls>;

/// The `grpc_calls` counters of one route and endpoint. The counter of each status is looked
/// up in the family once and kept, because a lookup renders both labels to strings and
/// hashes them — per call, that was the largest cost of counting.
#[derive(Debug)]
pub(crate) struct GrpcCalls {
    family: GrpcCallsFamily,
    route: Arc<str>,
    endpoint: std::net::SocketAddr,
    /// Statuses 0..=16, the codes gRPC defines; others go through the family each time.
    by_status: [std::sync::OnceLock<Counter>; 17],
}

impl GrpcCalls {
    pub(crate) fn new(
        family: GrpcCallsFamily,
        route: Arc<str>,
        endpoint: std::net::SocketAddr,
    ) -> Self {
        Self {
            family,
            route,
            endpoint,
            by_status: Default::default(),
        }
    }

    fn lookup(&self, status: u32) -> Counter {
        self.family
            .get_or_create(&GrpcLabels {
                route: self.route.to_string(),
                endpoint: self.endpoint.to_string(),
                grpc_status: status,
            })
            .clone()
    }

    /// Counts the call as finished with `status`.
    pub(crate) fn count(&self, status: u32) {
        match self.by_status.get(status as usize) {
            Some(slot) => slot.get_or_init(|| self.lookup(status)).inc(),
            None => self.lookup(status).inc(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_once() {
        let h = Histogram::default();
        for ms in [0.2, 0.7, 0.8, 3.0, 20_000.0] {
            h.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("t", "test", h);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let bucket = |le: &str| -> u64 {
            let key = format!("t_bucket{{le=\"{le}\"}} ");
            let line = text
                .lines()
                .find(|l| l.starts_with(&key))
                .unwrap_or_else(|| panic!("no {key} in {text}"));
            line[key.len()..].parse().expect("count")
        };
        assert_eq!(bucket("0.0005"), 1, "{text}");
        assert_eq!(bucket("0.001"), 3, "{text}");
        assert_eq!(bucket("0.005"), 4, "{text}");
        assert_eq!(bucket("10.0"), 4, "{text}");
        assert_eq!(bucket("+Inf"), 5, "{text}");
        assert!(text.contains("t_count 5"), "{text}");
    }
}
