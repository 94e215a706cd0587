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

mod decide;
mod incremental;
pub mod load;
mod resolve;
#[cfg(test)]
mod tests;

pub(crate) use incremental::{Changes, Routing};
use load::LoadFactors;
use resolve::SliceIndex;
#[cfg(test)]
use resolve::index_slices;

use crate::model::{BackendStatus, EndpointSlice, ObjectKey, Service, TrafficPolicySpec};
use decide::{Candidate, Serve, conflict_errors, decide};
use resolve::Cluster;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use weir_proto::v1 as pb;

/// One TrafficPolicy as the sources saw it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PolicyInput {
    /// The policy's `namespace/name`.
    pub key: ObjectKey,
    /// Where it came from, for messages: a file path in local mode, "kubernetes" otherwise.
    pub source: String,
    /// `metadata.generation`, echoed into the status as `observedGeneration`.
    pub generation: Option<i64>,
    /// Err: the document could not be read as a TrafficPolicy at all (message says why).
    pub spec: Result<TrafficPolicySpec, String>,
}

/// Everything the computation looks at. Objects are shared, not copied: a source hands the
/// same `Arc` again for an object that did not change, which is how [`Routing::update`] tells
/// an endpoint change from a policy change without comparing whole objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Snapshot {
    /// Precedence order for host conflicts (creationTimestamp, then namespace/name): earlier
    /// wins. A key listed twice is only read the first time.
    pub policies: Vec<Arc<PolicyInput>>,
    /// Services by their own key.
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    /// EndpointSlices by the slice's own key (not the Service's).
    pub slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
}

/// The spec each policy last served while acceptable; carried from one computation to the
/// next so that a broken edit never takes routing down.
pub(crate) type LastGood = BTreeMap<ObjectKey, TrafficPolicySpec>;

/// The result of [`compute`].
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Computed {
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
pub(crate) enum Reason {
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
pub(crate) struct PolicyState {
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
/// [`Computed::last_good`] (empty at start). The reference that [`Routing`]'s incremental
/// updates are tested against; the controller itself goes through [`Routing`].
#[cfg(test)]
pub(crate) fn compute(snapshot: &Snapshot, last_good: &LastGood) -> Computed {
    let index = index_slices(&snapshot.slices);
    compute_indexed(snapshot, &index, last_good, &LoadFactors::new())
}

/// [`compute`] with the snapshot's slices already indexed, and load factors for load-aware
/// policies.
fn compute_indexed(
    snapshot: &Snapshot,
    index: &SliceIndex,
    last_good: &LastGood,
    load: &LoadFactors,
) -> Computed {
    let cluster = Cluster::new(snapshot, index, load);
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
