//! Raw relaying and the TCP faults, seen by a real client on loopback.

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::*;
use netfault_tproxy::{Side, SNIFF_TIMEOUT};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn echo_round(s: &mut tokio::net::TcpStream, data: &[u8]) -> Vec<u8> {
    s.write_all(data).await.expect("write");
    let mut back = vec![0u8; data.len()];
    within(10, s.read_exact(&mut back)).await.expect("echo");
    back
}

#[tokio::test]
async fn non_http_bytes_echo_back_unchanged() {
    let h = Harness::new(echo_server().await).await;
    // HTTP rules on the port do not touch non-HTTP connections.
    h.set(vec![json!({"type": "http-abort", "status": 503})]);
    let data: Vec<u8> = (0..1_000_000u64).map(pattern).collect();
    let mut s = h.connect().await;
    assert_eq!(echo_round(&mut s, &data).await, data);
    assert_eq!(h.proxy.open_connections(), 1, "relayed by the proxy");
    // A line protocol whose commands look like `WORD arg`.
    let mut s = h.connect().await;
    assert_eq!(
        echo_round(&mut s, b"SET key value\r\n").await,
        b"SET key value\r\n"
    );
    assert_eq!(echo_round(&mut s, b"GET key\r\n").await, b"GET key\r\n");
    // Half-close: the client's FIN reaches the server, whose FIN comes back.
    s.shutdown().await.expect("shutdown");
    let (rest, err) = within(5, read_all(&mut s)).await;
    assert!(rest.is_empty() && err.is_none());
}

#[tokio::test]
async fn tls_looking_bytes_are_relayed_unchanged() {
    let h = Harness::new(echo_server().await).await;
    h.set(vec![json!({"type": "http-abort", "status": 503})]);
    // A TLS 1.2 ClientHello record header and the start of a handshake.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
    ];
    hello.extend((0..160u64).map(pattern));
    let mut s = h.connect().await;
    assert_eq!(echo_round(&mut s, &hello).await, hello);
}

#[tokio::test]
async fn a_server_that_speaks_first_is_not_held_up() {
    let h = Harness::with_side(
        banner_server(b"220 mail.test ESMTP\r\n").await,
        Side::Outbound,
    )
    .await;
    let mut s = h.connect().await;
    let t = Instant::now();
    let mut banner = [0u8; 21];
    within(5, s.read_exact(&mut banner)).await.expect("banner");
    let waited = t.elapsed();
    assert_eq!(&banner, b"220 mail.test ESMTP\r\n");
    assert!(
        waited < SNIFF_TIMEOUT,
        "the banner waited for the sniff timeout: {waited:?}"
    );
    assert_eq!(
        echo_round(&mut s, b"EHLO client\r\n").await,
        b"EHLO client\r\n"
    );
}

#[tokio::test]
async fn a_silent_client_is_relayed_after_the_sniff_timeout() {
    let h = Harness::new(echo_server().await).await;
    let mut s = h.connect().await;
    tokio::time::sleep(SNIFF_TIMEOUT + Duration::from_millis(100)).await;
    // Looks like HTTP, but the decision was made: bytes, untouched.
    assert_eq!(
        echo_round(&mut s, b"GET / HTTP/1.1\r\n\r\n").await,
        b"GET / HTTP/1.1\r\n\r\n"
    );
}

#[tokio::test]
async fn tcp_reset_after_a_duration() {
    let h = Harness::new(echo_server().await).await;
    let c = h.set(vec![json!({"type": "tcp-reset", "after": "300ms"})]);
    let t = Instant::now();
    let mut s = h.connect().await;
    assert_eq!(echo_round(&mut s, b"before").await, b"before");
    let (_, err) = within(5, read_all(&mut s)).await;
    let at = t.elapsed();
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
    assert!(at >= Duration::from_millis(290), "reset too early: {at:?}");
    assert!(at < Duration::from_millis(1300), "reset too late: {at:?}");
    let snap = c[0].snapshot();
    assert_eq!((snap.matched, snap.affected, snap.dropped), (1, 1, 1));
    println!("tcp-reset after 300ms: client saw ECONNRESET at {at:?}");
}

#[tokio::test]
async fn tcp_reset_after_a_duration_on_an_http_connection() {
    let h = Harness::new(http1_server().await).await;
    h.set(vec![json!({"type": "tcp-reset", "after": "300ms"})]);
    let t = Instant::now();
    let mut c = RawConn::new(h.connect().await);
    c.send(b"GET /echo HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await;
    assert_eq!(
        within(5, c.response(false)).await.expect("before").status,
        200
    );
    // A request the server answers after 3 s: the reset comes first.
    c.send(b"GET /slow/3000 HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await;
    let err = within(5, c.response(false)).await.expect_err("reset");
    let at = t.elapsed();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert!(at >= Duration::from_millis(290), "reset too early: {at:?}");
    assert!(at < Duration::from_millis(1300), "reset too late: {at:?}");
}

#[tokio::test]
async fn tcp_reset_after_n_bytes_counted_both_ways() {
    let h = Harness::new(echo_server().await).await;
    h.set(vec![json!({"type": "tcp-reset", "after_bytes": 10000})]);
    let t = Instant::now();
    let mut s = h.connect().await;
    // 4000 out and 4000 back: 8000 of the 10000.
    let data: Vec<u8> = (0..4000u64).map(pattern).collect();
    assert_eq!(echo_round(&mut s, &data).await, data);
    // 2000 more bytes reach the limit on their way out.
    s.write_all(&data).await.expect("write");
    let (back, err) = within(5, read_all(&mut s)).await;
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        back.is_empty(),
        "nothing may pass the budget: got {} bytes back",
        back.len()
    );
}

#[tokio::test]
async fn tcp_reset_after_n_bytes_of_a_download() {
    let h = Harness::new(source_server(1 << 20).await).await;
    h.set(vec![json!({"type": "tcp-reset", "after_bytes": 100_000})]);
    let t = Instant::now();
    let mut s = h.connect().await;
    let (got, err) = within(10, read_all(&mut s)).await;
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::ConnectionReset));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(got.len() <= 100_000, "{} bytes passed", got.len());
    assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i as u64)));
    println!(
        "tcp-reset after 100000 bytes: client read {} bytes, then ECONNRESET",
        got.len()
    );
}

/// Throughput over a download, from the first byte to the last: within
/// 15% of the configured rate.
#[tokio::test]
async fn tcp_bandwidth_limits_each_direction() {
    const TOTAL: u64 = 2_500_000;
    let h = Harness::new(source_server(TOTAL).await).await;
    let c = h.set(vec![json!({"type": "tcp-bandwidth", "rate": "8mbit"})]);
    let mut s = h.connect().await;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    let mut first: Option<(Instant, u64)> = None;
    let mut last = Instant::now();
    loop {
        let n = within(20, s.read(&mut buf)).await.expect("read") as u64;
        if n == 0 {
            break;
        }
        got += n;
        last = Instant::now();
        if first.is_none() {
            first = Some((last, n));
        }
    }
    assert_eq!(got, TOTAL);
    let (t0, n0) = first.expect("data");
    let secs = last.duration_since(t0).as_secs_f64();
    let rate = (got - n0) as f64 * 8.0 / secs;
    println!(
        "tcp-bandwidth 8mbit: measured {:.3} mbit/s over {secs:.2}s",
        rate / 1e6
    );
    assert!((6.8e6..=9.2e6).contains(&rate), "measured {rate} bit/s");
    assert_eq!(c[0].snapshot().affected, 1);

    // Upload: the server side receives at the rate too.
    let h = Harness::new(echo_server().await).await;
    h.set(vec![json!({"type": "tcp-bandwidth", "rate": "4mbit"})]);
    let s = h.connect().await;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let data: Vec<u8> = (0..1_000_000u64).map(pattern).collect();
        w.write_all(&data).await.expect("write");
        w
    });
    let t = Instant::now();
    let mut back = vec![0u8; 1_000_000];
    within(20, r.read_exact(&mut back)).await.expect("echo");
    let secs = t.elapsed().as_secs_f64();
    drop(writer.await);
    // Both directions are throttled; the echo pipelines them, so the time is
    // about one transfer at 4 mbit (2 s).
    let rate = 8e6 / secs;
    println!("tcp-bandwidth 4mbit echo: {:.3} mbit/s", rate / 1e6);
    assert!((3.2e6..=4.6e6).contains(&rate), "measured {rate} bit/s");
}

#[tokio::test]
async fn tcp_slow_close_holds_the_fin_back() {
    let h = Harness::new(source_server(1000).await).await;
    let mut s = h.connect().await;
    let mut data = [0u8; 1000];
    s.read_exact(&mut data).await.expect("data");
    let t = Instant::now();
    let (_, err) = within(5, read_all(&mut s)).await;
    let direct = t.elapsed();
    assert!(err.is_none());

    let c = h.set(vec![json!({"type": "tcp-slow-close", "delay": "600ms"})]);
    let mut s = h.connect().await;
    s.read_exact(&mut data).await.expect("data");
    let t = Instant::now();
    let (_, err) = within(5, read_all(&mut s)).await;
    let held = t.elapsed();
    assert!(err.is_none(), "a FIN, not a reset: {err:?}");
    assert!(held >= Duration::from_millis(550), "FIN after {held:?}");
    assert!(held < Duration::from_millis(1600), "FIN after {held:?}");
    assert!(
        direct < Duration::from_millis(300),
        "without the fault: {direct:?}"
    );
    assert_eq!(c[0].snapshot().affected, 1);
    println!("tcp-slow-close 600ms: FIN after {held:?} (without: {direct:?})");

    // The client's FIN is held back on its way to the server too.
    let h = Harness::new(echo_server().await).await;
    h.set(vec![json!({"type": "tcp-slow-close", "delay": "400ms"})]);
    let mut s = h.connect().await;
    assert_eq!(echo_round(&mut s, b"x").await, b"x");
    let t = Instant::now();
    s.shutdown().await.expect("shutdown");
    let (_, err) = within(5, read_all(&mut s)).await;
    assert!(err.is_none());
    // Our FIN waits 400ms to reach the server, its FIN 400ms more.
    assert!(
        t.elapsed() >= Duration::from_millis(750),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn tcp_faults_honour_percent_per_connection() {
    let h = Harness::new(echo_server().await).await;
    let c = h.set(vec![
        json!({"type": "tcp-reset", "after_bytes": 0, "percent": 50}),
    ]);
    let mut reset = 0;
    for _ in 0..60 {
        let t = Instant::now();
        let mut s = h.connect().await;
        // The reset may come back before the write: the write then takes
        // the socket's error, and the read sees an end of file.
        let wrote = s.write_all(b"ping").await;
        let mut b = [0u8; 4];
        match within(5, s.read_exact(&mut b)).await {
            Ok(_) => assert_eq!(&b, b"ping"),
            Err(e) => {
                let kinds = (wrote.as_ref().err().map(|w| w.kind()), e.kind());
                assert!(
                    matches!(
                        kinds,
                        (_, ErrorKind::ConnectionReset)
                            | (Some(ErrorKind::ConnectionReset), ErrorKind::UnexpectedEof)
                    ),
                    "a reset, not a close: {kinds:?}"
                );
                assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
                reset += 1;
            }
        }
    }
    // Binomial(60, 0.5): 3 sigma is 30 ± 11.6.
    assert!((18..=42).contains(&reset), "{reset} of 60 reset");
    assert_eq!(c[0].snapshot().matched, 60);
    assert_eq!(c[0].snapshot().dropped, reset);
}
