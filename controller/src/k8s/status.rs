//! TrafficPolicy status: what the hub decided and how many agents applied it, written back to
//! the API server (Kubernetes mode, leader only).
//!
//! `agents` counts the agents of every replica: each replica writes the NodeAgents of the
//! agents connected to it ([`crate::k8s::nodeagent`]), and the leader sums them per policy
//! ([`agents_for_policy`]): `total` is the connected NodeAgents, `synced` those whose
//! `appliedGenerations` has the policy at its current generation or later.
//!
//! The leader also records Kubernetes Events on the policy when its status changes in a
//! way a user should hear about ([`events_for`]): `FailoverActivated` / `FailoverRecovered`
//! when `activeTier` changes, `Rejected` when `Accepted` turns False and `Accepted` when it
//! turns True again. Transitions are taken between the status the object carries and the
//! one just written, so a new leader does not repeat its predecessor's events, and nothing
//! is sent while a state merely persists.
//!
//! [`policy_status`] is the pure conversion from a [`PolicyState`] to a
//! [`TrafficPolicyStatus`] with standard `metav1.Condition`s. [`run`] is the thin writer
//! around it: it wakes at most once per [`WRITE_EVERY`], computes every policy's status, and
//! merge-patches the status subresource only of policies whose status differs from the one
//! they carry. So a flapping endpoint costs at most one PATCH per policy per period, however
//! fast it flaps.

use crate::model::NodeAgent;
use crate::model::{AgentsStatus, ObjectKey, TrafficPolicy, TrafficPolicyStatus};
use crate::routing::{PolicyState, Reason};
use crate::serve::hub::Hub;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Shortest time between two status writes of the same policy.
pub(crate) const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The field manager named in status patches.
pub(crate) const FIELD_MANAGER: &str = "weir-controller";

/// `synced`/`total` of the agents of all replicas for the policy `key` at `generation`:
/// `total` counts connected NodeAgents, `synced` those among them that run the policy at
/// `generation` or later.
pub(crate) fn agents_for_policy(
    nodeagents: &[Arc<NodeAgent>],
    key: &str,
    generation: i64,
) -> AgentsStatus {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let connected: Vec<_> = nodeagents
        .iter()
        .filter_map(|n| n.status.as_ref())
        .filter(|s| s.connected)
        .collect();
    AgentsStatus {
        synced: count(
            connected
                .iter()
                .filter(|s| {
                    s.applied_generations
                        .get(key)
                        .is_some_and(|g| *g >= generation)
                })
                .count(),
        ),
        total: count(connected.len()),
    }
}

/// An Event to record on a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PolicyEvent {
    pub warning: bool,
    /// `FailoverActivated`, `FailoverRecovered`, `Rejected` or `Accepted`.
    pub reason: &'static str,
    pub note: String,
}

fn accepted_of(s: &TrafficPolicyStatus) -> Option<&Condition> {
    s.conditions.iter().find(|c| c.type_ == "Accepted")
}

/// The Events that the change from `previous` (the status the object carried; `None` for
/// a policy never written) to `next` deserves. Only transitions produce events.
pub(crate) fn events_for(
    previous: Option<&TrafficPolicyStatus>,
    next: &TrafficPolicyStatus,
) -> Vec<PolicyEvent> {
    let mut out = Vec::new();
    let was_accepted = previous.and_then(accepted_of).map(|c| c.status == "True");
    if let Some(now) = accepted_of(next) {
        match (was_accepted, now.status == "True") {
            (Some(true) | None, false) => out.push(PolicyEvent {
                warning: true,
                reason: "Rejected",
                note: now.message.clone(),
            }),
            (Some(false), true) => out.push(PolicyEvent {
                warning: false,
                reason: "Accepted",
                note: now.message.clone(),
            }),
            _ => {}
        }
    }
    // A policy seen for the first time starts from tier 0: being born in failover is news.
    let before = previous.map_or(Some(0), |p| p.active_tier);
    if let (Some(from), Some(to)) = (before, next.active_tier)
        && from != to
    {
        let sum = |pred: &dyn Fn(u32) -> bool| {
            next.backends
                .iter()
                .filter(|b| pred(b.tier))
                .fold((0u64, 0u64), |(h, r), b| {
                    (h + u64::from(b.healthy), r + u64::from(b.ready))
                })
        };
        if to > from {
            let (healthy, ready) = sum(&|t| t < to);
            out.push(PolicyEvent {
                warning: true,
                reason: "FailoverActivated",
                note: format!(
                    "tiers below {to} are not healthy enough ({healthy} of {ready} ready endpoints \
                     healthy); serving tier {to} (was tier {from})"
                ),
            });
        } else {
            let (healthy, ready) = sum(&|t| t == to);
            out.push(PolicyEvent {
                warning: false,
                reason: "FailoverRecovered",
                note: format!(
                    "tier {to} is healthy again ({healthy} of {ready} ready endpoints healthy); \
                     traffic is back from tier {from}"
                ),
            });
        }
    }
    // The Events API caps notes at 1 kB.
    for e in &mut out {
        if e.note.len() > 1024 {
            let mut cut = 1021;
            while !e.note.is_char_boundary(cut) {
                cut -= 1;
            }
            e.note.truncate(cut);
            e.note.push_str("...");
        }
    }
    out
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
    previous: Option<&TrafficPolicyStatus>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    // lastTransitionTime moves only when the status flips, as the API conventions require.
    let last_transition_time = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// The status of one policy. `previous` is the status last written (its transition times
/// are kept for conditions that did not change); `now` stamps conditions that did.
pub(crate) fn policy_status(
    key: &ObjectKey,
    state: &PolicyState,
    agents: &AgentsStatus,
    now: &Time,
    previous: Option<&TrafficPolicyStatus>,
) -> TrafficPolicyStatus {
    let generation = state.generation;
    let (accepted_reason, accepted_message) = if state.accepted {
        (
            "Accepted",
            format!("TrafficPolicy {key} is valid and in force"),
        )
    } else {
        let reason = match state.reason {
            Reason::Accepted => "Accepted",
            Reason::Unreadable => "Unreadable",
            Reason::Invalid => "Invalid",
            Reason::HostConflict => "HostConflict",
            Reason::UnresolvedRefs => "UnresolvedRefs",
        };
        let mut message = format!("TrafficPolicy {key} is not accepted: ");
        if state.errors.is_empty() {
            message.push_str("see the ResolvedRefs condition");
        } else {
            message.push_str(&state.errors.join("; "));
        }
        message.push_str(if state.serving_last_good {
            ". The previous accepted spec is still served; fix the spec to apply it."
        } else {
            ". Fix the spec to apply it."
        });
        (reason, message)
    };
    let accepted = condition(
        "Accepted",
        state.accepted,
        accepted_reason,
        accepted_message,
        generation,
        now,
        previous,
    );
    let resolved_ok = state.unresolved_refs.is_empty();
    let resolved = condition(
        "ResolvedRefs",
        resolved_ok,
        if resolved_ok {
            "ResolvedRefs"
        } else {
            "BackendNotFound"
        },
        if resolved_ok {
            "every backendRef names an existing Service port".to_string()
        } else {
            format!(
                "backendRefs name Services or ports that do not exist in namespace {}: {}; \
                 their share goes to the other backends",
                key.namespace,
                state.unresolved_refs.join(", ")
            )
        },
        generation,
        now,
        previous,
    );
    let synced = agents.synced >= agents.total;
    let (programmed_ok, programmed_reason, programmed_message) = if !state.programmed {
        (
            false,
            "NotProgrammed",
            "no route is pushed to agents for this policy; see the Accepted condition".to_string(),
        )
    } else if synced {
        (
            true,
            "Programmed",
            format!(
                "applied by {}/{} connected agents",
                agents.synced, agents.total
            ),
        )
    } else {
        (
            false,
            "Pending",
            format!(
                "applied by {}/{} connected agents; the others still run an older version",
                agents.synced, agents.total
            ),
        )
    };
    let programmed = condition(
        "Programmed",
        programmed_ok,
        programmed_reason,
        programmed_message,
        generation,
        now,
        previous,
    );
    let (healthy, total) = state.backends.iter().fold((0u64, 0u64), |(h, t), b| {
        (h + u64::from(b.healthy), t + u64::from(b.ready))
    });
    TrafficPolicyStatus {
        observed_generation: generation,
        conditions: vec![accepted, resolved, programmed],
        active_tier: state.active_tier,
        backends: state.backends.clone(),
        agents: Some(agents.clone()),
        endpoints: state.programmed.then(|| format!("{healthy}/{total}")),
    }
}

/// `status` as a JSON merge patch: fields that are absent now are sent as `null`, which
/// removes them (merely leaving them out would keep the old values on the object).
pub(crate) fn merge_patch(status: &TrafficPolicyStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = v.as_object_mut() {
        for key in ["observedGeneration", "activeTier", "agents", "endpoints"] {
            fields.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    v
}

/// What this writer last wrote for a policy, and the resourceVersion the object had in the
/// reflector store at that moment: while the store still shows that version, the store has
/// not seen the write yet and the written status stands in for it.
struct Written {
    status: TrafficPolicyStatus,
    seen_version: Option<String>,
}

/// Writes statuses while `leader` is true, until the task is dropped.
///
/// Level-based: each period the desired status is compared with the status the object has
/// in the reflector store (`policies`), so a status lost to a delete-and-recreate, or
/// overwritten by someone else, is written again. Errors are logged and the write retried
/// on the next period.
pub async fn run(
    client: Client,
    hub: Arc<Hub>,
    nodeagents: Store<NodeAgent>,
    mut nodeagents_synced: watch::Receiver<bool>,
    policies: Store<TrafficPolicy>,
    recorder: Recorder,
    mut leader: watch::Receiver<bool>,
) {
    // Counting agents from an unlisted store would report 0/0 for a moment.
    if nodeagents_synced.wait_for(|s| *s).await.is_err() {
        return;
    }
    let mut written: BTreeMap<ObjectKey, Written> = BTreeMap::new();
    let mut tick = tokio::time::interval(WRITE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !*leader.borrow_and_update() {
            written.clear();
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let config = hub.config_state();
        if !config.loaded {
            continue;
        }
        let nodeagents_now = nodeagents.state();
        let now = Time(Timestamp::now());
        let mut keep = BTreeMap::new();
        for (key_text, state) in &config.policies {
            let Some((ns, name)) = key_text.split_once('/') else {
                continue;
            };
            let key = ObjectKey::new(ns, name);
            // Deleted since the hub computed: nothing to write to.
            let Some(object) = policies.get(&ObjectRef::new(name).within(ns)) else {
                continue;
            };
            let version = object.metadata.resource_version.clone();
            let mut mine = written.remove(&key).filter(|w| w.seen_version == version);
            let previous = match &mine {
                Some(w) => Some(&w.status),
                None => object.status.as_ref(),
            };
            let agents_now =
                agents_for_policy(&nodeagents_now, key_text, state.generation.unwrap_or(0));
            let status = policy_status(&key, state, &agents_now, &now, previous);
            if previous != Some(&status) {
                let events = events_for(previous, &status);
                let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), ns);
                let patch = serde_json::json!({ "status": merge_patch(&status) });
                match api
                    .patch_status(
                        name,
                        &PatchParams::apply(FIELD_MANAGER),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(_) => {
                        mine = Some(Written {
                            status,
                            seen_version: version,
                        });
                        let reference = object.object_ref(&());
                        for e in events {
                            let event = Event {
                                type_: if e.warning {
                                    EventType::Warning
                                } else {
                                    EventType::Normal
                                },
                                reason: e.reason.to_string(),
                                note: Some(e.note),
                                action: "Reconcile".to_string(),
                                secondary: None,
                            };
                            // An Event is best effort: a lost one is logged, not retried.
                            if let Err(err) = recorder.publish(&event, &reference).await {
                                tracing::warn!(policy = %key, reason = e.reason, error = %err, "cannot record Event");
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(policy = %key, error = %e, "cannot write TrafficPolicy status; retrying");
                    }
                }
            }
            if let Some(w) = mine {
                keep.insert(key, w);
            }
        }
        // Deleted policies are forgotten.
        written = keep;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendStatus;

    fn now(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH))
    }

    fn accepted_state() -> PolicyState {
        PolicyState {
            source: "kubernetes".into(),
            generation: Some(4),
            accepted: true,
            programmed: true,
            active_tier: Some(0),
            backends: vec![
                BackendStatus {
                    name: "a".into(),
                    tier: 0,
                    ready: 3,
                    healthy: 2,
                },
                BackendStatus {
                    name: "b".into(),
                    tier: 1,
                    ready: 1,
                    healthy: 1,
                },
            ],
            ..PolicyState::default()
        }
    }

    fn cond<'a>(s: &'a TrafficPolicyStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("no {t} condition"))
    }

    #[test]
    fn accepted_policy_synced_everywhere_is_programmed() {
        let key = ObjectKey::new("default", "shop");
        let agents = AgentsStatus {
            synced: 2,
            total: 2,
        };
        let s = policy_status(&key, &accepted_state(), &agents, &now(10), None);
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(cond(&s, "Accepted").status, "True");
        assert_eq!(cond(&s, "ResolvedRefs").status, "True");
        assert_eq!(cond(&s, "Programmed").status, "True");
        assert_eq!(cond(&s, "Programmed").observed_generation, Some(4));
        assert_eq!(s.endpoints.as_deref(), Some("3/4"));
        assert_eq!(s.agents, Some(agents));
        assert_eq!(s.active_tier, Some(0));
    }

    #[test]
    fn agents_lagging_behind_leave_programmed_pending() {
        let key = ObjectKey::new("default", "shop");
        let agents = AgentsStatus {
            synced: 1,
            total: 2,
        };
        let s = policy_status(&key, &accepted_state(), &agents, &now(10), None);
        let p = cond(&s, "Programmed");
        assert_eq!((p.status.as_str(), p.reason.as_str()), ("False", "Pending"));
        assert!(p.message.contains("1/2"), "{}", p.message);
    }

    #[test]
    fn invalid_policy_is_not_accepted_and_says_why() {
        let key = ObjectKey::new("default", "shop");
        let state = PolicyState {
            accepted: false,
            reason: Reason::Invalid,
            errors: vec!["spec.loadBalancer.algorithm: unknown algorithm \"Bogus\"".into()],
            programmed: false,
            ..accepted_state()
        };
        let s = policy_status(&key, &state, &AgentsStatus::default(), &now(10), None);
        let a = cond(&s, "Accepted");
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", "Invalid"));
        assert!(a.message.contains("default/shop"), "{}", a.message);
        assert!(a.message.contains("unknown algorithm"), "{}", a.message);
        assert_eq!(cond(&s, "Programmed").status, "False");
        assert_eq!(s.endpoints, None);
    }

    #[test]
    fn unresolved_refs_are_named() {
        let key = ObjectKey::new("shop", "web");
        let state = PolicyState {
            accepted: false,
            reason: Reason::UnresolvedRefs,
            unresolved_refs: vec!["missing:80".into()],
            ..accepted_state()
        };
        let s = policy_status(&key, &state, &AgentsStatus::default(), &now(10), None);
        let r = cond(&s, "ResolvedRefs");
        assert_eq!(r.reason, "BackendNotFound");
        assert!(r.message.contains("missing:80"), "{}", r.message);
        assert_eq!(cond(&s, "Accepted").reason, "UnresolvedRefs");
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_flips() {
        let key = ObjectKey::new("default", "shop");
        let agents = AgentsStatus {
            synced: 1,
            total: 1,
        };
        let first = policy_status(&key, &accepted_state(), &agents, &now(10), None);
        let same = policy_status(&key, &accepted_state(), &agents, &now(20), Some(&first));
        assert_eq!(same, first, "an unchanged status is not rewritten");
        let lagging = AgentsStatus {
            synced: 0,
            total: 1,
        };
        let flipped = policy_status(&key, &accepted_state(), &lagging, &now(30), Some(&first));
        assert_eq!(cond(&flipped, "Programmed").last_transition_time, now(30));
        assert_eq!(cond(&flipped, "Accepted").last_transition_time, now(10));
    }

    #[test]
    fn merge_patch_clears_fields_that_are_gone() {
        let status = TrafficPolicyStatus {
            observed_generation: Some(2),
            ..TrafficPolicyStatus::default()
        };
        let patch = merge_patch(&status);
        assert_eq!(patch["observedGeneration"], 2);
        assert!(patch["activeTier"].is_null() && patch.get("activeTier").is_some());
        assert!(patch.get("endpoints").is_some_and(|v| v.is_null()));
    }

    #[test]
    fn agents_are_summed_over_connected_nodeagents_of_every_replica() {
        use crate::model::{NodeAgentSpec, NodeAgentStatus};
        let na = |name: &str, controller: &str, connected: bool, generation: Option<i64>| {
            let mut n = NodeAgent::new(name, NodeAgentSpec {});
            n.status = Some(NodeAgentStatus {
                connected,
                controller: Some(controller.into()),
                applied_generations: generation
                    .map(|g| BTreeMap::from([("default/shop".to_string(), g)]))
                    .unwrap_or_default(),
                ..NodeAgentStatus::default()
            });
            Arc::new(n)
        };
        let all = [
            na("n1", "a", true, Some(4)),
            na("n2", "b", true, Some(5)),
            na("n3", "b", true, Some(3)),
            na("n4", "a", true, None),
            na("n5", "b", false, Some(4)),
        ];
        assert_eq!(
            agents_for_policy(&all, "default/shop", 4),
            AgentsStatus {
                synced: 2,
                total: 4
            }
        );
        assert_eq!(agents_for_policy(&all, "default/other", 1).synced, 0);
    }

    fn with_tier(tier: u32, accepted: bool) -> TrafficPolicyStatus {
        let key = ObjectKey::new("default", "shop");
        let state = PolicyState {
            active_tier: Some(tier),
            accepted,
            reason: if accepted {
                Reason::Accepted
            } else {
                Reason::Invalid
            },
            errors: if accepted {
                vec![]
            } else {
                vec!["spec.x: bad".into()]
            },
            ..accepted_state()
        };
        policy_status(&key, &state, &AgentsStatus::default(), &now(1), None)
    }

    #[test]
    fn events_are_sent_on_transitions_only() {
        let normal = with_tier(0, true);
        let failed_over = with_tier(1, true);
        let e = events_for(Some(&normal), &failed_over);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].reason, e[0].warning), ("FailoverActivated", true));
        assert!(e[0].note.contains("serving tier 1"), "{}", e[0].note);
        assert!(events_for(Some(&failed_over), &failed_over).is_empty());
        let back = events_for(Some(&failed_over), &normal);
        assert_eq!(back[0].reason, "FailoverRecovered");

        let rejected = with_tier(0, false);
        let e = events_for(Some(&normal), &rejected);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].reason, "Rejected");
        assert!(e[0].note.contains("spec.x: bad"), "{}", e[0].note);
        assert!(events_for(Some(&rejected), &rejected).is_empty());
        assert_eq!(events_for(Some(&rejected), &normal)[0].reason, "Accepted");
        // A policy rejected from its first version.
        assert_eq!(events_for(None, &rejected)[0].reason, "Rejected");
        assert!(events_for(None, &normal).is_empty());
    }
}
