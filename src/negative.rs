//! The memory of keys found nowhere: for a short while a key that no store has is answered
//! 404 without asking the stores again, so a 404 storm (a deleted post's media, a scraper)
//! does not reach them.

use std::time::Duration;

use tokio::time::Instant;

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

#[cfg(test)]
mod tests {
    use super::*;

    // Tokio's clock: paused and advanced by the test, never slept on.
    #[tokio::test(start_paused = true)]
    async fn a_miss_is_remembered_for_the_ttl_then_asked_again() {
        let negative = NegativeCache::new(Duration::from_secs(3));
        let key = Key::parse("a/b.png").unwrap();
        assert!(!negative.contains(&key));
        negative.insert(&key);
        assert!(negative.contains(&key));
        tokio::time::advance(Duration::from_millis(2_999)).await;
        assert!(negative.contains(&key));
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!negative.contains(&key));
        // Forgotten, not merely hidden: a new miss starts a new period.
        negative.insert(&key);
        assert!(negative.contains(&key));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_ttl_remembers_nothing() {
        let negative = NegativeCache::new(Duration::ZERO);
        let key = Key::parse("a/b.png").unwrap();
        negative.insert(&key);
        assert!(!negative.contains(&key));
    }
}
