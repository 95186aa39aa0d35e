//! The ledger's state against real parts (issue 7 §2, §4): old ledgers upgraded in place,
//! write-back rows never left claimed, one `serve` per data_dir, whole fs puts.

use std::path::Path;
use std::time::Duration;

use fediedge::ledger::{ops, schema, Ledger};

use crate::common::origin::Origin;
use crate::common::{bytes, client, eventually, start_edge};

/// `[primary]` on `root`, the origin as fallback `old-origin`.
fn fs_primary_http_fallback(root: &Path, origin: &Origin) -> String {
    format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[[fallback]]\nname = \"old-origin\"\ntype = \"http\"\nurl = \"{}\"\n",
        root.display(),
        origin.url()
    )
}

/// The tables as the first fediedge wrote them (schema version 0), with rows.
fn write_old_ledger(data_dir: &Path, staged: &Path) {
    std::fs::create_dir_all(data_dir).unwrap();
    let conn = rusqlite::Connection::open(data_dir.join("ledger.sqlite")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         CREATE TABLE writeback_queue (
             key TEXT PRIMARY KEY, staged TEXT NOT NULL, size INTEGER NOT NULL,
             md5 TEXT NOT NULL, content_type TEXT, source TEXT NOT NULL,
             queued_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
             next_attempt_at INTEGER NOT NULL DEFAULT 0, claimed INTEGER NOT NULL DEFAULT 0,
             last_error TEXT);
         CREATE TABLE copies (
             key TEXT PRIMARY KEY, size INTEGER NOT NULL, md5 TEXT NOT NULL,
             source TEXT NOT NULL, via TEXT NOT NULL, copied_at INTEGER NOT NULL);
         CREATE TABLE migration_sources (
             source TEXT PRIMARY KEY, started_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
             cursor TEXT, listing_done INTEGER NOT NULL DEFAULT 0);
         CREATE TABLE migration_objects (
             id INTEGER PRIMARY KEY, source TEXT NOT NULL, key TEXT NOT NULL, size INTEGER,
             md5 TEXT, status TEXT NOT NULL DEFAULT 'pending',
             attempts INTEGER NOT NULL DEFAULT 0, reason TEXT, updated_at INTEGER NOT NULL,
             UNIQUE (source, key));
         CREATE INDEX migration_objects_status ON migration_objects (source, status, id);
         INSERT INTO copies VALUES ('a/old.png', 3, 'aa', 'old-origin', 'pull-through', 100);
         INSERT INTO copies VALUES ('a/migrated.png', 5, 'bb', 'old-origin', 'migrate', 101);
         INSERT INTO migration_sources VALUES ('old-origin', 90, 101, NULL, 1);
         INSERT INTO migration_objects VALUES (7, 'old-origin', 'a/migrated.png', 5, NULL,
             'copied', 0, NULL, 101);
         INSERT INTO migration_objects VALUES (9, 'old-origin', 'a/todo.png', 4, NULL,
             'pending', 0, NULL, 101);",
    )
    .unwrap();
    // A copy claimed by a process that died: the old flag says claimed.
    conn.execute(
        "INSERT INTO writeback_queue (key, staged, size, md5, source, queued_at, claimed)
         VALUES ('a/queued.png', ?1, 6, ?2, 'old-origin', 100, 1)",
        rusqlite::params![
            staged.to_str().unwrap(),
            hex::encode(<md5::Md5 as md5::Digest>::digest(b"queued"))
        ],
    )
    .unwrap();
}

#[tokio::test]
async fn an_old_ledger_is_upgraded_in_place_and_its_records_attributed_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let var = dir.path().join("var");
    let staged = var.join("staging/wb-old");
    std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
    std::fs::write(&staged, b"queued").unwrap();
    write_old_ledger(&var, &staged);

    // Opened without a primary (a tool): upgraded, every row kept, none attributed yet.
    let ledger = Ledger::open(&var).unwrap();
    let version: i64 = ledger
        .with(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(version, schema::VERSION);
    let old = ledger
        .with(|c| ops::copied(c, "a/old.png"))
        .unwrap()
        .unwrap();
    assert_eq!(
        (old.destination.as_str(), old.size, old.via.as_str()),
        (schema::UNATTRIBUTED, 3, "pull-through")
    );
    drop(ledger);

    // The first serve after the upgrade: the old records are its primary's.
    let origin = Origin::start().await;
    let primary = dir.path().join("primary");
    let edge = start_edge(dir.path(), &fs_primary_http_fallback(&primary, &origin)).await;
    let ledger = edge.running.ledger.clone();
    // The queued copy of the old ledger (claimed by a dead process) goes into the primary.
    eventually(Duration::from_secs(20), "the old queue drained", || {
        ledger.with(ops::pending).unwrap() == 0
    })
    .await;
    assert_eq!(
        std::fs::read(primary.join("a/queued.png")).unwrap(),
        b"queued"
    );
    let destination = format!("fs:{}", primary.canonicalize().unwrap().display());
    for key in ["a/old.png", "a/migrated.png", "a/queued.png"] {
        let copy = ledger
            .with(|c| ops::copied_to(c, key, &destination))
            .unwrap();
        assert!(copy.is_some(), "{key} is not recorded for {destination}");
    }
    let ids: Vec<(i64, String, String)> = ledger
        .with(|c| {
            let mut s = c
                .prepare("SELECT id, key, destination FROM migration_objects ORDER BY id")
                .unwrap();
            let rows = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap();
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .unwrap();
    assert_eq!(
        ids,
        vec![
            (7, "a/migrated.png".into(), destination.clone()),
            (9, "a/todo.png".into(), destination.clone())
        ],
        "listing order kept"
    );
    let notes: i64 = ledger
        .with(|c| c.query_row("SELECT COUNT(*) FROM ledger_notes", [], |r| r.get(0)))
        .unwrap();
    assert_eq!(notes, 0, "attributed once; later opens have nothing to do");
    let states = ledger.with(fediedge::migrate::state::sources).unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].route.destination, destination);
    assert_eq!(
        (
            states[0].progress.objects_done,
            states[0].progress.objects_total
        ),
        (1, 2)
    );
    edge.running.shutdown().await;

    // Opening again changes nothing.
    let again = Ledger::open_for(&var, "fs:/elsewhere").unwrap();
    let n: i64 = again
        .with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM copies WHERE destination = ?1",
                [&destination],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(n, 3);
}

#[tokio::test]
async fn a_newer_ledger_is_refused_not_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("ledger.sqlite")).unwrap();
    conn.pragma_update(None, "user_version", schema::VERSION + 1)
        .unwrap();
    drop(conn);
    let err = Ledger::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("upgrade fediedge"), "{err}");
}

#[tokio::test]
async fn a_write_back_whose_bookkeeping_fails_is_given_back_not_left_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let key = "media_attachments/files/1/original/b.png";
    origin.put(key, bytes(7000, 3));
    let primary = dir.path().join("primary");
    let edge = start_edge(dir.path(), &fs_primary_http_fallback(&primary, &origin)).await;
    // Another connection (as an operator's sqlite3 would) makes every removal from the queue
    // fail: the copy lands in the primary but cannot be recorded.
    let other = Ledger::open(&dir.path().join("var")).unwrap();
    other
        .with(|c| {
            c.execute_batch(
                "CREATE TRIGGER no_delete BEFORE DELETE ON writeback_queue
                 BEGIN SELECT RAISE(ABORT, 'bookkeeping refused by the test'); END;",
            )
        })
        .unwrap();
    let body = client()
        .get(format!("{}{key}", edge.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), bytes(7000, 3));
    // The response may end before the copy is queued: no row yet is "not yet".
    let row =
        || {
            other
                .with(|c| {
                    use rusqlite::OptionalExtension;
                    c.query_row(
                    "SELECT attempts, claimed_until, COALESCE(last_error, '') FROM writeback_queue
                     WHERE key = ?1",
                    [key],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?)),
                )
                .optional()
                })
                .unwrap()
        };
    // With the claim a plain flag, the row stayed claimed until a restart; now it is given
    // back, unclaimed, with a backoff.
    eventually(
        Duration::from_secs(30),
        "the row given back unclaimed",
        || {
            matches!(row(), Some((attempts, 0, error))
                if attempts >= 1 && error.contains("copied but not recorded"))
        },
    )
    .await;
    assert_eq!(std::fs::read(primary.join(key)).unwrap(), bytes(7000, 3));
    // The ledger works again: the next attempt (after its backoff) records the copy, without
    // a restart.
    other
        .with(|c| c.execute_batch("DROP TRIGGER no_delete"))
        .unwrap();
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(60), "the copy recorded", || {
        ledger.with(ops::pending).unwrap() == 0
    })
    .await;
    let copy = ledger.with(|c| ops::copied(c, key)).unwrap().unwrap();
    assert_eq!(copy.size, 7000);
    edge.running.shutdown().await;
}

fn edge_config(dir: &Path, extra: &str) -> fediedge::config::Config {
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{extra}",
        dir.join("var").display()
    );
    fediedge::config::from_str(&text, Path::new("test.toml")).unwrap()
}

#[tokio::test]
async fn a_second_serve_on_the_same_data_dir_is_refused_until_the_first_stops() {
    let dir = tempfile::tempdir().unwrap();
    let stores = format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n",
        dir.path().join("primary").display()
    );
    let first = fediedge::serve::start(edge_config(dir.path(), &stores))
        .await
        .unwrap();
    let err = match fediedge::serve::start(edge_config(dir.path(), &stores)).await {
        Ok(_) => panic!("a second serve started on the same data_dir"),
        Err(e) => format!("{e:#}"),
    };
    let var = dir.path().join("var");
    assert!(err.contains(&var.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    // migrate --status works beside it (it takes no lock).
    let ledger = Ledger::open(&var).unwrap();
    fediedge::migrate::status(&ledger).await.unwrap();
    first.shutdown().await;
    let second = fediedge::serve::start(edge_config(dir.path(), &stores))
        .await
        .unwrap();
    second.shutdown().await;
}

/// A power loss cannot be staged in a test; what can be checked is that the put (which now
/// syncs the directories too) is whole, in new directories, with no temp file left.
#[tokio::test]
async fn an_fs_put_into_new_directories_is_whole_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = edge_config(
        dir.path(),
        &format!(
            "[primary]\ntype = \"fs\"\nroot = \"{}\"\n",
            dir.path().join("primary").display()
        ),
    );
    let store = fediedge::store::open(&config.primary, fediedge::metrics::Metrics::new()).unwrap();
    let key = fediedge::key::Key::parse("accounts/avatars/000/000/001/original/x.gif").unwrap();
    let body = bytes(300_000, 9);
    let src = dir.path().join("body");
    std::fs::write(&src, &body).unwrap();
    let meta = fediedge::store::ObjectMeta {
        size: body.len() as u64,
        ..Default::default()
    };
    store.put(&key, &src, &meta).await.unwrap();
    let root = dir.path().join("primary");
    assert_eq!(std::fs::read(root.join(key.as_str())).unwrap(), body);
    let tmp = root.join(".fediedge-tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}

#[tokio::test]
async fn a_claim_left_by_a_stopped_worker_is_taken_over_when_its_lease_ends() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let primary = dir.path().join("primary");
    let edge = start_edge(dir.path(), &fs_primary_http_fallback(&primary, &origin)).await;
    // A worker claimed this copy and stopped before it recorded anything (its bookkeeping
    // failed, or it was cut off): the row stays claimed until the lease ends, 3 s here. Queued
    // and claimed in one transaction, so no worker of the edge can take it in between.
    let key = "media_attachments/files/9/original/left.png";
    let body = bytes(5000, 9);
    let staged = dir.path().join("var/staging/left-behind");
    std::fs::write(&staged, &body).unwrap();
    let other = Ledger::open(&dir.path().join("var")).unwrap();
    let claimed_until = other.with(|c| {
        let tx = c.unchecked_transaction().unwrap();
        ops::enqueue(
            &tx,
            &fediedge::ledger::Queued {
                key: key.into(),
                staged: staged.clone(),
                size: body.len() as u64,
                md5: hex::encode(<md5::Md5 as md5::Digest>::digest(&body)),
                content_type: Some("image/png".into()),
                source: "old-origin".into(),
                attempts: 0,
            },
        )
        .unwrap();
        let until = fediedge::ledger::now() + 3;
        tx.execute(
            "UPDATE writeback_queue SET claimed_until = ?2 WHERE key = ?1",
            rusqlite::params![key, until],
        )
        .unwrap();
        tx.commit().unwrap();
        until
    });
    // A live miss queues another copy and wakes the idle workers: they copy that one, find
    // the claimed row not yet due, and wait for its lease to end.
    let other_key = "media_attachments/files/9/original/fresh.png";
    origin.put(other_key, bytes(4000, 8));
    let got = client()
        .get(format!("{}{other_key}", edge.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), bytes(4000, 8));
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(60), "the left claim taken over", || {
        ledger.with(|c| ops::copied(c, key)).unwrap().is_some()
    })
    .await;
    let copy = ledger.with(|c| ops::copied(c, key)).unwrap().unwrap();
    // Recorded after the lease ended, never while it held (the clock only moves on).
    assert!(
        copy.copied_at >= claimed_until,
        "copied at {} while the lease held until {claimed_until}",
        copy.copied_at
    );
    assert_eq!(copy.via, "pull-through");
    assert_eq!(std::fs::read(primary.join(key)).unwrap(), body);
    eventually(Duration::from_secs(60), "the queue empty", || {
        ledger.with(ops::pending).unwrap() == 0
    })
    .await;
    // Removed right after the record (which empties the queue), not with it.
    eventually(
        Duration::from_secs(60),
        "the staged body removed once recorded",
        || !staged.exists(),
    )
    .await;
    edge.running.shutdown().await;
}
