//! Loading the cache index at start, in the background: the edge answers from the first
//! moment, however many objects the cache holds (a key not yet loaded is found by its
//! files, [`read_entry`]).

use std::cmp::Reverse;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use super::{Cache, CachedMeta, Entry};
use crate::key::Key;

/// Entries added to the index per hold of its lock, so requests are never held up long.
const BATCH: usize = 10_000;

/// Reads the record of `key` from its files: `None` unless the meta is valid, names `key`
/// and the body has the recorded length.
pub(super) fn read_entry(cache: &Cache, key: &Key) -> Option<CachedMeta> {
    let (path, meta_path) = cache.paths(key);
    let meta = std::fs::read(&meta_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<CachedMeta>(&b).ok())?;
    let len = std::fs::metadata(&path).ok()?.len();
    (meta.key == key.as_str() && meta.size == len).then_some(meta)
}

/// Walks `objects/`, drops what is not whole, and adds the rest to the index behind what
/// requests already put there (least recently used first, by the bodies' mtimes).
pub(super) fn load(cache: &Arc<Cache>) {
    wait_while_held(&cache.dir);
    // Files take their times from a coarse clock, which may lag this one by a tick: a little
    // before now, so that no file an insert writes after this is taken for an old one.
    let started = SystemTime::now() - std::time::Duration::from_secs(1);
    let mut found = walk(cache, started);
    // Newest first: each is then put behind all before it, so the oldest ends up last.
    found.sort_by_key(|(used, _, _)| Reverse(*used));
    let count = found.len();
    let mut rest = found.into_iter().peekable();
    while rest.peek().is_some() {
        let mut state = cache.state.lock();
        for (_, key, meta) in rest.by_ref().take(BATCH) {
            let removed = state.tombstones.as_ref().is_some_and(|t| t.contains(&key));
            if removed || state.index.contains(&key) {
                continue;
            }
            state.bytes += meta.size;
            state.index.put(key.clone(), Entry::new(meta, false));
            state.index.demote(&key);
        }
    }
    cache.state.lock().tombstones = None;
    cache.evict();
    // The gauge first: whoever waits on `loaded()` then sees it at 0.
    cache.metrics.set_cache_index_loading(false);
    cache.loading.send_replace(false);
    tracing::info!(objects = count, dir = %cache.dir.display(), "cache: index loaded");
}

/// Every whole entry on disk, with its last use. Files changed since the load started are
/// left alone: they belong to inserts running meanwhile.
fn walk(cache: &Cache, started: SystemTime) -> Vec<(SystemTime, Key, CachedMeta)> {
    let objects = cache.dir.join("objects");
    let fresh = |p: &Path| changed_since(p, started);
    let mut found = Vec::new();
    for entry in walkdir::WalkDir::new(&objects).min_depth(2).max_depth(2) {
        let Ok(entry) = entry else { continue };
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "meta") {
            if !path.with_extension("").exists() && !fresh(path) {
                // A record whose body is gone.
                let _ = std::fs::remove_file(path);
            }
            continue;
        }
        let meta_path = path.with_extension("meta");
        let loaded = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<CachedMeta>(&b).ok())
            .and_then(|m| Key::parse(&m.key).ok().map(|k| (k, m)));
        let fs_meta = entry.metadata().ok();
        let len = fs_meta.as_ref().map(|m| m.len());
        match loaded {
            Some((key, meta)) if Some(meta.size) == len && cache.paths(&key).0 == path => {
                let used = fs_meta
                    .and_then(|m| m.modified().ok())
                    .unwrap_or(UNIX_EPOCH);
                found.push((used, key, meta));
            }
            _ if fresh(path) => {}
            _ => {
                tracing::warn!(path = %path.display(), "cache: dropping a body with no valid record or the wrong length");
                let _ = std::fs::remove_file(path);
                let _ = std::fs::remove_file(&meta_path);
            }
        }
    }
    found
}

/// Whether the file at `p` was modified at or after `started` (an insert running while the
/// index loads: a loader leaves it alone). Shared with the core cache's loader.
pub(crate) fn changed_since(p: &Path, started: SystemTime) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= started)
}

/// Blocks while a test holds back the index load of the cache at `dir` (the media cache's
/// or the core cache's: [`hold_index_load`]).
pub(crate) fn wait_while_held(dir: &Path) {
    let mut held = HELD.lock();
    while held.iter().any(|d| d == dir) {
        RELEASED.wait(&mut held);
    }
}

/// Cache directories whose index load is held back (tests only).
static HELD: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static RELEASED: Condvar = Condvar::new();

/// Holds back the index load of the cache at `dir` until dropped (the media cache's `dir`,
/// or `[core.cache] dir`): lets a test show requests answered while the index is still
/// loading, by events rather than timing.
#[doc(hidden)]
pub struct LoadHold(PathBuf);

/// Holds back the index load of a cache (media or core) opened at `dir` (tests only).
#[doc(hidden)]
pub fn hold_index_load(dir: &Path) -> LoadHold {
    HELD.lock().push(dir.to_owned());
    LoadHold(dir.to_owned())
}

impl Drop for LoadHold {
    fn drop(&mut self) {
        HELD.lock().retain(|d| d != &self.0);
        RELEASED.notify_all();
    }
}
