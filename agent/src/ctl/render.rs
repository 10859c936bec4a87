//! netfaultctl's table output: pure functions from the agent's JSON to text,
//! so they can be tested without an agent.

use std::time::{Duration, UNIX_EPOCH};

use netfault_api::{Fault, Sandbox};
use serde_json::Value;

/// Width of shortened ids in tables, as container runtimes print them.
pub const SHORT_ID: usize = 12;

/// Left-aligned columns separated by two spaces; no trailing whitespace.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(cur) => *cur = (*cur).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows.iter()) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The first [`SHORT_ID`] characters of an id.
pub fn short_id(id: &str) -> String {
    id.chars().take(SHORT_ID).collect()
}

fn or_dash(s: String) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// A JSON number as a short decimal: `30`, `12.5`.
fn num(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => f.to_string(),
            _ => n.to_string(),
        }),
        Value::String(s) => Some(s.trim().trim_end_matches('%').to_string()),
        _ => None,
    }
}

/// `loss 30%`, `loss 30% corr 25%`, `blackhole`; other types by name.
pub fn action_summary(spec: &Value) -> String {
    let a = &spec["action"];
    let ty = a["type"].as_str().unwrap_or("?");
    match ty {
        "loss" => {
            let mut s = format!("loss {}%", num(&a["percent"]).unwrap_or_else(|| "?".into()));
            if let Some(c) = num(&a["correlation"]).filter(|c| c != "0") {
                s.push_str(&format!(" corr {c}%"));
            }
            s
        }
        other => other.to_string(),
    }
}

/// `198.18.0.0/24 tcp ports=80,8000-8100`, or `all` when nothing is matched on.
pub fn match_summary(spec: &Value) -> String {
    let m = &spec["match"];
    let mut parts = Vec::new();
    if let Some(c) = m["cidr"].as_str() {
        parts.push(c.to_string());
    }
    if let Some(p) = m["protocol"].as_str().filter(|p| *p != "any") {
        parts.push(p.to_string());
    }
    match &m["ports"] {
        Value::String(p) if !p.is_empty() => parts.push(format!("ports={p}")),
        Value::Number(n) => parts.push(format!("ports={n}")),
        Value::Array(a) if !a.is_empty() => {
            let ps: Vec<String> = a
                .iter()
                .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                .collect();
            parts.push(format!("ports={}", ps.join(",")));
        }
        _ => {}
    }
    if parts.is_empty() {
        "all".into()
    } else {
        parts.join(" ")
    }
}

/// Time left before `expires_at_ms`, whole seconds (`4m 59s`), or `-` once
/// expired or when the agent says the fault is no longer active.
pub fn remaining(fault: &Fault, now_ms: u64) -> String {
    if fault.state != "active" || fault.expires_at_ms <= now_ms {
        return "-".into();
    }
    let left = fault.expires_at_ms - now_ms;
    if left < 1000 {
        return humantime::format_duration(Duration::from_millis(left)).to_string();
    }
    humantime::format_duration(Duration::from_secs(left / 1000)).to_string()
}

/// Unix milliseconds as RFC 3339 UTC, seconds precision.
pub fn timestamp(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn target_summary(spec: &Value) -> String {
    let t = &spec["target"];
    if let Some(s) = t["sandbox"].as_str() {
        return format!("sandbox {s}");
    }
    if let Some(n) = t["netns"].as_str() {
        return format!("netns {n}");
    }
    if t["pod"].is_object() {
        let ns = t["pod"]["namespace"].as_str().unwrap_or("default");
        let name = t["pod"]["name"].as_str().unwrap_or("?");
        return format!("pod {ns}/{name}");
    }
    "-".into()
}

/// `netfaultctl list`.
/// Columns of the `list` table.
const FAULT_COLUMNS: [&str; 9] = [
    "ID",
    "SANDBOX",
    "ACTION",
    "DIRECTION",
    "MATCH",
    "STATE",
    "REMAINING",
    "MATCHED",
    "DROPPED",
];

pub fn faults_table(faults: &[Fault], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = faults.iter().map(|f| fault_row(f, now_ms)).collect();
    table(&FAULT_COLUMNS, &rows)
}

fn fault_row(f: &Fault, now_ms: u64) -> Vec<String> {
    vec![
        f.id.clone(),
        or_dash(short_id(&f.sandbox)),
        action_summary(&f.spec),
        f.spec["direction"].as_str().unwrap_or("both").to_string(),
        match_summary(&f.spec),
        or_dash(f.state.clone()),
        remaining(f, now_ms),
        f.counters.matched.to_string(),
        f.counters.dropped.to_string(),
    ]
}

/// `netfaultctl watch`: the `list` table with each fault's counters per
/// second since the previous frame (`prev`: id to counters, `secs` apart;
/// `-` for a fault the previous frame did not have).
pub fn watch_table(
    faults: &[Fault],
    prev: &std::collections::HashMap<String, netfault_api::Counters>,
    secs: f64,
    now_ms: u64,
) -> String {
    let rate = |now: u64, before: Option<u64>| match before {
        Some(b) if secs > 0.0 => format!("{:.0}", now.saturating_sub(b) as f64 / secs),
        _ => "-".into(),
    };
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|f| {
            let p = prev.get(&f.id);
            let mut row = fault_row(f, now_ms);
            row.push(f.counters.affected.to_string());
            row.push(rate(f.counters.matched, p.map(|c| c.matched)));
            row.push(rate(f.counters.dropped, p.map(|c| c.dropped)));
            row.push(rate(f.counters.affected, p.map(|c| c.affected)));
            row
        })
        .collect();
    let mut headers = FAULT_COLUMNS.to_vec();
    headers.extend(["AFFECTED", "MATCHED/S", "DROPPED/S", "AFFECTED/S"]);
    table(&headers, &rows)
}

/// `netfaultctl --kube list` over every node: the `list` table with a NODE
/// column first.
pub fn node_faults_table(faults: &[(String, Fault)], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = faults
        .iter()
        .map(|(node, f)| {
            let mut row = vec![node.clone()];
            row.extend(fault_row(f, now_ms));
            row
        })
        .collect();
    let mut headers = vec!["NODE"];
    headers.extend(FAULT_COLUMNS);
    table(&headers, &rows)
}

/// `netfaultctl get`: one fault as `key: value` lines.
pub fn fault_detail(f: &Fault, now_ms: u64) -> String {
    let pairs: Vec<(&str, String)> = vec![
        ("id", f.id.clone()),
        ("sandbox", or_dash(f.sandbox.clone())),
        ("target", target_summary(&f.spec)),
        ("action", action_summary(&f.spec)),
        (
            "direction",
            f.spec["direction"].as_str().unwrap_or("both").to_string(),
        ),
        ("match", match_summary(&f.spec)),
        (
            "duration",
            or_dash(f.spec["duration"].as_str().unwrap_or_default().to_string()),
        ),
        ("state", or_dash(f.state.clone())),
        ("created", timestamp(f.created_at_ms)),
        ("expires", timestamp(f.expires_at_ms)),
        ("remaining", remaining(f, now_ms)),
        ("backend", or_dash(f.backend.clone())),
        ("matched", f.counters.matched.to_string()),
        ("dropped", f.counters.dropped.to_string()),
    ];
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{:<width$} {v}\n", format!("{k}:")));
    }
    out
}

/// How many faults the agent reports on a sandbox, if it reports that at all
/// (`faults` as a list or a number).
fn fault_count(v: &Value) -> Option<usize> {
    match &v["faults"] {
        Value::Array(a) => Some(a.len()),
        Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        _ => None,
    }
}

/// `netfaultctl sandboxes`, from the agent's JSON array. The FAULTS column
/// appears when the agent reports fault counts.
pub fn sandboxes_table(items: &[Value]) -> Result<String, serde_json::Error> {
    let mut rows = Vec::with_capacity(items.len());
    let with_faults = items.iter().any(|v| fault_count(v).is_some());
    for v in items {
        let s: Sandbox = serde_json::from_value(v.clone())?;
        let pod = s
            .pod
            .as_ref()
            .filter(|p| !p.name.is_empty())
            .map(|p| {
                let ns = if p.namespace.is_empty() {
                    "default"
                } else {
                    &p.namespace
                };
                format!("{ns}/{}", p.name)
            })
            .unwrap_or_else(|| "-".into());
        let mut row = vec![
            or_dash(short_id(&s.id)),
            pod,
            s.source.as_str().to_string(),
            or_dash(s.netns.clone()),
            or_dash(s.ips.join(",")),
        ];
        if with_faults {
            row.push(fault_count(v).map_or_else(|| "-".into(), |n| n.to_string()));
        }
        rows.push(row);
    }
    let mut headers = vec!["ID", "NAMESPACE/NAME", "SOURCE", "NETNS", "IPS"];
    if with_faults {
        headers.push("FAULTS");
    }
    Ok(table(&headers, &rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use netfault_api::Counters;
    use serde_json::json;

    fn fault(spec: Value, state: &str, expires_at_ms: u64) -> Fault {
        Fault {
            id: "f-0001".into(),
            sandbox: "0123456789abcdef0123".into(),
            state: state.into(),
            spec,
            created_at_ms: 1_700_000_000_000,
            expires_at_ms,
            backend: "ebpf-tc".into(),
            counters: Counters {
                matched: 120,
                dropped: 37,
                affected: 0,
            },
            source: Default::default(),
        }
    }

    fn loss_spec() -> Value {
        json!({
            "target": {"sandbox": "0123456789abcdef0123"},
            "direction": "egress",
            "match": {"cidr": "198.18.0.0/24", "protocol": "tcp", "ports": "80,8000-8100"},
            "action": {"type": "loss", "percent": 30.0, "correlation": 0.0},
            "duration": "5m"
        })
    }

    #[test]
    fn table_aligns_columns_without_trailing_space() {
        let t = table(
            &["A", "LONG HEADER", "C"],
            &[
                vec!["xxxx".into(), "y".into(), "".into()],
                vec!["z".into(), "w".into(), "v".into()],
            ],
        );
        assert_eq!(t, "A     LONG HEADER  C\nxxxx  y\nz     w            v\n");
        assert_eq!(table(&["ONLY"], &[]), "ONLY\n");
    }

    #[test]
    fn actions_and_matches_are_compact() {
        assert_eq!(action_summary(&loss_spec()), "loss 30%");
        assert_eq!(
            action_summary(
                &json!({"action": {"type": "loss", "percent": 12.5, "correlation": 25}})
            ),
            "loss 12.5% corr 25%"
        );
        assert_eq!(
            action_summary(&json!({"action": {"type": "blackhole"}})),
            "blackhole"
        );
        assert_eq!(
            match_summary(&loss_spec()),
            "198.18.0.0/24 tcp ports=80,8000-8100"
        );
        assert_eq!(match_summary(&json!({"match": {}})), "all");
        assert_eq!(match_summary(&json!({})), "all");
        assert_eq!(
            match_summary(&json!({"match": {"protocol": "any", "ports": "53"}})),
            "ports=53"
        );
    }

    #[test]
    fn remaining_counts_down_then_dashes() {
        let now = 1_700_000_000_000;
        let f = fault(loss_spec(), "active", now + 299_400);
        assert_eq!(remaining(&f, now), "4m 59s");
        assert_eq!(remaining(&f, now + 299_000), "400ms");
        assert_eq!(remaining(&f, now + 299_400), "-");
        assert_eq!(remaining(&f, now + 400_000), "-");
        let expired = fault(loss_spec(), "expired", now + 10_000);
        assert_eq!(remaining(&expired, now), "-");
    }

    #[test]
    fn faults_table_has_every_column() {
        let now = 1_700_000_000_000;
        let faults = vec![
            fault(loss_spec(), "active", now + 60_000),
            Fault {
                id: "f-0002".into(),
                ..fault(
                    json!({"direction": "both", "match": {}, "action": {"type": "blackhole"}, "duration": "1m"}),
                    "expired",
                    now - 1,
                )
            },
        ];
        let t = faults_table(&faults, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let cols: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(cols, FAULT_COLUMNS);
        assert!(
            lines[1].starts_with("f-0001  0123456789ab  loss 30%"),
            "{t}"
        );
        assert!(lines[1].contains("egress"), "{t}");
        assert!(
            lines[1].contains("198.18.0.0/24 tcp ports=80,8000-8100"),
            "{t}"
        );
        assert!(lines[1].contains("active"), "{t}");
        assert!(lines[1].contains("1m"), "{t}");
        assert!(lines[1].ends_with("120      37"), "{t}");
        assert!(lines[2].contains("blackhole"), "{t}");
        assert!(lines[2].contains("expired"), "{t}");
        // Every data row starts its columns where the header does.
        let at = lines[0].find("STATE").expect("STATE column");
        assert_eq!(&lines[1][at..at + 6], "active");
        assert_eq!(&lines[2][at..at + 7], "expired");
    }

    #[test]
    fn fault_detail_is_key_value() {
        let now = 1_700_000_000_000;
        let d = fault_detail(&fault(loss_spec(), "active", now + 90_000), now);
        assert!(d.contains("id:        f-0001\n"), "{d}");
        assert!(
            d.contains("sandbox:   0123456789abcdef0123\n"),
            "full id in detail: {d}"
        );
        assert!(
            d.contains("target:    sandbox 0123456789abcdef0123\n"),
            "{d}"
        );
        assert!(d.contains("action:    loss 30%\n"), "{d}");
        assert!(d.contains("remaining: 1m 30s\n"), "{d}");
        assert!(d.contains("created:   2023-11-14T22:13:20Z\n"), "{d}");
        assert!(d.contains("dropped:   37\n"), "{d}");
    }

    #[test]
    fn sandboxes_table_shortens_ids_and_shows_pods() {
        let items = vec![
            json!({"id": "abcdef0123456789abcdef", "netns": "/var/run/netns/pod-a", "ifname": "eth0",
                   "ips": ["10.22.0.5/16", "fd00::5/64"], "pod": {"namespace": "shop", "name": "web", "uid": "u"},
                   "enrolled_at_ms": 1}),
            json!({"id": "short", "netns": "/proc/1/ns/net", "ifname": "eth0", "ips": [], "enrolled_at_ms": 2,
                   "source": "cri"}),
        ];
        let t = sandboxes_table(&items).expect("valid sandboxes");
        assert_eq!(
            t,
            "ID            NAMESPACE/NAME  SOURCE  NETNS                 IPS\n\
             abcdef012345  shop/web        cni     /var/run/netns/pod-a  10.22.0.5/16,fd00::5/64\n\
             short         -               cri     /proc/1/ns/net        -\n"
        );
    }

    #[test]
    fn sandboxes_table_shows_fault_counts_when_reported() {
        let items = vec![
            json!({"id": "a", "netns": "/n/a", "ifname": "eth0", "ips": ["10.0.0.1/24"], "enrolled_at_ms": 1,
                   "faults": ["f-1", "f-2"]}),
            json!({"id": "b", "netns": "/n/b", "ifname": "eth0", "ips": [], "enrolled_at_ms": 1}),
        ];
        let t = sandboxes_table(&items).expect("valid");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("FAULTS"), "{t}");
        assert!(lines[1].ends_with(" 2"), "{t}");
        assert!(lines[2].ends_with(" -"), "{t}");
        assert!(sandboxes_table(&[json!({"id": 5})]).is_err());
    }
}
