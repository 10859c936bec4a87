//! DNS over TCP through the proxy, seen by a real client on loopback
//! against a small DNS server (hickory-proto messages): what passes, what
//! the faults answer, drop or delay, pipelining, framing, and counters.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use netfault_tproxy::Side;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The address every name has on the test server.
const REAL: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Names under this take the test server this long to answer.
const SLOW: Duration = Duration::from_millis(200);

/// A DNS-over-TCP server: answers A queries with [`REAL`] (TTL 300),
/// anything else with NOERROR and no records; names starting with `slow.`
/// after [`SLOW`], each query on its own (so answers may overtake each
/// other). Records every message it gets, and counts connections.
struct DnsServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    conns: Arc<AtomicUsize>,
}

impl DnsServer {
    async fn start() -> DnsServer {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(AtomicUsize::new(0));
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (s2, c2) = (seen.clone(), conns.clone());
        let addr = serve_each(l, move |s, _| {
            c2.fetch_add(1, Ordering::SeqCst);
            serve_dns(s, s2.clone())
        });
        DnsServer { addr, seen, conns }
    }

    fn seen(&self) -> Vec<Vec<u8>> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn serve_dns(s: TcpStream, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let (mut rd, mut wr) = s.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    while let Ok(len) = rd.read_u16().await {
        let mut msg = vec![0u8; usize::from(len)];
        if rd.read_exact(&mut msg).await.is_err() {
            break;
        }
        seen.lock().expect("lock").push(msg.clone());
        let Some((answer, slow)) = server_answer(&msg) else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            if slow {
                tokio::time::sleep(SLOW).await;
            }
            let _ = tx.send(framed(&answer));
        });
    }
    drop(tx);
    let _ = writer.await;
}

/// The test server's answer to `msg`, and whether it is a slow one.
fn server_answer(msg: &[u8]) -> Option<(Vec<u8>, bool)> {
    let q = Message::from_vec(msg).ok()?;
    let question = q.queries().first()?.clone();
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    if question.query_type() == RecordType::A {
        m.add_answer(Record::from_rdata(
            question.name().clone(),
            300,
            RData::A(A(REAL)),
        ));
    }
    let slow = question.name().to_ascii().starts_with("slow.");
    m.add_query(question);
    if let Some(e) = q.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload());
        m.set_edns(edns);
    }
    Some((m.to_vec().ok()?, slow))
}

/// Writes a framed query (no EDNS) to `s`.
async fn send_query(s: &mut TcpStream, id: u16, name: &str, qtype: RecordType) {
    s.write_all(&framed(&query(id, name, qtype, false)))
        .await
        .expect("write");
}

fn framed(msg: &[u8]) -> Vec<u8> {
    let mut out = (msg.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(msg);
    out
}

fn query(id: u16, name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

/// Reads one framed message.
async fn read_msg(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = s.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    s.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn answer(s: &mut TcpStream) -> Message {
    let wire = within(5, read_msg(s)).await.expect("an answer");
    Message::from_vec(&wire).expect("the answer decodes")
}

fn a_records(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

/// A proxy for outbound connections to a fresh test DNS server.
async fn setup() -> (DnsServer, Harness) {
    let server = DnsServer::start().await;
    let h = Harness::with_side(server.addr, Side::Outbound).await;
    (server, h)
}

#[tokio::test]
async fn unmatched_queries_pass_byte_for_byte() {
    let (server, h) = setup().await;
    let c = h.set(vec![
        json!({"type": "dns-error", "dns": {"names": ["blocked.example.test"]}}),
    ]);
    for (i, (name, qtype, edns)) in [
        ("api.example.test.", RecordType::A, false),
        ("Api.Example.test.", RecordType::AAAA, true),
        ("blocked.example.test.", RecordType::A, false),
    ]
    .into_iter()
    .enumerate()
    {
        let q = query(100 + i as u16, name, qtype, edns);
        let mut direct = TcpStream::connect(server.addr).await.expect("connect");
        direct.write_all(&framed(&q)).await.expect("write");
        let want = within(5, read_msg(&mut direct))
            .await
            .expect("direct answer");
        let mut s = h.connect().await;
        s.write_all(&framed(&q)).await.expect("write");
        let got = within(5, read_msg(&mut s)).await.expect("answer");
        if name.starts_with("blocked") {
            let m = Message::from_vec(&got).expect("decodes");
            assert_eq!(m.response_code(), ResponseCode::NXDomain);
            continue;
        }
        assert_eq!(got, want, "{name}: the server's answer, byte for byte");
        // And the server got the query byte for byte.
        assert_eq!(server.seen().last(), Some(&q));
    }
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 0));
}

#[tokio::test]
async fn dns_error_is_answered_by_the_proxy_without_the_server() {
    let (server, h) = setup().await;
    let c = h.set(vec![json!({"type": "dns-error", "rcode": "servfail",
        "dns": {"names": ["*.example.test"]}})]);
    let mut s = h.connect().await;
    s.write_all(&framed(&query(7, "API.example.test.", RecordType::A, true)))
        .await
        .expect("write");
    let m = answer(&mut s).await;
    assert_eq!(m.id(), 7);
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert_eq!(m.queries()[0].name().to_ascii(), "API.example.test.");
    assert!(m.answers().is_empty() && !m.truncated());
    assert_eq!(m.extensions().as_ref().map(|e| e.max_payload()), Some(1232));
    // The client closes: so does the proxy, having never called the server.
    s.shutdown().await.expect("shutdown");
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty() && err.is_none(), "{rest:?} {err:?}");
    assert_eq!(
        server.conns.load(Ordering::SeqCst),
        0,
        "no server connection"
    );
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 0));
}

#[tokio::test]
async fn dns_spoof_over_tcp() {
    let (server, h) = setup().await;
    h.set(vec![
        json!({"type": "dns-spoof", "addresses": ["198.18.7.7", "fd00::7"], "ttl": 9}),
    ]);
    let mut s = h.connect().await;
    send_query(&mut s, 9, "web.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    assert_eq!((m.id(), m.response_code()), (9, ResponseCode::NoError));
    assert_eq!(
        a_records(&m),
        vec!["198.18.7.7".parse::<IpAddr>().expect("ip")]
    );
    assert_eq!(m.answers()[0].ttl(), 9);
    assert!(server.seen().is_empty());
}

#[tokio::test]
async fn dns_drop_answers_nothing_while_other_queries_are_answered() {
    let (server, h) = setup().await;
    let c = h.set(vec![
        json!({"type": "dns-drop", "dns": {"names": ["drop.example.test"]}}),
    ]);
    let mut s = h.connect().await;
    send_query(&mut s, 1, "drop.example.test.", RecordType::A).await;
    send_query(&mut s, 2, "web.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    assert_eq!(m.id(), 2);
    assert_eq!(a_records(&m), vec![IpAddr::V4(REAL)]);
    // Nothing else comes within 300 ms.
    let more = tokio::time::timeout(Duration::from_millis(300), read_msg(&mut s)).await;
    assert!(more.is_err(), "an answer to the dropped query: {more:?}");
    let names: Vec<u16> = server
        .seen()
        .iter()
        .filter_map(|m| Message::from_vec(m).ok())
        .map(|m| m.id())
        .collect();
    assert_eq!(names, vec![2], "the dropped query never reached the server");
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 1));
}

#[tokio::test]
async fn dns_delay_delays_the_real_answer() {
    let (_server, h) = setup().await;
    let delay = Duration::from_millis(150);
    let c = h.set(vec![json!({"type": "dns-delay", "delay": "150ms",
        "dns": {"names": ["late.example.test"]}})]);
    let mut s = h.connect().await;
    // Warm up the server connection, and measure an undelayed query.
    let t = Instant::now();
    send_query(&mut s, 1, "web.example.test.", RecordType::A).await;
    assert_eq!(answer(&mut s).await.id(), 1);
    let plain = t.elapsed();
    let t = Instant::now();
    send_query(&mut s, 2, "late.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    let late = t.elapsed();
    assert_eq!(m.id(), 2);
    assert_eq!(a_records(&m), vec![IpAddr::V4(REAL)], "the real answer");
    assert!(late >= delay, "answered after {late:?}");
    assert!(
        late < delay + Duration::from_millis(100),
        "answered after {late:?}"
    );
    println!("dns-delay 150ms over TCP: answered after {late:?} (undelayed query: {plain:?})");
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 0));
}

#[tokio::test]
async fn pipelined_queries_are_answered_as_they_come_with_their_ids() {
    let (server, h) = setup().await;
    let c = h.set(vec![json!({"type": "dns-error", "rcode": "refused",
        "dns": {"names": ["forged.example.test"]}})]);
    let mut s = h.connect().await;
    // One write: a slow query the server holds, a forged one, a fast one.
    let mut burst = framed(&query(11, "slow.example.test.", RecordType::A, false));
    burst.extend(framed(&query(
        12,
        "forged.example.test.",
        RecordType::A,
        false,
    )));
    burst.extend(framed(&query(
        13,
        "fast.example.test.",
        RecordType::A,
        true,
    )));
    s.write_all(&burst).await.expect("write");
    let t = Instant::now();
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = answer(&mut s).await;
        got.push((m.id(), m.response_code(), t.elapsed()));
    }
    let ids: Vec<u16> = got.iter().map(|g| g.0).collect();
    assert_eq!(ids.last(), Some(&11), "the slow answer last: {got:?}");
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec![11, 12, 13]);
    for (id, rcode, _) in &got {
        let want = if *id == 12 {
            ResponseCode::Refused
        } else {
            ResponseCode::NoError
        };
        assert_eq!(*rcode, want, "query {id}");
    }
    assert!(got[2].2 >= SLOW, "{got:?}");
    assert!(
        got[1].2 < SLOW,
        "the fast answer did not wait for the slow one: {got:?}"
    );
    assert_eq!(server.seen().len(), 2);
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected), (1, 1));
    // Half-close: the slow answer still comes, then the end.
    send_query(&mut s, 14, "slow.example.test.", RecordType::A).await;
    s.shutdown().await.expect("shutdown");
    assert_eq!(answer(&mut s).await.id(), 14);
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty() && err.is_none(), "{rest:?} {err:?}");
}

#[tokio::test]
async fn malformed_messages_pass_unchanged_and_are_counted() {
    let (server, h) = setup().await;
    h.set(vec![json!({"type": "dns-error"})]);
    let before = h.proxy.dns_malformed();
    let mut s = h.connect().await;
    s.write_all(&framed(b"hello, not dns"))
        .await
        .expect("write");
    // A response is not a query: forwarded, not counted as malformed.
    let mut response = query(3, "x.example.test.", RecordType::A, false);
    response[2] |= 0x80;
    s.write_all(&framed(&response)).await.expect("write");
    send_query(&mut s, 4, "y.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    // The server answered the response-looking message first (it answers
    // whatever decodes); the forged NXDOMAIN for query 4 may come before.
    let mut ids = vec![(m.id(), m.response_code())];
    ids.push({
        let m = answer(&mut s).await;
        (m.id(), m.response_code())
    });
    ids.sort_by_key(|(id, _)| *id);
    assert_eq!(
        ids,
        vec![(3, ResponseCode::NoError), (4, ResponseCode::NXDomain)]
    );
    let seen = server.seen();
    assert_eq!(seen, vec![b"hello, not dns".to_vec(), response]);
    assert_eq!(h.proxy.dns_malformed() - before, 1);
}

#[tokio::test]
async fn a_zero_length_turns_the_connection_into_a_byte_relay() {
    let target = echo_server().await;
    let h = Harness::with_side(target, Side::Outbound).await;
    h.set(vec![json!({"type": "dns-error"})]);
    let mut s = h.connect().await;
    let mut bytes = vec![0u8, 0];
    bytes.extend_from_slice(b"\x00\x05no length prefix here");
    s.write_all(&bytes).await.expect("write");
    let mut back = vec![0u8; bytes.len()];
    within(5, s.read_exact(&mut back)).await.expect("echo");
    assert_eq!(back, bytes);
    s.write_all(b"more").await.expect("write");
    let mut more = [0u8; 4];
    within(5, s.read_exact(&mut more)).await.expect("echo");
    assert_eq!(&more, b"more");
    s.shutdown().await.expect("shutdown");
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty() && err.is_none());
}

#[tokio::test]
async fn a_refused_server_resets_the_client() {
    // A port nothing listens on.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead = l.local_addr().expect("addr");
    drop(l);
    let h = Harness::with_side(dead, Side::Outbound).await;
    h.set(vec![
        json!({"type": "dns-error", "dns": {"names": ["other.test"]}}),
    ]);
    let mut s = h.connect().await;
    send_query(&mut s, 1, "web.example.test.", RecordType::A).await;
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty());
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn a_removed_fault_stops_acting_on_an_open_connection() {
    let (_server, h) = setup().await;
    h.set(vec![json!({"type": "dns-error"})]);
    let mut s = h.connect().await;
    send_query(&mut s, 1, "web.example.test.", RecordType::A).await;
    assert_eq!(answer(&mut s).await.response_code(), ResponseCode::NXDomain);
    h.proxy.set_rules(Vec::new());
    send_query(&mut s, 2, "web.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    assert_eq!((m.id(), m.response_code()), (2, ResponseCode::NoError));
    assert_eq!(a_records(&m), vec![IpAddr::V4(REAL)]);
}

#[tokio::test]
async fn inbound_connections_are_not_served_as_dns() {
    // The pod is the DNS server: its clients' queries are not its own.
    let server = DnsServer::start().await;
    let h = Harness::with_side(server.addr, Side::Inbound).await;
    h.set(vec![json!({"type": "dns-error"})]);
    let mut s = h.connect().await;
    send_query(&mut s, 1, "web.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
}

#[tokio::test]
async fn a_server_that_resets_resets_the_client() {
    // Reads a query, then closes with an RST.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = serve_each(l, |mut s, _| async move {
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    });
    let h = Harness::with_side(target, Side::Outbound).await;
    h.set(vec![
        json!({"type": "dns-error", "dns": {"names": ["other.test"]}}),
    ]);
    let mut s = h.connect().await;
    send_query(&mut s, 1, "web.example.test.", RecordType::A).await;
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty());
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test]
async fn tcp_faults_on_the_dns_port_still_apply() {
    let (_server, h) = setup().await;
    let c = h.set(vec![
        json!({"type": "dns-error", "dns": {"names": ["forged.example.test"]}}),
        json!({"type": "tcp-reset", "after": "300ms"}),
    ]);
    let t = Instant::now();
    let mut s = h.connect().await;
    send_query(&mut s, 1, "forged.example.test.", RecordType::A).await;
    assert_eq!(answer(&mut s).await.response_code(), ResponseCode::NXDomain);
    send_query(&mut s, 2, "web.example.test.", RecordType::A).await;
    assert_eq!(answer(&mut s).await.id(), 2);
    let (_, err) = within(5, read_all(&mut s)).await;
    let at = t.elapsed();
    assert_eq!(
        err.map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    assert!(at >= Duration::from_millis(290), "reset at {at:?}");
    let snap = c[1].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 1));
}

#[tokio::test]
async fn random_bytes_do_not_hurt_the_proxy() {
    let (_server, h) = setup().await;
    h.set(vec![
        json!({"type": "dns-spoof", "addresses": ["198.18.7.7"], "dns": {"types": ["A"]}}),
        json!({"type": "dns-delay", "delay": "1ms"}),
    ]);
    // A fixed pseudo-random sequence (xorshift), so a failure replays.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let mut s = h.connect().await;
        let mut bytes = Vec::new();
        for _ in 0..next() % 4 {
            let len = (next() % 300) as usize;
            let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 {
                bytes.extend(framed(&body));
            } else {
                bytes.extend(body);
            }
        }
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let _ = within(5, read_all(&mut s)).await;
    }
    let mut s = h.connect().await;
    send_query(&mut s, 5, "web.example.test.", RecordType::A).await;
    let m = answer(&mut s).await;
    assert_eq!(
        a_records(&m),
        vec!["198.18.7.7".parse::<IpAddr>().expect("ip")]
    );
    drop(s);
    let t = Instant::now();
    while h.proxy.open_connections() > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.proxy.open_connections(), 0, "every connection ended");
}
