//! The ledger: one SQLite file in `data_dir` holding the durable write-back queue and the
//! record of every copy into the primary (key, size, checksum, source, time).
//!
//! SQLite (WAL mode) rather than a single-process embedded store because `fediedge migrate`
//! and `fediedge migrate --status` must be able to use the same ledger while `serve` runs.
//! Calls are blocking; [`Ledger::run`] moves them off the async threads.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

/// Ledger errors are SQLite errors (disk full, corrupt file, locked too long).
pub type Result<T> = std::result::Result<T, rusqlite::Error>;

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A copy waiting in the write-back queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The key.
    pub key: String,
    /// The verified body, staged in `data_dir/staging`.
    pub staged: PathBuf,
    /// Body length.
    pub size: u64,
    /// MD5 of the body, hex.
    pub md5: String,
    /// Content-Type to store with the object.
    pub content_type: Option<String>,
    /// Store the body came from.
    pub source: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// One record of a copy into the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The key.
    pub key: String,
    /// Body length.
    pub size: u64,
    /// MD5 of the body, hex.
    pub md5: String,
    /// Store it came from.
    pub source: String,
    /// `pull-through` (serve) or `migrate`.
    pub via: String,
    /// Seconds since the epoch.
    pub copied_at: i64,
}

/// The ledger handle; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS writeback_queue (
    key TEXT PRIMARY KEY,
    staged TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    content_type TEXT,
    source TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    claimed INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS copies (
    key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    source TEXT NOT NULL,
    via TEXT NOT NULL,
    copied_at INTEGER NOT NULL
);
";

impl Ledger {
    /// Opens (or creates) `data_dir/ledger.sqlite`.
    pub fn open(data_dir: &Path) -> Result<Ledger> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let path = data_dir.join("ledger.sqlite");
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)?;
        Ok(Ledger {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on a blocking thread.
    pub async fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce(&Connection) -> R + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock()))
            .await
            .expect("ledger calls do not panic")
    }

    /// Runs `f` with the connection on the current thread (for sync callers and tests).
    pub fn with<R>(&self, f: impl FnOnce(&Connection) -> R) -> R {
        f(&self.conn.lock())
    }
}

/// Queue and record operations, on a connection (so they compose inside [`Ledger::run`]).
pub mod ops {
    use super::*;

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

    /// Releases every claim (at start: claims of a previous process are void).
    pub fn release_claims(conn: &Connection) -> Result<()> {
        conn.execute("UPDATE writeback_queue SET claimed = 0", [])?;
        Ok(())
    }

    /// Claims the oldest due copy, if any.
    pub fn claim_next(conn: &Connection) -> Result<Option<Queued>> {
        let tx = conn.unchecked_transaction()?;
        let row = tx
            .query_row(
                "SELECT key, staged, size, md5, content_type, source, attempts FROM writeback_queue
                 WHERE claimed = 0 AND next_attempt_at <= ?1 ORDER BY queued_at, key LIMIT 1",
                params![now()],
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
                "UPDATE writeback_queue SET claimed = 1 WHERE key = ?1",
                params![q.key],
            )?;
        }
        tx.commit()?;
        Ok(row)
    }

    /// Seconds until the next unclaimed copy is due (None: queue empty).
    pub fn next_due_in(conn: &Connection) -> Result<Option<i64>> {
        conn.query_row(
            "SELECT MIN(next_attempt_at) FROM writeback_queue WHERE claimed = 0",
            [],
            |r| r.get::<_, Option<i64>>(0),
        )
        .map(|t| t.map(|t| (t - now()).max(0)))
    }

    /// Records a finished copy and removes it from the queue, in one transaction.
    pub fn complete(conn: &Connection, q: &Queued) -> Result<()> {
        let tx = conn.unchecked_transaction()?;
        record(
            &tx,
            &Copy {
                key: q.key.clone(),
                size: q.size,
                md5: q.md5.clone(),
                source: q.source.clone(),
                via: "pull-through".into(),
                copied_at: now(),
            },
        )?;
        tx.execute("DELETE FROM writeback_queue WHERE key = ?1", params![q.key])?;
        tx.commit()
    }

    /// Puts a failed copy back with exponential backoff (2 s doubling, at most 5 min).
    pub fn fail(conn: &Connection, q: &Queued, error: &str) -> Result<()> {
        let delay = 2i64.saturating_pow(q.attempts.min(8) + 1).min(300);
        conn.execute(
            "UPDATE writeback_queue SET claimed = 0, attempts = attempts + 1,
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

    /// Number of copies due now (not waiting out a backoff).
    pub fn due(conn: &Connection) -> Result<u64> {
        conn.query_row(
            "SELECT COUNT(*) FROM writeback_queue WHERE next_attempt_at <= ?1",
            params![now()],
            |r| r.get::<_, i64>(0),
        )
        .map(|n| n as u64)
    }

    /// Number of queued copies.
    pub fn pending(conn: &Connection) -> Result<u64> {
        conn.query_row("SELECT COUNT(*) FROM writeback_queue", [], |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
    }

    /// Records a copy (replacing an older record of the same key).
    pub fn record(conn: &Connection, c: &Copy) -> Result<()> {
        conn.execute(
            "INSERT OR REPLACE INTO copies (key, size, md5, source, via, copied_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![c.key, c.size as i64, c.md5, c.source, c.via, c.copied_at],
        )?;
        Ok(())
    }

    /// The record of `key`, if it was copied.
    pub fn copied(conn: &Connection, key: &str) -> Result<Option<Copy>> {
        conn.query_row(
            "SELECT key, size, md5, source, via, copied_at FROM copies WHERE key = ?1",
            params![key],
            |r| {
                Ok(Copy {
                    key: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    md5: r.get(2)?,
                    source: r.get(3)?,
                    via: r.get(4)?,
                    copied_at: r.get(5)?,
                })
            },
        )
        .optional()
    }
}
