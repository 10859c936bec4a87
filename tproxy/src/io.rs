//! The client connection as the proxy reads and writes it, with the TCP
//! faults built in: `tcp-reset` after N bytes, `tcp-bandwidth` token buckets,
//! `tcp-slow-close` (FINs held back), and RST instead of FIN when a fault or
//! a failed upstream asks for it. Everything above (sniffing, hyper, the
//! relay) sees a plain `AsyncRead + AsyncWrite`, so the faults act the same
//! on HTTP and on raw connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::RuleCounters;

/// State shared by everything serving one client connection.
#[derive(Debug, Default)]
pub(crate) struct ConnControl {
    /// Cancelled when a `tcp-reset` fires or an `http-abort` resets an
    /// HTTP/1 connection: the connection task drops everything at once and
    /// the client gets an RST.
    pub reset: CancellationToken,
    /// Close the client with RST rather than FIN (the server connection
    /// failed or was reset), so the client sees what it would without us.
    pub rst_on_close: AtomicBool,
    /// `reset` has fired: read on every read and write, where the token's
    /// own check would take its lock.
    fired: AtomicBool,
}

impl ConnControl {
    pub(crate) fn fire_reset(&self) {
        self.fired.store(true, Ordering::Release);
        self.reset.cancel();
    }

    pub(crate) fn is_reset(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    pub(crate) fn abort_on_close(&self) {
        self.rst_on_close.store(true, Ordering::Relaxed);
    }
}

/// The connection-level faults chosen when the connection was accepted.
#[derive(Debug, Default)]
pub(crate) struct TcpPlan {
    pub reset_after_bytes: Option<(u64, Arc<RuleCounters>)>,
    pub reset_after_time: Option<(Duration, Arc<RuleCounters>)>,
    pub slow_close: Option<Duration>,
    /// Bytes per second, each direction.
    pub bytes_per_sec: Option<u64>,
}

/// A token bucket that refills at `rate` bytes per second up to `burst`.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Smallest grant worth waking up for, so a slow rate does not turn into
    /// a wakeup per byte.
    quantum: f64,
    sleep: Pin<Box<Sleep>>,
}

impl Bucket {
    fn new(bytes_per_sec: u64) -> Bucket {
        let rate = bytes_per_sec.max(1) as f64;
        // 20 ms worth of bytes: small enough that short measurements see the
        // rate, large enough for few wakeups.
        let burst = (rate / 50.0).max(1500.0);
        let now = Instant::now();
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: now,
            quantum: (rate / 200.0).clamp(1.0, 16_384.0),
            sleep: Box::pin(tokio::time::sleep_until(now)),
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// How many of `want` bytes may pass now (at least one), or Pending
    /// until enough tokens have accumulated.
    fn poll_take(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        loop {
            let now = Instant::now();
            self.refill(now);
            let need = (want as f64).min(self.quantum).max(1.0);
            if self.tokens >= need {
                return Poll::Ready((self.tokens.floor() as usize).clamp(1, want.max(1)));
            }
            let wait = Duration::from_secs_f64((need - self.tokens) / self.rate);
            self.sleep.as_mut().reset(now + wait);
            ready!(self.sleep.as_mut().poll(cx));
        }
    }

    fn consume(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// The client's TCP connection with the connection's TCP faults.
pub(crate) struct ClientIo {
    /// `None` only while dropping.
    stream: Option<TcpStream>,
    ctrl: Arc<ConnControl>,
    /// Bytes left before a `tcp-reset` fires, both directions counted.
    budget: Option<(u64, Arc<RuleCounters>)>,
    read_bucket: Option<Bucket>,
    write_bucket: Option<Bucket>,
    slow_close: Option<Duration>,
    /// The client's FIN, held back for `slow_close`.
    eof_delay: Option<Pin<Box<Sleep>>>,
    eof_passed: bool,
    /// Our FIN to the client, held back for `slow_close`.
    shutdown_delay: Option<Pin<Box<Sleep>>>,
    shut: bool,
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "reset by a netfault fault")
}

impl ClientIo {
    pub(crate) fn new(stream: TcpStream, plan: &TcpPlan, ctrl: Arc<ConnControl>) -> ClientIo {
        ClientIo {
            stream: Some(stream),
            ctrl,
            budget: plan.reset_after_bytes.clone(),
            read_bucket: plan.bytes_per_sec.map(Bucket::new),
            write_bucket: plan.bytes_per_sec.map(Bucket::new),
            slow_close: plan.slow_close,
            eof_delay: None,
            eof_passed: false,
            shutdown_delay: None,
            shut: false,
        }
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    fn is_reset(&self) -> bool {
        self.ctrl.is_reset()
    }

    /// Counts `n` bytes against a `tcp-reset` budget; fires it when spent.
    fn spend(&mut self, n: usize) {
        if let Some((left, counters)) = &mut self.budget {
            *left = left.saturating_sub(n as u64);
            if *left == 0 {
                counters.add_affected();
                counters.add_dropped();
                self.budget = None;
                self.ctrl.fire_reset();
            }
        }
    }

    /// The most bytes the next read or write may move, or an error once a
    /// budget is spent.
    fn limit(&self, want: usize) -> io::Result<usize> {
        if self.is_reset() {
            return Err(reset_error());
        }
        Ok(match &self.budget {
            Some((left, _)) => want.min(usize::try_from(*left).unwrap_or(usize::MAX)),
            None => want,
        })
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eof_passed {
            return Poll::Ready(Ok(()));
        }
        if let Some(sleep) = this.eof_delay.as_mut() {
            ready!(sleep.as_mut().poll(cx));
            this.eof_delay = None;
            this.eof_passed = true;
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let mut limit = this.limit(buf.remaining())?;
        if let Some(b) = this.read_bucket.as_mut() {
            limit = ready!(b.poll_take(cx, limit));
        }
        let n = if limit < buf.remaining() {
            let mut sub = buf.take(limit);
            ready!(this.stream()?.poll_read(cx, &mut sub))?;
            let n = sub.filled().len();
            // SAFETY: `sub` is a view of `buf`'s unfilled part, and the
            // reader initialised and filled its first `n` bytes.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
            n
        } else {
            let before = buf.filled().len();
            ready!(this.stream()?.poll_read(cx, buf))?;
            buf.filled().len() - before
        };
        if n == 0 {
            if let Some(d) = this.slow_close {
                let mut sleep = Box::pin(tokio::time::sleep(d));
                if sleep.as_mut().poll(cx).is_pending() {
                    this.eof_delay = Some(sleep);
                    return Poll::Pending;
                }
            }
            this.eof_passed = true;
            return Poll::Ready(Ok(()));
        }
        if let Some(b) = this.read_bucket.as_mut() {
            b.consume(n);
        }
        this.spend(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut limit = this.limit(data.len())?;
        if let Some(b) = this.write_bucket.as_mut() {
            limit = ready!(b.poll_take(cx, limit));
        }
        let n = ready!(this.stream()?.poll_write(cx, &data[..limit]))?;
        if let Some(b) = this.write_bucket.as_mut() {
            b.consume(n);
        }
        this.spend(n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.budget.is_none() && this.write_bucket.is_none() {
            if this.is_reset() {
                return Poll::Ready(Err(reset_error()));
            }
            return this.stream()?.poll_write_vectored(cx, bufs);
        }
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &**b);
        Pin::new(this).poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        self.budget.is_none()
            && self.write_bucket.is_none()
            && self.stream.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().stream()?.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Ok(()));
        }
        if let Some(d) = this.slow_close {
            let sleep = this
                .shutdown_delay
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(d)));
            ready!(sleep.as_mut().poll(cx));
        }
        ready!(this.stream()?.poll_shutdown(cx))?;
        this.shut = true;
        Poll::Ready(Ok(()))
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        if self.is_reset() || self.ctrl.rst_on_close.load(Ordering::Relaxed) {
            reset_after_drain(stream);
            return;
        }
        if let (Some(d), false) = (self.slow_close, self.shut) {
            // Closing is our FIN to the client: hold it back as well.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tokio::time::sleep(d).await;
                    drop(stream);
                });
            }
        }
    }
}

/// The longest a reset waits for the client to acknowledge what was already
/// written to it.
const RESET_DRAIN_MAX: Duration = Duration::from_secs(1);

nix::ioctl_read_bad!(out_queue, nix::libc::TIOCOUTQ, nix::libc::c_int);

/// Bytes written to `stream` that its peer has not acknowledged yet (sent
/// or not), or 0 when the kernel cannot say.
fn unacknowledged(stream: &TcpStream) -> nix::libc::c_int {
    use std::os::fd::AsRawFd;
    let mut n: nix::libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ on a TCP socket) writes one c_int through
    // the pointer, which points at `n`; the fd is open while `stream` lives.
    match unsafe { out_queue(stream.as_raw_fd(), &mut n) } {
        Ok(_) => n,
        Err(_) => 0,
    }
}

/// Closes the client with an RST once it has acknowledged every byte
/// already written to it, waiting at most `RESET_DRAIN_MAX`. An RST throws
/// away the socket's unsent bytes, so resetting at once would cut the
/// client short of what the proxy relayed: `tcp-reset` after N bytes means
/// the client receives N bytes, then the reset.
fn reset_after_drain(stream: TcpStream) {
    let rt = match tokio::runtime::Handle::try_current() {
        Ok(rt) if unacknowledged(&stream) > 0 => rt,
        _ => {
            rst_on_close(&stream);
            return;
        }
    };
    rt.spawn(async move {
        let deadline = Instant::now() + RESET_DRAIN_MAX;
        while unacknowledged(&stream) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        rst_on_close(&stream);
    });
}

/// Makes the coming close send an RST (SO_LINGER with a zero timeout).
pub(crate) fn rst_on_close(stream: &TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "setting SO_LINGER 0 for a reset");
    }
}

/// Makes room for a read into `buf`: `chunk` more bytes when less than
/// 1 KiB is free (reclaiming consumed space first, as `reserve` does).
pub(crate) fn make_room(buf: &mut bytes::BytesMut, chunk: usize) {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(chunk);
    }
}

/// An I/O object with bytes already read from it put back in front.
pub(crate) struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub(crate) fn new(prefix: Bytes, inner: T) -> Prefixed<T> {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if this.prefix.is_empty() {
                // Let go of the sniffing buffer for the connection's life.
                this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How much of a fault's delay is left to a blocking thread's sleep.
const PRECISE_TAIL: Duration = Duration::from_millis(3);

/// Sleeps for `d`, to within about 0.1 ms instead of tokio's timer wheel
/// (which rounds up to the next millisecond, and its reactor's wait to
/// another): the last [`PRECISE_TAIL`] is slept on a blocking thread.
/// For fault delays, which a client measures; not for hot paths.
pub(crate) async fn sleep_precisely(d: Duration) {
    let deadline = std::time::Instant::now() + d;
    if d > PRECISE_TAIL {
        tokio::time::sleep(d - PRECISE_TAIL).await;
    }
    let rest = deadline.saturating_duration_since(std::time::Instant::now());
    if rest.is_zero() {
        return;
    }
    if tokio::task::spawn_blocking(move || std::thread::sleep(rest))
        .await
        .is_err()
    {
        // No blocking pool (runtime shutting down): the timer will do.
        tokio::time::sleep(rest).await;
    }
}
