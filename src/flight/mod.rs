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
//! gives one) the right MD5, is it put into the cache and queued for the primary; clients get
//! their last byte as soon as it is verified, before that bookkeeping. A short, stalled or
//! damaged body ends the flight with an error: followers' responses are aborted, and the temp
//! file is deleted.
//!
//! A full, read-only or failing disk does not fail a request: the flight keeps the body (or
//! the rest of it, from the failed write on) in memory within `max_flight_memory` and the
//! herd still shares it, uncached; a body that does not fit there is streamed to each of its
//! requesters on its own ([`Flights::stream_through`], each within a `max_flights` slot,
//! 503 past it), so those do not share a fetch. A
//! flight whose disk failed mid-body takes no new followers from its first failed write or
//! the first failed read-back of its file on ([`Started::unreadable`]): its first part may
//! be unreadable, so later requests start a flight of their own. A follower that needs
//! bytes the flight cannot give it (its part on the failed disk, or a rest that did not fit
//! in memory) reads the body again from the source on its own ([`refetch`]): no client is
//! cut for a local disk's fault (only, past `max_flights`, for want of a slot). A flight
//! that keeps nothing more still reads its source to the end, to verify the bytes it gave
//! before.
//!
//! The work is bounded: `max_flights` source reads and `max_flight_temp_bytes` of temp files
//! at once; past them a flight waits briefly, then answers 503. A follower's refetch is a
//! source read too: it takes a slot of the same `max_flights`, waiting as a flight would,
//! and its response is cut when none comes ([`refetch`]), so a failed disk under a herd does
//! not become a herd on the source. A flight whose temp file takes no more of the body (its
//! disk failed mid-body) gives its temp-disk room back at once, not when it ends.

mod body;
mod disk;
mod refetch;

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::cache::{Cache, CachedMeta};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::negative::NegativeCache;
use crate::store::{BodyCheck, BodyError, ByteStream, ObjectMeta, StoreError, StoreHandle};
use crate::writeback::{Fetched, WriteBack, WriteBackError};

use crate::seldom::Seldom;
pub use body::{CopyError, FlightBody, Limits, MemoryBudget, Part};
pub use disk::DiskHealth;
use refetch::Refetch;

/// A fetch that found its object and started keeping it.
pub struct Started {
    /// The source's metadata (length, type, ETag…).
    pub meta: ObjectMeta,
    /// Name of the store the body comes from.
    pub source: Arc<str>,
    /// True when that store is a fallback (the body will be copied to the primary).
    pub from_fallback: bool,
    /// The body, shared by every follower.
    pub body: Arc<FlightBody>,
    /// Its source, for a follower the body cannot serve.
    source_again: Refetch,
    /// The table it is in, and under which key, for [`Started::unreadable`] (weak: the
    /// table holds its flights, not they the table).
    table: (Weak<Flights>, Key),
}

impl Started {
    /// The whole body read again from its source, for a follower that needs bytes this
    /// flight cannot give it: its part on a cache disk that failed since, or a part kept
    /// nowhere ([`FlightState::rest_unkept`]): same object as announced, verified whole.
    /// `spliced`: the follower sent bytes of this flight before; the store must then show
    /// the object is the same one (an ETag or MD5 in both answers), else this fails. The
    /// read holds a `max_flights` slot to its end; with none free within
    /// `flight_queue_wait`, this fails (the follower's response is cut).
    pub async fn refetch(&self, spliced: bool) -> Result<ByteStream, StoreError> {
        self.source_again.body(&self.meta, spliced).await
    }

    /// A follower could not read this flight's temp file back (`e`: its cache disk failed
    /// since): recorded as that disk's failure, and the flight (`own`, the follower's
    /// receiver) leaves the table at once rather than at its next write, which a slow source
    /// may hold back: requests from now on start a flight of their own (held in memory if it
    /// fits, so that herd still shares one fetch) instead of each reading the source again.
    pub fn unreadable(&self, own: &watch::Receiver<FlightState>, e: &io::Error) {
        let (table, key) = &self.table;
        if let Some(flights) = table.upgrade() {
            flights.leave(key, own);
            flights.dirs.tmp_health.failed(e);
        }
    }
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
    /// The flight or temp-disk limits stayed full: nothing was fetched (503).
    Busy,
    /// The disk failed and the body does not fit in the memory left: each requester streams
    /// it from the source on its own ([`Flights::stream_through`]). After the start (the disk
    /// failed mid-body, [`FlightState::rest_unkept`]), the body was verified but only its
    /// first part kept: each follower reads the rest from the source on its own
    /// ([`Started::refetch`]).
    NoRoom,
}

/// What [`Flights::stream_through`] found.
pub enum Through {
    /// The object's meta, whether a fallback store had it, its body.
    Found(ObjectMeta, bool, ByteStream),
    /// No store has the key.
    NotFound,
    /// `max_flights` stayed full: nothing was fetched (503).
    Busy,
}

/// What followers see of a flight.
#[derive(Clone, Default)]
pub struct FlightState {
    /// Set once a store answered with the object.
    pub started: Option<Arc<Started>>,
    /// Bytes of the body kept so far (file or memory).
    pub written: u64,
    /// Set when the flight keeps no more of the body (its disk failed mid-body and the rest
    /// did not fit in memory): `written` stays where it is, readers past it read the source on
    /// their own ([`Started::refetch`]), and the flight reads on only to verify the body, so
    /// that what it gave them is checked too.
    pub rest_unkept: bool,
    /// Set once the whole body is verified: its last byte may go out.
    pub verified: bool,
    /// Set when the flight is over.
    pub end: Option<End>,
}

/// The local directories flights write to, each with its health.
pub struct Dirs {
    /// Where bodies being fetched go: the cache's `tmp/`, else `data_dir/tmp`.
    pub tmp: PathBuf,
    /// The health of `tmp`'s filesystem.
    pub tmp_health: Arc<DiskHealth>,
    /// `data_dir/tmp`: where a body held in memory is written before it is staged.
    pub data_tmp: PathBuf,
    /// The health of `data_dir` (staging for write-backs).
    pub data_health: Arc<DiskHealth>,
}

/// The table of fetches under way, and what a fetch needs.
pub struct Flights {
    map: Mutex<HashMap<Key, watch::Receiver<FlightState>>>,
    chain: Vec<StoreHandle>,
    cache: Option<Arc<Cache>>,
    writeback: Arc<WriteBack>,
    dirs: Dirs,
    limits: Limits,
    negative: NegativeCache,
    metrics: Metrics,
    /// Every fetch task, so that shutdown can wait for the fetches under way.
    tasks: tokio_util::task::TaskTracker,
    /// The 503s past `max_flights` and past `max_flight_temp_bytes`, logged seldom.
    busy_said: Seldom,
    temp_said: Seldom,
}

impl Flights {
    /// `chain` is the primary followed by the fallbacks; `dirs.tmp` must be on the same
    /// filesystem as the cache (if any) so a finished body is moved, not copied. Fetch tasks
    /// are spawned on `tasks`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        chain: Vec<StoreHandle>,
        cache: Option<Arc<Cache>>,
        writeback: Arc<WriteBack>,
        dirs: Dirs,
        limits: Limits,
        negative: NegativeCache,
        metrics: Metrics,
        tasks: tokio_util::task::TaskTracker,
    ) -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
            chain,
            cache,
            writeback,
            dirs,
            limits,
            negative,
            metrics,
            tasks,
            busy_said: Seldom::default(),
            temp_said: Seldom::default(),
        }
    }

    /// Takes `key` out of the table if its entry is the flight `own` follows (it may have left
    /// already, and a new flight taken its place).
    fn leave(&self, key: &Key, own: &watch::Receiver<FlightState>) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|rx| rx.same_channel(own)) {
            map.remove(key);
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
            let _unregister = Unregister(this.clone(), key.clone(), tx.subscribe());
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

    /// Walks the chain for `key`: the first store that has it, with its index.
    async fn find(&self, key: &Key) -> Result<Option<(usize, crate::store::Object)>, StoreError> {
        let mut last_error = None;
        for (i, store) in self.chain.iter().enumerate() {
            match store.get(key).await {
                Ok(Some(object)) => return Ok(Some((i, object))),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(key = %key, store = store.name(), error = %e, "store read failed; trying the next one");
                    last_error = Some(e);
                }
            }
        }
        match last_error {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    /// Fetches `key` for one client only, straight from its source and kept nowhere: for a
    /// body that neither the disk nor the memory left can hold. It is a source read like a
    /// flight's: it takes a `max_flights` slot (waiting as a flight would; [`Through::Busy`]
    /// when none comes) and holds it until the stream ends or is dropped, so a herd on a full
    /// disk makes no more source reads at once than the cap allows. The stream holds back
    /// its last chunk until the whole body is verified.
    pub async fn stream_through(&self, key: &Key) -> Result<Through, StoreError> {
        let slot = self.limits.flight_now();
        let Some(slot) = self.queue_for(slot, self.limits.flight()).await else {
            self.say_busy(key);
            return Ok(Through::Busy);
        };
        let Some((index, object)) = self.find(key).await? else {
            return Ok(Through::NotFound);
        };
        let store = self.chain[index].name().to_owned();
        let meta = object.meta.clone();
        let body = verified(object.body, &meta, store, key.to_string());
        Ok(Through::Found(meta, index > 0, body::holding(body, slot)))
    }

    /// Logs a 503 past `max_flights`, seldom ([`Seldom`]).
    fn say_busy(&self, key: &Key) {
        if let Some(unsaid) = self.busy_said.say(std::time::Instant::now()) {
            tracing::warn!(key = %key, unsaid, "too many fetches under way (max_flights): 503 (said once per 10 s; `unsaid`: the others since)");
        }
    }

    /// `now` (a slot or temp room taken at once), else waits for `later`, counted in
    /// `fediedge_flights_waiting` while it waits.
    async fn queue_for(
        &self,
        now: Option<OwnedSemaphorePermit>,
        later: impl std::future::Future<Output = Option<OwnedSemaphorePermit>>,
    ) -> Option<OwnedSemaphorePermit> {
        if now.is_some() {
            return now;
        }
        let _queued = self.metrics.flight_queued();
        later.await
    }

    async fn fetch(
        self: &Arc<Self>,
        key: &Key,
        tx: &watch::Sender<FlightState>,
    ) -> Result<End, StoreError> {
        // Before the stores are asked: a purge from now on keeps this body out of the cache.
        let started = std::time::Instant::now();
        let slot = self.limits.flight_now();
        let Some(_slot) = self.queue_for(slot, self.limits.flight()).await else {
            self.say_busy(key);
            return Ok(End::Busy);
        };
        let (index, object) = match self.find(key).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                self.negative.insert(key);
                return Ok(End::NotFound);
            }
            Err(e) => return Ok(End::Failed(Arc::new(e))),
        };
        let store = &self.chain[index];
        let meta = object.meta;
        let size = meta.size;
        let tmp_dir = self.dirs.tmp_health.dir();
        // The disk first (room reserved up front), else memory, else each client on its own.
        let room = self.limits.temp_now(size);
        let Some(temp_room) = self.queue_for(room, self.limits.temp(size)).await else {
            if let Some(unsaid) = self.temp_said.say(std::time::Instant::now()) {
                tracing::warn!(key = %key, size, unsaid, "temp-disk budget full (max_flight_temp_bytes): 503 (said once per 10 s; `unsaid`: the others since)");
            }
            return Ok(End::Busy);
        };
        let dir = self.dirs.tmp.clone();
        let created = tokio::task::spawn_blocking(move || body::create_temp(&dir, size))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        // The room, as long as the body goes to the temp file.
        let mut temp_room = Some(temp_room);
        let (tmp, flight_body) = match created {
            Ok(tmp) => {
                let file = Arc::new(
                    tmp.as_file()
                        .try_clone()
                        .map_err(|e| StoreError::local(tmp_dir, e))?,
                );
                (Some(tmp), FlightBody::file(file))
            }
            Err(e) => {
                self.dirs.tmp_health.failed(&e);
                drop(temp_room.take());
                match self.limits.memory(size) {
                    Some(permit) => (None, FlightBody::memory(permit, size)),
                    None => return Ok(End::NoRoom),
                }
            }
        };
        let flight_body = Arc::new(flight_body);
        tx.send_modify(|s| {
            s.started = Some(Arc::new(Started {
                meta: meta.clone(),
                source: store.name().into(),
                from_fallback: index > 0,
                body: flight_body.clone(),
                source_again: Refetch::new(
                    store.clone(),
                    key.clone(),
                    self.limits.slots(),
                    self.metrics.clone(),
                ),
                table: (Arc::downgrade(self), key.clone()),
            }))
        });
        let integrity = |e: BodyError| StoreError::Integrity {
            store: store.name().to_owned(),
            key: key.to_string(),
            detail: e.to_string(),
        };
        let mut check = BodyCheck::new(&meta);
        let mut body = object.body;
        let mut unkept = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            let at = check.seen();
            check.update(&chunk).map_err(integrity)?;
            if unkept {
                continue;
            }
            if let Some(file) = flight_body.disk_file() {
                let f = file.clone();
                let c = chunk.clone();
                let wrote = tokio::task::spawn_blocking(move || f.write_all_at(&c, at))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)));
                if let Err(e) = wrote {
                    // The disk gave out mid-body. The part before `at` may be unreadable
                    // (EIO): requests from now on start a flight of their own.
                    self.leave(key, &tx.subscribe());
                    self.dirs.tmp_health.failed(&e);
                    // The file takes no more of the body: its room goes back to the
                    // budget now, not when the flight ends (it may read on a long time).
                    drop(temp_room.take());
                    // The rest goes to memory if it fits there; else it is kept nowhere and
                    // each follower reads it from the source on its own.
                    let Some(permit) = self.limits.memory(size - at) else {
                        tracing::debug!(key = %key, at, "no memory for the rest of the body: followers read it from the source");
                        unkept = true;
                        tx.send_modify(|s| s.rest_unkept = true);
                        continue;
                    };
                    flight_body.spill_from(at, permit, size);
                }
            }
            if flight_body.in_memory() {
                flight_body.push(&chunk);
            }
            let written = check.seen();
            tx.send_modify(|s| s.written = written);
        }
        let md5 = check.finish().map_err(integrity)?;
        // Verified: clients get their last byte now, not after the bookkeeping below.
        tx.send_modify(|s| s.verified = true);
        if unkept {
            // Nothing whole to stage or cache.
            return Ok(End::NoRoom);
        }
        let on_disk = match (&tmp, flight_body.in_memory()) {
            (Some(tmp), false) => {
                let f = tmp
                    .as_file()
                    .try_clone()
                    .map_err(|e| StoreError::local(tmp_dir, e))?;
                match tokio::task::spawn_blocking(move || f.sync_data())
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                {
                    Ok(()) => true,
                    Err(e) => {
                        self.dirs.tmp_health.failed(&e);
                        false
                    }
                }
            }
            _ => false,
        };
        if index > 0 {
            let fetched = Fetched {
                key: key.clone(),
                size,
                md5,
                content_type: meta.content_type.clone(),
                source: store.name().to_owned(),
            };
            if let Err(e) = self
                .stage(&flight_body, tmp.as_ref().filter(|_| on_disk), fetched)
                .await
            {
                // Not cached either: the next request fetches it again and retries the copy.
                tracing::error!(key = %key, error = %e, "could not queue the copy to the primary; the next request retries it");
                return Ok(End::Complete);
            }
        }
        let Some(tmp) = tmp.filter(|_| on_disk) else {
            return Ok(End::Complete);
        };
        match &self.cache {
            Some(cache) => {
                let record = CachedMeta::new(key, &meta, md5, store.name());
                let (cache, k, body) = (cache.clone(), key.clone(), tmp.into_temp_path());
                let inserted = tokio::task::spawn_blocking(move || {
                    cache.insert_fetched(&k, body, record, started)
                })
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
                match inserted {
                    Ok(()) => self.dirs.tmp_health.ok(),
                    Err(e) => {
                        self.dirs.tmp_health.failed(&e);
                        tracing::warn!(key = %key, error = %e, "could not store in the cache");
                    }
                }
            }
            None => self.dirs.tmp_health.ok(),
        }
        Ok(End::Complete)
    }

    /// Stages a verified body for the primary: a hard link of the temp file, or (for a body
    /// held in memory) a file written into `data_dir/tmp` first.
    async fn stage(
        &self,
        body: &Arc<FlightBody>,
        tmp: Option<&tempfile::NamedTempFile>,
        fetched: Fetched,
    ) -> Result<(), WriteBackError> {
        let staged = match tmp {
            Some(tmp) => self.writeback.stage(tmp.path(), fetched).await,
            None => {
                let (dir, b) = (self.dirs.data_tmp.clone(), body.clone());
                let written = tokio::task::spawn_blocking(move || {
                    let mut out = tempfile::NamedTempFile::new_in(dir).map_err(CopyError::Write)?;
                    b.copy_to(out.as_file_mut())?;
                    Ok(out)
                })
                .await
                .unwrap_or_else(|e| Err(CopyError::Write(io::Error::other(e))));
                match written {
                    Ok(out) => self.writeback.stage(out.path(), fetched).await,
                    Err(CopyError::Write(source)) => Err(WriteBackError::Staging {
                        dir: self.dirs.data_tmp.clone(),
                        source,
                    }),
                    // The part of the body on a disk that failed mid-body is gone: that
                    // disk's failure, not data_dir's.
                    Err(CopyError::Read(source)) => {
                        self.dirs.tmp_health.failed(&source);
                        let dir = self.dirs.tmp.clone();
                        return Err(WriteBackError::Staging { dir, source });
                    }
                }
            }
        };
        match &staged {
            Ok(()) => self.dirs.data_health.ok(),
            Err(WriteBackError::Staging { source, .. }) => self.dirs.data_health.failed(source),
            Err(WriteBackError::Ledger(_)) => {}
        }
        staged
    }
}

/// Wraps a body so that it fails if it does not match `meta` (length, MD5), holding back its
/// last chunk until the whole body is verified.
fn verified(body: ByteStream, meta: &ObjectMeta, store: String, key: String) -> ByteStream {
    struct St {
        body: ByteStream,
        check: Option<BodyCheck>,
        held: Option<Bytes>,
        store: String,
        key: String,
    }
    let st = St {
        body,
        check: Some(BodyCheck::new(meta)),
        held: None,
        store,
        key,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        let integrity = |st: &St, e: BodyError| StoreError::Integrity {
            store: st.store.clone(),
            key: st.key.clone(),
            detail: e.to_string(),
        };
        loop {
            let check = st.check.as_mut()?;
            match st.body.next().await {
                Some(Ok(chunk)) => {
                    if let Err(e) = check.update(&chunk) {
                        let err = integrity(&st, e);
                        st.check = None;
                        return Some((Err(err), st));
                    }
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.check = None;
                    return Some((Err(e), st));
                }
                None => {
                    let check = st.check.take()?;
                    return match check.finish() {
                        Ok(_) => st.held.take().map(|last| (Ok(last), st)),
                        Err(e) => {
                            let err = integrity(&st, e);
                            Some((Err(err), st))
                        }
                    };
                }
            }
        }
    }))
}

/// Takes a flight out of the table when dropped.
struct Unregister(Arc<Flights>, Key, watch::Receiver<FlightState>);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.leave(&self.1, &self.2);
    }
}
