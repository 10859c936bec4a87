//! Lifecycle: a pod with faults of every backend stopped and removed
//! through CRI leaves nothing of netfault anywhere; a killed agent stops no
//! pod from starting or talking.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e_cri::{
    http_status, ping_replies, tcp_connect_median, tcp_connect_time, HttpOk, TcpSink,
    AGENT_CONTAINER,
};
use serde_json::json;

use crate::support::{deployed, eventually, on_pod, ping};

/// Files under a dir (relative paths), recursively.
fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, d: &Path, out: &mut BTreeSet<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                out.insert(p.strip_prefix(base).unwrap_or(&p).display().to_string());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn lifecycle_stop_and_remove_with_every_backend_leave_nothing() {
    testbed::require_root!();
    let (node, agent) = deployed();
    let peer = node.pod("peer", &[]).expect("peer pod");
    let sink = TcpSink::start(&peer, 8080).expect("listener in the peer pod");
    let state_before = tree(&node.layout().run_netfault);
    let nft_before = node
        .nft(&["list", "tables"])
        .expect("nft in the node netns");
    let pins_before = e2e_cri::bpffs_netfault();

    let x = node.pod("x", &[]).expect("pod x");
    let x_netns = x.netns.clone().expect("x has a netns");
    let web = HttpOk::start(&peer, 80).expect("HTTP server in the peer pod");
    let t = Duration::from_secs(3);
    assert_eq!(http_status(&x, web.addr, t).expect("GET before"), 200);
    let faults = [
        (
            "ebpf-tc",
            on_pod(
                "x",
                json!({"type": "blackhole"}),
                json!({"match": {"protocol": "icmp"}}),
            ),
        ),
        (
            "nfqueue",
            on_pod(
                "x",
                json!({"type": "delay", "latency": "60ms"}),
                json!({"match": {"protocol": "tcp", "ports": "8080"}}),
            ),
        ),
        (
            "proxy",
            on_pod(
                "x",
                json!({"type": "http-abort", "status": 503}),
                json!({"match": {"protocol": "tcp", "ports": "80"}}),
            ),
        ),
    ];
    for (backend, body) in &faults {
        let f = agent.post_fault(body).expect("POST a fault");
        assert_eq!(f["backend"], *backend, "{f}");
        assert_eq!(f["state"], "active", "{f}");
    }
    // All three active on the wire, and the delay's holder process runs.
    let log = ping(&node, &x, "ping", &peer, 3, "0.2");
    assert!(
        ping_replies(&log).is_empty(),
        "ICMP passed the blackhole:\n{log}"
    );
    let rtt = tcp_connect_median(&x, sink.addr, 3, t).expect("handshakes");
    assert!(
        rtt >= Duration::from_millis(115),
        "the delay is not active: {rtt:?}"
    );
    assert_eq!(http_status(&x, web.addr, t).expect("GET during"), 503);
    // The holder's engine threads, one per sandbox queue it serves (the
    // holder process itself stays, idle).
    let holders = || e2e_cri::holder_engines(&node.pod_processes());
    assert!(
        !holders().is_empty(),
        "no delay holder while a delay is active"
    );

    // StopPodSandbox: CNI DEL, the agent releases everything.
    let t = Instant::now();
    node.stop_sandbox(&x.id).expect("StopPodSandbox");
    eprintln!("StopPodSandbox with 3 faults: {:?}", t.elapsed());
    let gone = eventually(Duration::from_secs(5), || {
        agent
            .sandboxes()
            .is_ok_and(|l| !l.iter().any(|s| s["id"] == x.id.as_str()))
    });
    assert!(gone, "x still enrolled: {:#?}", agent.sandboxes());
    let faults_left: Vec<_> = agent
        .faults()
        .expect("GET /v1/faults")
        .into_iter()
        .filter(|f| f["sandbox"] == x.id.as_str())
        .collect();
    assert!(
        faults_left.is_empty(),
        "x's faults still listed: {faults_left:#?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || holders().is_empty()),
        "delay holders left: {:?}",
        holders()
    );
    assert_eq!(e2e_cri::bpffs_netfault(), pins_before, "bpffs pins left");
    assert_eq!(
        node.nft(&["list", "tables"]).expect("nft"),
        nft_before,
        "nft tables changed in the node netns"
    );
    assert_eq!(
        tree(&node.layout().run_netfault),
        state_before,
        "state dir changed"
    );
    let state =
        std::fs::read_to_string(node.layout().run_netfault.join("state.json")).unwrap_or_default();
    assert!(!state.contains(&x.id), "state.json still names x: {state}");

    // RemovePodSandbox: the netns and the CNI cache entry go too.
    node.remove_sandbox(&x.id).expect("RemovePodSandbox");
    assert!(!x_netns.exists(), "x's netns file is left");
    let cache: Vec<_> = e2e_cri::cni_cache_entries(node.network())
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&x.id))
        .collect();
    assert!(cache.is_empty(), "CNI cache entries left: {cache:?}");
    assert!(agent
        .faults()
        .expect("faults")
        .iter()
        .all(|f| f["sandbox"] != x.id.as_str()));

    let fp = node.footprint();
    drop(sink);
    drop(web);
    drop(node);
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "left on the host");
}

/// The agent container killed (SIGKILL): running pods keep talking (also
/// one whose packets the agent's holder delayed), new pods start (the
/// plugin fails open and leaves a pending enrolment); restarted as the
/// kubelet would, the agent adopts the pending pod and its annotation's
/// fault takes effect.
#[test]
fn lifecycle_agent_killed_pods_keep_starting_and_talking() {
    testbed::require_root!();
    let (node, agent) = deployed();
    let a = node.pod("a", &[]).expect("pod a");
    let b = node.pod("b", &[]).expect("pod b");
    let sink = TcpSink::start(&b, 8080).expect("listener in b");
    let timeout = Duration::from_secs(2);
    tcp_connect_median(&a, sink.addr, 3, timeout).expect("a reaches b with the agent up");
    // a has a delay (its packets sit in a holder process of the agent's).
    agent
        .post_fault(&on_pod(
            "a",
            json!({"type": "delay", "latency": "50ms"}),
            json!({}),
        ))
        .expect("POST a delay on a");
    let delayed = tcp_connect_median(&a, sink.addr, 3, timeout).expect("delayed handshakes");
    assert!(
        delayed >= Duration::from_millis(95),
        "the delay is not active: {delayed:?}"
    );

    // Kill the agent container (StopContainer, timeout 0: SIGKILL).
    let id = agent
        .container_id(AGENT_CONTAINER)
        .expect("agent id")
        .to_string();
    node.stop_container(&id, Duration::ZERO)
        .expect("kill netfaultd");
    node.wait_exited(&id, Duration::from_secs(5))
        .expect("netfaultd exited");
    assert!(agent.healthz().is_err(), "the socket still answers");
    assert!(
        node.conflist_has_netfault(),
        "netfault must still be chained (install-cni runs)"
    );

    // Running pods keep talking; the delayed one too (its holder released
    // what it held and exited; the queue's bypass passes traffic).
    let after =
        tcp_connect_median(&a, sink.addr, 5, timeout).expect("a reaches b with the agent dead");
    eprintln!("a's handshakes: {delayed:?} delayed, {after:?} with the agent dead");
    // New pods start (the plugin fails open) and talk.
    let t = Instant::now();
    let c = node
        .pod("c", &[("netfault.io/loss", "100%")])
        .expect("a pod starts with the agent dead");
    eprintln!("RunPodSandbox with the agent dead: {:?}", t.elapsed());
    assert!(
        tcp_connect_time(&c, sink.addr, timeout)
            .expect("connect")
            .is_some(),
        "the new pod cannot reach b"
    );
    // The enrolment waits for the agent in the pending dir.
    let pending = node
        .layout()
        .run_netfault
        .join("pending")
        .join(format!("{}.json", c.id));
    assert!(
        pending.exists(),
        "no pending enrolment {}",
        pending.display()
    );

    // The kubelet restarts the agent: it adopts the pending enrolment, and
    // c's birth-time loss (100%) takes effect on the wire.
    let mut agent = agent;
    node.restart_container(&mut agent, AGENT_CONTAINER)
        .expect("restart netfaultd");
    node.wait_agent_ready(&agent, Duration::from_secs(30))
        .expect("the restarted agent is ready");
    let adopted = eventually(Duration::from_secs(5), || {
        agent
            .sandboxes()
            .is_ok_and(|l| l.iter().any(|s| s["id"] == c.id.as_str()))
    });
    assert!(
        adopted,
        "c's pending enrolment was not adopted: {:#?}",
        agent.sandboxes()
    );
    assert!(
        tcp_connect_time(&c, sink.addr, Duration::from_millis(500))
            .expect("connect")
            .is_none(),
        "c's 100% loss annotation has no effect after the adoption"
    );
    assert!(
        tcp_connect_time(&a, sink.addr, timeout)
            .expect("connect")
            .is_some(),
        "a lost its connectivity over the agent's restart"
    );
}
