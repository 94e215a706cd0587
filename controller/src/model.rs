//! The `TrafficPolicy` custom resource (`weir.dev/v1alpha1`) and the Kubernetes objects the
//! controller reads.
//!
//! Services and EndpointSlices are the upstream `k8s-openapi` types, so local mode parses the
//! very YAML a cluster holds. `TrafficPolicy` is derived with kube's `CustomResource`, which
//! also prints the CRD. Field values are kept close to what the user wrote (durations and sizes
//! as strings, weights as signed integers) so that validation, not deserialisation, reports
//! what is wrong with a clear message naming the object.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

pub use k8s_openapi::api::core::v1::Service;
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The default `failover.minHealthyPercent`: Envoy's overprovisioning factor of 1.4, rounded.
pub const DEFAULT_MIN_HEALTHY_PERCENT: u32 = 70;

/// CRD schema patterns; `crate::validate` is the authority and these only let the API server
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
/// A retry condition of `crate::validate::RETRY_CONDITIONS` or a 5xx status code.
const RETRY_ON_PATTERN: &str = "^(connect-failure|reset|timeout|refused-stream|5xx|gateway-error|cancelled|deadline-exceeded|internal|resource-exhausted|unavailable|5[0-9][0-9])$";

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
    #[schemars(extend("enum" = ["RoundRobin", "WeightedRoundRobin", "LeastRequest", "PeakEwma", "RingHash", "Maglev", "Random"]))]
    pub algorithm: Option<String>,
    /// The consistent-hashing key for RingHash and Maglev.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
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
    #[schemars(extend("enum" = crate::validate::EVICTIONS))]
    pub eviction: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_while_revalidate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error: Option<String>,
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
