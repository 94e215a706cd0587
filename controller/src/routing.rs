//! The routing computation: from a snapshot of policies, Services and EndpointSlices to the
//! routes pushed to agents and the status of every policy. Pure: no I/O, no clock, and the
//! same input always gives the same output (maps are `BTreeMap`s, vectors are sorted), so the
//! server can diff routes with `==`.
//!
//! # Which spec a policy serves
//!
//! A spec is *acceptable* when it validates ([`crate::validate`]), every backendRef resolves
//! to a Service port in the policy's namespace, and none of its hosts is held by another
//! policy. An acceptable spec is served and becomes the policy's last good spec. Otherwise
//! the last good spec keeps serving (re-resolved against today's endpoints); without one, a
//! spec that validates and whose only fault is unresolved refs is still served (as Gateway API
//! does: the missing backend has no endpoints and its share goes to the other Services), and
//! anything else serves nothing.
//!
//! Hosts: a host in a policy's last good spec stays with that policy until the policy's new
//! spec is accepted without it; other hosts go to the first policy in snapshot order that
//! asks for them. Decisions are taken in rounds so that a host released by one policy's
//! accepted change can be taken by another policy in the same computation.
//!
//! # Weights
//!
//! For each rule, backends are grouped by tier `t`. With `w_s` the backendRef weight of
//! Service `s`, `ready_s`/`total_s` its ready/all endpoints, and `M = minHealthyPercent/100`:
//!
//! ```text
//! h_t    = Σ_{s∈t, w_s>0} w_s·ready_s/total_s  ÷  Σ_{s∈t, w_s>0} w_s      (0 if Σ w_s = 0 or total_s = 0)
//! load_t = min(1 − Σ_{u<t} load_u,  h_t / M)                              (tiers in ascending order)
//! load_t ← load_t / Σ_u load_u                                            (when 0 < Σ load < 1)
//! ```
//!
//! This is Envoy's priority-level arithmetic with an overprovisioning factor of `1/M`: tier 0
//! keeps everything while `h_0 ≥ M` and spills the missing share, in proportion, downwards.
//! Inside tier `t`, Service `s` gets `w_s / Σ w` over the Services of `t` that have a ready
//! endpoint, and each of its ready endpoints gets an equal part of that, so the split between
//! Services does not depend on how many pods each has. Not-ready endpoints and weight-0
//! Services get 0 but stay listed so the agent can show them.
//!
//! **Panic**: when every `h_t` is 0, all endpoints, ready or not, of the lowest tier that has
//! any endpoint (in a Service of weight > 0) get traffic by Service weight, then evenly.
//! Sending to endpoints that may be failing beats refusing every request.
//!
//! Integer weights (`Endpoint.weight`): with one tier loaded, endpoint `e` of Service `s`
//! gets `w_s · L / n_s` where `n_s` is the number of serving endpoints of `s` and `L` the lcm
//! of the `n_s`, so the ratios are exact. With several tiers loaded, tier `t`'s integers are
//! multiplied by `(S / S_t) · k_t`, where `S_t` is the tier's integer sum, `S` the lcm of the
//! `S_t`, and `k_t = max(1, round(1000 · load_t))`: per-mille precision between tiers, exact
//! within a tier. The result is divided by the gcd of all weights. If the sum then exceeds
//! [`MAX_WEIGHT_SUM`] (or the exact integers would overflow), weights are recomputed from the
//! real-valued shares as `max(1, ⌊share · (MAX_WEIGHT_SUM − n)⌋)` with `n` the number of
//! endpoints that get traffic: proportional, never turning a positive weight into 0, and
//! summing to at most `MAX_WEIGHT_SUM` (when there are fewer endpoints than that).

use crate::model::{
    BackendStatus, EndpointSlice, ObjectKey, SERVICE_NAME_LABEL, Service, TrafficPolicySpec,
};
use crate::validate::validate;
use k8s_openapi::api::core::v1::ServicePort;
use k8s_openapi::api::discovery::v1::Endpoint as SliceEndpoint;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use weir_proto::v1 as pb;

/// The largest sum of the endpoint weights of one rule, so that agents can use `u32`
/// arithmetic (and smooth weighted round robin stays short) without overflow.
pub const MAX_WEIGHT_SUM: u64 = 1_000_000;

/// The Service port `appProtocol` that selects HTTP/2 cleartext upstream.
pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

/// Tolerance when comparing a tier's capacity with the traffic still to place, so that float
/// rounding in `h_t / M` never spills a crumb of traffic to the next tier.
const EPSILON: f64 = 1e-9;

/// One TrafficPolicy as the sources saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyInput {
    /// The policy's `namespace/name`.
    pub key: ObjectKey,
    /// Where it came from, for messages: a file path in local mode, "kubernetes" otherwise.
    pub source: String,
    /// `metadata.generation`, echoed into the status as `observedGeneration`.
    pub generation: Option<i64>,
    /// Err: the document could not be read as a TrafficPolicy at all (message says why).
    pub spec: Result<TrafficPolicySpec, String>,
}

/// Everything the computation looks at.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Precedence order for host conflicts (creationTimestamp, then namespace/name): earlier
    /// wins. A key listed twice is only read the first time.
    pub policies: Vec<PolicyInput>,
    /// Services by their own key.
    pub services: BTreeMap<ObjectKey, Service>,
    /// EndpointSlices by the slice's own key (not the Service's).
    pub slices: BTreeMap<ObjectKey, EndpointSlice>,
}

/// The spec each policy last served while acceptable; carried from one computation to the
/// next so that a broken edit never takes routing down.
pub type LastGood = BTreeMap<ObjectKey, TrafficPolicySpec>;

/// The result of [`compute`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Computed {
    /// One route per programmed policy, sorted by name (`"namespace/name"`, as a string).
    pub routes: Vec<pb::Route>,
    /// One entry per input policy.
    pub policies: BTreeMap<ObjectKey, PolicyState>,
    /// To pass to the next [`compute`].
    pub last_good: LastGood,
}

/// Why a policy's current spec is, or is not, the one being served; the first that applies
/// in this order wins. Maps onto the `Accepted` / `ResolvedRefs` condition reasons.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Reason {
    /// The current spec is acceptable and served.
    #[default]
    Accepted,
    /// The document is not a TrafficPolicy (bad YAML, wrong field types, …).
    Unreadable,
    /// The spec fails validation.
    Invalid,
    /// Another policy holds one of its hosts.
    HostConflict,
    /// A backendRef names a Service or port that does not exist.
    UnresolvedRefs,
}

/// What the controller decided for one policy; the source of its status and of `/state`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyState {
    /// Where the policy came from (see [`PolicyInput::source`]).
    pub source: String,
    /// The generation this state was computed for.
    pub generation: Option<i64>,
    /// The current spec is acceptable and is the one being served.
    pub accepted: bool,
    /// Why (not) accepted, for condition reasons.
    pub reason: Reason,
    /// Every problem with the current spec, each starting with the field path.
    pub errors: Vec<String>,
    /// Services named by the current spec that do not exist or lack the port; sorted.
    pub unresolved_refs: Vec<String>,
    /// The previous acceptable spec is being served instead of the current one.
    pub serving_last_good: bool,
    /// Some route is pushed to agents for this policy.
    pub programmed: bool,
    /// The highest tier taking traffic in any rule of the served route.
    pub active_tier: Option<u32>,
    /// Some rule routes in panic mode (no healthy endpoint in any tier).
    pub panic: bool,
    /// One entry per distinct (Service, tier) of the served route, sorted by tier then name.
    pub backends: Vec<BackendStatus>,
}

/// Computes every route and policy state of `snapshot`; `last_good` is the previous call's
/// [`Computed::last_good`] (empty at start).
pub fn compute(snapshot: &Snapshot, last_good: &LastGood) -> Computed {
    let cluster = Cluster::new(snapshot);
    let mut seen = BTreeSet::new();
    let candidates: Vec<Candidate<'_>> = snapshot
        .policies
        .iter()
        .filter(|p| seen.insert(&p.key))
        .map(|p| Candidate::new(p, last_good.get(&p.key), &cluster))
        .collect();
    let (serve, conflicts): (Vec<Serve>, Vec<Vec<String>>) = {
        let decisions = decide(&candidates);
        let conflicts = (0..candidates.len())
            .map(|i| conflict_errors(&candidates, &decisions.claims, i))
            .collect();
        (decisions.serve, conflicts)
    };

    let mut computed = Computed::default();
    for ((candidate, serve), conflicts) in candidates.into_iter().zip(serve).zip(conflicts) {
        let key = &candidate.input.key;
        let finished = candidate.finish(serve, conflicts, &cluster);
        if let Some(route) = finished.route {
            computed.routes.push(route);
        }
        if let Some(spec) = finished.last_good {
            computed.last_good.insert(key.clone(), spec);
        }
        computed.policies.insert(key.clone(), finished.state);
    }
    computed.routes.sort_by(|a, b| a.name.cmp(&b.name));
    computed
}

/// Fills in every endpoint weight of `rule` and its `active_tier` and `panic`, from the
/// backends' weights, tiers and endpoint readiness (see the module documentation).
pub fn assign_weights(rule: &mut pb::Rule, min_healthy_percent: u32) {
    let plan = plan_tiers(&rule.backends, min_healthy_percent);
    let per_endpoint = endpoint_weights(&rule.backends, &plan);
    let mut active_tier = None;
    for (backend, &weight) in rule.backends.iter_mut().zip(&per_endpoint) {
        for endpoint in &mut backend.endpoints {
            endpoint.weight = if plan.panic || endpoint.ready {
                weight
            } else {
                0
            };
        }
        if weight > 0 && !backend.endpoints.is_empty() {
            active_tier = active_tier.max(Some(backend.tier));
        }
    }
    rule.active_tier = active_tier.unwrap_or(0);
    rule.panic = plan.panic;
}

// ---------------------------------------------------------------------------------------
// Resolution: Services and EndpointSlices to backend ports, protocols and endpoints.

/// The Kubernetes objects, indexed once per computation.
struct Cluster<'a> {
    services: &'a BTreeMap<ObjectKey, Service>,
    /// (namespace, Service name) → its slices, in slice-key order.
    slices: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

/// Why a backendRef does not resolve; displayed after the backendRef's field path.
enum Unresolved {
    NoService,
    NoTcpPort,
    NoSuchPort(u32, Vec<i32>),
    Ambiguous(Vec<i32>),
}

struct UnresolvedMessage<'a> {
    namespace: &'a str,
    service: &'a str,
    why: &'a Unresolved,
}

impl fmt::Display for UnresolvedMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ns, svc) = (self.namespace, self.service);
        let list = |ports: &[i32]| {
            ports
                .iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self.why {
            Unresolved::NoService => write!(f, ": Service {ns}/{svc} not found"),
            Unresolved::NoTcpPort => write!(f, ": Service {ns}/{svc} has no TCP port"),
            Unresolved::NoSuchPort(port, ports) => write!(
                f,
                ".port: Service {ns}/{svc} has no port {port} (it has {})",
                list(ports)
            ),
            Unresolved::Ambiguous(ports) => write!(
                f,
                ".port: Service {ns}/{svc} has several ports ({}); set port",
                list(ports)
            ),
        }
    }
}

impl<'a> Cluster<'a> {
    fn new(snapshot: &'a Snapshot) -> Self {
        let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for (key, slice) in &snapshot.slices {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
            if let Some(service) = service {
                slices
                    .entry((key.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        Self {
            services: &snapshot.services,
            slices,
        }
    }

    /// Resolves every backend of `route` in place. Unresolved backends keep no endpoints; for
    /// each, an error naming the field goes to `errors` and the Service to `unresolved`.
    fn resolve(
        &self,
        namespace: &str,
        route: &mut pb::Route,
        errors: &mut Vec<String>,
        unresolved: &mut BTreeSet<String>,
    ) {
        for (i, rule) in route.rules.iter_mut().enumerate() {
            for (j, backend) in rule.backends.iter_mut().enumerate() {
                if let Err(why) = self.resolve_backend(namespace, backend) {
                    errors.push(format!(
                        "spec.rules[{i}].backendRefs[{j}]{}",
                        UnresolvedMessage {
                            namespace,
                            service: &backend.service,
                            why: &why,
                        }
                    ));
                    unresolved.insert(backend.service.clone());
                }
            }
        }
    }

    fn resolve_backend(
        &self,
        namespace: &str,
        backend: &mut pb::Backend,
    ) -> Result<(), Unresolved> {
        let key = ObjectKey::new(namespace, backend.service.as_str());
        let service = self.services.get(&key).ok_or(Unresolved::NoService)?;
        // HTTP needs TCP; a UDP port that shares the number (DNS-style) is not a candidate.
        let tcp_ports = || {
            service
                .spec
                .iter()
                .flat_map(|spec| spec.ports.iter().flatten())
                .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        };
        let port = if backend.port == 0 {
            let mut ports = tcp_ports();
            match (ports.next(), ports.next()) {
                (None, _) => return Err(Unresolved::NoTcpPort),
                (Some(only), None) => only,
                (Some(_), Some(_)) => {
                    return Err(Unresolved::Ambiguous(tcp_ports().map(|p| p.port).collect()));
                }
            }
        } else {
            tcp_ports()
                .find(|p| u32::try_from(p.port).ok() == Some(backend.port))
                .ok_or_else(|| {
                    Unresolved::NoSuchPort(backend.port, tcp_ports().map(|p| p.port).collect())
                })?
        };
        backend.port = u32::try_from(port.port).unwrap_or(0);
        backend.protocol = if port.app_protocol.as_deref() == Some(H2C_APP_PROTOCOL) {
            pb::Protocol::H2c
        } else {
            pb::Protocol::Http1
        } as i32;
        backend.endpoints = self.endpoints(namespace, &backend.service, port);
        Ok(())
    }

    /// The endpoints of one Service port: de-duplicated by address (a ready copy wins, as a
    /// pod can briefly sit in two slices), sorted by address.
    fn endpoints(&self, namespace: &str, service: &str, port: &ServicePort) -> Vec<pb::Endpoint> {
        let Some(slices) = self.slices.get(&(namespace, service)) else {
            return Vec::new();
        };
        let mut endpoints = Vec::new();
        for slice in slices {
            // FQDN slices name hosts, not addresses the agent can dial.
            if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
                continue;
            }
            let Some(target_port) = slice_port(slice, port) else {
                continue;
            };
            for endpoint in &slice.endpoints {
                // Kubernetes: the addresses of one endpoint are fungible and consumers may use
                // only the first, as kube-proxy does; using all would count a pod twice.
                let Some(ip) = endpoint
                    .addresses
                    .first()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                endpoints.push(pb::Endpoint {
                    address: SocketAddr::new(ip, target_port).to_string(),
                    ready: is_ready(endpoint),
                    zone: endpoint.zone.clone().unwrap_or_default(),
                    weight: 0,
                });
            }
        }
        // Stable sort: among copies of one address, slice-key order decides unless one is ready.
        endpoints.sort_by(|a, b| a.address.cmp(&b.address));
        endpoints.dedup_by(|later, kept| {
            if later.address != kept.address {
                return false;
            }
            if later.ready && !kept.ready {
                kept.ready = true;
                kept.zone = std::mem::take(&mut later.zone);
            }
            true
        });
        endpoints
    }
}

/// The port endpoints of `slice` listen on for the Service port `port`: the slice port of the
/// same name, else an integer `targetPort`, else the Service port itself.
fn slice_port(slice: &EndpointSlice, port: &ServicePort) -> Option<u16> {
    let name = port.name.as_deref().unwrap_or("");
    let number = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().unwrap_or("") == name)
        .and_then(|p| p.port)
        .or(match &port.target_port {
            Some(IntOrString::Int(target)) => Some(*target),
            _ => None,
        })
        .unwrap_or(port.port);
    u16::try_from(number).ok().filter(|p| *p != 0)
}

/// EndpointSlice readiness as Kubernetes defines it: a missing `ready` means ready, and a
/// terminating endpoint takes no new requests even while it still serves old ones.
fn is_ready(endpoint: &SliceEndpoint) -> bool {
    endpoint.conditions.as_ref().is_none_or(|c| {
        c.ready != Some(false) && c.serving != Some(false) && c.terminating != Some(true)
    })
}

// ---------------------------------------------------------------------------------------
// Deciding which spec each policy serves, and who holds which host.

/// The current spec of a policy, read as far as it goes.
enum Current {
    Unreadable(String),
    Invalid(Vec<String>),
    /// Validated and resolved; `errors` are resolution errors only.
    Valid {
        route: pb::Route,
        errors: Vec<String>,
        unresolved: BTreeSet<String>,
    },
}

/// The last good spec of a policy, when it still validates.
enum LastGoodRoute<'a> {
    None,
    /// Identical to the current spec: serve the current route if it comes to that.
    SameAsCurrent(&'a TrafficPolicySpec),
    /// A different spec, validated but not yet resolved (only needed when it is served).
    Other(&'a TrafficPolicySpec, pb::Route),
}

struct Candidate<'a> {
    input: &'a PolicyInput,
    current: Current,
    last_good: LastGoodRoute<'a>,
}

/// What a policy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serve {
    Current,
    LastGood,
    Nothing,
}

/// Every policy's [`Serve`] (by candidate index) and the final owner of each served host.
struct Decisions<'a> {
    serve: Vec<Serve>,
    claims: BTreeMap<&'a str, usize>,
}

/// What [`Candidate::finish`] hands back to [`compute`].
struct Finished {
    route: Option<pb::Route>,
    last_good: Option<TrafficPolicySpec>,
    state: PolicyState,
}

impl<'a> Candidate<'a> {
    fn new(
        input: &'a PolicyInput,
        last_good: Option<&'a TrafficPolicySpec>,
        cluster: &Cluster<'_>,
    ) -> Self {
        let current = match &input.spec {
            Err(message) => Current::Unreadable(message.clone()),
            Ok(spec) => match validate(spec) {
                Err(errors) => Current::Invalid(errors),
                Ok(mut route) => {
                    let mut errors = Vec::new();
                    let mut unresolved = BTreeSet::new();
                    cluster.resolve(
                        &input.key.namespace,
                        &mut route,
                        &mut errors,
                        &mut unresolved,
                    );
                    Current::Valid {
                        route,
                        errors,
                        unresolved,
                    }
                }
            },
        };
        let last_good = match last_good {
            None => LastGoodRoute::None,
            Some(spec)
                if matches!(current, Current::Valid { .. })
                    && input.spec.as_ref().is_ok_and(|s| s == spec) =>
            {
                LastGoodRoute::SameAsCurrent(spec)
            }
            // A last good spec that no longer validates (stricter rules after an upgrade)
            // cannot be served; the policy is then treated as new.
            Some(spec) => validate(spec)
                .map_or(LastGoodRoute::None, |route| LastGoodRoute::Other(spec, route)),
        };
        Self {
            input,
            current,
            last_good,
        }
    }

    fn current_route(&self) -> Option<&pb::Route> {
        match &self.current {
            Current::Valid { route, .. } => Some(route),
            _ => None,
        }
    }

    fn last_good_hosts(&self) -> Option<&[String]> {
        match &self.last_good {
            LastGoodRoute::None => None,
            LastGoodRoute::SameAsCurrent(_) => self.current_route().map(|r| r.hosts.as_slice()),
            LastGoodRoute::Other(_, route) => Some(&route.hosts),
        }
    }

    /// The hosts the current spec would serve, if it may be served at all: a policy with a
    /// last good spec only moves to a fully resolved spec; a new one also to a spec whose
    /// only fault is unresolved refs.
    fn servable_current_hosts(&self) -> Option<&[String]> {
        match &self.current {
            Current::Valid { route, errors, .. }
                if errors.is_empty() || matches!(self.last_good, LastGoodRoute::None) =>
            {
                Some(&route.hosts)
            }
            _ => None,
        }
    }

    /// Builds the served route, the state and the next last good spec.
    fn finish(self, serve: Serve, conflicts: Vec<String>, cluster: &Cluster<'_>) -> Finished {
        let Candidate {
            input,
            current,
            last_good,
        } = self;
        let last_good_spec = match &last_good {
            LastGoodRoute::None => None,
            LastGoodRoute::SameAsCurrent(spec) | LastGoodRoute::Other(spec, _) => Some(*spec),
        };
        let mut state = PolicyState {
            source: input.source.clone(),
            generation: input.generation,
            serving_last_good: serve == Serve::LastGood,
            programmed: serve != Serve::Nothing,
            ..PolicyState::default()
        };
        let mut current_route = None;
        match current {
            Current::Unreadable(message) => {
                state.reason = Reason::Unreadable;
                state.errors.push(message);
            }
            Current::Invalid(errors) => {
                state.reason = Reason::Invalid;
                state.errors = errors;
            }
            Current::Valid {
                route,
                errors,
                unresolved,
            } => {
                state.reason = if !conflicts.is_empty() {
                    Reason::HostConflict
                } else if !errors.is_empty() {
                    Reason::UnresolvedRefs
                } else {
                    Reason::Accepted
                };
                state.accepted = serve == Serve::Current && state.reason == Reason::Accepted;
                state.errors = conflicts;
                state.errors.extend(errors);
                state.unresolved_refs = unresolved.into_iter().collect();
                current_route = Some(route);
            }
        }

        let route = match (serve, last_good) {
            (Serve::Current, _) | (Serve::LastGood, LastGoodRoute::SameAsCurrent(_)) => {
                current_route
            }
            (Serve::LastGood, LastGoodRoute::Other(_, mut route)) => {
                // Its errors were reported when it was current; today only the endpoints matter.
                let (mut ignored_errors, mut ignored_refs) = (Vec::new(), BTreeSet::new());
                cluster.resolve(
                    &input.key.namespace,
                    &mut route,
                    &mut ignored_errors,
                    &mut ignored_refs,
                );
                Some(route)
            }
            _ => None,
        };
        let route = route.map(|mut route| {
            route.name = input.key.to_string();
            for rule in &mut route.rules {
                assign_weights(rule, route.min_healthy_percent);
            }
            state.active_tier = route.rules.iter().map(|r| r.active_tier).max();
            state.panic = route.rules.iter().any(|r| r.panic);
            state.backends = backend_statuses(&route);
            route
        });

        let last_good = if state.accepted {
            input.spec.as_ref().ok()
        } else {
            last_good_spec
        };
        Finished {
            route,
            last_good: last_good.cloned(),
            state,
        }
    }
}

/// Decides what every candidate serves. A host is *held* by the policy whose last good spec
/// has it and *claimed* by the policy that serves it. In each round, in snapshot order, every
/// undecided policy whose servable current spec only asks for hosts that are free (or held
/// by itself) is decided to serve it; hosts its last good spec had and its new spec dropped
/// are released at the end of the round, for the next one. When a round decides nothing,
/// the remaining policies serve their last good spec, or nothing. Each round decides at
/// least one policy or is the last, so there are at most `n + 1` rounds.
fn decide<'a>(candidates: &'a [Candidate<'a>]) -> Decisions<'a> {
    let mut held: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, candidate) in candidates.iter().enumerate() {
        for host in candidate.last_good_hosts().unwrap_or_default() {
            held.entry(host.as_str()).or_insert(i);
        }
    }
    let mut claims: BTreeMap<&str, usize> = BTreeMap::new();
    let mut decided: Vec<Option<Serve>> = vec![None; candidates.len()];
    let mut released = Vec::new();
    loop {
        for (i, candidate) in candidates.iter().enumerate() {
            if decided[i].is_some() {
                continue;
            }
            let Some(hosts) = candidate.servable_current_hosts() else {
                continue;
            };
            let free = hosts.iter().all(|h| {
                held.get(h.as_str()).is_none_or(|&owner| owner == i)
                    && !claims.contains_key(h.as_str())
            });
            if free {
                for host in hosts {
                    claims.insert(host, i);
                }
                decided[i] = Some(Serve::Current);
                released.push(i);
            }
        }
        if released.is_empty() {
            break;
        }
        for i in released.drain(..) {
            for host in candidates[i].last_good_hosts().unwrap_or_default() {
                if held.get(host.as_str()) == Some(&i) {
                    held.remove(host.as_str());
                }
            }
        }
    }
    let serve = decided
        .iter()
        .zip(candidates)
        .enumerate()
        .map(|(i, (decision, candidate))| {
            if let Some(decision) = decision {
                return *decision;
            }
            match candidate.last_good_hosts() {
                // Only a last good spec whose hosts all still belong to this policy can be
                // served; anything else would route one host two ways.
                Some(hosts)
                    if hosts.iter().all(|h| {
                        held.get(h.as_str()) == Some(&i) && !claims.contains_key(h.as_str())
                    }) =>
                {
                    for host in hosts {
                        claims.insert(host, i);
                    }
                    Serve::LastGood
                }
                _ => Serve::Nothing,
            }
        })
        .collect();
    Decisions { serve, claims }
}

/// One error per host of candidate `i`'s current spec that another policy serves.
fn conflict_errors(
    candidates: &[Candidate<'_>],
    claims: &BTreeMap<&str, usize>,
    i: usize,
) -> Vec<String> {
    let Some(route) = candidates[i].current_route() else {
        return Vec::new();
    };
    route
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(k, host)| {
            let owner = *claims.get(host.as_str())?;
            (owner != i).then(|| {
                format!(
                    "spec.hosts[{k}]: host {host:?} is already served by TrafficPolicy {}",
                    candidates[owner].input.key
                )
            })
        })
        .collect()
}

/// One status entry per distinct (Service, tier); the first backendRef of a pair decides its
/// counts (health checks by the agent come later).
fn backend_statuses(route: &pb::Route) -> Vec<BackendStatus> {
    let mut by_key: BTreeMap<(u32, &str), u32> = BTreeMap::new();
    for backend in route.rules.iter().flat_map(|r| &r.backends) {
        by_key
            .entry((backend.tier, backend.service.as_str()))
            .or_insert_with(|| {
                let ready = backend.endpoints.iter().filter(|e| e.ready).count();
                u32::try_from(ready).unwrap_or(u32::MAX)
            });
    }
    by_key
        .into_iter()
        .map(|((tier, name), ready)| BackendStatus {
            name: name.to_owned(),
            tier,
            ready,
            healthy: ready,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Weights.

/// How one rule's traffic divides between its failover tiers.
#[derive(Clone, Debug, PartialEq)]
struct TierPlan {
    /// The tiers that take traffic, ascending, each with its share; shares sum to 1.
    loads: Vec<(u32, f64)>,
    /// No tier is healthy: `loads` is the one tier whose endpoints all take traffic.
    panic: bool,
}

fn ready_count(backend: &pb::Backend) -> usize {
    backend.endpoints.iter().filter(|e| e.ready).count()
}

fn plan_tiers(backends: &[pb::Backend], min_healthy_percent: u32) -> TierPlan {
    // tier → (Σ w, Σ w·ready/total)
    let mut tiers: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for backend in backends.iter().filter(|b| b.weight > 0) {
        let weight = f64::from(backend.weight);
        let total = backend.endpoints.len();
        let healthy = if total == 0 {
            0.0
        } else {
            weight * ready_count(backend) as f64 / total as f64
        };
        let tier = tiers.entry(backend.tier).or_default();
        tier.0 += weight;
        tier.1 += healthy;
    }
    let min_healthy = f64::from(min_healthy_percent.clamp(1, 100)) / 100.0;
    let mut loads = Vec::new();
    let mut remaining = 1.0_f64;
    for (&tier, &(weight, healthy)) in &tiers {
        if remaining <= 0.0 {
            break;
        }
        if healthy <= 0.0 {
            continue;
        }
        let capacity = healthy / weight / min_healthy;
        let load = if capacity >= remaining - EPSILON {
            remaining
        } else {
            capacity
        };
        loads.push((tier, load));
        remaining = if load == remaining {
            0.0
        } else {
            remaining - load
        };
    }
    if loads.is_empty() {
        let panic_tier = backends
            .iter()
            .filter(|b| b.weight > 0 && !b.endpoints.is_empty())
            .map(|b| b.tier)
            .min();
        return TierPlan {
            loads: panic_tier.map(|t| (t, 1.0)).into_iter().collect(),
            panic: panic_tier.is_some(),
        };
    }
    let sum: f64 = loads.iter().map(|(_, load)| load).sum();
    for (_, load) in &mut loads {
        *load /= sum;
    }
    TierPlan {
        loads,
        panic: false,
    }
}

/// The weight of each serving endpoint, per backend (0: the backend serves nothing).
fn endpoint_weights(backends: &[pb::Backend], plan: &TierPlan) -> Vec<u32> {
    // How many endpoints of each backend share its traffic.
    let counts: Vec<u64> = backends
        .iter()
        .map(|b| {
            let serving = match b.weight {
                0 => 0,
                _ if plan.panic => b.endpoints.len(),
                _ => ready_count(b),
            };
            u64::try_from(serving).unwrap_or(u64::MAX)
        })
        .collect();
    let in_plan = |b: &pb::Backend| plan.loads.iter().any(|(t, _)| *t == b.tier);

    let shares: Vec<f64> = match exact_weights(backends, &counts, plan) {
        Some(mut values) => {
            reduce_by_gcd(&mut values);
            let sum = values
                .iter()
                .zip(&counts)
                .try_fold(0u128, |acc, (v, c)| acc.checked_add(v.checked_mul(u128::from(*c))?));
            if sum.is_some_and(|s| s <= u128::from(MAX_WEIGHT_SUM)) {
                return values
                    .into_iter()
                    .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
                    .collect();
            }
            let total: f64 = values
                .iter()
                .zip(&counts)
                .map(|(v, c)| *v as f64 * *c as f64)
                .sum();
            values.iter().map(|v| *v as f64 / total).collect()
        }
        None => backends
            .iter()
            .zip(&counts)
            .map(|(b, &count)| {
                if count == 0 || !in_plan(b) {
                    return 0.0;
                }
                let load = plan
                    .loads
                    .iter()
                    .find(|(t, _)| *t == b.tier)
                    .map_or(0.0, |(_, l)| *l);
                let tier_weight: f64 = backends
                    .iter()
                    .zip(&counts)
                    .filter(|(o, c)| o.tier == b.tier && **c > 0)
                    .map(|(o, _)| f64::from(o.weight))
                    .sum();
                load * f64::from(b.weight) / tier_weight / count as f64
            })
            .collect(),
    };

    let serving: u64 = shares
        .iter()
        .zip(&counts)
        .filter(|(s, _)| **s > 0.0)
        .map(|(_, c)| *c)
        .sum();
    let budget = MAX_WEIGHT_SUM.saturating_sub(serving) as f64;
    let mut values: Vec<u128> = shares
        .iter()
        .map(|&share| {
            if share > 0.0 && share.is_finite() {
                ((share * budget).floor() as u128).max(1)
            } else {
                0
            }
        })
        .collect();
    reduce_by_gcd(&mut values);
    values
        .into_iter()
        .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        .collect()
}

/// Exact integer weights per serving endpoint of each backend (see the module documentation),
/// or `None` when they would overflow.
fn exact_weights(backends: &[pb::Backend], counts: &[u64], plan: &TierPlan) -> Option<Vec<u128>> {
    let mut values = vec![0u128; backends.len()];
    let mut tier_sums = Vec::with_capacity(plan.loads.len());
    for &(tier, _) in &plan.loads {
        let serving = || {
            backends
                .iter()
                .zip(counts)
                .enumerate()
                .filter(move |(_, (b, c))| b.tier == tier && **c > 0)
                .map(|(i, (b, c))| (i, u128::from(b.weight), u128::from(*c)))
        };
        let lcm_count = serving().try_fold(1u128, |acc, (_, _, c)| lcm(acc, c))?;
        let mut sum = 0u128;
        for (i, weight, count) in serving() {
            values[i] = weight.checked_mul(lcm_count / count)?;
            sum = sum.checked_add(values[i].checked_mul(count)?)?;
        }
        if sum == 0 {
            return None;
        }
        tier_sums.push(sum);
    }
    if plan.loads.len() > 1 {
        let common = tier_sums.iter().try_fold(1u128, |acc, &s| lcm(acc, s))?;
        for (&(tier, load), &sum) in plan.loads.iter().zip(&tier_sums) {
            let per_mille = ((load * 1000.0).round() as u128).max(1);
            let factor = (common / sum).checked_mul(per_mille)?;
            for (backend, value) in backends.iter().zip(values.iter_mut()) {
                if backend.tier == tier {
                    *value = value.checked_mul(factor)?;
                }
            }
        }
    }
    Some(values)
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn lcm(a: u128, b: u128) -> Option<u128> {
    if a == 0 || b == 0 {
        return Some(0);
    }
    (a / gcd(a, b)).checked_mul(b)
}

fn reduce_by_gcd(values: &mut [u128]) {
    let divisor = values.iter().fold(0, |acc, &v| gcd(acc, v));
    if divisor > 1 {
        for value in values {
            *value /= divisor;
        }
    }
}
