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

/// A TCP listener inside a pod's netns that accepts (and drops) every
/// connection on a background thread until dropped.
pub struct TcpSink {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpSink {
    /// Listens on the pod's primary IP and `port`.
    pub fn start(pod: &Sandbox, port: u16) -> Result<TcpSink> {
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
                    Ok((s, _)) => drop(s),
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(TcpSink {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpSink {
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
