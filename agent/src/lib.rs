//! netfault-agent: the node agent's library (used by `netfaultd`).
//!
//! - `delay`: the netem-free delay backend (nft diversion to NFQUEUE, engine thread);
//! - `netns`: the only place that enters a pod's network namespace;
//! - `registry`: sandboxes, faults, persisted state and reconciliation;
//! - `server`: the HTTP/JSON API on the unix socket;
//! - `metrics`: Prometheus text.

pub mod delay;
pub mod l7;
pub mod metrics;
pub mod netns;
pub mod nftjson;
pub mod proxy;
pub mod registry;
pub mod server;
