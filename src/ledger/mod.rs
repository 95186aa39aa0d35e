//! The ledger: one SQLite file in `data_dir` holding the durable write-back queue, the record
//! of every copy into a primary (key, destination, size, checksum, source, time) and the
//! migration tables that `migrate` writes ([`crate::migrate::state`]).
//!
//! SQLite (WAL mode) rather than a single-process embedded store because `fediedge migrate`
//! and `fediedge migrate --status` must be able to use the same ledger while `serve` runs.
//! Calls are blocking; [`Ledger::run`] moves them off the async threads.
//!
//! Every copy is recorded under its *destination*, the identity of the primary it went to
//! ([`crate::config::StoreConfig::destination`]): after `[primary]` changes, the old records
//! still count for the old primary and nothing counts for the new one yet.
//!
//! - [`schema`]: the tables, their version (`PRAGMA user_version`) and the in-place upgrade.
//! - [`ops`]: queue and record operations on a connection.
//! - [`lock`]: the `data_dir/lock` file that keeps a second `serve` off the same directory.

pub mod lock;
pub mod ops;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rusqlite::Connection;

pub use lock::DataDirLock;

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// `data_dir` could not be created.
    #[error("cannot create {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was written by a newer fediedge, whose tables this one does not know.
    #[error(
        "ledger {path} has schema version {found}; this fediedge knows up to {known}: upgrade fediedge"
    )]
    TooNew {
        /// The SQLite file.
        path: PathBuf,
        /// The version in the file.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// SQLite failed (disk full, corrupt file, locked for too long, a constraint).
    #[error("ledger: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Result of a ledger operation.
pub type Result<T> = std::result::Result<T, LedgerError>;

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

/// One record of a copy into a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    /// The key.
    pub key: String,
    /// The primary it went to ([`crate::config::StoreConfig::destination`]).
    pub destination: String,
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

impl Ledger {
    /// Opens (or creates) `data_dir/ledger.sqlite`, upgrading an older file in place
    /// ([`schema::upgrade`]). Records of an old file stay unattributed until
    /// [`Ledger::open_for`] names the primary.
    pub fn open(data_dir: &Path) -> Result<Ledger> {
        std::fs::create_dir_all(data_dir).map_err(|source| LedgerError::Dir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join("ledger.sqlite");
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        schema::upgrade(&conn, &path)?;
        Ok(Ledger {
            conn: Arc::new(Mutex::new(conn)),
            path,
        })
    }

    /// As [`Ledger::open`], for a process whose primary is `destination` (`serve`, a `migrate`
    /// run): records that an older ledger kept without a destination are attributed to it
    /// ([`ops::attribute_unknown`]), and that is logged.
    pub fn open_for(data_dir: &Path, destination: &str) -> Result<Ledger> {
        let ledger = Ledger::open(data_dir)?;
        let n = ledger.with(|c| ops::attribute_unknown(c, destination))?;
        if n > 0 {
            tracing::warn!(
                records = n,
                destination,
                "the ledger held records from before destinations were kept; \
                 they are taken to be copies into the primary configured now"
            );
        }
        Ok(ledger)
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
