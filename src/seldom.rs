//! Warnings said at most once per [`EVERY`]: an overloaded edge refuses requests (or
//! connections) by the thousand a second, and a log line for each would add disk writes to
//! the incident it reports (every refusal is counted in `/metrics` anyway). Used by the
//! flights' 503s and the listener's connection caps. Written here: `tracing` has no rate
//! limit of its own, and this is a timestamp and a counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// At most one line per this long, per kind of warning.
pub const EVERY: Duration = Duration::from_secs(10);

/// One kind of warning.
#[derive(Debug, Default)]
pub struct Seldom {
    /// When it was last said.
    said: Mutex<Option<Instant>>,
    /// How many were not said since.
    unsaid: AtomicU64,
}

impl Seldom {
    /// `Some(n)` when this one is to be said, `n` the ones not said since the last; `None`
    /// (counted) within [`EVERY`] of the last.
    pub fn say(&self, now: Instant) -> Option<u64> {
        let mut said = self.said.lock();
        match *said {
            Some(t) if now.saturating_duration_since(t) < EVERY => {
                self.unsaid.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *said = Some(now);
                Some(self.unsaid.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_once_per_interval_with_the_count_of_the_rest() {
        let seldom = Seldom::default();
        let t0 = Instant::now();
        assert_eq!(seldom.say(t0), Some(0));
        for s in 1..10 {
            assert_eq!(seldom.say(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(seldom.say(t0 + EVERY), Some(9), "the nine not said");
        assert_eq!(seldom.say(t0 + EVERY + Duration::from_millis(1)), None);
        assert_eq!(seldom.say(t0 + EVERY * 3), Some(1));
    }
}
