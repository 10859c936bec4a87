//! The agent's socket API refuses bad input with an error naming the field,
//! and an invalid request changes nothing: not the fault list, not the
//! pod's netns, not its traffic.

use std::time::Duration;

use serde_json::{json, Value};
use testbed::udp_probe;

use crate::support::{v4, Cluster, Pristine};

#[test]
fn invalid_fault_bodies_name_the_field_and_change_nothing() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let sb = a.container_id.clone();
    let ok_action = json!({"type": "loss", "percent": 10});
    let with = |patch: Value| {
        let mut v = json!({"target": {"sandbox": sb}, "action": ok_action, "duration": "30s"});
        if let (Some(o), Some(p)) = (v.as_object_mut(), patch.as_object()) {
            for (k, val) in p {
                if val.is_null() {
                    o.remove(k);
                } else {
                    o.insert(k.clone(), val.clone());
                }
            }
        }
        v.to_string()
    };
    let cases: Vec<(String, &str, u16)> = vec![
        (
            with(json!({"action": {"type": "loss", "percent": 150}})),
            "action.percent",
            400,
        ),
        (
            with(json!({"action": {"type": "loss", "percent": -1}})),
            "action.percent",
            400,
        ),
        (
            with(json!({"action": {"type": "loss", "percent": "lots"}})),
            "action.percent",
            400,
        ),
        (
            with(json!({"action": {"type": "loss"}})),
            "action.percent",
            400,
        ),
        (
            with(json!({"action": {"type": "loss", "percent": 5, "correlation": 101}})),
            "action.correlation",
            400,
        ),
        (
            with(json!({"action": {"type": "teleport"}})),
            "action.type",
            400,
        ),
        (
            with(json!({"action": {"type": "http-abort"}, "match": {"ports": "8080"}})),
            "action.status",
            400,
        ),
        (
            with(json!({"action": {"type": "http-abort", "status": 503}})),
            "match.ports",
            400,
        ),
        (
            with(
                json!({"action": {"type": "tcp-reset", "after": "1s"}, "match": {"ports": "8080", "protocol": "udp"}}),
            ),
            "match.protocol",
            400,
        ),
        (
            with(json!({"action": {"type": "tcp-reset"}, "match": {"ports": "8080"}})),
            "action.after",
            400,
        ),
        (with(json!({"action": {"percent": 5}})), "action.type", 400),
        (with(json!({"action": null})), "action", 400),
        (
            with(json!({"match": {"cidr": "198.18.0.0/33"}})),
            "match.cidr",
            400,
        ),
        (
            with(json!({"match": {"cidr": "not-an-ip"}})),
            "match.cidr",
            400,
        ),
        (
            with(json!({"match": {"ports": "70000"}})),
            "match.ports",
            400,
        ),
        (
            with(json!({"match": {"protocol": "sctp"}})),
            "match.protocol",
            400,
        ),
        (
            with(json!({"match": {"protocol": "icmp", "ports": "80"}})),
            "match.ports",
            400,
        ),
        (
            with(json!({"match": {"colour": "red"}})),
            "match.colour",
            400,
        ),
        (with(json!({"duration": "soon"})), "duration", 400),
        (with(json!({"duration": "0s"})), "duration", 400),
        // Over --max-duration (24h): refused by policy (403 policy_denied).
        (with(json!({"duration": "400d"})), "duration", 403),
        (with(json!({"duration": 30})), "duration", 400),
        (with(json!({"duration": null})), "duration", 400),
        (with(json!({"direction": "sideways"})), "direction", 400),
        (
            with(json!({"target": {"sandbox": "no-such-sandbox"}})),
            "target.sandbox",
            404,
        ),
        (
            with(json!({"target": {"pod": {"namespace": "default", "name": "ghost"}}})),
            "target.pod",
            404,
        ),
        (
            with(json!({"target": {"netns": "relative/path"}})),
            "target.netns",
            400,
        ),
        (
            with(json!({"target": {"netns": "/var/run/netns/does-not-exist-nf"}})),
            "target.netns",
            400,
        ),
        (
            with(json!({"target": {"sandbox": "x", "pod": {"name": "y"}}})),
            "target",
            400,
        ),
        (with(json!({"target": null})), "target", 400),
        (with(json!({"extra": true})), "extra", 400),
        ("[1,2,3]".to_string(), "body", 400),
        ("{not json".to_string(), "body", 400),
    ];
    assert!(cases.len() >= 15);

    let client = c.agent.client();
    let faults_before = client.call("GET", "/v1/faults", None).expect("list");
    let netns_before = Pristine::of(&a);
    for (body, field, status) in &cases {
        let r = client
            .raw("POST", "/v1/faults", Some(body.as_bytes()))
            .expect("agent answers");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!(r.status, *status, "body {body}: answer {v}");
        let got = v["error"]["field"].as_str().unwrap_or_default();
        assert_eq!(got, *field, "body {body}: answer {v}");
        assert!(
            !v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "body {body}: no message"
        );
    }
    assert_eq!(
        client.call("GET", "/v1/faults", None).expect("list"),
        faults_before,
        "a rejected request created a fault"
    );
    netns_before.assert_unchanged("a rejected request touched the netns");
    let p = udp_probe(&a, &b, v4(&b), 7201, 300, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, p.sent, "traffic untouched by rejected requests");

    // Bad enrolments are refused with the field too.
    for (body, field) in [
        (json!({"ifname": "eth0"}), "netns"),
        (json!({"netns": "relative", "ifname": "eth0"}), "netns"),
        (
            json!({"netns": a.netns.path(), "ifname": "nope0"}),
            "ifname",
        ),
        (
            json!({"netns": a.netns.path(), "ifname": "eth0", "ips": ["300.1.1.1"]}),
            "ips[0]",
        ),
    ] {
        let r = client
            .raw(
                "PUT",
                "/v1/sandboxes/bad-enrol",
                Some(body.to_string().as_bytes()),
            )
            .expect("agent answers");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert_eq!(
            (r.status, v["error"]["field"].as_str().unwrap_or_default()),
            (400, field),
            "{body}: {v}"
        );
    }
    let list = client.call("GET", "/v1/sandboxes", None).expect("list");
    assert!(
        !list.to_string().contains("bad-enrol"),
        "a refused enrolment was recorded"
    );
}

/// `{"pod": ...}` and `{"netns": ...}` targets resolve to the right sandbox,
/// and `/metrics` reports what the datapath counted.
#[test]
fn pod_and_netns_targets_and_metrics() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["alpha", "beta"]);
    let by_pod = c.fault(json!({
        "target": {"pod": {"namespace": "default", "name": "alpha"}},
        "direction": "egress", "match": {"protocol": "udp", "ports": "7301"},
        "action": {"type": "blackhole"}, "duration": "30s"}));
    assert_eq!(c.get_fault(&by_pod)["sandbox"], a.container_id.as_str());
    let by_netns = c.fault(json!({
        "target": {"netns": b.netns.path()},
        "direction": "egress", "match": {"protocol": "udp", "ports": "7302"},
        "action": {"type": "blackhole"}, "duration": "30s"}));
    assert_eq!(c.get_fault(&by_netns)["sandbox"], b.container_id.as_str());

    let p = udp_probe(&a, &b, v4(&b), 7301, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(p.received, 0);
    let q = udp_probe(&b, &a, v4(&a), 7302, 200, Duration::from_micros(200)).expect("probe");
    assert_eq!(q.received, 0);

    let metrics = c
        .agent
        .client()
        .raw("GET", "/metrics", None)
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    let line = text
        .lines()
        .find(|l| l.starts_with("netfault_fault_packets_dropped_total") && l.contains(&by_pod))
        .unwrap_or_else(|| panic!("no dropped counter for {by_pod} in:\n{text}"));
    let n: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert_eq!(n, 200, "metrics count what the wire lost: {line}");
    assert!(text.contains("netfault_faults_active 2"), "{text}");
}
