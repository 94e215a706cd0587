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
//! Endpoint weights, failover spill and panic follow [`weir_proto::weights`] (shared with
//! the agent, which recomputes them when its own health checks change an endpoint's state).

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
use weir_proto::weights::assign_weights;

/// The Service port `appProtocol` that selects HTTP/2 cleartext upstream.
pub const H2C_APP_PROTOCOL: &str = "kubernetes.io/h2c";

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
// Nearly every policy is `Valid`; boxing its route would only add an allocation.
#[allow(clippy::large_enum_variant)]
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
    Other(&'a TrafficPolicySpec, Box<pb::Route>),
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
            Some(spec) => validate(spec).map_or(LastGoodRoute::None, |route| {
                LastGoodRoute::Other(spec, Box::new(route))
            }),
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
                Some(*route)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendRef, Failover, Rule};
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use proptest::prelude::*;
    use weir_proto::weights::{MAX_WEIGHT_SUM, TierPlan, plan_tiers};

    const NS: &str = "default";

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(NS, name)
    }

    fn service_port(name: Option<&str>, port: i32, target: Option<i32>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_owned),
            port,
            target_port: target.map(IntOrString::Int),
            ..ServicePort::default()
        }
    }

    fn service(name: &str, ports: Vec<ServicePort>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(NS.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(ports),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn endpoint(address: &str, ready: Option<bool>) -> SliceEndpoint {
        SliceEndpoint {
            addresses: vec![address.to_owned()],
            conditions: Some(EndpointConditions {
                ready,
                ..EndpointConditions::default()
            }),
            zone: Some("z1".to_owned()),
            ..SliceEndpoint::default()
        }
    }

    fn slice(
        service: &str,
        address_type: &str,
        ports: &[(Option<&str>, i32)],
        endpoints: Vec<SliceEndpoint>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                labels: Some(
                    [(SERVICE_NAME_LABEL.to_owned(), service.to_owned())]
                        .into_iter()
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            address_type: address_type.to_owned(),
            endpoints,
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: name.map(str::to_owned),
                        port: Some(*port),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    fn spec(hosts: &[&str], backends: &[(&str, i64, i64)]) -> TrafficPolicySpec {
        TrafficPolicySpec {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            rules: vec![Rule {
                matches: vec![],
                backend_refs: backends
                    .iter()
                    .map(|(name, weight, priority)| BackendRef {
                        name: (*name).to_owned(),
                        port: Some(80),
                        weight: Some(*weight),
                        priority: Some(*priority),
                    })
                    .collect(),
            }],
            ..TrafficPolicySpec::default()
        }
    }

    /// A small cluster in namespace `default`: Services with one port `http` 80 → 8080.
    #[derive(Default)]
    struct World {
        snapshot: Snapshot,
        subnets: u32,
    }

    impl World {
        fn service(&mut self, name: &str) -> &mut Self {
            let port = service_port(Some("http"), 80, Some(8080));
            self.snapshot
                .services
                .insert(key(name), service(name, vec![port]));
            self
        }

        /// Adds a slice with `ready` ready and `not_ready` not-ready pods to Service `name`.
        fn pods(&mut self, name: &str, ready: usize, not_ready: usize) -> &mut Self {
            self.subnets += 1;
            let subnet = self.subnets;
            let endpoints = (0..ready + not_ready)
                .map(|i| endpoint(&format!("10.0.{subnet}.{}", i + 1), Some(i < ready)))
                .collect();
            self.snapshot.slices.insert(
                key(&format!("{name}-{subnet}")),
                slice(name, "IPv4", &[(Some("http"), 8080)], endpoints),
            );
            self
        }

        /// Replaces every slice of Service `name` by one with the given pods.
        fn repods(&mut self, name: &str, ready: usize, not_ready: usize) -> &mut Self {
            self.snapshot.slices.retain(|_, s| {
                s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .is_none_or(|svc| svc != name)
            });
            self.pods(name, ready, not_ready)
        }

        fn policy(&mut self, name: &str, spec: TrafficPolicySpec) -> &mut Self {
            self.input(name, Ok(spec))
        }

        fn input(&mut self, name: &str, spec: Result<TrafficPolicySpec, String>) -> &mut Self {
            self.snapshot.policies.retain(|p| p.key != key(name));
            self.snapshot.policies.push(PolicyInput {
                key: key(name),
                source: format!("{name}.yaml"),
                generation: Some(1),
                spec,
            });
            self
        }

        fn compute(&self, last_good: &LastGood) -> Computed {
            compute(&self.snapshot, last_good)
        }
    }

    fn route<'c>(computed: &'c Computed, policy: &str) -> &'c pb::Route {
        let name = key(policy).to_string();
        computed
            .routes
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no route {name} in {:?}", computed.routes))
    }

    fn state<'c>(computed: &'c Computed, policy: &str) -> &'c PolicyState {
        &computed.policies[&key(policy)]
    }

    /// Rule 0's endpoint weights, per backend.
    fn weights(computed: &Computed, policy: &str) -> Vec<(String, Vec<u32>)> {
        route(computed, policy).rules[0]
            .backends
            .iter()
            .map(|b| {
                (
                    b.service.clone(),
                    b.endpoints.iter().map(|e| e.weight).collect(),
                )
            })
            .collect()
    }

    fn backend_share(rule: &pb::Rule, service: &str) -> f64 {
        let sum = |pick: &dyn Fn(&pb::Backend) -> bool| -> u64 {
            rule.backends
                .iter()
                .filter(|b| pick(b))
                .flat_map(|b| &b.endpoints)
                .map(|e| u64::from(e.weight))
                .sum()
        };
        sum(&|b| b.service == service) as f64 / sum(&|_| true) as f64
    }

    fn owned(pairs: &[(&str, &[u32])]) -> Vec<(String, Vec<u32>)> {
        pairs
            .iter()
            .map(|(s, w)| ((*s).to_owned(), w.to_vec()))
            .collect()
    }

    // --- weights ------------------------------------------------------------------------

    #[test]
    fn a_3_to_1_split_over_2_plus_2_endpoints_gives_weights_3_3_1_1() {
        let mut world = World::default();
        world
            .service("v1")
            .pods("v1", 2, 0)
            .service("v2")
            .pods("v2", 2, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 3, 0), ("v2", 1, 0)]));
        let computed = world.compute(&LastGood::new());
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("v1", &[3, 3]), ("v2", &[1, 1])])
        );
        let shop = state(&computed, "shop");
        assert!(shop.accepted && shop.programmed && !shop.panic);
        assert_eq!(shop.active_tier, Some(0));
    }

    #[test]
    fn scaling_v2_from_1_to_5_pods_keeps_the_90_10_split_between_services() {
        let mut world = World::default();
        world
            .service("v1")
            .pods("v1", 3, 0)
            .service("v2")
            .pods("v2", 1, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 90, 0), ("v2", 10, 0)]));
        let before = world.compute(&LastGood::new());
        assert_eq!(
            weights(&before, "shop"),
            owned(&[("v1", &[3, 3, 3]), ("v2", &[1])])
        );
        world.repods("v2", 5, 0);
        let after = world.compute(&before.last_good);
        assert_eq!(
            weights(&after, "shop"),
            owned(&[("v1", &[15, 15, 15]), ("v2", &[1, 1, 1, 1, 1])])
        );
        for computed in [&before, &after] {
            let share = backend_share(&route(computed, "shop").rules[0], "v2");
            assert!((share - 0.1).abs() < 1e-12, "{share}");
        }
    }

    #[test]
    fn a_service_without_ready_endpoints_gives_its_share_to_the_others_of_its_tier() {
        let mut world = World::default();
        world
            .service("v1")
            .pods("v1", 3, 0)
            .service("v2")
            .pods("v2", 0, 2);
        world.policy("shop", spec(&["shop"], &[("v1", 90, 0), ("v2", 10, 0)]));
        let computed = world.compute(&LastGood::new());
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("v1", &[1, 1, 1]), ("v2", &[0, 0])])
        );
    }

    #[test]
    fn failover_sends_everything_to_tier_1_while_tier_0_has_no_ready_endpoint_and_returns() {
        let mut world = World::default();
        world
            .service("primary")
            .pods("primary", 0, 2)
            .service("standby")
            .pods("standby", 2, 0);
        world.policy(
            "shop",
            spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
        );
        let down = world.compute(&LastGood::new());
        assert_eq!(
            weights(&down, "shop"),
            owned(&[("primary", &[0, 0]), ("standby", &[1, 1])])
        );
        assert_eq!(route(&down, "shop").rules[0].active_tier, 1);
        assert_eq!(state(&down, "shop").active_tier, Some(1));
        assert!(!state(&down, "shop").panic);

        world.repods("primary", 2, 0);
        let recovered = world.compute(&down.last_good);
        assert_eq!(
            weights(&recovered, "shop"),
            owned(&[("primary", &[1, 1]), ("standby", &[0, 0])])
        );
        assert_eq!(state(&recovered, "shop").active_tier, Some(0));
    }

    #[test]
    fn a_half_healthy_tier_0_spills_the_missing_share_to_tier_1_in_proportion() {
        let mut world = World::default();
        world
            .service("primary")
            .pods("primary", 1, 1)
            .service("standby")
            .pods("standby", 2, 0);
        world.policy(
            "shop",
            spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
        );
        let computed = world.compute(&LastGood::new());
        // h_0 = 0.5, M = 0.7: tier 0 takes 0.5/0.7 = 71.4 %, tier 1 the remaining 28.6 %.
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("primary", &[714, 0]), ("standby", &[143, 143])])
        );
        let rule = &route(&computed, "shop").rules[0];
        assert_eq!(rule.active_tier, 1);
        assert!((backend_share(rule, "primary") - 5.0 / 7.0).abs() < 1e-3);
    }

    #[test]
    fn tier_0_keeps_everything_while_min_healthy_percent_of_it_is_ready() {
        let mut world = World::default();
        world
            .service("primary")
            .pods("primary", 7, 3)
            .service("standby")
            .pods("standby", 1, 0);
        world.policy(
            "shop",
            spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
        );
        let computed = world.compute(&LastGood::new());
        let rule = &route(&computed, "shop").rules[0];
        assert_eq!(backend_share(rule, "standby"), 0.0);
        assert_eq!(rule.active_tier, 0);

        let mut strict = spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]);
        strict.failover = Some(Failover {
            min_healthy_percent: Some(100),
        });
        world.policy("shop", strict);
        let computed = world.compute(&LastGood::new());
        let rule = &route(&computed, "shop").rules[0];
        assert!((backend_share(rule, "standby") - 0.3).abs() < 1e-3);
    }

    #[test]
    fn with_no_healthy_tier_all_endpoints_of_the_lowest_tier_get_traffic_in_panic() {
        let mut world = World::default();
        world
            .service("primary")
            .pods("primary", 0, 3)
            .service("standby")
            .pods("standby", 0, 1);
        world.policy(
            "shop",
            spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
        );
        let computed = world.compute(&LastGood::new());
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("primary", &[1, 1, 1]), ("standby", &[0])])
        );
        let rule = &route(&computed, "shop").rules[0];
        assert!(rule.panic);
        assert_eq!(rule.active_tier, 0);
        assert!(state(&computed, "shop").panic);
    }

    #[test]
    fn panic_skips_a_lowest_tier_that_has_no_endpoints() {
        let mut world = World::default();
        world
            .service("primary")
            .service("standby")
            .pods("standby", 0, 2);
        world.policy(
            "shop",
            spec(&["shop"], &[("primary", 1, 0), ("standby", 1, 1)]),
        );
        let computed = world.compute(&LastGood::new());
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("primary", &[]), ("standby", &[1, 1])])
        );
        assert_eq!(route(&computed, "shop").rules[0].active_tier, 1);
    }

    #[test]
    fn a_rule_with_only_weight_0_backends_routes_nothing_and_is_not_panic() {
        let mut rule = pb::Rule {
            backends: vec![backend(0, 0, &[true, false])],
            ..pb::Rule::default()
        };
        assign_weights(&mut rule, 70);
        assert_eq!(endpoint_weight_list(&rule), [0, 0]);
        assert!(!rule.panic);
        assert_eq!(rule.active_tier, 0);
    }

    // --- hosts and last good --------------------------------------------------------------

    #[test]
    fn the_first_policy_in_snapshot_order_wins_a_new_host_and_the_loser_names_it() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
        world.policy("shop-b", spec(&["other", "Shop"], &[("v1", 1, 0)]));
        let computed = world.compute(&LastGood::new());
        assert_eq!(computed.routes.len(), 1);
        assert_eq!(route(&computed, "shop-a").hosts, ["shop"]);
        let b = state(&computed, "shop-b");
        assert_eq!(
            b.errors,
            ["spec.hosts[1]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
        );
        assert_eq!(b.reason, Reason::HostConflict);
        assert!(!b.accepted && !b.programmed);
        assert!(!computed.last_good.contains_key(&key("shop-b")));
    }

    #[test]
    fn an_incumbent_keeps_its_host_against_a_policy_earlier_in_snapshot_order() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.snapshot.policies.insert(
            0,
            PolicyInput {
                key: key("shop-b"),
                source: "b.yaml".to_owned(),
                generation: None,
                spec: Ok(spec(&["shop"], &[("v1", 1, 0)])),
            },
        );
        let second = world.compute(&first.last_good);
        assert!(state(&second, "shop-a").accepted);
        assert_eq!(
            state(&second, "shop-b").errors,
            ["spec.hosts[0]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
        );
        assert_eq!(second.routes.len(), 1);
    }

    #[test]
    fn a_host_conflict_loser_with_a_last_good_spec_keeps_serving_it() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
        world.policy("shop-b", spec(&["b"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.policy("shop-b", spec(&["b", "shop"], &[("v1", 1, 0)]));
        let second = world.compute(&first.last_good);
        assert_eq!(route(&second, "shop-b").hosts, ["b"]);
        assert_eq!(route(&second, "shop-a").hosts, ["shop"]);
        let b = state(&second, "shop-b");
        assert!(b.serving_last_good && b.programmed && !b.accepted);
        assert_eq!(
            b.errors,
            ["spec.hosts[1]: host \"shop\" is already served by TrafficPolicy default/shop-a"]
        );
        assert_eq!(
            second.last_good[&key("shop-b")],
            spec(&["b"], &[("v1", 1, 0)])
        );
    }

    #[test]
    fn a_host_dropped_by_its_holder_goes_to_another_policy_in_the_same_computation() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("shop-a", spec(&["shop"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.policy("shop-a", spec(&["shop-new"], &[("v1", 1, 0)]));
        world.policy("shop-b", spec(&["shop"], &[("v1", 1, 0)]));
        world.snapshot.policies.reverse();
        let second = world.compute(&first.last_good);
        assert!(state(&second, "shop-a").accepted);
        assert!(state(&second, "shop-b").accepted, "{:?}", second.policies);
        assert_eq!(route(&second, "shop-b").hosts, ["shop"]);
        assert_eq!(route(&second, "shop-a").hosts, ["shop-new"]);
    }

    #[test]
    fn two_policies_swapping_hosts_at_once_both_keep_their_last_good_spec() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("a", spec(&["x"], &[("v1", 1, 0)]));
        world.policy("b", spec(&["y"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.policy("a", spec(&["y"], &[("v1", 1, 0)]));
        world.policy("b", spec(&["x"], &[("v1", 1, 0)]));
        let second = world.compute(&first.last_good);
        assert_eq!(route(&second, "a").hosts, ["x"]);
        assert_eq!(route(&second, "b").hosts, ["y"]);
        assert!(state(&second, "a").serving_last_good && state(&second, "b").serving_last_good);
    }

    #[test]
    fn a_new_policy_with_an_unresolved_ref_is_programmed_and_the_others_take_its_share() {
        let mut world = World::default();
        world.service("v1").pods("v1", 2, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 1, 0), ("ghost", 1, 0)]));
        let computed = world.compute(&LastGood::new());
        assert_eq!(
            weights(&computed, "shop"),
            owned(&[("v1", &[1, 1]), ("ghost", &[])])
        );
        let shop = state(&computed, "shop");
        assert!(shop.programmed && !shop.accepted && !shop.serving_last_good);
        assert_eq!(shop.reason, Reason::UnresolvedRefs);
        assert_eq!(shop.unresolved_refs, ["ghost"]);
        assert_eq!(
            shop.errors,
            ["spec.rules[0].backendRefs[1]: Service default/ghost not found"]
        );
        assert!(computed.last_good.is_empty());
    }

    #[test]
    fn an_unresolved_ref_in_a_changed_spec_keeps_the_last_good_spec_serving() {
        let mut world = World::default();
        world.service("v1").pods("v1", 2, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.policy("shop", spec(&["shop"], &[("v1", 1, 0), ("ghost", 1, 0)]));
        let second = world.compute(&first.last_good);
        assert_eq!(weights(&second, "shop"), owned(&[("v1", &[1, 1])]));
        let shop = state(&second, "shop");
        assert!(shop.serving_last_good && !shop.accepted);
        assert_eq!(shop.unresolved_refs, ["ghost"]);
        assert_eq!(second.last_good, first.last_good);
    }

    #[test]
    fn an_invalid_spec_leaves_the_last_good_route_in_force_with_fresh_endpoints() {
        let mut world = World::default();
        world.service("v1").pods("v1", 2, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.policy("shop", spec(&["shop"], &[("v1", -3, 0)]));
        world.pods("v1", 1, 0);
        let second = world.compute(&first.last_good);
        assert_eq!(weights(&second, "shop"), owned(&[("v1", &[1, 1, 1])]));
        let shop = state(&second, "shop");
        assert!(shop.serving_last_good && shop.programmed && !shop.accepted);
        assert_eq!(shop.reason, Reason::Invalid);
        assert_eq!(
            shop.errors,
            ["spec.rules[0].backendRefs[0].weight: must be >= 0, got -3"]
        );
        assert_eq!(second.last_good, first.last_good);
    }

    #[test]
    fn an_invalid_spec_without_a_last_good_one_programs_nothing() {
        let mut world = World::default();
        world.policy("shop", spec(&[], &[("v1", 1, 0)]));
        let computed = world.compute(&LastGood::new());
        assert!(computed.routes.is_empty());
        let shop = state(&computed, "shop");
        assert!(!shop.programmed && !shop.serving_last_good);
        assert_eq!(
            shop.errors,
            ["spec.hosts: must list at least one host name"]
        );
        assert_eq!(shop.active_tier, None);
    }

    #[test]
    fn an_unreadable_document_reports_why_and_keeps_the_last_good_route() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("shop", spec(&["shop"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        world.input("shop", Err("spec.rules: invalid type: string".to_owned()));
        let second = world.compute(&first.last_good);
        let shop = state(&second, "shop");
        assert_eq!(shop.reason, Reason::Unreadable);
        assert_eq!(shop.errors, ["spec.rules: invalid type: string"]);
        assert!(shop.serving_last_good);
        assert_eq!(route(&second, "shop").hosts, ["shop"]);
    }

    #[test]
    fn an_accepted_spec_becomes_the_last_good_and_removed_policies_drop_out() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
        world.policy("b", spec(&["b"], &[("v1", 1, 0)]));
        let first = world.compute(&LastGood::new());
        assert_eq!(first.last_good.len(), 2);
        world.snapshot.policies.retain(|p| p.key.name == "a");
        world.policy("a", spec(&["a2"], &[("v1", 1, 0)]));
        let second = world.compute(&first.last_good);
        assert_eq!(
            second.last_good.into_iter().collect::<Vec<_>>(),
            [(key("a"), spec(&["a2"], &[("v1", 1, 0)]))]
        );
        assert_eq!(second.policies.len(), 1);
    }

    // --- resolution -------------------------------------------------------------------------

    /// Resolves `backend_ref` of a fresh policy in `snapshot` and returns rule 0's first
    /// backend and the policy state.
    fn resolve_one(mut snapshot: Snapshot, port: Option<i32>) -> (pb::Backend, PolicyState) {
        let mut policy = spec(&["shop"], &[("web", 1, 0)]);
        policy.rules[0].backend_refs[0].port = port;
        snapshot.policies.push(PolicyInput {
            key: key("shop"),
            source: "kubernetes".to_owned(),
            generation: None,
            spec: Ok(policy),
        });
        let mut computed = compute(&snapshot, &LastGood::new());
        let state = computed.policies.remove(&key("shop")).unwrap_or_default();
        let backend = computed
            .routes
            .pop()
            .and_then(|r| r.rules.into_iter().next())
            .and_then(|r| r.backends.into_iter().next())
            .unwrap_or_default();
        (backend, state)
    }

    fn snapshot_with(service: Service, slices: Vec<EndpointSlice>) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.services.insert(key("web"), service);
        for (i, s) in slices.into_iter().enumerate() {
            snapshot.slices.insert(key(&format!("web-{i}")), s);
        }
        snapshot
    }

    fn addresses(backend: &pb::Backend) -> Vec<(&str, bool)> {
        backend
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.ready))
            .collect()
    }

    #[test]
    fn endpoints_listen_on_the_slice_port_named_like_the_service_port() {
        let web = service(
            "web",
            vec![
                service_port(Some("http"), 80, Some(8080)),
                service_port(Some("admin"), 9000, None),
            ],
        );
        let slices = vec![slice(
            "web",
            "IPv4",
            &[(Some("admin"), 9001), (Some("http"), 8081)],
            vec![endpoint("10.0.0.1", Some(true))],
        )];
        let (backend, state) = resolve_one(snapshot_with(web, slices), Some(80));
        assert!(state.accepted, "{state:?}");
        assert_eq!(backend.port, 80);
        assert_eq!(addresses(&backend), [("10.0.0.1:8081", true)]);
        assert_eq!(backend.endpoints[0].zone, "z1");
        assert_eq!(backend.protocol, pb::Protocol::Http1 as i32);
    }

    #[test]
    fn without_a_matching_slice_port_the_integer_target_port_then_the_service_port_is_used() {
        let slices = || {
            vec![slice(
                "web",
                "IPv4",
                &[(Some("other"), 1)],
                vec![endpoint("10.0.0.1", Some(true))],
            )]
        };
        let with_target = service("web", vec![service_port(None, 80, Some(8080))]);
        let (backend, _) = resolve_one(snapshot_with(with_target, slices()), None);
        assert_eq!(addresses(&backend), [("10.0.0.1:8080", true)]);
        let without = service("web", vec![service_port(None, 80, None)]);
        let (backend, _) = resolve_one(snapshot_with(without, slices()), None);
        assert_eq!(addresses(&backend), [("10.0.0.1:80", true)]);
    }

    #[test]
    fn an_unnamed_service_port_matches_an_empty_named_slice_port() {
        let web = service("web", vec![service_port(None, 80, Some(8080))]);
        let slices = vec![slice(
            "web",
            "IPv4",
            &[(Some(""), 9090)],
            vec![endpoint("10.0.0.1", None)],
        )];
        let (backend, _) = resolve_one(snapshot_with(web, slices), None);
        assert_eq!(addresses(&backend), [("10.0.0.1:9090", true)]);
    }

    #[test]
    fn ipv6_addresses_are_bracketed_and_fqdn_slices_are_ignored() {
        let web = service("web", vec![service_port(Some("http"), 80, None)]);
        let slices = vec![
            slice(
                "web",
                "IPv6",
                &[(Some("http"), 8080)],
                vec![endpoint("fd00::1", Some(true))],
            ),
            slice(
                "web",
                "FQDN",
                &[(Some("http"), 8080)],
                vec![endpoint("web.example.com", Some(true))],
            ),
        ];
        let (backend, _) = resolve_one(snapshot_with(web, slices), Some(80));
        assert_eq!(addresses(&backend), [("[fd00::1]:8080", true)]);
    }

    #[test]
    fn an_address_in_two_slices_is_listed_once_ready_if_either_copy_is_and_sorted() {
        let web = service("web", vec![service_port(Some("http"), 80, None)]);
        let port = [(Some("http"), 8080)];
        let slices = vec![
            slice(
                "web",
                "IPv4",
                &port,
                vec![
                    endpoint("10.0.0.2", Some(false)),
                    endpoint("10.0.0.3", Some(true)),
                ],
            ),
            slice(
                "web",
                "IPv4",
                &port,
                vec![
                    endpoint("10.0.0.2", Some(true)),
                    endpoint("10.0.0.1", Some(false)),
                    endpoint("10.0.0.3", Some(false)),
                ],
            ),
        ];
        let (backend, _) = resolve_one(snapshot_with(web, slices), Some(80));
        assert_eq!(
            addresses(&backend),
            [
                ("10.0.0.1:8080", false),
                ("10.0.0.2:8080", true),
                ("10.0.0.3:8080", true)
            ]
        );
    }

    #[test]
    fn readiness_needs_ready_and_serving_and_not_terminating_with_nil_meaning_ready() {
        let conditions = |ready, serving, terminating| SliceEndpoint {
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            ..endpoint("10.0.0.1", None)
        };
        assert!(is_ready(&conditions(None, None, None)));
        assert!(is_ready(&conditions(Some(true), Some(true), Some(false))));
        assert!(!is_ready(&conditions(Some(false), None, None)));
        assert!(!is_ready(&conditions(None, Some(false), None)));
        assert!(!is_ready(&conditions(Some(true), Some(true), Some(true))));
        assert!(is_ready(&SliceEndpoint {
            conditions: None,
            ..endpoint("10.0.0.1", None)
        }));
    }

    #[test]
    fn the_h2c_app_protocol_selects_http2_cleartext() {
        let mut port = service_port(Some("grpc"), 50051, None);
        port.app_protocol = Some(H2C_APP_PROTOCOL.to_owned());
        let (backend, _) = resolve_one(snapshot_with(service("web", vec![port]), vec![]), None);
        assert_eq!(backend.protocol, pb::Protocol::H2c as i32);
        assert_eq!(backend.port, 50051);
    }

    #[test]
    fn a_backend_without_port_needs_a_service_with_exactly_one_tcp_port() {
        let mut udp = service_port(Some("dns"), 53, None);
        udp.protocol = Some("UDP".to_owned());
        let one_tcp = service(
            "web",
            vec![udp.clone(), service_port(Some("http"), 80, None)],
        );
        let (backend, state) = resolve_one(snapshot_with(one_tcp, vec![]), None);
        assert!(state.accepted, "{state:?}");
        assert_eq!(backend.port, 80);

        let two = service(
            "web",
            vec![
                service_port(Some("http"), 80, None),
                service_port(Some("https"), 443, None),
            ],
        );
        let (_, state) = resolve_one(snapshot_with(two, vec![]), None);
        assert_eq!(
            state.errors,
            [
                "spec.rules[0].backendRefs[0].port: Service default/web has several ports \
                 (80, 443); set port"
            ]
        );
        assert_eq!(state.unresolved_refs, ["web"]);

        let (_, state) = resolve_one(snapshot_with(service("web", vec![udp]), vec![]), None);
        assert_eq!(
            state.errors,
            ["spec.rules[0].backendRefs[0]: Service default/web has no TCP port"]
        );
    }

    #[test]
    fn a_port_the_service_does_not_have_is_an_unresolved_ref() {
        let web = service("web", vec![service_port(Some("http"), 80, None)]);
        let (backend, state) = resolve_one(snapshot_with(web, vec![]), Some(8080));
        assert_eq!(
            state.errors,
            ["spec.rules[0].backendRefs[0].port: Service default/web has no port 8080 (it has 80)"]
        );
        assert_eq!(state.reason, Reason::UnresolvedRefs);
        assert!(state.programmed);
        assert!(backend.endpoints.is_empty());
    }

    #[test]
    fn slices_of_other_services_or_namespaces_are_ignored() {
        let web = service("web", vec![service_port(Some("http"), 80, None)]);
        let mut snapshot = snapshot_with(web, vec![]);
        let port = [(Some("http"), 8080)];
        snapshot.slices.insert(
            ObjectKey::new("other", "web-x"),
            slice("web", "IPv4", &port, vec![endpoint("10.0.0.1", None)]),
        );
        snapshot.slices.insert(
            key("api-x"),
            slice("api", "IPv4", &port, vec![endpoint("10.0.0.2", None)]),
        );
        let (backend, _) = resolve_one(snapshot, Some(80));
        assert!(backend.endpoints.is_empty());
    }

    // --- state and determinism --------------------------------------------------------------

    #[test]
    fn the_state_lists_each_service_and_tier_once_and_serialises_in_camel_case() {
        let mut world = World::default();
        world
            .service("v1")
            .pods("v1", 2, 1)
            .service("standby")
            .pods("standby", 1, 0);
        let mut policy = spec(&["shop"], &[("v1", 1, 0), ("standby", 1, 1)]);
        policy.rules.push(policy.rules[0].clone());
        world.policy("shop", policy);
        let computed = world.compute(&LastGood::new());
        let shop = state(&computed, "shop");
        assert_eq!(
            shop.backends,
            [
                BackendStatus {
                    name: "v1".to_owned(),
                    tier: 0,
                    ready: 2,
                    healthy: 2
                },
                BackendStatus {
                    name: "standby".to_owned(),
                    tier: 1,
                    ready: 1,
                    healthy: 1
                },
            ]
        );
        let json = serde_json::to_value(shop).unwrap_or_default();
        assert_eq!(json["servingLastGood"], false);
        assert_eq!(json["unresolvedRefs"], serde_json::json!([]));
        assert_eq!(json["activeTier"], 1);
        assert_eq!(json["reason"], "Accepted");
        assert_eq!(json["source"], "shop.yaml");
    }

    #[test]
    fn routes_are_sorted_by_name_and_the_same_input_gives_the_same_output() {
        let mut world = World::default();
        world.service("v1").pods("v1", 2, 0).pods("v1", 1, 1);
        world.policy("b", spec(&["b"], &[("v1", 1, 0)]));
        world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
        world.snapshot.policies.push(PolicyInput {
            key: ObjectKey::new("a-b", "z"),
            source: "kubernetes".to_owned(),
            generation: None,
            spec: Ok(spec(&["z"], &[("v1", 1, 0)])),
        });
        let first = world.compute(&LastGood::new());
        let names: Vec<&str> = first.routes.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a-b/z", "default/a", "default/b"]);
        assert_eq!(world.compute(&LastGood::new()), first);
        assert_eq!(world.compute(&first.last_good).routes, first.routes);
    }

    #[test]
    fn a_policy_listed_twice_is_read_once() {
        let mut world = World::default();
        world.service("v1").pods("v1", 1, 0);
        world.policy("a", spec(&["a"], &[("v1", 1, 0)]));
        let duplicate = world.snapshot.policies[0].clone();
        world.snapshot.policies.push(duplicate);
        let computed = world.compute(&LastGood::new());
        assert_eq!(computed.routes.len(), 1);
        assert!(state(&computed, "a").accepted);
    }

    // --- properties -------------------------------------------------------------------------

    fn backend(tier: u32, weight: u32, ready: &[bool]) -> pb::Backend {
        pb::Backend {
            tier,
            weight,
            endpoints: ready
                .iter()
                .enumerate()
                .map(|(k, &ready)| pb::Endpoint {
                    address: format!("10.0.0.{k}:80"),
                    ready,
                    ..pb::Endpoint::default()
                })
                .collect(),
            ..pb::Backend::default()
        }
    }

    fn endpoint_weight_list(rule: &pb::Rule) -> Vec<u32> {
        rule.backends
            .iter()
            .flat_map(|b| &b.endpoints)
            .map(|e| e.weight)
            .collect()
    }

    fn arb_rule() -> impl Strategy<Value = (pb::Rule, u32)> {
        let arb_backend = (
            0u32..3,
            prop_oneof![Just(0u32), 1u32..10, 1u32..1_000_000],
            prop::collection::vec(any::<bool>(), 0..6),
        );
        (prop::collection::vec(arb_backend, 1..7), 1u32..=100).prop_map(|(backends, pct)| {
            let rule = pb::Rule {
                backends: backends
                    .into_iter()
                    .enumerate()
                    .map(|(i, (tier, weight, ready))| pb::Backend {
                        service: format!("s{i}"),
                        ..backend(tier, weight, &ready)
                    })
                    .collect(),
                ..pb::Rule::default()
            };
            (rule, pct)
        })
    }

    fn tier_share(rule: &pb::Rule, tier: u32) -> f64 {
        let total: u64 = endpoint_weight_list(rule)
            .iter()
            .map(|w| u64::from(*w))
            .sum();
        let in_tier: u64 = rule
            .backends
            .iter()
            .filter(|b| b.tier == tier)
            .flat_map(|b| &b.endpoints)
            .map(|e| u64::from(e.weight))
            .sum();
        if total == 0 {
            0.0
        } else {
            in_tier as f64 / total as f64
        }
    }

    fn plan_share(plan: &TierPlan, tier: u32) -> f64 {
        plan.loads
            .iter()
            .filter(|(t, _)| *t == tier)
            .map(|(_, l)| l)
            .sum()
    }

    proptest! {
        #[test]
        fn traffic_flows_exactly_when_a_weighted_backend_has_an_endpoint((mut rule, pct) in arb_rule()) {
            let plan = plan_tiers(&rule.backends, pct);
            assign_weights(&mut rule, pct);
            let sum: u64 = endpoint_weight_list(&rule).iter().map(|w| u64::from(*w)).sum();
            let reachable = rule.backends.iter().any(|b| b.weight > 0 && !b.endpoints.is_empty());
            prop_assert_eq!(sum > 0, reachable);
            prop_assert!(sum <= MAX_WEIGHT_SUM);
            if reachable {
                let loads: f64 = plan.loads.iter().map(|(_, l)| l).sum();
                prop_assert!((loads - 1.0).abs() < 1e-9, "loads {:?}", plan.loads);
            }
        }

        #[test]
        fn a_weight_0_backend_gets_nothing((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            for b in rule.backends.iter().filter(|b| b.weight == 0) {
                prop_assert!(b.endpoints.iter().all(|e| e.weight == 0));
            }
        }

        #[test]
        fn a_not_ready_endpoint_gets_nothing_unless_in_panic((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            if !rule.panic {
                for e in rule.backends.iter().flat_map(|b| &b.endpoints).filter(|e| !e.ready) {
                    prop_assert_eq!(e.weight, 0);
                }
            }
        }

        #[test]
        fn the_serving_endpoints_of_one_service_get_equal_weights((mut rule, pct) in arb_rule()) {
            assign_weights(&mut rule, pct);
            for b in &rule.backends {
                let serving: BTreeSet<u32> = b.endpoints.iter()
                    .filter(|e| rule.panic || e.ready)
                    .map(|e| e.weight)
                    .collect();
                prop_assert!(serving.len() <= 1, "{:?}", b);
            }
        }

        #[test]
        fn integer_weights_follow_the_tier_loads_and_service_weights((mut rule, pct) in arb_rule()) {
            let plan = plan_tiers(&rule.backends, pct);
            assign_weights(&mut rule, pct);
            for b in &rule.backends {
                let serving = |o: &pb::Backend| o.weight > 0 && o.endpoints.iter().any(|e| plan.panic || e.ready);
                let tier_weight: f64 = rule.backends.iter()
                    .filter(|o| o.tier == b.tier && serving(o))
                    .map(|o| f64::from(o.weight))
                    .sum();
                let expected = if serving(b) {
                    plan_share(&plan, b.tier) * f64::from(b.weight) / tier_weight
                } else {
                    0.0
                };
                let actual = backend_share(&rule, &b.service);
                let actual = if actual.is_nan() { 0.0 } else { actual };
                prop_assert!((actual - expected).abs() < 3e-3, "{} expected {} got {} in {:?}", b.service, expected, actual, rule);
            }
        }

        #[test]
        fn making_one_more_tier_0_endpoint_ready_never_lowers_tier_0_share((mut rule, pct) in arb_rule()) {
            let flip = rule.backends.iter().enumerate()
                .filter(|(_, b)| b.tier == 0)
                .find_map(|(i, b)| b.endpoints.iter().position(|e| !e.ready).map(|k| (i, k)));
            if let Some((i, k)) = flip {
                let before_plan = plan_tiers(&rule.backends, pct);
                let mut before = rule.clone();
                assign_weights(&mut before, pct);
                rule.backends[i].endpoints[k].ready = true;
                let after_plan = plan_tiers(&rule.backends, pct);
                assign_weights(&mut rule, pct);
                prop_assert!(plan_share(&after_plan, 0) >= plan_share(&before_plan, 0) - 1e-12);
                prop_assert!(tier_share(&rule, 0) >= tier_share(&before, 0) - 2e-3);
            }
        }
    }
}
