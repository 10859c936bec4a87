//! Byte relay for everything that is not HTTP (TLS, databases, protocols
//! where the server speaks first). Bytes pass untouched; a FIN from one side
//! becomes a FIN to the other (half-close), an error or reset on either side
//! becomes an RST to both.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::io::{rst_on_close, ConnControl};

/// Per direction: large enough for full-speed loopback copies, small
/// enough for many idle connections.
const BUF: usize = 32 << 10;

pub(crate) async fn relay<C>(
    mut client: C,
    mut upstream: TcpStream,
    ctrl: &ConnControl,
) -> Result<(), ProxyError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, BUF, BUF).await {
        Ok(_) => Ok(()),
        Err(e) => {
            ctrl.abort_on_close();
            rst_on_close(&upstream);
            Err(ProxyError::Relay(e))
        }
    }
}
