//! The core cache under attack (issue 9 §3): requests that try to make it store an answer
//! that others then get (cache poisoning), or to keep serving what core no longer lets be
//! shared. Against the scripted core of `corecache.rs`; requests the HTTP client would
//! normalise (dot segments, absolute-form, repeated `Host`) are written by hand.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::common::{eventually, TestEdge};
use crate::corecache::{edge, fetch, hs, reply, Core, Reply};
use crate::proxy::{CORE, WAIT};

/// Entries the core cache holds.
fn stored(edge: &TestEdge) -> usize {
    edge.running.core_cache.as_ref().unwrap().usage().1
}

/// One request written as is (`head`: request line and headers, without the blank line);
/// `(status, X-Cache-Status, body)`.
async fn raw(edge: &TestEdge, head: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    let req = format!("{head}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().unwrap_or(body.len());
    // (A HEAD has its length announced, no body.)
    let len = len.min(body.len());
    (status, header("x-cache-status"), body[..len].to_owned())
}

/// Core builds its links from what Rails reads for the request's URL: `Host`, or
/// `X-Forwarded-Host`, `-Port`, `-Scheme`, `-Ssl`, `Forwarded`. A request setting one of
/// those is answered for itself and never stored or shared; one whose `X-Forwarded-Host` is
/// its own `Host` (a proxy in front) is cached as usual.
#[tokio::test]
async fn forwarding_headers_that_change_core_s_url_never_poison_the_entry() {
    let (open, gate) = watch::channel(false);
    let core = Core::start(move |s, _| {
        let forwarded: Vec<String> = [
            "x-forwarded-host",
            "x-forwarded-port",
            "x-forwarded-scheme",
            "x-forwarded-ssl",
            "forwarded",
        ]
        .iter()
        // (A proxy's `X-Forwarded-Host` equal to `Host` changes nothing.)
        .filter(|h| !hs(s, h).is_empty() && hs(s, h) != hs(s, "host"))
        .map(|h| format!("{h}={}", hs(s, h)))
        .collect();
        let body = match forwarded.is_empty() {
            true => format!("links to https://{}", hs(s, "host")),
            false => format!("links per {}", forwarded.join(" ")),
        };
        let r = reply(200, &[("cache-control", "public, max-age=600")], &body);
        match s.path.as_str() {
            "/held" if !forwarded.is_empty() => Reply {
                gate: Some(gate.clone()),
                ..r
            },
            _ => r,
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Arc::new(edge(dir.path(), &core, "").await);
    let clean = format!("links to https://{CORE}");
    let attacks = [
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-port", "6666"),
        ("x-forwarded-scheme", "http"),
        ("x-forwarded-ssl", "on"),
        ("forwarded", "host=evil.example;proto=http"),
    ];
    for (i, attack) in attacks.iter().enumerate() {
        let p = format!("/about/{i}");
        let (st, cache, body) = fetch(&edge, &p, &[*attack]).await;
        assert_eq!((st, cache.as_str()), (200, "BYPASS"), "{attack:?}");
        assert!(body.starts_with("links per"), "{attack:?}: {body}");
        let (_, cache, body) = fetch(&edge, &p, &[]).await;
        assert_eq!(
            (cache.as_str(), body.as_str()),
            ("MISS", clean.as_str()),
            "{attack:?}"
        );
        let (_, cache, body) = fetch(&edge, &p, &[]).await;
        assert_eq!(
            (cache.as_str(), body.as_str()),
            ("HIT", clean.as_str()),
            "{attack:?}"
        );
        assert_eq!(core.count(&p), 2, "{attack:?}");
    }

    // Nor is such an answer handed to a request for the same URL that comes while core
    // prepares it: that one goes to core itself.
    let e = edge.clone();
    let attacker =
        tokio::spawn(
            async move { fetch(&e, "/held", &[("x-forwarded-host", "evil.example")]).await },
        );
    eventually(WAIT, "the attacker's request reached core", || {
        core.count("/held") == 1
    })
    .await;
    let (_, cache, body) = fetch(&edge, "/held", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", clean.as_str()));
    open.send(true).unwrap();
    let (_, cache, body) = attacker.await.unwrap();
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("BYPASS", "links per x-forwarded-host=evil.example")
    );

    // Rack reads the last of several X-Forwarded-Host fields: the proxy's own name first
    // does not make the attacker's second one harmless.
    let (_, cache, body) = raw(
        &edge,
        &format!(
            "GET /twice HTTP/1.1\r\nhost: {CORE}\r\nx-forwarded-host: {CORE}\r\nx-forwarded-host: evil.example"
        ),
    )
    .await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("BYPASS", "links per x-forwarded-host=evil.example")
    );
    let (_, cache, body) = fetch(&edge, "/twice", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", clean.as_str()));

    // A proxy in front that names the same host is no attacker.
    let same = [("x-forwarded-host", CORE)];
    let (_, cache, _) = fetch(&edge, "/same", &same).await;
    assert_eq!(cache, "MISS");
    eventually(WAIT, "stored", || stored(&edge) == attacks.len() + 3).await;
    let (_, cache, body) = fetch(&edge, "/same", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("HIT", clean.as_str()));
}

/// The key is the host without case or port, but core answers for the `Host` it is sent: a
/// variant of the host, a second `Host` field or an absolute-form target never gets its
/// answer to the clients of the plain name.
#[tokio::test]
async fn host_spellings_repeated_hosts_and_absolute_form_never_poison_the_entry() {
    let core = Core::start(|s, _| {
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("for host {} at {}", hs(s, "host"), s.path),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let plain = |p: &str| format!("for host {CORE} at {p}");

    for (i, spelling) in ["EXAMPLE.test:6666", "example.test.", "Example.Test"]
        .iter()
        .enumerate()
    {
        let p = format!("/explore/{i}");
        let (_, _, body) = raw(&edge, &format!("GET {p} HTTP/1.1\r\nhost: {spelling}")).await;
        assert_eq!(body, format!("for host {spelling} at {p}"));
        let (_, cache, body) = fetch(&edge, &p, &[]).await;
        assert_eq!((cache.as_str(), body), ("MISS", plain(&p)), "{spelling}");
        let (_, cache, body) = fetch(&edge, &p, &[]).await;
        assert_eq!((cache.as_str(), body), ("HIT", plain(&p)), "{spelling}");
    }

    // Two Host fields: core may read the second (this one does); never stored.
    let (_, cache, body) = raw(
        &edge,
        &format!("GET /twice HTTP/1.1\r\nhost: {CORE}\r\nhost: evil.example"),
    )
    .await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("BYPASS", "for host evil.example at /twice")
    );
    let (_, cache, body) = fetch(&edge, "/twice", &[]).await;
    assert_eq!((cache.as_str(), body), ("MISS", plain("/twice")));

    // Absolute-form: core is sent the path and the `Host` the key has, so the answer stored
    // is the one every client of that key would get.
    let (st, _, body) = raw(
        &edge,
        &format!("GET http://evil.example/abs HTTP/1.1\r\nhost: {CORE}"),
    )
    .await;
    assert_eq!((st, body), (200, plain("/abs")));
    assert_eq!(core.last("/abs").path, "/abs", "origin-form to core");
    let (_, cache, body) = fetch(&edge, "/abs", &[]).await;
    assert_eq!((cache.as_str(), body), ("HIT", plain("/abs")));
    // The other way round: the Host names no instance, nothing reaches core.
    let (st, _, _) = raw(
        &edge,
        &format!("GET http://{CORE}/abs2 HTTP/1.1\r\nhost: evil.example"),
    )
    .await;
    assert_ne!(st, 200);
    assert_eq!(core.count("/abs2"), 0);
}

/// The key is the path and query as sent, and core is sent the same: spellings that a
/// server may read as one URL (`//`, `%2F`, dot segments, another query order, case) are
/// entries of their own, each holding core's answer to exactly that spelling.
#[tokio::test]
async fn path_and_query_spellings_are_entries_of_their_own() {
    let core = Core::start(|s, _| {
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("core saw {}", s.path),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let spellings = [
        "/tags/rust",
        "/tags//rust",
        "/tags/%2Frust",
        "/tags/./rust",
        "/tags/x/../rust",
        "/TAGS/rust",
        "/tags/rust?a=1&b=2",
        "/tags/rust?b=2&a=1",
        "/tags/rust?",
    ];
    for round in ["MISS", "HIT"] {
        for p in spellings {
            let (_, cache, body) = raw(&edge, &format!("GET {p} HTTP/1.1\r\nhost: {CORE}")).await;
            assert_eq!(
                (cache.as_str(), body),
                (round, format!("core saw {p}")),
                "{p}"
            );
        }
        if round == "MISS" {
            eventually(WAIT, "all stored", || stored(&edge) == spellings.len()).await;
        }
    }
    for p in spellings {
        assert_eq!(core.count(p), 1, "{p}");
    }
}

/// `Vary` picks the variant by the first field of a header (the policy crate compares
/// one value), but core reads every field: a request with the usual `Accept` first and
/// another after is never stored for the clients sending the usual one. `Vary` names are
/// matched whatever their case and spacing.
#[tokio::test]
async fn several_fields_of_a_selecting_header_never_poison_the_variant() {
    let core = Core::start(|s, _| {
        // As Rails reads repeated fields: joined, the last type deciding here.
        let json = hs(s, "accept").contains("activity+json");
        let body = match json {
            true => "{\"type\":\"Person\"}".to_owned(),
            false => format!("<html>{}</html>", hs(s, "accept-language")),
        };
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("vary", " ACCEPT ,accept-Language "),
            ],
            &body,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let (_, cache, body) = raw(
        &edge,
        &format!(
            "GET /@alice HTTP/1.1\r\nhost: {CORE}\r\naccept: text/html\r\naccept: application/activity+json"
        ),
    )
    .await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("MISS", "{\"type\":\"Person\"}")
    );
    let html = [("accept", "text/html")];
    let (_, cache, body) = fetch(&edge, "/@alice", &html).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", "<html></html>"));
    eventually(WAIT, "the plain variant stored, alone", || {
        stored(&edge) == 1
    })
    .await;
    let (_, cache, body) = fetch(&edge, "/@alice", &html).await;
    assert_eq!((cache.as_str(), body.as_str()), ("HIT", "<html></html>"));
    // Another language is another variant.
    let fr = [("accept", "text/html"), ("accept-language", "fr")];
    let (_, cache, body) = fetch(&edge, "/@alice", &fr).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", "<html>fr</html>"));
    eventually(WAIT, "both variants stored", || stored(&edge) == 2).await;
    let (_, cache, body) = fetch(&edge, "/@alice", &html).await;
    assert_eq!((cache.as_str(), body.as_str()), ("HIT", "<html></html>"));
}

/// A request repeating a selecting header is not stored (above), but when it revalidates
/// the stored variant it matched (on the first field) and core answers 304, the entry is
/// updated and stays: such a request cannot take a shared entry out.
#[tokio::test]
async fn a_304_to_a_request_repeating_a_selecting_header_keeps_the_entry() {
    let core = Core::start(|s, n| {
        let cc = ("cache-control", "public, max-age=0");
        let h = [cc, ("vary", "Accept"), ("etag", "\"e1\"")];
        let version = format!("{n}");
        match hs(s, "if-none-match").contains("\"e1\"") {
            true => reply(304, &[h[0], h[1], h[2], ("x-version", &version)], ""),
            false => reply(200, &[h[0], h[1], h[2], ("x-version", &version)], "<html>"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let html = [("accept", "text/html")];
    assert_eq!(fetch(&edge, "/@bob", &html).await.1, "MISS");
    eventually(WAIT, "stored", || stored(&edge) == 1).await;
    let (st, cache, body) = raw(
        &edge,
        &format!(
            "GET /@bob HTTP/1.1\r\nhost: {CORE}\r\naccept: text/html\r\naccept: application/activity+json"
        ),
    )
    .await;
    assert_eq!(
        (st, cache.as_str(), body.as_str()),
        (200, "REVALIDATED", "<html>")
    );
    assert_eq!(core.count("/@bob"), 2);
    assert_eq!(stored(&edge), 1, "the entry stays");
    let r = crate::proxy::get(&edge, CORE, "/@bob")
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.headers()["x-version"], "3", "updated by each 304");
}

/// A 304 whose headers make the stored response private (or `no-store`) takes the entry
/// out: it is not served again under `stale-if-error` or `stale-while-revalidate`.
#[tokio::test]
async fn a_304_that_makes_the_entry_private_takes_it_out() {
    let core = Core::start(|s, n| {
        let revalidating = hs(s, "if-none-match").contains("\"e1\"");
        match (s.path.as_str(), n) {
            // Stored, stale at once, may be served stale.
            (_, 1) => reply(
                200,
                &[
                    (
                        "cache-control",
                        "public, max-age=0, stale-if-error=3600, stale-while-revalidate=3600",
                    ),
                    ("etag", "\"e1\""),
                ],
                "was public",
            ),
            (_, 2) if revalidating => reply(
                304,
                &[("etag", "\"e1\""), ("cache-control", "private, no-store")],
                "",
            ),
            ("/sie", _) => reply(500, &[], "core failed"),
            _ => reply(200, &[("cache-control", "private")], "now private"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;

    // Revalidated by a client (no stale-while-revalidate: the request says no-cache).
    let no_cache = [("cache-control", "no-cache")];
    assert_eq!(fetch(&edge, "/sie", &[]).await.1, "MISS");
    eventually(WAIT, "stored", || stored(&edge) == 1).await;
    let r = crate::proxy::get(&edge, CORE, "/sie")
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.headers()["cache-control"], "private, no-store");
    assert_eq!(
        r.text().await.unwrap(),
        "was public",
        "its requester's answer"
    );
    eventually(WAIT, "the entry is out", || stored(&edge) == 0).await;
    let (st, cache, body) = fetch(&edge, "/sie", &no_cache).await;
    assert_eq!(
        (st, cache.as_str(), body.as_str()),
        (500, "MISS", "core failed"),
        "not served stale once private"
    );

    // Revalidated in the background (served stale meanwhile): the entry goes too.
    assert_eq!(fetch(&edge, "/swr", &[]).await.1, "MISS");
    eventually(WAIT, "stored", || stored(&edge) == 1).await;
    let (_, cache, body) = fetch(&edge, "/swr", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("STALE", "was public"));
    eventually(WAIT, "the background 304 took the entry out", || {
        stored(&edge) == 0
    })
    .await;
    let (_, cache, body) = fetch(&edge, "/swr", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", "now private"));
}

/// A full answer saying `private` or `no-store` (a post deleted: Mastodon's 404 is
/// `private, no-store`) takes out what was stored for that request: it is not served
/// later under `stale-if-error`. A 5xx takes nothing out (that is what stale-if-error is
/// for), nor does an answer to another requester.
#[tokio::test]
async fn an_answer_core_no_longer_lets_be_shared_takes_the_stored_one_out() {
    let core = Core::start(|s, n| {
        let public = || {
            reply(
                200,
                &[("cache-control", "public, max-age=0, stale-if-error=86400")],
                "a post",
            )
        };
        match (hs(s, "authorization").is_empty(), n) {
            (_, 1) => public(),
            // A requester with a token sees it private: that says nothing of the entry.
            (false, _) => reply(200, &[("cache-control", "private, no-store")], "mine"),
            (true, 3) => reply(503, &[("cache-control", "no-store")], "busy"),
            (true, 4) => reply(404, &[("cache-control", "private, no-store")], "gone"),
            _ => reply(500, &[], "core failed"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let p = "/@alice/1";
    assert_eq!(fetch(&edge, p, &[]).await.1, "MISS");
    eventually(WAIT, "stored", || stored(&edge) == 1).await;
    let (_, cache, body) = fetch(&edge, p, &[("authorization", "Bearer bob")]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("BYPASS", "mine"));
    let (_, cache, body) = fetch(&edge, p, &[]).await;
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("STALE", "a post"),
        "a 503"
    );
    assert_eq!(stored(&edge), 1);
    let (st, cache, body) = fetch(&edge, p, &[]).await;
    assert_eq!((st, cache.as_str(), body.as_str()), (404, "MISS", "gone"));
    assert_eq!(stored(&edge), 0, "taken out with the 404");
    let (st, cache, _) = fetch(&edge, p, &[]).await;
    assert_eq!(
        (st, cache.as_str()),
        (500, "MISS"),
        "the deleted post is not served stale"
    );
}

/// A HEAD is never stored (its answer has no body), a `Range` request's answer neither (a
/// part), whatever core answers; a stored whole answer serves both.
#[tokio::test]
async fn head_and_range_requests_never_store_an_empty_or_partial_body() {
    let core = Core::start(|s, _| {
        let cc = ("cache-control", "public, max-age=600");
        match (s.path.as_str(), hs(s, "range")) {
            ("/ranged", "bytes=0-3") => {
                reply(206, &[cc, ("content-range", "bytes 0-3/10")], "0123")
            }
            // Core ignoring Range: the whole body, to a Range request.
            _ => reply(200, &[cc], "0123456789"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let r = crate::common::client()
        .head(format!("http://{}/head-first", edge.running.addr))
        .header("host", CORE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.headers()["content-length"], "10");
    let (_, cache, body) = fetch(&edge, "/head-first", &[]).await;
    assert_eq!((cache.as_str(), body.as_str()), ("MISS", "0123456789"));
    assert_eq!(core.last("/head-first").method, "GET");

    for p in ["/ranged", "/ignored"] {
        let (st, cache, body) = fetch(&edge, p, &[("range", "bytes=0-3")]).await;
        let want = match p {
            "/ranged" => (206, "0123"),
            _ => (200, "0123456789"),
        };
        assert_eq!((st, body.as_str()), want, "{p}");
        assert_eq!(cache, "BYPASS", "{p}");
        let (st, cache, body) = fetch(&edge, p, &[]).await;
        assert_eq!(
            (st, cache.as_str(), body.as_str()),
            (200, "MISS", "0123456789"),
            "{p}"
        );
    }
    eventually(WAIT, "the whole answers stored", || stored(&edge) == 3).await;
    let (st, cache, body) = fetch(&edge, "/ranged", &[("range", "bytes=2-4")]).await;
    assert_eq!((st, cache.as_str(), body.as_str()), (206, "HIT", "234"));
}

/// Credentials beyond the usual ones: other `Authorization` schemes, `remember_user_token`,
/// a session cookie in a second `Cookie` field, and an OAuth token in the query (Doorkeeper
/// takes `access_token` and `bearer_token` as `Authorization`): none is answered from or
/// leaves a shared entry; a URL with a token is never written to disk, even when public.
#[tokio::test]
async fn every_way_of_sending_credentials_is_private() {
    let core = Core::start(|s, _| {
        let who = [hs(s, "authorization"), hs(s, "cookie")]
            .into_iter()
            .find(|v| !v.is_empty())
            .unwrap_or(s.path.as_str())
            .to_owned();
        let cc = match s.path.contains("token") {
            true => "public, max-age=600",
            false => "max-age=600",
        };
        reply(200, &[("cache-control", cc)], &format!("for {who}"))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let p = "/api/v1/notifications";
    assert_eq!(fetch(&edge, p, &[]).await.1, "MISS");
    eventually(WAIT, "the anonymous answer stored", || stored(&edge) == 1).await;
    for creds in [
        ("authorization", "Basic YWxpY2U6cGFzcw=="),
        ("authorization", "Signature keyId=\"k\""),
        ("authorization", "x"),
        ("cookie", "remember_user_token=alice"),
    ] {
        let (_, cache, body) = fetch(&edge, p, &[creds]).await;
        assert_eq!(
            (cache.as_str(), body),
            ("BYPASS", format!("for {}", creds.1)),
            "{creds:?}"
        );
    }
    // The session in a second Cookie field (as HTTP/2 clients send cookies).
    let (_, cache, body) = raw(
        &edge,
        &format!("GET {p} HTTP/1.1\r\nhost: {CORE}\r\ncookie: theme=dark\r\ncookie: _mastodon_session=carol"),
    )
    .await;
    assert_eq!(cache, "BYPASS");
    assert!(body.contains("_mastodon_session=carol"), "{body}");
    let (_, cache, body) = fetch(&edge, p, &[]).await;
    assert_eq!((cache.as_str(), body), ("HIT", format!("for {p}")));

    for q in [
        "/api/v1/timelines/home?access_token=tok-alice",
        "/api/v1/timelines/home?limit=5&bearer_token=tok-bob",
        "/api/v1/timelines/home?access%5Ftoken=tok-carol",
        // Rack 2 splits on `;` too; `access_token[]` is the same parameter.
        "/api/v1/timelines/home?limit=5;access_token=tok-dave",
        "/api/v1/timelines/home?access_token%5B%5D=tok-erin",
    ] {
        for _ in 0..2 {
            let (_, cache, body) = raw(&edge, &format!("GET {q} HTTP/1.1\r\nhost: {CORE}")).await;
            assert_eq!(
                (cache.as_str(), body),
                ("BYPASS", format!("for {q}")),
                "{q}"
            );
        }
        assert_eq!(core.count(q), 2, "{q}");
    }
    assert_eq!(stored(&edge), 1);
    let mut on_disk = String::new();
    for e in walkdir::WalkDir::new(dir.path().join("core-cache"))
        .into_iter()
        .flatten()
    {
        if e.file_type().is_file() {
            on_disk.push_str(&String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()));
        }
    }
    assert!(!on_disk.contains("tok-"), "a token was written to disk");
}

/// The cache buster evicts the URL it names on the host it names, nothing else: not the
/// same path on another host, not another query spelling, not a path a dot segment would
/// reach; the host's case and port do not matter (as for the key). A wrong secret, or the
/// secret with another method, evicts nothing.
#[tokio::test]
async fn a_purge_evicts_only_its_own_host_and_url() {
    let dir = tempfile::tempdir().unwrap();
    let (_core, edge) = crate::corecache::buster_edge(dir.path()).await;
    let urls = ["/emoji.png", "/emoji.png?v=1", "/x/emoji.png"];
    for p in urls {
        assert_eq!(fetch(&edge, p, &[]).await.1, "MISS");
    }
    eventually(WAIT, "stored", || stored(&edge) == urls.len()).await;
    let purge = |host: &str, target: &str, method: &str, secret: &str| {
        format!("{method} {target} HTTP/1.1\r\nhost: {host}\r\nx-purge-secret: {secret}")
    };
    for (what, req, status) in [
        // A host this edge does not serve is misdirected before the buster sees it.
        (
            "another host",
            purge("other.test", "/emoji.png", "GET", "s3cret"),
            421,
        ),
        (
            "a dot segment",
            purge(CORE, "/x/../emoji.png", "GET", "s3cret"),
            200,
        ),
        (
            "an encoded one",
            purge(CORE, "/x/%2e%2e/emoji.png", "GET", "s3cret"),
            200,
        ),
        (
            "a wrong secret",
            purge(CORE, "/emoji.png", "GET", "s3cret!"),
            403,
        ),
        ("a prefix", purge(CORE, "/emoji.pn", "GET", "s3cret"), 200),
    ] {
        let (st, _, body) = raw(&edge, &req).await;
        assert_eq!(st, status, "{what}");
        if st == 200 {
            assert_eq!(body, "purged 0\n", "{what}");
        }
        for p in urls {
            assert_eq!(fetch(&edge, p, &[]).await.1, "HIT", "{what} evicted {p}");
        }
    }
    // The secret on a method that is not the buster's: an ordinary request.
    let (_, cache, _) = raw(&edge, &purge(CORE, "/emoji.png", "HEAD", "s3cret")).await;
    assert_eq!(cache, "HIT");
    let (st, _, body) = raw(
        &edge,
        &purge("EXAMPLE.test:443", "/emoji.png?v=1", "GET", "s3cret"),
    )
    .await;
    assert_eq!((st, body.as_str()), (200, "purged 1\n"));
    assert_eq!(fetch(&edge, "/emoji.png?v=1", &[]).await.1, "MISS");
    assert_eq!(fetch(&edge, "/emoji.png", &[]).await.1, "HIT");
    assert_eq!(fetch(&edge, "/x/emoji.png", &[]).await.1, "HIT");
}
