//! `[sidekiq]`: `serve` also watches Mastodon's Sidekiq (read-only) and adds
//! `fediedge_sidekiq_*` series to `/metrics` (docs/queues.md).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::secrets::Secret;

use super::ConfigError;

/// `[sidekiq]` as written: exactly one of `redis_url` and `mastodon_env`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidekiq {
    /// Sidekiq's Redis (`redis://`, `rediss://`, `unix://`); may hold a password, which is
    /// never shown.
    pub redis_url: Option<Secret>,
    /// Key namespace with `redis_url` (`REDIS_NAMESPACE` of Mastodon ≤ 4.3). Default none.
    pub namespace: Option<String>,
    /// Sentinels `host[:port],…` with `redis_url` (whose host then names the master).
    pub sentinels: Option<String>,
    /// A Mastodon env file to take the connection from, as Mastodon does.
    pub mastodon_env: Option<PathBuf>,
    /// Time between reads. Default `15s`.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(15)
}

impl fmt::Debug for RawSidekiq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSidekiq")
            .field("redis_url", &self.redis_url.as_ref().map(|_| "<hidden>"))
            .field("namespace", &self.namespace)
            .field("sentinels", &self.sentinels)
            .field("mastodon_env", &self.mastodon_env)
            .field("interval", &self.interval)
            .finish()
    }
}

/// Where the Sidekiq monitor of `serve` reads from.
#[derive(Clone)]
pub enum SidekiqSource {
    /// A Redis URL, with optional sentinels and namespace.
    Url {
        /// The URL (may hold a password; never shown).
        url: String,
        /// Sentinels `host[:port],…`.
        sentinels: Option<String>,
        /// Key namespace.
        namespace: Option<String>,
    },
    /// A Mastodon env file.
    MastodonEnv(PathBuf),
}

/// Validated `[sidekiq]`.
#[derive(Clone, Debug)]
pub struct SidekiqConfig {
    /// Where to read.
    pub source: SidekiqSource,
    /// Time between reads.
    pub interval: Duration,
}

impl fmt::Debug for SidekiqSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SidekiqSource::Url { namespace, .. } => f
                .debug_struct("Url")
                .field("url", &"<hidden>")
                .field("namespace", namespace)
                .finish_non_exhaustive(),
            SidekiqSource::MastodonEnv(p) => f.debug_tuple("MastodonEnv").field(p).finish(),
        }
    }
}

impl RawSidekiq {
    /// Checks the section; errors name `sidekiq.<key>` and never repeat the URL.
    pub fn validate(self, path: &Path) -> Result<SidekiqConfig, ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("sidekiq.{key}"),
            message: message.to_owned(),
        };
        if self.interval < Duration::from_secs(1) {
            return Err(invalid("interval", "must be at least 1s"));
        }
        let source = match (self.redis_url.map(Secret::into_inner), self.mastodon_env) {
            (Some(url), None) => {
                let scheme = url::Url::parse(url.trim()).map(|u| u.scheme().to_owned());
                if !matches!(
                    scheme.as_deref(),
                    Ok("redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys")
                ) {
                    return Err(invalid(
                        "redis_url",
                        "not a Redis URL (redis://, rediss:// or unix://)",
                    ));
                }
                SidekiqSource::Url {
                    url,
                    sentinels: self.sentinels,
                    namespace: self.namespace,
                }
            }
            (None, Some(env)) => {
                if self.sentinels.is_some() || self.namespace.is_some() {
                    return Err(invalid(
                        "mastodon_env",
                        "sentinels and namespace come from the env file; drop them here",
                    ));
                }
                SidekiqSource::MastodonEnv(env)
            }
            _ => {
                return Err(invalid(
                    "redis_url",
                    "give exactly one of `redis_url` and `mastodon_env`",
                ))
            }
        };
        Ok(SidekiqConfig {
            source,
            interval: self.interval,
        })
    }
}
