//! The RFC 9111 shared cache in front of the proxy to core (`[core.cache]`).
//!
//! A GET or HEAD to core: a request with credentials (`Authorization`, a Mastodon session
//! cookie, a `Signature`, an OAuth token in the query), a body or a `Range` is never
//! answered from the cache (BYPASS), nor one whose forwarding headers change the URL core
//! sees ([`policy::unkeyed`], or a scheme it cannot key: its answer is never stored either,
//! against cache poisoning) → otherwise the URL's stored variants (host + path and query;
//! the scheme core is told and `Vary` pick the variant) are asked, by the `http-cache-semantics` policy, whether one is fresh for this request
//! (HIT) → a stale one that `stale-while-revalidate` covers is served (STALE) while one
//! background request revalidates it → else it is revalidated (`If-None-Match` /
//! `If-Modified-Since`; a 304 updates the stored headers: REVALIDATED), and when core fails
//! (breaker open, timeout, refused, 5xx) within `stale-if-error` it is served (STALE) → else
//! one request per URL and scheme goes to core (MISS; the others wait for it, see [`fill`]) and its
//! response, if storable, is stored as it streams to the client; a final answer that says
//! `private` or `no-store` (or a 304 making the entry unstorable) evicts the stored one.
//!
//! Every other method is passed on; an unsafe one (not GET, HEAD, OPTIONS, TRACE) answered
//! below 400 evicts its URL and the same-host `Location` / `Content-Location` (RFC 9111
//! §4.4).
//!
//! - `policy`: what may be stored and served stale, privacy rules, 304 header updates.
//! - `store`: bodies and metas on disk, the index, LRU by bytes.
//! - `fill`: one request per URL and scheme, the body teed into the cache.
//! - `answer`: answers from what is stored (the fast hit, a stored entry whole, a range or a
//!   304, a follower's share of the leader's response).
//! - `hit`: what a hit needs of an entry, made once (the policy's clock, the response head).
//! - `revalidate`: a stale entry revalidated (for a client, or in the background), updated
//!   from a 304, or served stale when core fails.

mod answer;
mod fill;
mod hit;
mod load;
mod policy;
mod revalidate;
mod seed;
mod store;

pub use policy::session_cookie;
#[doc(hidden)]
pub use seed::seed;
pub use store::MAX_VARIANTS;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Empty};
use http_cache_semantics::BeforeRequest;
use hyper::body::Incoming;

use crate::compress::Mode;
use crate::config::{normalize_host, CoreCacheConfig};
use crate::flight::MemoryBudget;
use crate::listen::{Body, ConnInfo};
use crate::metrics::{CacheStatus, Metrics};
use crate::proxy::{KeyedScheme, Kind, Proxy};
use answer::Asked;
use fill::{Commit, FlightGuard, Flights, Join, Shared, TeeBody};
use hit::{SURROGATE_CONTROL, X_CACHE_STATUS};
use store::{Scheme, Store};

/// Largest response body stored (bigger ones are passed on, not kept).
const MAX_ENTRY: u64 = 8 << 20;

/// `Surrogate-Capability`, sent to core.
const SURROGATE_CAPABILITY: HeaderName = HeaderName::from_static("surrogate-capability");

/// A request's URL as the index knows it ([`store::url_key`]: host, lower case and without
/// port, a newline, path and query), made once; host and path are read from it. And its
/// scheme, which stored responses are matched on (None: one the cache cannot key).
struct Url {
    key: String,
    host_len: usize,
    scheme: Option<Scheme>,
}

impl Url {
    fn of(req: &Request<Incoming>, scheme: Option<Scheme>) -> Url {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(|h| crate::router::strip_port(h).trim_end_matches('.'))
            .unwrap_or_default();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut key = String::with_capacity(host.len() + 1 + path.len());
        key.push_str(host);
        // As `normalize_host`, without a String of its own.
        key.make_ascii_lowercase();
        key.push('\n');
        key.push_str(path);
        Url {
            key,
            host_len: host.len(),
            scheme,
        }
    }

    fn host(&self) -> &str {
        &self.key[..self.host_len]
    }

    fn path(&self) -> &str {
        &self.key[self.host_len + 1..]
    }
}

/// The core cache.
pub struct CoreCache {
    store: Arc<Store>,
    flights: Arc<Flights>,
    metrics: Metrics,
    /// Longest wait of a follower for the leader's response.
    follow_wait: Duration,
    /// Memory for bodies being received (`max_flight_memory`, shared with media fetches).
    memory: MemoryBudget,
}

impl CoreCache {
    /// Opens the cache directory and returns at once: what a previous run stored is indexed
    /// in the background ([`CoreCache::loaded`]), requests are answered meanwhile. `follow_wait`: how
    /// long a request waits for another one's response to the same URL. `memory`: what the
    /// bodies being received for the cache may hold; a response that does not fit is passed
    /// to its client and not stored.
    pub fn open(
        config: &CoreCacheConfig,
        follow_wait: Duration,
        metrics: Metrics,
        memory: MemoryBudget,
    ) -> std::io::Result<Arc<CoreCache>> {
        let store = Store::open(&config.dir, config.max_size, metrics.clone())?;
        Ok(Arc::new(CoreCache {
            store,
            flights: Arc::default(),
            metrics,
            follow_wait,
            memory,
        }))
    }

    /// Evicts every stored variant of a URL (`host` as in the request's Host, with or
    /// without port; `path_and_query` as requested). Returns how many were stored.
    pub fn purge(&self, host: &str, path_and_query: &str) -> usize {
        let host = normalize_host(crate::router::strip_port(host));
        self.store.remove_url(&host, path_and_query)
    }

    /// Bytes and responses stored (as far as the index has loaded).
    pub fn usage(&self) -> (u64, usize) {
        self.store.usage()
    }

    /// Waits until the index of what a previous run stored has loaded.
    pub async fn loaded(&self) {
        self.store.loaded().await
    }

    /// True while the index is still loading.
    pub fn is_loading(&self) -> bool {
        self.store.is_loading()
    }

    /// Answers one request to core's web pool.
    pub async fn handle(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        req: Request<Incoming>,
        gzip: Mode,
    ) -> Response<Body> {
        let scheme = proxy.scheme_sent(&req).and_then(Scheme::parse);
        let url = Url::of(&req, scheme);
        if let Some(r) = self.fresh_without_vary(&req, &url, gzip).await {
            return r;
        }
        // Everything else in a future of its own: the hit's stays small (a future is moved
        // whole into its caller's, and boxed by the listener, on every request).
        Box::pin(self.handle_full(proxy, req, url, gzip)).await
    }

    async fn handle_full(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        mut req: Request<Incoming>,
        url: Url,
        gzip: Mode,
    ) -> Response<Body> {
        req.headers_mut().insert(
            SURROGATE_CAPABILITY,
            HeaderValue::from_static(policy::SURROGATE_CAPABILITY),
        );
        if let Some(s) = url.scheme {
            // Core is told what the entry is keyed by, whatever a reload of
            // `trusted_proxies` makes of the peer before the request goes (here, not before
            // the fast hit, which sends nothing).
            req.extensions_mut().insert(KeyedScheme(s.as_str()));
        }
        let (host, path) = (url.host(), url.path());
        let get = req.method() == Method::GET;
        if req.headers().contains_key(header::UPGRADE) {
            // A WebSocket handshake: the proxy's tunnel, nothing to cache.
            let resp = proxy.handle(Kind::Web, req).await;
            return self.finish(resp, CacheStatus::Bypass);
        }
        if !get && req.method() != Method::HEAD {
            return self.pass_other(proxy, req, host, path).await;
        }
        // While the index loads: this URL's stored entries read from disk first, so that what
        // follows (lookup, store, replace) sees all of them.
        self.store.settle(&url.key).await;
        let private = policy::private_request(req.headers())
            .or_else(|| policy::token_in_query(path).then_some("access token"));
        // Answered by core for a URL other than its key: never stored nor shared.
        let unkeyed = policy::unkeyed(req.headers())
            .or_else(|| url.scheme.is_none().then_some("x-forwarded-proto"));
        let bodiless = req.body().is_end_stream();
        let keyed = private.is_none() && unkeyed.is_none() && bodiless;
        let Some(scheme) = url.scheme.filter(|_| keyed) else {
            let store = get && bodiless && unkeyed.is_none();
            // Read only when stored, and a request without a scheme is not.
            let scheme = url.scheme.unwrap_or(Scheme::Https);
            let preq = policy::policy_request(scheme, path, req.headers());
            let sent = Instant::now();
            let result = proxy.send(Kind::Web, req).await;
            let ctx = Ctx {
                host,
                path,
                preq: &preq,
                private,
                sent,
                gzip,
            };
            return match result {
                Ok(resp) if store => self.keep(ctx, resp, None, CacheStatus::Bypass),
                other => self.finish(proxy.answer(other), CacheStatus::Bypass),
            };
        };
        self.lookup(proxy, req, &url, scheme, gzip).await
    }

    async fn lookup(
        self: &Arc<Self>,
        proxy: &Arc<Proxy>,
        req: Request<Incoming>,
        url: &Url,
        scheme: Scheme,
        gzip: Mode,
    ) -> Response<Body> {
        let head = req.method() == Method::HEAD;
        let asked = Asked { head, gzip };
        let (host, path) = (url.host(), url.path());
        let preq = policy::policy_request(scheme, path, req.headers());
        let key = &url.key;
        let only_if_cached = policy::directive(req.headers(), "only-if-cached").is_some();
        let no_cache = policy::directive(req.headers(), "no-cache").is_some()
            || req
                .headers()
                .get(header::PRAGMA)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("no-cache"));
        let ctx = Ctx {
            host,
            path,
            preq: &preq,
            private: None,
            sent: Instant::now(),
            gzip,
        };
        let mut followed = false;
        // An entry replaced (or purged) between the lookup and the read of its body has no
        // body any more: the lookup is made once more, which finds what replaced it, rather
        // than sending the client to core (a stale entry's client would wait for core, which
        // `stale-while-revalidate` is there to spare it).
        let mut looked_again = false;
        loop {
            let now = SystemTime::now();
            let mut stale = None;
            let mut vanished = false;
            for e in self.store.variants(host, path) {
                match e.meta.policy.before_request(&preq, now) {
                    BeforeRequest::Fresh(_) => {
                        if let Some(r) =
                            self.serve(&e, req.headers(), asked, CacheStatus::Hit).await
                        {
                            return r;
                        }
                        vanished = true;
                    }
                    BeforeRequest::Stale {
                        request,
                        matches: true,
                    } if stale.is_none() => stale = Some((e, request)),
                    _ => {}
                }
            }
            if only_if_cached {
                return self.finish(status_only(StatusCode::GATEWAY_TIMEOUT), CacheStatus::Miss);
            }
            if req.headers().contains_key(header::RANGE) {
                // Ranges are served from a fresh stored response only; otherwise passed on
                // (a partial response is not stored).
                let result = proxy.send(Kind::Web, req).await;
                return self.finish(proxy.answer(result), CacheStatus::Bypass);
            }
            if let Some((e, _)) = &stale {
                if !no_cache && e.meta.stale_while_revalidate(now) {
                    let e = e.clone();
                    if let Some(guard) = self.flights.try_lead(scheme, key) {
                        let conn = req.extensions().get::<ConnInfo>().copied();
                        let (cache, proxy, e) = (self.clone(), proxy.clone(), e.clone());
                        let request = stale.take().expect("checked").1;
                        tokio::spawn(async move {
                            cache
                                .revalidate_in_background(&proxy, e, request, conn, guard)
                                .await
                        });
                    }
                    if let Some(r) = self
                        .serve(&e, req.headers(), asked, CacheStatus::Stale)
                        .await
                    {
                        return r;
                    }
                    vanished = true;
                }
            }
            if vanished && !looked_again {
                looked_again = true;
                continue;
            }
            if head && stale.is_none() {
                // Not stored from a HEAD: passed on.
                let result = proxy.send(Kind::Web, req).await;
                return self.finish(proxy.answer(result), CacheStatus::Miss);
            }
            let guard = match self.flights.join(scheme, key) {
                Join::Leader(g) => Some(g),
                Join::Follower(mut rx) if !followed => {
                    self.metrics.coalesced();
                    let _ = tokio::time::timeout(self.follow_wait, rx.changed()).await;
                    followed = true;
                    let shared = rx.borrow().clone();
                    if let Some(r) = shared.and_then(|s| self.serve_shared(&s, &preq, &req, head)) {
                        return r;
                    }
                    continue;
                }
                Join::Follower(_) => None,
            };
            return match stale {
                Some((e, request)) => self.revalidate(proxy, ctx, req, e, request, guard).await,
                None => {
                    let result = proxy.send(Kind::Web, req).await;
                    match result {
                        Ok(resp) => self.keep(ctx, resp, guard, CacheStatus::Miss),
                        Err(e) => self.finish(proxy.answer(Err(e)), CacheStatus::Miss),
                    }
                }
            };
        }
    }

    /// A response from core: stored as it streams if storable (the variants it replaces
    /// go), else passed on; `guard` (the URL's flight) is released when that is decided.
    fn keep(
        &self,
        ctx: Ctx<'_>,
        resp: Response<Body>,
        guard: Option<FlightGuard>,
        status: CacheStatus,
    ) -> Response<Body> {
        let now = SystemTime::now();
        let meta = policy::build(
            ctx.host,
            ctx.path,
            ctx.preq,
            ctx.private,
            resp.status(),
            resp.headers(),
            now,
        );
        let matching = || -> Vec<store::Id> {
            self.store
                .variants(ctx.host, ctx.path)
                .into_iter()
                .filter(|e| match e.meta.policy.before_request(ctx.preq, now) {
                    BeforeRequest::Fresh(_) => true,
                    BeforeRequest::Stale { matches, .. } => matches,
                })
                .map(|e| e.id)
                .collect()
        };
        let Some(meta) = meta else {
            if ctx.private.is_none() && policy::forbids_sharing(resp.status(), resp.headers()) {
                // Core no longer lets this answer be shared (a post deleted, made private):
                // what is stored for this request goes, rather than be served stale, and
                // no answer already on its way (sent before this one came) stores it again.
                self.store.invalidate(ctx.host, ctx.path);
                self.evict(matching());
            }
            drop(guard);
            return self.finish(resp, status);
        };
        let replaces = matching();
        let expected = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let limit = MAX_ENTRY.min(self.store.max_size());
        let commit = Commit {
            store: self.store.clone(),
            meta,
            replaces,
            guard,
            sent: ctx.sent,
        };
        let bodiless = resp.status() == StatusCode::NO_CONTENT || expected == Some(0);
        if let (Some(n), false) = (expected, bodiless) {
            let room = (n <= limit && commit.guard.is_some())
                .then(|| self.memory.take(n))
                .flatten();
            if let Some(room) = room {
                // Received by a task of its own, read by this client and the followers.
                let mut commit = commit;
                commit.meta.len = n;
                let guard = commit.guard.take().expect("checked");
                let (parts, body) = resp.into_parts();
                let shared = Shared::start(commit, body, guard, room);
                return self.finish(Response::from_parts(parts, shared.body()), status);
            }
        }
        // Unknown length, or no memory left for the whole body now: copied as it goes to
        // this client, within the memory it can get chunk by chunk.
        let memory = self.memory.clone();
        let resp =
            resp.map(|b| TeeBody::new(b, limit, expected, commit, bodiless, memory).boxed_unsync());
        self.finish(resp, status)
    }

    /// Takes entries out of the index at once (no later request finds them), their files
    /// unlinked on a blocking thread.
    fn evict(&self, ids: Vec<store::Id>) {
        if ids.is_empty() {
            return;
        }
        let store = self.store.clone();
        let gone = store.forget(&ids);
        tokio::task::spawn_blocking(move || store.unlink(&gone));
    }

    /// Any method but GET and HEAD: passed on through the proxy's own handling (a `POST`
    /// with `Idempotency-Key` is sent once, see `proxy::idempotency`); an unsafe one answered
    /// below 400 evicts its URL and the same-host `Location` and `Content-Location`.
    async fn pass_other(
        &self,
        proxy: &Arc<Proxy>,
        req: Request<Incoming>,
        host: &str,
        path: &str,
    ) -> Response<Body> {
        let unsafe_method = !matches!(*req.method(), Method::OPTIONS | Method::TRACE);
        let mut resp = proxy.handle(Kind::Web, req).await;
        if unsafe_method && resp.status().as_u16() < 400 {
            let mut urls = vec![path.to_owned()];
            for h in [header::LOCATION, header::CONTENT_LOCATION] {
                let target = resp
                    .headers()
                    .get(&h)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| same_host_path(host, path, v));
                urls.extend(target);
            }
            // Unlinks (and, while the index loads, a directory read): a blocking thread.
            let (store, host) = (self.store.clone(), host.to_owned());
            let _ = tokio::task::spawn_blocking(move || {
                for p in urls {
                    store.remove_url(&host, &p);
                }
            })
            .await;
        }
        if resp.headers().contains_key(X_CACHE_STATUS) {
            // The proxy's own (REPLAY): counted, kept.
            self.metrics.core_cache(CacheStatus::Bypass);
            resp.headers_mut().remove(SURROGATE_CONTROL);
            return resp;
        }
        self.finish(resp, CacheStatus::Bypass)
    }

    fn finish(&self, mut resp: Response<Body>, status: CacheStatus) -> Response<Body> {
        self.metrics.core_cache(status);
        // Meant for surrogates (this edge), not for clients.
        resp.headers_mut().remove(SURROGATE_CONTROL);
        resp.headers_mut()
            .insert(X_CACHE_STATUS, HeaderValue::from_static(status.as_str()));
        resp
    }
}

/// The request being answered, as the store needs it.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    host: &'a str,
    path: &'a str,
    preq: &'a http::request::Parts,
    private: Option<&'static str>,
    /// When its request went (or was about to go) to core.
    sent: Instant,
    /// What the front door does about gzip for the client.
    gzip: Mode,
}

/// A bodiless request to core from the policy's parts (revalidation), telling core the
/// scheme of the entry (its URI's).
fn upstream_request(parts: http::request::Parts, conn: Option<ConnInfo>) -> Request<Body> {
    let scheme = parts.uri.scheme_str().and_then(Scheme::parse);
    let mut req = Request::from_parts(parts, Empty::new().map_err(|e| match e {}).boxed_unsync());
    if let Some(c) = conn {
        req.extensions_mut().insert(c);
    }
    if let Some(s) = scheme {
        req.extensions_mut().insert(KeyedScheme(s.as_str()));
    }
    req
}

/// The path of a `Location`-like value if it names this host (or is relative).
fn same_host_path(host: &str, base: &str, value: &str) -> Option<String> {
    let base = url::Url::parse(&format!("http://{host}{base}")).ok()?;
    let target = base.join(value).ok()?;
    let target_host = target.host_str()?;
    if normalize_host(target_host) != host {
        return None;
    }
    let mut p = target.path().to_owned();
    if let Some(q) = target.query() {
        p.push('?');
        p.push_str(q);
    }
    Some(p)
}

fn status_only(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = status;
    resp
}

/// The cache buster's target (`[cache_buster]`): a purge evicts every variant of the URL.
impl crate::purge::Purge for CoreCache {
    fn purge(&self, host: &str, path_and_query: &str) -> usize {
        CoreCache::purge(self, host, path_and_query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_on_the_same_host_only() {
        assert_eq!(
            same_host_path("a.b", "/x/y", "z?q=1").as_deref(),
            Some("/x/z?q=1")
        );
        assert_eq!(
            same_host_path("a.b", "/x", "http://a.b:8080/p").as_deref(),
            Some("/p")
        );
        assert_eq!(same_host_path("a.b", "/x", "https://evil.example/p"), None);
    }
}
