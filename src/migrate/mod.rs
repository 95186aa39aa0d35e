//! `fediedge migrate`: bulk backfill of a fallback store into the primary, under a load budget,
//! resumable, verified, with progress.
//!
//! A run lists the source (or reads `--keys FILE`) into the migration table of the ledger
//! ([`state`]) while a dispatcher hands the keys, in listing order, to at most `--concurrency`
//! object tasks ([`worker`]). Each task skips what the ledger records as copied or what the
//! primary already holds (without reading the source body), else copies the object verified,
//! retrying with backoff. Ctrl-C stops the dispatcher, abandons the reads under way (nothing
//! partial is written) and lets verified puts finish; a rerun takes the keys still pending.
//!
//! - [`plan`]: listing into the table; key-file parsing.
//! - [`state`]: the tables, and [`progress`] for `/metrics` of a running edge.
//! - [`worker`]: one object, from the skip checks to the ledger record.
//! - [`budget`]: ops/s and bytes/s as seen by the source.
//! - [`verify`]: `--verify` and `--verify-deep`.
//! - [`progress`](mod@progress): the bar or the log lines.

pub mod budget;
pub mod plan;
pub mod progress;
pub mod state;
pub mod verify;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use state::{progress, Progress};

use crate::config::Config;
use crate::key::Key;
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use budget::Budget;
use progress::Display;
use worker::Ctx;

/// Arguments of `fediedge migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// The `[[fallback]]` store to copy from, by its `name`.
    #[arg(long, required_unless_present = "status")]
    pub from: Option<String>,
    /// Copy the keys listed in this file (one per line, as `find public/system -type f` gives
    /// them; a leading `./`, `/` or `…public/system/` is removed; blank lines and `#` comments
    /// are skipped) instead of listing the store. Needed for an http store, which cannot be
    /// listed.
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Objects copied at once (each holds at most one request to the source). Default 4.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Most requests per second sent to the source (GET, and HEAD where needed). Default:
    /// unlimited.
    #[arg(long, value_name = "N")]
    pub max_ops_per_sec: Option<u32>,
    /// Most body bytes per second read from the source, e.g. `10MiB`. Default: unlimited.
    #[arg(long, value_name = "SIZE")]
    pub max_bytes_per_sec: Option<ByteSize>,
    /// Retries of a failed copy within the run, after waits of `--retry-delay` doubling each
    /// time. Default 3 (waits of 1s, 2s, 4s).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry. Default `1s`.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub retry_delay: humantime::Duration,
    /// Copy nothing: re-check what was copied from `--from` against the source (size, and MD5
    /// where both stores give one) and print each difference; exit 1 if any.
    #[arg(long)]
    pub verify: bool,
    /// With `--verify`: read both bodies and compare their MD5s (reads everything again).
    #[arg(long)]
    pub verify_deep: bool,
    /// Print how far the migrations recorded in the ledger are, and exit. Safe while `serve`
    /// or another `migrate` runs.
    #[arg(long, conflicts_with_all = ["verify", "verify_deep", "keys"])]
    pub status: bool,
    /// Interval of the progress log lines when stderr is not a terminal. Default `10s`.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub log_every: humantime::Duration,
    /// Set by `serve` for its background backfill: objects wait while it reads `true`, and
    /// progress goes to log lines, never a bar.
    #[arg(skip)]
    pub yield_to: Option<tokio::sync::watch::Receiver<bool>>,
    /// Set by `serve` for its background backfill: the store reads are counted in the edge's
    /// own metrics.
    #[arg(skip)]
    pub metrics: Option<Metrics>,
}

/// What a run did; its [`Report::exit_code`] is the process exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// 0: done, nothing failed; 1: something failed or differs; 2: usage or config error;
    /// 130: interrupted (rerun to resume).
    pub code: u8,
    /// Objects copied by this run.
    pub copied: u64,
    /// Objects that needed no copy.
    pub skipped: u64,
    /// Objects this run gave up on.
    pub failed: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// With `--verify`: objects checked.
    pub checked: u64,
    /// With `--verify`: objects that differ.
    pub differences: u64,
    /// The run was stopped before its end.
    pub interrupted: bool,
}

impl Report {
    fn usage(message: impl std::fmt::Display) -> Report {
        eprintln!("error: {message}");
        Report {
            code: 2,
            ..Report::default()
        }
    }

    fn failure(message: impl std::fmt::Display) -> Report {
        eprintln!("error: {message}");
        Report {
            code: 1,
            ..Report::default()
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

/// Runs a migration and returns the exit code; Ctrl-C stops it cleanly.
pub async fn run(args: MigrateArgs) -> ExitCode {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handler: run to the end.
            std::future::pending::<()>().await;
        }
    };
    run_until(args, ctrl_c).await.exit_code()
}

/// Runs a migration until it ends or `stop` completes (then it stops as on Ctrl-C).
pub async fn run_until(
    args: MigrateArgs,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Report {
    let config = match crate::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return Report::usage(e),
    };
    run_with_config(&config, args, stop).await
}

/// As [`run_until`], with the config already loaded (`args.config` is not read): `serve`'s
/// background backfill uses the config it runs with.
pub async fn run_with_config(
    config: &Config,
    args: MigrateArgs,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Report {
    let ledger = match Ledger::open(&config.data_dir) {
        Ok(l) => l,
        Err(e) => {
            return Report::usage(format!(
                "cannot open the ledger in {}: {e}",
                config.data_dir.display()
            ))
        }
    };
    if let Err(e) = ledger.with(state::init) {
        return Report::usage(format!("cannot create the migration tables: {e}"));
    }
    if args.status {
        return print_status(&ledger, args.from.as_deref()).await;
    }
    let Some(from) = args.from.as_deref() else {
        return Report::usage("--from NAME is required");
    };
    let Some(source_config) = config.fallbacks.iter().find(|s| s.name == from) else {
        let names: Vec<&str> = config.fallbacks.iter().map(|s| s.name.as_str()).collect();
        return Report::usage(if from == config.primary.name {
            format!("{from:?} is the primary; --from takes a fallback: {names:?}")
        } else {
            format!("no fallback store named {from:?} in the config; fallbacks: {names:?}")
        });
    };
    if source_config.kind.store_type() == crate::config::StoreType::Http
        && args.keys.is_none()
        && !args.verify
    {
        return Report::usage(format!(
            "{from:?} is an http store, which cannot be listed: give the keys with --keys FILE"
        ));
    }
    let ctx = match build_ctx(config, source_config, &args, ledger) {
        Ok(ctx) => Arc::new(ctx),
        Err(report) => return report,
    };
    let token = CancellationToken::new();
    let watcher = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop => {
                    tracing::info!("stopping: reads under way are abandoned, verified copies finish");
                    token.cancel();
                }
                _ = token.cancelled() => {}
            }
        })
    };
    let report = if args.verify || args.verify_deep {
        run_verify(ctx, &args, token.clone()).await
    } else {
        run_copy(ctx, &args, token.clone()).await
    };
    watcher.abort();
    report
}

fn build_ctx(
    config: &Config,
    source_config: &crate::config::StoreConfig,
    args: &MigrateArgs,
    ledger: Ledger,
) -> Result<Ctx, Report> {
    let metrics = args.metrics.clone().unwrap_or_default();
    let source = crate::store::open(source_config, metrics.clone()).map_err(Report::usage)?;
    let primary = crate::store::open(&config.primary, metrics).map_err(Report::usage)?;
    // One directory per run, removed when the run ends: several runs (a `migrate` beside
    // `serve`'s backfill, a `--verify`) never touch each other's bodies. A run that was
    // killed leaves its directory behind; its bodies were never put anywhere.
    let parent = config.data_dir.join("tmp-migrate");
    let tmp_dir = std::fs::create_dir_all(&parent)
        .and_then(|()| tempfile::Builder::new().prefix("run-").tempdir_in(&parent))
        .map_err(|e| {
            Report::usage(format!(
                "cannot create a directory in {}: {e}",
                parent.display()
            ))
        })?;
    Ok(Ctx {
        source,
        primary,
        ledger,
        budget: Budget::new(
            args.max_ops_per_sec,
            args.max_bytes_per_sec.map(|b| b.as_u64()),
        ),
        tmp_dir,
        counters: Arc::default(),
        retries: args.retries,
        retry_delay: args.retry_delay.into(),
        gate: args.yield_to.clone(),
    })
}

/// Lists and copies until everything listed is done or the run is stopped.
async fn run_copy(ctx: Arc<Ctx>, args: &MigrateArgs, stop: CancellationToken) -> Report {
    let started = Instant::now();
    let source = ctx.source.name().to_owned();
    let name = source.clone();
    let begun = ctx
        .ledger
        .run(move |c| {
            let cursor = state::begin(c, &name)?;
            let base = state::counts(c, Some(&name))?;
            Ok::<_, rusqlite::Error>((cursor, base))
        })
        .await;
    let (cursor, base) = match begun {
        Ok(b) => b,
        Err(e) => return Report::failure(format!("ledger: {e}")),
    };
    let counters = ctx.counters.clone();
    counters.set_base(base);
    let notify = Arc::new(Notify::new());
    let sink = plan::Sink {
        ledger: ctx.ledger.clone(),
        source: source.clone(),
        notify: notify.clone(),
        counters: counters.clone(),
    };
    // Only an S3 listing is in key order, so only there can it resume after the cursor; a
    // directory walk starts again (it reads no bodies, and known keys keep their status).
    let start_after = cursor
        .filter(|_| ctx.source.kind() == crate::config::StoreType::S3)
        .and_then(|c| Key::parse(&c).ok());
    if let Some(k) = &start_after {
        tracing::info!(after = %k, "resuming the listing");
    }
    let lister = {
        let (store, keys, sink) = (ctx.source.clone(), args.keys.clone(), sink.clone());
        tokio::spawn(async move {
            let result = match &keys {
                Some(path) => plan::list_file(path, &sink).await,
                None => plan::list_store(&store, start_after, &sink)
                    .await
                    .map(|()| 0),
            };
            if result.is_ok() {
                let source = sink.source.clone();
                if let Err(e) = sink
                    .ledger
                    .run(move |c| state::listing_finished(c, &source))
                    .await
                {
                    tracing::error!(error = %e, "could not record the end of the listing");
                }
            }
            sink.notify.notify_one();
            result
        })
    };
    let shown = CancellationToken::new();
    let display = tokio::spawn(progress::show(
        if args.yield_to.is_some() {
            Display::Log(args.log_every.into())
        } else {
            Display::auto(args.log_every.into())
        },
        counters.clone(),
        shown.clone(),
    ));
    let dispatched = dispatch(
        &ctx,
        &source,
        args.concurrency as usize,
        &lister,
        &notify,
        &stop,
    )
    .await;
    if !lister.is_finished() {
        lister.abort();
    }
    let listing = match lister.await {
        Ok(Ok(bad)) => Ok(bad),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("listing stopped".to_owned()),
    };
    shown.cancel();
    let _ = display.await;

    let c = &counters;
    let mut report = Report {
        code: 0,
        copied: c.copied.load(Relaxed),
        skipped: c.skipped.load(Relaxed),
        failed: c.failed.load(Relaxed),
        bytes: c.copied_bytes.load(Relaxed),
        interrupted: stop.is_cancelled(),
        ..Report::default()
    };
    let secs = started.elapsed().as_secs_f64().max(0.001);
    println!(
        "migrate {source}: copied {} ({}), skipped {}, failed {}, in {:.1}s ({:.1} objects/s, {}/s){}",
        report.copied,
        ByteSize(report.bytes),
        report.skipped,
        report.failed,
        secs,
        report.copied as f64 / secs,
        ByteSize((report.bytes as f64 / secs) as u64),
        if report.interrupted { "; interrupted: run again to resume" } else { "" },
    );
    if let Err(e) = &dispatched {
        eprintln!("error: {e}");
        report.code = 1;
    }
    match &listing {
        Ok(0) => {}
        Ok(bad) => eprintln!("warning: {bad} lines of the key file were refused (see the log)"),
        Err(e) if !report.interrupted => {
            eprintln!("error: {e}");
            report.code = 1;
        }
        Err(_) => {}
    }
    if report.failed > 0 {
        report.code = 1;
        let name = source.clone();
        if let Ok(list) = ctx.ledger.run(move |c| state::failures(c, &name, 10)).await {
            for (key, attempts, reason) in list {
                eprintln!("failed: {key} ({attempts} attempts): {reason}");
            }
        }
    }
    if report.interrupted && report.code == 0 {
        report.code = 130;
    }
    report
}

/// Hands pending keys, in listing order, to object tasks, `concurrency` at a time, until the
/// listing is over and nothing is left, or `stop`.
async fn dispatch(
    ctx: &Arc<Ctx>,
    source: &str,
    concurrency: usize,
    lister: &tokio::task::JoinHandle<Result<u64, plan::PlanError>>,
    notify: &Notify,
    stop: &CancellationToken,
) -> Result<(), String> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut after = 0i64;
    let result = 'outer: loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        // Read before the batch: rows recorded before the listing ended are then visible.
        let listing_over = lister.is_finished();
        let name = source.to_owned();
        let batch = ctx
            .ledger
            .run(move |c| state::next_batch(c, &name, after, 256))
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => break Err(format!("ledger: {e}")),
        };
        if batch.is_empty() {
            if listing_over {
                break Ok(());
            }
            tokio::select! {
                _ = notify.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        for item in batch {
            after = item.id;
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p,
                _ = stop.cancelled() => break 'outer Ok(()),
            };
            let Ok(permit) = permit else {
                break 'outer Ok(());
            };
            tasks.spawn(
                ctx.clone()
                    .process(item, slots.clone(), permit, stop.clone()),
            );
            while tasks.try_join_next().is_some() {}
        }
    };
    while tasks.join_next().await.is_some() {}
    result
}

async fn run_verify(ctx: Arc<Ctx>, args: &MigrateArgs, stop: CancellationToken) -> Report {
    let source = ctx.source.name().to_owned();
    let name = source.clone();
    let keys = match ctx.ledger.run(move |c| state::copied_keys(c, &name)).await {
        Ok(k) => k,
        Err(e) => return Report::failure(format!("ledger: {e}")),
    };
    let deep = args.verify_deep;
    let found = verify::verify(ctx, keys, deep, args.concurrency as usize, stop.clone()).await;
    println!(
        "verify {source}: checked {}, {} differ, {} could not be checked{}",
        found.checked,
        found.differences.len(),
        found.errors.len(),
        if deep { " (deep: bodies compared)" } else { "" }
    );
    let bad = !found.differences.is_empty() || !found.errors.is_empty();
    Report {
        code: if bad {
            1
        } else if stop.is_cancelled() {
            130
        } else {
            0
        },
        checked: found.checked,
        differences: found.differences.len() as u64,
        interrupted: stop.is_cancelled(),
        ..Report::default()
    }
}

/// `--status`: one line per source (or only `from`).
async fn print_status(ledger: &Ledger, from: Option<&str>) -> Report {
    let sources = match ledger.run(state::sources).await {
        Ok(s) => s,
        Err(e) => return Report::failure(format!("ledger: {e}")),
    };
    let sources: Vec<_> = sources
        .into_iter()
        .filter(|s| from.is_none_or(|f| f == s.source))
        .collect();
    if sources.is_empty() {
        println!(
            "no migration recorded in {}{}",
            ledger.path().display(),
            from.map(|f| format!(" for {f:?}")).unwrap_or_default()
        );
        return Report::default();
    }
    for s in sources {
        let p = s.progress;
        println!(
            "{}: {} of {} objects, {} of {} bytes ({} of {}), {} failed; listing {}",
            s.source,
            p.objects_done,
            p.objects_total,
            p.bytes_done,
            p.bytes_total,
            ByteSize(p.bytes_done),
            ByteSize(p.bytes_total),
            p.failed,
            if s.listing_done {
                "complete"
            } else {
                "incomplete (a run is under way or was interrupted)"
            },
        );
    }
    Report::default()
}
