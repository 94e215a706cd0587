//! The `weir.v1.RoutingDiscovery` server: one bidirectional stream per agent.
//!
//! Each session sends the full table first, then deltas computed against what it last sent,
//! and records the agent's ACKs and NACKs in the [`Agents`] registry for `/state`. A session
//! waits on the hub's `watch` channel, so it only ever sees the latest table (latest-wins): a
//! slow agent is sent fewer, larger deltas and holds up nobody. Per-agent state is a version
//! number and a pointer to the last table sent.

use crate::routing::load::Sample;
use crate::serve::hub::{Hub, Table};
use crate::serve::peers::{PeerSets, Peers};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::Serialize;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::Encoded;
use weir_proto::v1::{
    AgentMessage, ControllerMessage, LoadReport, Ping, agent_message, controller_message,
};

/// How often a session sends an application-level ping.
const PING_INTERVAL: Duration = Duration::from_secs(15);
/// How long an agent has to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/state` shows about one connected agent.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentState {
    pub node_name: String,
    pub zone: String,
    pub agent_version: String,
    pub peer: String,
    /// Where other agents reach it for cache peer fills (empty: it serves none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub cache_peer_address: String,
    pub connected_at_unix_ms: u64,
    /// The last version sent to the agent.
    pub sent_version: u64,
    /// The last version of this controller the agent ACKed (0 before its first ACK).
    pub applied_version: u64,
    /// When the agent last ACKed an update (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_ack_unix_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<NackState>,
    /// Cache totals of the agent's last LoadReport, since the agent started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheTotals>,
    /// When the agent's last LoadReport arrived (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_report_unix_ms: Option<u64>,
}

/// An agent's cache counters as its LoadReports carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CacheTotals {
    pub hits: u64,
    pub misses: u64,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NackState {
    pub version: u64,
    pub error: String,
    pub at_unix_ms: u64,
}

/// The agents connected to this controller, by session id.
pub struct Agents {
    sessions: Mutex<BTreeMap<u64, AgentState>>,
    /// Endpoint figures of every agent's load reports since the last round of load-aware
    /// weights, summed by endpoint address (see [`crate::serve::load`]).
    samples: Mutex<BTreeMap<String, Sample>>,
    /// Every session's last LoadReport, for `/state` and the dashboard.
    pub(crate) reports: crate::serve::traffic::Reports,
    /// The cache peer sets pushed to agents that serve peer fills.
    pub(crate) peers: Peers,
    next_id: AtomicU64,
    pub updates_sent: AtomicU64,
    /// Bytes of routing updates sent, over all sessions.
    pub bytes_sent: AtomicU64,
    /// Routing updates agents rejected, over all sessions.
    pub(crate) nacks: Counter,
    /// Seconds from a change the controller saw (the first event of its debounce) to each
    /// agent's ACK of a version carrying it; one observation per change and agent.
    pub(crate) push_latency: Histogram,
}

impl Default for Agents {
    fn default() -> Self {
        Self {
            sessions: Mutex::default(),
            samples: Mutex::default(),
            reports: Default::default(),
            peers: Peers::default(),
            next_id: AtomicU64::default(),
            updates_sent: AtomicU64::default(),
            bytes_sent: AtomicU64::default(),
            nacks: Counter::default(),
            // 5 ms to ~41 s: local mode's debounce alone is 30–60 ms, and a slow or
            // reconnecting agent can take seconds.
            push_latency: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
        }
    }
}

impl Agents {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, AgentState>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn list(&self) -> Vec<AgentState> {
        self.lock().values().cloned().collect()
    }

    /// (node, zone, cache peer address) of the sessions that serve cache peer fills, oldest
    /// first (see [`crate::serve::peers`]).
    pub(crate) fn peer_addresses(&self) -> Vec<(String, String, String)> {
        self.lock()
            .values()
            .filter(|a| !a.cache_peer_address.is_empty())
            .map(|a| {
                (
                    a.node_name.clone(),
                    a.zone.clone(),
                    a.cache_peer_address.clone(),
                )
            })
            .collect()
    }

    /// Takes the endpoint figures gathered since the last call.
    pub(crate) fn take_samples(&self) -> BTreeMap<String, Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn record_load(&self, report: &LoadReport) {
        if report.endpoints.is_empty() {
            return;
        }
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        for e in &report.endpoints {
            // Bounded by the routes' endpoints an agent can name; an agent reporting
            // addresses the controller never sent only wastes its own entries, which the
            // next round drops.
            samples.entry(e.address.clone()).or_default().add(
                e.requests,
                e.errors,
                e.latency_ewma_ms,
            );
        }
    }

    fn with(&self, id: u64, f: impl FnOnce(&mut AgentState)) {
        if let Some(a) = self.lock().get_mut(&id) {
            f(a);
        }
    }
}

/// Removes the session from the registry however the session task ends.
struct SessionGuard {
    agents: Arc<Agents>,
    id: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.agents.reports.remove(self.id);
        let removed = self.agents.lock().remove(&self.id);
        if let Some(a) = removed {
            tracing::info!(node = %a.node_name, peer = %a.peer, "agent disconnected");
            if !a.cache_peer_address.is_empty() {
                self.agents.peers.notify();
            }
        }
    }
}

pub struct DiscoveryService {
    hub: Arc<Hub>,
    agents: Arc<Agents>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl DiscoveryService {
    pub fn new(hub: Arc<Hub>, agents: Arc<Agents>) -> Self {
        let (_, stop) = tokio::sync::watch::channel(false);
        Self { hub, agents, stop }
    }

    /// Ends every session with `UNAVAILABLE` once `stop` turns true, so agents move to
    /// another replica at once instead of holding this one's shutdown up.
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = stop;
        self
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a session sends: pre-encoded `ControllerMessage`s, or the status that ends the stream.
pub(crate) type OutStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

impl DiscoveryService {
    /// One agent's stream: waits for its Hello, registers it, and returns the stream of
    /// (pre-encoded) messages its session sends; [`crate::serve::wire`] frames them.
    pub(crate) async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Hello(h)),
            }))) => h,
            Ok(Some(Err(e))) => return Err(e),
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "the first message on the stream must be Hello",
                ));
            }
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 10s")),
        };
        if hello.node_name.is_empty() {
            return Err(Status::invalid_argument("Hello.node_name is empty"));
        }
        let cache_peer_address = hello.cache_peer_address.trim().to_owned();
        if !cache_peer_address.is_empty()
            && cache_peer_address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(Status::invalid_argument(format!(
                "Hello.cache_peer_address {cache_peer_address:?} is not an IP:port"
            )));
        }
        let id = self.agents.next_id.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %hello.node_name, zone = %hello.zone, %peer, cache_peer = %cache_peer_address, "agent connected");
        let zone = hello.zone.clone();
        let serves_peers = !cache_peer_address.is_empty();
        let peer_deltas = hello.capabilities.iter().any(|c| c == "peer-delta");
        self.agents.lock().insert(
            id,
            AgentState {
                node_name: hello.node_name,
                zone: hello.zone,
                agent_version: hello.agent_version,
                peer,
                cache_peer_address,
                connected_at_unix_ms: now_ms(),
                sent_version: 0,
                // Hello's version may come from another replica, whose versions are numbered
                // independently: only ACKs of this controller's versions count.
                applied_version: 0,
                last_ack_unix_ms: None,
                last_nack: None,
                cache: None,
                last_report_unix_ms: None,
            },
        );
        // A small buffer: back-pressure from a slow agent stops this session from reading
        // the watch channel, which then simply holds the newest table for it.
        if serves_peers {
            self.agents.peers.changed(&self.agents);
        }
        let (tx, rx) = mpsc::channel(2);
        let session = Session {
            guard: SessionGuard {
                agents: self.agents.clone(),
                id,
            },
            tables: self.hub.subscribe(),
            peers: serves_peers.then(|| (self.agents.peers.subscribe(), zone)),
            peers_have: None,
            peer_deltas,
            inbound,
            tx,
            sent: None,
            last_full_version: None,
            acked: 0,
            stop: self.stop.clone(),
        };
        tokio::spawn(session.run());
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Resolves when the peer sets change (`None` at once, so `select!` skips the branch, for an
/// agent that serves no peer fills).
async fn peers_changed(
    peers: &mut Option<(tokio::sync::watch::Receiver<Arc<PeerSets>>, String)>,
) -> Option<Result<(), tokio::sync::watch::error::RecvError>> {
    match peers {
        Some((rx, _)) => Some(rx.changed().await),
        None => None,
    }
}

struct Session {
    guard: SessionGuard,
    tables: tokio::sync::watch::Receiver<Arc<Table>>,
    /// The cache peer sets and the agent's zone, for an agent that serves peer fills.
    peers: Option<(tokio::sync::watch::Receiver<Arc<PeerSets>>, String)>,
    /// The `ZoneSet::since` of the peer list last sent (`Some(0)`: an empty one).
    peers_have: Option<u64>,
    /// The agent takes peer list deltas (capability "peer-delta").
    peer_deltas: bool,
    inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<Encoded, Status>>,
    /// The table last sent; `None` forces a full table next.
    sent: Option<Arc<Table>>,
    last_full_version: Option<u64>,
    /// The highest version ACKed in this session, or the first version sent: changes up to
    /// it are not timed again (those before the session are not this agent's push latency).
    acked: u64,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Session {
    async fn run(mut self) {
        let table = self.tables.borrow_and_update().clone();
        self.acked = table.version;
        if !self.send_table(table).await || !self.send_peers().await {
            return;
        }
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.tick().await;
        loop {
            tokio::select! {
                changed = self.tables.changed() => {
                    if changed.is_err() {
                        return; // the hub is gone: shutting down
                    }
                    let table = self.tables.borrow_and_update().clone();
                    if !self.send_table(table).await {
                        return;
                    }
                }
                Some(changed) = peers_changed(&mut self.peers) => {
                    if changed.is_err() || !self.send_peers().await {
                        return;
                    }
                }
                msg = self.inbound.next() => match msg {
                    Some(Ok(m)) => {
                        if !self.on_message(m).await {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "agent stream failed");
                        return;
                    }
                    None => return,
                },
                () = crate::serve::stopping(self.stop.clone()) => {
                    let _ = self
                        .tx
                        .send(Err(Status::unavailable(
                            "controller shutting down; reconnect to another replica",
                        )))
                        .await;
                    return;
                }
                _ = ping.tick() => {
                    let msg = Encoded::of(&ControllerMessage {
                        kind: Some(controller_message::Kind::Ping(Ping { unix_millis: now_ms() })),
                    });
                    if self.tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends the agent's zone's peer list if it changed since the last one sent (as a delta
    /// when the agent takes them and holds the list the delta starts from); false if the
    /// agent is gone.
    async fn send_peers(&mut self) -> bool {
        let Some((rx, zone)) = &mut self.peers else {
            return true;
        };
        let sets = rx.borrow_and_update().clone();
        let (message, have) = match (sets.zone(zone), self.peers_have) {
            // Nothing yet (this agent is not in a published set yet), or told so already.
            (None, None | Some(0)) => return true,
            // No serving agent of the zone left: an empty list.
            (None, Some(_)) => (
                Encoded::of(&ControllerMessage {
                    kind: Some(controller_message::Kind::Peers(Default::default())),
                }),
                0,
            ),
            (Some(z), Some(h)) if h == z.since => return true,
            (Some(z), have) => match &z.delta {
                Some((from, delta)) if self.peer_deltas && have == Some(*from) => {
                    (delta.clone(), z.since)
                }
                _ => (z.whole.clone(), z.since),
            },
        };
        if self.tx.send(Ok(message)).await.is_err() {
            return false;
        }
        self.peers_have = Some(have);
        true
    }

    /// Handles one agent message; returns false when the session should end.
    async fn on_message(&mut self, msg: AgentMessage) -> bool {
        match msg.kind {
            Some(agent_message::Kind::Ack(ack)) => {
                self.time_push(ack.version);
                self.guard.agents.with(self.guard.id, |a| {
                    a.applied_version = a.applied_version.max(ack.version);
                    a.last_ack_unix_ms = Some(now_ms());
                });
            }
            Some(agent_message::Kind::Nack(nack)) => {
                self.guard.agents.nacks.inc();
                let mut node = String::new();
                self.guard.agents.with(self.guard.id, |a| {
                    node = a.node_name.clone();
                    // A version above anything sent here is another replica's numbering.
                    if nack.applied_version <= a.sent_version {
                        a.applied_version = nack.applied_version;
                    }
                    a.last_nack = Some(NackState {
                        version: nack.version,
                        error: nack.error.clone(),
                        at_unix_ms: now_ms(),
                    });
                });
                tracing::warn!(
                    node = %node,
                    version = nack.version,
                    applied = nack.applied_version,
                    error = %nack.error,
                    "agent rejected routing update; it keeps its previous table"
                );
                // The agent still runs `applied_version`. A rejected delta may mean the agent
                // lost track of its base, so resend the current table whole; a rejected full
                // table would only fail again, so wait for the next change instead.
                if self.last_full_version != Some(nack.version) {
                    self.sent = None;
                    let table = self.tables.borrow().clone();
                    return self.send_table(table).await;
                }
            }
            Some(agent_message::Kind::Hello(_)) => {
                tracing::debug!("duplicate Hello ignored");
            }
            Some(agent_message::Kind::Load(load)) => {
                let agents = &self.guard.agents;
                agents.record_load(&load);
                let mut node = String::new();
                agents.with(self.guard.id, |a| {
                    a.cache = Some(CacheTotals {
                        hits: load.cache_hits,
                        misses: load.cache_misses,
                    });
                    a.last_report_unix_ms = Some(now_ms());
                    node = a.node_name.clone();
                });
                agents
                    .reports
                    .record(self.guard.id, node, load, std::time::Instant::now());
            }
            Some(agent_message::Kind::Ping(_)) | None => {}
        }
        true
    }

    /// Observes the push latency of every change the ACK of `version` brings to this agent:
    /// those of the versions after the last one it ACKed, up to `version`, as far as the
    /// table last sent remembers them.
    fn time_push(&mut self, version: u64) {
        if version <= self.acked {
            return;
        }
        if let Some(sent) = &self.sent {
            let now = std::time::Instant::now();
            for &(v, seen) in sent.seen() {
                if v > self.acked && v <= version {
                    let latency = now.saturating_duration_since(seen);
                    self.guard
                        .agents
                        .push_latency
                        .observe(latency.as_secs_f64());
                }
            }
        }
        self.acked = version;
    }

    /// Sends `table` whole or as a delta on top of the last table sent; false if the agent
    /// is gone. The message is the table's own, encoded once for every session that needs
    /// the same bytes.
    async fn send_table(&mut self, table: Arc<Table>) -> bool {
        let message = match &self.sent {
            Some(prev) if prev.version == table.version => return true,
            Some(prev) => table.delta_message(prev),
            None => {
                self.last_full_version = Some(table.version);
                table.full_message()
            }
        };
        let bytes = message.len() as u64;
        if self.tx.send(Ok(message)).await.is_err() {
            return false;
        }
        let agents = &self.guard.agents;
        agents.updates_sent.fetch_add(1, Ordering::Relaxed);
        agents.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        let version = table.version;
        agents.with(self.guard.id, |a| a.sent_version = version);
        self.sent = Some(table);
        true
    }
}
