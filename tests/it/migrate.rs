//! `fediedge migrate` (issue 3) against a real directory, a real HTTP origin and a real Garage.
//! Loads are counted at the source: the origin's request counters and in-flight gauge.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use fediedge::cli::migrate::{run_until, MigrateArgs, Report};
use fediedge::key::Key;
use fediedge::ledger::{ops, Ledger};
use fediedge::migrate;

use crate::common::garage::Garage;
use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, eventually};

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: MigrateArgs,
}

/// A temp dir with a config: `data_dir` inside it, the given primary, one fallback `old`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(primary: &str, fallback: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("fediedge.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\n[primary]\n{primary}\n[[fallback]]\nname = \"old\"\n{fallback}\n",
                dir.path().join("var").display()
            ),
        )
        .unwrap();
        Setup { dir, config }
    }

    /// fs primary at `<dir>/new`, fs fallback at `<dir>/old`.
    fn fs_to_fs() -> Setup {
        let base = tempfile::tempdir().unwrap();
        let (old, new) = (base.path().join("old"), base.path().join("new"));
        let _ = base.keep();
        Setup::new(
            &format!("type = \"fs\"\nroot = \"{}\"", new.display()),
            &format!("type = \"fs\"\nroot = \"{}\"", old.display()),
        )
    }

    /// fs primary at `new`, the http `origin` as fallback.
    fn http_to_fs(origin: &Origin, new: &Path) -> Setup {
        Setup::new(
            &format!("type = \"fs\"\nroot = \"{}\"", new.display()),
            &format!("type = \"http\"\nurl = \"{}\"", origin.url()),
        )
    }

    fn root(&self, which: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let config = fediedge::config::from_str(&text, Path::new("t.toml")).unwrap();
        let store = if which == "primary" {
            &config.primary
        } else {
            &config.fallbacks[0]
        };
        match &store.kind {
            fediedge::config::StoreKind::Fs { root } => root.clone(),
            _ => panic!("not an fs store"),
        }
    }

    fn args(&self, extra: &[&str]) -> MigrateArgs {
        let config = self.config.to_str().unwrap();
        let mut argv = vec!["migrate", "--config", config, "--from", "old"];
        argv.extend_from_slice(extra);
        Cmd::try_parse_from(argv).unwrap().args
    }

    async fn run(&self, extra: &[&str]) -> Report {
        run_until(self.args(extra), std::future::pending()).await
    }

    fn ledger(&self) -> Ledger {
        Ledger::open(&self.dir.path().join("var")).unwrap()
    }

    /// The primary's identity, as the ledger records it.
    fn destination(&self) -> String {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let config = fediedge::config::from_str(&text, Path::new("t.toml")).unwrap();
        config.primary.destination()
    }

    fn route(&self) -> migrate::Route {
        migrate::Route {
            source: "old".into(),
            destination: self.destination(),
        }
    }

    fn keys_file(&self, lines: &[&str]) -> String {
        let path = self.dir.path().join("keys.txt");
        std::fs::write(&path, lines.join("\n")).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

/// A Mastodon-like key.
fn key(i: usize) -> String {
    match i % 3 {
        0 => format!(
            "media_attachments/files/109/348/502/375/{:03}/{:03}/original/{i:08x}.png",
            i / 100,
            i % 100
        ),
        1 => format!(
            "media_attachments/files/109/348/502/375/{:03}/{:03}/small/{i:08x}.jpg",
            i / 100,
            i % 100
        ),
        _ => format!("accounts/avatars/000/000/{i:03}/original/{i:08x}.gif"),
    }
}

fn write_files(root: &Path, n: usize, size: impl Fn(usize) -> usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let k = key(i);
            let body = bytes(size(i), i as u8);
            let path = root.join(&k);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &body).unwrap();
            (k, body)
        })
        .collect()
}

#[tokio::test]
async fn fs_to_fs_copies_everything_records_it_and_a_rerun_has_nothing_to_do() {
    let s = Setup::fs_to_fs();
    let files = write_files(&s.root("old"), 25, |i| 1000 + i * 977);
    let report = s.run(&["--concurrency", "3"]).await;
    assert_eq!(report.code, 0, "{report:?}");
    assert_eq!((report.copied, report.skipped, report.failed), (25, 0, 0));
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(report.bytes, total as u64);
    let new = s.root("primary");
    let ledger = s.ledger();
    for (k, body) in &files {
        assert_eq!(&std::fs::read(new.join(k)).unwrap(), body, "{k}");
        let copy = ledger.with(|c| ops::copied(c, k)).unwrap().unwrap();
        assert_eq!(
            (copy.via.as_str(), copy.source.as_str()),
            ("migrate", "old")
        );
        assert_eq!(
            copy.md5,
            hex::encode(<md5::Md5 as md5::Digest>::digest(body))
        );
    }
    let p = ledger
        .with(|c| migrate::progress(c, &s.destination()))
        .unwrap()
        .unwrap();
    assert_eq!((p.objects_done, p.objects_total, p.failed), (25, 25, 0));
    assert_eq!((p.bytes_done, p.bytes_total), (total as u64, total as u64));
    // No temp file is left behind.
    let tmp = s.dir.path().join("var/tmp-migrate");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);

    // A new object in the source: only it is copied.
    let extra = "media_attachments/files/999/original/late.png";
    std::fs::create_dir_all(s.root("old").join("media_attachments/files/999/original")).unwrap();
    std::fs::write(s.root("old").join(extra), b"late").unwrap();
    let report = s.run(&[]).await;
    assert_eq!((report.code, report.copied, report.skipped), (0, 1, 0));
    assert_eq!(std::fs::read(new.join(extra)).unwrap(), b"late");
}

#[tokio::test]
async fn fs_to_garage_copies_with_content_type_and_md5_etag() {
    let garage = Garage::start();
    let base = tempfile::tempdir().unwrap();
    let old = base.path().join("old");
    let s = Setup::new(
        &garage.store_toml(),
        &format!("type = \"fs\"\nroot = \"{}\"", old.display()),
    );
    // Mostly small files and one of 3 MB.
    let files = write_files(
        &old,
        12,
        |i| if i == 5 { 3_000_000 } else { 20_000 + i * 3000 },
    );
    let report = s.run(&["--concurrency", "4"]).await;
    assert_eq!(
        (report.code, report.copied, report.failed),
        (0, 12, 0),
        "{report:?}"
    );

    let text = std::fs::read_to_string(&s.config).unwrap();
    let config = fediedge::config::from_str(&text, Path::new("t.toml")).unwrap();
    let bucket = fediedge::store::open(&config.primary, fediedge::metrics::Metrics::new()).unwrap();
    for (k, body) in &files {
        let meta = bucket.head(&Key::parse(k).unwrap()).await.unwrap().unwrap();
        assert_eq!(meta.size, body.len() as u64, "{k}");
        assert_eq!(
            meta.md5.map(hex::encode),
            Some(hex::encode(<md5::Md5 as md5::Digest>::digest(body))),
            "{k}"
        );
        let want = if k.ends_with(".png") {
            "image/png"
        } else if k.ends_with(".jpg") {
            "image/jpeg"
        } else {
            "image/gif"
        };
        assert_eq!(meta.content_type.as_deref(), Some(want));
    }
    // Verify against the source: sizes (a directory gives no MD5), then whole bodies.
    let v = s.run(&["--verify-deep"]).await;
    assert_eq!((v.code, v.checked, v.differences), (0, 12, 0), "{v:?}");
}

#[tokio::test]
async fn http_origin_with_a_key_file_into_fs() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let s = Setup::http_to_fs(&origin, &base.path().join("new"));
    let keys: Vec<String> = (0..6).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        origin.put(k, bytes(5000 + i, i as u8));
    }
    // Without a key file an http store is a usage error.
    let report = s.run(&[]).await;
    assert_eq!(report.code, 2);
    let lines = [
        "# find public/system -type f on the old host",
        &format!("public/system/{}", keys[0]),
        &format!("./{}", keys[1]),
        &format!("/{}", keys[2]),
        "",
        &keys[3],
        &format!("/home/mastodon/live/public/system/{}", keys[4]),
        &keys[5],
        "media_attachments/../../etc/passwd",
    ];
    let file = s.keys_file(&lines);
    let report = s.run(&["--keys", &file]).await;
    assert_eq!(
        (report.code, report.copied, report.failed),
        (0, 6, 0),
        "{report:?}"
    );
    for (i, k) in keys.iter().enumerate() {
        let got = std::fs::read(base.path().join("new").join(k)).unwrap();
        assert_eq!(got, bytes(5000 + i, i as u8));
        assert_eq!(origin.gets(k), 1);
    }
    // Everything is recorded: a rerun reads nothing again.
    let before = origin.total();
    let report = s.run(&["--keys", &file]).await;
    assert_eq!((report.code, report.copied), (0, 0));
    assert_eq!(origin.total(), before);
}

#[tokio::test]
async fn objects_in_the_primary_or_in_the_ledger_are_skipped_without_reading_the_source() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let new = base.path().join("new");
    let s = Setup::http_to_fs(&origin, &new);
    let (present, ledgered, stale, fresh) = (key(0), key(1), key(2), key(3));
    for (i, k) in [&present, &ledgered, &stale, &fresh].iter().enumerate() {
        origin.put(k, bytes(4000, i as u8));
    }
    // Already in the primary, same size.
    std::fs::create_dir_all(new.join(&present).parent().unwrap()).unwrap();
    std::fs::write(new.join(&present), bytes(4000, 0)).unwrap();
    // A partial object of an old copy: different size, so copied again.
    std::fs::create_dir_all(new.join(&stale).parent().unwrap()).unwrap();
    std::fs::write(new.join(&stale), b"partial").unwrap();
    // Copied by the edge (pull-through) already.
    s.ledger()
        .with(|c| {
            ops::record(
                c,
                &fediedge::ledger::Copy {
                    key: ledgered.clone(),
                    destination: s.destination(),
                    size: 4000,
                    md5: "00".into(),
                    source: "old".into(),
                    via: "pull-through".into(),
                    copied_at: 0,
                },
            )
        })
        .unwrap();
    let file = s.keys_file(&[&present, &ledgered, &stale, &fresh]);
    let report = s.run(&["--keys", &file]).await;
    assert_eq!(
        (report.code, report.copied, report.skipped),
        (0, 2, 2),
        "{report:?}"
    );
    assert_eq!(
        origin.gets(&present),
        0,
        "present in the primary: body not read"
    );
    assert_eq!(origin.gets(&ledgered), 0, "in the ledger: not even asked");
    assert_eq!(origin.gets(&stale), 1);
    assert_eq!(origin.gets(&fresh), 1);
    assert_eq!(std::fs::read(new.join(&stale)).unwrap(), bytes(4000, 2));
}

#[tokio::test]
async fn an_interrupted_run_resumes_without_reading_copied_objects_again() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let new = base.path().join("new");
    let s = Setup::http_to_fs(&origin, &new);
    let keys: Vec<String> = (0..30).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        origin.put(k, bytes(20_000, i as u8));
    }
    let file = s.keys_file(&keys.iter().map(String::as_str).collect::<Vec<_>>());
    // 10 requests/s, stopped once 3 copies are recorded (not on a timer: a loaded machine
    // must not make it copy nothing or everything).
    let watch = s.ledger();
    let stop = async move {
        loop {
            let copies: i64 = watch
                .with(|c| c.query_row("SELECT COUNT(*) FROM copies", [], |r| r.get(0)))
                .unwrap();
            if copies >= 3 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let args = s.args(&["--keys", &file, "--max-ops-per-sec", "10"]);
    let first = run_until(args, stop).await;
    assert!(first.interrupted, "{first:?}");
    assert_eq!(first.code, 130);
    assert!(first.copied > 0 && first.copied < 30, "{first:?}");
    let ledger = s.ledger();
    let copied: Vec<&String> = keys
        .iter()
        .filter(|k| ledger.with(|c| ops::copied(c, k)).unwrap().is_some())
        .collect();
    assert_eq!(copied.len() as u64, first.copied);
    // Nothing partial was written: every key in the primary is whole and recorded.
    for (i, k) in keys.iter().enumerate() {
        if let Ok(got) = std::fs::read(new.join(k)) {
            assert_eq!(got, bytes(20_000, i as u8));
            assert!(copied.contains(&k));
        }
    }
    let status = run_until(s.args(&["--status"]), std::future::pending()).await;
    assert_eq!(status.code, 0);

    let second = s.run(&["--keys", &file]).await;
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(first.copied + second.copied, 30);
    for k in &copied {
        assert_eq!(origin.gets(k), 1, "{k} was read again");
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(std::fs::read(new.join(k)).unwrap(), bytes(20_000, i as u8));
    }
}

#[tokio::test]
async fn a_truncated_object_is_not_written_is_retried_and_recorded_failed() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let new = base.path().join("new");
    let s = Setup::http_to_fs(&origin, &new);
    let (good, bad) = (key(0), key(1));
    origin.put(&good, bytes(10_000, 1));
    origin.put_with(
        &bad,
        bytes(10_000, 2),
        Behaviour {
            pause_after: Some(4000),
            truncate: true,
            ..Behaviour::default()
        },
    );
    let file = s.keys_file(&[&good, &bad]);
    let report = s
        .run(&["--keys", &file, "--retries", "2", "--retry-delay", "50ms"])
        .await;
    assert_eq!(
        (report.code, report.copied, report.failed),
        (1, 1, 1),
        "{report:?}"
    );
    assert_eq!(origin.gets(&bad), 3, "one attempt and two retries");
    assert!(
        !new.join(&bad).exists(),
        "a truncated body is never written"
    );
    assert!(s.ledger().with(|c| ops::copied(c, &bad)).unwrap().is_none());
    let failures = s
        .ledger()
        .with(|c| migrate::state::failures(c, &s.route(), 10))
        .unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!((failures[0].0.as_str(), failures[0].1), (bad.as_str(), 3));
    assert!(!failures[0].2.is_empty());
    let p = s
        .ledger()
        .with(|c| migrate::progress(c, &s.destination()))
        .unwrap()
        .unwrap();
    assert_eq!((p.objects_done, p.objects_total, p.failed), (1, 2, 1));

    // Repaired at the source: the rerun takes only the failed key.
    origin.put(&bad, bytes(10_000, 2));
    let report = s.run(&["--keys", &file]).await;
    assert_eq!((report.code, report.copied, report.failed), (0, 1, 0));
    assert_eq!(origin.gets(&good), 1);
    assert_eq!(std::fs::read(new.join(&bad)).unwrap(), bytes(10_000, 2));
}

#[tokio::test]
async fn max_ops_per_sec_is_what_the_source_sees() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let s = Setup::http_to_fs(&origin, &base.path().join("new"));
    let keys: Vec<String> = (0..40).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        origin.put(k, bytes(1000, i as u8));
    }
    let file = s.keys_file(&keys.iter().map(String::as_str).collect::<Vec<_>>());
    let report = run_until(
        s.args(&[
            "--keys",
            &file,
            "--max-ops-per-sec",
            "20",
            "--concurrency",
            "8",
        ]),
        std::future::pending(),
    )
    .await;
    assert_eq!((report.code, report.copied), (0, 40), "{report:?}");
    assert_eq!(origin.total(), 40);
    assert_within_rate(&origin.arrivals(), 20.0);
}

/// The budget seen at the origin: at `rate` requests per second with a burst of one, at most
/// `1 + rate·Δt` requests are let out in any Δt, so at most `2 + rate·Δt` arrive between any
/// two arrivals (one more: a request let out just before the window but read by the origin
/// within it; the origin runs on the test's runtime, so it reads a request within a round of
/// the scheduler). A slow machine only delays requests and spreads them out; a budget that
/// lets a burst through, or runs faster than `rate`, fails this.
fn assert_within_rate(arrivals: &[Instant], rate: f64) {
    for i in 0..arrivals.len() {
        for j in i + 1..arrivals.len() {
            let span = arrivals[j].duration_since(arrivals[i]).as_secs_f64();
            let seen = (j - i + 1) as f64;
            assert!(
                seen <= 2.0 + rate * span,
                "{seen} requests arrived within {span:.3} s (arrivals {i}..={j} of {})",
                arrivals.len()
            );
        }
    }
}

#[tokio::test]
async fn concurrency_bounds_requests_in_flight_at_the_source() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let s = Setup::http_to_fs(&origin, &base.path().join("new"));
    let keys: Vec<String> = (0..10).map(key).collect();
    // Every request is held at the origin until two are there at once (an event: the origin's
    // own count), then each still takes 150 ms, so a third one let through would overlap.
    let (release, hold) = tokio::sync::watch::channel(false);
    for (i, k) in keys.iter().enumerate() {
        let slow = Behaviour {
            hold: Some(hold.clone()),
            delay: Duration::from_millis(150),
            ..Behaviour::default()
        };
        origin.put_with(k, bytes(2000, i as u8), slow);
    }
    let file = s.keys_file(&keys.iter().map(String::as_str).collect::<Vec<_>>());
    let run = tokio::spawn(run_until(
        s.args(&["--keys", &file, "--concurrency", "2"]),
        std::future::pending(),
    ));
    eventually(
        Duration::from_secs(60),
        "two requests at the origin",
        || origin.in_flight_now() == 2,
    )
    .await;
    release.send(true).unwrap();
    let report = run.await.unwrap();
    assert_eq!((report.code, report.copied), (0, 10), "{report:?}");
    assert_eq!(origin.max_in_flight(), 2, "two at once, never more");
}

#[tokio::test]
async fn max_bytes_per_sec_paces_the_reads() {
    let origin = Origin::start().await;
    let base = tempfile::tempdir().unwrap();
    let s = Setup::http_to_fs(&origin, &base.path().join("new"));
    let keys: Vec<String> = (0..5).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        origin.put(k, bytes(100 * 1024, i as u8));
    }
    let file = s.keys_file(&keys.iter().map(String::as_str).collect::<Vec<_>>());
    let started = Instant::now();
    let report = s
        .run(&["--keys", &file, "--max-bytes-per-sec", "250KiB"])
        .await;
    assert_eq!((report.code, report.copied), (0, 5));
    // 500 KiB at 250 KiB/s, after a burst of 25 KiB.
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn verify_reports_a_planted_difference() {
    let s = Setup::fs_to_fs();
    let files = write_files(&s.root("old"), 6, |i| 3000 + i);
    assert_eq!(s.run(&[]).await.code, 0);
    let v = s.run(&["--verify"]).await;
    assert_eq!((v.code, v.checked, v.differences), (0, 6, 0), "{v:?}");
    let new = s.root("primary");
    // One object cut short, one with the same size but other bytes.
    std::fs::write(new.join(&files[1].0), b"short").unwrap();
    std::fs::write(new.join(&files[2].0), bytes(files[2].1.len(), 99)).unwrap();
    let v = s.run(&["--verify"]).await;
    assert_eq!((v.code, v.differences), (1, 1), "sizes only: {v:?}");
    let v = s.run(&["--verify-deep"]).await;
    assert_eq!((v.code, v.differences), (1, 2), "bodies compared: {v:?}");
}

#[test]
fn the_binary_migrates_reports_status_and_refuses_bad_usage() {
    let s = Setup::fs_to_fs();
    write_files(&s.root("old"), 7, |_| 1234);
    let bin = env!("CARGO_BIN_EXE_fediedge");
    let config = s.config.to_str().unwrap();
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).output().unwrap();
    let out = run(&["migrate", "--config", config, "--status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no migration recorded"));

    let out = run(&[
        "migrate",
        "--config",
        config,
        "--from",
        "old",
        "--concurrency",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("copied 7"), "{stdout}");

    let out = run(&["migrate", "--config", config, "--status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout.contains(&format!(
            "old -> {}: 7 of 7 objects, 8638 of 8638 bytes",
            s.destination()
        )) && stdout.contains("0 failed"),
        "{stdout}"
    );

    let out = run(&["migrate", "--config", config, "--from", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["migrate", "--config", config, "--from", "primary"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["migrate", "--config", "/nonexistent.toml", "--from", "old"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["migrate", "--config", config]);
    assert_eq!(out.status.code(), Some(2), "--from is required");
}

/// An old bucket → a new bucket: the listing's ETags are MD5s, so an object of the same size
/// but other content in the primary is replaced, while an identical one is skipped.
#[tokio::test]
async fn s3_to_s3_skips_by_size_and_md5_from_the_listing() {
    let garage = Garage::start();
    let old = garage.add_bucket("old-media");
    let s = Setup::new(&garage.store_toml(), &old);
    let text = std::fs::read_to_string(&s.config).unwrap();
    let config = fediedge::config::from_str(&text, Path::new("t.toml")).unwrap();
    let metrics = fediedge::metrics::Metrics::new();
    let primary = fediedge::store::open(&config.primary, metrics.clone()).unwrap();
    let source = fediedge::store::open(&config.fallbacks[0], metrics).unwrap();
    let put = |store: &fediedge::store::StoreHandle, k: &str, body: Vec<u8>| {
        let (store, k) = (store.clone(), Key::parse(k).unwrap());
        async move {
            let meta = fediedge::store::ObjectMeta {
                size: body.len() as u64,
                ..Default::default()
            };
            store.put_bytes(&k, body.into(), &meta).await.unwrap();
        }
    };
    put(&source, "a/same.png", bytes(5000, 1)).await;
    put(&primary, "a/same.png", bytes(5000, 1)).await;
    put(&source, "a/changed.png", bytes(5000, 2)).await;
    put(&primary, "a/changed.png", bytes(5000, 3)).await; // same size, other bytes
    let report = s.run(&[]).await;
    assert_eq!(
        (report.code, report.copied, report.skipped),
        (0, 1, 1),
        "{report:?}"
    );
    let mut got = primary
        .get(&Key::parse("a/changed.png").unwrap())
        .await
        .unwrap()
        .unwrap();
    let mut body = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut got.body).await {
        body.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(body, bytes(5000, 2));
}
