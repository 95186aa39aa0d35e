//! gzip at the front door (`[core] gzip`, as Mastodon's nginx `gzip on`): core's JSON, HTML
//! and the like compressed for clients that take gzip, `Vary: Accept-Encoding` on every
//! compressible answer, from the proxy and from the core cache alike; media, streams,
//! encoded, partial and small bodies left alone.

use std::io::Read;

use crate::corecache::{cache_conf, reply, Core, Reply};
use crate::proxy::{edge_with_core, get, CORE};

/// A JSON body of about 6 KiB that compresses well.
fn json() -> String {
    let items: Vec<String> = (0..100)
        .map(|i| format!("{{\"id\":\"{i}\",\"content\":\"a post\"}}"))
        .collect();
    format!("[{}]", items.join(","))
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("a whole gzip stream");
    out
}

/// Core answering `/json` (cacheable, a strong ETag), `/html`, `/png`, `/small`, `/encoded`
/// (already `br`), `/no-transform`, `/events` and `/gone` (500) with the JSON body.
async fn core() -> Core {
    Core::start(|s, _| {
        let body = json();
        let typed = |t: &str| reply(200, &[("content-type", t)], &body);
        match s.path.as_str() {
            "/json" => reply(
                200,
                &[
                    ("content-type", "application/json; charset=utf-8"),
                    ("cache-control", "public, max-age=600"),
                    ("etag", "\"v1\""),
                    ("vary", "Accept"),
                ],
                &body,
            ),
            "/activity" => typed("application/activity+json"),
            "/html" => typed("text/html; charset=utf-8"),
            "/png" => typed("image/png"),
            "/small" => reply(200, &[("content-type", "application/json")], "{}"),
            "/encoded" => reply(
                200,
                &[
                    ("content-type", "application/json"),
                    ("content-encoding", "br"),
                ],
                &body,
            ),
            "/no-transform" => reply(
                200,
                &[
                    ("content-type", "application/json"),
                    ("cache-control", "no-transform"),
                ],
                &body,
            ),
            "/events" => typed("text/event-stream"),
            "/gone" => Reply {
                status: 500,
                ..typed("application/json")
            },
            _ => reply(404, &[("content-type", "text/plain")], "not here"),
        }
    })
    .await
}

struct Got {
    status: u16,
    encoding: String,
    vary: Vec<String>,
    length: Option<String>,
    etag: String,
    cache: String,
    body: Vec<u8>,
}

async fn fetch(edge: &crate::common::TestEdge, path: &str, accept: Option<&str>) -> Got {
    let mut r = get(edge, CORE, path);
    if let Some(a) = accept {
        r = r.header("accept-encoding", a);
    }
    let resp = r.send().await.unwrap();
    let h = resp.headers();
    let text = |name: &str| {
        h.get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Got {
        status: resp.status().as_u16(),
        encoding: text("content-encoding"),
        vary: h
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap().to_ascii_lowercase())
            .collect(),
        length: h
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_owned()),
        etag: text("etag"),
        cache: text("x-cache-status"),
        body: resp.bytes().await.unwrap().to_vec(),
    }
}

#[tokio::test]
async fn core_answers_are_gzipped_for_clients_that_take_it_from_the_proxy_and_the_cache() {
    let core = core().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = cache_conf(dir.path(), "16MiB", "");
    let edge = edge_with_core(dir.path(), &[core.addr()], &conf).await;
    let plain = json();

    // Proxied (not cacheable) and cached (MISS, then HIT), each for a client that takes gzip
    // and one that does not.
    for path in ["/html", "/activity", "/json", "/json"] {
        let g = fetch(&edge, path, Some("br;q=1, gzip;q=0.8")).await;
        assert_eq!((g.status, g.encoding.as_str()), (200, "gzip"), "{path}");
        // Compressed as it streams (no length), or a stored answer's gzipped copy (its own).
        let hit = g.cache == "HIT";
        let length = hit.then(|| g.body.len().to_string());
        assert_eq!(g.length, length, "{path} ({})", g.cache);
        assert!(g.vary.contains(&"accept-encoding".to_owned()), "{path}");
        assert!(g.body.len() < plain.len() / 4, "{path}: compressed");
        assert_eq!(gunzip(&g.body), plain, "{path}");
        let i = fetch(&edge, path, None).await;
        assert_eq!((i.status, i.encoding.as_str()), (200, ""), "{path}");
        assert_eq!(i.length, Some(plain.len().to_string()), "{path}");
        assert!(i.vary.contains(&"accept-encoding".to_owned()), "{path}");
        assert_eq!(i.body, plain.as_bytes(), "{path}");
        if path == "/json" {
            assert_eq!(g.etag, "W/\"v1\"", "a gzipped body's ETag is weak");
            assert_eq!(i.etag, "\"v1\"");
            assert_eq!(i.vary.len(), 2, "core's Vary kept: {:?}", i.vary);
        }
    }
    // The stored answer's gzipped copy is made once and kept beside it: the same bytes.
    let again = fetch(&edge, "/json", Some("gzip")).await;
    assert_eq!(
        (again.cache.as_str(), again.encoding.as_str()),
        ("HIT", "gzip")
    );
    assert_eq!(again.etag, "W/\"v1\"");
    assert!(again.vary.contains(&"accept-encoding".to_owned()));
    assert_eq!(gunzip(&again.body), plain);
    let head = crate::common::client()
        .head(format!("http://{}/json", edge.running.addr))
        .header("host", CORE)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["content-encoding"], "gzip");
    assert_eq!(
        head.headers()["content-length"].to_str().unwrap(),
        again.body.len().to_string()
    );
    // A range is of the identity body.
    let r = get(&edge, CORE, "/json")
        .header("accept-encoding", "gzip")
        .header("range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert!(!r.headers().contains_key("content-encoding"));
    assert_eq!(r.text().await.unwrap(), plain[..10]);
    assert_eq!(core.count("/json"), 1, "one stored identity body for both");
    // A 304 for the gzipped body's weak ETag.
    let r = get(&edge, CORE, "/json")
        .header("accept-encoding", "gzip")
        .header("if-none-match", "W/\"v1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // Left alone: media types, streams, bodies already encoded, no-transform, small, 5xx,
    // and a client refusing gzip.
    for (path, status) in [
        ("/png", 200),
        ("/events", 200),
        ("/encoded", 200),
        ("/no-transform", 200),
        ("/small", 200),
        ("/gone", 500),
    ] {
        let g = fetch(&edge, path, Some("gzip")).await;
        assert_eq!(g.status, status, "{path}");
        assert_ne!(g.encoding, "gzip", "{path}");
        assert!(!g.vary.contains(&"accept-encoding".to_owned()), "{path}");
    }
    let refused = fetch(&edge, "/html", Some("gzip;q=0, identity")).await;
    assert_eq!(refused.encoding, "");
    assert_eq!(refused.body, plain.as_bytes());
    // A HEAD says what the GET would get.
    let r = crate::common::client()
        .head(format!("http://{}/html", edge.running.addr))
        .header("host", CORE)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    // Media through the media path is never touched.
    let r = get(&edge, CORE, "/system/small.txt")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("content-encoding"));
    assert_eq!(r.text().await.unwrap(), "small");
}

#[tokio::test]
async fn gzip_off_leaves_core_answers_as_they_are() {
    let core = core().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = cache_conf(dir.path(), "16MiB", "gzip = false\n");
    let edge = edge_with_core(dir.path(), &[core.addr()], &conf).await;
    let g = fetch(&edge, "/html", Some("gzip")).await;
    assert_eq!(g.encoding, "");
    assert!(g.vary.is_empty(), "{:?}", g.vary);
    assert_eq!(g.body, json().as_bytes());
    // From the core cache too: core's own `Vary`, none of the edge's, on the miss and the
    // hits (the stored head is made once for every client).
    for (want, accept) in [("MISS", Some("gzip")), ("HIT", Some("gzip")), ("HIT", None)] {
        let g = fetch(&edge, "/json", accept).await;
        assert_eq!((g.cache.as_str(), g.encoding.as_str()), (want, ""));
        assert_eq!(g.vary, ["accept"], "{want}");
        assert_eq!(g.etag, "\"v1\"");
        assert_eq!(g.body, json().as_bytes());
    }
}
