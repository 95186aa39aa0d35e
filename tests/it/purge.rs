//! Mastodon's cache buster (issue 9 §6, issue 11 §3): a purge request with the right secret
//! evicts its URL from the edge's media cache; a wrong or missing one is 403 and evicts
//! nothing; sent to every edge, it empties every edge's cache of that object.

use std::path::Path;
use std::time::Duration;

use crate::common::{client, eventually, start_edge, start_edge_listening, TestEdge};
use crate::proxy::WAIT;
use crate::proxy::{Mode, Upstream, CORE};

const BUSTER: &str = "[cache_buster]\nsecret_header = \"X-Purge-Secret\"\nsecret = \"s3cret\"\n";

/// Status, `X-Cache-Status` and body of a request.
async fn send(r: reqwest::RequestBuilder) -> (u16, String, String) {
    let r = r.send().await.unwrap();
    let cache = r
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (r.status().as_u16(), cache, r.text().await.unwrap())
}

fn get(edge: &TestEdge, host: &str, path: &str) -> reqwest::RequestBuilder {
    client()
        .get(format!("http://{}{path}", edge.running.addr))
        .header("host", host)
}

/// Mastodon's purge: `GET` (its default method) of the media URL with the secret header,
/// sent to one edge's address.
fn bust(edge: &TestEdge, host: &str, path: &str, secret: &str) -> reqwest::RequestBuilder {
    get(edge, host, path).header("X-Purge-Secret", secret)
}

/// Waits until the edge's cache holds `n` objects (a fetch caches its body after the
/// response is sent).
async fn cached(edge: &TestEdge, n: usize) {
    let cache = edge.running.cache.clone().expect("a cache");
    eventually(WAIT, "the bodies cached", || cache.usage().1 == n).await;
}

fn write(root: &Path, key: &str, body: &str) {
    let p = root.join(key);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

#[tokio::test]
async fn the_buster_evicts_a_url_only_with_the_right_secret() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    write(&root, "a/b.png", "v1");
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\n{BUSTER}",
            root.display()
        ),
    )
    .await;
    let url = "/system/a/b.png";
    assert_eq!(
        send(get(&edge, "any", url)).await,
        (200, "MISS".into(), "v1".into())
    );
    cached(&edge, 1).await;
    assert_eq!(send(get(&edge, "any", url)).await.1, "HIT");
    // The object changes at the primary (or is deleted): the cache still holds v1.
    write(&root, "a/b.png", "v2");
    assert_eq!(
        send(get(&edge, "any", url)).await,
        (200, "HIT".into(), "v1".into())
    );
    // Wrong secrets: 403, nothing evicted.
    for wrong in ["s3cre", "s3cret2", "S3CRET", ""] {
        let (status, _, body) = send(bust(&edge, "any", url, wrong)).await;
        assert_eq!(status, 403, "{wrong:?}");
        assert!(!body.contains("s3cret"));
    }
    assert_eq!(
        send(get(&edge, "any", url)).await,
        (200, "HIT".into(), "v1".into())
    );
    // The right one: evicted; the next GET fetches again.
    let (status, _, body) = send(bust(&edge, "any", url, "s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "purged 1\n"));
    assert_eq!(edge.running.cache.as_ref().unwrap().usage().1, 0);
    assert_eq!(
        send(get(&edge, "any", url)).await,
        (200, "MISS".into(), "v2".into())
    );
    cached(&edge, 1).await;
    assert_eq!(send(get(&edge, "any", url)).await.1, "HIT");
    // A URL not cached: nothing to purge, still 200.
    let (status, _, body) = send(bust(&edge, "any", "/system/a/none.png", "s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "purged 0\n"));
    let metrics = client()
        .get(format!("{}/metrics", edge.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "fediedge_cache_buster_requests_total{outcome=\"refused\"} 4",
        "fediedge_cache_buster_requests_total{outcome=\"purged\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    assert!(!metrics.contains("s3cret"));
}

#[tokio::test]
async fn a_buster_method_core_also_uses_leaves_core_requests_alone() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    write(&root, "a/b.png", "v1");
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\n[core]\nhosts = [\"{CORE}\"]\nweb = [\"{}\"]\nhealth_check_interval = \"0s\"\n[cache_buster]\nhttp_method = \"post\"\nsecret_header = \"X-Purge-Secret\"\nsecret = \"s3cret\"\n",
            root.display(),
            up.addr
        ),
    )
    .await;
    let post = |path: &str| {
        client()
            .post(format!("http://{}{path}", edge.running.addr))
            .header("host", CORE)
    };
    // A POST without the header is a client's: it reaches core.
    let (status, _, body) = send(post("/api/v1/statuses")).await;
    assert_eq!(status, 200);
    assert!(body.starts_with("from upstream"));
    assert_eq!(up.requests(), 1);
    assert_eq!(send(get(&edge, CORE, "/system/a/b.png")).await.1, "MISS");
    cached(&edge, 1).await;
    // With a wrong secret: 403, core never asked, the cache keeps it.
    let (status, _, _) = send(post("/system/a/b.png").header("X-Purge-Secret", "no")).await;
    assert_eq!(status, 403);
    assert_eq!(send(get(&edge, CORE, "/system/a/b.png")).await.1, "HIT");
    // With the right one: purged, core never asked.
    let (status, _, body) = send(post("/system/a/b.png").header("X-Purge-Secret", "s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "purged 1\n"));
    assert_eq!(send(get(&edge, CORE, "/system/a/b.png")).await.1, "MISS");
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn a_custom_method_without_the_secret_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    write(&root, "a/b.png", "v1");
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\n[cache_buster]\nhttp_method = \"PURGE\"\nsecret_header = \"X-Purge-Secret\"\nsecret = \"s3cret\"\n",
            root.display()
        ),
    )
    .await;
    let url = format!("http://{}/system/a/b.png", edge.running.addr);
    let purge = || client().request(reqwest::Method::from_bytes(b"PURGE").unwrap(), &url);
    assert_eq!(send(client().get(&url)).await.1, "MISS");
    cached(&edge, 1).await;
    assert_eq!(send(purge()).await.0, 403, "no secret header");
    assert_eq!(send(client().get(&url)).await.1, "HIT");
    // A GET with the secret is not the buster's method: an ordinary read.
    assert_eq!(
        send(client().get(&url).header("X-Purge-Secret", "s3cret"))
            .await
            .1,
        "HIT"
    );
    let (status, _, body) = send(purge().header("X-Purge-Secret", "s3cret")).await;
    assert_eq!((status, body.as_str()), (200, "purged 1\n"));
    assert_eq!(send(client().get(&url)).await.1, "MISS");
}

/// Issue 11 §3: two edges, each with its own cache, in front of one store (the shared fs
/// root stands for the bucket). Mastodon deletes media; the purge is sent to every edge
/// through its own address (as docs/deploy.md tells the admin to); every edge drops it.
#[tokio::test]
async fn a_purge_sent_to_every_edge_evicts_the_object_from_all_of_them() {
    let shared = tempfile::tempdir().unwrap();
    let keys = [
        "media_attachments/files/1/original/a.png",
        "media_attachments/files/1/original/b.png",
    ];
    for k in keys {
        write(shared.path(), k, &format!("{k} v1"));
    }
    let mut edges = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "media_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\n{BUSTER}",
            shared.path().display()
        );
        edges.push(start_edge(dir.path(), &config).await);
        dirs.push(dir);
    }
    let path = |k: &str| format!("/{k}");
    for e in &edges {
        for k in keys {
            assert_eq!(send(get(e, "files.test", &path(k))).await.1, "MISS");
        }
        cached(e, 2).await;
        for k in keys {
            assert_eq!(send(get(e, "files.test", &path(k))).await.1, "HIT");
        }
    }
    // Mastodon deletes a (the file leaves the store) and b changes: every edge still
    // serves its cached copies.
    std::fs::remove_file(shared.path().join(keys[0])).unwrap();
    write(shared.path(), keys[1], "b v2");
    for e in &edges {
        assert_eq!(send(get(e, "files.test", &path(keys[0]))).await.0, 200);
        assert_eq!(
            send(get(e, "files.test", &path(keys[1]))).await.2,
            format!("{} v1", keys[1])
        );
    }
    // The purges, to each edge's address with the media host's name.
    for e in &edges {
        for k in keys {
            let (status, _, body) = send(bust(e, "files.test", &path(k), "s3cret")).await;
            assert_eq!((status, body.as_str()), (200, "purged 1\n"));
        }
        assert_eq!(e.running.cache.as_ref().unwrap().usage().1, 0);
    }
    // Every edge asks the store again: a is gone, b is the new body.
    for e in &edges {
        let (status, cache, _) = send(get(e, "files.test", &path(keys[0]))).await;
        assert_eq!((status, cache.as_str()), (404, "MISS"));
        let (status, cache, body) = send(get(e, "files.test", &path(keys[1]))).await;
        assert_eq!(
            (status, cache.as_str(), body.as_str()),
            (200, "MISS", "b v2")
        );
        cached(e, 1).await;
        assert_eq!(send(get(e, "files.test", &path(keys[1]))).await.1, "HIT");
    }
}

/// Issue 11 §3 with `peers`: Mastodon tells one edge; it passes the purge on to the others
/// (with the secret and the forwarded mark, so peers that name each other do not loop). A
/// peer that is down gets the purge when it is back, before it serves its stale copy again.
#[tokio::test]
async fn a_purge_reaches_every_peer_once_even_one_that_was_down() {
    let shared = tempfile::tempdir().unwrap();
    let key = "media_attachments/files/1/original/a.png";
    write(shared.path(), key, "v1");
    let ports: Vec<u16> = (0..3).map(|_| crate::common::garage::free_port()).collect();
    let config = |i: usize| {
        let peers: Vec<String> = (0..3)
            .filter(|&j| j != i)
            .map(|j| format!("\"http://127.0.0.1:{}\"", ports[j]))
            .collect();
        format!(
            "media_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\n{BUSTER}peers = [{}]\n",
            shared.path().display(),
            peers.join(", ")
        )
    };
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let listen = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut edges = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        edges.push(start_edge_listening(dir.path(), &listen(i), &config(i)).await);
    }
    let path = format!("/{key}");
    for e in &edges {
        assert_eq!(send(get(e, "files.test", &path)).await.1, "MISS");
        cached(e, 1).await;
        assert_eq!(send(get(e, "files.test", &path)).await.1, "HIT");
    }
    // Edge C goes down with v1 in its cache; Mastodon replaces the file and tells edge A.
    let c = edges.pop().unwrap();
    c.running.shutdown().await;
    write(shared.path(), key, "v2");
    let (a, b) = (&edges[0], &edges[1]);
    let (status, _, body) = send(bust(a, "files.test", &path, "s3cret")).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "purged 1\npassed on to 2 peers\n")
    );
    let b_cache = b.running.cache.clone().unwrap();
    eventually(WAIT, "edge B purged by edge A", || b_cache.usage().1 == 0).await;
    let a_metrics = || a.running.metrics.render();
    eventually(WAIT, "a failed send to the edge that is down", || {
        a_metrics().contains("fediedge_purge_forwards_total{outcome=\"failed\"}")
    })
    .await;
    assert!(a_metrics().contains("fediedge_purge_forwards_total{outcome=\"delivered\"} 1"));
    // C comes back on its address with its cache on disk; A's retry reaches it.
    let c = start_edge_listening(dirs[2].path(), &listen(2), &config(2)).await;
    eventually(
        Duration::from_secs(60),
        "the purge delivered to edge C",
        || a_metrics().contains("fediedge_purge_forwards_total{outcome=\"delivered\"} 2"),
    )
    .await;
    assert!(a_metrics().contains("fediedge_purge_forwards_pending 0"));
    for e in [a, b, &c] {
        let (status, cache, body) = send(get(e, "files.test", &path)).await;
        assert_eq!((status, cache.as_str(), body.as_str()), (200, "MISS", "v2"));
    }
    // The peers did not pass the forwarded purge on: no loop.
    for e in [b, &c] {
        let m = e.running.metrics.render();
        assert!(!m.contains("fediedge_purge_forwards_total{"), "{m}");
        assert!(
            m.contains("fediedge_cache_buster_requests_total{outcome=\"purged\"} 1"),
            "{m}"
        );
    }
}

/// A purge that arrives while the object is being fetched: the fetch still answers its
/// client, but what it read is not cached (it may be what the purge was meant to drop).
#[tokio::test]
async fn a_purge_during_a_fetch_keeps_that_fetch_out_of_the_cache() {
    use crate::common::origin::{Behaviour, Origin};
    let origin = Origin::start().await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let body = crate::common::bytes(200_000, 7);
    origin.put_with(
        "a/b.png",
        body.clone(),
        Behaviour {
            pause_after: Some(1000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"old\"\ntype = \"http\"\nurl = \"{}\"\n[cache]\n{BUSTER}",
            dir.path().join("primary").display(),
            origin.url()
        ),
    )
    .await;
    let url = "/system/a/b.png";
    let reader = tokio::spawn(get(&edge, "any", url).send());
    eventually(WAIT, "the fetch under way", || {
        edge.running.fetches_under_way() == 1
    })
    .await;
    let (status, _, purged) = send(bust(&edge, "any", url, "s3cret")).await;
    assert_eq!((status, purged.as_str()), (200, "purged 0\n"));
    open.send_replace(true);
    let r = reader.await.unwrap().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        body,
        "the reader gets the whole body"
    );
    eventually(WAIT, "the fetch ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;
    assert_eq!(
        edge.running.cache.as_ref().unwrap().usage().1,
        0,
        "not cached"
    );
    assert_ne!(send(get(&edge, "any", url)).await.1, "HIT");
}
