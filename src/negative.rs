//! The memory of keys found nowhere: for a short while a key that no store has is answered
//! 404 without asking the stores again, so a 404 storm (a deleted post's media, a scraper)
//! does not reach them.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::key::Key;

/// Remembers keys found nowhere, for a short while, so a 404 storm does not reach the stores.
pub struct NegativeCache {
    ttl: Duration,
    seen: Mutex<lru::LruCache<Key, Instant>>,
}

impl NegativeCache {
    /// Remembers up to 100,000 keys for `ttl` each (`ttl` zero: remembers nothing).
    pub fn new(ttl: Duration) -> Self {
        NegativeCache {
            ttl,
            seen: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(100_000).expect("non-zero"),
            )),
        }
    }

    /// True if `key` was found nowhere less than `ttl` ago.
    pub fn contains(&self, key: &Key) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let mut seen = self.seen.lock();
        match seen.get(key) {
            Some(at) if at.elapsed() < self.ttl => true,
            Some(_) => {
                seen.pop(key);
                false
            }
            None => false,
        }
    }

    /// Remembers that `key` was found nowhere.
    pub fn insert(&self, key: &Key) {
        if !self.ttl.is_zero() {
            self.seen.lock().put(key.clone(), Instant::now());
        }
    }
}
