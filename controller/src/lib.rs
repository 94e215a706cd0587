//! weir's control plane.
//!
//! A source (a folder of manifests in local mode, the Kubernetes API otherwise) produces
//! [`routing::Snapshot`]s; the [`hub`] runs the pure [`routing`] computation on them and
//! publishes versioned tables; the [`server`] pushes tables to agents over
//! `weir.v1.RoutingDiscovery`; [`admin`] serves health, metrics and `/state`.

pub mod admin;
pub mod hub;
pub mod kube;
pub mod leader;
pub mod local;
pub mod model;
pub mod nodeagent;
pub mod routing;
pub mod server;
pub mod source;
pub mod status;
pub mod tls;
pub mod validate;

/// Resolves once `stop` is (or turns) true: the shutdown signal every long-running part of
/// the controller (gRPC server, agent sessions, leader election) waits on.
pub async fn stopping(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
