//! Answers from what is stored: a fresh hit by the fast way (no policy bookkeeping), a
//! stored entry served (whole, a range, or a 304 to the client's own validators), and a
//! follower's answer from the leader's response still being received.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, StreamBody};
use http_cache_semantics::BeforeRequest;
use hyper::body::Incoming;

use super::fill::Shared;
use super::hit::{self, age_value, X_CACHE_STATUS};
use super::store::{Entry, StoredBody};
use super::{policy, status_only, CoreCache, Url};
use crate::compress::Mode;
use crate::listen::{empty, Body};
use crate::metrics::CacheStatus;

/// What a client asked of a stored answer besides its URL.
#[derive(Clone, Copy)]
pub(super) struct Asked {
    /// A HEAD: the head only.
    pub head: bool,
    /// What the front door does about gzip for this client.
    pub gzip: Mode,
}

impl CoreCache {
    /// A follower's answer from the leader's response still being received, if it is fresh
    /// for this request (its `Vary` matches).
    pub(super) fn serve_shared(
        &self,
        shared: &Arc<Shared>,
        preq: &http::request::Parts,
        req: &Request<Incoming>,
        head: bool,
    ) -> Option<Response<Body>> {
        let now = SystemTime::now();
        let meta = &shared.meta;
        if !matches!(
            meta.policy.before_request(preq, now),
            BeforeRequest::Fresh(_)
        ) {
            return None;
        }
        let mut headers = meta.headers.clone();
        headers.insert(
            header::AGE,
            HeaderValue::from(meta.policy.age(now).as_secs()),
        );
        let code = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        if code == StatusCode::OK && policy::not_modified(req.headers(), &meta.headers) {
            headers.remove(header::CONTENT_LENGTH);
            let mut resp = status_only(StatusCode::NOT_MODIFIED);
            *resp.headers_mut() = headers;
            return Some(self.finish(resp, CacheStatus::Hit));
        }
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(meta.len));
        let body = match head {
            true => empty(),
            false => shared.body(),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        Some(self.finish(resp, CacheStatus::Hit))
    }

    /// The hit of a hot URL without the policy's bookkeeping: `before_request` builds (and
    /// copies the headers of) a request and a response on every call, which a fresh hit
    /// throws away. Taken only where the full way would ask the policy (a GET or HEAD
    /// without `Upgrade`, credentials or a body: see [`Self::handle_full`]) and its answer
    /// is `before_request`'s `Fresh`: the request sets no freshness of its own (no
    /// `Cache-Control`, no `Pragma`), its `Host` header is the stored request's, byte for
    /// byte (as the crate compares it), and the stored responses, in the order the full
    /// path tries them, carry no `Vary` until a fresh one (`is_stale`, read back once per
    /// entry by [`hit::Hot`], covers the response's `no-cache` and `max-age=0`). Anything
    /// else goes the full way. One index lookup (the URL's key hashed once), one clock
    /// read, the head cloned from the entry's. Tests: `tests/it/corecache_hit.rs`.
    pub(super) async fn fresh_without_vary(
        &self,
        req: &Request<Incoming>,
        url: &Url,
        gzip: Mode,
    ) -> Option<Response<Body>> {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        let h = req.headers();
        if h.contains_key(header::UPGRADE)
            || policy::private_request(h).is_some()
            || !req.body().is_end_stream()
            || h.contains_key(header::CACHE_CONTROL)
            || h.contains_key(header::PRAGMA)
        {
            return None;
        }
        // The Surrogate-Capability the full way adds changes none of what is read here.
        let raw_host = h.get(header::HOST).map(|v| v.as_bytes());
        let now = SystemTime::now();
        let e = self.store.fresh_hit(&url.key, url.scheme?, raw_host, now)?;
        let stored = self.store.body(&e.id, e.meta.len).await.ok()?;
        self.answer(&e, stored, h, Asked { head, gzip }, CacheStatus::Hit, now)
            .await
    }

    /// A stored response for a client (None if its body is gone meanwhile).
    pub(super) async fn serve(
        &self,
        e: &Entry,
        req: &HeaderMap,
        asked: Asked,
        status: CacheStatus,
    ) -> Option<Response<Body>> {
        let stored = self.store.body(&e.id, e.meta.len).await.ok()?;
        self.store.touch(&e.id);
        self.answer(e, stored, req, asked, status, SystemTime::now())
            .await
    }

    /// The answer from a stored response and its body, `Age` as of `now`. A whole body the
    /// memory tier holds goes to a client that takes gzip as its gzipped copy, made once
    /// (`Store::gzipped`) when `compress` would compress it.
    pub(super) async fn answer(
        &self,
        e: &Entry,
        stored: StoredBody,
        req: &HeaderMap,
        asked: Asked,
        status: CacheStatus,
        now: SystemTime,
    ) -> Option<Response<Body>> {
        let head = asked.head;
        let vary = asked.gzip != Mode::Off;
        let mut headers = match e.meta.hot(now) {
            Some(hot) => {
                let mut h = hot.head(vary).clone();
                h.insert(header::AGE, age_value(hot.age(now).as_secs()));
                h
            }
            None => {
                let mut h = hit::plain_head(&e.meta);
                if vary {
                    crate::compress::vary(e.meta.status, &mut h);
                }
                h.insert(header::AGE, age_value(e.meta.policy.age(now).as_secs()));
                h
            }
        };
        let code = StatusCode::from_u16(e.meta.status).unwrap_or(StatusCode::OK);
        if code == StatusCode::OK && policy::not_modified(req, &e.meta.headers) {
            headers.remove(header::CONTENT_LENGTH);
            let mut resp = status_only(StatusCode::NOT_MODIFIED);
            *resp.headers_mut() = headers;
            return Some(self.count(resp, status));
        }
        let (mut start, mut end) = (0, e.meta.len);
        let mut code = code;
        // Range is defined for GET only (RFC 9110 §14.2): a HEAD gets the whole answer's head.
        if code == StatusCode::OK && !head {
            match requested_range(req, &e.meta.headers, e.meta.len) {
                Ok(None) => {}
                Ok(Some((s, n))) => {
                    (start, end, code) = (s, n, StatusCode::PARTIAL_CONTENT);
                    let range = format!("bytes {s}-{}/{}", n - 1, e.meta.len);
                    headers.insert(header::CONTENT_RANGE, range.parse().ok()?);
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
                }
                Err(()) => {
                    let mut resp = status_only(StatusCode::RANGE_NOT_SATISFIABLE);
                    let range = format!("bytes */{}", e.meta.len);
                    resp.headers_mut()
                        .insert(header::CONTENT_RANGE, range.parse().ok()?);
                    return Some(self.finish(resp, status));
                }
            }
        }
        if asked.gzip == Mode::Takes && code == StatusCode::OK && (start, end) == (0, e.meta.len) {
            if let Some((headers, gz)) = self.gzipped(e, &stored, now) {
                let body = match head {
                    true => empty(),
                    false => Full::new(gz).map_err(|e| match e {}).boxed_unsync(),
                };
                let mut resp = Response::new(body);
                *resp.headers_mut() = headers;
                return Some(self.count(resp, status));
            }
        }
        let body = if head {
            empty()
        } else {
            match stored {
                StoredBody::Memory(bytes) => Full::new(bytes.slice(start as usize..end as usize))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
                StoredBody::File(mut file) => {
                    use tokio::io::{AsyncReadExt, AsyncSeekExt};
                    if start > 0 {
                        file.seek(std::io::SeekFrom::Start(start)).await.ok()?;
                    }
                    let stream = tokio_util::io::ReaderStream::with_capacity(
                        file.take(end - start),
                        64 * 1024,
                    );
                    StreamBody::new(futures_util::StreamExt::map(stream, |r| {
                        r.map(http_body::Frame::data)
                    }))
                    .boxed_unsync()
                }
            }
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = code;
        *resp.headers_mut() = headers;
        Some(self.count(resp, status))
    }

    /// The head (`Age` as of `now`) and body of an entry's gzipped copy, if it has one: its
    /// body in the memory tier, a head `compress` would compress, and gzip making it smaller.
    fn gzipped(
        &self,
        e: &Entry,
        stored: &StoredBody,
        now: SystemTime,
    ) -> Option<(HeaderMap, Bytes)> {
        let StoredBody::Memory(identity) = stored else {
            return None;
        };
        let hot = e.meta.hot(now)?;
        if !hot.compressible {
            return None;
        }
        let gz = self.store.gzipped(&e.id, identity)?;
        let mut head = hot
            .gzip_head
            .get_or_init(|| crate::compress::gzip_head(hot.head(true), gz.len()))
            .clone();
        head.insert(header::AGE, age_value(hot.age(now).as_secs()));
        Some((head, gz))
    }

    /// [`Self::finish`] for a head made by [`hit::plain_head`] (no `Surrogate-Control`,
    /// `X-Cache-Status: HIT`).
    pub(super) fn count(&self, mut resp: Response<Body>, status: CacheStatus) -> Response<Body> {
        self.metrics.core_cache(status);
        if status != CacheStatus::Hit {
            resp.headers_mut()
                .insert(X_CACHE_STATUS, HeaderValue::from_static(status.as_str()));
        }
        resp
    }
}

/// The one byte range `[start, end)` a request asks of a stored body of `len` bytes: None
/// for the whole body (no `Range`, a malformed one, several ranges, or an `If-Range` that
/// is not the stored strong ETag), Err when unsatisfiable (416). As `edge::respond` does for
/// media, on this room's stored headers.
pub(super) fn requested_range(
    req: &HeaderMap,
    stored: &HeaderMap,
    len: u64,
) -> Result<Option<(u64, u64)>, ()> {
    use http_range_header::RangeUnsatisfiableError as E;
    let Some(range) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let etag = stored.get(header::ETAG).and_then(|v| v.to_str().ok());
        if if_range.starts_with("W/") || etag != Some(if_range) {
            return Ok(None);
        }
    }
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        Err(E::ZeroSuffix) => return Err(()),
        Err(_) => return Ok(None),
    };
    if len == 0 {
        return Err(());
    }
    match parsed.validate(len) {
        Ok(ranges) if ranges.len() == 1 => Ok(Some((*ranges[0].start(), *ranges[0].end() + 1))),
        Ok(_) => Ok(None),
        Err(E::FileSuffixOutOfBounds) => Ok(Some((0, len))),
        Err(_) => Err(()),
    }
}
