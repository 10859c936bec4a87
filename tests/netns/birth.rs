//! Birth-time faults: a pod created (CNI ADD) with valid `netfault.io/*`
//! annotations has their faults in place before ADD returns, so its very
//! first packets meet them. Each case sends a stream the moment ADD
//! returns and looks at datagram 0 as well as the whole stream, in both
//! directions (the shorthands' default directions, and the override).
//! The JSON (and YAML) list `netfault.io/faults`, and every shorthand of
//! docs/design.md "Pod annotations": loss, delay, corrupt, duplicate,
//! rate, blackhole, with `netfault.io/direction` and `netfault.io/duration`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{ms, quantile, udp_probe, udp_probe_with, Pod, ProbeOptions, UdpProbe};

use crate::support::{assert_binomial_loss, assert_whole, by_majority, v4, Cluster, MAJORITY_OF};

const GAP: Duration = Duration::from_micros(200);
const COUNT: u32 = 300;

/// Runs CNI ADD of pod `name` with `annotations`; the pod and the moment ADD
/// returned. Asserts the agent took the annotations (no error, the birth
/// faults listed): the wire checks say whether they act.
fn born(c: &Cluster, name: &str, annotations: &[(&str, &str)]) -> (Pod, Instant) {
    let map: BTreeMap<String, String> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let pod = c
        .node
        .add_pod(name, &map)
        .unwrap_or_else(|e| panic!("CNI ADD of {name} with {annotations:?}: {e}"));
    let at = Instant::now();
    (pod, at)
}

/// The sandbox's birth faults (ids); panics when the annotations were
/// refused.
fn birth_faults(c: &Cluster, pod: &Pod) -> Vec<Value> {
    let sb = c
        .agent
        .sandboxes()
        .expect("GET /v1/sandboxes")
        .into_iter()
        .find(|s| s["id"] == pod.container_id.as_str())
        .expect("the pod is enrolled");
    assert!(
        sb["annotation_error"].is_null(),
        "annotations refused: {sb}"
    );
    sb["birth_faults"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|id| c.get_fault(id.as_str().expect("fault id")))
        .collect()
}

/// `COUNT` datagrams from `from` to `to` on `port`, sent from the moment
/// this is called; prints how long after `added` (ADD's return) the first
/// went out.
fn first_packets(from: &Pod, to: &Pod, port: u16, added: Instant, what: &str) -> UdpProbe {
    eprintln!(
        "{what}: the stream starts {:.3} ms after ADD returned",
        ms(added.elapsed())
    );
    udp_probe(from, to, v4(to), port, COUNT, GAP)
        .unwrap_or_else(|e| panic!("{what}: probe {} -> {}: {e}", from.name, to.name))
}

/// How many times datagram `seq` arrived.
fn copies(p: &UdpProbe, seq: u32) -> usize {
    p.received_seqs.iter().filter(|s| **s == seq).count()
}

/// Asserts that nothing of `p` arrived (datagram 0 included), silently.
fn assert_none_arrived(p: &UdpProbe, what: &str) {
    assert_eq!(
        (p.received, p.send_errors),
        (0, 0),
        "{what}: every datagram, the first included, must be dropped silently"
    );
}

/// `netfault.io/faults` as a JSON list and as a YAML list: each item acts
/// from the first packet with its own direction and match, and traffic it
/// does not select is untouched.
#[test]
fn birth_fault_list_acts_from_the_first_packet() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let json_list = json!([
        {"direction": "egress", "match": {"protocol": "udp", "ports": "7801"},
         "action": {"type": "loss", "percent": 100}, "duration": "5m"},
        {"direction": "ingress", "match": {"protocol": "udp", "ports": "7802"},
         "action": {"type": "duplicate", "percent": 100}, "duration": "5m"}
    ])
    .to_string();
    let yaml_list = "- direction: egress\n  match: {protocol: udp, ports: \"7801\"}\n  action: {type: loss, percent: 100}\n  duration: 5m\n- direction: ingress\n  match: {protocol: udp, ports: \"7802\"}\n  action: {type: duplicate, percent: 100}\n  duration: 5m\n";
    for (name, list) in [("json", json_list.as_str()), ("yaml", yaml_list)] {
        let (a, added) = born(&c, name, &[("netfault.io/faults", list)]);
        let what = format!("{name} list");
        let lost = first_packets(&a, &b, 7801, added, &format!("{what}, loss egress 7801"));
        assert_none_arrived(&lost, &format!("{what}: loss 100% on egress udp/7801"));
        let dup = first_packets(
            &b,
            &a,
            7802,
            added,
            &format!("{what}, duplicate ingress 7802"),
        );
        assert_eq!(dup.send_errors, 0);
        assert_eq!(
            copies(&dup, 0),
            2,
            "{what}: datagram 0 to udp/7802 must arrive twice"
        );
        assert_eq!(
            (dup.unique_received(), dup.duplicates()),
            (dup.sent, dup.sent),
            "{what}: duplicate 100% on ingress udp/7802"
        );
        // Not selected: another port, and the other direction of each.
        assert_whole(&a, &b, 7803, &format!("{what}: egress udp/7803"));
        assert_whole(&b, &a, 7801, &format!("{what}: ingress udp/7801"));
        let back = udp_probe(&a, &b, v4(&b), 7802, COUNT, GAP).expect("probe");
        assert_eq!(
            (back.received, back.duplicates()),
            (back.sent, 0),
            "{what}: egress udp/7802 is neither lost nor duplicated"
        );
        let faults = birth_faults(&c, &a);
        assert_eq!(faults.len(), 2, "{what}: {faults:?}");
        assert_eq!(
            faults[0]["counters"]["dropped"], COUNT,
            "{what}: {faults:?}"
        );
        c.node.del_pod(&a).expect("CNI DEL");
    }
}

/// `netfault.io/loss`: "100%" acts on both directions (its default) from
/// the first packet; "50%" with `netfault.io/direction: egress` is a
/// binomial 50% loss on egress only.
#[test]
fn birth_loss_shorthand() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/loss", "100%")]);
    let out = first_packets(&a, &b, 7811, added, "loss 100% egress");
    assert_none_arrived(&out, "loss 100%, egress (default both)");
    let inn = first_packets(&b, &a, 7812, added, "loss 100% ingress");
    assert_none_arrived(&inn, "loss 100%, ingress (default both)");

    let (d, added) = born(
        &c,
        "d",
        &[
            ("netfault.io/loss", "50%"),
            ("netfault.io/direction", "egress"),
        ],
    );
    eprintln!(
        "loss 50% egress: the stream starts {:.3} ms after ADD returned",
        ms(added.elapsed())
    );
    let samples = assert_binomial_loss(
        || udp_probe(&d, &b, v4(&b), 7813, 3000, Duration::from_micros(100)).expect("probe"),
        0.5,
        "birth loss 50% egress",
    );
    assert_whole(&b, &d, 7814, "loss 50% with direction egress: ingress");
    let lost: u64 = samples.iter().map(|p| p.sent - p.received).sum();
    let f = birth_faults(&c, &d);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["counters"]["dropped"], lost, "counter vs wire: {f:?}");
}

/// `netfault.io/delay: "20ms"`: egress (its default) one-way latency of
/// every datagram, datagram 0 included, is 20 ms (none earlier than
/// 19.5 ms, p50 within 20-21 ms); ingress is not delayed.
#[test]
fn birth_delay_shorthand() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/delay", "20ms")]);
    let opts = ProbeOptions {
        port: 7821,
        count: COUNT,
        interval: Duration::from_millis(1),
        linger: Duration::from_millis(200),
        payload_len: 64,
    };
    eprintln!(
        "delay 20ms: the stream starts {:.3} ms after ADD returned",
        ms(added.elapsed())
    );
    // The first stream is the pod's first packets: none may be early (at
    // once). The p50, which a loaded machine moves, is decided by a
    // majority of streams (the later ones on a fresh port each).
    by_majority(
        "birth delay 20ms egress",
        MAJORITY_OF,
        Duration::from_millis(250),
        |i| {
            let port = 7821 + 2 * i as u16;
            let p = udp_probe_with(&a, &b, v4(&b), &ProbeOptions { port, ..opts }).expect("probe");
            assert_eq!(
                (p.received, p.send_errors),
                (p.sent, 0),
                "a delay must not drop"
            );
            let lat: Vec<f64> = p.latencies.iter().map(|d| ms(*d)).collect();
            let first = p
                .received_seqs
                .iter()
                .position(|s| *s == 0)
                .map(|i| lat[i])
                .expect("datagram 0 arrived");
            let (min, p50) = (
                quantile(&lat, 0.0).expect("latencies"),
                quantile(&lat, 0.5).expect("latencies"),
            );
            eprintln!(
            "birth delay 20ms egress, stream {i}: datagram 0 {first:.3} ms, min {min:.3} ms, p50 {p50:.3} ms"
        );
            assert!(
                first >= 19.5 && min >= 19.5,
                "undelayed datagrams: datagram 0 {first:.3} ms, min {min:.3} ms"
            );
            let verdict = if (20.0..=21.0).contains(&p50) {
                Ok(())
            } else {
                Err(format!("p50 {p50:.3} ms"))
            };
            ((), verdict)
        },
    );
    let back = udp_probe_with(&b, &a, v4(&a), &ProbeOptions { port: 7830, ..opts }).expect("probe");
    let back_p50 = ms(back.median_latency().expect("arrived"));
    assert_eq!(back.received, back.sent);
    assert!(
        back_p50 < 1.0,
        "ingress is not delayed by an egress shorthand: p50 {back_p50:.3} ms"
    );
}

/// `netfault.io/corrupt: "100%"`: both directions (its default), from the
/// first packet, no datagram reaches the receiving socket (the receiver's
/// checksum or the corrupted offload state discards them), and the fault
/// counts them.
#[test]
fn birth_corrupt_shorthand() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/corrupt", "100%")]);
    let out = first_packets(&a, &b, 7831, added, "corrupt 100% egress");
    assert_none_arrived(&out, "corrupt 100%, egress (default both)");
    let inn = first_packets(&b, &a, 7832, added, "corrupt 100% ingress");
    assert_none_arrived(&inn, "corrupt 100%, ingress (default both)");
    let f = birth_faults(&c, &a);
    assert_eq!(f.len(), 1, "{f:?}");
    let affected = f[0]["counters"]["affected"].as_u64().unwrap_or(0);
    assert!(
        affected >= 2 * u64::from(COUNT),
        "corrupted {affected}, sent {}: {f:?}",
        2 * COUNT
    );
}

/// `netfault.io/duplicate: "100%"`: both directions (its default), every
/// datagram from the first arrives exactly twice.
#[test]
fn birth_duplicate_shorthand() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/duplicate", "100%")]);
    for (from, to, port, what) in [
        (&a, &b, 7841, "duplicate 100% egress"),
        (&b, &a, 7842, "duplicate 100% ingress"),
    ] {
        let p = first_packets(from, to, port, added, what);
        assert_eq!(p.send_errors, 0);
        assert_eq!(copies(&p, 0), 2, "{what}: datagram 0 arrives twice");
        assert_eq!(
            (p.unique_received(), p.received),
            (p.sent, 2 * p.sent),
            "{what}: every datagram twice"
        );
    }
}

/// `netfault.io/rate: "1mbit"`: egress (its default) is policed from the
/// first packet: of a 9.6 Mbit/s stream of 1200-byte datagrams, the first
/// 100 ms deliver at most the bucket (200 ms at the rate, 25 kB) and 100 ms
/// of rate; over 1 s about 1 Mbit/s + the bucket arrives. Ingress is not
/// limited.
#[test]
fn birth_rate_shorthand() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/rate", "1mbit")]);
    let opts = ProbeOptions {
        port: 7851,
        count: 1000,
        interval: Duration::from_millis(1),
        linger: Duration::from_millis(300),
        payload_len: 1200,
    };
    eprintln!(
        "rate 1mbit: the stream starts {:.3} ms after ADD returned",
        ms(added.elapsed())
    );
    let p = udp_probe_with(&a, &b, v4(&b), &opts).expect("probe");
    assert_eq!(p.send_errors, 0, "policing is silent to the sender");
    // Wire size of a 1200-byte UDP datagram: + 8 UDP + 20 IP + 14 Ethernet.
    let wire = 1242.0;
    let first_100ms = p.received_seqs.iter().filter(|s| **s < 100).count() as f64;
    let allowed_100ms = (25_000.0 + 12_500.0) / wire;
    let expected = (25_000.0 + 125_000.0) / wire;
    eprintln!(
        "birth rate 1mbit: {} of {} datagrams delivered (expected ~{expected:.0}), {first_100ms} of the first 100 (at most {allowed_100ms:.0})",
        p.received, p.sent
    );
    assert!(
        first_100ms <= allowed_100ms + 2.0,
        "the first 100 ms were not policed: {first_100ms} of 100 delivered"
    );
    assert!(
        (p.received as f64 - expected).abs() <= 0.25 * expected,
        "delivered {} datagrams in 1 s through 1 Mbit/s, expected {expected:.0} ± 25%",
        p.received
    );
    let back = udp_probe_with(&b, &a, v4(&a), &ProbeOptions { port: 7852, ..opts }).expect("probe");
    assert_eq!(back.received, back.sent, "ingress is not limited");
}

/// `netfault.io/blackhole: "true"`: both directions (its default) from the
/// first packet. With `netfault.io/direction: ingress` and
/// `netfault.io/duration: "2s"`: only ingress, and only for 2 s after ADD.
#[test]
fn birth_blackhole_shorthand_direction_and_duration() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let b = c.pod("b");
    let (a, added) = born(&c, "a", &[("netfault.io/blackhole", "true")]);
    let out = first_packets(&a, &b, 7861, added, "blackhole egress");
    assert_none_arrived(&out, "blackhole, egress (default both)");
    let inn = first_packets(&b, &a, 7862, added, "blackhole ingress");
    assert_none_arrived(&inn, "blackhole, ingress (default both)");

    let before = Instant::now();
    let (d, added) = born(
        &c,
        "d",
        &[
            ("netfault.io/blackhole", "true"),
            ("netfault.io/direction", "ingress"),
            ("netfault.io/duration", "2s"),
        ],
    );
    let inn = first_packets(&b, &d, 7863, added, "blackhole ingress for 2s");
    assert!(
        before.elapsed() < Duration::from_millis(1800),
        "the probe ended too late to be inside the 2 s"
    );
    assert_none_arrived(&inn, "blackhole with direction ingress");
    assert_whole(&d, &b, 7864, "blackhole with direction ingress: egress");
    // The deadline counts from the enrolment: 2 s after ADD began.
    if let Some(w) = (before + Duration::from_millis(2300)).checked_duration_since(Instant::now()) {
        std::thread::sleep(w);
    }
    assert_whole(&b, &d, 7865, "blackhole with duration 2s, after 2.3 s");
}
