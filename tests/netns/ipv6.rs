//! IPv6: the eBPF datapath's `protocol`/`ports` match on packets that carry
//! extension headers, and the eBPF packet actions, agent restart, fail-open
//! and the proxy's `tcp-*` faults on IPv6-only pods (no IPv4 address at
//! all). Every effect is measured on the wire.

use std::time::Duration;

use testbed::{udp_probe_ext, Ipv6ExtHeader, ProbeOptions, UdpProbe};

use crate::support::{ends, loss, proto_port, v6, Cluster, Stack};

const GAP: Duration = Duration::from_micros(200);
const COUNT: u32 = 300;

/// `COUNT` datagrams from `from` to `to`'s IPv6 address and `port`, each
/// carrying `ext`.
fn probe_ext(
    from: &testbed::Pod,
    to: &testbed::Pod,
    port: u16,
    ext: Option<Ipv6ExtHeader>,
) -> UdpProbe {
    let opts = ProbeOptions {
        port,
        count: COUNT,
        interval: GAP,
        ..ProbeOptions::default()
    };
    udp_probe_ext(from, to, v6(to), &opts, ext)
        .unwrap_or_else(|e| panic!("probe to port {port} with {ext:?}: {e}"))
}

/// A 100% loss on `protocol udp, ports [HIT]` drops every datagram to HIT,
/// with no extension header, with a hop-by-hop header and with a
/// destination-options header, on egress and on ingress; datagrams to
/// another port all arrive. Before the fault, all of them arrive. (With a
/// parser that took the IPv6 next header for the L4 protocol, the datagrams
/// with an extension header escaped the fault.)
#[test]
fn udp_match_sees_through_extension_headers() {
    testbed::require_root!();
    let c = Cluster::on(Stack::V6Only);
    let [a, b] = c.pods(["a", "b"]);
    const HIT: u16 = 7601;
    const MISS: u16 = 7602;
    let exts = [
        None,
        Some(Ipv6ExtHeader::HopByHop),
        Some(Ipv6ExtHeader::DestinationOptions),
    ];
    for ext in exts {
        for port in [HIT, MISS] {
            let p = probe_ext(&a, &b, port, ext);
            assert_eq!(
                (p.received, p.send_errors),
                (p.sent, 0),
                "{ext:?} to {port} without a fault: all must arrive"
            );
        }
    }
    for direction in ["egress", "ingress"] {
        let (from, to) = ends(direction, &a, &b);
        let id = c.fault_on(&a, direction, proto_port("udp", HIT), loss(100), "60s");
        let mut lost = 0;
        for ext in exts {
            let hit = probe_ext(from, to, HIT, ext);
            let miss = probe_ext(from, to, MISS, ext);
            eprintln!(
                "{direction} {ext:?}: to port {HIT} {}/{} arrived, to port {MISS} {}/{}",
                hit.received, hit.sent, miss.received, miss.sent
            );
            assert_eq!(
                (hit.received, hit.send_errors),
                (0, 0),
                "{direction} {ext:?}: the fault on udp/{HIT} must drop every datagram, silently"
            );
            assert_eq!(
                miss.received, miss.sent,
                "{direction} {ext:?}: udp/{MISS} is not selected"
            );
            lost += hit.sent;
        }
        assert_eq!(
            c.counter(&id, "dropped"),
            lost,
            "{direction}: dropped counter vs wire"
        );
        c.delete_fault(&id);
    }
}

// IPv6-only pods: the dual-stack and IPv4 tests' own checks, on pods whose
// only address is IPv6.

#[test]
fn v6_only_egress_loss_is_silent_and_binomial() {
    crate::loss::loss_levels(Stack::V6Only, "egress");
}

#[test]
fn v6_only_ingress_loss_is_binomial() {
    crate::loss::loss_levels(Stack::V6Only, "ingress");
}

#[test]
fn v6_only_blackhole_selectors_confine_the_fault() {
    crate::loss::selectors_confine(Stack::V6Only);
}

#[test]
fn v6_only_corrupt_is_discarded_by_the_receiver() {
    testbed::require_root!();
    crate::packet_actions::corrupt_discarded(
        &Cluster::on(Stack::V6Only),
        &[
            ("egress", true, false),
            ("egress", true, true),
            ("ingress", true, true),
            ("ingress", true, false),
        ],
    );
}

#[test]
fn v6_only_duplicate_half_of_the_packets() {
    testbed::require_root!();
    crate::packet_actions::duplicate_half(
        &Cluster::on(Stack::V6Only),
        &[("egress", true), ("ingress", true)],
    );
}

#[test]
fn v6_only_rate_limits_tcp_goodput() {
    crate::packet_actions::rate_limits(Stack::V6Only);
}

#[test]
fn v6_only_packet_actions_end_at_deadline_without_agent() {
    crate::packet_actions::actions_end_at_deadline_without_agent(Stack::V6Only);
}

#[test]
fn v6_only_deadline_holds_with_agent_killed() {
    crate::lifecycle::deadline_holds_without_agent(Stack::V6Only);
}

#[test]
fn v6_only_faults_survive_agent_restart() {
    crate::lifecycle::faults_survive_restart(Stack::V6Only);
}

#[test]
fn v6_only_tcp_reset_and_bandwidth() {
    crate::tproxy::tcp_reset_and_bandwidth_on(Stack::V6Only);
}

#[test]
fn v6_only_proxy_fails_open_then_restart_and_removal() {
    crate::tproxy::fails_open_then_restart_and_removal(Stack::V6Only);
}
