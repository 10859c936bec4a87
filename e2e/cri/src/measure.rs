//! Measurements on the wire: ping logs of pod containers, TCP handshakes
//! between pods' netns.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, IoContext, Result};
use crate::node::Sandbox;

/// The replies in a busybox `ping` output: icmp_seq → RTT in ms.
pub fn ping_replies(log: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for line in log.lines() {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_string)
        };
        if let (Some(seq), Some(time)) = (field("seq="), field("time=")) {
            if let (Ok(seq), Ok(time)) = (seq.parse::<u64>(), time.parse::<f64>()) {
                out.insert(seq, time);
            }
        }
    }
    out
}

/// A TCP server inside a pod's netns: a background thread accepts
/// connections on the pod's primary IP and hands each to `serve`, one at a
/// time, until dropped.
pub struct PodServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodServer {
    /// Listens on the pod's primary IP and `port`.
    pub fn start(
        pod: &Sandbox,
        port: u16,
        serve: impl Fn(TcpStream) + Send + 'static,
    ) -> Result<PodServer> {
        let addr = SocketAddr::new(pod.ip()?, port);
        let listener = pod
            .run(move || TcpListener::bind(addr))?
            .ctx(|| format!("listening on {addr} in pod {}", pod.name))?;
        listener
            .set_nonblocking(true)
            .ctx(|| "nonblocking listener".into())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => serve(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(PodServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener inside a pod's netns that accepts (and drops) every
/// connection until dropped.
pub struct TcpSink;

impl TcpSink {
    /// Listens on the pod's primary IP and `port`.
    pub fn start(pod: &Sandbox, port: u16) -> Result<PodServer> {
        PodServer::start(pod, port, drop)
    }
}

/// A minimal HTTP/1.1 server inside a pod's netns: answers every request
/// with `200 OK` and body `ok`, one connection at a time, until dropped.
pub struct HttpOk;

impl HttpOk {
    pub fn start(pod: &Sandbox, port: u16) -> Result<PodServer> {
        PodServer::start(pod, port, |mut s| {
            use std::io::{Read, Write};
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        })
    }
}

/// `GET /` from `from`'s netns to `to`: the response's status code.
pub fn http_status(from: &Sandbox, to: SocketAddr, timeout: Duration) -> Result<u16> {
    use std::io::{Read, Write};
    let resp = from
        .run(move || -> std::io::Result<Vec<u8>> {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(
                format!("GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes(),
            )?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })?
        .ctx(|| format!("GET http://{to}/ from pod {}", from.name))?;
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::Other(format!("not an HTTP response from {to}: {text:?}")))
}

/// A raw ICMP socket inside a pod's netns that records the echo requests
/// arriving there (the receiver's view of another pod's pings), until
/// dropped.
pub struct IcmpTap {
    seen: Arc<std::sync::Mutex<Vec<(std::net::Ipv4Addr, u16)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IcmpTap {
    pub fn start(pod: &Sandbox) -> Result<IcmpTap> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let fd = pod
            .run(|| {
                // SAFETY: plain socket(2); the result is checked.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_INET,
                        libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                        libc::IPPROTO_ICMP,
                    )
                };
                if fd < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    // SAFETY: fd is a fresh, owned descriptor.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                }
            })?
            .ctx(|| format!("raw ICMP socket in pod {}", pod.name))?;
        // std has no raw socket type; UdpSocket only wraps the descriptor
        // for recv with a timeout, which works on any datagram-like socket.
        let sock = std::net::UdpSocket::from(fd);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .ctx(|| "SO_RCVTIMEO".into())?;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, flag) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let Ok(n) = sock.recv(&mut buf) else { continue };
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if n < ihl + 8 || buf[ihl] != 8 {
                    continue; // not an echo request
                }
                let src = std::net::Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                let seq = u16::from_be_bytes([buf[ihl + 6], buf[ihl + 7]]);
                if let Ok(mut v) = rec.lock() {
                    v.push((src, seq));
                }
            }
        });
        Ok(IcmpTap {
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// The sequence numbers of the echo requests seen from `src`, in
    /// arrival order.
    pub fn seqs_from(&self, src: std::net::IpAddr) -> Vec<u16> {
        self.seen
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(s, _)| std::net::IpAddr::V4(*s) == src)
                    .map(|(_, q)| *q)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for IcmpTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a TCP handshake from `from`'s netns to `to` takes; `Ok(None)`
/// when it does not complete within `timeout`.
pub fn tcp_connect_time(
    from: &Sandbox,
    to: SocketAddr,
    timeout: Duration,
) -> Result<Option<Duration>> {
    from.run(move || {
        let t = Instant::now();
        match TcpStream::connect_timeout(&to, timeout) {
            Ok(_) => Some(t.elapsed()),
            Err(_) => None,
        }
    })
}

/// The median handshake time of `n` connections (each bounded by
/// `timeout`); an error if any does not complete.
pub fn tcp_connect_median(
    from: &Sandbox,
    to: SocketAddr,
    n: usize,
    timeout: Duration,
) -> Result<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        match tcp_connect_time(from, to, timeout)? {
            Some(t) => times.push(t),
            None => {
                return Err(Error::Other(format!(
                    "connection {i} from {} to {to} did not complete in {timeout:?}",
                    from.name
                )))
            }
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_lines_are_read() {
        let log = "PING 198.18.1.3 (198.18.1.3): 56 data bytes\n64 bytes from 198.18.1.3: seq=0 ttl=64 time=402.506 ms\n64 bytes from 198.18.1.3: seq=2 ttl=64 time=0.1 ms\n\n--- stats ---\n";
        let r = ping_replies(log);
        assert_eq!(r.len(), 2);
        assert_eq!(r[&0], 402.506);
        assert_eq!(r[&2], 0.1);
    }
}
