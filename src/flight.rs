//! One fetch per missing key, read by every requester while it is written.
//!
//! The first request for a key that the cache does not hold starts a fetch task (the
//! *leader*); every request for that key while it runs, the first one included, follows it.
//! The leader walks the chain (primary, then fallbacks), writes the body to a temp file and
//! publishes its progress on a `watch` channel; followers read the file up to the published
//! length and sleep on the channel in between: bytes reach every client as they arrive, with
//! no polling and no copy of the object in memory. The fetch runs to its end even if every
//! client went away, so the copy into the primary still happens.
//!
//! Only once the whole body has arrived, with the announced length and (where the source
//! gives one) the right MD5, is it put into the cache and queued for the primary. A short,
//! stalled or damaged body ends the flight with an error: followers' responses are aborted,
//! and the temp file is deleted.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::cache::{Cache, CachedMeta};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::negative::NegativeCache;
use crate::store::{BodyCheck, ObjectMeta, StoreError, StoreHandle};
use crate::writeback::{Fetched, WriteBack};

/// A fetch that found its object and started writing it.
pub struct Started {
    /// The source's metadata (length, type, ETag…).
    pub meta: ObjectMeta,
    /// Name of the store the body comes from.
    pub source: Arc<str>,
    /// True when that store is a fallback (the body will be copied to the primary).
    pub from_fallback: bool,
    /// The body file, shared by every follower (positional reads).
    pub file: Arc<File>,
}

/// How a flight ended.
#[derive(Clone)]
pub enum End {
    /// The whole body arrived and was verified.
    Complete,
    /// No store has the key.
    NotFound,
    /// The fetch failed (before or during the body).
    Failed(Arc<StoreError>),
}

/// What followers see of a flight.
#[derive(Clone, Default)]
pub struct FlightState {
    /// Set once a store answered with the object.
    pub started: Option<Arc<Started>>,
    /// Bytes of the body written to the file so far.
    pub written: u64,
    /// Set when the flight is over.
    pub end: Option<End>,
}

/// The table of fetches under way, and what a fetch needs.
pub struct Flights {
    map: Mutex<HashMap<Key, watch::Receiver<FlightState>>>,
    chain: Vec<StoreHandle>,
    cache: Option<Arc<Cache>>,
    writeback: Arc<WriteBack>,
    tmp_dir: PathBuf,
    negative: NegativeCache,
    metrics: Metrics,
    /// Every fetch task, so that shutdown can wait for the fetches under way.
    tasks: tokio_util::task::TaskTracker,
}

impl Flights {
    /// `chain` is the primary followed by the fallbacks; `tmp_dir` must be on the same
    /// filesystem as the cache (if any) so a finished body is moved, not copied. Fetch tasks
    /// are spawned on `tasks`.
    pub fn new(
        chain: Vec<StoreHandle>,
        cache: Option<Arc<Cache>>,
        writeback: Arc<WriteBack>,
        tmp_dir: PathBuf,
        negative: NegativeCache,
        metrics: Metrics,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            chain,
            cache,
            writeback,
            tmp_dir,
            negative,
            metrics,
            tasks,
        }
    }

    /// The memory of recent misses.
    pub fn negative(&self) -> &NegativeCache {
        &self.negative
    }

    /// Fetches under way.
    pub fn in_flight(&self) -> usize {
        self.map.lock().len()
    }

    /// Follows the fetch of `key`, starting it if none is under way.
    pub fn join(self: &Arc<Self>, key: &Key) -> watch::Receiver<FlightState> {
        let mut map = self.map.lock();
        if let Some(rx) = map.get(key) {
            self.metrics.coalesced();
            return rx.clone();
        }
        let (tx, rx) = watch::channel(FlightState::default());
        map.insert(key.clone(), rx.clone());
        drop(map);
        let this = self.clone();
        let key = key.clone();
        self.tasks.spawn(async move {
            // Removes the entry however the task ends, a panic included: a dead entry would
            // answer 502 for its key until restart.
            let _unregister = Unregister(this.clone(), key.clone());
            let end = match this.fetch(&key, &tx).await {
                Ok(end) => end,
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "fetch failed");
                    End::Failed(Arc::new(e))
                }
            };
            tx.send_modify(|s| s.end = Some(end));
        });
        rx
    }

    async fn fetch(&self, key: &Key, tx: &watch::Sender<FlightState>) -> Result<End, StoreError> {
        let mut last_error = None;
        let mut found = None;
        for (i, store) in self.chain.iter().enumerate() {
            match store.get(key).await {
                Ok(Some(object)) => {
                    found = Some((i, store, object));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key = %key, store = store.name(), error = %e, "store read failed; trying the next one");
                    last_error = Some(e);
                }
            }
        }
        let Some((index, store, object)) = found else {
            return Ok(match last_error {
                Some(e) => End::Failed(Arc::new(e)),
                None => {
                    self.negative.insert(key);
                    End::NotFound
                }
            });
        };
        let local = |e: io::Error| StoreError::backend("local-disk", e);
        let tmp = tempfile::NamedTempFile::new_in(&self.tmp_dir).map_err(local)?;
        let file = Arc::new(tmp.as_file().try_clone().map_err(local)?);
        let meta = object.meta;
        let size = meta.size;
        tx.send_modify(|s| {
            s.started = Some(Arc::new(Started {
                meta: meta.clone(),
                source: store.name().into(),
                from_fallback: index > 0,
                file: file.clone(),
            }))
        });
        let integrity = |detail: String| StoreError::Integrity {
            store: store.name().to_owned(),
            key: key.to_string(),
            detail,
        };
        let mut check = BodyCheck::new(&meta);
        let mut body = object.body;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            let at = check.seen();
            check.update(&chunk).map_err(integrity)?;
            let f = file.clone();
            tokio::task::spawn_blocking(move || f.write_all_at(&chunk, at))
                .await
                .map_err(|e| local(io::Error::other(e)))?
                .map_err(local)?;
            let written = check.seen();
            tx.send_modify(|s| s.written = written);
        }
        let md5 = check.finish().map_err(integrity)?;
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(|e| local(io::Error::other(e)))?
            .map_err(local)?;
        if index > 0 {
            let fetched = Fetched {
                key: key.clone(),
                size,
                md5,
                content_type: meta.content_type.clone(),
                source: store.name().to_owned(),
            };
            if let Err(e) = self.writeback.stage(tmp.path(), fetched).await {
                // Not cached either: the next request fetches it again and retries the copy.
                tracing::error!(key = %key, error = %e, "could not queue the copy to the primary");
                return Ok(End::Complete);
            }
        }
        if let Some(cache) = &self.cache {
            let record = CachedMeta::new(key, &meta, md5, store.name());
            let (cache, k, body) = (cache.clone(), key.clone(), tmp.into_temp_path());
            let inserted = tokio::task::spawn_blocking(move || cache.insert(&k, body, record))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            if let Err(e) = inserted {
                tracing::error!(key = %key, error = %e, "could not store in the cache");
            }
        }
        Ok(End::Complete)
    }
}

/// Takes a key out of the flight table when dropped.
struct Unregister(Arc<Flights>, Key);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.map.lock().remove(&self.1);
    }
}
