//! netfault-agent: the node agent's library (used by `netfaultd`).
//!
//! - `netns`: the only place that enters a pod's network namespace;
//! - `registry`: sandboxes, faults, persisted state and reconciliation;
//! - `server`: the HTTP/JSON API on the unix socket;
//! - `metrics`: Prometheus text.

pub mod metrics;
pub mod netns;
pub mod registry;
pub mod server;
