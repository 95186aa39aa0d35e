//! WebSocket through the proxy (HTTP/1.1 Upgrade, RFC 9110 §7.8): the client's `Upgrade` is
//! passed on (it is hop-by-hop, so header rewriting removed it), and when the upstream answers
//! 101 both connections are taken over from hyper and joined byte for byte
//! (`copy_bidirectional`) until either side closes. The tunnel holds the upstream's connection
//! permit, so open WebSockets count against `max_connections_per_upstream`; it ends at
//! shutdown.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;
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
/// spawned task.
pub fn tunnel(
    client: OnUpgrade,
    mut upstream: Response<Incoming>,
    permit: OwnedSemaphorePermit,
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
        let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(upstream));
        tokio::select! {
            ended = tokio::io::copy_bidirectional(&mut a, &mut b) => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "proxy: tunnel ended with an error");
                }
            }
            // Shutting down: both connections are closed.
            _ = stop.cancelled() => {}
        }
    });
    resp
}
