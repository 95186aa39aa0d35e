//! Bodies passed through the proxy piece by piece (what reads them ahead, into memory and a
//! temp file, is `spool` and `stored`).
//!
//! - [`LimitedBody`]: the client's request body, cut with an error past the size limit
//!   (the handler then answers 413).
//! - [`GuardedBody`]: the upstream's response body, holding the upstream's connection permit
//!   until it ends, and cut when the upstream is silent longer than the idle timeout.
//! - [`Silence`]: that idle timer, also the request body's (`prebuffer`).
//! - [`Uploaded`]: a streamed request body that says when it has all been handed on, for
//!   the first-byte timeout to start then (an upload on a slow link is paced by its
//!   client, not by core).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

/// A request body that fails once more than its limit has come.
pub struct LimitedBody<B = Incoming> {
    inner: B,
    left: u64,
    exceeded: Arc<AtomicBool>,
}

impl<B> LimitedBody<B> {
    /// `exceeded` is set when the limit is passed.
    pub fn new(inner: B, limit: u64, exceeded: Arc<AtomicBool>) -> LimitedBody<B> {
        LimitedBody {
            inner,
            left: limit,
            exceeded,
        }
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.left {
                        this.exceeded.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(std::io::Error::other(
                            "request body over the limit",
                        ))));
                    }
                    this.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(std::io::Error::other(e.into())))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `hint` grown by `n` bytes held ahead of the body it describes (what a body that gives
/// those bytes first, then the rest, says of its size).
pub(super) fn plus(hint: SizeHint, n: u64) -> SizeHint {
    let mut out = SizeHint::new();
    out.set_lower(hint.lower() + n);
    if let Some(upper) = hint.upper() {
        out.set_upper(upper + n);
    }
    out
}

/// The longest silence a body may keep between two pieces: a timer started when the body
/// first waits, dropped by the next piece.
pub(super) struct Silence {
    limit: Option<Duration>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Silence {
    /// `limit`: None for no limit.
    pub(super) fn new(limit: Option<Duration>) -> Silence {
        Silence { limit, timer: None }
    }

    /// The limit (None: none).
    pub(super) fn limit(&self) -> Option<Duration> {
        self.limit
    }

    /// What a body's poll gave, with a `TimedOut` error saying `what` in place of a wait
    /// that has lasted `limit` since the last piece (the timer starts at the first wait,
    /// and `cx` is woken when it runs out).
    pub(super) fn watch(
        &mut self,
        polled: Poll<Option<Result<Frame<Bytes>, std::io::Error>>>,
        cx: &mut Context<'_>,
        what: &'static str,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if polled.is_ready() {
            self.timer = None;
            return polled;
        }
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                what,
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// An upstream's response body on its way to the client.
pub struct GuardedBody<B = Incoming> {
    inner: B,
    silence: Silence,
    _permit: OwnedSemaphorePermit,
}

impl<B> GuardedBody<B> {
    /// `idle`: longest silence allowed between two pieces (None for streaming).
    pub fn new(inner: B, idle: Option<Duration>, permit: OwnedSemaphorePermit) -> Self {
        GuardedBody {
            inner,
            silence: Silence::new(idle),
            _permit: permit,
        }
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(std::io::Error::other)));
        this.silence
            .watch(polled, cx, "upstream silent past the idle timeout")
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streamed request body that tells each piece it hands on (a change of its `watch`,
/// whose value says whether that was the last), and whether it waits on its client (polled,
/// nothing yet) or on the upstream (not asked for more).
pub struct Uploaded<B> {
    inner: B,
    progress: tokio::sync::watch::Sender<bool>,
    on_client: Arc<AtomicBool>,
}

impl<B> Uploaded<B> {
    /// The body, its progress (true once it has all gone), and whether it waits on its
    /// client.
    pub fn new(
        inner: B,
    ) -> (
        Uploaded<B>,
        tokio::sync::watch::Receiver<bool>,
        Arc<AtomicBool>,
    ) {
        let (progress, rx) = tokio::sync::watch::channel(false);
        let on_client = Arc::new(AtomicBool::new(false));
        let body = Uploaded {
            inner,
            progress,
            on_client: on_client.clone(),
        };
        (body, rx, on_client)
    }
}

impl<B> Body for Uploaded<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Poll::Ready(polled) = Pin::new(&mut this.inner).poll_frame(cx) else {
            this.on_client.store(true, Ordering::Relaxed);
            return Poll::Pending;
        };
        this.on_client.store(false, Ordering::Relaxed);
        let end = match &polled {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        // Told even when nothing changes: each piece is progress.
        this.progress.send_modify(|done| *done |= end);
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
