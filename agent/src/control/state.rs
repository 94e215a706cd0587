//! The agent's shared state and its single mutator.
//!
//! The routing table lives in an `ArcSwap`: workers read it without locks, and
//! [`Shared::apply`] is the only writer — it builds the next table from an update (full or a
//! delta on top of the table in force) and swaps it in whole. A delta costs work in
//! proportion to the routes it names: the others are shared with the table in force (see
//! [`crate::route::table`]), and the endpoints no route uses any more are found from a count
//! of uses per address rather than a sweep of the table. An update that cannot be applied
//! leaves the table in force untouched and becomes a NACK.
//!
//! Persistence to `--state-dir` (static stability: a restarted agent serves before any
//! controller answers) is off the apply path: [`persist_loop`] writes the newest applied
//! table in the background, at most once per [`PERSIST_EVERY`], so a burst of updates costs
//! one write. A crash can therefore lose the updates of the last [`PERSIST_EVERY`] (plus the
//! write itself): the agent then starts from a slightly older table until a controller
//! answers, which it would have to do anyway. Two exceptions: the first table a process
//! applies is written before it is ACKed ([`Shared::persist_first`]), so a crash never
//! leaves a fresh agent with no table at all; and a clean shutdown writes the pending one
//! ([`Shared::flush_persisted`]).

use crate::health::{Endpoints, Event, now_ms};
use crate::metrics::Metrics;
use crate::route::Routing;
use crate::route::table::{BuildCtx, RouteRt, Table, TableError};
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weir_proto::v1::RoutingUpdate;

/// File name of the persisted table inside `--state-dir`.
pub(crate) const STATE_FILE: &str = "routing-table.pb";

/// Shortest time between two writes of the persisted table: bounds the disk work of a burst
/// of updates, and is what a crash may lose.
pub(crate) const PERSIST_EVERY: Duration = Duration::from_millis(250);

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
    /// Version of the table last written to `--state-dir` by this process (persistence is
    /// asynchronous, so it may trail `version` by up to [`PERSIST_EVERY`]).
    pub(crate) persisted_version: Option<u64>,
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

/// What only the mutator touches, behind its lock.
#[derive(Default)]
struct Writer {
    /// Per endpoint address, how many rule members of the table in force name it; an
    /// address that drops to zero is forgotten (its health state and metric series).
    uses: HashMap<SocketAddr, usize>,
    /// Counts applied controller tables, to tell the persister which one is newest
    /// (controller versions restart with the controller, so they cannot).
    generation: u64,
}

impl Writer {
    /// Accounts for `old` leaving the table and `new` entering it; returns the addresses
    /// whose last use `old` was.
    fn replace(&mut self, old: Option<&RouteRt>, new: Option<&RouteRt>) -> Vec<SocketAddr> {
        let addrs = |rt: Option<&RouteRt>| {
            rt.into_iter()
                .flat_map(|r| r.rules.iter())
                .flat_map(|rule| rule.members.iter().map(|m| m.addr))
                .collect::<Vec<_>>()
        };
        // Count the new uses first, so an endpoint that stays does not pass through zero.
        for a in addrs(new) {
            *self.uses.entry(a).or_default() += 1;
        }
        let mut gone = Vec::new();
        for a in addrs(old) {
            if let Some(n) = self.uses.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    self.uses.remove(&a);
                    gone.push(a);
                }
            }
        }
        gone
    }
}

/// The newest applied table for the persister: (generation, table).
type Latest = Option<(u64, Arc<Table>)>;

/// Reads `--cache-peer-addr`: `IP:port`, where an IPv6 address may come bracketed
/// (`[fd00::5]:15001`) or bare (`fd00::5:15001`, what `$(POD_IP):15001` gives on an IPv6
/// pod: the port is the part after the last colon).
pub fn parse_cache_peer_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let bad = || format!("{text:?} is not an IP:port (e.g. 10.0.0.5:15001 or [fd00::5]:15001)");
    let (ip, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip: std::net::IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

pub struct Shared {
    pub(crate) node_name: String,
    pub(crate) zone: String,
    /// `--cache-peer-addr`: where other agents reach this one for cache peer fills.
    pub(crate) cache_peer_address: Option<SocketAddr>,
    /// The controller's cache peer list (node → address), what its deltas apply to.
    peer_list: Mutex<BTreeMap<String, String>>,
    /// What the request path reads: the table in force, the counters, endpoint health.
    pub(crate) routing: Arc<Routing>,
    ready: AtomicBool,
    /// Set on SIGTERM: not ready any more, whatever the table.
    draining: AtomicBool,
    status: Mutex<ControlStatus>,
    state_dir: Option<PathBuf>,
    /// Serialises table builds (controller updates and health rebuilds); never taken on the
    /// request path.
    writer: Mutex<Writer>,
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    /// Woken when a controller update installs a new table.
    pub(crate) table_changed: tokio::sync::Notify,
    /// The newest table to persist; a watch keeps only the latest, which is the coalescing.
    latest: watch::Sender<Latest>,
    /// The generation last written; held during a write, so the background writer and a
    /// shutdown flush never write the temp file at the same time.
    written: tokio::sync::Mutex<u64>,
}

impl Shared {
    pub fn new(node_name: String, zone: String, state_dir: Option<PathBuf>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            node_name,
            zone,
            cache_peer_address: None,
            peer_list: Mutex::default(),
            routing: Arc::new(Routing::new(Metrics::new(), Endpoints::new(tx))),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            status: Mutex::new(ControlStatus::default()),
            state_dir,
            writer: Mutex::new(Writer::default()),
            events: Mutex::new(Some(rx)),
            table_changed: tokio::sync::Notify::new(),
            latest: watch::Sender::new(None),
            written: tokio::sync::Mutex::new(0),
        }
    }

    /// Serves cache peer fills at `addr` (`--cache-peer-addr`): the controller then sends
    /// this agent its zone's peers.
    pub fn with_cache_peer_address(mut self, addr: Option<SocketAddr>) -> Self {
        self.cache_peer_address = addr;
        self
    }

    /// Puts the controller's cache peer list (whole, or a delta on the last one) in force; a
    /// peer it cannot use is logged.
    pub(crate) fn set_peers(&self, msg: weir_proto::v1::CachePeers) {
        if self.cache_peer_address.is_none() {
            return; // not asked for: this agent takes no part
        }
        let (set, errors) = {
            let mut held = self.peer_list.lock().unwrap_or_else(|e| e.into_inner());
            if !msg.delta {
                held.clear();
            }
            for gone in &msg.removed {
                held.remove(gone);
            }
            for p in msg.peers {
                held.insert(p.node_name, p.address);
            }
            let list = held.iter().map(|(n, a)| (n.as_str(), a.as_str()));
            crate::route::PeerSet::new(list, &self.node_name)
        };
        for e in errors {
            tracing::warn!(error = %e, "cache peer left out");
        }
        tracing::info!(peers = set.peers.len(), "cache peer set in force");
        self.routing.set_peers(set);
    }

    /// What the request path reads, for a listener's workers.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.clone()
    }

    /// The health events channel, for the one task that reacts to them.
    pub(crate) fn take_events(&self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ctx<'a>(&'a self, previous: &'a Table) -> BuildCtx<'a> {
        BuildCtx {
            previous: Some(previous),
            metrics: &self.routing.metrics,
            endpoints: &self.routing.endpoints,
            zone: &self.zone,
            now_ms: now_ms(),
        }
    }

    /// Rebuilds the table in force with the current health view (after a health
    /// transition). Cannot fail for a table that built before, but if it does the old one
    /// stays. The routes and their endpoints stay the same, so nothing is forgotten.
    pub(crate) fn rebuild(&self) {
        let _w = self.lock_writer();
        let current = self.routing.table.load_full();
        if current.is_empty() && !self.is_ready() {
            return;
        }
        match current.rebuild(&self.ctx(&current)) {
            Ok(t) => self.routing.table.store(Arc::new(t)),
            Err(e) => {
                tracing::error!(error = %e, "health rebuild failed; keeping the table in force")
            }
        }
    }

    /// Ready once any routing table is in force (`/readyz` also asks [`Self::is_draining`]).
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The agent is shutting down: `/readyz` answers not-ready from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
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
    /// is what the NACK says. The table is persisted later, in the background.
    pub(crate) fn apply(&self, update: RoutingUpdate) -> Result<Arc<Table>, ApplyError> {
        let mut w = self.lock_writer();
        let current = self.routing.table.load_full();
        let ctx = self.ctx(&current);
        let (built, named) = if update.full {
            (Table::build(update.version, update.upserted, &ctx), None)
        } else {
            if update.base_version != current.version {
                return Err(ApplyError::BaseVersion {
                    base: update.base_version,
                    applied: current.version,
                });
            }
            let named: BTreeSet<String> = update
                .removed
                .iter()
                .cloned()
                .chain(update.upserted.iter().map(|r| r.name.clone()))
                .collect();
            let built = current.apply_delta(update.version, update.upserted, &update.removed, &ctx);
            (built, Some(named))
        };
        let table = match built {
            Ok(t) => Arc::new(t),
            Err(e) => {
                // The failed build may have registered endpoints no table uses.
                self.routing
                    .endpoints
                    .retain(|a| w.uses.contains_key(a), &self.routing.metrics);
                return Err(e.into());
            }
        };
        self.commit(&mut w, &current, &table, named.as_ref());
        self.install(table.clone(), TableSource::Controller);
        w.generation += 1;
        self.latest
            .send_replace(Some((w.generation, table.clone())));
        Ok(table)
    }

    /// Forgets what `next` no longer uses of `current`: the metric series of removed routes
    /// and the endpoints no route names any more. `named`: the only routes that can differ
    /// (a delta's), or `None` for all of them.
    fn commit(
        &self,
        w: &mut Writer,
        current: &Table,
        next: &Table,
        named: Option<&BTreeSet<String>>,
    ) {
        let all: BTreeSet<String>;
        let names = match named {
            Some(n) => n,
            None => {
                all = current
                    .routes()
                    .chain(next.routes())
                    .map(|r| r.name.to_string())
                    .collect();
                &all
            }
        };
        let mut gone = Vec::new();
        for name in names {
            let (old, new) = (current.get(name), next.get(name));
            if let (Some(o), Some(n)) = (old, new)
                && Arc::ptr_eq(o, n)
            {
                continue;
            }
            if old.is_some() && new.is_none() {
                self.routing.metrics.forget_route(name);
            }
            gone.extend(w.replace(old.map(|r| &**r), new.map(|r| &**r)));
        }
        // An address may have left one route and joined another later in the loop.
        gone.retain(|a| !w.uses.contains_key(a));
        if !gone.is_empty() {
            self.routing.endpoints.forget(&gone, &self.routing.metrics);
        }
    }

    fn install(&self, table: Arc<Table>, source: TableSource) {
        self.routing.metrics.table_version.set(table.version as i64);
        tracing::info!(
            version = table.version,
            routes = table.len(),
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
        let mut w = self.lock_writer();
        let current = self.routing.table.load_full();
        let built = RoutingUpdate::decode(bytes.as_slice())
            .map_err(PersistedError::from)
            .and_then(|u| Ok(Table::build(u.version, u.upserted, &self.ctx(&current))?));
        match built {
            Ok(table) => {
                tracing::info!(path = %path.display(), version = table.version, "serving the persisted routing table until a controller answers");
                let table = Arc::new(table);
                self.commit(&mut w, &current, &table, None);
                self.install(table, TableSource::StateDir);
            }
            Err(e) => {
                self.routing
                    .endpoints
                    .retain(|a| w.uses.contains_key(a), &self.routing.metrics);
                tracing::warn!(path = %path.display(), error = %e, "persisted routing table is unusable; ignoring it");
            }
        }
    }

    /// Writes the newest applied table to the state dir now if it is not there yet (for a
    /// clean shutdown; [`persist_loop`] does it otherwise).
    pub async fn flush_persisted(&self) {
        let _ = self.write_latest().await;
    }

    /// Before the first ACK of this process: writes the table just applied now unless one
    /// was written already. An agent that crashes right after its first table would
    /// otherwise restart with none at all (or a much older one), which is worse than the
    /// one interval a later crash loses; it costs one write per process.
    pub(crate) async fn persist_first(&self) {
        if self.state_dir.is_some() && *self.written.lock().await == 0 {
            self.write_latest().await;
        }
    }

    /// Writes the newest applied table unless it was written already; true if it wrote
    /// (or tried to).
    async fn write_latest(&self) -> bool {
        let Some(dir) = self.state_dir.clone() else {
            return false;
        };
        let mut written = self.written.lock().await;
        let Some((generation, table)) = self.latest.borrow().clone() else {
            return false;
        };
        if generation <= *written {
            return false;
        }
        let version = table.version;
        // Encoding walks the whole table: off the control thread, like the write.
        let res =
            tokio::task::spawn_blocking(move || write_atomically(&dir, &encode_table(&table)))
                .await;
        match res {
            Ok(Ok(())) => {
                *written = generation;
                self.set_status(|s| s.persisted_version = Some(version));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot persist routing table"),
            Err(e) => tracing::warn!(error = %e, "persisting task failed"),
        }
        true
    }
}

/// Persists the newest applied table whenever one is applied, at most once per
/// [`PERSIST_EVERY`]: the first update after a quiet spell is written at once, the rest of a
/// burst is coalesced into one write of its newest table. Runs until the process ends; what a
/// crash loses is described in the module documentation.
pub async fn persist_loop(shared: Arc<Shared>) {
    if shared.state_dir.is_none() {
        return;
    }
    let mut latest = shared.latest.subscribe();
    // A table applied before this task subscribed is written at once.
    latest.mark_changed();
    loop {
        if latest.changed().await.is_err() {
            return;
        }
        if shared.write_latest().await {
            tokio::time::sleep(PERSIST_EVERY).await;
        }
    }
}

/// The table as the full `RoutingUpdate` it amounts to, encoded straight from the routes it
/// keeps (no copy of them).
fn encode_table(table: &Table) -> Vec<u8> {
    let mut buf = Vec::new();
    prost::encoding::uint64::encode(1, &table.version, &mut buf);
    prost::encoding::bool::encode(2, &true, &mut buf);
    for rt in table.routes() {
        prost::encoding::message::encode(4, &*rt.source, &mut buf);
    }
    buf
}

fn write_atomically(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    // Named after the process: during a hand-off (listen::handoff) the old and the new agent
    // share the state dir, and one fixed name would let their writes interleave in it.
    let tmp = dir.join(format!("{STATE_FILE}.{}.tmp", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(STATE_FILE))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_peer_list_delta_applies_to_the_list_last_received() {
        use weir_proto::v1::{CachePeer, CachePeers};
        let peer = |n: &str, a: &str| CachePeer {
            node_name: n.into(),
            address: a.into(),
        };
        let s = super::Shared::new("n1".into(), String::new(), None)
            .with_cache_peer_address(Some("127.0.0.1:1".parse().expect("addr")));
        let held = |s: &super::Shared| -> Vec<(String, String)> {
            let set = s.routing.peers.load();
            set.peers
                .iter()
                .map(|p| (p.node.to_string(), p.addr.to_string()))
                .collect()
        };
        s.set_peers(CachePeers {
            peers: vec![
                peer("n1", "127.0.0.1:1"),
                peer("n2", "127.0.0.1:2"),
                peer("n3", "127.0.0.1:3"),
            ],
            ..Default::default()
        });
        assert_eq!(held(&s).len(), 3);
        s.set_peers(CachePeers {
            peers: vec![peer("n3", "127.0.0.1:33"), peer("n4", "127.0.0.1:4")],
            delta: true,
            removed: vec!["n2".into()],
        });
        let want = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(n, a)| (n.to_string(), a.to_string()))
                .collect()
        };
        assert_eq!(
            held(&s),
            want(&[
                ("n1", "127.0.0.1:1"),
                ("n3", "127.0.0.1:33"),
                ("n4", "127.0.0.1:4")
            ])
        );
        // A whole list replaces it.
        s.set_peers(CachePeers {
            peers: vec![peer("n1", "127.0.0.1:1"), peer("n5", "127.0.0.1:5")],
            ..Default::default()
        });
        assert_eq!(
            held(&s),
            want(&[("n1", "127.0.0.1:1"), ("n5", "127.0.0.1:5")])
        );
    }

    #[test]
    fn a_cache_peer_address_may_be_a_bare_ipv6_pod_ip_and_port() {
        use super::parse_cache_peer_address as parse;
        assert_eq!(
            parse("10.0.0.5:15001").unwrap().to_string(),
            "10.0.0.5:15001"
        );
        assert_eq!(
            parse("[fd00::5]:15001").unwrap().to_string(),
            "[fd00::5]:15001"
        );
        assert_eq!(
            parse("fd00::5:15001").unwrap().to_string(),
            "[fd00::5]:15001"
        );
        for bad in ["", "10.0.0.5", "node-a:15001", "fd00::5", "10.0.0.5:99999"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;
    use weir_proto::v1::Route;

    fn route(name: &str, host: &str) -> Route {
        Route {
            name: name.into(),
            hosts: vec![host.into()],
            ..Default::default()
        }
    }

    /// A route with one rule over `endpoints` (all ready, weight 1).
    fn route_to(name: &str, host: &str, endpoints: &[&str]) -> Route {
        Route {
            rules: vec![weir_proto::v1::Rule {
                backends: vec![weir_proto::v1::Backend {
                    service: "svc".into(),
                    weight: 1,
                    endpoints: endpoints
                        .iter()
                        .map(|a| weir_proto::v1::Endpoint {
                            address: a.to_string(),
                            ready: true,
                            weight: 1,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..route(name, host)
        }
    }

    fn delta(version: u64, upserted: Vec<Route>, removed: &[&str]) -> RoutingUpdate {
        RoutingUpdate {
            version,
            base_version: version - 1,
            upserted,
            removed: removed.iter().map(|r| r.to_string()).collect(),
            ..Default::default()
        }
    }

    fn known_endpoints(s: &Shared) -> Vec<String> {
        let mut v: Vec<String> = s
            .routing
            .endpoints
            .all()
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        v.sort();
        v
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
        assert_eq!(t.routes().map(|r| &*r.name).collect::<Vec<_>>(), ["b", "c"]);
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
        s.apply(full(7, vec![route("a", "a")])).expect("full");
        s.flush_persisted().await;
        assert_eq!(s.status().persisted_version, Some(7));
        let restarted = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        assert!(!restarted.is_ready());
        restarted.load_persisted();
        assert!(restarted.is_ready());
        assert_eq!(restarted.routing.table.load().version, 7);
        assert_eq!(restarted.status().table_source, TableSource::StateDir);
    }

    #[test]
    fn a_delta_rebuilds_only_the_routes_it_names() {
        let s = Shared::new("n".into(), String::new(), None);
        let routes = (0..1000)
            .map(|i| route_to(&format!("r{i:04}"), &format!("h{i}"), &["10.0.0.1:80"]))
            .collect();
        let before = s.apply(full(1, routes)).expect("full");
        let mut changed = route_to("r0007", "h7", &["10.0.0.1:80", "10.0.0.2:80"]);
        changed.min_healthy_percent = 50;
        let after = s
            .apply(delta(
                2,
                vec![changed, route_to("new", "new", &["10.0.0.3:80"])],
                &["r0500"],
            ))
            .expect("delta");
        assert_eq!(after.len(), 1000);
        let rebuilt: Vec<&str> = after
            .routes()
            .filter(|r| before.get(&r.name).is_none_or(|b| !Arc::ptr_eq(b, r)))
            .map(|r| &*r.name)
            .collect();
        assert_eq!(rebuilt, ["new", "r0007"]);
        assert!(after.get("r0500").is_none() && after.route("h500").is_none());
        assert_eq!(
            after.route("h7").expect("h7").source.min_healthy_percent,
            50
        );
        assert!(Arc::ptr_eq(
            after.route("h8").expect("h8"),
            before.route("h8").expect("h8")
        ));
        // A full table equal to the one in force shares every route too.
        let again: Vec<Route> = after.routes().map(|r| (*r.source).clone()).collect();
        let same = s.apply(full(3, again)).expect("full again");
        assert!(
            same.routes()
                .all(|r| Arc::ptr_eq(r, after.get(&r.name).expect("kept")))
        );
        assert_eq!(same.version, 3);
    }

    #[test]
    fn hosts_may_move_between_routes_of_one_delta_but_not_onto_an_untouched_route() {
        let s = Shared::new("n".into(), String::new(), None);
        s.apply(full(1, vec![route("a", "x"), route("b", "y")]))
            .expect("full");
        let t = s
            .apply(delta(2, vec![route("a", "y"), route("b", "x")], &[]))
            .expect("swap hosts");
        assert_eq!(&*t.route("x").expect("x").name, "b");
        let err = s
            .apply(delta(3, vec![route("c", "x")], &[]))
            .expect_err("x belongs to b");
        assert!(matches!(
            err,
            ApplyError::Table(TableError::DuplicateHost { .. })
        ));
        assert_eq!(s.routing.table.load().version, 2);
        assert!(s.routing.table.load().get("c").is_none());
    }

    #[test]
    fn endpoint_health_carries_over_a_delta_that_rebuilds_its_route() {
        let s = Shared::new("n".into(), String::new(), None);
        let t = s
            .apply(full(
                1,
                vec![route_to("a", "a", &["10.0.0.1:80", "10.0.0.2:80"])],
            ))
            .expect("full");
        let sick = t.get("a").expect("a").rules[0].members[0].clone();
        sick.set_active(false, "HTTP 500");
        sick.load.start();
        s.rebuild();
        let t = s
            .apply(delta(
                2,
                vec![route_to(
                    "a",
                    "a",
                    &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
                )],
                &[],
            ))
            .expect("delta");
        let rule = &t.get("a").expect("a").rules[0];
        assert!(Arc::ptr_eq(&rule.members[0], &sick), "same health state");
        assert_eq!(rule.members[0].load.in_flight(), 1);
        assert!(!rule.effective.backends[0].endpoints[0].ready);
        assert!(
            rule.targets.iter().all(|t| t.addr != sick.addr),
            "the failing endpoint still takes no traffic"
        );
    }

    #[test]
    fn endpoints_are_forgotten_when_their_last_route_goes() {
        let s = Shared::new("n".into(), String::new(), None);
        s.apply(full(
            1,
            vec![
                route_to("a", "a", &["10.0.0.1:80", "10.0.0.2:80"]),
                route_to("b", "b", &["10.0.0.2:80"]),
            ],
        ))
        .expect("full");
        s.apply(delta(2, vec![], &["a"])).expect("remove a");
        assert_eq!(known_endpoints(&s), ["10.0.0.2:80"]);
        // Moving an endpoint from one route to another keeps it.
        s.apply(delta(
            3,
            vec![
                route_to("b", "b", &["10.0.0.3:80"]),
                route_to("c", "c", &["10.0.0.2:80"]),
            ],
            &[],
        ))
        .expect("move");
        assert_eq!(known_endpoints(&s), ["10.0.0.2:80", "10.0.0.3:80"]);
        // A rejected update leaves no endpoint of its own behind.
        s.apply(delta(
            4,
            vec![
                route_to("d", "d", &["10.0.0.9:80"]),
                route_to("e", "d", &["10.0.0.8:80"]),
            ],
            &[],
        ))
        .expect_err("duplicate host");
        assert_eq!(known_endpoints(&s), ["10.0.0.2:80", "10.0.0.3:80"]);
        s.apply(full(5, vec![route_to("z", "z", &["10.0.0.4:80"])]))
            .expect("full");
        assert_eq!(known_endpoints(&s), ["10.0.0.4:80"]);
    }

    #[tokio::test]
    async fn many_quick_applies_leave_the_newest_table_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Arc::new(Shared::new(
            "n".into(),
            String::new(),
            Some(dir.path().into()),
        ));
        let persister = tokio::spawn(persist_loop(s.clone()));
        s.apply(full(1, vec![route("a", "a")])).expect("full");
        for v in 2..=200 {
            s.apply(delta(
                v,
                vec![route(&format!("r{v}"), &format!("h{v}"))],
                &[],
            ))
            .expect("delta");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while s.status().persisted_version != Some(200) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "persisted: {:?}",
                s.status().persisted_version
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        persister.abort();
        let bytes = std::fs::read(dir.path().join(STATE_FILE)).expect("state file");
        let u = RoutingUpdate::decode(bytes.as_slice()).expect("decode");
        assert_eq!(u.version, 200);
        assert!(u.full);
        assert_eq!(u.upserted.len(), 200);
        let restarted = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        restarted.load_persisted();
        assert_eq!(restarted.routing.table.load().len(), 200);
    }

    #[tokio::test]
    async fn a_flush_writes_only_what_is_not_on_disk_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        s.flush_persisted().await;
        assert!(!dir.path().join(STATE_FILE).exists(), "nothing applied yet");
        s.apply(full(3, vec![route("a", "a")])).expect("full");
        s.flush_persisted().await;
        let path = dir.path().join(STATE_FILE);
        std::fs::remove_file(&path).expect("written, then removed");
        s.flush_persisted().await;
        assert!(!path.exists(), "the table in force was written already");
    }

    #[tokio::test]
    async fn only_the_first_table_is_written_before_its_ack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Shared::new("n".into(), String::new(), Some(dir.path().into()));
        s.apply(full(1, vec![route("a", "a")])).expect("full");
        s.persist_first().await;
        assert_eq!(s.status().persisted_version, Some(1));
        s.apply(delta(2, vec![route("b", "b")], &[]))
            .expect("delta");
        s.persist_first().await;
        assert_eq!(
            s.status().persisted_version,
            Some(1),
            "later tables are left to the background writer"
        );
    }
}
