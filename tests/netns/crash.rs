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
/// The live proxied stream of the hand-over test.
const STREAM_PORT: u16 = 7409;
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
    _delay: std::thread::JoinHandle<()>,
    _proxy: std::thread::JoinHandle<()>,
    _dns: std::thread::JoinHandle<()>,
}

fn servers(b: &Pod) -> Servers {
    let ip = v4(b);
    let delay = in_pod(b, move || {
        TcpListener::bind(SocketAddr::new(ip, DELAY_PORT))
    })
    .expect("listen in b");
    // Accepts and closes (a full backlog would drop SYNs).
    let delay = std::thread::spawn(move || {
        for s in delay.incoming() {
            if s.is_err() {
                return;
            }
        }
    });
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
    match kind {
        Kind::Packet => acts_once(kind, a, b, 0),
        _ => all_or_none(kind, 5, |i| acts_once(kind, a, b, i)),
    }
}

/// One probe of `kind`'s fault from `a` to `b` (the `i`th): whether it acted.
fn acts_once(kind: Kind, a: &Pod, b: &Pod, i: usize) -> bool {
    try_acts_once(kind, a, b, i).unwrap_or_else(|e| panic!("{kind:?}: {e}"))
}

/// [`acts_once`], with what is neither the fault nor the direct answer
/// (a lost connection, a half-applied fault) as an error.
fn try_acts_once(kind: Kind, a: &Pod, b: &Pod, i: usize) -> Result<bool, String> {
    let ip = v4(b);
    match kind {
        Kind::Packet => {
            let p = udp_probe(a, b, ip, UDP_PORT, 50, Duration::from_micros(200))
                .map_err(|e| format!("probe: {e}"))?;
            if p.received != 0 && p.received != p.sent {
                return Err(format!(
                    "blackhole half in place: {} of {}",
                    p.received, p.sent
                ));
            }
            Ok(p.received == 0)
        }
        Kind::Delay => {
            let t = Instant::now();
            let s =
                connect(a, SocketAddr::new(ip, DELAY_PORT)).map_err(|e| format!("connect: {e}"))?;
            drop(s);
            let took = t.elapsed();
            if took < DELAY - Duration::from_millis(5) && took >= DELAY / 2 {
                return Err(format!(
                    "a connect took {took:?}: neither delayed nor direct"
                ));
            }
            Ok(took >= DELAY - Duration::from_millis(5))
        }
        Kind::Proxy => {
            // The reset can come before connect() returns.
            let mut s = match connect(a, SocketAddr::new(ip, PROXY_PORT)) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(true),
                Err(e) => return Err(format!("connect: {e}")),
            };
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 8];
            match s.read(&mut buf) {
                Ok(2) if &buf[..2] == b"hi" => Ok(false),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(true),
                other => Err(format!("neither the greeting nor a reset: {other:?}")),
            }
        }
        Kind::Dns => {
            let sock = in_pod(a, || UdpSocket::bind("0.0.0.0:0")).expect("bind in a");
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let q = dns_query(0x4e00u16.wrapping_add(i as u16));
            sock.send_to(&q, SocketAddr::new(ip, 53)).expect("send");
            let mut buf = [0u8; 512];
            match sock.recv(&mut buf) {
                Ok(n) if buf[..n] == q[..] => Ok(false),
                Ok(n) => Err(format!("not the echo: {:?}", &buf[..n])),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Ok(true)
                }
                Err(e) => Err(format!("recv: {e}")),
            }
        }
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

/// Every backend's kind, for the lost-state test.
const KINDS: [Kind; 4] = [Kind::Packet, Kind::Delay, Kind::Proxy, Kind::Dns];

/// A lost state file: the agent is killed with a fault of every backend in
/// place, its `state.json` is removed, and it starts again knowing nothing.
/// The earlier agent's eBPF blackhole still acts (the kernel holds it to
/// its deadline) and its nft tables are still in the netns. Once the pod is
/// found again (here by its netns path; CRI adoption finds it through the
/// runtime's list the same way) everything the earlier agent left is
/// removed: the blackhole stops on the wire, and when the new fault is
/// deleted the netns is exactly as before its first fault, with no holder.
#[test]
fn a_lost_state_file_is_swept_when_the_pod_is_found_again() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    for kind in KINDS {
        c.fault(kind.body(&a));
    }
    for kind in KINDS {
        assert!(in_effect(kind, &a, &b), "{kind:?} acts before the crash");
    }

    c.agent.kill().expect("SIGKILL the agent");
    let state = c.agent.state_dir().join("state.json");
    std::fs::remove_file(&state).expect("remove the state file");
    // The proxy's lease runs out 2 s after its agent died.
    std::thread::sleep(Duration::from_millis(2500));
    restart(&mut c, "lost state");
    assert!(c.all_faults().is_empty(), "the new agent knows no fault");
    assert!(
        in_effect(Kind::Packet, &a, &b),
        "the earlier agent's blackhole acts until its deadline"
    );
    for kind in [Kind::Delay, Kind::Proxy, Kind::Dns] {
        assert!(!in_effect(kind, &a, &b), "{kind:?} failed open");
    }
    assert_ne!(
        crate::support::pod_state(&a),
        pristine.state,
        "the earlier agent's objects are still in the netns"
    );

    // Found again by path: an unrelated blackhole on another port.
    const OTHER: u16 = 7499;
    let t = Instant::now();
    let id = c.fault(json!({
        "target": {"netns": a.netns.path()},
        "direction": "egress",
        "match": proto_port("udp", OTHER),
        "action": blackhole(),
        "duration": "60s",
    }));
    eprintln!(
        "lost state: the implicit enrolment and its sweep took {:?}",
        t.elapsed()
    );
    let ip = v4(&b);
    let other = udp_probe(&a, &b, ip, OTHER, 50, Duration::from_micros(200)).expect("probe");
    assert_eq!(other.received, 0, "the new blackhole acts");
    assert!(
        !in_effect(Kind::Packet, &a, &b),
        "the earlier agent's blackhole is gone"
    );
    c.delete_fault(&id);
    let other = udp_probe(&a, &b, ip, OTHER, 50, Duration::from_micros(200)).expect("probe");
    assert_eq!(other.received, other.sent, "nothing acts after DELETE");
    pristine.assert_restored("lost state: after DELETE");
    assert!(holders_of(&a).is_empty(), "lost state: a holder is left");
}

/// One probe: when it started and ended, and what it saw.
type Sample = (Instant, Instant, Result<bool, String>);

/// One probe thread per kind in `KINDS` ([`probe_until`]).
fn spawn_probes<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    a: &'env Pod,
    b: &'env Pod,
    stop: &'env std::sync::atomic::AtomicBool,
) -> Vec<std::thread::ScopedJoinHandle<'scope, Vec<Sample>>> {
    KINDS
        .iter()
        .map(|&kind| s.spawn(move || probe_until(kind, a, b, stop)))
        .collect()
}

/// Probes `kind` from `a` to `b` back to back, 5 ms apart, until `stop`.
fn probe_until(kind: Kind, a: &Pod, b: &Pod, stop: &std::sync::atomic::AtomicBool) -> Vec<Sample> {
    let mut seen = Vec::new();
    let mut i = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = Instant::now();
        let r = try_acts_once(kind, a, b, i);
        seen.push((t, Instant::now(), r));
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

/// Prints, per kind, when its probes changed between seeing the fault, the
/// direct answer and something else, in seconds from `t0`.
fn print_timeline(samples: &[Vec<Sample>], t0: Instant) {
    for (kind, seen) in KINDS.iter().zip(samples) {
        let mut last = None;
        for (start, _, r) in seen {
            let now = match r {
                Ok(true) => "fault",
                Ok(false) => "direct",
                Err(_) => "failed",
            };
            if last != Some(now) {
                let at = start.saturating_duration_since(t0).as_secs_f64()
                    - t0.saturating_duration_since(*start).as_secs_f64();
                eprintln!("  {kind:?} at {at:+.3} s: {now}");
                last = Some(now);
            }
        }
    }
}

/// The time over which probes of one kind saw no fault: from the first
/// probe that started after `from` and saw none to the end of the last
/// one that saw none (zero when every probe saw the fault).
fn gap(samples: &[Sample]) -> Duration {
    let misses: Vec<&Sample> = samples.iter().filter(|s| s.2 != Ok(true)).collect();
    match (misses.first(), misses.last()) {
        (Some(first), Some(last)) => last.1.duration_since(first.0),
        _ => Duration::ZERO,
    }
}

/// SIGTERM and restart (a DaemonSet rollout) with a fault of every backend
/// on one pod, each probed on the wire without pause from before the
/// SIGTERM until 3 s after the new agent answers. The eBPF fault lives in
/// the kernel: no probe may miss it. The delay and DNS holders and the
/// proxy live in the agent's processes: the time their probes saw no fault
/// is measured and printed, and must not outlast the restart by more than
/// the proxy's 2 s lease. Every fault is in effect again afterwards.
#[test]
fn sigterm_restart_gap_per_backend() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    for kind in KINDS {
        c.fault(kind.body(&a));
    }
    for kind in KINDS {
        assert!(in_effect(kind, &a, &b), "{kind:?} acts before the restart");
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sigterm_at = std::sync::Mutex::new(None::<Instant>);
    let (restart_took, samples) = std::thread::scope(|s| {
        let probes = spawn_probes(s, &a, &b, &stop);
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        *sigterm_at.lock().expect("lock") = Some(t);
        c.agent
            .stop(Duration::from_secs(10))
            .expect("SIGTERM the agent");
        restart(&mut c, "sigterm");
        let took = t.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples: Vec<_> = probes
            .into_iter()
            .map(|p| p.join().expect("probe thread"))
            .collect();
        (took, samples)
    });
    eprintln!("SIGTERM to the new agent answering: {restart_took:?}");
    let t0 = sigterm_at
        .lock()
        .expect("lock")
        .expect("the SIGTERM was sent");
    print_timeline(&samples, t0);
    for (kind, seen) in KINDS.iter().zip(&samples) {
        let passed = seen.iter().filter(|s| s.2 == Ok(false)).count();
        let failed: Vec<&String> = seen.iter().filter_map(|s| s.2.as_ref().err()).collect();
        eprintln!(
            "{kind:?}: {} probes, {passed} saw no fault, {} failed {failed:?}, gap {:?}",
            seen.len(),
            failed.len(),
            gap(seen)
        );
        assert!(seen.len() >= 3, "{kind:?}: too few probes");
        // Allowed: a delayed connect in flight at the SIGTERM comes early
        // (the holder releases what it holds at once), and the proxy's
        // outbound diversion holds SYNs on a dead listener until its lease
        // runs out (a connect attempt times out).
        let allowed = |e: &String| match kind {
            Kind::Delay => e.contains("neither delayed nor direct"),
            Kind::Proxy => e.contains("timed out"),
            Kind::Packet | Kind::Dns => false,
        };
        let unexplained: Vec<&&String> = failed.iter().filter(|e| !allowed(e)).collect();
        assert!(
            unexplained.is_empty(),
            "{kind:?}: probes saw neither the fault nor the direct answer: {unexplained:?}"
        );
        assert!(
            seen.last().is_some_and(|s| s.2 == Ok(true)),
            "{kind:?}: not in effect again after the restart"
        );
    }
    assert_eq!(
        gap(&samples[0]),
        Duration::ZERO,
        "the eBPF fault never pauses"
    );
    for (kind, seen) in KINDS.iter().zip(&samples).skip(1) {
        assert!(
            gap(seen) <= restart_took + Duration::from_millis(2500),
            "{kind:?}: a gap of {:?} outlasts the restart ({restart_took:?}) and the lease",
            gap(seen)
        );
    }
}

/// Hand-over (a DaemonSet rollout with `maxSurge`): with a fault of every
/// backend on one pod, each probed on the wire without pause, a second
/// agent starts beside the first on the same socket and state dir. It
/// freezes the first, installs every fault beside it (its own delay and
/// DNS holders on the other queue numbers, its own proxy listeners, the
/// diversions switched in one kernel transaction each) and commits; the
/// first retires, and at SIGTERM lets its holders release what they hold
/// at its time and exits. No probe of any backend may miss its fault at
/// any moment, and no probe may see anything but the fault. A live stream
/// through the proxy (a connection open before the hand-over, echoing
/// every 10 ms) never breaks or stalls: it stays on the retired agent,
/// whose SIGTERM waits for it to close. Afterwards the new agent serves
/// every fault, only its holders run, and deleting the faults leaves the
/// netns exactly as before them.
#[test]
fn handover_to_a_new_agent_has_no_gap() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    let mut ids: Vec<String> = KINDS.iter().map(|k| c.fault(k.body(&a))).collect();
    for kind in KINDS {
        assert!(
            in_effect(kind, &a, &b),
            "{kind:?} acts before the hand-over"
        );
    }
    let before_holders = holders_of(&a);
    assert_eq!(before_holders.len(), 2, "a delay and a DNS holder");
    // A live stream through the proxy: a connection that an `http-abort`
    // fault on its port diverts (raw bytes are relayed), open before the
    // hand-over and echoing every 10 ms until after it.
    let _echo = testbed::tcp_listen(&b, STREAM_PORT).expect("echo in b");
    let abort = json!({"type": "http-abort", "status": 503});
    ids.push(c.fault(fault_on(
        &a,
        "egress",
        proto_port("tcp", STREAM_PORT),
        abort,
        "60s",
    )));
    let mut stream = connect(&a, SocketAddr::new(v4(&b), STREAM_PORT)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let echo_once = |s: &mut std::net::TcpStream, i: u32| -> Result<Duration, String> {
        let t = Instant::now();
        s.write_all(&i.to_be_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut back = [0u8; 4];
        s.read_exact(&mut back).map_err(|e| format!("echo: {e}"))?;
        if back != i.to_be_bytes() {
            return Err(format!("echo {back:?} for {i}"));
        }
        Ok(t.elapsed())
    };
    echo_once(&mut stream, 0).expect("the stream echoes");
    assert_eq!(
        c.agent.metric("netfault_proxy_open_connections"),
        Some(1.0),
        "the stream goes through the proxy"
    );
    let old_pid = c.agent.pid();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stop_stream = std::sync::atomic::AtomicBool::new(false);
    let (took, drained, samples, echoes) = std::thread::scope(|s| {
        let stop_stream = &stop_stream;
        let streamer = s.spawn(move || {
            let mut echoes = Vec::new();
            let mut i = 1;
            while !stop_stream.load(std::sync::atomic::Ordering::Relaxed) {
                echoes.push(echo_once(&mut stream, i));
                i += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            // Closing it lets the retired agent finish.
            drop(stream);
            echoes
        });
        let probes = spawn_probes(s, &a, &b, &stop);
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        let next = c
            .agent
            .start_successor()
            .unwrap_or_else(|e| panic!("the new agent does not take over: {e}"));
        let took = t.elapsed();
        let mut old = std::mem::replace(&mut c.agent, next);
        // The stream keeps going on the retired agent for a second after
        // its SIGTERM, which waits for it.
        let closer = s.spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            stop_stream.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        std::thread::sleep(Duration::from_millis(500));
        let t = Instant::now();
        old.stop(Duration::from_secs(25))
            .expect("SIGTERM the earlier agent");
        let drained = t.elapsed();
        closer.join().expect("closer");
        let echoes = streamer.join().expect("stream thread");
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let samples: Vec<_> = probes
            .into_iter()
            .map(|p| p.join().expect("probe thread"))
            .collect();
        (took, drained, samples, echoes)
    });
    let slowest = echoes.iter().filter_map(|e| e.as_ref().ok()).max().copied();
    let broken: Vec<&String> = echoes.iter().filter_map(|e| e.as_ref().err()).collect();
    eprintln!(
        "live proxied stream: {} echoes, slowest {slowest:?}, {} failed {broken:?}",
        echoes.len(),
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "the live proxied stream broke: {broken:?}"
    );
    assert!(
        slowest.is_some_and(|d| d < Duration::from_millis(500)),
        "the live proxied stream stalled: {slowest:?}"
    );
    assert!(
        drained >= Duration::from_millis(900),
        "the earlier agent exited ({drained:?}) before its proxied stream closed"
    );
    eprintln!(
        "the new agent took over in {took:?}; the earlier one exited {drained:?} after SIGTERM"
    );
    let t0 = samples
        .iter()
        .filter_map(|s| s.first().map(|f| f.0))
        .min()
        .expect("probes ran");
    print_timeline(&samples, t0);
    if samples.iter().any(|s| gap(s) > Duration::ZERO) {
        let log = std::fs::read_to_string(c.agent.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "agent log:\n{}",
            lines[lines.len().saturating_sub(80)..].join("\n")
        );
    }
    for (kind, seen) in KINDS.iter().zip(&samples) {
        let missed = seen.iter().filter(|s| s.2 == Ok(false)).count();
        let failed: Vec<&String> = seen.iter().filter_map(|s| s.2.as_ref().err()).collect();
        eprintln!(
            "{kind:?}: {} probes, {missed} saw no fault, {} saw something else {failed:?}, gap {:?}",
            seen.len(),
            failed.len(),
            gap(seen)
        );
        assert!(seen.len() >= 10, "{kind:?}: too few probes");
        assert!(
            failed.is_empty(),
            "{kind:?}: probes saw neither the fault nor the direct answer: {failed:?}"
        );
        assert_eq!(
            gap(seen),
            Duration::ZERO,
            "{kind:?}: a gap in the hand-over"
        );
    }
    assert!(
        drained < Duration::from_secs(20),
        "the earlier agent did not drain in time"
    );
    // Only the new agent's holders run, and it serves every fault.
    let after_holders = holders_of(&a);
    assert_eq!(
        after_holders.len(),
        2,
        "the new agent's delay and DNS holders"
    );
    assert!(
        after_holders.iter().all(|p| !before_holders.contains(p)),
        "an earlier holder is left: {before_holders:?} -> {after_holders:?}"
    );
    assert_ne!(c.agent.pid(), old_pid);
    for id in &ids {
        assert_eq!(
            c.get_fault(id)["state"],
            "active",
            "{id} after the hand-over"
        );
    }
    for kind in KINDS {
        assert!(in_effect(kind, &a, &b), "{kind:?} acts after the hand-over");
    }
    for id in &ids {
        c.delete_fault(id);
    }
    pristine.assert_restored("after the hand-over and DELETE");
    assert!(holders_of(&a).is_empty(), "a holder is left after DELETE");
}

/// Holds `STATE_DIR/successor.lock` as a new agent does while it takes
/// the node over; dropping it is that agent dying.
fn successor_lock(c: &Cluster) -> nix::fcntl::Flock<std::fs::File> {
    let path = c.agent.state_dir().join("successor.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the successor lock");
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| e)
        .expect("take the successor lock")
}

/// Whether `netfaultctl health` (the DaemonSet's probes) passes.
fn health_ok(c: &Cluster) -> bool {
    std::process::Command::new(testbed::workspace_bin("netfaultctl"))
        .arg("--socket")
        .arg(c.agent.socket())
        .arg("health")
        .output()
        .expect("run netfaultctl")
        .status
        .success()
}

/// The hand-over protocol's edges, with a fault acting on the wire: a body
/// without `successor` is a 400 naming it; a freeze without a live new
/// agent (one holding the successor lock) is a 409; while frozen, every
/// change is refused with 503 `unavailable` and changes nothing (the
/// blackhole in place keeps acting, the API lists the same faults); a
/// second new agent and a commit for an id that did not freeze are refused
/// with 409 naming `successor`; `/healthz` answers with `serving: false`
/// and `netfaultctl health` fails (a new agent is not ready while the old
/// one answers for it); a freeze no commit follows ends by itself
/// at its limit (here 2 s) even while the new agent lives, and one whose
/// new agent dies ends at once; after each, the agent serves again (a
/// DELETE removes the blackhole on the wire).
#[test]
fn a_freeze_refuses_changes_and_ends_without_a_commit() {
    testbed::require_root!();
    let c = Cluster::with_agent_args(&["--handover-freeze-limit", "2s"]);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let id = c.fault(Kind::Packet.body(&a));
    assert!(in_effect(Kind::Packet, &a, &b), "the blackhole acts");
    let client = c.agent.client();
    let call = |method: &str, path: &str, body: Value| {
        let bytes = body.to_string();
        let body = (!body.is_null()).then_some(bytes.as_bytes());
        let r = client.raw(method, path, body).expect("the agent answers");
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, v)
    };
    let (status, v) = call("POST", "/v1/handover", json!({}));
    assert_eq!(
        (status, &v["error"]["field"]),
        (400, &json!("successor")),
        "{v}"
    );
    let (status, v) = call("POST", "/v1/handover", json!({"successor": 7}));
    assert_eq!(
        (status, &v["error"]["field"]),
        (409, &json!("successor")),
        "no new agent: {v}"
    );

    let loss = |port: u16| {
        fault_on(
            &a,
            "egress",
            proto_port("udp", port),
            json!({"type": "loss", "percent": 100}),
            "60s",
        )
    };
    for (round, dies) in [("the limit", false), ("the new agent's death", true)] {
        let lock = successor_lock(&c);
        let (status, v) = call("POST", "/v1/handover", json!({"successor": 7}));
        assert_eq!(
            (status, &v["state"]),
            (200, &json!("frozen")),
            "{round}: {v}"
        );
        let (status, v) = call("POST", "/v1/handover", json!({"successor": 8}));
        assert_eq!(
            (status, &v["error"]["field"]),
            (409, &json!("successor")),
            "{round}: {v}"
        );
        let listed = call("GET", "/v1/faults", Value::Null).1;
        let (status, v) = call("POST", "/v1/faults", loss(UDP_PORT + 100));
        assert_eq!(
            (status, &v["error"]["code"]),
            (503, &json!("unavailable")),
            "{round}: {v}"
        );
        let (status, v) = call("DELETE", &format!("/v1/faults/{id}"), Value::Null);
        assert_eq!(
            (status, &v["error"]["code"]),
            (503, &json!("unavailable")),
            "{round}: {v}"
        );
        assert_eq!(
            call("GET", "/v1/faults", Value::Null).1,
            listed,
            "{round}: nothing changed"
        );
        assert!(
            in_effect(Kind::Packet, &a, &b),
            "{round}: the blackhole acts while frozen"
        );
        let (status, v) = call("POST", "/v1/handover/commit", json!({"successor": 8}));
        assert_eq!(
            (status, &v["error"]["field"]),
            (409, &json!("successor")),
            "{round}: {v}"
        );
        // Answering, but not ready (the DaemonSet's readiness probe).
        let (status, v) = call("GET", "/healthz", Value::Null);
        assert_eq!(
            (status, &v["serving"]),
            (200, &json!(false)),
            "{round}: {v}"
        );
        assert!(
            !health_ok(&c),
            "{round}: netfaultctl health passes while frozen"
        );
        let t = Instant::now();
        if dies {
            drop(lock);
        } else {
            std::thread::sleep(Duration::from_millis(2100));
        }
        // Serving again: a change goes through.
        let (status, v) = call("POST", "/v1/faults", loss(UDP_PORT + 101 + dies as u16));
        assert_eq!(
            status, 201,
            "{round}: serving again after the freeze ended: {v}"
        );
        eprintln!(
            "freeze ended by {round}: serving again {:?} later",
            t.elapsed()
        );
        assert!(
            health_ok(&c),
            "{round}: netfaultctl health fails after the freeze"
        );
    }
    c.delete_fault(&id);
    wait_for("the blackhole is gone after DELETE", || {
        !acts_once(Kind::Packet, &a, &b, 1)
    });
}

/// A new agent that dies after installing everything beside the running
/// agent, before it commits (crash point `handover.installed`): it had
/// switched the diversions to its own holders and listeners, which died
/// with it. The frozen agent sees the new agent's lock go, serves again and
/// reclaims every sandbox: every backend's fault acts on the wire again
/// (through this agent's queues, listeners and programs), the API lists
/// them active, and DELETE leaves the netns exactly as before, with no
/// holder.
#[test]
fn a_new_agent_dying_before_its_commit_leaves_the_running_agent_in_charge() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    let ids: Vec<String> = KINDS.iter().map(|k| c.fault(k.body(&a))).collect();
    for kind in KINDS {
        assert!(in_effect(kind, &a, &b), "{kind:?} acts before");
    }
    let crash = c.dir.path().join("crash-successor");
    std::fs::write(&crash, "handover.installed").expect("arm the crash point");
    let crash_env = crash.to_string_lossy().into_owned();
    let t = Instant::now();
    let r = c
        .agent
        .start_successor_with_env(&[("NETFAULT_CRASH_FILE", crash_env.as_str())]);
    assert!(r.is_err(), "the new agent died before it was ready");
    assert!(!crash.exists(), "the new agent reached handover.installed");
    for kind in KINDS {
        wait_for(
            &format!("{kind:?} acts again through the running agent"),
            || in_effect(kind, &a, &b),
        );
    }
    eprintln!(
        "every fault acts again {:?} after the new agent started",
        t.elapsed()
    );
    for id in &ids {
        assert_eq!(c.get_fault(id)["state"], "active", "{id}");
    }
    assert_eq!(
        holders_of(&a).len(),
        2,
        "the running agent's delay and DNS holders"
    );
    for id in &ids {
        c.delete_fault(id);
    }
    pristine.assert_restored("after the failed hand-over and DELETE");
    assert!(holders_of(&a).is_empty(), "a holder is left after DELETE");
}
