//! The core cache (issue 9 §1, §3, §4) against a real in-process core: a raw HTTP/1.1
//! server whose answers each test scripts per request (headers, body, a cut mid-body, a
//! hang, a gate held until the test opens it), counting what reaches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::common::{client, eventually, TestEdge};
use crate::proxy::{edge_with_core, CORE, WAIT};

/// What core answers to one request.
#[derive(Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Close the connection after this many body bytes (announcing the whole length).
    pub cut_after: Option<usize>,
    /// Read the request, never answer.
    pub hang: bool,
    /// Hold the answer until this turns true.
    pub gate: Option<watch::Receiver<bool>>,
    /// Send this many body bytes, then hold the rest until the gate turns true.
    pub part: Option<(usize, watch::Receiver<bool>)>,
}

pub fn reply(status: u16, headers: &[(&str, &str)], body: &str) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.as_bytes().to_vec(),
        ..Reply::default()
    }
}

/// A request as core saw it: method, path, headers (lower-case names).
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
}

type Script = Arc<dyn Fn(&Seen, usize) -> Reply + Send + Sync>;

/// A scripted core. `script(request, n)` answers the n-th request (1-based) to its path.
pub struct Core {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Core {
    pub async fn start(script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> Core {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Arc<Mutex<Script>> = Arc::new(Mutex::new(Arc::new(script)));
        let (s, sc) = (seen.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, sc) = (s.clone(), sc.clone());
                tokio::spawn(async move { serve_conn(stream, s, sc).await });
            }
        });
        Core {
            addr,
            seen,
            script,
            task,
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests that reached core for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.seen.lock().iter().filter(|s| s.path == path).count()
    }

    pub fn last(&self, path: &str) -> Seen {
        self.seen
            .lock()
            .iter()
            .rev()
            .find(|s| s.path == path)
            .cloned()
            .expect("a request reached core")
    }

    pub fn set(&self, script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) {
        *self.script.lock() = Arc::new(script);
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_conn(
    mut stream: tokio::net::TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_owned();
        let path = first.next().unwrap_or("").to_owned();
        let headers: HashMap<String, String> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let body_len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let req = Seen {
            method,
            path: path.clone(),
            headers,
        };
        let n = {
            let mut seen = seen.lock();
            seen.push(req.clone());
            seen.iter().filter(|s| s.path == path).count()
        };
        let r = (script.lock().clone())(&req, n);
        if r.hang {
            let _ = stream.read(&mut chunk).await;
            std::future::pending::<()>().await;
        }
        if let Some(mut gate) = r.gate.clone() {
            let _ = gate.wait_for(|open| *open).await;
        }
        let mut out = format!(
            "HTTP/1.1 {} X\r\ncontent-length: {}\r\n",
            r.status,
            r.body.len()
        );
        for (k, v) in &r.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        let body = match r.cut_after {
            Some(n) => &r.body[..n],
            None => &r.body[..],
        };
        let mut rest: &[u8] = &[];
        if req.method != "HEAD" {
            match &r.part {
                Some((k, _)) => {
                    bytes.extend_from_slice(&body[..*k]);
                    rest = &body[*k..];
                }
                None => bytes.extend_from_slice(body),
            }
        }
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        if let Some((_, mut gate)) = r.part.clone() {
            let _ = stream.flush().await;
            let _ = gate.wait_for(|open| *open).await;
            if stream.write_all(rest).await.is_err() {
                return;
            }
        }
        if r.cut_after.is_some() {
            let _ = stream.flush().await;
            return; // closed mid-body
        }
    }
}

pub fn cache_conf(dir: &std::path::Path, max_size: &str, extra: &str) -> String {
    format!(
        "{extra}[core.cache]\ndir = \"{}\"\nmax_size = \"{max_size}\"\n",
        dir.join("core-cache").display()
    )
}

pub async fn edge(dir: &std::path::Path, core: &Core, extra: &str) -> TestEdge {
    edge_with_core(dir, &[core.addr], &cache_conf(dir, "16MiB", extra)).await
}

/// A core answering every URL `v1`, `v2`… (`public, max-age=600`), and an edge caching it
/// with `[cache_buster]` (header `X-Purge-Secret`, secret `s3cret`).
pub async fn buster_edge(dir: &std::path::Path) -> (Core, TestEdge) {
    let core = Core::start(|_, n| {
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("v{n}"),
        )
    })
    .await;
    let buster = "[cache_buster]\nsecret_header = \"X-Purge-Secret\"\nsecret = \"s3cret\"\n";
    let conf = format!("{}{buster}", cache_conf(dir, "16MiB", ""));
    let edge = edge_with_core(dir, &[core.addr], &conf).await;
    (core, edge)
}

/// GET from the edge as the instance's host; `(status, X-Cache-Status, body)`.
pub async fn fetch(edge: &TestEdge, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut r = crate::proxy::get(edge, CORE, path);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, resp.text().await.unwrap())
}

pub fn hs<'a>(s: &'a Seen, name: &str) -> &'a str {
    s.headers.get(name).map(String::as_str).unwrap_or("")
}

#[tokio::test]
async fn credentials_never_get_or_leave_another_requesters_entry() {
    // Core answers each requester by its credentials, cacheable but not `public`.
    let core = Core::start(|s, _| {
        let who = [hs(s, "authorization"), hs(s, "cookie"), hs(s, "signature")]
            .into_iter()
            .find(|v| !v.is_empty())
            .unwrap_or("anonymous")
            .to_owned();
        reply(
            200,
            &[("cache-control", "max-age=600")],
            &format!("for {who}"),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let p = "/api/v1/timelines/home";

    // A response to a request with credentials is not stored for others…
    for creds in [
        ("authorization", "Bearer alice"),
        ("cookie", "_mastodon_session=alice"),
        ("cookie", "_session_id=alice"),
        ("signature", "keyId=\"https://a.example/actor#main-key\""),
    ] {
        let (st, cache, body) = fetch(&edge, p, &[creds]).await;
        assert_eq!((st, cache.as_str()), (200, "BYPASS"));
        assert_eq!(body, format!("for {}", creds.1));
    }
    assert_eq!(core.count(p), 4);
    let (_, cache, body) = fetch(&edge, p, &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", "for anonymous"));
    assert_eq!(core.count(p), 5, "no credentialed response was stored");
    let (_, cache, body) = fetch(&edge, p, &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("HIT", "for anonymous"));

    // …and requests with credentials are never answered from the anonymous entry.
    for creds in [
        ("authorization", "Bearer bob"),
        ("cookie", "theme=dark; _mastodon_session=bob"),
        ("signature", "keyId=\"https://b.example/actor#main-key\""),
    ] {
        let (_, cache, body) = fetch(&edge, p, &[creds]).await;
        assert_eq!(cache, "BYPASS");
        assert_eq!(body, format!("for {}", creds.1));
    }
    assert_eq!(core.count(p), 8);

    // A response that says `public` to an Authorization request may be shared (RFC 9111
    // §3.5); the credential itself is not kept on disk.
    core.set(|s, _| {
        let body = match hs(s, "authorization") {
            "" => "public, anonymous",
            _ => "public, with a token",
        };
        reply(200, &[("cache-control", "public, max-age=600")], body)
    });
    let (_, _, body) = fetch(
        &edge,
        "/api/v1/instance",
        &[("authorization", "Bearer carol")],
    )
    .await;
    assert_eq!(body, "public, with a token");
    eventually(WAIT, "the public response is stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 2
    })
    .await;
    let (_, cache, body) = fetch(&edge, "/api/v1/instance", &[]).await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("HIT", "public, with a token")
    );
    let on_disk = walk_text(&dir.path().join("core-cache"));
    assert!(
        !on_disk.contains("Bearer carol"),
        "a credential was written to disk"
    );

    // Authorized fetch: a `public` answer that varies on `Signature` is for that signer only.
    core.set(|s, _| {
        let body = match hs(s, "signature") {
            "" => "actor for anyone",
            _ => "actor for a signer",
        };
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("vary", "Accept, Signature"),
            ],
            body,
        )
    });
    let signed = [("signature", "keyId=\"https://a.example/actor#main-key\"")];
    let (_, cache, body) = fetch(&edge, "/users/alice", &signed).await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("BYPASS", "actor for a signer")
    );
    let (_, cache, body) = fetch(&edge, "/users/alice", &[]).await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("MISS", "actor for anyone")
    );
    assert_eq!(core.count("/users/alice"), 2);

    // Set-Cookie responses are never stored: each client gets its own cookie.
    core.set(|_, n| {
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("set-cookie", &format!("_mastodon_session=s{n}")),
            ],
            "page",
        )
    });
    for n in 1..=2 {
        let r = crate::proxy::get(&edge, CORE, "/about")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.headers()["set-cookie"],
            format!("_mastodon_session=s{n}").as_str()
        );
        assert_eq!(r.headers()["x-cache-status"], "MISS");
    }
}

fn walk_text(dir: &std::path::Path) -> String {
    let mut all = String::new();
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_file() {
            all.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()));
        }
    }
    all
}

#[tokio::test]
async fn html_and_activitypub_json_of_one_url_never_cross() {
    let core = Core::start(|s, _| {
        let json = hs(s, "accept").contains("activity+json");
        let (ct, body) = match json {
            true => ("application/activity+json", "{\"type\":\"Person\"}"),
            false => ("text/html", "<html>alice</html>"),
        };
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("vary", "Accept"),
                ("content-type", ct),
            ],
            body,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let html = [("accept", "text/html")];
    let ap = [("accept", "application/activity+json")];
    for (round, cache) in [(1, "MISS"), (2, "HIT"), (3, "HIT")] {
        let (_, c, body) = fetch(&edge, "/@alice", &html).await;
        assert_eq!(
            (c.as_str(), body.as_str()),
            (cache, "<html>alice</html>"),
            "round {round}"
        );
        let (_, c, body) = fetch(&edge, "/@alice", &ap).await;
        assert_eq!(
            (c.as_str(), body.as_str()),
            (cache, "{\"type\":\"Person\"}"),
            "round {round}"
        );
        if round == 1 {
            eventually(WAIT, "both variants stored", || {
                edge.running.core_cache.as_ref().unwrap().usage().1 == 2
            })
            .await;
        }
    }
    assert_eq!(core.count("/@alice"), 2);
    // A HEAD is answered from the stored GET, without a body.
    let r = client()
        .head(format!("http://{}/@alice", edge.running.addr))
        .header("host", CORE)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.headers()["content-type"], "text/html");
    assert_eq!(r.headers()["content-length"], "18");
    assert!(r.bytes().await.unwrap().is_empty());
    // The purge hook evicts every variant of the URL.
    let cache = edge.running.core_cache.as_ref().unwrap();
    assert_eq!(cache.purge("Example.TEST:443", "/@alice"), 2);
    let (_, c, _) = fetch(&edge, "/@alice", &ap).await;
    assert_eq!(c, "MISS");
}

#[tokio::test]
async fn stale_if_error_serves_stale_while_core_fails_and_nothing_else() {
    let core = Core::start(|s, n| match s.path.as_str() {
        // Already stale when stored: every use revalidates.
        "/sie" => reply(
            200,
            &[
                ("cache-control", "max-age=0, stale-if-error=3600"),
                ("etag", "\"v1\""),
            ],
            &format!("sie v{n}"),
        ),
        "/strict" => reply(
            200,
            &[(
                "cache-control",
                "max-age=0, must-revalidate, stale-if-error=3600",
            )],
            "strict",
        ),
        _ => reply(200, &[("cache-control", "max-age=0")], "plain"),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(
        dir.path(),
        &core,
        "first_byte_timeout = \"1s\"\nbreaker_failures = 3\nbreaker_cooldown = \"60s\"\n",
    )
    .await;
    for p in ["/sie", "/strict", "/plain"] {
        let (st, c, _) = fetch(&edge, p, &[]).await;
        assert_eq!((st, c.as_str()), (200, "MISS"), "{p}");
    }
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 3
    })
    .await;

    // Core answers 503: stale where stale-if-error allows, the error elsewhere.
    core.set(|_, _| reply(503, &[], "down"));
    let (st, c, body) = fetch(&edge, "/sie", &[]).await;
    assert_eq!((st, c.as_str(), body.as_str()), (200, "STALE", "sie v1"));
    for p in ["/strict", "/plain"] {
        let (st, _, body) = fetch(&edge, p, &[]).await;
        assert_eq!((st, body.as_str()), (503, "down"), "{p}: nothing invented");
    }
    // Three failures in a row opened the breaker: core is not asked, stale still served.
    let before = core.count("/sie");
    let (st, c, body) = fetch(&edge, "/sie", &[]).await;
    assert_eq!((st, c.as_str(), body.as_str()), (200, "STALE", "sie v1"));
    assert_eq!(core.count("/sie"), before, "the breaker is open");
    let (st, _, _) = fetch(&edge, "/plain", &[]).await;
    assert_eq!(st, 503, "breaker open, nothing stored may be served");
}

#[tokio::test]
async fn stale_if_error_covers_a_core_that_times_out_or_is_gone() {
    let core = Core::start(|_, n| {
        reply(
            200,
            &[("cache-control", "max-age=0, stale-if-error=3600")],
            &format!("v{n}"),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "first_byte_timeout = \"1s\"\n").await;
    assert_eq!(fetch(&edge, "/t", &[]).await.1, "MISS");
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    core.set(|_, _| Reply {
        hang: true,
        ..Reply::default()
    });
    let (st, c, body) = fetch(&edge, "/t", &[]).await;
    assert_eq!(
        (st, c.as_str(), body.as_str()),
        (200, "STALE", "v1"),
        "timeout"
    );
    drop(core); // refused from now on
    let (st, c, body) = fetch(&edge, "/t", &[]).await;
    assert_eq!(
        (st, c.as_str(), body.as_str()),
        (200, "STALE", "v1"),
        "core gone"
    );
    let (st, _, _) = fetch(&edge, "/never-stored", &[]).await;
    assert_eq!(st, 502);
}

#[tokio::test]
async fn a_304_revalidates_and_updates_the_stored_headers() {
    let core = Core::start(|s, n| {
        if hs(s, "if-none-match").contains("\"e1\"") {
            return reply(
                304,
                &[
                    ("etag", "\"e1\""),
                    ("cache-control", "max-age=0"),
                    ("x-version", &n.to_string()),
                ],
                "",
            );
        }
        reply(
            200,
            &[
                ("etag", "\"e1\""),
                ("cache-control", "max-age=0"),
                ("x-version", "1"),
            ],
            "the body",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    assert_eq!(fetch(&edge, "/v", &[]).await.1, "MISS");
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    let r = crate::proxy::get(&edge, CORE, "/v").send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.headers()["x-version"], "2", "updated from the 304");
    assert!(r.headers().contains_key("age"));
    assert_eq!(r.text().await.unwrap(), "the body");
    assert_eq!(hs(&core.last("/v"), "if-none-match"), "\"e1\"");
    let r = crate::proxy::get(&edge, CORE, "/v").send().await.unwrap();
    assert_eq!(r.headers()["x-version"], "3");
    // A client's own conditional request is answered 304 from the stored entry.
    let r = crate::proxy::get(&edge, CORE, "/v")
        .header("if-none-match", "\"e1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // A 304 that sets a cookie reaches its requester, but is not merged into the entry.
    core.set(|s, n| {
        let mut h = vec![
            ("etag", "\"e1\"".to_string()),
            ("cache-control", "max-age=0".into()),
        ];
        h.push(("x-version", n.to_string()));
        if n == 5 {
            h.push(("set-cookie", "_mastodon_session=five".into()));
        }
        let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match hs(s, "if-none-match").contains("\"e1\"") {
            true => reply(304, &h, ""),
            false => reply(200, &h, "the body"),
        }
    });
    let r = crate::proxy::get(&edge, CORE, "/v").send().await.unwrap();
    assert_eq!(r.headers()["x-version"], "5");
    assert_eq!(r.headers()["set-cookie"], "_mastodon_session=five");
    let r = crate::proxy::get(&edge, CORE, "/v").send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.headers()["x-version"], "6");
    assert!(
        r.headers().get("set-cookie").is_none(),
        "another client's cookie"
    );
}

/// Served stale at once while core's answer is held; the background answer then replaces
/// the entry. Core's later answers are 500s, which a background revalidation leaves unused:
/// each fetch below revalidates again, and an answer after the second must not replace v2
/// before a fetch sees it (it did under load: the first poll, before v2 was stored, started
/// a third request whose v3 replaced v2 before the next poll).
#[tokio::test]
async fn stale_while_revalidate_serves_at_once_and_refreshes_in_the_background() {
    let (open, gate) = watch::channel(false);
    let core = Core::start(move |_, n| {
        let cc = [("cache-control", "max-age=0, stale-while-revalidate=3600")];
        match n {
            1 => reply(200, &cc, "v1"),
            2 => Reply {
                gate: Some(gate.clone()),
                ..reply(200, &cc, "v2")
            },
            _ => reply(500, &cc, &format!("error {n}")),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    assert_eq!(fetch(&edge, "/swr", &[]).await.2, "v1");
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    // Core holds its second answer: the stale entry is served without waiting for it.
    let (_, c, body) = fetch(&edge, "/swr", &[]).await;
    assert_eq!((c.as_str(), body.as_str()), ("STALE", "v1"));
    eventually(WAIT, "revalidation sent in the background", || {
        core.count("/swr") == 2
    })
    .await;
    let (_, c, body) = fetch(&edge, "/swr", &[]).await;
    assert_eq!((c.as_str(), body.as_str()), ("STALE", "v1"));
    assert_eq!(
        core.count("/swr"),
        2,
        "one background revalidation at a time"
    );
    open.send(true).unwrap();
    let start = std::time::Instant::now();
    loop {
        let (status, c, body) = fetch(&edge, "/swr", &[]).await;
        assert_eq!((status, c.as_str()), (200, "STALE"));
        if body == "v2" {
            break;
        }
        assert_eq!(body, "v1", "only v1 or core's second answer is ever stored");
        assert!(
            start.elapsed() < WAIT,
            "the background response never replaced the stored one"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_request_per_url_reaches_core() {
    let (open, gate) = watch::channel(false);
    let core = Core::start(move |_, _| Reply {
        gate: Some(gate.clone()),
        ..reply(200, &[("cache-control", "public, max-age=600")], "shared")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Arc::new(edge(dir.path(), &core, "").await);
    let mut clients = Vec::new();
    for _ in 0..5 {
        let edge = edge.clone();
        clients.push(tokio::spawn(
            async move { fetch(&edge, "/popular", &[]).await },
        ));
    }
    eventually(WAIT, "four requests follow the first", || {
        edge.running
            .metrics
            .render()
            .contains("fediedge_coalesced_requests_total 4")
    })
    .await;
    assert_eq!(core.count("/popular"), 1);
    open.send(true).unwrap();
    let mut statuses = Vec::new();
    for c in clients {
        let (st, cache, body) = c.await.unwrap();
        assert_eq!((st, body.as_str()), (200, "shared"));
        statuses.push(cache);
    }
    statuses.sort();
    assert_eq!(statuses, ["HIT", "HIT", "HIT", "HIT", "MISS"]);
    assert_eq!(core.count("/popular"), 1, "core saw one request");
}

#[tokio::test]
async fn followers_stream_the_response_core_is_still_sending() {
    let (open_head, head_gate) = watch::channel(false);
    let (open_rest, rest_gate) = watch::channel(false);
    let body = format!("{}{}", "a".repeat(1000), "b".repeat(1000));
    let b = body.clone();
    let core = Core::start(move |_, _| Reply {
        gate: Some(head_gate.clone()),
        part: Some((1000, rest_gate.clone())),
        ..reply(200, &[("cache-control", "public, max-age=600")], &b)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Arc::new(edge(dir.path(), &core, "").await);
    let mut clients = Vec::new();
    let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(3);
    for _ in 0..3 {
        let (edge, first_tx) = (edge.clone(), first_tx.clone());
        clients.push(tokio::spawn(async move {
            let mut r = crate::proxy::get(&edge, CORE, "/big").send().await.unwrap();
            let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
            let mut got = Vec::new();
            while let Some(c) = r.chunk().await.unwrap() {
                if got.is_empty() {
                    first_tx.send(()).await.unwrap();
                }
                got.extend_from_slice(&c);
            }
            (cache, String::from_utf8(got).unwrap())
        }));
    }
    eventually(WAIT, "two requests follow the first", || {
        edge.running
            .metrics
            .render()
            .contains("fediedge_coalesced_requests_total 2")
    })
    .await;
    open_head.send(true).unwrap();
    // Every client gets the first half while core still holds the second.
    for _ in 0..3 {
        tokio::time::timeout(WAIT, first_rx.recv())
            .await
            .unwrap()
            .unwrap();
    }
    assert!(!*open_rest.borrow());
    open_rest.send(true).unwrap();
    let mut caches = Vec::new();
    for c in clients {
        let (cache, got) = c.await.unwrap();
        assert_eq!(got, body);
        caches.push(cache);
    }
    caches.sort();
    assert_eq!(caches, ["HIT", "HIT", "MISS"]);
    assert_eq!(core.count("/big"), 1);
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage() == (2000, 1)
    })
    .await;
    assert_eq!(fetch(&edge, "/big", &[]).await.1, "HIT");
}

#[tokio::test]
async fn a_response_is_stored_even_when_its_client_left() {
    let (open_rest, rest_gate) = watch::channel(false);
    let core = Core::start(move |_, _| Reply {
        part: Some((10, rest_gate.clone())),
        ..reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &"z".repeat(100),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let mut r = crate::proxy::get(&edge, CORE, "/left")
        .send()
        .await
        .unwrap();
    assert_eq!(r.chunk().await.unwrap().unwrap().len(), 10);
    drop(r); // the client leaves mid-body
    open_rest.send(true).unwrap();
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage() == (100, 1)
    })
    .await;
    assert_eq!(fetch(&edge, "/left", &[]).await.1, "HIT");
    assert_eq!(core.count("/left"), 1);
}

#[tokio::test]
async fn stored_responses_survive_a_restart_and_stay_under_max_size() {
    let core = Core::start(|s, _| {
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("{}{}", s.path, "x".repeat(16 * 1024)),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let conf = cache_conf(dir.path(), "64KiB", "");
    let edge = edge_with_core(dir.path(), &[core.addr], &conf).await;
    for i in 0..8 {
        fetch(&edge, &format!("/r{i}"), &[]).await;
        eventually(WAIT, "stored", || {
            core.count(&format!("/r{i}")) == 1
                && edge.running.core_cache.as_ref().unwrap().usage().1 == (i + 1).min(3)
        })
        .await;
    }
    let (bytes, n) = edge.running.core_cache.as_ref().unwrap().usage();
    assert!(bytes <= 64 * 1024, "{bytes} bytes over max_size");
    assert_eq!(n, 3, "16 KiB bodies: three fit in 64 KiB");
    edge.running.shutdown().await;

    let edge = edge_with_core(dir.path(), &[core.addr], &conf).await;
    edge.running.core_cache.as_ref().unwrap().loaded().await;
    assert_eq!(
        edge.running.core_cache.as_ref().unwrap().usage(),
        (bytes, n)
    );
    let (_, c, body) = fetch(&edge, "/r7", &[]).await;
    assert_eq!(c, "HIT", "kept across the restart");
    assert!(body.starts_with("/r7xxx"));
    let (_, c, _) = fetch(&edge, "/r0", &[]).await;
    assert_eq!(c, "MISS", "evicted, least recently used");
    assert_eq!(core.count("/r7"), 1);
}

#[tokio::test]
async fn a_body_cut_mid_way_is_never_stored() {
    let core = Core::start(|_, n| Reply {
        cut_after: (n == 1).then_some(1000),
        ..Reply {
            body: vec![b'a'; 4000],
            ..reply(200, &[("cache-control", "public, max-age=600")], "")
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let r = crate::proxy::get(&edge, CORE, "/cut").send().await.unwrap();
    assert!(r.bytes().await.is_err(), "the client sees the cut");
    let (st, c, body) = fetch(&edge, "/cut", &[]).await;
    assert_eq!((st, c.as_str(), body.len()), (200, "MISS", 4000));
    assert_eq!(core.count("/cut"), 2, "nothing partial was stored");
    eventually(WAIT, "the whole body stored", || {
        edge.running.core_cache.as_ref().unwrap().usage() == (4000, 1)
    })
    .await;
    assert_eq!(fetch(&edge, "/cut", &[]).await.1, "HIT");
    // A range of it is served from the stored body.
    let r = crate::proxy::get(&edge, CORE, "/cut")
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/4000");
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap().len(), 10);
    assert_eq!(core.count("/cut"), 2);
}

#[tokio::test]
async fn unsafe_methods_invalidate_the_url_and_same_host_locations() {
    let core = Core::start(|s, _| match s.method.as_str() {
        "POST" => reply(
            200,
            &[
                ("location", "/statuses/2"),
                ("content-location", "https://elsewhere.test/statuses/3"),
            ],
            "posted",
        ),
        _ => reply(200, &[("cache-control", "public, max-age=600")], "page"),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    for p in ["/statuses/1", "/statuses/2", "/statuses/3"] {
        fetch(&edge, p, &[]).await;
    }
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 3
    })
    .await;
    let r = client()
        .post(format!("http://{}/statuses/1", edge.running.addr))
        .header("host", CORE)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(fetch(&edge, "/statuses/1", &[]).await.1, "MISS");
    assert_eq!(fetch(&edge, "/statuses/2", &[]).await.1, "MISS", "Location");
    assert_eq!(
        fetch(&edge, "/statuses/3", &[]).await.1,
        "HIT",
        "another host's Content-Location is not ours"
    );
    assert!(edge
        .running
        .metrics
        .render()
        .contains("fediedge_core_cache_requests_total{cache_status=\"HIT\"}"));
    // With the core cache on, a repeated POST with Idempotency-Key still reaches core once.
    let post = || {
        client()
            .post(format!("http://{}/api/v1/statuses", edge.running.addr))
            .header("host", CORE)
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "k1")
            .body("status=hi")
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(first.status(), 200);
    let again = post().await.unwrap();
    assert_eq!(again.headers()["x-cache-status"], "REPLAY");
    assert_eq!(core.count("/api/v1/statuses"), 1);
}

#[tokio::test]
async fn the_cache_buster_evicts_a_url_from_the_core_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (_core, edge) = buster_edge(dir.path()).await;
    assert_eq!(fetch(&edge, "/emoji.png", &[]).await.2, "v1");
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    let (st, _, _) = fetch(&edge, "/emoji.png", &[("x-purge-secret", "guess")]).await;
    assert_eq!(st, 403);
    assert_eq!(fetch(&edge, "/emoji.png", &[]).await.1, "HIT");
    let (st, _, _) = fetch(&edge, "/emoji.png", &[("x-purge-secret", "s3cret")]).await;
    assert_eq!(st, 200);
    let (_, c, body) = fetch(&edge, "/emoji.png", &[]).await;
    assert_eq!((c.as_str(), body.as_str()), ("MISS", "v2"));
}

#[tokio::test]
async fn a_post_while_a_get_is_received_keeps_that_response_out() {
    let (open_rest, rest_gate) = watch::channel(false);
    let core = Core::start(move |s, _| match s.method.as_str() {
        "POST" => reply(200, &[], "posted"),
        _ => Reply {
            part: Some((5, rest_gate.clone())),
            ..reply(
                200,
                &[("cache-control", "public, max-age=600")],
                "0123456789",
            )
        },
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Arc::new(edge(dir.path(), &core, "").await);
    let e = edge.clone();
    let reader = tokio::spawn(async move { fetch(&e, "/statuses/9", &[]).await });
    eventually(WAIT, "the GET reached core", || {
        core.count("/statuses/9") == 1
    })
    .await;
    let r = client()
        .post(format!("http://{}/statuses/9", edge.running.addr))
        .header("host", CORE)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    open_rest.send(true).unwrap();
    assert_eq!(reader.await.unwrap().2, "0123456789");
    let (_, c, _) = fetch(&edge, "/statuses/9", &[]).await;
    assert_eq!(c, "MISS", "the response predating the POST was not stored");
}
