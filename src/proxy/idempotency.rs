//! Duplicate posts: `POST` requests carrying `Idempotency-Key`.
//!
//! Mastodon reads the key on `POST /api/v1/statuses` only, remembers it per account for an
//! hour, and answers a *concurrent* duplicate with 503 (4.6+) or lets it through (older). The
//! edge sees both requests, so it does better: requests with the same fingerprint (Host,
//! path, key, credentials) are one request for core.
//!
//! - The first one (the leader) goes to core; its response is read whole (up to
//!   [`MAX_BODY`]) and, if it is a 2xx, kept for [`WINDOW`] (Mastodon's hour).
//! - One arriving while the leader is in flight waits for it and gets the same status,
//!   headers and body; one arriving later within the window gets the kept response.
//!   Both are marked `X-Cache-Status: REPLAY`.
//! - A leader that failed (no 2xx: a 5xx, a 504 timeout, a 4xx such as 429, a body cut by
//!   core or by its client) leaves nothing: the next request with that fingerprint goes to
//!   core (one at a time; the others keep waiting).
//! - A leader runs in a task of its own (`Proxy::handle`) and waits for core up to
//!   `LEADER_WAIT` (5 min): a client that leaves, or gets 504 at `first_byte_timeout`, once
//!   its post is sent does not cancel it, as puma makes the post anyway; its answer is kept
//!   for the retry.
//! - A 2xx whose body is over [`MAX_BODY`] is passed on to the leader's client but not
//!   kept: the requests waiting for it are let through to core one at a time (Mastodon's own
//!   idempotency then answers them, as it would without the edge).
//!
//! Only requests with credentials (`Authorization`, a `Cookie` header holding a Mastodon
//! session cookie, or both) take part: the fingerprint is a SHA-256 over them, so
//! credentials are never stored, and different credentials or keys never share an entry.
//! Cookies without a session (a theme, a locale) are no credentials: such requests pass
//! through, as anonymous ones do.
//!
//! Memory is bounded: at most [`MAX_ENTRIES`] fingerprints (in flight or kept) and
//! [`MAX_BYTES`] of kept responses; past either, the oldest kept responses are dropped
//! first, and a request that finds the table full of requests in flight passes through
//! without this protection.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::listen::Body;
use crate::metrics::CacheStatus;

/// How long a response is replayed: Mastodon keeps `idempotency:status:…` for 3,600 s.
pub const WINDOW: Duration = Duration::from_secs(3600);
/// Largest response body kept (a status's JSON is a few KiB).
pub const MAX_BODY: usize = 256 * 1024;
/// Most fingerprints held (in flight or kept).
pub const MAX_ENTRIES: usize = 10_000;
/// Most bytes of kept responses (bodies and headers).
pub const MAX_BYTES: usize = 32 * 1024 * 1024;

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// SHA-256 of what makes two requests the same one.
pub type Fingerprint = [u8; 32];

/// The fingerprint of a request that takes part: a `POST` with a non-empty
/// `Idempotency-Key` and credentials. `None`: pass it through.
pub fn fingerprint<B>(req: &Request<B>) -> Option<Fingerprint> {
    if req.method() != Method::POST {
        return None;
    }
    let h = req.headers();
    let key = h.get(IDEMPOTENCY_KEY).filter(|k| !k.is_empty())?;
    // Cookies are credentials only with a session among them: others (a theme, a locale)
    // are shared by strangers, who must not share a replay. With `Authorization` too, both
    // count: Mastodon falls back to the session when the token is not one.
    let cookies: Vec<&[u8]> = match crate::corecache::session_cookie(h) {
        true => h
            .get_all(header::COOKIE)
            .iter()
            .map(|c| c.as_bytes())
            .collect(),
        false => Vec::new(),
    };
    let authorization = h.get(header::AUTHORIZATION).map(|a| a.as_bytes());
    if authorization.is_none() && cookies.is_empty() {
        return None;
    }
    let cookies = cookies.join(&b"; "[..]);
    let host = h
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    let mut d = Sha256::new();
    // Each part length-prefixed, so that no two different requests hash the same input.
    for part in [
        host,
        req.uri().path().as_bytes(),
        key.as_bytes(),
        authorization.unwrap_or_default(),
        &cookies[..],
    ] {
        d.update((part.len() as u64).to_be_bytes());
        d.update(part);
    }
    Some(d.finalize().into())
}

/// A kept response.
#[derive(Debug)]
pub struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Stored {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum::<usize>()
    }

    /// The response, `X-Cache-Status` set to `status` when given.
    pub fn response(&self, status: Option<CacheStatus>) -> Response<Body> {
        let mut resp = Response::new(
            Full::new(self.body.clone())
                .map_err(|e| match e {})
                .boxed_unsync(),
        );
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        if let Some(s) = status {
            resp.headers_mut()
                .insert("x-cache-status", HeaderValue::from_static(s.as_str()));
        }
        resp
    }
}

/// What the leader's request came to, as its followers see it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Still in flight.
    Pending,
    /// A 2xx, kept.
    Done(Arc<Stored>),
    /// Nothing to replay: the next follower goes to core itself.
    Failed,
}

enum Slot {
    InFlight {
        id: u64,
        rx: watch::Receiver<Outcome>,
    },
    Kept {
        resp: Arc<Stored>,
        at: Instant,
    },
}

#[derive(Default)]
struct State {
    slots: HashMap<Fingerprint, Slot>,
    /// Kept responses, oldest first (a fingerprint kept again later appears twice; only the
    /// entry whose time matches counts).
    kept: VecDeque<(Instant, Fingerprint)>,
    bytes: usize,
    next_id: u64,
}

/// The table of `Idempotency-Key` requests, in flight and answered.
#[derive(Default)]
pub struct Idempotency {
    state: Mutex<State>,
}

/// What a request does.
pub enum Claim<'a> {
    /// Answer this kept (or just answered) response.
    Replay(Arc<Stored>),
    /// Another request with this fingerprint is in flight: wait for it.
    Wait(watch::Receiver<Outcome>),
    /// Go to core, then [`Lead::finish`].
    Lead(Lead<'a>),
    /// The table is full of requests in flight: go to core without protection.
    Bypass,
}

/// The leader's ticket. Dropped without [`Lead::finish`] (the client left, the handler was
/// cancelled), its followers are told it failed and the next one goes to core.
pub struct Lead<'a> {
    table: &'a Idempotency,
    fp: Fingerprint,
    id: u64,
    tx: watch::Sender<Outcome>,
    finished: bool,
}

impl Idempotency {
    /// What the request with this fingerprint does now.
    pub fn claim(&self, fp: Fingerprint) -> Claim<'_> {
        self.claim_at(fp, Instant::now())
    }

    fn claim_at(&self, fp: Fingerprint, now: Instant) -> Claim<'_> {
        let mut state = self.state.lock();
        expire(&mut state, now);
        match state.slots.get(&fp) {
            Some(Slot::Kept { resp, .. }) => return Claim::Replay(resp.clone()),
            Some(Slot::InFlight { rx, .. }) => return Claim::Wait(rx.clone()),
            None => {}
        }
        if state.slots.len() >= MAX_ENTRIES {
            let fp_old = state.kept.pop_front();
            match fp_old {
                Some((at, old)) => drop_kept(&mut state, old, at),
                None => return Claim::Bypass,
            }
            if state.slots.len() >= MAX_ENTRIES {
                return Claim::Bypass;
            }
        }
        state.next_id += 1;
        let id = state.next_id;
        let (tx, rx) = watch::channel(Outcome::Pending);
        state.slots.insert(fp, Slot::InFlight { id, rx });
        Claim::Lead(Lead {
            table: self,
            fp,
            id,
            tx,
            finished: false,
        })
    }

    /// Fingerprints held (in flight and kept) and bytes of kept responses.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.slots.len(), state.bytes)
    }

    fn keep(&self, fp: Fingerprint, id: u64, resp: Arc<Stored>, now: Instant) {
        let mut state = self.state.lock();
        let ours = matches!(state.slots.get(&fp), Some(Slot::InFlight { id: i, .. }) if *i == id);
        if !ours {
            return;
        }
        let size = resp.size();
        state.slots.insert(fp, Slot::Kept { resp, at: now });
        state.kept.push_back((now, fp));
        state.bytes += size;
        while state.bytes > MAX_BYTES {
            let Some((at, old)) = state.kept.pop_front() else {
                break;
            };
            drop_kept(&mut state, old, at);
        }
    }

    fn release(&self, fp: Fingerprint, id: u64) {
        let mut state = self.state.lock();
        if matches!(state.slots.get(&fp), Some(Slot::InFlight { id: i, .. }) if *i == id) {
            state.slots.remove(&fp);
        }
    }
}

/// Drops kept responses older than the window.
fn expire(state: &mut State, now: Instant) {
    while let Some(&(at, fp)) = state.kept.front() {
        if now.duration_since(at) < WINDOW {
            break;
        }
        state.kept.pop_front();
        drop_kept(state, fp, at);
    }
}

/// Removes the kept response of `fp` if it is the one kept at `at`.
fn drop_kept(state: &mut State, fp: Fingerprint, at: Instant) {
    if let Some(Slot::Kept { resp, at: kept_at }) = state.slots.get(&fp) {
        if *kept_at == at {
            state.bytes -= resp.size();
            state.slots.remove(&fp);
        }
    }
}

impl Lead<'_> {
    /// Reads core's response: a 2xx whose body fits is kept, published to the followers and
    /// answered from memory; anything else is passed on and the followers go to core.
    pub async fn finish(mut self, resp: Response<Body>) -> Response<Body> {
        self.finished = true;
        if !resp.status().is_success() {
            self.fail();
            return resp;
        }
        let (parts, mut body) = resp.into_parts();
        let mut buf = BytesMut::new();
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    // Trailers are not kept: a POST's JSON has none.
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "idempotency: core's response was cut");
                    self.fail();
                    return super::status_text(StatusCode::BAD_GATEWAY);
                }
            }
            if buf.len() > MAX_BODY {
                // Too big to keep: the rest is streamed to this client only.
                self.fail();
                let head = futures_util::stream::iter([Ok(http_body::Frame::data(buf.freeze()))]);
                let rest = http_body_util::BodyStream::new(body);
                let stream = futures_util::StreamExt::chain(head, rest);
                let body = http_body_util::StreamBody::new(stream).boxed_unsync();
                return Response::from_parts(parts, body);
            }
        }
        let mut headers = parts.headers;
        headers.remove(header::TRANSFER_ENCODING);
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(buf.len()));
        let stored = Arc::new(Stored {
            status: parts.status,
            headers,
            body: buf.freeze(),
        });
        self.table
            .keep(self.fp, self.id, stored.clone(), Instant::now());
        let _ = self.tx.send(Outcome::Done(stored.clone()));
        stored.response(None)
    }

    fn fail(&mut self) {
        self.finished = true;
        self.table.release(self.fp, self.id);
        let _ = self.tx.send(Outcome::Failed);
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.fail();
        }
    }
}

/// Waits for the leader: its kept response, or `None` when it failed (then claim again).
pub async fn wait(mut rx: watch::Receiver<Outcome>) -> Option<Arc<Stored>> {
    let outcome = match rx.wait_for(|o| !matches!(o, Outcome::Pending)).await {
        Ok(o) => o.clone(),
        // The leader's ticket is gone without a word: as a failure.
        Err(_) => Outcome::Failed,
    };
    match outcome {
        Outcome::Done(s) => Some(s),
        Outcome::Pending | Outcome::Failed => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, auth: Option<&str>, cookie: Option<&str>) -> Request<()> {
        let mut b = Request::post("/api/v1/statuses").header("host", "example.social");
        if !key.is_empty() {
            b = b.header("idempotency-key", key);
        }
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(()).unwrap()
    }

    fn stored(n: usize) -> Arc<Stored> {
        Arc::new(Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; n]),
        })
    }

    #[test]
    fn fingerprints_separate_keys_credentials_paths_and_hosts() {
        let a = fingerprint(&req("k1", Some("Bearer A"), None)).unwrap();
        assert_eq!(a, fingerprint(&req("k1", Some("Bearer A"), None)).unwrap());
        assert_ne!(a, fingerprint(&req("k2", Some("Bearer A"), None)).unwrap());
        assert_ne!(a, fingerprint(&req("k1", Some("Bearer B"), None)).unwrap());
        let c = fingerprint(&req("k1", None, Some("_session_id=s1"))).unwrap();
        assert_ne!(
            c,
            fingerprint(&req("k1", None, Some("_session_id=s2"))).unwrap()
        );
        let mut other_path = req("k1", Some("Bearer A"), None);
        *other_path.uri_mut() = "/api/v1/media".parse().unwrap();
        assert_ne!(a, fingerprint(&other_path).unwrap());
        let mut other_host = req("k1", Some("Bearer A"), None);
        other_host
            .headers_mut()
            .insert("host", HeaderValue::from_static("other.social"));
        assert_ne!(a, fingerprint(&other_host).unwrap());
        // No key, no credentials, or not a POST: not taking part.
        assert!(fingerprint(&req("", Some("Bearer A"), None)).is_none());
        assert!(fingerprint(&req("k1", None, None)).is_none());
        assert!(
            fingerprint(&req("k1", None, Some("theme=dark; locale=en"))).is_none(),
            "cookies without a session are no credentials"
        );
        // With a token and a session, both count; cookies without a session do not.
        let both = fingerprint(&req("k1", Some("Bearer A"), Some("_mastodon_session=s1")));
        assert_ne!(Some(a), both);
        assert_ne!(
            both,
            fingerprint(&req("k1", Some("Bearer A"), Some("_mastodon_session=s2")))
        );
        assert_eq!(
            Some(a),
            fingerprint(&req("k1", Some("Bearer A"), Some("theme=dark")))
        );
        let mut get = req("k1", Some("Bearer A"), None);
        *get.method_mut() = Method::GET;
        assert!(fingerprint(&get).is_none());
    }

    #[test]
    fn kept_responses_last_one_window() {
        let t = Idempotency::default();
        let now = Instant::now();
        let fp = [1; 32];
        let Claim::Lead(lead) = t.claim_at(fp, now) else {
            panic!("first is the leader")
        };
        assert!(matches!(t.claim_at(fp, now), Claim::Wait(_)));
        t.keep(fp, lead.id, stored(10), now);
        drop(lead); // (finish would mark it finished; here the slot is already kept)
        let later = now + WINDOW - Duration::from_secs(1);
        assert!(matches!(t.claim_at(fp, later), Claim::Replay(_)));
        let expired = now + WINDOW;
        assert!(matches!(t.claim_at(fp, expired), Claim::Lead(_)));
        assert_eq!(t.usage(), (0, 0), "the new lead was dropped: released");
    }

    #[test]
    fn a_dropped_leader_lets_the_next_one_through() {
        let t = Idempotency::default();
        let fp = [2; 32];
        let Claim::Lead(lead) = t.claim(fp) else {
            panic!()
        };
        let Claim::Wait(rx) = t.claim(fp) else {
            panic!()
        };
        drop(lead);
        assert!(matches!(*rx.borrow(), Outcome::Failed));
        assert!(matches!(t.claim(fp), Claim::Lead(_)));
    }

    #[test]
    fn memory_is_bounded_oldest_first() {
        let t = Idempotency::default();
        let now = Instant::now();
        let per = MAX_BODY;
        let n = MAX_BYTES / per + 3;
        for i in 0..n {
            let mut fp = [0; 32];
            fp[..8].copy_from_slice(&(i as u64).to_be_bytes());
            let Claim::Lead(mut lead) = t.claim_at(fp, now) else {
                panic!()
            };
            t.keep(fp, lead.id, stored(per), now);
            lead.finished = true;
        }
        let (entries, bytes) = t.usage();
        assert!(bytes <= MAX_BYTES, "{bytes}");
        assert!(entries < n);
        let first = [0; 32];
        assert!(
            matches!(t.claim_at(first, now), Claim::Lead(_)),
            "oldest dropped"
        );
    }
}
