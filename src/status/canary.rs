//! The media canary: every `interval`, GET each canary key through the edge's own media
//! listener, exactly as a browser would (router, edge, cache, flights, stores). A key that is
//! not answered 200 with its whole body counts as a failed round; `failures` in a row raise
//! the `canary:<key>` alert. Without configured keys, each round writes a new probe object
//! into the primary, fetches it through the edge (a miss: the primary's read path), checks
//! its bytes, and deletes the previous probe.
//!
//! A misconfigured edge that answers 404 for everything (the seed's broken
//! `.env.production`) fails the first round.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::{CanaryConfig, CanaryKeys};
use crate::key::Key;
use crate::store::{ObjectMeta, StoreHandle};

use super::Status;

/// Where the canary's requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The media listener (an unspecified address is reached over loopback).
    pub addr: SocketAddr,
    /// The `Host` to send: a media host (keys at the root), else an instance name, else none.
    pub host: Option<String>,
    /// Put before the key in the path: `url_prefix`, or `/` on a media host.
    pub prefix: String,
    /// `url_prefix`, for [`Target::for_hosts`].
    url_prefix: String,
}

impl Target {
    /// The target for a config: the first media host if any (bucket root), else the first
    /// core host with `url_prefix`, else `url_prefix` with no particular name.
    pub fn new(addr: SocketAddr, config: &crate::config::Config) -> Target {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let core_hosts = config.core.as_ref().map(|c| &c.hosts[..]).unwrap_or(&[]);
        let url_prefix = config.url_prefix.clone();
        Target {
            addr,
            host: None,
            prefix: url_prefix.clone(),
            url_prefix,
        }
        .for_hosts(&config.media_hosts, core_hosts)
    }

    /// This target with the Host names of `media_hosts` and `core_hosts` (a reload may have
    /// changed them): the first media host, else the first core host, else none.
    pub fn for_hosts(&self, media_hosts: &[String], core_hosts: &[String]) -> Target {
        let (host, prefix) = match (media_hosts.first(), core_hosts.first()) {
            (Some(h), _) => (Some(h.clone()), "/".to_owned()),
            (None, host) => (host.cloned(), self.url_prefix.clone()),
        };
        Target {
            addr: self.addr,
            host,
            prefix,
            url_prefix: self.url_prefix.clone(),
        }
    }

    fn url(&self, key: &Key) -> String {
        format!("http://{}{}{}", self.addr, self.prefix, key.url_encoded())
    }
}

/// Runs the canary until `stop`; each round asks with the Host names `router` routes then.
pub async fn run(
    config: CanaryConfig,
    start: Target,
    router: crate::router::SharedRouter,
    primary: StoreHandle,
    status: Status,
    stop: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(config.timeout)
        .pool_max_idle_per_host(0)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "canary: cannot build its HTTP client; not running");
            return;
        }
    };
    let mut previous_probe: Option<Key> = None;
    loop {
        let routes = router.get();
        let target = start.for_hosts(routes.media_hosts(), routes.core_hosts());
        match &config.keys {
            CanaryKeys::Configured(keys) => {
                for k in keys {
                    let result = match Key::parse(k) {
                        Ok(key) => fetch(&client, &target, &key, None).await,
                        Err(e) => Err(format!("not a key: {e}")),
                    };
                    status.canary_round(k, result);
                }
            }
            CanaryKeys::Probe(prefix) => {
                let result = probe(&client, &target, &primary, prefix, &mut previous_probe).await;
                status.canary_round("probe", result);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(config.interval) => {}
        }
    }
    if let Some(old) = previous_probe {
        let _ = primary.delete(&old).await;
    }
}

/// GETs `key` through the edge; `Ok` if it is answered 200 with the whole body (and, with
/// `expect`, exactly those bytes).
async fn fetch(
    client: &reqwest::Client,
    target: &Target,
    key: &Key,
    expect: Option<&[u8]>,
) -> Result<(), String> {
    let mut req = client.get(target.url(key));
    if let Some(h) = &target.host {
        req = req.header(http::header::HOST, h);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let cache = resp
        .headers()
        .get("x-cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    if status != http::StatusCode::OK {
        return Err(format!("answered {status} (X-Cache-Status {cache})"));
    }
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("body cut short: {e}"))?;
    match expect {
        Some(want) if body.as_ref() != want => Err(format!(
            "answered {} bytes that are not the probe's {}",
            body.len(),
            want.len()
        )),
        _ => Ok(()),
    }
}

/// One probe round: a new object into the primary, fetched through the edge.
async fn probe(
    client: &reqwest::Client,
    target: &Target,
    primary: &StoreHandle,
    prefix: &str,
    previous: &mut Option<Key>,
) -> Result<(), String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    let key =
        Key::parse(&format!("{prefix}probe-{stamp}.txt")).map_err(|e| format!("probe key: {e}"))?;
    let body = Bytes::from(format!("fediedge canary probe {stamp}\n"));
    let meta = ObjectMeta {
        size: body.len() as u64,
        content_type: Some("text/plain".into()),
        etag: None,
        last_modified: None,
        md5: None,
    };
    primary
        .put_bytes(&key, body.clone(), &meta)
        .await
        .map_err(|e| format!("cannot write the probe into the primary: {e}"))?;
    if let Some(old) = previous.replace(key.clone()) {
        if let Err(e) = primary.delete(&old).await {
            tracing::debug!(error = %e, "canary: cannot delete the previous probe");
        }
    }
    fetch(client, target, &key, Some(&body)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(extra: &str) -> (Target, String) {
        let c = crate::config::from_str(extra, std::path::Path::new("t.toml")).unwrap();
        let t = Target::new("0.0.0.0:8080".parse().unwrap(), &c);
        let url = t.url(&Key::parse("a/b c.png").unwrap());
        (t, url)
    }

    #[test]
    fn the_canary_asks_as_a_browser_would() {
        let (t, url) = target("");
        assert_eq!(url, "http://127.0.0.1:8080/system/a/b%20c.png");
        assert_eq!(t.host, None);
        let (t, url) = target(
            "media_hosts = [\"files.example.social\"]\n[core]\nhosts = [\"example.social\"]\nweb = [\"127.0.0.1:3000\"]\n",
        );
        assert_eq!(url, "http://127.0.0.1:8080/a/b%20c.png");
        assert_eq!(t.host.as_deref(), Some("files.example.social"));
        let (t, url) = target("[core]\nhosts = [\"example.social\"]\nweb = [\"127.0.0.1:3000\"]\n");
        assert_eq!(url, "http://127.0.0.1:8080/system/a/b%20c.png");
        assert_eq!(t.host.as_deref(), Some("example.social"));
    }
}
