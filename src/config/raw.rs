//! The config file as written: serde shapes, unknown keys refused, every field's default
//! stated in its doc and given by a `default_*` function.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets::Secret;

/// The config file as written. Every field states its default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address for media requests. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address for `/metrics` and `/healthz`. Default `127.0.0.1:9090` (loopback: admin
    /// endpoints are not public unless the admin says so).
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
    /// Prefix stripped from the request path to form the key. Default `/system/`; `/` for a
    /// bucket-root layout (Mastodon's `S3_ALIAS_HOST`).
    #[serde(default = "default_url_prefix")]
    pub url_prefix: String,
    /// Directory for the ledger, the write-back queue and temporary files. Default `var`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long a key found nowhere is answered 404 without asking the stores again.
    /// Default `10s`; `0s` turns the memory of misses off.
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// On SIGTERM or SIGINT: how long responses, fetches and copies under way may take to
    /// finish before they are cut. Default `30s`.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How many copies to the primary run at once. Default 4.
    #[serde(default = "default_writeback_concurrency")]
    pub writeback_concurrency: usize,
    /// Threads serving requests. Default: one per CPU core. More can help when the edge
    /// shares its cores with other busy processes (each thread is scheduled on its own).
    pub worker_threads: Option<usize>,
    /// Most client connections open at once on the public listeners (`listen`, `[tls] listen`,
    /// `tls.redirect_listen`; not `admin_listen`). At the cap new connections wait in the
    /// kernel's backlog until one closes. Default: the process's descriptor limit
    /// (`RLIMIT_NOFILE`) less 256, divided by 4, at least 64. A reload applies it.
    pub max_connections: Option<usize>,
    /// Most connections one client address (IPv6: one /64) may hold open at once on the
    /// public listeners; past it a new connection is closed at accept. Addresses in
    /// `max_connections_per_ip_exempt` and `[core] trusted_proxies` are not limited.
    /// Default: no limit. A reload applies it.
    pub max_connections_per_ip: Option<usize>,
    /// Client addresses or ranges `max_connections_per_ip` does not limit (a CDN or load
    /// balancer in front of a media-only edge), besides `[core] trusted_proxies`. Default
    /// none. A reload applies it.
    #[serde(default)]
    pub max_connections_per_ip_exempt: Vec<String>,
    /// Most source reads of missing keys under way at once: fetches (one per key, however
    /// many clients ask), bodies streamed through a full disk (one per client), followers'
    /// refetches. Past it a new key's fetch (or a stream) waits up to `flight_queue_wait`
    /// for a slot, then is answered 503 with `Retry-After`; a refetch is cut. Default 256.
    #[serde(default = "default_max_flights")]
    pub max_flights: usize,
    /// Most bytes of temp files that fetches under way may hold (each reserves its body's
    /// length). Past it a fetch waits up to `flight_queue_wait`, then is answered 503.
    /// Default `1GiB`.
    #[serde(default = "default_max_flight_temp_bytes")]
    pub max_flight_temp_bytes: bytesize::ByteSize,
    /// Most bytes of bodies held in memory by fetches whose disk is full, read-only or
    /// failing (they are then served from memory, uncached). A body that does not fit is
    /// streamed to each of its clients on its own. Default `256MiB`.
    #[serde(default = "default_max_flight_memory")]
    pub max_flight_memory: bytesize::ByteSize,
    /// How long a fetch past `max_flights` or `max_flight_temp_bytes` waits for room before
    /// it is answered 503. Default `2s`.
    #[serde(default = "default_flight_queue_wait", with = "humantime_serde")]
    pub flight_queue_wait: Duration,
    /// Optional local disk cache.
    pub cache: Option<RawCache>,
    /// Where media lives from now on. Default: `fs` at `var/media`.
    #[serde(default = "default_primary")]
    pub primary: RawStore,
    /// Older stores, tried in order after the primary; hits are copied to the primary.
    #[serde(default)]
    pub fallback: Vec<RawStore>,
    /// Optional: copy a fallback's cold tail into the primary in the background of `serve`.
    pub backfill: Option<RawBackfill>,
    /// Optional: watch Mastodon's Sidekiq and add `fediedge_sidekiq_*` series to `/metrics`.
    pub sidekiq: Option<super::sidekiq::RawSidekiq>,
    /// Optional: HTTPS (HTTP/2 and HTTP/1.1) with certificates by SNI, and a redirect from http.
    pub tls: Option<super::tls::RawTls>,
    /// Host names whose every path is a media key (bucket-root layout). Default: none.
    #[serde(default)]
    pub media_hosts: Vec<String>,
    /// Optional: the instance behind this edge (reverse proxy to its web and streaming).
    pub core: Option<super::core::RawCore>,
    /// Optional: Mastodon's cache buster (`CACHE_BUSTER_*`) evicts URLs from this edge.
    pub cache_buster: Option<super::cache_buster::RawCacheBuster>,
    /// Alert thresholds (`/healthz`, the status page). Default: every threshold's default.
    #[serde(default)]
    pub alerts: super::status::RawAlerts,
    /// Optional: media fetched through the edge itself every `interval`.
    pub canary: Option<super::status::RawCanary>,
}

/// `[backfill]`: `fediedge migrate` run inside `serve`, at a low budget, pausing whenever
/// live misses or write-backs are under way.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackfill {
    /// Name of the `[[fallback]]` to copy from.
    pub from: String,
    /// Key file (one key per line); required for an http store, which cannot be listed.
    pub keys: Option<PathBuf>,
    /// Objects copied at once. Default 2.
    #[serde(default = "default_backfill_concurrency")]
    pub concurrency: u32,
    /// Most source requests per second. Default 10.
    #[serde(default = "default_backfill_ops")]
    pub max_ops_per_sec: u32,
    /// Most source bytes per second. Default `10MiB`.
    #[serde(default = "default_backfill_bytes")]
    pub max_bytes_per_sec: bytesize::ByteSize,
}

fn default_backfill_concurrency() -> u32 {
    2
}
fn default_backfill_ops() -> u32 {
    10
}
fn default_backfill_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(10)
}

/// `[cache]`: the local disk cache.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Cache directory. Default `<data_dir>/cache`.
    pub dir: Option<PathBuf>,
    /// Most bytes kept on disk; least recently used objects are evicted past it. Default `10GiB`.
    #[serde(default = "default_cache_max_size")]
    pub max_size: bytesize::ByteSize,
    /// Most bytes of hot objects also kept in memory, shared by every response. Default
    /// `64MiB`; `0` turns the memory tier off.
    #[serde(default = "default_memory_max_size")]
    pub memory_max_size: bytesize::ByteSize,
    /// Largest object kept in memory. Default `1MiB`.
    #[serde(default = "default_memory_max_object")]
    pub memory_max_object: bytesize::ByteSize,
}

/// `[primary]` or one `[[fallback]]`: one store. One flat table for every kind, so that an
/// unknown key is refused by serde and a key that does not belong to the kind is refused by
/// [`RawStore::validate`] with its name.
#[derive(Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Name used in logs, metrics, the ledger and `migrate --from`. Default: `primary`, or
    /// `fallback-<n>` (n from 1).
    pub name: Option<String>,
    /// `fs`, `s3` or `http`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// `fs`: directory (or NFS mount) holding the keys.
    pub root: Option<PathBuf>,
    /// `http`: base URL the key is appended to, e.g. `http://old-host/system/`.
    pub url: Option<String>,
    /// `s3`: API endpoint, e.g. `http://127.0.0.1:3900`.
    pub endpoint: Option<String>,
    /// `s3`: bucket name.
    pub bucket: Option<String>,
    /// `s3`: region. Default `us-east-1` (Garage's default is `garage`).
    pub region: Option<String>,
    /// `s3`: key prefix inside the bucket (Mastodon's `S3_KEY_PREFIX`). Default none.
    pub prefix: Option<String>,
    /// `s3`: access key id; else `access_key_id_file`, else `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<Secret>,
    /// `s3`: secret key; else `secret_access_key_file`, else `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<Secret>,
    /// `s3`: file holding the access key id (refused if group/other may read it).
    pub access_key_id_file: Option<PathBuf>,
    /// `s3`: file holding the secret key (refused if group/other may read it).
    pub secret_access_key_file: Option<PathBuf>,
    /// `s3`: use virtual-host style requests (`bucket.endpoint`). Default false (path style,
    /// which Garage and MinIO want).
    pub virtual_host_style: Option<bool>,
    /// Most requests in flight to this store. Default 16.
    pub max_concurrency: Option<usize>,
    /// Time allowed to open a connection. Default `3s`.
    #[serde(default, with = "humantime_serde::option")]
    pub connect_timeout: Option<Duration>,
    /// Time allowed until the first byte of an answer; also the longest silence allowed between
    /// two pieces of a body (a stalled source). Default `10s`.
    #[serde(default, with = "humantime_serde::option")]
    pub first_byte_timeout: Option<Duration>,
}

impl fmt::Debug for RawStore {
    // Written by hand so that secrets never reach a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawStore")
            .field("name", &self.name)
            .field("type", &self.kind)
            .field("root", &self.root)
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field(
                "access_key_id",
                &self.access_key_id.as_ref().map(|_| "<set>"),
            )
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_url_prefix() -> String {
    "/system/".into()
}
fn default_data_dir() -> PathBuf {
    "var".into()
}
fn default_negative_ttl() -> Duration {
    Duration::from_secs(10)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_writeback_concurrency() -> usize {
    4
}
fn default_max_flights() -> usize {
    256
}
fn default_max_flight_temp_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(1)
}
fn default_max_flight_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(256)
}
fn default_flight_queue_wait() -> Duration {
    Duration::from_secs(2)
}
fn default_cache_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(10)
}
fn default_memory_max_size() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(64)
}
fn default_memory_max_object() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(1)
}
fn default_primary() -> RawStore {
    RawStore {
        kind: Some("fs".into()),
        root: Some("var/media".into()),
        ..RawStore::default()
    }
}
