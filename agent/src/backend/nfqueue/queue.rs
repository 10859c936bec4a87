//! A minimal NFQUEUE client (nfnetlink_queue) whose socket can be waited on
//! with `ppoll` and a nanosecond timeout, so the engine thread sleeps until
//! either a packet arrives or the next release time, and issues verdicts in
//! batches. Opened from a thread inside the pod netns; the socket keeps that
//! netns, so it can then be served from any thread.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use netfault_sys::nfnetlink::{
    self, finish, netfilter_socket, put_attr, u16_at, u32_at, NFNL_SUBSYS_QUEUE, NLA_TYPE_MASK,
};
use netfault_sys::sockopt::set_int_opt;

use super::error::DelayError;
use netfault_sys::netns::InNetns;

const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;
const NFQNL_COPY_PACKET: u8 = 2;
/// A full queue passes packets instead of dropping them.
const NFQA_CFG_F_FAIL_OPEN: u32 = 1;
const NF_ACCEPT: u32 = 1;
const NF_DROP: u32 = 0;

/// The NFQUEUE number used in every pod netns (queues are per netns).
pub const QUEUE_NUM: u16 = 0x4e46;
/// The DNS engine's NFQUEUE number (its own holder and table).
pub const DNS_QUEUE_NUM: u16 = 0x4e47;

/// A bound queue.
pub struct NfQueue {
    fd: OwnedFd,
    num: u16,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Times the kernel reported it could not deliver to us (ENOBUFS):
    /// at least one packet passed undelayed each time.
    overflows: u64,
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> DelayError + '_ {
    move |e| DelayError::Queue(format!("{what}: {e}"))
}

/// The header of a queue message: nfnetlink_queue subsystem, `AF_UNSPEC`,
/// the queue number as the resource id.
fn put_hdr(out: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, res_id: u16) -> usize {
    nfnetlink::put_header(
        out,
        (NFNL_SUBSYS_QUEUE << 8) | ty,
        flags,
        seq,
        libc::AF_UNSPEC as u8,
        res_id,
    )
}

/// Receive buffer of a queue socket: ~20k MTU-sized packets in flight.
const RCVBUF: libc::c_int = 64 << 20;

impl NfQueue {
    /// Opens a netfilter netlink socket in the calling thread's netns and
    /// binds queue `num`: copy `copy_range` bytes of each packet, hold at
    /// most `maxlen` packets, fail open when full.
    pub fn open(
        _inside: &InNetns,
        num: u16,
        maxlen: u32,
        copy_range: u32,
    ) -> Result<NfQueue, DelayError> {
        let fd = netfilter_socket().map_err(io("netfilter netlink socket"))?;
        // A deep receive buffer: every queued packet is its own netlink
        // message, and when the buffer is full a fail-open queue lets the
        // packet pass *undelayed*. With the default (~208 KiB) a TCP burst of
        // ~60 segments overflowed it, so part of a delayed flow leaked past
        // the delay. SO_RCVBUFFORCE (CAP_NET_ADMIN) goes past rmem_max.
        set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF)
            .or_else(|_| set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF))
            .map_err(io("sizing the queue socket's receive buffer"))?;
        // Port id 0: the kernel picks one.
        nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::NetlinkAddr::new(0, 0))
            .map_err(|e| io("binding the netlink socket")(e.into()))?;
        let mut q = NfQueue::from_fd(fd, num);
        // One config message: bind, copy mode, queue length, fail-open.
        let mut out = Vec::with_capacity(128);
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        let start = put_hdr(&mut out, NFQNL_MSG_CONFIG, flags, 1, num);
        // struct nfqnl_msg_config_cmd { u8 command; u8 pad; be16 pf; }
        put_attr(&mut out, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
        // struct nfqnl_msg_config_params { be32 copy_range; u8 copy_mode; } (packed)
        let mut params = copy_range.to_be_bytes().to_vec();
        params.push(NFQNL_COPY_PACKET);
        put_attr(&mut out, NFQA_CFG_PARAMS, &params);
        put_attr(&mut out, NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes());
        put_attr(&mut out, NFQA_CFG_MASK, &NFQA_CFG_F_FAIL_OPEN.to_be_bytes());
        put_attr(
            &mut out,
            NFQA_CFG_FLAGS,
            &NFQA_CFG_F_FAIL_OPEN.to_be_bytes(),
        );
        finish(&mut out, start);
        q.send(&out).map_err(io("configuring the queue"))?;
        q.wait_ack(1)?;
        Ok(q)
    }

    /// The queue number this socket is bound to.
    pub fn num(&self) -> u16 {
        self.num
    }

    fn send(&self, buf: &[u8]) -> std::io::Result<()> {
        nfnetlink::send_to_kernel(&self.fd, buf)
    }

    /// Waits for the kernel's answer to message `seq`, accepting any packet
    /// that arrives meanwhile (it must not stay held).
    fn wait_ack(&mut self, seq: u32) -> Result<(), DelayError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(DelayError::Queue("no answer from nfnetlink_queue".into()));
            }
            self.wait(left, None).map_err(io("waiting for the queue"))?;
            let mut result = None;
            let mut stray = Vec::new();
            self.drain_raw(|ty, mseq, body| {
                if ty == libc::NLMSG_ERROR as u16 && mseq == seq && body.len() >= 4 {
                    let errno = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
                    result = Some(errno);
                } else if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                    if let Some((id, _, _)) = parse_packet(body) {
                        stray.push(id);
                    }
                }
            })
            .map_err(io("reading the queue's answer"))?;
            if !stray.is_empty() {
                self.accept(&stray).map_err(io("passing a packet"))?;
            }
            match result {
                Some(0) => return Ok(()),
                // The kernel answers EPERM when another socket has the
                // queue bound (nfqnl_recv_config: another peer portid).
                Some(e) if -e == libc::EPERM || -e == libc::EBUSY => {
                    return Err(DelayError::QueueBusy(self.num))
                }
                Some(e) => {
                    return Err(DelayError::Queue(format!(
                        "binding queue {}: {}",
                        self.num,
                        std::io::Error::from_raw_os_error(-e)
                    )))
                }
                None => {}
            }
        }
    }

    /// Changes the queue's maximum length. With 0 and fail-open, the kernel
    /// passes every new packet instead of queueing it.
    pub fn set_maxlen(&mut self, maxlen: u32) -> std::io::Result<()> {
        self.config(NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes())
    }

    /// Sends a config message with one attribute, unacknowledged.
    fn config(&mut self, attr: u16, data: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(64);
        let start = put_hdr(
            &mut out,
            NFQNL_MSG_CONFIG,
            libc::NLM_F_REQUEST as u16,
            0,
            self.num,
        );
        put_attr(&mut out, attr, data);
        finish(&mut out, start);
        self.send(&out)
    }

    /// The socket, to hand to a holder process (see `holder`).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A queue already bound by [`NfQueue::open`] (in another process).
    pub fn from_fd(fd: OwnedFd, num: u16) -> NfQueue {
        NfQueue {
            fd,
            num,
            buf: vec![0u8; 1 << 16],
            out: Vec::with_capacity(4096),
            overflows: 0,
        }
    }

    /// Receive overflows seen so far (see the field).
    pub fn overflows(&self) -> u64 {
        self.overflows
    }

    /// Waits until the socket is readable, `wake` (an eventfd) was
    /// written, or `timeout` passed (ppoll, ns resolution). Returns whether
    /// the socket is readable; a wake-up is consumed.
    pub fn wait(&self, timeout: Duration, wake: Option<BorrowedFd<'_>>) -> std::io::Result<bool> {
        use nix::poll::{ppoll, PollFd, PollFlags};
        let mut pfd = vec![PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        if let Some(w) = wake {
            pfd.push(PollFd::new(w, PollFlags::POLLIN));
        }
        match ppoll(&mut pfd, Some(timeout.into()), None) {
            Ok(n) if n > 0 => {
                let woken = pfd
                    .get(1)
                    .and_then(|p| p.revents())
                    .is_some_and(|r| r.contains(PollFlags::POLLIN));
                if let (true, Some(w)) = (woken, wake) {
                    let mut v = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into a live buffer from
                    // the caller's eventfd (non-blocking).
                    unsafe { libc::read(w.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
                }
                Ok(pfd[0]
                    .revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR)))
            }
            Ok(_) => Ok(false),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Unbinds the queue (its number is free for another socket at once).
    /// Only once nothing is queued: the kernel drops what still is.
    pub fn unbind(&mut self) -> std::io::Result<()> {
        self.config(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])
    }

    /// Reads every message available now (non-blocking) and hands each one
    /// (type, seq, body after the netlink header) to `f`.
    fn drain_raw(&mut self, mut f: impl FnMut(u16, u32, &[u8])) -> std::io::Result<()> {
        loop {
            use nix::errno::Errno;
            let n = match nix::sys::socket::recv(
                self.fd.as_raw_fd(),
                &mut self.buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(Errno::ENOBUFS) => {
                    // The kernel could not queue a message to us: the packet
                    // it carried passed undelayed (fail-open). Count it; the
                    // socket stays usable.
                    self.overflows += 1;
                    continue;
                }
                Err(Errno::EAGAIN) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut off = 0;
            while off + 16 <= n {
                let len = u32_at(&self.buf, off) as usize;
                if len < 16 || off + len > n {
                    break;
                }
                let ty = u16_at(&self.buf, off + 4);
                let seq = u32_at(&self.buf, off + 8);
                f(ty, seq, &self.buf[off + 16..off + len]);
                off += (len + 3) & !3;
            }
        }
    }

    /// Reads every queued packet available now: `f(packet id, hook, payload)`.
    pub fn drain(&mut self, mut f: impl FnMut(u32, u8, &[u8])) -> std::io::Result<()> {
        self.drain_raw(|ty, _, body| {
            if ty == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET {
                if let Some((id, hook, payload)) = parse_packet(body) {
                    f(id, hook, payload);
                }
            }
        })
    }

    /// ACCEPT verdicts for `ids`, in one send.
    pub fn accept(&mut self, ids: &[u32]) -> std::io::Result<()> {
        self.verdict(ids, NF_ACCEPT)
    }

    /// DROP verdicts for `ids`, in one send.
    pub fn drop_packets(&mut self, ids: &[u32]) -> std::io::Result<()> {
        self.verdict(ids, NF_DROP)
    }

    fn verdict(&mut self, ids: &[u32], verdict: u32) -> std::io::Result<()> {
        for chunk in ids.chunks(128) {
            let mut out = std::mem::take(&mut self.out);
            out.clear();
            for id in chunk {
                let start = put_hdr(
                    &mut out,
                    NFQNL_MSG_VERDICT,
                    libc::NLM_F_REQUEST as u16,
                    0,
                    self.num,
                );
                let mut v = verdict.to_be_bytes().to_vec();
                v.extend_from_slice(&id.to_be_bytes());
                put_attr(&mut out, NFQA_VERDICT_HDR, &v);
                finish(&mut out, start);
            }
            let r = self.send(&out);
            self.out = out;
            r?;
        }
        Ok(())
    }
}

/// (packet id, hook, payload) of an NFQNL_MSG_PACKET body (after nlmsghdr).
fn parse_packet(body: &[u8]) -> Option<(u32, u8, &[u8])> {
    let mut off = 4; // struct nfgenmsg
    let mut hdr = None;
    let mut payload: &[u8] = &[];
    while off + 4 <= body.len() {
        let len = u16_at(body, off) as usize;
        let ty = u16_at(body, off + 2) & NLA_TYPE_MASK;
        if len < 4 || off + len > body.len() {
            break;
        }
        let data = &body[off + 4..off + len];
        match ty {
            // struct nfqnl_msg_packet_hdr { be32 packet_id; be16 hw_protocol; u8 hook; }
            NFQA_PACKET_HDR if data.len() >= 7 => {
                hdr = Some((
                    u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                    data[6],
                ))
            }
            NFQA_PAYLOAD => payload = data,
            _ => {}
        }
        off += (len + 3) & !3;
    }
    hdr.map(|(id, hook)| (id, hook, payload))
}
