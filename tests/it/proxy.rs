//! The front door (issue 8 §3–§5): routing by Host and path, and the guarded reverse proxy to
//! core, against real in-process upstreams that answer, hang, refuse, reset and come back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

use crate::common::{client, eventually, start_edge, TestEdge};

pub const CORE: &str = "example.test";
pub const WAIT: Duration = Duration::from_secs(30);

/// How an upstream answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// 200, body `from <port>`, the request's headers echoed as `x-seen-<name>` lines in
    /// the body.
    Answer,
    /// Reads the request, never answers.
    Hang,
    /// Accepts, reads a little, closes (the request was sent; no answer comes).
    Reset,
    /// 200, a first piece of body, then silence.
    Stall,
}

/// A real HTTP/1.1 upstream (puma's place) that counts what reaches it.
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct UpState {
    mode: Mutex<Option<Mode>>,
    accepts: AtomicUsize,
    requests: AtomicUsize,
    hung: AtomicUsize,
    /// Health checks answered (not counted in `requests`), and whether they fail.
    pub health_checks: AtomicUsize,
    pub health_fails: std::sync::atomic::AtomicBool,
    /// Method, path, headers and body length of every request answered or hung.
    seen: Mutex<Vec<(String, String, http::HeaderMap, usize)>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl Upstream {
    pub async fn start(mode: Mode) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener, mode)
    }

    /// Serves on `listener` (a port that refused before: the upstream comes back).
    fn on(listener: tokio::net::TcpListener, mode: Mode) -> Upstream {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState::default());
        *state.mode.lock() = Some(mode);
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                s.accepts.fetch_add(1, Ordering::SeqCst);
                if *s.mode.lock() == Some(Mode::Reset) {
                    let mut buf = [0u8; 16];
                    let _ = stream.read(&mut buf).await;
                    drop(stream);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock() = Some(mode);
    }
    pub fn accepts(&self) -> usize {
        self.state.accepts.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
    fn hung(&self) -> usize {
        self.state.hung.load(Ordering::SeqCst)
    }
    pub fn last(&self) -> (String, String, http::HeaderMap, usize) {
        self.state
            .seen
            .lock()
            .last()
            .cloned()
            .expect("a request arrived")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    s: Arc<UpState>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    if req.uri().path() == "/health" {
        s.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = match s.health_fails.load(Ordering::SeqCst) {
            true => 503,
            false => 200,
        };
        let body = Full::new(Bytes::from_static(b"OK")).boxed_unsync();
        return Ok(http::Response::builder().status(status).body(body).unwrap());
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let len = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    s.seen.lock().push((
        parts.method.to_string(),
        parts.uri.to_string(),
        parts.headers.clone(),
        len,
    ));
    let mode = s.mode.lock().unwrap();
    if mode == Mode::Hang {
        s.hung.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
    }
    if mode == Mode::Stall {
        let first =
            futures_util::stream::iter([Ok(hyper::body::Frame::data(Bytes::from("partial")))]);
        let body = first.chain(futures_util::stream::pending());
        let body = http_body_util::StreamBody::new(body).boxed_unsync();
        return Ok(http::Response::new(body));
    }
    let port = parts
        .headers
        .get("x-test-port")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = format!("from upstream {}", port.unwrap_or_default());
    let resp = http::Response::builder()
        .header("keep-alive", "timeout=5")
        .header("connection", "x-up-secret")
        .header("x-up-secret", "1")
        .header("x-up", "yes")
        .body(Full::new(Bytes::from(body)).boxed_unsync())
        .unwrap();
    Ok(resp)
}

/// An address where nothing listens (bound, then closed): connects are refused.
async fn refused_port() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// [`edge_with_core`] whose streaming pool is `streaming` and whose web upstream refuses
/// (a request that reached the web pool would fail); `extra` goes into `[core]`.
pub async fn edge_with_streaming(
    dir: &std::path::Path,
    streaming: SocketAddr,
    extra: &str,
) -> TestEdge {
    let web = refused_port().await.local_addr().unwrap();
    let extra = format!("streaming = [\"{streaming}\"]\n{extra}");
    edge_with_core(dir, &[web], &extra).await
}

fn addrs(list: &[SocketAddr]) -> String {
    let quoted: Vec<String> = list.iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

/// An edge with an fs primary holding `small.txt`, `media_hosts = ["files.test"]` and a
/// `[core]` for `example.test` with `web` upstreams and `extra` keys.
pub async fn edge_with_core(dir: &std::path::Path, web: &[SocketAddr], extra: &str) -> TestEdge {
    let root = dir.join("primary");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("small.txt"), "small").unwrap();
    // Health checks off unless a test turns them on: the counts at the upstreams stay exact.
    let health = match extra.contains("health_check_interval") {
        true => "",
        false => "health_check_interval = \"0s\"\n",
    };
    let toml = format!(
        "media_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[core]\nhosts = [\"{CORE}\"]\nweb = {}\n{health}{extra}",
        root.display(),
        addrs(web)
    );
    start_edge(dir, &toml).await
}

pub fn get(edge: &TestEdge, host: &str, path: &str) -> reqwest::RequestBuilder {
    client()
        .get(format!("http://{}{path}", edge.running.addr))
        .header("host", host)
}

fn post(edge: &TestEdge, path: &str, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
    client()
        .post(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .body(body)
}

#[tokio::test]
async fn routes_by_host_and_forwards_headers_as_a_proxy_should() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;

    let r = get(&edge, CORE, "/api/v1/timelines/public?local=true")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("connection", "x-secret")
        .header("x-secret", "1")
        .header("proxy", "http://evil.test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("keep-alive").is_none());
    assert!(
        r.headers().get("x-up-secret").is_none(),
        "named in Connection"
    );
    assert_eq!(r.headers()["x-up"], "yes");
    assert!(r.text().await.unwrap().starts_with("from upstream"));
    let (method, path, h, _) = up.last();
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("GET", "/api/v1/timelines/public?local=true")
    );
    assert_eq!(h["host"], CORE, "Host is kept");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "appended");
    assert_eq!(
        h["x-real-ip"], "127.0.0.1",
        "an untrusted peer's is replaced"
    );
    assert_eq!(
        h["x-forwarded-proto"], "http",
        "the listener's, not the client's"
    );
    for gone in ["x-secret", "proxy"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream");
    }

    // The media prefix on the instance host and every path of a media host stay media.
    let r = get(&edge, CORE, "/system/small.txt").send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "small");
    let r = get(&edge, "files.test", "/small.txt").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "small");
    // A name this edge does not serve: 421, core never asked.
    let before = up.requests();
    let r = get(&edge, "other.test", "/api/v1/instance")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    let r = get(&edge, "other.test", "/system/small.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);
    assert_eq!(up.requests(), before);
}

#[tokio::test]
async fn a_trusted_proxy_passes_on_the_real_ip() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[up.addr],
        "trusted_proxies = [\"127.0.0.0/8\"]\n",
    )
    .await;
    let r = get(&edge, CORE, "/about")
        .header("x-real-ip", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (_, _, h, _) = up.last();
    assert_eq!(h["x-real-ip"], "203.0.113.9");
    assert_eq!(h["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_bodies_under_it_are_streamed_through() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "max_request_body = \"1KiB\"\n").await;
    let r = post(&edge, "/api/v1/statuses", vec![7u8; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "by Content-Length");
    assert_eq!(up.requests(), 0, "refused before core was asked");
    // Chunked, no length announced: cut when the limit passes.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![1u8; 512])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = post(&edge, "/api/v1/media", body).send().await.unwrap();
    assert_eq!(r.status(), 413, "chunked");
    let r = post(&edge, "/api/v1/statuses", vec![7u8; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (method, _, _, len) = up.last();
    assert_eq!((method.as_str(), len), ("POST", 1000));
}

#[tokio::test]
async fn a_request_is_retried_on_another_upstream_only_when_the_connect_failed_and_a_sent_post_never(
) {
    let refused = refused_port().await;
    let refused_addr = refused.local_addr().unwrap();
    drop(refused);
    let good = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    // Request bodies streamed, not read whole first (`tests/it/proxy_buffer.rs` has that).
    let edge = edge_with_core(
        dir.path(),
        &[refused_addr, good.addr],
        "buffer_requests = false\n",
    )
    .await;
    // Both idle: the first in order, which refuses, is picked first.
    let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
    assert_eq!(r.status(), 200, "retried on the second upstream");
    assert_eq!(good.requests(), 1);
    // A POST whose body streams (not read whole ahead: tests/it/proxy_prebuffer.rs has the
    // one that is) goes to the other upstream too: nothing was sent, its body is unread.
    let r = post(&edge, "/api/v1/media", vec![b'm'; 64 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a streamed POST whose connect failed, on the other"
    );
    assert_eq!(good.requests(), 2);
    assert_eq!(good.last().3, 64 * 1024, "its whole body");

    // Sent, then the connection reset: not even a GET is sent again.
    let reset = Upstream::start(Mode::Reset).await;
    let other = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[reset.addr, other.addr], "").await;
    let r = post(&edge, "/api/v1/statuses", "status=hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(reset.accepts(), 1);
    assert_eq!(other.requests(), 0, "a sent POST was not retried");
}

#[tokio::test]
async fn the_breaker_opens_after_consecutive_failures_and_answers_503_without_asking() {
    let up = Upstream::start(Mode::Reset).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[up.addr],
        "breaker_failures = 3\nbreaker_cooldown = \"1h\"\n",
    )
    .await;
    for n in 1..=3 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(up.accepts(), n);
    }
    up.set(Mode::Answer);
    for _ in 0..5 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 503);
        let secs: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs > 3000 && secs <= 3600, "Retry-After {secs}");
    }
    assert_eq!(
        up.accepts(),
        3,
        "the open breaker did not contact the upstream"
    );
    // Media is not behind the breaker.
    let r = get(&edge, CORE, "/system/small.txt").send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn an_upstream_that_refused_comes_back_through_a_half_open_probe() {
    let port = refused_port().await;
    let addr = port.local_addr().unwrap();
    drop(port);
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[addr],
        "breaker_failures = 2\nbreaker_cooldown = \"50ms\"\n",
    )
    .await;
    for _ in 0..2 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 502);
    }
    let up = Upstream::on(
        tokio::net::TcpListener::bind(addr).await.unwrap(),
        Mode::Answer,
    );
    // Until the cool-down ends: 503 at once; then one probe passes and closes the breaker.
    let start = std::time::Instant::now();
    loop {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        match r.status().as_u16() {
            200 => break,
            503 => assert!(r.headers().contains_key("retry-after")),
            s => panic!("unexpected {s}"),
        }
        assert!(start.elapsed() < WAIT, "the breaker never half-opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.requests(), 1, "exactly the probe");
    for n in 2..=4 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 200, "closed again");
        assert_eq!(up.requests(), n);
    }
}

#[tokio::test]
async fn media_is_served_while_core_hangs_and_the_cap_answers_503() {
    let up = Upstream::start(Mode::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "max_connections_per_upstream = 4\n").await;
    let mut hung = Vec::new();
    for _ in 0..4 {
        let req = get(&edge, CORE, "/api/v1/timelines/home");
        hung.push(tokio::spawn(async move { req.send().await }));
    }
    eventually(WAIT, "four requests hung at core", || up.hung() == 4).await;
    // At the cap: answered at once, the upstream not asked.
    let r = get(&edge, CORE, "/api/v1/timelines/home")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(up.requests(), 4);
    for _ in 0..20 {
        let r = get(&edge, CORE, "/system/small.txt").send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "small");
        let r = get(&edge, "files.test", "/small.txt").send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "small");
    }
    assert!(
        hung.iter().all(|h| !h.is_finished()),
        "core requests still hang"
    );
    for h in hung {
        h.abort();
    }
}

#[tokio::test]
async fn no_first_byte_within_the_timeout_is_504() {
    let up = Upstream::start(Mode::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "first_byte_timeout = \"500ms\"\n").await;
    let r = get(&edge, CORE, "/api/v1/timelines/home")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    eventually(WAIT, "the request reached core", || up.hung() == 1).await;
}

#[tokio::test]
async fn without_core_every_request_is_media_as_before() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("small.txt"), "small").unwrap();
    let edge = start_edge(
        dir.path(),
        &format!("[primary]\ntype = \"fs\"\nroot = \"{}\"\n", root.display()),
    )
    .await;
    let r = get(&edge, "anything.test", "/system/small.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "small");
    let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(up.requests(), 0);
}
