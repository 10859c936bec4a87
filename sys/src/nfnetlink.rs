//! Netfilter netlink: the one codec for the messages netfault sends to
//! `nfnetlink_queue` (queue config, verdicts) and `nf_tables` (set
//! elements, the NFQUEUE rule), the sockets they go over, and the batch
//! that re-arms set elements with a timeout (delay faults' deadlines,
//! proxy leases).
//! What it must not do: know about faults or enter a netns (a socket is
//! opened by a thread already inside the one it should keep).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

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

/// How long [`close_later`] keeps a socket open: past the RCU grace period
/// that the deferred frees of a transaction just committed wait for.
/// `NETFAULT_NF_CLOSE_DELAY_MS` sets it (read once; `0` closes at once, to
/// measure what it saves).
fn close_delay() -> std::time::Duration {
    static DELAY: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms = std::env::var("NETFAULT_NF_CLOSE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100);
        std::time::Duration::from_millis(ms)
    })
}

type Closing = std::sync::mpsc::Sender<(std::time::Instant, OwnedFd)>;

static CLOSER: std::sync::OnceLock<Option<Closing>> = std::sync::OnceLock::new();

/// Closes a netfilter netlink socket off the caller's path, about
/// [`close_delay`] (100 ms) later, on a thread of its own.
///
/// Why: the last close of a netfilter netlink socket (once it has sent
/// anything) runs nf_tables' release notifier, which takes the netns'
/// commit mutex and waits for the netns' pending destroy work: the objects
/// a transaction deleted (a table, rules, sets) are freed after an RCU
/// grace period. Closed right after such a transaction, a socket blocks for
/// the rest of that grace period (10-13 ms here); closed later it does not
/// block at all. Where the thread cannot start, the socket closes at once.
pub fn close_later(fd: OwnedFd) {
    let delay = close_delay();
    if delay.is_zero() {
        drop(fd);
        return;
    }
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, OwnedFd)>();
        // Callers run inside pod netns, and a thread starts in its
        // creator's: the closer joins the process's own netns (its main
        // thread's), or it would keep a pod's netns alive.
        let home = crate::netns::Netns::open(std::path::Path::new("/proc/self/ns/net")).ok()?;
        home.spawn("nf-closer", move |_| {
            let mut trimmed = std::time::Instant::now();
            while let Ok((at, fd)) = rx.recv() {
                let now = std::time::Instant::now();
                if at > now {
                    std::thread::sleep(at - now);
                }
                drop(fd);
                if trimmed.elapsed() >= std::time::Duration::from_secs(1) {
                    trim_heap();
                    trimmed = std::time::Instant::now();
                }
            }
        })
        .ok()
        .map(|_| tx)
    });
    let at = std::time::Instant::now() + delay;
    match closer {
        Some(tx) => {
            // A send fails only without the thread: then it closes here.
            let _ = tx.send((at, fd));
        }
        None => drop(fd),
    }
}

/// Gives the allocator's free memory back to the kernel. libnftables
/// allocates (and frees) on the short-lived threads that enter pod netns;
/// glibc keeps what they freed in its per-thread arenas (up to 8 per CPU),
/// which added about 30 MB to the agent's RSS under the load bench. The
/// closer runs this at most once a second, off every caller's path.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks glibc's own arenas, under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A duplicate (`FD_CLOEXEC`) of descriptor `fd` if it is a netfilter
/// netlink socket that has not been bound yet (one just opened), else
/// `None`. It borrows nothing: `fd` may be any number, open or not.
pub fn dup_fresh_netfilter_socket(fd: RawFd) -> Option<OwnedFd> {
    let int_opt = |opt: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`; a bad
        // descriptor is an error, not a fault.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (r == 0).then_some(v)
    };
    if int_opt(libc::SO_DOMAIN)? != libc::AF_NETLINK
        || int_opt(libc::SO_PROTOCOL)? != libc::NETLINK_NETFILTER
    {
        return None;
    }
    // SAFETY: zeroed sockaddr_nl is valid; getsockname writes at most `len`.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: as above.
    let r =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) };
    if r != 0 || addr.nl_pid != 0 {
        return None;
    }
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor we then own alone.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: `dup` is a fresh descriptor owned by nothing else.
    (dup >= 0).then(|| unsafe { OwnedFd::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_fresh_netfilter_socket_is_duplicated() {
        let fresh = netfilter_socket().expect("a netfilter socket");
        let dup = dup_fresh_netfilter_socket(fresh.as_raw_fd()).expect("duplicated");
        assert_ne!(dup.as_raw_fd(), fresh.as_raw_fd());
        // Bound (it has sent something): not one just opened.
        let bound = netfilter_socket().expect("a netfilter socket");
        let addr = NetlinkAddr::new(0, 0);
        nix::sys::socket::bind(bound.as_raw_fd(), &addr).expect("binds");
        assert!(dup_fresh_netfilter_socket(bound.as_raw_fd()).is_none());
        // Another kind of descriptor.
        let file = std::fs::File::open("/dev/null").expect("opens /dev/null");
        assert!(dup_fresh_netfilter_socket(file.as_raw_fd()).is_none());
        close_later(dup);
    }

    fn netns_of(path: &str) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    /// Root only: sockets handed over from inside a pod's netns are closed
    /// by a thread in the process's own netns (a thread starts in its
    /// creator's netns; one left in a pod's would keep it alive).
    #[test]
    fn the_closer_lives_in_the_process_netns() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: requires root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            close_later(netfilter_socket().expect("a netfilter socket"));
        })
        .join()
        .expect("joins");
        let home = netns_of("/proc/self/ns/net").expect("own netns");
        let closers: Vec<Option<(u64, u64)>> = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "nf-closer")
            })
            .map(|t| netns_of(&t.path().join("ns/net").to_string_lossy()))
            .collect();
        assert_eq!(
            closers,
            vec![Some(home)],
            "one closer, in the process's netns"
        );
    }
}
