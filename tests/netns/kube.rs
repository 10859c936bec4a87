//! The Kubernetes pod watch against the scripted API server
//! (`testbed::ApiServer`): a real agent (`--kubeconfig`, `--node-name`),
//! real pods from the CNI node, and annotation changes on running pods
//! measured on the wire.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{Agent, ApiServer, Pod, TempDir};

use crate::support::{
    blackhole, blocked, delay, fault_on, holders_of, passes, proto_port, v4, wait_for, Gate,
    KubeNode, Pristine,
};

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

    let api = k.api_blackhole(&a, p3);
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
    k.server.assert_all_scripted();
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
    // A probe racing the deadline may lose its first packets: wait until
    // a whole one passes.
    wait_for("the wire opens at expiry", || passes(&a, &b, p));

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

/// The Events the agent posted on `pod` with `reason`.
fn events_on(server: &ApiServer, pod: &Pod, reason: &str) -> Vec<Value> {
    server
        .events()
        .into_iter()
        .filter(|e| e["reason"] == reason && e["regarding"]["uid"] == pod.uid.as_str())
        .collect()
}

/// Waits for an Event `reason` on `pod` whose note holds `needle`, and
/// checks who reported it.
fn wait_event(k: &KubeNode, pod: &Pod, reason: &str, type_: &str, needle: &str) -> Value {
    let mut found = None;
    wait_for(
        &format!("a {type_} Event {reason} holding {needle:?}"),
        || {
            found = events_on(&k.server, pod, reason).into_iter().find(|e| {
                e["type"] == type_ && e["note"].as_str().is_some_and(|n| n.contains(needle))
            });
            found.is_some()
        },
    );
    let ev = found.unwrap_or_default();
    assert_eq!(ev["reportingController"], "netfault.io/netfaultd", "{ev}");
    assert_eq!(ev["reportingInstance"], k.node_name.as_str(), "{ev}");
    assert_eq!(ev["regarding"]["kind"], "Pod", "{ev}");
    assert_eq!(ev["regarding"]["name"], pod.name.as_str(), "{ev}");
    ev
}

/// Every source's faults show in the pod's Events: an API fault applied
/// and removed, an annotation fault that expires, and one that fails to
/// install (a reorder with no delay to reorder against), each checked on
/// the wire too.
#[test]
fn events_for_faults_of_every_source() {
    testbed::require_root!();
    let k = KubeNode::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let (p1, p2) = (7131, 7132);

    let api = k.api_blackhole(&a, p1);
    assert!(blocked(&a, &b, p1), "the API fault acts");
    let ev = wait_event(&k, &a, "FaultApplied", "Normal", &api);
    assert!(
        ev["note"]
            .as_str()
            .is_some_and(|n| n.contains("(api source)")),
        "{ev}"
    );
    k.bed
        .agent
        .delete_fault(&api)
        .expect("DELETE the API fault");
    assert!(
        passes(&a, &b, p1),
        "the deleted fault is gone from the wire"
    );
    wait_event(&k, &a, "FaultRemoved", "Normal", &api);

    // An annotation with one fault that installs and one the delay engine
    // refuses: the first acts, the second is a Warning naming the field.
    let faults = json!([
        {
            "direction": "egress",
            "match": proto_port("udp", p2),
            "action": {"type": "blackhole"},
            "duration": "3s",
        },
        {
            "direction": "egress",
            "match": proto_port("udp", 7139),
            "action": {"type": "reorder", "percent": 50},
            "duration": "5m",
        },
    ]);
    k.annotate(&a, &[("netfault.io/faults", faults.to_string())]);
    wait_for("the annotation's blackhole acts", || blocked(&a, &b, p2));
    let failed = wait_event(&k, &a, "FaultFailed", "Warning", "action.latency");
    assert!(
        failed["note"]
            .as_str()
            .is_some_and(|n| n.contains("(annotation source)") && n.contains("reorder")),
        "{failed}"
    );
    let applied = k.faults_of(&a, "annotation");
    assert_eq!(
        applied.len(),
        1,
        "only the blackhole installed: {applied:?}"
    );
    let id = applied[0]["id"].as_str().unwrap_or_default().to_string();
    wait_event(&k, &a, "FaultApplied", "Normal", &id);

    // Its duration ends: the wire opens and FaultExpired says so.
    wait_for("the annotation fault expires on the wire", || {
        passes(&a, &b, p2)
    });
    wait_event(&k, &a, "FaultExpired", "Normal", &id);
    assert!(
        events_on(&k.server, &b, "FaultApplied").is_empty(),
        "pod b had no fault"
    );

    // The same invalid annotation seen twice (a valid one between) is one
    // Event with a series of 2, as kubectl shows repeats.
    let bad = json!([{
        "direction": "egress", "match": {},
        "action": {"type": "loss", "percent": 150}, "duration": "5m",
    }]);
    let bad = ("netfault.io/faults", bad.to_string());
    k.annotate(&a, std::slice::from_ref(&bad));
    wait_event(
        &k,
        &a,
        "InvalidFaultAnnotation",
        "Warning",
        "action.percent",
    );
    k.annotate(&a, &[blackhole_port(p2, "5m")]);
    wait_for("the valid annotation acts", || blocked(&a, &b, p2));
    k.annotate(&a, &[bad]);
    wait_for("the repeated error is a series of 2", || {
        events_on(&k.server, &a, "InvalidFaultAnnotation")
            .iter()
            .any(|e| e["series"]["count"] == 2)
    });
    assert!(
        blocked(&a, &b, p2),
        "the invalid annotation changed nothing"
    );
}

/// A pod the watch sees before its sandbox exists (the API server is
/// faster than the runtime): its annotation faults act as soon as CNI ADD
/// enrols the sandbox, though the runtime passed no annotations.
#[test]
fn pod_seen_before_its_sandbox() {
    testbed::require_root!();
    let k = KubeNode::start();
    let b = k.pod("b");
    let p = 7141;
    let uid = testbed::random_uuid();
    let (key, value) = blackhole_port(p, "5m");
    let annotations = BTreeMap::from([(key.to_string(), value)]);
    let lists = k.server.watches();
    k.server
        .add_pod("default", "early", &uid, &k.node_name, &annotations);
    // Let the watch deliver it while no sandbox exists.
    std::thread::sleep(Duration::from_millis(300));
    assert!(k.server.watches() >= lists);
    assert!(
        k.bed
            .agent
            .sandboxes()
            .expect("sandboxes")
            .iter()
            .all(|s| s["pod"]["uid"] != uid.as_str()),
        "no sandbox yet"
    );
    let (early, _) = k
        .bed
        .node
        .add_pod_as("early", &uid, &BTreeMap::new())
        .expect("CNI ADD of the early pod");
    let took = wait_for("the early pod's annotation fault acts", || {
        blocked(&early, &b, p)
    });
    eprintln!("sandbox enrolled -> annotation effect: {took:?}");
    assert!(passes(&early, &b, p + 1), "only its port");
    let f = k.faults_of(&early, "annotation");
    assert_eq!(f.len(), 1, "{f:?}");
    wait_event(
        &k,
        &early,
        "FaultApplied",
        "Normal",
        f[0]["id"].as_str().unwrap_or("?"),
    );
}

/// The handshake time from `from` to `to`'s TCP `port`: one round trip.
fn connect_time(from: &Pod, to: &Pod, port: u16) -> Duration {
    let t = Instant::now();
    assert!(
        testbed::tcp_connect_ok(from, v4(to), port, Duration::from_secs(3)),
        "TCP {} -> {}:{port}",
        from.name,
        to.name
    );
    t.elapsed()
}

/// `kubectl annotate pod a netfault.io/delay=150ms` on a running pod shows
/// in its round trips, and goes when the annotation goes; a YAML
/// `netfault.io/faults` list acts as a JSON one does.
#[test]
fn delay_shorthand_and_yaml_list_on_a_running_pod() {
    testbed::require_root!();
    let k = KubeNode::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let server = testbed::tcp_listen(&b, 7151).expect("TCP server in b");
    let port = server.port();
    let fast = Duration::from_millis(60);
    wait_for("a baseline handshake under 60 ms", || {
        connect_time(&a, &b, port) < fast
    });

    k.annotate(&a, &[("netfault.io/delay", "150ms".to_string())]);
    let took = wait_for("the delay shows in the handshake", || {
        connect_time(&a, &b, port) >= Duration::from_millis(150)
    });
    eprintln!("delay annotation -> effect: {took:?}");
    let f = k.faults_of(&a, "annotation");
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["spec"]["action"]["type"], "delay");
    assert_eq!(f[0]["spec"]["direction"], "egress");

    let yaml = "- direction: egress\n  match: {protocol: udp, ports: \"7152\"}\n  action: {type: blackhole}\n  duration: 5m\n";
    k.annotate(&a, &[("netfault.io/faults", yaml.to_string())]);
    wait_for("the YAML list replaces the delay", || {
        blocked(&a, &b, 7152) && connect_time(&a, &b, port) < fast
    });
    assert!(passes(&a, &b, 7153), "only its port");

    k.annotate(&a, &[]);
    wait_for("no annotation, no fault", || passes(&a, &b, 7152));
}

/// SIGTERM while the agent's DaemonSet stays (a rollout restart) leaves
/// every fault in effect; SIGTERM once the DaemonSet is gone (`kubectl
/// delete -k daemonset/`) releases every sandbox: the wire is open and each
/// pod's netns is exactly as before its first fault, with no holder left.
#[test]
fn sigterm_keeps_faults_on_restart_and_removes_them_at_uninstall() {
    testbed::require_root!();
    let ns = testbed::unique_name("nf");
    let agent_pod = "netfault-agent-x1";
    let mut k = KubeNode::start_with(&["--pod-name", agent_pod, "--pod-namespace", &ns]);
    let ds_uid = testbed::random_uuid();
    k.server.set_daemonset(&ns, "netfault", &ds_uid, false);
    k.server
        .add_owned_agent_pod(&ns, agent_pod, &k.node_name, ("netfault", &ds_uid));
    let a = k.pod("a");
    let b = k.pod("b");
    let before = Pristine::of(&a);
    let server = testbed::tcp_listen(&b, 0).expect("TCP server in b");
    let port = server.port();
    let (p1, p2) = (7161, 7162);
    for body in [
        fault_on(&a, "egress", proto_port("udp", p1), blackhole(), "5m"),
        fault_on(&a, "egress", proto_port("tcp", port), delay("120ms"), "5m"),
    ] {
        k.bed.agent.post_fault(&body).expect("API fault");
    }
    k.annotate(&a, &[blackhole_port(p2, "5m")]);
    wait_for("the annotation fault acts", || blocked(&a, &b, p2));
    let slow = Duration::from_millis(120);
    assert!(blocked(&a, &b, p1) && connect_time(&a, &b, port) >= slow);
    assert!(!holders_of(&a).is_empty(), "the delay fault has a holder");

    // A restart: the DaemonSet stays, so do the faults.
    k.bed
        .agent
        .stop(Duration::from_secs(10))
        .expect("SIGTERM the agent");
    assert!(
        k.bed
            .agent
            .log_tail(50)
            .contains("leaving installed faults"),
        "{}",
        k.bed.agent.log_tail(50)
    );
    assert!(blocked(&a, &b, p1) && blocked(&a, &b, p2), "faults stay");
    let watches = k.server.watches();
    k.bed.agent.restart().expect("agent start");
    k.wait_watching(watches);
    // The delay holder outlives the agent; its queue is the new agent's.
    wait_for("the delay acts after the restart", || {
        connect_time(&a, &b, port) >= slow
    });
    assert_eq!(
        k.bed
            .agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("faults")
            .as_array()
            .map(Vec::len),
        Some(3)
    );

    // The uninstall, as `kubectl delete -k daemonset/` does it: the agent's
    // Role goes with its DaemonSet, so by SIGTERM it can no longer ask;
    // the watch it opened before saw the deletion.
    wait_for("the agent watches its DaemonSet", || {
        k.bed
            .agent
            .log_tail(200)
            .contains("watching the agent's DaemonSet")
    });
    std::thread::sleep(Duration::from_millis(300));
    k.server.forbid(&format!("/api/v1/namespaces/{ns}/pods"));
    k.server.forbid(&format!("/apis/apps/v1/namespaces/{ns}/"));
    k.server.delete_daemonset(&ns, "netfault");
    let t = Instant::now();
    k.bed
        .agent
        .stop(Duration::from_secs(20))
        .expect("SIGTERM the agent");
    eprintln!("uninstall: SIGTERM to exit {:?}", t.elapsed());
    let log = k.bed.agent.log_tail(50);
    assert!(
        log.contains("uninstalling") && log.contains("seen by the watch"),
        "{log}"
    );
    assert!(
        passes(&a, &b, p1) && passes(&a, &b, p2),
        "no blackhole after uninstall"
    );
    assert!(
        connect_time(&a, &b, port) < slow,
        "no delay after uninstall"
    );
    before.assert_restored("after uninstall");
    assert!(
        holders_of(&a).is_empty(),
        "holders left: {:?}",
        holders_of(&a)
    );
}
