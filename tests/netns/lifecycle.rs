//! Fault lifecycle: deadlines enforced by the kernel with the agent dead,
//! faults surviving an agent restart, and nothing left behind after removal
//! or CNI DEL.

use std::time::{Duration, Instant};

use serde_json::json;
use testbed::udp_probe;

use crate::support::{
    assert_no_nft_leftovers, blackhole, bpffs_pins, loss, pod_state, proto_port, timed_stream, v4,
    Cluster, Pristine, Stack,
};

const GAP: Duration = Duration::from_micros(200);

/// A 3 s blackhole ends on time although the agent was SIGKILLed right after
/// creating it: the program checks the deadline itself.
#[test]
fn deadline_holds_with_agent_killed() {
    deadline_holds_without_agent(Stack::V4);
}

/// [`deadline_holds_with_agent_killed`] on pods of `stack`.
pub(crate) fn deadline_holds_without_agent(stack: Stack) {
    testbed::require_root!();
    let mut c = Cluster::on(stack);
    let [a, b] = c.pods(["a", "b"]);
    let ip = stack.ip(&b);

    let before = Instant::now();
    c.fault_on(&a, "egress", json!({}), blackhole(), "3s");
    let created = Instant::now();
    c.agent.kill().expect("SIGKILL the agent");

    // Still blackholed well inside the window.
    let during = udp_probe(&a, &b, ip, 7101, 200, GAP).expect("probe during");
    assert!(
        created.elapsed() < Duration::from_millis(2500),
        "probe took too long to be meaningful"
    );
    assert_eq!(
        during.received, 0,
        "the fault stopped early without its agent"
    );

    // Send a timestamped stream across the deadline and find where it ends.
    let deadline_lo = before + Duration::from_secs(3);
    let deadline_hi = created + Duration::from_secs(3);
    let stream = timed_stream(
        &a,
        &b,
        ip,
        7102,
        deadline_hi + Duration::from_millis(700),
        Duration::from_millis(2),
    );
    let first = stream
        .first_received_sent_at()
        .expect("traffic resumed after the deadline");
    assert!(
        first + Duration::from_millis(3) >= deadline_lo,
        "traffic resumed {:?} before the deadline",
        deadline_lo - first
    );
    assert!(
        first <= deadline_hi + Duration::from_millis(50),
        "traffic resumed {:?} after the deadline",
        first - deadline_hi
    );
    let tail_lost = stream.lost_after(first);
    assert_eq!(tail_lost, 0, "packets after the deadline were lost");
}

/// After a restart (SIGTERM, then a new netfaultd on the same state dir)
/// the fault is still listed, still active on the wire, and removable.
#[test]
fn faults_survive_agent_restart() {
    faults_survive_restart(Stack::V4);
}

/// [`faults_survive_agent_restart`] on pods of `stack`.
pub(crate) fn faults_survive_restart(stack: Stack) {
    testbed::require_root!();
    let mut c = Cluster::on(stack);
    let [a, b] = c.pods(["a", "b"]);
    let ip = stack.ip(&b);
    let id = c.fault_on(&a, "egress", json!({"protocol": "udp"}), loss(100), "120s");

    c.agent.restart().expect("agent restarts");
    let listed = c.get_fault(&id);
    assert_eq!(listed["state"], "active", "fault after restart: {listed}");
    let sandboxes = c.agent.sandboxes().expect("list sandboxes");
    assert_eq!(sandboxes.len(), 2, "both pods still enrolled");

    let p = udp_probe(&a, &b, ip, 7103, 300, GAP).expect("probe after restart");
    assert_eq!(p.received, 0, "the fault stopped across the restart");
    let dropped = c.counter(&id, "dropped");
    assert!(dropped >= 300, "the new agent counts {dropped} drops");

    c.delete_fault(&id);
    let p = udp_probe(&a, &b, ip, 7103, 300, GAP).expect("probe after delete");
    assert_eq!(
        p.received, p.sent,
        "traffic flows after the restarted agent removed the fault"
    );
}

/// Removing the last fault restores the pod's netns exactly; CNI DEL releases
/// the sandbox and leaves nothing of ours behind.
#[test]
fn no_leftovers_after_removal_expiry_and_del() {
    testbed::require_root!();
    let c = Cluster::new(true);
    let [a, b] = c.pods(["a", "b"]);
    let pristine = Pristine::of(&a);
    let state = &pristine.state;
    assert!(
        state.filters.is_empty() && state.tcx.is_empty(),
        "{state:?}"
    );

    // Two composed faults, then removal.
    let f1 = c.fault_on(&a, "egress", json!({}), loss(30), "60s");
    let f2 = c.fault_on(&a, "ingress", proto_port("udp", 9), blackhole(), "60s");
    let active = pod_state(&a);
    assert_eq!(
        active.filters.len(),
        2,
        "egress and ingress filters while active: {active:?}"
    );
    c.delete_fault(&f1);
    c.delete_fault(&f2);
    pristine.assert_unchanged("removal restores the netns exactly");
    assert!(bpffs_pins().is_empty(), "bpffs pins: {:?}", bpffs_pins());

    // Expiry also restores it (the agent reaps within its tick).
    c.fault_on(&a, "both", json!({}), loss(5), "500ms");
    std::thread::sleep(Duration::from_millis(1500));
    pristine.assert_unchanged("expiry restores the netns exactly");
    let p = udp_probe(&a, &b, v4(&b), 7104, 300, GAP).expect("probe after expiry");
    assert_eq!(p.received, p.sent);

    // CNI DEL with an active fault: the agent releases everything first.
    let f3 = c.fault_on(&a, "egress", json!({}), blackhole(), "60s");
    c.node.del_pod(&a).expect("CNI DEL");
    assert!(!c.has_fault(&f3), "fault still listed after DEL");
    assert!(!c.enrolled(&a), "sandbox still enrolled after DEL");
    assert_no_nft_leftovers(&a, "the pod netns after DEL");
    assert!(bpffs_pins().is_empty());
}
