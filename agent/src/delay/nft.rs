//! The nft side of the delay engine: a `netfault` table (family inet) in the
//! pod netns that diverts a fault's packets to the engine's NFQUEUE.
//!
//! Layout of the table:
//! - one set `f<tag>` per fault, of type `nf_proto`, holding `ipv4` and
//!   `ipv6` with a `timeout` equal to the fault's remaining duration, in
//!   milliseconds (sent over netlink: nft's JSON only takes seconds). Every
//!   rule of the fault looks itself up in that set, so diversion stops at the
//!   deadline in the kernel even with the agent dead;
//! - base chains `egress` (hook postrouting) and `ingress` (hook prerouting),
//!   one rule per fault and port side, each ending in `goto divert`;
//! - a regular chain `divert` holding one rule: the xtables `NFQUEUE` target
//!   with `bypass` (no listener: packets pass undelayed).
//!
//! This kernel lacks `nft_queue` (`CONFIG_NFT_QUEUE`), so nft's own `queue`
//! statement cannot load. It has `nft_compat` and `xt_NFQUEUE`, which is what
//! iptables-nft uses. The nft binary cannot write an xtables expression, so
//! that one rule (and the set elements, for their millisecond timeouts) is
//! sent here as one raw nf_tables netlink batch; everything else goes
//! through the `nftables` crate (the `nft` binary, JSON).
//!
//! Every function with `_here` must run on a thread inside the pod netns
//! (`netns::run_in`): both the `nft` child process and the netlink socket
//! belong to the calling thread's netns.

use std::os::fd::AsRawFd;

use netfault_api::spec::{Direction, Match, Protocol};
use serde_json::{json, Value};

use super::DelayError;

pub const TABLE: &str = "netfault";
pub const FAMILY: &str = "inet";

/// What one fault diverts, and for how long the kernel keeps diverting.
#[derive(Debug, Clone)]
pub struct Diversion {
    pub tag: u32,
    pub direction: Direction,
    pub selector: Match,
    /// Remaining lifetime in milliseconds (at least 1).
    pub timeout_ms: u64,
}

fn set_name(tag: u32) -> String {
    format!("f{tag}")
}

fn m(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

/// The rules (expression lists) of one fault in one chain.
fn rules_for(d: &Diversion, egress: bool) -> Vec<Vec<Value>> {
    let mut base = vec![m(
        json!({"meta": {"key": "nfproto"}}),
        json!(format!("@{}", set_name(d.tag))),
    )];
    if let Some(net) = d.selector.cidr {
        let (proto, addr) = match net {
            ipnet::IpNet::V4(n) => ("ip", n.network().to_string()),
            ipnet::IpNet::V6(n) => ("ip6", n.network().to_string()),
        };
        let field = if egress { "daddr" } else { "saddr" };
        base.push(m(
            json!({"payload": {"protocol": proto, "field": field}}),
            json!({"prefix": {"addr": addr, "len": net.prefix_len()}}),
        ));
    }
    let l4 = json!({"meta": {"key": "l4proto"}});
    match d.selector.protocol() {
        Protocol::Any if !d.selector.ports.is_empty() => {
            base.push(m(l4, json!({"set": ["tcp", "udp"]})))
        }
        Protocol::Any => {}
        Protocol::Tcp => base.push(m(l4, json!("tcp"))),
        Protocol::Udp => base.push(m(l4, json!("udp"))),
        Protocol::Icmp => base.push(m(l4, json!({"set": ["icmp", "ipv6-icmp"]}))),
    }
    let goto = json!({"goto": {"target": "divert"}});
    if d.selector.ports.is_empty() {
        base.push(goto);
        return vec![base];
    }
    let ports: Vec<Value> = d
        .selector
        .ports
        .iter()
        .map(|p| {
            if p.lo == p.hi {
                json!(p.lo)
            } else {
                json!({"range": [p.lo, p.hi]})
            }
        })
        .collect();
    ["sport", "dport"]
        .iter()
        .map(|side| {
            let mut r = base.clone();
            r.push(m(
                json!({"payload": {"protocol": "th", "field": side}}),
                json!({"set": ports}),
            ));
            r.push(goto.clone());
            r
        })
        .collect()
}

/// One nft transaction that replaces the whole table with `diversions`
/// (without the set elements and the queue rule, which [`commit_here`] adds).
pub fn ruleset(diversions: &[Diversion]) -> Value {
    let t = json!({"family": FAMILY, "name": TABLE});
    let mut cmds = vec![
        // add + delete: removes the table whether or not it exists.
        json!({"add": {"table": t}}),
        json!({"delete": {"table": t}}),
        json!({"add": {"table": t}}),
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "divert"}}}),
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "egress",
            "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}}}),
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": "ingress",
            "type": "filter", "hook": "prerouting", "prio": 0, "policy": "accept"}}}),
        // Packets the engine re-sends after their delay must not be diverted again.
        json!({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": "egress",
            "expr": [m(json!({"meta": {"key": "mark"}}), json!(crate::delay::REINJECT_MARK)),
                     json!({"accept": null})]}}}),
    ];
    for d in diversions {
        cmds.push(json!({"add": {"set": {"family": FAMILY, "table": TABLE,
            "name": set_name(d.tag), "type": "nf_proto", "flags": ["timeout"]}}}));
        for (egress, chain) in [(true, "egress"), (false, "ingress")] {
            let wanted = if egress {
                d.direction.includes_egress()
            } else {
                d.direction.includes_ingress()
            };
            if !wanted {
                continue;
            }
            for expr in rules_for(d, egress) {
                cmds.push(json!({"add": {"rule": {"family": FAMILY, "table": TABLE,
                    "chain": chain, "expr": expr}}}));
            }
        }
    }
    json!({"nftables": cmds})
}

fn nft(payload: &Value) -> Result<(), DelayError> {
    let text = payload.to_string();
    nftables::helper::apply_ruleset_raw(
        &text,
        nftables::helper::DEFAULT_NFT,
        nftables::helper::DEFAULT_ARGS,
    )
    .map(|_| ())
    .map_err(|e| DelayError::Nft(e.to_string()))
}

/// Installs (or replaces) the table for `diversions`, diverting to `queue`.
pub fn apply_here(diversions: &[Diversion], queue: u16) -> Result<(), DelayError> {
    nft(&ruleset(diversions))?;
    if let Err(e) = commit_here(diversions, queue) {
        let _ = remove_here();
        return Err(e);
    }
    Ok(())
}

/// Removes the table if it exists.
pub fn remove_here() -> Result<(), DelayError> {
    let t = json!({"family": FAMILY, "name": TABLE});
    nft(&json!({"nftables": [{"add": {"table": t}}, {"delete": {"table": t}}]}))
}

// ----- the xt NFQUEUE rule, over nf_tables netlink -----

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFPROTO_INET: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_TARGET_REV: u16 = 2;
const NFTA_TARGET_INFO: u16 = 3;
/// `xt_NFQ_info_v3.flags`: pass packets when nobody listens.
const NFQ_FLAG_BYPASS: u16 = 1;

/// A netlink message under construction.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        // struct nfgenmsg
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    fn end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One nf_tables batch: every fault's set elements (`ipv4`, `ipv6`, with
/// the fault's remaining time as a millisecond timeout), then the single
/// rule of chain `divert`: `xt target NFQUEUE --queue-num N --queue-bypass`.
pub fn commit_here(diversions: &[Diversion], queue: u16) -> Result<(), DelayError> {
    let nl = |what: &str, e: std::io::Error| DelayError::Netlink(format!("{what}: {e}"));
    let fd = super::queue::netfilter_socket().map_err(|e| nl("netfilter netlink socket", e))?;
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: valid fd, pointer and size of a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }

    let req = libc::NLM_F_REQUEST as u16;
    let create = libc::NLM_F_CREATE as u16;
    let mut out = Msg::new(NFNL_MSG_BATCH_BEGIN, req, 1, 0, NFNL_SUBSYS_NFTABLES).finish();
    let mut seq = 1u32;
    for d in diversions {
        seq += 1;
        let mut m = Msg::new(
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
            req | create,
            seq,
            NFPROTO_INET,
            0,
        );
        m.str(NFTA_SET_ELEM_LIST_TABLE, TABLE);
        m.str(NFTA_SET_ELEM_LIST_SET, &set_name(d.tag));
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
        for key in [NFPROTO_IPV4, NFPROTO_IPV6] {
            m.begin(NFTA_LIST_ELEM);
            m.begin(NFTA_SET_ELEM_KEY);
            m.attr(NFTA_DATA_VALUE, &[key]);
            m.end();
            m.attr(NFTA_SET_ELEM_TIMEOUT, &d.timeout_ms.max(1).to_be_bytes());
            m.end();
        }
        m.end();
        out.extend(m.finish());
    }
    seq += 1;
    let last = seq;
    let mut rule = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
        req | create | (libc::NLM_F_APPEND | libc::NLM_F_ACK) as u16,
        last,
        NFPROTO_INET,
        0,
    );
    rule.str(NFTA_RULE_TABLE, TABLE);
    rule.str(NFTA_RULE_CHAIN, "divert");
    rule.begin(NFTA_RULE_EXPRESSIONS);
    rule.begin(NFTA_LIST_ELEM);
    rule.str(NFTA_EXPR_NAME, "target");
    rule.begin(NFTA_EXPR_DATA);
    rule.str(NFTA_TARGET_NAME, "NFQUEUE");
    rule.attr(NFTA_TARGET_REV, &3u32.to_be_bytes());
    // struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; },
    // padded to XT_ALIGN (8).
    let mut info = Vec::with_capacity(8);
    info.extend_from_slice(&queue.to_ne_bytes());
    info.extend_from_slice(&1u16.to_ne_bytes());
    info.extend_from_slice(&NFQ_FLAG_BYPASS.to_ne_bytes());
    info.extend_from_slice(&[0, 0]);
    rule.attr(NFTA_TARGET_INFO, &info);
    rule.end();
    rule.end();
    rule.end();
    out.extend(rule.finish());
    out.extend(Msg::new(NFNL_MSG_BATCH_END, req, last + 1, 0, NFNL_SUBSYS_NFTABLES).finish());

    // SAFETY: a zeroed sockaddr_nl addresses the kernel.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: valid fd, buffer and address.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            out.as_ptr() as *const libc::c_void,
            out.len(),
            0,
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(nl(
            "sending the NFQUEUE rule",
            std::io::Error::last_os_error(),
        ));
    }
    let mut buf = vec![0u8; 8192];
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(nl(
                "waiting for the NFQUEUE rule's ack",
                std::io::Error::last_os_error(),
            ));
        }
        let mut off = 0usize;
        let n = n as usize;
        while off + 16 <= n {
            let len =
                u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
            let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
            let seq =
                u32::from_ne_bytes([buf[off + 8], buf[off + 9], buf[off + 10], buf[off + 11]]);
            if len < 16 || off + len > n {
                break;
            }
            if ty == libc::NLMSG_ERROR as u16 && len >= 20 {
                let errno = i32::from_ne_bytes([
                    buf[off + 16],
                    buf[off + 17],
                    buf[off + 18],
                    buf[off + 19],
                ]);
                if errno != 0 {
                    let what = if seq == last {
                        "the NFQUEUE rule (xt_NFQUEUE through nft_compat)"
                    } else {
                        "a fault's set elements"
                    };
                    return Err(DelayError::Netlink(format!(
                        "the kernel refused {what}: {}",
                        std::io::Error::from_raw_os_error(-errno)
                    )));
                }
                if seq == last {
                    return Ok(());
                }
            }
            off += (len + 3) & !3;
        }
    }
}
