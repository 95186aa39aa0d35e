//! Mastodon's cache buster: a request that evicts its own URL from this edge's caches.
//!
//! When media is deleted, Mastodon (`CACHE_BUSTER_ENABLED=true`) sends
//! `CACHE_BUSTER_HTTP_METHOD` (default `GET`) to the media URL with the header
//! `CACHE_BUSTER_SECRET_HEADER: CACHE_BUSTER_SECRET`. [`CacheBuster::intercept`] runs in
//! `serve::front_door` before the media handler and the proxy:
//!
//! - the configured method with the secret header: the secret is compared in constant time
//!   (SHA-256 of both, so not even its length leaks); right → every [`Purge`] target drops
//!   the URL, `200` with the count; wrong → `403`, nothing evicted;
//! - the configured method without the header: a `GET`, `HEAD`, `POST`, `PUT`, `PATCH` or
//!   `DELETE` is an ordinary request (readers `GET` media, clients `POST` to core) and goes
//!   on; any other method (e.g. `PURGE`) is `403`;
//! - anything else goes on.
//!
//! The secret is never logged. Targets are called on a blocking thread (they unlink files).
//! A purge from Mastodon is then passed on to the other edges (`peers`, [`peers`]); one
//! passed on by an edge carries [`peers::FORWARDED`] and goes no further.

pub mod peers;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::cache::Cache;
use crate::config::CacheBusterConfig;
use crate::key::Key;
use crate::listen::Body;
use crate::metrics::Metrics;
use crate::router::{Route, SharedRouter};

/// A cache that can drop a URL. The media cache implements it ([`MediaPurge`]); the core
/// cache plugs in the same way.
pub trait Purge: Send + Sync {
    /// Drops what is cached for `host` (as the client sent it, maybe with a port) and
    /// `path_and_query`; how many entries were dropped.
    fn purge(&self, host: &str, path_and_query: &str) -> usize;
}

/// The media cache as a purge target: the URL is mapped to its key as the media handler
/// maps it (the router's media routes, the prefix, percent-decoding).
pub struct MediaPurge {
    /// The front door's router (the one in use: a reload may change the hosts).
    pub router: SharedRouter,
    /// `url_prefix`.
    pub prefix: String,
    /// The cache.
    pub cache: Arc<Cache>,
}

impl Purge for MediaPurge {
    fn purge(&self, host: &str, path_and_query: &str) -> usize {
        let path = path_and_query.split('?').next().unwrap_or_default();
        let prefix = match self.router.get().route_to(Some(host), path) {
            Route::Media => self.prefix.as_str(),
            Route::MediaRoot => "/",
            _ => return 0,
        };
        match Key::from_request_path(path, prefix) {
            Ok(Some(key)) => usize::from(self.cache.purge(&key)),
            _ => 0,
        }
    }
}

/// The purge-request check and its targets.
pub struct CacheBuster {
    method: Method,
    header: http::HeaderName,
    secret: [u8; 32],
    targets: Vec<Arc<dyn Purge>>,
    peers: peers::Peers,
    metrics: Metrics,
}

impl CacheBuster {
    /// From `[cache_buster]`, purging `targets`; starts the tasks passing purges on to the
    /// peers (so it needs a runtime when there are peers).
    pub fn new(
        config: &CacheBusterConfig,
        targets: Vec<Arc<dyn Purge>>,
        metrics: Metrics,
    ) -> CacheBuster {
        CacheBuster {
            method: config.http_method.clone(),
            header: config.secret_header.clone(),
            secret: Sha256::digest(config.secret.as_bytes()).into(),
            targets,
            peers: peers::Peers::start(config, metrics.clone()),
            metrics,
        }
    }

    /// Adds a target (the core cache, when there is one).
    pub fn add_target(&mut self, target: Arc<dyn Purge>) {
        self.targets.push(target);
    }

    /// `Some(answer)` for a purge request (done or refused); `None`: not one, serve it.
    pub async fn intercept<B>(&self, req: &Request<B>) -> Option<Response<Body>> {
        if req.method() != self.method {
            return None;
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let Some(given) = req.headers().get(&self.header) else {
            let ordinary = matches!(
                *req.method(),
                Method::GET
                    | Method::HEAD
                    | Method::POST
                    | Method::PUT
                    | Method::PATCH
                    | Method::DELETE
            );
            if ordinary {
                return None;
            }
            tracing::warn!(%path, "cache buster: refused, no secret header");
            self.metrics.cache_buster("refused");
            return Some(answer(StatusCode::FORBIDDEN, "403 Forbidden\n".into()));
        };
        let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        if !bool::from(given.ct_eq(&self.secret)) {
            tracing::warn!(%path, "cache buster: refused, wrong secret");
            self.metrics.cache_buster("refused");
            return Some(answer(StatusCode::FORBIDDEN, "403 Forbidden\n".into()));
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default()
            .to_owned();
        let targets = self.targets.clone();
        let (h, p) = (host.clone(), path.clone());
        let purged = tokio::task::spawn_blocking(move || {
            targets.iter().map(|t| t.purge(&h, &p)).sum::<usize>()
        })
        .await
        .unwrap_or(0);
        let forwarded = req.headers().contains_key(peers::FORWARDED);
        tracing::info!(%host, %path, purged, forwarded, "cache buster: purged");
        self.metrics.cache_buster("purged");
        if forwarded || self.peers.is_empty() {
            return Some(answer(StatusCode::OK, format!("purged {purged}\n")));
        }
        self.peers.pass_on(&host, &path);
        Some(answer(
            StatusCode::OK,
            format!("purged {purged}\npassed on to {} peers\n", self.peers.len()),
        ))
    }
}

fn answer(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(parking_lot::Mutex<Vec<(String, String)>>);
    impl Purge for Count {
        fn purge(&self, host: &str, path_and_query: &str) -> usize {
            self.0.lock().push((host.into(), path_and_query.into()));
            1
        }
    }

    fn buster(method: &str) -> (CacheBuster, Arc<Count>) {
        let config = CacheBusterConfig {
            http_method: Method::from_bytes(method.as_bytes()).unwrap(),
            secret_header: http::HeaderName::from_static("x-buster"),
            secret: "s3cret".into(),
            peers: Vec::new(),
        };
        let count = Arc::new(Count(Default::default()));
        let b = CacheBuster::new(&config, vec![count.clone()], Metrics::new());
        (b, count)
    }

    fn req(method: &str, secret: Option<&str>) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri("/system/a/b.png?x=1")
            .header("host", "example.social");
        if let Some(s) = secret {
            b = b.header("x-buster", s);
        }
        b.body(()).unwrap()
    }

    #[tokio::test]
    async fn only_the_right_secret_purges() {
        let (b, count) = buster("GET");
        assert!(b.intercept(&req("GET", None)).await.is_none(), "a reader");
        assert!(b.intercept(&req("HEAD", Some("s3cret"))).await.is_none());
        for wrong in ["", "s3cre", "s3cret ", "S3CRET", "s3cretx"] {
            let r = b.intercept(&req("GET", Some(wrong))).await.unwrap();
            assert_eq!(r.status(), 403, "{wrong:?}");
        }
        assert!(count.0.lock().is_empty());
        let r = b.intercept(&req("GET", Some("s3cret"))).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            *count.0.lock(),
            [(
                "example.social".to_owned(),
                "/system/a/b.png?x=1".to_owned()
            )]
        );
    }

    /// Log lines captured in memory.
    #[derive(Clone, Default)]
    struct Logs(Arc<parking_lot::Mutex<Vec<u8>>>);
    impl std::io::Write for Logs {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn neither_the_secret_nor_a_wrong_guess_is_logged() {
        let logs = Logs::default();
        let l = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || l.clone())
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (b, _) = buster("GET");
        b.intercept(&req("GET", Some("wrong-guess"))).await.unwrap();
        b.intercept(&req("GET", Some("s3cret"))).await.unwrap();
        let (p, _) = buster("PURGE");
        p.intercept(&req("PURGE", None)).await.unwrap();
        let text = String::from_utf8(logs.0.lock().clone()).unwrap();
        assert!(
            text.contains("cache buster: refused, wrong secret"),
            "{text}"
        );
        assert!(text.contains("cache buster: purged"), "{text}");
        assert!(text.contains("no secret header"), "{text}");
        assert!(
            !text.contains("s3cret") && !text.contains("wrong-guess"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_custom_method_without_the_header_is_refused() {
        let (b, count) = buster("PURGE");
        let r = b.intercept(&req("PURGE", None)).await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(b.intercept(&req("GET", Some("s3cret"))).await.is_none());
        assert!(count.0.lock().is_empty());
        let r = b.intercept(&req("PURGE", Some("s3cret"))).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(count.0.lock().len(), 1);
    }
}
