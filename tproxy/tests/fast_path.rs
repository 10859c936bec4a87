//! The HTTP/1 fast path: requests no rule selects are relayed byte for
//! byte, every framing of HTTP/1 followed to the end of each message, on
//! one keep-alive connection, pipelined or trickled in small pieces; a
//! request a rule selects hands the connection to hyper at that request.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// What the scripted server answers for a path.
fn answer(method: &str, path: &str, body: &[u8]) -> Vec<u8> {
    match path {
        "/echo" => {
            let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Case: Kept\r\n\r\n", body.len())
                .into_bytes();
            a.extend_from_slice(body);
            a
        }
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
        "/sized" if method == "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n".to_vec(),
        "/nothing" => b"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n".to_vec(),
        "/not-modified" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n".to_vec(),
        "/until-close" => b"HTTP/1.1 200 OK\r\n\r\nthe body ends with the connection".to_vec(),
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
    }
}

/// Reads one request (head and body by its framing) off `r`; returns the
/// method, the path, the decoded body, and the raw bytes. `None` at EOF.
async fn read_request(r: &mut BufReader<TcpStream>) -> Option<(String, String, Vec<u8>, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut line = String::new();
    let (mut method, mut path) = (String::new(), String::new());
    let (mut length, mut chunked, mut expect) = (0usize, false, false);
    loop {
        line.clear();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        raw.extend_from_slice(line.as_bytes());
        if method.is_empty() {
            let mut parts = line.split(' ');
            method = parts.next()?.to_owned();
            path = parts.next()?.to_owned();
            continue;
        }
        if line == "\r\n" {
            break;
        }
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse().ok()?,
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "expect" => expect = true,
            _ => {}
        }
    }
    if expect {
        r.get_mut()
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .ok()?;
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).await.ok()?;
            raw.extend_from_slice(line.as_bytes());
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    r.read_line(&mut line).await.ok()?;
                    raw.extend_from_slice(line.as_bytes());
                    if line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).await.ok()?;
            raw.extend_from_slice(&chunk);
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        let mut b = vec![0u8; length];
        r.read_exact(&mut b).await.ok()?;
        raw.extend_from_slice(&b);
        body = b;
    }
    Some((method, path, body, raw))
}

/// A keep-alive server answering by path; every request's raw bytes are
/// recorded, and `/until-close` ends the connection after its answer.
async fn scripted_server() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let addr = serve_each(listen().await, move |s, _| {
        let record = record.clone();
        async move {
            let mut r = BufReader::new(s);
            while let Some((method, path, body, raw)) = read_request(&mut r).await {
                record.lock().expect("lock").extend_from_slice(&raw);
                if r.get_mut()
                    .write_all(&answer(&method, &path, &body))
                    .await
                    .is_err()
                {
                    return;
                }
                match path.as_str() {
                    "/until-close" => return,
                    "/reset-after" => {
                        let _ =
                            socket2::SockRef::from(r.get_ref()).set_linger(Some(Duration::ZERO));
                        return;
                    }
                    _ => {}
                }
            }
        }
    });
    (addr, seen)
}

fn requests() -> Vec<(&'static [u8], Vec<u8>)> {
    vec![
        (
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5;x=1\r\npedia\r\n0\r\nT: 1\r\n\r\n",
            answer("POST", "/echo", b"Wikipedia"),
        ),
        (b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n", answer("GET", "/chunked", b"")),
        (b"HEAD /sized HTTP/1.1\r\nHost: a\r\n\r\n", answer("HEAD", "/sized", b"")),
        (b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n", answer("GET", "/nothing", b"")),
        (b"GET /not-modified HTTP/1.1\r\nhost: a\r\n\r\n", answer("GET", "/not-modified", b"")),
        (
            b"PUT /echo HTTP/1.1\r\nHOST: a\r\nContent-Length: 11\r\n\r\nhello world",
            answer("PUT", "/echo", b"hello world"),
        ),
    ]
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    within(5, s.read_exact(&mut got)).await.expect("read");
    got
}

/// Every framing on one connection, sent at once (pipelined) and trickled
/// a few bytes at a time: the server gets the client's bytes and the
/// client the server's, unchanged and in order.
#[tokio::test]
async fn every_framing_passes_byte_for_byte_pipelined_or_trickled() {
    let (addr, seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    // A rule on the port whose selector matches none of these.
    h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/never", "headers": {"x-never": "1"}}}),
    ]);
    let reqs = requests();
    let sent: Vec<u8> = reqs.iter().flat_map(|(r, _)| r.to_vec()).collect();
    let expected: Vec<u8> = reqs.iter().flat_map(|(_, a)| a.clone()).collect();
    for piece in [sent.len(), 3, 1] {
        seen.lock().expect("lock").clear();
        let mut c = h.connect().await;
        c.set_nodelay(true).expect("nodelay");
        for p in sent.chunks(piece) {
            c.write_all(p).await.expect("send");
            if piece < sent.len() {
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        }
        let got = read_exactly(&mut c, expected.len()).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "pieces of {piece}"
        );
        // And nothing more: the next request is still answered on it.
        c.write_all(reqs[1].0).await.expect("send");
        let got = read_exactly(&mut c, reqs[1].1.len()).await;
        assert_eq!(got, reqs[1].1);
        let mut all = sent.clone();
        all.extend_from_slice(reqs[1].0);
        assert_eq!(
            String::from_utf8_lossy(&seen.lock().expect("lock")),
            String::from_utf8_lossy(&all),
            "what the server got, pieces of {piece}"
        );
    }
}

#[tokio::test]
async fn expect_100_continue_gets_the_servers_interim_answer_before_the_body() {
    let (addr, _seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    h.set(vec![
        json!({"type": "http-delay", "delay": "1ms", "http": {"path": "/never"}}),
    ]);
    let mut c = h.connect().await;
    c.write_all(
        b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .expect("send head");
    let interim = read_exactly(&mut c, 25).await;
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"hello").await.expect("send body");
    let want = answer("POST", "/echo", b"hello");
    assert_eq!(read_exactly(&mut c, want.len()).await, want);
}

#[tokio::test]
async fn a_body_that_ends_with_the_connection_ends_the_clients() {
    let (addr, _seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    let mut c = h.connect().await;
    c.write_all(b"GET /until-close HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let (got, err) = within(5, read_all(&mut c)).await;
    assert!(err.is_none(), "a FIN, not {err:?}");
    assert_eq!(got, answer("GET", "/until-close", b""));
}

#[tokio::test]
async fn a_server_reset_between_requests_resets_the_client_after_the_answer() {
    let (addr, _seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    let mut c = h.connect().await;
    c.write_all(b"GET /reset-after HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("send");
    let (got, err) = within(5, read_all(&mut c)).await;
    assert_eq!(got, answer("GET", "/reset-after", b""));
    let kind = err.map(|e| e.kind());
    assert_eq!(kind, Some(std::io::ErrorKind::ConnectionReset));
}

/// A keep-alive connection on the fast path meets a request a rule
/// selects: that request gets the fault, and the connection goes on
/// (served by hyper from there).
#[tokio::test]
async fn a_selected_request_mid_connection_gets_its_fault_and_the_connection_goes_on() {
    let (addr, seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    let counters = h.set(vec![
        json!({"type": "http-abort", "status": 503, "http": {"path": "/abort"}}),
    ]);
    let mut c = RawConn::new(h.connect().await);
    let echo = b"PUT /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
    for (i, path) in ["/echo", "/abort", "/echo", "/abort"].iter().enumerate() {
        if *path == "/echo" {
            c.send(echo).await;
            let r = within(5, c.response(false)).await.expect("answer");
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, &b"hi"[..]),
                "request {i}"
            );
        } else {
            c.send(b"GET /abort HTTP/1.1\r\nHost: a\r\n\r\n").await;
            let r = within(5, c.response(false)).await.expect("answer");
            assert_eq!(r.status, 503, "request {i}");
        }
    }
    let c = counters[0].snapshot();
    assert_eq!((c.matched, c.dropped), (2, 2));
    let got = seen.lock().expect("lock").clone();
    assert!(got.starts_with(echo), "the first request untouched");
    assert!(!String::from_utf8_lossy(&got).contains("/abort"));
}

#[tokio::test]
async fn a_broken_chunked_body_ends_the_connection_and_the_proxy_serves_on() {
    let (addr, _seen) = scripted_server().await;
    let h = Harness::new(addr).await;
    for body in [&b"zz\r\n"[..], b"4\r\nWikiXX"] {
        let mut c = h.connect().await;
        let mut req =
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        c.write_all(&req).await.expect("send");
        let (got, _err) = within(5, read_all(&mut c)).await;
        // No answer from the server for a body it never got whole: an
        // error from the proxy, or the connection ends.
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 4"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    let mut c = h.connect().await;
    let (req, want) = &requests()[5];
    c.write_all(req).await.expect("send");
    assert_eq!(&read_exactly(&mut c, want.len()).await, want);
}
