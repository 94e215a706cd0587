//! What changes the agent's state: the controller client ([`client`]), the single mutator that
//! builds and swaps routing tables and persists them ([`state`]), and the active health checks
//! whose transitions trigger a rebuild ([`checks`]); [`report`] turns the endpoint counters
//! into the client's load reports.

pub mod checks;
pub mod client;
pub(crate) mod report;
pub mod state;
