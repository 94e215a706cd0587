//! The controller ↔ agent protocol (`weir.v1`), generated from `proto/weir/v1/*.proto`.
//!
//! This crate is the only thing the controller and the agent share: it holds the wire types,
//! the tonic service stubs, and [`weights`] — the arithmetic that defines what an endpoint
//! weight means, which both sides must compute identically. The agent never depends on
//! Kubernetes types.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weir.v1");
}

pub mod weights;
