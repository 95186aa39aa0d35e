//! Raw → validated: every value checked, defaults filled in, secrets resolved. Every error
//! names the dotted key it is about.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::secrets::{secret, Secret};
use super::{
    BackfillConfig, CacheConfig, Config, ConfigError, RawConfig, RawStore, S3Config, StoreConfig,
    StoreKind, StoreType,
};

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
        if self.max_connections == Some(0) {
            return Err(invalid(
                "max_connections",
                "must be at least 1 (leave it out for a default from the descriptor limit)".into(),
            ));
        }
        if self.max_connections_per_ip == Some(0) {
            return Err(invalid(
                "max_connections_per_ip",
                "must be at least 1 (leave it out for no limit)".into(),
            ));
        }
        let max_connections_per_ip_exempt = self
            .max_connections_per_ip_exempt
            .iter()
            .map(|s| parse_net(s).map_err(|m| invalid("max_connections_per_ip_exempt", m)))
            .collect::<Result<Vec<_>, _>>()?;
        if self.max_flights == 0 {
            return Err(invalid("max_flights", "must be at least 1".into()));
        }
        if self.max_flight_temp_bytes.as_u64() < 1024 {
            return Err(invalid(
                "max_flight_temp_bytes",
                "must be at least 1KiB".into(),
            ));
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
                if from.kind.store_type() == StoreType::Http && b.keys.is_none() {
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
            drain_timeout: self.drain_timeout,
            writeback_concurrency: self.writeback_concurrency,
            worker_threads: self.worker_threads,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_connections_per_ip_exempt,
            max_flights: self.max_flights,
            max_flight_temp_bytes: self.max_flight_temp_bytes.as_u64(),
            max_flight_memory: self.max_flight_memory.as_u64(),
            flight_queue_wait: self.flight_queue_wait,
            cache,
            primary,
            fallbacks,
            backfill,
            sidekiq: self.sidekiq.map(|s| s.validate(path)).transpose()?,
            tls: self
                .tls
                .map(|t| t.validate(path, &[listen, admin_listen]))
                .transpose()?,
            media_hosts: super::core::validate_media_hosts(self.media_hosts.clone(), path)?,
            core: super::core::validate_core(self.core, &self.media_hosts, path)?,
            cache_buster: self.cache_buster.map(|b| b.validate(path)).transpose()?,
            alerts: self.alerts.validate(path)?,
            canary: self.canary.map(|c| c.validate(path)).transpose()?,
            settings: super::Settings::default(),
        })
    }
}

/// Parses a socket address; the message shows `example` as the expected shape.
pub(super) fn parse_addr_like(s: &str, example: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address like \"{example}\""))
}

/// Parses an address or a range of them (`10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`).
pub(super) fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an address or range like \"10.0.0.0/8\""))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    parse_addr_like(s, "127.0.0.1:8080")
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
            self.access_key_id.as_ref().map(Secret::expose),
            self.access_key_id_file.as_deref(),
            "AWS_ACCESS_KEY_ID",
        )
        .map_err(|m| invalid("access_key_id", m))?;
        let secret_access_key = secret(
            self.secret_access_key.as_ref().map(Secret::expose),
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn flight_limits_have_defaults_and_are_checked() {
        let c = super::super::from_str("", Path::new("t.toml")).unwrap();
        assert_eq!(c.max_flights, 256);
        assert_eq!(c.max_flight_temp_bytes, 1 << 30);
        assert_eq!(c.max_flight_memory, 256 << 20);
        assert_eq!(c.flight_queue_wait, std::time::Duration::from_secs(2));
        let c = super::super::from_str(
            "max_flights = 8\nmax_flight_temp_bytes = \"64MiB\"\nmax_flight_memory = \"0\"\nflight_queue_wait = \"250ms\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(
            (c.max_flights, c.max_flight_temp_bytes, c.max_flight_memory),
            (8, 64 << 20, 0)
        );
        assert_eq!(c.flight_queue_wait, std::time::Duration::from_millis(250));
        for (text, key) in [
            ("max_flights = 0\n", "max_flights"),
            ("max_flight_temp_bytes = \"10\"\n", "max_flight_temp_bytes"),
        ] {
            let err = super::super::from_str(text, Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{err}");
        }
    }
}
