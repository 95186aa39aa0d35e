//! The local disk cache, with a small in-memory tier for hot objects.
//!
//! Layout under `dir`: `objects/<hh>/<md5(key)>` holds a body, `…​.meta` beside it the JSON
//! [`CachedMeta`] (key, size, MD5, headers), `tmp/` holds bodies still being fetched. A body
//! is renamed into place only after it was verified, its meta written just before; at start
//! the cache re-reads every meta in the background ([`load`]) while requests are already
//! answered (a key not yet loaded is looked up by its files, whose paths follow from the
//! key), drops entries whose body is missing or of the wrong length, and re-checks each
//! body's MD5 the first time it is served, once however many clients ask. A damaged file is
//! removed and refetched, never served.
//!
//! The index lock is never held across disk I/O: renames, meta writes and unlinks happen
//! outside it; a key being unlinked is marked so that a new insert of it waits for the
//! unlink instead of losing its files to it.
//!
//! Eviction is least-recently-used by bytes; the policy is the `lru` crate, the accounting is
//! here. Hot objects up to `memory_max_object` are also kept in memory as shared [`Bytes`],
//! handed to every response without a copy.

mod load;
mod meta;

pub(crate) use load::{changed_since, wait_while_held};
#[doc(hidden)]
pub use load::{hold_index_load, LoadHold};
pub use meta::CachedMeta;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// How often a hit is recorded in the body's mtime (the LRU order used after a restart).
const TOUCH_EVERY: Duration = Duration::from_secs(600);

use bytes::Bytes;
use lru::LruCache;
use md5::{Digest, Md5};
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::key::Key;
use crate::metrics::Metrics;
use crate::store::ObjectMeta;

/// The body of a cache hit.
pub enum HitBody {
    /// The whole body, shared.
    Memory(Bytes),
    /// An open, verified file.
    File(Arc<File>),
}

/// A cache hit.
pub struct Hit {
    /// The object's metadata, as the source gave it.
    pub meta: Arc<ObjectMeta>,
    /// Its body.
    pub body: HitBody,
    /// The head of a full `200` answer for this entry, built by the edge on the entry's first
    /// plain hit and kept (and dropped) with the entry: later hits clone it instead of
    /// rebuilding every header. The cache never reads it.
    pub head: Arc<OnceLock<http::HeaderMap>>,
}

struct Entry {
    meta: Arc<CachedMeta>,
    /// `meta` as store metadata, converted once rather than on every hit.
    object: Arc<ObjectMeta>,
    /// See [`Hit::head`].
    head: Arc<OnceLock<http::HeaderMap>>,
    /// MD5 checked since this process loaded the entry.
    verified: bool,
    /// When this process last recorded a use of the entry on disk (None: not yet).
    touched: Option<Instant>,
}

impl Entry {
    fn new(meta: CachedMeta, verified: bool) -> Entry {
        Entry {
            object: Arc::new(meta.to_object_meta()),
            head: Arc::default(),
            meta: Arc::new(meta),
            verified,
            touched: None,
        }
    }
}

struct State {
    index: LruCache<Key, Entry>,
    bytes: u64,
    memory: LruCache<Key, Bytes>,
    memory_bytes: u64,
    /// Keys whose files are being unlinked (outside the lock); an insert of one waits.
    unlinking: HashSet<Key>,
    /// While the index loads: keys removed meanwhile, which the loader must not bring back.
    tombstones: Option<HashSet<Key>>,
    /// When keys were last purged (the cache buster): a fetch that started before must not
    /// cache what it read. Bounded; the oldest purges are forgotten first.
    purged: LruCache<Key, Instant>,
}

/// Purges remembered for fetches under way ([`Cache::purge`]).
const MAX_PURGES_KEPT: std::num::NonZeroUsize = std::num::NonZeroUsize::new(65_536).unwrap();

/// The disk cache.
pub struct Cache {
    dir: PathBuf,
    config: CacheConfig,
    state: Mutex<State>,
    /// Signalled when a key leaves `unlinking`.
    unlinked: Condvar,
    /// One MD5 check per key at a time: later askers wait for its result.
    verifying: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<()>>>>,
    /// True while the index is still loading.
    loading: watch::Sender<bool>,
    metrics: Metrics,
}

/// Empties `dir` (creating it if missing), ignoring what fails: on a full or read-only disk
/// the start goes on with whatever is left.
pub fn clear_dir(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot create a temp directory; fetches will be served from memory");
    }
}

impl Cache {
    /// Opens (or creates) the cache and returns at once: the index loads in the background
    /// ([`Cache::loaded`]). A full or read-only disk does not stop it.
    pub fn open(config: &CacheConfig, metrics: Metrics) -> io::Result<Arc<Cache>> {
        let dir = config.dir.clone();
        if let Err(e) = std::fs::create_dir_all(dir.join("objects")) {
            if !dir.join("objects").is_dir() {
                return Err(e);
            }
        }
        // Bodies that were being fetched when the process stopped are incomplete by definition.
        clear_dir(&dir.join("tmp"));
        let cache = Arc::new(Cache {
            dir,
            config: config.clone(),
            state: Mutex::new(State {
                index: LruCache::unbounded(),
                bytes: 0,
                memory: LruCache::unbounded(),
                memory_bytes: 0,
                unlinking: HashSet::new(),
                tombstones: Some(HashSet::new()),
                purged: LruCache::new(MAX_PURGES_KEPT),
            }),
            unlinked: Condvar::new(),
            verifying: Mutex::new(HashMap::new()),
            loading: watch::channel(true).0,
            metrics,
        });
        cache.metrics.set_cache_index_loading(true);
        let c = cache.clone();
        std::thread::Builder::new()
            .name("cache-load".into())
            .spawn(move || load::load(&c))?;
        Ok(cache)
    }

    /// Waits until the index has loaded.
    pub async fn loaded(&self) {
        let mut rx = self.loading.subscribe();
        let _ = rx.wait_for(|loading| !loading).await;
    }

    /// True while the index is still loading.
    pub fn is_loading(&self) -> bool {
        *self.loading.borrow()
    }

    /// Where bodies being fetched are written (same filesystem as the objects, so that
    /// [`Cache::insert`] is a rename).
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    fn paths(&self, key: &Key) -> (PathBuf, PathBuf) {
        let hash = hex::encode(Md5::digest(key.as_str().as_bytes()));
        let sub = self.dir.join("objects").join(&hash[..2]);
        (sub.join(&hash), sub.join(format!("{hash}.meta")))
    }

    /// Looks `key` up. A body not yet checked since start is checked now (MD5 over the file,
    /// once per key however many ask); a damaged or truncated one is removed and `None`
    /// returned, so the caller refetches.
    pub async fn lookup(self: &Arc<Self>, key: &Key) -> Option<Hit> {
        match self.indexed(key) {
            Indexed::Memory(hit) => return Some(hit),
            Indexed::Disk(record, meta, head, verified) => {
                return self.open_hit(key, record, meta, head, verified).await
            }
            Indexed::Absent if !self.is_loading() => return None,
            Indexed::Absent => {}
        }
        // Not loaded yet: the key's files say whether it is cached.
        let this = self.clone();
        let k = key.clone();
        let found = tokio::task::spawn_blocking(move || load::read_entry(&this, &k))
            .await
            .ok()
            .flatten()?;
        {
            let mut state = self.state.lock();
            if state.tombstones.as_ref().is_some_and(|t| t.contains(key)) {
                return None;
            }
            if !state.index.contains(key) {
                state.bytes += found.size;
                state.index.put(key.clone(), Entry::new(found, false));
            }
        }
        self.publish();
        match self.indexed(key) {
            Indexed::Memory(hit) => Some(hit),
            Indexed::Disk(record, meta, head, verified) => {
                self.open_hit(key, record, meta, head, verified).await
            }
            Indexed::Absent => None,
        }
    }

    /// What the index says of `key` (and a use recorded).
    fn indexed(&self, key: &Key) -> Indexed {
        let mut guard = self.state.lock();
        let state = &mut *guard;
        let Some(entry) = state.index.get_mut(key) else {
            return Indexed::Absent;
        };
        // Record the use on disk now and then (the body's mtime), so that the LRU order
        // survives a restart without a syscall on every hit.
        if entry.touched.is_none_or(|t| t.elapsed() > TOUCH_EVERY) {
            entry.touched = Some(Instant::now());
            let (path, _) = self.paths(key);
            tokio::task::spawn_blocking(move || {
                let _ = File::options()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            });
        }
        match state.memory.get(key) {
            Some(bytes) => Indexed::Memory(Hit {
                meta: entry.object.clone(),
                body: HitBody::Memory(bytes.clone()),
                head: entry.head.clone(),
            }),
            None => Indexed::Disk(
                entry.meta.clone(),
                entry.object.clone(),
                entry.head.clone(),
                entry.verified,
            ),
        }
    }

    /// Opens an indexed body; one client at a time per key reads it whole (MD5 check or
    /// memory tier), the others then find it verified or in memory.
    async fn open_hit(
        self: &Arc<Self>,
        key: &Key,
        record: Arc<CachedMeta>,
        meta: Arc<ObjectMeta>,
        head: Arc<OnceLock<http::HeaderMap>>,
        mut verified: bool,
    ) -> Option<Hit> {
        let to_memory =
            self.config.memory_max_size > 0 && record.size <= self.config.memory_max_object;
        let _turn = if !verified || to_memory {
            let turn = self
                .verifying
                .lock()
                .entry(key.clone())
                .or_default()
                .clone();
            let guard = turn.lock_owned().await;
            // Whoever went first may have done the work.
            match self.indexed(key) {
                Indexed::Memory(hit) => return Some(hit),
                Indexed::Absent => return None,
                Indexed::Disk(_, _, _, v) => verified = v,
            }
            Some(guard)
        } else {
            None
        };
        let this = self.clone();
        let key2 = key.clone();
        let opened = tokio::task::spawn_blocking(move || this.open_body(&key2, &record, verified))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
        if _turn.is_some() {
            self.verifying.lock().remove(key);
        }
        match opened {
            Ok(body) => Some(Hit { meta, body, head }),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cache: damaged body removed; refetching");
                let (this, k) = (self.clone(), key.clone());
                let _ = tokio::task::spawn_blocking(move || this.remove(&k)).await;
                None
            }
        }
    }

    fn open_body(&self, key: &Key, meta: &CachedMeta, verified: bool) -> io::Result<HitBody> {
        let (path, _) = self.paths(key);
        let mut file = File::open(&path)?;
        let len = file.metadata()?.len();
        if len != meta.size {
            return Err(io::Error::other(format!(
                "length {len}, expected {}",
                meta.size
            )));
        }
        let to_memory =
            self.config.memory_max_size > 0 && meta.size <= self.config.memory_max_object;
        if verified && !to_memory {
            return Ok(HitBody::File(Arc::new(file)));
        }
        // Either the MD5 must be checked or the body goes to memory: both read it whole.
        if !verified {
            self.metrics.cache_verification();
        }
        let mut hasher = Md5::new();
        let mut kept = if to_memory {
            Vec::with_capacity(meta.size as usize)
        } else {
            Vec::new()
        };
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if to_memory {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        if hex::encode(hasher.finalize()) != meta.md5 {
            return Err(io::Error::other("MD5 does not match the record"));
        }
        let mut state = self.state.lock();
        if let Some(e) = state.index.peek_mut(key) {
            e.verified = true;
        }
        if to_memory {
            let bytes = Bytes::from(kept);
            self.remember(&mut state, key, bytes.clone());
            drop(state);
            self.publish();
            Ok(HitBody::Memory(bytes))
        } else {
            Ok(HitBody::File(Arc::new(file)))
        }
    }

    fn remember(&self, state: &mut State, key: &Key, bytes: Bytes) {
        state.memory_bytes += bytes.len() as u64;
        if let Some(old) = state.memory.put(key.clone(), bytes) {
            state.memory_bytes -= old.len() as u64;
        }
        while state.memory_bytes > self.config.memory_max_size {
            match state.memory.pop_lru() {
                Some((_, b)) => state.memory_bytes -= b.len() as u64,
                None => break,
            }
        }
    }

    /// Moves the verified body at `tmp` (in [`Cache::tmp_dir`]) into the cache under `key`.
    /// The files are written outside the index lock: the meta first, then the body's rename,
    /// then the index entry; a failure leaves neither file behind.
    pub fn insert(&self, key: &Key, tmp: tempfile::TempPath, meta: CachedMeta) -> io::Result<()> {
        self.insert_since(key, tmp, meta, None)
    }

    /// [`Cache::insert`] of a body whose fetch started at `started`: not kept if the key was
    /// purged since (the body may be what the purge was meant to drop).
    pub fn insert_fetched(
        &self,
        key: &Key,
        tmp: tempfile::TempPath,
        meta: CachedMeta,
        started: Instant,
    ) -> io::Result<()> {
        self.insert_since(key, tmp, meta, Some(started))
    }

    fn insert_since(
        &self,
        key: &Key,
        tmp: tempfile::TempPath,
        meta: CachedMeta,
        started: Option<Instant>,
    ) -> io::Result<()> {
        if meta.size > self.config.max_size {
            return Ok(()); // Larger than the whole cache: serve it, don't keep it.
        }
        let purged_since = |state: &mut State| {
            started.is_some_and(|t| state.purged.peek(key).is_some_and(|p| *p >= t))
        };
        let (path, meta_path) = self.paths(key);
        let record = serde_json::to_vec(&meta)?;
        {
            // An older entry of the key goes first, and no unlink of its files may still be
            // pending: it would remove the new ones.
            let mut state = self.state.lock();
            if purged_since(&mut state) {
                return Ok(());
            }
            if let Some(old) = state.index.pop(key) {
                state.bytes -= old.meta.size;
            }
            if let Some(b) = state.memory.pop(key) {
                state.memory_bytes -= b.len() as u64;
            }
            while state.unlinking.contains(key) {
                self.unlinked.wait(&mut state);
            }
        }
        std::fs::create_dir_all(path.parent().expect("object paths have a parent"))?;
        write_atomic(&meta_path, &record)?;
        if let Err(e) = tmp.persist(&path) {
            let _ = std::fs::remove_file(&meta_path);
            return Err(e.error);
        }
        let victims = {
            let mut state = self.state.lock();
            if purged_since(&mut state) {
                // Purged while the files were written: they go.
                drop(state);
                let _ = std::fs::remove_file(&meta_path);
                let _ = std::fs::remove_file(&path);
                return Ok(());
            }
            state.bytes += meta.size;
            if let Some(old) = state.index.put(key.clone(), Entry::new(meta, true)) {
                state.bytes -= old.meta.size;
            }
            self.evict_locked(&mut state)
        };
        self.unlink_all(victims);
        self.publish();
        Ok(())
    }

    /// Removes `key` for the cache buster; whether it held it. A fetch of the key under way
    /// now does not cache its body ([`Cache::insert_fetched`]).
    pub fn purge(&self, key: &Key) -> bool {
        self.state.lock().purged.put(key.clone(), Instant::now());
        self.remove(key)
    }

    /// Removes `key` from the cache; whether it held it (on disk or in memory). While the
    /// index loads, a body not yet indexed is removed too (a tombstone) but not counted.
    pub fn remove(&self, key: &Key) -> bool {
        let mut held = false;
        {
            let mut state = self.state.lock();
            if let Some(e) = state.index.pop(key) {
                state.bytes -= e.meta.size;
                held = true;
            }
            if let Some(b) = state.memory.pop(key) {
                state.memory_bytes -= b.len() as u64;
                held = true;
            }
            if let Some(t) = state.tombstones.as_mut() {
                t.insert(key.clone());
            }
            state.unlinking.insert(key.clone());
        }
        self.unlink_all(vec![key.clone()]);
        self.publish();
        held
    }

    fn evict(&self) {
        let victims = self.evict_locked(&mut self.state.lock());
        self.unlink_all(victims);
        self.publish();
    }

    /// Takes least recently used objects out of the index until the disk budget holds and
    /// marks them as being unlinked; the caller unlinks them after the lock is released.
    /// Nothing is evicted while the index loads (the byte count is not whole yet).
    fn evict_locked(&self, state: &mut State) -> Vec<Key> {
        let mut victims = Vec::new();
        if state.tombstones.is_some() {
            return victims;
        }
        while state.bytes > self.config.max_size {
            let Some((key, e)) = state.index.pop_lru() else {
                break;
            };
            state.bytes -= e.meta.size;
            if let Some(b) = state.memory.pop(&key) {
                state.memory_bytes -= b.len() as u64;
            }
            state.unlinking.insert(key.clone());
            victims.push(key);
        }
        victims
    }

    /// Deletes bodies and records (outside the lock), then lets waiting inserts of those
    /// keys go on. Readers holding a body open keep reading it (Unix).
    fn unlink_all(&self, keys: Vec<Key>) {
        if keys.is_empty() {
            return;
        }
        for key in &keys {
            let (path, meta_path) = self.paths(key);
            let _ = std::fs::remove_file(meta_path);
            let _ = std::fs::remove_file(path);
        }
        let mut state = self.state.lock();
        for key in &keys {
            state.unlinking.remove(key);
        }
        drop(state);
        self.unlinked.notify_all();
    }

    fn publish(&self) {
        let state = self.state.lock();
        self.metrics
            .set_cache(state.bytes, state.index.len() as u64, state.memory_bytes);
    }

    /// Bytes and objects on disk (as far as the index has loaded).
    pub fn usage(&self) -> (u64, usize) {
        let state = self.state.lock();
        (state.bytes, state.index.len())
    }

    /// The path of the body of `key` (tests use it to damage a file on purpose).
    pub fn body_path(&self, key: &Key) -> PathBuf {
        self.paths(key).0
    }
}

/// What the index holds for a key.
enum Indexed {
    Absent,
    Memory(Hit),
    Disk(
        Arc<CachedMeta>,
        Arc<ObjectMeta>,
        Arc<OnceLock<http::HeaderMap>>,
        bool,
    ),
}

/// Writes `bytes` to `path` through a temp file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .expect("paths written atomically have a parent");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
