//! The controller's single mutator: takes snapshots of objects from a source, runs the pure
//! routing computation, and publishes a new versioned table when the result changed.
//!
//! Agents' sessions subscribe to a `watch` channel, which holds only the latest table: a slow
//! agent skips intermediate versions instead of queueing them, and never delays the others.
//! Errors are logged once when they appear, and kept for `/state`.

use crate::routing::{self, Computed, LastGood, PolicyState, Snapshot};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use weir_proto::v1::Route;

/// A problem with one manifest file, as shown in the admin API.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FileReport {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One published routing table. Routes are shared by pointer between versions, so a session
/// diffs two tables by comparing only the routes whose pointers differ.
#[derive(Debug, Default)]
pub struct Table {
    pub version: u64,
    pub routes: BTreeMap<String, Arc<Route>>,
}

/// What `/state` shows about the configuration.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigState {
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
}

/// A policy generation and the first table version carrying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub generation: i64,
    pub since_version: u64,
}

/// Which version first carries each programmed policy's generation, given what was known
/// before (`previous`) and the table `version` in force after an update. A generation seen
/// before keeps its version; a new one (or a policy newly programmed) gets `version`.
/// Policies without a generation (local mode) count as generation 0.
pub fn carried_since(
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
    last_good: LastGood,
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
                last_good: LastGood::default(),
                state: ConfigState::default(),
                logged: BTreeSet::new(),
                next_version: first_version.max(1),
            }),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Table>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Table> {
        self.tx.borrow().clone()
    }

    pub fn config_state(&self) -> ConfigState {
        self.lock().state.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock would be a bug elsewhere; the data is still
        // consistent (each field is replaced whole), so keep serving rather than poison.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Recomputes routing from `snapshot`; publishes a new version if any route changed.
    /// Returns the version in force afterwards.
    pub fn update(&self, snapshot: &Snapshot, files: Vec<FileReport>) -> u64 {
        let mut inner = self.lock();
        let Computed {
            routes,
            policies,
            last_good,
        } = routing::compute(snapshot, &inner.last_good);
        inner.last_good = last_good;

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
        for (key, p) in &policies {
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
        inner.logged = seen;

        let current = self.current();
        let mut next = BTreeMap::new();
        let mut changed = current.routes.len() != routes.len();
        for route in routes {
            let shared = match current.routes.get(&route.name) {
                Some(old) if **old == route => old.clone(),
                _ => {
                    changed = true;
                    Arc::new(route)
                }
            };
            next.insert(shared.name.clone(), shared);
        }
        let version = if changed || !inner.state.loaded {
            let version = inner.next_version;
            inner.next_version += 1;
            let table = Arc::new(Table {
                version,
                routes: next,
            });
            tracing::info!(
                version,
                routes = table.routes.len(),
                "routing table published"
            );
            self.tx.send_replace(table);
            version
        } else {
            current.version
        };
        let policies: BTreeMap<String, PolicyState> = policies
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let carried = carried_since(&inner.state.carried, &policies, version);
        inner.state = ConfigState {
            version,
            loaded: true,
            files,
            policies,
            carried,
        };
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
}
