//! The agent's policy, rule by rule, on a real agent: every refusal is a 403
//! `policy_denied` naming the rule and the field, and changes nothing: the
//! fault list stays as it was and UDP probes through the pod the refused
//! fault would have hit all arrive.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{udp_probe, Agent, Pod, TempDir};

use crate::support::{
    assert_whole, blackhole, fault_on, loss, passes, proto_port, v4, wait_for, Cluster, KubeNode,
};

const GAP: Duration = Duration::from_micros(200);

/// `method path` with a JSON body: the status and the JSON answer.
fn call(agent: &Agent, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let bytes = body.to_string().into_bytes();
    let r = agent
        .client()
        .raw(method, path, Some(&bytes))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// The answer is a refusal by `rule` on `field`.
fn assert_denied(answer: &(u16, Value), field: &str, rule: &str) {
    let (status, v) = answer;
    assert_eq!(*status, 403, "{v}");
    assert_eq!(v["error"]["code"], "policy_denied", "{v}");
    assert_eq!(v["error"]["field"], field, "{v}");
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(rule), "the message names {rule}: {v}");
}

fn fault_list(agent: &Agent) -> Value {
    agent
        .client()
        .call("GET", "/v1/faults", None)
        .expect("GET /v1/faults")
}

#[test]
fn caps_refuse_by_name_and_change_nothing_on_the_wire() {
    testbed::require_root!();
    let c = Cluster::with_agent_args(&[
        "--max-duration",
        "10m",
        "--max-loss-percent",
        "50",
        "--max-faults-per-pod",
        "2",
    ]);
    let [a, b] = c.pods(["a", "b"]);
    assert_whole(&a, &b, 7101, "baseline");
    let caps = c.capabilities();
    assert_eq!(caps["policy"]["max_faults_per_pod"], 2, "{caps}");
    assert_eq!(caps["policy"]["max_loss_percent"], 50.0, "{caps}");
    assert_eq!(caps["policy"]["max_duration_ms"], 600_000, "{caps}");

    let udp = || proto_port("udp", 7101);
    let refused = [
        (
            fault_on(&a, "egress", udp(), loss(100), "11m"),
            "duration",
            "--max-duration 10m",
        ),
        (
            fault_on(&a, "egress", udp(), loss(80), "5m"),
            "action.percent",
            "--max-loss-percent 50",
        ),
        (
            fault_on(&a, "egress", udp(), blackhole(), "5m"),
            "action.type",
            "--max-loss-percent 50",
        ),
    ];
    for (body, field, rule) in &refused {
        let before = fault_list(&c.agent);
        assert_denied(&call(&c.agent, "POST", "/v1/faults", body), field, rule);
        assert_eq!(fault_list(&c.agent), before, "{rule}: the fault list");
        assert_whole(&a, &b, 7101, rule);
    }

    // Two faults that leave the probe's port alone fill the pod's quota;
    // a third, which would drop all of the probe, is refused.
    for port in [9, 10] {
        c.fault_on(&a, "egress", proto_port("udp", port), loss(50), "5m");
    }
    let before = fault_list(&c.agent);
    let third = fault_on(&a, "egress", udp(), loss(50), "5m");
    assert_denied(
        &call(&c.agent, "POST", "/v1/faults", &third),
        "target",
        "--max-faults-per-pod 2",
    );
    assert_eq!(fault_list(&c.agent), before);
    assert_whole(&a, &b, 7101, "--max-faults-per-pod");

    // Within the caps a fault still acts: 50 % for 10m, once a slot is free.
    let first = before[0]["id"].as_str().expect("fault id").to_string();
    c.delete_fault(&first);
    let id = c.fault_on(&a, "egress", udp(), loss(50), "10m");
    let p = udp_probe(&a, &b, v4(&b), 7101, 1000, GAP).expect("probe under loss");
    let lost = 1.0 - p.received as f64 / p.sent as f64;
    assert!(
        (0.35..=0.65).contains(&lost),
        "a fault within the caps acts: {lost}"
    );
    c.delete_fault(&id);
}

#[test]
fn a_denied_namespace_pod_starts_but_gets_no_faults() {
    testbed::require_root!();
    // The testbed's pods are in `default`: deny it.
    let c = Cluster::with_agent_args(&["--deny-namespace", "default"]);
    let caps = c.capabilities();
    assert_eq!(
        caps["policy"]["deny_namespaces"],
        json!(["default"]),
        "{caps}"
    );
    let b = c.pod("b");
    // A birth-time 100 % loss: CNI ADD succeeds, the pod is enrolled, the
    // fault is refused and the sandbox says why.
    let annotations: BTreeMap<String, String> =
        [("netfault.io/loss".to_string(), "100%".to_string())].into();
    let a = c
        .node
        .add_pod("a", &annotations)
        .expect("CNI ADD of a pod in a denied namespace succeeds");
    let sb = c
        .agent
        .sandboxes()
        .expect("sandboxes")
        .into_iter()
        .find(|s| s["id"] == a.container_id.as_str())
        .expect("the pod is enrolled");
    let why = sb["annotation_error"].as_str().unwrap_or_default();
    assert!(why.contains("--deny-namespace default"), "{sb}");
    assert_eq!(fault_list(&c.agent), json!([]));
    assert_whole(&a, &b, 7102, "birth-time fault in a denied namespace");

    let body = json!({"target": {"pod": {"namespace": "default", "name": "a"}},
                      "direction": "egress", "action": blackhole(), "duration": "5m"});
    assert_denied(
        &call(&c.agent, "POST", "/v1/faults", &body),
        "target.pod.namespace",
        "--deny-namespace default",
    );
    let body = fault_on(&a, "egress", json!({}), blackhole(), "5m");
    assert_denied(
        &call(&c.agent, "POST", "/v1/faults", &body),
        "target",
        "--deny-namespace default",
    );
    assert_eq!(fault_list(&c.agent), json!([]));
    assert_whole(&a, &b, 7102, "API faults in a denied namespace");
}

#[test]
fn kube_system_and_netfault_are_denied_by_default_and_the_list_can_be_cleared() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let caps = c.capabilities();
    assert_eq!(
        caps["policy"]["deny_namespaces"],
        json!(["kube-system", "netfault"]),
        "{caps}"
    );
    let [a, b] = c.pods(["a", "b"]);
    // Re-enrol pod a as a kube-system pod (as the CNI plugin would have).
    c.agent
        .client()
        .call("DELETE", &format!("/v1/sandboxes/{}", a.container_id), None)
        .expect("release");
    for (i, ns) in ["kube-system", "netfault"].into_iter().enumerate() {
        let id = format!("{}-{i}", a.container_id);
        let enrol = json!({"netns": a.netns.path(), "ifname": "eth0",
                           "ips": [format!("{}/24", v4(&a))],
                           "pod": {"namespace": ns, "name": "a", "uid": "u-a"}});
        let (status, v) = call(&c.agent, "PUT", &format!("/v1/sandboxes/{id}"), &enrol);
        assert_eq!(status, 200, "enrolment in {ns} succeeds: {v}");
        let body = json!({"target": {"pod": {"namespace": ns, "name": "a"}},
                          "direction": "egress", "action": blackhole(), "duration": "5m"});
        assert_denied(
            &call(&c.agent, "POST", "/v1/faults", &body),
            "target.pod.namespace",
            &format!("--deny-namespace {ns}"),
        );
        assert_eq!(fault_list(&c.agent), json!([]));
        assert_whole(&a, &b, 7103, ns);
        c.agent
            .client()
            .call("DELETE", &format!("/v1/sandboxes/{id}"), None)
            .expect("release");
    }
    drop((a, b));
    drop(c);

    // `--deny-namespace ""` clears the list: a kube-system pod gets its fault.
    let c = Cluster::with_agent_args(&["--deny-namespace", ""]);
    let caps = c.capabilities();
    assert_eq!(caps["policy"]["deny_namespaces"], json!([]), "{caps}");
    let [a, b] = c.pods(["a", "b"]);
    c.agent
        .client()
        .call("DELETE", &format!("/v1/sandboxes/{}", a.container_id), None)
        .expect("release");
    let enrol = json!({"netns": a.netns.path(), "ifname": "eth0",
                       "ips": [format!("{}/24", v4(&a))],
                       "pod": {"namespace": "kube-system", "name": "a", "uid": "u-a"}});
    let (status, v) = call(&c.agent, "PUT", "/v1/sandboxes/ks-a", &enrol);
    assert_eq!(status, 200, "{v}");
    let body = json!({"target": {"pod": {"namespace": "kube-system", "name": "a"}},
                      "direction": "egress", "match": proto_port("udp", 7103),
                      "action": blackhole(), "duration": "5m"});
    let (status, v) = call(&c.agent, "POST", "/v1/faults", &body);
    assert_eq!(status, 201, "{v}");
    let p = udp_probe(&a, &b, v4(&b), 7103, 300, GAP).expect("probe");
    assert_eq!(p.received, 0, "the fault acts once the list is cleared");
}

#[test]
fn the_host_netns_is_never_enrolled_nor_targeted() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    // The agent's own netns, the host's here as in the DaemonSet
    // (hostNetwork), with an interface that does not exist: without the
    // rule this would be a 400 on `ifname`, and nothing on the host is
    // touched either way. (Pid 1's netns is compared too, where the agent
    // can open it.)
    let dir = TempDir::new("netfault-policy-host").expect("temp dir");
    let agent = Agent::start(dir.path()).expect("netfaultd");
    let own = format!("/proc/{}/ns/net", agent.pid());
    let enrol = json!({"netns": own, "ifname": "nf-none0", "ips": ["198.18.255.1/32"]});
    assert_denied(
        &call(&agent, "PUT", "/v1/sandboxes/host", &enrol),
        "netns",
        "host network namespace",
    );
    assert_eq!(agent.sandboxes().expect("sandboxes"), Vec::<Value>::new());
    drop(agent);

    // A pod standing in for the host (`--host-netns` names its netns, as a
    // hostNetwork pod's sandbox would be the node's): enrolling it and
    // targeting it are refused, and a fault that would blackhole it is not
    // seen on the wire.
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let host = a.netns.path().to_string_lossy().into_owned();
    let dir = TempDir::new("netfault-policy-host2").expect("temp dir");
    let agent = Agent::start_with_args(dir.path(), &["--host-netns", &host]).expect("netfaultd");
    let enrol = json!({"netns": host, "ifname": "eth0", "ips": [format!("{}/24", v4(&a))],
                       "pod": {"namespace": "default", "name": "a", "uid": "u-a"}});
    assert_denied(
        &call(&agent, "PUT", "/v1/sandboxes/hostnet", &enrol),
        "netns",
        "host network namespace",
    );
    let body = json!({"target": {"netns": host}, "direction": "egress",
                      "action": blackhole(), "duration": "5m"});
    assert_denied(
        &call(&agent, "POST", "/v1/faults", &body),
        "target.netns",
        "host network namespace",
    );
    assert_eq!(fault_list(&agent), json!([]));
    assert_eq!(agent.sandboxes().expect("sandboxes"), Vec::<Value>::new());
    assert_whole(&a, &b, 7104, "the host netns");
}

/// The pod's `FaultFailed` Events whose note names `rule`, for `source`.
fn failed_events(k: &KubeNode, pod: &Pod, source: &str, rule: &str) -> usize {
    k.server
        .events()
        .iter()
        .filter(|ev| {
            let note = ev["note"].as_str().unwrap_or_default();
            ev["reason"] == "FaultFailed"
                && ev["regarding"]["uid"] == pod.uid.as_str()
                && note.contains(&format!("({source} source)"))
                && note.contains(rule)
        })
        .count()
}

#[test]
fn annotation_and_networkfault_faults_are_refused_by_the_same_rules() {
    testbed::require_root!();
    let k = KubeNode::start_with(&["--max-loss-percent", "50"]);
    let a = k.pod_labelled("a", &[("app", "web")]);
    let peer = k.pod("peer");
    let port = 7105;
    assert!(passes(&a, &peer, port), "baseline");
    let rule = "--max-loss-percent 50";

    // A running pod's annotation asks for a blackhole (100 % loss).
    let faults = json!([{"direction": "egress", "match": proto_port("udp", port),
                         "action": blackhole(), "duration": "5m"}]);
    k.annotate(&a, &[("netfault.io/faults", faults.to_string())]);
    wait_for("FaultFailed (annotation) naming the rule", || {
        failed_events(&k, &a, "annotation", rule) > 0
    });
    let sb = k.sandbox_of(&a);
    let why = sb["annotation_error"].as_str().unwrap_or_default();
    assert!(why.contains(rule), "{sb}");
    assert!(k.faults_of(&a, "annotation").is_empty());
    assert!(passes(&a, &peer, port), "the refused annotation fault");

    // A NetworkFault selecting the pod asks for the same.
    let spec = json!({"action": blackhole(), "direction": "egress",
                      "match": proto_port("udp", port), "duration": "5m",
                      "selector": {"matchLabels": {"app": "web"}}, "mode": "all"});
    k.server.create_networkfault("default", "web-down", spec);
    wait_for("FaultFailed (resource) naming the rule", || {
        failed_events(&k, &a, "resource", rule) > 0
    });
    assert!(k.faults_of(&a, "resource").is_empty());
    assert!(passes(&a, &peer, port), "the refused NetworkFault fault");
}
