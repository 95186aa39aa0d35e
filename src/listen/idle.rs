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

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

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
pub(super) struct Activity(AtomicU64);

/// One request under way; dropped when its response body ends or is dropped.
pub(super) struct Active(Arc<Activity>);

impl Activity {
    /// A request starts.
    pub(super) fn start(self: &Arc<Self>) -> Active {
        self.0.fetch_add(STARTED + 1, Ordering::AcqRel);
        Active(self.clone())
    }

    /// Requests whose response has not ended.
    fn under_way(word: u64) -> u64 {
        word & (STARTED - 1)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once `activity` shows no request under way and none started for a whole
/// [`IDLE_TIMEOUT`] (so after one to two periods of idleness).
pub(super) async fn idle(activity: &Activity) {
    let mut seen = activity.0.load(Ordering::Acquire);
    loop {
        tokio::time::sleep(IDLE_TIMEOUT).await;
        let now = activity.0.load(Ordering::Acquire);
        if now == seen && Activity::under_way(now) == 0 {
            return;
        }
        seen = now;
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
            tokio::spawn(async move { idle(&a).await })
        };
        // A response under way: never idle.
        tokio::time::sleep(IDLE_TIMEOUT * 5).await;
        assert!(!watch.is_finished());
        // The body read to its end frees the connection.
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"x");
        assert_eq!(Activity::under_way(activity.0.load(Ordering::Acquire)), 0);
        watch.await.unwrap();
        assert!(started.elapsed() >= IDLE_TIMEOUT * 5);
    }
}
