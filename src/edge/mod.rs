//! The HTTP server: media requests on `listen`, `/metrics` and `/healthz` on `admin_listen`.
//!
//! A media request goes: method check → key → cache → memory of recent misses → (direct read
//! of a local primary when there is no cache) → the flight table, which reads through the
//! chain of stores. See ARCHITECTURE.md for the whole flow.

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
use crate::config::Config;
use crate::flight::{End, Flights, NegativeCache};
use crate::key::Key;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::store::{self, ObjectMeta, StoreError, StoreHandle};
use crate::writeback::WriteBack;

pub use respond::Body;
use respond::{Answer, Meta, Source};

/// Everything a media request needs.
struct Edge {
    prefix: String,
    cache: Option<Arc<Cache>>,
    /// The primary, when it is a local directory and there is no cache: served directly.
    direct: Option<StoreHandle>,
    /// Primary first, then fallbacks (for HEAD on a miss).
    chain: Vec<StoreHandle>,
    flights: Arc<Flights>,
    metrics: Metrics,
}

/// A running server (see [`start`]).
pub struct Running {
    /// Where media requests are answered.
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are answered.
    pub admin_addr: SocketAddr,
    /// The process metrics.
    pub metrics: Metrics,
    /// The ledger (queue and record of copies).
    pub ledger: Ledger,
    /// The cache, if configured.
    pub cache: Option<Arc<Cache>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, stops the workers, and waits for them.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: listeners and write-back workers");
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        tracing::info!("stopped");
    }
}

/// Runs until SIGINT or SIGTERM.
pub async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    let running = start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    running.shutdown().await;
    Ok(())
}

/// Opens the stores, cache and ledger, binds both listeners and starts serving.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Metrics::new();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    let ledger = Ledger::open(&config.data_dir).context("cannot open the ledger")?;
    let primary = store::open(&config.primary, metrics.clone())?;
    let mut chain = vec![primary.clone()];
    for f in &config.fallbacks {
        chain.push(store::open(f, metrics.clone())?);
    }
    let cache = match &config.cache {
        Some(c) => Some(Arc::new(Cache::open(c, metrics.clone()).with_context(
            || format!("cannot open the cache at {}", c.dir.display()),
        )?)),
        None => None,
    };
    let tmp_dir = match &cache {
        Some(c) => c.tmp_dir(),
        None => {
            let t = config.data_dir.join("tmp");
            let _ = std::fs::remove_dir_all(&t);
            std::fs::create_dir_all(&t)?;
            t
        }
    };
    let stop = CancellationToken::new();
    let writeback = WriteBack::open(
        ledger.clone(),
        primary.clone(),
        &config.data_dir,
        metrics.clone(),
    )
    .await?;
    let mut tasks = writeback.spawn_workers(config.writeback_concurrency, stop.clone());
    let flights = Arc::new(Flights::new(
        chain.clone(),
        cache.clone(),
        writeback.clone(),
        tmp_dir,
        NegativeCache::new(config.negative_ttl),
        metrics.clone(),
    ));
    tasks.push(tokio::spawn(publish_migration_progress(
        ledger.clone(),
        metrics.clone(),
        stop.clone(),
    )));
    if let Some(backfill) = &config.backfill {
        let (busy_tx, busy_rx) = tokio::sync::watch::channel(true);
        tasks.push(tokio::spawn(watch_live_work(
            flights.clone(),
            writeback.clone(),
            busy_tx,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(run_backfill(
            config.clone(),
            backfill.clone(),
            busy_rx,
            stop.clone(),
        )));
    }
    let direct = (cache.is_none() && primary.kind() == "fs").then(|| primary.clone());
    let edge = Arc::new(Edge {
        prefix: config.url_prefix.clone(),
        cache: cache.clone(),
        direct,
        chain,
        flights,
        metrics: metrics.clone(),
    });

    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} (admin_listen)", config.admin_listen))?;
    let addr = listener.local_addr()?;
    let admin_addr = admin.local_addr()?;
    tracing::info!(%addr, %admin_addr, primary = ?config.primary.kind, fallbacks = config.fallbacks.len(), cache = cache.is_some(), "serving media");

    let e = edge.clone();
    tasks.push(tokio::spawn(accept_loop(
        listener,
        stop.clone(),
        move |req| {
            let e = e.clone();
            async move { Ok::<_, Infallible>(e.handle(req).await) }
        },
    )));
    let m = metrics.clone();
    tasks.push(tokio::spawn(accept_loop(admin, stop.clone(), move |req| {
        let m = m.clone();
        async move { Ok::<_, Infallible>(admin_handle(&m, req)) }
    })));
    Ok(Running {
        addr,
        admin_addr,
        metrics,
        ledger,
        cache,
        stop,
        tasks,
    })
}

/// Publishes whether live work is under way (misses being fetched, copies due for the
/// primary; not copies waiting out a backoff), for the backfill to pause on. Checked every
/// 200 ms.
async fn watch_live_work(
    flights: Arc<Flights>,
    writeback: Arc<WriteBack>,
    busy: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
) {
    loop {
        let now_busy = flights.in_flight() > 0 || writeback.due().await > 0;
        busy.send_if_modified(|b| std::mem::replace(b, now_busy) != now_busy);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}

/// `fediedge migrate` inside `serve`: the `[backfill]` fallback's cold tail, under its
/// budget, yielding to live work. Runs once to its end (a restart resumes it).
async fn run_backfill(
    config: Config,
    backfill: crate::config::BackfillConfig,
    busy: tokio::sync::watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let args = crate::migrate::MigrateArgs {
        config: config.source.clone(),
        from: Some(backfill.from.clone()),
        keys: backfill.keys.clone(),
        concurrency: backfill.concurrency,
        max_ops_per_sec: Some(backfill.max_ops_per_sec),
        max_bytes_per_sec: Some(bytesize::ByteSize(backfill.max_bytes_per_sec)),
        retries: 3,
        retry_delay: std::time::Duration::from_secs(1).into(),
        verify: false,
        verify_deep: false,
        status: false,
        log_every: std::time::Duration::from_secs(60).into(),
        yield_to: Some(busy),
    };
    tracing::info!(from = %backfill.from, "backfill: starting");
    let report =
        crate::migrate::run_with_config(&config, args, async move { stop.cancelled().await }).await;
    tracing::info!(
        copied = report.copied,
        skipped = report.skipped,
        failed = report.failed,
        interrupted = report.interrupted,
        "backfill: ended"
    );
}

/// Copies `fediedge migrate`'s progress from the ledger into the metrics every few seconds, so
/// a migration run from another process shows on this edge's `/metrics`.
async fn publish_migration_progress(ledger: Ledger, metrics: Metrics, stop: CancellationToken) {
    loop {
        match ledger.run(crate::migrate::progress).await {
            Ok(Some(p)) => {
                metrics.set_migration(p.objects_total, p.objects_done, p.bytes_total, p.bytes_done)
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read migration progress"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
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
