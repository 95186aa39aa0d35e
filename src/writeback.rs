//! Write-back: copies bodies fetched from a fallback into the primary.
//!
//! A fetched, verified body is staged in `data_dir/staging/` (a hard link to the flight's
//! file, so no second write) and queued in the ledger; workers put it into the primary and
//! record the copy. The queue is durable: a primary outage or a restart only delays copies.
//! A failed attempt is retried with backoff ([`ops::fail`]).
//!
//! A worker's claim on a row is a lease ([`ops::claim_next`]). If the copy succeeded but the
//! ledger cannot record it, the bookkeeping is tried again a few times, then the row is put
//! back with a backoff (the next attempt puts the same bytes again, which is harmless); if
//! even that fails, the lease ends on its own. No row stays claimed until a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::key::Key;
use crate::ledger::{ops, Ledger, LedgerError, Queued};
use crate::metrics::Metrics;
use crate::store::{ObjectMeta, StoreHandle};

/// A verified body fetched from a fallback, to be copied into the primary.
pub struct Fetched {
    /// The key.
    pub key: Key,
    /// Body length.
    pub size: u64,
    /// MD5 of the body.
    pub md5: [u8; 16],
    /// Content-Type from the source.
    pub content_type: Option<String>,
    /// Name of the fallback it came from.
    pub source: String,
}

/// Gives `body` a durable second name in `staging`.
fn link_into(staging: &Path, body: &Path) -> std::io::Result<PathBuf> {
    let staged = tempfile::Builder::new()
        .prefix("wb-")
        .tempfile_in(staging)?
        .into_temp_path();
    let path = staged.to_path_buf();
    // Replace the placeholder by the body itself.
    std::fs::remove_file(&path)?;
    if std::fs::hard_link(body, &path).is_err() {
        std::fs::copy(body, &path)?;
        std::fs::File::open(&path)?.sync_all()?;
    }
    std::fs::File::open(staging)?.sync_all()?;
    staged.keep().map_err(|e| e.error)?;
    Ok(path)
}

/// How long a worker's claim on a queued copy lasts, before the body's share (256 KiB/s):
/// longer than any put may take (puts time out, see [`StoreHandle::put`]).
const CLAIM_LEASE_SECS: i64 = 600;

/// Waits between tries of the bookkeeping after a copy (the ledger may be locked a moment).
const BOOKKEEPING_RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(500),
    Duration::from_secs(2),
];

/// Why the write-back could not be prepared, or a body not queued.
#[derive(Debug, thiserror::Error)]
pub enum WriteBackError {
    /// The staging directory or a staged body could not be written.
    #[error("cannot stage in {dir}: {source}")]
    Staging {
        /// The staging directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Why a copy did not happen.
enum Failure {
    /// Worth another attempt later (the primary is down, slow, refusing for now).
    Retry(String),
    /// No attempt can succeed (the staged body is missing or damaged).
    Drop(String),
}

/// The write-back queue and its workers.
pub struct WriteBack {
    ledger: Ledger,
    primary: StoreHandle,
    destination: String,
    staging: PathBuf,
    wake: Notify,
    metrics: Metrics,
}

impl WriteBack {
    /// Prepares the queue: staging directory, claims of a previous run released (the caller
    /// holds the [`crate::ledger::DataDirLock`], so no other process has live claims).
    /// Copies are recorded under `destination`, the primary's identity.
    pub async fn open(
        ledger: Ledger,
        primary: StoreHandle,
        destination: String,
        data_dir: &Path,
        metrics: Metrics,
    ) -> Result<Arc<WriteBack>, WriteBackError> {
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&staging).map_err(|source| WriteBackError::Staging {
            dir: staging.clone(),
            source,
        })?;
        ledger.run(ops::release_claims).await?;
        let wb = Arc::new(WriteBack {
            ledger,
            primary,
            destination,
            staging,
            wake: Notify::new(),
            metrics,
        });
        wb.publish().await;
        Ok(wb)
    }

    /// Stages the verified, synced body at `body` (a hard link, so no second write; a copy
    /// across filesystems) and queues its copy into the primary.
    pub async fn stage(&self, body: &Path, fetched: Fetched) -> Result<(), WriteBackError> {
        let staging = self.staging.clone();
        let body = body.to_owned();
        let staged = tokio::task::spawn_blocking(move || link_into(&staging, &body))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|source| WriteBackError::Staging {
                dir: self.staging.clone(),
                source,
            })?;
        self.enqueue(Queued {
            key: fetched.key.as_str().to_owned(),
            staged,
            size: fetched.size,
            md5: hex::encode(fetched.md5),
            content_type: fetched.content_type,
            source: fetched.source,
            attempts: 0,
        })
        .await
    }

    /// Queues a copy of the staged file. If the key is queued already, the new staged file is
    /// removed and the older entry kept.
    async fn enqueue(&self, q: Queued) -> Result<(), WriteBackError> {
        let staged = q.staged.clone();
        let added = self.ledger.run(move |c| ops::enqueue(c, &q)).await?;
        if !added {
            let _ = tokio::fs::remove_file(&staged).await;
        }
        self.publish().await;
        self.wake.notify_waiters();
        Ok(())
    }

    async fn publish(&self) {
        if let Ok(n) = self.ledger.run(ops::pending).await {
            self.metrics.set_writeback_pending(n);
        }
    }

    /// Runs `n` workers until `stop` is cancelled.
    pub fn spawn_workers(
        self: &Arc<Self>,
        n: usize,
        stop: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let wb = self.clone();
                let stop = stop.clone();
                tokio::spawn(async move { wb.work(stop).await })
            })
            .collect()
    }

    async fn work(&self, stop: CancellationToken) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            // Register for a wake-up before looking, so an enqueue in between is not missed.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let next = self
                .ledger
                .run(|c| ops::claim_next(c, CLAIM_LEASE_SECS))
                .await;
            match next {
                Ok(Some(q)) => self.copy_one(q).await,
                Ok(None) => {
                    let due = self.ledger.run(ops::next_due_in).await.ok().flatten();
                    // At most a minute: a claimed row counts as due when its lease ends,
                    // which can be far off, and a row given back by another worker wakes
                    // nobody.
                    let wait = due.map_or(Duration::from_secs(60), |s| {
                        Duration::from_secs(s as u64)
                            .clamp(Duration::from_millis(200), Duration::from_secs(60))
                    });
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = woken => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "write-back: ledger error");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        }
    }

    async fn copy_one(&self, q: Queued) {
        match self.put(&q).await {
            Ok(()) => match self.record(&q).await {
                Ok(()) => {
                    // Counted as soon as it is recorded: the staged file is only left-over.
                    self.metrics.writeback(true);
                    let _ = tokio::fs::remove_file(&q.staged).await;
                    tracing::debug!(key = %q.key, source = %q.source, "write-back: copied to the primary");
                }
                Err(e) => {
                    // The row goes back with a backoff (the claim must not outlive this
                    // attempt); the next attempt puts the same bytes again and records them.
                    tracing::error!(key = %q.key, error = %e, "write-back: copied but not recorded; will retry");
                    self.metrics.writeback(false);
                    let reason = format!("copied but not recorded: {e}");
                    self.give_back(&q, reason).await;
                }
            },
            Err(Failure::Retry(e)) => {
                self.metrics.writeback(false);
                tracing::warn!(key = %q.key, attempt = q.attempts + 1, error = %e, "write-back: copy failed; will retry");
                self.give_back(&q, e).await;
            }
            Err(Failure::Drop(e)) => {
                // The staged body is gone or damaged: no retry can succeed. The row goes, so
                // that it neither blocks the queue nor a later fetch of the key from
                // staging it again.
                self.metrics.writeback(false);
                tracing::error!(key = %q.key, error = %e, "write-back: dropped; the key will be copied when fetched again or by migrate");
                let q2 = q.clone();
                if let Err(e) = self.ledger.run(move |c| ops::drop_queued(c, &q2)).await {
                    // The staged body stays: the row, free again when its lease ends, will be
                    // dropped by the next attempt.
                    tracing::error!(key = %q.key, error = %e, "write-back: could not drop the row");
                } else {
                    let _ = tokio::fs::remove_file(&q.staged).await;
                }
            }
        }
        self.publish().await;
    }

    /// Records the copy and removes the row, trying again a few times if the ledger errs.
    async fn record(&self, q: &Queued) -> Result<(), LedgerError> {
        let mut waits = BOOKKEEPING_RETRIES.iter();
        loop {
            let (q2, destination) = (q.clone(), self.destination.clone());
            match self
                .ledger
                .run(move |c| ops::complete(c, &q2, &destination))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => match waits.next() {
                    Some(wait) => {
                        tracing::warn!(key = %q.key, error = %e, "write-back: recording the copy failed; trying again");
                        tokio::time::sleep(*wait).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }

    /// Unclaims the row with a backoff. If even that fails, the claim's lease ends on its own.
    async fn give_back(&self, q: &Queued, reason: String) {
        let q2 = q.clone();
        if let Err(e) = self.ledger.run(move |c| ops::fail(c, &q2, &reason)).await {
            tracing::error!(key = %q.key, error = %e, "write-back: could not release the claim; it ends with its lease");
        }
    }

    async fn put(&self, q: &Queued) -> Result<(), Failure> {
        let drop = |e: String| Failure::Drop(e);
        let key = Key::parse(&q.key).map_err(|e| drop(e.to_string()))?;
        let mut md5 = [0u8; 16];
        hex::decode_to_slice(&q.md5, &mut md5).map_err(|e| drop(e.to_string()))?;
        let meta = ObjectMeta {
            size: q.size,
            content_type: q.content_type.clone(),
            etag: None,
            last_modified: None,
            md5: Some(md5),
        };
        let len = tokio::fs::metadata(&q.staged)
            .await
            .map_err(|e| drop(format!("staged body {}: {e}", q.staged.display())))?
            .len();
        if len != q.size {
            return Err(drop(format!(
                "staged body {} has {len} bytes, expected {}",
                q.staged.display(),
                q.size
            )));
        }
        self.primary
            .put(&key, &q.staged, &meta)
            .await
            .map_err(|e| Failure::Retry(e.to_string()))
    }

    /// Copies due now (not waiting out a backoff): what live work means for the backfill.
    pub async fn due(&self) -> u64 {
        self.ledger.run(ops::due).await.unwrap_or(0)
    }
}
