//! Reading the sandbox's addresses out of `prevResult`.

use std::net::IpAddr;

use serde_json::Value;

/// The pod's IP addresses from a 0.3.x/0.4.0/1.x result (`ips[].address`, CIDR
/// form, address part only). An address whose `interface` index points at a
/// host-side interface (empty `sandbox`) or at no interface is skipped;
/// addresses without an index are kept. The pre-0.3 `ip4`/`ip6` form is read
/// too. Unparseable entries are returned as warnings.
pub fn sandbox_ips(prev: &Value) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = Vec::new();
    let mut warnings = Vec::new();
    let interfaces = prev.get("interfaces").and_then(Value::as_array);
    if let Some(list) = prev.get("ips").and_then(Value::as_array) {
        for (i, entry) in list.iter().enumerate() {
            if let Some(idx) = entry.get("interface") {
                let in_sandbox = idx
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .and_then(|n| interfaces.and_then(|l| l.get(n)))
                    .and_then(|iface| iface.get("sandbox"))
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty());
                if !in_sandbox {
                    continue;
                }
            }
            match entry
                .get("address")
                .and_then(Value::as_str)
                .map(parse_cidr_addr)
            {
                Some(Some(ip)) => ips.push(ip),
                _ => warnings.push(format!(
                    "prevResult.ips[{i}].address: not an address in CIDR form: {}",
                    entry.get("address").unwrap_or(&Value::Null)
                )),
            }
        }
    } else {
        for key in ["ip4", "ip6"] {
            if let Some(a) = prev
                .get(key)
                .and_then(|v| v.get("ip"))
                .and_then(Value::as_str)
            {
                match parse_cidr_addr(a) {
                    Some(ip) => ips.push(ip),
                    None => warnings.push(format!("prevResult.{key}.ip: not an address: {a:?}")),
                }
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    ips.retain(|ip| seen.insert(*ip));
    (ips, warnings)
}

/// `198.18.0.5/24` → `198.18.0.5`. A bare address is accepted too.
pub fn parse_cidr_addr(s: &str) -> Option<IpAddr> {
    let addr = s.split_once('/').map_or(s, |(a, _)| a);
    addr.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strs(v: &[IpAddr]) -> Vec<String> {
        v.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn bridge_result_keeps_only_sandbox_addresses() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa"},
                {"name": "veth1", "mac": "bb"},
                {"name": "eth0", "mac": "cc", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"interface": 2, "address": "198.18.0.5/24", "gateway": "198.18.0.1"},
                {"interface": 2, "address": "fd00:1::5/64"},
                {"interface": 0, "address": "198.18.0.1/24"},
                {"interface": 9, "address": "198.18.0.9/24"}
            ]
        });
        let (ips, w) = sandbox_ips(&prev);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(strs(&ips), vec!["198.18.0.5", "fd00:1::5"]);
    }

    #[test]
    fn no_interface_indices_keeps_all() {
        let prev = json!({"cniVersion":"0.3.1","ips":[
            {"version":"4","address":"198.18.0.7/24"},
            {"version":"6","address":"fd00::7/64"},
            {"version":"4","address":"nonsense"}
        ]});
        let (ips, w) = sandbox_ips(&prev);
        assert_eq!(strs(&ips), vec!["198.18.0.7", "fd00::7"]);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("ips[2]"), "{w:?}");
    }

    #[test]
    fn legacy_and_empty() {
        let prev = json!({"ip4": {"ip": "198.18.0.3/24"}, "ip6": {"ip": "fd00::3/64"}});
        assert_eq!(strs(&sandbox_ips(&prev).0), vec!["198.18.0.3", "fd00::3"]);
        assert!(sandbox_ips(&json!({})).0.is_empty());
        assert!(sandbox_ips(&json!({"ips": []})).0.is_empty());
        assert_eq!(parse_cidr_addr("198.18.1.1"), "198.18.1.1".parse().ok());
    }
}
