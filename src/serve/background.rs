//! The tasks `serve` runs beside the listeners for `migrate`'s work: the `[backfill]` job,
//! the live-work gate it yields to, and the progress of migrations on `/metrics`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::flight::Flights;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::writeback::WriteBack;

/// What [`watch_live_work`] looks at, and where it counts the checks that held the backfill.
pub(super) struct LiveWork {
    pub(super) flights: Arc<Flights>,
    pub(super) writeback: Arc<WriteBack>,
    pub(super) backfill: Arc<crate::migrate::progress::Counters>,
    pub(super) metrics: Metrics,
}

/// Publishes whether live work is under way (misses being fetched, copies due for the
/// primary; not copies waiting out a backoff), for the backfill to pause on. Checked every
/// 200 ms; a check that finds live work while a backfill object waits at the gate counts in
/// `fediedge_backfill_held_total`.
pub(super) async fn watch_live_work(
    live: LiveWork,
    busy: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        let now_busy = live.flights.in_flight() > 0 || live.writeback.due().await > 0;
        busy.send_if_modified(|b| std::mem::replace(b, now_busy) != now_busy);
        if now_busy && live.backfill.held_at_gate.load(Relaxed) > 0 {
            live.metrics.backfill_held();
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
        }
    }
}

/// `fediedge migrate` inside `serve`: the `[backfill]` fallback's cold tail, under its
/// budget, yielding to live work, with progress in the log every minute. Runs once to its
/// end (a restart resumes it).
pub(super) async fn run_backfill(job: crate::migrate::Job, stop: CancellationToken) {
    use crate::migrate::progress;
    let route = job.route();
    tracing::info!(from = %route.source, into = %route.destination, "backfill: starting");
    let shown = CancellationToken::new();
    let display = tokio::spawn(progress::show(
        progress::Display::Log(std::time::Duration::from_secs(60)),
        job.counters.clone(),
        shown.clone(),
    ));
    let result = job.run(stop).await;
    shown.cancel();
    let _ = display.await;
    match result {
        Ok(s) => {
            for e in &s.errors {
                tracing::error!(error = %e, "backfill: stopped early");
            }
            tracing::info!(
                copied = s.copied,
                skipped = s.skipped,
                failed = s.failed,
                interrupted = s.interrupted,
                "backfill: ended"
            );
        }
        Err(e) => tracing::error!(error = %e, "backfill: could not run"),
    }
}

/// Copies `fediedge migrate`'s progress from the ledger into the metrics every few seconds, so
/// a migration run from another process shows on this edge's `/metrics`. Only migrations into
/// this edge's primary count.
pub(super) async fn publish_migration_progress(
    ledger: Ledger,
    destination: String,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let d = destination.clone();
        match ledger.run(move |c| crate::migrate::progress(c, &d)).await {
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
