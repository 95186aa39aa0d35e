//! The send timeout (issue 8, the front door): a client that reads nothing has its
//! connection reset after one to two idle periods, over HTTP/1.1 (its socket stays full) and
//! HTTP/2 (it grants no flow-control window), while a slow client that keeps reading is
//! served to the end. The object is warmed into the memory tier first, then time is paused:
//! the runtime's clock jumps ahead whenever everything waits, and no file I/O runs beside it.
//!
//! And per HTTP/2 stream: one stream whose client grants it no window, while another on the
//! same connection moves, is reset and its body (here a proxied upstream response) released;
//! the connection and its other streams go on. A stream that moves slowly is not reset.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{bytes, client, start_edge, TestEdge};
use crate::listen_tls::{tls_config, Ca};

const SIZE: usize = 24 << 20;

/// An edge whose memory tier holds `large.bin` (SIZE bytes), with a TLS listener for
/// `edge.test` and `example.test`, and `extra` config; time is paused when it returns.
async fn warm_edge(dir: &std::path::Path, ca: &Ca, extra: &str) -> TestEdge {
    let leaf = ca.leaf(dir, "site", &["edge.test", "example.test"]);
    let root = dir.join("primary");
    let config = format!(
        "{}[cache]\ndir = \"{}\"\nmax_size = \"256MiB\"\nmemory_max_size = \"128MiB\"\n\
         memory_max_object = \"64MiB\"\n{extra}",
        tls_config(dir, &[&leaf], None),
        dir.join("cache").display()
    );
    std::fs::write(root.join("large.bin"), bytes(SIZE, 5)).unwrap();
    let edge = start_edge(dir, &config).await;
    let url = format!("{}large.bin", edge.base);
    let mut status = String::new();
    for _ in 0..3 {
        // As the instance host: with `[core]`, media is served on its hosts only.
        let r = client()
            .get(&url)
            .header("host", "example.test")
            .send()
            .await
            .unwrap();
        status = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
        assert_eq!(r.bytes().await.unwrap().len(), SIZE);
    }
    assert_eq!(status, "HIT");
    tokio::time::pause();
    edge
}

/// Waits (paused time) until the edge has no client connection open.
async fn all_closed(edge: &TestEdge, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let admin = edge.running.admin_addr;
    while crate::listen_cap::metric(admin, "fediedge_connections_open").await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn an_http1_client_that_reads_nothing_is_reset_and_a_slow_reader_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let edge = warm_edge(dir.path(), &Ca::new(), "").await;
    let ask = b"GET /system/large.bin HTTP/1.1\r\nHost: edge.test\r\n\r\n";

    // Slow but reading: 1 MiB every 20 s, far past two idle periods.
    let mut slow = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    slow.write_all(ask).await.unwrap();
    read_slowly(&mut slow, SIZE, 1 << 20).await;
    drop(slow);

    // Stops reading after the first bytes: cut, and its place freed.
    let mut stuck = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    stuck.write_all(ask).await.unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let n = stuck.read(&mut buf).await.unwrap();
    assert!(n > 0);
    all_closed(&edge, "a client that reads nothing keeps its connection").await;
    // What the client gets is cut short: it never sees the whole body.
    let mut rest = Vec::new();
    let _ = stuck.read_to_end(&mut rest).await;
    assert!(n + rest.len() < SIZE, "{} bytes", n + rest.len());
    edge.running.shutdown().await;
}

#[tokio::test]
async fn an_h2_client_that_grants_no_window_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let edge = warm_edge(dir.path(), &ca, "").await;
    h2_reset_without_window(&edge, &ca, "https://edge.test/system/large.bin").await;
    edge.running.shutdown().await;
}

/// GETs `uri` over HTTP/2 with a client that grants no window past the first (time paused)
/// and checks the edge resets the connection: no client connection left open, and the
/// client's side sees its connection end with the body never whole.
async fn h2_reset_without_window(edge: &TestEdge, ca: &Ca, uri: &str) {
    let (mut send, driver) = h2_client(ca, edge.running.https_addr.unwrap(), 65_535).await;
    let req = http::Request::get(uri)
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    all_closed(
        edge,
        "an HTTP/2 client that grants no window keeps its connection",
    )
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(60), driver).await;
    assert!(ended.is_ok(), "the client's connection is still up");
    drop(resp);
}

/// An HTTP/2 client over TLS to `addr` (any name the edge has a certificate for): a stream
/// window of 64 KiB, granted again only as the caller reads a body, and a connection window
/// of `connection_window`. A body the caller does not read gets no more than its first window.
async fn h2_client(
    ca: &Ca,
    addr: std::net::SocketAddr,
    connection_window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .adaptive_window(false)
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(connection_window);
    h2_handshake(ca, addr, &builder).await
}

/// Like [`h2_client`] with a 4 MiB connection window, for a client that reads some streams
/// and not others: a stream it leaves unread holds 64 KiB of it at most.
async fn h2_reading_client(
    ca: &Ca,
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .adaptive_window(false)
        .initial_stream_window_size(64 << 10)
        .initial_connection_window_size(4 << 20);
    h2_handshake(ca, addr, &builder).await
}

async fn h2_handshake(
    ca: &Ca,
    addr: std::net::SocketAddr,
    builder: &hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = tls_stream(ca, addr, b"h2").await;
    let (send, conn) = builder
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    (send, tokio::spawn(conn))
}

/// A core upstream (HTTP/1.1, in-process) answering every request with 8 MiB in 64 KiB
/// pieces (piece `i` filled with the byte `i`): a response body of many frames, which hyper
/// asks for one at a time as the client's window allows. Also the count of its response
/// bodies not yet dropped: one the edge holds stays open until the edge lets go of it.
async fn streaming_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let bodies = open.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let guard = OpenBody::new(&bodies);
                    async move {
                        let pieces = (0..UPSTREAM_PIECES).map(move |i| {
                            let _held = &guard;
                            Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                                bytes::Bytes::from(vec![i as u8; 64 << 10]),
                            ))
                        });
                        let body =
                            http_body_util::StreamBody::new(futures_util::stream::iter(pieces));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, open)
}

/// Pieces of 64 KiB in each answer of [`streaming_upstream`].
const UPSTREAM_PIECES: usize = 128;

/// One of [`streaming_upstream`]'s bodies, counted until dropped.
struct OpenBody(Arc<AtomicUsize>);

impl OpenBody {
    fn new(open: &Arc<AtomicUsize>) -> OpenBody {
        open.fetch_add(1, Ordering::SeqCst);
        OpenBody(open.clone())
    }
}

impl Drop for OpenBody {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A proxied response streams in many frames: its body stays under way while the client
/// grants no window, so only the stall check (a body waiting on its client with no progress
/// for a whole period) frees the connection and the upstream's.
#[tokio::test]
async fn an_h2_client_that_grants_no_window_to_a_streamed_response_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "site", &["edge.test", "example.test"]);
    let (upstream, _) = streaming_upstream().await;
    let config = format!(
        "{}[core]\nhosts = [\"example.test\"]\nweb = [\"{upstream}\"]\nhealth_check_interval = \"0s\"\n",
        tls_config(dir.path(), &[&leaf], None)
    );
    let edge = start_edge(dir.path(), &config).await;
    tokio::time::pause();
    h2_reset_without_window(&edge, &ca, "https://example.test/api/v1/timelines/public").await;
    edge.running.shutdown().await;
}

/// A TLS connection to `addr` as `edge.test`, offering `alpn`.
async fn tls_stream(
    ca: &Ca,
    addr: std::net::SocketAddr,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("edge.test").unwrap();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// Reads `total` bytes from `s`, `turn` bytes every 20 s (paused time): a slow client that
/// keeps reading. Fails if the edge ends the connection first.
async fn read_slowly(s: &mut (impl AsyncReadExt + Unpin), total: usize, turn: usize) {
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    let started = tokio::time::Instant::now();
    // Paused, the clock would jump from one read to the edge's next check at once, before
    // a busy kernel has passed on what the read freed (the window update, its ACKs): the
    // edge would see a client that took nothing. Small steps leave the kernel real time.
    let _steps = small_steps();
    while got < total {
        tokio::time::sleep(Duration::from_secs(20)).await;
        // And the clock stands still while a turn's bytes come through loopback.
        let this_turn = frozen(async {
            let mut this_turn = 0;
            while this_turn < turn {
                let want = buf.len().min(turn - this_turn);
                let n = s.read(&mut buf[..want]).await.unwrap();
                assert!(n > 0, "the slow reader was cut after {got} bytes");
                this_turn += n;
            }
            this_turn
        })
        .await;
        got += this_turn;
    }
    assert!(
        started.elapsed() > Duration::from_secs(120),
        "not slow enough"
    );
}

/// Over TLS, rustls's own buffer sits between hyper's writes and the socket: a slow reader
/// (256 KiB every 20 s) is still seen reading and keeps its connection.
#[tokio::test]
async fn a_slow_reader_over_tls_is_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let edge = warm_edge(dir.path(), &ca, "").await;
    let mut slow = tls_stream(&ca, edge.running.https_addr.unwrap(), b"http/1.1").await;
    slow.write_all(b"GET /system/large.bin HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    read_slowly(&mut slow, 4 << 20, 256 << 10).await;
    drop(slow);
    edge.running.shutdown().await;
}

/// `[core]` for an edge in front of `upstream` (as `example.test`), no health checks.
fn core_config(upstream: std::net::SocketAddr) -> String {
    format!(
        "[core]\nhosts = [\"example.test\"]\nweb = [\"{upstream}\"]\nhealth_check_interval = \"0s\"\n"
    )
}

/// A GET of `uri` with no body.
fn get(uri: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(uri)
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// Reads more than `turn` bytes of `body` into `got` (fewer at its end), with the clock
/// standing still ([`frozen`]); true once it ended. Reading grants the edge window again, and
/// the client holds at most one window (no more than `turn`) unread: the last frame read is
/// the edge's answer to a window this turn gave back. Fails if the stream ends in an error.
async fn read_turn(body: &mut hyper::body::Incoming, turn: usize, got: &mut Vec<u8>) -> bool {
    use http_body_util::BodyExt;
    frozen(async {
        let start = got.len();
        while got.len() - start <= turn {
            match body.frame().await {
                None => return true,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        got.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("the stream failed after {} bytes: {e:?}", got.len()),
            }
        }
        false
    })
    .await
}

/// Runs `fut` with the paused clock standing still: tokio does not advance it while a
/// blocking task runs, and this one runs until `fut` is done (or a minute of real time, so
/// that a test whose edge never answers goes on to fail). For a client's reads and the
/// edge's answer to the window they give back: these go through loopback, where a busy
/// kernel may take milliseconds, which an auto-advancing clock would make seconds.
async fn frozen<T>(fut: impl std::future::Future<Output = T>) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let hold = tokio::task::spawn_blocking(move || {
        let _ = wait.recv_timeout(Duration::from_secs(60));
    });
    let out = fut.await;
    let _ = done.send(());
    hold.await.unwrap();
    out
}

/// Keeps paused time moving in steps of 20 ms while it lives. Paused, the runtime's clock
/// jumps to the next timer whenever no task is ready, even while bytes are on their way
/// through loopback to a socket no one has read yet; an HTTP/2 client that reads needs a
/// round trip (its WINDOW_UPDATE, then the edge's data) for every window, and a jump of
/// seconds in the middle of one would look to the edge like a client that took nothing.
fn small_steps() -> tokio_util::sync::DropGuard {
    let stop = tokio_util::sync::CancellationToken::new();
    let ticking = stop.clone();
    tokio::spawn(async move {
        while !ticking.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    stop.drop_guard()
}

/// What the edge counts of the per-stream send timeout.
const STREAMS_STALLED: &str = "fediedge_h2_streams_stalled_total";

/// One HTTP/2 stream gets no window (a paused video) while another on the same connection is
/// read, slowly but steadily: the stalled stream is reset (RST_STREAM) and the upstream
/// response it held is released while the other goes on, the connection stays open, and the
/// other stream completes with exact bytes.
#[tokio::test]
async fn an_h2_stream_that_gets_no_window_is_reset_while_its_connection_goes_on() {
    use http_body_util::BodyExt;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (upstream, open) = streaming_upstream().await;
    let edge = warm_edge(dir.path(), &ca, &core_config(upstream)).await;
    let admin = edge.running.admin_addr;
    let stalled_before = crate::listen_cap::metric(admin, STREAMS_STALLED).await;
    let _steps = small_steps();
    let (mut send, _driver) = h2_reading_client(&ca, edge.running.https_addr.unwrap()).await;

    // The client takes nothing of this one past its first window.
    let stuck = send
        .send_request(get("https://example.test/api/v1/timelines/public"))
        .await
        .unwrap();
    assert_eq!(stuck.status(), 200);
    assert_eq!(
        open.load(Ordering::SeqCst),
        1,
        "the upstream's answer is under way"
    );

    // This one it reads: 1 MiB every 10 s, over several idle periods.
    let moving = send
        .send_request(get("https://example.test/system/large.bin"))
        .await
        .unwrap();
    assert_eq!(moving.status(), 200);
    let mut body = moving.into_body();
    let gauge = open.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(SIZE);
        let mut released_while_moving = false;
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            released_while_moving |= gauge.load(Ordering::SeqCst) == 0;
            if read_turn(&mut body, 1 << 20, &mut got).await {
                break;
            }
        }
        (got, released_while_moving)
    });
    let (got, released_while_moving) = reader.await.unwrap();
    assert!(got == bytes(SIZE, 5), "{} bytes, not the object", got.len());
    assert!(
        released_while_moving,
        "the stalled stream's upstream answer was still held when the other stream ended"
    );
    assert!(crate::listen_cap::metric(admin, STREAMS_STALLED).await >= stalled_before + 1.0);
    assert_eq!(
        crate::listen_cap::metric(admin, "fediedge_connections_open").await,
        1.0,
        "the connection itself was closed"
    );

    // The client sees the stalled stream reset (CANCEL) after what it had received.
    let mut stuck = stuck.into_body();
    let mut received = 0;
    let error = loop {
        match stuck.frame().await {
            None => panic!("the stalled stream ended normally"),
            Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
            Some(Err(e)) => break e,
        }
    };
    assert!(format!("{error:?}").contains("CANCEL"), "{error:?}");
    assert!(received < UPSTREAM_PIECES << 16, "{received} bytes");

    // And the connection still serves.
    let again = send
        .send_request(get("https://example.test/system/large.bin"))
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    drop(again);
    drop(send);
    edge.running.shutdown().await;
}

/// Two HTTP/2 streams on one connection, each read slowly (64 KiB every 25 s, less than an
/// idle period apart): neither is reset. The proxied one completes with exact bytes; of the
/// media one (a memory hit, handed to hyper in pieces) the first 2 MiB are read and exact.
#[tokio::test]
async fn slow_h2_streams_that_keep_moving_are_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (upstream, open) = streaming_upstream().await;
    let edge = warm_edge(dir.path(), &ca, &core_config(upstream)).await;
    let _steps = small_steps();
    let (mut send, _driver) = h2_reading_client(&ca, edge.running.https_addr.unwrap()).await;
    let proxied = send
        .send_request(get("https://example.test/api/v1/timelines/public"))
        .await
        .unwrap();
    let media = send
        .send_request(get("https://example.test/system/large.bin"))
        .await
        .unwrap();
    assert_eq!(proxied.status(), 200);
    assert_eq!(media.status(), 200);
    let (mut proxied, mut media) = (proxied.into_body(), media.into_body());
    let (mut from_core, mut from_media) = (Vec::new(), Vec::new());
    let mut core_done = false;
    let started = tokio::time::Instant::now();
    while !core_done || from_media.len() < MEDIA_READ {
        tokio::time::sleep(Duration::from_secs(25)).await;
        if !core_done {
            core_done = read_turn(&mut proxied, 64 << 10, &mut from_core).await;
        }
        if from_media.len() < MEDIA_READ {
            assert!(!read_turn(&mut media, 64 << 10, &mut from_media).await);
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(600),
        "not slow enough"
    );
    let want: Vec<u8> = (0..UPSTREAM_PIECES)
        .flat_map(|i| std::iter::repeat_n(i as u8, 64 << 10))
        .collect();
    assert!(from_core == want, "{} bytes from core", from_core.len());
    assert!(
        from_media[..] == bytes(SIZE, 5)[..from_media.len()],
        "{} bytes of media",
        from_media.len()
    );
    assert_eq!(open.load(Ordering::SeqCst), 0);
    drop((media, send));
    edge.running.shutdown().await;
}

/// What [`slow_h2_streams_that_keep_moving_are_not_reset`] reads of the media body.
const MEDIA_READ: usize = 2 << 20;
