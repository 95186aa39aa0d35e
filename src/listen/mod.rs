//! Listeners and connections: binds, accepts, serves each connection with hyper, keeps every
//! connection task in a [`TaskTracker`], and stops gracefully.
//!
//! Stopping goes in two steps. [`Listeners::stop_accepting`] ends the accept loops and drops
//! their sockets, so a new connect is refused, then asks every open connection to finish
//! (hyper's `graceful_shutdown`: a response under way completes, an idle keep-alive
//! connection closes). [`Listeners::drain_until`] then waits for the connections to end and,
//! at the deadline, cuts those left and says how many.
//!
//! A listener is plain TCP with HTTP/1.1, or TLS ([`tls`]: certificates by SNI, reloaded on
//! SIGHUP) with HTTP/2 or HTTP/1.1 as ALPN chose. [`redirect`] is the plain-HTTP handler that
//! sends clients to https.
//!
//! The public listeners share one cap on open connections ([`cap`], `max_connections`); at the
//! cap they stop accepting. The admin listener ([`Listeners::serve_admin`]) is not capped.
//!
//! The listener knows nothing of media: it serves a [`Handler`] that [`crate::serve`] gives it.

pub mod cap;
mod idle;
pub mod per_ip;
pub mod redirect;
mod socket;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A response body: bytes from memory or a file, or an I/O error that aborts the response.
/// The same type as [`crate::edge::Body`].
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

/// An empty [`Body`].
pub fn empty() -> Body {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// What a listener serves: a request and who sent it in, a response out.
pub type Handler = Arc<
    dyn Fn(Request<Incoming>, ConnInfo) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>>
        + Send
        + Sync,
>;

/// Wraps an async function as a [`Handler`].
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(Request<Incoming>, ConnInfo) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |req, info| Box::pin(f(req, info)))
}

/// Who is at the other end of a connection: given to the [`Handler`] with each request.
/// (An argument, not a request extension: inserting one allocates the extension map on every
/// request, and only the proxy's routes need it.)
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// The peer's address.
    pub peer: SocketAddr,
    /// True on a TLS listener.
    pub tls: bool,
}

/// HTTP/2: a connection that received nothing for this long is sent a PING ...
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);

/// ... and closed if the answer does not come within this (a client gone without a FIN).
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2: streams one connection may have open at once (nginx's default; hyper's is 200).
/// Each may hold a file, a flight or an upstream connection.
const H2_MAX_STREAMS: u32 = 128;

/// After closing a connection, how long to read and discard what the client still sends
/// before the socket is closed.
const LINGER: Duration = Duration::from_secs(2);

/// A client that does not finish the TLS handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a listener's connections are set up.
#[derive(Clone)]
enum Transport {
    /// Plain TCP, HTTP/1.1.
    Plain,
    /// TLS, then HTTP/2 or HTTP/1.1 by ALPN.
    Tls(tokio_rustls::TlsAcceptor),
}

/// The HTTP versions a connection may speak.
#[derive(Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

/// Binds `addr`; `what` names the config key in the error.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Every accept loop and connection of a server, and the signals that stop them.
pub struct Listeners {
    /// Ends the accept loops.
    stop_accept: CancellationToken,
    /// The accept loops; each drops its socket when it ends.
    accepting: TaskTracker,
    /// Cancelled once every accept loop has ended: new connects are refused from then on.
    closed: CancellationToken,
    /// Asks every connection to finish what it is doing and close.
    drain: CancellationToken,
    /// Drops every connection still open (the drain timeout passed).
    cut: CancellationToken,
    /// One task per open connection.
    connections: TaskTracker,
    /// The cap on the public listeners' connections, if any.
    cap: Option<Arc<cap::ConnectionCap>>,
}

impl Default for Listeners {
    fn default() -> Self {
        Self::new()
    }
}

impl Listeners {
    /// No listener yet; add them with [`Listeners::serve`].
    pub fn new() -> Self {
        Listeners {
            stop_accept: CancellationToken::new(),
            accepting: TaskTracker::new(),
            closed: CancellationToken::new(),
            drain: CancellationToken::new(),
            cut: CancellationToken::new(),
            connections: TaskTracker::new(),
            cap: None,
        }
    }

    /// No listener yet; the public listeners ([`Listeners::serve`], [`Listeners::serve_tls`])
    /// will share `cap`.
    pub fn with_cap(cap: Arc<cap::ConnectionCap>) -> Self {
        Listeners {
            cap: Some(cap),
            ..Self::new()
        }
    }

    /// Accepts plain-TCP connections on `listener` and serves HTTP/1.1 on them with `handler`
    /// until [`Listeners::stop_accepting`].
    /// A public listener: its connections count under the cap.
    pub fn serve(&self, listener: TcpListener, handler: Handler) {
        self.accept(listener, Transport::Plain, handler, self.cap.clone());
    }

    /// Like [`Listeners::serve`], outside the cap: for the admin listener, which the operator
    /// must reach while the public listeners are full.
    pub fn serve_admin(&self, listener: TcpListener, handler: Handler) {
        self.accept(listener, Transport::Plain, handler, None);
    }

    /// Accepts TLS connections on `listener` and serves HTTP/2 or HTTP/1.1 (as the client
    /// chose by ALPN) on them with `handler` until [`Listeners::stop_accepting`]. A public
    /// listener: its connections count under the cap.
    pub fn serve_tls(
        &self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        handler: Handler,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        self.accept(
            listener,
            Transport::Tls(acceptor),
            handler,
            self.cap.clone(),
        );
    }

    fn accept(
        &self,
        listener: TcpListener,
        transport: Transport,
        handler: Handler,
        cap: Option<Arc<cap::ConnectionCap>>,
    ) {
        let stop = self.stop_accept.clone();
        let conns = self.conn_signals();
        let tracker = self.connections.clone();
        self.accepting.spawn(async move {
            loop {
                // At the cap: stop accepting (see `cap` for why not accept and close).
                if let Some(cap) = &cap {
                    if !cap.room(&stop).await {
                        break;
                    }
                }
                let (stream, peer) = tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => (stream, peer),
                        Err(e) => {
                            // Out of file descriptors and the like: wait a little, go on.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                // Past `max_connections_per_ip`: closed at once (the stream is dropped).
                let per_ip = match cap.as_ref().map(|c| c.per_ip.admit(peer.ip())) {
                    Some(Err(per_ip::Refused)) => continue,
                    Some(Ok(hold)) => hold,
                    None => None,
                };
                let slot = match &cap {
                    Some(cap) => match cap.slot(&stop, per_ip).await {
                        Some(slot) => Some(slot),
                        None => break,
                    },
                    None => None,
                };
                let _ = stream.set_nodelay(true);
                let (stream, lingering) = match with_linger_handle(stream) {
                    Ok(handles) => handles,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot set up an accepted connection");
                        continue;
                    }
                };
                let (handler, conns) = (handler.clone(), conns.clone());
                let transport = transport.clone();
                // What is under way, for the idle and send timeouts (see `idle`).
                let activity = Arc::<idle::Activity>::default();
                let conn = Conn {
                    info: ConnInfo {
                        peer,
                        tls: matches!(transport, Transport::Tls(_)),
                    },
                    // For the send timeout: the duplicate this task owns to its end.
                    socket: lingering.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
                    activity: activity.clone(),
                };
                // The slot is held by the socket and by this task (the lingering close).
                let stream = socket::ClientSocket::new(stream, slot.clone(), activity);
                tracker.spawn(async move {
                    let _slot = slot;
                    let cut = conns.cut.clone();
                    let ended = match transport {
                        Transport::Plain => {
                            serve_connection(stream, Protocol::Http1, handler, conns, conn).await
                        }
                        Transport::Tls(acceptor) => {
                            serve_tls(stream, acceptor, handler, conns, conn).await
                        }
                    };
                    match (lingering, ended) {
                        // Handed to the handler's tunnel (a WebSocket), which closes it.
                        (_, Ended::Upgraded) | (None, _) => {}
                        (Some(socket), Ended::Closed) => linger(socket, &cut).await,
                        // Reset: a FIN behind a send queue the client never reads would keep
                        // the orphaned socket (and its buffers) in the kernel for minutes.
                        (Some(socket), Ended::Stalled) => {
                            let _ = socket.set_zero_linger();
                        }
                    }
                });
            }
            // The socket closes here: connects from now on are refused.
            drop(listener);
        });
    }

    fn conn_signals(&self) -> ConnSignals {
        ConnSignals {
            drain: self.drain.clone(),
            cut: self.cut.clone(),
        }
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.connections.len()
    }

    /// A token cancelled once every listener's socket is closed.
    pub fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Stops accepting (every listening socket closed when this returns), then asks every
    /// open connection to finish gracefully. Returns the connections still open.
    pub async fn stop_accepting(&self) -> usize {
        self.stop_accept.cancel();
        self.accepting.close();
        self.accepting.wait().await;
        self.closed.cancel();
        // Every connection task was spawned before its accept loop ended, so each one sees
        // this signal.
        self.drain.cancel();
        self.connections.len()
    }

    /// Stops accepting if not done yet, waits for the open connections to end until
    /// `deadline`, then cuts those left. Returns how many were cut.
    pub async fn drain_until(&self, deadline: Instant) -> usize {
        self.stop_accepting().await;
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.connections.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        let left = self.connections.len();
        self.cut.cancel();
        self.connections.wait().await;
        left
    }
}

/// One accepted connection: who, a descriptor of its socket that its task owns, and what
/// is under way on it (also noted by its socket).
struct Conn {
    info: ConnInfo,
    socket: Option<std::os::fd::RawFd>,
    activity: Arc<idle::Activity>,
}

/// How a connection's HTTP ended.
enum Ended {
    /// Closed (by either side, a drain or the idle timeout): linger, then close.
    Closed,
    /// Upgraded (answered 101) and handed to the handler.
    Upgraded,
    /// Its client read nothing for a whole period: reset.
    Stalled,
}

/// What a connection task listens to.
#[derive(Clone)]
struct ConnSignals {
    drain: CancellationToken,
    cut: CancellationToken,
}

/// Returns `stream` and a second handle on the same socket, for [`linger`] (none if the
/// descriptor cannot be duplicated: the connection is then served without it).
fn with_linger_handle(stream: TcpStream) -> std::io::Result<(TcpStream, Option<TcpStream>)> {
    let std = stream.into_std()?;
    let dup = std.try_clone().ok();
    let stream = TcpStream::from_std(std)?;
    Ok((stream, dup.and_then(|d| TcpStream::from_std(d).ok())))
}

/// Closes a socket without destroying what the client has not read yet.
///
/// Closing a socket while the client's data is still unread in it (an HTTP/2 client keeps
/// sending WINDOW_UPDATEs while it reads the end of a response) makes the kernel send a
/// reset, and a reset makes the client's kernel drop the response bytes it has received but
/// not yet handed to the client. So, once hyper is done with the connection: end our side
/// (FIN), then read and discard until the client closes, [`LINGER`] passes, or the drain
/// timeout cuts. (What nginx calls lingering close.)
async fn linger(mut socket: TcpStream, cut: &CancellationToken) {
    let _ = socket.shutdown().await;
    let mut buf = [0u8; 4096];
    let until = tokio::time::sleep(LINGER);
    tokio::pin!(until);
    loop {
        tokio::select! {
            read = socket.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = &mut until => return,
            _ = cut.cancelled() => return,
        }
    }
}

/// Completes the TLS handshake, then serves the protocol ALPN chose.
async fn serve_tls<I>(
    stream: I,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: Handler,
    signals: ConnSignals,
    conn: Conn,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return Ended::Closed;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                return Ended::Closed;
            }
        },
        // Shutting down: a connection not yet set up has nothing under way.
        _ = signals.drain.cancelled() => return Ended::Closed,
    };
    let protocol = match tls.get_ref().1.alpn_protocol() {
        Some(b"h2") => Protocol::Http2,
        _ => Protocol::Http1,
    };
    serve_connection(tls, protocol, handler, signals, conn).await
}

/// Serves HTTP on one connection until the client leaves, a drain closes it, or a cut drops
/// it. True when the connection was upgraded (answered 101) and handed over.
async fn serve_connection<I>(
    io: I,
    protocol: Protocol,
    handler: Handler,
    signals: ConnSignals,
    conn: Conn,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = conn.info;
    let upgraded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let upgraded_flag = upgraded.clone();
    let activity = conn.activity;
    let requests = activity.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let upgraded = upgraded_flag.clone();
        let active = requests.start();
        let head = req.method() == http::Method::HEAD;
        async move {
            let mut resp = handler(req, info).await;
            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                upgraded.store(true, std::sync::atomic::Ordering::Release);
            }
            if head {
                // An answer to a HEAD has no body, whatever made it (an error page, a
                // proxied one): hyper's HTTP/1.1 drops it, its HTTP/2 would send it as DATA,
                // which the client takes for a protocol error (RFC 9113 §8.1.1).
                resp = resp.map(|_| empty());
            }
            Ok::<_, Infallible>(resp.map(|body| idle::Held::new(body, active)))
        }
    });
    // HTTP/2 stream tasks watched for the per-stream send timeout (see `idle`).
    let mut builder = auto::Builder::new(idle::StreamExec::new(activity.clone()));
    // `idle` stands for hyper's header read timeout (which costs a timer per request).
    builder.http1().header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .max_concurrent_streams(H2_MAX_STREAMS);
    let builder = match protocol {
        Protocol::Http1 => builder.http1_only(),
        Protocol::Http2 => builder.http2_only(),
    };
    // With upgrades: a WebSocket handshake hands the connection to the handler's tunnel.
    let http = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(http);
    let ended = || match upgraded.load(std::sync::atomic::Ordering::Acquire) {
        true => Ended::Upgraded,
        false => Ended::Closed,
    };
    tokio::select! {
        // First: a request head that arrived with the idle tick is served, not dropped.
        biased;
        done = http.as_mut() => {
            if let Err(e) = done {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return ended();
        }
        _ = signals.drain.cancelled() => {}
        stop = idle::idle(&activity, conn.socket) => match (stop, protocol) {
            // The client has read nothing for a whole period: what is under way cannot end.
            (idle::Stop::Stalled, _) => {
                tracing::debug!(peer = %info.peer, "client reads nothing: resetting its connection");
                return Ended::Stalled;
            }
            // Nothing under way: the client waits between requests or is still sending a
            // header block after a whole period. Closed at once (hyper's graceful shutdown
            // would wait for a header block that has begun).
            (idle::Stop::Idle, Protocol::Http1) => {
                tracing::debug!("HTTP/1.1 connection idle or too slow: closing it");
                return Ended::Closed;
            }
            (idle::Stop::Idle, Protocol::Http2) => {
                tracing::debug!("HTTP/2 connection idle: closing it")
            }
        },
    }
    // HTTP/1.1: a response under way completes, then (or at once, when idle) the connection
    // closes. HTTP/2: GOAWAY; streams under way complete (none, when idle). Still watched: a
    // client that stops reading, or keeps an idle HTTP/2 connection from closing, is dropped.
    http.as_mut().graceful_shutdown();
    tokio::select! {
        biased;
        _ = http.as_mut() => ended(),
        _ = signals.cut.cancelled() => Ended::Closed,
        stop = idle::idle(&activity, conn.socket) => match stop {
            idle::Stop::Stalled => Ended::Stalled,
            idle::Stop::Idle => Ended::Closed,
        },
    }
}
