//! The idle timeout of HTTP/2 connections. hyper has none for a server (its PINGs only find a
//! client that is gone; one that answers them may hold the connection, and its place under
//! `max_connections`, for ever), so it is done here: every request holds an [`Active`] guard
//! until its response body ends or is dropped, and [`idle`] returns once a connection has had
//! no request under way and none started for a whole [`H2_IDLE_TIMEOUT`] period. The caller
//! then closes the connection gracefully (GOAWAY). HTTP/1.1 needs none of this: hyper's
//! header read timeout also runs while a keep-alive connection waits for its next request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use super::Body;

/// An HTTP/2 connection with nothing under way is closed after one to two of these.
pub const H2_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one connection has under way.
#[derive(Debug, Default)]
pub(super) struct Activity {
    /// Requests whose response has not ended.
    active: AtomicUsize,
    /// Requests started (ever): a change between two checks is activity.
    started: AtomicU64,
}

/// One request under way; dropped when its response body ends or is dropped.
pub(super) struct Active(Arc<Activity>);

impl Activity {
    /// A request starts.
    pub(super) fn start(self: &Arc<Self>) -> Active {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Returns once `activity` shows no request under way and none started for a whole
/// [`H2_IDLE_TIMEOUT`] (so after one to two periods of idleness).
pub(super) async fn idle(activity: &Activity) {
    let mut seen = activity.started.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(H2_IDLE_TIMEOUT).await;
        let now = activity.started.load(Ordering::Relaxed);
        if now == seen && activity.active.load(Ordering::Acquire) == 0 {
            return;
        }
        seen = now;
    }
}

/// `body`, holding `active` until it ends or is dropped.
pub(super) fn hold(body: Body, active: Active) -> Body {
    Held {
        body,
        active: Some(active),
    }
    .boxed_unsync()
}

struct Held {
    body: Body,
    active: Option<Active>,
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

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_the_last_response_and_a_quiet_period() {
        let activity = Arc::new(Activity::default());
        let body = hold(
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
        tokio::time::sleep(H2_IDLE_TIMEOUT * 5).await;
        assert!(!watch.is_finished());
        // The body read to its end frees the connection.
        let got = body.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"x");
        assert_eq!(activity.active.load(Ordering::Acquire), 0);
        watch.await.unwrap();
        assert!(started.elapsed() >= H2_IDLE_TIMEOUT * 5);
    }
}
