//! weir's control plane.
//!
//! Sources (a directory of manifests in local mode, the Kubernetes API otherwise) feed one
//! [`index::Index`] of objects; the pure [`routing`] computation turns it into routing tables
//! and policy status; the [`server`] pushes tables to agents over `weir.v1.RoutingDiscovery`;
//! [`admin`] serves health, metrics and `/state`.

pub mod model;
pub mod routing;
pub mod validate;
