//! `netfaultctl --kube` end to end: the real netfaultctl binary with a
//! kubeconfig for the scripted API server (`testbed::ApiServer`), which
//! knows the target pods (on node N), the agent pod on N, a decoy agent on
//! another node, and the token Secret, and forwards `pods/portforward` of
//! the agent pod to the real agent's loopback TCP listener. Faults applied
//! this way are measured on the wire; bad tokens, missing pods and agents
//! are clear errors that change nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::apiserver::portforward::agent_pod;
use testbed::{udp_probe, AgentNode, ApiServer, Pod, TempDir};

use crate::support::{v4, Gate};
use crate::tcp_api::{tcp_agent_node, write_token};

const TOKEN: &str = "ctl-kube-token-0123456789abcdefghij";
const AGENT_NS: &str = "netfault";
const PORT: u16 = 7979;
const UDP_PORT: u16 = 7601;

/// A node with a TCP-listening agent, and an API server that knows it.
struct KubeBed {
    // Field order is drop order.
    bed: AgentNode,
    server: ApiServer,
    node: String,
    agent_pod: String,
    decoy_pod: String,
    _gate: Gate,
}

impl KubeBed {
    fn start() -> KubeBed {
        let gate = Gate::shared();
        let dir = TempDir::new("netfault-ctlkube").expect("temp dir");
        let token = dir.path().join("token");
        write_token(&token, TOKEN);
        let (bed, addr) = tcp_agent_node(dir, &token);
        let server = ApiServer::start().expect("scripted API server");
        let node_name = testbed::unique_name("node");
        let agent_pod = testbed::unique_name("nfagt");
        let decoy_pod = testbed::unique_name("decoy");
        server.add_agent_pod(AGENT_NS, &agent_pod, &node_name);
        server.forward_port(AGENT_NS, &agent_pod, PORT, addr);
        // An agent on another node: its port-forward goes nowhere.
        server.add_agent_pod(AGENT_NS, &decoy_pod, &testbed::unique_name("other"));
        server.set_secret(
            AGENT_NS,
            "netfault-api-token",
            &[("token", format!("{TOKEN}\n").as_bytes())],
        );
        KubeBed {
            bed,
            server,
            node: node_name,
            agent_pod,
            decoy_pod,
            _gate: gate,
        }
    }

    /// A pod through CNI ADD, also known to the API server on this node.
    fn pod(&self, name: &str) -> Pod {
        let pod = self.bed.add_pod(name).expect("CNI ADD");
        self.server.add_pod(
            &pod.namespace,
            &pod.name,
            &pod.uid,
            &self.node,
            &BTreeMap::new(),
        );
        pod
    }

    fn ctl(&self, args: &[&str]) -> Output {
        let t = Instant::now();
        let out = self.ctl_untimed(args);
        eprintln!("netfaultctl --kube {}: {:?}", args.join(" "), t.elapsed());
        out
    }

    fn ctl_untimed(&self, args: &[&str]) -> Output {
        Command::new(testbed::workspace_bin("netfaultctl"))
            .arg("--kube")
            .arg("--kubeconfig")
            .arg(self.server.kubeconfig())
            .args(args)
            .env_remove("NETFAULT_SOCKET")
            .env_remove("NETFAULT_URL")
            .env_remove("NETFAULT_TOKEN_FILE")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run netfaultctl")
    }

    /// The agent's faults, asked over its socket.
    fn faults(&self) -> Value {
        self.bed
            .agent
            .client()
            .call("GET", "/v1/faults", None)
            .expect("GET /v1/faults over the socket")
    }

    /// Port-forwards that reached the decoy agent.
    fn decoy_forwards(&self) -> usize {
        self.server
            .forwards()
            .iter()
            .filter(|f| f.pod == self.decoy_pod)
            .count()
    }
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn failed(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what} should fail: stdout {} stderr {stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.starts_with("error: "), "{what}: {stderr}");
    stderr
}

/// Datagrams `from` -> `to` on [`UDP_PORT`]: (sent, received).
fn probe(from: &Pod, to: &Pod) -> (u64, u64) {
    let p = udp_probe(from, to, v4(to), UDP_PORT, 200, Duration::from_micros(200))
        .unwrap_or_else(|e| panic!("udp probe {} -> {}: {e}", from.name, to.name));
    assert_eq!(p.send_errors, 0, "a blackhole is silent to the sender");
    (p.sent, p.received)
}

fn blackhole_of(pod_ns: &str, pod_name: &str) -> Value {
    json!({
        "target": {"pod": {"namespace": pod_ns, "name": pod_name}},
        "direction": "egress",
        "match": {"protocol": "udp", "ports": UDP_PORT.to_string()},
        "action": {"type": "blackhole"},
        "duration": "2m",
    })
}

fn write_fault(dir: &Path, name: &str, fault: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, fault.to_string()).expect("write the fault file");
    path.to_str().expect("utf-8 path").to_string()
}

#[test]
fn ctl_kube_applies_lists_and_deletes_through_port_forward() {
    testbed::require_root!();
    let k = KubeBed::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let (sent, received) = probe(&a, &b);
    assert_eq!(received, sent, "the wire is clean before the fault");
    let dir = TempDir::new("nfctl-kube").expect("temp dir");
    let file = write_fault(
        dir.path(),
        "fault.json",
        &blackhole_of(&a.namespace, &a.name),
    );

    // apply: the pod's node, its agent, the token from the Secret, a
    // port-forward to the agent pod, and the blackhole is on the wire.
    let out = k.ctl(&["-o", "json", "apply", "-f", &file]);
    let created: Value = serde_json::from_str(&ok(&out, "apply")).expect("apply -o json");
    let id = created[0]["id"].as_str().expect("a fault id").to_string();
    assert_eq!(created[0]["node"], k.node.as_str(), "{created}");
    let (sent, received) = probe(&a, &b);
    assert_eq!(
        received, 0,
        "netfaultctl --kube applied a blackhole ({sent} sent)"
    );
    let forwards = k.server.forwards();
    assert!(!forwards.is_empty(), "no port-forward was made");
    for f in &forwards {
        assert_eq!(
            (
                f.namespace.as_str(),
                f.pod.as_str(),
                f.ports.as_slice(),
                f.upgraded
            ),
            (AGENT_NS, k.agent_pod.as_str(), &[PORT][..], true),
            "{forwards:?}"
        );
    }

    // get, by --pod and by --node.
    let out = k.ctl(&["get", &id, "--pod", &format!("{}/{}", a.namespace, a.name)]);
    let shown = ok(&out, "get --pod");
    assert!(shown.contains(&id) && shown.contains("active"), "{shown}");
    let out = k.ctl(&["-o", "json", "--node", &k.node, "get", &id]);
    let v: Value = serde_json::from_str(&ok(&out, "get --node")).expect("get -o json");
    assert_eq!(v["id"], id.as_str());
    // health and sandboxes ask the same agent.
    let out = k.ctl(&["health", "--node", &k.node]);
    assert_eq!(
        ok(&out, "health"),
        format!("ok ({AGENT_NS}/{} on node {})\n", k.agent_pod, k.node)
    );
    let out = k.ctl(&[
        "-o",
        "json",
        "sandboxes",
        "--pod",
        &format!("{}/{}", b.namespace, b.name),
    ]);
    let sandboxes = ok(&out, "sandboxes");
    assert!(
        sandboxes.contains(&a.container_id) && sandboxes.contains(&b.container_id),
        "{sandboxes}"
    );
    assert_eq!(
        k.decoy_forwards(),
        0,
        "apply, get, health and sandboxes never reach the decoy"
    );

    // list on one node; list over every node (the decoy's port-forward
    // fails: its error is reported after the table, exit 1).
    let out = k.ctl(&["list", "--node", &k.node]);
    assert!(ok(&out, "list --node").contains(&id));
    let out = k.ctl(&["list"]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = failed(&out, "list over every node, with a dead decoy");
    let line = table
        .lines()
        .find(|l| l.contains(&id))
        .unwrap_or_else(|| panic!("the fault is listed: {table}"));
    assert!(line.starts_with(&k.node), "NODE column first: {table}");
    assert!(table.starts_with("NODE "), "{table}");
    assert!(
        err.contains(&format!(
            "port-forward to {AGENT_NS}/{}:{PORT} failed: error forwarding port {PORT}",
            k.decoy_pod
        )),
        "{err}"
    );

    // delete: the wire passes again; a second delete is still a success.
    let out = k.ctl(&["delete", &id, "--node", &k.node]);
    assert_eq!(ok(&out, "delete"), format!("deleted {id}\n"));
    let (sent, received) = probe(&a, &b);
    assert_eq!(
        received, sent,
        "netfaultctl --kube delete ended the blackhole"
    );
    assert_eq!(k.faults(), json!([]), "nothing left on the agent");
    ok(&k.ctl(&["delete", &id, "--node", &k.node]), "delete again");
}

#[test]
fn ctl_kube_refuses_bad_tokens_and_missing_pods_changing_nothing() {
    testbed::require_root!();
    let k = KubeBed::start();
    let a = k.pod("a");
    let b = k.pod("b");
    let dir = TempDir::new("nfctl-kube-bad").expect("temp dir");
    let file = write_fault(
        dir.path(),
        "fault.json",
        &blackhole_of(&a.namespace, &a.name),
    );
    let unchanged = |what: &str| {
        assert_eq!(k.faults(), json!([]), "{what} created a fault");
        let (sent, received) = probe(&a, &b);
        assert_eq!(received, sent, "{what} touched the wire");
    };

    // A wrong --token-file: the agent's 401, named.
    let wrong = dir.path().join("wrong");
    write_token(&wrong, "not-the-token-0123456789abcdef");
    let w = wrong.to_str().expect("utf-8");
    let err = failed(
        &k.ctl(&["--token-file", w, "apply", "-f", &file]),
        "wrong --token-file",
    );
    assert!(err.contains("refused the token from --token-file"), "{err}");
    assert!(err.contains("no fault was created"), "{err}");
    unchanged("a wrong --token-file");

    // A wrong token in the Secret.
    k.server.set_secret(
        AGENT_NS,
        "netfault-api-token",
        &[("token", b"stale-secret-token-0123456789")],
    );
    let err = failed(&k.ctl(&["apply", "-f", &file]), "wrong Secret");
    assert!(
        err.contains("refused the token from the Secret netfault-api-token"),
        "{err}"
    );
    unchanged("a wrong token in the Secret");

    // No Secret: the error says how to create it; nothing is forwarded.
    k.server.remove_secret(AGENT_NS, "netfault-api-token");
    let before = k.server.forwards().len();
    let err = failed(&k.ctl(&["apply", "-f", &file]), "no Secret");
    assert!(
        err.contains("Secret netfault/netfault-api-token not found")
            && err.contains("kubectl -n netfault create secret generic netfault-api-token")
            && err.contains("--token-file"),
        "{err}"
    );
    assert_eq!(
        k.server.forwards().len(),
        before,
        "forwarded without a token"
    );
    unchanged("a missing Secret");
    // The right --token-file works without the Secret (and list shows it).
    let good = dir.path().join("good");
    write_token(&good, TOKEN);
    let g = good.to_str().expect("utf-8");
    let out = k.ctl(&["--token-file", g, "apply", "-f", &file]);
    let created = ok(&out, "apply with --token-file");
    assert!(
        created.starts_with("created ") && created.contains(&k.node),
        "{created}"
    );
    let (_, received) = probe(&a, &b);
    assert_eq!(received, 0, "the fault applied with --token-file acts");
    let id = created
        .split_whitespace()
        .nth(1)
        .expect("an id")
        .to_string();
    ok(
        &k.ctl(&["--token-file", g, "--node", &k.node, "delete", &id]),
        "delete",
    );
    unchanged("delete");

    // A pod the API server does not know; a pod on a node with no agent; a
    // node whose agent is not ready; the wrong agent port.
    let lonely = testbed::unique_name("lonely");
    let nowhere = testbed::unique_name("noagt");
    k.server
        .add_pod(&a.namespace, &lonely, &lonely, &nowhere, &BTreeMap::new());
    let pending_node = testbed::unique_name("pendn");
    let waiting = testbed::unique_name("wait");
    k.server.put_pod(agent_pod(
        AGENT_NS,
        "netfault-pending",
        &pending_node,
        "Pending",
        false,
    ));
    k.server.add_pod(
        &a.namespace,
        &waiting,
        &waiting,
        &pending_node,
        &BTreeMap::new(),
    );
    let cases: Vec<(Value, Vec<&str>, String)> = vec![
        (
            blackhole_of(&a.namespace, "no-such-pod"),
            vec![],
            format!("fault: pod {}/no-such-pod not found (nothing was applied)", a.namespace),
        ),
        (
            blackhole_of(&a.namespace, &lonely),
            vec![],
            format!("no netfault agent on node {nowhere}"),
        ),
        (
            blackhole_of(&a.namespace, &waiting),
            vec![],
            format!(
                "the netfault agent on node {pending_node} is not ready: netfault/netfault-pending: phase Pending"
            ),
        ),
        (
            blackhole_of(&a.namespace, &a.name),
            vec!["--token-file", g, "--agent-port", "7980"],
            format!(
                "port-forward to {AGENT_NS}/{}:7980 failed: error forwarding port 7980",
                k.agent_pod
            ),
        ),
        (
            json!({"target": {"sandbox": a.container_id}, "action": {"type": "blackhole"}, "duration": "1m"}),
            vec![],
            "fault.target: with --kube a fault's target must be a pod".to_string(),
        ),
    ];
    for (i, (fault, extra, expect)) in cases.into_iter().enumerate() {
        let file = write_fault(dir.path(), &format!("case{i}.json"), &fault);
        let mut args = extra.clone();
        args.extend(["apply", "-f", &file]);
        let err = failed(&k.ctl(&args), &format!("case {i}"));
        assert!(
            err.contains(&expect),
            "case {i}: expected {expect:?} in {err}"
        );
        unchanged(&format!("case {i}"));
    }
    // get without a node says what to pass.
    let err = failed(&k.ctl(&["get", "f-x"]), "get without --node");
    assert!(
        err.contains("needs --node NAME or --pod NAMESPACE/NAME"),
        "{err}"
    );
    assert_eq!(k.decoy_forwards(), 0, "nothing went to the decoy agent");
    // The agent's token file gone (its Secret deleted): the agent's 503,
    // shown with the agent it came from.
    std::fs::remove_file(k.bed.dir.path().join("token")).expect("remove the agent's token");
    let err = failed(
        &k.ctl(&["--token-file", g, "--node", &k.node, "list"]),
        "an agent without its token file",
    );
    assert!(
        err.contains(&format!(
            "the agent {AGENT_NS}/{} on node {} is not serving its TCP API yet: the TCP API has no token yet",
            k.agent_pod, k.node
        )),
        "{err}"
    );
}
