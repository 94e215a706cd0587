//! The routing computation kept up to date from one snapshot to the next, at a cost that
//! follows the change rather than the size of the mesh.
//!
//! Almost every change in a busy cluster is an endpoint change: a pod turns ready or not, is
//! added or goes away, and only its EndpointSlice changes. Such a change cannot alter which
//! spec a policy serves, its errors or who holds which host (those depend on policies and
//! Services only: resolution errors are about Services and ports, never endpoints), so
//! [`Routing::update`] then re-resolves only the backends of the Services whose slices
//! changed, in the routes that use them, and reassigns those routes' weights. Any other
//! change (a policy, a Service) runs the full [`super::compute`], which is what it would have
//! cost anyway. Either way the result is exactly what [`super::compute`] gives for the new
//! snapshot: the property tests below check this over random change sequences.
//!
//! Routes are kept behind `Arc`s, and a route whose value did not change keeps its pointer,
//! so the hub and the server can tell what changed by pointer.

use super::load::{LoadFactors, stamp};
use super::resolve::{
    Cluster, SliceIndex, index_slices, rule_backends, rule_backends_mut, slice_owner,
};
use super::{Computed, LastGood, PolicyState, Snapshot, backend_statuses, compute_indexed};
use crate::model::ObjectKey;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use weir_proto::v1 as pb;
use weir_proto::weights::assign_weights;

/// What one [`Routing::update`] changed in the routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    /// Routes added or changed, by name, sorted.
    pub upserted: Vec<String>,
    /// Routes that no longer exist, by name, sorted.
    pub removed: Vec<String>,
    /// True when the update ran the full computation (a policy or Service changed).
    pub full: bool,
}

impl Changes {
    pub(crate) fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// The current routing result and what is needed to update it incrementally.
#[derive(Debug, Default)]
pub(crate) struct Routing {
    snapshot: Snapshot,
    index: SliceIndex,
    routes: BTreeMap<String, Arc<pb::Route>>,
    policies: BTreeMap<ObjectKey, PolicyState>,
    last_good: LastGood,
    /// (namespace, Service name) → the routes with a backend on that Service.
    users: BTreeMap<(String, String), BTreeSet<String>>,
    /// Load factors for load-aware policies (see [`super::load`]).
    load: LoadFactors,
}

impl Routing {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The routes in force, by name.
    pub(crate) fn routes(&self) -> &BTreeMap<String, Arc<pb::Route>> {
        &self.routes
    }

    /// Every policy's state, by key.
    pub(crate) fn policies(&self) -> &BTreeMap<ObjectKey, PolicyState> {
        &self.policies
    }

    /// The last good spec of every policy that has one.
    #[cfg(test)]
    pub(crate) fn last_good(&self) -> &LastGood {
        &self.last_good
    }

    /// Brings the result up to date with `next` and says which routes changed.
    pub(crate) fn update(&mut self, next: Snapshot) -> Changes {
        let endpoints_only = same_policies(&self.snapshot.policies, &next.policies)
            && same_objects(&self.snapshot.services, &next.services);
        if endpoints_only {
            self.update_endpoints(next)
        } else {
            self.recompute(next)
        }
    }

    /// The full computation; unchanged routes keep their pointers.
    fn recompute(&mut self, next: Snapshot) -> Changes {
        let index = index_slices(&next.slices);
        let Computed {
            routes,
            policies,
            last_good,
        } = compute_indexed(&next, &index, &self.last_good, &self.load);
        let mut changes = Changes {
            full: true,
            ..Changes::default()
        };
        let mut fresh = BTreeMap::new();
        for route in routes {
            let shared = match self.routes.get(&route.name) {
                Some(old) if **old == route => old.clone(),
                _ => {
                    changes.upserted.push(route.name.clone());
                    Arc::new(route)
                }
            };
            fresh.insert(shared.name.clone(), shared);
        }
        changes.removed = self
            .routes
            .keys()
            .filter(|name| !fresh.contains_key(*name))
            .cloned()
            .collect();
        self.users = users_of(&fresh);
        self.routes = fresh;
        self.policies = policies;
        self.last_good = last_good;
        self.index = index;
        self.snapshot = next;
        changes
    }

    /// Only slices changed: re-resolve the routes that use their Services.
    fn update_endpoints(&mut self, next: Snapshot) -> Changes {
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        for (key, old, new) in changed_objects(&self.snapshot.slices, &next.slices) {
            if let Some(owner) = old.and_then(|s| slice_owner(key, s)) {
                if let Some(keys) = self.index.get_mut(&owner) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.index.remove(&owner);
                    }
                }
                touched.insert(owner);
            }
            if let Some(owner) = new.and_then(|s| slice_owner(key, s)) {
                self.index
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.clone());
                touched.insert(owner);
            }
        }
        self.snapshot = next;

        let affected: BTreeSet<&String> = touched
            .iter()
            .filter_map(|svc| self.users.get(svc))
            .flatten()
            .collect();
        let cluster = Cluster::new(&self.snapshot, &self.index, &self.load);
        let mut changes = Changes::default();
        let mut updated = Vec::new();
        for name in affected {
            let Some(old) = self.routes.get(name) else {
                continue;
            };
            let Some((namespace, _)) = name.split_once('/') else {
                continue;
            };
            let mut route = (**old).clone();
            for rule in &mut route.rules {
                for backend in rule_backends_mut(rule) {
                    let svc = (namespace.to_owned(), backend.service.clone());
                    if touched.contains(&svc) {
                        // The Service and its ports are unchanged, so this resolves exactly
                        // as before but for the endpoints; a backend that did not resolve
                        // then does not now either and keeps no endpoints.
                        let _ = cluster.resolve_backend(namespace, backend);
                    }
                }
            }
            reweigh(&mut route, &self.load);
            if route != **old {
                updated.push(route);
            }
        }
        self.replace(updated, &mut changes);
        changes
    }

    /// The load factors in force.
    pub(crate) fn load(&self) -> &LoadFactors {
        &self.load
    }

    /// Puts new load factors in force: the routes of load-aware policies get their weights
    /// again; nothing else is touched.
    pub(crate) fn set_load(&mut self, load: LoadFactors) -> Changes {
        let mut changes = Changes::default();
        if load == self.load {
            return changes;
        }
        self.load = load;
        let updated: Vec<pb::Route> = self
            .routes
            .values()
            .filter(|r| r.load_balancer.as_ref().is_some_and(|lb| lb.load_aware))
            .filter_map(|old| {
                let mut route = (**old).clone();
                reweigh(&mut route, &self.load);
                (route != **old).then_some(route)
            })
            .collect();
        self.replace(updated, &mut changes);
        changes
    }

    /// Puts `updated` routes in force, with their policies' states, and names them in
    /// `changes`.
    fn replace(&mut self, updated: Vec<pb::Route>, changes: &mut Changes) {
        for route in updated {
            if let Some(state) = name_key(&route.name).and_then(|k| self.policies.get_mut(&k)) {
                state.active_tier = route.rules.iter().map(|r| r.active_tier).max();
                state.panic = route.rules.iter().any(|r| r.panic);
                state.backends = backend_statuses(&route);
            }
            changes.upserted.push(route.name.clone());
            self.routes.insert(route.name.clone(), Arc::new(route));
        }
        changes.upserted.sort();
    }
}

/// Stamps the load factors on `route` and assigns its weights again.
fn reweigh(route: &mut pb::Route, load: &LoadFactors) {
    stamp(route, load);
    for rule in &mut route.rules {
        assign_weights(rule, route.min_healthy_percent);
    }
}

/// The policy key of a route name (`namespace/name`).
fn name_key(name: &str) -> Option<ObjectKey> {
    let (namespace, name) = name.split_once('/')?;
    Some(ObjectKey::new(namespace, name))
}

/// Which routes use which Service.
fn users_of(
    routes: &BTreeMap<String, Arc<pb::Route>>,
) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut users: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (name, route) in routes {
        let Some((namespace, _)) = name.split_once('/') else {
            continue;
        };
        for backend in route.rules.iter().flat_map(rule_backends) {
            users
                .entry((namespace.to_owned(), backend.service.clone()))
                .or_default()
                .insert(name.clone());
        }
    }
    users
}

/// The same policies in the same order: by pointer, else by value (the Kubernetes source
/// builds its policy inputs anew on each snapshot).
fn same_policies<T: PartialEq>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(x, y) || **x == **y)
}

/// The same keys with the same objects, by pointer first.
fn same_objects<T: PartialEq>(
    a: &BTreeMap<ObjectKey, Arc<T>>,
    b: &BTreeMap<ObjectKey, Arc<T>>,
) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, x), (kb, y))| ka == kb && (Arc::ptr_eq(x, y) || **x == **y))
}

/// The keys whose object was added, removed or replaced, with the old and new object; a
/// merge of two sorted maps, comparing unchanged objects by pointer only.
fn changed_objects<'a, T: PartialEq>(
    old: &'a BTreeMap<ObjectKey, Arc<T>>,
    new: &'a BTreeMap<ObjectKey, Arc<T>>,
) -> Vec<(&'a ObjectKey, Option<&'a T>, Option<&'a T>)> {
    let mut out = Vec::new();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some((ka, x)), Some((kb, y))) if ka == kb => {
                if !Arc::ptr_eq(x, y) && ***x != ***y {
                    out.push((*ka, Some(&***x), Some(&***y)));
                }
                a.next();
                b.next();
            }
            (Some((ka, x)), Some((kb, _))) if ka < kb => {
                out.push((*ka, Some(&***x), None));
                a.next();
            }
            (Some((ka, x)), None) => {
                out.push((*ka, Some(&***x), None));
                a.next();
            }
            (_, Some((kb, y))) => {
                out.push((*kb, None, Some(&***y)));
                b.next();
            }
        }
    }
    out
}
