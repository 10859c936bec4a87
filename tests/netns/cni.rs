//! The netfault CNI plugin in a real chain (bridge + host-local, then
//! netfault), invoked exactly as containerd invokes it. Root only.
//!
//! Agent-down cases point the plugin at a socket where nothing listens. The
//! agent cases run a real netfaultd (`Agent::start`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde_json::{json, Value};
use testbed::{tcp_connect_ok, tcp_listen, udp_probe, Agent, Node, NodeOptions, Pod, TempDir};

use crate::support::{v4, Cluster};

const SUPPORTED: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn node(opts: NodeOptions) -> Node {
    Node::new(opts).expect("node netns and CNI chain")
}

/// A node whose netfault entry has `failurePolicy: fail`.
fn fail_policy() -> NodeOptions {
    NodeOptions {
        failure_policy: "fail".into(),
        ..NodeOptions::default()
    }
}

/// UDP both ways: everything sent arrives, and no send fails.
fn assert_connected(a: &Pod, b: &Pod, ip_of: impl Fn(&Pod) -> IpAddr) {
    for (from, to) in [(a, b), (b, a)] {
        let p = udp_probe(from, to, ip_of(to), 7001, 20, Duration::from_millis(2))
            .expect("udp probe runs");
        assert_eq!(p.send_errors, 0, "{} -> {}: {p:?}", from.name, to.name);
        assert_eq!(p.sent, 20);
        assert_eq!(
            p.unique_received(),
            p.sent,
            "{} -> {}: {p:?}",
            from.name,
            to.name
        );
    }
}

/// `CNI_*` for one plugin call; `None` values are left out.
fn env(command: Option<&str>, id: &str, netns: &str) -> Vec<(String, String)> {
    let mut e = vec![
        ("CNI_CONTAINERID".to_string(), id.to_string()),
        ("CNI_NETNS".to_string(), netns.to_string()),
        ("CNI_IFNAME".to_string(), "eth0".to_string()),
        ("CNI_PATH".to_string(), "/usr/lib/cni".to_string()),
        (
            "CNI_ARGS".to_string(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=x".to_string(),
        ),
    ];
    if let Some(c) = command {
        e.push(("CNI_COMMAND".to_string(), c.to_string()));
    }
    e
}

/// A netfault plugin conf, as the runtime hands it over, with `extra` merged in.
fn conf(socket: &std::path::Path, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "nftest",
        "type": "netfault",
        "socket": socket,
        "failurePolicy": "ignore",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c.to_string().into_bytes()
}

fn prev_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:00:00:00:01", "sandbox": "/var/run/netns/x"}],
        "ips": [{"interface": 0, "address": "198.18.0.9/24", "gateway": "198.18.0.1"}],
    })
}

fn sandboxes(agent: &Agent) -> Vec<Value> {
    agent.sandboxes().expect("GET /v1/sandboxes")
}

fn find<'a>(list: &'a [Value], id: &str) -> Option<&'a Value> {
    list.iter().find(|s| s["id"] == id)
}

#[test]
fn agent_down_ignore_policy_pods_start_and_talk() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(NodeOptions::default());
    let a = node
        .add_pod("a", &none())
        .expect("ADD succeeds with the agent down");
    let b = node.add_pod("b", &none()).expect("second pod");
    // netfault passed the bridge result through: addresses on the sandbox side.
    assert_eq!(a.result["cniVersion"], "1.0.0");
    assert!(a.result["interfaces"]
        .as_array()
        .is_some_and(|l| l.len() >= 2));
    assert_ne!(v4(&a), v4(&b));
    assert_connected(&a, &b, v4);
    let srv = tcp_listen(&b, 0).expect("listener in b");
    assert!(tcp_connect_ok(
        &a,
        v4(&b),
        srv.port(),
        Duration::from_secs(2)
    ));
    node.del_pod(&a).expect("DEL a");
    node.del_pod(&b).expect("DEL b");
}

#[test]
fn chain_works_for_older_cni_versions() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    for version in ["0.3.1", "0.4.0"] {
        let node = node(NodeOptions {
            cni_version: version.into(),
            ..NodeOptions::default()
        });
        let a = node.add_pod("a", &none()).expect("ADD");
        let b = node.add_pod("b", &none()).expect("ADD");
        assert_eq!(
            a.result["cniVersion"], version,
            "answered in the config's version"
        );
        assert_connected(&a, &b, v4);
        node.del_pod(&a).expect("DEL");
        node.del_pod(&b).expect("DEL");
    }
}

#[test]
fn agent_down_fail_policy_add_fails_with_cni_error() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(fail_policy());
    let err = node
        .add_pod("a", &none())
        .expect_err("ADD must fail with failurePolicy fail and no agent");
    let p = err.plugin().expect("a plugin error");
    assert_eq!(p.plugin, "netfault");
    assert_eq!(p.command, "ADD");
    assert_eq!(p.exit_code, Some(1));
    let e = p.cni_error.as_ref().expect("CNI error JSON on stdout");
    assert_eq!(e["cniVersion"], "1.0.0");
    assert_eq!(e["code"], 11, "try again later: {e}");
    assert!(p.msg().contains("netfaultd unavailable"), "{e}");
    assert!(
        p.stderr.contains("netfault"),
        "log on stderr: {:?}",
        p.stderr
    );
}

#[test]
fn invalid_stdin_gets_exact_error_codes() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(NodeOptions::default());
    let sock = node.socket().to_path_buf();
    let ns = node.netns().path().to_string_lossy().into_owned();
    let prev = json!({ "prevResult": prev_result() });
    // (what, CNI_COMMAND, stdin, expected code, a word the msg must contain)
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "bad JSON",
            Some("ADD"),
            b"{\"cniVersion\": ".to_vec(),
            6,
            "decode",
        ),
        (
            "unsupported version",
            Some("ADD"),
            conf(
                &sock,
                json!({"cniVersion": "9.9.9", "prevResult": prev_result()}),
            ),
            1,
            "9.9.9",
        ),
        (
            "bad failurePolicy",
            Some("ADD"),
            conf(
                &sock,
                json!({"failurePolicy": "maybe", "prevResult": prev_result()}),
            ),
            7,
            "failurePolicy",
        ),
        (
            "missing CNI_COMMAND",
            None,
            conf(&sock, prev.clone()),
            4,
            "CNI_COMMAND",
        ),
        (
            "ADD without prevResult",
            Some("ADD"),
            conf(&sock, json!({})),
            7,
            "prevResult",
        ),
        (
            "bad timeout",
            Some("ADD"),
            conf(
                &sock,
                json!({"timeout": "soon", "prevResult": prev_result()}),
            ),
            7,
            "timeout",
        ),
        (
            "unknown command",
            Some("FROB"),
            conf(&sock, prev.clone()),
            4,
            "FROB",
        ),
    ];
    for (what, command, stdin, code, needle) in cases {
        let out = node
            .run_plugin_raw("netfault", &env(command, "abc123", &ns), &stdin)
            .expect("plugin runs");
        assert_eq!(out.exit_code(), Some(1), "{what}: {out:?}");
        let e = out
            .json()
            .unwrap_or_else(|| panic!("{what}: CNI error JSON: {out:?}"));
        assert_eq!(e["code"], code, "{what}: {e}");
        assert!(e["cniVersion"].is_string(), "{what}: {e}");
        assert!(
            out.cni_msg().contains(needle),
            "{what}: msg must name {needle}: {e}"
        );
    }
    // ADD without CNI_CONTAINERID or CNI_NETNS: invalid environment.
    let mut e = env(Some("ADD"), "abc123", "");
    e.retain(|(k, _)| k != "CNI_CONTAINERID");
    let out = node
        .run_plugin_raw("netfault", &e, &conf(&sock, prev))
        .expect("plugin runs");
    assert_eq!(out.cni_code(), Some(4), "{out:?}");
    assert!(out.cni_msg().contains("CNI_CONTAINERID"), "{out:?}");
    assert!(out.cni_msg().contains("CNI_NETNS"), "{out:?}");
}

#[test]
fn version_lists_supported_versions() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(NodeOptions::default());
    let out = node
        .run_plugin_raw(
            "netfault",
            &[("CNI_COMMAND", "VERSION")],
            br#"{"cniVersion":"1.0.0"}"#,
        )
        .expect("plugin runs");
    assert!(out.success(), "{out:?}");
    let v = out.json().expect("JSON");
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(SUPPORTED));
}

#[test]
fn del_is_idempotent() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(NodeOptions::default());
    let a = node.add_pod("a", &none()).expect("ADD");
    let b = node.add_pod("b", &none()).expect("ADD");
    node.del_pod(&a).expect("first DEL");
    node.del_pod(&a).expect("second DEL");
    // b keeps working while a is torn down twice.
    let c = node.add_pod("c", &none()).expect("ADD");
    assert_connected(&b, &c, v4);
    // DEL without a netns (the runtime lost it), agent down, ignore policy.
    let sock = node.socket().to_path_buf();
    let out = node
        .run_plugin_raw(
            "netfault",
            &env(Some("DEL"), &a.container_id, ""),
            &conf(&sock, json!({})),
        )
        .expect("plugin runs");
    assert!(out.success(), "{out:?}");
    assert!(out.stdout.trim().is_empty(), "DEL prints nothing: {out:?}");
    // ... and with a prevResult for an id that never existed.
    let out = node
        .run_plugin_raw(
            "netfault",
            &env(Some("DEL"), "never-existed", ""),
            &conf(&sock, json!({"prevResult": prev_result()})),
        )
        .expect("plugin runs");
    assert!(out.success(), "{out:?}");
    node.del_pod(&b).expect("DEL");
    node.del_pod(&c).expect("DEL");
}

#[test]
fn status_reflects_agent_health_and_policy() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let node = node(NodeOptions::default());
    let sock = node.socket().to_path_buf();
    let status = |policy: &str, socket: &std::path::Path| {
        node.run_plugin_raw(
            "netfault",
            &[("CNI_COMMAND", "STATUS")],
            &conf(
                socket,
                json!({"cniVersion": "1.1.0", "failurePolicy": policy}),
            ),
        )
        .expect("plugin runs")
    };
    let out = status("ignore", &sock);
    assert!(out.success(), "agent down, ignore: {out:?}");
    let out = status("fail", &sock);
    assert_eq!(out.cni_code(), Some(50), "agent down, fail: {out:?}");

    let dir = TempDir::new("nf-cni-status").expect("temp dir");
    let agent = Agent::start(dir.path()).expect("netfaultd starts");
    let out = status("fail", &agent.socket());
    assert!(out.success(), "agent up: {out:?}");
}

#[test]
fn enrol_and_release_with_running_agent() {
    testbed::require_root!();
    let c = Cluster::with_options(NodeOptions {
        ipv6: true,
        ..fail_policy()
    });
    let (node, agent) = (&c.node, &c.agent);
    let mut ann = BTreeMap::new();
    ann.insert("example.com/team".to_string(), "chaos".to_string());
    let a = node.add_pod("web", &ann).expect("ADD enrols");
    let b = node.add_pod("api", &none()).expect("ADD enrols");
    assert!(a.ipv6().is_some(), "dual stack: {:?}", a.ips);

    let list = sandboxes(agent);
    let s = find(&list, &a.container_id).expect("the sandbox is listed");
    assert_eq!(s["pod"]["name"], "web");
    assert_eq!(s["pod"]["namespace"], "default");
    assert_eq!(s["pod"]["uid"], a.uid.as_str());
    assert_eq!(s["netns"], a.netns_path().to_string_lossy().as_ref());
    assert_eq!(s["ifname"], "eth0");
    assert_eq!(s["annotations"]["example.com/team"], "chaos");
    let mut listed: Vec<IpAddr> = s["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .filter_map(|i| i.as_str()?.parse().ok())
        .collect();
    let mut want = a.ips.clone();
    listed.sort();
    want.sort();
    assert_eq!(listed, want);

    // Enrolment changes nothing on the wire, on either family.
    assert_connected(&a, &b, v4);
    assert_connected(&a, &b, |p| p.ipv6().expect("IPv6"));
    node.check_pod(&a)
        .expect("CHECK passes for an enrolled pod");

    node.del_pod(&a).expect("DEL releases");
    let list = sandboxes(agent);
    assert!(find(&list, &a.container_id).is_none(), "released: {list:?}");
    assert!(find(&list, &b.container_id).is_some(), "b untouched");
    node.del_pod(&a)
        .expect("DEL again: idempotent with the agent up");

    // CHECK of a released sandbox: not enrolled (999).
    let out = node
        .run_netfault("CHECK", &a, true, &json!({}))
        .expect("plugin runs");
    assert_eq!(out.cni_code(), Some(999), "{out:?}");
    node.del_pod(&b).expect("DEL");
    assert!(find(&sandboxes(agent), &b.container_id).is_none());
}

#[test]
fn bad_annotations_do_not_stop_the_pod() {
    testbed::require_root!();
    let c = Cluster::with_options(fail_policy());
    let node = &c.node;
    let mut ann = BTreeMap::new();
    ann.insert(
        "netfault.io/faults".to_string(),
        "[{\"action\": {\"type\": \"teleport\"}}]".to_string(),
    );
    let a = node
        .add_pod("a", &ann)
        .expect("ADD succeeds even with bad annotations");
    let b = node.add_pod("b", &none()).expect("ADD");
    assert_connected(&a, &b, v4);
    // The agent records the error rather than failing the pod (contract:
    // an Event with the exact error, no fault, pod untouched).
    let list = sandboxes(&c.agent);
    let s = find(&list, &a.container_id).expect("the pod is enrolled despite its annotations");
    assert!(s["annotation_error"].is_string(), "recorded: {s}");
    assert!(
        s["birth_faults"].as_array().is_none_or(Vec::is_empty),
        "no fault applied: {s}"
    );
    let faults = c.all_faults();
    assert!(faults.is_empty(), "no fault applied: {faults:?}");
    node.del_pod(&a).expect("DEL");
    node.del_pod(&b).expect("DEL");
}

/// Fail-open recovery: pods born while the agent is down start and talk, and
/// the plugin leaves their enrolment in `<socket dir>/pending/`. When netfaultd
/// starts it adopts them (CHECK then passes); a pod deleted during the outage
/// is not adopted, since DEL removed its pending file.
#[test]
fn fail_open_recovery_after_agent_starts() {
    testbed::require_root!();
    let _gate = crate::support::Gate::shared();
    let dir = TempDir::new("nf-cni-recover").expect("temp dir");
    let socket = dir.path().join("netfaultd.sock");
    let pending = dir.path().join("pending");
    let node = node(NodeOptions {
        socket: socket.clone(),
        ..NodeOptions::default()
    });
    let a = node.add_pod("a", &none()).expect("ADD with agent down");
    let b = node.add_pod("b", &none()).expect("ADD with agent down");
    let gone = node.add_pod("gone", &none()).expect("ADD with agent down");
    assert_connected(&a, &b, v4);
    node.check_pod(&a)
        .expect("CHECK passes while the agent is down (ignore policy)");
    let pending_file = |p: &Pod| pending.join(format!("{}.json", p.container_id));
    assert!(pending_file(&a).exists(), "enrolment left for the agent");
    node.del_pod(&gone).expect("DEL with agent down");
    assert!(
        !pending_file(&gone).exists(),
        "DEL removes the pending enrolment"
    );
    drop(gone);

    let agent = Agent::start(dir.path()).expect("netfaultd starts");
    assert_eq!(agent.socket(), socket);
    let list = sandboxes(&agent);
    let s = find(&list, &a.container_id).expect("a adopted at agent start");
    assert_eq!(s["pod"]["name"], "a");
    assert_eq!(s["netns"], a.netns_path().to_string_lossy().as_ref());
    assert!(find(&list, &b.container_id).is_some(), "b adopted");
    assert_eq!(list.len(), 2, "the deleted pod is not adopted: {list:?}");
    assert!(!pending_file(&a).exists(), "adopted files are consumed");
    node.check_pod(&a).expect("CHECK: enrolled now");
    assert_connected(&a, &b, v4);

    // Re-running ADD with the agent up is an idempotent enrolment.
    let out = node
        .run_netfault("ADD", &a, true, &json!({}))
        .expect("plugin runs");
    assert!(out.success(), "{out:?}");
    assert_eq!(
        out.json().expect("result")["ips"],
        a.result["ips"],
        "prevResult passed through"
    );
    assert_eq!(sandboxes(&agent).len(), 2);

    node.del_pod(&a).expect("DEL");
    node.del_pod(&b).expect("DEL");
    assert!(sandboxes(&agent).is_empty());
}

/// An agent that is up but does not know the pod: CHECK says so (code 999).
#[test]
fn check_reports_unknown_sandbox() {
    testbed::require_root!();
    let c = Cluster::with_options(fail_policy());
    let node = &c.node;
    let a = node.add_pod("a", &none()).expect("ADD");
    node.check_pod(&a).expect("CHECK passes");
    c.agent
        .client()
        .call("DELETE", &format!("/v1/sandboxes/{}", a.container_id), None)
        .expect("released behind the runtime's back");
    let err = node.check_pod(&a).expect_err("CHECK reports it");
    let p = err.plugin().expect("plugin error");
    assert_eq!(
        (p.plugin.as_str(), p.code()),
        ("netfault", Some(999)),
        "{err}"
    );
    assert!(p.msg().contains("not enrolled"), "{err}");
    node.del_pod(&a).expect("DEL");
}

#[test]
fn gc_releases_sandboxes_the_runtime_forgot() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (node, agent) = (&c.node, &c.agent);
    let keep = node.add_pod("keep", &none()).expect("ADD");
    let stale = node.add_pod("stale", &none()).expect("ADD");
    let list = sandboxes(agent);
    assert!(find(&list, &stale.container_id).is_some());

    let gc = |socket: &std::path::Path, policy: &str| {
        node.run_plugin_raw(
            "netfault",
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")],
            &conf(
                socket,
                json!({"cniVersion": "1.1.0", "failurePolicy": policy,
                       "cni.dev/valid-attachments": [{"containerID": keep.container_id, "ifname": "eth0"}]}),
            ),
        )
        .expect("plugin runs")
    };
    let out = gc(&agent.socket(), "fail");
    assert!(out.success(), "{out:?}");
    let list = sandboxes(agent);
    assert!(
        find(&list, &keep.container_id).is_some(),
        "valid one kept: {list:?}"
    );
    assert!(
        find(&list, &stale.container_id).is_none(),
        "stale one released: {list:?}"
    );
    // The released pod still has connectivity: release removes only netfault's state.
    assert_connected(&keep, &stale, v4);
    // GC with the agent down: fine with ignore.
    let out = gc(&c.dir.path().join("nothing.sock"), "ignore");
    assert!(out.success(), "{out:?}");
    // GC needs cniVersion 1.1.0.
    let out = node
        .run_plugin_raw(
            "netfault",
            &[("CNI_COMMAND", "GC")],
            &conf(&agent.socket(), json!({})),
        )
        .expect("plugin runs");
    assert_eq!(out.cni_code(), Some(1), "{out:?}");
    node.del_pod(&keep).expect("DEL");
    node.del_pod(&stale).expect("DEL");
}
