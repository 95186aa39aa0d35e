//! The bulk backfill of a fallback store into the primary, under a load budget, resumable,
//! verified: a library [`Job`] that `fediedge migrate` ([`crate::cli::migrate`]) and `serve`'s
//! background backfill both run. No printing and no exit codes here: a run returns a
//! [`Summary`] and the caller decides what to show.
//!
//! A run lists the source (or reads a key file) into the migration table of the ledger
//! ([`state`]) while a dispatcher hands the keys, in listing order, to at most `concurrency`
//! object tasks ([`worker`]). Each task skips what the ledger records as copied into this
//! primary or what the primary already holds (without reading the source body), else copies
//! the object verified, retrying with backoff. Stopping abandons the reads under way (nothing
//! partial is written) and lets verified puts finish; a rerun takes the keys still pending.
//!
//! The job takes store *handles*, not configs: `serve` passes its own, so the fallback's
//! `max_concurrency` is one limit shared by live reads and the backfill.
//!
//! - [`plan`]: listing into the table; key-file parsing.
//! - [`state`]: the tables (per source and destination), and [`progress`] for `/metrics`.
//! - [`worker`]: one object, from the skip checks to the ledger record.
//! - [`budget`]: ops/s and bytes/s as seen by the source.
//! - [`verify`]: re-checking copies against the source.
//! - [`progress`](mod@progress): the bar or the log lines, for callers that show progress.

pub mod budget;
pub mod plan;
pub mod progress;
pub mod state;
pub mod verify;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use state::{progress, Progress, Route};

use crate::config::{Config, StoreConfig, StoreType};
use crate::key::Key;
use crate::ledger::{Ledger, LedgerError};
use crate::store::{StoreError, StoreHandle};
use budget::Budget;
use progress::Counters;
use worker::Ctx;

/// Why a migration could not run, or what ended it early.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// `--from` names no fallback.
    #[error("no fallback store named {name:?} in the config; fallbacks: {fallbacks:?}")]
    UnknownSource {
        /// The name asked for.
        name: String,
        /// The fallbacks there are.
        fallbacks: Vec<String>,
    },
    /// `--from` names the primary.
    #[error("{name:?} is the primary; --from takes a fallback: {fallbacks:?}")]
    SourceIsPrimary {
        /// The primary's name.
        name: String,
        /// The fallbacks there are.
        fallbacks: Vec<String>,
    },
    /// An http store cannot be listed, and no key file was given.
    #[error("{name:?} is an http store, which cannot be listed: give the keys with --keys FILE")]
    NeedsKeys {
        /// The store.
        name: String,
    },
    /// The per-run temp directory could not be made.
    #[error("cannot create a directory in {path}: {source}")]
    WorkDir {
        /// Its parent, `data_dir/tmp-migrate`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The listing (or the key file) failed part way.
    #[error(transparent)]
    Listing(#[from] plan::PlanError),
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl MigrateError {
    /// True for mistakes in what was asked (a CLI exits 2 on these), not failures on the way.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            MigrateError::UnknownSource { .. }
                | MigrateError::SourceIsPrimary { .. }
                | MigrateError::NeedsKeys { .. }
        )
    }
}

/// The `[[fallback]]` named `name`, or why it cannot be a source.
pub fn source_config<'a>(config: &'a Config, name: &str) -> Result<&'a StoreConfig, MigrateError> {
    if let Some(s) = config.fallbacks.iter().find(|s| s.name == name) {
        return Ok(s);
    }
    let fallbacks = config.fallbacks.iter().map(|s| s.name.clone()).collect();
    Err(if name == config.primary.name {
        MigrateError::SourceIsPrimary {
            name: name.to_owned(),
            fallbacks,
        }
    } else {
        MigrateError::UnknownSource {
            name: name.to_owned(),
            fallbacks,
        }
    })
}

/// One migration of `source` into `primary`: build it with [`Job::new`], adjust the public
/// fields, then [`Job::run`] (copy) or [`Job::verify`].
pub struct Job {
    /// The store copied from.
    pub source: StoreHandle,
    /// The store copied into.
    pub primary: StoreHandle,
    /// The primary's identity ([`crate::config::StoreConfig::destination`]): copies are
    /// recorded, and looked up, under it.
    pub destination: String,
    /// The ledger (record of copies and the migration tables).
    pub ledger: Ledger,
    /// `data_dir`: bodies over 4 MiB are read into `data_dir/tmp-migrate/run-*`.
    pub data_dir: PathBuf,
    /// Copy the keys of this file instead of listing the source (see
    /// [`plan::parse_key_line`]). Needed for an http store. Default: none.
    pub keys: Option<PathBuf>,
    /// Objects in work at once. Default 4.
    pub concurrency: usize,
    /// Requests per second to the source. Default: unlimited.
    pub max_ops_per_sec: Option<u32>,
    /// Body bytes per second from the source. Default: unlimited.
    pub max_bytes_per_sec: Option<u64>,
    /// Retries of a failed copy within the run. Default 3.
    pub retries: u32,
    /// Wait before the first retry, doubled for each next one. Default 1 s.
    pub retry_delay: Duration,
    /// While this reads `true` (live work under way in `serve`), no new object is started.
    /// Default: none.
    pub gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// Progress, updated as the run goes: give it to [`progress::show`] to display it.
    pub counters: Arc<Counters>,
}

/// What a copy run did.
#[derive(Debug)]
pub struct Summary {
    /// Which source into which primary.
    pub route: Route,
    /// Objects copied by this run.
    pub copied: u64,
    /// Objects that needed no copy.
    pub skipped: u64,
    /// Objects this run gave up on.
    pub failed: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// How long the run took.
    pub elapsed: Duration,
    /// The run was stopped before its end (rerun to resume).
    pub interrupted: bool,
    /// Lines of the key file that were refused (each is logged).
    pub refused_lines: u64,
    /// What ended the run early, other than a stop (the listing or the ledger failed).
    pub errors: Vec<MigrateError>,
    /// The last failed keys of this migration (key, attempts, reason), at most 10.
    pub failures: Vec<(String, u32, String)>,
}

impl Job {
    /// A job with the defaults listed on each field.
    pub fn new(
        source: StoreHandle,
        primary: StoreHandle,
        destination: String,
        ledger: Ledger,
        data_dir: &Path,
    ) -> Job {
        Job {
            source,
            primary,
            destination,
            ledger,
            data_dir: data_dir.to_owned(),
            keys: None,
            concurrency: 4,
            max_ops_per_sec: None,
            max_bytes_per_sec: None,
            retries: 3,
            retry_delay: Duration::from_secs(1),
            gate: None,
            counters: Arc::default(),
        }
    }

    /// Which source into which primary.
    pub fn route(&self) -> Route {
        Route {
            source: self.source.name().to_owned(),
            destination: self.destination.clone(),
        }
    }

    fn into_ctx(self) -> Result<(Ctx, Option<PathBuf>, usize), MigrateError> {
        // One directory per run, removed when the run ends: several runs (a `migrate` beside
        // `serve`'s backfill, a verification) never touch each other's bodies. A run that was
        // killed leaves its directory behind; its bodies were never put anywhere.
        let parent = self.data_dir.join("tmp-migrate");
        let tmp_dir = std::fs::create_dir_all(&parent)
            .and_then(|()| tempfile::Builder::new().prefix("run-").tempdir_in(&parent))
            .map_err(|source| MigrateError::WorkDir {
                path: parent.clone(),
                source,
            })?;
        let route = self.route();
        let ctx = Ctx {
            source: self.source,
            primary: self.primary,
            route,
            ledger: self.ledger,
            budget: Budget::new(self.max_ops_per_sec, self.max_bytes_per_sec),
            tmp_dir,
            counters: self.counters,
            retries: self.retries,
            retry_delay: self.retry_delay,
            gate: self.gate,
        };
        Ok((ctx, self.keys, self.concurrency.max(1)))
    }

    /// Lists and copies until everything listed is done or `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) -> Result<Summary, MigrateError> {
        if self.source.kind() == StoreType::Http && self.keys.is_none() {
            return Err(MigrateError::NeedsKeys {
                name: self.source.name().to_owned(),
            });
        }
        let (ctx, keys, concurrency) = self.into_ctx()?;
        run_copy(Arc::new(ctx), keys, concurrency, stop).await
    }

    /// Copies nothing: re-checks what was copied from the source into this primary against
    /// the source (`deep`: both bodies read and compared).
    pub async fn verify(
        self,
        deep: bool,
        stop: CancellationToken,
    ) -> Result<verify::Verified, MigrateError> {
        let (ctx, _, concurrency) = self.into_ctx()?;
        let route = ctx.route.clone();
        let keys = ctx
            .ledger
            .run(move |c| state::copied_keys(c, &route))
            .await?;
        Ok(verify::verify(Arc::new(ctx), keys, deep, concurrency, stop).await)
    }
}

/// Every migration recorded in the ledger, per (source, destination).
pub async fn status(ledger: &Ledger) -> Result<Vec<state::SourceState>, MigrateError> {
    Ok(ledger.run(state::sources).await?)
}

async fn run_copy(
    ctx: Arc<Ctx>,
    keys: Option<PathBuf>,
    concurrency: usize,
    stop: CancellationToken,
) -> Result<Summary, MigrateError> {
    let started = Instant::now();
    let route = ctx.route.clone();
    let r = route.clone();
    let (cursor, base) = ctx
        .ledger
        .run(move |c| {
            let cursor = state::begin(c, &r)?;
            let base = state::counts(c, Some(&r.source), &r.destination)?;
            Ok::<_, LedgerError>((cursor, base))
        })
        .await?;
    let counters = ctx.counters.clone();
    counters.set_base(base);
    let notify = Arc::new(Notify::new());
    let sink = plan::Sink {
        ledger: ctx.ledger.clone(),
        route: route.clone(),
        notify: notify.clone(),
        counters: counters.clone(),
    };
    // Only an S3 listing is in key order, so only there can it resume after the cursor; a
    // directory walk starts again (it reads no bodies, and known keys keep their status).
    let start_after = cursor
        .filter(|_| ctx.source.kind() == StoreType::S3)
        .and_then(|c| Key::parse(&c).ok());
    if let Some(k) = &start_after {
        tracing::info!(after = %k, "resuming the listing");
    }
    let lister = {
        let (store, sink) = (ctx.source.clone(), sink.clone());
        tokio::spawn(async move {
            let result = match &keys {
                Some(path) => plan::list_file(path, &sink).await,
                None => plan::list_store(&store, start_after, &sink)
                    .await
                    .map(|()| 0),
            };
            if result.is_ok() {
                let route = sink.route.clone();
                if let Err(e) = sink
                    .ledger
                    .run(move |c| state::listing_finished(c, &route))
                    .await
                {
                    tracing::error!(error = %e, "could not record the end of the listing");
                }
            }
            sink.notify.notify_one();
            result
        })
    };
    let dispatched = dispatch(&ctx, &route, concurrency, &lister, &notify, &stop).await;
    if !lister.is_finished() {
        lister.abort();
    }
    let interrupted = stop.is_cancelled();
    let mut errors = Vec::new();
    let mut refused_lines = 0;
    if let Err(e) = dispatched {
        errors.push(e);
    }
    match lister.await {
        Ok(Ok(bad)) => refused_lines = bad,
        Ok(Err(e)) => errors.push(e.into()),
        // Aborted because the run stopped first.
        Err(_) => {}
    }
    let c = &counters;
    let failed = c.failed.load(Relaxed);
    let failures = if failed > 0 {
        let r = route.clone();
        ctx.ledger
            .run(move |c| state::failures(c, &r, 10))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Ok(Summary {
        route,
        copied: c.copied.load(Relaxed),
        skipped: c.skipped.load(Relaxed),
        failed,
        bytes: c.copied_bytes.load(Relaxed),
        elapsed: started.elapsed(),
        interrupted,
        refused_lines,
        errors,
        failures,
    })
}

/// Hands pending keys, in listing order, to object tasks, `concurrency` at a time, until the
/// listing is over and nothing is left, or `stop`.
async fn dispatch(
    ctx: &Arc<Ctx>,
    route: &Route,
    concurrency: usize,
    lister: &tokio::task::JoinHandle<Result<u64, plan::PlanError>>,
    notify: &Notify,
    stop: &CancellationToken,
) -> Result<(), MigrateError> {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut after = 0i64;
    let result = 'outer: loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        // Read before the batch: rows recorded before the listing ended are then visible.
        let listing_over = lister.is_finished();
        let r = route.clone();
        let batch = ctx
            .ledger
            .run(move |c| state::next_batch(c, &r, after, 256))
            .await;
        let batch = match batch {
            Ok(b) => b,
            Err(e) => break Err(e.into()),
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
