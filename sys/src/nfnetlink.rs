//! Netfilter netlink: the one codec for the messages netfault sends to
//! `nfnetlink_queue` (queue config, verdicts) and `nf_tables` (set
//! elements, the NFQUEUE rule), the sockets they go over, and the batch
//! that re-arms set elements with a timeout (delay faults' deadlines,
//! proxy leases).
//! What it must not do: know about faults or enter a netns (a socket is
//! opened by a thread already inside the one it should keep).

use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{MsgFlags, NetlinkAddr};

pub const NFNL_SUBSYS_QUEUE: u16 = 3;
pub const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
const NFTA_DATA_VALUE: u16 = 1;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLA_F_NESTED: u16 = 0x8000;
/// The type bits of an attribute (without the nested/byte-order flags).
pub const NLA_TYPE_MASK: u16 = 0x3fff;

/// Appends a netlink header and `struct nfgenmsg` for message type `ty`
/// to `out`; returns where the message starts, for [`finish`].
pub fn put_header(
    out: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    start
}

/// Appends an attribute, padded to 4 bytes.
pub fn put_attr(out: &mut Vec<u8>, ty: u16, data: &[u8]) {
    out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Patches the length of the message that starts at `start`.
pub fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

pub fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_ne_bytes([b[i], b[i + 1]])
}

pub fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// One message under construction, with nested attributes.
pub struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    pub fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        put_header(&mut buf, ty, flags, seq, family, res_id);
        Msg {
            buf,
            nests: Vec::new(),
        }
    }

    pub fn attr(&mut self, ty: u16, data: &[u8]) {
        put_attr(&mut self.buf, ty, data);
    }

    /// A NUL-terminated string attribute.
    pub fn str(&mut self, ty: u16, s: &str) {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(ty, &d);
    }

    pub fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end(&mut self) {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        finish(&mut self.buf, 0);
        self.buf
    }
}

/// A netfilter netlink socket in the calling thread's netns (it keeps that netns).
pub fn netfilter_socket() -> std::io::Result<OwnedFd> {
    let sock = socket2::Socket::new_raw(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::RAW.cloexec(),
        Some(socket2::Protocol::from(libc::NETLINK_NETFILTER)),
    )?;
    Ok(sock.into())
}

/// A netfilter netlink socket in the calling thread's netns, for
/// nf_tables batches: waits at most 2 s for the kernel's answer.
pub fn batch_socket() -> std::io::Result<OwnedFd> {
    let fd = netfilter_socket()?;
    socket2::SockRef::from(&fd).set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    Ok(fd)
}

/// Why a batch failed.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    /// The kernel refused message `seq` of the batch.
    #[error("the kernel refused message {seq}: {source}")]
    Refused { seq: u32, source: std::io::Error },
}

/// An nf_tables batch under construction: BEGIN, the messages, END.
pub struct Batch {
    out: Vec<u8>,
    seq: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}

impl Batch {
    pub fn new() -> Batch {
        let req = libc::NLM_F_REQUEST as u16;
        Batch {
            out: Msg::new(NFNL_MSG_BATCH_BEGIN, req, 1, 0, NFNL_SUBSYS_NFTABLES).finish(),
            seq: 1,
        }
    }

    /// The sequence number of the next message.
    pub fn next_seq(&mut self) -> u32 {
        self.seq += 1;
        self.seq
    }

    pub fn push(&mut self, msg: Vec<u8>) {
        self.out.extend(msg);
    }

    /// Sends the batch on `fd` and waits for the ack of its last message
    /// (which must ask for one) or the first error.
    pub fn send(mut self, fd: &OwnedFd) -> Result<(), BatchError> {
        let last = self.seq;
        let req = libc::NLM_F_REQUEST as u16;
        self.out
            .extend(Msg::new(NFNL_MSG_BATCH_END, req, last + 1, 0, NFNL_SUBSYS_NFTABLES).finish());
        send_to_kernel(fd, &self.out).map_err(|source| BatchError::Io {
            what: "sending the batch",
            source,
        })?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = recv(fd, &mut buf).map_err(|source| BatchError::Io {
                what: "waiting for the batch's ack",
                source,
            })?;
            let mut off = 0usize;
            while off + 16 <= n {
                let len = u32_at(&buf, off) as usize;
                let ty = u16_at(&buf, off + 4);
                let seq = u32_at(&buf, off + 8);
                if len < 16 || off + len > n {
                    break;
                }
                if ty == libc::NLMSG_ERROR as u16 && len >= 20 {
                    let errno = u32_at(&buf, off + 16) as i32;
                    if errno != 0 {
                        return Err(BatchError::Refused {
                            seq,
                            source: std::io::Error::from_raw_os_error(-errno),
                        });
                    }
                    if seq == last {
                        return Ok(());
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// Sends `out` to the kernel (netlink port 0) on a netlink socket.
pub fn send_to_kernel(fd: &impl AsRawFd, out: &[u8]) -> std::io::Result<()> {
    let kernel = NetlinkAddr::new(0, 0);
    nix::sys::socket::sendto(fd.as_raw_fd(), out, &kernel, MsgFlags::empty())?;
    Ok(())
}

/// `recv` into `buf`; the number of bytes read.
pub fn recv(fd: &impl AsRawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    Ok(nix::sys::socket::recv(
        fd.as_raw_fd(),
        buf,
        MsgFlags::empty(),
    )?)
}

/// The `NEWSETELEM` message `seq` of a batch: the elements `ipv4` and
/// `ipv6` of `table`'s set `set`, with a timeout of `ms`; with `expire`,
/// also expiring `ms` from now (which re-arms an element that exists).
/// `ack`: the batch's last message, which the kernel acknowledges.
pub fn elements_msg(table: &str, set: &str, ms: u64, expire: bool, seq: u32, ack: bool) -> Vec<u8> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_CREATE) as u16
        | if ack { libc::NLM_F_ACK as u16 } else { 0 };
    let mut m = Msg::new(
        (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM,
        flags,
        seq,
        NFPROTO_INET,
        0,
    );
    m.str(NFTA_SET_ELEM_LIST_TABLE, table);
    m.str(NFTA_SET_ELEM_LIST_SET, set);
    m.begin(NFTA_SET_ELEM_LIST_ELEMENTS);
    let ms = ms.max(1).to_be_bytes();
    for key in [NFPROTO_IPV4, NFPROTO_IPV6] {
        m.begin(NFTA_LIST_ELEM);
        m.begin(NFTA_SET_ELEM_KEY);
        m.attr(NFTA_DATA_VALUE, &[key]);
        m.end();
        m.attr(NFTA_SET_ELEM_TIMEOUT, &ms);
        if expire {
            m.attr(NFTA_SET_ELEM_EXPIRATION, &ms);
        }
        m.end();
    }
    m.end();
    m.finish()
}

/// One nf_tables batch, over `fd` (a netfilter netlink socket opened in
/// the sets' netns), that (re)arms the `ipv4` and `ipv6` elements of each
/// `(set, ms)` in `leases` of the inet table `table`: each element gets
/// the timeout and expires `ms` from now, whether it existed (its
/// expiration is updated: Linux 6.10) or had already expired. No process
/// is spawned and no namespace entered, so it is cheap to repeat.
pub fn arm_leases(fd: &OwnedFd, table: &str, leases: &[(String, u64)]) -> Result<(), BatchError> {
    if leases.is_empty() {
        return Ok(());
    }
    let mut batch = Batch::new();
    for (i, (set, ms)) in leases.iter().enumerate() {
        let seq = batch.next_seq();
        batch.push(elements_msg(
            table,
            set,
            *ms,
            true,
            seq,
            i + 1 == leases.len(),
        ));
    }
    batch.send(fd)
}
