//! A server that writes on accept (a banner, an early `503`, an error at its
//! connection limit) and may close without reading what the client sent:
//! the client reads every byte of the answer through the proxy, and the
//! connection ends the way it ends directly. Each case runs many times, on
//! a port without rules, with an HTTP rule that does not match and with a
//! `tcp-bandwidth` rule, and once directly to show the checks hold there.

mod common;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use netfault_tproxy::SNIFF_TIMEOUT;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ROUNDS: usize = 40;

/// The server's answer: an HTTP response, which is also a banner for the
/// clients that do not speak HTTP.
const BODY: &str = "the server is at its connection limit, try again later\n";

fn answer() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

#[derive(Clone, Copy, Debug)]
enum Server {
    /// Writes the answer, then closes at once without reading: FIN when
    /// nothing had arrived from the client, RST when something had.
    AnswerAndClose,
    /// Writes the answer, then echoes until the client closes.
    BannerThenEcho,
}

/// Delays that shift the server's answer and the client's first bytes
/// against each other from one connection to the next, so that the answer
/// arrives before, with and after the client's bytes.
const SERVER_DELAYS_US: [u64; 5] = [0, 0, 300, 1000, 3000];
const CLIENT_DELAYS_US: [u64; 3] = [0, 500, 2000];

/// A blocking server on a thread of its own, so it runs truly alongside
/// the proxy and the client. It stops when the test process ends.
fn early_server(kind: Server) -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut n = 0usize;
        while let Ok((s, _)) = l.accept() {
            let delay = Duration::from_micros(SERVER_DELAYS_US[n % SERVER_DELAYS_US.len()]);
            n += 1;
            std::thread::spawn(move || serve_early(s, kind, delay));
        }
    });
    addr
}

fn serve_early(mut s: std::net::TcpStream, kind: Server, delay: Duration) {
    use std::io::{Read, Write};
    std::thread::sleep(delay);
    if s.write_all(&answer()).is_err() {
        return;
    }
    match kind {
        Server::AnswerAndClose => drop(s),
        Server::BannerThenEcho => {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        if s.write_all(&buf[..k]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// How a connection ended after its last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
}

async fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, End) {
    let (got, err) = within(10, read_all(s)).await;
    match err {
        None => (got, End::Eof),
        Some(e) if e.kind() == ErrorKind::ConnectionReset => (got, End::Reset),
        Some(e) => panic!("read failed after {} bytes: {e}", got.len()),
    }
}

/// One client behaviour against one server; Err names what went wrong.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// Sends nothing, reads to the end: the whole answer, then EOF.
    Silent,
    /// Reads the banner first (it must come at once), then echoes a line
    /// and half-closes: the server's FIN follows.
    BannerThenTalk,
    /// Waits for the banner of a server that closes right after it, then
    /// sends a line the server never reads: the answer, then EOF.
    AfterBannerAndClose,
    /// Sends non-HTTP bytes at once that the server never reads: the whole
    /// answer, then EOF or a reset (as directly, a race).
    UnreadBytes,
    /// Sends an HTTP request at once that the server never reads: the
    /// server's 503 and its body, then EOF or a reset.
    UnreadRequest,
}

async fn once(addr: SocketAddr, client: Client, delay: Duration) -> Result<End, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let want = answer();
    match client {
        Client::Silent => {
            let (got, end) = read_to_end(&mut s).await;
            if got != want || end != End::Eof {
                return Err(format!("{} of {} bytes, {end:?}", got.len(), want.len()));
            }
            Ok(end)
        }
        Client::BannerThenTalk => {
            let t = Instant::now();
            let mut banner = vec![0u8; want.len()];
            within(5, s.read_exact(&mut banner))
                .await
                .map_err(|e| format!("banner: {e}"))?;
            let waited = t.elapsed();
            if banner != want {
                return Err("banner differs".into());
            }
            if waited >= SNIFF_TIMEOUT {
                return Err(format!("banner after {waited:?}"));
            }
            s.write_all(b"EHLO client\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut back = [0u8; 13];
            within(5, s.read_exact(&mut back))
                .await
                .map_err(|e| format!("echo: {e}"))?;
            if &back != b"EHLO client\r\n" {
                return Err("echo differs".into());
            }
            s.shutdown().await.map_err(|e| e.to_string())?;
            let (rest, end) = read_to_end(&mut s).await;
            if !rest.is_empty() || end != End::Eof {
                return Err(format!(
                    "after the half-close: {} bytes, {end:?}",
                    rest.len()
                ));
            }
            Ok(end)
        }
        Client::AfterBannerAndClose => {
            let mut banner = vec![0u8; want.len()];
            within(5, s.read_exact(&mut banner))
                .await
                .map_err(|e| format!("banner: {e}"))?;
            if banner != want {
                return Err("banner differs".into());
            }
            // The server has closed (or is closing): writing may fail once
            // its reset is back, which a client sees directly too.
            let _ = s.write_all(b"QUIT\r\n").await;
            let (rest, end) = read_to_end(&mut s).await;
            if !rest.is_empty() {
                return Err(format!("{} bytes after the banner", rest.len()));
            }
            Ok(end)
        }
        Client::UnreadBytes | Client::UnreadRequest => {
            let req: &[u8] = if matches!(client, Client::UnreadBytes) {
                b"HELLO there, server\r\n"
            } else {
                b"GET /hello HTTP/1.1\r\nHost: web.test\r\n\r\n"
            };
            s.write_all(req).await.map_err(|e| e.to_string())?;
            let mut c = RawConn::new(s);
            let r = within(10, c.response(false))
                .await
                .map_err(|e| format!("no answer: {e}"))?;
            if r.status != 503 || r.body != BODY.as_bytes() {
                return Err(format!(
                    "answer {} with {} body bytes",
                    r.status,
                    r.body.len()
                ));
            }
            let (rest, end) = read_to_end(&mut c.stream).await;
            if !rest.is_empty() {
                return Err(format!("{} bytes after the answer", rest.len()));
            }
            Ok(end)
        }
    }
}

/// Runs `client` against `addr` ROUNDS times; panics with the failures.
async fn rounds(what: &str, addr: SocketAddr, client: Client) {
    let mut failed = Vec::new();
    let mut resets = 0;
    for i in 0..ROUNDS {
        let delay = Duration::from_micros(CLIENT_DELAYS_US[i % CLIENT_DELAYS_US.len()]);
        match once(addr, client, delay).await {
            Ok(End::Reset) => resets += 1,
            Ok(End::Eof) => {}
            Err(e) => failed.push(e),
        }
    }
    println!(
        "{what}, {client:?}: {} of {ROUNDS} answers delivered, {resets} ended by a reset",
        ROUNDS - failed.len()
    );
    assert!(
        failed.is_empty(),
        "{what}, {client:?}: {} of {ROUNDS} failed, first: {}",
        failed.len(),
        failed[0]
    );
}

/// The rule sets every case runs through: none, an HTTP rule that does
/// not match, a bandwidth limit.
fn rule_sets() -> Vec<(&'static str, Vec<Value>)> {
    vec![
        ("no rule", vec![]),
        (
            "non-matching http-abort",
            vec![json!({"type": "http-abort", "status": 418, "http": {"path": "/never"}})],
        ),
        (
            "tcp-bandwidth",
            vec![json!({"type": "tcp-bandwidth", "rate": "50mbit"})],
        ),
    ]
}

async fn case(server: Server, client: Client) {
    let target = early_server(server);
    rounds("direct", target, client).await;
    for (what, rules) in rule_sets() {
        let h = Harness::new(target).await;
        h.set(rules);
        rounds(what, h.addr, client).await;
        // Every connection went through the proxy and is over.
        let t = Instant::now();
        while h.proxy.open_connections() > 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(h.proxy.open_connections(), 0, "{what}: connections left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banner_comes_at_once_and_the_connection_goes_on() {
    case(Server::BannerThenEcho, Client::BannerThenTalk).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_closes_right_after_its_banner() {
    case(Server::AnswerAndClose, Client::AfterBannerAndClose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_gets_the_answer_and_eof() {
    case(Server::AnswerAndClose, Client::Silent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_the_server_never_reads() {
    case(Server::AnswerAndClose, Client::UnreadBytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_the_server_never_reads() {
    case(Server::AnswerAndClose, Client::UnreadRequest).await;
}

/// A rule that matches the request still acts although the server has
/// already answered: the client sees the rule's status, never the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_http_rule_still_acts_on_an_early_server() {
    let target = early_server(Server::AnswerAndClose);
    let h = Harness::new(target).await;
    let c = h.set(vec![
        json!({"type": "http-abort", "status": 418, "http": {"path": "/hello"}}),
    ]);
    for _ in 0..ROUNDS {
        let mut s = h.connect().await;
        s.write_all(b"GET /hello HTTP/1.1\r\nHost: web.test\r\n\r\n")
            .await
            .expect("write");
        let mut c = RawConn::new(s);
        let r = within(10, c.response(false)).await.expect("answer");
        assert_eq!(r.status, 418);
    }
    assert_eq!(c[0].snapshot().dropped, ROUNDS as u64);
}
