//! The sources of objects, each feeding the [`crate::serve::hub::Hub`] with snapshots:
//! [`dir`] parses a folder of manifests and [`watch`] follows it (local mode); [`kube`]
//! follows the Kubernetes API with reflectors.

pub mod dir;
pub mod kube;
pub mod watch;
