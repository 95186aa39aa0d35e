//! The core cache's index loads in the background after a restart, as the media cache's does
//! (issue 7 §5): the edge answers before the load ends, `Vary` variants stay apart, what
//! requests store, replace or purge meanwhile is neither undone nor counted twice, eviction to
//! `max_size` waits for the whole count, and entries survive the next restart. Real files and
//! a real in-process core (`corecache::Core`); the loader is held back by
//! `fediedge::cache::hold_index_load` (an event), never timed.

use std::path::Path;

use crate::common::{eventually, TestEdge};
use crate::corecache::{cache_conf, fetch, hs, reply, Core};
use crate::proxy::{edge_with_core, CORE, WAIT};

/// Responses stored through the edge before each restart.
const N: usize = 120;
/// Responses written straight into the directory for the test of requests racing the loader.
const SEEDED: usize = 4000;

/// The body core sends for the `n`-th request of `path`: its length depends on both, so a
/// byte count that is off by one entry shows.
fn body(path: &str, n: usize) -> String {
    let i: usize = path.rsplit('/').next().unwrap().parse().unwrap_or(0);
    format!("{path} v{n} {}", "x".repeat(200 + i * 7 + n * 50))
}

async fn core() -> Core {
    Core::start(|s, n| {
        if s.path == "/@alice" {
            let json = hs(s, "accept").contains("activity+json");
            let (ct, b) = match json {
                true => ("application/activity+json", "{\"type\":\"Person\"}"),
                false => ("text/html", "<html>alice</html>"),
            };
            return reply(
                200,
                &[
                    ("cache-control", "public, max-age=600"),
                    ("vary", "Accept"),
                    ("content-type", ct),
                ],
                b,
            );
        }
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &body(&s.path, n),
        )
    })
    .await
}

const HTML: [(&str, &str); 1] = [("accept", "text/html")];
const AP: [(&str, &str); 1] = [("accept", "application/activity+json")];

/// Stores `/s/0` … `/s/{N-1}` and both variants of `/@alice`.
async fn fill(edge: &TestEdge, core: &Core) {
    for i in 0..N {
        let (status, c, _) = fetch(edge, &format!("/s/{i}"), &[]).await;
        assert_eq!((status, c.as_str()), (200, "MISS"));
    }
    fetch(edge, "/@alice", &HTML).await;
    fetch(edge, "/@alice", &AP).await;
    let cache = edge.running.core_cache.clone().unwrap();
    eventually(WAIT, "all stored", || cache.usage().1 == N + 2).await;
    assert_eq!(core.count("/@alice"), 2);
}

/// Bytes of the bodies and number of metas under the cache's `objects/` (every body has its
/// meta, no stray file is left).
fn on_disk(dir: &Path) -> (u64, usize) {
    let (mut bytes, mut metas, mut bodies) = (0, 0, 0);
    for e in walkdir::WalkDir::new(dir.join("core-cache/objects")) {
        let e = e.unwrap();
        if !e.file_type().is_file() {
            continue;
        }
        let name = e.file_name().to_str().unwrap().to_owned();
        if name.ends_with(".body") {
            bytes += e.metadata().unwrap().len();
            bodies += 1;
            assert!(
                e.path().with_extension("meta").exists(),
                "{name} has a meta"
            );
        } else {
            assert!(name.ends_with(".meta"), "a stray file: {name}");
            metas += 1;
        }
    }
    assert_eq!(bodies, metas);
    (bytes, metas)
}

fn loading_gauge(edge: &TestEdge) -> String {
    let text = edge.running.metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("fediedge_core_cache_index_loading "))
        .expect("the gauge is rendered");
    line.rsplit(' ').next().unwrap().to_owned()
}

async fn start(dir: &Path, core: &Core, max_size: &str) -> TestEdge {
    edge_with_core(dir, &[core.addr()], &cache_conf(dir, max_size, "")).await
}

#[tokio::test]
async fn a_restart_answers_before_the_core_cache_index_loads_and_keeps_its_accounting() {
    let core = core().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start(dir.path(), &core, "16MiB").await;
    fill(&edge, &core).await;
    let cache = edge.running.core_cache.clone().unwrap();
    let (bytes, n) = cache.usage();
    assert_eq!(on_disk(dir.path()), (bytes, n));
    edge.running.shutdown().await;
    drop(cache);

    // The loader is held before it reads anything: every answer below comes before the load.
    let hold = fediedge::cache::hold_index_load(&dir.path().join("core-cache"));
    let edge = start(dir.path(), &core, "16MiB").await;
    let cache = edge.running.core_cache.clone().unwrap();
    assert!(cache.is_loading());
    assert_eq!(loading_gauge(&edge), "1");
    assert_eq!(cache.usage(), (0, 0), "nothing indexed yet");

    // A stored response, found by its URL's files.
    let (status, c, got) = fetch(&edge, "/s/7", &[]).await;
    assert_eq!((status, c.as_str(), got), (200, "HIT", body("/s/7", 1)));
    // Each Vary variant to its own requester.
    let (_, c, got) = fetch(&edge, "/@alice", &AP).await;
    assert_eq!((c.as_str(), got.as_str()), ("HIT", "{\"type\":\"Person\"}"));
    let (_, c, got) = fetch(&edge, "/@alice", &HTML).await;
    assert_eq!((c.as_str(), got.as_str()), ("HIT", "<html>alice</html>"));
    assert_eq!(core.count("/@alice"), 2);
    assert_eq!(core.count("/s/7"), 1);

    // Replaced meanwhile (the client asks core again): the new body, once.
    let (_, c, got) = fetch(&edge, "/s/3", &[("cache-control", "no-cache")]).await;
    assert_eq!((c.as_str(), got), ("MISS", body("/s/3", 2)));
    // Stored meanwhile, concurrently.
    let news: Vec<_> = (0..10)
        .map(|j| {
            let base = edge.running.addr;
            tokio::spawn(async move {
                let r = crate::common::client()
                    .get(format!("http://{base}/new/{j}"))
                    .header("host", CORE)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.headers()["x-cache-status"], "MISS");
                r.text().await.unwrap()
            })
        })
        .collect();
    let mut new_bytes = 0;
    for (j, t) in news.into_iter().enumerate() {
        let got = t.await.unwrap();
        assert_eq!(got, body(&format!("/new/{j}"), 1));
        new_bytes += got.len() as u64;
    }
    // Purged meanwhile, before the loader saw it.
    assert_eq!(cache.purge(CORE, "/s/9"), 1);
    let s = |p: &str, n| body(p, n).len() as u64;
    let alice = 17 + 18;
    let settled = s("/s/7", 1) + alice + s("/s/3", 2) + new_bytes;
    eventually(WAIT, "the stores made during the load", || {
        cache.usage() == (settled, 1 + 2 + 1 + 10)
    })
    .await;
    assert!(cache.is_loading(), "all of the above before the load");

    drop(hold);
    cache.loaded().await;
    assert_eq!(loading_gauge(&edge), "0");
    let expected = bytes - s("/s/3", 1) + s("/s/3", 2) + new_bytes - s("/s/9", 1);
    assert_eq!(cache.usage(), (expected, N + 2 + 10 - 1));
    assert_eq!(on_disk(dir.path()), cache.usage());

    // After the load: loaded entries, the replacement, the purge stands.
    let (_, c, got) = fetch(&edge, "/s/100", &[]).await;
    assert_eq!((c.as_str(), got), ("HIT", body("/s/100", 1)));
    let (_, c, got) = fetch(&edge, "/s/3", &[]).await;
    assert_eq!((c.as_str(), got), ("HIT", body("/s/3", 2)));
    let (_, c, _) = fetch(&edge, "/s/9", &[]).await;
    assert_eq!(c, "MISS", "a purge during the load is not undone by it");
    assert_eq!(core.count("/s/100"), 1);
    eventually(WAIT, "/s/9 stored again", || cache.usage().1 == N + 2 + 10).await;
    let usage = cache.usage();
    edge.running.shutdown().await;
    drop(cache);

    // The next restart keeps all of it.
    let edge = start(dir.path(), &core, "16MiB").await;
    let cache = edge.running.core_cache.clone().unwrap();
    cache.loaded().await;
    assert_eq!(cache.usage(), usage);
    for p in ["/new/4", "/s/50", "/s/9"] {
        let (_, c, _) = fetch(&edge, p, &[]).await;
        assert_eq!(c, "HIT", "{p}");
    }
    let (_, c, got) = fetch(&edge, "/@alice", &AP).await;
    assert_eq!((c.as_str(), got.as_str()), ("HIT", "{\"type\":\"Person\"}"));
    assert_eq!(core.count("/@alice"), 2);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn eviction_to_max_size_waits_for_the_whole_index_and_keeps_what_was_stored_meanwhile() {
    let core = core().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start(dir.path(), &core, "16MiB").await;
    fill(&edge, &core).await;
    let (bytes, _) = edge.running.core_cache.as_ref().unwrap().usage();
    assert!(bytes > 64 * 1024, "twice the smaller max_size: {bytes}");
    edge.running.shutdown().await;

    let hold = fediedge::cache::hold_index_load(&dir.path().join("core-cache"));
    let edge = start(dir.path(), &core, "32KiB").await;
    let cache = edge.running.core_cache.clone().unwrap();
    for j in 0..5 {
        let (_, c, _) = fetch(&edge, &format!("/new/{j}"), &[]).await;
        assert_eq!(c, "MISS");
    }
    eventually(WAIT, "stored while loading", || cache.usage().1 == 5).await;
    drop(hold);
    cache.loaded().await;
    let (after, n) = cache.usage();
    assert!(after <= 32 * 1024, "{after} bytes over max_size");
    assert!(n > 5 && n < N, "{n} entries");
    assert_eq!(
        on_disk(dir.path()),
        (after, n),
        "the evicted ones' files are gone"
    );
    // The most recently used (stored during the load) stayed.
    for j in 0..5 {
        let (_, c, _) = fetch(&edge, &format!("/new/{j}"), &[]).await;
        assert_eq!(c, "HIT", "/new/{j}");
    }
    assert_eq!(core.count("/new/0"), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn requests_racing_the_loader_get_every_stored_response_and_agree_with_the_disk() {
    // Not an assertion on timing: any interleaving of requests and loader must pass.
    let core = core().await;
    let dir = tempfile::tempdir().unwrap();
    let edge = start(dir.path(), &core, "16MiB").await;
    fill(&edge, &core).await;
    let (bytes, _) = edge.running.core_cache.as_ref().unwrap().usage();
    edge.running.shutdown().await;
    // Many more (small: all stay under max_size), written straight into the directory: the
    // load takes a while.
    let mut headers = http::HeaderMap::new();
    headers.insert("cache-control", "public, max-age=600".parse().unwrap());
    let seeded = (0..SEEDED).map(|i| {
        let p = format!("/seed/{i}");
        let b = format!("{p} seeded").into_bytes();
        (p, b)
    });
    let seeded_bytes: u64 = seeded.clone().map(|(_, b)| b.len() as u64).sum();
    let written = fediedge::corecache::seed(&dir.path().join("core-cache"), CORE, &headers, seeded);
    assert_eq!(written.unwrap(), SEEDED);

    // Requests and the loader meet wherever they happen to: the load is held until the
    // first requests are under way, then runs while the rest come.
    let hold = fediedge::cache::hold_index_load(&dir.path().join("core-cache"));
    let edge = start(dir.path(), &core, "16MiB").await;
    let cache = edge.running.core_cache.clone().unwrap();
    let base = edge.running.addr;
    let seeds = (0..SEEDED).step_by(97).map(|i| {
        tokio::spawn(async move {
            let r = crate::common::client()
                .get(format!("http://{base}/seed/{i}"))
                .header("host", CORE)
                .send()
                .await
                .unwrap();
            let c = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
            (i, c, r.text().await.unwrap())
        })
    });
    let seeds: Vec<_> = seeds.collect();
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            tokio::spawn(async move {
                let mut r = crate::common::client()
                    .get(format!("http://{base}/s/{i}"))
                    .header("host", CORE);
                if i % 10 == 0 {
                    r = r.header("cache-control", "no-cache");
                }
                let r = r.send().await.unwrap();
                let c = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
                (i, c, r.text().await.unwrap())
            })
        })
        .collect();
    // A guard against a hang, not a timing: under a loaded run the 120 clients take a while.
    eventually(4 * WAIT, "requests under way", || {
        (0..N)
            .step_by(10)
            .filter(|i| core.count(&format!("/s/{i}")) == 2)
            .count()
            >= 3
    })
    .await;
    drop(hold);
    for t in tasks {
        let (i, c, got) = t.await.unwrap();
        let (want_c, n) = if i % 10 == 0 { ("MISS", 2) } else { ("HIT", 1) };
        assert_eq!(
            (c.as_str(), got),
            (want_c, body(&format!("/s/{i}"), n)),
            "/s/{i}"
        );
    }
    for t in seeds {
        let (i, c, got) = t.await.unwrap();
        let p = format!("/seed/{i}");
        assert_eq!((c.as_str(), got), ("HIT", format!("{p} seeded")), "{p}");
    }
    cache.loaded().await;
    let grown: u64 = (0..N)
        .step_by(10)
        .map(|i| (body(&format!("/s/{i}"), 2).len() - body(&format!("/s/{i}"), 1).len()) as u64)
        .sum();
    // Replaced, not added: as many entries, each replaced body counted once.
    eventually(WAIT, "the replacements stored", || {
        cache.usage() == (bytes + seeded_bytes + grown, N + 2 + SEEDED)
    })
    .await;
    assert_eq!(on_disk(dir.path()), cache.usage());
    for i in 0..N {
        assert_eq!(core.count(&format!("/s/{i}")), 1 + usize::from(i % 10 == 0));
    }
    edge.running.shutdown().await;
}
