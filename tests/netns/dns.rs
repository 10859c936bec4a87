//! DNS faults on the wire: a real DNS server (dnsmasq) in pod `dns`, real
//! clients in pod `client` (dig, the glibc resolver through `getent`, and a
//! UDP sender timed by the kernel), and `dns-*` faults on the client's
//! egress. Every test asserts what a client saw (rcode, flags, records, TTL,
//! TC, timeouts, latency), and where it matters what the server saw (a
//! forged answer means the query never reached it).

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use serde_json::{json, Value};
use testbed::dnsserver::{
    getent_ahosts, udp_queries, zone, Dig, DigResult, DnsServer, Exchange, Resolver,
};
use testbed::{ms, Pod};

use crate::support::{
    assert_no_nft_leftovers, by_majority, connect, fault_on, in_pod, netns_state, nft_objects,
    Cluster, Pristine, Repeat, MAJORITY_OF,
};

const MS: Duration = Duration::from_millis(1);
const API: &str = "api.example.test";
const WEB: &str = "web.example.test";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a literal address")
}

/// A cluster with pods `client` and `dns`, and a dnsmasq serving the test
/// zone in `dns`.
struct Bed {
    // Field order is drop order: the server, the pods, then the cluster.
    server: DnsServer,
    client: Pod,
    _dns: Pod,
    c: Cluster,
}

impl Bed {
    fn new(ipv6: bool) -> Bed {
        Bed::on(Cluster::new(ipv6))
    }

    /// For timing tests: alone on the machine (see `Cluster::exclusive`).
    fn exclusive() -> Bed {
        Bed::on(Cluster::exclusive(false))
    }

    fn on(c: Cluster) -> Bed {
        let [client, dns] = c.pods(["client", "dns"]);
        let server = DnsServer::start(&dns).unwrap_or_else(|e| panic!("DNS server: {e}"));
        Bed {
            server,
            client,
            _dns: dns,
            c,
        }
    }

    /// dig from the client to the server's IPv4 address (IPv6 on a v6-only pod).
    fn dig(&self, name: &str, qtype: &str) -> Dig {
        Dig::new(self.server.ip(), name, qtype)
    }

    /// Runs a dig from the client.
    fn ask(&self, dig: Dig) -> DigResult {
        dig.run(&self.client)
            .unwrap_or_else(|e| panic!("dig in the client pod: {e}"))
    }

    /// A DNS fault on the client's egress, matching `matcher`, for 60 s.
    fn fault_matching(&self, matcher: Value, action: Value) -> String {
        self.c
            .fault(fault_on(&self.client, "egress", matcher, action, "60s"))
    }

    fn fault(&self, action: Value) -> String {
        self.fault_matching(json!({}), action)
    }

    fn counters(&self, id: &str) -> (u64, u64) {
        (
            self.c.counter(id, "matched"),
            self.c.counter(id, "affected"),
        )
    }

    /// The server's UDP endpoint.
    fn server_udp(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip(), 53)
    }
}

/// A standard recursive query for `name`/`rtype`, with `id`.
fn query(id: u16, name: &str, rtype: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_ascii(format!("{name}.")).expect("a valid name"),
        rtype,
    ));
    m.to_vec().expect("the query encodes")
}

/// `n` queries for `name`/`rtype`, ids 1..=n.
fn queries(n: u16, name: &str, rtype: RecordType) -> Vec<Vec<u8>> {
    (1..=n).map(|id| query(id, name, rtype)).collect()
}

/// The answer of an exchange, decoded; panics on an answer that is no
/// DNS message (the datapath must never send one).
fn decoded(e: &Exchange) -> Option<Message> {
    e.answer.as_ref().map(|a| {
        Message::from_vec(a).unwrap_or_else(|err| panic!("an undecodable answer {a:?}: {err}"))
    })
}

/// Asserts `r` is the zone's real answer for `name` `A` (or `AAAA`): NOERROR,
/// the zone's address, its TTL.
fn assert_real(r: &DigResult, want: &str, what: &str) {
    assert_eq!(r.status.as_deref(), Some("NOERROR"), "{what}: {}", r.output);
    assert_eq!(r.addresses(), vec![ip(want)], "{what}: {}", r.output);
    assert!(
        r.answers.iter().all(|a| a.ttl == zone::ZONE_TTL),
        "{what}: the zone's TTL: {}",
        r.output
    );
    assert!(r.warnings.is_empty(), "{what}: {:?}", r.warnings);
}

/// Asserts `r` is a forged error with `status`: QR set, the question
/// echoed, no records, and no warning from dig (dig only takes an answer
/// whose id and question are its query's).
fn assert_error(r: &DigResult, status: &str, question: &str, what: &str) {
    assert_eq!(r.status.as_deref(), Some(status), "{what}: {}", r.output);
    assert!(r.flag("qr"), "{what}: QR must be set: {:?}", r.flags);
    assert!(r.id.is_some(), "{what}: {}", r.output);
    assert_eq!(r.question, [question], "{what}: the question is echoed");
    assert!(
        r.answers.is_empty() && r.authority.is_empty(),
        "{what}: no records: {}",
        r.output
    );
    assert!(r.warnings.is_empty(), "{what}: {:?}", r.warnings);
}

/// The DNS server, a client and their tools, with no fault: the baseline
/// the fault tests compare with. (No datapath needed.)
#[test]
fn dns_baseline_real_answers_without_a_fault() {
    testbed::require_root!();
    let b = Bed::new(true);
    let pristine = Pristine::of(&b.client);

    let r = b.ask(b.dig(API, "A").notcp());
    assert_real(&r, zone::API_V4, "A over UDP");
    assert_eq!(r.transport.as_deref(), Some("UDP"));
    assert!(
        r.flag("qr") && r.flag("aa") && r.flag("rd"),
        "{:?}",
        r.flags
    );
    assert_eq!(r.edns_udp, Some(zone::SERVER_EDNS_UDP), "the server's OPT");
    assert_real(
        &b.ask(b.dig(API, "AAAA").tcp()),
        zone::API_V6,
        "AAAA over TCP",
    );
    let v6 = b.server.v6().expect("the server listens on IPv6");
    let r = b.ask(Dig::new(v6, WEB, "AAAA"));
    assert_real(&r, zone::WEB_V6, "AAAA over IPv6 transport");

    let r = b.ask(b.dig("example.test", "MX"));
    assert_eq!(r.answers.len(), 1, "{}", r.output);
    assert_eq!(r.answers[0].data, "10 mail.example.test.");
    let r = b.ask(b.dig(API, "TXT"));
    assert_eq!(r.answers.len(), 1, "{}", r.output);
    assert_eq!(r.answers[0].data, format!("\"{}\"", zone::API_TXT));
    let r = b.ask(b.dig("nothing.example.test", "A"));
    assert_eq!(r.status.as_deref(), Some("NXDOMAIN"), "{}", r.output);

    // Without EDNS the big answer does not fit 512 bytes: dig retries over TCP.
    let r = b.ask(b.dig("big.example.test", "A").opt("+noedns"));
    assert!(r.retried_tcp, "{}", r.output);
    assert_eq!(r.transport.as_deref(), Some("TCP"));
    assert_eq!(r.answers.len(), usize::from(zone::BIG_RECORDS));

    let resolver = Resolver::new(&[b.server.ip()], 1, 2).expect("resolv.conf");
    let l = getent_ahosts(&b.client, &resolver, API).expect("getent");
    eprintln!(
        "getent ahosts {API}: {:?} in {:.1} ms",
        l.addresses,
        ms(l.elapsed)
    );
    assert!(l.found(), "{}", l.output);
    assert!(
        l.addresses.contains(&ip(zone::API_V4)) && l.addresses.contains(&ip(zone::API_V6)),
        "glibc asks A and AAAA: {:?}",
        l.addresses
    );

    let before = b.server.queries_seen(API, "A");
    let sent = queries(50, API, RecordType::A);
    let got = udp_queries(&b.client, b.server_udp(), &sent, MS, 100 * MS).expect("UDP queries");
    for e in &got {
        let m = decoded(e).expect("every query answered");
        assert_eq!(m.response_code(), ResponseCode::NoError);
    }
    let rtts: Vec<Duration> = got.iter().filter_map(|e| e.rtt).collect();
    eprintln!(
        "50 UDP queries: p50 {:.3} ms",
        ms(testbed::quantile(&rtts, 0.5).expect("rtts"))
    );
    assert!(
        testbed::eventually(Duration::from_secs(1), || b.server.queries_seen(API, "A")
            >= before + 50),
        "the server logged every query"
    );
    pristine.assert_unchanged("clients leave the client's netns as it was");
}

/// `dns-error` with each rcode (and the default, NXDOMAIN), over UDP and
/// TCP: a well-formed answer with QR, the query's id and question, no
/// records; the query never reaches the server. Removal brings the real
/// answer back.
#[test]
fn dns_error_every_rcode_over_udp_and_tcp() {
    testbed::require_root!();
    let b = Bed::new(false);
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "before the fault");
    let seen = b.server.queries_seen(API, "A");
    for (rcode, status) in [
        (None, "NXDOMAIN"),
        (Some("nxdomain"), "NXDOMAIN"),
        (Some("servfail"), "SERVFAIL"),
        (Some("refused"), "REFUSED"),
        (Some("formerr"), "FORMERR"),
    ] {
        let mut action = json!({"type": "dns-error"});
        if let Some(r) = rcode {
            action["rcode"] = json!(r);
        }
        let id = b.fault(action);
        let f = b.c.get_fault(&id);
        assert_eq!(f["backend"], "proxy", "{f}");
        let udp = b.ask(b.dig(API, "A").notcp());
        assert_error(
            &udp,
            status,
            "api.example.test. IN A",
            &format!("{status} over UDP"),
        );
        assert_eq!(udp.transport.as_deref(), Some("UDP"));
        let tcp = b.ask(b.dig(API, "A").tcp());
        assert_error(
            &tcp,
            status,
            "api.example.test. IN A",
            &format!("{status} over TCP"),
        );
        assert_eq!(tcp.transport.as_deref(), Some("TCP"));
        let (matched, affected) = b.counters(&id);
        eprintln!(
            "dns-error {status}: UDP {:.1} ms, TCP {:.1} ms; counters matched {matched} affected {affected}",
            ms(udp.elapsed),
            ms(tcp.elapsed)
        );
        assert_eq!(
            (matched, affected),
            (2, 2),
            "counters: one UDP and one TCP query, both answered by the fault"
        );
        b.c.delete_fault(&id);
    }
    assert_eq!(
        b.server.queries_seen(API, "A"),
        seen,
        "forged answers: no query reached the server"
    );
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "after removal");
    assert_real(
        &b.ask(b.dig(API, "A").tcp()),
        zone::API_V4,
        "after removal, TCP",
    );
}

/// `dns-spoof`: A queries get the IPv4 addresses, AAAA the IPv6 ones, TTL 0
/// by default or as given; MX and TXT an empty NOERROR; a family without
/// addresses an empty NOERROR; `random` draws from 192.0.2.0/24 and
/// 2001:db8::/32. glibc's resolver gets the lie too.
#[test]
fn dns_spoof_addresses_ttl_and_random() {
    testbed::require_root!();
    let b = Bed::new(false);
    let seen = b.server.queries_seen(API, "A");
    let id = b.fault(json!({"type": "dns-spoof", "dns": {"names": [API]},
        "addresses": ["198.18.77.1", "fd00:77::1", "198.18.77.2"]}));
    let a = b.ask(b.dig(API, "A"));
    assert_eq!(a.status.as_deref(), Some("NOERROR"), "{}", a.output);
    let mut got = a.addresses();
    got.sort();
    assert_eq!(got, [ip("198.18.77.1"), ip("198.18.77.2")], "{}", a.output);
    assert!(
        a.answers.iter().all(|r| r.ttl == 0 && r.rtype == "A"),
        "TTL 0 by default: {}",
        a.output
    );
    assert!(a.flag("qr") && a.warnings.is_empty(), "{}", a.output);
    let aaaa = b.ask(b.dig(API, "AAAA").tcp());
    assert_eq!(aaaa.addresses(), [ip("fd00:77::1")], "{}", aaaa.output);
    assert!(aaaa.answers.iter().all(|r| r.ttl == 0));
    for qtype in ["MX", "TXT"] {
        let r = b.ask(b.dig(API, qtype));
        assert_eq!(
            r.status.as_deref(),
            Some("NOERROR"),
            "{qtype}: {}",
            r.output
        );
        assert!(r.answers.is_empty(), "{qtype}: no records: {}", r.output);
    }
    let resolver = Resolver::new(&[b.server.ip()], 1, 2).expect("resolv.conf");
    let l = getent_ahosts(&b.client, &resolver, API).expect("getent");
    let mut glibc = l.addresses.clone();
    glibc.sort();
    assert_eq!(
        glibc,
        [ip("198.18.77.1"), ip("198.18.77.2"), ip("fd00:77::1")],
        "glibc: {}",
        l.output
    );
    assert_real(&b.ask(b.dig(WEB, "A")), zone::WEB_V4, "another name");
    b.c.delete_fault(&id);

    let id = b.fault(json!({"type": "dns-spoof", "addresses": ["198.18.77.3"], "ttl": 30}));
    let a = b.ask(b.dig(API, "A"));
    assert_eq!(a.addresses(), [ip("198.18.77.3")], "{}", a.output);
    assert_eq!(a.answers[0].ttl, 30, "the given TTL");
    let aaaa = b.ask(b.dig(API, "AAAA"));
    assert_eq!(aaaa.status.as_deref(), Some("NOERROR"), "{}", aaaa.output);
    assert!(
        aaaa.answers.is_empty(),
        "no IPv6 address: no AAAA: {}",
        aaaa.output
    );
    b.c.delete_fault(&id);

    let id = b.fault(json!({"type": "dns-spoof", "random": true}));
    let mut drawn = Vec::new();
    for _ in 0..4 {
        for (qtype, net, bits) in [("A", ip("192.0.2.0"), 24), ("AAAA", ip("2001:db8::"), 32)] {
            let r = b.ask(b.dig(API, qtype));
            let got = r.addresses();
            assert!(!got.is_empty(), "{qtype}: {}", r.output);
            for a in got {
                assert!(in_prefix(a, net, bits), "{a} outside {net}/{bits}");
                drawn.push(a);
            }
        }
    }
    eprintln!("dns-spoof random drew {drawn:?}");
    b.c.delete_fault(&id);
    assert_eq!(
        b.server.queries_seen(API, "A"),
        seen,
        "spoofed: the server saw no A query"
    );
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "after removal");
}

fn in_prefix(a: IpAddr, net: IpAddr, bits: u32) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            u32::from(a).checked_shr(32 - bits) == u32::from(n).checked_shr(32 - bits)
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            u128::from(a).checked_shr(128 - bits) == u128::from(n).checked_shr(128 - bits)
        }
        _ => false,
    }
}

/// `dns-truncate`: dig gets TC over UDP (with `+ignore`, an empty truncated
/// answer), retries over TCP and gets the real answer.
#[test]
fn dns_truncate_forces_the_tcp_retry() {
    testbed::require_root!();
    let b = Bed::new(false);
    let id = b.fault(json!({"type": "dns-truncate"}));
    let r = b.ask(b.dig(API, "A").ignore());
    assert_eq!(r.transport.as_deref(), Some("UDP"), "{}", r.output);
    assert!(r.flag("tc") && r.flag("qr"), "the TC bit: {}", r.output);
    assert!(
        r.answers.is_empty(),
        "a truncated answer has no records: {}",
        r.output
    );
    assert_eq!(r.question, ["api.example.test. IN A"]);

    let tcp_before = b.server.queries_seen(API, "A");
    let r = b.ask(b.dig(API, "A"));
    assert!(r.retried_tcp, "dig retries over TCP: {}", r.output);
    assert_eq!(r.transport.as_deref(), Some("TCP"));
    assert_real(&r, zone::API_V4, "the TCP retry gets the real answer");
    assert_eq!(
        b.server.queries_seen(API, "A"),
        tcp_before + 1,
        "only the TCP retry reached the server"
    );
    let (matched, affected) = b.counters(&id);
    eprintln!(
        "dns-truncate: {:.1} ms with the retry; matched {matched} affected {affected}",
        ms(r.elapsed)
    );
    assert_eq!(
        (matched, affected),
        (2, 2),
        "two UDP queries truncated (the TCP retry is not dns-truncate's)"
    );
    b.c.delete_fault(&id);
    let r = b.ask(b.dig(API, "A"));
    assert!(
        !r.retried_tcp && r.transport.as_deref() == Some("UDP"),
        "{}",
        r.output
    );
    assert_real(&r, zone::API_V4, "after removal");
}

/// `dns-drop`: dig times out; glibc's `getent` fails after its retries,
/// in about `timeout × attempts`; other names resolve at once.
#[test]
fn dns_drop_times_out_dig_and_glibc() {
    testbed::require_root!();
    let b = Bed::new(false);
    let resolver = Resolver::new(&[b.server.ip()], 1, 2).expect("resolv.conf");
    let seen = b.server.queries_seen(API, "A");
    let id = b.fault(json!({"type": "dns-drop", "dns": {"names": [API]}}));
    let r = b.ask(b.dig(API, "A").time(1));
    assert!(r.timed_out(), "dig got an answer: {}", r.output);
    assert!(r.elapsed >= Duration::from_millis(950), "{:?}", r.elapsed);
    let r = b.ask(b.dig(API, "A").time(1).tcp());
    assert!(r.timed_out(), "dig over TCP got an answer: {}", r.output);

    let l = getent_ahosts(&b.client, &resolver, API).expect("getent");
    let want = resolver.give_up_after();
    eprintln!(
        "dns-drop: glibc (timeout:{} attempts:{}) gave up after {:.0} ms (expected about {:.0} ms); exit {:?}",
        resolver.timeout_s,
        resolver.attempts,
        ms(l.elapsed),
        ms(want),
        l.exit_code
    );
    assert!(!l.found() && l.exit_code == Some(2), "getent: {}", l.output);
    assert!(
        l.elapsed + 100 * MS >= want && l.elapsed <= want + 1500 * MS,
        "glibc gave up after {:?}, not about {want:?}",
        l.elapsed
    );
    let web = getent_ahosts(&b.client, &resolver, WEB).expect("getent");
    assert!(
        web.found() && web.elapsed < 500 * MS,
        "{:?}: {}",
        web.elapsed,
        web.output
    );
    assert_eq!(
        b.server.queries_seen(API, "A"),
        seen,
        "dropped before the server"
    );
    let (matched, affected) = b.counters(&id);
    eprintln!("dns-drop counters: matched {matched} affected {affected}");
    assert!(
        affected >= 4,
        "2 dig + at least 2 glibc queries dropped: {affected}"
    );
    b.c.delete_fault(&id);
    let l = getent_ahosts(&b.client, &resolver, API).expect("getent");
    assert!(
        l.found() && l.addresses.contains(&ip(zone::API_V4)),
        "{}",
        l.output
    );
}

/// The median round trip of `n` UDP queries for `name` (A) sent every 2 ms
/// (kernel receive stamps); asserts each got the zone's real answer.
fn query_p50(b: &Bed, name: &str, n: u16, linger: Duration) -> Duration {
    testbed::quantile(&query_rtts(b, name, n, linger), 0.5).expect("answers")
}

/// The round trips of [`query_p50`]'s queries.
fn query_rtts(b: &Bed, name: &str, n: u16, linger: Duration) -> Vec<Duration> {
    let got = udp_queries(
        &b.client,
        b.server_udp(),
        &queries(n, name, RecordType::A),
        2 * MS,
        linger,
    )
    .expect("UDP queries");
    let mut rtts = Vec::new();
    for e in &got {
        let m = decoded(e).expect("a delay must not drop a query");
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(
            m.answers().first().and_then(|a| a.data().ip_addr()),
            Some(ip(zone::API_V4)),
            "the real answer"
        );
        rtts.extend(e.rtt);
    }
    rtts
}

/// `dns-delay` 100 ms: the real answer arrives 100 ms later, p50 within
/// 1 ms, against a baseline measured in the same test, and no answer
/// earlier than 99.5 ms (the fast end, on every sample: load only makes
/// answers later). The p50 bound is decided by a majority of up to 3
/// samples.
#[test]
fn dns_delay_adds_the_delay_at_p50() {
    testbed::require_root!();
    let b = Bed::exclusive();
    let base = query_p50(&b, API, 200, 50 * MS);
    let id = b.fault(json!({"type": "dns-delay", "delay": "100ms"}));
    by_majority("dns-delay 100ms", MAJORITY_OF, 250 * MS, |_| {
        let rtts = query_rtts(&b, API, 200, 250 * MS);
        let p50 = testbed::quantile(&rtts, 0.5).expect("answers");
        let fastest = testbed::quantile(&rtts, 0.0).expect("answers");
        let err = ms(p50) - ms(base) - 100.0;
        // Raw: a noisy baseline must not make an answer look early.
        let early = ms(fastest) - 100.0;
        eprintln!(
            "dns-delay 100ms: p50 {:.3} ms, min {:.3} ms, baseline {:.3} ms, error p50 {err:+.3} ms, min {early:+.3} ms",
            ms(p50),
            ms(fastest),
            ms(base)
        );
        assert!(
            early >= -0.5,
            "an answer came {:.3} ms early under a 100 ms dns-delay",
            -early
        );
        let verdict = if err.abs() <= 1.0 {
            Ok(())
        } else {
            Err(format!("added latency off by {err:+.3} ms"))
        };
        ((), verdict)
    });
    let (matched, affected) = b.counters(&id);
    assert!(
        affected >= 200 && matched >= affected,
        "counters {matched}/{affected}"
    );
    b.c.delete_fault(&id);
    let after = query_p50(&b, API, 100, 50 * MS);
    assert!(
        after < base + MS,
        "undelayed after removal: {after:?} vs {base:?}"
    );
}

/// Selectors: an exact name hits that name (in any case) only; `*.` hits
/// subdomains, not the apex; a type selects that type only; `percent: 30`
/// over 400 queries is binomial within 3σ; the counters agree with what the
/// client saw.
#[test]
fn dns_selectors_names_types_and_percent() {
    testbed::require_root!();
    let b = Bed::new(false);
    let nx = |name: &str, qtype: &str| {
        let r = b.ask(b.dig(name, qtype));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        r.status.as_deref() == Some("NXDOMAIN")
    };

    let id = b.fault(json!({"type": "dns-error", "dns": {"names": [API]}}));
    assert!(nx(API, "A"), "{API} is selected");
    assert!(nx("API.Example.TEST", "A"), "names match in any case");
    assert_real(&b.ask(b.dig(WEB, "A")), zone::WEB_V4, "web is not selected");
    assert_eq!(
        b.counters(&id),
        (2, 2),
        "matched/affected: the two api queries"
    );
    b.c.delete_fault(&id);

    let id = b.fault(json!({"type": "dns-error", "dns": {"names": ["*.example.test"]}}));
    assert!(nx(API, "A") && nx(WEB, "AAAA"), "subdomains are selected");
    assert_real(
        &b.ask(b.dig("example.test", "A")),
        zone::APEX_V4,
        "the apex is not",
    );
    assert_eq!(b.counters(&id), (2, 2));
    b.c.delete_fault(&id);

    let id = b.fault(json!({"type": "dns-error", "dns": {"types": ["AAAA"]}}));
    assert!(nx(API, "AAAA"), "AAAA is selected");
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "A is not");
    assert_eq!(b.counters(&id), (1, 1));
    b.c.delete_fault(&id);

    let id = b.fault(json!({"type": "dns-error", "percent": 30, "dns": {"names": [API]}}));
    let n: u16 = 400;
    let (p, nf) = (0.3, f64::from(n));
    let (mean, sigma) = (nf * p, (nf * p * (1.0 - p)).sqrt());
    // A correct datapath lands outside 3σ in 0.27% of samples: decided by
    // a majority of up to 3 samples, as the loss tests do.
    let samples = by_majority("dns-error percent 30", MAJORITY_OF, Duration::ZERO, |_| {
        let got = udp_queries(
            &b.client,
            b.server_udp(),
            &queries(n, API, RecordType::A),
            Duration::from_micros(500),
            200 * MS,
        )
        .expect("UDP queries");
        let mut errors = 0u64;
        for e in &got {
            let m = decoded(e).expect("every query is answered (error or real)");
            match m.response_code() {
                ResponseCode::NXDomain => errors += 1,
                ResponseCode::NoError => assert_eq!(
                    m.answers().first().and_then(|a| a.data().ip_addr()),
                    Some(ip(zone::API_V4))
                ),
                other => panic!("unexpected rcode {other}"),
            }
        }
        eprintln!(
            "percent 30: {errors}/{n} NXDOMAIN ({:.1}%), expected {mean:.0} ± {:.0} (3σ)",
            errors as f64 * 100.0 / nf,
            3.0 * sigma
        );
        let verdict = if (errors as f64 - mean).abs() <= 3.0 * sigma {
            Ok(())
        } else {
            Err(format!("{errors} of {n} outside 3σ of {mean}"))
        };
        (errors, verdict)
    });
    let sent = u64::from(n) * samples.len() as u64;
    let seen_errors: u64 = samples.iter().sum();
    let (matched, affected) = b.counters(&id);
    assert_eq!(
        (matched, affected),
        (sent, seen_errors),
        "the fault's counters agree with the client"
    );
    b.c.delete_fault(&id);
}

/// A query no fault selects is passed through untouched: the answer for
/// web.example.test with a fault on api.example.test is the answer without
/// any fault (status, flags, records, TTL, the server's own EDNS OPT), over
/// UDP and TCP, and a big answer still arrives whole over TCP.
#[test]
fn dns_unmatched_queries_pass_untouched_with_edns() {
    testbed::require_root!();
    let b = Bed::new(false);
    let edns = |d: Dig| d.opt("+edns=0").opt("+bufsize=1232");
    let key = |r: &DigResult| {
        (
            r.status.clone(),
            r.flags.clone(),
            r.question.clone(),
            r.answers.clone(),
            r.authority.clone(),
            r.edns_udp,
            r.transport.clone(),
        )
    };
    let before_udp = b.ask(edns(b.dig(WEB, "A")));
    let before_tcp = b.ask(edns(b.dig(WEB, "AAAA").tcp()));
    assert_eq!(before_udp.edns_udp, Some(zone::SERVER_EDNS_UDP));

    let id = b.fault(json!({"type": "dns-error", "rcode": "refused", "dns": {"names": [API]}}));
    assert_eq!(
        b.ask(b.dig(API, "A")).status.as_deref(),
        Some("REFUSED"),
        "the fault is active"
    );
    let udp = b.ask(edns(b.dig(WEB, "A")));
    let tcp = b.ask(edns(b.dig(WEB, "AAAA").tcp()));
    assert_eq!(key(&udp), key(&before_udp), "UDP: {}", udp.output);
    assert_eq!(key(&tcp), key(&before_tcp), "TCP: {}", tcp.output);
    assert_eq!(
        udp.edns_udp,
        Some(zone::SERVER_EDNS_UDP),
        "the server's OPT comes back"
    );
    let big = b.ask(b.dig("big.example.test", "A").opt("+noedns"));
    assert!(big.retried_tcp, "{}", big.output);
    assert_eq!(
        big.answers.len(),
        usize::from(zone::BIG_RECORDS),
        "{}",
        big.output
    );
    let (matched, affected) = b.counters(&id);
    assert_eq!(
        (matched, affected),
        (1, 1),
        "only the api query was selected"
    );
    b.c.delete_fault(&id);
}

/// dns-truncate on UDP and dns-error SERVFAIL on TCP: dig's TCP retry gets
/// the SERVFAIL; each fault alone does its part.
#[test]
fn dns_truncation_then_a_tcp_fault_on_the_retry() {
    testbed::require_root!();
    let b = Bed::new(false);
    let seen = b.server.queries_seen(API, "A");
    let trunc = b.fault_matching(json!({"protocol": "udp"}), json!({"type": "dns-truncate"}));
    let fail = b.fault_matching(
        json!({"protocol": "tcp"}),
        json!({"type": "dns-error", "rcode": "servfail"}),
    );
    let r = b.ask(b.dig(API, "A"));
    assert!(r.retried_tcp, "{}", r.output);
    assert_eq!(r.transport.as_deref(), Some("TCP"));
    assert_error(&r, "SERVFAIL", "api.example.test. IN A", "the TCP retry");
    let r = b.ask(b.dig(API, "A").tcp());
    assert_error(
        &r,
        "SERVFAIL",
        "api.example.test. IN A",
        "TCP from the start",
    );
    assert_eq!(
        b.server.queries_seen(API, "A"),
        seen,
        "no query reached the server"
    );
    let (_, truncated) = b.counters(&trunc);
    let (_, failed) = b.counters(&fail);
    assert_eq!(
        (truncated, failed),
        (1, 2),
        "one UDP truncated, two TCP failed"
    );

    b.c.delete_fault(&fail);
    let r = b.ask(b.dig(API, "A"));
    assert!(r.retried_tcp, "{}", r.output);
    assert_real(
        &r,
        zone::API_V4,
        "the retry passes once the TCP fault is gone",
    );
    b.c.delete_fault(&trunc);
    let r = b.ask(b.dig(API, "A"));
    assert!(!r.retried_tcp, "{}", r.output);
    assert_real(&r, zone::API_V4, "no fault");
}

/// Two answer-type faults pick the same query: the older one answers, over
/// UDP and TCP, whatever their ids; once it is gone, the other one does.
#[test]
fn dns_the_first_created_fault_answers() {
    testbed::require_root!();
    let b = Bed::new(false);
    let first = b.fault(json!({"type": "dns-error", "rcode": "servfail"}));
    // Apart by more than the creation stamp's millisecond.
    std::thread::sleep(Duration::from_millis(5));
    let second = b.fault(json!({"type": "dns-error", "rcode": "refused"}));
    for (dig, how) in [(b.dig(API, "A"), "UDP"), (b.dig(API, "A").tcp(), "TCP")] {
        let r = b.ask(dig);
        assert_error(&r, "SERVFAIL", "api.example.test. IN A", how);
    }
    assert_eq!(b.counters(&first), (2, 2));
    assert_eq!(b.counters(&second), (2, 0), "matched, not drawn");
    b.c.delete_fault(&first);
    let r = b.ask(b.dig(API, "A"));
    assert_error(&r, "REFUSED", "api.example.test. IN A", "the second, alone");
    b.c.delete_fault(&second);
}

/// IPv6 transport: the server on the pod's IPv6 address; dns-error and
/// AAAA spoofing work over it, UDP and TCP, for dig and glibc.
#[test]
fn dns_faults_over_ipv6_transport() {
    testbed::require_root!();
    let b = Bed::new(true);
    let v6 = b.server.v6().expect("an IPv6 server");
    let dig6 = |name: &str, qtype: &str| Dig::new(v6, name, qtype);
    assert_real(&b.ask(dig6(API, "AAAA")), zone::API_V6, "before");

    let id = b.fault(json!({"type": "dns-error", "rcode": "servfail"}));
    for d in [dig6(API, "A"), dig6(API, "AAAA").tcp()] {
        let r = b.ask(d);
        assert_error(&r, "SERVFAIL", &r.question.join(""), "over IPv6");
        assert!(
            r.question[0].starts_with("api.example.test. IN"),
            "{:?}",
            r.question
        );
    }
    b.c.delete_fault(&id);

    let id =
        b.fault(json!({"type": "dns-spoof", "addresses": ["fd00:66::1", "198.18.66.1"], "ttl": 5}));
    let r = b.ask(dig6(API, "AAAA"));
    assert_eq!(r.addresses(), [ip("fd00:66::1")], "{}", r.output);
    assert_eq!(r.answers[0].ttl, 5);
    let r = b.ask(dig6(API, "A").tcp());
    assert_eq!(r.addresses(), [ip("198.18.66.1")], "{}", r.output);
    let resolver = Resolver::new(&[v6], 1, 2).expect("resolv.conf");
    let l = getent_ahosts(&b.client, &resolver, API).expect("getent");
    let mut glibc = l.addresses.clone();
    glibc.sort();
    assert_eq!(glibc, [ip("198.18.66.1"), ip("fd00:66::1")], "{}", l.output);
    b.c.delete_fault(&id);
    assert_real(&b.ask(dig6(API, "AAAA")), zone::API_V6, "after removal");
}

/// Fail-open: the agent is SIGKILLed during a dns-error fault; a query
/// stream across the kill shows when real answers come back (within 3 s).
/// A restarted agent puts the fault back; deleting it restores the real
/// answer and the netns.
#[test]
fn dns_agent_killed_fails_open_and_restart_reinstalls() {
    testbed::require_root!();
    let mut b = Bed::new(false);
    let pristine = Pristine::of(&b.client);
    let id = b.fault(json!({"type": "dns-error", "dns": {"names": [API]}}));
    assert_eq!(b.ask(b.dig(API, "A")).status.as_deref(), Some("NXDOMAIN"));

    let server = b.server_udp();
    let sent = queries(400, API, RecordType::A);
    let (got, killed) = std::thread::scope(|s| {
        let client = &b.client;
        let stream = s.spawn(move || udp_queries(client, server, &sent, 10 * MS, 300 * MS));
        std::thread::sleep(500 * MS);
        b.c.agent.kill().expect("SIGKILL the agent");
        let killed = Instant::now();
        (
            stream
                .join()
                .expect("the query stream")
                .expect("UDP queries"),
            killed,
        )
    });
    let outcome = |e: &Exchange| decoded(e).map(|m| m.response_code());
    let before = got
        .iter()
        .filter(|e| e.sent_at + 50 * MS < killed)
        .filter(|e| outcome(e) == Some(ResponseCode::NXDomain))
        .count();
    assert!(
        before >= 10,
        "the fault answered before the kill ({before})"
    );
    // The first query from which every later one got the real answer.
    let recovered = got
        .iter()
        .rposition(|e| outcome(e) != Some(ResponseCode::NoError))
        .map_or(0, |i| i + 1);
    let lost = got.iter().filter(|e| e.answer.is_none()).count();
    let first = got
        .get(recovered)
        .expect("real answers came back before the stream ended");
    let after_kill = first.sent_at.saturating_duration_since(killed);
    eprintln!(
        "fail-open: real answers from {:.0} ms after SIGKILL; {lost} of {} queries unanswered across the kill",
        ms(after_kill),
        got.len()
    );
    assert!(
        after_kill <= Duration::from_secs(3),
        "resolution recovered only after {after_kill:?}"
    );
    assert_real(
        &b.ask(b.dig(API, "A")),
        zone::API_V4,
        "dig with the agent dead",
    );

    let restarted = Instant::now();
    b.c.agent.restart().expect("the agent restarts");
    let back = testbed::eventually(Duration::from_secs(5), || {
        b.ask(b.dig(API, "A").time(1)).status.as_deref() == Some("NXDOMAIN")
    });
    eprintln!(
        "restart: the fault answers again {:.0} ms after the restart began",
        ms(restarted.elapsed())
    );
    assert!(back, "the restarted agent did not put the fault back");
    b.c.delete_fault(&id);
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "after removal");
    pristine.assert_restored("removal after a restart");
}

/// Processes and threads whose network namespace is the one at `netns`.
fn netns_holders(netns: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(netns).map(|m| (m.dev(), m.ino())) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(tasks) = std::fs::read_dir(p.path().join("task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let ns = std::fs::metadata(t.path().join("ns/net")).map(|m| (m.dev(), m.ino()));
            if ns.ok() == Some(target) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.push(format!(
                    "{pid}/{} {}",
                    t.file_name().to_string_lossy(),
                    comm.trim()
                ));
            }
        }
    }
    out
}

/// No leftovers: deleting DNS faults restores the client's netns exactly
/// (nft, tc, routes, rules) and leaves no process in it; CNI DEL with a
/// DNS fault active removes the fault and everything of ours.
#[test]
fn dns_no_leftovers_after_delete_and_cni_del() {
    testbed::require_root!();
    let b = Bed::new(true);
    let pristine = Pristine::of(&b.client);
    let holders = netns_holders(b.client.netns_path());
    let ids = [
        b.fault(json!({"type": "dns-error", "dns": {"names": [API], "types": ["A"]}})),
        b.fault(json!({"type": "dns-delay", "delay": "20ms", "dns": {"names": [WEB]}})),
        b.fault_matching(
            json!({"protocol": "udp"}),
            json!({"type": "dns-truncate", "dns": {"types": ["TXT"]}}),
        ),
    ];
    assert_eq!(
        b.ask(b.dig(API, "A")).status.as_deref(),
        Some("NXDOMAIN"),
        "active"
    );
    assert!(b.ask(b.dig(API, "TXT")).retried_tcp, "active");
    let web = b.ask(b.dig(WEB, "A"));
    assert!(
        web.query_time.is_some_and(|t| t >= 19 * MS),
        "the delay is active: {}",
        web.output
    );
    eprintln!(
        "while active: {} nft objects, in the netns: {:?}",
        nft_objects(&b.client),
        netns_holders(b.client.netns_path())
    );
    for id in &ids {
        b.c.delete_fault(id);
    }
    pristine.assert_restored("after DELETE");
    assert_eq!(
        netns_holders(b.client.netns_path()),
        holders,
        "processes left in the netns"
    );
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "after DELETE");

    let id = b.fault(json!({"type": "dns-error"}));
    assert_eq!(
        b.ask(b.dig(API, "A").tcp()).status.as_deref(),
        Some("NXDOMAIN"),
        "active"
    );
    b.c.node.del_pod(&b.client).expect("CNI DEL");
    assert!(!b.c.has_fault(&id), "the fault is listed after DEL");
    assert!(!b.c.enrolled(&b.client), "enrolled after DEL");
    assert_no_nft_leftovers(&b.client, "after CNI DEL");
    // eth0 is gone with its veth; what is left must be a subset of before.
    let after = netns_state(b.client.netns_path(), "lo");
    assert_eq!(
        after.nft_tables, pristine.state.nft_tables,
        "nft tables after DEL"
    );
    assert_eq!(after.rules, pristine.state.rules, "policy rules after DEL");
    assert!(
        after.filters.is_empty() && after.tcx.is_empty(),
        "tc programs left after DEL: {after:?}"
    );
    let extra: Vec<&String> = after
        .routes
        .iter()
        .filter(|r| !pristine.state.routes.contains(r))
        .collect();
    assert!(extra.is_empty(), "routes left after DEL: {extra:?}");
    assert!(
        testbed::eventually(Duration::from_secs(2), || netns_holders(
            b.client.netns_path()
        )
        .is_empty()),
        "processes left in the netns after DEL: {:?}",
        netns_holders(b.client.netns_path())
    );
}

/// Bad DNS fault bodies are refused naming the field, and nothing is
/// created: not a fault, not a rule; queries still get real answers.
/// (No datapath needed.)
#[test]
fn dns_bad_input_names_the_field() {
    testbed::require_root!();
    let b = Bed::new(false);
    let client = b.c.agent.client();
    let target = json!({"sandbox": b.client.container_id});
    let cases = [
        (
            json!({"type": "dns-error", "rcode": "notimp"}),
            json!({}),
            "egress",
            "action.rcode",
        ),
        (
            json!({"type": "dns-error", "dns": {"names": ["a..b"]}}),
            json!({}),
            "egress",
            "action.dns.names[0]",
        ),
        (
            json!({"type": "dns-error", "dns": {"names": [API, "*"]}}),
            json!({}),
            "egress",
            "action.dns.names[1]",
        ),
        (
            json!({"type": "dns-error", "dns": {"types": ["AAA"]}}),
            json!({}),
            "egress",
            "action.dns.types[0]",
        ),
        (
            json!({"type": "dns-spoof", "addresses": ["198.18.0.1", "web"]}),
            json!({}),
            "egress",
            "action.addresses[1]",
        ),
        (
            json!({"type": "dns-spoof"}),
            json!({}),
            "egress",
            "action.addresses",
        ),
        (
            json!({"type": "dns-delay", "delay": "0s"}),
            json!({}),
            "egress",
            "action.delay",
        ),
        (
            json!({"type": "dns-error"}),
            json!({}),
            "ingress",
            "direction",
        ),
        (
            json!({"type": "dns-error"}),
            json!({"protocol": "icmp"}),
            "egress",
            "match.protocol",
        ),
    ];
    let list = || {
        client
            .call("GET", "/v1/faults", None)
            .expect("GET /v1/faults")
    };
    let faults_before = list();
    let pristine = Pristine::of(&b.client);
    for (action, matcher, direction, field) in cases {
        let body = json!({"target": target, "direction": direction, "match": matcher,
            "action": action, "duration": "30s"});
        let r = client
            .raw("POST", "/v1/faults", Some(body.to_string().as_bytes()))
            .expect("the agent answers");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        assert!((400..500).contains(&r.status), "{body}: {} {v}", r.status);
        assert_eq!(v["error"]["field"], field, "{body}: {v}");
        assert!(
            !v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{body}: no message"
        );
    }
    assert_eq!(list(), faults_before, "a refused request created a fault");
    pristine.assert_unchanged("a refused request touched the netns");
    assert_real(&b.ask(b.dig(API, "A")), zone::API_V4, "queries untouched");
}

/// Random bytes, for a datagram or a TCP message body.
fn random_bytes(rng: &mut rand::rngs::ThreadRng, max: usize) -> Vec<u8> {
    use rand::Rng;
    let n = rng.random_range(0..max);
    (0..n).map(|_| rng.random::<u8>()).collect()
}

/// `valid` with one random kind of damage: cut short, bytes flipped,
/// garbage appended, or header counts promising records that are not there.
fn mutated(rng: &mut rand::rngs::ThreadRng, valid: &[u8]) -> Vec<u8> {
    use rand::Rng;
    let mut m = valid.to_vec();
    match rng.random_range(0..4) {
        0 => m.truncate(rng.random_range(0..m.len())),
        1 => {
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..m.len());
                m[i] = rng.random();
            }
        }
        2 => m.extend((0..rng.random_range(1..200)).map(|_| rng.random::<u8>())),
        _ => {
            for byte in m.iter_mut().take(12).skip(4) {
                *byte = rng.random();
            }
        }
    }
    m
}

/// Sends `messages` from `client`, one TCP connection each, to `to:53`
/// (8 connections at a time): writes, half-closes, reads until EOF or
/// 200 ms. How many connections failed.
fn tcp_messages(client: &Pod, to: IpAddr, messages: &[Vec<u8>]) -> usize {
    std::thread::scope(|s| {
        let handles: Vec<_> = messages
            .chunks(messages.len().div_ceil(8).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    let mut failed = 0;
                    for bytes in chunk {
                        let Ok(mut conn) = connect(client, SocketAddr::new(to, 53)) else {
                            failed += 1;
                            continue;
                        };
                        if conn.write_all(bytes).is_err() {
                            failed += 1;
                        }
                        let _ = conn.shutdown(Shutdown::Write);
                        let _ = conn.set_read_timeout(Some(200 * MS));
                        let mut sink = Vec::new();
                        let _ = conn.read_to_end(&mut sink);
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a TCP sender"))
            .sum()
    })
}

/// A UDP and a TCP listener on port 53 of `pod` that record every datagram
/// and every connection's bytes (until EOF), for checking what passed
/// through untouched.
struct Sink {
    udp: Repeat<Vec<Vec<u8>>>,
    tcp: Repeat<Vec<Vec<u8>>>,
}

fn sink(pod: &Pod) -> Sink {
    let udp = in_pod(pod, || UdpSocket::bind((IpAddr::from([0u8; 4]), 53))).expect("UDP 53");
    udp.set_read_timeout(Some(20 * MS)).expect("timeout");
    let tcp = in_pod(pod, || TcpListener::bind((IpAddr::from([0u8; 4]), 53))).expect("TCP 53");
    tcp.set_nonblocking(true).expect("O_NONBLOCK");
    Sink {
        udp: Repeat::spawn(Vec::new(), move |got: &mut Vec<Vec<u8>>| {
            let mut buf = [0u8; 2048];
            if let Ok(n) = udp.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
        }),
        tcp: Repeat::spawn(Vec::new(), move |got: &mut Vec<Vec<u8>>| {
            match tcp.accept() {
                Ok((mut conn, _)) => {
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut bytes = Vec::new();
                    let _ = conn.read_to_end(&mut bytes);
                    got.push(bytes);
                }
                Err(_) => std::thread::sleep(MS),
            }
        }),
    }
}

/// Sorted, to compare what was sent with what arrived in any order.
fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

/// Random bytes and mutated queries to port 53 through an active
/// dns-error fault: to a plain sink (500 datagrams, 50 TCP messages), where
/// every one must arrive byte for byte (malformed messages pass through),
/// and to the DNS server (2000 datagrams, 200 TCP connections). The agent
/// stays up and counts the malformed ones; a selected query still gets the
/// fault's answer and another name the real one.
#[test]
fn dns_random_bytes_to_port_53_do_not_hurt_the_agent() {
    testbed::require_root!();
    let mut b = Bed::new(false);
    let sink_pod = b.c.pod("sink");
    let id = b.fault(json!({"type": "dns-error", "dns": {"names": [API]}}));
    let valid = query(7, API, RecordType::A);
    let mut rng = rand::rng();
    let any = testbed::unspecified(b.server.ip());
    let sock = in_pod(&b.client, move || UdpSocket::bind((any, 0))).expect("UDP socket");
    let send_all = |to: SocketAddr, dgrams: &[Vec<u8>]| {
        for (i, d) in dgrams.iter().enumerate() {
            sock.send_to(d, to).expect("send");
            if i % 50 == 49 {
                std::thread::sleep(MS);
            }
        }
    };
    let malformed_before = b.c.agent.metric("netfault_dns_malformed_total");

    // Through to a sink: random bytes are no query the fault selects.
    let sink_ip = sink_pod.ipv4().expect("the sink's address");
    let recorder = sink(&sink_pod);
    let dgrams: Vec<Vec<u8>> = (0..500).map(|_| random_bytes(&mut rng, 600)).collect();
    send_all(SocketAddr::new(sink_ip, 53), &dgrams);
    let malformed_udp = b.c.agent.metric("netfault_dns_malformed_total");
    let framed: Vec<Vec<u8>> = (0..50)
        .map(|_| {
            let body = random_bytes(&mut rng, 600);
            let len = u16::try_from(body.len()).unwrap_or(0);
            let mut m = len.to_be_bytes().to_vec();
            m.extend(body);
            m
        })
        .collect();
    let tcp_failed = tcp_messages(&b.client, sink_ip, &framed);
    std::thread::sleep(200 * MS);
    let (udp_got, tcp_got) = (recorder.udp.finish(), recorder.tcp.finish());
    let malformed_sink = b.c.agent.metric("netfault_dns_malformed_total");
    eprintln!(
        "fuzz to a sink: {}/{} datagrams and {}/{} TCP messages arrived; netfault_dns_malformed_total {malformed_before:?} -> {malformed_udp:?} (UDP) -> {malformed_sink:?} (TCP)",
        udp_got.len(),
        dgrams.len(),
        tcp_got.len(),
        framed.len()
    );
    assert_eq!(tcp_failed, 0, "TCP connections to port 53 failed");
    assert!(
        sorted(udp_got) == sorted(dgrams.clone()),
        "malformed datagrams must pass through byte for byte"
    );
    assert!(
        sorted(tcp_got) == sorted(framed.clone()),
        "malformed TCP messages must pass through byte for byte"
    );
    let delta = |a: Option<f64>, b: Option<f64>| b.unwrap_or(0.0) - a.unwrap_or(0.0);
    let (udp_counted, tcp_counted) = (
        delta(malformed_before, malformed_udp),
        delta(malformed_udp, malformed_sink),
    );
    assert!(
        udp_counted >= 250.0 && tcp_counted >= 25.0,
        "malformed messages are counted: +{udp_counted} of 500 datagrams, +{tcp_counted} of 50 TCP messages"
    );

    // To the server: random and mutated, UDP and TCP (some with a length
    // prefix that lies).
    let started = Instant::now();
    let dgrams: Vec<Vec<u8>> = (0..2000)
        .map(|i| {
            if i % 2 == 0 {
                random_bytes(&mut rng, 600)
            } else {
                mutated(&mut rng, &valid)
            }
        })
        .collect();
    send_all(b.server_udp(), &dgrams);
    let messages: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            let body = if i % 2 == 0 {
                random_bytes(&mut rng, 600)
            } else {
                mutated(&mut rng, &valid)
            };
            let mut framed = Vec::new();
            if i % 3 != 0 {
                let len = if i % 5 == 0 {
                    body.len() + 100
                } else {
                    body.len()
                };
                framed.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
            }
            framed.extend(body);
            framed
        })
        .collect();
    let tcp_failed = tcp_messages(&b.client, b.server.ip(), &messages);
    let malformed_after = b.c.agent.metric("netfault_dns_malformed_total");
    eprintln!(
        "fuzz to the server: 2000 datagrams and 200 TCP connections ({tcp_failed} failed) in {:.0} ms; counters {}; netfault_dns_malformed_total -> {malformed_after:?}",
        ms(started.elapsed()),
        b.c.get_fault(&id)["counters"]
    );
    assert_eq!(tcp_failed, 0, "TCP connections to port 53 failed");
    assert!(b.c.agent.is_running(), "the agent died");
    let health =
        b.c.agent
            .client()
            .raw("GET", "/healthz", None)
            .expect("the agent answers");
    assert_eq!(health.status, 200);
    for d in [b.dig(API, "A"), b.dig(API, "A").tcp()] {
        let r = b.ask(d);
        assert_error(&r, "NXDOMAIN", "api.example.test. IN A", "after the fuzz");
    }
    assert_real(&b.ask(b.dig(WEB, "A")), zone::WEB_V4, "after the fuzz, UDP");
    assert_real(
        &b.ask(b.dig(WEB, "A").tcp()),
        zone::WEB_V4,
        "after the fuzz, TCP",
    );
    assert!(b.server.is_running(), "the DNS server survived too");
    let counted = delta(malformed_sink, malformed_after);
    assert!(
        counted >= 500.0,
        "malformed messages to the server are counted: +{counted}"
    );
    b.c.delete_fault(&id);
}
