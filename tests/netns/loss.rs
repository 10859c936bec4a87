//! Loss and blackhole, measured by the receiver on real traffic between pods
//! wired by the reference bridge plugin and enrolled by netfault.

use std::time::Duration;

use serde_json::json;
use testbed::udp_probe;

use crate::support::{
    assert_binomial_loss, blackhole, ends, loss, proto_port, udp_rcvbuf_errors, v4, v6, Cluster,
    Stack,
};

const PACKETS: u32 = 3000;
const GAP: Duration = Duration::from_micros(100);

/// Loss of 10/50/100 % on one direction of pod `a`. For egress `a` sends; for
/// ingress `a` receives. The sender must see no error: loss on a network is
/// silent. Pods of `stack`.
pub(crate) fn loss_levels(stack: Stack, direction: &str) {
    testbed::require_root!();
    let c = Cluster::on(stack);
    let [a, b] = c.pods(["a", "b"]);
    let (from, to) = ends(direction, &a, &b);
    let ip = stack.ip(to);

    let base = udp_probe(from, to, ip, 7001, PACKETS, GAP).expect("baseline probe");
    assert_eq!(base.send_errors, 0);
    assert_eq!(
        base.received, base.sent,
        "baseline must be lossless for the bounds to mean anything"
    );

    for percent in [10.0, 50.0, 100.0] {
        let id = c.fault_on(&a, direction, json!({}), loss(percent), "60s");
        let overflowed = udp_rcvbuf_errors(to);
        let samples = assert_binomial_loss(
            || udp_probe(from, to, ip, 7001, PACKETS, GAP).expect("probe under loss"),
            percent / 100.0,
            &format!("{} {direction} {percent}%", stack.name()),
        );
        // The agent's counters agree with what the wire showed, less what
        // a starved receiver's full socket buffer dropped.
        let overflowed = udp_rcvbuf_errors(to) - overflowed;
        let lost: u64 = samples.iter().map(|p| p.sent - p.received).sum::<u64>() - overflowed;
        if overflowed > 0 {
            eprintln!("{direction} {percent}%: the receiver's socket buffer overflowed {overflowed} times");
        }
        let f = c.get_fault(&id);
        let dropped = f["counters"]["dropped"].as_u64().expect("dropped counter");
        assert_eq!(
            dropped, lost,
            "{direction} {percent}%: counter vs wire: {f}"
        );
        c.delete_fault(&id);
    }
    let after = udp_probe(from, to, ip, 7001, PACKETS, GAP).expect("probe after removal");
    assert_eq!(
        after.received, after.sent,
        "traffic is whole again after removal"
    );
}

#[test]
fn egress_loss_is_silent_and_binomial() {
    loss_levels(Stack::V4, "egress");
}

#[test]
fn ingress_loss_is_binomial() {
    loss_levels(Stack::V4, "ingress");
}

/// A blackhole on one peer CIDR, or on one port, leaves other peers and ports alone.
#[test]
fn selectors_confine_the_fault() {
    selectors_confine(Stack::V4);
}

/// [`selectors_confine_the_fault`] on pods of `stack`.
pub(crate) fn selectors_confine(stack: Stack) {
    testbed::require_root!();
    let c = Cluster::on(stack);
    let [a, b, d] = c.pods(["a", "b", "d"]);

    let to_b = json!({"cidr": stack.host_cidr(&b)});
    let id = c.fault_on(&a, "egress", to_b, blackhole(), "60s");
    let to_b = udp_probe(&a, &b, stack.ip(&b), 7002, 500, GAP).expect("probe a->b");
    let to_d = udp_probe(&a, &d, stack.ip(&d), 7002, 500, GAP).expect("probe a->d");
    assert_eq!(
        (to_b.received, to_b.send_errors),
        (0, 0),
        "a->b is blackholed silently"
    );
    assert_eq!(to_d.received, to_d.sent, "a->d is untouched");
    c.delete_fault(&id);

    let id = c.fault_on(&a, "both", proto_port("udp", 7003), blackhole(), "60s");
    let hit = udp_probe(&b, &a, stack.ip(&a), 7003, 500, GAP).expect("probe port 7003");
    let miss = udp_probe(&b, &a, stack.ip(&a), 7004, 500, GAP).expect("probe port 7004");
    assert_eq!(hit.received, 0, "port 7003 is blackholed");
    assert_eq!(miss.received, miss.sent, "port 7004 is untouched");
    // A TCP fault on the same port does not touch UDP.
    c.delete_fault(&id);
    let id = c.fault_on(&a, "both", proto_port("tcp", 7003), blackhole(), "60s");
    let udp = udp_probe(&b, &a, stack.ip(&a), 7003, 500, GAP).expect("probe udp 7003");
    assert_eq!(udp.received, udp.sent, "a tcp-only fault leaves udp alone");
    c.delete_fault(&id);
}

/// Dual-stack pod: loss and selectors work on IPv6 as on IPv4, and a v6-only
/// selector leaves v4 alone.
#[test]
fn ipv6_dual_stack() {
    testbed::require_root!();
    let c = Cluster::new(true);
    let [a, b, d] = c.pods(["a", "b", "d"]);

    let base = udp_probe(&a, &b, v6(&b), 7005, 1000, GAP).expect("v6 baseline");
    assert_eq!(base.received, base.sent, "v6 baseline lossless");

    let id = c.fault_on(&a, "egress", json!({}), loss(50), "60s");
    assert_binomial_loss(
        || udp_probe(&a, &b, v6(&b), 7005, PACKETS, GAP).expect("v6 under loss"),
        0.5,
        "v6 egress 50%",
    );
    c.delete_fault(&id);

    let from_b = json!({"cidr": format!("{}/128", v6(&b))});
    let id = c.fault_on(&a, "ingress", from_b, blackhole(), "60s");
    let from_b6 = udp_probe(&b, &a, v6(&a), 7006, 300, GAP).expect("b->a v6");
    let from_b4 = udp_probe(&b, &a, v4(&a), 7006, 300, GAP).expect("b->a v4");
    let from_d6 = udp_probe(&d, &a, v6(&a), 7006, 300, GAP).expect("d->a v6");
    assert_eq!(from_b6.received, 0, "b's v6 address is blackholed");
    assert_eq!(
        from_b4.received, from_b4.sent,
        "b's v4 address is not in the v6 CIDR"
    );
    assert_eq!(from_d6.received, from_d6.sent, "d is another peer");
    c.delete_fault(&id);
}
