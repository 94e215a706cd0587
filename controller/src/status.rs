//! TrafficPolicy status: what the hub decided and how many agents applied it, written back to
//! the API server (Kubernetes mode, leader only).
//!
//! `agents` counts the agents connected to the writing replica only: with several replicas,
//! agents connected to the others are not in it yet.
//!
//! [`policy_status`] is the pure conversion from a [`PolicyState`] to a
//! [`TrafficPolicyStatus`] with standard `metav1.Condition`s. [`run`] is the thin writer
//! around it: it wakes at most once per [`WRITE_EVERY`], computes every policy's status, and
//! merge-patches the status subresource only of policies whose status differs from the one
//! they carry. So a flapping endpoint costs at most one PATCH per policy per period, however
//! fast it flaps.

use crate::hub::Hub;
use crate::model::{AgentsStatus, ObjectKey, TrafficPolicy, TrafficPolicyStatus};
use crate::routing::{PolicyState, Reason};
use crate::server::Agents;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Shortest time between two status writes of the same policy.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);

/// The field manager named in status patches.
pub const FIELD_MANAGER: &str = "weir-controller";

/// `synced`/`total` of the agents connected to this controller: synced ones have applied
/// `version` (or a later one).
pub fn agents_status(agents: &[crate::server::AgentState], version: u64) -> AgentsStatus {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    AgentsStatus {
        synced: count(
            agents
                .iter()
                .filter(|a| a.applied_version >= version)
                .count(),
        ),
        total: count(agents.len()),
    }
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
pub fn policy_status(
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
pub fn merge_patch(status: &TrafficPolicyStatus) -> serde_json::Value {
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
    agents: Arc<Agents>,
    policies: Store<TrafficPolicy>,
    mut leader: watch::Receiver<bool>,
) {
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
        let agents_now = agents_status(&agents.list(), config.version);
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
            let status = policy_status(&key, state, &agents_now, &now, previous);
            if previous != Some(&status) {
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
    fn agents_status_counts_those_at_or_past_the_version() {
        let agent = |applied| crate::server::AgentState {
            node_name: "n".into(),
            zone: String::new(),
            agent_version: String::new(),
            peer: String::new(),
            connected_at_unix_ms: 0,
            sent_version: applied,
            applied_version: applied,
            last_nack: None,
        };
        let s = agents_status(&[agent(4), agent(5), agent(6)], 5);
        assert_eq!(
            s,
            AgentsStatus {
                synced: 2,
                total: 3
            }
        );
    }
}
