//! Shared pieces of the scenarios.

use std::time::Duration;

use e2e_cri::{AgentPod, Node, Sandbox};
use serde_json::{json, Value};

/// A node with the DaemonSet deployed and ready.
pub fn deployed() -> (Node, AgentPod) {
    let node = Node::start().expect("start the node");
    let agent = node.deploy_daemonset().expect("deploy the DaemonSet");
    (node, agent)
}

/// A fault on a pod by name (namespace `default`).
pub fn on_pod(name: &str, action: Value, extra: Value) -> Value {
    let mut f = json!({
        "target": {"pod": {"namespace": "default", "name": name}},
        "action": action,
        "duration": "1m",
    });
    if let (Some(f), Some(extra)) = (f.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            f.insert(k.clone(), v.clone());
        }
    }
    f
}

/// Runs `ping -c COUNT -i INTERVAL PEER` in a container of `pod` and
/// returns its output once it has exited.
pub fn ping(
    node: &Node,
    pod: &Sandbox,
    name: &str,
    peer: &Sandbox,
    count: u32,
    interval: &str,
) -> String {
    let peer_ip = peer.ip().expect("peer IP").to_string();
    let count = count.to_string();
    let c = node
        .run_container(
            pod,
            node.busybox(
                name,
                &["ping", "-c", &count, "-i", interval, "-W", "1", &peer_ip],
            ),
        )
        .expect("start the ping container");
    node.wait_exited(&c, Duration::from_secs(30))
        .expect("ping exits");
    node.container_log(pod, name).expect("ping's log")
}

pub use testbed::eventually;

/// The effective capability mask and NoNewPrivs of a process.
pub fn cap_eff_and_nnp(pid: u32) -> (u64, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    (
        u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff"),
        field("NoNewPrivs:").parse().expect("NoNewPrivs"),
    )
}

/// The environment of a process.
pub fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .expect("proc environ")
        .split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect()
}

/// Whether a process's root filesystem is mounted read-only.
pub fn root_is_readonly(pid: u32) -> bool {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("proc mountinfo");
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some("/"))
        .is_some_and(|l| {
            l.split(' ')
                .nth(5)
                .is_some_and(|o| o.split(',').any(|x| x == "ro"))
        })
}
