//! The `TrafficPolicy` custom resource (`weir.dev/v1alpha1`) and the Kubernetes objects the
//! controller reads.
//!
//! Services and EndpointSlices are the upstream `k8s-openapi` types, so local mode parses the
//! very YAML a cluster holds. `TrafficPolicy` is derived with kube's `CustomResource`, which
//! also prints the CRD. Field values are kept close to what the user wrote (durations and sizes
//! as strings, weights as signed integers) so that validation, not deserialisation, reports
//! what is wrong with a clear message naming the object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use weir_proto::v1 as pb;

pub use k8s_openapi::api::core::v1::Service;
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The default `failover.minHealthyPercent`: Envoy's overprovisioning factor of 1.4, rounded.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u32 = 70;

// ---------------------------------------------------------------------------------------
// The names a policy may use: validation checks against these tables and the CRD schema is
// derived from them, so a name is written once.

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
pub const EVICTIONS: [(&str, pb::Eviction); 4] = [
    ("Lru", pb::Eviction::Lru),
    ("Lfu", pb::Eviction::Lfu),
    ("Fifo", pb::Eviction::Fifo),
    ("TinyLfu", pb::Eviction::TinyLfu),
];

/// The eviction policy of a cache that names none.
pub const DEFAULT_EVICTION: pb::Eviction = pb::Eviction::TinyLfu;

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
/// the routing computation far from overflow.
pub const MAX_WEIGHT: i64 = 1_000_000;

/// Bounds of `loadBalancer.hashBalanceFactor` (percent of the mean load). At 100 or less the
/// bounds would leave no slack and almost every request would walk away from its key; above
/// 1000 the bound never binds in practice (HAProxy accepts the same kind of range).
pub const MIN_HASH_BALANCE_FACTOR: u32 = 101;
pub const MAX_HASH_BALANCE_FACTOR: u32 = 1000;

/// Bounds of `loadBalancer.slowStart.window`, in milliseconds. Under a second the ramp is
/// over before a cold cache or JIT has warmed at all; past ten minutes a returning endpoint
/// idles at a fraction of its share long after it could serve.
pub const MIN_SLOW_START_WINDOW_MS: u64 = 1_000;
pub const MAX_SLOW_START_WINDOW_MS: u64 = 600_000;
/// Bounds and default of `loadBalancer.slowStart.minWeightPercent`: the share of its weight a
/// warming endpoint starts with (0 would give it no traffic to warm on).
pub const MIN_SLOW_START_PERCENT: u32 = 1;
pub const MAX_SLOW_START_PERCENT: u32 = 100;
pub const DEFAULT_SLOW_START_PERCENT: u32 = 10;

/// The highest failover tier (`priority`).
pub const MAX_PRIORITY: i64 = 15;

/// The most retries a request may get.
pub const MAX_RETRY_ATTEMPTS: i64 = 10;

/// Bounds of `rateLimit.requestsPerSecond` and `rateLimit.burst`.
pub const MAX_RATE_LIMIT_RPS: i64 = 1_000_000;
pub const MAX_RATE_LIMIT_BURST: i64 = 10_000_000;
/// Default of `rules[].mirror.percent`: every request.
pub const DEFAULT_MIRROR_PERCENT: u32 = 100;

/// The algorithm names alone, for the CRD schema's `enum`.
pub const ALGORITHM_NAMES: [&str; ALGORITHMS.len()] = names(ALGORITHMS);

/// The eviction names alone, for the CRD schema's `enum`.
pub const EVICTION_NAMES: [&str; EVICTIONS.len()] = names(EVICTIONS);

/// The names of a name table, in its order (a `const fn`, so the schema attributes can use
/// the result).
const fn names<T: Copy, const N: usize>(table: [(&'static str, T); N]) -> [&'static str; N] {
    let mut names = [""; N];
    let mut i = 0;
    while i < N {
        names[i] = table[i].0;
        i += 1;
    }
    names
}

/// CRD schema patterns; validation is the authority and these only let the API server
/// refuse the same mistakes at `kubectl apply` time. A host name: RFC 1123 labels, any case,
/// no port, no wildcard.
const HOST_PATTERN: &str = r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$";
/// A Service name (RFC 1123 label).
const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// An RFC 9110 token: methods, header and cookie names.
const TOKEN_PATTERN: &str = r"^[-!#$%&'*+.^_`|~0-9A-Za-z]+$";
/// A header value without CR, LF, NUL or other control characters except tab.
const HEADER_VALUE_PATTERN: &str = r"^[^\x00-\x08\x0a-\x1f\x7f]*$";
/// An absolute path without spaces or control characters.
const PATH_PATTERN: &str = r"^/[^\x00-\x20\x7f]*$";
/// A retry condition of [`RETRY_CONDITIONS`] or a 5xx status code (a test keeps the two equal).
const RETRY_ON_PATTERN: &str = "^(connect-failure|reset|timeout|refused-stream|5xx|gateway-error|cancelled|deadline-exceeded|internal|resource-exhausted|unavailable|429|5[0-9][0-9])$";

/// Drops the `default` that `#[serde(default)]` puts in the schema of a field that must not be
/// empty: the API server refuses a CRD whose defaults fail their own schema.
fn no_default(schema: &mut schemars::Schema) {
    schema.remove("default");
}

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of an object's metadata; a missing namespace means `default`, as `kubectl
    /// apply` would assume.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or(""),
        )
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Routing for a set of hosts: weighted splits between Services, failover tiers, balancing,
/// health checking, retries, timeouts and caching. Shaped after Gateway API `HTTPRoute`.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    shortname = "tp",
    category = "weir",
    doc = "Routes requests for a set of hosts to Services of its namespace: weighted splits, failover tiers, balancing, health checks, retries, timeouts and caching.",
    status = "TrafficPolicyStatus",
    printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.hosts"}"#,
    printcolumn = r#"{"name":"Algorithm","type":"string","jsonPath":".spec.loadBalancer.algorithm"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Tier","type":"integer","jsonPath":".status.activeTier","description":"Lowest failover tier taking traffic"}"#,
    printcolumn = r#"{"name":"Healthy","type":"string","jsonPath":".status.endpoints","description":"Healthy/total endpoints over all backends"}"#,
    printcolumn = r#"{"name":"Synced","type":"integer","jsonPath":".status.agents.synced","description":"Agents that applied the latest routing"}"#,
    printcolumn = r#"{"name":"Agents","type":"integer","jsonPath":".status.agents.total","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// Host / `:authority` values served (case-insensitive, port ignored).
    #[schemars(
        length(min = 1),
        inner(length(max = 253), regex(pattern = HOST_PATTERN)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    /// First match wins; a rule without matches matches every request.
    #[serde(default)]
    #[schemars(length(min = 1), transform = no_default)]
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<Failover>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Overall request timeout, e.g. `15s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Local rate limiting (Envoy's local rate limit, nginx's `limit_req`): a token bucket per
/// policy in **each agent**, shared by the agent's workers, refilled at `requestsPerSecond`
/// and holding at most `burst` tokens. A request that finds the bucket empty is answered
/// `429 Too Many Requests` with `Retry-After` (seconds until a token is due) and
/// `x-weir-error: rate-limited`; a gRPC call gets `RESOURCE_EXHAUSTED`. Every request of the
/// policy counts, cache hits included, and it never reaches an origin. The limit is per
/// agent: N agents together admit up to N × the rate.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained rate. Valid: 1–1000000.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: i64,
    /// Requests admitted at once after a quiet spell (default: `requestsPerSecond`).
    /// Valid: 1–10000000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub burst: Option<i64>,
}

/// Load shedding per endpoint.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Requests in flight to one endpoint before the agent answers `503` with
    /// `x-weir-error: circuit-open` instead of queueing more (default 1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests_per_endpoint: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.algorithm) || !(self.algorithm in ['RingHash', 'Maglev']) || has(self.hashOn)",
    "message": "RingHash and Maglev need hashOn with one of header, cookie or path",
}]))]
pub struct LoadBalancer {
    /// RoundRobin | WeightedRoundRobin | LeastRequest | PeakEwma | RingHash | Maglev | Random.
    /// Kept as a string so an unknown name is a validation error naming the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ALGORITHM_NAMES))]
    pub algorithm: Option<String>,
    /// The consistent-hashing key for RingHash and Maglev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Load-aware weights: inside each Service, the controller shifts traffic away from
    /// endpoints that every agent together sees slower or failing (latency EWMA and error
    /// ratio from the agents' load reports), by at most 4x either way, damped so it settles
    /// rather than oscillates. Service weights, tiers and failover are unchanged. Off by
    /// default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_aware: Option<bool>,
    /// Bounded-load consistent hashing, in percent (HAProxy's hash-balance-factor): with
    /// RingHash or Maglev, no endpoint takes a new request while its requests in flight reach
    /// factor/100 × the mean per endpoint (weighted, counting the new request); the request
    /// goes to the next endpoint on the ring (Maglev: the key's next probe). Only requests
    /// that would overload an endpoint move, so keys stay put while load is even. 125 caps
    /// every endpoint at 1.25 × the mean. Valid: 101–1000; unset: plain consistent hashing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_balance_factor: Option<u32>,
    /// Slow start (Envoy's slow_start_config, HAProxy's slowstart): an endpoint that starts
    /// serving — added to the Service, ready again, back from an ejection or from failing
    /// active checks — ramps its weight linearly from `minWeightPercent` to its full weight
    /// over `window`, with every algorithm but RingHash and Maglev (whose keys would move as
    /// the weight ramps). Endpoints already serving when an agent starts do not ramp. Unset:
    /// full weight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<SlowStart>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SlowStart {
    /// How long the ramp lasts, as a duration such as `30s` or `2m`. Valid: 1s–10m.
    pub window: String,
    /// The percent of its weight a warming endpoint starts with. Valid: 1–100; default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_weight_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.header) ? 1 : 0) + (has(self.cookie) ? 1 : 0) + (has(self.path) && self.path ? 1 : 0) == 1",
    "message": "set exactly one of header, cookie or path",
}]))]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = TOKEN_PATTERN))]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = TOKEN_PATTERN))]
    pub cookie: Option<String>,
    /// Hash on the request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// Any one match selects the rule; empty matches every request.
    #[serde(default)]
    pub matches: Vec<Match>,
    #[schemars(length(min = 1))]
    pub backend_refs: Vec<BackendRef>,
    /// Copy a share of this rule's requests to a shadow Service (Gateway API's
    /// `RequestMirror`): the copy goes to one of its ready endpoints with the same method,
    /// path and headers plus `x-weir-mirror: 1`; its response is discarded, and a slow or
    /// failing shadow never delays or fails the real request (copies beyond 64 in flight per
    /// agent and route, or whose body the shadow does not take as fast as the real request
    /// sends it, are dropped and counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// The shadow Service, in the policy's namespace (`weight` and `priority` do not apply).
    pub backend_ref: MirrorRef,
    /// Share of the rule's requests copied (default 100). Valid: 1–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub percent: Option<i64>,
}

/// A Service port in the policy's namespace that receives copies.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorRef {
    #[schemars(length(max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// The Service port; may be omitted when the Service has exactly one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = TOKEN_PATTERN))]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// `PathPrefix` (default) or `Exact`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["PathPrefix", "Exact"]))]
    pub kind: Option<String>,
    #[schemars(regex(pattern = PATH_PATTERN))]
    pub value: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct HeaderMatch {
    #[schemars(regex(pattern = TOKEN_PATTERN))]
    pub name: String,
    #[schemars(regex(pattern = HEADER_VALUE_PATTERN))]
    pub value: String,
}

/// A Service port in the policy's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRef {
    #[schemars(length(max = 63), regex(pattern = DNS_LABEL_PATTERN))]
    pub name: String,
    /// The Service port; may be omitted when the Service has exactly one port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Share between the Services of a tier (default 1); 0 drains the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub weight: Option<i64>,
    /// Failover tier (default 0); higher tiers take traffic only when lower ones are not
    /// healthy enough.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 15))]
    pub priority: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failover {
    /// Tier 0 keeps all traffic while at least this share of it is healthy (default 70).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub min_healthy_percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.path) && has(self.grpc))",
    "message": "set either path (HTTP check) or grpc (gRPC health check), not both",
}]))]
pub struct HealthCheck {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = PATH_PATTERN))]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub healthy_threshold: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unhealthy_threshold: Option<i64>,
    /// Use the gRPC Health Checking Protocol instead of an HTTP GET.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcHealthCheck>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct GrpcHealthCheck {
    #[serde(default)]
    pub service: String,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_errors: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub attempts: Option<i64>,
    /// connect-failure, reset, timeout, a status code such as "503", or gRPC status names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(regex(pattern = RETRY_ON_PATTERN)))]
    pub on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    #[serde(default)]
    pub enabled: bool,
    /// A Kubernetes quantity such as `64Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<String>,
    /// Lru | Lfu | Fifo | TinyLfu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = EVICTION_NAMES))]
    pub eviction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<String>,
    /// A disk tier behind the memory tier (agents started with `--cache-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<CacheDisk>,
    /// Also use the shared Redis/Valkey tier (agents started with `--cache-redis`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// Peer fill: an agent that misses asks the agent of its zone that owns the object (by
    /// consistent hash) before the origin; the owner answers from its cache or fills it, so
    /// the origin sees about one fetch per object per zone (agents started with
    /// `--cache-peer-addr`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub peers: bool,
}

/// `spec.cache.disk`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CacheDisk {
    /// A Kubernetes quantity such as `1Gi`: the most the disk tier of this policy holds.
    pub max_size: String,
}

/// What the controller observed and decided for a policy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_tier: Option<u32>,
    #[serde(default)]
    pub backends: Vec<BackendStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<AgentsStatus>,
    /// Healthy and total endpoints over all backends, as `healthy/total` (e.g. `5/6`), for
    /// `kubectl get tp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct BackendStatus {
    pub name: String,
    pub tier: u32,
    pub ready: u32,
    pub healthy: u32,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct AgentsStatus {
    pub synced: u32,
    pub total: u32,
}

// ---------------------------------------------------------------------------------------
// NodeAgent: status only, written by the controller (see `k8s::nodeagent`).

/// weir's agent on one node, as the controller sees it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "NodeAgent",
    plural = "nodeagents",
    shortname = "na",
    category = "weir",
    status = "NodeAgentStatus",
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.connected"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".status.zone"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.appliedVersion","description":"Routing-table version in force on the agent"}"#,
    printcolumn = r#"{"name":"Last ACK","type":"date","jsonPath":".status.lastAckTime"}"#,
    printcolumn = r#"{"name":"Last NACK","type":"integer","jsonPath":".status.lastNack.version","description":"Last version the agent refused"}"#,
    printcolumn = r#"{"name":"Cache Hit","type":"number","jsonPath":".status.cacheHitRatio","description":"Share of cacheable requests served from the agent's cache"}"#,
    printcolumn = r#"{"name":"NACK Error","type":"string","jsonPath":".status.lastNack.error","priority":1}"#,
    printcolumn = r#"{"name":"Controller","type":"string","jsonPath":".status.controller","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct NodeAgentSpec {}

/// What the controller knows of one agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentStatus {
    /// Whether the agent has a stream open to a controller right now.
    #[serde(default)]
    pub connected: bool,
    /// The controller pod the agent's stream is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// The node's zone (`topology.kubernetes.io/zone`), as the agent reported it or the Node
    /// carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The agent's software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The routing-table version in force on the agent (its last ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<u64>,
    /// When the agent last acknowledged an update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_time: Option<Time>,
    /// The last update the agent refused; the previous table stayed in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<NodeAgentNack>,
    /// Cache hits ÷ cacheable requests over the agent's last load reports, from 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub cache_hit_ratio: Option<f64>,
    /// The generation of each TrafficPolicy (`namespace/name`) whose current spec is in the
    /// routing table the agent applied, as the writing controller knows it. Policies the
    /// agent does not run at their current generation are absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub applied_generations: BTreeMap<String, i64>,
}

/// An update the agent refused, with its reason.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentNack {
    /// The version that was refused.
    pub version: u64,
    /// The agent's error message.
    pub error: String,
    /// When the NACK arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_patterns_and_enums_follow_the_name_tables() {
        let conditions = format!("^({}|429|5[0-9][0-9])$", RETRY_CONDITIONS.join("|"));
        assert_eq!(RETRY_ON_PATTERN, conditions);
        assert_eq!(
            ALGORITHM_NAMES.to_vec(),
            ALGORITHMS.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
        assert!(EVICTIONS.iter().any(|(_, e)| *e == DEFAULT_EVICTION));
        assert_eq!(
            EVICTION_NAMES.to_vec(),
            EVICTIONS.iter().map(|(n, _)| *n).collect::<Vec<_>>()
        );
    }
}
