//! What a hit needs of a stored response, worked out once per entry ([`Hot`]): the policy's
//! clock read back into plain numbers, and the response head ready for hyper.
//!
//! `http-cache-semantics` answers `is_stale` and `age` by parsing the stored headers again
//! on every call (Cache-Control in a SipHash map, `Age`, `Vary`, `Set-Cookie` by name); both
//! depend only on what the entry holds and on `now`, so they are read back once through the
//! crate's public answers at fixed times (see [`Timing`]) and give the same results.

use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::store::Meta;

/// `X-Cache-Status`, what this edge did.
pub const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
/// `Surrogate-Control`: meant for this edge, never sent on.
pub const SURROGATE_CONTROL: HeaderName = HeaderName::from_static("surrogate-control");

/// An entry's [`Hot`], made at its first hit. A clone starts empty: a meta is cloned only
/// to be changed (a 304's headers), and must not carry the head of the one it came from.
#[derive(Debug, Default)]
pub struct HotCell(OnceLock<Hot>);

impl Clone for HotCell {
    fn clone(&self) -> Self {
        HotCell::default()
    }
}

/// The hit's view of an entry.
#[derive(Debug)]
pub struct Hot {
    timing: Timing,
    /// The head of a whole answer: the stored headers (without `Surrogate-Control`), an
    /// `Age` to overwrite, `Content-Length`, `X-Cache-Status: HIT`, and the `Vary` that
    /// `compress` would add.
    head: HeaderMap,
    /// The same without that `Vary` (for `[core] gzip` off), if it was added.
    plain_head: Option<HeaderMap>,
    /// The stored response has `Vary`.
    pub vary: bool,
    /// Whether `compress` would gzip it.
    pub compressible: bool,
    /// The head of its gzipped copy (`Store::gzipped`), made at the first gzipped answer.
    pub gzip_head: OnceLock<HeaderMap>,
}

/// The policy's clock. The crate computes `age(now) = age_header + (now - received)` (the
/// difference floored at zero) and `is_stale(now) = max_age <= age(now)`, where `received`,
/// `age_header` and `max_age` are fixed for a policy. Asked at the Unix epoch (before any
/// response), `age` is `age_header` and `time_to_live` is `max_age - age_header` (floored):
/// then fresh ⇔ `now - received < fresh_for`, exactly.
#[derive(Debug, Clone, Copy)]
struct Timing {
    received: SystemTime,
    initial_age: Duration,
    fresh_for: Duration,
}

impl Timing {
    /// None when `now` is not after the response's receipt (a clock set back): `received`
    /// cannot be read back then.
    fn of(meta: &Meta, now: SystemTime) -> Option<Timing> {
        let initial_age = meta.policy.age(SystemTime::UNIX_EPOCH);
        let fresh_for = meta.policy.time_to_live(SystemTime::UNIX_EPOCH);
        let resident = meta.policy.age(now).checked_sub(initial_age)?;
        if resident.is_zero() {
            return None;
        }
        Some(Timing {
            received: now.checked_sub(resident)?,
            initial_age,
            fresh_for,
        })
    }

    fn resident(&self, now: SystemTime) -> Duration {
        now.duration_since(self.received).unwrap_or_default()
    }
}

impl Hot {
    fn of(meta: &Meta, now: SystemTime) -> Option<Hot> {
        let timing = Timing::of(meta, now)?;
        let plain = plain_head(meta);
        let mut head = plain.clone();
        let compressible = crate::compress::vary(meta.status, &mut head);
        // `HeaderMap::len` counts values: one more when the `Vary` was appended.
        let plain_head = (head.len() != plain.len()).then_some(plain);
        Some(Hot {
            timing,
            head,
            plain_head,
            vary: meta.headers.contains_key(header::VARY),
            compressible,
            gzip_head: OnceLock::new(),
        })
    }

    /// The head of a whole answer, with the `Vary: Accept-Encoding` `compress` would add
    /// (`vary`: `[core] gzip` is on) or without.
    pub fn head(&self, vary: bool) -> &HeaderMap {
        match (vary, &self.plain_head) {
            (false, Some(plain)) => plain,
            _ => &self.head,
        }
    }

    /// `!policy.is_stale(now)`.
    pub fn fresh(&self, now: SystemTime) -> bool {
        self.timing.resident(now) < self.timing.fresh_for
    }

    /// `policy.age(now)`.
    pub fn age(&self, now: SystemTime) -> Duration {
        self.timing
            .initial_age
            .saturating_add(self.timing.resident(now))
    }
}

impl Meta {
    /// Its [`Hot`] (None while the clock is behind the response's receipt: then the policy
    /// decides, as for any other request).
    pub fn hot(&self, now: SystemTime) -> Option<&Hot> {
        if let Some(h) = self.hot.0.get() {
            return Some(h);
        }
        let h = Hot::of(self, now)?;
        Some(self.hot.0.get_or_init(|| h))
    }
}

/// The head of a whole answer from a stored response: its headers without
/// `Surrogate-Control`, then `Age` (0, to be set), `Content-Length` and
/// `X-Cache-Status: HIT` (`compress::vary` adds the `Vary` gzip asks for).
pub fn plain_head(meta: &Meta) -> HeaderMap {
    let mut head = meta.headers.clone();
    head.remove(SURROGATE_CONTROL);
    head.insert(header::AGE, HeaderValue::from_static("0"));
    head.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len));
    head.insert(X_CACHE_STATUS, HeaderValue::from_static("HIT"));
    head
}

/// Ages below this are served from one table of static values (no allocation per hit).
const AGES: u64 = 4096;

/// An `Age` value.
pub fn age_value(secs: u64) -> HeaderValue {
    // One string of every number below AGES, leaked once: `from_static` values clone and
    // drop without touching a reference count.
    static TABLE: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
        let all: String = (0..AGES).map(|n| n.to_string()).collect();
        let all: &'static str = Box::leak(all.into_boxed_str());
        let mut at = 0;
        (0..AGES)
            .map(|n| {
                let len = n.to_string().len();
                let v = HeaderValue::from_static(&all[at..at + len]);
                at += len;
                v
            })
            .collect()
    });
    match usize::try_from(secs).ok().and_then(|i| TABLE.get(i)) {
        Some(v) => v.clone(),
        None => HeaderValue::from(secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, StatusCode};

    /// Read back once, the clock gives the policy's own answers at any time.
    #[test]
    fn hot_timing_is_the_policys() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(t0);
        let later = httpdate::fmt_http_date(t0 + Duration::from_secs(90));
        let earlier = httpdate::fmt_http_date(t0 - Duration::from_secs(1000));
        let cases: Vec<Vec<(&str, &str)>> = vec![
            vec![("cache-control", "max-age=60")],
            vec![("cache-control", "public, max-age=60"), ("age", "30")],
            vec![("cache-control", "max-age=60"), ("age", "75")],
            vec![("cache-control", "max-age=60"), ("age", "x")],
            vec![("cache-control", "max-age=0")],
            vec![("cache-control", "no-cache, max-age=60")],
            vec![("cache-control", "s-maxage=10, max-age=100")],
            vec![("date", &date), ("expires", &later)],
            vec![("date", &date), ("last-modified", &earlier)],
            vec![
                ("surrogate-control", "max-age=20"),
                ("cache-control", "max-age=5"),
            ],
        ];
        let req = super::super::policy::policy_request(
            super::super::store::Scheme::Https,
            "/x",
            &HeaderMap::new(),
        );
        for case in cases {
            let mut headers = HeaderMap::new();
            for (k, v) in &case {
                headers.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let meta =
                super::super::policy::build("h", "/x", &req, None, StatusCode::OK, &headers, t0)
                    .unwrap_or_else(|| panic!("{case:?} storable"));
            let hot = meta
                .hot(t0 + Duration::from_millis(1))
                .unwrap_or_else(|| panic!("{case:?}: read back"));
            for ms in [
                0, 1, 999, 1000, 4_999, 5_000, 9_999, 10_000, 19_999, 20_000, 29_999, 30_000,
            ]
            .into_iter()
            .chain([59_999, 60_000, 60_001, 89_999, 90_000, 100_000, 10_000_000])
            {
                for now in [
                    t0 + Duration::from_millis(ms),
                    t0 - Duration::from_millis(ms),
                ] {
                    assert_eq!(
                        hot.fresh(now),
                        !meta.policy.is_stale(now),
                        "{case:?} at {ms} ms"
                    );
                    assert_eq!(hot.age(now), meta.policy.age(now), "{case:?} at {ms} ms");
                }
            }
        }
    }

    /// Not before the response was received: no read-back (the policy decides).
    #[test]
    fn no_hot_before_the_receipt() {
        let t0 = SystemTime::now();
        let req = super::super::policy::policy_request(
            super::super::store::Scheme::Https,
            "/x",
            &HeaderMap::new(),
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, "max-age=60".parse().unwrap());
        let meta = super::super::policy::build("h", "/x", &req, None, StatusCode::OK, &headers, t0)
            .unwrap();
        assert!(meta.hot(t0).is_none());
        assert!(meta.hot(t0 - Duration::from_secs(5)).is_none());
        let hot = meta.hot(t0 + Duration::from_secs(1)).expect("read back");
        assert_eq!(hot.head(true)[header::CONTENT_LENGTH], "0");
        assert_eq!(hot.head(true)[X_CACHE_STATUS], "HIT");
        assert!(meta.clone().hot.0.get().is_none(), "a clone starts without");
    }

    #[test]
    fn age_values_are_the_numbers() {
        for n in [0, 1, 9, 10, 99, 100, 4095, 4096, 1 << 40] {
            assert_eq!(age_value(n), HeaderValue::from(n), "{n}");
        }
    }
}
