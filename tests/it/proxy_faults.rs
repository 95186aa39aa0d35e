//! The proxy to core against real upstreams (`proxy::Upstream`) where the review of session
//! 7 found it failing users: slow uploads, HTTP/2 cookies, many WebSockets, uploads to a
//! dead upstream, an upstream that reads nothing. Each doc says what was wrong.

use std::time::Duration;

use bytes::Bytes;

use crate::common::client;
use crate::proxy::{edge_with_core, get, Mode, Upstream, CORE};

/// A media upload (`POST /api/v2/media`, up to Mastodon's 99 MiB) from a client on a slow
/// link streams its body to core for longer than `first_byte_timeout`, while never silent
/// for `idle_timeout`. nginx in the edge's place buffers the upload, or (unbuffered) times
/// only the silences (`proxy_send_timeout` between two writes). Here the whole upload
/// counted against `first_byte_timeout`: it was cut with 504, and the timeout counted as
/// core's failure, so that `breaker_failures` slow uploads opened the breaker for everyone.
/// (The client's pause below is the slow link itself, not a wait for an event.)
#[tokio::test]
async fn a_slow_upload_is_not_cut_by_first_byte_timeout_nor_opens_the_breaker() {
    // Streamed to core as it comes, and read whole first (the default).
    for streams in [true, false] {
        slow_uploads(streams).await;
    }
}

async fn slow_uploads(streams: bool) {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "first_byte_timeout = \"1s\"\nidle_timeout = \"30s\"\nbreaker_failures = 1\nbuffer_requests = {}\n",
        !streams
    );
    let edge = edge_with_core(dir.path(), &[up.addr], &extra).await;
    // Plain, then as a POST with `Idempotency-Key` (its leader runs in a task of its own,
    // whose client is timed apart: from when the upload has all gone, too).
    for idempotent in [false, true] {
        let status = slow_upload(&edge, idempotent).await;
        let uploaded = up.last().3;
        // Another client, after the upload.
        let other = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(
            (status, other.status().as_u16()),
            (200, 200),
            "a slow upload's status, then another client's (idempotent: {idempotent}, streams: {streams})"
        );
        assert_eq!(uploaded, 128 * 1024, "core got the whole upload");
    }
}

/// POSTs 128 KiB in two pieces 2.5 s apart (past a 1 s first-byte timeout); its status.
async fn slow_upload(edge: &crate::common::TestEdge, idempotent: bool) -> u16 {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|piece| (piece, rx))
    }));
    let piece = Bytes::from(vec![b'v'; 64 * 1024]);
    let sender = tokio::spawn(async move {
        // Past the 16 KiB the edge reads before choosing an upstream: the upload streams.
        tx.send(Ok(piece.clone())).await.unwrap();
        // The slow link: the next piece comes after the first-byte timeout, well inside
        // idle_timeout.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let _ = tx.send(Ok(piece)).await;
    });
    let mut r = client()
        .post(format!("http://{}/api/v2/media", edge.running.addr))
        .header("host", CORE)
        .header("content-length", (128 * 1024).to_string());
    if idempotent {
        r = r
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "slow-1");
    }
    let status = r.body(body).send().await.unwrap().status().as_u16();
    let _ = sender.await;
    status
}

/// Browsers split `Cookie` into one field per cookie over HTTP/2 (RFC 9113 §8.2.3, for
/// HPACK). Before such a request goes to an HTTP/1.1 server the fields MUST be joined into
/// one with `"; "` (nginx does it, `ngx_http_v2_construct_cookie_header`). The edge sent
/// them to puma as separate `Cookie` lines; puma joins repeated fields with `", "`, and
/// Rack 3 splits cookies on `;` only: `theme=dark, _mastodon_session=…` is one cookie named
/// `theme`, and the signed-in user was signed out on every page over HTTP/2.
#[tokio::test]
async fn h2_cookie_crumbs_reach_core_as_one_field() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), &[CORE]);
    let edge = edge_with_core(dir.path(), &[up.addr], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let mut crumbs = http::HeaderMap::new();
    crumbs.append("cookie", "theme=dark".parse().unwrap());
    crumbs.append("cookie", "_mastodon_session=abc".parse().unwrap());
    let r = c
        .get(format!("https://{CORE}:{}/home", addr.port()))
        .headers(crumbs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let (_, _, headers, _) = up.last();
    let sent: Vec<&str> = headers
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(
        sent,
        ["theme=dark; _mastodon_session=abc"],
        "Cookie as core got it"
    );
}

/// Mastodon's web UI keeps one streaming WebSocket open per signed-in tab, for as long as
/// the tab is open; its streaming server holds thousands. Each open tunnel holds a slot of
/// its upstream for its whole life, and the streaming pool used the web pool's cap (256):
/// the 257th user online got 503 on the streaming API (no live timeline, no
/// notifications). It has its own now, `max_streams_per_upstream` (16384).
#[tokio::test]
async fn the_default_config_holds_more_than_256_streaming_websockets() {
    let (edge, _dir) = streaming_edge("").await;
    let mut open = Vec::new();
    for n in 1..=300 {
        match websocket(&edge).await {
            Ok(ws) => open.push(ws),
            Err(e) => panic!("user {n}'s streaming connection refused: {e}"),
        }
    }
    assert_eq!(open.len(), 300);
}

/// `max_streams_per_upstream` caps the streaming pool (and `max_connections_per_upstream`
/// does not): past it, 503.
#[tokio::test]
async fn max_streams_per_upstream_caps_open_websockets() {
    let (edge, _dir) = streaming_edge(
        "max_connections_per_upstream = 1
max_streams_per_upstream = 3
",
    )
    .await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(websocket(&edge).await.expect("under the cap"));
    }
    let refused = websocket(&edge).await.expect_err("past the cap");
    assert!(refused.to_string().contains("503"), "{refused}");
    drop(open.pop());
    // Freed when a tunnel ends (its permit goes with it).
    let mut again = None;
    for _ in 0..200 {
        if let Ok(ws) = websocket(&edge).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a closed tunnel frees its place");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket(
    edge: &crate::common::TestEdge,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{}/api/v1/streaming?stream=user", edge.running.addr);
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("host", CORE.parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// An edge whose streaming pool is a WebSocket echo server that holds every connection
/// (`extra` goes into `[core]`); its web upstream is closed.
async fn streaming_edge(extra: &str) -> (crate::common::TestEdge, tempfile::TempDir) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let streaming = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                if let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::proxy::edge_with_streaming(dir.path(), streaming, extra).await;
    (edge, dir)
}

/// Two web upstreams, one down (its port refuses). An upload past the 16 KiB read before
/// an upstream is chosen (a media upload, an import) sent to the dead one got 502, although
/// the connect failed and not a byte of it was sent; now its unread body is given back and
/// goes to the other upstream, as nginx (which buffers request bodies) does.
#[tokio::test]
async fn an_upload_whose_connect_failed_goes_to_the_next_upstream() {
    // Streamed (its unread body given back), and read whole first (sent again).
    for streams in [true, false] {
        upload_with_a_dead_upstream(streams).await;
    }
}

async fn upload_with_a_dead_upstream(streams: bool) {
    let up = Upstream::start(Mode::Answer).await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("buffer_requests = {}\n", !streams);
    let edge = edge_with_core(dir.path(), &[dead_addr, up.addr], &extra).await;

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|piece| (piece, rx))
    }));
    let piece = Bytes::from(vec![b'v'; 512 * 1024]);
    tokio::spawn(async move {
        let _ = tx.send(Ok(piece.clone())).await;
        let _ = tx.send(Ok(piece)).await;
    });
    let r = client()
        .post(format!("http://{}/api/v2/media", edge.running.addr))
        .header("host", CORE)
        .header("content-length", (1024 * 1024).to_string())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the upload, the first upstream refusing");
    assert_eq!(up.last().3, 1024 * 1024);
}

/// The other side of timing only the silences of an upload: a core that takes the
/// connection and reads none of the body. The upload stalls with the edge's piece unread
/// for `idle_timeout`: 504, counted against that upstream (not the client's 408), and the
/// edge holds nothing after.
#[tokio::test]
async fn an_upload_core_does_not_read_is_cut_after_idle_timeout() {
    // Streamed as it comes, and read whole first (the default: then sent at core's pace,
    // timed the same way).
    for streams in [true, false] {
        let extra = format!(
            "first_byte_timeout = \"1h\"\nidle_timeout = \"1s\"\nbuffer_requests = {}\n",
            !streams
        );
        assert_eq!(
            upload_to_a_deaf_core(&extra).await,
            Ok(504),
            "streams: {streams}"
        );
    }
}

/// With `idle_timeout = "0s"` (no limit on silences) an upload is under the first-byte
/// deadline as a whole, as before: a core that reads none of it cannot hold it for ever.
#[tokio::test]
async fn with_no_idle_timeout_an_upload_core_does_not_read_is_cut_at_the_first_byte_timeout() {
    for streams in [true, false] {
        let extra = format!(
            "first_byte_timeout = \"1s\"\nidle_timeout = \"0s\"\nbuffer_requests = {}\n",
            !streams
        );
        assert_eq!(
            upload_to_a_deaf_core(&extra).await,
            Ok(504),
            "streams: {streams}"
        );
    }
}

/// The status of a 64 MiB upload (more than the loopback sockets hold) to a core that
/// takes the connection and reads nothing (`extra` goes into `[core]`).
async fn upload_to_a_deaf_core(extra: &str) -> Result<u16, String> {
    let deaf = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let deaf_addr = deaf.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((stream, _)) = deaf.accept().await {
            conns.push(stream); // never read
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[deaf_addr], extra).await;
    // More than the loopback sockets' buffers hold, so the edge's writes stop.
    let r = client()
        .post(format!("http://{}/api/v2/media", edge.running.addr))
        .header("host", CORE)
        .body(vec![b'u'; 64 << 20])
        .send()
        .await;
    held.abort();
    r.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
}
