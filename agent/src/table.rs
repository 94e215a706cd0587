//! The agent's routing table: the controller's protobuf routes converted once (at apply time)
//! into a shape the request path can use without allocating or locking — hosts in a hash map,
//! pre-parsed addresses and authorities, precomputed pick schedules.
//!
//! Conversion is where a bad update is caught: any route that cannot be used makes the whole
//! update fail, and the error becomes the NACK, so the previous table stays in force.

use crate::balance::Schedule;
use crate::metrics::{Metrics, RouteCounters};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderName, HeaderValue, Method};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use weir_proto::v1::{self as pb, Algorithm};

/// Why an update was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TableError {
    #[error("route {route}: {msg}")]
    Route { route: String, msg: String },
    #[error("host {host:?} is claimed by both route {first} and route {second}")]
    DuplicateHost {
        host: String,
        first: String,
        second: String,
    },
}

/// An immutable routing table; swapped whole on every update.
#[derive(Debug, Default)]
pub struct Table {
    pub version: u64,
    /// The protobuf routes it was built from, kept for deltas, `/config` and persistence.
    pub source: BTreeMap<String, pb::Route>,
    routes: Vec<Arc<RouteRt>>,
    by_host: HashMap<Box<str>, usize>,
}

#[derive(Debug)]
pub struct RouteRt {
    pub name: Box<str>,
    pub rules: Box<[RuleRt]>,
    pub counters: RouteCounters,
    /// Anything about the route the operator should know (shown in `/config`).
    pub note: Option<String>,
    /// Time allowed for the upstream's response head; `None` uses the agent default.
    pub timeout: Option<std::time::Duration>,
}

#[derive(Debug)]
pub struct RuleRt {
    matches: Box<[MatchRt]>,
    /// Endpoints with a positive weight, in the order the schedule indexes.
    pub targets: Box<[Target]>,
    schedule: Schedule,
    /// Shared by all worker threads so proportions hold across them.
    next: AtomicUsize,
}

#[derive(Debug)]
pub struct Target {
    pub addr: SocketAddr,
    /// `ip:port`, ready to be put in an upstream URI without re-parsing.
    pub authority: Authority,
}

#[derive(Debug)]
struct MatchRt {
    method: Option<Method>,
    path: Option<PathRt>,
    headers: Box<[(HeaderName, HeaderValue)]>,
}

#[derive(Debug)]
enum PathRt {
    Exact(Box<str>),
    Prefix(Box<str>),
}

impl Table {
    /// Builds a table from routes. `metrics` hands out per-route counters, which outlive
    /// tables so counts survive updates.
    pub fn build(
        version: u64,
        source: BTreeMap<String, pb::Route>,
        metrics: &Metrics,
    ) -> Result<Self, TableError> {
        let mut routes: Vec<Arc<RouteRt>> = Vec::with_capacity(source.len());
        let mut by_host: HashMap<Box<str>, usize> = HashMap::with_capacity(source.len());
        for route in source.values() {
            let idx = routes.len();
            let rt = RouteRt::build(route, metrics)?;
            for host in &route.hosts {
                let host = host.to_ascii_lowercase();
                if let Some(&other) = by_host.get(host.as_str()) {
                    let first = &routes[other];
                    return Err(TableError::DuplicateHost {
                        host,
                        first: first.name.to_string(),
                        second: route.name.clone(),
                    });
                }
                by_host.insert(host.into_boxed_str(), idx);
            }
            routes.push(Arc::new(rt));
        }
        Ok(Self {
            version,
            source,
            routes,
            by_host,
        })
    }

    /// The route serving `host` (already lower-case, without port).
    #[inline]
    pub fn route(&self, host: &str) -> Option<&Arc<RouteRt>> {
        self.by_host.get(host).map(|&i| &self.routes[i])
    }

    pub fn routes(&self) -> &[Arc<RouteRt>] {
        &self.routes
    }
}

impl RouteRt {
    fn build(route: &pb::Route, metrics: &Metrics) -> Result<Self, TableError> {
        let err = |msg: String| TableError::Route {
            route: route.name.clone(),
            msg,
        };
        if route.name.is_empty() {
            return Err(err("route without a name".into()));
        }
        if route.hosts.is_empty() {
            return Err(err("no hosts".into()));
        }
        let algorithm = route
            .load_balancer
            .as_ref()
            .map(|lb| lb.algorithm)
            .unwrap_or_default();
        // Algorithms this agent does not implement yet fall back to weighted round robin
        // rather than failing the whole update: the Service split still holds, and the
        // fallback is shown in /config.
        let note = match Algorithm::try_from(algorithm) {
            Ok(Algorithm::RoundRobin | Algorithm::WeightedRoundRobin) => None,
            Ok(other) => Some(format!(
                "{} is not implemented by this agent; using WEIGHTED_ROUND_ROBIN",
                other.as_str_name()
            )),
            Err(_) => Some(format!(
                "unknown algorithm number {algorithm}; using WEIGHTED_ROUND_ROBIN"
            )),
        };
        let mut rules = Vec::with_capacity(route.rules.len());
        for (i, rule) in route.rules.iter().enumerate() {
            rules.push(RuleRt::build(rule).map_err(|m| err(format!("rules[{i}]: {m}")))?);
        }
        Ok(Self {
            name: route.name.as_str().into(),
            rules: rules.into_boxed_slice(),
            counters: metrics.route_counters(&route.name),
            note,
            timeout: route
                .timeouts
                .as_ref()
                .filter(|t| t.request_ms > 0)
                .map(|t| std::time::Duration::from_millis(t.request_ms)),
        })
    }

    /// The first rule matching the request, if any.
    #[inline]
    pub fn rule(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> Option<&RuleRt> {
        self.rules.iter().find(|r| r.matches(method, path, headers))
    }
}

impl RuleRt {
    fn build(rule: &pb::Rule) -> Result<Self, String> {
        let mut matches = Vec::with_capacity(rule.matches.len());
        for m in &rule.matches {
            matches.push(MatchRt::build(m)?);
        }
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        for b in &rule.backends {
            for ep in &b.endpoints {
                let addr: SocketAddr = ep.address.parse().map_err(|e| {
                    format!(
                        "backend {}: bad endpoint address {:?}: {e}",
                        b.service, ep.address
                    )
                })?;
                if ep.weight == 0 {
                    continue;
                }
                let authority = Authority::try_from(addr.to_string().as_str())
                    .map_err(|e| format!("endpoint {addr}: {e}"))?;
                targets.push(Target { addr, authority });
                weights.push(ep.weight);
            }
        }
        Ok(Self {
            matches: matches.into_boxed_slice(),
            targets: targets.into_boxed_slice(),
            schedule: Schedule::new(&weights),
            next: AtomicUsize::new(0),
        })
    }

    #[inline]
    fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| m.matches(method, path, headers))
    }

    /// The next endpoint in the weighted round-robin order, or `None` when no endpoint may
    /// receive traffic.
    #[inline]
    pub fn pick(&self) -> Option<&Target> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule.pick(n).map(|i| &self.targets[i])
    }
}

impl MatchRt {
    fn build(m: &pb::Match) -> Result<Self, String> {
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| format!("bad method {:?}", m.method))?,
            )
        };
        let path = match &m.path {
            None => None,
            Some(p) => {
                if !p.value.starts_with('/') {
                    return Err(format!("path {:?} does not start with /", p.value));
                }
                Some(match pb::path_match::Kind::try_from(p.kind) {
                    Ok(pb::path_match::Kind::Exact) => PathRt::Exact(p.value.as_str().into()),
                    Ok(pb::path_match::Kind::Prefix) => {
                        // "/api/" and "/api" mean the same prefix.
                        let v = p.value.trim_end_matches('/');
                        PathRt::Prefix(v.into())
                    }
                    Err(_) => return Err(format!("unknown path match kind {}", p.kind)),
                })
            }
        };
        let mut headers = Vec::with_capacity(m.headers.len());
        for h in &m.headers {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("bad header name {:?}", h.name))?;
            let value = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("bad header value for {:?}", h.name))?;
            headers.push((name, value));
        }
        Ok(Self {
            method,
            path,
            headers: headers.into_boxed_slice(),
        })
    }

    fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let path_ok = match &self.path {
            None => true,
            Some(PathRt::Exact(p)) => path == &**p,
            // Gateway API prefix semantics: whole path segments only, so /api matches /api
            // and /api/x but not /apix.
            Some(PathRt::Prefix(p)) => {
                path.starts_with(&**p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        };
        if !path_ok {
            return false;
        }
        self.headers
            .iter()
            .all(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
    }
}

/// Builds the upstream URI for an endpoint's authority and the request's path and query.
#[inline]
pub fn upstream_uri(
    authority: &Authority,
    pq: Option<PathAndQuery>,
) -> Result<http::Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(pq.unwrap_or_else(|| PathAndQuery::from_static("/")));
    Ok(http::Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, hosts: &[&str], eps: &[(&str, u32)]) -> pb::Route {
        pb::Route {
            name: name.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            rules: vec![pb::Rule {
                backends: vec![pb::Backend {
                    service: "svc".into(),
                    endpoints: eps
                        .iter()
                        .map(|(a, w)| pb::Endpoint {
                            address: a.to_string(),
                            ready: *w > 0,
                            weight: *w,
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

    fn build(routes: Vec<pb::Route>) -> Result<Table, TableError> {
        let m = Metrics::new();
        Table::build(
            1,
            routes.into_iter().map(|r| (r.name.clone(), r)).collect(),
            &m,
        )
    }

    #[test]
    fn looks_up_routes_by_lower_case_host() {
        let t = build(vec![route("a/b", &["Shop"], &[("127.0.0.1:80", 1)])]).expect("table");
        assert!(t.route("shop").is_some());
        assert!(t.route("other").is_none());
    }

    #[test]
    fn zero_weight_endpoints_are_never_picked() {
        let t = build(vec![route(
            "a/b",
            &["shop"],
            &[("127.0.0.1:80", 0), ("127.0.0.2:80", 1)],
        )])
        .expect("table");
        let rule = &t.route("shop").expect("route").rules[0];
        for _ in 0..10 {
            assert_eq!(
                rule.pick().expect("target").addr.to_string(),
                "127.0.0.2:80"
            );
        }
    }

    #[test]
    fn bad_address_rejects_the_whole_update() {
        let err = build(vec![route("a/b", &["shop"], &[("nonsense", 1)])]).expect_err("error");
        assert!(err.to_string().contains("bad endpoint address"), "{err}");
    }

    #[test]
    fn duplicate_host_rejects_the_update() {
        let err = build(vec![
            route("a/one", &["shop"], &[]),
            route("a/two", &["shop"], &[]),
        ])
        .expect_err("error");
        assert!(matches!(err, TableError::DuplicateHost { .. }));
    }

    #[test]
    fn prefix_matches_whole_segments_only() {
        let m = MatchRt::build(&pb::Match {
            path: Some(pb::PathMatch {
                kind: pb::path_match::Kind::Prefix as i32,
                value: "/api/".into(),
            }),
            ..Default::default()
        })
        .expect("match");
        let h = http::HeaderMap::new();
        assert!(m.matches(&Method::GET, "/api", &h));
        assert!(m.matches(&Method::GET, "/api/x", &h));
        assert!(!m.matches(&Method::GET, "/apix", &h));
    }
}
