//! An agent simulator: thousands of fake agents in one process, each with its own real
//! `weir.v1.RoutingDiscovery/Stream` to a controller, speaking the real protocol (Hello, full
//! table then deltas, ACK, NACK on a `base_version` mismatch, reconnect with jittered
//! backoff). It owns what the scale benchmark and the scale test measure: which agent holds
//! which table, when each agent saw each endpoint readiness change, and how many bytes each
//! version cost.
//!
//! Memory is what limits a simulator of 10,000 agents × 1,000 routes, so agents do not keep
//! decoded routes. A route's content is identified by a 64-bit hash of its protobuf encoding
//! (prost's encoding is deterministic and `Route` has no map fields, so equal routes have
//! equal bytes) and interned once per process in a [`Catalog`] together with what the
//! measurements need (its name, and the `ready` flag of each endpoint address). An agent's
//! table is then one `u32` per route name. Updates are decoded with "lite" prost messages
//! that keep every upserted route as raw bytes, so an agent whose routes are already in the
//! catalog (every agent but the first, for a given change) only hashes bytes.
//!
//! Everything the controller sends is decoded by [`LiteUpdate`], whose `encoded_len` is the
//! original `RoutingUpdate`'s: the byte counts are the ones on the wire (before HTTP/2 and
//! gRPC framing).

use anyhow::Context;
use bytes::Bytes;
use prost::Message;
use rand::Rng;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use weir_proto::v1::{Ack, AgentMessage, Hello, Nack, Ping, agent_message};

/// Reconnect backoff, as the real agent does it: capped exponential with jitter.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The controller pings every 15 s; a stream silent for three pings is dead.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A full table of 1,000 routes × 10 endpoints is ~0.5 MB; leave room for much larger ones.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// A route name that is not in an agent's table.
const ABSENT: u32 = u32::MAX;

// ---------------------------------------------------------------- lite wire types

/// `weir.v1.ControllerMessage`, with updates decoded as [`LiteUpdate`].
#[derive(Clone, PartialEq, Message)]
pub struct LiteControllerMessage {
    #[prost(oneof = "LiteKind", tags = "1, 2, 3")]
    pub kind: Option<LiteKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum LiteKind {
    #[prost(message, tag = "1")]
    Update(LiteUpdate),
    #[prost(message, tag = "2")]
    Ping(Ping),
    #[prost(message, tag = "3")]
    Peers(LitePeers),
}

/// `weir.v1.CachePeers`.
#[derive(Clone, PartialEq, Message)]
pub struct LitePeers {
    #[prost(message, repeated, tag = "1")]
    pub peers: Vec<LitePeer>,
    #[prost(bool, tag = "2")]
    pub delta: bool,
    #[prost(string, repeated, tag = "3")]
    pub removed: Vec<String>,
}

/// `weir.v1.CachePeer` (the address only kept so the byte count is the wire's).
#[derive(Clone, PartialEq, Message)]
pub struct LitePeer {
    #[prost(string, tag = "1")]
    pub node_name: String,
    #[prost(string, tag = "2")]
    pub address: String,
}

/// `weir.v1.RoutingUpdate` with each upserted route kept as its encoded bytes (zero-copy
/// slices of the received frame).
#[derive(Clone, PartialEq, Message)]
pub struct LiteUpdate {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(bool, tag = "2")]
    pub full: bool,
    #[prost(uint64, tag = "3")]
    pub base_version: u64,
    #[prost(bytes = "bytes", repeated, tag = "4")]
    pub upserted: Vec<Bytes>,
    #[prost(string, repeated, tag = "5")]
    pub removed: Vec<String>,
}

/// The fields of `weir.v1.Route` the measurements need; prost skips the others.
#[derive(Clone, PartialEq, Message)]
struct LiteRoute {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, repeated, tag = "4")]
    rules: Vec<LiteRule>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteRule {
    #[prost(message, repeated, tag = "2")]
    backends: Vec<LiteBackend>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteBackend {
    #[prost(message, repeated, tag = "6")]
    endpoints: Vec<LiteEndpoint>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteEndpoint {
    #[prost(string, tag = "1")]
    address: String,
    #[prost(bool, tag = "2")]
    ready: bool,
}

type SimCodec = tonic_prost::ProstCodec<AgentMessage, LiteControllerMessage>;

/// The hash that identifies a route's content: of its protobuf encoding.
pub fn route_hash(encoded: &[u8]) -> u64 {
    // SipHash with fixed keys: deterministic within a build, so two simulators in one process
    // (or a test and a simulator) agree, and good enough that 10⁴ distinct routes never
    // collide in practice.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encoded.hash(&mut h);
    h.finish()
}

// ---------------------------------------------------------------- catalog

/// One distinct route content, shared by every agent that holds it.
struct Content {
    name: u32,
    hash: u64,
    /// (address id, ready), sorted and deduplicated.
    endpoints: Box<[(u32, bool)]>,
}

/// Interned route names, endpoint addresses and route contents. Append-only: a run creates
/// a few thousand contents at most (one per route per change).
#[derive(Default)]
struct Catalog {
    names: HashMap<Box<str>, u32>,
    name_list: Vec<Box<str>>,
    addrs: HashMap<Box<str>, u32>,
    addr_list: Vec<Box<str>>,
    by_hash: HashMap<u64, u32>,
    contents: Vec<Content>,
}

impl Catalog {
    fn name_id(&mut self, name: &str) -> u32 {
        intern(&mut self.names, &mut self.name_list, name)
    }

    /// The content id of an encoded route, decoding it only the first time it is seen.
    fn content(&mut self, hash: u64, encoded: &[u8]) -> Result<u32, String> {
        if let Some(&id) = self.by_hash.get(&hash) {
            return Ok(id);
        }
        let route = LiteRoute::decode(encoded).map_err(|e| format!("undecodable route: {e}"))?;
        if route.name.is_empty() {
            return Err("a route without a name".into());
        }
        let name = self.name_id(&route.name);
        let mut endpoints: Vec<(u32, bool)> = route
            .rules
            .iter()
            .flat_map(|r| &r.backends)
            .flat_map(|b| &b.endpoints)
            .map(|e| {
                (
                    intern(&mut self.addrs, &mut self.addr_list, &e.address),
                    e.ready,
                )
            })
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        let id = u32::try_from(self.contents.len()).map_err(|_| "too many routes")?;
        self.contents.push(Content {
            name,
            hash,
            endpoints: endpoints.into_boxed_slice(),
        });
        self.by_hash.insert(hash, id);
        Ok(id)
    }
}

fn intern(map: &mut HashMap<Box<str>, u32>, list: &mut Vec<Box<str>>, s: &str) -> u32 {
    if let Some(&id) = map.get(s) {
        return id;
    }
    let id = list.len() as u32;
    list.push(s.into());
    map.insert(s.into(), id);
    id
}

// ---------------------------------------------------------------- shared state

/// Simulator settings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Controller URLs (`http://127.0.0.1:18000`); agents rotate through them on reconnect.
    pub controllers: Vec<String>,
    pub agents: usize,
    /// Node names are `{prefix}-{i}`.
    pub prefix: String,
    /// Agent i is in zone `zones[i % len]`.
    pub zones: Vec<String>,
    /// 0: one HTTP/2 connection per agent, like real agents. K > 0: K connections (per
    /// controller, round robin), each carrying many agents' streams.
    pub channels: usize,
    /// Agent i starts `i × ramp / agents` after the start (0: all at once).
    pub ramp: Duration,
    /// Agents announce a cache peer address (`10.x.y.z:15001`, never dialled), so the
    /// controller sends each the peer list of its zone.
    pub cache_peers: bool,
}

impl SimConfig {
    pub fn new(controller: impl Into<String>, agents: usize) -> Self {
        Self {
            controllers: vec![controller.into()],
            agents,
            prefix: "sim".into(),
            zones: vec!["z1".into(), "z2".into(), "z3".into()],
            channels: 0,
            ramp: Duration::ZERO,
            cache_peers: false,
        }
    }
}

/// What one agent exposes to the stats while its task runs.
#[derive(Default)]
struct AgentSlot {
    connected: AtomicBool,
    /// The stream in use delivered its first (full) table.
    stream_synced: AtomicBool,
    applied: AtomicU64,
    /// The reconnect epoch of the stream that last delivered a full table, and when.
    full_epoch: AtomicU64,
    full_at_ns: AtomicU64,
    table: Mutex<AgentTable>,
    /// The cache peer list (hashes of the node names), and when it last changed.
    peer_list: Mutex<HashSet<u64>>,
    peers_at_ns: AtomicU64,
}

/// An agent's routing table: content id per route name id ([`ABSENT`] if none).
#[derive(Default)]
struct AgentTable {
    version: u64,
    routes: Vec<u32>,
}

/// Aggregate of one endpoint readiness change over all agents.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Seen {
    pub agents: u64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
}

/// What every agent that received one version got.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct VersionSeen {
    pub agents: u64,
    /// Σ `RoutingUpdate.encoded_len()` over those agents.
    pub bytes: u64,
    /// How many of them got it as a full table.
    pub full: u64,
    pub upserted: u64,
    pub removed: u64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
}

impl Seen {
    fn add(&mut self, at: u64) {
        if self.agents == 0 || at < self.first_unix_ns {
            self.first_unix_ns = at;
        }
        self.last_unix_ns = self.last_unix_ns.max(at);
        self.agents += 1;
    }
}

#[derive(Default)]
struct Counters {
    updates: AtomicU64,
    full_updates: AtomicU64,
    bytes: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    streams_opened: AtomicU64,
    stream_errors: AtomicU64,
    connect_failures: AtomicU64,
    pings: AtomicU64,
    peer_lists: AtomicU64,
    peer_deltas: AtomicU64,
    peer_bytes: AtomicU64,
}

struct Shared {
    config: SimConfig,
    catalog: Mutex<Catalog>,
    slots: Vec<AgentSlot>,
    counters: Counters,
    newest_version: AtomicU64,
    /// (route name id, address id, new ready) → who saw it.
    observations: Mutex<HashMap<(u32, u32, bool), Seen>>,
    by_version: Mutex<BTreeMap<u64, VersionSeen>>,
    /// Bumped by [`Sim::reconnect_all`]; each agent drops its stream when it changes.
    epoch: watch::Sender<u64>,
    storm_started_ns: AtomicU64,
    channels: Vec<Channel>,
}

fn name_hash(name: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(name)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another agent task must not take the statistics down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------- stats

/// One endpoint readiness change as the agents saw it.
#[derive(Clone, Debug, Serialize)]
pub struct Observation {
    pub route: String,
    pub address: String,
    pub ready: bool,
    pub agents: u64,
    pub first_unix_ns: u64,
    pub last_unix_ns: u64,
}

/// The reconnect storm started by the last [`Sim::reconnect_all`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct Storm {
    pub epoch: u64,
    pub started_unix_ns: u64,
    /// Agents whose stream opened after the storm started delivered a full table.
    pub agents_with_full_table: u64,
    /// When the last of them got it (0 if none).
    pub last_full_unix_ns: u64,
}

/// Cache peer lists received (with `SimConfig::cache_peers`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStats {
    pub lists_received: u64,
    /// Of those, deltas on the previous list.
    pub deltas_received: u64,
    /// Σ over agents of their list's length.
    pub peers_held: u64,
    /// Σ `CachePeers` encoded length.
    pub bytes_received: u64,
    /// Agents whose last list holds every agent of its zone.
    pub agents_with_whole_zone: u64,
    /// Of those, the ones whose list came after the last reconnect storm started.
    pub whole_zone_since_storm: u64,
    /// When the last list was received (0 if none).
    pub last_list_unix_ns: u64,
}

/// A snapshot of the simulator, as `GET /stats` serves it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub now_unix_ns: u64,
    pub agents: u64,
    pub connected: u64,
    /// Connected agents whose stream delivered a table and who apply `newest_version`.
    pub synced: u64,
    /// The highest version any agent received.
    pub newest_version: u64,
    /// Applied version → number of agents (connected or not).
    pub applied_versions: BTreeMap<u64, u64>,
    pub updates: u64,
    pub full_updates: u64,
    pub bytes_received: u64,
    pub acks_sent: u64,
    pub nacks_sent: u64,
    pub pings_received: u64,
    pub streams_opened: u64,
    pub stream_errors: u64,
    pub connect_failures: u64,
    pub storm: Storm,
    pub cache_peers: PeerStats,
    /// CPU time of this whole process (user + system), seconds.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub distinct_routes: u64,
    /// Endpoint readiness changes (route, address, new ready) seen so far, and how many of
    /// them every agent saw: a cheap "has everything converged" for pollers.
    pub changes_seen: u64,
    pub changes_seen_by_all: u64,
    /// Omitted from brief stats.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_version: Option<BTreeMap<u64, VersionSeen>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observations: Option<Vec<Observation>>,
}

/// CPU time this process used so far (all threads), in seconds.
pub fn process_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// (VmRSS, VmHWM) of this process in KiB, 0 where unknown.
fn memory_kib() -> (u64, u64) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (0, 0);
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---------------------------------------------------------------- the simulator

/// A running simulator. Dropping it stops every agent.
pub struct Sim {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sim {
    /// Starts `config.agents` agents (on the current tokio runtime) and returns at once; use
    /// [`Sim::stats`] to see them connect and sync.
    pub fn start(config: SimConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !config.controllers.is_empty(),
            "at least one controller URL"
        );
        anyhow::ensure!(!config.zones.is_empty(), "at least one zone");
        if config.channels == 0 {
            // One socket per agent, plus room for everything else in the process.
            raise_nofile_limit(config.agents as u64 + 256);
        }
        let mut channels = Vec::with_capacity(config.channels);
        for k in 0..config.channels {
            let url = &config.controllers[k % config.controllers.len()];
            channels.push(endpoint(url)?.connect_lazy());
        }
        let (epoch, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            slots: (0..config.agents).map(|_| AgentSlot::default()).collect(),
            config,
            catalog: Mutex::default(),
            counters: Counters::default(),
            newest_version: AtomicU64::new(0),
            observations: Mutex::default(),
            by_version: Mutex::default(),
            epoch,
            storm_started_ns: AtomicU64::new(0),
            channels,
        });
        let (stop, _) = watch::channel(false);
        let n = shared.config.agents;
        let ramp = shared.config.ramp;
        let tasks = (0..n)
            .map(|i| {
                let delay = if n > 0 {
                    ramp.mul_f64(i as f64 / n as f64)
                } else {
                    Duration::ZERO
                };
                tokio::spawn(run_agent(shared.clone(), i, delay, stop.subscribe()))
            })
            .collect();
        Ok(Self {
            shared,
            stop,
            tasks,
        })
    }

    pub fn agents(&self) -> usize {
        self.shared.slots.len()
    }

    /// Counters and gauges; `detail` adds the per-version and per-change tables.
    pub fn stats(&self, detail: bool) -> Stats {
        let s = &self.shared;
        let c = &s.counters;
        let newest = s.newest_version.load(Ordering::Acquire);
        let epoch = *s.epoch.borrow();
        let mut st = Stats {
            now_unix_ns: unix_ns(),
            agents: s.slots.len() as u64,
            newest_version: newest,
            updates: c.updates.load(Ordering::Relaxed),
            full_updates: c.full_updates.load(Ordering::Relaxed),
            bytes_received: c.bytes.load(Ordering::Relaxed),
            acks_sent: c.acks.load(Ordering::Relaxed),
            nacks_sent: c.nacks.load(Ordering::Relaxed),
            pings_received: c.pings.load(Ordering::Relaxed),
            streams_opened: c.streams_opened.load(Ordering::Relaxed),
            stream_errors: c.stream_errors.load(Ordering::Relaxed),
            connect_failures: c.connect_failures.load(Ordering::Relaxed),
            storm: Storm {
                epoch,
                started_unix_ns: s.storm_started_ns.load(Ordering::Relaxed),
                ..Storm::default()
            },
            cpu_seconds: process_cpu_seconds(),
            ..Stats::default()
        };
        st.cache_peers.lists_received = c.peer_lists.load(Ordering::Relaxed);
        st.cache_peers.deltas_received = c.peer_deltas.load(Ordering::Relaxed);
        st.cache_peers.bytes_received = c.peer_bytes.load(Ordering::Relaxed);
        let zones = s.config.zones.len().max(1);
        for (i, slot) in s.slots.iter().enumerate() {
            // Agents i, i + zones, … share agent i's zone.
            let zone_size = (s.slots.len() - i % zones).div_ceil(zones) as u64;
            let held = lock(&slot.peer_list).len() as u64;
            st.cache_peers.peers_held += held;
            if held == zone_size {
                st.cache_peers.agents_with_whole_zone += 1;
                if epoch > 0 && slot.peers_at_ns.load(Ordering::Acquire) >= st.storm.started_unix_ns
                {
                    st.cache_peers.whole_zone_since_storm += 1;
                }
            }
            st.cache_peers.last_list_unix_ns = st
                .cache_peers
                .last_list_unix_ns
                .max(slot.peers_at_ns.load(Ordering::Acquire));
        }
        for slot in &s.slots {
            let connected = slot.connected.load(Ordering::Acquire);
            let applied = slot.applied.load(Ordering::Acquire);
            st.connected += connected as u64;
            if connected && slot.stream_synced.load(Ordering::Acquire) && applied == newest {
                st.synced += 1;
            }
            *st.applied_versions.entry(applied).or_default() += 1;
            if epoch > 0 && slot.full_epoch.load(Ordering::Acquire) == epoch {
                st.storm.agents_with_full_table += 1;
                st.storm.last_full_unix_ns = st
                    .storm
                    .last_full_unix_ns
                    .max(slot.full_at_ns.load(Ordering::Acquire));
            }
        }
        (st.rss_kib, st.hwm_kib) = memory_kib();
        st.distinct_routes = lock(&s.catalog).contents.len() as u64;
        {
            let seen = lock(&s.observations);
            st.changes_seen = seen.len() as u64;
            st.changes_seen_by_all = seen.values().filter(|v| v.agents >= st.agents).count() as u64;
        }
        if detail {
            st.by_version = Some(lock(&s.by_version).clone());
            st.observations = Some(self.observations());
        }
        st
    }

    /// Every endpoint readiness change seen so far, in no particular order.
    pub fn observations(&self) -> Vec<Observation> {
        let seen: Vec<_> = lock(&self.shared.observations)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let catalog = lock(&self.shared.catalog);
        seen.into_iter()
            .map(|((route, addr, ready), s)| Observation {
                route: catalog.name_list[route as usize].to_string(),
                address: catalog.addr_list[addr as usize].to_string(),
                ready,
                agents: s.agents,
                first_unix_ns: s.first_unix_ns,
                last_unix_ns: s.last_unix_ns,
            })
            .collect()
    }

    /// Per agent (by index), a digest of its whole table that ignores versions: a hash over
    /// the sorted (route name, route hash) pairs. Equal digests mean equal tables.
    pub fn tables_digest(&self) -> Vec<u64> {
        let tables: Vec<Vec<u32>> = self
            .shared
            .slots
            .iter()
            .map(|slot| lock(&slot.table).routes.clone())
            .collect();
        let catalog = lock(&self.shared.catalog);
        tables
            .iter()
            .map(|routes| {
                let mut pairs: Vec<(&str, u64)> = routes
                    .iter()
                    .filter(|&&c| c != ABSENT)
                    .map(|&c| {
                        let content = &catalog.contents[c as usize];
                        (&*catalog.name_list[content.name as usize], content.hash)
                    })
                    .collect();
                pairs.sort_unstable();
                let mut h = std::collections::hash_map::DefaultHasher::new();
                pairs.hash(&mut h);
                h.finish()
            })
            .collect()
    }

    /// Route names of agent `i`'s table, sorted (for test failure messages).
    pub fn route_names(&self, i: usize) -> Vec<String> {
        let routes = lock(&self.shared.slots[i].table).routes.clone();
        let catalog = lock(&self.shared.catalog);
        let mut names: Vec<String> = routes
            .iter()
            .filter(|&&c| c != ABSENT)
            .map(|&c| catalog.name_list[catalog.contents[c as usize].name as usize].to_string())
            .collect();
        names.sort();
        names
    }

    /// Makes every agent drop its stream and open a new one at once (a reconnect storm).
    /// Returns the storm's epoch, which [`Stats::storm`] reports on.
    pub fn reconnect_all(&self) -> u64 {
        self.shared
            .storm_started_ns
            .store(unix_ns(), Ordering::Relaxed);
        let mut epoch = 0;
        self.shared.epoch.send_modify(|e| {
            *e += 1;
            epoch = *e;
        });
        epoch
    }

    /// Stops every agent and waits for their tasks to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Raises the soft limit on open files towards `want` (up to the hard limit), so one
/// connection per agent fits; beyond the hard limit connects fail and are counted.
fn raise_nofile_limit(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_some_and(|c| c >= want) {
        return;
    }
    let target = match lim.maximum {
        Some(max) => want.min(max),
        None => want,
    };
    let raised = rustix::process::Rlimit {
        current: Some(target),
        maximum: lim.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        tracing::warn!(error = %e, want, "cannot raise RLIMIT_NOFILE; raise it with `ulimit -n`");
    } else if target < want {
        tracing::warn!(
            want,
            hard = target,
            "RLIMIT_NOFILE hard limit is too low for one connection per agent; use --channels"
        );
    }
}

fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad controller URL {url}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true))
}

// ---------------------------------------------------------------- one agent

enum Ended {
    Stop,
    /// `reconnect_all`: reconnect at once, without backoff.
    Storm,
    /// The stream failed or ended; whether it delivered an update (resets the backoff).
    Failed {
        got_update: bool,
    },
}

async fn run_agent(
    shared: Arc<Shared>,
    i: usize,
    delay: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if !delay.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
    let mut failures: u32 = 0;
    let mut attempt = i;
    loop {
        if *stop.borrow() {
            return;
        }
        let url = &shared.config.controllers[attempt % shared.config.controllers.len()];
        attempt += 1;
        let ended = session(&shared, i, url, &mut stop).await;
        let slot = &shared.slots[i];
        slot.connected.store(false, Ordering::Release);
        slot.stream_synced.store(false, Ordering::Release);
        let delay = match ended {
            Ended::Stop => return,
            Ended::Storm => {
                failures = 0;
                continue;
            }
            Ended::Failed { got_update } => {
                failures = if got_update {
                    0
                } else {
                    failures.saturating_add(1)
                };
                let cap = BACKOFF_BASE
                    .saturating_mul(1u32 << failures.min(6))
                    .min(BACKOFF_MAX);
                rand::rng().random_range(cap / 2..=cap)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One stream's life.
async fn session(shared: &Shared, i: usize, url: &str, stop: &mut watch::Receiver<bool>) -> Ended {
    let c = &shared.counters;
    let slot = &shared.slots[i];
    // Subscribed before connecting, so a storm started while this agent connects also
    // restarts it: "every agent opened a stream after the storm started" holds.
    let mut epoch_rx = shared.epoch.subscribe();
    let epoch = *epoch_rx.borrow_and_update();
    let channel = if shared.channels.is_empty() {
        let connect = async { endpoint(url)?.connect().await.map_err(anyhow::Error::from) };
        let got = tokio::select! {
            got = connect => got,
            _ = stop.changed() => return Ended::Stop,
        };
        match got {
            Ok(ch) => ch,
            Err(e) => {
                tracing::debug!(agent = i, error = %e, "connect failed");
                c.connect_failures.fetch_add(1, Ordering::Relaxed);
                return Ended::Failed { got_update: false };
            }
        }
    } else {
        shared.channels[i % shared.channels.len()].clone()
    };
    let (tx, rx) = mpsc::channel::<AgentMessage>(4);
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_name: format!("{}-{i}", shared.config.prefix),
            zone: shared.config.zones[i % shared.config.zones.len()].clone(),
            agent_version: concat!("weir-sim/", env!("CARGO_PKG_VERSION")).into(),
            capabilities: vec!["delta".into(), "peer-delta".into()],
            applied_version: lock(&slot.table).version,
            cache_peer_address: if shared.config.cache_peers {
                format!(
                    "10.{}.{}.{}:15001",
                    (i >> 16) & 255,
                    (i >> 8) & 255,
                    i & 255
                )
            } else {
                String::new()
            },
        })),
    };
    if tx.send(hello).await.is_err() {
        return Ended::Failed { got_update: false };
    }
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE);
    let open = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            http::uri::PathAndQuery::from_static("/weir.v1.RoutingDiscovery/Stream"),
            SimCodec::default(),
        )
        .await
    };
    let opened = tokio::select! {
        o = tokio::time::timeout(CONNECT_TIMEOUT, open) => o,
        _ = stop.changed() => return Ended::Stop,
    };
    let mut inbound = match opened {
        Ok(Ok(resp)) => resp.into_inner(),
        Ok(Err(e)) => {
            tracing::debug!(agent = i, error = %e, "open stream failed");
            c.connect_failures.fetch_add(1, Ordering::Relaxed);
            return Ended::Failed { got_update: false };
        }
        Err(_) => {
            c.connect_failures.fetch_add(1, Ordering::Relaxed);
            return Ended::Failed { got_update: false };
        }
    };
    c.streams_opened.fetch_add(1, Ordering::Relaxed);
    slot.connected.store(true, Ordering::Release);
    let mut got_update = false;
    let mut first = true;
    let silence = tokio::time::sleep(SILENCE_LIMIT);
    tokio::pin!(silence);
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = stop.changed() => return Ended::Stop,
            _ = epoch_rx.changed() => return Ended::Storm,
            _ = &mut silence => {
                c.stream_errors.fetch_add(1, Ordering::Relaxed);
                return Ended::Failed { got_update };
            }
        };
        silence
            .as_mut()
            .reset(tokio::time::Instant::now() + SILENCE_LIMIT);
        let update = match msg {
            Ok(Some(LiteControllerMessage {
                kind: Some(LiteKind::Update(u)),
            })) => u,
            Ok(Some(LiteControllerMessage {
                kind: Some(LiteKind::Ping(_)),
            })) => {
                c.pings.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Some(LiteControllerMessage {
                kind: Some(LiteKind::Peers(list)),
            })) => {
                c.peer_lists.fetch_add(1, Ordering::Relaxed);
                c.peer_deltas
                    .fetch_add(u64::from(list.delta), Ordering::Relaxed);
                c.peer_bytes
                    .fetch_add(list.encoded_len() as u64, Ordering::Relaxed);
                {
                    let mut held = lock(&slot.peer_list);
                    if !list.delta {
                        held.clear();
                    }
                    for gone in &list.removed {
                        held.remove(&name_hash(gone));
                    }
                    held.extend(list.peers.iter().map(|p| name_hash(&p.node_name)));
                }
                slot.peers_at_ns.store(unix_ns(), Ordering::Release);
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                c.stream_errors.fetch_add(1, Ordering::Relaxed);
                return Ended::Failed { got_update };
            }
        };
        let at = unix_ns();
        got_update = true;
        let version = update.version;
        let full = update.full;
        let reply = match apply(shared, slot, update, at) {
            Ok(()) => {
                c.acks.fetch_add(1, Ordering::Relaxed);
                if first {
                    first = false;
                    slot.stream_synced.store(true, Ordering::Release);
                }
                if full {
                    slot.full_at_ns.store(at, Ordering::Release);
                    slot.full_epoch.store(epoch, Ordering::Release);
                }
                agent_message::Kind::Ack(Ack { version })
            }
            Err((applied, error)) => {
                c.nacks.fetch_add(1, Ordering::Relaxed);
                agent_message::Kind::Nack(Nack {
                    version,
                    applied_version: applied,
                    error,
                })
            }
        };
        if tx.send(AgentMessage { kind: Some(reply) }).await.is_err() {
            c.stream_errors.fetch_add(1, Ordering::Relaxed);
            return Ended::Failed { got_update };
        }
    }
}

/// Applies one update to the agent's table and records what it observed. `Err` carries the
/// version still in force and the NACK's error.
fn apply(
    shared: &Shared,
    slot: &AgentSlot,
    update: LiteUpdate,
    at: u64,
) -> Result<(), (u64, String)> {
    let c = &shared.counters;
    let bytes = update.encoded_len() as u64;
    c.updates.fetch_add(1, Ordering::Relaxed);
    c.bytes.fetch_add(bytes, Ordering::Relaxed);
    if update.full {
        c.full_updates.fetch_add(1, Ordering::Relaxed);
    }
    shared
        .newest_version
        .fetch_max(update.version, Ordering::AcqRel);
    record_version(shared, &update, bytes, at);

    let mut table = lock(&slot.table);
    if !update.full && update.base_version != table.version {
        return Err((
            table.version,
            format!(
                "delta on top of version {} but version {} is applied",
                update.base_version, table.version
            ),
        ));
    }
    // Hash outside the catalog lock: it is the bulk of the work and needs no shared state.
    let hashes: Vec<u64> = update.upserted.iter().map(|r| route_hash(r)).collect();
    let mut changes = Vec::new();
    let mut next: Vec<u32>;
    {
        let mut catalog = lock(&shared.catalog);
        next = if update.full {
            vec![ABSENT; catalog.name_list.len()]
        } else {
            table.routes.clone()
        };
        for name in &update.removed {
            if let Some(&id) = catalog.names.get(name.as_str())
                && let Some(slot) = next.get_mut(id as usize)
            {
                *slot = ABSENT;
            }
        }
        for (encoded, &hash) in update.upserted.iter().zip(&hashes) {
            let id = catalog
                .content(hash, encoded)
                .map_err(|e| (table.version, e))?;
            let content = &catalog.contents[id as usize];
            let name = content.name as usize;
            if next.len() <= name {
                next.resize(catalog.name_list.len(), ABSENT);
            }
            next[name] = id;
            // Readiness changes relative to this agent's previous table for the route.
            let prev = table.routes.get(name).copied().unwrap_or(ABSENT);
            if prev != ABSENT && prev != id {
                let old = &catalog.contents[prev as usize].endpoints;
                for &(addr, ready) in content.endpoints.iter() {
                    if old.binary_search(&(addr, ready)).is_err()
                        && old.binary_search(&(addr, !ready)).is_ok()
                    {
                        changes.push((content.name, addr, ready));
                    }
                }
            }
        }
    }
    table.routes = next;
    table.version = update.version;
    slot.applied.store(update.version, Ordering::Release);
    drop(table);
    if !changes.is_empty() {
        let mut seen = lock(&shared.observations);
        for key in changes {
            seen.entry(key).or_default().add(at);
        }
    }
    Ok(())
}

fn record_version(shared: &Shared, update: &LiteUpdate, bytes: u64, at: u64) {
    let mut by_version = lock(&shared.by_version);
    let v = by_version.entry(update.version).or_default();
    if v.agents == 0 || at < v.first_unix_ns {
        v.first_unix_ns = at;
    }
    v.last_unix_ns = v.last_unix_ns.max(at);
    v.agents += 1;
    v.bytes += bytes;
    v.full += update.full as u64;
    v.upserted += update.upserted.len() as u64;
    v.removed += update.removed.len() as u64;
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_proto::v1::{Backend, ControllerMessage, Endpoint as Ep, Route, RoutingUpdate, Rule};

    fn route(name: &str, eps: &[(&str, bool)]) -> Route {
        Route {
            name: name.into(),
            hosts: vec![format!("{name}.test")],
            rules: vec![Rule {
                backends: vec![Backend {
                    service: name.into(),
                    port: 80,
                    weight: 1,
                    endpoints: eps
                        .iter()
                        .map(|(a, r)| Ep {
                            address: a.to_string(),
                            ready: *r,
                            zone: "z1".into(),
                            weight: 1,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn lite_update_keeps_routes_as_their_exact_encoding_and_length() {
        let routes = vec![
            route("a", &[("10.0.0.1:80", true)]),
            route("b", &[("10.0.0.2:80", false)]),
        ];
        let msg = ControllerMessage {
            kind: Some(weir_proto::v1::controller_message::Kind::Update(
                RoutingUpdate {
                    version: 7,
                    full: false,
                    base_version: 6,
                    upserted: routes.clone(),
                    removed: vec!["c".into()],
                },
            )),
        };
        let wire = msg.encode_to_vec();
        let lite = LiteControllerMessage::decode(wire.as_slice()).expect("decode");
        assert_eq!(lite.encoded_len(), wire.len());
        let Some(LiteKind::Update(u)) = lite.kind else {
            panic!("not an update")
        };
        assert_eq!((u.version, u.full, u.base_version), (7, false, 6));
        assert_eq!(u.removed, ["c"]);
        for (raw, r) in u.upserted.iter().zip(&routes) {
            assert_eq!(raw.as_ref(), r.encode_to_vec().as_slice());
        }
    }

    fn lite(version: u64, full: bool, base: u64, routes: &[Route], removed: &[&str]) -> LiteUpdate {
        LiteUpdate {
            version,
            full,
            base_version: base,
            upserted: routes
                .iter()
                .map(|r| Bytes::from(r.encode_to_vec()))
                .collect(),
            removed: removed.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn shared(agents: usize) -> Shared {
        Shared {
            config: SimConfig::new("http://127.0.0.1:1", agents),
            catalog: Mutex::default(),
            slots: (0..agents).map(|_| AgentSlot::default()).collect(),
            counters: Counters::default(),
            newest_version: AtomicU64::new(0),
            observations: Mutex::default(),
            by_version: Mutex::default(),
            epoch: watch::channel(0).0,
            storm_started_ns: AtomicU64::new(0),
            channels: Vec::new(),
        }
    }

    #[test]
    fn deltas_reach_the_same_table_as_a_full_update_and_readiness_flips_are_observed() {
        let s = shared(2);
        let a1 = route("a", &[("10.0.0.1:80", true), ("10.0.0.2:80", true)]);
        let b1 = route("b", &[("10.0.0.3:80", true)]);
        let a2 = route("a", &[("10.0.0.1:80", true), ("10.0.0.2:80", false)]);
        let c1 = route("c", &[("10.0.0.4:80", true)]);
        apply(&s, &s.slots[0], lite(1, true, 0, &[a1, b1], &[]), 10).expect("full");
        apply(
            &s,
            &s.slots[0],
            lite(2, false, 1, std::slice::from_ref(&a2), &["b"]),
            20,
        )
        .expect("delta");
        apply(
            &s,
            &s.slots[0],
            lite(3, false, 2, std::slice::from_ref(&c1), &[]),
            30,
        )
        .expect("delta");
        // A delta on the wrong base is refused and changes nothing.
        let refused = apply(&s, &s.slots[0], lite(9, false, 5, &[], &["a"]), 40);
        assert_eq!(refused.map_err(|e| e.0), Err(3));
        apply(&s, &s.slots[1], lite(3, true, 0, &[c1, a2], &[]), 50).expect("full");

        let sim = Sim {
            shared: Arc::new(s),
            stop: watch::channel(false).0,
            tasks: Vec::new(),
        };
        let digests = sim.tables_digest();
        assert_eq!(digests[0], digests[1]);
        assert_eq!(sim.route_names(0), ["a", "c"]);
        let obs = sim.observations();
        assert_eq!(obs.len(), 1, "{obs:?}");
        assert_eq!(
            (obs[0].route.as_str(), obs[0].address.as_str(), obs[0].ready),
            ("a", "10.0.0.2:80", false)
        );
        assert_eq!((obs[0].agents, obs[0].first_unix_ns), (1, 20));
        let st = sim.stats(true);
        assert_eq!((st.acks_sent, st.nacks_sent), (0, 0), "counted by sessions");
        assert_eq!(st.by_version.expect("detail")[&3].agents, 2);
    }
}
