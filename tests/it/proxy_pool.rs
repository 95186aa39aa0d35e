//! The proxy's own keep-alive connections to core (`proxy::conns`): reused one request after
//! another, a connection the upstream closed is never an error for the client, a response
//! left before its end never leaves its rest for the next request, a POST is sent once,
//! concurrent responses never cross, a reload keeps an upstream's idle connections, a kept
//! connection closed as a request is written (the keep-alive race) costs an idempotent
//! bodiless request nothing and anything else a 502 (sent once). Against real upstreams that
//! count their connections.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::eventually;
use crate::proxy::{edge_with_core, get, CORE, WAIT};

/// What a counting upstream saw.
#[derive(Default)]
struct Seen {
    accepts: AtomicUsize,
    /// Connections that ended (closed by either side).
    closed: AtomicUsize,
    /// Method, path and body length of each request.
    requests: Mutex<Vec<(String, String, usize)>>,
}

/// The body every upstream answers for a path: the path, repeated to `n` bytes.
fn body_for(path: &str, n: usize) -> Vec<u8> {
    path.bytes().cycle().take(n).collect()
}

/// A keep-alive HTTP/1.1 upstream (hyper): `/big` streams without end; any other path gets
/// `body_for(path, 20_000)`; a request body is read and counted first.
async fn keep_alive_upstream() -> (SocketAddr, Arc<Seen>) {
    server(|stream, s| async move {
        let s2 = s.clone();
        let service = hyper::service::service_fn(move |req| answer(s2.clone(), req));
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
        s.closed.fetch_add(1, Ordering::SeqCst);
    })
    .await
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

async fn answer(
    s: Arc<Seen>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let len = body.collect().await.unwrap().to_bytes().len();
    let path = parts.uri.path().to_owned();
    s.requests
        .lock()
        .push((parts.method.to_string(), path.clone(), len));
    let body = match path.as_str() {
        "/big" => {
            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
            let endless = futures_util::stream::repeat_with(move || {
                Ok::<_, Infallible>(hyper::body::Frame::data(chunk.clone()))
            });
            StreamBody::new(endless).boxed_unsync()
        }
        _ => Full::new(Bytes::from(body_for(&path, 20_000))).boxed_unsync(),
    };
    Ok(http::Response::new(body))
}

/// An upstream that answers one request per connection and closes it a moment later without
/// having said so (no `Connection: close`), like puma when its keep-alive timeout passes: a
/// kept connection to it is stale once `closed` counts it. Answers `<method> <path> <body
/// length>`.
async fn closing_upstream() -> (SocketAddr, Arc<Seen>) {
    server(|mut stream, s| async move {
        let Some((method, path, len)) = read_request(&mut stream).await else {
            return;
        };
        s.requests.lock().push((method.clone(), path.clone(), len));
        write_answer(&mut stream, &method, &path, len).await;
        // After the answer has gone (so the edge has kept the connection).
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(stream);
        s.closed.fetch_add(1, Ordering::SeqCst);
    })
    .await
}

/// Answers `<method> <path> <body length>`, keep-alive.
async fn write_answer(stream: &mut tokio::net::TcpStream, method: &str, path: &str, len: usize) {
    let body = format!("{method} {path} {len}");
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

/// What [`unanswering_upstream`] does after its last answer on a connection.
#[derive(Clone, Copy, PartialEq)]
enum Then {
    /// Closes at once (the edge finds the close at checkout, or as it writes).
    Close,
    /// Reads the next request whole, counts it in `requests`, and closes without a byte of
    /// answer: the keep-alive race at its worst (the request arrived, may have been acted on).
    Read,
    /// As `Read`, but sends the first line of an answer before closing.
    ReadAnswerHalf,
    /// As `Read`, but closes 2 s after the request came (core worked on it, then died).
    ReadThenDie,
}

/// An upstream that answers the first `answered(n)` requests on its `n`th connection (from 0)
/// as [`write_answer`] does, keep-alive, then closes the connection as `then` says: the
/// keep-alive race, for the request the edge writes next.
async fn unanswering_upstream(answered: fn(usize) -> usize, then: Then) -> (SocketAddr, Arc<Seen>) {
    let next = Arc::new(AtomicUsize::new(0));
    server(move |mut stream, s| {
        let n = next.fetch_add(1, Ordering::SeqCst);
        async move {
            for _ in 0..answered(n) {
                let Some((method, path, len)) = read_request(&mut stream).await else {
                    return;
                };
                s.requests.lock().push((method.clone(), path.clone(), len));
                write_answer(&mut stream, &method, &path, len).await;
            }
            if then != Then::Close {
                if let Some(request) = read_request(&mut stream).await {
                    s.requests.lock().push(request);
                }
            }
            if then == Then::ReadAnswerHalf {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n").await;
            }
            if then == Then::ReadThenDie {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            drop(stream);
            s.closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await
}

/// `fediedge_upstream_<name>_total` of the web upstream `addr`, from `/metrics`.
async fn upstream_counter(edge: &crate::common::TestEdge, name: &str, addr: SocketAddr) -> u64 {
    let text = crate::status::metrics(&edge.admin).await;
    let series = format!("fediedge_upstream_{name}_total{{pool=\"web\",upstream=\"{addr}\"}}");
    let value = crate::status::value(&text, &series);
    value.unwrap_or_else(|| panic!("no {series} in {text}")) as u64
}

/// (method, path) of each request the upstream saw.
fn seen_requests(seen: &Seen) -> Vec<(String, String)> {
    let requests = seen.requests.lock();
    requests
        .iter()
        .map(|(m, p, _)| (m.clone(), p.clone()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

/// A server on a free port that counts the connections it accepts (`accepts`) and runs
/// `conn` for each.
async fn server<F, Fut>(conn: F) -> (SocketAddr, Arc<Seen>)
where
    F: Fn(tokio::net::TcpStream, Arc<Seen>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            s.accepts.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(conn(stream, s.clone()));
        }
    });
    (addr, seen)
}

/// Method, path and `content-length` of a request head.
fn parse_head(head: &[u8]) -> Option<(String, String, usize)> {
    let head = String::from_utf8_lossy(head);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next()?.to_owned(), words.next()?.to_owned());
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    Some((method, path, len))
}

/// Reads one request (head and a `content-length` body): method, path, body length.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, String, usize)> {
    let mut buf = Vec::new();
    let end = loop {
        let mut piece = [0u8; 4096];
        let n = stream.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&piece[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let (method, path, len) = parse_head(&buf[..end])?;
    while buf.len() - end < len {
        let mut piece = [0u8; 4096];
        let n = stream.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    Some((method, path, len))
}

fn post(edge: &crate::common::TestEdge, path: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    crate::common::client()
        .post(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .body(body)
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (addr, seen) = keep_alive_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    for i in 0..20 {
        let path = format!("/seq/{i}");
        let r = get(&edge, CORE, &path).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), body_for(&path, 20_000));
    }
    // A HEAD's response has no body: its connection goes back all the same.
    let r = crate::common::client()
        .head(format!("http://{}/head", edge.running.addr))
        .header("host", CORE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get(&edge, CORE, "/after-head").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), body_for("/after-head", 20_000));
    assert_eq!(seen.requests.lock().len(), 22);
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        1,
        "one connection for all"
    );
}

#[tokio::test]
async fn an_upstream_that_closes_its_connections_costs_the_client_nothing_and_a_post_goes_once() {
    let (addr, seen) = closing_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    for i in 0..6 {
        let path = format!("/closing/{i}");
        let r = match i % 2 {
            0 => get(&edge, CORE, &path).send().await.unwrap(),
            _ => post(&edge, &path, vec![b'p'; 100_000 + i])
                .send()
                .await
                .unwrap(),
        };
        assert_eq!(r.status(), 200, "request {i}");
        let want = match i % 2 {
            0 => format!("GET {path} 0"),
            _ => format!("POST {path} {}", 100_000 + i),
        };
        assert_eq!(r.text().await.unwrap(), want);
        // The next request finds the kept connection closed by the upstream.
        eventually(WAIT, "the upstream closed its connection", || {
            seen.closed.load(Ordering::SeqCst) == i + 1
        })
        .await;
    }
    // Each request reached the upstream exactly once (a POST is never sent twice), each on
    // its own connection (the upstream closed every one after its answer).
    let requests = seen.requests.lock().clone();
    assert_eq!(requests.len(), 6, "{requests:?}");
    for (i, (method, path, _)) in requests.iter().enumerate() {
        assert_eq!(path, &format!("/closing/{i}"));
        assert_eq!(method, if i % 2 == 0 { "GET" } else { "POST" });
    }
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn a_response_left_before_its_end_closes_its_upstream_connection() {
    let (addr, seen) = keep_alive_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/ok").send().await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), body_for("/ok", 20_000));
    // The endless body: read a little, then leave.
    let mut r = get(&edge, CORE, "/big").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("a first piece");
    assert!(first.iter().all(|&b| b == b'x'));
    drop(r);
    // The edge drops that upstream connection instead of keeping it (its rest unread).
    eventually(WAIT, "the upstream connection closed", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = get(&edge, CORE, "/next").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), body_for("/next", 20_000));
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2, "a new connection");
    let r = post(&edge, "/posted", vec![b'q'; 300_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), body_for("/posted", 20_000));
    let posts: Vec<_> = seen
        .requests
        .lock()
        .iter()
        .filter(|(m, ..)| m == "POST")
        .cloned()
        .collect();
    assert_eq!(posts, [("POST".to_owned(), "/posted".to_owned(), 300_000)]);
}

#[tokio::test]
async fn concurrent_responses_never_cross() {
    let (addr, seen) = keep_alive_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    for round in 0..4 {
        let requests = (0..16).map(|i| {
            let path = format!("/round/{round}/path-{i}");
            let req = get(&edge, CORE, &path);
            async move {
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200);
                (path, r.bytes().await.unwrap())
            }
        });
        for (path, body) in futures_util::future::join_all(requests).await {
            assert!(body == body_for(&path, 20_000), "{path} got another body");
        }
    }
    assert_eq!(seen.requests.lock().len(), 64);
    // Connections were reused across rounds (at most one per request in flight).
    assert!(seen.accepts.load(Ordering::SeqCst) <= 16);
}

#[tokio::test]
async fn a_reload_that_keeps_an_upstream_keeps_its_idle_connection() {
    let (addr, seen) = keep_alive_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let config = |timeout: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             [primary]\ntype = \"fs\"\nroot = \"{}\"\n\
             [core]\nhosts = [\"{CORE}\"]\nweb = [\"{addr}\"]\nhealth_check_interval = \"0s\"\n\
             first_byte_timeout = \"{timeout}\"\n",
            dir.path().join("var").display(),
            dir.path().display(),
        )
    };
    std::fs::write(&file, config("30s")).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let fetch = |path: &'static str| {
        crate::common::client()
            .get(format!("http://{}{path}", running.addr))
            .header("host", CORE)
            .send()
    };
    let r = fetch("/before").await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), body_for("/before", 20_000));
    std::fs::write(&file, config("40s")).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["core.first_byte_timeout"]);
    let r = fetch("/after").await.unwrap();
    assert_eq!(r.bytes().await.unwrap(), body_for("/after", 20_000));
    assert_eq!(
        seen.accepts.load(Ordering::SeqCst),
        1,
        "the kept connection served both"
    );
    running.shutdown().await;
}

/// A raw upstream that keeps its connections open, for answers hyper's server would not give:
/// `/204`, `/304` (no body), `/1xx` (100 and 103 before the 200), `/close` (`Connection: close`, yet the socket stays open and no
/// other request on it is ever answered), `/upload` (413 as soon as the head is read, the
/// body left unread; nothing else on that connection is ever answered); any other path gets
/// its path as the body. `closed` counts connections the edge closed.
async fn raw_upstream() -> (SocketAddr, Arc<Seen>) {
    server(|mut stream, s| async move {
        let mut buf = Vec::new();
        let mut dead = false;
        loop {
            let mut piece = [0u8; 16 * 1024];
            let n = stream.read(&mut piece).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            if dead {
                continue; // Never answered again: read to the end.
            }
            buf.extend_from_slice(&piece[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let (method, path, len) = parse_head(&buf[..end + 4]).expect("a request head");
            s.requests.lock().push((method, path.clone(), len));
            let answer = match path.as_str() {
                "/204" => "HTTP/1.1 204 No Content\r\nx-n: 204\r\n\r\n".to_owned(),
                "/304" => "HTTP/1.1 304 Not Modified\r\netag: \"e\"\r\n\r\n".to_owned(),
                "/1xx" => "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n\
                           link: </a>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\n\
                           content-length: 4\r\n\r\n/1xx"
                    .to_owned(),
                "/close" => {
                    dead = true;
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nclose"
                        .to_owned()
                }
                "/upload" => {
                    dead = true;
                    "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large"
                        .to_owned()
                }
                _ => format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                    path.len()
                ),
            };
            if !dead {
                // The request's body, read before the answer.
                while buf.len() < end + 4 + len {
                    let n = stream.read(&mut piece).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&piece[..n]);
                }
                buf.drain(..end + 4 + len);
            }
            if stream.write_all(answer.as_bytes()).await.is_err() {
                break;
            }
        }
        s.closed.fetch_add(1, Ordering::SeqCst);
    })
    .await
}

/// 204 and 304 answers (no body, never polled by the client side) and a 200 after 1xx
/// interim answers give their connection back;
/// an answer with `Connection: close` does not, even when the upstream keeps the socket open.
#[tokio::test]
async fn bodiless_answers_keep_their_connection_and_connection_close_gives_it_up() {
    let (addr, seen) = raw_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/204").send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["x-n"], "204");
    let r = get(&edge, CORE, "/304").send().await.unwrap();
    assert_eq!(r.status(), 304);
    let r = get(&edge, CORE, "/1xx").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "/1xx");
    let r = get(&edge, CORE, "/a").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "/a");
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1, "one connection");
    let r = get(&edge, CORE, "/close").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "close");
    // Reused, that connection would never answer: the edge closes it and opens another.
    eventually(
        WAIT,
        "the edge closed the connection core said to close",
        || seen.closed.load(Ordering::SeqCst) == 1,
    )
    .await;
    let r = get(&edge, CORE, "/b").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "/b");
    let r = get(&edge, CORE, "/c").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "/c");
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
    let paths: Vec<String> = seen.requests.lock().iter().map(|r| r.1.clone()).collect();
    assert_eq!(paths, ["/204", "/304", "/1xx", "/a", "/close", "/b", "/c"]);
}

/// Core answers 413 while the request body is still coming (the client holds the rest): the
/// connection, whose request was never wholly sent, is closed rather than kept, and the next
/// request goes on a new one and gets its own answer.
#[tokio::test]
async fn an_answer_before_the_whole_request_body_closes_its_connection() {
    let (addr, seen) = raw_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    // The body streams (read whole first, core would not hear of it before it all came).
    let edge = edge_with_core(dir.path(), &[addr], "buffer_requests = false\n").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "/first");
    // A raw client: announces 1 MiB, sends 64 KiB, then holds the rest.
    let mut client = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: {}\r\n\r\n",
        1 << 20
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&[b'u'; 64 * 1024]).await.unwrap();
    let mut got = Vec::new();
    while !(got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"too large")) {
        let mut piece = [0u8; 4096];
        let n = client.read(&mut piece).await.unwrap();
        assert!(n > 0, "the edge closed before the answer: {got:?}");
        got.extend_from_slice(&piece[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    eventually(WAIT, "the edge closed the half-sent connection", || {
        seen.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    let r = get(&edge, CORE, "/next").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "/next");
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2, "a new connection");
    let paths: Vec<String> = seen.requests.lock().iter().map(|r| r.1.clone()).collect();
    assert_eq!(paths, ["/first", "/upload", "/next"]);
    drop(client);
}

/// The keep-alive race: the upstream takes a GET on the kept connection and closes it
/// without a byte of answer. A safe, bodiless request: sent once more, on a new connection,
/// and the client gets the answer; the upstream saw it twice, and it counts as a stale
/// retry, not an error.
#[tokio::test]
async fn a_get_on_a_kept_connection_closed_as_it_was_written_is_sent_once_more() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::Read).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "GET /first 0");
    // The connection is kept; its next request is read and never answered.
    let r = get(&edge, CORE, "/again").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "GET /again 0");
    assert_eq!(
        seen_requests(&seen),
        pairs(&[("GET", "/first"), ("GET", "/again"), ("GET", "/again")])
    );
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 1);
    assert_eq!(upstream_counter(&edge, "errors", addr).await, 0);
}

/// Not the race: a kept connection that took a GET and failed only after core worked on it
/// for a while (a worker killed mid-request). Sent once, 502: a request that kills its worker
/// is not handed to another. Paused time: the runtime's clock jumps over the 2 s.
#[tokio::test(start_paused = true)]
async fn a_get_whose_kept_connection_fails_late_is_not_sent_again() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::ReadThenDie).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "GET /first 0");
    let r = get(&edge, CORE, "/slow").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        seen_requests(&seen),
        pairs(&[("GET", "/first"), ("GET", "/slow")])
    );
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 0);
    assert_eq!(upstream_counter(&edge, "errors", addr).await, 1);
}

/// The same race for a POST (with a body, then without), a PATCH and a bodiless DELETE (core
/// may have done it before it died): sent once, 502.
#[tokio::test]
async fn a_post_on_a_kept_connection_closed_as_it_was_written_is_not_sent_again() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::Read).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let mut want = Vec::new();
    for (i, (method, len)) in [("POST", 1000), ("POST", 0), ("PATCH", 0), ("DELETE", 0)]
        .into_iter()
        .enumerate()
    {
        let first = format!("/first/{i}");
        let r = get(&edge, CORE, &first).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), format!("GET {first} 0"));
        let path = format!("/unsafe/{i}");
        let r = crate::common::client()
            .request(
                method.parse().unwrap(),
                format!("http://{}{path}", edge.running.addr),
            )
            .header("host", CORE)
            .header("content-length", len.to_string())
            .body(vec![b'p'; len])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "{method} {path}");
        want.push(("GET".to_owned(), first));
        want.push((method.to_owned(), path));
    }
    assert_eq!(seen_requests(&seen), want);
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 4, "one per GET");
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 0);
    assert_eq!(upstream_counter(&edge, "errors", addr).await, 4);
}

/// A GET whose body was streamed to the upstream cannot be sent again (the body is not
/// kept): 502, sent once. (Read whole first, it is not sent again either: only a bodiless
/// safe request is.)
#[tokio::test]
async fn a_get_with_a_body_on_a_kept_connection_closed_as_it_was_written_is_not_sent_again() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::Read).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "buffer_requests = false\n").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "GET /first 0");
    let r = get(&edge, CORE, "/with-body")
        .body(vec![b'g'; 50_000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        seen.requests.lock().clone(),
        [
            ("GET".to_owned(), "/first".to_owned(), 0),
            ("GET".to_owned(), "/with-body".to_owned(), 50_000)
        ]
    );
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 0);
}

/// A new connection that fails after the GET was written is the upstream's failure, not the
/// race: 502, sent once (one upstream, nothing else to try). And the new connection a stale
/// retry opens gets one try: when it fails too, 502, the GET seen twice in all.
#[tokio::test]
async fn a_get_that_fails_on_a_new_connection_is_not_sent_again() {
    // Connection 0 answers one request, then none answers.
    let (addr, seen) = unanswering_upstream(|n| usize::from(n == 0), Then::Read).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "GET /first 0");
    // Kept connection closed at the GET; its retry's new connection closes too.
    let r = get(&edge, CORE, "/retried").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 2);
    // No connection kept now: a new one, which fails, and that is all.
    let r = get(&edge, CORE, "/fresh").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        seen_requests(&seen),
        pairs(&[
            ("GET", "/first"),
            ("GET", "/retried"),
            ("GET", "/retried"),
            ("GET", "/fresh"),
        ])
    );
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 3);
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 1);
    assert_eq!(upstream_counter(&edge, "errors", addr).await, 2);
}

/// An upstream that closes each connection right after its one answer, the next GET
/// following at once: whether the edge finds the close at checkout or as it writes, every GET
/// is answered, and each reached the upstream once (it never read a request it did not answer).
#[tokio::test]
async fn gets_right_after_an_upstream_closed_its_connection_are_all_answered() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::Close).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    for i in 0..20 {
        let path = format!("/race/{i}");
        let r = get(&edge, CORE, &path).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.text().await.unwrap(), format!("GET {path} 0"));
    }
    let paths: Vec<String> = seen_requests(&seen).into_iter().map(|r| r.1).collect();
    let want: Vec<String> = (0..20).map(|i| format!("/race/{i}")).collect();
    assert_eq!(paths, want);
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 20);
    assert_eq!(upstream_counter(&edge, "errors", addr).await, 0);
}

/// Part of an answer came before the kept connection closed: the GET is not sent again
/// (only a request without a byte of answer is), 502.
#[tokio::test]
async fn a_get_whose_answer_began_before_the_close_is_not_sent_again() {
    let (addr, seen) = unanswering_upstream(|_| 1, Then::ReadAnswerHalf).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[addr], "").await;
    let r = get(&edge, CORE, "/first").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "GET /first 0");
    let r = get(&edge, CORE, "/cut").send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(
        seen_requests(&seen),
        pairs(&[("GET", "/first"), ("GET", "/cut")])
    );
    assert_eq!(seen.accepts.load(Ordering::SeqCst), 1);
    assert_eq!(upstream_counter(&edge, "stale_retries", addr).await, 0);
}
