//! The send timeout (issue 8, the front door): a client that reads nothing has its
//! connection reset after one to two idle periods, over HTTP/1.1 (its socket stays full) and
//! HTTP/2 (it grants no flow-control window), while a slow client that keeps reading is
//! served to the end. The object is warmed into the memory tier first, then time is paused:
//! the runtime's clock jumps ahead whenever everything waits, and no file I/O runs beside it.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{bytes, client, start_edge, TestEdge};
use crate::listen_tls::{tls_config, Ca};

const SIZE: usize = 24 << 20;

/// An edge whose memory tier holds `large.bin` (SIZE bytes), with a TLS listener for
/// `edge.test`; time is paused when it returns.
async fn warm_edge(dir: &std::path::Path, ca: &Ca) -> TestEdge {
    let leaf = ca.leaf(dir, "site", &["edge.test"]);
    let root = dir.join("primary");
    let config = format!(
        "{}[cache]\ndir = \"{}\"\nmax_size = \"256MiB\"\nmemory_max_size = \"128MiB\"\n\
         memory_max_object = \"64MiB\"\n",
        tls_config(dir, &[&leaf], None),
        dir.join("cache").display()
    );
    std::fs::write(root.join("large.bin"), bytes(SIZE, 5)).unwrap();
    let edge = start_edge(dir, &config).await;
    let url = format!("{}large.bin", edge.base);
    let mut status = String::new();
    for _ in 0..3 {
        let r = client().get(&url).send().await.unwrap();
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
    let edge = warm_edge(dir.path(), &Ca::new()).await;
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
    let edge = warm_edge(dir.path(), &ca).await;
    h2_reset_without_window(&edge, &ca, "https://edge.test/system/large.bin").await;
    edge.running.shutdown().await;
}

/// GETs `uri` over HTTP/2 with a client that grants no window past the first (time paused)
/// and checks the edge resets the connection: no client connection left open, and the
/// client's side sees its connection end with the body never whole.
async fn h2_reset_without_window(edge: &TestEdge, ca: &Ca, uri: &str) {
    let (mut send, driver) = h2_client(ca, edge.running.https_addr.unwrap()).await;
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

/// An HTTP/2 client over TLS to `addr` (any name the edge has a certificate for) that takes
/// nothing of a response body: after the first window (64 KiB) the edge may send no more.
async fn h2_client(
    ca: &Ca,
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    let stream = tls_stream(ca, addr, b"h2").await;
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .adaptive_window(false)
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

/// A core upstream (HTTP/1.1, in-process) answering every request with 8 MiB in 64 KiB
/// pieces: a response body of many frames, which hyper asks for one at a time as the
/// client's window allows.
async fn streaming_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let pieces = (0..128).map(|i| {
                        Ok::<_, std::convert::Infallible>(http_body::Frame::data(
                            bytes::Bytes::from(vec![i as u8; 64 << 10]),
                        ))
                    });
                    let body = http_body_util::StreamBody::new(futures_util::stream::iter(pieces));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A proxied response streams in many frames: its body stays under way while the client
/// grants no window, so only the stall check (a body waiting on its client with no progress
/// for a whole period) frees the connection and the upstream's.
#[tokio::test]
async fn an_h2_client_that_grants_no_window_to_a_streamed_response_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "site", &["edge.test", "example.test"]);
    let upstream = streaming_upstream().await;
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
    while got < total {
        tokio::time::sleep(Duration::from_secs(20)).await;
        let mut this_turn = 0;
        while this_turn < turn {
            let want = buf.len().min(turn - this_turn);
            let n = s.read(&mut buf[..want]).await.unwrap();
            assert!(n > 0, "the slow reader was cut after {got} bytes");
            this_turn += n;
        }
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
    let edge = warm_edge(dir.path(), &ca).await;
    let mut slow = tls_stream(&ca, edge.running.https_addr.unwrap(), b"http/1.1").await;
    slow.write_all(b"GET /system/large.bin HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    read_slowly(&mut slow, 4 << 20, 256 << 10).await;
    drop(slow);
    edge.running.shutdown().await;
}
