//! Where Sidekiq's Redis is: a URL, Sentinel, or what a Mastodon `.env.production` says.
//!
//! Mastodon builds its Sidekiq connection in `lib/mastodon/redis_configuration.rb`
//! (`setup_config(prefix: 'SIDEKIQ_')`): `SIDEKIQ_REDIS_URL` wins outright; else
//! `SIDEKIQ_REDIS_HOST`/`_PORT`/`_DB`/`_USER`/`_PASSWORD`, or Sentinel when both
//! `SIDEKIQ_REDIS_SENTINEL_MASTER` and `SIDEKIQ_REDIS_SENTINELS` (`host[:port],…`, port
//! default `SIDEKIQ_REDIS_SENTINEL_PORT` or 26379) are set (the sentinels' own credentials:
//! `…_SENTINEL_USERNAME`/`_PASSWORD`, else none, else the master's as Mastodon 4.4+ does); with no `SIDEKIQ_REDIS_HOST` (nor
//! Sentinel) the whole un-prefixed `REDIS_*` set is used instead, defaulting to
//! `localhost:6379/0`. Parts are never mixed between the two sets. `REDIS_NAMESPACE` (removed
//! in Mastodon 4.4) prefixes every Sidekiq key with `NAMESPACE:`.
//!
//! Passwords never leave this file: [`Target::redacted`] and the `Debug` impl hide them.

use std::fmt;
use std::path::Path;

use crate::mastodon::dotenv::EnvFile;

use super::SidekiqError;

/// How to reach Redis.
#[derive(Clone)]
pub enum Endpoint {
    /// `redis://`, `rediss://` (TLS) or `unix://` URL, as redis-rs reads it.
    Url(url::Url),
    /// Ask these sentinels for the current master of `url`'s host name (Mastodon's form:
    /// `redis://:PASSWORD@MASTER/DB`); user, password and db come from `url`.
    Sentinel {
        /// `(host, port)` of each sentinel.
        sentinels: Vec<(String, u16)>,
        /// Master name, credentials and db.
        url: url::Url,
        /// `(user, password)` for the sentinels themselves (`…REDIS_SENTINEL_USERNAME`/
        /// `_PASSWORD`); without it, none and then the master's are tried.
        sentinel_auth: Option<(String, String)>,
    },
}

/// Where the monitor reads from, with the optional key namespace.
#[derive(Clone)]
pub struct Target {
    /// How to connect.
    pub endpoint: Endpoint,
    /// `REDIS_NAMESPACE` (Mastodon ≤ 4.3): every key is `NAMESPACE:key`.
    pub namespace: Option<String>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A URL with any password replaced by `***` (also a unix socket's `pass=` query).
pub fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "pass" || k == "password" {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Parses a Redis URL; the error never repeats the URL (it may hold a password).
pub fn parse_url(text: &str) -> Result<url::Url, SidekiqError> {
    let url = url::Url::parse(text.trim())
        .map_err(|e| SidekiqError::Settings(format!("not a Redis URL ({e})")))?;
    match url.scheme() {
        "redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys" => Ok(url),
        other => Err(SidekiqError::Settings(format!(
            "a Redis URL starts with redis://, rediss:// or unix://, not {other}://"
        ))),
    }
}

/// Parses `host[:port],host[:port]` (Mastodon's `*_SENTINELS`).
pub fn parse_sentinels(list: &str, default_port: u16) -> Result<Vec<(String, u16)>, SidekiqError> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (host, port) = match item.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>().map_err(|_| {
                    SidekiqError::Settings(format!("sentinel `{item}`: port is not a number"))
                })?,
            ),
            None => (item, default_port),
        };
        out.push((host.to_owned(), port));
    }
    Ok(out)
}

impl Target {
    /// A target from a URL (`--redis`), optionally through sentinels (`--sentinels`).
    pub fn from_url(
        url: &str,
        sentinels: Option<&str>,
        namespace: Option<String>,
    ) -> Result<Target, SidekiqError> {
        let url = parse_url(url)?;
        let endpoint = match sentinels {
            Some(list) => Endpoint::Sentinel {
                sentinels: parse_sentinels(list, 26379)?,
                url,
                sentinel_auth: None,
            },
            None => Endpoint::Url(url),
        };
        Ok(Target {
            endpoint,
            namespace: namespace.filter(|n| !n.is_empty()),
        })
    }

    /// The target of `serve`'s `[sidekiq]` section.
    pub fn from_config(c: &crate::config::SidekiqConfig) -> Result<Target, SidekiqError> {
        use crate::config::SidekiqSource;
        match &c.source {
            SidekiqSource::Url {
                url,
                sentinels,
                namespace,
            } => Target::from_url(url, sentinels.as_deref(), namespace.clone()),
            SidekiqSource::MastodonEnv(path) => Target::from_mastodon_env(path),
        }
    }

    /// The target Mastodon's Sidekiq uses, from a `.env.production` file.
    pub fn from_mastodon_env(path: &Path) -> Result<Target, SidekiqError> {
        let env = EnvFile::load(path)
            .map_err(|e| SidekiqError::Settings(format!("cannot read {}: {e}", path.display())))?;
        Target::from_env(&env)
    }

    /// The target Mastodon's Sidekiq uses, from a parsed env file (see the module docs).
    pub fn from_env(env: &EnvFile) -> Result<Target, SidekiqError> {
        let namespace = env.get("REDIS_NAMESPACE").map(str::to_owned);
        let endpoint = match endpoint_for(env, "SIDEKIQ_", false)? {
            Some(e) => e,
            None => endpoint_for(env, "", true)?.expect("base settings have defaults"),
        };
        Ok(Target {
            endpoint,
            namespace: namespace.filter(|n| !n.is_empty()),
        })
    }

    /// A printable description: URL with the password replaced, sentinels, namespace.
    pub fn redacted(&self) -> String {
        let mut s = match &self.endpoint {
            Endpoint::Url(u) => redact(u),
            Endpoint::Sentinel { sentinels, url, .. } => {
                let list: Vec<String> = sentinels.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                format!("{} via sentinels {}", redact(url), list.join(","))
            }
        };
        if let Some(ns) = &self.namespace {
            s.push_str(&format!(" (namespace {ns:?})"));
        }
        s
    }

    /// The password as written in the URL and decoded (only to scrub it from error messages).
    pub(crate) fn secrets(&self) -> Vec<String> {
        let url = match &self.endpoint {
            Endpoint::Url(u) | Endpoint::Sentinel { url: u, .. } => u,
        };
        let mut out: Vec<String> = url
            .query_pairs()
            .filter(|(k, _)| k == "pass" || k == "password")
            .map(|(_, v)| v.into_owned())
            .collect();
        if let Endpoint::Sentinel {
            sentinel_auth: Some((_, pw)),
            ..
        } = &self.endpoint
        {
            out.push(pw.clone());
        }
        if let Some(pw) = url.password() {
            out.push(pw.to_owned());
            let decoded = percent_encoding::percent_decode_str(pw).decode_utf8_lossy();
            out.push(decoded.into_owned());
        }
        out.retain(|s| !s.is_empty());
        out
    }

    /// `message` with every form of the password replaced by `***`.
    pub(crate) fn scrub(&self, message: &str) -> String {
        self.secrets()
            .iter()
            .fold(message.to_owned(), |m, s| m.replace(s.as_str(), "***"))
    }

    /// `key` with the namespace prefix, if any.
    pub fn key(&self, key: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}:{key}"),
            None => key.to_owned(),
        }
    }
}

/// Mastodon's `setup_config(prefix:)`: `None` when the prefixed set names no host (the caller
/// then falls back to the base set, which has defaults).
fn endpoint_for(
    env: &EnvFile,
    prefix: &str,
    defaults: bool,
) -> Result<Option<Endpoint>, SidekiqError> {
    let get = |k: &str| env.get(&format!("{prefix}REDIS_{k}")).map(str::to_owned);
    // Ruby's `ENV.fetch` returns an empty string as set; `.present?` treats it as unset.
    let present = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
    if let Some(url) = present(get("URL")) {
        return parse_url(&url).map(|u| Some(Endpoint::Url(u)));
    }
    let mut host = present(get("HOST")).or(defaults.then(|| "localhost".to_owned()));
    let mut port = present(get("PORT")).or(defaults.then(|| "6379".to_owned()));
    let db = present(get("DB")).unwrap_or_else(|| "0".to_owned());
    let master = present(get("SENTINEL_MASTER"));
    let sentinel_port = match present(get("SENTINEL_PORT")) {
        Some(p) => p.trim().parse::<u16>().map_err(|_| {
            SidekiqError::Settings(format!("{prefix}REDIS_SENTINEL_PORT is not a port number"))
        })?,
        None => 26379,
    };
    let sentinels = match present(get("SENTINELS")) {
        Some(list) => parse_sentinels(&list, sentinel_port)?,
        None => Vec::new(),
    };
    let sentinel_mode = master.is_some() && !sentinels.is_empty();
    if sentinel_mode {
        host = master;
        port = None;
    }
    let Some(host) = host else { return Ok(None) };
    let authority = match &port {
        Some(p) => format!("{host}:{}", p.trim()),
        None => host.clone(),
    };
    let mut url = url::Url::parse(&format!("redis://{authority}/{}", db.trim())).map_err(|_| {
        SidekiqError::Settings(format!(
            "{prefix}REDIS_HOST/_PORT/_DB do not make a Redis URL"
        ))
    })?;
    if let Some(user) = present(get("USER")) {
        let _ = url.set_username(&user);
    }
    if let Some(pw) = present(get("PASSWORD")) {
        let _ = url.set_password(Some(&pw));
    }
    Ok(Some(if sentinel_mode {
        let sentinel_auth = present(get("SENTINEL_PASSWORD")).map(|pw| {
            let user = present(get("SENTINEL_USERNAME"))
                .or_else(|| present(get("USER")))
                .unwrap_or_default();
            (user, pw)
        });
        Endpoint::Sentinel {
            sentinels,
            url,
            sentinel_auth,
        }
    } else {
        Endpoint::Url(url)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Target {
        Target::from_env(&crate::mastodon::dotenv::parse(text, Path::new("t"))).unwrap()
    }

    #[test]
    fn sidekiq_url_wins_over_everything() {
        let t = target("REDIS_URL=redis://a:1/2\nSIDEKIQ_REDIS_URL=redis://:s3cret@b:6380/3\n");
        assert_eq!(t.redacted(), "redis://:***@b:6380/3");
        assert_eq!(t.secrets(), ["s3cret", "s3cret"]);
        assert_eq!(t.scrub("auth s3cret failed"), "auth *** failed");
    }

    #[test]
    fn sidekiq_host_set_uses_only_sidekiq_parts() {
        let t = target("REDIS_PASSWORD=base\nSIDEKIQ_REDIS_HOST=q\nSIDEKIQ_REDIS_DB=4\n");
        assert_eq!(t.redacted(), "redis://q/4");
        assert!(t.secrets().is_empty());
    }

    #[test]
    fn base_parts_with_defaults_and_a_namespace() {
        let t = target("REDIS_HOST=r.internal\nREDIS_PASSWORD=p@ss:w/rd\nREDIS_NAMESPACE=mstdn\n");
        assert_eq!(
            t.redacted(),
            "redis://:***@r.internal:6379/0 (namespace \"mstdn\")"
        );
        assert_eq!(t.secrets(), ["p%40ss%3Aw%2Frd", "p@ss:w/rd"]);
        assert_eq!(t.key("queues"), "mstdn:queues");
        let t = target("");
        assert_eq!(t.redacted(), "redis://localhost:6379/0");
        let t = target("REDIS_URL=rediss://default:pw@tls.example:6380\n");
        assert_eq!(t.redacted(), "rediss://default:***@tls.example:6380");
    }

    #[test]
    fn sentinel_when_master_and_sentinels_are_set() {
        let t = target(
            "SIDEKIQ_REDIS_SENTINEL_MASTER=mymaster\nSIDEKIQ_REDIS_SENTINELS=s1,s2:26380\n\
             SIDEKIQ_REDIS_PASSWORD=x\n",
        );
        assert_eq!(
            t.redacted(),
            "redis://:***@mymaster/0 via sentinels s1:26379,s2:26380"
        );
        // A master name without sentinels is not Sentinel, and no host: the base set.
        let t = target("SIDEKIQ_REDIS_SENTINEL_MASTER=mymaster\nREDIS_HOST=h\n");
        assert_eq!(t.redacted(), "redis://h:6379/0");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        let e = Target::from_url("http://:hunter2@x/", None, None).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Target::from_url("redis//:hunter2@x", None, None).unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let t = Target::from_url("unix:///run/redis.sock?db=2&pass=hunter2", None, None).unwrap();
        assert!(!t.redacted().contains("hunter2"), "{}", t.redacted());
    }
}
