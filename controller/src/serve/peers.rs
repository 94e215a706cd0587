//! Cache peer sets: for each zone, the connected agents that serve cache peer fills (those
//! whose Hello gave a `cache_peer_address`), pushed to each of them as a `CachePeers`
//! message. An agent hashes an object's key over its set to find the agent that owns it.
//!
//! Agents come and go in bursts (a rolling update restarts them all), and each change would
//! send every agent of the zone a new list, so changes are debounced ([`DEBOUNCE`]): a burst
//! costs one list per agent. A list lags reality by that much at most, which costs little:
//! an agent that asks a peer that is gone marks it down and asks the next owner, or the
//! origin. Sets are scoped to a zone because a peer fill across zones pays cross-zone
//! latency and bytes.
//!
//! A zone of N agents has N-entry lists, and a whole list to each agent on each change
//! would cost O(N²) bytes per join or leave (30 MB per change at 1,000 agents in a zone).
//! So each zone keeps two messages, encoded once and shared by its sessions: the whole list,
//! and the delta from its previous content (who joined or changed address, who left). A
//! session sends the whole list first, then the delta when the agent takes deltas
//! (capability "peer-delta") and holds exactly the list it starts from, else the whole list
//! again (an agent that missed a change: the watch channel keeps only the newest sets).
//!
//! Only the agents connected to *this* controller are known here: with several replicas,
//! each replica's agents form their own sets (each still consistent, the origin then sees
//! one fetch per object per zone and replica).

use crate::serve::server::Agents;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use weir_proto::Encoded;
use weir_proto::v1::{CachePeer, CachePeers, ControllerMessage, controller_message};

/// Quiet time after a connect or disconnect before the sets are recomputed.
pub(crate) const DEBOUNCE: Duration = Duration::from_secs(1);

/// The peer sets in force, by zone ("" for agents without one).
#[derive(Debug, Default)]
pub(crate) struct PeerSets {
    /// Bumped by every publish: what [`ZoneSet::since`] counts in (0: never published).
    version: u64,
    zones: BTreeMap<String, ZoneSet>,
}

/// One zone's list, and the two messages that tell it.
#[derive(Debug, Clone)]
pub(crate) struct ZoneSet {
    /// Node → address.
    peers: BTreeMap<String, String>,
    /// The [`PeerSets::version`] at which the list took its content.
    pub(crate) since: u64,
    /// The whole list.
    pub(crate) whole: Encoded,
    /// From the previous content (whose `since` it names) to this one.
    pub(crate) delta: Option<(u64, Encoded)>,
}

impl PeerSets {
    /// The sets for `agents` (node name, zone, peer address of each session, oldest session
    /// first), as the next version after `self`. A node connected twice (an agent hands
    /// over to its successor) counts once, with its newest session's address. A zone whose
    /// list did not change keeps its messages; one that did gets a delta from its last one.
    pub(crate) fn next<'a>(
        &self,
        agents: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) -> Self {
        let version = self.version + 1;
        let mut by_zone: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
        for (node, zone, address) in agents {
            if !address.is_empty() {
                by_zone
                    .entry(zone)
                    .or_default()
                    .insert(node.to_owned(), address.to_owned());
            }
        }
        let zones = by_zone
            .into_iter()
            .map(|(zone, peers)| {
                let before = self.zones.get(zone);
                let set = match before {
                    Some(b) if b.peers == peers => b.clone(),
                    _ => ZoneSet::new(peers, version, before),
                };
                (zone.to_owned(), set)
            })
            .collect();
        Self { version, zones }
    }

    /// The sets of `agents`, as a first version (tests).
    #[cfg(test)]
    pub(crate) fn of<'a>(agents: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Self {
        Self::default().next(agents)
    }

    /// The list of `zone` (`None`: no agent of the zone serves peers).
    pub(crate) fn zone(&self, zone: &str) -> Option<&ZoneSet> {
        self.zones.get(zone)
    }

    /// Whether both hold the same lists (versions aside).
    fn same_lists(&self, other: &Self) -> bool {
        self.zones.len() == other.zones.len()
            && self
                .zones
                .iter()
                .zip(&other.zones)
                .all(|((za, a), (zb, b))| za == zb && a.peers == b.peers)
    }

    /// Node names by zone, for the log.
    pub(crate) fn nodes(&self) -> BTreeMap<&str, Vec<&str>> {
        self.zones
            .iter()
            .map(|(zone, z)| (zone.as_str(), z.peers.keys().map(String::as_str).collect()))
            .collect()
    }
}

impl ZoneSet {
    fn new(peers: BTreeMap<String, String>, since: u64, before: Option<&ZoneSet>) -> Self {
        let message = |peers: Vec<CachePeer>, delta: bool, removed: Vec<String>| {
            Encoded::of(&ControllerMessage {
                kind: Some(controller_message::Kind::Peers(CachePeers {
                    peers,
                    delta,
                    removed,
                })),
            })
        };
        let peer = |(node, address): (&String, &String)| CachePeer {
            node_name: node.clone(),
            address: address.clone(),
        };
        let whole = message(peers.iter().map(peer).collect(), false, Vec::new());
        let delta = before.map(|b| {
            let changed = peers
                .iter()
                .filter(|(node, address)| b.peers.get(*node) != Some(*address))
                .map(peer)
                .collect();
            let removed = b
                .peers
                .keys()
                .filter(|node| !peers.contains_key(*node))
                .cloned()
                .collect();
            (b.since, message(changed, true, removed))
        });
        Self {
            peers,
            since,
            whole,
            delta,
        }
    }
}

/// The published sets and the debounce that recomputes them.
#[derive(Debug)]
pub(crate) struct Peers {
    tx: watch::Sender<Arc<PeerSets>>,
    changed: Arc<Notify>,
    started: AtomicBool,
}

impl Default for Peers {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(Arc::default()),
            changed: Arc::default(),
            started: AtomicBool::new(false),
        }
    }
}

impl Peers {
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<PeerSets>> {
        self.tx.subscribe()
    }

    /// An agent that serves peers connected or left. Starts the debounce task on first use
    /// (needs a Tokio runtime: called from the sessions).
    pub(crate) fn changed(&self, agents: &Arc<Agents>) {
        if !self.started.swap(true, Ordering::Relaxed) {
            tokio::spawn(debounce(Arc::downgrade(agents), self.changed.clone()));
        }
        self.changed.notify_one();
    }

    /// An agent that serves peers left (no runtime needed: the task runs since it joined).
    pub(crate) fn notify(&self) {
        self.changed.notify_one();
    }

    /// Publishes the sets of `agents` (see [`PeerSets::next`]) if their lists differ from
    /// those in force.
    fn publish<'a>(&self, agents: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) {
        self.tx.send_if_modified(|current| {
            let sets = current.next(agents);
            if sets.same_lists(current) {
                return false;
            }
            tracing::debug!(zones = ?sets.nodes(), "cache peer sets recomputed");
            *current = Arc::new(sets);
            true
        });
    }
}

/// Recomputes the sets [`DEBOUNCE`] after the first change of a burst; ends with the
/// registry.
async fn debounce(agents: Weak<Agents>, changed: Arc<Notify>) {
    loop {
        changed.notified().await;
        tokio::time::sleep(DEBOUNCE).await;
        let Some(agents) = agents.upgrade() else {
            return;
        };
        let serving = agents.peer_addresses();
        agents.peers.publish(
            serving
                .iter()
                .map(|(n, z, a)| (n.as_str(), z.as_str(), a.as_str())),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn message(m: &Encoded) -> CachePeers {
        match ControllerMessage::decode(m.0.clone()).map(|m| m.kind) {
            Ok(Some(controller_message::Kind::Peers(p))) => p,
            other => panic!("not a peer list: {other:?}"),
        }
    }

    fn decode(m: &Encoded) -> Vec<(String, String)> {
        let p = message(m);
        assert!(!p.delta && p.removed.is_empty(), "a whole list: {p:?}");
        p.peers
            .into_iter()
            .map(|p| (p.node_name, p.address))
            .collect()
    }

    fn whole<'a>(sets: &'a PeerSets, zone: &str) -> Option<&'a Encoded> {
        sets.zone(zone).map(|z| &z.whole)
    }

    #[test]
    fn sets_are_per_zone_sorted_by_node_and_leave_out_agents_without_an_address() {
        let sets = PeerSets::of([
            ("n2", "a", "10.0.0.2:15001"),
            ("n1", "a", "10.0.0.1:15001"),
            ("n3", "b", "10.0.1.3:15001"),
            ("n4", "a", ""),
            // n1 reconnected (a restart hand-off): its newest session wins.
            ("n1", "a", "10.0.0.9:15001"),
        ]);
        assert_eq!(
            decode(whole(&sets, "a").expect("zone a")),
            [
                ("n1".to_string(), "10.0.0.9:15001".to_string()),
                ("n2".to_string(), "10.0.0.2:15001".to_string())
            ]
        );
        assert_eq!(decode(whole(&sets, "b").expect("zone b")).len(), 1);
        assert!(sets.zone("").is_none(), "no agent without a zone serves");
        assert_eq!(
            sets.nodes(),
            BTreeMap::from([("a", vec!["n1", "n2"]), ("b", vec!["n3"])])
        );
    }

    #[test]
    fn a_changed_zone_gets_a_delta_from_its_last_list_and_an_unchanged_one_keeps_its_own() {
        let first = PeerSets::of([
            ("n1", "a", "10.0.0.1:15001"),
            ("n2", "a", "10.0.0.2:15001"),
            ("n3", "a", "10.0.0.3:15001"),
            ("m1", "b", "10.0.1.1:15001"),
        ]);
        assert!(
            first.zone("a").expect("a").delta.is_none(),
            "nothing to start from"
        );
        // n2 left, n4 joined, n3 came back on another address; zone b is as it was.
        let second = first.next([
            ("n1", "a", "10.0.0.1:15001"),
            ("n3", "a", "10.0.0.33:15001"),
            ("n4", "a", "10.0.0.4:15001"),
            ("m1", "b", "10.0.1.1:15001"),
        ]);
        let a = second.zone("a").expect("a");
        assert_eq!(a.since, 2);
        let (from, delta) = a.delta.as_ref().expect("a delta");
        assert_eq!(*from, first.zone("a").expect("a").since);
        let delta = message(delta);
        assert!(delta.delta);
        assert_eq!(delta.removed, ["n2"]);
        let changed: Vec<_> = delta.peers.iter().map(|p| p.node_name.as_str()).collect();
        assert_eq!(changed, ["n3", "n4"]);
        assert_eq!(decode(&a.whole).len(), 3);
        let b = second.zone("b").expect("b");
        assert_eq!(
            b.since, 1,
            "unchanged: what its agents hold is still current"
        );
        assert!(!second.same_lists(&first));
        assert!(second.same_lists(&second.next([
            ("n4", "a", "10.0.0.4:15001"),
            ("n3", "a", "10.0.0.33:15001"),
            ("n1", "a", "10.0.0.1:15001"),
            ("m1", "b", "10.0.1.1:15001"),
        ])));
    }

    #[test]
    fn equal_sets_are_not_published_again() {
        let peers = Peers::default();
        let mut rx = peers.subscribe();
        rx.borrow_and_update();
        peers.publish([("n1", "", "127.0.0.1:1")]);
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        peers.publish([("n1", "", "127.0.0.1:1")]);
        assert!(!rx.has_changed().expect("open"), "same set, no new message");
    }
}
