//! Human output: kubectl-style aligned columns (through `tabwriter`, the Rust port of the
//! Go package kubectl itself prints with) and the `agent` and `top` views, built purely from
//! the fetched documents so that they are unit-tested on fixtures. `-o json` prints the
//! same views serialised instead.

use crate::check::Line;
use crate::contract::{Config, NodeAgentStatus, State, Traffic, traffic_of};
use crate::explain::Explanation;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write as _;

/// Aligns tab-separated `rows` into columns two spaces apart.
pub(crate) fn table(rows: &[Vec<String>]) -> String {
    let mut tw = tabwriter::TabWriter::new(Vec::new()).padding(2);
    for r in rows {
        // Writing into a Vec cannot fail.
        let _ = writeln!(tw, "{}", r.join("\t"));
    }
    tw.into_inner()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.1}%", v * 100.0))
}

// ---- check ----

pub(crate) fn check(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines {
        let _ = writeln!(
            out,
            "{} {}: {}",
            if l.ok { "✓" } else { "✗" },
            l.check,
            l.detail
        );
        if let Some(h) = &l.hint {
            let _ = writeln!(out, "    hint: {h}");
        }
    }
    let failed = lines.iter().filter(|l| !l.ok).count();
    if failed == 0 {
        let _ = writeln!(out, "all {} checks passed", lines.len());
    } else {
        let _ = writeln!(out, "{failed} of {} checks failed", lines.len());
    }
    out
}

// ---- explain ----

pub(crate) fn explain(e: &Explanation) -> String {
    let mut out = String::new();
    let headers = if e.headers.is_empty() {
        String::new()
    } else {
        format!(
            " with {}",
            e.headers
                .iter()
                .map(|h| format!("{}: {}", h.name, h.value))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let _ = writeln!(
        out,
        "{} {} (host {}){headers}, on agent {} (table version {})",
        e.method, e.path, e.host, e.node, e.table_version
    );
    let _ = writeln!(
        out,
        "route    {} (hosts: {}; {})",
        e.route,
        e.route_hosts.join(", "),
        e.algorithm
    );
    for r in &e.rules_tried {
        let _ = writeln!(out, "rule {:<3} {}", r.rule, r.why);
    }
    if e.rule.is_none() {
        let _ = writeln!(
            out,
            "no rule matches: the agent answers 404 \"no rule of the route matches this request\""
        );
    }
    if let Some(t) = &e.tier {
        let tiers = t
            .tiers
            .iter()
            .map(|l| {
                format!(
                    "tier {}: {:.0}% healthy, {:.1}% of traffic",
                    l.tier, l.healthy_percent, l.traffic_percent
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let _ = writeln!(
            out,
            "tier     {}{} ({tiers})",
            t.active_tier,
            if t.panic { " PANIC" } else { "" }
        );
        let _ = writeln!(out, "         {}", t.why);
    }
    if !e.endpoints.is_empty() {
        let mut rows = vec![
            [
                "SERVICE", "TIER", "ENDPOINT", "WEIGHT", "SHARE", "HEALTH", "WHY",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for l in &e.endpoints {
            let mut why = l.why.clone().unwrap_or_else(|| "-".into());
            if let Some(h) = &l.agent_health
                && h.unhealthy_on > 0
            {
                why = format!(
                    "{why} (unhealthy on {}/{} agents: {})",
                    h.unhealthy_on,
                    h.of,
                    h.reasons.join(", ")
                );
            }
            rows.push(vec![
                l.service.clone(),
                l.tier.to_string(),
                l.address.clone(),
                l.weight.to_string(),
                format!("{:.1}%", l.share_percent),
                if l.healthy { "healthy" } else { "unhealthy" }.into(),
                why,
            ]);
        }
        out.push_str(&table(&rows));
    }
    match &e.policy {
        Some(p) if p.accepted => {
            let _ = writeln!(out, "policy   {}: Accepted", e.route);
        }
        Some(p) => {
            let _ = writeln!(
                out,
                "policy   {}: NOT accepted ({}){}",
                e.route,
                p.reason,
                if p.serving_last_good {
                    "; the last good spec is being served"
                } else {
                    ""
                }
            );
            for err in &p.errors {
                let _ = writeln!(out, "         - {err}");
            }
        }
        None => {
            let _ = writeln!(
                out,
                "policy   {}: - (the controller's /state was not read)",
                e.route
            );
        }
    }
    out
}

// ---- agent ----

/// One agent: its table, connection, and every endpoint of every route.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentView<'a> {
    pub config: &'a Config,
    /// The NodeAgent object (cluster mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_agent: Option<&'a NodeAgentStatus>,
}

pub(crate) fn agent(v: &AgentView<'_>) -> String {
    let c = v.config;
    let mut out = String::new();
    let zone = if c.zone.is_empty() { "-" } else { &c.zone };
    let _ = writeln!(out, "node        {} (zone {zone})", c.node);
    let source = match &c.control.table_source {
        serde_json::Value::String(s) => format!(", from {s}"),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "table       version {}{}{source}",
        c.version,
        if c.ready { ", ready" } else { ", NOT ready" }
    );
    let conn = match (&c.control.connected_to, &c.control.last_error) {
        (Some(to), _) => format!("connected to {to}"),
        (None, Some(e)) => format!("NOT connected: {e}"),
        (None, None) => "NOT connected".into(),
    };
    let _ = writeln!(out, "controller  {conn}");
    if let Some(n) = &c.control.last_nack {
        let _ = writeln!(out, "last NACK   version {}: {}", n.version, n.error);
    }
    if let Some(na) = v.node_agent {
        let _ = writeln!(
            out,
            "NodeAgent   connected={} applied={} controller={} lastAck={}",
            na.connected,
            dash(na.applied_version),
            na.controller.as_deref().unwrap_or("-"),
            na.last_ack_time.as_deref().unwrap_or("-"),
        );
        if let Some(n) = &na.last_nack {
            let _ = writeln!(
                out,
                "            NACK of version {}: {}",
                n.version, n.error
            );
        }
    }
    let mut rows = vec![
        [
            "ROUTE",
            "HOSTS",
            "RULE",
            "TIER",
            "SERVICE",
            "ENDPOINT",
            "WEIGHT",
            "HEALTH",
            "IN-FLIGHT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in &c.routes {
        let mut first_of_route = true;
        for (i, rule) in r.rules.iter().enumerate() {
            let mut first_of_rule = true;
            for b in &rule.backends {
                for e in &b.endpoints {
                    let health = if e.healthy {
                        "healthy".to_string()
                    } else {
                        format!("unhealthy: {}", e.why.as_deref().unwrap_or("-"))
                    };
                    rows.push(vec![
                        if first_of_route {
                            r.name.clone()
                        } else {
                            String::new()
                        },
                        if first_of_route {
                            r.hosts.join(",")
                        } else {
                            String::new()
                        },
                        if first_of_rule {
                            (i + 1).to_string()
                        } else {
                            String::new()
                        },
                        if first_of_rule {
                            format!(
                                "{}{}",
                                rule.active_tier,
                                if rule.panic { " PANIC" } else { "" }
                            )
                        } else {
                            String::new()
                        },
                        format!("{}/{}", b.service, b.tier),
                        e.address.clone(),
                        e.weight.to_string(),
                        health,
                        dash(e.in_flight),
                    ]);
                    first_of_route = false;
                    first_of_rule = false;
                }
            }
        }
        if first_of_route {
            rows.push(vec![
                r.name.clone(),
                r.hosts.join(","),
                "-".into(),
                "-".into(),
                "-".into(),
                "(no endpoints)".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out
}

// ---- top ----

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TopRow {
    pub route: String,
    pub accepted: bool,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// Every policy's traffic, busiest first; policies without figures last, by name.
pub(crate) fn top_rows(state: &State) -> Vec<TopRow> {
    let mut rows: Vec<TopRow> = state
        .policies
        .iter()
        .map(|(name, p)| TopRow {
            route: name.clone(),
            accepted: p.accepted,
            traffic: traffic_of(p),
        })
        .collect();
    // Stable: equal rates stay in name order (the map's order).
    rows.sort_by(|a, b| {
        let key = |r: &TopRow| r.traffic.rps.unwrap_or(f64::NEG_INFINITY);
        key(b).total_cmp(&key(a))
    });
    rows
}

pub(crate) fn top(rows: &[TopRow]) -> String {
    let mut t = vec![
        ["ROUTE", "RPS", "ERRORS", "P99", "CACHE-HIT", "AGENTS"]
            .map(String::from)
            .to_vec(),
    ];
    for r in rows {
        t.push(vec![
            if r.accepted {
                r.route.clone()
            } else {
                format!("{} (not accepted)", r.route)
            },
            r.traffic
                .rps
                .map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            pct(r.traffic.error_ratio),
            r.traffic
                .p99_ms
                .map_or_else(|| "-".into(), |v| format!("{v:.0}ms")),
            pct(r.traffic.cache_hit_ratio),
            dash(r.traffic.agents),
        ]);
    }
    let mut out = table(&t);
    if rows.iter().all(|r| r.traffic == Traffic::default()) && !rows.is_empty() {
        out.push_str("(this controller reports no traffic figures: \"-\" means unknown)\n");
    }
    out
}

/// `purge`: a line per agent, then the total.
pub(crate) fn purge(results: &[crate::fetch::Purged]) -> String {
    let mut t = vec![["NODE", "PURGED"].map(String::from).to_vec()];
    for r in results {
        t.push(vec![
            r.node.clone(),
            match (&r.purged, &r.error) {
                (Some(n), _) => n.to_string(),
                (None, e) => format!("failed: {}", e.as_deref().unwrap_or("?")),
            },
        ]);
    }
    let mut out = table(&t);
    let ok = results.iter().filter(|r| r.purged.is_some()).count();
    let total: u64 = results.iter().filter_map(|r| r.purged).sum();
    out.push_str(&format!(
        "{total} objects purged from memory on {ok} of {} agents\n",
        results.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        serde_json::from_str(include_str!("../fixtures/state.json")).expect("state")
    }

    #[test]
    fn top_sorts_by_rps_and_shows_unknown_as_dash() {
        let mut s = state();
        let names: Vec<String> = s.policies.keys().cloned().collect();
        assert!(names.len() >= 2, "{names:?}");
        // The fixture has no traffic yet: every figure is unknown.
        let text = top(&top_rows(&s));
        assert!(text.contains("reports no traffic figures"), "{text}");
        let first = text.lines().nth(1).expect("a row");
        assert!(
            first.split_whitespace().skip(1).all(|c| c == "-"),
            "{first}"
        );
        // With figures, the busiest comes first.
        for (i, n) in names.iter().enumerate() {
            if let Some(p) = s.policies.get_mut(n) {
                p.traffic = Some(
                    serde_json::json!({"rps": i as f64 * 10.0, "errorRatio": 0.5, "p99Ms": 12.0, "cacheHitRatio": 0.25, "agents": 1}),
                );
            }
        }
        let rows = top_rows(&s);
        assert_eq!(rows[0].route, names[names.len() - 1]);
        let text = top(&rows);
        let first = text.lines().nth(1).expect("a row");
        assert!(
            first.contains("50.0%") && first.contains("12ms") && first.contains("25.0%"),
            "{first}"
        );
    }

    #[test]
    fn agent_view_lists_every_endpoint_with_its_health() {
        let c: Config =
            serde_json::from_str(include_str!("../fixtures/config.json")).expect("config");
        let text = agent(&AgentView {
            config: &c,
            node_agent: None,
        });
        assert!(
            text.contains(&format!("version {}, ready", c.version)),
            "{text}"
        );
        assert!(text.contains("connected to"), "{text}");
        for e in c
            .routes
            .iter()
            .flat_map(|r| &r.rules)
            .flat_map(|r| &r.backends)
            .flat_map(|b| &b.endpoints)
        {
            assert!(
                text.contains(&e.address),
                "{} missing in\n{text}",
                e.address
            );
        }
    }

    #[test]
    fn explain_shows_a_rejected_policys_errors_and_unhealthy_endpoints_why() {
        let c: Config =
            serde_json::from_str(include_str!("../fixtures/config.json")).expect("config");
        let mut s = state();
        let p = s.policies.get_mut("default/shop").expect("policy");
        p.accepted = false;
        p.reason = "Invalid".into();
        p.serving_last_good = true;
        p.errors = vec!["spec.failover.minHealthyPercent: must be <= 100, got 170".into()];
        p.rest.insert(
            "endpoints".into(),
            serde_json::json!([{"address": "127.0.0.11:9081",
                "agentHealth": {"unhealthyOn": 1, "of": 3, "reasons": ["HTTP 503"]}}]),
        );
        let req = crate::matcher::Request::from_cli("shop", None, None);
        let e = crate::explain::explain(&c, Some(&s.policies), &req).expect("explained");
        let text = explain(&e);
        assert!(
            text.contains(
                "default/shop: NOT accepted (Invalid); the last good spec is being served"
            ),
            "{text}"
        );
        assert!(
            text.contains("- spec.failover.minHealthyPercent: must be <= 100"),
            "{text}"
        );
        let row = text
            .lines()
            .find(|l| l.contains("127.0.0.11:9081"))
            .expect("row");
        assert!(row.contains("(unhealthy on 1/3 agents: HTTP 503)"), "{row}");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&[
            vec!["A".into(), "B".into()],
            vec!["long".into(), "x".into()],
        ]);
        assert_eq!(t, "A     B\nlong  x\n");
    }

    #[test]
    fn check_output_marks_each_line_and_counts_failures() {
        let lines = vec![
            Line {
                ok: true,
                check: "a".into(),
                detail: "fine".into(),
                hint: None,
            },
            Line {
                ok: false,
                check: "b".into(),
                detail: "down".into(),
                hint: Some("start it".into()),
            },
        ];
        assert_eq!(
            check(&lines),
            "✓ a: fine\n✗ b: down\n    hint: start it\n1 of 2 checks failed\n"
        );
    }
}
