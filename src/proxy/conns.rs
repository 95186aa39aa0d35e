//! The proxy's own keep-alive connections to the upstreams, for every request but WebSocket
//! handshakes (those go through hyper-util's client, see `upgrade`).
//!
//! Why not hyper-util's pooled client: per request it hashes its pool key (SipHash of the
//! authority), compares authorities, checks a connection out through a waiter queue and hops
//! over a channel to a spawned task that drives the connection, then wakes it back: about a
//! tenth of the CPU of a proxied request. Here each upstream has a small LIFO stack of idle
//! HTTP/1.1 connections ([`IdleConns`], in [`Upstream`]), and a connection's future is driven
//! by the task of the request that uses it: while waiting for the response head
//! ([`send`]), then by the response body ([`PooledBody`]) until its end, when the connection
//! goes back to the stack if it is still good for another request.
//!
//! Idle connections are not polled: a connection that the upstream closed while idle is found
//! out when it is checked out (polling it once reads the close) and dropped; one closed just
//! as a request is written fails before the request leaves (hyper gives the request back) and
//! the request is sent again on another connection, whatever its method, as nothing was sent.
//! One closed after the request was written (the keep-alive race: the write lands in the
//! kernel, then the read gets EOF or a reset) fails with [`SendError::Stale`] when not one
//! byte of an answer came on it ([`Heard`] notes that): the caller decides whether the request
//! may be sent again (a safe method without a body, on a new connection: `fresh`).
//! Idle connections older than [`IDLE_UPSTREAM_CONNECTION`] are dropped at checkout and by
//! [`reap`], so that closed sockets do not linger.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::upstream::Upstream;
use super::UpBody;

/// How long an idle keep-alive connection to core is kept: below puma's `persistent_timeout`
/// (20 s by default), so the edge drops an idle connection before puma would and a request is
/// seldom written into a connection puma is closing.
pub const IDLE_UPSTREAM_CONNECTION: Duration = Duration::from_secs(15);

/// Boxed once when opened: hyper's connection state is large, and it moves between the idle
/// stack, the request and the response body (each move would copy it).
type Conn = Pin<Box<Connection<TokioIo<Heard>, UpBody>>>;

/// An upstream socket that notes when bytes come in (`heard`, shared with the connection's
/// [`Idle`]/[`Lease`], cleared when a kept connection is checked out): hyper tells neither
/// whether a failed request was written nor whether part of an answer had come, and only a
/// request with no byte of answer may be sent again. One relaxed store per read.
struct Heard {
    stream: TcpStream,
    heard: Arc<AtomicBool>,
}

impl AsyncRead for Heard {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // `remaining` is plain arithmetic (`filled()` makes a checked slice).
        let before = buf.remaining();
        let read = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.remaining() < before {
            this.heard.store(true, Ordering::Relaxed);
        }
        read
    }
}

impl AsyncWrite for Heard {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One idle connection: its request sender, the connection, whether bytes came on it, and
/// since when it is idle.
struct Idle {
    send: SendRequest<UpBody>,
    conn: Conn,
    heard: Arc<AtomicBool>,
    since: Instant,
}

/// An upstream's idle connections, newest on top (LIFO: the warmest socket is reused, the
/// oldest age out at the bottom).
#[derive(Default)]
pub struct IdleConns(parking_lot::Mutex<Vec<Idle>>);

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleConns({})", self.0.lock().len())
    }
}

impl IdleConns {
    /// The newest idle connection, unless it is too old (then every one is, and all go).
    fn pop(&self, now: Instant) -> Option<Idle> {
        let mut stack = self.0.lock();
        let top = stack.pop()?;
        if now.saturating_duration_since(top.since) < IDLE_UPSTREAM_CONNECTION {
            return Some(top);
        }
        let old = std::mem::take(&mut *stack);
        drop(stack);
        drop((top, old)); // Sockets are closed outside the lock.
        None
    }

    /// Keeps an idle connection, unless `max` are kept already.
    fn push(&self, idle: Idle, max: usize) {
        let mut stack = self.0.lock();
        if stack.len() < max {
            stack.push(idle);
        }
    }

    /// Drops the connections idle longer than [`IDLE_UPSTREAM_CONNECTION`].
    pub fn reap(&self, now: Instant) {
        let mut stack = self.0.lock();
        let fresh = stack
            .iter()
            .position(|i| now.saturating_duration_since(i.since) < IDLE_UPSTREAM_CONNECTION)
            .unwrap_or(stack.len());
        let old: Vec<Idle> = stack.drain(..fresh).collect();
        drop(stack);
        drop(old);
    }

    /// Idle connections kept now.
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
}

/// Why [`send`] got no response.
#[derive(Debug)]
pub enum SendError {
    /// The connection could not be opened (nothing was sent): the request is given back
    /// (from [`send`]), its body unread, for another upstream.
    Connect(std::io::Error, Option<Box<Request<UpBody>>>),
    /// The exchange failed (the request may have been sent).
    Http(hyper::Error),
    /// A kept connection ended after the request may have been written, before any byte of
    /// an answer came (the upstream closed it as we wrote: the keep-alive race). The request
    /// may have reached the upstream; one that is safe and has no body may be sent
    /// again on a new connection (`fresh`).
    Stale(hyper::Error),
}

/// A connection in use by one request, with what it needs to go back to its stack.
struct Lease {
    send: SendRequest<UpBody>,
    /// None once the connection ended (closed, failed).
    conn: Option<Conn>,
    /// Set by the socket when bytes come in.
    heard: Arc<AtomicBool>,
    upstream: Arc<Upstream>,
    max_idle: usize,
}

impl Lease {
    /// Drives the connection (reads, writes the request body); drops it when it ended.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn {
            if conn.as_mut().poll(cx).is_ready() {
                self.conn = None;
            }
        }
    }

    /// The response has been read to its end: the connection goes back to the stack if it
    /// is ready for another request (not closed, no `Connection: close`).
    fn check_in(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // One poll lets hyper see the exchange finished and ask for the next request. The
        // no-op waker replaces the request task's: an idle connection wakes no one (it is
        // polled again at checkout).
        let mut cx = Context::from_waker(Waker::noop());
        if conn.as_mut().poll(&mut cx).is_pending() && self.send.is_ready() {
            let idle = Idle {
                send: self.send,
                conn,
                heard: self.heard,
                since: Instant::now(),
            };
            self.upstream.idle.push(idle, self.max_idle);
        }
    }
}

/// An idle connection of `upstream` that is still usable (unless `fresh`), with when it was
/// taken, or a new one (None).
async fn checkout(
    upstream: &Arc<Upstream>,
    connect_timeout: Duration,
    fresh: bool,
) -> Result<(Lease, Option<Instant>), SendError> {
    let now = Instant::now();
    while let Some(mut idle) = match fresh {
        true => None,
        false => upstream.idle.pop(now),
    } {
        // Polled once here: a close (or stray bytes) from the upstream while idle ends it.
        // No waker: `send` drives the connection with the task's right after.
        let mut noop = Context::from_waker(Waker::noop());
        let open = idle.conn.as_mut().poll(&mut noop).is_pending();
        if open && idle.send.is_ready() {
            // From here on, a byte read is a byte of this request's answer.
            idle.heard.store(false, Ordering::Relaxed);
            let lease = Lease {
                send: idle.send,
                conn: Some(idle.conn),
                heard: idle.heard,
                upstream: upstream.clone(),
                max_idle: 0,
            };
            return Ok((lease, Some(now)));
        }
    }
    let addr: SocketAddr = upstream.addr;
    let stream = match tokio::time::timeout(connect_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Connect(e, None)),
        Err(_) => {
            return Err(SendError::Connect(
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                None,
            ))
        }
    };
    stream
        .set_nodelay(true)
        .map_err(|e| SendError::Connect(e, None))?;
    let heard = Arc::new(AtomicBool::new(false));
    let io = Heard {
        stream,
        heard: heard.clone(),
    };
    let (send, conn) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(SendError::Http)?;
    let lease = Lease {
        send,
        conn: Some(Box::pin(conn)),
        heard,
        upstream: upstream.clone(),
        max_idle: 0,
    };
    Ok((lease, None))
}

/// How soon after a request is written into a kept connection its failure (with no byte of
/// an answer) counts as the keep-alive race ([`SendError::Stale`]): the upstream had closed
/// the connection, which shows at once. A failure after core worked on the request longer
/// (a worker killed mid-request) is not the race: that request is not sent again.
const STALE_WINDOW: Duration = Duration::from_secs(1);

/// Sends `req` (origin-form URI, `Host` set) to `upstream` on an idle connection or a new
/// one, and returns the response head; its body drives the connection to its end.
/// `max_idle`: the most idle connections the upstream keeps; `fresh`: on a new connection,
/// not a kept one (a request sent again after [`SendError::Stale`]).
pub async fn send(
    upstream: &Arc<Upstream>,
    mut req: Request<UpBody>,
    connect_timeout: Duration,
    max_idle: usize,
    fresh: bool,
) -> Result<Response<PooledBody>, SendError> {
    loop {
        // `reused`: when a kept connection was taken (the request is written right after).
        let (mut lease, reused) = match checkout(upstream, connect_timeout, fresh).await {
            Ok(checked_out) => checked_out,
            Err(SendError::Connect(e, _)) => {
                return Err(SendError::Connect(e, Some(Box::new(req))))
            }
            Err(e) => return Err(e),
        };
        lease.max_idle = max_idle;
        let mut answer = std::pin::pin!(lease.send.try_send_request(req));
        // The connection and the response are polled together in this task. When the
        // connection ends, dropping it hands its error (or the unsent request) to `answer`.
        // Only `drive` can complete `answer`, and `answer` is polled right after it: it needs
        // no waker of its own (with the task's, the connection would wake the task it runs
        // in for nothing, one extra poll of the whole connection per request).
        let answered = std::future::poll_fn(|cx| {
            lease.drive(cx);
            answer
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
        })
        .await;
        match answered {
            Ok(resp) => {
                // The connection now waits for the body to be wanted, with the task's waker;
                // the body's first poll would wake the task it runs in. Polled once more
                // without a waker instead: the body drives it (with the task's) before it
                // ever returns `Pending`.
                if let Some(conn) = &mut lease.conn {
                    let mut noop = Context::from_waker(Waker::noop());
                    if conn.as_mut().poll(&mut noop).is_ready() {
                        lease.conn = None;
                    }
                }
                return Ok(resp.map(|inner| PooledBody {
                    inner,
                    lease: Some(lease),
                    done: false,
                }));
            }
            Err(mut e) => match e.take_message() {
                // A kept connection that closed before the request left: again, on another.
                Some(unsent) if reused.is_some() => {
                    tracing::debug!(upstream = %upstream.addr, "proxy: idle connection closed; sending on another");
                    req = unsent;
                }
                _ => {
                    let e = e.into_error();
                    // Not a byte of an answer on a kept connection, and at once: the caller
                    // may send the request again (the client's own body failing is not the
                    // upstream's). Later, core worked on it and died: not sent again.
                    let at_once = reused.is_some_and(|t| t.elapsed() < STALE_WINDOW);
                    if at_once && !e.is_user() && !lease.heard.load(Ordering::Relaxed) {
                        return Err(SendError::Stale(e));
                    }
                    return Err(SendError::Http(e));
                }
            },
        }
    }
}

/// An upstream's response body that drives its connection, and gives the connection back to
/// its upstream's idle stack once read to the end (a body dropped before its end, or an
/// error, closes the connection: the rest of the response is never read into another
/// request's).
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
    done: bool,
}

impl PooledBody {
    fn finish(&mut self) {
        self.done = true;
        if let Some(lease) = self.lease.take() {
            lease.check_in();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = match &mut this.lease {
            Some(lease) if lease.conn.is_some() => {
                // Only the connection feeds `inner`, and `inner` is polled again right after
                // driving it: as for `answer` in `send`, `inner` needs no waker of its own.
                let mut noop = Context::from_waker(Waker::noop());
                match Pin::new(&mut this.inner).poll_frame(&mut noop) {
                    Poll::Pending => {
                        lease.drive(cx);
                        Pin::new(&mut this.inner).poll_frame(&mut noop)
                    }
                    ready => ready,
                }
            }
            _ => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match &frame {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.lease = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A response without a body (HEAD, 204, 304) is never polled: it ended all the same.
        if self.lease.is_some() && self.inner.is_end_stream() {
            self.finish();
        }
    }
}

/// Every `IDLE_UPSTREAM_CONNECTION / 3`, drops the idle connections too old to be used, of
/// the upstreams `upstreams` returns (the pools in use), until the future is dropped.
pub async fn reap<F: Fn() -> Vec<Arc<Upstream>>>(upstreams: F) {
    let mut tick = tokio::time::interval(IDLE_UPSTREAM_CONNECTION / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        for u in upstreams() {
            u.idle.reap(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::upstream::Pool;

    /// Idle connections age out: at checkout past the idle time, and by `reap` (oldest first).
    #[tokio::test]
    async fn idle_connections_age_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap().0);
            }
        });
        let pool = Pool::new(&[addr], 4, 5, Duration::from_secs(1));
        let up = pool.upstreams[0].clone();
        let mut leases = Vec::new();
        for _ in 0..2 {
            let (mut lease, reused) = checkout(&up, Duration::from_secs(5), false).await.unwrap();
            assert!(reused.is_none());
            lease.max_idle = 4;
            leases.push(lease);
        }
        // Connected: from here on, the clock moves only when told.
        tokio::time::pause();
        leases.pop().unwrap().check_in();
        assert_eq!(up.idle.len(), 1, "a fresh connection is kept");
        tokio::time::advance(Duration::from_secs(10)).await;
        leases.pop().unwrap().check_in();
        tokio::time::advance(Duration::from_secs(6)).await;
        up.idle.reap(Instant::now());
        assert_eq!(
            up.idle.len(),
            1,
            "the older one (16 s idle) went, the newer stays"
        );
        let idle = up
            .idle
            .pop(Instant::now())
            .expect("6 s idle is still usable");
        up.idle.push(idle, 4);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(
            up.idle.pop(Instant::now()).is_none(),
            "16 s idle is too old"
        );
        assert_eq!(up.idle.len(), 0);
    }
}
