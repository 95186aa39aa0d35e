//! Write-back: copies bodies fetched from a fallback into the primary.
//!
//! A fetched, verified body is staged in `data_dir/staging/` (a hard link to the flight's
//! file, so no second write) and queued in the ledger; workers put it into the primary and
//! record the copy. The queue is durable: a primary outage or a restart only delays copies.
//! A failed attempt is retried with backoff ([`ops::fail`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::key::Key;
use crate::ledger::{ops, Ledger, Queued};
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
    staging: PathBuf,
    wake: Notify,
    metrics: Metrics,
}

impl WriteBack {
    /// Prepares the queue: staging directory, claims of a previous run released.
    pub async fn open(
        ledger: Ledger,
        primary: StoreHandle,
        data_dir: &Path,
        metrics: Metrics,
    ) -> anyhow::Result<Arc<WriteBack>> {
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&staging)?;
        ledger.run(ops::release_claims).await?;
        let wb = Arc::new(WriteBack {
            ledger,
            primary,
            staging,
            wake: Notify::new(),
            metrics,
        });
        wb.publish().await;
        Ok(wb)
    }

    /// Stages the verified, synced body at `body` (a hard link, so no second write; a copy
    /// across filesystems) and queues its copy into the primary.
    pub async fn stage(&self, body: &Path, fetched: Fetched) -> anyhow::Result<()> {
        let staging = self.staging.clone();
        let body = body.to_owned();
        let staged = tokio::task::spawn_blocking(move || link_into(&staging, &body)).await??;
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
    async fn enqueue(&self, q: Queued) -> anyhow::Result<()> {
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
            let next = self.ledger.run(ops::claim_next).await;
            match next {
                Ok(Some(q)) => self.copy_one(q).await,
                Ok(None) => {
                    let due = self.ledger.run(ops::next_due_in).await.ok().flatten();
                    let wait = due.map_or(Duration::from_secs(60), |s| {
                        Duration::from_secs(s as u64).max(Duration::from_millis(200))
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
            Ok(()) => {
                let q2 = q.clone();
                if let Err(e) = self.ledger.run(move |c| ops::complete(c, &q2)).await {
                    tracing::error!(key = %q.key, error = %e, "write-back: copied but not recorded");
                    return;
                }
                let _ = tokio::fs::remove_file(&q.staged).await;
                self.metrics.writeback(true);
                tracing::debug!(key = %q.key, source = %q.source, "write-back: copied to the primary");
            }
            Err(Failure::Retry(e)) => {
                self.metrics.writeback(false);
                tracing::warn!(key = %q.key, attempt = q.attempts + 1, error = %e, "write-back: copy failed; will retry");
                let q2 = q.clone();
                let _ = self.ledger.run(move |c| ops::fail(c, &q2, &e)).await;
            }
            Err(Failure::Drop(e)) => {
                // The staged body is gone or damaged: no retry can succeed. The row goes, so
                // that it neither blocks the queue nor a later fetch of the key from
                // staging it again.
                self.metrics.writeback(false);
                tracing::error!(key = %q.key, error = %e, "write-back: dropped; the key will be copied when fetched again or by migrate");
                let q2 = q.clone();
                let _ = self.ledger.run(move |c| ops::drop_queued(c, &q2)).await;
                let _ = tokio::fs::remove_file(&q.staged).await;
            }
        }
        self.publish().await;
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
