//! The upstreams of one pool (web or streaming): each with its connection cap and circuit
//! breaker; a request goes to the least busy upstream that may take it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::breaker::{Breaker, BreakerState};
use super::conns::IdleConns;

/// One upstream server.
#[derive(Debug)]
pub struct Upstream {
    /// Its address.
    pub addr: SocketAddr,
    /// Its address as a URI authority, made once (not per request).
    pub authority: http::uri::Authority,
    /// One permit per request in flight (the response body holds it to its end).
    permits: Arc<Semaphore>,
    max: usize,
    /// Its circuit breaker.
    pub breaker: Breaker,
    /// False while the active health check fails.
    healthy: AtomicBool,
    /// Requests sent (or tried), for metrics.
    pub requests: AtomicU64,
    /// Of those, failures (refused, reset, timed out, 502/503/504), for metrics.
    pub errors: AtomicU64,
    /// Requests sent once more on a new connection after a kept one closed before answering
    /// (the keep-alive race), for metrics.
    pub stale_retries: AtomicU64,
    /// Its idle keep-alive connections (kept across a reload with the upstream).
    pub idle: IdleConns,
}

impl Upstream {
    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Whether the last health check passed (true until one fails).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Records a health check's result.
    pub fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::Release);
    }
}

/// The right to send one request to an upstream: its connection permit and its breaker
/// admission. Tell the outcome with [`Admission::success`] or [`Admission::failure`].
pub struct Admission {
    /// The upstream.
    pub upstream: Arc<Upstream>,
    /// Held until the response body ends.
    permit: Option<OwnedSemaphorePermit>,
    probe: bool,
    told: bool,
}

impl Admission {
    /// The upstream answered (`ok`: not with 502/503/504). Returns the connection permit,
    /// for the response body to hold until its end.
    pub fn answered(mut self, ok: bool) -> OwnedSemaphorePermit {
        self.told = true;
        if !ok {
            self.upstream.errors.fetch_add(1, Ordering::Relaxed);
        }
        match ok {
            true => self.upstream.breaker.success(),
            false => self.upstream.breaker.failure(Instant::now()),
        }
        self.permit.take().expect("taken once")
    }

    /// The upstream failed.
    pub fn failure(mut self) {
        self.told = true;
        self.upstream.errors.fetch_add(1, Ordering::Relaxed);
        self.upstream.breaker.failure(Instant::now());
    }

    /// Neither: the request ended for the client's sake (a body over the limit, a client
    /// that left). A probe is given back.
    pub fn neutral(self) {}
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.probe && !self.told {
            self.upstream.breaker.abandon_probe(Instant::now());
        }
    }
}

/// Why no upstream was picked.
#[derive(Debug, Clone, Copy)]
pub enum NoUpstream {
    /// Every upstream's breaker is open (or the health check fails): try again after this.
    Open(Duration),
    /// Every upstream is at its connection cap.
    Full,
    /// Every upstream was tried already (or there is none).
    Exhausted,
}

/// The upstreams of one kind.
#[derive(Debug)]
pub struct Pool {
    /// The upstreams, in config order.
    pub upstreams: Vec<Arc<Upstream>>,
}

impl Pool {
    /// One upstream per address, each with `max` requests in flight at most and a breaker.
    pub fn new(addrs: &[SocketAddr], max: usize, failures: u32, cooldown: Duration) -> Pool {
        Pool::with_kept(addrs, max, failures, cooldown, &[])
    }

    /// As [`Pool::new`], but an address found in `kept` (the pool before a reload, with the
    /// same settings) keeps its upstream: its requests in flight, breaker and health.
    pub fn with_kept(
        addrs: &[SocketAddr],
        max: usize,
        failures: u32,
        cooldown: Duration,
        kept: &[Arc<Upstream>],
    ) -> Pool {
        Pool {
            upstreams: addrs
                .iter()
                .map(|&addr| {
                    if let Some(u) = kept.iter().find(|u| u.addr == addr) {
                        return u.clone();
                    }
                    Arc::new(Upstream {
                        addr,
                        authority: addr.to_string().parse().expect("a socket address"),
                        permits: Arc::new(Semaphore::new(max)),
                        max,
                        breaker: Breaker::new(failures, cooldown),
                        healthy: AtomicBool::new(true),
                        requests: AtomicU64::new(0),
                        errors: AtomicU64::new(0),
                        stale_retries: AtomicU64::new(0),
                        idle: IdleConns::default(),
                    })
                })
                .collect(),
        }
    }

    /// Picks the upstream with the fewest requests in flight among those not in `tried`,
    /// healthy, whose breaker admits a request and which are under their cap.
    pub fn pick(&self, tried: &[SocketAddr]) -> Result<Admission, NoUpstream> {
        let now = Instant::now();
        let untried = |u: &&Arc<Upstream>| !tried.contains(&u.addr);
        if !self.upstreams.iter().any(|u| untried(&u)) {
            return Err(NoUpstream::Exhausted);
        }
        // A failing health check is followed unless every upstream fails it (then the
        // breakers decide: a wrong check must not take the whole site down).
        let any_healthy = self.upstreams.iter().filter(untried).any(|u| u.healthy());
        let candidate = |u: &&Arc<Upstream>| {
            untried(u) && (u.healthy() || !any_healthy) && u.breaker.available(now)
        };
        // The least busy (the first in config order among equals), found in one walk: no
        // list is made per request unless that one is at its cap.
        let mut best: Option<(&Arc<Upstream>, usize)> = None;
        for u in self.upstreams.iter().filter(candidate) {
            let n = u.in_flight();
            if best.is_none_or(|(_, least)| n < least) {
                best = Some((u, n));
            }
        }
        let Some((best, _)) = best else {
            let wait = self
                .upstreams
                .iter()
                .filter_map(|u| u.breaker.retry_after(now))
                .min()
                .unwrap_or(Duration::from_secs(1));
            return Err(NoUpstream::Open(wait));
        };
        if let Some(admission) = admit(best, now) {
            return Ok(admission);
        }
        // At its cap (or its breaker turned meanwhile): the others, the least busy first.
        let mut others: Vec<&Arc<Upstream>> = self
            .upstreams
            .iter()
            .filter(|u| !Arc::ptr_eq(u, best) && candidate(u))
            .collect();
        others.sort_by_key(|u| u.in_flight());
        others
            .into_iter()
            .find_map(|u| admit(u, now))
            .ok_or(NoUpstream::Full)
    }

    /// Each upstream's address, requests in flight and breaker state.
    pub fn states(&self) -> Vec<(SocketAddr, usize, BreakerState)> {
        self.upstreams
            .iter()
            .map(|u| (u.addr, u.in_flight(), u.breaker.state()))
            .collect()
    }
}

/// A request admitted by `u`: under its cap, and its breaker lets it through.
fn admit(u: &Arc<Upstream>, now: Instant) -> Option<Admission> {
    let permit = u.permits.clone().try_acquire_owned().ok()?;
    let probe = u.breaker.admit(now)?;
    u.requests.fetch_add(1, Ordering::Relaxed);
    Some(Admission {
        upstream: u.clone(),
        permit: Some(permit),
        probe,
        told: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u16, max: usize) -> Pool {
        let addrs: Vec<SocketAddr> = (1..=n).map(|p| ([127, 0, 0, 1], p).into()).collect();
        Pool::new(&addrs, max, 1, Duration::from_secs(60))
    }

    fn port(a: &Admission) -> u16 {
        a.upstream.addr.port()
    }

    /// The least busy first, the first in order among equals; one at its cap is passed over
    /// for the next least busy; all at their cap is `Full`.
    #[test]
    fn the_least_busy_upstream_under_its_cap_is_picked() {
        let p = pool(3, 2);
        let a = p.pick(&[]).unwrap();
        assert_eq!(port(&a), 1, "all idle: the first");
        let b = p.pick(&[]).unwrap();
        assert_eq!(port(&b), 2, "1 busy: the next idle one");
        let c = p.pick(&[]).unwrap();
        assert_eq!(port(&c), 3);
        drop(b);
        let d = p.pick(&[]).unwrap();
        assert_eq!(port(&d), 2, "2 idle again, the others busy");
        // 1, 2, 3 each have one in flight: 1 then 2 then 3 reach the cap.
        let held: Vec<Admission> = (0..3).map(|_| p.pick(&[]).unwrap()).collect();
        let ports: Vec<u16> = held.iter().map(port).collect();
        assert_eq!(ports, [1, 2, 3]);
        assert!(matches!(p.pick(&[]), Err(NoUpstream::Full)));
        drop(c);
        let e = p.pick(&[]).unwrap();
        assert_eq!(
            port(&e),
            3,
            "the only one under its cap, though not the first"
        );
        drop((a, d, e, held));
    }

    /// Tried upstreams are left out; a failing health check too, unless every upstream
    /// fails it; open breakers answer `Open`.
    #[test]
    fn tried_unhealthy_and_open_upstreams_are_left_out() {
        let p = pool(2, 4);
        let one: SocketAddr = ([127, 0, 0, 1], 1).into();
        let two: SocketAddr = ([127, 0, 0, 1], 2).into();
        assert_eq!(port(&p.pick(&[one]).unwrap()), 2);
        assert!(matches!(p.pick(&[one, two]), Err(NoUpstream::Exhausted)));
        p.upstreams[0].set_healthy(false);
        assert_eq!(port(&p.pick(&[]).unwrap()), 2);
        p.upstreams[1].set_healthy(false);
        assert_eq!(
            port(&p.pick(&[]).unwrap()),
            1,
            "all failing: the breakers decide"
        );
        p.pick(&[]).unwrap().failure();
        assert_eq!(port(&p.pick(&[]).unwrap()), 2, "1's breaker is open");
        p.pick(&[]).unwrap().failure();
        match p.pick(&[]) {
            Err(NoUpstream::Open(wait)) => {
                assert!(wait > Duration::ZERO && wait <= Duration::from_secs(60))
            }
            other => panic!("{:?}", other.map(|a| a.upstream.addr)),
        }
    }
}
