//! A small blocking HTTP/1.1 client for the agent's unix socket, or for its
//! loopback TCP listener with a bearer token ([`Client::tcp`]).
//!
//! The CNI plugin runs once per pod with a tight latency budget and must not
//! start an async runtime, so this is plain `std` I/O with timeouts. It speaks
//! just enough HTTP/1.1 for the agent: one request per connection,
//! `Content-Length` or chunked responses.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to netfaultd at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to netfaultd at {url}: {source}")]
    ConnectTcp { url: String, source: std::io::Error },
    #[error("invalid agent URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("i/o with netfaultd failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed response from netfaultd: {0}")]
    Protocol(String),
    #[error("netfaultd answered {status}: {message}")]
    Api {
        status: u16,
        /// The error's code as the agent spelled it (an [`ErrorCode`]'s
        /// wire name, or `unknown`); kept as text so that a code from a
        /// newer agent still reaches the caller.
        ///
        /// [`ErrorCode`]: crate::ErrorCode
        code: String,
        field: Option<String>,
        message: String,
    },
}

#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
    /// `Some`: talk to this TCP listener instead of `socket`.
    tcp: Option<TcpEndpoint>,
    /// Sent as `Authorization: Bearer <token>`; never printed.
    token: Option<String>,
    timeout: Duration,
}

/// `http://HOST:PORT` of a TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TcpEndpoint {
    url: String,
    host: String,
    port: u16,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Splits `http://HOST:PORT[/]` (HOST a name, an IPv4 address or a
/// bracketed IPv6 address).
fn parse_url(url: &str) -> Result<TcpEndpoint, ClientError> {
    let bad = |reason: &str| ClientError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http://HOST:PORT is supported (the agent listens on loopback; use kubectl port-forward to reach it)"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad(
            "give only http://HOST:PORT, without a path, query or user",
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or_else(|| bad("an IPv6 address needs a closing ]"))?;
        (h, p.strip_prefix(':').unwrap_or(""))
    } else {
        authority.rsplit_once(':').unwrap_or((authority, ""))
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("needs a port from 1 to 65535 (http://HOST:PORT)"))?;
    Ok(TcpEndpoint {
        url: url.to_string(),
        host: host.to_string(),
        port,
    })
}

/// A raw response: status and body bytes.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<Value, ClientError> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
            tcp: None,
            token: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// A client for the agent's TCP listener at `url` (`http://HOST:PORT`).
    /// It needs a token ([`Client::with_token`]) unless the agent is reached
    /// through something that adds one.
    pub fn tcp(url: &str) -> Result<Self, ClientError> {
        let endpoint = parse_url(url)?;
        Ok(Client {
            tcp: Some(endpoint),
            ..Client::new("")
        })
    }

    /// Sends `Authorization: Bearer <token>` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Where requests go: the socket's path, or the TCP URL.
    pub fn endpoint(&self) -> String {
        match &self.tcp {
            Some(t) => t.url.clone(),
            None => self.socket.display().to_string(),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The unix socket (empty for a TCP client, see [`Client::endpoint`]).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn connect(&self) -> Result<Box<dyn Stream>, ClientError> {
        let Some(t) = &self.tcp else {
            let stream =
                UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            return Ok(Box::new(stream));
        };
        let fail = |source| ClientError::ConnectTcp {
            url: t.url.clone(),
            source,
        };
        let addrs = (t.host.as_str(), t.port).to_socket_addrs().map_err(fail)?;
        let mut last = std::io::Error::other("the host name resolved to no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(self.timeout))?;
                    stream.set_write_timeout(Some(self.timeout))?;
                    let _ = stream.set_nodelay(true);
                    return Ok(Box::new(stream));
                }
                Err(e) => last = e,
            }
        }
        Err(fail(last))
    }

    /// Sends one request and returns the status and body, whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        if let Some(t) = &self.token {
            if t.is_empty() || !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(ClientError::Protocol(
                    "the bearer token must be printable ASCII without spaces".into(),
                ));
            }
        }
        let mut stream = self.connect()?;
        let body = body.unwrap_or_default();
        let host = match &self.tcp {
            Some(t) if t.host.contains(':') => format!("[{}]:{}", t.host, t.port),
            Some(t) => format!("{}:{}", t.host, t.port),
            None => "netfaultd".to_string(),
        };
        let auth = match &self.token {
            Some(t) => format!("Authorization: Bearer {t}\r\n"),
            None => String::new(),
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        stream.write_all(&req)?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf)?;
        parse_response(&buf)
    }

    /// Sends JSON and returns the JSON answer; a 4xx/5xx becomes [`ClientError::Api`].
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let resp = self.raw(method, path, bytes.as_deref())?;
        if resp.status >= 400 {
            let v = resp.json().unwrap_or(Value::Null);
            let e = &v["error"];
            return Err(ClientError::Api {
                status: resp.status,
                code: e["code"].as_str().unwrap_or("unknown").to_string(),
                field: e["field"].as_str().map(str::to_string),
                message: e["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&resp.body).into_owned()),
            });
        }
        resp.json()
    }
}

/// A connected stream of either kind.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn parse_response(buf: &[u8]) -> Result<Response, ClientError> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".into()))?;
    let head = std::str::from_utf8(&buf[..split])
        .map_err(|_| ClientError::Protocol("headers are not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim();
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let rest = &buf[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else {
        match length {
            Some(n) if n <= rest.len() => rest[..n].to_vec(),
            Some(_) => return Err(ClientError::Protocol("truncated body".into())),
            None => rest.to_vec(),
        }
    };
    Ok(Response { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::Protocol("bad chunk header".into()))?;
        let size_str = std::str::from_utf8(&data[..eol]).unwrap_or_default();
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| ClientError::Protocol(format!("bad chunk size {size_str:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(ClientError::Protocol("truncated chunk".into()));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_length_and_chunked() {
        let r = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").expect("ok");
        assert_eq!((r.status, r.body.as_slice()), (201, &b"{}"[..]));
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            .expect("ok");
        assert_eq!(r.body, b"abcde");
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn parses_agent_urls() {
        let e = parse_url("http://127.0.0.1:7979").expect("ok");
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 7979));
        let e = parse_url("http://[::1]:80/").expect("ok");
        assert_eq!((e.host.as_str(), e.port), ("::1", 80));
        let e = parse_url("http://localhost:1").expect("ok");
        assert_eq!((e.host.as_str(), e.port), ("localhost", 1));
        for bad in [
            "https://127.0.0.1:7979",
            "127.0.0.1:7979",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:7979/v1",
            "http://:7979",
            "http://[::1:7979",
        ] {
            assert!(
                matches!(parse_url(bad), Err(ClientError::Url { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let c = Client::tcp("http://127.0.0.1:7979")
            .expect("url")
            .with_token("very-secret-token");
        let shown = format!("{c:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("127.0.0.1:7979"), "{shown}");
    }
}
