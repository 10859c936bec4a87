//! Synchronous route netlink (rtnetlink): one socket type, [`RtSocket`],
//! and what netfault asks of it: an interface's addresses, route and rule
//! summaries (for before/after comparisons), the policy routing that
//! delivers marked packets locally (transparent proxying), and tc's
//! `clsact` qdisc and `bpf` filters (list, add, delete).
//!
//! An [`RtSocket`] talks to the network namespace it was opened in, so open
//! it on a thread that has already entered the pod's netns
//! ([`crate::netns`]). Filters are attached by program fd in a
//! [`FilterSlot`] (priority and handle) chosen by the caller, which lets a
//! restarted agent atomically replace the previous agent's program
//! (`NLM_F_REPLACE`) and find its own filters again without aya's
//! per-process link tracking (docs/design.md, kernel facts: aya keys links by ifindex, which
//! is 2 in every pod).
//!
//! What it must not do: enter a netns, or know whose filters and programs
//! it handles (the eBPF crate owns its slot and its programs).

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::route::{RouteHeader, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const ETH_P_ALL: u16 = 0x0003;

#[derive(Debug, thiserror::Error)]
pub enum RtError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("{op}: {source}")]
    Kernel { op: &'static str, source: io::Error },
    #[error("{op}: malformed netlink reply: {detail}")]
    Decode { op: &'static str, detail: String },
}

impl RtError {
    /// The kernel's errno, when the kernel refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtError::Kernel { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Which clsact hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match self {
                Hook::Ingress => TcHandle::MIN_INGRESS,
                Hook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        }
    }
}

/// A qdisc as listed by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QdiscInfo {
    pub kind: String,
    pub handle: u32,
    pub parent: u32,
}

/// Where a filter sits on a clsact hook: its priority (low numbers run
/// first) and its handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterSlot {
    pub priority: u16,
    pub handle: u32,
}

/// A tc filter as listed by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterInfo {
    pub hook: Hook,
    pub kind: String,
    pub priority: u16,
    pub handle: u32,
    /// For `bpf` filters: the program's name and id.
    pub prog_name: Option<String>,
    pub prog_id: Option<u32>,
}

impl FilterInfo {
    /// Whether this is a `bpf` filter in `slot`.
    pub fn is_bpf_at(&self, slot: FilterSlot) -> bool {
        self.kind == "bpf" && self.priority == slot.priority && self.handle == slot.handle
    }
}

/// Policy routing that delivers packets marked `mark` locally, through
/// `lo`: `fwmark MARK lookup TABLE priority PRIORITY` plus `local default dev
/// lo table TABLE`, for IPv4 or IPv6.
#[derive(Debug, Clone, Copy)]
pub struct LocalDelivery {
    pub ipv6: bool,
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
    pub lo_index: u32,
}

/// A route netlink socket, bound to the netns of the thread that opened it.
pub struct RtSocket {
    sock: Socket,
    seq: u32,
}

fn handle_u32(h: TcHandle) -> u32 {
    ((h.major as u32) << 16) | h.minor as u32
}

impl RtSocket {
    /// Opens a route netlink socket in the calling thread's netns.
    pub fn open() -> Result<RtSocket, RtError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(RtError::Socket)?;
        sock.bind_auto().map_err(RtError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(RtError::Socket)?;
        Ok(RtSocket { sock, seq: 1 })
    }

    /// Sends one request and collects replies until ACK or DONE.
    fn request(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, RtError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(|source| RtError::Kernel { op, source })?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self
                .sock
                .recv_from_full()
                .map_err(|source| RtError::Kernel { op, source })?;
            let mut offset = 0;
            while offset < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| RtError::Decode {
                        op,
                        detail: e.to_string(),
                    })?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(RtError::Decode {
                        op,
                        detail: "zero-length message".into(),
                    });
                }
                offset += len;
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(RtError::Kernel {
                                op,
                                source: e.to_io(),
                            }),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
            // A non-dump request is answered by a single ACK message.
            if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                return Ok(out);
            }
        }
    }

    /// Every object of `msg`'s kind (`NLM_F_DUMP`).
    fn dump(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
    ) -> Result<Vec<RouteNetlinkMessage>, RtError> {
        self.request(op, msg, NLM_F_DUMP)
    }

    /// One line per object of a dump that `line` describes, sorted: for
    /// before/after comparisons.
    fn dump_lines(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        line: impl FnMut(RouteNetlinkMessage) -> Option<String>,
    ) -> Result<Vec<String>, RtError> {
        let mut out: Vec<String> = self.dump(op, msg)?.into_iter().filter_map(line).collect();
        out.sort();
        Ok(out)
    }

    /// Sends an acknowledged change (`flags` besides `NLM_F_ACK`), with the
    /// kernel's refusals in `tolerated` taken as success.
    fn change(
        &mut self,
        op: &'static str,
        msg: RouteNetlinkMessage,
        flags: u16,
        tolerated: &[i32],
    ) -> Result<(), RtError> {
        match self.request(op, msg, NLM_F_ACK | flags) {
            Err(e) if e.errno().is_some_and(|n| tolerated.contains(&n)) => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// Global-scope (not link-local) addresses on `ifindex`.
    pub fn addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>, RtError> {
        let replies = self.dump(
            "list addresses",
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewAddress(a) = m else {
                continue;
            };
            if a.header.index != ifindex || a.header.scope != AddressScope::Universe {
                continue;
            }
            for attr in &a.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    out.push(*ip);
                }
            }
        }
        Ok(out)
    }

    /// One line per route in every table, for before/after comparisons.
    pub fn route_summary(&mut self) -> Result<Vec<String>, RtError> {
        self.dump_lines(
            "list routes",
            RouteNetlinkMessage::GetRoute(RouteMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewRoute(r) => {
                    let attrs: Vec<String> = r
                        .attributes
                        .iter()
                        .filter(|a| {
                            matches!(
                                a,
                                RouteAttribute::Destination(_)
                                    | RouteAttribute::Gateway(_)
                                    | RouteAttribute::Oif(_)
                                    | RouteAttribute::Table(_)
                            )
                        })
                        .map(|a| format!("{a:?}"))
                        .collect();
                    Some(format!(
                        "{:?}/{} {:?} {:?} {}",
                        r.header.address_family,
                        r.header.destination_prefix_length,
                        r.header.kind,
                        r.header.scope,
                        attrs.join(" ")
                    ))
                }
                _ => None,
            },
        )
    }

    /// One line per policy routing rule, for before/after comparisons.
    pub fn rule_summary(&mut self) -> Result<Vec<String>, RtError> {
        self.dump_lines(
            "list rules",
            RouteNetlinkMessage::GetRule(RuleMessage::default()),
            |m| match m {
                RouteNetlinkMessage::NewRule(r) => {
                    Some(format!("{:?} {:?}", r.header, r.attributes))
                }
                _ => None,
            },
        )
    }

    /// Policy routing that delivers packets marked `mark` locally (through
    /// `lo`), whatever their destination: `ip rule add fwmark MARK lookup
    /// TABLE priority PRIORITY` and `ip route add local default dev lo
    /// table TABLE`, for IPv4 or IPv6. What transparent proxying needs
    /// (docs/design.md, kernel facts). Idempotent.
    pub fn add_local_delivery(&mut self, d: &LocalDelivery) -> Result<(), RtError> {
        let route = local_route(d.ipv6, d.table, d.lo_index);
        let rule = mark_rule(d.ipv6, d.mark, d.table, d.priority);
        for (op, msg) in [
            ("add a local route", RouteNetlinkMessage::NewRoute(route)),
            ("add a policy rule", RouteNetlinkMessage::NewRule(rule)),
        ] {
            self.change(op, msg, NLM_F_CREATE | NLM_F_EXCL, &[libc::EEXIST])?;
        }
        Ok(())
    }

    /// Removes what [`RtSocket::add_local_delivery`] added. Idempotent.
    pub fn del_local_delivery(&mut self, d: &LocalDelivery) -> Result<(), RtError> {
        // Already gone, or a netns without IPv6.
        let gone = [libc::ENOENT, libc::ESRCH, libc::EAFNOSUPPORT];
        let rule = mark_rule(d.ipv6, d.mark, d.table, d.priority);
        let route = local_route(d.ipv6, d.table, d.lo_index);
        for (op, msg) in [
            ("delete a policy rule", RouteNetlinkMessage::DelRule(rule)),
            ("delete a local route", RouteNetlinkMessage::DelRoute(route)),
        ] {
            self.change(op, msg, 0, &gone)?;
        }
        Ok(())
    }

    /// Lists the qdiscs on `ifindex`.
    pub fn qdiscs(&mut self, ifindex: u32) -> Result<Vec<QdiscInfo>, RtError> {
        let msg = TcMessage::default();
        let replies = self.dump("list qdiscs", RouteNetlinkMessage::GetQueueDiscipline(msg))?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) if q.header.index == ifindex as i32 => {
                    Some(QdiscInfo {
                        kind: kind_of(&q),
                        handle: handle_u32(q.header.handle),
                        parent: handle_u32(q.header.parent),
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Adds a clsact qdisc. Returns `false` if one was already there (then
    /// it is not ours to remove).
    pub fn add_clsact(&mut self, ifindex: u32) -> Result<bool, RtError> {
        let msg = clsact_message(ifindex);
        match self.change(
            "add clsact qdisc",
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            &[],
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the clsact qdisc (and with it every filter on it).
    /// Succeeds when there is none.
    pub fn del_clsact(&mut self, ifindex: u32) -> Result<(), RtError> {
        let msg = clsact_message(ifindex);
        self.change(
            "delete clsact qdisc",
            RouteNetlinkMessage::DelQueueDiscipline(msg),
            0,
            &[libc::ENOENT, libc::EINVAL],
        )
    }

    /// Lists the filters on one clsact hook. Empty when there is no clsact.
    pub fn filters(&mut self, ifindex: u32, hook: Hook) -> Result<Vec<FilterInfo>, RtError> {
        let mut msg = TcMessage::with_index(ifindex as i32);
        msg.header.parent = hook.parent();
        let replies = match self.dump(
            "list tc filters",
            RouteNetlinkMessage::GetTrafficFilter(msg),
        ) {
            Ok(r) => r,
            Err(e) if matches!(e.errno(), Some(libc::EINVAL) | Some(libc::ENOENT)) => {
                return Ok(Vec::new())
            }
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for m in replies {
            let RouteNetlinkMessage::NewTrafficFilter(f) = m else {
                continue;
            };
            // Each filter is reported once as a chain head (handle 0) too.
            let handle = handle_u32(f.header.handle);
            if handle == 0 {
                continue;
            }
            let mut prog_name = None;
            let mut prog_id = None;
            for a in &f.attributes {
                if let TcAttribute::Options(opts) = a {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                                prog_name = Some(n.clone())
                            }
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => prog_id = Some(*id),
                            _ => {}
                        }
                    }
                }
            }
            out.push(FilterInfo {
                hook,
                kind: kind_of(&f),
                priority: (f.header.info >> 16) as u16,
                handle,
                prog_name,
                prog_id,
            });
        }
        Ok(out)
    }

    /// Attaches (or atomically replaces) the direct-action bpf filter in
    /// `slot` of `hook`: program `prog_fd`, named `name`.
    pub fn attach_bpf(
        &mut self,
        ifindex: u32,
        hook: Hook,
        slot: FilterSlot,
        prog_fd: i32,
        name: &str,
    ) -> Result<(), RtError> {
        let mut msg = filter_message(ifindex, hook, slot);
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(prog_fd as u32)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(name.to_string())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.change(
            "attach bpf filter",
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_REPLACE,
            &[],
        )
    }

    /// Removes the bpf filter in `slot` of `hook`. Succeeds when it is absent.
    pub fn detach_bpf(
        &mut self,
        ifindex: u32,
        hook: Hook,
        slot: FilterSlot,
    ) -> Result<(), RtError> {
        let msg = filter_message(ifindex, hook, slot);
        self.change(
            "detach bpf filter",
            RouteNetlinkMessage::DelTrafficFilter(msg),
            0,
            &[libc::ENOENT, libc::EINVAL],
        )
    }
}

/// The clsact qdisc on `ifindex`.
fn clsact_message(ifindex: u32) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = TcHandle::CLSACT;
    msg.header.handle = TcHandle {
        major: TcHandle::CLSACT.major,
        minor: 0,
    };
    msg.attributes.push(TcAttribute::Kind("clsact".into()));
    msg
}

/// The bpf filter in `slot` on one hook of `ifindex` (options not set).
fn filter_message(ifindex: u32, hook: Hook, slot: FilterSlot) -> TcMessage {
    let mut msg = TcMessage::with_index(ifindex as i32);
    msg.header.parent = hook.parent();
    msg.header.handle = TcHandle::from(slot.handle);
    msg.header.info = ((slot.priority as u32) << 16) | ETH_P_ALL.to_be() as u32;
    msg.attributes.push(TcAttribute::Kind("bpf".into()));
    msg
}

fn kind_of(m: &TcMessage) -> String {
    m.attributes
        .iter()
        .find_map(|a| match a {
            TcAttribute::Kind(k) => Some(k.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn family(ipv6: bool) -> AddressFamily {
    if ipv6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    }
}

/// `local default dev lo table TABLE`.
fn local_route(ipv6: bool, table: u32, lo_index: u32) -> RouteMessage {
    let mut r = RouteMessage::default();
    r.header.address_family = family(ipv6);
    r.header.destination_prefix_length = 0;
    r.header.table = RouteHeader::RT_TABLE_UNSPEC;
    r.header.protocol = RouteProtocol::Static;
    r.header.scope = RouteScope::Host;
    r.header.kind = RouteType::Local;
    r.attributes.push(RouteAttribute::Table(table));
    r.attributes.push(RouteAttribute::Oif(lo_index));
    r
}

/// `fwmark MARK/0xffffffff lookup TABLE priority PRIORITY`.
fn mark_rule(ipv6: bool, mark: u32, table: u32, priority: u32) -> RuleMessage {
    let mut r = RuleMessage::default();
    r.header.family = family(ipv6);
    r.header.table = 0;
    r.header.action = RuleAction::ToTable;
    r.attributes.push(RuleAttribute::FwMark(mark));
    r.attributes.push(RuleAttribute::FwMask(u32::MAX));
    r.attributes.push(RuleAttribute::Table(table));
    r.attributes.push(RuleAttribute::Priority(priority));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_message_puts_the_slot_in_handle_and_info() {
        let slot = FilterSlot {
            priority: 0x4e46,
            handle: 0x4e46,
        };
        let msg = filter_message(2, Hook::Ingress, slot);
        assert_eq!(msg.header.index, 2);
        assert_eq!(handle_u32(msg.header.parent), 0xffff_fff2);
        assert_eq!(handle_u32(msg.header.handle), 0x4e46);
        // Priority in the high half, the protocol (ETH_P_ALL) in network
        // byte order in the low half.
        assert_eq!(
            msg.header.info,
            (0x4e46 << 16) | u32::from(ETH_P_ALL.to_be())
        );
        assert_eq!(kind_of(&msg), "bpf");
    }
}
