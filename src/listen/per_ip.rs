//! `max_connections_per_ip`: the most connections one client address may hold open at once on
//! the public listeners, so that one client (a scraper, a flood) cannot take every place under
//! `max_connections` and lock the others out. Off unless set.
//!
//! IPv4 addresses count one by one; IPv6 addresses by their /64 (one host or one customer's
//! network: a client holding a /64 would otherwise get 2^64 budgets). The addresses in
//! `max_connections_per_ip_exempt` and `[core] trusted_proxies` are not limited (a load
//! balancer or CDN in front of the edge carries many clients' connections).
//!
//! A connection past the limit is closed as soon as it is accepted, before TLS or a request
//! is read: nothing is spent on it. That is logged (at most every 10 s) and counted
//! (`fediedge_connections_refused_per_ip_total`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::time::Instant;

use crate::seldom::Seldom;

/// The connections open per client address, and the limit.
#[derive(Debug, Default)]
pub struct PerIp {
    /// The limit; 0: none.
    max: AtomicUsize,
    /// Addresses not limited.
    exempt: RwLock<Vec<ipnet::IpNet>>,
    /// Connections open per address (per /64 for IPv6); an address leaves at zero.
    open: Mutex<HashMap<IpAddr, usize>>,
    /// Connections closed at accept because their address was at the limit.
    refused: AtomicU64,
    /// Refusals, logged seldom.
    said: Seldom,
}

/// A connection refused: its address holds `max_connections_per_ip` already.
#[derive(Debug)]
pub(super) struct Refused;

/// One connection's place in its address's count, given back when dropped.
#[derive(Debug)]
pub(super) struct Hold {
    per_ip: Arc<PerIp>,
    key: IpAddr,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

impl PerIp {
    /// At most `max` connections per address (None: no limit), except from `exempt`.
    pub fn new(max: Option<usize>, exempt: Vec<ipnet::IpNet>) -> Arc<PerIp> {
        let per_ip = Arc::new(PerIp::default());
        per_ip.set(max, exempt);
        per_ip
    }

    /// Changes the limit and the exempt addresses. Connections open are kept, also those
    /// over a lower limit; new ones wait until their address is under it.
    pub fn set(&self, max: Option<usize>, exempt: Vec<ipnet::IpNet>) {
        self.set_max(max);
        self.set_exempt(exempt);
    }

    /// Changes the limit (None: no limit).
    pub fn set_max(&self, max: Option<usize>) {
        self.max.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Changes the addresses not limited.
    pub fn set_exempt(&self, exempt: Vec<ipnet::IpNet>) {
        *self.exempt.write() = exempt;
    }

    /// Connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// A place for a connection from `peer`: `Ok(None)` when there is no limit for it,
    /// [`Refused`] when its address holds the limit already (the caller closes it).
    pub(super) fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Option<Hold>, Refused> {
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            return Ok(None);
        }
        let peer = peer.to_canonical();
        if self.exempt.read().iter().any(|n| n.contains(&peer)) {
            return Ok(None);
        }
        let key = key(peer);
        {
            let mut open = self.open.lock();
            let n = open.entry(key).or_insert(0);
            if *n < max {
                *n += 1;
                return Ok(Some(Hold {
                    per_ip: self.clone(),
                    key,
                }));
            }
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.warn(key, max);
        Err(Refused)
    }

    fn warn(&self, key: IpAddr, max: usize) {
        if self.said.say(Instant::now().into_std()).is_none() {
            return;
        }
        let client = match key {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("{a}/64"),
        };
        tracing::warn!(
            %client,
            max_connections_per_ip = max,
            refused_total = self.refused(),
            "max_connections_per_ip reached: closing new connections from this client at accept"
        );
    }
}

/// What an address counts under: itself (IPv4) or its /64 (IPv6).
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => {
            let s = a.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_gets_max_places_and_each_closed_one_back() {
        let per_ip = PerIp::new(Some(2), vec!["10.0.0.0/8".parse().unwrap()]);
        let a = per_ip.admit(ip("192.0.2.1")).unwrap().expect("counted");
        let b = per_ip.admit(ip("192.0.2.1")).unwrap().expect("counted");
        assert!(per_ip.admit(ip("192.0.2.1")).is_err(), "third one refused");
        assert!(
            per_ip.admit(ip("192.0.2.2")).unwrap().is_some(),
            "another address"
        );
        assert_eq!(per_ip.refused(), 1);
        drop(a);
        let c = per_ip.admit(ip("192.0.2.1")).unwrap();
        assert!(c.is_some(), "a place given back is taken again");
        // Exempt: never counted.
        for _ in 0..5 {
            assert!(per_ip.admit(ip("10.1.2.3")).unwrap().is_none());
        }
        drop((b, c));
        assert!(per_ip.open.lock().is_empty(), "an address leaves at zero");
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let per_ip = PerIp::new(Some(1), Vec::new());
        let _a = per_ip.admit(ip("2001:db8:1:2::1")).unwrap();
        assert!(
            per_ip.admit(ip("2001:db8:1:2:ffff::9")).is_err(),
            "same /64"
        );
        assert!(per_ip.admit(ip("2001:db8:1:3::1")).is_ok(), "another /64");
        let _v4 = per_ip.admit(ip("192.0.2.7")).unwrap();
        assert!(per_ip.admit(ip("::ffff:192.0.2.7")).is_err(), "mapped");
    }

    #[test]
    fn no_limit_counts_nothing_and_a_reload_sets_one() {
        let per_ip = PerIp::new(None, Vec::new());
        let held: Vec<_> = (0..10).map(|_| per_ip.admit(ip("192.0.2.1"))).collect();
        assert!(held.iter().all(|h| matches!(h, Ok(None))));
        per_ip.set(Some(1), Vec::new());
        let _one = per_ip.admit(ip("192.0.2.1")).unwrap();
        assert!(per_ip.admit(ip("192.0.2.1")).is_err());
    }
}
