//! netfault-sys: the system layer. It owns netfault's calls into the
//! kernel's networking, except loading eBPF programs and driving their maps
//! (aya, in netfault-ebpf):
//!
//! - `netns`: the [`netns::Netns`] handle, the only place that enters a
//!   network namespace;
//! - `nfnetlink`: the netfilter netlink codec and batch socket
//!   (`nfnetlink_queue`, `nf_tables` set elements);
//! - `nft`: nft rules as the `nftables` crate's typed values, applied as
//!   one transaction;
//! - `libnft`: nft commands in process through libnftables (loaded at run
//!   time), or through the `nft` binary where it cannot be loaded;
//! - `rtnetlink`: route netlink (an interface's addresses, routes and
//!   rules, local delivery for transparent proxying, tc qdiscs and
//!   filters);
//! - `sockopt`: socket options the socket crates lack.
//!
//! What it must not do: know about faults, sandboxes or the agent's API
//! (it depends on none of netfault's crates), or enter a namespace except
//! through `netns`.

pub mod libnft;
pub mod netns;
pub mod nfnetlink;
pub mod nft;
pub mod rtnetlink;
pub mod sockopt;
