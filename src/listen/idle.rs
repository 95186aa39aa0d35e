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
//! Only those moments cost anything: a relaxed load per write, two atomic adds per body frame.

use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
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
pub(super) struct Held {
    body: Body,
    active: Option<Active>,
    /// Handed hyper data and not asked for more since (counted in [`Activity::bodies`]).
    waiting: bool,
}

impl Held {
    /// `body`, holding `active`.
    pub(super) fn new(body: Body, active: Active) -> Held {
        Held {
            body,
            active: Some(active),
            waiting: false,
        }
    }

    /// Asked again: no longer waiting on the client.
    fn asked(&mut self) {
        if self.waiting {
            self.waiting = false;
            if let Some(a) = &self.active {
                a.0.bodies.fetch_sub(1, Ordering::AcqRel);
            }
        }
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
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => {
                self.active = None;
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(a) = &self.active {
                    a.0.bodies.fetch_add(STARTED + 1, Ordering::AcqRel);
                    self.waiting = true;
                }
            }
            Poll::Pending => {}
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
