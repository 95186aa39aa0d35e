//! The TOML config file: raw shape (serde) → validated [`Config`].
//!
//! The file shape is a contract that outside tools rely on (issue 2): `listen`, `admin_listen`,
//! `url_prefix`, `data_dir`, `[cache]`, `[primary]`, `[[fallback]]`. Unknown keys are refused
//! by serde (`deny_unknown_fields`), bad values by [`RawConfig::validate`]; every message names
//! the key. `serve`, `migrate` and `doctor` all load configs through [`load`], so the doctor
//! sees exactly what `serve` would refuse.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a config could not be loaded. The message always names the file and, where it can, the
/// key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse or did not fit the shape (unknown key, wrong type).
    #[error("config {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// toml's message, which names the key and shows the line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("config {path}: `{key}`: {message}")]
    Invalid {
        /// The config file (or `<embedded default>`).
        path: PathBuf,
        /// Dotted path of the offending key, e.g. `fallback[0].url`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The config file as written. Every field states its default.
#[derive(Debug, Clone, Deserialize)]
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
    /// How many copies to the primary run at once. Default 4.
    #[serde(default = "default_writeback_concurrency")]
    pub writeback_concurrency: usize,
    /// Threads serving requests. Default: one per CPU core. More can help when the edge
    /// shares its cores with other busy processes (each thread is scheduled on its own).
    pub worker_threads: Option<usize>,
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
}

/// `[backfill]`: `fediedge migrate` run inside `serve`, at a low budget, pausing whenever
/// live misses or write-backs are under way.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Clone, Deserialize, Default)]
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
    pub access_key_id: Option<String>,
    /// `s3`: secret key; else `secret_access_key_file`, else `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
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
fn default_writeback_concurrency() -> usize {
    4
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

/// A validated config: every value checked, every default filled in, secrets resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from (for messages).
    pub source: PathBuf,
    /// Media listener.
    pub listen: SocketAddr,
    /// Admin listener (`/metrics`, `/healthz`).
    pub admin_listen: SocketAddr,
    /// Path prefix stripped to form keys; starts and ends with `/`.
    pub url_prefix: String,
    /// Ledger, queue and temp files.
    pub data_dir: PathBuf,
    /// How long a 404 is remembered.
    pub negative_ttl: Duration,
    /// Concurrent copies to the primary.
    pub writeback_concurrency: usize,
    /// Request-serving threads (None: one per core).
    pub worker_threads: Option<usize>,
    /// The local cache, if any.
    pub cache: Option<CacheConfig>,
    /// The primary store.
    pub primary: StoreConfig,
    /// Fallback stores, in the order they are tried.
    pub fallbacks: Vec<StoreConfig>,
    /// The background backfill, if any.
    pub backfill: Option<BackfillConfig>,
}

/// Validated `[backfill]`.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// The fallback copied from.
    pub from: String,
    /// Key file, if any.
    pub keys: Option<PathBuf>,
    /// Objects at once.
    pub concurrency: u32,
    /// Source requests per second.
    pub max_ops_per_sec: u32,
    /// Source bytes per second.
    pub max_bytes_per_sec: u64,
}

/// Validated `[cache]`.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Cache directory.
    pub dir: PathBuf,
    /// Disk budget in bytes.
    pub max_size: u64,
    /// Memory budget in bytes.
    pub memory_max_size: u64,
    /// Largest object kept in memory.
    pub memory_max_object: u64,
}

/// Validated store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Name used in logs, metrics, the ledger and `migrate --from`.
    pub name: String,
    /// Kind-specific settings.
    pub kind: StoreKind,
    /// Most requests in flight.
    pub max_concurrency: usize,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// First-byte (and stall) timeout.
    pub first_byte_timeout: Duration,
    /// True for `[primary]`: only the primary's fs root is created when missing.
    pub is_primary: bool,
}

/// The kind of a store and its kind-specific settings.
#[derive(Clone)]
pub enum StoreKind {
    /// A local directory or NFS mount.
    Fs {
        /// The root directory.
        root: PathBuf,
    },
    /// An S3-compatible bucket.
    S3(S3Config),
    /// A read-only HTTP origin.
    Http {
        /// Base URL, ending in `/`.
        url: String,
    },
}

impl StoreKind {
    /// `fs`, `s3` or `http`.
    pub fn type_name(&self) -> &'static str {
        match self {
            StoreKind::Fs { .. } => "fs",
            StoreKind::S3(_) => "s3",
            StoreKind::Http { .. } => "http",
        }
    }
}

impl fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKind::Fs { root } => write!(f, "fs({})", root.display()),
            StoreKind::S3(s3) => write!(f, "s3({}/{})", s3.endpoint, s3.bucket),
            StoreKind::Http { url } => write!(f, "http({url})"),
        }
    }
}

/// Validated S3 settings. `Debug` is not derived: the secret must not be printed.
#[derive(Clone)]
pub struct S3Config {
    /// API endpoint.
    pub endpoint: String,
    /// Bucket.
    pub bucket: String,
    /// Region.
    pub region: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (empty for none).
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Virtual-host style addressing.
    pub virtual_host_style: bool,
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    from_str(&text, path)
}

/// Parses and validates config text; `path` is only used in messages.
pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: parse_message(text, &e),
    })?;
    raw.validate(path)
}

/// toml's message with its line and column, but without the line itself: toml's own Display
/// quotes the offending line, which may hold a secret (`secret_acess_key = "…"`).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return message.to_owned();
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.len() - line_start + 1;
    // Name the key: the text before `=` on that line, under the last `[table]` above it.
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty());
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    match (table, key) {
        (Some(t), Some(k)) => format!("line {line_no}, column {column}: `{t}.{k}`: {message}"),
        (None, Some(k)) => format!("line {line_no}, column {column}: `{k}`: {message}"),
        _ => format!("line {line_no}, column {column}: {message}"),
    }
}

/// The embedded default: no config file, `./var/media` served at `127.0.0.1:8080/system/`.
pub fn embedded_default() -> Config {
    from_str("", Path::new("<embedded default>")).expect("the embedded default is valid")
}

impl RawConfig {
    /// Checks every value and fills in defaults.
    pub fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message,
        };
        let listen = parse_addr(&self.listen).map_err(|m| invalid("listen", m))?;
        let admin_listen =
            parse_addr(&self.admin_listen).map_err(|m| invalid("admin_listen", m))?;
        if listen == admin_listen && listen.port() != 0 {
            return Err(invalid(
                "admin_listen",
                format!("must differ from `listen` ({listen})"),
            ));
        }
        let url_prefix = self.url_prefix;
        if !url_prefix.starts_with('/') || !url_prefix.ends_with('/') {
            return Err(invalid(
                "url_prefix",
                format!(
                    "must start and end with `/` (got {url_prefix:?}); e.g. \"/system/\" or \"/\""
                ),
            ));
        }
        if self.writeback_concurrency == 0 {
            return Err(invalid(
                "writeback_concurrency",
                "must be at least 1".into(),
            ));
        }
        if self.worker_threads == Some(0) {
            return Err(invalid("worker_threads", "must be at least 1".into()));
        }
        let cache = match self.cache {
            None => None,
            Some(c) => {
                if c.max_size.as_u64() == 0 {
                    return Err(invalid("cache.max_size", "must be more than 0".into()));
                }
                if c.memory_max_object > c.memory_max_size && c.memory_max_size.as_u64() > 0 {
                    return Err(invalid(
                        "cache.memory_max_object",
                        "must not exceed cache.memory_max_size".into(),
                    ));
                }
                Some(CacheConfig {
                    dir: c.dir.unwrap_or_else(|| self.data_dir.join("cache")),
                    max_size: c.max_size.as_u64(),
                    memory_max_size: c.memory_max_size.as_u64(),
                    memory_max_object: c.memory_max_object.as_u64(),
                })
            }
        };
        let primary = self.primary.validate("primary", "primary", path)?;
        if matches!(primary.kind, StoreKind::Http { .. }) {
            return Err(invalid(
                "primary.type",
                "an http store is read-only and cannot be the primary; use fs or s3".into(),
            ));
        }
        let mut fallbacks = Vec::with_capacity(self.fallback.len());
        for (i, raw) in self.fallback.into_iter().enumerate() {
            let table = format!("fallback[{i}]");
            let store = raw.validate(&table, &format!("fallback-{}", i + 1), path)?;
            let clash = std::iter::once(&primary)
                .chain(fallbacks.iter())
                .any(|s: &StoreConfig| s.name == store.name);
            if clash {
                return Err(invalid(
                    &format!("{table}.name"),
                    format!("store name {:?} is used twice", store.name),
                ));
            }
            fallbacks.push(store);
        }
        let backfill = match self.backfill {
            None => None,
            Some(b) => {
                let Some(from) = fallbacks.iter().find(|f| f.name == b.from) else {
                    let names: Vec<&str> = fallbacks.iter().map(|f| f.name.as_str()).collect();
                    return Err(invalid(
                        "backfill.from",
                        format!("no [[fallback]] named {:?}; fallbacks: {names:?}", b.from),
                    ));
                };
                if from.kind.type_name() == "http" && b.keys.is_none() {
                    return Err(invalid(
                        "backfill.keys",
                        format!(
                            "{:?} is an http store, which cannot be listed: give a key file",
                            b.from
                        ),
                    ));
                }
                for (key, zero) in [
                    ("backfill.concurrency", b.concurrency == 0),
                    ("backfill.max_ops_per_sec", b.max_ops_per_sec == 0),
                    (
                        "backfill.max_bytes_per_sec",
                        b.max_bytes_per_sec.as_u64() == 0,
                    ),
                ] {
                    if zero {
                        return Err(invalid(key, "must be more than 0".into()));
                    }
                }
                Some(BackfillConfig {
                    from: b.from,
                    keys: b.keys,
                    concurrency: b.concurrency,
                    max_ops_per_sec: b.max_ops_per_sec,
                    max_bytes_per_sec: b.max_bytes_per_sec.as_u64(),
                })
            }
        };
        Ok(Config {
            source: path.to_owned(),
            listen,
            admin_listen,
            url_prefix,
            data_dir: self.data_dir,
            negative_ttl: self.negative_ttl,
            writeback_concurrency: self.writeback_concurrency,
            worker_threads: self.worker_threads,
            cache,
            primary,
            fallbacks,
            backfill,
        })
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like \"127.0.0.1:8080\""))
}

impl RawStore {
    /// Checks one store table; `table` is its dotted name for messages.
    pub fn validate(
        self,
        table: &str,
        default_name: &str,
        path: &Path,
    ) -> Result<StoreConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("{table}.{key}"),
            message,
        };
        let kind_name = self
            .kind
            .clone()
            .ok_or_else(|| invalid("type", "missing; one of \"fs\", \"s3\", \"http\"".into()))?;
        // Keys that only some kinds use: naming the stray key beats silently ignoring it.
        let given: [(&str, bool); 11] = [
            ("root", self.root.is_some()),
            ("url", self.url.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("bucket", self.bucket.is_some()),
            ("region", self.region.is_some()),
            ("prefix", self.prefix.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("access_key_id_file", self.access_key_id_file.is_some()),
            (
                "secret_access_key_file",
                self.secret_access_key_file.is_some(),
            ),
            ("virtual_host_style", self.virtual_host_style.is_some()),
        ];
        let allowed: &[&str] = match kind_name.as_str() {
            "fs" => &["root"],
            "http" => &["url"],
            "s3" => &[
                "endpoint",
                "bucket",
                "region",
                "prefix",
                "access_key_id",
                "secret_access_key",
                "access_key_id_file",
                "secret_access_key_file",
                "virtual_host_style",
            ],
            other => {
                return Err(invalid(
                    "type",
                    format!("unknown store type {other:?}; one of \"fs\", \"s3\", \"http\""),
                ))
            }
        };
        if let Some((key, _)) = given
            .iter()
            .find(|(key, set)| *set && !allowed.contains(key))
        {
            return Err(invalid(
                key,
                format!("is not used by a store of type {kind_name:?}"),
            ));
        }
        let name = self.name.clone().unwrap_or_else(|| default_name.to_owned());
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(invalid(
                "name",
                format!("{name:?} must be non-empty letters, digits, '-', '_' or '.'"),
            ));
        }
        let kind = match kind_name.as_str() {
            "fs" => StoreKind::Fs {
                root: self
                    .root
                    .clone()
                    .ok_or_else(|| invalid("root", "missing: the directory to serve".into()))?,
            },
            "http" => {
                let url = self.url.clone().ok_or_else(|| {
                    invalid(
                        "url",
                        "missing: the base URL, e.g. \"http://old-host/system/\"".into(),
                    )
                })?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(invalid(
                        "url",
                        format!("{url:?} must start with http:// or https://"),
                    ));
                }
                let url = if url.ends_with('/') {
                    url
                } else {
                    format!("{url}/")
                };
                StoreKind::Http { url }
            }
            _ => StoreKind::S3(self.s3(&invalid)?),
        };
        let max_concurrency = self.max_concurrency.unwrap_or(16);
        if max_concurrency == 0 {
            return Err(invalid("max_concurrency", "must be at least 1".into()));
        }
        let connect_timeout = self.connect_timeout.unwrap_or(Duration::from_secs(3));
        let first_byte_timeout = self.first_byte_timeout.unwrap_or(Duration::from_secs(10));
        for (key, d) in [
            ("connect_timeout", connect_timeout),
            ("first_byte_timeout", first_byte_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be more than 0s".into()));
            }
        }
        Ok(StoreConfig {
            name,
            kind,
            max_concurrency,
            connect_timeout,
            first_byte_timeout,
            is_primary: table == "primary",
        })
    }

    fn s3(&self, invalid: &dyn Fn(&str, String) -> ConfigError) -> Result<S3Config, ConfigError> {
        let endpoint = self.endpoint.clone().ok_or_else(|| {
            invalid(
                "endpoint",
                "missing: the S3 API URL, e.g. \"http://127.0.0.1:3900\"".into(),
            )
        })?;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(
                "endpoint",
                format!("{endpoint:?} must start with http:// or https://"),
            ));
        }
        let bucket = self
            .bucket
            .clone()
            .ok_or_else(|| invalid("bucket", "missing".into()))?;
        if bucket.is_empty() || bucket.contains('/') {
            return Err(invalid(
                "bucket",
                format!("{bucket:?} is not a bucket name"),
            ));
        }
        let access_key_id = secret(
            self.access_key_id.as_deref(),
            self.access_key_id_file.as_deref(),
            "AWS_ACCESS_KEY_ID",
        )
        .map_err(|m| invalid("access_key_id", m))?;
        let secret_access_key = secret(
            self.secret_access_key.as_deref(),
            self.secret_access_key_file.as_deref(),
            "AWS_SECRET_ACCESS_KEY",
        )
        .map_err(|m| invalid("secret_access_key", m))?;
        Ok(S3Config {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            bucket,
            region: self.region.clone().unwrap_or_else(|| "us-east-1".into()),
            prefix: self
                .prefix
                .clone()
                .unwrap_or_default()
                .trim_matches('/')
                .to_owned(),
            access_key_id,
            secret_access_key,
            virtual_host_style: self.virtual_host_style.unwrap_or(false),
        })
    }
}

/// Resolves a secret from the config value, a file, or an environment variable, in that order.
/// A file that group or other may read is refused (as Garage does in `secrets.rs`).
fn secret(value: Option<&str>, file: Option<&Path>, env: &str) -> Result<String, String> {
    if let Some(v) = value {
        return Ok(v.to_owned());
    }
    if let Some(file) = file {
        use std::os::unix::fs::PermissionsExt;
        let meta =
            std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{} may be read by group or others; run `chmod 600 {}`",
                file.display(),
                file.display()
            ));
        }
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        return Ok(text.trim().to_owned());
    }
    std::env::var(env).map_err(|_| format!("missing: set it, its `_file` variant, or {env}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_str(text, Path::new("test.toml"))
    }

    #[test]
    fn embedded_default_serves_var_media() {
        let c = embedded_default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.url_prefix, "/system/");
        assert!(c.cache.is_none());
        assert!(
            matches!(&c.primary.kind, StoreKind::Fs { root } if root == Path::new("var/media"))
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("listen = \"127.0.0.1:1\"\nlistne = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
        let err = parse("[primary]\ntype = \"fs\"\nroot = \"x\"\nbukket = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bukket"), "{err}");
    }

    #[test]
    fn parse_errors_do_not_quote_secrets() {
        let err = parse("[primary]\ntype = \"s3\"\nsecret_acess_key = \"wJalrXUtnFEMI\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("secret_acess_key") && err.contains("line 3"),
            "{err}"
        );
        assert!(!err.contains("wJalrXUtnFEMI"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("listen = \"nope\"", "listen"),
            ("url_prefix = \"system\"", "url_prefix"),
            ("worker_threads = 0", "worker_threads"),
            ("[cache]\nmax_size = \"10 XB\"", "max_size"),
            (
                "[[fallback]]\ntype = \"http\"\nurl = \"ftp://x\"",
                "fallback[0].url",
            ),
            (
                "[[fallback]]\ntype = \"fs\"\nurl = \"http://x/\"",
                "fallback[0].url",
            ),
            ("[[fallback]]\ntype = \"nfs\"", "fallback[0].type"),
            (
                "[primary]\ntype = \"http\"\nurl = \"http://x/\"",
                "primary.type",
            ),
            (
                "[[fallback]]\ntype = \"http\"\nurl = \"http://x/\"\nfirst_byte_timeout = \"soon\"",
                "first_byte_timeout",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?} gave {err}");
        }
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
            listen = "127.0.0.1:8080"
            admin_listen = "127.0.0.1:9090"
            url_prefix = "/system/"
            data_dir = "var"
            [cache]
            dir = "var/cache"
            max_size = "10GiB"
            [primary]
            type = "s3"
            endpoint = "http://127.0.0.1:3900"
            bucket = "media"
            region = "garage"
            access_key_id = "GK123"
            secret_access_key = "s3cr3t"
            [[fallback]]
            name = "old-origin"
            type = "http"
            url = "http://old-host/system"
            max_concurrency = 16
            first_byte_timeout = "10s"
            "#,
        )
        .unwrap();
        assert_eq!(c.cache.as_ref().unwrap().max_size, 10 << 30);
        assert_eq!(c.fallbacks[0].name, "old-origin");
        assert!(
            matches!(&c.fallbacks[0].kind, StoreKind::Http { url } if url == "http://old-host/system/")
        );
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cr3t"),
            "secret leaked into Debug: {debug}"
        );
    }

    #[test]
    fn secret_file_with_loose_permissions_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cr3t\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[primary]\ntype=\"s3\"\nendpoint=\"http://h\"\nbucket=\"b\"\naccess_key_id=\"a\"\nsecret_access_key_file={:?}\n",
            f
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = parse(&text).unwrap();
        let StoreKind::S3(s3) = &c.primary.kind else {
            panic!()
        };
        assert_eq!(s3.secret_access_key, "s3cr3t");
    }
}
