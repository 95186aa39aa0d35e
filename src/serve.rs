//! `fediedge serve`: assembles the stores, cache, ledger, write-back workers, flights and the
//! optional background backfill, then starts the [`crate::edge`] listeners. The only room
//! that knows all the others; nothing calls it but the CLI (and tests).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::cache::Cache;
use crate::config::Config;
use crate::edge::{self, Edge};
use crate::flight::Flights;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::negative::NegativeCache;
use crate::store;
use crate::writeback::WriteBack;

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
    // `[sidekiq]`: a read-only monitor of Mastodon's Sidekiq, rendered at each scrape.
    let sidekiq = match &config.sidekiq {
        Some(c) => Some((crate::sidekiq::Target::from_config(c)?, c.interval)),
        None => None,
    };
    let sidekiq_collector = crate::sidekiq::metrics::SidekiqCollector::new();
    let metrics = match sidekiq {
        Some(_) => Metrics::with_collectors(vec![Box::new(sidekiq_collector.clone())]),
        None => Metrics::new(),
    };
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
            metrics.clone(),
            stop.clone(),
        )));
    }
    let direct = (cache.is_none() && primary.kind() == crate::config::StoreType::Fs)
        .then(|| primary.clone());
    let edge = Arc::new(Edge::new(
        config.url_prefix.clone(),
        cache.clone(),
        direct,
        chain,
        flights,
        metrics.clone(),
    ));
    let listening = edge::listen(edge, config.listen, config.admin_listen, stop.clone()).await?;
    let (addr, admin_addr) = (listening.addr, listening.admin_addr);
    tasks.extend(listening.tasks);
    tracing::info!(%addr, %admin_addr, primary = ?config.primary.kind, fallbacks = config.fallbacks.len(), cache = cache.is_some(), "serving media");
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
    metrics: Metrics,
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
        metrics: Some(metrics),
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
