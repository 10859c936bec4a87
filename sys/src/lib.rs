//! netfault-sys: the system layer. It owns what netfault asks of the
//! kernel outside the eBPF datapath:
//!
//! - `netns`: the [`netns::Netns`] handle, the only place that enters a
//!   network namespace;
//! - `nfnetlink`: the netfilter netlink codec and batch socket
//!   (`nfnetlink_queue`, `nf_tables` set elements);
//! - `nftjson`: nft rules as JSON, applied through `nft`;
//! - `sockopt`: socket options the socket crates lack.
//!
//! What it must not do: know about faults, sandboxes or the agent's API
//! (it depends on none of netfault's crates), or enter a namespace except
//! through `netns`.

pub mod netns;
pub mod nfnetlink;
pub mod nftjson;
pub mod sockopt;
