//! Concurrency (issue 12, section 3): racing POSTs and DELETEs of faults of
//! every backend on one pod, concurrent CNI ADD and DEL of 50 pods while
//! API faults are posted, and a DELETE during an install. Every request is
//! timed against a bound (no hang, no deadlock); afterwards the API's list
//! must be exactly what the requests left, the wire must show exactly the
//! listed faults, and what was deleted must leave nothing: the pod netns as
//! before (tc, tcx, nft, routes, rules), no holder, no sandbox, no record in
//! the state file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Barrier, Mutex};
use std::time::{Duration, Instant};

use netfault_api::ClientError;
use rand::Rng;
use serde_json::{json, Value};
use testbed::{http_get, http_serve, quantile, udp_probe, HttpServer, Pod};

use crate::support::{
    blackhole, connect, delay, fault_on, holders_of, in_pod, loss, nft_ruleset, proto_port,
    udp_bind, v4, wait_for, Cluster, Pristine, Repeat,
};

/// No API request may take longer than this (the client gives up at 10 s).
const HUNG: Duration = Duration::from_secs(5);

/// The delay the delay faults add (seen in TCP connect times).
/// A delayed SYN cannot arrive sooner; a direct connect on this loaded
/// 2-core machine has taken 90 ms, never near this.
const DELAY: Duration = Duration::from_millis(250);
const DELAY_STR: &str = "250ms";

/// One fault of each backend (and both kinds of proxy fault), each acting
/// on its own port so that the wire tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// eBPF: 100% loss of egress UDP.
    Loss,
    /// NFQUEUE: 250 ms of egress delay on a TCP port.
    Delay,
    /// Proxy: `http-abort` 503 on an HTTP port.
    Http,
    /// Proxy: an immediate `tcp-reset` on a TCP port.
    Reset,
    /// DNS queue engine: `dns-drop` of UDP queries.
    Dns,
}

const KINDS: [Kind; 5] = [Kind::Loss, Kind::Delay, Kind::Http, Kind::Reset, Kind::Dns];

/// A fault of `kind` on one of two ports (`slot` 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct F {
    kind: Kind,
    slot: usize,
}

impl F {
    fn port(self) -> u16 {
        let base = match self.kind {
            Kind::Loss => 7701,
            Kind::Delay => 7702,
            Kind::Http => 7703,
            Kind::Reset => 7704,
            Kind::Dns => return [53, 5353][self.slot],
        };
        base + 10 * self.slot as u16
    }

    fn body(self, a: &Pod) -> Value {
        let port = self.port();
        let (matcher, action) = match self.kind {
            Kind::Loss => (proto_port("udp", port), loss(100)),
            Kind::Delay => (proto_port("tcp", port), delay(DELAY_STR)),
            // Port 0 also diverts the held connections' port.
            Kind::Http if self.slot == 0 => (
                json!({"protocol": "tcp", "ports": format!("{port},{HELD_PORT}")}),
                json!({"type": "http-abort", "status": 503}),
            ),
            Kind::Http => (
                proto_port("tcp", port),
                json!({"type": "http-abort", "status": 503}),
            ),
            Kind::Reset => (
                proto_port("tcp", port),
                json!({"type": "tcp-reset", "after_bytes": 0}),
            ),
            // Port 53 is a DNS port without `ports`.
            Kind::Dns if port == 53 => (json!({"protocol": "udp"}), json!({"type": "dns-drop"})),
            Kind::Dns => (proto_port("udp", port), json!({"type": "dns-drop"})),
        };
        fault_on(a, "egress", matcher, action, "120s")
    }
}

/// A port in `b` whose server answers the one line a connection sends
/// with the same line, whenever it comes (no idle timeout): connections
/// held open across changes of the proxy. Its bytes are not HTTP, so an
/// `http-*` fault relays them untouched.
const HELD_PORT: u16 = 7720;

/// The servers in pod `b` the probes talk to, on both slots' ports;
/// dropping them stops them.
struct Servers {
    _threads: Vec<Repeat<()>>,
    _http: Vec<HttpServer>,
}

/// A thread that accepts on `listener` and hands each connection to `serve`.
fn acceptor(listener: TcpListener, serve: fn(TcpStream)) -> Repeat<()> {
    listener.set_nonblocking(true).expect("nonblocking");
    Repeat::spawn((), move |_| match listener.accept() {
        Ok((s, _)) => {
            let _ = s.set_nonblocking(false);
            serve(s)
        }
        Err(_) => std::thread::sleep(Duration::from_millis(2)),
    })
}

fn servers(b: &Pod) -> Servers {
    let ip = v4(b);
    let listen = |port: u16| {
        in_pod(b, move || TcpListener::bind(SocketAddr::new(ip, port))).expect("listen in b")
    };
    let mut threads = vec![acceptor(listen(HELD_PORT), |s| {
        std::thread::spawn(move || echo_line(s));
    })];
    let mut http = Vec::new();
    for slot in [0, 1] {
        let port = |kind| F { kind, slot }.port();
        // Connections are only counted (their connect time is the probe).
        threads.push(acceptor(listen(port(Kind::Delay)), drop));
        // A greeting, then close.
        threads.push(acceptor(listen(port(Kind::Reset)), |mut s| {
            let _ = s.write_all(b"hi");
        }));
        http.push(http_serve(b, port(Kind::Http)).expect("HTTP server in b"));
        // Echoes DNS queries back (a reply is all the probe needs).
        let dns = udp_bind(b, SocketAddr::new(ip, port(Kind::Dns)));
        dns.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        threads.push(Repeat::spawn((), move |_| {
            let mut buf = [0u8; 512];
            if let Ok((n, from)) = dns.recv_from(&mut buf) {
                let _ = dns.send_to(&buf[..n], from);
            }
        }));
    }
    Servers {
        _threads: threads,
        _http: http,
    }
}

/// Reads one line and writes it back, then closes.
fn echo_line(mut s: TcpStream) {
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    while !line.ends_with(b"\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => line.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(&line);
}

/// A DNS query for `race.example.test` A with id `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["race", "example", "test"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Of `tries` attempts, whether all show the fault (true) or none (false);
/// panics when only some do (a fault half in place).
fn all_or_none(f: F, tries: usize, shows: impl Fn(usize) -> bool) -> bool {
    let seen: Vec<bool> = (0..tries).map(shows).collect();
    let n = seen.iter().filter(|s| **s).count();
    assert!(
        n == 0 || n == tries,
        "{f:?}: the fault acted on {n} of {tries} attempts: half in place ({seen:?})"
    );
    n == tries
}

/// Whether fault `f` acts on the wire from `a` to `b` now.
fn in_effect(f: F, a: &Pod, b: &Pod) -> bool {
    let ip = v4(b);
    let port = f.port();
    match f.kind {
        Kind::Loss => {
            let p = udp_probe(a, b, ip, port, 50, Duration::from_micros(200)).expect("probe");
            assert_eq!(p.send_errors, 0, "loss is silent");
            assert!(
                p.received == 0 || p.received == p.sent,
                "{f:?}: 100% loss half in place: {} of {}",
                p.received,
                p.sent
            );
            p.received == 0
        }
        Kind::Delay => all_or_none(f, 3, |_| {
            let t = Instant::now();
            let s = connect(a, SocketAddr::new(ip, port)).expect("connect");
            drop(s);
            // A delayed connect takes the delay at least.
            t.elapsed() >= DELAY - Duration::from_millis(5)
        }),
        Kind::Http => all_or_none(f, 3, |_| {
            let r = http_get(a, ip, port, "/race").expect("HTTP GET");
            assert!(
                r.status == 503 || r.status == 200,
                "{f:?}: neither the server's 200 nor the fault's 503: {r:?}"
            );
            r.status == 503
        }),
        Kind::Reset => all_or_none(f, 3, |_| {
            // The reset can come before connect() returns.
            let mut s = match connect(a, SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("{f:?}: connect: {e}"),
            };
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let mut buf = [0u8; 8];
            match s.read(&mut buf) {
                Ok(2) if &buf[..2] == b"hi" => false,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
                other => panic!("{f:?}: neither the greeting nor a reset: {other:?}"),
            }
        }),
        Kind::Dns => all_or_none(f, 3, |i| {
            let sock = in_pod(a, || UdpSocket::bind("0.0.0.0:0")).expect("bind in a");
            sock.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            let q = dns_query(0x5200 + i as u16);
            sock.send_to(&q, SocketAddr::new(ip, port)).expect("send");
            let mut buf = [0u8; 512];
            match sock.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!(&buf[..n], &q[..], "{f:?}: the echo");
                    false
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
                Err(e) => panic!("{f:?}: recv: {e}"),
            }
        }),
    }
}

/// The `p` quantile of `v` (zero when empty).
fn q(v: &[Duration], p: f64) -> Duration {
    quantile(v, p).unwrap_or_default()
}

/// Every request's outcome and latency.
#[derive(Default)]
struct Ops {
    posts: u64,
    created: u64,
    /// Refusals by status (the fault cap, a released sandbox).
    refused: BTreeMap<u16, u64>,
    deletes: u64,
    latencies: Vec<Duration>,
}

impl Ops {
    fn record(&mut self, took: Duration, what: &str) {
        assert!(took < HUNG, "{what} took {took:?}: a request hung");
        self.latencies.push(took);
    }

    /// One line for the report: counts, rate over `wall`, latency.
    fn summary(&mut self, wall: Duration) -> String {
        self.latencies.sort();
        let n = self.latencies.len();
        let max = self.latencies.last().copied().unwrap_or_default();
        let tail = if n >= 100 {
            format!("p99 {:.1?}, max {max:.1?}", q(&self.latencies, 0.99))
        } else {
            format!("max {max:.1?}")
        };
        format!(
            "{} POSTs ({} created, refused {:?}), {} DELETEs in {wall:.2?}: {:.0} ops/s; latency p50 {:.1?}, {tail}",
            self.posts,
            self.created,
            self.refused,
            self.deletes,
            n as f64 / wall.as_secs_f64(),
            q(&self.latencies, 0.5),
        )
    }
}

/// `POST /v1/faults`, timed: the id, or `None` for a refusal whose status
/// is in `refusals`; panics on anything else (an I/O error is a hang).
fn post(c: &Cluster, body: &Value, ops: &Mutex<Ops>, refusals: &[u16]) -> Option<String> {
    let t = Instant::now();
    let r = c.agent.client().call("POST", "/v1/faults", Some(body));
    let took = t.elapsed();
    let mut ops = ops.lock().expect("ops");
    ops.record(took, "a POST");
    ops.posts += 1;
    match r {
        Ok(v) => {
            ops.created += 1;
            Some(v["id"].as_str().expect("an id").to_string())
        }
        Err(ClientError::Api { status, .. }) if refusals.contains(&status) => {
            *ops.refused.entry(status).or_default() += 1;
            None
        }
        Err(e) => panic!("POST {body}: {e}"),
    }
}

/// `DELETE /v1/faults/ID`, timed; panics unless it succeeds.
fn delete(c: &Cluster, id: &str, ops: &Mutex<Ops>) {
    let t = Instant::now();
    let r = c.agent.delete_fault(id);
    let took = t.elapsed();
    let mut ops = ops.lock().expect("ops");
    ops.record(took, "a DELETE");
    ops.deletes += 1;
    if let Err(e) = r {
        panic!("DELETE {id}: {e}");
    }
}

/// Every fault the agent lists for `pod`, by id, with its state.
fn listed(c: &Cluster, pod: &Pod) -> BTreeMap<String, String> {
    c.all_faults()
        .iter()
        .filter(|f| f["sandbox"] == pod.container_id.as_str())
        .map(|f| {
            (
                f["id"].as_str().unwrap_or_default().to_string(),
                f["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The pod's nft ruleset holds nothing (the `metainfo` entry aside).
fn assert_no_nft(pod: &Pod, when: &str) {
    let rs = nft_ruleset(pod);
    let objects: Vec<&Value> = rs["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| o.get("metainfo").is_none())
        .collect();
    assert!(objects.is_empty(), "{when}: nft objects left: {objects:?}");
}

/// The pod netns is as before its first fault, with no nft object and no
/// holder process.
fn assert_pristine(pristine: &Pristine<'_>, pod: &Pod, when: &str) {
    pristine.assert_restored(when);
    assert_no_nft(pod, when);
    assert!(
        holders_of(pod).is_empty(),
        "{when}: holders left: {:?}",
        holders_of(pod)
    );
}

/// Many threads create and delete faults of every backend on one pod for
/// 4 s: a POST and at once a DELETE of the id it returned; a DELETE of each
/// id racing the POST of the next; DELETEs of random live ids (some already
/// being deleted). No request may hang; the API must then list exactly the
/// faults no DELETE named, each acting on the wire and nothing else; a
/// connection proxied before the race still gets its answer; and after
/// deleting everything the pod netns is as before.
#[test]
fn racing_post_and_delete_on_one_pod() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    for k in KINDS {
        let f = F { kind: k, slot: 0 };
        assert!(!in_effect(f, &a, &b), "{f:?} acts before any fault");
    }

    // A connection proxied before the race (on a port no racing fault
    // names), open throughout: the proxies that come and go meanwhile
    // must never cut it.
    let h = c.fault(
        F {
            kind: Kind::Http,
            slot: 0,
        }
        .body(&a),
    );
    let held = connect(&a, SocketAddr::new(v4(&b), HELD_PORT)).expect("connect");
    wait_for("the proxy carries the connection", || {
        c.agent.metric("netfault_proxy_open_connections") == Some(1.0)
    });
    c.delete_fault(&h);

    let ops = Mutex::new(Ops::default());
    // Every id a POST returned, and every id a DELETE answered for.
    let created: Mutex<BTreeMap<String, Kind>> = Mutex::new(BTreeMap::new());
    let deleted: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    // The ids the random deleter picks from (not the faults left to stay).
    let pool: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let race = Duration::from_secs(4);
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    // The fault cap (32 live faults per pod) may refuse a POST.
    let refusals = [403];
    let body = |k: Kind| F { kind: k, slot: 0 }.body(&a);
    let make = |k: Kind, pooled: bool| -> Option<String> {
        let id = post(&c, &body(k), &ops, &refusals)?;
        created.lock().expect("created").insert(id.clone(), k);
        if pooled {
            pool.lock().expect("pool").push(id.clone());
        }
        Some(id)
    };
    let remove = |id: &str| {
        delete(&c, id, &ops);
        deleted.lock().expect("deleted").insert(id.to_string());
    };
    std::thread::scope(|s| {
        // POST, then DELETE the id just returned; the last POST stays.
        for t in 0..2 {
            let (make, remove, stop) = (&make, &remove, &stop);
            s.spawn(move || {
                let mut i = t * 2;
                loop {
                    let k = KINDS[i % KINDS.len()];
                    i += 1;
                    let last = stop.load(Ordering::Acquire);
                    if let Some(id) = make(k, !last) {
                        if last {
                            return;
                        }
                        remove(&id);
                    }
                }
            });
        }
        // A poster and a deleter: the DELETE of each id races the POST of
        // the next.
        let (tx, rx) = mpsc::channel::<String>();
        {
            let (make, stop) = (&make, &stop);
            s.spawn(move || {
                let mut i = 3;
                while !stop.load(Ordering::Acquire) {
                    if let Some(id) = make(KINDS[i % KINDS.len()], true) {
                        let _ = tx.send(id);
                    }
                    i += 1;
                }
            });
        }
        {
            let remove = &remove;
            s.spawn(move || {
                while let Ok(id) = rx.recv() {
                    remove(&id);
                }
            });
        }
        // DELETEs of random ids POSTed so far (live, being deleted, or gone).
        {
            let (remove, stop, pool) = (&remove, &stop, &pool);
            s.spawn(move || {
                let mut rng = rand::rng();
                while !stop.load(Ordering::Acquire) {
                    let id = {
                        let ids = pool.lock().expect("pool");
                        (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())].clone())
                    };
                    match id {
                        Some(id) => remove(&id),
                        None => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            });
        }
        std::thread::sleep(race);
        stop.store(true, Ordering::Release);
    });
    let wall = started.elapsed();
    let mut ops = ops.into_inner().expect("ops");
    eprintln!("racing POST/DELETE on one pod: {}", ops.summary(wall));

    let created = created.into_inner().expect("created");
    let deleted = deleted.into_inner().expect("deleted");
    let survivors: BTreeMap<String, Kind> = created
        .iter()
        .filter(|(id, _)| !deleted.contains(*id))
        .map(|(id, k)| (id.clone(), *k))
        .collect();
    let list = listed(&c, &a);
    let expected: BTreeMap<String, String> = survivors
        .keys()
        .map(|id| (id.clone(), "active".to_string()))
        .collect();
    assert_eq!(
        list, expected,
        "the API must list exactly the faults no DELETE named"
    );
    assert!(
        !survivors.is_empty(),
        "the last POST of each POST-then-DELETE thread stays"
    );
    for k in KINDS {
        let f = F { kind: k, slot: 0 };
        let listed = survivors.values().any(|s| *s == k);
        let acting = in_effect(f, &a, &b);
        eprintln!(
            "  {k:?}: {} listed, {}",
            survivors.values().filter(|s| **s == k).count(),
            if acting { "in effect" } else { "absent" }
        );
        assert_eq!(listed, acting, "{k:?}: listed {listed}, acting {acting}");
    }

    for id in survivors.keys() {
        c.delete_fault(id);
    }
    for k in KINDS {
        let f = F { kind: k, slot: 0 };
        assert!(!in_effect(f, &a, &b), "{f:?} acts after the last DELETE");
    }
    assert!(listed(&c, &a).is_empty(), "no fault is listed");
    // Also now that the last proxy fault is gone.
    assert_held(held, "the connection held through the race");
    assert_pristine(&pristine, &a, "after deleting everything");
}

/// For each backend, rounds of: a fault on port 0; then its DELETE and the
/// POST of a fault of the same backend on port 1 at the same time (the
/// backend's last fault goes while another is being installed; for the
/// proxy kinds a connection it proxies stays open, so the removal drains);
/// then the DELETE of that one racing the POST of a third on port 0, which
/// is deleted as soon as its 201 arrives. After each step the API's list
/// must be what the answers say, and each port must show its fault on the
/// wire exactly when one is listed. At the end the pod netns is as before.
#[test]
fn delete_during_install_loses_no_fault() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    let ops = Mutex::new(Ops::default());
    let started = Instant::now();

    // The API's list and the wire agree on both ports of `kind`; `want`
    // is what the answers left.
    let check = |kind: Kind, want: &[(String, F)], when: &str| {
        let list = listed(&c, &a);
        let expected: BTreeMap<String, String> = want
            .iter()
            .map(|(id, _)| (id.clone(), "active".to_string()))
            .collect();
        assert_eq!(list, expected, "{kind:?} {when}: the API's list");
        for slot in [0, 1] {
            let f = F { kind, slot };
            let present = want.iter().any(|(_, w)| *w == f);
            let acting = in_effect(f, &a, &b);
            assert_eq!(
                present,
                acting,
                "{f:?} {when}: the API says {}, the wire {}",
                if present { "present" } else { "gone" },
                if acting { "in effect" } else { "absent" }
            );
        }
    };
    // Runs `x` and `y` at the same time.
    let both = |x: &(dyn Fn() + Sync), y: &(dyn Fn() -> Option<String> + Sync)| {
        let go = Barrier::new(2);
        std::thread::scope(|s| {
            let got = s.spawn(|| {
                go.wait();
                y()
            });
            go.wait();
            x();
            got.join().expect("the POST thread")
        })
    };

    let rounds = 3;
    for kind in KINDS {
        let f0 = F { kind, slot: 0 };
        let f1 = F { kind, slot: 1 };
        for round in 0..rounds {
            let old = post(&c, &f0.body(&a), &ops, &[]).expect("created");
            check(kind, &[(old.clone(), f0)], &format!("round {round}: first"));
            // A connection the proxy carries, open across the removal.
            let held = match kind {
                Kind::Http => Some(connect(&a, SocketAddr::new(v4(&b), HELD_PORT)).expect("hold")),
                _ => None,
            };
            let new = both(&|| delete(&c, &old, &ops), &|| {
                post(&c, &f1.body(&a), &ops, &[])
            })
            .expect("created beside a DELETE");
            check(
                kind,
                &[(new.clone(), f1)],
                &format!("round {round}: DELETE of port 0 during the install on port 1"),
            );
            let third = both(&|| delete(&c, &new, &ops), &|| {
                let id = post(&c, &f0.body(&a), &ops, &[])?;
                // Right after the 201.
                delete(&c, &id, &ops);
                Some(id)
            })
            .expect("created beside a DELETE");
            assert!(!listed(&c, &a).contains_key(&third), "{third} deleted");
            check(
                kind,
                &[],
                &format!("round {round}: DELETEs during and right after an install"),
            );
            // The connection proxied before the removals still gets the
            // server's answer, relayed without a fault.
            if let Some(held) = held {
                assert_held(held, &format!("round {round}"));
            }
        }
        pristine.assert_restored(&format!("{kind:?}: after its rounds"));
    }
    let wall = started.elapsed();
    let mut ops = ops.into_inner().expect("ops");
    eprintln!(
        "DELETE during install ({rounds} rounds x {} kinds): {}",
        KINDS.len(),
        ops.summary(wall)
    );
    assert_pristine(&pristine, &a, "after every round");
}

/// A pod of the 50-pod churn: whether it stays and whether it was born
/// with an annotation fault.
struct Churned {
    pod: Pod,
    stays: bool,
    birth: bool,
    add: Duration,
    del: Option<Duration>,
}

/// UDP port the birth-time annotation blackholes (egress).
const BIRTH_PORT: u16 = 7801;
/// UDP port the API blackholes (egress).
const API_UDP_PORT: u16 = 7802;
/// TCP port the API delays (egress, [`DELAY`]).
const API_DELAY_PORT: u16 = 7803;
/// A port no fault names.
const FREE_PORT: u16 = 7809;

/// 50 pods go through CNI ADD at once on 5 threads, a third of them with a
/// birth-time annotation fault, and half of them through CNI DEL soon
/// after, while another thread posts API faults (an eBPF blackhole, a
/// delay) on the pods alive at that moment. Bounded time throughout; the
/// agent is alive after; every pod that stays is enrolled with exactly the
/// faults its annotation and the successful POSTs gave it, and a sample of
/// them shows those faults on the wire; every deleted pod left nothing
/// (sandbox list, fault list, holders, state file).
#[test]
fn concurrent_cni_add_and_del_of_50_pods() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let peer = c.pod("peer");
    let ip = v4(&peer);
    let delay_listener = in_pod(&peer, move || {
        TcpListener::bind(SocketAddr::new(ip, API_DELAY_PORT))
    })
    .expect("listen in peer");
    let _delay_server = acceptor(delay_listener, drop);

    const PODS: usize = 50;
    const WORKERS: usize = 5;
    let birth: BTreeMap<String, String> = [(
        "netfault.io/faults".to_string(),
        json!([{
            "direction": "egress",
            "match": {"protocol": "udp", "ports": BIRTH_PORT.to_string()},
            "action": {"type": "blackhole"},
            "duration": "10m",
        }])
        .to_string(),
    )]
    .into_iter()
    .collect();
    let none = BTreeMap::new();
    // Container ids of the pods alive now (the poster's targets).
    let live: Mutex<Vec<String>> = Mutex::new(Vec::new());
    // Per container id, the ids of the API faults created on it, and whether
    // each is the blackhole (true) or the delay.
    let posted: Mutex<BTreeMap<String, Vec<(String, bool)>>> = Mutex::new(BTreeMap::new());
    let ops = Mutex::new(Ops::default());
    let adding = AtomicBool::new(true);
    let started = Instant::now();
    let mut churned: Vec<Churned> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (c, live, birth, none) = (&c, &live, &birth, &none);
                s.spawn(move || {
                    let mut rng = rand::rng();
                    let mut mine = Vec::new();
                    for i in (w..PODS).step_by(WORKERS) {
                        let with_birth = i.is_multiple_of(3);
                        let stays = i.is_multiple_of(2);
                        let t = Instant::now();
                        let pod = c
                            .node
                            .add_pod(&format!("p{i}"), if with_birth { birth } else { none })
                            .unwrap_or_else(|e| panic!("CNI ADD p{i}: {e}"));
                        let add = t.elapsed();
                        live.lock().expect("live").push(pod.container_id.clone());
                        mine.push(Churned {
                            pod,
                            stays,
                            birth: with_birth,
                            add,
                            del: None,
                        });
                        // DEL an earlier pod of this worker's that goes,
                        // some time after its ADD.
                        std::thread::sleep(Duration::from_millis(rng.random_range(0..50)));
                        // The poster may still pick it during the DEL.
                        if let Some(p) = mine.iter_mut().find(|p| !p.stays && p.del.is_none()) {
                            let t = Instant::now();
                            c.node
                                .del_pod(&p.pod)
                                .unwrap_or_else(|e| panic!("CNI DEL {}: {e}", p.pod.name));
                            p.del = Some(t.elapsed());
                            live.lock()
                                .expect("live")
                                .retain(|id| *id != p.pod.container_id);
                        }
                    }
                    mine
                })
            })
            .collect();
        // API faults on the pods alive now (some about to go).
        let poster = {
            let (c, live, posted, ops, adding) = (&c, &live, &posted, &ops, &adding);
            s.spawn(move || {
                let mut rng = rand::rng();
                let mut i = 0u64;
                while adding.load(Ordering::Acquire) {
                    let target = {
                        let l = live.lock().expect("live");
                        (!l.is_empty()).then(|| l[rng.random_range(0..l.len())].clone())
                    };
                    let Some(id) = target else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let hole = i.is_multiple_of(2);
                    i += 1;
                    let sandbox = json!({"sandbox": id});
                    let body = if hole {
                        json!({"target": sandbox, "direction": "egress",
                               "match": proto_port("udp", API_UDP_PORT),
                               "action": blackhole(), "duration": "10m"})
                    } else {
                        json!({"target": sandbox, "direction": "egress",
                               "match": proto_port("tcp", API_DELAY_PORT),
                               "action": delay(DELAY_STR), "duration": "10m"})
                    };
                    // 404: the pod was deleted (or not yet enrolled).
                    if let Some(fault) = post(c, &body, ops, &[404]) {
                        posted
                            .lock()
                            .expect("posted")
                            .entry(id)
                            .or_default()
                            .push((fault, hole));
                    }
                }
            })
        };
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("a CNI worker panicked"));
        }
        adding.store(false, Ordering::Release);
        poster.join().expect("the poster panicked");
        all
    });
    // What is still to go (a worker's last pods).
    for p in churned.iter_mut().filter(|p| !p.stays && p.del.is_none()) {
        let t = Instant::now();
        c.node.del_pod(&p.pod).expect("CNI DEL");
        p.del = Some(t.elapsed());
    }
    let wall = started.elapsed();
    let adds: Vec<Duration> = {
        let mut v: Vec<Duration> = churned.iter().map(|p| p.add).collect();
        v.sort();
        v
    };
    let dels: Vec<Duration> = {
        let mut v: Vec<Duration> = churned.iter().filter_map(|p| p.del).collect();
        v.sort();
        v
    };
    let mut ops = ops.into_inner().expect("ops");
    eprintln!(
        "50 pods: {} CNI ADDs (p50 {:?}, max {:?}) and {} DELs (p50 {:?}, max {:?}) in {wall:.2?}; API faults meanwhile: {}",
        adds.len(),
        q(&adds, 0.5),
        adds.last().copied().unwrap_or_default(),
        dels.len(),
        q(&dels, 0.5),
        dels.last().copied().unwrap_or_default(),
        ops.summary(wall)
    );
    // The CNI plugin gives up on the agent after 2 s (and the pod starts).
    for (what, v) in [("ADD", &adds), ("DEL", &dels)] {
        let max = v.last().copied().unwrap_or_default();
        assert!(max < HUNG, "a CNI {what} took {max:?}");
    }
    assert!(c.agent.is_running(), "the agent is alive");

    // Staying pods are enrolled (a timed-out ADD is adopted from the
    // pending dir within a reaper tick), deleted ones are not.
    let posted = posted.into_inner().expect("posted");
    let staying: BTreeSet<String> = churned
        .iter()
        .filter(|p| p.stays)
        .map(|p| p.pod.container_id.clone())
        .chain([peer.container_id.clone()])
        .collect();
    let enrolled = || -> BTreeSet<String> {
        c.agent
            .sandboxes()
            .expect("GET /v1/sandboxes")
            .iter()
            .filter_map(|s| s["id"].as_str().map(String::from))
            .collect()
    };
    wait_for("the sandbox list is the staying pods", || {
        enrolled() == staying
    });
    let state = std::fs::read_to_string(c.agent.state_dir().join("state.json")).expect("state");
    let all = c.all_faults();
    for p in &churned {
        let id = &p.pod.container_id;
        let faults: Vec<&Value> = all.iter().filter(|f| f["sandbox"] == id.as_str()).collect();
        if p.stays {
            let api: BTreeSet<String> = faults
                .iter()
                .filter(|f| f["source"] == "api")
                .filter_map(|f| f["id"].as_str().map(String::from))
                .collect();
            let want: BTreeSet<String> = posted
                .get(id)
                .into_iter()
                .flatten()
                .map(|(f, _)| f.clone())
                .collect();
            assert_eq!(api, want, "{}: its API faults", p.pod.name);
            let births = faults
                .iter()
                .filter(|f| f["source"] == "annotation")
                .count();
            assert_eq!(
                births,
                usize::from(p.birth),
                "{}: its birth-time fault",
                p.pod.name
            );
            assert!(
                faults.iter().all(|f| f["state"] == "active"),
                "{}: {faults:?}",
                p.pod.name
            );
        } else {
            assert!(
                faults.is_empty(),
                "{}: faults outlived DEL: {faults:?}",
                p.pod.name
            );
            assert!(
                holders_of(&p.pod).is_empty(),
                "{}: a holder outlived DEL",
                p.pod.name
            );
            assert!(
                !state.contains(id.as_str()),
                "{}: the state file still names it",
                p.pod.name
            );
        }
    }

    // The wire, on a sample of the staying pods: every one born with an
    // annotation fault, every one with an API blackhole or delay, up to 4
    // each, and each pod's free port untouched.
    let mut sampled = (0, 0, 0);
    for p in churned.iter().filter(|p| p.stays) {
        let api = posted.get(&p.pod.container_id).cloned().unwrap_or_default();
        let hole = api.iter().any(|(_, h)| *h);
        let delayed = api.iter().any(|(_, h)| !*h);
        let pick =
            (p.birth && sampled.0 < 4) || (hole && sampled.1 < 4) || (delayed && sampled.2 < 4);
        if !pick {
            continue;
        }
        let probe = |port| {
            let r = udp_probe(&p.pod, &peer, ip, port, 50, Duration::from_micros(200))
                .expect("udp probe");
            assert_eq!(r.send_errors, 0, "loss is silent");
            r.received
        };
        let name = &p.pod.name;
        assert_eq!(probe(FREE_PORT), 50, "{name}: a port no fault names");
        assert_eq!(
            probe(BIRTH_PORT) == 0,
            p.birth,
            "{name}: birth-time blackhole"
        );
        assert_eq!(probe(API_UDP_PORT) == 0, hole, "{name}: API blackhole");
        let t = Instant::now();
        drop(connect(&p.pod, SocketAddr::new(ip, API_DELAY_PORT)).expect("connect"));
        let took = t.elapsed();
        assert_eq!(
            took >= DELAY - Duration::from_millis(5),
            delayed,
            "{name}: API delay (connect took {took:?})"
        );
        sampled.0 += usize::from(p.birth);
        sampled.1 += usize::from(hole);
        sampled.2 += usize::from(delayed);
    }
    eprintln!(
        "50 pods: wire checked on pods with a birth fault / API blackhole / API delay: {sampled:?}"
    );
    assert!(
        sampled.0 > 0 && sampled.1 > 0 && sampled.2 > 0,
        "sampled {sampled:?}"
    );

    // Everything goes at DEL.
    for p in churned.iter().filter(|p| p.stays) {
        c.node.del_pod(&p.pod).expect("CNI DEL");
        assert!(holders_of(&p.pod).is_empty(), "{}: holder", p.pod.name);
    }
    assert_eq!(
        enrolled(),
        [peer.container_id.clone()].into_iter().collect(),
        "only the peer stays enrolled"
    );
    assert!(
        c.all_faults().is_empty(),
        "no fault is left: {:?}",
        c.all_faults()
    );
    assert!(c.agent.is_running(), "the agent is alive");
}

/// Sends a line on `held`, a connection opened earlier, and asserts the
/// [`HELD_PORT`] server's echo comes back through it.
fn assert_held(mut held: TcpStream, when: &str) {
    held.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    held.write_all(b"still there?\n")
        .unwrap_or_else(|e| panic!("{when}: a line on the held connection: {e}"));
    let mut reply = Vec::new();
    let read = held.read_to_end(&mut reply);
    assert!(
        read.is_ok() && reply == b"still there?\n",
        "{when}: the held connection was cut: {read:?} {:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// The sequence a DELETE racing an install can produce, in order: a
/// connection proxied under an `http-abort` fault stays open; the pod's
/// last proxy fault is deleted (the proxy drains); a new proxy fault is
/// posted (a new proxy starts, cutting the drain short); it is deleted too.
/// The held connection must still get the server's answer, and once it is
/// done the pod netns is as before. (The agent used to forget the first
/// proxy's connections: the last DELETE removed the diversion at once and
/// the held connection was reset.)
#[test]
fn a_drain_cut_short_keeps_its_connections() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let _servers = servers(&b);
    let pristine = Pristine::of(&a);
    let f0 = F {
        kind: Kind::Http,
        slot: 0,
    };
    let f1 = F {
        kind: Kind::Http,
        slot: 1,
    };
    let first = c.fault(f0.body(&a));
    let held = connect(&a, SocketAddr::new(v4(&b), HELD_PORT)).expect("connect");
    // Accepted by the proxy before the DELETE.
    wait_for("the proxy carries the connection", || {
        c.agent.metric("netfault_proxy_open_connections") == Some(1.0)
    });
    c.delete_fault(&first);
    let second = c.fault(f1.body(&a));
    assert!(in_effect(f1, &a, &b), "the new fault acts");
    c.delete_fault(&second);
    assert!(!in_effect(f1, &a, &b), "the new fault is gone");
    assert_held(held, "after the drain was cut short");
    assert_pristine(&pristine, &a, "after the held connection closed");
}
