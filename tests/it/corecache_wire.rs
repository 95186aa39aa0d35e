//! The core cache's answers on the wire, against a scripted core (`corecache::Core`) and
//! real clients (reqwest over HTTP/1.1 and, through the `[tls]` listener, HTTP/2), where the
//! review of session 7 found them wrong: a HEAD given a body, 304s refreshing an old body,
//! variants without bound, headers named in `Connection`, Range on HEAD. Each doc says
//! what was wrong.

use crate::corecache::{cache_conf, reply, Core};
use crate::proxy::{edge_with_core, CORE};

/// A HEAD for a stale stored entry is revalidated with a GET (the policy's stored
/// method); when core answers that GET with a new 200, the GET's body must not go to the
/// HEAD's client. hyper's HTTP/1.1 server drops a HEAD's body itself, its HTTP/2 server
/// did not: the DATA frames reached the client, whose h2 reset the stream
/// (PROTOCOL_ERROR, RFC 9113 §8.1.1).
#[tokio::test]
async fn head_of_a_stale_entry_answered_by_a_new_200_has_no_body_over_h2() {
    let core = Core::start(|s, n| {
        let body = format!("version {n} of the answer, as bytes: {}", "x".repeat(4000));
        let _ = s;
        reply(
            200,
            &[
                ("cache-control", "max-age=0"),
                ("content-type", "application/octet-stream"),
                ("etag", &format!("\"v{n}\"")),
            ],
            &body,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), &[CORE]);
    let conf = cache_conf(dir.path(), "16MiB", &table);
    let edge = edge_with_core(dir.path(), &[core.addr()], &conf).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let url = format!("https://{CORE}:{}/api/v1/instance", addr.port());

    // Stored (stale at once: max-age=0).
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    crate::common::eventually(crate::proxy::WAIT, "the answer is stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;

    // HEAD: revalidated with core's stored GET, which answers a new 200.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(core.count("/api/v1/instance"), 2);
    assert_eq!(core.last("/api/v1/instance").method, "GET");
    let body = r.bytes().await;
    assert!(
        matches!(&body, Ok(b) if b.is_empty()),
        "a HEAD's answer has no body: {body:?}"
    );
}

/// A stale entry revalidated for a client that sent its own, newer `If-Modified-Since`:
/// the revalidation carried it (merged by the crate), core's 304 was about the client's
/// copy, and the old body was refreshed and served as fresh to everyone after. Now only the
/// stored validators are sent: core answers the new body, stored and served.
#[tokio::test]
async fn a_304_for_the_clients_newer_date_does_not_refresh_the_old_body() {
    const T1: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
    const T2: &str = "Tue, 02 Jan 2024 00:00:00 GMT";
    let core = Core::start(|s, n| {
        if n == 1 {
            return reply(
                200,
                &[("cache-control", "max-age=0"), ("last-modified", T1)],
                "old",
            );
        }
        let fresh = [("cache-control", "max-age=600"), ("last-modified", T2)];
        match s.headers.get("if-modified-since").map(String::as_str) {
            Some(T2) => reply(304, &fresh, ""),
            _ => reply(200, &fresh, "new"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/@alice/1";
    let (st, _, body) = crate::corecache::fetch(&edge, p, &[]).await;
    assert_eq!((st, body.as_str()), (200, "old"));
    crate::common::eventually(crate::proxy::WAIT, "the answer is stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    // A browser that has the newer copy (from before this edge, or another one) asks.
    // Revalidated with the stored date only: core's new 200 is stored, and this client gets
    // it whole (a 200 always answers a conditional request).
    let (st, _, body) = crate::corecache::fetch(&edge, p, &[("if-modified-since", T2)]).await;
    assert_eq!((st, body.as_str()), (200, "new"));
    let (st, cache, body) = crate::corecache::fetch(&edge, p, &[]).await;
    assert_eq!(
        (st, body.as_str()),
        (200, "new"),
        "an anonymous client after it (X-Cache-Status {cache})"
    );
}

/// `stale-while-revalidate`: the background revalidation is made from the request of the
/// client that found the entry stale, and `http-cache-semantics` merges that client's own
/// `If-None-Match` with the stored `ETag`. A client holding the newer version (`"v2"`)
/// made core answer 304 for *its* tag, taken as "the stored entry is current": the old
/// body was refreshed and served as a fresh HIT to everyone. Now the client's validators
/// are never sent with a revalidation.
#[tokio::test]
async fn a_background_304_for_the_clients_own_etag_does_not_refresh_the_old_body() {
    let core = Core::start(|s, n| {
        let swr = "max-age=0, stale-while-revalidate=3600";
        if n == 1 {
            return reply(200, &[("cache-control", swr), ("etag", "\"v1\"")], "old");
        }
        let inm = s.headers.get("if-none-match").cloned().unwrap_or_default();
        let head = [("cache-control", "max-age=600"), ("etag", "\"v2\"")];
        match inm.contains("\"v2\"") {
            true => reply(304, &head, ""),
            false => reply(200, &head, "new"),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/@alice/2";
    let (st, _, body) = crate::corecache::fetch(&edge, p, &[]).await;
    assert_eq!((st, body.as_str()), (200, "old"));
    crate::common::eventually(crate::proxy::WAIT, "the answer is stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    // A client that has v2 already: served the stale v1 (its tag is not v1), and a
    // background revalidation goes.
    let (st, cache, _) = crate::corecache::fetch(&edge, p, &[("if-none-match", "\"v2\"")]).await;
    assert_eq!((st, cache.as_str()), (200, "STALE"));
    crate::common::eventually(crate::proxy::WAIT, "the background revalidation", || {
        core.count(p) == 2
    })
    .await;
    let deadline = std::time::Instant::now() + crate::proxy::WAIT;
    loop {
        let (_, cache, body) = crate::corecache::fetch(&edge, p, &[]).await;
        assert!(
            !(cache == "HIT" && body == "old"),
            "the old body served as a fresh hit after core's 304 for the client's own v2"
        );
        if body == "new" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "v2 never came: {cache} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Mastodon's public pages say `Vary: Accept, Accept-Language` (and its API `Vary:
/// Origin`): headers every browser or client sets as it likes. Each new value stored one
/// more variant of the URL, without limit, and every request for the URL walks the
/// variants: anyone could make a hot page's hits cost thousands of policy checks. Now at
/// most `MAX_VARIANTS` (Fastly bounds at 200 per object; nginx keeps one).
#[tokio::test]
async fn the_variants_of_one_url_are_bounded() {
    let core = Core::start(|_, _| {
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("vary", "Accept, Accept-Language"),
                ("content-type", "text/html"),
            ],
            "a status page",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/@alice/3";
    for i in 0..300 {
        let lang = format!("x-{i},en;q=0.5");
        let (st, _, _) = crate::corecache::fetch(&edge, p, &[("accept-language", &lang)]).await;
        assert_eq!(st, 200);
    }
    // A bound holds at every moment: read once, as the last answer came.
    let cache = edge.running.core_cache.as_ref().unwrap();
    let stored = cache.usage().1;
    assert!(
        stored <= fediedge::corecache::MAX_VARIANTS,
        "{stored} variants of {p} stored"
    );
    // The newest are kept, and answer (once the last answer's store is done: polled).
    let deadline = std::time::Instant::now() + crate::proxy::WAIT;
    loop {
        let lang = [("accept-language", "x-299,en;q=0.5")];
        let (_, status, _) = crate::corecache::fetch(&edge, p, &lang).await;
        if status == "HIT" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the newest variant never hit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(core.count(p) <= 302, "{} requests to core", core.count(p));
}

/// A client's `Connection` header names headers the proxy then removes before core sees
/// the request (RFC 9110 §7.6.1). The core cache judged and keyed the request on the
/// client's headers, before that removal: `Accept: application/activity+json` with
/// `Connection: accept` reached core without `Accept`, core answered its HTML, and the HTML
/// was stored as the `activity+json` variant (cache poisoning with one request). Now the
/// front door removes them before anything reads the request.
#[tokio::test]
async fn a_header_named_in_connection_cannot_poison_a_variant() {
    let core = Core::start(|s, _| {
        let json = s
            .headers
            .get("accept")
            .is_some_and(|a| a.contains("activity+json"));
        let (ct, body) = match json {
            true => ("application/activity+json", "{\"type\":\"Note\"}"),
            false => ("text/html", "<html>a status</html>"),
        };
        reply(
            200,
            &[
                ("cache-control", "public, max-age=180"),
                ("vary", "Accept"),
                ("content-type", ct),
            ],
            body,
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/users/alice/statuses/1";

    // The attacker's one request, on a raw connection.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(edge.running.addr)
            .await
            .unwrap();
        let req = format!(
            "GET {p} HTTP/1.1\r\nHost: {CORE}\r\nAccept: application/activity+json\r\nConnection: close, accept\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
    }
    crate::common::eventually(
        crate::proxy::WAIT,
        "the attacker's answer is stored",
        || edge.running.core_cache.as_ref().unwrap().usage().1 == 1,
    )
    .await;

    // A fediverse server fetches the status.
    let (st, cache, body) =
        crate::corecache::fetch(&edge, p, &[("accept", "application/activity+json")]).await;
    assert_eq!(
        (st, body.as_str()),
        (200, "{\"type\":\"Note\"}"),
        "what a server asking for activity+json gets (X-Cache-Status {cache})"
    );
}

/// The same with `Connection: host`: the proxy removed `Host`, then gave core the
/// upstream's address as `Host`, so core built its links for `127.0.0.1:<port>`, stored
/// under the instance's name for everyone. `Host` is never removed by a `Connection` now.
#[tokio::test]
async fn connection_host_cannot_poison_the_entry_with_core_own_address() {
    let core = Core::start(|s, _| {
        let host = s.headers.get("host").cloned().unwrap_or_default();
        reply(
            200,
            &[
                ("cache-control", "public, max-age=180"),
                ("content-type", "text/html"),
            ],
            &format!("<a href=\"https://{host}/about\">about</a>"),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/about";
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(edge.running.addr)
            .await
            .unwrap();
        let req = format!("GET {p} HTTP/1.1\r\nHost: {CORE}\r\nConnection: close, host\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
    }
    crate::common::eventually(
        crate::proxy::WAIT,
        "the attacker's answer is stored",
        || edge.running.core_cache.as_ref().unwrap().usage().1 == 1,
    )
    .await;
    let (_, cache, body) = crate::corecache::fetch(&edge, p, &[]).await;
    assert_eq!(
        body,
        format!("<a href=\"https://{CORE}/about\">about</a>"),
        "what the next visitor gets (X-Cache-Status {cache})"
    );
}

/// RFC 9110 §14.2: range handling is defined for GET only, and a server MUST ignore
/// `Range` on other methods. A HEAD with `Range` for a stored answer got 206 (with the
/// range's `Content-Range` and `Content-Length`): a HEAD that probes a length (link
/// checkers, `curl -I -r`) read the range's length.
#[tokio::test]
async fn head_with_range_is_answered_200_from_the_cache() {
    let core = Core::start(|_, _| {
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("content-type", "application/octet-stream"),
            ],
            &"x".repeat(100),
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = crate::corecache::edge(dir.path(), &core, "").await;
    let p = "/api/v1/instance";
    let (st, _, _) = crate::corecache::fetch(&edge, p, &[]).await;
    assert_eq!(st, 200);
    crate::common::eventually(crate::proxy::WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    let r = crate::common::client()
        .head(format!("http://{}{p}", edge.running.addr))
        .header("host", CORE)
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    let length = r
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        (r.status().as_u16(), length.as_deref()),
        (200, Some("100")),
        "a HEAD with Range: status, Content-Length"
    );
}
