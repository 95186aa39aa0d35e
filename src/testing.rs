//! Helpers for the unit tests of several rooms.

use http::{HeaderMap, HeaderName};

/// A header map of `(name, value)` pairs, in order, a repeated name appended.
pub fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}
