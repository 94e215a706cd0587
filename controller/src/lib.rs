//! weir's control plane.
//!
//! The folders follow the configuration from input to agents; each layer only uses the ones
//! listed before it:
//!
//! 1. [`model`]: the CRD types (`TrafficPolicy`, `NodeAgent`), the Kubernetes objects read,
//!    and the name tables (algorithms, evictions, retry conditions) the schema derives from;
//! 2. [`validate`]: one policy on its own, to the route it programs or every problem found;
//! 3. [`routing`]: the pure computation from a snapshot of objects to routes and policy
//!    states, in full or incrementally from the previous result;
//! 4. [`serve`]: the [`serve::hub`] (the single mutator, which publishes versioned tables),
//!    the gRPC [`serve::server`] that pushes them to agents, TLS, and the admin endpoints;
//! 5. [`source`]: what feeds the hub: a folder of manifests ([`source::dir`], local mode) or
//!    the Kubernetes API ([`source::kube`]);
//! 6. [`k8s`]: what writes back to the API server: leader election, TrafficPolicy status,
//!    NodeAgent objects.

pub mod k8s;
pub mod model;
pub mod routing;
pub mod serve;
pub mod source;
pub mod validate;
