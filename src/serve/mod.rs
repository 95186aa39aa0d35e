//! `fediedge serve`: assembles the stores, cache, ledger, write-back workers, flights and the
//! optional background backfill, then starts the [`crate::listen`] listeners with the
//! [`crate::edge`] (media) and [`crate::admin`] handlers. The only room that knows all the
//! others; nothing calls it but the CLI (and tests).
//!
//! Shutdown (SIGTERM, SIGINT, or [`Running::shutdown`]) goes: stop accepting; ask every
//! connection to finish its response and close; stop the workers (a copy under way is
//! finished); wait for connections, fetches and workers until `drain_timeout`; cut what is
//! left and log how much.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::Cache;
use crate::config::Config;
use crate::edge::Edge;
use crate::flight::{Flights, Limits};
use crate::ledger::{DataDirLock, Ledger};
use crate::listen::tls::{Certificates, TlsError};
use crate::listen::{self, Listeners};
use crate::metrics::Metrics;
use crate::negative::NegativeCache;
use crate::reload::{ReloadError, Reloader};
use crate::store;
use crate::writeback::WriteBack;

mod background;
mod parts;

use background::{publish_migration_progress, run_backfill, watch_live_work, LiveWork};
use parts::{backfill_job, bind_tls, flight_dirs, front_door, open_core_cache, purge_targets};

/// A running server (see [`start`]).
pub struct Running {
    /// Where media requests are answered.
    pub addr: SocketAddr,
    /// Where `/metrics` and `/healthz` are answered.
    pub admin_addr: SocketAddr,
    /// Where HTTPS is answered, with `[tls]`.
    pub https_addr: Option<SocketAddr>,
    /// Where plain HTTP is redirected to https, with `tls.redirect_listen`.
    pub redirect_addr: Option<SocketAddr>,
    /// The process metrics.
    pub metrics: Metrics,
    /// The ledger (queue and record of copies).
    pub ledger: Ledger,
    /// The cache, if configured.
    pub cache: Option<Arc<Cache>>,
    /// The cache of core's responses, with `[core.cache]` (its `purge` evicts a URL).
    pub core_cache: Option<Arc<crate::corecache::CoreCache>>,
    /// Stops the workers (write-back, backfill, progress publisher).
    stop: CancellationToken,
    /// The workers.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The listeners and their connections.
    listeners: Listeners,
    /// The fetch tasks of the flight table.
    fetches: TaskTracker,
    /// How long shutdown waits for work under way.
    drain_timeout: Duration,
    /// The TLS certificates in use, with `[tls]`.
    certificates: Option<Arc<Certificates>>,
    /// What SIGHUP reads again and swaps in.
    reloader: Reloader,
    /// `data_dir/lock`, held until the server is dropped (after its tasks ended).
    _lock: DataDirLock,
}

/// What a shutdown had to cut at the drain deadline; all zero after a clean drain.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Connections still open at the deadline: their responses were cut short.
    pub connections_cut: usize,
    /// Fetches still running at the deadline: media fetches, and the proxy's tasks (the
    /// leaders of `POST`s with `Idempotency-Key`, the readers of buffered answers, which end
    /// with their clients' connections). Nothing partial is kept: their temp files are
    /// cleared at the next start (the proxy's are unnamed), and nothing was staged or cached
    /// for them.
    pub fetches_cut: usize,
    /// Workers still busy at the deadline (a copy to the primary, the backfill). A copy cut
    /// short stays queued and is redone after the restart.
    pub workers_cut: usize,
}

impl Stopped {
    /// True when everything under way finished in time.
    pub fn clean(&self) -> bool {
        *self == Stopped::default()
    }
}

impl Running {
    /// Fetch tasks still running (a fetch goes on after its clients left, until its body is
    /// verified and handed over): tests wait for 0 before looking for what a fetch kept.
    pub fn fetches_under_way(&self) -> usize {
        self.fetches.len()
    }

    /// Connections open now (media and admin).
    pub fn open_connections(&self) -> usize {
        self.listeners.open_connections()
    }

    /// A token cancelled once the listening sockets are closed during a shutdown (new
    /// connects are refused from then on).
    pub fn listeners_closed(&self) -> CancellationToken {
        self.listeners.closed()
    }

    /// Reads the TLS certificate files again (the paths the server started with, not the
    /// config file: SIGHUP does [`Running::reload_config`], which includes this) and swaps
    /// them in for new connections; open connections are not touched. On an error (logged, naming the file)
    /// the certificates in use keep serving. Without `[tls]` there is nothing to do.
    pub fn reload(&self) -> Result<(), TlsError> {
        match &self.certificates {
            Some(c) => c.reload().map(|_| ()),
            None => {
                tracing::info!("no [tls]: no certificates to reload");
                Ok(())
            }
        }
    }

    /// What SIGHUP does: reads the config file again; a bad file (or certificate) is logged
    /// and changes nothing; otherwise every changed value is logged by its dotted key (a
    /// secret without its value), the certificates and `[core]`'s pools and limits are swapped
    /// in, and the other changes are logged as applying at restart ([`crate::reload`]).
    pub fn reload_config(&self) -> Result<Vec<crate::config::Change>, ReloadError> {
        self.reloader.reload()
    }

    /// Stops accepting, lets the responses, fetches and copies under way finish (up to
    /// `drain_timeout` in all), cuts what is left, and says what was cut.
    pub async fn shutdown(self) -> Stopped {
        let deadline = Instant::now() + self.drain_timeout;
        let open = self.listeners.stop_accepting().await;
        tracing::info!(
            open_connections = open,
            fetches = self.fetches.len(),
            drain_timeout = %humantime::format_duration(self.drain_timeout),
            "shutting down: stopped accepting; letting the work under way finish"
        );
        // Workers finish the copy under way and stop; the backfill stops.
        self.stop.cancel();
        let mut stopped = Stopped {
            connections_cut: self.listeners.drain_until(deadline).await,
            ..Stopped::default()
        };
        self.fetches.close();
        if tokio::time::timeout_at(deadline, self.fetches.wait())
            .await
            .is_err()
        {
            stopped.fetches_cut = self.fetches.len();
        }
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
                stopped.workers_cut += 1;
            }
        }
        if stopped.clean() {
            tracing::info!("stopped: everything under way finished");
        } else {
            tracing::warn!(
                connections_cut = stopped.connections_cut,
                fetches_cut = stopped.fetches_cut,
                workers_cut = stopped.workers_cut,
                "stopped: drain_timeout passed; work still under way was cut"
            );
        }
        stopped
    }
}

/// Runs until SIGINT or SIGTERM, then shuts down gracefully (see [`Running::shutdown`]). A
/// second signal during the drain stops at once, with an error. SIGHUP reloads the config
/// file and the TLS certificates ([`Running::reload_config`]).
pub async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let running = start(config).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let name = loop {
        tokio::select! {
            _ = int.recv() => break "SIGINT",
            _ = term.recv() => break "SIGTERM",
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the config and the TLS certificates");
                // Logged either way; a failed reload keeps the old config and certificates.
                let _ = running.reload_config();
            }
        }
    };
    tracing::info!(signal = name, "signal received: shutting down");
    tokio::select! {
        _ = running.shutdown() => Ok(()),
        _ = int.recv() => anyhow::bail!("second signal (SIGINT) during the drain: stopped at once"),
        _ = term.recv() => anyhow::bail!("second signal (SIGTERM) during the drain: stopped at once"),
    }
}

/// Takes `data_dir/lock` (a second `serve` on the same `data_dir` fails here, naming the
/// directory and the holder's PID), opens the stores, cache and ledger, binds the listeners
/// and starts serving. The lock is held until the returned [`Running`] is dropped.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    // `[sidekiq]`: a read-only monitor of Mastodon's Sidekiq, rendered at each scrape.
    let sidekiq = match &config.sidekiq {
        Some(c) => Some((crate::sidekiq::Target::from_config(c)?, c.interval)),
        None => None,
    };
    let sidekiq_collector = crate::sidekiq::metrics::SidekiqCollector::new();
    // `[core]`: the reverse proxy, its per-upstream series rendered at each scrape.
    // Flights' fetches, the proxy's idempotent leaders and readers of buffered answers:
    // waited for at shutdown.
    let fetches = TaskTracker::new();
    let proxy = config
        .core
        .as_ref()
        .map(|c| Arc::new(crate::proxy::Proxy::new(c, fetches.clone())));
    // Alerts, the canary and the status page (`/healthz`, `/` on admin_listen).
    let status = crate::status::Status::new(&config.alerts, config.canary.as_ref());
    // `max_connections`: one cap over the public listeners (not the admin listener).
    let max_connections = config
        .max_connections
        .unwrap_or_else(listen::cap::default_max_connections);
    let cap = listen::cap::ConnectionCap::new(max_connections);
    cap.per_ip.set(
        config.max_connections_per_ip,
        per_ip_exempt(&config, proxy.as_deref()),
    );
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> = vec![
        Box::new(status.collector()),
        Box::new(listen::cap::ConnectionCollector(cap.clone())),
    ];
    if sidekiq.is_some() {
        collectors.push(Box::new(sidekiq_collector.clone()));
    }
    if let Some(p) = &proxy {
        collectors.push(Box::new(crate::proxy::UpstreamCollector(p.clone())));
    }
    let metrics = Metrics::with_collectors(collectors);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data_dir {}", config.data_dir.display()))?;
    // Before anything in data_dir is touched: a second serve must not release the first
    // one's write-back claims or clear its temp files.
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let primary = store::open(&config.primary, metrics.clone())?;
    // After the primary is opened: a missing fs root exists now, so its identity is final.
    let destination = config.primary.destination();
    let ledger =
        Ledger::open_for(&config.data_dir, &destination).context("cannot open the ledger")?;
    let mut chain = vec![primary.clone()];
    for f in &config.fallbacks {
        chain.push(store::open(f, metrics.clone())?);
    }
    let cache = match &config.cache {
        Some(c) => Some(
            Cache::open(c, metrics.clone())
                .with_context(|| format!("cannot open the cache at {}", c.dir.display()))?,
        ),
        None => None,
    };
    let dirs = flight_dirs(cache.as_ref(), &config.data_dir, &metrics);
    let limits = Limits::new(
        config.max_flights,
        config.max_flight_temp_bytes,
        config.max_flight_memory,
        config.flight_queue_wait,
    );
    // Shared with the core cache's fills: one bound on the memory bodies take while received.
    let flight_memory = limits.memory_budget();
    if let (Some(proxy), Some(core)) = (&proxy, &config.core) {
        // Large answers from core read ahead of slow clients, request bodies read whole
        // (`[core] buffer_responses`, `buffer_requests`).
        let tmp = config.data_dir.join("tmp-proxy");
        crate::cache::clear_dir(&tmp);
        proxy.buffer_with(crate::proxy::spool::Spooler::new(
            tmp,
            core.max_temp_bytes,
            core.max_buffer_memory,
            dirs.data_health.clone(),
            metrics.clone(),
            fetches.clone(),
        ));
    }
    let stop = CancellationToken::new();
    let writeback = WriteBack::open(
        ledger.clone(),
        primary.clone(),
        destination.clone(),
        &config.data_dir,
        metrics.clone(),
    )
    .await?;
    let mut tasks = writeback.spawn_workers(config.writeback_concurrency, stop.clone());
    if let Some((target, interval)) = sidekiq {
        tracing::info!(redis = %target.redacted(), "watching Sidekiq");
        tasks.push(tokio::spawn(crate::sidekiq::metrics::poll(
            target,
            interval,
            sidekiq_collector,
            stop.clone(),
        )));
    }
    let flights = Arc::new(Flights::new(
        chain.clone(),
        cache.clone(),
        writeback.clone(),
        dirs,
        limits,
        NegativeCache::new(config.negative_ttl),
        metrics.clone(),
        fetches.clone(),
    ));
    tasks.push(tokio::spawn(publish_migration_progress(
        ledger.clone(),
        destination.clone(),
        metrics.clone(),
        stop.clone(),
    )));
    if let Some(backfill) = &config.backfill {
        let (busy_tx, busy_rx) = tokio::sync::watch::channel(true);
        let mut job = backfill_job(backfill, &chain, &destination, &ledger, &config.data_dir)?;
        job.gate = Some(busy_rx);
        tasks.push(tokio::spawn(watch_live_work(
            LiveWork {
                flights: flights.clone(),
                writeback: writeback.clone(),
                backfill: job.counters.clone(),
                metrics: metrics.clone(),
            },
            busy_tx,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(run_backfill(job, stop.clone())));
    }
    let direct = (cache.is_none() && primary.kind() == crate::config::StoreType::Fs)
        .then(|| primary.clone());
    // A media host's paths are whole keys (bucket root): its own media handler (also
    // without `media_hosts`: a reload may add some).
    let edge_root = Arc::new(Edge::new(
        "/".into(),
        cache.clone(),
        direct.clone(),
        chain.clone(),
        flights.clone(),
        metrics.clone(),
    ));
    let edge = Arc::new(Edge::new(
        config.url_prefix.clone(),
        cache.clone(),
        direct,
        chain,
        flights,
        metrics.clone(),
    ));
    // Everything is bound (and the certificates read) before anything is served, so that a
    // failure leaves nothing running.
    let media = listen::bind(config.listen, "listen").await?;
    let admin = listen::bind(config.admin_listen, "admin_listen").await?;
    let (addr, admin_addr) = (media.local_addr()?, admin.local_addr()?);
    let (https, redirect, certificates) = match &config.tls {
        Some(tls) => {
            let t = bind_tls(tls).await?;
            (Some(t.https), t.redirect, Some(t.certificates))
        }
        None => (None, None, None),
    };
    let https_addr = https.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let redirect_addr = redirect.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let listeners = Listeners::with_cap(cap.clone());
    if let Some(p) = proxy.clone() {
        // Health checks; at shutdown, the WebSocket tunnels are closed.
        tasks.push(tokio::spawn(p.background(stop.clone())));
    }
    let core_cache = open_core_cache(&config, &metrics, flight_memory)?;
    // The routes in use: a reload may swap in new hosts.
    let routes = crate::router::SharedRouter::new(crate::router::Router::of(&config));
    let reloader = Reloader::new(
        config.clone(),
        certificates.clone(),
        proxy.clone(),
        routes.clone(),
        cap.clone(),
    );
    let buster = config.cache_buster.as_ref().map(|b| {
        let targets = purge_targets(&config, cache.as_ref(), core_cache.as_ref(), &routes);
        Arc::new(crate::purge::CacheBuster::new(b, targets, metrics.clone()))
    });
    let media_handler = front_door(
        routes.clone(),
        edge,
        edge_root,
        proxy,
        buster,
        core_cache.clone(),
    );
    listeners.serve(media, media_handler.clone());
    let (m, st) = (metrics.clone(), status.clone());
    listeners.serve_admin(
        admin,
        listen::handler(move |req, _| std::future::ready(crate::admin::handle(&m, &st, req))),
    );
    tasks.push(tokio::spawn(status.clone().run(
        metrics.clone(),
        ledger.clone(),
        stop.clone(),
    )));
    if let Some(c) = config.canary.clone() {
        let target = crate::status::canary::Target::new(addr, &config);
        tasks.push(tokio::spawn(crate::status::canary::run(
            c,
            target,
            routes.clone(),
            primary.clone(),
            status.clone(),
            stop.clone(),
        )));
    }
    if let Some((listener, server_config)) = https {
        listeners.serve_tls(listener, server_config, media_handler);
    }
    if let Some((listener, handler)) = redirect {
        listeners.serve(
            listener,
            listen::handler(move |req, _| {
                let handler = handler.clone();
                async move { handler.handle(req).await }
            }),
        );
    }
    if let Some(a) = https_addr {
        tracing::info!(addr = %a, "serving https (HTTP/2 and HTTP/1.1)");
    }
    if let Some(a) = redirect_addr {
        tracing::info!(addr = %a, "redirecting http to https");
    }
    tracing::info!(%addr, %admin_addr, max_connections, primary = ?config.primary.kind, fallbacks = config.fallbacks.len(), cache = cache.is_some(), "serving media");
    Ok(Running {
        addr,
        admin_addr,
        https_addr,
        redirect_addr,
        metrics,
        ledger,
        cache,
        core_cache,
        stop,
        tasks,
        listeners,
        fetches,
        drain_timeout: config.drain_timeout,
        certificates,
        reloader,
        _lock: lock,
    })
}

/// The client addresses `max_connections_per_ip` does not limit:
/// `max_connections_per_ip_exempt` and, when the proxy runs, the trusted proxies it uses.
pub(crate) fn per_ip_exempt(
    config: &Config,
    proxy: Option<&crate::proxy::Proxy>,
) -> Vec<ipnet::IpNet> {
    let mut exempt = config.max_connections_per_ip_exempt.clone();
    if let Some(p) = proxy {
        exempt.extend(p.trusted_proxies());
    }
    exempt
}
