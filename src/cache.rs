//! The local disk cache, with a small in-memory tier for hot objects.
//!
//! Layout under `dir`: `objects/<hh>/<md5(key)>` holds a body, `…​.meta` beside it the JSON
//! [`CachedMeta`] (key, size, MD5, headers), `tmp/` holds bodies still being fetched. A body
//! is renamed into place only after it was verified, and its meta is written after it; at
//! start the cache re-reads every meta, drops entries whose body is missing or of the wrong
//! length, and re-checks each body's MD5 the first time it is served. A damaged file is removed
//! and refetched, never served.
//!
//! Eviction is least-recently-used by bytes; the policy is the `lru` crate, the accounting is
//! here. Hot objects up to `memory_max_object` are also kept in memory as shared [`Bytes`],
//! handed to every response without a copy.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

/// How often a hit is recorded in the body's mtime (the LRU order used after a restart).
const TOUCH_EVERY: Duration = Duration::from_secs(600);

use bytes::Bytes;
use lru::LruCache;
use md5::{Digest, Md5};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::config::CacheConfig;
use crate::key::Key;
use crate::metrics::Metrics;
use crate::store::ObjectMeta;

/// What the cache keeps about an object besides its body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CachedMeta {
    /// The key (checked on load, so two keys can never share a file).
    pub key: String,
    /// Body length.
    pub size: u64,
    /// MD5 of the body, hex.
    pub md5: String,
    /// Content-Type from the source, if it gave one.
    pub content_type: Option<String>,
    /// ETag from the source.
    pub etag: Option<String>,
    /// Last-Modified from the source, seconds since the epoch.
    pub last_modified: Option<u64>,
    /// Name of the store the body came from.
    pub source: String,
}

impl CachedMeta {
    /// Builds the cache record of a verified body.
    pub fn new(key: &Key, meta: &ObjectMeta, md5: [u8; 16], source: &str) -> Self {
        CachedMeta {
            key: key.as_str().to_owned(),
            size: meta.size,
            md5: hex::encode(md5),
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta
                .last_modified
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            source: source.to_owned(),
        }
    }

    /// The record as store metadata (for responses and write-backs).
    pub fn to_object_meta(&self) -> ObjectMeta {
        let mut md5 = [0u8; 16];
        let md5 = hex::decode_to_slice(&self.md5, &mut md5).ok().map(|_| md5);
        ObjectMeta {
            size: self.size,
            content_type: self.content_type.clone(),
            etag: self.etag.clone(),
            last_modified: self
                .last_modified
                .map(|s| UNIX_EPOCH + std::time::Duration::from_secs(s)),
            md5,
        }
    }
}

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
}

struct Entry {
    meta: Arc<CachedMeta>,
    /// `meta` as store metadata, converted once rather than on every hit.
    object: Arc<ObjectMeta>,
    /// MD5 checked since this process loaded the entry.
    verified: bool,
    /// When this process last recorded a use of the entry on disk (None: not yet).
    touched: Option<Instant>,
}

impl Entry {
    fn new(meta: CachedMeta, verified: bool) -> Entry {
        Entry {
            object: Arc::new(meta.to_object_meta()),
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
}

/// The disk cache.
pub struct Cache {
    dir: PathBuf,
    config: CacheConfig,
    state: Mutex<State>,
    metrics: Metrics,
}

impl Cache {
    /// Opens (or creates) the cache, recovering its index from disk.
    pub fn open(config: &CacheConfig, metrics: Metrics) -> io::Result<Cache> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(dir.join("objects"))?;
        // Bodies that were being fetched when the process stopped are incomplete by definition.
        let _ = std::fs::remove_dir_all(dir.join("tmp"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let cache = Cache {
            dir,
            config: config.clone(),
            state: Mutex::new(State {
                index: LruCache::unbounded(),
                bytes: 0,
                memory: LruCache::unbounded(),
                memory_bytes: 0,
            }),
            metrics,
        };
        cache.recover()?;
        Ok(cache)
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

    fn recover(&self) -> io::Result<()> {
        let mut found = Vec::new();
        for entry in walkdir::WalkDir::new(self.dir.join("objects"))
            .min_depth(2)
            .max_depth(2)
        {
            let entry = entry.map_err(io::Error::other)?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "meta") {
                continue;
            }
            let meta_path = path.with_extension("meta");
            let loaded = std::fs::read(&meta_path)
                .ok()
                .and_then(|b| serde_json::from_slice::<CachedMeta>(&b).ok())
                .and_then(|m| Key::parse(&m.key).ok().map(|k| (k, m)));
            let len = entry.metadata().map(|m| m.len()).ok();
            match loaded {
                Some((key, meta)) if Some(meta.size) == len && self.paths(&key).0 == path => {
                    let used = entry
                        .metadata()
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .unwrap_or(UNIX_EPOCH);
                    found.push((used, key, meta));
                }
                _ => {
                    tracing::warn!(path = %path.display(), "cache: dropping a body with no valid record or the wrong length");
                    let _ = std::fs::remove_file(path);
                    let _ = std::fs::remove_file(&meta_path);
                }
            }
        }
        // Metas whose body is gone.
        for entry in walkdir::WalkDir::new(self.dir.join("objects"))
            .min_depth(2)
            .max_depth(2)
        {
            let entry = entry.map_err(io::Error::other)?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "meta") && !path.with_extension("").exists() {
                let _ = std::fs::remove_file(path);
            }
        }
        found.sort_by_key(|(used, _, _)| *used);
        let count = found.len();
        {
            let mut state = self.state.lock();
            for (_, key, meta) in found {
                state.bytes += meta.size;
                state.index.put(key, Entry::new(meta, false));
            }
        }
        self.evict();
        tracing::info!(objects = count, dir = %self.dir.display(), "cache: recovered index");
        Ok(())
    }

    /// Looks `key` up. A body not yet checked since start is checked now (MD5 over the file);
    /// a damaged or truncated one is removed and `None` returned, so the caller refetches.
    pub async fn lookup(self: &Arc<Self>, key: &Key) -> Option<Hit> {
        let (record, meta, verified) = {
            let mut state = self.state.lock();
            let entry = state.index.get_mut(key)?;
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
            let found = (entry.meta.clone(), entry.object.clone(), entry.verified);
            if let Some(bytes) = state.memory.get(key).cloned() {
                return Some(Hit {
                    meta: found.1,
                    body: HitBody::Memory(bytes),
                });
            }
            found
        };
        let this = self.clone();
        let key2 = key.clone();
        let opened = tokio::task::spawn_blocking(move || this.open_body(&key2, &record, verified))
            .await
            .ok()?;
        match opened {
            Ok(body) => Some(Hit { meta, body }),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "cache: damaged body removed; refetching");
                self.remove(key);
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
    pub fn insert(&self, key: &Key, tmp: tempfile::TempPath, meta: CachedMeta) -> io::Result<()> {
        if meta.size > self.config.max_size {
            return Ok(()); // Larger than the whole cache: serve it, don't keep it.
        }
        let (path, meta_path) = self.paths(key);
        std::fs::create_dir_all(path.parent().expect("object paths have a parent"))?;
        let record = serde_json::to_vec(&meta)?;
        {
            // Files and index change together under the lock, so an eviction or removal
            // running at the same time cannot unlink the body just put in place.
            let mut state = self.state.lock();
            tmp.persist(&path).map_err(|e| e.error)?;
            write_atomic(&meta_path, &record)?;
            state.bytes += meta.size;
            if let Some(old) = state.index.put(key.clone(), Entry::new(meta, true)) {
                state.bytes -= old.meta.size;
            }
            if let Some(b) = state.memory.pop(key) {
                state.memory_bytes -= b.len() as u64;
            }
            self.evict_locked(&mut state);
        }
        self.publish();
        Ok(())
    }

    /// Removes `key` from the cache.
    pub fn remove(&self, key: &Key) {
        {
            let mut state = self.state.lock();
            if let Some(e) = state.index.pop(key) {
                state.bytes -= e.meta.size;
            }
            if let Some(b) = state.memory.pop(key) {
                state.memory_bytes -= b.len() as u64;
            }
            self.unlink(key);
        }
        self.publish();
    }

    fn evict(&self) {
        self.evict_locked(&mut self.state.lock());
        self.publish();
    }

    /// Evicts least recently used objects until the disk budget holds.
    fn evict_locked(&self, state: &mut State) {
        while state.bytes > self.config.max_size {
            let Some((key, e)) = state.index.pop_lru() else {
                break;
            };
            state.bytes -= e.meta.size;
            if let Some(b) = state.memory.pop(&key) {
                state.memory_bytes -= b.len() as u64;
            }
            self.unlink(&key);
        }
    }

    /// Deletes a body and its record. Readers holding the body open keep reading it (Unix).
    fn unlink(&self, key: &Key) {
        let (path, meta_path) = self.paths(key);
        let _ = std::fs::remove_file(meta_path);
        let _ = std::fs::remove_file(path);
    }

    fn publish(&self) {
        let state = self.state.lock();
        self.metrics
            .set_cache(state.bytes, state.index.len() as u64, state.memory_bytes);
    }

    /// Bytes and objects on disk.
    pub fn usage(&self) -> (u64, usize) {
        let state = self.state.lock();
        (state.bytes, state.index.len())
    }

    /// The path of the body of `key` (tests use it to damage a file on purpose).
    pub fn body_path(&self, key: &Key) -> PathBuf {
        self.paths(key).0
    }
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
