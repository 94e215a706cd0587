//! The agent's routing table: the controller's protobuf routes converted once (at build time)
//! into a shape the request path can use without allocating or locking — hosts in a hash map,
//! pre-parsed addresses and authorities, pickers precomputed per rule.
//!
//! A table is built from the controller's routes *and* the agent's own view of endpoint health
//! ([`crate::health`]): an endpoint failing its active check or ejected by outlier detection
//! counts as not ready, and weights, failover spill and panic are recomputed with
//! `weir_proto::weights` — the controller's own formula — before the pickers are built. So a
//! health transition is just another rebuild, and the request path never evaluates health.
//!
//! Conversion is where a bad update is caught: any route that cannot be used makes the whole
//! update fail, and the error becomes the NACK, so the previous table stays in force.
//!
//! Cost follows the change: every route is an `Arc<RouteRt>` that carries its own protobuf
//! source, and a new table shares the `Arc`s of every route an update does not name
//! ([`Table::apply_delta`]), or whose protobuf is unchanged ([`Table::build`] of a full
//! table). Only named, changed routes are converted again; what remains proportional to the
//! table's size is copying two maps of pointers. Endpoint state is not in the routes but in
//! [`crate::health::Endpoints`], looked up by address, so it carries over either way.
//!
//! Slow start is applied here as well: a build scales the weight of every endpoint still in
//! its ramp ([`slow_start_weights`]) and marks its route [`RouteRt::warming`], and the
//! control thread rebuilds such a table every [`Table::warm_up_tick`] until the ramps are
//! over — the request path only ever sees ordinary weights.

use super::limit::RateLimitRt;
use super::matcher::{MatchError, MatchRt};
use super::mirror::MirrorRt;
use super::retry::RetryRt;
use crate::balance::{EndpointLoad, Picker, Placement, endpoint_id, zone_aware_weights};
use crate::health::{EndpointHealth, Endpoints, OutlierConfig};
use crate::metrics::{GrpcCalls, GrpcTally, Metrics, RouteCounters};
use http::uri::Authority;
use http::{HeaderName, Method};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use weir_proto::v1::{self as pb, Algorithm};

/// Why an update was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TableError {
    #[error("route {route}: {msg}")]
    Route { route: String, msg: String },
    #[error("host {host:?} is claimed by both route {first} and route {second}")]
    DuplicateHost {
        host: String,
        first: String,
        second: String,
    },
}

/// Why a rule cannot be used (inside a [`TableError::Route`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RuleError {
    #[error(transparent)]
    Match(#[from] MatchError),
    #[error("backend {service}: bad endpoint address {address:?}: {source}")]
    Address {
        service: String,
        address: String,
        source: std::net::AddrParseError,
    },
    #[error("endpoint {addr}: {source}")]
    Authority {
        addr: SocketAddr,
        source: http::uri::InvalidUri,
    },
}

/// Requests in flight to one endpoint before the circuit opens, when the policy sets none.
pub(crate) const DEFAULT_MAX_PER_ENDPOINT: u32 = 1024;
/// Retries in flight a route may always have, whatever its budget: enough that one dead
/// endpoint under a few concurrent callers is retried around, few enough that retries
/// cannot multiply an outage (Linkerd's budgets also keep a floor of 10 per second).
pub(crate) const MIN_RETRY_CONCURRENCY: u32 = 10;
/// Share of a zone's even share of the weight that keeps traffic in the zone.
pub(crate) const LOCALITY_MIN_PERCENT: u32 = 70;

/// Bounds of the rebuild period while endpoints warm up: often enough that the ramp looks
/// smooth, rarely enough that a long window does not rebuild for nothing.
pub(crate) const MIN_WARM_UP_TICK: Duration = Duration::from_millis(100);
pub(crate) const MAX_WARM_UP_TICK: Duration = Duration::from_secs(5);

/// A route's slow start (`loadBalancer.slowStart`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SlowStart {
    pub(crate) window_ms: u64,
    pub(crate) min_percent: u32,
}

impl SlowStart {
    fn from_proto(lb: &pb::LoadBalancer) -> Option<Self> {
        (lb.slow_start_window_ms > 0).then_some(Self {
            window_ms: lb.slow_start_window_ms,
            min_percent: lb.slow_start_min_percent,
        })
    }

    /// How often a table with warming endpoints is rebuilt: a tenth of the window, within
    /// [`MIN_WARM_UP_TICK`]..=[`MAX_WARM_UP_TICK`].
    fn tick(&self) -> Duration {
        Duration::from_millis(self.window_ms / 10).clamp(MIN_WARM_UP_TICK, MAX_WARM_UP_TICK)
    }
}

/// `weights` with each scaled by its slow-start factor (`permille`, 1000 for an endpoint
/// not warming). Everything is multiplied by 1000 rather than divided, so that a warming
/// weight of 1 still ramps; a positive weight stays positive. The pickers reduce by the gcd.
pub(crate) fn slow_start_weights(weights: &[u32], permille: &[u32]) -> Vec<u32> {
    weights
        .iter()
        .zip(permille)
        .map(|(&w, &p)| {
            let scaled = u64::from(w) * u64::from(p.min(1000));
            match u32::try_from(scaled) {
                Ok(v) if w > 0 => v.max(1),
                Ok(v) => v,
                Err(_) => u32::MAX,
            }
        })
        .collect()
}

/// What a table is built with besides the routes.
pub(crate) struct BuildCtx<'a> {
    /// The table in force, whose response caches carry over to routes whose cache settings
    /// did not change.
    pub(crate) previous: Option<&'a Table>,
    pub(crate) metrics: &'a Metrics,
    pub(crate) endpoints: &'a Endpoints,
    /// The agent's zone; empty disables locality.
    pub(crate) zone: &'a str,
    pub(crate) now_ms: u64,
}

/// An immutable routing table; swapped whole on every update and health transition (its
/// routes are shared with the tables before and after it wherever they did not change).
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub(crate) version: u64,
    /// By name; each route keeps the protobuf it was built from (for deltas, rebuilds,
    /// `/config` and persistence).
    routes: BTreeMap<Arc<str>, Arc<RouteRt>>,
    /// Lower-case host → its route: the request path's only lookup.
    by_host: HashMap<Arc<str>, Arc<RouteRt>>,
}

#[derive(Debug)]
pub(crate) struct RouteRt {
    /// The controller's route this was built from, as received (shared with the rebuilds
    /// of this route after health transitions).
    pub(crate) source: Arc<pb::Route>,
    /// `source.hosts`, lower-cased: the keys of this route in [`Table::by_host`].
    hosts: Box<[Arc<str>]>,
    pub(crate) name: Box<str>,
    /// The name again, shareable with bodies that outlive the request handler.
    pub(crate) shared_name: Arc<str>,
    pub(crate) rules: Box<[RuleRt]>,
    pub(crate) counters: RouteCounters,
    /// Anything about the route the operator should know (shown in `/config`).
    pub(crate) note: Option<String>,
    /// Time allowed for the whole exchange up to the upstream's response head (all tries).
    pub(crate) timeout: Option<Duration>,
    pub(crate) retry: RetryRt,
    pub(crate) outlier: OutlierConfig,
    pub(crate) max_per_endpoint: u32,
    pub(crate) hash_on: Option<HashOnRt>,
    /// The route's response cache, if `spec.cache` enables one.
    pub(crate) cache: Option<crate::cache::Cache>,
    /// `loadBalancer.slowStart`, if set.
    pub(crate) slow_start: Option<SlowStart>,
    /// `spec.rateLimit`, if set: the agent's token bucket for the route.
    pub(crate) rate_limit: Option<RateLimitRt>,
    /// Some endpoint got less than its weight for slow start when this was built: the
    /// control thread rebuilds until none does.
    pub(crate) warming: bool,
    /// Live requests and retries, for the retry budget.
    pub(crate) active: AtomicU32,
    pub(crate) active_retries: AtomicU32,
}

/// The consistent-hashing key of a request.
#[derive(Debug, Clone)]
pub(crate) enum HashOnRt {
    Header(HeaderName),
    Cookie(Box<str>),
    Path,
}

#[derive(Debug)]
pub(crate) struct RuleRt {
    matches: Box<[MatchRt]>,
    /// Endpoints with a positive weight, in the order the picker indexes.
    pub(crate) targets: Box<[Target]>,
    loads: Box<[Arc<EndpointLoad>]>,
    picker: Picker,
    /// Every endpoint of the rule, whatever its weight (for the ejection limit).
    pub(crate) members: Box<[Arc<EndpointHealth>]>,
    /// The rule with the weights in force (after local health), for `/config`.
    pub(crate) effective: pb::Rule,
    /// Some target's weight was cut for slow start.
    warming: bool,
    /// `mirror`, if set.
    pub(crate) mirror: Option<MirrorRt>,
}

#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// The upstream speaks HTTP/2 with prior knowledge (Service port `appProtocol:
    /// kubernetes.io/h2c`); otherwise HTTP/1.1.
    pub(crate) h2c: bool,
    /// `ip:port`, ready to be put in an upstream URI without re-parsing.
    pub(crate) authority: Authority,
    pub(crate) health: Arc<EndpointHealth>,
    /// This route's `grpc_calls` counters for the endpoint, made on its first gRPC call
    /// (a pointer until then, so 1,000 plain HTTP routes pay nothing for it).
    grpc_calls: OnceLock<GrpcTally>,
}

impl Target {
    /// The counters a gRPC call to this target is counted in.
    pub(crate) fn grpc_calls(
        &self,
        family: &crate::metrics::GrpcCallsFamily,
        route: &Arc<str>,
    ) -> GrpcTally {
        self.grpc_calls
            .get_or_init(|| Arc::new(GrpcCalls::new(family.clone(), route.clone(), self.addr)))
            .clone()
    }
}

impl Table {
    /// Builds a full table from `routes` (a later route of the same name wins). Routes whose
    /// protobuf equals the one of the same name in `ctx.previous` are shared, not rebuilt.
    pub(crate) fn build(
        version: u64,
        routes: impl IntoIterator<Item = pb::Route>,
        ctx: &BuildCtx<'_>,
    ) -> Result<Self, TableError> {
        let named: BTreeMap<String, pb::Route> =
            routes.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut table = Self {
            version,
            routes: BTreeMap::new(),
            by_host: HashMap::with_capacity(named.len()),
        };
        for route in named.into_values() {
            table.insert(RouteRt::reuse_or_build(route, ctx)?)?;
        }
        Ok(table)
    }

    /// This table with the routes of a delta upserted and removed: every route the delta does
    /// not name is shared with `self`, so the work follows the size of the delta. `self`
    /// itself is untouched (the request path may be reading it).
    pub(crate) fn apply_delta(
        &self,
        version: u64,
        upserted: Vec<pb::Route>,
        removed: &[String],
        ctx: &BuildCtx<'_>,
    ) -> Result<Self, TableError> {
        let upserted: BTreeMap<String, pb::Route> =
            upserted.into_iter().map(|r| (r.name.clone(), r)).collect();
        let mut table = Self {
            version,
            routes: self.routes.clone(),
            by_host: self.by_host.clone(),
        };
        // Take every named route out first, so that hosts moving between routes of the same
        // delta are not mistaken for duplicates.
        for name in removed.iter().chain(upserted.keys()) {
            table.remove(name);
        }
        for route in upserted.into_values() {
            table.insert(RouteRt::reuse_or_build(route, ctx)?)?;
        }
        Ok(table)
    }

    /// Every route built again from its protobuf with the current health view (after a
    /// health transition), under the same version.
    pub(crate) fn rebuild(&self, ctx: &BuildCtx<'_>) -> Result<Self, TableError> {
        let mut table = Self {
            version: self.version,
            routes: BTreeMap::new(),
            by_host: HashMap::with_capacity(self.by_host.len()),
        };
        for rt in self.routes.values() {
            table.insert(Arc::new(RouteRt::build(rt.source.clone(), ctx)?))?;
        }
        Ok(table)
    }

    fn insert(&mut self, rt: Arc<RouteRt>) -> Result<(), TableError> {
        for host in rt.hosts.iter() {
            if let Some(other) = self.by_host.get(host) {
                return Err(TableError::DuplicateHost {
                    host: host.to_string(),
                    first: other.name.to_string(),
                    second: rt.name.to_string(),
                });
            }
            self.by_host.insert(host.clone(), rt.clone());
        }
        self.routes.insert(rt.shared_name.clone(), rt);
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        let Some(old) = self.routes.remove(name) else {
            return;
        };
        for host in old.hosts.iter() {
            if self.by_host.get(host).is_some_and(|r| Arc::ptr_eq(r, &old)) {
                self.by_host.remove(host);
            }
        }
    }

    /// The route serving `host` (already lower-case, without port).
    #[inline]
    pub(crate) fn route(&self, host: &str) -> Option<&Arc<RouteRt>> {
        self.by_host.get(host)
    }

    /// The route named `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&Arc<RouteRt>> {
        self.routes.get(name)
    }

    /// The routes, by name.
    pub(crate) fn routes(&self) -> impl ExactSizeIterator<Item = &Arc<RouteRt>> + '_ {
        self.routes.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.routes.len()
    }

    /// How soon this table should be rebuilt for slow start: `None` when no endpoint is
    /// warming, else the shortest tick of the routes that have one.
    pub(crate) fn warm_up_tick(&self) -> Option<Duration> {
        self.routes
            .values()
            .filter(|r| r.warming)
            .filter_map(|r| r.slow_start.map(|s| s.tick()))
            .min()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

impl RouteRt {
    /// The route of the same name in `ctx.previous` if its protobuf is the same (nothing to
    /// convert again: its endpoints' health lives by address and a health transition
    /// rebuilds every route anyway), else `route` built anew.
    fn reuse_or_build(route: pb::Route, ctx: &BuildCtx<'_>) -> Result<Arc<Self>, TableError> {
        if let Some(old) = ctx
            .previous
            .and_then(|t| t.routes.get(route.name.as_str()))
            .filter(|old| *old.source == route)
        {
            return Ok(old.clone());
        }
        Ok(Arc::new(Self::build(Arc::new(route), ctx)?))
    }

    fn build(route: Arc<pb::Route>, ctx: &BuildCtx<'_>) -> Result<Self, TableError> {
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
        let lb = route.load_balancer.clone().unwrap_or_default();
        let slow_start = SlowStart::from_proto(&lb);
        let (algorithm, note) = match Algorithm::try_from(lb.algorithm) {
            Ok(a) => (a, None),
            Err(_) => (
                Algorithm::WeightedRoundRobin,
                Some(format!(
                    "unknown algorithm number {}; using WEIGHTED_ROUND_ROBIN",
                    lb.algorithm
                )),
            ),
        };
        let hash_on = match lb.hash_on.and_then(|h| h.key) {
            None => None,
            Some(pb::hash_on::Key::Header(h)) => Some(HashOnRt::Header(
                HeaderName::from_bytes(h.as_bytes())
                    .map_err(|_| err(format!("bad hashOn header {h:?}")))?,
            )),
            Some(pb::hash_on::Key::Cookie(c)) => Some(HashOnRt::Cookie(c.into())),
            Some(pb::hash_on::Key::Path(true)) => Some(HashOnRt::Path),
            Some(pb::hash_on::Key::Path(false)) => None,
        };
        let min_healthy = if route.min_healthy_percent == 0 {
            70
        } else {
            route.min_healthy_percent
        };
        let mut rules = Vec::with_capacity(route.rules.len());
        for (i, rule) in route.rules.iter().enumerate() {
            let mut built = RuleRt::build(
                rule,
                algorithm,
                lb.hash_balance_factor,
                slow_start,
                min_healthy,
                ctx,
            )
            .map_err(|m| err(format!("rules[{i}]: {m}")))?;
            if let Some(m) = &rule.mirror {
                built.mirror = MirrorRt::build(m, ctx.metrics.mirror_counters(&route.name))
                    .map_err(|m| err(format!("rules[{i}]: {m}")))?;
            }
            rules.push(built);
        }
        // The bucket carries over rebuilds and updates that keep the same limit.
        let previous = ctx.previous.and_then(|t| t.routes.get(route.name.as_str()));
        let rate_limit = route
            .rate_limit
            .as_ref()
            .and_then(|r| RateLimitRt::from_proto(r, previous.and_then(|p| p.rate_limit.as_ref())));
        let warming = rules.iter().any(|r| r.warming);
        let outlier = match &route.outlier_detection {
            None => OutlierConfig::default(),
            Some(o) => {
                let d = OutlierConfig::default();
                OutlierConfig {
                    consecutive_errors: if o.consecutive_errors == 0 {
                        d.consecutive_errors
                    } else {
                        o.consecutive_errors
                    },
                    base_ejection: if o.base_ejection_time_ms == 0 {
                        d.base_ejection
                    } else {
                        Duration::from_millis(o.base_ejection_time_ms)
                    },
                    max_ejection_percent: o.max_ejection_percent,
                }
            }
        };
        let cache = match route
            .cache
            .as_ref()
            .map(crate::cache::CacheConfig::from_proto)
        {
            None | Some(Ok(None)) => None,
            Some(Err(e)) => return Err(err(format!("cache: {e}"))),
            Some(Ok(Some(cfg))) => {
                // Keep the cached objects across updates that leave the settings (and the
                // first host) alone.
                let first_host = route.hosts.first().map(|h| h.to_ascii_lowercase());
                let old = ctx
                    .previous
                    .and_then(|t| t.routes.get(route.name.as_str()))
                    .filter(|r| r.hosts.first().map(|h| &**h) == first_host.as_deref())
                    .and_then(|r| r.cache.clone())
                    .filter(|c| c.config() == &cfg);
                Some(old.unwrap_or_else(|| crate::cache::Cache::for_route(cfg, &route.name)))
            }
        };
        Ok(Self {
            hosts: route
                .hosts
                .iter()
                .map(|h| Arc::from(h.to_ascii_lowercase()))
                .collect(),
            name: route.name.as_str().into(),
            shared_name: route.name.as_str().into(),
            cache,
            rules: rules.into_boxed_slice(),
            counters: ctx.metrics.route_counters(&route.name),
            note,
            timeout: route
                .timeouts
                .as_ref()
                .filter(|t| t.request_ms > 0)
                .map(|t| Duration::from_millis(t.request_ms)),
            retry: route
                .retry
                .as_ref()
                .map(RetryRt::from_proto)
                .unwrap_or_else(RetryRt::default_policy),
            outlier,
            max_per_endpoint: route
                .circuit_breaker
                .as_ref()
                .map(|c| c.max_requests_per_endpoint)
                .filter(|m| *m > 0)
                .unwrap_or(DEFAULT_MAX_PER_ENDPOINT),
            hash_on,
            slow_start,
            rate_limit,
            warming,
            active: AtomicU32::new(0),
            active_retries: AtomicU32::new(0),
            source: route,
        })
    }

    /// Whether one more retry fits the budget: retries in flight stay below
    /// `budgetPercent` of the requests in flight (never fewer than [`MIN_RETRY_CONCURRENCY`], so a quiet route can
    /// still retry), as Envoy's retry budgets do.
    pub(crate) fn try_begin_retry(&self) -> bool {
        let active = self.active.load(Ordering::Relaxed);
        let allowed = (active * self.retry.budget_percent / 100).max(MIN_RETRY_CONCURRENCY);
        if self.active_retries.fetch_add(1, Ordering::Relaxed) < allowed {
            true
        } else {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            false
        }
    }

    pub(crate) fn end_retry(&self) {
        self.active_retries.fetch_sub(1, Ordering::Relaxed);
    }

    /// The hashing key of a request, hashed.
    pub(crate) fn request_hash(&self, path: &str, headers: &http::HeaderMap) -> Option<u64> {
        let key: &[u8] = match self.hash_on.as_ref()? {
            HashOnRt::Path => path.as_bytes(),
            HashOnRt::Header(h) => headers.get(h)?.as_bytes(),
            HashOnRt::Cookie(name) => headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|kv| {
                    let (k, v) = kv.trim().split_once('=')?;
                    (k == &**name).then_some(v)
                })?
                .as_bytes(),
        };
        Some(crate::balance::hash_key(key))
    }
}

impl RuleRt {
    fn build(
        rule: &pb::Rule,
        algorithm: Algorithm,
        hash_balance_factor: u32,
        slow_start: Option<SlowStart>,
        min_healthy: u32,
        ctx: &BuildCtx<'_>,
    ) -> Result<Self, RuleError> {
        // Endpoints in the agent's first table were serving before it came up: no ramp.
        let initial = ctx.previous.is_none_or(Table::is_empty);
        let mut matches = Vec::with_capacity(rule.matches.len());
        for m in &rule.matches {
            matches.push(MatchRt::build(m)?);
        }
        // The agent's health view: an endpoint failing checks or ejected counts as not ready.
        let mut effective = rule.clone();
        let mut members = Vec::new();
        let mut local_differs = false;
        for b in &mut effective.backends {
            for ep in &mut b.endpoints {
                let addr: SocketAddr = ep.address.parse().map_err(|source| RuleError::Address {
                    service: b.service.clone(),
                    address: ep.address.clone(),
                    source,
                })?;
                let health = ctx.endpoints.get(addr, ctx.metrics);
                if ep.ready && !health.is_healthy(ctx.now_ms) {
                    ep.ready = false;
                    local_differs = true;
                }
                health.note_serving(ep.ready, ctx.now_ms, initial);
                members.push(health);
            }
        }
        if local_differs {
            weir_proto::weights::assign_weights(&mut effective, min_healthy);
        }
        let mut targets = Vec::new();
        let mut weights = Vec::new();
        let mut zones: Vec<(&str, u32)> = Vec::new();
        let mut ids = Vec::new();
        let mut member = members.iter();
        for (group, b) in effective.backends.iter().enumerate() {
            for ep in &b.endpoints {
                let Some(health) = member.next() else { break };
                ctx.metrics.set_endpoint_healthy(health.addr, ep.ready);
                if ep.weight == 0 {
                    continue;
                }
                let authority =
                    Authority::try_from(health.addr.to_string().as_str()).map_err(|source| {
                        RuleError::Authority {
                            addr: health.addr,
                            source,
                        }
                    })?;
                zones.push((ep.zone.as_str(), group as u32));
                ids.push(endpoint_id(&ep.address));
                weights.push(ep.weight);
                targets.push(Target {
                    addr: health.addr,
                    h2c: b.protocol == pb::Protocol::H2c as i32,
                    authority,
                    health: health.clone(),
                    grpc_calls: OnceLock::new(),
                });
            }
        }
        if !ctx.zone.is_empty() {
            let placements: Vec<Placement<'_>> = weights
                .iter()
                .zip(&zones)
                .map(|(&weight, &(zone, group))| Placement {
                    weight,
                    zone,
                    group,
                })
                .collect();
            weights = zone_aware_weights(&placements, ctx.zone, LOCALITY_MIN_PERCENT);
            // Endpoints locality turned off leave the target list, like any weight-0 one.
            if weights.contains(&0) {
                let keep: Vec<bool> = weights.iter().map(|w| *w > 0).collect();
                let mut k = keep.iter();
                targets.retain(|_| k.next().copied().unwrap_or(false));
                let mut k = keep.iter();
                ids.retain(|_| k.next().copied().unwrap_or(false));
                weights.retain(|w| *w > 0);
            }
        }
        let mut warming = false;
        if let Some(ss) = slow_start {
            let permille: Vec<u32> = targets
                .iter()
                .map(|t| {
                    t.health
                        .slow_start_permille(ctx.now_ms, ss.window_ms, ss.min_percent)
                })
                .collect();
            if permille.iter().any(|&p| p < 1000) {
                warming = true;
                weights = slow_start_weights(&weights, &permille);
            }
        }
        let loads: Vec<Arc<EndpointLoad>> = targets.iter().map(|t| t.health.load.clone()).collect();
        Ok(Self {
            matches: matches.into_boxed_slice(),
            picker: Picker::build(algorithm, &weights, &ids)
                .with_hash_balance_factor(hash_balance_factor, &weights),
            targets: targets.into_boxed_slice(),
            loads: loads.into_boxed_slice(),
            members: members.into_boxed_slice(),
            effective,
            warming,
            mirror: None,
        })
    }

    #[inline]
    pub(crate) fn matches(&self, method: &Method, path: &str, headers: &http::HeaderMap) -> bool {
        self.matches.is_empty()
            || self
                .matches
                .iter()
                .any(|m| m.matches(method, path, headers))
    }

    /// The endpoint for the next request, or `None` when no endpoint may receive traffic.
    #[inline]
    pub(crate) fn pick(&self, hash: Option<u64>) -> Option<&Target> {
        let i = self.picker.pick(
            hash,
            &self.loads,
            rand::random::<u64>(),
            crate::health::now_nanos(),
        )?;
        self.targets.get(i)
    }

    /// Whether ejecting one more member keeps the rule within `max_percent` ejected.
    pub(crate) fn may_eject(&self, max_percent: u32, now_ms: u64) -> bool {
        let total = self.members.len() as u64;
        let ejected = self.members.iter().filter(|m| m.is_ejected(now_ms)).count() as u64;
        (ejected + 1) * 100 <= u64::from(max_percent) * total
    }
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
        let metrics = Metrics::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoints = Endpoints::new(tx);
        let ctx = BuildCtx {
            previous: None,
            metrics: &metrics,
            endpoints: &endpoints,
            zone: "",
            now_ms: 1,
        };
        Table::build(1, routes, &ctx)
    }

    #[test]
    fn an_agent_with_a_zone_keeps_traffic_in_its_zone_while_it_has_capacity() {
        let mut r = route(
            "a/b",
            &["shop"],
            &[
                ("127.0.0.1:80", 1),
                ("127.0.0.2:80", 1),
                ("127.0.0.3:80", 1),
                ("127.0.0.4:80", 1),
            ],
        );
        for (i, ep) in r.rules[0].backends[0].endpoints.iter_mut().enumerate() {
            ep.zone = if i < 2 { "a".into() } else { "b".into() };
        }
        let metrics = Metrics::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoints = Endpoints::new(tx);
        let ctx = BuildCtx {
            previous: None,
            metrics: &metrics,
            endpoints: &endpoints,
            zone: "a",
            now_ms: 1,
        };
        let t = Table::build(1, [r], &ctx).expect("table");
        let rule = &t.route("shop").expect("route").rules[0];
        let picked: std::collections::BTreeSet<String> = (0..20)
            .filter_map(|_| rule.pick(None))
            .map(|t| t.addr.to_string())
            .collect();
        assert_eq!(
            picked.into_iter().collect::<Vec<_>>(),
            ["127.0.0.1:80", "127.0.0.2:80"]
        );
    }

    #[test]
    fn slow_start_scales_weights_by_per_mille_and_keeps_them_positive() {
        assert_eq!(
            slow_start_weights(&[1, 1, 1], &[1000, 1000, 100]),
            [1000, 1000, 100]
        );
        assert_eq!(slow_start_weights(&[0, 3], &[10, 500]), [0, 1500]);
        assert_eq!(slow_start_weights(&[u32::MAX], &[1000]), [u32::MAX]);
    }

    #[test]
    fn an_endpoint_added_after_the_first_table_warms_and_the_others_do_not() {
        let window_ms = 30_000;
        let with_slow_start = |eps: &[(&str, u32)]| {
            let mut r = route("a/b", &["shop"], eps);
            r.load_balancer = Some(pb::LoadBalancer {
                algorithm: Algorithm::WeightedRoundRobin as i32,
                slow_start_window_ms: window_ms,
                slow_start_min_percent: 10,
                ..Default::default()
            });
            r
        };
        let metrics = Metrics::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoints = Endpoints::new(tx);
        let ctx = |previous, now_ms| BuildCtx {
            previous,
            metrics: &metrics,
            endpoints: &endpoints,
            zone: "",
            now_ms,
        };
        let two = [("127.0.0.1:80", 1), ("127.0.0.2:80", 1)];
        let first = Table::build(1, [with_slow_start(&two)], &ctx(None, 1)).expect("table");
        assert!(!first.get("a/b").expect("route").warming);
        assert_eq!(first.warm_up_tick(), None);

        let three = [two[0], two[1], ("127.0.0.3:80", 1)];
        let second =
            Table::build(2, [with_slow_start(&three)], &ctx(Some(&first), 1_000)).expect("table");
        let rt = second.get("a/b").expect("route");
        assert!(rt.warming);
        assert_eq!(second.warm_up_tick(), Some(Duration::from_secs(3)));
        let until: Vec<Option<u64>> = rt.rules[0]
            .members
            .iter()
            .map(|m| m.warming_until(1_000, window_ms))
            .collect();
        assert_eq!(until, [None, None, Some(31_000)]);
        // At 10 %: 100 of every 2100 picks.
        let mut picks = [0u32; 3];
        for _ in 0..2100 {
            let t = rt.rules[0].pick(None).expect("a target");
            let i = three
                .iter()
                .position(|(a, _)| *a == t.addr.to_string())
                .expect("a known endpoint");
            picks[i] += 1;
        }
        assert_eq!(picks, [1000, 1000, 100]);

        // Half-way: 50 %. Once the window is over: full weight, and no more rebuilds.
        let half = second.rebuild(&ctx(Some(&second), 16_000)).expect("table");
        assert!(half.get("a/b").expect("route").warming);
        let done = half.rebuild(&ctx(Some(&half), 31_000)).expect("table");
        assert!(!done.get("a/b").expect("route").warming);
        assert_eq!(done.warm_up_tick(), None);
    }

    #[test]
    fn the_retry_budget_caps_retries_in_flight_at_a_share_of_requests() {
        let t = build(vec![route("a/b", &["shop"], &[("127.0.0.1:80", 1)])]).expect("table");
        let r = t.route("shop").expect("route");
        r.active.store(100, Ordering::Relaxed);
        // Default budget: 20 % of 100 live requests.
        let granted = (0..50).filter(|_| r.try_begin_retry()).count();
        assert_eq!(granted, 20);
        r.end_retry();
        assert!(r.try_begin_retry(), "a finished retry frees its slot");
        // A quiet route still gets the floor.
        r.active.store(1, Ordering::Relaxed);
        r.active_retries.store(0, Ordering::Relaxed);
        let granted = (0..50).filter(|_| r.try_begin_retry()).count();
        assert_eq!(granted, MIN_RETRY_CONCURRENCY as usize);
    }

    #[test]
    fn looks_up_routes_by_lower_case_host() {
        let t = build(vec![route("a/b", &["Shop"], &[("127.0.0.1:80", 1)])]).expect("table");
        assert!(t.route("shop").is_some());
        assert!(t.route("other").is_none());
    }

    #[test]
    fn local_health_recomputes_weights_with_the_controllers_load_factors() {
        let mut r = route(
            "a/b",
            &["shop"],
            &[
                ("127.0.0.1:80", 1),
                ("127.0.0.2:80", 1),
                ("127.0.0.3:80", 1),
            ],
        );
        r.rules[0].backends[0].weight = 1;
        r.rules[0].backends[0].endpoints[0].load_permille = 500;
        let metrics = Metrics::new();
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let endpoints = Endpoints::new(tx);
        endpoints
            .get("127.0.0.3:80".parse().expect("addr"), &metrics)
            .set_active(false, "HTTP 500");
        let ctx = BuildCtx {
            previous: None,
            metrics: &metrics,
            endpoints: &endpoints,
            zone: "",
            now_ms: 1,
        };
        let t = Table::build(1, [r], &ctx).expect("table");
        let eps = &t.route("shop").expect("route").rules[0].effective.backends[0].endpoints;
        let got: Vec<(u32, u32)> = eps.iter().map(|e| (e.weight, e.load_permille)).collect();
        // The factors are kept; the sick endpoint is out; the others split 500 : 1000.
        assert_eq!(
            got.iter().map(|g| g.1).collect::<Vec<_>>(),
            [500, 0, 0],
            "{got:?}"
        );
        assert_eq!(got[2].0, 0, "{got:?}");
        let ratio = f64::from(got[1].0) / f64::from(got[0].0);
        assert!((ratio - 2.0).abs() < 1e-3, "{got:?}");
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
                rule.pick(None).expect("target").addr.to_string(),
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
