//! `max_connections`: the cap on open client connections, one count across the public
//! listeners (`listen`, `[tls] listen`, `tls.redirect_listen`); the admin listener is not
//! counted, so the operator can still reach `/metrics` and the status page at the cap.
//!
//! At the cap an accept loop stops accepting: new connections wait in the kernel's listen
//! backlog (then the client's SYN retries) until a connection closes, as haproxy's `maxconn`
//! does. Closing them at once instead would turn a short burst into errors for real clients
//! (and a TLS client retries at once, adding load), while waiting costs the edge nothing: a
//! connection in the backlog holds no descriptor and no memory of this process.
//!
//! A connection's slot is held by its task (which lingers on a second descriptor after hyper
//! is done) and by its socket (`super::socket`): a WebSocket handed to the proxy's tunnel
//! keeps its slot until the tunnel drops the socket.
//!
//! A reload may change the cap ([`ConnectionCap::resize`]): a higher one applies at once; a
//! lower one takes the free places at once and the rest as connections close (no open
//! connection is dropped), and nothing new is accepted until the count is under it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::seldom::Seldom;
use tokio_util::sync::CancellationToken;

/// Descriptors kept for everything but client connections (files, upstreams, the ledger).
const RESERVED_FDS: u64 = 256;

/// Descriptors one client connection may take at worst: its socket, the duplicate kept for
/// the lingering close, a connection to core or a store, a file being sent.
const FDS_PER_CONNECTION: u64 = 4;

/// The default `max_connections`: what the process's descriptor limit (`RLIMIT_NOFILE`, the
/// soft limit; systemd's `LimitNOFILE`) allows at [`FDS_PER_CONNECTION`] each, after
/// [`RESERVED_FDS`]; at least 64.
pub fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given and nothing else.
    let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 if limit.rlim_cur != libc::RLIM_INFINITY => limit.rlim_cur,
        // Unlimited or unknown: as if 65536 (the packaged unit's `LimitNOFILE`).
        _ => 65536,
    };
    let n = soft.saturating_sub(RESERVED_FDS) / FDS_PER_CONNECTION;
    usize::try_from(n).unwrap_or(usize::MAX).max(64)
}

/// The count of open client connections and its limit. Shared by the public listeners; also
/// what [`ConnectionCollector`] shows on `/metrics`.
#[derive(Debug)]
pub struct ConnectionCap {
    max: AtomicUsize,
    /// One permit per place; a lower cap forgets permits.
    permits: Arc<Semaphore>,
    /// Connections holding a slot.
    open: AtomicUsize,
    /// Times an accept loop found the cap reached and stopped accepting.
    waits: AtomicU64,
    /// Reaching the cap, logged seldom.
    said: Seldom,
    /// `max_connections_per_ip`, checked at accept before a place is taken.
    pub per_ip: Arc<super::per_ip::PerIp>,
}

/// One open connection's place under the cap, freed when the last holder drops it.
pub(super) type Slot = Arc<Place>;

/// What a [`Slot`] holds.
#[derive(Debug)]
pub(super) struct Place {
    _permit: OwnedSemaphorePermit,
    cap: Arc<ConnectionCap>,
    /// The connection's place in its address's count, if that is limited.
    _per_ip: Option<super::per_ip::Hold>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.cap.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionCap {
    /// At most `max` (at least 1) connections open at once.
    pub fn new(max: usize) -> Arc<ConnectionCap> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(ConnectionCap {
            max: AtomicUsize::new(max),
            permits: Arc::new(Semaphore::new(max)),
            open: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            said: Seldom::default(),
            per_ip: super::per_ip::PerIp::new(None, Vec::new()),
        })
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Changes the cap to `max` (at least 1; a reload). Open connections are never dropped:
    /// a lower cap takes the places that are free now, and the others as connections close
    /// (a task waits for them, ahead of new connections).
    pub fn resize(&self, max: usize) {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        let old = self.max.swap(max, Ordering::Relaxed);
        if max > old {
            self.permits.add_permits(max - old);
            return;
        }
        let fewer = old - max;
        let later = fewer - self.permits.forget_permits(fewer);
        if later > 0 {
            let permits = self.permits.clone();
            let n = u32::try_from(later).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
    }

    /// Times an accept loop stopped accepting at the cap.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    /// Returns once a connection may be accepted (false: `stop` came first). Nothing is
    /// reserved: with several listeners, [`ConnectionCap::slot`] may still have to wait.
    pub(super) async fn room(&self, stop: &CancellationToken) -> bool {
        if self.permits.available_permits() > 0 {
            return true;
        }
        self.waits.fetch_add(1, Ordering::Relaxed);
        self.warn();
        tokio::select! {
            biased;
            _ = stop.cancelled() => false,
            // Taken and given back at once: only the wake-up is wanted.
            p = self.permits.acquire() => p.is_ok(),
        }
    }

    /// A slot for a connection just accepted, holding `per_ip` (its place in its address's
    /// count). Normally there at once; when another listener took the last one between
    /// [`ConnectionCap::room`] and the accept, the accepted connection waits (unserved) for
    /// the next one, in turn with the other listeners.
    pub(super) async fn slot(
        self: &Arc<Self>,
        stop: &CancellationToken,
        per_ip: Option<super::per_ip::Hold>,
    ) -> Option<Slot> {
        let permit = tokio::select! {
            biased;
            p = self.permits.clone().acquire_owned() => p.ok()?,
            _ = stop.cancelled() => return None,
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Place {
            _permit: permit,
            cap: self.clone(),
            _per_ip: per_ip,
        }))
    }

    fn warn(&self) {
        if let Some(unsaid) = self.said.say(Instant::now().into_std()) {
            tracing::warn!(
                max_connections = self.max(),
                unsaid,
                "max_connections reached: new connections wait in the kernel's backlog until one closes"
            );
        }
    }
}

/// The `/metrics` collector of `fediedge_connections_open`, `fediedge_connections_max`,
/// `fediedge_connection_cap_waits_total` and `fediedge_connections_refused_per_ip_total`; also
/// the send timeout's `fediedge_h2_streams_stalled_total` (`super::idle`).
#[derive(Debug)]
pub struct ConnectionCollector(pub Arc<ConnectionCap>);

impl Collector for ConnectionCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cap = &self.0;
        for (name, help, value) in [
            (
                "connections_open",
                "Client connections open on the public listeners (not the admin listener)",
                cap.open(),
            ),
            (
                "connections_max",
                "max_connections: the cap on client connections open at once",
                cap.max(),
            ),
        ] {
            let gauge = prometheus_client::metrics::gauge::ConstGauge::new(value as i64);
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            gauge.encode(m)?;
        }
        for (name, help, value) in [
            (
                "connection_cap_waits",
                "Times a public listener stopped accepting because max_connections were open \
                 (new connections waited in the kernel's backlog)",
                cap.waits(),
            ),
            (
                "connections_refused_per_ip",
                "Connections closed at accept because their client address already held \
                 max_connections_per_ip",
                cap.per_ip.refused(),
            ),
            (
                "h2_streams_stalled",
                "HTTP/2 streams reset because their client took nothing of the response for a \
                 whole period while the connection went on (the per-stream send timeout)",
                super::idle::streams_stalled(),
            ),
        ] {
            let counter = prometheus_client::metrics::counter::ConstCounter::new(value);
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            counter.encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_follows_the_descriptor_limit() {
        let n = default_max_connections();
        assert!(n >= 64, "{n}");
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        if limit.rlim_cur != libc::RLIM_INFINITY && limit.rlim_cur > 512 {
            assert_eq!(
                n as u64,
                (limit.rlim_cur - RESERVED_FDS) / FDS_PER_CONNECTION
            );
        }
    }

    #[tokio::test]
    async fn the_count_follows_the_slots_and_a_full_cap_waits() {
        let cap = ConnectionCap::new(1);
        let stop = CancellationToken::new();
        assert!(cap.room(&stop).await);
        let slot = cap.slot(&stop, None).await.unwrap();
        let shared = slot.clone();
        assert_eq!((cap.open(), cap.waits()), (1, 0));
        let waiting = {
            let (cap, stop) = (cap.clone(), stop.clone());
            tokio::spawn(async move { cap.room(&stop).await })
        };
        while cap.waits() == 0 {
            tokio::task::yield_now().await;
        }
        drop(slot);
        assert_eq!(cap.open(), 1, "the socket still holds it");
        drop(shared);
        assert!(waiting.await.unwrap());
        assert_eq!((cap.open(), cap.waits()), (0, 1));
        let held = cap.slot(&stop, None).await.unwrap();
        let stopping = CancellationToken::new();
        stopping.cancel();
        assert!(
            !cap.room(&stopping).await,
            "at the cap, a stop ends the wait"
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_lower_cap_waits_for_connections_to_close_and_a_higher_one_applies_at_once() {
        let cap = ConnectionCap::new(2);
        let stop = CancellationToken::new();
        let (a, b) = (
            cap.slot(&stop, None).await.unwrap(),
            cap.slot(&stop, None).await.unwrap(),
        );
        cap.resize(1);
        assert_eq!((cap.max(), cap.open()), (1, 2));
        drop(a);
        // The freed place goes to the lower cap (its task), not to a new connection.
        for _ in 0..100 {
            if cap.permits.available_permits() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!((cap.open(), cap.permits.available_permits()), (1, 0));
        drop(b);
        assert_eq!((cap.open(), cap.permits.available_permits()), (0, 1));
        cap.resize(3);
        assert_eq!(cap.permits.available_permits(), 3);
        cap.resize(2);
        assert_eq!((cap.max(), cap.permits.available_permits()), (2, 2));
    }
}
