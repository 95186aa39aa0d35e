//! Building media responses: conditional requests, Range, and Mastodon's media headers.

use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use super::body::{read_flight, read_range, slice_stream};
use crate::flight::{FlightBody, FlightState};
use crate::metrics::CacheStatus;

/// The response body type of every answer.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

/// Mastodon's media headers (`dist/nginx.conf` and the object-storage docs).
const CACHE_CONTROL: &str = "public, max-age=315576000, immutable";
const CSP: &str = "default-src 'none'; form-action 'none'";

/// What a response says about its object.
/// Borrowed from the cache entry or the flight: a hit costs no copy of these strings.
pub struct Meta<'a> {
    /// Body length.
    pub size: u64,
    /// Content-Type (already defaulted from the extension).
    pub content_type: &'a str,
    /// Entity tag.
    pub etag: Option<&'a str>,
    /// Last modification.
    pub last_modified: Option<SystemTime>,
}

/// Where the body comes from.
pub enum Source {
    /// Shared bytes in memory.
    Memory(Bytes),
    /// A complete file.
    File(Arc<File>),
    /// A body a flight is still fetching (in a temp file, or in memory when the disk failed).
    Flight(Arc<FlightBody>, watch::Receiver<FlightState>),
    /// A body streamed straight from its source to this one client (a full disk and no room
    /// in memory); the stream holds back its last chunk until the body is verified.
    Stream(crate::store::ByteStream),
}

/// A response with what the metrics need to know of it.
pub struct Answer {
    /// The response.
    pub resp: Response<Body>,
    /// Body bytes it will send.
    pub body_bytes: u64,
    /// Its `X-Cache-Status`.
    pub cache_status: CacheStatus,
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A plain-text error or status answer; `cache_status` goes into `X-Cache-Status`.
pub fn status(code: StatusCode, cache_status: CacheStatus, cache_control: &'static str) -> Answer {
    let text = format!("{}\n", code.canonical_reason().unwrap_or(""));
    let mut resp = Response::new(full(Bytes::from(text)));
    *resp.status_mut() = code;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(cache_control),
    );
    h.insert(
        CacheStatus::HEADER,
        HeaderValue::from_static(cache_status.as_str()),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if code == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    Answer {
        resp,
        body_bytes: 0,
        cache_status,
    }
}

/// 503 with `Retry-After`: the edge is at its limits and the client should come back soon.
pub fn busy(retry_after_secs: u64) -> Answer {
    let mut answer = status(
        StatusCode::SERVICE_UNAVAILABLE,
        CacheStatus::Busy,
        "no-store",
    );
    answer
        .resp
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    answer
}

/// Builds the answer for an object: 304, 416, 206 or 200, with every media header.
pub fn object(
    req: &HeaderMap,
    head: bool,
    meta: Meta<'_>,
    source: Source,
    cache_status: CacheStatus,
) -> Answer {
    // Sized for every header below: no regrowth on the hot path.
    let mut headers = HeaderMap::with_capacity(16);
    media_headers(&mut headers, &meta, cache_status);
    if not_modified(req, &meta) {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        headers.remove(header::CONTENT_TYPE);
        *resp.headers_mut() = headers;
        return Answer {
            resp,
            body_bytes: 0,
            cache_status,
        };
    }
    // Range is defined for GET only (RFC 9110 §14.2): a HEAD gets the whole object's head.
    let range = match requested_range(req, &meta) {
        _ if head => None,
        Ok(r) => r,
        Err(()) => {
            let mut answer = status(StatusCode::RANGE_NOT_SATISFIABLE, cache_status, "no-store");
            answer.resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{}", meta.size)).expect("ascii"),
            );
            return answer;
        }
    };
    let (code, start, end) = match range {
        Some((start, end)) => {
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{}/{}", end - 1, meta.size))
                    .expect("ascii"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end)
        }
        None => (StatusCode::OK, 0, meta.size),
    };
    let len = end - start;
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    let body = if head {
        empty()
    } else {
        body_of(source, start, end)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    *resp.headers_mut() = headers;
    Answer {
        resp,
        body_bytes: if head { 0 } else { len },
        cache_status,
    }
}

/// A cache hit. A request for the whole body without conditions (no `Range`, `If-None-Match`
/// or `If-Modified-Since`: nearly every hit) gets a clone of the head `memo` keeps for the
/// entry, built on its first such hit; any other is answered by [`object`]. `meta` is called
/// only when the head is built (it may guess a Content-Type).
pub fn hit<'a>(
    req: &HeaderMap,
    head: bool,
    size: u64,
    meta: impl FnOnce() -> Meta<'a>,
    source: Source,
    memo: &OnceLock<HeaderMap>,
) -> Answer {
    // One pass over the request's few header names (standard names compare as small
    // integers) rather than three hashed lookups.
    let conditional = req.keys().any(|name| {
        name == header::RANGE || name == header::IF_NONE_MATCH || name == header::IF_MODIFIED_SINCE
    });
    if conditional {
        return object(req, head, meta(), source, CacheStatus::Hit);
    }
    let headers = memo
        .get_or_init(|| {
            let mut h = HeaderMap::with_capacity(16);
            media_headers(&mut h, &meta(), CacheStatus::Hit);
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            h
        })
        .clone();
    let body = if head {
        empty()
    } else {
        body_of(source, 0, size)
    };
    let mut resp = Response::new(body);
    *resp.headers_mut() = headers;
    Answer {
        resp,
        body_bytes: if head { 0 } else { size },
        cache_status: CacheStatus::Hit,
    }
}

/// The bytes `start..end` of `source`.
fn body_of(source: Source, start: u64, end: u64) -> Body {
    match source {
        Source::Memory(bytes) => full(bytes.slice(start as usize..end as usize)),
        Source::File(file) => stream(read_range(file, start, end, None)),
        Source::Flight(body, rx) => stream(read_flight(body, start, end, rx)),
        Source::Stream(s) => stream(slice_stream(s, start, end)),
    }
}

fn stream(s: impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static) -> Body {
    StreamBody::new(s.map_ok(Frame::data)).boxed_unsync()
}

fn media_headers(h: &mut HeaderMap, meta: &Meta, cache_status: CacheStatus) {
    if let Ok(v) = HeaderValue::from_str(meta.content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Some(v) = meta.etag.and_then(|e| HeaderValue::from_str(e).ok()) {
        h.insert(header::ETAG, v);
    }
    if let Some(t) = meta.last_modified {
        h.insert(header::LAST_MODIFIED, http_date(t));
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_CONTROL),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        CacheStatus::HEADER,
        HeaderValue::from_static(cache_status.as_str()),
    );
}

/// An IMF-fixdate (29 bytes) formatted on the stack: one copy into the header value instead of
/// `fmt_http_date`'s String and a second copy.
fn http_date(t: SystemTime) -> HeaderValue {
    use std::io::Write as _;
    let mut buf = [0u8; 32];
    let mut cursor = io::Cursor::new(&mut buf[..]);
    write!(cursor, "{}", httpdate::HttpDate::from(t)).expect("an HTTP date fits 32 bytes");
    let n = cursor.position() as usize;
    HeaderValue::from_bytes(&buf[..n]).expect("ascii")
}

/// RFC 9110 §13.1.2 / §13.1.3: If-None-Match wins over If-Modified-Since.
fn not_modified(req: &HeaderMap, meta: &Meta) -> bool {
    if let Some(inm) = req.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(etag) = meta.etag else {
            return inm.trim() == "*";
        };
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || weak_eq(t, etag));
    }
    if let (Some(ims), Some(lm)) = (
        req.get(header::IF_MODIFIED_SINCE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok()),
        meta.last_modified,
    ) {
        // HTTP dates have whole seconds.
        let lm_secs = lm
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let ims_secs = ims
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        return lm_secs <= ims_secs;
    }
    false
}

fn weak_eq(a: &str, b: &str) -> bool {
    a.trim_start_matches("W/") == b.trim_start_matches("W/")
}

/// The one range to send, as `start..end`; `Ok(None)` for the whole body (no Range, a
/// malformed one, several ranges, or an If-Range that no longer matches); `Err` for 416.
fn requested_range(req: &HeaderMap, meta: &Meta) -> Result<Option<(u64, u64)>, ()> {
    use http_range_header::RangeUnsatisfiableError as E;
    let Some(range) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if let Some(if_range) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        // Only a strong ETag match keeps the range (a date If-Range is treated as a mismatch).
        if if_range.starts_with("W/") || meta.etag != Some(if_range) {
            return Ok(None);
        }
    }
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        Err(E::ZeroSuffix) => return Err(()),
        Err(_) => return Ok(None), // Malformed: ignore the header (RFC 9110 §14.2).
    };
    if meta.size == 0 {
        return Err(());
    }
    match parsed.validate(meta.size) {
        Ok(ranges) if ranges.len() == 1 => {
            let r = &ranges[0];
            Ok(Some((*r.start(), *r.end() + 1)))
        }
        Ok(_) => Ok(None),
        // A suffix longer than the body means the whole body (RFC 9110 §14.1.2).
        Err(E::FileSuffixOutOfBounds) => Ok(Some((0, meta.size))),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(size: u64) -> Meta<'static> {
        Meta {
            size,
            content_type: "image/png",
            etag: Some("\"abc\""),
            last_modified: Some(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
            ),
        }
    }

    fn req(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// A plain hit answers exactly what `object` answers; a conditional or ranged one is
    /// answered by `object` itself, never from the kept head.
    #[test]
    fn a_hit_reuses_the_kept_head_only_for_plain_requests() {
        let memo = OnceLock::new();
        let body = || Source::Memory(Bytes::from_static(b"0123456789"));
        let built = std::cell::Cell::new(0);
        let m = || {
            built.set(built.get() + 1);
            meta(10)
        };
        let slow = object(&req(&[]), false, meta(10), body(), CacheStatus::Hit);
        for _ in 0..3 {
            let fast = hit(&req(&[("accept", "*/*")]), false, 10, m, body(), &memo);
            assert_eq!(fast.resp.status(), StatusCode::OK);
            assert_eq!(fast.resp.headers(), slow.resp.headers());
            assert_eq!(fast.body_bytes, 10);
        }
        assert_eq!(built.get(), 1, "the head is built once");
        let head = hit(&req(&[]), true, 10, m, body(), &memo);
        assert_eq!(head.resp.headers(), slow.resp.headers());
        assert_eq!(head.body_bytes, 0);
        let ranged = hit(&req(&[("range", "bytes=0-3")]), false, 10, m, body(), &memo);
        assert_eq!(ranged.resp.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(ranged.resp.headers()[header::CONTENT_LENGTH], "4");
        let cond = [("if-none-match", "\"abc\"")];
        let revalidated = hit(&req(&cond), false, 10, m, body(), &memo);
        assert_eq!(revalidated.resp.status(), StatusCode::NOT_MODIFIED);
        let since = [("if-modified-since", "Wed, 15 Nov 2023 00:00:00 GMT")];
        let revalidated = hit(&req(&since), false, 10, m, body(), &memo);
        assert_eq!(revalidated.resp.status(), StatusCode::NOT_MODIFIED);
    }

    #[test]
    fn http_date_is_imf_fixdate() {
        for secs in [0, 1_700_000_000, 4_102_444_799] {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            assert_eq!(http_date(t), httpdate::fmt_http_date(t).as_str());
        }
    }

    #[test]
    fn ranges() {
        let m = meta(100);
        assert_eq!(requested_range(&req(&[]), &m), Ok(None));
        assert_eq!(
            requested_range(&req(&[("range", "bytes=0-9")]), &m),
            Ok(Some((0, 10)))
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=90-")]), &m),
            Ok(Some((90, 100)))
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=-10")]), &m),
            Ok(Some((90, 100)))
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=-500")]), &m),
            Ok(Some((0, 100)))
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=50-500")]), &m),
            Ok(Some((50, 100)))
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=100-")]), &m),
            Err(())
        );
        assert_eq!(requested_range(&req(&[("range", "bytes=-0")]), &m), Err(()));
        assert_eq!(
            requested_range(&req(&[("range", "pages=1-2")]), &m),
            Ok(None)
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=0-1,5-6")]), &m),
            Ok(None)
        );
        assert_eq!(
            requested_range(&req(&[("range", "bytes=0-9"), ("if-range", "\"old\"")]), &m),
            Ok(None)
        );
    }

    #[test]
    fn conditionals() {
        let m = meta(1);
        assert!(not_modified(&req(&[("if-none-match", "\"abc\"")]), &m));
        assert!(not_modified(
            &req(&[("if-none-match", "\"x\", W/\"abc\"")]),
            &m
        ));
        assert!(!not_modified(&req(&[("if-none-match", "\"x\"")]), &m));
        assert!(not_modified(
            &req(&[("if-modified-since", "Tue, 14 Nov 2023 22:13:20 GMT")]),
            &m
        ));
        assert!(!not_modified(
            &req(&[("if-modified-since", "Tue, 14 Nov 2023 22:13:19 GMT")]),
            &m
        ));
        // If-None-Match takes precedence.
        assert!(!not_modified(
            &req(&[
                ("if-none-match", "\"x\""),
                ("if-modified-since", "Tue, 14 Nov 2030 22:13:20 GMT")
            ]),
            &m
        ));
    }
}
