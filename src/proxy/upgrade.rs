//! WebSocket through the proxy (HTTP/1.1 Upgrade, RFC 9110 §7.8): the client's `Upgrade` is
//! passed on (it is hop-by-hop, so header rewriting removed it), and when the upstream answers
//! 101 both connections are taken over from hyper and joined byte for byte
//! (`copy_bidirectional`) until either side closes. The tunnel holds the upstream's connection
//! permit, so open WebSockets count against `max_streams_per_upstream`; it ends at
//! shutdown, and when no byte went either way for `stream_idle_timeout` (a hung streaming
//! server must not hold sockets without bound; Mastodon pings every open WebSocket far more
//! often).

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::listen::Body;

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` and
/// `Upgrade: <protocol>`), if any.
pub fn requested<B>(req: &Request<B>) -> Option<HeaderValue> {
    let wants = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants || req.version() != http::Version::HTTP_11 {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Asks the upstream for the same upgrade.
pub fn ask(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::UPGRADE, protocol);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Answers the client's handshake with the upstream's 101 and joins the two connections in a
/// spawned task. `idle`: the longest time without a byte either way (zero: no limit).
pub fn tunnel(
    client: OnUpgrade,
    mut upstream: Response<Incoming>,
    permit: OwnedSemaphorePermit,
    idle: Duration,
    stop: CancellationToken,
) -> Response<Body> {
    let upstream_io = hyper::upgrade::on(&mut upstream);
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = upstream.headers().clone();
    let protocol = headers.get(header::UPGRADE).cloned();
    super::headers::strip_hop_by_hop(&mut headers);
    if let Some(p) = protocol {
        ask(&mut headers, p);
    }
    *resp.headers_mut() = headers;
    tokio::spawn(async move {
        let _permit = permit;
        let (client, upstream) = match tokio::try_join!(client, upstream_io) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "proxy: upgrade failed");
                return;
            }
        };
        let start = Instant::now();
        let last = Arc::new(AtomicU64::new(0));
        let (mut a, mut b) = (
            Active::new(TokioIo::new(client), start, last.clone()),
            Active::new(TokioIo::new(upstream), start, last.clone()),
        );
        tokio::select! {
            ended = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "proxy: tunnel ended with an error");
                }
            }
            // Shutting down: both connections are closed.
            _ = stop.cancelled() => {}
            _ = idle_for(idle, start, &last) => {
                tracing::debug!(idle = ?idle, "proxy: tunnel closed after stream_idle_timeout without traffic");
            }
        }
    });
    resp
}

/// Returns once nothing was read on either side for `idle` (never when `idle` is zero).
async fn idle_for(idle: Duration, start: Instant, last: &AtomicU64) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        let at = start + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
        if Instant::now() >= at {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

/// A tunnel's side that records when it last read a byte (milliseconds since the start), for
/// the idle timeout. `copy_bidirectional` has no idle limit of its own, and a timeout around
/// each read would need the copy loop rewritten; this wrapper keeps tokio's loop.
struct Active<T> {
    io: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Active<T> {
    fn new(io: T, start: Instant, last: Arc<AtomicU64>) -> Self {
        Active { io, start, last }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            let ms = self.start.elapsed().as_millis() as u64;
            self.last.fetch_max(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
