//! Queue and record operations, on a connection (so they compose inside
//! [`super::Ledger::run`] and transactions).

use std::path::PathBuf;

use rusqlite::{params, Connection, OptionalExtension};

use super::schema::{NOTE_UNATTRIBUTED, UNATTRIBUTED};
use super::{now, Copy, Queued, Result};

/// Adds a copy to the queue. Returns false (and changes nothing) if the key is queued
/// already: the caller then discards its own staged file.
pub fn enqueue(conn: &Connection, q: &Queued) -> Result<bool> {
    let n = conn.execute(
        "INSERT INTO writeback_queue (key, staged, size, md5, content_type, source, queued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(key) DO NOTHING",
        params![
            q.key,
            q.staged.to_string_lossy(),
            q.size as i64,
            q.md5,
            q.content_type,
            q.source,
            now()
        ],
    )?;
    Ok(n == 1)
}

/// Releases every claim (at start: the data_dir lock guarantees no other `serve` holds any).
pub fn release_claims(conn: &Connection) -> Result<()> {
    conn.execute("UPDATE writeback_queue SET claimed_until = 0", [])?;
    Ok(())
}

/// Claims the oldest due copy, if any, for `lease` seconds plus the body's length at
/// 256 KiB/s (what a put may take). A claim is a lease, not a flag: if the worker cannot
/// record the outcome (the ledger errs), the row is free again when the lease ends, not at
/// the next restart.
pub fn claim_next(conn: &Connection, lease: i64) -> Result<Option<Queued>> {
    let tx = conn.unchecked_transaction()?;
    let t = now();
    let row = tx
        .query_row(
            "SELECT key, staged, size, md5, content_type, source, attempts FROM writeback_queue
             WHERE claimed_until <= ?1 AND next_attempt_at <= ?1
             ORDER BY queued_at, key LIMIT 1",
            params![t],
            |r| {
                Ok(Queued {
                    key: r.get(0)?,
                    staged: PathBuf::from(r.get::<_, String>(1)?),
                    size: r.get::<_, i64>(2)? as u64,
                    md5: r.get(3)?,
                    content_type: r.get(4)?,
                    source: r.get(5)?,
                    attempts: r.get::<_, i64>(6)? as u32,
                })
            },
        )
        .optional()?;
    if let Some(q) = &row {
        tx.execute(
            "UPDATE writeback_queue SET claimed_until = ?2 + size / 262144 WHERE key = ?1",
            params![q.key, t + lease],
        )?;
    }
    tx.commit()?;
    Ok(row)
}

/// Seconds until the next copy is due, claimed ones at the end of their lease (None: queue
/// empty).
pub fn next_due_in(conn: &Connection) -> Result<Option<i64>> {
    let t: Option<i64> = conn.query_row(
        "SELECT MIN(MAX(next_attempt_at, claimed_until)) FROM writeback_queue",
        [],
        |r| r.get(0),
    )?;
    Ok(t.map(|t| (t - now()).max(0)))
}

/// Records a finished copy into `destination` and removes it from the queue, in one
/// transaction.
pub fn complete(conn: &Connection, q: &Queued, destination: &str) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    record(
        &tx,
        &Copy {
            key: q.key.clone(),
            destination: destination.to_owned(),
            size: q.size,
            md5: q.md5.clone(),
            source: q.source.clone(),
            via: "pull-through".into(),
            copied_at: now(),
        },
    )?;
    tx.execute("DELETE FROM writeback_queue WHERE key = ?1", params![q.key])?;
    tx.commit()?;
    Ok(())
}

/// Puts a failed copy back, unclaimed, with exponential backoff (2 s doubling, at most 5 min).
pub fn fail(conn: &Connection, q: &Queued, error: &str) -> Result<()> {
    let delay = 2i64.saturating_pow(q.attempts.min(8) + 1).min(300);
    conn.execute(
        "UPDATE writeback_queue SET claimed_until = 0, attempts = attempts + 1,
         next_attempt_at = ?2, last_error = ?3 WHERE key = ?1",
        params![q.key, now() + delay, error],
    )?;
    Ok(())
}

/// Removes a copy that can never succeed.
pub fn drop_queued(conn: &Connection, q: &Queued) -> Result<()> {
    conn.execute("DELETE FROM writeback_queue WHERE key = ?1", params![q.key])?;
    Ok(())
}

/// Number of copies due now (not waiting out a backoff), claimed ones included.
pub fn due(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM writeback_queue WHERE next_attempt_at <= ?1",
        params![now()],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// Number of queued copies.
pub fn pending(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM writeback_queue", [], |r| r.get(0))?;
    Ok(n as u64)
}

/// When the oldest queued copy was queued (Unix seconds; None: queue empty).
pub fn oldest_queued_at(conn: &Connection) -> Result<Option<i64>> {
    Ok(
        conn.query_row("SELECT MIN(queued_at) FROM writeback_queue", [], |r| {
            r.get(0)
        })?,
    )
}

/// Records a copy (replacing an older record of the same key and destination).
pub fn record(conn: &Connection, c: &Copy) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO copies (key, destination, size, md5, source, via, copied_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            c.key,
            c.destination,
            c.size as i64,
            c.md5,
            c.source,
            c.via,
            c.copied_at
        ],
    )?;
    Ok(())
}

const COPY_COLUMNS: &str = "key, destination, size, md5, source, via, copied_at";

fn copy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Copy> {
    Ok(Copy {
        key: r.get(0)?,
        destination: r.get(1)?,
        size: r.get::<_, i64>(2)? as u64,
        md5: r.get(3)?,
        source: r.get(4)?,
        via: r.get(5)?,
        copied_at: r.get(6)?,
    })
}

/// The record of a copy of `key` into `destination`, if there is one: what decides whether
/// a key needs copying into the primary configured now.
pub fn copied_to(conn: &Connection, key: &str, destination: &str) -> Result<Option<Copy>> {
    let sql = format!("SELECT {COPY_COLUMNS} FROM copies WHERE key = ?1 AND destination = ?2");
    Ok(conn
        .query_row(&sql, params![key, destination], copy_row)
        .optional()?)
}

/// The newest record of a copy of `key`, into whichever destination: for tools and tests
/// that look at what happened. Never use it to decide whether to copy ([`copied_to`]).
pub fn copied(conn: &Connection, key: &str) -> Result<Option<Copy>> {
    let sql = format!(
        "SELECT {COPY_COLUMNS} FROM copies WHERE key = ?1 ORDER BY copied_at DESC, rowid DESC LIMIT 1"
    );
    Ok(conn.query_row(&sql, params![key], copy_row).optional()?)
}

/// Gives the records kept before destinations were (see [`super::schema`]) the destination
/// `destination`. Returns how many rows changed. A record that `destination` already has a
/// newer one of is dropped. Costs one lookup when there is nothing to do (the upgrade leaves
/// a note in `ledger_notes` when there is).
pub fn attribute_unknown(conn: &Connection, destination: &str) -> Result<u64> {
    let tx = conn.unchecked_transaction()?;
    let noted = tx
        .query_row(
            "SELECT 1 FROM ledger_notes WHERE name = ?1",
            [NOTE_UNATTRIBUTED],
            |_| Ok(()),
        )
        .optional()?;
    if noted.is_none() {
        return Ok(0);
    }
    let mut n = 0;
    for table in ["copies", "migration_sources", "migration_objects"] {
        n += tx.execute(
            &format!("UPDATE OR IGNORE {table} SET destination = ?1 WHERE destination = ?2"),
            params![destination, UNATTRIBUTED],
        )? as u64;
        tx.execute(
            &format!("DELETE FROM {table} WHERE destination = ?1"),
            params![UNATTRIBUTED],
        )?;
    }
    tx.execute(
        "DELETE FROM ledger_notes WHERE name = ?1",
        [NOTE_UNATTRIBUTED],
    )?;
    tx.commit()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Ledger;

    fn queued(key: &str, size: u64) -> Queued {
        Queued {
            key: key.into(),
            staged: PathBuf::from("/nonexistent"),
            size,
            md5: "00".into(),
            content_type: None,
            source: "old".into(),
            attempts: 0,
        }
    }

    #[test]
    fn a_claim_is_a_lease_that_ends() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.with(|c| enqueue(c, &queued("a", 10))).unwrap();
        let q = l.with(|c| claim_next(c, 600)).unwrap().unwrap();
        assert_eq!(q.key, "a");
        // Claimed: no second worker gets it, and it is not "due" for an idle worker yet.
        assert_eq!(l.with(|c| claim_next(c, 600)).unwrap(), None);
        assert!(l.with(next_due_in).unwrap().unwrap() >= 599);
        // The lease runs out (its holder could not record anything): free again.
        l.with(|c| c.execute("UPDATE writeback_queue SET claimed_until = ?1", [now() - 1]))
            .unwrap();
        assert_eq!(l.with(|c| claim_next(c, 600)).unwrap().unwrap().key, "a");
        // A big body gets a longer lease: 256 MiB at 256 KiB/s is 1024 s more.
        l.with(|c| enqueue(c, &queued("big", 256 << 20))).unwrap();
        l.with(|c| claim_next(c, 600)).unwrap().unwrap();
        let until: i64 = l
            .with(|c| {
                c.query_row(
                    "SELECT claimed_until FROM writeback_queue WHERE key = 'big'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert!(until >= now() + 600 + 1024 - 2, "{until}");
    }

    #[test]
    fn records_are_per_destination() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        l.with(|c| complete(c, &queued("k", 3), "fs:/old")).unwrap();
        assert!(l.with(|c| copied_to(c, "k", "fs:/old")).unwrap().is_some());
        assert!(l.with(|c| copied_to(c, "k", "fs:/new")).unwrap().is_none());
        l.with(|c| enqueue(c, &queued("k", 3))).unwrap();
        l.with(|c| complete(c, &queued("k", 3), "fs:/new")).unwrap();
        let both: i64 = l
            .with(|c| c.query_row("SELECT COUNT(*) FROM copies", [], |r| r.get(0)))
            .unwrap();
        assert_eq!(both, 2, "the old primary's record is kept");
        assert_eq!(l.with(pending).unwrap(), 0);
    }
}
