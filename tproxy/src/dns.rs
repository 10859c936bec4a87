//! DNS over TCP (RFC 1035 §4.2.2, RFC 7766) on the pod's outbound
//! connections that a `dns-*` rule applies to: each length-prefixed query
//! is read, judged by `netfault-dns` against the live DNS rules, and then
//! forwarded (maybe late), answered here, or dropped.
//!
//! It owns the framing and the ordering of one such connection: one writer
//! to the client fed by a channel (forged and relayed answers never mix
//! their bytes; answers may come out of order, as RFC 7766 allows), one to
//! the server, the server connection opened on the first query forwarded.
//! It must not build or parse DNS messages itself (that is `netfault-dns`'s)
//! nor apply TCP faults (those act below, in the client's `ClientIo`).
//!
//! Behaviour worth knowing:
//! - Rules are read again for every query, so a removed or expired fault
//!   stops acting on an open connection at its next query.
//! - What is not a query (malformed, a response, several questions) is
//!   forwarded unchanged; malformed messages are counted in
//!   [`crate::Proxy::dns_malformed`].
//! - A length of 0 is not DNS framing: from there on, bytes are relayed as
//!   they come, both ways.
//! - The client's FIN half-closes the server connection once the delayed
//!   queries have gone; the server's FIN reaches the client after the
//!   answers before it. A failed or reset server connection resets the
//!   client, as the raw relay does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use netfault_api::action::{DnsAction, DnsFault};
use netfault_dns::{Event, NotHandled, Outcome, Query, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::ProxyError;
use crate::io::{rst_on_close, sleep_precisely, ConnControl};
use crate::rules::{CompiledRule, RuleKind};
use crate::{RuleCounters, Shared, Side};

/// Messages queued towards each end before the producer waits.
const QUEUE: usize = 64;
/// Bytes read at a time once the connection is relayed raw.
const RAW_CHUNK: usize = 16 << 10;

/// Whether a connection is served as DNS: an outbound one that at least one
/// live DNS rule applies to.
pub(crate) fn serves(
    rules: &[Arc<CompiledRule>],
    side: Side,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    now: Instant,
) -> bool {
    side == Side::Outbound
        && rules
            .iter()
            .any(|r| matches!(r.kind, RuleKind::Dns(_)) && r.applies_to(side, peer, orig_dst, now))
}

/// The connection, as the DNS relay needs it.
pub(crate) struct DnsConn {
    pub shared: Arc<Shared>,
    pub side: Side,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
}

/// Something for the client's writer.
enum ToClient {
    /// Bytes to write: a whole framed message, or raw bytes.
    Bytes(Bytes),
    /// The server closed: write what came before, then FIN.
    Fin,
}

/// Serves `client` until both ends are done.
pub(crate) async fn relay<C>(
    client: C,
    conn: DnsConn,
    ctrl: Arc<ConnControl>,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(client);
    let (to_client, client_rx) = mpsc::channel(QUEUE);
    let (to_server, server_rx) = mpsc::channel(QUEUE);
    let raw = CancellationToken::new();
    // Set by whichever part fails, before it returns: the server connection
    // then closes with an RST when it is dropped.
    let rst_server = AtomicBool::new(false);
    let failed = |e: ProxyError| {
        rst_server.store(true, Ordering::Relaxed);
        ctrl.abort_on_close();
        e
    };
    let client_answers = to_client.clone();
    let reader = async {
        read_client(rd, &conn, client_answers, to_server, &raw)
            .await
            .map_err(failed)
    };
    let server = async {
        serve_server(&conn, server_rx, to_client, &raw, &rst_server)
            .await
            .map_err(failed)
    };
    let writer = async { write_client(wr, client_rx).await.map_err(failed) };
    tokio::try_join!(reader, server, writer).map(|_| ())
}

/// Reads the client's messages and sends each where its verdict says.
/// Returns at the client's EOF, once the delayed messages have gone.
async fn read_client<R>(
    rd: R,
    conn: &DnsConn,
    to_client: mpsc::Sender<ToClient>,
    to_server: mpsc::Sender<Bytes>,
    raw: &CancellationToken,
) -> Result<(), ProxyError>
where
    R: AsyncRead + Unpin,
{
    let mut rd = BufReader::new(rd);
    let mut delayed = JoinSet::new();
    loop {
        while delayed.try_join_next().is_some() {}
        let mut len = [0u8; 2];
        let got = read_full(&mut rd, &mut len).await?;
        if got < len.len() {
            // EOF, maybe in the middle of a length: pass on what came.
            forward(&to_server, Bytes::copy_from_slice(&len[..got])).await;
            break;
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 {
            // Not DNS framing: the delayed messages go first, then bytes
            // both ways as they come.
            while delayed.join_next().await.is_some() {}
            raw.cancel();
            forward(&to_server, Bytes::copy_from_slice(&len)).await;
            return relay_raw(&mut rd, &to_server).await;
        }
        let mut msg = BytesMut::zeroed(2 + n);
        msg[..2].copy_from_slice(&len);
        let got = read_full(&mut rd, &mut msg[2..]).await?;
        if got < n {
            msg.truncate(2 + got);
            forward(&to_server, msg.freeze()).await;
            break;
        }
        let msg = msg.freeze();
        let verdict = match Query::parse(&msg[2..]) {
            Ok(q) => judge(conn, &q),
            Err(NotHandled::Malformed(why)) => {
                conn.shared.dns_malformed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%why, "forwarding a malformed DNS message");
                None
            }
            Err(NotHandled::NotAQuery) => None,
        };
        let (delay, outcome) = match verdict {
            Some(v) => (v.delay, v.outcome),
            None => (Duration::ZERO, Outcome::Pass),
        };
        match outcome {
            Outcome::Drop => {}
            Outcome::Pass => {
                if delay.is_zero() {
                    forward(&to_server, msg).await;
                } else {
                    let to_server = to_server.clone();
                    delayed.spawn(async move {
                        sleep_precisely(delay).await;
                        forward(&to_server, msg).await;
                    });
                }
            }
            Outcome::Answer(wire) => {
                let Some(framed) = frame(&wire) else {
                    // Cannot be framed (over 64 KiB): the server answers.
                    forward(&to_server, msg).await;
                    continue;
                };
                if delay.is_zero() {
                    answer(&to_client, framed).await;
                } else {
                    let to_client = to_client.clone();
                    delayed.spawn(async move {
                        sleep_precisely(delay).await;
                        answer(&to_client, framed).await;
                    });
                }
            }
        }
    }
    while delayed.join_next().await.is_some() {}
    Ok(())
}

/// The verdict of the live DNS rules on `q`, counted on each rule.
fn judge(conn: &DnsConn, q: &Query) -> Option<netfault_dns::Verdict> {
    let rules = conn.shared.rules();
    let now = Instant::now();
    let live: Vec<(&DnsAction, &RuleCounters)> = rules
        .iter()
        .filter(|r| r.applies_to(conn.side, conn.peer, conn.orig_dst, now))
        .filter_map(|r| Some((r.dns()?, r.rule.counters.as_ref())))
        .collect();
    if live.is_empty() {
        return None;
    }
    let verdict = netfault_dns::decide(
        live.iter().map(|(a, _)| *a),
        q,
        Transport::Tcp,
        |i, event| {
            let Some((action, counters)) = live.get(i) else {
                return;
            };
            match event {
                Event::Matched => counters.add_matched(),
                Event::Affected => {
                    counters.add_affected();
                    // Only the action that decides the outcome is drawn
                    // among the answer-type ones: a drop that acts drops.
                    if matches!(action.fault, DnsFault::Drop) {
                        counters.add_dropped();
                    }
                }
            }
        },
    );
    Some(verdict)
}

/// `wire` with its two-byte length in front.
fn frame(wire: &[u8]) -> Option<Bytes> {
    let len = u16::try_from(wire.len()).ok()?;
    let mut out = BytesMut::with_capacity(2 + wire.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(wire);
    Some(out.freeze())
}

/// Queues bytes for the server. If the server side has ended, its own
/// result (an error, or the FIN passed to the client) says what happened.
async fn forward(to_server: &mpsc::Sender<Bytes>, b: Bytes) {
    if !b.is_empty() {
        let _ = to_server.send(b).await;
    }
}

/// Queues an answer for the client; dropped if the client side is closed.
async fn answer(to_client: &mpsc::Sender<ToClient>, b: Bytes) {
    let _ = to_client.send(ToClient::Bytes(b)).await;
}

/// Fills `buf` from `rd` unless EOF comes first; the bytes read.
async fn read_full<R: AsyncRead + Unpin>(rd: &mut R, buf: &mut [u8]) -> Result<usize, ProxyError> {
    let mut got = 0;
    while got < buf.len() {
        let n = rd.read(&mut buf[got..]).await.map_err(ProxyError::Relay)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// The client's bytes to the server as they come, until EOF.
async fn relay_raw<R: AsyncRead + Unpin>(
    rd: &mut R,
    to_server: &mpsc::Sender<Bytes>,
) -> Result<(), ProxyError> {
    loop {
        let mut buf = BytesMut::with_capacity(RAW_CHUNK);
        if rd.read_buf(&mut buf).await.map_err(ProxyError::Relay)? == 0 {
            return Ok(());
        }
        forward(to_server, buf.freeze()).await;
    }
}

/// The server connection, reset when dropped after a failure.
struct Server<'a> {
    stream: TcpStream,
    rst: &'a AtomicBool,
}

impl Drop for Server<'_> {
    fn drop(&mut self) {
        if self.rst.load(Ordering::Relaxed) {
            rst_on_close(&self.stream);
        }
    }
}

/// Connects to the server on the first message to forward, then writes the
/// client's messages to it and relays its answers to the client.
async fn serve_server(
    conn: &DnsConn,
    mut from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<ToClient>,
    raw: &CancellationToken,
    rst: &AtomicBool,
) -> Result<(), ProxyError> {
    let Some(first) = from_client.recv().await else {
        // Everything was answered here or dropped: no server connection.
        return Ok(());
    };
    let stream = conn
        .shared
        .connector
        .connect(conn.peer, conn.orig_dst)
        .await
        .map_err(|e| ProxyError::Connect {
            to: conn.orig_dst,
            source: e,
        })?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "setting TCP_NODELAY on the server connection");
    }
    let mut server = Server { stream, rst };
    let (rd, mut wr) = server.stream.split();
    let write = async {
        wr.write_all(&first).await.map_err(ProxyError::Relay)?;
        while let Some(b) = from_client.recv().await {
            wr.write_all(&b).await.map_err(ProxyError::Relay)?;
        }
        // The client's FIN, passed on.
        wr.shutdown().await.map_err(ProxyError::Relay)
    };
    let served = tokio::try_join!(write, read_server(rd, to_client, raw)).map(|_| ());
    if served.is_err() {
        // Before `server` drops: the server sees a reset, not a FIN.
        rst.store(true, Ordering::Relaxed);
    }
    served
}

/// Relays the server's messages to the client whole (or its bytes as they
/// come, once the connection is raw), then its FIN.
async fn read_server<R: AsyncRead + Unpin>(
    mut rd: R,
    to_client: mpsc::Sender<ToClient>,
    raw: &CancellationToken,
) -> Result<(), ProxyError> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // Hand over every complete message (or everything, raw).
        loop {
            if raw.is_cancelled() {
                if !buf.is_empty() {
                    let _ = to_client.send(ToClient::Bytes(buf.split().freeze())).await;
                }
                break;
            }
            if buf.len() < 2 {
                break;
            }
            let whole = 2 + usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < whole {
                break;
            }
            let _ = to_client
                .send(ToClient::Bytes(buf.split_to(whole).freeze()))
                .await;
        }
        buf.reserve(4096);
        let n = tokio::select! {
            r = rd.read_buf(&mut buf) => r.map_err(ProxyError::Relay)?,
            () = raw.cancelled(), if !raw.is_cancelled() => continue,
        };
        if n == 0 {
            if !buf.is_empty() {
                // Cut short by the server's FIN: pass on what came.
                let _ = to_client.send(ToClient::Bytes(buf.split().freeze())).await;
            }
            let _ = to_client.send(ToClient::Fin).await;
            return Ok(());
        }
    }
}

/// Writes what comes for the client, one message at a time; FIN when the
/// server closed, or when nothing more can come.
async fn write_client<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<ToClient>,
) -> Result<(), ProxyError> {
    while let Some(m) = rx.recv().await {
        match m {
            ToClient::Bytes(b) => wr.write_all(&b).await.map_err(ProxyError::Relay)?,
            ToClient::Fin => break,
        }
    }
    wr.shutdown().await.map_err(ProxyError::Relay)
}
