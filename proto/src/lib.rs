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

/// The `RoutingDiscovery` server with pre-encoded outgoing messages ([`Encoded`]); the
/// controller serves this one. On the wire it is the same service as
/// [`v1::routing_discovery_server`].
pub mod encoded {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/encoded/weir.v1.rs"));
}

pub mod weights;

use prost::bytes::{BufMut, Bytes};

/// A `ControllerMessage` already encoded with [`prost::Message::encode_to_vec`]: the server
/// writes its bytes as they are. Cloning shares the bytes. It is only ever sent, never
/// decoded (decoding one would need the real type: use [`v1::ControllerMessage`]).
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

impl prost::Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Never decoded on purpose; skipping keeps a stray decode harmless.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}
