//! Test fixtures: a proxy on loopback in front of real servers (HTTP/1,
//! HTTP/2, echo, server-speaks-first), rules from fault JSON, and clients
//! that see what a real client sees (raw bytes, hyper HTTP/1 and HTTP/2).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netfault_api::spec::{FaultSpec, Limits};
use netfault_api::Action;
use netfault_tproxy::{DirectConnector, Proxy, ProxyRule, RuleCounters, Side};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|n| match n {}).boxed_unsync()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|n| match n {}).boxed_unsync()
}

/// The byte at offset `i` of every generated body: a shifted, dropped or
/// repeated chunk shows.
pub fn pattern(i: u64) -> u8 {
    ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) ^ (i as u8)
}

/// A body of `n` pattern bytes, made as it is read, 64 KiB at a time, with
/// no length announced (chunked on HTTP/1) unless `sized`.
pub struct PatternBody {
    sent: u64,
    len: u64,
    sized: bool,
}

impl PatternBody {
    pub fn new(len: u64, sized: bool) -> PatternBody {
        PatternBody {
            sent: 0,
            len,
            sized,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.sent >= this.len {
            return Poll::Ready(None);
        }
        let n = (this.len - this.sent).min(64 << 10);
        let chunk: Vec<u8> = (this.sent..this.sent + n).map(pattern).collect();
        this.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn size_hint(&self) -> SizeHint {
        if self.sized {
            SizeHint::with_exact(self.len - self.sent)
        } else {
            SizeHint::default()
        }
    }
}

/// Reads a body to its end checking it against the pattern; its length.
pub async fn check_pattern<B>(mut body: B) -> Result<u64, String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut at = 0u64;
    while let Some(f) = body.frame().await {
        let f = f.map_err(|e| format!("body error at byte {at}: {e}"))?;
        if let Some(d) = f.data_ref() {
            for (k, b) in d.iter().enumerate() {
                let i = at + k as u64;
                if *b != pattern(i) {
                    return Err(format!("byte {i} differs"));
                }
            }
            at += d.len() as u64;
        }
    }
    Ok(at)
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// The test HTTP application, the same on HTTP/1 and HTTP/2:
/// - `/json`: a fixed JSON document;
/// - `/big/N`: N pattern bytes, streamed;
/// - `/upload`: reads the body, checks the pattern, answers its length;
/// - `/status/N`: status N;
/// - `/slow/MS`: answers after MS milliseconds;
/// - `/grpc/...`: a gRPC-style answer with `grpc-status: 0` in trailers;
/// - `/close`: answers with `Connection: close`;
/// - anything else: a JSON echo of the request (method, uri, headers...).
pub async fn app(
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<TestBody>, BoxError> {
    let path = req.uri().path().to_string();
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("echo"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        return Ok(r);
    }
    let json_resp = |v: Value| {
        let mut r = Response::new(full(v.to_string()));
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    };
    if path == "/json" {
        return Ok(json_resp(
            json!({"name": "web", "replicas": 3, "spec": {"image": "nginx", "port": 80}}),
        ));
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let n: u64 = n.parse()?;
        return Ok(Response::new(PatternBody::new(n, true).boxed_unsync()));
    }
    if path.ends_with("/upload") {
        let len = check_pattern(req.into_body()).await?;
        return Ok(json_resp(json!({"len": len})));
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("status {code}")));
        *r.status_mut() = StatusCode::from_u16(code.parse()?)?;
        return Ok(r);
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse()?)).await;
        return Ok(Response::new(full("slow")));
    }
    if path.starts_with("/grpc/") {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = vec![
            Frame::data(Bytes::from_static(b"\x00\x00\x00\x00\x02hi")),
            Frame::trailers(trailers),
        ];
        let mut r = Response::new(Frames(frames.into()).boxed_unsync());
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(r);
    }
    if path == "/close" {
        let mut r = Response::new(full("bye"));
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
        return Ok(r);
    }
    let (parts, body) = req.into_parts();
    let body_bytes = body.collect().await?.to_bytes();
    let req = Request::from_parts(parts, ());
    let mut v = echo_json_parts(&req, body_bytes.len(), peer);
    v["body"] = json!(String::from_utf8_lossy(&body_bytes));
    Ok(json_resp(v))
}

fn echo_json_parts(req: &Request<()>, body_len: usize, peer: SocketAddr) -> Value {
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        headers.insert(k.to_string(), json!(String::from_utf8_lossy(v.as_bytes())));
    }
    json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
        "body_len": body_len,
        "peer": peer.to_string(),
        "version": format!("{:?}", req.version()),
    })
}

/// A body of fixed frames (data and trailers).
pub struct Frames(pub std::collections::VecDeque<Frame<Bytes>>);

impl Body for Frames {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().0.pop_front().map(Ok))
    }
}

pub async fn listen() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback")
}

/// Accepts on `l` until it fails, each connection served by `serve` on a
/// task of its own; the listener's address.
pub fn serve_each<F, Fut>(l: TcpListener, serve: F) -> SocketAddr
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, peer)) = l.accept().await {
            tokio::spawn(serve(s, peer));
        }
    });
    addr
}

/// An HTTP/1.1 server running [`app`].
pub async fn http1_server() -> SocketAddr {
    serve_each(listen().await, |s, peer| async move {
        let svc = hyper::service::service_fn(move |req| app(req, peer));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .with_upgrades()
            .await;
    })
}

/// An HTTP/2 (prior knowledge) server running [`app`].
pub async fn http2_server() -> SocketAddr {
    serve_each(listen().await, |s, peer| async move {
        let svc = hyper::service::service_fn(move |req| app(req, peer));
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
}

/// Echoes every byte back; closes its side when the client does.
pub async fn echo_server() -> SocketAddr {
    serve_each(listen().await, |mut s, _| async move { echo(&mut s).await })
}

/// Echoes until the client closes, then closes.
async fn echo(s: &mut TcpStream) {
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Speaks first with `banner`, then echoes.
pub async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    serve_each(listen().await, move |mut s, _| async move {
        if s.write_all(banner).await.is_ok() {
            echo(&mut s).await;
        }
    })
}

/// Sends `n` pattern bytes to every client, then closes.
pub async fn source_server(n: u64) -> SocketAddr {
    serve_each(listen().await, move |mut s, _| async move {
        let data: Vec<u8> = (0..n).map(pattern).collect();
        let _ = s.write_all(&data).await;
        let _ = s.shutdown().await;
        let mut sink = [0u8; 1024];
        while let Ok(k) = s.read(&mut sink).await {
            if k == 0 {
                break;
            }
        }
    })
}

/// Captures each request head it gets (raw bytes), answers `ok` with a
/// Content-Length, then closes the connection (no `Connection: close`).
pub async fn capture_server() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_each(listen().await, move |mut s, _| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let _ = tx.send(got);
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        }
    });
    (addr, rx)
}

// ---------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------

/// A proxy listening on loopback whose every connection is "diverted" from
/// a client to `target`.
pub struct Harness {
    pub proxy: Proxy,
    pub addr: SocketAddr,
    pub target: SocketAddr,
}

impl Harness {
    pub async fn new(target: SocketAddr) -> Harness {
        Harness::with_side(target, Side::Inbound).await
    }

    pub async fn with_side(target: SocketAddr, side: Side) -> Harness {
        Harness::on(listen().await, target, side)
    }

    /// A proxy accepting on `l`.
    pub fn on(l: TcpListener, target: SocketAddr, side: Side) -> Harness {
        let proxy = Proxy::new(Arc::new(DirectConnector));
        let p = proxy.clone();
        let addr = serve_each(l, move |s, peer| {
            let p = p.clone();
            async move { p.serve(s, peer, target, side).await }
        });
        Harness {
            proxy,
            addr,
            target,
        }
    }

    /// A rule from the fault JSON's `action` (and optional `match`,
    /// `direction`), on the target's port; its counters.
    pub fn rule(&self, action: Value) -> (ProxyRule, Arc<RuleCounters>) {
        self.rule_with(json!({"action": action}))
    }

    pub fn rule_with(&self, mut fault: Value) -> (ProxyRule, Arc<RuleCounters>) {
        fault["target"] = json!({"sandbox": "test"});
        fault["duration"] = json!("1h");
        if fault.get("match").is_none() {
            fault["match"] = json!({});
        }
        if fault["match"].get("ports").is_none() {
            fault["match"]["ports"] = json!(self.target.port().to_string());
        }
        let spec = FaultSpec::parse(&fault, &Limits::default()).expect("valid fault");
        let counters = Arc::new(RuleCounters::default());
        (
            ProxyRule {
                id: format!("rule-{}", spec.action.type_name()),
                direction: spec.direction,
                selector: spec.r#match,
                action: match spec.action {
                    Action::Proxy(a) => a,
                    other => panic!("not a proxy action: {other:?}"),
                },
                deadline: Instant::now() + Duration::from_secs(3600),
                counters: counters.clone(),
            },
            counters,
        )
    }

    /// Sets these actions as the only rules; their counters.
    pub fn set(&self, actions: Vec<Value>) -> Vec<Arc<RuleCounters>> {
        let (rules, counters): (Vec<_>, Vec<_>) = actions.into_iter().map(|a| self.rule(a)).unzip();
        self.proxy.set_rules(rules);
        counters
    }

    pub async fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr)
            .await
            .expect("connect to the proxy");
        s.set_nodelay(true).expect("nodelay");
        s
    }

    pub async fn h1(&self) -> hyper::client::conn::http1::SendRequest<TestBody> {
        h1_client(self.connect().await).await
    }

    pub async fn h2(&self) -> hyper::client::conn::http2::SendRequest<TestBody> {
        h2_client(self.connect().await).await
    }
}

pub async fn h1_client(s: TcpStream) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("http1 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

pub async fn h2_client(s: TcpStream) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .expect("http2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

pub fn get(uri: &str) -> Request<TestBody> {
    Request::builder()
        .uri(uri)
        .header("host", "web.test")
        .body(empty())
        .expect("request")
}

/// Sends a request on HTTP/1; the status and the whole body.
pub async fn send1(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    req: Request<TestBody>,
) -> Result<(StatusCode, HeaderMap, Bytes), hyper::Error> {
    s.ready().await?;
    let resp = s.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

pub fn json_of(b: &[u8]) -> Value {
    serde_json::from_slice(b)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(b)))
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client, to see the exact bytes and framing.
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub fn new(stream: TcpStream) -> RawConn {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write request");
    }

    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16 << 10];
        let n = self.stream.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    async fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    async fn exact(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one response, framed by Content-Length or chunked encoding
    /// (or, lacking both, by the connection's end). `head` for a response
    /// to HEAD.
    pub async fn response(&mut self, head: bool) -> std::io::Result<RawResponse> {
        let status_line = self.line().await?;
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line().await?;
            if l.is_empty() {
                break;
            }
            let (k, v) = l
                .split_once(':')
                .ok_or_else(|| std::io::Error::other(format!("bad header {l:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut r = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 || status < 200 {
            return Ok(r);
        }
        if let Some(cl) = r.header("content-length") {
            let n: usize = cl.parse().map_err(std::io::Error::other)?;
            r.body = self.exact(n).await?;
        } else if r
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let size = self.line().await?;
                let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(std::io::Error::other)?;
                if n == 0 {
                    while !self.line().await?.is_empty() {}
                    break;
                }
                r.body.extend(self.exact(n).await?);
                self.line().await?;
            }
        } else {
            while self.fill().await? > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        Ok(r)
    }
}

/// Reads until EOF or error; the bytes and the error, if any.
pub async fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (out, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, Some(e)),
        }
    }
}

/// Runs `f` with a timeout so a broken proxy fails the test instead of
/// hanging it.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}
