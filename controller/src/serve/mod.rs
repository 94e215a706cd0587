//! Serving agents and operators: the [`hub`] publishes routing tables, the [`server`] streams
//! them to agents over `weir.v1.RoutingDiscovery` (framed by [`wire`], with [`tls`] in a
//! cluster), and [`admin`]
//! serves health, metrics, `/state` and the [`dashboard`]; [`load`] turns agents' load reports
//! into load-aware weights, and [`traffic`] into per-route traffic and agent-side endpoint
//! health; [`peers`] keeps the cache peer sets agents hash objects over.

pub mod admin;
pub(crate) mod dashboard;
pub mod hub;
pub mod load;
pub(crate) mod peers;
pub mod server;
pub mod tls;
pub(crate) mod traffic;
pub(crate) mod view;
pub mod wire;

/// Resolves once `stop` is (or turns) true: the shutdown signal every long-running part of
/// the controller (gRPC server, agent sessions, leader election) waits on.
pub async fn stopping(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
