//! One object: decide whether it needs a copy, and copy it verified.
//!
//! A copy reads the source body into memory (up to 4 MiB) or a temp file in
//! `data_dir/tmp-migrate`, counting its length and MD5 as it goes (under the byte budget).
//! Only a body with the announced length and, where the source gives one, the right MD5 is
//! handed to the primary's `put`/`put_bytes`, with that MD5 (an S3 primary checks it against
//! the ETag it answers). Only then is the copy recorded in the ledger. Anything else leaves
//! the primary untouched; the temp file is deleted when dropped.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::budget::Budget;
use super::progress::Counters;
use super::state::{self, Planned, Route};
use crate::key::Key;
use crate::ledger::{self, Copy, Ledger};
use crate::store::{BodyCheck, ObjectMeta, StoreHandle};

/// What every object's work needs; shared by all of them.
pub struct Ctx {
    /// The store being migrated.
    pub source: StoreHandle,
    /// Where objects go.
    pub primary: StoreHandle,
    /// Which source into which primary (the primary's identity is what copies are recorded
    /// under).
    pub route: Route,
    /// The ledger (record of copies and the migration table).
    pub ledger: Ledger,
    /// The load budget on the source.
    pub budget: Budget,
    /// Temp files of bodies being read.
    pub tmp_dir: tempfile::TempDir,
    /// Progress counters.
    pub counters: Arc<Counters>,
    /// Retries after a failed attempt.
    pub retries: u32,
    /// Wait before the first retry; doubled for each next one.
    pub retry_delay: Duration,
    /// In a backfill inside `serve`: while this reads `true` (live misses or write-backs under
    /// way), no new object is started, so the hot path always comes first.
    pub gate: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Counts one object waiting at the live-work gate until dropped (also when the wait is
/// cancelled).
struct HeldAtGate<'a>(&'a Counters);

impl<'a> HeldAtGate<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.held_at_gate.fetch_add(1, Relaxed);
        HeldAtGate(counters)
    }
}

impl Drop for HeldAtGate<'_> {
    fn drop(&mut self) {
        self.0.held_at_gate.fetch_sub(1, Relaxed);
    }
}

/// Why an attempt did not finish.
#[derive(Debug)]
pub enum AttemptError {
    /// Worth trying again (network, timeout, short or damaged body, primary refused).
    Retry(String),
    /// Trying again will not help (the source no longer has the key, a bad key).
    Permanent(String),
    /// The run is stopping; nothing was written.
    Cancelled,
}

/// What an attempt achieved.
enum Done {
    Copied { size: u64, md5: [u8; 16] },
    Skipped { size: u64, reason: String },
}

impl Ctx {
    /// Works on one key to its end: copies it (with retries and backoff) or finds it needs no
    /// copy, and records the outcome. `permit` is this object's concurrency slot; it is given
    /// back while waiting between attempts.
    pub async fn process(
        self: Arc<Self>,
        item: Planned,
        slots: Arc<Semaphore>,
        permit: tokio::sync::OwnedSemaphorePermit,
        stop: CancellationToken,
    ) {
        let mut permit = Some(permit);
        let mut attempt = 0u32;
        let key = match Key::parse(&item.key) {
            Ok(k) => k,
            Err(e) => {
                self.give_up(&item.key, &e.to_string()).await;
                return;
            }
        };
        loop {
            // The budget waits and the read watch `stop` themselves; the checks before them
            // are short and end on their own.
            match self.attempt(&key, &item, &stop).await {
                Ok(done) => {
                    if item.size.is_none() {
                        let size = match &done {
                            Done::Copied { size, .. } | Done::Skipped { size, .. } => *size,
                        };
                        self.counters.learn_size(size);
                    }
                    self.finish(&key, done).await;
                    return;
                }
                Err(AttemptError::Cancelled) => return,
                Err(AttemptError::Permanent(reason)) => {
                    self.give_up(key.as_str(), &reason).await;
                    return;
                }
                Err(AttemptError::Retry(reason)) if attempt >= self.retries => {
                    self.give_up(key.as_str(), &reason).await;
                    return;
                }
                Err(AttemptError::Retry(reason)) => {
                    let wait = self.retry_delay.saturating_mul(1 << attempt.min(16));
                    tracing::info!(key = %key, error = %reason, retry_in = ?wait, "copy failed; will retry");
                    self.record_attempt(key.as_str(), &reason, false).await;
                    attempt += 1;
                    // Waiting takes no slot: other objects go on meanwhile.
                    drop(permit.take());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return,
                    }
                    let again = tokio::select! {
                        p = slots.clone().acquire_owned() => p,
                        _ = stop.cancelled() => return,
                    };
                    let Ok(again) = again else { return };
                    permit.replace(again);
                }
            }
        }
    }

    async fn attempt(
        &self,
        key: &Key,
        item: &Planned,
        stop: &CancellationToken,
    ) -> Result<Done, AttemptError> {
        if let Some(gate) = &self.gate {
            let mut gate = gate.clone();
            let _waiting = HeldAtGate::new(&self.counters);
            tokio::select! {
                open = gate.wait_for(|busy| !busy) => {
                    if open.is_err() {
                        return Err(AttemptError::Cancelled);
                    }
                }
                _ = stop.cancelled() => return Err(AttemptError::Cancelled),
            }
        }
        if let Some(skip) = self.needs_no_copy(key, item).await? {
            return Ok(skip);
        }
        self.copy(key, stop).await
    }

    /// `Some` when the ledger records a copy of `key` into this primary, or the primary holds an object of the
    /// same size (and MD5 where both are known). Never reads the source body; asks the source
    /// for metadata only when the listing gave no size (keys from a file).
    async fn needs_no_copy(&self, key: &Key, item: &Planned) -> Result<Option<Done>, AttemptError> {
        let listed = item.size;
        // Read with the batch; a copy the edge records after that is caught by the HEAD below.
        if let Some((size, via)) = &item.recorded {
            return Ok(Some(Done::Skipped {
                size: *size,
                reason: format!("already copied ({via})"),
            }));
        }
        let in_primary = self
            .primary
            .head(key)
            .await
            .map_err(|e| AttemptError::Retry(format!("primary: {e}")))?;
        let Some(there) = in_primary else {
            return Ok(None);
        };
        let (size, md5) = match listed {
            Some(size) => (size, item.md5),
            None => {
                self.budget.op().await;
                match self.source.head(key).await {
                    Ok(Some(m)) => (m.size, m.md5),
                    Ok(None) => {
                        return Err(AttemptError::Permanent("not found in the source".into()))
                    }
                    Err(e) => return Err(AttemptError::Retry(e.to_string())),
                }
            }
        };
        let same_md5 = match (md5, there.md5) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if there.size == size && same_md5 {
            return Ok(Some(Done::Skipped {
                size,
                reason: "already in the primary".into(),
            }));
        }
        tracing::warn!(key = %key, primary_size = there.size, source_size = size, "the primary holds a different object; replacing it");
        Ok(None)
    }

    /// Reads the source body into a temp file, verifies it, puts it into the primary.
    async fn copy(&self, key: &Key, stop: &CancellationToken) -> Result<Done, AttemptError> {
        let retry = |e: &dyn std::fmt::Display| AttemptError::Retry(e.to_string());
        // An S3 source answers a read with two requests (HEAD for the metadata, then one
        // GET): the budget counts what the source sees.
        let requests = if self.source.kind() == crate::config::StoreType::S3 {
            2
        } else {
            1
        };
        for _ in 0..requests {
            tokio::select! {
                _ = self.budget.op() => {}
                _ = stop.cancelled() => return Err(AttemptError::Cancelled),
            }
        }
        let object = tokio::select! {
            r = self.source.get(key) => r.map_err(|e| retry(&e))?,
            _ = stop.cancelled() => return Err(AttemptError::Cancelled),
        };
        let Some(object) = object else {
            return Err(AttemptError::Permanent("not found in the source".into()));
        };
        let meta = object.meta;
        let size = meta.size;
        let mut spool = Spool::new(size, self.tmp_dir.path()).map_err(|e| retry(&e))?;
        let mut check = BodyCheck::new(&meta);
        let mut body = object.body;
        loop {
            let chunk = tokio::select! {
                c = body.next() => c,
                _ = stop.cancelled() => return Err(AttemptError::Cancelled),
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| retry(&e))?;
            check
                .update(&chunk)
                .map_err(|e| AttemptError::Retry(format!("{key}: {e}")))?;
            tokio::select! {
                _ = self.budget.bytes(chunk.len()) => {}
                _ = stop.cancelled() => return Err(AttemptError::Cancelled),
            }
            spool.write(&chunk).await.map_err(|e| retry(&e))?;
        }
        drop(body);
        let md5 = check
            .finish()
            .map_err(|e| AttemptError::Retry(format!("{key}: {e}")))?;
        let spooled = spool.finish().await.map_err(|e| retry(&e))?;
        // The body is whole and verified: the put runs to its end even if the run is stopping
        // (a put is atomic in every store, so stopping it would gain nothing).
        let put_meta = ObjectMeta {
            size,
            content_type: meta.content_type,
            etag: None,
            last_modified: meta.last_modified,
            md5: Some(md5),
        };
        let put = match spooled {
            Spooled::Memory(body) => self.primary.put_bytes(key, body, &put_meta).await,
            Spooled::File(tmp) => self.primary.put(key, tmp.path(), &put_meta).await,
        };
        put.map_err(|e| AttemptError::Retry(format!("primary: {e}")))?;
        Ok(Done::Copied { size, md5 })
    }

    async fn finish(&self, key: &Key, done: Done) {
        let route = self.route.clone();
        let k = key.as_str().to_owned();
        let c = &self.counters;
        let result = match done {
            Done::Copied { size, md5 } => {
                let copy = Copy {
                    key: k,
                    destination: route.destination.clone(),
                    size,
                    md5: hex::encode(md5),
                    source: route.source.clone(),
                    via: "migrate".into(),
                    copied_at: ledger::now(),
                };
                let r = self
                    .ledger
                    .run(move |conn| state::mark_copied(conn, &route.source, &copy))
                    .await;
                if r.is_ok() {
                    c.copied.fetch_add(1, Relaxed);
                    c.copied_bytes.fetch_add(size, Relaxed);
                }
                r
            }
            Done::Skipped { size, reason } => {
                tracing::debug!(key = %key, reason, "no copy needed");
                let r = self
                    .ledger
                    .run(move |conn| state::mark_skipped(conn, &route, &k, size, &reason))
                    .await;
                if r.is_ok() {
                    c.skipped.fetch_add(1, Relaxed);
                    c.skipped_bytes.fetch_add(size, Relaxed);
                }
                r
            }
        };
        if let Err(e) = result {
            tracing::error!(key = %key, error = %e, "could not record in the ledger");
            c.failed.fetch_add(1, Relaxed);
        }
    }

    async fn give_up(&self, key: &str, reason: &str) {
        tracing::warn!(key, error = reason, "copy failed; giving up for this run");
        self.counters.failed.fetch_add(1, Relaxed);
        self.record_attempt(key, reason, true).await;
    }

    async fn record_attempt(&self, key: &str, reason: &str, given_up: bool) {
        let (route, k, reason) = (self.route.clone(), key.to_owned(), reason.to_owned());
        let r = self
            .ledger
            .run(move |c| state::mark_attempt_failed(c, &route, &k, &reason, given_up))
            .await;
        if let Err(e) = r {
            tracing::error!(key, error = %e, "could not record the failure in the ledger");
        }
    }
}

/// Largest body held in memory until it is whole; larger ones are written to the temp file as
/// they arrive.
const MEMORY_SPOOL: u64 = 4 * 1024 * 1024;

/// Where a body goes while it is read. Small bodies (most media) stay in memory and are put
/// from there: no temp file, no thread hop per chunk.
enum Spool {
    Memory(Vec<u8>),
    File(
        tokio::io::BufWriter<tokio::fs::File>,
        tempfile::NamedTempFile,
    ),
}

impl Spool {
    fn new(size: u64, dir: &std::path::Path) -> Result<Spool, String> {
        if size <= MEMORY_SPOOL {
            return Ok(Spool::Memory(Vec::with_capacity(size as usize)));
        }
        let tmp = temp_file(dir)?;
        let file = tmp.reopen().map_err(|e| format!("temp file: {e}"))?;
        let out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
        Ok(Spool::File(out, tmp))
    }

    async fn write(&mut self, chunk: &[u8]) -> Result<(), String> {
        match self {
            Spool::Memory(buf) => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
            Spool::File(out, _) => out
                .write_all(chunk)
                .await
                .map_err(|e| format!("temp file: {e}")),
        }
    }

    /// The complete body.
    async fn finish(self) -> Result<Spooled, String> {
        match self {
            Spool::Memory(buf) => Ok(Spooled::Memory(buf.into())),
            Spool::File(mut out, tmp) => {
                out.flush().await.map_err(|e| format!("temp file: {e}"))?;
                Ok(Spooled::File(tmp))
            }
        }
    }
}

/// A whole, verified body.
enum Spooled {
    Memory(bytes::Bytes),
    /// A temp file, deleted when dropped.
    File(tempfile::NamedTempFile),
}

fn temp_file(dir: &std::path::Path) -> Result<tempfile::NamedTempFile, String> {
    tempfile::Builder::new()
        .prefix("m-")
        .tempfile_in(dir)
        .map_err(|e| format!("temp file: {e}"))
}
