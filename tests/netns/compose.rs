//! Delay, loss and rate on one pod and one flow at once: each acts, each
//! counts, and removing them leaves the netns as it was.

use std::time::Duration;

use serde_json::json;
use testbed::{udp_probe_with, ProbeOptions};

use crate::support::{delay, loss, proto_port, v4, Cluster, Pristine};

#[test]
fn delay_loss_and_rate_compose() {
    testbed::require_root!();
    // Alone: the delay's p50 is checked within 1 ms.
    let c = Cluster::exclusive(false);
    let [a, b] = c.pods(["a", "b"]);
    let pristine = Pristine::of(&a);
    let sel = proto_port("udp", 7501);
    let rate = json!({"type": "rate", "rate": "8mbit", "burst": "32kb"});
    let delay = c.fault_on(&a, "egress", sel.clone(), delay("10ms"), "60s");
    let loss = c.fault_on(&a, "egress", sel.clone(), loss(10), "60s");
    let rate = c.fault_on(&a, "egress", sel, rate, "60s");

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
    let p50 = testbed::ms(p.median_latency().expect("datagrams delivered"));
    assert!(
        (9.8..=11.0).contains(&p50),
        "one-way latency p50 {p50:.3} ms under a 10 ms delay"
    );

    // Loss and rate each dropped, and together they account for every lost datagram.
    let (by_loss, by_rate) = (c.counter(&loss, "dropped"), c.counter(&rate, "dropped"));
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
    let delayed = c.counter(&delay, "affected");
    assert_eq!(delayed, p.sent, "every datagram was delayed");

    for id in [&delay, &loss, &rate] {
        c.delete_fault(id);
    }
    pristine.assert_unchanged("no leftovers");
    let after =
        udp_probe_with(&a, &b, v4(&b), &ProbeOptions { count: 500, ..opts }).expect("probe after");
    assert_eq!(after.received, after.sent, "traffic whole again");
}
