//! Delay, loss and rate on one pod and one flow at once: each acts, each
//! counts, and removing them leaves the netns as it was.

use std::time::{Duration, Instant};

use serde_json::json;
use testbed::{udp_probe_with, ProbeOptions};

use crate::support::{assert_no_nft_leftovers, delay, loss, proto_port, v4, Cluster, Pristine};

#[test]
fn delay_loss_and_rate_compose() {
    testbed::require_root!();
    // Alone: the delay's p50 is checked within 2 ms (the engine's own
    // accuracy is delay.rs's and the delay bench's; here 2,000 datagrams
    // a second also go through the loss and rate programs).
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

    // Delay: every delivered datagram took ~10 ms more than on an idle veth,
    // none less than 9.5 ms (the fast end: load only makes packets later).
    let p50 = testbed::ms(p.median_latency().expect("datagrams delivered"));
    let fastest = testbed::ms(testbed::quantile(&p.latencies, 0.0).expect("delivered"));
    eprintln!("compose: one-way latency p50 {p50:.3} ms, min {fastest:.3} ms under a 10 ms delay");
    assert!(
        fastest >= 9.5,
        "a datagram arrived early: one-way latency {fastest:.3} ms under a 10 ms delay"
    );
    assert!(
        (9.8..=12.0).contains(&p50),
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

/// A TCP connection from `from` to `to`'s echo on `port` that has echoed
/// 10 bytes which are not HTTP (the proxy relays them raw).
fn echo_binary(from: &testbed::Pod, to: &testbed::Pod, port: u16) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::new(v4(to), port);
    let mut s = crate::support::connect(from, addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let payload = b"\x00\x01binary\xff\xfe";
    s.write_all(payload).expect("write");
    let mut back = [0u8; 10];
    s.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("{} -> {addr}: echo back: {e}", from.name));
    assert_eq!(&back, payload);
    s
}

/// One-way latencies of `p` in ms: (p50, max).
fn p50_max(p: &testbed::UdpProbe) -> (f64, f64) {
    let lat: Vec<f64> = p.latencies.iter().map(|d| testbed::ms(*d)).collect();
    let p50 = testbed::quantile(&lat, 0.5).unwrap_or(f64::NAN);
    (p50, lat.iter().copied().fold(0.0, f64::max))
}

/// Faults on two pods leave a third pair of pods untouched. Pod `a` loses
/// all its egress UDP and delays all its egress TCP by 20 ms; pod `b`
/// duplicates its ingress UDP and diverts its TCP port 7902 to the proxy. Measured on
/// the wire while those act (each is shown acting on a and b): between
/// pods `c` and `d`, on the same ports, every datagram arrives once in each
/// direction with the baseline's latency (p50 within 0.5 ms; under 1% as
/// late as a's 20 ms delay, which a loaded machine's stalls may reach but a
/// leaked delay would exceed for all), and a TCP connection to d's port 7902 is not
/// diverted (the proxy's open-connection gauge counts only b's). c's and
/// d's netns stay exactly as they were, with no nft object at all.
#[test]
fn faults_on_two_pods_leave_a_third_pair_untouched() {
    testbed::require_root!();
    // Alone: the third pair's latency is checked within 0.5 ms.
    let c = Cluster::exclusive(false);
    let [a, b, pc, pd] = c.pods(["a", "b", "c", "d"]);
    let (udp, tcp) = (7901, 7902);
    let probe = |from: &testbed::Pod, to: &testbed::Pod| {
        let opts = ProbeOptions {
            port: udp,
            count: 1000,
            interval: Duration::from_micros(500),
            linger: Duration::from_millis(100),
            payload_len: 64,
        };
        udp_probe_with(from, to, v4(to), &opts).expect("probe")
    };
    let base = [probe(&pc, &pd), probe(&pd, &pc)];
    for p in &base {
        assert_eq!((p.received, p.duplicates()), (p.sent, 0), "baseline");
    }
    let (pristine_c, pristine_d) = (Pristine::of(&pc), Pristine::of(&pd));
    let _echo_b = testbed::tcp_listen(&b, tcp).expect("echo in b");
    let echo_d = testbed::tcp_listen(&pd, tcp).expect("echo in d");

    let udp_all = json!({"protocol": "udp"});
    c.fault_on(&a, "egress", udp_all.clone(), loss(100), "60s");
    c.fault_on(
        &a,
        "egress",
        json!({"protocol": "tcp"}),
        delay("20ms"),
        "60s",
    );
    let dup = json!({"type": "duplicate", "percent": 100});
    c.fault_on(&b, "ingress", udp_all, dup, "60s");
    let abort = json!({"type": "http-abort", "status": 503});
    c.fault_on(&b, "ingress", proto_port("tcp", tcp), abort, "60s");

    // The faults act on a and b.
    let lost = probe(&a, &b);
    assert_eq!(lost.received, 0, "a's egress loss acts");
    let doubled = probe(&pc, &b);
    assert_eq!(
        doubled.duplicates(),
        doubled.sent,
        "b's ingress duplicate acts"
    );
    let gauge = || {
        c.agent
            .metric("netfault_proxy_open_connections")
            .expect("the proxy gauge")
    };
    let t = Instant::now();
    let _to_b = echo_binary(&a, &b, tcp);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(40),
        "a's TCP delay acts: connect and echo in {took:?}"
    );
    assert_eq!(gauge(), 1.0, "the connection to b's port {tcp} is proxied");

    // The third pair.
    let _to_d = echo_binary(&pc, &pd, tcp);
    assert_eq!(echo_d.accepted(), 1);
    assert_eq!(
        gauge(),
        1.0,
        "c -> d:{tcp} must not be diverted to the proxy"
    );
    for (i, (from, to)) in [(&pc, &pd), (&pd, &pc)].into_iter().enumerate() {
        let what = format!("{} -> {}", from.name, to.name);
        let p = probe(from, to);
        let (p50, max) = p50_max(&p);
        let (base_p50, base_max) = p50_max(&base[i]);
        eprintln!(
            "third pair {what}: {}/{} arrived, {} duplicates, one-way p50 {p50:.3} ms max {max:.3} ms (baseline p50 {base_p50:.3} max {base_max:.3})",
            p.received,
            p.sent,
            p.duplicates()
        );
        assert_eq!(
            (p.unique_received(), p.duplicates(), p.send_errors),
            (p.sent, 0, 0),
            "{what}: every datagram once"
        );
        assert!(
            p50 <= base_p50 + 0.5,
            "{what}: latency p50 {p50:.3} ms vs baseline {base_p50:.3} ms"
        );
        let late = p
            .latencies
            .iter()
            .filter(|d| testbed::ms(**d) >= 19.5)
            .count();
        assert!(
            late * 100 < p.latencies.len(),
            "{what}: {late} datagrams took 19.5 ms or more (max {max:.3} ms)"
        );
    }
    pristine_c.assert_unchanged("c, beside faults on a and b");
    pristine_d.assert_unchanged("d, beside faults on a and b");
    for p in [&pc, &pd] {
        assert_no_nft_leftovers(p, &format!("{}, beside faults on a and b", p.name));
    }
}

/// A delay on all of a pod's egress and a proxy fault on one of its ports
/// at once: a proxied connection still carries data, through the proxy
/// (its open-connection gauge counts it) and delayed (b's SYN-ACK and echo
/// leave through the delay: at least 2 x 20 ms). Found by
/// `faults_on_two_pods_leave_a_third_pair_untouched`: the delay table's
/// chains used to queue the proxy's loopback legs to the server in b too,
/// and the echo never came back.
#[test]
fn delay_on_all_egress_and_a_proxied_port_on_one_pod() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let port = 7903;
    let _echo_b = testbed::tcp_listen(&b, port).expect("echo in b");
    let gauge = || {
        c.agent
            .metric("netfault_proxy_open_connections")
            .expect("the proxy gauge")
    };
    let echo = |what: &str| {
        let t = Instant::now();
        let s = echo_binary(&a, &b, port);
        let took = t.elapsed();
        eprintln!("{what}: connect and echo in {took:?}");
        (s, took)
    };
    let (s, _) = echo("no fault");
    drop(s);
    let abort = json!({"type": "http-abort", "status": 503});
    c.fault_on(&b, "ingress", proto_port("tcp", port), abort, "60s");
    let (s, _) = echo("proxy");
    assert_eq!(gauge(), 1.0, "the connection to b's port {port} is proxied");
    drop(s);
    c.fault_on(&b, "egress", json!({}), delay("20ms"), "60s");
    for round in 0..5 {
        let (s, took) = echo("proxy and a delay on all egress");
        assert!(
            took >= Duration::from_millis(40),
            "round {round}: b's egress delay acts on the proxied connection: {took:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        while gauge() != 1.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(gauge(), 1.0, "round {round}: the connection is proxied");
        drop(s);
    }
}
