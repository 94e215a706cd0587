//! Validation and normalisation of a `TrafficPolicySpec`: everything that can be said about a
//! policy without looking at any other object.
//!
//! [`validate`] checks every field, collects **all** problems (a user fixing a manifest wants
//! the whole list, not one error per apply), and on success returns the
//! [`weir_proto::v1::Route`] the spec programs, minus what only the cluster knows: the route's
//! name, and each backend's resolved port, protocol and endpoints. Error messages start with
//! the field path as the user wrote it (`spec.rules[1].backendRefs[0].weight: …`).
//!
//! Normalisation done here so that nothing downstream has to repeat it: hosts and header
//! names are lower-cased, methods upper-cased, durations become milliseconds, sizes become
//! bytes, and the defaults that matter to the agent (`RoundRobin`, weight 1,
//! `minHealthyPercent` 70, `TinyLfu`) are filled in. Other omitted fields stay 0 / empty in
//! the proto, which the agent reads as "use your default".

use crate::model::{
    ALGORITHMS, BackendRef, Cache, DEFAULT_EVICTION, DEFAULT_MIN_HEALTHY_PERCENT,
    DEFAULT_MIRROR_PERCENT, DEFAULT_SLOW_START_PERCENT, EVICTION_NAMES, EVICTIONS, HealthCheck,
    LoadBalancer, MAX_HASH_BALANCE_FACTOR, MAX_PRIORITY, MAX_RATE_LIMIT_BURST, MAX_RATE_LIMIT_RPS,
    MAX_RETRY_ATTEMPTS, MAX_SLOW_START_PERCENT, MAX_SLOW_START_WINDOW_MS, MAX_WEIGHT,
    MIN_HASH_BALANCE_FACTOR, MIN_SLOW_START_PERCENT, MIN_SLOW_START_WINDOW_MS, Match, Mirror,
    OutlierDetection, RETRY_CONDITIONS, RateLimit, Retry, Rule, SlowStart, TrafficPolicySpec,
};
mod syntax;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::{self, Display};
use syntax::{
    check_path, header_name, is_dns_label, is_header_value, is_retry_condition, is_token,
    normalize_host,
};
pub(crate) use syntax::{parse_duration_ms, parse_quantity};
use weir_proto::v1 as pb;

/// Checks `spec` and returns the route it programs, or every problem found.
///
/// The returned route has an empty `name` (the caller knows the policy's key) and one
/// [`pb::Rule`] per spec rule with one [`pb::Backend`] per backendRef, **in spec order**, so
/// `route.rules[i].backends[j]` is `spec.rules[i].backendRefs[j]`. Each backend carries only
/// `service`, `port` (0 when the backendRef omits it: resolution picks the Service's only
/// port), `tier` and `weight`; endpoints and protocol are left for resolution.
///
/// A rule whose backends all have weight 0 is valid: it is fully drained and requests that
/// select it get a 503 from the agent, which is what a user draining everything asked for.
pub(crate) fn validate(spec: &TrafficPolicySpec) -> Result<pb::Route, Vec<String>> {
    let mut v = Validator::default();
    let route = pb::Route {
        name: String::new(),
        hosts: v.hosts(&spec.hosts),
        load_balancer: Some(v.load_balancer(spec.load_balancer.as_ref())),
        rules: v.rules(&spec.rules),
        min_healthy_percent: v.min_healthy_percent(spec),
        timeouts: spec.timeout.as_deref().and_then(|t| {
            v.duration_ms(format_args!("spec.timeout"), t)
                .map(|request_ms| pb::Timeouts {
                    connect_ms: 0,
                    request_ms,
                })
        }),
        retry: spec.retry.as_ref().map(|r| v.retry(r)),
        health_check: spec.health_check.as_ref().map(|h| v.health_check(h)),
        outlier_detection: spec
            .outlier_detection
            .as_ref()
            .map(|o| v.outlier_detection(o)),
        cache: spec.cache.as_ref().map(|c| v.cache(c)),
        circuit_breaker: spec.circuit_breaker.as_ref().map(|c| pb::CircuitBreaker {
            max_requests_per_endpoint: v.int_in(
                format_args!("spec.circuitBreaker.maxRequestsPerEndpoint"),
                c.max_requests_per_endpoint,
                0,
                1,
                1_000_000,
            ),
        }),
        rate_limit: spec.rate_limit.as_ref().map(|r| v.rate_limit(r)),
    };
    if v.errors.is_empty() {
        Ok(route)
    } else {
        Err(v.errors)
    }
}

/// Collects errors; field paths are passed as `fmt::Arguments` so that a valid policy (the
/// common case, re-checked on every cluster change) formats no path at all.
#[derive(Default)]
struct Validator {
    errors: Vec<String>,
}

impl Validator {
    fn error(&mut self, path: fmt::Arguments<'_>, message: impl Display) {
        self.errors.push(format!("{path}: {message}"));
    }

    /// `value` (or `default`) as a `u32` within `lo..=hi`, or an error naming the bound.
    fn int_in(
        &mut self,
        path: fmt::Arguments<'_>,
        value: Option<i64>,
        default: u32,
        lo: i64,
        hi: i64,
    ) -> u32 {
        let Some(value) = value else {
            return default;
        };
        if value < lo {
            self.error(path, format_args!("must be >= {lo}, got {value}"));
            default
        } else if value > hi {
            self.error(path, format_args!("must be <= {hi}, got {value}"));
            default
        } else {
            u32::try_from(value).unwrap_or(default)
        }
    }

    fn duration_ms(&mut self, path: fmt::Arguments<'_>, text: &str) -> Option<u64> {
        match parse_duration_ms(text) {
            Ok(ms) => Some(ms),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    fn opt_duration_ms(&mut self, path: fmt::Arguments<'_>, text: Option<&str>) -> u64 {
        text.and_then(|t| self.duration_ms(path, t)).unwrap_or(0)
    }

    fn hosts(&mut self, hosts: &[String]) -> Vec<String> {
        if hosts.is_empty() {
            self.error(
                format_args!("spec.hosts"),
                "must list at least one host name",
            );
        }
        let mut out: Vec<String> = Vec::with_capacity(hosts.len());
        for (i, raw) in hosts.iter().enumerate() {
            match normalize_host(raw) {
                Ok(host) => {
                    // A repeated host is almost always a typo for another one.
                    if let Some(first) = out.iter().position(|h| *h == host) {
                        self.error(
                            format_args!("spec.hosts[{i}]"),
                            format_args!(
                                "host {host:?} is listed twice (also spec.hosts[{first}])"
                            ),
                        );
                    } else {
                        out.push(host);
                    }
                }
                Err(e) => self.error(format_args!("spec.hosts[{i}]"), e),
            }
        }
        out
    }

    fn load_balancer(&mut self, lb: Option<&LoadBalancer>) -> pb::LoadBalancer {
        let algorithm = match lb.and_then(|lb| lb.algorithm.as_deref()) {
            None => pb::Algorithm::RoundRobin,
            Some(name) => match ALGORITHMS.iter().find(|(n, _)| *n == name) {
                Some((_, a)) => *a,
                None => {
                    let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
                    self.error(
                        format_args!("spec.loadBalancer.algorithm"),
                        format_args!(
                            "unknown algorithm {name:?}; expected one of {}",
                            names.join(", ")
                        ),
                    );
                    pb::Algorithm::RoundRobin
                }
            },
        };
        let hash_on = lb.and_then(|lb| lb.hash_on.as_ref());
        let needs_key = matches!(algorithm, pb::Algorithm::RingHash | pb::Algorithm::Maglev);
        let hash_on = match hash_on {
            None => {
                if needs_key {
                    let name = ALGORITHMS
                        .iter()
                        .find(|(_, a)| *a == algorithm)
                        .map_or("", |(n, _)| *n);
                    self.error(
                        format_args!("spec.loadBalancer.hashOn"),
                        format_args!(
                            "algorithm {name} needs hashOn with one of header, cookie or path"
                        ),
                    );
                }
                None
            }
            Some(h) => {
                let mut keys = Vec::with_capacity(3);
                if let Some(header) = &h.header {
                    keys.push(("header", pb::hash_on::Key::Header(header.clone())));
                }
                if let Some(cookie) = &h.cookie {
                    keys.push(("cookie", pb::hash_on::Key::Cookie(cookie.clone())));
                }
                // `path: false` is an explicit "not the path", not a key.
                if h.path == Some(true) {
                    keys.push(("path", pb::hash_on::Key::Path(true)));
                }
                if keys.len() != 1 {
                    let given: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
                    self.error(
                        format_args!("spec.loadBalancer.hashOn"),
                        format_args!(
                            "set exactly one of header, cookie or path (got {})",
                            if given.is_empty() {
                                "none".to_owned()
                            } else {
                                given.join(", ")
                            }
                        ),
                    );
                    None
                } else {
                    keys.pop().and_then(|(_, key)| self.hash_key(key))
                }
            }
        };
        let load_aware = lb.and_then(|lb| lb.load_aware).unwrap_or(false);
        if load_aware && needs_key {
            self.error(
                format_args!("spec.loadBalancer.loadAware"),
                "cannot be combined with RingHash or Maglev: weights that follow load would \
                 move keys between endpoints all the time",
            );
        }
        let hash_balance_factor = match lb.and_then(|lb| lb.hash_balance_factor) {
            None => 0,
            Some(f) if !needs_key => {
                self.error(
                    format_args!("spec.loadBalancer.hashBalanceFactor"),
                    format_args!(
                        "{f} is set but only applies to RingHash and Maglev (bounded-load \
                         consistent hashing); remove it or choose one of those algorithms"
                    ),
                );
                0
            }
            Some(f) if !(MIN_HASH_BALANCE_FACTOR..=MAX_HASH_BALANCE_FACTOR).contains(&f) => {
                self.error(
                    format_args!("spec.loadBalancer.hashBalanceFactor"),
                    format_args!(
                        "{f} is out of range: a percent of the mean load from \
                         {MIN_HASH_BALANCE_FACTOR} to {MAX_HASH_BALANCE_FACTOR} (125 caps every \
                         endpoint at 1.25 x the mean; 100 or less would leave no room to \
                         hash at all)"
                    ),
                );
                0
            }
            Some(f) => f,
        };
        let (slow_start_window_ms, slow_start_min_percent) =
            match lb.and_then(|lb| lb.slow_start.as_ref()) {
                None => (0, 0),
                Some(_) if needs_key => {
                    self.error(
                        format_args!("spec.loadBalancer.slowStart"),
                        "cannot be combined with RingHash or Maglev: weights that ramp up would \
                         move keys between endpoints during every warm-up",
                    );
                    (0, 0)
                }
                Some(ss) => self.slow_start(ss),
            };
        pb::LoadBalancer {
            algorithm: algorithm as i32,
            hash_on: hash_on.map(|key| pb::HashOn { key: Some(key) }),
            load_aware,
            hash_balance_factor,
            slow_start_window_ms,
            slow_start_min_percent,
        }
    }

    /// `(window_ms, min_percent)` of a slow start; `(0, 0)` (off) when either is invalid.
    fn slow_start(&mut self, ss: &SlowStart) -> (u64, u32) {
        let window = match self.duration_ms(
            format_args!("spec.loadBalancer.slowStart.window"),
            &ss.window,
        ) {
            Some(ms) if (MIN_SLOW_START_WINDOW_MS..=MAX_SLOW_START_WINDOW_MS).contains(&ms) => {
                Some(ms)
            }
            Some(_) => {
                self.error(
                    format_args!("spec.loadBalancer.slowStart.window"),
                    format_args!(
                        "{:?} is out of range: from {} s to {} min (the time a new endpoint \
                         takes to reach its full weight)",
                        ss.window,
                        MIN_SLOW_START_WINDOW_MS / 1000,
                        MAX_SLOW_START_WINDOW_MS / 60_000
                    ),
                );
                None
            }
            None => None,
        };
        let percent = ss.min_weight_percent.unwrap_or(DEFAULT_SLOW_START_PERCENT);
        let percent_ok = (MIN_SLOW_START_PERCENT..=MAX_SLOW_START_PERCENT).contains(&percent);
        if !percent_ok {
            self.error(
                format_args!("spec.loadBalancer.slowStart.minWeightPercent"),
                format_args!(
                    "{percent} is out of range: the percent of its weight a warming endpoint \
                     starts with, from {MIN_SLOW_START_PERCENT} to {MAX_SLOW_START_PERCENT} \
                     (0 would leave it no traffic to warm up on)"
                ),
            );
        }
        match window {
            Some(w) if percent_ok => (w, percent),
            _ => (0, 0),
        }
    }

    fn hash_key(&mut self, key: pb::hash_on::Key) -> Option<pb::hash_on::Key> {
        match key {
            pb::hash_on::Key::Header(name) => match header_name(&name) {
                Ok(name) => Some(pb::hash_on::Key::Header(name)),
                Err(e) => {
                    self.error(format_args!("spec.loadBalancer.hashOn.header"), e);
                    None
                }
            },
            pb::hash_on::Key::Cookie(name) => {
                if is_token(&name) {
                    Some(pb::hash_on::Key::Cookie(name))
                } else {
                    self.error(
                        format_args!("spec.loadBalancer.hashOn.cookie"),
                        format_args!("{name:?} is not a valid cookie name"),
                    );
                    None
                }
            }
            key @ pb::hash_on::Key::Path(_) => Some(key),
        }
    }

    fn rules(&mut self, rules: &[Rule]) -> Vec<pb::Rule> {
        if rules.is_empty() {
            self.error(
                format_args!("spec.rules"),
                "must have at least one rule with backendRefs",
            );
        }
        rules
            .iter()
            .enumerate()
            .map(|(i, rule)| pb::Rule {
                matches: rule
                    .matches
                    .iter()
                    .enumerate()
                    .map(|(j, m)| self.rule_match(i, j, m))
                    .collect(),
                backends: self.backends(i, &rule.backend_refs),
                active_tier: 0,
                panic: false,
                mirror: rule.mirror.as_ref().map(|m| self.mirror(i, m)),
            })
            .collect()
    }

    fn rule_match(&mut self, i: usize, j: usize, m: &Match) -> pb::Match {
        let method = match m.method.as_deref() {
            None => String::new(),
            Some(method) if is_token(method) => method.to_ascii_uppercase(),
            Some(method) => {
                self.error(
                    format_args!("spec.rules[{i}].matches[{j}].method"),
                    format_args!("{method:?} is not an HTTP method"),
                );
                String::new()
            }
        };
        let path = m.path.as_ref().map(|p| {
            let kind = match p.kind.as_deref() {
                None | Some("PathPrefix") => pb::path_match::Kind::Prefix,
                Some("Exact") => pb::path_match::Kind::Exact,
                Some(other) => {
                    self.error(
                        format_args!("spec.rules[{i}].matches[{j}].path.type"),
                        format_args!(
                            "unknown path match type {other:?}; expected PathPrefix or Exact"
                        ),
                    );
                    pb::path_match::Kind::Prefix
                }
            };
            if let Err(e) = check_path(&p.value) {
                self.error(format_args!("spec.rules[{i}].matches[{j}].path.value"), e);
            }
            pb::PathMatch {
                kind: kind as i32,
                value: p.value.clone(),
            }
        });
        let headers = m
            .headers
            .iter()
            .enumerate()
            .map(|(k, h)| {
                let name = header_name(&h.name).unwrap_or_else(|e| {
                    self.error(
                        format_args!("spec.rules[{i}].matches[{j}].headers[{k}].name"),
                        e,
                    );
                    String::new()
                });
                if !is_header_value(&h.value) {
                    self.error(
                        format_args!("spec.rules[{i}].matches[{j}].headers[{k}].value"),
                        "must not contain control characters such as CR or LF",
                    );
                }
                pb::HeaderMatch {
                    name,
                    value: h.value.clone(),
                }
            })
            .collect();
        pb::Match {
            method,
            path,
            headers,
        }
    }

    fn backends(&mut self, i: usize, refs: &[BackendRef]) -> Vec<pb::Backend> {
        if refs.is_empty() {
            self.error(
                format_args!("spec.rules[{i}].backendRefs"),
                "must list at least one backend",
            );
        }
        // (name, port) -> first index, to catch a Service listed twice.
        let mut seen: BTreeMap<(&str, Option<i32>), usize> = BTreeMap::new();
        refs.iter()
            .enumerate()
            .map(|(j, r)| {
                if r.name.is_empty() {
                    self.error(
                        format_args!("spec.rules[{i}].backendRefs[{j}].name"),
                        "must name a Service",
                    );
                } else if !is_dns_label(&r.name) {
                    self.error(
                        format_args!("spec.rules[{i}].backendRefs[{j}].name"),
                        format_args!(
                            "{:?} is not a Service name (lower-case letters, digits and '-', \
                             at most 63 characters)",
                            r.name
                        ),
                    );
                } else if let Some(&first) = seen.get(&(r.name.as_str(), r.port)) {
                    // Two entries for one Service port would list its endpoints twice; the
                    // user meant one entry with the combined weight.
                    self.error(
                        format_args!("spec.rules[{i}].backendRefs[{j}]"),
                        format_args!(
                            "Service {:?} is already listed as backendRefs[{first}]; \
                             use one entry and combine the weights",
                            r.name
                        ),
                    );
                } else {
                    seen.insert((r.name.as_str(), r.port), j);
                }
                let port = self.int_in(
                    format_args!("spec.rules[{i}].backendRefs[{j}].port"),
                    r.port.map(i64::from),
                    0,
                    1,
                    65535,
                );
                let weight = self.int_in(
                    format_args!("spec.rules[{i}].backendRefs[{j}].weight"),
                    r.weight,
                    1,
                    0,
                    MAX_WEIGHT,
                );
                let tier = self.int_in(
                    format_args!("spec.rules[{i}].backendRefs[{j}].priority"),
                    r.priority,
                    0,
                    0,
                    MAX_PRIORITY,
                );
                pb::Backend {
                    service: r.name.clone(),
                    port,
                    tier,
                    weight,
                    protocol: pb::Protocol::Http1 as i32,
                    endpoints: Vec::new(),
                }
            })
            .collect()
    }

    fn service_name(&mut self, path: fmt::Arguments<'_>, name: &str) {
        if name.is_empty() {
            self.error(path, "must name a Service");
        } else if !is_dns_label(name) {
            self.error(
                path,
                format_args!(
                    "{name:?} is not a Service name (lower-case letters, digits and '-', at \
                     most 63 characters)"
                ),
            );
        }
    }

    fn mirror(&mut self, i: usize, m: &Mirror) -> pb::Mirror {
        let r = &m.backend_ref;
        self.service_name(
            format_args!("spec.rules[{i}].mirror.backendRef.name"),
            &r.name,
        );
        let port = self.int_in(
            format_args!("spec.rules[{i}].mirror.backendRef.port"),
            r.port.map(i64::from),
            0,
            1,
            65535,
        );
        let percent = self.int_in(
            format_args!("spec.rules[{i}].mirror.percent"),
            m.percent,
            DEFAULT_MIRROR_PERCENT,
            1,
            100,
        );
        pb::Mirror {
            backend: Some(pb::Backend {
                service: r.name.clone(),
                port,
                tier: 0,
                weight: 0,
                protocol: pb::Protocol::Http1 as i32,
                endpoints: Vec::new(),
            }),
            percent,
        }
    }

    fn rate_limit(&mut self, r: &RateLimit) -> pb::RateLimit {
        let requests_per_second = self.int_in(
            format_args!("spec.rateLimit.requestsPerSecond"),
            Some(r.requests_per_second),
            1,
            1,
            MAX_RATE_LIMIT_RPS,
        );
        let burst = self.int_in(
            format_args!("spec.rateLimit.burst"),
            r.burst,
            requests_per_second,
            1,
            MAX_RATE_LIMIT_BURST,
        );
        pb::RateLimit {
            requests_per_second,
            burst,
        }
    }

    fn min_healthy_percent(&mut self, spec: &TrafficPolicySpec) -> u32 {
        self.int_in(
            format_args!("spec.failover.minHealthyPercent"),
            spec.failover.as_ref().and_then(|f| f.min_healthy_percent),
            DEFAULT_MIN_HEALTHY_PERCENT,
            1,
            100,
        )
    }

    fn retry(&mut self, r: &Retry) -> pb::RetryPolicy {
        let attempts = self.int_in(
            format_args!("spec.retry.attempts"),
            r.attempts,
            0,
            0,
            MAX_RETRY_ATTEMPTS,
        );
        let budget_percent = self.int_in(
            format_args!("spec.retry.budgetPercent"),
            r.budget_percent,
            0,
            0,
            100,
        );
        for (k, on) in r.on.iter().enumerate() {
            if !is_retry_condition(on) {
                self.error(
                    format_args!("spec.retry.on[{k}]"),
                    format_args!(
                        "unknown retry condition {on:?}; expected 429, a 5xx status code \
                         such as \"503\", or one of {}",
                        RETRY_CONDITIONS.join(", ")
                    ),
                );
            }
        }
        pb::RetryPolicy {
            attempts,
            on: r.on.clone(),
            per_try_timeout_ms: self.opt_duration_ms(
                format_args!("spec.retry.perTryTimeout"),
                r.per_try_timeout.as_deref(),
            ),
            budget_percent,
        }
    }

    fn health_check(&mut self, h: &HealthCheck) -> pb::HealthCheck {
        let path = h.path.as_deref().unwrap_or_default();
        if h.path.is_some() {
            if let Err(e) = check_path(path) {
                self.error(format_args!("spec.healthCheck.path"), e);
            }
            if h.grpc.is_some() {
                self.error(
                    format_args!("spec.healthCheck"),
                    "set either path (HTTP check) or grpc (gRPC health check), not both",
                );
            }
        }
        pb::HealthCheck {
            path: path.to_owned(),
            interval_ms: self.opt_duration_ms(
                format_args!("spec.healthCheck.interval"),
                h.interval.as_deref(),
            ),
            timeout_ms: self.opt_duration_ms(
                format_args!("spec.healthCheck.timeout"),
                h.timeout.as_deref(),
            ),
            healthy_threshold: self.int_in(
                format_args!("spec.healthCheck.healthyThreshold"),
                h.healthy_threshold,
                0,
                1,
                i64::from(u32::MAX),
            ),
            unhealthy_threshold: self.int_in(
                format_args!("spec.healthCheck.unhealthyThreshold"),
                h.unhealthy_threshold,
                0,
                1,
                i64::from(u32::MAX),
            ),
            grpc_service: h.grpc.as_ref().map(|g| g.service.clone()),
        }
    }

    fn outlier_detection(&mut self, o: &OutlierDetection) -> pb::OutlierDetection {
        pb::OutlierDetection {
            consecutive_errors: self.int_in(
                format_args!("spec.outlierDetection.consecutiveErrors"),
                o.consecutive_errors,
                0,
                1,
                i64::from(u32::MAX),
            ),
            base_ejection_time_ms: self.opt_duration_ms(
                format_args!("spec.outlierDetection.baseEjectionTime"),
                o.base_ejection_time.as_deref(),
            ),
            max_ejection_percent: self.int_in(
                format_args!("spec.outlierDetection.maxEjectionPercent"),
                o.max_ejection_percent,
                0,
                0,
                100,
            ),
        }
    }

    fn cache(&mut self, c: &Cache) -> pb::CachePolicy {
        let max_size_bytes = match c.max_size.as_deref().map(parse_quantity) {
            None => 0,
            Some(Ok(bytes)) => bytes,
            Some(Err(e)) => {
                self.error(format_args!("spec.cache.maxSize"), e);
                0
            }
        };
        let eviction = match c.eviction.as_deref() {
            None => DEFAULT_EVICTION,
            Some(name) => match EVICTIONS.iter().find(|(n, _)| *n == name) {
                Some((_, e)) => *e,
                None => {
                    self.error(
                        format_args!("spec.cache.eviction"),
                        format_args!(
                            "unknown eviction policy {name:?}; expected one of {}",
                            EVICTION_NAMES.join(", ")
                        ),
                    );
                    DEFAULT_EVICTION
                }
            },
        };
        pb::CachePolicy {
            enabled: c.enabled,
            max_size_bytes,
            eviction: eviction as i32,
            stale_while_revalidate_ms: self.opt_duration_ms(
                format_args!("spec.cache.staleWhileRevalidate"),
                c.stale_while_revalidate.as_deref(),
            ),
            stale_if_error_ms: self.opt_duration_ms(
                format_args!("spec.cache.staleIfError"),
                c.stale_if_error.as_deref(),
            ),
            disk_max_size_bytes: self.cache_disk(c, max_size_bytes),
            shared: c.shared,
            peers: c.peers,
        }
    }

    /// `spec.cache.disk.maxSize`: a quantity (`parse_quantity` refuses 0), not below the memory tier's
    /// size (a smaller disk tier would hold less than memory, so every memory miss would
    /// miss on disk too).
    fn cache_disk(&mut self, c: &Cache, memory: u64) -> u64 {
        let Some(disk) = &c.disk else { return 0 };
        match parse_quantity(&disk.max_size) {
            Ok(bytes) if bytes < memory => {
                self.error(
                    format_args!("spec.cache.disk.maxSize"),
                    format_args!(
                        "{} is smaller than spec.cache.maxSize; the disk tier holds what memory cannot, so give it at least as much",
                        disk.max_size
                    ),
                );
                0
            }
            Ok(bytes) => bytes,
            Err(e) => {
                self.error(format_args!("spec.cache.disk.maxSize"), e);
                0
            }
        }
    }
}
