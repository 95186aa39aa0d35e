//! gzip for core's responses at the front door (`[core] gzip`, on by default), as Mastodon's
//! nginx does it (`gzip on`, `gzip_proxied any`, `gzip_vary on`, `gzip_comp_level 6` and its
//! `gzip_types`). Puma sends JSON and HTML uncompressed: without this, an edge in nginx's
//! place would send a timeline several times larger than before.
//!
//! A response is compressible when its status is 200, 403 or 404 (nginx's), it has no
//! `Content-Encoding`, `Content-Range` or `Cache-Control: no-transform` (RFC 9110 §7.7), its
//! body is not known to be under [`MIN_LENGTH`], and its media type is text (HTML, CSS,
//! JavaScript, plain, XML), JSON or XML of any kind (ActivityPub's `activity+json` and
//! `ld+json`, WebFinger's `jrd+json`, RSS), SVG or an icon. Server-sent events
//! (`text/event-stream`) are not: each event must go out as it comes.
//!
//! Every compressible response gets `Vary: Accept-Encoding`, also for a client that does not
//! take gzip (so that a cache in front never hands the gzipped body to a client that cannot
//! read it). For a client whose `Accept-Encoding` takes gzip, the body is compressed as it
//! streams, `Content-Length` goes and a strong `ETag` is made weak (the bytes are not the
//! identity ones, RFC 9110 §8.8.1; core compares `If-None-Match` weakly, and so does the
//! core cache). The core cache keeps identity bodies: each client's copy is compressed on
//! the way out, as behind nginx, except those it keeps in its memory tier: their gzipped
//! copy is made once and kept beside them (`corecache::answer`), so a hot API answer is not
//! compressed again for every client.

use std::cell::RefCell;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use http::{header, HeaderMap, HeaderValue, Response};
use http_body::Frame;
use http_body_util::BodyExt;

use crate::listen::Body;

/// Bodies known to be shorter are sent as they are: with its head such an answer fits in
/// one TCP segment either way, so compressing it buys no packet and costs CPU (nginx's
/// `gzip_min_length` is 20 bytes; Mastodon's config leaves it).
pub const MIN_LENGTH: u64 = 1024;

/// Mastodon's nginx `gzip_comp_level`.
const LEVEL: u32 = 6;

/// What the front door does about gzip for one request to core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `[core] gzip` is off: answers go as core sent them, with no `Vary` of the edge's.
    Off,
    /// On, and the client does not take gzip: identity bodies, compressible ones marked
    /// `Vary: Accept-Encoding`.
    Identity,
    /// On, and the client takes gzip.
    Takes,
}

impl Mode {
    /// For a request with these headers, `[core] gzip` being `on`.
    pub fn of(on: bool, request: &HeaderMap) -> Mode {
        match (on, on && accepts_gzip(request)) {
            (false, _) => Mode::Off,
            (true, false) => Mode::Identity,
            (true, true) => Mode::Takes,
        }
    }
}

/// Whether a request's `Accept-Encoding` takes gzip (`gzip`, `x-gzip` or `*`, with a
/// q-value above zero; an explicit `gzip;q=0` refuses it whatever `*` says).
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    let codings = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','));
    for coding in codings {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or_default().trim();
        let q = parts
            .filter_map(|p| {
                let (k, v) = p.split_once('=')?;
                k.trim().eq_ignore_ascii_case("q").then(|| v.trim())
            })
            .next()
            .map_or(1.0, |q| q.parse::<f32>().unwrap_or(0.0));
        if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q > 0.0);
        } else if name == "*" {
            any = Some(q > 0.0);
        }
    }
    gzip.or(any).unwrap_or(false)
}

/// A response of core as it goes to a client: compressed when it is compressible and
/// `gzip` (the client takes it), marked `Vary: Accept-Encoding` when compressible. `head`:
/// the answer to a HEAD, whose headers say what a GET would get (it has no body).
pub fn response(mut resp: Response<Body>, gzip: bool, head: bool) -> Response<Body> {
    if !matches!(resp.status().as_u16(), 200 | 403 | 404) {
        return resp;
    }
    if !gzip && vary_named(resp.headers()) {
        // Nothing to change (a core cache hit's head has the `Vary` already: `vary`).
        return resp;
    }
    if surely_not(resp.headers()) {
        return resp;
    }
    let seen = scan(resp.headers());
    if !seen.compressible {
        return resp;
    }
    let headers = resp.headers_mut();
    if !seen.vary_named {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    if !gzip {
        return resp;
    }
    if head {
        mark_gzipped(headers);
        return resp;
    }
    let Some(permit) = Streaming::take() else {
        // As many bodies are being compressed as memory is set aside for: this one goes as
        // it is (its `Vary` says it could have been gzipped).
        return resp;
    };
    mark_gzipped(resp.headers_mut());
    resp.map(|body| {
        Gzip {
            body,
            gz: Some(GzStream::new()),
            trailers: None,
            _permit: permit,
        }
        .boxed_unsync()
    })
}

/// An identity head made the head of its gzipped body: no `Content-Length` (the caller
/// sets the compressed one if it knows it), `Content-Encoding: gzip`, a strong `ETag` made
/// weak.
fn mark_gzipped(headers: &mut HeaderMap) {
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    if let Some(etag) = headers.get(header::ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&weak) {
                headers.insert(header::ETAG, v);
            }
        }
    }
}

/// A whole body gzipped, at the level [`response`] uses; None when that is not smaller.
pub fn gzip_whole(data: &[u8]) -> Option<Bytes> {
    let mut gz = GzStream::new();
    let mut out = gz.write(data).ok()?;
    out.extend_from_slice(&gz.finish().ok()?);
    (out.len() < data.len()).then(|| out.into())
}

/// The head of a gzipped whole body of `len` bytes, from its identity head (which has the
/// `Vary`, see [`vary`]).
pub fn gzip_head(identity: &HeaderMap, len: usize) -> HeaderMap {
    let mut headers = identity.clone();
    mark_gzipped(&mut headers);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers
}

/// Adds `Vary: Accept-Encoding` to the head of a response [`response`] would compress,
/// once, where the head is made to be cloned for many clients (the core cache's hits): the
/// `Vary` is then found there, and appending it to each clone (a map cloned full grows)
/// is spared. (With `[core] gzip` off the core cache answers from a head made without it.)
/// Returns whether [`response`] would compress the answer (for a store that keeps
/// compressed copies: the core cache's memory tier).
pub fn vary(status: u16, headers: &mut HeaderMap) -> bool {
    if !matches!(status, 200 | 403 | 404) {
        return false;
    }
    let seen = scan(headers);
    if seen.compressible && !seen.vary_named {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    seen.compressible
}

/// Two lookups that rule out most answers that are not compressible (a short body, a type
/// not compressed) before [`scan`] walks every header: run on every cache hit.
fn surely_not(headers: &HeaderMap) -> bool {
    let short = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n < MIN_LENGTH);
    short
        || !headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(compressible_type)
}

fn vary_named(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .any(names_accept_encoding)
}

/// What [`response`] reads of a response's headers (its status aside).
#[derive(Debug, Default, PartialEq)]
struct Seen {
    /// Compressible: a compressible type, and nothing that forbids it.
    compressible: bool,
    /// `Vary` names `Accept-Encoding` already (or is `*`).
    vary_named: bool,
}

/// One walk over the headers, names told apart by length first (as `proxy::headers` does):
/// this runs on every response from core, cache hits included, where six hashed lookups
/// and the splitting of each value cost a tenth of a hit.
fn scan(headers: &HeaderMap) -> Seen {
    let (mut typed, mut refused, mut vary_named) = (false, false, false);
    for (name, value) in headers {
        let n = name.as_str();
        match n.len() {
            4 if n == "vary" => vary_named |= names_accept_encoding(value),
            12 if n == "content-type" => typed = value.to_str().is_ok_and(compressible_type),
            13 if n == "content-range" => refused = true,
            13 if n == "cache-control" => refused |= has_no_transform(value),
            14 if n == "content-length" => {
                refused |= value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .is_some_and(|n| n < MIN_LENGTH)
            }
            16 if n == "content-encoding" => {
                refused |= !value.as_bytes().eq_ignore_ascii_case(b"identity")
            }
            _ => {}
        }
    }
    Seen {
        compressible: typed && !refused,
        vary_named,
    }
}

/// Whether a `Cache-Control` value has `no-transform` (RFC 9110 §7.7).
fn has_no_transform(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
    })
}

/// Whether a `Vary` value names `Accept-Encoding` or is `*`.
fn names_accept_encoding(value: &HeaderValue) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|n| n.trim() == "*" || n.trim().eq_ignore_ascii_case("accept-encoding"))
    })
}

/// Mastodon's nginx `gzip_types` (with `text/html`, which nginx always compresses), and any
/// JSON or XML type (`+json`, `+xml`).
fn compressible_type(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    let is = |t: &str| essence.eq_ignore_ascii_case(t);
    let ends = |suffix: &str| {
        essence.len() > suffix.len()
            && essence.is_char_boundary(essence.len() - suffix.len())
            && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
    };
    let application = essence
        .get(..12)
        .is_some_and(|p| p.eq_ignore_ascii_case("application/"));
    [
        "text/html",
        "text/plain",
        "text/css",
        "text/xml",
        "text/javascript",
        "application/json",
        "application/javascript",
        "application/xml",
        "image/svg+xml",
        "image/x-icon",
        "image/vnd.microsoft.icon",
    ]
    .into_iter()
    .any(is)
        || application && (ends("+json") || ends("+xml"))
}

/// A body compressed as it streams: each data frame goes through the encoder, and what the
/// encoder has written so far goes out (deflate keeps back what it may still match); the
/// end flushes the rest and gzip's trailer, then passes on trailers if the body had any.
struct Gzip {
    body: Body,
    /// None once the end is written.
    gz: Option<GzStream>,
    trailers: Option<HeaderMap>,
    _permit: Streaming,
}

/// Bodies compressed at once, at most: each holds a deflate state (about half a MiB, as
/// zlib's `gzip_buffers` and window are for nginx), for as long as its client reads.
/// Past it, answers go uncompressed rather than grow memory with slow readers.
pub const MAX_STREAMS: usize = 64;

static STREAMING: AtomicUsize = AtomicUsize::new(0);

/// One of [`MAX_STREAMS`], given back when dropped.
struct Streaming(());

impl Streaming {
    fn take() -> Option<Streaming> {
        if STREAMING.fetch_add(1, Ordering::AcqRel) >= MAX_STREAMS {
            STREAMING.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Streaming(()))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        STREAMING.fetch_sub(1, Ordering::AcqRel);
    }
}

impl http_body::Body for Gzip {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(gz) = this.gz.as_mut() else {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            };
            let frame = match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    let rest = this.gz.take().expect("checked").finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(rest.into()))));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let out = gz.write(&data)?;
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                    }
                }
                Err(frame) => {
                    // Trailers end the body: the gzip stream first, then them.
                    this.trailers = frame.into_trailers().ok();
                    let rest = this.gz.take().expect("checked").finish()?;
                    return Poll::Ready(Some(Ok(Frame::data(rest.into()))));
                }
            }
        }
    }
}

/// gzip's member header (RFC 1952 §2.3): magic, deflate, no flags, no time, no extra
/// flags, OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];

/// Deflate states kept per worker thread for the next body.
const STATES_KEPT: usize = 8;

thread_local! {
    static STATES: RefCell<Vec<DeflateEncoder<Vec<u8>>>> = const { RefCell::new(Vec::new()) };
}

/// One gzip stream (RFC 1952) over a deflate state taken from [`STATES`] and given back
/// reset. Written here around flate2's raw deflate encoder rather than with its
/// `GzEncoder`, which makes a new deflate state per body: zeroing one (some 500 KB, most of
/// it buffers) costs more than compressing a small JSON answer, where a reset state clears
/// its hash table only. The framing is the 10-byte header, then the deflate stream, then
/// the CRC-32 and the length (flate2's `Crc`).
struct GzStream {
    deflate: Option<DeflateEncoder<Vec<u8>>>,
    crc: Crc,
    started: bool,
}

impl GzStream {
    fn new() -> GzStream {
        let deflate = STATES
            .with_borrow_mut(Vec::pop)
            .unwrap_or_else(|| DeflateEncoder::new(Vec::new(), Compression::new(LEVEL)));
        GzStream {
            deflate: Some(deflate),
            crc: Crc::new(),
            started: false,
        }
    }

    /// Compresses `data`; returns what is ready to go out (maybe nothing yet).
    fn write(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let deflate = self.deflate.as_mut().expect("written before the end");
        if !self.started {
            deflate.get_mut().extend_from_slice(&GZIP_HEADER);
            self.started = true;
        }
        self.crc.update(data);
        deflate.write_all(data)?;
        Ok(std::mem::take(deflate.get_mut()))
    }

    /// The rest of the stream and gzip's trailer.
    fn finish(mut self) -> std::io::Result<Vec<u8>> {
        let mut deflate = self.deflate.take().expect("finished once");
        let mut out = match self.started {
            true => Vec::new(),
            false => GZIP_HEADER.to_vec(),
        };
        deflate.try_finish()?;
        out.append(deflate.get_mut());
        out.extend_from_slice(&self.crc.sum().to_le_bytes());
        out.extend_from_slice(&self.crc.amount().to_le_bytes());
        give_back(deflate);
        Ok(out)
    }
}

impl Drop for GzStream {
    fn drop(&mut self) {
        // A body dropped before its end (its client left).
        if let Some(deflate) = self.deflate.take() {
            give_back(deflate);
        }
    }
}

fn give_back(mut deflate: DeflateEncoder<Vec<u8>>) {
    if deflate.reset(Vec::new()).is_ok() {
        STATES.with_borrow_mut(|kept| {
            if kept.len() < STATES_KEPT {
                kept.push(deflate);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::testing::header_map as map;

    /// The stream is gzip as any reader takes it, body after body on reused states, also
    /// an empty body and one split in many frames.
    #[test]
    fn gzip_streams_read_back_whole_on_reused_states() {
        use std::io::Read;
        for round in 0..3 {
            for body in [
                Vec::new(),
                b"x".to_vec(),
                crate::key::Key::parse("a/b.png")
                    .unwrap()
                    .as_str()
                    .repeat(4000)
                    .into_bytes(),
            ] {
                let mut gz = GzStream::new();
                let mut out = Vec::new();
                for piece in body.chunks(1000) {
                    out.extend(gz.write(piece).unwrap());
                }
                out.extend(gz.finish().unwrap());
                let mut back = Vec::new();
                flate2::read::GzDecoder::new(&out[..])
                    .read_to_end(&mut back)
                    .unwrap();
                assert_eq!(back, body, "round {round}, {} bytes", body.len());
            }
        }
        assert!(STATES.with_borrow(|s| s.len()) >= 1, "states kept");
        assert!(gzip_whole(b"ab").is_none(), "not smaller");
    }

    /// Past `MAX_STREAMS` bodies being compressed, an answer goes as it is (with its
    /// `Vary`); one more may be compressed once one ends.
    #[test]
    fn bodies_past_the_streams_cap_go_uncompressed() {
        let answer = || {
            let mut resp = Response::new(
                http_body_util::Full::new(Bytes::from(vec![b'a'; 4096]))
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            );
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
            response(resp, true, false)
        };
        let mut held: Vec<_> = (0..MAX_STREAMS).map(|_| answer()).collect();
        assert!(held
            .iter()
            .all(|r| r.headers()[header::CONTENT_ENCODING] == "gzip"));
        let past = answer();
        assert!(!past.headers().contains_key(header::CONTENT_ENCODING));
        assert_eq!(past.headers()[header::VARY], "accept-encoding");
        held.pop();
        assert_eq!(answer().headers()[header::CONTENT_ENCODING], "gzip");
    }

    #[test]
    fn accept_encoding_is_read_with_its_q_values() {
        for (value, takes) in [
            ("gzip", true),
            ("gzip, deflate, br", true),
            ("br;q=1.0, GZIP;q=0.5", true),
            ("x-gzip", true),
            ("*", true),
            ("br", false),
            ("identity", false),
            ("gzip;q=0", false),
            ("gzip; q=0.000", false),
            ("*, gzip;q=0", false),
            ("*;q=0", false),
            ("gzip;q=junk", false),
        ] {
            assert_eq!(
                accepts_gzip(&map(&[("accept-encoding", value)])),
                takes,
                "{value}"
            );
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
        assert!(accepts_gzip(&map(&[
            ("accept-encoding", "br"),
            ("accept-encoding", "gzip")
        ])));
    }

    fn compressible(status: StatusCode, headers: &HeaderMap) -> bool {
        matches!(status.as_u16(), 200 | 403 | 404) && scan(headers).compressible
    }

    #[test]
    fn what_is_compressible() {
        let json = |extra: &[(&str, &str)]| {
            let mut h = map(&[("content-type", "application/json; charset=utf-8")]);
            for (k, v) in extra {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let ok = StatusCode::OK;
        assert!(compressible(ok, &json(&[])));
        assert!(compressible(StatusCode::NOT_FOUND, &json(&[])));
        assert!(compressible(ok, &json(&[("content-length", "1024")])));
        for t in [
            "text/html",
            "application/activity+json",
            "application/ld+json; profile=\"https://www.w3.org/ns/activitystreams\"",
            "application/jrd+json",
            "application/xrd+xml",
            "application/rss+xml",
            "text/css",
            "Text/JavaScript",
            "image/svg+xml",
        ] {
            assert!(compressible(ok, &map(&[("content-type", t)])), "{t}");
        }
        for t in [
            "image/png",
            "video/mp4",
            "text/event-stream",
            "application/octet-stream",
        ] {
            assert!(!compressible(ok, &map(&[("content-type", t)])), "{t}");
        }
        assert!(!compressible(ok, &HeaderMap::new()), "no type");
        assert!(!compressible(StatusCode::INTERNAL_SERVER_ERROR, &json(&[])));
        assert!(!compressible(StatusCode::PARTIAL_CONTENT, &json(&[])));
        assert!(!compressible(ok, &json(&[("content-length", "1023")])));
        assert!(!compressible(ok, &json(&[("content-encoding", "br")])));
        assert!(compressible(ok, &json(&[("content-encoding", "identity")])));
        assert!(!compressible(
            ok,
            &json(&[("content-range", "bytes 0-9/10")])
        ));
        assert!(!compressible(
            ok,
            &json(&[("cache-control", "public, No-Transform")])
        ));
    }

    #[test]
    fn vary_names_accept_encoding_once() {
        let json = ("content-type", "application/json");
        let h = |vary: &str| map(&[json, ("vary", vary)]);
        assert!(!scan(&h("Accept")).vary_named);
        assert!(scan(&h("Accept, Accept-Encoding")).vary_named);
        assert!(scan(&h("*")).vary_named);
        let mut resp = Response::new(Body::default());
        *resp.headers_mut() = h("Accept");
        let resp = response(resp, false, false);
        let vary: Vec<&str> = resp
            .headers()
            .get_all("vary")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(vary, ["Accept", "accept-encoding"]);
        let again = response(resp, false, false);
        assert_eq!(again.headers().get_all("vary").iter().count(), 2);
    }
}
