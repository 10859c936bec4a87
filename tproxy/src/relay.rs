//! Byte relay for everything that is not HTTP (TLS, databases, protocols
//! where the server speaks first). Bytes pass untouched, and the client sees
//! the connection end as it would directly:
//! - a FIN from one side becomes a FIN to the other (half-close), in the
//!   order the sides sent them;
//! - the server's bytes are relayed whatever happens to the client's: a
//!   server that answers at once and closes without reading (an early
//!   error, a banner and goodbye) refuses the client's bytes, which are
//!   then discarded as its kernel would, while its answer (which the
//!   kernel returns before the error) still reaches the client;
//! - a server's reset, or a refused write, becomes a reset to the client
//!   once the client has acknowledged what was relayed (`ClientIo`'s drop);
//! - an error on the client's side resets the server.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::io::{rst_on_close, ConnControl};

/// Per direction: large enough for full-speed loopback copies, small
/// enough for many idle connections.
const BUF: usize = 32 << 10;

/// What the server did with the client's bytes.
const ACCEPTED: u8 = 0;
/// A write failed with `EPIPE`: the server had closed (FIN) and its
/// kernel answered our bytes with a reset.
const REFUSED: u8 = 1;
/// A write failed with `ECONNRESET`: the server reset the connection. The
/// error is the socket's, taken by the write: its reads then end in EOF.
const REFUSED_RESET: u8 = 2;

/// How the server's direction ended.
enum ServerEnd {
    /// FIN, relayed to the client.
    Fin,
    /// Reset: the client gets one too.
    Reset,
}

/// Why the relay stopped early.
enum Stop {
    /// The client's side failed (it reset us, or a write to it failed).
    Client(io::Error),
    /// The server's side failed otherwise than by closing or resetting.
    Server(io::Error),
}

/// Whether a write error means the server has closed or reset.
fn server_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

pub(crate) async fn relay<C>(
    client: C,
    mut upstream: TcpStream,
    ctrl: &ConnControl,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let refused = AtomicU8::new(ACCEPTED);
    let outcome = {
        let (mut ur, mut uw) = upstream.split();
        let refused = &refused;
        let client_to_server = async {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = cr.read(&mut buf).await.map_err(Stop::Client)?;
                if n == 0 {
                    if refused.load(Ordering::Relaxed) == ACCEPTED {
                        // The server may be gone meanwhile: its reads
                        // tell, not this.
                        let _ = uw.shutdown().await;
                    }
                    return Ok::<(), Stop>(());
                }
                if refused.load(Ordering::Relaxed) != ACCEPTED {
                    continue;
                }
                if let Err(e) = uw.write_all(&buf[..n]).await {
                    if !server_gone(&e) {
                        return Err(Stop::Server(e));
                    }
                    tracing::debug!(error = %e, "the server refused the client's bytes");
                    let how = if e.kind() == io::ErrorKind::ConnectionReset {
                        REFUSED_RESET
                    } else {
                        REFUSED
                    };
                    refused.store(how, Ordering::Relaxed);
                }
            }
        };
        let server_to_client = async {
            let mut buf = vec![0u8; BUF];
            loop {
                let n = match ur.read(&mut buf).await {
                    Ok(0) if refused.load(Ordering::Relaxed) == REFUSED_RESET => {
                        return Ok(ServerEnd::Reset)
                    }
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                        return Ok(ServerEnd::Reset)
                    }
                    Err(e) => return Err(Stop::Server(e)),
                };
                cw.write_all(&buf[..n]).await.map_err(Stop::Client)?;
            }
            cw.shutdown().await.map_err(Stop::Client)?;
            Ok::<ServerEnd, Stop>(ServerEnd::Fin)
        };
        tokio::pin!(client_to_server, server_to_client);
        let mut client_done = false;
        let mut server_done = false;
        loop {
            tokio::select! {
                r = &mut client_to_server, if !client_done => match r {
                    Ok(()) => client_done = true,
                    Err(stop) => break Err(stop),
                },
                r = &mut server_to_client, if !server_done => match r {
                    Ok(ServerEnd::Fin) => server_done = true,
                    Ok(ServerEnd::Reset) => break Ok(ServerEnd::Reset),
                    Err(stop) => break Err(stop),
                },
            }
            if server_done && refused.load(Ordering::Relaxed) != ACCEPTED {
                // The server's kernel reset the client's bytes: after its
                // answer and FIN, the client sees that reset.
                break Ok(ServerEnd::Reset);
            }
            if client_done && server_done {
                break Ok(ServerEnd::Fin);
            }
        }
    };
    match outcome {
        Ok(ServerEnd::Fin) => Ok(()),
        Ok(ServerEnd::Reset) => {
            ctrl.abort_on_close();
            Ok(())
        }
        Err(Stop::Client(e)) => {
            ctrl.abort_on_close();
            rst_on_close(&upstream);
            Err(ProxyError::Relay(e))
        }
        Err(Stop::Server(e)) => {
            ctrl.abort_on_close();
            rst_on_close(&upstream);
            Err(ProxyError::Relay(e))
        }
    }
}
