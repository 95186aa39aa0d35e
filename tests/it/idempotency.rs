//! Duplicate posts (issue 9 §5): `POST`s with `Idempotency-Key` through the front door, against
//! a real in-process upstream (puma's place) that numbers what reaches it and can hold,
//! fail, cut and answer big.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use parking_lot::Mutex;

use crate::common::{client, eventually, TestEdge};
use crate::proxy::{edge_with_core, CORE, WAIT};

/// What the upstream answers (once its gate is open, when holding).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// 201, `{"id":"<n>"}` where n numbers the requests, and `x-request-number: n`.
    Answer,
    /// 500.
    Fail,
    /// Reads the request, then closes the connection without an answer.
    Cut,
    /// 200 with a body of 300 KiB.
    Big,
    /// 422 (a post core refuses), numbered as `Answer`.
    Reject,
}

struct Up {
    addr: SocketAddr,
    state: Arc<UpState>,
    task: tokio::task::JoinHandle<()>,
}

struct UpState {
    mode: Mutex<Mode>,
    /// While false, every request waits (the post "hangs").
    gate: tokio::sync::watch::Sender<bool>,
    requests: AtomicUsize,
    waiting: AtomicUsize,
    /// Requests numbered up to this answer 500 whatever the mode.
    fail_upto: AtomicUsize,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl Up {
    async fn start(mode: Mode) -> Up {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpState {
            mode: Mutex::new(mode),
            gate: tokio::sync::watch::channel(true).0,
            requests: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            fail_upto: AtomicUsize::new(0),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| serve(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Up { addr, state, task }
    }

    fn set(&self, mode: Mode) {
        *self.state.mode.lock() = mode;
    }
    fn hold(&self) {
        self.state.gate.send_replace(false);
    }
    fn release(&self) {
        self.state.gate.send_replace(true);
    }
    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
    fn waiting(&self) -> usize {
        self.state.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    s: Arc<UpState>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Body>, std::io::Error> {
    if req.uri().path() == "/health" {
        return Ok(http::Response::new(
            Full::new(Bytes::from("OK")).boxed_unsync(),
        ));
    }
    let n = s.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = req.into_body().collect().await;
    let mut gate = s.gate.subscribe();
    s.waiting.fetch_add(1, Ordering::SeqCst);
    let _ = gate.wait_for(|open| *open).await;
    s.waiting.fetch_sub(1, Ordering::SeqCst);
    let mut mode = *s.mode.lock();
    if n <= s.fail_upto.load(Ordering::SeqCst) {
        mode = Mode::Fail;
    }
    let resp = match mode {
        Mode::Answer => http::Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .header("x-request-number", n.to_string())
            .body(Full::new(Bytes::from(format!("{{\"id\":\"{n}\"}}"))).boxed_unsync()),
        Mode::Fail => http::Response::builder()
            .status(500)
            .body(Full::new(Bytes::from(format!("failed {n}"))).boxed_unsync()),
        // An error from the service: hyper closes the connection without an answer.
        Mode::Cut => return Err(std::io::Error::other("cut")),
        Mode::Reject => http::Response::builder()
            .status(422)
            .header("x-request-number", n.to_string())
            .body(Full::new(Bytes::from(format!("rejected {n}"))).boxed_unsync()),
        Mode::Big => http::Response::builder()
            .status(200)
            .header("x-request-number", n.to_string())
            .body(Full::new(Bytes::from(vec![b'b'; 300 * 1024])).boxed_unsync()),
    };
    Ok(resp.unwrap())
}

fn post(edge: &TestEdge, path: &str, key: &str, auth: Option<&str>) -> reqwest::RequestBuilder {
    let mut r = client()
        .post(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .header("content-type", "application/json")
        .body("{\"status\":\"hello\"}");
    if !key.is_empty() {
        r = r.header("idempotency-key", key);
    }
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r
}

/// Status, `x-request-number`, `X-Cache-Status` and body of an answer.
async fn seen(r: reqwest::Response) -> (u16, String, String, String) {
    let h = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (n, cache) = (h("x-request-number"), h("x-cache-status"));
    (r.status().as_u16(), n, cache, r.text().await.unwrap())
}

const STATUSES: &str = "/api/v1/statuses";

#[tokio::test]
async fn concurrent_duplicates_wait_for_the_first_post_and_get_its_answer() {
    let up = Up::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;
    up.hold();
    let first = tokio::spawn(post(&edge, STATUSES, "k1", Some("Bearer alice")).send());
    eventually(WAIT, "the first post at core", || up.waiting() == 1).await;
    let dups: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post(&edge, STATUSES, "k1", Some("Bearer alice")).send()))
        .collect();
    // Each duplicate is connected to the edge (one connection per client), and none
    // reached core.
    eventually(WAIT, "the duplicates at the edge", || {
        edge.running.open_connections() >= 4
    })
    .await;
    assert_eq!(up.requests(), 1);
    up.release();
    let first = seen(first.await.unwrap().unwrap()).await;
    assert_eq!(first.0, 201);
    assert_eq!(first.1, "1");
    assert_eq!(first.3, "{\"id\":\"1\"}");
    assert_ne!(first.2, "REPLAY", "the first is core's own answer");
    for d in dups {
        let d = seen(d.await.unwrap().unwrap()).await;
        assert_eq!(
            (d.0, &d.1, &d.3),
            (201, &first.1, &first.3),
            "same status, headers, body"
        );
        assert_eq!(d.2, "REPLAY");
    }
    assert_eq!(up.requests(), 1, "core saw one request");
}

#[tokio::test]
async fn a_later_duplicate_is_replayed_and_nothing_is_shared_across_keys_or_credentials() {
    let up = Up::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;
    let a = seen(
        post(&edge, STATUSES, "k1", Some("Bearer alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((a.0, a.1.as_str()), (201, "1"));
    let again = seen(
        post(&edge, STATUSES, "k1", Some("Bearer alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (again.0, again.1.as_str(), again.2.as_str()),
        (201, "1", "REPLAY")
    );
    assert_eq!(again.3, a.3);
    assert_eq!(up.requests(), 1);

    // Another key, other credentials, another path, a session cookie instead: each its own.
    let other_key = seen(
        post(&edge, STATUSES, "k2", Some("Bearer alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(other_key.1, "2");
    let bob = seen(
        post(&edge, STATUSES, "k1", Some("Bearer bob"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((bob.1.as_str(), bob.2.as_str()), ("3", ""));
    let media = seen(
        post(&edge, "/api/v1/media", "k1", Some("Bearer alice"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(media.1, "4");
    let cookie = |c: &str| {
        post(&edge, STATUSES, "k1", None)
            .header("cookie", format!("_session_id={c}"))
            .send()
    };
    assert_eq!(seen(cookie("s1").await.unwrap()).await.1, "5");
    let s1 = seen(cookie("s1").await.unwrap()).await;
    assert_eq!((s1.1.as_str(), s1.2.as_str()), ("5", "REPLAY"));
    assert_eq!(seen(cookie("s2").await.unwrap()).await.1, "6");
    // Anonymous, or no key: passed through every time.
    for expect in ["7", "8"] {
        let r = seen(post(&edge, STATUSES, "k1", None).send().await.unwrap()).await;
        assert_eq!((r.1.as_str(), r.2.as_str()), (expect, ""));
    }
    for expect in ["9", "10"] {
        let r = seen(
            post(&edge, STATUSES, "", Some("Bearer alice"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.1, expect);
    }
    assert_eq!(up.requests(), 10);
}

#[tokio::test]
async fn a_failed_first_post_is_not_replayed_the_next_goes_through() {
    let up = Up::start(Mode::Fail).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[up.addr],
        "first_byte_timeout = \"1s\"\nbreaker_failures = 100\n",
    )
    .await;
    let alice = Some("Bearer alice");
    // 5xx.
    let r = seen(post(&edge, STATUSES, "k", alice).send().await.unwrap()).await;
    assert_eq!(r.0, 500);
    let r = seen(post(&edge, STATUSES, "k", alice).send().await.unwrap()).await;
    assert_eq!((r.0, r.3.as_str()), (500, "failed 2"), "went to core again");
    // Cut by core: 502, then the next goes through.
    up.set(Mode::Cut);
    let r = post(&edge, STATUSES, "k", alice).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(up.requests(), 3);
    // Timeout: core holds past the first-byte timeout, and the client gets 504; the edge
    // waits on for core's answer (core makes the post all the same), which is kept: the
    // next one is answered with it, not sent.
    up.set(Mode::Answer);
    up.hold();
    let r = post(&edge, STATUSES, "k", alice).send().await.unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(up.requests(), 4);
    up.release();
    let r = seen(post(&edge, STATUSES, "k", alice).send().await.unwrap()).await;
    assert_eq!((r.0, r.1.as_str(), r.2.as_str()), (201, "4", "REPLAY"));
    assert_eq!(up.requests(), 4);
}

#[tokio::test]
async fn duplicates_waiting_on_a_failed_post_go_through_one_at_a_time() {
    let up = Up::start(Mode::Answer).await;
    up.state.fail_upto.store(1, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "breaker_failures = 100\n").await;
    up.hold();
    let first = tokio::spawn(post(&edge, STATUSES, "k", Some("Bearer alice")).send());
    eventually(WAIT, "the first post at core", || up.waiting() == 1).await;
    let dups: Vec<_> = (0..2)
        .map(|_| tokio::spawn(post(&edge, STATUSES, "k", Some("Bearer alice")).send()))
        .collect();
    eventually(WAIT, "the duplicates at the edge", || {
        edge.running.open_connections() >= 3
    })
    .await;
    // The first fails; one duplicate goes to core (the other waits for it) and succeeds.
    up.release();
    assert_eq!(first.await.unwrap().unwrap().status(), 500);
    let mut answers = Vec::new();
    for d in dups {
        answers.push(seen(d.await.unwrap().unwrap()).await);
    }
    answers.sort();
    assert_eq!(up.requests(), 2, "one retry reached core, not both");
    assert_eq!((answers[0].0, answers[0].1.as_str()), (201, "2"));
    assert_eq!(answers[0].1, answers[1].1, "the other got its answer");
    let statuses: Vec<&str> = answers.iter().map(|a| a.2.as_str()).collect();
    assert_eq!(statuses, ["", "REPLAY"]);
}

#[tokio::test]
async fn a_big_answer_is_passed_on_whole_but_not_kept() {
    let up = Up::start(Mode::Big).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;
    for n in ["1", "2"] {
        let r = seen(
            post(&edge, STATUSES, "k", Some("Bearer alice"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((r.0, r.1.as_str(), r.2.as_str()), (200, n, ""));
        assert_eq!(r.3.len(), 300 * 1024);
    }
    assert_eq!(up.requests(), 2);
}

/// Only the same request is replayed: cookies without a Mastodon session (a theme, a
/// locale) are no credentials, so strangers sending the same ones and the same key each
/// reach core; another method, another spelling of the host, the path or the credential
/// each go to core; a first attempt that core refused (4xx) is not replayed; the same
/// `Authorization` with another session cookie is another user.
#[tokio::test]
async fn what_is_not_the_same_request_is_never_replayed() {
    let up = Up::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;
    for expect in ["1", "2"] {
        let r = post(&edge, STATUSES, "k1", None)
            .header("cookie", "theme=dark; locale=en")
            .send()
            .await
            .unwrap();
        let r = seen(r).await;
        assert_eq!(
            (r.1.as_str(), r.2.as_str()),
            (expect, ""),
            "a stranger's replay"
        );
    }

    let alice = Some("Bearer alice");
    let first = seen(post(&edge, STATUSES, "k2", alice).send().await.unwrap()).await;
    assert_eq!(first.1, "3");
    let put = client()
        .put(format!("http://{}{STATUSES}", edge.running.addr))
        .header("host", CORE)
        .header("authorization", "Bearer alice")
        .header("idempotency-key", "k2")
        .body("{}");
    let other_host = client()
        .post(format!("http://{}{STATUSES}", edge.running.addr))
        .header("host", "EXAMPLE.test")
        .header("authorization", "Bearer alice")
        .header("idempotency-key", "k2")
        .body("{}");
    let other_path = post(&edge, "/api/v1/statuses/", "k2", alice);
    let other_scheme = post(&edge, STATUSES, "k2", Some("bearer alice"));
    for (what, r, expect) in [
        ("PUT", put, "4"),
        ("Host", other_host, "5"),
        ("path", other_path, "6"),
        ("scheme", other_scheme, "7"),
    ] {
        let r = seen(r.send().await.unwrap()).await;
        assert_eq!((r.1.as_str(), r.2.as_str()), (expect, ""), "{what}");
    }
    let again = seen(post(&edge, STATUSES, "k2", alice).send().await.unwrap()).await;
    assert_eq!((again.1.as_str(), again.2.as_str()), ("3", "REPLAY"));

    up.set(Mode::Reject);
    let r = seen(post(&edge, STATUSES, "k3", alice).send().await.unwrap()).await;
    assert_eq!((r.0, r.1.as_str()), (422, "8"));
    up.set(Mode::Answer);
    let r = seen(post(&edge, STATUSES, "k3", alice).send().await.unwrap()).await;
    assert_eq!(
        (r.0, r.1.as_str(), r.2.as_str()),
        (201, "9", ""),
        "the 422 not replayed"
    );

    // A token that is no token (a client's "Bearer null"): Mastodon falls back to the
    // session cookie, so two sessions behind the same header are two users.
    let with = |session: &str| {
        post(&edge, STATUSES, "k4", Some("Bearer null"))
            .header("cookie", format!("theme=dark; _mastodon_session={session}"))
    };
    for (session, expect) in [
        ("alice", ("10", "")),
        ("bob", ("11", "")),
        ("alice", ("10", "REPLAY")),
    ] {
        let r = seen(with(session).send().await.unwrap()).await;
        assert_eq!((r.1.as_str(), r.2.as_str()), expect, "{session}");
    }
    assert_eq!(up.requests(), 11);
}

/// Puma's place, as puma behaves: a request that arrived is worked on to its end whether or
/// not the connection it came on is still open (Rails does not abort a controller action
/// when the client leaves). Posts are numbered as they arrive; each waits for the gate.
async fn puma(
    created: Arc<AtomicUsize>,
    gate: tokio::sync::watch::Receiver<bool>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (created, gate) = (created.clone(), gate.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (created, mut gate) = (created.clone(), gate.clone());
                        // The action runs on its own: the connection's end does not stop it.
                        let work = tokio::spawn(async move {
                            let _ = req.into_body().collect().await;
                            let n = created.fetch_add(1, Ordering::SeqCst) + 1;
                            let _ = gate.wait_for(|open| *open).await;
                            n
                        });
                        async move {
                            let n = work.await.unwrap();
                            http::Response::builder()
                                .status(201)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(format!("{{\"id\":\"{n}\"}}"))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A phone posts a status with `Idempotency-Key`; its network drops while core works on it;
/// the app sends the same post again with the same key (the case the header exists for).
/// The first post reached core and core creates it whatever the edge does with its
/// connection: the edge's request goes on without its client, and the retry waits for its
/// answer and gets it. (Until the review of session 7 the edge dropped its claim when the
/// client left, and the retry was posted again.)
#[tokio::test]
async fn a_retry_after_the_first_posts_client_left_is_answered_its_first_answer() {
    let created = Arc::new(AtomicUsize::new(0));
    let gate = tokio::sync::watch::channel(false);
    let core = puma(created.clone(), gate.1.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[core], "").await;
    let post = || {
        client()
            .post(format!("http://{}/api/v1/statuses", edge.running.addr))
            .header("host", CORE)
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "k1")
            .header("content-type", "application/json")
            .body("{\"status\":\"hello\"}")
            .send()
    };
    let first = tokio::spawn(post());
    eventually(WAIT, "the first post at core", || {
        created.load(Ordering::SeqCst) == 1
    })
    .await;
    first.abort();
    eventually(WAIT, "the edge saw its client leave", || {
        edge.running.open_connections() == 0
    })
    .await;
    let retry = tokio::spawn(post());
    // Core finishes what it has (the first post, and the retry if it was sent).
    gate.0.send_replace(true);
    let r = retry.await.unwrap().unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(
        (status, body.as_str(), created.load(Ordering::SeqCst)),
        (201, "{\"id\":\"1\"}", 1),
        "the retry's answer, and the statuses core created"
    );
}

/// The seed's hanging post: core is slow, the client gets 504 at `first_byte_timeout` and the
/// user presses again. Core makes the first post all the same; the edge's leader waits for
/// its answer past the client's timeout and keeps it, so the retry gets it (`REPLAY`)
/// instead of posting a duplicate.
#[tokio::test]
async fn a_retry_after_a_504_gets_the_slow_first_post_not_a_second_one() {
    let created = Arc::new(AtomicUsize::new(0));
    let gate = tokio::sync::watch::channel(false);
    let core = puma(created.clone(), gate.1.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[core], "first_byte_timeout = \"1s\"\n").await;
    let post = || {
        client()
            .post(format!("http://{}/api/v1/statuses", edge.running.addr))
            .header("host", CORE)
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "k504")
            .header("content-type", "application/json")
            .body("{\"status\":\"hello\"}")
            .send()
    };
    let first = post().await.unwrap();
    assert_eq!(
        first.status(),
        504,
        "core did not answer within first_byte_timeout"
    );
    assert_eq!(created.load(Ordering::SeqCst), 1, "core is making the post");
    let retry = tokio::spawn(post());
    gate.0.send_replace(true);
    let r = retry.await.unwrap().unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = r.text().await.unwrap();
    assert_eq!(
        (status, body.as_str(), cache.as_deref()),
        (201, "{\"id\":\"1\"}", Some("REPLAY")),
        "the retry's answer"
    );
    assert_eq!(created.load(Ordering::SeqCst), 1, "one status, not two");
}

/// A duplicate that waits for the first post stops with its client: once its client has
/// its 504, it never goes to core later (when the first one fails), where its client can no
/// longer know of it.
#[tokio::test]
async fn a_waiting_duplicate_whose_client_got_504_never_posts_later() {
    let up = Up::start(Mode::Fail).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "first_byte_timeout = \"1s\"\nbreaker_failures = 100\n";
    let edge = edge_with_core(dir.path(), &[up.addr], extra).await;
    let alice = Some("Bearer alice");
    up.hold();
    let first = post(&edge, STATUSES, "k", alice).send().await.unwrap();
    assert_eq!(first.status(), 504, "core holds the first one");
    let waiting = post(&edge, STATUSES, "k", alice).send().await.unwrap();
    assert_eq!(
        waiting.status(),
        504,
        "the duplicate waited for it, then its client gave up"
    );
    assert_eq!(up.requests(), 1);
    // Core answers the first one: 500, a failure, nothing kept.
    up.release();
    let next = seen(post(&edge, STATUSES, "k", alice).send().await.unwrap()).await;
    assert_eq!(next.0, 500);
    // The first, and this one; not the duplicate whose client was answered.
    assert_eq!(up.requests(), 2);
}

/// A leader whose client left is one of the edge's fetches: a shutdown waits for it (up to
/// `drain_timeout`) instead of cutting a post whose answer the retry needs.
#[tokio::test]
async fn a_leader_whose_client_left_is_waited_for_as_a_fetch() {
    let created = Arc::new(AtomicUsize::new(0));
    let gate = tokio::sync::watch::channel(false);
    let core = puma(created.clone(), gate.1.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[core], "").await;
    let before = edge.running.fetches_under_way();
    let first = tokio::spawn(
        client()
            .post(format!("http://{}/api/v1/statuses", edge.running.addr))
            .header("host", CORE)
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "kdrain")
            .body("{\"status\":\"hello\"}")
            .send(),
    );
    eventually(WAIT, "the post at core", || {
        created.load(Ordering::SeqCst) == 1
    })
    .await;
    first.abort();
    eventually(WAIT, "the client gone", || {
        edge.running.open_connections() == 0
    })
    .await;
    assert_eq!(
        edge.running.fetches_under_way(),
        before + 1,
        "the leader, tracked"
    );
    gate.0.send_replace(true);
    eventually(WAIT, "the leader done", || {
        edge.running.fetches_under_way() == before
    })
    .await;
}
