//! The migration's own tables, in the same SQLite ledger as the write-back queue and the
//! record of copies (`data_dir/ledger.sqlite`; declared with the rest of the file in
//! [`crate::ledger::schema`]).
//!
//! A migration is a (source, destination) pair: the fallback's name and the identity of the
//! primary it copies into. After `[primary]` changes, the same source is a new migration and
//! every key is copied again; the old one's rows stay, counted for the old primary.
//!
//! - `migration_sources`: one row per migration: when it started, how far the listing got
//!   (`cursor`, the last key listed) and whether it is complete.
//! - `migration_objects`: one row per listed key: its size (NULL until known, for keys given
//!   in a file), its status (`pending`, `copied`, `skipped`, `failed`), the attempts so far and
//!   the reason of the last failure. `id` follows the listing order, which is the order the
//!   workers take keys in.
//!
//! A copy is recorded in `copies` (via `migrate`, same destination) and marked `copied` here
//! in one transaction, so a rerun never reads again an object whose copy was counted.

use rusqlite::{params, Connection, OptionalExtension};

use crate::ledger::{self, now, Copy, Result};

/// One migration: which fallback, into which primary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The fallback's name in the config.
    pub source: String,
    /// The primary's identity ([`crate::config::StoreConfig::destination`]).
    pub destination: String,
}

/// How far a migration is (or several, added up): what `--status` prints and the running
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

/// The progress of every migration into `destination`, or `None` if none was ever started.
/// Read-only: safe to call from `serve` while `migrate` runs.
pub fn progress(conn: &Connection, destination: &str) -> Result<Option<Progress>> {
    let started: i64 = conn.query_row(
        "SELECT COUNT(*) FROM migration_sources WHERE destination = ?1",
        params![destination],
        |r| r.get(0),
    )?;
    if started == 0 {
        return Ok(None);
    }
    counts(conn, None, destination).map(Some)
}

/// Progress of one source (`Some(name)`) or of all of them, into `destination`.
pub fn counts(conn: &Connection, source: Option<&str>, destination: &str) -> Result<Progress> {
    Ok(conn.query_row(
        "SELECT COUNT(*),
                COALESCE(SUM(status IN ('copied', 'skipped')), 0),
                COALESCE(SUM(COALESCE(size, 0)), 0),
                COALESCE(SUM(CASE WHEN status IN ('copied', 'skipped') THEN COALESCE(size, 0) END), 0),
                COALESCE(SUM(status = 'failed'), 0)
         FROM migration_objects WHERE (?1 IS NULL OR source = ?1) AND destination = ?2",
        params![source, destination],
        |r| {
            Ok(Progress {
                objects_total: r.get::<_, i64>(0)? as u64,
                objects_done: r.get::<_, i64>(1)? as u64,
                bytes_total: r.get::<_, i64>(2)? as u64,
                bytes_done: r.get::<_, i64>(3)? as u64,
                failed: r.get::<_, i64>(4)? as u64,
            })
        },
    )?)
}

/// One migration as recorded, for `--status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceState {
    /// Which store into which primary.
    pub route: Route,
    /// Whether the last listing ran to its end.
    pub listing_done: bool,
    /// Seconds since the epoch of the last change.
    pub updated_at: i64,
    /// Its figures.
    pub progress: Progress,
}

/// Every migration ever started, by source then destination. Empty if none.
pub fn sources(conn: &Connection) -> Result<Vec<SourceState>> {
    let mut stmt = conn.prepare(
        "SELECT source, destination, listing_done, updated_at FROM migration_sources
         ORDER BY source, destination",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                Route {
                    source: r.get(0)?,
                    destination: r.get(1)?,
                },
                r.get::<_, i64>(2)? != 0,
                r.get::<_, i64>(3)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(route, listing_done, updated_at)| {
            let progress = counts(conn, Some(&route.source), &route.destination)?;
            Ok(SourceState {
                route,
                listing_done,
                updated_at,
                progress,
            })
        })
        .collect()
}

/// The last failures of a migration (key, attempts, reason), newest first.
pub fn failures(
    conn: &Connection,
    route: &Route,
    limit: usize,
) -> Result<Vec<(String, u32, String)>> {
    let mut stmt = conn.prepare(
        "SELECT key, attempts, COALESCE(reason, '') FROM migration_objects
         WHERE source = ?1 AND destination = ?2 AND status = 'failed'
         ORDER BY updated_at DESC, id LIMIT ?3",
    )?;
    let rows = stmt.query_map(
        params![route.source, route.destination, limit as i64],
        |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u32, r.get(2)?)),
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Starts (or restarts) the listing of a migration; returns the cursor of the previous
/// listing (the last key it recorded) if that listing did not finish.
pub fn begin(conn: &Connection, route: &Route) -> Result<Option<String>> {
    let previous = conn
        .query_row(
            "SELECT cursor, listing_done FROM migration_sources
             WHERE source = ?1 AND destination = ?2",
            params![route.source, route.destination],
            |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, i64>(1)? != 0)),
        )
        .optional()?;
    conn.execute(
        "INSERT INTO migration_sources (source, destination, started_at, updated_at)
         VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT(source, destination) DO UPDATE SET updated_at = ?3, listing_done = 0",
        params![route.source, route.destination, now()],
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
    route: &Route,
    keys: &[(String, Option<u64>, Option<String>)],
    cursor: Option<&str>,
) -> Result<(u64, u64)> {
    let tx = conn.unchecked_transaction()?;
    let (mut added, mut bytes) = (0u64, 0u64);
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO migration_objects (source, destination, key, size, md5, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT(source, destination, key) DO NOTHING",
        )?;
        let t = now();
        for (key, size, md5) in keys {
            let n = insert.execute(params![
                route.source,
                route.destination,
                key,
                size.map(|s| s as i64),
                md5,
                t
            ])?;
            if n == 1 {
                added += 1;
                bytes += size.unwrap_or(0);
            }
        }
    }
    if let Some(cursor) = cursor {
        tx.execute(
            "UPDATE migration_sources SET cursor = ?3, updated_at = ?4
             WHERE source = ?1 AND destination = ?2",
            params![route.source, route.destination, cursor, now()],
        )?;
    }
    tx.commit()?;
    Ok((added, bytes))
}

/// Marks the listing of a migration complete.
pub fn listing_finished(conn: &Connection, route: &Route) -> Result<()> {
    conn.execute(
        "UPDATE migration_sources SET listing_done = 1, cursor = NULL, updated_at = ?3
         WHERE source = ?1 AND destination = ?2",
        params![route.source, route.destination, now()],
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
    /// Size and `via` of the ledger's record of a copy of this key into this migration's
    /// destination, if there is one (read with the batch, to spare a ledger call per key).
    pub recorded: Option<(u64, String)>,
}

/// The next keys of a migration still to do (pending, or failed in an earlier run), after
/// row `after_id`, in listing order.
pub fn next_batch(
    conn: &Connection,
    route: &Route,
    after_id: i64,
    limit: usize,
) -> Result<Vec<Planned>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.key, m.size, m.attempts, c.size, c.via, m.md5
         FROM migration_objects m
         LEFT JOIN copies c ON c.key = m.key AND c.destination = m.destination
         WHERE m.source = ?1 AND m.destination = ?2 AND m.status IN ('pending', 'failed')
           AND m.id > ?3
         ORDER BY m.id LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![route.source, route.destination, after_id, limit as i64],
        |r| {
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
        },
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Records a verified copy: in `copies` (via `migrate`, into `copy.destination`) and as
/// `copied` here, atomically.
pub fn mark_copied(conn: &Connection, source: &str, copy: &Copy) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    ledger::ops::record(&tx, copy)?;
    tx.execute(
        "UPDATE migration_objects SET status = 'copied', size = ?4, reason = NULL, updated_at = ?5
         WHERE source = ?1 AND destination = ?2 AND key = ?3",
        params![source, copy.destination, copy.key, copy.size as i64, now()],
    )?;
    tx.commit()?;
    Ok(())
}

/// Records a key that needed no copy (already in the primary, or already copied).
pub fn mark_skipped(
    conn: &Connection,
    route: &Route,
    key: &str,
    size: u64,
    reason: &str,
) -> Result<()> {
    conn.execute(
        "UPDATE migration_objects SET status = 'skipped', size = ?4, reason = ?5, updated_at = ?6
         WHERE source = ?1 AND destination = ?2 AND key = ?3",
        params![
            route.source,
            route.destination,
            key,
            size as i64,
            reason,
            now()
        ],
    )?;
    Ok(())
}

/// Records one failed attempt and its reason. `given_up` marks the key `failed` (a rerun tries
/// it again); otherwise it stays `pending`.
pub fn mark_attempt_failed(
    conn: &Connection,
    route: &Route,
    key: &str,
    reason: &str,
    given_up: bool,
) -> Result<()> {
    conn.execute(
        "UPDATE migration_objects
         SET attempts = attempts + 1, reason = ?4, updated_at = ?5,
             status = CASE WHEN ?6 THEN 'failed' ELSE status END
         WHERE source = ?1 AND destination = ?2 AND key = ?3",
        params![
            route.source,
            route.destination,
            key,
            reason,
            now(),
            given_up
        ],
    )?;
    Ok(())
}

/// The keys to re-check with `--verify`: those this migration copied or found in the
/// primary, and those the edge copied from the source into the same destination by
/// pull-through. In key order.
pub fn copied_keys(conn: &Connection, route: &Route) -> Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT key FROM migration_objects
         WHERE source = ?1 AND destination = ?2 AND status IN ('copied', 'skipped')
         UNION
         SELECT key FROM copies WHERE source = ?1 AND destination = ?2
         ORDER BY 1",
    )?;
    let rows = stmt.query_map(params![route.source, route.destination], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;

    fn route(destination: &str) -> Route {
        Route {
            source: "old".into(),
            destination: destination.into(),
        }
    }

    #[test]
    fn no_migration_no_progress() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.with(|c| progress(c, "fs:/new")).unwrap(), None);
    }

    #[test]
    fn listing_copy_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.with(|c| {
            let r = route("fs:/new");
            assert_eq!(begin(c, &r).unwrap(), None);
            let keys = vec![
                ("a".to_owned(), Some(10), None),
                ("b".to_owned(), Some(20), Some("00".repeat(16))),
                ("c".to_owned(), None, None),
            ];
            assert_eq!(add_listed(c, &r, &keys, Some("c")).unwrap(), (3, 30));
            assert_eq!(add_listed(c, &r, &keys, None).unwrap(), (0, 0));
            // Interrupted listing: the cursor is handed back.
            assert_eq!(begin(c, &r).unwrap().as_deref(), Some("c"));
            mark_copied(
                c,
                "old",
                &Copy {
                    key: "a".into(),
                    destination: r.destination.clone(),
                    size: 10,
                    md5: "00".into(),
                    source: "old".into(),
                    via: "migrate".into(),
                    copied_at: 0,
                },
            )
            .unwrap();
            mark_skipped(c, &r, "b", 20, "in primary").unwrap();
            mark_attempt_failed(c, &r, "c", "truncated", true).unwrap();
            let p = progress(c, &r.destination).unwrap().unwrap();
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
            let todo = next_batch(c, &r, 0, 10).unwrap();
            assert_eq!(todo.len(), 1);
            assert_eq!((todo[0].key.as_str(), todo[0].attempts), ("c", 1));
            assert_eq!(copied_keys(c, &r).unwrap(), vec!["a", "b"]);
            listing_finished(c, &r).unwrap();
            assert_eq!(begin(c, &r).unwrap(), None);
            assert!(sources(c).unwrap()[0].progress.failed == 1);

            // The same source into another primary is another migration: everything to do, and
            // the copy of "a" into the old primary does not count.
            let r2 = route("fs:/newer");
            assert_eq!(progress(c, &r2.destination).unwrap(), None);
            begin(c, &r2).unwrap();
            assert_eq!(add_listed(c, &r2, &keys, None).unwrap(), (3, 30));
            let todo = next_batch(c, &r2, 0, 10).unwrap();
            assert_eq!(todo.len(), 3);
            assert!(todo.iter().all(|p| p.recorded.is_none()), "{todo:?}");
            let all = sources(c).unwrap();
            assert_eq!(all.len(), 2);
            assert_eq!(all[0].progress.objects_done, 2);
            assert_eq!(all[1].progress.objects_done, 0);
        });
    }
}
