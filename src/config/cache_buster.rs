//! `[cache_buster]`: Mastodon's cache buster (`CACHE_BUSTER_*`). When media is deleted,
//! Mastodon sends `http_method` to the media URL with `secret_header: secret`; a request that
//! matches evicts that URL from this edge's caches.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::secrets::Secret;

use super::ConfigError;

/// `[cache_buster]` as written.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheBuster {
    /// The method Mastodon sends (`CACHE_BUSTER_HTTP_METHOD`). Default `GET`, like Mastodon.
    #[serde(default = "default_method")]
    pub http_method: String,
    /// The header carrying the secret (`CACHE_BUSTER_SECRET_HEADER`). Required: without it
    /// a buster `GET` could not be told from a reader's.
    pub secret_header: String,
    /// The secret (`CACHE_BUSTER_SECRET`); else `secret_file`, else the environment variable
    /// `CACHE_BUSTER_SECRET` (the name Mastodon uses).
    pub secret: Option<Secret>,
    /// A file holding the secret (refused if group or others may read it).
    pub secret_file: Option<PathBuf>,
    /// The other edges (base URLs, `http://` or `https://`), to which a purge that came from
    /// Mastodon is passed on, with the same secret, so every edge drops the URL.
    #[serde(default)]
    pub peers: Vec<String>,
}

impl fmt::Debug for RawCacheBuster {
    // By hand, so that the secret never reaches a log line through `{:?}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCacheBuster")
            .field("http_method", &self.http_method)
            .field("secret_header", &self.secret_header)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("peers", &self.peers)
            .finish()
    }
}

fn default_method() -> String {
    "GET".into()
}

/// Validated `[cache_buster]`.
#[derive(Clone)]
pub struct CacheBusterConfig {
    /// The method (upper case, as Mastodon's HTTP client sends it).
    pub http_method: http::Method,
    /// The header carrying the secret.
    pub secret_header: http::HeaderName,
    /// The secret.
    pub secret: String,
    /// The other edges a purge from Mastodon is passed on to.
    pub peers: Vec<url::Url>,
}

impl fmt::Debug for CacheBusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBusterConfig")
            .field("http_method", &self.http_method)
            .field("secret_header", &self.secret_header)
            .field("secret", &"<redacted>")
            .field("peers", &self.peers)
            .finish()
    }
}

impl RawCacheBuster {
    /// Checks the method and header names and resolves the secret.
    pub fn validate(self, path: &Path) -> Result<CacheBusterConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("cache_buster.{key}"),
            message,
        };
        let m = self.http_method.trim().to_ascii_uppercase();
        let http_method = http::Method::from_bytes(m.as_bytes())
            .ok()
            .filter(|_| !m.is_empty())
            .ok_or_else(|| {
                invalid(
                    "http_method",
                    format!("{:?} is not an HTTP method", self.http_method),
                )
            })?;
        if matches!(http_method, http::Method::CONNECT | http::Method::OPTIONS) {
            return Err(invalid(
                "http_method",
                format!("{http_method} cannot carry a purge; use GET (Mastodon's default) or e.g. PURGE"),
            ));
        }
        let secret_header = http::HeaderName::from_bytes(self.secret_header.trim().as_bytes())
            .map_err(|_| {
                invalid(
                    "secret_header",
                    format!("{:?} is not a header name", self.secret_header),
                )
            })?;
        let reserved = [
            http::header::HOST,
            http::header::AUTHORIZATION,
            http::header::COOKIE,
            http::header::CONNECTION,
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
            http::header::RANGE,
        ];
        if reserved.contains(&secret_header) {
            return Err(invalid(
                "secret_header",
                format!("{secret_header} is a header readers send; use one of its own, e.g. X-Cache-Buster-Secret"),
            ));
        }
        let secret = super::secrets::secret(
            self.secret.as_ref().map(Secret::expose),
            self.secret_file.as_deref(),
            "CACHE_BUSTER_SECRET",
        )
        .map_err(|m| invalid("secret", m))?;
        if secret.is_empty() {
            // Mastodon sends no header at all with an empty secret.
            return Err(invalid("secret", "is empty".into()));
        }
        let peers = self
            .peers
            .iter()
            .map(|p| peer_url(p).map_err(|m| invalid("peers", format!("{p:?}: {m}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CacheBusterConfig {
            http_method,
            secret_header,
            secret,
            peers,
        })
    }
}

/// A peer's base URL: `http` or `https`, a host, no path beyond `/`, no query or credentials
/// (the secret travels in the secret header, never in a URL).
fn peer_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s.trim()).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("must be http:// or https://".into());
    }
    if u.host_str().is_none() {
        return Err("has no host".into());
    }
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        return Err("must be a base URL like https://edge2.example.social (no path)".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not hold credentials".into());
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn load(section: &str) -> Result<super::super::Config, String> {
        super::super::from_str(&format!("[cache_buster]\n{section}"), Path::new("t.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_section_and_its_defaults() {
        let c = load("secret_header = \"X-Purge\"\nsecret = \"abc\"\n").unwrap();
        let b = c.cache_buster.unwrap();
        assert_eq!(b.http_method, http::Method::GET, "Mastodon's default");
        assert_eq!(b.secret_header, "x-purge");
        assert!(!format!("{b:?}").contains("abc"), "redacted in Debug");
        let b = load("http_method = \"purge\"\nsecret_header = \"X-Purge\"\nsecret = \"abc\"\n")
            .unwrap()
            .cache_buster
            .unwrap();
        assert_eq!(b.http_method.as_str(), "PURGE");
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        let e = load("secret_header = \"X-Purge\"\nsecret = \"abc\"\nsecrets = 1\n").unwrap_err();
        assert!(e.contains("secrets"), "unknown key: {e}");
        let e =
            load("http_method = \"GE T\"\nsecret_header = \"X\"\nsecret = \"a\"\n").unwrap_err();
        assert!(e.contains("cache_buster.http_method"), "{e}");
        let e = load("secret_header = \"Bad Header\"\nsecret = \"a\"\n").unwrap_err();
        assert!(e.contains("cache_buster.secret_header"), "{e}");
        let e = load("secret_header = \"Authorization\"\nsecret = \"a\"\n").unwrap_err();
        assert!(e.contains("cache_buster.secret_header"), "{e}");
        let e = load("secret_header = \"X\"\nsecret = \"\"\n").unwrap_err();
        assert!(e.contains("cache_buster.secret"), "{e}");
        let e = load("secret = \"a\"\n").unwrap_err();
        assert!(e.contains("secret_header"), "required: {e}");
    }

    #[test]
    fn peers_are_base_urls() {
        let base = "secret_header = \"X\"\nsecret = \"a\"\n";
        let c = load(&format!(
            "{base}peers = [\"http://10.0.0.5:8080\", \"https://edge2.example.social/\"]\n"
        ))
        .unwrap();
        let peers = c.cache_buster.unwrap().peers;
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].as_str(), "http://10.0.0.5:8080/");
        for bad in [
            "ftp://x",
            "http://x/system",
            "http://x/?a=1",
            "http://u:p@x",
            "x",
        ] {
            let e = load(&format!("{base}peers = [\"{bad}\"]\n")).unwrap_err();
            assert!(e.contains("cache_buster.peers"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "from-file\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let section = format!("secret_header = \"X\"\nsecret_file = \"{}\"\n", f.display());
        let e = load(&section).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let b = load(&section).unwrap().cache_buster.unwrap();
        assert_eq!(b.secret, "from-file");
    }
}
