//! netfault-agent: the node agent's library (used by `netfaultd`).
//!
//! - `backend`: one module per backend (`nfqueue`, `proxy`);
//! - `cri`: adoption of the container runtime's pod sandboxes (`--cri-socket`);
//! - `kube`: the Kubernetes pod watch (annotations on running pods);
//! - `ids`: the sandbox and fault ids they share;
//! - `registry`: sandboxes, faults, persisted state and reconciliation;
//! - `server`: the HTTP/JSON API on the unix socket;
//! - `metrics`: Prometheus text;
//! - `policy`: what the agent refuses (caps, denied namespaces, the host netns).

pub mod backend;
pub mod crash;
pub mod cri;
pub mod ids;
pub mod kube;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod server;
pub mod succession;
