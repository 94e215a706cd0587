//! weir's per-node data plane.
//!
//! [`client`] follows the controllers and hands each update to [`state::Shared::apply`], the
//! single mutator, which builds a [`table::Table`] and swaps it in atomically; [`proxy`]
//! workers (their client connections accepted by [`downstream`], which serves h2c itself and
//! HTTP/1.1 through hyper) read the table lock-free and forward each request to an endpoint
//! chosen by [`balance`] over [`upstream`] connection pools ([`h1c`] speaks HTTP/1.1 to
//! upstreams, [`h2c`] HTTP/2); [`admin`] and [`metrics`] show what the agent is doing.

pub mod admin;
pub mod balance;
pub mod cache;
pub mod checks;
pub mod client;
pub mod downstream;
pub mod h1c;
pub mod h2c;
pub mod health;
pub mod metrics;
pub mod pick;
pub mod proxy;
pub mod replay;
pub mod state;
pub mod table;
pub mod upstream;
