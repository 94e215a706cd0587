//! The operator's view of the controller, one consistent capture for `/state` and the
//! dashboard: the configuration state (policies with their computed status, manifest files),
//! the routes in force (hosts, backends, endpoints and their weights), the connected agents,
//! and what the agents report ([`crate::serve::traffic`]).
//!
//! `/state` is the configuration state's JSON with additive fields merged into each policy
//! (`hosts`, `traffic`, and `endpoints` with `agentHealth` under each backend). They are
//! merged into the JSON here rather than added to `PolicyState`, because that type belongs to
//! the routing layer, which computes from objects and knows nothing of agents.

use crate::routing::PolicyState;
use crate::serve::hub::{ConfigState, Hub, Table};
use crate::serve::server::{AgentState, Agents};
use crate::serve::traffic::{AgentHealth, Observed, Traffic};
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
use weir_proto::v1::Route;

/// Everything shown, captured at one moment.
pub(crate) struct View {
    pub config: ConfigState,
    pub agents: Vec<AgentState>,
    pub observed: Observed,
    pub table: Arc<Table>,
}

/// One (Service, tier) of a policy, with its endpoints (`/state`
/// `policies[*].backends[*]`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BackendView {
    pub name: String,
    pub tier: u32,
    pub ready: u32,
    pub healthy: u32,
    /// The backendRef's weight in the first rule that names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Its endpoints in the first rule that names it.
    pub endpoints: Vec<EndpointView>,
}

/// One endpoint of a backend.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EndpointView {
    pub address: String,
    /// EndpointSlice readiness (ready ∧ serving ∧ ¬terminating).
    pub ready: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub zone: String,
    /// Its share of the rule's traffic as the controller computed it (gcd-reduced).
    pub weight: u32,
    /// Its health as the agents see it.
    pub agent_health: AgentHealth,
}

impl View {
    pub(crate) fn capture(hub: &Hub, agents: &Agents) -> Self {
        Self {
            config: hub.config_state(),
            agents: agents.list(),
            observed: agents.reports.observed(Instant::now()),
            table: hub.current(),
        }
    }

    pub(crate) fn route(&self, key: &str) -> Option<&Route> {
        self.table.routes.get(key).map(|r| &**r)
    }

    /// The policy's hosts as served (empty when nothing is programmed).
    pub(crate) fn hosts(&self, key: &str) -> &[String] {
        self.route(key).map_or(&[][..], |r| r.hosts.as_slice())
    }

    /// The policy's traffic (zeros when no agent reported any).
    pub(crate) fn traffic(&self, key: &str) -> Traffic {
        self.observed.routes.get(key).cloned().unwrap_or_default()
    }

    /// The policy's backends, each with its endpoints and their agent-side health.
    pub(crate) fn backends(&self, key: &str, state: &PolicyState) -> Vec<BackendView> {
        let route = self.route(key);
        state
            .backends
            .iter()
            .map(|b| {
                let found = route.and_then(|r| {
                    r.rules
                        .iter()
                        .flat_map(|rule| rule.backends.iter())
                        .find(|rb| rb.service == b.name && rb.tier == b.tier)
                });
                BackendView {
                    name: b.name.clone(),
                    tier: b.tier,
                    ready: b.ready,
                    healthy: b.healthy,
                    weight: found.map(|rb| rb.weight),
                    endpoints: found
                        .map(|rb| {
                            rb.endpoints
                                .iter()
                                .map(|e| EndpointView {
                                    address: e.address.clone(),
                                    ready: e.ready,
                                    zone: e.zone.clone(),
                                    weight: e.weight,
                                    agent_health: self.observed.health(&e.address),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The `/state` document.
    pub(crate) fn to_json(&self) -> Result<Value, serde_json::Error> {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct StateView<'a> {
            #[serde(flatten)]
            config: &'a ConfigState,
            agents: &'a [AgentState],
            /// Agents whose last load report is recent (the `of` of every `agentHealth`).
            agents_reporting: u32,
        }
        let mut doc = serde_json::to_value(StateView {
            config: &self.config,
            agents: &self.agents,
            agents_reporting: self.observed.agents,
        })?;
        if let Some(policies) = doc.get_mut("policies").and_then(Value::as_object_mut) {
            for (key, state) in &self.config.policies {
                let Some(Value::Object(p)) = policies.get_mut(key) else {
                    continue;
                };
                p.insert("hosts".into(), serde_json::to_value(self.hosts(key))?);
                p.insert("traffic".into(), serde_json::to_value(self.traffic(key))?);
                p.insert(
                    "backends".into(),
                    serde_json::to_value(self.backends(key, state))?,
                );
            }
        }
        Ok(doc)
    }
}
