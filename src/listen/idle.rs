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
//! And the send timeout: a client that reads nothing would hold its connection, and the work
//! of its responses (a cache file, a flight, an upstream connection), for ever; hyper has no
//! write timeout. A connection waits on its client when a write to its socket cannot go on
//! (`super::socket` marks it blocked, and unblocked when one goes on: under TLS, so rustls's
//! buffer does not hide progress) or when a response body has handed hyper data and not been
//! asked for more ([`Held`]: HTTP/2 flow control, or HTTP/1.1's write buffer full). [`idle`] reports [`Stop::Stalled`] once a connection has waited on its client at two
//! checks in a row with no progress at all in between: no write unblocked, no body asked for
//! data, no request started, and nothing acknowledged by the client's TCP beyond the edge's
//! own PINGs (`TCP_INFO`'s `tcpi_bytes_acked`, which only grows). A client that reads,
//! however slowly or in bursts, keeps its connection. The caller resets the connection.
//!
//! And per HTTP/2 stream, as nginx's `send_timeout` is: one stream held back by its own
//! flow-control window while the others on its connection move (a browser pausing a video)
//! would keep its body, and what that holds, for as long as the client keeps the connection.
//! hyper does not poll a body whose stream has no window, so the body itself cannot time out:
//! each stream's task is spawned by [`StreamExec`], which lists it with the connection's
//! [`Activity`] and lets [`idle`] end it. A stream whose body waited to be asked for more at
//! two checks in a row, with nothing handed in between, is ended: its task is dropped, with it
//! the body (the file, buffers, flight or upstream connection, at once) and hyper's handle on
//! the stream, and h2 sends RST_STREAM (CANCEL) in place of the data it still held. Counted
//! in `fediedge_h2_streams_stalled_total`. Under HTTP/2 a large data frame (a memory hit is
//! one) is handed to hyper in [`PIECE`]s, so a stream that moves is seen moving.
//!
//! Only those moments cost anything: a relaxed load per write, two atomic adds per body frame
//! (four under HTTP/2), and per HTTP/2 stream its watch (an allocation, listed and unlisted
//! under the connection's lock) and, each time its task is polled, the task-local's swap and
//! the switch's waker registration (a few atomics). HTTP/1.1 spawns no task: its bodies find
//! no task-local and pay one thread-local lookup when made.

use std::future::Future;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Frame, SizeHint};

use super::Body;

/// A connection with nothing under way is closed after one to two of these; so is one whose
/// client takes that long to send a request's header block.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes acknowledged in a period that do not count as the client reading: the edge's HTTP/2
/// PINGs (one a period, 17 bytes and a TLS record's overhead) and what goes with them.
const PINGS_ACKED: u64 = 256;

/// One request started: the high half counts starts, the low half what is under way. Also
/// one frame handed, in [`Activity::bodies`].
const STARTED: u64 = 1 << 32;

/// Under HTTP/2, the most of a body handed to hyper at once: a larger frame is cut (without
/// copying), so that a stream taking data is seen taking it. One HTTP/2 DATA frame (16 KiB,
/// the protocol's default largest, which h2 cuts to anyway): a stream must take this much per
/// period (30 to 60 s) to keep going, about 0.5 KB/s, a phone on the worst link.
const PIECE: usize = 16 * 1024;

/// In [`StreamWatch::sent`]: the last data handed waits to be asked for more.
const WAITING: u64 = 1;

/// One data frame handed, in [`StreamWatch::sent`].
const HANDED: u64 = 2;

/// HTTP/2 streams ended by the per-stream send timeout since the process started.
static STREAMS_STALLED: AtomicU64 = AtomicU64::new(0);

/// HTTP/2 streams ended by the per-stream send timeout since the process started
/// (`fediedge_h2_streams_stalled_total`).
pub(super) fn streams_stalled() -> u64 {
    STREAMS_STALLED.load(Ordering::Relaxed)
}

tokio::task_local! {
    /// The watch of the HTTP/2 stream whose task is running ([`StreamExec`]): a response body
    /// made in it reports to it.
    static STREAM: Arc<StreamWatch>;
}

/// What one connection has under way, and whether it waits on its client.
#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Requests, in one word so that a request costs one atomic add when it starts and one
    /// when it ends: the low 32 bits count those whose response has not ended, the high 32
    /// bits those started (wrapping), so a change between two checks is activity.
    requests: AtomicU64,
    /// A write could not go on (the client reads nothing) and none has gone on since.
    blocked: AtomicBool,
    /// Times `blocked` was cleared: a change between two checks is progress.
    unblocked: AtomicU64,
    /// Response bodies: the low 32 bits count those that handed hyper data and were not
    /// asked for more since (waiting on the client); the high 32 bits count data frames
    /// handed (wrapping): a change between two checks is progress.
    bodies: AtomicU64,
    /// HTTP/2: the streams under way, for the per-stream send timeout.
    streams: parking_lot::Mutex<Streams>,
}

/// The watches of a connection's HTTP/2 stream tasks; a task's place is reused once it ends.
#[derive(Debug, Default)]
struct Streams {
    all: Vec<Option<Arc<StreamWatch>>>,
    free: Vec<usize>,
}

impl Streams {
    fn insert(&mut self, watch: Arc<StreamWatch>) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.all[i] = Some(watch);
                i
            }
            None => {
                self.all.push(Some(watch));
                self.all.len() - 1
            }
        }
    }

    fn remove(&mut self, i: usize) {
        self.all[i] = None;
        self.free.push(i);
    }
}

/// What one HTTP/2 stream's body did, and the switch that ends its task.
#[derive(Debug, Default)]
struct StreamWatch {
    /// [`HANDED`] per data frame its body handed hyper (wrapping), plus [`WAITING`] while the
    /// last one waits to be asked for more.
    sent: AtomicU64,
    /// `sent` as of the last check (only [`idle`] touches it).
    seen: AtomicU64,
    /// Set by [`idle`]: the stream's task ends.
    reset: AtomicBool,
    /// The stream's task, woken when `reset` is set.
    task: AtomicWaker,
}

/// Why [`idle`] returned.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stop {
    /// Nothing under way and nothing started for a whole period.
    Idle,
    /// Waited on the client for a whole period with no progress: it reads nothing.
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

    /// Notes how a write or flush on the connection's socket went: pending marks the
    /// connection blocked, anything else (done or failed) unblocks it. A relaxed load in the
    /// usual case.
    pub(super) fn note_write<T>(&self, polled: Poll<T>) -> Poll<T> {
        match polled {
            Poll::Pending => {
                if !self.blocked.load(Ordering::Relaxed) {
                    self.blocked.store(true, Ordering::Release);
                }
            }
            Poll::Ready(_) => {
                if self.blocked.load(Ordering::Relaxed) {
                    self.blocked.store(false, Ordering::Release);
                    self.unblocked.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        polled
    }

    /// Ends the HTTP/2 streams whose body waited to be asked for more at the last check and
    /// now, with nothing handed in between. Returns how many.
    fn reset_stalled_streams(&self) -> usize {
        let streams = self.streams.lock();
        let mut reset = 0;
        for watch in streams.all.iter().flatten() {
            let sent = watch.sent.load(Ordering::Acquire);
            let before = watch.seen.swap(sent, Ordering::Relaxed);
            if sent & WAITING != 0 && sent == before && !watch.reset.swap(true, Ordering::AcqRel) {
                watch.task.wake();
                reset += 1;
            }
        }
        reset
    }
}

/// hyper's executor for a connection's HTTP/2 stream tasks: tokio's, each task listed with
/// the connection's [`Activity`] (until it ends) and ended by [`idle`] when its body stalls.
/// (HTTP/1.1 spawns nothing.)
#[derive(Clone)]
pub(super) struct StreamExec(Arc<Activity>);

impl StreamExec {
    pub(super) fn new(activity: Arc<Activity>) -> StreamExec {
        StreamExec(activity)
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        // Boxed once: hyper's stream future (with the handler's) is large, and the wrappers
        // below would each move it whole; boxed, it is copied once, as a bare spawn would.
        let fut = Box::pin(fut);
        let watch = Arc::new(StreamWatch::default());
        let listed = Listed {
            index: self.0.streams.lock().insert(watch.clone()),
            activity: self.0.clone(),
        };
        let switch = watch.clone();
        let task = async move {
            let _listed = listed;
            let reset = std::future::poll_fn(|cx| {
                switch.task.register(cx.waker());
                match switch.reset.load(Ordering::Acquire) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                }
            });
            // Reset: `fut` (hyper's stream, with its body) is dropped here; h2 then sends
            // RST_STREAM for a stream nothing refers to any more.
            tokio::select! {
                biased;
                () = reset => {}
                () = fut => {}
            }
        };
        tokio::spawn(STREAM.scope(watch, task));
    }
}

/// A stream task's place in [`Activity::streams`], given back when the task ends.
struct Listed {
    activity: Arc<Activity>,
    index: usize,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.activity.streams.lock().remove(self.index);
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once `activity` shows no request under way, none started and no write waiting
/// for a whole [`IDLE_TIMEOUT`] ([`Stop::Idle`]), or it waited on its client for as long
/// with no progress ([`Stop::Stalled`]); so after one to two periods. `socket`: the
/// connection's TCP socket, for what its client acknowledged.
pub(super) async fn idle(activity: &Activity, socket: Option<RawFd>) -> Stop {
    let mut seen = Progress::of(activity, socket);
    loop {
        tokio::time::sleep(IDLE_TIMEOUT).await;
        let now = Progress::of(activity, socket);
        // A response body may have ended (handed whole to hyper) while its bytes still wait
        // to be written: blocked, that is not idle (but may be stalled).
        if now.requests == seen.requests && Activity::under_way(now.requests) == 0 && !now.blocked {
            return Stop::Idle;
        }
        if seen.waiting() && now.waiting() && now.same_as(&seen) {
            return Stop::Stalled;
        }
        // The connection moves, but one of its HTTP/2 streams may not.
        let reset = activity.reset_stalled_streams();
        if reset > 0 {
            STREAMS_STALLED.fetch_add(reset as u64, Ordering::Relaxed);
            tracing::debug!(
                streams = reset,
                "HTTP/2 streams whose client took nothing of them for a whole period: reset"
            );
        }
        seen = now;
    }
}

/// What a connection has done, as of one check.
struct Progress {
    requests: u64,
    blocked: bool,
    unblocked: u64,
    bodies: u64,
    acked: Option<u64>,
}

impl Progress {
    fn of(a: &Activity, socket: Option<RawFd>) -> Progress {
        Progress {
            requests: a.requests.load(Ordering::Acquire),
            blocked: a.blocked.load(Ordering::Acquire),
            unblocked: a.unblocked.load(Ordering::Acquire),
            bodies: a.bodies.load(Ordering::Acquire),
            acked: socket.and_then(bytes_acked),
        }
    }

    /// Waiting on the client: a write blocked, or a body's data not taken on.
    fn waiting(&self) -> bool {
        self.blocked || Activity::under_way(self.bodies) > 0
    }

    /// Nothing moved between `earlier` and this check. The client's TCP acknowledging the
    /// edge's own HTTP/2 PINGs (a few dozen bytes a period) is not the client reading.
    fn same_as(&self, earlier: &Progress) -> bool {
        let acked = match (earlier.acked, self.acked) {
            (Some(before), Some(now)) => now.saturating_sub(before),
            _ => 0,
        };
        self.requests == earlier.requests
            && self.unblocked == earlier.unblocked
            && self.bodies >> 32 == earlier.bodies >> 32
            && acked <= PINGS_ACKED
    }
}

/// Bytes of `socket`'s stream the peer acknowledged so far (`TCP_INFO`), if the kernel says.
/// By hand: socket2 and tokio expose no `TCP_INFO`.
fn bytes_acked(socket: RawFd) -> Option<u64> {
    // SAFETY: `tcp_info` is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info` and the length into `len`.
    // `socket` is a descriptor the connection task owns for as long as it calls this.
    let done = unsafe {
        libc::getsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // Kernels before 4.1 fill less than the whole struct: no `tcpi_bytes_acked` then.
    let has = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8 <= len as usize;
    (done == 0 && has).then_some(info.tcpi_bytes_acked)
}

/// A response body that holds its request's [`Active`] until it ends or is dropped. The
/// listener's responses have this type (not boxed once more: one allocation per request less).
/// Under HTTP/2 it reports to its stream's [`StreamWatch`] and hands large frames in pieces.
pub(super) struct Held {
    body: Body,
    active: Option<Active>,
    /// Handed hyper data and not asked for more since (counted in [`Activity::bodies`]).
    waiting: bool,
    /// HTTP/2: the stream's watch.
    watch: Option<Arc<StreamWatch>>,
    /// HTTP/2: what is left of a data frame handed in [`PIECE`]s.
    rest: Bytes,
}

impl Held {
    /// `body`, holding `active`; made in an HTTP/2 stream's task, it reports to the stream.
    pub(super) fn new(body: Body, active: Active) -> Held {
        Held {
            body,
            active: Some(active),
            waiting: false,
            watch: STREAM.try_with(Arc::clone).ok(),
            rest: Bytes::new(),
        }
    }

    /// Asked again: no longer waiting on the client.
    fn asked(&mut self) {
        if self.waiting {
            self.waiting = false;
            if let Some(a) = &self.active {
                a.0.bodies.fetch_sub(1, Ordering::AcqRel);
            }
            if let Some(w) = &self.watch {
                w.sent.fetch_sub(WAITING, Ordering::AcqRel);
            }
        }
    }

    /// The next [`PIECE`] of `data` (all of it if no larger), keeping the rest.
    fn piece(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > PIECE {
            self.rest = data.split_off(PIECE);
        }
        data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.asked();
    }
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.asked();
        let polled = if !self.rest.is_empty() {
            let rest = std::mem::take(&mut self.rest);
            Poll::Ready(Some(Ok(Frame::data(self.piece(rest)))))
        } else {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if self.watch.is_some() => {
                    let frame = match frame.into_data() {
                        Ok(data) => Frame::data(self.piece(data)),
                        Err(frame) => frame,
                    };
                    Poll::Ready(Some(Ok(frame)))
                }
                polled => polled,
            }
        };
        match &polled {
            Poll::Ready(None | Some(Err(_))) => {
                self.active = None;
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(a) = &self.active {
                    a.0.bodies.fetch_add(STARTED + 1, Ordering::AcqRel);
                    self.waiting = true;
                    if let Some(w) = &self.watch {
                        w.sent.fetch_add(HANDED + WAITING, Ordering::AcqRel);
                    }
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        if !self.rest.is_empty() {
            let rest = self.rest.len() as u64;
            // The upper bound first: a lower one above it would panic.
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + rest);
            }
            hint.set_lower(hint.lower() + rest);
        }
        hint
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
