//! The harness itself: pods start through CRI with the bridge chain, talk
//! to each other, and nothing of the node is left after it is dropped.

use std::time::Duration;

use e2e_cri::Node;

#[test]
fn node_runs_pods_over_cri_and_leaves_nothing_behind() {
    testbed::require_root!();
    let node = Node::start().expect("start the node");
    let a = node.pod("a", &[]).expect("pod a");
    let b = node.pod("b", &[]).expect("pod b");
    let b_ip = b.ip().expect("b has an IP").to_string();
    assert!(
        b_ip.starts_with(&format!("198.18.{}.", node.subnet())),
        "{b_ip}"
    );
    let c = node
        .run_container(
            &a,
            node.busybox("ping", &["ping", "-c", "3", "-i", "0.2", &b_ip]),
        )
        .expect("start the ping container");
    let code = node
        .wait_exited(&c, Duration::from_secs(10))
        .expect("ping exits");
    let log = node.container_log(&a, "ping").expect("ping's log");
    assert_eq!(code, 0, "ping from a to b failed:\n{log}");
    assert!(log.contains("3 packets received"), "{log}");
    // What the leftovers check looks for exists while the node runs.
    let fp = node.footprint();
    assert_eq!(fp.pod_netns.len(), 2);
    assert!(fp.pod_netns.iter().all(|p| p.exists()));
    let cache = e2e_cri::node_cni_cache(node.network(), &fp.sandbox_ids);
    assert_eq!(
        cache.len(),
        4,
        "bridge and loopback results of 2 pods: {cache:?}"
    );
    for id in &fp.sandbox_ids {
        let sock = e2e_cri::shim_socket(&fp.containerd_socket, id).expect("sha256sum");
        assert!(sock.exists(), "shim socket {} of {id}", sock.display());
    }
    assert!(!e2e_cri::cgroup_dirs(node.cgroup_parent()).is_empty());
    drop(node);
    assert_eq!(fp.leftovers(), Vec::<String>::new(), "left on the host");
}
