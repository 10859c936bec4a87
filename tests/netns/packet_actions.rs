//! eBPF packet actions beyond loss: corrupt, duplicate, rate, Gilbert-Elliott
//! loss, and their composition. Every effect is measured by the receiver.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{udp_probe, Pod, UdpProbe};

use crate::support::{
    assert_binomial_loss, by_majority, ends, loss, proto_port, tcp_pair, udp_bind,
    udp_rcvbuf_errors, v4, v6, Cluster, Repeat, Stack, MAJORITY_OF,
};

const PACKETS: u32 = 3000;
const GAP: Duration = Duration::from_micros(100);

/// Sends `percent` of the packets twice.
fn duplicate(percent: u32) -> Value {
    json!({"type": "duplicate", "percent": percent})
}

/// FNV-1a 64. Any single flipped bit changes it: each step (xor, multiply by
/// an odd number modulo 2^64) is a bijection of the state.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `UDP InCsumErrors` of the calling thread's netns.
fn udp_csum_errors(proc_file: &str, key: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/thread-self/net/{proc_file}"))
        .expect("read snmp counters");
    if proc_file == "snmp" {
        // "Udp: InDatagrams ... InCsumErrors ..." header line, then values.
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("Udp:")).collect();
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let i = names.iter().position(|n| *n == key).expect("snmp key");
        values[i].parse().expect("snmp value")
    } else {
        text.lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(key)).then(|| it.next().map(|v| v.parse().expect("snmp6")))
            })
            .flatten()
            .expect("snmp6 key")
    }
}

fn csum_errors_in(pod: &Pod, v6: bool) -> u64 {
    testbed::in_netns(pod.netns.path(), move || {
        if v6 {
            udp_csum_errors("snmp6", "Udp6InCsumErrors")
        } else {
            udp_csum_errors("snmp", "InCsumErrors")
        }
    })
    .expect("enter netns")
}

/// What the corrupt probe saw: the usual counts, plus datagrams whose
/// payload failed the application's own check (corruption that got through).
struct CheckedProbe {
    probe: UdpProbe,
    bad_payload: u64,
}

/// Sends `count` datagrams of 512 bytes (sequence, random filler, FNV of the
/// rest) from `from` to `to_ip:port`. With `sw_csum` every datagram is sent
/// corked (UDP_CORK), so the kernel computes the UDP checksum in software
/// and the skb is not CHECKSUM_PARTIAL: the receiver then really verifies it.
fn checked_probe(from: &Pod, to: &Pod, to_ip: IpAddr, port: u16, sw_csum: bool) -> CheckedProbe {
    let any = testbed::unspecified(to_ip);
    let rx = udp_bind(to, SocketAddr::new(any, port));
    let tx = udp_bind(from, SocketAddr::new(any, 0));
    rx.set_read_timeout(Some(Duration::from_millis(20)))
        .expect("SO_RCVTIMEO");
    let dest = SocketAddr::new(to_ip, port);
    let set_cork = |on: libc::c_int| {
        // SAFETY: setsockopt on a socket we own with a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::IPPROTO_UDP,
                libc::UDP_CORK,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "UDP_CORK: {}", std::io::Error::last_os_error());
    };
    let receiver = Repeat::spawn((Vec::new(), 0u64), move |(seqs, bad)| {
        let mut buf = [0u8; 2048];
        let Ok(n) = rx.recv(&mut buf) else { return };
        let ok = n == 512 && {
            let mut h = [0u8; 8];
            h.copy_from_slice(&buf[504..512]);
            fnv(&buf[..504]) == u64::from_be_bytes(h)
        };
        if ok {
            seqs.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
        } else {
            *bad += 1;
        }
    });
    let mut probe = UdpProbe::default();
    let start = Instant::now();
    let mut pkt = [0u8; 512];
    for seq in 0..PACKETS {
        if let Some(w) = (GAP * seq).checked_sub(start.elapsed()) {
            std::thread::sleep(w);
        }
        pkt[..4].copy_from_slice(&seq.to_be_bytes());
        rand::fill(&mut pkt[4..504]);
        let h = fnv(&pkt[..504]);
        pkt[504..].copy_from_slice(&h.to_be_bytes());
        probe.sent += 1;
        if sw_csum {
            set_cork(1);
        }
        if tx.send_to(&pkt, dest).is_err() {
            probe.send_errors += 1;
        }
        if sw_csum {
            set_cork(0);
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let (seqs, bad) = receiver.finish();
    probe.received = seqs.len() as u64;
    probe.received_seqs = seqs;
    CheckedProbe {
        probe,
        bad_payload: bad,
    }
}

/// corrupt 40%: the receiver gets ~60% (3σ binomial), and no datagram reaches
/// the application with a payload that fails its own check. Covered: both
/// directions, IPv4 and IPv6, checksums offloaded (CHECKSUM_PARTIAL, what
/// every veth socket send is) and computed in software (corked sends, where
/// the bit is really flipped and the receiver's UDP checksum must catch it:
/// its InCsumErrors rises by the number lost).
#[test]
fn corrupt_is_discarded_by_the_receiver() {
    testbed::require_root!();
    corrupt_discarded(
        &Cluster::new(true),
        &[
            ("egress", false, false),
            ("egress", true, true),
            ("ingress", false, true),
            ("ingress", true, false),
        ],
    );
}

/// The corrupt check of [`corrupt_is_discarded_by_the_receiver`] on pods
/// of `c`, for each (direction, over IPv6, checksum in software) case.
pub(crate) fn corrupt_discarded(c: &Cluster, cases: &[(&str, bool, bool)]) {
    let [a, b] = c.pods(["a", "b"]);
    for (i, &(direction, ipv6, sw_csum)) in cases.iter().enumerate() {
        let (from, to) = ends(direction, &a, &b);
        let ip = if ipv6 { v6(to) } else { v4(to) };
        let port = 7301 + i as u16;
        let what = format!(
            "corrupt 40% {direction} {} {}",
            if ipv6 { "v6" } else { "v4" },
            if sw_csum {
                "sw checksum"
            } else {
                "offloaded checksum"
            }
        );
        // A baseline that lost datagrams met a stalled VM (steal time), not
        // a fault: decided by a majority of fresh baselines. A payload that
        // fails its check without a fault fails at once.
        by_majority(
            &format!("{what}: baseline"),
            MAJORITY_OF,
            Duration::from_secs(1),
            |_| {
                let base = checked_probe(from, to, ip, port, sw_csum);
                assert_eq!(base.bad_payload, 0, "{what}: bad payloads without a fault");
                let lost = base.probe.sent - base.probe.received;
                let verdict = if lost == 0 {
                    Ok(())
                } else {
                    Err(format!("baseline lost {lost} of {}", base.probe.sent))
                };
                ((), verdict)
            },
        );
        let corrupt = json!({"type": "corrupt", "percent": 40});
        let id = c.fault_on(&a, direction, proto_port("udp", port), corrupt, "60s");
        let mut bad = 0;
        let csum_before = csum_errors_in(to, ipv6);
        let overflowed = udp_rcvbuf_errors(to);
        let samples = assert_binomial_loss(
            || {
                let p = checked_probe(from, to, ip, port, sw_csum);
                bad += p.bad_payload;
                p.probe
            },
            0.4,
            &what,
        );
        let csum_errors = csum_errors_in(to, ipv6) - csum_before;
        // What a starved receiver's full socket buffer dropped is not the
        // fault's.
        let overflowed = udp_rcvbuf_errors(to) - overflowed;
        let lost: u64 = samples.iter().map(|p| p.sent - p.received).sum::<u64>() - overflowed;
        let sent: u64 = samples.iter().map(|p| p.sent).sum();
        eprintln!(
            "{what}: {lost}/{sent} discarded ({:.1}%), {bad} undetected, receiver checksum errors {csum_errors}, receive-buffer overflows {overflowed}",
            100.0 * lost as f64 / sent as f64
        );
        assert_eq!(bad, 0, "{what}: corrupted payloads reached the application");
        assert_eq!(
            c.counter(&id, "affected"),
            lost,
            "{what}: affected counts the corrupted packets"
        );
        if sw_csum {
            // The receiver's UDP checksum check discarded them, except when
            // the flipped bit is in the UDP length field (16 of 4160 bits,
            // 0.4%): such a datagram is dropped as malformed first.
            assert!(
                csum_errors <= lost && csum_errors as f64 >= 0.97 * lost as f64,
                "{what}: receiver checksum errors {csum_errors}, lost {lost}"
            );
        }
        c.delete_fault(&id);
    }
}

/// duplicate 50%: ~50% of the datagrams arrive twice (3σ), none is lost.
#[test]
fn duplicate_half_of_the_packets() {
    testbed::require_root!();
    duplicate_half(&Cluster::new(true), &[("egress", false), ("ingress", true)]);
}

/// [`duplicate_half_of_the_packets`] on pods of `c`, for each (direction,
/// over IPv6) case.
pub(crate) fn duplicate_half(c: &Cluster, cases: &[(&str, bool)]) {
    let [a, b] = c.pods(["a", "b"]);
    for (i, &(direction, ipv6)) in cases.iter().enumerate() {
        let (from, to) = ends(direction, &a, &b);
        let ip = if ipv6 { v6(to) } else { v4(to) };
        let port = 7311 + i as u16;
        let id = c.fault_on(&a, direction, json!({}), duplicate(50), "60s");
        let p = udp_probe(from, to, ip, port, PACKETS, GAP).expect("probe");
        let what = format!("duplicate 50% {direction} v{}", if ipv6 { 6 } else { 4 });
        eprintln!(
            "{what}: {} duplicates of {} sent ({:.1}%), {} unique",
            p.duplicates(),
            p.sent,
            100.0 * p.duplicates() as f64 / p.sent as f64,
            p.unique_received()
        );
        assert_eq!(p.send_errors, 0);
        assert_eq!(p.unique_received(), p.sent, "{what}: nothing is lost");
        let n = p.sent as f64;
        let sigma3 = 3.0 * (n * 0.25).sqrt();
        assert!(
            (p.duplicates() as f64 - n * 0.5).abs() <= sigma3,
            "{what}: {} duplicates, expected {} ± {sigma3:.0}",
            p.duplicates(),
            n * 0.5
        );
        // No copy of a copy: every datagram arrives at most twice.
        let mut seen = vec![0u8; p.sent as usize];
        for s in &p.received_seqs {
            seen[*s as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n <= 2), "{what}: a copy was copied");
        assert_eq!(c.counter(&id, "affected"), p.duplicates(), "{what}");
        c.delete_fault(&id);
    }
}

/// Runs of consecutive lost sequence numbers (received_seqs may be in any order).
fn loss_runs(p: &UdpProbe) -> Vec<u32> {
    let mut got = vec![false; p.sent as usize];
    for s in &p.received_seqs {
        got[*s as usize] = true;
    }
    let mut runs = Vec::new();
    let mut run = 0;
    for g in got {
        if g {
            if run > 0 {
                runs.push(run);
            }
            run = 0;
        } else {
            run += 1;
        }
    }
    if run > 0 {
        runs.push(run);
    }
    runs
}

fn mean(v: &[u32]) -> f64 {
    v.iter().map(|x| f64::from(*x)).sum::<f64>() / v.len().max(1) as f64
}

/// Gilbert-Elliott p=5%, r=20%, 1-h=100%, 1-k=0%: long-run loss p/(p+r) =
/// 20% and loss bursts of mean 1/r = 5 packets; plain 20% loss has bursts of
/// mean 1/(1-0.2) = 1.25. Tolerances, over 10000 packets: the loss ratio of
/// a two-state chain has variance π(1-π)(1+λ)/((1-λ)n) with λ = 1-p-r =
/// 0.75, so σ ≈ 1.06 points and 3σ ≈ 3.2; the ~400 bursts (geometric, σ =
/// √20 each) give the mean burst σ ≈ 0.22, 3σ ≈ 0.67.
#[test]
fn gilbert_elliott_bursts_differ_from_uncorrelated_loss() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let gilbert_elliott = json!({"type": "loss", "model": {"p": 5, "r": 20, "1-h": 100, "1-k": 0}});
    let id = c.fault_on(&a, "egress", json!({}), gilbert_elliott, "60s");
    let ge = udp_probe(&a, &b, v4(&b), 7321, 10_000, GAP).expect("probe under GE");
    let ge_runs = loss_runs(&ge);
    let ge_loss = ge.loss_ratio();
    let ge_burst = mean(&ge_runs);
    assert_eq!(ge.send_errors, 0, "GE loss is silent");
    assert_eq!(
        c.counter(&id, "dropped"),
        ge.sent - ge.unique_received(),
        "dropped counter vs wire"
    );
    c.delete_fault(&id);

    let uncorrelated = json!({"type": "loss", "percent": 20, "correlation": 0});
    let id = c.fault_on(&a, "egress", json!({}), uncorrelated, "60s");
    let plain = udp_probe(&a, &b, v4(&b), 7321, 10_000, GAP).expect("probe under loss");
    let plain_burst = mean(&loss_runs(&plain));
    c.delete_fault(&id);
    eprintln!(
        "GE p=5 r=20: loss {:.1}%, {} bursts, mean burst {ge_burst:.2}; plain 20%: loss {:.1}%, mean burst {plain_burst:.2}",
        100.0 * ge_loss,
        ge_runs.len(),
        100.0 * plain.loss_ratio()
    );
    assert!(
        (ge_loss - 0.20).abs() <= 0.035,
        "GE long-run loss {ge_loss:.3}, expected 0.20 ± 0.035"
    );
    assert!(
        (ge_burst - 5.0).abs() <= 1.0,
        "GE mean burst {ge_burst:.2}, expected 5 ± 1"
    );
    // Plain 20%: about 1600 bursts, σ of the mean ≈ 0.014.
    assert!(
        (plain_burst - 1.25).abs() <= 0.1,
        "plain loss mean burst {plain_burst:.2}, expected 1.25 ± 0.1"
    );
    assert!(
        ge_burst > 2.0 * plain_burst,
        "GE bursts must be clearly longer"
    );
}

/// loss 20% then duplicate 50% on the same flow: each packet may get a copy
/// and each copy meets the loss on its own, so per datagram sent the receiver
/// gets (1 + 0.5)·0.8 = 1.2 copies (variance 0.40 per datagram) and at least
/// one copy of 1 − 0.2·(1 − 0.5·0.8) = 88% of them. Bounds: 3σ of each.
#[test]
fn loss_and_duplicate_compose() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    // Loss first, so it holds the lower rule slot and runs first.
    let loss = c.fault_on(&a, "egress", json!({}), loss(20), "60s");
    let dup = c.fault_on(&a, "egress", json!({}), duplicate(50), "60s");
    let p = udp_probe(&a, &b, v4(&b), 7331, PACKETS, GAP).expect("probe");
    let n = p.sent as f64;
    eprintln!(
        "loss 20% + duplicate 50%: received {} ({:.3} per sent), unique {} ({:.3})",
        p.received,
        p.received as f64 / n,
        p.unique_received(),
        p.unique_received() as f64 / n
    );
    assert_eq!(p.send_errors, 0);
    let sigma3 = 3.0 * (n * 0.40).sqrt();
    assert!(
        (p.received as f64 - 1.2 * n).abs() <= sigma3,
        "received {}, expected {:.0} ± {sigma3:.0}",
        p.received,
        1.2 * n
    );
    let sigma3u = 3.0 * (n * 0.88 * 0.12).sqrt();
    assert!(
        (p.unique_received() as f64 - 0.88 * n).abs() <= sigma3u,
        "unique {}, expected {:.0} ± {sigma3u:.0}",
        p.unique_received(),
        0.88 * n
    );
    // Both rules acted, and the counters add up to the wire.
    let (dropped, copies) = (c.counter(&loss, "dropped"), c.counter(&dup, "affected"));
    assert_eq!(p.sent + copies - dropped, p.received, "counters vs wire");
    c.delete_fault(&dup);
    c.delete_fault(&loss);
}

/// Bytes the receiver in `to` read from one TCP connection from `from`,
/// which writes for `secs`; goodput is measured by the receiver over the
/// transfer after the first 0.5 s (slow start).
fn tcp_goodput(from: &Pod, to: &Pod, to_ip: IpAddr, port: u16, secs: f64) -> f64 {
    let (mut tx, mut rx) = tcp_pair(from, to, to_ip, port);
    let warmup = Duration::from_millis(500);
    let total = Duration::from_secs_f64(secs);
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let start = Instant::now();
            let mut counted = 0u64;
            let mut t0 = None;
            loop {
                match rx.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if start.elapsed() >= warmup {
                            if t0.is_none() {
                                t0 = Some(Instant::now());
                            } else {
                                counted += n as u64;
                            }
                        }
                    }
                }
            }
            let dt = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(1.0);
            counted as f64 * 8.0 / dt
        });
        let buf = vec![0x5au8; 1 << 16];
        let start = Instant::now();
        while start.elapsed() < total {
            if tx.write_all(&buf).is_err() {
                break;
            }
        }
        // Stop the clock where the sender stopped, not after the queue drains.
        drop(tx);
        reader.join().expect("reader thread")
    })
}

/// Bits per second at which the receiver in `to` read `bytes` from one TCP
/// connection from `from` (from the first byte to the last).
fn tcp_bulk_rate(from: &Pod, to: &Pod, to_ip: IpAddr, port: u16, bytes: usize) -> f64 {
    let (mut tx, mut rx) = tcp_pair(from, to, to_ip, port);
    std::thread::scope(|s| {
        s.spawn(move || {
            let buf = vec![0x5au8; bytes];
            tx.write_all(&buf).expect("write");
        });
        let mut buf = vec![0u8; 1 << 16];
        let mut got = rx.read(&mut buf).expect("first read");
        let start = Instant::now();
        let first = got;
        while got < bytes {
            match rx.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        (got - first) as f64 * 8.0 / start.elapsed().as_secs_f64()
    })
}

/// rate 20mbit: a single TCP flow's goodput, measured by the receiver, is
/// within ±15% of 20 Mbit/s; without the fault the same transfer is far
/// faster.
///
/// The datapath polices (drops over the limit; it cannot queue without fq),
/// so the flow runs in bursts separated by loss recovery, often a 200 ms+
/// retransmission timeout. Its long-run goodput is right at the limit
/// (8 s runs: 20.2-20.8 Mbit/s with the default 500 kB bucket), but a
/// 3 s window holds only ~10 such cycles: most windows land within ±5%, an
/// occasional one outside ±15% (one of ~15 runs measured 16.1, and CI once
/// saw 16.2 twice while other tests loaded the CPU). So the test runs alone,
/// measures 4.5 s windows on fresh connections, and is decided by a
/// majority of up to three windows ([`by_majority`]).
#[test]
fn rate_limits_tcp_goodput() {
    rate_limits(Stack::V4);
}

/// [`rate_limits_tcp_goodput`] on pods of `stack`.
pub(crate) fn rate_limits(stack: Stack) {
    testbed::require_root!();
    // Alone: a TCP flow through a policer reacts to CPU contention from a
    // neighbouring test as much as to the policer.
    let c = Cluster::exclusive_with(stack.options());
    let [a, b] = c.pods(["a", "b"]);
    let ip = stack.ip(&b);
    // Sanity, without the fault: 16 MB go through far faster than 20 Mbit/s
    // (6.7 s) would allow. A fixed amount rather than a timed run keeps the
    // full-speed transfer short, so it does not starve concurrent tests.
    let free = tcp_bulk_rate(&a, &b, ip, 7341, 16 << 20);
    assert!(
        free > 200e6,
        "unlimited transfer too slow to compare: {:.0} Mbit/s",
        free / 1e6
    );
    let rate = json!({"type": "rate", "rate": "20mbit"});
    let id = c.fault_on(&a, "egress", json!({"protocol": "tcp"}), rate, "60s");
    let what = format!("rate 20mbit {}", stack.name());
    by_majority(&what, MAJORITY_OF, Duration::ZERO, |attempt| {
        let limited = tcp_goodput(&a, &b, ip, 7342 + attempt as u16, 5.0);
        eprintln!(
            "{what}: goodput {:.2} Mbit/s (without the fault {:.0} Mbit/s), dropped {}",
            limited / 1e6,
            free / 1e6,
            c.counter(&id, "dropped")
        );
        let verdict = if (limited - 20e6).abs() <= 0.15 * 20e6 {
            Ok(())
        } else {
            Err(format!(
                "goodput {:.2} Mbit/s, expected 20 ± 3",
                limited / 1e6
            ))
        };
        ((), verdict)
    });
    assert!(c.counter(&id, "dropped") > 0, "the policer dropped");
    c.delete_fault(&id);
}

/// The new in-kernel actions end at their deadline with the agent dead:
/// duplicate 100% and a rate far below the stream's, for 1.5 s; the agent is
/// SIGKILLed; once the deadline has passed the stream is whole and single.
#[test]
fn packet_actions_end_at_deadline_without_agent() {
    actions_end_at_deadline_without_agent(Stack::V4);
}

/// [`packet_actions_end_at_deadline_without_agent`] on pods of `stack`.
pub(crate) fn actions_end_at_deadline_without_agent(stack: Stack) {
    testbed::require_root!();
    let mut c = Cluster::on(stack);
    let [a, b] = c.pods(["a", "b"]);
    let created = Instant::now();
    for action in [duplicate(100), json!({"type": "rate", "rate": "8kbit"})] {
        c.fault_on(&a, "egress", json!({}), action, "1500ms");
    }
    c.agent.kill().expect("SIGKILL the agent");
    let during = udp_probe(&a, &b, stack.ip(&b), 7351, 300, GAP).expect("probe during");
    assert!(
        created.elapsed() < Duration::from_millis(1400),
        "probe took too long to be meaningful"
    );
    assert_eq!(during.send_errors, 0);
    assert!(
        during.unique_received() < during.sent / 2 && during.duplicates() > 0,
        "rate and duplicate act without the agent: {} unique, {} duplicates of {}",
        during.unique_received(),
        during.duplicates(),
        during.sent
    );
    if let Some(w) = Duration::from_millis(1600).checked_sub(created.elapsed()) {
        std::thread::sleep(w);
    }
    let after = udp_probe(&a, &b, stack.ip(&b), 7352, 300, GAP).expect("probe after");
    assert_eq!(
        (after.received, after.duplicates()),
        (after.sent, 0),
        "traffic is whole and single after the deadline"
    );
}
