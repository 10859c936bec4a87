//! Delay, loss and rate on one pod and one flow at once: each acts, each
//! counts, and removing them leaves the netns as it was.

use std::time::Duration;

use serde_json::json;
use testbed::{udp_probe_with, ProbeOptions};

use crate::support::{fault_on, netns_state, v4, Cluster};

#[test]
fn delay_loss_and_rate_compose() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let a = c.pod("a");
    let b = c.pod("b");
    let pristine = netns_state(a.netns.path(), "eth0");
    let sel = json!({"protocol": "udp", "ports": "7501"});
    let delay = c.fault(fault_on(
        &a,
        "egress",
        sel.clone(),
        json!({"type": "delay", "latency": "10ms"}),
        "60s",
    ));
    let loss = c.fault(fault_on(
        &a,
        "egress",
        sel.clone(),
        json!({"type": "loss", "percent": 10}),
        "60s",
    ));
    let rate = c.fault(fault_on(
        &a,
        "egress",
        sel,
        json!({"type": "rate", "rate": "8mbit", "burst": "32kb"}),
        "60s",
    ));

    // 19.2 Mbit/s offered for 2 s: the 8 Mbit/s limit must bind.
    let opts = ProbeOptions {
        port: 7501,
        count: 4000,
        interval: Duration::from_micros(500),
        linger: Duration::from_millis(300),
        payload_len: 1200,
    };
    let p = udp_probe_with(&a, &b, v4(&b), &opts).expect("probe");
    assert_eq!(
        p.send_errors, 0,
        "drops by loss and rate are silent to the sender"
    );

    // Rate: bits delivered over the 2 s of sending (the 32 KiB burst adds ~1.6%).
    let mbit = p.received as f64 * 1200.0 * 8.0 / 2.0 / 1e6;
    assert!(
        (mbit - 8.0).abs() <= 8.0 * 0.15,
        "delivered {mbit:.2} Mbit/s through an 8 Mbit/s limit"
    );

    // Delay: every delivered datagram took ~10 ms more than on an idle veth.
    let mut lat = p.latencies.clone();
    lat.sort();
    let p50 = lat[lat.len() / 2].as_secs_f64() * 1e3;
    assert!(
        (9.8..=11.0).contains(&p50),
        "one-way latency p50 {p50:.3} ms under a 10 ms delay"
    );

    // Loss and rate each dropped, and together they account for every lost datagram.
    let dropped = |id: &str| c.get_fault(id)["counters"]["dropped"].as_u64().unwrap_or(0);
    let (by_loss, by_rate) = (dropped(&loss), dropped(&rate));
    let lost = p.sent - p.received;
    assert!(
        by_loss > 0 && by_rate > 0,
        "loss dropped {by_loss}, rate dropped {by_rate}"
    );
    assert_eq!(by_loss + by_rate, lost, "counters vs wire");
    // Loss sees every delayed datagram first: ~10% of 4000 (3σ ≈ 57).
    assert!(
        (by_loss as f64 - 400.0).abs() <= 60.0,
        "loss dropped {by_loss} of 4000"
    );
    let delayed = c.get_fault(&delay)["counters"]["affected"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(delayed, p.sent, "every datagram was delayed");

    for id in [&delay, &loss, &rate] {
        c.delete_fault(id);
    }
    assert_eq!(
        netns_state(a.netns.path(), "eth0"),
        pristine,
        "no leftovers"
    );
    let after =
        udp_probe_with(&a, &b, v4(&b), &ProbeOptions { count: 500, ..opts }).expect("probe after");
    assert_eq!(after.received, after.sent, "traffic whole again");
}
