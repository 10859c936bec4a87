//! HTTP proxying: hyper's server on the client connection, hyper's client
//! on one upstream connection of the same version, and the HTTP faults in
//! between.
//!
//! Requests are forwarded as they came: same method, URI form, headers
//! and body framing; no `Via`, no `Date`. Header names go out in lower case
//! on HTTP/1, as haproxy sends them (names are case-insensitive; keeping
//! each message's case cost an eighth of the throughput). Bodies stream through unless a fault needs the whole body.
//! When the server closes its connection the client's is closed too (after
//! any response in flight), so the client sees the same connection life it
//! would see without the proxy.

mod body;
mod fast;
mod faults;
mod framing;

pub(crate) use fast::{fuzz as fuzz_fast_path, serve as serve_h1_fast};

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo};
use netfault_api::action::Phase;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::io::ConnControl;
use crate::rules::{CompiledRule, HttpOp, HttpRule, RuleKind};
use crate::{Shared, Side};
use body::ProxyBody;

/// Most of an aborted request's body read (and dropped) so the HTTP/1
/// connection can stay open; past it the connection is closed instead.
const ABORT_DRAIN_LIMIT: usize = 1 << 20;
const ABORT_DRAIN_TIME: Duration = Duration::from_secs(2);

/// Per client connection.
pub(crate) struct HttpCtx {
    pub shared: Arc<Shared>,
    pub side: Side,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub ctrl: Arc<ConnControl>,
    http1: bool,
    /// An accepted upgrade (client side, server side), relayed as bytes
    /// once hyper hands both connections over.
    upgrade: Mutex<Option<(OnUpgrade, OnUpgrade)>>,
}

impl HttpCtx {
    pub(crate) fn new(
        shared: Arc<Shared>,
        side: Side,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        ctrl: Arc<ConnControl>,
    ) -> HttpCtx {
        HttpCtx {
            shared,
            side,
            peer,
            orig_dst,
            ctrl,
            http1: true,
            upgrade: Mutex::new(None),
        }
    }

    /// The live HTTP rules for this connection, in order.
    fn http_rules(&self) -> Vec<Arc<CompiledRule>> {
        let rules = self.shared.rules();
        if rules.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        rules
            .iter()
            .filter(|r| {
                matches!(r.kind, RuleKind::Http(_))
                    && r.applies_to(self.side, self.peer, self.orig_dst, now)
            })
            .cloned()
            .collect()
    }

    fn take_upgrade(&self) -> Option<(OnUpgrade, OnUpgrade)> {
        match self.upgrade.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }

    fn upgrade_pending(&self) -> bool {
        match self.upgrade.lock() {
            Ok(g) => g.is_some(),
            Err(p) => p.into_inner().is_some(),
        }
    }

    fn set_upgrade(&self, u: (OnUpgrade, OnUpgrade)) {
        match self.upgrade.lock() {
            Ok(mut g) => *g = Some(u),
            Err(p) => *p.into_inner() = Some(u),
        }
    }
}

/// The upstream connection as hyper's client reads it; notes when the
/// server closed it, to tell a closed connection from one handed over to
/// an upgrade.
///
/// A server that answers at once (an early `503`, an error at its
/// connection limit) and closes without reading the request must still be
/// heard, as a client hears it directly:
/// - its bytes are held back from hyper until the first request is being
///   written: hyper's client takes bytes that come while it has no
///   request in flight for a protocol error and closes, losing the answer;
/// - a write the server's kernel refuses (it has closed or reset) is
///   swallowed, the rest of the request discarded, as the server's kernel
///   would: hyper then reads the answer the kernel still holds instead of
///   failing the request;
/// - a reset (seen on a write or a read) is noted so that the client's
///   connection ends with one too, after the answer.
struct UpstreamIo {
    inner: TcpStream,
    ended: Arc<AtomicBool>,
    /// The server reset the connection.
    reset: Arc<AtomicBool>,
    /// Hyper has started writing a request.
    wrote: bool,
    /// The read hyper is waiting on while the server's bytes are held back.
    held: Option<std::task::Waker>,
    /// The server refused a write: everything else written is discarded.
    refused: bool,
}

impl UpstreamIo {
    fn new(inner: TcpStream, ended: Arc<AtomicBool>, reset: Arc<AtomicBool>) -> UpstreamIo {
        UpstreamIo {
            inner,
            ended,
            reset,
            wrote: false,
            held: None,
            refused: false,
        }
    }

    fn start_writing(&mut self) {
        if !self.wrote {
            self.wrote = true;
            if let Some(w) = self.held.take() {
                w.wake();
            }
        }
    }

    /// A write's result, with a refusal by the server turned into success.
    fn written(
        &mut self,
        r: Poll<std::io::Result<usize>>,
        len: usize,
    ) -> Poll<std::io::Result<usize>> {
        match r {
            Poll::Ready(Err(e)) if server_gone(&e) => {
                tracing::debug!(error = %e, "the server refused the request; reading its answer");
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    self.reset.store(true, Ordering::Relaxed);
                }
                self.refused = true;
                Poll::Ready(Ok(len))
            }
            r => r,
        }
    }
}

/// Errors of a write to a server that has closed or reset the connection.
fn server_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.wrote {
            this.held = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() == before && buf.remaining() > 0 => {
                this.ended.store(true, Ordering::Relaxed)
            }
            Poll::Ready(Err(e)) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    this.reset.store(true, Ordering::Relaxed);
                }
                this.ended.store(true, Ordering::Relaxed)
            }
            _ => {}
        }
        r
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.start_writing();
        if this.refused {
            return Poll::Ready(Ok(buf.len()));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(r, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.start_writing();
        let len = bufs.iter().map(|b| b.len()).sum();
        if this.refused {
            return Poll::Ready(Ok(len));
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(r, len)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.refused {
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Ready(Err(e)) if server_gone(&e) => Poll::Ready(Ok(())),
            r => r,
        }
    }
}

#[derive(Clone)]
enum Upstream {
    H1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<ProxyBody>>>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>),
}

impl Upstream {
    async fn send(&self, req: Request<ProxyBody>) -> Result<Response<Incoming>, ProxyError> {
        match self {
            Upstream::H1(s) => {
                let mut s = s.lock().await;
                s.ready().await.map_err(ProxyError::Forward)?;
                s.send_request(req).await.map_err(ProxyError::Forward)
            }
            Upstream::H2(s) => {
                let mut s = s.clone();
                s.ready().await.map_err(ProxyError::Forward)?;
                s.send_request(req).await.map_err(ProxyError::Forward)
            }
        }
    }
}

/// Serves an HTTP/1 client connection.
pub(crate) async fn serve_h1<IO>(
    io: IO,
    upstream: TcpStream,
    ctx: HttpCtx,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ended = Arc::new(AtomicBool::new(false));
    let reset = Arc::new(AtomicBool::new(false));
    // A second handle on the server socket, to read a reset that came after
    // hyper's last read (it stops reading after a `Connection: close`
    // response).
    let mut probe = socket2::SockRef::from(&upstream).try_clone().ok();
    let up_io = UpstreamIo::new(upstream, ended.clone(), reset.clone());
    let (sender, up_conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, ProxyBody>(TokioIo::new(up_io))
        .await
        .map_err(ProxyError::UpstreamHandshake)?;
    let ctx = Arc::new(HttpCtx { http1: true, ..ctx });
    let up = Upstream::H1(Arc::new(tokio::sync::Mutex::new(sender)));
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req| handle(svc_ctx.clone(), up.clone(), req));
    let server = hyper::server::conn::http1::Builder::new()
        .half_close(true)
        .auto_date_header(false)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    let up_conn = up_conn.with_upgrades();
    tokio::pin!(server, up_conn);
    let mut up_done = false;
    let served = loop {
        tokio::select! {
            r = &mut server => break r,
            r = &mut up_conn, if !up_done => {
                up_done = true;
                if let Err(e) = &r {
                    tracing::debug!(error = %e, "server connection failed");
                }
                if let Some(p) = probe.take().filter(|_| !ctx.upgrade_pending()) {
                    if let Ok(Some(e)) = p.take_error() {
                        if e.kind() == std::io::ErrorKind::ConnectionReset {
                            reset.store(true, Ordering::Relaxed);
                        }
                    }
                }
                if reset.load(Ordering::Relaxed) {
                    // The client's connection ends with a reset too, once
                    // it has what was relayed (`ClientIo`'s drop).
                    ctx.ctrl.abort_on_close();
                }
                if r.is_err() || ended.load(Ordering::Relaxed) {
                    // The server closed: let the client's connection end too,
                    // after the response in flight, if any.
                    server.as_mut().graceful_shutdown();
                }
            }
        }
    };
    if let Some((client, server)) = ctx.take_upgrade() {
        return relay_upgraded(client, server).await;
    }
    served.map_err(ProxyError::Serve)
}

/// Serves an HTTP/2 (prior knowledge) client connection.
pub(crate) async fn serve_h2<IO>(
    io: IO,
    upstream: TcpStream,
    ctx: HttpCtx,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, up_conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, ProxyBody>(TokioIo::new(upstream))
        .await
        .map_err(ProxyError::UpstreamHandshake)?;
    let ctx = Arc::new(HttpCtx {
        http1: false,
        ..ctx
    });
    let up = Upstream::H2(sender);
    let svc = hyper::service::service_fn(move |req| handle(ctx.clone(), up.clone(), req));
    let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .auto_date_header(false)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(server, up_conn);
    let mut up_done = false;
    loop {
        tokio::select! {
            r = &mut server => return r.map_err(ProxyError::Serve),
            r = &mut up_conn, if !up_done => {
                up_done = true;
                if let Err(e) = &r {
                    tracing::debug!(error = %e, "server connection failed");
                }
                // GOAWAY to the client; streams in flight finish.
                server.as_mut().graceful_shutdown();
            }
        }
    }
}

async fn relay_upgraded(client: OnUpgrade, server: OnUpgrade) -> Result<(), ProxyError> {
    let (c, s) = tokio::try_join!(client, server).map_err(|e| ProxyError::Upgrade(e.into()))?;
    let mut c = TokioIo::new(c);
    let mut s = TokioIo::new(s);
    tokio::io::copy_bidirectional(&mut c, &mut s)
        .await
        .map(|_| ())
        .map_err(ProxyError::Relay)
}

/// One request: the request-phase faults in rule order, the exchange with
/// the server, then the response-phase faults in rule order.
async fn handle(
    ctx: Arc<HttpCtx>,
    up: Upstream,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let rules = ctx.http_rules();
    let mut req = req.map(body::incoming);
    if ctx.http1 {
        faults::decline_h2c(req.headers_mut());
    }
    if rules.is_empty() {
        return forward(&ctx, &up, req).await;
    }
    let grpc = faults::is_grpc(req.headers());
    let mut later = Vec::new();
    for (r, h) in rules.iter().filter_map(|r| Some((r.as_ref(), r.http()?))) {
        if !h
            .selector
            .matches_request(req.method(), req.uri().path(), req.headers())
        {
            continue;
        }
        if h.phase == Phase::Response {
            later.push((r, h));
            continue;
        }
        if !fires(r, h, "request fault") {
            continue;
        }
        req = match request_fault(&ctx, req, r, &h.op, grpc).await? {
            Next::Forward(req) => req,
            Next::Answer(resp) => return Ok(resp),
        };
    }
    let head = req.method() == Method::HEAD;
    let resp = forward(&ctx, &up, req).await?;
    response_faults(resp, &later, head).await
}

/// Whether the HTTP rule `r` (`h`) acts on an exchange it matched: counts
/// the match, draws its percentage, and logs `what` when it fires.
fn fires(r: &CompiledRule, h: &HttpRule, what: &str) -> bool {
    if !r.rule.counters.fires(h.percent) {
        return false;
    }
    tracing::debug!(rule = %r.rule.id, "{what}");
    true
}

/// What follows a request-phase fault.
enum Next {
    /// Go on with this request.
    Forward(Request<ProxyBody>),
    /// Answer the client with this instead of forwarding.
    Answer(Response<ProxyBody>),
}

/// Applies the request-phase fault `op` of rule `r`.
async fn request_fault(
    ctx: &HttpCtx,
    mut req: Request<ProxyBody>,
    r: &CompiledRule,
    op: &HttpOp,
    grpc: bool,
) -> Result<Next, ProxyError> {
    match op {
        HttpOp::Delay(d) => crate::io::sleep_precisely(*d).await,
        HttpOp::Abort { status, body: b } => {
            r.rule.counters.add_dropped();
            if ctx.http1 {
                // Read the rest of the request so the connection can
                // carry the next one; hyper closes it otherwise.
                let _ = tokio::time::timeout(
                    ABORT_DRAIN_TIME,
                    body::drain(req.into_body(), ABORT_DRAIN_LIMIT),
                )
                .await;
            }
            return Ok(Next::Answer(faults::abort_response(
                *status,
                b.as_ref(),
                grpc,
            )));
        }
        HttpOp::Reset => {
            r.rule.counters.add_dropped();
            if ctx.http1 {
                ctx.ctrl.fire_reset();
            }
            return Err(ProxyError::AbortReset);
        }
        HttpOp::Replace {
            headers,
            body: b,
            path,
            method,
            ..
        } => faults::replace_request(
            &mut req,
            headers,
            b.as_ref(),
            path.as_deref(),
            method.as_ref(),
        ),
        HttpOp::Patch {
            headers,
            query,
            body_merge,
        } => {
            req = faults::patch_request(req, headers, query, body_merge.as_ref())
                .await
                .map_err(ProxyError::Body)?;
        }
    }
    Ok(Next::Forward(req))
}

/// Applies the response-phase faults (`later`, in rule order) that match
/// the server's response.
async fn response_faults(
    mut resp: Response<ProxyBody>,
    later: &[(&CompiledRule, &HttpRule)],
    head: bool,
) -> Result<Response<ProxyBody>, ProxyError> {
    let status = resp.status();
    if status.is_informational() {
        return Ok(resp);
    }
    let has_body = !head && status != StatusCode::NO_CONTENT && status != StatusCode::NOT_MODIFIED;
    for &(r, h) in later {
        if !h.selector.matches_code(resp.status()) {
            continue;
        }
        if !fires(r, h, "response fault") {
            continue;
        }
        match &h.op {
            HttpOp::Delay(d) => crate::io::sleep_precisely(*d).await,
            HttpOp::Replace {
                status,
                headers,
                body: b,
                ..
            } => faults::replace_response(
                &mut resp,
                *status,
                headers,
                b.as_ref().filter(|_| has_body),
            ),
            HttpOp::Patch {
                headers,
                body_merge,
                ..
            } => {
                resp = faults::patch_response(resp, headers, body_merge.as_ref(), has_body)
                    .await
                    .map_err(ProxyError::Body)?;
            }
            // Validation keeps aborts in the request phase.
            HttpOp::Abort { .. } | HttpOp::Reset => {}
        }
    }
    Ok(resp)
}

/// Sends the request on the upstream connection; an accepted upgrade is
/// noted for the connection task to relay.
async fn forward(
    ctx: &HttpCtx,
    up: &Upstream,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let client_upgrade =
        (ctx.http1 && faults::wants_upgrade(&req)).then(|| hyper::upgrade::on(&mut req));
    let connect = req.method() == Method::CONNECT;
    let mut resp = up.send(req).await?;
    if let Some(cu) = client_upgrade {
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
            let su = hyper::upgrade::on(&mut resp);
            ctx.set_upgrade((cu, su));
        }
    }
    Ok(resp.map(body::incoming))
}
