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
    BackendRef, Cache, DEFAULT_MIN_HEALTHY_PERCENT, HealthCheck, LoadBalancer, Match,
    OutlierDetection, Retry, Rule, TrafficPolicySpec,
};
use std::collections::BTreeMap;
use std::fmt::{self, Display};
use weir_proto::v1 as pb;

/// The load-balancing algorithms, by the exact name a policy uses.
pub const ALGORITHMS: [(&str, pb::Algorithm); 7] = [
    ("RoundRobin", pb::Algorithm::RoundRobin),
    ("WeightedRoundRobin", pb::Algorithm::WeightedRoundRobin),
    ("LeastRequest", pb::Algorithm::LeastRequest),
    ("PeakEwma", pb::Algorithm::PeakEwma),
    ("RingHash", pb::Algorithm::RingHash),
    ("Maglev", pb::Algorithm::Maglev),
    ("Random", pb::Algorithm::Random),
];

/// Cache eviction policies, by the exact name a policy uses.
pub const EVICTIONS: [&str; 4] = ["Lru", "Lfu", "Fifo", "TinyLfu"];

/// The eviction policy of a cache that names none.
pub const DEFAULT_EVICTION: &str = "TinyLfu";

/// Retry conditions besides 5xx status codes such as `"503"`.
pub const RETRY_CONDITIONS: [&str; 11] = [
    "connect-failure",
    "reset",
    "timeout",
    "refused-stream",
    "5xx",
    "gateway-error",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// The largest backendRef weight, as in Gateway API; it also keeps the weight arithmetic in
/// `routing` far from overflow.
pub const MAX_WEIGHT: i64 = 1_000_000;

/// The highest failover tier (`priority`).
pub const MAX_PRIORITY: i64 = 15;

/// The most retries a request may get.
pub const MAX_RETRY_ATTEMPTS: i64 = 10;

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
pub fn validate(spec: &TrafficPolicySpec) -> Result<pb::Route, Vec<String>> {
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
        pb::LoadBalancer {
            algorithm: algorithm as i32,
            hash_on: hash_on.map(|key| pb::HashOn { key: Some(key) }),
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
                        "unknown retry condition {on:?}; expected a 5xx status code such as \
                         \"503\" or one of {}",
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
            Some(e) if EVICTIONS.contains(&e) => e,
            Some(other) => {
                self.error(
                    format_args!("spec.cache.eviction"),
                    format_args!(
                        "unknown eviction policy {other:?}; expected one of {}",
                        EVICTIONS.join(", ")
                    ),
                );
                DEFAULT_EVICTION
            }
        };
        pb::CachePolicy {
            enabled: c.enabled,
            max_size_bytes,
            eviction: eviction.to_owned(),
            stale_while_revalidate_ms: self.opt_duration_ms(
                format_args!("spec.cache.staleWhileRevalidate"),
                c.stale_while_revalidate.as_deref(),
            ),
            stale_if_error_ms: self.opt_duration_ms(
                format_args!("spec.cache.staleIfError"),
                c.stale_if_error.as_deref(),
            ),
        }
    }
}

/// A host as the agent matches it: lower-case, no port, RFC 1123 labels.
fn normalize_host(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("host must not be empty".to_owned());
    }
    if raw.chars().any(char::is_whitespace) {
        return Err(format!("host {raw:?} must not contain spaces"));
    }
    if raw.contains('*') {
        return Err(format!(
            "host {raw:?}: wildcards are not supported; list each host name"
        ));
    }
    if raw.contains('/') {
        return Err(format!(
            "host {raw:?} must be a host name, not a URL or path"
        ));
    }
    if raw.starts_with('[') || raw.parse::<std::net::Ipv6Addr>().is_ok() {
        return Err(format!(
            "host {raw:?}: IPv6 addresses are not supported as hosts"
        ));
    }
    if raw.contains(':') {
        return Err(format!(
            "host {raw:?} must not include a port (the port is ignored when matching)"
        ));
    }
    let host = raw.to_ascii_lowercase();
    if host.len() > 253 || !host.split('.').all(is_dns_label) {
        return Err(format!(
            "host {raw:?} is not a DNS name (dot-separated labels of letters, digits and '-', \
             each 1-63 characters, not starting or ending with '-')"
        ));
    }
    Ok(host)
}

/// An RFC 1123 label, the shape of Service names and of each part of a host name.
fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-')
}

/// An RFC 9110 token: the grammar of methods, header names and cookie names.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn header_name(name: &str) -> Result<String, String> {
    if is_token(name) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!("{name:?} is not a valid HTTP header name"))
    }
}

/// Visible ASCII, spaces, tabs and obs-text; CR, LF and NUL would split or truncate headers.
fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        Err(format!("path {path:?} must start with '/'"))
    } else if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        Err(format!(
            "path {path:?} must not contain spaces or control characters"
        ))
    } else {
        Ok(())
    }
}

fn is_retry_condition(on: &str) -> bool {
    RETRY_CONDITIONS.contains(&on)
        || (on.len() == 3 && on.starts_with('5') && on.bytes().all(|b| b.is_ascii_digit()))
}

/// A positive duration such as `1s`, `250ms` or `1m 30s`, in whole milliseconds; a
/// sub-millisecond remainder rounds up so that a positive duration never becomes 0.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?}: {e} (examples: 2s, 250ms, 1m 30s)"))?;
    if d.is_zero() {
        return Err(format!("duration {text:?} must be greater than 0"));
    }
    let ms = d.as_millis() + u128::from(d.subsec_nanos() % 1_000_000 != 0);
    u64::try_from(ms).map_err(|_| format!("duration {text:?} is too long"))
}

/// A Kubernetes quantity used as a size in bytes: `1000`, `500M`, `64Mi`, `1.5Gi`, `1e9`.
///
/// A fractional byte count rounds up, as Kubernetes' `Quantity::Value` does. Zero is refused:
/// a size of nothing is never what a user meant.
pub fn parse_quantity(text: &str) -> Result<u64, String> {
    let err = |why: &str| format!("invalid size {text:?}: {why} (examples: 64Mi, 1Gi, 500M, 1000)");
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_len);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err("expected a number"));
    }
    if frac_part.contains('.') {
        return Err(err("more than one '.'"));
    }
    // 38 digits fit in a u128; anything longer is far beyond any byte count anyway.
    if int_part.len() + frac_part.len() > 30 {
        return Err(err("too many digits"));
    }
    let mut mantissa: u128 = 0;
    for b in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa * 10 + u128::from(b - b'0');
    }
    let divisor = 10u128.pow(u32::try_from(frac_part.len()).unwrap_or(0));
    let multiplier: u128 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        s if s.starts_with(['e', 'E']) => {
            let exp: u32 = s[1..]
                .parse()
                .map_err(|_| err("the exponent must be a small whole number"))?;
            if exp > 19 {
                return Err(err("too large"));
            }
            10u128.pow(exp)
        }
        "m" | "u" | "n" => return Err(err("a size cannot be a fraction of a byte")),
        _ => {
            return Err(err(
                "unknown suffix; use Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E",
            ));
        }
    };
    let scaled = mantissa
        .checked_mul(multiplier)
        .ok_or_else(|| err("too large"))?;
    let bytes = scaled.div_ceil(divisor);
    if bytes == 0 {
        return Err(err("must be greater than 0"));
    }
    u64::try_from(bytes).map_err(|_| err("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Failover, GrpcHealthCheck, HashOn, HeaderMatch, PathMatch};

    fn backend(name: &str) -> BackendRef {
        BackendRef {
            name: name.to_owned(),
            port: Some(80),
            ..BackendRef::default()
        }
    }

    fn minimal() -> TrafficPolicySpec {
        TrafficPolicySpec {
            hosts: vec!["shop".to_owned()],
            rules: vec![Rule {
                matches: vec![],
                backend_refs: vec![backend("shop-v1")],
            }],
            ..TrafficPolicySpec::default()
        }
    }

    /// The errors of `spec`, which must be invalid.
    fn errors(spec: &TrafficPolicySpec) -> Vec<String> {
        match validate(spec) {
            Ok(route) => panic!("expected errors, got {route:?}"),
            Err(errors) => errors,
        }
    }

    fn assert_single_error(spec: &TrafficPolicySpec, expected: &str) {
        assert_eq!(errors(spec), vec![expected.to_owned()]);
    }

    fn valid(spec: &TrafficPolicySpec) -> pb::Route {
        match validate(spec) {
            Ok(route) => route,
            Err(errors) => panic!("expected a valid spec, got {errors:?}"),
        }
    }

    #[test]
    fn a_minimal_policy_gets_the_documented_defaults() {
        let route = valid(&minimal());
        assert_eq!(route.name, "");
        assert_eq!(route.hosts, ["shop"]);
        assert_eq!(
            route.load_balancer,
            Some(pb::LoadBalancer {
                algorithm: pb::Algorithm::RoundRobin as i32,
                hash_on: None
            })
        );
        assert_eq!(route.min_healthy_percent, DEFAULT_MIN_HEALTHY_PERCENT);
        let backend = &route.rules[0].backends[0];
        assert_eq!(
            (
                backend.service.as_str(),
                backend.port,
                backend.tier,
                backend.weight
            ),
            ("shop-v1", 80, 0, 1)
        );
        assert!(backend.endpoints.is_empty());
        assert_eq!(route.timeouts, None);
        assert_eq!(route.retry, None);
        assert_eq!(route.health_check, None);
        assert_eq!(route.outlier_detection, None);
        assert_eq!(route.cache, None);
    }

    #[test]
    fn a_backend_without_port_gets_port_zero_for_resolution_to_fill_in() {
        let mut spec = minimal();
        spec.rules[0].backend_refs[0].port = None;
        assert_eq!(valid(&spec).rules[0].backends[0].port, 0);
    }

    #[test]
    fn the_full_design_doc_example_normalises_every_field() {
        let spec: TrafficPolicySpec = serde_json::from_value(serde_json::json!({
            "hosts": ["Shop", "shop.default.svc"],
            "loadBalancer": {"algorithm": "RingHash", "hashOn": {"header": "X-User-Id"}},
            "rules": [
                {"matches": [{"method": "get"}, {"path": {"type": "Exact", "value": "/a"},
                              "headers": [{"name": "X-Canary", "value": "1"}]}],
                 "backendRefs": [
                    {"name": "shop-v1", "port": 80, "weight": 90},
                    {"name": "shop-v2", "port": 80, "weight": 10},
                    {"name": "shop-standby", "port": 80, "priority": 1}]},
                {"backendRefs": [{"name": "shop-primary", "port": 80}]}
            ],
            "failover": {"minHealthyPercent": 50},
            "healthCheck": {"path": "/healthz", "interval": "2s", "timeout": "1s",
                            "healthyThreshold": 2, "unhealthyThreshold": 3},
            "outlierDetection": {"consecutiveErrors": 5, "baseEjectionTime": "30s",
                                 "maxEjectionPercent": 50},
            "retry": {"attempts": 2, "on": ["connect-failure", "reset", "503"],
                      "perTryTimeout": "1s", "budgetPercent": 20},
            "timeout": "15s",
            "cache": {"enabled": true, "maxSize": "64Mi", "staleWhileRevalidate": "10s",
                      "staleIfError": "5m"}
        }))
        .expect("the example parses");
        let route = valid(&spec);
        assert_eq!(route.hosts, ["shop", "shop.default.svc"]);
        assert_eq!(
            route.load_balancer,
            Some(pb::LoadBalancer {
                algorithm: pb::Algorithm::RingHash as i32,
                hash_on: Some(pb::HashOn {
                    key: Some(pb::hash_on::Key::Header("x-user-id".to_owned()))
                }),
            })
        );
        assert_eq!(route.rules.len(), 2);
        assert_eq!(route.rules[0].matches[0].method, "GET");
        assert_eq!(
            route.rules[0].matches[1].path,
            Some(pb::PathMatch {
                kind: pb::path_match::Kind::Exact as i32,
                value: "/a".to_owned()
            })
        );
        assert_eq!(route.rules[0].matches[1].headers[0].name, "x-canary");
        let tiers: Vec<(u32, u32)> = route.rules[0]
            .backends
            .iter()
            .map(|b| (b.weight, b.tier))
            .collect();
        assert_eq!(tiers, [(90, 0), (10, 0), (1, 1)]);
        assert_eq!(route.min_healthy_percent, 50);
        assert_eq!(
            route.timeouts,
            Some(pb::Timeouts {
                connect_ms: 0,
                request_ms: 15_000
            })
        );
        assert_eq!(
            route.health_check,
            Some(pb::HealthCheck {
                path: "/healthz".to_owned(),
                interval_ms: 2_000,
                timeout_ms: 1_000,
                healthy_threshold: 2,
                unhealthy_threshold: 3,
                grpc_service: None,
            })
        );
        assert_eq!(
            route.outlier_detection,
            Some(pb::OutlierDetection {
                consecutive_errors: 5,
                base_ejection_time_ms: 30_000,
                max_ejection_percent: 50
            })
        );
        assert_eq!(
            route.retry,
            Some(pb::RetryPolicy {
                attempts: 2,
                on: vec!["connect-failure".into(), "reset".into(), "503".into()],
                per_try_timeout_ms: 1_000,
                budget_percent: 20
            })
        );
        assert_eq!(
            route.cache,
            Some(pb::CachePolicy {
                enabled: true,
                max_size_bytes: 64 << 20,
                eviction: "TinyLfu".to_owned(),
                stale_while_revalidate_ms: 10_000,
                stale_if_error_ms: 300_000,
            })
        );
    }

    #[test]
    fn all_errors_are_reported_together() {
        let mut spec = minimal();
        spec.hosts.clear();
        spec.rules[0].backend_refs[0].weight = Some(-3);
        spec.timeout = Some("0s".to_owned());
        assert_eq!(
            errors(&spec),
            [
                "spec.hosts: must list at least one host name",
                "spec.rules[0].backendRefs[0].weight: must be >= 0, got -3",
                "spec.timeout: duration \"0s\" must be greater than 0",
            ]
        );
    }

    #[test]
    fn hosts_are_lower_cased() {
        let mut spec = minimal();
        spec.hosts = vec!["Shop.Example.COM".to_owned()];
        assert_eq!(valid(&spec).hosts, ["shop.example.com"]);
    }

    #[test]
    fn a_host_with_a_port_is_rejected() {
        let mut spec = minimal();
        spec.hosts = vec!["shop:80".to_owned()];
        assert_single_error(
            &spec,
            "spec.hosts[0]: host \"shop:80\" must not include a port (the port is ignored when matching)",
        );
    }

    #[test]
    fn a_host_with_a_space_is_rejected() {
        let mut spec = minimal();
        spec.hosts = vec!["my shop".to_owned()];
        assert_single_error(
            &spec,
            "spec.hosts[0]: host \"my shop\" must not contain spaces",
        );
    }

    #[test]
    fn a_wildcard_host_is_rejected() {
        let mut spec = minimal();
        spec.hosts = vec!["*.example.com".to_owned()];
        assert_single_error(
            &spec,
            "spec.hosts[0]: host \"*.example.com\": wildcards are not supported; list each host name",
        );
    }

    #[test]
    fn hosts_that_are_not_dns_names_are_rejected() {
        for bad in [
            "sh_op",
            "-shop",
            "shop.",
            "a..b",
            "http://shop",
            "[::1]",
            "::1",
            "",
        ] {
            let mut spec = minimal();
            spec.hosts = vec![bad.to_owned()];
            let errs = errors(&spec);
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert!(
                errs[0].starts_with("spec.hosts[0]: host"),
                "{bad}: {errs:?}"
            );
        }
        let mut spec = minimal();
        spec.hosts = vec!["a".repeat(64)];
        assert_eq!(errors(&spec).len(), 1);
    }

    #[test]
    fn a_host_listed_twice_is_rejected() {
        let mut spec = minimal();
        spec.hosts = vec!["shop".to_owned(), "SHOP".to_owned()];
        assert_single_error(
            &spec,
            "spec.hosts[1]: host \"shop\" is listed twice (also spec.hosts[0])",
        );
    }

    #[test]
    fn a_policy_needs_a_rule() {
        let mut spec = minimal();
        spec.rules.clear();
        assert_single_error(
            &spec,
            "spec.rules: must have at least one rule with backendRefs",
        );
    }

    #[test]
    fn a_rule_needs_a_backend() {
        let mut spec = minimal();
        spec.rules[0].backend_refs.clear();
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs: must list at least one backend",
        );
    }

    #[test]
    fn a_backend_needs_a_service_name() {
        let mut spec = minimal();
        spec.rules[0].backend_refs[0].name = String::new();
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs[0].name: must name a Service",
        );
        spec.rules[0].backend_refs[0].name = "Shop_V1".to_owned();
        assert_eq!(errors(&spec).len(), 1);
    }

    #[test]
    fn a_service_port_listed_twice_in_one_rule_is_rejected() {
        let mut spec = minimal();
        spec.rules[0].backend_refs.push(backend("shop-v1"));
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs[1]: Service \"shop-v1\" is already listed as \
             backendRefs[0]; use one entry and combine the weights",
        );
    }

    #[test]
    fn weight_must_be_between_zero_and_a_million() {
        let mut spec = minimal();
        spec.rules.push(Rule {
            matches: vec![],
            backend_refs: vec![BackendRef {
                weight: Some(-3),
                ..backend("b")
            }],
        });
        assert_single_error(
            &spec,
            "spec.rules[1].backendRefs[0].weight: must be >= 0, got -3",
        );
        spec.rules[1].backend_refs[0].weight = Some(MAX_WEIGHT + 1);
        assert_single_error(
            &spec,
            "spec.rules[1].backendRefs[0].weight: must be <= 1000000, got 1000001",
        );
    }

    #[test]
    fn a_rule_whose_backends_all_weigh_zero_is_valid_and_drains() {
        let mut spec = minimal();
        spec.rules[0].backend_refs[0].weight = Some(0);
        assert_eq!(valid(&spec).rules[0].backends[0].weight, 0);
    }

    #[test]
    fn priority_must_be_a_tier_from_0_to_15() {
        let mut spec = minimal();
        spec.rules[0].backend_refs[0].priority = Some(16);
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs[0].priority: must be <= 15, got 16",
        );
        spec.rules[0].backend_refs[0].priority = Some(15);
        assert_eq!(valid(&spec).rules[0].backends[0].tier, 15);
    }

    #[test]
    fn port_must_be_a_tcp_port() {
        let mut spec = minimal();
        spec.rules[0].backend_refs[0].port = Some(0);
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs[0].port: must be >= 1, got 0",
        );
        spec.rules[0].backend_refs[0].port = Some(65536);
        assert_single_error(
            &spec,
            "spec.rules[0].backendRefs[0].port: must be <= 65535, got 65536",
        );
    }

    #[test]
    fn an_unknown_algorithm_lists_the_known_ones() {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some("Fastest".to_owned()),
            hash_on: None,
        });
        assert_single_error(
            &spec,
            "spec.loadBalancer.algorithm: unknown algorithm \"Fastest\"; expected one of \
             RoundRobin, WeightedRoundRobin, LeastRequest, PeakEwma, RingHash, Maglev, Random",
        );
    }

    #[test]
    fn every_documented_algorithm_is_accepted() {
        for (name, algorithm) in ALGORITHMS {
            let mut spec = minimal();
            spec.load_balancer = Some(LoadBalancer {
                algorithm: Some(name.to_owned()),
                hash_on: Some(HashOn {
                    path: Some(true),
                    ..HashOn::default()
                }),
            });
            let lb = valid(&spec).load_balancer.expect("always set");
            assert_eq!(lb.algorithm, algorithm as i32);
        }
    }

    #[test]
    fn consistent_hashing_needs_a_hash_key() {
        for name in ["RingHash", "Maglev"] {
            let mut spec = minimal();
            spec.load_balancer = Some(LoadBalancer {
                algorithm: Some(name.to_owned()),
                hash_on: None,
            });
            assert_single_error(
                &spec,
                &format!(
                    "spec.loadBalancer.hashOn: algorithm {name} needs hashOn with one of header, \
                     cookie or path"
                ),
            );
        }
    }

    #[test]
    fn hash_on_takes_exactly_one_key() {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some("Maglev".to_owned()),
            hash_on: Some(HashOn {
                header: Some("x-user".to_owned()),
                cookie: Some("session".to_owned()),
                path: None,
            }),
        });
        assert_single_error(
            &spec,
            "spec.loadBalancer.hashOn: set exactly one of header, cookie or path (got header, cookie)",
        );
        spec.load_balancer = Some(LoadBalancer {
            algorithm: None,
            hash_on: Some(HashOn {
                path: Some(false),
                ..HashOn::default()
            }),
        });
        assert_single_error(
            &spec,
            "spec.loadBalancer.hashOn: set exactly one of header, cookie or path (got none)",
        );
    }

    #[test]
    fn hash_keys_must_be_valid_names() {
        let mut spec = minimal();
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some("RingHash".to_owned()),
            hash_on: Some(HashOn {
                header: Some("x user".to_owned()),
                ..HashOn::default()
            }),
        });
        assert_single_error(
            &spec,
            "spec.loadBalancer.hashOn.header: \"x user\" is not a valid HTTP header name",
        );
        spec.load_balancer = Some(LoadBalancer {
            algorithm: Some("RingHash".to_owned()),
            hash_on: Some(HashOn {
                cookie: Some("a=b".to_owned()),
                ..HashOn::default()
            }),
        });
        assert_single_error(
            &spec,
            "spec.loadBalancer.hashOn.cookie: \"a=b\" is not a valid cookie name",
        );
    }

    fn with_match(m: Match) -> TrafficPolicySpec {
        let mut spec = minimal();
        spec.rules[0].matches = vec![m];
        spec
    }

    #[test]
    fn methods_are_upper_cased_tokens() {
        let spec = with_match(Match {
            method: Some("purge".to_owned()),
            ..Match::default()
        });
        assert_eq!(valid(&spec).rules[0].matches[0].method, "PURGE");
        let spec = with_match(Match {
            method: Some("GET POST".to_owned()),
            ..Match::default()
        });
        assert_single_error(
            &spec,
            "spec.rules[0].matches[0].method: \"GET POST\" is not an HTTP method",
        );
    }

    #[test]
    fn path_matches_default_to_prefix_and_must_start_with_a_slash() {
        let spec = with_match(Match {
            path: Some(PathMatch {
                kind: None,
                value: "/api".to_owned(),
            }),
            ..Match::default()
        });
        let path = valid(&spec).rules[0].matches[0].path.clone();
        assert_eq!(
            path.map(|p| p.kind),
            Some(pb::path_match::Kind::Prefix as i32)
        );
        let spec = with_match(Match {
            path: Some(PathMatch {
                kind: Some("Regex".to_owned()),
                value: "api".to_owned(),
            }),
            ..Match::default()
        });
        assert_eq!(
            errors(&spec),
            [
                "spec.rules[0].matches[0].path.type: unknown path match type \"Regex\"; \
                 expected PathPrefix or Exact",
                "spec.rules[0].matches[0].path.value: path \"api\" must start with '/'",
            ]
        );
    }

    #[test]
    fn header_match_names_are_lower_cased_and_checked() {
        let spec = with_match(Match {
            headers: vec![HeaderMatch {
                name: "X-Env".to_owned(),
                value: "Canary".to_owned(),
            }],
            ..Match::default()
        });
        let header = &valid(&spec).rules[0].matches[0].headers[0];
        assert_eq!(
            (header.name.as_str(), header.value.as_str()),
            ("x-env", "Canary")
        );
        let spec = with_match(Match {
            headers: vec![HeaderMatch {
                name: "x:env".to_owned(),
                value: "a\r\nb".to_owned(),
            }],
            ..Match::default()
        });
        assert_eq!(
            errors(&spec),
            [
                "spec.rules[0].matches[0].headers[0].name: \"x:env\" is not a valid HTTP header name",
                "spec.rules[0].matches[0].headers[0].value: must not contain control characters \
                 such as CR or LF",
            ]
        );
    }

    #[test]
    fn min_healthy_percent_is_between_1_and_100() {
        let mut spec = minimal();
        spec.failover = Some(Failover {
            min_healthy_percent: Some(0),
        });
        assert_single_error(
            &spec,
            "spec.failover.minHealthyPercent: must be >= 1, got 0",
        );
        spec.failover = Some(Failover {
            min_healthy_percent: Some(101),
        });
        assert_single_error(
            &spec,
            "spec.failover.minHealthyPercent: must be <= 100, got 101",
        );
        spec.failover = Some(Failover {
            min_healthy_percent: None,
        });
        assert_eq!(valid(&spec).min_healthy_percent, 70);
    }

    #[test]
    fn durations_must_parse_and_be_positive() {
        let mut spec = minimal();
        spec.timeout = Some("15".to_owned());
        let errs = errors(&spec);
        assert_eq!(errs.len(), 1);
        assert!(
            errs[0].starts_with("spec.timeout: invalid duration \"15\""),
            "{errs:?}"
        );
        spec.timeout = Some("1m 30s".to_owned());
        assert_eq!(valid(&spec).timeouts.map(|t| t.request_ms), Some(90_000));
        spec.timeout = Some("500us".to_owned());
        assert_eq!(valid(&spec).timeouts.map(|t| t.request_ms), Some(1));
    }

    #[test]
    fn every_duration_field_is_checked() {
        let mut spec = minimal();
        spec.health_check = Some(HealthCheck {
            interval: Some("0ms".to_owned()),
            timeout: Some("soon".to_owned()),
            ..HealthCheck::default()
        });
        spec.outlier_detection = Some(OutlierDetection {
            base_ejection_time: Some("0s".to_owned()),
            ..OutlierDetection::default()
        });
        spec.retry = Some(Retry {
            per_try_timeout: Some("-1s".to_owned()),
            ..Retry::default()
        });
        spec.cache = Some(Cache {
            stale_while_revalidate: Some("0s".to_owned()),
            stale_if_error: Some("x".to_owned()),
            ..Cache::default()
        });
        let fields: Vec<String> = errors(&spec)
            .iter()
            .map(|e| e.split(':').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            fields,
            [
                "spec.retry.perTryTimeout",
                "spec.healthCheck.interval",
                "spec.healthCheck.timeout",
                "spec.outlierDetection.baseEjectionTime",
                "spec.cache.staleWhileRevalidate",
                "spec.cache.staleIfError",
            ]
        );
    }

    #[test]
    fn health_check_thresholds_are_at_least_one_and_paths_start_with_a_slash() {
        let mut spec = minimal();
        spec.health_check = Some(HealthCheck {
            path: Some("healthz".to_owned()),
            healthy_threshold: Some(0),
            unhealthy_threshold: Some(-1),
            ..HealthCheck::default()
        });
        assert_eq!(
            errors(&spec),
            [
                "spec.healthCheck.path: path \"healthz\" must start with '/'",
                "spec.healthCheck.healthyThreshold: must be >= 1, got 0",
                "spec.healthCheck.unhealthyThreshold: must be >= 1, got -1",
            ]
        );
    }

    #[test]
    fn a_grpc_health_check_maps_to_grpc_service_and_excludes_a_path() {
        let mut spec = minimal();
        spec.health_check = Some(HealthCheck {
            grpc: Some(GrpcHealthCheck {
                service: "shop.v1.Shop".to_owned(),
            }),
            ..HealthCheck::default()
        });
        let check = valid(&spec).health_check.expect("set");
        assert_eq!(check.grpc_service.as_deref(), Some("shop.v1.Shop"));
        assert_eq!(check.path, "");
        spec.health_check = Some(HealthCheck {
            path: Some("/healthz".to_owned()),
            grpc: Some(GrpcHealthCheck::default()),
            ..HealthCheck::default()
        });
        assert_single_error(
            &spec,
            "spec.healthCheck: set either path (HTTP check) or grpc (gRPC health check), not both",
        );
    }

    #[test]
    fn outlier_detection_bounds_are_checked() {
        let mut spec = minimal();
        spec.outlier_detection = Some(OutlierDetection {
            consecutive_errors: Some(0),
            max_ejection_percent: Some(101),
            base_ejection_time: None,
        });
        assert_eq!(
            errors(&spec),
            [
                "spec.outlierDetection.consecutiveErrors: must be >= 1, got 0",
                "spec.outlierDetection.maxEjectionPercent: must be <= 100, got 101",
            ]
        );
    }

    #[test]
    fn retry_bounds_and_conditions_are_checked() {
        let mut spec = minimal();
        spec.retry = Some(Retry {
            attempts: Some(11),
            budget_percent: Some(-1),
            on: vec![
                "503".into(),
                "5xx".into(),
                "unavailable".into(),
                "404".into(),
                "always".into(),
            ],
            per_try_timeout: None,
        });
        let errs = errors(&spec);
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert_eq!(errs[0], "spec.retry.attempts: must be <= 10, got 11");
        assert_eq!(errs[1], "spec.retry.budgetPercent: must be >= 0, got -1");
        assert!(errs[2].starts_with("spec.retry.on[3]: unknown retry condition \"404\""));
        assert!(errs[3].starts_with("spec.retry.on[4]: unknown retry condition \"always\""));
    }

    #[test]
    fn every_documented_retry_condition_is_accepted() {
        let mut spec = minimal();
        let mut on: Vec<String> = RETRY_CONDITIONS.iter().map(|s| (*s).to_owned()).collect();
        on.extend(["500".to_owned(), "599".to_owned()]);
        spec.retry = Some(Retry {
            on: on.clone(),
            ..Retry::default()
        });
        assert_eq!(valid(&spec).retry.map(|r| r.on), Some(on));
    }

    #[test]
    fn cache_sizes_are_kubernetes_quantities() {
        assert_eq!(parse_quantity("64Mi"), Ok(64 << 20));
        assert_eq!(parse_quantity("1Gi"), Ok(1 << 30));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1000"), Ok(1000));
        assert_eq!(parse_quantity("1.5Gi"), Ok(1_610_612_736));
        assert_eq!(parse_quantity("1k"), Ok(1000));
        assert_eq!(parse_quantity("1e3"), Ok(1000));
        assert_eq!(parse_quantity("0.5"), Ok(1));
        for bad in [
            "", "Mi", "-1Mi", "1.2.3", "10mb", "0", "500m", "1e40", "99999Ei",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn cache_eviction_defaults_to_tiny_lfu_and_must_be_known() {
        let mut spec = minimal();
        spec.cache = Some(Cache {
            enabled: true,
            max_size: Some("1Gi".to_owned()),
            ..Cache::default()
        });
        let cache = valid(&spec).cache.expect("set");
        assert_eq!(
            (cache.eviction.as_str(), cache.max_size_bytes),
            ("TinyLfu", 1 << 30)
        );
        spec.cache = Some(Cache {
            eviction: Some("Random".to_owned()),
            max_size: Some("lots".to_owned()),
            ..Cache::default()
        });
        let errs = errors(&spec);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("spec.cache.maxSize: invalid size \"lots\""));
        assert_eq!(
            errs[1],
            "spec.cache.eviction: unknown eviction policy \"Random\"; expected one of Lru, Lfu, \
             Fifo, TinyLfu"
        );
    }
}
