//! The controller's single mutator: takes snapshots of objects from a source, runs the pure
//! routing computation, and publishes a new versioned table when the result changed.
//!
//! Agents' sessions subscribe to a `watch` channel, which holds only the latest table: a slow
//! agent skips intermediate versions instead of queueing them, and never delays the others.
//! Errors are logged once when they appear, and kept for `/state`.

use crate::routing::{self, Computed, LastGood, PolicyState, Snapshot};
use crate::source::FileReport;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use weir_proto::v1::Route;

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
        inner.state = ConfigState {
            version,
            loaded: true,
            files,
            policies: policies
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        };
        version
    }
}
