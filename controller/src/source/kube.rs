//! Kubernetes mode's driver: follows TrafficPolicies, Services and EndpointSlices in all
//! namespaces with kube-rs reflectors and feeds the hub, exactly as [`crate::source::watch`] does
//! for a folder. The hub and the routing computation do not know which source fed them.
//!
//! Every watch event only wakes the loop; the snapshot is rebuilt from the reflector stores
//! after a short quiet time, so a burst (a rollout touching dozens of slices, a relist after
//! a `410 Gone`) becomes one computation. The first snapshot is built only after every
//! reflector has listed once: publishing a table from a half-listed cluster would tell agents
//! that Services not listed yet have no endpoints.
//!
//! Nodes and NodeAgents are reflected too, but they do not feed routing (the routing
//! computation reads an endpoint's zone from its EndpointSlice) and their events do not
//! wake the loop: NodeAgents change with every agent ACK, and recomputing routing for that
//! would be waste. The NodeAgent store serves the NodeAgent writer and the status writer
//! (agent counts); the Node store serves the leader's NodeAgent cleanup. `/readyz` does not
//! wait for them.

use crate::model::NodeAgent;
use crate::model::{EndpointSlice, ObjectKey, Service, TrafficPolicy};
use crate::routing::{PolicyInput, Snapshot};
use crate::serve::hub::Hub;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Quiet time after the last watch event before the snapshot is rebuilt.
pub(crate) const DEBOUNCE: Duration = Duration::from_millis(30);
/// Longest a continuous stream of events may postpone a rebuild, so routing still follows a
/// cluster that never goes quiet.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(60);

/// Why Kubernetes mode stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A watch stream ended, which only happens when its task is gone.
    #[error("the {0} watch stopped")]
    WatchStopped(&'static str),
    /// A watch task panicked (a bug; the controller exits so that it is restarted).
    #[error("a watch task failed: {0}")]
    WatchPanicked(String),
    /// A reflector's store was dropped before its first list completed.
    #[error("the {0} reflector stopped before its first list")]
    NeverSynced(&'static str),
}

/// The reflector stores the snapshot is built from.
#[derive(Clone)]
pub struct Stores {
    /// TrafficPolicies of all namespaces.
    pub policies: Store<TrafficPolicy>,
    /// Services of all namespaces.
    pub services: Store<Service>,
    /// EndpointSlices of all namespaces.
    pub slices: Store<EndpointSlice>,
    /// NodeAgents (cluster-scoped).
    pub nodeagents: Store<NodeAgent>,
    /// Nodes.
    pub nodes: Store<Node>,
    /// Turns true once the NodeAgent and Node stores have listed. Waiters share this
    /// instead of calling `Store::wait_until_ready` themselves: kube-runtime 4's readiness
    /// is a oneshot that wakes only the last task that polled it, so a second waiter on the
    /// same store would hang forever.
    pub agents_synced: tokio::sync::watch::Receiver<bool>,
}

/// Waits (as the one waiter) until both stores have listed, then publishes `true`.
fn signal_synced(
    nodeagents: Store<NodeAgent>,
    nodes: Store<Node>,
) -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        if nodeagents.wait_until_ready().await.is_ok() && nodes.wait_until_ready().await.is_ok() {
            tx.send_replace(true);
        }
        // Otherwise a reflector is gone; the source reports that and the process exits.
        // Keep the sender alive so that waiters wait rather than error out meanwhile.
        std::future::pending::<()>().await;
    });
    rx
}

impl Stores {
    /// The routing input as the stores hold it now.
    pub(crate) fn snapshot(&self) -> Snapshot {
        snapshot_of(
            &self.policies.state(),
            &self.services.state(),
            &self.slices.state(),
        )
    }
}

/// Builds a snapshot from listed objects. Policies are ordered by (creationTimestamp,
/// namespace/name): the older policy wins a host conflict, as Gateway API does for routes.
pub(crate) fn snapshot_of(
    policies: &[Arc<TrafficPolicy>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> Snapshot {
    let mut ordered: Vec<_> = policies
        .iter()
        .map(|p| {
            let created = p.meta().creation_timestamp.as_ref().map(|t| t.0);
            (created, ObjectKey::of(p.meta()), p)
        })
        .collect();
    // `None` (never set by a real API server) sorts first, deterministically.
    ordered.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Snapshot {
        policies: ordered
            .into_iter()
            .map(|(_, key, p)| {
                Arc::new(PolicyInput {
                    key,
                    source: "kubernetes".to_string(),
                    generation: p.meta().generation,
                    spec: Ok(p.spec.clone()),
                })
            })
            .collect(),
        services: services
            .iter()
            .map(|s| (ObjectKey::of(s.meta()), s.clone()))
            .collect(),
        slices: slices
            .iter()
            .map(|s| (ObjectKey::of(s.meta()), s.clone()))
            .collect(),
    }
}

/// Starts one reflector for `K` in all namespaces; every event sends a wake-up on `wake`,
/// if given.
fn reflect<K>(
    client: &Client,
    kind: &'static str,
    wake: Option<mpsc::Sender<()>>,
) -> (Store<K>, tokio::task::JoinHandle<Error>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
        // Backoff on errors (API server down, 410 handled inside the watcher by relisting).
        .default_backoff();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => {
                    // A full channel already holds a wake-up: nothing is lost by dropping it.
                    if let Some(wake) = &wake {
                        let _ = wake.try_send(());
                    }
                }
                Err(e) => {
                    tracing::warn!(kind, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
        Error::WatchStopped(kind)
    });
    (reader, task)
}

/// The reflectors of Kubernetes mode, started and listing.
pub struct Source {
    /// What the reflectors hold; shared with the status writer.
    pub stores: Stores,
    tasks: Vec<tokio::task::JoinHandle<Error>>,
    wake: mpsc::Receiver<()>,
}

impl Source {
    /// Starts the reflectors (TrafficPolicies, Services and EndpointSlices in all
    /// namespaces; NodeAgents and Nodes).
    pub fn start(client: &Client) -> Self {
        let (wake_tx, wake) = mpsc::channel(1);
        let (policies, p_task) =
            reflect::<TrafficPolicy>(client, "TrafficPolicy", Some(wake_tx.clone()));
        let (services, s_task) = reflect::<Service>(client, "Service", Some(wake_tx.clone()));
        let (slices, e_task) = reflect::<EndpointSlice>(client, "EndpointSlice", Some(wake_tx));
        let (nodeagents, a_task) = reflect::<NodeAgent>(client, "NodeAgent", None);
        let (nodes, n_task) = reflect::<Node>(client, "Node", None);
        let agents_synced = signal_synced(nodeagents.clone(), nodes.clone());
        Self {
            stores: Stores {
                policies,
                services,
                slices,
                nodeagents,
                nodes,
                agents_synced,
            },
            tasks: vec![p_task, s_task, e_task, a_task, n_task],
            wake,
        }
    }

    /// Feeds `hub` until a watch stops. The hub's `loaded` flag (and so `/readyz`) turns
    /// true with the first snapshot, which waits for every reflector's first list.
    pub async fn run(self, hub: Arc<Hub>) -> Result<(), Error> {
        let Self {
            stores,
            tasks,
            mut wake,
        } = self;
        let mut tasks = futures::future::select_all(tasks);
        let synced = async {
            stores
                .policies
                .wait_until_ready()
                .await
                .map_err(|_| Error::NeverSynced("TrafficPolicy"))?;
            stores
                .services
                .wait_until_ready()
                .await
                .map_err(|_| Error::NeverSynced("Service"))?;
            stores
                .slices
                .wait_until_ready()
                .await
                .map_err(|_| Error::NeverSynced("EndpointSlice"))
        };
        tokio::select! {
            r = synced => r?,
            (r, _, _) = &mut tasks => return Err(stopped(r)),
        }
        tracing::info!("all reflectors synced");
        hub.update(stores.snapshot(), Vec::new());

        loop {
            tokio::select! {
                w = wake.recv() => {
                    if w.is_none() {
                        return Err(Error::WatchStopped("every"));
                    }
                    // Debounce: wait for a quiet moment, but not longer than MAX_DELAY.
                    let seen = Instant::now();
                    let deadline = seen + MAX_DELAY;
                    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                        match tokio::time::timeout(DEBOUNCE.min(left), wake.recv()).await {
                            Ok(Some(())) => continue,
                            Ok(None) | Err(_) => break,
                        }
                    }
                    hub.update_seen(stores.snapshot(), Vec::new(), seen);
                }
                (r, _, _) = &mut tasks => return Err(stopped(r)),
            }
        }
    }
}

fn stopped(r: Result<Error, tokio::task::JoinError>) -> Error {
    match r {
        Ok(e) => e,
        Err(e) => Error::WatchPanicked(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn tp(ns: &str, name: &str, created_s: i64, generation: i64) -> Arc<TrafficPolicy> {
        let mut p = TrafficPolicy::new(name, Default::default());
        p.metadata.namespace = Some(ns.into());
        p.metadata.generation = Some(generation);
        p.metadata.creation_timestamp = Timestamp::from_second(created_s).ok().map(Time);
        Arc::new(p)
    }

    #[test]
    fn snapshot_orders_policies_by_creation_then_key() {
        let snap = snapshot_of(
            &[
                tp("b", "x", 20, 1),
                tp("a", "y", 20, 2),
                tp("z", "old", 10, 3),
            ],
            &[],
            &[],
        );
        let keys: Vec<String> = snap.policies.iter().map(|p| p.key.to_string()).collect();
        assert_eq!(keys, ["z/old", "a/y", "b/x"]);
        assert_eq!(snap.policies[0].generation, Some(3));
        assert_eq!(snap.policies[0].source, "kubernetes");
    }
}
