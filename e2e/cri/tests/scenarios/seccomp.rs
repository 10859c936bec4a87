//! The DaemonSet under containerd's RuntimeDefault seccomp profile (what a
//! kubelet sends when SeccompDefault is on, or for `seccompProfile:
//! {type: RuntimeDefault}`): every backend still works, measured on the
//! wire. (The manifest names no profile; the kubelet's default sends
//! Unconfined, which the other scenarios use. AppArmor is not enabled on
//! these machines, so containerd applies no AppArmor profile.)

use std::time::Duration;

use e2e_cri::{
    api, http_status, ping_replies, tcp_connect_median, HttpOk, Node, TcpSink, AGENT_CONTAINER,
};
use serde_json::json;

use crate::support::{on_pod, ping};

#[test]
fn seccomp_runtime_default_agent_still_runs_every_backend() {
    testbed::require_root!();
    let node = Node::start().expect("start the node");
    let mut plan = node.daemonset_plan().expect("the DaemonSet's plan");
    for c in plan.containers.iter_mut() {
        let sc = c
            .config
            .linux
            .as_mut()
            .and_then(|l| l.security_context.as_mut())
            .expect("a security context");
        sc.seccomp = Some(api::SecurityProfile {
            profile_type: api::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        });
    }
    let agent = node.start_plan(plan).expect("start the DaemonSet pod");
    node.wait_agent_ready(&agent, Duration::from_secs(30))
        .expect("ready under RuntimeDefault");
    let pid = node
        .container_pid(agent.container_id(AGENT_CONTAINER).expect("id"))
        .expect("agent pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2"),
        "the agent is not under a seccomp filter"
    );

    let a = node.pod("a", &[]).expect("pod a");
    let b = node.pod("b", &[]).expect("pod b");
    let sink = TcpSink::start(&b, 8080).expect("listener in b");
    let web = HttpOk::start(&b, 80).expect("HTTP server in b");
    let t = Duration::from_secs(3);
    assert_eq!(http_status(&a, web.addr, t).expect("GET before"), 200);

    // eBPF: ICMP dropped; NFQUEUE: TCP delayed; proxy: HTTP aborted.
    let backends: Vec<String> = [
        on_pod(
            "a",
            json!({"type": "blackhole"}),
            json!({"match": {"protocol": "icmp"}}),
        ),
        on_pod(
            "a",
            json!({"type": "delay", "latency": "60ms"}),
            json!({"match": {"protocol": "tcp", "ports": "8080"}}),
        ),
        on_pod(
            "a",
            json!({"type": "http-abort", "status": 503}),
            json!({"match": {"protocol": "tcp", "ports": "80"}}),
        ),
    ]
    .iter()
    .map(|f| {
        let f = agent.post_fault(f).expect("POST a fault");
        f["backend"].as_str().unwrap_or_default().to_string()
    })
    .collect();
    assert_eq!(backends, ["ebpf-tc", "nfqueue", "proxy"]);
    let log = ping(&node, &a, "ping", &b, 3, "0.2");
    assert!(
        ping_replies(&log).is_empty(),
        "ICMP passed the blackhole:\n{log}"
    );
    let rtt = tcp_connect_median(&a, sink.addr, 3, t).expect("handshakes");
    assert!(
        rtt >= Duration::from_millis(115),
        "TCP not delayed: {rtt:?}"
    );
    assert_eq!(http_status(&a, web.addr, t).expect("GET during"), 503);
}
