//! `explain`: which route, rule, tier and endpoints a request would get from one agent, and
//! why, computed from the agent's `/config` (the data plane's own view) and, for the
//! policy's errors and agents' health verdicts, the controller's `/state`. Pure: the
//! documents come in, an [`Explanation`] goes out.

use crate::contract::{
    AgentHealth, Config, HeaderMatch, PolicyState, Route, Rule, agent_health_of,
};
use crate::matcher::{self, Request, RuleOutcome, path_kind_name};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ExplainError {
    #[error("{0:?} is not a host the agent could route (it would answer 400)")]
    BadHost(String),
    #[error("{}", unknown_host_message(.host, .closest.as_deref(), .hosts))]
    UnknownHost {
        host: String,
        closest: Option<String>,
        hosts: Vec<String>,
    },
}

fn unknown_host_message(host: &str, closest: Option<&str>, hosts: &[String]) -> String {
    let mut s = format!("no route for host {host:?}: the agent would answer 404");
    if let Some(c) = closest {
        s.push_str(&format!("; did you mean {c:?}?"));
    }
    if hosts.is_empty() {
        s.push_str(" (the agent serves no hosts yet)");
    } else {
        s.push_str(&format!("\nhosts served: {}", hosts.join(", ")));
    }
    s
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Explanation {
    pub node: String,
    pub table_version: u64,
    /// The normalised host.
    pub host: String,
    pub method: String,
    pub path: String,
    pub headers: Vec<HeaderMatch>,
    pub route: String,
    pub route_hosts: Vec<String>,
    pub algorithm: String,
    /// One line per rule tried, in order, up to the one that matches.
    pub rules_tried: Vec<RuleLine>,
    /// The rule that matches (1-based), `None` when none does.
    pub rule: Option<usize>,
    pub tier: Option<TierView>,
    pub endpoints: Vec<EndpointLine>,
    /// The policy's state at the controller; `None` when the controller was not asked or
    /// does not know the policy.
    pub policy: Option<PolicyLine>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RuleLine {
    /// 1-based, as users count rules in a policy.
    pub rule: usize,
    pub matches: bool,
    pub why: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TierView {
    pub active_tier: u32,
    pub panic: bool,
    pub min_healthy_percent: u32,
    /// Per tier: the healthy share (percent) and the share of traffic it gets (percent).
    pub tiers: Vec<TierLine>,
    pub why: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TierLine {
    pub tier: u32,
    pub healthy_percent: f64,
    pub traffic_percent: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EndpointLine {
    pub service: String,
    pub tier: u32,
    pub address: String,
    pub weight: u64,
    /// This endpoint's share of the rule's traffic, percent.
    pub share_percent: f64,
    pub healthy: bool,
    pub why: Option<String>,
    /// What all agents think of it, when the controller reports that.
    pub agent_health: Option<AgentHealth>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PolicyLine {
    pub accepted: bool,
    pub reason: String,
    pub errors: Vec<String>,
    pub serving_last_good: bool,
}

/// Explains `req` against an agent's `config`; `policies` is the controller's `/state`
/// policies when it could be read.
pub(crate) fn explain(
    config: &Config,
    policies: Option<&BTreeMap<String, PolicyState>>,
    req: &Request,
) -> Result<Explanation, ExplainError> {
    let host = matcher::normalize_host(&req.host)
        .ok_or_else(|| ExplainError::BadHost(req.host.clone()))?;
    let Some(route) = matcher::route_for(&config.routes, &host) else {
        let mut hosts: Vec<String> = config
            .routes
            .iter()
            .flat_map(|r| r.hosts.iter().map(|h| h.to_ascii_lowercase()))
            .collect();
        hosts.sort();
        hosts.dedup();
        return Err(ExplainError::UnknownHost {
            closest: closest(&host, &hosts),
            host,
            hosts,
        });
    };
    let (hit, seen) = matcher::first_rule(route, req);
    let rules_tried = seen
        .iter()
        .enumerate()
        .map(|(i, o)| rule_line(&route.rules[i], i, o))
        .collect();
    let rule = hit.map(|i| &route.rules[i]);
    let policy_state = policies.and_then(|p| p.get(&route.name));
    let endpoints = rule.map_or_else(Vec::new, |r| endpoint_lines(r, policy_state));
    Ok(Explanation {
        node: config.node.clone(),
        table_version: config.version,
        host,
        method: req.method.clone(),
        path: req.path.clone(),
        headers: req
            .headers
            .iter()
            .map(|(name, value)| HeaderMatch {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        route: route.name.clone(),
        route_hosts: route.hosts.clone(),
        algorithm: route.algorithm.clone(),
        rules_tried,
        rule: hit.map(|i| i + 1),
        tier: rule.map(|r| tier_view(route, r)),
        endpoints,
        policy: policy_state.map(|p| PolicyLine {
            accepted: p.accepted,
            reason: p.reason_text(),
            errors: p.errors.clone(),
            serving_last_good: p.serving_last_good,
        }),
    })
}

/// The served host nearest to `host` by edit distance, if it is near enough to be a typo.
fn closest(host: &str, hosts: &[String]) -> Option<String> {
    hosts
        .iter()
        .map(|h| (strsim::levenshtein(host, h), h))
        .min()
        .filter(|(d, h)| *d <= (h.len().max(host.len()) / 2).max(2))
        .map(|(_, h)| h.clone())
}

fn describe_match(m: &crate::contract::Match) -> String {
    let mut parts = Vec::new();
    if let Some(method) = m.method.as_deref().filter(|s| !s.is_empty()) {
        parts.push(format!("method {method}"));
    }
    if let Some(p) = &m.path {
        parts.push(format!("{} {}", path_kind_name(&p.kind), p.value));
    }
    for h in &m.headers {
        parts.push(format!("header {}: {}", h.name, h.value));
    }
    if parts.is_empty() {
        "anything".into()
    } else {
        parts.join(", ")
    }
}

fn rule_line(rule: &Rule, i: usize, o: &RuleOutcome) -> RuleLine {
    let (matches, why) = match o {
        RuleOutcome::MatchesAll => (true, "has no matches, so it takes every request".into()),
        RuleOutcome::Matches(m) => (
            true,
            format!("matches: {}", describe_match(&rule.matches[*m])),
        ),
        RuleOutcome::NoMatch(verdicts) => (
            false,
            format!(
                "skipped: {}",
                verdicts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        ),
    };
    RuleLine {
        rule: i + 1,
        matches,
        why,
    }
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        100.0 * part / whole
    } else {
        0.0
    }
}

/// The tiers of `rule`, how healthy each is, what share of traffic each gets, and why.
///
/// The healthy share follows the formula of `weir_proto::weights` (a tier's
/// `Σ w·healthy/total ÷ Σ w` over its Services of weight > 0), written out here over the
/// JSON rather than converting back to protobuf; the traffic shares are the agent's own
/// endpoint weights, so they are what it balances by even if the two ever disagreed.
fn tier_view(route: &Route, rule: &Rule) -> TierView {
    let min_healthy = route.min_healthy_percent.clamp(1, 100);
    // tier → (Σ w, Σ w·healthy/total, Σ endpoint weights)
    let mut tiers: BTreeMap<u32, (f64, f64, f64)> = BTreeMap::new();
    for b in &rule.backends {
        let t = tiers.entry(b.tier).or_default();
        t.2 += b.endpoints.iter().map(|e| e.weight as f64).sum::<f64>();
        if b.weight == 0 {
            continue;
        }
        let w = f64::from(b.weight);
        let total = b.endpoints.len();
        let healthy = b.endpoints.iter().filter(|e| e.healthy).count();
        t.0 += w;
        if total > 0 {
            t.1 += w * healthy as f64 / total as f64;
        }
    }
    let all_weight: f64 = tiers.values().map(|t| t.2).sum();
    let lines: Vec<TierLine> = tiers
        .iter()
        .map(|(&tier, &(w, h, ew))| TierLine {
            tier,
            healthy_percent: percent(h, w),
            traffic_percent: percent(ew, all_weight),
        })
        .collect();
    let why = if rule.panic {
        format!(
            "panic: no tier has a healthy endpoint, so every endpoint of tier {} takes traffic \
             (sending to endpoints that may fail beats refusing every request)",
            rule.active_tier
        )
    } else if lines.len() <= 1 {
        match lines.first() {
            Some(l) => format!("one tier; {:.0}% of it is healthy", l.healthy_percent),
            None => "the rule has no backends".into(),
        }
    } else if rule.active_tier == 0 {
        format!(
            "tier 0 is {:.0}% healthy, at least minHealthyPercent {min_healthy}%: all traffic stays in tier 0",
            lines[0].healthy_percent
        )
    } else {
        let below: Vec<String> = lines
            .iter()
            .filter(|l| l.tier < rule.active_tier)
            .map(|l| format!("tier {} is {:.0}% healthy", l.tier, l.healthy_percent))
            .collect();
        format!(
            "failover: {} (below minHealthyPercent {min_healthy}%), so the missing share spills down to tier {}",
            below.join(", "),
            rule.active_tier
        )
    };
    TierView {
        active_tier: rule.active_tier,
        panic: rule.panic,
        min_healthy_percent: min_healthy,
        tiers: lines,
        why,
    }
}

fn endpoint_lines(rule: &Rule, policy: Option<&PolicyState>) -> Vec<EndpointLine> {
    let total: f64 = rule
        .backends
        .iter()
        .flat_map(|b| &b.endpoints)
        .map(|e| e.weight as f64)
        .sum();
    rule.backends
        .iter()
        .flat_map(|b| b.endpoints.iter().map(move |e| (b, e)))
        .map(|(b, e)| EndpointLine {
            service: b.service.clone(),
            tier: b.tier,
            address: e.address.clone(),
            weight: e.weight,
            share_percent: percent(e.weight as f64, total),
            healthy: e.healthy,
            why: e.why.clone().or_else(|| {
                (b.weight == 0 && e.healthy).then(|| "its Service has weight 0 (drained)".into())
            }),
            agent_health: policy.and_then(|p| agent_health_of(p, &e.address)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::State;

    fn fixture() -> (Config, State) {
        let c = serde_json::from_str(include_str!("../fixtures/config.json")).expect("config");
        let s = serde_json::from_str(include_str!("../fixtures/state.json")).expect("state");
        (c, s)
    }

    fn req(host: &str, path: &str, method: &str, headers: &[(&str, &str)]) -> Request {
        let mut r = Request::from_cli(host, Some(path), Some(method));
        r.headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        r
    }

    #[test]
    fn reads_go_to_the_weighted_split_with_shares_from_the_agents_weights() {
        let (c, s) = fixture();
        let e = explain(
            &c,
            Some(&s.policies),
            &req("Shop.Test:8080", "/items", "get", &[]),
        )
        .expect("explained");
        assert_eq!(e.route, "default/shop");
        assert_eq!(e.rule, Some(1));
        let shares: Vec<(String, u64)> = e
            .endpoints
            .iter()
            .filter(|l| l.tier == 0)
            .map(|l| (l.service.clone(), l.share_percent.round() as u64))
            .collect();
        // 90/10 between the Services; shop-v1 has two endpoints, shop-v2 one.
        assert_eq!(
            shares,
            [
                ("shop-v1".to_string(), 45),
                ("shop-v1".to_string(), 45),
                ("shop-v2".to_string(), 10)
            ]
        );
        let tier = e.tier.expect("tier");
        assert_eq!((tier.active_tier, tier.panic), (0, false));
        assert!(
            tier.why.contains("all traffic stays in tier 0"),
            "{}",
            tier.why
        );
        let standby = e.endpoints.iter().find(|l| l.tier == 1).expect("standby");
        assert_eq!(standby.share_percent, 0.0);
        assert!(e.policy.expect("policy").accepted);
    }

    #[test]
    fn writes_skip_the_read_rule_and_say_why() {
        let (c, _) = fixture();
        let e = explain(&c, None, &req("shop.test", "/cart", "POST", &[])).expect("explained");
        assert_eq!(e.rule, Some(3));
        assert!(!e.rules_tried[0].matches);
        assert!(
            e.rules_tried[0].why.contains("method is not GET"),
            "{:?}",
            e.rules_tried
        );
        assert_eq!(e.endpoints[0].service, "shop-primary");
        assert_eq!(e.endpoints[0].share_percent, 100.0);
        assert!(e.policy.is_none());
    }

    #[test]
    fn a_header_match_picks_the_canary_rule() {
        let (c, _) = fixture();
        let e = explain(
            &c,
            None,
            &req("shop.test", "/items", "POST", &[("X-Canary", "on")]),
        )
        .expect("explained");
        assert_eq!(e.rule, Some(2));
        assert!(
            e.rules_tried[1].why.contains("header x-canary: on"),
            "{:?}",
            e.rules_tried
        );
    }

    #[test]
    fn unknown_host_names_the_closest_one() {
        let (c, _) = fixture();
        let err = explain(&c, None, &req("shp.test", "/", "GET", &[])).expect_err("unknown");
        let ExplainError::UnknownHost { closest, hosts, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(closest.as_deref(), Some("shop.test"));
        assert!(hosts.contains(&"shop.test".to_string()), "{hosts:?}");
        assert!(
            err.to_string().contains("did you mean \"shop.test\""),
            "{err}"
        );
        let far = explain(&c, None, &req("zzzzzzzzzzzzzz", "/", "GET", &[])).expect_err("unknown");
        assert!(!far.to_string().contains("did you mean"), "{far}");
    }

    #[test]
    fn failover_and_panic_say_why() {
        let (mut c, _) = fixture();
        let route = c
            .routes
            .iter_mut()
            .find(|r| r.name == "default/shop")
            .expect("route");
        let rule = &mut route.rules[0];
        // Tier 0 entirely down: the standby takes everything.
        for b in rule.backends.iter_mut().filter(|b| b.tier == 0) {
            for e in &mut b.endpoints {
                e.healthy = false;
                e.weight = 0;
                e.why = Some("HTTP 500".into());
            }
        }
        for b in rule.backends.iter_mut().filter(|b| b.tier == 1) {
            for e in &mut b.endpoints {
                e.weight = 1;
            }
        }
        rule.active_tier = 1;
        let e = explain(&c, None, &req("shop.test", "/", "GET", &[])).expect("explained");
        let tier = e.tier.expect("tier");
        assert!(
            tier.why.starts_with("failover: tier 0 is 0% healthy"),
            "{}",
            tier.why
        );
        assert_eq!(tier.tiers[1].traffic_percent, 100.0);
        assert_eq!(e.endpoints[0].why.as_deref(), Some("HTTP 500"));

        let route = c
            .routes
            .iter_mut()
            .find(|r| r.name == "default/shop")
            .expect("route");
        route.rules[0].panic = true;
        route.rules[0].active_tier = 0;
        let e = explain(&c, None, &req("shop.test", "/", "GET", &[])).expect("explained");
        assert!(e.tier.expect("tier").why.starts_with("panic"));
    }

    #[test]
    fn hosts_the_agent_would_refuse_are_bad_hosts() {
        let (c, _) = fixture();
        let err = explain(&c, None, &req("a b", "/", "GET", &[])).expect_err("bad");
        assert_eq!(err, ExplainError::BadHost("a b".into()));
    }
}
