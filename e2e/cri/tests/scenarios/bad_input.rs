//! Bad input: a pod with an invalid annotation starts normally, without a
//! fault, and the error is readable in the sandbox's `annotation_error` and
//! in the agent's container log.

use std::time::Duration;

use e2e_cri::ping_replies;

use crate::support::{deployed, eventually, ping};

#[test]
fn bad_input_invalid_annotation_starts_the_pod_without_faults() {
    testbed::require_root!();
    let (node, agent) = deployed();
    let peer = node.pod("peer", &[]).expect("peer pod");
    let bad = node
        .pod(
            "bad",
            &[
                ("netfault.io/loss", "130%"),
                (
                    "netfault.io/faults",
                    r#"[{"action":{"type":"delay","latency":"300ms"},"duration":"1m"}]"#,
                ),
            ],
        )
        .expect("a pod with an invalid annotation starts");

    // No fault at all: not even the valid delay next to the bad loss.
    let log = ping(&node, &bad, "ping", &peer, 3, "0.2");
    let replies = ping_replies(&log);
    assert_eq!(replies.len(), 3, "pings lost:\n{log}");
    assert!(
        replies.values().all(|rtt| *rtt < 100.0),
        "delayed although the annotations are invalid:\n{log}"
    );
    let faults = agent.faults().expect("GET /v1/faults");
    assert!(
        faults.iter().all(|f| f["sandbox"] != bad.id.as_str()),
        "faults on the pod: {faults:#?}"
    );

    // The error, where a user can read it.
    let sandboxes = agent.sandboxes().expect("GET /v1/sandboxes");
    let entry = sandboxes
        .iter()
        .find(|s| s["id"] == bad.id.as_str())
        .unwrap_or_else(|| panic!("the pod is not enrolled: {sandboxes:#?}"));
    let error = entry["annotation_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no annotation_error: {entry:#}"));
    assert!(error.contains("netfault.io/loss"), "{error}");
    assert!(error.contains("130"), "{error}");
    eprintln!("annotation_error: {error}");
    let logged = eventually(Duration::from_secs(3), || {
        node.agent_log(&agent).is_ok_and(|l| {
            l.lines()
                .any(|l| l.contains(&bad.id) && l.contains("netfault.io/loss"))
        })
    });
    assert!(
        logged,
        "the agent's log has no line naming the sandbox and the annotation:\n{}",
        node.agent_log(&agent).unwrap_or_default()
    );
}
