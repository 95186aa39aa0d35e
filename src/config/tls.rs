//! `[tls]`: HTTPS with HTTP/2 and HTTP/1.1 chosen by ALPN, certificates chosen by SNI, and an
//! optional plain-HTTP listener that redirects to https (serving ACME http-01 challenges).
//!
//! Only the shape is checked here; the certificate files are read (and refused with their
//! name) when `serve` starts and on every SIGHUP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[tls]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Address for HTTPS (HTTP/2 and HTTP/1.1). Default `0.0.0.0:443`.
    #[serde(default = "default_tls_listen")]
    pub listen: String,
    /// Certificate chains and their keys (PEM files). For each TLS connection the one whose
    /// subject alternative names match the name the client asked for (SNI) is used; the
    /// first one when none matches. At least one.
    pub certificates: Vec<RawCertificate>,
    /// Optional address for plain HTTP that answers every request with a redirect to https
    /// (308, same host and path), except ACME challenges. Default: none.
    pub redirect_listen: Option<String>,
    /// Directory whose files are served at `/.well-known/acme-challenge/<name>` on
    /// `redirect_listen` (ACME http-01, e.g. `certbot certonly --webroot` with this directory
    /// as `<webroot>/.well-known/acme-challenge`). Default: none (those paths redirect too).
    pub acme_challenge_dir: Option<PathBuf>,
}

/// One `{ cert = …, key = … }` of `tls.certificates`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    /// PEM file: the certificate, then its intermediates (a `fullchain.pem`).
    pub cert: PathBuf,
    /// PEM file: its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

fn default_tls_listen() -> String {
    "0.0.0.0:443".into()
}

/// Validated `[tls]`.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// HTTPS listener.
    pub listen: SocketAddr,
    /// Certificate and key files, in the order written.
    pub certificates: Vec<CertificateFiles>,
    /// Plain-HTTP redirect listener, if any.
    pub redirect_listen: Option<SocketAddr>,
    /// ACME http-01 challenge directory, if any.
    pub acme_challenge_dir: Option<PathBuf>,
}

/// One certificate chain and its key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// The chain (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

impl RawTls {
    /// Checks `[tls]`; `taken` are the other listeners' addresses (`listen`, `admin_listen`).
    pub fn validate(self, path: &Path, taken: &[SocketAddr]) -> Result<TlsConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("tls.{key}"),
            message,
        };
        let parse = |key: &str, s: &str| {
            super::validate::parse_addr_like(s, "0.0.0.0:443").map_err(|m| invalid(key, m))
        };
        let listen = parse("listen", &self.listen)?;
        let redirect_listen = match &self.redirect_listen {
            Some(s) => Some(parse("redirect_listen", s)?),
            None => None,
        };
        let clash = |a: SocketAddr, others: &[SocketAddr]| a.port() != 0 && others.contains(&a);
        if clash(listen, taken) {
            return Err(invalid(
                "listen",
                format!("{listen} is already `listen` or `admin_listen`"),
            ));
        }
        if let Some(r) = redirect_listen {
            if clash(r, taken) || clash(r, &[listen]) {
                return Err(invalid(
                    "redirect_listen",
                    format!("{r} is already used by another listener"),
                ));
            }
        }
        if self.certificates.is_empty() {
            return Err(invalid(
                "certificates",
                "give at least one: [{ cert = \"/etc/fediedge/site.pem\", key = \"/etc/fediedge/site.key\" }]"
                    .into(),
            ));
        }
        if self.acme_challenge_dir.is_some() && redirect_listen.is_none() {
            return Err(invalid(
                "acme_challenge_dir",
                "is served on `tls.redirect_listen`, which is not set".into(),
            ));
        }
        Ok(TlsConfig {
            listen,
            certificates: self
                .certificates
                .into_iter()
                .map(|c| CertificateFiles {
                    cert: c.cert,
                    key: c.key,
                })
                .collect(),
            redirect_listen,
            acme_challenge_dir: self.acme_challenge_dir,
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
            "[tls]\nlisten = \"0.0.0.0:443\"\ncertificates = [{ cert = \"/etc/fediedge/site.pem\", key = \"/etc/fediedge/site.key\" }]\nredirect_listen = \"0.0.0.0:80\"\nacme_challenge_dir = \"/var/lib/fediedge/acme\"\n",
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.to_string(), "0.0.0.0:443");
        assert_eq!(tls.certificates[0].key, Path::new("/etc/fediedge/site.key"));
        assert_eq!(tls.redirect_listen.unwrap().port(), 80);
        assert!(parse("").unwrap().tls.is_none());
    }

    #[test]
    fn bad_tls_tables_are_refused_naming_the_key() {
        let cert = "certificates = [{ cert = \"a.pem\", key = \"a.key\" }]";
        for (text, key) in [
            (format!("[tls]\n{cert}\nlisten = \"443\"\n"), "tls.listen"),
            ("[tls]\ncertificates = []\n".to_owned(), "tls.certificates"),
            (
                format!("[tls]\n{cert}\nacme_challenge_dir = \"/acme\"\n"),
                "tls.acme_challenge_dir",
            ),
            (
                format!("listen = \"0.0.0.0:8443\"\n[tls]\n{cert}\nlisten = \"0.0.0.0:8443\"\n"),
                "tls.listen",
            ),
            (
                format!("[tls]\n{cert}\nredirect = \"0.0.0.0:80\"\n"),
                "redirect",
            ),
            (
                "[tls]\ncertificates = [{ cert = \"a.pem\", keyfile = \"a.key\" }]\n".to_owned(),
                "keyfile",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
