//! A circuit breaker per upstream: after `threshold` consecutive failures it opens, and requests
//! are refused at once (the caller answers 503 with `Retry-After`) instead of waiting on a
//! failing upstream; after the cool-down one probe request is let through (half-open); its
//! success closes the breaker, its failure opens it for another cool-down.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// What the breaker shows in metrics: 0 closed, 1 open, 2 half-open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass.
    Closed,
    /// Requests are refused until the cool-down ends.
    Open,
    /// One probe is under way.
    HalfOpen,
}

/// One upstream's breaker.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a request could be admitted now (without admitting it).
    pub fn available(&self, now: Instant) -> bool {
        match *self.state.lock() {
            State::Closed { .. } => true,
            State::Open { until } => now >= until,
            State::HalfOpen => false,
        }
    }

    /// Admits a request: `Some(false)` a normal one, `Some(true)` the probe of a half-open
    /// breaker, `None` refused.
    pub fn admit(&self, now: Instant) -> Option<bool> {
        let mut s = self.state.lock();
        match *s {
            State::Closed { .. } => Some(false),
            State::Open { until } if now >= until => {
                *s = State::HalfOpen;
                Some(true)
            }
            _ => None,
        }
    }

    /// A request succeeded: the breaker closes.
    pub fn success(&self) {
        *self.state.lock() = State::Closed { failures: 0 };
    }

    /// A request failed (refused, reset, timed out, 502/503/504).
    pub fn failure(&self, now: Instant) {
        let mut s = self.state.lock();
        *s = match *s {
            State::Closed { failures } if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            State::Open { until } => State::Open { until },
            _ => State::Open {
                until: now + self.cooldown,
            },
        };
    }

    /// The probe ended without telling (its client left): the next request probes again.
    pub fn abandon_probe(&self, now: Instant) {
        let mut s = self.state.lock();
        if *s == State::HalfOpen {
            *s = State::Open { until: now };
        }
    }

    /// How long until a request may pass again (None when one may pass now).
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match *self.state.lock() {
            State::Closed { .. } => None,
            State::Open { until } => until.checked_duration_since(now).filter(|d| !d.is_zero()),
            // A probe is under way: its answer comes within a request's time.
            State::HalfOpen => Some(Duration::from_secs(1)),
        }
    }

    /// The state, for metrics and logs.
    pub fn state(&self) -> BreakerState {
        match *self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_probes_once_and_closes() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        b.failure(t0);
        b.success();
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.admit(t0), Some(false), "two failures after a success");
        b.failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(t0), None);
        assert_eq!(b.retry_after(t0), Some(Duration::from_secs(10)));
        let later = t0 + Duration::from_secs(10);
        assert!(b.available(later));
        assert_eq!(b.admit(later), Some(true), "one probe");
        assert_eq!(b.admit(later), None, "only one");
        b.failure(later);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.admit(later), None, "a failed probe opens it again");
        let again = later + Duration::from_secs(10);
        assert_eq!(b.admit(again), Some(true));
        b.abandon_probe(again);
        assert_eq!(
            b.admit(again),
            Some(true),
            "an abandoned probe is taken again"
        );
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(again), Some(false));
    }
}
