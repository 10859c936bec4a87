//! Proxy faults (`http-*`, `tcp-*`) against the API contract, measured by a
//! real client in one pod talking to a real server in another, through the
//! agent's transparent proxy. Server side is `direction: ingress` on the
//! server pod, client side is `direction: egress` on the client pod; the
//! diverted port is `match.ports`. Each test builds its own cluster and
//! asserts what the client (or the server) observed: status codes, bodies,
//! timings, byte counts, peer addresses, and the pod netns state.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use testbed::Pod;

use crate::support::{bpffs_pins, fault_on, netns_state, v4, v6, Cluster, NetnsState};

const MS: Duration = Duration::from_millis(1);

// ---------------------------------------------------------------------------
// The server: hyper (HTTP/1.1 keep-alive or HTTP/2 prior knowledge) on a
// listener opened inside the server pod, served from a runtime out here.
// ---------------------------------------------------------------------------

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Byte `i` of every pattern body (`/big`).
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// `len` pattern bytes, made 64 KiB at a time as they are polled (the
/// server never holds the whole body either).
struct PatternBody {
    sent: u64,
    len: u64,
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.sent >= this.len {
            return Poll::Ready(None);
        }
        let n = (64 * 1024).min(this.len - this.sent);
        let v: Vec<u8> = (this.sent..this.sent + n).map(pattern).collect();
        this.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(v)))))
    }
}

/// A body of several frames and no known length: HTTP/1.1 sends it chunked.
struct ChunkedBody(VecDeque<Bytes>);

impl hyper::body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

/// What a gRPC server answering OK sends: one length-prefixed message, then
/// trailers with `grpc-status: 0`.
struct GrpcOk(u8);

const GRPC_OK_MESSAGE: &[u8] = b"\x00\x00\x00\x00\x02ok";

impl hyper::body::Body for GrpcOk {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        this.0 += 1;
        Poll::Ready(match this.0 {
            1 => Some(Ok(Frame::data(Bytes::from_static(GRPC_OK_MESSAGE)))),
            2 => {
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from_static("0"));
                Some(Ok(Frame::trailers(t)))
            }
            _ => None,
        })
    }
}

/// What the server observed.
#[derive(Default)]
struct Seen {
    accepted: AtomicU64,
    /// Path of each request and when its head arrived.
    requests: Mutex<Vec<(String, Instant)>>,
}

/// An HTTP server in a pod, until dropped.
struct HttpServer {
    rt: Option<tokio::runtime::Runtime>,
    seen: Arc<Seen>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl HttpServer {
    /// Connections the server accepted.
    fn accepted(&self) -> u64 {
        self.seen.accepted.load(Ordering::Relaxed)
    }

    /// When requests for `path` reached the server.
    fn arrivals(&self, path: &str) -> Vec<Instant> {
        self.seen
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, t)| *t)
            .collect()
    }

    /// How many requests for `path` reached the server.
    fn requests(&self, path: &str) -> usize {
        self.arrivals(path).len()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The server's answers:
/// - `/big?n=N`: N pattern bytes (default 64 MiB), with Content-Length;
/// - `/json`: `{"a":1,"b":{"c":2}}` with Content-Length; `/jsonc`: the same, chunked;
/// - a gRPC call (`content-type: application/grpc`): one message and `grpc-status: 0`;
/// - anything else: 200 with JSON naming the method, path, query, the
///   request headers and the peer address the server saw.
async fn app(
    req: Request<Incoming>,
    peer: SocketAddr,
    seen: Arc<Seen>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    seen.requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((path.clone(), Instant::now()));
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().to_string();
    let headers: Map<String, Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                json!(String::from_utf8_lossy(v.as_bytes())),
            )
        })
        .collect();
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let _ = req.into_body().collect().await;
    let peer_ip = match peer.ip() {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        a => a,
    };
    let resp = if path == "/big" {
        let len = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("n="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(64u64 << 20);
        Response::builder()
            .header("content-length", len.to_string())
            .body(PatternBody { sent: 0, len }.boxed())
    } else if path == "/json" {
        Response::builder()
            .header("content-type", "application/json")
            .body(full(r#"{"a":1,"b":{"c":2}}"#))
    } else if path == "/jsonc" {
        let parts = [r#"{"a":1,"#, r#""b":{"c":2}}"#];
        Response::builder()
            .header("content-type", "application/json")
            .body(
                ChunkedBody(
                    parts
                        .iter()
                        .map(|s| Bytes::from_static(s.as_bytes()))
                        .collect(),
                )
                .boxed(),
            )
    } else if grpc {
        Response::builder()
            .header("content-type", "application/grpc")
            .body(GrpcOk(0).boxed())
    } else {
        let body = json!({
            "path": path, "query": query, "method": method,
            "peer": peer_ip.to_string(), "headers": headers,
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(full(body.to_string()))
    };
    Ok(resp.unwrap_or_else(|_| Response::new(full("bad response"))))
}

/// Starts the server on `[::]:port` (or `0.0.0.0:port`) inside `pod`:
/// HTTP/1.1 with keep-alive, or HTTP/2 prior knowledge when `h2`.
fn serve(pod: &Pod, port: u16, h2: bool) -> HttpServer {
    let listener = testbed::in_netns(pod.netns.path(), move || {
        std::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .or_else(|_| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
    })
    .expect("enter server netns")
    .expect("bind the HTTP server");
    listener
        .set_nonblocking(true)
        .expect("O_NONBLOCK on the listener");
    let rt = runtime();
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            seen2.accepted.fetch_add(1, Ordering::Relaxed);
            let seen3 = seen2.clone();
            let svc = hyper::service::service_fn(move |req| app(req, peer, seen3.clone()));
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    HttpServer { rt: Some(rt), seen }
}

// ---------------------------------------------------------------------------
// The client: a hand-written blocking HTTP/1.1 client on a socket opened in
// the client pod (what it reads is exactly what came over the wire).
// ---------------------------------------------------------------------------

/// A TCP connection opened from inside `from`'s netns.
fn connect(from: &Pod, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    testbed::in_netns(from.netns.path(), move || {
        TcpStream::connect_timeout(&to, timeout)
    })
    .expect("enter client netns")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response as the client read it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One client connection.
struct H1 {
    s: TcpStream,
    host: String,
    /// Bytes read but not consumed yet.
    buf: Vec<u8>,
}

impl H1 {
    /// Connects (2 s timeout); reads and writes time out after 5 s.
    fn open(from: &Pod, to: SocketAddr) -> io::Result<H1> {
        H1::open_with(from, to, Duration::from_secs(2), Duration::from_secs(5))
    }

    fn open_with(
        from: &Pod,
        to: SocketAddr,
        connect_t: Duration,
        io_t: Duration,
    ) -> io::Result<H1> {
        let s = connect(from, to, connect_t)?;
        s.set_read_timeout(Some(io_t))?;
        s.set_write_timeout(Some(io_t))?;
        Ok(H1 {
            s,
            host: to.to_string(),
            buf: Vec::new(),
        })
    }

    /// Writes a request (with Content-Length when there is a body).
    fn send(
        &mut self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> io::Result<()> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" || method == "PUT" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.s.write_all(&bytes)
    }

    /// `GET path` and its whole response. An error means a reset, an EOF
    /// or a timeout.
    fn get(&mut self, path: &str) -> io::Result<Reply> {
        self.send("GET", path, &[], b"")?;
        self.read_reply()
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(l);
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// The status line and headers.
    fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        let status_line = self.line()?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line()?;
            if l.is_empty() {
                return Ok((status, headers));
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        let (status, headers) = self.read_head()?;
        let chunked = header(&headers, "transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let len = header(&headers, "content-length").and_then(|v| v.parse::<usize>().ok());
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let l = self.line()?;
                let size = usize::from_str_radix(l.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|e| io::Error::other(format!("bad chunk size {l:?}: {e}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line()?.is_empty() {}
                    break;
                }
                body.extend(self.take(size)?);
                if self.take(2)? != b"\r\n" {
                    return Err(io::Error::other("chunk not followed by CRLF"));
                }
            }
            body
        } else if let Some(n) = len {
            self.take(n)?
        } else if status == 204 || status == 304 || status < 200 {
            Vec::new()
        } else {
            // Delimited by EOF.
            loop {
                match self.fill() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            std::mem::take(&mut self.buf)
        };
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// Reads `len` body bytes, handing each piece to `f` as it arrives.
    fn stream_body(&mut self, len: u64, mut f: impl FnMut(&[u8])) -> io::Result<()> {
        let mut got = 0u64;
        let first = self.buf.len().min(len as usize);
        if first > 0 {
            f(&self.buf[..first]);
            self.buf.drain(..first);
            got += first as u64;
        }
        let mut chunk = vec![0u8; 1 << 20];
        while got < len {
            let want = ((len - got) as usize).min(chunk.len());
            let n = self.s.read(&mut chunk[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body cut after {got} of {len} bytes"),
                ));
            }
            f(&chunk[..n]);
            got += n as u64;
        }
        Ok(())
    }
}

/// `GET path` on a new connection; `None` when the connection failed, was
/// reset or closed without a reply.
fn get(from: &Pod, to: SocketAddr, path: &str) -> Option<Reply> {
    H1::open(from, to).ok()?.get(path).ok()
}

/// The status of `GET path` on a new connection; 0 without a reply.
fn status(from: &Pod, to: SocketAddr, path: &str) -> u16 {
    get(from, to, path).map_or(0, |r| r.status)
}

/// Like [`status`], with short timeouts, for polling.
fn status_quick(from: &Pod, to: SocketAddr, path: &str) -> u16 {
    H1::open_with(from, to, Duration::from_millis(500), Duration::from_secs(1))
        .and_then(|mut c| c.get(path))
        .map_or(0, |r| r.status)
}

/// A proxy fault on `pod` diverting `ports`, for 60 s.
fn proxy_fault(pod: &Pod, direction: &str, ports: &str, action: Value) -> Value {
    fault_on(pod, direction, json!({"ports": ports}), action, "60s")
}

/// Polls (every 50 ms, up to `within`) until the pod's netns is back to
/// `pristine`; asserts it is.
fn assert_restored(pod: &Pod, pristine: &NetnsState, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let now = netns_state(pod.netns.path(), &pod.ifname);
        if &now == pristine {
            return;
        }
        if Instant::now() >= deadline {
            assert_eq!(
                &now, pristine,
                "{what}: the pod netns must be as before the fault"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nft tables, policy rules and routes in a netns: what survives the pod's
/// interface (after CNI DEL the interface, hence tc state, is gone).
fn l3_state(netns: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    testbed::in_netns(netns, || {
        let ruleset = nftables::helper::get_current_ruleset().expect("nft -j list ruleset");
        let tables = ruleset
            .objects
            .iter()
            .filter_map(|o| match o {
                nftables::schema::NfObject::ListObject(nftables::schema::NfListObject::Table(
                    t,
                )) => Some(format!("{:?} {}", t.family, t.name)),
                _ => None,
            })
            .collect();
        let mut sock = netfault_ebpf::TcSocket::open().expect("rtnetlink socket");
        (
            tables,
            sock.rule_summary().expect("list policy rules"),
            sock.route_summary().expect("list routes"),
        )
    })
    .expect("enter pod netns")
}

/// One `/proc/PID/status` value in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read the agent's /proc status")
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

/// Whether a read result is the end of a reset or closed connection.
fn is_reset_or_eof(r: &io::Result<usize>) -> bool {
    match r {
        Ok(0) => true,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        ),
        Ok(_) => false,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// `http-abort` with a status, server side (ingress on the server pod) and
/// client side (egress on the client pod): the client gets the status and
/// the server never sees the request; another port of the same server is
/// not diverted and answers 200.
#[test]
fn abort_status_server_side_and_client_side() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18101, false);
    let _other = serve(&server, 18102, false);
    let to = SocketAddr::new(v4(&server), 18101);
    let other = SocketAddr::new(v4(&server), 18102);
    assert_eq!(status(&client, to, "/x"), 200, "baseline");
    assert_eq!(srv.requests("/x"), 1);

    let f = c.fault(proxy_fault(
        &server,
        "ingress",
        "18101",
        json!({"type": "http-abort", "status": 503}),
    ));
    let r = get(&client, to, "/x").expect("a reply from the server-side abort");
    assert_eq!(r.status, 503, "server-side abort: {r:?}");
    assert_eq!(
        srv.requests("/x"),
        1,
        "the aborted request never reached the server"
    );
    assert_eq!(
        status(&client, other, "/x"),
        200,
        "a port not in match.ports"
    );
    c.delete_fault(&f);
    assert_eq!(status(&client, to, "/x"), 200, "after removal");

    let f = c.fault(proxy_fault(
        &client,
        "egress",
        "18101",
        json!({"type": "http-abort", "status": 502}),
    ));
    let before = srv.requests("/y");
    assert_eq!(status(&client, to, "/y"), 502, "client-side abort");
    assert_eq!(
        srv.requests("/y"),
        before,
        "the aborted request never left the client"
    );
    assert_eq!(
        status(&client, other, "/y"),
        200,
        "a port not in match.ports"
    );
    c.delete_fault(&f);
}

/// The `http.path` glob selects which requests abort: `/fail/*` matches
/// under `/fail/` at any depth (query ignored) and nothing else.
#[test]
fn abort_by_path_glob() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18103, false);
    let to = SocketAddr::new(v4(&server), 18103);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18103",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail/*"}}),
    ));
    let cases = [
        ("/fail/a", 503),
        ("/fail/a/b/c", 503),
        ("/fail/x?q=1", 503),
        ("/fail/", 503),
        ("/fail", 200),
        ("/failing/a", 200),
        ("/ok", 200),
        ("/ok?next=/fail/a", 200),
        ("/a/fail/b", 200),
    ];
    let got: Vec<(&str, u16)> = cases
        .iter()
        .map(|(p, _)| (*p, status(&client, to, p)))
        .collect();
    let want: Vec<(&str, u16)> = cases.to_vec();
    assert_eq!(got, want, "status by path under http.path /fail/*");
}

/// `percent: 50` aborts about half of 200 requests (binomial, mean 100,
/// sd 7.07, accepted within 4.5 sd); every other request reaches the server.
#[test]
fn abort_percent_is_binomial() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18104, false);
    let to = SocketAddr::new(v4(&server), 18104);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18104",
        json!({"type": "http-abort", "status": 503, "percent": 50}),
    ));
    let n = 200;
    let statuses: Vec<u16> = (0..n).map(|_| status(&client, to, "/p")).collect();
    let aborted = statuses.iter().filter(|s| **s == 503).count();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(aborted + ok, n, "only 200 and 503: {statuses:?}");
    let sd = (n as f64 * 0.25).sqrt();
    let lo = (100.0 - 4.5 * sd).ceil() as usize;
    let hi = (100.0 + 4.5 * sd).floor() as usize;
    assert!(
        (lo..=hi).contains(&aborted),
        "percent 50: {aborted} of {n} aborted, expected {lo}..={hi}"
    );
    assert_eq!(
        srv.requests("/p"),
        ok,
        "exactly the non-aborted requests reached the server"
    );
}

/// One keep-alive connection carries alternating matching and non-matching
/// requests; each gets its own answer (503 / 200) and the server accepts a
/// single connection for all of them.
#[test]
fn keep_alive_alternating_requests() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18105, false);
    let to = SocketAddr::new(v4(&server), 18105);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18105",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail"}}),
    ));
    let mut conn = H1::open(&client, to).expect("connect");
    let local = conn.s.local_addr().expect("local address");
    let mut seen = Vec::new();
    for i in 0..10 {
        let path = if i % 2 == 0 { "/fail" } else { "/ok" };
        let r = conn.get(path).unwrap_or_else(|e| {
            panic!("request {i} ({path}) on the same connection: {e}; so far {seen:?}")
        });
        seen.push((path, r.status));
        if path == "/ok" {
            assert_eq!(r.json()["path"], "/ok");
        }
    }
    let want: Vec<(&str, u16)> = (0..10)
        .map(|i| {
            if i % 2 == 0 {
                ("/fail", 503)
            } else {
                ("/ok", 200)
            }
        })
        .collect();
    assert_eq!(seen, want);
    assert_eq!(
        conn.s.local_addr().expect("local address"),
        local,
        "one client socket"
    );
    assert_eq!(srv.accepted(), 1, "one connection reached the server");
    assert_eq!(srv.requests("/ok"), 5);
    assert_eq!(srv.requests("/fail"), 0);
}

/// `http-delay` 300 ms: in the request phase the request reaches the
/// server 300 ms late; in the response phase it reaches it at once and the
/// response comes 300 ms late. The client waits 300..450 ms either way;
/// other paths stay fast.
#[test]
fn http_delay_request_and_response_phase() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18106, false);
    let to = SocketAddr::new(v4(&server), 18106);
    // Client latency of one request on a fresh connection, and when it
    // was sent.
    let time = |path: &str| {
        let mut conn = H1::open(&client, to).expect("connect");
        let t = Instant::now();
        let r = conn.get(path).expect("reply");
        assert_eq!(r.status, 200, "{path}");
        (t, t.elapsed())
    };
    let (_, base) = time("/fast");
    assert!(base < 100 * MS, "baseline without faults: {base:?}");

    c.fault(proxy_fault(
        &server,
        "ingress",
        "18106",
        json!({"type": "http-delay", "delay": "300ms", "phase": "request", "http": {"path": "/req"}}),
    ));
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18106",
        json!({"type": "http-delay", "delay": "300ms", "phase": "response", "http": {"path": "/resp"}}),
    ));
    let (_, fast) = time("/fast");
    let (sent_req, req) = time("/req");
    let (sent_resp, resp) = time("/resp");
    eprintln!("http-delay 300ms: request phase {req:?}, response phase {resp:?}, other {fast:?}, baseline {base:?}");
    assert!(
        fast < 100 * MS,
        "a non-matching path through the proxy: {fast:?}"
    );
    for (what, d) in [("request phase", req), ("response phase", resp)] {
        assert!(
            d >= 300 * MS && d < 450 * MS,
            "{what}: client latency {d:?}, expected 300..450 ms"
        );
    }
    let at_server = |path: &str, sent: Instant| {
        let a = srv.arrivals(path);
        assert_eq!(a.len(), 1, "{path} reached the server once");
        a[0].duration_since(sent)
    };
    let req_arrival = at_server("/req", sent_req);
    let resp_arrival = at_server("/resp", sent_resp);
    assert!(
        req_arrival >= 300 * MS,
        "request phase: the request reached the server after {req_arrival:?}"
    );
    assert!(
        resp_arrival < 100 * MS,
        "response phase: the request reached the server after {resp_arrival:?}"
    );
}

/// `http-patch` with `body_merge` in the response phase applies an RFC 7396
/// merge patch (null deletes, objects merge): the client parses valid JSON
/// `{"a":1,"b":{"d":3}}` whose framing matches its length, for a response
/// with Content-Length and for a chunked one, and the connection stays usable.
#[test]
fn http_patch_body_merge() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18107, false);
    let to = SocketAddr::new(v4(&server), 18107);
    let direct = get(&client, to, "/json").expect("reply");
    assert_eq!(direct.json(), json!({"a": 1, "b": {"c": 2}}), "baseline");
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18107",
        json!({"type": "http-patch", "phase": "response", "http": {"path": "/json*"},
               "body_merge": {"b": {"c": null, "d": 3}}}),
    ));
    let mut conn = H1::open(&client, to).expect("connect");
    for path in ["/json", "/jsonc"] {
        let r = conn.get(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json(), json!({"a": 1, "b": {"d": 3}}), "{path} patched");
        if let Some(len) = r.header("content-length") {
            assert_eq!(
                len.parse::<usize>().ok(),
                Some(r.body.len()),
                "{path}: Content-Length matches the patched body"
            );
        } else {
            assert!(
                r.header("transfer-encoding")
                    .is_some_and(|v| v.contains("chunked")),
                "{path}: framed by Content-Length or chunked: {r:?}"
            );
        }
    }
    // The framing was right: the next response on the connection parses.
    let r = conn
        .get("/after")
        .expect("a request after the patched ones");
    assert_eq!((r.status, r.json()["path"].clone()), (200, json!("/after")));
}

/// A 64 MiB response passes a diverted port under a response-phase rule
/// for another path: it arrives byte for byte, and the agent's resident
/// memory (peak and sampled) grows by far less than the body (< 24 MiB).
#[test]
fn large_body_streams_intact_without_buffering() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18108, false);
    let to = SocketAddr::new(v4(&server), 18108);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18108",
        json!({"type": "http-patch", "phase": "response", "http": {"path": "/json"},
               "body_merge": {"patched": true}}),
    ));
    // Proof that the port is diverted, and a warm proxy.
    let r = get(&client, to, "/json").expect("reply");
    assert_eq!(r.json()["patched"], true, "the proxy serves the port");

    let pid = c.agent.pid();
    let hwm_before = proc_kib(pid, "VmHWM");
    let rss_before = proc_kib(pid, "VmRSS");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut max = 0;
        while !stop2.load(Ordering::Relaxed) {
            max = max.max(proc_kib(pid, "VmRSS"));
            std::thread::sleep(Duration::from_millis(10));
        }
        max
    });

    const BIG: u64 = 64 << 20;
    // Expected bytes for any offset: PAT[o % 251..][..n] for n up to 1 MiB.
    let pat: Vec<u8> = (0..(1u64 << 20) + 251).map(pattern).collect();
    let mut conn = H1::open(&client, to).expect("connect");
    let t = Instant::now();
    conn.send("GET", "/big", &[], b"").expect("request");
    let (st, headers) = conn.read_head().expect("response head");
    assert_eq!(st, 200);
    assert_eq!(
        header(&headers, "content-length"),
        Some(BIG.to_string().as_str())
    );
    let mut got = 0u64;
    let mut first_bad = None;
    conn.stream_body(BIG, |piece| {
        for part in piece.chunks(1 << 20) {
            let o = (got % 251) as usize;
            if first_bad.is_none() && part != &pat[o..o + part.len()] {
                first_bad = Some(got);
            }
            got += part.len() as u64;
        }
    })
    .expect("the whole body");
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let rss_max = sampler.join().expect("RSS sampler");
    let hwm_grew = proc_kib(pid, "VmHWM").saturating_sub(hwm_before);
    let rss_grew = rss_max.saturating_sub(rss_before);
    eprintln!(
        "64 MiB through the proxy in {took:?}; agent VmHWM +{hwm_grew} KiB, sampled VmRSS +{rss_grew} KiB (from {rss_before} KiB)"
    );
    assert_eq!(got, BIG);
    assert_eq!(first_bad, None, "the body arrives unchanged");
    assert!(
        hwm_grew < 24 * 1024,
        "agent peak RSS grew {hwm_grew} KiB for a 64 MiB body"
    );
    assert!(
        rss_grew < 24 * 1024,
        "agent RSS grew {rss_grew} KiB for a 64 MiB body"
    );
}

/// HTTP/2 prior knowledge through the server-side proxy: an `http-abort`
/// answers a plain h2 request with its status; a gRPC call (content-type
/// application/grpc) gets HTTP 200 with a trailers-only `grpc-status`
/// mapped from the status (503 → 14 UNAVAILABLE, 429 → 8
/// RESOURCE_EXHAUSTED); other streams, gRPC trailers included, reach the
/// server on one multiplexed connection.
#[test]
fn h2c_and_grpc_aborts() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18109, true);
    let to = SocketAddr::new(v4(&server), 18109);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18109",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail*"}}),
    ));
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18109",
        json!({"type": "http-abort", "status": 429, "http": {"path": "/pkg.Svc/Busy"}}),
    ));
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18109",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/pkg.Svc/Down"}}),
    ));
    let stream = connect(&client, to, Duration::from_secs(2)).expect("connect");
    stream.set_nonblocking(true).expect("O_NONBLOCK");
    let rt = runtime();
    rt.block_on(async move {
        let exchange = async move {
            let io = TokioIo::new(tokio::net::TcpStream::from_std(stream).expect("tokio stream"));
            let (mut tx, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
                TokioExecutor::new(),
                io,
            )
            .await
            .expect("h2 handshake through the proxy");
            tokio::spawn(conn);
            let mut call = async |path: &str, grpc: bool| {
                let mut b = Request::builder().uri(format!("http://server{path}"));
                let body = if grpc {
                    b = b
                        .method("POST")
                        .header("content-type", "application/grpc")
                        .header("te", "trailers");
                    Bytes::from_static(b"\x00\x00\x00\x00\x02hi")
                } else {
                    Bytes::new()
                };
                let req = b.body(Full::new(body)).expect("request");
                tx.ready().await.expect("h2 connection ready");
                let resp = tx
                    .send_request(req)
                    .await
                    .unwrap_or_else(|e| panic!("{path}: {e}"));
                let (parts, body) = resp.into_parts();
                let collected = body.collect().await.expect("response body");
                let trailers = collected.trailers().cloned();
                (parts, collected.to_bytes(), trailers)
            };
            let hv = |h: &HeaderMap, k: &str| {
                h.get(k)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };

            let (p, body, _) = call("/ok", false).await;
            assert_eq!(
                (p.status.as_u16(), p.version),
                (200, hyper::Version::HTTP_2)
            );
            let v: Value = serde_json::from_slice(&body).expect("JSON");
            assert_eq!(v["path"], "/ok");

            let (p, _, _) = call("/fail/x", false).await;
            assert_eq!(p.status.as_u16(), 503, "plain h2 request aborted");

            for (path, code) in [("/pkg.Svc/Down", "14"), ("/pkg.Svc/Busy", "8")] {
                let (p, body, trailers) = call(path, true).await;
                assert_eq!(
                    p.status.as_u16(),
                    200,
                    "{path}: gRPC errors travel with HTTP 200"
                );
                assert_eq!(
                    hv(&p.headers, "grpc-status").as_deref(),
                    Some(code),
                    "{path}: {p:?}"
                );
                assert!(
                    body.is_empty(),
                    "{path}: trailers-only, no message: {body:?}"
                );
                assert!(
                    trailers.is_none(),
                    "{path}: trailers-only, no trailers frame: {trailers:?}"
                );
            }

            let (p, body, trailers) = call("/pkg.Svc/Up", true).await;
            assert_eq!(p.status.as_u16(), 200);
            assert_eq!(&body[..], GRPC_OK_MESSAGE, "the server's message");
            assert_eq!(
                trailers
                    .as_ref()
                    .and_then(|t| hv(t, "grpc-status"))
                    .as_deref(),
                Some("0"),
                "the server's trailers pass through"
            );
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the h2 exchange within 10 s");
    });
    assert_eq!(
        srv.requests("/pkg.Svc/Down") + srv.requests("/fail/x"),
        0,
        "aborted streams never reached the server"
    );
    assert_eq!(srv.requests("/pkg.Svc/Up"), 1);
    assert_eq!(srv.accepted(), 1, "one upstream connection");
}

/// Bytes that are not HTTP on a diverted port (a fault with an HTTP
/// selector on an echo server's port) are relayed unchanged: 1 MiB of
/// random bytes comes back byte for byte. An HTTP request on the same port
/// shows the port is diverted.
#[test]
fn non_http_bytes_relayed_unchanged() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let echo = testbed::tcp_listen(&server, 18110).expect("echo server");
    let to = SocketAddr::new(v4(&server), 18110);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18110",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/x"}}),
    ));
    assert_eq!(
        status(&client, to, "/x"),
        503,
        "HTTP on this port meets the proxy"
    );
    let accepted = echo.accepted();

    let mut payload: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    payload[0] = 0xff; // no method, no h2 preface, no TLS record
    let mut s = connect(&client, to, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("SO_RCVTIMEO");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("SO_SNDTIMEO");
    let mut w = s.try_clone().expect("dup socket");
    let sent = payload.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).expect("the echo of 1 MiB");
    writer.join().expect("writer thread").expect("write 1 MiB");
    let first_diff = back.iter().zip(&payload).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "1 MiB of random bytes echoed unchanged");
    assert_eq!(echo.accepted(), accepted + 1, "relayed to the echo server");
}

/// The server sees the client's own address, not the proxy's, while a
/// fault diverts the connection: on one connection a matching request is
/// aborted (diverted) and the next one reports the client pod's IP as peer.
/// Server side (transparent upstream) and client side both.
#[test]
fn server_sees_client_address() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18111, false);
    let to = SocketAddr::new(v4(&server), 18111);
    let me = v4(&client).to_string();
    for (pod, direction) in [(&server, "ingress"), (&client, "egress")] {
        let f = c.fault(proxy_fault(
            pod,
            direction,
            "18111",
            json!({"type": "http-abort", "status": 503, "http": {"path": "/fail"}}),
        ));
        let mut conn = H1::open(&client, to).expect("connect");
        assert_eq!(
            conn.get("/fail").expect("reply").status,
            503,
            "{direction}: diverted"
        );
        let r = conn.get("/whoami").expect("reply");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.json()["peer"],
            me,
            "{direction}: the server saw the client pod's address"
        );
        drop(conn);
        c.delete_fault(&f);
    }
}

/// `tcp-reset` with `after: 300ms`: a connection works, then is reset (or
/// closed) 300 ± 100 ms after it was opened.
#[test]
fn tcp_reset_after_time() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18112, false);
    let to = SocketAddr::new(v4(&server), 18112);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18112",
        json!({"type": "tcp-reset", "after": "300ms"}),
    ));
    let t0 = Instant::now();
    let mut conn = H1::open(&client, to).expect("connect");
    assert_eq!(
        conn.get("/x").expect("a reply before the reset").status,
        200
    );
    let mut buf = [0u8; 64];
    let r = conn.s.read(&mut buf);
    let at = t0.elapsed();
    assert!(
        is_reset_or_eof(&r),
        "expected a reset or EOF, got {r:?} after {at:?}"
    );
    eprintln!("tcp-reset after 300ms: {r:?} at {at:?}");
    assert!(
        at >= 200 * MS && at <= 400 * MS,
        "reset at {at:?} after connect, expected 300 ± 100 ms"
    );
}

/// `tcp-reset` with `after_bytes: 100000`: while the server streams a
/// large body, the client receives at most 100000 bytes, then a reset or
/// EOF (and not before half of them).
#[test]
fn tcp_reset_after_bytes() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18113, false);
    let to = SocketAddr::new(v4(&server), 18113);
    const N: usize = 100_000;
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18113",
        json!({"type": "tcp-reset", "after_bytes": N}),
    ));
    let mut conn = H1::open(&client, to).expect("connect");
    conn.send("GET", "/big?n=10000000", &[], b"")
        .expect("request");
    let mut total = 0usize;
    let mut buf = vec![0u8; 65536];
    let end = loop {
        let r = conn.s.read(&mut buf);
        match r {
            Ok(n) if n > 0 => total += n,
            r => break r,
        }
    };
    eprintln!("tcp-reset after_bytes {N}: {total} bytes, then {end:?}");
    assert!(
        is_reset_or_eof(&end),
        "the transfer ended with {end:?} after {total} bytes"
    );
    assert!(
        total <= N,
        "the client received {total} bytes, more than {N}"
    );
    assert!(total >= N / 2, "the client received only {total} bytes");
}

/// `tcp-bandwidth` 8mbit: a 4 MB response takes the time 8 Mbit/s allow
/// (measured throughput within ±15%).
#[test]
fn tcp_bandwidth_limits_throughput() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18114, false);
    let to = SocketAddr::new(v4(&server), 18114);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18114",
        json!({"type": "tcp-bandwidth", "rate": "8mbit"}),
    ));
    const LEN: u64 = 4_000_000;
    let mut conn = H1::open(&client, to).expect("connect");
    conn.s
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("SO_RCVTIMEO");
    let t = Instant::now();
    conn.send("GET", &format!("/big?n={LEN}"), &[], b"")
        .expect("request");
    let (st, _) = conn.read_head().expect("head");
    assert_eq!(st, 200);
    conn.stream_body(LEN, |_| {}).expect("the 4 MB body");
    let secs = t.elapsed().as_secs_f64();
    let mbit = LEN as f64 * 8.0 / secs / 1e6;
    eprintln!("tcp-bandwidth 8mbit: 4 MB in {secs:.2} s = {mbit:.2} Mbit/s");
    assert!(
        (6.8..=9.2).contains(&mbit),
        "tcp-bandwidth 8mbit: measured {mbit:.2} Mbit/s"
    );
}

/// With the agent SIGKILLed under active aborts, requests succeed again
/// (200) within 10 s, server side and client side (polled every 200 ms,
/// asserted ≤ 11 s). A restarted agent serves the faults again; after
/// DELETE nothing of them is left in either pod netns.
#[test]
fn agent_sigkill_fails_open() {
    testbed::require_root!();
    let mut c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _a = serve(&server, 18115, false);
    let _b = serve(&server, 18116, false);
    let pristine_c = netns_state(client.netns.path(), &client.ifname);
    let pristine_s = netns_state(server.netns.path(), &server.ifname);
    let server_side = SocketAddr::new(v4(&server), 18115);
    let client_side = SocketAddr::new(v4(&server), 18116);
    let f1 = c.fault(proxy_fault(
        &server,
        "ingress",
        "18115",
        json!({"type": "http-abort", "status": 503}),
    ));
    let f2 = c.fault(proxy_fault(
        &client,
        "egress",
        "18116",
        json!({"type": "http-abort", "status": 503}),
    ));
    assert_eq!(status(&client, server_side, "/"), 503);
    assert_eq!(status(&client, client_side, "/"), 503);

    c.agent.kill().expect("SIGKILL netfaultd");
    let killed = Instant::now();
    let targets = [("server side", server_side), ("client side", client_side)];
    let mut recovered: [Option<Duration>; 2] = [None, None];
    while killed.elapsed() < Duration::from_secs(12) && recovered.iter().any(Option::is_none) {
        for (i, (_, to)) in targets.iter().enumerate() {
            if recovered[i].is_none() && status_quick(&client, *to, "/") == 200 {
                recovered[i] = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "after SIGKILL, 200 again: server side {:?}, client side {:?}",
        recovered[0], recovered[1]
    );
    for (i, (what, _)) in targets.iter().enumerate() {
        let t = recovered[i].unwrap_or_else(|| panic!("{what}: no 200 within 12 s of the kill"));
        assert!(
            t <= Duration::from_secs(11),
            "{what}: 200 again only after {t:?}"
        );
    }

    c.agent.restart().expect("a new netfaultd");
    let deadline = Instant::now() + Duration::from_secs(5);
    let back = loop {
        let s = [
            status_quick(&client, server_side, "/"),
            status_quick(&client, client_side, "/"),
        ];
        if s == [503, 503] || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        back,
        [503, 503],
        "the restarted agent serves both faults again"
    );
    c.delete_fault(&f1);
    c.delete_fault(&f2);
    assert_eq!(status(&client, server_side, "/"), 200, "after DELETE");
    assert_eq!(status(&client, client_side, "/"), 200, "after DELETE");
    assert_restored(
        &client,
        &pristine_c,
        Duration::from_secs(2),
        "client pod after DELETE",
    );
    assert_restored(
        &server,
        &pristine_s,
        Duration::from_secs(2),
        "server pod after DELETE",
    );
    assert!(bpffs_pins().is_empty(), "bpffs pins: {:?}", bpffs_pins());
}

/// No leftovers: after DELETE of a server-side and a client-side proxy
/// fault, requests go direct at once (200) and both pod netns return to
/// their pristine state (nft tables, routes, policy rules, qdiscs, filters)
/// within 2 s. CNI DEL of a pod with an active proxy fault and an open
/// proxied connection leaves no nft table, policy rule or route of ours.
#[test]
fn no_leftovers_after_delete_and_cni_del() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18117, false);
    let to = SocketAddr::new(v4(&server), 18117);
    let pristine_c = netns_state(client.netns.path(), &client.ifname);
    let pristine_s = netns_state(server.netns.path(), &server.ifname);
    let (tables_s, rules_s, routes_s) = l3_state(server.netns.path());

    let f1 = c.fault(proxy_fault(
        &server,
        "ingress",
        "18117",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/s"}}),
    ));
    let f2 = c.fault(proxy_fault(
        &client,
        "egress",
        "18117",
        json!({"type": "http-abort", "status": 502, "http": {"path": "/c"}}),
    ));
    assert_eq!(status(&client, to, "/s"), 503);
    assert_eq!(status(&client, to, "/c"), 502);
    assert_ne!(
        netns_state(server.netns.path(), &server.ifname),
        pristine_s,
        "diversion installed"
    );
    c.delete_fault(&f1);
    c.delete_fault(&f2);
    assert_eq!(
        status(&client, to, "/s"),
        200,
        "direct at once after DELETE"
    );
    assert_eq!(
        status(&client, to, "/c"),
        200,
        "direct at once after DELETE"
    );
    assert_restored(
        &client,
        &pristine_c,
        Duration::from_secs(2),
        "client pod after DELETE",
    );
    assert_restored(
        &server,
        &pristine_s,
        Duration::from_secs(2),
        "server pod after DELETE",
    );
    assert!(bpffs_pins().is_empty(), "bpffs pins: {:?}", bpffs_pins());

    let f3 = c.fault(proxy_fault(
        &server,
        "ingress",
        "18117",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/s"}}),
    ));
    let mut open = H1::open(&client, to).expect("connect");
    assert_eq!(
        open.get("/s").expect("reply").status,
        503,
        "a proxied connection, left open"
    );
    c.node.del_pod(&server).expect("CNI DEL");
    assert!(
        c.agent
            .client()
            .call("GET", &format!("/v1/faults/{f3}"), None)
            .is_err(),
        "the fault went with its pod"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (tables, rules, routes) = l3_state(server.netns.path());
        let clean =
            tables == tables_s && rules == rules_s && routes.iter().all(|r| routes_s.contains(r));
        if clean {
            break;
        }
        if Instant::now() >= deadline {
            panic!(
                "after CNI DEL: nft tables {tables:?} (before {tables_s:?}), rules {rules:?} \
                 (before {rules_s:?}), routes {routes:?} (before {routes_s:?})"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(bpffs_pins().is_empty(), "bpffs pins: {:?}", bpffs_pins());
}

/// IPv6: a server-side abort whose `match.cidr` is an IPv6 prefix aborts
/// requests to the server's v6 address (and the server still sees the
/// client's v6 address on other paths), while IPv4 requests are untouched.
#[test]
fn ipv6_abort_and_v4_untouched() {
    testbed::require_root!();
    let c = Cluster::new(true);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18118, false);
    let to6 = SocketAddr::new(v6(&server), 18118);
    let to4 = SocketAddr::new(v4(&server), 18118);
    assert_eq!(status(&client, to6, "/fail"), 200, "baseline v6");
    c.fault(fault_on(
        &server,
        "ingress",
        json!({"ports": "18118", "cidr": "fd00::/8"}),
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail"}}),
        "60s",
    ));
    let mut conn = H1::open(&client, to6).expect("connect over IPv6");
    assert_eq!(
        conn.get("/fail").expect("reply").status,
        503,
        "IPv6 aborted"
    );
    let r = conn.get("/ok").expect("reply");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["peer"],
        v6(&client).to_string(),
        "v6 client address preserved"
    );
    let before = srv.requests("/fail");
    assert_eq!(
        status(&client, to4, "/fail"),
        200,
        "IPv4 is outside the v6 cidr"
    );
    assert_eq!(srv.requests("/fail"), before + 1);
}

/// A keep-alive connection opened before the fault keeps talking to the
/// server directly (a matching path still gets 200); new connections get
/// the fault (503).
#[test]
fn connection_opened_before_injection_stays_direct() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _srv = serve(&server, 18119, false);
    let to = SocketAddr::new(v4(&server), 18119);
    let mut old = H1::open(&client, to).expect("connect");
    assert_eq!(old.get("/fail").expect("reply").status, 200, "baseline");
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18119",
        json!({"type": "http-abort", "status": 503, "http": {"path": "/fail"}}),
    ));
    assert_eq!(
        status(&client, to, "/fail"),
        503,
        "a new connection gets the fault"
    );
    for i in 0..3 {
        assert_eq!(
            old.get("/fail")
                .expect("the old connection still works")
                .status,
            200,
            "request {i} on the connection opened before the fault"
        );
    }
    assert_eq!(
        status(&client, to, "/fail"),
        503,
        "new connections still get it"
    );
}

/// `http-replace`: in the request phase the server receives the replaced
/// path; in the response phase the client gets the replaced status, body
/// (with matching Content-Length) and header, although the server answered.
#[test]
fn http_replace_request_and_response() {
    testbed::require_root!();
    let c = Cluster::new(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let srv = serve(&server, 18120, false);
    let to = SocketAddr::new(v4(&server), 18120);
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18120",
        json!({"type": "http-replace", "phase": "request", "path": "/replaced", "http": {"path": "/orig"}}),
    ));
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18120",
        json!({"type": "http-replace", "phase": "response", "status": 500, "body": "replaced",
               "headers": {"x-replaced": "yes"}, "http": {"path": "/r500"}}),
    ));
    let r = get(&client, to, "/orig").expect("reply");
    assert_eq!(
        (r.status, r.json()["path"].clone()),
        (200, json!("/replaced"))
    );
    assert_eq!((srv.requests("/orig"), srv.requests("/replaced")), (0, 1));

    let r = get(&client, to, "/r500").expect("reply");
    assert_eq!(r.status, 500);
    assert_eq!(r.body, b"replaced");
    assert_eq!(r.header("x-replaced"), Some("yes"));
    if let Some(len) = r.header("content-length") {
        assert_eq!(len, "8");
    }
    assert_eq!(srv.requests("/r500"), 1, "the request reached the server");
}

/// `tcp-slow-close` 400 ms on an echo server's port: after the client's
/// FIN, its EOF comes back only once the proxy held the client's FIN and
/// then the server's FIN for 400 ms each (≥ 750 ms); without the fault the
/// EOF is immediate.
#[test]
fn tcp_slow_close_holds_fins() {
    testbed::require_root!();
    let c = Cluster::exclusive(false);
    let (client, server) = (c.pod("client"), c.pod("server"));
    let _slow = testbed::tcp_listen(&server, 18121).expect("echo server");
    let _plain = testbed::tcp_listen(&server, 18122).expect("echo server");
    c.fault(proxy_fault(
        &server,
        "ingress",
        "18121",
        json!({"type": "tcp-slow-close", "delay": "400ms"}),
    ));
    let close_time = |port: u16| {
        let mut s = connect(
            &client,
            SocketAddr::new(v4(&server), port),
            Duration::from_secs(2),
        )
        .expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("SO_RCVTIMEO");
        s.write_all(b"\xffping").expect("write");
        let mut back = [0u8; 5];
        s.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"\xffping");
        let t = Instant::now();
        s.shutdown(std::net::Shutdown::Write).expect("FIN");
        let mut rest = Vec::new();
        let r = s.read_to_end(&mut rest);
        (r.map(|_| rest.len()), t.elapsed())
    };
    let (plain_r, plain) = close_time(18122);
    let (slow_r, slow) = close_time(18121);
    eprintln!("tcp-slow-close 400ms: EOF after {slow:?} ({slow_r:?}); without: {plain:?}");
    assert_eq!(plain_r.ok(), Some(0));
    assert!(plain < 200 * MS, "without the fault: {plain:?}");
    assert_eq!(slow_r.ok(), Some(0), "a clean EOF, not a reset");
    assert!(
        slow >= 750 * MS && slow < 1500 * MS,
        "EOF after {slow:?}, expected both FINs held 400 ms"
    );
}
