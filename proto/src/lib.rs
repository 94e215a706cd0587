//! The controller ↔ agent protocol (`weir.v1`), generated from `proto/weir/v1/*.proto`.
//!
//! This crate is the only thing the controller and the agent share: it holds the wire types
//! and the tonic service stubs and nothing else, so the agent never depends on Kubernetes types.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("weir.v1");
}
