//! Writing the `NodeAgent` objects ([`crate::model::NodeAgent`], cluster-scoped): one object
//! per node, named after the agent's `--node-name` (Hello.node_name). They are status only:
//! users read them with `kubectl get nodeagents` and never write them.
//!
//! Who writes what:
//! - **every replica** creates and status-patches the NodeAgents of the agents connected to
//!   *it* ([`run_writer`]): each agent's stream ends at exactly one replica, and only that
//!   replica knows its ACKs, NACKs and load reports. Writes are level-based and batched: once
//!   per [`WRITE_EVERY`] the desired status of every connected agent is compared with what the
//!   object carries, and only differing objects get a JSON merge patch of the differing
//!   fields, so a flapping agent costs at most one PATCH per period.
//! - when an agent disconnects, its replica sets `connected: false` only while
//!   `status.controller` still names this replica (the agent may have reconnected to
//!   another one meanwhile); the patch carries the resourceVersion it checked, so a racing
//!   takeover wins with `409 Conflict`.
//! - **the leader** reads all NodeAgents (a reflector) to count each policy's agents for
//!   TrafficPolicy status ([`crate::k8s::status`]), and deletes NodeAgents whose Node has been
//!   gone for [`Cleanup::grace`] ([`run_cleanup`]). The grace runs from the moment the leader
//!   first sees the NodeAgent without its Node *after* the Node list synced, so an agent
//!   that registers before its Node object is listed is not deleted.
//!
//! Table versions are numbered per controller process, so they mean nothing to another
//! replica. `appliedGenerations` is what replicas share instead: the generation of every
//! TrafficPolicy whose current spec is in the table the agent applied, as the writing
//! replica knows it. The last NACK keeps the agent's error text verbatim so that
//! `kubectl get nodeagent NODE -o yaml` says why an update was refused.

use crate::model::{NodeAgent, NodeAgentNack, NodeAgentSpec, NodeAgentStatus};
use crate::serve::hub::{Carried, Hub};
use crate::serve::server::{AgentState, Agents};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Shortest time between two writes of the same NodeAgent by one replica.
pub(crate) const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The field manager named in NodeAgent writes.
pub(crate) const FIELD_MANAGER: &str = "weir-controller";

/// Unix milliseconds as a Kubernetes `Time`, truncated to whole seconds: `metav1.Time`
/// travels with second precision, and a value that changes in the round trip would make
/// every comparison with the stored object differ and rewrite it forever.
fn time_of(unix_ms: u64) -> Option<Time> {
    let secs = i64::try_from(unix_ms / 1000).ok()?;
    Timestamp::from_second(secs).ok().map(Time)
}

/// Hits ÷ (hits + misses), rounded to two decimals so that a busy agent's ratio does not
/// change (and cause a write) on every load report. `None` before any cacheable request.
pub(crate) fn hit_ratio(hits: u64, misses: u64) -> Option<f64> {
    let total = hits.saturating_add(misses);
    (total > 0).then(|| ((hits as f64 / total as f64) * 100.0).round() / 100.0)
}

/// The status the replica `controller` wants for the NodeAgent of `agent`, connected to it.
/// `carried` is the hub's [`crate::serve::hub::ConfigState::carried`]; `current` is the status the
/// object has now. What this session has not learnt yet (no NACK, no load report, no ACK
/// since the agent reconnected) keeps the object's current value rather than erasing it.
pub(crate) fn desired_status(
    agent: &AgentState,
    controller: &str,
    carried: &BTreeMap<String, Carried>,
    current: Option<&NodeAgentStatus>,
) -> NodeAgentStatus {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let applied = agent.applied_version;
    NodeAgentStatus {
        connected: true,
        controller: Some(controller.to_string()),
        zone: non_empty(&agent.zone).or_else(|| current.and_then(|c| c.zone.clone())),
        agent_version: non_empty(&agent.agent_version),
        applied_version: (applied > 0).then_some(applied),
        last_ack_time: agent
            .last_ack_unix_ms
            .and_then(time_of)
            .or_else(|| current.and_then(|c| c.last_ack_time.clone())),
        last_nack: match &agent.last_nack {
            Some(n) => Some(NodeAgentNack {
                version: n.version,
                error: n.error.clone(),
                time: time_of(n.at_unix_ms),
            }),
            None => current.and_then(|c| c.last_nack.clone()),
        },
        cache_hit_ratio: match agent.cache {
            Some(c) if c.hits.saturating_add(c.misses) > 0 => hit_ratio(c.hits, c.misses),
            _ => current.and_then(|c| c.cache_hit_ratio),
        },
        applied_generations: if applied == 0 {
            BTreeMap::new()
        } else {
            carried
                .iter()
                .filter(|(_, c)| c.since_version <= applied)
                .map(|(k, c)| (k.clone(), c.generation))
                .collect()
        },
    }
}

/// A JSON merge patch (RFC 7386) that turns `old` into `new`: changed and added fields,
/// and `null` for removed ones (at any depth, so a policy dropped from
/// `appliedGenerations` is removed rather than kept by the merge). Unchanged fields are
/// left out. `None` when nothing differs.
pub(crate) fn merge_patch_between(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = serde_json::Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) => {
                        if let Some(p) = merge_patch_between(ov, nv) {
                            patch.insert(k.clone(), p);
                        }
                    }
                    None => {
                        patch.insert(k.clone(), nv.clone());
                    }
                }
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        (o, n) if o == n => None,
        (_, n) => Some(n.clone()),
    }
}

/// Whether this replica (`me`) should mark a NodeAgent disconnected: it says it is
/// connected to `me`, and its agent is not connected here any more.
pub(crate) fn should_disconnect(
    status: Option<&NodeAgentStatus>,
    me: &str,
    connected_here: bool,
) -> bool {
    !connected_here && status.is_some_and(|s| s.connected && s.controller.as_deref() == Some(me))
}

/// The agents connected here, one per node: when an agent reconnects, its old stream may
/// linger for a moment, and the newest session is the one that counts.
pub(crate) fn by_node(agents: Vec<AgentState>) -> BTreeMap<String, AgentState> {
    let mut out: BTreeMap<String, AgentState> = BTreeMap::new();
    for a in agents {
        match out.get(&a.node_name) {
            Some(b) if b.connected_at_unix_ms > a.connected_at_unix_ms => {}
            _ => {
                out.insert(a.node_name.clone(), a);
            }
        }
    }
    out
}

/// What a writer last wrote to one NodeAgent, and the object's resourceVersion in the
/// store at that moment: until the store moves past it, the write stands in for the store.
struct Written {
    status: NodeAgentStatus,
    seen_version: Option<String>,
}

/// Writes the NodeAgents of the agents connected to this replica (`identity`), forever.
/// Runs on every replica, leader or not. Errors are logged and retried on the next period.
pub async fn run_writer(
    client: Client,
    hub: Arc<Hub>,
    agents: Arc<Agents>,
    store: Store<NodeAgent>,
    mut synced: watch::Receiver<bool>,
    identity: String,
) {
    // Without the list, every NodeAgent would look missing and be created again.
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let api: Api<NodeAgent> = Api::all(client);
    let mut written: BTreeMap<String, Written> = BTreeMap::new();
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = hub.config_state();
        let connected = by_node(agents.list());
        let mut keep = BTreeMap::new();
        for (node, agent) in &connected {
            let object = store.get(&ObjectRef::new(node));
            let version = object
                .as_ref()
                .and_then(|o| o.metadata.resource_version.clone());
            let mine = written
                .remove(node)
                .filter(|w| object.is_some() && w.seen_version == version);
            let current = match &mine {
                Some(w) => Some(&w.status),
                None => object.as_ref().and_then(|o| o.status.as_ref()),
            };
            let desired = desired_status(agent, &identity, &config.carried, current);
            let old =
                serde_json::to_value(current.cloned().unwrap_or_default()).unwrap_or_default();
            let new = serde_json::to_value(&desired).unwrap_or_default();
            let Some(patch) = merge_patch_between(&old, &new).filter(|_| current != Some(&desired))
            else {
                if let Some(w) = mine {
                    keep.insert(node.clone(), w);
                }
                continue;
            };
            if object.is_none() {
                let fresh = NodeAgent::new(node, NodeAgentSpec {});
                let params = PostParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..PostParams::default()
                };
                match api.create(&params, &fresh).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "cannot create NodeAgent; retrying");
                        continue;
                    }
                }
            }
            // Without a stored object the whole status is sent (`old` was empty).
            let body = serde_json::json!({ "status": patch });
            match api
                .patch_status(
                    node,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Merge(&body),
                )
                .await
            {
                Ok(_) => {
                    keep.insert(
                        node.clone(),
                        Written {
                            status: desired,
                            seen_version: version,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot write NodeAgent status; retrying");
                }
            }
        }
        written = keep;
        // Agents that left this replica: level-based over the store, so a NodeAgent left
        // `connected` by this replica's previous life (same pod name) is fixed too.
        for object in store.state() {
            let node = object.name_any();
            if !should_disconnect(
                object.status.as_ref(),
                &identity,
                connected.contains_key(&node),
            ) {
                continue;
            }
            let body = serde_json::json!({
                "metadata": { "resourceVersion": object.metadata.resource_version },
                "status": { "connected": false },
            });
            match api
                .patch_status(
                    &node,
                    &PatchParams::apply(FIELD_MANAGER),
                    &Patch::Merge(&body),
                )
                .await
            {
                Ok(_) => tracing::info!(%node, "NodeAgent marked disconnected"),
                // Another replica took the agent over (or the object is gone): theirs now.
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(%node, error = %e, "cannot mark NodeAgent disconnected; retrying");
                }
            }
        }
    }
}

/// Timing of the leader's NodeAgent garbage collection.
#[derive(Clone, Copy, Debug)]
pub struct Cleanup {
    /// How long a NodeAgent's Node must have been missing before the NodeAgent is deleted.
    pub grace: Duration,
}

/// NodeAgents to delete: those whose Node has been missing for `grace` or longer. Takes
/// the NodeAgent and Node names now, and when each NodeAgent was first seen without its
/// Node (`missing_since`, from the previous call); returns the updated map and the names
/// to delete. A NodeAgent whose Node appears (again) is forgotten.
pub(crate) fn gone_nodes(
    nodeagents: &[String],
    nodes: &BTreeSet<String>,
    missing_since: &BTreeMap<String, Instant>,
    now: Instant,
    grace: Duration,
) -> (BTreeMap<String, Instant>, Vec<String>) {
    let mut missing = BTreeMap::new();
    let mut delete = Vec::new();
    for name in nodeagents.iter().filter(|n| !nodes.contains(*n)) {
        let since = missing_since.get(name).copied().unwrap_or(now);
        if now.saturating_duration_since(since) >= grace {
            delete.push(name.clone());
        }
        missing.insert(name.clone(), since);
    }
    (missing, delete)
}

/// Deletes NodeAgents of Nodes that are gone, while this replica leads.
pub async fn run_cleanup(
    client: Client,
    nodeagents: Store<NodeAgent>,
    nodes: Store<Node>,
    mut synced: watch::Receiver<bool>,
    config: Cleanup,
    mut leader: watch::Receiver<bool>,
) {
    // Before the Node list, every NodeAgent would look orphaned.
    if synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let api: Api<NodeAgent> = Api::all(client);
    let mut missing: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !*leader.borrow_and_update() {
            // A new leader starts the grace afresh: it cannot know how long the Node was gone.
            missing.clear();
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let names: Vec<String> = nodeagents.state().iter().map(|n| n.name_any()).collect();
        let present: BTreeSet<String> = nodes.state().iter().map(|n| n.name_any()).collect();
        let (still_missing, delete) =
            gone_nodes(&names, &present, &missing, Instant::now(), config.grace);
        missing = still_missing;
        for name in delete {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(node = %name, "Node is gone; NodeAgent deleted");
                    missing.remove(&name);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    missing.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot delete NodeAgent; retrying")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::server::{CacheTotals, NackState};
    use serde_json::json;

    fn agent(applied: u64) -> AgentState {
        AgentState {
            node_name: "n1".into(),
            zone: "z1".into(),
            agent_version: "0.1.0".into(),
            peer: String::new(),
            cache_peer_address: String::new(),
            connected_at_unix_ms: 0,
            sent_version: applied,
            applied_version: applied,
            last_ack_unix_ms: Some(1_700_000_000_999),
            last_nack: None,
            cache: None,
            last_report_unix_ms: None,
        }
    }

    fn carried() -> BTreeMap<String, Carried> {
        BTreeMap::from([
            (
                "ns/old".to_string(),
                Carried {
                    generation: 3,
                    since_version: 10,
                },
            ),
            (
                "ns/new".to_string(),
                Carried {
                    generation: 7,
                    since_version: 12,
                },
            ),
        ])
    }

    #[test]
    fn applied_generations_are_those_carried_by_the_applied_version() {
        let s = desired_status(&agent(11), "ctrl-a", &carried(), None);
        assert!(s.connected);
        assert_eq!(s.controller.as_deref(), Some("ctrl-a"));
        assert_eq!(s.applied_version, Some(11));
        assert_eq!(
            s.applied_generations,
            BTreeMap::from([("ns/old".to_string(), 3)])
        );
        // Truncated to seconds, as metav1.Time is stored.
        assert_eq!(s.last_ack_time, time_of(1_700_000_000_000));
        let none_yet = desired_status(&agent(0), "ctrl-a", &carried(), None);
        assert!(none_yet.applied_generations.is_empty());
        assert_eq!(none_yet.applied_version, None);
    }

    #[test]
    fn nack_and_cache_ratio_come_from_the_session_and_survive_a_reconnect() {
        let mut a = agent(12);
        a.last_nack = Some(NackState {
            version: 13,
            error: "route x: bad".into(),
            at_unix_ms: 1_700_000_100_000,
        });
        a.cache = Some(CacheTotals { hits: 3, misses: 1 });
        let s = desired_status(&a, "ctrl-a", &carried(), None);
        let nack = s.last_nack.clone().expect("nack");
        assert_eq!((nack.version, nack.error.as_str()), (13, "route x: bad"));
        assert_eq!(s.cache_hit_ratio, Some(0.75));

        // A new session knows neither yet: the object's values stay.
        let fresh = desired_status(&agent(0), "ctrl-b", &carried(), Some(&s));
        assert_eq!(fresh.last_nack, s.last_nack);
        assert_eq!(fresh.cache_hit_ratio, Some(0.75));
        assert_eq!(fresh.controller.as_deref(), Some("ctrl-b"));
    }

    #[test]
    fn hit_ratio_is_rounded_and_absent_without_requests() {
        assert_eq!(hit_ratio(0, 0), None);
        assert_eq!(hit_ratio(2, 1), Some(0.67));
        assert_eq!(hit_ratio(5, 0), Some(1.0));
    }

    #[test]
    fn merge_patch_has_changed_fields_and_nulls_for_removed_ones() {
        let old =
            json!({"connected": true, "zone": "z1", "appliedGenerations": {"a/x": 1, "a/y": 2}});
        let new = json!({"connected": true, "appliedGenerations": {"a/x": 2}});
        assert_eq!(
            merge_patch_between(&old, &new),
            Some(json!({"zone": null, "appliedGenerations": {"a/x": 2, "a/y": null}}))
        );
        assert_eq!(merge_patch_between(&new, &new), None);
    }

    #[test]
    fn only_the_replica_named_in_the_status_marks_an_agent_disconnected() {
        let status = |controller: &str, connected| NodeAgentStatus {
            connected,
            controller: Some(controller.into()),
            ..NodeAgentStatus::default()
        };
        assert!(should_disconnect(Some(&status("a", true)), "a", false));
        assert!(
            !should_disconnect(Some(&status("b", true)), "a", false),
            "taken over by b"
        );
        assert!(
            !should_disconnect(Some(&status("a", true)), "a", true),
            "still here"
        );
        assert!(
            !should_disconnect(Some(&status("a", false)), "a", false),
            "already marked"
        );
        assert!(!should_disconnect(None, "a", false));
    }

    #[test]
    fn newest_session_of_a_node_wins() {
        let mut old = agent(5);
        old.connected_at_unix_ms = 1;
        let mut new = agent(0);
        new.connected_at_unix_ms = 2;
        let nodes = by_node(vec![new, old]);
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes["n1"].connected_at_unix_ms, 2);
    }

    #[test]
    fn nodeagents_are_deleted_only_after_their_node_is_gone_for_the_grace() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let names = vec!["kept".to_string(), "gone".to_string()];
        let nodes = BTreeSet::from(["kept".to_string()]);
        let (missing, delete) = gone_nodes(&names, &nodes, &BTreeMap::new(), t0, grace);
        assert!(
            delete.is_empty(),
            "the grace starts when the Node is first seen missing"
        );
        assert_eq!(missing.keys().collect::<Vec<_>>(), ["gone"]);
        let (missing, delete) = gone_nodes(&names, &nodes, &missing, t0 + grace, grace);
        assert_eq!(delete, ["gone"]);

        // The Node shows up within the grace: forgotten, never deleted.
        let all = BTreeSet::from(["kept".to_string(), "gone".to_string()]);
        let (missing, delete) = gone_nodes(&names, &all, &missing, t0 + grace * 2, grace);
        assert!(delete.is_empty() && missing.is_empty());
    }
}
