//! The `NodeAgent` custom resource (`weir.dev/v1alpha1`, cluster-scoped): one object per
//! node, named after the agent's `--node-name`, created, updated and deleted by the leading
//! controller. It is status only: users read it with `kubectl get nodeagents` and never write
//! it, so its spec is empty.
//!
//! Field values mirror the protocol (`proto/weir/v1/routing.proto`): versions are the
//! routing-table versions the controller assigns, and the last NACK keeps the agent's error
//! text verbatim so that `kubectl get nodeagent NODE -o yaml` says why an update was refused.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// weir's agent on one node, as the controller sees it.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "NodeAgent",
    plural = "nodeagents",
    shortname = "na",
    category = "weir",
    status = "NodeAgentStatus",
    printcolumn = r#"{"name":"Connected","type":"boolean","jsonPath":".status.connected"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".status.zone"}"#,
    printcolumn = r#"{"name":"Applied","type":"integer","jsonPath":".status.appliedVersion","description":"Routing-table version in force on the agent"}"#,
    printcolumn = r#"{"name":"Last ACK","type":"date","jsonPath":".status.lastAckTime"}"#,
    printcolumn = r#"{"name":"Last NACK","type":"integer","jsonPath":".status.lastNack.version","description":"Last version the agent refused"}"#,
    printcolumn = r#"{"name":"Cache Hit","type":"number","jsonPath":".status.cacheHitRatio","description":"Share of cacheable requests served from the agent's cache"}"#,
    printcolumn = r#"{"name":"NACK Error","type":"string","jsonPath":".status.lastNack.error","priority":1}"#,
    printcolumn = r#"{"name":"Controller","type":"string","jsonPath":".status.controller","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct NodeAgentSpec {}

/// What the controller knows of one agent.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentStatus {
    /// Whether the agent has a stream open to a controller right now.
    #[serde(default)]
    pub connected: bool,
    /// The controller pod the agent's stream is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    /// The node's zone (`topology.kubernetes.io/zone`), as the agent reported it or the Node
    /// carries it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The agent's software version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The routing-table version in force on the agent (its last ACK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_version: Option<u64>,
    /// When the agent last acknowledged an update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ack_time: Option<Time>,
    /// The last update the agent refused; the previous table stayed in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_nack: Option<NodeAgentNack>,
    /// Cache hits ÷ cacheable requests over the agent's last load reports, from 0 to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub cache_hit_ratio: Option<f64>,
}

/// An update the agent refused, with its reason.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeAgentNack {
    /// The version that was refused.
    pub version: u64,
    /// The agent's error message.
    pub error: String,
    /// When the NACK arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}
