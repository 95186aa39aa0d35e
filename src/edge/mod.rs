//! The media handler: GET and HEAD of media keys. [`crate::serve`] assembles what it needs
//! and hands it to the [`crate::listen`] listeners.
//!
//! A media request goes: method check → key → cache → memory of recent misses → (direct read
//! of a local primary when there is no cache) → the flight table, which reads through the
//! chain of stores. See ARCHITECTURE.md for the whole flow.

mod body;
mod respond;

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::cache::{Cache, HitBody};
use crate::flight::{End, Flights, Through};
use crate::key::Key;
use crate::metrics::{CacheStatus, Metrics};
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

/// What a 503 asks the client to wait, in seconds.
const RETRY_AFTER_SECS: u64 = 2;

fn meta_for<'a>(key: &Key, m: &'a ObjectMeta) -> Meta<'a> {
    Meta {
        size: m.size,
        content_type: m
            .content_type
            .as_deref()
            .unwrap_or_else(|| key.guess_content_type()),
        etag: m.etag.as_deref(),
        last_modified: m.last_modified,
    }
}

fn store_error(e: &StoreError) -> Answer {
    if e.is_timeout() {
        respond::status(StatusCode::GATEWAY_TIMEOUT, CacheStatus::Error, "no-store")
    } else {
        respond::status(StatusCode::BAD_GATEWAY, CacheStatus::Error, "no-store")
    }
}

impl Edge {
    /// Answers one media request (any method; only GET and HEAD are served).
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
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
            _ => {
                return respond::status(
                    StatusCode::METHOD_NOT_ALLOWED,
                    CacheStatus::Bypass,
                    "no-store",
                )
            }
        };
        let key = match Key::from_request_path(req.uri().path(), &self.prefix) {
            Ok(Some(key)) => key,
            Ok(None) => {
                return respond::status(StatusCode::NOT_FOUND, CacheStatus::Bypass, "no-store")
            }
            Err(e) => {
                tracing::debug!(path = req.uri().path(), error = %e, "refused key");
                return respond::status(StatusCode::BAD_REQUEST, CacheStatus::Bypass, "no-store");
            }
        };
        let headers = req.headers();

        if let Some(cache) = &self.cache {
            if let Some(hit) = cache.lookup(&key).await {
                let source = match hit.body {
                    HitBody::Memory(b) => Source::Memory(b),
                    HitBody::File(f) => Source::File(f),
                };
                let meta = || meta_for(&key, &hit.meta);
                return respond::hit(headers, head, hit.meta.size, meta, source, &hit.head);
            }
        }
        if self.flights.negative().contains(&key) {
            return not_found(CacheStatus::Hit);
        }
        if let Some(direct) = &self.direct {
            match direct.open_file(&key).await {
                Ok(Some((file, m))) => {
                    let source = Source::File(Arc::new(file));
                    return respond::object(
                        headers,
                        head,
                        meta_for(&key, &m),
                        source,
                        CacheStatus::Bypass,
                    );
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
                    CacheStatus::Fallback
                } else {
                    CacheStatus::Miss
                };
                let meta = meta_for(&key, &started.meta);
                let source = Source::Flight(started.body.clone(), rx);
                respond::object(headers, false, meta, source, cache_status)
            }
            (None, Some(End::NotFound)) => not_found(CacheStatus::Miss),
            (None, Some(End::Failed(e))) => store_error(&e),
            (None, Some(End::Busy)) => {
                self.metrics.overloaded();
                respond::busy(RETRY_AFTER_SECS)
            }
            (None, Some(End::NoRoom)) => self.stream_through(headers, &key).await,
            (None, _) => store_error(&StoreError::backend("edge", "fetch ended early")),
        }
    }

    /// A body no local disk or memory can hold: fetched for this client alone and kept
    /// nowhere, within `max_flights` (503 past it).
    async fn stream_through(&self, headers: &http::HeaderMap, key: &Key) -> Answer {
        match self.flights.stream_through(key).await {
            Ok(Through::Found(m, from_fallback, body)) => {
                let cache_status = if from_fallback {
                    CacheStatus::Fallback
                } else {
                    CacheStatus::Miss
                };
                respond::object(
                    headers,
                    false,
                    meta_for(key, &m),
                    Source::Stream(body),
                    cache_status,
                )
            }
            Ok(Through::NotFound) => not_found(CacheStatus::Miss),
            Ok(Through::Busy) => {
                self.metrics.overloaded();
                respond::busy(RETRY_AFTER_SECS)
            }
            Err(e) => store_error(&e),
        }
    }

    /// HEAD of a key not in the cache: ask the stores for metadata only (no fetch, no copy).
    async fn head_miss(&self, headers: &http::HeaderMap, key: &Key) -> Answer {
        let mut last_error = None;
        for (i, store) in self.chain.iter().enumerate() {
            match store.head(key).await {
                Ok(Some(m)) => {
                    let source = Source::Memory(Bytes::new());
                    let cache_status = if i > 0 {
                        CacheStatus::Fallback
                    } else {
                        CacheStatus::Miss
                    };
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
                not_found(CacheStatus::Miss)
            }
        }
    }
}

fn not_found(cache_status: CacheStatus) -> Answer {
    // Browsers and CDNs may remember a miss briefly, never for the media's year.
    respond::status(StatusCode::NOT_FOUND, cache_status, "public, max-age=10")
}
