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

use prost::bytes::Bytes;

/// A `ControllerMessage` already encoded with [`prost::Message::encode_to_vec`]: the
/// controller encodes a routing update once and sends the same bytes (cloning shares them)
/// to every agent that needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Encoded(pub Bytes);

impl Encoded {
    pub fn of(message: &v1::ControllerMessage) -> Self {
        Self(Bytes::from(prost::Message::encode_to_vec(message)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
