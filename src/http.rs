//! A tiny blocking HTTP/1.1 server and client for the demo: what a client
//! pod sees from a server pod (status codes and latency), with real sockets
//! opened inside the pods' namespaces.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::error::{Context, Error};
use crate::traffic::Acceptor;
use crate::{in_netns, Pod, Result};

/// An HTTP/1.1 server on `[::]:port` inside a pod: every request gets 200
/// with a small JSON body naming its path and the peer address the server
/// saw. One request per connection (`Connection: close`). Dropping it stops
/// accepting.
#[derive(Debug)]
pub struct HttpServer {
    _acceptor: Acceptor,
}

/// Starts an [`HttpServer`] in `pod` on `port`.
pub fn http_serve(pod: &Pod, port: u16) -> Result<HttpServer> {
    let acceptor = Acceptor::start(pod, port, Duration::from_micros(200), |conn, peer, _| {
        answer(conn, peer)
    })?;
    Ok(HttpServer {
        _acceptor: acceptor,
    })
}

/// Reads until the end of the head (`\r\n\r\n`) or EOF.
fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

fn answer(mut conn: TcpStream, peer: SocketAddr) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let Ok(head) = read_head(&mut conn) else {
        return;
    };
    let line = String::from_utf8_lossy(&head);
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let peer = match peer.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(IpAddr::V6(v6), IpAddr::V4)
            .to_string(),
        v4 => v4.to_string(),
    };
    let body = format!("{{\"path\":\"{path}\",\"peer\":\"{peer}\"}}");
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(reply.as_bytes());
}

/// What a client saw for one request.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code; 0 when the connection was reset or closed without
    /// a reply.
    pub status: u16,
    pub body: String,
    /// From connect to the end of the reply.
    pub elapsed: Duration,
}

/// `GET path` from `from` to `to_ip:port` on a new connection.
pub fn http_get(from: &Pod, to_ip: IpAddr, port: u16, path: &str) -> Result<HttpReply> {
    let addr = SocketAddr::new(to_ip, port);
    let start = Instant::now();
    let mut conn = in_netns(from.netns.path(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })?
    .ctx(|| format!("HTTP connect from pod {} to {addr}", from.name))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .ctx(|| "read timeout".into())?;
    let host = match to_ip {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes())
        .ctx(|| format!("sending a request to {addr}"))?;
    let mut raw = Vec::new();
    let outcome = conn.read_to_end(&mut raw);
    let elapsed = start.elapsed();
    if let Err(e) = outcome {
        if raw.is_empty() && e.kind() != std::io::ErrorKind::ConnectionReset {
            return Err(Error::Io {
                context: format!("reading the reply from {addr}"),
                source: e,
            });
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok(HttpReply {
        status,
        body,
        elapsed,
    })
}
