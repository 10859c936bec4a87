//! Hostile clients on the API socket: unknown methods and paths, bodies
//! that are not UTF-8 or nest too deep, slow-loris clients (head or body a
//! byte at a time), and a thousand connections at once. Each gets a clear
//! 4xx or is cut off; none panics the agent, stalls the other clients or
//! changes anything: the fault list is unchanged and the pod a fault would
//! have hit passes all its traffic.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use testbed::{udp_probe, Pod};

use crate::support::{assert_whole, blackhole, fault_on, proto_port, v4, Cluster};

const GAP: Duration = Duration::from_micros(200);

/// The agent's limits (agent/src/server.rs).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 1024;

/// An HTTP answer: status, headers (lower-case names) and body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

fn parse(raw: &[u8]) -> Option<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Sends `head` (without its blank line; `Connection: close` and a
/// `Content-Length` for `body` are added) and `body` raw, and reads the answer.
fn raw(socket: &Path, head: &str, body: &[u8]) -> Answer {
    let mut s = UnixStream::connect(socket).expect("connect to the agent");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!(
        "{head}\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).expect("send the request");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse(&out).unwrap_or_else(|| {
        panic!(
            "{head}: not an HTTP answer: {:?}",
            String::from_utf8_lossy(&out)
        )
    })
}

fn faults(socket: &Path) -> Value {
    raw(socket, "GET /v1/faults HTTP/1.1", b"").json()
}

/// A blackhole of `pod`'s egress UDP `port`, as JSON text: what the hostile
/// bodies wrap, so that a body the agent wrongly accepted would act.
fn blackhole_text(pod: &Pod, port: u16) -> String {
    fault_on(pod, "egress", proto_port("udp", port), blackhole(), "5m").to_string()
}

#[test]
fn hostile_requests_get_a_clear_4xx_and_change_nothing() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let sock = c.agent.socket();
    assert_whole(&a, &b, 7201, "baseline");
    let before = faults(&sock);
    let fault = blackhole_text(&a, 7201);

    // Unknown methods on known paths: 405 with Allow.
    for (head, allow) in [
        ("BREW /v1/faults HTTP/1.1", "GET, POST"),
        ("PATCH /v1/faults/x HTTP/1.1", "GET, DELETE"),
        ("POST /v1/sandboxes/x HTTP/1.1", "PUT, DELETE"),
        ("DELETE /healthz HTTP/1.1", "GET"),
    ] {
        let r = raw(&sock, head, fault.as_bytes());
        assert_eq!(r.status, 405, "{head}: {r:?}");
        assert_eq!(r.header("allow"), Some(allow), "{head}: {r:?}");
        assert_eq!(r.json()["error"]["field"], "method", "{head}: {r:?}");
    }
    // Unknown paths: 404.
    for head in [
        "GET /v2/faults HTTP/1.1",
        "POST /v1/faultz HTTP/1.1",
        "GET /v1/faults/a/b HTTP/1.1",
        "GET /%ff%fe HTTP/1.1",
    ] {
        let r = raw(&sock, head, fault.as_bytes());
        assert_eq!(r.status, 404, "{head}: {r:?}");
        assert_eq!(r.json()["error"]["code"], "not_found", "{head}: {r:?}");
    }
    // A valid blackhole with a byte that is not UTF-8 in a string: 400 on
    // `body`, not a fault with a replacement character.
    let mut bad_utf8 = fault.clone().into_bytes();
    let at = bad_utf8.len() - 1;
    bad_utf8.splice(at..at, b",\"note\":\"\xff\xfe\"".iter().copied());
    let r = raw(&sock, "POST /v1/faults HTTP/1.1", &bad_utf8);
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["error"]["field"], "body", "{r:?}");
    assert!(r.body.contains("UTF-8"), "{r:?}");
    // Deep nesting: 100k brackets alone, and 1000 levels inside a valid
    // blackhole. serde_json's recursion limit makes both a 400.
    let deep = "[".repeat(100_000);
    let mut nested = fault.clone().into_bytes();
    let at = nested.len() - 1;
    let inner = format!(",\"x\":{}{}", "[".repeat(1000), "]".repeat(1000));
    nested.splice(at..at, inner.bytes());
    for (what, body) in [("brackets", deep.as_bytes()), ("nested", &nested[..])] {
        let r = raw(&sock, "POST /v1/faults HTTP/1.1", body);
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert_eq!(r.json()["error"]["field"], "body", "{what}: {r:?}");
        let r = raw(&sock, "PUT /v1/sandboxes/deep HTTP/1.1", body);
        assert_eq!(r.status, 400, "{what} enrolment: {r:?}");
    }
    // Garbage that is not HTTP at all: the connection is answered 400 or
    // closed, and the agent serves on.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = s.write_all(b"\x00\xff\r\n\r\nnot http at all\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    if let Some(r) = parse(&out) {
        assert!((400..500).contains(&r.status), "{r:?}");
    }

    assert!(c.agent.is_running(), "the agent did not die");
    let health = raw(&sock, "GET /healthz HTTP/1.1", b"");
    assert_eq!(health.status, 200, "the agent is alive: {health:?}");
    assert_eq!(faults(&sock), before, "the fault list is unchanged");
    assert!(c.agent.sandboxes().expect("sandboxes").len() == 2);
    assert_whole(&a, &b, 7201, "after the hostile requests");
}

/// A client that sends `prefix` a byte every `every`, until the agent cuts
/// it off: how long that took, or `None` if it was still open at `give_up`.
fn dribble(socket: &Path, prefix: Vec<u8>, every: Duration, give_up: Duration) -> Option<Duration> {
    let mut s = UnixStream::connect(socket).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_millis(1)));
    let t = Instant::now();
    let mut i = 0;
    while t.elapsed() < give_up {
        let byte = prefix.get(i).copied().unwrap_or(b'x');
        i += 1;
        if s.write_all(&[byte]).is_err() {
            return Some(t.elapsed());
        }
        // EOF or an answer (408): the agent is done with it.
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(_) => return Some(t.elapsed()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(t.elapsed()),
        }
        std::thread::sleep(every);
    }
    None
}

#[test]
fn slow_loris_and_a_thousand_connections_stall_nobody() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let [a, b] = c.pods(["a", "b"]);
    let sock = c.agent.socket();
    assert_whole(&a, &b, 7202, "baseline");

    // A thousand connections that send nothing.
    let idle: Vec<UnixStream> = (0..1000)
        .map(|i| UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let started = Instant::now();
    // Slow-loris clients: four dribble a request head, four a body.
    let give_up = HEADER_TIMEOUT + Duration::from_secs(10);
    let mut lorises = Vec::new();
    for i in 0..8 {
        let sock = sock.clone();
        let prefix = if i % 2 == 0 {
            b"GET /v1/faults HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".to_vec()
        } else {
            b"POST /v1/faults HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{".to_vec()
        };
        let every = Duration::from_millis(if i % 2 == 0 { 1500 } else { 30 });
        lorises.push(std::thread::spawn(move || {
            dribble(&sock, prefix, every, give_up)
        }));
    }

    // Meanwhile a normal client is answered promptly, and a real fault acts.
    std::thread::sleep(Duration::from_millis(500));
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let r = raw(&sock, "GET /v1/faults HTTP/1.1", b"");
        assert_eq!(r.status, 200, "{r:?}");
        slowest = slowest.max(t.elapsed());
    }
    eprintln!("GET /v1/faults beside 1000 idle connections and 8 slow-loris clients: slowest of 10 {slowest:?}");
    assert!(
        slowest < Duration::from_secs(1),
        "GET /v1/faults took {slowest:?}"
    );
    let id = c.fault(fault_on(
        &a,
        "egress",
        proto_port("udp", 7202),
        blackhole(),
        "5m",
    ));
    let p = udp_probe(&a, &b, v4(&b), 7202, 300, GAP).expect("probe under the fault");
    assert_eq!(p.received, 0, "the fault posted beside them acts");
    c.delete_fault(&id);
    assert!(
        started.elapsed() < HEADER_TIMEOUT,
        "the checks ran while every connection was still open ({:?})",
        started.elapsed()
    );

    // Every slow client is cut off, around the timeouts.
    for (i, l) in lorises.into_iter().enumerate() {
        let cut = l.join().expect("slow client thread");
        let cut = cut.unwrap_or_else(|| panic!("slow client {i} still open after {give_up:?}"));
        eprintln!("slow client {i} cut off after {cut:?}");
        assert!(
            cut >= Duration::from_secs(5),
            "slow client {i} cut off early ({cut:?})"
        );
    }
    // And so are the idle ones (by the same header timeout): the agent
    // holds none of them.
    let still_open = idle
        .into_iter()
        .filter_map(|mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 16];
            // EOF: closed by the agent; a timeout: still held.
            s.read(&mut buf).err()
        })
        .count();
    assert_eq!(still_open, 0, "idle connections the agent still holds");
    assert_eq!(faults(&sock), json!([]), "nothing is left");
    assert_whole(&a, &b, 7202, "after");
}

#[test]
fn connections_beyond_the_cap_wait_without_stalling_those_served() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let sock = c.agent.socket();

    // A kept-alive client, served before the crowd arrives.
    let mut kept = UnixStream::connect(&sock).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let get = b"GET /v1/faults HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
    let read_answer = |s: &mut UnixStream| -> Option<u16> {
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).ok()?;
        parse(&buf[..n]).map(|a| a.status)
    };
    kept.write_all(get).expect("first request");
    assert_eq!(read_answer(&mut kept), Some(200));

    // The cap, and a few more that wait in the listen backlog.
    let started = Instant::now();
    let mut crowd: Vec<UnixStream> = (0..MAX_CONNECTIONS + 4)
        .map(|i| UnixStream::connect(&sock).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    let mut late = UnixStream::connect(&sock).expect("a connection beyond the cap");
    late.set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("timeout");
    late.write_all(get).expect("request beyond the cap");

    // The served client is not stalled by them.
    let t = Instant::now();
    kept.write_all(get).expect("second request");
    assert_eq!(read_answer(&mut kept), Some(200), "the served client");
    eprintln!(
        "a served connection answered in {:?} with {} more waiting",
        t.elapsed(),
        crowd.len() + 1
    );
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // The one beyond the cap waits: not answered while the cap is full.
    assert_eq!(read_answer(&mut late), None, "answered beyond the cap");
    assert!(
        started.elapsed() < HEADER_TIMEOUT - Duration::from_secs(2),
        "the cap was checked before the idle connections timed out ({:?})",
        started.elapsed()
    );
    // Slots free up: it is served.
    drop(kept);
    crowd.truncate(MAX_CONNECTIONS - 10);
    late.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let t = Instant::now();
    assert_eq!(
        read_answer(&mut late),
        Some(200),
        "served once slots are free"
    );
    eprintln!(
        "the waiting connection was served {:?} after slots were freed",
        t.elapsed()
    );
    drop(crowd);
}
