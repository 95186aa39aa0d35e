//! `media_hosts` and `[core]`: the front door. Which Host names are media hosts (every path a
//! media key, bucket-root layout), and the instance behind this edge: its Host names, its web
//! (puma) and streaming upstreams, and the guard rails of the reverse proxy to them.
//!
//! Without both, `serve` behaves as before the front door: every request is a media request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[core]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCore {
    /// Host names routed to core (the media prefix on them stays media). At least one.
    pub hosts: Vec<String>,
    /// Web (puma) upstreams, `host:port`. At least one.
    pub web: Vec<String>,
    /// Streaming upstreams, `host:port`. Default: none (`/api/v1/streaming` answers 502).
    #[serde(default)]
    pub streaming: Vec<String>,
    /// Time allowed to open a connection to an upstream. Default `2s`.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to the response's head. Default `60s`.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed between two pieces of a response body (not for streaming).
    /// Default `60s`.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest time a streaming connection (a WebSocket tunnel: no byte either way; a
    /// server-sent events body: no byte from the upstream) may stay silent before it is
    /// closed. Default `5m`; `0s`: no limit.
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Most requests in flight to one web upstream; beyond it another upstream is tried, and
    /// 503 when all are full. Default 256.
    #[serde(default = "default_max_connections")]
    pub max_connections_per_upstream: usize,
    /// Most connections open to one streaming upstream (each open WebSocket or event stream
    /// holds one for its whole life: every signed-in user's live timeline). Default 16384.
    #[serde(default = "default_max_streams")]
    pub max_streams_per_upstream: usize,
    /// Idle keep-alive connections kept per upstream. Default 256 (the connection cap's default).
    #[serde(default = "default_max_idle")]
    pub max_idle_per_upstream: usize,
    /// Consecutive failures (refused, reset, timed out, 502/503/504) that open an upstream's
    /// circuit breaker. Default 5.
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker answers 503 at once before one probe request is let through.
    /// Default `10s`.
    #[serde(default = "default_breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Largest request body passed on; beyond it 413. Default `99MiB` (Mastodon's nginx).
    #[serde(default = "default_max_body")]
    pub max_request_body: bytesize::ByteSize,
    /// Peers (IP addresses or CIDR ranges) whose `X-Real-IP` and `X-Forwarded-Proto` are
    /// passed on. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Time between two active health checks of each upstream (`/health` on web,
    /// `/api/v1/streaming/health` on streaming). Default `5s`; `0s` turns them off.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub health_check_interval: Duration,
    /// Read core's large answers (over 64 KiB, or of unknown length) ahead of the client,
    /// into memory and then a temp file in `data_dir/tmp-proxy`, so that a slow client does
    /// not hold puma's connection (nginx's `proxy_buffering`). Never for server-sent events
    /// or an answer marked `X-Accel-Buffering: no`. Default `true`.
    #[serde(default = "default_true")]
    pub buffer_responses: bool,
    /// Read a request body whole (past its first 16 KiB: into memory, then a temp file in
    /// `data_dir/tmp-proxy`) before an upstream is chosen, so that a slow upload does not
    /// hold an upstream connection while it comes (nginx's `proxy_request_buffering`).
    /// `false`: bodies stream to core as they come. Default `true`.
    #[serde(default = "default_true")]
    pub buffer_requests: bool,
    /// Most bytes of one buffered answer written to its temp file (nginx's
    /// `proxy_max_temp_file_size`); past it the rest goes at the client's pace. `"0"`: memory
    /// only. Default `"1GiB"`.
    #[serde(default = "default_max_response_temp_file")]
    pub max_response_temp_file: bytesize::ByteSize,
    /// Most bytes of all the temp files of buffered answers and request bodies together
    /// (`data_dir` also holds the ledger and the write-back staging: a flood of uploads must
    /// not fill it); past it answers go at their client's pace and bodies stream. Applies at
    /// restart. Default `"2GiB"`.
    #[serde(default = "default_max_temp_bytes")]
    pub max_temp_bytes: bytesize::ByteSize,
    /// Most bytes of buffered answers and request bodies held in memory together (each
    /// holds at most 64 KiB there, the rest in its temp file); the proxy's own, apart from
    /// `max_flight_memory`, so that slow clients cannot starve the core cache and media
    /// fetches. Applies at restart. Default `"64MiB"`.
    #[serde(default = "default_max_buffer_memory")]
    pub max_buffer_memory: bytesize::ByteSize,
    /// gzip core's JSON, HTML, CSS, JavaScript and XML responses for clients that take it,
    /// as Mastodon's nginx does (`gzip on`). Default `true`.
    #[serde(default = "default_true")]
    pub gzip: bool,
    /// `[core.cache]`: the RFC 9111 shared cache of core's responses. Without it nothing
    /// from core is cached.
    #[serde(default)]
    pub cache: Option<RawCoreCache>,
}

/// `[core.cache]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCoreCache {
    /// Directory of the stored responses (created if missing; its own, not the media cache's).
    pub dir: std::path::PathBuf,
    /// Most bytes of stored bodies; least recently used responses go first.
    pub max_size: bytesize::ByteSize,
}

/// Validated `[core.cache]`.
#[derive(Debug, Clone)]
pub struct CoreCacheConfig {
    /// Directory of the stored responses.
    pub dir: std::path::PathBuf,
    /// Most bytes of stored bodies.
    pub max_size: u64,
}

fn default_true() -> bool {
    true
}
fn default_max_response_temp_file() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(1)
}
fn default_max_temp_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::gib(2)
}
fn default_max_buffer_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(64)
}

fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_connections() -> usize {
    256
}
/// Far above the web pool's: Mastodon's streaming server holds thousands of idle WebSockets
/// per process; the listeners' `max_connections` (from the file limit) bounds them first.
fn default_max_streams() -> usize {
    16384
}
/// As many as the connection cap's default: a steady load under the cap keeps all its
/// connections instead of closing and opening some on every burst (with 32, 64 clients made
/// about 3 % of requests open a connection). An idle connection is cheap on both ends: a
/// socket and a small buffer here; to puma an entry in its reactor (no thread), closed by
/// puma after its `persistent_timeout`; Mastodon's streaming server's connections are
/// mostly WebSocket tunnels, which never return to the pool.
fn default_max_idle() -> usize {
    256
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> Duration {
    Duration::from_secs(10)
}
fn default_max_body() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(99)
}

/// Validated `[core]`.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Host names routed to core, lower case, without port.
    pub hosts: Vec<String>,
    /// Web upstreams.
    pub web: Vec<SocketAddr>,
    /// Streaming upstreams.
    pub streaming: Vec<SocketAddr>,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// First-byte timeout.
    pub first_byte_timeout: Duration,
    /// Idle (between body pieces) timeout.
    pub idle_timeout: Duration,
    /// Idle timeout of WebSocket tunnels and server-sent events (zero: none).
    pub stream_idle_timeout: Duration,
    /// Most requests in flight per web upstream.
    pub max_connections_per_upstream: usize,
    /// Most connections per streaming upstream.
    pub max_streams_per_upstream: usize,
    /// Idle keep-alive connections per upstream.
    pub max_idle_per_upstream: usize,
    /// Consecutive failures that open a breaker.
    pub breaker_failures: u32,
    /// Open breaker's cool-down.
    pub breaker_cooldown: Duration,
    /// Largest request body, bytes.
    pub max_request_body: u64,
    /// Trusted proxies.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Health check interval (zero: none).
    pub health_check_interval: Duration,
    /// gzip for clients that take it.
    pub gzip: bool,
    /// Large answers read ahead of the client (`proxy::spool`).
    pub buffer_responses: bool,
    /// Most bytes of one buffered answer in its temp file.
    pub max_response_temp_file: u64,
    /// Request bodies read whole before they are sent (`proxy::stored`).
    pub buffer_requests: bool,
    /// Most bytes of the proxy's temp files together.
    pub max_temp_bytes: u64,
    /// Most bytes of buffered bodies in memory together.
    pub max_buffer_memory: u64,
    /// The shared cache of core's responses (None: nothing cached).
    pub cache: Option<CoreCacheConfig>,
}

/// A Host name as compared: lower case, no trailing dot.
pub fn normalize_host(h: &str) -> String {
    h.trim_end_matches('.').to_ascii_lowercase()
}

/// Checks `media_hosts`.
pub fn validate_media_hosts(hosts: Vec<String>, path: &Path) -> Result<Vec<String>, ConfigError> {
    hosts
        .into_iter()
        .map(|h| check_host(&h, "media_hosts", path))
        .collect()
}

/// Checks `[core]`, if present, against the (raw) `media_hosts`.
pub fn validate_core(
    core: Option<RawCore>,
    media_hosts: &[String],
    path: &Path,
) -> Result<Option<CoreConfig>, ConfigError> {
    let media_hosts = validate_media_hosts(media_hosts.to_vec(), path)?;
    core.map(|c| c.validate(path, &media_hosts)).transpose()
}

fn check_host(h: &str, key: &str, path: &Path) -> Result<String, ConfigError> {
    let ok = !h.is_empty()
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key: key.into(),
            message: format!(
                "{h:?} is not a host name like \"example.social\" (no port, no scheme)"
            ),
        });
    }
    Ok(normalize_host(h))
}

impl RawCore {
    /// Checks `[core]`; `media_hosts` may not also be core hosts.
    pub fn validate(self, path: &Path, media_hosts: &[String]) -> Result<CoreConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("core.{key}"),
            message,
        };
        if self.hosts.is_empty() {
            return Err(invalid(
                "hosts",
                "give at least one: [\"example.social\"]".into(),
            ));
        }
        let hosts = self
            .hosts
            .iter()
            .map(|h| check_host(h, "core.hosts", path))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(h) = hosts.iter().find(|h| media_hosts.contains(h)) {
            return Err(invalid("hosts", format!("{h} is also in `media_hosts`")));
        }
        let addrs = |key: &str, list: &[String]| {
            list.iter()
                .map(|s| {
                    super::validate::parse_addr_like(s, "10.0.0.2:3000")
                        .map_err(|m| invalid(key, m))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let web = addrs("web", &self.web)?;
        if web.is_empty() {
            return Err(invalid(
                "web",
                "give at least one: [\"10.0.0.2:3000\"]".into(),
            ));
        }
        let streaming = addrs("streaming", &self.streaming)?;
        let trusted_proxies = self
            .trusted_proxies
            .iter()
            .map(|s| super::validate::parse_net(s).map_err(|m| invalid("trusted_proxies", m)))
            .collect::<Result<Vec<_>, _>>()?;
        if self.breaker_failures == 0 {
            return Err(invalid("breaker_failures", "must be at least 1".into()));
        }
        if self.max_connections_per_upstream == 0 {
            return Err(invalid(
                "max_connections_per_upstream",
                "must be at least 1".into(),
            ));
        }
        if self.max_streams_per_upstream == 0 {
            return Err(invalid(
                "max_streams_per_upstream",
                "must be at least 1".into(),
            ));
        }
        let cache = match self.cache {
            None => None,
            Some(c) => {
                if c.dir.as_os_str().is_empty() {
                    return Err(invalid("cache.dir", "give a directory".into()));
                }
                if c.max_size.as_u64() == 0 {
                    return Err(invalid(
                        "cache.max_size",
                        "must be more than 0, like \"1GiB\"".into(),
                    ));
                }
                Some(CoreCacheConfig {
                    dir: c.dir,
                    max_size: c.max_size.as_u64(),
                })
            }
        };
        Ok(CoreConfig {
            cache,
            hosts,
            web,
            streaming,
            connect_timeout: self.connect_timeout,
            first_byte_timeout: self.first_byte_timeout,
            idle_timeout: self.idle_timeout,
            stream_idle_timeout: self.stream_idle_timeout,
            max_connections_per_upstream: self.max_connections_per_upstream,
            max_streams_per_upstream: self.max_streams_per_upstream,
            max_idle_per_upstream: self.max_idle_per_upstream,
            breaker_failures: self.breaker_failures,
            breaker_cooldown: self.breaker_cooldown,
            max_request_body: self.max_request_body.as_u64(),
            trusted_proxies,
            health_check_interval: self.health_check_interval,
            gzip: self.gzip,
            buffer_responses: self.buffer_responses,
            max_response_temp_file: self.max_response_temp_file.as_u64(),
            buffer_requests: self.buffer_requests,
            max_temp_bytes: self.max_temp_bytes.as_u64(),
            max_buffer_memory: self.max_buffer_memory.as_u64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{from_str, Config, ConfigError};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        from_str(text, Path::new("test.toml"))
    }

    #[test]
    fn the_issue_example_parses() {
        let c = parse(
            "media_hosts = [\"files.example.social\"]\n[core]\nhosts = [\"Example.social\"]\nweb = [\"10.0.0.2:3000\"]\nstreaming = [\"10.0.0.2:4000\"]\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"60s\"\n",
        )
        .unwrap();
        assert_eq!(c.media_hosts, ["files.example.social"]);
        let core = c.core.unwrap();
        assert_eq!(core.hosts, ["example.social"]);
        assert_eq!(core.streaming[0].port(), 4000);
        assert_eq!(core.max_request_body, 99 << 20);
        let c = parse("").unwrap();
        assert!(c.core.is_none() && c.media_hosts.is_empty());
    }

    #[test]
    fn core_cache_parses_and_is_checked() {
        let base = "[core]\nhosts = [\"a.b\"]\nweb = [\"1.2.3.4:1\"]\n";
        let c = parse(base).unwrap();
        assert!(c.core.unwrap().cache.is_none());
        let c = parse(&format!(
            "{base}[core.cache]\ndir = \"/var/cache/fediedge-core\"\nmax_size = \"1GiB\"\n"
        ))
        .unwrap();
        let cache = c.core.unwrap().cache.unwrap();
        assert_eq!(cache.max_size, 1 << 30);
        assert_eq!(cache.dir, Path::new("/var/cache/fediedge-core"));
        for (extra, key) in [
            (
                "[core.cache]\ndir = \"/x\"\nmax_size = \"0B\"\n",
                "core.cache.max_size",
            ),
            (
                "[core.cache]\ndir = \"\"\nmax_size = \"1MiB\"\n",
                "core.cache.dir",
            ),
            ("[core.cache]\ndir = \"/x\"\n", "max_size"),
            (
                "[core.cache]\ndir = \"/x\"\nmax_size = \"1MiB\"\nttl = 3\n",
                "ttl",
            ),
        ] {
            let err = parse(&format!("{base}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn bad_core_tables_are_refused_naming_the_key() {
        for (text, key) in [
            ("[core]\nhosts = []\nweb = [\"1.2.3.4:1\"]\n", "core.hosts"),
            ("[core]\nhosts = [\"a.b\"]\nweb = []\n", "core.web"),
            ("[core]\nhosts = [\"a.b\"]\nweb = [\"a.b\"]\n", "core.web"),
            (
                "[core]\nhosts = [\"a.b:443\"]\nweb = [\"1.2.3.4:1\"]\n",
                "core.hosts",
            ),
            ("media_hosts = [\"https://x\"]\n", "media_hosts"),
            (
                "media_hosts = [\"a.b\"]\n[core]\nhosts = [\"a.b\"]\nweb = [\"1.2.3.4:1\"]\n",
                "core.hosts",
            ),
            (
                "[core]\nhosts = [\"a.b\"]\nweb = [\"1.2.3.4:1\"]\ntrusted_proxies = [\"x\"]\n",
                "core.trusted_proxies",
            ),
            (
                "[core]\nhosts = [\"a.b\"]\nweb = [\"1.2.3.4:1\"]\nretries = 3\n",
                "retries",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
