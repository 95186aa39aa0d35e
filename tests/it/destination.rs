//! The ledger knows where copies went (issue 7 §2), and `serve`'s backfill is the `migrate`
//! library on the edge's own store handles (§7): the Hachyderm story of a primary that moved
//! twice, against a real Garage, real directories and a real HTTP origin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use fediedge::cli::migrate::{run_until, MigrateArgs, Report};
use fediedge::key::Key;
use fediedge::ledger::{ops, Ledger};

use crate::common::garage::Garage;
use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge};

#[derive(Parser)]
struct Cmd {
    #[command(flatten)]
    args: MigrateArgs,
}

async fn migrate(config: &Path, extra: &[&str]) -> Report {
    let mut argv = vec!["migrate", "--config", config.to_str().unwrap()];
    argv.extend_from_slice(extra);
    run_until(
        Cmd::try_parse_from(argv).unwrap().args,
        std::future::pending(),
    )
    .await
}

fn write_config(path: &Path, data_dir: &Path, primary: &str, fallback: &str) {
    std::fs::write(
        path,
        format!(
            "data_dir = \"{}\"\n[primary]\n{primary}\n[[fallback]]\nname = \"basement\"\n{fallback}\n",
            data_dir.display()
        ),
    )
    .unwrap();
}

fn write_tree(root: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let k = format!("media_attachments/files/000/{i:03}/original/{i}.png");
            let body = bytes(3000 + i * 11, i as u8);
            std::fs::create_dir_all(root.join(&k).parent().unwrap()).unwrap();
            std::fs::write(root.join(&k), &body).unwrap();
            (k, body)
        })
        .collect()
}

async fn read_all(store: &fediedge::store::StoreHandle, key: &str) -> Option<Vec<u8>> {
    let mut got = store.get(&Key::parse(key).unwrap()).await.unwrap()?;
    let mut body = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut got.body).await {
        body.extend_from_slice(&chunk.unwrap());
    }
    Some(body)
}

/// Basement NFS → one bucket → another bucket: the second move copies everything again into
/// the new bucket, the old records stay counted for the old one, and `--status` shows both.
#[tokio::test]
async fn after_the_primary_moves_to_another_bucket_migrate_copies_everything_again() {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let (basement, var) = (dir.path().join("basement"), dir.path().join("var"));
    let files = write_tree(&basement, 8);
    let config = dir.path().join("fediedge.toml");
    let fallback = format!("type = \"fs\"\nroot = \"{}\"", basement.display());
    write_config(&config, &var, &garage.store_toml(), &fallback);
    let first = migrate(&config, &["--from", "basement"]).await;
    assert_eq!((first.code, first.copied), (0, 8), "{first:?}");
    let load = || fediedge::config::load(&config).unwrap();
    let old_destination = load().primary.destination();

    // `[primary]` now points at another bucket. Without destinations the ledger said "done"
    // for every key and the new bucket stayed empty.
    write_config(&config, &var, &garage.add_bucket("hetzner"), &fallback);
    let new_destination = load().primary.destination();
    assert_ne!(old_destination, new_destination);
    let second = migrate(&config, &["--from", "basement"]).await;
    assert_eq!(
        (second.code, second.copied, second.skipped),
        (0, 8, 0),
        "{second:?}"
    );
    let bucket = fediedge::store::open(&load().primary, fediedge::metrics::Metrics::new()).unwrap();
    for (k, body) in &files {
        assert_eq!(read_all(&bucket, k).await.as_ref(), Some(body), "{k}");
    }
    let ledger = Ledger::open(&var).unwrap();
    for (k, _) in &files {
        for d in [&old_destination, &new_destination] {
            let copy = ledger.with(|c| ops::copied_to(c, k, d)).unwrap();
            assert!(copy.is_some(), "{k} not recorded for {d}");
        }
    }
    // Done for the new bucket too now.
    let third = migrate(&config, &["--from", "basement"]).await;
    assert_eq!((third.code, third.copied), (0, 0), "{third:?}");

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fediedge"))
        .args(["migrate", "--status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{stdout}");
    for d in [&old_destination, &new_destination] {
        assert!(
            stdout.contains(&format!("basement -> {d}: 8 of 8 objects")),
            "{stdout}"
        );
    }
    assert!(!stdout.contains(&garage.secret), "{stdout}");
}

fn backfill_edge_config(primary: &Path, old: &Path) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"basement\"\ntype = \"fs\"\nroot = \"{}\"\n[backfill]\nfrom = \"basement\"\nmax_ops_per_sec = 1000\n",
        primary.display(),
        old.display()
    )
}

/// `serve`'s backfill follows the primary too: restarted on a new primary, it copies again.
#[tokio::test]
async fn after_the_primary_changes_serve_backfills_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("basement");
    let files = write_tree(&old, 5);
    let (first, second): (PathBuf, PathBuf) = (dir.path().join("do"), dir.path().join("hetzner"));
    let all_in = |root: &Path| {
        files
            .iter()
            .all(|(k, b)| std::fs::read(root.join(k)).ok().as_ref() == Some(b))
    };

    let edge = start_edge(dir.path(), &backfill_edge_config(&first, &old)).await;
    let ledger = edge.running.ledger.clone();
    let recorded = |l: &Ledger| -> i64 {
        l.with(|c| c.query_row("SELECT COUNT(*) FROM copies", [], |r| r.get(0)))
            .unwrap()
    };
    eventually(
        Duration::from_secs(30),
        "the backfill into the first primary",
        || recorded(&ledger) == 5,
    )
    .await;
    assert!(all_in(&first));
    edge.running.shutdown().await;

    let edge = start_edge(dir.path(), &backfill_edge_config(&second, &old)).await;
    let ledger = edge.running.ledger.clone();
    eventually(
        Duration::from_secs(30),
        "the backfill into the second primary",
        || recorded(&ledger) == 10,
    )
    .await;
    assert!(all_in(&second));
    edge.running.shutdown().await;
}

/// The backfill takes the edge's own handle of the fallback, so its `max_concurrency` bounds
/// live misses and backfill reads together: the origin never sees more.
#[tokio::test]
async fn live_misses_and_the_backfill_share_the_fallbacks_max_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    // Every read is held at the origin until the test releases them, then takes a second
    // more, so reads let through past the limit would overlap.
    let (release, hold) = tokio::sync::watch::channel(false);
    let slow = Behaviour {
        hold: Some(hold),
        delay: Duration::from_millis(1000),
        ..Behaviour::default()
    };
    let cold: Vec<String> = (0..6).map(|i| format!("cold/{i}.png")).collect();
    for (i, k) in cold.iter().enumerate() {
        origin.put_with(k, bytes(2000, i as u8), slow.clone());
    }
    let live: Vec<String> = (0..4).map(|i| format!("live/{i}.png")).collect();
    for (i, k) in live.iter().enumerate() {
        origin.put_with(k, bytes(1000, 100 + i as u8), slow.clone());
    }
    let keys = dir.path().join("cold.txt");
    std::fs::write(&keys, cold.join("\n")).unwrap();
    let primary = dir.path().join("primary");
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"old-origin\"\ntype = \"http\"\nurl = \"{}\"\nmax_concurrency = 2\nfirst_byte_timeout = \"60s\"\n[backfill]\nfrom = \"old-origin\"\nkeys = \"{}\"\nconcurrency = 2\nmax_ops_per_sec = 1000\n",
            primary.display(),
            origin.url(),
            keys.display()
        ),
    )
    .await;
    // The backfill holds both slots of the fallback...
    eventually(
        Duration::from_secs(30),
        "two backfill reads at the origin",
        || origin.in_flight_now() == 2,
    )
    .await;
    // ...when live misses arrive: they wait for a slot instead of adding to the load.
    let requests: Vec<_> = live
        .iter()
        .map(|k| {
            let url = format!("{}{k}", edge.base);
            tokio::spawn(async move { client().get(url).send().await.unwrap().bytes().await })
        })
        .collect();
    // The live misses are at the edge (their connections open) while the origin holds the
    // backfill's two reads; then the origin lets everything go.
    eventually(
        Duration::from_secs(30),
        "the live misses at the edge",
        || edge.running.open_connections() >= live.len(),
    )
    .await;
    assert_eq!(origin.in_flight_now(), 2);
    release.send(true).unwrap();
    for (i, r) in requests.into_iter().enumerate() {
        let body = r.await.unwrap().unwrap();
        assert_eq!(body.as_ref(), bytes(1000, 100 + i as u8));
    }
    eventually(Duration::from_secs(60), "the cold tail copied", || {
        cold.iter().all(|k| primary.join(k).exists())
    })
    .await;
    assert_eq!(origin.total(), 10);
    assert_eq!(
        origin.max_in_flight(),
        2,
        "the fallback's max_concurrency is one limit for live reads and the backfill"
    );
    edge.running.shutdown().await;
}
