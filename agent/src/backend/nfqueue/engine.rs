//! The delay engine's packet loop: one OS thread per sandbox holds the
//! packets its NFQUEUE hands over and issues ACCEPT verdicts at their
//! release times.
//!
//! Egress packets are not held in the kernel: a packet held at postrouting
//! still counts against its TCP socket (TCP small queues, docs/design.md, kernel facts), which
//! capped one flow through a 50 ms delay at about 1 Mbit/s. The engine copies
//! each delayed egress packet, drops the original at once (freeing the
//! socket's budget; TCP is not told) and re-sends the copy at its release time
//! from a raw socket in the pod netns, marked so it is not diverted again.
//!
//! Timing: the thread sets its timer slack to 1 ns (`PR_SET_TIMERSLACK`) and
//! waits in `ppoll` on the queue socket with a nanosecond timeout: it wakes
//! when a packet arrives or at the next release time, whichever is first.
//! Verdicts due together go out in one send. The thread stays a normal
//! SCHED_OTHER thread: real-time priority could starve pod workloads on a
//! small node, and the short wake-up steps give the precision without it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netfault_api::action::{DnsAction, DnsFault};
use netfault_api::spec::{dns_ports, Direction, Match, Protocol};
use netfault_api::DelayAction;
use netfault_dns::{Event, NotHandled, Outcome, Query, Transport};
use netfault_sys::netns::InNetns;

use super::dist::{Correlated, DelaySampler};
use super::error::DelayError;
use super::queue::NfQueue;

/// `SO_MARK` of the engine's re-sent egress packets; the egress chain lets
/// them through undiverted.
pub const REINJECT_MARK: u32 = 0x4e46_0001;

/// Raw sockets in the pod netns that re-send delayed egress packets.
pub struct Reinjector {
    v4: std::os::fd::OwnedFd,
    v6: std::os::fd::OwnedFd,
}

impl Reinjector {
    /// Opens the sockets in the pod's netns (which they keep), marked with `mark`.
    pub fn open_here(_inside: &InNetns, mark: u32) -> Result<Reinjector, DelayError> {
        use socket2::{Domain, Protocol, Socket, Type};
        let open = |domain: Domain| -> Result<std::os::fd::OwnedFd, DelayError> {
            // IPPROTO_RAW: the packet is sent as it is, headers included.
            let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
                .map_err(|e| {
                    DelayError::Queue(format!("raw socket for re-sending delayed packets: {e}"))
                })?;
            s.set_mark(mark)
                .map_err(|e| DelayError::Queue(format!("SO_MARK on the re-send socket: {e}")))?;
            Ok(s.into())
        };
        Ok(Reinjector {
            v4: open(Domain::IPV4)?,
            v6: open(Domain::IPV6)?,
        })
    }

    /// The two sockets (IPv4, IPv6), to hand to a holder process.
    pub fn into_fds(self) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        (self.v4, self.v6)
    }

    /// Sockets opened by [`Reinjector::open_here`] in another process.
    pub fn from_fds(v4: std::os::fd::OwnedFd, v6: std::os::fd::OwnedFd) -> Reinjector {
        Reinjector { v4, v6 }
    }

    /// Sends whole IP packets as they are, each family's in as few
    /// `sendmmsg` calls as it takes: a packet per call made the engine
    /// thread give up its CPU after nearly every re-send (the receiver it
    /// woke preempted it on the way back from the syscall), which made the
    /// packets behind it late at high rates. `report` gets each packet
    /// that could not be sent.
    fn send_all(&self, pkts: &[Vec<u8>], mut report: impl FnMut(std::io::Error)) {
        let mut v4: Vec<(&[u8], socket2::SockAddr)> = Vec::new();
        let mut v6: Vec<(&[u8], socket2::SockAddr)> = Vec::new();
        for pkt in pkts {
            match destination(pkt) {
                Some(to @ std::net::SocketAddr::V4(_)) => v4.push((pkt, to.into())),
                Some(to) => v6.push((pkt, to.into())),
                None => report(std::io::Error::other("not an IP packet")),
            }
        }
        for (fd, batch) in [(&self.v4, &v4), (&self.v6, &v6)] {
            send_batch(fd, batch, &mut report);
        }
    }
}

/// Where a whole IP packet goes (its destination address, port 0).
fn destination(pkt: &[u8]) -> Option<std::net::SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            Some(SocketAddr::from((dst, 0)))
        }
        Some(6) if pkt.len() >= 40 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&pkt[24..40]);
            Some(SocketAddr::from((Ipv6Addr::from(octets), 0)))
        }
        _ => None,
    }
}

/// Most messages per `sendmmsg` call (the kernel's UIO_MAXIOV bound).
const SEND_BATCH: usize = 1024;

/// Sends `batch` on the raw socket `fd` with `sendmmsg`; a packet the
/// kernel refuses is reported and skipped, the rest still go.
fn send_batch(
    fd: &OwnedFd,
    batch: &[(&[u8], socket2::SockAddr)],
    report: &mut impl FnMut(std::io::Error),
) {
    let mut start = 0;
    while start < batch.len() {
        let chunk = &batch[start..batch.len().min(start + SEND_BATCH)];
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(p, _)| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = chunk
            .iter()
            .zip(iovs.iter_mut())
            .map(|((_, to), iov)| {
                // SAFETY: an all-zero msghdr is valid (no name, no control).
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = to.len();
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `msgs` points at `iovs` and at the addresses in `batch`,
        // all alive and unmoved for the call; the kernel reads them and
        // writes only `msg_len`.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The first message failed: skip it, send the rest.
            report(e);
            start += 1;
        } else {
            start += (n as usize).max(1);
        }
    }
}

/// True when `p` holds a whole IPv4/IPv6 packet (not truncated by the copy range).
fn is_whole_packet(p: &[u8]) -> bool {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => usize::from(u16::from_be_bytes([p[2], p[3]])) == p.len(),
        Some(6) if p.len() >= 40 => usize::from(u16::from_be_bytes([p[4], p[5]])) + 40 == p.len(),
        _ => false,
    }
}

/// What the engine holds until a release time.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Held {
    /// A packet the kernel holds: ACCEPT it.
    Verdict(u32),
    /// A copy of an egress packet whose original was dropped: re-send it.
    Copy(Vec<u8>),
}

pub use super::counters::FaultCounters;

#[derive(Debug)]
pub enum Kind {
    /// A `dns-*` fault on the pod's UDP queries (the DNS engine's): the
    /// plan's selector holds the fault's CIDR and its DNS ports, which are
    /// matched against the query's destination.
    Dns(DnsAction),
    Delay {
        sampler: DelaySampler,
        percent: f64,
        pick: Correlated,
    },
    Reorder {
        percent: f64,
        gap: u32,
        latency: Option<Duration>,
        rnd: Correlated,
        counter: u32,
    },
}

/// One fault as the engine applies it.
#[derive(Debug)]
pub struct Plan {
    pub direction: Direction,
    pub selector: Match,
    pub kind: Kind,
    pub deadline: Instant,
    pub counters: Arc<FaultCounters>,
}

/// What the engine needs from a packet's headers.
#[derive(Debug, PartialEq)]
pub struct PacketInfo {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ports: Option<(u16, u16)>,
}

/// Parses the IPv4 or IPv6 header (and the TCP/UDP ports) of a queued packet.
pub fn parse(p: &[u8]) -> Option<PacketInfo> {
    let version = p.first()? >> 4;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, Option<&[u8]>) = match version {
        4 if p.len() >= 20 => {
            let ihl = ((p[0] & 0x0f) as usize) * 4;
            let frag_off = u16::from_be_bytes([p[6], p[7]]) & 0x1fff;
            let src: [u8; 4] = p[12..16].try_into().ok()?;
            let dst: [u8; 4] = p[16..20].try_into().ok()?;
            let l4 = if frag_off == 0 { p.get(ihl..) } else { None };
            (src.into(), dst.into(), p[9], l4)
        }
        6 if p.len() >= 40 => {
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            let (proto, l4) = skip_ipv6_extensions(p[6], p.get(40..)?);
            (src.into(), dst.into(), proto, l4)
        }
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(l4)) if l4.len() >= 4 => Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )),
        _ => None,
    };
    Some(PacketInfo {
        src,
        dst,
        proto,
        ports,
    })
}

/// Walks IPv6 extension headers (hop-by-hop, routing, fragment,
/// destination options, AH) to the upper-layer protocol, as nft's `meta
/// l4proto` and `th dport` do. Returns the protocol and its header, or
/// no header for a non-first fragment (its ports are not in it).
fn skip_ipv6_extensions(mut next: u8, mut rest: &[u8]) -> (u8, Option<&[u8]>) {
    for _ in 0..8 {
        let len = match next {
            0 | 43 | 60 => rest.get(1).map(|l| (usize::from(*l) + 1) * 8),
            51 => rest.get(1).map(|l| (usize::from(*l) + 2) * 4),
            44 => {
                let Some(f) = rest.get(..8) else {
                    return (next, None);
                };
                if u16::from_be_bytes([f[2], f[3]]) >> 3 != 0 {
                    return (f[0], None);
                }
                Some(8)
            }
            _ => return (next, Some(rest)),
        };
        let Some(len) = len else {
            return (next, None);
        };
        let Some(after) = rest.get(len..) else {
            return (next, None);
        };
        next = rest[0];
        rest = after;
    }
    (next, None)
}

/// Whether a packet seen on `egress` (or ingress) matches a fault.
pub fn matches(direction: Direction, sel: &Match, egress: bool, p: &PacketInfo) -> bool {
    if egress && !direction.includes_egress() || !egress && !direction.includes_ingress() {
        return false;
    }
    let peer = if egress { p.dst } else { p.src };
    if let Some(net) = sel.cidr {
        if !net.contains(&peer) {
            return false;
        }
    }
    let proto_ok = match sel.protocol() {
        Protocol::Any => true,
        Protocol::Tcp => p.proto == 6,
        Protocol::Udp => p.proto == 17,
        Protocol::Icmp => p.proto == 1 || p.proto == 58,
    };
    if !proto_ok {
        return false;
    }
    if sel.ports.is_empty() {
        return true;
    }
    match p.ports {
        Some((s, d)) => sel
            .ports
            .iter()
            .any(|r| (r.lo..=r.hi).contains(&s) || (r.lo..=r.hi).contains(&d)),
        None => false,
    }
}

/// How long to hold a packet, applying every matching fault (netem's
/// composition: delays add up; a reordered packet skips every delay).
pub fn decide(plans: &mut [Plan], egress: bool, info: &PacketInfo, now: Instant) -> Duration {
    let mut delay_ns: u64 = 0;
    let mut delayed = false;
    let mut reorder_latency: Option<Duration> = None;
    let mut reordered = false;
    for plan in plans.iter_mut() {
        if matches!(plan.kind, Kind::Dns(_))
            || plan.deadline <= now
            || !matches(plan.direction, &plan.selector, egress, info)
        {
            continue;
        }
        plan.counters.add_matched();
        match &mut plan.kind {
            Kind::Dns(_) => {}
            Kind::Delay {
                sampler,
                percent,
                pick,
            } => {
                if pick.chance(*percent) {
                    delay_ns = delay_ns.saturating_add(sampler.sample_ns());
                    delayed = true;
                    plan.counters.add_affected();
                }
            }
            Kind::Reorder {
                percent,
                gap,
                latency,
                rnd,
                counter,
            } => {
                if reordered {
                    continue;
                }
                let gap = (*gap).max(1);
                if *counter + 1 < gap || !rnd.chance(*percent) {
                    *counter += 1;
                    if reorder_latency.is_none() {
                        reorder_latency = *latency;
                    }
                } else {
                    *counter = 0;
                    reordered = true;
                    plan.counters.add_affected();
                }
            }
        }
    }
    if reordered {
        return Duration::ZERO;
    }
    if delayed {
        return Duration::from_nanos(delay_ns);
    }
    reorder_latency.unwrap_or_default()
}

/// What the DNS faults do with one egress packet.
#[derive(Debug, PartialEq)]
pub enum DnsStep {
    /// Not a query any DNS fault acts on: on to the delay faults.
    Pass,
    /// Forward the query this much later.
    Hold(Duration),
    /// No answer.
    Drop,
    /// Drop the query and send `reply` (a whole IP packet to the client)
    /// `after` from now.
    Answer { reply: Vec<u8>, after: Duration },
}

/// Whether a DNS plan diverts a UDP query to `dst`:`dport`.
fn dns_selects(plan: &Plan, dst: IpAddr, dport: u16) -> bool {
    plan.selector.cidr.is_none_or(|net| net.contains(&dst))
        && plan
            .selector
            .ports
            .iter()
            .any(|r| (r.lo..=r.hi).contains(&dport))
}

/// Applies the DNS plans to an egress packet (`packet`, parsed as `info`):
/// a UDP query to one of a live plan's ports is parsed and decided by
/// `netfault_dns`, counting on each plan's counters. Anything else, and
/// anything that is not a well-formed query, passes (malformed messages
/// are counted, see `counters::dns_malformed`).
pub fn dns_step(plans: &[Plan], info: &PacketInfo, packet: &[u8], now: Instant) -> DnsStep {
    let dport = match info.ports {
        Some((_, d)) if info.proto == 17 => d,
        _ => return DnsStep::Pass,
    };
    let live = |p: &&Plan| p.deadline > now && dns_selects(p, info.dst, dport);
    if !plans
        .iter()
        .any(|p| matches!(p.kind, Kind::Dns(_)) && live(&p))
    {
        return DnsStep::Pass;
    }
    let Some(payload) = netfault_dns::udp_payload(packet) else {
        return DnsStep::Pass;
    };
    let query = match Query::parse(payload) {
        Ok(q) => q,
        Err(NotHandled::Malformed(_)) => {
            super::counters::add_dns_malformed();
            return DnsStep::Pass;
        }
        Err(NotHandled::NotAQuery) => return DnsStep::Pass,
    };
    let selected: Vec<(&DnsAction, &FaultCounters)> = plans
        .iter()
        .filter(live)
        .filter_map(|p| match &p.kind {
            Kind::Dns(a) => Some((a, &*p.counters)),
            _ => None,
        })
        .collect();
    let verdict = netfault_dns::decide(
        selected.iter().map(|(a, _)| *a),
        &query,
        Transport::Udp,
        |i, event| {
            if let Some((action, c)) = selected.get(i) {
                match event {
                    Event::Matched => c.add_matched(),
                    Event::Affected => {
                        c.add_affected();
                        if action.fault == DnsFault::Drop {
                            c.add_dropped();
                        }
                    }
                }
            }
        },
    );
    match verdict.outcome {
        Outcome::Pass if verdict.delay.is_zero() => DnsStep::Pass,
        Outcome::Pass => DnsStep::Hold(verdict.delay),
        Outcome::Drop => DnsStep::Drop,
        Outcome::Answer(msg) => match netfault_dns::udp_reply(packet, &msg) {
            Some(reply) => DnsStep::Answer {
                reply,
                after: verdict.delay,
            },
            None => DnsStep::Pass,
        },
    }
}

/// The DNS engine's view of a `dns-*` fault: UDP queries from the pod to
/// `selector.cidr` on the fault's DNS ports (53 unless `match.ports`).
pub fn dns_plan(
    selector: &Match,
    action: &DnsAction,
    deadline: Instant,
    counters: Arc<FaultCounters>,
) -> Plan {
    Plan {
        direction: Direction::Egress,
        selector: Match {
            cidr: selector.cidr,
            protocol: Some(Protocol::Udp),
            ports: dns_ports(selector),
        },
        kind: Kind::Dns(action.clone()),
        deadline,
        counters,
    }
}

/// What the packet loop shares with the thread that receives plans.
#[derive(Default)]
pub(crate) struct Shared {
    plans: Mutex<Vec<Plan>>,
    stop: AtomicBool,
    /// Set before `stop` by a hand-over to a new agent: what is held is
    /// still released at its time, not at once (see [`Shared::drain`]).
    drain: AtomicBool,
    /// An eventfd the packet loop polls beside its queue: [`Shared::stop`]
    /// writes it, so the loop ends at once rather than at its next check.
    wake: Option<OwnedFd>,
}

impl Shared {
    /// With a wake-up eventfd (see the field); without one where the
    /// kernel refuses it (the loop then sees `stop` within STOP_CHECK).
    pub(crate) fn with_wake() -> Shared {
        // SAFETY: eventfd takes integer arguments and returns a new
        // descriptor (or -1) that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        Shared {
            // SAFETY: `fd` is a fresh descriptor owned by no one else.
            wake: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }),
            ..Shared::default()
        }
    }

    pub(crate) fn set_plans(&self, plans: Vec<Plan>) {
        *self.plans.lock().unwrap_or_else(|p| p.into_inner()) = plans;
    }

    /// Makes `run` release every held packet at once and return (or, after
    /// [`Shared::drain`], at its time).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(fd) = &self.wake {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our eventfd; a
            // full counter (EAGAIN) already wakes the loop.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }

    /// A new agent has switched the diversion to its own queue: nothing new
    /// comes here, and at `stop` the packets held are released at their
    /// release times (none early, none lost) before `run` returns.
    pub(crate) fn drain(&self) {
        self.drain.store(true, Ordering::Release);
    }
}

/// The engine's view of one fault: `action` on the packets `selector`
/// matches in `direction` (see `holder`, which builds it from the agent's
/// control line).
pub fn plan_for(
    direction: Direction,
    selector: &Match,
    action: &DelayAction,
    deadline: Instant,
    counters: Arc<FaultCounters>,
) -> Plan {
    let kind = match action {
        DelayAction::Delay {
            latency,
            jitter,
            correlation,
            distribution,
            percent,
        } => Kind::Delay {
            sampler: DelaySampler::new(
                latency.as_nanos() as f64,
                jitter.as_nanos() as f64,
                *correlation,
                *distribution,
            ),
            percent: *percent,
            pick: Correlated::new(0.0),
        },
        DelayAction::Reorder {
            percent,
            correlation,
            gap,
            latency,
        } => Kind::Reorder {
            percent: *percent,
            gap: *gap,
            latency: *latency,
            rnd: Correlated::new(*correlation),
            counter: 0,
        },
    };
    Plan {
        direction,
        selector: selector.clone(),
        kind,
        deadline,
        counters,
    }
}

fn set_timer_slack() {
    // SAFETY: prctl with integer arguments only affects this thread.
    let r = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if r != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "PR_SET_TIMERSLACK failed; delays may be up to 50 µs late"
        );
    }
}

/// Longest wait between checks of the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(20);
/// Longest wait in the last EARLY_WAKE before a release (see `run`).
const ACTIVE_TICK: Duration = Duration::from_micros(100);
const EARLY_WAKE: Duration = Duration::from_micros(300);
/// How long after a packet the loop keeps waking every ACTIVE_TICK.
const WARM: Duration = Duration::from_millis(5);

/// What the engine thread holds between turns of its loop.
#[derive(Default)]
struct Holding {
    /// (release time, arrival order, what is held): a min-heap by release
    /// time, FIFO among equal times.
    heap: BinaryHeap<Reverse<(Instant, u64, Held)>>,
    seq: u64,
    errors: u64,
    overflows: u64,
    /// This turn's verdicts: accept now, drop (copied for a re-send), and
    /// the copies due for re-sending.
    now_ids: Vec<u32>,
    drop_ids: Vec<u32>,
    resend: Vec<Vec<u8>>,
    /// When the queue last handed over a packet.
    last_packet: Option<Instant>,
}

impl Holding {
    fn report(&mut self, what: &str, e: std::io::Error) {
        self.errors += 1;
        if self.errors.is_power_of_two() {
            tracing::warn!(error = %e, count = self.errors, "NFQUEUE {what} failed");
        }
    }

    /// Takes what the queue has: a packet no plan delays (or any, when
    /// stopping) is accepted this turn; the others are held, egress ones
    /// as a copy (the original is dropped), ingress ones by the kernel.
    fn take_in(&mut self, queue: &mut NfQueue, shared: &Shared, stopping: bool) {
        self.now_ids.clear();
        self.drop_ids.clear();
        self.resend.clear();
        let (heap, seq, now_ids, drop_ids) = (
            &mut self.heap,
            &mut self.seq,
            &mut self.now_ids,
            &mut self.drop_ids,
        );
        let seq_before = *seq;
        let drained = {
            let mut plans = shared.plans.lock().unwrap_or_else(|p| p.into_inner());
            queue.drain(|id, hook, payload| {
                let now = Instant::now();
                // Hook 0 is prerouting (ingress); output/postrouting are egress.
                let egress = hook != 0;
                let hold = match parse(payload) {
                    Some(info) if !stopping => {
                        let dns = if egress {
                            dns_step(&plans, &info, payload, now)
                        } else {
                            DnsStep::Pass
                        };
                        match dns {
                            DnsStep::Pass => decide(&mut plans, egress, &info, now),
                            DnsStep::Hold(d) => d + decide(&mut plans, egress, &info, now),
                            DnsStep::Drop => {
                                drop_ids.push(id);
                                return;
                            }
                            DnsStep::Answer { reply, after } => {
                                // The query goes no further; the answer is
                                // re-sent like a delayed copy (at once when
                                // `after` is zero, in this turn's release).
                                drop_ids.push(id);
                                *seq += 1;
                                heap.push(Reverse((now + after, *seq, Held::Copy(reply))));
                                return;
                            }
                        }
                    }
                    _ => Duration::ZERO,
                };
                if hold.is_zero() {
                    now_ids.push(id);
                } else {
                    *seq += 1;
                    // hook 0 is prerouting: ingress packets are held by the kernel.
                    let held = if hook != 0 && is_whole_packet(payload) {
                        drop_ids.push(id);
                        Held::Copy(payload.to_vec())
                    } else {
                        Held::Verdict(id)
                    };
                    heap.push(Reverse((now + hold, *seq, held)));
                }
            })
        };
        if !self.now_ids.is_empty() || !self.drop_ids.is_empty() || self.seq != seq_before {
            self.last_packet = Some(Instant::now());
        }
        if let Err(e) = drained {
            self.report("receive", e);
        }
        if queue.overflows() > self.overflows {
            let new = queue.overflows() - self.overflows;
            self.overflows = queue.overflows();
            super::counters::add_overflows(new);
            tracing::warn!(
                total = self.overflows,
                "NFQUEUE receive buffer overflowed: packets passed undelayed"
            );
        }
    }

    /// Issues this turn's verdicts and re-sends: the copied packets'
    /// drops, then everything due (everything, when stopping).
    fn release(&mut self, queue: &mut NfQueue, reinjector: &Reinjector, stopping: bool) {
        if !self.drop_ids.is_empty() {
            if let Err(e) = queue.drop_packets(&self.drop_ids) {
                self.report("verdict", e);
            }
        }
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.heap.peek() {
            if *at > now && !stopping {
                break;
            }
            match self.heap.pop() {
                Some(Reverse((_, _, Held::Verdict(id)))) => self.now_ids.push(id),
                Some(Reverse((_, _, Held::Copy(pkt)))) => self.resend.push(pkt),
                None => break,
            }
        }
        if !self.now_ids.is_empty() {
            if let Err(e) = queue.accept(&self.now_ids) {
                self.report("verdict", e);
            }
        }
        // Taken out for the call (`report` needs `self`), kept for reuse.
        let resend = std::mem::take(&mut self.resend);
        if !resend.is_empty() {
            reinjector.send_all(&resend, |e| self.report("re-send", e));
        }
        self.resend = resend;
        self.resend.clear();
    }

    /// How long to sleep: until shortly before the next release, then in
    /// steps of at most ACTIVE_TICK. On a VM an idle vCPU is descheduled by
    /// the host, and waking it for a timer can take milliseconds; a vCPU
    /// that woke recently wakes fast. With nothing held, until a packet
    /// comes (or the stop flag is due a check).
    fn next_wait(&self) -> Duration {
        match self.heap.peek() {
            // Traffic flowing: stay on short steps, so the next packet finds
            // a vCPU that woke recently (a pass-through verdict then costs
            // tens of microseconds less).
            None if self.last_packet.is_some_and(|t| t.elapsed() < WARM) => ACTIVE_TICK,
            None => STOP_CHECK,
            Some(Reverse((at, _, _))) => {
                let left = at.saturating_duration_since(Instant::now());
                if left > EARLY_WAKE {
                    (left - EARLY_WAKE).min(STOP_CHECK)
                } else {
                    left.min(ACTIVE_TICK)
                }
            }
        }
    }
}

pub(crate) fn run(queue: &mut NfQueue, reinjector: &Reinjector, shared: &Shared) {
    let wake = shared.wake.as_ref().map(|fd| fd.as_fd());
    set_timer_slack();
    let mut h = Holding::default();
    let mut closing = false;
    loop {
        let stopping = shared.stop.load(Ordering::Acquire);
        if stopping && !closing {
            // Hand-over without loss: with a maximum length of 0 the
            // fail-open queue passes every new packet in the kernel; what
            // was queued before is drained and released below. Closing the
            // socket with packets still queued would drop them.
            closing = true;
            if let Err(e) = queue.set_maxlen(0) {
                h.report("closing", e);
            }
        }
        h.take_in(queue, shared, stopping);
        let draining = stopping && shared.drain.load(Ordering::Acquire);
        h.release(queue, reinjector, stopping && !draining);
        if draining && !h.heap.is_empty() {
            // Held packets go out at their times; new ones pass (maxlen 0).
        } else if stopping {
            // The kernel queues a packet to the socket under the queue's
            // lock, which the length change takes too: once it returned,
            // what was queued is in the socket. A short wait for quiet
            // still catches a packet another CPU was handing over.
            match queue.wait(Duration::from_millis(1), None) {
                Ok(true) => continue,
                _ => return,
            }
        }
        let wait = h.next_wait();
        if !wait.is_zero() {
            if let Err(e) = queue.wait(wait, wake) {
                h.report("poll", e);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv6_with(next: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = next;
        p[8..24].copy_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(ext);
        p.extend_from_slice(l4);
        let plen = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&plen.to_be_bytes());
        p
    }

    #[test]
    fn ports_behind_ipv6_extension_headers() {
        let udp = [0x1f, 0x90, 0x1b, 0x58, 0, 8, 0, 0]; // 8080 -> 7000
                                                        // Hop-by-hop (8 bytes) then destination options (16 bytes), then UDP.
        let mut ext = vec![60, 0, 1, 4, 0, 0, 0, 0];
        ext.extend_from_slice(&[17, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let info = parse(&ipv6_with(0, &ext, &udp)).expect("parsed");
        assert_eq!((info.proto, info.ports), (17, Some((8080, 7000))));
        // First fragment: ports visible; a later fragment: none.
        let first = [17, 0, 0, 1, 0, 0, 0, 1];
        let info = parse(&ipv6_with(44, &first, &udp)).expect("parsed");
        assert_eq!((info.proto, info.ports), (17, Some((8080, 7000))));
        let later = [17, 0, 0x05, 0x01, 0, 0, 0, 1];
        let info = parse(&ipv6_with(44, &later, &udp)).expect("parsed");
        assert_eq!((info.proto, info.ports), (17, None));
        // Truncated extension header: no ports, no panic.
        let info = parse(&ipv6_with(0, &[17, 9], &[])).expect("parsed");
        assert_eq!(info.ports, None);
    }
    use netfault_api::spec::Distribution;

    fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> PacketInfo {
        PacketInfo {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 17,
            ports: Some((sport, dport)),
        }
    }

    fn delay_plan(ms: u64) -> Plan {
        Plan {
            direction: Direction::Egress,
            selector: Match::default(),
            kind: Kind::Delay {
                sampler: DelaySampler::new(ms as f64 * 1e6, 0.0, 0.0, Distribution::Uniform),
                percent: 100.0,
                pick: Correlated::new(0.0),
            },
            deadline: Instant::now() + Duration::from_secs(60),
            counters: Arc::default(),
        }
    }

    /// An IPv4/UDP packet from 198.18.0.1:40000 to 198.18.0.2:`dport`
    /// holding a DNS query for `name`, type A.
    fn dns_query_packet(name: &str, dport: u16) -> Vec<u8> {
        let mut dns = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            dns.push(label.len() as u8);
            dns.extend_from_slice(label.as_bytes());
        }
        dns.extend_from_slice(&[0, 0, 1, 0, 1]);
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((28 + dns.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 0, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[24..26].copy_from_slice(&((8 + dns.len()) as u16).to_be_bytes());
        p.extend_from_slice(&dns);
        p
    }

    fn dns_error_plan(names: &[&str]) -> Plan {
        let v =
            serde_json::json!({"type": "dns-error", "rcode": "servfail", "dns": {"names": names}});
        let Ok(netfault_api::Action::Proxy(netfault_api::ProxyAction::Dns(a))) =
            netfault_api::action::parse_action(&v)
        else {
            panic!("a dns-error action");
        };
        dns_plan(
            &Match::default(),
            &a,
            Instant::now() + Duration::from_secs(60),
            Arc::default(),
        )
    }

    #[test]
    fn dns_queries_are_answered_or_passed() {
        let plans = vec![dns_error_plan(&["api.example.test"])];
        let now = Instant::now();
        let step = |pkt: &[u8]| dns_step(&plans, &parse(pkt).expect("parses"), pkt, now);
        let DnsStep::Answer { reply, after } = step(&dns_query_packet("API.example.test", 53))
        else {
            panic!("a picked query is answered");
        };
        assert_eq!(after, Duration::ZERO);
        let info = parse(&reply).expect("an IP packet");
        assert_eq!(
            (info.src, info.dst, info.ports),
            (
                "198.18.0.2".parse().unwrap(),
                "198.18.0.1".parse().unwrap(),
                Some((53, 40000))
            )
        );
        let dns = &reply[28..];
        assert_eq!(&dns[..2], &[0x12, 0x34], "the query's id");
        assert_eq!(dns[2] & 0x80, 0x80, "QR");
        assert_eq!(dns[3] & 0x0f, 2, "SERVFAIL");
        // Another name, another port, not DNS at all: untouched.
        assert_eq!(
            step(&dns_query_packet("web.example.test", 53)),
            DnsStep::Pass
        );
        assert_eq!(
            step(&dns_query_packet("api.example.test", 5353)),
            DnsStep::Pass
        );
        let mut garbage = dns_query_packet("api.example.test", 53);
        garbage.truncate(30);
        garbage[2..4].copy_from_slice(&30u16.to_be_bytes());
        garbage[24..26].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(step(&garbage), DnsStep::Pass);
        let c = plans[0].counters.snapshot();
        assert_eq!(
            (c.matched, c.affected),
            (1, 1),
            "only the picked query counts"
        );
    }

    #[test]
    fn delay_plans_ignore_dns_plans() {
        let mut plans = vec![dns_error_plan(&["api.example.test"]), delay_plan(10)];
        let p = udp("198.18.0.1", "198.18.0.2", 40000, 53);
        assert_eq!(
            decide(&mut plans, true, &p, Instant::now()),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn parses_ipv4_udp() {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[198, 18, 0, 1]);
        p[16..20].copy_from_slice(&[198, 18, 0, 2]);
        p[20..22].copy_from_slice(&1234u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        assert_eq!(parse(&p), Some(udp("198.18.0.1", "198.18.0.2", 1234, 80)));
    }

    #[test]
    fn delays_add_and_direction_matters() {
        let mut plans = vec![delay_plan(10), delay_plan(5)];
        let p = udp("198.18.0.1", "198.18.0.2", 1, 2);
        let now = Instant::now();
        assert_eq!(decide(&mut plans, true, &p, now), Duration::from_millis(15));
        assert_eq!(decide(&mut plans, false, &p, now), Duration::ZERO);
        assert_eq!(plans[0].counters.snapshot().matched, 1);
    }

    #[test]
    fn reorder_skips_delay_every_gap() {
        let mut plans = vec![
            delay_plan(10),
            Plan {
                direction: Direction::Both,
                selector: Match::default(),
                kind: Kind::Reorder {
                    percent: 100.0,
                    gap: 5,
                    latency: None,
                    rnd: Correlated::new(0.0),
                    counter: 0,
                },
                deadline: Instant::now() + Duration::from_secs(60),
                counters: Arc::default(),
            },
        ];
        let p = udp("198.18.0.1", "198.18.0.2", 1, 2);
        let now = Instant::now();
        let got: Vec<u64> = (0..10)
            .map(|_| decide(&mut plans, true, &p, now).as_millis() as u64)
            .collect();
        assert_eq!(got, vec![10, 10, 10, 10, 0, 10, 10, 10, 10, 0]);
    }
}
