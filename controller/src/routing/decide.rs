//! Deciding which spec each policy serves and who holds which host (see the module doc of
//! [`super`] for the rules), and building each policy's route and state from that decision.

use super::resolve::Cluster;
use super::{PolicyInput, PolicyState, Reason, backend_statuses};
use crate::model::TrafficPolicySpec;
use crate::validate::validate;
use std::collections::{BTreeMap, BTreeSet};
use weir_proto::v1 as pb;
use weir_proto::weights::assign_weights;

/// The current spec of a policy, read as far as it goes.
// Nearly every policy is `Valid`; boxing its route would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Current {
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
pub(super) enum LastGoodRoute<'a> {
    None,
    /// Identical to the current spec: serve the current route if it comes to that.
    SameAsCurrent(&'a TrafficPolicySpec),
    /// A different spec, validated but not yet resolved (only needed when it is served).
    Other(&'a TrafficPolicySpec, Box<pb::Route>),
}

pub(super) struct Candidate<'a> {
    pub(super) input: &'a PolicyInput,
    pub(super) current: Current,
    pub(super) last_good: LastGoodRoute<'a>,
}

/// What a policy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Serve {
    Current,
    LastGood,
    Nothing,
}

/// Every policy's [`Serve`] (by candidate index) and the final owner of each served host.
pub(super) struct Decisions<'a> {
    pub(super) serve: Vec<Serve>,
    pub(super) claims: BTreeMap<&'a str, usize>,
}

/// What [`Candidate::finish`] hands back to [`compute`].
pub(super) struct Finished {
    pub(super) route: Option<pb::Route>,
    pub(super) last_good: Option<TrafficPolicySpec>,
    pub(super) state: PolicyState,
}

impl<'a> Candidate<'a> {
    pub(super) fn new(
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

    pub(super) fn current_route(&self) -> Option<&pb::Route> {
        match &self.current {
            Current::Valid { route, .. } => Some(route),
            _ => None,
        }
    }

    pub(super) fn last_good_hosts(&self) -> Option<&[String]> {
        match &self.last_good {
            LastGoodRoute::None => None,
            LastGoodRoute::SameAsCurrent(_) => self.current_route().map(|r| r.hosts.as_slice()),
            LastGoodRoute::Other(_, route) => Some(&route.hosts),
        }
    }

    /// The hosts the current spec would serve, if it may be served at all: a policy with a
    /// last good spec only moves to a fully resolved spec; a new one also to a spec whose
    /// only fault is unresolved refs.
    pub(super) fn servable_current_hosts(&self) -> Option<&[String]> {
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
    pub(super) fn finish(
        self,
        serve: Serve,
        conflicts: Vec<String>,
        cluster: &Cluster<'_>,
    ) -> Finished {
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
            super::load::stamp(&mut route, cluster.load);
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
pub(super) fn decide<'a>(candidates: &'a [Candidate<'a>]) -> Decisions<'a> {
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
pub(super) fn conflict_errors(
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
