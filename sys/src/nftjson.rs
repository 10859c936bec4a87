//! Pieces of nft's JSON shared by the agent's diversions (the nfqueue
//! backend's delay diversion and the proxy backend's), and applying a
//! payload through the `nft` binary (of the calling thread's netns).
//! What it must not do: know about faults or their selectors (ports come
//! as plain ranges), or enter a netns.

use serde_json::{json, Value};

/// `left == right`.
pub fn m(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

/// The match of the remote end's address on a prefix: `ip saddr 198.18.0.0/15`,
/// `ip6 daddr fd00::/8`, ... (`remote_is_src`: the peer is the source).
pub fn prefix_match(net: ipnet::IpNet, remote_is_src: bool) -> Value {
    let (proto, addr) = match net {
        ipnet::IpNet::V4(n) => ("ip", n.network().to_string()),
        ipnet::IpNet::V6(n) => ("ip6", n.network().to_string()),
    };
    let field = if remote_is_src { "saddr" } else { "daddr" };
    m(
        json!({"payload": {"protocol": proto, "field": field}}),
        json!({"prefix": {"addr": addr, "len": net.prefix_len()}}),
    )
}

/// An anonymous set of ports and port ranges, each given as `(lo, hi)`
/// (a single port when `lo == hi`).
pub fn port_set(ports: impl IntoIterator<Item = (u16, u16)>) -> Value {
    let elems: Vec<Value> = ports
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                json!(lo)
            } else {
                json!({"range": [lo, hi]})
            }
        })
        .collect();
    json!({"set": elems})
}

/// Applies `payload` (`{"nftables": [...]}`) as one transaction.
pub fn apply(payload: &Value) -> Result<(), String> {
    nftables::helper::apply_ruleset_raw(
        &payload.to_string(),
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}
