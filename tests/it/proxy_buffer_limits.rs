//! Request and response buffering (`[core] buffer_requests`, `buffer_responses`) within its
//! limits, where a review of the first version found it failing admins: a body read whole
//! was timed as a whole (a large upload to a slow-reading core got 504), and both buffers
//! took their memory from `max_flight_memory`, so slow clients starved the core cache (they
//! have their own budget now, `max_buffer_memory`). Each test's doc says what was wrong; a
//! control inside a test is said to be one.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::common::{bytes, client, eventually, TestEdge};
use crate::proxy::{edge_with_core, CORE, WAIT};

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;
type Answer = Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// A real HTTP/1.1 upstream answering every request with `handler`; counts requests.
async fn upstream(
    handler: impl Fn(http::Request<Incoming>) -> Answer + Send + Sync + 'static,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, counted) = (handler.clone(), counted.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, requests)
}

/// `edge_with_core` with top-level keys `top` too.
async fn edge_top(dir: &std::path::Path, top: &str, up: SocketAddr, core: &str) -> TestEdge {
    let root = dir.join("primary");
    std::fs::create_dir_all(&root).unwrap();
    let toml = format!(
        "{top}media_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[core]\nhosts = [\"{CORE}\"]\nweb = [\"{up}\"]\nhealth_check_interval = \"0s\"\n{core}",
        root.display()
    );
    crate::common::start_edge(dir, &toml).await
}

fn post(edge: &TestEdge, path: &str, body: Bytes) -> reqwest::RequestBuilder {
    client()
        .post(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .body(body)
}

/// A core that reads request bodies at a WAN link's pace (100 ms per MiB) for their first
/// 16 MiB (so a 24 MiB upload takes core over 1.6 s to receive), then the rest at once, and
/// says how many bytes it got. (The rest at once: the edge hands its last piece on while
/// the sockets between still hold megabytes, and the first-byte timeout runs from then; a
/// core reading those at a WAN's pace would need a first-byte timeout longer than that.)
async fn slow_reader() -> (SocketAddr, Arc<AtomicUsize>) {
    upstream(|req| {
        Box::pin(async move {
            let mut body = req.into_body();
            let mut got = 0usize;
            let mut paused = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return http::Response::new(full("the body failed"));
                };
                if let Some(d) = frame.data_ref() {
                    got += d.len();
                }
                while got >> 20 > paused && paused < 16 {
                    paused += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
            http::Response::new(full(format!("got {got}")))
        })
    })
    .await
}

/// An upload that takes core longer than `first_byte_timeout` to receive (a 24 MiB video to
/// a core behind a WAN link, or a busy puma reading slowly) got 504 once it was buffered, and
/// the upstream was charged with a failure (its breaker), although core answered it
/// correctly: the whole send of a stored body was under the first-byte deadline, where a
/// streamed body gets `first_byte_after` (idle_timeout between pieces, the first-byte
/// timeout only once the body has all gone). A stored body is timed the same way now. The
/// control (`buffer_requests = false`) passed before too. nginx bounds each write to the
/// upstream (`proxy_send_timeout`), not the whole send.
#[tokio::test]
async fn a_stored_upload_that_core_reads_slowly_is_not_cut_by_the_first_byte_timeout() {
    let body = Bytes::from(bytes(24 << 20, 21));
    for buffer in ["false", "true"] {
        let (up, requests) = slow_reader().await;
        let dir = tempfile::tempdir().unwrap();
        let extra = format!(
            "first_byte_timeout = \"1s\"\nbuffer_requests = {buffer}\nbreaker_failures = 1\n"
        );
        let edge = edge_with_core(dir.path(), &[up], &extra).await;
        let r = post(&edge, "/api/v2/media", body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(
            (status.as_u16(), text.as_str()),
            (200, format!("got {}", body.len()).as_str()),
            "buffer_requests = {buffer}: core got the upload and answered it"
        );
        assert_eq!(requests.load(Ordering::SeqCst), 1);
        // The upstream was not charged with a failure: the next request goes to it.
        let next = client()
            .get(format!("http://{}/api/v1/instance", edge.running.addr))
            .header("host", CORE)
            .send()
            .await
            .unwrap();
        assert_eq!(
            next.status(),
            200,
            "buffer_requests = {buffer}: breaker closed"
        );
    }
}

/// The open temp files of `tmp-proxy` in this process (the edge runs in the test's own
/// process: its unnamed temp files show in /proc/self/fd as `…/tmp-proxy/#n (deleted)`).
fn temp_files(dir: &std::path::Path) -> usize {
    let tmp = dir.join("var/tmp-proxy");
    let tmp = tmp.to_string_lossy().into_owned();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.to_string_lossy().starts_with(&tmp))
        .count()
}

/// A raw client that sends the head of a POST of `len` bytes and the first `first` of them,
/// and then nothing (a trickled upload, still within `idle_timeout`).
async fn stalled_upload(edge: &TestEdge, len: usize, first: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    let head =
        format!("POST /api/v2/media HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: {len}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // In small pieces, as a slow link brings them (so that the edge reads small pieces
    // and fills its memory share before the temp file, as it would in the field).
    for _ in 0..first / 4096 {
        stream.write_all(&[b'u'; 4096]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    stream
}

/// A core whose `/page*` answers are 63 KiB, public for 600 s (what the core cache keeps).
async fn cacheable_core() -> (SocketAddr, Arc<AtomicUsize>) {
    upstream(|_req| {
        Box::pin(async move {
            http::Response::builder()
                .header("cache-control", "public, max-age=600")
                .header("content-type", "text/html")
                .body(full(vec![b'p'; 63 << 10]))
                .unwrap()
        })
    })
    .await
}

/// GET `path` as the instance: its `X-Cache-Status`.
async fn cache_status(edge: &TestEdge, path: &str) -> String {
    let r = client()
        .get(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let status = r
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    r.bytes().await.unwrap();
    status
}

/// A few uploads that stall after their first 300 KiB (a phone on a bad link, or a client
/// doing it on purpose: a byte per `idle_timeout` keeps each one open for ever) held
/// 256 KiB each of `max_flight_memory` for as long as they lasted. That budget is the one
/// the core cache's fills and media fetches on a failing disk need: with it spent, the core
/// cache cached nothing (every anonymous page went to puma: the thundering herd the cache is
/// there to stop) while the uploads sat there. A body now holds at most 64 KiB in memory
/// past its first 16 KiB, from the proxy's own `max_buffer_memory`; nginx keeps
/// `client_body_buffer_size` (16 KiB) per request in memory and the rest on disk. Here:
/// `max_flight_memory = 1MiB` and eight stalled uploads. The control: the same page path
/// is cached before the uploads start.
#[tokio::test]
async fn stalled_uploads_do_not_starve_the_core_cache_of_memory() {
    let (up, requests) = cacheable_core().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = crate::corecache::cache_conf(dir.path(), "16MiB", "");
    let edge = edge_top(dir.path(), "max_flight_memory = \"1MiB\"\n", up, &conf).await;
    // Control: the cache works.
    assert_eq!(cache_status(&edge, "/page-before").await, "MISS");
    assert_eq!(cache_status(&edge, "/page-before").await, "HIT");
    let mut uploads = Vec::new();
    for _ in 0..8 {
        uploads.push(stalled_upload(&edge, 1 << 20, 300 << 10).await);
    }
    // Each upload is past its memory share once it has a temp file.
    eight_temp_files(dir.path()).await;
    cached_once(&edge, &requests, "while uploads are read").await;
    drop(uploads);
}

async fn eight_temp_files(dir: &std::path::Path) {
    eventually(WAIT, "eight temp files", || temp_files(dir) >= 8).await;
}

/// `/page` is cached: a MISS, then a HIT, core asked once.
async fn cached_once(edge: &TestEdge, requests: &AtomicUsize, when: &str) {
    let before = requests.load(Ordering::SeqCst);
    assert_eq!(cache_status(edge, "/page").await, "MISS");
    let second = cache_status(edge, "/page").await;
    assert_eq!(
        (second.as_str(), requests.load(Ordering::SeqCst) - before),
        ("HIT", 1),
        "the page is cached {when} (core asked once)"
    );
}

fn in_flight(up: SocketAddr) -> String {
    format!("fediedge_upstream_in_flight{{pool=\"web\",upstream=\"{up}\"}}")
}

/// A raw client that asks for `path` and reads nothing (a small receive buffer: as a phone
/// whose link stalls; the kernel buffers on loopback would otherwise take megabytes).
async fn non_reader(edge: &TestEdge, path: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(edge.running.addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nhost: {CORE}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// The other side of the same fault, in `spool`: a large answer to a client that reads
/// slowly (a phone on a bad link; here, eight that read nothing yet, well within the send
/// timeout) kept up to 256 KiB of `max_flight_memory` per answer for as long as that client
/// took to reach those bytes, and with the budget spent the core cache cached nothing.
/// nginx's `proxy_buffers` are per request and not shared with its cache's fills; the
/// proxy's buffers have their own budget now (`max_buffer_memory`), 64 KiB per answer.
/// Here: `max_flight_memory = 1MiB`, eight clients of a private 8 MiB answer; the control:
/// the page is cached before.
#[tokio::test]
async fn slow_readers_of_large_answers_do_not_starve_the_core_cache_of_memory() {
    let (up, requests) = upstream(move |req| {
        Box::pin(async move {
            let b = http::Response::builder();
            match req.uri().path() {
                // 8 MiB (past the edge socket's send buffer, up to 4 MiB) in 4 KiB
                // pieces, as puma's writes reach the edge over a LAN (on loopback a body
                // sent at once comes in pieces of hundreds of KiB).
                "/big" => {
                    let pieces = futures_util::stream::unfold(0usize, |n| async move {
                        if n == 2048 {
                            return None;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        let piece = hyper::body::Frame::data(Bytes::from(vec![b'b'; 4096]));
                        Some((Ok::<_, std::io::Error>(piece), n + 1))
                    });
                    b.header("cache-control", "private")
                        .body(http_body_util::StreamBody::new(pieces).boxed_unsync())
                }
                _ => b
                    .header("cache-control", "public, max-age=600")
                    .header("content-type", "text/html")
                    .body(full(vec![b'p'; 63 << 10])),
            }
            .unwrap()
        })
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let conf = crate::corecache::cache_conf(dir.path(), "16MiB", "");
    let edge = edge_top(dir.path(), "max_flight_memory = \"1MiB\"\n", up, &conf).await;
    // Control: the cache works.
    assert_eq!(cache_status(&edge, "/page-before").await, "MISS");
    assert_eq!(cache_status(&edge, "/page-before").await, "HIT");
    let mut slow = Vec::new();
    for _ in 0..8 {
        slow.push(non_reader(&edge, "/big").await);
    }
    // Core has sent every answer: the edge holds them (memory, then temp files).
    eight_temp_files(dir.path()).await;
    crate::listen_cap::metric_becomes(edge.running.admin_addr, &in_flight(up), 0.0).await;
    cached_once(&edge, &requests, "while slow clients read").await;
    drop(slow);
}
