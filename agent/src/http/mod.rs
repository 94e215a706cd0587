//! HTTP pieces every other layer uses, and which use nothing of the agent's: header rules
//! ([`headers`]), gRPC conventions ([`grpc`]), the agent's own replies ([`reply`]), request
//! bodies that can be replayed for a retry ([`body`]) or copied to a mirror ([`tee`]), HTTP/2
//! stream plumbing ([`h2`]) and the header rules of protocol upgrades and WebSocket over
//! HTTP/2 ([`upgrade`]).
//! Leaves: nothing here imports from another module of the crate.

pub(crate) mod body;
pub(crate) mod grpc;
pub(crate) mod h2;
pub(crate) mod headers;
pub(crate) mod reply;
pub(crate) mod tee;
pub(crate) mod upgrade;
