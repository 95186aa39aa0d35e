//! The core cache on disk: one body file and one meta file per stored response (variant),
//! an in-memory index by URL (host + path and query), least recently used first out when
//! the bodies pass `max_size`.
//!
//! Layout under `dir`: `objects/<hh>/<hh>/<id>.body` and `<id>.meta` (JSON [`Meta`]), the id
//! the URL's hash ([`url_hash`]) and 16 hex digits of its own, so a URL's variants are in
//! the directory its hash names ([`url_dir`]); `tmp/` for bodies being written (cleared at
//! start). A body is written whole to a temp file and renamed into place, its meta written
//! (temp + rename) before it: a crash leaves either a whole entry or an orphan that the
//! load removes; nothing partial is ever indexed.
//!
//! The index is loaded in the background at start (`super::load`); meanwhile a URL is read
//! from its directory before a request uses it ([`Store::settle`]) and left to the index
//! from then on, and nothing is evicted until the count is whole.
//!
//! Why not the media cache's index (`crate::cache`): that one is keyed by one media `Key` per
//! object, verifies MD5s and keeps a memory tier; here one URL holds several variants (Vary)
//! and entries carry an HTTP cache policy. The shape is the same (LRU by bytes through the
//! `lru` crate, no disk I/O under the index lock, temp + rename, `write_atomic`, the load in
//! the background with its test hold).
//!
//! Bodies up to [`MEMORY_MAX_OBJECT`] are kept in memory after their first read (within
//! [`MEMORY_MAX`], least recently used out): a hit on a hot API response then costs no file
//! open or read, only a shared `Bytes`. The memory copy is dropped with the entry, and so is
//! its gzipped copy (`Store::gzipped`), kept in the same tier for clients that take gzip.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use http_cache_semantics::CachePolicy;
use lru::LruCache;
use md5::{Digest, Md5};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::hit::HotCell;
use crate::metrics::Metrics;

/// An entry's name on disk: 32 hex digits (shared: a hit clones it).
pub type Id = Arc<str>;

/// The scheme a response was made for: the `X-Forwarded-Proto` core was told (Rails builds
/// redirects, links and `secure` cookies from it). Part of what a stored response answers:
/// an https request is never answered with what core said to an http one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    /// From `X-Forwarded-Proto`'s value (see `proxy::headers::proto_sent`).
    pub fn parse(proto: &str) -> Option<Scheme> {
        match proto {
            "https" => Some(Scheme::Https),
            "http" => Some(Scheme::Http),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// Its place in a pair of per-scheme tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What is stored beside a body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// The scheme it answers (None: stored before entries were keyed by scheme; such an
    /// entry answers no request, and the loader removes it).
    #[serde(default)]
    pub scheme: Option<Scheme>,
    /// Host, lower case, without port.
    pub host: String,
    /// The `Host` header of the request that stored it, as sent (the policy compares it
    /// byte for byte; the fast hit path does the same).
    #[serde(default)]
    pub raw_host: Option<String>,
    /// Path and query.
    pub path: String,
    /// The response's status.
    pub status: u16,
    /// The response's headers as stored (hop-by-hop removed; updated by 304s).
    #[serde(with = "http_serde::header_map")]
    pub headers: HeaderMap,
    /// The policy (request and response as they decide reuse).
    pub policy: CachePolicy,
    /// Body length.
    pub len: u64,
    /// When it stops being fresh.
    pub fresh_until: SystemTime,
    /// What a hit needs of it, made at the first hit (see [`super::hit`]).
    #[serde(skip)]
    pub hot: HotCell,
    /// When it was last used, on the index's clock ([`Index::clock`]): which of a URL's
    /// variants goes when it has too many. Not kept on disk (0 after a restart: those go
    /// first).
    #[serde(skip)]
    pub used: Used,
}

/// A use tick (relaxed: read and written under the index's lock; atomic only so that an
/// `Arc<Meta>` can carry it).
#[derive(Debug, Default)]
pub struct Used(AtomicU64);

impl Used {
    fn set(&self, tick: u64) {
        self.0.store(tick, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Clone for Used {
    fn clone(&self) -> Self {
        Used(AtomicU64::new(self.get()))
    }
}

/// A stored response as the index holds it.
#[derive(Clone)]
pub struct Entry {
    /// Its name on disk.
    pub id: Id,
    /// Its meta.
    pub meta: Arc<Meta>,
}

/// The memory tier's bound.
pub const MEMORY_MAX: u64 = 64 << 20;
/// The memory tier's name for an entry's gzipped copy (`Store::gzipped`): never an entry's
/// own (those are hex digits only).
fn gz_id(id: &Id) -> Id {
    format!("{id}.gz").into()
}

/// The largest body kept in memory.
pub const MEMORY_MAX_OBJECT: u64 = 256 << 10;

/// A stored body, as a hit reads it.
pub enum StoredBody {
    /// The whole body, shared.
    Memory(Bytes),
    /// The body's file (too big for memory), at its start.
    File(tokio::fs::File),
}

struct Memory {
    lru: LruCache<Id, Bytes>,
    bytes: u64,
}

/// Entries evicted per hold of the index's lock when the load ends.
const EVICT_BATCH: usize = 10_000;

/// Most variants (`Vary`) stored for one URL.
pub const MAX_VARIANTS: usize = 32;

struct Index {
    lru: LruCache<Id, Arc<Meta>>,
    /// Counts stores and uses: each sets its entry's `Meta::used`.
    clock: u64,
    /// By [`url_key`]; foldhash (seeded per process) rather than SipHash: a hit hashes its
    /// key here once.
    by_url: HashMap<String, Vec<Id>, foldhash::fast::RandomState>,
    bytes: u64,
    /// While the index loads: the URLs a request or removal has read from disk whole
    /// ([`Store::settle`]), which the loader must leave alone, by their MD5 ([`settled_key`]:
    /// 16 bytes however long the URL, as many URLs as clients ask for). None once loaded.
    settled: Option<HashSet<[u8; 16]>>,
}

/// The disk store and its index.
pub struct Store {
    dir: PathBuf,
    max_size: u64,
    index: Mutex<Index>,
    memory: Mutex<Memory>,
    counter: AtomicU64,
    metrics: Metrics,
    /// When each URL was last invalidated or purged: a response whose request was sent
    /// before that is not stored (it may predate the change). Those older than
    /// [`INVALIDATION_MEMORY`] go as new ones come; at most [`INVALIDATIONS_KEPT`].
    invalidated: Mutex<Invalidated>,
    /// True while the index loads.
    loading: watch::Sender<bool>,
}

/// How long an invalidation is remembered against responses still being received.
const INVALIDATION_MEMORY: Duration = Duration::from_secs(15 * 60);

/// Most invalidations remembered: past it the oldest are forgotten first (a response on
/// its way for that long is rare; the memory stays bounded on a busy instance).
const INVALIDATIONS_KEPT: usize = 100_000;

/// When each URL was last invalidated, and the invalidations in the order they came, so
/// that the ones past [`INVALIDATION_MEMORY`] go from the front (each at most once) rather
/// than by a walk over all on every unsafe request.
#[derive(Default)]
struct Invalidated {
    at: HashMap<String, Instant>,
    order: std::collections::VecDeque<(Instant, String)>,
}

impl Invalidated {
    /// One place in the queue per URL: a URL invalidated again (a hot inbox, on every
    /// delivery) only has its time moved on, and goes back in the queue when its old place
    /// comes up, so that the bound counts URLs.
    fn insert(&mut self, key: String, now: Instant) {
        let old = |t: &Instant| now.saturating_duration_since(*t) >= INVALIDATION_MEMORY;
        while let Some((t, _)) = self.order.front() {
            let full = self.order.len() >= INVALIDATIONS_KEPT;
            if !old(t) && !full {
                break;
            }
            let (t, k) = self.order.pop_front().expect("looked at");
            match self.at.get(&k) {
                // Invalidated again since: back in the queue with its later time.
                Some(&later) if later != t && !old(&later) && !full => {
                    self.order.push_back((later, k))
                }
                _ => drop(self.at.remove(&k)),
            }
        }
        if self.at.insert(key.clone(), now).is_none() {
            self.order.push_back((now, key));
        }
    }
}

/// The index key of a URL.
pub fn url_key(host: &str, path: &str) -> String {
    format!("{host}\n{path}")
}

/// The MD5 of a URL's index key, in hex: the start of every entry id of the URL.
pub fn url_hash(key: &str) -> String {
    hex::encode(settled_key(key))
}

/// The MD5 of the URL `key`: its directory's name ([`url_hash`]), and how a URL is kept in
/// the set of settled URLs while the index loads.
fn settled_key(key: &str) -> [u8; 16] {
    Md5::digest(key.as_bytes()).into()
}

/// An entry name for the URL `key`: the URL's hash ([`url_hash`]) and 16 hex digits of its
/// own (from the time, `n` and the process: never reused).
pub fn own_id(key: &str, n: u64) -> Id {
    let mut h = Md5::new();
    h.update(key.as_bytes());
    h.update(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_le_bytes(),
    );
    h.update(n.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    let own = hex::encode(h.finalize());
    format!("{}{}", url_hash(key), &own[..16]).into()
}

/// The directory of a URL's entries (with those of other URLs whose hash starts alike):
/// `objects/<h[0..2]>/<h[2..4]>`, so that a URL not yet indexed is read from one small
/// directory.
pub fn url_dir(dir: &Path, hash: &str) -> PathBuf {
    dir.join("objects").join(&hash[..2]).join(&hash[2..4])
}

impl Store {
    /// Opens `dir` (created if missing), clears `tmp/`, and returns at once: what a previous
    /// run stored is indexed by a thread of its own ([`super::load`]; oldest body mtime first
    /// out), while requests are answered (a URL not yet indexed is read from its directory
    /// first, [`Store::settle`]).
    pub fn open(dir: &Path, max_size: u64, metrics: Metrics) -> io::Result<Arc<Store>> {
        std::fs::create_dir_all(dir.join("objects"))?;
        crate::cache::clear_dir(&dir.join("tmp"));
        let store = Arc::new(Store {
            dir: dir.to_owned(),
            max_size,
            index: Mutex::new(Index {
                lru: LruCache::unbounded(),
                clock: 0,
                by_url: HashMap::default(),
                bytes: 0,
                settled: Some(HashSet::new()),
            }),
            memory: Mutex::new(Memory {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            counter: AtomicU64::new(0),
            metrics,
            invalidated: Mutex::default(),
            loading: watch::channel(true).0,
        });
        store.metrics.set_core_cache_index_loading(true);
        let s = store.clone();
        std::thread::Builder::new()
            .name("corecache-load".into())
            .spawn(move || super::load::load(&s))?;
        Ok(store)
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

    /// The cache's directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the index whole for the URL `key` while it loads: its entries on disk are read
    /// (one directory, [`super::load::read_url`]) and added, unless the loader or another
    /// request did so first. From then on the index alone speaks for the URL (the loader
    /// leaves it alone), so a store, replacement or removal of it is never undone or counted
    /// twice. Nothing to do once the index has loaded.
    pub async fn settle(self: &Arc<Self>, key: &str) {
        if !self.is_loading() || self.is_settled(key) {
            return;
        }
        let (this, key) = (self.clone(), key.to_owned());
        let _ = tokio::task::spawn_blocking(move || this.settle_blocking(&key)).await;
    }

    fn is_settled(&self, key: &str) -> bool {
        self.index
            .lock()
            .settled
            .as_ref()
            .is_none_or(|s| s.contains(&settled_key(key)))
    }

    /// [`Store::settle`] on a blocking thread.
    pub fn settle_blocking(&self, key: &str) {
        if !self.is_loading() || self.is_settled(key) {
            return;
        }
        let found = super::load::read_url(self, key);
        {
            let mut guard = self.index.lock();
            let index = &mut *guard;
            let Some(settled) = index.settled.as_mut() else {
                return; // loaded meanwhile: the loader indexed all of it
            };
            if !settled.insert(settled_key(key)) {
                return; // another request settled it first
            }
            // Oldest first, as stored; what the loader already added is among them.
            let mut order: Vec<Id> = Vec::with_capacity(found.len());
            for (_, id, meta) in found {
                if !index.lru.contains(&id) {
                    index.bytes += meta.len;
                    index.lru.put(id.clone(), Arc::new(meta));
                }
                order.push(id);
            }
            for id in index.by_url.remove(key).unwrap_or_default() {
                if !order.contains(&id) {
                    order.push(id);
                }
            }
            if !order.is_empty() {
                index.by_url.insert(key.to_owned(), order);
            }
        }
        self.report();
    }

    /// Adds what the loader found of URLs no request settled, behind what is indexed (each
    /// call's entries newest first, so the oldest ends up last out); the found entries of a
    /// settled URL that the index does not hold are returned, for the caller to unlink
    /// (replaced or removed since, or moved from the old layout after the URL was read).
    pub(super) fn add_loaded(&self, found: impl Iterator<Item = (Id, Meta)>) -> Vec<Id> {
        let mut stray = Vec::new();
        let mut guard = self.index.lock();
        let index = &mut *guard;
        let Some(settled) = index.settled.as_ref() else {
            return stray; // only called while loading
        };
        for (id, meta) in found {
            let key = url_key(&meta.host, &meta.path);
            if index.lru.contains(&id) {
                continue;
            }
            if settled.contains(&settled_key(&key)) {
                stray.push(id);
                continue;
            }
            index.bytes += meta.len;
            index.lru.put(id.clone(), Arc::new(meta));
            index.lru.demote(&id);
            index.by_url.entry(key).or_default().insert(0, id);
        }
        stray
    }

    /// The load is over: from now on the index is whole; what is over `max_size` goes.
    pub(super) fn finish_loading(&self) {
        self.index.lock().settled = None;
        // What the load found past `max_size` (lowered since, or stores meanwhile) goes in
        // batches, each under its own hold of the lock: requests are never held up long.
        loop {
            let gone = self.evict_locked(&mut self.index.lock(), EVICT_BATCH);
            self.unlink(&gone);
            if gone.len() < EVICT_BATCH {
                break;
            }
        }
        self.report();
        // The gauge first: whoever waits on `loaded()` then sees it at 0.
        self.metrics.set_core_cache_index_loading(false);
        self.loading.send_replace(false);
    }

    /// The directory for bodies being written.
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// Largest body stored.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Where an entry's file is: in its URL's directory ([`url_dir`]).
    pub(super) fn path_of(&self, id: &str, ext: &str) -> PathBuf {
        self.dir
            .join("objects")
            .join(&id[..2])
            .join(&id[2..4])
            .join(format!("{id}.{ext}"))
    }

    /// A new entry name for the URL `key` ([`own_id`]).
    pub fn new_id(&self, key: &str) -> Id {
        own_id(key, self.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// The variants stored for a URL, most recently stored first.
    pub fn variants(&self, host: &str, path: &str) -> Vec<Entry> {
        let index = self.index.lock();
        let Some(ids) = index.by_url.get(&url_key(host, path)) else {
            return Vec::new();
        };
        ids.iter()
            .rev()
            .filter_map(|id| {
                index.lru.peek(id).map(|m| Entry {
                    id: id.clone(),
                    meta: m.clone(),
                })
            })
            .collect()
    }

    /// Marks a use (LRU order).
    pub fn touch(&self, id: &str) {
        let mut index = self.index.lock();
        index.clock += 1;
        let tick = index.clock;
        if let Some(m) = index.lru.get(id) {
            m.used.set(tick);
        }
    }

    /// The fast hit (see `CoreCache::fresh_without_vary`): under one lock, the first stored
    /// variant of `key` (most recently stored first) that is fresh at `now`, marked used;
    /// None, for the full way, as soon as one has `Vary`, was stored for another `Host` value
    /// (`raw_host`, as sent) or cannot be judged here; entries of another scheme are passed
    /// by.
    pub fn fresh_hit(
        &self,
        key: &str,
        scheme: Scheme,
        raw_host: Option<&[u8]>,
        now: SystemTime,
    ) -> Option<Entry> {
        let mut index = self.index.lock();
        let index = &mut *index;
        if index
            .settled
            .as_ref()
            .is_some_and(|s| !s.contains(&settled_key(key)))
        {
            return None; // not indexed whole yet: the full way settles it
        }
        let ids = index.by_url.get(key)?;
        for id in ids.iter().rev() {
            let Some(meta) = index.lru.peek(id) else {
                continue;
            };
            if meta.scheme != Some(scheme) {
                // Another scheme's entry answers no request of this one: the full way
                // passes it by too (the policy compares the URI).
                continue;
            }
            let hot = meta.hot(now)?;
            if hot.vary || raw_host != meta.raw_host.as_deref().map(str::as_bytes) {
                return None;
            }
            if hot.fresh(now) {
                let e = Entry {
                    id: id.clone(),
                    meta: meta.clone(),
                };
                index.clock += 1;
                meta.used.set(index.clock);
                index.lru.promote(id);
                return Some(e);
            }
        }
        None
    }

    /// A stored body of `len` bytes: from memory, else read whole in one blocking call and
    /// kept in memory when small, else its file opened.
    pub async fn body(&self, id: &Id, len: u64) -> io::Result<StoredBody> {
        if let Some(b) = self.memory.lock().lru.get(id) {
            return Ok(StoredBody::Memory(b.clone()));
        }
        let path = self.path_of(id, "body");
        if len > MEMORY_MAX_OBJECT {
            return Ok(StoredBody::File(tokio::fs::File::open(path).await?));
        }
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(io::Error::other)??;
        if bytes.len() as u64 != len {
            return Err(io::Error::other("a stored body has the wrong length"));
        }
        let bytes = Bytes::from(bytes);
        self.keep_in_memory(id, id.clone(), &bytes);
        Ok(StoredBody::Memory(bytes))
    }

    /// Keeps `bytes` in the memory tier under `key`, for the entry `id`, least recently used
    /// out past [`MEMORY_MAX`]. Only while the entry is indexed: one purged meanwhile is
    /// served to this client only (its lookup came first), and never kept.
    fn keep_in_memory(&self, id: &Id, key: Id, bytes: &Bytes) {
        if self.index.lock().lru.peek(id).is_none() {
            return;
        }
        let mut memory = self.memory.lock();
        if memory.lru.put(key, bytes.clone()).is_none() {
            memory.bytes += bytes.len() as u64;
        }
        while memory.bytes > MEMORY_MAX {
            match memory.lru.pop_lru() {
                Some((_, b)) => memory.bytes -= b.len() as u64,
                None => break,
            }
        }
    }

    /// The gzipped copy of a body the memory tier holds (`identity`), made at the first ask
    /// and kept in the same tier (its bytes counted against [`MEMORY_MAX`], dropped with the
    /// entry); None when gzip does not make it smaller. Compresses on the caller's thread:
    /// once per entry, at most [`MEMORY_MAX_OBJECT`] bytes.
    pub fn gzipped(&self, id: &Id, identity: &Bytes) -> Option<Bytes> {
        let gz = gz_id(id);
        if let Some(b) = self.memory.lock().lru.get(&gz) {
            return Some(b.clone());
        }
        let bytes = crate::compress::gzip_whole(identity)?;
        self.keep_in_memory(id, gz, &bytes);
        Some(bytes)
    }

    /// Stores a whole body (a temp file in `tmp_dir`) and its meta, replacing the entries in
    /// `replaces`; `sent`: when its request went to core (not stored if the URL was
    /// invalidated since). Blocking: call from a blocking thread.
    pub fn insert(
        &self,
        tmp: tempfile::TempPath,
        meta: Meta,
        replaces: &[Id],
        sent: Instant,
    ) -> io::Result<()> {
        let key = url_key(&meta.host, &meta.path);
        if self.invalidated_since(&key, sent) {
            return Ok(());
        }
        if self.full_while_loading(meta.len) {
            // Nothing is evicted before the whole index is counted: not stored, so that a
            // long load cannot take the disk past `max_size` (the client has its answer).
            tracing::debug!(url = %key, "core cache full while its index loads: not stored");
            return Ok(());
        }
        // Its request settled the URL already (`replaces` came from the index); a no-op then.
        self.settle_blocking(&key);
        let id = self.new_id(&key);
        let meta_path = self.path_of(&id, "meta");
        std::fs::create_dir_all(meta_path.parent().expect("a parent"))?;
        crate::cache::write_atomic(&meta_path, &serde_json::to_vec(&meta)?)?;
        if let Err(e) = tmp.persist(self.path_of(&id, "body")) {
            let _ = std::fs::remove_file(&meta_path);
            return Err(e.error);
        }
        let gone = {
            let mut index = self.index.lock();
            // Checked again under the index lock, which `remove_url` takes after recording.
            if self.invalidated_since(&key, sent) {
                vec![id]
            } else {
                self.insert_locked(&mut index, id, Arc::new(meta), replaces)
            }
        };
        self.unlink(&gone);
        self.report();
        Ok(())
    }

    fn invalidated_since(&self, key: &str, sent: Instant) -> bool {
        self.invalidated
            .lock()
            .at
            .get(key)
            .is_some_and(|t| *t >= sent)
    }

    /// Replaces the meta of a stored entry (headers updated by a 304). Blocking.
    pub fn update(&self, id: &str, meta: Meta) -> io::Result<()> {
        if self.index.lock().lru.peek(id).is_none() {
            return Ok(()); // evicted or purged meanwhile
        }
        crate::cache::write_atomic(&self.path_of(id, "meta"), &serde_json::to_vec(&meta)?)?;
        let mut index = self.index.lock();
        if let Some(m) = index.lru.get_mut(id) {
            *m = Arc::new(meta);
        }
        Ok(())
    }

    /// Takes entries out of the index (not their files: [`Store::unlink`]); returns those
    /// it held.
    pub fn forget(&self, ids: &[Id]) -> Vec<Id> {
        let mut gone = Vec::new();
        {
            let mut guard = self.index.lock();
            let index = &mut *guard;
            for id in ids {
                let Some(m) = index.lru.pop(id) else {
                    continue;
                };
                index.bytes -= m.len;
                let k = url_key(&m.host, &m.path);
                if let Some(list) = index.by_url.get_mut(&k) {
                    list.retain(|i| i != id);
                    if list.is_empty() {
                        index.by_url.remove(&k);
                    }
                }
                gone.push(id.clone());
            }
        }
        self.report();
        gone
    }

    /// Keeps responses to a URL already on their way (their requests sent before now) from
    /// being stored.
    pub fn invalidate(&self, host: &str, path: &str) {
        self.invalidated
            .lock()
            .insert(url_key(host, path), Instant::now());
    }

    /// Removes every variant of a URL, and keeps responses already on their way from
    /// being stored; returns how many there were. Blocking (while the index loads, the
    /// URL's entries not yet indexed are read first, so that they go too).
    pub fn remove_url(&self, host: &str, path: &str) -> usize {
        self.settle_blocking(&url_key(host, path));
        self.invalidate(host, path);
        let gone: Vec<Id> = {
            let mut index = self.index.lock();
            let ids = index
                .by_url
                .remove(&url_key(host, path))
                .unwrap_or_default();
            for id in &ids {
                if let Some(m) = index.lru.pop(id) {
                    index.bytes -= m.len;
                }
            }
            ids
        };
        self.unlink(&gone);
        self.report();
        gone.len()
    }

    /// While the index loads: whether `len` more bytes would take what is counted so far (a
    /// lower bound of what the disk holds) past `max_size`.
    fn full_while_loading(&self, len: u64) -> bool {
        let index = self.index.lock();
        index.settled.is_some() && index.bytes + len > self.max_size
    }

    /// Bytes and entries held.
    pub fn usage(&self) -> (u64, usize) {
        let index = self.index.lock();
        (index.bytes, index.lru.len())
    }

    /// Inserts under the lock; returns the ids whose files must go (replaced, evicted).
    fn insert_locked(
        &self,
        index: &mut Index,
        id: Id,
        meta: Arc<Meta>,
        replaces: &[Id],
    ) -> Vec<Id> {
        let mut gone = Vec::new();
        let key = url_key(&meta.host, &meta.path);
        for old in replaces {
            if let Some(m) = index.lru.pop(old) {
                index.bytes -= m.len;
                gone.push(old.clone());
            }
        }
        if let Some(ids) = index.by_url.get_mut(&key) {
            ids.retain(|i| !replaces.contains(i));
        }
        index.bytes += meta.len;
        index.clock += 1;
        meta.used.set(index.clock);
        index.lru.put(id.clone(), meta);
        let ids = index.by_url.entry(key).or_default();
        ids.push(id);
        // A URL's variants are bounded: every new `Accept-Language` or `Origin` a client
        // makes up would otherwise store one more, and each request to the URL walks them.
        // The least recently used goes first (of equals, the oldest stored: the list is
        // oldest first), never the one just stored: a flood of made-up values then pushes
        // out its own variants, not the ones clients keep asking for.
        while ids.len() > MAX_VARIANTS {
            let lru = &index.lru;
            let used = |id: &Id| lru.peek(id).map_or(0, |m| m.used.get());
            let (at, _) = ids[..ids.len() - 1]
                .iter()
                .enumerate()
                .min_by_key(|(i, id)| (used(id), *i))
                .expect("more than one");
            let old = ids.remove(at);
            if let Some(m) = index.lru.pop(&old) {
                index.bytes -= m.len;
                gone.push(old);
            }
        }
        gone.extend(self.evict_locked(index, usize::MAX));
        gone
    }

    /// Takes least recently used entries out (at most `most`) until the bytes are under
    /// `max_size`; returns them, for the caller to unlink. Nothing while the index loads (its byte count is not
    /// whole yet: [`Store::finish_loading`] evicts then).
    fn evict_locked(&self, index: &mut Index, most: usize) -> Vec<Id> {
        let mut gone = Vec::new();
        if index.settled.is_some() {
            return gone;
        }
        while index.bytes > self.max_size && gone.len() < most {
            let Some((old, m)) = index.lru.pop_lru() else {
                break;
            };
            index.bytes -= m.len;
            let k = url_key(&m.host, &m.path);
            if let Some(ids) = index.by_url.get_mut(&k) {
                ids.retain(|i| *i != old);
                if ids.is_empty() {
                    index.by_url.remove(&k);
                }
            }
            gone.push(old);
        }
        gone
    }

    /// Removes entries' files (and memory copies); not their index entries.
    pub(super) fn unlink(&self, ids: &[Id]) {
        {
            let mut memory = self.memory.lock();
            for id in ids {
                for key in [id.clone(), gz_id(id)] {
                    if let Some(b) = memory.lru.pop(&key) {
                        memory.bytes -= b.len() as u64;
                    }
                }
            }
        }
        for id in ids {
            let _ = std::fs::remove_file(self.path_of(id, "meta"));
            let _ = std::fs::remove_file(self.path_of(id, "body"));
        }
    }

    fn report(&self) {
        let (bytes, n) = self.usage();
        self.metrics.set_core_cache(bytes, n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Invalidations past the memory go from the front as new ones come, a URL invalidated
    /// again keeps its later time, and the count stays bounded.
    #[test]
    fn invalidations_expire_in_order_and_stay_bounded() {
        let mut inv = Invalidated::default();
        let t0 = Instant::now();
        inv.insert("a".into(), t0);
        inv.insert("b".into(), t0);
        inv.insert("a".into(), t0 + Duration::from_secs(60));
        assert_eq!(inv.order.len(), 2, "one place per URL");
        let later = t0 + INVALIDATION_MEMORY + Duration::from_secs(1);
        inv.insert("c".into(), later);
        assert_eq!(inv.at.get("a"), Some(&(t0 + Duration::from_secs(60))));
        assert!(!inv.at.contains_key("b"), "past the memory");
        assert_eq!(inv.order.len(), 2, "{:?}", inv.order);
        // A hot URL invalidated over and over keeps one place.
        for s in 0..1000 {
            inv.insert("hot".into(), later + Duration::from_millis(s));
        }
        assert_eq!(inv.order.len(), 3);
        for n in 0..INVALIDATIONS_KEPT + 10 {
            inv.insert(format!("u{n}"), later);
        }
        assert!(inv.order.len() <= INVALIDATIONS_KEPT);
        assert!(inv.at.len() <= INVALIDATIONS_KEPT);
        assert!(inv.at.contains_key(&format!("u{}", INVALIDATIONS_KEPT + 9)));
    }

    /// A body's gzipped copy lives in the memory tier beside it, counted against its bound,
    /// and goes with the entry.
    #[tokio::test]
    async fn a_gzipped_copy_is_counted_in_the_memory_tier_and_goes_with_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let body =
            "{\"a\":\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"}".repeat(20);
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", "public, max-age=600".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        let entries = [("/a".to_owned(), body.clone().into_bytes())];
        crate::corecache::seed(dir.path(), "a.test", &headers, entries).unwrap();
        let store = Store::open(dir.path(), 1 << 20, Metrics::new()).unwrap();
        store.loaded().await;
        let e = store.variants("a.test", "/a").remove(0);
        let StoredBody::Memory(identity) = store.body(&e.id, e.meta.len).await.unwrap() else {
            panic!("a small body is kept in memory");
        };
        assert_eq!(store.memory.lock().bytes, body.len() as u64);
        let gz = store.gzipped(&e.id, &identity).expect("JSON gets smaller");
        assert!(gz.len() < body.len() / 4);
        assert_eq!(
            store.memory.lock().bytes,
            (body.len() + gz.len()) as u64,
            "counted in the tier"
        );
        let again = store.gzipped(&e.id, &identity).unwrap();
        assert_eq!(again.as_ptr(), gz.as_ptr(), "made once, then kept");
        store.unlink(std::slice::from_ref(&e.id));
        assert_eq!(
            store.memory.lock().bytes,
            0,
            "both copies gone with the entry"
        );
        assert!(store.memory.lock().lru.is_empty());
    }
}
