//! The read path under full disks and load (issue 7 §1, §5): real small filesystems (tmpfs,
//! mounted by the test; the tests run as root), a real origin, the edge in-process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge, TestEdge};
use crate::proxy::WAIT;

/// A tmpfs mounted for one test, unmounted when dropped (a panic included).
pub(crate) struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. "2m") at `dir`. Fails the test, never skips it, when
    /// mounting is not possible.
    pub(crate) fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (the disk tests need root and mount(8)): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }

    /// Fills the filesystem until a write fails: no room left.
    pub(crate) fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("fill"))
            .unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // The last bytes, in case a write went through in part.
        while f.write_all(&[0u8]).is_ok() {}
    }

    /// Remounts the filesystem read-only (`true`) or read-write.
    fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        let ok = std::process::Command::new("mount")
            .args(["-o", opt])
            .arg(&self.dir)
            .status()
            .expect("running mount")
            .success();
        assert!(ok, "cannot {opt} {}", self.dir.display());
    }

    /// Frees what [`Tmpfs::fill`] took.
    pub(crate) fn free(&self) {
        std::fs::remove_file(self.dir.join("fill")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the edge may still hold files open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

pub(crate) fn stores(dir: &Path, origin: &Origin, extra_cache: &str) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"64MiB\"\nmemory_max_size = \"0\"\n{extra_cache}[[fallback]]\nname = \"old-origin\"\ntype = \"http\"\nurl = \"{}\"\nfirst_byte_timeout = \"60s\"\n",
        dir.join("primary").display(),
        dir.join("cache").display(),
        origin.url()
    )
}

/// GETs `key`: status, `X-Cache-Status` and the body (an aborted body fails the test).
pub(crate) async fn get(edge: &TestEdge, key: &str) -> (u16, String, Vec<u8>) {
    let r = client()
        .get(format!("{}{key}", edge.base))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.bytes().await.expect("a whole body").to_vec();
    (status, cache, body)
}

/// Files under `dir`, recursively (what the cache keeps).
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// GETs `key` until the cache holds `objects` objects and the cache disk is ok again (a
/// request may still join the flight that served the disk-less one before).
async fn refetch_until_cached(edge: &TestEdge, key: &str, objects: usize) {
    let cache = edge.running.cache.clone().unwrap();
    // Polled with a deadline (a bound for failure only).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        get(edge, key).await;
        if cache.usage().1 == objects
            && metric(edge, "fediedge_disk_state{dir=\"cache\"}").as_deref() == Some("0")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{key} never cached again");
}

/// A counter's value (0 before it was first counted).
pub(crate) fn metric_count(edge: &TestEdge, name: &str) -> u64 {
    metric(edge, &format!("{name} "))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

pub(crate) fn metric(edge: &TestEdge, line_start: &str) -> Option<String> {
    edge.running
        .metrics
        .render()
        .lines()
        .find(|l| l.starts_with(line_start))
        .map(|l| l[line_start.len()..].trim().to_owned())
}

#[tokio::test]
async fn a_full_cache_disk_serves_exact_bytes_shares_fetches_and_recovers_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 1);
    origin.put("a.png", body.clone());
    let cache_fs = Tmpfs::mount(&dir.path().join("cache"), "2m");
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    cache_fs.fill();

    // Twice, exact bytes; nothing kept in the cache.
    for _ in 0..2 {
        let (status, cache, got) = get(&edge, "a.png").await;
        assert_eq!(status, 200);
        assert_ne!(cache, "HIT");
        assert!(got == body, "bytes differ from the source's");
    }
    // A herd on a full disk still shares one source fetch (the body is held in memory). The
    // origin holds the body after 50,000 bytes until every request of the herd has joined.
    let herd_body = bytes(200_000, 2);
    let (open, gate) = tokio::sync::watch::channel(false);
    origin.put_with(
        "herd.png",
        herd_body.clone(),
        Behaviour {
            pause_after: Some(50_000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let joined_before = metric_count(&edge, "fediedge_coalesced_requests_total");
    let herd: Vec<_> = (0..20)
        .map(|_| {
            let url = format!("{}herd.png", edge.base);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("a whole body").to_vec()
            })
        })
        .collect();
    eventually(
        Duration::from_secs(60),
        "the other 19 requests joined the fetch",
        || metric_count(&edge, "fediedge_coalesced_requests_total") == joined_before + 19,
    )
    .await;
    open.send(true).unwrap();
    for t in herd {
        assert!(
            t.await.unwrap() == herd_body,
            "bytes differ from the source's"
        );
    }
    assert_eq!(origin.gets("herd.png"), 1, "one source GET for the herd");
    let cache = edge.running.cache.clone().unwrap();
    assert_eq!(cache.usage(), (0, 0));
    let kept: Vec<_> = files_under(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| !p.ends_with("fill"))
        .collect();
    assert!(kept.is_empty(), "partial files left: {kept:?}");
    // Said once, however many requests saw the full disk.
    let text = client()
        .get(format!("{}/metrics", edge.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("fediedge_disk_state{dir=\"cache\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("fediedge_disk_state_changes_total{dir=\"cache\"} 1"),
        "{text}"
    );

    // Space returns: the next fetch caches again, by itself.
    cache_fs.free();
    refetch_until_cached(&edge, "a.png", 1).await;
    assert_eq!(
        metric(&edge, "fediedge_disk_state_changes_total{dir=\"cache\"}").as_deref(),
        Some("2"),
        "full, then ok: each change once"
    );
    let (_, status, got) = get(&edge, "a.png").await;
    assert_eq!(status, "HIT");
    assert!(got == body);

    // A restart on a disk that is full again: it starts, serves the cached key and fetches
    // others without caching them.
    cache_fs.fill();
    edge.running.shutdown().await;
    drop(cache);
    let edge = start_edge(dir.path(), &config).await;
    edge.running.cache.as_ref().unwrap().loaded().await;
    origin.put("b.png", bytes(100_000, 3));
    for _ in 0..2 {
        let (status, cache, got) = get(&edge, "b.png").await;
        assert_eq!(status, 200);
        assert_ne!(cache, "HIT");
        assert!(got == bytes(100_000, 3));
    }
    let (_, status, got) = get(&edge, "a.png").await;
    assert_eq!(status, "HIT");
    assert!(got == body);
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"cache\"}").as_deref(),
        Some("1")
    );
    cache_fs.free();
    refetch_until_cached(&edge, "b.png", 2).await;
    let (_, status, got) = get(&edge, "b.png").await;
    assert_eq!(status, "HIT", "caching resumed after the restart");
    assert!(got == bytes(100_000, 3));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_body_too_big_for_memory_on_a_full_disk_is_streamed_to_each_client() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 4);
    origin.put("big.png", body.clone());
    let cache_fs = Tmpfs::mount(&dir.path().join("cache"), "1m");
    let config = format!(
        "max_flight_memory = \"100KiB\"\n{}",
        stores(dir.path(), &origin, "")
    );
    let edge = start_edge(dir.path(), &config).await;
    cache_fs.fill();
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = format!("{}big.png", edge.base);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("a whole body").to_vec()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() == body);
    }
    // A range of a streamed body.
    let r = client()
        .get(format!("{}big.png", edge.base))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[1000..2000]);
    // Each requester fetched on its own (the one case where the herd cannot share); the
    // flight that found no room fetched once more.
    assert!(origin.gets("big.png") >= 4);
    assert_eq!(edge.running.cache.as_ref().unwrap().usage(), (0, 0));
    edge.running.shutdown().await;
}

/// A herd on a body streamed through (full disk, no memory for it) keeps to `max_flights`:
/// each stream is a source read that holds a slot, and requesters past the cap get 503 with
/// `Retry-After` once `flight_queue_wait` passes, not a source fetch each.
#[tokio::test]
async fn bodies_streamed_through_keep_to_max_flights() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 6);
    let (release, held) = tokio::sync::watch::channel(false);
    let (open, gate) = tokio::sync::watch::channel(false);
    let behaviour = Behaviour {
        hold: Some(held),
        pause_after: Some(150_000),
        gate: Some(gate),
        ..Behaviour::default()
    };
    origin.put_with("big.png", body.clone(), behaviour);
    let cache_fs = Tmpfs::mount(&dir.path().join("cache"), "1m");
    let config = format!(
        "max_flights = 2\nflight_queue_wait = \"200ms\"\nmax_flight_memory = \"100KiB\"\n{}",
        stores(dir.path(), &origin, "")
    );
    let edge = start_edge(dir.path(), &config).await;
    cache_fs.fill();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = format!("{}big.png", edge.base);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                let retry_after = r.headers().contains_key("retry-after");
                let status = r.status().as_u16();
                (status, retry_after, r.bytes().await.expect("a whole body"))
            })
        })
        .collect();
    // All four on one flight, whose source read is held before its headers.
    eventually(WAIT, "three requests joined the flight", || {
        metric_count(&edge, "fediedge_coalesced_requests_total") == 3
    })
    .await;
    release.send(true).unwrap();
    // The flight finds no room and ends; two streams take the two slots (held at the
    // origin mid-body), the other two wait and are refused.
    eventually(WAIT, "two requests refused", || {
        metric_count(&edge, "fediedge_overloaded_requests_total") == 2
    })
    .await;
    open.send(true).unwrap();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    answers.sort_by_key(|(status, _, _)| *status);
    let statuses: Vec<_> = answers.iter().map(|(s, r, _)| (*s, *r)).collect();
    assert_eq!(
        statuses,
        [(200, false), (200, false), (503, true), (503, true)]
    );
    for (_, _, got) in &answers[..2] {
        assert!(got[..] == body[..], "exact bytes");
    }
    assert_eq!(
        origin.gets("big.png"),
        3,
        "the flight's read and two streams"
    );
    assert_eq!(edge.running.cache.as_ref().unwrap().usage(), (0, 0));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_full_data_dir_serves_the_client_and_retries_the_copy_when_it_can_be_staged() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(200_000, 5);
    origin.put("c.png", body.clone());
    let staging = Tmpfs::mount(&dir.path().join("var/staging"), "1m");
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    staging.fill();
    let (status, cache, got) = get(&edge, "c.png").await;
    assert_eq!((status, cache.as_str()), (200, "FALLBACK"));
    assert!(got == body);
    eventually(Duration::from_secs(10), "the data_dir marked full", || {
        metric(&edge, "fediedge_disk_state{dir=\"data_dir\"}").as_deref() == Some("1")
    })
    .await;
    // Nothing partial staged; not cached either, so that the next request fetches again and
    // retries the copy.
    let staged: Vec<_> = files_under(&dir.path().join("var/staging"))
        .into_iter()
        .filter(|p| !p.ends_with("fill"))
        .collect();
    assert!(staged.is_empty(), "partial files left: {staged:?}");
    assert_eq!(edge.running.cache.as_ref().unwrap().usage(), (0, 0));
    assert!(!dir.path().join("primary/c.png").exists());

    staging.free();
    let (status, cache, got) = get(&edge, "c.png").await;
    assert_eq!((status, cache.as_str()), (200, "FALLBACK"));
    assert!(got == body);
    let copied = dir.path().join("primary/c.png");
    eventually(Duration::from_secs(10), "the copy in the primary", || {
        copied.exists()
    })
    .await;
    assert!(std::fs::read(&copied).unwrap() == body);
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"data_dir\"}").as_deref(),
        Some("0")
    );
    assert_eq!(origin.gets("c.png"), 2);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn after_a_restart_fifty_clients_cause_one_md5_check() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(500_000, 9);
    origin.put("v.png", body.clone());
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    get(&edge, "v.png").await;
    let cache = edge.running.cache.clone().unwrap();
    eventually(Duration::from_secs(10), "cached", || cache.usage().1 == 1).await;
    edge.running.shutdown().await;
    drop(cache);

    let edge = start_edge(dir.path(), &config).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = format!("{}v.png", edge.base);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                let status = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
                (status, r.bytes().await.unwrap().to_vec())
            })
        })
        .collect();
    for t in tasks {
        let (status, got) = t.await.unwrap();
        assert_eq!(status, "HIT");
        assert!(got == body);
    }
    assert_eq!(
        metric(&edge, "fediedge_cache_verifications_total").as_deref(),
        Some("1")
    );
    assert_eq!(origin.gets("v.png"), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_restart_answers_while_the_cache_index_is_still_loading() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    for (k, seed) in [("x.png", 10), ("y.png", 11)] {
        origin.put(k, bytes(100_000, seed));
    }
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    get(&edge, "x.png").await;
    get(&edge, "y.png").await;
    let cache = edge.running.cache.clone().unwrap();
    eventually(Duration::from_secs(10), "both cached", || {
        cache.usage().1 == 2
    })
    .await;
    edge.running.shutdown().await;
    drop(cache);

    // The index load is held back: the edge must answer anyway.
    let hold = fediedge::cache::hold_index_load(&dir.path().join("cache"));
    let edge = start_edge(dir.path(), &config).await;
    assert_eq!(
        metric(&edge, "fediedge_cache_index_loading").as_deref(),
        Some("1")
    );
    let (status, cache_status, got) = get(&edge, "x.png").await;
    assert_eq!((status, cache_status.as_str()), (200, "HIT"));
    assert!(got == bytes(100_000, 10));
    origin.put("z.png", bytes(1000, 12));
    let (status, _, got) = get(&edge, "z.png").await;
    assert_eq!(status, 200);
    assert!(got == bytes(1000, 12));
    let cache = edge.running.cache.clone().unwrap();
    assert!(cache.is_loading());
    assert_eq!(origin.gets("x.png"), 1, "found by its files, not refetched");

    drop(hold);
    cache.loaded().await;
    assert_eq!(
        metric(&edge, "fediedge_cache_index_loading").as_deref(),
        Some("0")
    );
    eventually(Duration::from_secs(10), "all three indexed", || {
        cache.usage().1 == 3
    })
    .await;
    let (_, cache_status, _) = get(&edge, "y.png").await;
    assert_eq!(cache_status, "HIT");
    assert_eq!(origin.gets("y.png"), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn the_last_byte_goes_out_when_verified_not_after_the_copy_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(200_000, 13);
    origin.put("w.png", body.clone());
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    // Hold the ledger: queueing the copy for the primary blocks until it is released.
    let ledger = edge.running.ledger.clone();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        ledger.with(|_| {
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        })
    });
    locked_rx.recv().unwrap();
    // A safety bound only: a response held until the copy is queued would never end.
    let answered = tokio::time::timeout(Duration::from_secs(60), get(&edge, "w.png")).await;
    let (status, cache_status, got) =
        answered.expect("the response waited for the write-back bookkeeping");
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(got == body);
    assert!(!dir.path().join("primary/w.png").exists());
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let copied = dir.path().join("primary/w.png");
    eventually(Duration::from_secs(10), "the copy in the primary", || {
        copied.exists()
    })
    .await;
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_read_only_cache_disk_serves_exact_bytes_and_caching_resumes_when_writable() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(150_000, 14);
    origin.put("r.png", body.clone());
    let cache_fs = Tmpfs::mount(&dir.path().join("cache"), "2m");
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    cache_fs.read_only(true);
    for _ in 0..2 {
        let (status, cache, got) = get(&edge, "r.png").await;
        assert_eq!(status, 200);
        assert_ne!(cache, "HIT");
        assert!(got == body);
    }
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"cache\"}").as_deref(),
        Some("2"),
        "read-only"
    );
    cache_fs.read_only(false);
    refetch_until_cached(&edge, "r.png", 1).await;
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"cache\"}").as_deref(),
        Some("0")
    );
    let (_, status, got) = get(&edge, "r.png").await;
    assert_eq!(status, "HIT");
    assert!(got == body);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_cache_disk_that_fills_during_a_miss_serves_exact_bytes_and_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 15);
    // The origin sends the first 100,000 bytes, then holds the rest until the test has
    // filled the disk.
    let (open, gate) = tokio::sync::watch::channel(false);
    origin.put_with(
        "f.png",
        body.clone(),
        Behaviour {
            pause_after: Some(100_000),
            gate: Some(gate),
            ..Behaviour::default()
        },
    );
    let cache_fs = Tmpfs::mount(&dir.path().join("cache"), "2m");
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;
    let first = tokio::spawn({
        let url = format!("{}f.png", edge.base);
        async move {
            let r = client().get(url).send().await.unwrap();
            let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
            (r.status(), cache, r.bytes().await.expect("a whole body"))
        }
    });
    // The miss has its temp file (its room reserved when it started) and is under way.
    let tmp = dir.path().join("cache/tmp");
    eventually(Duration::from_secs(30), "the miss's temp file", || {
        origin.gets("f.png") == 1 && files_under(&tmp).len() == 1
    })
    .await;
    // Now the disk fills: the rest of the miss (the body's record in the cache) finds no room.
    cache_fs.fill();
    open.send(true).unwrap();
    let (status, cache_status, got) = first.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(cache_status, "FALLBACK");
    assert!(got == body, "bytes differ from the source's");
    eventually(Duration::from_secs(30), "the fetch ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;
    // Nothing partial kept: no temp file, no body without its record, nothing indexed.
    let cache = edge.running.cache.clone().unwrap();
    assert_eq!(cache.usage(), (0, 0));
    let kept: Vec<_> = files_under(&dir.path().join("cache"))
        .into_iter()
        .filter(|p| !p.ends_with("fill"))
        .collect();
    assert!(kept.is_empty(), "partial files left: {kept:?}");
    assert_eq!(
        metric(&edge, "fediedge_disk_state{dir=\"cache\"}").as_deref(),
        Some("1"),
        "full"
    );
    // The copy for the primary was staged in data_dir (another disk) all the same.
    let copied = dir.path().join("primary/f.png");
    eventually(Duration::from_secs(30), "the copy in the primary", || {
        copied.exists()
    })
    .await;
    assert!(std::fs::read(&copied).unwrap() == body);
    // A later request is served right: from the primary now, exact bytes.
    let (status, _, got) = get(&edge, "f.png").await;
    assert_eq!(status, 200);
    assert!(got == body);
    // Space returns: it is cached again, by itself, and served from the cache.
    cache_fs.free();
    refetch_until_cached(&edge, "f.png", 1).await;
    let (_, cache_status, got) = get(&edge, "f.png").await;
    assert_eq!(cache_status, "HIT");
    assert!(got == body);
    edge.running.shutdown().await;
}
