//! The proxy's error type: what was being attempted, and why it failed.

use std::io;
use std::net::SocketAddr;

/// A boxed error from a body or a service.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("connecting to the server {to}: {source}")]
    Connect { to: SocketAddr, source: io::Error },
    #[error("reading the client's first bytes: {0}")]
    Sniff(io::Error),
    #[error("relaying bytes: {0}")]
    Relay(io::Error),
    #[error("HTTP handshake with the server: {0}")]
    UpstreamHandshake(hyper::Error),
    #[error("serving HTTP to the client: {0}")]
    Serve(hyper::Error),
    #[error("forwarding a request to the server: {0}")]
    Forward(hyper::Error),
    #[error("reading a message body: {0}")]
    Body(BoxError),
    #[error("the server connection closed")]
    UpstreamClosed,
    #[error("request reset by an http-abort fault")]
    AbortReset,
    #[error("connection reset by a fault")]
    FaultReset,
    #[error("relaying an upgraded connection: {0}")]
    Upgrade(BoxError),
}

impl ProxyError {
    /// Errors that are part of normal operation (peers going away, faults
    /// doing their job) and are logged at debug level only.
    pub fn is_expected(&self) -> bool {
        match self {
            ProxyError::AbortReset | ProxyError::FaultReset | ProxyError::UpstreamClosed => true,
            // A server that is down is part of chaos; anything else (a
            // refused transparent bind, no route) is worth a warning.
            ProxyError::Connect { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::TimedOut
            ),
            ProxyError::Sniff(e) | ProxyError::Relay(e) => is_disconnect(e),
            ProxyError::Serve(e) => {
                // A failed request (the service's own error) says more.
                match std::error::Error::source(e).and_then(|s| s.downcast_ref::<ProxyError>()) {
                    Some(inner) => inner.is_expected(),
                    None => {
                        e.is_canceled()
                            || e.is_closed()
                            || e.is_incomplete_message()
                            || hyper_io_disconnect(e)
                    }
                }
            }
            ProxyError::Forward(e) | ProxyError::UpstreamHandshake(e) => {
                e.is_canceled()
                    || e.is_closed()
                    || e.is_incomplete_message()
                    || hyper_io_disconnect(e)
            }
            ProxyError::Body(_) | ProxyError::Upgrade(_) => true,
        }
    }
}

pub(crate) fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::NotConnected
    )
}

fn hyper_io_disconnect(e: &hyper::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return is_disconnect(io);
        }
        src = s.source();
    }
    false
}
