//! `check`: install sanity as a list of lines, each passed or failed with a hint. The
//! verdicts are pure functions of what was fetched (so they are unit-tested on fixtures);
//! `main` gathers the inputs and prints the lines.

use crate::contract::{Config, NodeAgentStatus, State};
use crate::fetch::{ControllerDeployment, FetchError, Got};
use serde::Serialize;
use std::collections::BTreeMap;

/// A NACK newer than this counts as recent even if a later version was applied since.
pub(crate) const RECENT_NACK_SECS: i64 = 10 * 60;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct Line {
    pub ok: bool,
    pub check: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Line {
    fn pass(check: &str, detail: impl Into<String>) -> Self {
        Self {
            ok: true,
            check: check.into(),
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(check: &str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            ok: false,
            check: check.into(),
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

/// `/readyz` of `what`: 200 passes, anything else fails with the body (which says why).
pub(crate) fn readyz(check: &str, got: &Result<Got, FetchError>, hint: &str) -> Line {
    match got {
        Ok(g) if g.status == 200 => Line::pass(check, "ready"),
        Ok(g) => Line::fail(check, format!("HTTP {}: {}", g.status, g.body.trim()), hint),
        Err(e) => Line::fail(check, e.to_string(), hint),
    }
}

/// Local mode: the agent runs the controller's latest table.
pub(crate) fn local_sync(state: Option<&State>, config: Option<&Config>) -> Line {
    const CHECK: &str = "agent synced";
    let (Some(state), Some(config)) = (state, config) else {
        return Line::fail(
            CHECK,
            "cannot compare versions: the controller's /state or the agent's /config is unreadable",
            "fix the lines above first",
        );
    };
    if config.version == state.version {
        return Line::pass(
            CHECK,
            format!(
                "agent runs version {}, the controller's latest",
                config.version
            ),
        );
    }
    let nack = config
        .control
        .last_nack
        .as_ref()
        .map(|n| format!("; it refused version {}: {}", n.version, n.error))
        .unwrap_or_default();
    let hint = match (&config.control.connected_to, &config.control.last_error) {
        (None, Some(e)) => format!(
            "the agent is not connected to the controller ({e}); check its --controller flag"
        ),
        (None, None) => {
            "the agent is not connected to the controller; check its --controller flag".into()
        }
        (Some(_), _) if !nack.is_empty() => {
            "see the NACK with `kubectl weir agent`; the controller's log names the bad route"
                .into()
        }
        (Some(_), _) => "an update may be in flight: run check again".into(),
    };
    Line::fail(
        CHECK,
        format!(
            "agent runs version {}, the controller is at {}{nack}",
            config.version, state.version
        ),
        hint,
    )
}

/// Cluster: both CRDs exist and are Established.
pub(crate) fn crds(found: &Result<Vec<(String, Option<bool>)>, FetchError>) -> Line {
    const CHECK: &str = "CRDs";
    match found {
        Err(e) => Line::fail(CHECK, e.to_string(), "check your access to the cluster"),
        Ok(list) => {
            let missing: Vec<&str> = list
                .iter()
                .filter(|(_, e)| e.is_none())
                .map(|(n, _)| n.as_str())
                .collect();
            let pending: Vec<&str> = list
                .iter()
                .filter(|(_, e)| *e == Some(false))
                .map(|(n, _)| n.as_str())
                .collect();
            if !missing.is_empty() {
                Line::fail(
                    CHECK,
                    format!("missing: {}", missing.join(", ")),
                    "install the chart (`helm install weir charts/weir -n weir-system --create-namespace`) or `kubectl apply -f charts/weir/crds/crds.yaml`",
                )
            } else if !pending.is_empty() {
                Line::fail(
                    CHECK,
                    format!("not Established: {}", pending.join(", ")),
                    "`kubectl describe crd` shows why (often a name conflict)",
                )
            } else {
                Line::pass(
                    CHECK,
                    format!(
                        "{} present and Established",
                        list.iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        }
    }
}

/// Cluster: the controller Deployment has all its replicas ready.
pub(crate) fn controller_pods(
    found: &Result<Vec<ControllerDeployment>, FetchError>,
    ns: &str,
) -> Line {
    const CHECK: &str = "controller pods";
    match found {
        Err(e) => Line::fail(CHECK, e.to_string(), "check your access to the cluster"),
        Ok(d) if d.is_empty() => Line::fail(
            CHECK,
            format!("no weir controller Deployment in namespace {ns}"),
            "is weir installed there? try --namespace, or `helm list -A`",
        ),
        Ok(d) => {
            let short: Vec<&ControllerDeployment> =
                d.iter().filter(|d| d.ready < d.desired.max(1)).collect();
            let text = d
                .iter()
                .map(|d| format!("{} {}/{} ready", d.name, d.ready, d.desired))
                .collect::<Vec<_>>()
                .join(", ");
            if short.is_empty() {
                Line::pass(CHECK, text)
            } else {
                Line::fail(
                    CHECK,
                    text,
                    format!(
                        "`kubectl -n {ns} describe deployment {}` and its pods' logs",
                        short[0].name
                    ),
                )
            }
        }
    }
}

/// Cluster: every Node has a NodeAgent whose agent is connected.
pub(crate) fn nodes_connected(
    nodes: &[String],
    agents: &BTreeMap<String, NodeAgentStatus>,
    ns: &str,
) -> Line {
    const CHECK: &str = "agents connected";
    let missing: Vec<&str> = nodes
        .iter()
        .filter(|n| !agents.contains_key(*n))
        .map(String::as_str)
        .collect();
    let down: Vec<&str> = nodes
        .iter()
        .filter(|n| agents.get(*n).is_some_and(|a| !a.connected))
        .map(String::as_str)
        .collect();
    if missing.is_empty() && down.is_empty() {
        return Line::pass(
            CHECK,
            format!(
                "{}/{} nodes have a connected agent",
                nodes.len(),
                nodes.len()
            ),
        );
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("no NodeAgent for {}", list(&missing)));
    }
    if !down.is_empty() {
        parts.push(format!("not connected: {}", list(&down)));
    }
    Line::fail(
        CHECK,
        format!(
            "{}/{} nodes: {}",
            nodes.len() - missing.len() - down.len(),
            nodes.len(),
            parts.join("; ")
        ),
        format!(
            "`kubectl -n {ns} get pods -l app.kubernetes.io/component=agent -o wide`; an agent's log says why it cannot reach the controller (taints and nodeSelector decide where the DaemonSet runs)"
        ),
    )
}

/// Cluster: every connected NodeAgent runs the current generation of every programmed policy.
pub(crate) fn synced(
    agents: &BTreeMap<String, NodeAgentStatus>,
    expected: &BTreeMap<String, i64>,
) -> Line {
    const CHECK: &str = "agents synced";
    let mut behind = Vec::new();
    for (node, a) in agents.iter().filter(|(_, a)| a.connected) {
        let stale: Vec<&str> = expected
            .iter()
            .filter(|(p, g)| a.applied_generations.get(*p) != Some(*g))
            .map(|(p, _)| p.as_str())
            .collect();
        if !stale.is_empty() {
            behind.push(format!("{node} (behind on {})", list(&stale)));
        }
    }
    let connected = agents.values().filter(|a| a.connected).count();
    if behind.is_empty() {
        Line::pass(
            CHECK,
            format!(
                "{connected} connected agents run the current generation of {} policies",
                expected.len()
            ),
        )
    } else {
        Line::fail(
            CHECK,
            list(&behind.iter().map(String::as_str).collect::<Vec<_>>()),
            "a NACK (next line) or a slow agent; `kubectl weir agent <node>` shows its table",
        )
    }
}

/// Cluster: no agent refuses an update now or did so recently. `now` is Unix seconds.
pub(crate) fn nacks(agents: &BTreeMap<String, NodeAgentStatus>, now: i64) -> Line {
    const CHECK: &str = "no NACKs";
    let mut bad = Vec::new();
    for (node, a) in agents {
        let Some(n) = &a.last_nack else { continue };
        let refusing = a.applied_version.is_none_or(|v| n.version > v);
        let recent = n
            .time
            .as_deref()
            .and_then(parse_rfc3339)
            .is_some_and(|t| now - t < RECENT_NACK_SECS);
        if refusing || recent {
            bad.push(format!("{node} refused version {}: {}", n.version, n.error));
        }
    }
    if bad.is_empty() {
        Line::pass(
            CHECK,
            format!(
                "no agent refused an update in the last {} minutes",
                RECENT_NACK_SECS / 60
            ),
        )
    } else {
        Line::fail(
            CHECK,
            bad.join("; "),
            "the agent keeps its previous table; the error names the route or field it could not apply",
        )
    }
}

/// `a, b, c` or `a, b, c and 4 more`.
fn list(items: &[&str]) -> String {
    const SHOWN: usize = 5;
    let mut s = items
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

/// Seconds since the Unix epoch of an RFC 3339 time (as Kubernetes writes them).
fn parse_rfc3339(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::NodeAgentNack;

    fn state() -> State {
        serde_json::from_str(include_str!("../fixtures/state.json")).expect("state")
    }

    fn config() -> Config {
        serde_json::from_str(include_str!("../fixtures/config.json")).expect("config")
    }

    #[test]
    fn readyz_passes_on_200_and_says_why_otherwise() {
        let ok = Ok(Got {
            status: 200,
            body: "ready\n".into(),
        });
        assert!(readyz("c", &ok, "h").ok);
        let not = Ok(Got {
            status: 503,
            body: "not ready: no routing table yet\n".into(),
        });
        let l = readyz("c", &not, "h");
        assert!(!l.ok && l.detail.contains("no routing table yet"), "{l:?}");
        let err = Err(FetchError::Unreachable {
            what: "the agent".into(),
            url: "http://127.0.0.1:1/readyz".into(),
            why: "Connection refused".into(),
        });
        let l = readyz("agent ready", &err, "is it running?");
        assert_eq!(
            l.detail,
            "cannot reach the agent at http://127.0.0.1:1/readyz: Connection refused"
        );
        assert_eq!(l.hint.as_deref(), Some("is it running?"));
    }

    #[test]
    fn local_sync_compares_the_applied_and_latest_versions() {
        let (s, mut c) = (state(), config());
        assert!(local_sync(Some(&s), Some(&c)).ok);
        c.version = s.version - 1;
        c.control.last_nack = Some(crate::contract::Nack {
            version: s.version,
            error: "bad endpoint address".into(),
            at_unix_ms: None,
        });
        let l = local_sync(Some(&s), Some(&c));
        assert!(!l.ok && l.detail.contains("bad endpoint address"), "{l:?}");
        assert!(!local_sync(Some(&s), None).ok);
    }

    fn na(connected: bool, applied: u64, gens: &[(&str, i64)]) -> NodeAgentStatus {
        NodeAgentStatus {
            connected,
            applied_version: Some(applied),
            applied_generations: gens.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..NodeAgentStatus::default()
        }
    }

    #[test]
    fn every_node_needs_a_connected_agent() {
        let nodes = vec!["n1".to_string(), "n2".to_string(), "n3".to_string()];
        let mut agents = BTreeMap::from([
            ("n1".to_string(), na(true, 3, &[])),
            ("n2".to_string(), na(false, 3, &[])),
        ]);
        let l = nodes_connected(&nodes, &agents, "weir-system");
        assert!(!l.ok);
        assert_eq!(
            l.detail,
            "1/3 nodes: no NodeAgent for n3; not connected: n2"
        );
        agents.insert("n2".into(), na(true, 3, &[]));
        agents.insert("n3".into(), na(true, 3, &[]));
        assert!(nodes_connected(&nodes, &agents, "weir-system").ok);
    }

    #[test]
    fn agents_behind_on_a_policy_generation_are_not_synced() {
        let expected = BTreeMap::from([("default/web".to_string(), 2)]);
        let agents = BTreeMap::from([
            ("n1".to_string(), na(true, 3, &[("default/web", 2)])),
            ("n2".to_string(), na(true, 3, &[("default/web", 1)])),
            // Disconnected agents are the previous check's business.
            ("n3".to_string(), na(false, 1, &[])),
        ]);
        let l = synced(&agents, &expected);
        assert!(!l.ok);
        assert_eq!(l.detail, "n2 (behind on default/web)");
    }

    #[test]
    fn a_nack_fails_while_refused_or_recent() {
        let now = parse_rfc3339("2026-01-01T01:00:00Z").expect("time");
        let mut a = na(true, 5, &[]);
        a.last_nack = Some(NodeAgentNack {
            version: 4,
            error: "bad endpoint address".into(),
            time: Some("2026-01-01T00:00:00Z".into()),
        });
        let mut agents = BTreeMap::from([("n1".to_string(), a)]);
        assert!(nacks(&agents, now).ok, "old and superseded");
        let nack = |agents: &mut BTreeMap<String, NodeAgentStatus>| {
            agents
                .get_mut("n1")
                .and_then(|a| a.last_nack.as_mut())
                .expect("nack")
                .clone()
        };
        let mut n = nack(&mut agents);
        n.version = 6;
        if let Some(a) = agents.get_mut("n1") {
            a.last_nack = Some(n);
        }
        let l = nacks(&agents, now);
        assert!(
            !l.ok && l.detail == "n1 refused version 6: bad endpoint address",
            "{l:?}"
        );
        let mut n = nack(&mut agents);
        n.version = 4;
        n.time = Some("2026-01-01T00:55:00Z".into());
        if let Some(a) = agents.get_mut("n1") {
            a.last_nack = Some(n);
        }
        assert!(!nacks(&agents, now).ok, "recent");
    }

    #[test]
    fn crds_must_exist_and_be_established() {
        let ok = Ok(vec![
            ("a".to_string(), Some(true)),
            ("b".to_string(), Some(true)),
        ]);
        assert!(crds(&ok).ok);
        let l = crds(&Ok(vec![
            ("a".to_string(), Some(false)),
            ("b".to_string(), None),
        ]));
        assert_eq!(l.detail, "missing: b");
    }
}
