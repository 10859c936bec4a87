//! Birth-time faults: a pod's annotations, read at CNI ADD through the
//! runtime, affect its very first packets. The pod's container pings a
//! peer pod as soon as it starts; the replies on the wire say what happened.

use e2e_cri::{ping_replies, IcmpTap};

use crate::support::{deployed, ping};

/// `netfault.io/faults` with a 150 ms delay: ping's seq=0 already takes
/// the delay (both directions by default: at least twice), while a pod
/// without the annotation answers at once.
#[test]
fn birth_delay_from_the_faults_annotation_hits_seq_0() {
    testbed::require_root!();
    let (node, _agent) = deployed();
    let peer = node.pod("peer", &[]).expect("peer pod");
    let slow = node
        .pod(
            "slow",
            &[(
                "netfault.io/faults",
                r#"[{"action":{"type":"delay","latency":"150ms"},"duration":"1m"}]"#,
            )],
        )
        .expect("annotated pod");
    let plain = node.pod("plain", &[]).expect("plain pod");

    let slow_log = ping(&node, &slow, "ping", &peer, 3, "0.2");
    let plain_log = ping(&node, &plain, "ping", &peer, 3, "0.2");
    let slow_rtt = ping_replies(&slow_log);
    let plain_rtt = ping_replies(&plain_log);
    eprintln!("delayed pod: {slow_rtt:?}; plain pod: {plain_rtt:?}");
    let first = slow_rtt
        .get(&0)
        .unwrap_or_else(|| panic!("no reply to seq=0:\n{slow_log}"));
    assert!(
        *first >= 295.0,
        "seq=0 took {first} ms; a 150 ms delay both ways makes it >= 300 ms (5 ms allowed for the clocks):\n{slow_log}"
    );
    assert_eq!(slow_rtt.len(), 3, "{slow_log}");
    let plain_first = plain_rtt
        .get(&0)
        .unwrap_or_else(|| panic!("no reply to seq=0:\n{plain_log}"));
    assert!(
        *plain_first < 100.0,
        "the pod without annotations is delayed too ({plain_first} ms):\n{plain_log}"
    );
}

/// The shorthand `netfault.io/loss: "100%"` with `netfault.io/duration:
/// "2s"`: the first pings get no reply, and once the fault expires the
/// rest do.
#[test]
fn birth_loss_shorthand_drops_the_first_packets_until_it_expires() {
    testbed::require_root!();
    let (node, _agent) = deployed();
    let peer = node.pod("peer", &[]).expect("peer pod");
    // The receiver's view: every echo request that reaches the peer pod.
    let tap = IcmpTap::start(&peer).expect("raw ICMP socket in the peer pod");
    let lossy = node
        .pod(
            "lossy",
            &[("netfault.io/loss", "100%"), ("netfault.io/duration", "2s")],
        )
        .expect("annotated pod");
    let log = ping(&node, &lossy, "ping", &peer, 25, "0.2");
    let replies = ping_replies(&log);
    eprintln!("replied seqs: {:?}", replies.keys().collect::<Vec<_>>());
    assert!(
        !replies.contains_key(&0),
        "seq=0 got through a 100% loss:\n{log}"
    );
    let first = *replies
        .keys()
        .next()
        .unwrap_or_else(|| panic!("no reply at all after the fault's 2 s:\n{log}"));
    // 2 s of loss from ADD at one ping per 200 ms: about 10 pings lost,
    // fewer by the container's start time (up to a second or more on a
    // loaded machine), never more than the 2 s allow.
    assert!(
        (2..=14).contains(&first),
        "first reply at seq={first}; a 2 s loss at 5 pings/s loses about 10:\n{log}"
    );
    let after: Vec<u64> = (first..25).filter(|s| !replies.contains_key(s)).collect();
    assert!(
        after.is_empty(),
        "pings lost after the fault expired: {after:?}\n{log}"
    );
    // On the wire at the peer: the first requests never arrived (dropped
    // at the lossy pod's egress), the later ones all did.
    let arrived = tap.seqs_from(lossy.ip().expect("lossy pod IP"));
    eprintln!("echo requests seen by the peer: {arrived:?}");
    let expected: Vec<u16> = (first as u16..25).collect();
    assert_eq!(
        arrived, expected,
        "the peer's view differs from ping's:\n{log}"
    );
}
