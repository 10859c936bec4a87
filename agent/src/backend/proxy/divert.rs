//! The in-pod side of the transparent proxy: listening sockets, the nft
//! diversion and the policy routing that bring a pod's TCP connections to
//! the agent's proxy (`crate::backend::proxy`), and the upstream sockets that take them
//! on to where they were going.
//!
//! Everything with `_here` runs on a thread inside the pod netns
//! (`Netns::run`): sockets, nft's netlink socket (libnftables in process,
//! or the `nft` child process) and ours all belong to the netns of the
//! thread that creates them. A socket
//! keeps its netns afterwards, so the agent's proxy runtime serves the
//! listeners from anywhere.
//!
//! What is in the pod netns while a sandbox has proxy faults:
//! - four listening sockets (`IP_TRANSPARENT`, ephemeral ports): inbound
//!   and outbound, IPv4 and IPv6 (IPv6 when the netns has it);
//! - a table `inet netfault_proxy`:
//!   - per fault, a set `l<tag>` (type `nf_proto`) whose elements `ipv4` and
//!     `ipv6` carry a timeout: the lease. Every rule of the fault looks
//!     itself up in that set, so if the agent stops re-arming the lease
//!     (it died), new connections go direct once it runs out;
//!   - **inbound** (server side, chain `prerouting`): a new connection from
//!     outside to one of the fault's ports is handed to the inbound listener
//!     with `tproxy`; the accepted socket's local address is the original
//!     destination. The proxy's upstream connection to the server is bound
//!     to the real client address (`IP_TRANSPARENT`) and marked
//!     [`PROXY_MARK`]; its conntrack entry is marked [`CT_UPSTREAM`], and
//!     the server's replies (addressed to the client, which is not local)
//!     are marked [`DIVERT_MARK`] in chain `output` so that policy routing
//!     delivers them back to the proxy through `lo`;
//!   - **outbound** (client side, chain `output`): a new connection from the
//!     pod to one of the fault's ports is marked [`CT_OUTBOUND`] in
//!     conntrack and [`DIVERT_MARK`] on every packet, which policy routing
//!     sends through `lo`; in `prerouting` it meets the outbound listener
//!     (`tproxy`). The proxy's own upstream connections carry
//!     [`PROXY_MARK`], which the outbound rules skip;
//!   - connection-level rules (conntrack marks) that keep a proxied
//!     connection on the proxy after its fault is gone, so that removing a
//!     fault never breaks a connection in flight;
//! - policy routing: `fwmark DIVERT_MARK lookup ROUTE_TABLE` and `local
//!   default dev lo table ROUTE_TABLE`, for IPv4 and IPv6.
//!
//! Connections that were open before a fault came keep going direct: only
//! new connections (`ct state new` for outbound; for inbound, `tproxy`
//! finds the established server socket and leaves the packet alone).

use netfault_sys::netns::InNetns;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};

use netfault_api::spec::Match;
use netfault_sys::nft::{
    accept, ct, eq, mangle, meta, ne, number, payload, port_set, prefix_match, set_lookup, word,
    NfTable, Transaction,
};
use netfault_sys::rtnetlink::{LocalDelivery, RtError, RtSocket};
use netfault_sys::sockopt::set_int_opt;
use nftables::expr::{Elem, Expression, MetaKey, NamedExpression};
use nftables::schema::{FlushObject, NfListObject};
use nftables::stmt::{Statement, TProxy};
use nftables::types::{NfChainType, NfFamily, NfHook};

use netfault_tproxy::Side;

/// Packets policy-routed to `lo` (local delivery to the proxy).
pub const DIVERT_MARK: u32 = 0x4e46_0010;
/// `SO_MARK` of the proxy's upstream sockets: the diversion skips them.
pub const PROXY_MARK: u32 = 0x4e46_0020;
/// Conntrack mark of an outbound (client-side) connection taken by the proxy.
pub const CT_OUTBOUND: u32 = 0x4e46_0011;
/// Conntrack mark of the proxy's upstream connections.
pub const CT_UPSTREAM: u32 = 0x4e46_0021;
/// The routing table that delivers everything locally, and its rule's
/// priority (before `main`, 32766).
pub const ROUTE_TABLE: u32 = 0x4e46;
pub const RULE_PRIORITY: u32 = 0x4e46;

/// Source ports of the proxy's upstream connections on the server side
/// (those bound to the client's address): outside the default ephemeral
/// range (32768-60999) that clients pick from. The kernel's own choice
/// hashes (source, destination, port) the same way in every netns, so it
/// picks the very port the client used, and the upstream connection would
/// share its 4-tuple (sockets and conntrack) with the client's connection.
/// (`IP_LOCAL_PORT_RANGE` can only narrow the netns's range, so the agent
/// picks the port itself.)
pub const UPSTREAM_PORTS: (u16, u16) = (61000, 65535);

/// How many ports of [`UPSTREAM_PORTS`] an upstream socket tries.
const PORT_TRIES: usize = 64;

pub const TABLE: &str = "netfault_proxy";
const NFT: NfTable = NfTable {
    family: NfFamily::INet,
    name: TABLE,
};

#[derive(Debug, thiserror::Error)]
pub enum DivertError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("nft: {0}")]
    Nft(String),
    #[error("policy routing: {0}")]
    Routing(#[from] RtError),
}

impl DivertError {
    pub fn from_io(what: &'static str, source: std::io::Error) -> DivertError {
        DivertError::Io { what, source }
    }
}

/// What one proxy fault diverts, and for how long without a refresh.
#[derive(Debug, Clone)]
pub struct Diversion {
    /// Names the fault's lease set `l<tag>`.
    pub tag: u32,
    /// Divert connections into the pod (server side).
    pub inbound: bool,
    /// Divert connections out of the pod (client side).
    pub outbound: bool,
    /// `ports` (destination ports) and `cidr` (the remote end).
    pub selector: Match,
    /// The lease, in milliseconds.
    pub lease_ms: u64,
}

/// The ports of the listening sockets (`None`: that family is absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListenerPorts {
    pub in4: Option<u16>,
    pub in6: Option<u16>,
    pub out4: Option<u16>,
    pub out6: Option<u16>,
}

impl ListenerPorts {
    /// Whether `port` is one of the listeners' own ports.
    pub fn contains(&self, port: u16) -> bool {
        [self.in4, self.in6, self.out4, self.out6].contains(&Some(port))
    }
}

/// The listening sockets of one pod netns.
pub struct Listeners {
    ports: ListenerPorts,
    sockets: Vec<(TcpListener, Side)>,
}

impl Listeners {
    pub fn ports(&self) -> ListenerPorts {
        self.ports
    }

    pub fn into_sided(self) -> Vec<(TcpListener, Side)> {
        self.sockets
    }
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> DivertError {
    move |source| DivertError::Io { what, source }
}

fn set_transparent(s: &socket2::Socket, ipv6: bool) -> std::io::Result<()> {
    if ipv6 {
        set_int_opt(s, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        set_int_opt(s, libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1)
    }
}

fn tcp_socket(ipv6: bool) -> std::io::Result<socket2::Socket> {
    let domain = if ipv6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
}

fn listener(ipv6: bool) -> std::io::Result<(TcpListener, u16)> {
    let s = tcp_socket(ipv6)?;
    if ipv6 {
        s.set_only_v6(true)?;
    }
    set_transparent(&s, ipv6)?;
    let any: IpAddr = if ipv6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    s.bind(&SocketAddr::new(any, 0).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    let listener: TcpListener = s.into();
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

/// Whether the calling thread's netns has IPv6 (an `AF_INET6` socket can be
/// bound to `::`).
fn has_ipv6() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).is_ok()
}

/// Opens the inbound and outbound listeners, IPv4 and (when the netns has
/// it) IPv6, on ephemeral ports.
pub fn open_listeners_here(_inside: &InNetns) -> Result<Listeners, DivertError> {
    let mut ports = ListenerPorts::default();
    let mut sockets = Vec::new();
    let v6 = has_ipv6();
    for (side, ipv6) in [
        (Side::Inbound, false),
        (Side::Outbound, false),
        (Side::Inbound, true),
        (Side::Outbound, true),
    ] {
        if ipv6 && !v6 {
            continue;
        }
        let (l, port) = listener(ipv6).map_err(io("opening a transparent listener"))?;
        let slot = match (side, ipv6) {
            (Side::Inbound, false) => &mut ports.in4,
            (Side::Inbound, true) => &mut ports.in6,
            (Side::Outbound, false) => &mut ports.out4,
            (Side::Outbound, true) => &mut ports.out6,
        };
        *slot = Some(port);
        sockets.push((l, side));
    }
    Ok(Listeners { ports, sockets })
}

/// A socket for one of the proxy's upstream connections, not yet
/// connected: marked [`PROXY_MARK`], and with `from`, bound transparently
/// to that address (its IP; the port is chosen at connect time) so the
/// server sees the real client.
pub fn upstream_socket_here(
    _inside: &InNetns,
    from: Option<IpAddr>,
    to: SocketAddr,
) -> Result<TcpStream, DivertError> {
    let ipv6 = to.is_ipv6();
    let s = tcp_socket(ipv6).map_err(io("creating an upstream socket"))?;
    s.set_mark(PROXY_MARK)
        .map_err(io("marking an upstream socket"))?;
    s.set_tcp_nodelay(true)
        .map_err(io("setting TCP_NODELAY on an upstream socket"))?;
    if let Some(ip) = from.filter(|ip| ip.is_ipv6() == ipv6) {
        set_transparent(&s, ipv6).map_err(io("making an upstream socket transparent"))?;
        // IPv4: bound to lo (where it goes anyway: the server is local), so
        // the kernel's default tcp_tw_reuse (loopback only) lets a new
        // upstream connection reuse a 4-tuple in TIME_WAIT: the proxy
        // closes first when a client does, and UPSTREAM_PORTS would
        // otherwise cap new connections from one client to one server port
        // at about 75/s. (IPv6 finds no route to a local address via lo.)
        if !ipv6 {
            s.bind_device(Some(b"lo"))
                .map_err(io("binding an upstream socket to lo"))?;
        }
        // Ports in TIME_WAIT may be bound again (connect then checks the
        // 4-tuple).
        s.set_reuse_address(true)
            .map_err(io("setting SO_REUSEADDR on an upstream socket"))?;
        bind_upstream_port(&s, ip)?;
    }
    s.set_nonblocking(true)
        .map_err(io("making an upstream socket non-blocking"))?;
    Ok(s.into())
}

/// Binds `s` to `ip` and a free port of [`UPSTREAM_PORTS`], starting at a
/// random one.
fn bind_upstream_port(s: &socket2::Socket, ip: IpAddr) -> Result<(), DivertError> {
    let (lo, hi) = UPSTREAM_PORTS;
    let span = u32::from(hi - lo) + 1;
    let start: u32 = rand::random_range(0..span);
    let mut last = None;
    for i in 0..PORT_TRIES as u32 {
        let port = lo + ((start + i * 7919) % span) as u16;
        match s.bind(&SocketAddr::new(ip, port).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = Some(e),
            Err(e) => return Err(DivertError::from_io("binding an upstream socket", e)),
        }
    }
    Err(DivertError::from_io(
        "binding an upstream socket: every port tried is in use",
        last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EADDRINUSE)),
    ))
}

fn set_meta_mark(mark: u32) -> Statement<'static> {
    mangle(meta(MetaKey::Mark), number(mark))
}

fn set_ct_mark(mark: u32) -> Statement<'static> {
    mangle(ct("mark"), number(mark))
}

fn lease_set(tag: u32) -> String {
    format!("l{tag}")
}

fn nfproto(ipv6: bool) -> Statement<'static> {
    eq(
        meta(MetaKey::Nfproto),
        word(if ipv6 { "ipv6" } else { "ipv4" }),
    )
}

fn tproxy_to(ipv6: bool, port: u16) -> Statement<'static> {
    Statement::TProxy(TProxy {
        family: Some((if ipv6 { "ip6" } else { "ip" }).into()),
        port,
        addr: None,
    })
}

/// The lease elements of a fault's set, with their timeout in seconds
/// (rounded up; nft's JSON takes whole seconds).
fn lease_elements(d: &Diversion) -> NfListObject<'static> {
    let secs = d.lease_ms.div_ceil(1000).max(1);
    let elem = ["ipv4", "ipv6"]
        .into_iter()
        .map(|p| {
            Expression::Named(NamedExpression::Elem(Elem {
                val: Box::new(word(p)),
                timeout: Some(u32::try_from(secs).unwrap_or(u32::MAX)),
                expires: None,
                comment: None,
                counter: None,
            }))
        })
        .collect();
    NFT.elements(lease_set(d.tag), elem)
}

/// A fault's match on the remote address and the destination ports.
fn selector_exprs(d: &Diversion, ipv6: bool, remote_is_src: bool) -> Vec<Statement<'static>> {
    let mut out = vec![
        eq(meta(MetaKey::Nfproto), set_lookup(&lease_set(d.tag))),
        nfproto(ipv6),
    ];
    if let Some(net) = d.selector.cidr {
        out.push(prefix_match(net, remote_is_src));
    }
    out.push(eq(meta(MetaKey::L4proto), word("tcp")));
    out.push(eq(
        payload("tcp", "dport"),
        port_set(d.selector.ports.iter().map(|p| (p.lo, p.hi))),
    ));
    out
}

/// Whether a fault's `cidr` (if any) admits addresses of this family.
fn family_wanted(d: &Diversion, ipv6: bool) -> bool {
    match d.selector.cidr {
        None => true,
        Some(net) => net.addr().is_ipv6() == ipv6,
    }
}

/// The nft transaction that replaces the table with one diverting
/// `diversions` to the listeners at `ports`. With no diversions, the table
/// keeps only the connection-level rules (a draining proxy).
pub fn ruleset(diversions: &[Diversion], ports: &ListenerPorts) -> Transaction {
    let mut tx = Transaction::new();
    // Removes the table whether or not it exists.
    tx.remove_table(&NFT);
    tx.add(NFT.table());
    // Before conntrack's own priority (-200) would be too early for ct
    // marks; mangle (-150) is after it and before routing.
    tx.add(NFT.base_chain("prerouting", NfChainType::Filter, NfHook::Prerouting, -150));
    tx.add(NFT.base_chain("output", NfChainType::Route, NfHook::Output, -150));
    let lo = || eq(meta(MetaKey::Iifname), word("lo"));
    // Outbound connections looped through lo meet the outbound listener.
    for (ipv6, port) in [(false, ports.out4), (true, ports.out6)] {
        if let Some(port) = port {
            tx.add(NFT.rule(
                "prerouting",
                vec![
                    lo(),
                    eq(ct("direction"), word("original")),
                    eq(ct("mark"), number(CT_OUTBOUND)),
                    nfproto(ipv6),
                    eq(meta(MetaKey::L4proto), word("tcp")),
                    tproxy_to(ipv6, port),
                    set_meta_mark(DIVERT_MARK),
                    accept(),
                ],
            ));
        }
    }
    // The proxy's upstream connections: the server's replies go back to
    // the proxy, and nothing of theirs is diverted again.
    tx.add(NFT.rule(
        "output",
        vec![
            eq(meta(MetaKey::Mark), number(PROXY_MARK)),
            set_ct_mark(CT_UPSTREAM),
            accept(),
        ],
    ));
    tx.add(NFT.rule(
        "output",
        vec![
            eq(ct("direction"), word("reply")),
            eq(ct("mark"), number(CT_UPSTREAM)),
            set_meta_mark(DIVERT_MARK),
            accept(),
        ],
    ));
    // Outbound connections already taken by the proxy stay on it.
    tx.add(NFT.rule(
        "output",
        vec![
            eq(ct("direction"), word("original")),
            eq(ct("mark"), number(CT_OUTBOUND)),
            set_meta_mark(DIVERT_MARK),
            accept(),
        ],
    ));
    for d in diversions {
        tx.add_set(&NFT, lease_set(d.tag));
        tx.add(lease_elements(d));
        for ipv6 in [false, true] {
            if !family_wanted(d, ipv6) {
                continue;
            }
            let inbound = if ipv6 { ports.in6 } else { ports.in4 };
            if let (true, Some(port)) = (d.inbound, inbound) {
                let mut e = vec![ne(meta(MetaKey::Iifname), word("lo"))];
                e.extend(selector_exprs(d, ipv6, true));
                e.extend([tproxy_to(ipv6, port), set_meta_mark(DIVERT_MARK), accept()]);
                tx.add(NFT.rule("prerouting", e));
            }
            let outbound = if ipv6 { ports.out6 } else { ports.out4 };
            if d.outbound && outbound.is_some() {
                let mut e = vec![ne(meta(MetaKey::Mark), number(PROXY_MARK))];
                e.extend(selector_exprs(d, ipv6, false));
                e.extend([
                    eq(ct("state"), word("new")),
                    set_ct_mark(CT_OUTBOUND),
                    set_meta_mark(DIVERT_MARK),
                    accept(),
                ]);
                tx.add(NFT.rule("output", e));
            }
        }
    }
    tx
}

fn nft(tx: &Transaction) -> Result<(), DivertError> {
    tx.apply().map_err(|e| DivertError::Nft(e.to_string()))
}

fn lo_index() -> Result<u32, DivertError> {
    nix::net::if_::if_nametoindex("lo")
        .map_err(|e| DivertError::from_io("finding lo", std::io::Error::from(e)))
}

/// The policy routing that brings diverted packets to the listeners.
fn delivery(lo_index: u32, ipv6: bool) -> LocalDelivery {
    LocalDelivery {
        ipv6,
        mark: DIVERT_MARK,
        table: ROUTE_TABLE,
        priority: RULE_PRIORITY,
        lo_index,
    }
}

/// Installs (or replaces) the diversion: policy routing, then the table.
pub fn install_here(
    _inside: &InNetns,
    diversions: &[Diversion],
    ports: &ListenerPorts,
) -> Result<(), DivertError> {
    let lo = lo_index()?;
    let mut nl = RtSocket::open()?;
    nl.add_local_delivery(&delivery(lo, false))?;
    if ports.in6.is_some() || ports.out6.is_some() {
        nl.add_local_delivery(&delivery(lo, true))?;
    }
    nft(&ruleset(diversions, ports))
}

/// Re-arms the leases of `diversions` (each to its `lease_ms`), in one
/// transaction: a fault's set never looks empty in between.
pub fn refresh_here(_inside: &InNetns, diversions: &[Diversion]) -> Result<(), DivertError> {
    match refresh(diversions) {
        Some(payload) => nft(&payload),
        None => Ok(()),
    }
}

/// The nft transaction of [`refresh_here`] (`None`: no diversions).
fn refresh(diversions: &[Diversion]) -> Option<Transaction> {
    let mut tx = Transaction::new();
    for d in diversions {
        tx.flush(FlushObject::Set(NFT.set(lease_set(d.tag))));
        tx.add(lease_elements(d));
    }
    (!tx.is_empty()).then_some(tx)
}

/// The nft transaction that removes the table whether or not it exists.
fn removal() -> Transaction {
    let mut tx = Transaction::new();
    tx.remove_table(&NFT);
    tx
}

/// A netfilter netlink socket in the calling thread's netns, for
/// [`rearm`] (it keeps its netns; the agent re-arms leases through it from
/// anywhere, without spawning `nft` or entering the netns).
pub fn lease_socket_here(_inside: &InNetns) -> Result<std::os::fd::OwnedFd, DivertError> {
    netfault_sys::nfnetlink::batch_socket().map_err(io("opening a netfilter socket"))
}

/// Re-arms the leases of `diversions` (each to its `lease_ms`, with
/// millisecond precision) in one netlink batch over `fd`
/// ([`lease_socket_here`]).
pub fn rearm(fd: &std::os::fd::OwnedFd, diversions: &[Diversion]) -> Result<(), DivertError> {
    let leases: Vec<(String, u64)> = diversions
        .iter()
        .map(|d| (lease_set(d.tag), d.lease_ms))
        .collect();
    netfault_sys::nfnetlink::arm_leases(fd, TABLE, &leases)
        .map_err(|e| DivertError::Nft(e.to_string()))
}

/// Removes the table and the policy routing, whatever of them exists.
pub fn remove_here(_inside: &InNetns) -> Result<(), DivertError> {
    nft(&removal())?;
    let lo = lo_index()?;
    let mut nl = RtSocket::open()?;
    nl.del_local_delivery(&delivery(lo, false))?;
    nl.del_local_delivery(&delivery(lo, true))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::golden;
    use netfault_api::spec::PortRange;
    use serde_json::Value;

    fn div(cidr: Option<&str>) -> Diversion {
        let selector = Match {
            ports: vec![
                PortRange { lo: 80, hi: 80 },
                PortRange { lo: 8000, hi: 8099 },
            ],
            cidr: cidr.map(|c| c.parse().expect("cidr")),
            ..Match::default()
        };
        Diversion {
            tag: 7,
            inbound: true,
            outbound: true,
            selector,
            lease_ms: 2500,
        }
    }

    fn ports() -> ListenerPorts {
        ListenerPorts {
            in4: Some(40001),
            in6: Some(40002),
            out4: Some(40003),
            out6: Some(40004),
        }
    }

    fn rules_in(v: &Value, chain: &str) -> Vec<String> {
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["add"]["rule"]["chain"] == chain)
            .map(|c| c["add"]["rule"]["expr"].to_string())
            .collect()
    }

    #[test]
    fn a_v4_cidr_diverts_only_v4_and_leases_round_up() {
        let v = ruleset(&[div(Some("198.18.0.0/15"))], &ports()).to_json();
        let pre = rules_in(&v, "prerouting");
        // Two outbound-listener rules plus one inbound rule (v4 only).
        assert_eq!(pre.len(), 3, "{pre:#?}");
        let inbound = &pre[2];
        assert!(inbound.contains("\"port\":40001"), "{inbound}");
        assert!(inbound.contains("\"saddr\""), "{inbound}");
        assert!(inbound.contains("@l7"), "{inbound}");
        let out = rules_in(&v, "output");
        assert_eq!(out.len(), 4, "{out:#?}");
        assert!(out[3].contains("\"daddr\"") && out[3].contains("\"new\""));
        let elems = v.to_string();
        assert!(elems.contains("\"timeout\":3"), "2500 ms rounds up to 3 s");
    }

    #[test]
    fn no_cidr_diverts_both_families_and_no_v6_listener_means_no_v6_rules() {
        let v = ruleset(&[div(None)], &ports()).to_json();
        assert_eq!(rules_in(&v, "prerouting").len(), 4);
        assert_eq!(rules_in(&v, "output").len(), 5);
        let only4 = ListenerPorts {
            in6: None,
            out6: None,
            ..ports()
        };
        let v = ruleset(&[div(None)], &only4).to_json();
        assert_eq!(rules_in(&v, "prerouting").len(), 2);
        assert_eq!(rules_in(&v, "output").len(), 4);
    }

    fn with(
        tag: u32,
        inbound: bool,
        outbound: bool,
        cidr: Option<&str>,
        lease_ms: u64,
    ) -> Diversion {
        Diversion {
            tag,
            inbound,
            outbound,
            lease_ms,
            ..div(cidr)
        }
    }

    fn only4() -> ListenerPorts {
        ListenerPorts {
            in6: None,
            out6: None,
            ..ports()
        }
    }

    fn golden_cases() -> Vec<golden::Case> {
        let mut v6_inbound = with(8, true, false, Some("fd00:1::/64"), 1);
        v6_inbound.selector.ports = vec![PortRange { lo: 443, hi: 443 }];
        let mut outbound = with(9, false, true, None, 60_000);
        outbound.selector.ports = vec![PortRange { lo: 6379, hi: 6379 }];
        let sample = [
            ("v4_cidr_both_sides", div(Some("198.18.0.0/15"))),
            ("v6_cidr_inbound_one_port", v6_inbound),
            ("no_cidr_outbound", outbound),
            ("no_cidr_both_sides", with(10, true, true, None, 999)),
        ];
        let all: Vec<Diversion> = sample.iter().map(|(_, d)| d.clone()).collect();
        let mut cases = vec![
            golden::Case::new("ruleset_draining", ruleset(&[], &ports()).to_json()),
            golden::Case::new("ruleset_draining_v4_only", ruleset(&[], &only4()).to_json()),
        ];
        for (name, d) in &sample {
            cases.push(golden::Case::new(
                format!("ruleset_{name}"),
                ruleset(std::slice::from_ref(d), &ports()).to_json(),
            ));
        }
        cases.push(golden::Case::new(
            "ruleset_no_cidr_v4_listeners_only",
            ruleset(&all[3..], &only4()).to_json(),
        ));
        cases.push(golden::Case::new(
            "ruleset_several",
            ruleset(&all, &ports()).to_json(),
        ));
        let before = ruleset(&all, &ports()).to_json();
        cases.push(
            golden::Case::new("refresh", refresh(&all[..3]).expect("diversions").to_json())
                .after(vec![before.clone()]),
        );
        cases.push(golden::Case::new("removal", removal().to_json()).after(vec![before]));
        cases
    }

    #[test]
    fn golden_payloads() {
        golden::check("proxy", &golden_cases());
    }

    /// Root only: the golden payloads and the built ones leave the same
    /// table in the kernel.
    #[test]
    fn golden_payloads_load_the_same_ruleset() {
        golden::check_kernel("proxy", &golden_cases());
    }

    #[test]
    fn no_diversions_refresh_nothing() {
        assert!(refresh(&[]).is_none());
    }

    #[test]
    fn draining_keeps_only_connection_rules() {
        let v = ruleset(&[], &ports()).to_json();
        let all = v.to_string();
        assert!(!all.contains("@l"), "no lease sets: {all}");
        assert_eq!(rules_in(&v, "output").len(), 3);
    }
}
