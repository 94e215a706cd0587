//! Everything that writes to the Kubernetes API server: [`leader`] election (a Lease),
//! TrafficPolicy [`status`] and Events, and the [`nodeagent`] objects.

pub mod leader;
pub mod nodeagent;
pub mod status;
