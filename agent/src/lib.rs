//! weir's per-node data plane.
//!
//! The folders follow a request, then the configuration:
//!
//! ```text
//! listen/   bind, detect (HTTP/1.1 or h2c), h1 (hyper) and h2 servers
//!   └─ route/     host → route → rule (table, matcher); the cached path; forward = the try
//!        │        loop; retry = what a try's result means; outcome = health, ejection,
//!        │        metrics and the answer
//!        ├─ balance/   one file per algorithm family (rr, random, p2c, hash, zone) + load
//!        ├─ upstream/  the per-worker pool, h1/{encode,parse,body}, h2, the downstream body
//!        └─ cache/     RFC 9111 policy, coalescing, storage over evict/{arena,lru,fifo,lfu,tinylfu}
//! http/     header rules, gRPC conventions, local replies, replayable bodies, h2 plumbing
//!
//! control/  client (controller stream) → state (the single mutator: builds a route::table::Table
//!           and swaps it into route::Routing) ← checks (active health)
//! admin, metrics, health
//! ```
//!
//! Layering (imports only point down; nothing imports from a layer above it):
//!
//! 1. `main.rs` (the binary)
//! 2. [`control`], [`admin`], [`listen`]
//! 3. `route`
//! 4. `upstream`, [`cache`], `health`
//! 5. `metrics`, `balance`
//! 6. `http` (leaves)
//!
//! [`control::client`] follows the controllers and hands each update to
//! [`control::state::Shared::apply`], which builds a routing table and swaps it in
//! atomically; [`listen`] workers read it lock-free and forward each request to an endpoint
//! chosen by `balance` over `upstream` connection pools; [`admin`] and `metrics` show what
//! the agent is doing.

pub mod admin;
pub(crate) mod balance;
pub mod cache;
pub mod control;
pub(crate) mod health;
pub(crate) mod http;
pub mod listen;
pub(crate) mod metrics;
pub mod observe;
pub(crate) mod route;
pub(crate) mod upstream;
