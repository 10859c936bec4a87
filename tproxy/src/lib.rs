//! netfault-tproxy: the transparent L4/L7 fault proxy.
//!
//! The agent accepts diverted connections (TPROXY sockets inside a pod's
//! network namespace) and hands each one to [`Proxy::serve`] with the real
//! client address and the original destination. The proxy opens its own
//! connection to that destination through a [`Connector`] and serves the
//! connection as HTTP/1.1, HTTP/2 or raw bytes, applying the HTTP and TCP
//! faults of the [`ProxyRule`]s that match it.
//!
//! This crate knows nothing about network namespaces, nftables or marks:
//! those are the agent's, behind the [`Connector`]. Everything here runs on
//! loopback in tests.
//!
//! What a connection sees:
//! - Sniffing: the first bytes the client sends decide the protocol. An
//!   HTTP/1.x request line starts the HTTP/1 fast path (`http/fast.rs`):
//!   each request's head is parsed, and a request no HTTP rule selects is
//!   relayed as its bytes, framed by its own head, on one upstream
//!   connection per client connection; the first request a rule selects
//!   (or that the fast path leaves to hyper: an upgrade, `CONNECT`, a head
//!   it cannot parse) hands the connection to hyper's HTTP/1 server from
//!   that request on. The HTTP/2 preface
//!   (prior knowledge) by hyper's HTTP/2 server and client; anything else
//!   (TLS, databases, a client that stays silent for [`SNIFF_TIMEOUT`] or a
//!   server that speaks first) is relayed byte for byte.
//! - `Upgrade: h2c` is declined (the header is removed, so the server answers
//!   in HTTP/1.1 and every later request still meets the faults); other
//!   upgrades (WebSocket) and `CONNECT` are relayed as bytes once the server
//!   accepts them.
//! - DNS over TCP: an outbound connection that a `dns-*` rule applies to
//!   is served message by message (see `dns.rs`): each query is forwarded,
//!   answered by the proxy, delayed or dropped as `netfault-dns` decides;
//!   everything else on it passes unchanged.
//! - HTTP rules are read again for every request, so a connection that is
//!   already open sees new rules on its next request; TCP rules are chosen
//!   when the connection is accepted.
//!
//! Behaviour worth knowing:
//! - The upstream connection is opened first, before anything is read: a
//!   refused or failed connect resets the client (what it would see from the
//!   server), and a server that speaks first is heard at once.
//! - A server that writes on accept (a banner, an early `503`) and closes
//!   without reading is heard as directly: its bytes are relayed even when
//!   it refused the client's, then its FIN, then a reset if it reset or
//!   refused bytes (see `relay.rs` and `http::UpstreamIo`). With HTTP rules
//!   on the connection, an early HTTP answer waits 50 ms for the client's
//!   request so that the rules act on it.
//! - HTTP/1: one upstream connection per client connection; pipelined
//!   requests are answered in order (forwarded one at a time). When the
//!   server closes, the client's connection is closed after the response in
//!   flight (hyper then marks that response `Connection: close`).
//! - Rules compose in their order: request-phase faults in order (an abort
//!   ends the list), then response-phase ones in order. Of several TCP
//!   faults of one kind, the harshest wins.
//! - `http-abort` with `reset` resets the whole connection on HTTP/1 and
//!   only the stream (`RST_STREAM`) on HTTP/2.
//! - Merge patches buffer at most 16 MiB of a JSON body (`Content-Type`
//!   JSON or absent, no `Content-Encoding`); larger or non-JSON bodies pass
//!   unchanged. A patched document is re-serialized, with its object keys
//!   in sorted order.
//! - `tcp-bandwidth` throttles each direction of each connection;
//!   `tcp-reset` counts the bytes of both directions; `tcp-slow-close`
//!   holds back each FIN (the client's to the server, and ours to the
//!   client).

mod conn;
mod dns;
mod error;
mod glob;
mod http;
mod io;
mod relay;
mod rules;
mod sniff;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use netfault_api::spec::{Direction, Match};
use netfault_api::ProxyAction;
use tokio::net::TcpStream;
use tracing::Instrument;

pub use error::ProxyError;
pub use glob::glob_match;

use rules::CompiledRule;

/// How long the proxy waits for a client's first bytes before it treats the
/// connection as a protocol where the server speaks first and relays bytes.
pub const SNIFF_TIMEOUT: Duration = Duration::from_millis(200);

/// Which end of a diverted connection the pod is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Server side: remote clients connect to the pod's server (ingress).
    Inbound,
    /// Client side: the pod connects to a remote server (egress).
    Outbound,
}

impl Side {
    /// Whether a fault with `direction` applies to connections on this side.
    pub fn matches(self, direction: Direction) -> bool {
        match self {
            Side::Inbound => direction.includes_ingress(),
            Side::Outbound => direction.includes_egress(),
        }
    }
}

/// How often a rule matched and acted.
#[derive(Debug, Default)]
pub struct RuleCounters {
    /// Requests (HTTP actions) or connections (TCP actions) the selector
    /// matched.
    pub matched: AtomicU64,
    /// Of those, the ones the fault acted on (after `percent`).
    pub affected: AtomicU64,
    /// Of those, the requests aborted or connections reset.
    pub dropped: AtomicU64,
}

impl RuleCounters {
    pub fn snapshot(&self) -> netfault_api::Counters {
        netfault_api::Counters {
            matched: self.matched.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            affected: self.affected.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_matched(&self) {
        self.matched.fetch_add(1, Ordering::Relaxed);
    }

    /// A request matched a rule with `percent`: counts it, draws, and counts
    /// it affected when the fault acts this time.
    pub(crate) fn fires(&self, percent: f64) -> bool {
        self.add_matched();
        let acts = rules::roll(percent);
        if acts {
            self.add_affected();
        }
        acts
    }

    pub(crate) fn add_affected(&self) {
        self.affected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// One proxy fault, as the agent compiles it from a fault spec.
#[derive(Debug, Clone)]
pub struct ProxyRule {
    /// The fault's id, for logs.
    pub id: String,
    pub direction: Direction,
    /// `ports` are the original destination ports; `cidr` the remote end
    /// (the client on [`Side::Inbound`], the server on [`Side::Outbound`]).
    pub selector: Match,
    /// What the proxy does to the connections or requests that match.
    pub action: ProxyAction,
    /// The rule is ignored from this instant on.
    pub deadline: Instant,
    pub counters: Arc<RuleCounters>,
}

/// Opens the proxy's upstream connections.
///
/// The agent's implementation binds to the real client address (transparent
/// source) on [`Side::Inbound`] and marks the socket so its diversion rules
/// let it through; tests connect directly.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `to` on behalf of the client at `from`.
    fn connect(
        &self,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;
}

/// A [`Connector`] that connects from an ephemeral local address.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectConnector;

impl Connector for DirectConnector {
    fn connect(
        &self,
        _from: SocketAddr,
        to: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>> {
        Box::pin(TcpStream::connect(to))
    }
}

pub(crate) struct Shared {
    connector: Arc<dyn Connector>,
    rules: RwLock<Arc<[Arc<CompiledRule>]>>,
    /// Connections being served right now.
    open: AtomicU64,
    /// Malformed DNS messages forwarded unchanged by the DNS relay.
    dns_malformed: AtomicU64,
    /// Cancelled by [`Proxy::shutdown`]: every connection is cut.
    stop: tokio_util::sync::CancellationToken,
}

/// Counts a connection open while it lives.
struct OpenGuard<'a>(&'a AtomicU64);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The current rules (a cheap snapshot).
    pub(crate) fn rules(&self) -> Arc<[Arc<CompiledRule>]> {
        match self.rules.read() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// The fault proxy. Cheap to clone; clones share rules and connector.
#[derive(Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("rules", &self.shared.rules().len())
            .finish()
    }
}

impl Proxy {
    pub fn new(connector: Arc<dyn Connector>) -> Proxy {
        Proxy {
            shared: Arc::new(Shared {
                connector,
                rules: RwLock::new(Arc::from(Vec::new())),
                open: AtomicU64::new(0),
                dns_malformed: AtomicU64::new(0),
                stop: tokio_util::sync::CancellationToken::new(),
            }),
        }
    }

    /// Replaces every rule at once. HTTP requests read the rules when they
    /// arrive, so connections already open see the new rules on their next
    /// request; TCP faults are chosen when a connection is accepted.
    pub fn set_rules(&self, rules: Vec<ProxyRule>) {
        let compiled: Vec<Arc<CompiledRule>> = rules
            .into_iter()
            .filter_map(|r| CompiledRule::compile(r).map(Arc::new))
            .collect();
        let compiled: Arc<[Arc<CompiledRule>]> = Arc::from(compiled);
        match self.shared.rules.write() {
            Ok(mut w) => *w = compiled,
            Err(poisoned) => *poisoned.into_inner() = compiled,
        }
    }

    /// Cuts every connection this proxy serves (their sockets close), now
    /// and for any connection handed to [`Proxy::serve`] later.
    pub fn shutdown(&self) {
        self.shared.stop.cancel();
    }

    /// Connections being served right now (a removed fault's diversion is
    /// kept until they finish).
    pub fn open_connections(&self) -> u64 {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Malformed DNS messages seen on DNS-over-TCP connections since the
    /// proxy started (each was forwarded unchanged).
    pub fn dns_malformed(&self) -> u64 {
        self.shared.dns_malformed.load(Ordering::Relaxed)
    }

    /// The number of rules set (expired ones included).
    pub fn rule_count(&self) -> usize {
        self.shared.rules().len()
    }

    /// Serves one diverted connection until both ends are done. `peer` is
    /// the client's address, `orig_dst` where it meant to connect. Never
    /// panics; errors are logged.
    pub async fn serve(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        orig_dst: SocketAddr,
        side: Side,
    ) {
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        let _open = OpenGuard(&self.shared.open);
        let span = tracing::debug_span!("proxy", %peer, %orig_dst, ?side);
        let conn = conn::Connection {
            shared: self.shared.clone(),
            peer,
            orig_dst,
            side,
        };
        let served = tokio::select! {
            r = conn.serve(client).instrument(span.clone()) => r,
            () = self.shared.stop.cancelled() => Ok(()),
        };
        match served {
            Ok(()) => {}
            Err(e) if e.is_expected() => {
                span.in_scope(|| tracing::debug!(error = %e, "connection ended"));
            }
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "connection failed"));
            }
        }
    }
}

/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use crate::sniff::{classify, decide, h2_settings_header, Protocol, H2_PREFACE};

    /// The protocol sniffing on every prefix of `data`, as bytes trickle in
    /// from a client, and the server-preface check on it. HTTP/2 is only
    /// ever chosen for the full preface. Returns whether `data` is HTTP.
    pub fn sniff(data: &[u8]) -> bool {
        let data = &data[..data.len().min(crate::sniff::MAX_SNIFF + 64)];
        // Every prefix up to 256 bytes, then one per 256 bytes: reads
        // arrive in pieces of any size.
        let ends = (0..=data.len().min(256)).chain((512..=data.len()).step_by(256));
        for end in ends.chain(std::iter::once(data.len())) {
            let prefix = &data[..end];
            let p = classify(prefix);
            if p == Some(Protocol::Http2) {
                assert!(prefix.starts_with(H2_PREFACE), "h2 without its preface");
            }
            if p.is_some() {
                break;
            }
        }
        let _ = h2_settings_header(&data[..data.len().min(9)]);
        decide(data) != Protocol::Raw
    }

    /// The HTTP/1 fast path's head parsing and body framing on `data`
    /// (as a request with its body, as a response, as chunks): a body
    /// takes the same bytes in pieces of any size as at once. Returns
    /// whether the request would be relayed by the fast path.
    pub fn http1_framing(data: &[u8]) -> bool {
        crate::http::fuzz_fast_path(data)
    }
}
