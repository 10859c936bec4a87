//! The HTTP/1 fast path: requests that no HTTP rule selects are relayed as
//! the bytes they came as, each message framed by its own head, without
//! building hyper's request and response values or serialising them again.
//!
//! For each request the head is parsed (`httparse`) and the connection's
//! HTTP rules are asked whether their selectors match it. When none does,
//! the head and the body (by its `Content-Length` or chunks) go to the
//! server untouched, and the response comes back the same way. The first
//! request that a rule selects, or that the fast path does not serve
//! (an upgrade, `CONNECT`, a head it cannot parse, a server that spoke
//! before the request), hands the connection to hyper (`serve_h1`) at that
//! request boundary, with the bytes read so far put back in front: the
//! rules then act exactly as they do on the hyper path, from that request
//! on. A response the fast path cannot frame turns the rest of the
//! connection into a byte relay (`relay.rs`), after the bytes already read.
//!
//! What a client sees is what it would see without the proxy: bytes
//! unchanged (header names keep their case), one request at a time on the
//! server connection (pipelined requests wait their turn, in order), the
//! server's FIN or reset passed on when the server closes, after the
//! response in flight.

use std::borrow::Cow;
use std::io;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::framing::{content_length, ends_chunked, has_token, Body};
use super::HttpCtx;
use crate::error::ProxyError;
use crate::io::{make_room, Prefixed};

/// Headers a head may have on the fast path; more go to hyper (requests)
/// or the byte relay (responses).
const MAX_HEADERS: usize = 64;
/// The longest head the fast path waits for.
const MAX_HEAD: usize = 64 << 10;
/// The client's read buffer, kept while the connection is idle.
const CLIENT_BUF: usize = 4 << 10;
/// The server's read buffer, allocated per response.
const SERVER_BUF: usize = 32 << 10;

/// How the fast path left a connection.
enum End {
    /// The client closed between requests.
    ClientDone,
    /// The server closed: the client gets our FIN.
    Close,
    /// The server reset or refused: the client gets a reset.
    Reset,
    /// Hyper serves the rest, from the request in the buffer.
    Hyper,
    /// The rest is relayed as bytes.
    Raw,
}

/// A request head the fast path relays.
struct Head {
    len: usize,
    body: Body,
    /// A `HEAD` request: its response has no body.
    head_method: bool,
    /// The connection ends after this exchange (`Connection: close`, or
    /// HTTP/1.0 without keep-alive).
    close: bool,
}

/// What a request head asks of the fast path.
enum Parsed {
    /// More bytes needed.
    Partial,
    /// Relay it.
    Relay(Head),
    /// Hyper's (a rule selects it, or the fast path does not serve it).
    Hyper,
}

/// How a response ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answered {
    /// Whole; the connection can carry another exchange.
    KeepAlive,
    /// Whole, and the server closes after it.
    Close,
    /// The server closed (`reset`: reset) before the response was whole;
    /// what it sent has been relayed.
    Gone { reset: bool },
    /// Not relayable as framed HTTP: what was read has been written to the
    /// client, the rest goes as bytes.
    Raw,
}

/// Serves an HTTP/1 client connection, `prefix` being the bytes sniffing
/// read from it.
pub(crate) async fn serve<IO>(
    mut client: IO,
    prefix: Bytes,
    mut upstream: TcpStream,
    ctx: HttpCtx,
) -> Result<(), ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(CLIENT_BUF.max(prefix.len()));
    buf.extend_from_slice(&prefix);
    drop(prefix);
    match relay_requests(&mut client, &mut buf, &mut upstream, &ctx).await? {
        End::ClientDone => Ok(()),
        End::Close => {
            let _ = client.shutdown().await;
            Ok(())
        }
        End::Reset => {
            ctx.ctrl.abort_on_close();
            Ok(())
        }
        // Boxed, so that hyper's state (kilobytes) is only allocated for
        // the connections that need it, not carried by every connection's
        // task.
        End::Hyper => {
            Box::pin(super::serve_h1(
                Prefixed::new(buf.freeze(), client),
                upstream,
                ctx,
            ))
            .await
        }
        End::Raw => {
            let relay =
                crate::relay::relay(Prefixed::new(buf.freeze(), client), upstream, &ctx.ctrl);
            Box::pin(relay).await
        }
    }
}

async fn relay_requests<IO>(
    client: &mut IO,
    buf: &mut BytesMut,
    upstream: &mut TcpStream,
    ctx: &HttpCtx,
) -> Result<End, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut first = true;
    loop {
        let head = match next_head(client, buf, upstream, ctx).await? {
            Ok(head) => head,
            Err(end) => return Ok(end),
        };
        if std::mem::take(&mut first) && server_spoke(upstream) {
            // An answer that came before the request (an early 503, a
            // server at its limit): hyper's early-answer handling.
            return Ok(End::Hyper);
        }
        let Some((answered, refused)) = exchange(client, buf, upstream, &head).await? else {
            return Ok(End::Hyper);
        };
        if refused {
            // The server's kernel refused the request's bytes: after its
            // answer, the client sees that reset.
            return Ok(End::Reset);
        }
        match answered {
            Answered::KeepAlive if !head.close => {}
            Answered::KeepAlive | Answered::Close | Answered::Gone { reset: false } => {
                return Ok(End::Close)
            }
            Answered::Gone { reset: true } => return Ok(End::Reset),
            Answered::Raw => return Ok(End::Raw),
        }
    }
}

/// Waits for the next whole request head. Between requests the server is
/// watched too: its FIN or reset ends the client's connection as well.
async fn next_head<IO>(
    client: &mut IO,
    buf: &mut BytesMut,
    upstream: &TcpStream,
    ctx: &HttpCtx,
) -> Result<Result<Head, End>, ProxyError>
where
    IO: AsyncRead + Unpin,
{
    let mut probe = [0u8; 1];
    loop {
        if !buf.is_empty() {
            match parse_request(buf, |method, path, headers| {
                selected(ctx, method, path, headers)
            }) {
                Parsed::Relay(h) => return Ok(Ok(h)),
                Parsed::Partial if buf.len() < MAX_HEAD => {}
                Parsed::Partial | Parsed::Hyper => return Ok(Err(End::Hyper)),
            }
        }
        make_room(buf, CLIENT_BUF);
        tokio::select! {
            biased;
            r = client.read_buf(buf) => {
                let n = r.map_err(ProxyError::Relay)?;
                if n == 0 {
                    // A partial head at EOF is hyper's to answer.
                    return Ok(Err(if buf.is_empty() { End::ClientDone } else { End::Hyper }));
                }
            }
            r = upstream.peek(&mut probe) => {
                return Ok(Err(match r {
                    Ok(0) if buf.is_empty() => End::Close,
                    Err(e) if buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                        End::Reset
                    }
                    // Bytes nobody asked for, or a close while a request is
                    // on its way: hyper knows what the client should see.
                    _ => End::Hyper,
                }));
            }
        }
    }
}

/// Whether the server has sent anything (or closed) already.
fn server_spoke(upstream: &TcpStream) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit()];
    // The socket is non-blocking: nothing there is `WouldBlock`.
    !matches!(
        socket2::SockRef::from(upstream).peek(&mut b),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// Parses the request head at the start of `buf` and decides who serves
/// it; `selected` says whether a rule selects the request (method, path,
/// headers).
fn parse_request(
    buf: &[u8],
    selected: impl Fn(&str, &str, &[httparse::Header<'_>]) -> bool,
) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    if method == "CONNECT" {
        return Parsed::Hyper;
    }
    let Some(FramingHeaders {
        length,
        chunked,
        close,
        upgrade,
    }) = framing_headers(req.headers, version)
    else {
        // Unparsable or conflicting lengths: hyper answers 400.
        return Parsed::Hyper;
    };
    if upgrade {
        // Declined (h2c) or relayed after a 101: hyper's.
        return Parsed::Hyper;
    }
    let body = match (chunked, length) {
        (None, None) => Body::Done,
        (None, Some(n)) => Body::length(n),
        (Some(true), None) => Body::chunked(),
        // Both, or a final coding that is not chunked: hyper's answer.
        (Some(_), _) => return Parsed::Hyper,
    };
    let Some(path) = request_path(target) else {
        return Parsed::Hyper;
    };
    if selected(method, &path, req.headers) {
        return Parsed::Hyper;
    }
    Parsed::Relay(Head {
        len,
        body,
        head_method: method == "HEAD",
        close,
    })
}

/// What a message's headers say about its framing and its connection.
struct FramingHeaders {
    /// `Content-Length` (repeated only with the same value).
    length: Option<u64>,
    /// `Transfer-Encoding` is present: whether its (last header's) last
    /// coding is `chunked`.
    chunked: Option<bool>,
    /// The connection ends after this exchange (`Connection: close`, or
    /// HTTP/1.0, `version` 0, without keep-alive).
    close: bool,
    /// An `Upgrade` header.
    upgrade: bool,
}

/// Reads the framing headers; `None` for an unparsable or conflicting
/// `Content-Length`.
fn framing_headers(headers: &[httparse::Header<'_>], version: u8) -> Option<FramingHeaders> {
    let mut f = FramingHeaders {
        length: None,
        chunked: None,
        close: version == 0,
        upgrade: false,
    };
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(h.value)?;
            if f.length.is_some_and(|m| m != n) {
                return None;
            }
            f.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.chunked = Some(ends_chunked(h.value));
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(h.value, "close") {
                f.close = true;
            } else if version == 0 && has_token(h.value, "keep-alive") {
                f.close = false;
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            f.upgrade = true;
        }
    }
    Some(f)
}

/// The path a rule's glob sees: what hyper's `uri().path()` returns.
fn request_path(target: &str) -> Option<Cow<'_, str>> {
    if target.starts_with('/') {
        return Some(Cow::Borrowed(target.split('?').next().unwrap_or(target)));
    }
    let uri: http::Uri = target.parse().ok()?;
    Some(Cow::Owned(uri.path().to_owned()))
}

/// Whether an HTTP rule on this connection selects the request.
fn selected(ctx: &HttpCtx, method: &str, path: &str, headers: &[httparse::Header<'_>]) -> bool {
    let rules = ctx.shared.rules();
    if rules.is_empty() {
        return false;
    }
    let now = Instant::now();
    rules.iter().any(|r| {
        r.http().is_some_and(|h| {
            r.applies_to(ctx.side, ctx.peer, ctx.orig_dst, now)
                && h.selector.matches_head(method, path, |name, value| {
                    headers.iter().any(|x| {
                        x.name.eq_ignore_ascii_case(name.as_str()) && x.value == value.as_bytes()
                    })
                })
        })
    })
}

/// One exchange: the request at the front of `buf` to the server, its
/// response back. `None` when the buffered body breaks its framing before
/// anything was sent (hyper answers it). Returns how the response ended
/// and whether the server refused the request's bytes.
async fn exchange<IO>(
    client: &mut IO,
    buf: &mut BytesMut,
    upstream: &mut TcpStream,
    head: &Head,
) -> Result<Option<(Answered, bool)>, ProxyError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut body = head.body;
    let Ok(buffered) = body.advance(&buf[head.len..]) else {
        return Ok(None);
    };
    let mut refused = None;
    send(upstream, &buf[..head.len + buffered], &mut refused).await?;
    buf.advance(head.len + buffered);
    if body == Body::Done {
        let answered = relay_response(upstream, client, head.head_method).await?;
        return Ok(Some((answered, refused.is_some())));
    }
    // The body is still coming: forward it while the response comes back
    // (a server may answer early; `Expect: 100-continue` waits for it).
    let answered = {
        let (mut cr, mut cw) = tokio::io::split(&mut *client);
        let (mut ur, mut uw) = upstream.split();
        let forward = forward_body(&mut cr, &mut uw, buf, &mut body, &mut refused);
        let response = relay_response(&mut ur, &mut cw, head.head_method);
        tokio::pin!(forward, response);
        let mut forwarded = false;
        let answered = loop {
            tokio::select! {
                r = &mut forward, if !forwarded => {
                    r?;
                    forwarded = true;
                }
                r = &mut response => break r?,
            }
        };
        if !forwarded && answered == Answered::KeepAlive {
            // The server answered before the whole body: the rest still
            // belongs to this request.
            forward.await?;
        }
        answered
    };
    Ok(Some((answered, refused.is_some())))
}

/// Writes `data` to the server. A server that has closed or reset refuses
/// it: `refused` notes that (true: reset), and the data (and the rest of
/// the request) is discarded, as its kernel would, while its answer is
/// still read.
async fn send<W>(uw: &mut W, data: &[u8], refused: &mut Option<bool>) -> Result<(), ProxyError>
where
    W: AsyncWrite + Unpin,
{
    if refused.is_some() || data.is_empty() {
        return Ok(());
    }
    match uw.write_all(data).await {
        Ok(()) => Ok(()),
        Err(e) if super::server_gone(&e) => {
            tracing::debug!(error = %e, "the server refused the request; reading its answer");
            *refused = Some(e.kind() == io::ErrorKind::ConnectionReset);
            Ok(())
        }
        Err(e) => Err(ProxyError::Relay(e)),
    }
}

/// Forwards the rest of a request body from the client. Cancel-safe:
/// dropped at an await, `buf` holds exactly the bytes not yet forwarded.
async fn forward_body<R, W>(
    cr: &mut R,
    uw: &mut W,
    buf: &mut BytesMut,
    body: &mut Body,
    refused: &mut Option<bool>,
) -> Result<(), ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if !buf.is_empty() {
            let mut ahead = *body;
            let take = ahead.advance(buf).map_err(malformed)?;
            let n = if refused.is_some() {
                take
            } else {
                match uw.write(&buf[..take]).await {
                    Ok(n) => n,
                    Err(e) if super::server_gone(&e) => {
                        *refused = Some(e.kind() == io::ErrorKind::ConnectionReset);
                        take
                    }
                    Err(e) => return Err(ProxyError::Relay(e)),
                }
            };
            if n == take {
                *body = ahead;
            } else {
                body.advance(&buf[..n]).map_err(malformed)?;
            }
            buf.advance(n);
            if *body == Body::Done {
                return Ok(());
            }
            if !buf.is_empty() {
                continue;
            }
        }
        make_room(buf, CLIENT_BUF);
        if cr.read_buf(buf).await.map_err(ProxyError::Relay)? == 0 {
            return Err(ProxyError::Relay(io::ErrorKind::UnexpectedEof.into()));
        }
    }
}

fn malformed(e: super::framing::Malformed) -> ProxyError {
    ProxyError::Relay(io::Error::new(io::ErrorKind::InvalidData, e))
}

/// What a response head says.
enum Response {
    Partial,
    /// A 1xx other than 101, `len` bytes: relayed, then the next head.
    Interim(usize),
    Final {
        len: usize,
        body: Body,
        close: bool,
    },
    /// Not framed HTTP the fast path follows.
    Raw,
}

fn parse_response(buf: &[u8], head_method: bool) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Response::Partial,
        Err(_) => return Response::Raw,
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Response::Raw;
    };
    match code {
        101 => return Response::Raw,
        100..=199 => return Response::Interim(len),
        _ => {}
    }
    let Some(FramingHeaders {
        length,
        chunked,
        close,
        ..
    }) = framing_headers(resp.headers, version)
    else {
        return Response::Raw;
    };
    let body = if head_method || code == 204 || code == 304 {
        Body::Done
    } else {
        match (chunked, length) {
            (Some(true), _) => Body::chunked(),
            (Some(false), _) | (None, None) => Body::UntilClose,
            (None, Some(n)) => Body::length(n),
        }
    };
    Response::Final {
        len,
        body,
        close: close || body == Body::UntilClose,
    }
}

/// Relays one response (after any 1xx) from the server to the client.
async fn relay_response<R, W>(
    ur: &mut R,
    cw: &mut W,
    head_method: bool,
) -> Result<Answered, ProxyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut rbuf = BytesMut::with_capacity(SERVER_BUF);
    let (len, mut body, close) = loop {
        if !rbuf.is_empty() {
            match parse_response(&rbuf, head_method) {
                Response::Final { len, body, close } => break (len, body, close),
                Response::Interim(n) => {
                    to_client(cw, &rbuf[..n]).await?;
                    rbuf.advance(n);
                    continue;
                }
                Response::Partial if rbuf.len() < MAX_HEAD => {}
                Response::Partial | Response::Raw => {
                    to_client(cw, &rbuf).await?;
                    return Ok(Answered::Raw);
                }
            }
        }
        if let Some(gone) = read_server(ur, &mut rbuf).await? {
            // What came of a response, then the server's end.
            to_client(cw, &rbuf).await?;
            return Ok(gone);
        }
    };
    let mut n = len;
    loop {
        match body.advance(&rbuf[n..]) {
            Ok(take) => n += take,
            Err(_) => {
                // Chunks we cannot follow: the rest as bytes.
                to_client(cw, &rbuf).await?;
                return Ok(Answered::Raw);
            }
        }
        to_client(cw, &rbuf[..n]).await?;
        rbuf.advance(n);
        n = 0;
        if body == Body::Done {
            break;
        }
        if let Some(gone) = read_server(ur, &mut rbuf).await? {
            return Ok(match gone {
                Answered::Gone { reset: false } if body == Body::UntilClose => Answered::Close,
                gone => gone,
            });
        }
    }
    if !rbuf.is_empty() {
        // Bytes past the response that nobody asked for: relayed as they are.
        to_client(cw, &rbuf).await?;
        return Ok(Answered::Raw);
    }
    Ok(if close {
        Answered::Close
    } else {
        Answered::KeepAlive
    })
}

/// Reads more of the server's bytes into `rbuf`; `Some` when the server
/// closed or reset instead.
async fn read_server<R>(ur: &mut R, rbuf: &mut BytesMut) -> Result<Option<Answered>, ProxyError>
where
    R: AsyncRead + Unpin,
{
    make_room(rbuf, SERVER_BUF);
    match ur.read_buf(rbuf).await {
        Ok(0) => Ok(Some(Answered::Gone { reset: false })),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
            Ok(Some(Answered::Gone { reset: true }))
        }
        Err(e) => Err(ProxyError::Relay(e)),
    }
}

async fn to_client<W>(cw: &mut W, data: &[u8]) -> Result<(), ProxyError>
where
    W: AsyncWrite + Unpin,
{
    if data.is_empty() {
        return Ok(());
    }
    cw.write_all(data).await.map_err(ProxyError::Relay)
}

/// The fast path's parsing of hostile bytes, for the fuzz target
/// (`netfault_tproxy::fuzzing::http1_framing`): `data` as a request head
/// (and its body), and as a response head. Panics when an invariant
/// breaks; returns whether the request would be relayed.
pub(crate) fn fuzz(data: &[u8]) -> bool {
    let relayed = match parse_request(data, |_, _, _| false) {
        Parsed::Relay(h) => {
            assert!(h.len <= data.len(), "a head longer than its bytes");
            check_body(h.body, &data[h.len..]);
            true
        }
        Parsed::Partial | Parsed::Hyper => false,
    };
    for head_method in [false, true] {
        match parse_response(data, head_method) {
            Response::Final { len, body, close } => {
                assert!(len <= data.len(), "a head longer than its bytes");
                assert!(close || body != Body::UntilClose);
                if head_method {
                    assert_eq!(body, Body::Done, "a response to HEAD has no body");
                }
                check_body(body, &data[len..]);
            }
            Response::Interim(len) => assert!(len <= data.len()),
            Response::Partial | Response::Raw => {}
        }
    }
    // The bytes as a chunked body on their own, too.
    check_body(Body::chunked(), data);
    relayed
}

/// A body takes the same bytes, and ends in the same state, whether its
/// bytes come at once or in pieces of any size, and never more than given.
fn check_body(body: Body, data: &[u8]) {
    let mut whole = body;
    let taken = whole.advance(data);
    for step in [1, 2, 7, 64] {
        let mut pieces = body;
        let mut n = 0;
        let mut result = Ok(0);
        for piece in data.chunks(step) {
            match pieces.advance(piece) {
                Ok(k) => {
                    assert!(k <= piece.len(), "took more than given");
                    n += k;
                    if k < piece.len() || pieces == Body::Done {
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        match (&taken, &result) {
            (Ok(t), Ok(_)) => {
                assert_eq!(*t, n, "bytes taken differ in pieces of {step}");
                assert_eq!(whole, pieces, "state differs in pieces of {step}");
            }
            (Err(_), Err(_)) => {}
            _ => panic!("malformed in one feeding and not the other (pieces of {step})"),
        }
    }
}
