//! The packaging itself: the image built by daemonset/build-image.sh, the
//! DaemonSet's own pod spec run through CRI, install-cni chaining netfault
//! in and out, the agent healthy by the manifest's probe and its socket.

use std::time::{Duration, Instant};

use e2e_cri::{Node, Probe, AGENT_CONTAINER, INSTALL_CNI_CONTAINER};
use serde_json::Value;

use crate::support::{cap_eff_and_nnp, environ, root_is_readonly};

// Capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u64 = 12;
const CAP_NET_RAW: u64 = 13;
const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

#[test]
fn packaging_daemonset_installs_serves_and_uninstalls() {
    testbed::require_root!();
    let node = Node::start().expect("start the node");
    let original = std::fs::read(node.conflist_path()).expect("the pod conflist");
    let original_json: Value = serde_json::from_slice(&original).expect("conflist JSON");
    let plugin = node.layout().cni_bin.join("netfault");
    assert!(!plugin.exists());

    let t = Instant::now();
    let agent = node.deploy_daemonset().expect("deploy the DaemonSet");
    eprintln!("DaemonSet pod ready in {:?}", t.elapsed());

    // install-cni: netfault appended as the last plugin, pointing at the
    // agent's socket as the host sees it; the primary's entries untouched.
    let conf: Value =
        serde_json::from_slice(&std::fs::read(node.conflist_path()).expect("conflist"))
            .expect("conflist stays JSON");
    let plugins = conf["plugins"].as_array().expect("plugins");
    let before = original_json["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), before.len() + 1, "{conf:#}");
    assert_eq!(
        &plugins[..before.len()],
        &before[..],
        "the primary's entries changed"
    );
    let entry = plugins.last().expect("last plugin");
    assert_eq!(entry["type"], "netfault", "{conf:#}");
    assert_eq!(
        entry["socket"].as_str(),
        Some(agent.socket.to_string_lossy().as_ref()),
        "the entry's socket must be the host path of the agent's socket"
    );
    assert_eq!(
        entry["capabilities"]["io.kubernetes.cri.pod-annotations"],
        true
    );
    assert!(plugin.exists(), "install-cni copied no plugin binary");

    // The agent is healthy by the manifest's own probes (ExecSync) and by
    // its socket.
    for which in [Probe::Readiness, Probe::Liveness] {
        let r = node
            .probe(&agent, AGENT_CONTAINER, which)
            .expect("exec probe");
        assert_eq!(r.exit_code, 0, "{which:?} probe: {r:?}");
    }
    assert_eq!(agent.healthz().expect("/healthz"), 200);

    // The security context and env as the kubelet would set them.
    let agent_pid = node
        .container_pid(agent.container_id(AGENT_CONTAINER).expect("id"))
        .expect("agent pid");
    let (caps, nnp) = cap_eff_and_nnp(agent_pid);
    let want = [
        CAP_NET_ADMIN,
        CAP_NET_RAW,
        CAP_SYS_ADMIN,
        CAP_PERFMON,
        CAP_BPF,
    ]
    .iter()
    .fold(0u64, |m, c| m | (1 << c));
    assert_eq!(caps, want, "netfaultd's effective capabilities {caps:#x}");
    assert_eq!(nnp, 1, "allowPrivilegeEscalation: false sets no_new_privs");
    assert!(root_is_readonly(agent_pid), "readOnlyRootFilesystem");
    let env = environ(agent_pid);
    assert!(
        env.contains(&format!("NODE_NAME={}", node.name())),
        "NODE_NAME from the downward API: {env:?}"
    );
    let icni_pid = node
        .container_pid(agent.container_id(INSTALL_CNI_CONTAINER).expect("id"))
        .expect("install-cni pid");
    assert_eq!(
        cap_eff_and_nnp(icni_pid),
        (0, 1),
        "install-cni: no capabilities"
    );
    assert!(root_is_readonly(icni_pid));
    // hostNetwork: the agent shares the node netns.
    let ino = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.ino()).expect("netns inode")
    };
    assert_eq!(
        ino(&format!("/proc/{agent_pid}/ns/net")),
        ino(&node.netns().path().to_string_lossy()),
        "hostNetwork: the agent runs in the node netns"
    );

    // The chain the runtime runs now has netfault: a new pod is enrolled.
    let pod = node.pod("web", &[]).expect("a pod starts");
    let enrolled = agent.sandboxes().expect("GET /v1/sandboxes");
    assert!(
        enrolled.iter().any(|s| s["id"] == pod.id.as_str()),
        "the pod was not enrolled through the chain: {enrolled:#?}"
    );

    // Delete the DaemonSet pod as the kubelet does (SIGTERM, grace period):
    // install-cni restores the conflist and removes the binary.
    let t = Instant::now();
    node.stop_agent(&agent).expect("stop the DaemonSet pod");
    let stopped = t.elapsed();
    eprintln!("DaemonSet pod stopped in {stopped:?}");
    assert!(
        stopped < Duration::from_secs(10),
        "the pod took {stopped:?} to stop: SIGTERM ignored until the grace period?"
    );
    let restored: Value =
        serde_json::from_slice(&std::fs::read(node.conflist_path()).expect("conflist"))
            .expect("conflist JSON");
    assert_eq!(restored, original_json, "the conflist is not restored");
    assert!(
        !plugin.exists(),
        "the plugin binary is still in the CNI bin dir"
    );
    let icni_log = node
        .container_log(&agent.sandbox, INSTALL_CNI_CONTAINER)
        .unwrap_or_default();
    eprintln!("install-cni log:\n{icni_log}");

    let fp = node.footprint();
    drop(node);
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "left on the host");
}

/// The primary CNI rewrites its conflist (atomically, as they do) while the
/// DaemonSet runs: install-cni chains netfault in again, and containerd
/// runs the new chain for the next pod.
#[test]
fn packaging_conflist_rewritten_by_the_primary_is_chained_again() {
    testbed::require_root!();
    let node = Node::start().expect("start the node");
    let original = std::fs::read(node.conflist_path()).expect("the pod conflist");
    let agent = node.deploy_daemonset().expect("deploy the DaemonSet");
    let before = node.pod("before", &[]).expect("a pod");

    // The primary's rewrite: its own config, without netfault, renamed over
    // the file from a temp file in the same dir.
    let tmp = node.layout().cni_conf.join(".10-pods.conflist.tmp");
    std::fs::write(&tmp, &original).expect("write the primary's temp file");
    std::fs::rename(&tmp, node.conflist_path()).expect("rename over the conflist");
    let t = Instant::now();
    assert!(
        crate::support::eventually(Duration::from_secs(10), || node.conflist_has_netfault()),
        "install-cni did not chain netfault in again"
    );
    eprintln!("re-chained {:?} after the primary's rewrite", t.elapsed());

    let after = node.pod("after", &[]).expect("a pod after the rewrite");
    let enrolled = agent.sandboxes().expect("GET /v1/sandboxes");
    for pod in [&before, &after] {
        assert!(
            enrolled.iter().any(|s| s["id"] == pod.id.as_str()),
            "{} not enrolled: {enrolled:#?}",
            pod.name
        );
    }
}
