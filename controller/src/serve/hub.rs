//! The controller's single mutator: takes snapshots of objects from a source, runs the pure
//! routing computation, and publishes a new versioned table when the result changed.
//!
//! Agents' sessions subscribe to a `watch` channel, which holds only the latest table: a slow
//! agent skips intermediate versions instead of queueing them (it is sent one coalesced
//! delta from the version it has), and never delays the others. Each table's messages are
//! encoded once and shared by all sessions.
//! Errors are logged once when they appear, and kept for `/state`.

use crate::routing::load::LoadFactors;
use crate::routing::{Changes, PolicyState, Routing, Snapshot};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;
use tokio::sync::watch;
use weir_proto::Encoded;
use weir_proto::v1::{ControllerMessage, Route, RoutingUpdate, controller_message};

/// A problem with one manifest file, as shown in the admin API.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub(crate) struct FileReport {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One published routing table. Routes are shared by pointer between versions, so two
/// tables are diffed by comparing only the routes whose pointers differ.
///
/// A table also carries what changed since the version before it, and the messages that
/// carry it to agents, each encoded **once** on first use and then shared (by reference
/// count) by every agent session that sends it: the full table for agents that connect, the
/// delta from the previous version for agents that kept up, and coalesced deltas from older
/// versions for agents that fell behind (one per base version, also shared). Nothing here
/// grows with the number of agents.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub version: u64,
    pub routes: BTreeMap<String, Arc<Route>>,
    /// The previous version and what changed since (`None` for the first table).
    step: Option<Step>,
    full: OnceLock<Encoded>,
    /// Deltas from older versions, by base version; a few at most (see [`MAX_DELTAS`]).
    deltas: Mutex<Vec<(u64, Encoded)>>,
    /// This version and up to [`SEEN_VERSIONS`] before it, each with when the change it
    /// published was first seen: what sessions time the push latency from when an agent
    /// ACKs (an agent that skipped versions gets all their changes at once).
    seen: Vec<(u64, Instant)>,
}

/// How many versions' change times a table carries. Of an agent more versions behind than
/// this, only the latest [`SEEN_VERSIONS`] changes are timed when it catches up.
const SEEN_VERSIONS: usize = 16;

#[derive(Debug)]
struct Step {
    base: u64,
    upserted: Vec<String>,
    removed: Vec<String>,
}

/// How many coalesced deltas from older bases a table keeps. Agents that fell behind mostly
/// share a few bases (they reconnected or stalled together); past this, a delta is encoded
/// for its session alone.
const MAX_DELTAS: usize = 8;

impl Table {
    #[cfg(test)]
    pub fn new(version: u64, routes: BTreeMap<String, Arc<Route>>) -> Self {
        Self {
            version,
            routes,
            ..Self::default()
        }
    }

    /// Recent versions up to this one, each with when its change was first seen.
    pub(crate) fn seen(&self) -> &[(u64, Instant)] {
        &self.seen
    }

    /// The whole table as one update, encoded once.
    pub(crate) fn full_message(&self) -> Encoded {
        self.full
            .get_or_init(|| {
                encode(RoutingUpdate {
                    version: self.version,
                    full: true,
                    base_version: 0,
                    upserted: self.routes.values().map(|r| (**r).clone()).collect(),
                    removed: Vec::new(),
                })
            })
            .clone()
    }

    /// The delta that takes an agent from table `from` to this one, encoded once per base
    /// version.
    pub(crate) fn delta_message(&self, from: &Table) -> Encoded {
        let mut deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = deltas.iter().find(|(base, _)| *base == from.version) {
            return m.clone();
        }
        let update = match &self.step {
            Some(step) if step.base == from.version => RoutingUpdate {
                version: self.version,
                full: false,
                base_version: from.version,
                upserted: step
                    .upserted
                    .iter()
                    .filter_map(|name| self.routes.get(name))
                    .map(|r| (**r).clone())
                    .collect(),
                removed: step.removed.clone(),
            },
            _ => delta(from, self),
        };
        let message = encode(update);
        if deltas.len() < MAX_DELTAS {
            deltas.push((from.version, message.clone()));
        }
        message
    }
}

fn encode(update: RoutingUpdate) -> Encoded {
    Encoded::of(&ControllerMessage {
        kind: Some(controller_message::Kind::Update(update)),
    })
}

/// The routes of `next` that differ from `prev` (by pointer first, then by value), and the
/// names that disappeared: the coalesced delta for an agent that holds `prev`.
pub(crate) fn delta(prev: &Table, next: &Table) -> RoutingUpdate {
    let upserted = next
        .routes
        .iter()
        .filter(|(name, route)| match prev.routes.get(*name) {
            Some(old) => !Arc::ptr_eq(old, route) && old != *route,
            None => true,
        })
        .map(|(_, r)| (**r).clone())
        .collect();
    let removed = prev
        .routes
        .keys()
        .filter(|name| !next.routes.contains_key(*name))
        .cloned()
        .collect();
    RoutingUpdate {
        version: next.version,
        full: false,
        base_version: prev.version,
        upserted,
        removed,
    }
}

/// What `/state` shows about the configuration.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ConfigState {
    pub version: u64,
    /// False until the first snapshot was computed.
    pub loaded: bool,
    pub files: Vec<FileReport>,
    pub policies: BTreeMap<String, PolicyState>,
    /// For each programmed policy (`namespace/name`): its generation and the first table
    /// version that carries that generation. An agent that applied this version or a later
    /// one of this controller runs the policy's current spec. Versions are per controller
    /// process, so this never leaves the replica (NodeAgent objects carry generations).
    #[serde(skip)]
    pub carried: BTreeMap<String, Carried>,
    /// Load-aware weights in force: endpoint address → its share of its Service in per
    /// mille of an even split (endpoints at 1000 are left out).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub load_factors: LoadFactors,
}

/// A policy generation and the first table version carrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Carried {
    pub generation: i64,
    pub since_version: u64,
}

/// Which version first carries each programmed policy's generation, given what was known
/// before (`previous`) and the table `version` in force after an update. A generation seen
/// before keeps its version; a new one (or a policy newly programmed) gets `version`.
/// Policies without a generation (local mode) count as generation 0.
pub(crate) fn carried_since(
    previous: &BTreeMap<String, Carried>,
    policies: &BTreeMap<String, PolicyState>,
    version: u64,
) -> BTreeMap<String, Carried> {
    policies
        .iter()
        .filter(|(_, p)| p.programmed)
        .map(|(key, p)| {
            let generation = p.generation.unwrap_or(0);
            let since_version = previous
                .get(key)
                .filter(|c| c.generation == generation)
                .map_or(version, |c| c.since_version);
            (
                key.clone(),
                Carried {
                    generation,
                    since_version,
                },
            )
        })
        .collect()
}

pub struct Hub {
    tx: watch::Sender<Arc<Table>>,
    inner: Mutex<Inner>,
}

struct Inner {
    routing: Routing,
    state: ConfigState,
    /// Messages already logged, so a broken file is not logged again on every rescan.
    logged: BTreeSet<String>,
    next_version: u64,
}

impl Hub {
    /// `first_version` lets a restarted controller keep versions increasing (it is seeded
    /// from the clock), so versions seen by agents never go backwards across restarts.
    pub fn new(first_version: u64) -> Arc<Self> {
        let (tx, _) = watch::channel(Arc::new(Table::default()));
        Arc::new(Self {
            tx,
            inner: Mutex::new(Inner {
                routing: Routing::new(),
                state: ConfigState::default(),
                logged: BTreeSet::new(),
                next_version: first_version.max(1),
            }),
        })
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.tx.subscribe()
    }

    pub(crate) fn current(&self) -> Arc<Table> {
        self.tx.borrow().clone()
    }

    pub(crate) fn config_state(&self) -> ConfigState {
        self.lock().state.clone()
    }

    /// The load factors in force (see [`crate::routing::load`]).
    pub(crate) fn load_factors(&self) -> LoadFactors {
        self.lock().routing.load().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug elsewhere; the data is still
        // consistent (each field is replaced whole), so keep serving rather than poison.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings routing up to date with `snapshot` (incrementally when only endpoints
    /// changed); publishes a new version if any route changed. Returns the version in force
    /// afterwards.
    pub(crate) fn update(&self, snapshot: Snapshot, files: Vec<FileReport>) -> u64 {
        self.update_seen(snapshot, files, Instant::now())
    }

    /// [`Hub::update`] for a change first seen at `seen_at` (the debounce's first event): the
    /// start of the push latency that agents' ACKs of the new version are timed against.
    pub(crate) fn update_seen(
        &self,
        snapshot: Snapshot,
        files: Vec<FileReport>,
        seen_at: Instant,
    ) -> u64 {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let changes = inner.routing.update(snapshot);

        let mut seen = BTreeSet::new();
        for f in &files {
            for msg in f.error.iter().chain(f.warnings.iter()) {
                let line = format!("{}: {msg}", f.path);
                if !inner.logged.contains(&line) {
                    tracing::error!(file = %f.path, "{msg}; the file's last good objects stay in force");
                }
                seen.insert(line);
            }
        }
        for (key, p) in inner.routing.policies() {
            for msg in p.errors.iter() {
                let line = format!("{key}: {msg}");
                if !inner.logged.contains(&line) {
                    tracing::error!(
                        policy = %key,
                        source = %p.source,
                        serving_last_good = p.serving_last_good,
                        "TrafficPolicy rejected: {msg}"
                    );
                }
                seen.insert(line);
            }
        }

        let first = !inner.state.loaded;
        let version = self.publish(inner, changes, first, seen_at);
        // Endpoint changes only touch the states of the routes they changed, but the state is
        // rebuilt whole: it is a copy for readers (`/state`, status writers), not a hot path.
        let policies: BTreeMap<String, PolicyState> = inner
            .routing
            .policies()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let carried = carried_since(&inner.state.carried, &policies, version);
        inner.logged = seen;
        inner.state = ConfigState {
            version,
            loaded: true,
            files,
            policies,
            carried,
            load_factors: inner.routing.load().clone(),
        };
        version
    }

    /// Puts new load factors in force (see [`crate::routing::load`]); publishes a new version
    /// if a route's weights changed. Returns the version in force afterwards.
    pub(crate) fn set_load(&self, factors: LoadFactors) -> u64 {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let changes = inner.routing.set_load(factors);
        let version = self.publish(inner, changes, false, Instant::now());
        inner.state.version = version;
        inner.state.load_factors = inner.routing.load().clone();
        version
    }

    /// Publishes the routes in force as a new version when `changes` changed any (or when
    /// `force`d, for the first table); returns the version in force.
    fn publish(&self, inner: &mut Inner, changes: Changes, force: bool, seen: Instant) -> u64 {
        let current = self.current();
        if changes.is_empty() && !force {
            return current.version;
        }
        let version = inner.next_version;
        inner.next_version += 1;
        let kept = current.seen.len().min(SEEN_VERSIONS - 1);
        let mut seen_versions = Vec::with_capacity(kept + 1);
        seen_versions.extend_from_slice(&current.seen[current.seen.len() - kept..]);
        seen_versions.push((version, seen));
        let table = Arc::new(Table {
            version,
            routes: inner.routing.routes().clone(),
            step: inner.state.loaded.then(|| Step {
                base: current.version,
                upserted: changes.upserted,
                removed: changes.removed,
            }),
            seen: seen_versions,
            ..Table::default()
        });
        tracing::debug!(
            version,
            routes = table.routes.len(),
            full = changes.full,
            "routing table published"
        );
        self.tx.send_replace(table);
        version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(generation: i64, programmed: bool) -> PolicyState {
        PolicyState {
            generation: Some(generation),
            programmed,
            ..PolicyState::default()
        }
    }

    #[test]
    fn a_generation_keeps_the_version_that_first_carried_it() {
        let mut policies = BTreeMap::new();
        policies.insert("ns/a".to_string(), policy(1, true));
        policies.insert("ns/off".to_string(), policy(1, false));
        let first = carried_since(&BTreeMap::new(), &policies, 10);
        assert_eq!(
            first.len(),
            1,
            "unprogrammed policies are carried by no version"
        );
        assert_eq!(first["ns/a"].since_version, 10);

        // An endpoint change publishes version 11; the spec did not change.
        let same = carried_since(&first, &policies, 11);
        assert_eq!(same["ns/a"].since_version, 10);

        // A new generation is carried from the version in force after the update.
        policies.insert("ns/a".to_string(), policy(2, true));
        let next = carried_since(&same, &policies, 12);
        assert_eq!(
            next["ns/a"],
            Carried {
                generation: 2,
                since_version: 12
            }
        );
    }

    fn table(version: u64, routes: &[(&str, &str)]) -> Table {
        Table::new(
            version,
            routes
                .iter()
                .map(|(name, host)| {
                    (
                        name.to_string(),
                        Arc::new(Route {
                            name: name.to_string(),
                            hosts: vec![host.to_string()],
                            ..Default::default()
                        }),
                    )
                })
                .collect(),
        )
    }

    fn decode(m: &Encoded) -> RoutingUpdate {
        use prost::Message;
        match ControllerMessage::decode(m.0.clone()).map(|m| m.kind) {
            Ok(Some(controller_message::Kind::Update(u))) => u,
            other => panic!("not an update: {other:?}"),
        }
    }

    #[test]
    fn delta_carries_only_changed_added_and_removed_routes() {
        let prev = table(1, &[("a", "a"), ("b", "b"), ("c", "c")]);
        let next = table(2, &[("a", "a"), ("b", "b2"), ("d", "d")]);
        let d = delta(&prev, &next);
        assert_eq!(d.base_version, 1);
        assert_eq!(d.version, 2);
        assert!(!d.full);
        let names: Vec<_> = d.upserted.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(d.removed, ["c"]);
    }

    #[test]
    fn each_message_is_encoded_once_and_shared() {
        let prev = table(1, &[("a", "a"), ("b", "b")]);
        let next = table(2, &[("a", "a2"), ("b", "b")]);
        let first = next.delta_message(&prev);
        let again = next.delta_message(&prev);
        assert_eq!(first.0.as_ptr(), again.0.as_ptr(), "same bytes, not a copy");
        assert_eq!(decode(&first), delta(&prev, &next));
        let full = next.full_message();
        assert_eq!(full.0.as_ptr(), next.full_message().0.as_ptr());
        let update = decode(&full);
        assert!(update.full);
        assert_eq!(update.upserted.len(), 2);
    }

    #[test]
    fn tables_remember_when_their_recent_versions_changes_were_seen() {
        use crate::model::ObjectKey;
        use crate::routing::PolicyInput;
        let hub = Hub::new(1);
        let start = Instant::now();
        let mut versions = Vec::new();
        for i in 0..SEEN_VERSIONS + 4 {
            let spec = serde_json::from_value(serde_json::json!({
                "hosts": [format!("h{i}")], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }))
            .expect("spec");
            let snapshot = Snapshot {
                policies: vec![Arc::new(PolicyInput {
                    key: ObjectKey::new("default", "a"),
                    source: "a.yaml".into(),
                    generation: None,
                    spec: Ok(spec),
                })],
                ..Snapshot::default()
            };
            let at = start + std::time::Duration::from_millis(i as u64);
            versions.push((hub.update_seen(snapshot, Vec::new(), at), at));
        }
        let table = hub.current();
        assert_eq!(
            table.seen(),
            &versions[versions.len() - SEEN_VERSIONS..],
            "the last {SEEN_VERSIONS} versions, oldest first, each with its own time"
        );
    }

    #[test]
    fn the_hub_publishes_the_changed_routes_as_the_step_from_the_previous_version() {
        use crate::model::ObjectKey;
        use crate::routing::PolicyInput;
        let hub = Hub::new(1);
        let policy = |name: &str, host: &str| {
            let spec = serde_json::from_value(serde_json::json!({
                "hosts": [host], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }))
            .expect("spec");
            Arc::new(PolicyInput {
                key: ObjectKey::new("default", name),
                source: format!("{name}.yaml"),
                generation: None,
                spec: Ok(spec),
            })
        };
        let mut snapshot = Snapshot {
            policies: vec![policy("a", "a"), policy("b", "b")],
            ..Snapshot::default()
        };
        let v1 = hub.update(snapshot.clone(), Vec::new());
        let first = hub.current();
        snapshot.policies[1] = policy("b", "b2");
        let v2 = hub.update(snapshot.clone(), Vec::new());
        assert!(v2 > v1);
        let second = hub.current();
        assert!(Arc::ptr_eq(
            &first.routes["default/a"],
            &second.routes["default/a"]
        ));
        let update = decode(&second.delta_message(&first));
        let names: Vec<_> = update.upserted.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default/b"]);
        assert_eq!(update, delta(&first, &second));
        assert_eq!(
            hub.update(snapshot, Vec::new()),
            v2,
            "nothing changed, no version"
        );
    }
}
