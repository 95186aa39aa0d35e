//! The idle timeout of connections, HTTP/1.1 and HTTP/2 alike. Every request holds an
//! [`Active`] guard until its response body ends or is dropped, and [`idle`] returns once a
//! connection has had no request under way and none started for a whole [`IDLE_TIMEOUT`]
//! period. The caller then closes the connection: HTTP/2 gracefully (GOAWAY), HTTP/1.1 at once
//! (nothing is under way on it).
//!
//! Done here, not by hyper: hyper has no idle timeout for an HTTP/2 server (its PINGs only find
//! a client that is gone; one that answers them may hold the connection, and its place under
//! `max_connections`, for ever). For HTTP/1.1, hyper's `header_read_timeout` would do (it also
//! runs while a keep-alive connection waits for its next request), but it arms and disarms a
//! timer on every request, about 7 % of the instructions of a small cached hit; one sleep per
//! period per connection costs nothing per request. The same check also drops a client that
//! sends its header block too slowly (it starts no request): the slow-client guard.
//!
//! And the send timeout: a client that reads nothing (its receive window stays full) while a
//! response waits to be written would hold its connection, and the response's upstream or
//! cache work, for ever; hyper has no write timeout. [`Watched`] marks the connection blocked
//! when a write cannot go on and unblocked when one goes on (only those rare moments cost
//! anything), and [`idle`] reports [`Stop::Stalled`] once a write has been blocked for a
//! whole period (so after one to two) while the kernel's send queue of the socket did not
//! shrink either: a client that reads, however slowly or in bursts, keeps its connection
//! (the kernel wakes a blocked writer only once half its queue is free, which on a large
//! queue and a slow reader can take longer than a period). The caller cuts the connection.

use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Body;

/// A connection with nothing under way is closed after one to two of these; so is one whose
/// client takes that long to send a request's header block.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One request started: the high half counts starts, the low half what is under way.
const STARTED: u64 = 1 << 32;

/// What one connection has under way: one word, so that a request costs one atomic add when
/// it starts and one when it ends. The low 32 bits count the requests whose response has not
/// ended; the high 32 bits count the requests started (wrapping), so a change between two
/// checks is activity.
#[derive(Debug, Default)]
pub(super) struct Activity {
    requests: AtomicU64,
    /// A write could not go on (the client reads nothing) and none has gone on since.
    blocked: AtomicBool,
    /// Times `blocked` was cleared: a change between two checks is progress.
    unblocked: AtomicU64,
}

/// Why [`idle`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// Nothing under way and nothing started for a whole period.
    Idle,
    /// A write blocked for a whole period: the client reads nothing.
    Stalled,
}

/// One request under way; dropped when its response body ends or is dropped.
pub(super) struct Active(Arc<Activity>);

impl Activity {
    /// A request starts.
    pub(super) fn start(self: &Arc<Self>) -> Active {
        self.requests.fetch_add(STARTED + 1, Ordering::AcqRel);
        Active(self.clone())
    }

    /// Requests whose response has not ended.
    fn under_way(word: u64) -> u64 {
        word & (STARTED - 1)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once `activity` shows no request under way, none started and no write waiting
/// for a whole [`IDLE_TIMEOUT`], or a write blocked for as long with nothing leaving the
/// send queue of `socket` (so after one to two periods).
pub(super) async fn idle(activity: &Activity, socket: Option<RawFd>) -> Stop {
    let mut seen = activity.requests.load(Ordering::Acquire);
    let mut seen_unblocked = activity.unblocked.load(Ordering::Acquire);
    let mut was_blocked = false;
    let mut seen_unsent = None;
    loop {
        tokio::time::sleep(IDLE_TIMEOUT).await;
        let now = activity.requests.load(Ordering::Acquire);
        let unblocked = activity.unblocked.load(Ordering::Acquire);
        let blocked = activity.blocked.load(Ordering::Acquire);
        // A response body may have ended (handed whole to hyper) while its bytes still wait
        // to be written: blocked, that is not idle (but may be stalled).
        if now == seen && Activity::under_way(now) == 0 && !blocked {
            return Stop::Idle;
        }
        let unsent = socket.and_then(unsent);
        let drained = matches!((seen_unsent, unsent), (Some(before), Some(now)) if now < before);
        if blocked && was_blocked && unblocked == seen_unblocked && !drained {
            return Stop::Stalled;
        }
        (seen, seen_unblocked, was_blocked) = (now, unblocked, blocked);
        seen_unsent = unsent;
    }
}

/// Bytes in the send queue of `socket` that the peer has not acknowledged yet (`TIOCOUTQ`),
/// if the kernel says.
fn unsent(socket: RawFd) -> Option<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int into `n`. `socket` is the connection's own socket,
    // open for as long as the connection task that calls this runs.
    let done = unsafe { libc::ioctl(socket, libc::TIOCOUTQ, &mut n) };
    (done == 0).then(|| u64::try_from(n).unwrap_or(0))
}

/// A connection's socket (or TLS stream) that tells its [`Activity`] when writes block and
/// when they go on again.
pub(super) struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub(super) fn new(io: S, activity: Arc<Activity>) -> Watched<S> {
        Watched { io, activity }
    }

    /// Notes how a write or flush went: pending marks the connection blocked, anything else
    /// (done or failed) unblocks it. A relaxed load in the usual case.
    fn note<T>(&self, polled: Poll<T>) -> Poll<T> {
        let a = &self.activity;
        match polled {
            Poll::Pending => {
                if !a.blocked.load(Ordering::Relaxed) {
                    a.blocked.store(true, Ordering::Release);
                }
            }
            Poll::Ready(_) => {
                if a.blocked.load(Ordering::Relaxed) {
                    a.blocked.store(false, Ordering::Release);
                    a.unblocked.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        polled
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.note(polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A response body that holds its request's [`Active`] until it ends or is dropped. The
/// listener's responses have this type (not boxed once more: one allocation per request less).
pub(super) struct Held {
    body: Body,
    active: Option<Active>,
}

impl Held {
    /// `body`, holding `active`.
    pub(super) fn new(body: Body, active: Active) -> Held {
        Held {
            body,
            active: Some(active),
        }
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            self.active = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_response_and_a_quiet_period() {
        let activity = Arc::new(Activity::default());
        let body = Held::new(
            http_body_util::Full::new(Bytes::from_static(b"x"))
                .map_err(|e| match e {})
                .boxed_unsync(),
            activity.start(),
        );
        let started = tokio::time::Instant::now();
        let watch = {
            let a = activity.clone();
            tokio::spawn(async move { idle(&a, None).await })
        };
        // A response under way: never idle.
        tokio::time::sleep(IDLE_TIMEOUT * 5).await;
        assert!(!watch.is_finished());
        // The body read to its end frees the connection.
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"x");
        assert_eq!(
            Activity::under_way(activity.requests.load(Ordering::Acquire)),
            0
        );
        assert_eq!(watch.await.unwrap(), Stop::Idle);
        assert!(started.elapsed() >= IDLE_TIMEOUT * 5);
    }
}
