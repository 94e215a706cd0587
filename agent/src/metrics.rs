//! The agent's Prometheus metrics.
//!
//! Per-route counters are looked up in their label families once, when a table is built, and
//! the resulting handles (an `Arc` around an atomic) are kept in the route: the request path
//! then increments a plain atomic, with no label hashing and no lock. The families keep the
//! counters across table swaps, so a route's counts survive updates.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicI64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteClassLabels {
    pub route: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplyLabels {
    pub route: String,
    pub reason: &'static str,
}

/// Why the agent answered a request itself instead of an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReply {
    NoRoute,
    NoHealthyEndpoint,
    UpstreamConnect,
    UpstreamTimeout,
    UpstreamError,
    BadRequest,
}

impl LocalReply {
    pub const ALL: [LocalReply; 6] = [
        LocalReply::NoRoute,
        LocalReply::NoHealthyEndpoint,
        LocalReply::UpstreamConnect,
        LocalReply::UpstreamTimeout,
        LocalReply::UpstreamError,
        LocalReply::BadRequest,
    ];

    /// The value of the `x-weir-error` header and the metric label.
    pub fn code(self) -> &'static str {
        match self {
            LocalReply::NoRoute => "no-route",
            LocalReply::NoHealthyEndpoint => "no-healthy-endpoint",
            LocalReply::UpstreamConnect => "upstream-connect-failed",
            LocalReply::UpstreamTimeout => "upstream-timeout",
            LocalReply::UpstreamError => "upstream-error",
            LocalReply::BadRequest => "bad-request",
        }
    }

    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            LocalReply::NoRoute => S::NOT_FOUND,
            LocalReply::NoHealthyEndpoint => S::SERVICE_UNAVAILABLE,
            LocalReply::UpstreamConnect | LocalReply::UpstreamError => S::BAD_GATEWAY,
            LocalReply::UpstreamTimeout => S::GATEWAY_TIMEOUT,
            LocalReply::BadRequest => S::BAD_REQUEST,
        }
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counter handles of one route.
#[derive(Debug, Clone)]
pub struct RouteCounters {
    by_class: [Counter; 5],
    replies: [Counter; LocalReply::ALL.len()],
}

impl RouteCounters {
    /// Counts an upstream response by status class.
    #[inline]
    pub fn response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
    }

    /// Counts an answer the agent gave itself.
    #[inline]
    pub fn reply(&self, reply: LocalReply) {
        let i = LocalReply::ALL
            .iter()
            .position(|r| *r == reply)
            .unwrap_or(0);
        self.replies[i].inc();
        self.response(reply.status());
    }
}

pub struct Metrics {
    pub registry: Registry,
    requests: Family<RouteClassLabels, Counter>,
    replies: Family<ReplyLabels, Counter>,
    pub table_version: Gauge<i64, AtomicI64>,
    pub controller_connected: Gauge<i64, AtomicI64>,
    pub updates_applied: Counter,
    pub updates_rejected: Counter,
    /// Counters for requests that matched no route.
    pub unrouted: RouteCounters,
}

impl Metrics {
    pub fn new() -> Self {
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
        let unrouted = counters(&requests, &replies, "");
        Self {
            registry,
            requests,
            replies,
            table_version,
            controller_connected,
            updates_applied,
            updates_rejected,
            unrouted,
        }
    }

    /// The counter handles of `route`, created on first use.
    pub fn route_counters(&self, route: &str) -> RouteCounters {
        counters(&self.requests, &self.replies, route)
    }

    /// Drops the series of routes that no longer exist, so `/metrics` does not grow forever.
    pub fn forget_route(&self, route: &str) {
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
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
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

fn counters(
    requests: &Family<RouteClassLabels, Counter>,
    replies: &Family<ReplyLabels, Counter>,
    route: &str,
) -> RouteCounters {
    RouteCounters {
        by_class: CLASSES.map(|code| {
            requests.get_or_create_owned(&RouteClassLabels {
                route: route.to_string(),
                code,
            })
        }),
        replies: LocalReply::ALL.map(|r| {
            replies.get_or_create_owned(&ReplyLabels {
                route: route.to_string(),
                reason: r.code(),
            })
        }),
    }
}
