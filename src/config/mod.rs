//! The TOML config file: raw shape (serde) → validated [`Config`].
//!
//! The file shape is a contract that outside tools rely on (issue 2): `listen`, `admin_listen`,
//! `url_prefix`, `data_dir`, `[cache]`, `[primary]`, `[[fallback]]`. Unknown keys are refused
//! by serde (`deny_unknown_fields`), bad values by [`RawConfig::validate`]; every message names
//! the key. `serve`, `migrate` and `doctor` all load configs through [`load`], so the doctor
//! sees exactly what `serve` would refuse.
//!
//! - [`raw`]: the file as written (serde shapes and their defaults).
//! - `validate`: raw → [`Config`], every key checked and named in errors.
//! - `secrets`: secrets from the file, a `_file`, or the environment.
//! - `sidekiq`: `[sidekiq]`, the Sidekiq monitor of `serve`.
//! - `status`: `[alerts]` thresholds and the `[canary]`.
//! - `tls`: `[tls]`, raw and validated.
//! - `core`: `media_hosts` and `[core]`, the front door's routes and upstreams.
//! - `cache_buster`: `[cache_buster]`, Mastodon's purge requests.
//! - `settings`: the reload diff: the values that changed between two configs, secrets
//!   masked.

mod cache_buster;
mod core;
mod destination;
mod raw;
mod secrets;
mod settings;
mod sidekiq;
mod status;
mod tls;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cache_buster::{CacheBusterConfig, RawCacheBuster};
pub use core::{normalize_host, CoreCacheConfig, CoreConfig, RawCore};
pub use raw::{RawBackfill, RawCache, RawConfig, RawStore};
pub use settings::{diff, Change, Settings};
pub use sidekiq::{RawSidekiq, SidekiqConfig, SidekiqSource};
pub use status::{AlertsConfig, CanaryConfig, CanaryKeys, RawAlerts, RawCanary};
pub use tls::{CertificateFiles, RawCertificate, RawTls, TlsConfig};

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
    /// Time allowed at shutdown for work under way.
    pub drain_timeout: Duration,
    /// Concurrent copies to the primary.
    pub writeback_concurrency: usize,
    /// Request-serving threads (None: one per core).
    pub worker_threads: Option<usize>,
    /// Most client connections open at once on the public listeners (None: from
    /// `RLIMIT_NOFILE`, see `listen::cap::default_max_connections`).
    pub max_connections: Option<usize>,
    /// Most connections open at once per client address (None: no limit).
    pub max_connections_per_ip: Option<usize>,
    /// Client ranges `max_connections_per_ip` does not limit (besides `[core] trusted_proxies`).
    pub max_connections_per_ip_exempt: Vec<ipnet::IpNet>,
    /// Most fetches (flights) under way at once.
    pub max_flights: usize,
    /// Most bytes of temp files held by fetches under way.
    pub max_flight_temp_bytes: u64,
    /// Most bytes of bodies held in memory by fetches whose disk failed.
    pub max_flight_memory: u64,
    /// How long a fetch waits for a flight slot or temp-disk room before its 503.
    pub flight_queue_wait: Duration,
    /// The local cache, if any.
    pub cache: Option<CacheConfig>,
    /// The primary store.
    pub primary: StoreConfig,
    /// Fallback stores, in the order they are tried.
    pub fallbacks: Vec<StoreConfig>,
    /// The background backfill, if any.
    pub backfill: Option<BackfillConfig>,
    /// The Sidekiq monitor's series on `/metrics`, if any.
    pub sidekiq: Option<SidekiqConfig>,
    /// HTTPS and the redirect from http, if any.
    pub tls: Option<TlsConfig>,
    /// Host names whose every path is a media key (lower case).
    pub media_hosts: Vec<String>,
    /// The instance behind this edge, if any.
    pub core: Option<CoreConfig>,
    /// Mastodon's cache buster, if enabled.
    pub cache_buster: Option<CacheBusterConfig>,
    /// Alert thresholds.
    pub alerts: AlertsConfig,
    /// The media canary, if any.
    pub canary: Option<CanaryConfig>,
    /// What the file said, secrets masked: for the reload diff ([`diff`]).
    pub settings: Settings,
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
    /// Which of the three kinds this is.
    pub fn store_type(&self) -> StoreType {
        match self {
            StoreKind::Fs { .. } => StoreType::Fs,
            StoreKind::S3(_) => StoreType::S3,
            StoreKind::Http { .. } => StoreType::Http,
        }
    }
}

/// The kind of a store, without its settings: what code branches on (never a string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreType {
    /// A local directory or NFS mount.
    Fs,
    /// An S3-compatible bucket.
    S3,
    /// A read-only HTTP origin.
    Http,
}

impl StoreType {
    /// `fs`, `s3` or `http`, as written in the config's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreType::Fs => "fs",
            StoreType::S3 => "s3",
            StoreType::Http => "http",
        }
    }
}

impl fmt::Display for StoreType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    let mut config = raw.clone().validate(path)?;
    config.settings = Settings::of(&raw, &config);
    Ok(config)
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

/// The `source` of the embedded default config.
pub const EMBEDDED: &str = "<embedded default>";

/// The embedded default: no config file, `./var/media` served at `127.0.0.1:8080/system/`.
pub fn embedded_default() -> Config {
    from_str("", Path::new(EMBEDDED)).expect("the embedded default is valid")
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
            ("max_connections = 0", "max_connections"),
            ("max_connections = -1", "max_connections"),
            ("max_connections_per_ip = 0", "max_connections_per_ip"),
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
