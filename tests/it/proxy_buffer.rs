//! Large answers from core read ahead of slow clients (`[core] buffer_responses`, nginx's
//! `proxy_buffering`): a client that stops reading a large answer does not hold puma's
//! connection nor its place under `max_connections_per_upstream`; every byte still reaches
//! it, in order, from memory and a temp file in `data_dir/tmp-proxy`; a full disk there
//! falls back to the client's pace and says so; a cut upstream cuts the client's body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::mpsc;

use crate::common::{bytes, TestEdge};
use crate::disk::{metric, Tmpfs};
use crate::listen_cap::{metric as scrape, metric_becomes};
use crate::proxy::{edge_with_core, get, CORE};

/// The large answer: more than the kernel buffers on both sides of the edge hold (a few MiB
/// each on loopback), so that without buffering the edge could not have read it all while
/// its client reads nothing.
const BIG: usize = 32 << 20;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Core's place: `/big` (BIG bytes with `Content-Length`), `/chunked` (the same without a
/// length, in 64 KiB pieces), `/cut` (half of it, then the connection cut: no last chunk),
/// `/live` (pieces of unknown length sent through the channel `lives` yields, one per
/// request), `/echo` (the request's body, read whole first); anything else `ok`.
struct Core {
    addr: SocketAddr,
    lives: mpsc::UnboundedReceiver<mpsc::Sender<Bytes>>,
    /// Requests that reached it.
    requests: Arc<AtomicUsize>,
}

async fn upstream(body: Bytes) -> Core {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (lives_tx, lives) = mpsc::unbounded_channel();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, lives_tx, counted) = (body.clone(), lives_tx.clone(), counted.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    let (body, lives_tx) = (body.clone(), lives_tx.clone());
                    async move {
                        let answer = answer(req, body, lives_tx).await;
                        let resp = http::Response::builder()
                            .header("content-type", "application/json")
                            .body(answer)
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Core {
        addr,
        lives,
        requests,
    }
}

async fn answer(
    req: http::Request<Incoming>,
    body: Bytes,
    lives_tx: mpsc::UnboundedSender<mpsc::Sender<Bytes>>,
) -> Body {
    let full = |b: Bytes| Full::new(b).map_err(|e| match e {}).boxed_unsync();
    match req.uri().path() {
        "/big" => full(body),
        "/chunked" => pieces(body.clone(), body.len(), false),
        "/cut" => pieces(body.clone(), body.len() / 2, true),
        "/live" => {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            let _ = lives_tx.send(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
            });
            StreamBody::new(stream).boxed_unsync()
        }
        "/echo" => match req.into_body().collect().await {
            Ok(all) => full(all.to_bytes()),
            Err(_) => full(Bytes::from_static(b"the body failed")),
        },
        _ => full(Bytes::from_static(b"ok")),
    }
}

/// The first `len` bytes of `body` in 64 KiB pieces, without a length; then an error (the
/// connection cut) when `cut`.
fn pieces(body: Bytes, len: usize, cut: bool) -> Body {
    let mut frames: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..len)
        .step_by(64 << 10)
        .map(|at| Ok(Frame::data(body.slice(at..(at + (64 << 10)).min(len)))))
        .collect();
    if cut {
        frames.push(Err(std::io::Error::other("core died")));
    }
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

async fn edge(dir: &std::path::Path, up: SocketAddr, extra: &str) -> TestEdge {
    let extra = format!("max_connections_per_upstream = 1\n{extra}");
    edge_with_core(dir, &[up], &extra).await
}

fn in_flight(up: SocketAddr) -> String {
    format!("fediedge_upstream_in_flight{{pool=\"web\",upstream=\"{up}\"}}")
}

/// A client that stops reading a large answer: once core has sent it all, the edge has read
/// it all (memory, then the temp file), the upstream's connection is free (another client
/// is answered under a cap of one connection), and the slow client then gets every byte.
/// With and without a `Content-Length`.
#[tokio::test]
async fn a_client_that_stops_reading_a_large_answer_does_not_hold_core() {
    let body = Bytes::from(bytes(BIG, 7));
    let up = upstream(body.clone()).await.addr;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), up, "").await;
    for (n, path) in ["/big", "/chunked"].into_iter().enumerate() {
        let slow = get(&edge, CORE, path).send().await.unwrap();
        assert_eq!(slow.status(), 200);
        // Nothing of the body read: the edge reads core's answer to its end on its own.
        metric_becomes(edge.running.admin_addr, &in_flight(up), 0.0).await;
        let on_disk = scrape(edge.running.admin_addr, "fediedge_proxy_temp_bytes").await;
        assert!(
            on_disk >= (BIG / 2) as f64,
            "{path}: {on_disk} bytes in temp files"
        );
        let other = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(
            other.status(),
            200,
            "{path}: another client, while the slow one has read nothing"
        );
        let got = slow.bytes().await.unwrap();
        assert!(got == body, "{path}: the slow client's bytes are core's");
        assert_eq!(
            crate::disk::metric_count(&edge, "fediedge_proxy_responses_spooled_total"),
            n as u64 + 1,
            "{path}: past the memory share, the answer went on to the temp file"
        );
    }
    // Small answers go straight through.
    assert_eq!(
        crate::disk::metric_count(&edge, "fediedge_proxy_responses_buffered_total"),
        2
    );
    // Once read, the buffers' memory and disk budgets are whole again.
    for held in [
        "fediedge_proxy_buffer_memory_bytes",
        "fediedge_proxy_temp_bytes",
    ] {
        metric_becomes(edge.running.admin_addr, held, 0.0).await;
    }
}

/// `max_response_temp_file = "0"`: memory only; `max_temp_bytes` (all temp files
/// together) spent: the file stops growing. Past that the answer goes at its client's pace
/// (the upstream stays held, as without buffering), and nothing is lost.
#[tokio::test]
async fn with_no_room_on_disk_buffering_goes_at_the_clients_pace_and_loses_nothing() {
    let body = Bytes::from(bytes(BIG, 8));
    for (extra, files) in [
        ("max_response_temp_file = \"0\"\n", 0),
        ("max_temp_bytes = \"1MiB\"\n", 1),
    ] {
        let up = upstream(body.clone()).await.addr;
        let dir = tempfile::tempdir().unwrap();
        let edge = edge(dir.path(), up, extra).await;
        let slow = get(&edge, CORE, "/big").send().await.unwrap();
        let other = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(
            other.status(),
            503,
            "{extra}: the one connection is still the slow client's"
        );
        let got = slow.bytes().await.unwrap();
        assert!(got == body, "{extra}: every byte, in order");
        metric_becomes(edge.running.admin_addr, &in_flight(up), 0.0).await;
        assert_eq!(
            crate::disk::metric_count(&edge, "fediedge_proxy_responses_spooled_total"),
            files,
            "{extra}"
        );
    }
}

/// `data_dir/tmp-proxy` on a full filesystem (a real tmpfs, filled): the answer is buffered
/// in memory only and goes at the client's pace, every byte exact; `/metrics` says the disk
/// is full. Once space is back, the next slow client's answer goes to the temp file again.
#[tokio::test]
async fn a_full_temp_disk_falls_back_to_the_clients_pace_and_recovers() {
    let body = Bytes::from(bytes(BIG, 9));
    let up = upstream(body.clone()).await.addr;
    let dir = tempfile::tempdir().unwrap();
    let tmp = Tmpfs::mount(&dir.path().join("var/tmp-proxy"), "40m");
    let edge = edge(dir.path(), up, "").await;
    // After the start, which empties the directory.
    tmp.fill();
    let slow = get(&edge, CORE, "/big").send().await.unwrap();
    // Past the memory share, the temp file is tried: the full disk is on /metrics.
    let state = "fediedge_disk_state{dir=\"data_dir\"}";
    metric_becomes(edge.running.admin_addr, state, 1.0).await;
    let other = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
    assert_eq!(other.status(), 503, "the slow client holds the connection");
    let held = scrape(edge.running.admin_addr, "fediedge_proxy_temp_bytes").await;
    assert_eq!(
        held, 0.0,
        "no room held under max_temp_bytes for writes that failed"
    );
    let got = slow.bytes().await.unwrap();
    assert!(got == body, "every byte, in order, with the disk full");
    tmp.free();
    let slow = get(&edge, CORE, "/big").send().await.unwrap();
    metric_becomes(edge.running.admin_addr, &in_flight(up), 0.0).await;
    let got = slow.bytes().await.unwrap();
    assert!(got == body, "every byte, in order, from the temp file");
    assert_eq!(metric(&edge, state).as_deref(), Some("0"), "writable again");
}

/// Core dies mid-answer (a chunked answer with no last chunk), after the edge buffered
/// what came: the client gets those bytes and then an error, never a clean end that would
/// pass the half for the whole.
#[tokio::test]
async fn a_cut_upstream_cuts_the_clients_body_where_it_was_cut() {
    let body = Bytes::from(bytes(BIG, 10));
    let up = upstream(body.clone()).await.addr;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), up, "").await;
    let mut slow = get(&edge, CORE, "/cut").send().await.unwrap();
    metric_becomes(edge.running.admin_addr, &in_flight(up), 0.0).await;
    let mut got = Vec::new();
    let end = loop {
        match slow.chunk().await {
            Ok(Some(piece)) => got.extend_from_slice(&piece),
            Ok(None) => break "a clean end",
            Err(_) => break "an error",
        }
    };
    assert_eq!(end, "an error");
    assert!(
        got.len() <= BIG / 2 && got[..] == body[..got.len()],
        "what came is core's, in order"
    );
}

/// An answer of unknown length that core sends piece by piece (a long poll, a streamed
/// export) reaches the client piece by piece: buffering reads ahead, it never holds back.
#[tokio::test]
async fn buffering_holds_nothing_back() {
    let mut core = upstream(Bytes::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), core.addr, "").await;
    let mut resp = get(&edge, CORE, "/live").send().await.unwrap();
    let pieces = core.lives.recv().await.expect("the request reached core");
    for n in 0..3 {
        let piece = format!("piece {n}\n");
        pieces.send(Bytes::from(piece.clone())).await.unwrap();
        // The next piece is sent only once this one arrived.
        let mut got = Vec::new();
        while got.len() < piece.len() {
            let chunk = resp.chunk().await.unwrap().expect("the answer goes on");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(String::from_utf8(got).unwrap(), piece);
    }
    drop(pieces);
    assert!(resp.chunk().await.unwrap().is_none(), "ends when core ends");
    assert_eq!(
        scrape(
            edge.running.admin_addr,
            "fediedge_proxy_responses_buffered_total"
        )
        .await,
        1.0,
        "it was buffered"
    );
}

// Request bodies read whole before an upstream is chosen (`[core] buffer_requests`).

/// A raw client's POST of `len` bytes to `/echo`: its head and the first `first` bytes sent
/// now, the rest by [`Upload::finish`].
struct Upload {
    stream: tokio::net::TcpStream,
    body: Bytes,
    sent: usize,
}

impl Upload {
    async fn start(edge: &TestEdge, body: Bytes, first: usize) -> Upload {
        use tokio::io::AsyncWriteExt;
        let mut stream = tokio::net::TcpStream::connect(edge.running.addr)
            .await
            .unwrap();
        let head = format!(
            "POST /echo HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&body[..first]).await.unwrap();
        Upload {
            stream,
            body,
            sent: first,
        }
    }

    /// Sends the rest and reads the answer to its end: its status line and body.
    async fn finish(mut self) -> (String, Vec<u8>) {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(&self.body[self.sent..])
            .await
            .unwrap();
        self.answer().await
    }

    async fn answer(&mut self) -> (String, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let mut got = Vec::new();
        self.stream.read_to_end(&mut got).await.unwrap();
        let split = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an answer");
        let status = String::from_utf8_lossy(&got[..split])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned();
        (status, got[split + 4..].to_vec())
    }
}

/// An upload that comes slowly holds no upstream connection while it comes: another client
/// is answered under a cap of one connection, and core hears of the upload only once it has
/// all come (past the memory share, from the temp file), then gets every byte, once.
#[tokio::test]
async fn a_slow_upload_holds_no_upstream_connection_while_it_comes() {
    let core = upstream(Bytes::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), core.addr, "").await;
    let body = Bytes::from(bytes(1 << 20, 11));
    // Past the 16 KiB read ahead and the 256 KiB kept in memory; the rest held back.
    let upload = Upload::start(&edge, body.clone(), 512 << 10).await;
    let buffered = "fediedge_proxy_requests_buffered_total";
    metric_becomes(edge.running.admin_addr, buffered, 1.0).await;
    let other = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
    assert_eq!(
        other.status(),
        200,
        "another client, while the upload comes"
    );
    assert_eq!(
        core.requests.load(Ordering::SeqCst),
        1,
        "only the other one"
    );
    let (status, echoed) = upload.finish().await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(echoed == body, "core got the upload's bytes, in order");
    assert_eq!(core.requests.load(Ordering::SeqCst), 2, "the upload, once");
}

/// A client that stops in the middle of its upload gets 408 after `idle_timeout`, and core
/// never hears of it.
#[tokio::test]
async fn a_client_silent_mid_upload_gets_408_and_core_hears_nothing() {
    let core = upstream(Bytes::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), core.addr, "idle_timeout = \"1s\"\n").await;
    let mut upload = Upload::start(&edge, Bytes::from(bytes(1 << 20, 12)), 300 << 10).await;
    let (status, _) = upload.answer().await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert_eq!(core.requests.load(Ordering::SeqCst), 0);
}

/// Past `max_request_body` while it is read (chunked: no length said first): 413, and core
/// never hears of it.
#[tokio::test]
async fn an_upload_over_the_limit_gets_413_while_it_is_read() {
    let core = upstream(Bytes::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), core.addr, "max_request_body = \"1MiB\"\n").await;
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..32).map(|_| Ok(vec![b'u'; 64 << 10])).collect();
    let r = crate::common::client()
        .post(format!("http://{}/echo", edge.running.addr))
        .header("host", CORE)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(core.requests.load(Ordering::SeqCst), 0);
}

/// `data_dir/tmp-proxy` full (a real tmpfs, filled): the upload streams to core from where
/// the temp file failed (what was read first, then the rest as it comes), every byte exact,
/// and `/metrics` says the disk is full.
#[tokio::test]
async fn with_the_temp_disk_full_an_upload_streams_and_loses_nothing() {
    let core = upstream(Bytes::new()).await;
    let dir = tempfile::tempdir().unwrap();
    let tmp = Tmpfs::mount(&dir.path().join("var/tmp-proxy"), "4m");
    let edge = edge(dir.path(), core.addr, "").await;
    tmp.fill();
    let body = Bytes::from(bytes(2 << 20, 13));
    let (status, echoed) = Upload::start(&edge, body.clone(), 0).await.finish().await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(echoed == body, "core got every byte, in order");
    assert_eq!(
        crate::disk::metric_count(&edge, "fediedge_proxy_requests_buffered_total"),
        1,
        "it was read ahead first"
    );
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"data_dir\"}").as_deref(),
        Some("1")
    );
}
