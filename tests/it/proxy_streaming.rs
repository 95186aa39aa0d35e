//! The streaming route (issue 8 §3): a real WebSocket client and server exchanging messages
//! through the edge, and server-sent events passed through one by one, unbuffered.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::proxy::{edge_with_core, get, CORE};

/// A WebSocket server (Mastodon's streaming server's place) that answers every text message
/// with `echo <path>: <message>`. The handshake fails (and so the test) if the Host or
/// X-Real-IP did not come through.
#[allow(clippy::result_large_err)] // tungstenite's callback type
async fn websocket_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut path = String::new();
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, resp| {
                        path = req.uri().to_string();
                        assert_eq!(req.headers()["host"], CORE);
                        assert_eq!(req.headers()["x-real-ip"], "127.0.0.1");
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        let reply = format!("echo {path}: {t}");
                        if ws.send(Message::text(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_websocket_client_and_server_talk_through_the_streaming_route() {
    let upstream = websocket_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // The web pool refuses: a WebSocket that reached it would fail.
    let edge = crate::proxy::edge_with_streaming(dir.path(), upstream, "").await;
    let url = format!("ws://{}/api/v1/streaming?stream=public", edge.running.addr);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("host", CORE.parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(resp.status(), 101);
    for n in 0..3 {
        ws.send(Message::text(format!("hello {n}"))).await.unwrap();
        let reply = ws.next().await.expect("a reply").unwrap();
        assert_eq!(
            reply.into_text().unwrap().as_str(),
            format!("echo /api/v1/streaming?stream=public: hello {n}")
        );
    }
    // Shutdown closes the tunnel (the client reconnects elsewhere) and does not wait on it.
    let stopped = tokio::spawn(edge.running.shutdown());
    let end = tokio::time::timeout(crate::proxy::WAIT, ws.next()).await;
    assert!(
        matches!(end, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))),
        "the WebSocket was not closed at shutdown: {end:?}"
    );
    tokio::time::timeout(crate::proxy::WAIT, stopped)
        .await
        .unwrap()
        .unwrap();
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A server-sent-events upstream: each request gets a stream whose events the test sends
/// through the returned channel (one channel per request, in order of arrival).
async fn sse_upstream() -> (
    SocketAddr,
    mpsc::UnboundedReceiver<mpsc::UnboundedSender<Bytes>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (streams_tx, streams_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let streams_tx = streams_tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
                    let _ = streams_tx.send(tx);
                    let events = futures_util::stream::unfold(rx, |mut rx| async move {
                        rx.recv()
                            .await
                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                    });
                    let body: Body = StreamBody::new(events).boxed_unsync();
                    let resp = http::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, streams_rx)
}

/// An edge whose streaming pool is an [`sse_upstream`] (`extra`: more `[core]` lines), an
/// event stream opened through it, and the channel that sends that stream's events.
async fn event_stream(
    extra: &str,
) -> (
    tempfile::TempDir,
    crate::common::TestEdge,
    reqwest::Response,
    mpsc::UnboundedSender<Bytes>,
) {
    let (upstream, mut streams) = sse_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[upstream],
        &format!("streaming = [\"{upstream}\"]\n{extra}"),
    )
    .await;
    let resp = get(&edge, CORE, "/api/v1/streaming/public")
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let events = streams
        .recv()
        .await
        .expect("the request reached the upstream");
    (dir, edge, resp, events)
}

#[tokio::test]
async fn server_sent_events_pass_through_one_by_one() {
    let (_dir, _edge, mut resp, events) = event_stream("idle_timeout = \"1s\"\n").await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    for n in 0..3 {
        let event = format!("event: update\ndata: {n}\n\n");
        events.send(Bytes::from(event.clone())).unwrap();
        // The next event is sent only once this one arrived: nothing is held back.
        let mut got = Vec::new();
        while got.len() < event.len() {
            let chunk = resp.chunk().await.unwrap().expect("the stream goes on");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8(got).unwrap(), event);
    }
    drop(events);
    assert!(
        resp.chunk().await.unwrap().is_none(),
        "ends when the upstream ends"
    );
}

#[tokio::test]
async fn a_silent_websocket_tunnel_is_closed_after_stream_idle_timeout() {
    let upstream = websocket_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[upstream],
        &format!("streaming = [\"{upstream}\"]\nstream_idle_timeout = \"300ms\"\n"),
    )
    .await;
    let url = format!("ws://{}/api/v1/streaming", edge.running.addr);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("host", CORE.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text("hello")).await.unwrap();
    let reply = ws.next().await.expect("a reply").unwrap();
    assert_eq!(
        reply.into_text().unwrap().as_str(),
        "echo /api/v1/streaming: hello"
    );
    // Neither side sends anything more (the upstream never pings): the edge closes it.
    let end = tokio::time::timeout(crate::proxy::WAIT, ws.next()).await;
    assert!(
        matches!(end, Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_))))),
        "the silent tunnel was not closed: {end:?}"
    );
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_silent_event_stream_is_cut_after_stream_idle_timeout() {
    let (_dir, edge, mut resp, events) = event_stream("stream_idle_timeout = \"300ms\"\n").await;
    let event = "event: update\ndata: 1\n\n";
    events.send(Bytes::from(event)).unwrap();
    let chunk = resp.chunk().await.unwrap().expect("the first event");
    assert_eq!(&chunk[..], event.as_bytes());
    // The upstream stays open but silent: the edge cuts the response (not a clean end).
    let end = tokio::time::timeout(crate::proxy::WAIT, resp.chunk())
        .await
        .expect("the silent stream was not cut");
    assert!(end.is_err(), "cut, not ended as if whole: {end:?}");
    drop(events);
    edge.running.shutdown().await;
}
