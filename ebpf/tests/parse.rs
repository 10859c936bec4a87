//! Root-only: the datapath's packet parser, run by the kernel on crafted
//! frames (BPF_PROG_TEST_RUN). IPv6 extension headers are walked to the
//! real L4 header, so `protocol` and `ports` match behind them, and the L4
//! offset that corrupt uses points at the transport header.

use std::net::{IpAddr, Ipv6Addr};
use std::os::fd::RawFd;

use netfault_ebpf::abi::{ACTION_BLACKHOLE, ACTION_CORRUPT, DIR_EGRESS, DIR_INGRESS};
use netfault_ebpf::{boottime_ns, Datapath, RawRule};

/// tc verdicts (linux/pkt_cls.h).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_STOLEN: u32 = 4;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr`, the `test` member (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Runs program `fd` once on `frame`; its verdict and the frame it left.
fn test_run(fd: RawFd, frame: &[u8]) -> std::io::Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = TestRunAttr {
        prog_fd: fd as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ..TestRunAttr::default()
    };
    // SAFETY: bpf(2) reads `attr` (its size is passed) and the input buffer,
    // and writes at most `data_size_out` bytes into `out`; all outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, out))
}

const POD: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6e66, 0, 0, 0, 0, 0, 2);
const PEER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6e66, 0, 0, 0, 0, 0, 3);
const PORT: u16 = 5000;
const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;

/// An extension header of `len` bytes (a multiple of 8, or of 4 for AH)
/// whose first byte is filled in by [`frame`].
fn ext(kind: u8, len: usize) -> (u8, Vec<u8>) {
    let mut h = vec![0u8; len];
    h[1] = match kind {
        51 => (len / 4 - 2) as u8,
        44 => 0,
        _ => (len / 8 - 1) as u8,
    };
    if kind == 0 || kind == 60 {
        // PadN filling the rest of the header.
        h[2] = 1;
        h[3] = (len - 4) as u8;
    }
    (kind, h)
}

/// A fragment header with fragment offset `offset` (8-byte units).
fn fragment(offset: u16) -> (u8, Vec<u8>) {
    let (kind, mut h) = ext(44, 8);
    h[2..4].copy_from_slice(&(offset << 3 | 1).to_be_bytes());
    (kind, h)
}

/// An Ethernet frame: IPv6 from `src` to `dst`, the extension headers in
/// order, then `upper` (protocol `proto`).
fn frame(src: Ipv6Addr, dst: Ipv6Addr, exts: &[(u8, Vec<u8>)], proto: u8, upper: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (i, (_, h)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, |(k, _)| *k);
        let at = payload.len();
        payload.extend_from_slice(h);
        payload[at] = next;
    }
    payload.extend_from_slice(upper);
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.push(exts.first().map_or(proto, |(k, _)| *k));
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&payload);
    f
}

/// A UDP datagram to `dport` with 64 bytes of payload and a non-zero
/// checksum field that is not the pseudo-header sum (so the datapath treats
/// it as a checksum the receiver verifies).
fn udp(dport: u16) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&40000u16.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&72u16.to_be_bytes());
    u.extend_from_slice(&0x1234u16.to_be_bytes());
    u.extend((0..64u8).map(|i| i.wrapping_mul(37)));
    u
}

/// A rule acting on everything `proto`/`PORT` in both directions, always.
fn rule(action: u8) -> RawRule {
    let mut r = RawRule {
        deadline_ns: boottime_ns() + 600_000_000_000,
        threshold: 1 << 32,
        dirs: DIR_EGRESS | DIR_INGRESS,
        action,
        proto: libc::IPPROTO_UDP as u8,
        nports: 1,
        ..RawRule::default()
    };
    r.port_lo[0] = PORT;
    r.port_hi[0] = PORT;
    r
}

fn loaded() -> Option<Datapath> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: requires root");
        return None;
    }
    let mut dp = Datapath::load().unwrap_or_else(|e| panic!("datapath failed to load: {e:?}"));
    dp.bind_address(IpAddr::V6(POD), 0)
        .expect("bind the pod address");
    Some(dp)
}

/// An extension header: its kind and bytes.
type Ext = (u8, Vec<u8>);
/// What a frame carries (extension headers, L4 protocol, port) and whether
/// the blackhole drops it.
type Case = (&'static str, Vec<Ext>, u8, u16, bool);

/// A `protocol udp, ports [5000]` blackhole drops UDP to 5000 behind any
/// walkable chain of extension headers, on egress (the pod is the source)
/// and ingress (the pod is the destination), and lets through what carries
/// no reachable UDP header: a non-first fragment, ESP, no next header, a
/// truncated header, or more headers than the walk's bound (8).
#[test]
fn ports_match_behind_ipv6_extension_headers() {
    let Some(mut dp) = loaded() else { return };
    dp.set_rule(0, 0, &rule(ACTION_BLACKHOLE))
        .expect("set rule");
    let fds = dp.program_fds();
    let udp17 = libc::IPPROTO_UDP as u8;
    let hop = || ext(0, 8);
    let mut truncated = ext(60, 8);
    truncated.1[1] = 200; // says 1608 bytes; the frame ends first
    let cases: Vec<Case> = vec![
        ("no extension header", vec![], udp17, PORT, true),
        ("hop-by-hop", vec![hop()], udp17, PORT, true),
        (
            "destination options, 16 bytes",
            vec![ext(60, 16)],
            udp17,
            PORT,
            true,
        ),
        ("routing", vec![ext(43, 24)], udp17, PORT, true),
        ("AH", vec![ext(51, 12)], udp17, PORT, true),
        ("first fragment", vec![fragment(0)], udp17, PORT, true),
        (
            "hop-by-hop, routing, fragment, AH, destination options",
            vec![hop(), ext(43, 8), fragment(0), ext(51, 16), ext(60, 8)],
            udp17,
            PORT,
            true,
        ),
        (
            "7 headers",
            (0..7).map(|_| ext(60, 8)).collect(),
            udp17,
            PORT,
            true,
        ),
        (
            "destination options, another port",
            vec![ext(60, 8)],
            udp17,
            PORT + 1,
            false,
        ),
        ("non-first fragment", vec![fragment(10)], udp17, PORT, false),
        (
            "8 headers: beyond the bound",
            (0..8).map(|_| ext(60, 8)).collect(),
            udp17,
            PORT,
            false,
        ),
        ("truncated header", vec![truncated], udp17, PORT, false),
        ("ESP", vec![], 50, PORT, false),
        (
            "hop-by-hop, then no next header",
            vec![hop()],
            59,
            PORT,
            false,
        ),
    ];
    for (what, exts, proto, port, dropped) in cases {
        for (ingress, fd, drop_verdict) in [
            (false, fds.egress, TC_ACT_STOLEN),
            (true, fds.ingress, TC_ACT_SHOT),
        ] {
            let (src, dst) = if ingress { (PEER, POD) } else { (POD, PEER) };
            let f = frame(src, dst, &exts, proto, &udp(port));
            let (verdict, _) = test_run(fd, &f).expect("BPF_PROG_TEST_RUN");
            let want = if dropped { drop_verdict } else { TC_ACT_OK };
            let side = if ingress { "ingress" } else { "egress" };
            assert_eq!(verdict, want, "{what} ({side}): verdict");
        }
    }
    // The match compares ports too, not just the protocol: TCP to 5000 passes.
    let f = frame(POD, PEER, &[hop()], libc::IPPROTO_TCP as u8, &udp(PORT));
    assert_eq!(test_run(fds.egress, &f).expect("test run").0, TC_ACT_OK);
    // And an IPv6 packet of another pod is not this sandbox's.
    let other = Ipv6Addr::new(0xfd00, 0x6e66, 0, 0, 0, 0, 0, 9);
    let f = frame(other, PEER, &[hop()], udp17, &udp(PORT));
    assert_eq!(test_run(fds.egress, &f).expect("test run").0, TC_ACT_OK);
}

/// Neighbour discovery (IPv6's ARP) is never matched: a blackhole on all
/// of a pod's traffic drops its ICMPv6 echo requests, not its neighbour
/// solicitations and advertisements, behind extension headers or not.
#[test]
fn neighbour_discovery_passes_a_blackhole() {
    let Some(mut dp) = loaded() else { return };
    let all = RawRule {
        proto: 0,
        nports: 0,
        ..rule(ACTION_BLACKHOLE)
    };
    dp.set_rule(0, 0, &all).expect("set rule");
    let fds = dp.program_fds();
    let icmp6 = libc::IPPROTO_ICMPV6 as u8;
    let message = |kind: u8| {
        let mut m = vec![kind, 0, 0, 0];
        m.extend_from_slice(&[0; 20]);
        m
    };
    for (kind, passes) in [
        (128, false),
        (133, true),
        (135, true),
        (136, true),
        (137, true),
    ] {
        for exts in [vec![], vec![ext(0, 8)]] {
            let f = frame(POD, PEER, &exts, icmp6, &message(kind));
            let want = if passes { TC_ACT_OK } else { TC_ACT_STOLEN };
            let (verdict, _) = test_run(fds.egress, &f).expect("test run");
            assert_eq!(
                verdict,
                want,
                "ICMPv6 type {kind}, {} ext headers",
                exts.len()
            );
            let f = frame(PEER, POD, &exts, icmp6, &message(kind));
            let want = if passes { TC_ACT_OK } else { TC_ACT_SHOT };
            let (verdict, _) = test_run(fds.ingress, &f).expect("test run");
            assert_eq!(verdict, want, "ingress ICMPv6 type {kind}");
        }
    }
}

/// corrupt 100% flips one bit inside the UDP segment, never in the
/// extension headers before it: the L4 offset is past them. 60 runs; if the
/// offset were the fixed header's end, each flip would land in the 24 bytes
/// of extension headers with probability 24/96, so all 60 missing them by
/// chance has probability 0.75^60 < 1e-7.
#[test]
fn corrupt_flips_a_bit_in_the_transport_header_or_payload() {
    let Some(mut dp) = loaded() else { return };
    dp.set_rule(0, 0, &rule(ACTION_CORRUPT)).expect("set rule");
    let fds = dp.program_fds();
    let exts = [ext(0, 8), ext(60, 16)];
    let f = frame(POD, PEER, &exts, libc::IPPROTO_UDP as u8, &udp(PORT));
    let l4 = ETH_HLEN + IPV6_HLEN + 24;
    for _ in 0..60 {
        let (verdict, out) = test_run(fds.egress, &f).expect("BPF_PROG_TEST_RUN");
        assert_eq!(verdict, TC_ACT_OK, "a corrupted packet goes on");
        assert_eq!(out.len(), f.len());
        let diff: Vec<usize> = (0..f.len()).filter(|i| f[*i] != out[*i]).collect();
        assert_eq!(diff.len(), 1, "one byte changed: {diff:?}");
        assert_eq!((f[diff[0]] ^ out[diff[0]]).count_ones(), 1, "one bit");
        assert!(
            diff[0] >= l4,
            "flipped byte {} is before the UDP header at {l4}",
            diff[0]
        );
    }
    let c = dp.counters(0, 0).expect("counters");
    assert_eq!((c.matched, c.affected), (60, 60));
}
