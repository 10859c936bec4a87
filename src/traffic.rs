//! Real traffic between pods: sockets opened inside the pods' namespaces.

use nix::sys::socket::{setsockopt, sockopt};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::netns::in_netns;
use crate::node::Pod;

/// What a UDP probe saw.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UdpProbe {
    /// Datagrams the sender tried to send.
    pub sent: u64,
    /// `send` calls that failed (a drop visible to the sender, e.g. ENOBUFS).
    pub send_errors: u64,
    /// Datagrams the receiver got, duplicates included.
    pub received: u64,
    /// Sequence numbers (0-based) in arrival order, duplicates included.
    pub received_seqs: Vec<u32>,
    /// One-way delay of each received datagram, aligned with `received_seqs`
    /// (sender and receiver share this host's monotonic clock).
    pub latencies: Vec<Duration>,
}

impl UdpProbe {
    /// Distinct sequence numbers received.
    pub fn unique_received(&self) -> u64 {
        let set: std::collections::BTreeSet<u32> = self.received_seqs.iter().copied().collect();
        set.len() as u64
    }

    /// Datagrams received more than once: `received - unique_received`.
    pub fn duplicates(&self) -> u64 {
        self.received.saturating_sub(self.unique_received())
    }

    /// Fraction of sent datagrams never received, 0.0 to 1.0.
    pub fn loss_ratio(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        1.0 - self.unique_received() as f64 / self.sent as f64
    }

    /// Arrivals with a lower sequence number than one already seen.
    pub fn reordered(&self) -> u64 {
        let mut max = None;
        let mut n = 0;
        for &s in &self.received_seqs {
            match max {
                Some(m) if s < m => n += 1,
                _ => max = Some(s),
            }
        }
        n
    }

    /// The median one-way delay, if anything arrived.
    pub fn median_latency(&self) -> Option<Duration> {
        crate::quantile(&self.latencies, 0.5)
    }
}

/// Parameters of [`udp_probe_with`].
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub port: u16,
    pub count: u32,
    /// Pause between sends (a fixed schedule from the first send).
    pub interval: Duration,
    /// How long the receiver keeps listening after the last send (300 ms).
    pub linger: Duration,
    /// Datagram size in bytes (at least 16; default 64).
    pub payload_len: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            port: 9000,
            count: 20,
            interval: Duration::from_millis(5),
            linger: Duration::from_millis(300),
            payload_len: 64,
        }
    }
}

/// Sends `count` sequence-numbered UDP datagrams from `from` to `to_ip:port`,
/// received by a socket bound in `to`'s netns, and waits 300 ms after the last.
pub fn udp_probe(
    from: &Pod,
    to: &Pod,
    to_ip: IpAddr,
    port: u16,
    count: u32,
    interval: Duration,
) -> Result<UdpProbe> {
    udp_probe_with(
        from,
        to,
        to_ip,
        &ProbeOptions {
            port,
            count,
            interval,
            ..ProbeOptions::default()
        },
    )
}

/// The unspecified address (`0.0.0.0` or `::`) of `ip`'s family: what a
/// socket that talks to `ip` binds to.
pub fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Binds UDP `port` in `pod`. A port the previous probe just closed can
/// still be held for a moment by a child process this test binary is
/// spawning (it inherits the socket between fork and exec, which then
/// closes it): `EADDRINUSE` is retried for up to a second.
fn bind_udp_port(pod: &Pod, any: IpAddr, port: u16) -> Result<UdpSocket> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let bound = in_netns(pod.netns.path(), move || UdpSocket::bind((any, port)))?;
        match bound {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r.ctx(|| format!("binding UDP {port} in pod {}", pod.name)),
        }
    }
}

/// An IPv6 extension header the sender puts on every datagram of a probe
/// (a sticky socket option, RFC 3542), holding one 4-byte PadN option: 8
/// bytes between the IPv6 header and UDP, which the receiver skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6ExtHeader {
    /// Hop-by-hop options (next header 0), `IPV6_HOPOPTS`.
    HopByHop,
    /// Destination options (next header 60), `IPV6_DSTOPTS`.
    DestinationOptions,
}

impl Ipv6ExtHeader {
    /// Sets the header as a sticky option on `socket` (needs CAP_NET_RAW).
    fn set_on(self, socket: &UdpSocket) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let name = match self {
            Ipv6ExtHeader::HopByHop => libc::IPV6_HOPOPTS,
            Ipv6ExtHeader::DestinationOptions => libc::IPV6_DSTOPTS,
        };
        // Next header (the kernel fills it in), length 0 (8 bytes), then
        // PadN (type 1) of 4 bytes.
        let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: setsockopt reads `header.len()` bytes from a live array.
        let r = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                name,
                header.as_ptr().cast(),
                header.len() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// [`udp_probe`] with all the knobs.
pub fn udp_probe_with(
    from: &Pod,
    to: &Pod,
    to_ip: IpAddr,
    opts: &ProbeOptions,
) -> Result<UdpProbe> {
    udp_probe_ext(from, to, to_ip, opts, None)
}

/// [`udp_probe_with`], every datagram carrying the IPv6 extension header
/// `ext` (to an IPv6 `to_ip`) when one is given.
pub fn udp_probe_ext(
    from: &Pod,
    to: &Pod,
    to_ip: IpAddr,
    opts: &ProbeOptions,
    ext: Option<Ipv6ExtHeader>,
) -> Result<UdpProbe> {
    let any = unspecified(to_ip);
    let port = opts.port;
    let rx = bind_udp_port(to, any, port)?;
    rx.set_read_timeout(Some(Duration::from_millis(20)))
        .ctx(|| "SO_RCVTIMEO".into())?;
    // A deep receive buffer (past rmem_max, as root): a receiving thread
    // descheduled for a few milliseconds on a busy machine must not lose
    // datagrams the probe would count as the network's loss.
    setsockopt(&rx, sockopt::RcvBufForce, &(8 << 20))
        .or_else(|_| setsockopt(&rx, sockopt::RcvBuf, &(8 << 20)))
        .ctx(|| "SO_RCVBUF".into())?;
    let tx = in_netns(from.netns.path(), move || UdpSocket::bind((any, 0)))?
        .ctx(|| format!("binding UDP in pod {}", from.name))?;
    // Without IP_RECVERR, UDP hides a local drop (ENOBUFS from NET_XMIT_DROP)
    // from the sender; with it, `send_errors` tells a drop the sender can see
    // (TC_ACT_SHOT on egress) from silent network loss.
    let recverr = if to_ip.is_ipv4() {
        setsockopt(&tx, sockopt::Ipv4RecvErr, &true)
    } else {
        setsockopt(&tx, sockopt::Ipv6RecvErr, &true)
    };
    recverr.ctx(|| "IP_RECVERR".into())?;
    if let Some(ext) = ext {
        ext.set_on(&tx)
            .ctx(|| format!("setting the IPv6 extension header {ext:?}"))?;
    }

    let magic: u32 = rand::random();
    let start = Instant::now();
    let stop = AtomicBool::new(false);
    let len = opts.payload_len.max(16);
    let dest = SocketAddr::new(to_ip, port);

    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut seqs = Vec::new();
            let mut lats = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Acquire) {
                let n = match rx.recv(&mut buf) {
                    Ok(n) => n,
                    Err(_) => continue, // timeout: check the stop flag
                };
                if n < 16 || buf[0..4] != magic.to_be_bytes() {
                    continue;
                }
                let seq = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                let mut t = [0u8; 8];
                t.copy_from_slice(&buf[8..16]);
                let sent_at = Duration::from_nanos(u64::from_be_bytes(t));
                seqs.push(seq);
                lats.push(start.elapsed().saturating_sub(sent_at));
            }
            (seqs, lats)
        });

        let mut probe = UdpProbe::default();
        let mut pkt = vec![0u8; len];
        pkt[0..4].copy_from_slice(&magic.to_be_bytes());
        for seq in 0..opts.count {
            let due = opts.interval.saturating_mul(seq);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            pkt[4..8].copy_from_slice(&seq.to_be_bytes());
            let now = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            pkt[8..16].copy_from_slice(&now.to_be_bytes());
            probe.sent += 1;
            if tx.send_to(&pkt, dest).is_err() {
                probe.send_errors += 1;
            }
        }
        std::thread::sleep(opts.linger);
        stop.store(true, Ordering::Release);
        let (seqs, lats) = match receiver.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        probe.received = seqs.len() as u64;
        probe.received_seqs = seqs;
        probe.latencies = lats;
        Ok(probe)
    })
}

/// A thread accepting connections on a dual-stack listener (`[::]:port`,
/// or `0.0.0.0:port` without IPv6) opened inside a pod, handing each one
/// to a thread of its own. Dropping it stops accepting.
#[derive(Debug)]
pub(crate) struct Acceptor {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Acceptor {
    /// Listens in `pod` on `port` (0: any free port) and serves each
    /// connection with `serve(conn, peer, stop)`; polls for connections
    /// every `idle`.
    pub(crate) fn start<F>(pod: &Pod, port: u16, idle: Duration, serve: F) -> Result<Acceptor>
    where
        F: Fn(TcpStream, SocketAddr, Arc<AtomicBool>) + Send + Sync + 'static,
    {
        let listener = in_netns(pod.netns.path(), move || {
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))
        })?
        .ctx(|| format!("listening on TCP {port} in pod {}", pod.name))?;
        listener.set_nonblocking(true).ctx(|| "O_NONBLOCK".into())?;
        let port = listener
            .local_addr()
            .ctx(|| "listener address".into())?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let serve = Arc::new(serve);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let (serve, stop3) = (serve.clone(), stop2.clone());
                        std::thread::spawn(move || serve(conn, peer, stop3));
                    }
                    Err(_) => std::thread::sleep(idle),
                }
            }
        });
        Ok(Acceptor {
            port,
            stop,
            thread: Some(thread),
        })
    }
}

/// A TCP echo server listening on `[::]:port` (dual-stack) inside a pod.
/// It echoes every connection until EOF. Dropping it stops accepting.
#[derive(Debug)]
pub struct TcpServer {
    acceptor: Acceptor,
    accepted: Arc<AtomicU64>,
}

impl TcpServer {
    pub fn port(&self) -> u16 {
        self.acceptor.port
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

/// Starts a [`TcpServer`] in `pod` on `port` (0: any free port, see [`TcpServer::port`]).
pub fn tcp_listen(pod: &Pod, port: u16) -> Result<TcpServer> {
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    let acceptor = Acceptor::start(pod, port, Duration::from_millis(5), move |conn, _, stop| {
        count.fetch_add(1, Ordering::Relaxed);
        echo(conn, &stop)
    })?;
    Ok(TcpServer { acceptor, accepted })
}

fn echo(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 16384];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Acquire) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

fn connect(from: &Pod, to_ip: IpAddr, port: u16, timeout: Duration) -> Result<TcpStream> {
    let addr = SocketAddr::new(to_ip, port);
    in_netns(from.netns.path(), move || {
        TcpStream::connect_timeout(&addr, timeout)
    })?
    .ctx(|| format!("TCP connect from pod {} to {addr}", from.name))
}

/// Whether a TCP handshake from `from` to `to_ip:port` completes within `timeout`.
pub fn tcp_connect_ok(from: &Pod, to_ip: IpAddr, port: u16, timeout: Duration) -> bool {
    connect(from, to_ip, port, timeout).is_ok()
}

/// Connects, sends `payload`, and reads back as many bytes (an echo round trip
/// through a [`TcpServer`]), all within `timeout`.
pub fn tcp_echo(
    from: &Pod,
    to_ip: IpAddr,
    port: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut conn = connect(from, to_ip, port, timeout)?;
    conn.write_all(payload).ctx(|| "TCP write".into())?;
    let mut back = vec![0u8; payload.len()];
    let mut got = 0;
    while got < back.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Other(format!(
                "TCP echo: {got} of {} bytes back before the timeout",
                back.len()
            )));
        }
        conn.set_read_timeout(Some(left))
            .ctx(|| "SO_RCVTIMEO".into())?;
        match conn.read(&mut back[got..]) {
            Ok(0) => {
                return Err(Error::Other(format!(
                    "TCP echo: connection closed after {got} of {} bytes",
                    back.len()
                )))
            }
            Ok(n) => got += n,
            Err(e) => return Err(e).ctx(|| format!("TCP echo read after {got} bytes")),
        }
    }
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_stats() {
        let p = UdpProbe {
            sent: 5,
            send_errors: 0,
            received: 5,
            received_seqs: vec![0, 2, 1, 2, 4],
            latencies: vec![Duration::from_millis(1); 5],
        };
        assert_eq!(p.unique_received(), 4);
        assert_eq!(p.duplicates(), 1);
        assert_eq!(p.reordered(), 1);
        assert!((p.loss_ratio() - 0.2).abs() < 1e-9);
        assert_eq!(p.median_latency(), Some(Duration::from_millis(1)));
    }
}
