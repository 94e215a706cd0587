//! Cache peer sets: for each zone, the connected agents that serve cache peer fills (those
//! whose Hello gave a `cache_peer_address`), pushed to each of them as a `CachePeers`
//! message. An agent hashes an object's key over its set to find the agent that owns it.
//!
//! Agents come and go in bursts (a rolling update restarts them all), and each change would
//! send every agent of the zone a new list, so changes are debounced ([`DEBOUNCE`]): a burst
//! costs one list per agent. A list lags reality by that much at most, which costs little:
//! an agent that asks a peer that is gone marks it down and asks the next owner, or the
//! origin. Each zone's message is encoded once and shared by its sessions. Sets are scoped
//! to a zone because a peer fill across zones pays cross-zone latency and bytes.
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
#[derive(Debug, Default, PartialEq)]
pub(crate) struct PeerSets {
    zones: BTreeMap<String, ZoneSet>,
}

#[derive(Debug, PartialEq)]
struct ZoneSet {
    peers: Vec<CachePeer>,
    message: Encoded,
}

impl PeerSets {
    /// The sets for `agents`: (node name, zone, peer address) of each session, oldest session
    /// first. A node connected twice (an agent hands over to its successor) counts once,
    /// with its newest session's address.
    pub(crate) fn of<'a>(agents: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>) -> Self {
        let mut by_zone: BTreeMap<&str, BTreeMap<&str, &str>> = BTreeMap::new();
        for (node, zone, address) in agents {
            if !address.is_empty() {
                by_zone.entry(zone).or_default().insert(node, address);
            }
        }
        let zones = by_zone
            .into_iter()
            .map(|(zone, nodes)| {
                let peers: Vec<CachePeer> = nodes
                    .into_iter()
                    .map(|(node, address)| CachePeer {
                        node_name: node.to_owned(),
                        address: address.to_owned(),
                    })
                    .collect();
                let message = Encoded::of(&ControllerMessage {
                    kind: Some(controller_message::Kind::Peers(CachePeers {
                        peers: peers.clone(),
                    })),
                });
                (zone.to_owned(), ZoneSet { peers, message })
            })
            .collect();
        Self { zones }
    }

    /// The message for the agents of `zone` (`None`: no agent of the zone serves peers).
    pub(crate) fn message(&self, zone: &str) -> Option<&Encoded> {
        self.zones.get(zone).map(|z| &z.message)
    }

    /// Node names by zone, for `/state`.
    pub(crate) fn nodes(&self) -> BTreeMap<String, Vec<String>> {
        self.zones
            .iter()
            .map(|(zone, z)| {
                let nodes = z.peers.iter().map(|p| p.node_name.clone()).collect();
                (zone.clone(), nodes)
            })
            .collect()
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

    /// Publishes `sets` if they differ from those in force.
    fn publish(&self, sets: PeerSets) {
        self.tx.send_if_modified(|current| {
            if **current == sets {
                return false;
            }
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
        let sets = agents.peer_sets();
        tracing::debug!(zones = ?sets.nodes(), "cache peer sets recomputed");
        agents.peers.publish(sets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn decode(m: &Encoded) -> Vec<(String, String)> {
        match ControllerMessage::decode(m.0.clone()).map(|m| m.kind) {
            Ok(Some(controller_message::Kind::Peers(p))) => p
                .peers
                .into_iter()
                .map(|p| (p.node_name, p.address))
                .collect(),
            other => panic!("not a peer list: {other:?}"),
        }
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
            decode(sets.message("a").expect("zone a")),
            [
                ("n1".to_string(), "10.0.0.9:15001".to_string()),
                ("n2".to_string(), "10.0.0.2:15001".to_string())
            ]
        );
        assert_eq!(decode(sets.message("b").expect("zone b")).len(), 1);
        assert!(sets.message("").is_none(), "no agent without a zone serves");
        assert_eq!(
            sets.nodes(),
            BTreeMap::from([
                ("a".to_string(), vec!["n1".to_string(), "n2".to_string()]),
                ("b".to_string(), vec!["n3".to_string()])
            ])
        );
    }

    #[test]
    fn equal_sets_are_not_published_again() {
        let peers = Peers::default();
        let mut rx = peers.subscribe();
        rx.borrow_and_update();
        peers.publish(PeerSets::of([("n1", "", "127.0.0.1:1")]));
        assert!(rx.has_changed().expect("open"));
        rx.borrow_and_update();
        peers.publish(PeerSets::of([("n1", "", "127.0.0.1:1")]));
        assert!(!rx.has_changed().expect("open"), "same set, no new message");
    }
}
