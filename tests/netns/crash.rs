//! Crash at every step: the agent is SIGKILLed at each named crash point
//! (`agent/src/crash.rs`, armed through `NETFAULT_CRASH_FILE`) of
//! enrolment, fault install and removal for every backend, reconcile at
//! start and CNI DEL, then restarted. Each test measures on the wire that
//! the fault is either fully in effect or fully absent, that the API's view
//! matches the wire, and that what follows (DELETE, CNI DEL) leaves the pod
//! netns exactly as it was, with no holder process.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{udp_probe, Pod};

use crate::support::{
    blackhole, connect, delay, fault_on, holders_of, in_pod, proto_port, udp_bind, v4, wait_for,
    Cluster, Pristine,
};

/// The file the agent reads at each crash point.
fn crash_file(c: &Cluster) -> PathBuf {
    c.dir.path().join("crash-at")
}

/// A cluster whose agent has its crash points armed.
fn armed() -> Cluster {
    let mut c = Cluster::new(false);
    let file = crash_file(&c);
    c.agent
        .set_env("NETFAULT_CRASH_FILE", &file.to_string_lossy());
    c.agent.restart().expect("agent with crash points");
    c
}

/// Runs `op` with the agent set to die at `point`; asserts it died there,
/// then starts it again (without a crash: the agent removed the file).
fn crash_at(c: &mut Cluster, point: &str, op: impl FnOnce(&Cluster)) {
    let file = crash_file(c);
    std::fs::write(&file, point).expect("arm the crash point");
    op(c);
    let t = Instant::now();
    while c.agent.is_running() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent did not die at {point}: {}",
            c.agent.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !file.exists(),
        "the agent died, but not at {point}: {}",
        c.agent.log_tail(20)
    );
    restart(c, point);
}

/// Starts the agent again; on failure, shows the end of its log.
fn restart(c: &mut Cluster, point: &str) {
    if let Err(e) = c.agent.restart() {
        let log = std::fs::read_to_string(c.agent.log_path()).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .filter(|l| !l.starts_with(' '))
            .take(15)
            .collect();
        panic!(
            "{point}: the agent does not start again: {e}\n{}",
            tail.join("\n")
        );
    }
}

/// A fault of one backend and how to see it on the wire between pods `a`
/// (the fault's pod) and `b`.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// eBPF: an egress UDP blackhole.
    Packet,
    /// NFQUEUE: 80 ms of egress delay on a TCP port (seen in connect times).
    Delay,
    /// Proxy: an immediate `tcp-reset` on a TCP port.
    Proxy,
    /// DNS queue engine: `dns-drop` of UDP queries to port 53.
    Dns,
}

const UDP_PORT: u16 = 7401;
const DELAY_PORT: u16 = 7402;
const PROXY_PORT: u16 = 7403;
const DELAY: Duration = Duration::from_millis(80);

impl Kind {
    fn body(self, a: &Pod) -> Value {
        match self {
            Kind::Packet => fault_on(a, "egress", proto_port("udp", UDP_PORT), blackhole(), "60s"),
            Kind::Delay => fault_on(
                a,
                "egress",
                proto_port("tcp", DELAY_PORT),
                delay("80ms"),
                "60s",
            ),
            Kind::Proxy => fault_on(
                a,
                "egress",
                proto_port("tcp", PROXY_PORT),
                json!({"type": "tcp-reset", "after_bytes": 0}),
                "60s",
            ),
            Kind::Dns => fault_on(
                a,
                "egress",
                json!({"protocol": "udp"}),
                json!({"type": "dns-drop"}),
                "60s",
            ),
        }
    }
}

/// The servers in pod `b` that the probes talk to.
struct Servers {
    _delay: TcpListener,
    _proxy: std::thread::JoinHandle<()>,
    _dns: std::thread::JoinHandle<()>,
}

fn servers(b: &Pod) -> Servers {
    let ip = v4(b);
    let delay = in_pod(b, move || {
        TcpListener::bind(SocketAddr::new(ip, DELAY_PORT))
    })
    .expect("listen in b");
    // Answers every connection with a greeting, then closes.
    let proxy = in_pod(b, move || {
        TcpListener::bind(SocketAddr::new(ip, PROXY_PORT))
    })
    .expect("listen in b");
    let proxy = std::thread::spawn(move || {
        for s in proxy.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.write_all(b"hi");
        }
    });
    // Echoes DNS queries back (a reply is all the probe needs).
    let dns = udp_bind(b, SocketAddr::new(ip, 53));
    let dns = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = dns.recv_from(&mut buf) {
            if n == 1 && buf[0] == 0 {
                return;
            }
            let _ = dns.send_to(&buf[..n], from);
        }
    });
    Servers {
        _delay: delay,
        _proxy: proxy,
        _dns: dns,
    }
}

/// A DNS query for `crash.example.test` A with id `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["crash", "example", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Of `tries` attempts, how many show the fault; panics unless all or none
/// do (a fault half in place).
fn all_or_none(kind: Kind, tries: usize, shows: impl Fn(usize) -> bool) -> bool {
    let seen: Vec<bool> = (0..tries).map(shows).collect();
    let n = seen.iter().filter(|s| **s).count();
    assert!(
        n == 0 || n == tries,
        "{kind:?}: the fault acted on {n} of {tries} attempts: half in place ({seen:?})"
    );
    n == tries
}

/// Whether `kind`'s fault acts on the wire from `a` to `b` now.
fn in_effect(kind: Kind, a: &Pod, b: &Pod) -> bool {
    let ip = v4(b);
    match kind {
        Kind::Packet => {
            let p = udp_probe(a, b, ip, UDP_PORT, 50, Duration::from_micros(200)).expect("probe");
            assert!(
                p.received == 0 || p.received == p.sent,
                "blackhole half in place: {} of {}",
                p.received,
                p.sent
            );
            p.received == 0
        }
        Kind::Delay => all_or_none(kind, 5, |_| {
            let t = Instant::now();
            let s = connect(a, SocketAddr::new(ip, DELAY_PORT)).expect("connect");
            drop(s);
            let took = t.elapsed();
            assert!(
                took >= DELAY - Duration::from_millis(5) || took < DELAY / 2,
                "a connect took {took:?}: neither delayed nor direct"
            );
            took >= DELAY - Duration::from_millis(5)
        }),
        Kind::Proxy => all_or_none(kind, 5, |_| {
            // The reset can come before connect() returns.
            let mut s = match connect(a, SocketAddr::new(ip, PROXY_PORT)) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("connect: {e}"),
            };
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 8];
            match s.read(&mut buf) {
                Ok(2) if &buf[..2] == b"hi" => false,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                other => panic!("neither the greeting nor a reset: {other:?}"),
            }
        }),
        Kind::Dns => all_or_none(kind, 5, |i| {
            let sock = in_pod(a, || UdpSocket::bind("0.0.0.0:0")).expect("bind in a");
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let q = dns_query(0x4e00 + i as u16);
            sock.send_to(&q, SocketAddr::new(ip, 53)).expect("send");
            let mut buf = [0u8; 512];
            match sock.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(&buf[..n], &q[..], "the echo");
                    false
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
                Err(e) => panic!("recv: {e}"),
            }
        }),
    }
}

/// The ids of the active faults the agent lists for `pod`.
fn listed(c: &Cluster, pod: &Pod) -> Vec<String> {
    c.all_faults()
        .iter()
        .filter(|f| f["sandbox"] == pod.container_id.as_str() && f["state"] == "active")
        .filter_map(|f| f["id"].as_str().map(String::from))
        .collect()
}

/// After the restart: the wire and the API agree (a listed fault acts, an
/// unlisted one does not); then every listed fault is deleted, and the pod
/// netns is as it was, with no holder left.
fn settle(c: &Cluster, kind: Kind, a: &Pod, b: &Pod, pristine: &Pristine<'_>, point: &str) {
    // The agent re-installs from its state at start; an adopted pending
    // enrolment comes within a reaper tick.
    std::thread::sleep(Duration::from_millis(100));
    let ids = listed(c, a);
    let acting = in_effect(kind, a, b);
    eprintln!(
        "{point}: {} listed, {} on the wire",
        ids.len(),
        if acting { "in effect" } else { "absent" }
    );
    assert_eq!(
        !ids.is_empty(),
        acting,
        "{point}: the API lists {ids:?} but the wire says the fault is {}",
        if acting { "in effect" } else { "absent" }
    );
    for id in &ids {
        c.delete_fault(id);
    }
    assert!(!in_effect(kind, a, b), "{point}: still acting after DELETE");
    pristine.assert_restored(&format!("{point}: after DELETE"));
    assert!(holders_of(a).is_empty(), "{point}: a holder is left");
}

/// Crash while installing `kind`'s fault at `point`.
fn crash_installing(kind: Kind, point: &str) {
    testbed::require_root!();
    let mut c = armed();
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    assert!(!in_effect(kind, &a, &b), "no fault yet");
    crash_at(&mut c, point, |c| {
        let r = c.agent.post_fault(&kind.body(&a));
        assert!(
            r.is_err(),
            "the POST answered although the agent died: {r:?}"
        );
    });
    settle(&c, kind, &a, &b, &pristine, point);
}

/// Crash while removing `kind`'s fault at `point`.
fn crash_removing(kind: Kind, point: &str) {
    testbed::require_root!();
    let mut c = armed();
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    let id = c.fault(kind.body(&a));
    assert!(in_effect(kind, &a, &b), "the fault acts before the crash");
    crash_at(&mut c, point, |c| {
        let r = c.agent.delete_fault(&id);
        assert!(r.is_err(), "the DELETE answered although the agent died");
    });
    settle(&c, kind, &a, &b, &pristine, point);
}

/// Crash in the reconcile at start, with `kind`'s fault installed.
fn crash_reconciling(kind: Kind, point: &str) {
    testbed::require_root!();
    let mut c = armed();
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    c.fault(kind.body(&a));
    assert!(in_effect(kind, &a, &b), "the fault acts before the restart");
    std::fs::write(crash_file(&c), point).expect("arm");
    // The start dies in its reconcile: not ready.
    let first = c.agent.restart();
    assert!(first.is_err(), "the agent came up through {point}");
    assert!(
        !crash_file(&c).exists(),
        "the agent died, but not at {point}"
    );
    restart(&mut c, point);
    settle(&c, kind, &a, &b, &pristine, point);
}

/// Crash in an enrolment (CNI ADD) whose annotation asks for a birth-time
/// blackhole: the pod starts anyway (fail-open), and the agent adopts it
/// with its fault on restart, or not at all, never half.
fn crash_enrolling(point: &str) {
    testbed::require_root!();
    let mut c = armed();
    let b = c.pod("b");
    let _servers = servers(&b);
    let annotations = [
        ("netfault.io/blackhole".to_string(), "true".to_string()),
        ("netfault.io/direction".to_string(), "egress".to_string()),
    ]
    .into_iter()
    .collect();
    let mut pod = None;
    crash_at(&mut c, point, |c| {
        pod = Some(
            c.node
                .add_pod("a", &annotations)
                .expect("CNI ADD succeeds with the agent dying (fail-open)"),
        );
    });
    let a = pod.expect("pod a");
    // Adopted from the pending dir within a reaper tick (500 ms).
    wait_for("pod a enrolled after the restart", || c.enrolled(&a));
    let ids = listed(&c, &a);
    let acting = in_effect(Kind::Packet, &a, &b);
    assert_eq!(!ids.is_empty(), acting, "{point}: API {ids:?} vs wire");
    assert!(
        acting,
        "{point}: the birth-time fault must be in place once enrolled"
    );
    c.node.del_pod(&a).expect("CNI DEL");
    assert!(!c.enrolled(&a), "{point}: released at DEL");
    assert!(listed(&c, &a).is_empty());
}

/// Crash in CNI DEL of a pod with a fault of every backend. The runtime
/// removes the netns after DEL; the restarted agent forgets the sandbox
/// and leaves nothing on the node.
fn crash_releasing(point: &str) {
    testbed::require_root!();
    let mut c = armed();
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    for kind in [Kind::Packet, Kind::Delay, Kind::Proxy, Kind::Dns] {
        c.fault(kind.body(&a));
        assert!(in_effect(kind, &a, &b), "{kind:?} acts");
    }
    assert_eq!(holders_of(&a).len(), 2, "delay and DNS holders");
    crash_at(&mut c, point, |c| {
        c.node
            .del_pod(&a)
            .expect("CNI DEL succeeds with the agent dying (fail-open)");
    });
    assert!(holders_of(&a).is_empty(), "{point}: a holder outlived DEL");
    let id = a.container_id.clone();
    drop(a);
    restart(&mut c, point);
    let sandboxes = c.agent.sandboxes().expect("GET /v1/sandboxes");
    assert!(
        !Value::from(sandboxes).to_string().contains(&id),
        "{point}: the released sandbox is still enrolled"
    );
    let all = c.all_faults();
    assert!(
        !all.iter()
            .any(|f| f["sandbox"] == id.as_str() && f["state"] == "active"),
        "{point}: faults of the released sandbox are still active: {all:?}"
    );
}

macro_rules! crash_tests {
    ($($name:ident => $body:expr;)*) => {
        $(
            #[test]
            fn $name() {
                $body
            }
        )*
    };
}

crash_tests! {
    crash_packet_install_rules_set => crash_installing(Kind::Packet, "ebpf.rules-set");
    crash_packet_install_synced => crash_installing(Kind::Packet, "install.synced.ebpf-tc");
    crash_packet_install_persisted => crash_installing(Kind::Packet, "install.persisted.ebpf-tc");
    crash_packet_remove_synced => crash_removing(Kind::Packet, "remove.synced.ebpf-tc");
    crash_packet_reconcile => crash_reconciling(Kind::Packet, "reconcile.synced.ebpf-tc");
    crash_delay_install_holder_set => crash_installing(Kind::Delay, "netfault.holder-set");
    crash_delay_install_synced => crash_installing(Kind::Delay, "install.synced.nfqueue");
    crash_delay_install_persisted => crash_installing(Kind::Delay, "install.persisted.nfqueue");
    crash_delay_remove_synced => crash_removing(Kind::Delay, "remove.synced.nfqueue");
    crash_delay_reconcile => crash_reconciling(Kind::Delay, "reconcile.synced.nfqueue");
    crash_proxy_install_rules_set => crash_installing(Kind::Proxy, "proxy.rules-set");
    crash_proxy_install_synced => crash_installing(Kind::Proxy, "install.synced.proxy");
    crash_proxy_install_persisted => crash_installing(Kind::Proxy, "install.persisted.proxy");
    crash_proxy_remove_synced => crash_removing(Kind::Proxy, "remove.synced.proxy");
    crash_proxy_reconcile => crash_reconciling(Kind::Proxy, "reconcile.synced.proxy");
    crash_dns_install_holder_set => crash_installing(Kind::Dns, "netfault_dns.holder-set");
    crash_dns_install_udp_applied => crash_installing(Kind::Dns, "proxy.dns-udp-applied");
    crash_dns_install_synced => crash_installing(Kind::Dns, "install.synced.proxy");
    crash_dns_remove_synced => crash_removing(Kind::Dns, "remove.synced.proxy");
    crash_enrol_recorded => crash_enrolling("enrol.recorded");
    crash_enrol_persisted => crash_enrolling("enrol.persisted");
    crash_release_backends => crash_releasing("release.backends");
}
