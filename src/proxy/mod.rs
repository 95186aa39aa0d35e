//! The guarded reverse proxy to core: the web and streaming pools, header rewriting, bodies
//! streamed both ways, and the guard rails that keep a failing core from taking the edge down
//! with it.
//!
//! A request goes: body over the limit by its `Content-Length`? 413 → the start of its body
//! read (up to 16 KiB, before any upstream is asked: `prebuffer`; a client silent past the
//! idle timeout gets 408) → pick the least busy upstream whose breaker is closed and which is
//! under its connection cap (none: 503 with `Retry-After`, at once) → send, within the
//! first-byte timeout (504) → a transport failure is 502. A request that was sent is never
//! sent again; one that was not (the connection could not be opened) is tried on another
//! upstream when its body is at hand: none, or read whole (a `POST` of a status too, as
//! nginx does). The one exception to "never sent again": a kept connection that the
//! upstream closed as the request was written (the keep-alive race: EOF or a reset, not one
//! byte of an answer) gets a safe request without a body (GET, HEAD, OPTIONS, TRACE) once
//! more, on a new connection to the same upstream, within the same first-byte timeout, not
//! counted as the upstream's failure. A POST, PATCH, PUT or DELETE, or a request whose body
//! was streamed, gets 502.
//!
//! - `breaker`: the circuit breaker of one upstream.
//! - `conns`: our keep-alive connections to the upstreams, driven by the request's own task.
//! - `upstream`: the upstreams of a pool, their caps, the least-connections pick.
//! - `headers`: hop-by-hop removal, `X-Forwarded-*`, `X-Real-IP`.
//! - `upgrade`: WebSocket handshakes and the tunnels after them.
//! - `health`: active health checks and the per-upstream series on `/metrics`.
//! - `body`: request bodies under a limit, response bodies under an idle timeout.
//! - `prebuffer`: the start of a request body, read before an upstream is chosen.
//! - `spool`: large answers read ahead of a slow client (nginx's `proxy_buffering`).
//! - `stored`: request bodies read whole before an upstream is chosen (nginx's
//!   `proxy_request_buffering`).
//! - `temp`: the temp file of one buffered body.
//! - `idempotency`: `POST`s with `Idempotency-Key`: one request to core, the others wait for
//!   it or get its response replayed.
//! - `live`: the pools, client and limits a reload swaps ([`Proxy::update`]).

mod body;
pub mod breaker;
mod conns;
mod headers;
pub use headers::{join_cookies, strip_connection_named};
mod health;
pub mod idempotency;
mod live;
mod prebuffer;
pub mod spool;
mod stored;
mod temp;
mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::config::CoreConfig;
use crate::listen::{Body, ConnInfo};
pub use health::UpstreamCollector;
pub use live::Live;
use upstream::NoUpstream;

/// The request body type sent upstream.
type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// Why a proxied request got no answer from core; each maps to the status the client sees.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body is larger than `max_request_body`.
    #[error("request body over {0} bytes")]
    TooLarge(u64),
    /// Every upstream's breaker is open (or its health check fails).
    #[error("every upstream is failing; retry after {0:?}")]
    Open(Duration),
    /// Every upstream is at its connection cap.
    #[error("every upstream is at its connection cap")]
    Full,
    /// The pool has no upstream (no streaming upstreams configured).
    #[error("no upstream configured")]
    NoUpstream,
    /// No response head within the first-byte timeout.
    #[error("upstream {0} sent no answer within the first-byte timeout")]
    Timeout(SocketAddr),
    /// Refused, reset, or closed before answering.
    #[error("upstream {addr}: {message}")]
    Upstream {
        /// The upstream.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// The client's request body could not be read.
    #[error("the request body could not be read: {0}")]
    ClientBody(String),
    /// The client sent nothing of its request body for this long (before an upstream was
    /// chosen: see `prebuffer`).
    #[error("no more of the request body came within {0:?}")]
    ClientSilent(Duration),
}

impl ProxyError {
    /// The status answered for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Open(_) | ProxyError::Full => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoUpstream | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientSilent(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn response(&self) -> Response<Body> {
        let mut resp = status_text(self.status());
        let retry = match self {
            ProxyError::Open(d) => Some(d.as_secs_f64().ceil().max(1.0) as u64),
            ProxyError::Full => Some(1),
            _ => None,
        };
        if let Some(secs) = retry {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Which pool a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Puma.
    Web,
    /// The streaming server.
    Streaming,
}

/// The `X-Forwarded-Proto` core is told, whatever the trust when the request is sent: the
/// scheme the core cache keyed the request by, decided by [`Proxy::scheme_sent`] when it came
/// (in the request's extensions). A reload of `trusted_proxies` while the request waits (a
/// follower of another request, an index still loading) then cannot have core's answer for
/// one scheme stored under the other.
#[derive(Clone, Copy, Debug)]
pub struct KeyedScheme(pub &'static str);

/// A first-byte timeout of its own for one request (in its extensions), in place of
/// `[core] first_byte_timeout`: the leader of a `POST` with `Idempotency-Key` waits longer
/// for core than its client does (see [`Proxy::handle`]).
#[derive(Clone, Copy, Debug)]
struct FirstByte(Duration);

/// Told (in a request's extensions) once the request has all been sent to core, or once it
/// waits for another's answer: its client's first-byte timeout starts then (see
/// [`Proxy::handle`]).
#[derive(Clone, Debug)]
struct Sent(Arc<tokio::sync::Notify>);

/// How long the leader of a `POST` with `Idempotency-Key` waits for core's answer, past its
/// client's `first_byte_timeout`: a post core is slow to make is made all the same, and its
/// answer is what the user's retry must get.
const LEADER_WAIT: Duration = Duration::from_secs(300);

/// The reverse proxy to core.
pub struct Proxy {
    /// The pools, client and limits of the current `[core]` (swapped by a reload).
    live: parking_lot::RwLock<Arc<Live>>,
    /// Told when a reload swapped `live` (the health checks pick up a new interval).
    changed: tokio::sync::Notify,
    /// Cancelled at shutdown: every WebSocket tunnel closes.
    tunnels: tokio_util::sync::CancellationToken,
    /// `POST`s with `Idempotency-Key`, in flight and answered.
    pub idempotency: idempotency::Idempotency,
    /// The tasks of `POST`s with `Idempotency-Key`, which outlive their clients (tracked so
    /// that a shutdown waits for them).
    tasks: tokio_util::task::TaskTracker,
    /// Where large answers are buffered (set by `serve` once `data_dir` is its own; until
    /// then, and in a proxy without it, every answer goes at its client's pace).
    spooler: std::sync::OnceLock<spool::Spooler>,
}

impl Proxy {
    /// Sets up the pools of `[core]`.
    /// `tasks`: where the tasks of `POST`s with `Idempotency-Key` are tracked (`serve`'s
    /// fetches, waited for at shutdown up to `drain_timeout`).
    pub fn new(config: &CoreConfig, tasks: tokio_util::task::TaskTracker) -> Proxy {
        Proxy {
            live: parking_lot::RwLock::new(Arc::new(Live::new(config, None))),
            changed: tokio::sync::Notify::new(),
            tunnels: tokio_util::sync::CancellationToken::new(),
            idempotency: idempotency::Idempotency::default(),
            tasks,
            spooler: std::sync::OnceLock::new(),
        }
    }

    /// Bytes of buffered bodies in memory and in temp files now (whole KiB), with a spooler.
    pub fn buffered(&self) -> Option<(u64, u64)> {
        let s = self.spooler.get()?;
        Some((s.memory.in_use(), s.disk_room.in_use()))
    }

    /// Buffers large answers with `spooler` from now on (`[core] buffer_responses`).
    pub fn buffer_with(&self, spooler: spool::Spooler) {
        let _ = self.spooler.set(spooler);
    }

    /// Swaps in the pools and limits of a reloaded `[core]`: new requests use them; requests
    /// under way end on the pools they began with. Upstreams that stay keep their state.
    pub fn update(&self, config: &CoreConfig) {
        let mut live = self.live.write();
        *live = Arc::new(Live::new(config, Some(&live)));
        drop(live);
        self.changed.notify_waiters();
    }

    /// The pools, client and limits in use now (`live().pool(kind)`: a pool's upstreams).
    pub fn live(&self) -> Arc<Live> {
        self.live.read().clone()
    }

    /// `trusted_proxies` in use now (a reload that removes `[core]` keeps the old ones, as
    /// it keeps the proxy).
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.live.read().trusted.clone()
    }

    /// Whether core's responses are gzipped for clients that take it (`[core] gzip`, as
    /// reloaded).
    pub fn gzip(&self) -> bool {
        self.live.read().gzip
    }

    /// The scheme core is told a request came by (`X-Forwarded-Proto`), when it is `http`
    /// or `https` ([`headers::proto_sent`]).
    pub fn scheme_sent<B>(&self, req: &Request<B>) -> Option<&'static str> {
        let info = req.extensions().get::<ConnInfo>().copied();
        headers::proto_sent(req.headers(), info.is_some_and(|i| i.tls), || {
            let peer = peer(info);
            self.live.read().trusted.iter().any(|n| n.contains(&peer))
        })
    }

    /// Answers one request from the upstreams of `kind`.
    pub async fn handle(self: &Arc<Self>, kind: Kind, req: Request<Incoming>) -> Response<Body> {
        if kind == Kind::Web {
            if let Some(fp) = idempotency::fingerprint(&req) {
                // In a task of its own, which goes on when the client leaves or gives up
                // at `first_byte_timeout` (504) once its post was sent: core makes the post
                // whether or not its client stays (puma finishes a request whose client
                // left, and a slow one), and its answer must be kept for the app's retry
                // with the same key, or that retry posts it again. The leader waits for
                // core up to `LEADER_WAIT`. A task not sent yet (waiting for another's
                // answer) stops with its client: it must never post for a client already
                // answered, nor keep its unread body holding the client's connection.
                let mut req = req;
                let sent = Arc::new(tokio::sync::Notify::new());
                req.extensions_mut().insert(Sent(sent.clone()));
                let gone = tokio_util::sync::CancellationToken::new();
                let _gone_with_this = gone.clone().drop_guard();
                let proxy = self.clone();
                let task = self
                    .tasks
                    .spawn(async move { proxy.handle_idempotent(fp, req, gone).await });
                let first_byte = self.live().first_byte_timeout;
                let timer = async {
                    sent.notified().await;
                    tokio::time::sleep(first_byte).await;
                };
                return tokio::select! {
                    answered = task => answered.unwrap_or_else(|e| {
                        tracing::error!(error = %e, "proxy: an idempotent request's task failed");
                        status_text(StatusCode::BAD_GATEWAY)
                    }),
                    () = timer => status_text(StatusCode::GATEWAY_TIMEOUT),
                };
            }
        }
        self.reply(kind, req).await
    }

    /// A `POST` with `Idempotency-Key` and credentials: one at a time to core, the answer
    /// replayed to the others (see [`idempotency`]).
    /// `gone`: its client was answered (504) or left; then it stops unless it leads.
    async fn handle_idempotent(
        &self,
        fp: idempotency::Fingerprint,
        mut req: Request<Incoming>,
        gone: tokio_util::sync::CancellationToken,
    ) -> Response<Body> {
        use crate::metrics::CacheStatus;
        use idempotency::Claim;
        // What a task whose client is gone returns (nobody reads it).
        let unread = || status_text(StatusCode::GATEWAY_TIMEOUT);
        loop {
            if gone.is_cancelled() {
                return unread();
            }
            match self.idempotency.claim(fp) {
                Claim::Replay(stored) => return stored.response(Some(CacheStatus::Replay)),
                Claim::Wait(rx) => {
                    // Its client's first-byte timeout runs from here (nothing of it is sent).
                    if let Some(Sent(sent)) = req.extensions().get::<Sent>() {
                        sent.notify_one();
                    }
                    tokio::select! {
                        outcome = idempotency::wait(rx) => if let Some(stored) = outcome {
                            return stored.response(Some(CacheStatus::Replay));
                        },
                        () = gone.cancelled() => return unread(),
                    }
                    // The leader failed: claim again (one of the waiters leads next).
                }
                Claim::Lead(lead) => {
                    let first_byte = LEADER_WAIT.max(self.live().first_byte_timeout);
                    req.extensions_mut().insert(FirstByte(first_byte));
                    let resp = self.reply(Kind::Web, req).await;
                    return lead.finish(resp).await;
                }
                Claim::Bypass => return self.reply(Kind::Web, req).await,
            }
        }
    }

    async fn reply(&self, kind: Kind, req: Request<Incoming>) -> Response<Body> {
        self.answer(self.forward(kind, req).await)
    }

    /// The response for the outcome of [`Proxy::send`]: the upstream's, or the error's status.
    pub fn answer(&self, result: Result<Response<Body>, ProxyError>) -> Response<Body> {
        match result {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(error = %e, "proxy: no answer from core");
                e.response()
            }
        }
    }

    /// Sends one request to the upstreams of `kind` (headers rewritten as for any proxied
    /// request, from the `ConnInfo` in its extensions) and returns the upstream's response,
    /// or why there is none. Used by the core cache, which decides what to do with errors.
    pub async fn send<B>(&self, kind: Kind, req: Request<B>) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.forward(kind, req).await
    }

    async fn forward<B>(&self, kind: Kind, req: Request<B>) -> Result<Response<Body>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let live = self.live();
        let pool = live.pool(kind);
        if pool.upstreams.is_empty() {
            return Err(ProxyError::NoUpstream);
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > live.max_body) {
            return Err(ProxyError::TooLarge(live.max_body));
        }
        // A WebSocket handshake (HTTP/1.1 Upgrade): the protocol asked for is passed on, and
        // a 101 from the upstream joins the two connections into a tunnel.
        let mut req = req;
        let upgrade = upgrade::requested(&req);
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let info = parts.extensions.get::<ConnInfo>().copied();
        let first_byte = parts
            .extensions
            .get::<FirstByte>()
            .map_or(live.first_byte_timeout, |f| f.0);
        let sent = parts.extensions.get::<Sent>().map(|s| s.0.clone());
        let peer = peer(info);
        let trusted = live.trusted.iter().any(|n| n.contains(&peer));
        headers::forward(
            &mut parts.headers,
            peer,
            info.is_some_and(|i| i.tls),
            trusted,
        );
        if let Some(KeyedScheme(scheme)) = parts.extensions.get::<KeyedScheme>() {
            headers::tell_proto(&mut parts.headers, scheme);
        }
        if let Some(protocol) = upgrade {
            upgrade::ask(&mut parts.headers, protocol);
        }
        // Shared, not copied: each attempt's URI is this and the upstream's authority.
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let bodiless = body.is_end_stream();
        // Set by the body's limit when passed (a bodiless request has none to pass).
        let mut exceeded = None;
        // The start of a body is read before an upstream is chosen (see `prebuffer`); one
        // read whole is kept and sent again as often as needed.
        let mut whole = None;
        // A streamed body (past the start) tells how far it has been sent: the first-byte
        // timeout starts once it all went, not before (an upload on a slow link goes at its
        // client's pace); until then `idle_timeout` bounds a stall, on either side.
        let mut uploaded: Option<(watch::Receiver<bool>, Arc<AtomicBool>)> = None;
        let mut body = if bodiless && client_upgrade.is_none() {
            // Nothing to read or limit (`attempt` sends an empty body): no allocation for the
            // most common request.
            None
        } else {
            let flag = exceeded.insert(Arc::new(AtomicBool::new(false))).clone();
            let limited = body::LimitedBody::new(body, live.max_body, flag);
            if client_upgrade.is_some() {
                Some(limited.boxed_unsync())
            } else {
                let silence = (!live.idle_timeout.is_zero()).then_some(live.idle_timeout);
                let spooler = self.spooler.get().filter(|_| live.buffer_requests);
                match read_body(limited, silence, spooler).await {
                    Ok(Got::Whole(all)) => {
                        whole = Some(all);
                        None
                    }
                    // Timed by its silences only while they are bounded (`idle_timeout` not 0).
                    Ok(Got::Streams(start)) if !live.idle_timeout.is_zero() => {
                        let (start, progress, on_client) = body::Uploaded::new(start);
                        uploaded = Some((progress, on_client));
                        Some(start.boxed_unsync())
                    }
                    Ok(Got::Streams(start)) => Some(start),
                    Err(_) if passed(exceeded.as_deref()) => {
                        return Err(ProxyError::TooLarge(live.max_body))
                    }
                    Err(prebuffer::StartError::Client(e)) => {
                        return Err(ProxyError::ClientBody(e.to_string()))
                    }
                    Err(prebuffer::StartError::Silent(d)) => {
                        return Err(ProxyError::ClientSilent(d))
                    }
                }
            }
        };
        // On another upstream when the connection could not be opened (nothing was sent):
        // any request whose body is at hand (none, or read whole).
        let replayable = bodiless || whole.is_some();
        // A streamed body given back unread when a connection could not be opened.
        let mut given_back = false;
        // On a new connection to the same upstream when a kept one ended before any byte of
        // an answer: that request may have reached core and been acted on before core died (a
        // worker killed mid-request), so only a safe one without a body, as Go's client does.
        // RFC 9110 §9.2.2 would allow PUT and DELETE too, but a DELETE that core did and then
        // could not answer, sent again, answers 404 to a client whose delete worked.
        let resendable = bodiless && parts.method.is_safe();
        if uploaded.is_none() {
            // All at hand: sent from now on (a streamed body tells when it has all gone).
            if let Some(sent) = &sent {
                sent.notify_one();
            }
        }
        let mut tried = Vec::new();
        loop {
            let admission = match pool.pick(&tried) {
                Ok(a) => a,
                Err(NoUpstream::Open(wait)) => return Err(ProxyError::Open(wait)),
                Err(NoUpstream::Full) => return Err(ProxyError::Full),
                Err(NoUpstream::Exhausted) => {
                    return Err(ProxyError::Upstream {
                        addr: *tried.last().expect("tried one"),
                        message: "every upstream refused the connection".into(),
                    })
                }
            };
            let addr = admission.upstream.addr;
            tried.push(addr);
            let other_upstream = replayable && tried.len() < pool.upstreams.len();
            if client_upgrade.is_none() {
                // Our own connections (`conns`). The first-byte timeout covers both sends
                // on one upstream (a kept connection, then a new one).
                let deadline = tokio::time::Instant::now() + first_byte;
                let mut fresh = false;
                let failed = loop {
                    let again = other_upstream || (resendable && !fresh);
                    let mut up = attempt(&mut parts, &mut body, whole.as_ref(), again);
                    // Origin-form URI, `Host` always set.
                    *up.uri_mut() = http::Uri::from(path.clone());
                    if !up.headers().contains_key(header::HOST) {
                        let host = HeaderValue::from_str(admission.upstream.authority.as_str());
                        up.headers_mut()
                            .insert(header::HOST, host.expect("an address is a value"));
                    }
                    // A body read whole (`stored`) goes at core's pace: timed as a streamed
                    // one, by its silences while it goes (core's alone: the client is done),
                    // then the first-byte timeout, not as a whole (nginx times each write).
                    let mut timing = uploaded.clone();
                    if let (Some(Whole::Stored(_)), false) = (&whole, live.idle_timeout.is_zero()) {
                        let all = std::mem::replace(up.body_mut(), empty());
                        let (all, progress, _) = body::Uploaded::new(all);
                        *up.body_mut() = all.boxed_unsync();
                        timing = Some((progress, Arc::new(AtomicBool::new(false))));
                    }
                    let upstream = &admission.upstream;
                    let send =
                        conns::send(upstream, up, live.connect_timeout, live.max_idle, fresh);
                    let sent = match &timing {
                        None => tokio::time::timeout_at(deadline, send)
                            .await
                            .map_err(|_| ()),
                        Some((progress, on_client)) => {
                            let timeouts = (live.idle_timeout, first_byte);
                            let told = sent.as_deref();
                            match first_byte_after(progress.clone(), timeouts, told, send).await {
                                Ok(sent) => Ok(sent),
                                // The client stopped sending: its fault, not core's.
                                Err(Stall::Upload) if on_client.load(Ordering::Relaxed) => {
                                    admission.neutral();
                                    return Err(ProxyError::ClientSilent(live.idle_timeout));
                                }
                                Err(_) => Err(()),
                            }
                        }
                    };
                    break match sent {
                        Ok(Ok(resp)) => return Ok(self.answered(kind, &live, admission, resp)),
                        // The keep-alive race: sent once more, not counted as a failure.
                        Ok(Err(conns::SendError::Stale(e))) if resendable && !fresh => {
                            upstream.stale_retries.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%addr, error = %e, "proxy: kept connection closed before answering; sending again on a new one");
                            fresh = true;
                            continue;
                        }
                        Err(()) => Failed::Timeout,
                        Ok(Err(conns::SendError::Connect(e, back))) => {
                            if let (Some(back), true) = (back, whole.is_none()) {
                                // Nothing was sent: the streamed body can go elsewhere.
                                let (back, unread) = back.into_parts();
                                parts.headers = back.headers;
                                body = Some(unread);
                                given_back = true;
                            }
                            Failed::Connect(e.to_string())
                        }
                        Ok(Err(conns::SendError::Http(e) | conns::SendError::Stale(e))) => {
                            match e.is_user() {
                                true => Failed::client(&e),
                                false => Failed::Other(error_chain(&e)),
                            }
                        }
                    };
                };
                match self.failed(
                    failed,
                    admission,
                    addr,
                    replayable || given_back,
                    exceeded.as_deref(),
                    &live,
                ) {
                    Some(err) => return Err(err),
                    None => continue,
                }
            }
            let mut up = attempt(&mut parts, &mut body, whole.as_ref(), other_upstream);
            // A WebSocket handshake: hyper-util's client, whose connections can be upgraded.
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(http::uri::Scheme::HTTP);
            uri.authority = Some(admission.upstream.authority.clone());
            uri.path_and_query = Some(path.clone());
            *up.uri_mut() = http::Uri::from_parts(uri).expect("scheme, authority and path");
            let sent = tokio::time::timeout(first_byte, live.client.request(up)).await;
            let failed = match sent {
                Ok(Ok(resp)) => {
                    if let (StatusCode::SWITCHING_PROTOCOLS, Some(client)) =
                        (resp.status(), client_upgrade)
                    {
                        let permit = admission.answered(true);
                        let idle = live.stream_idle_timeout;
                        return Ok(upgrade::tunnel(
                            client,
                            resp,
                            permit,
                            idle,
                            self.tunnels.clone(),
                        ));
                    }
                    return Ok(self.answered(kind, &live, admission, resp));
                }
                Err(_) => Failed::Timeout,
                Ok(Err(e)) if client_body_failed(&e) => Failed::client(&e),
                Ok(Err(e)) if e.is_connect() => Failed::Connect(error_chain(&e)),
                Ok(Err(e)) => Failed::Other(error_chain(&e)),
            };
            if let Some(err) = self.failed(
                failed,
                admission,
                addr,
                replayable,
                exceeded.as_deref(),
                &live,
            ) {
                return Err(err);
            }
        }
    }

    /// The upstream's response on its way to the client: the breaker told, hop-by-hop
    /// headers removed, the body under the idle timeout and holding the connection permit,
    /// read ahead of the client when large (`spool`).
    fn answered<B>(
        &self,
        kind: Kind,
        live: &Live,
        admission: upstream::Admission,
        resp: Response<B>,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let permit = admission.answered(!matches!(resp.status().as_u16(), 502..=504));
        let (mut rparts, rbody) = resp.into_parts();
        headers::strip_hop_by_hop(&mut rparts.headers);
        let idle = match kind {
            Kind::Web => live.idle_timeout,
            Kind::Streaming => live.stream_idle_timeout,
        };
        let idle = (!idle.is_zero()).then_some(idle);
        let mut body = body::GuardedBody::new(rbody, idle, permit).boxed_unsync();
        if let (Kind::Web, true, Some(spooler)) = (kind, live.buffer, self.spooler.get()) {
            if spool::wanted(&rparts.headers, &body) {
                body = spooler.spool(body, live.max_temp_file);
            }
        }
        Response::from_parts(rparts, body)
    }

    /// What a failed attempt answers (the breaker told), or None to try another upstream: the
    /// connection could not be opened and the request can be sent again (`replayable`).
    fn failed(
        &self,
        failed: Failed,
        admission: upstream::Admission,
        addr: SocketAddr,
        replayable: bool,
        exceeded: Option<&AtomicBool>,
        live: &Live,
    ) -> Option<ProxyError> {
        if let Failed::Timeout = failed {
            admission.failure();
            return Some(ProxyError::Timeout(addr));
        }
        if passed(exceeded) {
            admission.neutral();
            return Some(ProxyError::TooLarge(live.max_body));
        }
        let message = match failed {
            Failed::ClientBody(message) => {
                admission.neutral();
                return Some(ProxyError::ClientBody(message));
            }
            Failed::ClientSilent => {
                admission.neutral();
                return Some(ProxyError::ClientSilent(live.idle_timeout));
            }
            Failed::Connect(message) if replayable => {
                admission.failure();
                tracing::debug!(%addr, error = %message, "proxy: connect failed; trying another upstream");
                return None;
            }
            Failed::Connect(message) | Failed::Other(message) => message,
            Failed::Timeout => unreachable!("answered above"),
        };
        admission.failure();
        Some(ProxyError::Upstream { addr, message })
    }
}

/// A request's peer address (loopback for a request made here). A dual-stack listener sees
/// IPv4 clients as `::ffff:a.b.c.d`: compared and passed on as IPv4.
fn peer(info: Option<ConnInfo>) -> std::net::IpAddr {
    info.map(|i| i.peer.ip().to_canonical())
        .unwrap_or([127, 0, 0, 1].into())
}

/// Whether a request body's limit was passed (`LimitedBody`'s flag).
fn passed(exceeded: Option<&AtomicBool>) -> bool {
    exceeded.is_some_and(|e| e.load(Ordering::Acquire))
}

/// How a streamed request's wait for its answer timed out.
enum Stall {
    /// No piece of the body went for `idle_timeout` (the client sent none, or the upstream
    /// read none).
    Upload,
    /// The body all went, and no answer came within the first-byte timeout.
    FirstByte,
}

/// `send` of a streamed request: while its body goes, no more than `idle` between two
/// pieces; once it all went (or was dropped), the first-byte timeout.
/// `sent` is told once the body has all gone.
async fn first_byte_after<F: std::future::Future>(
    mut progress: watch::Receiver<bool>,
    (idle, first_byte): (Duration, Duration),
    sent: Option<&tokio::sync::Notify>,
    send: F,
) -> Result<F::Output, Stall> {
    let mut send = std::pin::pin!(send);
    while !*progress.borrow_and_update() {
        let moved = tokio::time::timeout(idle, progress.changed());
        tokio::select! {
            biased;
            answered = &mut send => return Ok(answered),
            moved = moved => match moved {
                Ok(Ok(())) => {}
                // The body is gone (sent, or dropped by hyper): the answer is next.
                Ok(Err(_)) => break,
                Err(_) => return Err(Stall::Upload),
            },
        }
    }
    if let Some(sent) = sent {
        sent.notify_one();
    }
    tokio::time::timeout(first_byte, send)
        .await
        .map_err(|_| Stall::FirstByte)
}

/// A request body read whole: sent as often as needed.
enum Whole {
    /// Up to `prebuffer::PREBUFFER` (and at most a piece more).
    Start(Bytes),
    /// Longer, read to its end before an upstream was chosen (`stored`).
    Stored(Arc<stored::Stored>),
}

impl Whole {
    /// A body of these bytes from the start.
    fn body(&self) -> UpBody {
        match self {
            Whole::Start(bytes) => Full::new(bytes.clone())
                .map_err(|e| match e {})
                .boxed_unsync(),
            Whole::Stored(stored) => stored.body().boxed_unsync(),
        }
    }
}

/// What was read of a request body before an upstream is chosen.
enum Got {
    Whole(Whole),
    /// The start; the rest streams as it comes.
    Streams(UpBody),
}

/// Reads the start of a request body (`prebuffer`) and, with `spooler`
/// (`buffer_requests`), the rest too (`stored`), each piece within `silence`.
async fn read_body<B>(
    limited: body::LimitedBody<B>,
    silence: Option<Duration>,
    spooler: Option<&spool::Spooler>,
) -> Result<Got, prebuffer::StartError>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let start = match prebuffer::read(limited, prebuffer::PREBUFFER, silence).await? {
        prebuffer::Start::Whole(bytes) => return Ok(Got::Whole(Whole::Start(bytes))),
        prebuffer::Start::Partial(start) => start,
    };
    let Some(spooler) = spooler else {
        return Ok(Got::Streams(start.boxed_unsync()));
    };
    Ok(match spooler.read_request(start).await? {
        stored::Read::Whole(stored) => Got::Whole(Whole::Stored(stored)),
        stored::Read::Partial(rest) => Got::Streams(rest.boxed_unsync()),
    })
}

/// One attempt's request: the body (a copy of `whole`, the body read whole, for every
/// attempt; else the streamed one, none left after the first attempt), the method, and the
/// headers, copied when another attempt may need them (`again`), else taken.
fn attempt(
    parts: &mut http::request::Parts,
    body: &mut Option<UpBody>,
    whole: Option<&Whole>,
    again: bool,
) -> Request<UpBody> {
    let body = match whole {
        Some(all) => all.body(),
        None => body.take().unwrap_or_else(empty),
    };
    let mut up = Request::new(body);
    *up.method_mut() = parts.method.clone();
    *up.headers_mut() = match again {
        true => parts.headers.clone(),
        false => std::mem::take(&mut parts.headers),
    };
    up
}

/// An empty request body.
fn empty() -> UpBody {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
}

/// How one attempt to send a request upstream failed.
enum Failed {
    /// No response head within the first-byte timeout.
    Timeout,
    /// The connection could not be opened (nothing was sent).
    Connect(String),
    /// The client's request body could not be read.
    ClientBody(String),
    /// The client sent no more of its request body within the idle timeout (`prebuffer`).
    ClientSilent,
    /// Anything else (refused, reset, closed before answering).
    Other(String),
}

impl Failed {
    /// The client's side failed (hyper's user error, from the request body): silent past
    /// the idle timeout (`prebuffer`'s cut), or another fault of its body.
    fn client(e: &(dyn std::error::Error + 'static)) -> Failed {
        match timed_out(e) {
            true => Failed::ClientSilent,
            false => Failed::ClientBody(e.to_string()),
        }
    }
}

/// Whether a client error came from reading the client's own request body.
fn client_body_failed(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_user();
        }
        source = s.source();
    }
    false
}

/// Whether an error, or one of its sources, is a timeout (the idle timeout of a request body:
/// `prebuffer::Prefixed`).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// A status answered with its own line as the body (`504 Gateway Timeout`).
fn status_text(status: StatusCode) -> Response<Body> {
    text(status, format!("{status}\n"))
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
