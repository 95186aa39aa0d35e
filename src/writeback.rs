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

    /// Where flights stage bodies for the queue.
    pub fn staging_dir(&self) -> &Path {
        &self.staging
    }

    /// Queues a copy of the staged file. If the key is queued already, the new staged file is
    /// removed and the older entry kept.
    pub async fn enqueue(&self, q: Queued) -> anyhow::Result<()> {
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
        let result = self.put(&q).await;
        match result {
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
            Err(e) => {
                self.metrics.writeback(false);
                tracing::warn!(key = %q.key, attempt = q.attempts + 1, error = %e, "write-back: copy failed; will retry");
                let msg = e.to_string();
                let q2 = q.clone();
                let _ = self.ledger.run(move |c| ops::fail(c, &q2, &msg)).await;
            }
        }
        self.publish().await;
    }

    async fn put(&self, q: &Queued) -> anyhow::Result<()> {
        let key = Key::parse(&q.key)?;
        let mut md5 = [0u8; 16];
        hex::decode_to_slice(&q.md5, &mut md5)?;
        let meta = ObjectMeta {
            size: q.size,
            content_type: q.content_type.clone(),
            etag: None,
            last_modified: None,
            md5: Some(md5),
        };
        let len = tokio::fs::metadata(&q.staged).await?.len();
        anyhow::ensure!(
            len == q.size,
            "staged file {} has {len} bytes, expected {}",
            q.staged.display(),
            q.size
        );
        self.primary.put(&key, &q.staged, &meta).await?;
        Ok(())
    }

    /// Copies waiting in the queue.
    pub async fn pending(&self) -> u64 {
        self.ledger.run(ops::pending).await.unwrap_or(0)
    }
}
