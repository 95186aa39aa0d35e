//! `fediedge serve` against real files, a real HTTP origin and (in `serve_s3`) a real Garage.

use std::time::Duration;

use futures_util::StreamExt;

use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, raw_status, start_edge, TestEdge};

const KEY: &str = "media_attachments/files/000/000/001/original/a1b2c3.png";

/// An edge with an fs primary, a 64 MiB cache and `origin` as its one fallback.
async fn cached_edge(dir: &std::path::Path, origin: &Origin, first_byte: &str) -> TestEdge {
    start_edge(
        dir,
        &(fs_primary_with_cache(dir) + &http_fallback(origin, first_byte)),
    )
    .await
}

/// An fs primary, `origin` as fallback and a 1 MiB disk cache without a memory tier: room
/// for three 300,000-byte bodies, every hit read from disk.
fn one_mib_disk_cache(dir: &std::path::Path, origin: &Origin) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"1MiB\"\nmemory_max_size = \"0\"\n{}",
        dir.join("primary").display(),
        dir.join("cache").display(),
        http_fallback(origin, "5s")
    )
}

fn fs_primary_with_cache(dir: &std::path::Path) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"64MiB\"\n",
        dir.join("primary").display(),
        dir.join("cache").display()
    )
}

fn http_fallback(origin: &Origin, first_byte: &str) -> String {
    format!(
        "[[fallback]]\nname = \"old-origin\"\ntype = \"http\"\nurl = \"{}\"\nfirst_byte_timeout = \"{first_byte}\"\n",
        origin.url()
    )
}

#[tokio::test]
async fn local_primary_serves_with_mastodon_headers() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(root.join("accounts/avatars")).unwrap();
    std::fs::write(root.join("accounts/avatars/x.png"), b"png bytes").unwrap();
    let edge = start_edge(
        dir.path(),
        &format!("[primary]\ntype = \"fs\"\nroot = \"{}\"\n", root.display()),
    )
    .await;
    let r = client()
        .get(format!("{}accounts/avatars/x.png?123", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["cache-control"], "public, max-age=315576000, immutable");
    assert_eq!(h["access-control-allow-origin"], "*");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(
        h["content-security-policy"],
        "default-src 'none'; form-action 'none'"
    );
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["content-length"], "9");
    assert!(h.contains_key("etag") && h.contains_key("last-modified"));
    assert!(h.contains_key("x-cache-status"));
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"png bytes");

    let missing = client()
        .get(format!("{}nope.png", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.headers().contains_key("x-cache-status"));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn other_methods_get_405_and_touch_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    origin.put(KEY, "x");
    let edge = cached_edge(dir.path(), &origin, "5s").await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let r = client()
            .request(method.parse().unwrap(), format!("{}{KEY}", edge.base))
            .body("data")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        assert!(r.headers().contains_key("x-cache-status"));
    }
    assert_eq!(origin.total(), 0);
    assert!(!dir.path().join("primary").join(KEY).exists());
    edge.running.shutdown().await;
}

#[tokio::test]
async fn escaping_keys_are_refused_and_symlinks_cannot_leave_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(&root).unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("link.txt")).unwrap();
    let edge = start_edge(
        dir.path(),
        &format!("[primary]\ntype = \"fs\"\nroot = \"{}\"\n", root.display()),
    )
    .await;
    for path in [
        "/system/../secret.txt",
        "/system/%2e%2e/secret.txt",
        "/system/a/%2E%2E/%2E%2E/secret.txt",
        "/system/a%5c..%5csecret.txt",
        "/system/a%00.png",
        "/system/%2fetc/passwd",
        "/system/./x",
    ] {
        let status = raw_status(
            edge.running.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(status.contains(" 400 "), "{path}: {status}");
    }
    let r = client()
        .get(format!("{}link.txt", edge.base))
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 200);
    assert!(!r.text().await.unwrap().contains("top secret"));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn fallback_hit_is_streamed_cached_and_copied_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 1);
    origin.put(KEY, body.clone());
    let edge = cached_edge(dir.path(), &origin, "5s").await;

    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-status"], "FALLBACK");
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);

    // The copy is recorded after the file lands: wait for the record, then both are there.
    let copied = dir.path().join("primary").join(KEY);
    eventually(
        Duration::from_secs(10),
        "copy recorded in the ledger",
        || {
            edge.running
                .ledger
                .with(|c| fediedge::ledger::ops::copied(c, KEY))
                .unwrap()
                .is_some()
        },
    )
    .await;
    assert_eq!(std::fs::read(&copied).unwrap(), body);
    let record = edge
        .running
        .ledger
        .with(|c| fediedge::ledger::ops::copied(c, KEY))
        .unwrap()
        .expect("ledger records the copy");
    assert_eq!(record.size, body.len() as u64);
    assert_eq!(record.source, "old-origin");
    assert_eq!(
        record.md5,
        hex::encode(<md5::Md5 as md5::Digest>::digest(&body))
    );

    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    assert_eq!(origin.gets(KEY), 1);

    let metrics = client()
        .get(format!("{}/metrics", edge.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("fediedge_writebacks_total{outcome=\"done\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fediedge_requests_total{status=\"200\",cache_status=\"HIT\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fediedge_store_fetches_total{store=\"old-origin\",outcome=\"hit\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fediedge_cache_bytes 300000"), "{metrics}");
    // Admin endpoints are on the admin listener only.
    let on_media = client()
        .get(format!("http://{}/metrics", edge.running.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(on_media.status(), 404);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_herd_shares_one_source_fetch_and_gets_bytes_as_they_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(200_000, 2);
    // The origin sends 50,000 bytes, then holds the rest until the test opens the gate: every
    // client must have its first bytes while the origin still holds (an event, not a timer).
    let (open, gate) = tokio::sync::watch::channel(false);
    origin.put_with(
        KEY,
        body.clone(),
        Behaviour {
            delay: Duration::from_millis(200),
            pause_after: Some(50_000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let edge = cached_edge(dir.path(), &origin, "60s").await;
    let url = format!("{}{KEY}", edge.base);
    let (first_bytes, mut got_first) = tokio::sync::mpsc::unbounded_channel();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, first_bytes) = (url.clone(), first_bytes.clone());
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let mut stream = r.bytes_stream();
                let mut got = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.unwrap();
                    if got.is_empty() && !chunk.is_empty() {
                        let _ = first_bytes.send(());
                    }
                    got.extend_from_slice(&chunk);
                }
                got
            })
        })
        .collect();
    // A bound for failure only: an edge that waits for whole objects never gets here.
    let all_started = async {
        for _ in 0..50 {
            got_first.recv().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all_started)
        .await
        .expect("every client had its first bytes while the origin held the rest");
    assert!(!*open.borrow());
    open.send(true).unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), body);
    }
    assert_eq!(origin.gets(KEY), 1, "one source GET for the whole herd");
    edge.running.shutdown().await;
}

/// Nothing of `KEY` landed anywhere: not in the primary, the cache or the write-back queue.
async fn assert_nothing_kept(edge: &TestEdge) {
    // The fetch task ends just after the client sees the abort: wait for it, then look.
    eventually(Duration::from_secs(30), "the fetch task ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;
    assert!(!edge.dir.join("primary").join(KEY).exists());
    assert_eq!(edge.running.cache.as_ref().unwrap().usage(), (0, 0));
    let queued = edge
        .running
        .ledger
        .with(fediedge::ledger::ops::pending)
        .unwrap();
    assert_eq!(queued, 0);
}

#[tokio::test]
async fn a_truncated_body_is_aborted_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    origin.put_with(
        KEY,
        bytes(100_000, 3),
        Behaviour {
            pause_after: Some(40_000),
            truncate: true,
            ..Behaviour::default()
        },
    );
    let edge = cached_edge(dir.path(), &origin, "5s").await;
    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "headers go out before the body is known to be short"
    );
    assert!(
        r.bytes().await.is_err(),
        "the client must see an aborted body, not a short one"
    );
    assert_nothing_kept(&edge).await;
    // Nothing was remembered: the next request asks the origin again.
    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err());
    assert_eq!(origin.gets(KEY), 2);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_wrong_checksum_is_aborted_and_nothing_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    origin.put_with(
        KEY,
        bytes(10_000, 4),
        Behaviour {
            // md5("") — not the body's.
            content_md5: Some("1B2M2Y8AsgTpgAmY7PhCfg==".into()),
            ..Behaviour::default()
        },
    );
    let edge = cached_edge(dir.path(), &origin, "5s").await;
    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert!(r.bytes().await.is_err());
    assert_nothing_kept(&edge).await;
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_hung_source_gives_504_in_time_and_blocks_no_other_key() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    origin.put_with(
        KEY,
        "never",
        Behaviour {
            hang: true,
            ..Behaviour::default()
        },
    );
    origin.put("other.png", "fine");
    let edge = cached_edge(dir.path(), &origin, "3s").await;
    let hung = tokio::spawn({
        let url = format!("{}{KEY}", edge.base);
        async move { client().get(url).send().await.unwrap().status() }
    });
    eventually(
        Duration::from_secs(30),
        "the hung request at the origin",
        || origin.gets(KEY) == 1,
    )
    .await;
    let r = client()
        .get(format!("{}other.png", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "fine");
    assert!(
        !hung.is_finished(),
        "the other key was answered while the hung one waits"
    );
    // The origin never answers: only the edge's first-byte timeout (3 s) ends the request.
    // A safety bound only, far above it.
    let status = tokio::time::timeout(Duration::from_secs(120), hung)
        .await
        .expect("the hung request was never answered")
        .unwrap();
    assert_eq!(status, 504);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_stalled_body_is_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    // The rest of the body is held until the gate opens, which it never does (`_never` stays
    // alive): only the edge's stall timeout can end the response.
    let (_never, gate) = tokio::sync::watch::channel(false);
    origin.put_with(
        KEY,
        bytes(100_000, 5),
        Behaviour {
            pause_after: Some(10_000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let edge = cached_edge(dir.path(), &origin, "500ms").await;
    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    // A safety bound only: without the abort the body would never end.
    let body = tokio::time::timeout(Duration::from_secs(120), r.bytes())
        .await
        .expect("the stalled body was never aborted");
    assert!(body.is_err());
    assert_nothing_kept(&edge).await;
    edge.running.shutdown().await;
}

#[tokio::test]
async fn ranges_and_conditionals_on_cold_and_warm_keys() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(100_000, 6);
    origin.put(KEY, body.clone());
    origin.put("b.png", body.clone());
    let edge = cached_edge(dir.path(), &origin, "5s").await;
    let url = format!("{}{KEY}", edge.base);
    // Cold key, suffix range.
    let r = client()
        .get(&url)
        .header("range", "bytes=-100")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 99900-99999/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[99_900..]);
    // Cold key, middle range.
    let r = client()
        .get(format!("{}b.png", edge.base))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[1000..2000]);
    eventually(Duration::from_secs(5), "cached", || {
        edge.running.cache.as_ref().unwrap().usage().1 == 2
    })
    .await;
    // Warm key.
    let r = client()
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[10..20]);
    let r = client()
        .get(&url)
        .header("range", "bytes=200000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");
    // Range is for GET only (RFC 9110 §14.2): a HEAD gets the whole object's head.
    let r = client()
        .head(&url)
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");
    assert!(!r.headers().contains_key("content-range"));
    // Conditionals.
    let r = client().get(&url).send().await.unwrap();
    let etag = r.headers()["etag"].clone();
    let lm = r.headers()["last-modified"].clone();
    let r = client()
        .get(&url)
        .header("if-none-match", etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag);
    let r = client()
        .get(&url)
        .header("if-modified-since", lm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    let r = client()
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // HEAD, warm and cold.
    let r = client().head(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");
    origin.put("c.png", body.clone());
    let r = client()
        .head(format!("{}c.png", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "100000");
    assert_eq!(r.headers()["x-cache-status"], "FALLBACK");
    assert_eq!(origin.gets("c.png"), 0, "HEAD fetches no body");
    // A HEAD of a key found nowhere is remembered like a GET's.
    for _ in 0..3 {
        let r = client()
            .head(format!("{}none.png", edge.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    assert_eq!(origin.total_for("none.png"), 1);
    assert_eq!(origin.gets(KEY), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn misses_are_remembered_briefly() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let edge = start_edge(
        dir.path(),
        &format!(
            "negative_ttl = \"10m\"\n{}{}",
            fs_primary_with_cache(dir.path()),
            http_fallback(&origin, "5s")
        ),
    )
    .await;
    let url = format!("{}missing.png", edge.base);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    // A storm right after: answered from memory.
    let storm: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { client().get(url).send().await.unwrap() })
        })
        .collect();
    for r in storm {
        let r = r.await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(r.headers()["x-cache-status"], "HIT");
    }
    assert_eq!(origin.gets("missing.png"), 1);
    // The expiry after negative_ttl is shown with tokio's paused clock in `negative.rs`.
    edge.running.shutdown().await;
}

#[tokio::test]
async fn the_cache_is_bounded_survives_restart_and_refetches_damaged_files() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    for i in 0..6 {
        origin.put(&format!("f{i}.bin"), bytes(300_000, i as u8));
    }
    let config = one_mib_disk_cache(dir.path(), &origin);
    let edge = start_edge(dir.path(), &config).await;
    for i in 0..6 {
        let r = client()
            .get(format!("{}f{i}.bin", edge.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    }
    eventually(Duration::from_secs(10), "six copied to the primary", || {
        (0..6).all(|i| dir.path().join(format!("primary/f{i}.bin")).exists())
    })
    .await;
    let (bytes_used, objects) = edge.running.cache.as_ref().unwrap().usage();
    assert!(bytes_used <= 1 << 20, "cache holds {bytes_used} bytes");
    assert_eq!(objects, 3);
    let cache = edge.running.cache.clone().unwrap();
    let damaged = fediedge::key::Key::parse("f5.bin").unwrap();
    let path = cache.body_path(&damaged);
    edge.running.shutdown().await;
    drop(cache);
    // Flip bytes in the middle of one cached body (same length: only the MD5 can tell).
    let mut data = std::fs::read(&path).unwrap();
    data[1000] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let edge = start_edge(dir.path(), &config).await;
    edge.running.cache.as_ref().unwrap().loaded().await;
    assert_eq!(
        edge.running.cache.as_ref().unwrap().usage().1,
        3,
        "index recovered"
    );
    let r = client()
        .get(format!("{}f4.bin", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes(300_000, 4)[..]);
    assert_eq!(origin.gets("f4.bin"), 1);
    let r = client()
        .get(format!("{}f5.bin", edge.base))
        .send()
        .await
        .unwrap();
    // Not served from the damaged cache file: refetched, from the primary the first
    // request copied it into.
    assert_eq!(
        r.headers()["x-cache-status"],
        "MISS",
        "a damaged body is not served"
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &bytes(300_000, 5)[..]);
    assert_eq!(origin.gets("f5.bin"), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_running_edge_shows_migration_progress_from_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    for i in 0..3 {
        std::fs::create_dir_all(old.join("a")).unwrap();
        std::fs::write(old.join(format!("a/{i}.png")), bytes(1000, i)).unwrap();
    }
    let stores = format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"old\"\ntype = \"fs\"\nroot = \"{}\"\n",
        dir.path().join("primary").display(),
        old.display()
    );
    let config = dir.path().join("fediedge.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{stores}",
            dir.path().join("var").display()
        ),
    )
    .unwrap();
    // A migration run by another process, on the same ledger.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fediedge"))
        .args(["migrate", "--from", "old", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let edge = start_edge(dir.path(), &stores).await;
    let metrics_url = format!("{}/metrics", edge.admin);
    let mut text = String::new();
    // Published at start and every few seconds: polled with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        text = client()
            .get(&metrics_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("fediedge_migration_objects_done 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        text.contains("fediedge_migration_objects_total 3"),
        "{text}"
    );
    assert!(text.contains("fediedge_migration_objects_done 3"), "{text}");
    assert!(
        text.contains("fediedge_migration_bytes_done 3000"),
        "{text}"
    );
    edge.running.shutdown().await;
}

#[tokio::test]
async fn the_background_backfill_copies_the_cold_tail_and_yields_to_live_misses() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old");
    std::fs::create_dir_all(old.join("cold")).unwrap();
    for i in 0..6 {
        std::fs::write(old.join(format!("cold/{i}.png")), bytes(2000, i)).unwrap();
    }
    let origin = Origin::start().await;
    // The origin holds the live miss until the test releases it.
    let (release_hot, hold) = tokio::sync::watch::channel(false);
    origin.put_with(
        "hot.png",
        "hot",
        Behaviour {
            hold: Some(hold),
            ..Behaviour::default()
        },
    );
    let primary = dir.path().join("primary");
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n{}[[fallback]]\nname = \"old\"\ntype = \"fs\"\nroot = \"{}\"\n[backfill]\nfrom = \"old\"\nconcurrency = 1\nmax_ops_per_sec = 4\n",
            primary.display(),
            http_fallback(&origin, "120s"),
            old.display()
        ),
    )
    .await;
    let copied = || {
        (0..6)
            .filter(|i| primary.join(format!("cold/{i}.png")).exists())
            .count()
    };
    // A live miss on a slow origin: while it is under way the backfill starts nothing.
    let hot = tokio::spawn({
        let url = format!("{}hot.png", edge.base);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    eventually(
        Duration::from_secs(10),
        "the live miss at the origin",
        || origin.gets("hot.png") == 1,
    )
    .await;
    // The gate holds the next object back (counted at each of its 200 ms checks); with
    // `concurrency = 1` that object holds the one slot, so nothing else is under way.
    let held = || metric_value(&edge, "fediedge_backfill_held_total");
    eventually(
        Duration::from_secs(30),
        "the backfill held at the gate",
        || held() >= 1,
    )
    .await;
    let before = copied();
    let held_before = held();
    // Five more checks of the gate while the live miss is still held at the origin: none
    // of them let an object through.
    eventually(
        Duration::from_secs(60),
        "five more checks of the gate",
        || held() >= held_before + 5,
    )
    .await;
    assert_eq!(copied(), before, "the backfill went on during a live miss");
    assert!(before < 6);
    assert!(!hot.is_finished(), "the live miss is still under way");
    release_hot.send(true).unwrap();
    assert_eq!(hot.await.unwrap(), "hot");
    // Then it finishes the tail, recorded in the ledger as migrate copies.
    eventually(Duration::from_secs(15), "the cold tail copied", || {
        copied() == 6
    })
    .await;
    let record = edge
        .running
        .ledger
        .with(|c| fediedge::ledger::ops::copied(c, "cold/3.png"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.via.as_str(), record.source.as_str()),
        ("migrate", "old")
    );
    // The backfill's reads show in the edge's own metrics.
    let metrics = edge.running.metrics.render();
    assert!(
        metrics.contains("fediedge_store_fetches_total{store=\"old\",outcome=\"hit\"} 6"),
        "{metrics}"
    );
    edge.running.shutdown().await;
}

/// The value of the metric line starting with `name ` (0 when absent).
fn metric_value(edge: &TestEdge, name: &str) -> u64 {
    let text = edge.running.metrics.render();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_missing_fallback_root_is_refused_not_served_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"old-nfs\"\ntype = \"fs\"\nroot = \"{}\"\n",
        dir.path().join("var").display(),
        dir.path().join("primary").display(),
        dir.path().join("mnt/old-nfs/public/system").display(),
    );
    let config = fediedge::config::from_str(&text, std::path::Path::new("t.toml")).unwrap();
    let err = match fediedge::serve::start(config).await {
        Ok(_) => panic!("started with a missing fallback root"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("old-nfs") && err.contains("mounted"), "{err}");
    assert!(
        !dir.path().join("mnt").exists(),
        "the mount point was created"
    );
}

#[tokio::test]
async fn write_backs_cannot_escape_an_fs_primary_through_a_symlinked_directory() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&primary).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, primary.join("evil")).unwrap();
    let origin = Origin::start().await;
    origin.put("evil/sub/x.png", "payload");
    let edge = cached_edge(dir.path(), &origin, "5s").await;
    let r = client()
        .get(format!("{}evil/sub/x.png", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.text().await.unwrap(),
        "payload",
        "still served from the fallback"
    );
    eventually(Duration::from_secs(10), "a failed write-back", || {
        edge.running
            .metrics
            .render()
            .contains("fediedge_writebacks_total{outcome=\"failed\"}")
    })
    .await;
    assert!(
        !outside.join("sub").exists(),
        "a directory was created outside the root"
    );
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_queued_copy_whose_staged_body_is_gone_is_dropped_not_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = fediedge::ledger::Ledger::open(&dir.path().join("var")).unwrap();
    let queued = fediedge::ledger::Queued {
        key: "lost/x.png".into(),
        staged: dir.path().join("var/staging/wb-gone"),
        size: 10,
        md5: "00".repeat(16),
        content_type: None,
        source: "old".into(),
        attempts: 0,
    };
    assert!(ledger
        .with(|c| fediedge::ledger::ops::enqueue(c, &queued))
        .unwrap());
    drop(ledger);
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n",
            dir.path().join("primary").display()
        ),
    )
    .await;
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(10), "the row dropped", || {
        ledger.with(fediedge::ledger::ops::pending).unwrap() == 0
    })
    .await;
    assert!(ledger
        .with(|c| fediedge::ledger::ops::copied(c, "lost/x.png"))
        .unwrap()
        .is_none());
    assert!(edge
        .running
        .metrics
        .render()
        .contains("fediedge_writebacks_total{outcome=\"failed\"} 1"));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn the_lru_order_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    for i in 0..4 {
        origin.put(&format!("f{i}.bin"), bytes(300_000, i as u8));
    }
    let config = one_mib_disk_cache(dir.path(), &origin);
    let get = |edge: &TestEdge, i: usize| {
        let url = format!("{}f{i}.bin", edge.base);
        async move {
            let r = client().get(url).send().await.unwrap();
            let status = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
            r.bytes().await.unwrap();
            status
        }
    };
    let edge = start_edge(dir.path(), &config).await;
    for i in 0..3 {
        get(&edge, i).await;
    }
    // Clients get their last byte before the cache bookkeeping: wait for it.
    let cache = edge.running.cache.clone().unwrap();
    eventually(Duration::from_secs(10), "three cached", || {
        cache.usage().1 == 3
    })
    .await;
    edge.running.shutdown().await;
    // After a restart, f0 (the oldest write) is used: that use must outlive the next restart.
    let edge = start_edge(dir.path(), &config).await;
    let f0 = edge
        .running
        .cache
        .as_ref()
        .unwrap()
        .body_path(&fediedge::key::Key::parse("f0.bin").unwrap());
    let written = std::fs::metadata(&f0).unwrap().modified().unwrap();
    assert_eq!(get(&edge, 0).await, "HIT");
    eventually(Duration::from_secs(5), "the use recorded", || {
        std::fs::metadata(&f0).unwrap().modified().unwrap() > written
    })
    .await;
    edge.running.shutdown().await;
    let edge = start_edge(dir.path(), &config).await;
    // Eviction waits for the whole index (it loads behind the first requests).
    edge.running.cache.as_ref().unwrap().loaded().await;
    assert_eq!(get(&edge, 3).await, "FALLBACK"); // evicts the least recently used: f1
                                                 // The client has its last byte before f3 is inserted (and f1 evicted): wait for that.
    let cache = edge.running.cache.clone().unwrap();
    let f1 = cache.body_path(&fediedge::key::Key::parse("f1.bin").unwrap());
    eventually(Duration::from_secs(10), "f1 evicted", || !f1.exists()).await;
    assert_eq!(get(&edge, 0).await, "HIT");
    assert_eq!(get(&edge, 2).await, "HIT");
    assert_ne!(get(&edge, 1).await, "HIT");
    edge.running.shutdown().await;
}
