//! The Kubernetes pod watch against the scripted API server
//! (`testbed::ApiServer`): a real agent (`--kubeconfig`, `--node-name`),
//! real pods from the CNI node, and annotation changes on running pods
//! measured on the wire.

use std::time::Duration;

use serde_json::{json, Value};
use testbed::{Agent, TempDir};

use crate::support::{blackhole, blocked, fault_on, passes, proto_port, wait_for, Gate, KubeNode};

/// A `netfault.io/faults` value: one egress blackhole of UDP `port`.
fn blackhole_port(port: u16, duration: &str) -> (&'static str, String) {
    let f = json!([{
        "direction": "egress",
        "match": proto_port("udp", port),
        "action": {"type": "blackhole"},
        "duration": duration,
    }]);
    ("netfault.io/faults", f.to_string())
}

/// Annotate, change, make invalid, remove: each shows on the wire, and an
/// API fault on the same pod stays in effect throughout.
#[test]
fn annotations_on_a_running_pod_reconcile_only_their_faults() {
    testbed::require_root!();
    let k = KubeNode::start();
    let caps = k
        .bed
        .agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    assert_eq!(caps["kubernetes"]["mode"], "kubeconfig", "{caps}");
    assert_eq!(caps["kubernetes"]["node"], k.node_name.as_str());
    let a = k.pod("a");
    let b = k.pod("b");
    let (p1, p2, p3) = (7101, 7102, 7103);
    assert!(passes(&a, &b, p1) && passes(&a, &b, p2) && passes(&a, &b, p3));

    let api = k.bed.agent.post_fault(&fault_on(
        &a,
        "egress",
        proto_port("udp", p3),
        blackhole(),
        "5m",
    ));
    let api = api.expect("API fault");
    assert!(blocked(&a, &b, p3), "the API fault acts");

    k.annotate(&a, &[blackhole_port(p1, "5m")]);
    let took = wait_for("annotation on p1 shows on the wire", || blocked(&a, &b, p1));
    eprintln!("annotation added -> effect: {took:?}");
    assert!(passes(&a, &b, p2), "p2 is untouched");
    let first = k.faults_of(&a, "annotation");
    assert_eq!(first.len(), 1, "one annotation fault: {first:?}");

    k.annotate(&a, &[blackhole_port(p2, "5m")]);
    let took = wait_for("the changed annotation moves the blackhole to p2", || {
        blocked(&a, &b, p2) && passes(&a, &b, p1)
    });
    eprintln!("annotation changed -> effect: {took:?}");
    assert!(blocked(&a, &b, p3), "the API fault stays");
    let second = k.faults_of(&a, "annotation");
    assert_eq!(second.len(), 1, "the old annotation fault was replaced");
    assert_ne!(second[0]["id"], first[0]["id"]);

    // Invalid: nothing changes on the wire, the error names the field.
    let bad = json!([{
        "direction": "egress", "match": {},
        "action": {"type": "loss", "percent": 150}, "duration": "5m",
    }]);
    k.annotate(&a, &[("netfault.io/faults", bad.to_string())]);
    wait_for("the sandbox records the annotation error", || {
        k.sandbox_of(&a)["annotation_error"]
            .as_str()
            .is_some_and(|e| e.contains("netfault.io/faults[0].action.percent"))
    });
    assert!(
        blocked(&a, &b, p2) && passes(&a, &b, p1) && passes(&a, &b, 7104),
        "an invalid annotation changes nothing on the wire"
    );
    assert_eq!(k.faults_of(&a, "annotation")[0]["id"], second[0]["id"]);
    wait_for(
        "a Warning Event InvalidFaultAnnotation naming the field",
        || {
            k.server.events().iter().any(|e| {
                e["reason"] == "InvalidFaultAnnotation"
                    && e["type"] == "Warning"
                    && e["regarding"]["uid"] == a.uid.as_str()
                    && e["note"]
                        .as_str()
                        .is_some_and(|n| n.contains("netfault.io/faults[0].action.percent"))
            })
        },
    );
    assert!(
        k.server
            .events()
            .iter()
            .any(|e| e["reason"] == "FaultApplied" && e["type"] == "Normal"),
        "FaultApplied events: {:?}",
        k.server.events()
    );

    // Removed: the annotation's fault goes, the API's stays.
    k.annotate(&a, &[]);
    let took = wait_for("removing the annotation lifts its fault", || {
        passes(&a, &b, p2)
    });
    eprintln!("annotation removed -> effect: {took:?}");
    assert!(passes(&a, &b, p1));
    assert!(blocked(&a, &b, p3), "the API fault stays in effect");
    assert!(k.sandbox_of(&a)["annotation_error"].is_null());
    let api_fault = k.bed.agent.get_fault(&api).expect("API fault listed");
    assert_eq!(api_fault["source"], "api");
    assert_eq!(api_fault["state"], "active");
    assert!(
        k.server.requests().is_empty(),
        "unscripted requests: {:?}",
        k.server.requests()
    );
}

/// A re-list (410 Gone) and an agent restart with the same annotation change
/// nothing (same fault, same deadline); after a dropped watch connection the
/// watch resumes and a later change still takes effect.
#[test]
fn relist_restart_and_disconnect() {
    testbed::require_root!();
    let mut k = KubeNode::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let (p1, p2) = (7111, 7112);
    k.annotate(&a, &[blackhole_port(p1, "5m")]);
    wait_for("annotation on p1", || blocked(&a, &b, p1));
    let before = k.faults_of(&a, "annotation");
    assert_eq!(before.len(), 1);
    let key = |f: &Value| (f["id"].clone(), f["expires_at_ms"].clone());

    // 410 Gone: the agent re-lists; the fault is the same one.
    let (lists, watches) = (k.server.lists(), k.server.watches());
    k.server.expire_watches();
    wait_for("a re-list after 410", || k.server.lists() > lists);
    k.wait_watching(watches);
    std::thread::sleep(Duration::from_millis(500));
    let after = k.faults_of(&a, "annotation");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        key(&after[0]),
        key(&before[0]),
        "a re-list restarts nothing"
    );
    assert!(blocked(&a, &b, p1));

    // Agent restart: same.
    let watches = k.server.watches();
    k.bed.agent.restart().expect("agent restart");
    k.wait_watching(watches);
    std::thread::sleep(Duration::from_millis(500));
    let after = k.faults_of(&a, "annotation");
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        key(&after[0]),
        key(&before[0]),
        "a restart restarts nothing"
    );
    assert!(blocked(&a, &b, p1));

    // A dropped connection: the watch resumes, a later change takes effect.
    let watches = k.server.watches();
    k.server.drop_watches();
    k.wait_watching(watches);
    k.annotate(&a, &[blackhole_port(p2, "5m")]);
    wait_for("a change after the disconnect", || {
        blocked(&a, &b, p2) && passes(&a, &b, p1)
    });
}

/// An annotation fault that expired is not re-applied by a re-list or an
/// agent restart; changing the annotation applies it again.
#[test]
fn expired_annotation_fault_is_not_reapplied() {
    testbed::require_root!();
    let mut k = KubeNode::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let p = 7121;
    k.annotate(&a, &[blackhole_port(p, "2s")]);
    wait_for("annotation on p", || blocked(&a, &b, p));
    wait_for("the fault expires", || {
        k.faults_of(&a, "annotation")
            .iter()
            .all(|f| f["state"] == "expired")
    });
    assert!(passes(&a, &b, p));

    let lists = k.server.lists();
    k.server.expire_watches();
    wait_for("a re-list after 410", || k.server.lists() > lists);
    let watches = k.server.watches();
    k.bed.agent.restart().expect("agent restart");
    k.wait_watching(watches);
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        passes(&a, &b, p),
        "an expired annotation fault stays expired"
    );
    assert!(
        k.faults_of(&a, "annotation")
            .iter()
            .all(|f| f["state"] == "expired"),
        "no new annotation fault"
    );

    k.annotate(&a, &[blackhole_port(p, "3s")]);
    wait_for("a changed annotation applies again", || blocked(&a, &b, p));
}

/// Without a client and a node name the agent runs node-only and says so in
/// its capabilities and, once, in its log.
#[test]
fn without_kubernetes_the_agent_is_node_only() {
    testbed::require_root!();
    let _gate = Gate::shared();
    let dir = TempDir::new("netfault-kube-none").expect("temp dir");
    let agent = Agent::start(dir.path()).expect("netfaultd");
    let caps = agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    assert_eq!(caps["kubernetes"]["mode"], "node-only", "{caps}");
    assert_eq!(caps["kubernetes"]["connected"], false);
    let log = agent.log_tail(200);
    assert_eq!(log.matches("node-only:").count(), 1, "{log}");
}
