//! The agent's shared state and its single mutator.
//!
//! The routing table lives in an `ArcSwap`: workers read it without locks, and
//! [`Shared::apply`] is the only writer — it builds the next table from an update (full or a
//! delta on top of the table in force), swaps it in whole, and persists it to `--state-dir`
//! so a restarted agent can serve before any controller answers (static stability). An update
//! that cannot be applied leaves the table in force untouched and becomes a NACK.

use crate::health::{Endpoints, Event, now_ms};
use crate::metrics::Metrics;
use crate::route::Routing;
use crate::route::table::{BuildCtx, Table, TableError};
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use weir_proto::v1::RoutingUpdate;

/// File name of the persisted table inside `--state-dir`.
pub(crate) const STATE_FILE: &str = "routing-table.pb";

/// Where the table in force came from.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TableSource {
    #[default]
    None,
    Controller,
    StateDir,
}

/// What `/config` shows about the control connection.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ControlStatus {
    pub(crate) table_source: TableSource,
    /// The controller the stream is open to, if any.
    pub(crate) connected_to: Option<String>,
    pub(crate) last_error: Option<String>,
    pub(crate) last_nack: Option<NackStatus>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NackStatus {
    pub(crate) version: u64,
    pub(crate) error: String,
}

/// Why an update from the controller was not applied (what its NACK says).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error("delta on top of version {base} but version {applied} is applied")]
    BaseVersion { base: u64, applied: u64 },
    #[error(transparent)]
    Table(#[from] TableError),
}

/// Why the table persisted under `--state-dir` cannot be served.
#[derive(Debug, thiserror::Error)]
enum PersistedError {
    #[error("cannot decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Table(#[from] TableError),
}

pub struct Shared {
    pub(crate) node_name: String,
    pub(crate) zone: String,
    /// What the request path reads: the table in force, the counters, endpoint health.
    pub(crate) routing: Arc<Routing>,
    ready: AtomicBool,
    status: Mutex<ControlStatus>,
    state_dir: Option<PathBuf>,
    /// Serialises table builds (controller updates and health rebuilds); never taken on the
    /// request path.
    writer: Mutex<()>,
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// Woken when a controller update installs a new table.
    pub(crate) table_changed: tokio::sync::Notify,
}

impl Shared {
    pub fn new(node_name: String, zone: String, state_dir: Option<PathBuf>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            node_name,
            zone,
            routing: Arc::new(Routing::new(Metrics::new(), Endpoints::new(tx))),
            ready: AtomicBool::new(false),
            status: Mutex::new(ControlStatus::default()),
            state_dir,
            writer: Mutex::new(()),
            events: Mutex::new(Some(rx)),
            table_changed: tokio::sync::Notify::new(),
        }
    }

    /// What the request path reads, for a listener's workers.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.clone()
    }

    /// The health events channel, for the one task that reacts to them.
    pub(crate) fn take_events(&self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn build(
        &self,
        version: u64,
        source: Arc<BTreeMap<String, weir_proto::v1::Route>>,
    ) -> Result<Table, TableError> {
        let previous = self.routing.table.load_full();
        let ctx = BuildCtx {
            previous: Some(&previous),
            metrics: &self.routing.metrics,
            endpoints: &self.routing.endpoints,
            zone: &self.zone,
            now_ms: now_ms(),
        };
        Table::build(version, source, &ctx)
    }

    /// Rebuilds the table in force with the current health view (after a health
    /// transition). Cannot fail for a table that built before, but if it does the old one
    /// stays.
    pub(crate) fn rebuild(&self) {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routing.table.load_full();
        if current.source.is_empty() && !self.is_ready() {
            return;
        }
        match self.build(current.version, current.source.clone()) {
            Ok(t) => self.routing.table.store(Arc::new(t)),
            Err(e) => {
                tracing::error!(error = %e, "health rebuild failed; keeping the table in force")
            }
        }
    }

    /// Ready once any routing table is in force.
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn status(&self) -> ControlStatus {
        self.lock_status().clone()
    }

    pub(crate) fn set_status(&self, f: impl FnOnce(&mut ControlStatus)) {
        f(&mut self.lock_status());
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, ControlStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies an update from the controller. On error nothing changes and the message
    /// is what the NACK says.
    pub(crate) fn apply(&self, update: RoutingUpdate) -> Result<Arc<Table>, ApplyError> {
        let _w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.routing.table.load_full();
        let source: BTreeMap<String, weir_proto::v1::Route> = if update.full {
            update
                .upserted
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect()
        } else {
            if update.base_version != current.version {
                return Err(ApplyError::BaseVersion {
                    base: update.base_version,
                    applied: current.version,
                });
            }
            let mut source = (*current.source).clone();
            for name in &update.removed {
                source.remove(name);
            }
            for r in update.upserted {
                source.insert(r.name.clone(), r);
            }
            source
        };
        let table = self.build(update.version, Arc::new(source))?;
        for name in current.source.keys() {
            if !table.source.contains_key(name) {
                self.routing.metrics.forget_route(name);
            }
        }
        self.forget_unused_endpoints(&table);
        let table = Arc::new(table);
        self.install(table.clone(), TableSource::Controller);
        Ok(table)
    }

    fn forget_unused_endpoints(&self, table: &Table) {
        let used: HashSet<std::net::SocketAddr> = table
            .routes()
            .iter()
            .flat_map(|r| r.rules.iter())
            .flat_map(|rule| rule.members.iter().map(|m| m.addr))
            .collect();
        self.routing
            .endpoints
            .retain(|a| used.contains(a), &self.routing.metrics);
    }

    fn install(&self, table: Arc<Table>, source: TableSource) {
        self.routing.metrics.table_version.set(table.version as i64);
        tracing::info!(
            version = table.version,
            routes = table.source.len(),
            ?source,
            "routing table applied"
        );
        self.routing.table.store(table);
        self.ready.store(true, Ordering::Release);
        self.set_status(|s| s.table_source = source);
        self.table_changed.notify_one();
    }

    /// Serves the table persisted by a previous run, if there is a usable one.
    pub fn load_persisted(&self) {
        let Some(dir) = &self.state_dir else { return };
        let path = dir.join(STATE_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read persisted routing table");
                return;
            }
        };
        let built = RoutingUpdate::decode(bytes.as_slice())
            .map_err(PersistedError::from)
            .and_then(|u| {
                let source = u
                    .upserted
                    .into_iter()
                    .map(|r| (r.name.clone(), r))
                    .collect();
                Ok(self.build(u.version, Arc::new(source))?)
            });
        match built {
            Ok(table) => {
                tracing::info!(path = %path.display(), version = table.version, "serving the persisted routing table until a controller answers");
                self.install(Arc::new(table), TableSource::StateDir);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "persisted routing table is unusable; ignoring it");
            }
        }
    }

    /// Writes `table` to the state dir atomically (temp file, fsync, rename), so a crash
    /// mid-write never leaves a torn table behind.
    pub(crate) async fn persist(&self, table: &Table) {
        let Some(dir) = self.state_dir.clone() else {
            return;
        };
        let bytes = RoutingUpdate {
            version: table.version,
            full: true,
            base_version: 0,
            upserted: table.source.values().cloned().collect(),
            removed: Vec::new(),
        }
        .encode_to_vec();
        let res = tokio::task::spawn_blocking(move || write_atomically(&dir, &bytes)).await;
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist routing table"),
            Err(e) => tracing::warn!(error = %e, "persisting task failed"),
        }
    }
}

fn write_atomically(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::v1::Route;

    fn route(name: &str, host: &str) -> Route {
        Route {
            name: name.into(),
            hosts: vec![host.into()],
            ..Default::default()
        }
    }

    fn full(version: u64, routes: Vec<Route>) -> RoutingUpdate {
        RoutingUpdate {
            version,
            full: true,
            upserted: routes,
            ..Default::default()
        }
    }

    #[test]
    fn delta_applies_on_top_of_the_table_in_force() {
        let s = Shared::new("n".into(), String::new(), None);
        s.apply(full(1, vec![route("a", "a"), route("b", "b")]))
            .expect("full");
        let t = s
            .apply(RoutingUpdate {
                version: 2,
                base_version: 1,
                upserted: vec![route("c", "c")],
                removed: vec!["a".into()],
                ..Default::default()
            })
            .expect("delta");
        assert_eq!(t.source.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(s.is_ready());
    }

    #[test]
    fn delta_on_the_wrong_base_is_rejected_and_changes_nothing() {
        let s = Shared::new("n".into(), String::new(), None);
        s.apply(full(1, vec![route("a", "a")])).expect("full");
        let err = s
            .apply(RoutingUpdate {
                version: 3,
                base_version: 2,
                ..Default::default()
            })
            .expect_err("nack");
        assert!(err.to_string().contains("version 1 is applied"), "{err}");
        assert_eq!(s.routing.table.load().version, 1);
    }

    #[test]
    fn invalid_update_keeps_the_previous_table() {
        let s = Shared::new("n".into(), String::new(), None);
        s.apply(full(1, vec![route("a", "a")])).expect("full");
        s.apply(full(2, vec![route("x", "dup"), route("y", "dup")]))
            .expect_err("duplicate host");
        assert_eq!(s.routing.table.load().version, 1);
    }

    #[tokio::test]
    async fn persisted_table_is_served_after_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        let t = s.apply(full(7, vec![route("a", "a")])).expect("full");
        s.persist(&t).await;
        let restarted = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        assert!(!restarted.is_ready());
        restarted.load_persisted();
        assert!(restarted.is_ready());
        assert_eq!(restarted.routing.table.load().version, 7);
        assert_eq!(restarted.status().table_source, TableSource::StateDir);
    }
}
