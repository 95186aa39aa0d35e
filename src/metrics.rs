//! Counters, gauges and histograms, rendered as Prometheus text at `/metrics` on the admin
//! listener. Every name starts with `fediedge_`. Counters only go up (Prometheus computes rates).
//!
//! One cheap-to-clone [`Metrics`] handle is passed to every room that counts something; the
//! rooms never read metrics back, so nothing here may call any other room.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// What a response's `X-Cache-Status` says about where its answer came from. It lives here,
/// not in `edge`, because it is also a metric label and this room may call no other.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the local cache (or a remembered 404).
    Hit,
    /// Fetched from the primary.
    Miss,
    /// Fetched from an older store; being copied into the primary.
    Fallback,
    /// Served straight from a local primary without a cache, or refused (400, 405).
    Bypass,
    /// Every store failed or timed out (502, 504).
    Error,
    /// The edge is at its limits (flights, temp-disk bytes): 503 with `Retry-After`.
    Busy,
    /// A `POST` with `Idempotency-Key` answered with the response core gave to the same
    /// request (same key, path and credentials) in flight or within the hour before.
    Replay,
    /// Core cache: a stored response served past its freshness (stale-while-revalidate,
    /// or stale-if-error while core fails).
    Stale,
    /// Core cache: a stored response served after core confirmed it (304).
    Revalidated,
}

impl CacheStatus {
    /// The header it is sent in, parsed once (a `&str` name is parsed on every insert).
    pub const HEADER: http::HeaderName = http::HeaderName::from_static("x-cache-status");

    /// The header value: `HIT`, `MISS`, `FALLBACK`, `BYPASS`, `ERROR`, `BUSY`, `REPLAY`,
    /// `STALE` or `REVALIDATED`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Fallback => "FALLBACK",
            CacheStatus::Bypass => "BYPASS",
            CacheStatus::Error => "ERROR",
            CacheStatus::Busy => "BUSY",
            CacheStatus::Replay => "REPLAY",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
        }
    }
}

impl EncodeLabelValue for CacheStatus {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.as_str(), encoder)
    }
}

/// Labels of `fediedge_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP status code.
    pub status: u16,
    /// The `X-Cache-Status` value (HIT, MISS, …).
    pub cache_status: CacheStatus,
}

/// Labels of the per-directory disk series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    /// `cache` or `data_dir`.
    pub dir: &'static str,
}

/// Labels of per-store series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// Store name from the config.
    pub store: Arc<str>,
    /// `hit`, `miss` or `error`.
    pub outcome: &'static str,
}

/// Labels of the per-store latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreOnly {
    /// Store name from the config.
    pub store: Arc<str>,
}

/// Labels of `fediedge_writebacks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `done` or `failed` (a failed attempt is retried later).
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// `requests`' counter for 200 HIT (nearly every media request), kept at the first one
    /// (as `core_cache_hit`).
    requests_ok_hit: OnceLock<Counter>,
    response_bytes: Counter,
    store_fetches: Family<StoreLabels, Counter>,
    store_latency: Family<StoreOnly, Histogram, fn() -> Histogram>,
    coalesced: Counter,
    flight_refetches: Counter,
    flight_refetches_refused: Counter,
    writebacks: Family<OutcomeLabels, Counter>,
    writeback_pending: Gauge,
    cache_bytes: Gauge,
    cache_objects: Gauge,
    memory_bytes: Gauge,
    migration_objects_total: Gauge,
    migration_objects_done: Gauge,
    migration_bytes_total: Gauge,
    migration_bytes_done: Gauge,
    disk_state: Family<DirLabels, Gauge>,
    disk_state_changes: Family<DirLabels, Counter>,
    cache_verifications: Counter,
    proxy_buffered: Counter,
    proxy_spooled: Counter,
    proxy_requests_buffered: Counter,
    cache_index_loading: Gauge,
    overloaded: Counter,
    flight_waits: Counter,
    flights_waiting: Gauge,
    backfill_held: Counter,
    purges: Family<OutcomeLabels, Counter>,
    purge_forwards: Family<OutcomeLabels, Counter>,
    purge_forwards_pending: Gauge,
    core_cache: Family<CoreCacheLabels, Counter>,
    /// `core_cache`'s HIT counter, kept at the first hit (the hit path then takes no lock
    /// and hashes no label).
    core_cache_hit: OnceLock<Counter>,
    core_cache_bytes: Gauge,
    core_cache_objects: Gauge,
    core_cache_index_loading: Gauge,
}

/// Labels of `fediedge_core_cache_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CoreCacheLabels {
    /// The `X-Cache-Status` value.
    pub cache_status: CacheStatus,
}

/// Handle to every metric of the process.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        Self::with_collectors(Vec::new())
    }

    /// Creates every metric, plus `collectors` rendered at each scrape under the same
    /// `fediedge_` prefix (series whose label sets come and go, like the Sidekiq monitor's).
    pub fn with_collectors(collectors: Vec<Box<dyn Collector>>) -> Self {
        let mut registry = Registry::with_prefix("fediedge");
        for c in collectors {
            registry.register_collector(c);
        }
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Media requests answered, by status and cache status",
            requests.clone(),
        );
        let response_bytes = Counter::default();
        registry.register(
            "response_body_bytes",
            "Body bytes sent to clients",
            response_bytes.clone(),
        );
        let store_fetches = Family::<StoreLabels, Counter>::default();
        registry.register(
            "store_fetches",
            "Reads from a store, by outcome (hit, miss, error)",
            store_fetches.clone(),
        );
        let store_latency: Family<StoreOnly, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "store_first_byte_seconds",
            "Time from asking a store to having its answer's headers",
            store_latency.clone(),
        );
        let coalesced = Counter::default();
        registry.register(
            "coalesced_requests",
            "Requests that joined a fetch already under way instead of starting one",
            coalesced.clone(),
        );
        let flight_refetches = Counter::default();
        registry.register(
            "flight_refetches",
            "Requests that read their body again from its source on their own: the part they needed was on a cache disk that failed, or kept neither there nor in memory",
            flight_refetches.clone(),
        );
        let flight_refetches_refused = Counter::default();
        registry.register(
            "flight_refetches_refused",
            "Refetches that found max_flights full for flight_queue_wait: their responses were cut",
            flight_refetches_refused.clone(),
        );
        let writebacks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "writebacks",
            "Copies into the primary, by outcome (done, failed attempt)",
            writebacks.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let writeback_pending = gauge(
            &mut registry,
            "writeback_pending",
            "Copies into the primary waiting in the durable queue",
        );
        let cache_bytes = gauge(&mut registry, "cache_bytes", "Bytes in the disk cache");
        let cache_objects = gauge(&mut registry, "cache_objects", "Objects in the disk cache");
        let memory_bytes = gauge(
            &mut registry,
            "cache_memory_bytes",
            "Bytes of hot objects held in memory",
        );
        let migration_objects_total = gauge(
            &mut registry,
            "migration_objects_total",
            "Objects listed by `fediedge migrate`, from the ledger",
        );
        let migration_objects_done = gauge(
            &mut registry,
            "migration_objects_done",
            "Objects copied or found present by `fediedge migrate`, from the ledger",
        );
        let migration_bytes_total = gauge(
            &mut registry,
            "migration_bytes_total",
            "Bytes listed by `fediedge migrate`, from the ledger",
        );
        let migration_bytes_done = gauge(
            &mut registry,
            "migration_bytes_done",
            "Bytes copied or found present by `fediedge migrate`, from the ledger",
        );
        let disk_state = Family::<DirLabels, Gauge>::default();
        registry.register(
            "disk_state",
            "Health of a local directory as its last write showed it: 0 ok, 1 full, 2 read-only, 3 failing",
            disk_state.clone(),
        );
        let disk_state_changes = Family::<DirLabels, Counter>::default();
        registry.register(
            "disk_state_changes",
            "Changes of fediedge_disk_state (each is also logged once)",
            disk_state_changes.clone(),
        );
        let cache_verifications = Counter::default();
        registry.register(
            "cache_verifications",
            "MD5 checks of cached bodies on their first use after a start",
            cache_verifications.clone(),
        );
        let proxy_buffered = Counter::default();
        registry.register(
            "proxy_responses_buffered",
            "Answers from core read ahead of their client (`[core] buffer_responses`)",
            proxy_buffered.clone(),
        );
        let proxy_spooled = Counter::default();
        registry.register(
            "proxy_responses_spooled",
            "Buffered answers from core that went on to a temp file in data_dir/tmp-proxy",
            proxy_spooled.clone(),
        );
        let proxy_requests_buffered = Counter::default();
        registry.register(
            "proxy_requests_buffered",
            "Request bodies past 16 KiB read whole before they went to core (`[core] buffer_requests`)",
            proxy_requests_buffered.clone(),
        );
        let cache_index_loading = gauge(
            &mut registry,
            "cache_index_loading",
            "1 while the cache index is still being loaded from disk after a start",
        );
        let overloaded = Counter::default();
        registry.register(
            "overloaded_requests",
            "Requests answered 503 because the flight or temp-disk limits stayed full",
            overloaded.clone(),
        );
        let flight_waits = Counter::default();
        registry.register(
            "flight_waits",
            "Fetches that found max_flights or max_flight_temp_bytes full and queued for room",
            flight_waits.clone(),
        );
        let flights_waiting = gauge(
            &mut registry,
            "flights_waiting",
            "Fetches queued now for a flight slot or temp-disk room",
        );
        let backfill_held = Counter::default();
        registry.register(
            "backfill_held",
            "Checks of the live-work gate (every 200 ms) that found the background backfill holding an object back for live misses or copies",
            backfill_held.clone(),
        );
        let purges = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cache_buster_requests",
            "Mastodon cache-buster requests, by outcome (purged, refused)",
            purges.clone(),
        );
        let purge_forwards = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "purge_forwards",
            "Purges passed on to peer edges, by outcome (delivered, failed: retried later, dropped: refused by the peer or given up)",
            purge_forwards.clone(),
        );
        let purge_forwards_pending = Gauge::default();
        registry.register(
            "purge_forwards_pending",
            "Purges waiting to be passed on to peer edges (a peer down holds its own)",
            purge_forwards_pending.clone(),
        );
        let core_cache = Family::<CoreCacheLabels, Counter>::default();
        registry.register(
            "core_cache_requests",
            "Requests to core's web pool seen by the core cache, by cache status (HIT, MISS, STALE, REVALIDATED, BYPASS)",
            core_cache.clone(),
        );
        let core_cache_bytes = gauge(
            &mut registry,
            "core_cache_bytes",
            "Body bytes of core responses in the core cache",
        );
        let core_cache_objects = gauge(
            &mut registry,
            "core_cache_objects",
            "Core responses (variants) in the core cache",
        );
        let core_cache_index_loading = gauge(
            &mut registry,
            "core_cache_index_loading",
            "1 while the core cache's index is still being loaded from disk after a start",
        );
        Metrics(Arc::new(Inner {
            core_cache,
            core_cache_hit: OnceLock::new(),
            core_cache_bytes,
            core_cache_objects,
            core_cache_index_loading,
            registry,
            requests,
            requests_ok_hit: OnceLock::new(),
            response_bytes,
            store_fetches,
            store_latency,
            coalesced,
            flight_refetches,
            flight_refetches_refused,
            writebacks,
            writeback_pending,
            cache_bytes,
            cache_objects,
            memory_bytes,
            migration_objects_total,
            migration_objects_done,
            migration_bytes_total,
            migration_bytes_done,
            disk_state,
            disk_state_changes,
            cache_verifications,
            proxy_buffered,
            proxy_spooled,
            proxy_requests_buffered,
            cache_index_loading,
            overloaded,
            flight_waits,
            flights_waiting,
            backfill_held,
            purges,
            purge_forwards,
            purge_forwards_pending,
        }))
    }

    /// Counts one request seen by the core cache.
    pub fn core_cache(&self, cache_status: CacheStatus) {
        let counter = || {
            self.0
                .core_cache
                .get_or_create(&CoreCacheLabels { cache_status })
                .clone()
        };
        match cache_status {
            CacheStatus::Hit => self.0.core_cache_hit.get_or_init(counter).inc(),
            _ => counter().inc(),
        };
    }

    /// Sets the core cache's size.
    pub fn set_core_cache(&self, bytes: u64, objects: u64) {
        self.0.core_cache_bytes.set(bytes as i64);
        self.0.core_cache_objects.set(objects as i64);
    }

    /// Counts one answered request.
    pub fn request(&self, status: u16, cache_status: CacheStatus) {
        let counter = || {
            self.0
                .requests
                .get_or_create(&RequestLabels {
                    status,
                    cache_status,
                })
                .clone()
        };
        match (status, cache_status) {
            (200, CacheStatus::Hit) => self.0.requests_ok_hit.get_or_init(counter).inc(),
            _ => counter().inc(),
        };
    }

    /// Counts body bytes sent.
    pub fn response_bytes(&self, n: u64) {
        self.0.response_bytes.inc_by(n);
    }

    /// Counts one store read and its time to headers.
    pub fn store_fetch(&self, store: &Arc<str>, outcome: &'static str, took: Duration) {
        self.0
            .store_fetches
            .get_or_create(&StoreLabels {
                store: store.clone(),
                outcome,
            })
            .inc();
        self.0
            .store_latency
            .get_or_create(&StoreOnly {
                store: store.clone(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a request that followed a fetch already under way.
    pub fn coalesced(&self) {
        self.0.coalesced.inc();
    }

    /// Counts a request that read its body again from the source because its flight could
    /// not give it the bytes it needed (a failed cache disk, no memory left).
    pub fn flight_refetch(&self) {
        self.0.flight_refetches.inc();
    }

    /// Counts a refetch refused for want of a flight slot (its response cut).
    pub fn flight_refetch_refused(&self) {
        self.0.flight_refetches_refused.inc();
    }

    /// Counts a write-back attempt.
    pub fn writeback(&self, ok: bool) {
        let outcome = if ok { "done" } else { "failed" };
        self.0
            .writebacks
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Sets the number of queued write-backs.
    pub fn set_writeback_pending(&self, n: u64) {
        self.0.writeback_pending.set(n as i64);
    }

    /// Sets the disk cache figures.
    pub fn set_cache(&self, bytes: u64, objects: u64, memory_bytes: u64) {
        self.0.cache_bytes.set(bytes as i64);
        self.0.cache_objects.set(objects as i64);
        self.0.memory_bytes.set(memory_bytes as i64);
    }

    /// Sets the migration progress figures (read from the ledger).
    pub fn set_migration(
        &self,
        objects_total: u64,
        objects_done: u64,
        bytes_total: u64,
        bytes_done: u64,
    ) {
        self.0.migration_objects_total.set(objects_total as i64);
        self.0.migration_objects_done.set(objects_done as i64);
        self.0.migration_bytes_total.set(bytes_total as i64);
        self.0.migration_bytes_done.set(bytes_done as i64);
    }

    /// Sets the health of local directory `dir` (`cache` or `data_dir`); `changed` counts a
    /// change of state.
    pub fn set_disk_state(&self, dir: &'static str, code: i64, changed: bool) {
        let labels = DirLabels { dir };
        self.0.disk_state.get_or_create(&labels).set(code);
        if changed {
            self.0.disk_state_changes.get_or_create(&labels).inc();
        }
    }

    /// Counts one MD5 check of a cached body.
    pub fn cache_verification(&self) {
        self.0.cache_verifications.inc();
    }

    /// Counts one answer from core read ahead of its client (`proxy::spool`).
    pub fn proxy_buffered(&self) {
        self.0.proxy_buffered.inc();
    }

    /// Counts one request body read whole before it went to core (`proxy::stored`).
    pub fn proxy_request_buffered(&self) {
        self.0.proxy_requests_buffered.inc();
    }

    /// Counts one buffered answer from core that went on to a temp file.
    pub fn proxy_spooled(&self) {
        self.0.proxy_spooled.inc();
    }

    /// Sets whether the core cache's index is still loading.
    pub fn set_core_cache_index_loading(&self, loading: bool) {
        self.0.core_cache_index_loading.set(loading as i64);
    }

    /// Sets whether the cache index is still loading.
    pub fn set_cache_index_loading(&self, loading: bool) {
        self.0.cache_index_loading.set(loading as i64);
    }

    /// Counts a request answered 503 because the edge was at its limits.
    pub fn overloaded(&self) {
        self.0.overloaded.inc();
    }

    /// Counts a fetch queued for a flight slot or temp-disk room; it shows in
    /// `fediedge_flights_waiting` until the guard is dropped.
    pub fn flight_queued(&self) -> FlightQueued {
        self.0.flight_waits.inc();
        self.0.flights_waiting.inc();
        FlightQueued(self.0.flights_waiting.clone())
    }

    /// Counts one check of the live-work gate that held the backfill back.
    pub fn backfill_held(&self) {
        self.0.backfill_held.inc();
    }

    /// Counts one cache-buster request: `purged` or `refused`.
    pub fn cache_buster(&self, outcome: &'static str) {
        self.0
            .purges
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts one attempt to pass a purge on to a peer: `delivered`, `failed` or `dropped`.
    pub fn purge_forward(&self, outcome: &'static str) {
        self.0
            .purge_forwards
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Adds `delta` to the purges waiting for peers.
    pub fn purge_forwards_pending(&self, delta: i64) {
        self.0.purge_forwards_pending.inc_by(delta);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.0.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// A fetch queued for room (see [`Metrics::flight_queued`]): leaves the gauge when dropped.
pub struct FlightQueued(Gauge);

impl Drop for FlightQueued {
    fn drop(&mut self) {
        self.0.dec();
    }
}
