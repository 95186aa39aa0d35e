//! A follower's own read of its body's source, for the bytes its flight cannot give it: the
//! part kept on a cache disk that failed since (unreadable), or the rest of a body the flight
//! could keep neither on disk nor in memory. The follower's client is never cut for a local
//! disk's fault; it costs that follower a source fetch of its own.
//!
//! The stores are read whole, not by range (the [`crate::store::Store`] trait has no ranged
//! read): the bytes before the follower's offset are read again and dropped, and in exchange
//! the rest is verified as part of the whole body (length, and MD5 where the source vouches
//! for one), its last byte held back until then, as every flight's is.
//!
//! A refetch is a source read like a flight's own: it takes a slot of `max_flights` and holds
//! it until its stream ends or is dropped, waiting for one up to `flight_queue_wait` as a new
//! flight would (counted in `fediedge_flights_waiting`). A failed disk under a herd thus
//! makes no more source reads at once than the cap allows. A follower that gets no slot in
//! time is cut (its response was under way: headers sent, perhaps bytes), counted in
//! `fediedge_flight_refetches_refused_total` and logged once per flight, never per follower.

use std::sync::atomic::{AtomicBool, Ordering};

use super::body::Slots;
use super::verified;
use crate::key::Key;
use crate::metrics::Metrics;
use crate::store::{ByteStream, ObjectMeta, StoreError, StoreHandle};

/// Where a flight's body came from, for a follower to read it again.
pub struct Refetch {
    store: StoreHandle,
    key: Key,
    /// `max_flights`, shared with the flights.
    slots: Slots,
    /// Whether a refused refetch of this flight was logged already.
    refusal_said: AtomicBool,
    metrics: Metrics,
}

impl Refetch {
    /// The body of `key` in `store`, read within `slots`.
    pub fn new(store: StoreHandle, key: Key, slots: Slots, metrics: Metrics) -> Refetch {
        Refetch {
            store,
            key,
            slots,
            refusal_said: AtomicBool::new(false),
            metrics,
        }
    }

    /// The whole body again, from the store the flight read, counted in
    /// `fediedge_flight_refetches_total`. Fails if the store no longer has the object the
    /// flight announced as `meta` (another length, ETag, MD5 or Last-Modified). `spliced`:
    /// the follower has sent bytes of the flight's body already and sends on from this one;
    /// then the two answers must also be shown to be one object (an ETag or MD5 that both
    /// give), else it fails: a cut response rather than one spliced from two bodies that
    /// cannot be told apart. The stream fails if the body does not match, and holds back its
    /// last chunk until it is verified. It holds a flight slot until it ends or is dropped;
    /// with none free within the queue time, it fails.
    pub async fn body(&self, meta: &ObjectMeta, spliced: bool) -> Result<ByteStream, StoreError> {
        let name = self.store.name();
        let slot = match self.slots.now() {
            Some(slot) => Some(slot),
            None => {
                let _queued = self.metrics.flight_queued();
                self.slots.wait().await
            }
        };
        let Some(slot) = slot else {
            self.metrics.flight_refetch_refused();
            if !self.refusal_said.swap(true, Ordering::Relaxed) {
                tracing::warn!(key = %self.key, store = name, "too many fetches under way (max_flights): followers of this flight that need its body read again are cut");
            }
            return Err(StoreError::backend(
                name,
                "no flight slot for a refetch (max_flights): the response is cut",
            ));
        };
        self.metrics.flight_refetch();
        let object = self.store.get(&self.key).await?;
        let changed = |detail: &str| StoreError::Integrity {
            store: name.to_owned(),
            key: self.key.to_string(),
            detail: format!("{detail} while a follower was being served"),
        };
        let Some(object) = object else {
            return Err(changed("gone from its source"));
        };
        if !same_object(meta, &object.meta) {
            return Err(changed("changed at its source"));
        }
        if spliced && !shown_same(meta, &object.meta) {
            return Err(changed(
                "not shown to be the same object (no ETag or MD5 in both answers)",
            ));
        }
        // What either answer vouches for is checked.
        let mut check = object.meta;
        check.md5 = check.md5.or(meta.md5);
        let body = verified(object.body, &check, name.to_owned(), self.key.to_string());
        Ok(super::body::holding(body, slot))
    }
}

/// Whether two answers of a store may be the same object: the same length, and the same
/// ETag, MD5 and Last-Modified wherever both give one.
fn same_object(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    fn agree<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
    a.size == b.size
        && agree(&a.etag, &b.etag)
        && agree(&a.md5, &b.md5)
        && agree(&a.last_modified, &b.last_modified)
}

/// Whether two answers are shown to be the same object: they agree ([`same_object`]), and
/// a strong ETag or an MD5 is given by both (a length and a date alone do not tell two
/// bodies apart; a weak ETag, `W/"…"`, only says two bodies are equivalent, not the same
/// bytes: RFC 9110 §8.8.3).
fn shown_same(a: &ObjectMeta, b: &ObjectMeta) -> bool {
    let strong = |m: &ObjectMeta| m.etag.as_deref().is_some_and(|t| !t.starts_with("W/"));
    same_object(a, b) && ((strong(a) && strong(b)) || (a.md5.is_some() && b.md5.is_some()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_object_has_the_same_length_etag_and_md5_where_both_say() {
        let a = ObjectMeta {
            size: 10,
            etag: Some("\"a\"".into()),
            md5: Some([1; 16]),
            ..ObjectMeta::default()
        };
        assert!(same_object(&a, &a.clone()));
        let unsaid = ObjectMeta {
            size: 10,
            ..ObjectMeta::default()
        };
        assert!(
            same_object(&a, &unsaid),
            "nothing to compare is no difference"
        );
        let longer = ObjectMeta {
            size: 11,
            ..a.clone()
        };
        let other_etag = ObjectMeta {
            etag: Some("\"b\"".into()),
            ..a.clone()
        };
        let other_md5 = ObjectMeta {
            md5: Some([2; 16]),
            ..a.clone()
        };
        let other_date = ObjectMeta {
            last_modified: Some(std::time::SystemTime::UNIX_EPOCH),
            ..a.clone()
        };
        let dated = ObjectMeta {
            last_modified: Some(
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1),
            ),
            ..a.clone()
        };
        for b in [longer, other_etag, other_md5] {
            assert!(!same_object(&a, &b), "{b:?}");
        }
        assert!(!same_object(&other_date, &dated), "another Last-Modified");
    }

    #[test]
    fn only_a_strong_etag_or_md5_in_both_answers_shows_the_same_object() {
        let etag = ObjectMeta {
            size: 10,
            etag: Some("\"a\"".into()),
            ..ObjectMeta::default()
        };
        let md5 = ObjectMeta {
            size: 10,
            md5: Some([1; 16]),
            ..ObjectMeta::default()
        };
        let dated = ObjectMeta {
            size: 10,
            last_modified: Some(std::time::SystemTime::UNIX_EPOCH),
            ..ObjectMeta::default()
        };
        assert!(shown_same(&etag, &etag.clone()));
        assert!(shown_same(&md5, &md5.clone()));
        // Each may be the other (nothing disagrees), but nothing shows it.
        assert!(same_object(&etag, &md5));
        assert!(!shown_same(&etag, &md5));
        assert!(
            !shown_same(&dated, &dated.clone()),
            "a length and a date alone"
        );
        let other = ObjectMeta {
            etag: Some("\"b\"".into()),
            ..etag.clone()
        };
        assert!(!shown_same(&etag, &other));
        let weak = ObjectMeta {
            etag: Some("W/\"a\"".into()),
            ..etag.clone()
        };
        assert!(
            !shown_same(&weak, &weak.clone()),
            "a weak ETag: equivalent, not the same bytes"
        );
    }
}
