//! One diverted connection from accept to close: choose its TCP faults,
//! connect upstream, sniff the protocol, serve it, and enforce `tcp-reset`.
//! Outbound connections that a DNS rule applies to go to the DNS relay
//! (`dns.rs`) instead of the sniffing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use netfault_api::action::{ResetAfter, TcpFault};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::http::{self, HttpCtx};
use crate::io::{make_room, rst_on_close, ClientIo, ConnControl, Prefixed, TcpPlan};
use crate::rules::{roll, CompiledRule, RuleKind};
use crate::sniff::{self, Protocol};
use crate::{dns, relay, Shared, Side, SNIFF_TIMEOUT};

pub(crate) struct Connection {
    pub shared: Arc<Shared>,
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub side: Side,
}

impl Connection {
    /// The TCP faults for this connection. Of several faults of one kind
    /// the harshest wins: the earliest reset, the lowest rate, the longest
    /// close delay.
    fn tcp_plan(&self, rules: &[Arc<CompiledRule>], now: Instant) -> TcpPlan {
        let mut plan = TcpPlan::default();
        for r in rules {
            let RuleKind::Tcp { fault, percent } = &r.kind else {
                continue;
            };
            if !r.applies_to(self.side, self.peer, self.orig_dst, now) {
                continue;
            }
            let counters = &r.rule.counters;
            counters.add_matched();
            if !roll(*percent) {
                continue;
            }
            match *fault {
                TcpFault::Reset {
                    after: ResetAfter::Time(d),
                } => {
                    if plan.reset_after_time.as_ref().is_none_or(|(t, _)| d < *t) {
                        plan.reset_after_time = Some((d, counters.clone()));
                    }
                }
                TcpFault::Reset {
                    after: ResetAfter::Bytes(n),
                } => {
                    if plan.reset_after_bytes.as_ref().is_none_or(|(b, _)| n < *b) {
                        plan.reset_after_bytes = Some((n, counters.clone()));
                    }
                }
                TcpFault::SlowClose { delay } => {
                    counters.add_affected();
                    plan.slow_close = Some(plan.slow_close.map_or(delay, |d| d.max(delay)));
                }
                TcpFault::Bandwidth { bits_per_sec } => {
                    counters.add_affected();
                    let bytes = (bits_per_sec / 8).max(1);
                    plan.bytes_per_sec = Some(plan.bytes_per_sec.map_or(bytes, |b| b.min(bytes)));
                }
            }
        }
        plan
    }

    pub(crate) async fn serve(self, client: TcpStream) -> Result<(), ProxyError> {
        if let Err(e) = client.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY on the client connection");
        }
        let rules = self.shared.rules();
        let plan = self.tcp_plan(&rules, Instant::now());
        drop(rules);
        let ctrl = Arc::new(ConnControl::default());
        if let Some((0, counters)) = &plan.reset_after_bytes {
            counters.add_affected();
            counters.add_dropped();
            rst_on_close(&client);
            return Err(ProxyError::FaultReset);
        }
        let timer = plan.reset_after_time.clone();
        let reset_timer = {
            let ctrl = ctrl.clone();
            async move {
                match timer {
                    Some((d, counters)) => {
                        crate::io::sleep_precisely(d).await;
                        counters.add_affected();
                        counters.add_dropped();
                        ctrl.fire_reset();
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let work = self.run(client, &plan, ctrl.clone());
        // Dropping `work` drops the client connection, which closes with an
        // RST once the reset has fired (see `ClientIo`'s drop).
        tokio::select! {
            r = work => r,
            () = reset_timer => Err(ProxyError::FaultReset),
            () = ctrl.reset.cancelled() => Err(ProxyError::FaultReset),
        }
    }

    async fn run(
        &self,
        client: TcpStream,
        plan: &TcpPlan,
        ctrl: Arc<ConnControl>,
    ) -> Result<(), ProxyError> {
        let serves_dns = dns::serves(
            &self.shared.rules(),
            self.side,
            self.peer,
            self.orig_dst,
            Instant::now(),
        );
        if serves_dns {
            // DNS over TCP: the server is connected on the first query
            // that is forwarded, not before.
            let io = ClientIo::new(client, plan, ctrl.clone());
            let conn = dns::DnsConn {
                shared: self.shared.clone(),
                side: self.side,
                peer: self.peer,
                orig_dst: self.orig_dst,
            };
            // Boxed: a rare kind of connection, whose state should not size
            // every connection's task.
            return Box::pin(dns::relay(io, conn, ctrl)).await;
        }
        let upstream = match self
            .shared
            .connector
            .connect(self.peer, self.orig_dst)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                // What the client would have seen from the server: a reset.
                rst_on_close(&client);
                return Err(ProxyError::Connect {
                    to: self.orig_dst,
                    source: e,
                });
            }
        };
        if let Err(e) = upstream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY on the server connection");
        }
        let mut io = ClientIo::new(client, plan, ctrl.clone());
        let http_rules = self.shared.rules().iter().any(|r| {
            matches!(r.kind, RuleKind::Http(_))
                && r.applies_to(self.side, self.peer, self.orig_dst, Instant::now())
        });
        let (proto, prefix) = sniff(&mut io, &upstream, http_rules).await?;
        tracing::debug!(?proto, "serving");
        let ctx = || {
            HttpCtx::new(
                self.shared.clone(),
                self.side,
                self.peer,
                self.orig_dst,
                ctrl.clone(),
            )
        };
        match proto {
            Protocol::Raw => relay::relay(Prefixed::new(prefix, io), upstream, &ctrl).await,
            Protocol::Http1 => http::serve_h1_fast(io, prefix, upstream, ctx()).await,
            Protocol::Http2 => {
                Box::pin(http::serve_h2(Prefixed::new(prefix, io), upstream, ctx())).await
            }
        }
    }
}

/// How long an HTTP server's early answer waits for the client's request
/// when HTTP rules apply to the connection (see [`sniff`]).
const EARLY_ANSWER_GRACE: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads the client's first bytes until they tell the protocol. The server
/// speaking first, the client closing, or [`SNIFF_TIMEOUT`] of silence end
/// the wait. Returns the bytes read, to be replayed.
///
/// An HTTP server may answer before the request arrives (an early `503`).
/// When HTTP rules apply to the connection (`http_rules`) and the server's
/// first bytes look like an HTTP response, the client's request is awaited
/// [`EARLY_ANSWER_GRACE`] longer, so that the rules still act on it; a
/// client that stays silent gets the answer relayed after that grace.
async fn sniff(
    io: &mut ClientIo,
    upstream: &TcpStream,
    http_rules: bool,
) -> Result<(Protocol, Bytes), ProxyError> {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut probe = [0u8; 9];
    // The server sent an HTTP/2 SETTINGS frame: its connection preface,
    // which h2 servers may send before the client's. Not a server that
    // speaks first: keep listening to the client.
    let mut h2_server = false;
    let mut deadline = deadline;
    // The server's early bytes look like an HTTP answer: wait for the
    // client's request a little.
    let mut early_http = false;
    loop {
        make_room(&mut buf, 4096);
        tokio::select! {
            biased;
            r = io.read_buf(&mut buf) => {
                let n = r.map_err(ProxyError::Sniff)?;
                if n == 0 {
                    let p = if buf.is_empty() { Protocol::Raw } else { sniff::decide(&buf) };
                    return Ok((p, buf.freeze()));
                }
                if let Some(p) = sniff::classify(&buf) {
                    return Ok((p, buf.freeze()));
                }
            }
            // Only while the client has said nothing: a server that speaks
            // first (SMTP, MySQL, SSH...) or closes at once.
            r = upstream.peek(&mut probe), if buf.is_empty() && !h2_server && !early_http => {
                let n = r.unwrap_or(0);
                match sniff::h2_settings_header(&probe[..n]) {
                    Some(true) => h2_server = true,
                    // Too few bytes to tell yet.
                    None => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                    Some(false) if http_rules && sniff::http_response_start(&probe[..n]) => {
                        early_http = true;
                        deadline = deadline.min(tokio::time::Instant::now() + EARLY_ANSWER_GRACE);
                    }
                    Some(false) => return Ok((Protocol::Raw, buf.freeze())),
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let p = if buf.is_empty() { Protocol::Raw } else { sniff::decide(&buf) };
                return Ok((p, buf.freeze()));
            }
        }
    }
}
