//! netfault-agent: the node agent's library (used by `netfaultd`).
//!
//! - `backend`: one module per backend (`nfqueue`, `proxy`);
//! - `ids`: the sandbox and fault ids they share;
//! - `registry`: sandboxes, faults, persisted state and reconciliation;
//! - `server`: the HTTP/JSON API on the unix socket;
//! - `metrics`: Prometheus text.

pub mod backend;
pub mod ids;
pub mod metrics;
pub mod registry;
pub mod server;
