//! The core cache's fast hit (`CoreCache::fresh_without_vary`): a fresh stored response
//! without `Vary`, asked for without `Cache-Control`/`Pragma` and with the stored `Host`, is
//! answered without the policy's bookkeeping. Its answer must be the full way's, and
//! everything else must go the full way. The full way is reached here with a request
//! `Cache-Control` that leaves the answer a HIT (`max-age=3600` on an entry seconds old).

use crate::common::{client, eventually, TestEdge};
use crate::corecache::{edge, hs, reply, Core};
use crate::proxy::{get, CORE, WAIT};

/// The full way, still a HIT.
const FULL_WAY: (&str, &str) = ("cache-control", "max-age=3600");

/// Status, headers (sorted, `Age` apart) and body of one answer.
type Answer = (u16, Vec<(String, String)>, u64, String);

async fn ask(edge: &TestEdge, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("http://{}{path}", edge.running.addr);
    let mut r = client()
        .request(method.parse().unwrap(), url)
        .header("host", CORE);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let mut age = None;
    let mut hs: Vec<(String, String)> = Vec::new();
    for (k, v) in resp.headers() {
        let v = v.to_str().unwrap().to_owned();
        match k.as_str() {
            "age" => {
                assert!(age.is_none(), "one Age");
                age = Some(v.parse::<u64>().expect("Age is a number"));
            }
            // Written by hyper at sending time when the stored response has none.
            "date" => {}
            _ => hs.push((k.as_str().to_owned(), v)),
        }
    }
    hs.sort();
    let age = age.expect("an Age header");
    (status, hs, age, resp.text().await.unwrap())
}

/// `a` and `b` are the same answer; `b` was asked after `a` (its Age is no smaller).
fn same(a: &Answer, b: &Answer, what: &str) {
    assert_eq!((a.0, &a.1, &a.3), (b.0, &b.1, &b.3), "{what}");
    assert!(a.2 <= b.2, "{what}: Age {} then {}", a.2, b.2);
}

fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.1.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn the_fast_hit_answers_exactly_as_the_full_way() {
    let core = Core::start(|_, _| {
        reply(
            200,
            &[
                ("cache-control", "public, max-age=600"),
                ("age", "7"),
                ("etag", "\"v1\""),
                ("content-type", "application/json"),
                ("x-custom", "kept"),
                ("surrogate-control", "max-age=600"),
            ],
            "{\"uri\":\"example.test\"}",
        )
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let path = "/api/v1/instance";
    let first = ask(&edge, "GET", path, &[]).await;
    assert_eq!(header(&first, "x-cache-status"), Some("MISS"));
    eventually(WAIT, "stored", || {
        edge.running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;

    for (what, method, extra) in [
        ("GET", "GET", None),
        ("HEAD", "HEAD", None),
        (
            "a conditional GET (304)",
            "GET",
            Some(("if-none-match", "\"v1\"")),
        ),
        ("a Range", "GET", Some(("range", "bytes=2-6"))),
    ] {
        let plain: Vec<(&str, &str)> = extra.into_iter().collect();
        let mut full = plain.clone();
        full.push(FULL_WAY);
        let fast = ask(&edge, method, path, &plain).await;
        let slow = ask(&edge, method, path, &full).await;
        let again = ask(&edge, method, path, &plain).await;
        same(&fast, &slow, what);
        same(&slow, &again, what);
        assert_eq!(header(&fast, "x-cache-status"), Some("HIT"), "{what}");
        assert!(fast.2 >= 7, "{what}: the stored Age counts");
        assert_eq!(header(&fast, "surrogate-control"), None, "{what}");
        assert_eq!(header(&fast, "x-custom"), Some("kept"), "{what}");
    }
    let get = ask(&edge, "GET", path, &[]).await;
    assert_eq!((get.0, get.3.as_str()), (200, "{\"uri\":\"example.test\"}"));
    assert_eq!(header(&get, "content-length"), Some("22"));
    let range = ask(&edge, "GET", path, &[("range", "bytes=2-6")]).await;
    assert_eq!((range.0, range.3.as_str()), (206, "uri\":"));
    let not_modified = ask(&edge, "GET", path, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(not_modified.0, 304);
    assert_eq!(core.count(path), 1, "every one a hit");
}

#[tokio::test]
async fn no_cache_pragma_another_host_or_a_stored_vary_go_the_full_way() {
    let core = Core::start(|s, n| match s.path.as_str() {
        "/vary" => reply(
            200,
            &[("cache-control", "public, max-age=600"), ("vary", "Accept")],
            &format!("/vary {n} {}", hs(s, "accept")),
        ),
        p => reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("{p} {n}"),
        ),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core, "").await;
    let cache = edge.running.core_cache.as_ref().unwrap();
    let fetch =
        |host: &'static str, path: &'static str, headers: Vec<(&'static str, &'static str)>| {
            let edge = &edge;
            async move {
                let mut r = get(edge, host, path);
                for (k, v) in headers {
                    r = r.header(k, v);
                }
                let resp = r.send().await.unwrap();
                let c = resp.headers()["x-cache-status"]
                    .to_str()
                    .unwrap()
                    .to_owned();
                (c, resp.text().await.unwrap())
            }
        };

    assert_eq!(fetch(CORE, "/a", vec![]).await.0, "MISS");
    eventually(WAIT, "stored", || cache.usage().1 == 1).await;
    assert_eq!(
        fetch(CORE, "/a", vec![]).await,
        ("HIT".into(), "/a 1".into())
    );
    // A hit here would be the fast path: each of these reaches core instead.
    let (c, body) = fetch(CORE, "/a", vec![("cache-control", "no-cache")]).await;
    assert_eq!((c.as_str(), body.as_str()), ("MISS", "/a 2"));
    assert_eq!(core.count("/a"), 2);
    let (c, body) = fetch(CORE, "/a", vec![("pragma", "no-cache")]).await;
    assert_eq!((c.as_str(), body.as_str()), ("MISS", "/a 3"));
    assert_eq!(core.count("/a"), 3);
    // The same URL by another spelling of the Host (the stored request's Host does not
    // match it byte for byte, as the policy compares it).
    let (c, body) = fetch("EXAMPLE.test", "/a", vec![]).await;
    assert_eq!((c.as_str(), body.as_str()), ("MISS", "/a 4"));
    assert_eq!(core.count("/a"), 4);

    // A stored Vary: the other Accept is not answered from it.
    let html = vec![("accept", "text/html")];
    let json = vec![("accept", "application/json")];
    assert_eq!(fetch(CORE, "/vary", html.clone()).await.0, "MISS");
    eventually(WAIT, "stored", || {
        core.count("/vary") == 1 && cache.usage().1 >= 2
    })
    .await;
    let (c, body) = fetch(CORE, "/vary", html).await;
    assert_eq!((c.as_str(), body.as_str()), ("HIT", "/vary 1 text/html"));
    let (c, body) = fetch(CORE, "/vary", json).await;
    assert_eq!(
        (c.as_str(), body.as_str()),
        ("MISS", "/vary 2 application/json")
    );
    assert_eq!(core.count("/vary"), 2);
}
