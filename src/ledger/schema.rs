//! The ledger's tables and their version.
//!
//! The version is SQLite's `PRAGMA user_version`. A file is upgraded in place when opened, in
//! one `BEGIN IMMEDIATE` transaction (a `serve` and a `migrate` starting together upgrade it
//! once), and never dropped:
//!
//! - 0: the first ledgers: `copies` keyed by key alone, migration rows by (source, key), a
//!   boolean `claimed` in the queue. (A new, empty file is also 0.)
//! - 1: every copy and migration row names its destination (`copies` keyed by (key,
//!   destination), migration rows by (source, destination, key)); the queue's claim is a
//!   lease, `claimed_until` (seconds since the epoch), so a claim whose bookkeeping failed
//!   ends on its own; `ledger_notes` holds what the upgrade leaves to do.
//!
//! An old file does not know where its copies went. The upgrade gives them the destination
//! `''` ([`UNATTRIBUTED`]); the first `serve` or `migrate` run after it attributes them to the
//! primary it is configured with ([`super::ops::attribute_unknown`], logged). That is the
//! primary the operator ran the old version with in every case but one: changing `[primary]`
//! in the same restart as the upgrade, which docs/migrate.md warns about.

use std::path::Path;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::{LedgerError, Result};

/// The version this build writes.
pub const VERSION: i64 = 1;

/// The destination of records kept before destinations were (version 0).
pub const UNATTRIBUTED: &str = "";

/// The tables of version 1. The `migration_*` tables are written by
/// [`crate::migrate::state`]; they are declared here so that one file has one version.
const TABLES: &str = "
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
    claimed_until INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS copies (
    key TEXT NOT NULL,
    destination TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    source TEXT NOT NULL,
    via TEXT NOT NULL,
    copied_at INTEGER NOT NULL,
    PRIMARY KEY (key, destination)
);
CREATE TABLE IF NOT EXISTS migration_sources (
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    cursor TEXT,
    listing_done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (source, destination)
);
CREATE TABLE IF NOT EXISTS migration_objects (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER,
    md5 TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    updated_at INTEGER NOT NULL,
    UNIQUE (source, destination, key)
);
CREATE INDEX IF NOT EXISTS migration_objects_todo
    ON migration_objects (source, destination, status, id);
CREATE TABLE IF NOT EXISTS ledger_notes (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The note an upgrade leaves while records are [`UNATTRIBUTED`], so that opening the ledger
/// does not scan `copies` for them every time.
pub const NOTE_UNATTRIBUTED: &str = "unattributed";

/// Brings the file at `path` (open on `conn`) to [`VERSION`].
pub fn upgrade(conn: &Connection, path: &Path) -> Result<()> {
    // IMMEDIATE takes the write lock before reading the version: two processes upgrading at
    // once must not both read version 0.
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(LedgerError::TooNew {
            path: path.to_owned(),
            found,
            known: VERSION,
        });
    }
    if found == VERSION {
        return Ok(());
    }
    let had_rows = found == 0 && from_0(&tx)?;
    tx.execute_batch(TABLES)?;
    if had_rows {
        tx.execute(
            "INSERT OR REPLACE INTO ledger_notes (name, value) VALUES (?1, 'since version 0')",
            [NOTE_UNATTRIBUTED],
        )?;
    }
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    Ok(())
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Version 0 → 1: rebuild the tables whose key gains the destination, keeping every row
/// (ids included: they are the listing order), with the destination [`UNATTRIBUTED`]. Returns
/// whether there were tables to carry over (false for a new file).
fn from_0(conn: &Connection) -> Result<bool> {
    let mut carried = false;
    if table_exists(conn, "writeback_queue")? {
        // 0 and 1, the old flag's values, are instants long past: every row is free.
        conn.execute_batch("ALTER TABLE writeback_queue RENAME COLUMN claimed TO claimed_until")?;
    }
    if table_exists(conn, "copies")? {
        carried = true;
        conn.execute_batch(
            "ALTER TABLE copies RENAME TO copies_v0;
             CREATE TABLE copies (
                 key TEXT NOT NULL, destination TEXT NOT NULL, size INTEGER NOT NULL,
                 md5 TEXT NOT NULL, source TEXT NOT NULL, via TEXT NOT NULL,
                 copied_at INTEGER NOT NULL, PRIMARY KEY (key, destination));
             INSERT INTO copies (key, destination, size, md5, source, via, copied_at)
                 SELECT key, '', size, md5, source, via, copied_at FROM copies_v0;
             DROP TABLE copies_v0;",
        )?;
    }
    if table_exists(conn, "migration_sources")? {
        carried = true;
        conn.execute_batch(
            "ALTER TABLE migration_sources RENAME TO migration_sources_v0;
             CREATE TABLE migration_sources (
                 source TEXT NOT NULL, destination TEXT NOT NULL, started_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL, cursor TEXT,
                 listing_done INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (source, destination));
             INSERT INTO migration_sources
                 (source, destination, started_at, updated_at, cursor, listing_done)
                 SELECT source, '', started_at, updated_at, cursor, listing_done
                 FROM migration_sources_v0;
             DROP TABLE migration_sources_v0;",
        )?;
    }
    if table_exists(conn, "migration_objects")? {
        carried = true;
        conn.execute_batch(
            "DROP INDEX IF EXISTS migration_objects_status;
             ALTER TABLE migration_objects RENAME TO migration_objects_v0;
             CREATE TABLE migration_objects (
                 id INTEGER PRIMARY KEY, source TEXT NOT NULL, destination TEXT NOT NULL,
                 key TEXT NOT NULL, size INTEGER, md5 TEXT,
                 status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0,
                 reason TEXT, updated_at INTEGER NOT NULL, UNIQUE (source, destination, key));
             INSERT INTO migration_objects
                 (id, source, destination, key, size, md5, status, attempts, reason, updated_at)
                 SELECT id, source, '', key, size, md5, status, attempts, reason, updated_at
                 FROM migration_objects_v0;
             DROP TABLE migration_objects_v0;",
        )?;
    }
    Ok(carried)
}
