//! Adoption through the CRI API (issue 9, part 4): pods that were running
//! before the agent, on a node whose conflist has no netfault entry, are
//! enrolled from containerd's sandbox list, can be targeted by name, and
//! are released when containerd stops them.
//!
//! The agent runs from the DaemonSet manifest's own pod spec (with its
//! `--cri-socket`), but without the install-cni container: netfault never
//! enters the pods' CNI chain, so no CNI ADD or DEL ever tells the agent
//! about these pods. Everything it knows comes from CRI.
//!
//! Run alone: `scripts/e2e-cri.sh adoption`.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_cri::{
    tcp_connect_median, tcp_connect_time, AgentPod, Node, Probe, Sandbox, TcpSink, AGENT_CONTAINER,
};
use serde_json::{json, Value};

/// The agent's default `--cri-poll-interval` (the manifest sets none).
const POLL: Duration = Duration::from_secs(2);

/// A fault on a pod of namespace `default`, by name.
fn on_pod(name: &str, action: Value) -> Value {
    json!({
        "target": {"pod": {"namespace": "default", "name": name}},
        "action": action,
        "duration": "2m",
    })
}

use testbed::eventually;

/// Everything in a pod's netns that netfault could leave behind: tc qdiscs
/// and filters on `eth0`, nft tables, routes and policy rules.
#[derive(Debug, PartialEq, Eq)]
struct NetnsState {
    qdiscs: Vec<String>,
    filters: Vec<String>,
    nft_tables: String,
    routes: Vec<String>,
    rules: Vec<String>,
}

fn netns_state(pod: &Sandbox) -> NetnsState {
    let path = pod.netns.clone().expect("the pod has a netns");
    let ns = netfault_sys::netns::Netns::open(&path).expect("open the pod's netns");
    let (qdiscs, filters, routes, rules) = ns
        .run(|inside| {
            let (q, f) = netfault_ebpf::tc_state_here(inside, "eth0").expect("tc state of eth0");
            let mut sock = netfault_sys::rtnetlink::RtSocket::open().expect("rtnetlink");
            (
                q.iter()
                    .map(|q| format!("{} {:x} {:x}", q.kind, q.handle, q.parent))
                    .collect(),
                f.iter().map(|f| format!("{f:?}")).collect(),
                sock.route_summary().expect("routes"),
                sock.rule_summary().expect("rules"),
            )
        })
        .expect("enter the pod's netns");
    let nft_tables = pod
        .run(|| Command::new("nft").args(["list", "tables"]).output())
        .expect("enter the pod's netns")
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .expect("nft list tables");
    NetnsState {
        qdiscs,
        filters,
        nft_tables,
        routes,
        rules,
    }
}

/// The DaemonSet's agent container alone (no install-cni), ready: its
/// readiness probe passes and the socket answers.
fn agent_only(node: &Node) -> AgentPod {
    let mut plan = node.daemonset_plan().expect("the DaemonSet's pod plan");
    plan.containers.retain(|c| c.name == AGENT_CONTAINER);
    let args = &plan.container(AGENT_CONTAINER).expect("agent").config.args;
    assert!(
        args.iter().any(|a| a == "--cri-socket"),
        "the manifest runs the agent without --cri-socket: {args:?}"
    );
    let agent = node.start_plan(plan).expect("start the agent pod");
    let ready = eventually(Duration::from_secs(30), || {
        agent.healthz().is_ok_and(|s| s == 200)
            && node
                .probe(&agent, AGENT_CONTAINER, Probe::Readiness)
                .is_ok_and(|p| p.exit_code == 0)
    });
    assert!(
        ready,
        "the agent did not become ready; log:\n{}",
        node.agent_log(&agent).unwrap_or_default()
    );
    agent
}

/// The enrolled sandbox with this id, if any.
fn enrolled(agent: &AgentPod, id: &str) -> Option<Value> {
    agent
        .sandboxes()
        .expect("GET /v1/sandboxes")
        .into_iter()
        .find(|s| s["id"] == id)
}

/// The delay holder's engine threads (one per sandbox queue it serves).
fn delay_holders(node: &Node) -> Vec<(u32, String)> {
    e2e_cri::holder_engines(&node.pod_processes())
}

#[test]
fn adoption_pods_started_before_the_agent_are_targeted_by_name_and_released_when_stopped() {
    testbed::require_root!();
    let node = Node::start().expect("start the node");
    assert!(
        !node.conflist_has_netfault(),
        "the node's conflist must not chain netfault"
    );

    // Pods that exist before netfault does.
    let a = node.pod("early-a", &[]).expect("pod early-a");
    let b = node.pod("early-b", &[]).expect("pod early-b");
    let c = node
        .pod(
            "early-c",
            &[("netfault.io/loss", "100%"), ("netfault.io/duration", "5m")],
        )
        .expect("pod early-c, annotated");
    let sink = TcpSink::start(&b, 8080).expect("listener in early-b");
    let timeout = Duration::from_secs(3);
    let base = tcp_connect_median(&a, sink.addr, 5, timeout).expect("baseline a -> b");
    assert!(base < Duration::from_millis(50), "baseline {base:?}");
    assert!(
        tcp_connect_time(&c, sink.addr, timeout)
            .expect("connect")
            .is_some(),
        "c talks before the agent exists (nothing applied its annotation)"
    );
    let a_pristine = netns_state(&a);
    let pins_before = e2e_cri::bpffs_netfault();

    // The agent starts and adopts them from containerd's list.
    let started = Instant::now();
    let agent = agent_only(&node);
    let all = eventually(Duration::from_secs(10), || {
        [&a, &b, &c]
            .iter()
            .all(|p| enrolled(&agent, &p.id).is_some_and(|s| s["source"] == "cri"))
    });
    assert!(
        all,
        "not all adopted: {:#?}\nlog:\n{}",
        agent.sandboxes(),
        node.agent_log(&agent).unwrap_or_default()
    );
    eprintln!("agent start -> 3 pods adopted: {:?}", started.elapsed());
    let sa = enrolled(&agent, &a.id).expect("a enrolled");
    assert_eq!(sa["pod"]["name"], "early-a");
    assert_eq!(sa["ifname"], "eth0");
    assert_eq!(
        sa["netns"],
        a.netns.as_ref().expect("netns").display().to_string()
    );
    let caps = agent
        .client()
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    assert_eq!(caps["cri"]["connected"], true, "{caps}");
    assert_eq!(caps["cri"]["runtime"]["name"], "containerd", "{caps}");

    // c's annotation became a fault at adoption, as at CNI ADD.
    assert!(
        eventually(Duration::from_secs(3), || tcp_connect_time(
            &c,
            sink.addr,
            Duration::from_millis(300)
        )
        .is_ok_and(|t| t.is_none())),
        "the adopted pod's 100% loss annotation does not act"
    );

    // A delay on a, by name.
    let f = agent
        .post_fault(&on_pod(
            "early-a",
            json!({"type": "delay", "latency": "100ms"}),
        ))
        .expect("POST a delay on early-a by name");
    assert_eq!(f["sandbox"], a.id.as_str(), "{f}");
    let delayed = tcp_connect_median(&a, sink.addr, 5, timeout).expect("delayed handshakes");
    eprintln!("a -> b handshake: {base:?} before, {delayed:?} with a 100 ms delay");
    assert!(
        delayed >= Duration::from_millis(195),
        "a 100 ms delay both ways makes a handshake >= 200 ms, got {delayed:?}"
    );
    // A blackhole on b, by name.
    let g = agent
        .post_fault(&on_pod("early-b", json!({"type": "blackhole"})))
        .expect("POST a blackhole on early-b by name");
    assert_eq!(
        tcp_connect_time(&a, sink.addr, Duration::from_millis(500)).expect("connect"),
        None,
        "a handshake completed through a blackhole"
    );
    agent
        .delete_fault(g["id"].as_str().expect("id"))
        .expect("DELETE the blackhole");
    agent
        .delete_fault(f["id"].as_str().expect("id"))
        .expect("DELETE the delay");
    let after = tcp_connect_median(&a, sink.addr, 5, timeout).expect("after DELETE");
    assert!(
        after < Duration::from_millis(50),
        "still delayed: {after:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || netns_state(&a) == a_pristine),
        "a's netns is not as before the agent: {:#?} vs {a_pristine:#?}",
        netns_state(&a)
    );
    assert!(
        eventually(Duration::from_secs(3), || delay_holders(&node).is_empty()),
        "delay holders left: {:?}",
        delay_holders(&node)
    );

    // A pod started now (still no netfault in its chain) is targeted at
    // once: the unknown name makes the agent ask containerd.
    let late = node.pod("late", &[]).expect("pod late");
    let t = Instant::now();
    let h = agent
        .post_fault(&on_pod("late", json!({"type": "blackhole"})))
        .expect("POST on a pod the agent has not seen yet");
    eprintln!(
        "POST on a pod started {:?} ago: adopted on demand",
        t.elapsed()
    );
    assert_eq!(h["sandbox"], late.id.as_str(), "{h}");
    assert_eq!(
        tcp_connect_time(&late, sink.addr, Duration::from_millis(500)).expect("connect"),
        None,
        "the blackhole on the late pod does not act"
    );
    let still_unknown = agent.client().call(
        "POST",
        "/v1/faults",
        Some(&on_pod("no-such-pod", json!({"type": "blackhole"}))),
    );
    match still_unknown {
        Err(netfault_api::ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("a pod nobody runs: expected 404, got {other:?}"),
    }

    // Stop a with faults of two backends: containerd stops it (no CNI DEL
    // reaches the agent); the poll releases it and everything it had.
    agent
        .post_fault(&on_pod(
            "early-a",
            json!({"type": "delay", "latency": "50ms"}),
        ))
        .expect("POST a delay on a");
    agent
        .post_fault(&on_pod("early-a", json!({"type": "loss", "percent": 100})))
        .expect("POST a loss on a");
    assert!(
        !delay_holders(&node).is_empty(),
        "no delay holder while a delay is active"
    );
    node.stop_sandbox(&a.id).expect("StopPodSandbox early-a");
    let stopped = Instant::now();
    let released = eventually(POLL + Duration::from_secs(3), || {
        enrolled(&agent, &a.id).is_none()
    });
    let took = stopped.elapsed();
    eprintln!("StopPodSandbox -> released by the poll: {took:?} (poll {POLL:?})");
    assert!(
        released,
        "a still enrolled {took:?} after StopPodSandbox: {:#?}\nlog:\n{}",
        enrolled(&agent, &a.id),
        node.agent_log(&agent).unwrap_or_default()
    );
    let left: Vec<Value> = agent
        .faults()
        .expect("GET /v1/faults")
        .into_iter()
        .filter(|f| f["sandbox"] == a.id.as_str())
        .collect();
    assert!(left.is_empty(), "a's faults are still listed: {left:#?}");
    assert!(
        eventually(Duration::from_secs(3), || delay_holders(&node).is_empty()),
        "delay holders left: {:?}",
        delay_holders(&node)
    );
    assert_eq!(e2e_cri::bpffs_netfault(), pins_before, "bpffs pins left");
    let state =
        std::fs::read_to_string(node.layout().run_netfault.join("state.json")).unwrap_or_default();
    assert!(!state.contains(&a.id), "state.json still names a");
    // The others stay.
    assert!(enrolled(&agent, &b.id).is_some(), "b was released too");
    let log = node.agent_log(&agent).unwrap_or_default();
    assert!(
        log.contains("released a sandbox the runtime says is gone"),
        "{log}"
    );

    let fp = node.footprint();
    drop(sink);
    drop(node);
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "left on the host");
}

#[test]
fn adoption_agent_started_before_the_runtime_runs_node_only_then_adopts() {
    testbed::require_root!();
    // The agent (a plain process, as the testbed runs it) is told of a CRI
    // socket that does not exist yet: a symlink that will point at the
    // node's containerd once it runs. (Not named `nfcri-*`: the harness
    // sweeps such dirs of dead processes, killing what names them.)
    let dir = testbed::TempDir::new("nfadopt-early").expect("agent dir");
    let link = dir.path().join("cri.sock");
    let link_arg = link.display().to_string();
    let agent = testbed::Agent::start_with_args(
        dir.path(),
        &["--cri-socket", &link_arg, "--cri-poll-interval", "50ms"],
    )
    .expect("the agent starts without a runtime");
    let client = agent.client();
    // Node-only: it serves, says why CRI is down, and a pod target is 404
    // at once (the on-demand pass fails fast).
    let caps = client
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    assert_eq!(caps["cri"]["enabled"], true, "{caps}");
    assert_eq!(caps["cri"]["connected"], false, "{caps}");
    assert!(
        caps["cri"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cri.sock")),
        "{caps}"
    );
    let t = Instant::now();
    match client.call(
        "POST",
        "/v1/faults",
        Some(&on_pod("nobody", json!({"type": "blackhole"}))),
    ) {
        Err(netfault_api::ClientError::Api { status, .. }) => assert_eq!(status, 404),
        other => panic!("expected 404, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a 404 took {:?}",
        t.elapsed()
    );

    // The runtime comes up (while the agent keeps retrying quietly).
    let node = Node::start().expect("start the node");
    let failed = client
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities")["cri"]["passes"]
        .as_u64()
        .unwrap_or(0);
    assert!(failed >= 3, "only {failed} polls failed so far");
    std::os::unix::fs::symlink(node.layout().containerd_socket(), &link)
        .expect("point the agent's socket path at containerd");
    let pod = node.pod("after", &[]).expect("a pod");
    let peer = node.pod("peer", &[]).expect("a peer");
    let sink = TcpSink::start(&peer, 8080).expect("listener in the peer");
    assert!(
        tcp_connect_time(&pod, sink.addr, Duration::from_secs(2))
            .expect("connect")
            .is_some(),
        "baseline"
    );
    // Targeted by name right away: the unknown name makes the agent ask the
    // runtime now, whatever its backoff.
    let f = agent
        .post_fault(&on_pod("after", json!({"type": "blackhole"})))
        .expect("POST on a pod of the runtime that came up late");
    let f = agent.get_fault(&f).expect("GET the fault");
    assert_eq!(f["sandbox"], pod.id.as_str(), "{f}");
    assert_eq!(
        tcp_connect_time(&pod, sink.addr, Duration::from_millis(500)).expect("connect"),
        None,
        "the blackhole does not act"
    );
    let caps = client
        .call("GET", "/v1/capabilities", None)
        .expect("GET /v1/capabilities");
    assert_eq!(caps["cri"]["connected"], true, "{caps}");
    assert!(caps["cri"]["last_error"].is_null(), "{caps}");

    // Several failed polls, one warning; and one line when it came back.
    let log = std::fs::read_to_string(agent.log_path()).expect("agent log");
    let down = log.matches("container runtime unreachable").count();
    let back = log.matches("the container runtime answers again").count();
    assert_eq!((down, back), (1, 1), "log:\n{log}");

    // Stopped: released by the poll, as for any adopted pod.
    node.stop_sandbox(&pod.id).expect("StopPodSandbox");
    let released = eventually(Duration::from_secs(3), || {
        agent
            .sandboxes()
            .is_ok_and(|l| !l.iter().any(|s| s["id"] == pod.id.as_str()))
    });
    assert!(released, "not released: {:#?}", agent.sandboxes());
    drop(agent);
    drop(sink);
    drop(node);
}
