//! The backends: each one turns a sandbox's active faults of its kind into
//! kernel state (and, for the proxy, a served listener).
//!
//! - `nfqueue`: delay and reorder, nft diversion to NFQUEUE and a holder
//!   process per sandbox;
//! - `proxy`: HTTP and TCP faults, nft TPROXY diversion to the agent's
//!   transparent proxy.

pub mod nfqueue;
pub mod proxy;
