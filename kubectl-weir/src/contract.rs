//! The JSON this plugin reads, in one place: the controller's `/state`, the agent's
//! `/config`, and the status of the `NodeAgent` and `TrafficPolicy` objects.
//!
//! Every field is optional or defaulted: the plugin may meet a controller or agent of
//! another version, and a field it does not know or that is missing must show as "-", not
//! fail the command. Fields that another change is still adding to `/state` (per policy
//! `traffic`, per endpoint `agentHealth`) are kept as raw JSON and read only by
//! [`traffic_of`] and [`agent_health_of`], so aligning with their final shape is a change
//! here and nowhere else.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

// ---- the controller's `/state` ----

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct State {
    /// The latest routing-table version of this controller.
    pub version: u64,
    pub loaded: bool,
    pub files: Vec<FileReport>,
    /// By `namespace/name`, which is also the route's name in the agent's `/config`.
    pub policies: BTreeMap<String, PolicyState>,
    pub agents: Vec<AgentState>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct FileReport {
    pub path: String,
    pub error: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct PolicyState {
    pub source: String,
    pub generation: Option<i64>,
    pub accepted: bool,
    /// A reason name (`Accepted`, `Invalid`, …); raw so that a new one never fails parsing.
    pub reason: Value,
    pub errors: Vec<String>,
    pub unresolved_refs: Vec<String>,
    pub serving_last_good: bool,
    pub programmed: bool,
    pub active_tier: Option<u32>,
    pub panic: bool,
    /// Raw: read through [`traffic_of`] only.
    pub traffic: Option<Value>,
    /// Everything else, kept so that [`agent_health_of`] can find per-endpoint health
    /// wherever the controller puts it, and so `-o json` loses nothing.
    #[serde(flatten)]
    pub rest: BTreeMap<String, Value>,
}

impl PolicyState {
    /// The reason as text (`-` when absent).
    pub(crate) fn reason_text(&self) -> String {
        match &self.reason {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            other => other.to_string(),
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct AgentState {
    pub node_name: String,
    pub zone: String,
    pub agent_version: String,
    pub peer: String,
    pub sent_version: u64,
    pub applied_version: u64,
    pub last_ack_unix_ms: Option<u64>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Nack {
    pub version: u64,
    pub error: String,
    pub at_unix_ms: Option<u64>,
}

/// A policy's traffic as the controller aggregates it from agents' load reports; each
/// figure is `None` when the controller does not report it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Traffic {
    pub rps: Option<f64>,
    pub error_ratio: Option<f64>,
    pub p99_ms: Option<f64>,
    pub cache_hit_ratio: Option<f64>,
    /// How many agents reported traffic for the policy.
    pub agents: Option<u64>,
}

/// The `traffic: {rps, errorRatio, p99Ms, cacheHitRatio, agents}` of a policy in `/state`.
pub(crate) fn traffic_of(p: &PolicyState) -> Traffic {
    let Some(t) = &p.traffic else {
        return Traffic::default();
    };
    Traffic {
        rps: t["rps"].as_f64(),
        error_ratio: t["errorRatio"].as_f64(),
        p99_ms: t["p99Ms"].as_f64(),
        cache_hit_ratio: t["cacheHitRatio"].as_f64(),
        agents: t["agents"].as_u64(),
    }
}

/// One `/state` from several controller replicas: the first replica's document, with each
/// policy's traffic combined over all of them, on the assumption that every replica
/// reports the agents connected to it (disjoint sets): rates and agent counts add up, the
/// error and cache-hit ratios are averaged weighted by rate, and p99 is the highest
/// replica's (percentiles cannot be merged exactly; this is an upper bound).
pub(crate) fn merge_states(states: Vec<State>) -> State {
    let mut all = states.into_iter();
    let Some(mut base) = all.next() else {
        return State::default();
    };
    let rest: Vec<State> = all.collect();
    if rest.is_empty() {
        return base;
    }
    for (name, p) in &mut base.policies {
        let parts: Vec<Traffic> = std::iter::once(traffic_of(p))
            .chain(
                rest.iter()
                    .filter_map(|s| s.policies.get(name))
                    .map(traffic_of),
            )
            .collect();
        let known = |f: fn(&Traffic) -> Option<f64>| parts.iter().filter_map(f).collect::<Vec<_>>();
        let rps = known(|t| t.rps);
        let total: f64 = rps.iter().sum();
        let weighted = |f: fn(&Traffic) -> Option<f64>| {
            let pairs: Vec<(f64, f64)> =
                parts.iter().filter_map(|t| Some((t.rps?, f(t)?))).collect();
            let w: f64 = pairs.iter().map(|(r, _)| r).sum();
            if pairs.is_empty() {
                None
            } else if w > 0.0 {
                Some(pairs.iter().map(|(r, v)| r * v).sum::<f64>() / w)
            } else {
                Some(pairs.iter().map(|(_, v)| v).sum::<f64>() / pairs.len() as f64)
            }
        };
        let agents: Vec<u64> = parts.iter().filter_map(|t| t.agents).collect();
        let merged = Traffic {
            rps: (!rps.is_empty()).then_some(total),
            error_ratio: weighted(|t| t.error_ratio),
            p99_ms: known(|t| t.p99_ms).into_iter().reduce(f64::max),
            cache_hit_ratio: weighted(|t| t.cache_hit_ratio),
            agents: (!agents.is_empty()).then(|| agents.iter().sum()),
        };
        if merged != Traffic::default() {
            p.traffic = serde_json::to_value(merged).ok();
        }
    }
    base
}

/// How many agents see an endpoint as unhealthy, out of how many, and why.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentHealth {
    pub unhealthy_on: u64,
    pub of: u64,
    pub reasons: Vec<String>,
}

/// The `agentHealth: {unhealthyOn, of, reasons}` of endpoint `address` in a policy of
/// `/state`: the first object anywhere under the policy whose `address` is `address` and
/// that carries `agentHealth` (the exact nesting is still being settled).
pub(crate) fn agent_health_of(p: &PolicyState, address: &str) -> Option<AgentHealth> {
    fn find<'v>(v: &'v Value, address: &str) -> Option<&'v Value> {
        match v {
            Value::Object(m) => {
                if m.get("address").and_then(Value::as_str) == Some(address)
                    && let Some(h) = m.get("agentHealth")
                {
                    return Some(h);
                }
                m.values().find_map(|x| find(x, address))
            }
            Value::Array(a) => a.iter().find_map(|x| find(x, address)),
            _ => None,
        }
    }
    let h = p.rest.values().find_map(|v| find(v, address))?;
    Some(AgentHealth {
        unhealthy_on: h["unhealthyOn"].as_u64()?,
        of: h["of"].as_u64().unwrap_or(0),
        reasons: h["reasons"]
            .as_array()
            .map(|a| {
                // The controller sends {node, problem, detail}; plain strings are read too.
                a.iter()
                    .filter_map(|r| match r {
                        Value::String(s) => Some(s.clone()),
                        Value::Object(_) => {
                            let detail = r["detail"].as_str().or(r["problem"].as_str())?;
                            Some(match r["node"].as_str() {
                                Some(node) => format!("{node}: {detail}"),
                                None => detail.to_string(),
                            })
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

// ---- the agent's `/config` ----

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Config {
    pub node: String,
    pub zone: String,
    /// The version of the table in force (0 before the first).
    pub version: u64,
    pub ready: bool,
    pub control: Control,
    pub routes: Vec<Route>,
}

/// The agent's view of its controller connection.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Control {
    /// Where the table in force came from (`controller`, `disk`, …); raw for the same
    /// reason as [`PolicyState::reason`].
    pub table_source: Value,
    pub connected_to: Option<String>,
    pub last_error: Option<String>,
    pub last_nack: Option<Nack>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Route {
    /// `namespace/name` of the policy.
    pub name: String,
    pub hosts: Vec<String>,
    pub algorithm: String,
    pub min_healthy_percent: u32,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Rule {
    pub matches: Vec<Match>,
    pub active_tier: u32,
    pub panic: bool,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Match {
    pub method: Option<String>,
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct PathMatch {
    /// `PREFIX` or `EXACT` (the protobuf enum's names).
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default)]
pub(crate) struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Backend {
    pub service: String,
    pub port: u32,
    pub tier: u32,
    /// The Service's weight within its tier (TrafficPolicy `backendRefs[].weight`).
    pub weight: u32,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct Endpoint {
    pub address: String,
    pub ready: bool,
    pub healthy: bool,
    pub why: Option<String>,
    pub zone: String,
    /// The endpoint's weight in the rule, as the agent balances (0: no traffic).
    pub weight: u64,
    pub in_flight: Option<u64>,
}

// ---- Kubernetes objects' status (cluster mode) ----

/// The parts of a `NodeAgent`'s status that `check` and `agent` read.
#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct NodeAgentStatus {
    pub connected: bool,
    pub controller: Option<String>,
    pub zone: Option<String>,
    pub applied_version: Option<u64>,
    pub last_ack_time: Option<String>,
    pub last_nack: Option<NodeAgentNack>,
    /// Policy `namespace/name` → generation in force on the agent.
    pub applied_generations: BTreeMap<String, i64>,
}

#[derive(Debug, Default, Clone, Deserialize, Serialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct NodeAgentNack {
    pub version: u64,
    pub error: String,
    /// RFC 3339.
    pub time: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = include_str!("../fixtures/state.json");
    const CONFIG: &str = include_str!("../fixtures/config.json");

    #[test]
    fn real_state_and_config_documents_parse() {
        let s: State = serde_json::from_str(STATE).expect("state");
        assert!(s.loaded && s.version > 0, "{s:?}");
        assert!(!s.policies.is_empty() && !s.agents.is_empty(), "{s:?}");
        let c: Config = serde_json::from_str(CONFIG).expect("config");
        assert!(c.ready && c.version > 0, "{c:?}");
        assert!(c.routes.iter().any(|r| !r.rules.is_empty()), "{c:?}");
    }

    #[test]
    fn missing_traffic_reads_as_unknown_and_present_traffic_is_read() {
        let s: State = serde_json::from_str(STATE).expect("state");
        let p = s.policies.values().next().expect("a policy");
        assert_eq!(traffic_of(p), Traffic::default());
        let p: PolicyState = serde_json::from_value(serde_json::json!({
            "accepted": true,
            "traffic": {"rps": 12.5, "errorRatio": 0.01, "p99Ms": 40.0, "agents": 3},
        }))
        .expect("policy");
        let t = traffic_of(&p);
        assert_eq!(t.rps, Some(12.5));
        assert_eq!(t.p99_ms, Some(40.0));
        assert_eq!(t.cache_hit_ratio, None);
        assert_eq!(t.agents, Some(3));
    }

    #[test]
    fn replicas_traffic_adds_up_with_ratios_weighted_by_rate() {
        let with = |t: Value| {
            let mut s: State = serde_json::from_str(STATE).expect("state");
            for p in s.policies.values_mut() {
                p.traffic = Some(t.clone());
            }
            s
        };
        let a = with(
            serde_json::json!({"rps": 30.0, "errorRatio": 0.1, "p99Ms": 20.0, "cacheHitRatio": 0.5, "agents": 2}),
        );
        let b = with(
            serde_json::json!({"rps": 10.0, "errorRatio": 0.5, "p99Ms": 80.0, "cacheHitRatio": 0.1, "agents": 1}),
        );
        let merged = merge_states(vec![a, b]);
        let t = traffic_of(merged.policies.values().next().expect("policy"));
        assert_eq!(t.rps, Some(40.0));
        assert_eq!(t.agents, Some(3));
        assert_eq!(t.p99_ms, Some(80.0));
        assert!((t.error_ratio.unwrap_or(0.0) - 0.2).abs() < 1e-9, "{t:?}");
        assert!(
            (t.cache_hit_ratio.unwrap_or(0.0) - 0.4).abs() < 1e-9,
            "{t:?}"
        );
        // Replicas without figures leave them unknown.
        let none = merge_states(vec![with(Value::Null), with(Value::Null)]);
        assert_eq!(
            traffic_of(none.policies.values().next().expect("policy")),
            Traffic::default()
        );
    }

    #[test]
    fn agent_health_is_found_under_the_policy_by_address() {
        let p: PolicyState = serde_json::from_value(serde_json::json!({
            "backends": [{"name": "web", "endpoints": [
                {"address": "10.0.0.1:80", "agentHealth": {"unhealthyOn": 2, "of": 3, "reasons": ["HTTP 500"]}},
                {"address": "10.0.0.2:80"},
            ]}],
        }))
        .expect("policy");
        let h = agent_health_of(&p, "10.0.0.1:80").expect("health");
        assert_eq!((h.unhealthy_on, h.of), (2, 3));
        assert_eq!(h.reasons, ["HTTP 500"]);
        // The controller's own shape: {node, problem, detail}.
        let theirs: PolicyState = serde_json::from_value(serde_json::json!({
            "backends": [{"endpoints": [{"address": "10.0.0.2:80", "agentHealth": {
                "unhealthyOn": 1, "of": 1,
                "reasons": [{"node": "n1", "problem": "activeCheckFailing", "detail": "HTTP 500"}]}}]}]
        }))
        .expect("policy");
        let h = agent_health_of(&theirs, "10.0.0.2:80").expect("health");
        assert_eq!(h.reasons, ["n1: HTTP 500"]);
        assert_eq!(agent_health_of(&p, "10.0.0.2:80"), None);
    }

    #[test]
    fn unknown_fields_and_shapes_do_not_fail_parsing() {
        let s: State = serde_json::from_str(
            r#"{"version": 3, "policies": {"a/b": {"reason": {"odd": 1}, "newField": [1]}}, "agents": [{}]}"#,
        )
        .expect("state");
        assert_eq!(s.version, 3);
        assert_eq!(s.policies["a/b"].reason_text(), r#"{"odd":1}"#);
    }
}
