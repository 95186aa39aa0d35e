//! The HTTP server: media requests on `listen`, `/metrics` and `/healthz` on `admin_listen`.
//! [`crate::serve`] assembles what it needs and starts it.
//!
//! A media request goes: method check → key → cache → memory of recent misses → (direct read
//! of a local primary when there is no cache) → the flight table, which reads through the
//! chain of stores. See ARCHITECTURE.md for the whole flow.

mod body;
mod respond;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cache::{Cache, HitBody};
use crate::flight::{End, Flights};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::store::{ObjectMeta, StoreError, StoreHandle};

pub use respond::Body;
use respond::{Answer, Meta, Source};

/// Everything a media request needs.
pub struct Edge {
    prefix: String,
    cache: Option<Arc<Cache>>,
    /// The primary, when it is a local directory and there is no cache: served directly.
    direct: Option<StoreHandle>,
    /// Primary first, then fallbacks (for HEAD on a miss).
    chain: Vec<StoreHandle>,
    flights: Arc<Flights>,
    metrics: Metrics,
}

impl Edge {
    /// Assembles the request handler. `chain` is the primary followed by the fallbacks;
    /// `direct` is the primary when it is a local directory served without a cache.
    pub fn new(
        prefix: String,
        cache: Option<Arc<Cache>>,
        direct: Option<StoreHandle>,
        chain: Vec<StoreHandle>,
        flights: Arc<Flights>,
        metrics: Metrics,
    ) -> Edge {
        Edge {
            prefix,
            cache,
            direct,
            chain,
            flights,
            metrics,
        }
    }
}

/// The bound listeners and the tasks serving them.
pub struct Listening {
    /// Where media requests are answered.
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are answered.
    pub admin_addr: SocketAddr,
    /// The accept loops; they end when `stop` is cancelled.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Binds `listen` (media) and `admin_listen` (metrics, health) and serves until `stop`.
pub async fn listen(
    edge: Arc<Edge>,
    listen: SocketAddr,
    admin_listen: SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<Listening> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("cannot listen on {admin_listen} (admin_listen)"))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let e = edge.clone();
    let media = tokio::spawn(accept_loop(listener, stop.clone(), move |req| {
        let e = e.clone();
        async move { Ok::<_, Infallible>(e.handle(req).await) }
    }));
    let metrics = edge.metrics.clone();
    let admin = tokio::spawn(accept_loop(admin, stop, move |req| {
        let m = metrics.clone();
        async move { Ok::<_, Infallible>(admin_handle(&m, req)) }
    }));
    Ok(Listening {
        addr,
        admin_addr,
        tasks: vec![media, admin],
    })
}

async fn accept_loop<F, Fut>(listener: TcpListener, stop: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that sends no complete header block in 30 s is dropped.
                .header_read_timeout(std::time::Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service_fn(handler));
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn admin_handle(metrics: &Metrics, req: Request<Incoming>) -> Response<Body> {
    use http_body_util::{BodyExt, Full};
    let (code, ctype, text) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    resp
}

fn meta_for(key: &Key, m: &ObjectMeta) -> Meta {
    Meta {
        size: m.size,
        content_type: m
            .content_type
            .clone()
            .unwrap_or_else(|| key.guess_content_type().to_owned()),
        etag: m.etag.clone(),
        last_modified: m.last_modified,
    }
}

fn store_error(e: &StoreError) -> Answer {
    if e.is_timeout() {
        respond::status(StatusCode::GATEWAY_TIMEOUT, "ERROR", "no-store")
    } else {
        respond::status(StatusCode::BAD_GATEWAY, "ERROR", "no-store")
    }
}

impl Edge {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let answer = self.route(req).await;
        self.metrics
            .request(answer.resp.status().as_u16(), answer.cache_status);
        self.metrics.response_bytes(answer.body_bytes);
        answer.resp
    }

    async fn route(&self, req: Request<Incoming>) -> Answer {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return respond::status(StatusCode::METHOD_NOT_ALLOWED, "BYPASS", "no-store"),
        };
        let key = match Key::from_request_path(req.uri().path(), &self.prefix) {
            Ok(Some(key)) => key,
            Ok(None) => return respond::status(StatusCode::NOT_FOUND, "BYPASS", "no-store"),
            Err(e) => {
                tracing::debug!(path = req.uri().path(), error = %e, "refused key");
                return respond::status(StatusCode::BAD_REQUEST, "BYPASS", "no-store");
            }
        };
        let headers = req.headers();

        if let Some(cache) = &self.cache {
            if let Some(hit) = cache.lookup(&key).await {
                let meta = meta_for(&key, &hit.meta);
                let source = match hit.body {
                    HitBody::Memory(b) => Source::Memory(b),
                    HitBody::File(f) => Source::File(f),
                };
                return respond::object(headers, head, meta, source, "HIT");
            }
        }
        if self.flights.negative().contains(&key) {
            return not_found("HIT");
        }
        if let Some(direct) = &self.direct {
            match direct.open_file(&key).await {
                Ok(Some((file, m))) => {
                    let source = Source::File(Arc::new(file));
                    return respond::object(headers, head, meta_for(&key, &m), source, "BYPASS");
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(key = %key, error = %e, "primary read failed"),
            }
        }
        if head {
            return self.head_miss(headers, &key).await;
        }

        let mut rx = self.flights.join(&key);
        let state = match rx
            .wait_for(|s| s.started.is_some() || s.end.is_some())
            .await
        {
            Ok(s) => s.clone(),
            Err(_) => return store_error(&StoreError::backend("edge", "fetch task lost")),
        };
        match (state.started, state.end) {
            (Some(started), _) => {
                let cache_status = if started.from_fallback {
                    "FALLBACK"
                } else {
                    "MISS"
                };
                let meta = meta_for(&key, &started.meta);
                let source = Source::Flight(started.file.clone(), rx);
                respond::object(headers, false, meta, source, cache_status)
            }
            (None, Some(End::NotFound)) => not_found("MISS"),
            (None, Some(End::Failed(e))) => store_error(&e),
            (None, _) => store_error(&StoreError::backend("edge", "fetch ended early")),
        }
    }

    /// HEAD of a key not in the cache: ask the stores for metadata only (no fetch, no copy).
    async fn head_miss(&self, headers: &http::HeaderMap, key: &Key) -> Answer {
        let mut last_error = None;
        for (i, store) in self.chain.iter().enumerate() {
            match store.head(key).await {
                Ok(Some(m)) => {
                    let source = Source::Memory(Bytes::new());
                    let cache_status = if i > 0 { "FALLBACK" } else { "MISS" };
                    return respond::object(headers, true, meta_for(key, &m), source, cache_status);
                }
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) => store_error(&e),
            None => {
                self.flights.negative().insert(key);
                not_found("MISS")
            }
        }
    }
}

fn not_found(cache_status: &'static str) -> Answer {
    // Browsers and CDNs may remember a miss briefly, never for the media's year.
    respond::status(StatusCode::NOT_FOUND, cache_status, "public, max-age=10")
}
