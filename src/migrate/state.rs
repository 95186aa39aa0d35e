//! The migration's own tables, in the same SQLite ledger as the write-back queue and the
//! record of copies (`data_dir/ledger.sqlite`).
//!
//! - `migration_sources`: one row per migrated store: when it started, how far the listing
//!   got (`cursor`, the last key listed) and whether it is complete.
//! - `migration_objects`: one row per listed key: its size (NULL until known, for keys given
//!   in a file), its status (`pending`, `copied`, `skipped`, `failed`), the attempts so far and
//!   the reason of the last failure. `id` follows the listing order, which is the order the
//!   workers take keys in.
//!
//! A copy is recorded in `copies` (via `migrate`) and marked `copied` here in one transaction,
//! so a rerun never reads again an object whose copy was counted.

use rusqlite::{params, Connection, OptionalExtension};

use crate::ledger::{self, now, Copy};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS migration_sources (
    source TEXT PRIMARY KEY,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    cursor TEXT,
    listing_done INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS migration_objects (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER,
    md5 TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at INTEGER NOT NULL,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS migration_objects_status ON migration_objects (source, status, id);
";

/// Creates the migration tables if they are missing.
pub fn init(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)
}

/// How far the migrations recorded in the ledger are, all sources together: what the running
/// edge shows in `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Keys listed so far.
    pub objects_total: u64,
    /// Keys copied or found already in the primary.
    pub objects_done: u64,
    /// Bytes of the keys listed so far whose size is known.
    pub bytes_total: u64,
    /// Bytes copied or found already in the primary.
    pub bytes_done: u64,
    /// Keys whose last attempt failed.
    pub failed: u64,
}

/// The progress of every migration in the ledger, or `None` if no migration was ever started
/// (the tables do not exist). Read-only: safe to call from `serve` while `migrate` runs.
pub fn progress(conn: &Connection) -> rusqlite::Result<Option<Progress>> {
    if !tables_exist(conn)? {
        return Ok(None);
    }
    counts(conn, None).map(Some)
}

fn tables_exist(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'migration_objects'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Progress of one source (`Some(name)`) or of all of them.
pub fn counts(conn: &Connection, source: Option<&str>) -> rusqlite::Result<Progress> {
    conn.query_row(
        "SELECT COUNT(*),
                COALESCE(SUM(status IN ('copied', 'skipped')), 0),
                COALESCE(SUM(COALESCE(size, 0)), 0),
                COALESCE(SUM(CASE WHEN status IN ('copied', 'skipped') THEN COALESCE(size, 0) END), 0),
                COALESCE(SUM(status = 'failed'), 0)
         FROM migration_objects WHERE ?1 IS NULL OR source = ?1",
        params![source],
        |r| {
            Ok(Progress {
                objects_total: r.get::<_, i64>(0)? as u64,
                objects_done: r.get::<_, i64>(1)? as u64,
                bytes_total: r.get::<_, i64>(2)? as u64,
                bytes_done: r.get::<_, i64>(3)? as u64,
                failed: r.get::<_, i64>(4)? as u64,
            })
        },
    )
}

/// One source as recorded, for `--status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// Store name.
    pub source: String,
    /// Whether the last listing ran to its end.
    pub listing_done: bool,
    /// Seconds since the epoch of the last change.
    pub updated_at: i64,
    /// Its figures.
    pub progress: Progress,
}

/// Every source ever migrated, by name. Empty if none.
pub fn sources(conn: &Connection) -> rusqlite::Result<Vec<SourceState>> {
    if !tables_exist(conn)? {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(
        "SELECT source, listing_done, updated_at FROM migration_sources ORDER BY source",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? != 0,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(source, listing_done, updated_at)| {
            let progress = counts(conn, Some(&source))?;
            Ok(SourceState {
                source,
                listing_done,
                updated_at,
                progress,
            })
        })
        .collect()
}

/// The last failures of `source` (key, attempts, reason), newest first.
pub fn failures(
    conn: &Connection,
    source: &str,
    limit: usize,
) -> rusqlite::Result<Vec<(String, u32, String)>> {
    let mut stmt = conn.prepare(
        "SELECT key, attempts, COALESCE(reason, '') FROM migration_objects
         WHERE source = ?1 AND status = 'failed' ORDER BY updated_at DESC, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![source, limit as i64], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u32, r.get(2)?))
    })?;
    rows.collect()
}

/// Starts (or restarts) the listing of `source`; returns the cursor of the previous listing
/// (the last key it recorded) if that listing did not finish.
pub fn begin(conn: &Connection, source: &str) -> rusqlite::Result<Option<String>> {
    let previous = conn
        .query_row(
            "SELECT cursor, listing_done FROM migration_sources WHERE source = ?1",
            params![source],
            |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)? != 0)),
        )
        .optional()?;
    conn.execute(
        "INSERT INTO migration_sources (source, started_at, updated_at) VALUES (?1, ?2, ?2)
         ON CONFLICT(source) DO UPDATE SET updated_at = ?2, listing_done = 0",
        params![source, now()],
    )?;
    Ok(match previous {
        Some((cursor, false)) => cursor,
        _ => None,
    })
}

/// Adds listed keys (size `None` when unknown) as pending, in one transaction with the listing
/// cursor. Keys already recorded keep their status. Returns the number and the known bytes of
/// the keys that were new.
pub fn add_listed(
    conn: &Connection,
    source: &str,
    keys: &[(String, Option<u64>, Option<String>)],
    cursor: Option<&str>,
) -> rusqlite::Result<(u64, u64)> {
    let tx = conn.unchecked_transaction()?;
    let (mut added, mut bytes) = (0u64, 0u64);
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO migration_objects (source, key, size, md5, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(source, key) DO NOTHING",
        )?;
        let t = now();
        for (key, size, md5) in keys {
            let n = insert.execute(params![source, key, size.map(|s| s as i64), md5, t])?;
            if n == 1 {
                added += 1;
                bytes += size.unwrap_or(0);
            }
        }
    }
    if let Some(cursor) = cursor {
        tx.execute(
            "UPDATE migration_sources SET cursor = ?2, updated_at = ?3 WHERE source = ?1",
            params![source, cursor, now()],
        )?;
    }
    tx.commit()?;
    Ok((added, bytes))
}

/// Marks the listing of `source` complete.
pub fn listing_finished(conn: &Connection, source: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE migration_sources SET listing_done = 1, cursor = NULL, updated_at = ?2
         WHERE source = ?1",
        params![source, now()],
    )?;
    Ok(())
}

/// A key waiting to be copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Row id: the position in the listing.
    pub id: i64,
    /// The key as listed.
    pub key: String,
    /// Size from the listing, if known.
    pub size: Option<u64>,
    /// MD5 from the listing, if it gave one (S3 single-part ETags).
    pub md5: Option<[u8; 16]>,
    /// Failed attempts in earlier runs.
    pub attempts: u32,
    /// Size and `via` of the ledger's record of a copy of this key, if there is one (read with
    /// the batch, to spare a ledger call per key).
    pub recorded: Option<(u64, String)>,
}

/// The next keys of `source` still to do (pending, or failed in an earlier run), after row
/// `after_id`, in listing order.
pub fn next_batch(
    conn: &Connection,
    source: &str,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Planned>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.key, m.size, m.attempts, c.size, c.via, m.md5
         FROM migration_objects m LEFT JOIN copies c ON c.key = m.key
         WHERE m.source = ?1 AND m.status IN ('pending', 'failed') AND m.id > ?2
         ORDER BY m.id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![source, after_id, limit as i64], |r| {
        let recorded = match (r.get::<_, Option<i64>>(4)?, r.get::<_, Option<String>>(5)?) {
            (Some(size), Some(via)) => Some((size as u64, via)),
            _ => None,
        };
        Ok(Planned {
            id: r.get(0)?,
            key: r.get(1)?,
            size: r.get::<_, Option<i64>>(2)?.map(|s| s as u64),
            md5: r.get::<_, Option<String>>(6)?.and_then(|h| {
                let mut md5 = [0u8; 16];
                hex::decode_to_slice(h, &mut md5).ok().map(|_| md5)
            }),
            attempts: r.get::<_, i64>(3)? as u32,
            recorded,
        })
    })?;
    rows.collect()
}

/// Records a verified copy: in `copies` (via `migrate`) and as `copied` here, atomically.
pub fn mark_copied(conn: &Connection, source: &str, copy: &Copy) -> rusqlite::Result<()> {
    let tx = conn.unchecked_transaction()?;
    ledger::ops::record(&tx, copy)?;
    tx.execute(
        "UPDATE migration_objects SET status = 'copied', size = ?3, reason = NULL, updated_at = ?4
         WHERE source = ?1 AND key = ?2",
        params![source, copy.key, copy.size as i64, now()],
    )?;
    tx.commit()
}

/// Records a key that needed no copy (already in the primary, or already copied).
pub fn mark_skipped(
    conn: &Connection,
    source: &str,
    key: &str,
    size: u64,
    reason: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE migration_objects SET status = 'skipped', size = ?3, reason = ?4, updated_at = ?5
         WHERE source = ?1 AND key = ?2",
        params![source, key, size as i64, reason, now()],
    )?;
    Ok(())
}

/// Records one failed attempt and its reason. `given_up` marks the key `failed` (a rerun tries
/// it again); otherwise it stays `pending`.
pub fn mark_attempt_failed(
    conn: &Connection,
    source: &str,
    key: &str,
    reason: &str,
    given_up: bool,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE migration_objects
         SET attempts = attempts + 1, reason = ?3, updated_at = ?4,
             status = CASE WHEN ?5 THEN 'failed' ELSE status END
         WHERE source = ?1 AND key = ?2",
        params![source, key, reason, now(), given_up],
    )?;
    Ok(())
}

/// The keys to re-check with `--verify`: those this migration copied or found in the
/// primary, and those the edge copied from `source` by pull-through. In key order.
pub fn copied_keys(conn: &Connection, source: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT key FROM migration_objects WHERE source = ?1 AND status IN ('copied', 'skipped')
         UNION
         SELECT key FROM copies WHERE source = ?1
         ORDER BY 1",
    )?;
    let rows = stmt.query_map(params![source], |r| r.get(0))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE copies (key TEXT PRIMARY KEY, size INTEGER NOT NULL, md5 TEXT NOT NULL,
             source TEXT NOT NULL, via TEXT NOT NULL, copied_at INTEGER NOT NULL);",
        )
        .unwrap();
        c
    }

    #[test]
    fn no_tables_no_progress() {
        assert_eq!(progress(&conn()).unwrap(), None);
    }

    #[test]
    fn listing_copy_and_counts() {
        let c = conn();
        init(&c).unwrap();
        assert_eq!(begin(&c, "old").unwrap(), None);
        let keys = vec![
            ("a".to_owned(), Some(10), None),
            ("b".to_owned(), Some(20), Some("00".repeat(16))),
            ("c".to_owned(), None, None),
        ];
        assert_eq!(add_listed(&c, "old", &keys, Some("c")).unwrap(), (3, 30));
        assert_eq!(add_listed(&c, "old", &keys, None).unwrap(), (0, 0));
        // Interrupted listing: the cursor is handed back.
        assert_eq!(begin(&c, "old").unwrap().as_deref(), Some("c"));
        mark_copied(
            &c,
            "old",
            &Copy {
                key: "a".into(),
                size: 10,
                md5: "00".into(),
                source: "old".into(),
                via: "migrate".into(),
                copied_at: 0,
            },
        )
        .unwrap();
        mark_skipped(&c, "old", "b", 20, "in primary").unwrap();
        mark_attempt_failed(&c, "old", "c", "truncated", true).unwrap();
        let p = progress(&c).unwrap().unwrap();
        assert_eq!(
            p,
            Progress {
                objects_total: 3,
                objects_done: 2,
                bytes_total: 30,
                bytes_done: 30,
                failed: 1
            }
        );
        let todo = next_batch(&c, "old", 0, 10).unwrap();
        assert_eq!(todo.len(), 1);
        assert_eq!((todo[0].key.as_str(), todo[0].attempts), ("c", 1));
        assert_eq!(copied_keys(&c, "old").unwrap(), vec!["a", "b"]);
        listing_finished(&c, "old").unwrap();
        assert_eq!(begin(&c, "old").unwrap(), None);
        assert!(sources(&c).unwrap()[0].progress.failed == 1);
    }
}
